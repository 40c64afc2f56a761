//! The eStargz TOC (`stargz.index.json`) and footer, as containerd/stargz-snapshotter's
//! `estargz` package writes them (docs/estargz.md there; `types.go`, `gzip.go`), and the
//! chunk table a lazy reader needs, built from a TOC with every size capped.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::PathBuf;

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::error::Error;

/// Name of the TOC's tar entry.
pub const TOC_NAME: &str = "stargz.index.json";
/// Size of the footer gzip member.
pub const FOOTER_SIZE: u64 = 51;
/// The image manifest's layer annotation holding the TOC's digest.
pub const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
/// The layer annotation with the uncompressed size (containers/storage reads it).
pub const UNCOMPRESSED_SIZE_ANNOTATION: &str = "io.containers.estargz.uncompressed-size";
/// Entries that mark the end of the files to prefetch, or that there are none.
pub const PREFETCH_LANDMARK: &str = ".prefetch.landmark";
/// See [`PREFETCH_LANDMARK`].
pub const NO_PREFETCH_LANDMARK: &str = ".no.prefetch.landmark";
/// The one byte of a landmark file.
pub const LANDMARK_CONTENTS: u8 = 0xf;

/// Largest compressed TOC member fetched.
pub const MAX_TOC_COMPRESSED: u64 = 64 << 20;
/// Largest TOC JSON accepted.
pub const MAX_TOC_JSON: u64 = 128 << 20;
/// Most TOC entries accepted (files plus chunks).
pub const MAX_ENTRIES: usize = 4 << 20;
/// Longest entry or link name (the kernel's PATH_MAX).
pub const MAX_NAME: usize = 4096;
/// Most xattrs of one entry, and the largest value (the kernel's XATTR_SIZE_MAX).
pub const MAX_XATTRS: usize = 1024;
/// See [`MAX_XATTRS`].
pub const MAX_XATTR_VALUE: usize = 64 << 10;
/// Largest uncompressed chunk a reader holds in memory.
pub const MAX_CHUNK: u64 = 16 << 20;
/// Largest compressed span of one chunk (its gzip member, and what shares it).
pub const MAX_CHUNK_SPAN: u64 = 64 << 20;

/// The TOC document.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Toc {
    /// 1
    pub version: i64,
    /// every tar entry and chunk of the blob, in blob order (the TOC itself excepted)
    pub entries: Vec<TocEntry>,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// One TOC entry (field names and `omitempty` as Go's `estargz.TOCEntry`).
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TocEntry {
    /// the tar name
    pub name: String,
    /// dir, reg, symlink, hardlink, char, block, fifo, chunk
    #[serde(rename = "type")]
    pub kind: String,
    /// file size (reg)
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: i64,
    /// RFC 3339 modification time
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub modtime: String,
    /// symlink or hard-link target
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub link_name: String,
    /// permission bits (tar mode)
    #[serde(default, skip_serializing_if = "is_zero")]
    pub mode: i64,
    /// owner
    #[serde(default, skip_serializing_if = "is_zero")]
    pub uid: i64,
    /// group
    #[serde(default, skip_serializing_if = "is_zero")]
    pub gid: i64,
    /// owner name
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub user_name: String,
    /// group name
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group_name: String,
    /// offset in the blob of the gzip member holding this reg/chunk's data
    #[serde(default, skip_serializing_if = "is_zero")]
    pub offset: i64,
    /// offset of the data in the uncompressed member starting at `offset`
    #[serde(default, skip_serializing_if = "is_zero")]
    pub inner_offset: i64,
    /// device major
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dev_major: i64,
    /// device minor
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dev_minor: i64,
    /// xattrs, values base64 (Go's `map[string][]byte`)
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub xattrs: BTreeMap<String, String>,
    /// digest of the whole file (reg)
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub digest: String,
    /// offset of this chunk in the file
    #[serde(default, skip_serializing_if = "is_zero")]
    pub chunk_offset: i64,
    /// size of this chunk; 0 for the last (or only) chunk of a file
    #[serde(default, skip_serializing_if = "is_zero")]
    pub chunk_size: i64,
    /// digest of this chunk's uncompressed bytes
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub chunk_digest: String,
}

impl TocEntry {
    /// The xattrs with their values decoded.
    pub fn xattr_values(&self) -> std::result::Result<Vec<(String, Vec<u8>)>, String> {
        self.xattrs
            .iter()
            .map(|(k, v)| {
                base64::engine::general_purpose::STANDARD
                    .decode(v)
                    .map(|b| (k.clone(), b))
                    .map_err(|e| format!("xattr {k} of {:?} is not base64: {e}", self.name))
            })
            .collect()
    }
}

/// Encode xattr values for [`TocEntry::xattrs`].
pub fn encode_xattr(v: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(v)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's days_from_civil).
/// Hand-written: two small functions, where a date crate would be a dependency for one format.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// A TOC `modtime` (`2006-01-02T15:04:05Z`, as the Go writer formats it) for unix seconds.
pub fn format_modtime(secs: i64) -> String {
    crate::store::rfc3339(secs)
}

/// Unix seconds of a TOC `modtime` in the UTC form [`format_modtime`] writes; None for any
/// other form.
pub fn parse_modtime(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[19] != b'Z'
    {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s.get(r).and_then(|x| x.parse::<i64>().ok());
    let days = days_from_civil(n(0..4)?, n(5..7)?, n(8..10)?);
    Some(days * 86400 + n(11..13)? * 3600 + n(14..16)? * 60 + n(17..19)?)
}

/// The 51-byte footer: an empty gzip member whose extra field says where the TOC starts
/// (`gzipFooterBytes` of the Go package).
pub fn footer(toc_offset: u64) -> [u8; FOOTER_SIZE as usize] {
    let mut b = [0u8; FOOTER_SIZE as usize];
    b[..4].copy_from_slice(&[0x1f, 0x8b, 8, 4]); // ID1 ID2 deflate FEXTRA
    b[9] = 255; // OS unknown
    b[10..12].copy_from_slice(&26u16.to_le_bytes()); // XLEN
    b[12..14].copy_from_slice(b"SG");
    b[14..16].copy_from_slice(&22u16.to_le_bytes());
    b[16..38].copy_from_slice(format!("{toc_offset:016x}STARGZ").as_bytes());
    // a final stored block of length 0, then CRC32 0 and ISIZE 0
    b[38..43].copy_from_slice(&[1, 0, 0, 0xff, 0xff]);
    b
}

/// The TOC offset a footer names.
pub fn parse_footer(b: &[u8]) -> std::result::Result<u64, String> {
    if b.len() != FOOTER_SIZE as usize {
        return Err(format!("footer is {} bytes, not {FOOTER_SIZE}", b.len()));
    }
    // Read it as gzip (flate2 checks the header, the empty deflate block and the trailer).
    let mut gz = flate2::read::GzDecoder::new(b);
    let mut sink = Vec::new();
    gz.read_to_end(&mut sink)
        .map_err(|e| format!("footer is not a gzip member: {e}"))?;
    let extra = gz
        .header()
        .and_then(|h| h.extra())
        .ok_or("footer has no gzip extra field (not eStargz)")?;
    if extra.len() != 26
        || &extra[..2] != b"SG"
        || extra[2..4] != 22u16.to_le_bytes()
        || &extra[20..] != b"STARGZ"
    {
        return Err("footer's extra field is not the eStargz SG subfield".into());
    }
    let hex = std::str::from_utf8(&extra[4..20]).map_err(|_| "footer offset is not hex")?;
    u64::from_str_radix(hex, 16).map_err(|_| format!("footer offset {hex:?} is not hex"))
}

/// A TOC as found in a blob's TOC member: the JSON bytes (what the annotation digests) and
/// the tar header of its entry (its mode and owner show in a full pull).
pub struct TocMember {
    /// the JSON
    pub json: Vec<u8>,
    /// the tar header of `stargz.index.json`
    pub header: tar::Header,
}

/// Decompress the TOC member (from the TOC offset up to the footer): one tar entry named
/// `stargz.index.json`, at most [`MAX_TOC_JSON`] bytes.
pub fn read_toc_member(member: &[u8]) -> std::result::Result<TocMember, String> {
    let gz = flate2::read::GzDecoder::new(member);
    let mut ar = tar::Archive::new(gz.take(MAX_TOC_JSON + (64 << 10)));
    let mut entries = ar.entries().map_err(|e| format!("TOC member: {e}"))?;
    let mut e = entries
        .next()
        .ok_or("TOC member holds no tar entry")?
        .map_err(|e| format!("TOC member: {e}"))?;
    let name = e.path_bytes().into_owned();
    if name != TOC_NAME.as_bytes() {
        return Err(format!(
            "TOC tar entry is named {:?}, not {TOC_NAME}",
            String::from_utf8_lossy(&name)
        ));
    }
    if e.size() > MAX_TOC_JSON {
        return Err(format!(
            "TOC is {} bytes, more than the {MAX_TOC_JSON} accepted",
            e.size()
        ));
    }
    let header = e.header().clone();
    let mut json = Vec::with_capacity(e.size() as usize);
    e.read_to_end(&mut json).map_err(|e| format!("TOC member: {e}"))?;
    if json.len() as u64 != e.size() {
        return Err("TOC member cut short".into());
    }
    Ok(TocMember { json, header })
}

/// Parse TOC JSON, checking the caps on entries, names and xattrs.
pub fn parse_toc(json: &[u8]) -> std::result::Result<Toc, String> {
    let toc: Toc = serde_json::from_slice(json).map_err(|e| format!("TOC JSON: {e}"))?;
    if toc.entries.len() > MAX_ENTRIES {
        return Err(format!(
            "TOC has {} entries, more than the {MAX_ENTRIES} accepted",
            toc.entries.len()
        ));
    }
    for e in &toc.entries {
        if e.name.len() > MAX_NAME || e.link_name.len() > MAX_NAME {
            return Err(format!(
                "TOC entry name or link longer than {MAX_NAME} bytes: {:.64?}...",
                e.name
            ));
        }
        if e.xattrs.len() > MAX_XATTRS {
            return Err(format!(
                "TOC entry {:?} has more than {MAX_XATTRS} xattrs",
                e.name
            ));
        }
        if e.xattrs.values().any(|v| v.len() > MAX_XATTR_VALUE * 4 / 3 + 4) {
            return Err(format!(
                "TOC entry {:?} has an xattr value over {MAX_XATTR_VALUE} bytes",
                e.name
            ));
        }
        if e.size < 0 || e.offset < 0 || e.inner_offset < 0 || e.chunk_offset < 0 || e.chunk_size < 0 {
            return Err(format!("TOC entry {:?} has a negative size or offset", e.name));
        }
    }
    Ok(toc)
}

/// A tar name as a path relative to the layer root: `./a//b/` is `a/b`; `None` for the root.
pub fn clean_name(name: &str) -> std::result::Result<Option<PathBuf>, String> {
    let mut out = PathBuf::new();
    for c in name.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err(format!("name {name:?} has a '..' component")),
            c => out.push(c),
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// One chunk of a regular file: where its bytes are in the file and in the blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// offset in the file
    pub file_off: u64,
    /// uncompressed length
    pub len: u64,
    /// blob offset of the gzip member holding it
    pub blob_off: u64,
    /// blob offset where the next member (or the TOC) starts: the compressed span's end
    pub blob_end: u64,
    /// offset of the chunk in the uncompressed member
    pub inner: u64,
    /// sha256 of its bytes
    pub digest: [u8; 32],
}

/// Every regular file's chunks, in file order, and the files by path (hard links included).
#[derive(Debug, Default)]
pub struct ChunkTable {
    /// all chunks, each file's consecutive
    pub chunks: Vec<Chunk>,
    /// path -> (index of its first chunk, count, size)
    pub files: HashMap<PathBuf, (usize, usize, u64)>,
    /// path -> modification time (unix seconds), put back after each write to the cache
    pub mtimes: HashMap<PathBuf, i64>,
}

fn parse_sha256(d: &str, name: &str) -> std::result::Result<[u8; 32], String> {
    let hex = d
        .strip_prefix("sha256:")
        .ok_or_else(|| format!("chunkDigest {d:?} of {name:?} is not sha256"))?;
    let mut out = [0u8; 32];
    if hex.len() != 64 {
        return Err(format!("chunkDigest {d:?} of {name:?} is malformed"));
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
            .map_err(|_| format!("chunkDigest {d:?} of {name:?} is malformed"))?;
    }
    Ok(out)
}

/// Build the chunk table of `toc` for a blob whose TOC starts at `toc_offset`. Each file's
/// chunks must follow its `reg` entry, cover it exactly in order, and lie before the TOC.
pub fn chunk_table(toc: &Toc, toc_offset: u64) -> std::result::Result<ChunkTable, String> {
    // a data entry's compressed span ends where the next member starts (Go: nextOffset)
    let mut next = vec![toc_offset; toc.entries.len()];
    let mut last = toc_offset;
    for (i, e) in toc.entries.iter().enumerate().rev() {
        next[i] = last;
        if e.offset != 0 && e.inner_offset == 0 {
            last = e.offset as u64;
        }
    }
    let mut t = ChunkTable::default();
    let mut links = Vec::new();
    let mut i = 0;
    while i < toc.entries.len() {
        let e = &toc.entries[i];
        i += 1;
        match e.kind.as_str() {
            "hardlink" => links.push((e.name.clone(), e.link_name.clone())),
            "chunk" => return Err(format!("chunk entry of {:?} does not follow its file", e.name)),
            "reg" if e.size > 0 => {
                let size = e.size as u64;
                let first = t.chunks.len();
                let mut at = 0u64;
                let mut j = i - 1;
                loop {
                    let c = &toc.entries[j];
                    let len = if c.chunk_size > 0 {
                        c.chunk_size as u64
                    } else {
                        size.saturating_sub(c.chunk_offset as u64)
                    };
                    let (off, end) = (c.offset as u64, next[j]);
                    if c.chunk_offset as u64 != at || len == 0 || at + len > size || len > MAX_CHUNK {
                        return Err(format!(
                            "chunks of {:?} do not cover it in order (chunk at {})",
                            e.name, c.chunk_offset
                        ));
                    }
                    if off == 0 || end <= off || end > toc_offset || end - off > MAX_CHUNK_SPAN {
                        return Err(format!(
                            "chunk at {at} of {:?} has a bad blob span {off}..{end}",
                            e.name
                        ));
                    }
                    t.chunks.push(Chunk {
                        file_off: at,
                        len,
                        blob_off: off,
                        blob_end: end,
                        inner: c.inner_offset as u64,
                        digest: parse_sha256(&c.chunk_digest, &e.name)?,
                    });
                    at += len;
                    j += 1;
                    if at == size {
                        break;
                    }
                    match toc.entries.get(j) {
                        Some(n) if n.kind == "chunk" && n.name == e.name => {}
                        _ => return Err(format!("chunks of {:?} end at {at} of {size} bytes", e.name)),
                    }
                }
                i = j;
                if let Some(p) = clean_name(&e.name)? {
                    t.files.insert(p.clone(), (first, t.chunks.len() - first, size));
                    t.mtimes.insert(p, parse_modtime(&e.modtime).unwrap_or(0).max(0));
                }
            }
            _ => {}
        }
    }
    for (name, target) in links {
        let (Some(n), Some(tg)) = (clean_name(&name)?, clean_name(&target)?) else {
            continue;
        };
        if let Some(v) = t.files.get(&tg).copied() {
            t.files.insert(n, v);
        }
    }
    Ok(t)
}

/// The error for a blob that is not a valid eStargz layer.
pub fn bad_layer(what: &str, why: impl Into<String>) -> Error {
    Error::remote(
        what.to_string(),
        why.into(),
        "the layer is not a valid eStargz blob; pull without --lazy, or convert it with `verlay image convert --estargz`",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn footer_round_trips_and_is_51_bytes() {
        let f = footer(0x1234_5678);
        assert_eq!(f.len(), 51);
        assert_eq!(parse_footer(&f), Ok(0x1234_5678));
        let mut bad = f;
        bad[30] = b'z';
        assert!(parse_footer(&bad).is_err());
    }

    #[test]
    fn modtimes_round_trip() {
        for t in [0, 1_700_000_000, 951_782_400, 4_102_444_799] {
            assert_eq!(
                parse_modtime(&format_modtime(t)),
                Some(t),
                "{}",
                format_modtime(t)
            );
        }
        assert_eq!(format_modtime(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(parse_modtime("2023-11-14T22:13:20+01:00"), None);
    }

    #[test]
    fn clean_names() {
        assert_eq!(clean_name("./a//b/").unwrap(), Some(PathBuf::from("a/b")));
        assert_eq!(clean_name("./").unwrap(), None);
        assert!(clean_name("a/../b").is_err());
    }
}
