//! The only writer of the upper and work directories.
//!
//! Every change verlay makes on disk is one of the named sequences below. Each sequence
//! builds new objects in `workdir/work` (never visible in the merged view) and publishes
//! them into the upper with a single rename, so a crash leaves either the old or the new
//! object at a name, never a half-made one. Step names (`copy_up.fsync`, ...) are the ones
//! used in logs and in docs/ordering.md.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use rustix::fs::{FileType, Mode, OFlags, RenameFlags, SeekFrom, Stat, Timespec, Timestamps, XattrFlags};
use tracing::{debug, error, info, warn};

use crate::error::{Error, Result};
use crate::failpoint::crash_point;
use crate::layer::{get_xattr_path, list_xattr_path, Kind, LayerDir};

pub mod file;
pub mod gate;
pub mod real;
mod rename;
pub mod sim;
pub mod store;

pub use file::UpperFile;
pub use gate::{Change, Frozen};
pub use rename::{DirMark, Move};

use store::{Base, StoreFile, UpperStore};

/// Name of the kernel's scratch directory inside workdir; our temps live there too, so a
/// workdir stays usable by kernel overlayfs.
pub const WORK_SUBDIR: &str = "work";

/// Kernel overlayfs's directory of incompatible features inside `workdir/work`
/// (OVL_INCOMPATDIR_NAME): a kernel refuses to mount a workdir that has entries in it.
pub const INCOMPAT_SUBDIR: &str = "incompat";

/// The marker of a volatile mount, `workdir/work/incompat/volatile`
/// (OVL_VOLATILE_DIRTY_NAME): while it exists, the upper may hold writes that never
/// reached the disk, so a mount that finds it refuses (unless `volatile_recover`).
pub const VOLATILE_MARKER: &str = "volatile";

/// Owner of a new object, as stored on disk.
#[derive(Clone, Copy, Debug)]
pub struct Owner {
    /// uid on disk
    pub uid: u32,
    /// gid on disk
    pub gid: u32,
}

/// What is at a name in the upper before a new object is published there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Occupant {
    /// nothing: publish with RENAME_NOREPLACE
    Nothing,
    /// a whiteout or other non-directory: replaced atomically by rename
    NonDir,
    /// a directory (only whiteouts left in it): swapped out with RENAME_EXCHANGE, then removed
    Dir,
}

/// The upper layer and its work directory.
#[derive(Debug)]
pub struct Upper {
    /// upperdir, for reads as well
    pub dir: LayerDir,
    /// every write to upperdir and workdir goes through this
    store: Box<dyn UpperStore>,
    work_path: PathBuf,
    /// `trusted.overlay.` or, where trusted.* cannot be written, `user.overlay.`
    pub xattr_prefix: &'static str,
    /// where we record the st_ino a copied-up object had (hidden from users)
    pub origin_xattr: &'static str,
    /// Sync the upper at all: copy-up fsync, and fsync/fdatasync/fsyncdir/syncfs from
    /// applications. Off with `volatile`/`fsync=0`: those then succeed without syncing.
    pub fsync: bool,
    counter: AtomicU64,
    /// Set by the first failed fsync/syncfs of the upper; never cleared (see
    /// [`Upper::check_writable`]).
    poisoned: AtomicBool,
    /// The commit gate (see [`gate`]).
    gate: gate::Gate,
    /// The work dir's shared whiteout (see [`Change::whiteout`]), made on first use.
    shared_whiteout: parking_lot::Mutex<Option<Arc<PathBuf>>>,
    /// The upper filesystem refused a hard link to a whiteout: make each one with mknod.
    no_shared_whiteout: AtomicBool,
}

/// Name prefix of the work dir's shared whiteout (`#verlay.whiteout.PID.N`): the one entry a
/// mounted upper keeps in the work dir, as kernel overlayfs keeps its own.
pub const SHARED_WHITEOUT_PREFIX: &str = "#verlay.whiteout.";

fn ts(sec: i64, nsec: i64) -> Timespec {
    Timespec {
        tv_sec: sec,
        tv_nsec: nsec as _,
    }
}

/// atime/mtime of a stat as utimensat arguments.
pub fn stat_times(st: &Stat) -> Timestamps {
    Timestamps {
        last_access: ts(st.st_atime, st.st_atime_nsec as i64),
        last_modification: ts(st.st_mtime, st.st_mtime_nsec as i64),
    }
}

/// Namespaces of xattrs that belong to overlay implementations other than the kernel's own
/// format: never shown to users, never copied up.
const FOREIGN_PRIVATE: [&[u8]; 3] = [b"trusted.verlay.", b"user.verlay.", b"user.fuseoverlayfs."];

/// How an xattr name seen by users maps to the name stored on disk.
///
/// Kernel overlayfs (6.7+) lets users of the merged view set xattrs in its own namespace,
/// e.g. `trusted.overlay.opaque`, and stores them escaped as `trusted.overlay.overlay.opaque`
/// so they never mean anything to the overlay itself (nested overlays). verlay does the same.
#[derive(Clone, Copy, Debug)]
pub struct XattrNames {
    /// the overlay's own namespace: `trusted.overlay.` or `user.overlay.`
    pub own: &'static str,
}

const ESCAPE: &[u8] = b"overlay.";

impl XattrNames {
    /// Disk name for a user's name; None for names users may not touch.
    pub fn to_disk(&self, name: &OsStr) -> Option<OsString> {
        let b = name.as_encoded_bytes();
        if FOREIGN_PRIVATE.iter().any(|p| b.starts_with(p)) {
            return None;
        }
        match b.strip_prefix(self.own.as_bytes()) {
            Some(rest) => {
                let mut v = self.own.as_bytes().to_vec();
                v.extend_from_slice(ESCAPE);
                v.extend_from_slice(rest);
                Some(bytes_to_os(v))
            }
            None => Some(name.to_os_string()),
        }
    }

    /// User-visible name for a disk name; None for the overlay's private xattrs.
    pub fn from_disk(&self, name: &OsStr) -> Option<OsString> {
        let b = name.as_encoded_bytes();
        if FOREIGN_PRIVATE.iter().any(|p| b.starts_with(p)) {
            return None;
        }
        match b.strip_prefix(self.own.as_bytes()) {
            Some(rest) => rest.strip_prefix(ESCAPE).map(|r| {
                let mut v = self.own.as_bytes().to_vec();
                v.extend_from_slice(r);
                bytes_to_os(v)
            }),
            None => Some(name.to_os_string()),
        }
    }

    /// Is this disk xattr one that copy-up must carry (user data, including escaped
    /// overlay xattrs), rather than overlay metadata of the layer it sits in?
    pub fn is_user_data(&self, name: &OsStr) -> bool {
        self.from_disk(name).is_some()
    }
}

fn bytes_to_os(v: Vec<u8>) -> OsString {
    use std::os::unix::ffi::OsStringExt;
    OsString::from_vec(v)
}

impl Upper {
    /// Open the upper at `upper` with its work dir under `workdir`, deciding the xattr
    /// namespace by trying to write a trusted.* xattr in the work dir.
    pub fn open(upper: &Path, workdir: &Path, fsync: bool) -> Result<Upper> {
        let dir = LayerDir::open(upper, 0, "upper".into())?;
        let work_path = workdir.join(WORK_SUBDIR);
        match rustix::fs::mkdir(&work_path, Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(Error::io("mkdir workdir/work", &work_path, e.into())),
        }
        let work = rustix::fs::open(
            &work_path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io("open workdir/work", &work_path, e.into()))?;
        let upper_fd = rustix::io::dup(&dir.root).map_err(|e| Error::io("dup upperdir", upper, e.into()))?;
        let store = real::RealStore::new(upper_fd, work);
        let probe = OsStr::new("trusted.overlay.verlay-probe");
        let trusted = store
            .set_xattr(Base::Work, Path::new(""), probe, b"y", XattrFlags::empty())
            .is_ok();
        if trusted {
            let _ = store.remove_xattr(Base::Work, Path::new(""), probe);
        }
        Ok(Upper::with_store(dir, work_path, Box::new(store), trusted, fsync))
    }

    /// An upper whose writes go through `store` (the real one, or the simulated store of
    /// the crash tests). `dir` serves the union's reads; `work_path` is for messages.
    pub fn with_store(
        dir: LayerDir,
        work_path: PathBuf,
        store: Box<dyn UpperStore>,
        trusted: bool,
        fsync: bool,
    ) -> Upper {
        let (xattr_prefix, origin_xattr) = if trusted {
            ("trusted.overlay.", "trusted.verlay.origin")
        } else {
            ("user.overlay.", "user.verlay.origin")
        };
        Upper {
            dir,
            store,
            work_path,
            xattr_prefix,
            origin_xattr,
            fsync,
            counter: AtomicU64::new(0),
            poisoned: AtomicBool::new(false),
            gate: gate::Gate::default(),
            shared_whiteout: parking_lot::Mutex::new(None),
            no_shared_whiteout: AtomicBool::new(false),
        }
    }

    /// Check that the upper filesystem can hold an overlay: xattrs of our namespace and
    /// d_type (kernel overlayfs refuses an upper without d_type for the same reason:
    /// whiteouts are found by type while listing).
    pub fn check_features(&self) -> Result<()> {
        let name = format!("{}verlay-probe", self.xattr_prefix);
        let root = Path::new("");
        self.store
            .set_xattr(Base::Work, root, OsStr::new(&name), b"y", XattrFlags::empty())
            .map_err(|e| {
                Error::usage(
                format!("upperdir \"{}\"", self.dir.path.display()),
                format!(
                    "its filesystem does not support {}* xattrs ({e})",
                    self.xattr_prefix
                ),
                "put upperdir and workdir on a filesystem with xattr support, e.g. ext4, xfs, btrfs or tmpfs",
            )
            })?;
        let _ = self.store.remove_xattr(Base::Work, root, OsStr::new(&name));
        let probe = self.tmp_name();
        self.store.mkdir(Base::Work, &probe, 0o700)?;
        let listed = self
            .store
            .read_dir(Base::Work, root)
            .map_err(|e| Error::io("readdir", &self.work_path, e.into()))?
            .into_iter()
            .find(|(n, _)| n == probe.as_os_str())
            .map(|(_, k)| k);
        let _ = self.store.rmdir(Base::Work, &probe);
        match listed {
            Some(Some(Kind::Dir)) => Ok(()),
            _ => Err(Error::usage(
                format!("upperdir \"{}\"", self.dir.path.display()),
                "its filesystem does not report file types in directory listings (d_type)",
                "use a filesystem with d_type support (for xfs: mkfs.xfs -n ftype=1)",
            )),
        }
    }

    /// Remove leftovers of an earlier run from the work dir; they are never part of the
    /// merged view, so removing them loses nothing that was published.
    pub fn clean_work(&self) -> Result<usize> {
        let mut n = 0;
        let rd = self
            .store
            .read_dir(Base::Work, Path::new(""))
            .map_err(|e| Error::io("readdir", &self.work_path, e.into()))?;
        for (name, _) in rd {
            self.remove_tree_at(Base::Work, Path::new(&name))?;
            info!(step = "mount.clean_work", path = ?name, "removed leftover from the work dir");
            n += 1;
        }
        Ok(n)
    }

    fn remove_tree_at(&self, at: Base, rel: &Path) -> Result<()> {
        let meta = match self.store.stat(at, rel)? {
            Some(m) => m,
            None => return Ok(()),
        };
        if meta.kind == Kind::Dir {
            for (name, _) in self.store.read_dir(at, rel)? {
                self.remove_tree_at(at, &rel.join(name))?;
            }
            self.store.rmdir(at, rel)?;
        } else {
            self.store.unlink(at, rel)?;
        }
        Ok(())
    }

    /// A fresh name in the work dir (kernel overlayfs uses `#<hex>` there too).
    pub fn tmp_name(&self) -> PathBuf {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        PathBuf::from(format!("#verlay.{}.{n:x}", std::process::id()))
    }

    /// The name mapping for this upper's namespace.
    pub fn names(&self) -> XattrNames {
        XattrNames {
            own: self.xattr_prefix,
        }
    }

    /// Full xattr name in the overlay namespace, e.g. `trusted.overlay.opaque`.
    pub fn ovl_xattr(&self, short: &str) -> String {
        format!("{}{short}", self.xattr_prefix)
    }

    /// The st_ino recorded at copy-up, if any.
    pub fn origin(&self, rel: &Path) -> Result<Option<u64>> {
        let v = self.dir.get_xattr(rel, OsStr::new(self.origin_xattr))?;
        Ok(v.and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map(u64::from_le_bytes))
    }

    /// At a clean unmount: remove the shared whiteout's own name from the work dir (the
    /// whiteouts linked to it stay), so that a clean unmount leaves the work dir empty.
    pub fn release_shared_whiteout(&self) {
        if let Some(s) = self.shared_whiteout.lock().take() {
            if let Err(e) = self.store.unlink(Base::Work, &s) {
                debug!(path = %s.display(), error = %e, "shared whiteout left for the next mount to remove");
            }
        }
    }

    /// Is an upper directory marked impure (it may hold entries with an origin)?
    pub fn is_impure(&self, rel: &Path) -> Result<bool> {
        for name in ["trusted.overlay.impure", "user.overlay.impure"] {
            if self.dir.get_xattr(rel, OsStr::new(name))?.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// The writes: only within a change (the commit gate held, the upper not poisoned).
impl Change<'_> {
    /// Move `tmp` from the work dir to `dst` in the upper: the single publishing step,
    /// named `step` (`copy_up.rename`, ...). Over a directory it is `publish.exchange`
    /// (RENAME_EXCHANGE) then `publish.remove_old`, and `step` follows those.
    fn publish(&self, tmp: &Path, dst: &Path, occupant: Occupant, step: &'static str) -> Result<()> {
        let st = &self.store;
        match occupant {
            Occupant::Nothing => st.rename(Base::Work, tmp, Base::Upper, dst, RenameFlags::NOREPLACE)?,
            Occupant::NonDir => st.rename(Base::Work, tmp, Base::Upper, dst, RenameFlags::empty())?,
            Occupant::Dir => {
                st.rename(Base::Work, tmp, Base::Upper, dst, RenameFlags::EXCHANGE)?;
                crash_point("publish.exchange");
                // The old directory (only whiteouts in it) is now in the work dir.
                if let Err(e) = self.remove_tree_at(Base::Work, tmp) {
                    warn!(step = "publish.remove_old", path = %dst.display(), error = %e,
                        "could not remove the replaced directory from the work dir; the next mount removes it");
                }
                crash_point("publish.remove_old");
            }
        }
        crash_point(step);
        Ok(())
    }

    fn discard(&self, tmp: &Path) {
        let _ = self.remove_tree_at(Base::Work, tmp);
    }

    /// Copy the xattrs of `src_path` (any layer, via /proc path) to `dst_path`, except the
    /// overlay's own.
    fn copy_xattrs(&self, src_path: &Path, tmp: &Path) -> Result<()> {
        let names = self.names();
        for name in list_xattr_path(src_path)? {
            if !names.is_user_data(&name) {
                continue;
            }
            if let Some(v) = get_xattr_path(src_path, &name)? {
                match self
                    .store
                    .set_xattr(Base::Work, tmp, &name, &v, XattrFlags::empty())
                {
                    Ok(()) => {}
                    // security.* may be refused (e.g. security.selinux without policy):
                    // the kernel skips such xattrs on copy-up too.
                    Err(rustix::io::Errno::PERM | rustix::io::Errno::NOTSUP)
                        if !name.as_encoded_bytes().starts_with(b"user.") =>
                    {
                        debug!(xattr = ?name, "xattr not copied up");
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }

    /// copy_up: copy the lower object at `src`/`src_rel` (whose lstat is `st`) to `dst` in
    /// the upper, keeping data (holes stay holes), owner, mode, times and xattrs.
    ///
    /// Steps: `copy_up.create` (temp in work dir), `copy_up.data`, `copy_up.xattrs`,
    /// `copy_up.owner`, `copy_up.mode`, `copy_up.origin`, `copy_up.times`, `copy_up.fsync`,
    /// `copy_up.rename`.
    pub fn copy_up(
        &self,
        src: &LayerDir,
        src_rel: &Path,
        st: &Stat,
        dst: &Path,
        origin_ino: Option<u64>,
        with_data: bool,
    ) -> Result<()> {
        let tmp = self.tmp_name();
        let r = self.copy_up_to_tmp(src, src_rel, st, &tmp, origin_ino, with_data);
        let r = r.and_then(|()| self.publish(&tmp, dst, Occupant::Nothing, "copy_up.rename"));
        if r.is_err() {
            self.discard(&tmp);
            return r;
        }
        // copy_up.fsync_dir: make the published name durable. Without it a power loss can
        // drop the new entry while the data an application then fsyncs lives only in the
        // copy: the lower version would come back (found by the simulated store).
        if self.fsync {
            let parent = dst.parent().unwrap_or(Path::new(""));
            self.sync_step("copy_up.fsync_dir", parent, || {
                self.store.fsync_dir(Base::Upper, parent)
            })?;
        }
        Ok(())
    }

    fn copy_up_to_tmp(
        &self,
        src: &LayerDir,
        src_rel: &Path,
        st: &Stat,
        tmp: &Path,
        origin_ino: Option<u64>,
        with_data: bool,
    ) -> Result<()> {
        let kind = Kind::from_mode(st.st_mode);
        let perm = st.st_mode & 0o7777;
        let store = &self.store;
        let mut file: Option<StoreFile> = None;
        match kind {
            Kind::Dir => store.mkdir(Base::Work, tmp, 0o700)?,
            Kind::File => {
                let out = store.create_file(Base::Work, tmp, 0o600, OFlags::WRONLY)?;
                crash_point("copy_up.create");
                if with_data {
                    let input = src.open_file(src_rel, OFlags::RDONLY)?;
                    store.copy_from(&out, input.as_fd(), st.st_size as u64)?;
                    crash_point("copy_up.data");
                }
                file = Some(out);
            }
            Kind::Symlink => {
                let target = src.readlink(src_rel)?;
                store.symlink(target.as_os_str(), Base::Work, tmp)?;
            }
            Kind::Fifo | Kind::Char | Kind::Block | Kind::Socket => {
                let ft = FileType::from_raw_mode(st.st_mode);
                store.mknod(Base::Work, tmp, ft, 0o600, st.st_rdev)?;
            }
        }
        if kind != Kind::File {
            crash_point("copy_up.create");
        }
        self.copy_xattrs(&src.proc_path(src_rel), tmp)?;
        crash_point("copy_up.xattrs");
        store.chown(Base::Work, tmp, Some(st.st_uid), Some(st.st_gid))?;
        crash_point("copy_up.owner");
        if kind != Kind::Symlink {
            // After chown, which clears setuid/setgid.
            store.chmod(Base::Work, tmp, perm)?;
            crash_point("copy_up.mode");
        }
        if let Some(o) = origin_ino {
            self.set_origin(Base::Work, tmp, o)?;
            crash_point("copy_up.origin");
        }
        store.utimens(Base::Work, tmp, &stat_times(st))?;
        crash_point("copy_up.times");
        if self.fsync {
            match (kind, file) {
                (Kind::File, Some(f)) => {
                    self.sync_step("copy_up.fsync", tmp, || store.fsync_file(&f))?;
                    crash_point("copy_up.fsync");
                }
                // A directory's owner, mode and xattrs must be durable before its name is:
                // otherwise a power loss can publish it as the daemon's 0700 temp, locking its
                // owner out (found by the simulated store). One fsync per copied-up
                // directory, which happens once per directory.
                (Kind::Dir, _) => {
                    self.sync_step("copy_up.fsync", tmp, || store.fsync_dir(Base::Work, tmp))?;
                    crash_point("copy_up.fsync");
                }
                // Symlinks and special files have no fd to fsync: their metadata rides on the
                // filesystem's ordered metadata journal (docs/ordering.md, "Assumptions").
                _ => {}
            }
        }
        Ok(())
    }

    fn set_origin(&self, at: Base, rel: &Path, origin_ino: u64) -> Result<()> {
        match self.store.set_xattr(
            at,
            rel,
            OsStr::new(self.origin_xattr),
            &origin_ino.to_le_bytes(),
            XattrFlags::empty(),
        ) {
            Ok(()) => Ok(()),
            // user.* xattrs cannot be set on symlinks and devices: st_ino of such a copy is
            // then the upper's own (documented limitation).
            Err(rustix::io::Errno::PERM) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// whiteout: put a whiteout (char 0/0) at `rel`, replacing what is there.
    /// Steps: `whiteout.mknod` (in the work dir), `whiteout.rename`.
    ///
    /// Whiteouts are hard links to one shared whiteout inode in the work dir, as kernel
    /// overlayfs makes them (since 5.8): a link costs no inode, where a mknod per whiteout
    /// made ext4 search its inode bitmaps (a quarter of the daemon's time in `rm -rf` of a
    /// lower tree). A filesystem that refuses the link gets one mknod per whiteout.
    pub fn whiteout(&self, rel: &Path, occupant: Occupant) -> Result<()> {
        let tmp = self.tmp_name();
        let r = self.new_whiteout(&tmp).and_then(|()| {
            crash_point("whiteout.mknod");
            self.publish(&tmp, rel, occupant, "whiteout.rename")
        });
        if r.is_err() {
            self.discard(&tmp);
        }
        r
    }

    /// A whiteout at `tmp` in the work dir: a link to the shared whiteout, or its own inode.
    fn new_whiteout(&self, tmp: &Path) -> Result<()> {
        let mknod = |at: &Path| self.store.mknod(Base::Work, at, FileType::CharacterDevice, 0, 0);
        // Two tries: the shared one can be full (EMLINK) or gone (ENOENT); then a new one.
        for _ in 0..2 {
            if self.no_shared_whiteout.load(Ordering::Relaxed) {
                break;
            }
            let shared = {
                let mut slot = self.shared_whiteout.lock();
                match &*slot {
                    Some(s) => s.clone(),
                    None => {
                        // Once per mount (or per 65,000 links on ext4): the lock keeps it one.
                        let n = self.counter.fetch_add(1, Ordering::Relaxed);
                        let name = format!("{SHARED_WHITEOUT_PREFIX}{}.{n:x}", std::process::id());
                        let name = Arc::new(PathBuf::from(name));
                        mknod(&name)?;
                        *slot = Some(name.clone());
                        name
                    }
                }
            };
            match self.store.link(Base::Work, &shared, Base::Work, tmp) {
                Ok(()) => return Ok(()),
                Err(rustix::io::Errno::MLINK | rustix::io::Errno::NOENT) => {
                    let mut slot = self.shared_whiteout.lock();
                    if slot.as_ref().is_some_and(|s| Arc::ptr_eq(s, &shared)) {
                        *slot = None;
                    }
                }
                Err(e) => {
                    warn!(error = %e, path = %self.work_path.display(),
                        "the upper refuses a hard link to a whiteout; each whiteout gets its own inode");
                    self.no_shared_whiteout.store(true, Ordering::Relaxed);
                }
            }
        }
        Ok(mknod(tmp)?)
    }

    /// Remove every whiteout inside an upper directory that is empty in the merged view,
    /// so it can be removed or replaced.
    pub fn clear_whiteouts(&self, rel: &Path) -> Result<()> {
        let mut whiteouts = Vec::new();
        for (name, _) in self.store.read_dir(Base::Upper, rel)? {
            let p = rel.join(&name);
            if let Some(m) = self.store.stat(Base::Upper, &p)? {
                if m.is_whiteout() {
                    whiteouts.push(p);
                }
            }
        }
        if whiteouts.is_empty() {
            return Ok(());
        }
        // Step clear_whiteouts.opaque: the directory is empty in the merged view; marking it
        // opaque first keeps it so while its whiteouts go, so a crash in the middle can never
        // show the deleted lower entries again (through its name or its redirect).
        self.set_ovl_xattr(rel, "opaque", b"y")?;
        for p in whiteouts {
            self.store.unlink(Base::Upper, &p)?;
            crash_point("clear_whiteouts.unlink");
        }
        Ok(())
    }

    /// Remove a non-directory, or a directory holding only whiteouts.
    pub fn remove(&self, rel: &Path, is_dir: bool) -> Result<()> {
        if is_dir {
            self.clear_whiteouts(rel)?;
            self.store.rmdir(Base::Upper, rel)?;
            crash_point("remove.rmdir");
        } else {
            self.store.unlink(Base::Upper, rel)?;
            crash_point("remove.unlink");
        }
        Ok(())
    }

    /// create: make a new object at `rel`. Over a whiteout it is built in the work dir and
    /// published by rename, so the lower object never shows through in between.
    /// Returns the open file for regular files (opened with `open_flags`).
    #[allow(clippy::too_many_arguments)]
    pub fn create(
        &self,
        rel: &Path,
        kind: Kind,
        mode: u32,
        rdev: u64,
        owner: Owner,
        symlink_target: Option<&OsStr>,
        open_flags: OFlags,
        occupant: Occupant,
        opaque: bool,
    ) -> Result<Option<OwnedFd>> {
        // In place only when the object is complete the moment it exists: owned by the daemon's
        // own ids and without setuid/setgid (which chown would clear). Otherwise it is made in the
        // work dir, given its owner and mode, and published by rename, so a crash never leaves a
        // root-owned file in a user's directory or a setuid file without its bit.
        let daemon_owned = owner.uid == rustix::process::geteuid().as_raw()
            && owner.gid == rustix::process::getegid().as_raw();
        let direct = occupant == Occupant::Nothing && !opaque && daemon_owned && mode & 0o6000 == 0;
        // rename(2) cannot put a directory over a whiteout; swap them instead.
        let occupant = if kind == Kind::Dir && occupant == Occupant::NonDir {
            Occupant::Dir
        } else {
            occupant
        };
        let tmp = self.tmp_name();
        let (at, name): (Base, &Path) = if direct {
            (Base::Upper, rel)
        } else {
            (Base::Work, &tmp)
        };
        let store = &self.store;
        let perm = mode & 0o7777;
        let mut file = None;
        match kind {
            Kind::File => file = Some(store.create_file(at, name, perm, open_flags)?),
            Kind::Dir => store.mkdir(at, name, perm)?,
            Kind::Symlink => {
                let target = symlink_target.ok_or(Error::Errno(libc::EINVAL))?;
                store.symlink(target, at, name)?
            }
            Kind::Fifo | Kind::Char | Kind::Block | Kind::Socket => {
                let ft = FileType::from_raw_mode(mode);
                store.mknod(at, name, ft, perm, rdev)?
            }
        }
        crash_point("create.make");
        let finish = || -> Result<()> {
            match &file {
                Some(f) => store.fchown(f, Some(owner.uid), Some(owner.gid))?,
                None => store.chown(at, name, Some(owner.uid), Some(owner.gid))?,
            }
            crash_point("create.owner");
            if kind != Kind::Symlink && mode & 0o7000 != 0 {
                // chown cleared setuid/setgid that the caller asked for.
                store.chmod(at, name, perm)?;
                crash_point("create.mode");
            }
            if opaque {
                let xname = self.ovl_xattr("opaque");
                store.set_xattr(at, name, OsStr::new(&xname), b"y", XattrFlags::empty())?;
                crash_point("create.opaque");
            }
            if !direct {
                // create.fsync: what was set on the temp (owner, mode, the opaque mark of a
                // directory made over a whiteout) must be durable before the name points at it,
                // or a power loss could publish a directory that lets deleted lower entries
                // show through (found by the simulated store). Symlinks and device nodes have
                // no fd to fsync; their metadata rides on the next syncfs.
                if self.fsync {
                    match (kind, &file) {
                        (Kind::File, Some(f)) => {
                            self.sync_step("create.fsync", rel, || store.fsync_file(f))?
                        }
                        (Kind::Dir, _) => {
                            self.sync_step("create.fsync", rel, || store.fsync_dir(Base::Work, &tmp))?
                        }
                        _ => {}
                    }
                }
                self.publish(&tmp, rel, occupant, "create.rename")?;
            }
            Ok(())
        };
        match finish() {
            // Only a real store has an fd to hand to the union.
            Ok(()) => Ok(file.and_then(StoreFile::into_fd)),
            Err(e) => {
                drop(file);
                if direct {
                    let _ = if kind == Kind::Dir {
                        store.rmdir(Base::Upper, rel)
                    } else {
                        store.unlink(Base::Upper, rel)
                    };
                } else {
                    self.discard(&tmp);
                }
                Err(e)
            }
        }
    }

    /// link: a new name for the upper object at `src`. Over a whiteout, the link is made in
    /// the work dir and renamed over it.
    pub fn link(&self, src: &Path, dst: &Path, occupant: Occupant) -> Result<()> {
        if occupant == Occupant::Nothing {
            self.store.link(Base::Upper, src, Base::Upper, dst)?;
            crash_point("link.link");
            return Ok(());
        }
        let tmp = self.tmp_name();
        let r = self
            .store
            .link(Base::Upper, src, Base::Work, &tmp)
            .map_err(Error::from)
            .and_then(|()| {
                crash_point("link.link");
                self.publish(&tmp, dst, occupant, "link.rename")
            });
        if r.is_err() {
            self.discard(&tmp);
        }
        r
    }

    /// rename within the upper. With `whiteout_old`, the old name is left holding a whiteout
    /// in the same atomic step (RENAME_WHITEOUT) when the kernel allows it; otherwise the
    /// whiteout follows in a second step.
    pub fn rename(&self, old: &Path, new: &Path, flags: RenameFlags, whiteout_old: bool) -> Result<()> {
        if whiteout_old {
            match self
                .store
                .rename(Base::Upper, old, Base::Upper, new, flags | RenameFlags::WHITEOUT)
            {
                Ok(()) => {
                    crash_point("rename.rename");
                    return Ok(());
                }
                Err(rustix::io::Errno::INVAL | rustix::io::Errno::PERM) => {}
                Err(e) => return Err(e.into()),
            }
            self.store.rename(Base::Upper, old, Base::Upper, new, flags)?;
            crash_point("rename.rename");
            self.whiteout(old, Occupant::Nothing)?;
            crash_point("rename.whiteout");
            Ok(())
        } else {
            self.store.rename(Base::Upper, old, Base::Upper, new, flags)?;
            crash_point("rename.rename");
            Ok(())
        }
    }

    /// An upper file opened for writing (by an application's open; with O_TRUNC this is
    /// the truncation). An upgraded WRONLY open (as RDWR) of a file the daemon may not read
    /// is retried as asked.
    pub fn open_file(&self, rel: &Path, oflags: OFlags) -> Result<OwnedFd> {
        match self.dir.open_file(rel, oflags) {
            Err(e) if e.errno() == libc::EACCES && oflags.contains(OFlags::RDWR) => {
                let mut f = oflags;
                f.remove(OFlags::RDWR);
                f.insert(OFlags::WRONLY);
                self.dir.open_file(rel, f)
            }
            r => r,
        }
    }

    /// Set an overlay xattr (`opaque`, `redirect`) on an upper object.
    pub fn set_ovl_xattr(&self, rel: &Path, short: &str, value: &[u8]) -> Result<()> {
        let name = self.ovl_xattr(short);
        self.store
            .set_xattr(Base::Upper, rel, OsStr::new(&name), value, XattrFlags::empty())?;
        match short {
            "opaque" => crash_point("set_ovl_xattr.opaque"),
            "redirect" => crash_point("set_ovl_xattr.redirect"),
            "impure" => crash_point("set_ovl_xattr.impure"),
            _ => {}
        }
        Ok(())
    }

    /// Mark an upper directory impure (`overlay.impure=y`) unless it already is.
    pub fn mark_impure(&self, rel: &Path) -> Result<()> {
        let name = self.ovl_xattr("impure");
        if self.dir.get_xattr(rel, OsStr::new(&name))?.is_none() {
            self.set_ovl_xattr(rel, "impure", b"y")?;
        }
        Ok(())
    }

    /// User xattr write on an upper object.
    pub fn set_xattr(&self, rel: &Path, name: &OsStr, value: &[u8], flags: XattrFlags) -> Result<()> {
        self.store.set_xattr(Base::Upper, rel, name, value, flags)?;
        Ok(())
    }

    /// User xattr removal on an upper object.
    pub fn remove_xattr(&self, rel: &Path, name: &OsStr) -> Result<()> {
        self.store.remove_xattr(Base::Upper, rel, name)?;
        Ok(())
    }

    /// chmod of an upper object.
    pub fn chmod(&self, rel: &Path, mode: u32) -> Result<()> {
        self.store.chmod(Base::Upper, rel, mode & 0o7777)?;
        Ok(())
    }

    /// chown of an upper object (not following symlinks).
    pub fn chown(&self, rel: &Path, u: Option<u32>, g: Option<u32>) -> Result<()> {
        self.store.chown(Base::Upper, rel, u, g)?;
        Ok(())
    }

    /// utimensat of an upper object (not following symlinks).
    pub fn utimens(&self, rel: &Path, times: &Timestamps) -> Result<()> {
        self.store.utimens(Base::Upper, rel, times)?;
        Ok(())
    }

    /// truncate of an upper file by path.
    pub fn truncate(&self, rel: &Path, size: u64) -> Result<()> {
        self.store.truncate(Base::Upper, rel, size)?;
        Ok(())
    }
}

impl Upper {
    /// fsync of an upper directory. Syncs change nothing a commit's copy holds, so they do
    /// not take the commit gate; a poisoned upper refuses them.
    pub fn fsync_dir(&self, rel: &Path) -> Result<()> {
        self.check_writable()?;
        if !self.fsync {
            return Ok(());
        }
        self.sync_step("fsyncdir", rel, || self.store.fsync_dir(Base::Upper, rel))
    }

    /// An application's fsync of a directory: `rel` in the upper, or None for one not in
    /// the upper (nothing to sync, but a poisoned upper still refuses).
    pub fn sync_dir(&self, rel: Option<&Path>) -> Result<()> {
        match rel {
            Some(rel) => self.fsync_dir(rel),
            None => self.check_writable(),
        }
    }

    /// An application's fsync (or fdatasync) of an open file: `fd` on the upper, or None for
    /// a file still on a lower layer (nothing to sync, but a poisoned upper still refuses).
    /// Not under the commit gate, as [`Upper::fsync_dir`].
    pub fn sync_file(&self, fd: Option<Arc<OwnedFd>>, datasync: bool) -> Result<()> {
        self.check_writable()?;
        match fd {
            Some(fd) => file::sync(self, &StoreFile::Shared(fd), datasync),
            None => Ok(()),
        }
    }

    /// syncfs of the upper filesystem (an application's fsync of the mount's root).
    pub fn syncfs(&self) -> Result<()> {
        self.check_writable()?;
        self.sync_step("syncfs", Path::new(""), || self.store.syncfs())
    }

    /// Refuse every change once an fsync of the upper has failed (checked by
    /// [`Upper::change`], which every write goes through).
    ///
    /// After a failed fsync the kernel may already have dropped the dirty pages it could
    /// not write, and a second fsync reports success ("fsyncgate"); the upper then holds
    /// something other than what the application was told is durable. Only a remount (a
    /// new `Upper`) clears this, as with redb's `PreviousIo`.
    pub fn check_writable(&self) -> Result<()> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(Error::UpperPoisoned);
        }
        Ok(())
    }

    /// Has an fsync of the upper failed?
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    /// Run one sync of the upper (skipped without `fsync`); a failure poisons the upper
    /// and is returned with its own errno (the error line is logged once per mount).
    fn sync_step(
        &self,
        step: &'static str,
        path: &Path,
        sync: impl FnOnce() -> rustix::io::Result<()>,
    ) -> Result<()> {
        if !self.fsync {
            return Ok(());
        }
        sync().map_err(|e| {
            if !self.poisoned.swap(true, Ordering::AcqRel) {
                error!(step, path = %path.display(), error = %e,
                    "fsync of the upper failed; refusing every change until remount");
            }
            Error::io(step, path, e.into())
        })
    }

    /// The workdir given at mount (parent of `workdir/work`).
    fn workdir(&self) -> &Path {
        self.work_path.parent().unwrap_or(&self.work_path)
    }

    /// volatile.check, at mount before the work dir is cleaned: refuse an upper left by an unclean stop of
    /// a volatile mount (the marker is still there), or with `recover` remove the marker
    /// and accept the upper as it is. Also refuses incompat features verlay does not know,
    /// as kernel overlayfs does.
    pub fn check_volatile_marker(&self, recover: bool) -> Result<()> {
        let incompat = self.work_path.join(INCOMPAT_SUBDIR);
        let entries = match std::fs::read_dir(&incompat) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io("readdir", &incompat, e)),
        };
        let what = format!("workdir \"{}\"", self.workdir().display());
        for ent in entries {
            let ent = ent.map_err(|e| Error::io("readdir", &incompat, e))?;
            let name = ent.file_name();
            if name != VOLATILE_MARKER {
                return Err(Error::usage(
                    what,
                    format!(
                        "holds {WORK_SUBDIR}/{INCOMPAT_SUBDIR}/{}, an overlay feature verlay does not know",
                        name.to_string_lossy()
                    ),
                    "use a fresh upperdir and workdir",
                ));
            }
            if !recover {
                return Err(Error::usage(
                    what,
                    format!(
                        "found {WORK_SUBDIR}/{INCOMPAT_SUBDIR}/{VOLATILE_MARKER}, so the upper may be \
                         inconsistent after an unclean stop of a volatile mount"
                    ),
                    "discard the upperdir and workdir, or mount with -o volatile_recover to accept the upper as it is",
                ));
            }
            let rel = Path::new(INCOMPAT_SUBDIR).join(VOLATILE_MARKER);
            self.remove_tree_at(Base::Work, &rel)?;
            warn!(step = "volatile.recover", path = %incompat.join(VOLATILE_MARKER).display(),
                "volatile_recover: accepting the upper of a volatile mount that was not stopped cleanly");
        }
        Ok(())
    }

    /// volatile.mark: create `work/incompat/volatile` and make it durable before the
    /// mount accepts any write, so that any unsynced write is always covered by it.
    pub fn create_volatile_marker(&self) -> Result<()> {
        let incompat = self.work_path.join(INCOMPAT_SUBDIR);
        let marker = incompat.join(VOLATILE_MARKER);
        let step = "volatile.mark";
        let rel_incompat = Path::new(INCOMPAT_SUBDIR);
        let rel_marker = rel_incompat.join(VOLATILE_MARKER);
        for (rel, d) in [(rel_incompat, &incompat), (rel_marker.as_path(), &marker)] {
            match self.store.mkdir(Base::Work, rel, 0o700) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(Error::io(step, d, e.into())),
            }
        }
        for (rel, d) in [(rel_incompat, &incompat), (Path::new(""), &self.work_path)] {
            self.store
                .fsync_dir(Base::Work, rel)
                .map_err(|e| Error::io(step, d, e.into()))?;
        }
        // The workdir itself (parent of `work`) is outside the store's bases; its fsync
        // is the one sync made directly.
        let wd = self.workdir().to_path_buf();
        fsync_path(&wd).map_err(|e| Error::io(step, &wd, e.into()))?;
        info!(step, path = %marker.display(), "volatile mount: marker created");
        Ok(())
    }

    /// At a clean end of a volatile mount: `volatile.syncfs` (the upper's writes reach the
    /// disk), then `volatile.unmark` (remove the marker, fsync the work dir). A failed
    /// syncfs or a poisoned upper keeps the marker, so the next mount refuses.
    pub fn remove_volatile_marker(&self) -> Result<()> {
        self.check_writable()?;
        self.store
            .syncfs()
            .map_err(|e| Error::io("volatile.syncfs", &self.dir.path, e.into()))?;
        let step = "volatile.unmark";
        let incompat = Path::new(INCOMPAT_SUBDIR);
        for rel in [incompat.join(VOLATILE_MARKER), incompat.to_path_buf()] {
            match self.store.rmdir(Base::Work, &rel) {
                Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                Err(e) => return Err(Error::io(step, self.work_path.join(&rel), e.into())),
            }
        }
        self.store
            .fsync_dir(Base::Work, Path::new(""))
            .map_err(|e| Error::io(step, &self.work_path, e.into()))?;
        info!(step, "volatile mount ended cleanly: upper synced, marker removed");
        Ok(())
    }
}

fn fsync_path(p: &Path) -> rustix::io::Result<()> {
    let f = rustix::fs::open(
        p,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    rustix::fs::fsync(&f)
}

/// Copy `len` bytes, skipping holes (SEEK_DATA/SEEK_HOLE) and using copy_file_range so the
/// kernel can reflink or copy without a round trip through userspace.
pub fn copy_data(input: &impl AsFd, out: &impl AsFd, len: u64) -> Result<()> {
    let mut pos = 0u64;
    while pos < len {
        let data = match rustix::fs::seek(input, SeekFrom::Data(pos)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => break, // only a hole remains
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOTSUP) => pos,
            Err(e) => return Err(e.into()),
        };
        let hole = match rustix::fs::seek(input, SeekFrom::Hole(data)) {
            Ok(h) => h.min(len),
            Err(_) => len,
        };
        let mut off_in = data;
        let mut off_out = data;
        while off_in < hole {
            let want = (hole - off_in).min(1 << 30) as usize;
            let n = match rustix::fs::copy_file_range(input, Some(&mut off_in), out, Some(&mut off_out), want)
            {
                Ok(n) => n,
                Err(rustix::io::Errno::XDEV | rustix::io::Errno::NOSYS | rustix::io::Errno::INVAL) => {
                    // Copies up to the hole or to EOF: either way this extent is done. Asking
                    // copy_file_range again after a short read (the file shrank) would be
                    // answered EXDEV again, forever.
                    copy_by_read(input, out, &mut off_in, &mut off_out, hole)?;
                    break;
                }
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                break; // the file shrank under us
            }
        }
        pos = hole;
    }
    // A trailing hole: set the length without writing zeros.
    rustix::fs::ftruncate(out, len)?;
    Ok(())
}

fn copy_by_read(
    input: &impl AsFd,
    out: &impl AsFd,
    off_in: &mut u64,
    off_out: &mut u64,
    end: u64,
) -> Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    while *off_in < end {
        let want = ((end - *off_in) as usize).min(buf.len());
        let n = rustix::io::pread(input, &mut buf[..want], *off_in)?;
        if n == 0 {
            break;
        }
        let mut done = 0;
        while done < n {
            match rustix::io::pwrite(out, &buf[done..n], *off_out + done as u64)? {
                // A regular file never takes 0 of a non-empty write; if one did, retrying
                // would spin.
                0 => return Err(Error::Errno(libc::EIO)),
                k => done += k,
            }
        }
        *off_in += n as u64;
        *off_out += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upper(t: &Path, fsync: bool) -> Upper {
        for d in ["u", "w"] {
            std::fs::create_dir_all(t.join(d)).unwrap();
        }
        Upper::open(&t.join("u"), &t.join("w"), fsync).unwrap()
    }

    fn owner() -> Owner {
        Owner {
            uid: rustix::process::geteuid().as_raw(),
            gid: rustix::process::getegid().as_raw(),
        }
    }

    /// The poisoning state machine: a failed sync poisons, the failing call returns its own
    /// errno, every later change and sync is EIO, nothing is retried, and only a new `Upper`
    /// (a remount) starts clean.
    #[test]
    fn failed_sync_poisons_until_reopened() {
        let t = tempfile::tempdir().unwrap();
        let up = upper(t.path(), true);
        up.sync_step("fsync", Path::new("f"), || Ok(())).unwrap();
        assert!(!up.is_poisoned());
        let err = up
            .sync_step("fsync", Path::new("f"), || Err(rustix::io::Errno::IO))
            .unwrap_err();
        assert_eq!(err.errno(), libc::EIO);
        assert!(up.is_poisoned());
        type Op<'a> = (&'a str, Box<dyn Fn(&Upper) -> Result<()> + 'a>);
        let changes: Vec<Op> = vec![
            ("syncfs", Box::new(|u: &Upper| u.change()?.syncfs())),
            (
                "fsync_dir",
                Box::new(|u: &Upper| u.change()?.fsync_dir(Path::new(""))),
            ),
            (
                "create",
                Box::new(|u: &Upper| {
                    u.change()?
                        .create(
                            Path::new("new"),
                            Kind::File,
                            0o644,
                            0,
                            owner(),
                            None,
                            OFlags::RDWR,
                            Occupant::Nothing,
                            false,
                        )
                        .map(drop)
                }),
            ),
            (
                "whiteout",
                Box::new(|u: &Upper| u.change()?.whiteout(Path::new("w"), Occupant::Nothing)),
            ),
            (
                "chmod",
                Box::new(|u: &Upper| u.change()?.chmod(Path::new(""), 0o755)),
            ),
            (
                "truncate",
                Box::new(|u: &Upper| u.change()?.truncate(Path::new("x"), 0)),
            ),
            (
                "rename",
                Box::new(|u: &Upper| {
                    u.change()?
                        .rename(Path::new("a"), Path::new("b"), RenameFlags::empty(), false)
                }),
            ),
            (
                "remove_volatile_marker",
                Box::new(|u: &Upper| u.remove_volatile_marker()),
            ),
        ];
        for (name, f) in &changes {
            let r = f(&up);
            assert!(matches!(r, Err(Error::UpperPoisoned)), "{name}: {r:?}");
        }
        assert!(
            !t.path().join("u/new").exists(),
            "a poisoned upper created a file"
        );
        let fresh = upper(t.path(), true);
        assert!(!fresh.is_poisoned());
        fresh.change().unwrap().fsync_dir(Path::new("")).unwrap();
        for (name, f) in &changes[..3] {
            f(&fresh).unwrap_or_else(|e| panic!("{name} after reopening: {e}"));
        }
    }

    /// Without fsync (volatile, fsync=0) no sync runs, so none can fail or poison.
    #[test]
    fn no_sync_without_fsync() {
        let t = tempfile::tempdir().unwrap();
        let up = upper(t.path(), false);
        let mut ran = false;
        up.sync_step("fsync", Path::new("f"), || {
            ran = true;
            Err(rustix::io::Errno::IO)
        })
        .unwrap();
        assert!(!ran && !up.is_poisoned());
    }

    /// The volatile marker: created where kernel overlayfs puts it, refused without
    /// `volatile_recover`, removed with it, and removed again at a clean stop.
    #[test]
    fn volatile_marker_steps() {
        let t = tempfile::tempdir().unwrap();
        let up = upper(t.path(), false);
        let marker = t.path().join("w/work/incompat/volatile");
        up.check_volatile_marker(false).unwrap();
        up.create_volatile_marker().unwrap();
        assert!(marker.is_dir());
        let e = up.check_volatile_marker(false).unwrap_err().to_string();
        assert!(
            e.contains("unclean stop of a volatile mount") && e.contains("volatile_recover"),
            "{e}"
        );
        up.check_volatile_marker(true).unwrap();
        assert!(!marker.exists());
        up.create_volatile_marker().unwrap();
        up.remove_volatile_marker().unwrap();
        assert!(!t.path().join("w/work/incompat").exists());
        up.check_volatile_marker(false).unwrap();
    }
}
