//! Power cuts on a real filesystem. The store or the upper lives on XFS on a loop device; a
//! power cut is `xfs_io -x -c shutdown` *without* `-f`: the log is not flushed, so everything
//! that was not made durable is lost, as in xfstests' "godown" crash tests. The filesystem is
//! then unmounted and mounted again (log recovery) and the promises are checked:
//!
//! - layer import: a cut right after each named step of `verlay layer import` (and after a
//!   successful import) leaves the layers published before intact and verifying clean, and
//!   the interrupted one either absent or complete and verifying clean; the next store command
//!   removes the leftovers and the import can be run again.
//! - a live mount: a worker thread runs a seeded mix of fsynced overwrites, atomic replaces
//!   (write temp, fsync, rename over a lower name, fsync dir), unlinks, creates and renames of
//!   lower files and dirs while the power is cut at a seeded moment. After the remount every
//!   name shows a state it had at or after its last acknowledged durable point (a deleted
//!   lower file never comes back, a replaced one never shows the lower version again), a
//!   renamed file or dir is present exactly once, no file is torn, the work dir is empty and
//!   the lower layer is unchanged.
//!
//! Needs root, loop devices, mkfs.xfs and xfs_io (tests/setup.sh installs xfsprogs); it says
//! SKIP otherwise. `VERLAY_POWERCUT_ROUNDS` (default 6) and `VERLAY_POWERCUT_SEED` set the
//! number of cuts of the live-mount test and its first seed.

#[macro_use]
mod common;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    as_user, dir_names, is_mounted, run, scratch, sh, verlay_bin, Launch, LoopDev, Mount, Rng, Stop,
};

/// The smallest filesystem mkfs.xfs accepts (300 MB), as a sparse image.
const XFS_IMAGE_BYTES: u64 = 320 << 20;

/// An XFS on a loop device that can lose power. Fields drop in order: the mount first.
struct Disk {
    mnt: Option<Mount>,
    dev: LoopDev,
    image: PathBuf,
    at: PathBuf,
}

impl Disk {
    fn new(image: &Path, at: &Path) -> Disk {
        let dev = LoopDev::new(image, XFS_IMAGE_BYTES);
        run("mkfs.xfs", &["-q", "-f", &dev.0]);
        let mnt = Mount::fs(&[&dev.0], at);
        Disk {
            mnt: Some(mnt),
            dev,
            image: image.to_path_buf(),
            at: at.to_path_buf(),
        }
    }

    /// Power cut: the filesystem stops writing at once and its unflushed log is lost.
    fn cut(&self) {
        run("xfs_io", &["-x", "-c", "shutdown", self.at.to_str().unwrap()]);
    }

    /// Unmount the dead filesystem and mount it again, which replays its log.
    fn reboot(&mut self) {
        // A lazy unmount would keep the dead superblock, and mounting the device again would
        // reuse it, still shut down: insist on a real unmount.
        let start = Instant::now();
        let mut last = String::new();
        while is_mounted(&self.at) {
            let o = Command::new("umount").arg(&self.at).output().unwrap();
            if o.status.success() {
                break;
            }
            last = String::from_utf8_lossy(&o.stderr).into_owned();
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "cannot unmount {} after the cut: {last}",
                self.at.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        if !last.is_empty() {
            eprintln!("umount after the cut needed {:?} ({last})", start.elapsed());
        }
        if let Some(m) = self.mnt.take() {
            std::mem::forget(m); // unmounted above
        }
        // The image goes on a new loop device: a mount namespace made while the filesystem
        // was mounted (containerd's, podman's) keeps the shut-down superblock alive, and
        // mounting the same device again would hand back that dead superblock.
        self.dev = LoopDev::attach(&self.image);
        self.mnt = Some(Mount::fs(&[&self.dev.0], &self.at));
    }
}

fn verlay(args: &[&str]) -> Output {
    Command::new(verlay_bin()).args(args).output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn assert_verifies(diff: &Path, what: &str) {
    let v = verlay(&["verify", diff.to_str().unwrap()]);
    assert_eq!(
        v.status.code(),
        Some(0),
        "{what}: {} must verify clean: {}",
        diff.display(),
        text(&v)
    );
}

// ---------------------------------------------------------------------------------------------
// layer import

#[test]
fn import_power_cut_after_each_step_keeps_published_layers_and_publishes_nothing_half_done() {
    require_tools!("mkfs.xfs", "xfs_io", "losetup", "tar");
    let t = scratch("verlay-powercut.");
    let d = t.path();
    sh(&format!(
        "cd {}; mkdir base top
         head -c 3000000 /dev/urandom > base/big; mkdir base/dir; echo a > base/dir/a
         echo gone > base/gone; ln -s dir/a base/link; ln base/dir/a base/hard
         for i in $(seq 1 200); do echo $i > base/dir/f$i; done
         head -c 1000000 /dev/urandom > top/big; mkdir top/dir top/new; echo b > top/dir/a
         : > top/.wh.gone; for i in $(seq 1 200); do echo n$i > top/new/g$i; done
         tar --sort=name -C base -cf base.tar . && tar --sort=name -C top -cf top.tar .",
        d.display()
    ));
    let (base_tar, top_tar) = (d.join("base.tar"), d.join("top.tar"));
    let mut disk = Disk::new(&d.join("xfs.img"), &d.join("fs"));
    let steps = [
        "import.unpack",
        "import.fsync",
        "import.seal",
        "import.record",
        "import.publish",
        "completed",
    ];
    for step in steps {
        let store = disk.at.join(format!("store-{step}"));
        let s = store.to_str().unwrap();
        let o = verlay(&["layer", "import", "--store", s, base_tar.to_str().unwrap()]);
        assert!(o.status.success(), "{}", text(&o));
        let base = String::from_utf8_lossy(&o.stdout).trim().to_string();

        let mut cmd = Command::new(verlay_bin());
        cmd.args(["layer", "import", "--store", s, "--parent", &base])
            .arg(&top_tar);
        if step != "completed" {
            cmd.env("VERLAY_CRASH_AT", step);
        }
        let o = cmd.output().unwrap();
        assert_eq!(o.status.success(), step == "completed", "{step}: {}", text(&o));
        let top = String::from_utf8_lossy(&o.stdout).trim().to_string();

        disk.cut();
        disk.reboot();

        // The next store command removes the leftovers of the interrupted import.
        let o = verlay(&["layer", "ls", "--store", s]);
        assert!(o.status.success(), "{step}: layer ls after the cut: {}", text(&o));
        assert_eq!(
            dir_names(&store.join("tmp")),
            Vec::<String>::new(),
            "{step}: tmp/ cleaned"
        );
        let published = dir_names(&store.join("layers"));
        let hex = |c: &str| c.trim_start_matches("sha256:").to_string();
        assert!(
            published.contains(&hex(&base)),
            "{step}: the base layer, imported before the cut, is gone: {published:?}"
        );
        for l in &published {
            assert_verifies(&store.join("layers").join(l).join("diff"), step);
        }
        match step {
            "completed" => assert!(
                published.contains(&hex(&top)),
                "{step}: a layer whose import returned is lost: {published:?}"
            ),
            "import.publish" => assert!(published.len() <= 2, "{published:?}"),
            _ => assert_eq!(
                published,
                vec![hex(&base)],
                "{step}: nothing half-done is published"
            ),
        }
        // And the import can simply be run again.
        let o = verlay(&[
            "layer",
            "import",
            "--store",
            s,
            "--parent",
            &base,
            top_tar.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{step}: import again: {}", text(&o));
        let top = String::from_utf8_lossy(&o.stdout).trim().to_string();
        assert_verifies(&store.join("layers").join(hex(&top)).join("diff"), step);
    }
}

// ---------------------------------------------------------------------------------------------
// a live mount

/// What a name in the merged root holds.
#[derive(Clone, Debug, PartialEq)]
enum State {
    Absent,
    File(Vec<u8>),
    /// a directory: its children's contents
    Dir(BTreeMap<String, Vec<u8>>),
    /// a symlink: target and owner
    Link(String, u32),
    /// a fifo: permission bits and owner
    Fifo(u32, u32),
}

/// Every state each name was given, in order, and the index of the last one acknowledged
/// durable (fsync of the file and of the directory returned). A state is recorded before the
/// syscalls that make it, so an operation cut half-way counts as possible.
#[derive(Default)]
struct Journal {
    hist: BTreeMap<String, Vec<State>>,
    durable: BTreeMap<String, usize>,
    /// temp names the workload made (they may survive a cut)
    temps: Vec<String>,
    ops: usize,
    /// the error that ended the workload, and whether the power was already cut then
    ended_by: Option<(String, bool)>,
}

impl Journal {
    fn attempt(&mut self, name: &str, s: State) {
        self.hist.get_mut(name).unwrap().push(s);
    }
    fn ack(&mut self, name: &str) {
        let n = self.hist[name].len() - 1;
        self.durable.insert(name.to_string(), n);
    }
    fn current(&self, name: &str) -> &State {
        self.hist[name].last().unwrap()
    }
    fn possible(&self, name: &str) -> &[State] {
        &self.hist[name][self.durable[name]..]
    }
}

const PAGE: usize = 4096;

/// One page naming its file and version: a single aligned write of it cannot be torn.
fn version(name: &str, n: usize) -> Vec<u8> {
    let tag = format!("{name} version {n}\n");
    tag.as_bytes().iter().copied().cycle().take(PAGE).collect()
}

fn lower_files() -> Vec<String> {
    (0..6).map(|i| format!("l{i}")).collect()
}

fn dir_children() -> BTreeMap<String, Vec<u8>> {
    ["a", "b"]
        .iter()
        .map(|c| (c.to_string(), version(&format!("dl/{c}"), 0)))
        .collect()
}

/// uid of the unprivileged caller, and owner of the lower symlinks and fifo: the daemon's
/// own uid (0) on any of them after a cut would mean a temp was published before its chown.
const USER: u32 = 1000;

fn make_lower(lower: &Path) {
    fs::set_permissions(lower, fs::Permissions::from_mode(0o777)).unwrap();
    for s in ["s0", "s1"] {
        std::os::unix::fs::symlink(format!("{s}-target-0"), lower.join(s)).unwrap();
        std::os::unix::fs::lchown(lower.join(s), Some(USER), Some(USER)).unwrap();
    }
    let fifo = std::ffi::CString::new(lower.join("p0").into_os_string().into_encoded_bytes()).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        fifo.as_c_str(),
        rustix::fs::FileType::Fifo,
        0o640.into(),
        0,
    )
    .unwrap();
    std::os::unix::fs::lchown(lower.join("p0"), Some(USER), Some(USER)).unwrap();
    for n in lower_files() {
        fs::write(lower.join(&n), version(&n, 0)).unwrap();
    }
    fs::write(lower.join("r0"), version("r0", 0)).unwrap();
    fs::create_dir(lower.join("dl")).unwrap();
    for (c, data) in dir_children() {
        fs::write(lower.join("dl").join(c), data).unwrap();
    }
}

fn initial_journal() -> Journal {
    let mut j = Journal::default();
    for n in lower_files() {
        let v = version(&n, 0);
        j.hist.insert(n, vec![State::File(v)]);
    }
    for n in ["n0", "n1", "n2"] {
        j.hist.insert(n.to_string(), vec![State::Absent]);
    }
    j.hist.insert("r0".into(), vec![State::File(version("r0", 0))]);
    j.hist.insert("r1".into(), vec![State::Absent]);
    j.hist.insert("dl".into(), vec![State::Dir(dir_children())]);
    j.hist.insert("dm".into(), vec![State::Absent]);
    for l in ["s0", "s1"] {
        j.hist
            .insert(l.into(), vec![State::Link(format!("{l}-target-0"), USER)]);
    }
    j.hist.insert("p0".into(), vec![State::Fifo(0o640, USER)]);
    for n in j.hist.keys().cloned().collect::<Vec<_>>() {
        j.durable.insert(n, 0);
    }
    j
}

fn fsync_dir(p: &Path) -> std::io::Result<()> {
    File::open(p)?.sync_all()
}

/// Run operations on the merged root until one fails (the power is gone) or `stop`.
fn workload(mnt: &Path, seed: u64, j: &Mutex<Journal>, stop: &AtomicBool, cut: &AtomicBool) {
    let mut rng = Rng::from_state(seed | 1);
    let mut n = 0usize;
    let files: Vec<String> = lower_files()
        .into_iter()
        .chain(["n0", "n1", "n2"].map(String::from))
        .collect();
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        if rng.below(4) == 0 {
            let r = special_op(mnt, n, &mut rng, j);
            j.lock().unwrap().ops = n;
            if let Err(e) = r {
                j.lock().unwrap().ended_by = Some((format!("op {n}: {e}"), cut.load(Ordering::SeqCst)));
                return;
            }
            continue;
        }
        let name = &files[rng.below(files.len() as u64) as usize];
        let p = mnt.join(name);
        let cur = j.lock().unwrap().current(name).clone();
        let res: std::io::Result<()> = (|| {
            match (rng.below(6), &cur) {
                // overwrite in place (a copy-up first for a lower file), fsync
                (0 | 1, State::File(_)) => {
                    let v = version(name, n);
                    j.lock().unwrap().attempt(name, State::File(v.clone()));
                    let f = OpenOptions::new().write(true).open(&p)?;
                    f.write_all_at(&v, 0)?;
                    f.sync_all()?;
                    j.lock().unwrap().ack(name);
                }
                // atomic replace: temp, fsync, rename over the name, fsync the dir
                (2 | 3, _) => {
                    let v = version(name, n);
                    let tmp = mnt.join(format!("{name}.tmp"));
                    {
                        let mut jl = j.lock().unwrap();
                        jl.temps.push(format!("{name}.tmp"));
                        jl.attempt(name, State::File(v.clone()));
                    }
                    let mut f = OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .open(&tmp)?;
                    f.write_all(&v)?;
                    f.sync_all()?;
                    fs::rename(&tmp, &p)?;
                    fsync_dir(mnt)?;
                    j.lock().unwrap().ack(name);
                }
                // unlink, fsync the dir
                (4, State::File(_)) => {
                    j.lock().unwrap().attempt(name, State::Absent);
                    fs::remove_file(&p)?;
                    fsync_dir(mnt)?;
                    j.lock().unwrap().ack(name);
                }
                // create anew, fsync the file and the dir
                (_, State::Absent) => {
                    let v = version(name, n);
                    j.lock().unwrap().attempt(name, State::File(v.clone()));
                    let mut f = OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o644)
                        .open(&p)?;
                    f.write_all(&v)?;
                    f.sync_all()?;
                    fsync_dir(mnt)?;
                    j.lock().unwrap().ack(name);
                }
                // metadata only (a copy-up of the data for a lower file): content unchanged
                (_, State::File(_)) => {
                    let mode = if rng.below(2) == 0 { 0o600 } else { 0o644 };
                    fs::set_permissions(&p, fs::Permissions::from_mode(mode))?;
                }
                (_, State::Dir(_) | State::Link(..) | State::Fifo(..)) => unreachable!(),
            }
            // now and then, move a lower file and a lower dir to their other name
            if rng.below(4) == 0 {
                for (a, b) in [("r0", "r1"), ("dl", "dm")] {
                    let mut jl = j.lock().unwrap();
                    let (from, to) = if *jl.current(a) == State::Absent {
                        (b, a)
                    } else {
                        (a, b)
                    };
                    let s = jl.current(from).clone();
                    jl.attempt(to, s);
                    jl.attempt(from, State::Absent);
                    drop(jl);
                    fs::rename(mnt.join(from), mnt.join(to))?;
                    fsync_dir(mnt)?;
                    let mut jl = j.lock().unwrap();
                    jl.ack(from);
                    jl.ack(to);
                }
            }
            Ok(())
        })();
        j.lock().unwrap().ops = n;
        if let Err(e) = res {
            j.lock().unwrap().ended_by = Some((format!("op {n} on {name}: {e}"), cut.load(Ordering::SeqCst)));
            return;
        }
    }
}

/// Symlinks and a fifo: copy-up by lchown/chmod (no data, no fd to fsync), and a symlink
/// replaced by the user (a whiteout, then a symlink built in the work dir with the user as
/// owner and renamed over it). Owner and mode changes are never acknowledged durable (no
/// syscall promises that for them), but the objects must never be torn: a symlink with the
/// daemon's uid or a lost target would be.
fn special_op(mnt: &Path, n: usize, rng: &mut Rng, j: &Mutex<Journal>) -> std::io::Result<()> {
    let which = rng.below(3);
    if which == 2 {
        let mode = if rng.below(2) == 0 { 0o600 } else { 0o640 };
        j.lock().unwrap().attempt("p0", State::Fifo(mode, USER));
        return fs::set_permissions(mnt.join("p0"), fs::Permissions::from_mode(mode));
    }
    let name = if which == 0 { "s0" } else { "s1" };
    let p = mnt.join(name);
    let cur = j.lock().unwrap().current(name).clone();
    match cur {
        State::Link(t, _) if rng.below(2) == 0 => {
            let uid = USER + 1 + rng.below(2) as u32;
            j.lock().unwrap().attempt(name, State::Link(t, uid));
            std::os::unix::fs::lchown(&p, Some(uid), None)
        }
        State::Link(..) => {
            j.lock().unwrap().attempt(name, State::Absent);
            fs::remove_file(&p)?;
            fsync_dir(mnt)?;
            j.lock().unwrap().ack(name);
            Ok(())
        }
        _ => {
            let t = format!("{name}-target-{n}");
            j.lock().unwrap().attempt(name, State::Link(t.clone(), USER));
            as_user(USER, || std::os::unix::fs::symlink(&t, &p))?;
            fsync_dir(mnt)?;
            j.lock().unwrap().ack(name);
            Ok(())
        }
    }
}

/// What `name` holds in the merged view now.
fn state_of(mnt: &Path, name: &str) -> State {
    let p = mnt.join(name);
    match fs::symlink_metadata(&p) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::Absent,
        Err(e) => panic!("stat {}: {e}", p.display()),
        Ok(m) if m.is_dir() => State::Dir(
            dir_names(&p)
                .into_iter()
                .map(|c| {
                    let data = fs::read(p.join(&c)).unwrap_or_else(|e| panic!("read {name}/{c}: {e}"));
                    (c, data)
                })
                .collect(),
        ),
        Ok(m) if m.file_type().is_symlink() => State::Link(
            fs::read_link(&p).unwrap().to_string_lossy().into_owned(),
            std::os::unix::fs::MetadataExt::uid(&m),
        ),
        Ok(m) if std::os::unix::fs::FileTypeExt::is_fifo(&m.file_type()) => State::Fifo(
            std::os::unix::fs::MetadataExt::mode(&m) & 0o7777,
            std::os::unix::fs::MetadataExt::uid(&m),
        ),
        Ok(_) => State::File(fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))),
    }
}

fn describe(s: &State) -> String {
    match s {
        State::Absent => "absent".into(),
        State::File(d) => format!("file {:?}", String::from_utf8_lossy(&d[..d.len().min(24)])),
        State::Dir(c) => format!("dir {:?}", c.keys().collect::<Vec<_>>()),
        State::Link(t, uid) => format!("symlink -> {t} uid {uid}"),
        State::Fifo(mode, uid) => format!("fifo {mode:o} uid {uid}"),
    }
}

fn lower_snapshot(lower: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v = Vec::new();
    for n in dir_names(lower) {
        let p = lower.join(&n);
        let m = fs::symlink_metadata(&p).unwrap();
        if !m.is_dir() && !m.is_file() {
            let ft = format!(
                "{:?} {:o}",
                m.file_type(),
                std::os::unix::fs::MetadataExt::mode(&m)
            );
            v.push((n.clone(), ft.into_bytes()));
        } else if m.is_dir() {
            for c in dir_names(&p) {
                v.push((format!("{n}/{c}"), fs::read(p.join(&c)).unwrap()));
            }
        } else {
            v.push((n.clone(), fs::read(&p).unwrap()));
        }
    }
    v
}

#[test]
fn power_cut_under_a_live_mount_keeps_what_was_fsynced_and_tears_nothing() {
    require_tools!("mkfs.xfs", "xfs_io", "losetup", "fusermount3");
    let rounds: u64 = std::env::var("VERLAY_POWERCUT_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    let seed0: u64 = std::env::var("VERLAY_POWERCUT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let t = scratch("verlay-powercut.");
    let d = t.path();
    let lower = d.join("lower");
    fs::create_dir(&lower).unwrap();
    make_lower(&lower);
    let before = lower_snapshot(&lower);
    let mnt = d.join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mut disk = Disk::new(&d.join("xfs.img"), &d.join("fs"));
    let mut total_ops = 0;
    for round in 0..rounds {
        let seed = seed0 + round;
        let (upper, work) = (
            disk.at.join(format!("upper{seed}")),
            disk.at.join(format!("work{seed}")),
        );
        fs::create_dir(&upper).unwrap();
        fs::create_dir(&work).unwrap();
        // the merged root takes the upper root's mode: let the user create in it
        fs::set_permissions(&upper, fs::Permissions::from_mode(0o777)).unwrap();
        // The new dirs must survive the cut themselves.
        run("sync", &["-f", disk.at.to_str().unwrap()]);
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}{}",
            lower.display(),
            upper.display(),
            work.display(),
            std::env::var("VERLAY_POWERCUT_EXTRA_OPTS").unwrap_or_default()
        );
        let log = d.join(format!("verlay{seed}.log"));
        let mut v = Launch::verlay(&opts, &mnt).log(&log).start();
        let journal = Arc::new(Mutex::new(initial_journal()));
        let stop = Arc::new(AtomicBool::new(false));
        let cut = Arc::new(AtomicBool::new(false));
        let worker = {
            let (mnt, j, stop, cut) = (mnt.clone(), journal.clone(), stop.clone(), cut.clone());
            std::thread::spawn(move || workload(&mnt, seed, &j, &stop, &cut))
        };
        let mut rng = Rng::from_state(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        std::thread::sleep(Duration::from_millis(50 + rng.below(500)));
        cut.store(true, Ordering::SeqCst);
        disk.cut();
        let start = Instant::now();
        while !worker.is_finished() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "seed {seed}: the workload hangs after the cut"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        stop.store(true, Ordering::Relaxed);
        worker.join().unwrap();
        v.stop(Stop::Sigkill);
        drop(v);
        disk.reboot();

        let v = Launch::verlay(&opts, &mnt).log(&log).start();
        let j = journal.lock().unwrap();
        total_ops += j.ops;
        if let Some((e, false)) = &j.ended_by {
            panic!("seed {seed}: the workload failed before the power cut: {e}");
        }
        let mut bad = Vec::new();
        for name in j.hist.keys() {
            let got = state_of(&mnt, name);
            if !j.possible(name).contains(&got) {
                bad.push(format!(
                    "{name}: {} is not one of {:?}",
                    describe(&got),
                    j.possible(name).iter().map(describe).collect::<Vec<_>>()
                ));
            }
        }
        for (a, b) in [("r0", "r1"), ("dl", "dm")] {
            let present = [a, b]
                .iter()
                .filter(|n| state_of(&mnt, n) != State::Absent)
                .count();
            if present != 1 {
                bad.push(format!("{a}/{b}: the renamed object is present {present} times"));
            }
        }
        for n in dir_names(&mnt) {
            if !j.hist.contains_key(&n) && !j.temps.contains(&n) {
                bad.push(format!("{n}: a name the workload never made is visible"));
            }
        }
        let leftovers = dir_names(&work.join("work"));
        if !leftovers.is_empty() {
            bad.push(format!("work dir not cleared at mount: {leftovers:?}"));
        }
        assert!(
            bad.is_empty(),
            "seed {seed} (replay: VERLAY_POWERCUT_SEED={seed} VERLAY_POWERCUT_ROUNDS=1), {} ops before the cut:\n{}\nlog: {}",
            j.ops,
            bad.join("\n"),
            fs::read_to_string(&log).unwrap_or_default()
        );
        drop(j);
        drop(v);
    }
    assert_eq!(lower_snapshot(&lower), before, "the lower layer changed");
    eprintln!("{rounds} power cuts, {total_ops} operations before them: every state allowed");
}
