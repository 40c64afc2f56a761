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
    let o = format!(
        "lowerdir={},upperdir={},workdir={}",
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
