//! `-d` (and `-o debug`) log every FUSE request at debug level, one line each with the op,
//! the node, the entry name where the request has one, the result (ok or the errno's name)
//! and the microseconds it took; without them no request line is written.
//!
//! Real mount: the daemon runs in the foreground under a guard that unmounts and kills it
//! by PID; every wait is bounded.
#[macro_use]
mod common;

use std::fs;
use std::path::Path;
use std::time::Duration;

use common::{Mount, Rig};

/// Longest wait for the mount to appear or the daemon to exit.
const WAIT: Duration = Duration::from_secs(20);

/// A foreground daemon over `dir/{l,u,w}` at `dir/m` (`l/x` holds "lower\n"), logging to
/// `log`; the common [`Mount`] guard unmounts it and ends it by PID (`unmount()` early).
fn start(dir: &Path, debug: &[&str], log: &Path) -> Mount {
    let rig = Rig::named(dir, &["l"], "u", "w", "m");
    fs::write(dir.join("l/x"), "lower\n").unwrap();
    let mut l = rig
        .launch("")
        .log(&dir.join("stderr.log"))
        .env_remove("RUST_LOG")
        .env("VERLAY_LOG_FILE", log)
        .timeout(WAIT);
    for a in debug {
        l = l.arg(a);
    }
    l.start()
}

/// lookup (a miss), create, write, read, unlink on the mount.
fn workload(mnt: &Path) {
    assert_eq!(fs::read_to_string(mnt.join("x")).unwrap(), "lower\n");
    let e = fs::metadata(mnt.join("nope")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
    fs::write(mnt.join("new"), "upper\n").unwrap();
    assert_eq!(fs::read_to_string(mnt.join("new")).unwrap(), "upper\n");
    fs::remove_file(mnt.join("new")).unwrap();
}

/// The request lines of the log, as `(op, ino, path, result, us)`.
fn requests(log: &str) -> Vec<(String, u64, String, String, u64)> {
    let field = |line: &str, k: &str| -> Option<String> {
        let at = line.find(&format!(" {k}="))? + k.len() + 2;
        let rest = &line[at..];
        let v = rest.split(' ').next().unwrap_or("");
        Some(v.trim_matches('"').to_string())
    };
    log.lines()
        .filter(|l| l.contains(" request "))
        .map(|l| {
            let get = |k: &str| field(l, k).unwrap_or_else(|| panic!("no {k}= in {l:?}"));
            (
                get("op"),
                get("ino").parse().unwrap_or_else(|_| panic!("ino in {l:?}")),
                get("path"),
                get("result"),
                get("us").parse().unwrap_or_else(|_| panic!("us in {l:?}")),
            )
        })
        .collect()
}

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("verlay-debuglog.")
        .tempdir()
        .unwrap()
}

#[test]
fn debug_logs_one_line_per_request_with_op_ino_name_result_and_micros() {
    for debug in [&["-d"][..], &["-o", "debug"][..]] {
        let t = tmp();
        let log = t.path().join("log");
        let mut m = start(t.path(), debug, &log);
        workload(&m.mnt);
        m.unmount();
        let text = fs::read_to_string(&log).unwrap();
        let reqs = requests(&text);
        let has = |op: &str, path: &str, result: &str| {
            reqs.iter()
                .any(|(o, ino, p, r, _)| o == op && *ino == 1 && p == path && r == result)
        };
        assert!(
            has("lookup", "nope", "ENOENT"),
            "{debug:?}: missed lookup:\n{text}"
        );
        assert!(has("lookup", "x", "ok"), "{debug:?}: lookup x:\n{text}");
        assert!(has("create", "new", "ok"), "{debug:?}: create:\n{text}");
        assert!(has("unlink", "new", "ok"), "{debug:?}: unlink:\n{text}");
        for op in ["open", "read", "write", "release"] {
            assert!(
                reqs.iter()
                    .any(|(o, ino, _, r, _)| o == op && *ino > 1 && r == "ok"),
                "{debug:?}: no {op}:\n{text}"
            );
        }
        // One line per request: the single create and the single unlink appear once each.
        assert_eq!(reqs.iter().filter(|r| r.0 == "create").count(), 1, "{text}");
        assert_eq!(reqs.iter().filter(|r| r.0 == "unlink").count(), 1, "{text}");
        assert!(reqs.iter().all(|r| r.4 < 10_000_000), "implausible us:\n{text}");
    }
}

#[test]
fn without_debug_no_request_is_logged() {
    let t = tmp();
    let log = t.path().join("log");
    let mut m = start(t.path(), &[], &log);
    workload(&m.mnt);
    m.unmount();
    let text = fs::read_to_string(&log).unwrap_or_default();
    assert!(requests(&text).is_empty(), "{text}");
}
