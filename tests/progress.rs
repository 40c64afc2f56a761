//! Progress of `verlay layer import` and `verlay image import`: on a terminal a drawn bar with
//! byte counts; without one exactly one summary line on stderr; with `--quiet` nothing on
//! stderr; stdout (the chain ID, the `lowerdir=` value) the same in all three.
//!
//! The terminal is a real pseudo-terminal: util-linux `script` runs the command on one.
use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use sha2::{Digest, Sha256};

const BIN: &str = env!("CARGO_BIN_EXE_verlay");
/// Watchdog for each command: an import of a few MiB takes well under a second.
const TIMEOUT_SECS: &str = "60";

fn run(args: &[&str]) -> Output {
    let out = Command::new("timeout")
        .arg(TIMEOUT_SECS)
        .arg(BIN)
        .args(args)
        .output()
        .expect("run verlay");
    assert!(
        out.status.success(),
        "verlay {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `verlay ARGS` with stdout and stderr on a pseudo-terminal; returns what it drew.
fn run_on_pty(args: &[&str]) -> String {
    let cmd = std::iter::once(BIN)
        .chain(args.iter().copied())
        .map(|a| format!("'{a}'"))
        .collect::<Vec<_>>()
        .join(" ");
    let out = Command::new("timeout")
        .args([TIMEOUT_SECS, "script", "-qfec", &cmd, "/dev/null"])
        .env("TERM", "xterm")
        .output()
        .expect("run script (util-linux)");
    assert!(out.status.success(), "script {cmd}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A layer tarball of `dir` with a 3 MiB file (random bytes, so it is not all one block).
fn layer_tar(dir: &Path, name: &str, seed: u8) -> Vec<u8> {
    let src = dir.join(format!("{name}.src"));
    fs::create_dir_all(src.join("d")).unwrap();
    let mut x: u32 = 0x9e37_79b9 ^ u32::from(seed);
    let big: Vec<u8> = (0..3 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    fs::write(src.join("d/big"), &big).unwrap();
    fs::write(src.join(format!("{name}.txt")), name).unwrap();
    let mut b = tar::Builder::new(Vec::new());
    b.append_dir_all(".", &src).unwrap();
    b.into_inner().unwrap()
}

fn sha256(b: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(b))
}

/// A docker-archive directory with two layers.
fn docker_archive(dir: &Path) -> std::path::PathBuf {
    let img = dir.join("img");
    fs::create_dir_all(&img).unwrap();
    let mut diff_ids = Vec::new();
    for (i, n) in ["l1", "l2"].iter().enumerate() {
        let t = layer_tar(dir, n, i as u8);
        diff_ids.push(sha256(&t));
        fs::write(img.join(format!("{n}.tar")), t).unwrap();
    }
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    fs::write(img.join("config.json"), serde_json::to_vec(&config).unwrap()).unwrap();
    let manifest = serde_json::json!([{
        "Config": "config.json", "RepoTags": ["test:1"], "Layers": ["l1.tar", "l2.tar"],
    }]);
    fs::write(img.join("manifest.json"), serde_json::to_vec(&manifest).unwrap()).unwrap();
    img
}

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("verlay-progress.")
        .tempdir()
        .unwrap()
}

#[test]
fn layer_import_draws_a_bar_on_a_terminal_and_one_line_otherwise() {
    let t = tmp();
    let tar = t.path().join("l.tar");
    fs::write(&tar, layer_tar(t.path(), "l", 0)).unwrap();
    let tar = tar.to_str().unwrap();
    let store = |n: &str| t.path().join(n).to_str().unwrap().to_owned();

    let plain = run(&["layer", "import", "--store", &store("s1"), tar]);
    let chain = String::from_utf8(plain.stdout).unwrap();
    assert!(
        chain.starts_with("sha256:") && chain.lines().count() == 1,
        "{chain:?}"
    );
    let err = String::from_utf8(plain.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "one summary line: {err:?}");
    assert!(
        err.starts_with(&format!("verlay: imported {tar}: 1 layer, 3.0 MiB in ")) && err.ends_with(" s\n"),
        "{err:?}"
    );
    assert!(!err.contains('\r') && !err.contains('\x1b'), "{err:?}");

    let quiet = run(&["layer", "import", "--quiet", "--store", &store("s2"), tar]);
    assert_eq!(String::from_utf8(quiet.stdout).unwrap(), chain);
    assert_eq!(
        String::from_utf8_lossy(&quiet.stderr),
        "",
        "--quiet prints nothing on stderr"
    );

    let drawn = run_on_pty(&["layer", "import", "--store", &store("s3"), tar]);
    assert!(
        drawn.contains('\r') || drawn.contains("\x1b["),
        "no drawing: {drawn:?}"
    );
    assert!(drawn.contains("layer ["), "no bar: {drawn:?}");
    assert!(
        drawn.contains("3.00 MiB/3.00 MiB"),
        "no final byte count: {drawn:?}"
    );
    assert!(drawn.contains(chain.trim()), "stdout missing: {drawn:?}");
}

#[test]
fn image_import_counts_layers_on_a_terminal_and_one_line_otherwise() {
    let t = tmp();
    let img = docker_archive(t.path());
    let img = img.to_str().unwrap();
    let store = |n: &str| t.path().join(n).to_str().unwrap().to_owned();

    let plain = run(&["image", "import", "--store", &store("s1"), img]);
    let lowerdir = String::from_utf8(plain.stdout).unwrap();
    assert_eq!(lowerdir.trim().split(':').count(), 2, "{lowerdir:?}");
    let err = String::from_utf8(plain.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "one summary line: {err:?}");
    assert!(
        err.starts_with(&format!("verlay: imported {img}: 2 layers, 6.0 MiB in ")),
        "{err:?}"
    );

    let quiet = run(&["image", "import", "--quiet", "--store", &store("s2"), img]);
    assert_eq!(
        String::from_utf8_lossy(&quiet.stderr),
        "",
        "--quiet prints nothing on stderr"
    );
    assert_eq!(quiet.stdout.len(), lowerdir.len());

    let drawn = run_on_pty(&["image", "import", "--store", &store("s3"), img]);
    assert!(drawn.contains("\x1b["), "no drawing: {drawn:?}");
    assert!(
        drawn.contains("layers [") && drawn.contains("2/2"),
        "no layer bar: {drawn:?}"
    );
    assert!(drawn.contains("layer 2/2 ["), "no byte bar: {drawn:?}");
    assert!(
        drawn.contains("3.00 MiB/3.00 MiB"),
        "no final byte count: {drawn:?}"
    );
    assert!(drawn.contains("verlay: imported"), "no summary: {drawn:?}");
}
