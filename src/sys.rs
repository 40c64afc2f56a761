//! The only module with `unsafe`: process-level calls that rustix does not wrap safely.
#![allow(unsafe_code)]

use std::io;

/// Result of [`fork`].
pub enum Forked {
    /// in the parent, with the child's pid
    Parent(i32),
    /// in the child
    Child,
}

/// fork(2). Must be called while the process has a single thread: the child gets only
/// the calling thread, and locks held by others would stay locked forever.
pub fn fork() -> io::Result<Forked> {
    // SAFETY: called from main before any thread is spawned (the daemonizing path runs
    // before tracing, signal or FUSE threads exist), so the child inherits no lock held by
    // another thread; the child only continues ordinary Rust code.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        p => Ok(Forked::Parent(p)),
    }
}

/// Point stdin, stdout and stderr at /dev/null, so a daemon holds no pipe of its caller
/// (podman reads the mount program's stderr until EOF).
pub fn detach_stdio() -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    for fd in 0..3 {
        // SAFETY: dup2 on two valid fds; `null` outlives the calls, and fds 0-2 are ours.
        if unsafe { libc::dup2(null.as_raw_fd(), fd) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Map a whole file read-only (a layer manifest).
pub fn map_readonly(file: &std::fs::File) -> io::Result<memmap2::Mmap> {
    // SAFETY: the mapping is only unsound if the file changes while mapped. A layer manifest
    // is never modified in place: it is written to a temp file and renamed over the old
    // one, so the inode mapped here keeps its bytes for as long as the map lives; the map
    // is read-only and private to this process.
    unsafe { memmap2::Mmap::map(file) }
}

/// Give freed heap memory back to the kernel (glibc keeps it otherwise), so the daemon's
/// RSS falls when the kernel forgets inodes.
pub fn release_free_memory() {
    // SAFETY: malloc_trim only walks glibc's own arenas under their locks; it takes no
    // pointers from us and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Syscall number of getxattrat(2) (Linux 6.13): new syscalls share one number on every
/// architecture, and libc 0.2 does not name this one yet.
const SYS_GETXATTRAT: libc::c_long = 464;

/// getxattrat's argument block (`struct xattr_args` in linux/xattr.h).
#[repr(C)]
struct XattrArgs {
    value: u64,
    size: u32,
    flags: u32,
}

/// Set once the kernel has answered ENOSYS: older kernels and seccomp filters that do not
/// know the call; callers then go through /proc/self/fd.
static NO_GETXATTRAT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// getxattrat(2) of `path` under `dir`, not following a final symlink: the xattr's size
/// (with an empty `buf`: the size it needs). `None` when the kernel lacks the call.
pub fn getxattrat(
    dir: std::os::fd::BorrowedFd<'_>,
    path: &std::ffi::CStr,
    name: &std::ffi::CStr,
    buf: &mut [u8],
) -> Option<Result<usize, rustix::io::Errno>> {
    use std::os::fd::AsRawFd;
    use std::sync::atomic::Ordering;
    if NO_GETXATTRAT.load(Ordering::Relaxed) {
        return None;
    }
    let mut args = XattrArgs {
        value: buf.as_mut_ptr() as u64,
        size: buf.len() as u32,
        flags: 0,
    };
    // SAFETY: `path` and `name` are NUL-terminated and live across the call; `args` points
    // at `buf`, which the kernel writes at most `args.size` = buf.len() bytes into; the
    // size passed is the struct's own, as the syscall's extensible-struct ABI wants.
    let r = unsafe {
        libc::syscall(
            SYS_GETXATTRAT,
            dir.as_raw_fd(),
            path.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW as libc::c_uint,
            name.as_ptr(),
            &mut args as *mut XattrArgs,
            std::mem::size_of::<XattrArgs>(),
        )
    };
    if r >= 0 {
        return Some(Ok(r as usize));
    }
    let e = rustix::io::Errno::from_io_error(&io::Error::last_os_error()).unwrap_or(rustix::io::Errno::IO);
    if e == rustix::io::Errno::NOSYS {
        NO_GETXATTRAT.store(true, Ordering::Relaxed);
        return None;
    }
    Some(Err(e))
}
