//! `writeback=1` (the kernel's FUSE writeback cache) on real FUSE mounts: what is written reads
//! back through the mount and, after fsync or close, from the upper file itself; partial-page
//! writes to files opened O_WRONLY (the kernel reads the rest of the page through that handle);
//! O_APPEND (done by the kernel, at the kernel's end of file); shared mmap writes and msync;
//! the mtime the kernel keeps reaches the upper; `verlay commit` while a writer still has dirty
//! pages puts what was written before the commit started into the layer; a write-back that
//! fails (the upper full) is reported at fsync or close, never lost silently.
//!
//! Needs root and /dev/fuse. Every daemon is unmounted and reaped by a Drop guard (by PID).

// The mmap test maps a file (memmap2's map_mut is unsafe).
#![allow(unsafe_code)]

#[macro_use]
mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;

const LOGGED: &str = "FUSE writeback cache on";

/// A rig (one lower, upper, work, mountpoint) in a temp dir, with a store dir for commits.
struct Wb {
    dir: tempfile::TempDir,
    rig: Rig,
}

impl Wb {
    fn new(name: &str) -> Wb {
        let dir = scratch(&format!("verlay-writeback-{name}."));
        let rig = Rig::named(dir.path(), &["lower"], "upper", "work", "mnt");
        Wb { dir, rig }
    }

    /// Mount with `writeback=1`; panics unless the daemon says the kernel took it.
    fn mount(&self) -> Mount {
        let m = self
            .rig
            .launch("writeback=1")
            .env("RUST_LOG", "verlay=info")
            .ready_when_logged("control socket ready")
            .start();
        assert!(m.log().contains(LOGGED), "writeback cache not on:\n{}", m.log());
        m
    }

    fn m(&self, rel: &str) -> PathBuf {
        self.rig.mnt.join(rel)
    }

    fn up(&self, rel: &str) -> PathBuf {
        self.rig.upper.join(rel)
    }
}

/// Bytes `i*7+salt` mod 251: no two neighbouring pages alike.
fn pattern(len: usize, salt: u8) -> Vec<u8> {
    (0..len).map(|i| ((i * 7 + salt as usize) % 251) as u8).collect()
}

#[test]
fn written_data_reads_back_and_reaches_the_upper_at_fsync() {
    let w = Wb::new("rw");
    let _m = w.mount();
    let data = pattern(300_000, 1);
    let mut f = File::create(w.m("new")).unwrap();
    f.write_all(&data).unwrap();
    // Through the mount (the kernel's pages) before anything reached the daemon perhaps.
    assert_eq!(fs::read(w.m("new")).unwrap(), data);
    f.sync_all().unwrap();
    // The upper file itself, after fsync returned: every byte is there.
    assert_eq!(fs::read(w.up("new")).unwrap(), data, "upper after fsync");
    // A rewrite in the middle, then fdatasync.
    f.write_all_at(b"MIDDLE", 150_001).unwrap();
    f.sync_data().unwrap();
    let mut want = data.clone();
    want[150_001..150_007].copy_from_slice(b"MIDDLE");
    assert_eq!(fs::read(w.up("new")).unwrap(), want, "upper after fdatasync");
    assert_eq!(fs::read(w.m("new")).unwrap(), want);
}

#[test]
fn partial_page_writes_to_write_only_files_keep_the_rest_of_the_page() {
    let w = Wb::new("wronly");
    let lower = pattern(10_000, 2);
    fs::write(w.rig.lower().join("low"), &lower).unwrap();
    let _m = w.mount();
    // A lower file opened O_WRONLY (copied up by the open): 100 bytes inside the second page,
    // and 10 bytes that straddle the end of the file. The kernel reads the rest of each page
    // through the write-only handle.
    let f = OpenOptions::new().write(true).open(w.m("low")).unwrap();
    f.write_all_at(&[b'x'; 100], 5000).unwrap();
    f.write_all_at(&[b'y'; 10], 9995).unwrap();
    drop(f);
    let mut want = lower.clone();
    want[5000..5100].fill(b'x');
    want.truncate(9995);
    want.extend_from_slice(&[b'y'; 10]);
    assert_eq!(fs::read(w.m("low")).unwrap(), want, "through the mount");
    // close wrote the dirty pages back (fuse_flush): the upper has them without an fsync.
    assert_eq!(fs::read(w.up("low")).unwrap(), want, "upper after close");

    // An upper file made O_WRONLY, closed, opened O_WRONLY again for one byte.
    let up = pattern(6000, 3);
    fs::write(w.m("made"), &up).unwrap();
    let f = OpenOptions::new().write(true).open(w.m("made")).unwrap();
    f.write_all_at(b"Z", 4097).unwrap();
    drop(f);
    let mut want = up;
    want[4097] = b'Z';
    assert_eq!(fs::read(w.up("made")).unwrap(), want);
    assert_eq!(fs::read(w.m("made")).unwrap(), want);
}

#[test]
fn o_append_appends_at_the_end_from_every_handle() {
    let w = Wb::new("append");
    fs::write(w.rig.lower().join("log"), b"lower\n").unwrap();
    let _m = w.mount();
    let open = || OpenOptions::new().append(true).open(w.m("log")).unwrap();
    let (mut a, mut b) = (open(), open());
    let mut want = b"lower\n".to_vec();
    for i in 0..50 {
        let (f, tag) = if i % 2 == 0 { (&mut a, "a") } else { (&mut b, "b") };
        let line = format!("{tag}{i}\n");
        f.write_all(line.as_bytes()).unwrap();
        want.extend_from_slice(line.as_bytes());
    }
    // An O_APPEND write ignores the offset of a seek before it.
    a.seek(SeekFrom::Start(0)).unwrap();
    a.write_all(b"end\n").unwrap();
    want.extend_from_slice(b"end\n");
    drop((a, b));
    assert_eq!(fs::read(w.m("log")).unwrap(), want);
    assert_eq!(fs::read(w.up("log")).unwrap(), want, "upper after close");
}

#[test]
fn shared_mmap_writes_reach_the_upper_at_msync() {
    let w = Wb::new("mmap");
    fs::write(w.rig.lower().join("mapped"), pattern(3 * 4096, 4)).unwrap();
    let _m = w.mount();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(w.m("mapped"))
        .unwrap();
    // SAFETY: the file is this test's; nothing else maps or truncates it while mapped.
    let mut map = unsafe { memmap2::MmapMut::map_mut(&f) }.unwrap();
    map[5000..5009].copy_from_slice(b"via mmap!");
    map.flush().unwrap(); // msync(MS_SYNC)
    let upper = fs::read(w.up("mapped")).unwrap();
    assert_eq!(&upper[5000..5009], b"via mmap!", "upper after msync");
    assert_eq!(upper.len(), 3 * 4096);
    drop(map);
}

#[test]
fn the_mtime_the_kernel_keeps_reaches_the_upper() {
    let w = Wb::new("mtime");
    let _m = w.mount();
    fs::write(w.m("f"), b"first").unwrap();
    let before = fs::metadata(w.m("f")).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let mut f = OpenOptions::new().write(true).open(w.m("f")).unwrap();
    f.write_all(b"second").unwrap();
    let during = fs::metadata(w.m("f")).unwrap();
    assert!(
        (during.mtime(), during.mtime_nsec()) > (before.mtime(), before.mtime_nsec()),
        "mtime did not move at write(2)"
    );
    assert_eq!(during.len(), 6);
    f.sync_all().unwrap();
    drop(f);
    let mount = fs::metadata(w.m("f")).unwrap();
    let upper = fs::metadata(w.up("f")).unwrap();
    assert_eq!(
        (mount.mtime(), mount.mtime_nsec()),
        (upper.mtime(), upper.mtime_nsec()),
        "the mount's mtime is not the upper's"
    );
    assert_eq!(
        (mount.mtime(), mount.mtime_nsec()),
        (during.mtime(), during.mtime_nsec()),
        "the mtime changed after the write"
    );
    assert_eq!(upper.len(), 6);
}

/// `verlay commit MNT --store STORE`: the layer's diff dir.
fn commit(w: &Wb) -> PathBuf {
    let store = w.dir.path().join("store");
    fs::create_dir_all(&store).unwrap();
    let o = Command::new(verlay_bin())
        .args([
            "commit",
            w.rig.mnt.to_str().unwrap(),
            "--store",
            store.to_str().unwrap(),
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "commit failed: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let chain = out
        .lines()
        .find_map(|l| l.strip_prefix("chain_id "))
        .unwrap_or_else(|| panic!("no chain_id in {out:?}"))
        .trim()
        .trim_start_matches("sha256:")
        .to_string();
    store.join("layers").join(chain).join("diff")
}

#[test]
fn commit_while_a_writer_has_dirty_pages_holds_what_was_written_before_it() {
    let w = Wb::new("commit");
    fs::write(w.rig.lower().join("low"), pattern(20_000, 5)).unwrap();
    let _m = w.mount();
    // Written, neither fsynced nor closed: the data sits in the kernel's dirty pages.
    let data = pattern(1 << 20, 6);
    let mut f = File::create(w.m("open")).unwrap();
    f.write_all(&data).unwrap();
    let g = OpenOptions::new().write(true).open(w.m("low")).unwrap();
    g.write_all_at(b"patched", 12_345).unwrap();
    let diff = commit(&w);
    assert_eq!(
        fs::read(diff.join("open")).unwrap(),
        data,
        "open file in the layer"
    );
    let mut want = pattern(20_000, 5);
    want[12_345..12_352].copy_from_slice(b"patched");
    assert_eq!(
        fs::read(diff.join("low")).unwrap(),
        want,
        "patched lower file in the layer"
    );
    // The writer goes on after the commit, unharmed.
    f.write_all(b"after").unwrap();
    f.sync_all().unwrap();
    drop((f, g));
    assert_eq!(fs::metadata(w.up("open")).unwrap().len(), (1 << 20) + 5);
}

#[test]
fn a_failed_write_back_is_reported_at_fsync_or_close() {
    // The upper on a 2 MiB tmpfs; 8 MiB written through the cache cannot all fit.
    let w = Wb::new("full");
    let small = w.dir.path().join("small");
    fs::create_dir_all(&small).unwrap();
    let _tmpfs = Mount::fs(&["-t", "tmpfs", "-o", "size=2m", "tmpfs"], &small);
    let rig = Rig::at(
        std::slice::from_ref(&w.rig.lowers[0]),
        &small.join("upper"),
        &small.join("work"),
        &w.rig.mnt,
    );
    let m = rig
        .launch("writeback=1")
        .env("RUST_LOG", "verlay=info")
        .ready_when_logged("control socket ready")
        .start();
    assert!(m.log().contains(LOGGED), "writeback cache not on:\n{}", m.log());
    let chunk = vec![b'q'; 1 << 20];
    let mut f = File::create(w.m("big")).unwrap();
    let mut failed = Vec::new();
    for _ in 0..8 {
        if let Err(e) = f.write_all(&chunk) {
            failed.push(format!("write: {e}"));
            break;
        }
    }
    if let Err(e) = f.sync_all() {
        failed.push(format!("fsync: {e}"));
    }
    // close(2) itself: std's File drop ignores its result, so close the fd by hand.
    let fd = std::os::fd::IntoRawFd::into_raw_fd(f);
    // SAFETY: fd was just released by the File and is closed exactly once.
    if unsafe { libc::close(fd) } != 0 {
        failed.push(format!("close: {}", std::io::Error::last_os_error()));
    }
    assert!(
        !failed.is_empty(),
        "8 MiB written to a 2 MiB upper and nothing reported an error"
    );
    eprintln!("reported: {failed:?}");
    let on_upper = fs::metadata(rig.upper.join("big")).map(|m| m.len()).unwrap_or(0);
    assert!(on_upper < 8 << 20, "upper holds {on_upper} bytes");
    drop(m);
}

/// Read `p` whole, or the error.
fn read_all(p: &Path) -> std::io::Result<Vec<u8>> {
    let mut v = Vec::new();
    File::open(p)?.read_to_end(&mut v)?;
    Ok(v)
}

#[test]
fn writeback_0_and_read_only_mounts_leave_the_cache_off() {
    let w = Wb::new("off");
    fs::write(w.rig.lower().join("a"), b"a").unwrap();
    let m = w
        .rig
        .launch("writeback=0")
        .env("RUST_LOG", "verlay=info")
        .ready_when_logged("control socket ready")
        .start();
    assert!(!m.log().contains(LOGGED));
    drop(m);
    let ro = Launch::verlay(
        &format!("lowerdir={},writeback=1", w.rig.lower().display()),
        &w.rig.mnt,
    )
    .env("RUST_LOG", "verlay=info")
    .start();
    assert_eq!(read_all(&w.m("a")).unwrap(), b"a");
    assert!(!ro.log().contains(LOGGED));
}

#[test]
fn syncfs_of_the_mount_succeeds_after_unlinks_and_renames_over() {
    // The kernel writes back the ctime of a removed file after its last close (SETATTR on a
    // node no name or fd reaches); an error there would fail every later syncfs of the mount,
    // and so `verlay commit`. Seen as ENOENT before the daemon answered it.
    let w = Wb::new("syncfs");
    fs::write(w.rig.lower().join("lowfile"), b"low").unwrap();
    fs::create_dir_all(w.rig.lower().join("lowdir")).unwrap();
    fs::write(w.rig.lower().join("lowdir/a"), b"a").unwrap();
    let _m = w.mount();
    fs::write(w.m("made"), b"made").unwrap();
    fs::remove_file(w.m("made")).unwrap();
    fs::remove_file(w.m("lowfile")).unwrap();
    fs::remove_dir_all(w.m("lowdir")).unwrap();
    fs::write(w.m("target"), b"old").unwrap();
    fs::write(w.m("tmp"), b"new").unwrap();
    fs::rename(w.m("tmp"), w.m("target")).unwrap();
    let root = File::open(&w.rig.mnt).unwrap();
    rustix::fs::syncfs(&root).expect("syncfs of the mount");
    assert_eq!(fs::read(w.up("target")).unwrap(), b"new");
}
