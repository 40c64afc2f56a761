//! Real-filesystem rigs shared by the test binaries that spawn verlay daemons themselves
//! (`#[path = "common/guard.rs"] mod guard;` then `#[macro_use] #[path = "common/rig.rs"] mod rig;`):
//! tools present or not, the e2e harness scripts, filesystems on loop devices, and a foreground
//! verlay daemon. Every guard undoes what it made on Drop, also when a test panics.
#![allow(dead_code)]

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::guard::is_mounted;

// Only std, so the snapshotter crate's tests include it too (rig needs verlay's binary).
#[path = "tools.rs"]
mod tools;
#[allow(unused_imports)] // each test binary uses a subset
pub use tools::{have, run};

/// How long a mount may take to appear, and a daemon to exit after its unmount.
pub const WAIT: Duration = Duration::from_secs(10);

pub fn verlay_bin() -> &'static str {
    env!("CARGO_BIN_EXE_verlay")
}

/// A harness script of the repository's `tests/e2e/` (`image.sh`: the test image;
/// `registry-env.sh`: the registry and skopeo wrapper), run with `bash`.
pub fn e2e_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e").join(name)
}

/// The names in `p`, sorted; none if it cannot be read (such as when it does not exist).
pub fn dir_names(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Skip the test (return from it) unless every tool is installed.
#[allow(unused_macros)]
macro_rules! require_tools {
    ($($tool:expr),+) => {
        for t in [$($tool),+] {
            if !$crate::rig::have(t) {
                eprintln!("SKIP {}: `{t}` is not installed", module_path!());
                return;
            }
        }
    };
}

/// A filesystem mounted by the test (tmpfs or a loop device); unmounted on drop.
pub struct FsMount(pub PathBuf);

impl FsMount {
    pub fn new(args: &[&str], at: &Path) -> FsMount {
        fs::create_dir_all(at).unwrap();
        let mut a: Vec<&str> = args.to_vec();
        a.push(at.to_str().unwrap());
        run("mount", &a);
        FsMount(at.to_path_buf())
    }
}

impl Drop for FsMount {
    fn drop(&mut self) {
        for _ in 0..20 {
            if !is_mounted(&self.0) {
                return;
            }
            let ok = Command::new("umount").arg(&self.0).stderr(Stdio::null()).status();
            if ok.map(|s| s.success()).unwrap_or(false) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A loop device over an image file; detached on drop (after the mounts on it are gone).
pub struct LoopDev(pub String);

impl LoopDev {
    pub fn new(image: &Path, bytes: u64) -> LoopDev {
        File::create(image).unwrap().set_len(bytes).unwrap();
        LoopDev::attach(image)
    }

    /// A loop device over an existing image, as it is.
    pub fn attach(image: &Path) -> LoopDev {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(image)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        LoopDev(String::from_utf8(out.stdout).unwrap().trim().to_string())
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// A loop device with a fresh filesystem (`mkfs` args before the device), mounted at `at`.
/// Fields drop in order: the mount before the device.
pub struct LoopFs {
    mount: FsMount,
    _dev: LoopDev,
}

impl LoopFs {
    pub fn new(image: &Path, bytes: u64, mkfs: &[&str], mount_opts: &str, at: &Path) -> LoopFs {
        let dev = LoopDev::new(image, bytes);
        let mut a: Vec<&str> = mkfs[1..].to_vec();
        a.push(&dev.0);
        run(mkfs[0], &a);
        let mount = FsMount::new(&["-o", mount_opts, &dev.0], at);
        LoopFs { mount, _dev: dev }
    }

    pub fn path(&self) -> &Path {
        &self.mount.0
    }
}

/// How a mount is stopped.
#[derive(Clone, Copy, Debug)]
pub enum Stop {
    Fusermount,
    Umount,
    Sigterm,
    Sigkill,
}

/// A verlay daemon in the foreground (`-f`), so its PID is the child's. Drop unmounts and
/// waits for it, killing it by PID only if it does not exit.
pub struct Verlay {
    mnt: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

impl Verlay {
    /// Mount, or return the daemon's exit status and stderr if it exits first.
    pub fn try_start(opts: &str, mnt: &Path, log: &Path) -> Result<Verlay, (ExitStatus, String)> {
        let err = File::create(log).unwrap();
        let mut child = Command::new(verlay_bin())
            .arg("-f")
            .arg("-o")
            .arg(opts)
            .arg(mnt)
            .stdin(Stdio::null())
            .stdout(err.try_clone().unwrap())
            .stderr(err)
            .spawn()
            .unwrap();
        let start = Instant::now();
        loop {
            if is_mounted(mnt) {
                return Ok(Verlay {
                    mnt: mnt.to_path_buf(),
                    child: Some(child),
                    log: log.to_path_buf(),
                });
            }
            if let Ok(Some(st)) = child.try_wait() {
                return Err((st, fs::read_to_string(log).unwrap_or_default()));
            }
            if start.elapsed() > WAIT {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "verlay -o {opts} did not mount in {WAIT:?}: {}",
                    fs::read_to_string(log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn start(opts: &str, mnt: &Path, log: &Path) -> Verlay {
        Verlay::try_start(opts, mnt, log).unwrap_or_else(|(st, e)| panic!("verlay -o {opts}: {st}: {e}"))
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stop the mount and wait for the daemon; returns its exit status.
    pub fn stop(&mut self, how: Stop) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = rustix::process::Pid::from_child(&child);
        match how {
            Stop::Fusermount => run("fusermount3", &["-u", self.mnt.to_str().unwrap()]),
            Stop::Umount => run("umount", &[self.mnt.to_str().unwrap()]),
            Stop::Sigterm => rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap(),
            Stop::Sigkill => child.kill().unwrap(),
        }
        let start = Instant::now();
        let st = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if start.elapsed() > WAIT {
                let _ = child.kill();
                panic!("daemon did not exit after {how:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        if is_mounted(&self.mnt) {
            // A killed daemon leaves a dead mount (ENOTCONN) behind.
            run("umount", &["-l", self.mnt.to_str().unwrap()]);
        }
        st
    }
}

impl Drop for Verlay {
    fn drop(&mut self) {
        crate::guard::unmount_and_reap(&self.mnt, self.child.take(), WAIT);
    }
}

/// Run `f` on a thread whose uid and gid are `uid` (FUSE requests carry the caller's ids).
pub fn as_user(uid: u32, f: impl FnOnce() -> std::io::Result<()> + Send) -> std::io::Result<()> {
    std::thread::scope(|s| {
        s.spawn(|| {
            rustix::thread::set_thread_gid(rustix::process::Gid::from_raw(uid))?;
            rustix::thread::set_thread_uid(rustix::process::Uid::from_raw(uid))?;
            f()
        })
        .join()
        .unwrap()
    })
}
