//! `verlay commit` on real FUSE mounts: mounting the lowers plus the committed layer shows
//! exactly the merged view at the commit instant (content, mode, owner, xattrs, device
//! numbers, hard-link groups), for every feature of a kernel overlayfs upper (new and
//! modified files, whiteouts, opaque dirs, renamed lower dirs, hard links, symlinks, xattrs,
//! devices, fifos); the `--output` tarball is deterministic; writers that keep writing during
//! a commit are paused, never failed, and every file of the layer is one whole version; a
//! crash of the commit process or of the daemon at any named step leaves no layer or a
//! complete one that `verlay verify` finds clean, and the mount usable; bad input is refused
//! with one `what: why (fix)` line, exit 2, and nothing changed.
//!
//! Needs root and /dev/fuse. Every daemon is unmounted and reaped by a Drop guard (by PID),
//! also when a test panics.

// The shared-mmap test maps a file (memmap2's map_mut is unsafe).
#![allow(unsafe_code)]

#[macro_use]
mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{verlay_bin, Launch, Mount, Rig};

/// The variable crash points are read from (src/upper/mod.rs).
const CRASH_AT: &str = "VERLAY_CRASH_AT";
/// Size of one appended record in the concurrent-writers test: one write(2), so one FUSE
/// write request, so the commit sees all of it or none.
const RECORD: usize = 512;

fn bin() -> &'static str {
    verlay_bin()
}

// ---------------------------------------------------------------------------------------------
// daemons

/// verlay in the foreground on `mnt` (created), logging at info, with `VERLAY_CRASH_AT` set to
/// `crash_at` or removed; ready once mounted and its control socket is published (just after
/// the mount goes live). The [`Mount`] guard unmounts and reaps it by PID.
fn daemon(opts: &str, mnt: &Path, crash_at: Option<&str>) -> Mount {
    fs::create_dir_all(mnt).unwrap();
    let mut l = Launch::verlay(opts, mnt)
        .env_remove(CRASH_AT)
        .env("RUST_LOG", "verlay=info")
        .ready_when_logged("control socket ready");
    if let Some(p) = crash_at {
        l = l.env(CRASH_AT, p);
    }
    l.start()
}

/// A [`Rig`] (one lower, an upper, a work dir) with a layer store beside it, in a temp dir.
struct StoreRig {
    dir: tempfile::TempDir,
    rig: Rig,
    store: PathBuf,
}

impl std::ops::Deref for StoreRig {
    type Target = Rig;
    fn deref(&self) -> &Rig {
        &self.rig
    }
}

impl StoreRig {
    fn new(name: &str) -> StoreRig {
        let dir = tempfile::Builder::new()
            .prefix(&format!("verlay-commit-{name}."))
            .tempdir_in("/tmp")
            .unwrap();
        let p = dir.path();
        let store = p.join("store");
        fs::create_dir_all(&store).unwrap();
        StoreRig {
            rig: Rig::named(p, &["lower"], "upper", "work", "mnt"),
            store,
            dir,
        }
    }

    /// `redirect_dir=on`, plus `VERLAY_COMMIT_EXTRA_OPTS` (e.g. `writeback=1`) when set.
    fn opts(&self) -> String {
        match std::env::var("VERLAY_COMMIT_EXTRA_OPTS") {
            Ok(extra) if !extra.is_empty() => self.rig.opts(&format!("redirect_dir=on,{extra}")),
            _ => self.rig.opts("redirect_dir=on"),
        }
    }

    fn mount(&self) -> Mount {
        daemon(&self.opts(), &self.mnt, None)
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Mount the lowers with the committed layer on top, read-only.
    fn mount_layer(&self, chain: &str, name: &str) -> Mount {
        let diff = self
            .store
            .join("layers")
            .join(chain.trim_start_matches("sha256:"))
            .join("diff");
        assert!(diff.is_dir(), "no layer dir {}", diff.display());
        let opts = format!("lowerdir={}:{}", diff.display(), self.lower().display());
        daemon(&opts, &self.p(name), None)
    }
}

/// Run `verlay ARGS...`, with an optional crash point.
fn verlay(args: &[&str], crash_at: Option<&str>) -> Output {
    let mut cmd = Command::new(bin());
    cmd.args(args).env_remove(CRASH_AT).stdin(Stdio::null());
    if let Some(p) = crash_at {
        cmd.env(CRASH_AT, p);
    }
    cmd.output().unwrap()
}

/// `verlay commit` that must succeed: (chain ID, diffID, pause in ms).
fn commit(r: &StoreRig, extra: &[&str]) -> (String, String, f64) {
    let mut args = vec![
        "commit",
        r.mnt.to_str().unwrap(),
        "--store",
        r.store.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = verlay(&args, None);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        o.status.success(),
        "verlay commit failed: {}\n{out}{err}",
        o.status
    );
    let field = |k: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap_or_else(|| panic!("no {k} in {out:?}"))
            .trim()
            .to_string()
    };
    let pause = err
        .split("writers paused for ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no pause figure in {err:?}"));
    (field("chain_id "), field("diff_id "), pause)
}

fn verify_layer(r: &StoreRig, chain: &str) {
    let o = verlay(&["verify", "--store", r.store.to_str().unwrap(), chain], None);
    assert!(
        o.status.success(),
        "verlay verify {chain}: {}\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

// ---------------------------------------------------------------------------------------------
// tree views

/// A tree as `path -> description`: kind, mode, owner, content digest or target or device,
/// every xattr users see, and for files with several links the other names of the inode.
type View = BTreeMap<String, String>;

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
    })
}

fn xattrs(p: &Path) -> Vec<(String, String)> {
    let mut names = vec![0u8; 65536];
    let n = rustix::fs::llistxattr(p, &mut names).unwrap_or(0);
    let mut out = Vec::new();
    for name in names[..n].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let mut v = vec![0u8; 65536];
        let s = String::from_utf8_lossy(name).into_owned();
        // security.selinux and the like come from the host, not the layers.
        if s.starts_with("security.selinux") {
            continue;
        }
        let m = rustix::fs::lgetxattr(p, name, &mut v).unwrap_or(0);
        out.push((s, String::from_utf8_lossy(&v[..m]).into_owned()));
    }
    out.sort();
    out
}

fn view(root: &Path) -> View {
    let mut v = View::new();
    let mut inos: HashMap<u64, Vec<String>> = HashMap::new();
    walk(root, "", &mut v, &mut inos);
    for names in inos.values().filter(|n| n.len() > 1) {
        for n in names {
            let others: Vec<&String> = names.iter().filter(|o| *o != n).collect();
            v.get_mut(n).unwrap().push_str(&format!(" links={others:?}"));
        }
    }
    v
}

fn walk(root: &Path, rel: &str, out: &mut View, inos: &mut HashMap<u64, Vec<String>>) {
    let p = if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(rel)
    };
    let m = fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
    let ft = m.file_type();
    let key = if rel.is_empty() {
        "/".to_string()
    } else {
        rel.to_string()
    };
    let what = if ft.is_dir() {
        "d".to_string()
    } else if ft.is_file() {
        let data = fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
        inos.entry(m.ino()).or_default().push(key.clone());
        format!("f len={} fnv={:016x}", data.len(), fnv(&data))
    } else if ft.is_symlink() {
        format!("l ->{}", fs::read_link(&p).unwrap().display())
    } else {
        format!("node type={:o} rdev={:x}", m.mode() & 0o170000, m.rdev())
    };
    let desc = format!(
        "{what} mode={:o} owner={}:{} xattrs={:?}",
        m.mode() & 0o7777,
        m.uid(),
        m.gid(),
        xattrs(&p)
    );
    out.insert(key, desc);
    if ft.is_dir() {
        let mut names: Vec<String> = fs::read_dir(&p)
            .unwrap_or_else(|e| panic!("readdir {}: {e}", p.display()))
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for n in names {
            let r = if rel.is_empty() { n } else { format!("{rel}/{n}") };
            walk(root, &r, out, inos);
        }
    }
}

fn diff(want: &View, got: &View) -> String {
    let keys: BTreeSet<&String> = want.keys().chain(got.keys()).collect();
    let mut s = String::new();
    for k in keys {
        match (want.get(k), got.get(k)) {
            (x, y) if x == y => {}
            (x, y) => s.push_str(&format!("  {k}:\n    want {x:?}\n    got  {y:?}\n")),
        }
    }
    s
}

/// Names under a directory, recursively (for "nothing changed" checks), with sizes.
fn listing(root: &Path) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    fn go(root: &Path, rel: &Path, out: &mut BTreeMap<String, u64>) {
        let Ok(rd) = fs::read_dir(root.join(rel)) else {
            return;
        };
        for e in rd.flatten() {
            let r = rel.join(e.file_name());
            let m = e.path().symlink_metadata().unwrap();
            out.insert(r.display().to_string(), if m.is_dir() { 0 } else { m.len() });
            if m.is_dir() {
                go(root, &r, out);
            }
        }
    }
    go(root, Path::new(""), &mut out);
    out
}

// ---------------------------------------------------------------------------------------------
// the workload: every feature of an upper

fn lower_fixture(l: &Path) {
    for d in ["dir/sub", "gone", "ren/inner", "opq", "keep"] {
        fs::create_dir_all(l.join(d)).unwrap();
    }
    fs::write(l.join("file"), "lower file\n").unwrap();
    fs::write(l.join("deleted"), "bye\n").unwrap();
    fs::write(l.join("dir/sub/deep"), "deep\n").unwrap();
    fs::write(l.join("dir/x"), "x\n").unwrap();
    fs::write(l.join("gone/a"), "a\n").unwrap();
    fs::write(l.join("ren/a"), "ren a\n").unwrap();
    fs::write(l.join("ren/b"), "ren b\n").unwrap();
    fs::write(l.join("ren/inner/c"), "ren c\n").unwrap();
    fs::write(l.join("opq/hidden"), "hidden\n").unwrap();
    fs::write(l.join("keep/k"), "k\n").unwrap();
    fs::write(l.join("hl1"), "lower link\n").unwrap();
    fs::hard_link(l.join("hl1"), l.join("hl2")).unwrap();
    fs::write(l.join("big"), vec![7u8; 300_000]).unwrap();
    rustix::fs::lsetxattr(
        l.join("keep/k"),
        "user.lower",
        b"1",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
}

fn sh(cmd: &str, cwd: &Path) {
    let st = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .current_dir(cwd)
        .status()
        .unwrap();
    assert!(st.success(), "{cmd}: {st}");
}

/// Change the mount in every way an upper can record.
fn change_everything(m: &Path) {
    sh(
        "set -e
         echo new > new
         mkdir -p newdir/a/b && echo n > newdir/a/b/f
         echo appended >> file
         printf 'changed' | dd of=big bs=1 seek=1000 conv=notrunc status=none
         rm deleted
         rm -r gone
         rm dir/x
         rm -r opq && mkdir opq && echo fresh > opq/fresh
         mv ren renamed
         rm renamed/a && echo added > renamed/added && echo more >> renamed/b
         mv renamed/inner moved-inner
         ln new new-link && ln newdir/a/b/f newdir/f-link && ln newdir/a/b/f renamed/f-link
         echo touched >> hl1
         ln -s /nonexistent-verlay/target sym
         ln -s ../file newdir/rel-sym
         mkfifo fifo
         mknod cdev c 1 3
         mknod bdev b 7 200
         echo suid > suid && chown 1234:567 suid && chmod 4755 suid
         setfattr -n user.k -v v new
         setfattr -n user.dir -v d newdir
         setfattr -n trusted.overlay.mine -v escaped new
         setfattr -n user.k2 -v v2 keep/k
         chmod 700 keep
         mkdir sticky && chmod 1777 sticky",
        m,
    );
}

#[test]
fn committed_layer_over_the_lowers_shows_the_merged_view_of_the_commit_instant() {
    let r = StoreRig::new("features");
    lower_fixture(r.lower());
    let _d = r.mount();
    change_everything(&r.mnt);
    let want = view(&r.mnt);
    let upper_before = listing(&r.upper);
    let out = r.p("layer.tar");
    let (chain, diff_id, pause) = commit(&r, &["--output", out.to_str().unwrap()]);
    assert_eq!(chain, diff_id, "a base layer's chain ID is its diffID");
    eprintln!("commit paused writers for {pause} ms");
    assert_eq!(listing(&r.upper), upper_before, "the commit changed the upper");
    // The mount is not left frozen.
    fs::write(r.mnt.join("after"), "after").unwrap();

    verify_layer(&r, &chain);
    let _l = r.mount_layer(&chain, "check");

    // The same through kernel overlayfs: the layer is plain kernel format, no verlay needed.
    let kmnt = r.p("kernel");
    fs::create_dir(&kmnt).unwrap();
    let diff_dir = r
        .store
        .join("layers")
        .join(chain.trim_start_matches("sha256:"))
        .join("diff");
    let opts = format!("lowerdir={}:{}", diff_dir.display(), r.lower().display());
    if let Ok(_unmount) = Mount::kernel_overlay(&opts, &kmnt) {
        let got = view(&kmnt);
        let d = diff(&want, &got);
        assert!(
            d.is_empty(),
            "kernel overlayfs over lowers + committed layer differs:\n{d}"
        );
    } else {
        eprintln!("kernel overlayfs not available here: only verlay checked the layer");
    }
    let got = view(&r.p("check"));
    let d = diff(&want, &got);
    assert!(
        d.is_empty(),
        "lowers + committed layer differ from the merged view:\n{d}"
    );

    // The tarball speaks OCI: whiteouts and opaque markers, no overlay or verlay metadata.
    let tar = fs::read(&out).unwrap();
    let text = String::from_utf8_lossy(&tar);
    for needle in [
        ".wh.deleted",
        ".wh.gone",
        "dir/.wh.x",
        "opq/.wh..wh..opq",
        "renamed/.wh..wh..opq",
        ".wh.ren\0",
        "SCHILY.xattr.trusted.overlay.mine=escaped",
        "SCHILY.xattr.user.k=v",
    ] {
        assert!(text.contains(needle), "tarball lacks {needle:?}");
    }
    for banned in [
        "overlay.redirect",
        "overlay.origin",
        "overlay.impure",
        "verlay.origin",
        "overlay.opaque",
        "overlay.overlay.",
    ] {
        assert!(!text.contains(banned), "tarball leaks {banned:?}");
    }
    let list = Command::new("tar").arg("tvf").arg(&out).output().unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.contains("new-link link to new"),
        "hard link not kept as a tar link:\n{list}"
    );
    assert!(
        !list.contains("renamed/inner/") && list.contains("moved-inner/c"),
        "{list}"
    );
}

/// The store rule shared by every command that writes to a store: a missing store is created
/// on first use (`verlay layer import` did so already), and the layer lands in it.
#[test]
fn commit_into_a_missing_store_creates_it() {
    let r = StoreRig::new("newstore");
    lower_fixture(r.lower());
    fs::remove_dir(&r.store).unwrap();
    let _d = r.mount();
    fs::write(r.mnt.join("new-file"), "n").unwrap();
    let (chain, _, _) = commit(&r, &[]);
    assert_eq!(
        store_layers(&r.store),
        BTreeSet::from([chain.trim_start_matches("sha256:").to_string()])
    );
    verify_layer(&r, &chain);
}

#[test]
fn output_tarball_is_byte_identical_across_commits_of_the_same_state() {
    let r = StoreRig::new("determinism");
    lower_fixture(r.lower());
    let _d = r.mount();
    change_everything(&r.mnt);
    let (a, b) = (r.p("a.tar"), r.p("b.tar"));
    let (c1, d1, _) = commit(&r, &["--output", a.to_str().unwrap()]);
    let (c2, d2, _) = commit(&r, &["--output", b.to_str().unwrap()]);
    assert_eq!((c1.as_str(), d1.as_str()), (c2.as_str(), d2.as_str()));
    let (ta, tb) = (fs::read(&a).unwrap(), fs::read(&b).unwrap());
    assert!(ta == tb, "two commits of the same state wrote different tarballs");
    // The diffID is the sha256 of the tarball.
    let sum = Command::new("sha256sum").arg(&a).output().unwrap();
    let sum = String::from_utf8_lossy(&sum.stdout);
    assert_eq!(format!("sha256:{}", sum.split(' ').next().unwrap()), d1);
    // A layer on top of it: the chain ID follows the parent.
    fs::write(r.mnt.join("second"), "2").unwrap();
    let (c3, d3, _) = commit(&r, &["--parent", &c1]);
    assert_ne!(c3, d3, "a layer with a parent has a chain ID of its own");
    verify_layer(&r, &c3);
}

/// Data written through a shared mmap reaches the daemon only when the kernel writes the
/// page back; the commit flushes the mount first, so it is in the layer. (FUSE's small
/// dirty limits usually start that writeback at once, so this passes without the flush
/// too; it guards the outcome, not the mechanism.)
#[test]
fn shared_mmap_writes_made_before_the_commit_are_in_the_layer() {
    let r = StoreRig::new("mmap");
    fs::write(r.lower().join("lowerfile"), vec![b'l'; 8192]).unwrap();
    let _d = r.mount();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(r.mnt.join("lowerfile"))
        .unwrap();
    // SAFETY: the file is ours and nothing else maps or truncates it while mapped.
    let mut map = unsafe { memmap2::MmapMut::map_mut(&f) }.unwrap();
    map[100..109].copy_from_slice(b"via mmap!");
    let (chain, _, _) = commit(&r, &[]);
    drop(map);
    let diff = r
        .store
        .join("layers")
        .join(chain.trim_start_matches("sha256:"))
        .join("diff");
    let data = fs::read(diff.join("lowerfile")).unwrap();
    assert_eq!(
        &data[100..109],
        b"via mmap!",
        "the mmap write is not in the layer"
    );
    assert_eq!(data.len(), 8192);
}

// ---------------------------------------------------------------------------------------------
// concurrent writers

/// Record `i` of appender `t`: its numbers, then filler derived from them.
fn record(t: u64, i: u64) -> Vec<u8> {
    let mut v = format!("{t}:{i}:").into_bytes();
    while v.len() < RECORD {
        v.push(b'a' + ((t * 31 + i * 7 + v.len() as u64) % 26) as u8);
    }
    v
}

/// Version `n` of rewritten file `t`: a header with its length and digest, then a body
/// whose length varies with `n`.
fn version(t: u64, n: u64) -> Vec<u8> {
    let body: Vec<u8> = (0..(1000 + (n * 977) % 60_000))
        .map(|k| (k * (n + t + 1) % 251) as u8)
        .collect();
    let mut v = format!("v{n} len={} fnv={:016x}\n", body.len(), fnv(&body)).into_bytes();
    v.extend_from_slice(&body);
    v
}

fn check_version(data: &[u8]) -> Result<(), String> {
    let nl = data.iter().position(|b| *b == b'\n').ok_or("no header")?;
    let head = String::from_utf8_lossy(&data[..nl]).into_owned();
    let body = &data[nl + 1..];
    let want = format!("len={} fnv={:016x}", body.len(), fnv(body));
    if head.ends_with(&want) {
        Ok(())
    } else {
        Err(format!("torn version: header {head:?}, body {want}"))
    }
}

fn check_appended(t: u64, data: &[u8]) -> Result<(), String> {
    if data.len() % RECORD != 0 {
        return Err(format!("{} bytes: not whole records", data.len()));
    }
    for (i, rec) in data.chunks(RECORD).enumerate() {
        if rec != record(t, i as u64).as_slice() {
            return Err(format!("record {i} is not the {i}-th record written"));
        }
    }
    Ok(())
}

#[test]
fn writers_are_paused_not_failed_and_every_file_is_one_whole_version() {
    let r = StoreRig::new("writers");
    fs::write(r.lower().join("seed"), "seed").unwrap();
    // The appenders' files start in the lower layer (record 0), so their first append is a
    // copy-up racing with the commits.
    for t in [0u64, 3] {
        fs::write(r.lower().join(format!("app{t}")), record(t, 0)).unwrap();
    }
    let _d = r.mount();
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let max_op_us = Arc::new(AtomicU64::new(0));
    let ops = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for t in 0..6u64 {
        let (stop, errors, max_op_us, ops) = (stop.clone(), errors.clone(), max_op_us.clone(), ops.clone());
        let m = r.mnt.clone();
        threads.push(std::thread::spawn(move || {
            // Appenders continue after the lower's record 0.
            let mut n = u64::from(t % 3 == 0);
            let mut app: Option<File> = None;
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let res: std::io::Result<()> = (|| match t % 3 {
                    // appenders: one record per write(2)
                    0 => {
                        let f = match &mut app {
                            Some(f) => f,
                            None => app.insert(
                                OpenOptions::new()
                                    .create(true)
                                    .append(true)
                                    .open(m.join(format!("app{t}")))?,
                            ),
                        };
                        f.write_all(&record(t, n))
                    }
                    // atomic replace: write a temp, rename it over the name
                    1 => {
                        let tmp = m.join(format!(".tmp{t}"));
                        fs::write(&tmp, version(t, n))?;
                        fs::rename(&tmp, m.join(format!("rep{t}")))
                    }
                    // rewrite in place: O_TRUNC then one write
                    _ => {
                        let mut f = OpenOptions::new()
                            .write(true)
                            .create(true)
                            .truncate(true)
                            .open(m.join(format!("trunc{t}")))?;
                        f.write_all(&version(t, n))
                    }
                })();
                if let Err(e) = res {
                    eprintln!("writer {t}: {e}");
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                max_op_us.fetch_max(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                ops.fetch_add(1, Ordering::Relaxed);
                n += 1;
            }
        }));
    }
    std::thread::sleep(Duration::from_millis(300));
    let mut pauses = Vec::new();
    let mut chains = Vec::new();
    for _ in 0..4 {
        let (chain, _, pause) = commit(&r, &[]);
        pauses.push(pause);
        chains.push(chain);
        std::thread::sleep(Duration::from_millis(150));
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(
        errors.load(Ordering::Relaxed),
        0,
        "a writer saw an error during commits"
    );
    eprintln!(
        "{} writer ops, longest op {} us; commit pauses (ms): {pauses:?}",
        ops.load(Ordering::Relaxed),
        max_op_us.load(Ordering::Relaxed)
    );
    for chain in &chains {
        verify_layer(&r, chain);
        let diff = r
            .store
            .join("layers")
            .join(chain.trim_start_matches("sha256:"))
            .join("diff");
        for e in fs::read_dir(&diff).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let data = fs::read(e.path()).unwrap();
            let res = if let Some(t) = name.strip_prefix("app") {
                check_appended(t.parse().unwrap(), &data)
            } else if name.starts_with("rep") {
                check_version(&data)
            } else if name.starts_with("trunc") {
                // Empty is a real state: the commit fell between O_TRUNC and the write.
                if data.is_empty() {
                    Ok(())
                } else {
                    check_version(&data)
                }
            } else {
                Ok(())
            };
            if let Err(why) = res {
                panic!("layer {chain}: {name}: {why}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// crash points

/// The `crash_point("...")` names in a source file, or in the files of a source directory.
fn points_in(src: &str) -> BTreeSet<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(src);
    let text = if path.is_dir() {
        let mut files: Vec<PathBuf> = fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        files
            .iter()
            .map(|f| fs::read_to_string(f).unwrap())
            .collect::<String>()
    } else {
        fs::read_to_string(&path).unwrap()
    };
    text.split("crash_point(\"")
        .skip(1)
        .filter_map(|s| s.split('"').next())
        .map(str::to_string)
        .collect()
}

/// Does the store hold exactly `chains` as layers, and nothing in `tmp/`?
fn store_layers(store: &Path) -> BTreeSet<String> {
    fs::read_dir(store.join("layers"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// A write through the mount completes promptly: the mount is not left frozen.
fn assert_not_frozen(m: &Path, what: &str) {
    let (tx, rx) = std::sync::mpsc::channel();
    let p = m.join("probe");
    std::thread::spawn(move || {
        let _ = tx.send(fs::write(&p, "probe"));
    });
    match rx.recv_timeout(Duration::from_secs(5)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("{what}: write through the mount failed: {e}"),
        Err(_) => panic!("{what}: the mount stayed frozen"),
    }
}

#[test]
fn a_crash_at_any_step_leaves_no_layer_or_a_complete_one() {
    let r = StoreRig::new("crash");
    lower_fixture(r.lower());
    let mut d = Some(r.mount());
    change_everything(&r.mnt);
    let reference = view(&r.mnt);
    // The layer a commit makes of this state.
    let refstore = r.p("refstore");
    fs::create_dir(&refstore).unwrap();
    let o = verlay(
        &[
            "commit",
            r.mnt.to_str().unwrap(),
            "--store",
            refstore.to_str().unwrap(),
        ],
        None,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want_chain = store_layers(&refstore);
    assert_eq!(want_chain.len(), 1);
    fs::remove_file(r.mnt.join("probe")).ok();

    let client_points: Vec<String> = points_in("src/commit").into_iter().collect();
    let store_points = points_in("src/store/mod.rs");
    // Steps the commit reaches after which the layer is published.
    let published = ["import.publish", "commit.output", "commit.cleanup"];
    let mut n = 0;
    for point in client_points.iter().chain(store_points.iter()) {
        let store = r.p(&format!("store-{point}"));
        fs::create_dir(&store).unwrap();
        let out = r.p(&format!("out-{point}.tar"));
        let o = verlay(
            &[
                "commit",
                r.mnt.to_str().unwrap(),
                "--store",
                store.to_str().unwrap(),
                "--output",
                out.to_str().unwrap(),
            ],
            Some(point),
        );
        assert_eq!(o.status.signal(), Some(9), "{point}: not killed: {o:?}");
        n += 1;
        assert_not_frozen(&r.mnt, point);
        fs::remove_file(r.mnt.join("probe")).unwrap();
        // The next store operation removes the leftovers.
        let ls = verlay(&["layer", "ls", "--store", store.to_str().unwrap()], None);
        assert!(ls.status.success(), "{point}: {ls:?}");
        let tmp: Vec<_> = fs::read_dir(store.join("tmp")).unwrap().flatten().collect();
        assert!(
            tmp.is_empty(),
            "{point}: leftovers in tmp/ after a store operation"
        );
        let layers = store_layers(&store);
        if published.contains(&point.as_str()) {
            // Not the reference's chain ID: the probe writes above changed the root's mtime.
            assert_eq!(layers.len(), 1, "{point}: the layer is not there");
            let chain = format!("sha256:{}", layers.iter().next().unwrap());
            let o = verlay(&["verify", "--store", store.to_str().unwrap(), &chain], None);
            assert!(o.status.success(), "{point}: the layer does not verify: {o:?}");
        } else {
            assert!(layers.is_empty(), "{point}: a layer was published: {layers:?}");
        }
        // Whatever the output file holds is a whole tarball, or there is none.
        if out.exists() {
            assert!(
                point == "commit.output" || point == "commit.cleanup",
                "{point}: output written early"
            );
        }
        let left: Vec<String> = fs::read_dir(r.dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("verlay-tmp"))
            .collect();
        assert!(left.is_empty(), "{point}: temp output files left: {left:?}");
    }
    for p in [
        "commit.freeze",
        "commit.snapshot",
        "commit.thaw",
        "commit.materialize",
        "import.publish",
    ] {
        assert!(
            client_points.iter().chain(store_points.iter()).any(|x| x == p),
            "{p} not enumerated"
        );
    }

    // The daemon killed while it holds, or just released, the gate: no layer; the same upper
    // mounts again and shows the same view; a commit then works.
    let daemon_points = points_in("src/control.rs");
    assert_eq!(
        daemon_points,
        ["gate.freeze", "gate.thaw"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    );
    for point in &daemon_points {
        drop(d.take());
        let mut killed = daemon(&r.opts(), &r.mnt, Some(point));
        let store = r.p(&format!("store-{point}"));
        fs::create_dir(&store).unwrap();
        let o = verlay(
            &[
                "commit",
                r.mnt.to_str().unwrap(),
                "--store",
                store.to_str().unwrap(),
            ],
            None,
        );
        assert_eq!(o.status.code(), Some(1), "{point}: {o:?}");
        n += 1;
        killed.wait_exit();
        drop(killed);
        let ls = verlay(&["layer", "ls", "--store", store.to_str().unwrap()], None);
        assert!(ls.status.success());
        assert!(store_layers(&store).is_empty(), "{point}: a layer was published");
        assert!(
            fs::read_dir(store.join("tmp")).unwrap().next().is_none(),
            "{point}: leftovers"
        );
        d = Some(r.mount());
        let again = view(&r.mnt);
        let dd = diff(&reference, &again);
        assert!(dd.is_empty(), "{point}: the remounted upper differs:\n{dd}");
        let (chain, _, _) = commit(&r, &[]);
        verify_layer(&r, &chain);
        fs::remove_dir_all(r.store.join("layers").join(chain.trim_start_matches("sha256:"))).unwrap();
    }
    eprintln!("{n} crash points enumerated");
}

// ---------------------------------------------------------------------------------------------
// bad input

/// `verlay commit ARGS` must fail with exit 2 and one `verlay commit: what: why (fix)` line.
fn refused(args: &[&str], why: &str) {
    let o = verlay(args, None);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(2), "{args:?}: {o:?}");
    assert!(
        o.stdout.is_empty(),
        "{args:?}: printed {:?}",
        String::from_utf8_lossy(&o.stdout)
    );
    let line = err.trim_end();
    assert!(!line.contains('\n'), "{args:?}: more than one line: {err}");
    assert!(
        line.starts_with("verlay commit: ")
            && line.contains(": ")
            && line.ends_with(')')
            && line.contains(" ("),
        "{args:?}: not `what: why (fix)`: {line}"
    );
    assert!(line.contains(why), "{args:?}: {line} does not say {why:?}");
}

#[test]
fn bad_input_is_refused_with_exit_2_and_changes_nothing() {
    let r = StoreRig::new("bad");
    lower_fixture(r.lower());
    let _d = r.mount();
    fs::write(r.mnt.join("x"), "x").unwrap();
    let ro_mnt = r.p("ro");
    let _ro = daemon(&format!("lowerdir={}", r.lower().display()), &ro_mnt, None);
    let (m, s) = (r.mnt.to_str().unwrap(), r.store.to_str().unwrap());
    let plain = r.p("plain");
    fs::create_dir(&plain).unwrap();
    let missing = r.p("no-such-store");
    let inside = r.mnt.join("store-inside");
    fs::create_dir(&inside).unwrap();
    // One store already initialised (layers/, tmp/, lock), one an empty directory.
    let fresh = r.p("fresh-store");
    fs::create_dir(&fresh).unwrap();
    // Read-only commands (layer ls) no longer create a store; opening it does, as every
    // command that writes to it.
    drop(verlay::store::Store::open(&r.store).expect("initialise the store"));
    let upper_before = listing(&r.upper);
    let store_before = listing(&r.store);
    let bogus = format!("sha256:{}", "ab".repeat(32));

    refused(
        &["commit", plain.to_str().unwrap(), "--store", s],
        "not a verlay mount",
    );
    refused(&["commit", "/", "--store", s], "not a verlay mount");
    refused(
        &[
            "commit",
            r.mnt.join("lower-dir-inside").to_str().unwrap(),
            "--store",
            s,
        ],
        "mount",
    );
    fs::create_dir(r.mnt.join("sub")).unwrap();
    refused(
        &["commit", r.mnt.join("sub").to_str().unwrap(), "--store", s],
        "not a verlay mount",
    );
    refused(
        &["commit", ro_mnt.to_str().unwrap(), "--store", s],
        "no upper layer",
    );
    refused(
        &["commit", m, "--store", s, "--parent", &bogus],
        "not in the store",
    );
    refused(
        &[
            "commit",
            m,
            "--store",
            fresh.to_str().unwrap(),
            "--parent",
            &bogus,
        ],
        "not in the store",
    );
    refused(
        &["commit", m, "--store", s, "--parent", "xyz"],
        "not in the store",
    );
    // A store whose parent is missing too is not created (the store rule creates the store
    // directory, not a path to it).
    refused(
        &["commit", m, "--store", missing.join("deeper").to_str().unwrap()],
        "No such file",
    );
    refused(
        &["commit", m, "--store", inside.to_str().unwrap()],
        "inside the mount",
    );
    refused(&["commit", m], "--store DIR is required");
    refused(&["commit", "--store", s], "MOUNTPOINT is required");
    refused(&["commit", m, "--store", s, "--bogus"], "unknown option");
    refused(
        &[
            "commit",
            m,
            "--store",
            s,
            "--output",
            r.p("nodir/x.tar").to_str().unwrap(),
        ],
        "does not exist",
    );

    // A name an OCI layer would read as a whiteout: refused, nothing published.
    fs::write(r.mnt.join(".wh.x"), "").unwrap();
    refused(&["commit", m, "--store", s], "starts with .wh.");
    fs::remove_file(r.mnt.join(".wh.x")).unwrap();

    assert!(!missing.exists(), "a store was created under a missing directory");
    fs::remove_dir(r.mnt.join("sub")).unwrap();
    fs::remove_dir(&inside).unwrap();
    let mut upper_before = upper_before;
    upper_before.retain(|k, _| k != "store-inside");
    assert_eq!(listing(&r.upper), upper_before, "the upper changed");
    assert_eq!(listing(&r.store), store_before, "the store changed");
    assert!(listing(&fresh).is_empty(), "an empty directory was made a store");
}

// ---------------------------------------------------------------------------------------------
// pause figure

/// How long writers are paused for an upper of `VERLAY_COMMIT_MIB` MiB (default 64) in 64
/// files, measured by the daemon (the time it holds the gate). A figure, not a pass/fail
/// bound beyond "well under the time to write that data again".
#[test]
fn pause_for_a_large_upper_is_reported() {
    let mib: u64 = std::env::var("VERLAY_COMMIT_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let r = StoreRig::new("pause");
    let _d = r.mount();
    let chunk = vec![0x5au8; 1 << 20];
    let files = 64u64;
    for i in 0..files {
        let mut f = File::create(r.mnt.join(format!("f{i}"))).unwrap();
        for _ in 0..mib.div_ceil(files) {
            f.write_all(&chunk).unwrap();
        }
    }
    let started = Instant::now();
    let (chain, _, pause) = commit(&r, &[]);
    let total = started.elapsed();
    eprintln!(
        "upper of {} MiB: writers paused {pause:.1} ms; whole commit {:.1} s",
        files * mib.div_ceil(files),
        total.as_secs_f64()
    );
    assert!(pause > 0.0 && pause < total.as_secs_f64() * 1000.0);
    let diff = r
        .store
        .join("layers")
        .join(chain.trim_start_matches("sha256:"))
        .join("diff");
    let mut f = File::open(diff.join("f0")).unwrap();
    let mut first = [0u8; 4];
    f.read_exact(&mut first).unwrap();
    assert_eq!(first, [0x5a; 4]);
}

/// With `passthrough=1` writes through an open file go straight to the upper file and
/// cannot be paused: a commit while such a file is open refuses (exit 2, `what: why (fix)`,
/// no layer), and works again once it is closed.
#[test]
fn passthrough_writers_make_commit_refuse_until_closed() {
    let r = StoreRig::new("passthrough");
    lower_fixture(r.lower());
    let _d = daemon(&format!("{},passthrough=1", r.opts()), &r.mnt, None);
    let mut f = fs::File::create(r.mnt.join("log")).unwrap();
    f.write_all(b"first line\n").unwrap();
    let args = [
        "commit",
        r.mnt.to_str().unwrap(),
        "--store",
        r.store.to_str().unwrap(),
    ];
    let o = verlay(&args, None);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("passthrough=1") && err.contains("open for writing"),
        "the refusal says why: {err}"
    );
    assert_eq!(store_layers(&r.store), BTreeSet::new(), "no layer published");
    // The mount was thawed at once: the writer goes on.
    f.write_all(b"second line\n").unwrap();
    drop(f);
    let (chain, _, _) = commit(&r, &[]);
    verify_layer(&r, &chain);
}
