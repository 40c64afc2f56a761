//! Faults and durability options of the upper, on real mounts over real filesystems:
//! `volatile` syncs nothing and leaves kernel overlayfs's marker `workdir/work/incompat/volatile`
//! exactly until a clean stop, so a mount after an unclean stop refuses (until
//! `volatile_recover`); a failed fsync of the upper poisons the mount (EIO for every later
//! change, never a retried fsync: "fsyncgate"); ENOSPC and EDQUOT of the upper reach the
//! application as themselves and leave no partial copy-up; fsync of the mount's root reaches
//! the upper as syncfs; an upper without xattrs is refused at mount.
//!
//! Needs root, /dev/fuse and loop devices. Tests that need a tool (strace, mkfs.xfs, xfs_io,
//! xfs_quota, mkfs.ext2, mkfs.vfat) print why they skip when it is missing. Every mount, loop
//! device and daemon a test makes is undone by a Drop guard, also when the test panics.
//! Failures modelled: a daemon killed by SIGKILL (its writes stay in the page cache), a
//! filesystem under the upper that starts failing its writes (XFS shutdown under a loop
//! device), a full filesystem and a full quota.

#[macro_use]
mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Write size used to fill a filesystem or a quota.
const CHUNK: usize = 64 * 1024;
/// The smallest filesystem mkfs.xfs accepts (300 MB), as a sparse image.
const XFS_IMAGE_BYTES: u64 = 320 << 20;

// ---------------------------------------------------------------------------------------------
// helpers

use common::{run, scratch, LoopDev, LoopFs, Mount, Rig, Stop, WAIT};

fn errno_of(r: std::io::Result<impl Sized>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

/// One overlay's dirs: lower and mountpoint under `base`; upper and work under `upper_fs`.
fn dirs(base: &Path, upper_fs: &Path) -> Rig {
    Rig::at(
        &[base.join("lower")],
        &upper_fs.join("upper"),
        &upper_fs.join("work"),
        &base.join("mnt"),
    )
}

/// Kernel overlayfs's volatile marker in `d`'s workdir.
fn marker(d: &Rig) -> PathBuf {
    d.work.join("work/incompat/volatile")
}

/// Deterministic content of `len` bytes.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[1] ^ seed)
        .collect()
}

/// Write `CHUNK`s to `f` until a write fails; returns (bytes written, errno).
fn fill(f: &mut File) -> (u64, i32) {
    let buf = pattern(CHUNK, 7);
    let mut total = 0u64;
    loop {
        match f.write(&buf) {
            Ok(0) => panic!("write returned 0"),
            Ok(n) => total += n as u64,
            Err(e) => return (total, e.raw_os_error().unwrap_or(0)),
        }
        assert!(total < 1 << 30, "filled 1 GiB without an error");
    }
}

fn used_bytes(p: &Path) -> u64 {
    let s = rustix::fs::statvfs(p).unwrap();
    (s.f_blocks - s.f_bfree) * s.f_frsize
}

// ---------------------------------------------------------------------------------------------
// volatile

#[test]
fn volatile_marker_exists_while_mounted_and_goes_at_every_clean_stop() {
    for how in [Stop::Fusermount, Stop::Umount, Stop::Sigterm] {
        let t = scratch("verlay-faults.");
        let d = dirs(t.path(), t.path());
        fs::write(d.lower().join("a"), "lower").unwrap();
        let mut v = d.launch("volatile").log(&t.path().join("log")).start();
        assert!(marker(&d).is_dir(), "{how:?}: no marker while mounted");
        let mut f = OpenOptions::new().append(true).open(d.mnt.join("a")).unwrap();
        f.write_all(b"+new").unwrap();
        f.sync_all().unwrap();
        drop(f);
        let st = v.stop(how);
        assert!(st.success(), "{how:?}: daemon exited with {st}: {}", v.log());
        assert!(
            !marker(&d).exists(),
            "{how:?}: marker survived a clean stop: {}",
            v.log()
        );
        assert!(
            !d.work.join("work/incompat").exists(),
            "{how:?}: incompat dir left"
        );
        assert_eq!(fs::read_to_string(d.upper.join("a")).unwrap(), "lower+new");
        // The next mount (not volatile) is accepted and sees the data.
        let _v = d.launch("").log(&t.path().join("log2")).start();
        assert_eq!(fs::read_to_string(d.mnt.join("a")).unwrap(), "lower+new");
    }
}

#[test]
fn volatile_unclean_stop_refuses_next_mount_until_volatile_recover() {
    let t = scratch("verlay-faults.");
    let d = dirs(t.path(), t.path());
    fs::write(d.lower().join("a"), "lower").unwrap();
    let mut v = d.launch("volatile").log(&t.path().join("log")).start();
    fs::write(d.mnt.join("b"), "written before the kill").unwrap();
    v.stop(Stop::Sigkill);
    assert!(marker(&d).is_dir(), "the marker must survive kill -9");

    for extra in ["", "volatile", "fsync=0"] {
        let (st, err) = match d.launch(extra).log(&t.path().join("log2")).try_start() {
            Ok(_) => panic!("-o {extra}: mounted over the marker of an unclean volatile stop"),
            Err(e) => e,
        };
        assert_eq!(st.code(), Some(2), "-o {extra}: {err}");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "-o {extra}: one line expected:\n{err}");
        let line = lines[0];
        for want in [
            "workdir \"",
            "work/incompat/volatile",
            "inconsistent after an unclean stop of a volatile mount",
            "discard the upperdir and workdir",
            "volatile_recover",
        ] {
            assert!(line.contains(want), "missing {want:?} in: {line}");
        }
        assert!(marker(&d).is_dir(), "a refused mount must keep the marker");
    }

    let v = d.launch("volatile_recover").log(&t.path().join("log3")).start();
    assert!(!marker(&d).exists(), "volatile_recover must remove the marker");
    assert_eq!(
        fs::read_to_string(d.mnt.join("b")).unwrap(),
        "written before the kill"
    );
    assert!(v.log().contains("volatile_recover"), "{}", v.log());
    drop(v);
    // Recovered: later mounts need no option.
    let _v = d.launch("").log(&t.path().join("log4")).start();
}

#[test]
fn volatile_recover_with_volatile_keeps_a_fresh_marker() {
    let t = scratch("verlay-faults.");
    let d = dirs(t.path(), t.path());
    let mut v = d.launch("volatile").log(&t.path().join("log")).start();
    v.stop(Stop::Sigkill);
    let mut v = d
        .launch("volatile,volatile_recover")
        .log(&t.path().join("log2"))
        .start();
    assert!(marker(&d).is_dir(), "a volatile mount needs its own marker");
    v.stop(Stop::Sigkill);
    assert!(d.launch("").log(&t.path().join("log3")).try_start().is_err());
}

#[test]
fn unknown_incompat_feature_is_refused() {
    let t = scratch("verlay-faults.");
    let d = dirs(t.path(), t.path());
    fs::create_dir_all(d.work.join("work/incompat/future")).unwrap();
    let (st, err) = d
        .launch("volatile_recover")
        .log(&t.path().join("log"))
        .try_start()
        .err()
        .expect("mounted with an unknown incompat feature");
    assert_eq!(st.code(), Some(2), "{err}");
    assert!(err.contains("work/incompat/future"), "{err}");
    assert!(
        d.work.join("work/incompat/future").exists(),
        "a refused mount must not clean"
    );
}

/// strace attached to a daemon, recording the sync syscalls it makes.
struct SyncTrace {
    child: Option<Child>,
    out: PathBuf,
}

impl SyncTrace {
    fn attach(pid: i32, dir: &Path) -> SyncTrace {
        let out = dir.join("strace.out");
        let err = dir.join("strace.err");
        let child = Command::new("strace")
            .args([
                "-f",
                "-e",
                "trace=fsync,fdatasync,syncfs,sync,sync_file_range",
                "-o",
            ])
            .arg(&out)
            .arg("-p")
            .arg(pid.to_string())
            .stdin(Stdio::null())
            .stderr(File::create(&err).unwrap())
            .spawn()
            .unwrap();
        let mut t = SyncTrace {
            child: Some(child),
            out,
        };
        // strace reports each thread it attached to; wait for all of the daemon's threads.
        // strace says "Process N attached with M threads" once it holds all of them.
        let start = Instant::now();
        while !fs::read_to_string(&err).unwrap_or_default().contains("attached") {
            assert!(
                start.elapsed() < WAIT,
                "strace did not attach: {}",
                fs::read_to_string(&err).unwrap_or_default()
            );
            if let Some(c) = t.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!(
                        "strace exited with {st}: {}",
                        fs::read_to_string(&err).unwrap_or_default()
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        t
    }

    /// Detach and return the names of the sync syscalls seen, in order.
    fn finish(mut self) -> Vec<String> {
        std::thread::sleep(Duration::from_millis(100));
        if let Some(mut c) = self.child.take() {
            let pid = rustix::process::Pid::from_child(&c);
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::INT);
            let _ = c.wait();
        }
        let text = fs::read_to_string(&self.out).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let call = l.split_whitespace().nth(1)?;
                let name = call.split('(').next()?;
                ["fsync", "fdatasync", "syncfs", "sync", "sync_file_range"]
                    .contains(&name)
                    .then(|| format!("{name} = {}", l.rsplit('=').next().unwrap_or("").trim()))
            })
            .collect()
    }
}

impl Drop for SyncTrace {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// fsync, fdatasync, fsync of a subdirectory and of the root, and a copy-up.
fn sync_workload(mnt: &Path) {
    let mut f = File::create(mnt.join("new")).unwrap();
    f.write_all(b"data").unwrap();
    f.sync_all().unwrap();
    f.sync_data().unwrap();
    drop(f);
    fs::create_dir(mnt.join("d")).unwrap();
    File::open(mnt.join("d")).unwrap().sync_all().unwrap();
    // A copy-up of a lower file (fsynced before it is published unless volatile).
    let mut f = OpenOptions::new().append(true).open(mnt.join("a")).unwrap();
    f.write_all(b"+").unwrap();
    drop(f);
    // fsync of the root: what `sync MOUNTPOINT` does.
    File::open(mnt).unwrap().sync_all().unwrap();
}

#[test]
fn fsync_of_root_reaches_upper_as_syncfs_and_volatile_syncs_nothing() {
    require_tools!("strace");
    // Without volatile: each application sync reaches the upper, the root's as syncfs.
    let t = scratch("verlay-faults.");
    let d = dirs(t.path(), t.path());
    fs::write(d.lower().join("a"), "lower").unwrap();
    let v = d.launch("").log(&t.path().join("log")).start();
    let trace = SyncTrace::attach(v.pid(), t.path());
    sync_workload(&d.mnt);
    let calls = trace.finish();
    for want in ["fsync = 0", "fdatasync = 0", "syncfs = 0"] {
        assert!(calls.iter().any(|c| c == want), "no {want} in {calls:?}");
    }
    // file fsync, dir fsync, copy-up fsync
    assert!(
        calls.iter().filter(|c| *c == "fsync = 0").count() >= 3,
        "{calls:?}"
    );
    assert_eq!(
        calls.iter().filter(|c| *c == "syncfs = 0").count(),
        1,
        "{calls:?}"
    );
    drop(v);

    // volatile: the same workload makes no sync at all, and succeeds.
    let t = scratch("verlay-faults.");
    let d = dirs(t.path(), t.path());
    fs::write(d.lower().join("a"), "lower").unwrap();
    let mut v = d.launch("volatile").log(&t.path().join("log")).start();
    let trace = SyncTrace::attach(v.pid(), t.path());
    sync_workload(&d.mnt);
    let calls = trace.finish();
    assert!(calls.is_empty(), "volatile made sync calls: {calls:?}");
    // fsync=0 likewise.
    assert!(v.stop(Stop::Fusermount).success());
    let v = d.launch("fsync=0").log(&t.path().join("log2")).start();
    fs::remove_file(d.mnt.join("new")).unwrap();
    fs::remove_dir(d.mnt.join("d")).unwrap();
    let trace = SyncTrace::attach(v.pid(), t.path());
    sync_workload(&d.mnt);
    let calls = trace.finish();
    assert!(calls.is_empty(), "fsync=0 made sync calls: {calls:?}");
}

// ---------------------------------------------------------------------------------------------
// fsyncgate

#[test]
fn failed_fsync_poisons_the_mount_until_remount() {
    require_tools!("mkfs.xfs", "xfs_io", "mkfs.ext2", "losetup");
    // The upper is ext2 on a loop device whose image lives on XFS (itself on a loop device).
    // Shutting that XFS down makes every write-back of the upper fail with EIO, while the
    // upper filesystem itself stays mounted and writable in its page cache: a change that
    // verlay refuses is refused by verlay, not by a dead filesystem.
    let t = scratch("verlay-faults.");
    let outer = LoopFs::new(
        &t.path().join("outer.img"),
        XFS_IMAGE_BYTES,
        &["mkfs.xfs", "-q", "-f"],
        "rw",
        &t.path().join("outer"),
    );
    let inner = LoopFs::new(
        &outer.path().join("inner.img"),
        64 << 20,
        &["mkfs.ext2", "-q", "-F"],
        "errors=continue",
        &t.path().join("inner"),
    );
    let d = dirs(t.path(), inner.path());
    fs::write(d.lower().join("a"), "lower").unwrap();
    // passthrough=0: files opened for writing before the failure are refused too. With
    // passthrough (the default as root) their writes go to the upper file in the kernel and
    // never reach the daemon; their fsyncs still do, and fail (docs/ordering.md).
    let v = d
        .launch("writeback=0,passthrough=0")
        .log(&t.path().join("log"))
        .start();

    fs::write(d.mnt.join("kept"), "before").unwrap();
    let mut other = OpenOptions::new().write(true).open(d.mnt.join("kept")).unwrap();
    let mut f = File::create(d.mnt.join("f")).unwrap();
    f.write_all(&pattern(1 << 20, 1)).unwrap();
    run(
        "xfs_io",
        &["-x", "-c", "shutdown", outer.path().to_str().unwrap()],
    );

    assert_eq!(
        errno_of(f.sync_all()),
        Some(libc::EIO),
        "fsync after the upper's device failed"
    );
    // Never retried as if nothing happened: every later sync and change is EIO.
    assert_eq!(errno_of(f.sync_all()), Some(libc::EIO), "second fsync");
    assert_eq!(errno_of(f.sync_data()), Some(libc::EIO), "fdatasync");
    assert_eq!(errno_of(f.write(b"x")), Some(libc::EIO), "write");
    assert_eq!(
        errno_of(other.write(b"x")),
        Some(libc::EIO),
        "write on another file"
    );
    assert_eq!(errno_of(other.set_len(1)), Some(libc::EIO), "ftruncate");
    assert_eq!(errno_of(File::create(d.mnt.join("g"))), Some(libc::EIO), "create");
    assert_eq!(
        errno_of(fs::create_dir(d.mnt.join("dir"))),
        Some(libc::EIO),
        "mkdir"
    );
    assert_eq!(
        errno_of(fs::remove_file(d.mnt.join("kept"))),
        Some(libc::EIO),
        "unlink"
    );
    assert_eq!(
        errno_of(fs::remove_file(d.mnt.join("a"))),
        Some(libc::EIO),
        "whiteout"
    );
    assert_eq!(
        errno_of(fs::rename(d.mnt.join("kept"), d.mnt.join("k2"))),
        Some(libc::EIO),
        "rename"
    );
    assert_eq!(
        errno_of(fs::set_permissions(
            d.mnt.join("kept"),
            fs::Permissions::from_mode(0o600)
        )),
        Some(libc::EIO),
        "chmod"
    );
    assert_eq!(
        errno_of(OpenOptions::new().append(true).open(d.mnt.join("a"))),
        Some(libc::EIO),
        "copy-up"
    );
    assert_eq!(
        errno_of(File::open(&d.mnt).and_then(|r| r.sync_all())),
        Some(libc::EIO),
        "syncfs"
    );
    // Reads still work.
    assert_eq!(fs::read_to_string(d.mnt.join("a")).unwrap(), "lower");
    assert_eq!(fs::read_to_string(d.mnt.join("kept")).unwrap(), "before");
    // The upper filesystem itself still takes changes (in its page cache): the EIOs above
    // are verlay's refusal, not the filesystem's.
    fs::write(d.upper.join("direct"), "x").unwrap();
    fs::remove_file(d.upper.join("direct")).unwrap();

    let log = v.log();
    assert_eq!(
        log.matches("fsync of the upper failed").count(),
        1,
        "one error line expected:\n{log}"
    );
    drop((f, other, v));
}

// ---------------------------------------------------------------------------------------------
// ENOSPC and EDQUOT

/// Is nothing of a failed copy-up of `name` left: not in the upper, not in the work dir,
/// and the lower file still reads intact through the mount?
fn assert_no_partial_copy_up(d: &Rig, name: &str, want: &[u8]) {
    assert!(
        fs::symlink_metadata(d.upper.join(name)).is_err(),
        "{name}: a partial copy is in the upper"
    );
    assert_eq!(
        d.work_entries(),
        Vec::<String>::new(),
        "{name}: temps left in workdir/work"
    );
    let mut got = Vec::new();
    File::open(d.mnt.join(name))
        .unwrap()
        .read_to_end(&mut got)
        .unwrap();
    assert!(
        got == want,
        "{name}: lower content changed ({} bytes read)",
        got.len()
    );
}

#[test]
fn enospc_reaches_the_application_and_leaves_nothing_half_done() {
    let t = scratch("verlay-faults.");
    let small = Mount::fs(
        &["-t", "tmpfs", "-o", "size=4m", "tmpfs"],
        &t.path().join("tmpfs"),
    );
    let d = dirs(t.path(), &small.mnt);
    let big = pattern(5 << 20, 3); // never fits in 4 MiB
    let little = pattern(256 << 10, 4);
    fs::write(d.lower().join("big"), &big).unwrap();
    fs::write(d.lower().join("little"), &little).unwrap();
    fs::set_permissions(d.lower().join("little"), fs::Permissions::from_mode(0o644)).unwrap();
    let _v = d.launch("").log(&t.path().join("log")).start();
    let baseline = used_bytes(&small.mnt);

    // A copy-up that cannot fit fails with ENOSPC and leaves nothing behind.
    let r = OpenOptions::new().append(true).open(d.mnt.join("big"));
    assert_eq!(
        errno_of(r),
        Some(libc::ENOSPC),
        "copy-up of a 5 MiB file into 4 MiB"
    );
    assert_no_partial_copy_up(&d, "big", &big);
    assert!(
        used_bytes(&small.mnt) <= baseline + (64 << 10),
        "space leaked by a failed copy-up"
    );

    // Filling the upper: write reports ENOSPC, and every byte it reported is there.
    let mut filler = File::create(d.mnt.join("filler")).unwrap();
    let (written, err) = fill(&mut filler);
    assert_eq!(err, libc::ENOSPC, "write on a full upper");
    assert!(written > 2 << 20, "only {written} bytes fit");
    assert_eq!(fs::metadata(d.mnt.join("filler")).unwrap().len(), written);
    assert_eq!(errno_of(filler.write(b"more")), Some(libc::ENOSPC));

    // A copy-up for chmod on the full upper: ENOSPC; the lower file is untouched.
    let r = fs::set_permissions(d.mnt.join("little"), fs::Permissions::from_mode(0o600));
    assert_eq!(
        errno_of(r),
        Some(libc::ENOSPC),
        "copy-up for chmod on a full upper"
    );
    assert_no_partial_copy_up(&d, "little", &little);
    assert_eq!(
        fs::metadata(d.mnt.join("little")).unwrap().permissions().mode() & 0o7777,
        0o644
    );

    // ENOSPC is not a failed fsync: the mount is not poisoned.
    filler.sync_all().unwrap();
    drop(filler);

    // After freeing space, everything works again.
    fs::remove_file(d.mnt.join("filler")).unwrap();
    // The space comes back when the daemon's fd goes, on FUSE's RELEASE, which the kernel
    // sends after close(2) returns.
    let start = Instant::now();
    while used_bytes(&small.mnt) > baseline + (64 << 10) {
        assert!(
            start.elapsed() < WAIT,
            "space of the removed file never came back"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    fs::set_permissions(d.mnt.join("little"), fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(fs::read(d.upper.join("little")).unwrap(), little);
    assert_eq!(
        fs::metadata(d.upper.join("little")).unwrap().permissions().mode() & 0o7777,
        0o600
    );
    let mut f = File::create(d.mnt.join("after")).unwrap();
    f.write_all(&pattern(1 << 20, 5)).unwrap();
    f.sync_all().unwrap();
    assert_eq!(fs::read(d.upper.join("after")).unwrap(), pattern(1 << 20, 5));
    assert_eq!(fs::read(d.mnt.join("big")).unwrap(), big);
    assert_eq!(d.work_entries(), Vec::<String>::new());
}

#[test]
fn edquot_reaches_the_application_and_leaves_nothing_half_done() {
    require_tools!("mkfs.xfs", "xfs_quota", "losetup");
    // XFS enforces a user's block quota whoever writes (no CAP_SYS_RESOURCE bypass as in
    // ext4 or tmpfs), so the daemon, running as root, meets the limit of the file's owner.
    let t = scratch("verlay-faults.");
    let dev = LoopDev::new(&t.path().join("q.img"), XFS_IMAGE_BYTES);
    run("mkfs.xfs", &["-q", "-f", &dev.0]);
    let at = t.path().join("q");
    fs::create_dir_all(&at).unwrap();
    let m = Command::new("mount")
        .args(["-o", "usrquota", &dev.0])
        .arg(&at)
        .output()
        .unwrap();
    if !m.status.success() {
        eprintln!(
            "SKIP edquot: this kernel cannot mount XFS with usrquota (no XFS quota support): {}",
            String::from_utf8_lossy(&m.stderr).trim()
        );
        return;
    }
    let q = Mount::adopt_kernel(&at);
    edquot_with(&t, &q.mnt);
}

fn edquot_with(t: &tempfile::TempDir, qpath: &Path) {
    const QUOTA_UID: u32 = 4242;
    let q = qpath;
    run(
        "xfs_quota",
        &[
            "-x",
            "-c",
            &format!("limit -u bhard=2m {QUOTA_UID}"),
            q.to_str().unwrap(),
        ],
    );
    let d = dirs(t.path(), q);
    let owned = pattern(512 << 10, 6);
    fs::write(d.lower().join("owned"), &owned).unwrap();
    std::os::unix::fs::chown(d.lower().join("owned"), Some(QUOTA_UID), Some(QUOTA_UID)).unwrap();
    let _v = d.launch("").log(&t.path().join("log")).start();

    let mut f = File::create(d.mnt.join("quota")).unwrap();
    std::os::unix::fs::fchown(&f, Some(QUOTA_UID), Some(QUOTA_UID)).unwrap();
    let (written, err) = fill(&mut f);
    assert_eq!(err, libc::EDQUOT, "write past the owner's quota");
    assert!(written <= 2 << 20, "{written} bytes past a 2 MiB quota");
    assert_eq!(fs::metadata(d.mnt.join("quota")).unwrap().len(), written);

    // A copy-up of a file of that owner: EDQUOT, nothing left behind.
    let r = OpenOptions::new().append(true).open(d.mnt.join("owned"));
    assert_eq!(errno_of(r), Some(libc::EDQUOT), "copy-up past the owner's quota");
    assert_no_partial_copy_up(&d, "owned", &owned);

    drop(f);
    fs::remove_file(d.mnt.join("quota")).unwrap();
    let mut f = OpenOptions::new().append(true).open(d.mnt.join("owned")).unwrap();
    f.write_all(b"!").unwrap();
    f.sync_all().unwrap();
    let mut want = owned.clone();
    want.push(b'!');
    assert_eq!(fs::read(d.upper.join("owned")).unwrap(), want);
    assert_eq!(d.work_entries(), Vec::<String>::new());
}

// ---------------------------------------------------------------------------------------------
// upper filesystem features

/// Mount over an upper at `upper_fs` and expect a one-line refusal naming the upperdir and
/// xattrs.
fn assert_refused_for_xattrs(t: &Path, upper_fs: &Path) {
    let d = dirs(&t.join("o"), upper_fs);
    let (st, err) = d
        .launch("")
        .log(&t.join("log-refused"))
        .try_start()
        .err()
        .expect("mounted over an upper without xattr support");
    assert_eq!(st.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "one line expected:\n{err}");
    for want in [
        "upperdir \"",
        "does not support",
        "xattrs",
        "(put upperdir and workdir on a filesystem",
    ] {
        assert!(err.contains(want), "missing {want:?} in: {err}");
    }
}

#[test]
fn upper_without_xattrs_on_vfat_is_refused() {
    require_tools!("mkfs.vfat", "losetup");
    if !fs::read_to_string("/proc/filesystems")
        .unwrap_or_default()
        .contains("vfat")
    {
        eprintln!("SKIP vfat: this kernel has no vfat driver");
        return;
    }
    let t = scratch("verlay-faults.");
    let vfat = LoopFs::new(
        &t.path().join("vfat.img"),
        16 << 20,
        &["mkfs.vfat"],
        "rw",
        &t.path().join("vfat"),
    );
    assert_refused_for_xattrs(t.path(), vfat.path());
}

#[test]
fn upper_without_xattrs_on_ramfs_is_refused() {
    // ramfs has no xattr handlers at all (neither trusted.* nor user.*) and needs no tool.
    if !fs::read_to_string("/proc/filesystems")
        .unwrap_or_default()
        .contains("ramfs")
    {
        eprintln!("SKIP ramfs: this kernel has no ramfs");
        return;
    }
    let t = scratch("verlay-faults.");
    let ram = Mount::fs(&["-t", "ramfs", "ramfs"], &t.path().join("ramfs"));
    assert_refused_for_xattrs(t.path(), &ram.mnt);
}
