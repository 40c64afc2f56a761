//! The real [`UpperStore`]: one syscall per method, on the upper's and the work dir's root fds.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, RenameFlags, Timestamps, XattrFlags};
use rustix::io::{Errno, Result};

use super::store::{Base, Meta, StoreFile, UpperStore};
use crate::layer::{at_path, Kind};

/// The upper and work directories of a real filesystem.
#[derive(Debug)]
pub struct RealStore {
    upper: OwnedFd,
    work: OwnedFd,
}

fn fd(f: &StoreFile) -> Result<&OwnedFd> {
    match f {
        StoreFile::Real(fd) => Ok(fd),
        StoreFile::Shared(fd) => Ok(fd),
        StoreFile::Sim(_) => Err(Errno::BADF),
    }
}

/// `/proc/self/fd/N` of `fd`. The fd kept on a removed fifo, device or socket is O_PATH
/// (opening it for real would open the device or join the fifo): fchmod, fchown and
/// futimens refuse it with EBADF, and the same calls by this path reach its object.
fn fd_link(fd: &OwnedFd) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

impl RealStore {
    /// A store over these two directory fds (upperdir, `workdir/work`).
    pub fn new(upper: OwnedFd, work: OwnedFd) -> RealStore {
        RealStore { upper, work }
    }

    fn dir(&self, at: Base) -> &OwnedFd {
        match at {
            Base::Upper => &self.upper,
            Base::Work => &self.work,
        }
    }

    /// `/proc/self/fd/N/rel`, for the calls without an *at form.
    fn proc(&self, at: Base, rel: &Path) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.dir(at).as_raw_fd())).join(at_path(rel))
    }
}

impl UpperStore for RealStore {
    fn mkdir(&self, at: Base, rel: &Path, mode: u32) -> Result<()> {
        rustix::fs::mkdirat(self.dir(at), rel, Mode::from_raw_mode(mode))
    }

    fn create_file(&self, at: Base, rel: &Path, mode: u32, flags: OFlags) -> Result<StoreFile> {
        rustix::fs::openat(
            self.dir(at),
            rel,
            flags | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode),
        )
        .map(StoreFile::Real)
    }

    fn write_at(&self, f: &StoreFile, off: u64, data: &[u8]) -> Result<usize> {
        rustix::io::pwrite(fd(f)?, data, off)
    }

    fn copy_from(&self, f: &StoreFile, input: BorrowedFd<'_>, len: u64) -> crate::error::Result<()> {
        super::copy_data(&input, fd(f)?, len)
    }

    fn set_len(&self, f: &StoreFile, len: u64) -> Result<()> {
        rustix::fs::ftruncate(fd(f)?, len)
    }

    fn fchown(&self, f: &StoreFile, uid: Option<u32>, gid: Option<u32>) -> Result<()> {
        let (uid, gid) = (
            uid.map(rustix::process::Uid::from_raw),
            gid.map(rustix::process::Gid::from_raw),
        );
        match rustix::fs::fchown(fd(f)?, uid, gid) {
            Err(Errno::BADF) => rustix::fs::chown(fd_link(fd(f)?).as_str(), uid, gid),
            r => r,
        }
    }

    fn fchmod(&self, f: &StoreFile, mode: u32) -> Result<()> {
        match rustix::fs::fchmod(fd(f)?, Mode::from_raw_mode(mode)) {
            Err(Errno::BADF) => rustix::fs::chmod(fd_link(fd(f)?).as_str(), Mode::from_raw_mode(mode)),
            r => r,
        }
    }

    fn futimens(&self, f: &StoreFile, times: &Timestamps) -> Result<()> {
        match rustix::fs::futimens(fd(f)?, times) {
            Err(Errno::BADF) => {
                let link = fd_link(fd(f)?);
                rustix::fs::utimensat(rustix::fs::CWD, link.as_str(), times, AtFlags::empty())
            }
            r => r,
        }
    }

    fn fallocate(&self, f: &StoreFile, mode: u32, off: u64, len: u64) -> Result<()> {
        rustix::fs::fallocate(
            fd(f)?,
            rustix::fs::FallocateFlags::from_bits_retain(mode),
            off,
            len,
        )
    }

    fn fsync_file(&self, f: &StoreFile) -> Result<()> {
        rustix::fs::fsync(fd(f)?)
    }

    fn fdatasync(&self, f: &StoreFile) -> Result<()> {
        rustix::fs::fdatasync(fd(f)?)
    }

    fn fsync_dir(&self, at: Base, rel: &Path) -> Result<()> {
        let d = rustix::fs::openat(
            self.dir(at),
            at_path(rel),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
        )?;
        rustix::fs::fsync(&d)
    }

    fn syncfs(&self) -> Result<()> {
        rustix::fs::syncfs(&self.upper)
    }

    fn rename(&self, from: Base, old: &Path, to: Base, new: &Path, flags: RenameFlags) -> Result<()> {
        if flags.is_empty() {
            rustix::fs::renameat(self.dir(from), old, self.dir(to), new)
        } else {
            rustix::fs::renameat_with(self.dir(from), old, self.dir(to), new, flags)
        }
    }

    fn link(&self, from: Base, old: &Path, to: Base, new: &Path) -> Result<()> {
        rustix::fs::linkat(self.dir(from), old, self.dir(to), new, AtFlags::empty())
    }

    fn unlink(&self, at: Base, rel: &Path) -> Result<()> {
        rustix::fs::unlinkat(self.dir(at), rel, AtFlags::empty())
    }

    fn rmdir(&self, at: Base, rel: &Path) -> Result<()> {
        rustix::fs::unlinkat(self.dir(at), rel, AtFlags::REMOVEDIR)
    }

    fn mknod(&self, at: Base, rel: &Path, ft: FileType, mode: u32, rdev: u64) -> Result<()> {
        rustix::fs::mknodat(self.dir(at), rel, ft, Mode::from_raw_mode(mode), rdev)
    }

    fn symlink(&self, target: &OsStr, at: Base, rel: &Path) -> Result<()> {
        rustix::fs::symlinkat(target, self.dir(at), rel)
    }

    fn set_xattr(&self, at: Base, rel: &Path, name: &OsStr, value: &[u8], flags: XattrFlags) -> Result<()> {
        rustix::fs::lsetxattr(self.proc(at, rel), name, value, flags)
    }

    fn remove_xattr(&self, at: Base, rel: &Path, name: &OsStr) -> Result<()> {
        rustix::fs::lremovexattr(self.proc(at, rel), name)
    }

    fn chown(&self, at: Base, rel: &Path, uid: Option<u32>, gid: Option<u32>) -> Result<()> {
        rustix::fs::chownat(
            self.dir(at),
            at_path(rel),
            uid.map(rustix::process::Uid::from_raw),
            gid.map(rustix::process::Gid::from_raw),
            AtFlags::SYMLINK_NOFOLLOW,
        )
    }

    fn chmod(&self, at: Base, rel: &Path, mode: u32) -> Result<()> {
        rustix::fs::chmodat(
            self.dir(at),
            at_path(rel),
            Mode::from_raw_mode(mode),
            AtFlags::empty(),
        )
    }

    fn utimens(&self, at: Base, rel: &Path, times: &Timestamps) -> Result<()> {
        rustix::fs::utimensat(self.dir(at), at_path(rel), times, AtFlags::SYMLINK_NOFOLLOW)
    }

    fn truncate(&self, at: Base, rel: &Path, len: u64) -> Result<()> {
        let f = rustix::fs::openat(
            self.dir(at),
            at_path(rel),
            OFlags::WRONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
        )?;
        rustix::fs::ftruncate(&f, len)
    }

    fn stat(&self, at: Base, rel: &Path) -> Result<Option<Meta>> {
        match rustix::fs::statat(self.dir(at), at_path(rel), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(Meta {
                kind: Kind::from_mode(st.st_mode),
                mode: st.st_mode & 0o7777,
                size: st.st_size as u64,
                rdev: st.st_rdev,
            })),
            Err(Errno::NOENT | Errno::NOTDIR) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn read_dir(&self, at: Base, rel: &Path) -> Result<Vec<(OsString, Option<Kind>)>> {
        let rd = std::fs::read_dir(self.proc(at, rel)).map_err(errno)?;
        let mut out = Vec::new();
        for ent in rd {
            let ent = ent.map_err(errno)?;
            out.push((
                ent.file_name(),
                ent.file_type().ok().and_then(Kind::from_file_type),
            ));
        }
        Ok(out)
    }

    fn get_xattr(&self, at: Base, rel: &Path, name: &OsStr) -> Result<Option<Vec<u8>>> {
        crate::layer::get_xattr_path(&self.proc(at, rel), name)
            .map_err(|e| Errno::from_raw_os_error(e.errno()))
    }
}

fn errno(e: std::io::Error) -> Errno {
    Errno::from_io_error(&e).unwrap_or(Errno::IO)
}
