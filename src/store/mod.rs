//! The layer store: ordered, crash-safe import of OCI/Docker layer tarballs and images.
//!
//! Layout of a store directory `STORE`:
//!
//! ```text
//! STORE/lock                                 flock(LOCK_EX) held by every store operation
//! STORE/tmp/import-PID-NANOS/                an import in progress (never read by anyone)
//! STORE/tmp/commit-PID-NANOS/                `verlay commit`'s staging copy of an upper
//!                                            (src/commit/stage.rs), removed like the others
//! STORE/layers/<chain-hex>/diff/             the layer, in kernel overlayfs format: pass it
//!                                            in lowerdir= (whiteouts are char 0/0 devices,
//!                                            opaque dirs carry trusted.overlay.opaque=y, or
//!                                            user.overlay.opaque=y when imported as non-root)
//! STORE/layers/<chain-hex>/diff.verlay-manifest   the layer manifest (`lower::manifest`)
//! STORE/layers/<chain-hex>/layer.json        chain id, diff id, parent chain id, size,
//!                                            entry count, manifest digest, created time
//! STORE/blobs/, STORE/images/, STORE/uploads/   images as a registry knows them ([`blobs`])
//! ```
//!
//! `<chain-hex>` is the hex part of the layer's chain ID, computed as docker and containerd
//! do: chainID = diffID for a base layer, else sha256(parentChainID + " " + diffID), where
//! diffID is the sha256 of the uncompressed tar stream.
//!
//! Import order (the promise: a crash or power cut at any instant never publishes a layer
//! that looks complete but is not):
//!
//! 1. `import.unpack`: unpack into `tmp/<unique>/diff`, hashing the stream as it goes;
//! 2. `import.fsync`: one syncfs makes every file and directory durable (and reports
//!    writeback errors); `--fsync-each` adds an fsync per object;
//! 3. `import.seal`: the manifest, written and fsynced (`lower::manifest::seal`);
//! 4. `import.record`: `layer.json` written and fsynced, then `tmp/<unique>` fsynced;
//! 5. `import.publish`: one `rename(tmp/<unique>, layers/<chain-hex>)`, then fsync `layers/`.
//!
//! A directory under `layers/` therefore always holds a complete, durable layer; anything
//! under `tmp/` is a leftover once we hold the lock, and is removed (and reported) at the
//! start of every store operation.
//!
//! The lock serialises store operations: a second import waits for the first (and says so).
//!
//! Must not: write into a published layer, or follow a symlink from a tarball
//! (see [`unpack`]).

pub mod blobs;
pub mod image;
pub mod lazy;
pub mod unpack;

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{FlockOperation, Mode, OFlags};
use sha2::{Digest, Sha256};

use crate::digest::{hex_part as hex_of, parse_digest, sha256_digest, sha256_id};
use crate::error::{Error, Result};
use crate::failpoint::crash_point;

/// Name of the store lock file.
const LOCK: &str = "lock";
/// Directory of imports in progress.
const TMP: &str = "tmp";
/// Directory of published layers.
const LAYERS: &str = "layers";
/// The layer directory inside a layer's store entry (what goes in `lowerdir=`).
const DIFF: &str = "diff";
/// The layer record inside a layer's store entry.
const RECORD: &str = "layer.json";
/// Format version of `layer.json`.
const RECORD_VERSION: u64 = 1;
/// Buffer between the decompressor and the tar parser: tar reads 512-byte headers.
const STREAM_BUF: usize = 1 << 20;

const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];
const XZ_MAGIC: &[u8] = &[0xfd, b'7', b'z', b'X', b'Z', 0];
const BZIP2_MAGIC: &[u8] = b"BZh";

/// An open store, locked for the lifetime of this value.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    /// holds the flock; released when dropped (or when the process dies)
    _lock: File,
}

/// The options of one layer import.
#[derive(Debug, Default, Clone)]
pub struct ImportOptions {
    /// chain ID of the parent layer (must be in the store)
    pub parent: Option<String>,
    /// expected diffID (`sha256:HEX`)
    pub diff_id: Option<String>,
    /// expected digest of the stream as given (the compressed blob)
    pub blob_digest: Option<String>,
    /// name of the source, for messages
    pub source: String,
    /// fsync every file and directory after the syncfs (see `import.fsync`)
    pub fsync_each: bool,
}

/// The result of one layer import.
#[derive(Debug, Clone)]
pub struct Imported {
    /// `sha256:HEX`
    pub chain_id: String,
    /// false when the layer was already in the store (nothing was written)
    pub new: bool,
}

/// One row of `verlay layer ls`.
#[derive(Debug, Clone)]
pub struct LayerInfo {
    /// `sha256:HEX`
    pub chain_id: String,
    /// the record, if `layer.json` could be read
    pub record: Option<serde_json::Value>,
    /// "ok", "missing manifest", "missing diff", "bad layer.json"
    pub state: &'static str,
}

/// The chain ID of a layer (docker/containerd): the diffID for a base layer, else
/// sha256(parentChainID + " " + diffID).
pub fn chain_id(parent: Option<&str>, diff_id: &str) -> String {
    match parent {
        None => diff_id.to_string(),
        Some(p) => sha256_digest(format!("{p} {diff_id}").as_bytes()),
    }
}

/// Counts and hashes the bytes read through it.
pub(crate) struct Tally {
    hasher: Sha256,
    bytes: u64,
}

impl Tally {
    pub(crate) fn new() -> Tally {
        Tally {
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    pub(crate) fn digest(&self) -> String {
        sha256_id(&self.hasher.clone().finalize())
    }
}

/// A reader that feeds a [`Tally`].
pub(crate) struct HashReader<'t, R> {
    inner: R,
    tally: &'t mut Tally,
}

impl<'t, R: Read> HashReader<'t, R> {
    pub(crate) fn new(inner: R, tally: &'t mut Tally) -> Self {
        HashReader { inner, tally }
    }
}

impl<R: Read> Read for HashReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.tally.hasher.update(&buf[..n]);
        self.tally.bytes += n as u64;
        Ok(n)
    }
}

/// Chunks in flight between the reading thread and the unpack.
const PIPELINE_DEPTH: usize = 4;

/// Read `r` to its end in `STREAM_BUF` chunks and send them; stops early when the receiver
/// is gone (the unpack failed). A read error is sent on as the last message.
fn pump(mut r: impl Read, tx: std::sync::mpsc::SyncSender<io::Result<Vec<u8>>>) {
    loop {
        let mut buf = vec![0u8; STREAM_BUF];
        let mut n = 0;
        while n < buf.len() {
            match r.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            }
        }
        if n == 0 {
            return;
        }
        buf.truncate(n);
        if tx.send(Ok(buf)).is_err() {
            return;
        }
    }
}

/// The receiving end of [`pump`] as a reader; `total` counts the bytes handed out.
struct ChannelReader {
    rx: std::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    chunk: Vec<u8>,
    pos: usize,
    total: u64,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.chunk.len() {
            match self.rx.recv() {
                Ok(chunk) => {
                    self.chunk = chunk?;
                    self.pos = 0;
                }
                // the sender is done: end of stream
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        self.total += n as u64;
        Ok(n)
    }
}

/// Is this error a full disk (or quota)?
fn is_disk_full(e: &Error) -> bool {
    use std::error::Error as _;
    let mut src: Option<&(dyn std::error::Error + 'static)> = e.source();
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<io::Error>() {
            if matches!(io.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) {
                return true;
            }
        }
        src = s.source();
    }
    false
}

/// Seal the layer directory: write `DIR.verlay-manifest` (fsynced) and return the layer's
/// verity digest.
fn seal_layer(diff: &Path) -> Result<String> {
    crate::lower::manifest::seal(diff)
}

/// Time since the unix epoch now (zero for a clock set before 1970).
fn since_epoch() -> std::time::Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}

/// RFC 3339 UTC time of a unix timestamp (civil-from-days, H. Hinnant); also the eStargz
/// TOC's `modtime` form.
pub(crate) fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn fsync_path(p: &Path, op: &'static str) -> Result<()> {
    let fd = rustix::fs::open(p, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| Error::io(op, p, e.into()))?;
    rustix::fs::fsync(&fd).map_err(|e| Error::io(op, p, e.into()))
}

/// Is `root` a layer store (it has `layers/`)? For commands that only read a store: they
/// must neither create one nor take its lock.
pub fn is_store(root: &Path) -> bool {
    root.join(LAYERS).is_dir()
}

/// `ROOT/layers/<chain-hex>/diff` of a store that is read without being opened.
pub fn diff_dir_at(root: &Path, chain_id: &str) -> PathBuf {
    root.join(LAYERS).join(hex_of(chain_id)).join(DIFF)
}

/// Chain IDs of all published layers of the store at `root`, sorted; read without the lock.
pub fn chain_ids_at(root: &Path) -> Result<Vec<String>> {
    let dir = root.join(LAYERS);
    let mut out = Vec::new();
    for ent in std::fs::read_dir(&dir).map_err(|e| Error::io("store.list", &dir, e))? {
        let ent = ent.map_err(|e| Error::io("store.list", &dir, e))?;
        let name = ent.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
            out.push(format!("sha256:{name}"));
        }
    }
    out.sort();
    Ok(out)
}

impl Store {
    /// Open (creating if needed) the store at `root`, take its lock and remove the leftovers
    /// of interrupted imports.
    pub fn open(root: &Path) -> Result<Store> {
        let what = || format!("store \"{}\"", root.display());
        let mut created = false;
        for d in [root.to_path_buf(), root.join(LAYERS), root.join(TMP)] {
            match std::fs::create_dir(&d) {
                Ok(()) => created = true,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(Error::usage(
                        what(),
                        format!("cannot create {}: {e}", d.display()),
                        "give --store a writable directory",
                    ))
                }
            }
        }
        let root = root
            .canonicalize()
            .map_err(|e| Error::io("store.open", root, e))?;
        if created {
            // The new dirs must be durable before a layer is published into them (the publish
            // fsyncs layers/, not the store root or the root's parent).
            fsync_path(&root, "store.fsync_root")?;
            if let Some(parent) = root.parent() {
                fsync_path(parent, "store.fsync_root")?;
            }
        }
        let lock_path = root.join(LOCK);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::io("store.lock", &lock_path, e))?;
        match rustix::fs::flock(&lock, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                eprintln!(
                    "verlay: waiting for the store lock {} (another verlay is using the store)",
                    lock_path.display()
                );
                rustix::fs::flock(&lock, FlockOperation::LockExclusive)
                    .map_err(|e| Error::io("store.lock", &lock_path, e.into()))?;
            }
            Err(e) => return Err(Error::io("store.lock", &lock_path, e.into())),
        }
        let store = Store { root, _lock: lock };
        store.remove_leftovers()?;
        Ok(store)
    }

    /// A new path in `STORE/tmp/` for a `kind` of work (`import`, `commit`):
    /// `KIND-PID-NANOS`, unique between processes by the pid and within one by the clock.
    /// Every store command empties `tmp/` under the store lock, so what a killed process
    /// left there goes with the next command.
    pub(crate) fn tmp_path(&self, kind: &str) -> PathBuf {
        let name = format!("{kind}-{}-{}", std::process::id(), since_epoch().as_nanos());
        self.root.join(TMP).join(name)
    }

    /// The store's root directory (absolute).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Remove what interrupted imports left in `tmp/`. Safe because we hold the lock: no
    /// import is in progress.
    fn remove_leftovers(&self) -> Result<()> {
        let tmp = self.root.join(TMP);
        let rd = std::fs::read_dir(&tmp).map_err(|e| Error::io("store.leftovers", &tmp, e))?;
        for ent in rd {
            let ent = ent.map_err(|e| Error::io("store.leftovers", &tmp, e))?;
            let p = ent.path();
            let r = if ent.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            r.map_err(|e| Error::io("store.remove_leftover", &p, e))?;
            tracing::warn!(path = %p.display(), "removed the leftover of an interrupted import");
            eprintln!(
                "verlay: removed the leftover of an interrupted import: {}",
                p.display()
            );
        }
        Ok(())
    }

    /// `STORE/layers/<chain-hex>`.
    pub fn layer_dir(&self, chain_id: &str) -> PathBuf {
        self.root.join(LAYERS).join(hex_of(chain_id))
    }

    /// `STORE/layers/<chain-hex>/diff`: the directory to pass in `lowerdir=`.
    pub fn diff_dir(&self, chain_id: &str) -> PathBuf {
        self.layer_dir(chain_id).join(DIFF)
    }

    /// Is this layer in the store?
    pub fn has_layer(&self, chain_id: &str) -> bool {
        self.layer_dir(chain_id).is_dir()
    }

    /// Find a layer by chain ID or a unique prefix of its hex.
    pub fn resolve(&self, id: &str) -> Result<String> {
        let want = hex_of(id).to_ascii_lowercase();
        let not_found = || {
            Error::usage(
                format!("layer \"{id}\""),
                format!("not in the store {}", self.root.display()),
                "see verlay layer ls --store DIR",
            )
        };
        if want.is_empty() || !want.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(not_found());
        }
        if want.len() == 64 {
            return if self.has_layer(&want) {
                Ok(format!("sha256:{want}"))
            } else {
                Err(not_found())
            };
        }
        let matches: Vec<String> = self
            .chain_ids()?
            .into_iter()
            .filter(|c| hex_of(c).starts_with(&want))
            .collect();
        match matches.len() {
            0 => Err(not_found()),
            1 => Ok(matches.into_iter().next().unwrap_or_default()),
            _ => Err(Error::usage(
                format!("layer \"{id}\""),
                "prefix matches several layers",
                "give more of the chain ID",
            )),
        }
    }

    /// Chain IDs of all published layers, sorted.
    pub fn chain_ids(&self) -> Result<Vec<String>> {
        chain_ids_at(&self.root)
    }

    /// The `layer.json` of a layer.
    pub fn record(&self, chain_id: &str) -> Result<serde_json::Value> {
        let p = self.layer_dir(chain_id).join(RECORD);
        let bytes = std::fs::read(&p).map_err(|e| Error::io("store.record", &p, e))?;
        serde_json::from_slice(&bytes).map_err(|e| {
            Error::usage(
                format!("layer record {}", p.display()),
                format!("not valid JSON: {e}"),
                "the store is damaged; remove the layer and import it again",
            )
        })
    }

    /// Every layer with its record and state.
    pub fn list(&self) -> Result<Vec<LayerInfo>> {
        let mut out = Vec::new();
        for chain in self.chain_ids()? {
            let dir = self.layer_dir(&chain);
            let record = self.record(&chain).ok();
            let state = if record.is_none() {
                "bad layer.json"
            } else if !dir.join(DIFF).is_dir() {
                "missing diff"
            } else if !manifest_path(&dir.join(DIFF)).is_file() {
                "missing manifest"
            } else {
                "ok"
            };
            out.push(LayerInfo {
                chain_id: chain,
                record,
                state,
            });
        }
        Ok(out)
    }

    /// Import one layer tarball (tar, gzip or zstd) read from `src`.
    pub fn import_layer(&self, src: &mut (dyn Read + Send), opts: &ImportOptions) -> Result<Imported> {
        let parent = match &opts.parent {
            Some(p) => {
                let p = parse_digest(p, "--parent")?;
                if !self.has_layer(&p) {
                    return Err(Error::usage(
                        format!("--parent {p}"),
                        format!("no such layer in the store {}", self.root.display()),
                        "import the parent layer first",
                    ));
                }
                Some(p)
            }
            None => None,
        };
        let want_diff = opts
            .diff_id
            .as_deref()
            .map(|d| parse_digest(d, "--diff-id"))
            .transpose()?;
        if let Some(d) = &want_diff {
            let chain = chain_id(parent.as_deref(), d);
            if self.has_layer(&chain) {
                return Ok(Imported {
                    chain_id: chain,
                    new: false,
                });
            }
        }
        let tmp = self.tmp_path("import");
        std::fs::create_dir(&tmp).map_err(|e| Error::io("import.mkdir_tmp", &tmp, e))?;
        let r = self.import_into(&tmp, src, opts, parent.as_deref(), want_diff.as_deref());
        if !matches!(&r, Ok(i) if i.new) {
            if let Err(e) = std::fs::remove_dir_all(&tmp) {
                tracing::warn!(path = %tmp.display(), error = %e, "could not remove a failed import");
            }
        }
        r.map_err(|e| {
            if is_disk_full(&e) {
                Error::usage(
                    format!("layer import into {}", self.root.display()),
                    format!("disk full ({e})"),
                    "free space on that filesystem or use a --store on a larger one; nothing was published",
                )
            } else {
                e
            }
        })
    }

    /// Import into `tmp` and publish it, step by step (`import.unpack`, `import.fsync`,
    /// `import.seal`, `import.record`, `import.publish`; the crash points are named after them).
    fn import_into(
        &self,
        tmp: &Path,
        src: &mut (dyn Read + Send),
        opts: &ImportOptions,
        parent: Option<&str>,
        want_diff: Option<&str>,
    ) -> Result<Imported> {
        let diff = tmp.join(DIFF);
        std::fs::create_dir(&diff).map_err(|e| Error::io("import.mkdir_diff", &diff, e))?;
        // Opened before anything is written: syncfs on it reports every writeback error since.
        let diff_fd: OwnedFd = rustix::fs::open(
            &diff,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io("import.open_diff", &diff, e.into()))?;
        let source = opts.source.as_str();
        let started = std::time::Instant::now();

        // step import.unpack: one pass over the stream, hashing blob and tar as we go.
        let mut blob = Tally::new();
        let mut tar_tally = Tally::new();
        let stats = unpack_stream(&diff, src, source, &mut blob, &mut tar_tally)?;
        let diff_id = tar_tally.digest();
        tracing::debug!(
            step = "import.unpack",
            bytes = tar_tally.bytes,
            entries = stats.entries,
            "unpacked"
        );
        check_digests(source, want_diff, &diff_id, opts.blob_digest.as_deref(), &blob)?;
        let chain = chain_id(parent, &diff_id);
        if self.has_layer(&chain) {
            return Ok(Imported {
                chain_id: chain,
                new: false,
            });
        }

        crash_point("import.unpack");
        // step import.fsync: one syncfs writes back every file and directory of the layer
        // (data, inodes, dir entries) and reports any writeback error on the filesystem since
        // `diff_fd` was opened, i.e. since before the first byte was unpacked (Linux >= 5.8
        // reports them through the superblock's errseq). An fsync per object gives the same
        // durability at the price of one device cache flush each: 30,000 files cost ~13 s
        // more here. --fsync-each keeps that, for kernels whose syncfs does not report errors.
        rustix::fs::syncfs(&diff_fd).map_err(|e| Error::io("import.syncfs", &diff, e.into()))?;
        if opts.fsync_each {
            unpack::fsync_tree(&diff_fd, &mut PathBuf::new())?;
        }
        drop(diff_fd);
        crash_point("import.fsync");

        // step import.seal: the manifest, written and fsynced beside the layer dir.
        let manifest_digest = seal_layer(&diff)?;
        crash_point("import.seal");

        // step import.record
        let record = serde_json::json!({
            "version": RECORD_VERSION,
            "chain_id": chain,
            "diff_id": diff_id,
            "parent": parent,
            "size": stats.bytes,
            "tar_size": tar_tally.bytes,
            "entries": stats.entries,
            "manifest_digest": manifest_digest,
            "blob_digest": blob.digest(),
            "created": rfc3339(since_epoch().as_secs() as i64),
        });
        write_record(&tmp.join(RECORD), &record)?;
        fsync_path(tmp, "import.fsync_tmp")?;
        crash_point("import.record");

        // step import.publish: one rename, then make it durable.
        let dest = self.layer_dir(&chain);
        std::fs::rename(tmp, &dest).map_err(|e| Error::io("import.publish", &dest, e))?;
        crash_point("import.publish");
        fsync_path(&self.root.join(LAYERS), "import.fsync_layers")?;
        tracing::info!(
            layer = %chain,
            bytes = tar_tally.bytes,
            entries = stats.entries,
            secs = started.elapsed().as_secs_f64(),
            "layer imported"
        );
        Ok(Imported {
            chain_id: chain,
            new: true,
        })
    }
}

/// Step import.unpack: decompress `src` (gzip, zstd or none) and unpack it into `diff`,
/// tallying the blob and the tar stream. Reading, decompressing and hashing run on their own
/// thread, overlapping the filesystem work of the unpack (a third of the CPU time of an
/// import).
fn unpack_stream(
    diff: &Path,
    src: &mut (dyn Read + Send),
    source: &str,
    blob: &mut Tally,
    tar_tally: &mut Tally,
) -> Result<unpack::Unpacked> {
    let raw = HashReader::new(src, blob);
    let mut raw = BufReader::with_capacity(STREAM_BUF, raw);
    let magic = raw
        .fill_buf()
        .map_err(|e| Error::io("import.read", PathBuf::from(source), e))?
        .to_vec();
    let decoded: Box<dyn Read + Send + '_> = if magic.starts_with(GZIP_MAGIC) {
        Box::new(flate2::bufread::MultiGzDecoder::new(raw))
    } else if magic.starts_with(ZSTD_MAGIC) {
        Box::new(
            zstd::stream::read::Decoder::with_buffer(raw)
                .map_err(|e| unpack::Unpacker::malformed(source, e))?,
        )
    } else if magic.starts_with(XZ_MAGIC) || magic.starts_with(BZIP2_MAGIC) {
        return Err(Error::usage(
            format!("layer tarball {source}"),
            "xz and bzip2 compression are not supported",
            "decompress it first (or recompress with gzip or zstd)",
        ));
    } else {
        Box::new(raw)
    };
    std::thread::scope(|scope| -> Result<unpack::Unpacked> {
        let (tx, rx) = std::sync::mpsc::sync_channel(PIPELINE_DEPTH);
        scope.spawn(move || pump(HashReader::new(decoded, tar_tally), tx));
        let stream = unpack::HeaderBudget::new(ChannelReader {
            rx,
            chunk: Vec::new(),
            pos: 0,
            total: 0,
        });
        let budget = stream.state();
        let mut archive = tar::Archive::new(stream);
        let mut unpacker = unpack::Unpacker::new(diff, source)?;
        let end = unpacker.unpack(&mut archive, &budget)?;
        // The diffID covers the whole uncompressed stream, padding included.
        let mut rest = archive.into_inner().into_inner();
        io::copy(&mut rest, &mut io::sink()).map_err(|e| unpack::Unpacker::malformed(source, e))?;
        // A tar ends with zero blocks; a stream that stops right after an entry was cut.
        if rest.total < end + 512 {
            return Err(unpack::Unpacker::malformed(
                source,
                "no end-of-archive marker (the tarball was cut short)",
            ));
        }
        Ok(unpacker.stats())
    })
}

/// The diffID and blob digest the caller expects, against what the streams hashed to.
fn check_digests(
    source: &str,
    want_diff: Option<&str>,
    diff_id: &str,
    want_blob: Option<&str>,
    blob: &Tally,
) -> Result<()> {
    if let Some(want) = want_diff {
        if want != diff_id {
            return Err(Error::usage(
                format!("layer tarball {source}"),
                format!("diffID mismatch: expected {want}, the tar stream hashes to {diff_id}"),
                "nothing was published; check --diff-id or fetch the layer again",
            ));
        }
    }
    if let Some(want) = want_blob {
        let got = blob.digest();
        if want != got {
            return Err(Error::usage(
                format!("layer blob {source}"),
                format!("digest mismatch: expected {want}, the blob hashes to {got}"),
                "nothing was published; the image is damaged, fetch it again",
            ));
        }
    }
    Ok(())
}

/// Step import.record: the layer's record, written and fsynced.
fn write_record(rec_path: &Path, record: &serde_json::Value) -> Result<()> {
    let mut text = serde_json::to_vec_pretty(record)
        .map_err(|e| Error::io("import.record", rec_path, io::Error::other(e)))?;
    text.push(b'\n');
    let mut f = File::create(rec_path).map_err(|e| Error::io("import.record", rec_path, e))?;
    io::Write::write_all(&mut f, &text).map_err(|e| Error::io("import.record", rec_path, e))?;
    f.sync_all()
        .map_err(|e| Error::io("import.record_fsync", rec_path, e))
}

/// Where the manifest of a layer directory lives.
fn manifest_path(diff: &Path) -> PathBuf {
    crate::lower::manifest::manifest_path(diff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_id_matches_docker() {
        let a = "sha256:".to_string() + &"a".repeat(64);
        let b = "sha256:".to_string() + &"b".repeat(64);
        assert_eq!(chain_id(None, &a), a);
        assert_eq!(
            chain_id(Some(&a), &b),
            sha256_digest(format!("{a} {b}").as_bytes())
        );
    }

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
