//! The differential pair: kernel overlayfs (the reference) and the subject mounted on
//! identical layers, each a [`Rig`] under one temp dir, each mount a [`Mount`] guard.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::fmt;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::*;

/// Timestamps newer than (test start - this) are "now" and not compared.
const FRESH_MTIME_SLACK_NS: i128 = 60_000_000_000;

/// What is being tested.
#[derive(Clone, Debug)]
pub enum Subject {
    /// A fuse-overlayfs-compatible binary: `$BIN -o lowerdir=..,upperdir=..,workdir=.. MNT`.
    Bin(PathBuf),
    /// Kernel overlayfs itself (`VERLAY_BIN=kernel`): validates the harness, must agree.
    Kernel,
}

impl Subject {
    pub fn from_env() -> Subject {
        match std::env::var_os("VERLAY_BIN") {
            Some(v) if v == "kernel" => Subject::Kernel,
            Some(v) => Subject::Bin(PathBuf::from(v)),
            None => match option_env!("CARGO_BIN_EXE_verlay") {
                Some(p) => Subject::Bin(PathBuf::from(p)),
                None => panic!("set VERLAY_BIN to the binary under test (or VERLAY_BIN=kernel)"),
            },
        }
    }
    /// Kernel overlayfs can't read OCI whiteouts, so a kernel subject gets kernel-format layers.
    pub fn format(&self) -> Format {
        match self {
            Subject::Bin(_) => Format::Mixed,
            Subject::Kernel => Format::Kernel,
        }
    }
}

thread_local! {
    static EXTRA_OPTS: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// Options the subject mounts of this thread add (e.g. `passthrough=1`).
pub fn set_extra_opts(opts: &str) {
    EXTRA_OPTS.with(|o| *o.borrow_mut() = opts.to_string());
}

/// Kernel overlayfs on a rig's dirs, through mount(2) with the options the reference uses.
pub fn mount_kernel(d: &Rig) -> Result<Mount, String> {
    let data = d.opts("redirect_dir=on,index=off,metacopy=off,xino=off");
    let c = CString::new(data.clone()).unwrap();
    let src = CString::new("overlay").unwrap();
    // SAFETY: valid C strings; mount(2) with a data string.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            cpath(&d.mnt).as_ptr(),
            src.as_ptr(),
            0,
            c.as_ptr().cast(),
        )
    };
    if r != 0 {
        return Err(format!(
            "mount -t overlay -o {data} {}: {}",
            d.mnt.display(),
            errname(last_errno())
        ));
    }
    Ok(Mount::adopt_kernel(&d.mnt))
}

/// The subject on a rig's dirs: a binary run as podman runs it (its launcher forks), or
/// kernel overlayfs; panics with its output if the mount fails.
pub fn mount_subject(subject: &Subject, d: &Rig, log: &Path) -> Mount {
    match subject {
        Subject::Bin(b) => {
            let mut extra = EXTRA_OPTS.with(|o| o.borrow().clone());
            // e.g. VERLAY_DIFF_EXTRA_OPTS=io_uring=on: the whole differential run that way.
            if let Ok(more) = std::env::var("VERLAY_DIFF_EXTRA_OPTS") {
                if !more.is_empty() {
                    extra = if extra.is_empty() {
                        more
                    } else {
                        format!("{extra},{more}")
                    };
                }
            }
            Launch::launcher(b, &d.opts(&extra), &d.mnt).log(log).start()
        }
        Subject::Kernel => mount_kernel(d).unwrap_or_else(|e| panic!("{e}")),
    }
}

/// `base/l0..`, `base/upper`, `base/work`, `base/mnt`, each 0755.
fn create_dirs(base: &Path, nlowers: usize) -> Rig {
    let lowers: Vec<PathBuf> = (0..nlowers).map(|i| base.join(format!("l{i}"))).collect();
    let d = Rig::at(
        &lowers,
        &base.join("upper"),
        &base.join("work"),
        &base.join("mnt"),
    );
    for p in d.lowers.iter().chain([&d.upper, &d.work, &d.mnt]) {
        chmod(p, 0o755);
    }
    d
}

/// Reference (kernel overlayfs) and subject mounted on identical layers.
pub struct Pair {
    // Fields drop in declaration order: both mounts go before the temp dir under them.
    pub reference: Option<Mount>,
    pub subject_mount: Option<Mount>,
    pub subject: Subject,
    pub layers: Layers,
    /// Timestamps older than this come from the layers or fixed utimes and must match exactly.
    pub start_ns: i128,
    pub ref_dirs: Rig,
    pub sub_dirs: Rig,
    log_seq: u32,
    pub tmp: tempfile::TempDir,
}

impl Pair {
    pub fn new(layers: Layers) -> Pair {
        private_umask_for_this_thread();
        let subject = Subject::from_env();
        let tmp = tempfile::Builder::new()
            .prefix("verlay-diff-")
            .tempdir_in("/tmp")
            .unwrap();
        chmod(tmp.path(), 0o755);
        let ref_dirs = create_dirs(&tmp.path().join("ref"), layers.lowers.len());
        let sub_dirs = create_dirs(&tmp.path().join("sub"), layers.lowers.len());
        for (i, l) in layers.lowers.iter().enumerate() {
            materialize(l, &ref_dirs.lowers[i], Format::Kernel, i as u64);
            materialize(l, &sub_dirs.lowers[i], subject.format(), i as u64);
        }
        let reference = mount_kernel(&ref_dirs).unwrap_or_else(|e| panic!("reference: {e}"));
        let mut rig = Pair {
            reference: Some(reference),
            subject_mount: None,
            subject,
            layers,
            start_ns: 0,
            ref_dirs,
            sub_dirs,
            log_seq: 0,
            tmp,
        };
        rig.mount_subject();
        // File systems stamp with a coarse clock that lags now_ns() by up to a tick; every
        // preserved timestamp (layers: 2021, fixed utimes: 2001-2010) is far older anyway.
        rig.start_ns = now_ns() - FRESH_MTIME_SLACK_NS;
        rig
    }

    fn mount_subject(&mut self) {
        self.log_seq += 1;
        let log = self.tmp.path().join(format!("subject-{}.log", self.log_seq));
        let d = &self.sub_dirs;
        self.subject_mount = Some(mount_subject(&self.subject, d, &log));
    }

    pub fn ref_root(&self) -> &Path {
        &self.ref_dirs.mnt
    }
    pub fn sub_root(&self) -> &Path {
        &self.sub_dirs.mnt
    }

    pub fn unmount_subject(&mut self) {
        self.subject_mount = None;
    }

    /// Unmount the subject and mount it again on the same upper and workdir.
    pub fn remount_subject(&mut self) {
        self.unmount_subject();
        self.mount_subject();
    }

    /// Unmount the subject and mount KERNEL overlayfs on the subject's upper, with the subject's
    /// lowers rewritten to kernel format in place: the subject's upper must be kernel format.
    pub fn mount_kernel_on_subject_upper(&mut self) -> Result<(), String> {
        self.unmount_subject();
        for l in &self.sub_dirs.lowers {
            normalize_to_kernel_format(l);
        }
        let w = &self.sub_dirs.work;
        for e in std::fs::read_dir(w).unwrap().flatten() {
            let p = e.path();
            if std::fs::symlink_metadata(&p).map(|m| m.is_dir()).unwrap_or(false) {
                std::fs::remove_dir_all(&p).map_err(|e| format!("cleaning workdir {}: {e}", p.display()))?;
            } else {
                std::fs::remove_file(&p).map_err(|e| format!("cleaning workdir {}: {e}", p.display()))?;
            }
        }
        let d = &self.sub_dirs;
        let m = mount_kernel(d)?;
        self.subject_mount = Some(m);
        // From now on the subject's lowers are kernel format.
        self.subject = Subject::Kernel;
        Ok(())
    }

    /// The other direction of upper-format compatibility: unmount the reference, mount the
    /// SUBJECT on the kernel's lowers, upper and workdir (an upper written by kernel overlayfs)
    /// and compare with the reference's last tree. Ends the reference mount for good.
    pub fn mount_subject_on_kernel_upper(&mut self) -> Result<(), String> {
        let before = snapshot(self.ref_root());
        self.reference = None;
        let d = &self.ref_dirs;
        self.log_seq += 1;
        let log = self
            .tmp
            .path()
            .join(format!("subject-on-kernel-upper-{}.log", self.log_seq));
        let m = mount_subject(&self.subject, d, &log);
        let after = snapshot(self.ref_root());
        let r = compare(&before, &after, self.start_ns).map_err(|d| {
            format!("subject mounted on kernel overlayfs's upper: merged trees differ (ref = kernel, sub = subject)\n{d}")
        });
        drop(m);
        r
    }

    pub fn compare_trees(&self, what: &str) -> Result<(), String> {
        let r = snapshot(self.ref_root());
        let s = snapshot(self.sub_root());
        compare(&r, &s, self.start_ns)
            .map_err(|d| format!("{what}: merged trees differ (ref = kernel overlayfs, sub = subject)\n{d}"))
    }
}
