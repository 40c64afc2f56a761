//! The HTTP side of the OCI distribution API: one blocking client per registry repository,
//! bounded retries with exponential backoff, authentication, and errors in the
//! `what: why (fix)` form.
//!
//! Owns: talking HTTP(S) (ureq with rustls; the scheme and the trusted roots come from
//! [`super::tls`]), answering a 401 (a token from the registry's token server, or basic
//! credentials, see [`super::auth`] and [`super::credentials`]), classifying a failure as
//! transient (timeout, refused or dropped connection, 5xx, 429) or final (any other 4xx, a
//! name that does not resolve, a certificate not trusted), and turning the last failure
//! into an [`Error::Remote`] that says what failed.
//!
//! Must not: retry a request whose effect is not idempotent. Callers that append data (blob
//! upload chunks) handle their own retries and ask the registry where it stands first
//! (see `push`). Connections are not pooled: every request has its own, so a connection
//! that failed is never reused and a retry always starts on a fresh one. The registry's
//! `Authorization` goes only to the registry's own origin ([`auth::may_send_authorization`]).

use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use ureq::http::{self, HeaderMap, Method, Response};

use super::auth::{self, Challenge};
use super::credentials::{self, Credentials};
use super::reference::{is_loopback_host, Reference};
use super::tls::{self, Transport};
use crate::error::{Error, Result};

pub use crate::oci::MAX_DOC;
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
    /// `--tls-verify[=BOOL]`: `Some(false)` accepts any certificate; `Some(true)` speaks HTTPS
    /// to a loopback registry too; `None` is the default rule (see [`Transport::choose`])
    pub tls_verify: Option<bool>,
    /// `--authfile`: the one auth file to read credentials from
    pub authfile: Option<PathBuf>,
    /// `--creds USER[:PASSWORD]`: credentials that win over any auth file
    pub creds: Option<String>,
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
            tls_verify: None,
            authfile: None,
            creds: None,
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

/// The `Authorization` the client sends to its registry.
#[derive(Debug, Clone)]
enum Authz {
    /// `Basic ...`, from the user's credentials
    Basic(String),
    /// `Bearer TOKEN`, from the token server, and until when it is good
    Bearer(String, Instant),
}

impl Authz {
    fn header(&self) -> &str {
        match self {
            Authz::Basic(h) | Authz::Bearer(h, _) => h,
        }
    }
}

/// A client for one repository of one registry.
pub struct Client {
    agent: ureq::Agent,
    /// `https://host[:port]` or `http://host[:port]`
    base: String,
    /// what the client sends as `Authorization`, once a 401 asked for it
    authz: Mutex<Option<Authz>>,
    /// the user's credentials, looked up at the first 401 (`Some(None)`: anonymous)
    creds: Mutex<Option<Option<Credentials>>>,
    /// a request carrying `Authorization` has succeeded (a later 401 is then a refusal of
    /// that object, not a failed login)
    authorized_once: AtomicBool,
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
        let host = reference.api_host();
        let transport = Transport::choose(host, reference.is_loopback(), opts.plain_http, opts.tls_verify)?;
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .proxy(None)
            .max_idle_connections(0)
            .max_idle_connections_per_host(0)
            .timeout_connect(Some(opts.timeout))
            .timeout_per_read(Some(opts.timeout))
            .timeout_per_write(Some(opts.timeout))
            .user_agent(concat!("verlay/", env!("CARGO_PKG_VERSION")));
        if let Some(tls) = transport.tls_config(host)? {
            config = config.tls_config(tls);
        }
        tracing::debug!(registry = %reference.registry, scheme = transport.scheme, ca_files = transport.ca_files.len(), "registry transport");
        let creds = match &opts.creds {
            None => None,
            Some(c) => {
                let (user, password) = c.split_once(':').unwrap_or((c, ""));
                Some(Some(Credentials {
                    user: user.to_string(),
                    password: password.to_string(),
                    source: "--creds".into(),
                }))
            }
        };
        Ok(Client {
            agent: config.build().into(),
            base: format!("{}://{host}", transport.scheme),
            authz: Mutex::new(None),
            creds: Mutex::new(creds),
            authorized_once: AtomicBool::new(false),
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

    /// Resolve a `Location` header of a reply from `origin` (`scheme://host:port`).
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

    /// The `Authorization` value for a request to `url`: the registry's, if `url` is on the
    /// registry's origin and the client has one; never for another host (blob storage a
    /// redirect points to). Redirect following asks the same question of each hop through
    /// [`auth::may_send_authorization`].
    pub fn authorization_for(&self, url: &str) -> Option<String> {
        if !auth::may_send_authorization(&self.base, url) {
            return None;
        }
        match self.authz.lock().as_ref() {
            // an expired token is not sent: the 401 that follows fetches a new one
            Some(Authz::Bearer(_, until)) if Instant::now() >= *until => None,
            a => a.map(|a| a.header().to_string()),
        }
    }

    /// `scheme://host[:port]` of the registry.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn what(&self) -> String {
        format!("registry {}", self.reference.registry)
    }

    fn login_fix(&self) -> String {
        format!(
            "log in with `podman login {}` (verlay reads its auth.json and docker's config.json), or pass --creds USER:PASSWORD",
            self.reference.registry
        )
    }

    /// One request on the wire, with `authorization` if given.
    fn send(
        &self,
        method: &Method,
        url: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        authorization: Option<&str>,
    ) -> std::result::Result<Reply, Fail> {
        let mut b = http::Request::builder().method(method.clone()).uri(url);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        if let Some(a) = authorization {
            b = b.header("Authorization", a);
        }
        let req = b.body(body).map_err(|e| {
            Fail::Fatal(Error::remote(
                format!("{method} {url}"),
                e.to_string(),
                "report this bug",
            ))
        })?;
        tracing::debug!(op = %method, url, bytes = body.len(), auth = authorization.is_some(), "registry request");
        let resp: Response<ureq::Body> = self.agent.run(req).map_err(|e| self.transport(&e, url))?;
        let (parts, body) = resp.into_parts();
        let reply = Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        };
        tracing::debug!(op = %method, url, status = reply.status, "registry reply");
        Ok(reply)
    }

    /// [`transport`], with TLS failures explained for this registry (final: a certificate
    /// does not become trusted by trying again).
    fn transport(&self, e: &ureq::Error, url: &str) -> Fail {
        let host = auth::origin(url).map(|(_, h, _)| h).unwrap_or_default();
        let host = if auth::may_send_authorization(&self.base, url) {
            self.reference.api_host().to_string()
        } else {
            host
        };
        match tls::explain(e, &host) {
            Some((why, fix)) => Fail::Fatal(Error::remote(format!("registry {host} ({url})"), why, fix)),
            None => transport(e),
        }
    }

    /// May a request go to `url`? The rule [`Client::new`] applies to the registry holds
    /// for every URL it sends us to, upload locations and redirects alike, and is checked
    /// before any connection is made: HTTPS anywhere (verified as the registry is), plain
    /// HTTP only to this machine or with `--plain-http`. Returns the URL's origin
    /// (`scheme://host:port`), against which its redirects resolve.
    fn check_host(&self, url: &str) -> std::result::Result<String, Fail> {
        let uri: http::Uri = url.parse().map_err(|e| {
            Fail::Fatal(Error::remote(
                self.what(),
                format!("sends us to \"{url}\", which is not a URL ({e})"),
                "the registry does not follow the distribution API",
            ))
        })?;
        let (Some(host), Some(authority), Some(scheme)) = (uri.host(), uri.authority(), uri.scheme_str())
        else {
            return Err(Fail::Fatal(Error::remote(
                self.what(),
                format!("sends us to \"{url}\", which names no scheme or host"),
                "the registry does not follow the distribution API",
            )));
        };
        match scheme {
            "https" => {}
            "http" if self.opts.plain_http || is_loopback_host(host) => {}
            "http" => {
                return Err(Fail::Fatal(Error::usage(
                    self.what(),
                    format!(
                        "sends us to {url}, which is not on this machine; plain HTTP goes to other hosts only with --plain-http"
                    ),
                    "pass --plain-http if that host is meant to be reached without TLS",
                )))
            }
            other => {
                return Err(Fail::Fatal(Error::remote(
                    self.what(),
                    format!("sends us to {url}, a scheme ({other}) verlay does not speak"),
                    "the registry does not follow the distribution API",
                )))
            }
        }
        Ok(format!("{scheme}://{authority}"))
    }

    /// Send one request, following at most [`MAX_REDIRECTS`] redirects of a GET or HEAD,
    /// each to a URL that passes [`Client::check_host`]; the registry's Authorization goes
    /// only to its own origin ([`Client::authorization_for`]), never to the storage a blob
    /// redirects to. Status codes are returned as [`Client::request_authed`] returns them.
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
            let reply = self.request_authed(&method, &url, headers, body)?;
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

    /// Send one request (no redirect followed), answering a 401 (a token for the
    /// challenge, or the user's basic credentials) and sending it again; a token the
    /// registry refuses is replaced once. Status codes are returned, not turned into
    /// errors, except 401/403 after that (final, with what to do) and 5xx/429 (transient).
    fn request_authed(
        &self,
        method: &Method,
        url: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::result::Result<Reply, Fail> {
        let mut answered = false;
        let mut refreshed = false;
        loop {
            let sent = self.authorization_for(url);
            let reply = self.send(method, url, headers, body, sent.as_deref())?;
            match reply.status {
                401 => {
                    let challenge = reply.header("WWW-Authenticate").unwrap_or("").to_string();
                    let text = reply.error_text();
                    let refused =
                        |why: String, fix: String| Fail::Fatal(Error::remote(self.what(), why, fix));
                    let on_registry = auth::may_send_authorization(&self.base, url);
                    if !on_registry {
                        return Err(refused(
                            format!("{method} {url} (outside the registry) refused: {text}"),
                            "the registry redirected to storage that wants its own credentials; report it to the registry's operator".into(),
                        ));
                    }
                    // One answer per request, plus one token refresh when the registry refuses a
                    // token it was sent (expired since it was fetched); then the request fails.
                    let sent_bearer = sent.as_deref().is_some_and(|h| h.starts_with("Bearer "));
                    if sent_bearer && !refreshed {
                        refreshed = true;
                    } else if answered || sent_bearer {
                        return Err(self.still_refused(method, url, &text, sent.as_deref()));
                    }
                    self.answer(method, url, &challenge, &text, sent.as_deref())?;
                    answered = true;
                }
                403 => {
                    let text = reply.error_text();
                    return Err(Fail::Fatal(Error::remote(
                        self.what(),
                        format!("{method} {url} denied: {text}"),
                        format!(
                            "the account has no {} access to {}; check its permissions, or {}",
                            if matches!(*method, Method::GET | Method::HEAD) {
                                "pull"
                            } else {
                                "push"
                            },
                            self.reference.repository,
                            self.login_fix()
                        ),
                    )));
                }
                408 | 429 | 500..=599 => {
                    return Err(Fail::Transient(format!("{method} {url}: {}", reply.error_text())))
                }
                // Go's TLS server answers plain HTTP with a bare 400 and this sentence
                400 if self.base.starts_with("http://") && reply.header("Content-Type").is_none() => {
                    return Err(self.plain_http_400(method, url, reply));
                }
                s => {
                    if sent.is_some() && s < 400 {
                        self.authorized_once.store(true, Ordering::Relaxed);
                    }
                    return Ok(reply);
                }
            }
        }
    }

    /// Answer the 401 challenge `challenge` (refused with `text`; `sent`: the Authorization
    /// that was sent) by storing what to send next: the user's basic credentials, or a token
    /// for the challenge's scope.
    fn answer(
        &self,
        method: &Method,
        url: &str,
        challenge: &str,
        text: &str,
        sent: Option<&str>,
    ) -> std::result::Result<(), Fail> {
        let refused = |why: String, fix: String| Fail::Fatal(Error::remote(self.what(), why, fix));
        match auth::parse_challenge(challenge) {
            Some(Challenge::Basic) => {
                if matches!(sent, Some(h) if h.starts_with("Basic ")) {
                    return Err(self.still_refused(method, url, text, sent));
                }
                let Some(c) = self.credentials()? else {
                    return Err(refused(
                    format!("{method} refused: {text}; the registry wants a user name and password and none is stored for it"),
                    self.login_fix(),
                ));
                };
                *self.authz.lock() = Some(Authz::Basic(auth::basic(&c)));
            }
            Some(Challenge::Bearer {
                realm,
                service,
                scope,
            }) => {
                let write = !matches!(*method, Method::GET | Method::HEAD);
                let scope = scope.unwrap_or_else(|| auth::scope_for(&self.reference.repository, write));
                let token = self.fetch_token(&realm, service.as_deref(), &scope, text, challenge)?;
                *self.authz.lock() = Some(token);
            }
            None => {
                return Err(refused(
                    format!(
                        "{method} refused: {text}{}",
                        if challenge.is_empty() {
                            " (and no WWW-Authenticate challenge)".to_string()
                        } else {
                            format!(" (asks for {challenge}, which verlay does not speak)")
                        }
                    ),
                    "use a registry that speaks basic or token (Bearer) authentication".into(),
                ))
            }
        }
        Ok(())
    }

    /// The error for a bare 400 from a plain-HTTP registry: Go's TLS server answers plain
    /// HTTP so, with "HTTP request to an HTTPS server".
    fn plain_http_400(&self, method: &Method, url: &str, reply: Reply) -> Fail {
        let text = String::from_utf8_lossy(&reply.bytes().unwrap_or_default()).into_owned();
        let (why, fix) = if text.contains("HTTP request to an HTTPS server") {
            (
                "it speaks HTTPS, and verlay spoke plain HTTP to it".to_string(),
                format!(
                    "put its CA in /etc/containers/certs.d/{}/ca.crt, or pass --tls-verify (--tls-verify=false: unchecked)",
                    self.reference.api_host()
                ),
            )
        } else {
            (
                format!("{method} {url}: HTTP 400 {}", text.trim()),
                "check the registry address".into(),
            )
        };
        Fail::Fatal(Error::remote(self.what(), why, fix))
    }

    /// The error for a request refused again right after a fresh token or the credentials.
    fn still_refused(&self, method: &Method, url: &str, text: &str, sent: Option<&str>) -> Fail {
        let object = url.rsplit_once("/v2/").map_or(url, |(_, p)| p);
        let (why, fix) = if self.authorized_once.load(Ordering::Relaxed) {
            (
                format!(
                    "{method} {object} refused ({text}) although earlier requests with the same login were allowed"
                ),
                format!(
                    "the registry does not let this account read or write that object (a blob after a good manifest: \
                     the registry's permissions or token server are inconsistent); check the account's access to {}, or {}",
                    self.reference.repository,
                    self.login_fix()
                ),
            )
        } else {
            match sent {
                Some(h) if h.starts_with("Basic ") => (
                    format!("{method} refused ({text}): wrong user name or password{}", self.creds_source()),
                    self.login_fix(),
                ),
                Some(_) => (
                    format!(
                        "{method} refused ({text}) with a fresh token from the token server{}: the token was refused or expired at once",
                        self.creds_source()
                    ),
                    format!(
                        "check the clocks of this machine and the registry, and the account's access to {}; or {}",
                        self.reference.repository,
                        self.login_fix()
                    ),
                ),
                None => (format!("{method} refused ({text})"), self.login_fix()),
            }
        };
        Fail::Fatal(Error::remote(self.what(), why, fix))
    }

    /// ` (credentials from SOURCE)` or ` (anonymous)`.
    fn creds_source(&self) -> String {
        match self.creds.lock().as_ref() {
            Some(Some(c)) => format!(" (user {} from {})", c.user, c.source),
            _ => " (anonymous)".into(),
        }
    }

    /// The user's credentials for this registry, looked up once.
    fn credentials(&self) -> std::result::Result<Option<Credentials>, Fail> {
        let mut slot = self.creds.lock();
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let found = credentials::lookup(
            &self.reference.registry,
            &self.reference.repository,
            self.opts.authfile.as_deref(),
        )?;
        tracing::debug!(registry = %self.reference.registry, found = found.is_some(), "registry credentials");
        *slot = Some(found.clone());
        Ok(found)
    }

    /// A token from the token server at `realm` for `scope`: anonymous, or with the user's
    /// credentials when there are some (and the realm is HTTPS or on this machine).
    fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
        registry_text: &str,
        challenge: &str,
    ) -> std::result::Result<Authz, Fail> {
        let url = auth::token_url(realm, service, scope);
        let creds = self.credentials()?;
        let basic = match &creds {
            Some(c) if auth::may_send_credentials_to_realm(realm) => Some(auth::basic(c)),
            Some(_) => {
                return Err(Fail::Fatal(Error::remote(
                    self.what(),
                    format!("its token server {realm} is plain HTTP on another machine"),
                    "verlay does not send a password in clear text; ask the registry's operator for an HTTPS token server",
                )))
            }
            None => None,
        };
        let started = Instant::now();
        let reply = self
            .send(&Method::GET, &url, &[], &[], basic.as_deref())
            .map_err(|f| match f {
                Fail::Transient(why) => Fail::Transient(format!(
                    "the registry answered {registry_text} ({challenge}); its token server {realm}: {why}"
                )),
                fatal => fatal,
            })?;
        match reply.status {
            200 => {
                let body = reply.bytes()?;
                let (token, secs) = auth::parse_token(&body).map_err(|why| {
                    Fail::Fatal(Error::remote(
                        format!("token server {realm} (for registry {})", self.reference.registry),
                        why,
                        "the token server does not follow the distribution token spec",
                    ))
                })?;
                tracing::debug!(registry = %self.reference.registry, scope, expires_in = secs, "registry token");
                Ok(Authz::Bearer(
                    format!("Bearer {token}"),
                    started + Duration::from_secs(secs),
                ))
            }
            401 | 403 => {
                let text = reply.error_text();
                let why = match &creds {
                    Some(c) => format!(
                        "its token server {realm} refused user {} ({text}) for {scope}: wrong user name or password, or no access (credentials from {})",
                        c.user, c.source
                    ),
                    None => format!(
                        "its token server {realm} refused anonymous access to {scope} ({text}) and no credentials are stored for {}",
                        self.reference.registry
                    ),
                };
                Err(Fail::Fatal(Error::remote(self.what(), why, self.login_fix())))
            }
            408 | 429 | 500..=599 => Err(Fail::Transient(format!(
                "token server {realm}: {}",
                reply.error_text()
            ))),
            _ => {
                let text = reply.error_text();
                Err(Fail::Fatal(Error::remote(
                    format!("token server {realm} (for registry {})", self.reference.registry),
                    format!("GET {url}: {text}"),
                    "check the registry's token server",
                )))
            }
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

    /// Bytes `[start, end)` of blob `digest`, by an HTTP Range request (with the retries of
    /// [`Client::with_retries`]). The registry must answer 206 with exactly that range; a
    /// 200 (Range ignored) is refused rather than read whole.
    pub fn get_blob_range(&self, digest: &str, start: u64, end: u64) -> Result<Vec<u8>> {
        let url = self.url(&format!("blobs/{digest}"));
        let what = format!("bytes {start}-{end} of blob {digest}");
        let range = format!("bytes={start}-{}", end.saturating_sub(1));
        let want = end.saturating_sub(start);
        self.with_retries(&what, || {
            let reply = self.request(Method::GET, &url, &[("Range", range.as_str())], &[])?;
            match reply.status {
                206 => {}
                s if s >= 500 || s == 429 => return Err(Fail::Transient(reply.error_text())),
                200 => {
                    return Err(Fail::Fatal(Error::remote(
                        what.clone(),
                        "the registry ignores Range requests (HTTP 200 for a range)",
                        "pull without --lazy",
                    )))
                }
                _ => {
                    return Err(Fail::Fatal(Error::remote(
                        what.clone(),
                        reply.error_text(),
                        "check the image in the registry",
                    )))
                }
            }
            let cr = reply.header("Content-Range").unwrap_or("").to_string();
            if !cr.starts_with(&format!("bytes {start}-{}/", end - 1)) {
                return Err(Fail::Transient(format!(
                    "unexpected Content-Range \"{cr}\" for {range}"
                )));
            }
            let mut out = Vec::with_capacity(want as usize);
            Self::copy_body(reply.body, |b| {
                if out.len() + b.len() > want as usize {
                    return Err(Error::remote(
                        what.clone(),
                        "the registry sends more than the range asked",
                        "check the registry",
                    ));
                }
                out.extend_from_slice(b);
                Ok(())
            })?;
            if out.len() as u64 != want {
                return Err(Fail::Transient(format!(
                    "range body ended at {} of {want} bytes",
                    out.len()
                )));
            }
            Ok(out)
        })
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
