//! Bounds and fallbacks of the daemon that no workload reaches by itself, each exercised on a
//! real mount:
//!
//! - `copy_up_from_another_filesystem_reads_and_writes_keeping_holes`: a copy-up from a lower
//!   layer on another filesystem (a tmpfs under an ext4 upper), where copy_file_range(2) fails
//!   with EXDEV, takes `upper::copy_data`'s read/write fallback (its 1 MiB buffer several times
//!   over), and the copy keeps the data and the holes of the lower file.
//! - `a_daemon_that_never_reports_is_killed_after_the_wait`: a daemonizing mount whose child
//!   mounts and then never reports (strace's fault injection stops it with SIGSTOP right
//!   after its mount(2)) fails after `MOUNT_REPORT_WAIT` (60 s) with a message naming the
//!   wait, kills the child, detaches the dead mount it made, and leaves no daemon behind.
//!   Takes 60 s.
//!
//! Not here: `control::MAX_FREEZE` (a commit client silent for 600 s while it holds the
//! freeze): ten minutes of a frozen mount is too long for the suite, and the limit has no
//! knob to shorten it.
//!
//! Needs root, /dev/fuse and strace (the tests say why they skip without it). Mounts and
//! daemons are undone by Drop guards, also on panic.

#[macro_use]
mod common;

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::proc::{kill9, pid_alive};
use common::{daemon_pids, is_mounted, scratch, verlay_bin, Mount, Rig, WAIT};

/// copy_by_read's buffer in src/upper/mod.rs: each extent longer than this takes several
/// read/write rounds.
const COPY_BUF: usize = 1 << 20;
/// The daemonizing parent's wait for its child's report (src/mount.rs MOUNT_REPORT_WAIT).
const REPORT_WAIT: Duration = Duration::from_secs(60);

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
        .collect()
}

/// strace attached to a running process (all its threads), recording `calls` to a file.
struct Trace {
    child: Option<Child>,
    out: PathBuf,
}

impl Trace {
    fn attach(pid: i32, calls: &str, dir: &Path) -> Trace {
        let out = dir.join("strace.out");
        let err = dir.join("strace.err");
        let child = Command::new("strace")
            .args(["-f", "-e", &format!("trace={calls}"), "-o"])
            .arg(&out)
            .args(["-p", &pid.to_string()])
            .stdin(Stdio::null())
            .stderr(File::create(&err).unwrap())
            .spawn()
            .unwrap();
        let mut t = Trace {
            child: Some(child),
            out,
        };
        // strace says "Process N attached with M threads" once it holds all of them.
        let start = Instant::now();
        while !fs::read_to_string(&err).unwrap_or_default().contains("attached") {
            assert!(start.elapsed() < WAIT, "strace did not attach");
            if let Some(Ok(Some(st))) = t.child.as_mut().map(Child::try_wait) {
                panic!(
                    "strace exited with {st}: {}",
                    fs::read_to_string(&err).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        t
    }

    /// Detach; the trace's lines.
    fn finish(mut self) -> Vec<String> {
        if let Some(mut c) = self.child.take() {
            let pid = rustix::process::Pid::from_child(&c);
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::INT);
            let _ = c.wait();
        }
        let text = fs::read_to_string(&self.out).unwrap_or_default();
        text.lines().map(str::to_string).collect()
    }
}

/// Lazily unmounts whatever is mounted at a path, on drop.
struct Detach(PathBuf);

impl Drop for Detach {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

impl Drop for Trace {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn copy_up_from_another_filesystem_reads_and_writes_keeping_holes() {
    require_tools!("strace");
    let base = scratch("verlay-bounds-");
    let lower = base.path().join("lower");
    let _tmpfs = Mount::fs(&["-t", "tmpfs", "-o", "size=64m", "tmpfs"], &lower);
    // data (3 buffers and a bit), a 2 MiB hole, data (1.5 buffers), a trailing hole
    let first = pattern(3 * COPY_BUF + 1234, 1);
    let second = pattern(COPY_BUF + COPY_BUF / 2, 2);
    let second_at = 5 * COPY_BUF as u64;
    let size = 9 * COPY_BUF as u64;
    {
        let f = File::create(lower.join("big")).unwrap();
        f.write_all_at(&first, 0).unwrap();
        f.write_all_at(&second, second_at).unwrap();
        f.set_len(size).unwrap();
    }
    let r = Rig::at(
        std::slice::from_ref(&lower),
        &base.path().join("upper"),
        &base.path().join("work"),
        &base.path().join("mnt"),
    );
    assert_ne!(
        fs::metadata(&lower).unwrap().dev(),
        fs::metadata(base.path()).unwrap().dev(),
        "the lower must be on another filesystem than the upper"
    );
    let _m = r.mount("");
    let trace = Trace::attach(_m.pid(), "copy_file_range,pread64,pwrite64", base.path());
    // The copy-up: an append through the mount.
    OpenOptions::new()
        .append(true)
        .open(r.mnt.join("big"))
        .unwrap()
        .write_all(b"+")
        .unwrap();
    let lines = trace.finish();
    let exdev = lines
        .iter()
        .filter(|l| l.contains("copy_file_range(") && l.contains("EXDEV"))
        .count();
    let reads = lines.iter().filter(|l| l.contains("pread64(")).count();
    eprintln!("copy-up: {exdev} copy_file_range EXDEV, {reads} pread64");
    assert!(
        exdev >= 1 && reads >= 6,
        "expected copy_file_range to fail with EXDEV and the read/write fallback (>= 6 reads of \
         at most 1 MiB), got {exdev} EXDEV and {reads} reads:\n{}",
        lines.join("\n")
    );
    // The copy: the lower's bytes, its holes still holes, then the append.
    let mut want = vec![0u8; size as usize];
    want[..first.len()].copy_from_slice(&first);
    want[second_at as usize..second_at as usize + second.len()].copy_from_slice(&second);
    want.push(b'+');
    let got = fs::read(r.upper.join("big")).unwrap();
    assert!(
        got == want,
        "the copied-up file differs from the lower file plus the append"
    );
    assert_eq!(fs::read(r.mnt.join("big")).unwrap().len(), want.len());
    let allocated = fs::metadata(r.upper.join("big")).unwrap().blocks() * 512;
    let data = (first.len() + second.len()) as u64;
    assert!(
        allocated < data + 2 * COPY_BUF as u64,
        "holes were filled: {allocated} bytes allocated for {data} bytes of data in a {size}-byte file"
    );
    // The lower file is untouched.
    assert_eq!(fs::metadata(lower.join("big")).unwrap().len(), size);
}

#[test]
fn a_daemon_that_never_reports_is_killed_after_the_wait() {
    require_tools!("strace");
    let base = scratch("verlay-bounds-");
    let lower = base.path().join("lower");
    fs::create_dir_all(&lower).unwrap();
    fs::write(lower.join("f"), b"x").unwrap();
    let r = Rig::at(
        &[lower],
        &base.path().join("upper"),
        &base.path().join("work"),
        &base.path().join("mnt"),
    );
    // Whatever the outcome, no mount stays behind this test.
    let _detach = Detach(r.mnt.clone());
    // The launcher (no -f) forks the daemon; strace follows it and stops the daemon with
    // SIGSTOP right after its mount(2): mounted, and never reporting.
    let start = Instant::now();
    let mut launcher = Command::new("strace")
        .args(["-f", "-qq", "-o", "/dev/null", "-e", "trace=mount"])
        .arg("--inject=mount:signal=SIGSTOP")
        .arg(verlay_bin())
        .args(["-o", &r.opts("")])
        .arg(&r.mnt)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = launcher.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
            let _ = tx.send((start.elapsed(), line));
        }
    });
    let bound = REPORT_WAIT + 2 * WAIT;
    let st = loop {
        if let Some(st) = launcher.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > bound {
            let _ = launcher.kill();
            let _ = launcher.wait();
            for pid in daemon_pids(&r.mnt) {
                kill9(pid);
            }
            panic!("the launcher did not end within {bound:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!st.success(), "the launcher succeeded");
    let lines: Vec<(Duration, String)> = rx.try_iter().collect();
    let refusal = lines
        .iter()
        .find(|(_, l)| l.contains("did not report a live mount within 60 s"))
        .unwrap_or_else(|| panic!("no refusal naming the wait: {lines:?}"));
    assert!(
        refusal.0 >= REPORT_WAIT && refusal.0 < REPORT_WAIT + Duration::from_secs(10),
        "gave up after {:?}, not after the {REPORT_WAIT:?} wait",
        refusal.0
    );
    assert!(!is_mounted(&r.mnt), "the daemon's dead mount was left behind");
    // The daemon was killed (SIGKILL from the launcher): nothing serves the mountpoint.
    let deadline = Instant::now() + WAIT;
    while daemon_pids(&r.mnt).into_iter().any(pid_alive) {
        assert!(Instant::now() < deadline, "the daemon outlived its launcher");
        std::thread::sleep(Duration::from_millis(50));
    }
}
