//! The HTTP side of the OCI distribution API: one blocking client per registry repository,
//! bounded retries with exponential backoff, and errors in the `what: why (fix)` form.
//!
//! Owns: talking HTTP (ureq, plain HTTP only: the crate is built without TLS), classifying a
//! failure as transient (timeout, refused or dropped connection, 5xx, 429) or final (any
//! other 4xx, a name that does not resolve), and turning the last failure into an
//! [`Error::Remote`] that says what failed.
//!
//! Must not: retry a request whose effect is not idempotent. Callers that append data (blob
//! upload chunks) handle their own retries and ask the registry where it stands first
//! (see `push`). Connections are not pooled: every request has its own, so a connection
//! that failed is never reused and a retry always starts on a fresh one.

use std::io::Read;
use std::time::Duration;

use ureq::http::{self, HeaderMap, Method, Response};

use super::reference::{is_loopback_host, Reference};
use crate::error::{Error, Result};

/// The longest JSON document (manifest, index, error body) read into memory.
pub const MAX_DOC: u64 = 8 << 20;
/// Backoff after the first failed attempt; it doubles each time up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Redirects followed for one request. A registry redirects a blob once, to its storage;
/// ureq's own following is off, so that every hop passes the same host rule as the first.
const MAX_REDIRECTS: u32 = 5;
/// Longest pause between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(3);

/// How to talk to a registry (the `verlay image pull|push` options).
#[derive(Debug, Clone)]
pub struct Options {
    /// speak plain HTTP (the default for loopback registries)
    pub plain_http: bool,
    /// how many times a failed request is tried again
    pub retries: u32,
    /// idle timeout of every read and write on a connection, and of connecting
    pub timeout: Duration,
    /// bytes per upload chunk (PATCH)
    pub chunk_size: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            plain_http: false,
            retries: 5,
            timeout: Duration::from_secs(30),
            chunk_size: 8 << 20,
        }
    }
}

/// One failed attempt.
#[derive(Debug)]
pub enum Fail {
    /// worth trying again: the string says what happened
    Transient(String),
    /// trying again cannot help
    Fatal(Error),
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        Fail::Fatal(e)
    }
}

/// A client for one repository of one registry.
pub struct Client {
    agent: ureq::Agent,
    /// `http://host[:port]`
    base: String,
    /// the reference as the user wrote it, for messages
    pub reference: Reference,
    /// the options it was made with
    pub opts: Options,
}

/// A response whose status and headers have been read; the body is still on the wire.
pub struct Reply {
    /// HTTP status code
    pub status: u16,
    /// response headers
    pub headers: HeaderMap,
    /// the body
    pub body: ureq::Body,
}

impl Reply {
    /// A header as a string, if present and ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body read whole (at most [`MAX_DOC`] bytes).
    pub fn bytes(mut self) -> std::result::Result<Vec<u8>, Fail> {
        self.body
            .with_config()
            .limit(MAX_DOC)
            .read_to_vec()
            .map_err(|e| transport(&e))
    }

    /// The registry's error message: the codes and messages of its JSON error body, or the
    /// status line when there is none.
    pub fn error_text(self) -> String {
        let status = self.status;
        let body = self.bytes().unwrap_or_default();
        let parsed: Option<Vec<String>> = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("errors").and_then(|e| e.as_array()).cloned())
            .map(|errs| {
                errs.iter()
                    .map(|e| {
                        let f = |k| e.get(k).and_then(|v| v.as_str()).unwrap_or("");
                        format!("{} {}", f("code"), f("message")).trim().to_string()
                    })
                    .collect()
            });
        let reason = http::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("");
        match parsed {
            Some(p) if !p.is_empty() => format!("HTTP {status} {reason}: {}", p.join("; ")),
            _ => format!("HTTP {status} {reason}"),
        }
    }
}

/// Classify a ureq failure: everything on the wire is transient, a name that does not
/// resolve or a malformed URL is not.
fn transport(e: &ureq::Error) -> Fail {
    match e {
        ureq::Error::HostNotFound | ureq::Error::BadUri(_) | ureq::Error::Http(_) => Fail::Fatal(
            Error::remote("registry request", e.to_string(), "check the registry host name"),
        ),
        ureq::Error::Timeout(t) => Fail::Transient(format!("timed out ({t:?})")),
        ureq::Error::ConnectionFailed => Fail::Transient("connection refused".into()),
        ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            Fail::Transient("connection refused".into())
        }
        other => Fail::Transient(other.to_string()),
    }
}

impl Client {
    /// A client for the registry and repository of `reference`.
    pub fn new(reference: &Reference, opts: &Options) -> Result<Client> {
        if !opts.plain_http && !reference.is_loopback() {
            return Err(Error::usage(
                format!("registry {}", reference.registry),
                "this verlay speaks only plain HTTP (it is built without TLS)",
                "use a registry on 127.0.0.1 or localhost, or pass --plain-http for a plain-HTTP one",
            ));
        }
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .proxy(None)
            .max_idle_connections(0)
            .max_idle_connections_per_host(0)
            .timeout_connect(Some(opts.timeout))
            .timeout_per_read(Some(opts.timeout))
            .timeout_per_write(Some(opts.timeout))
            .user_agent(concat!("verlay/", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(Client {
            agent: config.into(),
            base: format!("http://{}", reference.api_host()),
            reference: reference.clone(),
            opts: opts.clone(),
        })
    }

    /// `BASE/v2/REPO/SUFFIX`.
    pub fn url(&self, suffix: &str) -> String {
        format!("{}/v2/{}/{suffix}", self.base, self.reference.repository)
    }

    /// Resolve a `Location` header: absolute, or a path on the registry.
    pub fn resolve(&self, location: &str) -> std::result::Result<String, Fail> {
        self.resolve_from(&self.base, location)
    }

    /// Resolve a `Location` header of a reply from `origin` (`http://host:port`).
    fn resolve_from(&self, origin: &str, location: &str) -> std::result::Result<String, Fail> {
        if location.starts_with("http://") || location.starts_with("https://") {
            Ok(location.to_string())
        } else if location.starts_with('/') {
            Ok(format!("{origin}{location}"))
        } else {
            Err(Fail::Fatal(Error::remote(
                format!("registry {}", self.reference.registry),
                format!("unexpected upload location \"{location}\""),
                "the registry does not follow the distribution API",
            )))
        }
    }

    /// May a request go to `url`? Without `--plain-http` only to this machine: the rule
    /// [`Client::new`] applies to the registry holds for every URL it sends us to, upload
    /// locations and redirects alike, and is checked before any connection is made.
    /// Returns the URL's origin (`http://host:port`), against which its redirects resolve.
    fn check_host(&self, url: &str) -> std::result::Result<String, Fail> {
        let uri: http::Uri = url.parse().map_err(|e| {
            Fail::Fatal(Error::remote(
                format!("registry {}", self.reference.registry),
                format!("sends us to \"{url}\", which is not a URL ({e})"),
                "the registry does not follow the distribution API",
            ))
        })?;
        let (Some(host), Some(authority)) = (uri.host(), uri.authority()) else {
            return Err(Fail::Fatal(Error::remote(
                format!("registry {}", self.reference.registry),
                format!("sends us to \"{url}\", which names no host"),
                "the registry does not follow the distribution API",
            )));
        };
        if !self.opts.plain_http && !is_loopback_host(host) {
            return Err(Fail::Fatal(Error::usage(
                format!("registry {}", self.reference.registry),
                format!("sends us to {url}, which is not on this machine; plain HTTP goes to other hosts only with --plain-http"),
                "pass --plain-http if that host is meant to be reached without TLS",
            )));
        }
        Ok(format!("{}://{authority}", uri.scheme_str().unwrap_or("http")))
    }

    /// Send one request, following at most [`MAX_REDIRECTS`] redirects of a GET or HEAD,
    /// each to a URL that passes [`Client::check_host`]. Status codes are returned, not
    /// turned into errors, except 401 (no authentication is supported) and 5xx/429
    /// (transient).
    pub fn request(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::result::Result<Reply, Fail> {
        let mut url = url.to_string();
        for _ in 0..=MAX_REDIRECTS {
            let origin = self.check_host(&url)?;
            let reply = self.request_once(method.clone(), &url, headers, body)?;
            let redirect = matches!(reply.status, 301 | 302 | 303 | 307 | 308)
                && (method == Method::GET || method == Method::HEAD);
            if !redirect {
                return Ok(reply);
            }
            let Some(location) = reply.header("Location") else {
                return Ok(reply);
            };
            let next = self.resolve_from(&origin, location)?;
            tracing::debug!(op = %method, url, location = next, "registry redirect");
            url = next;
        }
        Err(Fail::Fatal(Error::remote(
            format!("{method} {url}"),
            format!("more than {MAX_REDIRECTS} redirects"),
            "the registry redirects in a loop; check its storage configuration",
        )))
    }

    /// One request and its reply, no redirect followed.
    fn request_once(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::result::Result<Reply, Fail> {
        let mut b = http::Request::builder().method(method.clone()).uri(url);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(body).map_err(|e| {
            Fail::Fatal(Error::remote(
                format!("{method} {url}"),
                e.to_string(),
                "report this bug",
            ))
        })?;
        tracing::debug!(op = %method, url, bytes = body.len(), "registry request");
        let resp: Response<ureq::Body> = self.agent.run(req).map_err(|e| transport(&e))?;
        let (parts, body) = resp.into_parts();
        let reply = Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        };
        tracing::debug!(op = %method, url, status = reply.status, "registry reply");
        match reply.status {
            401 | 403 => {
                let challenge = reply.header("WWW-Authenticate").unwrap_or("").to_string();
                let text = reply.error_text();
                Err(Fail::Fatal(Error::remote(
                    format!("registry {}", self.reference.registry),
                    format!(
                        "{method} refused: {text}{}",
                        if challenge.is_empty() {
                            String::new()
                        } else {
                            format!(" (asks for {challenge})")
                        }
                    ),
                    "verlay does not log in to registries; use one that allows anonymous access",
                )))
            }
            408 | 429 | 500..=599 => Err(Fail::Transient(format!("{method} {url}: {}", reply.error_text()))),
            _ => Ok(reply),
        }
    }

    /// Run `attempt` until it succeeds, fails for good, or has failed `retries + 1` times,
    /// pausing with exponential backoff in between. `what` names the operation in the final
    /// error.
    pub fn with_retries<T>(
        &self,
        what: &str,
        mut attempt: impl FnMut() -> std::result::Result<T, Fail>,
    ) -> Result<T> {
        let mut last = String::new();
        for n in 0..=self.opts.retries {
            if n > 0 {
                std::thread::sleep(backoff(n));
            }
            match attempt() {
                Ok(v) => return Ok(v),
                Err(Fail::Fatal(e)) => return Err(e),
                Err(Fail::Transient(why)) => {
                    if n < self.opts.retries {
                        tracing::warn!(op = what, attempt = n + 1, error = %why, "registry request failed; retrying");
                    }
                    last = why;
                }
            }
        }
        Err(self.gave_up(what, &last))
    }

    /// The error after the last retry.
    pub fn gave_up(&self, what: &str, last: &str) -> Error {
        Error::remote(
            format!("{what} ({})", self.reference),
            format!("{last}; gave up after {} attempts", self.opts.retries + 1),
            format!(
                "check that the registry at {} is up and reachable, or raise --retries / --timeout",
                self.reference.registry
            ),
        )
    }

    /// Read a streaming body into `out`, returning how many bytes were copied; a failure
    /// mid-body is transient (the caller resumes).
    pub fn copy_body(
        body: ureq::Body,
        mut out: impl FnMut(&[u8]) -> Result<()>,
    ) -> std::result::Result<u64, Fail> {
        let mut r = body.into_reader();
        let mut buf = vec![0u8; 256 << 10];
        let mut total = 0u64;
        loop {
            let n = match r.read(&mut buf) {
                Ok(0) => return Ok(total),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Fail::Transient(format!("body cut after {total} bytes: {e}"))),
            };
            out(&buf[..n]).map_err(Fail::Fatal)?;
            total += n as u64;
        }
    }
}

/// The pause before attempt `n` (n >= 1): 100 ms, 200 ms, 400 ms, ... up to 3 s.
pub fn backoff(n: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1u32 << (n - 1).min(16))
        .min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let ms: Vec<u128> = (1..=7).map(|n| backoff(n).as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1600, 3000, 3000]);
    }
}
