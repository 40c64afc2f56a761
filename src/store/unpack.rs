//! Unpacking one OCI/Docker layer tar stream into an empty directory, in kernel overlayfs
//! format.
//!
//! Owns: turning tar entries into objects under the layer root, with their owners, modes,
//! times and xattrs; mapping OCI whiteouts (`.wh.NAME` → char 0/0 device, `.wh..wh..opq` →
//! opaque xattr on the directory). Xattrs in the overlay namespace are overlay metadata only
//! in the opaque form; any other is a user's own xattr of that name (as `verlay commit`
//! writes it) and is stored escaped (`trusted.overlay.X` → `trusted.overlay.overlay.X`, as
//! kernel overlayfs stores it), or dropped when it is the other namespace's, so a tarball
//! can never forge a redirect or an origin.
//!
//! Must not: follow a symlink while extracting, or write anything outside the layer root.
//! Every path is resolved relative to the root fd with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS)`, one entry's parent at a time, so a symlink planted by an earlier
//! entry (`a -> /etc`, then `a/passwd`) is refused, never followed. Names with `..` or a
//! leading `/` are refused before any syscall. The caller owns the directory and removes it
//! when this returns an error: nothing here is published.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Timespec, Timestamps, XattrFlags};
use rustix::io::Errno;

use crate::error::{Error, Result};
use crate::layer::{OCI_OPAQUE_MARKER, OCI_WHITEOUT_PREFIX};

/// Prefix of aufs metadata names (`.wh..wh.plnk`, ...); the opaque marker is the one we use.
const AUFS_META_PREFIX: &str = ".wh..wh.";
/// Size of one tar block: headers and data are padded to it.
const BLOCK: u64 = 512;
/// Buffer for copying file data out of the tar stream (large writes, few syscalls).
const COPY_BUF: usize = 1 << 20;
/// PAX record prefix of an xattr (GNU tar and Go's archive/tar both write this form).
const PAX_XATTR_PREFIX: &str = "SCHILY.xattr.";
/// Directories are created writable by us and get their real mode at the end, so that a
/// read-only directory (0555) in the tarball does not stop its own children (as non-root).
const DIR_CREATE_MODE: u32 = 0o700;
/// Mode of parent directories the tarball does not list (what docker and containerd use).
const IMPLICIT_DIR_MODE: u32 = 0o755;
/// Longest entry or link name accepted, the kernel's PATH_MAX: a longer name could not be
/// created or resolved anyway (ENAMETOOLONG).
pub const PATH_MAX: usize = 4096;
/// Largest PAX extended header of one entry. Real layers carry a few hundred bytes (times,
/// long names, a few xattrs); 4 MiB still holds 64 xattr values at the kernel's 64 KiB
/// maximum (XATTR_SIZE_MAX), so no layer a Linux filesystem can produce is refused.
pub const MAX_PAX_RECORDS: u64 = 4 << 20;
/// Bytes the tar crate may read while it assembles one entry (between our requests for the
/// next one): the PAX header, a GNU long name and long link (each at most PATH_MAX plus its
/// header), the headers themselves, and the extension blocks of a GNU sparse map. 1 MiB of
/// room beyond the PAX cap holds all but the PAX header many times over.
pub const MAX_ENTRY_HEADERS: u64 = MAX_PAX_RECORDS + (1 << 20);

/// What an unpack produced.
#[derive(Debug, Default, Clone, Copy)]
pub struct Unpacked {
    /// objects created in the layer (files, dirs, links, whiteouts, ...)
    pub entries: u64,
    /// bytes of regular file content
    pub bytes: u64,
}

/// Metadata of a directory, applied after all entries because creating children would
/// change its mtime, and a read-only mode would stop them.
struct DirMeta {
    rel: Vec<u8>,
    mode: u32,
    times: Timestamps,
}

/// Everything one tar header says about an entry, in owned form.
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    times: Timestamps,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// the tarball carried an overlay opaque xattr for this directory
    opaque: bool,
}

/// Unpacks tar entries below `root`.
pub struct Unpacker<'s> {
    root: Rc<OwnedFd>,
    /// name of the tarball, for messages
    source: &'s str,
    is_root: bool,
    /// `trusted.overlay.opaque`, or `user.overlay.opaque` when we are not root
    opaque_xattr: &'static str,
    /// the parent directory of the last entry (tarballs list siblings together)
    parent_cache: Option<(Vec<u8>, Rc<OwnedFd>)>,
    dirs: Vec<DirMeta>,
    buf: Vec<u8>,
    stats: Unpacked,
    warned_owner: bool,
}

/// Split a tar name into its components. `None` means the layer root (`./`).
/// Errors are the reason the name is refused.
fn components(raw: &[u8]) -> std::result::Result<Vec<&[u8]>, &'static str> {
    if raw.first() == Some(&b'/') {
        return Err("absolute name");
    }
    if raw.contains(&0) {
        return Err("NUL byte in name");
    }
    let mut out = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("'..' component escapes the layer"),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// Printable form of a raw tar name.
fn show(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw).escape_debug().to_string()
}

/// Parse a PAX time (`1700000000.123456789`, possibly negative) into a timespec.
fn pax_time(v: &[u8]) -> Option<Timespec> {
    let s = std::str::from_utf8(v).ok()?;
    let (neg, s) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s),
    };
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = secs.parse().ok()?;
    let mut nsec: i64 = 0;
    for (i, c) in frac.bytes().take(9).enumerate() {
        if !c.is_ascii_digit() {
            return None;
        }
        nsec += i64::from(c - b'0') * 10i64.pow(8 - i as u32);
    }
    Some(if neg {
        if nsec == 0 {
            Timespec {
                tv_sec: -secs,
                tv_nsec: 0,
            }
        } else {
            Timespec {
                tv_sec: -secs - 1,
                tv_nsec: (1_000_000_000 - nsec) as _,
            }
        }
    } else {
        Timespec {
            tv_sec: secs,
            tv_nsec: nsec as _,
        }
    })
}

/// Is this xattr name in the overlay's own namespace (where a tarball could forge
/// redirects, metacopy or origin records)?
fn overlay_xattr(name: &[u8]) -> bool {
    name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.overlay.")
}

/// One PAX record: key and value.
type PaxRecord = (Vec<u8>, Vec<u8>);

/// What the extension headers before one entry said (see [`BudgetState::extended`]).
#[derive(Debug, Default)]
pub struct Extended {
    /// PAX records, in order
    pub pax: Vec<PaxRecord>,
    /// a GNU long name came with the entry (it wins over a PAX `path`, as in the tar crate)
    pub long_name: bool,
    /// a GNU long link came with the entry
    pub long_link: bool,
}

impl Extended {
    /// The value of the last PAX record named `key`.
    fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.pax
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_slice())
    }
}

/// The records of a PAX extended header body, `LEN KEY=VALUE\n` each, walked by LEN.
///
/// Hand-written because the tar crate (0.4.46, `PaxExtensions`) splits the body at every
/// newline before it reads LEN, so a value holding a `\n` byte (binary xattrs such as
/// `security.capability`, names and link targets with newlines) is "malformed pax
/// extension", and the tail of such a value can pass for a record of its own (a value
/// holding `\n22 linkpath=/etc/evil\n` made `Entry::link_name` answer `/etc/evil`).
/// Upstream: composefs/tar-rs issues 428 and 452, open. The crate also keeps the body
/// private, so [`HeaderBudget`] captures it from the stream.
/// `pax_records_keep_newlines_and_refuse_forged_ones` tests both cases.
fn pax_records(body: &[u8]) -> std::result::Result<Vec<PaxRecord>, String> {
    let mut out = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        let len: usize = std::str::from_utf8(&rest[..digits])
            .ok()
            .and_then(|d| d.parse().ok())
            .filter(|&n| digits > 0 && n > digits + 1 && n <= rest.len())
            .ok_or_else(|| format!("malformed PAX record length at byte {}", body.len() - rest.len()))?;
        let record = &rest[..len];
        if record[digits] != b' ' || record[len - 1] != b'\n' {
            return Err(format!(
                "malformed PAX record at byte {}",
                body.len() - rest.len()
            ));
        }
        let kv = &record[digits + 1..len - 1];
        let eq = kv
            .iter()
            .position(|b| *b == b'=')
            .ok_or_else(|| format!("PAX record without '=' at byte {}", body.len() - rest.len()))?;
        out.push((kv[..eq].to_vec(), kv[eq + 1..].to_vec()));
        rest = &rest[len..];
    }
    Ok(out)
}

/// A reader between a tar stream and the tar crate that limits how much the crate reads
/// while it assembles one entry.
///
/// The tar crate reads a PAX header, a GNU long name and a GNU long link whole into memory
/// (`read_to_end`, no limit), before it yields the entry they describe: a header claiming
/// 768 MiB made an import grow by 768 MiB (several GiB for long names). Its raw mode
/// (`Entries::raw(true)`) would leave those entries to us, but also drops what it does well
/// for us (the PAX `size`, `uid`, `gid` overrides that keep the stream in step, GNU sparse
/// maps). So the crate keeps parsing, and this reader is armed with a byte budget around each
/// `Entries::next` call: data of the previous entry has been drained by then, so everything
/// the crate reads in that call is headers, and more than [`MAX_ENTRY_HEADERS`] is an error
/// before memory grows further.
pub struct HeaderBudget<R> {
    inner: R,
    budget: Rc<BudgetState>,
}

/// The shared half of a [`HeaderBudget`]: armed or not, and whether it ran out.
#[derive(Default)]
pub struct BudgetState {
    /// bytes the crate may still read; `None` when not armed
    left: std::cell::Cell<Option<u64>>,
    exceeded: std::cell::Cell<bool>,
    /// offset in the tar stream of the next byte the crate reads
    pos: std::cell::Cell<u64>,
    /// what the crate read while armed (at most [`MAX_ENTRY_HEADERS`]: the headers of one
    /// entry), and the stream offset of its first byte; see [`BudgetState::extended`]
    captured: std::cell::RefCell<Vec<u8>>,
    captured_at: std::cell::Cell<u64>,
}

impl BudgetState {
    /// Did the crate try to read past the budget (a PAX or long-name header too large)?
    pub fn exceeded(&self) -> bool {
        self.exceeded.get()
    }

    /// The next entry of `entries`, with at most [`MAX_ENTRY_HEADERS`] bytes read for it.
    pub fn next_entry<'a, R: Read>(
        &self,
        entries: &mut tar::Entries<'a, R>,
    ) -> Option<io::Result<tar::Entry<'a, R>>> {
        self.captured.borrow_mut().clear();
        self.captured_at.set(self.pos.get());
        self.left.set(Some(MAX_ENTRY_HEADERS));
        let next = entries.next();
        self.left.set(None);
        next
    }

    /// The extension headers of the entry whose header starts at `header_at` (its
    /// `raw_header_position`), read from the bytes [`BudgetState::next_entry`] captured:
    /// its PAX records parsed by their length, and whether GNU long name / long link
    /// entries came with it. Errors say why the headers are malformed.
    pub fn extended(&self, header_at: u64) -> std::result::Result<Extended, String> {
        let cap = self.captured.borrow();
        let start = self.captured_at.get();
        // The capture begins with the padding of the previous entry's data; headers are
        // block-aligned in the stream.
        let mut at = start.div_ceil(BLOCK) * BLOCK;
        let mut ext = Extended::default();
        while at < header_at {
            let off = usize::try_from(at - start).map_err(|e| e.to_string())?;
            let block = cap
                .get(off..off + BLOCK as usize)
                .ok_or("extension header outside the bytes read for the entry")?;
            let h = tar::Header::from_byte_slice(block);
            let size = h.entry_size().map_err(|e| e.to_string())?;
            let body_at = off + BLOCK as usize;
            let body = usize::try_from(size)
                .ok()
                .and_then(|n| cap.get(body_at..body_at.checked_add(n)?))
                .ok_or("extension data outside the bytes read for the entry")?;
            let t = h.entry_type();
            if t.is_pax_local_extensions() {
                ext.pax = pax_records(body)?;
            } else if t.is_gnu_longname() {
                ext.long_name = true;
            } else if t.is_gnu_longlink() {
                ext.long_link = true;
            }
            at += BLOCK + size.div_ceil(BLOCK) * BLOCK;
        }
        if at != header_at {
            return Err("extension headers do not end where the entry's header starts".into());
        }
        Ok(ext)
    }

    /// Why the budget ran out, for a refusal.
    pub fn why() -> String {
        format!(
            "an entry's extended headers (PAX records, GNU long name or long link) are larger \
             than {} MiB",
            MAX_ENTRY_HEADERS >> 20
        )
    }
}

impl<R> HeaderBudget<R> {
    pub fn new(inner: R) -> HeaderBudget<R> {
        HeaderBudget {
            inner,
            budget: Rc::new(BudgetState::default()),
        }
    }

    /// The handle that arms the budget around each entry.
    pub fn state(&self) -> Rc<BudgetState> {
        self.budget.clone()
    }

    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: Read> Read for HeaderBudget<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(left) = self.budget.left.get() else {
            let n = self.inner.read(buf)?;
            self.budget.pos.set(self.budget.pos.get() + n as u64);
            return Ok(n);
        };
        if left == 0 {
            self.budget.exceeded.set(true);
            return Err(io::Error::other(BudgetState::why()));
        }
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.budget.left.set(Some(left - n as u64));
        self.budget.pos.set(self.budget.pos.get() + n as u64);
        self.budget.captured.borrow_mut().extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

impl<R: io::Seek> io::Seek for HeaderBudget<R> {
    fn seek(&mut self, pos: io::SeekFrom) -> io::Result<u64> {
        // Seeking reads nothing into memory: the crate skips data this way.
        let at = self.inner.seek(pos)?;
        self.budget.pos.set(at);
        self.budget.captured.borrow_mut().clear();
        self.budget.captured_at.set(at);
        Ok(at)
    }
}

impl<'s> Unpacker<'s> {
    /// An unpacker into the (empty) directory `root`.
    pub fn new(root: &Path, source: &'s str) -> Result<Unpacker<'s>> {
        let fd = rustix::fs::open(
            root,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
        )
        .map_err(|e| Error::io("import.open_root", root, e.into()))?;
        let is_root = rustix::process::geteuid().is_root();
        Ok(Unpacker {
            root: Rc::new(fd),
            source,
            is_root,
            opaque_xattr: if is_root {
                "trusted.overlay.opaque"
            } else {
                "user.overlay.opaque"
            },
            parent_cache: None,
            dirs: Vec::new(),
            buf: vec![0u8; COPY_BUF],
            stats: Unpacked::default(),
            warned_owner: false,
        })
    }

    /// The overlay namespace of the layers this import makes (`trusted.overlay.`, or
    /// `user.overlay.` when not root).
    fn own_namespace(&self) -> &'static str {
        if self.is_root {
            "trusted.overlay."
        } else {
            "user.overlay."
        }
    }

    /// A refusal: the tarball is hostile or malformed.
    fn refuse(&self, name: &[u8], why: impl std::fmt::Display) -> Error {
        Error::usage(
            format!("layer tarball {}", self.source),
            format!("entry \"{}\": {why}", show(name)),
            "refusing to import it, nothing was published; check where the tarball came from",
        )
    }

    /// The tar stream itself is broken (bad header, short data, decompression error).
    pub fn malformed(source: &str, e: impl std::fmt::Display) -> Error {
        Error::usage(
            format!("layer tarball {source}"),
            format!("truncated or malformed tar stream: {e}"),
            "nothing was published; fetch the layer again",
        )
    }

    /// Unpack every entry of `archive`. Returns the end offset of the last entry's data, so
    /// the caller can check the end-of-archive marker followed it.
    pub fn unpack<R: Read>(
        &mut self,
        archive: &mut tar::Archive<HeaderBudget<R>>,
        budget: &BudgetState,
    ) -> Result<u64> {
        let mut end = 0u64;
        let mut entries = archive.entries().map_err(|e| Self::malformed(self.source, e))?;
        while let Some(entry) = budget.next_entry(&mut entries) {
            let mut entry = entry.map_err(|e| {
                if budget.exceeded() {
                    Error::usage(
                        format!("layer tarball {}", self.source),
                        BudgetState::why(),
                        "refusing to import it, nothing was published; check where the tarball came from",
                    )
                } else {
                    Self::malformed(self.source, e)
                }
            })?;
            let size = entry.size();
            end = entry.raw_file_position() + size.div_ceil(BLOCK) * BLOCK;
            let ext = budget.extended(entry.raw_header_position()).map_err(|why| {
                Self::malformed(
                    self.source,
                    format!("entry \"{}\": {why}", show(&entry.path_bytes())),
                )
            })?;
            self.entry(&mut entry, &ext)?;
            // Whatever data the entry has left (a whiteout's, a directory's) is read here,
            // outside the header budget, so the next call reads headers only.
            io::copy(&mut entry, &mut io::sink()).map_err(|e| Self::malformed(self.source, e))?;
        }
        self.finish_dirs()?;
        Ok(end)
    }

    /// Statistics so far.
    pub fn stats(&self) -> Unpacked {
        self.stats
    }

    fn meta<R: Read>(&self, entry: &mut tar::Entry<'_, R>, ext: &Extended, name: &[u8]) -> Result<Meta> {
        let h = entry.header();
        let mode = h.mode().map_err(|e| self.refuse(name, e))?;
        // PAX `uid`/`gid` (the crate applies them with its own reader, which a record with a
        // newline in it stops).
        let pax_id = |key: &[u8]| -> Result<Option<u64>> {
            ext.get(key)
                .map(|v| {
                    std::str::from_utf8(v)
                        .ok()
                        .and_then(|s| s.parse::<u64>().ok())
                        .ok_or_else(|| self.refuse(name, "bad PAX uid or gid"))
                })
                .transpose()
        };
        let uid = match pax_id(b"uid")? {
            Some(u) => u,
            None => h.uid().map_err(|e| self.refuse(name, e))?,
        };
        let gid = match pax_id(b"gid")? {
            Some(g) => g,
            None => h.gid().map_err(|e| self.refuse(name, e))?,
        };
        let mtime = h.mtime().map_err(|e| self.refuse(name, e))?;
        let uid = u32::try_from(uid).map_err(|_| self.refuse(name, "uid out of range"))?;
        let gid = u32::try_from(gid).map_err(|_| self.refuse(name, "gid out of range"))?;
        let mut mtime = Timespec {
            tv_sec: mtime as i64,
            tv_nsec: 0,
        };
        let mut atime = None;
        let mut xattrs = Vec::new();
        let mut opaque = false;
        let mut bad = None;
        for (key, value) in &ext.pax {
            if key == b"mtime" {
                match pax_time(value) {
                    Some(t) => mtime = t,
                    None => bad = Some("bad PAX mtime"),
                }
            } else if key == b"atime" {
                atime = pax_time(value);
            } else if let Some(x) = key.strip_prefix(PAX_XATTR_PREFIX.as_bytes()) {
                if x == b"trusted.overlay.opaque" || x == b"user.overlay.opaque" {
                    opaque = value == b"y";
                } else if let Some(rest) = x.strip_prefix(self.own_namespace().as_bytes()) {
                    // A user's own xattr in the overlay namespace (what a mount shows
                    // of an escaped `trusted.overlay.overlay.*`; `verlay commit` writes
                    // it so): stored escaped, as kernel overlayfs stores it, so it
                    // means nothing to the overlay and the merged view shows it again.
                    let escaped = [self.own_namespace().as_bytes(), b"overlay.", rest].concat();
                    xattrs.push((escaped, value.clone()));
                } else if overlay_xattr(x) {
                    tracing::warn!(
                        path = %show(name),
                        xattr = %show(x),
                        "dropping an overlay xattr from a layer tarball"
                    );
                } else if !x.is_empty() {
                    xattrs.push((x.to_vec(), value.clone()));
                }
            }
        }
        if let Some(b) = bad {
            return Err(self.refuse(name, b));
        }
        Ok(Meta {
            mode: mode & 0o7777,
            uid,
            gid,
            times: Timestamps {
                last_access: atime.unwrap_or(mtime),
                last_modification: mtime,
            },
            xattrs,
            opaque,
        })
    }

    /// Import one tar entry: its name checked, then a whiteout, or the node of its type.
    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>, ext: &Extended) -> Result<()> {
        let (raw, link) = self.names(entry, ext)?;
        let comps = components(&raw).map_err(|why| self.refuse(&raw, why))?;
        let etype = entry.header().entry_type();
        if etype.is_pax_global_extensions() {
            return Ok(());
        }
        let meta = self.meta(entry, ext, &raw)?;

        let Some((name, parents)) = comps.split_last() else {
            // `./`: the layer root itself.
            if !etype.is_dir() {
                return Err(self.refuse(&raw, "the layer root must be a directory"));
            }
            let root = self.root.clone();
            return self.dir_meta(&root, Vec::new(), &raw, meta);
        };
        let name: &[u8] = name;

        // OCI whiteouts (image-spec layer.md "Whiteouts").
        if name == OCI_OPAQUE_MARKER.as_bytes() {
            let dir = self.resolve_dir(parents, true, &raw)?.ok_or_else(|| {
                // resolve_dir with create=true always yields a directory
                self.refuse(&raw, "parent directory could not be created")
            })?;
            self.set_opaque(&dir, &raw)?;
            return Ok(());
        }
        if name.starts_with(AUFS_META_PREFIX.as_bytes()) {
            // aufs bookkeeping (`.wh..wh.plnk`, `.wh..wh.aufs`): not content, as docker does.
            tracing::debug!(path = %show(&raw), "skipping aufs metadata entry");
            return Ok(());
        }
        if let Some(hidden) = name.strip_prefix(OCI_WHITEOUT_PREFIX.as_bytes()) {
            if matches!(hidden, b"" | b"." | b"..") {
                return Err(self.refuse(&raw, "whiteout of an invalid name"));
            }
            let parent = self.parent(parents, &raw)?;
            self.make_room(&parent, hidden, false, &raw)?;
            return self.whiteout(&parent, hidden, &raw, &meta);
        }

        let parent = self.parent(parents, &raw)?;
        use tar::EntryType as T;
        match etype {
            T::Directory => self.dir_entry(&parent, name, &comps, &raw, meta),
            T::Regular | T::Continuous | T::GNUSparse => self.file_entry(entry, &parent, name, &raw, &meta),
            T::Symlink => {
                let target = link.ok_or_else(|| self.refuse(&raw, "symlink without a target"))?;
                if target.is_empty() || target.contains(&0) {
                    return Err(self.refuse(&raw, "invalid symlink target"));
                }
                self.make_room(&parent, name, false, &raw)?;
                // The target is stored as text and never followed here, so it may point
                // anywhere: later entries that go through it are refused by resolve_dir.
                rustix::fs::symlinkat(target.as_slice(), &*parent, name)
                    .map_err(|e| self.io("import.symlink", &raw, e))?;
                self.stats.entries += 1;
                self.node_meta(&parent, name, &meta, &raw, false)
            }
            T::Link => {
                let target = link.ok_or_else(|| self.refuse(&raw, "hard link without a target"))?;
                self.hard_link(&parent, name, &comps, &target, &raw)
            }
            T::Char | T::Block | T::Fifo => self.device_entry(entry, &parent, name, &raw, &meta),
            other => Err(self.refuse(&raw, format!("unsupported tar entry type {other:?}"))),
        }
    }

    /// The entry's name and link target from our PAX reading (see `pax_records`), as the
    /// crate would take them: a GNU long name or link first, then PAX, then the header; both
    /// checked against PATH_MAX.
    fn names<R: Read>(
        &self,
        entry: &tar::Entry<'_, R>,
        ext: &Extended,
    ) -> Result<(Vec<u8>, Option<Vec<u8>>)> {
        let raw = match ext.get(b"path").filter(|_| !ext.long_name) {
            Some(p) => p.to_vec(),
            None => entry.path_bytes().into_owned(),
        };
        let link: Option<Vec<u8>> = match ext.get(b"linkpath").filter(|_| !ext.long_link) {
            Some(l) => Some(l.to_vec()),
            None => entry.link_name_bytes().map(|l| l.into_owned()),
        };
        // The crate sizes the entry's data from a PAX `size` with its own reader; if that
        // missed it, the stream is out of step.
        if let Some(size) = ext.get(b"size") {
            if std::str::from_utf8(size).ok().and_then(|s| s.parse::<u64>().ok()) != Some(entry.size()) {
                return Err(self.refuse(&raw, "PAX size the tar reader did not apply"));
            }
        }
        if raw.len() > PATH_MAX {
            return Err(self.refuse(
                &raw[..64],
                format!("name of {} bytes is longer than PATH_MAX ({PATH_MAX})", raw.len()),
            ));
        }
        if let Some(link) = &link {
            if link.len() > PATH_MAX {
                return Err(self.refuse(
                    &raw,
                    format!(
                        "link target of {} bytes is longer than PATH_MAX ({PATH_MAX})",
                        link.len()
                    ),
                ));
            }
        }
        Ok((raw, link))
    }

    /// A directory entry: made unless one is there already, then its metadata (applied when
    /// the layer is done, see `finish_dirs`).
    fn dir_entry(
        &mut self,
        parent: &OwnedFd,
        name: &[u8],
        comps: &[&[u8]],
        raw: &[u8],
        meta: Meta,
    ) -> Result<()> {
        let existing_dir = self.make_room(parent, name, true, raw)?;
        if !existing_dir {
            rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(DIR_CREATE_MODE))
                .map_err(|e| self.io("import.mkdir", raw, e))?;
            self.stats.entries += 1;
        }
        let fd = rustix::fs::openat(
            parent,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| self.io("import.open_dir", raw, e))?;
        let rel = comps.join(&b'/');
        self.dir_meta(&fd, rel, raw, meta)
    }

    /// A regular file: created, its data copied (all of it, unless sparse), then owner, mode,
    /// xattrs and times.
    fn file_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        parent: &OwnedFd,
        name: &[u8],
        raw: &[u8],
        meta: &Meta,
    ) -> Result<()> {
        self.make_room(parent, name, false, raw)?;
        let fd = rustix::fs::openat(
            parent,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| self.io("import.create", raw, e))?;
        let mut file = File::from(fd);
        let want = entry.size();
        let mut got = 0u64;
        loop {
            let n = match entry.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Self::malformed(self.source, e)),
            };
            file.write_all(&self.buf[..n])
                .map_err(|e| Error::io("import.write", PathBuf::from(show(raw)), e))?;
            got += n as u64;
        }
        if entry.header().entry_type() != tar::EntryType::GNUSparse && got != want {
            return Err(Self::malformed(
                self.source,
                format!("entry \"{}\": data ends after {got} of {want} bytes", show(raw)),
            ));
        }
        self.stats.bytes += got;
        self.stats.entries += 1;
        let fd = OwnedFd::from(file);
        self.chown(Some(&fd), parent, name, meta, raw)?;
        // After chown: chown clears setuid/setgid.
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(meta.mode))
            .map_err(|e| self.io("import.chmod", raw, e))?;
        for (k, v) in &meta.xattrs {
            rustix::fs::fsetxattr(&fd, k.as_slice(), v, XattrFlags::empty())
                .or_else(|e| self.xattr_failed(e, k, raw))?;
        }
        rustix::fs::futimens(&fd, &meta.times).map_err(|e| self.io("import.utimens", raw, e))
    }

    /// A character or block device or a FIFO (devices need root).
    fn device_entry<R: Read>(
        &mut self,
        entry: &tar::Entry<'_, R>,
        parent: &OwnedFd,
        name: &[u8],
        raw: &[u8],
        meta: &Meta,
    ) -> Result<()> {
        let h = entry.header();
        let major = h.device_major().map_err(|e| self.refuse(raw, e))?.unwrap_or(0);
        let minor = h.device_minor().map_err(|e| self.refuse(raw, e))?.unwrap_or(0);
        let ft = match h.entry_type() {
            tar::EntryType::Char => FileType::CharacterDevice,
            tar::EntryType::Block => FileType::BlockDevice,
            _ => FileType::Fifo,
        };
        self.make_room(parent, name, false, raw)?;
        rustix::fs::mknodat(
            parent,
            name,
            ft,
            Mode::from_raw_mode(0o600),
            rustix::fs::makedev(major, minor),
        )
        .map_err(|e| {
            if e == Errno::PERM && ft != FileType::Fifo {
                Error::usage(
                    format!("layer tarball {}", self.source),
                    format!("entry \"{}\": creating a device node needs root", show(raw)),
                    "import the layer as root",
                )
            } else {
                self.io("import.mknod", raw, e)
            }
        })?;
        self.stats.entries += 1;
        self.node_meta(parent, name, meta, raw, true)
    }

    fn io(&self, op: &'static str, raw: &[u8], e: Errno) -> Error {
        Error::io(op, PathBuf::from(show(raw)), e.into())
    }

    /// The fd of `parents` (created if missing), for an entry named `raw`.
    fn parent(&mut self, parents: &[&[u8]], raw: &[u8]) -> Result<Rc<OwnedFd>> {
        self.resolve_dir(parents, true, raw)?
            .ok_or_else(|| self.refuse(raw, "parent directory is missing"))
    }

    /// Open directory `comps` below the root without following any symlink. With `create`,
    /// missing directories are made; without it a missing one gives `None`.
    fn resolve_dir(&mut self, comps: &[&[u8]], create: bool, raw: &[u8]) -> Result<Option<Rc<OwnedFd>>> {
        if comps.is_empty() {
            return Ok(Some(self.root.clone()));
        }
        let key = comps.join(&b'/');
        if let Some((k, fd)) = &self.parent_cache {
            if *k == key {
                return Ok(Some(fd.clone()));
            }
        }
        let fd = match open_beneath(&self.root, &key) {
            Ok(fd) => fd,
            Err(Errno::NOENT) if create => {
                let mut cur = self.root.clone();
                for c in comps {
                    let next = match open_beneath(&cur, c) {
                        Err(Errno::NOENT) => {
                            rustix::fs::mkdirat(&*cur, *c, Mode::from_raw_mode(IMPLICIT_DIR_MODE))
                                .map_err(|e| self.io("import.mkdir_parent", raw, e))?;
                            self.stats.entries += 1;
                            open_beneath(&cur, c)
                        }
                        r => r,
                    }
                    .map_err(|e| self.resolve_error(raw, &key, e))?;
                    cur = Rc::new(next);
                }
                self.parent_cache = Some((key, cur.clone()));
                return Ok(Some(cur));
            }
            Err(Errno::NOENT) => return Ok(None),
            Err(e) => return Err(self.resolve_error(raw, &key, e)),
        };
        let fd = Rc::new(fd);
        self.parent_cache = Some((key, fd.clone()));
        Ok(Some(fd))
    }

    /// Why opening directory `dir` (below the root) failed, for the entry `raw`.
    fn resolve_error(&self, raw: &[u8], dir: &[u8], e: Errno) -> Error {
        const THROUGH_SYMLINK: &str = "its path goes through a symlink (refusing to write outside the layer)";
        match e {
            Errno::LOOP | Errno::XDEV => self.refuse(raw, THROUGH_SYMLINK),
            Errno::NOTDIR => {
                // O_NOFOLLOW|O_DIRECTORY on a symlink also says ENOTDIR: find the culprit.
                let comps: Vec<&[u8]> = dir.split(|b| *b == b'/').filter(|c| !c.is_empty()).collect();
                for i in 0..comps.len() {
                    let Ok(at) = open_beneath(&self.root, &comps[..i].join(&b'/')) else {
                        break;
                    };
                    match rustix::fs::statat(&at, comps[i], AtFlags::SYMLINK_NOFOLLOW) {
                        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Symlink => {
                            return self.refuse(raw, THROUGH_SYMLINK)
                        }
                        Ok(st) if FileType::from_raw_mode(st.st_mode) != FileType::Directory => break,
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                self.refuse(raw, "a component of its path is not a directory")
            }
            e => self.io("import.resolve", raw, e),
        }
    }

    /// Remove what is at `name` unless both it and the new entry are directories (then the
    /// directory is kept, as tar and docker do). Returns true when a directory was kept.
    fn make_room(&mut self, parent: &OwnedFd, name: &[u8], new_is_dir: bool, raw: &[u8]) -> Result<bool> {
        let st = match rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::NOENT) => return Ok(false),
            Err(e) => return Err(self.io("import.stat", raw, e)),
        };
        let is_dir = FileType::from_raw_mode(st.st_mode) == FileType::Directory;
        if is_dir && new_is_dir {
            return Ok(true);
        }
        if is_dir {
            // Any cached directory fd may be inside what we remove.
            self.parent_cache = None;
            remove_tree(parent, name).map_err(|e| self.io("import.replace_dir", raw, e))?;
        } else {
            rustix::fs::unlinkat(parent, name, AtFlags::empty())
                .map_err(|e| self.io("import.replace", raw, e))?;
        }
        Ok(false)
    }

    fn whiteout(&mut self, parent: &OwnedFd, hidden: &[u8], raw: &[u8], meta: &Meta) -> Result<()> {
        match rustix::fs::mknodat(parent, hidden, FileType::CharacterDevice, Mode::empty(), 0) {
            Ok(()) => {}
            Err(Errno::PERM) if !self.is_root => {
                // Without CAP_MKNOD keep the OCI form: verlay reads `.wh.NAME` as a
                // whiteout (kernel overlayfs would not, but it needs root for trusted.*).
                let wh = [OCI_WHITEOUT_PREFIX.as_bytes(), hidden].concat();
                rustix::fs::openat(
                    parent,
                    wh.as_slice(),
                    OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| self.io("import.whiteout", raw, e))?;
            }
            Err(e) => return Err(self.io("import.whiteout", raw, e)),
        }
        self.stats.entries += 1;
        self.chown(None, parent, hidden, meta, raw)?;
        rustix::fs::utimensat(parent, hidden, &meta.times, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| self.io("import.utimens", raw, e))
    }

    fn set_opaque(&self, dir: &OwnedFd, raw: &[u8]) -> Result<()> {
        match rustix::fs::fsetxattr(dir, self.opaque_xattr, b"y", XattrFlags::empty()) {
            // uid 0 of a user namespace (`podman unshare verlay als serve`) may not set
            // trusted.*: the user form, which verlay and overlayfs's userxattr read
            Err(Errno::PERM) if self.opaque_xattr.starts_with("trusted.") => {
                rustix::fs::fsetxattr(dir, "user.overlay.opaque", b"y", XattrFlags::empty())
            }
            r => r,
        }
        .map_err(|e| self.io("import.opaque", raw, e))
    }

    /// Owner, xattrs and deferred mode/times of a directory.
    fn dir_meta(&mut self, fd: &OwnedFd, rel: Vec<u8>, raw: &[u8], meta: Meta) -> Result<()> {
        if self.is_root {
            rustix::fs::fchown(
                fd,
                Some(rustix::fs::Uid::from_raw(meta.uid)),
                Some(rustix::fs::Gid::from_raw(meta.gid)),
            )
            .map_err(|e| self.io("import.chown", raw, e))?;
        } else {
            self.note_owner(&meta);
        }
        for (k, v) in &meta.xattrs {
            rustix::fs::fsetxattr(fd, k.as_slice(), v, XattrFlags::empty())
                .or_else(|e| self.xattr_failed(e, k, raw))?;
        }
        if meta.opaque {
            self.set_opaque(fd, raw)?;
        }
        self.dirs.push(DirMeta {
            rel,
            mode: meta.mode,
            times: meta.times,
        });
        Ok(())
    }

    /// Owner, mode, xattrs and times of a symlink, device or fifo, by name in `parent`.
    fn node_meta(
        &mut self,
        parent: &OwnedFd,
        name: &[u8],
        meta: &Meta,
        raw: &[u8],
        chmod: bool,
    ) -> Result<()> {
        self.chown(None, parent, name, meta, raw)?;
        if chmod {
            // Not a symlink (we just created it), so chmodat acts on the node itself.
            rustix::fs::chmodat(parent, name, Mode::from_raw_mode(meta.mode), AtFlags::empty())
                .map_err(|e| self.io("import.chmod", raw, e))?;
        }
        if !meta.xattrs.is_empty() {
            // No fd-based xattr call works on a symlink or device: go through the parent's
            // fd in /proc, which names our verified directory, and do not follow `name`.
            let p = proc_fd_path(parent).join(std::ffi::OsStr::new(
                std::str::from_utf8(name).map_err(|_| self.refuse(raw, "xattr on a non-UTF-8 name"))?,
            ));
            for (k, v) in &meta.xattrs {
                rustix::fs::lsetxattr(&p, k.as_slice(), v, XattrFlags::empty())
                    .or_else(|e| self.xattr_failed(e, k, raw))?;
            }
        }
        rustix::fs::utimensat(parent, name, &meta.times, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| self.io("import.utimens", raw, e))
    }

    fn chown(
        &mut self,
        fd: Option<&OwnedFd>,
        parent: &OwnedFd,
        name: &[u8],
        meta: &Meta,
        raw: &[u8],
    ) -> Result<()> {
        if !self.is_root {
            self.note_owner(meta);
            return Ok(());
        }
        let uid = Some(rustix::fs::Uid::from_raw(meta.uid));
        let gid = Some(rustix::fs::Gid::from_raw(meta.gid));
        match fd {
            Some(fd) => rustix::fs::fchown(fd, uid, gid),
            None => rustix::fs::chownat(parent, name, uid, gid, AtFlags::SYMLINK_NOFOLLOW),
        }
        .map_err(|e| self.io("import.chown", raw, e))
    }

    fn note_owner(&mut self, meta: &Meta) {
        let me = rustix::process::geteuid().as_raw();
        if !self.warned_owner && (meta.uid != me || meta.gid != rustix::process::getegid().as_raw()) {
            self.warned_owner = true;
            tracing::warn!("not root: layer files keep our own uid/gid, not the tarball's owners");
        }
    }

    fn xattr_failed(&self, e: Errno, name: &[u8], raw: &[u8]) -> Result<()> {
        if !self.is_root && matches!(e, Errno::PERM | Errno::NOTSUP) {
            tracing::warn!(path = %show(raw), xattr = %show(name), "not root: xattr skipped");
            return Ok(());
        }
        Err(Error::io(
            "import.setxattr",
            PathBuf::from(format!("{} ({})", show(raw), show(name))),
            e.into(),
        ))
    }

    fn hard_link(
        &mut self,
        parent: &OwnedFd,
        name: &[u8],
        comps: &[&[u8]],
        target: &[u8],
        raw: &[u8],
    ) -> Result<()> {
        let tcomps =
            components(target).map_err(|why| self.refuse(raw, format!("hard link target: {why}")))?;
        let Some((tname, tparents)) = tcomps.split_last() else {
            return Err(self.refuse(raw, "hard link to the layer root"));
        };
        if tcomps == comps {
            return Err(self.refuse(raw, "hard link to itself"));
        }
        let missing = || {
            self.refuse(
                raw,
                format!("hard link to \"{}\", which is not in the layer", show(target)),
            )
        };
        // Resolve the target without following symlinks and without creating anything.
        let tdir = tparents.join(&b'/');
        let tparent = match open_beneath(&self.root, &tdir) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Err(missing()),
            Err(e) => return Err(self.resolve_error(raw, &tdir, e)),
        };
        match rustix::fs::statat(&tparent, *tname, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                return Err(self.refuse(raw, "hard link to a directory"))
            }
            Ok(_) => {}
            Err(Errno::NOENT) => return Err(missing()),
            Err(e) => return Err(self.io("import.stat", raw, e)),
        }
        self.make_room(parent, name, false, raw)?;
        // No AT_SYMLINK_FOLLOW: a link to a symlink links the symlink itself.
        rustix::fs::linkat(&tparent, *tname, parent, name, AtFlags::empty())
            .map_err(|e| self.io("import.link", raw, e))?;
        self.stats.entries += 1;
        Ok(())
    }

    /// Apply the directories' modes and times, now that their children exist.
    fn finish_dirs(&mut self) -> Result<()> {
        self.parent_cache = None;
        for d in std::mem::take(&mut self.dirs).iter().rev() {
            let fd = if d.rel.is_empty() {
                match rustix::fs::openat(
                    &*self.root,
                    ".",
                    OFlags::RDONLY | OFlags::DIRECTORY,
                    Mode::empty(),
                ) {
                    Ok(fd) => fd,
                    Err(e) => return Err(self.io("import.open_dir", b".", e)),
                }
            } else {
                match open_beneath(&self.root, &d.rel) {
                    Ok(fd) => fd,
                    // replaced by a later entry with something else
                    Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP) => continue,
                    Err(e) => return Err(self.io("import.open_dir", &d.rel, e)),
                }
            };
            rustix::fs::fchmod(&fd, Mode::from_raw_mode(d.mode))
                .map_err(|e| self.io("import.chmod", &d.rel, e))?;
            rustix::fs::futimens(&fd, &d.times).map_err(|e| self.io("import.utimens", &d.rel, e))?;
        }
        Ok(())
    }
}

/// Open directory `rel` below `dir` without following any symlink or leaving `dir`.
fn open_beneath(dir: &OwnedFd, rel: &[u8]) -> rustix::io::Result<OwnedFd> {
    let rel: &[u8] = if rel.is_empty() { b"." } else { rel };
    rustix::fs::openat2(
        dir,
        rel,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH
            | ResolveFlags::NO_SYMLINKS
            | ResolveFlags::NO_MAGICLINKS
            | ResolveFlags::NO_XDEV,
    )
}

/// `/proc/self/fd/N` of a directory fd, for the calls that have no fd form.
fn proc_fd_path(fd: &OwnedFd) -> PathBuf {
    use std::os::fd::AsRawFd;
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd()))
}

/// Remove the directory `name` in `parent` and everything below it, never following a
/// symlink.
pub fn remove_tree(parent: &OwnedFd, name: &[u8]) -> rustix::io::Result<()> {
    let fd = rustix::fs::openat(
        parent,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut names = Vec::new();
    for ent in rustix::fs::Dir::read_from(&fd)? {
        let ent = ent?;
        let n = ent.file_name().to_bytes();
        if n == b"." || n == b".." {
            continue;
        }
        names.push((n.to_vec(), ent.file_type() == FileType::Directory));
    }
    for (n, is_dir) in names {
        if is_dir {
            remove_tree(&fd, &n)?;
        } else {
            match rustix::fs::unlinkat(&fd, n.as_slice(), AtFlags::empty()) {
                Err(Errno::ISDIR) => remove_tree(&fd, &n)?,
                r => r?,
            }
        }
    }
    rustix::fs::unlinkat(parent, name, AtFlags::REMOVEDIR)
}

/// fsync every regular file and directory below `dir` (after a syncfs has written them
/// back, so each fsync is cheap and reports any writeback error for its file).
pub fn fsync_tree(dir: &OwnedFd, rel: &mut PathBuf) -> Result<u64> {
    let mut n = 0u64;
    let mut subdirs = Vec::new();
    for ent in rustix::fs::Dir::read_from(dir)
        .map_err(|e| Error::io("import.fsync_readdir", rel.clone(), e.into()))?
    {
        let ent = ent.map_err(|e| Error::io("import.fsync_readdir", rel.clone(), e.into()))?;
        let name = ent.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        match ent.file_type() {
            FileType::Directory => subdirs.push(name.to_vec()),
            FileType::RegularFile => {
                let fd = rustix::fs::openat(
                    dir,
                    name,
                    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .and_then(|fd| rustix::fs::fsync(&fd))
                .map_err(|e| Error::io("import.fsync", rel.join(show(name)), e.into()));
                fd?;
                n += 1;
            }
            _ => {}
        }
    }
    for name in subdirs {
        let fd = rustix::fs::openat(
            dir,
            name.as_slice(),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io("import.fsync", rel.join(show(&name)), e.into()))?;
        rel.push(show(&name));
        n += fsync_tree(&fd, rel)?;
        rel.pop();
    }
    rustix::fs::fsync(dir).map_err(|e| Error::io("import.fsync_dir", rel.clone(), e.into()))?;
    Ok(n + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_refuse_escapes() {
        type Case<'a> = (&'a [u8], std::result::Result<Vec<&'a [u8]>, ()>);
        let table: &[Case] = &[
            (b"./a/b", Ok(vec![b"a", b"b"])),
            (b"a//b/", Ok(vec![b"a", b"b"])),
            (b"./", Ok(vec![])),
            (b"/etc/passwd", Err(())),
            (b"a/../../x", Err(())),
            (b"..", Err(())),
            (b"a\0b", Err(())),
        ];
        for (raw, want) in table {
            assert_eq!(components(raw).map_err(|_| ()), *want, "{}", show(raw));
        }
    }

    #[test]
    fn pax_times_keep_nanoseconds() {
        let t = pax_time(b"1700000000.123456789").unwrap();
        assert_eq!((t.tv_sec, t.tv_nsec), (1700000000, 123456789));
        let t = pax_time(b"1700000000.5").unwrap();
        assert_eq!((t.tv_sec, t.tv_nsec), (1700000000, 500000000));
        let t = pax_time(b"-1.25").unwrap();
        assert_eq!((t.tv_sec, t.tv_nsec), (-2, 750000000));
        assert!(pax_time(b"12x").is_none());
    }

    /// A tarball whose PAX header carries a value with newlines, read as the unpack reads
    /// it. The tar crate's own reader gets it wrong both ways (if a later crate reads PAX by
    /// length, the two `crate` asserts fail: then `pax_records` can go).
    #[test]
    fn pax_records_keep_newlines_and_refuse_forged_ones() {
        let value: &[u8] = b"A\n22 linkpath=/etc/evil\n\0\nB";
        let long: Vec<u8> = [&b"dir\nwith newline/"[..], &[b'n'; 150][..]].concat();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_size(700); // data with padding before the next headers
        h.set_entry_type(tar::EntryType::Regular);
        h.set_path("first").unwrap();
        h.set_cksum();
        b.append(&h, &[7u8; 700][..]).unwrap();
        b.append_pax_extensions([("path", &long[..]), ("SCHILY.xattr.user.bin", value)])
            .unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_path("short").unwrap();
        h.set_link_name("harmless").unwrap();
        h.set_size(0);
        h.set_cksum();
        b.append(&h, &[][..]).unwrap();
        let bytes = b.into_inner().unwrap();

        let stream = HeaderBudget::new(&bytes[..]);
        let budget = stream.state();
        let mut archive = tar::Archive::new(stream);
        let mut entries = archive.entries().unwrap();
        let mut first = budget.next_entry(&mut entries).unwrap().unwrap();
        let ext = budget.extended(first.raw_header_position()).unwrap();
        assert!(ext.pax.is_empty());
        io::copy(&mut first, &mut io::sink()).unwrap();
        drop(first);
        let mut link = budget.next_entry(&mut entries).unwrap().unwrap();
        let ext = budget.extended(link.raw_header_position()).unwrap();
        assert_eq!(ext.get(b"SCHILY.xattr.user.bin"), Some(value));
        assert_eq!(ext.get(b"path"), Some(&long[..]));
        assert_eq!(ext.get(b"linkpath"), None, "a value's tail is no record");
        // What the crate makes of the same bytes.
        assert_eq!(
            link.link_name_bytes().as_deref(),
            Some(&b"/etc/evil"[..]),
            "crate"
        );
        assert!(
            link.pax_extensions().unwrap().unwrap().any(|r| r.is_err()),
            "crate"
        );

        assert!(pax_records(b"5 a=\n").is_ok());
        assert_eq!(
            pax_records(b"6 a=b\n").unwrap(),
            vec![(b"a".to_vec(), b"b".to_vec())]
        );
        for bad in [
            &b"7 a=b\n"[..],
            b"4 a=b\n",
            b"x a=b\n",
            b"5 ab\n\n",
            b"+5 a=\n",
            b"3 a",
        ] {
            assert!(pax_records(bad).is_err(), "{}", show(bad));
        }
    }
}
