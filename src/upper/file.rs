//! An open upper file written by an application: every write, truncate, chmod, chown,
//! utimes, fallocate and fsync of an open file goes through [`UpperFile`], under the
//! [`Change`] that holds the commit gate, and through the store (so the simulated store
//! sees application writes too).

use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;

use rustix::fs::{OFlags, Timestamps};

use super::gate::Change;
use super::store::StoreFile;
use super::Upper;
use crate::error::Result;

/// Most bytes one application write asks for (FUSE's max_write is far smaller); a
/// longer buffer is refused rather than looped over.
const WRITE_MAX: usize = 1 << 30;

/// An open file of the upper, written within one change.
pub struct UpperFile<'c, 'u> {
    change: &'c Change<'u>,
    file: StoreFile,
}

impl<'u> Change<'u> {
    /// The upper file open as `fd` (an application's open file, shared with its handle).
    pub fn file(&self, fd: Arc<OwnedFd>) -> UpperFile<'_, 'u> {
        UpperFile {
            change: self,
            file: StoreFile::Shared(fd),
        }
    }

    /// A file of the store (one made by [`Change::create`], or the simulated store's).
    pub fn store_file(&self, file: StoreFile) -> UpperFile<'_, 'u> {
        UpperFile { change: self, file }
    }

    /// A new open, with `oflags`, of an upper object that has no name any more but is still
    /// open as `fd` (the kernel reaches it by a file handle, open_by_handle_at): with write
    /// flags, and the O_TRUNC in them (the truncation), it is a change of the upper.
    pub fn reopen(&self, fd: &OwnedFd, oflags: OFlags) -> Result<OwnedFd> {
        reopen_fd(fd, oflags)
    }
}

/// A new open of the object open as `fd`, named or not: open(2) of `/proc/self/fd/N`, as
/// for a deleted file. An open that may write an upper object goes through
/// [`Change::reopen`].
pub fn reopen_fd(fd: &OwnedFd, oflags: OFlags) -> Result<OwnedFd> {
    let link = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(fd));
    rustix::fs::open(link.as_str(), oflags | OFlags::CLOEXEC, rustix::fs::Mode::empty())
        .map_err(|e| crate::error::Error::io("reopen", Path::new(&link), e.into()))
}

impl UpperFile<'_, '_> {
    /// pwrite of all of `data` at `off`, in as many calls as the filesystem needs; a
    /// failure after some bytes were written is a short write (as write(2) reports it: the
    /// next write gets the error, e.g. ENOSPC).
    pub fn write_at(&self, off: u64, data: &[u8]) -> Result<usize> {
        if data.len() > WRITE_MAX {
            return Err(crate::error::Error::Errno(libc::EINVAL));
        }
        let st = &self.change.store;
        let mut done = 0;
        // Bounded: each round writes at least one byte or ends the loop.
        while done < data.len() {
            let n = match st.write_at(&self.file, off + done as u64, &data[done..]) {
                Ok(n) => n,
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

    /// ftruncate
    pub fn set_len(&self, len: u64) -> Result<()> {
        Ok(self.change.store.set_len(&self.file, len)?)
    }

    /// fchmod of the permission bits (and setuid/setgid/sticky)
    pub fn set_mode(&self, mode: u32) -> Result<()> {
        Ok(self.change.store.fchmod(&self.file, mode & 0o7777)?)
    }

    /// fchown with ids as stored on disk (None leaves that id)
    pub fn set_owner(&self, uid: Option<u32>, gid: Option<u32>) -> Result<()> {
        Ok(self.change.store.fchown(&self.file, uid, gid)?)
    }

    /// futimens
    pub fn set_times(&self, times: &Timestamps) -> Result<()> {
        Ok(self.change.store.futimens(&self.file, times)?)
    }

    /// fallocate with FALLOC_FL_* `mode`
    pub fn allocate(&self, mode: u32, off: u64, len: u64) -> Result<()> {
        Ok(self.change.store.fallocate(&self.file, mode, off, len)?)
    }

    /// fsync (or fdatasync) of the file: skipped without `fsync`; a failure poisons the
    /// upper (see [`super::Upper::check_writable`]).
    pub fn sync(&self, datasync: bool) -> Result<()> {
        sync(self.change, &self.file, datasync)
    }
}

/// fsync or fdatasync of a store file, as one sync step of the upper.
pub(super) fn sync(up: &Upper, f: &StoreFile, datasync: bool) -> Result<()> {
    let st = &up.store;
    if datasync {
        up.sync_step("fdatasync", Path::new(""), || st.fdatasync(f))
    } else {
        up.sync_step("fsync", Path::new(""), || st.fsync_file(f))
    }
}
