//! Kernel-overlayfs semantics over real directories: the union core.
//!
//! This module never imports fuser. Methods mirror FUSE operations with verlay's own types
//! and return values; the FUSE adapter (`fuse.rs`) only decodes requests and sends replies.
//! All writes to the upper go through [`crate::upper::Upper`].
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
pub mod dir;
pub mod inode;

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
use crate::upper::{Occupant, Owner, Upper, XattrNames};
use acl::{in_group_or_capable, privs_to_kill, POSIX_ACL_ACCESS, POSIX_ACL_DEFAULT, POSIX_ACL_PREFIX};
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
    /// The commit gate: every change to the upper holds it shared ([`Union::hold_changes`]),
    /// `verlay commit` holds it exclusive while it copies the upper ([`Union::freeze`]), so
    /// the copy is the upper at one instant (docs/ordering.md, "commit").
    commit_gate: RwLock<()>,
}

thread_local! {
    /// Address of the commit gate this thread holds shared (0: none). A change that calls
    /// another (open -> copy-up) must not take the gate twice: parking_lot blocks a second
    /// shared lock while a commit waits for the exclusive one, which would deadlock.
    static GATE_HELD: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// A shared hold of the commit gate for one change to the upper (see [`Union::hold_changes`]).
pub struct ChangeGuard<'a> {
    _shared: Option<parking_lot::RwLockReadGuard<'a, ()>>,
    prev: usize,
}

impl Drop for ChangeGuard<'_> {
    fn drop(&mut self) {
        GATE_HELD.with(|h| h.set(self.prev));
    }
}

/// The exclusive hold of the commit gate: no change to the upper runs or starts while it
/// lives; changes that arrive wait (they are paused, never failed).
pub struct Frozen<'a> {
    _exclusive: parking_lot::RwLockWriteGuard<'a, ()>,
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
            nodes: NodeTable::new(Node {
                id: ROOT_ID,
                kind: Kind::Dir,
                ino: AtomicU64::new(0),
                lookups: AtomicU64::new(1),
                state: RwLock::new(NodeState {
                    parent: ROOT_ID,
                    name: Arc::from(OsStr::new("")),
                    unlinked: false,
                    upper: false,
                    lower: None,
                    lowers: Vec::new(),
                    aliases: Default::default(),
                }),
                copy_up: Mutex::new(()),
                handles: Mutex::new(Default::default()),
                gone_attr: Mutex::new(None),
                gone_dir: Mutex::new(None),
                children: Mutex::new(inode::ChildMap::default()),
                no_caps: AtomicU64::new(0),
                pin: AtomicU64::new(0),
            }),
            files: RwLock::new(HashMap::new()),
            dirs: RwLock::new(HashMap::new()),
            listings: Mutex::new(HashMap::new()),
            next_listing: std::sync::atomic::AtomicU32::new(1),
            next_fh: AtomicU64::new(1),
            same_dev,
            invalidator: std::sync::OnceLock::new(),
            forgotten: AtomicU64::new(0),
            commit_gate: RwLock::new(()),
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

    /// Hold the commit gate shared for one change to the upper (a no-op when this thread
    /// already holds it). Every public method that may write to the upper or the work dir
    /// takes it first, so a commit's copy never sees half of a change.
    fn hold_changes(&self) -> ChangeGuard<'_> {
        let me = &self.commit_gate as *const RwLock<()> as usize;
        let prev = GATE_HELD.with(|h| h.get());
        if prev == me {
            return ChangeGuard { _shared: None, prev };
        }
        let g = self.commit_gate.read();
        GATE_HELD.with(|h| h.set(me));
        ChangeGuard {
            _shared: Some(g),
            prev,
        }
    }

    /// Stop every change to the upper until the returned guard is dropped: waits for the
    /// changes in flight to finish; later ones block (parking_lot's lock is fair, so a
    /// steady stream of writers cannot starve a commit). Reads go on. Must not be called
    /// from a thread that is inside a change.
    pub fn freeze(&self) -> Frozen<'_> {
        Frozen {
            _exclusive: self.commit_gate.write(),
        }
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

    /// Merged path of a node (= its path in the upper).
    pub fn path_of(&self, node: &Node) -> Result<PathBuf> {
        let mut names: Vec<Arc<OsStr>> = Vec::new();
        let mut cur_id = node.id;
        let mut guard = 0;
        while cur_id != ROOT_ID {
            let cur = if cur_id == node.id {
                None
            } else {
                Some(self.node(cur_id)?)
            };
            // Only the parent link and the name: no copy of the rest of the state.
            let (unlinked, parent, name) = {
                let st = match &cur {
                    Some(n) => n.state.read(),
                    None => node.state.read(),
                };
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

    // ---------------------------------------------------------------- lookup

    fn upper_dir_is_opaque(&self, rel: &Path) -> Result<bool> {
        let up = self.upper()?;
        dir_is_opaque(&up.dir, rel)
    }

    /// Stop a list of lower directories at the first opaque one (it is kept, what is
    /// below it is not).
    fn cut_at_opaque(&self, lowers: Vec<LowerRef>) -> Result<Vec<LowerRef>> {
        let mut out = Vec::new();
        for l in lowers {
            let layer = &self.lowers[l.layer];
            let opaque = dir_is_opaque(layer, &l.path)?;
            out.push(l);
            if opaque {
                break;
            }
        }
        Ok(out)
    }

    /// Redirect of an upper directory, as a list of places to look in the lowers.
    fn redirect_of(
        &self,
        layer: &LayerDir,
        rel: &Path,
        parent_lowers: &[LowerRef],
        overlay_prefixes: bool,
    ) -> Result<Option<Vec<LowerRef>>> {
        let _ = overlay_prefixes;
        let Some(v) = redirect_value(layer, rel)? else {
            return Ok(None);
        };
        let v = OsStr::from_bytes(&v).to_os_string();
        let vb = v.as_bytes();
        if vb.first() == Some(&b'/') {
            // As ovl_lookup does for an absolute redirect: look the path up in each lower
            // layer from its root, and stop going down the layers after one in which the
            // path passes through an opaque directory, a whiteout or a non-directory.
            let path = PathBuf::from(OsStr::from_bytes(&vb[1..]));
            let mut out = Vec::new();
            for i in 0..self.lowers.len() {
                out.push(LowerRef {
                    layer: i,
                    path: path.clone(),
                });
                if self.path_stops_below(i, &path)? {
                    break;
                }
            }
            Ok(Some(out))
        } else {
            // Relative: the old name in the same parent.
            Ok(Some(
                parent_lowers
                    .iter()
                    .map(|p| LowerRef {
                        layer: p.layer,
                        path: p.path.join(&v),
                    })
                    .collect(),
            ))
        }
    }

    /// Does looking up `path` from the root of lower `layer` pass through something that
    /// hides the layers below: an opaque directory, a whiteout or a non-directory among its
    /// ancestors? (The path's own last component is judged by the caller.)
    fn path_stops_below(&self, layer: usize, path: &Path) -> Result<bool> {
        let l = &self.lowers[layer];
        let mut prefix = PathBuf::new();
        let comps: Vec<_> = path.components().collect();
        for c in comps.iter().take(comps.len().saturating_sub(1)) {
            prefix.push(c);
            match l.stat(&prefix)? {
                None => {
                    if oci_whiteout_exists(l, &prefix)? {
                        return Ok(true);
                    }
                    return Ok(false);
                }
                Some(st) if Kind::from_mode(st.st_mode) != Kind::Dir => return Ok(true),
                Some(_) => {
                    if dir_is_opaque(l, &prefix)? {
                        return Ok(true);
                    }
                }
            }
        }
        Ok(false)
    }

    /// Find `name` under a parent whose merged path is `ppath` and whose lower dirs are
    /// `plowers`. ENOENT when nothing (or a whiteout) is there.
    fn resolve(&self, ppath: &Path, pupper: bool, plowers: &[LowerRef], name: &OsStr) -> Result<Resolved> {
        self.resolve_hinted(ppath, pupper, plowers, name, None)
    }

    fn resolve_hinted(
        &self,
        ppath: &Path,
        pupper: bool,
        plowers: &[LowerRef],
        name: &OsStr,
        hint: Option<LowerHint>,
    ) -> Result<Resolved> {
        let mut hint = hint.filter(|_| plowers.len() <= MAX_HINTED_LOWERS);
        let path = ppath.join(name);
        let mut kind = None;
        let mut upper_present = false;
        let mut ino = 0;
        let mut found_st: Option<Stat> = None;
        let mut search: Vec<LowerRef> = plowers
            .iter()
            .map(|p| LowerRef {
                layer: p.layer,
                path: p.path.join(name),
            })
            .collect();
        // A parent that is not in the upper has nothing under it there: no upper stat (a
        // cold walk of a lower tree then costs one stat per name, not two).
        if let Some(up) = self.upper.as_ref().filter(|_| pupper) {
            if let Some(st) = up.dir.stat(&path)? {
                if is_whiteout_stat(&st) {
                    return errno(libc::ENOENT);
                }
                let k = Kind::from_mode(st.st_mode);
                kind = Some(k);
                upper_present = true;
                ino = match up.origin(&path)? {
                    Some(o) => o,
                    None => self.map_ino(0, st.st_ino),
                };
                if k != Kind::Dir {
                    return Ok(Resolved {
                        kind: k,
                        upper: true,
                        lower: None,
                        lowers: Vec::new(),
                        ino,
                        st: Some(st),
                    });
                }
                found_st = Some(st);
                if dir_is_opaque(&up.dir, &path)? {
                    search.clear();
                } else if let Some(r) = self.redirect_of(&up.dir, &path, plowers, true)? {
                    search = r;
                    // The hint was about the parent's lower dirs, not the redirect's.
                    hint = None;
                }
            }
        }
        let mut lower = None;
        let mut lowers = Vec::new();
        // `.wh.*` names in a lower layer are OCI whiteout markers, never objects.
        if name.as_bytes().starts_with(OCI_WHITEOUT_PREFIX.as_bytes()) {
            search.clear();
        }
        let mut i = 0;
        while i < search.len() {
            let cand = search[i].clone();
            let bit = 1u64 << i.min(63);
            i += 1;
            let layer = &self.lowers[cand.layer];
            let st = match hint {
                // Known absent from this lower dir: no stat, and the listing said whether an
                // OCI whiteout hides the name below.
                Some(h) if h.present & bit == 0 => {
                    if h.oci_whiteout & bit != 0 {
                        break;
                    }
                    continue;
                }
                _ => self.lower_stat(cand.layer, &cand.path)?,
            };
            match st {
                Some(st) if is_whiteout_stat(&st) => break,
                Some(st) => {
                    let k = Kind::from_mode(st.st_mode);
                    if k == Kind::Dir {
                        if kind.is_some() && kind != Some(Kind::Dir) {
                            break;
                        }
                        if kind.is_none() {
                            kind = Some(Kind::Dir);
                            ino = self.map_ino(cand.layer + 1, st.st_ino);
                            found_st = Some(st);
                        }
                        let opaque = dir_is_opaque(layer, &cand.path)?;
                        // A directory renamed in a layer that was once an upper carries a
                        // redirect: the layers below hold its contents under the old path.
                        if !opaque {
                            if let Some(v) = redirect_value(layer, &cand.path)? {
                                let vb = v.as_slice();
                                hint = None;
                                for later in &mut search[i..] {
                                    later.path = match vb.strip_prefix(b"/") {
                                        Some(abs) => PathBuf::from(OsStr::from_bytes(abs)),
                                        None => later
                                            .path
                                            .parent()
                                            .unwrap_or(Path::new(""))
                                            .join(OsStr::from_bytes(vb)),
                                    };
                                }
                            }
                        }
                        lowers.push(cand);
                        if opaque {
                            break;
                        }
                    } else {
                        if kind.is_none() {
                            kind = Some(k);
                            ino = self.map_ino(cand.layer + 1, st.st_ino);
                            lower = Some(cand);
                            found_st = Some(st);
                        }
                        break;
                    }
                }
                None => {
                    if oci_whiteout_exists(layer, &cand.path)? {
                        break;
                    }
                }
            }
        }
        match kind {
            Some(kind) => Ok(Resolved {
                kind,
                upper: upper_present,
                lower,
                lowers,
                ino,
                st: found_st,
            }),
            None => errno(libc::ENOENT),
        }
    }

    /// The manifest of lower `layer`, when it is verified.
    pub(crate) fn verified(&self, layer: usize) -> Option<&Arc<VerifiedLayer>> {
        self.opts.verified.get(layer).and_then(Option::as_ref)
    }

    /// lstat of a lower object, checked against the layer's manifest when it has one: an
    /// entry the manifest lists but the layer lacks, or whose metadata differs, is EIO; an
    /// entry it does not list is absent.
    fn lower_stat(&self, layer: usize, rel: &Path) -> Result<Option<Stat>> {
        let l = &self.lowers[layer];
        let st = l.stat(rel)?;
        match self.verified(layer) {
            Some(v) => v.check(l, rel, st),
            None => Ok(st),
        }
    }

    /// Is anything visible at `name` in the lower dirs `plowers` (ignoring the upper)?
    /// Decides whether removing the name from the upper needs a whiteout.
    fn lower_has(&self, plowers: &[LowerRef], name: &OsStr) -> Result<bool> {
        for p in plowers {
            let layer = &self.lowers[p.layer];
            let cand = p.path.join(name);
            match self.lower_stat(p.layer, &cand)? {
                Some(st) if is_whiteout_stat(&st) => return Ok(false),
                Some(_) => return Ok(true),
                None => {
                    if oci_whiteout_exists(layer, &cand)? {
                        return Ok(false);
                    }
                }
            }
        }
        Ok(false)
    }

    /// Register (or refresh) the node for `name` under `parent`, taking one kernel ref.
    fn install(&self, parent: &Node, name: &OsStr, r: Resolved) -> Result<Arc<Node>> {
        let mut children = parent.children.lock();
        if let Some(&id) = children.get(name) {
            if let Some(node) = self.nodes.get_ref(id) {
                if node.kind == r.kind {
                    let mut st = node.state.write();
                    // Never downgrade: a concurrent copy-up may have published the upper
                    // after this resolution looked.
                    st.upper |= r.upper;
                    if !st.upper {
                        st.lower = r.lower;
                    }
                    if st.lowers.is_empty() || r.upper == st.upper {
                        st.lowers = r.lowers;
                    }
                    drop(st);
                    // The name may now lead to another object of the same type.
                    node.forget_no_caps();
                    return Ok(node);
                }
                // Same name, another object: the old node stays for its open fds.
                self.nodes.forget(id, 1);
                node.state.write().unlinked = true;
            }
        }
        // The id a forgotten node of this object had, so file handles made before stay valid.
        let id = self.nodes.id_for(r.ino, r.kind);
        let shared_name: Arc<OsStr> = Arc::from(name);
        let node = Arc::new(Node {
            id,
            kind: r.kind,
            ino: AtomicU64::new(r.ino),
            lookups: AtomicU64::new(1),
            state: RwLock::new(NodeState {
                parent: parent.id,
                name: shared_name.clone(),
                unlinked: false,
                upper: r.upper,
                lower: r.lower,
                lowers: r.lowers,
                aliases: Default::default(),
            }),
            copy_up: Mutex::new(()),
            handles: Mutex::new(Default::default()),
            gone_attr: Mutex::new(None),
            gone_dir: Mutex::new(None),
            children: Mutex::new(inode::ChildMap::default()),
            no_caps: AtomicU64::new(0),
            pin: AtomicU64::new(0),
        });
        self.nodes.insert(node.clone());
        children.insert(shared_name, id);
        Ok(node)
    }

    /// The child node for `name`, resolving it in the layers.
    fn child(&self, parent: &Arc<Node>, name: &OsStr) -> Result<(Arc<Node>, PathBuf)> {
        let (node, path, _) = self.child_hinted(parent, name, None)?;
        Ok((node, path))
    }

    fn child_hinted(
        &self,
        parent: &Arc<Node>,
        name: &OsStr,
        hint: Option<LowerHint>,
    ) -> Result<(Arc<Node>, PathBuf, Option<Stat>)> {
        check_name(name)?;
        if parent.kind != Kind::Dir {
            return errno(libc::ENOTDIR);
        }
        let ppath = self.path_of(parent)?;
        let (pupper, plowers) = {
            let s = parent.state.read();
            (s.upper, s.lowers.clone())
        };
        let mut r = self.resolve_hinted(&ppath, pupper, &plowers, name, hint)?;
        let st = r.st.take();
        let from_upper = r.upper;
        let node = self.install(parent, name, r)?;
        // A node that a concurrent copy-up already moved to the upper keeps its upper stat.
        let st = st.filter(|_| node.state.read().upper == from_upper);
        Ok((node, ppath.join(name), st))
    }

    /// FUSE lookup.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<Entry> {
        self.lookup_hinted(parent, name, None)
    }

    /// Lookup of a name just listed by readdir, with what the listing showed of the lower
    /// dirs (readdirplus).
    pub fn lookup_hinted(&self, parent: u64, name: &OsStr, hint: Option<LowerHint>) -> Result<Entry> {
        let parent = self.node(parent)?;
        let (node, _, st) = self.child_hinted(&parent, name, hint)?;
        // The stat the lookup just made describes the object, unless the node is an open
        // unlinked one (then attr() finds its fd).
        let attr = match st {
            Some(st) if !node.state.read().unlinked => Ok(self.attr_from(&node, &st)),
            _ => self.attr(&node, None),
        };
        match attr {
            Ok(attr) => Ok(Entry { id: node.id, attr }),
            Err(e) => {
                self.nodes.forget(node.id, 1);
                Err(e)
            }
        }
    }

    /// Does `name` exist under `parent` in the merged view? Does not take a kernel ref.
    fn peek(&self, parent: &Arc<Node>, name: &OsStr) -> Result<Option<(Resolved, PathBuf)>> {
        check_name(name)?;
        let ppath = self.path_of(parent)?;
        let (pupper, plowers) = {
            let s = parent.state.read();
            (s.upper, s.lowers.clone())
        };
        match self.resolve(&ppath, pupper, &plowers, name) {
            Ok(r) => Ok(Some((r, ppath.join(name)))),
            Err(e) if e.errno() == libc::ENOENT => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// After the kernel forgot this many nodes, freed memory is returned to the system.
    const TRIM_AFTER_FORGETS: u64 = 20_000;

    /// FUSE forget.
    pub fn forget(&self, id: u64, n: u64) {
        self.forget_many(std::iter::once((id, n)));
    }

    /// FUSE batch_forget: after a large batch (memory pressure, drop_caches), give the freed
    /// memory back so RSS follows the kernel's cache.
    pub fn forget_many(&self, nodes: impl Iterator<Item = (u64, u64)>) {
        let mut dropped = 0u64;
        for (id, n) in nodes {
            dropped += u64::from(self.forget_node(id, n));
        }
        let total = self.forgotten.fetch_add(dropped, Ordering::Relaxed) + dropped;
        if total / Self::TRIM_AFTER_FORGETS != (total - dropped) / Self::TRIM_AFTER_FORGETS {
            crate::sys::release_free_memory();
            debug!(
                forgotten = total,
                nodes = self.nodes.count(),
                "returned freed memory to the system"
            );
        }
    }

    /// Drop `n` references; true when the node went away.
    fn forget_node(&self, id: u64, n: u64) -> bool {
        if let Some(node) = self.nodes.forget(id, n) {
            if node.kind == Kind::Dir {
                self.listings.lock().remove(&id);
            }
            let st = node.state.read();
            if let Some(parent) = self.nodes.get(st.parent) {
                let mut ch = parent.children.lock();
                if ch.get(&st.name) == Some(&id) {
                    ch.remove(&st.name);
                }
            }
            // Its other names (hard links) leave their parents' child tables too.
            for (p, n) in st.aliases.iter() {
                if let Some(parent) = self.nodes.get(*p) {
                    let mut ch = parent.children.lock();
                    if ch.get(n.as_os_str()) == Some(&id) {
                        ch.remove(n.as_os_str());
                    }
                }
            }
            if !st.unlinked {
                let gone = inode::Gone {
                    parent: st.parent,
                    name: st.name.clone(),
                    ino: node.ino(),
                    kind: node.kind,
                };
                self.nodes.note_gone(id, gone);
            }
            drop(st);
            let pin = node.pin.swap(0, Ordering::AcqRel);
            if pin != 0 {
                self.forget_node(pin, 1);
            }
            return true;
        }
        false
    }

    /// Deepest chain of forgotten parents a file handle is revived through.
    const REVIVE_MAX_DEPTH: usize = 4096;

    /// FUSE lookup of "." or ".." under `id`: how the kernel decodes a file handle whose
    /// inode it has dropped (FUSE_EXPORT_SUPPORT; fs/fuse/inode.c `fuse_get_dentry` and
    /// `fuse_get_parent`). "." must answer with the same id, or the kernel fails with EIO;
    /// an object that no longer exists is ESTALE.
    pub fn lookup_export(&self, id: u64, name: &OsStr) -> Result<Entry> {
        let node = self.revive(id, 0)?;
        let node = if name.as_bytes() == b".." {
            let parent = node.state.read().parent;
            let r = if node.id == ROOT_ID {
                Ok(node.clone())
            } else {
                self.revive(parent, 0)
            };
            self.forget_node(node.id, 1);
            r?
        } else {
            node
        };
        match self.attr(&node, None) {
            Ok(attr) => Ok(Entry { id: node.id, attr }),
            Err(e) => {
                self.forget_node(node.id, 1);
                Err(e)
            }
        }
    }

    /// The node `id` with one kernel reference taken: the live one, or, for a forgotten
    /// one, found again by name under its (revived) parent, with the same id when it is
    /// the same object (same st_ino). The revived node pins its parent (see [`Node::pin`]).
    fn revive(&self, id: u64, depth: usize) -> Result<Arc<Node>> {
        if let Some(node) = self.nodes.get_ref(id) {
            if node.state.read().unlinked {
                debug!(op = "lookup_export", ino = id, "unlinked: stale");
                self.forget_node(id, 1);
                return errno(libc::ESTALE);
            }
            return Ok(node);
        }
        if depth > Self::REVIVE_MAX_DEPTH {
            return errno(libc::ESTALE);
        }
        let Some(gone) = self.nodes.gone(id) else {
            debug!(
                op = "lookup_export",
                ino = id,
                "forgotten node not remembered: stale"
            );
            return errno(libc::ESTALE);
        };
        let parent = self.revive(gone.parent, depth + 1)?;
        let found = self.child(&parent, &gone.name);
        let node = match found {
            Ok((node, _)) if node.id == id => node,
            Ok((node, _)) => {
                debug!(
                    op = "lookup_export",
                    ino = id,
                    found = node.id,
                    "another object under the name: stale"
                );
                self.forget_node(node.id, 1);
                self.forget_node(parent.id, 1);
                return errno(libc::ESTALE);
            }
            Err(e) => {
                self.forget_node(parent.id, 1);
                return match e.errno() {
                    libc::ENOENT | libc::ENOTDIR => errno(libc::ESTALE),
                    _ => Err(e),
                };
            }
        };
        // Keep the reference on the parent for this node (released by its forget); one is
        // enough, so a second reviver gives its reference back.
        if node
            .pin
            .compare_exchange(0, parent.id, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            self.forget_node(parent.id, 1);
        }
        Ok(node)
    }

    // ---------------------------------------------------------------- attributes

    /// lstat of the real object behind a node.
    fn real_stat(&self, node: &Node) -> Result<Stat> {
        let st = node.snapshot();
        if st.unlinked {
            return errno(libc::ENOENT);
        }
        if st.upper || node.id == ROOT_ID && self.upper.is_some() {
            let path = self.path_of(node)?;
            return self.upper()?.dir.stat(&path)?.ok_or(Error::Errno(libc::ENOENT));
        }
        let lref = match node.kind {
            Kind::Dir => st.lowers.first().cloned(),
            _ => st.lower.clone(),
        };
        let lref = lref.ok_or(Error::Errno(libc::ENOENT))?;
        self.lower_stat(lref.layer, &lref.path)?
            .ok_or(Error::Errno(libc::ENOENT))
    }

    fn attr_from(&self, node: &Node, st: &Stat) -> Attr {
        let state = node.state.read();
        let kind = Kind::from_mode(st.st_mode);
        let mut nlink = st.st_nlink as u32; // an open, unlinked lower file keeps its lower count, as in the kernel
        if kind == Kind::Dir {
            // Kernel overlayfs reports nlink 1 for merged directories: the real count of
            // any one layer is wrong, and tools read 1 as "unknown".
            let merged = (state.upper && !state.lowers.is_empty()) || state.lowers.len() > 1;
            if merged {
                nlink = 1;
            }
        }
        let ino = node.ino();
        Attr {
            ino,
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            atime: ts_of(st.st_atime, st.st_atime_nsec as i64),
            mtime: ts_of(st.st_mtime, st.st_mtime_nsec as i64),
            ctime: ts_of(st.st_ctime, st.st_ctime_nsec as i64),
            kind,
            perm: st.st_mode & 0o7777,
            nlink,
            uid: self.opts.ids.uid_from_disk(st.st_uid),
            gid: self.opts.ids.gid_from_disk(st.st_gid),
            rdev: st.st_rdev,
            blksize: st.st_blksize as u32,
        }
    }

    /// An fd on the object of an unlinked node: the request's handle, or any open one of the
    /// node; with `need_upper`, only one on the upper object (never change a lower through
    /// an fd).
    ///
    /// A change through an fd of an unlinked lower file (only read-only fds stay on a lower)
    /// fails with EEXIST, as on kernel overlayfs: its copy-up links the copy at the name the
    /// file had (`ovl_copy_up_tmpfile`, linkat onto the dentry's old name), where the unlink
    /// left a whiteout.
    fn unlinked_fd(&self, node: &Node, fh: Option<u64>, need_upper: bool) -> Result<Arc<OwnedFd>> {
        if node.kind == Kind::Dir {
            return match node.gone_dir.lock().clone() {
                Some((fd, on_upper)) if on_upper || !need_upper => Ok(fd),
                Some(_) => errno(libc::EEXIST),
                None => errno(libc::ENOENT),
            };
        }
        let ok = |h: &FileHandle| !need_upper || h.on_upper.load(Ordering::Acquire);
        if let Some(h) = fh.and_then(|fh| self.file(fh).ok()) {
            if ok(&h) {
                return Ok(h.fd.read().clone());
            }
        }
        let handles: Vec<_> = node.handles.lock().iter().filter_map(|w| w.upgrade()).collect();
        match handles.iter().find(|h| ok(h)) {
            Some(h) => Ok(h.fd.read().clone()),
            None if !handles.is_empty() => errno(libc::EEXIST),
            None => errno(libc::ENOENT),
        }
    }

    /// Before a directory is removed or replaced: keep an fd on its object in
    /// `gone_dir`, for requests through an fd the kernel still has open on it (as kernel
    /// overlayfs answers them from the removed inode). Dropped with the node, when the kernel
    /// forgets it. Best effort: without it those requests fail with ENOENT.
    fn keep_gone_dir(&self, node: &Node) {
        let st = node.snapshot();
        let flags = OFlags::RDONLY | OFlags::DIRECTORY;
        let fd = if st.upper {
            self.path_of(node)
                .and_then(|p| self.upper()?.dir.open_file(&p, flags))
                .map(|fd| (fd, true))
        } else {
            st.lowers
                .first()
                .ok_or(Error::Errno(libc::ENOENT))
                .and_then(|l| self.lowers[l.layer].open_file(&l.path, flags))
                .map(|fd| (fd, false))
        };
        match fd {
            Ok((fd, on_upper)) => *node.gone_dir.lock() = Some((Arc::new(fd), on_upper)),
            Err(e) => debug!(
                op = "keep_gone_dir",
                ino = node.id,
                "no fd on a removed directory: {e}"
            ),
        }
    }

    fn attr(&self, node: &Node, fh: Option<u64>) -> Result<Attr> {
        let unlinked = node.state.read().unlinked;
        if unlinked {
            if node.kind == Kind::Dir {
                // A removed directory that is still open: what it was. The kernel reports
                // nlink 1 for a merged one (its rule for merged dirs), 0 for an upper one, and
                // the lower directory's own count for one that lives in a single lower layer
                // (that directory is still there).
                let mut a = *node.gone_attr.lock().clone().ok_or(Error::Errno(libc::ENOENT))?;
                if a.nlink != 1 && node.state.read().upper {
                    a.nlink = 0;
                }
                // Owner, mode and times as changed through an fd since the removal.
                if let Ok(fd) = self.unlinked_fd(node, None, false) {
                    let now = self.attr_from(node, &rustix::fs::fstat(&*fd)?);
                    (a.uid, a.gid, a.perm) = (now.uid, now.gid, now.perm);
                    (a.atime, a.mtime, a.ctime) = (now.atime, now.mtime, now.ctime);
                }
                return Ok(a);
            }
            match self.unlinked_fd(node, fh, false) {
                Ok(fd) => {
                    let st = rustix::fs::fstat(&*fd)?;
                    return Ok(self.attr_from(node, &st));
                }
                Err(e) => {
                    // A device node or fifo opened by the kernel itself has no handle here:
                    // report what it was. A removed upper object has no links left; a
                    // lower one keeps its lower count, as in the kernel.
                    let Some(a) = node.gone_attr.lock().clone() else {
                        return Err(e);
                    };
                    let mut a = *a;
                    if node.state.read().upper {
                        a.nlink = 0;
                    }
                    return Ok(a);
                }
            }
        }
        let st = self.real_stat(node)?;
        Ok(self.attr_from(node, &st))
    }

    /// FUSE getattr.
    pub fn getattr(&self, id: u64, fh: Option<u64>) -> Result<Attr> {
        let node = self.node(id)?;
        self.attr(&node, fh)
    }

    /// FUSE readlink.
    pub fn readlink(&self, id: u64) -> Result<OsString> {
        let node = self.node(id)?;
        if node.kind != Kind::Symlink {
            return errno(libc::EINVAL);
        }
        let st = node.snapshot();
        if st.upper {
            let path = self.path_of(&node)?;
            self.upper()?.dir.readlink(&path)
        } else {
            let l = st.lower.ok_or(Error::Errno(libc::ENOENT))?;
            self.lowers[l.layer].readlink(&l.path)
        }
    }

    // ---------------------------------------------------------------- copy-up

    /// Copy a node (and its parents first) up to the upper, once.
    pub fn copy_up(&self, node: &Arc<Node>) -> Result<()> {
        let _changes = self.hold_changes();
        self.copy_up_with(node, true)
    }

    /// Copy-up; `with_data: false` for a copy that is about to be truncated to zero (open with
    /// O_TRUNC, truncate to 0): only metadata is copied, as kernel overlayfs does.
    fn copy_up_with(&self, node: &Arc<Node>, with_data: bool) -> Result<()> {
        if node.state.read().upper {
            return Ok(());
        }
        let up = self.upper()?;
        let parent_id = node.state.read().parent;
        if node.id != ROOT_ID {
            let parent = self.node(parent_id)?;
            self.copy_up(&parent)?;
        }
        let _single = node.copy_up.lock();
        let st = node.snapshot();
        if st.upper {
            return Ok(());
        }
        if st.unlinked {
            return errno(libc::ENOENT);
        }
        let src = match node.kind {
            Kind::Dir => st.lowers.first().cloned(),
            _ => st.lower.clone(),
        }
        .ok_or(Error::Errno(libc::ENOENT))?;
        let layer = &self.lowers[src.layer];
        let lst = self
            .lower_stat(src.layer, &src.path)?
            .ok_or(Error::Errno(libc::ENOENT))?;
        if let (Some(v), true) = (self.verified(src.layer), with_data) {
            // A corrupt lower never becomes a good-looking upper file.
            v.verify_file(layer, &src.path, &lst)?;
        }
        let dst = self.path_of(node)?;
        // Kernel overlayfs with index=off breaks a lower hard link on copy-up and shows the
        // copy with its own inode number; other objects keep theirs (recorded as origin).
        let breaks_link = node.kind != Kind::Dir && lst.st_nlink > 1;
        let origin = if breaks_link { None } else { Some(node.ino()) };
        debug!(op = "copy_up", ino = node.ino(), path = %dst.display(), layer = %layer.name, "copy-up");
        // Publishing the copy changes the parent's times; the copy-up is not a change the
        // user made, so they are put back (as ovl_copy_up_one does).
        let parent_path = dst.parent().map(Path::to_path_buf).unwrap_or_default();
        let parent_times = up.dir.stat(&parent_path)?;
        up.copy_up(layer, &src.path, &lst, &dst, origin, with_data)?;
        // Kernel format: a directory holding copied-up entries is "impure", so readers know
        // to look for origins when reporting d_ino.
        up.mark_impure(&parent_path)?;
        if let Some(pt) = parent_times {
            if let Err(e) = up.utimens(&parent_path, &crate::upper::stat_times(&pt)) {
                debug!(error = %e, "could not restore the parent's times after copy-up");
            }
        }
        if breaks_link {
            if let Some(st) = up.dir.stat(&dst)? {
                node.ino.store(self.map_ino(0, st.st_ino), Ordering::Relaxed);
            }
        }
        {
            let mut w = node.state.write();
            w.upper = true;
        }
        node.forget_no_caps();
        if node.kind == Kind::File {
            self.switch_handles_to_upper(node, &dst)?;
        }
        // nlink (merged directories report 1) and st_ino may have changed behind the
        // kernel's attribute cache.
        self.invalidate(node.id);
        Ok(())
    }

    /// Tell the kernel to drop its cached attributes of a node.
    fn invalidate(&self, id: u64) {
        if let Some(f) = self.invalidator.get() {
            (f.0)(id);
        }
    }

    /// Install the function that drops the kernel's cached attributes of a node (the FUSE
    /// adapter's notifier). Called once, after the session exists.
    pub fn set_invalidator(&self, f: Invalidator) {
        let _ = self.invalidator.set(f);
    }

    // ---------------------------------------------------------------- setattr

    /// FUSE setattr.
    pub fn setattr(&self, ctx: &Ctx, id: u64, fh: Option<u64>, sa: SetAttr) -> Result<Attr> {
        let _changes = self.hold_changes();
        let node = self.node(id)?;
        let unlinked = node.state.read().unlinked;
        if unlinked {
            // Only an open file can be reached once unlinked: work on its fd.
            self.upper()?.check_writable()?;
            let fd = self.unlinked_fd(&node, fh, true)?;
            if let Some(size) = sa.size {
                rustix::fs::ftruncate(&*fd, size)?;
                self.remove_privs(ctx, id, &fd)?;
            }
            if sa.uid.is_some() || sa.gid.is_some() {
                rustix::fs::fchown(
                    &*fd,
                    sa.uid
                        .map(|u| rustix::process::Uid::from_raw(self.opts.ids.uid_to_disk(u))),
                    sa.gid
                        .map(|g| rustix::process::Gid::from_raw(self.opts.ids.gid_to_disk(g))),
                )?;
            }
            if let Some(mode) = sa.mode {
                rustix::fs::fchmod(&*fd, rustix::fs::Mode::from_raw_mode(mode & 0o7777))?;
            }
            if sa.atime.is_some() || sa.mtime.is_some() {
                rustix::fs::futimens(&*fd, &timestamps(&sa))?;
            }
            return self.attr(&node, fh);
        }
        self.copy_up_with(&node, sa.size != Some(0))?;
        let up = self.upper()?;
        let path = self.path_of(&node)?;
        if sa.uid.is_some() || sa.gid.is_some() {
            up.chown(
                &path,
                sa.uid.map(|u| self.opts.ids.uid_to_disk(u)),
                sa.gid.map(|g| self.opts.ids.gid_to_disk(g)),
            )?;
        }
        if let Some(mode) = sa.mode {
            up.chmod(&path, mode)?;
        }
        if let Some(size) = sa.size {
            match fh.and_then(|fh| self.file(fh).ok()).filter(|h| h.writable) {
                Some(h) => {
                    up.check_writable()?;
                    let fd = h.fd.read().clone();
                    rustix::fs::ftruncate(&*fd, size)?;
                }
                None => up.truncate(&path, size)?,
            }
            // A truncation removes setuid/setgid for the caller (do_truncate asks
            // should_remove_suid); the daemon truncates as root, so do it here.
            if ctx.uid != 0 {
                if let Some(st) = up.dir.stat(&path)? {
                    let gid = self.opts.ids.gid_from_disk(st.st_gid);
                    let kill = privs_to_kill(ctx, st.st_mode, gid);
                    if kill != 0 {
                        up.chmod(&path, st.st_mode & 0o7777 & !kill)?;
                    }
                }
            }
        }
        if sa.atime.is_some() || sa.mtime.is_some() {
            up.utimens(&path, &timestamps(&sa))?;
        }
        self.attr(&node, fh)
    }

    // ---------------------------------------------------------------- creating

    /// Owner and mode of a new object: the caller's uid; the parent's group when the
    /// parent is setgid (and then setgid for new directories too), else the caller's gid.
    fn new_owner(&self, ctx: &Ctx, parent: &Node, kind: Kind, mode: u32) -> Result<(Owner, u32)> {
        let pst = self.real_stat(parent)?;
        let mut mode = mode;
        let gid_disk = if pst.st_mode & libc::S_ISGID != 0 {
            if kind == Kind::Dir {
                mode |= libc::S_ISGID;
            }
            pst.st_gid
        } else {
            self.opts.ids.gid_to_disk(ctx.gid)
        };
        Ok((
            Owner {
                uid: self.opts.ids.uid_to_disk(ctx.uid),
                gid: gid_disk,
            },
            mode,
        ))
    }

    /// Common part of mknod/mkdir/symlink/create: check the name is free, copy the parent
    /// up, and create the object over a whiteout (opaque for directories) when one is there.
    #[allow(clippy::too_many_arguments)]
    fn make(
        &self,
        ctx: &Ctx,
        parent_id: u64,
        name: &OsStr,
        kind: Kind,
        mode: u32,
        rdev: u64,
        target: Option<&OsStr>,
        open_flags: OFlags,
    ) -> Result<(Entry, Option<OwnedFd>)> {
        let _changes = self.hold_changes();
        let parent = self.node(parent_id)?;
        if parent.kind != Kind::Dir {
            return errno(libc::ENOTDIR);
        }
        check_name(name)?;
        let up = self.upper()?;
        let ppath = self.path_of(&parent)?;
        let path = ppath.join(name);
        let plowers = parent.state.read().lowers.clone();
        // Is the name free? The upper decides first: a whiteout there means free (and the new
        // object goes over it), anything else means taken; with nothing in the upper, any
        // visible lower object takes the name.
        let whiteout_here = match up.dir.stat(&path)? {
            Some(st) if is_whiteout_stat(&st) => true,
            Some(_) => return errno(libc::EEXIST),
            None if !name.as_bytes().starts_with(OCI_WHITEOUT_PREFIX.as_bytes())
                && self.lower_has(&plowers, name)? =>
            {
                return errno(libc::EEXIST)
            }
            None => false,
        };
        self.copy_up(&parent)?;
        let occupant = if whiteout_here {
            Occupant::NonDir
        } else {
            Occupant::Nothing
        };
        // Something below was deleted here: a new directory must not show it again.
        let opaque = kind == Kind::Dir && whiteout_here;
        // posix_acl_create: a parent's default ACL replaces the umask and is inherited (as
        // the access ACL, and by a directory as its own default ACL). The object may be made
        // in the work dir, where the upper filesystem cannot inherit it, so it is set here.
        let default_acl = if kind == Kind::Symlink {
            None
        } else {
            up.dir.get_xattr(&ppath, OsStr::new(POSIX_ACL_DEFAULT))?
        };
        let (mode, access_acl) = match default_acl.as_deref().and_then(|d| acl::create_masq(d, mode)) {
            Some((m, a)) => (m, a),
            None if kind == Kind::Symlink => (mode, None),
            None => (mode & !(ctx.umask & 0o777), None),
        };
        let (owner, mode) = self.new_owner(ctx, &parent, kind, mode)?;
        let fd = up.create(
            &path, kind, mode, rdev, owner, target, open_flags, occupant, opaque,
        )?;
        if let Some(a) = &access_acl {
            up.set_xattr(&path, OsStr::new(POSIX_ACL_ACCESS), a, XattrFlags::empty())?;
        }
        if let (Kind::Dir, Some(d)) = (kind, &default_acl) {
            up.set_xattr(&path, OsStr::new(POSIX_ACL_DEFAULT), d, XattrFlags::empty())?;
        }
        trace!(op = "create", path = %path.display(), "created");
        // The new object is pure upper: nothing below shows through it (the name was free,
        // or a whiteout hid what is below and a directory made over it is opaque).
        let st = match &fd {
            Some(f) => rustix::fs::fstat(f)?,
            None => up.dir.stat(&path)?.ok_or(Error::Errno(libc::ENOENT))?,
        };
        let r = Resolved {
            kind,
            upper: true,
            lower: None,
            lowers: Vec::new(),
            ino: self.map_ino(0, st.st_ino),
            st: None,
        };
        // A new object: a record under its st_ino is of a removed one whose number the
        // upper filesystem reused, and its handles must stay stale.
        self.nodes.drop_gone_ino(r.ino);
        let node = self.install(&parent, name, r)?;
        let attr = self.attr_from(&node, &st);
        Ok((Entry { id: node.id, attr }, fd))
    }

    /// FUSE mknod.
    pub fn mknod(&self, ctx: &Ctx, parent: u64, name: &OsStr, mode: u32, rdev: u64) -> Result<Entry> {
        let kind = Kind::from_mode(mode);
        if kind == Kind::Char && rdev == 0 {
            // A 0/0 char device is a whiteout: the kernel refuses to create one through
            // an overlay rather than silently deleting the name.
            return errno(libc::EPERM);
        }
        if kind == Kind::Dir || kind == Kind::Symlink {
            return errno(libc::EINVAL);
        }
        Ok(self
            .make(ctx, parent, name, kind, mode, rdev, None, OFlags::empty())?
            .0)
    }

    /// FUSE mkdir.
    pub fn mkdir(&self, ctx: &Ctx, parent: u64, name: &OsStr, mode: u32) -> Result<Entry> {
        Ok(self
            .make(
                ctx,
                parent,
                name,
                Kind::Dir,
                mode | libc::S_IFDIR,
                0,
                None,
                OFlags::empty(),
            )?
            .0)
    }

    /// FUSE symlink.
    pub fn symlink(&self, ctx: &Ctx, parent: u64, name: &OsStr, target: &OsStr) -> Result<Entry> {
        if target.len() >= libc::PATH_MAX as usize {
            return errno(libc::ENAMETOOLONG);
        }
        Ok(self
            .make(
                ctx,
                parent,
                name,
                Kind::Symlink,
                libc::S_IFLNK | 0o777,
                0,
                Some(target),
                OFlags::empty(),
            )?
            .0)
    }

    /// FUSE create: make and open a regular file.
    pub fn create(
        &self,
        ctx: &Ctx,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
    ) -> Result<(Entry, u64)> {
        let oflags = open_flags(flags) & !(OFlags::TRUNC);
        let mut oflags = oflags;
        if oflags.contains(OFlags::WRONLY) {
            // Open read-write so the kernel's page cache can read back around partial
            // writes; permission was checked by the kernel on the create itself.
            oflags.remove(OFlags::WRONLY);
            oflags.insert(OFlags::RDWR);
        }
        let (entry, fd) = self.make(
            ctx,
            parent,
            name,
            Kind::File,
            mode | libc::S_IFREG,
            0,
            None,
            oflags,
        )?;
        let fd = fd.ok_or(Error::Errno(libc::EIO))?;
        let node = self.node(entry.id)?;
        let fh = self.add_file(node, fd, true, true, None, false)?;
        Ok((entry, fh))
    }

    /// FUSE link.
    pub fn link(&self, _ctx: &Ctx, id: u64, newparent: u64, newname: &OsStr) -> Result<Entry> {
        let _changes = self.hold_changes();
        let node = self.node(id)?;
        if node.kind == Kind::Dir {
            return errno(libc::EPERM);
        }
        let parent = self.node(newparent)?;
        if self.peek(&parent, newname)?.is_some() {
            return errno(libc::EEXIST);
        }
        self.copy_up(&node)?;
        self.copy_up(&parent)?;
        let up = self.upper()?;
        let src = self.path_of(&node)?;
        let ppath = self.path_of(&parent)?;
        let dst = ppath.join(newname);
        let whiteout_here = matches!(up.dir.stat(&dst)?, Some(st) if is_whiteout_stat(&st));
        up.link(
            &src,
            &dst,
            if whiteout_here {
                Occupant::NonDir
            } else {
                Occupant::Nothing
            },
        )?;
        // The new name is the same object: the same node, one more kernel reference.
        node.lookups.fetch_add(1, Ordering::AcqRel);
        node.state
            .write()
            .aliases
            .push((parent.id, newname.to_os_string()));
        parent.children.lock().insert(Arc::from(newname), node.id);
        let attr = self.attr(&node, None)?;
        Ok(Entry { id: node.id, attr })
    }

    // ---------------------------------------------------------------- removing

    /// Remove `name` from the merged view of `parent`, leaving a whiteout when a lower
    /// layer still has the name.
    fn remove(&self, parent_id: u64, name: &OsStr, want_dir: bool) -> Result<()> {
        let _changes = self.hold_changes();
        let parent = self.node(parent_id)?;
        let (r, path) = self.peek(&parent, name)?.ok_or(Error::Errno(libc::ENOENT))?;
        let is_dir = r.kind == Kind::Dir;
        if want_dir && !is_dir {
            return errno(libc::ENOTDIR);
        }
        if !want_dir && is_dir {
            return errno(libc::EISDIR);
        }
        self.upper()?;
        if is_dir {
            let (child, _) = self.child(&parent, name)?;
            let empty = self.dir_is_empty(&child);
            if let Ok(a) = self.attr(&child, None) {
                *child.gone_attr.lock() = Some(Box::new(a));
            }
            self.nodes.forget(child.id, 1);
            if !empty? {
                return errno(libc::ENOTEMPTY);
            }
            self.keep_gone_dir(&child);
        }
        if matches!(r.kind, Kind::Fifo | Kind::Char | Kind::Block | Kind::Socket) {
            // The kernel opens these itself (no handle here): keep what the object was, for
            // fstat while something still has it open.
            let known = parent.children.lock().get(name).copied();
            if let Some(child) = known.and_then(|id| self.nodes.get(id)) {
                if let Ok(a) = self.attr(&child, None) {
                    *child.gone_attr.lock() = Some(Box::new(a));
                }
            }
        }
        self.copy_up(&parent)?;
        let up = self.upper()?;
        let plowers = parent.state.read().lowers.clone();
        let need_whiteout = self.lower_has(&plowers, name)?;
        match (r.upper, need_whiteout) {
            (true, true) => up.whiteout(&path, if is_dir { Occupant::Dir } else { Occupant::NonDir })?,
            (true, false) => up.remove(&path, is_dir)?,
            (false, true) => up.whiteout(&path, Occupant::Nothing)?,
            (false, false) => return errno(libc::ENOENT),
        }
        // A multiply-linked upper file: the object lives on, maybe under a name its node
        // does not know (a hard link made before the node was last forgotten).
        let still_linked = (!is_dir && r.upper)
            .then_some(r.st.as_ref())
            .flatten()
            .filter(|s| s.st_nlink > 1)
            .map(|s| s.st_ino);
        let known = parent.children.lock().get(name).copied();
        self.detach(&parent, name);
        if let (Some(real_ino), Some(id)) = (still_linked, known) {
            self.follow_link(&parent, id, &path, real_ino);
        }
        Ok(())
    }

    /// Most directory entries read to find another name of an unlinked object.
    const FOLLOW_LINK_MAX_ENTRIES: usize = 1 << 16;

    /// The node of an upper object whose last known name just went away, while the object
    /// keeps `st_nlink` > 0: it takes another name of the object in the same directory, so
    /// a file handle of it stays valid, as on kernel overlayfs (fstests generic/426 `-u`).
    /// Only then: one listing of that directory, at most
    /// [`Self::FOLLOW_LINK_MAX_ENTRIES`] entries; a link elsewhere is not searched.
    fn follow_link(&self, parent: &Node, id: u64, path: &Path, real_ino: u64) {
        let Some(node) = self.nodes.get(id) else { return };
        if !node.state.read().unlinked {
            return; // it knew another name
        }
        let Some(dir) = path.parent() else { return };
        let Ok(up) = self.upper() else { return };
        let Ok(entries) = up.dir.read_dir(dir) else { return };
        let other = entries
            .into_iter()
            .take(Self::FOLLOW_LINK_MAX_ENTRIES)
            .find(|e| e.ino == real_ino);
        let Some(other) = other else {
            debug!(
                op = "unlink",
                ino = id,
                "no other name of the object in its directory"
            );
            return;
        };
        debug!(op = "unlink", ino = id, name = ?other.name, "node follows another name of its object");
        // The node's state before the parent's child table, the order forget_node takes them.
        let mut st = node.state.write();
        if !st.unlinked {
            return;
        }
        let mut children = parent.children.lock();
        if let Some(&cid) = children.get(&other.name) {
            if cid != id && self.nodes.get(cid).is_some() {
                return; // that name has its own node: the object is reachable through it
            }
        }
        st.unlinked = false;
        st.parent = parent.id;
        st.name = Arc::from(other.name.as_os_str());
        children.insert(st.name.clone(), node.id);
    }

    /// Forget the name→node link after the name went away; the node lives on for open fds
    /// and under its other names (hard links).
    fn detach(&self, parent: &Node, name: &OsStr) {
        let id = parent.children.lock().remove(name);
        if let Some(node) = id.and_then(|id| self.nodes.get(id)) {
            let mut st = node.state.write();
            if st.parent == parent.id && &*st.name == name {
                match st.aliases.pop() {
                    Some((p, n)) => {
                        st.parent = p;
                        st.name = Arc::from(n.as_os_str());
                    }
                    None => st.unlinked = true,
                }
            } else {
                st.aliases.retain(|(p, n)| !(*p == parent.id && n == name));
            }
        }
    }

    /// Record that the name (`from`, `old`) of a node is now (`to`, `new`).
    fn rename_name(&self, node: &Node, from: u64, old: &OsStr, to: u64, new: &OsStr) {
        let mut st = node.state.write();
        if st.parent == from && &*st.name == old {
            st.parent = to;
            st.name = Arc::from(new);
            st.unlinked = false;
        } else if let Some(a) = st.aliases.iter_mut().find(|(p, n)| *p == from && n == old) {
            *a = (to, new.to_os_string());
        } else {
            st.parent = to;
            st.name = Arc::from(new);
            st.unlinked = false;
        }
    }

    /// FUSE unlink.
    pub fn unlink(&self, _ctx: &Ctx, parent: u64, name: &OsStr) -> Result<()> {
        self.remove(parent, name, false)
    }

    /// FUSE rmdir.
    pub fn rmdir(&self, _ctx: &Ctx, parent: u64, name: &OsStr) -> Result<()> {
        self.remove(parent, name, true)
    }

    /// Is a directory empty in the merged view?
    fn dir_is_empty(&self, node: &Arc<Node>) -> Result<bool> {
        let entries = self.merged_entries(node)?;
        Ok(entries.iter().all(|e| e.name == "." || e.name == ".."))
    }

    // ---------------------------------------------------------------- rename

    /// FUSE rename (renameat2 flags: RENAME_NOREPLACE, RENAME_EXCHANGE).
    pub fn rename(
        &self,
        _ctx: &Ctx,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> Result<()> {
        let _changes = self.hold_changes();
        let flags = RenameFlags::from_bits_retain(flags);
        if flags.contains(RenameFlags::WHITEOUT) {
            return errno(libc::EINVAL);
        }
        let exchange = flags.contains(RenameFlags::EXCHANGE);
        let noreplace = flags.contains(RenameFlags::NOREPLACE);
        if exchange && noreplace {
            return errno(libc::EINVAL);
        }
        let oldp = self.node(parent)?;
        let newp = self.node(newparent)?;
        let (src, _) = self.child(&oldp, name)?;
        let src_guard = Forget(self, src.id);
        let dst = match self.child(&newp, newname) {
            Ok((n, _)) => Some(n),
            Err(e) if e.errno() == libc::ENOENT => None,
            Err(e) => return Err(e),
        };
        let _dst_guard = dst.as_ref().map(|d| Forget(self, d.id));
        if let Some(d) = &dst {
            if d.id == src.id {
                return Ok(()); // same object (hard links to it, or the same name)
            }
        }
        if exchange && dst.is_none() {
            return errno(libc::ENOENT);
        }
        if noreplace && dst.is_some() {
            return errno(libc::EEXIST);
        }
        if !exchange {
            if let Some(d) = &dst {
                match (src.kind == Kind::Dir, d.kind == Kind::Dir) {
                    (true, false) => return errno(libc::ENOTDIR),
                    (false, true) => return errno(libc::EISDIR),
                    (true, true) if !self.dir_is_empty(d)? => {
                        // The kernel checks only a merged target's emptiness up front; a pure
                        // upper target fails in vfs_rename, after the redirect was set, so an
                        // over-long redirect reports EXDEV first.
                        let target_pure_upper = d.snapshot().lowers.is_empty();
                        if target_pure_upper && self.redirect_too_long(&src, oldp.id == newp.id)? {
                            return errno(libc::EXDEV);
                        }
                        if target_pure_upper {
                            // As in the kernel, the source is copied up before rename(2) on
                            // the upper reports the target non-empty (visible as nlink 1 of a
                            // now merged directory).
                            self.copy_up(&oldp)?;
                            self.copy_up(&newp)?;
                            self.copy_up(&src)?;
                        }
                        return errno(libc::ENOTEMPTY);
                    }
                    _ => {}
                }
            }
        }
        self.upper()?;
        self.copy_up(&oldp)?;
        self.copy_up(&newp)?;
        self.copy_up(&src)?;
        if let (true, Some(d)) = (exchange, &dst) {
            self.copy_up(d)?;
        }
        let up = self.upper()?;
        // By the names given, not the node's first name: a hard link has several.
        let old_path = self.path_of(&oldp)?.join(name);
        let new_path = self.path_of(&newp)?.join(newname);
        let old_plowers = oldp.state.read().lowers.clone();
        let new_plowers = newp.state.read().lowers.clone();

        // A directory with lower parts keeps them by redirect; a pure upper directory
        // moved into a merged parent must not start merging what is below its new name.
        let same_dir = oldp.id == newp.id;
        let prepare_dir = |n: &Arc<Node>, at: &Path, to_merged_parent: bool| -> Result<()> {
            if n.kind != Kind::Dir {
                return Ok(());
            }
            let st = n.snapshot();
            if let Some(first) = st.lowers.first() {
                // Kernel rules (ovl_set_redirect): keep a redirect that still holds (any
                // absolute one, or a relative one within the same parent); else write the
                // old name within the same parent, or the absolute lower path, which must
                // fit in redirect_max or the rename falls back to EXDEV.
                let existing = redirect_value(&up.dir, at)?;
                if let Some(v) = &existing {
                    if same_dir || v.first() == Some(&b'/') {
                        return Ok(());
                    }
                }
                let value = if same_dir {
                    at.file_name().map(|n| n.as_bytes().to_vec()).unwrap_or_default()
                } else {
                    let mut v = b"/".to_vec();
                    v.extend_from_slice(first.path.as_os_str().as_bytes());
                    v
                };
                if value.len() > REDIRECT_MAX {
                    return errno(libc::EXDEV);
                }
                up.set_ovl_xattr(at, "redirect", &value)?;
            } else if to_merged_parent && !dir_is_opaque(&up.dir, at)? {
                up.set_ovl_xattr(at, "opaque", b"y")?;
            }
            Ok(())
        };

        if exchange {
            let d = dst.as_ref().ok_or(Error::Errno(libc::ENOENT))?;
            prepare_dir(&src, &old_path, !new_plowers.is_empty())?;
            prepare_dir(d, &new_path, !old_plowers.is_empty())?;
            up.rename(&old_path, &new_path, RenameFlags::EXCHANGE, false)?;
            self.rename_name(&src, oldp.id, name, newp.id, newname);
            self.rename_name(d, newp.id, newname, oldp.id, name);
            {
                let mut ch = oldp.children.lock();
                ch.insert(Arc::from(name), d.id);
            }
            newp.children.lock().insert(Arc::from(newname), src.id);
            drop(src_guard);
            return Ok(());
        }

        prepare_dir(&src, &old_path, !new_plowers.is_empty())?;
        let whiteout_old = self.lower_has(&old_plowers, name)?;
        {
            let st = src.snapshot();
            if st.lower.is_some() || !st.lowers.is_empty() {
                up.mark_impure(&self.path_of(&newp)?)?;
            }
        }
        if let Some(d) = &dst {
            if d.kind != Kind::File {
                // What the replaced object was, for fstat through an fd still open on it
                // (generic/035): a regular file keeps its own fd, the others have none here.
                if let Ok(a) = self.attr(d, None) {
                    *d.gone_attr.lock() = Some(Box::new(a));
                }
                if d.kind == Kind::Dir {
                    self.keep_gone_dir(d);
                }
            }
            let dst_upper = d.state.read().upper;
            if d.kind == Kind::Dir && dst_upper {
                // The target is empty in the merged view; only whiteouts can be left in
                // its upper copy, and rename(2) needs it truly empty.
                up.clear_whiteouts(&new_path)?;
            }
        }
        let occupant = match up.dir.stat(&new_path)? {
            None => Occupant::Nothing,
            Some(st) if Kind::from_mode(st.st_mode) == Kind::Dir => Occupant::Dir,
            Some(_) => Occupant::NonDir,
        };
        if src.kind == Kind::Dir && occupant == Occupant::NonDir {
            // A directory moving onto a whiteout: rename(2) cannot replace a non-directory
            // with a directory, so swap them; the whiteout lands at the old name, where it
            // is either needed or removed.
            up.rename(&old_path, &new_path, RenameFlags::EXCHANGE, false)?;
            if !whiteout_old {
                up.remove(&old_path, false)?;
            }
        } else {
            let rflags = if occupant == Occupant::Nothing {
                RenameFlags::NOREPLACE
            } else {
                RenameFlags::empty()
            };
            up.rename(&old_path, &new_path, rflags, whiteout_old)?;
        }
        if dst.is_some() {
            self.detach(&newp, newname);
        }
        oldp.children.lock().remove(name);
        self.rename_name(&src, oldp.id, name, newp.id, newname);
        newp.children.lock().insert(Arc::from(newname), src.id);
        drop(src_guard);
        Ok(())
    }

    /// Would moving directory `n` to another parent need a redirect longer than the kernel
    /// writes? (Only when it has lower parts and no absolute redirect to keep.)
    fn redirect_too_long(&self, n: &Node, same_dir: bool) -> Result<bool> {
        let st = n.snapshot();
        let Some(first) = st.lowers.first() else {
            return Ok(false);
        };
        if same_dir {
            return Ok(false);
        }
        if st.upper {
            if let Some(v) = redirect_value(&self.upper()?.dir, &self.path_of(n)?)? {
                if v.first() == Some(&b'/') {
                    return Ok(false);
                }
            }
        }
        Ok(first.path.as_os_str().len() + 1 > REDIRECT_MAX)
    }

    // ---------------------------------------------------------------- files

    /// Register an open file; `on_upper`: `fd` is on the upper object.
    ///
    /// Done under the node's handle lock, which a copy-up's handle switch also takes: a
    /// copy-up that finished after `fd` was opened on the lower is never missed (the handle
    /// is opened again on the upper copy, and has nothing left to verify). The passthrough
    /// choice is made under the same lock (see [`Union::wants_passthrough`]). `exec`: the
    /// kernel opened it to run it (an O_TRUNC open of the node is then ETXTBSY).
    fn add_file(
        &self,
        node: Arc<Node>,
        fd: OwnedFd,
        on_upper: bool,
        writable: bool,
        verify: Option<HandleVerify>,
        exec: bool,
    ) -> Result<u64> {
        let mut hs = node.handles.lock();
        hs.retain(|w| w.strong_count() > 0);
        let (fd, on_upper, verify) = if !on_upper && node.state.read().upper {
            let path = self.path_of(&node)?;
            (self.upper()?.dir.open_file(&path, OFlags::RDONLY)?, true, None)
        } else {
            (fd, on_upper, verify)
        };
        let passthrough = self.wants_passthrough(&node, &hs, on_upper, verify.is_some());
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let h = Arc::new(FileHandle {
            fd: RwLock::new(Arc::new(fd)),
            writable,
            on_upper: std::sync::atomic::AtomicBool::new(on_upper),
            verify,
            passthrough: std::sync::atomic::AtomicBool::new(passthrough),
            exec,
        });
        hs.push(Arc::downgrade(&h));
        drop(hs);
        self.files.write().insert(fh, h);
        Ok(fh)
    }

    /// Should a new handle of `node` use FUSE passthrough? `others`: the node's handles.
    ///
    /// - The kernel requires one mode for all open files of an inode: passthrough with one
    ///   backing file, or its page cache (fuse_file_io_open fails the open with EIO
    ///   otherwise). So a node with open handles keeps their mode.
    /// - An upper file: yes. The upper object never changes identity while open (rename and
    ///   unlink keep it), so the backing file stays the right one.
    /// - A lower file under an upper: no. The backing file is fixed at open, so a reader
    ///   would keep the lower after a copy-up (verlay switches it to the copy, as kernel
    ///   overlayfs does), and the write-open that copies up would have to share the lower
    ///   backing file: its writes would reach the lower layer (fuse-overlayfs 2.0's bug).
    /// - A lower file of a read-only mount (no copy-up ever): yes, unless a manifest must
    ///   check its reads (passthrough reads never reach the daemon).
    fn wants_passthrough(
        &self,
        node: &Node,
        others: &[std::sync::Weak<FileHandle>],
        on_upper: bool,
        verified: bool,
    ) -> bool {
        if node.kind != Kind::File {
            return false;
        }
        // Before the mount-wide switch: a node whose handles use passthrough must go on
        // using it even after a later refusal turned passthrough off for new nodes.
        if let Some(other) = others.iter().find_map(|w| w.upgrade()) {
            return other.passthrough.load(Ordering::Acquire);
        }
        if !self.passthrough.load(Ordering::Relaxed) {
            return false;
        }
        if on_upper {
            true
        } else {
            self.upper.is_none() && !verified
        }
    }

    /// The fd a passthrough handle's backing file is made from, or None for a handle the
    /// daemon serves (reads, writes and the kernel's page cache).
    pub fn passthrough_fd(&self, fh: u64) -> Option<Arc<OwnedFd>> {
        let h = self.file(fh).ok()?;
        if h.passthrough.load(Ordering::Acquire) {
            Some(h.fd.read().clone())
        } else {
            None
        }
    }

    /// The kernel refused a backing file (no CAP_SYS_ADMIN, or a stacking limit): serve
    /// `fh` through the daemon, and stop offering passthrough for this mount.
    pub fn passthrough_refused(&self, fh: u64) {
        self.passthrough.store(false, Ordering::Relaxed);
        if let Ok(h) = self.file(fh) {
            h.passthrough.store(false, Ordering::Release);
        }
    }

    /// Is passthrough wanted (and not yet turned off)?
    pub fn passthrough_offered(&self) -> bool {
        self.passthrough.load(Ordering::Relaxed)
    }

    /// Turn passthrough off for this mount (the kernel did not offer it).
    pub fn disable_passthrough(&self) {
        self.passthrough.store(false, Ordering::Relaxed);
    }

    /// Open handles whose writes go straight to the upper file (passthrough), never
    /// through the daemon: anything that must stop all writers (a point-in-time capture of
    /// the upper) cannot pause these and has to wait for them to close.
    pub fn passthrough_writers(&self) -> usize {
        self.files
            .read()
            .values()
            .filter(|h| h.writable && h.passthrough.load(Ordering::Acquire))
            .count()
    }

    /// For a lower file of a verified layer: the chunk digests its reads are checked against.
    fn handle_verify(&self, node: &Node, fd: &OwnedFd) -> Result<Option<HandleVerify>> {
        let st = node.snapshot();
        if st.upper {
            return Ok(None);
        }
        let Some(l) = st.lower else { return Ok(None) };
        let Some(v) = self.verified(l.layer) else {
            return Ok(None);
        };
        let Some(entry) = v.entry(&l.path)? else {
            return Ok(None);
        };
        let ino = rustix::fs::fstat(fd)?.st_ino;
        let Some(chunks) = v.file_chunks(&entry, ino) else {
            return Ok(None);
        };
        Ok(Some(HandleVerify {
            layer: v.clone(),
            path: l.path,
            chunks,
        }))
    }

    /// After a copy-up, point the node's read-only handles on the lower file at the upper
    /// copy (`path`, just published).
    fn switch_handles_to_upper(&self, node: &Node, path: &Path) -> Result<()> {
        let handles: Vec<Arc<FileHandle>> = node.handles.lock().iter().filter_map(|w| w.upgrade()).collect();
        for h in handles {
            if h.on_upper.load(Ordering::Acquire) {
                continue;
            }
            let fd = self.upper()?.dir.open_file(path, OFlags::RDONLY)?;
            // Both under the lock: a read takes the fd and the flag together, so it never
            // checks the upper copy's bytes against the lower file's digests.
            let mut slot = h.fd.write();
            *slot = Arc::new(fd);
            h.on_upper.store(true, Ordering::Release);
            drop(slot);
        }
        Ok(())
    }

    fn file(&self, fh: u64) -> Result<Arc<FileHandle>> {
        self.files
            .read()
            .get(&fh)
            .cloned()
            .ok_or(Error::Errno(libc::EBADF))
    }

    /// FUSE open.
    pub fn open(&self, ctx: &Ctx, id: u64, flags: i32) -> Result<u64> {
        let node = self.node(id)?;
        if node.kind == Kind::Dir {
            return errno(libc::EISDIR);
        }
        let oflags = open_flags(flags);
        // The kernel refuses a writable open of a running program (ETXTBSY) before asking us,
        // but checks O_RDONLY|O_TRUNC only after this OPEN has truncated (atomic_o_trunc): the
        // program's text would be cut under it (SIGBUS, SIGSEGV), and if it died fast enough
        // the open even succeeded. Its exec opens come here, so the check can be made here.
        if oflags.contains(OFlags::TRUNC) && self.executing(&node) {
            return errno(libc::ETXTBSY);
        }
        let writable = oflags.contains(OFlags::WRONLY)
            || oflags.contains(OFlags::RDWR)
            || oflags.contains(OFlags::TRUNC);
        // A read-only open changes nothing; a writable one may copy up or truncate.
        let _changes = writable.then(|| self.hold_changes());
        if writable {
            // After a failed fsync nothing may change the upper, an O_TRUNC included.
            self.upper()?.check_writable()?;
            self.copy_up_with(&node, !oflags.contains(OFlags::TRUNC))?;
        }
        let mut oflags = oflags;
        if oflags.contains(OFlags::WRONLY) {
            oflags.remove(OFlags::WRONLY);
            oflags.insert(OFlags::RDWR);
        }
        let (fd, on_upper) = self.open_real(&node, oflags)?;
        if oflags.contains(OFlags::TRUNC) && ctx.uid != 0 {
            // The kernel leaves O_TRUNC to us (atomic_o_trunc), and the daemon truncates as
            // root; a truncation by an unprivileged caller must still drop setuid and setgid
            // as the VFS does (should_remove_suid).
            self.remove_privs(ctx, node.id, &fd)?;
        }
        let verify = if on_upper {
            None
        } else {
            self.handle_verify(&node, &fd)?
        };
        let exec = flags & FMODE_EXEC_FLAG != 0;
        self.add_file(node, fd, on_upper, writable, verify, exec)
    }

    /// Does a running program have this file as its executable (an exec open of it is live)?
    /// Its handle is released when the program has exited; until the daemon has seen that
    /// release, an O_TRUNC open still finds it running.
    fn executing(&self, node: &Node) -> bool {
        node.handles
            .lock()
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .any(|h| h.exec)
    }

    /// A new open of a file that has no name any more but is still open (the kernel reaches
    /// it by a file handle, open_by_handle_at): the object is opened again through one of
    /// its open fds (`/proc/self/fd/N`, as open(2) of that link does for a deleted file).
    fn reopen_unlinked(&self, node: &Node, oflags: OFlags) -> Result<(OwnedFd, bool)> {
        let h = node.handles.lock().iter().find_map(|w| w.upgrade());
        let h = h.ok_or(Error::Errno(libc::ENOENT))?;
        let on_upper = h.on_upper.load(Ordering::Acquire);
        let fd = h.fd.read().clone();
        let link = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&*fd));
        let fd = rustix::fs::open(link.as_str(), oflags | OFlags::CLOEXEC, rustix::fs::Mode::empty())
            .map_err(|e| Error::io("reopen", Path::new(&link), e.into()))?;
        Ok((fd, on_upper))
    }

    /// Open the object of `node`; true when the fd is on the upper object.
    fn open_real(&self, node: &Node, oflags: OFlags) -> Result<(OwnedFd, bool)> {
        let st = node.snapshot();
        if st.unlinked {
            return self.reopen_unlinked(node, oflags);
        }
        if st.upper {
            let path = self.path_of(node)?;
            let fd = match self.upper()?.dir.open_file(&path, oflags) {
                Err(e) if e.errno() == libc::EACCES && oflags.contains(OFlags::RDWR) => {
                    // An upgraded WRONLY open on a write-only file: open as asked.
                    let mut f = oflags;
                    f.remove(OFlags::RDWR);
                    f.insert(OFlags::WRONLY);
                    self.upper()?.dir.open_file(&path, f)
                }
                r => r,
            }?;
            if self.opts.atime == Atime::Never {
                // O_NOATIME needs the file's owner or CAP_FOWNER: best effort when rootless.
                if let Ok(fl) = rustix::fs::fcntl_getfl(&fd) {
                    let _ = rustix::fs::fcntl_setfl(&fd, fl | OFlags::NOATIME);
                }
            }
            Ok((fd, true))
        } else {
            let l = st.lower.ok_or(Error::Errno(libc::ENOENT))?;
            let fd = self.lowers[l.layer].open_file(
                &l.path,
                oflags & !(OFlags::RDWR | OFlags::WRONLY | OFlags::TRUNC | OFlags::APPEND),
            )?;
            Ok((fd, false))
        }
    }

    /// May the kernel keep its page cache of this file across opens? Yes for a file served
    /// from a lower layer: its content never changes while mounted (a copy-up keeps it), so
    /// warm reads need not come back here. Upper files are re-read after each open.
    pub fn keep_cache(&self, fh: u64) -> bool {
        self.file(fh)
            .map(|h| !h.on_upper.load(Ordering::Acquire))
            .unwrap_or(false)
    }

    /// The fd to use for a handle.
    fn handle_fd(&self, h: &FileHandle) -> Result<Arc<OwnedFd>> {
        Ok(h.fd.read().clone())
    }

    /// FUSE read.
    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        let h = self.file(fh)?;
        let (fd, on_upper) = {
            let slot = h.fd.read();
            (slot.clone(), h.on_upper.load(Ordering::Acquire))
        };
        if let (Some(v), false) = (&h.verify, on_upper) {
            return v.layer.read(&v.path, &v.chunks, &*fd, offset, size);
        }
        crate::layer::read_at(&*fd, offset, size)
    }

    /// FUSE write, by `ctx` to node `id`.
    pub fn write(&self, ctx: &Ctx, id: u64, fh: u64, offset: u64, data: &[u8]) -> Result<usize> {
        let _changes = self.hold_changes();
        let h = self.file(fh)?;
        if !h.writable {
            return errno(libc::EBADF);
        }
        self.upper()?.check_writable()?;
        let fd = h.fd.read().clone();
        self.remove_privs(ctx, id, &fd)?;
        let mut done = 0;
        while done < data.len() {
            let n = match rustix::io::pwrite(&*fd, &data[done..], offset + done as u64) {
                Ok(n) => n,
                // A short write, as write(2) reports it: the next one gets the error (ENOSPC).
                Err(_) if done > 0 => break,
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                break;
            }
            done += n;
        }
        Ok(done)
    }

    /// Remove setuid and setgid from the upper file open as `fd`, as a write, truncate or
    /// fallocate by `ctx` does on kernel overlayfs (`privs_to_kill`), and drop the kernel's
    /// cached mode of node `id` when they go. The daemon writes as root, so the upper
    /// filesystem never does it for the caller. A root caller (CAP_FSETID) and a file
    /// without the bits cost no /proc read.
    fn remove_privs(&self, ctx: &Ctx, id: u64, fd: &OwnedFd) -> Result<()> {
        if ctx.uid == 0 {
            return Ok(());
        }
        let st = rustix::fs::fstat(fd)?;
        let kill = privs_to_kill(ctx, st.st_mode, self.opts.ids.gid_from_disk(st.st_gid));
        if kill != 0 {
            rustix::fs::fchmod(fd, rustix::fs::Mode::from_raw_mode(st.st_mode & 0o7777 & !kill))?;
            self.invalidate(id);
        }
        Ok(())
    }

    /// FUSE fsync.
    pub fn fsync(&self, fh: u64, datasync: bool) -> Result<()> {
        let h = self.file(fh)?;
        let Some(up) = &self.upper else {
            return Ok(());
        };
        up.check_writable()?;
        // A file still on a lower layer has nothing in the upper to sync (kernel overlayfs
        // does not sync lower files either).
        if !h.on_upper.load(Ordering::Acquire) {
            return Ok(());
        }
        let fd = h.fd.read().clone();
        up.fsync_file(&*fd, datasync)
    }

    /// FUSE fallocate, by `ctx` on node `id`.
    pub fn fallocate(&self, ctx: &Ctx, id: u64, fh: u64, offset: u64, length: u64, mode: i32) -> Result<()> {
        let _changes = self.hold_changes();
        let h = self.file(fh)?;
        if !h.writable {
            return errno(libc::EBADF);
        }
        self.upper()?.check_writable()?;
        let fd = h.fd.read().clone();
        // ovl_fallocate removes privileges with the caller's credentials first.
        self.remove_privs(ctx, id, &fd)?;
        rustix::fs::fallocate(
            &*fd,
            rustix::fs::FallocateFlags::from_bits_retain(mode as u32),
            offset,
            length,
        )?;
        Ok(())
    }

    /// FUSE lseek (SEEK_DATA / SEEK_HOLE).
    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> Result<i64> {
        let h = self.file(fh)?;
        let fd = self.handle_fd(&h)?;
        let pos = match whence {
            libc::SEEK_DATA => rustix::fs::SeekFrom::Data(offset as u64),
            libc::SEEK_HOLE => rustix::fs::SeekFrom::Hole(offset as u64),
            libc::SEEK_SET => rustix::fs::SeekFrom::Start(offset as u64),
            libc::SEEK_END => rustix::fs::SeekFrom::End(offset),
            _ => return errno(libc::EINVAL),
        };
        Ok(rustix::fs::seek(&*fd, pos)? as i64)
    }

    /// FUSE release.
    pub fn release(&self, fh: u64) {
        self.files.write().remove(&fh);
    }

    // ---------------------------------------------------------------- directories

    /// FUSE opendir.
    pub fn opendir(&self, id: u64) -> Result<u64> {
        let node = self.node(id)?;
        if node.kind != Kind::Dir {
            return errno(libc::ENOTDIR);
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.dirs.write().insert(
            fh,
            Arc::new(DirHandle {
                entries: Mutex::new(None),
            }),
        );
        Ok(fh)
    }

    /// FUSE readdir: entries from `offset` on (offset = index + 1 of the previous entry).
    pub fn readdir(&self, id: u64, fh: u64, offset: u64) -> Result<Arc<Vec<dir::DirEntry>>> {
        let node = self.node(id)?;
        let h = self
            .dirs
            .read()
            .get(&fh)
            .cloned()
            .ok_or(Error::Errno(libc::EBADF))?;
        let mut slot = h.entries.lock();
        if offset == 0 || slot.is_none() {
            *slot = Some(Arc::new(self.merged_entries(&node)?));
        }
        Ok(slot.clone().unwrap_or_default())
    }

    /// FUSE readdir without a directory handle, at `cookie` (0, or one made by
    /// [`dir_cookie`] for an entry sent earlier).
    ///
    /// The FUSE adapter answers OPENDIR with ENOSYS, so the kernel sends no OPENDIR or
    /// RELEASEDIR (two requests per directory a walk opens) and caches listings itself
    /// (FOPEN_CACHE_DIR is the kernel's default without opendir). A read from 0 takes a
    /// fresh snapshot of the merged listing; later reads name their snapshot by the
    /// generation in the cookie, so offsets stay stable while the directory changes, as
    /// with a handle. A snapshot is dropped when a read reaches its end (the kernel's last,
    /// empty read), when newer ones push it out ([`LISTINGS_PER_DIR`]) or when the kernel
    /// forgets the directory; a reader whose snapshot is gone continues at its index in a
    /// fresh one.
    pub fn readdir_at(&self, id: u64, cookie: u64) -> Result<DirRead> {
        let node = self.node(id)?;
        if node.kind != Kind::Dir {
            return errno(libc::ENOTDIR);
        }
        let gen = (cookie >> 32) as u32;
        let start = (cookie & u64::from(u32::MAX)) as usize;
        if cookie != 0 {
            let mut all = self.listings.lock();
            if let Some(list) = all.get_mut(&id) {
                if let Some(i) = list.iter().position(|l| l.gen == gen) {
                    let entries = list[i].entries.clone();
                    if start >= entries.len() {
                        list.remove(i);
                        if list.is_empty() {
                            all.remove(&id);
                        }
                    }
                    return Ok(DirRead { entries, start, gen });
                }
            }
        }
        let entries = Arc::new(self.merged_entries(&node)?);
        let gen = loop {
            // Below 2^31 and never 0 (see dir_cookie).
            let g = self.next_listing.fetch_add(1, Ordering::Relaxed) & 0x7fff_ffff;
            if g != 0 {
                break g;
            }
        };
        if start < entries.len() {
            let mut all = self.listings.lock();
            let list = all.entry(id).or_default();
            if list.len() >= LISTINGS_PER_DIR {
                list.remove(0);
            }
            list.push(Listing {
                gen,
                entries: entries.clone(),
            });
        }
        Ok(DirRead { entries, start, gen })
    }

    /// FUSE releasedir.
    pub fn releasedir(&self, fh: u64) {
        self.dirs.write().remove(&fh);
    }

    /// FUSE fsyncdir.
    pub fn fsyncdir(&self, id: u64) -> Result<()> {
        let node = self.node(id)?;
        let Some(up) = &self.upper else {
            return Ok(());
        };
        // The kernel sends no SYNCFS to a FUSE mount and fuser has no hook for it: fsync of
        // the root (`sync MOUNTPOINT`) is the way to sync the whole upper filesystem.
        if id == ROOT_ID {
            return up.syncfs();
        }
        up.check_writable()?;
        if !node.state.read().upper {
            return Ok(());
        }
        let path = self.path_of(&node)?;
        self.upper()?.fsync_dir(&path)
    }

    /// FUSE statfs: the upper's filesystem (or the top lower's for a read-only mount).
    pub fn statfs(&self) -> Result<rustix::fs::StatVfs> {
        let fd = match &self.upper {
            Some(u) => &u.dir.root,
            None => &self.lowers[0].root,
        };
        Ok(rustix::fs::fstatvfs(fd)?)
    }

    // ---------------------------------------------------------------- xattrs

    fn xattr_source(&self, node: &Node) -> Result<(&LayerDir, PathBuf)> {
        let st = node.snapshot();
        if st.upper || (node.id == ROOT_ID && self.upper.is_some()) {
            Ok((&self.upper()?.dir, self.path_of(node)?))
        } else {
            let l = match node.kind {
                Kind::Dir => st.lowers.first().cloned(),
                _ => st.lower,
            }
            .ok_or(Error::Errno(libc::ENOENT))?;
            Ok((&self.lowers[l.layer], l.path))
        }
    }

    /// The xattr name mapping of this mount.
    fn xattr_names(&self) -> XattrNames {
        match &self.upper {
            Some(u) => u.names(),
            None => XattrNames {
                own: if rustix::process::geteuid().is_root() {
                    "trusted.overlay."
                } else {
                    "user.overlay."
                },
            },
        }
    }

    /// FUSE getxattr.
    pub fn getxattr(&self, id: u64, name: &OsStr) -> Result<Vec<u8>> {
        let node = self.node(id)?;
        let killpriv = name == KILLPRIV_XATTR;
        if killpriv && node.no_caps_known() && !node.state.read().unlinked {
            return errno(libc::ENODATA);
        }
        let epoch = node.caps_epoch();
        let disk = self
            .xattr_names()
            .to_disk(name)
            .ok_or(Error::Errno(libc::ENODATA))?;
        let v = if node.state.read().unlinked {
            self.unlinked_xattr(&node, &disk)?
        } else {
            let (layer, path) = self.xattr_source(&node)?;
            layer.get_xattr(&path, &disk)?
        };
        if killpriv && v.is_none() {
            node.note_no_caps(epoch);
        }
        v.ok_or(Error::Errno(libc::ENODATA))
    }

    /// An xattr of an unlinked object, read through an fd still open on it (fgetxattr on
    /// a removed file answers from the file, as on kernel overlayfs).
    fn unlinked_xattr(&self, node: &Node, disk: &OsStr) -> Result<Option<Vec<u8>>> {
        let fd = self.unlinked_fd(node, None, false)?;
        let mut buf = vec![0u8; XATTR_SIZE_MAX];
        match rustix::fs::fgetxattr(&*fd, disk, &mut buf) {
            Ok(n) => {
                buf.truncate(n);
                Ok(Some(buf))
            }
            Err(rustix::io::Errno::NODATA) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The xattr names of an unlinked object, through an fd still open on it.
    fn unlinked_xattr_names(&self, node: &Node) -> Result<Vec<OsString>> {
        let fd = self.unlinked_fd(node, None, false)?;
        let mut buf = vec![0u8; XATTR_LIST_MAX];
        let n = rustix::fs::flistxattr(&*fd, &mut buf)?;
        Ok(buf[..n.min(buf.len())]
            .split(|b| *b == 0)
            .filter(|n| !n.is_empty())
            .map(|n| OsStr::from_bytes(n).to_os_string())
            .collect())
    }

    /// FUSE listxattr: the names, each followed by a NUL.
    pub fn listxattr(&self, id: u64) -> Result<Vec<u8>> {
        let node = self.node(id)?;
        let all = if node.state.read().unlinked {
            self.unlinked_xattr_names(&node)?
        } else {
            let (layer, path) = self.xattr_source(&node)?;
            layer.list_xattr(&path)?
        };
        let names = self.xattr_names();
        let mut out = Vec::new();
        for n in all {
            if let Some(shown) = names.from_disk(&n) {
                out.extend_from_slice(shown.as_bytes());
                out.push(0);
            }
        }
        Ok(out)
    }

    /// FUSE setxattr.
    pub fn setxattr(&self, ctx: &Ctx, id: u64, name: &OsStr, value: &[u8], flags: i32) -> Result<()> {
        let _changes = self.hold_changes();
        let disk = self
            .xattr_names()
            .to_disk(name)
            .ok_or(Error::Errno(libc::EPERM))?;
        let node = self.node(id)?;
        self.copy_up(&node)?;
        let path = self.path_of(&node)?;
        let up = self.upper()?;
        let is_acl = name.as_bytes().starts_with(POSIX_ACL_PREFIX.as_bytes());
        if name == POSIX_ACL_ACCESS {
            // Setting an access ACL is a chmod: the upper filesystem updates the mode bits,
            // but it runs as the daemon and so never clears setgid for the caller. As
            // ovl_set_or_remove_acl does, clear it first when the caller is neither in the
            // file's group nor has CAP_FSETID.
            if let Some(st) = up.dir.stat(&path)? {
                let gid = self.opts.ids.gid_from_disk(st.st_gid);
                if st.st_mode & libc::S_ISGID != 0 && !in_group_or_capable(ctx, gid) {
                    up.chmod(&path, st.st_mode & 0o7777 & !libc::S_ISGID)?;
                }
            }
        }
        let r = up.set_xattr(&path, &disk, value, XattrFlags::from_bits_retain(flags as u32));
        node.forget_no_caps();
        if is_acl {
            // The mode changed with the ACL, behind the kernel's attribute cache.
            self.invalidate(node.id);
        }
        r
    }

    /// FUSE removexattr.
    pub fn removexattr(&self, id: u64, name: &OsStr) -> Result<()> {
        let _changes = self.hold_changes();
        let disk = self
            .xattr_names()
            .to_disk(name)
            .ok_or(Error::Errno(libc::ENODATA))?;
        let node = self.node(id)?;
        // Removing an xattr the object does not have must not copy it up. An ACL is the
        // exception once the object is upper: kernel overlayfs asks the upper filesystem to
        // set "no ACL", which succeeds whether there was one or not (ovl_set_or_remove_acl
        // checks only a lower object's ACL).
        let is_acl = name.as_bytes().starts_with(POSIX_ACL_PREFIX.as_bytes());
        let (layer, path) = self.xattr_source(&node)?;
        if !(is_acl && node.state.read().upper) && layer.get_xattr(&path, &disk)?.is_none() {
            return errno(libc::ENODATA);
        }
        self.copy_up(&node)?;
        let path = self.path_of(&node)?;
        let r = self.upper()?.remove_xattr(&path, &disk);
        node.forget_no_caps();
        r
    }

    /// st_ino of a known child, for readdir's d_ino.
    fn known_child_ino(&self, node: &Node, name: &OsStr) -> Option<u64> {
        let id = *node.children.lock().get(name)?;
        self.nodes.get(id).map(|n| n.ino())
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
