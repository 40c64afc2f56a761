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
