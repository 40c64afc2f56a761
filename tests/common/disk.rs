//! Loop devices, and fresh filesystems on them, for tests that need a real filesystem of a
//! given kind or size (XFS that can lose power, a small ext4 that fills up). Every guard undoes
//! what it made on Drop, also when a test panics.

use std::fs::File;
use std::path::Path;
use std::process::Command;

use super::mount::Mount;
use super::tools::run;

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
    mount: Mount,
    _dev: LoopDev,
}

impl LoopFs {
    pub fn new(image: &Path, bytes: u64, mkfs: &[&str], mount_opts: &str, at: &Path) -> LoopFs {
        let dev = LoopDev::new(image, bytes);
        let mut a: Vec<&str> = mkfs[1..].to_vec();
        a.push(&dev.0);
        run(mkfs[0], &a);
        let mount = Mount::fs(&["-o", mount_opts, &dev.0], at);
        LoopFs { mount, _dev: dev }
    }

    pub fn path(&self) -> &Path {
        &self.mount.mnt
    }
}
