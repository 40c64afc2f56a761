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

/// A layer path for messages: "/" for the root, else as is.
fn show(p: &Path) -> String {
    if p.as_os_str().is_empty() {
        "/".into()
    } else {
        p.display().to_string()
    }
}

mod build;
mod scrub;
#[cfg(test)]
mod tests;

pub use build::{build, build_with_chunk_size, seal, seal_with_chunk_size};
pub use scrub::{scrub, Problem};
