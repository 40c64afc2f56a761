//! `verlay image push`: an image the store holds, to a registry.
//!
//! For each blob (layers, then config): HEAD says whether the registry has it (then it is
//! skipped); otherwise one upload session sends it in chunks: POST starts the session, each
//! PATCH carries `Content-Range: START-END` and the registry's `Range: 0-END` reply says how
//! much it holds, and PUT `?digest=` closes it; the registry's `Docker-Content-Digest` must be
//! the blob's. The manifest is PUT by tag last, so the tag never names an image whose blobs
//! are not all there.
//!
//! Retries never append the same bytes twice. After a chunk fails (timeout, dropped
//! connection, 5xx) the client does not resend blindly: it asks the registry where the
//! upload stands (GET on the upload URL, `Range` header) and continues from that offset. If
//! the registry no longer knows the session (distribution 2.x cancels a session whose stored
//! size differs from the offset in its upload state, which is what a chunk cut halfway
//! leaves), a new session starts from byte 0; the old one is abandoned, never written to
//! again. The bytes of a session are hashed in order as they are confirmed, so a damaged
//! store blob is caught before the digest is claimed.
//!
//! After each confirmed chunk the session (upload URL, offset) is saved in
//! `STORE/uploads/<hex>.json`; a push killed halfway is continued by the next one in the same
//! session, from the offset the registry reports for it (the saved offset is only a hint).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use sha2::{Digest, Sha256};
use ureq::http::Method;

use super::client::{backoff, Client, Fail, Options};
use super::reference::Reference;
use crate::error::{Error, Result};
use crate::oci::{self as manifest, Descriptor};
use crate::store::blobs::{self, ImageRecord};

/// What a push did, for the summary line and the tests.
#[derive(Debug, Default)]
pub struct Pushed {
    /// blobs uploaded
    pub blobs_uploaded: usize,
    /// blobs the registry already had
    pub blobs_present: usize,
    /// PATCH body bytes sent (attempts included)
    pub bytes_sent: u64,
    /// upload sessions started
    pub sessions: usize,
    /// the manifest digest the registry reported
    pub manifest: String,
}

/// Push the image recorded under `source` to `target`.
pub fn push(
    store: &crate::store::Store,
    source: &str,
    target: &Reference,
    opts: &Options,
    progress: &crate::progress::Progress,
) -> Result<Pushed> {
    let rec: ImageRecord = blobs::find_record(store, source)?;
    let bytes = blobs::read_blob(store, &rec.manifest)?;
    let m = manifest::parse(&bytes, &format!("manifest {} of {}", rec.manifest, rec.name))?;
    if let Some(d) = &target.digest {
        if *d != rec.manifest {
            return Err(Error::usage(
                format!("image reference \"{target}\""),
                format!("pins {d} but the image's manifest is {}", rec.manifest),
                "push by tag, or pin the image's own manifest digest",
            ));
        }
    }
    let all: Vec<&Descriptor> = m.layers.iter().chain(std::iter::once(&m.config)).collect();
    fetch_lazy_blobs(store, &rec, &m.layers, opts, progress)?;
    for d in &all {
        if !blobs::has_blob(store, &d.digest) {
            return Err(Error::usage(
                format!("image \"{}\"", rec.name),
                format!("blob {} is not in the store", d.digest),
                "pull or import the image again",
            ));
        }
    }
    let client = Client::new(target, opts)?;
    let mut out = Pushed::default();
    progress.layers(all.len() as u64);
    for d in all {
        push_blob(store, &client, d, &mut out, progress)?;
        progress.layer_done();
    }

    let tag = target.manifest_ref().to_string();
    let url = client.url(&format!("manifests/{tag}"));
    let what = format!("manifest {} as {tag}", rec.manifest);
    out.manifest = client.with_retries(&what, || {
        let reply = client.request(Method::PUT, &url, &[("Content-Type", &rec.media_type)], &bytes)?;
        if reply.status != 201 {
            return Err(Fail::Fatal(Error::remote(
                format!("{what} to {}", client.reference),
                reply.error_text(),
                "check the registry's log; the blobs are there, pushing again is safe",
            )));
        }
        let got = reply.header("Docker-Content-Digest").unwrap_or("").to_string();
        if got != rec.manifest {
            return Err(Fail::Fatal(Error::remote(
                format!("{what} to {}", client.reference),
                format!("the registry stored it as \"{got}\""),
                "the registry altered the manifest; check it",
            )));
        }
        Ok(got)
    })?;
    Ok(out)
}

/// The layer blobs of a lazily pulled image that the store lacks (a lazy layer not sealed
/// yet keeps only its TOC and the chunks read): fetched whole from the registry the lazy
/// layer records, each checked against the manifest's digest before the store keeps it (the
/// ordinary pull's `pull.blob` step), so push sends only verified bytes.
fn fetch_lazy_blobs(
    store: &crate::store::Store,
    rec: &ImageRecord,
    layers: &[Descriptor],
    opts: &Options,
    progress: &crate::progress::Progress,
) -> Result<()> {
    for d in layers.iter().filter(|d| !blobs::has_blob(store, &d.digest)) {
        let lazy = rec
            .chain_ids
            .iter()
            .filter_map(|c| store.record(c).ok())
            .map(|r| r["lazy"].clone())
            .find(|l| l["blob_digest"].as_str() == Some(d.digest.as_str()));
        let Some(l) = lazy else { continue };
        let Some(source) = l["reference"].as_str() else {
            continue;
        };
        let source = Reference::parse(source)?;
        let src_opts = Options {
            plain_http: l["plain_http"].as_bool().unwrap_or(false),
            tls_verify: l["tls_verify"].as_bool(),
            authfile: opts.authfile.clone(),
            ..Options::default()
        };
        let client = Client::new(&source, &src_opts)?;
        tracing::info!(digest = %d.digest, from = %source, "fetching the blob of a lazy layer before the push");
        let mut pulled = super::pull::Pulled::default();
        super::pull::fetch_blob(store, &client, d, &mut pulled, progress)?;
    }
    Ok(())
}

/// HEAD the blob: does the registry have it?
fn registry_has(client: &Client, d: &Descriptor) -> Result<bool> {
    let url = client.url(&format!("blobs/{}", d.digest));
    client.with_retries(&format!("check of blob {}", d.digest), || {
        let reply = client.request(Method::HEAD, &url, &[], &[])?;
        match reply.status {
            200 => Ok(true),
            404 => Ok(false),
            _ => Err(Fail::Fatal(Error::remote(
                format!("blob {} of {}", d.digest, client.reference),
                reply.error_text(),
                "check the registry",
            ))),
        }
    })
}

/// Where an upload session stands.
enum Status {
    /// the registry holds this many bytes; continue at the new location
    At(u64, String),
    /// the registry no longer knows the session
    Gone,
}

/// The offset in a `Range: 0-END` header. distribution answers `0-0` both for an empty
/// session and for one byte; `hint` (what we believe) decides between the two.
fn range_end(h: Option<&str>, hint: u64) -> Option<u64> {
    let end: u64 = h?.trim().strip_prefix("0-")?.parse().ok()?;
    Some(if end == 0 && hint == 0 { 0 } else { end + 1 })
}

/// GET the upload URL: the registry's offset for the session.
fn status(client: &Client, loc: &str, hint: u64, what: &str) -> Result<Status> {
    client.with_retries(&format!("status of the upload of {what}"), || {
        let reply = client.request(Method::GET, loc, &[], &[])?;
        match reply.status {
            204 | 200 => {
                let at = range_end(reply.header("Range"), hint);
                let next = reply.header("Location").map(|l| client.resolve(l)).transpose()?;
                match (at, next) {
                    (Some(at), Some(next)) => Ok(Status::At(at, next)),
                    (Some(at), None) => Ok(Status::At(at, loc.to_string())),
                    (None, _) => Ok(Status::Gone),
                }
            }
            400 | 404 => Ok(Status::Gone),
            _ => Err(Fail::Fatal(Error::remote(
                format!("upload of {what} to {}", client.reference),
                reply.error_text(),
                "check the registry",
            ))),
        }
    })
}

/// `loc` with a query parameter added.
fn with_param(loc: &str, kv: &str) -> String {
    let sep = if loc.contains('?') { '&' } else { '?' };
    format!("{loc}{sep}{kv}")
}

/// sha256 of the first `n` bytes of `f`.
fn hash_prefix(f: &mut File, p: &std::path::Path, n: u64) -> Result<Sha256> {
    let mut h = Sha256::new();
    f.seek(SeekFrom::Start(0))
        .map_err(|e| Error::io("push.rehash", p, e))?;
    let mut r = Read::take(&mut *f, n);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let k = r.read(&mut buf).map_err(|e| Error::io("push.rehash", p, e))?;
        if k == 0 {
            return Ok(h);
        }
        h.update(&buf[..k]);
    }
}

fn read_at(f: &mut File, p: &std::path::Path, off: u64, buf: &mut [u8]) -> Result<()> {
    f.seek(SeekFrom::Start(off))
        .map_err(|e| Error::io("push.read", p, e))?;
    f.read_exact(buf).map_err(|e| Error::io("push.read", p, e))
}

/// Upload one blob unless the registry has it: sessions (at most `retries + 1`), each opened
/// ([`Upload::begin`]), fed chunk by chunk ([`Upload::send`]), checked against the digest and
/// closed ([`Upload::close`]); a step that finds the session lost starts the next one.
fn push_blob(
    store: &crate::store::Store,
    client: &Client,
    d: &Descriptor,
    out: &mut Pushed,
    progress: &crate::progress::Progress,
) -> Result<()> {
    if registry_has(client, d)? {
        tracing::info!(digest = %d.digest, "registry has the blob; skipped");
        out.blobs_present += 1;
        return Ok(());
    }
    let mut up = Upload::open(store, client, d, progress)?;
    let retries = client.opts.retries;
    let mut sessions = 0u32;
    let mut saved = blobs::load_upload(store, &d.digest).filter(|s| s.target == up.target);
    loop {
        if sessions > retries {
            return Err(client.gave_up(&format!("upload of {}", up.what), &up.last));
        }
        if sessions > 0 {
            blobs::forget_upload(store, &d.digest);
            tracing::warn!(digest = %d.digest, session = sessions + 1, error = %up.last, "starting the upload again in a new session");
            std::thread::sleep(backoff(sessions));
        }
        sessions += 1;
        out.sessions += 1;
        let (loc, offset, hashed) = up.begin(saved.take())?;
        let Some((loc, hashed)) = up.send(loc, offset, hashed, out)? else {
            continue;
        };
        up.check(hashed)?;
        if up.close(loc, out)? {
            return Ok(());
        }
    }
}

/// One blob being uploaded: the store file, what the sessions share, and why the last attempt
/// failed (for the next warning and the final error).
struct Upload<'a> {
    store: &'a crate::store::Store,
    client: &'a Client,
    d: &'a Descriptor,
    /// `blob <digest>`, for messages
    what: String,
    /// `registry/repository`, the key of a saved session
    target: String,
    f: File,
    p: std::path::PathBuf,
    size: u64,
    chunk_size: u64,
    buf: Vec<u8>,
    bar: crate::progress::Bar,
    last: String,
}

impl<'a> Upload<'a> {
    /// Open the store blob and check its size against the descriptor.
    fn open(
        store: &'a crate::store::Store,
        client: &'a Client,
        d: &'a Descriptor,
        progress: &crate::progress::Progress,
    ) -> Result<Self> {
        let p = blobs::blob_path(store, &d.digest);
        let f = File::open(&p).map_err(|e| Error::io("push.open", &p, e))?;
        let size = f.metadata().map_err(|e| Error::io("push.stat", &p, e))?.len();
        if size != d.size {
            return Err(Error::usage(
                format!("store blob {}", p.display()),
                format!("{size} bytes, the manifest says {}", d.size),
                "remove it and pull or import the image again",
            ));
        }
        let hex = d.digest.strip_prefix("sha256:").unwrap_or(&d.digest);
        let bar = progress.bytes(format!("blob {}", hex.get(..12).unwrap_or(hex)), Some(size));
        let chunk_size = client.opts.chunk_size.max(1) as u64;
        Ok(Upload {
            store,
            client,
            d,
            what: format!("blob {}", d.digest),
            target: format!("{}/{}", client.reference.registry, client.reference.repository),
            f,
            p,
            size,
            chunk_size,
            buf: vec![0u8; chunk_size.min(size.max(1)) as usize],
            bar,
            last: String::new(),
        })
    }

    /// Open a session: the one a killed push left (continued where the registry says it
    /// stands; the saved offset is only a hint), else a new one. Returns its location, the
    /// offset the registry confirmed and the hash of the bytes before it.
    fn begin(&mut self, saved: Option<blobs::SavedUpload>) -> Result<(String, u64, Sha256)> {
        let (client, d, what) = (self.client, self.d, &self.what);
        if let Some(s) = saved {
            match status(client, &s.location, s.offset, what)? {
                Status::At(at, next) if at <= self.size => {
                    tracing::info!(digest = %d.digest, bytes = at, "continuing the upload session of an earlier push");
                    return Ok((next, at, hash_prefix(&mut self.f, &self.p, at)?));
                }
                _ => blobs::forget_upload(self.store, &d.digest),
            }
        }
        let start_url = client.url("blobs/uploads/");
        let loc = client.with_retries(&format!("start of the upload of {what}"), || {
            let reply = client.request(Method::POST, &start_url, &[], &[])?;
            match (reply.status, reply.header("Location")) {
                (202, Some(l)) => client.resolve(l),
                _ => Err(Fail::Fatal(Error::remote(
                    format!("upload of {what} to {}", client.reference),
                    reply.error_text(),
                    "check the registry (is it read-only?)",
                ))),
            }
        })?;
        Ok((loc, 0, Sha256::new()))
    }

    /// PATCH the chunks from `offset` to the end. After a failed chunk the registry is asked
    /// where the session stands and the upload continues from there. `None`: the session is
    /// lost (`self.last` says why); start another.
    fn send(
        &mut self,
        mut loc: String,
        mut offset: u64,
        mut hashed: Sha256,
        out: &mut Pushed,
    ) -> Result<Option<(String, Sha256)>> {
        let (client, d) = (self.client, self.d);
        let mut failures = 0u32;
        while offset < self.size {
            let len = self.chunk_size.min(self.size - offset);
            let chunk = &mut self.buf[..len as usize];
            read_at(&mut self.f, &self.p, offset, chunk)?;
            let range = format!("{}-{}", offset, offset + len - 1);
            out.bytes_sent += len;
            self.bar.inc(len);
            let why = match patch(client, &self.what, &loc, &range, chunk, offset + len)? {
                Ok(next) => {
                    hashed.update(&*chunk);
                    offset += len;
                    loc = next;
                    failures = 0;
                    let keep = blobs::SavedUpload {
                        target: self.target.clone(),
                        location: loc.clone(),
                        offset,
                    };
                    if let Err(e) = blobs::save_upload(self.store, &d.digest, &keep) {
                        tracing::warn!(digest = %d.digest, error = %e, "could not save the upload session");
                    }
                    continue;
                }
                Err(why) => why,
            };
            failures += 1;
            self.last = format!("PATCH {range}: {why}");
            tracing::warn!(digest = %d.digest, range = %range, attempt = failures, error = %why, "upload chunk failed; asking the registry where the upload stands");
            if failures > client.opts.retries {
                return Err(client.gave_up(&format!("upload of {}", self.what), &self.last));
            }
            std::thread::sleep(backoff(failures));
            match status(client, &loc, offset, &self.what)? {
                Status::At(at, next) if at == offset => loc = next,
                Status::At(at, next) if at > offset && at <= offset + len => {
                    // the registry kept a prefix of the chunk: continue after it
                    hashed.update(&chunk[..(at - offset) as usize]);
                    offset = at;
                    loc = next;
                }
                Status::At(at, _) => {
                    self.last = format!(
                        "{}; the registry holds {at} bytes of a session at {offset}",
                        self.last
                    );
                    return Ok(None);
                }
                Status::Gone => {
                    self.last = format!("{}; the registry dropped the upload session", self.last);
                    return Ok(None);
                }
            }
        }
        Ok(Some((loc, hashed)))
    }

    /// The bytes sent must hash to the digest: a damaged store blob is caught before the
    /// digest is claimed.
    fn check(&self, hashed: Sha256) -> Result<()> {
        let sent = format!("sha256:{:x}", hashed.finalize());
        if sent != self.d.digest {
            return Err(Error::usage(
                format!("store blob {}", self.p.display()),
                format!("damaged: it hashes to {sent}"),
                "remove it and pull or import the image again; nothing was pushed for it",
            ));
        }
        Ok(())
    }

    /// Close the session (PUT `?digest=`); an unknown outcome is settled by asking whether the
    /// blob exists. `false`: the session is lost (`self.last` says why); start another.
    fn close(&mut self, loc: String, out: &mut Pushed) -> Result<bool> {
        let (client, d, what) = (self.client, self.d, &self.what);
        let mut put = with_param(&loc, &format!("digest={}", d.digest));
        let mut put_failures = 0u32;
        loop {
            let why = match client.request(Method::PUT, &put, &[], &[]) {
                Ok(reply) if reply.status == 201 => {
                    let got = reply.header("Docker-Content-Digest").unwrap_or("");
                    if got != d.digest {
                        return Err(Error::remote(
                            format!("upload of {what} to {}", client.reference),
                            format!("the registry stored it as \"{got}\""),
                            "the registry altered the data; check it",
                        ));
                    }
                    blobs::forget_upload(self.store, &d.digest);
                    out.blobs_uploaded += 1;
                    return Ok(true);
                }
                Ok(reply) if matches!(reply.status, 400 | 404) => reply.error_text(),
                Ok(reply) => {
                    return Err(Error::remote(
                        format!("upload of {what} to {}", client.reference),
                        reply.error_text(),
                        "check the registry",
                    ))
                }
                Err(Fail::Fatal(e)) => return Err(e),
                Err(Fail::Transient(why)) => why,
            };
            put_failures += 1;
            self.last = format!("PUT ?digest=: {why}");
            if put_failures > client.opts.retries {
                return Err(client.gave_up(&format!("upload of {what}"), &self.last));
            }
            std::thread::sleep(backoff(put_failures));
            if registry_has(client, d)? {
                blobs::forget_upload(self.store, &d.digest);
                out.blobs_uploaded += 1;
                return Ok(true);
            }
            match status(client, &loc, self.size, what)? {
                Status::At(at, next) if at == self.size => {
                    put = with_param(&next, &format!("digest={}", d.digest))
                }
                _ => return Ok(false),
            }
        }
    }
}

/// One PATCH: `Ok(Ok(next location))` when the registry confirms it holds `end` bytes,
/// `Ok(Err(why))` for a failure worth asking the registry about, `Err` for a fatal one.
fn patch(
    client: &Client,
    what: &str,
    loc: &str,
    range: &str,
    chunk: &[u8],
    end: u64,
) -> Result<std::result::Result<String, String>> {
    let sent = client.request(
        Method::PATCH,
        loc,
        &[
            ("Content-Type", "application/octet-stream"),
            ("Content-Range", range),
        ],
        chunk,
    );
    Ok(Err(match sent {
        Ok(reply) if reply.status == 202 => {
            let next = reply.header("Location").map(|l| client.resolve(l)).transpose();
            match (range_end(reply.header("Range"), end), next) {
                (Some(at), Ok(Some(next))) if at == end => return Ok(Ok(next)),
                (at, _) => format!("PATCH {range} answered with Range {at:?}"),
            }
        }
        Ok(reply) if matches!(reply.status, 400 | 404 | 416) => reply.error_text(),
        Ok(reply) => {
            // 413: the registry (or a proxy in front of it) limits request bodies
            let fix = if reply.status == 413 {
                "lower --chunk-size"
            } else {
                "check the registry"
            };
            return Err(Error::remote(
                format!("upload of {what} to {}", client.reference),
                reply.error_text(),
                fix,
            ));
        }
        Err(Fail::Fatal(e)) => return Err(e),
        Err(Fail::Transient(why)) => why,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_ranges_read_like_distribution() {
        assert_eq!(range_end(Some("0-0"), 0), Some(0));
        assert_eq!(range_end(Some("0-0"), 1), Some(1));
        assert_eq!(range_end(Some("0-1023"), 0), Some(1024));
        assert_eq!(range_end(Some("bytes=0-9"), 0), None);
        assert_eq!(range_end(None, 0), None);
        assert_eq!(
            with_param("http://h/u?_state=x", "digest=d"),
            "http://h/u?_state=x&digest=d"
        );
        assert_eq!(with_param("/u", "digest=d"), "/u?digest=d");
    }
}
