//! `UpperStore`: the syscall-shaped interface through which [`super::Upper`] makes every
//! change to the upper and work directories (docs/ordering.md, "The simulated store").
//!
//! A location is a base ([`Base::Upper`] or [`Base::Work`]) and a path relative to it (the
//! empty path is the base itself). [`super::real::RealStore`] does one syscall per method;
//! [`super::sim::SimStore`] models POSIX durability so that crash points can be enumerated
//! against power loss.

use std::ffi::OsStr;
use std::fmt::Debug;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use rustix::fs::{FileType, OFlags, RenameFlags, Timestamps, XattrFlags};
use rustix::io::Result;

use crate::layer::Kind;

/// Which root a store path is relative to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Base {
    /// upperdir
    Upper,
    /// `workdir/work`
    Work,
}

/// An open file of a store.
#[derive(Debug)]
pub enum StoreFile {
    /// a real open file
    Real(OwnedFd),
    /// a real open file shared with the union's handles (an application's open file)
    Shared(Arc<OwnedFd>),
    /// a file of the simulated store (its inode number)
    Sim(u64),
}

impl StoreFile {
    /// The real fd, if this is a real file.
    pub fn into_fd(self) -> Option<OwnedFd> {
        match self {
            StoreFile::Real(fd) => Some(fd),
            StoreFile::Shared(_) | StoreFile::Sim(_) => None,
        }
    }
}

/// What `stat` reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Meta {
    /// file type
    pub kind: Kind,
    /// permission bits
    pub mode: u32,
    /// size in bytes (files)
    pub size: u64,
    /// device number (special files)
    pub rdev: u64,
}

impl Meta {
    /// Is this a whiteout (char device 0/0)?
    pub fn is_whiteout(&self) -> bool {
        self.kind == Kind::Char && self.rdev == 0
    }
}

/// The syscalls the upper layer is written with. Errors are plain errnos.
pub trait UpperStore: Debug + Send + Sync {
    /// mkdirat
    fn mkdir(&self, at: Base, rel: &Path, mode: u32) -> Result<()>;
    /// openat(O_CREAT | O_EXCL | `flags`)
    fn create_file(&self, at: Base, rel: &Path, mode: u32, flags: OFlags) -> Result<StoreFile>;
    /// pwrite
    fn write_at(&self, f: &StoreFile, off: u64, data: &[u8]) -> Result<usize>;
    /// Copy `len` bytes of `input` (a lower file, read as is) into `f` (holes stay holes
    /// where the store can keep them); the file's size becomes `len`.
    fn copy_from(&self, f: &StoreFile, input: BorrowedFd<'_>, len: u64) -> crate::error::Result<()>;
    /// ftruncate
    fn set_len(&self, f: &StoreFile, len: u64) -> Result<()>;
    /// fchown (None leaves that id)
    fn fchown(&self, f: &StoreFile, uid: Option<u32>, gid: Option<u32>) -> Result<()>;
    /// fchmod
    fn fchmod(&self, f: &StoreFile, mode: u32) -> Result<()>;
    /// futimens
    fn futimens(&self, f: &StoreFile, times: &Timestamps) -> Result<()>;
    /// fallocate (`mode`: FALLOC_FL_* bits)
    fn fallocate(&self, f: &StoreFile, mode: u32, off: u64, len: u64) -> Result<()>;
    /// fsync of an open file
    fn fsync_file(&self, f: &StoreFile) -> Result<()>;
    /// fdatasync of an open file
    fn fdatasync(&self, f: &StoreFile) -> Result<()>;
    /// fsync of a directory
    fn fsync_dir(&self, at: Base, rel: &Path) -> Result<()>;
    /// syncfs of the whole upper filesystem
    fn syncfs(&self) -> Result<()>;
    /// renameat2 with `flags` (NOREPLACE, EXCHANGE, WHITEOUT)
    fn rename(&self, from: Base, old: &Path, to: Base, new: &Path, flags: RenameFlags) -> Result<()>;
    /// linkat
    fn link(&self, from: Base, old: &Path, to: Base, new: &Path) -> Result<()>;
    /// unlinkat of a non-directory
    fn unlink(&self, at: Base, rel: &Path) -> Result<()>;
    /// unlinkat(AT_REMOVEDIR)
    fn rmdir(&self, at: Base, rel: &Path) -> Result<()>;
    /// mknodat (a whiteout is `CharacterDevice`, rdev 0)
    fn mknod(&self, at: Base, rel: &Path, ft: FileType, mode: u32, rdev: u64) -> Result<()>;
    /// symlinkat
    fn symlink(&self, target: &OsStr, at: Base, rel: &Path) -> Result<()>;
    /// lsetxattr
    fn set_xattr(&self, at: Base, rel: &Path, name: &OsStr, value: &[u8], flags: XattrFlags) -> Result<()>;
    /// lremovexattr
    fn remove_xattr(&self, at: Base, rel: &Path, name: &OsStr) -> Result<()>;
    /// lchown (None leaves that id)
    fn chown(&self, at: Base, rel: &Path, uid: Option<u32>, gid: Option<u32>) -> Result<()>;
    /// chmod (follows nothing: only called on non-symlinks)
    fn chmod(&self, at: Base, rel: &Path, mode: u32) -> Result<()>;
    /// utimensat(AT_SYMLINK_NOFOLLOW)
    fn utimens(&self, at: Base, rel: &Path, times: &Timestamps) -> Result<()>;
    /// truncate by path
    fn truncate(&self, at: Base, rel: &Path, len: u64) -> Result<()>;
    /// lstat; None when absent
    fn stat(&self, at: Base, rel: &Path) -> Result<Option<Meta>>;
    /// The entries of a directory with their kinds (from d_type)
    fn read_dir(&self, at: Base, rel: &Path) -> Result<Vec<(std::ffi::OsString, Option<Kind>)>>;
    /// lgetxattr; None when absent
    fn get_xattr(&self, at: Base, rel: &Path, name: &OsStr) -> Result<Option<Vec<u8>>>;
}
