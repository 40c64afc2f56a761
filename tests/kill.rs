//! The daemon killed on a real mount, then remounted on the same upper and work dirs: every
//! path shows its old or its new content (never a torn or empty copy-up, never a temp file,
//! never a `#verlay.*` name), a deleted lower file never comes back once its whiteout is
//! published, a renamed file is never lost nor duplicated, the work dir is empty after the
//! remount, and the lower layer is never written.
//!
//! What this models: a crash of the daemon process (SIGKILL). The kernel's page cache of the
//! upper filesystem survives, so every write the daemon completed is still there; power loss
//! (dropping what was not fsynced) is not modelled here but by the simulated store.
//!
//! The tests:
//! - `every_crash_point_leaves_old_or_new_view`: for each named crash point of the upper writer
//!   (src/upper/, listed in docs/ordering.md) a small deterministic workload that reaches
//!   it runs once without a crash (giving the old and the new merged view) and once with
//!   `VERLAY_CRASH_AT=<step>[:N]` in the daemon's environment, which SIGKILLs itself right after
//!   that step (the request in flight fails with ENOTCONN/ECONNABORTED); the test lazily
//!   unmounts the dead mount, remounts without the variable on the same upper and work dirs and
//!   compares (kind, content, mode, owner, user xattrs of every path). Where a point is past
//!   the publishing step it must show the new view, before it the old one. It also checks that
//!   every `crash_point("...")` in src/upper/ is reached by some workload, and prints the
//!   number of points enumerated.
//! - One test per point where the code once broke the invariant (regressions; a new one found
//!   would be kept as `#[ignore = "bug: ..."]` until fixed).
//! - `kill_9_at_seeded_moments_keeps_completed_and_fsynced_writes`: a seeded workload of
//!   appends, creates, atomic replaces (write temp, fsync, rename, fsync dir), renames and
//!   unlinks, with fsync on some files; the daemon is killed by PID after a seeded delay, the
//!   mount remounted and checked against a model: every call that returned is there (a killed
//!   process loses nothing the kernel already has), the interrupted call happened or not (an
//!   interrupted write may have left a prefix), fsynced data is there in full. Six kills per
//!   upper, so the state accumulates. `VERLAY_KILL_ROUNDS` kills in all (default 200, about
//!   10 s on 2 cores), seeds from `VERLAY_KILL_SEED`. The soak (docs/ordering.md):
//!   `VERLAY_KILL_ROUNDS=5000 cargo test --release --test kill -- kill_9 --nocapture`.
//!
//! Needs root and /dev/fuse. Every mount and daemon is undone by a Drop guard (by PID), also
//! when a test panics.

// common's syscall helpers (xattrs, mknod) use libc directly.
#![allow(unsafe_code)]

#[macro_use]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{as_user, fnv, read_all, scratch, user_xattrs, Mount, Rig, Rng};

/// The variable the daemon reads its crash point from (src/upper/mod.rs).
const CRASH_AT: &str = "VERLAY_CRASH_AT";
/// Kills in the seeded test when `VERLAY_KILL_ROUNDS` is not set (about 10 s on 2 cores).
const DEFAULT_KILL_ROUNDS: usize = 200;
/// Kills on one upper before starting over with a fresh one (state accumulates in between).
const KILLS_PER_UPPER: usize = 6;
/// Upper bound of the seeded delay between a mount and its kill.
const MAX_KILL_DELAY_US: u64 = 40_000;
/// A workload that was never interrupted stops here (the kill did not land).
const MAX_OPS_PER_ROUND: usize = 200_000;

// ---------------------------------------------------------------------------------------------
// rigs and daemons (the common Rig and Mount guard, tests/common)

/// The dirs of one overlay over a shared `lower`: `base/NAME.upper`, `.work` and `.mnt`.
fn dirs(base: &Path, lower: &Path, name: &str) -> Rig {
    Rig::at(
        &[lower.to_path_buf()],
        &base.join(format!("{name}.upper")),
        &base.join(format!("{name}.work")),
        &base.join(format!("{name}.mnt")),
    )
}

/// verlay in the foreground on `d`, with `VERLAY_CRASH_AT` set to `crash_at` or removed, and
/// the options in `VERLAY_KILL_EXTRA_OPTS` (e.g. `writeback=1`) when set.
fn daemon(d: &Rig, crash_at: Option<&str>, log: &Path) -> Mount {
    let extra = std::env::var("VERLAY_KILL_EXTRA_OPTS").unwrap_or_default();
    let mut l = d.launch(&extra).log(log).env_remove(CRASH_AT);
    if let Some(step) = crash_at {
        l = l.env(CRASH_AT, step);
    }
    l.start()
}

/// Did a call fail because the daemon is gone?
fn is_dead_daemon(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOTCONN) | Some(libc::ECONNABORTED))
}

// ---------------------------------------------------------------------------------------------
// tree views

/// A tree as `path -> description` (kind, permissions, owner, content digest or symlink target,
/// user xattrs). Times and inode numbers are left out: they legitimately change.
type View = BTreeMap<String, String>;

fn walk(root: &Path, rel: &str, with_times: bool, out: &mut View) {
    let p = if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(rel)
    };
    let m = fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
    let ft = m.file_type();
    let what = if ft.is_dir() {
        "d".to_string()
    } else if ft.is_file() {
        let data = read_all(&p).unwrap_or_else(|e| panic!("read {}: errno {e}", p.display()));
        format!("f len={} fnv={:016x}", data.len(), fnv(&data))
    } else if ft.is_symlink() {
        format!("l ->{}", fs::read_link(&p).unwrap().display())
    } else {
        format!("node rdev={:x}", m.rdev())
    };
    let mut desc = format!(
        "{what} mode={:o} owner={}:{} xattrs={:?}",
        m.mode() & 0o7777,
        m.uid(),
        m.gid(),
        user_xattrs(&p).unwrap_or_default()
    );
    if with_times && !ft.is_dir() {
        desc.push_str(&format!(" mtime={}.{}", m.mtime(), m.mtime_nsec()));
    }
    out.insert(if rel.is_empty() { "/".into() } else { rel.into() }, desc);
    if ft.is_dir() {
        let mut names: Vec<String> = fs::read_dir(&p)
            .unwrap_or_else(|e| panic!("readdir {}: {e}", p.display()))
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for n in names {
            let r = if rel.is_empty() { n } else { format!("{rel}/{n}") };
            walk(root, &r, with_times, out);
        }
    }
}

fn view(root: &Path) -> View {
    let mut v = View::new();
    walk(root, "", false, &mut v);
    v
}

/// The lower layer in full, times included: it must never change.
fn lower_view(root: &Path) -> View {
    let mut v = View::new();
    walk(root, "", true, &mut v);
    v
}

fn show(v: &View) -> String {
    v.iter().map(|(k, d)| format!("  {k}: {d}\n")).collect()
}

fn diff(a: &View, b: &View) -> String {
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let mut s = String::new();
    for k in keys {
        match (a.get(k), b.get(k)) {
            (x, y) if x == y => {}
            (x, y) => s.push_str(&format!("  {k}: {x:?} -> {y:?}\n")),
        }
    }
    s
}

/// Invariants every remount must show, whatever the workload: nothing left in the work dir,
/// no temp name in the merged view or in the upper, the lower unchanged.
fn check_common(d: &Rig, merged: &View, lower_before: &View, what: &str) {
    let left = d.work_entries();
    assert!(
        left.is_empty(),
        "{what}: workdir/work not empty after the remount: {left:?}"
    );
    for k in merged.keys() {
        assert!(!k.contains("#verlay"), "{what}: temp name {k} in the merged view");
    }
    let upper = view(&d.upper);
    for k in upper.keys() {
        assert!(!k.contains("#verlay"), "{what}: temp name {k} in the upper");
    }
    let lower = lower_view(d.lower());
    assert!(
        lower == *lower_before,
        "{what}: the lower layer changed:\n{}",
        diff(lower_before, &lower)
    );
}

// ---------------------------------------------------------------------------------------------
// enumerated crash points

/// What the merged view must show after a crash at a point.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    /// the interrupted operation left no trace in the merged view
    Old,
    /// the operation's effect is published
    New,
    /// either is correct (the point is inside a step that is its own commit)
    Either,
}

/// A deterministic workload: `setup` (must not reach the crash point) then `op`, a single call
/// where possible, which the crash interrupts.
struct Workload {
    name: &'static str,
    setup: fn(&Path) -> std::io::Result<()>,
    op: fn(&Path) -> std::io::Result<()>,
    /// `VERLAY_CRASH_AT` values reached by `op`, and what must show after each
    points: &'static [(&'static str, Expect)],
}

/// The shared lower layer of the enumerated workloads.
fn make_lower(l: &Path) {
    let file = |rel: &str, data: &[u8], mode: u32| {
        let p = l.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, data).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    };
    // Big enough for several copy_file_range rounds' worth of blocks, with a hole.
    let mut big: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    big[100_000..200_000].fill(0);
    file("a", &big, 0o640);
    rustix::fs::setxattr(l.join("a"), "user.k", b"v", rustix::fs::XattrFlags::empty()).unwrap();
    for (rel, data) in [
        ("b", "lower-b"),
        ("c", "lower-c"),
        ("d/sub/f", "lower-f"),
        ("m/x", "lower-mx"),
        ("r/f", "lower-rf"),
        ("t/x", "lower-tx"),
        ("dd/x", "lower-ddx"),
        ("w", "lower-w"),
        ("p", "lower-p"),
        ("q", "lower-q"),
        ("l", "lower-l"),
    ] {
        file(rel, data.as_bytes(), 0o644);
    }
    fs::set_permissions(l.join("r"), fs::Permissions::from_mode(0o750)).unwrap();
    fs::create_dir(l.join("pub")).unwrap();
    fs::set_permissions(l.join("pub"), fs::Permissions::from_mode(0o777)).unwrap();
    std::os::unix::fs::symlink("a", l.join("s")).unwrap();
}

fn nothing(_: &Path) -> std::io::Result<()> {
    Ok(())
}

fn append(p: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut f = OpenOptions::new().append(true).open(p)?;
    f.write_all(data)
}

/// uid and gid of the unprivileged caller (FUSE requests carry the caller's ids).
const USER: u32 = 1000;

fn create_excl(p: &Path, mode: u32) -> std::io::Result<()> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(p)
        .map(drop)
}

const WORKLOADS: &[Workload] = &[
    Workload {
        name: "append to a lower file (copy-up of a file with a hole and an xattr)",
        setup: nothing,
        op: |m| append(&m.join("a"), b"+new"),
        points: &[
            ("copy_up.create", Expect::Old),
            ("copy_up.data", Expect::Old),
            ("copy_up.xattrs", Expect::Old),
            ("copy_up.owner", Expect::Old),
            ("copy_up.mode", Expect::Old),
            ("copy_up.origin", Expect::Old),
            ("copy_up.times", Expect::Old),
            ("copy_up.fsync", Expect::Old),
            ("copy_up.rename", Expect::Old),
            ("set_ovl_xattr.impure", Expect::Old),
        ],
    },
    Workload {
        name: "append to a nested lower file (parents d, d/sub copied up first)",
        setup: nothing,
        op: |m| append(&m.join("d/sub/f"), b"+new"),
        points: &[
            ("copy_up.create:1", Expect::Old),
            ("copy_up.xattrs:1", Expect::Old),
            ("copy_up.owner:1", Expect::Old),
            ("copy_up.mode:1", Expect::Old),
            ("copy_up.origin:1", Expect::Old),
            ("copy_up.times:1", Expect::Old),
            ("copy_up.rename:1", Expect::Old),
            ("copy_up.rename:2", Expect::Old),
            ("copy_up.fsync:1", Expect::Old),
            ("copy_up.fsync:2", Expect::Old),
            ("copy_up.data:1", Expect::Old),
            ("copy_up.fsync:3", Expect::Old),
            ("copy_up.rename:3", Expect::Old),
        ],
    },
    Workload {
        name: "lchown of a lower symlink (copy-up of a symlink)",
        setup: nothing,
        op: |m| std::os::unix::fs::lchown(m.join("s"), Some(1), Some(1)),
        points: &[
            ("copy_up.create", Expect::Old),
            ("copy_up.owner", Expect::Old),
            ("copy_up.times", Expect::Old),
            ("copy_up.rename", Expect::Old),
        ],
    },
    Workload {
        name: "unlink a lower file",
        setup: nothing,
        op: |m| fs::remove_file(m.join("b")),
        points: &[("whiteout.mknod", Expect::Old), ("whiteout.rename", Expect::New)],
    },
    Workload {
        name: "unlink a copied-up lower file (whiteout over an upper file)",
        setup: |m| append(&m.join("c"), b"+up"),
        op: |m| fs::remove_file(m.join("c")),
        points: &[("whiteout.mknod", Expect::Old), ("whiteout.rename", Expect::New)],
    },
    Workload {
        name: "rmdir a merged dir (whiteout swapped with the upper dir)",
        setup: |m| fs::remove_file(m.join("m/x")),
        op: |m| fs::remove_dir(m.join("m")),
        points: &[
            ("whiteout.mknod:2", Expect::Old),
            ("publish.exchange", Expect::New),
            ("publish.remove_old", Expect::New),
            ("whiteout.rename:2", Expect::New),
        ],
    },
    Workload {
        name: RMDIR_REDIRECTED,
        setup: |m| {
            fs::rename(m.join("r"), m.join("r2"))?;
            fs::remove_file(m.join("r2/f"))
        },
        op: |m| fs::remove_dir(m.join("r2")),
        points: &[
            ("clear_whiteouts.unlink", Expect::Either),
            ("remove.rmdir", Expect::New),
        ],
    },
    Workload {
        name: "unlink an upper-only file",
        setup: |m| fs::write(m.join("n"), "upper-n"),
        op: |m| fs::remove_file(m.join("n")),
        points: &[("remove.unlink", Expect::New)],
    },
    Workload {
        name: "create a file in place",
        setup: nothing,
        op: |m| create_excl(&m.join("n2"), 0o640),
        points: &[("create.make", Expect::Either), ("create.owner", Expect::New)],
    },
    Workload {
        name: CREATE_AS_USER,
        setup: nothing,
        op: |m| as_user(USER, || create_excl(&m.join("pub/n4"), 0o644)),
        points: &[
            ("create.make", Expect::Old),
            ("create.owner", Expect::Old),
            ("create.rename", Expect::New),
        ],
    },
    Workload {
        name: CREATE_SETUID,
        setup: nothing,
        op: |m| create_excl(&m.join("n3"), 0o4755),
        points: &[
            ("create.make", Expect::Old),
            ("create.owner", Expect::Old),
            ("create.mode", Expect::Old),
            ("create.rename", Expect::New),
        ],
    },
    Workload {
        name: "create a file over a whiteout",
        setup: |m| fs::remove_file(m.join("b")),
        op: |m| create_excl(&m.join("b"), 0o600),
        points: &[
            ("create.make", Expect::Old),
            ("create.owner", Expect::Old),
            ("create.rename", Expect::New),
        ],
    },
    Workload {
        name: "mkdir over the whiteout of a lower dir (opaque dir swapped in)",
        setup: |m| {
            fs::remove_file(m.join("dd/x"))?;
            fs::remove_dir(m.join("dd"))
        },
        op: |m| fs::create_dir(m.join("dd")),
        points: &[
            ("create.make", Expect::Old),
            ("create.owner", Expect::Old),
            ("create.opaque", Expect::Old),
            ("publish.exchange:2", Expect::New),
            ("publish.remove_old:2", Expect::New),
            ("create.rename", Expect::New),
        ],
    },
    Workload {
        name: "link a lower file",
        setup: nothing,
        op: |m| fs::hard_link(m.join("l"), m.join("l2")),
        points: &[("copy_up.rename", Expect::Old), ("link.link", Expect::New)],
    },
    Workload {
        name: "link a lower file over a whiteout",
        setup: |m| fs::remove_file(m.join("b")),
        op: |m| fs::hard_link(m.join("l"), m.join("b")),
        points: &[
            ("copy_up.rename", Expect::Old),
            ("link.link", Expect::Old),
            ("link.rename", Expect::New),
        ],
    },
    Workload {
        name: "rename a lower file over a name that exists below",
        setup: nothing,
        op: |m| fs::rename(m.join("p"), m.join("q")),
        points: &[("copy_up.rename", Expect::Old), ("rename.rename", Expect::New)],
    },
    Workload {
        name: "atomic replace: rename a new file over a copied-up name that exists below",
        setup: |m| {
            append(&m.join("q"), b"+up")?;
            fs::write(m.join("q.tmp"), "replacement")
        },
        op: |m| fs::rename(m.join("q.tmp"), m.join("q")),
        points: &[("rename.rename", Expect::New)],
    },
    Workload {
        name: "rename a lower dir (redirect)",
        setup: nothing,
        op: |m| fs::rename(m.join("r"), m.join("r3")),
        points: &[
            ("copy_up.rename", Expect::Old),
            ("set_ovl_xattr.impure", Expect::Old),
            ("set_ovl_xattr.redirect", Expect::Old),
            ("rename.rename", Expect::New),
        ],
    },
    Workload {
        name: "rename an upper dir onto a whiteout (exchange, then drop the whiteout)",
        setup: |m| {
            fs::create_dir(m.join("u"))?;
            fs::remove_file(m.join("w"))
        },
        op: |m| fs::rename(m.join("u"), m.join("w")),
        points: &[
            ("set_ovl_xattr.opaque", Expect::Old),
            ("rename.exchange", Expect::New),
            ("rename.drop_whiteout", Expect::New),
        ],
    },
    Workload {
        name: RENAME_OVER_MERGED,
        setup: |m| {
            fs::remove_file(m.join("t/x"))?;
            fs::create_dir(m.join("s2"))
        },
        op: |m| fs::rename(m.join("s2"), m.join("t")),
        points: &[
            ("set_ovl_xattr.opaque", Expect::Old),
            ("clear_whiteouts.unlink", Expect::Either),
            ("rename.rename", Expect::New),
        ],
    },
];

/// The old and new merged view of a workload, from a run without a crash.
fn reference(base: &Path, lower: &Path, i: usize, w: &Workload) -> (View, View) {
    let d = dirs(base, lower, &format!("ref{i}"));
    let mut g = daemon(&d, None, &base.join(format!("ref{i}.log")));
    (w.setup)(&d.mnt).unwrap_or_else(|e| panic!("{}: setup: {e}", w.name));
    let old = view(&d.mnt);
    (w.op)(&d.mnt).unwrap_or_else(|e| panic!("{}: op: {e}", w.name));
    let new = view(&d.mnt);
    g.stop_clean();
    assert_ne!(old, new, "{}: the op changes nothing", w.name);
    (old, new)
}

/// Crash at `point` during `w`, remount, and check; Err describes a broken invariant.
#[allow(clippy::too_many_arguments)]
fn crash_at_point(
    base: &Path,
    lower: &Path,
    lower_before: &View,
    tag: &str,
    w: &Workload,
    point: &str,
    expect: Expect,
    (old, new): (&View, &View),
) -> Result<(), String> {
    let d = dirs(base, lower, tag);
    let what = format!("{} at {point}", w.name);
    let mut g = daemon(&d, Some(point), &base.join(format!("{tag}.log")));
    if let Err(e) = (w.setup)(&d.mnt) {
        panic!(
            "{what}: setup failed ({e}); does the setup reach the point? {}",
            g.log()
        );
    }
    assert_eq!(view(&d.mnt), *old, "{what}: setup is not deterministic");
    match (w.op)(&d.mnt) {
        Ok(()) => panic!(
            "{what}: the op completed: the point is never reached: {}",
            g.log()
        ),
        Err(e) if is_dead_daemon(&e) => {}
        Err(e) => panic!(
            "{what}: the op failed with {e}, not with the daemon's death: {}",
            g.log()
        ),
    }
    let st = g.wait_exit();
    assert_eq!(
        st.signal(),
        Some(libc::SIGKILL),
        "{what}: daemon ended with {st}: {}",
        g.log()
    );
    drop(g);

    let mut g = daemon(&d, None, &base.join(format!("{tag}.remount.log")));
    let got = view(&d.mnt);
    check_common(&d, &got, lower_before, &what);
    let verdict = if got == *old {
        Expect::Old
    } else if got == *new {
        Expect::New
    } else {
        return Err(format!(
            "{what}: neither the old nor the new view; changes from the old one:\n{}\
             changes from the new one:\n{}",
            diff(old, &got),
            diff(new, &got)
        ));
    };
    if expect != Expect::Either && verdict != expect {
        return Err(format!(
            "{what}: shows the {verdict:?} view where {expect:?} is required:\n{}",
            show(&got)
        ));
    }
    g.stop_clean();
    Ok(())
}

/// Run the points of the workloads whose names pass `filter`; returns (points, failures).
fn enumerate(filter: impl Fn(&Workload, &str) -> bool) -> (usize, Vec<String>) {
    let t = scratch("verlay-kill.");
    let lower = t.path().join("lower");
    make_lower(&lower);
    let lower_before = lower_view(&lower);
    let mut points = 0;
    let mut failures = Vec::new();
    for (i, w) in WORKLOADS.iter().enumerate() {
        let selected: Vec<_> = w.points.iter().filter(|(p, _)| filter(w, p)).collect();
        if selected.is_empty() {
            continue;
        }
        let (old, new) = reference(t.path(), &lower, i, w);
        for (j, (point, expect)) in selected.into_iter().enumerate() {
            points += 1;
            let tag = format!("w{i}p{j}");
            if let Err(e) = crash_at_point(
                t.path(),
                &lower,
                &lower_before,
                &tag,
                w,
                point,
                *expect,
                (&old, &new),
            ) {
                eprintln!("FAIL {e}");
                failures.push(e);
            }
        }
    }
    (points, failures)
}

/// Points where the current code breaks "old or new" (each would get an ignored test below).
/// The four found by this test are fixed: whiteouts are cleared only after the directory was
/// made opaque, and a create that needs another owner or setuid/setgid is built in the work
/// dir and published by rename. Their tests below stay as regressions.
const KNOWN_BAD: &[(&str, &str)] = &[];
const RMDIR_REDIRECTED: &str = "rmdir a renamed (redirected) lower dir whose entry was deleted";
const RENAME_OVER_MERGED: &str = "rename a new dir over an empty merged dir (its whiteouts cleared first)";
const CREATE_AS_USER: &str = "create a file as an unprivileged user (built in the work dir)";
const CREATE_SETUID: &str = "create a setuid file (built in the work dir)";

/// Run one known-bad point; panics with the broken invariant.
fn known_bad(workload: &str, point: &str) {
    let (n, failures) = enumerate(|w, p| w.name == workload && p == point);
    assert_eq!(n, 1, "no such point: {workload} at {point}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// rmdir of a redirected dir (rename r -> r2, rm r2/f, rmdir r2): Upper::remove clears the
/// whiteouts of r2 in place, then rmdirs it; a crash in between shows r2/f again through the
/// redirect. (Marking r2 opaque first, or moving it to the work dir first, would close it.)
#[test]
fn rmdir_of_redirected_dir_never_shows_deleted_entries() {
    known_bad(RMDIR_REDIRECTED, "clear_whiteouts.unlink");
}

/// rename(s2, t) over an empty merged dir t: the union clears t's whiteouts in place before
/// rename(2) replaces t; a crash in between shows t's deleted lower entry t/x again. (Setting
/// overlay.opaque on t before clearing would keep the merged view unchanged.)
#[test]
fn rename_over_empty_merged_dir_never_shows_deleted_entries() {
    known_bad(RENAME_OVER_MERGED, "clear_whiteouts.unlink");
}

/// An unprivileged caller's create with nothing below is made in place, as the daemon (root),
/// then chowned; a crash in between leaves a file owned by root:root in a world-writable dir
/// (the gap docs/ordering.md names). Building it in the work dir and publishing it with
/// RENAME_NOREPLACE would close it.
#[test]
fn create_in_place_never_shows_daemon_owned_file() {
    known_bad(CREATE_AS_USER, "create.make");
}

/// A setuid file created in place is chowned (which clears setuid) and then chmodded back; a
/// crash between the two leaves mode 0755 where 04755 was asked for.
#[test]
fn create_setuid_in_place_never_shows_wrong_mode() {
    known_bad(CREATE_SETUID, "create.owner");
}

fn is_known_bad(w: &Workload, p: &str) -> bool {
    KNOWN_BAD.iter().any(|(n, q)| *n == w.name && *q == p)
}

/// Crash points no workload here can reach, and why.
const UNREACHABLE: &[(&str, &str)] = &[(
    "rename.whiteout",
    "the RENAME_WHITEOUT fallback runs only where the kernel refuses RENAME_WHITEOUT (a user \
     namespace); these tests run as root in the initial namespace",
)];

/// The crash points in the upper writer's source: every `crash_point("...")` in src/upper/.
fn crash_points_in_source() -> BTreeSet<String> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/upper");
    let mut points = BTreeSet::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "rs") {
            let src = fs::read_to_string(&p).unwrap();
            points.extend(
                src.split("crash_point(\"")
                    .skip(1)
                    .map(|rest| rest.split('"').next().unwrap().to_string()),
            );
        }
    }
    assert!(points.len() > 20, "crash points not found in {dir}: {points:?}");
    points
}

#[test]
fn every_crash_point_leaves_old_or_new_view() {
    let start = Instant::now();
    let (points, failures) = enumerate(|w, p| !is_known_bad(w, p));
    let steps: BTreeSet<&str> = WORKLOADS
        .iter()
        .flat_map(|w| w.points.iter())
        .map(|(p, _)| p.split(':').next().unwrap())
        .collect();
    eprintln!(
        "crash points enumerated: {points} (distinct steps: {}; {} more known bad, ignored) in {:.1?}",
        steps.len(),
        KNOWN_BAD.len(),
        start.elapsed()
    );
    let missing: Vec<String> = crash_points_in_source()
        .into_iter()
        .filter(|s| !steps.contains(s.as_str()) && !UNREACHABLE.iter().any(|(u, _)| u == s))
        .collect();
    assert!(
        missing.is_empty(),
        "crash points no workload reaches: {missing:?}"
    );
    assert!(
        failures.is_empty(),
        "{} of {points} points broke an invariant:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// kill -9 at seeded moments

/// The merged view of the seeded workload: regular files by path (the dirs are fixed).
type Files = BTreeMap<String, Vec<u8>>;

/// Dirs of the seeded workload; files live directly in them.
const KILL_DIRS: [&str; 3] = ["", "d0", "d1"];
/// Names a file may have in each dir.
const KILL_NAMES: usize = 8;

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

fn random_data(rng: &mut Rng, max: u64) -> Vec<u8> {
    let n = rng.below(max + 1) as usize;
    let b = rng.next() as u8;
    (0..n).map(|i| (i as u8).wrapping_mul(31) ^ b).collect()
}

fn make_kill_lower(l: &Path, rng: &mut Rng) {
    for dir in KILL_DIRS {
        fs::create_dir_all(l.join(dir)).unwrap();
        for i in 0..KILL_NAMES / 2 {
            let data = random_data(rng, 200_000);
            fs::write(l.join(join(dir, &format!("f{i}"))), data).unwrap();
        }
    }
}

fn read_files(root: &Path) -> Files {
    let mut files = Files::new();
    for dir in KILL_DIRS {
        let p = root.join(dir);
        for e in fs::read_dir(&p).unwrap_or_else(|e| panic!("readdir {}: {e}", p.display())) {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            let rel = join(dir, &name);
            if e.file_type().unwrap().is_dir() {
                assert!(KILL_DIRS.contains(&rel.as_str()), "unexpected dir {rel}");
                continue;
            }
            let data = read_all(&root.join(&rel)).unwrap_or_else(|e| panic!("read {rel}: errno {e}"));
            files.insert(rel, data);
        }
    }
    files
}

/// One state change a call makes to the model.
#[derive(Clone, Debug)]
enum Change {
    None,
    Create(String),
    Append(String, Vec<u8>),
    Rename(String, String),
    Unlink(String),
}

fn apply(files: &mut Files, c: &Change) {
    match c {
        Change::None => {}
        Change::Create(p) => {
            files.insert(p.clone(), Vec::new());
        }
        Change::Append(p, d) => files
            .get_mut(p)
            .expect("append to a modelled file")
            .extend_from_slice(d),
        Change::Rename(a, b) => {
            let d = files.remove(a).expect("rename of a modelled file");
            files.insert(b.clone(), d);
        }
        Change::Unlink(p) => {
            files.remove(p);
        }
    }
}

/// Where a round of the workload stopped.
struct Stopped {
    files: Files,
    /// content made durable by fsync (a prefix of the file's content while it keeps its name)
    synced: BTreeMap<String, Vec<u8>>,
    inflight: Change,
    ops: usize,
}

/// Runs calls against the mount and the model until one fails because the daemon died.
struct Workload9<'a> {
    mnt: &'a Path,
    rng: Rng,
    files: Files,
    synced: BTreeMap<String, Vec<u8>>,
    ops: usize,
    tmp_seq: u64,
}

/// A call failed because the daemon died: the change it was making.
struct Died(Change);

impl Workload9<'_> {
    /// Make one call that would change the model by `c`.
    fn call<T>(&mut self, c: Change, f: impl FnOnce(&Path) -> std::io::Result<T>) -> Result<T, Died> {
        self.ops += 1;
        match f(self.mnt) {
            Ok(v) => {
                move_synced(&mut self.synced, &c);
                apply(&mut self.files, &c);
                Ok(v)
            }
            Err(e) if is_dead_daemon(&e) => Err(Died(c)),
            Err(e) => {
                let ls: Vec<String> = KILL_DIRS
                    .iter()
                    .map(|d| {
                        let names: Vec<String> = fs::read_dir(self.mnt.join(d))
                            .map(|rd| {
                                rd.flatten()
                                    .map(|e| e.file_name().to_string_lossy().into_owned())
                                    .collect()
                            })
                            .unwrap_or_default();
                        format!("{d}/: {names:?}")
                    })
                    .collect();
                panic!(
                    "{c:?} failed after {} calls: {e}\nmodel: {:?}\nmerged view now: {ls:?}",
                    self.ops,
                    self.files.keys().collect::<Vec<_>>()
                )
            }
        }
    }

    fn fsync(&mut self, f: &File, path: &str) -> Result<(), Died> {
        self.call(Change::None, |_| f.sync_all())?;
        self.synced.insert(path.to_string(), self.files[path].clone());
        Ok(())
    }

    fn write(&mut self, f: &mut File, path: &str, data: Vec<u8>) -> Result<(), Died> {
        // One write call per chunk, so the in-flight change is one write.
        for chunk in data.chunks(64 * 1024) {
            let c = Change::Append(path.to_string(), chunk.to_vec());
            self.call(c, |_| f.write_all(chunk))?;
        }
        Ok(())
    }

    fn existing(&mut self) -> Option<String> {
        let v: Vec<&String> = self.files.keys().collect();
        (!v.is_empty()).then(|| self.rng.pick(&v).to_string())
    }

    fn any_name(&mut self) -> String {
        let dir = *self.rng.pick(&KILL_DIRS);
        let i = self.rng.below(KILL_NAMES as u64);
        join(dir, &format!("f{i}"))
    }

    fn step(&mut self) -> Result<(), Died> {
        let fsync = self.rng.chance(40);
        match self.rng.below(6) {
            0 | 1 => {
                let Some(p) = self.existing() else { return Ok(()) };
                let data = random_data(&mut self.rng, 100_000);
                let mut f = self.call(Change::None, |m| OpenOptions::new().append(true).open(m.join(&p)))?;
                self.write(&mut f, &p, data)?;
                if fsync {
                    self.fsync(&f, &p)?;
                }
                self.call(Change::None, |_| {
                    drop(f);
                    Ok(())
                })
            }
            2 => {
                let p = self.any_name();
                if self.files.contains_key(&p) {
                    return Ok(());
                }
                let data = random_data(&mut self.rng, 100_000);
                let mut f = self.call(Change::Create(p.clone()), |m| {
                    OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o644)
                        .open(m.join(&p))
                })?;
                self.write(&mut f, &p, data)?;
                if fsync {
                    self.fsync(&f, &p)?;
                }
                self.call(Change::None, |_| {
                    drop(f);
                    Ok(())
                })
            }
            3 => {
                // Atomic replace: write temp, fsync, rename over the name, fsync the dir.
                let Some(p) = self.existing() else { return Ok(()) };
                let dir = p.rsplit_once('/').map(|(d, _)| d.to_string()).unwrap_or_default();
                self.tmp_seq += 1;
                let tmp = join(&dir, &format!("tmp{}", self.tmp_seq));
                let data = random_data(&mut self.rng, 100_000);
                let mut f = self.call(Change::Create(tmp.clone()), |m| {
                    OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(m.join(&tmp))
                })?;
                self.write(&mut f, &tmp, data)?;
                self.fsync(&f, &tmp)?;
                self.call(Change::None, |_| {
                    drop(f);
                    Ok(())
                })?;
                self.call(Change::Rename(tmp.clone(), p.clone()), |m| {
                    fs::rename(m.join(&tmp), m.join(&p))
                })?;
                let d = self.call(Change::None, |m| File::open(m.join(&dir)))?;
                self.call(Change::None, |_| d.sync_all())?;
                self.call(Change::None, |_| {
                    drop(d);
                    Ok(())
                })
            }
            4 => {
                let Some(a) = self.existing() else { return Ok(()) };
                let b = self.any_name();
                if a == b {
                    return Ok(());
                }
                self.call(Change::Rename(a.clone(), b.clone()), |m| {
                    fs::rename(m.join(&a), m.join(&b))
                })
            }
            _ => {
                let Some(p) = self.existing() else { return Ok(()) };
                self.call(Change::Unlink(p.clone()), |m| fs::remove_file(m.join(&p)))
            }
        }
    }
}

/// Run the seeded workload on `mnt` until the daemon dies.
fn run_until_killed(
    mnt: &Path,
    seed: u64,
    files: Files,
    synced: BTreeMap<String, Vec<u8>>,
    tmp_seq: u64,
) -> Stopped {
    let mut w = Workload9 {
        mnt,
        rng: Rng::new(seed),
        files,
        synced,
        ops: 0,
        tmp_seq,
    };
    while w.ops < MAX_OPS_PER_ROUND {
        if let Err(Died(c)) = w.step() {
            return Stopped {
                files: w.files,
                synced: w.synced,
                inflight: c,
                ops: w.ops,
            };
        }
    }
    panic!("the daemon was not killed within {MAX_OPS_PER_ROUND} calls");
}

/// Follow a change in the record of fsynced content: it moves with a rename; an unlink, a
/// create or a rename over the name ends it.
fn move_synced(synced: &mut BTreeMap<String, Vec<u8>>, c: &Change) {
    match c {
        Change::Rename(a, b) => {
            synced.remove(b);
            if let Some(s) = synced.remove(a) {
                synced.insert(b.clone(), s);
            }
        }
        Change::Unlink(p) | Change::Create(p) => {
            synced.remove(p);
        }
        Change::None | Change::Append(..) => {}
    }
}

/// Every fsynced content is still there (as a prefix: later appends may follow it).
fn check_synced(got: &Files, synced: &BTreeMap<String, Vec<u8>>) -> Result<(), String> {
    for (p, d) in synced {
        match got.get(p) {
            Some(g) if g.starts_with(d) => {}
            Some(g) => {
                return Err(format!(
                    "{p}: fsynced {} bytes (fnv {:016x}) but shows {} bytes (fnv {:016x})",
                    d.len(),
                    fnv(d),
                    g.len(),
                    fnv(g)
                ))
            }
            None => return Err(format!("{p}: fsynced but gone")),
        }
    }
    Ok(())
}

/// Check the remounted files against the model; Ok is the model to go on with.
fn check_killed(got: &Files, s: &Stopped) -> Result<(), String> {
    // The interrupted call may have moved, replaced or removed a synced file.
    let mut synced_after = s.synced.clone();
    move_synced(&mut synced_after, &s.inflight);
    check_synced(got, &s.synced).or_else(|e| check_synced(got, &synced_after).map_err(|_| e))?;
    if *got == s.files {
        return Ok(());
    }
    let mut after = s.files.clone();
    apply(&mut after, &s.inflight);
    if *got == after {
        return Ok(());
    }
    if let Change::Append(p, d) = &s.inflight {
        // A write interrupted by the kill may have written a prefix.
        let old = &s.files[p];
        let torn_ok = got
            .get(p)
            .is_some_and(|g| g.len() >= old.len() && g.starts_with(old) && d.starts_with(&g[old.len()..]));
        let mut rest = got.clone();
        rest.insert(p.clone(), old.clone());
        if torn_ok && rest == s.files {
            return Ok(());
        }
    }
    let describe = |f: &Files| -> String {
        f.iter()
            .map(|(k, v)| format!("  {k}: {} bytes fnv {:016x}\n", v.len(), fnv(v)))
            .collect()
    };
    Err(format!(
        "in flight: {:?}\nmodel before it:\n{}got:\n{}",
        match &s.inflight {
            Change::Append(p, d) => format!("Append({p}, {} bytes)", d.len()),
            c => format!("{c:?}"),
        },
        describe(&s.files),
        describe(got)
    ))
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn kill_9_at_seeded_moments_keeps_completed_and_fsynced_writes() {
    let rounds = env_u64("VERLAY_KILL_ROUNDS", DEFAULT_KILL_ROUNDS as u64) as usize;
    let seed0 = env_u64("VERLAY_KILL_SEED", 0x6b69_6c6c);
    let start = Instant::now();
    let mut done = 0;
    let mut total_ops = 0;
    let mut inflight_kinds: BTreeMap<&str, usize> = BTreeMap::new();
    let mut upper_no = 0u64;
    while done < rounds {
        let seed = seed0.wrapping_add(upper_no);
        upper_no += 1;
        let t = scratch("verlay-kill.");
        let lower = t.path().join("lower");
        let mut rng = Rng::new(seed);
        make_kill_lower(&lower, &mut rng);
        let lower_before = lower_view(&lower);
        let d = dirs(t.path(), &lower, "k");
        let mut files = read_files(&lower);
        let mut synced = BTreeMap::new();
        for k in 0..KILLS_PER_UPPER.min(rounds - done) {
            let what = format!(
                "seed {seed} kill {k} (VERLAY_KILL_SEED={seed0}, upper {})",
                upper_no - 1
            );
            let mut g = daemon(&d, None, &t.path().join(format!("k{k}.log")));
            let delay = Duration::from_micros(rng.below(MAX_KILL_DELAY_US));
            let wseed = rng.next();
            let tmp_seq = (k as u64) << 32;
            let stopped = std::thread::scope(|sc| {
                let mnt = d.mnt.clone();
                let (f, s) = (files.clone(), synced.clone());
                let h = sc.spawn(move || run_until_killed(&mnt, wseed, f, s, tmp_seq));
                std::thread::sleep(delay);
                let st = g.kill9();
                assert_eq!(st.signal(), Some(libc::SIGKILL), "{what}: {}", g.log());
                h.join()
            });
            let stopped = match stopped {
                Ok(s) => s,
                Err(p) => std::panic::resume_unwind(p),
            };
            drop(g);
            total_ops += stopped.ops;
            *inflight_kinds
                .entry(match stopped.inflight {
                    Change::None => "none",
                    Change::Create(_) => "create",
                    Change::Append(..) => "write",
                    Change::Rename(..) => "rename",
                    Change::Unlink(_) => "unlink",
                })
                .or_default() += 1;

            let mut g = daemon(&d, None, &t.path().join(format!("k{k}.remount.log")));
            let got = read_files(&d.mnt);
            check_common(&d, &view(&d.mnt), &lower_before, &what);
            if let Err(e) = check_killed(&got, &stopped) {
                panic!("{what}, killed after {delay:?} and {} calls: {e}", stopped.ops);
            }
            g.stop_clean();
            // Go on from what survived (validated above).
            synced = stopped
                .synced
                .into_iter()
                .filter(|(p, d)| got.get(p).is_some_and(|g| g.starts_with(d)))
                .collect();
            files = got;
            done += 1;
        }
    }
    eprintln!(
        "kill -9 rounds: {done} ({total_ops} calls; interrupted calls by kind: {inflight_kinds:?}) in {:.1?}",
        start.elapsed()
    );
}
