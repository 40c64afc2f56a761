//! The layer manifest: what a lower layer must hold, entry by entry, and the sha256 of every
//! chunk (4 KiB as written now; 64 KiB in older manifests) of every regular file. Its own
//! sha256 is the layer's verity digest.
//!
//! Owns the on-disk format (byte by byte in `docs/layer-format.md`): [`build`] walks a layer
//! and writes it, [`Manifest`] reads it through an mmap without parsing it up front (the
//! entries are fixed-size records sorted by (parent path, name), so the sorted table *is* the
//! index), and [`scrub`] checks a whole layer against it. The lazy per-read check of a mount
//! lives in `verify.rs`. Nothing here ever writes inside a layer directory: the manifest lives
//! beside it (`DIR.verlay-manifest`).
//!
//! Every offset read from a manifest is bounds-checked; a damaged manifest gives
//! [`Error::Corrupt`], never a panic or an out-of-bounds read.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;

use rustix::fs::{OFlags, Stat};
use sha2::{Digest, Sha256};

use crate::digest::{hex, sha256_digest as sha256_id};
use crate::error::{Error, Result};
use crate::layer::{Kind, LayerDir};

/// The manifest of `DIR` is the file `DIR.verlay-manifest` beside it.
pub const MANIFEST_SUFFIX: &str = ".verlay-manifest";
/// Size of a content chunk in the manifests this verlay writes: each chunk has its own
/// sha256, so a read verifies only the chunks it touches. 4 KiB, the page size, so a random
/// 4 KiB read reads and hashes nothing it was not asked for; the digests cost 32 bytes per
/// 4 KiB (0.8 % of the layer, as for fs-verity's leaves).
pub const CHUNK_SIZE: u64 = 4096;
/// The chunk size of manifests without [`INCOMPAT_CHUNK_SIZE`] (the first format): still read.
pub const LEGACY_CHUNK_SIZE: u64 = 64 * 1024;
/// Smallest and largest chunk size a manifest may declare (powers of two in between).
pub const MIN_CHUNK_SIZE: u64 = 4096;
/// See [`MIN_CHUNK_SIZE`].
pub const MAX_CHUNK_SIZE: u64 = 1024 * 1024;
/// Incompat feature: the header's `chunk_size` is honoured (a power of two from
/// [`MIN_CHUNK_SIZE`] to [`MAX_CHUNK_SIZE`]). Without it, chunks are [`LEGACY_CHUNK_SIZE`].
/// Incompat because a reader that assumed 64 KiB would check the wrong bytes against each digest.
pub const INCOMPAT_CHUNK_SIZE: u32 = 0x1;
/// A chunk size a manifest may declare: a power of two from [`MIN_CHUNK_SIZE`] to
/// [`MAX_CHUNK_SIZE`].
pub fn valid_chunk_size(n: u64) -> bool {
    n.is_power_of_two() && (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&n)
}

/// How much of a file is read at once to hash it (many chunks per read).
const HASH_BLOCK: usize = 1024 * 1024;

/// First 8 bytes of every manifest.
pub const MAGIC: [u8; 8] = *b"VERLAYM\0";
/// Major format version. Readers refuse any other; additions within a version use the flags.
pub const VERSION: u32 = 1;
/// Compat features this reader knows. Unknown compat bits are ignored.
pub const COMPAT_KNOWN: u32 = 0;
/// Read-only-compat features this reader knows. Unknown ones still allow reading (a writer
/// that rewrote the file would drop them, and nothing here rewrites a manifest in place).
pub const RO_COMPAT_KNOWN: u32 = 0;
/// Incompat features this reader knows. An unknown one refuses the open: the file would be
/// misread.
pub const INCOMPAT_KNOWN: u32 = INCOMPAT_CHUNK_SIZE;

/// Size of the header written by this version; readers accept a larger `header_size`.
const HEADER_SIZE: usize = 128;
/// Size of an entry record written by this version; readers accept larger records and read
/// the first `ENTRY_SIZE` bytes of each (room for compat fields).
const ENTRY_SIZE: usize = 80;
/// An xattr record: name ref + value ref into the string table.
const XATTR_SIZE: usize = 16;
/// A sha256.
const DIGEST_SIZE: usize = 32;
/// The file ends with the sha256 of every byte before it (self-check for sealed layers that
/// have no external record of the digest).
const TRAILER_SIZE: usize = 32;

/// Header field offsets (all little-endian).
mod hdr {
    pub const MAGIC: usize = 0; // [u8; 8]
    pub const VERSION: usize = 8; // u32
    pub const HEADER_SIZE: usize = 12; // u32
    pub const COMPAT: usize = 16; // u32
    pub const RO_COMPAT: usize = 20; // u32
    pub const INCOMPAT: usize = 24; // u32
    pub const CHUNK_SIZE: usize = 28; // u32
    pub const ENTRY_COUNT: usize = 32; // u64
    pub const ENTRY_SIZE: usize = 40; // u32, then 4 reserved bytes
    pub const ENTRIES_OFF: usize = 48; // u64
    pub const XATTRS_OFF: usize = 56; // u64
    pub const XATTR_COUNT: usize = 64; // u64
    pub const STRINGS_OFF: usize = 72; // u64
    pub const STRINGS_LEN: usize = 80; // u64
    pub const DIGESTS_OFF: usize = 88; // u64
    pub const DIGEST_COUNT: usize = 96; // u64
    pub const FILE_LEN: usize = 104; // u64, then reserved zeros up to 128
}

/// Entry record field offsets (all little-endian). String refs are (offset, length) into
/// the string table.
mod rec {
    pub const PARENT: usize = 0; // u32 off, u32 len: parent's path, "" for the root's children
    pub const NAME: usize = 8; // u32 off, u32 len: "" only for the root itself
    pub const TARGET: usize = 16; // u32 off, u32 len: symlink target, else 0/0
    pub const KIND: usize = 24; // u8, then 3 reserved bytes
    pub const PERM: usize = 28; // u32: st_mode & 0o7777
    pub const UID: usize = 32; // u32
    pub const GID: usize = 36; // u32
    pub const SIZE: usize = 40; // u64
    pub const RDEV: usize = 48; // u64
    pub const LINK_GROUP: usize = 56; // u32
    pub const XATTR_COUNT: usize = 60; // u32
    pub const XATTR_FIRST: usize = 64; // u32 index into the xattr table, then 4 reserved bytes
    pub const CHUNK_FIRST: usize = 72; // u64 index into the digest table
}

/// The manifest path of a layer directory: `DIR.verlay-manifest`, beside it, never inside the
/// layer (so it is never part of the merged view, and sealing does not change the layer).
pub fn manifest_path(layer_dir: &Path) -> PathBuf {
    let owned;
    let dir = if layer_dir.file_name().is_none() {
        // ".", "..", "dir/..": the name is only known after resolving.
        owned = std::fs::canonicalize(layer_dir).unwrap_or_else(|_| layer_dir.to_path_buf());
        owned.as_path()
    } else {
        layer_dir
    };
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(MANIFEST_SUFFIX);
    dir.with_file_name(name)
}

/// One entry of a layer as the manifest records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestEntry {
    /// relative to the layer root; "" is the root itself
    pub path: PathBuf,
    /// file type
    pub kind: Kind,
    /// st_mode & 0o7777
    pub perm: u32,
    /// owner
    pub uid: u32,
    /// group
    pub gid: u32,
    /// regular files; 0 otherwise
    pub size: u64,
    /// char/block devices (a whiteout is Char with rdev 0)
    pub rdev: u64,
    /// symlinks
    pub target: Option<OsString>,
    /// all xattrs, sorted by name (incl. trusted.overlay.opaque etc.)
    pub xattrs: Vec<(OsString, Vec<u8>)>,
    /// 0 = not hard-linked; entries sharing an inode share a non-zero group
    pub link_group: u32,
    /// sha256 of each chunk of a regular file (last one short); empty for an empty file, and
    /// for entries read with [`Manifest::lookup_meta`] (see `chunk_first`)
    pub chunks: Vec<[u8; 32]>,
    /// index of the file's first digest in the manifest's digest table (see
    /// [`Manifest::chunk_digest`]); 0 for an entry not read from a manifest
    pub chunk_first: u64,
}

/// Number of chunks of a regular file of `size` bytes.
pub fn chunk_count(size: u64, chunk_size: u64) -> u64 {
    size.div_ceil(chunk_size)
}

/// The sha256 of each `chunk_size` piece of `data` (the last one may be short).
pub fn chunk_digests(data: &[u8], chunk_size: u64) -> impl Iterator<Item = [u8; 32]> + '_ {
    data.chunks(chunk_size as usize).map(chunk_digest)
}

/// sha256 of one chunk.
pub fn chunk_digest(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

fn kind_code(k: Kind) -> u8 {
    match k {
        Kind::File => 1,
        Kind::Dir => 2,
        Kind::Symlink => 3,
        Kind::Fifo => 4,
        Kind::Char => 5,
        Kind::Block => 6,
        Kind::Socket => 7,
    }
}

fn kind_from_code(c: u8) -> Option<Kind> {
    Some(match c {
        1 => Kind::File,
        2 => Kind::Dir,
        3 => Kind::Symlink,
        4 => Kind::Fifo,
        5 => Kind::Char,
        6 => Kind::Block,
        7 => Kind::Socket,
        _ => return None,
    })
}

fn kind_name(k: Kind, rdev: u64) -> &'static str {
    match k {
        Kind::File => "regular file",
        Kind::Dir => "directory",
        Kind::Symlink => "symlink",
        Kind::Fifo => "fifo",
        Kind::Char if rdev == 0 => "whiteout",
        Kind::Char => "char device",
        Kind::Block => "block device",
        Kind::Socket => "socket",
    }
}

/// Little-endian u32 at a fixed offset of a record. Callers slice `rec` to at least the
/// record size first and pass constant offsets below it, so the range is always in bounds.
fn le_u32(rec: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&rec[at..at + 4]);
    u32::from_le_bytes(b)
}

/// Little-endian u64; same contract as [`le_u32`].
fn le_u64(rec: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&rec[at..at + 8]);
    u64::from_le_bytes(b)
}

fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(buf: &mut [u8], at: usize, v: u64) {
    buf[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// The bytes of a manifest: a read-only map of the file, or bytes in memory.
enum Bytes {
    Map(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Map(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// A (start, length) section of the file, checked to lie inside the body.
#[derive(Clone, Copy, Debug)]
struct Section {
    off: usize,
    len: usize,
}

/// An open layer manifest. Opening reads the header only; entries are decoded on demand.
/// `Send + Sync`: it is read-only.
pub struct Manifest {
    bytes: Bytes,
    /// the manifest file, for messages
    file: PathBuf,
    /// the layer it describes, for messages
    layer: String,
    count: usize,
    entry_size: usize,
    entries: Section,
    xattrs: Section,
    strings: Section,
    digests: Section,
    ro_compat: u32,
    chunk_size: u64,
    digest: OnceLock<String>,
}

impl fmt::Debug for Manifest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Manifest")
            .field("file", &self.file)
            .field("entries", &self.count)
            .finish_non_exhaustive()
    }
}

/// The layer a manifest path belongs to (`/x/l.verlay-manifest` -> `/x/l`), for messages.
fn layer_of(file: &Path) -> String {
    let s = file.as_os_str().as_bytes();
    let layer = s.strip_suffix(MANIFEST_SUFFIX.as_bytes()).unwrap_or(s);
    Path::new(OsStr::from_bytes(layer)).display().to_string()
}

impl Manifest {
    /// Open and check the header (magic, version, incompat flags, section bounds). Reads no
    /// entry: the sorted entry table is searched in place.
    pub fn open(path: &Path) -> Result<Manifest> {
        let file = std::fs::File::open(path).map_err(|e| Error::io("open manifest", path, e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io("stat manifest", path, e))?
            .len();
        if len < (HEADER_SIZE + TRAILER_SIZE) as u64 {
            // Also keeps an empty file away from mmap, which refuses a zero length.
            return Err(corrupt_at(path, format!("{len} bytes, shorter than a header")));
        }
        let map = crate::sys::map_readonly(&file).map_err(|e| Error::io("mmap manifest", path, e))?;
        Manifest::parse(Bytes::Map(map), path)
    }

    /// The manifest of `layer_dir` (at [`manifest_path`]), or `None` when it has none.
    pub fn open_beside(layer_dir: &Path) -> Result<Option<Manifest>> {
        let p = manifest_path(layer_dir);
        match std::fs::symlink_metadata(&p) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("stat manifest", p, e)),
            Ok(_) => Manifest::open(&p).map(Some),
        }
    }

    /// A manifest held in memory (`file` names it in messages). Pure: no I/O.
    pub fn from_bytes(bytes: Vec<u8>, file: &Path) -> Result<Manifest> {
        Manifest::parse(Bytes::Owned(bytes), file)
    }

    fn parse(bytes: Bytes, file: &Path) -> Result<Manifest> {
        let b: &[u8] = &bytes;
        let bad = |what: String| corrupt_at(file, what);
        let Some(h) = b.get(..HEADER_SIZE) else {
            return Err(bad(format!("{} bytes, shorter than a header", b.len())));
        };
        if h[hdr::MAGIC..hdr::MAGIC + 8] != MAGIC {
            return Err(bad("bad magic: not a verlay manifest".into()));
        }
        let version = le_u32(h, hdr::VERSION);
        if version != VERSION {
            return Err(Error::usage(
                format!("manifest {}", file.display()),
                format!("format version {version}; this verlay reads version {VERSION}"),
                "use a newer verlay, or seal the layer again with this one",
            ));
        }
        let incompat = le_u32(h, hdr::INCOMPAT);
        if incompat & !INCOMPAT_KNOWN != 0 {
            return Err(Error::usage(
                format!("manifest {}", file.display()),
                format!(
                    "uses incompatible features {:#x} that this verlay does not know",
                    incompat & !INCOMPAT_KNOWN
                ),
                "use a newer verlay, or seal the layer again with this one",
            ));
        }
        let chunk_size = u64::from(le_u32(h, hdr::CHUNK_SIZE));
        if incompat & INCOMPAT_CHUNK_SIZE == 0 {
            if chunk_size != LEGACY_CHUNK_SIZE {
                return Err(bad(format!(
                    "chunk size {chunk_size} without the chunk-size feature, which means {LEGACY_CHUNK_SIZE}"
                )));
            }
        } else if !valid_chunk_size(chunk_size) {
            return Err(bad(format!(
                "chunk size {chunk_size}: not a power of two from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE}"
            )));
        }
        let file_len = le_u64(h, hdr::FILE_LEN);
        if file_len != b.len() as u64 {
            return Err(bad(format!(
                "header says {file_len} bytes, the file has {}",
                b.len()
            )));
        }
        let header_size = le_u32(h, hdr::HEADER_SIZE) as usize;
        // The body: everything between the header and the trailer.
        let body_end = b.len() - TRAILER_SIZE;
        if header_size < HEADER_SIZE || header_size > body_end {
            return Err(bad(format!("header size {header_size} out of range")));
        }
        let entry_size = le_u32(h, hdr::ENTRY_SIZE) as usize;
        if entry_size < ENTRY_SIZE {
            return Err(bad(format!("entry record size {entry_size} < {ENTRY_SIZE}")));
        }
        let section = |name: &str, off_at: usize, count: u64, size: usize| -> Result<Section> {
            let off = le_u64(h, off_at);
            let len = count.checked_mul(size as u64);
            match len.and_then(|l| off.checked_add(l).map(|end| (l, end))) {
                Some((l, end)) if off >= header_size as u64 && end <= body_end as u64 => Ok(Section {
                    off: off as usize,
                    len: l as usize,
                }),
                _ => Err(bad(format!(
                    "{name} section ({count} x {size} bytes at {off}) outside the body \
                     ({header_size}..{body_end})"
                ))),
            }
        };
        let count = le_u64(h, hdr::ENTRY_COUNT);
        let entries = section("entry", hdr::ENTRIES_OFF, count, entry_size)?;
        let xattrs = section("xattr", hdr::XATTRS_OFF, le_u64(h, hdr::XATTR_COUNT), XATTR_SIZE)?;
        let strings = section("string", hdr::STRINGS_OFF, le_u64(h, hdr::STRINGS_LEN), 1)?;
        let digests = section(
            "digest",
            hdr::DIGESTS_OFF,
            le_u64(h, hdr::DIGEST_COUNT),
            DIGEST_SIZE,
        )?;
        let ro_compat = le_u32(h, hdr::RO_COMPAT);
        Ok(Manifest {
            file: file.to_path_buf(),
            layer: layer_of(file),
            // Fits: the section check bounded count * entry_size by the file length.
            count: count as usize,
            entry_size,
            entries,
            xattrs,
            strings,
            digests,
            ro_compat,
            chunk_size,
            digest: OnceLock::new(),
            bytes,
        })
    }

    /// "sha256:<hex>" of the whole manifest file: the layer's verity digest. Computed on the
    /// first call (it reads every byte), then remembered.
    pub fn digest(&self) -> String {
        self.digest.get_or_init(|| sha256_id(&self.bytes)).clone()
    }

    /// Bytes per content chunk: each chunk of a regular file has its own digest.
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// Digest number `index` of the digest table (an entry's chunk `i` is at
    /// `chunk_first + i`), read in place: opening a file need not copy its digests.
    pub fn chunk_digest(&self, index: u64) -> Result<[u8; 32]> {
        let total = (self.digests.len / DIGEST_SIZE) as u64;
        if index >= total {
            return Err(self.corrupt(format!("digest {index} past the digest table ({total})")));
        }
        // In range: index < total, and the section check bounded the table by the file.
        let at = self.digests.off + index as usize * DIGEST_SIZE;
        let mut d = [0u8; 32];
        d.copy_from_slice(&self.bytes[at..at + DIGEST_SIZE]);
        Ok(d)
    }

    /// The manifest file.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Read-only-compat feature bits this reader does not know (reading is still correct).
    pub fn unknown_ro_compat(&self) -> u32 {
        self.ro_compat & !RO_COMPAT_KNOWN
    }

    /// Number of entries (the root included).
    pub fn len(&self) -> usize {
        self.count
    }

    /// No entries at all (not even the root).
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn corrupt(&self, what: String) -> Error {
        corrupt_at(&self.file, what)
    }

    /// The record of entry `i`, `ENTRY_SIZE` bytes long.
    fn record(&self, i: usize) -> Result<&[u8]> {
        let start = i
            .checked_mul(self.entry_size)
            .and_then(|o| o.checked_add(self.entries.off));
        start
            .filter(|_| i < self.count)
            .and_then(|s| self.bytes.get(s..s + ENTRY_SIZE))
            .ok_or_else(|| self.corrupt(format!("entry {i} out of range ({} entries)", self.count)))
    }

    /// A string-table reference at `at` in `rec`.
    fn string(&self, rec: &[u8], at: usize, what: &str) -> Result<&[u8]> {
        let off = le_u32(rec, at) as usize;
        let len = le_u32(rec, at + 4) as usize;
        off.checked_add(len)
            .filter(|end| *end <= self.strings.len)
            .and_then(|_| {
                self.bytes
                    .get(self.strings.off + off..self.strings.off + off + len)
            })
            .ok_or_else(|| {
                self.corrupt(format!(
                    "{what} string at {off}+{len} past the string table ({} bytes)",
                    self.strings.len
                ))
            })
    }

    /// (parent, name) of entry `i`: the sort key.
    fn key(&self, i: usize) -> Result<(&[u8], &[u8])> {
        let r = self.record(i)?;
        Ok((
            self.string(r, rec::PARENT, "parent")?,
            self.string(r, rec::NAME, "name")?,
        ))
    }

    /// First index in `lo..hi` whose key is not `before` (keys are sorted, so `before` holds
    /// for a prefix). Binary search: O(log n) key reads.
    fn partition(
        &self,
        mut lo: usize,
        mut hi: usize,
        before: impl Fn(&[u8], &[u8]) -> bool,
    ) -> Result<usize> {
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let (p, n) = self.key(mid)?;
            if before(p, n) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        Ok(lo)
    }

    /// Look up one entry by its path relative to the layer root ("" is the root). `None`
    /// when the manifest does not list it (also for paths with `..` or a leading `/`, which
    /// no entry can have). O(log n).
    pub fn lookup(&self, rel: &Path) -> Result<Option<ManifestEntry>> {
        self.find(rel)?.map(|i| self.entry(i)).transpose()
    }

    /// [`Manifest::lookup`] without copying the chunk digests (`chunks` is empty; they are
    /// read in place with [`Manifest::chunk_digest`] from `chunk_first`). What a mount uses:
    /// a 1 GiB file has 256 Ki digests.
    pub fn lookup_meta(&self, rel: &Path) -> Result<Option<ManifestEntry>> {
        self.find(rel)?.map(|i| self.decode(i, false)).transpose()
    }

    /// Index of the entry for `rel`.
    fn find(&self, rel: &Path) -> Result<Option<usize>> {
        let Some((parent, name)) = split_key(rel) else {
            return Ok(None);
        };
        let key = (parent.as_slice(), name);
        let i = self.partition(0, self.count, |p, n| (p, n) < key)?;
        if i < self.count && self.key(i)? == key {
            return Ok(Some(i));
        }
        Ok(None)
    }

    /// Index range of the direct children of `dir` (empty when it has none or is not listed).
    fn child_range(&self, dir: &Path) -> Result<std::ops::Range<usize>> {
        let Some(d) = path_bytes(dir) else {
            return Ok(0..0);
        };
        let d = d.as_slice();
        // The root's own key is ("", ""); children have a non-empty name, so they start
        // after (dir, "").
        let lo = self.partition(0, self.count, |p, n| (p, n) <= (d, b"".as_slice()))?;
        let hi = self.partition(lo, self.count, |p, _| p <= d)?;
        Ok(lo..hi)
    }

    /// Direct children of a directory entry, sorted by name. O(log n + k).
    pub fn children(&self, dir: &Path) -> Result<Vec<ManifestEntry>> {
        self.child_range(dir)?.map(|i| self.entry(i)).collect()
    }

    /// [`Manifest::children`] without the chunk digests (as [`Manifest::lookup_meta`]).
    pub fn children_meta(&self, dir: &Path) -> Result<Vec<ManifestEntry>> {
        self.child_range(dir)?.map(|i| self.decode(i, false)).collect()
    }

    /// Names and types of the direct children of `dir`, read straight from their records
    /// (what a listing of a 50,000-entry directory needs, without decoding each entry).
    /// Each name and type code is checked as [`Manifest::entry`] checks them.
    pub fn child_kinds(&self, dir: &Path) -> Result<Vec<(OsString, Kind)>> {
        self.child_range(dir)?
            .map(|i| {
                let r = self.record(i)?;
                let name = self.string(r, rec::NAME, "name")?;
                if !valid_name(name) {
                    return Err(self.corrupt(format!("entry {i}: invalid name {:?}", bstr(name))));
                }
                let code = r[rec::KIND];
                let kind = kind_from_code(code)
                    .ok_or_else(|| self.corrupt(format!("entry {i}: unknown type code {code}")))?;
                Ok((OsStr::from_bytes(name).to_os_string(), kind))
            })
            .collect()
    }

    /// Every entry, sorted by (parent path, name): a directory always comes before what it holds.
    pub fn iter(&self) -> impl Iterator<Item = Result<ManifestEntry>> + '_ {
        (0..self.count).map(move |i| self.entry(i))
    }

    /// Decode entry `i`, checking every reference.
    pub fn entry(&self, i: usize) -> Result<ManifestEntry> {
        self.decode(i, true)
    }

    /// Decode entry `i`; its digests are copied only `with_digests` (their range is checked
    /// either way).
    fn decode(&self, i: usize, with_digests: bool) -> Result<ManifestEntry> {
        let r = self.record(i)?;
        let parent = self.string(r, rec::PARENT, "parent")?;
        let name = self.string(r, rec::NAME, "name")?;
        let path = entry_path(parent, name).ok_or_else(|| {
            self.corrupt(format!(
                "entry {i}: invalid path {:?} / {:?}",
                bstr(parent),
                bstr(name)
            ))
        })?;
        let bad = |what: String| self.corrupt(format!("entry {i} ({}): {what}", path.display()));
        let code = r[rec::KIND];
        let kind = kind_from_code(code).ok_or_else(|| bad(format!("unknown type code {code}")))?;
        let perm = le_u32(r, rec::PERM);
        if perm & !0o7777 != 0 {
            return Err(bad(format!("mode {perm:#o} has bits beyond 0o7777")));
        }
        let size = le_u64(r, rec::SIZE);
        if kind != Kind::File && size != 0 {
            return Err(bad(format!("size {size} on a {}", kind_name(kind, 1))));
        }
        let target_bytes = self.string(r, rec::TARGET, "symlink target")?;
        let target = match kind {
            Kind::Symlink => Some(OsStr::from_bytes(target_bytes).to_os_string()),
            _ if !target_bytes.is_empty() => return Err(bad("symlink target on a non-symlink".into())),
            _ => None,
        };
        let xcount = le_u32(r, rec::XATTR_COUNT) as usize;
        let xfirst = le_u32(r, rec::XATTR_FIRST) as usize;
        let xattr_total = self.xattrs.len / XATTR_SIZE;
        if xfirst.checked_add(xcount).is_none_or(|end| end > xattr_total) {
            return Err(bad(format!(
                "xattrs {xfirst}+{xcount} past the xattr table ({xattr_total})"
            )));
        }
        let mut xattrs = Vec::with_capacity(xcount);
        for x in xfirst..xfirst + xcount {
            let at = self.xattrs.off + x * XATTR_SIZE;
            let xr = self
                .bytes
                .get(at..at + XATTR_SIZE)
                .ok_or_else(|| bad(format!("xattr {x} out of range")))?;
            let n = self.string(xr, 0, "xattr name")?;
            let v = self.string(xr, 8, "xattr value")?;
            xattrs.push((OsStr::from_bytes(n).to_os_string(), v.to_vec()));
        }
        let nchunks = if kind == Kind::File {
            chunk_count(size, self.chunk_size)
        } else {
            0
        };
        let first = le_u64(r, rec::CHUNK_FIRST);
        let digest_total = (self.digests.len / DIGEST_SIZE) as u64;
        if first.checked_add(nchunks).is_none_or(|end| end > digest_total) {
            return Err(bad(format!(
                "{nchunks} chunk digests from {first} past the digest table ({digest_total})"
            )));
        }
        // In range: first + nchunks <= digest_total, which the section check bounded.
        let start = self.digests.off + first as usize * DIGEST_SIZE;
        let take = if with_digests { nchunks as usize } else { 0 };
        let table = &self.bytes[start..start + take * DIGEST_SIZE];
        let chunks = table
            .chunks_exact(DIGEST_SIZE)
            .map(|c| {
                let mut d = [0u8; 32];
                d.copy_from_slice(c);
                d
            })
            .collect();
        Ok(ManifestEntry {
            path,
            kind,
            perm,
            uid: le_u32(r, rec::UID),
            gid: le_u32(r, rec::GID),
            size,
            rdev: if matches!(kind, Kind::Char | Kind::Block) {
                le_u64(r, rec::RDEV)
            } else {
                0
            },
            target,
            xattrs,
            link_group: le_u32(r, rec::LINK_GROUP),
            chunks,
            chunk_first: if kind == Kind::File { first } else { 0 },
        })
    }

    /// Full check of the manifest itself: the trailing sha256 matches, every entry decodes,
    /// keys are strictly sorted, the root comes first and every other entry's parent is a
    /// listed directory. Reads the whole file (scrub calls it; a mount does not).
    pub fn check(&self) -> Result<()> {
        let b: &[u8] = &self.bytes;
        let body = &b[..b.len() - TRAILER_SIZE];
        let want = &b[b.len() - TRAILER_SIZE..];
        let got = Sha256::digest(body);
        if got.as_slice() != want {
            return Err(Error::Corrupt {
                layer: self.layer.clone(),
                path: self.file.clone(),
                expected: format!("sha256:{}", hex(want)),
                actual: format!("sha256:{}", hex(&got)),
            });
        }
        if self.count == 0 {
            return Err(self.corrupt("no entries (not even the root)".into()));
        }
        let mut dirs: HashSet<Vec<u8>> = HashSet::new();
        let mut prev: Option<(&[u8], &[u8])> = None;
        for i in 0..self.count {
            let e = self.entry(i)?;
            let (p, n) = self.key(i)?;
            if i == 0 && (!p.is_empty() || !n.is_empty() || e.kind != Kind::Dir) {
                return Err(self.corrupt("the first entry is not the root directory".into()));
            }
            if let Some(prev) = prev {
                if prev >= (p, n) {
                    return Err(self.corrupt(format!("entry {i} ({}) is out of order", e.path.display())));
                }
            }
            if i > 0 && !dirs.contains(p) {
                return Err(self.corrupt(format!(
                    "entry {i} ({}): parent is not a listed directory",
                    e.path.display()
                )));
            }
            if e.kind == Kind::Dir {
                // Parents precede children in (parent, name) order, so one pass suffices.
                dirs.insert(e.path.as_os_str().as_bytes().to_vec());
            }
            prev = Some((p, n));
        }
        Ok(())
    }
}

fn corrupt_at(file: &Path, what: String) -> Error {
    Error::Corrupt {
        layer: layer_of(file),
        path: file.to_path_buf(),
        expected: "a well-formed verlay manifest".into(),
        actual: what,
    }
}

fn bstr(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Path bytes of a relative path with only normal components ("" or "." for the root).
fn path_bytes(rel: &Path) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    for c in rel.components() {
        match c {
            Component::Normal(n) => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(n.as_bytes());
            }
            Component::CurDir => {}
            Component::RootDir | Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// (parent bytes, name bytes) of a path; ("", "") for the root.
fn split_key(rel: &Path) -> Option<(Vec<u8>, &[u8])> {
    let full = path_bytes(rel)?;
    let name = rel.file_name().map(|n| n.as_bytes()).unwrap_or(b"");
    let parent = full[..full.len() - name.len()]
        .strip_suffix(b"/")
        .unwrap_or(b"")
        .to_vec();
    Some((parent, name))
}

/// A valid name: non-empty, no '/', not "." or "..".
fn valid_name(n: &[u8]) -> bool {
    !n.is_empty() && n != b"." && n != b".." && !n.contains(&b'/')
}

/// The entry path from its key, or `None` if the key could not come from a real tree (so a
/// damaged manifest can never make scrub or a mount look outside the layer).
fn entry_path(parent: &[u8], name: &[u8]) -> Option<PathBuf> {
    if name.is_empty() {
        return parent.is_empty().then(PathBuf::new);
    }
    if !valid_name(name) || !(parent.is_empty() || parent.split(|b| *b == b'/').all(valid_name)) {
        return None;
    }
    let mut p = parent.to_vec();
    if !p.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    Some(PathBuf::from(OsStr::from_bytes(&p)))
}

// ---------------------------------------------------------------------------------------
// Building

/// One entry found by the walk, before link groups are known.
struct Found {
    parent: Vec<u8>,
    name: Vec<u8>,
    entry: ManifestEntry,
    /// (st_dev, st_ino) of a non-directory with more than one link
    inode: Option<(u64, u64)>,
}

fn st_size(st: &Stat) -> u64 {
    u64::try_from(st.st_size).unwrap_or(0)
}

/// Hash a regular file chunk by chunk; an error if its size changed under us.
fn hash_file(layer: &LayerDir, rel: &Path, size: u64, chunk_size: u64) -> Result<Vec<[u8; 32]>> {
    // NONBLOCK: if a FIFO replaced the file since its lstat, open(2) must not wait for a
    // writer (the read then fails with EAGAIN). No effect on a regular file.
    let fd = layer
        .open_file(rel, OFlags::RDONLY | OFlags::NONBLOCK)
        .map_err(|e| Error::io("open", rel, std::io::Error::from_raw_os_error(e.errno())))?;
    let mut f = std::fs::File::from(fd);
    // Whole chunks per read (HASH_BLOCK and every chunk size are powers of two), and no
    // bigger buffer than the file needs: most files of a layer are small.
    let fits = size.div_ceil(chunk_size).max(1) * chunk_size;
    let mut buf = vec![0u8; (HASH_BLOCK as u64).max(chunk_size).min(fits) as usize];
    let mut out = Vec::with_capacity(chunk_count(size, chunk_size) as usize);
    let mut total = 0u64;
    loop {
        let n = read_full(&mut f, &mut buf).map_err(|e| Error::io("read", rel, e))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        // A file that keeps growing (a writer appending) would otherwise be read, and its
        // digests kept, for as long as it grows.
        if total > size {
            return Err(changed(layer, rel));
        }
        out.extend(chunk_digests(&buf[..n], chunk_size));
        if n < buf.len() {
            break;
        }
    }
    if total != size {
        return Err(changed(layer, rel));
    }
    Ok(out)
}

/// Read until `buf` is full or EOF; returns the bytes read.
fn read_full(f: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn changed(layer: &LayerDir, rel: &Path) -> Error {
    Error::usage(
        format!("layer {}: {}", layer.path.display(), show(rel)),
        "changed while the manifest was being built",
        "stop writers to the layer and seal it again",
    )
}

fn io_err(op: &'static str, rel: &Path, e: Error) -> Error {
    match e {
        Error::Errno(n) => Error::io(op, rel, std::io::Error::from_raw_os_error(n)),
        e => e,
    }
}

/// Sorted xattrs of an object.
fn read_xattrs(layer: &LayerDir, rel: &Path) -> Result<Vec<(OsString, Vec<u8>)>> {
    let mut names = layer.list_xattr(rel).map_err(|e| io_err("listxattr", rel, e))?;
    names.sort();
    let mut out = Vec::with_capacity(names.len());
    for n in names {
        if let Some(v) = layer.get_xattr(rel, &n).map_err(|e| io_err("getxattr", rel, e))? {
            out.push((n, v));
        }
    }
    Ok(out)
}

/// Walk a layer directory (not following symlinks, not crossing filesystems) and build the
/// manifest bytes with [`CHUNK_SIZE`] chunks; deterministic (same tree => same bytes => same
/// digest). Times are not recorded, so touching a file does not change the digest.
pub fn build(layer_dir: &Path) -> Result<Vec<u8>> {
    build_with_chunk_size(layer_dir, CHUNK_SIZE)
}

/// [`build`] with another chunk size: [`LEGACY_CHUNK_SIZE`] gives exactly the first format
/// (no feature flag), so an older layer's digest can be reproduced.
pub fn build_with_chunk_size(layer_dir: &Path, chunk_size: u64) -> Result<Vec<u8>> {
    if !valid_chunk_size(chunk_size) {
        return Err(Error::usage(
            "verlay layer seal",
            format!(
                "chunk size {chunk_size} is not a power of two from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE}"
            ),
            "use the default",
        ));
    }
    let layer = LayerDir::open(layer_dir, 0, "seal".into())?;
    let mut found = Vec::new();
    // Content of hard-linked files is hashed once per inode.
    let mut hashed: HashMap<(u64, u64), Vec<[u8; 32]>> = HashMap::new();
    let mut dirs_seen = HashSet::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let st = layer
            .stat(&rel)
            .map_err(|e| io_err("lstat", &rel, e))?
            .ok_or_else(|| changed(&layer, &rel))?;
        let kind = Kind::from_mode(st.st_mode);
        let ino = (st.st_dev, st.st_ino);
        let inode = (kind != Kind::Dir && st.st_nlink > 1).then_some(ino);
        let mut entry = ManifestEntry {
            path: rel.clone(),
            kind,
            perm: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            size: 0,
            rdev: 0,
            target: None,
            xattrs: read_xattrs(&layer, &rel)?,
            link_group: 0,
            chunks: Vec::new(),
            chunk_first: 0,
        };
        match kind {
            Kind::Dir => {
                // A directory is reached once unless a bind mount puts a tree inside itself
                // (same st_dev), whose walk would never end.
                if st.st_dev != layer.dev || !dirs_seen.insert(st.st_ino) {
                    return Err(Error::usage(
                        format!("layer {}: {}", layer.path.display(), show(&rel)),
                        "is a mount point; a layer must be one filesystem",
                        "unmount it, or copy the layer without it",
                    ));
                }
                let mut names: Vec<OsString> = layer
                    .read_dir(&rel)
                    .map_err(|e| io_err("readdir", &rel, e))?
                    .into_iter()
                    .map(|e| e.name)
                    .collect();
                // Reverse, so that popping visits in name order (the order does not change
                // the bytes, which are sorted below, but keeps errors reproducible).
                names.sort_by(|a, b| b.cmp(a));
                stack.extend(names.into_iter().map(|n| rel.join(n)));
            }
            Kind::File => {
                entry.size = st_size(&st);
                entry.chunks = match inode.and_then(|i| hashed.get(&i)) {
                    Some(c) => c.clone(),
                    None => {
                        let c = hash_file(&layer, &rel, entry.size, chunk_size)?;
                        if let Some(i) = inode {
                            hashed.insert(i, c.clone());
                        }
                        c
                    }
                };
            }
            Kind::Symlink => {
                entry.target = Some(layer.readlink(&rel).map_err(|e| io_err("readlink", &rel, e))?);
            }
            Kind::Char | Kind::Block => entry.rdev = st.st_rdev,
            Kind::Fifo | Kind::Socket => {}
        }
        let (parent, name) = split_key(&rel).ok_or_else(|| changed(&layer, &rel))?;
        found.push(Found {
            name: name.to_vec(),
            parent,
            entry,
            inode,
        });
    }
    found.sort_by(|a, b| (&a.parent, &a.name).cmp(&(&b.parent, &b.name)));
    assign_link_groups(&mut found);
    encode(&found, chunk_size)
}

/// Link groups numbered 1, 2, ... in entry order, only for inodes that appear at least twice
/// in this layer (a link to outside the layer, as containers/storage makes between layers,
/// is not a link within the layer).
fn assign_link_groups(found: &mut [Found]) {
    let mut seen: HashMap<(u64, u64), u32> = HashMap::new();
    for f in found.iter() {
        if let Some(i) = f.inode {
            *seen.entry(i).or_insert(0) += 1;
        }
    }
    let mut groups: HashMap<(u64, u64), u32> = HashMap::new();
    let mut next = 1;
    for f in found.iter_mut() {
        if let Some(i) = f.inode.filter(|i| seen.get(i).copied().unwrap_or(0) > 1) {
            f.entry.link_group = *groups.entry(i).or_insert_with(|| {
                next += 1;
                next - 1
            });
        }
    }
}

/// The tables being written; strings are deduplicated (parents repeat for every sibling).
#[derive(Default)]
struct Tables {
    strings: Vec<u8>,
    interned: HashMap<Vec<u8>, u32>,
    xattrs: Vec<u8>,
    digests: Vec<u8>,
}

fn too_big(what: &str) -> Error {
    Error::usage(
        "verlay layer seal",
        format!("the layer's {what} exceed the format's 4 GiB limit"),
        "split the layer",
    )
}

impl Tables {
    /// Put a string ref (offset, length) into `buf` at `at`.
    fn string(&mut self, buf: &mut [u8], at: usize, s: &[u8]) -> Result<()> {
        let len = u32::try_from(s.len()).map_err(|_| too_big("strings"))?;
        let off = if s.is_empty() {
            0
        } else if let Some(off) = self.interned.get(s) {
            *off
        } else {
            let off = u32::try_from(self.strings.len()).map_err(|_| too_big("strings"))?;
            u32::try_from(self.strings.len() + s.len()).map_err(|_| too_big("strings"))?;
            self.strings.extend_from_slice(s);
            self.interned.insert(s.to_vec(), off);
            off
        };
        put_u32(buf, at, off);
        put_u32(buf, at + 4, len);
        Ok(())
    }
}

fn encode(found: &[Found], chunk_size: u64) -> Result<Vec<u8>> {
    let mut t = Tables::default();
    let mut entries = vec![0u8; found.len() * ENTRY_SIZE];
    for (f, r) in found.iter().zip(entries.chunks_exact_mut(ENTRY_SIZE)) {
        let e = &f.entry;
        t.string(r, rec::PARENT, &f.parent)?;
        t.string(r, rec::NAME, &f.name)?;
        let target = e.target.as_deref().map(|t| t.as_bytes()).unwrap_or(b"");
        t.string(r, rec::TARGET, target)?;
        r[rec::KIND] = kind_code(e.kind);
        put_u32(r, rec::PERM, e.perm);
        put_u32(r, rec::UID, e.uid);
        put_u32(r, rec::GID, e.gid);
        put_u64(r, rec::SIZE, e.size);
        put_u64(r, rec::RDEV, e.rdev);
        put_u32(r, rec::LINK_GROUP, e.link_group);
        let xfirst = u32::try_from(t.xattrs.len() / XATTR_SIZE).map_err(|_| too_big("xattrs"))?;
        put_u32(r, rec::XATTR_COUNT, e.xattrs.len() as u32);
        put_u32(r, rec::XATTR_FIRST, xfirst);
        for (n, v) in &e.xattrs {
            let mut x = [0u8; XATTR_SIZE];
            t.string(&mut x, 0, n.as_bytes())?;
            t.string(&mut x, 8, v)?;
            t.xattrs.extend_from_slice(&x);
        }
        put_u64(r, rec::CHUNK_FIRST, (t.digests.len() / DIGEST_SIZE) as u64);
        for c in &e.chunks {
            t.digests.extend_from_slice(c);
        }
    }
    let entries_off = HEADER_SIZE;
    let xattrs_off = entries_off + entries.len();
    let strings_off = xattrs_off + t.xattrs.len();
    let digests_off = strings_off + t.strings.len();
    let total = digests_off + t.digests.len() + TRAILER_SIZE;
    let mut out = vec![0u8; HEADER_SIZE];
    out[hdr::MAGIC..hdr::MAGIC + 8].copy_from_slice(&MAGIC);
    put_u32(&mut out, hdr::VERSION, VERSION);
    put_u32(&mut out, hdr::HEADER_SIZE, HEADER_SIZE as u32);
    put_u32(&mut out, hdr::COMPAT, 0);
    put_u32(&mut out, hdr::RO_COMPAT, 0);
    let incompat = if chunk_size == LEGACY_CHUNK_SIZE {
        0
    } else {
        INCOMPAT_CHUNK_SIZE
    };
    put_u32(&mut out, hdr::INCOMPAT, incompat);
    // Fits: at most MAX_CHUNK_SIZE (build_with_chunk_size checked it).
    put_u32(&mut out, hdr::CHUNK_SIZE, chunk_size as u32);
    put_u64(&mut out, hdr::ENTRY_COUNT, found.len() as u64);
    put_u32(&mut out, hdr::ENTRY_SIZE, ENTRY_SIZE as u32);
    put_u64(&mut out, hdr::ENTRIES_OFF, entries_off as u64);
    put_u64(&mut out, hdr::XATTRS_OFF, xattrs_off as u64);
    put_u64(&mut out, hdr::XATTR_COUNT, (t.xattrs.len() / XATTR_SIZE) as u64);
    put_u64(&mut out, hdr::STRINGS_OFF, strings_off as u64);
    put_u64(&mut out, hdr::STRINGS_LEN, t.strings.len() as u64);
    put_u64(&mut out, hdr::DIGESTS_OFF, digests_off as u64);
    put_u64(
        &mut out,
        hdr::DIGEST_COUNT,
        (t.digests.len() / DIGEST_SIZE) as u64,
    );
    put_u64(&mut out, hdr::FILE_LEN, total as u64);
    out.reserve(total - HEADER_SIZE);
    out.extend_from_slice(&entries);
    out.extend_from_slice(&t.xattrs);
    out.extend_from_slice(&t.strings);
    out.extend_from_slice(&t.digests);
    let trailer = Sha256::digest(&out);
    out.extend_from_slice(&trailer);
    Ok(out)
}

/// build + write to `manifest_path(layer_dir)` crash-safely: a temp file in the same dir,
/// write, fsync, rename over the old manifest, fsync the dir. A crash leaves the old manifest
/// or the new one, never a torn one (at worst a stale `.NAME.tmp.PID` file). Returns the digest.
pub fn seal(layer_dir: &Path) -> Result<String> {
    seal_with_chunk_size(layer_dir, CHUNK_SIZE)
}

/// [`seal`] with [`build_with_chunk_size`].
pub fn seal_with_chunk_size(layer_dir: &Path, chunk_size: u64) -> Result<String> {
    let bytes = build_with_chunk_size(layer_dir, chunk_size)?;
    let target = manifest_path(layer_dir);
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp_name = OsString::from(".");
    tmp_name.push(target.file_name().unwrap_or_default());
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let write = || -> Result<()> {
        // A leftover of an earlier crash with the same pid.
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(Error::io("seal.remove_stale", &tmp, e))
            }
            _ => {}
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| Error::io("seal.create_tmp", &tmp, e))?;
        f.write_all(&bytes)
            .map_err(|e| Error::io("seal.write_tmp", &tmp, e))?;
        f.sync_all().map_err(|e| Error::io("seal.fsync_tmp", &tmp, e))?;
        std::fs::rename(&tmp, &target).map_err(|e| Error::io("seal.rename", &target, e))?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("seal.fsync_dir", &dir, e))?;
    Ok(sha256_id(&bytes))
}

// ---------------------------------------------------------------------------------------
// Scrub

/// One thing wrong with a layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// The manifest lists it; the layer lacks it (for a directory, what it held is not
    /// reported again).
    Missing {
        /// path in the layer
        path: PathBuf,
    },
    /// The layer holds it; the manifest does not list it (for a directory, what it holds is
    /// not reported again).
    Unlisted {
        /// path in the layer
        path: PathBuf,
    },
    /// A chunk of a regular file does not match its digest.
    Content {
        /// path in the layer
        path: PathBuf,
        /// chunk index (byte offset = chunk * chunk_size)
        chunk: u64,
        /// the manifest's chunk size
        chunk_size: u64,
        /// "sha256:<hex>" from the manifest
        expected: String,
        /// "sha256:<hex>" of what is on disk, or why it could not be read
        actual: String,
    },
    /// Type, mode, owner, size, device, symlink target, xattrs or hard links differ.
    Metadata {
        /// path in the layer
        path: PathBuf,
        /// e.g. "mode 0644, manifest says 0755"
        what: String,
    },
}

impl Problem {
    /// The path the problem is about.
    pub fn path(&self) -> &Path {
        match self {
            Problem::Missing { path }
            | Problem::Unlisted { path }
            | Problem::Content { path, .. }
            | Problem::Metadata { path, .. } => path,
        }
    }
}

/// A layer path for messages: "/" for the root, else as is.
fn show(p: &Path) -> String {
    if p.as_os_str().is_empty() {
        "/".into()
    } else {
        p.display().to_string()
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Missing { path } => {
                write!(
                    f,
                    "{}: listed in the manifest but missing from the layer",
                    show(path)
                )
            }
            Problem::Unlisted { path } => write!(f, "{}: in the layer but not in the manifest", show(path)),
            Problem::Content {
                path,
                chunk,
                chunk_size,
                expected,
                actual,
            } => write!(
                f,
                "{}: chunk {chunk} (bytes {}..{}) does not match (expected {expected}, found {actual})",
                show(path),
                chunk * chunk_size,
                (chunk + 1) * chunk_size
            ),
            Problem::Metadata { path, what } => write!(f, "{}: {what}", show(path)),
        }
    }
}

fn dev_str(rdev: u64) -> String {
    format!("{}:{}", rustix::fs::major(rdev), rustix::fs::minor(rdev))
}

fn xattr_problems(e: &ManifestEntry, on_disk: &[(OsString, Vec<u8>)], out: &mut Vec<Problem>) {
    let want: HashMap<&OsStr, &[u8]> = e
        .xattrs
        .iter()
        .map(|(n, v)| (n.as_os_str(), v.as_slice()))
        .collect();
    let have: HashMap<&OsStr, &[u8]> = on_disk
        .iter()
        .map(|(n, v)| (n.as_os_str(), v.as_slice()))
        .collect();
    let meta = |what: String| Problem::Metadata {
        path: e.path.clone(),
        what,
    };
    for (n, v) in &e.xattrs {
        match have.get(n.as_os_str()) {
            None => out.push(meta(format!("xattr {} missing", n.to_string_lossy()))),
            Some(h) if *h != v.as_slice() => out.push(meta(format!(
                "xattr {} is {:?}, manifest says {:?}",
                n.to_string_lossy(),
                bstr(h),
                bstr(v)
            ))),
            Some(_) => {}
        }
    }
    for (n, _) in on_disk {
        if !want.contains_key(n.as_os_str()) {
            out.push(meta(format!("xattr {} not in the manifest", n.to_string_lossy())));
        }
    }
}

/// Check every entry of the layer against the manifest (and the manifest itself first, see
/// [`Manifest::check`]); `progress(done_bytes, total_bytes)` is called as it goes. Damage is
/// returned as [`Problem`]s, in manifest order; `Err` means the manifest itself is damaged or
/// the layer could not be opened at all.
pub fn scrub(
    layer_dir: &Path,
    manifest: &Manifest,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Vec<Problem>> {
    manifest.check()?;
    let layer = LayerDir::open(layer_dir, 0, "scrub".into())?;
    let mut total = 0u64;
    for e in manifest.iter() {
        let e = e?;
        total += e.size;
    }
    let mut done = 0u64;
    progress(done, total);
    let mut problems = Vec::new();
    // Directories missing (or of the wrong type): what they held is not reported again.
    let mut gone: HashSet<PathBuf> = HashSet::new();
    // Hard links: inode -> (group, first path), and group -> inode.
    let mut inode_group: HashMap<(u64, u64), (u32, PathBuf)> = HashMap::new();
    let mut group_inode: HashMap<u32, ((u64, u64), PathBuf)> = HashMap::new();
    let chunk_size = manifest.chunk_size();
    let mut buf = vec![0u8; HASH_BLOCK.max(chunk_size as usize)];
    for e in manifest.iter() {
        let e = e?;
        let meta = |what: String| Problem::Metadata {
            path: e.path.clone(),
            what,
        };
        if e.path.parent().is_some_and(|p| gone.contains(p)) {
            gone.insert(e.path.clone());
            done += e.size;
            continue;
        }
        let st = match layer.stat(&e.path) {
            Ok(Some(st)) => st,
            Ok(None) => {
                problems.push(Problem::Missing { path: e.path.clone() });
                gone.insert(e.path.clone());
                done += e.size;
                progress(done, total);
                continue;
            }
            Err(err) => {
                problems.push(meta(format!("cannot stat: {err}")));
                gone.insert(e.path.clone());
                done += e.size;
                continue;
            }
        };
        let kind = Kind::from_mode(st.st_mode);
        let rdev = st.st_rdev;
        if kind != e.kind {
            problems.push(meta(format!(
                "type {}, manifest says {}",
                kind_name(kind, rdev),
                kind_name(e.kind, e.rdev)
            )));
            gone.insert(e.path.clone());
            done += e.size;
            continue;
        }
        let perm = st.st_mode & 0o7777;
        if perm != e.perm {
            problems.push(meta(format!("mode {perm:04o}, manifest says {:04o}", e.perm)));
        }
        if st.st_uid != e.uid {
            problems.push(meta(format!("owner uid {}, manifest says {}", st.st_uid, e.uid)));
        }
        if st.st_gid != e.gid {
            problems.push(meta(format!("group gid {}, manifest says {}", st.st_gid, e.gid)));
        }
        if matches!(kind, Kind::Char | Kind::Block) && rdev != e.rdev {
            problems.push(meta(format!(
                "device {}, manifest says {}",
                dev_str(rdev),
                dev_str(e.rdev)
            )));
        }
        match read_xattrs(&layer, &e.path) {
            Ok(x) => xattr_problems(&e, &x, &mut problems),
            Err(err) => problems.push(meta(format!("cannot read xattrs: {err}"))),
        }
        if kind != Kind::Dir {
            link_problems(&e, &st, &mut inode_group, &mut group_inode, &mut problems);
        }
        match kind {
            Kind::Symlink => match layer.readlink(&e.path) {
                Ok(t) if Some(&t) != e.target.as_ref() => problems.push(meta(format!(
                    "symlink target {:?}, manifest says {:?}",
                    t,
                    e.target.as_deref().unwrap_or_default()
                ))),
                Ok(_) => {}
                Err(err) => problems.push(meta(format!("cannot read symlink: {err}"))),
            },
            Kind::File => {
                let size = st_size(&st);
                if size != e.size {
                    problems.push(meta(format!("size {size}, manifest says {}", e.size)));
                    done += e.size;
                    progress(done, total);
                } else {
                    scrub_content(&layer, &e, chunk_size, &mut buf, &mut problems, &mut |n| {
                        done += n;
                        progress(done, total);
                    });
                }
            }
            Kind::Dir => match layer.read_dir(&e.path) {
                Ok(ents) => {
                    let listed: HashSet<&[u8]> = manifest
                        .child_range(&e.path)?
                        .map(|i| manifest.key(i).map(|(_, n)| n))
                        .collect::<Result<_>>()?;
                    let mut extra: Vec<PathBuf> = ents
                        .iter()
                        .filter(|d| !listed.contains(d.name.as_bytes()))
                        .map(|d| e.path.join(&d.name))
                        .collect();
                    extra.sort();
                    problems.extend(extra.into_iter().map(|path| Problem::Unlisted { path }));
                }
                Err(err) => problems.push(meta(format!("cannot list: {err}"))),
            },
            Kind::Fifo | Kind::Char | Kind::Block | Kind::Socket => {}
        }
    }
    progress(total, total);
    Ok(problems)
}

/// Two entries share an inode exactly when the manifest gives them the same non-zero group.
fn link_problems(
    e: &ManifestEntry,
    st: &Stat,
    inode_group: &mut HashMap<(u64, u64), (u32, PathBuf)>,
    group_inode: &mut HashMap<u32, ((u64, u64), PathBuf)>,
    out: &mut Vec<Problem>,
) {
    let ino = (st.st_dev, st.st_ino);
    if let Some((g, first)) = inode_group.get(&ino) {
        if *g == 0 || *g != e.link_group {
            out.push(Problem::Metadata {
                path: e.path.clone(),
                what: format!(
                    "hard link to {}, manifest says they are separate files",
                    show(first)
                ),
            });
        }
    } else if st.st_nlink > 1 || e.link_group != 0 {
        inode_group.insert(ino, (e.link_group, e.path.clone()));
    }
    if e.link_group != 0 {
        match group_inode.get(&e.link_group) {
            Some((i, first)) if *i != ino => out.push(Problem::Metadata {
                path: e.path.clone(),
                what: format!("not a hard link to {}, manifest says it is", show(first)),
            }),
            Some(_) => {}
            None => {
                group_inode.insert(e.link_group, (ino, e.path.clone()));
            }
        }
    }
}

/// Hash a file chunk by chunk against its manifest digests; one problem per bad chunk.
/// Reads `buf.len()` bytes at a time (a multiple of the chunk size).
fn scrub_content(
    layer: &LayerDir,
    e: &ManifestEntry,
    chunk_size: u64,
    buf: &mut [u8],
    out: &mut Vec<Problem>,
    advance: &mut dyn FnMut(u64),
) {
    let expected = |chunk: u64| {
        e.chunks
            .get(chunk as usize)
            .map(|d| format!("sha256:{}", hex(d)))
            .unwrap_or_default()
    };
    let unreadable = |chunk: u64, why: String| Problem::Content {
        path: e.path.clone(),
        chunk,
        chunk_size,
        expected: expected(chunk),
        actual: format!("unreadable ({why})"),
    };
    let mut f = match layer.open_file(&e.path, OFlags::RDONLY) {
        Ok(fd) => std::fs::File::from(fd),
        Err(err) => {
            out.push(unreadable(0, err.to_string()));
            advance(e.size);
            return;
        }
    };
    let mut left = e.size;
    let mut chunk = 0u64;
    while left > 0 {
        let len = left.min(buf.len() as u64) as usize;
        let block = &mut buf[..len];
        match read_full(&mut f, block) {
            Ok(n) if n == len => {
                for (got, want) in chunk_digests(block, chunk_size).zip(&e.chunks[chunk as usize..]) {
                    if &got != want {
                        out.push(Problem::Content {
                            path: e.path.clone(),
                            chunk,
                            chunk_size,
                            expected: format!("sha256:{}", hex(want)),
                            actual: format!("sha256:{}", hex(&got)),
                        });
                    }
                    chunk += 1;
                }
            }
            Ok(n) => {
                out.push(unreadable(
                    chunk + n as u64 / chunk_size,
                    format!("ends {} bytes early", left - n as u64),
                ));
                advance(left);
                return;
            }
            Err(err) => {
                out.push(unreadable(chunk, err.to_string()));
                advance(left);
                return;
            }
        }
        left -= len as u64;
        advance(len as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_count_rounds_up() {
        for (size, n) in [
            (0, 0),
            (1, 1),
            (CHUNK_SIZE, 1),
            (CHUNK_SIZE + 1, 2),
            (3 * CHUNK_SIZE, 3),
        ] {
            assert_eq!(chunk_count(size, CHUNK_SIZE), n, "size {size}");
        }
    }

    #[test]
    fn split_key_separates_parent_and_name() {
        let cases: &[(&str, Option<(&str, &str)>)] = &[
            ("", Some(("", ""))),
            (".", Some(("", ""))),
            ("a", Some(("", "a"))),
            ("a/b", Some(("a", "b"))),
            ("a/b/c", Some(("a/b", "c"))),
            ("./a/b", Some(("a", "b"))),
            ("a/", Some(("", "a"))),
            ("/a", None),
            ("a/../b", None),
        ];
        for (p, want) in cases {
            let got = split_key(Path::new(p));
            let got = got.as_ref().map(|(a, b)| (a.as_slice(), *b));
            let want = want.map(|(a, b)| (a.as_bytes(), b.as_bytes()));
            assert_eq!(got, want, "path {p:?}");
        }
    }

    #[test]
    fn entry_path_refuses_keys_that_leave_the_layer() {
        let cases: &[(&str, &str, Option<&str>)] = &[
            ("", "", Some("")),
            ("", "a", Some("a")),
            ("a/b", "c", Some("a/b/c")),
            ("a", "", None),
            ("", "..", None),
            ("..", "x", None),
            ("a/../b", "x", None),
            ("/a", "x", None),
            ("a//b", "x", None),
            ("", "a/b", None),
        ];
        for (p, n, want) in cases {
            assert_eq!(
                entry_path(p.as_bytes(), n.as_bytes()),
                want.map(PathBuf::from),
                "parent {p:?} name {n:?}"
            );
        }
    }

    #[test]
    fn manifest_path_is_beside_the_layer() {
        assert_eq!(
            manifest_path(Path::new("/s/l")),
            PathBuf::from("/s/l.verlay-manifest")
        );
        assert_eq!(
            manifest_path(Path::new("/s/l/")),
            PathBuf::from("/s/l.verlay-manifest")
        );
        assert_eq!(manifest_path(Path::new("l")), PathBuf::from("l.verlay-manifest"));
    }

    #[test]
    fn short_and_foreign_bytes_are_corrupt_not_a_panic() {
        // Magic, version and flags right, everything else garbage.
        let mut garbage = vec![0xa5u8; 300];
        garbage[..8].copy_from_slice(&MAGIC);
        garbage[8..12].copy_from_slice(&VERSION.to_le_bytes());
        garbage[hdr::INCOMPAT..hdr::INCOMPAT + 4].fill(0);
        for bytes in [vec![], vec![0u8; 10], vec![0u8; 200], garbage] {
            match Manifest::from_bytes(bytes, Path::new("/x/l.verlay-manifest")) {
                Err(Error::Corrupt { layer, .. }) => assert_eq!(layer, "/x/l"),
                other => panic!("expected Corrupt, got {other:?}"),
            }
        }
    }
}
