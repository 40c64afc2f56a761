//! The store's copy of an image as a registry knows it: blobs by digest and image records.
//!
//! Layout, beside the layers (see [`crate::store`]):
//!
//! ```text
//! STORE/blobs/sha256/<hex>      a complete blob (manifest, config or compressed layer),
//!                               checked against its digest before the rename that put it here
//! STORE/blobs/incoming/<hex>    a download in progress: bytes received so far, never trusted;
//!                               a resumed pull re-hashes them, and the whole is checked
//!                               before it is published
//! STORE/images/<name>.json      an image record: name, manifest digest and media type,
//!                               config digest, layer chain IDs
//! STORE/uploads/<hex>.json      an upload session of a push in progress (registry, location,
//!                               confirmed offset): a hint for the next push, which asks the
//!                               registry before it believes it
//! ```
//!
//! Publishing a blob or a record is write, fsync, rename, fsync of the directory, so a crash
//! leaves the old state or the new one. `incoming/` survives a crash on purpose (it is not
//! under `tmp/`, which every store command empties): it is what a resumed pull continues.
//!
//! Keeping the original blobs (rather than regenerating layer tarballs from the unpacked
//! layers) is what lets `verlay image push` send an image whose manifest digest is the one it
//! was pulled or imported with.
//!
//! Must not: publish a blob under a digest it does not hash to.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::digest::{hex_part, parse_digest, sha256_digest};
use crate::error::{Error, NotFoundOk, Result};
use crate::store::Store;

const BLOBS: &str = "blobs/sha256";
const INCOMING: &str = "blobs/incoming";
const IMAGES: &str = "images";
const UPLOADS: &str = "uploads";
/// Format version of an image record.
const IMAGE_RECORD_VERSION: u64 = 1;
const COPY_BUF: usize = 1 << 20;

/// Prefix of a blob being copied in before its digest is known (`put_stream`).
const STREAM_PREFIX: &str = "stream.";
/// Infix of an image record being written.
const RECORD_TMP: &str = ".json.tmp.";

/// Create `blobs/sha256`, `blobs/incoming` and `images` if missing, and remove what an
/// interrupted command left that nothing can resume: a blob copied in before its digest was
/// known, a record half written. Safe because the caller holds the store lock. Partial
/// downloads (`incoming/<hex>`) stay: the next pull continues them.
pub fn ensure_dirs(store: &Store) -> Result<()> {
    for d in [BLOBS, INCOMING, IMAGES, UPLOADS] {
        let p = store.root().join(d);
        std::fs::create_dir_all(&p).map_err(|e| Error::io("blobs.mkdir", &p, e))?;
    }
    for (dir, leftover) in [
        (
            INCOMING,
            &(|n: &str| n.starts_with(STREAM_PREFIX)) as &dyn Fn(&str) -> bool,
        ),
        (IMAGES, &|n: &str| n.contains(RECORD_TMP)),
        (UPLOADS, &|n: &str| n.contains(RECORD_TMP)),
    ] {
        let d = store.root().join(dir);
        for ent in std::fs::read_dir(&d).map_err(|e| Error::io("blobs.leftovers", &d, e))? {
            let ent = ent.map_err(|e| Error::io("blobs.leftovers", &d, e))?;
            if ent.file_name().to_str().is_some_and(leftover) {
                let p = ent.path();
                std::fs::remove_file(&p).map_err(|e| Error::io("blobs.remove_leftover", &p, e))?;
                tracing::warn!(path = %p.display(), "removed the leftover of an interrupted command");
            }
        }
    }
    Ok(())
}

/// Where the complete blob `digest` lives.
pub fn blob_path(store: &Store, digest: &str) -> PathBuf {
    store.root().join(BLOBS).join(hex_part(digest))
}

/// Where a download of `digest` in progress lives.
pub fn incoming_path(store: &Store, digest: &str) -> PathBuf {
    store.root().join(INCOMING).join(hex_part(digest))
}

/// Is the complete blob in the store?
pub fn has_blob(store: &Store, digest: &str) -> bool {
    blob_path(store, digest).is_file()
}

/// Size of a complete blob.
pub fn blob_size(store: &Store, digest: &str) -> Result<u64> {
    let p = blob_path(store, digest);
    Ok(std::fs::metadata(&p)
        .map_err(|e| Error::io("blobs.stat", &p, e))?
        .len())
}

/// Read a complete (small) blob whole and check it again: a document we are about to trust
/// (a manifest, a config) is hashed every time it is read.
pub fn read_blob(store: &Store, digest: &str) -> Result<Vec<u8>> {
    let p = blob_path(store, digest);
    let bytes = std::fs::read(&p).map_err(|e| Error::io("blobs.read", &p, e))?;
    let got = sha256_digest(&bytes);
    if got != digest {
        return Err(Error::usage(
            format!("store blob {}", p.display()),
            format!("damaged: hashes to {got}"),
            "remove it and pull or import the image again",
        ));
    }
    Ok(bytes)
}

/// fsync a file or directory by path.
fn fsync(p: &Path, op: &'static str) -> Result<()> {
    File::open(p)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(op, p, e))
}

/// Publish `incoming/<hex>` as `sha256/<hex>`: fsync it, rename, fsync the directory. The
/// caller has checked that its bytes hash to `digest`.
pub fn publish_incoming(store: &Store, digest: &str) -> Result<()> {
    let from = incoming_path(store, digest);
    let to = blob_path(store, digest);
    fsync(&from, "blob.fsync")?;
    std::fs::rename(&from, &to).map_err(|e| Error::io("blob.publish", &to, e))?;
    fsync(&store.root().join(BLOBS), "blob.fsync_dir")
}

/// Store `bytes` as the blob `digest` (checked first).
pub fn put_bytes(store: &Store, digest: &str, bytes: &[u8]) -> Result<()> {
    let got = sha256_digest(bytes);
    if got != digest {
        return Err(Error::usage(
            format!("blob {digest}"),
            format!("the bytes hash to {got}"),
            "the image is damaged; nothing was stored",
        ));
    }
    if has_blob(store, digest) {
        return Ok(());
    }
    ensure_dirs(store)?;
    let p = incoming_path(store, digest);
    std::fs::write(&p, bytes).map_err(|e| Error::io("blob.write", &p, e))?;
    publish_incoming(store, digest)
}

/// Store a blob from a reader, checked while copying against `expected` (when known) and
/// `size` (when known); returns its digest. Nothing is published when the stream does not
/// match.
pub fn put_stream(
    store: &Store,
    expected: Option<&str>,
    size: Option<u64>,
    r: &mut dyn Read,
) -> Result<String> {
    let expected = expected.map(|d| parse_digest(d, "blob digest")).transpose()?;
    if let Some(d) = &expected {
        if has_blob(store, d) {
            return Ok(d.clone());
        }
    }
    ensure_dirs(store)?;
    // Under a name no digest can have until the digest is known.
    let p = store
        .root()
        .join(INCOMING)
        .join(format!("{STREAM_PREFIX}{}", std::process::id()));
    let mut f = File::create(&p).map_err(|e| Error::io("blob.write", &p, e))?;
    let mut h = Sha256::new();
    let mut n = 0u64;
    let mut buf = vec![0u8; COPY_BUF];
    loop {
        let k = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io("blob.read_source", &p, e)),
        };
        h.update(&buf[..k]);
        f.write_all(&buf[..k])
            .map_err(|e| Error::io("blob.write", &p, e))?;
        n += k as u64;
    }
    drop(f);
    let got = format!("sha256:{:x}", h.finalize());
    if expected.as_ref().is_some_and(|d| *d != got) || size.is_some_and(|s| s != n) {
        let _ = std::fs::remove_file(&p);
        return Err(Error::usage(
            format!("blob {}", expected.as_deref().unwrap_or("(unnamed)")),
            format!("the source gives {n} bytes hashing to {got}"),
            "the image is damaged; nothing was stored",
        ));
    }
    let inc = incoming_path(store, &got);
    std::fs::rename(&p, &inc).map_err(|e| Error::io("blob.write", &inc, e))?;
    publish_incoming(store, &got)?;
    Ok(got)
}

/// An upload session a push left open: where it was and how far the registry confirmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedUpload {
    /// `registry/repository` it belongs to
    pub target: String,
    /// the upload URL (with the registry's state) after the last confirmed chunk
    pub location: String,
    /// bytes the registry confirmed
    pub offset: u64,
}

fn upload_path(store: &Store, digest: &str) -> PathBuf {
    store
        .root()
        .join(UPLOADS)
        .join(format!("{}.json", hex_part(digest)))
}

/// Remember an open upload session. Not fsynced: it is only a hint, checked against the
/// registry before use, and losing it costs a new session, never wrong data.
pub fn save_upload(store: &Store, digest: &str, s: &SavedUpload) -> Result<()> {
    let p = upload_path(store, digest);
    let tmp = p.with_extension(format!("{}{}", &RECORD_TMP[1..], std::process::id()));
    let json = serde_json::json!({"target": s.target, "location": s.location, "offset": s.offset});
    std::fs::write(&tmp, json.to_string()).map_err(|e| Error::io("upload.save", &tmp, e))?;
    std::fs::rename(&tmp, &p).map_err(|e| Error::io("upload.save", &p, e))
}

/// The upload session saved for `digest`, if any and readable.
pub fn load_upload(store: &Store, digest: &str) -> Option<SavedUpload> {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(upload_path(store, digest)).ok()?).ok()?;
    Some(SavedUpload {
        target: v.get("target")?.as_str()?.to_string(),
        location: v.get("location")?.as_str()?.to_string(),
        offset: v.get("offset")?.as_u64()?,
    })
}

/// Forget the upload session of `digest` (done, or abandoned).
pub fn forget_upload(store: &Store, digest: &str) {
    let _ = std::fs::remove_file(upload_path(store, digest));
}

/// An image the store can push: what its record holds.
#[derive(Debug, Clone)]
pub struct ImageRecord {
    /// the name it is recorded under (a reference, or an OCI ref name)
    pub name: String,
    /// digest of the manifest blob
    pub manifest: String,
    /// the manifest's media type
    pub media_type: String,
    /// digest of the config blob
    pub config: String,
    /// chain IDs of its layers, base first
    pub chain_ids: Vec<String>,
}

/// `images/<name>.json`, with the name escaped to one path component.
fn record_path(store: &Store, name: &str) -> PathBuf {
    let mut file = String::with_capacity(name.len() + 5);
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"._-".contains(&b) {
            file.push(b as char);
        } else {
            file.push_str(&format!("%{b:02X}"));
        }
    }
    file.push_str(".json");
    store.root().join(IMAGES).join(file)
}

/// Write the record of an image (crash-safe: temp, fsync, rename, fsync dir).
pub fn write_record(store: &Store, rec: &ImageRecord) -> Result<()> {
    ensure_dirs(store)?;
    let json = serde_json::json!({
        "version": IMAGE_RECORD_VERSION,
        "name": rec.name,
        "manifest": rec.manifest,
        "media_type": rec.media_type,
        "config": rec.config,
        "chain_ids": rec.chain_ids,
    });
    let p = record_path(store, &rec.name);
    let tmp = p.with_extension(format!("{}{}", &RECORD_TMP[1..], std::process::id()));
    let mut text = serde_json::to_vec_pretty(&json)
        .map_err(|e| Error::io("image.record", &p, std::io::Error::other(e)))?;
    text.push(b'\n');
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| Error::io("image.record", &tmp, e))?;
    f.write_all(&text)
        .map_err(|e| Error::io("image.record", &tmp, e))?;
    f.sync_all()
        .map_err(|e| Error::io("image.record_fsync", &tmp, e))?;
    std::fs::rename(&tmp, &p).map_err(|e| Error::io("image.record_publish", &p, e))?;
    fsync(&store.root().join(IMAGES), "image.record_fsync_dir")
}

fn parse_record(p: &Path, bytes: &[u8]) -> Result<ImageRecord> {
    let bad = |why: String| {
        Error::usage(
            format!("image record {}", p.display()),
            why,
            "the store is damaged; pull or import the image again",
        )
    };
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let s = |k: &str| -> Result<String> {
        v.get(k)
            .and_then(|x| x.as_str())
            .map(str::to_owned)
            .ok_or_else(|| bad(format!("no \"{k}\"")))
    };
    let chain_ids = v
        .get("chain_ids")
        .and_then(|c| c.as_array())
        .ok_or_else(|| bad("no \"chain_ids\"".into()))?
        .iter()
        .map(|c| {
            c.as_str()
                .map(str::to_owned)
                .ok_or_else(|| bad("a chain id is not a string".into()))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(ImageRecord {
        name: s("name")?,
        manifest: s("manifest")?,
        media_type: s("media_type")?,
        config: s("config")?,
        chain_ids,
    })
}

/// Every image record, sorted by name.
pub fn list_records(store: &Store) -> Result<Vec<ImageRecord>> {
    let dir = store.root().join(IMAGES);
    if rustix::fs::stat(&dir).not_found_ok()?.is_none() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for ent in std::fs::read_dir(&dir).map_err(|e| Error::io("image.list", &dir, e))? {
        let ent = ent.map_err(|e| Error::io("image.list", &dir, e))?;
        let p = ent.path();
        if p.extension().is_some_and(|x| x == "json") {
            let bytes = std::fs::read(&p).map_err(|e| Error::io("image.record", &p, e))?;
            out.push(parse_record(&p, &bytes)?);
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The image recorded under `name`, or whose manifest digest is (or starts with) `name`.
pub fn find_record(store: &Store, name: &str) -> Result<ImageRecord> {
    let p = record_path(store, name);
    match std::fs::read(&p) {
        Ok(bytes) => return parse_record(&p, &bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("image.record", &p, e)),
    }
    let want = name.strip_prefix("sha256:").unwrap_or(name);
    let all = list_records(store)?;
    let by_digest: Vec<&ImageRecord> = all
        .iter()
        .filter(|r| want.len() >= 6 && hex_part(&r.manifest).starts_with(want))
        .collect();
    match by_digest.first() {
        Some(r) => Ok((*r).clone()),
        None => Err(Error::usage(
            format!("image \"{name}\""),
            format!("not in the store {}", store.root().display()),
            "see verlay image ls --store DIR; pull or import it first",
        )),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn record_names_are_one_path_component() {
        let dir = tempfile::tempdir().unwrap();
        let s = crate::store::Store::open(dir.path()).unwrap();
        let p = super::record_path(&s, "127.0.0.1:5000/a/b:1");
        assert_eq!(
            p.file_name().and_then(|n| n.to_str()),
            Some("127.0.0.1%3A5000%2Fa%2Fb%3A1.json")
        );
    }
}
