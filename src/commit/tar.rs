//! Steps 7 and 8 of a commit: the layer's items as a deterministic OCI layer tarball,
//! streamed into the store's import (which publishes the layer) and, when asked, into the
//! `--output` file, published once the import is done.
//!
//! The tarball is a function of the items alone: ustar headers without user or group
//! names, whole-second mtimes, device numbers on every entry, and PAX records (`path`,
//! `linkpath`, `SCHILY.xattr.NAME`) in a PAX header entry with a fixed name and fields. Its
//! sha256 is the layer's diffID, so the same upper state always gives the same layer.
//!
//! Why this writes the headers itself rather than through the `tar` crate's `Builder`
//! (tar 0.4.46, checked):
//! - `Builder::append_pax_extensions` takes its keys as `&str`: an xattr whose name is not
//!   UTF-8 (Linux takes any bytes but NUL) cannot become a `SCHILY.xattr.` record through
//!   it. `pax_xattr_with_a_name_that_is_not_utf8_reads_back` tests that case.
//! - `append_data`/`append_link` put a path or link target over 100 bytes into a GNU
//!   `././@LongLink` entry (`L`/`K`), or split a path into ustar's prefix field; we write
//!   PAX `path`/`linkpath` records, one extension format with the xattrs.
//! - Its bytes differ from the ones verlay has always written: `Header::set_cksum` writes
//!   seven octal digits and a NUL where we write six, NUL, space (GNU tar's form), and the
//!   header entry `append_pax_extensions` makes has an empty name and an all-NUL mode. Every
//!   diffID of the same upper state would change.
//! - Its `Drop` (and `into_inner`) writes the end-of-archive blocks even after a failed
//!   entry: a commit whose copy failed halfway would hand the import a terminated stream
//!   instead of a cut one.
//!
//! What is left (block padding, the end-of-archive blocks) is three lines here.
//!
//! Must not: read the live upper; publish `--output` before the layer is in the store.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags};
use sha2::{Digest, Sha256};

use super::snapshot::{DataFile, DataLoc};
use super::stage::{Staged, COPY_BUF};
use super::translate::{bytes_path, Data, Item, ItemKind};
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::store::{ImportOptions, Imported, Store};

/// Size of one tar block: headers and data are padded to it.
const BLOCK: usize = 512;
/// Longest name a ustar header holds without a PAX `path` record.
const USTAR_NAME_MAX: usize = 100;
/// PAX record prefix of an xattr (GNU tar and Go's archive/tar both write this form).
const PAX_XATTR_PREFIX: &str = "SCHILY.xattr.";
/// Name of every PAX extended header entry: fixed, so the tarball is deterministic (GNU
/// tar puts its pid there).
const PAX_HEADER_NAME: &[u8] = b"././@PaxHeader";

/// Step 7: write the tarball of `items` into a pipe read by the store's import, and into
/// `output` if given. Returns what the import made, and the diffID (sha256 of the stream)
/// and size of what was written.
pub(super) fn import(
    store: &Store,
    opts: &ImportOptions,
    items: &[Item],
    data: &Staged,
    merged: Option<&crate::union::Union>,
    output: Option<&mut Output>,
    progress: &Progress,
) -> Result<(Imported, String, u64)> {
    // A socket pair as the pipe (std::io::pipe needs a newer Rust than our MSRV): EOF when
    // the writer is done, EPIPE for the writer when the import stopped reading.
    let (reader, writer) = UnixStream::pair().map_err(|e| Error::io("commit.pipe", "", e))?;
    let (imported, written) = std::thread::scope(|scope| {
        let out_file = output.map(|o| &mut o.file);
        let producer = scope.spawn(move || -> Result<(String, u64)> {
            let sink = Tee {
                a: io::BufWriter::with_capacity(COPY_BUF, writer),
                b: out_file.map(|f| io::BufWriter::with_capacity(COPY_BUF, f)),
            };
            let mut w = TarWriter {
                out: sink,
                hasher: Sha256::new(),
                bytes: 0,
            };
            write_tar(&mut w, items, data, merged)?;
            w.out.flush().map_err(|e| Error::io("commit.tar", "", e))?;
            Ok((crate::digest::sha256_id(&w.hasher.finalize()), w.bytes))
        });
        let imported = store.import_layer(&mut progress.reader(&reader, "layer tar", None), opts);
        // Unblocks a producer still writing when the import stopped early.
        drop(reader);
        let written = producer.join().unwrap_or_else(|_| {
            Err(Error::io(
                "commit.tar",
                "",
                io::Error::other("the tar writer panicked"),
            ))
        });
        (imported, written)
    });
    // A failed writer explains a failed import (a cut stream), so it is reported first.
    let (diff_id, tar_bytes) = written?;
    Ok((imported?, diff_id, tar_bytes))
}

/// Octal field of a ustar header, NUL-terminated; base-256 (GNU) when it does not fit.
fn put_num(field: &mut [u8], v: u64) {
    let digits = field.len() - 1;
    if v < 1u64 << (3 * digits as u32) {
        let s = format!("{v:0digits$o}");
        field[..digits].copy_from_slice(s.as_bytes());
        field[digits] = 0;
    } else {
        field.fill(0);
        let mut x = v;
        for b in field.iter_mut().rev() {
            *b = (x & 0xff) as u8;
            x >>= 8;
        }
        field[0] |= 0x80;
    }
}

/// The numeric fields of a header.
#[derive(Debug, Clone, Copy, Default)]
struct Fields {
    perm: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: i64,
    rdev: u64,
}

/// A ustar header block with fixed fields: no user or group names, no sub-second times.
fn header(name: &[u8], typeflag: u8, link: &[u8], f: Fields) -> [u8; BLOCK] {
    let Fields {
        perm,
        uid,
        gid,
        size,
        mtime,
        rdev,
    } = f;
    let mut h = [0u8; BLOCK];
    let n = name.len().min(USTAR_NAME_MAX);
    h[..n].copy_from_slice(&name[..n]);
    put_num(&mut h[100..108], u64::from(perm));
    put_num(&mut h[108..116], u64::from(uid));
    put_num(&mut h[116..124], u64::from(gid));
    put_num(&mut h[124..136], size);
    put_num(&mut h[136..148], mtime.max(0) as u64);
    h[156] = typeflag;
    let l = link.len().min(USTAR_NAME_MAX);
    h[157..157 + l].copy_from_slice(&link[..l]);
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    // Device numbers are written for every entry (zero but for devices): readers such as
    // the tar crate refuse an empty field on a fifo.
    let (major, minor) = if typeflag == b'3' || typeflag == b'4' {
        (rustix::fs::major(rdev), rustix::fs::minor(rdev))
    } else {
        (0, 0)
    };
    put_num(&mut h[329..337], u64::from(major));
    put_num(&mut h[337..345], u64::from(minor));
    // The checksum is computed with its own field as spaces.
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    h
}

/// One PAX record: `LEN KEY=VALUE\n`, LEN counting the whole record.
fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let body = key.len() + value.len() + 3; // space, '=', '\n'
    let mut len = body + 1;
    while len.to_string().len() + body != len {
        len = len.to_string().len() + body;
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

/// Writes the tarball: counts and hashes what it writes (the diffID).
struct TarWriter<W: Write> {
    out: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> TarWriter<W> {
    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.hasher.update(b);
        self.bytes += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self, len: u64) -> io::Result<()> {
        let rem = (len % BLOCK as u64) as usize;
        if rem != 0 {
            self.put(&[0u8; BLOCK][..BLOCK - rem])?;
        }
        Ok(())
    }

    /// Header (with a PAX header before it when a field does not fit or xattrs exist).
    fn entry(
        &mut self,
        it: &Item,
        typeflag: u8,
        link: &[u8],
        size: u64,
        with_xattrs: bool,
    ) -> io::Result<()> {
        let name = match it.kind {
            ItemKind::Dir if it.path.is_empty() => b"./".to_vec(),
            ItemKind::Dir => [it.path.as_slice(), b"/"].concat(),
            _ => it.path.clone(),
        };
        let mut pax = Vec::new();
        if link.len() > USTAR_NAME_MAX {
            pax_record(&mut pax, b"linkpath", link);
        }
        if name.len() > USTAR_NAME_MAX {
            pax_record(&mut pax, b"path", &name);
        }
        if with_xattrs {
            for (k, v) in &it.xattrs {
                pax_record(&mut pax, &[PAX_XATTR_PREFIX.as_bytes(), k].concat(), v);
            }
        }
        if !pax.is_empty() {
            let f = Fields {
                perm: 0o644,
                size: pax.len() as u64,
                ..Fields::default()
            };
            let h = header(PAX_HEADER_NAME, b'x', b"", f);
            self.put(&h)?;
            self.put(&pax)?;
            self.pad(pax.len() as u64)?;
        }
        let f = Fields {
            perm: it.perm,
            uid: it.uid,
            gid: it.gid,
            size,
            mtime: it.mtime,
            rdev: it.rdev,
        };
        let h = header(&name, typeflag, link, f);
        self.put(&h)
    }
}

/// Write every item as a tar entry, file data from the staging copy or the union.
fn write_tar<W: Write>(
    w: &mut TarWriter<W>,
    items: &[Item],
    data: &Staged,
    merged: Option<&crate::union::Union>,
) -> Result<()> {
    let ioerr = |p: &[u8]| {
        let p = bytes_path(p);
        move |e: io::Error| Error::io("commit.tar", p, e)
    };
    let mut groups: HashMap<u64, usize> = HashMap::new();
    for it in items {
        if let Some(k) = it.link_key {
            *groups.entry(k).or_default() += 1;
        }
    }
    let mut first: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut buf = vec![0u8; COPY_BUF];
    for it in items {
        let e = ioerr(&it.path);
        match it.kind {
            ItemKind::Dir => w.entry(it, b'5', b"", 0, true).map_err(e)?,
            ItemKind::Whiteout | ItemKind::Opaque => w.entry(it, b'0', b"", 0, false).map_err(e)?,
            ItemKind::Symlink => w.entry(it, b'2', &it.target, 0, false).map_err(e)?,
            ItemKind::Fifo => w.entry(it, b'6', b"", 0, true).map_err(e)?,
            ItemKind::Char => w.entry(it, b'3', b"", 0, true).map_err(e)?,
            ItemKind::Block => w.entry(it, b'4', b"", 0, true).map_err(e)?,
            ItemKind::File => {
                if let Some(k) = it.link_key.filter(|k| groups.get(k).copied().unwrap_or(0) > 1) {
                    if let Some(target) = first.get(&k) {
                        w.entry(it, b'1', target, 0, false).map_err(e)?;
                        continue;
                    }
                    first.insert(k, it.path.clone());
                }
                let size = match it.data {
                    Data::Staged(DataFile { size, .. }) | Data::Union { size, .. } => size,
                    Data::None => 0,
                };
                w.entry(it, b'0', b"", size, true).map_err(ioerr(&it.path))?;
                copy_item_data(w, it, size, data, merged, &mut buf)?;
                w.pad(size).map_err(ioerr(&it.path))?;
            }
        }
    }
    // End of archive: two zero blocks.
    w.put(&[0u8; 2 * BLOCK]).map_err(ioerr(b""))?;
    Ok(())
}

/// Exactly `size` bytes of an item's data; anything else is an error (never "write too
/// long", never a short entry).
fn copy_item_data<W: Write>(
    w: &mut TarWriter<W>,
    it: &Item,
    size: u64,
    data: &Staged,
    merged: Option<&crate::union::Union>,
    buf: &mut [u8],
) -> Result<()> {
    let short = |got: u64| {
        Error::io(
            "commit.tar",
            bytes_path(&it.path),
            io::Error::other(format!("the frozen copy has {got} bytes, its size was {size}")),
        )
    };
    let e = |x: io::Error| Error::io("commit.tar", bytes_path(&it.path), x);
    match it.data {
        Data::None => Ok(()),
        Data::Staged(d) => {
            let (fd, base) = match d.loc {
                DataLoc::File => (
                    Some(
                        data.open_file(d.id)
                            .map_err(|x| Error::io("commit.tar", bytes_path(&it.path), x.into()))?,
                    ),
                    0,
                ),
                DataLoc::Packed(off) => (None, off),
            };
            let fd = fd.as_ref().unwrap_or(&data.packed);
            let mut done = 0u64;
            while done < size {
                let want = ((size - done) as usize).min(buf.len());
                let n = rustix::io::pread(fd, &mut buf[..want], base + done).map_err(|x| e(x.into()))?;
                if n == 0 {
                    return Err(short(done));
                }
                w.put(&buf[..n]).map_err(e)?;
                done += n as u64;
            }
            Ok(())
        }
        Data::Union { node, .. } => {
            let u = merged.ok_or_else(|| short(0))?;
            let ctx = crate::union::Ctx {
                uid: 0,
                gid: 0,
                pid: 0,
                umask: 0,
            };
            let fh = u.open(&ctx, node, libc::O_RDONLY)?;
            let mut done = 0u64;
            let r = (|| {
                while done < size {
                    let want = ((size - done) as usize).min(buf.len()) as u32;
                    let chunk = u.read(fh, done, want)?;
                    if chunk.is_empty() {
                        return Err(short(done));
                    }
                    w.put(&chunk).map_err(e)?;
                    done += chunk.len() as u64;
                }
                Ok(())
            })();
            u.release(fh);
            r
        }
    }
}

/// The `--output` file, created unnamed (O_TMPFILE) where the filesystem allows, so a crash
/// leaves nothing behind; published by [`Output::publish`].
pub(super) struct Output {
    file: std::fs::File,
    dest: PathBuf,
    /// a named temp, when O_TMPFILE is not supported
    named: Option<PathBuf>,
}

impl Output {
    /// Step 1's check of `--output DEST`: a file in an existing directory.
    pub fn check(o: &Path) -> Result<()> {
        let parent = o
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !parent.is_dir() || o.is_dir() {
            return Err(Error::usage(
                format!("--output \"{}\"", o.display()),
                if o.is_dir() {
                    "is a directory"
                } else {
                    "its directory does not exist"
                },
                "give the path of a file to write the layer tarball to",
            ));
        }
        Ok(())
    }

    pub fn create(dest: &Path) -> Result<Output> {
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        match rustix::fs::open(
            &dir,
            OFlags::TMPFILE | OFlags::WRONLY | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        ) {
            Ok(fd) => Ok(Output {
                file: std::fs::File::from(fd),
                dest: dest.to_path_buf(),
                named: None,
            }),
            Err(_) => {
                let tmp = tmp_beside(dest);
                let file = std::fs::File::create(&tmp).map_err(|e| Error::io("commit.output", &tmp, e))?;
                Ok(Output {
                    file,
                    dest: dest.to_path_buf(),
                    named: Some(tmp),
                })
            }
        }
    }

    /// fsync, give it its name (over an older file), fsync the directory.
    pub fn publish(self) -> Result<()> {
        let dest = &self.dest;
        self.file
            .sync_all()
            .map_err(|e| Error::io("commit.output_fsync", dest, e))?;
        let tmp = match &self.named {
            Some(t) => t.clone(),
            None => {
                let tmp = tmp_beside(dest);
                let fdpath = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&self.file));
                rustix::fs::linkat(
                    rustix::fs::CWD,
                    fdpath.as_str(),
                    rustix::fs::CWD,
                    &tmp,
                    AtFlags::SYMLINK_FOLLOW,
                )
                .map_err(|e| Error::io("commit.output_link", &tmp, e.into()))?;
                tmp
            }
        };
        std::fs::rename(&tmp, dest).map_err(|e| Error::io("commit.output_rename", dest, e))?;
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let d = rustix::fs::open(
            &dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io("commit.output_fsync_dir", &dir, e.into()))?;
        rustix::fs::fsync(&d).map_err(|e| Error::io("commit.output_fsync_dir", &dir, e.into()))
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        if let Some(t) = &self.named {
            let _ = std::fs::remove_file(t);
        }
    }
}

fn tmp_beside(dest: &Path) -> PathBuf {
    let name = dest.file_name().unwrap_or(OsStr::new("layer.tar"));
    let mut t = OsString::from(".");
    t.push(name);
    t.push(format!(".verlay-tmp.{}", std::process::id()));
    dest.with_file_name(t)
}

/// Writes to two sinks (the import pipe and the `--output` file).
struct Tee<A: Write, B: Write> {
    a: A,
    b: Option<B>,
}

impl<A: Write, B: Write> Write for Tee<A, B> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.a.write_all(buf)?;
        if let Some(b) = &mut self.b {
            b.write_all(buf)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.a.flush()?;
        if let Some(b) = &mut self.b {
            b.flush()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_record_length_counts_itself() {
        for (k, v) in [
            (&b"path"[..], &b"x"[..]),
            (b"SCHILY.xattr.user.k", &[b'v'; 95][..]),
        ] {
            let mut out = Vec::new();
            pax_record(&mut out, k, v);
            let (len, _) = out.split_at(out.iter().position(|b| *b == b' ').unwrap());
            let len: usize = std::str::from_utf8(len).unwrap().parse().unwrap();
            assert_eq!(len, out.len(), "{}", String::from_utf8_lossy(&out));
        }
    }

    #[test]
    fn numbers_too_big_for_octal_use_base_256() {
        let mut f = [0u8; 8];
        put_num(&mut f, 0o755);
        assert_eq!(&f, b"0000755\0");
        let mut f = [0u8; 8];
        put_num(&mut f, 1 << 40);
        assert_eq!(f[0] & 0x80, 0x80);
    }

    fn item(path: &[u8], kind: ItemKind, xattrs: Vec<(Vec<u8>, Vec<u8>)>) -> Item {
        Item {
            path: path.to_vec(),
            kind,
            perm: 0o755,
            uid: 0,
            gid: 0,
            mtime: 1_700_000_000,
            rdev: 0,
            xattrs,
            target: Vec::new(),
            data: Data::None,
            link_key: None,
        }
    }

    /// What the module doc says the `tar` crate's builder cannot write: a `SCHILY.xattr.`
    /// record whose name is not UTF-8 (its PAX keys are `&str`), plus a path and a hard
    /// link target over 100 bytes as PAX records. The crate's reader reads all of it back.
    #[test]
    fn pax_xattr_with_a_name_that_is_not_utf8_reads_back() {
        let name = b"user.caf\xe9".to_vec();
        assert!(std::str::from_utf8(&name).is_err());
        let long = [b'd'; 150].to_vec();
        let mut w = TarWriter {
            out: Vec::new(),
            hasher: Sha256::new(),
            bytes: 0,
        };
        let dir = item(b"d", ItemKind::Dir, vec![(name.clone(), b"v\0\xff".to_vec())]);
        w.entry(&dir, b'5', b"", 0, true).unwrap();
        let file = item(&long, ItemKind::File, Vec::new());
        w.entry(&file, b'0', b"", 0, true).unwrap();
        let link = item(b"l", ItemKind::File, Vec::new());
        w.entry(&link, b'1', &long, 0, false).unwrap();
        w.put(&[0u8; 2 * BLOCK]).unwrap();
        assert_eq!(w.bytes, w.out.len() as u64);
        assert_eq!(
            crate::digest::sha256_id(&w.hasher.finalize()),
            crate::digest::sha256_digest(&w.out)
        );

        let mut ar = ::tar::Archive::new(&w.out[..]);
        let mut entries = ar.entries().unwrap();
        let mut d = entries.next().unwrap().unwrap();
        assert_eq!(&*d.path_bytes(), b"d/");
        let pax: Vec<(Vec<u8>, Vec<u8>)> = d
            .pax_extensions()
            .unwrap()
            .unwrap()
            .map(|x| {
                let x = x.unwrap();
                (x.key_bytes().to_vec(), x.value_bytes().to_vec())
            })
            .collect();
        assert_eq!(
            pax,
            [([b"SCHILY.xattr.".as_slice(), &name].concat(), b"v\0\xff".to_vec())]
        );
        assert_eq!(d.header().mode().unwrap(), 0o755);
        assert_eq!(d.header().mtime().unwrap(), 1_700_000_000);
        let f = entries.next().unwrap().unwrap();
        assert_eq!(&*f.path_bytes(), long.as_slice());
        let l = entries.next().unwrap().unwrap();
        assert_eq!(l.header().entry_type(), ::tar::EntryType::Link);
        assert_eq!(&*l.link_name_bytes().unwrap(), long.as_slice());
        assert!(entries.next().is_none());
    }
}
