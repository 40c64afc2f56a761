//! The one rig of the tests: [`Rig`], the lower, upper, work and mount directories of one
//! overlay and its `-o` option string, mounted through [`Launch`] into a [`Mount`] guard. Also
//! the small shared helpers of tests that spawn verlay: its binary, the e2e harness scripts,
//! a sorted directory listing, a scratch temp dir, and running a closure as another user.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::mount::{Launch, Mount};

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

/// Run `script` with `bash -ec`; panics with its stderr if it fails.
pub fn sh(script: &str) {
    let out = std::process::Command::new("bash")
        .arg("-ec")
        .arg(script)
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "script failed: {script}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A private temp dir under /tmp named `PREFIX...` (mode 0700, as tempfile makes it).
pub fn scratch(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .unwrap()
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

/// The directories of one overlay: lowers (top first, the order of `lowerdir=`), upper, work
/// and mountpoint. A lower may be shared by several rigs.
#[derive(Clone, Debug)]
pub struct Rig {
    pub lowers: Vec<PathBuf>,
    pub upper: PathBuf,
    pub work: PathBuf,
    pub mnt: PathBuf,
}

impl Rig {
    /// These directories, created (0755) where missing.
    pub fn at(lowers: &[PathBuf], upper: &Path, work: &Path, mnt: &Path) -> Rig {
        let r = Rig {
            lowers: lowers.to_vec(),
            upper: upper.to_path_buf(),
            work: work.to_path_buf(),
            mnt: mnt.to_path_buf(),
        };
        for p in r.lowers.iter().chain([&r.upper, &r.work, &r.mnt]) {
            if !p.exists() {
                fs::create_dir_all(p).unwrap();
                fs::set_permissions(p, fs::Permissions::from_mode(0o755)).unwrap();
            }
        }
        r
    }

    /// `base/NAME` for each lower name, and `base/UPPER`, `base/WORK`, `base/MNT`.
    pub fn named(base: &Path, lowers: &[&str], upper: &str, work: &str, mnt: &str) -> Rig {
        let lowers: Vec<PathBuf> = lowers.iter().map(|l| base.join(l)).collect();
        Rig::at(&lowers, &base.join(upper), &base.join(work), &base.join(mnt))
    }

    /// The first (topmost) lower.
    pub fn lower(&self) -> &Path {
        &self.lowers[0]
    }

    /// `lowerdir=L1:L2,upperdir=U,workdir=W` (without upper and work when there is no upper),
    /// then `,EXTRA` when `extra` is not empty.
    pub fn opts(&self, extra: &str) -> String {
        let lower: Vec<String> = self.lowers.iter().map(|l| l.display().to_string()).collect();
        let mut o = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.join(":"),
            self.upper.display(),
            self.work.display()
        );
        if !extra.is_empty() {
            o.push(',');
            o.push_str(extra);
        }
        o
    }

    /// How to mount this rig with verlay (`-f -o OPTS,EXTRA MNT`), to adjust before start.
    pub fn launch(&self, extra: &str) -> Launch {
        Launch::verlay(&self.opts(extra), &self.mnt)
    }

    /// Mount this rig with verlay in the foreground; panics with its log if it fails.
    pub fn mount(&self, extra: &str) -> Mount {
        self.launch(extra).start()
    }

    /// Names left in `workdir/work` (temps of a failed step would show here).
    pub fn work_entries(&self) -> Vec<String> {
        dir_names(&self.work.join("work"))
    }
}
