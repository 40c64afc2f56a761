//! A simulated power cut during and right after Commit. The snapshotter's root is XFS on a
//! loop device. The snapshotter is killed at a commit step (or Commit is left to return), and
//! XFS is shut down at once without flushing its log (`xfs_io -x -c shutdown`, the "godown" of
//! xfstests' crash tests): everything not yet durable is lost, as in a power cut. After a
//! remount (log recovery) each snapshot is still active, or committed with every file and its
//! manifest intact; never committed with files missing or empty. (Without the syncfs of
//! `commit.syncfs` this test fails at `commit.db`: every file of the layer comes back empty,
//! which is what a snapshotter whose Commit syncs nothing leaves behind.)
mod common;
#[path = "../../tests/common/tools.rs"]
mod tools;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use containerd_snapshots::tonic::Code;

use common::*;
use tools::{have, run};

/// Large enough for mkfs.xfs's minimum; the image is sparse.
const XFS_IMAGE_BYTES: u64 = 320 << 20;
/// Files of the test layer, each of [`FILE_BYTES`].
const FILES: usize = 64;
const FILE_BYTES: usize = 100_000;

/// XFS on a loop device over a sparse image, mounted at `mnt`; unmounted and detached on drop.
struct LoopXfs {
    dev: String,
    mnt: PathBuf,
}

impl LoopXfs {
    fn new(dir: &Path) -> LoopXfs {
        let img = dir.join("xfs.img");
        File::create(&img)
            .and_then(|f| f.set_len(XFS_IMAGE_BYTES))
            .expect("image");
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&img)
            .output()
            .expect("losetup");
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let mnt = dir.join("xfs");
        std::fs::create_dir_all(&mnt).expect("mkdir");
        let x = LoopXfs { dev, mnt };
        run("mkfs.xfs", &["-q", "-f", &x.dev]);
        x.mount();
        x
    }

    fn mount(&self) {
        run("mount", &[&self.dev, self.mnt.to_str().expect("utf-8")]);
    }

    /// The power cut: no more I/O reaches the device, and the in-memory log is dropped.
    fn cut_power(&self) {
        run(
            "xfs_io",
            &["-x", "-c", "shutdown", self.mnt.to_str().expect("utf-8")],
        );
    }

    fn umount(&self) {
        run("umount", &[self.mnt.to_str().expect("utf-8")]);
    }
}

impl Drop for LoopXfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg(&self.mnt)
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// A layer big enough that unsynced data is certainly still in the page cache at the cut.
fn write_big_layer(dir: &Path) {
    for d in 0..4 {
        let sub = dir.join(format!("d{d}"));
        std::fs::create_dir_all(&sub).expect("mkdir");
        for f in 0..FILES / 4 {
            let byte = (d * 31 + f) as u8;
            std::fs::write(sub.join(format!("f{f}")), vec![byte; FILE_BYTES]).expect("write");
        }
    }
}

/// `crash_at`: the commit step the snapshotter dies at; `None`: Commit returns, then the cut.
async fn power_cut_during_commit(crash_at: Option<&str>) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let xfs = LoopXfs::new(tmp.path());
    let what = crash_at.unwrap_or("after Commit returned");
    let fs = {
        let mut s = Snapshotter::start(&xfs.mnt, crash_at);
        let mut c = s.client().await;
        let fs = bind_source(&prepare(&mut c, "a", "").await.expect("prepare"));
        write_big_layer(&fs);
        let r = commit(&mut c, "c1", "a", HashMap::new()).await;
        match crash_at {
            Some(_) => {
                assert!(r.is_err(), "{what}: the commit must fail when the process dies");
                s.wait_dead();
                xfs.cut_power();
            }
            None => {
                r.expect("commit");
                // the cut comes first; the process dies with the machine
                xfs.cut_power();
            }
        }
        fs
    };
    xfs.umount();
    xfs.mount();

    let s = Snapshotter::start(&xfs.mnt, None);
    let mut c = s.client().await;
    match stat(&mut c, "c1").await {
        Ok(info) => {
            assert_eq!(info.kind, 3, "{what}");
            assert_eq!(code(stat(&mut c, "a").await), Code::NotFound, "{what}");
            let m = verlay::lower::manifest::Manifest::open_beside(&fs)
                .expect("manifest")
                .expect("a committed layer has its manifest after the cut");
            let problems = verlay::lower::manifest::scrub(&fs, &m, &mut |_, _| {}).expect("scrub");
            assert!(
                problems.is_empty(),
                "{what}: committed but damaged ({} problems), first: {:?}",
                problems.len(),
                &problems[..problems.len().min(3)]
            );
            assert_eq!(m.len(), 1 + 4 + FILES, "{what}: every file listed");
        }
        Err(e) => {
            assert_eq!(e.code(), Code::NotFound, "{what}: {e}");
            assert!(crash_at.is_some(), "a commit that returned was lost in the cut");
            assert_eq!(
                stat(&mut c, "a").await.expect("a").kind,
                2,
                "{what}: still active"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_cut_never_leaves_a_committed_layer_incomplete() {
    if !(have("mkfs.xfs") && have("xfs_io") && have("losetup")) {
        eprintln!("SKIP: needs mkfs.xfs, xfs_io and losetup (apt-get install xfsprogs util-linux)");
        return;
    }
    for step in [
        Some("commit.syncfs"),
        Some("commit.seal"),
        Some("commit.record"),
        Some("commit.db"),
        None,
    ] {
        power_cut_during_commit(step).await;
    }
}
