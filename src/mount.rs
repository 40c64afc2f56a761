//! Mounting: open and check the layers, daemonize, run the FUSE session, unmount cleanly.
//!
//! Everything that can be checked is checked before the fork, so errors reach the caller's
//! terminal (or podman's stderr pipe) directly. The parent exits 0 only once the child
//! reports the mount live.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fuser::{Config, MountOption, SessionACL};
use rustix::fs::FlockOperation;
use tracing::{debug, info, warn};

use crate::cli::MountArgs;
use crate::config::{self, UpperWork};
use crate::error::{Error, Result};
use crate::fuse::VerlayFs;
use crate::layer::LayerDir;
use crate::lower::verify::{VerifiedLayer, VerifyMode};
use crate::union::{IdMap, IdRange, Union, UnionOptions};
use crate::upper::Upper;

/// Default kernel cache lifetime for entries and attributes. Every change goes through
/// the daemon, which keeps the kernel's view right, so long lifetimes are safe.
const DEFAULT_TTL: Duration = Duration::from_secs(86400);

/// How long a mount waits for the upper's lock before refusing. The daemon of a mount that
/// was just unmounted holds it until it has exited; containerd unmounts a snapshot and
/// mounts it again right away (ctr's temp-mount to read /etc/passwd, then the shim's).
const UPPER_LOCK_WAIT: Duration = Duration::from_secs(3);

/// Take the upper's lock, waiting up to [`UPPER_LOCK_WAIT`] for an exiting daemon.
fn lock_upper(root: &std::os::fd::OwnedFd) -> rustix::io::Result<()> {
    let deadline = std::time::Instant::now() + UPPER_LOCK_WAIT;
    loop {
        match rustix::fs::flock(root, FlockOperation::NonBlockingLockExclusive) {
            Err(rustix::io::Errno::WOULDBLOCK) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            r => return r,
        }
    }
}

/// How long a daemonizing mount waits for its child to report the mount live. The child's
/// part is mount(2), the control socket and the report: milliseconds.
const MOUNT_REPORT_WAIT: Duration = Duration::from_secs(60);
/// How long a daemonizing mount waits for the child it killed to exit.
const CHILD_EXIT_WAIT: Duration = Duration::from_secs(5);
/// Longest report read from the child (a one-line error message).
const MOUNT_REPORT_MAX: u64 = 64 * 1024;

/// Default number of FUSE worker threads.
const DEFAULT_THREADS: usize = 4;

/// Build the union for `args` (opens and checks everything; changes only the work dir).
pub fn open_union(args: &MountArgs) -> Result<Union> {
    let layers = config::validate(args)?;
    let mut lowers = Vec::new();
    for (i, p) in layers.lowers.iter().enumerate() {
        lowers.push(LayerDir::open(p, i + 1, format!("lower{i}"))?);
    }
    let o = &args.opts;
    let upper = match &layers.upper {
        Some(UpperWork { upper: u, work: w }) => {
            let up = Upper::open(u, w, o.fsync && !o.volatile)?;
            if let Err(e) = lock_upper(&up.dir.root) {
                return Err(Error::usage(
                    format!("upperdir \"{}\"", u.display()),
                    format!("already in use by another verlay mount ({e})"),
                    "unmount the other mount first, or use another upperdir",
                ));
            }
            up.check_features()?;
            // After the lock: a live volatile mount of this upper legitimately has a marker.
            up.check_volatile_marker(o.volatile_recover)?;
            let n = up.clean_work()?;
            if n > 0 {
                info!(
                    removed = n,
                    "cleaned leftovers of an earlier run from the work dir"
                );
            }
            Some(up)
        }
        None => None,
    };
    let map = |v: &Vec<crate::cli::IdMapping>| {
        v.iter()
            .map(|m| IdRange {
                container: m.container,
                host: m.host,
                len: m.len,
            })
            .collect::<Vec<_>>()
    };
    let ids = IdMap {
        uids: map(&o.uid_mappings),
        gids: map(&o.gid_mappings),
        squash_uid: if o.squash_to_root {
            Some(0)
        } else {
            o.squash_to_uid
        },
        squash_gid: if o.squash_to_root {
            Some(0)
        } else {
            o.squash_to_gid
        },
    };
    let mode = match o.verify {
        crate::cli::VerifyMode::On => VerifyMode::On,
        crate::cli::VerifyMode::Off => VerifyMode::Off,
        crate::cli::VerifyMode::Require => VerifyMode::Require,
    };
    let mut verified = Vec::new();
    for (i, p) in layers.lowers.iter().enumerate() {
        let v = VerifiedLayer::open(p, mode, crate::estargz::lazy::chunk_source(p)?)?;
        if v.is_some() {
            info!(layer = %p.display(), index = i, "lower layer verified against its manifest");
        }
        verified.push(v.map(Arc::new));
    }
    // Passthrough needs CAP_SYS_ADMIN (FUSE_DEV_IOC_BACKING_OPEN); rootless mounts serve
    // every read and write in the daemon.
    let passthrough = o.passthrough && rustix::process::geteuid().is_root();
    let writeback = o.writeback && upper.is_some();
    Union::new(
        lowers,
        upper,
        UnionOptions {
            ids,
            verified,
            passthrough,
            writeback,
            atime: crate::union::Atime::from_mount_options(o.fuse_options.iter().map(String::as_str)),
        },
    )
}

fn fuse_config(args: &MountArgs, read_only: bool) -> Config {
    let mut opts = vec![
        MountOption::FSName(args.source.clone().unwrap_or_else(|| "verlay".into())),
        MountOption::Subtype("verlay".into()),
        MountOption::DefaultPermissions,
    ];
    if read_only {
        opts.push(MountOption::RO);
    }
    for o in &args.opts.fuse_options {
        let m = match o.as_str() {
            "dev" => MountOption::Dev,
            "nodev" => MountOption::NoDev,
            "suid" => MountOption::Suid,
            "nosuid" => MountOption::NoSuid,
            "exec" => MountOption::Exec,
            "noexec" => MountOption::NoExec,
            "atime" => MountOption::Atime,
            "noatime" => MountOption::NoAtime,
            "sync" => MountOption::Sync,
            "async" => MountOption::Async,
            "dirsync" => MountOption::DirSync,
            "ro" => MountOption::RO,
            // Already implied (allow_other as root, default_permissions always) or
            // meaningless for a FUSE mount (SELinux contexts, relatime...).
            _ => continue,
        };
        if !opts.contains(&m) {
            opts.push(m);
        }
    }
    // As root, behave like a kernel mount (and fuse-overlayfs as root): device nodes and
    // setuid binaries in the layers work, unless the caller said otherwise.
    if rustix::process::geteuid().is_root() {
        if !opts.contains(&MountOption::NoDev) {
            opts.insert(3, MountOption::Dev);
        }
        if !opts.contains(&MountOption::NoSuid) {
            opts.insert(3, MountOption::Suid);
        }
    }
    // Conflicting flags: the later one wins, as with mount(8).
    let mut cfg = Config::default();
    let mut seen: Vec<MountOption> = Vec::new();
    for m in opts.into_iter().rev() {
        let conflict = |a: &MountOption, b: &MountOption| {
            use MountOption::*;
            matches!(
                (a, b),
                (Dev, NoDev)
                    | (NoDev, Dev)
                    | (Suid, NoSuid)
                    | (NoSuid, Suid)
                    | (Exec, NoExec)
                    | (NoExec, Exec)
                    | (Atime, NoAtime)
                    | (NoAtime, Atime)
                    | (Sync, Async)
                    | (Async, Sync)
                    | (RO, RW)
                    | (RW, RO)
            )
        };
        if !seen.iter().any(|s| s == &m || conflict(s, &m)) {
            seen.push(m);
        }
    }
    seen.reverse();
    cfg.mount_options = seen;
    let root = rustix::process::geteuid().is_root();
    let allow_other = root || args.opts.fuse_options.iter().any(|o| o == "allow_other");
    cfg.acl = if allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    cfg.n_threads = Some(args.opts.threads.unwrap_or(DEFAULT_THREADS).max(1));
    cfg.clone_fd = true;
    cfg.io_uring = match args.opts.io_uring {
        crate::cli::IoUring::Auto => fuser::IoUringMode::Auto,
        crate::cli::IoUring::On => fuser::IoUringMode::On,
        crate::cli::IoUring::Off => fuser::IoUringMode::Off,
    };
    cfg
}

/// Mount and serve until unmounted. Daemonizes unless `-f`/`-d`.
pub fn run(args: MountArgs) -> Result<()> {
    let union = open_union(&args)?;
    // Last of the checks, so that a refused mount leaves no marker behind.
    if args.opts.volatile {
        if let Some(up) = &union.upper {
            up.create_volatile_marker()?;
        }
    }
    for o in &args.opts.ignored {
        warn!(option = %o, "unknown option ignored");
    }
    let read_only = union.upper.is_none();
    let cfg = fuse_config(&args, read_only);
    let ttl = args.opts.timeout.unwrap_or(DEFAULT_TTL);
    let foreground = args.foreground || args.debug;
    let mut report = if foreground { None } else { daemonize(&args)? };
    let union = Arc::new(union);
    // Resolved now: once mounted, a stat of the mountpoint would ask this very daemon,
    // which serves nothing until the session runs.
    let canonical_mp = std::fs::canonicalize(&args.mountpoint).unwrap_or_else(|_| args.mountpoint.clone());
    let fs = VerlayFs::new(union.clone(), ttl);
    let session = match fuser::Session::new(fs, &args.mountpoint, &cfg) {
        Ok(s) => s,
        Err(e) => {
            // Nothing was written through a mount that never went live.
            end_volatile(&args, &union);
            let msg = format!("cannot mount: {e} (check that /dev/fuse exists and fusermount3 is installed)");
            if let Some(mut r) = report {
                let _ = r.write_all(msg.as_bytes());
                std::process::exit(1);
            }
            return Err(Error::io(
                "mount",
                &args.mountpoint,
                std::io::Error::other(format!(
                    "cannot mount: {e} (check that /dev/fuse exists and fusermount3 is installed)"
                )),
            ));
        }
    };
    let notifier = session.notifier();
    union.set_invalidator(crate::union::Invalidator(Box::new(move |id| {
        // offset -1: attributes only, no page-cache pages (safe inside a request).
        let _ = notifier.inval_inode(fuser::INodeNo(id), -1, 0);
    })));
    // Held for the life of the session; dropping it removes the socket.
    let _control = match crate::control::serve(union.clone(), &canonical_mp) {
        Ok(c) => Some(c),
        Err(e) => {
            warn!(error = %e, "no control socket: verlay commit will not find this mount");
            None
        }
    };
    if rustix::process::geteuid().is_root() {
        let mp = args.mountpoint.clone();
        std::thread::spawn(move || raise_readahead(&mp));
    }
    match session.io_uring_workers() {
        0 => debug!(io_uring = ?args.opts.io_uring, "requests through /dev/fuse"),
        n => info!(workers = n, "requests through FUSE over io_uring"),
    }
    info!(mountpoint = %args.mountpoint.display(), "mounted");
    if let Some(mut r) = report.take() {
        let _ = crate::sys::detach_stdio();
        let _ = r.write_all(b"ok");
    }
    let mut session = session;
    unmount_on_signals(&mut session, &args.mountpoint)?;
    session
        .run()
        .map_err(|e| Error::io("fuse session", &args.mountpoint, e))?;
    info!("unmounted");
    // The session ended normally (fusermount3 -u, umount, or a signal handled above): a
    // clean stop. A killed daemon never gets here, so its marker stays.
    if let Some(up) = &union.upper {
        up.release_shared_whiteout();
    }
    end_volatile(&args, &union);
    if let Some(up) = &union.upper {
        // Released now, not when the last of our threads has exited: the unmount is already
        // visible, and a remount of this upper right after it must find the lock free.
        let _ = rustix::fs::flock(&up.dir.root, FlockOperation::Unlock);
    }
    Ok(())
}

/// Fork the daemon. The parent waits (bounded) for the child's report that the mount is
/// live, then exits 0, or returns the failure the child reported; the child starts a new
/// session, leaves its caller's directory, and returns the socket to report on.
fn daemonize(args: &MountArgs) -> Result<Option<UnixStream>> {
    let (mut parent_end, child_end) = UnixStream::pair().map_err(|e| Error::io("socketpair", "", e))?;
    let mount_before = mount_id(&args.mountpoint);
    match crate::sys::fork().map_err(|e| Error::io("fork", "", e))? {
        crate::sys::Forked::Parent(pid) => {
            drop(child_end);
            let mut msg = String::new();
            // The child reports at once after mount(2); a caller (podman, containerd)
            // must not wait forever on a child wedged before that. Bounded, and at
            // most MOUNT_REPORT_MAX bytes.
            let _ = parent_end.set_read_timeout(Some(MOUNT_REPORT_WAIT));
            let read = (&mut parent_end).take(MOUNT_REPORT_MAX).read_to_string(&mut msg);
            if msg == "ok" {
                std::process::exit(0);
            }
            if let Err(e) = read {
                if e.kind() == std::io::ErrorKind::WouldBlock {
                    if let Some(child) = rustix::process::Pid::from_raw(pid) {
                        let _ = rustix::process::kill_process(child, rustix::process::Signal::KILL);
                        // Gone before the check below, so a mount(2) it was inside is done.
                        // Bounded: a child stuck in the kernel is left to exit by itself.
                        let until = std::time::Instant::now() + CHILD_EXIT_WAIT;
                        while rustix::process::waitpid(Some(child), rustix::process::WaitOptions::NOHANG)
                            .is_ok_and(|r| r.is_none())
                            && std::time::Instant::now() < until
                        {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                    }
                    // A child wedged after its mount(2) leaves that mount dead (ENOTCONN):
                    // detach it, recognised as a mount that was not there before the fork.
                    let now = mount_id(&args.mountpoint);
                    if now.is_some() && now != mount_before {
                        let _ = rustix::mount::unmount(&args.mountpoint, rustix::mount::UnmountFlags::DETACH);
                    }
                    msg = format!(
                        "the daemon did not report a live mount within {} s; killed it (run with -f -d to see where it stops)",
                        MOUNT_REPORT_WAIT.as_secs()
                    );
                }
            }
            if msg.is_empty() {
                msg = "the daemon exited before the mount was live (run with -f -d to see why)".into();
            }
            Err(Error::io("mount", &args.mountpoint, std::io::Error::other(msg)))
        }
        crate::sys::Forked::Child => {
            drop(parent_end);
            let _ = rustix::process::setsid();
            // A daemon must not keep its caller's directory busy (podman's storage dir).
            let _ = std::env::set_current_dir("/");
            Ok(Some(child_end))
        }
    }
}

/// The id of the mount `path` is on (statx STATX_MNT_ID). With AT_STATX_DONT_SYNC a FUSE
/// mount answers from cached attributes, so a dead or wedged daemon cannot block this.
fn mount_id(path: &Path) -> Option<u64> {
    let flags = rustix::fs::AtFlags::STATX_DONT_SYNC;
    let st = rustix::fs::statx(rustix::fs::CWD, path, flags, rustix::fs::StatxFlags::MNT_ID).ok()?;
    Some(st.stx_mnt_id)
}

/// SIGTERM, SIGINT and SIGHUP unmount the session's mount (lazily when it is busy). Also
/// serves `verlay als serve`'s filesystem.
pub(crate) fn unmount_on_signals<FS: fuser::Filesystem>(
    session: &mut fuser::Session<FS>,
    mountpoint: &Path,
) -> Result<()> {
    let mut unmounter = session.unmount_callable();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ])
    .map_err(|e| Error::io("signal setup", "", e))?;
    let mp = mountpoint.to_path_buf();
    std::thread::spawn(move || {
        for sig in signals.forever() {
            info!(signal = sig, mountpoint = %mp.display(), "unmounting on signal");
            match unmounter.unmount() {
                Ok(()) => break,
                Err(e) => {
                    // Busy (a process has its cwd or a file in the mount): detach it, as
                    // libfuse does; the kernel finishes the unmount when the last user leaves,
                    // and the session ends then.
                    warn!(error = %e, "unmount failed; detaching the mount lazily");
                    match rustix::mount::unmount(&mp, rustix::mount::UnmountFlags::DETACH) {
                        Ok(()) => break,
                        Err(e) => warn!(error = %e, "lazy unmount failed too"),
                    }
                }
            }
        }
    });
    Ok(())
}

/// Readahead of the mount, KiB: as large as one FUSE read request (`fuse::MAX_WRITE`, which
/// also sets max_pages), so a sequential read of a lower file is served in 1 MiB requests.
const READAHEAD_KIB: u32 = crate::fuse::MAX_WRITE / 1024;

/// Raise the mount's readahead from the kernel's default 128 KiB (a sequential read then
/// costs one request per 128 KiB, 8x the requests of 1 MiB). The kernel caps the readahead a
/// FUSE server may ask for in INIT at the default, so it is raised afterwards through the
/// mount's backing device info, as root (`/sys/class/bdi/MAJ:MIN/read_ahead_kb`).
/// The stat waits for INIT to be answered (the session runs on another thread).
fn raise_readahead(mountpoint: &Path) {
    // The device number comes from /proc/self/mountinfo, not from a stat of the mountpoint:
    // a stat is a FUSE request to this very daemon, and a SIGKILL arriving while this thread
    // waits for the answer leaves it in D state on its own connection, so the process never
    // exits and /dev/fuse never closes.
    let info = match std::fs::read_to_string("/proc/self/mountinfo") {
        Ok(t) => t,
        Err(e) => return debug!(error = %e, "readahead: cannot read /proc/self/mountinfo"),
    };
    let Some(dev) = mount_device(&info, mountpoint) else {
        return debug!(mountpoint = %mountpoint.display(), "readahead: mount not in mountinfo");
    };
    let knob = format!("/sys/class/bdi/{dev}/read_ahead_kb");
    match std::fs::write(&knob, READAHEAD_KIB.to_string()) {
        Ok(()) => debug!(path = %knob, bytes = READAHEAD_KIB * 1024, "readahead raised"),
        Err(e) => debug!(path = %knob, error = %e, "readahead left at the kernel's default"),
    }
}

/// The `major:minor` of the last mount on `mountpoint` in a mountinfo text (fields 3 and 5;
/// the kernel escapes space, tab, newline and backslash in paths as `\ooo`).
fn mount_device(mountinfo: &str, mountpoint: &Path) -> Option<String> {
    let want = mountpoint.as_os_str().as_encoded_bytes();
    mountinfo.lines().rev().find_map(|l| {
        let mut f = l.split(' ');
        let dev = f.nth(2)?;
        let mp = f.nth(1)?;
        (unescape_mountinfo(mp) == want).then(|| dev.to_string())
    })
}

fn unescape_mountinfo(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match oct {
            Some(d) => {
                out.push(((d[0] - b'0') << 6) | ((d[1] - b'0') << 3) | (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    out
}

/// At a clean stop of a volatile mount: sync the upper and remove the marker
/// (`Upper::remove_volatile_marker`). On failure the marker stays and the next mount
/// refuses, which is the safe outcome; the failure is logged.
fn end_volatile(args: &MountArgs, union: &Union) {
    if !args.opts.volatile {
        return;
    }
    if let Some(up) = &union.upper {
        if let Err(e) = up.remove_volatile_marker() {
            tracing::error!(step = "volatile.unmark", error = %e,
                "could not sync the upper at the end of a volatile mount; its marker stays");
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn mount_device_reads_the_last_mount_on_a_path_with_escapes() {
        let info = "22 1 8:1 / / rw - ext4 /dev/vda rw\n\
                    40 22 0:50 / /tmp/a\\040b rw - fuse.verlay verlay rw\n\
                    41 40 0:51 / /tmp/a\\040b rw - fuse.verlay verlay rw\n";
        let p = std::path::Path::new("/tmp/a b");
        assert_eq!(super::mount_device(info, p).as_deref(), Some("0:51"));
        assert_eq!(super::mount_device(info, std::path::Path::new("/tmp/a")), None);
        assert_eq!(super::unescape_mountinfo("x\\134y\\0"), b"x\\y\\0".to_vec());
    }
}
