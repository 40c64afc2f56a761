//! Kernel-overlayfs semantics over real directories: the union core.
//!
//! This module never imports fuser. Methods mirror FUSE operations with verlay's own types
//! and return values; the FUSE adapter (`fuse.rs`) only decodes requests and sends replies.
//! All writes to the upper go through `upper/`: each operation takes a
//! [`crate::upper::Change`] (`Union::change`) before its first write, which holds the
//! commit gate and refuses a poisoned upper; the write methods exist only there.
//!
//! One file per group of operations, `impl Union` in each: `lookup.rs` (resolve, nodes,
//! forget), `attr.rs` (getattr, setattr), `copy_up.rs`, `create.rs`, `remove.rs`,
//! `rename.rs`, `files.rs` (open files), `dir.rs` (listings), `xattr.rs`; this file keeps
//! `Union`, its types and the helpers they share.
//!
//! Rules reproduced (see Documentation/filesystems/overlayfs.rst):
//! - lookup goes upper, then lowers top to bottom; a non-directory ends the search; a
//!   whiteout (char 0/0 or OCI `.wh.NAME`) hides the name below; an opaque directory
//!   (`overlay.opaque=y`, `user.fuseoverlayfs.opaque`, or `.wh..wh..opq`) hides everything
//!   below it, in every layer;
//! - any change to a lower object first copies it up (parents first);
//! - removing a name that exists below leaves a whiteout; a directory made over a whiteout
//!   is opaque; a directory with lower parts is renamed with an `overlay.redirect`.

pub mod acl;
mod attr;
mod copy_up;
mod create;
pub mod dir;
mod files;
pub mod inode;
mod lookup;
mod remove;
mod rename;
mod xattr;

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use rustix::fs::{OFlags, RenameFlags, Stat, Timespec, Timestamps, XattrFlags};
use tracing::{debug, trace};

use crate::error::{errno, Error, Result};
use crate::layer::{is_whiteout_stat, Kind, LayerDir, OCI_OPAQUE_MARKER, OCI_WHITEOUT_PREFIX};
use crate::lower::verify::VerifiedLayer;
pub use crate::upper::Frozen;
use crate::upper::{Change, Occupant, Owner, Upper, XattrNames};
use acl::{
    caller_in_chown, chown_privs_to_kill, in_group_or_capable, privs_to_kill, POSIX_ACL_ACCESS,
    POSIX_ACL_DEFAULT, POSIX_ACL_PREFIX,
};
use inode::{LowerRef, Node, NodeState, NodeTable, ROOT_ID};

/// Longest redirect kernel overlayfs writes (module parameter redirect_max, default 256);
/// a directory rename that would need a longer one fails with EXDEV, as in the kernel.
pub const REDIRECT_MAX: usize = 256;

/// Largest xattr value and name list the kernel passes (linux/limits.h XATTR_SIZE_MAX,
/// XATTR_LIST_MAX).
const XATTR_SIZE_MAX: usize = 65536;
const XATTR_LIST_MAX: usize = 65536;

/// Longest name a layer accepts (NAME_MAX); FUSE itself allows 1024.
pub const NAME_MAX: usize = 255;

/// Who is asking, from the FUSE request header.
#[derive(Clone, Copy, Debug)]
pub struct Ctx {
    /// caller's uid (as seen in the merged view)
    pub uid: u32,
    /// caller's gid
    pub gid: u32,
    /// caller's pid
    pub pid: u32,
    /// caller's umask, for new objects: the kernel leaves it to us (FUSE_DONT_MASK), since a
    /// parent's default ACL replaces it
    pub umask: u32,
}

/// Attributes of a merged object, as users see them.
#[derive(Clone, Copy, Debug)]
pub struct Attr {
    /// st_ino (stable)
    pub ino: u64,
    /// size in bytes
    pub size: u64,
    /// 512-byte blocks
    pub blocks: u64,
    /// atime
    pub atime: Timespec,
    /// mtime
    pub mtime: Timespec,
    /// ctime
    pub ctime: Timespec,
    /// type
    pub kind: Kind,
    /// permission bits incl. setuid/setgid/sticky
    pub perm: u32,
    /// link count
    pub nlink: u32,
    /// owner
    pub uid: u32,
    /// group
    pub gid: u32,
    /// device number
    pub rdev: u64,
    /// preferred I/O size
    pub blksize: u32,
}

/// A node id with its attributes, the answer to lookup and create.
#[derive(Clone, Copy, Debug)]
pub struct Entry {
    /// FUSE node id
    pub id: u64,
    /// attributes
    pub attr: Attr,
}

/// Changes asked by setattr.
#[derive(Clone, Copy, Debug, Default)]
pub struct SetAttr {
    /// new permission bits
    pub mode: Option<u32>,
    /// new owner
    pub uid: Option<u32>,
    /// new group
    pub gid: Option<u32>,
    /// new size
    pub size: Option<u64>,
    /// new atime (None = leave; Some(None) = now)
    pub atime: Option<Option<Timespec>>,
    /// new mtime
    pub mtime: Option<Option<Timespec>>,
    /// the kernel asks to clear setuid/setgid (FATTR_KILL_SUIDGID, FUSE_HANDLE_KILLPRIV_V2):
    /// sent with every chown of a non-directory, and with truncates by callers without
    /// CAP_FSETID
    pub kill_suid_gid: bool,
}

/// One uid or gid range: ids `container..container+len` in the merged view are stored as
/// `host..host+len` on disk (fuse-overlayfs's `uidmapping=`/`gidmapping=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdRange {
    /// first id in the merged view
    pub container: u32,
    /// first id on disk
    pub host: u32,
    /// number of ids
    pub len: u32,
}

/// Id translation between the merged view and the disk.
#[derive(Clone, Debug, Default)]
pub struct IdMap {
    /// uid ranges (empty = identity)
    pub uids: Vec<IdRange>,
    /// gid ranges (empty = identity)
    pub gids: Vec<IdRange>,
    /// every uid shown as this one (squash_to_root / squash_to_uid)
    pub squash_uid: Option<u32>,
    /// every gid shown as this one
    pub squash_gid: Option<u32>,
}

/// The kernel's overflow id, shown for on-disk ids outside every mapping.
const OVERFLOW_ID: u32 = 65534;

fn map_to_disk(ranges: &[IdRange], id: u32) -> u32 {
    if ranges.is_empty() {
        return id;
    }
    for r in ranges {
        if id >= r.container && id - r.container < r.len {
            return r.host + (id - r.container);
        }
    }
    id
}

fn map_from_disk(ranges: &[IdRange], id: u32) -> u32 {
    if ranges.is_empty() {
        return id;
    }
    for r in ranges {
        if id >= r.host && id - r.host < r.len {
            return r.container + (id - r.host);
        }
    }
    OVERFLOW_ID
}

impl IdMap {
    fn uid_to_disk(&self, u: u32) -> u32 {
        map_to_disk(&self.uids, u)
    }
    fn gid_to_disk(&self, g: u32) -> u32 {
        map_to_disk(&self.gids, g)
    }
    fn uid_from_disk(&self, u: u32) -> u32 {
        self.squash_uid.unwrap_or_else(|| map_from_disk(&self.uids, u))
    }
    fn gid_from_disk(&self, g: u32) -> u32 {
        self.squash_gid.unwrap_or_else(|| map_from_disk(&self.gids, g))
    }
}

/// Options of the union core.
#[derive(Clone, Debug, Default)]
pub struct UnionOptions {
    /// id translation
    pub ids: IdMap,
    /// per lower layer (same order): its manifest, when it is verified
    pub verified: Vec<Option<Arc<VerifiedLayer>>>,
    /// offer FUSE passthrough for open files (the adapter turns it off when the kernel or
    /// the daemon's privileges do not allow it)
    pub passthrough: bool,
    /// the mount's atime option, for upper files read through the daemon
    pub atime: Atime,
    /// ask the kernel for its writeback cache (`writeback=1`; the adapter asks at INIT)
    pub writeback: bool,
}

/// The mount's atime option as it applies to reads of upper files. Kernel overlayfs reads
/// the real file with O_NOATIME and updates the upper inode's atime by the overlay mount's
/// own option (`ovl_file_accessed`; its private upper mount drops the atime flags); lower
/// files' atimes never change. A read through verlay's daemon follows the upper
/// filesystem's option (relatime on a default mount), except under `noatime`. strictatime
/// is not applied: the daemon has no way to set an atime without also changing the ctime
/// (utimensat always does), which would be worse than a relatime atime.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Atime {
    /// relatime, strictatime, norelatime (the default): the upper filesystem's rule
    #[default]
    Upper,
    /// noatime or a read-only mount: reads never update it (O_NOATIME on upper fds)
    Never,
}

impl Atime {
    /// The atime mode of a list of mount options: the last atime option wins, as with
    /// mount(8); a read-only mount (`ro` after any `rw`) updates no atime at all.
    pub fn from_mount_options<'a>(opts: impl IntoIterator<Item = &'a str>) -> Atime {
        let (noatime, ro) = opts.into_iter().fold((false, false), |(no, ro), o| match o {
            "noatime" => (true, ro),
            "strictatime" | "norelatime" | "relatime" | "atime" | "nostrictatime" => (false, ro),
            "ro" => (no, true),
            "rw" => (no, false),
            _ => (no, ro),
        });
        if noatime || ro {
            Atime::Never
        } else {
            Atime::Upper
        }
    }
}

/// An open file.
#[derive(Debug)]
pub struct FileHandle {
    fd: RwLock<Arc<OwnedFd>>,
    writable: bool,
    /// `fd` is on the upper object. A read-only handle opened on a lower file is switched to
    /// the upper copy by the copy-up, as kernel overlayfs does since 4.19: it reads the new
    /// data, and a metadata change through it can never reach the lower layer.
    on_upper: std::sync::atomic::AtomicBool,
    /// a lower file of a verified layer: what to check its reads against
    verify: Option<HandleVerify>,
    /// the kernel reads and writes this file itself, through a passthrough backing file
    /// on `fd`'s file; reads and writes of the handle never come to the daemon
    passthrough: std::sync::atomic::AtomicBool,
    /// opened by execve (or for a program's interpreter): the kernel denies writes to the
    /// file while it runs, and keeps this handle open until the program is gone
    exec: bool,
}

/// `__FMODE_EXEC`: the kernel's own opens for execve carry it in the FUSE open flags
/// (0x20, a bit userspace open(2) cannot set).
const FMODE_EXEC_FLAG: i32 = 0x20;

/// What a handle on a verified lower file checks each read against.
#[derive(Debug)]
struct HandleVerify {
    layer: Arc<VerifiedLayer>,
    path: PathBuf,
    chunks: crate::lower::verify::FileChunks,
}

/// An open directory: a snapshot of the merged listing, so offsets stay stable.
#[derive(Debug)]
pub struct DirHandle {
    entries: Mutex<Option<Arc<Vec<dir::DirEntry>>>>,
}

/// A merged listing read without a directory handle (see [`Union::readdir_at`]).
#[derive(Debug)]
struct Listing {
    gen: u32,
    entries: Arc<Vec<dir::DirEntry>>,
}

/// The xattr the kernel reads before every write to a regular file (file_remove_privs:
/// FUSE never sets SB_NOSEC, so the kernel cannot remember that a file has none). Its
/// absence is cached per node, so that request costs no syscall.
pub const KILLPRIV_XATTR: &str = "security.capability";

/// Listings kept per directory for readers without a handle: the newest ones, so a reader
/// that started on an older snapshot still finds it after another reader started anew.
const LISTINGS_PER_DIR: usize = 2;

/// A position in a listing read without a handle: the snapshot's generation in the high
/// 32 bits, the index of the next entry in the low 32. Generations stay below 2^31, so the
/// offset is a positive loff_t.
pub fn dir_cookie(gen: u32, next: usize) -> u64 {
    (u64::from(gen) << 32) | next as u64
}

/// What a handle-less readdir returns: the listing, where to start in it, and its
/// generation (for the cookies of the entries sent).
#[derive(Debug)]
pub struct DirRead {
    /// the whole snapshot
    pub entries: Arc<Vec<dir::DirEntry>>,
    /// index of the first entry to send
    pub start: usize,
    /// generation of the snapshot, for [`dir_cookie`]
    pub gen: u32,
}

/// The union filesystem.
#[derive(Debug)]
pub struct Union {
    /// lower layers, top first
    pub lowers: Vec<LayerDir>,
    /// the upper, None for a read-only mount
    pub upper: Option<Upper>,
    nodes: NodeTable,
    files: RwLock<HashMap<u64, Arc<FileHandle>>>,
    dirs: RwLock<HashMap<u64, Arc<DirHandle>>>,
    /// directory id -> listings being read without a handle, newest last
    listings: Mutex<HashMap<u64, Vec<Listing>>>,
    next_listing: std::sync::atomic::AtomicU32,
    next_fh: AtomicU64,
    opts: UnionOptions,
    /// all layers on one filesystem: real inode numbers are unique as they are
    same_dev: bool,
    /// drops the kernel's cached attributes of a node (set by the FUSE adapter)
    invalidator: std::sync::OnceLock<Invalidator>,
    /// nodes forgotten so far (drives returning memory to the system)
    forgotten: AtomicU64,
    /// FUSE passthrough may be offered (see [`Union::open`])
    passthrough: std::sync::atomic::AtomicBool,
}

/// Drops the kernel's cached attributes of a node id.
pub struct Invalidator(pub Box<dyn Fn(u64) + Send + Sync>);

impl std::fmt::Debug for Invalidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Invalidator")
    }
}

/// What a name resolves to in the layers.
#[derive(Debug)]
struct Resolved {
    kind: Kind,
    upper: bool,
    lower: Option<LowerRef>,
    lowers: Vec<LowerRef>,
    ino: u64,
    /// lstat of the object found (the upper one, or the topmost lower one)
    st: Option<Stat>,
}

/// What a directory listing already told about a name in the parent's lower dirs, so a
/// lookup right after it (readdirplus) need not stat the layers where the name is absent.
/// Bit i refers to the parent's i-th lower dir. Lower layers never change while mounted, so
/// the hint stays true; the upper is always looked at.
#[derive(Clone, Copy, Debug, Default)]
pub struct LowerHint {
    /// the name exists in lower dir i
    pub present: u64,
    /// an OCI whiteout `.wh.NAME` exists in lower dir i
    pub oci_whiteout: u64,
}

/// Lower dirs beyond this many get no hints (one bit each in a u64).
pub const MAX_HINTED_LOWERS: usize = 64;

fn check_name(name: &OsStr) -> Result<()> {
    let b = name.as_bytes();
    if b.len() > NAME_MAX {
        return errno(libc::ENAMETOOLONG);
    }
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') {
        return errno(libc::EINVAL);
    }
    Ok(())
}

fn ts_of(sec: i64, nsec: i64) -> Timespec {
    Timespec {
        tv_sec: sec,
        tv_nsec: nsec as _,
    }
}

impl Union {
    /// A union over `lowers` (top first) and an optional upper.
    pub fn new(lowers: Vec<LayerDir>, upper: Option<Upper>, opts: UnionOptions) -> Result<Union> {
        let mut devs: Vec<u64> = lowers.iter().map(|l| l.dev).collect();
        if let Some(u) = &upper {
            devs.push(u.dir.dev);
        }
        let same_dev = devs.windows(2).all(|w| w[0] == w[1]);
        let root_lowers: Vec<LowerRef> = (0..lowers.len())
            .map(|i| LowerRef {
                layer: i,
                path: PathBuf::new(),
            })
            .collect();
        let mut u = Union {
            lowers,
            upper,
            nodes: NodeTable::new(Node::new(
                ROOT_ID,
                Kind::Dir,
                0,
                NodeState {
                    parent: ROOT_ID,
                    name: Arc::from(OsStr::new("")),
                    unlinked: false,
                    upper: false,
                    lower: None,
                    lowers: Vec::new(),
                    aliases: Default::default(),
                    pinned: Default::default(),
                },
            )),
            files: RwLock::new(HashMap::new()),
            dirs: RwLock::new(HashMap::new()),
            listings: Mutex::new(HashMap::new()),
            next_listing: std::sync::atomic::AtomicU32::new(1),
            next_fh: AtomicU64::new(1),
            same_dev,
            invalidator: std::sync::OnceLock::new(),
            forgotten: AtomicU64::new(0),
            passthrough: std::sync::atomic::AtomicBool::new(opts.passthrough),
            opts,
        };
        // The root merges every layer's root, unless the upper root is opaque.
        let root = u.node(ROOT_ID)?;
        let upper_root = u.upper.is_some();
        let opaque = upper_root && u.upper_dir_is_opaque(Path::new(""))?;
        let lowers_of_root = if opaque {
            Vec::new()
        } else {
            u.cut_at_opaque(root_lowers)?
        };
        {
            let mut st = root.state.write();
            st.upper = upper_root;
            st.lowers = lowers_of_root;
        }
        let root_ino = match (&u.upper, u.lowers.first()) {
            (Some(up), _) => rustix::fs::fstat(&up.dir.root).map(|st| u.map_ino(0, st.st_ino)),
            (None, Some(l)) => rustix::fs::fstat(&l.root).map(|st| u.map_ino(1, st.st_ino)),
            (None, None) => Ok(ROOT_ID),
        }?;
        root.ino.store(root_ino, Ordering::Relaxed);
        let _ = &mut u;
        Ok(u)
    }

    /// Number of nodes the kernel holds references to.
    pub fn node_count(&self) -> usize {
        self.nodes.count()
    }

    fn node(&self, id: u64) -> Result<Arc<Node>> {
        self.nodes.get(id).ok_or(Error::Errno(libc::ESTALE))
    }

    fn upper(&self) -> Result<&Upper> {
        self.upper.as_ref().ok_or(Error::Errno(libc::EROFS))
    }

    /// Start a change to the upper (EROFS without one): the commit gate held and the
    /// poison check made, both in `upper/` ([`Upper::change`]); the upper's write methods
    /// exist only on the returned [`Change`]. Taken before any node lock.
    fn change(&self) -> Result<Change<'_>> {
        self.upper()?.change()
    }

    /// Stop every change to the upper until the returned guard is dropped (see
    /// [`Upper::freeze`]); on a read-only mount there is nothing to stop. Must not be
    /// called from a thread that is inside a change.
    pub fn freeze(&self) -> Frozen<'_> {
        match &self.upper {
            Some(up) => up.freeze(),
            None => Frozen::nothing(),
        }
    }

    /// st_ino for a real inode of layer `index` (upper = 0, lowers = 1..): the real number
    /// when every layer is on one filesystem, else tagged with the layer in the high bits
    /// (what kernel overlayfs's xino does).
    pub(crate) fn map_ino(&self, index: usize, dev_ino: u64) -> u64 {
        if self.same_dev {
            dev_ino
        } else {
            dev_ino ^ ((index as u64 + 1) << 56)
        }
    }

    /// Merged path of a node (= its path in the upper). A node with several names (hard
    /// links) goes through its first name, or, when the kernel has forgotten that name's
    /// parent (it held the object through another), through the first other that works.
    pub fn path_of(&self, node: &Node) -> Result<PathBuf> {
        if node.id == ROOT_ID {
            return Ok(PathBuf::new());
        }
        let (unlinked, parent, name) = {
            let st = node.state.read();
            (st.unlinked, st.parent, st.name.clone())
        };
        if unlinked {
            return errno(libc::ENOENT);
        }
        match self.dir_path(parent) {
            Ok(p) => Ok(p.join(&*name)),
            Err(e) if e.errno() == libc::ESTALE => {
                let aliases = node.state.read().aliases.clone();
                aliases
                    .iter()
                    .find_map(|(p, n)| self.dir_path(*p).ok().map(|d| d.join(n)))
                    .ok_or(e)
            }
            Err(e) => Err(e),
        }
    }

    /// Merged path of directory node `id`, through its parents.
    fn dir_path(&self, id: u64) -> Result<PathBuf> {
        let mut names: Vec<Arc<OsStr>> = Vec::new();
        let mut cur_id = id;
        let mut guard = 0;
        while cur_id != ROOT_ID {
            let cur = self.node(cur_id)?;
            // Only the parent link and the name: no copy of the rest of the state.
            let (unlinked, parent, name) = {
                let st = cur.state.read();
                (st.unlinked, st.parent, st.name.clone())
            };
            if unlinked {
                return errno(libc::ENOENT);
            }
            names.push(name);
            cur_id = parent;
            guard += 1;
            if guard > 4096 {
                return errno(libc::ELOOP);
            }
        }
        let mut p = PathBuf::new();
        for n in names.iter().rev() {
            p.push(&**n);
        }
        Ok(p)
    }
}

/// Releases one kernel-style reference taken by an internal lookup.
struct Forget<'a>(&'a Union, u64);
impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.0.forget(self.1, 1);
    }
}

fn timestamps(sa: &SetAttr) -> Timestamps {
    let omit = Timespec {
        tv_sec: 0,
        tv_nsec: libc::UTIME_OMIT as _,
    };
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: libc::UTIME_NOW as _,
    };
    let pick = |t: Option<Option<Timespec>>| match t {
        None => omit,
        Some(None) => now,
        Some(Some(t)) => t,
    };
    Timestamps {
        last_access: pick(sa.atime),
        last_modification: pick(sa.mtime),
    }
}

/// open(2) flags from FUSE, minus those that only make sense to the kernel.
fn open_flags(flags: i32) -> OFlags {
    let f = OFlags::from_bits_retain(flags as u32);
    f & !(OFlags::CREATE | OFlags::EXCL | OFlags::NOCTTY | OFlags::CLOEXEC)
}

/// Is the directory `rel` of `layer` opaque, in any of the forms readers meet:
/// `trusted.overlay.opaque=y`, `user.overlay.opaque=y`, `user.fuseoverlayfs.opaque=y`, or an
/// OCI `.wh..wh..opq` entry inside it? The value must be exactly `y`, as kernel overlayfs
/// reads it (`ovl_path_check_dir_xattr`: a 1-byte getxattr, so a longer value is ERANGE and
/// the directory is not opaque).
pub fn dir_is_opaque(layer: &LayerDir, rel: &Path) -> Result<bool> {
    let names = layer.list_xattr(rel)?;
    for n in &names {
        let b = n.as_bytes();
        if b == b"trusted.overlay.opaque" || b == b"user.overlay.opaque" || b == b"user.fuseoverlayfs.opaque"
        {
            if let Some(v) = layer.get_xattr(rel, n)? {
                if v == b"y" {
                    return Ok(true);
                }
            }
        }
    }
    layer.exists(&rel.join(OCI_OPAQUE_MARKER))
}

/// The `overlay.redirect` xattr of a directory, in either namespace.
fn redirect_value(layer: &LayerDir, rel: &Path) -> Result<Option<Vec<u8>>> {
    for name in ["trusted.overlay.redirect", "user.overlay.redirect"] {
        if let Some(v) = layer.get_xattr(rel, OsStr::new(name))? {
            return Ok(Some(v));
        }
    }
    Ok(None)
}

/// Does an OCI whiteout `.wh.NAME` stand beside `cand` (= parent/NAME) in `layer`?
fn oci_whiteout_exists(layer: &LayerDir, cand: &Path) -> Result<bool> {
    let (Some(parent), Some(name)) = (cand.parent(), cand.file_name()) else {
        return Ok(false);
    };
    let mut wh = OsString::from(OCI_WHITEOUT_PREFIX);
    wh.push(name);
    if wh.len() > NAME_MAX {
        return Ok(false);
    }
    layer.exists(&parent.join(wh))
}
