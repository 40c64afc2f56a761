//! Lazy layers in the store: `layers/<chain>/` as for any layer (`diff/`, its manifest,
//! `layer.json`), where `diff/` is a skeleton (every entry with its metadata; regular files
//! sparse, of their full size, filled chunk by chunk as reads fetch them: the chunk cache),
//! and `lazy/` holds the TOC (`toc.json`, its digest in `layer.json`) and `present` (one
//! byte per chunk of the TOC's chunk table: 1 once the chunk was written to the skeleton).
//!
//! Nothing in the cache is trusted: every chunk is verified against its TOC digest on its
//! first read after each mount ([`crate::estargz::lazy`]). `present` only says where a
//! corrupt cache was found, and spares fetching chunks the layer never had.
//!
//! **Sealing** ([`Store::seal_lazy`]): once the background fetch has the whole compressed
//! blob in `lazy/blob`, the blob goes through the store's ordinary import
//! ([`Store::import_layer`]) with the blob digest of the image manifest and the diffID of
//! the config, on the sealed parent: that import checks both over the whole stream
//! (streamed, bounded memory) and publishes an ordinary layer by its own order (`import.*`
//! steps), under the chain ID an ordinary pull gives it. Then, each a crash point:
//!
//! 1. `lazy_seal.import`: the ordinary layer is published (or was there already);
//! 2. `lazy_seal.blob`: the verified blob renamed into `blobs/` (as a pull keeps it: push
//!    reads it);
//! 3. `lazy_seal.record`: the commit point: the lazy layer's `layer.json` replaced (written
//!    beside it, fsynced, renamed over it, directory fsynced) by one with `"sealed": CHAIN`.
//!
//! A crash before 3 leaves the layer lazy (an ordinary layer may already be published: it
//! is complete, as any import leaves it); the next seal finds the blob (in `lazy/` or in
//! `blobs/`), and the import finds its layer there. A layer is sealed only after its parent:
//! its chain ID depends on the parent's.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags, ResolveFlags};

use super::{
    blobs, fsync_path, rfc3339, seal_layer, since_epoch, unpack, ImportOptions, Store, DIFF, LAYERS, RECORD,
    RECORD_VERSION,
};
use crate::error::{Error, Result};
use crate::failpoint::crash_point;

pub mod ranges;

/// The directory of a lazy layer's TOC and chunk presence.
pub const LAZY_DIR: &str = "lazy";
/// The TOC JSON of a lazy layer.
pub const TOC_FILE: &str = "toc.json";
/// One byte per chunk: written to the skeleton or not.
pub const PRESENT_FILE: &str = "present";
/// The compressed blob, a sparse file at the blob's offsets: the bytes the pull, reads and
/// the background fetch moved (`ranges`, [`ranges`], says which are there).
pub const BLOB_FILE: &str = "blob";

/// How often [`Store::open_within`] tries the store lock again.
pub const LOCK_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

/// What [`Store::seal_lazy`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sealed {
    /// the layer is (now, or was already) the ordinary layer of this chain ID
    As(String),
    /// its blob is not complete in the store yet
    Incomplete,
    /// its parent is a lazy layer not sealed yet (which seals its children when it is)
    WaitingForParent,
}

/// What [`Store::import_lazy`] stores.
pub struct LazyImport {
    /// where it goes
    pub chain_id: String,
    /// the layer below it
    pub parent: Option<String>,
    /// the skeleton as a tar stream (regular files without data)
    pub skeleton: Vec<u8>,
    /// (path, size, mtime) of each regular file with data
    pub sizes: Vec<(PathBuf, u64, u64)>,
    /// chunks in the TOC's chunk table
    pub chunks: u64,
    /// the TOC JSON (its digest checked by the caller against the manifest)
    pub toc_json: Vec<u8>,
    /// (offset, bytes): the part of the compressed blob the pull fetched (the TOC member
    /// and the footer), kept in `lazy/blob` so that the background fetch does not move it
    /// again
    pub tail: (u64, Vec<u8>),
    /// the `lazy` object of `layer.json`: where to fetch from, the TOC digest
    pub lazy: serde_json::Value,
    /// for messages
    pub source: String,
}

/// Open `rel` beneath the directory `dir` for writing, never through a symlink.
pub fn open_beneath_for_write(dir: &impl rustix::fd::AsFd, rel: &Path) -> rustix::io::Result<File> {
    let fd = rustix::fs::openat2(
        dir,
        rel,
        OFlags::WRONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )?;
    Ok(File::from(fd))
}

impl Store {
    /// Open the existing store at `root`, waiting for its lock at most `wait` (retrying a
    /// non-blocking flock every [`LOCK_RETRY`]); None when another process held it all that
    /// time. For the seal, which runs in a mount's background thread: a store held for long
    /// (a snapshotter's operation, a big import) must not hold the thread forever.
    pub fn open_within(root: &Path, wait: std::time::Duration) -> Result<Option<Store>> {
        let root = root
            .canonicalize()
            .map_err(|e| Error::io("store.open", root, e))?;
        let lock_path = root.join(super::LOCK);
        let lock = File::options()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::io("store.lock", &lock_path, e))?;
        let deadline = std::time::Instant::now() + wait;
        loop {
            match rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => break,
                Err(rustix::io::Errno::WOULDBLOCK) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(LOCK_RETRY)
                }
                Err(rustix::io::Errno::WOULDBLOCK) => return Ok(None),
                Err(e) => return Err(Error::io("store.lock", &lock_path, e.into())),
            }
        }
        let store = Store { root, _lock: lock };
        store.remove_leftovers()?;
        Ok(Some(store))
    }

    /// Store a lazy layer (crash-safe as an import: built in `tmp/`, published by one
    /// rename). Returns false when the layer was there already.
    pub fn import_lazy(&self, l: &LazyImport) -> Result<bool> {
        if self.has_layer(&l.chain_id) {
            return Ok(false);
        }
        let tmp = self.tmp_path("lazy");
        std::fs::create_dir(&tmp).map_err(|e| Error::io("lazy.mkdir_tmp", &tmp, e))?;
        let r = self.lazy_into(&tmp, l);
        if r.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        r.map(|()| true)
    }

    /// Seal the lazy layer `chain` if its whole blob is here and its parent is sealed (see
    /// the module doc for the order). A blob that does not hash to the manifest's digest, or
    /// whose tar stream does not hash to the config's diffID, is an error and nothing is
    /// sealed: the layer stays lazy.
    pub fn seal_lazy(&self, chain: &str) -> Result<Sealed> {
        let rec = self.record(chain)?;
        if let Some(s) = rec.get("sealed").and_then(|v| v.as_str()) {
            if self.has_layer(s) {
                return Ok(Sealed::As(s.to_string()));
            }
        }
        let Some(l) = rec.get("lazy") else {
            return Ok(Sealed::As(chain.to_string()));
        };
        let bad = |k: &str| {
            Error::usage(
                format!("lazy layer {chain}"),
                format!("its layer.json has no {k}"),
                "the store is damaged; pull the image again into a new store",
            )
        };
        let field = |k: &str| l[k].as_str().map(str::to_owned).ok_or_else(|| bad(k));
        let digest = field("blob_digest")?;
        // a layer recorded from containerd's remote snapshot labels has no diffID (the labels
        // carry the blob and TOC digests, not the config's diffIDs): the import then computes
        // it over the uncompressed stream and records it. The blob still has to hash to the
        // digest the labels name (checked by the same import), which verifies every byte.
        let diff_id = match &l["diff_id"] {
            serde_json::Value::Null => None,
            _ => Some(field("diff_id")?),
        };
        let size = l["blob_size"].as_u64().ok_or_else(|| bad("blob_size"))?;
        let parent = match rec.get("parent").and_then(|p| p.as_str()) {
            None => None,
            Some(p) => match self.sealed_chain(p)? {
                Some(s) => Some(s),
                None => return Ok(Sealed::WaitingForParent),
            },
        };
        let Some(src) = self.lazy_blob(chain, &digest, size) else {
            return Ok(Sealed::Incomplete);
        };
        let mut f = File::open(&src).map_err(|e| Error::io("lazy_seal.open_blob", &src, e))?;
        // reads write the spans they fetch into `lazy/blob` under a shared flock: none may
        // write while the import reads it, or into it once it is kept (bounded: a write
        // holds it for one span and an fdatasync)
        if !flock_within(&f, std::time::Duration::from_secs(30))? {
            tracing::warn!(layer = %chain, "the lazy blob file stayed locked by a writer; the layer seals at the next mount");
            return Ok(Sealed::Incomplete);
        }
        let got = self.import_layer(
            &mut f,
            &ImportOptions {
                parent,
                diff_id,
                blob_digest: Some(digest.clone()),
                source: format!("lazy layer {chain} (blob {digest})"),
                fsync_each: false,
            },
        )?;
        crash_point("lazy_seal.import");
        // step lazy_seal.blob: the blob, verified by the import, kept as a pull keeps it
        let kept = blobs::blob_path(self, &digest);
        if src != kept {
            blobs::ensure_dirs(self)?;
            if blobs::has_blob(self, &digest) {
                std::fs::remove_file(&src).map_err(|e| Error::io("lazy_seal.blob", &src, e))?;
            } else {
                let inc = blobs::incoming_path(self, &digest);
                std::fs::rename(&src, &inc).map_err(|e| Error::io("lazy_seal.blob", &inc, e))?;
                blobs::publish_incoming(self, &digest)?;
            }
        }
        crash_point("lazy_seal.blob");
        // step lazy_seal.record: the commit point
        let mut rec = rec;
        rec["sealed"] = serde_json::Value::String(got.chain_id.clone());
        let dir = self.layer_dir(chain);
        let mut text = serde_json::to_vec_pretty(&rec)
            .map_err(|e| Error::io("lazy_seal.record", dir.join(RECORD), std::io::Error::other(e)))?;
        text.push(b'\n');
        let tmp = dir.join(format!(".{RECORD}.tmp.{}", std::process::id()));
        write_synced(&tmp, &text)?;
        std::fs::rename(&tmp, dir.join(RECORD)).map_err(|e| Error::io("lazy_seal.record", &tmp, e))?;
        fsync_path(&dir, "lazy_seal.fsync_layer")?;
        crash_point("lazy_seal.record");
        tracing::info!(layer = %chain, sealed = %got.chain_id, "lazy layer sealed: an ordinary layer now");
        Ok(Sealed::As(got.chain_id))
    }

    /// The chain ID to use for `chain` as a parent of a sealed layer: itself for an ordinary
    /// layer, its sealed layer for a sealed lazy one, None for a lazy layer not sealed yet.
    pub fn sealed_chain(&self, chain: &str) -> Result<Option<String>> {
        let rec = self.record(chain)?;
        if rec.get("lazy").is_none() {
            return Ok(Some(chain.to_string()));
        }
        Ok(rec
            .get("sealed")
            .and_then(|s| s.as_str())
            .filter(|s| self.has_layer(s))
            .map(str::to_owned))
    }

    /// Lazy layers whose parent is `chain` (sealed after it).
    pub fn lazy_children(&self, chain: &str) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for c in self.chain_ids()? {
            let Ok(rec) = self.record(&c) else { continue };
            if rec.get("lazy").is_some() && rec.get("parent").and_then(|p| p.as_str()) == Some(chain) {
                out.push(c);
            }
        }
        Ok(out)
    }

    /// Where the whole blob of lazy layer `chain` is: in `blobs/` (verified when it was
    /// published), or complete in its `lazy/` directory (its range map covers it; the
    /// import then checks every byte against the digest anyway).
    fn lazy_blob(&self, chain: &str, digest: &str, size: u64) -> Option<PathBuf> {
        if blobs::has_blob(self, digest) {
            return Some(blobs::blob_path(self, digest));
        }
        let dir = self.layer_dir(chain).join(LAZY_DIR);
        let p = dir.join(BLOB_FILE);
        let (have, _) = ranges::load(&dir.join(ranges::RANGES_FILE), digest);
        match std::fs::metadata(&p) {
            Ok(m) if m.len() == size && have.covers(0, size) => Some(p),
            _ => None,
        }
    }

    fn lazy_into(&self, tmp: &Path, l: &LazyImport) -> Result<()> {
        let diff = tmp.join(DIFF);
        std::fs::create_dir(&diff).map_err(|e| Error::io("lazy.mkdir_diff", &diff, e))?;
        let stream = unpack::HeaderBudget::new(l.skeleton.as_slice());
        let budget = stream.state();
        let mut ar = tar::Archive::new(stream);
        let mut u = unpack::Unpacker::new(&diff, &l.source)?;
        u.unpack(&mut ar, &budget)?;
        let dir = rustix::fs::open(
            &diff,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io("lazy.open_diff", &diff, e.into()))?;
        for (rel, size, mtime) in &l.sizes {
            let f = open_beneath_for_write(&dir, rel)
                .map_err(|e| Error::io("lazy.size", diff.join(rel), e.into()))?;
            f.set_len(*size)
                .map_err(|e| Error::io("lazy.size", diff.join(rel), e))?;
            // set_len moved the mtime the unpack set
            f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(*mtime))
                .map_err(|e| Error::io("lazy.mtime", diff.join(rel), e))?;
        }
        rustix::fs::syncfs(&dir).map_err(|e| Error::io("lazy.syncfs", &diff, e.into()))?;
        let manifest_digest = seal_layer(&diff)?;
        let lazy = tmp.join(LAZY_DIR);
        std::fs::create_dir(&lazy).map_err(|e| Error::io("lazy.mkdir", &lazy, e))?;
        write_synced(&lazy.join(TOC_FILE), &l.toc_json)?;
        let present = lazy.join(PRESENT_FILE);
        let f = File::create(&present).map_err(|e| Error::io("lazy.present", &present, e))?;
        f.set_len(l.chunks)
            .map_err(|e| Error::io("lazy.present", &present, e))?;
        // the blob bytes the pull fetched, durable before the map that claims them
        let (at, tail) = &l.tail;
        let blob = lazy.join(BLOB_FILE);
        let f = File::create(&blob).map_err(|e| Error::io("lazy.blob", &blob, e))?;
        std::os::unix::fs::FileExt::write_all_at(&f, tail, *at)
            .and_then(|()| f.sync_all())
            .map_err(|e| Error::io("lazy.blob", &blob, e))?;
        let digest = l.lazy["blob_digest"].as_str().unwrap_or_default();
        let mut have = ranges::Ranges::default();
        have.insert(*at, at + tail.len() as u64);
        let map = lazy.join(ranges::RANGES_FILE);
        ranges::rewrite(&map, digest, &have).map_err(|e| Error::io("lazy.ranges", &map, e))?;
        let record = serde_json::json!({
            "version": RECORD_VERSION,
            "chain_id": l.chain_id,
            "parent": l.parent,
            "manifest_digest": manifest_digest,
            "created": rfc3339(since_epoch().as_secs() as i64),
            "lazy": l.lazy,
        });
        let mut text = serde_json::to_vec_pretty(&record)
            .map_err(|e| Error::io("lazy.record", tmp.join(RECORD), std::io::Error::other(e)))?;
        text.push(b'\n');
        write_synced(&tmp.join(RECORD), &text)?;
        fsync_path(&lazy, "lazy.fsync_dir")?;
        fsync_path(tmp, "lazy.fsync_tmp")?;
        let dest = self.layer_dir(&l.chain_id);
        std::fs::rename(tmp, &dest).map_err(|e| Error::io("lazy.publish", &dest, e))?;
        fsync_path(&self.root.join(LAYERS), "lazy.fsync_layers")?;
        tracing::info!(layer = %l.chain_id, files = l.sizes.len(), chunks = l.chunks, "lazy layer recorded");
        Ok(())
    }
}

/// An exclusive flock on `f`, tried every [`LOCK_RETRY`] for at most `wait`: false when
/// another holder kept it all that time.
fn flock_within(f: &File, wait: std::time::Duration) -> Result<bool> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        match rustix::fs::flock(f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(true),
            Err(rustix::io::Errno::WOULDBLOCK) if std::time::Instant::now() < deadline => {
                std::thread::sleep(LOCK_RETRY)
            }
            Err(rustix::io::Errno::WOULDBLOCK) => return Ok(false),
            Err(e) => return Err(Error::io("lazy_seal.lock_blob", "lazy/blob", e.into())),
        }
    }
}

fn write_synced(p: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(p).map_err(|e| Error::io("lazy.write", p, e))?;
    f.write_all(bytes).map_err(|e| Error::io("lazy.write", p, e))?;
    f.sync_all().map_err(|e| Error::io("lazy.fsync", p, e))
}
