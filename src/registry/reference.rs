//! Image references as docker writes them: `[HOST[:PORT]/]NAME[:TAG][@sha256:HEX]`.
//!
//! Pure parsing, no I/O. The first component is a registry host when it contains a `.` or a
//! `:`, or is `localhost` (docker's rule); otherwise the image is on docker.io and a
//! one-component name gets docker's `library/` prefix.

use crate::digest::parse_digest;
use crate::error::{Error, Result};

/// The registry docker uses for names without a host.
const DOCKER_HUB: &str = "docker.io";
/// Where docker.io's API actually answers.
const DOCKER_HUB_API: &str = "registry-1.docker.io";
/// Names docker also accepts for Docker Hub (`index.docker.io/alpine` is `docker.io/library/alpine`).
const DOCKER_HUB_ALIASES: &[&str] = &["index.docker.io", "registry-1.docker.io"];
/// The tag of a reference that names none.
const DEFAULT_TAG: &str = "latest";

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// `host[:port]` as written (docker.io for none)
    pub registry: String,
    /// repository path, e.g. `library/busybox` or `test`
    pub repository: String,
    /// tag, if the reference has one
    pub tag: Option<String>,
    /// `sha256:HEX`, if the reference pins a manifest digest
    pub digest: Option<String>,
}

impl Reference {
    /// Parse `s`; errors read `image reference "s": why (fix)`.
    pub fn parse(s: &str) -> Result<Reference> {
        let bad = |why: &str| {
            Error::usage(
                format!("image reference \"{s}\""),
                why,
                "write it as HOST[:PORT]/NAME[:TAG] or HOST[:PORT]/NAME@sha256:HEX",
            )
        };
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (r, Some(parse_digest(d, "image digest")?)),
            None => (s, None),
        };
        let (host, path) = match rest.split_once('/') {
            // docker's other names for Docker Hub are Docker Hub
            Some((h, p)) if DOCKER_HUB_ALIASES.contains(&h) => (DOCKER_HUB.to_string(), p),
            Some((h, p)) if h.contains('.') || h.contains(':') || h == "localhost" => (h.to_string(), p),
            _ => (DOCKER_HUB.to_string(), rest),
        };
        // A tag is after the last ':' of the last path component (a ':' before the last '/'
        // belongs to the host, which is already split off).
        let (path, tag) = match path.rsplit_once(':') {
            Some((p, t)) if !t.contains('/') => (p, Some(t.to_string())),
            _ => (path, None),
        };
        if path.is_empty() || host.is_empty() {
            return Err(bad("no repository name"));
        }
        let name_ok = path.split('/').all(|c| {
            !c.is_empty()
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        });
        if !name_ok {
            return Err(bad(
                "a repository name is lower-case letters, digits and . _ - between /",
            ));
        }
        if let Some(t) = &tag {
            let ok = !t.is_empty()
                && t.len() <= 128
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !ok {
                return Err(bad("a tag is up to 128 letters, digits and . _ -"));
            }
        }
        let repository = if host == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path.to_string()
        };
        Ok(Reference {
            registry: host,
            repository,
            tag,
            digest,
        })
    }

    /// What to ask the registry for: the digest if pinned, else the tag (`latest` by default).
    pub fn manifest_ref(&self) -> &str {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d,
            (None, Some(t)) => t,
            (None, None) => DEFAULT_TAG,
        }
    }

    /// The host the API answers on (docker.io's is registry-1.docker.io).
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// Is the registry on this machine? Loopback registries speak plain HTTP by default, as
    /// docker treats 127.0.0.0/8 as insecure.
    pub fn is_loopback(&self) -> bool {
        let host = match self.registry.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => &self.registry,
        };
        is_loopback_host(host)
    }
}

/// Is `host` (a name or address, IPv6 in brackets, no port) this machine?
pub fn is_loopback_host(host: &str) -> bool {
    host == "localhost" || host.starts_with("127.") || host == "[::1]" || host == "::1"
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_like_docker() {
        let d = format!("sha256:{}", "a".repeat(64));
        // reference -> (registry, repository, tag, digest)
        type Parts<'a> = (&'a str, &'a str, Option<&'a str>, Option<&'a str>);
        let cases: Vec<(String, Parts)> = vec![
            (
                "127.0.0.1:5000/test:1".into(),
                ("127.0.0.1:5000", "test", Some("1"), None),
            ),
            ("localhost/a/b".into(), ("localhost", "a/b", None, None)),
            ("busybox".into(), ("docker.io", "library/busybox", None, None)),
            (
                "alpine:3.20".into(),
                ("docker.io", "library/alpine", Some("3.20"), None),
            ),
            (
                "docker.io/alpine".into(),
                ("docker.io", "library/alpine", None, None),
            ),
            (
                "index.docker.io/alpine".into(),
                ("docker.io", "library/alpine", None, None),
            ),
            ("docker.io/user/app".into(), ("docker.io", "user/app", None, None)),
            ("localhost:5000/app".into(), ("localhost:5000", "app", None, None)),
            ("user/app:v2".into(), ("docker.io", "user/app", Some("v2"), None)),
            (format!("h.io/x@{d}"), ("h.io", "x", None, Some(d.as_str()))),
            (
                format!("h.io:1/x:t@{d}"),
                ("h.io:1", "x", Some("t"), Some(d.as_str())),
            ),
        ];
        for (s, (reg, repo, tag, dig)) in cases {
            let r = Reference::parse(&s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(
                (
                    r.registry.as_str(),
                    r.repository.as_str(),
                    r.tag.as_deref(),
                    r.digest.as_deref()
                ),
                (reg, repo, tag, dig),
                "{s}"
            );
        }
        for bad in [
            "",
            "Host.io/UPPER",
            "h.io/",
            "h.io/x:",
            "h.io/x@sha256:12",
            "h.io//x",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad:?} must be refused");
        }
        assert!(Reference::parse("127.0.0.1:5000/t")
            .map(|r| r.is_loopback())
            .unwrap_or(false));
        assert!(!Reference::parse("quay.io/t")
            .map(|r| r.is_loopback())
            .unwrap_or(true));
        assert_eq!(
            Reference::parse("h.io/x")
                .map(|r| r.manifest_ref().to_string())
                .ok(),
            Some("latest".into())
        );
        // alpine -> docker.io/library/alpine:latest, spoken to at registry-1.docker.io
        let a = Reference::parse("alpine").expect("alpine");
        assert_eq!(
            (a.api_host(), a.repository.as_str(), a.manifest_ref()),
            ("registry-1.docker.io", "library/alpine", "latest")
        );
    }
}
