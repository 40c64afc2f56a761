//! The mount table and the process table as the tests read them: /proc/self/mountinfo
//! (escapes undone), the processes serving a mountpoint, liveness of a PID (a zombie counts as
//! gone), and running `fusermount3`/`umount` with a bounded retry of EBUSY.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long an unmount that fails with EBUSY is retried (see [`run_tool`]).
pub const BUSY_RETRY: Duration = Duration::from_secs(5);

/// One entry of /proc/self/mountinfo.
#[derive(Debug, Clone)]
pub struct MountEntry {
    pub mount_point: String,
    /// Per-mount options (field 6): rw, noatime, nosuid...
    pub mount_opts: String,
    pub fstype: String,
    pub source: String,
}

/// Undo mountinfo's octal escapes (`\040` for a space).
pub fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal =
            b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c));
        if octal {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mount table entries of this mount namespace, in mount order.
pub fn mounts() -> Vec<MountEntry> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let pre: Vec<&str> = pre.split(' ').collect();
            let post: Vec<&str> = post.split(' ').collect();
            Some(MountEntry {
                mount_point: unescape_mountinfo(pre.get(4)?),
                mount_opts: pre.get(5)?.to_string(),
                fstype: post.first()?.to_string(),
                source: unescape_mountinfo(post.get(1)?),
            })
        })
        .collect()
}

/// The topmost mount on `mnt`, if any.
pub fn mount_entry(mnt: &Path) -> Option<MountEntry> {
    let want = mnt.to_string_lossy();
    mounts().into_iter().rev().find(|m| m.mount_point == want)
}

/// Is `mnt` a mount point now (in this process's mount namespace)?
pub fn is_mounted(mnt: &Path) -> bool {
    mount_entry(mnt).is_some()
}

/// argv of a live process, or `None` when it is gone.
pub fn cmdline(pid: i32) -> Option<Vec<String>> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// Every PID in /proc but this process's.
pub fn other_pids() -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .filter(|pid| *pid != me)
        .collect()
}

/// PIDs (not ours) whose command line has `mnt` as an argument: the daemon serving it.
pub fn daemon_pids(mnt: &Path) -> Vec<i32> {
    let want = mnt.as_os_str().as_bytes();
    other_pids()
        .into_iter()
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .map(|cmd| cmd.split(|b| *b == 0).any(|a| a == want))
                .unwrap_or(false)
        })
        .collect()
}

/// Alive and not a zombie: a daemon reparented to a PID 1 that does not reap stays a zombie
/// after exiting, and that counts as gone.
pub fn pid_alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')),
        Err(_) => false,
    }
}

/// Wait until `pid` is gone; false on timeout.
pub fn wait_gone(pid: i32, timeout: Duration) -> bool {
    let start = Instant::now();
    while pid_alive(pid) {
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// SIGKILL `pid` (a process this test started or saw serving its own mountpoint).
pub fn kill9(pid: i32) {
    if let Some(p) = rustix::process::Pid::from_raw(pid) {
        let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
    }
}

/// Run `tool ARGS` (fusermount3, umount) and return whether it succeeded.
///
/// EBUSY is retried for up to [`BUSY_RETRY`]: while a test had a file open in its mount, a
/// sibling test (they run in parallel threads of one process) may have forked, and its child
/// holds a copy of that fd, pinning the mount, until it execs.
pub fn run_tool(tool: &str, args: &[&Path]) -> bool {
    let start = Instant::now();
    loop {
        let out = Command::new(tool).args(args).stdin(Stdio::null()).output();
        let Ok(out) = out else {
            return false;
        };
        if out.status.success() {
            return true;
        }
        let err = String::from_utf8_lossy(&out.stderr);
        if !err.contains("busy") || start.elapsed() > BUSY_RETRY {
            eprintln!("{tool} {args:?}: {}: {err}", out.status);
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
