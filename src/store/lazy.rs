//! Lazy layers in the store: `layers/<chain>/` as for any layer (`diff/`, its manifest,
//! `layer.json`), where `diff/` is a skeleton (every entry with its metadata; regular files
//! sparse, of their full size, filled chunk by chunk as reads fetch them: the chunk cache),
//! and `lazy/` holds the TOC (`toc.json`, its digest in `layer.json`) and `present` (one
//! byte per chunk of the TOC's chunk table: 1 once the chunk was written to the skeleton).
//!
//! Nothing in the cache is trusted: every chunk is verified against its TOC digest on its
//! first read after each mount ([`crate::estargz::lazy`]). `present` only says where a
//! corrupt cache was found, and spares fetching chunks the layer never had.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags, ResolveFlags};

use super::{
    fsync_path, rfc3339, seal_layer, since_epoch, unpack, Store, DIFF, LAYERS, RECORD, RECORD_VERSION,
};
use crate::error::{Error, Result};

/// The directory of a lazy layer's TOC and chunk presence.
pub const LAZY_DIR: &str = "lazy";
/// The TOC JSON of a lazy layer.
pub const TOC_FILE: &str = "toc.json";
/// One byte per chunk: written to the skeleton or not.
pub const PRESENT_FILE: &str = "present";

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

fn write_synced(p: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(p).map_err(|e| Error::io("lazy.write", p, e))?;
    f.write_all(bytes).map_err(|e| Error::io("lazy.write", p, e))?;
    f.sync_all().map_err(|e| Error::io("lazy.fsync", p, e))
}
