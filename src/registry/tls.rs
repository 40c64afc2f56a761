//! Which scheme a registry is spoken to with, and whom its certificate must chain to.
//!
//! Owns: the scheme rule (HTTPS unless asked otherwise, see [`Transport::choose`]), the root
//! certificates (the system's, read by `rustls-native-certs` from `/etc/ssl/certs`,
//! `SSL_CERT_FILE`, `SSL_CERT_DIR`, plus the registry's own CA files from the containers
//! `certs.d` directories) and the words of a TLS failure.
//!
//! Must not: trust a `certs.d` CA for any registry but the one whose directory holds it, or
//! read client certificates (`*.cert` + `*.key`: not supported, left alone).

use std::path::{Path, PathBuf};

use ureq::tls::{Certificate, RootCerts, TlsConfig};

use crate::error::{Error, Result};

/// Overrides the `certs.d` directories (one directory; tests point it at their own CA).
pub const CERTS_DIR_ENV: &str = "VERLAY_CERTS_DIR";
/// The system-wide `certs.d` directories, in the order containers/image reads them.
const SYSTEM_CERTS_DIRS: &[&str] = &["/etc/containers/certs.d", "/etc/docker/certs.d"];
/// A CA file larger than this is refused (a CA bundle is a few hundred KiB at most).
const MAX_CA_FILE: u64 = 1 << 20;
/// At most this many `*.crt` files are read from one registry's directory.
const MAX_CA_FILES: usize = 64;

/// How to reach one registry.
#[derive(Debug, Clone)]
pub struct Transport {
    /// `https` or `http`
    pub scheme: &'static str,
    /// the CA files of this registry that are trusted besides the system roots
    pub ca_files: Vec<PathBuf>,
    /// check the registry's certificate (`--tls-verify`, default true)
    pub verify: bool,
}

impl Transport {
    /// The rule: plain HTTP with `--plain-http`; plain HTTP for a loopback registry
    /// (127.0.0.0/8, localhost, ::1, as docker treats them as insecure) unless `--tls-verify`
    /// was given or a `certs.d` directory holds CA files for it; HTTPS otherwise.
    /// `--tls-verify=false` keeps HTTPS but accepts any certificate.
    pub fn choose(
        host: &str,
        loopback: bool,
        plain_http: bool,
        tls_verify: Option<bool>,
    ) -> Result<Transport> {
        let ca_files = if plain_http { Vec::new() } else { ca_files(host)? };
        let http = plain_http || (loopback && tls_verify.is_none() && ca_files.is_empty());
        Ok(Transport {
            scheme: if http { "http" } else { "https" },
            ca_files,
            verify: tls_verify.unwrap_or(true),
        })
    }

    /// The TLS settings of the agent: system roots plus this registry's CA files, or no
    /// verification at all. `None` for plain HTTP.
    pub fn tls_config(&self, host: &str) -> Result<Option<TlsConfig>> {
        if self.scheme == "http" {
            return Ok(None);
        }
        if !self.verify {
            return Ok(Some(TlsConfig::builder().disable_verification(true).build()));
        }
        let mut roots: Vec<Certificate<'static>> = Vec::new();
        let native = rustls_native_certs::load_native_certs();
        for e in &native.errors {
            tracing::warn!(error = %e, "system CA certificates: a file could not be read");
        }
        roots.extend(
            native
                .certs
                .iter()
                .map(|c| Certificate::from_der(c.as_ref()).to_owned()),
        );
        for f in &self.ca_files {
            let certs = read_pem_certs(f).map_err(|why| {
                Error::usage(
                    format!("CA file {} for registry {host}", f.display()),
                    why,
                    "put the registry's CA certificate there in PEM form, or remove the file",
                )
            })?;
            roots.extend(certs);
        }
        if roots.is_empty() {
            return Err(Error::usage(
                format!("registry {host}"),
                "no CA certificates: the system store (/etc/ssl/certs) is empty and certs.d has none for it",
                "install ca-certificates, or put the registry's CA in /etc/containers/certs.d/HOST/ca.crt",
            ));
        }
        Ok(Some(
            TlsConfig::builder()
                .root_certs(RootCerts::Specific(std::sync::Arc::new(roots)))
                .build(),
        ))
    }
}

/// The `certs.d` directories searched, most specific first: `$VERLAY_CERTS_DIR` alone when
/// set; else `~/.config/containers/certs.d`, `/etc/containers/certs.d`, `/etc/docker/certs.d`.
pub fn certs_dirs() -> Vec<PathBuf> {
    if let Some(d) = std::env::var_os(CERTS_DIR_ENV) {
        return vec![PathBuf::from(d)];
    }
    let mut v = Vec::new();
    if let Some(home) = std::env::var_os("HOME") {
        v.push(Path::new(&home).join(".config/containers/certs.d"));
    }
    v.extend(SYSTEM_CERTS_DIRS.iter().map(PathBuf::from));
    v
}

/// The `*.crt` files of `host` (`HOST[:PORT]`, as in the reference) in the first `certs.d`
/// directory that has a directory for it, sorted by name.
pub fn ca_files(host: &str) -> Result<Vec<PathBuf>> {
    if host.contains('/') || host.starts_with('.') {
        return Ok(Vec::new());
    }
    for dir in certs_dirs() {
        let d = dir.join(host);
        let rd = match std::fs::read_dir(&d) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io("read certs.d", d, e)),
        };
        let mut files: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "crt"))
            .take(MAX_CA_FILES)
            .collect();
        files.sort();
        return Ok(files);
    }
    Ok(Vec::new())
}

/// Every certificate of a PEM file.
fn read_pem_certs(path: &Path) -> std::result::Result<Vec<Certificate<'static>>, String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_CA_FILE + 1).read_to_end(&mut bytes))
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_CA_FILE {
        return Err(format!("larger than {MAX_CA_FILE} bytes"));
    }
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&bytes) {
        match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => certs.push(c),
            Ok(_) => {}
            Err(e) => return Err(format!("not PEM: {e}")),
        }
    }
    if certs.is_empty() {
        return Err("no certificate in it".into());
    }
    Ok(certs)
}

/// The words for a TLS failure talking to `host`, and what to do, if `e` is one.
pub fn explain(e: &ureq::Error, host: &str) -> Option<(String, String)> {
    use rustls::{CertificateError, Error as TlsError};
    // ureq hands rustls' errors over as they are, or wrapped in the io::Error of the stream
    let t: &TlsError = match e {
        ureq::Error::Rustls(t) => t,
        ureq::Error::Io(io) => io.get_ref()?.downcast_ref::<TlsError>()?,
        _ => return None,
    };
    let ca_hint = format!(
        "put the registry's CA in /etc/containers/certs.d/{host}/ca.crt (or ~/.config/containers/certs.d/{host}/), \
         or pass --tls-verify=false"
    );
    Some(match t {
        TlsError::InvalidCertificate(CertificateError::UnknownIssuer)
        | TlsError::InvalidCertificate(CertificateError::BadSignature) => {
            (format!("certificate not trusted ({t})"), ca_hint)
        }
        TlsError::InvalidCertificate(CertificateError::NotValidForName)
        | TlsError::InvalidCertificate(CertificateError::NotValidForNameContext { .. }) => (
            format!("certificate not valid for {host} ({t})"),
            "use the name the certificate was issued for, or pass --tls-verify=false".into(),
        ),
        TlsError::InvalidCertificate(_) => (format!("certificate refused ({t})"), ca_hint),
        TlsError::InvalidMessage(_) => (
            format!("the registry does not speak TLS here ({t})"),
            "pass --plain-http if it is a plain-HTTP registry".into(),
        ),
        other => (
            format!("TLS failed ({other})"),
            "check the registry's TLS setup, or pass --tls-verify=false".into(),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scheme_rule() {
        // (loopback, plain_http, tls_verify) -> scheme, with no certs.d entry for the host
        let cases = [
            ((false, false, None), "https"),
            ((false, true, None), "http"),
            ((false, false, Some(false)), "https"),
            ((true, false, None), "http"),
            ((true, false, Some(true)), "https"),
            ((true, false, Some(false)), "https"),
            ((true, true, Some(true)), "http"),
        ];
        for ((lo, plain, verify), want) in cases {
            let t = Transport::choose("no-such-host.invalid:1", lo, plain, verify).expect("choose");
            assert_eq!(t.scheme, want, "loopback={lo} plain={plain} verify={verify:?}");
        }
    }
}
