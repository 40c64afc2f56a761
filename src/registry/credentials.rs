//! Registry credentials from the files users already have, so `podman login` (or `docker
//! login`) once is enough: containers' `auth.json` and docker's `config.json`, with their
//! `auths` entries (`auth`: base64 of `user:password`), `credHelpers` and `credsStore`
//! (`docker-credential-NAME get`, the server on stdin, the answer as JSON on stdout).
//!
//! Files, first match wins: `--authfile` or `$REGISTRY_AUTH_FILE` alone when given; else
//! `$XDG_RUNTIME_DIR/containers/auth.json`, `~/.config/containers/auth.json`,
//! `$DOCKER_CONFIG/config.json` (default `~/.docker/config.json`).
//!
//! Must not: log a secret, wait on a helper forever, or read an unbounded answer from one.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;

use crate::error::{Error, Result};

/// The registry docker.io's credentials are stored under by docker (podman uses `docker.io`).
const DOCKER_HUB_LEGACY_KEY: &str = "https://index.docker.io/v1/";
/// The longest auth file read.
const MAX_AUTH_FILE: u64 = 4 << 20;
/// How long a credential helper may take.
const HELPER_TIMEOUT: Duration = Duration::from_secs(10);
/// The most a credential helper may print.
const MAX_HELPER_OUTPUT: u64 = 64 << 10;

/// A user name and a password (or a registry token the helper handed out as the password).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// user name
    pub user: String,
    /// password or token
    pub password: String,
    /// where they came from (a file and key, or a helper), for messages
    pub source: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({} from {})", self.user, self.source)
    }
}

/// The auth files in the order they are read (`authfile` is `--authfile`).
pub fn auth_files(authfile: Option<&Path>) -> Vec<PathBuf> {
    if let Some(f) = authfile {
        return vec![f.to_path_buf()];
    }
    if let Some(f) = std::env::var_os("REGISTRY_AUTH_FILE").filter(|f| !f.is_empty()) {
        return vec![PathBuf::from(f)];
    }
    let mut v = Vec::new();
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        v.push(Path::new(&d).join("containers/auth.json"));
    }
    let home = std::env::var_os("HOME").map(PathBuf::from);
    if let Some(h) = &home {
        v.push(h.join(".config/containers/auth.json"));
    }
    match std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        Some(d) => v.push(Path::new(&d).join("config.json")),
        None => {
            if let Some(h) = &home {
                v.push(h.join(".docker/config.json"));
            }
        }
    }
    v
}

/// The keys an entry for `registry`/`repository` may be stored under, most specific first
/// (containers' `HOST/NAMESPACE/REPO` entries, then `HOST`; docker.io also under docker's
/// legacy key).
fn keys(registry: &str, repository: &str) -> Vec<String> {
    let mut v = Vec::new();
    let mut path = format!("{registry}/{repository}");
    loop {
        v.push(path.clone());
        match path.rsplit_once('/') {
            Some((p, _)) => path = p.to_string(),
            None => break,
        }
    }
    if registry == "docker.io" {
        v.push(DOCKER_HUB_LEGACY_KEY.to_string());
    }
    v
}

/// A key as written in a file, normalized: no scheme, no trailing `/`, docker's legacy hub
/// names as `docker.io`.
fn normalize_key(k: &str) -> String {
    if k == DOCKER_HUB_LEGACY_KEY {
        return k.to_string();
    }
    let k = k
        .strip_prefix("https://")
        .or_else(|| k.strip_prefix("http://"))
        .unwrap_or(k)
        .trim_end_matches('/');
    for hub in ["index.docker.io", "registry-1.docker.io", "docker.io"] {
        if let Some(rest) = k.strip_prefix(hub) {
            if rest.is_empty() || rest == "/v1" || rest == "/v2" {
                return "docker.io".into();
            }
            if let Some(p) = rest.strip_prefix('/') {
                return format!("docker.io/{p}");
            }
        }
    }
    k.to_string()
}

/// Credentials for `registry` (`HOST[:PORT]`, docker.io for Docker Hub) and `repository`,
/// from the first file that has an entry. `Ok(None)`: anonymous.
pub fn lookup(registry: &str, repository: &str, authfile: Option<&Path>) -> Result<Option<Credentials>> {
    let wanted = keys(registry, repository);
    for file in auth_files(authfile) {
        let Some(doc) = read_json(&file)? else {
            continue;
        };
        if let Some(c) = from_doc(&doc, &file, registry, &wanted)? {
            return Ok(Some(c));
        }
    }
    Ok(None)
}

/// An auth file as JSON; `None` when it does not exist.
fn read_json(file: &Path) -> Result<Option<serde_json::Value>> {
    let f = match std::fs::File::open(file) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("open auth file", file, e)),
    };
    let mut bytes = Vec::new();
    f.take(MAX_AUTH_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io("read auth file", file, e))?;
    if bytes.len() as u64 > MAX_AUTH_FILE {
        return Err(Error::usage(
            format!("auth file {}", file.display()),
            format!("larger than {MAX_AUTH_FILE} bytes"),
            "point --authfile or REGISTRY_AUTH_FILE at a real auth.json",
        ));
    }
    serde_json::from_slice(&bytes).map(Some).map_err(|e| {
        Error::usage(
            format!("auth file {}", file.display()),
            format!("not JSON: {e}"),
            "fix or remove it (podman login and docker login write it)",
        )
    })
}

/// The entry for one of `wanted` in one auth file.
fn from_doc(
    doc: &serde_json::Value,
    file: &Path,
    registry: &str,
    wanted: &[String],
) -> Result<Option<Credentials>> {
    let find = |section: &str| -> Option<(String, &serde_json::Value)> {
        let obj = doc.get(section)?.as_object()?;
        wanted.iter().find_map(|w| {
            obj.iter()
                .find(|(k, _)| normalize_key(k) == *w)
                .map(|(k, v)| (k.clone(), v))
        })
    };
    if let Some((key, helper)) = find("credHelpers") {
        if let Some(name) = helper.as_str() {
            return helper_get(name, &key, registry);
        }
    }
    if let Some((key, entry)) = find("auths") {
        if let Some(auth) = entry
            .get("auth")
            .and_then(|a| a.as_str())
            .filter(|a| !a.is_empty())
        {
            let bad = |why: &str| {
                Error::usage(
                    format!("auth file {}, entry {key}", file.display()),
                    why.to_string(),
                    format!("log in again with `podman login {registry}`"),
                )
            };
            let raw = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|_| bad("its auth is not base64"))?;
            let text = String::from_utf8(raw).map_err(|_| bad("its auth is not UTF-8"))?;
            let (user, password) = text
                .split_once(':')
                .ok_or_else(|| bad("its auth is not user:password"))?;
            return Ok(Some(Credentials {
                user: user.to_string(),
                password: password.to_string(),
                source: format!("{} ({key})", file.display()),
            }));
        }
    }
    if let Some(store) = doc
        .get("credsStore")
        .and_then(|s| s.as_str())
        .filter(|s| !s.is_empty())
    {
        let server = if registry == "docker.io" {
            DOCKER_HUB_LEGACY_KEY
        } else {
            registry
        };
        return helper_get(store, server, registry);
    }
    Ok(None)
}

/// `docker-credential-NAME get` with `server` on stdin: `{"Username":..,"Secret":..}`, or
/// "credentials not found" (none). Bounded in time and output.
fn helper_get(name: &str, server: &str, registry: &str) -> Result<Option<Credentials>> {
    let prog = format!("docker-credential-{name}");
    let what = || format!("credential helper {prog} for {registry}");
    if name.is_empty() || name.contains('/') {
        return Err(Error::usage(
            what(),
            "not a helper name",
            "fix credHelpers/credsStore in the auth file",
        ));
    }
    let mut child = Command::new(&prog)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| {
            Error::usage(
                what(),
                format!("cannot run it: {e}"),
                format!("install {prog}, or remove it from the auth file's credHelpers/credsStore"),
            )
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        // a helper that exits without reading makes this EPIPE; its exit status tells
        let _ = stdin.write_all(server.as_bytes());
    }
    let stdout = child.stdout.take();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut out = Vec::new();
        if let Some(s) = stdout {
            let _ = s.take(MAX_HELPER_OUTPUT + 1).read_to_end(&mut out);
        }
        let _ = tx.send(out);
    });
    let deadline = Instant::now() + HELPER_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) | Err(_) => {
                // by PID: the helper we started
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::remote(
                    what(),
                    format!("no answer within {HELPER_TIMEOUT:?}"),
                    "check the helper (does it wait for a password prompt?)",
                ));
            }
        }
    };
    let out = rx
        .recv_timeout(Duration::from_secs(1))
        .map_err(|_| Error::remote(what(), "its output did not end", "check the helper"))?;
    let text = String::from_utf8_lossy(&out);
    if !status.success() {
        if text.contains("credentials not found") {
            return Ok(None);
        }
        return Err(Error::remote(
            what(),
            format!(
                "failed ({status}): {}",
                text.trim().chars().take(200).collect::<String>()
            ),
            format!("log in again with `podman login {registry}`"),
        ));
    }
    if out.len() as u64 > MAX_HELPER_OUTPUT {
        return Err(Error::remote(what(), "answered too much", "check the helper"));
    }
    let v: serde_json::Value = serde_json::from_slice(&out)
        .map_err(|e| Error::remote(what(), format!("answer is not JSON: {e}"), "check the helper"))?;
    let field = |k: &str| v.get(k).and_then(|s| s.as_str()).unwrap_or("").to_string();
    let (user, password) = (field("Username"), field("Secret"));
    if password.is_empty() {
        return Ok(None);
    }
    Ok(Some(Credentials {
        user,
        password,
        source: prog,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_as_podman_and_docker_write_them() {
        let w = keys("docker.io", "library/alpine");
        for (written, matches) in [
            ("docker.io", true),
            ("https://index.docker.io/v1/", true),
            ("index.docker.io", true),
            ("docker.io/library", true),
            ("docker.io/library/alpine", true),
            ("docker.io/other", false),
            ("quay.io", false),
        ] {
            assert_eq!(w.contains(&normalize_key(written)), matches, "{written}");
        }
        let w = keys("127.0.0.1:5000", "test");
        assert!(w.contains(&normalize_key("http://127.0.0.1:5000")));
        assert!(!w.contains(&normalize_key("127.0.0.1:5001")));
    }

    #[test]
    fn auths_entries_decode_and_the_most_specific_wins() {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let doc = serde_json::json!({"auths": {
            "h.io": {"auth": b64("u:p:with:colons")},
            "h.io/team": {"auth": b64("team:secret")},
        }});
        let f = Path::new("/nonexistent/auth.json");
        let got = from_doc(&doc, f, "h.io", &keys("h.io", "team/app"))
            .expect("ok")
            .expect("some");
        assert_eq!((got.user.as_str(), got.password.as_str()), ("team", "secret"));
        let got = from_doc(&doc, f, "h.io", &keys("h.io", "x"))
            .expect("ok")
            .expect("some");
        assert_eq!((got.user.as_str(), got.password.as_str()), ("u", "p:with:colons"));
        assert!(from_doc(&doc, f, "g.io", &keys("g.io", "x"))
            .expect("ok")
            .is_none());
        let bad = serde_json::json!({"auths": {"h.io": {"auth": "!!"}}});
        assert!(from_doc(&bad, f, "h.io", &keys("h.io", "x")).is_err());
    }
}
