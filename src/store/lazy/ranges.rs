//! Which bytes of a lazy layer's `lazy/blob` are there: the range map `lazy/ranges`.
//!
//! `lazy/blob` is a sparse file at the compressed blob's offsets. The pull writes the TOC
//! member and the footer into it (it fetched them), each read writes the spans it fetched on
//! demand, and the background fetch only asks the registry for the ranges the map lacks, so
//! every byte of the blob crosses the network once.
//!
//! `lazy/ranges` is a sequence of 24-byte records, `start` and `end` (u64 little endian, the
//! range `[start, end)` of the blob) and an 8-byte check (the first bytes of
//! `sha256("verlay lazy range\0" || blob digest || start || end)`), appended with `O_APPEND`
//! (one write each). A record whose check does not match (a torn write at a crash, a record
//! of another blob) is ignored; a trailing part-record too.
//!
//! **Order** (a range is recorded only once its bytes are durable): the bytes are written
//! to `lazy/blob` and fdatasynced, then the record is appended. A crash between the two
//! leaves bytes nobody claims (fetched again), never a claim without its bytes. The
//! record itself is not synced: a record lost by a crash only costs fetching its range again.
//!
//! **Bounded**: once [`COMPACT_AFTER`] records were appended beyond the coalesced ranges'
//! count, the map is rewritten coalesced (a new file, fsynced, renamed over the old, the
//! directory fsynced): at most one record per separate range present, which is at most one
//! per chunk of the TOC, plus [`COMPACT_AFTER`]. A map file over [`MAX_FILE`] bytes is not
//! read (treated as empty: the background fetch then fetches the whole blob again).
//!
//! Nothing trusts the map for integrity: chunks read from `lazy/blob` are verified against
//! their TOC digests like fetched ones, and the seal hashes the whole blob against the
//! manifest's digest, so a wrong map costs a fetch, never a wrong byte served or sealed.
//! Another process (a second mount of the layer) may append at the same time; a record it
//! appends to a file this one is compacting is lost, which again costs only a fetch.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use sha2::{Digest, Sha256};

use super::BLOB_FILE;
use crate::failpoint::crash_point;

/// The range map in a lazy layer's `lazy/` directory.
pub const RANGES_FILE: &str = "ranges";
/// One record: start, end, check.
const REC: usize = 24;
/// Records appended beyond the coalesced count before a rewrite.
pub const COMPACT_AFTER: usize = 256;
/// The largest map file read (4 Mi chunks, one record each, and room for appends).
pub const MAX_FILE: u64 = (4 << 20) * REC as u64 + (COMPACT_AFTER * REC) as u64;

/// Byte ranges present, sorted, disjoint, not touching (coalesced). A sorted Vec by hand:
/// insert, covers and the complement are a few lines each, not worth a crate.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Ranges(Vec<(u64, u64)>);

impl Ranges {
    /// Add `[start, end)`, coalescing with the ranges it touches or overlaps.
    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let v = &mut self.0;
        // the first range that ends at or after `start`, the first that starts after `end`
        let lo = v.partition_point(|r| r.1 < start);
        let hi = v.partition_point(|r| r.0 <= end);
        if lo == hi {
            v.insert(lo, (start, end));
        } else {
            let merged = (v[lo].0.min(start), v[hi - 1].1.max(end));
            v.splice(lo..hi, [merged]);
        }
    }

    /// Is all of `[start, end)` present?
    pub fn covers(&self, start: u64, end: u64) -> bool {
        if start >= end {
            return true;
        }
        let i = self.0.partition_point(|r| r.1 < end);
        self.0.get(i).is_some_and(|r| r.0 <= start && end <= r.1)
    }

    /// The ranges of `[0, size)` not present, in order.
    pub fn missing(&self, size: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut at = 0;
        for &(s, e) in &self.0 {
            if s >= size {
                break;
            }
            if s > at {
                out.push((at, s));
            }
            at = at.max(e);
        }
        if at < size {
            out.push((at, size));
        }
        out
    }

    /// The end of the range present from offset 0 (0 when byte 0 is missing).
    pub fn prefix(&self) -> u64 {
        match self.0.first() {
            Some(&(0, e)) => e,
            _ => 0,
        }
    }

    /// Every range of `other` added.
    pub fn merge(&mut self, other: &Ranges) {
        for &(s, e) in &other.0 {
            self.insert(s, e);
        }
    }

    /// Separate ranges.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Nothing present.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The ranges, in order.
    pub fn iter(&self) -> impl Iterator<Item = &(u64, u64)> {
        self.0.iter()
    }
}

fn check(blob: &str, start: u64, end: u64) -> [u8; 8] {
    let mut h = Sha256::new();
    h.update(b"verlay lazy range\0");
    h.update(blob.as_bytes());
    h.update(start.to_le_bytes());
    h.update(end.to_le_bytes());
    let d = h.finalize();
    let mut out = [0u8; 8];
    out.copy_from_slice(&d[..8]);
    out
}

/// One record of `[start, end)` of `blob`.
pub fn record(blob: &str, start: u64, end: u64) -> [u8; REC] {
    let mut r = [0u8; REC];
    r[..8].copy_from_slice(&start.to_le_bytes());
    r[8..16].copy_from_slice(&end.to_le_bytes());
    r[16..].copy_from_slice(&check(blob, start, end));
    r
}

/// The map's bytes parsed: the ranges of the records whose check matches, and how many
/// records there were (good or not; a trailing part-record counts as one).
pub fn parse(bytes: &[u8], blob: &str) -> (Ranges, usize) {
    let mut out = Ranges::default();
    let mut n = 0;
    for r in bytes.chunks(REC) {
        n += 1;
        if r.len() < REC {
            break;
        }
        let u = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&r[i..i + 8]);
            u64::from_le_bytes(b)
        };
        let (s, e) = (u(0), u(8));
        if r[16..] == check(blob, s, e) {
            out.insert(s, e);
        }
    }
    (out, n)
}

/// The map file `p` read (missing, unreadable or over [`MAX_FILE`]: nothing present), with
/// its record count.
pub fn load(p: &Path, blob: &str) -> (Ranges, usize) {
    let Ok(f) = File::open(p) else {
        return (Ranges::default(), 0);
    };
    let mut bytes = Vec::new();
    match f.take(MAX_FILE + 1).read_to_end(&mut bytes) {
        Ok(n) if n as u64 <= MAX_FILE => parse(&bytes, blob),
        _ => {
            tracing::warn!(path = %p.display(), "lazy range map unreadable or too large; its blob will be fetched again");
            (Ranges::default(), 0)
        }
    }
}

/// Append the record of `[start, end)` to the map file `p` (one write; not synced: see the
/// module doc). The caller has made the bytes durable first.
pub fn append(p: &Path, blob: &str, start: u64, end: u64) -> std::io::Result<()> {
    let mut f = File::options().append(true).create(true).open(p)?;
    f.write_all(&record(blob, start, end))
}

/// Replace the map file `p` by `r`, coalesced: a new file beside it, fsynced, renamed over
/// it, the directory fsynced.
pub fn rewrite(p: &Path, blob: &str, r: &Ranges) -> std::io::Result<()> {
    let tmp = p.with_extension(format!("tmp.{}", std::process::id()));
    let mut bytes = Vec::with_capacity(r.len() * REC);
    for &(s, e) in r.iter() {
        bytes.extend_from_slice(&record(blob, s, e));
    }
    let f = File::create(&tmp)?;
    f.write_all_at(&bytes, 0)?;
    f.sync_all()?;
    std::fs::rename(&tmp, p)?;
    if let Some(d) = p.parent() {
        File::open(d)?.sync_all()?;
    }
    Ok(())
}

/// Forget every range of the map file `p`, then empty the blob file `blob_file` (in that
/// order: a crash between leaves bytes nobody claims, never a claim on bytes not there).
/// The file stays: writers never create it (see [`BlobFile::store`]).
pub fn drop_blob(p: &Path, blob_file: &Path) -> std::io::Result<()> {
    rewrite(p, "", &Ranges::default())?;
    File::create(blob_file)?.sync_all()
}

/// A lazy layer's `lazy/blob` and its range map, as this process sees them (the map file
/// is read again by [`BlobFile::reload`] for what other processes recorded).
pub struct BlobFile {
    /// `lazy/blob`
    path: PathBuf,
    /// where the store keeps the blob once it is whole and verified (`blobs/sha256/<hex>`)
    kept: PathBuf,
    /// `lazy/ranges`
    map: PathBuf,
    /// the blob's digest (the records' checks name it)
    digest: String,
    state: Mutex<State>,
}

struct State {
    ranges: Ranges,
    /// records in the map file
    records: usize,
}

impl BlobFile {
    /// The blob file of the `lazy/` directory `dir`, for the blob `digest` (which the store
    /// keeps, once whole, as `kept`). A blob file without a map (left by an older verlay,
    /// which fetched it from its start) is emptied: fetched again. A map without a blob file
    /// (the seal moved it to `kept`) is emptied, and the blob file made again unless the
    /// store keeps the blob.
    pub fn open(dir: &Path, digest: &str, kept: PathBuf) -> std::io::Result<BlobFile> {
        let (path, map) = (dir.join(BLOB_FILE), dir.join(RANGES_FILE));
        let (mut ranges, mut records) = load(&map, digest);
        let has_blob = path.exists();
        if !map.exists() && has_blob {
            tracing::info!(path = %path.display(), "a lazy blob file without a range map (older verlay): fetched again");
            drop_blob(&map, &path)?;
        } else if !has_blob {
            if records > 0 || !map.exists() {
                rewrite(&map, digest, &Ranges::default())?;
                (ranges, records) = (Ranges::default(), 0);
            }
            if !kept.exists() {
                File::create(&path)?.sync_all()?;
            }
        } else if std::fs::metadata(&map).is_ok_and(|m| m.len() % REC as u64 != 0) {
            // a record torn by a crash: appends after it would be out of step
            rewrite(&map, digest, &ranges)?;
            records = ranges.len();
        }
        Ok(BlobFile {
            path,
            kept,
            map,
            digest: digest.to_string(),
            state: Mutex::new(State { ranges, records }),
        })
    }

    /// The ranges present.
    pub fn ranges(&self) -> Ranges {
        self.state.lock().ranges.clone()
    }

    /// Merge what the map file says now (other processes append to it too).
    pub fn reload(&self) {
        let (r, n) = load(&self.map, &self.digest);
        let mut st = self.state.lock();
        st.ranges.merge(&r);
        st.records = st.records.max(n);
    }

    /// Bytes `[start, end)` of the blob, if the map says they are there, or the store keeps
    /// the whole blob (sealed).
    pub fn read(&self, start: u64, end: u64) -> Option<Vec<u8>> {
        let f = if self.state.lock().ranges.covers(start, end) {
            File::open(&self.path).ok()?
        } else {
            File::open(&self.kept).ok()?
        };
        let mut b = vec![0u8; usize::try_from(end - start).ok()?];
        f.read_exact_at(&mut b, start).ok()?;
        Some(b)
    }

    /// Write `bytes` at `start` of the blob file, make them durable, then record them (the
    /// order of the module doc; crash point `lazy.blob_data` between the two). The map is
    /// rewritten coalesced once it has [`COMPACT_AFTER`] records more than ranges.
    ///
    /// Never into a blob being sealed or sealed: the write holds a shared flock on the file,
    /// which the seal holds exclusively from before it reads the blob until it has moved it
    /// into the store's `blobs/` ([`crate::store::Store::seal_lazy`]); a write that cannot
    /// take it at once, or finds the file moved (or gone: the file is never created here),
    /// is not done and fails with `WouldBlock` or `NotFound`.
    pub fn store(&self, start: u64, bytes: &[u8]) -> std::io::Result<()> {
        let end = start + bytes.len() as u64;
        let f = File::options().write(true).open(&self.path)?;
        rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockShared)?;
        let (a, b) = (f.metadata()?, std::fs::metadata(&self.path)?);
        if (a.dev(), a.ino()) != (b.dev(), b.ino()) {
            return Err(std::io::ErrorKind::NotFound.into());
        }
        f.write_all_at(bytes, start)?;
        f.sync_data()?;
        crash_point("lazy.blob_data");
        let mut st = self.state.lock();
        append(&self.map, &self.digest, start, end)?;
        st.ranges.insert(start, end);
        st.records += 1;
        if st.records > st.ranges.len() + COMPACT_AFTER {
            let (disk, _) = load(&self.map, &self.digest);
            st.ranges.merge(&disk);
            rewrite(&self.map, &self.digest, &st.ranges)?;
            st.records = st.ranges.len();
        }
        Ok(())
    }

    /// Forget every range and remove the blob file ([`drop_blob`]).
    pub fn drop_all(&self) -> std::io::Result<()> {
        let mut st = self.state.lock();
        st.ranges = Ranges::default();
        st.records = 0;
        drop_blob(&self.map, &self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_coalesces_and_missing_is_the_complement() {
        let mut r = Ranges::default();
        r.insert(10, 20);
        r.insert(30, 40);
        r.insert(20, 25); // touches: one range
        assert_eq!(r.0, vec![(10, 25), (30, 40)]);
        assert!(r.covers(12, 25) && !r.covers(12, 26) && !r.covers(5, 12) && r.covers(7, 7));
        assert_eq!(r.missing(50), vec![(0, 10), (25, 30), (40, 50)]);
        assert_eq!(r.prefix(), 0);
        r.insert(0, 35); // overlaps both
        assert_eq!(r.0, vec![(0, 40)]);
        assert_eq!(r.prefix(), 40);
        assert_eq!(r.missing(40), vec![]);
        r.insert(5, 5);
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn records_of_another_blob_torn_or_damaged_are_ignored() {
        let mut b = Vec::new();
        b.extend_from_slice(&record("sha256:a", 0, 100));
        b.extend_from_slice(&record("sha256:b", 100, 200));
        let mut bad = record("sha256:a", 300, 400);
        bad[3] ^= 1;
        b.extend_from_slice(&bad);
        b.extend_from_slice(&record("sha256:a", 500, 600));
        b.extend_from_slice(&record("sha256:a", 600, 700)[..10]);
        let (r, n) = parse(&b, "sha256:a");
        assert_eq!(r.0, vec![(0, 100), (500, 600)]);
        assert_eq!(n, 5);
    }

    #[test]
    fn the_map_stays_bounded_and_a_blob_being_sealed_or_gone_is_not_written() {
        let d = tempfile::tempdir().expect("tempdir");
        File::create(d.path().join(BLOB_FILE)).expect("blob file");
        rewrite(&d.path().join(RANGES_FILE), "sha256:a", &Ranges::default()).expect("map");
        let b = BlobFile::open(d.path(), "sha256:a", d.path().join("kept")).expect("open");
        // 1000 touching ranges: one range, and the file compacted on the way
        for i in 0..1000u64 {
            b.store(i * 10, &[7u8; 10]).expect("store");
        }
        let map = d.path().join(RANGES_FILE);
        let len = std::fs::metadata(&map).expect("map").len();
        assert!(len <= ((COMPACT_AFTER + 1) * REC) as u64, "map of {len} bytes");
        let (r, _) = load(&map, "sha256:a");
        assert_eq!(r.0, vec![(0, 10_000)]);
        assert_eq!(b.read(9_990, 10_000), Some(vec![7u8; 10]));
        assert_eq!(b.read(9_990, 10_001), None);
        // the seal holds an exclusive flock: no write
        let sealing = File::open(d.path().join(BLOB_FILE)).expect("open");
        rustix::fs::flock(&sealing, rustix::fs::FlockOperation::NonBlockingLockExclusive).expect("flock");
        let e = b.store(20_000, &[1]).expect_err("written under the seal's lock");
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
        drop(sealing);
        // moved away by the seal: not written, not made again
        std::fs::rename(d.path().join(BLOB_FILE), d.path().join("kept")).expect("rename");
        let e = b.store(20_000, &[1]).expect_err("written after the seal");
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
        assert!(!d.path().join(BLOB_FILE).exists());
        // reopened: the map emptied (its blob file is gone), reads served by the kept blob
        let b = BlobFile::open(d.path(), "sha256:a", d.path().join("kept")).expect("reopen");
        assert!(b.ranges().is_empty());
        assert!(
            !d.path().join(BLOB_FILE).exists(),
            "made again although the blob is kept"
        );
        assert_eq!(b.read(0, 10), Some(vec![7u8; 10]));
    }

    #[test]
    fn append_then_rewrite_round_trips() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join(RANGES_FILE);
        append(&p, "sha256:a", 0, 10).expect("append");
        append(&p, "sha256:a", 10, 20).expect("append");
        append(&p, "sha256:a", 40, 50).expect("append");
        let (r, n) = load(&p, "sha256:a");
        assert_eq!((r.0.clone(), n), (vec![(0, 20), (40, 50)], 3));
        rewrite(&p, "sha256:a", &r).expect("rewrite");
        assert_eq!(load(&p, "sha256:a"), (r, 2));
        assert_eq!(std::fs::metadata(&p).expect("stat").len(), 2 * REC as u64);
    }
}
