//! One test per bug found, each with a line saying what it was.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_verlay");

/// A mount and the temp dir under it (kept alive until after the unmount).
struct Mounted(std::path::PathBuf, #[allow(dead_code)] tempfile::TempDir);
impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.0)
            .stderr(Stdio::null())
            .status();
    }
}

fn mount_over(fill: impl FnOnce(&Path)) -> Mounted {
    let tmp = tempfile::Builder::new()
        .prefix("verlay-regress-")
        .tempdir_in("/tmp")
        .unwrap();
    let t = tmp.path();
    for d in ["l", "u", "w", "m"] {
        fs::create_dir(t.join(d)).unwrap();
    }
    fs::set_permissions(t, fs::Permissions::from_mode(0o755)).unwrap();
    fill(&t.join("l"));
    // passthrough=1 (opt-in): its backing files are one more thing that could leak fds.
    let o = format!(
        "lowerdir={},upperdir={},workdir={},passthrough=1",
        t.join("l").display(),
        t.join("u").display(),
        t.join("w").display()
    );
    let st = Command::new(BIN)
        .arg("-o")
        .arg(o)
        .arg(t.join("m"))
        .status()
        .unwrap();
    assert!(st.success());
    let m = t.join("m");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .contains(&*m.to_string_lossy())
    {
        assert!(Instant::now() < deadline, "not mounted");
        std::thread::sleep(Duration::from_millis(10));
    }
    Mounted(m, tmp)
}

/// readdirplus entries carried st_ino as their node id (upstream fuser sends `attr.ino`), so
/// after `ls -l` the kernel addressed files by numbers that were not node ids: opens failed
/// with ESTALE and lookup references leaked (memory never fell after the kernel forgot).
#[test]
fn files_listed_with_attributes_can_be_opened() {
    let m = mount_over(|l| {
        fs::create_dir(l.join("d")).unwrap();
        for i in 0..300 {
            fs::write(l.join(format!("d/f{i}")), format!("content {i}\n")).unwrap();
        }
    });
    // `ls -l`: the kernel asks for READDIRPLUS and then stats every entry.
    let out = Command::new("ls").arg("-l").arg(m.0.join("d")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for i in 0..300 {
        let p = m.0.join(format!("d/f{i}"));
        assert_eq!(
            fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
            format!("content {i}\n")
        );
    }
    // A write through a listed name lands in the right file.
    fs::write(m.0.join("d/f7"), "changed\n").unwrap();
    assert_eq!(fs::read_to_string(m.0.join("d/f7")).unwrap(), "changed\n");
    assert_eq!(fs::read_to_string(m.0.join("d/f8")).unwrap(), "content 8\n");
}

/// The daemon of the mount at `m`: the process with the mountpoint as an argument.
fn daemon_of(m: &Path) -> u32 {
    let want = m.as_os_str().as_encoded_bytes();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        if cmd.split(|b| *b == 0).any(|a| a == want) {
            return pid;
        }
    }
    panic!("no daemon for {}", m.display());
}

fn open_fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

/// Issue 6's memory target: file descriptors of the daemon must not grow under mkdir/rmdir
/// loops or mmap/munmap of lower and upper files (each would leak an fd per round if a
/// handle, a directory snapshot or a passthrough backing file were never closed).
#[test]
#[allow(unsafe_code)] // memmap2's map calls; the mapped files are this test's own
fn daemon_fds_do_not_grow_under_mkdir_rmdir_and_mmap_loops() {
    let m = mount_over(|l| {
        fs::create_dir(l.join("d")).unwrap();
        fs::write(l.join("d/low"), vec![7u8; 64 * 1024]).unwrap();
    });
    let pid = daemon_of(&m.0);
    fs::write(m.0.join("up"), vec![9u8; 64 * 1024]).unwrap();
    let round = |i: usize| {
        let d = m.0.join(format!("d/sub{}", i % 3));
        fs::create_dir(&d).unwrap();
        fs::create_dir(d.join("inner")).unwrap();
        fs::remove_dir(d.join("inner")).unwrap();
        fs::remove_dir(&d).unwrap();
        for f in ["d/low", "up"] {
            let file = fs::File::open(m.0.join(f)).unwrap();
            // SAFETY: the file is not changed while mapped (this test is its only user).
            let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
            assert_eq!(map.len(), 64 * 1024);
            assert!(map[4096] == 7 || map[4096] == 9);
        }
        let rw = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(m.0.join("up"))
            .unwrap();
        // SAFETY: as above; the shared mapping writes the upper file only.
        let mut map = unsafe { memmap2::MmapMut::map_mut(&rw) }.unwrap();
        map[0] = i as u8;
        map.flush().unwrap();
    };
    // Warm up (thread stacks, first handles), then count.
    for i in 0..20 {
        round(i);
    }
    std::thread::sleep(Duration::from_millis(200));
    let before = open_fds(pid);
    for i in 0..500 {
        round(i);
    }
    // Releases are asynchronous: give the daemon a moment to process the last ones.
    std::thread::sleep(Duration::from_millis(300));
    let after = open_fds(pid);
    assert!(
        after <= before + 2,
        "daemon fds grew from {before} to {after} over 500 rounds"
    );
    assert_eq!(fs::read(m.0.join("d/low")).unwrap(), vec![7u8; 64 * 1024]);
}
