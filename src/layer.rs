//! Read access to one real directory tree: a lower layer, or the upper as seen for reading.
//!
//! A layer is addressed by a root directory fd opened before the mount, and paths relative
//! to it. Paths never pass through the mountpoint, so a lower dir beneath the mountpoint
//! cannot deadlock the daemon (fuse-overlayfs #364). Everything here only reads.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirEntryExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags, Stat};

use crate::error::{Error, NotFoundOk, Result};

/// The kind of a filesystem object, as the union sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// regular file
    File,
    /// directory
    Dir,
    /// symbolic link
    Symlink,
    /// named pipe
    Fifo,
    /// character device (a 0/0 one is a whiteout, never shown)
    Char,
    /// block device
    Block,
    /// unix socket
    Socket,
}

impl Kind {
    /// Kind from the `S_IFMT` bits of a mode.
    pub fn from_mode(mode: u32) -> Kind {
        match mode & libc::S_IFMT {
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFCHR => Kind::Char,
            libc::S_IFBLK => Kind::Block,
            libc::S_IFSOCK => Kind::Socket,
            _ => Kind::File,
        }
    }

    /// Kind from a `d_type` of a directory entry, if it says.
    pub fn from_file_type(t: std::fs::FileType) -> Option<Kind> {
        use std::os::unix::fs::FileTypeExt;
        Some(if t.is_dir() {
            Kind::Dir
        } else if t.is_file() {
            Kind::File
        } else if t.is_symlink() {
            Kind::Symlink
        } else if t.is_fifo() {
            Kind::Fifo
        } else if t.is_char_device() {
            Kind::Char
        } else if t.is_block_device() {
            Kind::Block
        } else if t.is_socket() {
            Kind::Socket
        } else {
            return None;
        })
    }
}

/// Prefix of OCI whiteout names (`.wh.NAME` hides NAME in the layers below).
pub const OCI_WHITEOUT_PREFIX: &str = ".wh.";
/// OCI opaque marker: a directory holding this entry hides everything below it.
pub const OCI_OPAQUE_MARKER: &str = ".wh..wh..opq";

/// Is this stat a kernel-format whiteout (char device 0/0)?
pub fn is_whiteout_stat(st: &Stat) -> bool {
    Kind::from_mode(st.st_mode) == Kind::Char && st.st_rdev == 0
}

/// Path argument for *at syscalls: the layer root itself is ".".
pub fn at_path(rel: &Path) -> &Path {
    if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    }
}

/// One directory entry of a real layer directory.
#[derive(Debug, Clone)]
pub struct RawEntry {
    /// entry name
    pub name: OsString,
    /// kind from d_type (None if the filesystem did not say)
    pub kind: Option<Kind>,
    /// d_ino
    pub ino: u64,
}

/// A real directory tree addressed through a root fd.
#[derive(Debug)]
pub struct LayerDir {
    /// fd of the layer's root directory, opened before mounting
    pub root: OwnedFd,
    /// the path the user gave, for messages
    pub path: PathBuf,
    /// `/proc/self/fd/N`: for the calls that have no *at form (xattrs, read_dir)
    proc_root: PathBuf,
    /// st_dev of the root
    pub dev: u64,
    /// position in the stack: 0 = upper (if any) or top lower; used in st_ino mapping
    pub index: usize,
    /// short name for logs: "upper" or "lower0", "lower1", ...
    pub name: String,
}

impl LayerDir {
    /// Open a layer root. `path` must be an existing directory.
    pub fn open(path: &Path, index: usize, name: String) -> Result<LayerDir> {
        let root = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io("open layer", path, e.into()))?;
        let st = rustix::fs::fstat(&root).map_err(|e| Error::io("stat layer", path, e.into()))?;
        let proc_root = PathBuf::from(format!("/proc/self/fd/{}", root.as_raw_fd()));
        Ok(LayerDir {
            root,
            path: path.to_path_buf(),
            proc_root,
            dev: st.st_dev,
            index,
            name,
        })
    }

    /// Absolute path through /proc for calls without an *at form.
    pub fn proc_path(&self, rel: &Path) -> PathBuf {
        if rel.as_os_str().is_empty() {
            // "/proc/self/fd/N" itself is a symlink: l*xattr would act on it, not on the
            // directory. "/proc/self/fd/N/." is the directory.
            self.proc_root.join(".")
        } else {
            self.proc_root.join(rel)
        }
    }

    /// lstat; `None` when the path does not exist (or passes through a non-directory).
    pub fn stat(&self, rel: &Path) -> Result<Option<Stat>> {
        match rustix::fs::statat(&self.root, at_path(rel), AtFlags::SYMLINK_NOFOLLOW) {
            Err(rustix::io::Errno::NOTDIR) => Ok(None),
            r => r.not_found_ok(),
        }
    }

    /// Does `rel` exist (any type)?
    pub fn exists(&self, rel: &Path) -> Result<bool> {
        Ok(self.stat(rel)?.is_some())
    }

    /// Open a file in the layer.
    pub fn open_file(&self, rel: &Path, flags: OFlags) -> Result<OwnedFd> {
        rustix::fs::openat(
            &self.root,
            at_path(rel),
            flags | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
        )
        .map_err(Error::from)
    }

    /// Target of a symlink.
    pub fn readlink(&self, rel: &Path) -> Result<OsString> {
        let target = rustix::fs::readlinkat(&self.root, at_path(rel), Vec::new())?;
        Ok(OsString::from(std::ffi::OsStr::from_bytes(target.as_bytes())))
    }

    /// List a directory (without "." and "..").
    pub fn read_dir(&self, rel: &Path) -> Result<Vec<RawEntry>> {
        let p = self.proc_path(rel);
        let rd = std::fs::read_dir(&p).map_err(|e| Error::io("readdir", rel, e))?;
        let mut out = Vec::new();
        for ent in rd {
            let ent = ent.map_err(|e| Error::io("readdir", rel, e))?;
            out.push(RawEntry {
                name: ent.file_name(),
                kind: ent.file_type().ok().and_then(Kind::from_file_type),
                ino: ent.ino(),
            });
        }
        Ok(out)
    }

    /// One xattr's value, `None` when absent (ENODATA) or unsupported.
    pub fn get_xattr(&self, rel: &Path, name: &OsStr) -> Result<Option<Vec<u8>>> {
        // getxattrat walks only `rel`; the /proc/self/fd path costs a walk through procfs
        // (pid and fd revalidation) on every call.
        if let (Ok(path), Ok(cname)) = (
            std::ffi::CString::new(at_path(rel).as_os_str().as_bytes()),
            std::ffi::CString::new(name.as_bytes()),
        ) {
            // A kernel without getxattrat (ENOSYS) falls through to the /proc path.
            let got = xattr_sized(XATTR_SIZE_MAX, rel, "getxattrat", |buf| {
                crate::sys::getxattrat(self.root.as_fd(), &path, &cname, buf)
                    .unwrap_or(Err(rustix::io::Errno::NOSYS))
            });
            match absent_as_none(got) {
                // Older seccomp profiles refuse unknown syscalls with EPERM, not ENOSYS:
                // ask again the old way, which gives the real answer either way.
                Err(Error::Errno(libc::ENOSYS | libc::EPERM)) => {}
                r => return r,
            }
        }
        let p = self.proc_path(rel);
        get_xattr_path(&p, name)
    }

    /// All xattr names of an object (not following symlinks).
    pub fn list_xattr(&self, rel: &Path) -> Result<Vec<OsString>> {
        let p = self.proc_path(rel);
        list_xattr_path(&p)
    }

    /// fd for fstatfs and the like.
    pub fn root_fd(&self) -> impl AsFd + '_ {
        &self.root
    }
}

/// Linux's cap on one xattr value (XATTR_SIZE_MAX in linux/limits.h): a buffer this large
/// always holds any value the kernel can return.
pub const XATTR_SIZE_MAX: usize = 65536;
/// Linux's cap on an object's list of xattr names (XATTR_LIST_MAX).
pub const XATTR_LIST_MAX: usize = 65536;
/// First buffer for a value or a list: most objects have none or short ones, and a call with
/// a small buffer is as cheap as a size query, so sizing costs a second call only for long ones.
const XATTR_FIRST_BUF: usize = 1024;

/// Runs an xattr call that fills a buffer, at most twice: with a small buffer, then (after
/// ERANGE) with the kernel's maximum, which no value or list can exceed. No size query: a
/// query's answer can be stale by the next call (a concurrent setxattr), and retrying until
/// the sizes agree is a loop without a bound. A second ERANGE is EIO with one log line.
fn xattr_sized(
    max: usize,
    rel: &Path,
    op: &'static str,
    mut call: impl FnMut(&mut [u8]) -> std::result::Result<usize, rustix::io::Errno>,
) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; XATTR_FIRST_BUF];
    match call(&mut buf) {
        Ok(n) => {
            buf.truncate(n);
            return Ok(buf);
        }
        Err(rustix::io::Errno::RANGE) => {}
        Err(e) => return Err(Error::Errno(e.raw_os_error())),
    }
    buf = vec![0u8; max];
    match call(&mut buf) {
        Ok(n) => {
            buf.truncate(n);
            Ok(buf)
        }
        Err(rustix::io::Errno::RANGE) => {
            tracing::error!(op, path = %rel.display(), bytes = max, "xattr larger than the kernel's maximum buffer");
            Err(Error::Errno(libc::EIO))
        }
        Err(e) => Err(Error::Errno(e.raw_os_error())),
    }
}

/// ENODATA (no such xattr) and ENOTSUP (the filesystem has none) as `None`.
fn absent_as_none(got: Result<Vec<u8>>) -> Result<Option<Vec<u8>>> {
    match got {
        Ok(v) => Ok(Some(v)),
        Err(Error::Errno(libc::ENODATA | libc::EOPNOTSUPP)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// lgetxattr of a path (here always a /proc/self/fd/N/... path), sized by [`xattr_sized`];
/// ENODATA / ENOTSUP → None.
pub fn get_xattr_path(p: &Path, name: &OsStr) -> Result<Option<Vec<u8>>> {
    absent_as_none(xattr_sized(XATTR_SIZE_MAX, p, "lgetxattr", |buf| {
        rustix::fs::lgetxattr(p, name, buf)
    }))
}

/// llistxattr of a path, sized by [`xattr_sized`], split into names; ENOTSUP → no names.
pub fn list_xattr_path(p: &Path) -> Result<Vec<OsString>> {
    let buf = match xattr_sized(XATTR_LIST_MAX, p, "llistxattr", |buf| {
        rustix::fs::llistxattr(p, buf)
    }) {
        Ok(v) => v,
        Err(Error::Errno(libc::EOPNOTSUPP)) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(buf
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| OsStr::from_bytes(s).to_os_string())
        .collect())
}

/// pread of any fd until `buf` is full or EOF; the bytes read.
pub fn pread_full(fd: impl AsFd, buf: &mut [u8], offset: u64) -> Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        let n = rustix::io::pread(fd.as_fd(), &mut buf[got..], offset + got as u64)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(got)
}

/// A plain read of up to `size` bytes at `offset`.
pub fn read_at(fd: impl AsFd, offset: u64, size: u32) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; size as usize];
    let got = pread_full(fd, &mut buf, offset)?;
    buf.truncate(got);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bound of the sizing: a call that keeps answering ERANGE (a value that grows past
    /// every buffer) is made twice, then EIO; never a third call.
    #[test]
    fn xattr_sizing_makes_at_most_two_calls() {
        let mut sizes = Vec::new();
        let got = xattr_sized(XATTR_SIZE_MAX, Path::new("f"), "test", |buf| {
            sizes.push(buf.len());
            Err(rustix::io::Errno::RANGE)
        });
        assert!(matches!(got, Err(Error::Errno(libc::EIO))), "{got:?}");
        assert_eq!(sizes, [XATTR_FIRST_BUF, XATTR_SIZE_MAX], "the calls made");
        let mut calls = 0;
        let got = xattr_sized(XATTR_LIST_MAX, Path::new("f"), "test", |buf| {
            calls += 1;
            if buf.len() < 2000 {
                return Err(rustix::io::Errno::RANGE);
            }
            buf[..2000].fill(b'a');
            Ok(2000)
        });
        assert_eq!(got.expect("second call fits").len(), 2000);
        assert_eq!(calls, 2);
    }

    #[test]
    fn get_xattr_reads_values_of_any_size_and_never_follows_a_final_symlink() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path();
        std::fs::create_dir(root.join("d")).expect("mkdir");
        std::fs::write(root.join("d/f"), b"x").expect("write");
        std::os::unix::fs::symlink("f", root.join("d/s")).expect("symlink");
        let big: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        for (p, v) in [("", &b"root"[..]), ("d/f", &big[..])] {
            rustix::fs::lsetxattr(root.join(p), "user.t", v, rustix::fs::XattrFlags::empty())
                .expect("lsetxattr");
        }
        let layer = LayerDir::open(root, 1, "l".into()).expect("open");
        let get = |p: &str| layer.get_xattr(Path::new(p), OsStr::new("user.t")).expect(p);
        assert_eq!(get("").as_deref(), Some(&b"root"[..]), "the layer root");
        assert_eq!(
            get("d/f"),
            Some(big.clone()),
            "a value larger than the first buffer"
        );
        assert_eq!(get("d"), None, "absent");
        assert_eq!(get("d/s"), None, "the symlink itself, not its target");
        assert!(
            layer
                .get_xattr(Path::new("d/nope"), OsStr::new("user.t"))
                .is_err(),
            "a missing path is an error, not an absent xattr"
        );
    }

    /// The copy-up livelock (issue 13): after ERANGE, rustix's slice API answers a size query
    /// with an empty buffer by 0, so the old sizing loop retried with a 1-byte buffer forever.
    /// Values past the first buffer, up to the largest one ext4 keeps in an inode, and name
    /// lists past 1 KiB, through the /proc path copy-up uses and through getxattrat.
    #[test]
    fn xattr_values_and_name_lists_of_any_size_come_back_whole() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path();
        // ext4 keeps all of an inode's xattrs in one 4 KiB block: one value per file.
        let sizes = [0usize, 1, 255, 256, 257, 300, 1023, 1024, 1025, 2000, 3900];
        for size in sizes {
            let f = root.join(format!("v{size}"));
            std::fs::write(&f, b"x").expect("write");
            let v: Vec<u8> = (0..size).map(|j| (j % 251) as u8).collect();
            rustix::fs::lsetxattr(&f, "user.v", &v, rustix::fs::XattrFlags::empty()).expect("lsetxattr");
        }
        // 30 names of ~100 bytes: a list of ~3 KiB
        std::fs::write(root.join("f"), b"x").expect("write");
        let names: Vec<String> = (0..30).map(|i| format!("user.{i:0>95}")).collect();
        for name in &names {
            rustix::fs::lsetxattr(
                root.join("f"),
                name.as_str(),
                b"",
                rustix::fs::XattrFlags::empty(),
            )
            .expect("lsetxattr");
        }
        let layer = LayerDir::open(root, 1, "l".into()).expect("open");
        for size in sizes {
            let rel = format!("v{size}");
            let want: Vec<u8> = (0..size).map(|j| (j % 251) as u8).collect();
            let proc = layer.proc_path(Path::new(&rel));
            let n = OsStr::new("user.v");
            assert_eq!(
                get_xattr_path(&proc, n).expect("get"),
                Some(want.clone()),
                "{size} bytes via /proc"
            );
            assert_eq!(
                layer.get_xattr(Path::new(&rel), n).expect("get"),
                Some(want),
                "{size} bytes via getxattrat"
            );
        }
        let proc = layer.proc_path(Path::new("f"));
        let listed = list_xattr_path(&proc).expect("list");
        let total: usize = listed.iter().map(|n| n.len() + 1).sum();
        assert!(
            total > 1024,
            "the list is longer than the first buffer ({total} bytes)"
        );
        assert_eq!(listed.len(), names.len(), "every name listed");
        for name in &names {
            assert!(listed.iter().any(|n| n == OsStr::new(name)), "{name} listed");
        }
    }
}
