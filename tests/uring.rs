//! FUSE over io_uring (`-o io_uring=auto|on|off`, vendor/fuser/src/uring.rs) on real mounts.
//!
//! - `workload_through_io_uring`: io_uring=on, a small workload (read of a lower file,
//!   create, write of several max_write-sized requests, read back, fsync, readdir, rename,
//!   unlink, mkdir/rmdir, symlink, truncate, xattrs) with every result checked, and proof
//!   that the requests went through the rings (the daemon logs its ring workers and they
//!   wake for the workload); then a clean unmount after which the daemon exits 0.
//! - `kill_9_with_io_uring_ends_the_mount`: the daemon killed by PID; an access fails
//!   (ENOTCONN / ECONNABORTED / ECANCELED) within a bound instead of hanging, and the mount
//!   goes away.
//! - `io_uring_on_without_the_kernel_refuses_auto_falls_back`: with the kernel's
//!   `enable_uring` off, `io_uring=on` refuses to mount and names the switch; `auto` mounts
//!   through /dev/fuse and works.
//!
//! The kernel offers FUSE over io_uring only while `/sys/module/fuse/parameters/enable_uring`
//! is Y (a system-wide switch, off by default). These tests set it as root and put back the
//! value they found (a guard, also on panic); they skip with a message only when the kernel
//! has no such parameter (no `CONFIG_FUSE_IO_URING`) or when not root and it is not already
//! as needed. Tests touching the switch hold one lock, so they do not race each other.
//!
//! Needs root and /dev/fuse. Mounts and daemons are undone by the common Drop guards.

// common's syscall helpers (xattrs, mknod) use libc directly.
#![allow(unsafe_code)]

#[macro_use]
mod common;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use common::{is_mounted, scratch, Mount, Rig};

const KNOB: &str = "/sys/module/fuse/parameters/enable_uring";
/// One test at a time may hold the kernel switch.
static SWITCH: Mutex<()> = Mutex::new(());
/// Requests the workload makes at least (each create/unlink pair is several).
const LOOP_FILES: usize = 150;

/// Sets `enable_uring` and restores what it found on drop.
struct Switch {
    found: String,
    _lock: std::sync::MutexGuard<'static, ()>,
}

impl Drop for Switch {
    fn drop(&mut self) {
        let _ = fs::write(KNOB, &self.found);
    }
}

/// The switch set to `want` ("Y" or "N"), or None (and a message) if this kernel or user
/// cannot have it so.
fn switch(want: &str) -> Option<Switch> {
    let lock = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    let Ok(found) = fs::read_to_string(KNOB) else {
        eprintln!(
            "SKIP: {KNOB} missing: this kernel has no FUSE over io_uring (CONFIG_FUSE_IO_URING, Linux 6.14+)"
        );
        return None;
    };
    let found = found.trim().to_string();
    if found != want {
        if let Err(e) = fs::write(KNOB, want) {
            eprintln!("SKIP: cannot set {KNOB} to {want} ({e}); it is {found}: run as root");
            return None;
        }
    }
    assert_eq!(
        fs::read_to_string(KNOB).unwrap().trim(),
        want,
        "{KNOB} did not take {want}"
    );
    Some(Switch { found, _lock: lock })
}

fn rig(base: &Path) -> Rig {
    let lower = base.join("lower");
    fs::create_dir_all(lower.join("dir")).unwrap();
    fs::write(lower.join("lower.txt"), b"from the lower layer\n").unwrap();
    fs::write(lower.join("dir/inner"), b"inner\n").unwrap();
    Rig::at(
        &[lower],
        &base.join("upper"),
        &base.join("work"),
        &base.join("mnt"),
    )
}

/// Wake-ups (context switches) of the daemon's io_uring worker threads, and their number.
fn ring_wakeups(pid: i32) -> (u64, usize) {
    let mut sum = 0;
    let mut threads = 0;
    for t in fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let comm = fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("fuser-ring-") {
            continue;
        }
        threads += 1;
        let status = fs::read_to_string(t.path().join("status")).unwrap_or_default();
        for l in status.lines() {
            if l.starts_with("voluntary_ctxt_switches:") || l.starts_with("nonvoluntary_ctxt_switches:") {
                sum += l
                    .split_whitespace()
                    .nth(1)
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    (sum, threads)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn xattr_get(p: &Path, name: &str) -> Option<Vec<u8>> {
    let out = std::process::Command::new("getfattr")
        .args(["--only-values", "-n", name])
        .arg(p)
        .output()
        .unwrap();
    out.status.success().then_some(out.stdout)
}

fn run_ok(cmd: &str, args: &[&str], p: &Path) {
    let st = std::process::Command::new(cmd)
        .args(args)
        .arg(p)
        .status()
        .unwrap();
    assert!(st.success(), "{cmd} {args:?} {}", p.display());
}

/// The workload; every result is checked against what was written.
fn workload(m: &Path) {
    assert_eq!(fs::read(m.join("lower.txt")).unwrap(), b"from the lower layer\n");
    assert_eq!(fs::read(m.join("dir/inner")).unwrap(), b"inner\n");
    // Larger than one request (max_write is 1 MiB): several WRITEs and READs, and a size
    // that is not a multiple of a page.
    let data = pattern(3 * (1 << 20) + 4321, 7);
    let f = m.join("big");
    {
        let mut w = fs::File::create(&f).unwrap();
        w.write_all(&data).unwrap();
        w.sync_all().unwrap();
    }
    let mut back = Vec::new();
    fs::File::open(&f).unwrap().read_to_end(&mut back).unwrap();
    assert!(
        back == data,
        "read back differs from what was written ({} vs {} bytes)",
        back.len(),
        data.len()
    );
    assert_eq!(fs::metadata(&f).unwrap().size(), data.len() as u64);
    // copy-up of a lower file by appending
    fs::OpenOptions::new()
        .append(true)
        .open(m.join("lower.txt"))
        .unwrap()
        .write_all(b"more\n")
        .unwrap();
    assert_eq!(
        fs::read(m.join("lower.txt")).unwrap(),
        b"from the lower layer\nmore\n"
    );
    // readdir, rename, unlink
    fs::create_dir(m.join("sub")).unwrap();
    for i in 0..LOOP_FILES {
        fs::write(m.join(format!("sub/f{i:03}")), format!("{i}")).unwrap();
    }
    let listed = names(&m.join("sub"));
    let want: Vec<String> = (0..LOOP_FILES).map(|i| format!("f{i:03}")).collect();
    assert_eq!(listed, want);
    fs::rename(m.join("sub/f000"), m.join("renamed")).unwrap();
    assert_eq!(fs::read_to_string(m.join("renamed")).unwrap(), "0");
    assert!(!m.join("sub/f000").exists());
    for i in 1..LOOP_FILES {
        fs::remove_file(m.join(format!("sub/f{i:03}"))).unwrap();
    }
    assert!(names(&m.join("sub")).is_empty());
    fs::remove_dir(m.join("sub")).unwrap();
    fs::remove_file(m.join("dir/inner")).unwrap();
    assert_eq!(names(&m.join("dir")), Vec::<String>::new());
    // symlink, truncate
    std::os::unix::fs::symlink("renamed", m.join("link")).unwrap();
    assert_eq!(fs::read_link(m.join("link")).unwrap(), PathBuf::from("renamed"));
    fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(10)
        .unwrap();
    assert_eq!(fs::read(&f).unwrap(), &data[..10]);
    // xattrs
    run_ok("setfattr", &["-n", "user.k", "-v", "value1"], &m.join("renamed"));
    assert_eq!(
        xattr_get(&m.join("renamed"), "user.k").as_deref(),
        Some(&b"value1"[..])
    );
    run_ok("setfattr", &["-x", "user.k"], &m.join("renamed"));
    assert_eq!(xattr_get(&m.join("renamed"), "user.k"), None);
    // fsync of a directory
    fs::File::open(m).unwrap().sync_all().unwrap();
    assert_eq!(names(m), vec!["big", "dir", "link", "lower.txt", "renamed"]);
}

#[test]
fn workload_through_io_uring() {
    let Some(_on) = switch("Y") else { return };
    let base = scratch("verlay-uring-");
    let r = rig(base.path());
    // Fails with the daemon's log if it never says it serves through io_uring.
    let mut m: Mount = r
        .launch("io_uring=on")
        .env("RUST_LOG", "info")
        .ready_when_logged("requests through FUSE over io_uring")
        .start();
    // The workers start with the session loop, right after that line.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while ring_wakeups(m.pid()).1 == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let (before, threads) = ring_wakeups(m.pid());
    assert!(threads >= 1, "no fuser-ring-* threads in the daemon");
    workload(&r.mnt);
    let (after, _) = ring_wakeups(m.pid());
    // The workload makes well over 2 * LOOP_FILES requests; idle workers wake once a
    // second, which a few seconds of workload cannot add up to.
    assert!(
        after - before >= 2 * LOOP_FILES as u64,
        "ring workers woke {} times for the workload: requests did not go through io_uring",
        after - before
    );
    m.stop_clean();
    assert!(!is_mounted(&r.mnt));
    // What the workload left is in the upper layer.
    assert_eq!(
        fs::read(r.upper.join("lower.txt")).unwrap(),
        b"from the lower layer\nmore\n"
    );
    assert_eq!(fs::read_to_string(r.upper.join("renamed")).unwrap(), "0");
}

#[test]
fn kill_9_with_io_uring_ends_the_mount() {
    let Some(_on) = switch("Y") else { return };
    let base = scratch("verlay-uring-kill-");
    let r = rig(base.path());
    let mut m = r.mount("io_uring=on");
    assert_eq!(
        fs::read(r.mnt.join("lower.txt")).unwrap(),
        b"from the lower layer\n"
    );
    // Listed and stat'ed before the kill, as any process walking /tmp may do (`find`, `ls
    // -l`): see the probe below.
    assert_eq!(names(&r.mnt), vec!["dir", "lower.txt"]);
    fs::metadata(&r.mnt).unwrap();
    m.kill9();
    // An access must fail, not hang: run it on a thread and bound the wait. It must be one
    // that needs the daemon: the lookup of a name never looked up. Not `read_dir` of the
    // root, as this test had (it failed once, "still answered"): the daemon answers OPENDIR
    // with ENOSYS, after which the kernel opens directories without asking, and opendir(3)'s
    // fstat is served from the kernel's attribute cache (TTL one day), so after a listing
    // and a stat of the root, opendir succeeds on the dead mount.
    let probe = r.mnt.join(format!("never-looked-up-{}", std::process::id()));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(fs::symlink_metadata(&probe).map(|_| ()));
    });
    let res = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("an access to the mount of a killed daemon hung");
    let err = res.expect_err("the mount of a killed daemon still answered");
    // ENOTCONN once the connection is gone, ECONNABORTED for a request its abort ends, and
    // ECANCELED for one the kernel gave to a ring entry the dead daemon had registered
    // before io_uring's exit work cancelled the entries: Linux 6.18 ends that request from
    // the fallback task work (fuse_uring_send_in_task from io_fallback_req_func, seen with
    // the fuse_request_end tracepoint), about 1 run in 25 here.
    assert!(
        matches!(
            err.raw_os_error(),
            Some(libc::ENOTCONN) | Some(libc::ECONNABORTED) | Some(libc::ECANCELED)
        ),
        "unexpected error {err}"
    );
    m.umount_dead();
    assert!(!is_mounted(&r.mnt), "the dead mount is still there");
}

#[test]
fn io_uring_on_without_the_kernel_refuses_auto_falls_back() {
    let Some(_off) = switch("N") else { return };
    let base = scratch("verlay-uring-off-");
    let r = rig(base.path());
    match r.launch("io_uring=on").try_start() {
        Ok(_) => panic!("io_uring=on mounted although the kernel does not offer io_uring"),
        Err((st, log)) => {
            assert!(!st.success());
            assert!(
                log.contains("enable_uring"),
                "the refusal does not name the switch:\n{log}"
            );
        }
    }
    assert!(!is_mounted(&r.mnt));
    let mut m = r.launch("io_uring=auto").env("RUST_LOG", "info").start();
    assert!(!m.log().contains("requests through FUSE over io_uring"));
    assert_eq!(
        fs::read(r.mnt.join("lower.txt")).unwrap(),
        b"from the lower layer\n"
    );
    fs::write(r.mnt.join("new"), b"x").unwrap();
    assert_eq!(fs::read(r.mnt.join("new")).unwrap(), b"x");
    assert_eq!(
        ring_wakeups(m.pid()).1,
        0,
        "ring workers started without io_uring"
    );
    m.stop_clean();
}
