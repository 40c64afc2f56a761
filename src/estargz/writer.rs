//! Write an eStargz blob from a tar stream, as the Go `estargz.Writer` does in its
//! lossless mode: every tar block of the input is kept byte for byte, each regular file's
//! data is cut into chunks that each start a new gzip member (so a reader can inflate one
//! chunk from its offset), and the TOC (`stargz.index.json`, a tar entry in its own member)
//! and the 51-byte footer end the blob. A `.no.prefetch.landmark` entry comes first.
//!
//! The uncompressed stream is an ordinary tar: the input's entries (its end-of-archive
//! blocks dropped), then the TOC entry and a new end-of-archive. Its sha256 is the layer's
//! new diffID (the TOC entry is part of the layer, as with the Go writer).

use std::collections::BTreeMap;
use std::io::{Read, Write};

use flate2::write::GzEncoder;
use flate2::Compression;
use sha2::{Digest, Sha256};

use super::toc::{self, Toc, TocEntry};
use crate::digest::hex;

/// Default uncompressed bytes per chunk. Smaller than the Go default (4 MiB): a first read
/// then fetches little more than it needs, and a lazily read chunk is verified whole before
/// any of it is served. The price is one TOC entry (~250 bytes) per chunk.
pub const DEFAULT_CHUNK: u64 = 256 << 10;
/// Largest PAX header or GNU long name/link kept in memory.
const MAX_EXT: u64 = 4 << 20;
const BLOCK: u64 = 512;

/// What was written.
#[derive(Debug, Clone)]
pub struct Written {
    /// sha256 of the TOC JSON (the `containerd.io/snapshot/stargz/toc.digest` annotation)
    pub toc_digest: String,
    /// sha256 of the uncompressed tar stream
    pub diff_id: String,
    /// the blob's length
    pub size: u64,
    /// the uncompressed stream's length
    pub uncompressed: u64,
}

/// The gzip side: members written whole to `out`, the uncompressed bytes hashed.
struct Members<W: Write> {
    out: W,
    /// compressed bytes written so far (the offset of the next member)
    at: u64,
    cur: Option<GzEncoder<Vec<u8>>>,
    diff: Sha256,
    uncompressed: u64,
}

impl<W: Write> Members<W> {
    fn put(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.diff.update(data);
        self.uncompressed += data.len() as u64;
        self.cur
            .get_or_insert_with(|| GzEncoder::new(Vec::new(), Compression::default()))
            .write_all(data)
    }

    /// End the open member, if any; returns the offset the next member will have.
    fn close(&mut self) -> std::io::Result<u64> {
        if let Some(gz) = self.cur.take() {
            let bytes = gz.finish()?;
            self.out.write_all(&bytes)?;
            self.at += bytes.len() as u64;
        }
        Ok(self.at)
    }

    fn pad(&mut self, len: u64) -> std::io::Result<()> {
        let n = (BLOCK - len % BLOCK) % BLOCK;
        self.put(&vec![0u8; n as usize])
    }
}

/// What the extension entries before an entry said about it.
#[derive(Default)]
struct Pending {
    name: Option<Vec<u8>>,
    link: Option<Vec<u8>>,
    size: Option<u64>,
    uid: Option<u64>,
    gid: Option<u64>,
    xattrs: BTreeMap<String, String>,
}

/// PAX records `LEN key=value\n`.
fn pax_records(data: &[u8], p: &mut Pending) -> std::result::Result<(), String> {
    let mut rest = data;
    while !rest.is_empty() {
        let sp = rest
            .iter()
            .position(|&b| b == b' ')
            .ok_or("malformed PAX record")?;
        let len: usize = std::str::from_utf8(&rest[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .filter(|&l| l > sp + 1 && l <= rest.len())
            .ok_or("malformed PAX record length")?;
        let rec = &rest[sp + 1..len - 1];
        rest = &rest[len..];
        let eq = rec
            .iter()
            .position(|&b| b == b'=')
            .ok_or("PAX record without '='")?;
        let (k, v) = (&rec[..eq], &rec[eq + 1..]);
        let num = || std::str::from_utf8(v).ok().and_then(|s| s.parse::<u64>().ok());
        match k {
            b"path" => p.name = Some(v.to_vec()),
            b"linkpath" => p.link = Some(v.to_vec()),
            b"size" => p.size = num(),
            b"uid" => p.uid = num(),
            b"gid" => p.gid = num(),
            _ => {
                if let Some(x) = k.strip_prefix(b"SCHILY.xattr.") {
                    p.xattrs
                        .insert(String::from_utf8_lossy(x).into_owned(), toc::encode_xattr(v));
                }
            }
        }
    }
    Ok(())
}

fn trim_nul(v: &[u8]) -> Vec<u8> {
    let end = v.iter().position(|&b| b == 0).unwrap_or(v.len());
    v[..end].to_vec()
}

/// Write the eStargz form of the tar stream `src` to `out`, `chunk` bytes per chunk.
pub fn write(src: impl Read, out: impl Write, chunk: u64) -> std::result::Result<Written, String> {
    let chunk = chunk.clamp(4096, toc::MAX_CHUNK);
    let io = |e: std::io::Error| e.to_string();
    let mut m = Members {
        out,
        at: 0,
        cur: None,
        diff: Sha256::new(),
        uncompressed: 0,
    };
    let mut toc = Toc {
        version: 1,
        entries: Vec::new(),
    };
    put_landmark(&mut m, &mut toc, chunk)?;

    let mut ar = tar::Archive::new(src);
    let entries = ar.entries().map_err(io)?.raw(true);
    let mut p = Pending::default();
    for e in entries {
        let mut e = e.map_err(|e| format!("input tar: {e}"))?;
        let h = e.header().clone();
        let ty = h.entry_type();
        if matches!(
            ty,
            tar::EntryType::XHeader
                | tar::EntryType::XGlobalHeader
                | tar::EntryType::GNULongName
                | tar::EntryType::GNULongLink
        ) {
            if e.size() > MAX_EXT {
                return Err(format!(
                    "an extension header of {} bytes (more than {MAX_EXT})",
                    e.size()
                ));
            }
            let mut data = Vec::new();
            e.read_to_end(&mut data).map_err(io)?;
            match ty {
                tar::EntryType::XHeader => pax_records(&data, &mut p)?,
                tar::EntryType::GNULongName => p.name = Some(trim_nul(&data)),
                tar::EntryType::GNULongLink => p.link = Some(trim_nul(&data)),
                _ => {}
            }
            m.put(h.as_bytes()).map_err(io)?;
            m.put(&data).map_err(io)?;
            m.pad(data.len() as u64).map_err(io)?;
            continue;
        }
        let p = std::mem::take(&mut p);
        let size = e.size();
        let mut ent = toc_entry(&e, &h, p)?;
        let name = ent.name.clone();
        if ent.kind == "reg" {
            ent.size = size as i64;
            reg_file(&mut m, &mut toc, h.as_bytes(), ent, &mut e, size, chunk)?;
        } else {
            m.put(h.as_bytes()).map_err(io)?;
            let n = std::io::copy(&mut e, &mut std::io::sink()).map_err(io)?;
            if n > 0 {
                return Err(format!("{name:?}: a {} entry with data", ent.kind));
            }
            toc.entries.push(ent);
        }
    }
    finish(m, &toc)
}

/// The landmark entry that says the layer has no prefetch list, first in the layer.
fn put_landmark<W: Write>(m: &mut Members<W>, toc: &mut Toc, chunk: u64) -> std::result::Result<(), String> {
    let io = |e: std::io::Error| e.to_string();
    let mut lh = tar::Header::new_ustar();
    lh.set_path(toc::NO_PREFETCH_LANDMARK).map_err(io)?;
    lh.set_size(1);
    lh.set_mode(0);
    lh.set_uid(0);
    lh.set_gid(0);
    lh.set_mtime(0);
    lh.set_entry_type(tar::EntryType::Regular);
    lh.set_cksum();
    let landmark = TocEntry {
        name: toc::NO_PREFETCH_LANDMARK.into(),
        kind: "reg".into(),
        size: 1,
        ..Default::default()
    };
    reg_file(
        m,
        toc,
        lh.as_bytes(),
        landmark,
        &mut &[toc::LANDMARK_CONTENTS][..],
        1,
        chunk,
    )
}

/// The TOC entry of the tar entry `e` (header `h`), with what its extension headers said (`p`).
fn toc_entry<R: Read>(
    e: &tar::Entry<'_, R>,
    h: &tar::Header,
    p: Pending,
) -> std::result::Result<TocEntry, String> {
    let io = |e: std::io::Error| e.to_string();
    let ty = h.entry_type();
    let name = p.name.unwrap_or_else(|| e.path_bytes().into_owned());
    let name = String::from_utf8(name)
        .map_err(|_| "an entry name that is not UTF-8 (the TOC is JSON)".to_string())?;
    if toc::clean_name(&name)?.is_some_and(|n| n.as_os_str() == toc::TOC_NAME) {
        return Err(format!(
            "the layer already has a {} (it is eStargz already)",
            toc::TOC_NAME
        ));
    }
    let size = e.size();
    if p.size.is_some_and(|s| s != size) {
        return Err(format!("{name:?}: PAX size differs from the header's"));
    }
    let link = p.link.or_else(|| e.link_name_bytes().map(|l| l.into_owned()));
    let mut ent = TocEntry {
        name: name.clone(),
        mode: i64::from(h.mode().map_err(io)? & 0o7777),
        uid: p.uid.map_or_else(|| h.uid().map_err(io), Ok)? as i64,
        gid: p.gid.map_or_else(|| h.gid().map_err(io), Ok)? as i64,
        modtime: toc::format_modtime(h.mtime().map_err(io)? as i64),
        link_name: link
            .map(|l| String::from_utf8_lossy(&l).into_owned())
            .unwrap_or_default(),
        xattrs: p.xattrs,
        ..Default::default()
    };
    ent.kind = match ty {
        tar::EntryType::Regular | tar::EntryType::Continuous => "reg",
        tar::EntryType::Directory => "dir",
        tar::EntryType::Symlink => "symlink",
        tar::EntryType::Link => "hardlink",
        tar::EntryType::Char => "char",
        tar::EntryType::Block => "block",
        tar::EntryType::Fifo => "fifo",
        other => {
            return Err(format!(
                "{name:?}: tar entry type {other:?} is not supported in eStargz"
            ))
        }
    }
    .into();
    if matches!(ty, tar::EntryType::Char | tar::EntryType::Block) {
        ent.dev_major = i64::from(h.device_major().map_err(io)?.unwrap_or(0));
        ent.dev_minor = i64::from(h.device_minor().map_err(io)?.unwrap_or(0));
    }
    Ok(ent)
}

/// A regular file: its header in the open member, then each chunk in a member of its own.
fn reg_file<W: Write>(
    m: &mut Members<W>,
    toc: &mut Toc,
    header: &[u8],
    mut ent: TocEntry,
    data: &mut dyn Read,
    size: u64,
    chunk: u64,
) -> std::result::Result<(), String> {
    let io = |e: std::io::Error| e.to_string();
    m.put(header).map_err(io)?;
    let mut whole = Sha256::new();
    let mut buf = vec![0u8; chunk.min(size) as usize];
    let mut written = 0u64;
    let mut entries = Vec::new();
    while written < size {
        let len = chunk.min(size - written);
        let b = &mut buf[..len as usize];
        data.read_exact(b).map_err(|e| format!("{:?}: {e}", ent.name))?;
        ent.offset = m.close().map_err(io)? as i64;
        ent.chunk_offset = written as i64;
        ent.chunk_size = if len == chunk && written + len < size {
            len as i64
        } else {
            0
        };
        ent.chunk_digest = format!("sha256:{}", hex(&Sha256::digest(&*b)));
        whole.update(&*b);
        m.put(b).map_err(io)?;
        written += len;
        entries.push(std::mem::replace(
            &mut ent,
            TocEntry {
                name: String::new(),
                kind: "chunk".into(),
                ..Default::default()
            },
        ));
        ent.name = entries[0].name.clone();
    }
    if entries.is_empty() {
        entries.push(ent);
    } else {
        entries[0].digest = format!("sha256:{}", hex(&whole.finalize()));
    }
    toc.entries.extend(entries);
    m.pad(size).map_err(io)
}

/// The TOC entry in its own member, the end-of-archive, the footer.
fn finish<W: Write>(mut m: Members<W>, toc: &Toc) -> std::result::Result<Written, String> {
    let io = |e: std::io::Error| e.to_string();
    let json = serde_json::to_vec_pretty(toc).map_err(|e| e.to_string())?;
    let toc_offset = m.close().map_err(io)?;
    let mut h = tar::Header::new_ustar();
    h.set_path(toc::TOC_NAME).map_err(io)?;
    h.set_size(json.len() as u64);
    h.set_mode(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    m.put(h.as_bytes()).map_err(io)?;
    m.put(&json).map_err(io)?;
    m.pad(json.len() as u64).map_err(io)?;
    m.put(&[0u8; 1024]).map_err(io)?;
    m.close().map_err(io)?;
    m.out.write_all(&toc::footer(toc_offset)).map_err(io)?;
    m.out.flush().map_err(io)?;
    Ok(Written {
        toc_digest: format!("sha256:{}", hex(&Sha256::digest(&json))),
        diff_id: format!("sha256:{}", hex(&m.diff.finalize())),
        size: m.at + toc::FOOTER_SIZE,
        uncompressed: m.uncompressed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::estargz::toc::{chunk_table, parse_footer, parse_toc, read_toc_member, FOOTER_SIZE};
    use std::io::Read;

    /// A tar with files of 0, 1, 4096 (= one chunk), 8192 (two exact chunks) and 10000
    /// bytes, a long name and an xattr.
    fn sample() -> (Vec<u8>, Vec<(String, Vec<u8>)>) {
        let mut b = tar::Builder::new(Vec::new());
        let mut files = Vec::new();
        for (name, n) in [
            ("e", 0usize),
            ("one", 1),
            ("c1", 4096),
            ("c2", 8192),
            ("odd", 10000),
        ] {
            files.push((
                name.to_string(),
                (0..n).map(|i| (i * 7 % 251) as u8).collect::<Vec<u8>>(),
            ));
        }
        files.push((format!("d/{}", "n".repeat(200)), b"long name".to_vec()));
        b.append_pax_extensions([("SCHILY.xattr.user.k", &b"v"[..])])
            .unwrap();
        for (name, data) in &files {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_uid(1000);
            h.set_gid(1000);
            h.set_mtime(1_700_000_000);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, name, data.as_slice()).unwrap();
        }
        (b.into_inner().unwrap(), files)
    }

    #[test]
    fn every_chunk_inflates_from_its_offset_to_its_digest_and_the_stream_is_the_tar() {
        let (tar, files) = sample();
        let mut blob = Vec::new();
        let w = write(tar.as_slice(), &mut blob, 4096).unwrap();
        assert_eq!(w.size, blob.len() as u64);
        let toc_off = parse_footer(&blob[blob.len() - FOOTER_SIZE as usize..]).unwrap();
        let m = read_toc_member(&blob[toc_off as usize..blob.len() - FOOTER_SIZE as usize]).unwrap();
        assert_eq!(format!("sha256:{}", hex(&Sha256::digest(&m.json))), w.toc_digest);
        let toc = parse_toc(&m.json).unwrap();
        assert!(
            toc.entries.iter().any(|e| e.xattrs.contains_key("user.k")),
            "xattr in the TOC"
        );
        let t = chunk_table(&toc, toc_off).unwrap();
        for (name, data) in &files {
            let Some(&(first, count, size)) = t.files.get(std::path::Path::new(name)) else {
                assert!(data.is_empty(), "{name} has no chunks");
                continue;
            };
            assert_eq!(size, data.len() as u64, "{name}");
            assert_eq!(count as u64, (size).div_ceil(4096), "{name}");
            for c in &t.chunks[first..first + count] {
                let span = &blob[c.blob_off as usize..c.blob_end as usize];
                let mut got = Vec::new();
                flate2::read::GzDecoder::new(span)
                    .take(c.len)
                    .read_to_end(&mut got)
                    .unwrap();
                assert_eq!(
                    got,
                    data[c.file_off as usize..(c.file_off + c.len) as usize],
                    "{name} at {}",
                    c.file_off
                );
                assert_eq!(Sha256::digest(&got)[..], c.digest[..]);
            }
        }
        // the whole blob inflates to the input's entries, the landmark and the TOC
        let mut plain = Vec::new();
        flate2::read::MultiGzDecoder::new(blob.as_slice())
            .read_to_end(&mut plain)
            .unwrap();
        assert_eq!(format!("sha256:{}", hex(&Sha256::digest(&plain))), w.diff_id);
        let names: Vec<String> = tar::Archive::new(plain.as_slice())
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(names.first().map(String::as_str), Some(".no.prefetch.landmark"));
        assert_eq!(names.last().map(String::as_str), Some("stargz.index.json"));
        assert_eq!(names.len(), files.len() + 2);
    }

    #[test]
    fn refused_inputs_and_tocs() {
        // a layer that is eStargz already
        let (tar, _) = sample();
        let mut blob = Vec::new();
        write(tar.as_slice(), &mut blob, 4096).unwrap();
        let mut plain = Vec::new();
        flate2::read::MultiGzDecoder::new(blob.as_slice())
            .read_to_end(&mut plain)
            .unwrap();
        assert!(write(plain.as_slice(), &mut Vec::new(), 4096)
            .unwrap_err()
            .contains("eStargz already"));
        // a name over PATH_MAX, a chunk table with a gap
        let long = format!(
            r#"{{"version":1,"entries":[{{"name":"{}","type":"dir"}}]}}"#,
            "a".repeat(5000)
        );
        assert!(parse_toc(long.as_bytes()).unwrap_err().contains("longer than"));
        let d = format!("sha256:{}", "0".repeat(64));
        let gap = format!(
            r#"{{"version":1,"entries":[{{"name":"f","type":"reg","size":10,"offset":10,"chunkSize":4,"chunkDigest":"{d}"}},
            {{"name":"f","type":"chunk","offset":20,"chunkOffset":5,"chunkDigest":"{d}"}}]}}"#
        );
        assert!(chunk_table(&parse_toc(gap.as_bytes()).unwrap(), 100)
            .unwrap_err()
            .contains("do not cover"));
        let neg = r#"{"version":1,"entries":[{"name":"f","type":"reg","size":-1}]}"#;
        assert!(parse_toc(neg.as_bytes()).unwrap_err().contains("negative"));
    }
}
