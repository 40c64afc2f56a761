//! verlay on a real FUSE mount behaves exactly like kernel overlayfs (redirect_dir=on, index=off,
//! metacopy=off, xino=off) on identical layers: every operation's result and errno, the whole
//! merged tree (types, modes, owners, sizes, content, links, xattrs, nlink, preserved mtimes),
//! st_ino stability (copy-up, rename, remount) and the kernel format of the upper it writes.
//!
//! Subject: `VERLAY_BIN` (a path, or `kernel` to validate the harness against itself), else the
//! crate's `verlay` binary. Random runs: `VERLAY_DIFF_SEEDS` (200), `VERLAY_DIFF_OPS` (200),
//! `VERLAY_DIFF_SEED_BASE` (0); `VERLAY_DIFF_SEED=N` replays one seed. Needs root and /dev/fuse.
//! `VERLAY_DIFF_IGNORE=dir-nlink,nlink,...` sets known divergences aside while exploring a
//! subject (see `common::IGNORABLE`); CI leaves it unset.

// Tests are a raw syscall client (renameat2, mknod, xattrs, fds after unlink) with libc as the
// only dependency, so unlike the library they need unsafe; each block says why it is sound.
#![allow(unsafe_code)]

mod common;

use common::*;
use std::collections::BTreeMap;
use std::ffi::CString;
use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Open-fd slots per mount in the random sequence.
const SLOTS: usize = 4;
/// renameat2 flags (linux/fs.h).
const RENAME_NOREPLACE: u32 = 1;
const RENAME_EXCHANGE: u32 = 2;
/// Timestamp sentinels for `utime`.
const TS_NOW: i64 = -1;
const TS_OMIT: i64 = -2;

// The operations (tests/mount/ops.rs) and the focused cases (tests/mount/cases.rs).
#[path = "mount/cases.rs"]
mod cases;
#[path = "mount/ops.rs"]
mod ops;

use ops::*;

// ---------------------------------------------------------------------------------------------
// running a sequence on both mounts

/// An operation (or tree walk) on the mounts taking longer than this is a hang.
const HANG_LIMIT: Duration = Duration::from_secs(8);

/// The per-operation watchdog: a thread that, when the current operation has run for
/// HANG_LIMIT, records it as hung and kills the subject's daemon by PID, so the stuck
/// syscall returns (the FUSE connection is gone) and the run reports "hang" instead of
/// leaving CI stuck; the mount guards still unmount on drop.
struct Watchdog {
    state: Arc<WatchState>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct WatchState {
    /// what runs now and since when
    current: Mutex<Option<(Instant, String)>>,
    /// the operation that hung
    hung: Mutex<Option<String>>,
    stop: AtomicBool,
}

impl Watchdog {
    fn new(sub_mnt: PathBuf) -> Watchdog {
        let state = Arc::new(WatchState::default());
        let st = state.clone();
        let thread = std::thread::spawn(move || {
            while !st.stop.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(100));
                let late = st
                    .current
                    .lock()
                    .unwrap()
                    .as_ref()
                    .filter(|(t, _)| t.elapsed() > HANG_LIMIT)
                    .map(|(_, what)| what.clone());
                if let Some(what) = late {
                    let mut hung = st.hung.lock().unwrap();
                    if hung.is_none() {
                        for pid in daemon_pids(&sub_mnt) {
                            eprintln!("watchdog: `{what}` hung for {HANG_LIMIT:?}; killing daemon {pid}");
                            // SAFETY: a PID serving our own mountpoint (the daemon we started).
                            unsafe { libc::kill(pid, libc::SIGKILL) };
                        }
                        *hung = Some(what);
                    }
                }
            }
        });
        Watchdog {
            state,
            thread: Some(thread),
        }
    }

    /// Run `f` watched; Err(what hung) when it outlived HANG_LIMIT.
    fn watch<T>(&self, what: impl FnOnce() -> String, f: impl FnOnce() -> T) -> Result<T, String> {
        *self.state.current.lock().unwrap() = Some((Instant::now(), what()));
        let r = f();
        *self.state.current.lock().unwrap() = None;
        match self.state.hung.lock().unwrap().clone() {
            Some(h) => Err(h),
            None => Ok(r),
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Run {
    rig: Pair,
    log: Vec<String>,
    header: String,
    // Declared after `rig`, dropped first: fds close before the mounts go.
    ref_fds: Fds,
    sub_fds: Fds,
    watchdog: Watchdog,
}

impl Run {
    fn new(layers: Layers, header: String) -> Run {
        let rig = Pair::new(layers);
        let watchdog = Watchdog::new(rig.sub_root().to_path_buf());
        Run {
            rig,
            log: Vec::new(),
            header,
            ref_fds: Fds::default(),
            sub_fds: Fds::default(),
            watchdog,
        }
    }

    fn report(&self, what: &str) -> String {
        format!(
            "{}\n{what}\nlayers (top first):\n{}op log (ref results):\n{}\n",
            self.header,
            self.rig.layers,
            self.log
                .iter()
                .map(|l| format!("  {l}"))
                .collect::<Vec<_>>()
                .join("\n")
        )
    }

    /// Apply one op to both mounts; Err(report) when results or st_ino stability differ.
    fn step(&mut self, i: usize, op: &Op) -> Result<Res, String> {
        let rctx = Ctx {
            root: self.rig.ref_root(),
            start_ns: self.rig.start_ns,
        };
        let sctx = Ctx {
            root: self.rig.sub_root(),
            start_ns: self.rig.start_ns,
        };
        let (ref_fds, sub_fds) = (&mut self.ref_fds, &mut self.sub_fds);
        let applied = self.watchdog.watch(
            || format!("op #{i} `{op}`"),
            || {
                let before = tracked(op).map(|(a, _)| (ino(rctx.root, a), ino(sctx.root, a)));
                let r = apply(&rctx, op, ref_fds);
                let s = apply(&sctx, op, sub_fds);
                (before, r, s)
            },
        );
        let (before, r, s) = match applied {
            Ok(x) => x,
            Err(what) => {
                self.log.push(format!("#{i} {op}  => hang"));
                return Err(self.report(&format!("hang: {what} took more than {HANG_LIMIT:?}")));
            }
        };
        self.log.push(format!("#{i} {op}  => {}", show(&r)));
        if normalize_result(&r) != normalize_result(&s) {
            return Err(self.report(&format!(
                "op #{i} `{op}` differs:\n  kernel:  {}\n  subject: {}",
                show(&r),
                show(&s)
            )));
        }
        if let (Some((_, after)), Some((rb, sb))) = (tracked(op), before) {
            let (ra, sa) = (ino(rctx.root, after), ino(sctx.root, after));
            if rb.is_some() && rb == ra && sb != sa {
                return Err(self.report(&format!(
                    "op #{i} `{op}`: st_ino of the object changed in the subject ({sb:?} -> {sa:?}) but not in the kernel"
                )));
            }
        }
        Ok(r)
    }

    fn compare(&self, what: &str) -> Result<(), String> {
        self.watchdog
            .watch(
                || format!("comparing the trees {what}"),
                || self.rig.compare_trees(what),
            )
            .map_err(|h| self.report(&format!("hang: {h} took more than {HANG_LIMIT:?}")))?
            .map_err(|d| self.report(&d))
    }

    /// Close fds; compare; remount the subject and compare again (st_ino stable); then mount
    /// kernel overlayfs on the subject's upper and compare (the upper is in kernel format), and
    /// the subject on the kernel's upper (it reads what the kernel wrote).
    fn finish(&mut self) -> Result<(), String> {
        self.ref_fds.close_all();
        self.sub_fds.close_all();
        self.compare("after the sequence")?;
        let before = inos(self.rig.sub_root());
        self.rig.remount_subject();
        self.compare("after unmounting and remounting the subject on the same upper")?;
        let after = inos(self.rig.sub_root());
        let changed: Vec<String> = before
            .iter()
            .filter(|(p, i)| after.get(*p).is_some_and(|j| j != *i))
            .take(30)
            .map(|(p, i)| format!("  {}: st_ino {i} -> {}", short_path(p), after[p]))
            .collect();
        if !changed.is_empty() {
            return Err(self.report(&format!(
                "st_ino changed across a remount of the subject:\n{}",
                changed.join("\n")
            )));
        }
        self.rig
            .mount_kernel_on_subject_upper()
            .map_err(|e| self.report(&format!("kernel overlayfs refused the subject's upper: {e}")))?;
        self.compare("kernel overlayfs mounted on the subject's upper (upper format)")?;
        // And the other way round: the subject reads an upper that kernel overlayfs wrote
        // (containers/storage switches between the two on the same layers).
        self.rig
            .mount_subject_on_kernel_upper()
            .map_err(|d| self.report(&d))
    }
}

fn inos(root: &Path) -> BTreeMap<String, u64> {
    snapshot(root).into_iter().map(|(p, n)| (p, n.ino)).collect()
}

/// Light listing of the reference tree for choosing op arguments.
fn list_tree(root: &Path) -> Vec<(String, char)> {
    fn rec(root: &Path, rel: &str, out: &mut Vec<(String, char)>) {
        let Ok(rd) = std::fs::read_dir(if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(rel)
        }) else {
            return;
        };
        let mut names: Vec<String> = rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for n in names {
            let r = if rel.is_empty() { n } else { format!("{rel}/{n}") };
            let k = std::fs::symlink_metadata(root.join(&r))
                .map(|m| kind_of(m.mode()))
                .unwrap_or('?');
            out.push((r.clone(), k));
            if k == 'd' {
                rec(root, &r, out);
            }
        }
    }
    let mut v = vec![(String::new(), 'd')];
    rec(root, "", &mut v);
    v
}

// ---------------------------------------------------------------------------------------------
// random sequences

fn gen_op(rng: &mut Rng, tree: &[(String, char)], pool: &[String]) -> Op {
    use Op::*;
    const FRESH: &[&str] = &["n0", "n1", "n2", "a", "b", "x", "d0", "f0"];
    const FILE_MODES: &[u32] = &[0o644, 0o600, 0o755, 0o4755, 0o2755, 0o777, 0o000, 0o1777, 0o6711];
    const UMASKS: &[u32] = &[0o022, 0o077, 0o000, 0o027];
    const IDS: &[u32] = &[0, 1000, 65534, 1001, u32::MAX];
    const TIMES: &[i64] = &[
        978_307_200_000_000_000,
        1_262_304_000_123_456_789,
        1_000_000_000_999_999_999,
        TS_NOW,
        TS_OMIT,
    ];
    const XATTRS: &[&str] = &[
        "user.k0",
        "user.k1",
        "user.k2",
        "trusted.k",
        "trusted.overlay.opaque",
        "security.k",
        "user.a0",
        "user.a1",
        "user.X0~255",
        "system.posix_acl_access",
    ];
    let of = |k: char| -> Vec<String> {
        tree.iter()
            .filter(|(_, t)| *t == k)
            .map(|(p, _)| p.clone())
            .collect()
    };
    let files = of('f');
    let dirs = of('d');
    let fresh = |rng: &mut Rng| -> String {
        let parent = rng.pick(&dirs).clone();
        let name = match rng.below(100) {
            0..=6 => long_name(&format!("N{}", rng.below(2)), 255),
            7..=11 => long_name("M", 256),
            _ => rng.pick(FRESH).to_string(),
        };
        if parent.is_empty() {
            name
        } else {
            format!("{parent}/{name}")
        }
    };
    let existing = |rng: &mut Rng| -> String { rng.pick(tree).0.clone() };
    let any = |rng: &mut Rng| -> String {
        let base = match rng.below(100) {
            0..=64 => existing(rng),
            65..=79 if !pool.is_empty() => rng.pick(pool).clone(),
            _ => fresh(rng),
        };
        match rng.below(100) {
            0..=3 if !base.is_empty() => format!("{base}/"),
            4..=7 if !files.is_empty() => format!("{}/x", rng.pick(&files)),
            _ => base,
        }
    };
    let file_or_any = |rng: &mut Rng| -> String {
        if !files.is_empty() && rng.chance(70) {
            rng.pick(&files).clone()
        } else {
            any(rng)
        }
    };
    let new_or_any = |rng: &mut Rng| -> String {
        if rng.chance(60) {
            fresh(rng)
        } else {
            any(rng)
        }
    };
    let slot = |rng: &mut Rng| rng.below(SLOTS as u64) as usize;
    let len = |rng: &mut Rng| -> usize { *rng.pick(&[0usize, 1, 5, 100, 4096, 5000]) };
    let off = |rng: &mut Rng| -> u64 { *rng.pick(&[0u64, 1, 3, 4095, 8192, 100_000, 1 << 20]) };
    let unprivileged = rng.chance(18);
    let op = match rng.below(122) {
        0..=7 => Create {
            path: new_or_any(rng),
            mode: *rng.pick(FILE_MODES),
            umask: *rng.pick(UMASKS),
            excl: rng.chance(30),
        },
        8..=13 => Write {
            path: file_or_any(rng),
            off: off(rng),
            len: len(rng),
            seed: rng.below(256) as u8,
        },
        14..=17 => Append {
            path: file_or_any(rng),
            len: len(rng),
            seed: rng.below(256) as u8,
        },
        18..=20 => Overwrite {
            path: file_or_any(rng),
            len: len(rng),
            seed: rng.below(256) as u8,
        },
        21..=24 => Truncate {
            path: file_or_any(rng),
            len: off(rng),
        },
        25..=27 => Read {
            path: file_or_any(rng),
        },
        28..=33 => Mkdir {
            path: new_or_any(rng),
            mode: *rng.pick(&[0o755, 0o700, 0o2775, 0o1777, 0o000]),
            umask: *rng.pick(UMASKS),
        },
        34..=37 => Rmdir {
            path: if rng.chance(70) {
                rng.pick(&dirs).clone()
            } else {
                any(rng)
            },
        },
        38..=43 => Unlink { path: any(rng) },
        44..=47 => Link {
            src: any(rng),
            dst: new_or_any(rng),
        },
        48..=50 => Symlink {
            target: rng
                .pick(&["a", "../b", "/nonexistent-verlay/hostname", "dangling"])
                .to_string(),
            path: new_or_any(rng),
        },
        51..=52 => Mkfifo {
            path: new_or_any(rng),
            mode: 0o644,
            umask: *rng.pick(UMASKS),
        },
        53 => Mknod {
            path: new_or_any(rng),
            major: 0,
            minor: if rng.chance(50) { 0 } else { 1 },
        },
        54..=63 => {
            let flags = match rng.below(10) {
                0..=5 => 0,
                6..=7 => RENAME_NOREPLACE,
                _ => RENAME_EXCHANGE,
            };
            let src = if !dirs.is_empty() && rng.chance(35) {
                rng.pick(&dirs).clone()
            } else {
                any(rng)
            };
            let dst = if flags == RENAME_EXCHANGE || rng.chance(40) {
                any(rng)
            } else {
                new_or_any(rng)
            };
            Rename { src, dst, flags }
        }
        64..=68 => Chmod {
            path: any(rng),
            mode: *rng.pick(&[0o644, 0o2755, 0o4755, 0o700, 0o000, 0o1777, 0o755]),
        },
        69..=72 => Chown {
            path: any(rng),
            uid: *rng.pick(IDS),
            gid: *rng.pick(IDS),
        },
        73..=76 => Utime {
            path: any(rng),
            atime: *rng.pick(TIMES),
            mtime: *rng.pick(TIMES),
        },
        77..=79 => SetXattr {
            path: any(rng),
            name: expand_path(rng.pick::<&str>(&XATTRS[..XATTRS.len() - 1])),
            value: match rng.below(10) {
                0..=5 => format!("v{}", rng.below(10)),
                6 => String::new(),
                // Values past the 256 bytes that once made copy-up spin, up to what one
                // ext4 inode holds.
                _ => format!("{}*{}", rng.pick(&["b", "c"]), rng.pick(&[257, 300, 1000, 2500])),
            },
        },
        80..=81 => RemoveXattr {
            path: any(rng),
            name: expand_path(rng.pick::<&str>(XATTRS)),
        },
        82 => GetXattr {
            path: any(rng),
            name: expand_path(rng.pick::<&str>(XATTRS)),
        },
        83 => ListXattr { path: any(rng) },
        84..=86 => Stat { path: any(rng) },
        87..=88 => Readdir {
            path: if rng.chance(80) {
                rng.pick(&dirs).clone()
            } else {
                any(rng)
            },
        },
        89 => Readlink { path: any(rng) },
        90..=95 => Open {
            slot: slot(rng),
            path: file_or_any(rng),
            flags: rng.pick(&["r", "r", "r", "w", "rw", "a", "rt"]).to_string(),
        },
        96..=98 => ReadFd {
            slot: slot(rng),
            off: *rng.pick(&[0u64, 1, 4096]),
            len: *rng.pick(&[1usize, 100, 70000]),
        },
        99..=101 => WriteFd {
            slot: slot(rng),
            off: off(rng),
            len: len(rng),
            seed: rng.below(256) as u8,
        },
        102 => TruncFd {
            slot: slot(rng),
            len: off(rng),
        },
        103..=106 => Fstat { slot: slot(rng) },
        107 => Fchmod {
            slot: slot(rng),
            mode: *rng.pick(&[0o600, 0o2755, 0o4755, 0o000, 0o1777]),
        },
        108..=110 => Close { slot: slot(rng) },
        111..=112 => Fchown {
            slot: slot(rng),
            uid: *rng.pick(IDS),
            gid: *rng.pick(IDS),
        },
        113 => Fsync { slot: slot(rng) },
        114..=115 => Fgetxattr {
            slot: slot(rng),
            name: expand_path(rng.pick::<&str>(XATTRS)),
        },
        _ => {
            let valid = rng.chance(95);
            SetAcl {
                path: any(rng),
                default: rng.chance(30),
                spec: random_acl(rng, valid),
            }
        }
    };
    if unprivileged {
        let (uid, gid) = *rng.pick(&[(1000, 1000), (65534, 65534), (1001, 1000), (2000, 2001)]);
        let groups = match rng.below(4) {
            0 => vec![],
            1 => vec![1000],
            2 => vec![1001, 65534],
            _ => vec![2001, 1000, 3000],
        };
        As {
            uid,
            gid,
            groups,
            op: Box::new(op),
        }
    } else {
        op
    }
}

/// A POSIX ACL spec: owner, group and other entries, sometimes named users and groups (up
/// to 12, with the mask a valid ACL then needs; `valid: false` may leave it out: EINVAL).
fn random_acl(rng: &mut Rng, valid: bool) -> String {
    const IDS: &[u32] = &[1000, 1001, 65534, 2000, 2001, 3000];
    let perm = |rng: &mut Rng| rng.below(8);
    let mut e = vec![
        format!("u::{}", perm(rng)),
        format!("g::{}", perm(rng)),
        format!("o::{}", perm(rng)),
    ];
    let named = match rng.below(10) {
        0..=3 => 0,
        4..=7 => 1 + rng.below(3),
        _ => 4 + rng.below(9),
    };
    for i in 0..named {
        let id = IDS.get(i as usize).copied().unwrap_or(4000 + i as u32);
        let tag = if rng.chance(50) { "u" } else { "g" };
        e.push(format!("{tag}:{id}:{}", perm(rng)));
    }
    if named > 0 && valid || rng.chance(15) {
        e.push(format!("m::{}", perm(rng)));
    }
    e.join(",")
}

/// What users' layers carry and `random_layers` does not: files and dirs with 0-20 xattrs
/// (values up to what one ext4 inode holds, names up to XATTR_NAME_MAX, name lists over
/// 1 KiB), POSIX ACLs with many entries, setuid/setgid files, sticky dirs, several owners.
fn decorate_layers(rng: &mut Rng, layers: &mut Layers) {
    // ext4 keeps all xattrs of an inode in one 4 KiB block (16 bytes of header per entry);
    // leave room for the overlay's own (origin, impure, redirect) on the upper copy.
    const XATTR_BUDGET: usize = 3000;
    const ENTRY_OVERHEAD: usize = 20;
    const OWNERS: &[(u32, u32)] = &[
        (1000, 1000),
        (1001, 1000),
        (65534, 65534),
        (0, 1000),
        (2000, 2001),
    ];
    for layer in &mut layers.lowers {
        let mut seen = std::collections::BTreeSet::new();
        let targets: Vec<(String, bool)> = layer
            .iter()
            .filter_map(|e| match e {
                Entry::File(p, _) => Some((p.clone(), false)),
                Entry::Dir(p) | Entry::Opaque(p, _) => Some((p.clone(), true)),
                _ => None,
            })
            .filter(|(p, _)| seen.insert(p.clone()))
            .collect();
        for (path, is_dir) in targets {
            if rng.chance(25) {
                let mode = if is_dir {
                    *rng.pick(&[0o1777, 0o2775, 0o3777, 0o0755])
                } else {
                    *rng.pick(&[0o000, 0o4755, 0o2755, 0o6755, 0o2745])
                };
                layer.push(Entry::Meta(path.clone(), Some(mode), Some(*rng.pick(OWNERS))));
            }
            let mut budget = XATTR_BUDGET;
            if rng.chance(20) {
                let spec = random_acl(rng, true);
                budget -= 4 + 8 * (spec.matches(',').count() + 1) + ENTRY_OVERHEAD;
                layer.push(Entry::Xattr(
                    path.clone(),
                    "system.posix_acl_access".into(),
                    hex(&acl_bytes(&spec)),
                ));
            }
            if is_dir && rng.chance(20) {
                let spec = random_acl(rng, true);
                budget -= 4 + 8 * (spec.matches(',').count() + 1) + ENTRY_OVERHEAD;
                layer.push(Entry::Xattr(
                    path.clone(),
                    "system.posix_acl_default".into(),
                    hex(&acl_bytes(&spec)),
                ));
            }
            if !rng.chance(40) {
                continue;
            }
            let long_names = rng.chance(20);
            for j in 0..rng.below(21) {
                let name = if long_names {
                    format!("user.X{j}~255")
                } else {
                    format!("user.a{j}")
                };
                let size = *rng.pick(&[0usize, 1, 10, 100, 257, 300, 600, 1000, 2000, 3000]);
                let need = expand_path(&name).len() + ENTRY_OVERHEAD;
                if need >= budget {
                    break;
                }
                let size = size.min(budget - need);
                budget -= need + size;
                let value = if size == 0 {
                    String::new()
                } else {
                    format!("{}*{size}", rng.pick(&["v", "w"]))
                };
                layer.push(Entry::Xattr(path.clone(), name, value));
            }
        }
    }
}

fn hex(v: &[u8]) -> String {
    let h: String = v.iter().map(|b| format!("{b:02x}")).collect();
    format!("hex:{h}")
}

fn env_num(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

/// One line for a failure report: what differed and the first difference.
fn summary(report: &str) -> String {
    report
        .lines()
        .skip(1)
        .take_while(|l| !l.starts_with("layers"))
        .take(3)
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" | ")
}

fn run_seed(seed: u64, nops: usize) -> Result<(), String> {
    // Odd seeds mount with FUSE passthrough (opt-in, root only), even seeds without;
    // VERLAY_DIFF_EXTRA_OPTS (e.g. `writeback=1`) replaces that for every seed
    // (common::pair's mount_subject adds it to every mount).
    let replaced = std::env::var_os("VERLAY_DIFF_EXTRA_OPTS").is_some_and(|v| !v.is_empty());
    set_extra_opts(if seed % 2 == 1 && !replaced {
        "passthrough=1"
    } else {
        ""
    });
    let mut rng = Rng::new(seed);
    let mut layers = random_layers(&mut rng);
    decorate_layers(&mut rng, &mut layers);
    let pool = layers.all_paths();
    let header = format!(
        "seed {seed} ({nops} ops); replay: VERLAY_DIFF_SEED={seed} VERLAY_DIFF_OPS={nops} cargo test --test mount random_sequences_match_kernel_overlayfs -- --nocapture"
    );
    let mut run = Run::new(layers, header);
    // After some ops, `echo 2 > /proc/sys/vm/drop_caches`: the kernel forgets nodes and the
    // next use of each name is a fresh lookup (node identity and lookup counts, issue 13).
    // Drawn from a stream of their own, so a seed's other ops stay what they were (and
    // KNOWN_DIVERGENCES keeps meaning the same sequences). VERLAY_DIFF_DROPCACHES: percent
    // of ops followed by one (default 3, 0 = none).
    let drop_pct = env_num("VERLAY_DIFF_DROPCACHES", 3);
    let mut drops = Rng::new(seed ^ 0xd20b_cace_5000_0000);
    for i in 0..nops {
        let tree = list_tree(run.rig.ref_root());
        let op = gen_op(&mut rng, &tree, &pool);
        let _ = run.step(i, &op)?;
        if drop_pct > 0 && drops.chance(drop_pct) {
            let _ = run.step(i, &Op::DropCaches)?;
        }
        if (i + 1) % 10 == 0 {
            run.compare(&format!("after op #{i}"))?;
        }
    }
    run.finish()
}

/// Seeded random layers and operation sequences give the same results, trees, st_ino
/// stability and upper format as kernel overlayfs.
///
/// Seeds in [`KNOWN_DIVERGENCES`] are open bugs, listed like the expected failures of
/// pjdfstest and xfstests: each must still diverge with its symptom (a listed seed that
/// agrees, or diverges otherwise, fails the test), so fixing one means deleting its entry.
#[test]
fn random_sequences_match_kernel_overlayfs() {
    let nops = env_num("VERLAY_DIFF_OPS", 200) as usize;
    let seeds: Vec<u64> = match std::env::var("VERLAY_DIFF_SEED") {
        Ok(s) => vec![s.parse().expect("VERLAY_DIFF_SEED is a number")],
        Err(_) => {
            let base = env_num("VERLAY_DIFF_SEED_BASE", 0);
            (base..base + env_num("VERLAY_DIFF_SEEDS", 200)).collect()
        }
    };
    let start = std::time::Instant::now();
    let mut failures = Vec::new();
    let mut known = 0;
    for &seed in &seeds {
        let listed = KNOWN_DIVERGENCES
            .iter()
            .find(|(s, _, _)| *s == seed && nops == 200);
        match (run_seed(seed, nops), listed) {
            (Ok(()), None) => {}
            (Err(e), Some((_, symptom, why))) if e.contains(symptom) => {
                eprintln!("seed {seed}: known divergence ({why})");
                known += 1;
            }
            (Ok(()), Some((_, _, why))) => {
                let e = format!("listed in KNOWN_DIVERGENCES ({why}) but agrees now: delete its entry");
                eprintln!("seed {seed}: FAILED: {e}");
                failures.push((seed, e));
            }
            (Err(e), _) => {
                eprintln!("seed {seed}: FAILED: {}", summary(&e));
                failures.push((seed, e));
            }
        }
    }
    if known > 0 {
        eprintln!("{known} seed(s) diverged as listed in KNOWN_DIVERGENCES (open bugs)");
    }
    eprintln!(
        "{} of {} seeds agreed with kernel overlayfs ({nops} ops each, {:.1?})",
        seeds.len() - failures.len(),
        seeds.len(),
        start.elapsed()
    );
    if let Some((_, first)) = failures.first() {
        let list: Vec<String> = failures
            .iter()
            .map(|(s, e)| format!("  seed {s}: {}", summary(e)))
            .collect();
        panic!(
            "{} of {} seeds diverged:\n{}\n\nfirst failure in full:\n{first}",
            failures.len(),
            seeds.len(),
            list.join("\n")
        );
    }
}

/// Seeds of the CI set (200 ops) that diverge from kernel overlayfs for a known, open
/// reason: (seed, a substring of the divergence, why). Each is a bug to fix, not a
/// difference accepted; the closing note of issue 13 names them.
const KNOWN_DIVERGENCES: &[(u64, &str, &str)] = &[
    (
        85,
        "d1/L1~255/s0: only in ref",
        "upper directory's xattr space full: kernel overlayfs sets trusted.overlay.origin on \
         a merged upper dir that lacks it when it looks it up, and fails the lookup with \
         ENOSPC (dmesg: 'failed to look up (s0) for ino (-28)') when the ext4 inode has no room \
         left (copied-up lower xattrs + a 1000-byte user xattr + trusted.verlay.origin); \
         verlay's copy-up should write the kernel's origin itself",
    ),
    (
        1344,
        "L1~255/d1: only in ref",
        "as seed 85 (dmesg: 'failed to look up (d1) for ino (-28)')",
    ),
    (
        225,
        "c/x/N1~255: error ref=\"\" sub=\"readdir No space left on device",
        "as seed 85, met by readdir of the subject's upper under kernel overlayfs",
    ),
    (
        3059,
        "c/a: only in ref",
        "as seed 85 (dmesg: 'failed to look up (a) for ino (-28)')",
    ),
    (
        3289,
        "d2/n1: only in ref",
        "as seed 85 (dmesg: 'failed to look up (n1) for ino (-28)')",
    ),
    (
        3004,
        "`setxattr b trusted.overlay.opaque=c*1000` differs:\n  kernel:  Err(ENOSPC)\n  subject: Ok",
        "the same xattr space, seen from the other side: the kernel's copy-up writes \
         trusted.overlay.origin (an ext4 entry of 64 bytes: 14-byte name, 29-byte file \
         handle), verlay's trusted.verlay.origin (40 bytes: 8-byte st_ino), so a setxattr \
         that fills the inode fails on the kernel only",
    ),
    (
        3597,
        "`rename a/p0 f1/d0/f0` differs:\n  kernel:  Err(ENOSPC)\n  subject: Ok",
        "as seed 3004 (the kernel's rename adds an xattr to a full inode)",
    ),
    (
        4280,
        "`setacl d0 access u::7,g::7,o::2,u:1000:1,g:1001:4,u:65534:4,g:2000:4,g:2001:4,g:3000:7,u:4006:1,g:4007:2,g:4008:6,m::4` differs:\n  kernel:  Err(ENOSPC)\n  subject: Ok",
        "as seed 3004",
    ),
    (
        4620,
        "`setacl f0 access u::0,g::1,o::4,u:1000:5,m::4` differs:\n  kernel:  Err(ENOSPC)\n  subject: Ok",
        "as seed 3004",
    ),
    (
        4835,
        "`stat f0` differs:\n  kernel:  Ok(d 0755 0:0 nlink=1)\n  subject: Ok(d 0755 0:0 nlink=1 mtime=1616405638082278137)",
        "not yet understood: a merged dir keeps its lower mtime in verlay where the kernel's \
         changed, after a rename into it failed with ENOTEMPTY (op #111)",
    ),
    (
        3737,
        "`fchown 2 0:0` differs:\n  kernel:  Ok\n  subject: Err(EEXIST)",
        "a change through the fd of a removed lower fifo or device: kernel overlayfs copies it \
         up by renaming the copy onto its old name over the whiteout, so the removed file \
         reappears (Linux 6.18, measured); verlay refuses with EEXIST",
    ),
    (
        3757,
        "`fchmod 0 2755` differs:\n  kernel:  Ok\n  subject: Err(EEXIST)",
        "as seed 3737 (a removed lower fifo)",
    ),
    (
        3038,
        "`setxattr f0/b/a trusted.overlay.opaque=b*1000` differs:\n  kernel:  Err(ENOSPC)\n  subject: Ok",
        "as seed 3004",
    ),
];
