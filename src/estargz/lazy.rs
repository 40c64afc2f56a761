//! The mount side of a lazy layer: reads of its regular files, one eStargz chunk at a time.
//!
//! A chunk is served only once its bytes hash to the TOC's `chunkDigest`, whether they come
//! from the registry or from the cache (the skeleton file in the store, see
//! [`crate::store::lazy`]). On its first read in a mount, a chunk the cache has is read and
//! hashed; one that matches is served, one that does not is logged and fetched again. A
//! chunk not in the cache is fetched with an HTTP Range request (the chunks a read needs
//! whose compressed spans touch go in one request; separate spans go up to
//! [`MAX_IN_FLIGHT`] at a time), inflated, hashed, written to the cache, then served. A
//! fetched chunk that does not match is EIO (logged once with the layer and the file),
//! never served and never cached; the next read fetches it again. The registry is waited
//! for a bounded time ([`FETCH_TIMEOUT`], [`FETCH_RETRIES`]), then the read fails with EIO.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rustix::fs::{Mode, OFlags};
use sha2::{Digest, Sha256};
use tracing::{error, warn};

use super::toc::{self, Chunk, ChunkTable};
use crate::digest::{hex, sha256_digest};
use crate::error::{Error, Result};
use crate::failpoint::crash_point;
use crate::layer::pread_full;
use crate::lower::source::{ChunkSource, ReadCtx};
use crate::registry::client::{Client, Options};
use crate::registry::reference::Reference;
use crate::store::lazy::ranges::BlobFile;
use crate::store::lazy::{open_beneath_for_write, LAZY_DIR, PRESENT_FILE, TOC_FILE};

/// Largest compressed span fetched by one Range request.
pub(super) const MAX_RUN: u64 = 8 << 20;
/// Range requests of one read in flight at once.
pub const MAX_IN_FLIGHT: usize = 4;
/// How long one request may stall (connect, or between two reads of the body).
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Retries of a failed Range request (backoff 100 ms, 200 ms, ...).
pub const FETCH_RETRIES: u32 = 2;

/// Chunks fetched and verified: (index in the file, bytes).
type Fetched = Vec<(usize, Vec<u8>)>;

/// A lazy layer of a mount: reads through [`Shared`], and the background fetch started at
/// the first lookup or read (after the mount daemonized: no thread exists across its fork).
pub struct LazyLayer {
    s: Arc<Shared>,
    /// the background fetch was started (or is off)
    started: AtomicBool,
}

/// Where a lazy layer's chunks come from, and which chunks the cache has.
pub(super) struct Shared {
    /// the layer directory, for messages
    pub(super) layer: String,
    /// the store's layer directory (`layers/<chain-hex>`, holding `diff/` and `lazy/`)
    pub(super) layer_dir: std::path::PathBuf,
    pub(super) table: ChunkTable,
    pub(super) blob: String,
    /// the compressed blob's size (manifest)
    pub(super) blob_size: u64,
    reference: Reference,
    opts: Options,
    /// made at the first fetch (after the mount daemonized)
    client: OnceLock<std::result::Result<Client, String>>,
    /// the skeleton directory
    dir: OwnedFd,
    present: File,
    /// `lazy/blob` and its range map: what reads and the background fetch moved
    pub(super) blob_file: BlobFile,
}

impl std::fmt::Debug for LazyLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LazyLayer({})", self.s.layer)
    }
}

/// The chunk source of the layer directory `dir` of a store when it was pulled lazily (its
/// `layer.json` has a `lazy` object), to inject into
/// [`crate::lower::verify::VerifiedLayer::open`]; None for any other layer.
pub fn chunk_source(dir: &Path) -> Result<Option<Arc<dyn ChunkSource>>> {
    Ok(LazyLayer::open(dir)?.map(|l| Arc::new(l) as Arc<dyn ChunkSource>))
}

impl LazyLayer {
    /// The lazy side of the layer directory `dir` of a store (`layer.json` beside it has a
    /// `lazy` object), or None for any other layer. The stored TOC must hash to the digest
    /// recorded at pull. `VERLAY_LAZY_BACKGROUND=off` in the mount's environment turns the
    /// background fetch off.
    pub fn open(dir: &Path) -> Result<Option<LazyLayer>> {
        let off = std::env::var_os("VERLAY_LAZY_BACKGROUND").is_some_and(|v| v == "off");
        Ok(Shared::open(dir)?.map(|s| LazyLayer {
            s: Arc::new(s),
            started: AtomicBool::new(off),
        }))
    }
}

impl ChunkSource for LazyLayer {
    fn file(&self, rel: &Path) -> Option<(usize, usize, u64)> {
        self.s.file(rel)
    }

    /// Every chunk the read touches is verified first: from the cache, or fetched.
    fn read(&self, c: &ReadCtx<'_>, fd: BorrowedFd<'_>, offset: u64, size: u64) -> Result<Vec<u8>> {
        self.start_background();
        self.s.read(c, fd, offset, size)
    }

    /// Start the background fetch, once (the verifier calls it at the layer's first lookup
    /// and read, which come after the mount daemonized).
    fn start_background(&self) {
        if !self.started.swap(true, Ordering::AcqRel) {
            let s = self.s.clone();
            let spawned = std::thread::Builder::new()
                .name("verlay-lazy-fetch".into())
                .spawn(move || super::background::run(&s));
            if let Err(e) = spawned {
                warn!(layer = %self.s.layer, error = %e, "cannot start the background fetch");
            }
        }
    }
}

fn bad_store(dir: &Path, why: impl Into<String>) -> Error {
    Error::usage(
        format!("lowerdir \"{}\"", dir.display()),
        why,
        "the lazy layer's record in the store is damaged; pull the image again (into a new store, or after removing the layer)",
    )
}

impl Shared {
    fn open(dir: &Path) -> Result<Option<Shared>> {
        let Some(parent) = dir.parent() else {
            return Ok(None);
        };
        let rec = match std::fs::read(parent.join("layer.json")) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("lazy.record", parent.join("layer.json"), e)),
        };
        let rec: serde_json::Value =
            serde_json::from_slice(&rec).map_err(|e| bad_store(dir, e.to_string()))?;
        let Some(l) = rec.get("lazy") else { return Ok(None) };
        let s = |k: &str| {
            l[k].as_str()
                .map(str::to_owned)
                .ok_or_else(|| bad_store(dir, format!("no {k} in its lazy record")))
        };
        let toc_path = parent.join(LAZY_DIR).join(TOC_FILE);
        let json = std::fs::read(&toc_path).map_err(|e| Error::io("lazy.toc", &toc_path, e))?;
        let want = s("toc_digest")?;
        if sha256_digest(&json) != want {
            return Err(bad_store(
                dir,
                format!("its stored TOC does not hash to the recorded {want}"),
            ));
        }
        let parsed = toc::parse_toc(&json).map_err(|why| bad_store(dir, why))?;
        let toc_offset = l["toc_offset"]
            .as_u64()
            .ok_or_else(|| bad_store(dir, "no toc_offset"))?;
        let table = toc::chunk_table(&parsed, toc_offset).map_err(|why| bad_store(dir, why))?;
        let p = parent.join(LAZY_DIR).join(PRESENT_FILE);
        let present = File::options()
            .read(true)
            .write(true)
            .open(&p)
            .map_err(|e| Error::io("lazy.present", &p, e))?;
        let opts = Options {
            plain_http: l["plain_http"].as_bool().unwrap_or(false),
            tls_verify: l["tls_verify"].as_bool(),
            retries: FETCH_RETRIES,
            timeout: FETCH_TIMEOUT,
            ..Options::default()
        };
        let dirfd = rustix::fs::open(
            dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io("lazy.open_dir", dir, e.into()))?;
        let blob = s("blob_digest")?;
        let lazy_dir = parent.join(LAZY_DIR);
        let kept = parent
            .parent()
            .and_then(|layers| layers.parent())
            .map(|root| root.join("blobs/sha256").join(blob.trim_start_matches("sha256:")))
            .unwrap_or_default();
        let blob_file =
            BlobFile::open(&lazy_dir, &blob, kept).map_err(|e| Error::io("lazy.ranges", &lazy_dir, e))?;
        Ok(Some(Shared {
            layer: dir.display().to_string(),
            layer_dir: parent.to_path_buf(),
            table,
            blob,
            blob_size: l["blob_size"]
                .as_u64()
                .ok_or_else(|| bad_store(dir, "no blob_size"))?,
            reference: Reference::parse(&s("reference")?)?,
            opts,
            client: OnceLock::new(),
            dir: dirfd,
            present,
            blob_file,
        }))
    }

    fn file(&self, rel: &Path) -> Option<(usize, usize, u64)> {
        self.table.files.get(rel).copied()
    }

    pub(super) fn client(&self) -> Result<&Client> {
        self.client
            .get_or_init(|| Client::new(&self.reference, &self.opts).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| {
                Error::remote(
                    format!("registry of lazy layer {}", self.layer),
                    e.clone(),
                    "check the registry",
                )
            })
    }

    pub(super) fn is_present(&self, i: usize) -> bool {
        let mut b = [0u8];
        matches!(self.present.read_at(&mut b, i as u64), Ok(1)) && b[0] == 1
    }

    fn read(&self, c: &ReadCtx<'_>, fd: impl AsFd, offset: u64, size: u64) -> Result<Vec<u8>> {
        let end = (offset + size).min(c.size);
        if offset >= end || c.count == 0 {
            return Ok(Vec::new());
        }
        let chunks = &self.table.chunks[c.first..c.first + c.count];
        let lo = chunks.partition_point(|k| k.file_off + k.len <= offset);
        let hi = chunks.partition_point(|k| k.file_off < end);
        let mut have: Vec<Option<Vec<u8>>> = vec![None; hi - lo];
        let mut need = Vec::new();
        for k in lo..hi {
            if c.bits.get(k as u64) {
                continue;
            }
            let ch = &chunks[k];
            if self.is_present(c.first + k) {
                let mut b = vec![0u8; ch.len as usize];
                let got = pread_full(fd.as_fd(), &mut b, ch.file_off)?;
                if got == b.len() && Sha256::digest(&b)[..] == ch.digest[..] {
                    c.bits.set(k as u64);
                    have[k - lo] = Some(b);
                    continue;
                }
                warn!(layer = %self.layer, path = %c.rel.display(), chunk = k, offset = ch.file_off,
                    "cached chunk of a lazy layer does not match its TOC digest; fetching it again");
            }
            need.push(k);
        }
        for (k, data) in self.fetch(c, chunks, &need)? {
            c.bits.set(k as u64);
            have[k - lo] = Some(data);
        }
        let mut out = Vec::with_capacity((end - offset) as usize);
        for k in lo..hi {
            let ch = &chunks[k];
            let data = match have[k - lo].take() {
                Some(d) => d,
                None => {
                    let mut b = vec![0u8; ch.len as usize];
                    let got = pread_full(fd.as_fd(), &mut b, ch.file_off)?;
                    b.truncate(got);
                    b
                }
            };
            let from = offset.saturating_sub(ch.file_off) as usize;
            let to = ((end - ch.file_off) as usize).min(data.len());
            out.extend_from_slice(data.get(from..to).unwrap_or_default());
        }
        Ok(out)
    }

    /// Fetch, verify and cache the chunks `need` (indices into `chunks`, ascending).
    fn fetch(&self, c: &ReadCtx<'_>, chunks: &[Chunk], need: &[usize]) -> Result<Fetched> {
        if need.is_empty() {
            return Ok(Vec::new());
        }
        // runs of chunks whose compressed spans touch or overlap, and that are all in
        // `lazy/blob` or all not (a run is read there or asked for whole: no byte the blob
        // file has is asked for again)
        let have = self.blob_file.ranges();
        let local = |ch: &Chunk| have.covers(ch.blob_off, ch.blob_end);
        let mut runs: Vec<Vec<usize>> = Vec::new();
        for &k in need {
            let ch = &chunks[k];
            match runs.last_mut() {
                Some(r)
                    if {
                        let first = &chunks[r[0]];
                        let last = &chunks[*r.last().unwrap_or(&r[0])];
                        ch.blob_off >= first.blob_off
                            && ch.blob_off <= last.blob_end
                            && ch.blob_end - first.blob_off <= MAX_RUN
                            && local(ch) == local(first)
                    } =>
                {
                    r.push(k)
                }
                _ => runs.push(vec![k]),
            }
        }
        let mut out = Vec::new();
        for batch in runs.chunks(MAX_IN_FLIGHT) {
            let results: Vec<Result<Fetched>> = if batch.len() == 1 {
                vec![self.fetch_run(c, chunks, &batch[0])]
            } else {
                std::thread::scope(|s| {
                    let hs: Vec<_> = batch
                        .iter()
                        .map(|r| s.spawn(|| self.fetch_run(c, chunks, r)))
                        .collect();
                    hs.into_iter()
                        .map(|h| h.join().unwrap_or(Err(Error::Errno(libc::EIO))))
                        .collect()
                })
            };
            for r in results {
                out.extend(r?);
            }
        }
        Ok(out)
    }

    /// One Range request for a run of chunks; each inflated, verified, cached.
    fn fetch_run(&self, c: &ReadCtx<'_>, chunks: &[Chunk], run: &[usize]) -> Result<Fetched> {
        let start = run.iter().map(|&k| chunks[k].blob_off).min().unwrap_or(0);
        let end = run.iter().map(|&k| chunks[k].blob_end).max().unwrap_or(0);
        // the background fetch (or the pull, or another read) may have these bytes already;
        // they are verified as any fetched bytes, and fetched from the registry when they
        // do not match
        if let Some(body) = self.blob_file.read(start, end) {
            if let Ok(out) = self.verify_run(c, chunks, run, start, &body, true) {
                return Ok(out);
            }
        }
        let body = self
            .client()?
            .get_blob_range(&self.blob, start, end)
            .inspect_err(|e| {
                error!(layer = %self.layer, path = %c.rel.display(), error = %e,
                "could not fetch a chunk of a lazy layer; serving EIO");
            })?;
        let out = self.verify_run(c, chunks, run, start, &body, false)?;
        // verified: kept in `lazy/blob` too, so the background fetch does not move it again
        // (a failure only costs that fetch)
        match self.blob_file.store(start, &body) {
            Ok(()) => crash_point("lazy.span"),
            // being sealed, or sealed: the store has (or is getting) the whole blob
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::WouldBlock
                ) =>
            {
                tracing::debug!(layer = %self.layer, error = %e, "a fetched span not kept: the lazy blob file is being sealed")
            }
            Err(e) => {
                warn!(layer = %self.layer, path = %c.rel.display(), error = %e, "cannot keep a fetched span in the lazy blob file")
            }
        }
        Ok(out)
    }

    /// Inflate, verify and cache each chunk of `run` from `body` (the blob from `start`). A
    /// mismatch is the logged integrity error, or, for bytes from the `local` blob file, a
    /// silent error (the caller then fetches them).
    fn verify_run(
        &self,
        c: &ReadCtx<'_>,
        chunks: &[Chunk],
        run: &[usize],
        start: u64,
        body: &[u8],
        local: bool,
    ) -> Result<Fetched> {
        let mut out = Vec::with_capacity(run.len());
        let mut cache: Option<File> = None;
        for &k in run {
            let ch = &chunks[k];
            let span = &body[(ch.blob_off - start) as usize..(ch.blob_end - start) as usize];
            let data = inflate(span, ch.inner, ch.len);
            let actual = Sha256::digest(&data);
            if data.len() as u64 != ch.len || actual[..] != ch.digest[..] {
                if local {
                    tracing::debug!(layer = %self.layer, path = %c.rel.display(), "the background fetch's bytes of a chunk do not match; fetching it");
                    return Err(Error::Errno(libc::EIO));
                }
                return Err((c.corrupt)(
                    format!("chunk at {} sha256:{}", ch.file_off, hex(&ch.digest)),
                    format!("fetched {} bytes hashing to sha256:{}", data.len(), hex(&actual)),
                ));
            }
            self.cache(&mut cache, c.rel, c.first + k, ch, &data);
            out.push((k, data));
        }
        Ok(out)
    }

    /// Write a verified chunk to the skeleton file and mark it present. A failure only
    /// costs a fetch later: it is logged, not returned.
    pub(super) fn cache(&self, f: &mut Option<File>, rel: &Path, index: usize, ch: &Chunk, data: &[u8]) {
        if f.is_none() {
            match open_beneath_for_write(&self.dir, rel) {
                Ok(file) => *f = Some(file),
                Err(e) => {
                    warn!(layer = %self.layer, path = %rel.display(), error = %e, "cannot write the lazy layer's cache");
                    return;
                }
            }
        }
        let Some(file) = f.as_ref() else { return };
        // a write sets the file's mtime: put back the TOC's (what a full pull shows)
        let mtime = self.table.mtimes.get(rel).copied().unwrap_or(0).max(0) as u64;
        let r = file
            .write_all_at(data, ch.file_off)
            .and_then(|()| file.set_modified(std::time::UNIX_EPOCH + Duration::from_secs(mtime)))
            .and_then(|()| self.present.write_all_at(&[1], index as u64));
        if let Err(e) = r {
            warn!(layer = %self.layer, path = %rel.display(), error = %e, "cannot write the lazy layer's cache");
        }
    }
}

/// `len` bytes after `inner` bytes of the gzip member at the start of `span` (fewer if the
/// member is shorter or damaged: the digest check then fails).
pub(super) fn inflate(span: &[u8], inner: u64, len: u64) -> Vec<u8> {
    let mut gz = flate2::read::GzDecoder::new(span).take(inner + len);
    let mut v = Vec::with_capacity((inner + len) as usize);
    let _ = gz.read_to_end(&mut v);
    v.drain(..(inner as usize).min(v.len()));
    v
}
