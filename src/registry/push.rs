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

/// Upload one blob unless the registry has it.
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
    let p = blobs::blob_path(store, &d.digest);
    let mut f = File::open(&p).map_err(|e| Error::io("push.open", &p, e))?;
    let size = f.metadata().map_err(|e| Error::io("push.stat", &p, e))?.len();
    if size != d.size {
        return Err(Error::usage(
            format!("store blob {}", p.display()),
            format!("{size} bytes, the manifest says {}", d.size),
            "remove it and pull or import the image again",
        ));
    }
    let what = format!("blob {}", d.digest);
    let hex = d.digest.strip_prefix("sha256:").unwrap_or(&d.digest);
    let bar = progress.bytes(format!("blob {}", hex.get(..12).unwrap_or(hex)), Some(size));
    let retries = client.opts.retries;
    let chunk_size = client.opts.chunk_size.max(1) as u64;
    let mut buf = vec![0u8; chunk_size.min(size.max(1)) as usize];
    let start_url = client.url("blobs/uploads/");
    let mut sessions = 0u32;
    let mut last = String::new();
    let target = format!("{}/{}", client.reference.registry, client.reference.repository);
    let mut saved = blobs::load_upload(store, &d.digest).filter(|s| s.target == target);
    'session: loop {
        if sessions > retries {
            return Err(client.gave_up(&format!("upload of {what}"), &last));
        }
        if sessions > 0 {
            blobs::forget_upload(store, &d.digest);
            tracing::warn!(digest = %d.digest, session = sessions + 1, error = %last, "starting the upload again in a new session");
            std::thread::sleep(backoff(sessions));
        }
        sessions += 1;
        out.sessions += 1;
        // A session a killed push left open is continued where the registry says it stands
        // (the saved offset is only a hint); one the registry no longer knows is dropped.
        let resumed = match saved.take() {
            Some(s) => match status(client, &s.location, s.offset, &what)? {
                Status::At(at, next) if at <= size => {
                    tracing::info!(digest = %d.digest, bytes = at, "continuing the upload session of an earlier push");
                    Some((next, at))
                }
                _ => {
                    blobs::forget_upload(store, &d.digest);
                    None
                }
            },
            None => None,
        };
        // bytes the registry has confirmed, in order, and their hash
        let (mut loc, mut offset, mut hashed) = match resumed {
            Some((loc, at)) => (loc, at, hash_prefix(&mut f, &p, at)?),
            None => {
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
                (loc, 0u64, Sha256::new())
            }
        };
        let mut failures = 0u32;
        while offset < size {
            let len = chunk_size.min(size - offset);
            let chunk = &mut buf[..len as usize];
            read_at(&mut f, &p, offset, chunk)?;
            let range = format!("{}-{}", offset, offset + len - 1);
            out.bytes_sent += len;
            bar.inc(len);
            let sent = client.request(
                Method::PATCH,
                &loc,
                &[
                    ("Content-Type", "application/octet-stream"),
                    ("Content-Range", &range),
                ],
                chunk,
            );
            let why = match sent {
                Ok(reply) if reply.status == 202 => {
                    let next = reply.header("Location").map(|l| client.resolve(l)).transpose();
                    match (range_end(reply.header("Range"), offset + len), next) {
                        (Some(at), Ok(Some(next))) if at == offset + len => {
                            hashed.update(&*chunk);
                            offset = at;
                            loc = next;
                            failures = 0;
                            let keep = blobs::SavedUpload {
                                target: target.clone(),
                                location: loc.clone(),
                                offset,
                            };
                            if let Err(e) = blobs::save_upload(store, &d.digest, &keep) {
                                tracing::warn!(digest = %d.digest, error = %e, "could not save the upload session");
                            }
                            continue;
                        }
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
            };
            failures += 1;
            last = format!("PATCH {range}: {why}");
            tracing::warn!(digest = %d.digest, range = %range, attempt = failures, error = %why, "upload chunk failed; asking the registry where the upload stands");
            if failures > retries {
                return Err(client.gave_up(&format!("upload of {what}"), &last));
            }
            std::thread::sleep(backoff(failures));
            match status(client, &loc, offset, &what)? {
                Status::At(at, next) if at == offset => loc = next,
                Status::At(at, next) if at > offset && at <= offset + len => {
                    // the registry kept a prefix of the chunk: continue after it
                    hashed.update(&chunk[..(at - offset) as usize]);
                    offset = at;
                    loc = next;
                }
                Status::At(at, _) => {
                    last = format!("{last}; the registry holds {at} bytes of a session at {offset}");
                    continue 'session;
                }
                Status::Gone => {
                    last = format!("{last}; the registry dropped the upload session");
                    continue 'session;
                }
            }
        }
        let sent = format!("sha256:{:x}", hashed.finalize());
        if sent != d.digest {
            return Err(Error::usage(
                format!("store blob {}", p.display()),
                format!("damaged: it hashes to {sent}"),
                "remove it and pull or import the image again; nothing was pushed for it",
            ));
        }
        // close the session; an unknown outcome is settled by asking whether the blob exists
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
                    blobs::forget_upload(store, &d.digest);
                    out.blobs_uploaded += 1;
                    return Ok(());
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
            last = format!("PUT ?digest=: {why}");
            if put_failures > retries {
                return Err(client.gave_up(&format!("upload of {what}"), &last));
            }
            std::thread::sleep(backoff(put_failures));
            if registry_has(client, d)? {
                blobs::forget_upload(store, &d.digest);
                out.blobs_uploaded += 1;
                return Ok(());
            }
            match status(client, &loc, size, &what)? {
                Status::At(at, next) if at == size => {
                    put = with_param(&next, &format!("digest={}", d.digest))
                }
                _ => continue 'session,
            }
        }
    }
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
