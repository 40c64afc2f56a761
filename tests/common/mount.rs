//! The one mount guard of the tests: [`Mount`]. Whatever mounted it (a verlay daemon in the
//! foreground, a launcher that daemonizes, kernel overlayfs, `mount(8)` of a tmpfs or a loop
//! device), its Drop unmounts it and ends the daemon serving it by PID, also when the test
//! panics; every wait is bounded. [`Launch`] says how a FUSE daemon is started.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::proc::{daemon_pids, is_mounted, kill9, pid_alive, run_tool};
use super::rig::verlay_bin;

/// How long a mount may take to appear, and a daemon to exit after its unmount.
pub const WAIT: Duration = Duration::from_secs(10);

/// How a mount is stopped.
#[derive(Clone, Copy, Debug)]
pub enum Stop {
    Fusermount,
    Umount,
    Sigterm,
    Sigkill,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// A FUSE mount: `fusermount3 -u`, a lazy umount when that fails.
    Fuse,
    /// A kernel filesystem (overlayfs, tmpfs, a loop device): `umount`, retried while busy.
    Kernel,
}

/// A mounted filesystem; Drop unmounts it and ends its daemon by PID.
pub struct Mount {
    pub mnt: PathBuf,
    kind: Kind,
    /// The daemon (or launcher) we spawned.
    child: Option<Child>,
    /// Daemons found serving `mnt` after a launcher that forks exited.
    daemons: Vec<i32>,
    log: Option<PathBuf>,
}

/// How to start a FUSE daemon: `BIN [-f] ARGS... -o OPTS MNT`, stdout and stderr to a log.
pub struct Launch {
    bin: PathBuf,
    foreground: bool,
    args: Vec<OsString>,
    opts: String,
    mnt: PathBuf,
    log: PathBuf,
    env: Vec<(OsString, Option<OsString>)>,
    ready: Option<String>,
    timeout: Duration,
    /// The whole command line after `[-f]` instead of `ARGS -o OPTS MNT`.
    raw: Option<Vec<OsString>>,
}

impl Launch {
    /// verlay in the foreground (`-f`), so its PID is the child's; log beside the mountpoint.
    pub fn verlay(opts: &str, mnt: &Path) -> Launch {
        Launch {
            bin: PathBuf::from(verlay_bin()),
            foreground: true,
            args: Vec::new(),
            opts: opts.to_string(),
            mnt: mnt.to_path_buf(),
            log: mnt.with_extension("log"),
            env: Vec::new(),
            ready: None,
            timeout: WAIT,
            raw: None,
        }
    }

    /// verlay in the foreground with exactly `args` after `-f` (any command-line form), ready
    /// once `mnt` is mounted.
    pub fn verlay_argv(args: &[OsString], mnt: &Path) -> Launch {
        Launch {
            raw: Some(args.to_vec()),
            ..Launch::verlay("", mnt)
        }
    }

    /// A fuse-overlayfs-compatible binary run as podman runs it: the launcher forks the daemon
    /// and exits once the mount is live; the guard then finds the daemon by its argv.
    pub fn launcher(bin: &Path, opts: &str, mnt: &Path) -> Launch {
        Launch {
            bin: bin.to_path_buf(),
            foreground: false,
            ..Launch::verlay(opts, mnt)
        }
    }

    /// Run verlay as a launcher that forks (no `-f`).
    pub fn background(mut self) -> Launch {
        self.foreground = false;
        self
    }

    /// An argument before `-o OPTS` (such as `-d`).
    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Launch {
        self.args.push(a.as_ref().to_os_string());
        self
    }

    pub fn log(mut self, log: &Path) -> Launch {
        self.log = log.to_path_buf();
        self
    }

    pub fn env(mut self, k: impl AsRef<OsStr>, v: impl AsRef<OsStr>) -> Launch {
        self.env.push((k.as_ref().into(), Some(v.as_ref().into())));
        self
    }

    pub fn env_remove(mut self, k: impl AsRef<OsStr>) -> Launch {
        self.env.push((k.as_ref().into(), None));
        self
    }

    /// Not ready until the log also has this line (e.g. "control socket ready").
    pub fn ready_when_logged(mut self, line: &str) -> Launch {
        self.ready = Some(line.to_string());
        self
    }

    pub fn timeout(mut self, t: Duration) -> Launch {
        self.timeout = t;
        self
    }

    fn command(&self) -> Command {
        let out = File::create(&self.log).unwrap_or_else(|e| panic!("log {}: {e}", self.log.display()));
        let mut cmd = Command::new(&self.bin);
        if self.foreground {
            cmd.arg("-f");
        }
        match &self.raw {
            Some(raw) => cmd.args(raw),
            None => cmd.args(&self.args).arg("-o").arg(&self.opts).arg(&self.mnt),
        };
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        for (k, v) in &self.env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        cmd
    }

    /// The command line, for messages.
    fn describe(&self) -> String {
        match &self.raw {
            Some(raw) => format!("{} {raw:?}", self.bin.display()),
            None => format!(
                "{} {:?} -o {} {}",
                self.bin.display(),
                self.args,
                self.opts,
                self.mnt.display()
            ),
        }
    }

    fn ready(&self) -> bool {
        is_mounted(&self.mnt)
            && self.ready.as_ref().is_none_or(|l| {
                fs::read_to_string(&self.log)
                    .unwrap_or_default()
                    .contains(l.as_str())
            })
    }

    /// Mount, or return the process's exit status and log if it fails first (a foreground
    /// daemon that exits at all, a launcher that exits non-zero). Panics with the log if the
    /// mount does not appear within the timeout.
    pub fn try_start(self) -> Result<Mount, (ExitStatus, String)> {
        let what = self.describe();
        let log = || fs::read_to_string(&self.log).unwrap_or_default();
        let mut child = self
            .command()
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.bin.display()));
        let start = Instant::now();
        let mut exited = false;
        while !self.ready() {
            if !exited {
                if let Ok(Some(st)) = child.try_wait() {
                    exited = true;
                    if self.foreground || !st.success() {
                        return Err((st, log()));
                    }
                }
            }
            if start.elapsed() > self.timeout {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{what} did not mount within {:?}; output:\n{}",
                    self.timeout,
                    log()
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let daemons = if self.foreground {
            Vec::new()
        } else {
            daemon_pids(&self.mnt)
        };
        Ok(Mount {
            mnt: self.mnt.clone(),
            kind: Kind::Fuse,
            child: Some(child),
            daemons,
            log: Some(self.log.clone()),
        })
    }

    /// [`Launch::try_start`], panicking with the exit status and log if the mount fails.
    pub fn start(self) -> Mount {
        let what = self.describe();
        self.try_start()
            .unwrap_or_else(|(st, e)| panic!("{what} exited with {st}; output:\n{e}"))
    }
}

impl Mount {
    /// Kernel overlayfs through mount(8) with the data string `opts`.
    pub fn kernel_overlay(opts: &str, mnt: &Path) -> Result<Mount, String> {
        mount8(&["-t", "overlay", "overlay", "-o", opts], mnt)?;
        Ok(Mount::adopt_kernel(mnt))
    }

    /// `mount ARGS AT` (a tmpfs, a loop device), creating `at`; panics if it fails.
    pub fn fs(args: &[&str], at: &Path) -> Mount {
        Mount::try_fs(args, at).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `mount ARGS AT`, creating `at`, or the command and its stderr.
    pub fn try_fs(args: &[&str], at: &Path) -> Result<Mount, String> {
        fs::create_dir_all(at).unwrap();
        mount8(args, at)?;
        Ok(Mount::adopt_kernel(at))
    }

    /// Guard a kernel mount made by the caller.
    pub fn adopt_kernel(mnt: &Path) -> Mount {
        Mount {
            mnt: mnt.to_path_buf(),
            kind: Kind::Kernel,
            child: None,
            daemons: Vec::new(),
            log: None,
        }
    }

    /// The daemon's PID: the foreground child, or the daemon a launcher left behind.
    pub fn pid(&self) -> i32 {
        match &self.child {
            Some(c) if self.daemons.is_empty() => c.id() as i32,
            _ => self.daemons.first().copied().unwrap_or(0),
        }
    }

    pub fn log(&self) -> String {
        self.log
            .as_ref()
            .map(|l| fs::read_to_string(l).unwrap_or_default())
            .unwrap_or_default()
    }

    /// Wait up to `timeout` for the foreground daemon to exit, without reaping the guard.
    pub fn wait_within(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let start = Instant::now();
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            if start.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Wait for the foreground daemon to exit by itself (the mount, dead or not, stays);
    /// panics with its log after [`WAIT`].
    pub fn reap(&mut self) -> ExitStatus {
        let st = self.wait_within(WAIT);
        let mut child = self.child.take().expect("running");
        match st {
            Some(st) => st,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("daemon did not exit: {}", self.log());
            }
        }
    }

    /// Lazily unmount a mount whose daemon is gone (it answers ENOTCONN).
    pub fn umount_dead(&self) {
        if is_mounted(&self.mnt) {
            assert!(
                run_tool("umount", &[Path::new("-l"), &self.mnt]),
                "umount -l {}",
                self.mnt.display()
            );
        }
    }

    /// Wait for the daemon to exit by itself (a crash point), then drop its dead mount.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let st = self.reap();
        self.umount_dead();
        st
    }

    /// kill -9 the daemon by PID and wait for it; the dead mount stays until the guard is
    /// dropped, so a workload still running on it gets ENOTCONN, never the directory under it.
    pub fn kill9(&mut self) -> ExitStatus {
        kill9(self.pid());
        self.reap()
    }

    /// Stop the mount and wait for the daemon; returns its exit status.
    pub fn stop(&mut self, how: Stop) -> ExitStatus {
        let pid = self.pid();
        match how {
            Stop::Fusermount => assert!(
                run_tool("fusermount3", &[Path::new("-u"), &self.mnt]),
                "fusermount3 -u"
            ),
            Stop::Umount => assert!(run_tool("umount", &[&self.mnt]), "umount"),
            Stop::Sigterm => {
                let p = rustix::process::Pid::from_raw(pid).expect("a daemon pid");
                rustix::process::kill_process(p, rustix::process::Signal::TERM).unwrap()
            }
            Stop::Sigkill => kill9(pid),
        }
        let st = self
            .wait_within(WAIT)
            .unwrap_or_else(|| panic!("daemon did not exit after {how:?}: {}", self.log()));
        self.child = None;
        // A killed daemon leaves a dead mount (ENOTCONN) behind.
        self.umount_dead();
        st
    }

    /// A clean unmount (`fusermount3 -u`) after which the daemon must exit successfully.
    pub fn stop_clean(&mut self) {
        let st = self.stop(Stop::Fusermount);
        assert!(st.success(), "daemon exited with {st}: {}", self.log());
    }

    /// What Drop does, callable early: unmount if mounted, then end the daemon (bounded wait,
    /// then SIGKILL by PID). Idempotent.
    pub fn unmount(&mut self) {
        if is_mounted(&self.mnt) {
            match self.kind {
                Kind::Fuse => {
                    if !run_tool("fusermount3", &[Path::new("-u"), &self.mnt]) && is_mounted(&self.mnt) {
                        run_tool("umount", &[Path::new("-l"), &self.mnt]);
                    }
                }
                Kind::Kernel => {
                    if !run_tool("umount", &[&self.mnt]) && is_mounted(&self.mnt) {
                        run_tool("umount", &[Path::new("-l"), &self.mnt]);
                    }
                }
            }
        }
        // The daemon must be gone before anything else mounts the same upper.
        let start = Instant::now();
        while self.daemons.iter().any(|p| pid_alive(*p)) && start.elapsed() < WAIT {
            std::thread::sleep(Duration::from_millis(10));
        }
        for p in self.daemons.drain(..) {
            if pid_alive(p) {
                kill9(p);
            }
        }
        if let Some(mut c) = self.child.take() {
            if self.wait_within_child(&mut c).is_none() {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }

    fn wait_within_child(&self, c: &mut Child) -> Option<ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < WAIT {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

/// `mount ARGS AT`, or the command and its stderr.
fn mount8(args: &[&str], at: &Path) -> Result<(), String> {
    let out = Command::new("mount")
        .args(args)
        .arg(at)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("mount: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "mount {} {}: {}",
            args.join(" "),
            at.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.unmount();
    }
}
