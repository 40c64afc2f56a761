//! `verlay image pull`: manifest, config and layer blobs from a registry into the store.
//!
//! Order (a kill at any instant leaves nothing half-done visible, and the next pull goes on
//! where this one stopped):
//! 1. `pull.manifest`: GET the manifest (an index is resolved to the linux image of this
//!    machine's architecture); its bytes must hash to the digest asked for or announced.
//! 2. `pull.blob`: each blob (config, then layers in order) is streamed into
//!    `blobs/incoming/<hex>`, hashed as it arrives, and published under `blobs/sha256/` only
//!    when the whole matches its digest and size. A blob already published is not fetched
//!    again; a partial one is continued with an HTTP Range request after re-hashing what is
//!    there (and fetched from the start if that does not add up).
//! 3. `pull.import`: each layer not yet in the store goes through
//!    [`Store::import_layer`] with the diffID of the config, on its parent.
//! 4. `pull.record`: the image record (`images/<ref>.json`) is written last.

use crate::progress::Progress;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use sha2::{Digest, Sha256};
use ureq::http::Method;

use super::client::{Client, Fail, Options};
use super::reference::Reference;
use crate::digest::sha256_digest;
use crate::error::{Error, Result};
use crate::oci::{self as manifest, Descriptor};
use crate::store::{blobs, chain_id, ImportOptions, Store};

/// What a pull did, for the summary line.
#[derive(Debug, Default)]
pub struct Pulled {
    /// the record name
    pub name: String,
    /// manifest digest
    pub manifest: String,
    /// chain IDs, base first
    pub chain_ids: Vec<String>,
    /// blobs fetched (some or all of their bytes) by this run
    pub blobs_fetched: usize,
    /// body bytes received by this run
    pub bytes_fetched: u64,
    /// blobs that were already complete in the store
    pub blobs_present: usize,
    /// layers imported by this run
    pub layers_imported: usize,
}

/// Pull `reference` into `store`.
pub fn pull(store: &Store, reference: &Reference, opts: &Options, progress: &Progress) -> Result<Pulled> {
    // step pull.manifest
    let Start {
        client,
        mut out,
        bytes,
        media_type: mt,
        digest,
        what,
        manifest: m,
    } = start(store, reference, opts)?;

    // The config is read whole into memory: a document, capped like one.
    if m.config.size > super::client::MAX_DOC {
        return Err(Error::remote(
            what,
            format!(
                "the config is {} bytes, larger than the {} bytes an image document may have",
                m.config.size,
                super::client::MAX_DOC
            ),
            "the registry serves something that is not an image this verlay understands",
        ));
    }
    // step pull.blob: the config first (it has the diff IDs), then the layers.
    fetch_blob(store, &client, &m.config, &mut out, progress)?;
    let config = blobs::read_blob(store, &m.config.digest)?;
    let diff_ids = manifest::diff_ids(&config, &format!("config {} of {reference}", m.config.digest))?;
    if diff_ids.len() != m.layers.len() {
        return Err(Error::remote(
            what,
            format!(
                "{} layers but the config lists {} diff_ids",
                m.layers.len(),
                diff_ids.len()
            ),
            "the image is damaged in the registry; push it again",
        ));
    }
    let mut parent: Option<String> = None;
    progress.layers(m.layers.len() as u64);
    for (i, (layer, diff_id)) in m.layers.iter().zip(&diff_ids).enumerate() {
        let chain = chain_id(parent.as_deref(), diff_id);
        fetch_blob(store, &client, layer, &mut out, progress)?;
        // step pull.import
        if !store.has_layer(&chain) {
            let p = blobs::blob_path(store, &layer.digest);
            let f = File::open(&p).map_err(|e| Error::io("pull.import", &p, e))?;
            let label = format!("unpack {}/{}", i + 1, m.layers.len());
            let got = store.import_layer(
                &mut progress.reader(f, label, Some(layer.size)),
                &ImportOptions {
                    parent: parent.clone(),
                    diff_id: Some(diff_id.clone()),
                    blob_digest: Some(layer.digest.clone()),
                    source: format!("{reference} layer {} ({})", i + 1, layer.digest),
                    fsync_each: false,
                },
            )?;
            out.layers_imported += usize::from(got.new);
        }
        progress.layer_done();
        tracing::info!(layer = %chain, index = i + 1, digest = %layer.digest, "pulled layer in the store");
        parent = Some(chain.clone());
        out.chain_ids.push(chain);
    }
    // step pull.record
    record_image(store, &mut out, &bytes, mt, digest, &m.config.digest)?;
    Ok(out)
}

/// What a pull (full or lazy) starts from: the client, the summary to fill, and the image's
/// manifest (bytes, media type, digest, parsed; `what` names it in errors).
pub(crate) struct Start {
    pub client: Client,
    pub out: Pulled,
    pub bytes: Vec<u8>,
    pub media_type: String,
    pub digest: String,
    pub what: String,
    pub manifest: manifest::Manifest,
}

/// The first step of a pull (`pull.manifest`): the store's directories, the client, and the
/// image's manifest.
pub(crate) fn start(store: &Store, reference: &Reference, opts: &Options) -> Result<Start> {
    let client = Client::new(reference, opts)?;
    blobs::ensure_dirs(store)?;
    let out = Pulled {
        name: reference.to_string(),
        ..Pulled::default()
    };
    let (bytes, media_type, digest) = resolve_manifest(&client, reference)?;
    let what = format!("manifest {digest} of {reference}");
    let manifest = manifest::parse(&bytes, &what)?;
    Ok(Start {
        client,
        out,
        bytes,
        media_type,
        digest,
        what,
        manifest,
    })
}

/// The image's manifest (of this platform, when `reference` names an index); returns
/// (bytes, media type, digest).
fn resolve_manifest(client: &Client, reference: &Reference) -> Result<(Vec<u8>, String, String)> {
    let (mut bytes, mut mt, mut digest) =
        fetch_manifest(client, reference.manifest_ref(), reference.digest.as_deref())?;
    if manifest::is_index(&mt) {
        let chosen = manifest::pick_platform(&bytes, &format!("index {digest} of {reference}"))?;
        (bytes, mt, digest) = fetch_manifest(client, &chosen.digest, Some(&chosen.digest))?;
        if manifest::is_index(&mt) {
            return Err(Error::remote(
                format!("image {reference}"),
                "an index points to another index",
                "pin the image's manifest digest with NAME@sha256:...",
            ));
        }
    }
    Ok((bytes, mt, digest))
}

/// The last step of a pull: the manifest blob, then the image record naming `out`'s layers.
/// The manifest is kept last among the blobs: push reads the image through it.
pub(crate) fn record_image(
    store: &Store,
    out: &mut Pulled,
    manifest_bytes: &[u8],
    media_type: String,
    digest: String,
    config: &str,
) -> Result<()> {
    blobs::put_bytes(store, &digest, manifest_bytes)?;
    blobs::write_record(
        store,
        &blobs::ImageRecord {
            name: out.name.clone(),
            manifest: digest.clone(),
            media_type,
            config: config.to_string(),
            chain_ids: out.chain_ids.clone(),
        },
    )?;
    out.manifest = digest;
    Ok(())
}

/// GET a manifest by tag or digest; returns (bytes, media type, digest). Its bytes must
/// hash to `pinned` when given, and to the registry's `Docker-Content-Digest` when sent.
pub(crate) fn fetch_manifest(
    client: &Client,
    r: &str,
    pinned: Option<&str>,
) -> Result<(Vec<u8>, String, String)> {
    let url = client.url(&format!("manifests/{r}"));
    let what = format!("manifest {r}");
    client.with_retries(&what, || {
        let reply = client.request(Method::GET, &url, &[("Accept", manifest::ACCEPT)], &[])?;
        match reply.status {
            200 => {}
            404 => {
                return Err(Fail::Fatal(Error::remote(
                    format!("image {}", client.reference),
                    format!("{r} not found in the registry ({})", reply.error_text()),
                    "check the repository name and the tag; GET /v2/NAME/tags/list on the registry lists the tags",
                )))
            }
            _ => {
                return Err(Fail::Fatal(Error::remote(
                    what.clone(),
                    reply.error_text(),
                    "check the reference",
                )))
            }
        }
        let announced = reply.header("Docker-Content-Digest").map(str::to_owned);
        let content_type = reply.header("Content-Type").map(str::to_owned);
        let bytes = reply.bytes()?;
        let got = sha256_digest(&bytes);
        for want in pinned.iter().copied().chain(announced.as_deref()) {
            if want != got {
                return Err(Fail::Fatal(Error::remote(
                    what.clone(),
                    format!("digest mismatch: expected {want}, the manifest hashes to {got}"),
                    "nothing was stored; the registry or something between it and us alters data",
                )));
            }
        }
        let mt = manifest::media_type(&bytes, content_type.as_deref());
        Ok((bytes, mt, got))
    })
}

/// A blob's bar label: `blob ` and the first 12 hex digits of its digest.
fn short_blob(digest: &str) -> String {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    format!("blob {}", hex.get(..12).unwrap_or(hex))
}

/// sha256 of the first `n` bytes of `f`.
fn hash_prefix(f: &mut File, n: u64, p: &std::path::Path) -> Result<Sha256> {
    let mut h = Sha256::new();
    f.seek(SeekFrom::Start(0))
        .map_err(|e| Error::io("pull.rehash", p, e))?;
    let mut r = f.take(n);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let k = r.read(&mut buf).map_err(|e| Error::io("pull.rehash", p, e))?;
        if k == 0 {
            return Ok(h);
        }
        h.update(&buf[..k]);
    }
}

/// Where a download of `desc` into the incoming file `f` (at `p`) starts: the bytes it holds
/// and their hash; none when it holds the whole blob, which is then published (a pull that
/// stopped before publishing it). A file longer than the blob, or a whole one that does not
/// match, starts again from 0.
fn resume_point(store: &Store, f: &mut File, p: &Path, desc: &Descriptor) -> Result<Option<(u64, Sha256)>> {
    let mut have = f.metadata().map_err(|e| Error::io("pull.blob_stat", p, e))?.len();
    if have > desc.size {
        f.set_len(0).map_err(|e| Error::io("pull.blob_truncate", p, e))?;
        have = 0;
    }
    let h = hash_prefix(f, have, p)?;
    if have == desc.size {
        if format!("sha256:{:x}", h.clone().finalize()) == desc.digest {
            blobs::publish_incoming(store, &desc.digest)?;
            return Ok(None);
        }
        f.set_len(0).map_err(|e| Error::io("pull.blob_truncate", p, e))?;
        return Ok(Some((0, Sha256::new())));
    }
    Ok(Some((have, h)))
}

/// The offset the reply's body starts at (and the body), for a GET that asked for
/// `bytes=HAVE-` (when `have > 0`): 0 for a whole body, `have` for a matching 206; a refused
/// range empties `f` and is retried from the start.
fn body_start(
    client: &Client,
    reply: super::client::Reply,
    have: u64,
    what: &str,
    f: &mut File,
    p: &Path,
) -> std::result::Result<(u64, ureq::Body), Fail> {
    let range = format!("bytes={have}-");
    match reply.status {
        200 => Ok((0, reply.body)),
        206 => {
            let cr = reply.header("Content-Range").unwrap_or("");
            if !cr.starts_with(&format!("bytes {have}-")) {
                return Err(Fail::Transient(format!(
                    "unexpected Content-Range \"{cr}\" for {range}"
                )));
            }
            Ok((have, reply.body))
        }
        404 => Err(Fail::Fatal(Error::remote(
            format!("{what} of {}", client.reference),
            format!("not in the registry ({})", reply.error_text()),
            "the image is incomplete in the registry; push it again",
        ))),
        416 => {
            f.set_len(0).map_err(|e| Error::io("pull.blob_truncate", p, e))?;
            Err(Fail::Transient(format!(
                "range {range} refused; fetching from the start"
            )))
        }
        _ => Err(Fail::Fatal(Error::remote(
            format!("{what} of {}", client.reference),
            reply.error_text(),
            "check the registry",
        ))),
    }
}

/// Make the blob `desc` complete and verified in the store (step `pull.blob`).
pub(crate) fn fetch_blob(
    store: &Store,
    client: &Client,
    desc: &Descriptor,
    out: &mut Pulled,
    progress: &Progress,
) -> Result<()> {
    if blobs::has_blob(store, &desc.digest) {
        out.blobs_present += 1;
        return Ok(());
    }
    let bar = progress.bytes(short_blob(&desc.digest), Some(desc.size));
    out.blobs_fetched += 1;
    let p = blobs::incoming_path(store, &desc.digest);
    let url = client.url(&format!("blobs/{}", desc.digest));
    let what = format!("blob {}", desc.digest);
    // a resumed download that does not add up is fetched once more from the start
    let mut restarted = false;
    let mut fetched = 0u64;
    let r = client.with_retries(&what, || {
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&p)
            .map_err(|e| Error::io("pull.blob_open", &p, e))?;
        let Some((have, mut h)) = resume_point(store, &mut f, &p, desc)? else {
            return Ok(());
        };
        let range = format!("bytes={have}-");
        let headers: Vec<(&str, &str)> = if have > 0 {
            vec![("Range", range.as_str())]
        } else {
            vec![]
        };
        let reply = client.request(Method::GET, &url, &headers, &[])?;
        let (start, body) = body_start(client, reply, have, &what, &mut f, &p)?;
        if start == 0 {
            f.set_len(0).map_err(|e| Error::io("pull.blob_truncate", &p, e))?;
            h = Sha256::new();
        }
        f.seek(SeekFrom::Start(start))
            .map_err(|e| Error::io("pull.blob_seek", &p, e))?;
        if have > 0 && start == have {
            tracing::info!(digest = %desc.digest, bytes = have, "resuming a partial blob download");
        }
        let mut pos = start;
        let copied = Client::copy_body(body, |chunk| {
            pos += chunk.len() as u64;
            if pos > desc.size {
                return Err(Error::remote(
                    format!("{what} of {}", client.reference),
                    format!(
                        "the registry sends more than the {} bytes of its descriptor",
                        desc.size
                    ),
                    "nothing was stored; the registry or something between it and us alters data",
                ));
            }
            h.update(chunk);
            bar.inc(chunk.len() as u64);
            f.write_all(chunk)
                .map_err(|e| Error::io("pull.blob_write", &p, e))
        });
        // count what arrived even when the connection then failed
        fetched += pos - start;
        copied?;
        if pos < desc.size {
            return Err(Fail::Transient(format!(
                "the body ended at byte {pos} of {}",
                desc.size
            )));
        }
        let got = format!("sha256:{:x}", h.finalize());
        if got != desc.digest {
            let _ = std::fs::remove_file(&p);
            if start > 0 && !restarted {
                restarted = true;
                return Err(Fail::Transient(format!(
                    "the resumed download hashes to {got}; fetching it whole"
                )));
            }
            return Err(Fail::Fatal(Error::remote(
                format!("{what} of {}", client.reference),
                format!(
                    "digest mismatch: expected {}, received bytes hash to {got}",
                    desc.digest
                ),
                "nothing was published; the registry or something between it and us alters data",
            )));
        }
        blobs::publish_incoming(store, &desc.digest)?;
        Ok(())
    });
    out.bytes_fetched += fetched;
    r
}
