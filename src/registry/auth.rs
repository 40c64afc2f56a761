//! Registry authentication, pure: `WWW-Authenticate` challenges, the distribution token
//! flow's URLs and answers, `Authorization` values, and the rule of where an
//! `Authorization` header may go.
//!
//! The token flow (distribution `docs/spec/auth/token.md`): a request answered 401 with
//! `Bearer realm="R",service="S",scope="X"` is followed by `GET R?service=S&scope=X`
//! (anonymous, or with the user's basic credentials); its JSON `token` (or `access_token`) is
//! sent as `Authorization: Bearer TOKEN` on the request again. `Basic realm=".."` means the
//! credentials go on every request as `Authorization: Basic`.
//!
//! Must not: do I/O (the client does), or decide that a header may cross to another origin.

use base64::Engine;

use super::credentials::Credentials;

/// How long a token lives when the answer does not say (the spec's default).
pub const DEFAULT_TOKEN_SECS: u64 = 60;
/// The longest challenge header parsed.
const MAX_CHALLENGE: usize = 4096;

/// What a 401's `WWW-Authenticate` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// `Basic realm=".."`: send the credentials on each request
    Basic,
    /// `Bearer realm=..,service=..,scope=..`: get a token from the realm
    Bearer {
        /// the token server's URL
        realm: String,
        /// the `service` parameter for it
        service: Option<String>,
        /// the `scope` it names (`repository:NAME:pull[,push]`)
        scope: Option<String>,
    },
}

/// Parse a `WWW-Authenticate` value: a scheme and `key="value"` (or `key=token`) parameters.
/// `None` for a scheme verlay does not speak or a malformed header.
pub fn parse_challenge(h: &str) -> Option<Challenge> {
    if h.len() > MAX_CHALLENGE {
        return None;
    }
    let h = h.trim();
    let (scheme, rest) = h.split_once(' ').unwrap_or((h, ""));
    let params = parse_params(rest)?;
    let get = |k: &str| {
        params
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.clone())
    };
    if scheme.eq_ignore_ascii_case("basic") {
        Some(Challenge::Basic)
    } else if scheme.eq_ignore_ascii_case("bearer") {
        Some(Challenge::Bearer {
            realm: get("realm")?,
            service: get("service"),
            scope: get("scope"),
        })
    } else {
        None
    }
}

/// `k1="v1", k2=v2` as pairs; quoted values may hold `,` and `\"`.
fn parse_params(s: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Some(out);
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' {
                break;
            }
            key.push(c);
            chars.next();
        }
        chars.next()?; // '='
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next()? {
                    '"' => break,
                    '\\' => value.push(chars.next()?),
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        out.push((key.trim().to_string(), value.trim().to_string()));
    }
}

/// The scope verlay asks for when the challenge names none: `pull` for reads, `pull,push`
/// for anything that writes.
pub fn scope_for(repository: &str, write: bool) -> String {
    format!(
        "repository:{repository}:{}",
        if write { "pull,push" } else { "pull" }
    )
}

/// `REALM?service=S&scope=X`, percent-encoded.
pub fn token_url(realm: &str, service: Option<&str>, scope: &str) -> String {
    let mut url = realm.to_string();
    let mut sep = if realm.contains('?') { '&' } else { '?' };
    if let Some(s) = service {
        url.push(sep);
        url.push_str("service=");
        url.push_str(&percent_encode(s));
        sep = '&';
    }
    url.push(sep);
    url.push_str("scope=");
    url.push_str(&percent_encode(scope));
    url
}

/// RFC 3986 unreserved characters as they are, everything else `%XX`.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A token server's answer: the token and how many seconds it lives.
pub fn parse_token(body: &[u8]) -> Result<(String, u64), String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("answer is not JSON: {e}"))?;
    let token = ["token", "access_token"]
        .iter()
        .find_map(|k| v.get(*k).and_then(|t| t.as_str()).filter(|t| !t.is_empty()))
        .ok_or("answer has no token")?;
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the token is not printable ASCII".into());
    }
    let secs = v
        .get("expires_in")
        .and_then(|e| e.as_u64())
        .unwrap_or(DEFAULT_TOKEN_SECS);
    Ok((token.to_string(), secs))
}

/// `Basic base64(user:password)`.
pub fn basic(c: &Credentials) -> String {
    let raw = format!("{}:{}", c.user, c.password);
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(raw))
}

/// `scheme://host:port` of a URL, the port made explicit and the host lower-cased; `None`
/// for a URL that is not http(s).
pub fn origin(url: &str) -> Option<(String, String, u16)> {
    let (scheme, rest) = url.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let default = match scheme.as_str() {
        "http" => 80,
        "https" => 443,
        _ => return None,
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    // userinfo never names the host
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && !p.contains(']') => (h, p.parse().ok()?),
        _ => (hostport, default),
    };
    if host.is_empty() {
        return None;
    }
    Some((scheme, host.to_ascii_lowercase(), port))
}

/// May the registry's `Authorization` header (basic credentials or its bearer token) be sent
/// to `url`? Only to the registry's own origin: same scheme, host and port as `registry_base`
/// (`https://HOST[:PORT]`). A redirect to blob storage (S3, a CDN) elsewhere gets the
/// request without it; the storage authorizes by the signed URL.
pub fn may_send_authorization(registry_base: &str, url: &str) -> bool {
    match (origin(registry_base), origin(url)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

/// May the user's basic credentials go to a token server at `realm`? Over HTTPS, or over
/// plain HTTP to a loopback host (a test or a local token server); never in clear text across
/// a network.
pub fn may_send_credentials_to_realm(realm: &str) -> bool {
    match origin(realm) {
        Some((scheme, host, _)) => {
            scheme == "https" || host == "localhost" || host.starts_with("127.") || host == "[::1]"
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse() {
        let cases = [
            (
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#,
                Some(Challenge::Bearer {
                    realm: "https://auth.docker.io/token".into(),
                    service: Some("registry.docker.io".into()),
                    scope: Some("repository:library/alpine:pull".into()),
                }),
            ),
            (
                r#"bearer realm="http://127.0.0.1:9/t", scope="repository:a/b:pull,push""#,
                Some(Challenge::Bearer {
                    realm: "http://127.0.0.1:9/t".into(),
                    service: None,
                    scope: Some("repository:a/b:pull,push".into()),
                }),
            ),
            (r#"Basic realm="Registry Realm""#, Some(Challenge::Basic)),
            ("Basic", Some(Challenge::Basic)),
            (r#"Bearer service="x""#, None),
            (r#"Bearer realm="unterminated"#, None),
            (r#"Negotiate abc"#, None),
        ];
        for (h, want) in cases {
            assert_eq!(parse_challenge(h), want, "{h}");
        }
    }

    #[test]
    fn token_urls_and_answers() {
        assert_eq!(
            token_url("https://a/token", Some("reg svc"), "repository:x/y:pull,push"),
            "https://a/token?service=reg%20svc&scope=repository%3Ax%2Fy%3Apull%2Cpush"
        );
        assert_eq!(token_url("https://a/t?x=1", None, "s"), "https://a/t?x=1&scope=s");
        assert_eq!(
            parse_token(br#"{"token":"abc","expires_in":300}"#),
            Ok(("abc".into(), 300))
        );
        assert_eq!(
            parse_token(br#"{"access_token":"xyz"}"#),
            Ok(("xyz".into(), DEFAULT_TOKEN_SECS))
        );
        assert!(parse_token(br#"{"token":""}"#).is_err());
        assert!(parse_token(b"{\"token\":\"a\\nb\"}").is_err());
        assert!(parse_token(b"<html>").is_err());
    }

    #[test]
    fn authorization_stays_with_the_registry() {
        let base = "https://reg.example:5000";
        for (url, ok) in [
            ("https://reg.example:5000/v2/x/blobs/sha256:1", true),
            ("https://REG.example:5000/v2/", true),
            ("https://reg.example/v2/", false),
            ("http://reg.example:5000/v2/", false),
            ("https://s3.amazonaws.com/bucket/blob?sig=1", false),
            ("https://reg.example:5000@evil.example/", false),
            ("https://evil.example/?https://reg.example:5000", false),
            ("ftp://reg.example:5000/", false),
        ] {
            assert_eq!(may_send_authorization(base, url), ok, "{url}");
        }
        assert!(may_send_authorization("https://h.io", "https://h.io:443/v2/"));
        assert!(may_send_credentials_to_realm("https://auth.docker.io/token"));
        assert!(may_send_credentials_to_realm("http://127.0.0.1:4000/token"));
        assert!(!may_send_credentials_to_realm("http://auth.example/token"));
    }
}
