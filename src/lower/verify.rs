//! Lazy verification of a lower layer against its manifest, inside the mount.
//!
//! Nothing is hashed up front. Lookup checks an entry's metadata against the manifest (a
//! file the manifest lists but the layer lacks is EIO, never ENOENT; an entry it does not
//! list is hidden). The first read of each content chunk hashes it; a match is remembered in a
//! per-file bitmap (kept for a bounded number of files) so later reads cost nothing, a
//! mismatch is EIO every time and one log line naming the layer and the file. A read is
//! served from the very bytes that were hashed: the lower file is read once. Copy-up
//! verifies the whole file first, so a corrupt lower never becomes a good-looking upper file.

use std::collections::HashMap;
use std::ffi::OsString;
use std::num::NonZeroUsize;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use lru::LruCache;
use parking_lot::Mutex;
use rustix::fs::Stat;
use tracing::{error, warn};

use crate::digest::hex;
use crate::error::{Error, Result};
use crate::layer::{pread_full, read_at, Kind, LayerDir};
use crate::lower::manifest::{chunk_count, chunk_digest, Manifest, ManifestEntry};
use crate::lower::source::{ChunkSource, ReadCtx};

/// Verdict bitmaps kept per layer, in 64-bit words: 512 Ki words (4 MiB) remember 32 Mi
/// chunks, 128 GiB of data read at 4 KiB chunks. Past that (or past `VERDICT_FILES` files)
/// the least recently opened files' bitmaps are dropped, and their chunks are hashed again
/// when next read from disk (the page cache serves most re-reads without asking).
const VERDICT_WORDS: usize = 512 * 1024;
/// Files whose verdict bitmaps are kept per layer.
const VERDICT_FILES: usize = 64 * 1024;
/// Largest read of the lower file made to verify a run of chunks.
const VERIFY_BLOCK: u64 = 1024 * 1024;
/// (layer, path) pairs whose integrity error was already logged.
const LOGGED_CACHE: usize = 4096;

/// The mount option `verify=`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum VerifyMode {
    /// verify every lower that has a manifest
    #[default]
    On,
    /// no checks (like fuse-overlayfs)
    Off,
    /// refuse to mount a lower without a manifest
    Require,
}

/// A lower layer's manifest and what has been verified of it.
#[derive(Debug)]
pub struct VerifiedLayer {
    manifest: Manifest,
    /// the layer directory, named in every error
    layer: String,
    /// st_ino -> which of the file's chunks matched
    verified: Mutex<Verdicts>,
    logged: Mutex<LruCache<(PathBuf, String), ()>>,
    /// a layer pulled lazily: its regular files are read through it (see `lower::source`)
    lazy: Option<Arc<dyn ChunkSource>>,
}

impl VerifiedLayer {
    /// Open the manifest of `dir` under `mode`: `None` when the layer has none (or verify is
    /// off); an error when `require` finds none, when the manifest is damaged, or when the
    /// store recorded another digest for it. `lazy` is the layer's chunk source when it was
    /// pulled lazily (`crate::estargz::lazy::chunk_source` opens it).
    pub fn open(
        dir: &Path,
        mode: VerifyMode,
        lazy: Option<Arc<dyn ChunkSource>>,
    ) -> Result<Option<VerifiedLayer>> {
        // A lazy layer has no data but through its verifier, whatever verify= says.
        if mode == VerifyMode::Off && lazy.is_none() {
            return Ok(None);
        }
        let manifest = match Manifest::open_beside(dir)? {
            Some(m) => m,
            None if mode == VerifyMode::Require => {
                return Err(Error::usage(
                    format!("lowerdir \"{}\"", dir.display()),
                    "has no manifest and verify=require is set",
                    format!(
                        "seal it with `verlay layer seal {}`, import it with `verlay layer import`, or mount with verify=on",
                        dir.display()
                    ),
                ))
            }
            None => return Ok(None),
        };
        check_store_record(dir, &manifest)?;
        let cap = |n| NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN);
        Ok(Some(VerifiedLayer {
            manifest,
            layer: dir.display().to_string(),
            verified: Mutex::new(Verdicts {
                files: LruCache::new(cap(VERDICT_FILES)),
                words: 0,
            }),
            logged: Mutex::new(LruCache::new(cap(LOGGED_CACHE))),
            lazy,
        }))
    }

    /// Log an integrity error once per (layer, path, kind of error).
    fn log_once(&self, path: &Path, e: &Error) {
        let kind = match e {
            Error::Corrupt { .. } => "corrupt",
            Error::MissingInLayer { .. } => "missing",
            _ => "other",
        };
        if self
            .logged
            .lock()
            .put((path.to_path_buf(), kind.into()), ())
            .is_none()
        {
            match e {
                Error::Corrupt { expected, actual, .. } => error!(
                    layer = %self.layer, path = %path.display(), expected = %expected, actual = %actual,
                    "lower layer content or metadata does not match its manifest; serving EIO"
                ),
                _ => error!(layer = %self.layer, path = %path.display(), error = %e,
                    "lower layer does not match its manifest; serving EIO"),
            }
        }
    }

    fn corrupt(&self, path: &Path, expected: String, actual: String) -> Error {
        let e = Error::Corrupt {
            layer: self.layer.clone(),
            path: path.to_path_buf(),
            expected,
            actual,
        };
        self.log_once(path, &e);
        e
    }

    /// The manifest's entry for `rel`, without its digests (they are read in place).
    pub fn entry(&self, rel: &Path) -> Result<Option<ManifestEntry>> {
        self.manifest.lookup_meta(rel)
    }

    /// What reads of the regular file `entry` (whose lower file has inode `ino`) check
    /// against; `None` for anything but a regular file.
    pub fn file_chunks(&self, entry: &ManifestEntry, ino: u64) -> Option<FileChunks> {
        if entry.kind != Kind::File {
            return None;
        }
        let lazy = self.lazy.as_ref().and_then(|l| l.file(&entry.path));
        let count = match lazy {
            Some((_, n, _)) => n as u64,
            None => chunk_count(entry.size, self.manifest.chunk_size()),
        };
        let words = count.div_ceil(64) as usize;
        let mut v = self.verified.lock();
        let bits = match v.files.get(&ino) {
            Some(b) if b.words.len() == words => b.clone(),
            _ => {
                let b = Arc::new(ChunkBits {
                    words: (0..words).map(|_| AtomicU64::new(0)).collect(),
                });
                if let Some((_, old)) = v.files.push(ino, b.clone()) {
                    v.words -= old.words.len();
                }
                v.words += words;
                // Keep the newest even if it alone is over the budget.
                while v.words > VERDICT_WORDS && v.files.len() > 1 {
                    match v.files.pop_lru() {
                        Some((_, old)) => v.words -= old.words.len(),
                        None => break,
                    }
                }
                b
            }
        };
        Some(FileChunks {
            first: lazy.map_or(entry.chunk_first, |(f, _, _)| f as u64),
            count,
            size: entry.size,
            bits,
            lazy: lazy.is_some(),
        })
    }

    /// Check what the layer has at `rel` (`st`: its lstat, None when absent) against the
    /// manifest. Returns the stat when the entry is visible, None when it is absent or not
    /// listed (hidden, logged), and EIO when it is missing or its metadata differs.
    pub fn check(&self, layer: &LayerDir, rel: &Path, st: Option<Stat>) -> Result<Option<Stat>> {
        if let Some(l) = &self.lazy {
            l.start_background();
        }
        let entry = self.manifest.lookup_meta(rel)?;
        match (entry, st) {
            (None, None) => Ok(None),
            (None, Some(_)) => {
                if self
                    .logged
                    .lock()
                    .put((rel.to_path_buf(), "unlisted".into()), ())
                    .is_none()
                {
                    warn!(layer = %self.layer, path = %rel.display(),
                        "entry not listed in the layer manifest; hidden");
                }
                Ok(None)
            }
            (Some(_), None) => {
                let e = Error::MissingInLayer {
                    layer: self.layer.clone(),
                    path: rel.to_path_buf(),
                };
                self.log_once(rel, &e);
                Err(e)
            }
            (Some(e), Some(st)) => {
                if let Some((want, got)) = metadata_mismatch(layer, rel, &e, &st)? {
                    return Err(self.corrupt(rel, want, got));
                }
                Ok(Some(st))
            }
        }
    }

    /// Names the manifest lists in directory `rel`, with their kinds.
    pub fn listed(&self, rel: &Path) -> Result<HashMap<OsString, Kind>> {
        Ok(self.manifest.child_kinds(rel)?.into_iter().collect())
    }

    /// Check `data`, read from byte `first * chunk_size` of the file, against the digests of
    /// chunks `first..` it covers, and remember each match. `data` must end at a chunk
    /// boundary or at the file's size; a short read fails the chunks it does not cover.
    fn check_chunks(&self, rel: &Path, fc: &FileChunks, first: u64, data: &[u8], want: u64) -> Result<()> {
        let cs = self.manifest.chunk_size();
        let end = (first + want.div_ceil(cs)).min(fc.count);
        for c in first..end {
            if fc.bits.get(c) {
                continue;
            }
            let at = ((c - first) * cs) as usize;
            let piece = data
                .get(at..(at + cs as usize).min(data.len()))
                .unwrap_or_default();
            let actual = chunk_digest(piece);
            let expected = self.manifest.chunk_digest(fc.first + c)?;
            if actual != expected {
                let found = if (piece.len() as u64) < cs.min(fc.size - c * cs) {
                    format!("{} of its bytes, sha256:{}", piece.len(), hex(&actual))
                } else {
                    format!("sha256:{}", hex(&actual))
                };
                return Err(self.corrupt(rel, format!("chunk {c} sha256:{}", hex(&expected)), found));
            }
            fc.bits.set(c);
        }
        Ok(())
    }

    /// Verify the chunks of the file `rel` (open as `fd`) that `[offset, offset + len)`
    /// touches, reading runs of unverified chunks up to 1 MiB at a time.
    pub fn verify_range(
        &self,
        rel: &Path,
        fc: &FileChunks,
        fd: impl AsFd,
        offset: u64,
        len: u64,
    ) -> Result<()> {
        if len == 0 || fc.count == 0 || offset >= fc.size {
            return Ok(());
        }
        if let (true, Some(l)) = (fc.lazy, &self.lazy) {
            // fetched (or found in the cache), verified and written to the skeleton file,
            // which the caller (copy-up) then reads
            let corrupt = |e, a| self.corrupt(rel, e, a);
            let ctx = self.lazy_ctx(rel, fc, &corrupt);
            let mut at = offset;
            while at < (offset + len).min(fc.size) {
                l.read(&ctx, fd.as_fd(), at, VERIFY_BLOCK)?;
                at += VERIFY_BLOCK;
            }
            return Ok(());
        }
        let cs = self.manifest.chunk_size();
        let last = ((offset + len - 1) / cs).min(fc.count - 1);
        let per_block = (VERIFY_BLOCK / cs).max(1);
        let mut buf = Vec::new();
        let mut c = offset / cs;
        while c <= last {
            if fc.bits.get(c) {
                c += 1;
                continue;
            }
            let mut end = c + 1;
            while end <= last && end - c < per_block && !fc.bits.get(end) {
                end += 1;
            }
            let want = (end * cs).min(fc.size) - c * cs;
            buf.resize(want as usize, 0);
            let got = pread_full(fd.as_fd(), &mut buf, c * cs)?;
            self.check_chunks(rel, fc, c, &buf[..got], want)?;
            c = end;
        }
        Ok(())
    }

    /// Read `[offset, offset + size)` of the file `rel` (open as `fd`), verifying the chunks
    /// it touches first. The chunks not yet verified are read whole, once: the reply is cut
    /// from the bytes that were hashed, so nothing is read twice and nothing unverified is
    /// served.
    pub fn read(
        &self,
        rel: &Path,
        fc: &FileChunks,
        fd: impl AsFd,
        offset: u64,
        size: u32,
    ) -> Result<Vec<u8>> {
        if let (true, Some(l)) = (fc.lazy, &self.lazy) {
            return l.read(
                &self.lazy_ctx(rel, fc, &|e, a| self.corrupt(rel, e, a)),
                fd.as_fd(),
                offset,
                u64::from(size),
            );
        }
        let end = (offset + u64::from(size)).min(fc.size);
        if fc.count == 0 || offset >= end {
            return read_at(fd, offset, size);
        }
        let cs = self.manifest.chunk_size();
        let (first, last) = (offset / cs, (end - 1) / cs);
        if (first..=last).all(|c| fc.bits.get(c)) {
            return read_at(fd, offset, size);
        }
        let start = first * cs;
        let want = ((last + 1) * cs).min(fc.size) - start;
        let mut buf = vec![0u8; want as usize];
        let got = pread_full(fd.as_fd(), &mut buf, start)?;
        self.check_chunks(rel, fc, first, &buf[..got], want)?;
        buf.truncate(got.min((end - start) as usize));
        buf.drain(..((offset - start) as usize).min(buf.len()));
        Ok(buf)
    }

    /// What a read of the lazy file `rel` needs from this verifier.
    fn lazy_ctx<'a>(
        &'a self,
        rel: &'a Path,
        fc: &'a FileChunks,
        corrupt: &'a (dyn Fn(String, String) -> Error + Sync),
    ) -> ReadCtx<'a> {
        ReadCtx {
            rel,
            first: fc.first as usize,
            count: fc.count as usize,
            size: fc.size,
            bits: &fc.bits,
            corrupt,
        }
    }

    /// Verify a whole file (before a copy-up).
    pub fn verify_file(&self, layer: &LayerDir, rel: &Path, st: &Stat) -> Result<()> {
        let Some(e) = self.manifest.lookup_meta(rel)? else {
            return Ok(());
        };
        if Kind::from_mode(st.st_mode) != Kind::File {
            return Ok(());
        }
        let Some(fc) = self.file_chunks(&e, st.st_ino) else {
            return Ok(());
        };
        let f = layer.open_file(rel, rustix::fs::OFlags::RDONLY)?;
        self.verify_range(rel, &fc, &f, 0, st.st_size as u64)
    }
}

/// Verdict bitmaps of the files of one layer, least recently opened first out.
#[derive(Debug)]
struct Verdicts {
    files: LruCache<u64, Arc<ChunkBits>>,
    /// total words of all bitmaps in `files`
    words: usize,
}

/// Which chunks of one lower file matched their digests: a bit per chunk, only ever set
/// (the lower layer is read-only, so a verdict never goes stale). Lock-free: reads on many
/// threads check and set bits of the same file.
#[derive(Debug)]
pub struct ChunkBits {
    words: Box<[AtomicU64]>,
}

impl ChunkBits {
    pub(crate) fn get(&self, chunk: u64) -> bool {
        self.words
            .get((chunk / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (chunk % 64)) != 0)
    }

    pub(crate) fn set(&self, chunk: u64) {
        if let Some(w) = self.words.get((chunk / 64) as usize) {
            w.fetch_or(1 << (chunk % 64), Ordering::Relaxed);
        }
    }
}

/// What reads of one verified lower file check against: where its digests are in the
/// manifest, and which chunks already matched.
#[derive(Debug)]
pub struct FileChunks {
    /// index of the file's first digest in the manifest's digest table
    first: u64,
    /// number of chunks (and digests)
    count: u64,
    /// the file's size in the manifest
    size: u64,
    bits: Arc<ChunkBits>,
    /// the file is in a lazy layer: `first` and `count` are in its eStargz chunk table
    lazy: bool,
}

/// What differs between the manifest's entry and the object on disk, as (expected, actual).
fn metadata_mismatch(
    layer: &LayerDir,
    rel: &Path,
    e: &ManifestEntry,
    st: &Stat,
) -> Result<Option<(String, String)>> {
    let kind = Kind::from_mode(st.st_mode);
    let perm = st.st_mode & 0o7777;
    let m = |what: &str, want: String, got: String| Some((format!("{what} {want}"), format!("{what} {got}")));
    if kind != e.kind {
        return Ok(m("type", format!("{:?}", e.kind), format!("{kind:?}")));
    }
    if perm != e.perm {
        return Ok(m("mode", format!("{:04o}", e.perm), format!("{perm:04o}")));
    }
    if (st.st_uid, st.st_gid) != (e.uid, e.gid) {
        return Ok(m(
            "owner",
            format!("{}:{}", e.uid, e.gid),
            format!("{}:{}", st.st_uid, st.st_gid),
        ));
    }
    match kind {
        Kind::File if st.st_size as u64 != e.size => {
            return Ok(m("size", e.size.to_string(), st.st_size.to_string()));
        }
        Kind::Char | Kind::Block if st.st_rdev != e.rdev => {
            return Ok(m("device", e.rdev.to_string(), st.st_rdev.to_string()));
        }
        Kind::Symlink => {
            let target = layer.readlink(rel)?;
            if Some(&target) != e.target.as_ref() {
                return Ok(m(
                    "symlink target",
                    format!("{:?}", e.target.clone().unwrap_or_default()),
                    format!("{target:?}"),
                ));
            }
        }
        _ => {}
    }
    Ok(None)
}

/// A layer imported into a store has its manifest digest recorded in `layer.json` beside
/// the `diff` directory; a manifest that does not match the record is refused.
fn check_store_record(dir: &Path, manifest: &Manifest) -> Result<()> {
    let Some(parent) = dir.parent() else { return Ok(()) };
    let record = parent.join("layer.json");
    let bytes = match std::fs::read(&record) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("read layer record", record, e)),
    };
    let v: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| Error::io("parse layer record", &record, std::io::Error::other(e)))?;
    let Some(want) = v.get("manifest_digest").and_then(|d| d.as_str()) else {
        return Ok(());
    };
    let got = manifest.digest();
    if want != got {
        return Err(Error::usage(
            format!("lowerdir \"{}\"", dir.display()),
            format!("its manifest's digest is {got}, but the layer store recorded {want}: the manifest was changed"),
            format!("check the layer with `verlay verify {}` and re-import it", dir.display()),
        ));
    }
    Ok(())
}
