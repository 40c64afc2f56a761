//! `verlay commit`: the upper of a live mount becomes a new layer of the store.
//!
//! Owns: finding the mount's daemon ([`crate::control`]), the point-in-time snapshot of the
//! upper taken while the daemon holds its commit gate, the translation of the kernel
//! overlayfs upper into an OCI layer tarball, and handing that tarball to
//! [`Store::import_layer`], which publishes the layer crash-safely.
//!
//! Sequence (docs/ordering.md, "commit"; each step is a crash point):
//! 1. checks: MOUNTPOINT is the root of a verlay mount with an upper, the store exists and is
//!    not inside the mount, the parent layer is in the store. Nothing is changed before
//!    they pass.
//! 2. the store is opened (its lock held to the end; leftovers of earlier runs removed) and
//!    a staging dir `STORE/tmp/commit-PID-NANOS` is made, on the store's filesystem.
//!    Then, still outside the freeze, a syncfs of the mount (shared-mmap writes reach the
//!    daemon) and of the upper's filesystem (the copy below is not throttled behind its
//!    dirty pages).
//! 3. `commit.freeze`: the daemon holds the gate exclusive: no change to the upper runs.
//! 4. `commit.snapshot`: the upper's tree (names, types, modes, owners, times, xattrs,
//!    symlink targets, device numbers, hard links) is read into memory and every regular
//!    file's data is copied into the staging dir, once per inode: a FICLONE reflink into
//!    `data/N` when the filesystem can, else copy_file_range (holes kept) into one file,
//!    `data/packed`, at a block-aligned offset (one create for all: the freeze is shorter).
//! 5. `commit.thaw`: the daemon releases the gate; writers go on. Everything after this
//!    reads only the staging copy and the lower layers, which never change.
//! 6. `commit.materialize` (only when a directory carries `overlay.redirect`): the snapshot
//!    is laid out as a real upper tree in `staging/upper`, so the merged view of renamed
//!    directories can be read with the union code itself.
//! 7. the tar is written into a pipe read by the store's import (`import.unpack` ...
//!    `import.publish`), and into the `--output` file if asked.
//! 8. `commit.output`: the tarball is published at `--output` (temp, fsync, rename).
//! 9. `commit.cleanup`: the staging dir is removed.
//!
//! Must not: write to the mount, the upper or the lowers; hold the gate for anything but
//! step 4; read a live upper file after step 5.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps, XattrFlags};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::layer::{is_whiteout_stat, Kind, LayerDir, OCI_OPAQUE_MARKER, OCI_WHITEOUT_PREFIX};
use crate::store::{ImportOptions, Store};
use crate::upper::crash_point;

/// Usage of the command, repeated in its argument errors.
pub const USAGE: &str = "verlay commit MOUNTPOINT --store DIR [--parent CHAIN_ID] [--output layer.tar]";

/// Size of one tar block: headers and data are padded to it.
const BLOCK: usize = 512;
/// Longest name a ustar header holds without a PAX `path` record.
const USTAR_NAME_MAX: usize = 100;
/// Buffer for copying file data into the tar stream.
const COPY_BUF: usize = 1 << 20;
/// PAX record prefix of an xattr (GNU tar and Go's archive/tar both write this form).
const PAX_XATTR_PREFIX: &str = "SCHILY.xattr.";
/// Name of every PAX extended header entry: fixed, so the tarball is deterministic (GNU
/// tar puts its pid there).
const PAX_HEADER_NAME: &[u8] = b"././@PaxHeader";
/// The overlay namespaces: their xattrs are overlay metadata, never layer content.
const OVERLAY_NAMESPACES: [&str; 2] = ["trusted.overlay.", "user.overlay."];

/// The parsed command line.
#[derive(Debug, Clone)]
pub struct CommitArgs {
    /// the mount to commit
    pub mountpoint: PathBuf,
    /// the layer store
    pub store: PathBuf,
    /// chain ID (or unique prefix) of the layer below
    pub parent: Option<String>,
    /// also write the layer tarball here
    pub output: Option<PathBuf>,
}

/// What a commit produced.
#[derive(Debug, Clone)]
pub struct Committed {
    /// chain ID of the new (or already present) layer
    pub chain_id: String,
    /// sha256 of the uncompressed tar stream
    pub diff_id: String,
    /// how long the daemon held writers, as it measured
    pub paused_us: u64,
    /// entries of the upper snapshot
    pub entries: u64,
    /// bytes of file data copied into the staging dir
    pub bytes: u64,
}

fn usage(why: impl Into<String>) -> Error {
    Error::usage("verlay commit", why, format!("usage: {USAGE}"))
}

/// Parse `verlay commit ...` (the words after `commit`).
pub fn parse(args: &[OsString]) -> Result<CommitArgs> {
    let mut mountpoint = None;
    let mut store = None;
    let mut parent = None;
    let mut output = None;
    let mut it = args.iter();
    let mut only_positional = false;
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if only_positional || !s.starts_with("--") {
            if mountpoint.replace(PathBuf::from(a)).is_some() {
                return Err(usage("expected one MOUNTPOINT"));
            }
            continue;
        }
        if s == "--" {
            only_positional = true;
            continue;
        }
        let (name, inline) = match s.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(OsString::from(v))),
            None => (s.to_string(), None),
        };
        let slot = match name.as_str() {
            "--store" => &mut store,
            "--parent" => &mut parent,
            "--output" => &mut output,
            _ => return Err(usage(format!("unknown option {name}"))),
        };
        let v = match inline {
            Some(v) => v,
            None => it
                .next()
                .cloned()
                .ok_or_else(|| usage(format!("{name} needs a value")))?,
        };
        *slot = Some(v);
    }
    let mountpoint = mountpoint.ok_or_else(|| usage("MOUNTPOINT is required"))?;
    let store = store.ok_or_else(|| usage("--store DIR is required"))?;
    Ok(CommitArgs {
        mountpoint,
        store: PathBuf::from(store),
        parent: parent.map(|p| p.to_string_lossy().into_owned()),
        output: output.map(PathBuf::from),
    })
}

/// `verlay commit ...`: commit, then print the chain ID and the diffID.
pub fn cmd(args: Vec<OsString>) -> Result<()> {
    if matches!(
        args.first().and_then(|a| a.to_str()),
        Some("-h" | "--help" | "help")
    ) {
        println!("{USAGE}");
        return Ok(());
    }
    let a = parse(&args)?;
    let c = commit(&a)?;
    eprintln!(
        "verlay commit: writers paused for {:.3} ms ({} entries, {} bytes of file data copied)",
        c.paused_us as f64 / 1000.0,
        c.entries,
        c.bytes
    );
    println!("chain_id {}", c.chain_id);
    println!("diff_id {}", c.diff_id);
    Ok(())
}

// ------------------------------------------------------------------------------ the mount

/// A connection to the daemon of the mount being committed.
struct Daemon {
    stream: UnixStream,
    lines: io::BufReader<UnixStream>,
    socket: PathBuf,
}

impl Daemon {
    fn request(&mut self, v: Value) -> io::Result<Value> {
        use std::io::BufRead;
        let mut line = v.to_string();
        line.push('\n');
        self.stream.write_all(line.as_bytes())?;
        let mut answer = String::new();
        if self.lines.read_line(&mut answer)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the daemon closed the control connection",
            ));
        }
        serde_json::from_str(&answer).map_err(io::Error::other)
    }
}

/// What the daemon says about its mount.
struct MountDesc {
    upper: PathBuf,
    lowers: Vec<PathBuf>,
    xattr_prefix: String,
}

fn describe(v: &Value) -> Option<MountDesc> {
    Some(MountDesc {
        upper: PathBuf::from(v.get("upper")?.as_str()?),
        lowers: v
            .get("lowers")?
            .as_array()?
            .iter()
            .filter_map(|l| l.as_str().map(PathBuf::from))
            .collect(),
        xattr_prefix: v.get("xattr_prefix")?.as_str()?.to_string(),
    })
}

/// Check that `mp` is the root of a live verlay mount and connect to its daemon.
fn connect(mp: &Path) -> Result<(Daemon, u64, MountDesc)> {
    let what = || format!("mount \"{}\"", mp.display());
    let canon = std::fs::canonicalize(mp).map_err(|e| {
        Error::usage(
            what(),
            e.to_string(),
            "give the mountpoint of a running verlay mount",
        )
    })?;
    let st = rustix::fs::stat(&canon).map_err(|e| Error::io("commit.stat", &canon, e.into()))?;
    let mounts = crate::control::mounts()?;
    let Some(m) = mounts
        .iter()
        .rev()
        .find(|m| m.dev == st.st_dev && m.mount_point == canon)
    else {
        return Err(Error::usage(
            what(),
            "not a verlay mount (not a mount point at all)",
            "give the mountpoint of a running verlay mount, not a directory inside it",
        ));
    };
    if m.fstype != "fuse.verlay" {
        return Err(Error::usage(
            what(),
            format!("not a verlay mount (its type is {})", m.fstype),
            "give the mountpoint of a running verlay mount",
        ));
    }
    let socket = crate::control::socket_path(st.st_dev);
    let stream = UnixStream::connect(&socket).map_err(|e| {
        Error::usage(
            what(),
            format!("its daemon does not answer on {} ({e})", socket.display()),
            "it may have been mounted by an older verlay, by another user, or its daemon died; remount it",
        )
    })?;
    let lines = io::BufReader::new(
        stream
            .try_clone()
            .map_err(|e| Error::io("commit.connect", &socket, e))?,
    );
    let mut d = Daemon {
        stream,
        lines,
        socket,
    };
    let info = d
        .request(json!({"op": "info"}))
        .map_err(|e| Error::io("commit.info", &d.socket, e))?;
    if info.get("read_only").and_then(Value::as_bool) == Some(true) {
        return Err(Error::usage(
            what(),
            "read-only verlay mount: it has no upper layer, so there is nothing to commit",
            "mount it with upperdir= and workdir=",
        ));
    }
    let desc = describe(&info).ok_or_else(|| {
        Error::io(
            "commit.info",
            &d.socket,
            io::Error::other(format!("unexpected answer {info}")),
        )
    })?;
    Ok((d, st.st_dev, desc))
}

// ------------------------------------------------------------------------------ snapshot

/// One object of the frozen upper.
#[derive(Debug)]
struct Snap {
    name: OsString,
    kind: Kind,
    whiteout: bool,
    perm: u32,
    uid: u32,
    gid: u32,
    rdev: u64,
    mtime: Timespec,
    /// xattrs as stored in the upper (overlay metadata included)
    xattrs: Vec<(OsString, Vec<u8>)>,
    target: Option<OsString>,
    /// regular files: the staging data file and its size
    data: Option<DataFile>,
    children: Vec<Snap>,
}

/// Where a regular file's frozen data is in the staging dir.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DataLoc {
    /// `data/ID`, a reflink of the upper file
    File,
    /// at this offset of `data/packed`
    Packed(u64),
}

/// The frozen data of one upper inode (hard links share it).
#[derive(Debug, Clone, Copy)]
struct DataFile {
    /// one per upper inode, so it names a link group
    id: u64,
    loc: DataLoc,
    size: u64,
    /// links of the upper inode
    nlink: u64,
}

/// Offsets in `data/packed` are multiples of this (a filesystem block), so each file's
/// holes stay holes and its data is block-aligned.
const PACK_ALIGN: u64 = 4096;

/// The staging copy of the upper's file data: `data/ID` files (reflinks) and one packed
/// file holding every copied file at its own offset. Packing keeps the freeze to one
/// create in all, where a file per copy costs a create (and a journal entry) each.
struct Staged {
    dir: OwnedFd,
    packed: OwnedFd,
}

impl Staged {
    fn open_file(&self, id: u64) -> rustix::io::Result<OwnedFd> {
        rustix::fs::openat(
            &self.dir,
            id.to_string().as_str(),
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
    }
}

/// Copy `len` bytes from `src` at `src_off` to `dst` at `dst_off`, skipping holes
/// (SEEK_DATA/SEEK_HOLE) and letting the kernel copy (copy_file_range), with a read/write
/// fallback across filesystems.
fn copy_range(src: &OwnedFd, src_off: u64, dst: &OwnedFd, dst_off: u64, len: u64) -> rustix::io::Result<()> {
    use rustix::io::Errno;
    let end = src_off + len;
    let mut pos = src_off;
    let mut buf = Vec::new();
    while pos < end {
        let data = match rustix::fs::seek(src, rustix::fs::SeekFrom::Data(pos)) {
            Ok(d) => d,
            Err(Errno::NXIO) => break, // only a hole remains
            Err(Errno::INVAL | Errno::NOTSUP) => pos,
            Err(e) => return Err(e),
        };
        if data >= end {
            break;
        }
        let hole = rustix::fs::seek(src, rustix::fs::SeekFrom::Hole(data)).map_or(end, |h| h.min(end));
        let mut off_in = data;
        let mut off_out = dst_off + (data - src_off);
        while off_in < hole {
            let want = (hole - off_in).min(1 << 30) as usize;
            match rustix::fs::copy_file_range(src, Some(&mut off_in), dst, Some(&mut off_out), want) {
                Ok(0) => return Err(Errno::NODATA), // shorter than it said: never when frozen
                Ok(_) => {}
                Err(Errno::XDEV | Errno::NOSYS | Errno::INVAL | Errno::OPNOTSUPP) => {
                    buf.resize(COPY_BUF, 0);
                    let n = rustix::io::pread(src, &mut buf[..want.min(COPY_BUF)], off_in)?;
                    if n == 0 {
                        return Err(Errno::NODATA);
                    }
                    let mut done = 0;
                    while done < n {
                        done += rustix::io::pwrite(dst, &buf[done..n], off_out + done as u64)?;
                    }
                    off_in += n as u64;
                    off_out += n as u64;
                }
                Err(e) => return Err(e),
            }
        }
        pos = hole;
    }
    Ok(())
}

/// State of the walk that takes the snapshot.
struct Snapshotter<'a> {
    upper: &'a LayerDir,
    data: Staged,
    /// end of the data in `data/packed`
    packed_end: u64,
    /// upper st_ino -> its data file, for hard links
    copied: HashMap<u64, DataFile>,
    next_id: u64,
    entries: u64,
    bytes: u64,
    redirects: bool,
    reflinks: bool,
}

impl Snapshotter<'_> {
    fn walk(&mut self, rel: &Path, name: OsString) -> Result<Snap> {
        let st = self
            .upper
            .stat(rel)?
            .ok_or_else(|| Error::io("commit.snapshot", rel, io::Error::from(io::ErrorKind::NotFound)))?;
        self.entries += 1;
        let kind = Kind::from_mode(st.st_mode);
        let mut xattrs = Vec::new();
        if kind != Kind::Symlink {
            for n in self.upper.list_xattr(rel)? {
                if let Some(v) = self.upper.get_xattr(rel, &n)? {
                    xattrs.push((n, v));
                }
            }
            xattrs.sort();
        }
        let mut snap = Snap {
            name,
            kind,
            whiteout: is_whiteout_stat(&st),
            perm: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev,
            mtime: Timespec {
                tv_sec: st.st_mtime,
                tv_nsec: st.st_mtime_nsec as _,
            },
            xattrs,
            target: None,
            data: None,
            children: Vec::new(),
        };
        match kind {
            Kind::Dir => {
                if snap
                    .xattrs
                    .iter()
                    .any(|(n, _)| n == "trusted.overlay.redirect" || n == "user.overlay.redirect")
                {
                    self.redirects = true;
                }
                let mut names: Vec<OsString> =
                    self.upper.read_dir(rel)?.into_iter().map(|e| e.name).collect();
                names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
                for n in names {
                    let child = self.walk(&rel.join(&n), n)?;
                    snap.children.push(child);
                }
            }
            Kind::Symlink => snap.target = Some(self.upper.readlink(rel)?),
            Kind::File => snap.data = Some(self.copy_data(rel, &st)?),
            _ => {}
        }
        Ok(snap)
    }

    fn copy_data(&mut self, rel: &Path, st: &rustix::fs::Stat) -> Result<DataFile> {
        if st.st_nlink > 1 {
            if let Some(d) = self.copied.get(&st.st_ino) {
                return Ok(*d);
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let ioerr = |e: rustix::io::Errno| Error::io("commit.snapshot", rel, e.into());
        let src = self.upper.open_file(rel, OFlags::RDONLY).map_err(|e| match e {
            Error::Errno(n) => Error::io("commit.snapshot", rel, io::Error::from_raw_os_error(n)),
            e => e,
        })?;
        // The size is the upper file's while frozen; the copy is what the layer gets.
        let size = rustix::fs::fstat(&src).map_err(ioerr)?.st_size as u64;
        let mut loc = None;
        if self.reflinks {
            let name = id.to_string();
            let dst = rustix::fs::openat(
                &self.data.dir,
                name.as_str(),
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .map_err(ioerr)?;
            if rustix::fs::ioctl_ficlone(&dst, &src).is_ok() {
                loc = Some(DataLoc::File);
            } else {
                // No reflink here (ext4, tmpfs, another filesystem): stop trying after the
                // first refusal, and pack copies instead.
                self.reflinks = false;
                drop(dst);
                rustix::fs::unlinkat(&self.data.dir, name.as_str(), AtFlags::empty()).map_err(ioerr)?;
            }
        }
        let loc = match loc {
            Some(l) => l,
            None => {
                let off = self.packed_end.next_multiple_of(PACK_ALIGN);
                copy_range(&src, 0, &self.data.packed, off, size)
                    .map_err(|e| Error::io("commit.copy", rel, io::Error::from(e)))?;
                self.packed_end = off + size;
                DataLoc::Packed(off)
            }
        };
        self.bytes += size;
        let d = DataFile {
            id,
            loc,
            size,
            nlink: st.st_nlink,
        };
        if st.st_nlink > 1 {
            self.copied.insert(st.st_ino, d);
        }
        Ok(d)
    }

    /// Give `data/packed` its full length (a trailing hole of the last file included).
    fn finish(&self) -> Result<()> {
        rustix::fs::ftruncate(&self.data.packed, self.packed_end)
            .map_err(|e| Error::io("commit.snapshot", "data/packed", e.into()))
    }
}

// ------------------------------------------------------------------------------ layer items

/// What an entry of the tarball is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ItemKind {
    Dir,
    File,
    Symlink,
    Fifo,
    Char,
    Block,
    /// `.wh.NAME`
    Whiteout,
    /// `.wh..wh..opq`
    Opaque,
}

/// Where a file's data comes from.
#[derive(Debug, Clone, Copy)]
enum Data {
    None,
    /// the staging copy
    Staged(DataFile),
    /// a node of the read-only union over the staging copy and the lowers
    Union {
        node: u64,
        size: u64,
    },
}

/// One entry of the layer, in tar order.
#[derive(Debug)]
struct Item {
    /// path relative to the layer root, no leading `./`; empty for the root
    path: Vec<u8>,
    kind: ItemKind,
    perm: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    rdev: u64,
    /// xattrs as users see them (private ones dropped, escaped ones unescaped), sorted
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    target: Vec<u8>,
    data: Data,
    /// inode identity, for hard links within the layer
    link_key: Option<u64>,
}

impl Item {
    fn marker(parent: &[u8], name: &[u8], kind: ItemKind) -> Item {
        Item {
            path: join(parent, name),
            kind,
            perm: 0,
            uid: 0,
            gid: 0,
            mtime: 0,
            rdev: 0,
            xattrs: Vec::new(),
            target: Vec::new(),
            data: Data::None,
            link_key: None,
        }
    }
}

fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    if parent.is_empty() {
        name.to_vec()
    } else {
        [parent, b"/", name].concat()
    }
}

/// The xattrs of a layer entry, from names users see: drops overlay metadata of either
/// namespace (what is left of it after `XattrNames::from_disk` is the other namespace's).
fn keep_visible(own: &str, name: &[u8]) -> bool {
    !OVERLAY_NAMESPACES
        .iter()
        .any(|ns| *ns != own && name.starts_with(ns.as_bytes()))
}

/// Translate an upper's raw xattrs into what the layer carries.
fn layer_xattrs(own: &'static str, raw: &[(OsString, Vec<u8>)]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let names = crate::upper::XattrNames { own };
    let mut out: Vec<(Vec<u8>, Vec<u8>)> = raw
        .iter()
        .filter_map(|(n, v)| {
            let shown = names.from_disk(n)?;
            keep_visible(own, shown.as_bytes()).then(|| (shown.into_vec(), v.clone()))
        })
        .collect();
    out.sort();
    out
}

fn is_opaque(raw: &[(OsString, Vec<u8>)]) -> bool {
    raw.iter().any(|(n, v)| {
        (n == "trusted.overlay.opaque" || n == "user.overlay.opaque" || n == "user.fuseoverlayfs.opaque")
            && v.first() == Some(&b'y')
    })
}

fn has_redirect(raw: &[(OsString, Vec<u8>)]) -> bool {
    raw.iter()
        .any(|(n, _)| n == "trusted.overlay.redirect" || n == "user.overlay.redirect")
}

/// Builds the item list: the upper's diff, with renamed directories made whole.
struct Translator<'a> {
    own: &'static str,
    /// for directories with a redirect: the merged view at the commit instant
    merged: Option<&'a crate::union::Union>,
    /// staged inode id -> st_ino of its file in the staging tree (with a merged view)
    tree_inos: HashMap<u64, u64>,
    items: Vec<Item>,
}

/// Sort key of a child: its name in the tarball.
fn tar_name(s: &Snap) -> Vec<u8> {
    if s.whiteout {
        [OCI_WHITEOUT_PREFIX.as_bytes(), s.name.as_bytes()].concat()
    } else {
        s.name.as_bytes().to_vec()
    }
}

impl Translator<'_> {
    fn base(&self, path: Vec<u8>, s: &Snap, kind: ItemKind) -> Item {
        Item {
            path,
            kind,
            perm: s.perm,
            uid: s.uid,
            gid: s.gid,
            mtime: s.mtime.tv_sec,
            rdev: s.rdev,
            xattrs: layer_xattrs(self.own, &s.xattrs),
            target: Vec::new(),
            data: Data::None,
            link_key: None,
        }
    }

    /// The directory `s` at `path` and everything below it.
    fn dir(&mut self, path: &[u8], s: &Snap) -> Result<()> {
        let item = self.base(path.to_vec(), s, ItemKind::Dir);
        self.items.push(item);
        let opaque = is_opaque(&s.xattrs);
        if !opaque && has_redirect(&s.xattrs) && !path.is_empty() {
            // OCI has no redirects: the renamed directory goes in whole, opaque, as the
            // merged view shows it.
            self.items
                .push(Item::marker(path, OCI_OPAQUE_MARKER.as_bytes(), ItemKind::Opaque));
            return self.merged_dir(path);
        }
        // The opaque marker (None) sorts among the entries by its name, like any other.
        let mut kids: Vec<(Vec<u8>, Option<&Snap>)> =
            s.children.iter().map(|c| (tar_name(c), Some(c))).collect();
        if opaque && !path.is_empty() {
            kids.push((OCI_OPAQUE_MARKER.as_bytes().to_vec(), None));
        }
        kids.sort_by(|a, b| a.0.cmp(&b.0));
        for (tname, c) in kids {
            let cpath = join(path, &tname);
            let Some(c) = c else {
                self.items
                    .push(Item::marker(path, OCI_OPAQUE_MARKER.as_bytes(), ItemKind::Opaque));
                continue;
            };
            if c.name.as_bytes().starts_with(OCI_WHITEOUT_PREFIX.as_bytes()) {
                return Err(Error::usage(
                    format!("upper entry \"{}\"", String::from_utf8_lossy(&cpath)),
                    "its name starts with .wh., which an OCI layer reads as a whiteout",
                    "rename it through the mount and commit again",
                ));
            }
            if c.whiteout {
                self.items.push(Item::marker(path, &tname, ItemKind::Whiteout));
                continue;
            }
            match c.kind {
                Kind::Dir => self.dir(&cpath, c)?,
                Kind::File => {
                    let mut it = self.base(cpath, c, ItemKind::File);
                    if let Some(d) = c.data {
                        it.data = Data::Staged(d);
                        it.link_key = (d.nlink > 1).then(|| self.staging_key(d.id));
                    }
                    self.items.push(it);
                }
                Kind::Symlink => {
                    let mut it = self.base(cpath, c, ItemKind::Symlink);
                    it.target = c.target.clone().unwrap_or_default().into_vec();
                    it.xattrs.clear();
                    self.items.push(it);
                }
                Kind::Fifo => self.items.push(self.base(cpath, c, ItemKind::Fifo)),
                Kind::Char => self.items.push(self.base(cpath, c, ItemKind::Char)),
                Kind::Block => self.items.push(self.base(cpath, c, ItemKind::Block)),
                Kind::Socket => {
                    warn!(path = %String::from_utf8_lossy(&cpath), "a socket cannot go into a layer tarball; skipped");
                }
            }
        }
        Ok(())
    }

    /// Link key of a staged inode: with a merged view, the number the union reports for
    /// its file in the staging tree (a link group may span a renamed directory and the rest).
    fn staging_key(&self, id: u64) -> u64 {
        match (self.merged, self.tree_inos.get(&id)) {
            // The staging tree is the union's top layer (index 1: 0 would be an upper).
            (Some(u), Some(ino)) => u.map_ino(1, *ino),
            _ => id,
        }
    }

    /// The children of the merged directory at `path`, from the union.
    fn merged_dir(&mut self, path: &[u8]) -> Result<()> {
        let u = self.merged.ok_or_else(|| {
            Error::io(
                "commit.merged",
                bytes_path(path),
                io::Error::other("no merged view"),
            )
        })?;
        let mut id = crate::union::inode::ROOT_ID;
        for c in path.split(|b| *b == b'/') {
            id = u.lookup(id, OsStr::from_bytes(c))?.id;
        }
        self.merged_children(u, id, path)
    }

    fn merged_children(&mut self, u: &crate::union::Union, id: u64, path: &[u8]) -> Result<()> {
        let fh = u.opendir(id)?;
        let listed = u.readdir(id, fh, 0);
        u.releasedir(fh);
        let mut names: Vec<OsString> = listed?
            .iter()
            .filter(|e| e.name != "." && e.name != "..")
            .map(|e| e.name.clone())
            .collect();
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for n in names {
            let e = u.lookup(id, &n)?;
            let a = e.attr;
            let cpath = join(path, n.as_bytes());
            let mut xattrs = Vec::new();
            if a.kind != Kind::Symlink {
                for name in u.listxattr(e.id)?.split(|b| *b == 0).filter(|n| !n.is_empty()) {
                    if !keep_visible(self.own, name) {
                        continue;
                    }
                    if let Ok(v) = u.getxattr(e.id, OsStr::from_bytes(name)) {
                        xattrs.push((name.to_vec(), v));
                    }
                }
                xattrs.sort();
            }
            let kind = match a.kind {
                Kind::Dir => ItemKind::Dir,
                Kind::File => ItemKind::File,
                Kind::Symlink => ItemKind::Symlink,
                Kind::Fifo => ItemKind::Fifo,
                Kind::Char => ItemKind::Char,
                Kind::Block => ItemKind::Block,
                Kind::Socket => {
                    warn!(path = %String::from_utf8_lossy(&cpath), "a socket cannot go into a layer tarball; skipped");
                    continue;
                }
            };
            let item = Item {
                path: cpath.clone(),
                kind,
                perm: a.perm,
                uid: a.uid,
                gid: a.gid,
                mtime: a.mtime.tv_sec,
                rdev: a.rdev,
                xattrs,
                target: if kind == ItemKind::Symlink {
                    u.readlink(e.id)?.into_vec()
                } else {
                    Vec::new()
                },
                data: if kind == ItemKind::File {
                    Data::Union {
                        node: e.id,
                        size: a.size,
                    }
                } else {
                    Data::None
                },
                link_key: (kind == ItemKind::File && a.nlink > 1).then_some(a.ino),
            };
            self.items.push(item);
            if kind == ItemKind::Dir {
                self.merged_children(u, e.id, &cpath)?;
            }
        }
        Ok(())
    }
}

fn bytes_path(b: &[u8]) -> PathBuf {
    PathBuf::from(OsStr::from_bytes(b))
}

// ------------------------------------------------------------------------------ staging tree

/// Lay the snapshot out as an upper tree at `dir/rel` (owners, modes, raw xattrs, times),
/// file data hard-linked from `data/` (so hard links stay links).
fn materialize(
    dir: &OwnedFd,
    data: &Staged,
    rel: &Path,
    s: &Snap,
    root: bool,
    made: &mut HashMap<u64, (PathBuf, u64)>,
) -> Result<()> {
    let at = if root { Path::new(".") } else { rel };
    let err = |op: &'static str| move |e: rustix::io::Errno| Error::io(op, rel, e.into());
    match s.kind {
        Kind::Dir => {
            if !root {
                rustix::fs::mkdirat(dir, at, Mode::from_raw_mode(0o700)).map_err(err("commit.mkdir"))?;
            }
            for c in &s.children {
                materialize(dir, data, &rel.join(&c.name), c, false, made)?;
            }
        }
        Kind::File => {
            let d = s
                .data
                .ok_or_else(|| Error::io("commit.materialize", rel, io::Error::other("no data")))?;
            if let Some((first, _)) = made.get(&d.id) {
                // Another name of an inode already laid out: a hard link again.
                rustix::fs::linkat(dir, first.as_path(), dir, at, AtFlags::empty())
                    .map_err(err("commit.link"))?;
            } else {
                match d.loc {
                    DataLoc::File => {
                        rustix::fs::linkat(&data.dir, d.id.to_string().as_str(), dir, at, AtFlags::empty())
                            .map_err(err("commit.link"))?
                    }
                    DataLoc::Packed(off) => {
                        let f = rustix::fs::openat(
                            dir,
                            at,
                            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC,
                            Mode::from_raw_mode(0o600),
                        )
                        .map_err(err("commit.create"))?;
                        copy_range(&data.packed, off, &f, 0, d.size).map_err(err("commit.copy"))?;
                        rustix::fs::ftruncate(&f, d.size).map_err(err("commit.copy"))?;
                    }
                }
                let ino = rustix::fs::statat(dir, at, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(err("commit.stat"))?
                    .st_ino;
                made.insert(d.id, (rel.to_path_buf(), ino));
            }
        }
        Kind::Symlink => {
            let t = s.target.clone().unwrap_or_default();
            rustix::fs::symlinkat(t.as_os_str(), dir, at).map_err(err("commit.symlink"))?;
        }
        k => {
            let ft = match k {
                Kind::Char => FileType::CharacterDevice,
                Kind::Block => FileType::BlockDevice,
                Kind::Socket => FileType::Socket,
                _ => FileType::Fifo,
            };
            rustix::fs::mknodat(dir, at, ft, Mode::from_raw_mode(0o600), s.rdev)
                .map_err(err("commit.mknod"))?;
        }
    }
    let uid = Some(rustix::fs::Uid::from_raw(s.uid));
    let gid = Some(rustix::fs::Gid::from_raw(s.gid));
    if let Err(e) = rustix::fs::chownat(dir, at, uid, gid, AtFlags::SYMLINK_NOFOLLOW) {
        // Rootless: files keep our own ids; the layer items come from the snapshot anyway.
        if e != rustix::io::Errno::PERM {
            return Err(err("commit.chown")(e));
        }
    }
    if s.kind != Kind::Symlink {
        rustix::fs::chmodat(dir, at, Mode::from_raw_mode(s.perm), AtFlags::empty())
            .map_err(err("commit.chmod"))?;
        let fd = rustix::fs::openat(
            dir,
            at,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(err("commit.open"))?;
        let p = PathBuf::from(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd)));
        for (n, v) in &s.xattrs {
            rustix::fs::setxattr(&p, n.as_os_str(), v, XattrFlags::empty())
                .map_err(err("commit.setxattr"))?;
        }
    }
    let times = Timestamps {
        last_access: s.mtime,
        last_modification: s.mtime,
    };
    rustix::fs::utimensat(dir, at, &times, AtFlags::SYMLINK_NOFOLLOW).map_err(err("commit.utimens"))
}

// ------------------------------------------------------------------------------ tar

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

// ------------------------------------------------------------------------------ commit

/// The `--output` file, created unnamed (O_TMPFILE) where the filesystem allows, so a crash
/// leaves nothing behind; published by [`Output::publish`].
struct Output {
    file: std::fs::File,
    dest: PathBuf,
    /// a named temp, when O_TMPFILE is not supported
    named: Option<PathBuf>,
}

impl Output {
    fn create(dest: &Path) -> Result<Output> {
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
    fn publish(self) -> Result<()> {
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

/// Removes the staging dir when the commit ends, however it ends (a crash leaves it to the
/// next store operation, which removes whatever is in `STORE/tmp`).
struct Staging(PathBuf);

impl Drop for Staging {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            if e.kind() != io::ErrorKind::NotFound {
                warn!(path = %self.0.display(), error = %e, "could not remove the commit's staging dir");
            }
        }
    }
}

/// Commit the upper of the mount at `a.mountpoint` into the store.
pub fn commit(a: &CommitArgs) -> Result<Committed> {
    // 1. checks, before anything changes.
    let (mut daemon, mount_dev, desc) = connect(&a.mountpoint)?;
    let store_what = || format!("store \"{}\"", a.store.display());
    let sst = match rustix::fs::stat(&a.store) {
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => st,
        Ok(_) => {
            return Err(Error::usage(
                store_what(),
                "not a directory",
                "give --store a layer store directory",
            ))
        }
        Err(e) => {
            return Err(Error::usage(
                store_what(),
                io::Error::from(e).to_string(),
                "create it (mkdir) or give the --store of an existing layer store",
            ))
        }
    };
    if sst.st_dev == mount_dev {
        return Err(Error::usage(
            store_what(),
            "it is inside the mount being committed (the copy would wait for the writers it pauses)",
            "put the store outside the mount",
        ));
    }
    if let Some(o) = &a.output {
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
    }
    let own: &'static str = if desc.xattr_prefix == "user.overlay." {
        "user.overlay."
    } else {
        "trusted.overlay."
    };
    if let Some(p) = &a.parent {
        // No layer can be in a directory that is not a store yet: refuse before opening
        // it, which would make it one.
        if !a.store.join("layers").is_dir() {
            return Err(Error::usage(
                format!("--parent \"{p}\""),
                format!("not in the store {} (it holds no layers)", a.store.display()),
                "commit the parent layer first, or fix --store",
            ));
        }
    }
    // 2. the store, and the staging dir on its filesystem.
    let store = Store::open(&a.store)?;
    let parent = a.parent.as_deref().map(|p| store.resolve(p)).transpose()?;
    let staging = store.root().join("tmp").join(format!(
        "commit-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir(&staging).map_err(|e| Error::io("commit.staging", &staging, e))?;
    let staging = Staging(staging);
    let data_path = staging.0.join("data");
    std::fs::create_dir(&data_path).map_err(|e| Error::io("commit.staging", &data_path, e))?;
    let data_dir = rustix::fs::open(
        &data_path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::io("commit.staging", &data_path, e.into()))?;
    let packed = rustix::fs::openat(
        &data_dir,
        "packed",
        OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(|e| Error::io("commit.staging", &data_path, e.into()))?;
    let upper = LayerDir::open(&desc.upper, 0, "upper".into())?;

    // Pages a program dirtied through a shared mmap reach the daemon only at writeback:
    // syncfs of the mount sends them now, so the snapshot holds what was written before the
    // commit began. (Not while frozen: those writes would wait for the gate we hold.)
    let mp_fd = rustix::fs::open(
        &a.mountpoint,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::io("commit.syncfs", &a.mountpoint, e.into()))?;
    rustix::fs::syncfs(&mp_fd).map_err(|e| Error::io("commit.syncfs", &a.mountpoint, e.into()))?;
    drop(mp_fd);
    // Write the upper's dirty pages back now, outside the freeze: the copy under the freeze
    // makes as many dirty pages again, and with both the kernel throttles the copier
    // (balance_dirty_pages), which lengthens the pause (seen: 2.8 s instead of 0.4 s, 1 GiB).
    rustix::fs::syncfs(&upper.root).map_err(|e| Error::io("commit.syncfs", &desc.upper, e.into()))?;

    // 3-5. freeze, snapshot, thaw.
    let asked = Instant::now();
    let frozen = daemon
        .request(json!({"op": "freeze"}))
        .map_err(|e| Error::io("commit.freeze", &daemon.socket, e))?;
    if frozen.get("error").and_then(Value::as_str) == Some("passthrough-writers") {
        let n = frozen.get("count").and_then(Value::as_u64).unwrap_or(0);
        return Err(Error::usage(
            format!("verlay commit {}", a.mountpoint.display()),
            format!(
                "{n} file(s) are open for writing on a mount with passthrough=1: their writes go \
                 straight to the upper file and cannot be paused for a point-in-time copy"
            ),
            "close them and commit again, or remount without passthrough=1",
        ));
    }
    if frozen.get("ok").and_then(Value::as_bool) != Some(true) {
        return Err(Error::io(
            "commit.freeze",
            &daemon.socket,
            io::Error::other(format!("the daemon refused: {frozen}")),
        ));
    }
    let held = Instant::now();
    crash_point("commit.freeze");
    let mut snapper = Snapshotter {
        upper: &upper,
        data: Staged {
            dir: data_dir,
            packed,
        },
        packed_end: 0,
        copied: HashMap::new(),
        next_id: 0,
        entries: 0,
        bytes: 0,
        redirects: false,
        reflinks: true,
    };
    let snap = snapper
        .walk(Path::new(""), OsString::new())
        .and_then(|s| snapper.finish().map(|()| s));
    crash_point("commit.snapshot");
    let thawed = daemon.request(json!({"op": "thaw"}));
    let client_pause = held.elapsed();
    let snap = snap?;
    // Without the daemon's answer we cannot know the gate was held to the end.
    let thawed = thawed.map_err(|e| {
        Error::io(
            "commit.thaw",
            &daemon.socket,
            io::Error::other(format!(
                "the daemon did not confirm the freeze held ({e}); nothing was committed"
            )),
        )
    })?;
    crash_point("commit.thaw");
    drop(daemon);
    let paused_us = thawed
        .get("paused_us")
        .and_then(Value::as_u64)
        .unwrap_or(client_pause.as_micros() as u64);
    info!(
        step = "commit.thaw",
        paused_us,
        waited_us = held.duration_since(asked).as_micros() as u64,
        entries = snapper.entries,
        bytes = snapper.bytes,
        reflink = snapper.reflinks,
        "snapshot of the upper taken; writers resumed"
    );
    let (entries, bytes, redirects) = (snapper.entries, snapper.bytes, snapper.redirects);
    let data = snapper.data;
    let mut made = HashMap::new();

    // 6. the merged view, for renamed directories.
    let merged = if redirects {
        let tree = staging.0.join("upper");
        std::fs::create_dir(&tree).map_err(|e| Error::io("commit.materialize", &tree, e))?;
        let tree_fd = rustix::fs::open(
            &tree,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io("commit.materialize", &tree, e.into()))?;
        materialize(&tree_fd, &data, Path::new(""), &snap, true, &mut made)?;
        crash_point("commit.materialize");
        Some(merged_view(&tree, &desc.lowers)?)
    } else {
        None
    };
    let mut tr = Translator {
        own,
        merged: merged.as_ref(),
        tree_inos: made.into_iter().map(|(id, (_, ino))| (id, ino)).collect(),
        items: Vec::new(),
    };
    tr.dir(b"", &snap)?;
    let items = tr.items;
    drop(snap);

    // 7. the tarball, into the import (and the output file).
    let mut output = a.output.as_deref().map(Output::create).transpose()?;
    // A socket pair as the pipe (std::io::pipe needs a newer Rust than our MSRV): EOF when
    // the writer is done, EPIPE for the writer when the import stopped reading.
    let (mut reader, writer) = UnixStream::pair().map_err(|e| Error::io("commit.pipe", "", e))?;
    let source = format!("commit of {}", a.mountpoint.display());
    let opts = ImportOptions {
        parent: parent.clone(),
        diff_id: None,
        blob_digest: None,
        source,
        fsync_each: false,
    };
    let (imported, written) = std::thread::scope(|scope| {
        let out_file = output.as_mut().map(|o| &mut o.file);
        let items = &items;
        let data = &data;
        let merged = merged.as_ref();
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
            let digest = format!("sha256:{}", hex(&w.hasher.finalize()));
            Ok((digest, w.bytes))
        });
        let imported = store.import_layer(&mut reader, &opts);
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
    let imported = imported?;
    let recorded = store
        .record(&imported.chain_id)?
        .get("diff_id")
        .and_then(Value::as_str)
        .map(str::to_owned);
    if recorded.as_deref() != Some(diff_id.as_str()) {
        return Err(Error::io(
            "commit.import",
            store.diff_dir(&imported.chain_id),
            io::Error::other(format!(
                "the store recorded diffID {recorded:?}, the tarball hashes to {diff_id}"
            )),
        ));
    }

    // 8. the output tarball.
    if let Some(o) = output.take() {
        o.publish()?;
        crash_point("commit.output");
    }

    // 9. cleanup.
    drop(merged);
    drop(staging);
    crash_point("commit.cleanup");
    info!(
        layer = %imported.chain_id,
        diff_id = %diff_id,
        bytes = tar_bytes,
        new = imported.new,
        paused_us,
        "committed the upper into a layer"
    );
    Ok(Committed {
        chain_id: imported.chain_id,
        diff_id,
        paused_us,
        entries,
        bytes,
    })
}

/// A read-only union over the staging tree (as the top layer) and the mount's lowers: the
/// merged view at the commit instant, read with the same code that serves the mount.
fn merged_view(tree: &Path, lowers: &[PathBuf]) -> Result<crate::union::Union> {
    let mut layers = vec![LayerDir::open(tree, 1, "commit-staging".into())?];
    let mut verified = vec![None];
    for (i, l) in lowers.iter().enumerate() {
        layers.push(LayerDir::open(l, i + 2, format!("lower{i}"))?);
        verified.push(
            crate::lower::verify::VerifiedLayer::open(l, crate::lower::verify::VerifyMode::On)?.map(Arc::new),
        );
    }
    crate::union::Union::new(
        layers,
        None,
        crate::union::UnionOptions {
            ids: Default::default(),
            verified,
            passthrough: false,
        },
    )
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

fn hex(b: &[u8]) -> String {
    use std::fmt::Write as _;
    b.iter().fold(String::with_capacity(b.len() * 2), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
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
    fn private_xattrs_are_dropped_and_escaped_ones_unescaped() {
        let raw: Vec<(OsString, Vec<u8>)> = [
            ("trusted.overlay.opaque", "y"),
            ("trusted.overlay.redirect", "/a"),
            ("trusted.overlay.overlay.mine", "1"),
            ("trusted.verlay.origin", "9"),
            ("user.verlay.origin", "9"),
            ("user.overlay.opaque", "y"),
            ("user.fuseoverlayfs.opaque", "y"),
            ("user.k", "v"),
            ("security.capability", "c"),
        ]
        .iter()
        .map(|(n, v)| (OsString::from(n), v.as_bytes().to_vec()))
        .collect();
        let got = layer_xattrs("trusted.overlay.", &raw);
        let names: Vec<String> = got
            .iter()
            .map(|(n, _)| String::from_utf8_lossy(n).into_owned())
            .collect();
        assert_eq!(names, ["security.capability", "trusted.overlay.mine", "user.k"]);
    }

    #[test]
    fn command_line_is_parsed_or_refused() {
        let os = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        let a = parse(&os(&[
            "/m",
            "--store",
            "/s",
            "--parent=sha256:ab",
            "--output",
            "o.tar",
        ]))
        .unwrap();
        assert_eq!(a.mountpoint, PathBuf::from("/m"));
        assert_eq!(a.store, PathBuf::from("/s"));
        assert_eq!(a.parent.as_deref(), Some("sha256:ab"));
        assert_eq!(a.output, Some(PathBuf::from("o.tar")));
        let a = parse(&os(&["--store", "/s", "--", "--odd-mountpoint"])).unwrap();
        assert_eq!(a.mountpoint, PathBuf::from("--odd-mountpoint"));
        for (args, why) in [
            (&["/m"][..], "--store DIR is required"),
            (&["--store", "/s"][..], "MOUNTPOINT is required"),
            (&["/m", "/n", "--store", "/s"][..], "expected one MOUNTPOINT"),
            (&["/m", "--store"][..], "--store needs a value"),
            (&["/m", "--store", "/s", "--force"][..], "unknown option --force"),
        ] {
            match parse(&os(args)) {
                Err(Error::Usage { why: w, .. }) => assert_eq!(w, why, "{args:?}"),
                other => panic!("{args:?}: {other:?}"),
            }
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
}
