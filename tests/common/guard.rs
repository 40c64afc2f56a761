//! Mount bookkeeping shared by the test binaries that spawn verlay daemons themselves
//! (`#[path = "common/guard.rs"] mod guard;`): is a path mounted, and the teardown that every
//! daemon guard runs on Drop, also when a test panics.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Is `mnt` a mount point now (in this process's mount namespace)?
pub fn is_mounted(mnt: &Path) -> bool {
    let want = mnt.to_string_lossy();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(&*want))
}

/// Unmount `mnt` if it is mounted (`fusermount3 -u`, falling back to a lazy umount for a
/// dead mount), then wait up to `wait` for `child` (the daemon we started) to exit, and kill it
/// (by PID, through its handle) if it did not.
pub fn unmount_and_reap(mnt: &Path, child: Option<Child>, wait: Duration) {
    if is_mounted(mnt) {
        let ok = Command::new("fusermount3")
            .arg("-u")
            .arg(mnt)
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(mnt).status();
        }
    }
    if let Some(mut c) = child {
        let start = Instant::now();
        while start.elapsed() < wait {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}
