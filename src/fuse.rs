//! The FUSE adapter: decode a request, call the union, send the reply.
//!
//! No overlay decisions are made here. Errors become errnos through [`Error::errno`] in
//! [`fail`], the one place that happens.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use parking_lot::Mutex;
use rustix::fs::Timespec;
use tracing::{debug, error, info, trace, warn};

use crate::error::Error;
use crate::layer::Kind;
use crate::union::{Attr, Ctx, SetAttr, Union};

/// Largest write the kernel may send in one request (fuser's buffer holds 16 MiB).
pub const MAX_WRITE: u32 = 1 << 20;

/// Stacking depth of the backing files passthrough accepts: 1 lets the upper be on any
/// plain filesystem, and keeps verlay itself usable as a layer of kernel overlayfs (the
/// kernel gives the FUSE mount this depth, and allows 2 in all).
const PASSTHROUGH_STACK_DEPTH: u32 = 1;

/// The requests the adapter counts, one counter each: every handler below, plus the two
/// GETXATTRs the kernel makes on its own (`security.capability` before writes,
/// `system.posix_acl_*` for permission checks) apart from the others. Counting round trips
/// is how a workload's cost is measured on a loaded machine, where wall-clock times are not.
macro_rules! request_ops {
    ($($op:ident),* $(,)?) => {
        #[allow(non_camel_case_types)]
        #[derive(Clone, Copy, Debug)]
        enum Op { $($op),* }
        const OP_NAMES: &[&str] = &[$(stringify!($op)),*];
    };
}
request_ops!(
    init,
    lookup,
    forget,
    batch_forget,
    getattr,
    setattr,
    readlink,
    mknod,
    mkdir,
    unlink,
    rmdir,
    symlink,
    rename,
    link,
    open,
    read,
    write,
    flush,
    release,
    fsync,
    opendir,
    readdir,
    readdirplus,
    releasedir,
    fsyncdir,
    statfs,
    setxattr,
    getxattr,
    getxattr_capability,
    getxattr_acl,
    listxattr,
    removexattr,
    access,
    create,
    fallocate,
    lseek,
    destroy,
);

/// Requests served since the daemon started, per [`Op`]: one daemon serves one mount, so
/// the counters are process-wide (the control socket reads them without the session).
static REQUESTS: [AtomicU64; OP_NAMES.len()] = [const { AtomicU64::new(0) }; OP_NAMES.len()];

/// Count one request (a relaxed add: no ordering with anything else is needed).
fn count(op: Op) {
    REQUESTS[op as usize].fetch_add(1, Ordering::Relaxed);
}

/// The requests served so far, per operation (operations never asked are left out).
pub fn request_counts() -> std::collections::BTreeMap<String, u64> {
    OP_NAMES
        .iter()
        .zip(REQUESTS.iter())
        .map(|(name, n)| (name.to_string(), n.load(Ordering::Relaxed)))
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// The FUSE filesystem: a union plus the cache lifetimes we promise the kernel.
#[derive(Debug)]
pub struct VerlayFs {
    union: Arc<Union>,
    ttl: Duration,
    backings: Backings,
    /// the kernel's writeback cache is on (negotiated at INIT, `writeback=1`)
    writeback: bool,
}

/// Passthrough backing files. The kernel wants one backing file per inode for as long as
/// any passthrough file of the inode is open, so open handles share it; it is closed
/// (FUSE_DEV_IOC_BACKING_CLOSE, on drop) when the inode's last passthrough handle is
/// released. Open files keep their own reference in the kernel.
#[derive(Debug, Default)]
struct Backings {
    /// node id -> the backing file its open handles share
    by_node: Mutex<HashMap<u64, Weak<BackingId>>>,
    /// file handle -> its reference
    by_handle: Mutex<HashMap<u64, Arc<BackingId>>>,
}

impl VerlayFs {
    /// Serve `union`, letting the kernel cache entries and attributes for `ttl`.
    pub fn new(union: Arc<Union>, ttl: Duration) -> VerlayFs {
        VerlayFs {
            union,
            ttl,
            backings: Backings::default(),
            writeback: false,
        }
    }

    /// The backing file for passthrough handle `fh` of node `ino`: the node's shared one,
    /// or a new one from the handle's fd. None for a handle the daemon serves, or when
    /// the kernel refuses (then the handle and the mount fall back to the daemon).
    fn backing(
        &self,
        ino: u64,
        fh: u64,
        open: impl FnOnce(&std::os::fd::OwnedFd) -> std::io::Result<BackingId>,
    ) -> Option<Arc<BackingId>> {
        let fd = self.union.passthrough_fd(fh)?;
        let mut by_node = self.backings.by_node.lock();
        let b = match by_node.get(&ino).and_then(Weak::upgrade) {
            Some(b) => b,
            None => match open(&fd) {
                Ok(b) => {
                    let b = Arc::new(b);
                    by_node.insert(ino, Arc::downgrade(&b));
                    b
                }
                Err(e) => {
                    warn!(ino, error = %e, "kernel refused a passthrough backing file; serving reads and writes in the daemon");
                    self.union.passthrough_refused(fh);
                    return None;
                }
            },
        };
        self.backings.by_handle.lock().insert(fh, b.clone());
        Some(b)
    }

    /// A directory read at `offset`: the listing, the index to start at and the generation
    /// for the entries' offsets. Handle 0 is a read without OPENDIR (the kernel's mode after
    /// our ENOSYS); a real handle keeps its own snapshot (generation 0: offset = index + 1).
    fn dir_read(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
    ) -> Result<(Arc<Vec<crate::union::dir::DirEntry>>, usize, u32), Error> {
        if fh == 0 {
            let r = self.union.readdir_at(ino, offset)?;
            Ok((r.entries, r.start, r.gen))
        } else {
            let entries = self.union.readdir(ino, fh, offset)?;
            Ok((entries, offset as usize, 0))
        }
    }

    /// The open flags to open the upper with. With the writeback cache the kernel does
    /// O_APPEND itself (it writes dirty pages back at their own offsets, and pwrite on an
    /// O_APPEND fd would append them all at the end instead).
    fn open_flags(&self, flags: i32) -> i32 {
        if self.writeback {
            flags & !libc::O_APPEND
        } else {
            flags
        }
    }

    fn release_backing(&self, ino: u64, fh: u64) {
        let Some(b) = self.backings.by_handle.lock().remove(&fh) else {
            return;
        };
        let mut by_node = self.backings.by_node.lock();
        if Arc::strong_count(&b) == 1 {
            by_node.remove(&ino);
        }
        // The last reference closes the backing id (under the lock, so an open of the same
        // node never finds a closed one).
        drop(b);
    }
}

fn ctx(req: &Request) -> Ctx {
    Ctx {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
        umask: 0,
    }
}

/// The caller of a request that makes an object, with the umask the kernel left to us.
fn ctx_umask(req: &Request, umask: u32) -> Ctx {
    Ctx { umask, ..ctx(req) }
}

/// The single place an [`Error`] becomes an errno for the kernel.
fn fail(op: &'static str, ino: u64, e: &Error) -> Errno {
    if e.is_integrity() {
        // Already logged once per (layer, path) by the verifier; every request still fails.
        debug!(op, ino, error = %e, "request failed: lower layer damaged");
    } else if e.is_internal() {
        error!(op, ino, error = %e, "request failed");
    } else {
        trace!(op, ino, error = %e, "request failed");
    }
    Errno::from_i32(e.errno())
}

/// Run one union call; with debug logging on, log the request after it: op, node, entry
/// name, result and microseconds, one line (`-d` promises every request). Without debug the
/// call runs bare: one cached level check, nothing formatted, no clock read. (`;` before the
/// call keeps rustfmt from spreading the handlers' one-line uses over five lines.)
macro_rules! traced {
    ($op:literal, $ino:expr, $name:expr; $call:expr) => {
        traced!(@ $op, $ino, Some($name), $call)
    };
    ($op:literal, $ino:expr; do $call:expr) => {
        traced!(@ $op, $ino, None, {
            $call;
            Ok::<(), Error>(())
        })
    };
    ($op:literal, $ino:expr; $call:expr) => {
        traced!(@ $op, $ino, None, $call)
    };
    (@ $op:literal, $ino:expr, $name:expr, $call:expr) => {
        if tracing::enabled!(tracing::Level::DEBUG) {
            let t0 = std::time::Instant::now();
            let r = $call;
            log_request($op, $ino, $name, &r, t0);
            r
        } else {
            $call
        }
    };
}

/// The debug line of [`traced!`]: `path` is the entry name for the calls that take one.
fn log_request<T>(
    op: &'static str,
    ino: u64,
    name: Option<&OsStr>,
    r: &Result<T, Error>,
    t0: std::time::Instant,
) {
    let us = t0.elapsed().as_micros() as u64;
    let path = name.unwrap_or_default().to_string_lossy();
    match r {
        Ok(_) => debug!(op, ino, path = %path, result = "ok", us, "request"),
        Err(e) => debug!(op, ino, path = %path, result = errno_name(e.errno()), us, "request"),
    }
}

/// The symbolic name of the errnos a filesystem returns, for the request log.
fn errno_name(n: i32) -> &'static str {
    match n {
        libc::ENOENT => "ENOENT",
        libc::EEXIST => "EEXIST",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EACCES => "EACCES",
        libc::EPERM => "EPERM",
        libc::EIO => "EIO",
        libc::EINVAL => "EINVAL",
        libc::EXDEV => "EXDEV",
        libc::ENOSPC => "ENOSPC",
        libc::ENODATA => "ENODATA",
        libc::ERANGE => "ERANGE",
        libc::ENOSYS => "ENOSYS",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::EROFS => "EROFS",
        libc::EBADF => "EBADF",
        libc::ELOOP => "ELOOP",
        libc::EMLINK => "EMLINK",
        libc::EBUSY => "EBUSY",
        _ => "errno",
    }
}

fn systime(t: Timespec) -> SystemTime {
    if t.tv_sec >= 0 {
        UNIX_EPOCH + Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
    } else {
        UNIX_EPOCH - Duration::new((-t.tv_sec) as u64, 0) + Duration::new(0, t.tv_nsec as u32)
    }
}

fn timespec(t: SystemTime) -> Timespec {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timespec {
            tv_sec: d.as_secs() as i64,
            tv_nsec: d.subsec_nanos() as _,
        },
        Err(e) => {
            let d = e.duration();
            let mut sec = -(d.as_secs() as i64);
            let mut nsec = d.subsec_nanos() as i64;
            if nsec > 0 {
                sec -= 1;
                nsec = 1_000_000_000 - nsec;
            }
            Timespec {
                tv_sec: sec,
                tv_nsec: nsec as _,
            }
        }
    }
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Char => FileType::CharDevice,
        Kind::Block => FileType::BlockDevice,
        Kind::Socket => FileType::Socket,
    }
}

fn fuse_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: systime(a.atime),
        mtime: systime(a.mtime),
        ctime: systime(a.ctime),
        crtime: systime(a.ctime),
        kind: file_type(a.kind),
        perm: a.perm as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev as u32,
        blksize: a.blksize,
        flags: 0,
    }
}

/// The kernel addresses inodes by node id and shows `attr.ino` as st_ino; the two differ
/// (lower hard links share an st_ino but are separate overlay inodes, as in the kernel).
fn reply_entry(reply: ReplyEntry, ttl: &Duration, id: u64, attr: &Attr) {
    reply.entry_with_nodeid(ttl, INodeNo(id), &fuse_attr(attr), Generation(0))
}

impl Filesystem for VerlayFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        count(Op::init);
        let wanted = InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_ATOMIC_O_TRUNC
            | InitFlags::FUSE_BIG_WRITES
            | InitFlags::FUSE_ASYNC_READ
            | InitFlags::FUSE_MAX_PAGES
            | InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            // The kernel checks POSIX ACLs (default_permissions alone sees only the mode
            // bits) and sends the umask unapplied: a parent's default ACL replaces it.
            | InitFlags::FUSE_POSIX_ACL
            | InitFlags::FUSE_DONT_MASK
            // file handles stay valid after the kernel drops the inode: it asks us with
            // LOOKUP(id, ".") (see Union::lookup_export)
            | InitFlags::FUSE_EXPORT_SUPPORT
            // The daemon clears setuid/setgid itself (it does anyway: it writes as root, see
            // Union::write), told by the kernel which requests come from callers without
            // CAP_FSETID. The kernel then marks the mount SB_NOSEC and stops asking GETXATTR
            // security.capability before every write once it knows a file has none.
            | InitFlags::FUSE_HANDLE_KILLPRIV_V2;
        let available = config.capabilities() & wanted;
        if let Err(missing) = config.add_capabilities(available) {
            debug!(?missing, "kernel lacks some FUSE capabilities");
        }
        let _ = config.set_max_write(MAX_WRITE);
        let _ = config.set_max_readahead(MAX_WRITE);
        // Passthrough excludes the writeback cache: with both asked, passthrough wins.
        let passthrough = self.union.passthrough_offered()
            && config.capabilities().contains(InitFlags::FUSE_PASSTHROUGH)
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(PASSTHROUGH_STACK_DEPTH).is_ok();
        if passthrough {
            info!("FUSE passthrough on for open upper files");
        } else {
            self.union.disable_passthrough();
        }
        self.writeback = !passthrough
            && self.union.writeback_wanted()
            && config.add_capabilities(InitFlags::FUSE_WRITEBACK_CACHE).is_ok();
        if self.writeback {
            info!("FUSE writeback cache on: the kernel holds written pages until writeback, fsync or close");
        } else if self.union.writeback_wanted() {
            warn!(
                passthrough,
                "writeback=1 asked for, but the writeback cache is off"
            );
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        count(Op::lookup);
        // "." and "..": the kernel decoding a file handle (FUSE_EXPORT_SUPPORT)
        let found = if name == "." || name == ".." {
            traced!("lookup", parent.0, name; self.union.lookup_export(parent.0, name))
        } else {
            traced!("lookup", parent.0, name; self.union.lookup(parent.0, name))
        };
        match found {
            Ok(e) => reply_entry(reply, &self.ttl, e.id, &e.attr),
            // A name that is not there: a negative entry (node id 0) the kernel keeps for the
            // entry timeout, so asking again (PATH and include-path searches, probes for
            // optional files) costs no request. Safe for the reason positive entries are
            // cached: every change of a name goes through this daemon, and the kernel updates
            // its dentries for the changes it asked for.
            Err(e) if e.errno() == libc::ENOENT && name != "." && name != ".." => {
                let a = placeholder_attr(Kind::File);
                reply.entry_with_nodeid(&self.ttl, INodeNo(0), &a, Generation(0))
            }
            Err(e) => reply.error(fail("lookup", parent.0, &e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        count(Op::forget);
        let _ = traced!("forget", ino.0; do self.union.forget(ino.0, nlookup));
    }

    fn batch_forget(&self, _req: &Request, nodes: &[fuser::ForgetOne]) {
        count(Op::batch_forget);
        self.union
            .forget_many(nodes.iter().map(|n| (n.nodeid().0, n.nlookup())));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        count(Op::getattr);
        match traced!("getattr", ino.0; self.union.getattr(ino.0, fh.map(|f| f.0))) {
            Ok(a) => reply.attr(&self.ttl, &fuse_attr(&a)),
            Err(e) => reply.error(fail("getattr", ino.0, &e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        kill_suid_gid: bool,
        reply: ReplyAttr,
    ) {
        count(Op::setattr);
        let t = |x: Option<TimeOrNow>| {
            x.map(|t| match t {
                TimeOrNow::Now => None,
                TimeOrNow::SpecificTime(s) => Some(timespec(s)),
            })
        };
        let sa = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: t(atime),
            mtime: t(mtime),
            kill_suid_gid,
        };
        match traced!("setattr", ino.0; self.union.setattr(&ctx(req), ino.0, fh.map(|f| f.0), sa)) {
            Ok(a) => reply.attr(&self.ttl, &fuse_attr(&a)),
            Err(e) => reply.error(fail("setattr", ino.0, &e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        count(Op::readlink);
        match traced!("readlink", ino.0; self.union.readlink(ino.0)) {
            Ok(t) => reply.data(t.as_encoded_bytes()),
            Err(e) => reply.error(fail("readlink", ino.0, &e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        count(Op::mknod);
        match traced!("mknod", parent.0, name; self.union.mknod(&ctx_umask(req, umask), parent.0, name, mode, rdev as u64))
        {
            Ok(e) => reply_entry(reply, &self.ttl, e.id, &e.attr),
            Err(e) => reply.error(fail("mknod", parent.0, &e)),
        }
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        count(Op::mkdir);
        match traced!("mkdir", parent.0, name; self.union.mkdir(&ctx_umask(req, umask), parent.0, name, mode))
        {
            Ok(e) => reply_entry(reply, &self.ttl, e.id, &e.attr),
            Err(e) => reply.error(fail("mkdir", parent.0, &e)),
        }
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        count(Op::unlink);
        match traced!("unlink", parent.0, name; self.union.unlink(&ctx(req), parent.0, name)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail("unlink", parent.0, &e)),
        }
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        count(Op::rmdir);
        match traced!("rmdir", parent.0, name; self.union.rmdir(&ctx(req), parent.0, name)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail("rmdir", parent.0, &e)),
        }
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        count(Op::symlink);
        match traced!("symlink", parent.0, link_name; self
            .union
            .symlink(&ctx(req), parent.0, link_name, target.as_os_str()))
        {
            Ok(e) => reply_entry(reply, &self.ttl, e.id, &e.attr),
            Err(e) => reply.error(fail("symlink", parent.0, &e)),
        }
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        count(Op::rename);
        match traced!("rename", parent.0, name; self
            .union
            .rename(&ctx(req), parent.0, name, newparent.0, newname, flags.bits()))
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail("rename", parent.0, &e)),
        }
    }

    fn link(&self, req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        count(Op::link);
        match traced!("link", ino.0, newname; self.union.link(&ctx(req), ino.0, newparent.0, newname)) {
            Ok(e) => reply_entry(reply, &self.ttl, e.id, &e.attr),
            Err(e) => reply.error(fail("link", ino.0, &e)),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, _kill_suid_gid: bool, reply: ReplyOpen) {
        // _kill_suid_gid: an O_TRUNC open by a caller without CAP_FSETID, which Union::open
        // handles from the caller's credentials already.
        count(Op::open);
        match traced!("open", ino.0; self.union.open(&ctx(req), ino.0, self.open_flags(flags.0))) {
            Ok(fh) => {
                if let Some(b) = self.backing(ino.0, fh, |fd| reply.open_backing(fd)) {
                    return reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &b);
                }
                let flags = if self.union.keep_cache(fh) {
                    FopenFlags::FOPEN_KEEP_CACHE
                } else {
                    FopenFlags::empty()
                };
                reply.opened(FileHandle(fh), flags)
            }
            Err(e) => reply.error(fail("open", ino.0, &e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        count(Op::read);
        match traced!("read", ino.0; self.union.read(fh.0, offset, size)) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(fail("read", ino.0, &e)),
        }
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        count(Op::write);
        // A write-back of cached pages carries no caller (the kernel sends them without
        // credentials): setuid/setgid were dealt with when write(2) filled the cache (with
        // FUSE_HANDLE_KILLPRIV_V2 the kernel writes a file that has them through, uncached,
        // with the caller's credentials and FUSE_WRITE_KILL_SUIDGID), so nothing is
        // removed for it here.
        let who = if write_flags.contains(WriteFlags::FUSE_WRITE_CACHE) {
            Ctx {
                uid: 0,
                gid: 0,
                ..ctx(req)
            }
        } else {
            ctx(req)
        };
        match traced!("write", ino.0; self.union.write(&who, ino.0, fh.0, offset, data)) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(fail("write", ino.0, &e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        count(Op::flush);
        // Nothing to do at close (no POSIX locks in the daemon), and ENOSYS makes the kernel
        // stop sending FLUSH: one request less per close(2). With the writeback cache the
        // kernel writes the file's dirty pages back, waits for them and reports a failed
        // write-back to close(2) before it would send FLUSH (fuse_flush), so that needs no
        // request either.
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        count(Op::release);
        let _ = traced!("release", ino.0; do self.union.release(fh.0));
        self.release_backing(ino.0, fh.0);
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        count(Op::fsync);
        match traced!("fsync", ino.0; self.union.fsync(fh.0, datasync)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail("fsync", ino.0, &e)),
        }
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        count(Op::opendir);
        // ENOSYS: the kernel stops sending OPENDIR and RELEASEDIR (two requests for every
        // directory a walk opens), reads directories with file handle 0 (served by
        // Union::readdir_at) and caches listings (FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE are its
        // defaults then). The cache is right: every change to a directory's entries goes
        // through this daemon, and the kernel drops the cache itself when it changes the
        // directory (fuse_dir_changed). The kernel checks that the node is a directory.
        reply.error(Errno::ENOSYS);
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        count(Op::readdir);
        match traced!("readdir", ino.0; self.dir_read(ino.0, fh.0, offset)) {
            Ok((entries, start, gen)) => {
                for (i, e) in entries.iter().enumerate().skip(start) {
                    let next = crate::union::dir_cookie(gen, i + 1);
                    if reply.add(INodeNo(e.ino.max(1)), next, file_type(e.kind), &e.name) {
                        break;
                    }
                }
                reply.ok()
            }
            Err(e) => reply.error(fail("readdir", ino.0, &e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        count(Op::readdirplus);
        // Entries come with their attributes, so `ls -l` and `find` need no LOOKUP each. Every
        // entry the kernel links takes a lookup reference; "." and ".." (node id 0) and
        // entries that do not fit take none.
        let (entries, start, gen) = match traced!("readdirplus", ino.0; self.dir_read(ino.0, fh.0, offset)) {
            Ok(r) => r,
            Err(e) => return reply.error(fail("readdirplus", ino.0, &e)),
        };
        for (i, e) in entries.iter().enumerate().skip(start) {
            let next = crate::union::dir_cookie(gen, i + 1);
            let dot = e.name == "." || e.name == "..";
            let looked_up = if dot {
                None
            } else {
                self.union.lookup_hinted(ino.0, &e.name, Some(e.hint)).ok()
            };
            let full = match &looked_up {
                Some(entry) => reply.add(
                    INodeNo(entry.id),
                    next,
                    &e.name,
                    &self.ttl,
                    &fuse_attr(&entry.attr),
                    Generation(0),
                ),
                // No node: the kernel looks the name up itself when it is used (a damaged
                // entry then fails there with EIO).
                None => {
                    let mut a = placeholder_attr(e.kind);
                    a.ino = INodeNo(e.ino.max(1));
                    reply.add(INodeNo(0), next, &e.name, &Duration::ZERO, &a, Generation(0))
                }
            };
            if full {
                if let Some(entry) = looked_up {
                    self.union.forget(entry.id, 1);
                }
                break;
            }
        }
        reply.ok()
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        count(Op::releasedir);
        self.union.releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        count(Op::fsyncdir);
        match traced!("fsyncdir", ino.0; self.union.fsyncdir(ino.0)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail("fsyncdir", ino.0, &e)),
        }
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        count(Op::statfs);
        match traced!("statfs", ino.0; self.union.statfs()) {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                255,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(fail("statfs", ino.0, &e)),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        count(Op::setxattr);
        match traced!("setxattr", ino.0, name; self.union.setxattr(&ctx(req), ino.0, name, value, flags)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail("setxattr", ino.0, &e)),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        count(getxattr_op(name));
        match traced!("getxattr", ino.0, name; self.union.getxattr(ino.0, name)) {
            Ok(v) => reply_xattr(reply, &v, size),
            Err(e) => reply.error(fail("getxattr", ino.0, &e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        count(Op::listxattr);
        match traced!("listxattr", ino.0; self.union.listxattr(ino.0)) {
            Ok(v) => reply_xattr(reply, &v, size),
            Err(e) => reply.error(fail("listxattr", ino.0, &e)),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        count(Op::removexattr);
        match traced!("removexattr", ino.0, name; self.union.removexattr(ino.0, name)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail("removexattr", ino.0, &e)),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        count(Op::access);
        // With default_permissions the kernel has already checked the mode bits.
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        _kill_suid_gid: bool,
        reply: ReplyCreate,
    ) {
        count(Op::create);
        let flags = self.open_flags(flags);
        match traced!("create", parent.0, name; self.union.create(&ctx_umask(req, umask), parent.0, name, mode, flags))
        {
            Ok((e, fh)) => match self.backing(e.id, fh, |fd| reply.open_backing(fd)) {
                Some(b) => reply.created_with_nodeid_passthrough(
                    &self.ttl,
                    INodeNo(e.id),
                    &fuse_attr(&e.attr),
                    Generation(0),
                    FileHandle(fh),
                    FopenFlags::empty(),
                    &b,
                ),
                None => reply.created_with_nodeid(
                    &self.ttl,
                    INodeNo(e.id),
                    &fuse_attr(&e.attr),
                    Generation(0),
                    FileHandle(fh),
                    FopenFlags::empty(),
                ),
            },
            Err(e) => reply.error(fail("create", parent.0, &e)),
        }
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        count(Op::fallocate);
        match traced!("fallocate", ino.0; self.union.fallocate(&ctx(req), ino.0, fh.0, offset, length, mode))
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail("fallocate", ino.0, &e)),
        }
    }

    fn destroy(&mut self) {
        count(Op::destroy);
        debug!(requests = ?request_counts(), "FUSE requests served");
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        count(Op::lseek);
        match traced!("lseek", ino.0; self.union.lseek(fh.0, offset, whence)) {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(fail("lseek", ino.0, &e)),
        }
    }
}

/// The counter of a GETXATTR: the two names the kernel asks on its own have their own.
fn getxattr_op(name: &OsStr) -> Op {
    if name == crate::union::KILLPRIV_XATTR {
        Op::getxattr_capability
    } else if name.as_encoded_bytes().starts_with(b"system.posix_acl_") {
        Op::getxattr_acl
    } else {
        Op::getxattr
    }
}

/// Attributes for a readdirplus entry sent without a node (the kernel ignores them).
fn placeholder_attr(kind: Kind) -> FileAttr {
    FileAttr {
        ino: INodeNo(1),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: file_type(kind),
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 0,
        flags: 0,
    }
}

fn reply_xattr(reply: ReplyXattr, v: &[u8], size: u32) {
    if size == 0 {
        reply.size(v.len() as u32);
    } else if v.len() > size as usize {
        reply.error(fail("xattr", 0, &Error::Errno(libc::ERANGE)));
    } else {
        reply.data(v);
    }
}
