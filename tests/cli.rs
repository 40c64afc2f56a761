//! The `verlay` command as podman, containerd and mount.fuse3 run it, on real FUSE mounts.
//!
//! Protects: a rejected command line prints one `verlay: what: why (fix)` line, exits 2 and
//! changes nothing on disk; an upper in use by a live mount is refused without disturbing it;
//! the launcher exits 0 only once the mount is live and leaves its caller's pipes at EOF (podman
//! reads stderr to EOF); `-f` stays in the foreground; `fusermount3 -u`, `umount` and SIGTERM
//! unmount and end the daemon; fuse-overlayfs's option strings (podman's exact ones, relative
//! and symlinked lowerdirs, the `SOURCE MOUNTPOINT` form, unknown and kernel options) mount;
//! id mappings and squashing show and store the right owners; `--help` lists every option the
//! parser accepts; the workdir is cleaned at mount.
//!
//! Needs root and /dev/fuse. Every test works in its own temp dirs; its [`Sandbox`] unmounts
//! whatever is mounted under them and ends the verlay processes it started (found by PID in
//! /proc, since the launcher exits), also when the test panics.

#[macro_use]
mod common;

use std::cell::RefCell;
use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::hash::{Hash, Hasher};
use std::io::Read;
use std::os::unix::fs::{chown, symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rustix::io::Errno;
use rustix::process::{Pid, Signal};
use tempfile::TempDir;

use common::proc::{cmdline, mount_entry, mounts, other_pids, pid_alive, run_tool, wait_gone};
use common::{is_mounted, Launch, Mount};

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_verlay");

/// How long a launcher may take to mount (or refuse) and exit.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a daemon may take to exit once its mount is gone.
const DAEMON_EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long after the launcher exits its stdout/stderr pipes may stay open. The daemon must
/// not hold them at all; this only absorbs scheduling delay of the reader threads.
const PIPE_EOF_TIMEOUT: Duration = Duration::from_secs(3);
/// Host ids the mapping tests store on disk (podman's first subuid is often 100000; any
/// non-root id shows the translation).
const HOST_ID: u32 = 1000;

// ---------------------------------------------------------------------------------------------
// processes and the mount table

/// Processes running the binary under test (argv[0] as we spawn it), not this one.
fn verlay_pids() -> Vec<(i32, Vec<String>)> {
    other_pids()
        .into_iter()
        .filter(|pid| pid_alive(*pid))
        .filter_map(|pid| Some((pid, cmdline(pid)?)))
        .filter(|(_, argv)| argv.first().map(String::as_str) == Some(BIN))
        .collect()
}

/// The verlay processes serving `mnt` (given on their command line as that exact path).
fn daemons_of(mnt: &Path) -> Vec<i32> {
    let want = mnt.to_string_lossy();
    verlay_pids()
        .into_iter()
        .filter(|(_, argv)| argv.iter().skip(1).any(|a| *a == want))
        .map(|(pid, _)| pid)
        .collect()
}

/// The one daemon serving `mnt`; panics when there is none or several.
fn daemon_of(mnt: &Path) -> i32 {
    let pids = daemons_of(mnt);
    assert_eq!(
        pids.len(),
        1,
        "expected one verlay daemon serving {}, found {pids:?}",
        mnt.display()
    );
    pids[0]
}

fn signal(pid: i32, sig: Signal) {
    let pid = Pid::from_raw(pid).expect("a positive pid");
    rustix::process::kill_process(pid, sig).expect("signal a process this test started");
}

/// Write a file from a short-lived child process, so that this process never holds an fd
/// into the mount that a sibling test's fork could inherit (see [`run_tool`]); used where a
/// test then asks the daemon itself to unmount.
fn write_from_child(path: &Path, content: &str) {
    let ok = Command::new("sh")
        .args(["-c", "printf %s \"$2\" > \"$1\"", "sh"])
        .arg(path)
        .arg(content)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "write {} from a child process", path.display());
}

fn errno_of(e: &std::io::Error) -> Option<Errno> {
    e.raw_os_error().map(Errno::from_raw_os_error)
}

// ---------------------------------------------------------------------------------------------
// the launcher

/// A finished run of the binary.
#[derive(Debug)]
struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    /// The mountpoint was in /proc/self/mountinfo right when the launcher was reaped.
    mounted_at_exit: bool,
    /// Both pipes reached EOF within [`PIPE_EOF_TIMEOUT`] of the launcher exiting.
    pipes_eof: bool,
}

impl Finished {
    fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

/// Run `verlay ARGS` with stdout and stderr as pipes (as podman does) and wait for it to exit.
/// `mnt` is checked in the mount table the moment the launcher is reaped.
fn launch(args: &[OsString], cwd: Option<&Path>, mnt: Option<&Path>) -> Finished {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    if let Some(cwd) = cwd {
        cmd.current_dir(cwd);
    }
    launch_command(cmd, mnt)
}

/// [`launch`] for a prepared command (e.g. verlay under a wrapper).
fn launch_command(mut cmd: Command, mnt: Option<&Path>) -> Finished {
    let args: Vec<_> = cmd.get_args().map(|a| a.to_os_string()).collect();
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("RUST_LOG")
        .env_remove("VERLAY_LOG_FILE");
    let mut child = cmd.spawn().expect("spawn verlay");
    let pid = child.id() as i32;

    let (pipe_tx, pipe_rx) = mpsc::channel::<(u8, Vec<u8>)>();
    let readers: [(u8, Box<dyn Read + Send>); 2] = [
        (1, Box::new(child.stdout.take().expect("stdout pipe"))),
        (2, Box::new(child.stderr.take().expect("stderr pipe"))),
    ];
    for (fd, mut pipe) in readers {
        let tx = pipe_tx.clone();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            let _ = tx.send((fd, buf));
        });
    }
    drop(pipe_tx);

    let (exit_tx, exit_rx) = mpsc::channel();
    let mnt_owned = mnt.map(Path::to_path_buf);
    std::thread::spawn(move || {
        let status = child.wait();
        // First thing after the reap: did the launcher exit before its mount was live?
        let mounted = mnt_owned.as_deref().is_some_and(is_mounted);
        let _ = exit_tx.send((status, mounted));
    });
    let (status, mounted_at_exit) = match exit_rx.recv_timeout(LAUNCH_TIMEOUT) {
        Ok((status, mounted)) => (status.expect("wait for verlay"), mounted),
        Err(_) => {
            signal(pid, Signal::KILL);
            panic!("verlay {args:?} did not exit within {LAUNCH_TIMEOUT:?}");
        }
    };

    let deadline = Instant::now() + PIPE_EOF_TIMEOUT;
    let (mut stdout, mut stderr) = (None, None);
    while stdout.is_none() || stderr.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        match pipe_rx.recv_timeout(left) {
            Ok((1, out)) => stdout = Some(String::from_utf8_lossy(&out).into_owned()),
            Ok((_, err)) => stderr = Some(String::from_utf8_lossy(&err).into_owned()),
            Err(_) => break,
        }
    }
    let pipes_eof = stdout.is_some() && stderr.is_some();
    Finished {
        status,
        stdout: stdout.unwrap_or_else(|| "<pipe still open>".into()),
        stderr: stderr.unwrap_or_else(|| "<pipe still open>".into()),
        mounted_at_exit,
        pipes_eof,
    }
}

fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

/// `-o OPTS MNT`, the fuse-overlayfs form.
fn o_args(opts: &str, mnt: &Path) -> Vec<OsString> {
    vec!["-o".into(), opts.into(), mnt.into()]
}

// ---------------------------------------------------------------------------------------------
// the sandbox: temp dirs, and cleanup of everything mounted or started in them

/// A private directory tree with `l1 l2 u w m` (two lowers, upper, workdir, mountpoint).
/// Drop unmounts every mount under it and ends the verlay processes that name it, by PID.
struct Sandbox {
    dir: TempDir,
    /// More private dirs (e.g. on /dev/shm) that belong to this test.
    extra: Vec<TempDir>,
    /// Foreground verlay processes this test spawned, each under the common mount guard.
    children: RefCell<Vec<Mount>>,
}

impl Sandbox {
    fn new() -> Sandbox {
        let dir = tempfile::tempdir().expect("create temp dir");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        let sb = Sandbox {
            dir,
            extra: Vec::new(),
            children: RefCell::new(Vec::new()),
        };
        for d in ["l1", "l2", "u", "w", "m"] {
            sb.mkdir(d);
        }
        sb
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Create a directory (and parents), mode 0755.
    fn mkdir(&self, rel: &str) -> PathBuf {
        let p = self.p(rel);
        fs::create_dir_all(&p).expect("mkdir");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).expect("chmod");
        p
    }

    fn write(&self, rel: &str, content: &str) -> PathBuf {
        let p = self.p(rel);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).expect("mkdir parent");
        }
        fs::write(&p, content).expect("write");
        p
    }

    /// `lowerdir=l1:l2,upperdir=u,workdir=w` with absolute paths.
    fn rw_opts(&self) -> String {
        format!(
            "lowerdir={}:{},upperdir={},workdir={}",
            self.p("l1").display(),
            self.p("l2").display(),
            self.p("u").display(),
            self.p("w").display()
        )
    }

    /// Every private root of this test.
    fn roots(&self) -> Vec<PathBuf> {
        let mut roots = vec![self.dir.path().to_path_buf()];
        roots.extend(self.extra.iter().map(|d| d.path().to_path_buf()));
        roots
    }

    /// Run the launcher and require a live mount on `mnt`: exit 0, mounted at exit, pipes at
    /// EOF. Returns the daemon's PID.
    fn mount(&self, args: &[OsString], cwd: Option<&Path>, mnt: &Path) -> i32 {
        let f = launch(args, cwd, Some(mnt));
        assert!(
            f.code() == Some(0) && f.mounted_at_exit && f.pipes_eof,
            "verlay {args:?} should have mounted {}: {f:#?}",
            mnt.display()
        );
        daemon_of(mnt)
    }

    /// `verlay -o OPTS MNT`, requiring success.
    fn mount_o(&self, opts: &str, mnt: &Path) -> i32 {
        self.mount(&o_args(opts, mnt), None, mnt)
    }

    /// Spawn `verlay -f ARGS` and wait for the mount; returns its PID. The process stays ours.
    fn spawn_foreground(&self, args: &[OsString], mnt: &Path) -> i32 {
        let m = Launch::verlay_argv(args, mnt)
            .log(&self.p("foreground.log"))
            .timeout(LAUNCH_TIMEOUT)
            .start();
        let pid = m.pid();
        self.children.borrow_mut().push(m);
        pid
    }

    /// Wait for a foreground child of this sandbox to exit and return its status.
    fn wait_child(&self, pid: i32, timeout: Duration) -> Option<ExitStatus> {
        let mut children = self.children.borrow_mut();
        let child = children
            .iter_mut()
            .find(|c| c.pid() == pid)
            .expect("a child of this sandbox");
        child.wait_within(timeout)
    }

    /// The verlay processes that name one of this sandbox's dirs (or run in one).
    fn own_processes(&self) -> Vec<i32> {
        let prefixes: Vec<String> = self.roots().iter().map(|r| format!("{}/", r.display())).collect();
        // Options carry paths inside a longer argument (`lowerdir=/tmp/x/l1:...`).
        let under = |s: &str| prefixes.iter().any(|p| s.contains(p.as_str()));
        verlay_pids()
            .into_iter()
            .filter(|(pid, argv)| {
                let cwd = fs::read_link(format!("/proc/{pid}/cwd"))
                    .map(|c| format!("{}/", c.display()))
                    .unwrap_or_default();
                argv.iter().skip(1).any(|a| under(a)) || under(&cwd)
            })
            .map(|(pid, _)| pid)
            .collect()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Unmount deepest first, so a mount on top of another comes off before it.
        let prefixes: Vec<String> = self.roots().iter().map(|r| format!("{}/", r.display())).collect();
        let mut ours: Vec<String> = mounts()
            .into_iter()
            .map(|m| m.mount_point)
            .filter(|mp| prefixes.iter().any(|p| mp.starts_with(p.as_str())))
            .collect();
        ours.sort_by_key(|mp| std::cmp::Reverse(mp.len()));
        for mp in ours {
            let mp = PathBuf::from(mp);
            if !run_tool("fusermount3", &[Path::new("-u"), &mp]) && is_mounted(&mp) {
                run_tool("umount", &[Path::new("-l"), &mp]);
            }
        }
        for pid in self.own_processes() {
            if !wait_gone(pid, Duration::from_secs(5)) {
                let _ = Pid::from_raw(pid).map(|p| rustix::process::kill_process(p, Signal::KILL));
            }
        }
        // The foreground children's guards unmount (already done) and reap them by PID.
        self.children.get_mut().clear();
    }
}

// ---------------------------------------------------------------------------------------------
// on-disk snapshots

/// Everything about a tree that a mount attempt could change, except atimes: per entry its
/// type and mode, owner, link count, size, mtime, ctime (which also moves on xattr and
/// permission changes), content digest or link target, and xattrs.
fn snapshot(roots: &[PathBuf]) -> BTreeMap<PathBuf, String> {
    fn rec(p: &Path, out: &mut BTreeMap<PathBuf, String>) {
        let Ok(md) = fs::symlink_metadata(p) else {
            out.insert(p.to_path_buf(), "<gone>".into());
            return;
        };
        let body = if md.is_file() {
            let mut h = DefaultHasher::new();
            fs::read(p).unwrap_or_default().hash(&mut h);
            format!("data {:016x}", h.finish())
        } else if md.file_type().is_symlink() {
            format!("-> {:?}", fs::read_link(p).unwrap_or_default())
        } else {
            String::new()
        };
        out.insert(
            p.to_path_buf(),
            format!(
                "{:o} {}:{} n{} s{} m{}.{} c{}.{} {body} xattrs[{}]",
                md.mode(),
                md.uid(),
                md.gid(),
                md.nlink(),
                md.size(),
                md.mtime(),
                md.mtime_nsec(),
                md.ctime(),
                md.ctime_nsec(),
                xattrs(p)
            ),
        );
        if md.is_dir() {
            let mut names: Vec<PathBuf> = fs::read_dir(p)
                .map(|rd| rd.flatten().map(|e| e.path()).collect())
                .unwrap_or_default();
            names.sort();
            for child in names {
                rec(&child, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    for r in roots {
        rec(r, &mut out);
    }
    out
}

/// `name=digest` for each xattr of `p` (not following symlinks).
fn xattrs(p: &Path) -> String {
    let mut list = vec![0u8; 1 << 16];
    let Ok(n) = rustix::fs::llistxattr(p, &mut list[..]) else {
        return "?".into();
    };
    let mut out = Vec::new();
    for name in list[..n].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let name = String::from_utf8_lossy(name).into_owned();
        let mut value = vec![0u8; 1 << 16];
        let v = rustix::fs::lgetxattr(p, name.as_str(), &mut value[..])
            .map(|len| format!("{:?}", &value[..len]))
            .unwrap_or_else(|e| format!("<{e}>"));
        out.push(format!("{name}={v}"));
    }
    out.sort();
    out.join(",")
}

/// Print the entries that differ between two snapshots.
fn snapshot_diff(before: &BTreeMap<PathBuf, String>, after: &BTreeMap<PathBuf, String>) -> String {
    let mut lines = Vec::new();
    for (p, b) in before {
        match after.get(p) {
            Some(a) if a == b => {}
            Some(a) => lines.push(format!("  changed {}:\n    was {b}\n    now {a}", p.display())),
            None => lines.push(format!("  removed {}", p.display())),
        }
    }
    for p in after.keys().filter(|p| !before.contains_key(*p)) {
        lines.push(format!("  created {}", p.display()));
    }
    lines.join("\n")
}

#[test]
fn snapshot_sees_every_change_a_refused_mount_could_make() {
    let sb = Sandbox::new();
    sb.write("w/work/f", "x");
    let roots = sb.roots();
    let xattr = |name: &str| rustix::fs::lsetxattr(sb.p("u"), name, b"v", rustix::fs::XattrFlags::empty());
    for what in ["mkdir", "write", "chmod", "xattr", "unlink", "rmdir"] {
        let before = snapshot(&roots);
        match what {
            "mkdir" => fs::create_dir(sb.p("w/new")).expect("mkdir"),
            "write" => fs::write(sb.p("w/work/f"), "y").expect("write"),
            "chmod" => fs::set_permissions(sb.p("u"), fs::Permissions::from_mode(0o700)).expect("chmod"),
            "xattr" => xattr("user.k").or_else(|_| xattr("trusted.k")).expect("setxattr"),
            "unlink" => fs::remove_file(sb.p("w/work/f")).expect("unlink"),
            _ => fs::remove_dir(sb.p("l2")).expect("rmdir"),
        }
        assert_ne!(snapshot(&roots), before, "snapshot missed a {what}");
    }
}

// ---------------------------------------------------------------------------------------------
// 1. bad input: one line, exit 2, nothing changed
// tests/cli/refusals.rs
#[path = "cli/refusals.rs"]
mod refusals;

// ---------------------------------------------------------------------------------------------
// 2. an upper in use

#[test]
fn upper_in_use_by_a_live_mount_is_refused_and_the_mount_keeps_working() {
    let sb = Sandbox::new();
    sb.write("l1/hello", "from the lower");
    let mnt = sb.p("m");
    let daemon = sb.mount_o(&sb.rw_opts(), &mnt);
    // A crash leftover would look like this; only a mount that owns the upper may clean it,
    // so a refused second mount must leave it (and the live mount's scratch files) alone.
    let marker = sb.write("w/work/marker-of-the-live-mount", "x");

    sb.mkdir("w2");
    for (name, work) in [("same workdir", sb.p("w")), ("another workdir", sb.p("w2"))] {
        let mnt2 = sb.mkdir(&format!("m-{}", name.replace(' ', "-")));
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            sb.p("l1").display(),
            sb.p("u").display(),
            work.display()
        );
        let f = launch(&o_args(&opts, &mnt2), None, Some(&mnt2));
        assert!(
            f.code().is_some_and(|c| c != 0),
            "{name}: second mount of a live upper succeeded: {f:#?}"
        );
        assert!(
            f.stderr.contains("in use") && f.stderr.contains(&*sb.p("u").to_string_lossy()),
            "{name}: the message should say the upperdir is in use: {:?}",
            f.stderr
        );
        assert!(f.pipes_eof, "{name}: pipes left open: {f:#?}");
        assert!(!is_mounted(&mnt2), "{name}: second mount is live");
        assert_eq!(
            daemons_of(&mnt2),
            Vec::<i32>::new(),
            "{name}: a second daemon runs"
        );
    }

    assert!(
        marker.exists(),
        "the refused mount cleaned the live mount's workdir"
    );
    assert!(pid_alive(daemon), "the first daemon died");
    assert_eq!(
        fs::read_to_string(mnt.join("hello")).expect("read through the first mount"),
        "from the lower"
    );
    fs::write(mnt.join("new"), "still writable").expect("write through the first mount");
    assert_eq!(
        fs::read_to_string(sb.p("u/new")).expect("read the upper"),
        "still writable"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. daemonizing

#[test]
fn launcher_exits_0_only_once_mounted_and_leaves_no_pipe_open() {
    let sb = Sandbox::new();
    sb.write("l2/f", "lower");
    let mnt = sb.p("m");
    let f = launch(&o_args(&sb.rw_opts(), &mnt), None, Some(&mnt));
    assert_eq!(f.code(), Some(0), "{f:#?}");
    assert!(
        f.mounted_at_exit,
        "the launcher exited before {} was in the mount table",
        mnt.display()
    );
    assert!(
        f.pipes_eof,
        "stdout/stderr not at EOF {PIPE_EOF_TIMEOUT:?} after the launcher exited: the daemon \
         holds its caller's pipes (podman would hang)"
    );
    assert_eq!((f.stdout.as_str(), f.stderr.as_str()), ("", ""));

    let daemon = daemon_of(&mnt);
    for fd in 0..3 {
        let target = fs::read_link(format!("/proc/{daemon}/fd/{fd}")).expect("daemon fd");
        assert_eq!(target, Path::new("/dev/null"), "daemon fd {fd}");
    }
    assert_eq!(fs::read_to_string(mnt.join("f")).expect("read"), "lower");
    let entry = mount_entry(&mnt).expect("mounted");
    assert!(entry.fstype.starts_with("fuse"), "{entry:?}");
}

#[test]
fn foreground_mount_keeps_the_process_and_exits_0_on_sigterm_and_sigint() {
    for sig in [Signal::TERM, Signal::INT] {
        let sb = Sandbox::new();
        sb.write("l1/f", "x");
        let mnt = sb.p("m");
        let pid = sb.spawn_foreground(&o_args(&sb.rw_opts(), &mnt), &mnt);
        std::thread::sleep(Duration::from_millis(200));
        assert!(pid_alive(pid), "verlay -f left the foreground");
        assert_eq!(daemons_of(&mnt), vec![pid], "verlay -f forked a daemon");
        assert_eq!(fs::read_to_string(mnt.join("f")).expect("read"), "x");

        signal(pid, sig);
        let st = sb
            .wait_child(pid, DAEMON_EXIT_TIMEOUT)
            .unwrap_or_else(|| panic!("verlay -f still running {DAEMON_EXIT_TIMEOUT:?} after {sig:?}"));
        assert_eq!(st.code(), Some(0), "{sig:?}: a clean unmount exits 0");
        assert!(!is_mounted(&mnt), "{sig:?}: still mounted");
    }
}

/// Run `verlay [-f] -o OPTS MNT` in a private mount namespace where /dev/fuse is a regular
/// file: every check before mounting passes and the FUSE mount itself fails (EINVAL), in the
/// daemon after the fork or, with `-f`, in the process itself. `None` when this host cannot
/// make such a namespace.
fn launch_with_broken_dev_fuse(sb: &Sandbox, foreground: bool) -> Option<Finished> {
    let fake = sb.write("not-dev-fuse", "");
    let probe = Command::new("unshare")
        .args(["-m", "sh", "-c"])
        .args(["mount --bind \"$1\" /dev/fuse", "sh"])
        .arg(&fake)
        .stderr(Stdio::null())
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!("skipped: cannot bind-mount over /dev/fuse in a private mount namespace");
        return None;
    }
    let mnt = sb.p("m");
    let mut cmd = Command::new("unshare");
    // `exec` keeps one process whose argv[0] is BIN, so the sandbox can find and end it.
    cmd.args(["-m", "sh", "-c"])
        .args(["mount --bind \"$1\" /dev/fuse && shift && exec \"$@\"", "sh"])
        .arg(&fake)
        .arg(BIN);
    if foreground {
        cmd.arg("-f");
    }
    cmd.args(o_args(&sb.rw_opts(), &mnt));
    Some(launch_command(cmd, Some(&mnt)))
}

#[test]
fn failed_mount_exits_1_with_the_reason_and_leaves_nothing_running() {
    for foreground in [false, true] {
        let sb = Sandbox::new();
        let Some(f) = launch_with_broken_dev_fuse(&sb, foreground) else {
            return;
        };
        let mode = if foreground { "-f" } else { "daemon" };
        assert!(f.pipes_eof, "{mode}: pipes left open: {f:#?}");
        assert!(!f.mounted_at_exit, "{mode}: mounted: {f:#?}");
        let line = f.stderr.trim_end();
        assert!(
            f.stderr.ends_with('\n') && !line.contains('\n') && line.starts_with("verlay: "),
            "{mode}: expected one `verlay: ` line: {:?}",
            f.stderr
        );
        assert!(
            line.contains(&*sb.p("m").to_string_lossy()) && line.contains("cannot mount"),
            "{mode}: the message should name the mountpoint and the failure: {line:?}"
        );
        assert_eq!(
            sb.own_processes(),
            Vec::<i32>::new(),
            "{mode}: a process survived"
        );
        assert_eq!(
            f.code(),
            Some(1),
            "{mode}: --help: 1 = the mount failed, 2 = bad command line, nothing changed"
        );
    }
}

#[test]
fn mount_table_shows_type_fuse_verlay() {
    let sb = Sandbox::new();
    let mnt = sb.p("m");
    sb.mount_o(&sb.rw_opts(), &mnt);
    let entry = mount_entry(&mnt).expect("mounted");
    // What `mount -t fuse3.verlay`, findmnt -t and fstab users expect, and what libfuse
    // programs such as fuse-overlayfs (`fuse.fuse-overlayfs`) show.
    assert_eq!(entry.fstype, "fuse.verlay", "{entry:?}");
}

// ---------------------------------------------------------------------------------------------
// 4. unmount paths

/// Mount, write through the mount, unmount with `unmount`, and check the daemon exits, the
/// write is in the upper and the upper can be mounted again (its lock was released).
fn check_unmount_path(unmount: impl Fn(&Path, i32)) {
    let sb = Sandbox::new();
    let mnt = sb.p("m");
    let daemon = sb.mount_o(&sb.rw_opts(), &mnt);
    write_from_child(&mnt.join("written"), "kept");

    unmount(&mnt, daemon);
    assert!(
        wait_gone(daemon, DAEMON_EXIT_TIMEOUT),
        "the daemon {daemon} still runs {DAEMON_EXIT_TIMEOUT:?} after the unmount"
    );
    assert!(!is_mounted(&mnt), "still mounted");
    assert_eq!(fs::read_to_string(sb.p("u/written")).expect("upper"), "kept");

    sb.mount_o(&sb.rw_opts(), &mnt);
    assert_eq!(fs::read_to_string(mnt.join("written")).expect("remount"), "kept");
}

#[test]
fn fusermount3_u_unmounts_and_the_daemon_exits() {
    check_unmount_path(|mnt, _| {
        assert!(
            run_tool("fusermount3", &[Path::new("-u"), mnt]),
            "fusermount3 -u failed"
        );
    });
}

#[test]
fn umount_unmounts_and_the_daemon_exits() {
    check_unmount_path(|mnt, _| assert!(run_tool("umount", &[mnt]), "umount failed"));
}

#[test]
fn sigterm_to_the_daemon_unmounts_and_it_exits() {
    check_unmount_path(|_, daemon| signal(daemon, Signal::TERM));
}

#[test]
fn sigterm_while_busy_still_ends_the_daemon_once_idle() {
    // fuse-overlayfs (libfuse) leaves its loop on SIGTERM and detaches the mount lazily, so a
    // busy mount never keeps it running; podman and systemd send SIGTERM and expect an exit.
    let sb = Sandbox::new();
    sb.write("l1/f", "x");
    let mnt = sb.p("m");
    let daemon = sb.mount_o(&sb.rw_opts(), &mnt);
    let mut holder = Command::new("sleep")
        .arg("60")
        .current_dir(&mnt)
        .spawn()
        .expect("spawn a process with its cwd in the mount");
    std::thread::sleep(Duration::from_millis(100));
    signal(daemon, Signal::TERM);
    std::thread::sleep(Duration::from_millis(300));
    let _ = holder.kill();
    let _ = holder.wait();
    // Whether the first SIGTERM detached the mount or had to give up, the mount is idle now
    // and a second SIGTERM, as any supervisor retries, must end the daemon.
    if pid_alive(daemon) {
        signal(daemon, Signal::TERM);
    }
    assert!(
        wait_gone(daemon, DAEMON_EXIT_TIMEOUT),
        "the daemon still runs {DAEMON_EXIT_TIMEOUT:?} after SIGTERM (mounted: {})",
        is_mounted(&mnt)
    );
    assert!(!is_mounted(&mnt), "still mounted after the daemon exited");
}

// ---------------------------------------------------------------------------------------------
// 5. option compatibility

#[test]
fn podman_option_string_with_relative_symlinked_lowers_mounts() {
    // podman's overlay driver: cwd = the storage's overlay dir, lowerdir=l/SHORT:l/SHORT
    // with l/SHORT -> ../<id>/diff, an empty option (`,,`) before volatile, and sometimes a
    // trailing comma.
    let sb = Sandbox::new();
    let graph = sb.mkdir("overlay");
    sb.write("overlay/aaa/diff/f", "top");
    sb.write("overlay/bbb/diff/f", "bottom");
    sb.write("overlay/bbb/diff/g", "only below");
    sb.mkdir("overlay/ccc/diff");
    sb.mkdir("overlay/ccc/work");
    let merged = sb.mkdir("overlay/ccc/merged");
    sb.mkdir("overlay/l");
    symlink("../aaa/diff", sb.p("overlay/l/AAAA")).expect("symlink");
    symlink("../bbb/diff", sb.p("overlay/l/BBBB")).expect("symlink");

    for (i, opts) in [
        "lowerdir=l/AAAA:l/BBBB,upperdir=ccc/diff,workdir=ccc/work,,volatile",
        "lowerdir=l/AAAA:l/BBBB,upperdir=ccc/diff,workdir=ccc/work,,volatile,",
    ]
    .into_iter()
    .enumerate()
    {
        let daemon = sb.mount(&o_args(opts, &merged), Some(&graph), &merged);
        assert_eq!(fs::read_to_string(merged.join("f")).expect("f"), "top", "{opts}");
        assert_eq!(
            fs::read_to_string(merged.join("g")).expect("g"),
            "only below",
            "{opts}"
        );
        let name = format!("written{i}");
        fs::write(merged.join(&name), opts).expect("write through the mount");
        assert_eq!(
            fs::read_to_string(sb.p("overlay/ccc/diff").join(&name)).expect("upper"),
            opts,
            "the write did not land in the relative upperdir"
        );
        assert!(run_tool("fusermount3", &[Path::new("-u"), &merged]), "unmount");
        assert!(wait_gone(daemon, DAEMON_EXIT_TIMEOUT), "daemon still runs");
    }
    // The symlinks are followed, not replaced or written through.
    assert_eq!(
        fs::read_link(sb.p("overlay/l/AAAA")).expect("link"),
        Path::new("../aaa/diff")
    );
    assert!(
        !sb.p("overlay/aaa/diff/written0").exists(),
        "a write reached a lower"
    );
}

#[test]
fn mount_fuse3_source_mountpoint_form_mounts_and_shows_the_source() {
    let sb = Sandbox::new();
    sb.write("l1/f", "x");
    let mnt = sb.p("m");
    let args = vec![
        OsString::from("overlay"),
        mnt.clone().into(),
        "-o".into(),
        sb.rw_opts().into(),
    ];
    sb.mount(&args, None, &mnt);
    assert_eq!(fs::read_to_string(mnt.join("f")).expect("read"), "x");
    let entry = mount_entry(&mnt).expect("mounted");
    assert_eq!(entry.source, "overlay", "{entry:?}");
}

#[test]
fn unknown_options_are_tolerated_and_reported() {
    let sb = Sandbox::new();
    let mnt = sb.p("m");
    let opts = format!(
        "{},frobnicate,zork=1,userxattr,x-systemd.automount,defaults",
        sb.rw_opts()
    );
    let f = launch(&o_args(&opts, &mnt), None, Some(&mnt));
    assert!(f.code() == Some(0) && f.mounted_at_exit, "{f:#?}");
    assert!(
        f.stderr.contains("frobnicate") && f.stderr.contains("zork"),
        "unknown options should be reported: {:?}",
        f.stderr
    );
    fs::write(mnt.join("ok"), "").expect("write");
}

#[test]
fn kernel_mount_flags_dev_suid_noatime_rw_are_accepted() {
    let sb = Sandbox::new();
    let mnt = sb.p("m");
    sb.mount_o(&format!("{},dev,suid,noatime,rw", sb.rw_opts()), &mnt);
    let entry = mount_entry(&mnt).expect("mounted");
    let flags: Vec<&str> = entry.mount_opts.split(',').collect();
    for want in ["rw", "noatime"] {
        assert!(flags.contains(&want), "{want} missing from {entry:?}");
    }
    for unwanted in ["nodev", "nosuid", "ro"] {
        assert!(!flags.contains(&unwanted), "{unwanted} in {entry:?}");
    }
    fs::write(mnt.join("ok"), "").expect("write");
}

#[test]
fn lowerdir_only_mount_is_read_only() {
    let sb = Sandbox::new();
    sb.write("l1/f", "top");
    sb.write("l2/d/g", "below");
    let mnt = sb.p("m");
    let opts = format!("lowerdir={}:{}", sb.p("l1").display(), sb.p("l2").display());
    sb.mount_o(&opts, &mnt);
    assert_eq!(fs::read_to_string(mnt.join("d/g")).expect("read"), "below");
    let create = fs::File::create(mnt.join("new")).expect_err("create on a read-only mount");
    assert_eq!(errno_of(&create), Some(Errno::ROFS), "create: {create}");
    let mkdir = fs::create_dir(mnt.join("newdir")).expect_err("mkdir on a read-only mount");
    assert_eq!(errno_of(&mkdir), Some(Errno::ROFS), "mkdir: {mkdir}");
    let write = fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("f"))
        .expect_err("open for writing on a read-only mount");
    assert_eq!(errno_of(&write), Some(Errno::ROFS), "open O_WRONLY: {write}");
    assert_eq!(fs::read_to_string(sb.p("l1/f")).expect("lower"), "top");
}

// ---------------------------------------------------------------------------------------------
// 6. owners: id mappings and squashing

#[test]
fn uid_gid_mapping_translates_owners_both_ways() {
    let sb = Sandbox::new();
    let owned = sb.write("l1/owned", "x");
    chown(&owned, Some(HOST_ID), Some(HOST_ID)).expect("chown");
    let other = sb.write("l1/other", "x");
    chown(&other, Some(HOST_ID + 5), Some(HOST_ID + 3)).expect("chown");
    let dir = sb.mkdir("l1/dir");
    chown(&dir, Some(HOST_ID), Some(HOST_ID)).expect("chown");
    chown(sb.p("u"), Some(HOST_ID), Some(HOST_ID)).expect("chown upper");

    let mnt = sb.p("m");
    let map = format!("uidmapping=0:{HOST_ID}:10,gidmapping=0:{HOST_ID}:10");
    sb.mount_o(&format!("{},{map}", sb.rw_opts()), &mnt);

    let owner = |p: &Path| {
        let md = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display()));
        (md.uid(), md.gid())
    };
    assert_eq!(
        owner(&mnt.join("owned")),
        (0, 0),
        "lower file owned by {HOST_ID}:{HOST_ID}"
    );
    assert_eq!(
        owner(&mnt.join("other")),
        (5, 3),
        "lower file owned by host +5:+3"
    );
    assert_eq!(owner(&mnt.join("dir")), (0, 0), "lower dir");
    assert_eq!(owner(&mnt), (0, 0), "merged root (upper owned by the host id)");

    fs::write(mnt.join("created"), "by root").expect("create through the mount");
    fs::create_dir(mnt.join("dir/sub")).expect("mkdir through the mount");
    assert_eq!(
        owner(&mnt.join("created")),
        (0, 0),
        "new file seen through the mount"
    );
    assert_eq!(owner(&sb.p("u/created")), (HOST_ID, HOST_ID), "new file on disk");
    assert_eq!(owner(&sb.p("u/dir/sub")), (HOST_ID, HOST_ID), "new dir on disk");

    chown(mnt.join("created"), Some(2), Some(4)).expect("chown through the mount");
    assert_eq!(owner(&mnt.join("created")), (2, 4));
    assert_eq!(
        owner(&sb.p("u/created")),
        (HOST_ID + 2, HOST_ID + 4),
        "chown on disk"
    );
}

#[test]
fn squash_to_root_shows_every_file_as_root() {
    let sb = Sandbox::new();
    for (rel, uid, gid) in [("l1/a", HOST_ID, HOST_ID), ("l2/b", 1234, 5678), ("l2/c", 0, 42)] {
        let p = sb.write(rel, "x");
        chown(&p, Some(uid), Some(gid)).expect("chown");
    }
    let d = sb.mkdir("l1/d");
    chown(&d, Some(77), Some(88)).expect("chown");
    let mnt = sb.p("m");
    sb.mount_o(&format!("{},squash_to_root", sb.rw_opts()), &mnt);
    fs::write(mnt.join("new"), "").expect("create");
    for name in ["a", "b", "c", "d", "new", "."] {
        let md = fs::symlink_metadata(mnt.join(name)).expect("stat");
        assert_eq!((md.uid(), md.gid()), (0, 0), "{name}");
    }
}

// ---------------------------------------------------------------------------------------------
// 7. help and version

/// The string literals of the `"name" =>` match arms (`arms`) or of the array items between two
/// markers of src/cli/options.rs or src/cli/help.rs: the options the parser accepts, read from
/// the parser itself so that a new option without help text fails here.
fn accepted_names(src: &str, start: &str, end: &str, arms: bool) -> Vec<String> {
    let from = src
        .find(start)
        .unwrap_or_else(|| panic!("{start:?} not found in the parser source"));
    let rest = &src[from..];
    let to = rest.find(end).unwrap_or(rest.len());
    let mut names = Vec::new();
    for line in rest[..to].lines() {
        let line = line.trim();
        // `"name" => ...` in a match, or `"name",` (one or more per line) in an array.
        for piece in line.split(',') {
            let piece = piece.trim();
            let Some(lit) = piece.strip_prefix('"') else {
                continue;
            };
            let Some((name, after)) = lit.split_once('"') else {
                continue;
            };
            let after = after.trim();
            let found = if arms {
                after.starts_with("=>") || after.starts_with('|')
            } else {
                after.is_empty()
            };
            if found && !name.is_empty() {
                names.push(name.to_string());
            }
        }
    }
    names
}

/// `name` appears in `help` as a word of its own (not as part of a longer option name).
fn mentions(help: &str, name: &str) -> bool {
    help.match_indices(name).any(|(i, _)| {
        let before = help[..i].chars().next_back();
        let after = help[i + name.len()..].chars().next();
        before.is_none_or(|c| c.is_whitespace() || c == '|' || c == ',' || c == '(')
            && after.is_none_or(|c| !(c.is_alphanumeric() || c == '_'))
    })
}

#[test]
fn help_lists_every_accepted_option_and_exits_0() {
    let f = launch(&os(&["--help"]), None, None);
    assert_eq!(f.code(), Some(0), "{f:#?}");
    assert_eq!(f.stderr, "");
    let help = f.stdout;
    let short = launch(&os(&["-h"]), None, None);
    assert_eq!(
        (short.code(), short.stdout.as_str()),
        (Some(0), help.as_str()),
        "-h"
    );

    let required = [
        "lowerdir",
        "lowerdir+",
        "upperdir",
        "workdir",
        "volatile",
        "fsync",
        "writeback",
        "uidmapping",
        "gidmapping",
        "squash_to_root",
        "squash_to_uid",
        "squash_to_gid",
        "xattr_permissions",
        "timeout",
        "threaded",
        "verify",
        "redirect_dir",
        "static_nlink",
        "noacl",
        "noxattrs",
        "fast_ino",
        "debug",
    ];
    let read = |rel: &str| {
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel))
            .unwrap_or_else(|e| panic!("read {rel}: {e}"))
    };
    let options = read("src/cli/options.rs");
    let names = read("src/cli/help.rs");
    let mut parsed = accepted_names(&options, "fn apply_option(", "\n}\n", true);
    // `plugins=` is matched only to be refused with a clear message.
    parsed.retain(|n| n != "plugins");
    assert!(
        required.iter().all(|r| parsed.iter().any(|p| p == r)),
        "the option list read from src/cli/options.rs looks wrong (parser changed shape?): {parsed:?}"
    );
    let mut passed_through = accepted_names(&names, "const FUSE_FLAG_OPTIONS", "];", false);
    passed_through.extend(accepted_names(&names, "const FUSE_VALUE_OPTIONS", "];", false));
    assert!(passed_through.len() > 10, "{passed_through:?}");

    let missing: Vec<&String> = parsed
        .iter()
        .chain(&passed_through)
        .filter(|n| !mentions(&help, n))
        .collect();
    assert!(missing.is_empty(), "--help does not mention {missing:?}:\n{help}");
    for flag in ["-f", "-d", "-s", "-o", "--help", "--version"] {
        assert!(mentions(&help, flag), "--help does not mention {flag}");
    }
}

#[test]
fn version_prints_the_version_and_exits_0() {
    for flag in ["--version", "-V"] {
        let f = launch(&os(&[flag]), None, None);
        assert_eq!(f.code(), Some(0), "{flag}: {f:#?}");
        assert_eq!(
            f.stdout,
            format!("verlay {}\n", env!("CARGO_PKG_VERSION")),
            "{flag}"
        );
        assert_eq!(f.stderr, "", "{flag}");
    }
}

// ---------------------------------------------------------------------------------------------
// 8. the workdir is cleaned at mount

#[test]
fn workdir_leftovers_of_a_crash_are_removed_at_mount() {
    let sb = Sandbox::new();
    sb.write("l1/f", "lower");
    let leftovers = [
        sb.write("w/work/#copyup-tmp-17", "half a copy-up"),
        sb.write("w/work/tmpdir/sub/file", "half a rename"),
        sb.mkdir("w/work/empty-dir"),
    ];
    symlink("/nonexistent", sb.p("w/work/dangling")).expect("symlink");
    let mnt = sb.p("m");
    sb.mount_o(&sb.rw_opts(), &mnt);

    for l in leftovers.iter().chain([&sb.p("w/work/dangling")]) {
        assert!(
            fs::symlink_metadata(l).is_err(),
            "leftover {} survived the mount",
            l.display()
        );
    }
    fs::write(mnt.join("new"), "created").expect("create through the mount");
    fs::write(mnt.join("f"), "copied up").expect("copy-up through the mount");
    assert_eq!(fs::read_to_string(sb.p("u/new")).expect("upper"), "created");
    assert_eq!(fs::read_to_string(sb.p("u/f")).expect("upper"), "copied up");
    assert_eq!(fs::read_to_string(sb.p("l1/f")).expect("lower"), "lower");
}

/// Run `verlay ARGS` to its end: (exit code, stdout, stderr).
fn verlay_out(args: &[&OsStr]) -> (Option<i32>, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_verlay"))
        .args(args)
        .env_remove("VERLAY_STORE")
        .output()
        .expect("run verlay");
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// One store rule: commands that write create a missing store; commands that only read
/// refuse it (exit 2, `what: why (fix)`) and create nothing. And `--format json` gives
/// scripts `layer ls`, `image ls` and `verify` without parsing columns.
#[test]
fn store_is_created_by_writers_refused_by_readers_and_listed_as_json() {
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("store");
    let s = store.as_os_str();
    for args in [
        &["layer", "ls"][..],
        &["layer", "path", "sha256:ab"][..],
        &["image", "ls"][..],
        &["verify", "--all"][..],
    ] {
        let mut a: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        a.extend([OsStr::new("--store"), s]);
        let (code, out, err) = verlay_out(&a);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(out.is_empty(), "{args:?}: {out}");
        let line = err.trim_end();
        assert!(
            !line.contains('\n') && line.contains("not a verlay layer store") && line.ends_with(')'),
            "{args:?}: {err}"
        );
        assert!(!store.exists(), "{args:?} created the store");
    }

    // A one-file layer, imported into the missing store: created.
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("hello"), "hi\n").unwrap();
    let tarball = t.path().join("l.tar");
    let st = Command::new("tar")
        .arg("-cf")
        .arg(&tarball)
        .arg("-C")
        .arg(&src)
        .arg("hello")
        .status()
        .unwrap();
    assert!(st.success());
    let (code, out, err) = verlay_out(&[
        "layer".as_ref(),
        "import".as_ref(),
        "--store".as_ref(),
        s,
        tarball.as_os_str(),
    ]);
    assert_eq!(code, Some(0), "{err}");
    let chain = out.trim().to_string();
    assert!(chain.starts_with("sha256:") && chain.len() == 71, "{out}");

    let (code, out, err) = verlay_out(&[
        "layer".as_ref(),
        "ls".as_ref(),
        "--format=json".as_ref(),
        "--store".as_ref(),
        s,
    ]);
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("layer ls --format json is JSON");
    assert_eq!(v.as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v[0]["chain_id"], chain.as_str());
    assert_eq!(v[0]["state"], "ok");
    assert!(
        v[0]["diff_id"].as_str().is_some_and(|d| d.starts_with("sha256:")),
        "{v}"
    );
    let path = v[0]["path"].as_str().unwrap().to_string();
    assert_eq!(
        fs::read_to_string(Path::new(&path).join("hello")).unwrap(),
        "hi\n"
    );

    let (code, out, err) = verlay_out(&[
        "image".as_ref(),
        "ls".as_ref(),
        "--format".as_ref(),
        "json".as_ref(),
        "--store".as_ref(),
        s,
    ]);
    assert_eq!((code, out.trim()), (Some(0), "[]"), "{err}");

    // verify: clean, then damaged; JSON names the layer and the problem; exit 0 then 1.
    let verify = || {
        let (code, out, err) = verlay_out(&[
            "verify".as_ref(),
            "--all".as_ref(),
            "--quiet".as_ref(),
            "--format".as_ref(),
            "json".as_ref(),
            "--store".as_ref(),
            s,
        ]);
        assert_eq!(err, "", "--quiet prints nothing on stderr");
        let v: serde_json::Value = serde_json::from_str(&out).expect("verify --format json is JSON");
        (code, v)
    };
    let (code, v) = verify();
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(
        (v["checked"].as_u64(), v["damaged"].as_u64()),
        (Some(1), Some(0)),
        "{v}"
    );
    assert_eq!(v["layers"][0]["layer"], chain.as_str());
    assert_eq!(v["layers"][0]["ok"], true);
    fs::write(Path::new(&path).join("hello"), "HI\n").unwrap();
    let (code, v) = verify();
    assert_eq!(code, Some(1), "{v}");
    assert_eq!(v["damaged"].as_u64(), Some(1), "{v}");
    assert_eq!(v["layers"][0]["ok"], false);
    let problems = v["layers"][0]["problems"].to_string();
    assert!(problems.contains("hello"), "{v}");
}

/// `verlay completions bash` prints a script that knows the subcommands; every subcommand's
/// --help explains it with an example.
#[test]
fn completions_and_subcommand_help() {
    let (code, out, err) = verlay_out(&["completions".as_ref(), "bash".as_ref()]);
    assert_eq!(code, Some(0), "{err}");
    for word in [
        "verlay",
        "layer",
        "image",
        "verify",
        "commit",
        "completions",
        "--store",
    ] {
        assert!(out.contains(word), "bash completions do not mention {word}");
    }
    for shell in ["zsh", "fish"] {
        let (code, out, _) = verlay_out(&["completions".as_ref(), shell.as_ref()]);
        assert!(code == Some(0) && out.contains("commit"), "{shell}");
    }
    let (code, _, err) = verlay_out(&["completions".as_ref(), "tcsh".as_ref()]);
    assert_eq!(code, Some(2), "{err}");
    for cmd in [
        &["layer", "import"][..],
        &["layer", "ls"][..],
        &["layer", "seal"][..],
        &["image", "pull"][..],
        &["image", "push"][..],
        &["verify"][..],
        &["commit"][..],
    ] {
        let mut a: Vec<&OsStr> = cmd.iter().map(OsStr::new).collect();
        a.push("--help".as_ref());
        let (code, out, err) = verlay_out(&a);
        assert_eq!(code, Some(0), "{cmd:?}: {err}");
        assert!(
            out.contains("Example") && out.contains(&format!("verlay {}", cmd.join(" "))),
            "{cmd:?}:\n{out}"
        );
    }
}
