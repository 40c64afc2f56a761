//! External tools for tests: is one installed, and run one that must succeed. Only std, so
//! that test binaries of both workspace crates can include it (`tests/common/mod.rs` does,
//! and `snapshotter/tests/powercut.rs` by a `#[path]` to this file).

use std::process::{Command, Stdio};

pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

pub fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}
