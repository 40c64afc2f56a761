//! Mount configuration: the parsed command line checked against the filesystem, before
//! anything is mounted or written.
//!
//! This module owns the rules about where layers may be: each layer and the mountpoint
//! exists and is a directory, upperdir and workdir share a filesystem and do not nest,
//! no layer hides under the mountpoint, and the workdir holds nothing but overlayfs's own
//! entries. Every violation is an [`Error::usage`] naming the path as the user gave it.
//!
//! It must not change anything on disk (no mkdir, no cleanup of the workdir, no locks):
//! a rejected command line leaves the system as it found it. Probing the upper for
//! xattr and d_type support and taking the "already in use" lock happen elsewhere, when
//! the upper is opened for writing.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::cli::MountArgs;
use crate::error::Error;

/// Entries allowed in a workdir at mount time: the ones kernel overlayfs creates there
/// itself (`work` for copy-up staging, `index` for hardlink/NFS indexes, `incompat` for
/// volatile markers). A workdir that was used by kernel overlayfs or fuse-overlayfs
/// (which also stages in `work/`) is accepted; anything else may be someone's data.
pub const WORKDIR_OWN_ENTRIES: &[&str] = &["work", "index", "incompat"];

/// How many foreign workdir entries an error message names before summarising.
const FOREIGN_ENTRIES_SHOWN: usize = 5;

/// The directories of a mount, checked and canonical (absolute, symlinks resolved).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layers {
    /// Lower layers, top first.
    pub lowers: Vec<PathBuf>,
    /// The upper layer and its workdir; `None` for a read-only mount.
    pub upper: Option<UpperWork>,
    /// Where the merged view is mounted.
    pub mountpoint: PathBuf,
}

/// An upperdir with its workdir: one is never given without the other, on one filesystem,
/// neither inside the other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpperWork {
    /// upperdir
    pub upper: PathBuf,
    /// workdir
    pub work: PathBuf,
}

impl Layers {
    /// True without an upper layer: nothing can be written.
    pub fn is_read_only(&self) -> bool {
        self.upper.is_none()
    }
}

/// Check `args` against the filesystem and resolve every directory. Reads only.
pub fn validate(args: &MountArgs) -> Result<Layers, Error> {
    let opts = &args.opts;

    let total = opts.lowerdirs.len();
    let mut lowers = Vec::with_capacity(total);
    for (i, given) in opts.lowerdirs.iter().enumerate() {
        let what = format!(
            "lowerdir \"{}\" (layer {} of {total}, top first)",
            given.display(),
            i + 1
        );
        let dir = existing_dir(given, &what, "create it or fix the -o lowerdir= list")?;
        lowers.push((what, dir));
    }

    // cli::parse refuses one without the other; a hand-built MountArgs might not.
    let pair = crate::cli::upper_work_pair(opts.upperdir.as_deref(), opts.workdir.as_deref())?;
    let upper_work = match pair {
        Some((upper, work)) => {
            let upper_what = format!("upperdir \"{}\"", upper.display());
            let work_what = format!("workdir \"{}\"", work.display());
            let upper_dir = existing_dir(upper, &upper_what, "create it or fix -o upperdir=")?;
            let work_dir = existing_dir(
                work,
                &work_what,
                "create it on the upperdir's filesystem or fix -o workdir=",
            )?;
            Some(((upper_what, upper_dir), (work_what, work_dir)))
        }
        None => None,
    };

    let mount_what = format!("mountpoint \"{}\"", args.mountpoint.display());
    let mountpoint = existing_dir(
        &args.mountpoint,
        &mount_what,
        "create the directory or mount somewhere else",
    )?;

    if let Some(((upper_what, upper), (work_what, work))) = &upper_work {
        check_upper_and_work(upper_what, upper, work_what, work)?;
        for (lower_what, lower) in &lowers {
            check_lower_outside(lower_what, lower, "upperdir", upper)?;
            check_lower_outside(lower_what, lower, "workdir", work)?;
        }
    }

    // A lower may be the mountpoint itself (`lowerdir=/etc ... /etc`, as kernel overlayfs
    // allows): verlay opens every layer before mounting and never walks a path through the
    // mountpoint. The upper and work dirs may not: their contents would vanish from view.
    let writable_layers = upper_work.iter().flat_map(|(upper, work)| [upper, work]);
    for (what, dir) in writable_layers {
        if dir.path.starts_with(&mountpoint.path) {
            return Err(Error::usage(
                what.as_str(),
                format!(
                    "is the mountpoint \"{}\" or inside it; the mount would hide it and \
                     verlay would read its own merged view",
                    mountpoint.path.display()
                ),
                "mount somewhere else, or move the layer out of the mountpoint",
            ));
        }
    }

    if let Some((_, (work_what, work))) = &upper_work {
        check_workdir_entries(work_what, &work.path)?;
    }

    Ok(Layers {
        lowers: lowers.into_iter().map(|(_, dir)| dir.path).collect(),
        upper: upper_work.map(|((_, upper), (_, work))| UpperWork {
            upper: upper.path,
            work: work.path,
        }),
        mountpoint: mountpoint.path,
    })
}

/// A directory that exists: its canonical path and the filesystem it is on.
struct Dir {
    path: PathBuf,
    dev: u64,
}

/// Resolve `given` and check it is a directory. `what` names it in errors; `fix` is the
/// advice for a missing path or a non-directory.
fn existing_dir(given: &Path, what: &str, fix: &str) -> Result<Dir, Error> {
    let resolve_error = |e: io::Error| {
        let (why, fix) = explain_io(&e, fix);
        Error::usage(what, why, fix)
    };
    let path = fs::canonicalize(given).map_err(resolve_error)?;
    let meta = fs::metadata(&path).map_err(resolve_error)?;
    if !meta.is_dir() {
        return Err(Error::usage(what, "not a directory", fix));
    }
    Ok(Dir {
        path,
        dev: meta.dev(),
    })
}

/// A reason and an action for an OS error met while resolving a configured path.
fn explain_io(e: &io::Error, fix: &str) -> (String, String) {
    match e.kind() {
        io::ErrorKind::NotFound => ("does not exist".into(), fix.into()),
        io::ErrorKind::NotADirectory => ("a component of the path is not a directory".into(), fix.into()),
        io::ErrorKind::PermissionDenied => (
            "permission denied while resolving it".into(),
            "check the permissions of the path and its parents".into(),
        ),
        // ENOTCONN: a FUSE daemon died and left its mount behind, typically a previous
        // verlay or fuse-overlayfs on this very path.
        io::ErrorKind::NotConnected => (
            "is (or is under) a dead FUSE mount: transport endpoint is not connected".into(),
            "unmount it first with fusermount3 -u PATH".into(),
        ),
        _ => (format!("cannot be resolved: {e}"), fix.into()),
    }
}

/// Kernel overlayfs's rules for upperdir and workdir: one filesystem, separate subtrees.
fn check_upper_and_work(upper_what: &str, upper: &Dir, work_what: &str, work: &Dir) -> Result<(), Error> {
    // Copy-up stages files in the workdir and renames them into the upper; rename(2)
    // cannot cross filesystems, so the kernel refuses this pairing too.
    if upper.dev != work.dev {
        return Err(Error::usage(
            work_what,
            format!(
                "is on a different filesystem than upperdir \"{}\"; copy-up renames files \
                 from workdir into upperdir, which cannot cross filesystems",
                upper.path.display()
            ),
            "put workdir on the upperdir's filesystem, e.g. next to it",
        ));
    }
    if work.path == upper.path {
        return Err(Error::usage(
            work_what,
            "is the upperdir itself; its scratch files would appear in the merged view",
            "pass a separate, empty directory next to upperdir",
        ));
    }
    if work.path.starts_with(&upper.path) {
        return Err(Error::usage(
            work_what,
            format!(
                "is inside upperdir \"{}\"; its scratch files would appear in the merged view",
                upper.path.display()
            ),
            "move workdir out of upperdir, e.g. next to it",
        ));
    }
    if upper.path.starts_with(&work.path) {
        return Err(Error::usage(
            upper_what,
            format!(
                "is inside workdir \"{}\", which holds only scratch files",
                work.path.display()
            ),
            "use two separate directories, e.g. siblings",
        ));
    }
    Ok(())
}

/// A lower layer must not be, or lie inside, the upper or the workdir: writes through
/// the merged view would then change a layer that is supposed to be read-only. (The
/// reverse, an upper inside a lower, is allowed, as kernel overlayfs allows it.)
fn check_lower_outside(lower_what: &str, lower: &Dir, name: &str, dir: &Dir) -> Result<(), Error> {
    if lower.path.starts_with(&dir.path) {
        return Err(Error::usage(
            lower_what,
            format!(
                "is the {name} \"{}\" or inside it; writes would change this read-only layer",
                dir.path.display()
            ),
            format!("move the layer out of the {name}"),
        ));
    }
    Ok(())
}

/// The workdir may hold only [`WORKDIR_OWN_ENTRIES`]: verlay reuses and cleans what is
/// there, and must never clean up files someone else put in a directory given by mistake.
fn check_workdir_entries(work_what: &str, work: &Path) -> Result<(), Error> {
    let list_error = |e: io::Error| {
        Error::usage(
            work_what,
            format!("cannot be listed: {e}"),
            "check its permissions or pass another workdir",
        )
    };
    let mut foreign = Vec::new();
    for entry in fs::read_dir(work).map_err(list_error)? {
        let name = entry.map_err(list_error)?.file_name();
        let own = name.to_str().is_some_and(|n| WORKDIR_OWN_ENTRIES.contains(&n));
        if !own {
            foreign.push(name.to_string_lossy().into_owned());
        }
    }
    if foreign.is_empty() {
        return Ok(());
    }
    // Sorted so the message is the same on every run, whatever readdir's order.
    foreign.sort();
    let mut shown: Vec<String> = foreign
        .iter()
        .take(FOREIGN_ENTRIES_SHOWN)
        .map(|n| format!("{n:?}"))
        .collect();
    if foreign.len() > FOREIGN_ENTRIES_SHOWN {
        shown.push(format!("and {} more", foreign.len() - FOREIGN_ENTRIES_SHOWN));
    }
    Err(Error::usage(
        work_what,
        format!(
            "holds files that are not overlayfs's own: {} (only {} may be there)",
            shown.join(", "),
            WORKDIR_OWN_ENTRIES.join(", ")
        ),
        "empty it or pass another workdir",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::OverlayOptions;
    use std::os::unix::fs::symlink;
    use tempfile::TempDir;

    /// A scratch tree: `l1 l2 l3 u w m` directories under one temp dir.
    struct Tree {
        tmp: TempDir,
    }

    impl Tree {
        fn new() -> Tree {
            let tmp = tempfile::tempdir().expect("create temp dir");
            for d in ["l1", "l2", "l3", "u", "w", "m"] {
                fs::create_dir(tmp.path().join(d)).expect("create layer dir");
            }
            Tree { tmp }
        }

        fn p(&self, rel: &str) -> PathBuf {
            self.tmp.path().join(rel)
        }

        /// Canonical form of a path under the tree (the temp dir may sit behind a symlink).
        fn c(&self, rel: &str) -> PathBuf {
            fs::canonicalize(self.p(rel)).expect("canonicalize")
        }

        fn args(&self, lowers: &[&str], upper_work: Option<(&str, &str)>, mountpoint: &str) -> MountArgs {
            MountArgs {
                foreground: false,
                debug: false,
                source: None,
                mountpoint: self.p(mountpoint),
                opts: OverlayOptions {
                    lowerdirs: lowers.iter().map(|l| self.p(l)).collect(),
                    upperdir: upper_work.map(|(u, _)| self.p(u)),
                    workdir: upper_work.map(|(_, w)| self.p(w)),
                    ..OverlayOptions::default()
                },
            }
        }

        /// Every path under the tree with its type, to prove validate changed nothing.
        fn snapshot(&self) -> Vec<(PathBuf, bool)> {
            fn walk(dir: &Path, out: &mut Vec<(PathBuf, bool)>) {
                let mut entries: Vec<_> = fs::read_dir(dir)
                    .expect("read_dir")
                    .map(|e| e.expect("dir entry").path())
                    .collect();
                entries.sort();
                for path in entries {
                    let is_dir = fs::symlink_metadata(&path).expect("lstat").is_dir();
                    out.push((path.clone(), is_dir));
                    if is_dir {
                        walk(&path, out);
                    }
                }
            }
            let mut out = Vec::new();
            walk(self.tmp.path(), &mut out);
            out
        }
    }

    fn usage(result: Result<Layers, Error>) -> (String, String, String) {
        match result {
            Err(Error::Usage { what, why, fix }) => (what, why, fix),
            other => panic!("expected a usage error, got {other:?}"),
        }
    }

    #[test]
    fn valid_rw_mount_resolves_canonical_paths() {
        let t = Tree::new();
        let args = t.args(&["l1", "l2"], Some(("u", "w")), "m");
        let layers = validate(&args).expect("valid config");
        assert_eq!(
            layers,
            Layers {
                lowers: vec![t.c("l1"), t.c("l2")],
                upper: Some(UpperWork {
                    upper: t.c("u"),
                    work: t.c("w"),
                }),
                mountpoint: t.c("m"),
            }
        );
        assert!(!layers.is_read_only());
        assert!(layers.lowers.iter().all(|p| p.is_absolute()));
    }

    #[test]
    fn no_upper_is_read_only() {
        let t = Tree::new();
        let layers = validate(&t.args(&["l1"], None, "m")).expect("valid config");
        assert_eq!(layers.upper, None);
        assert!(layers.is_read_only());
    }

    #[test]
    fn podman_style_symlinked_lowers_resolve_to_targets() {
        // podman passes lowerdir=l/SHORTID, where l/SHORTID -> ../<id>/diff.
        let t = Tree::new();
        fs::create_dir_all(t.p("overlay/abc/diff")).expect("mkdir");
        fs::create_dir(t.p("overlay/l")).expect("mkdir");
        symlink("../abc/diff", t.p("overlay/l/SHORT")).expect("symlink");
        let args = t.args(&["overlay/l/SHORT"], None, "m");
        let layers = validate(&args).expect("valid config");
        assert_eq!(layers.lowers, vec![t.c("overlay/abc/diff")]);
    }

    #[test]
    fn bad_lowers_are_named_by_given_path_and_position() {
        let t = Tree::new();
        fs::write(t.p("file"), "x").expect("write");
        symlink("nowhere", t.p("dangling")).expect("symlink");
        let cases: &[(&[&str], usize, &str, &str)] = &[
            (&["l1", "missing", "l3"], 2, "missing", "does not exist"),
            (&["missing"], 1, "missing", "does not exist"),
            (&["l1", "l2", "file"], 3, "file", "not a directory"),
            (&["dangling", "l1"], 1, "dangling", "does not exist"),
            (
                &["l1", "file/sub"],
                2,
                "file/sub",
                "a component of the path is not a directory",
            ),
        ];
        for &(lowers, pos, bad, why) in cases {
            let args = t.args(lowers, Some(("u", "w")), "m");
            let (got_what, got_why, fix) = usage(validate(&args));
            let what = format!(
                "lowerdir \"{}\" (layer {pos} of {}, top first)",
                t.p(bad).display(),
                lowers.len()
            );
            assert_eq!((got_what, got_why.as_str()), (what, why), "{lowers:?}");
            assert_eq!(fix, "create it or fix the -o lowerdir= list");
        }
    }

    #[test]
    fn bad_upper_work_and_mountpoint_are_errors() {
        let t = Tree::new();
        fs::write(t.p("file"), "x").expect("write");
        type UpperWork<'a> = Option<(&'a str, &'a str)>;
        let cases: &[(UpperWork, &str, &str, &str)] = &[
            (Some(("nope", "w")), "m", "upperdir \"{nope}\"", "does not exist"),
            (Some(("file", "w")), "m", "upperdir \"{file}\"", "not a directory"),
            (Some(("u", "nope")), "m", "workdir \"{nope}\"", "does not exist"),
            (Some(("u", "file")), "m", "workdir \"{file}\"", "not a directory"),
            (None, "nope", "mountpoint \"{nope}\"", "does not exist"),
            (None, "file", "mountpoint \"{file}\"", "not a directory"),
        ];
        for &(upper_work, mountpoint, what, why) in cases {
            let args = t.args(&["l1"], upper_work, mountpoint);
            let (got_what, got_why, fix) = usage(validate(&args));
            let what = what
                .replace("{nope}", &t.p("nope").display().to_string())
                .replace("{file}", &t.p("file").display().to_string());
            assert_eq!(
                (got_what, got_why.as_str()),
                (what, why),
                "{upper_work:?} {mountpoint}"
            );
            assert!(!fix.is_empty());
        }
    }

    #[test]
    fn upper_and_work_must_not_nest() {
        let t = Tree::new();
        fs::create_dir(t.p("u/inner")).expect("mkdir");
        fs::create_dir(t.p("w/inner")).expect("mkdir");
        let cases: &[((&str, &str), &str, &str)] = &[
            (
                ("u", "u"),
                "workdir \"{u}\"",
                "is the upperdir itself; its scratch files would appear in the merged view",
            ),
            (
                ("u", "u/inner"),
                "workdir \"{u/inner}\"",
                "is inside upperdir \"{cu}\"; its scratch files would appear in the merged view",
            ),
            (
                ("w/inner", "w"),
                "upperdir \"{w/inner}\"",
                "is inside workdir \"{cw}\", which holds only scratch files",
            ),
        ];
        for &(upper_work, what, why) in cases {
            let sub = |s: &str| {
                s.replace("{u}", &t.p("u").display().to_string())
                    .replace("{u/inner}", &t.p("u/inner").display().to_string())
                    .replace("{w/inner}", &t.p("w/inner").display().to_string())
                    .replace("{cu}", &t.c("u").display().to_string())
                    .replace("{cw}", &t.c("w").display().to_string())
            };
            let (got_what, got_why, _) = usage(validate(&t.args(&["l1"], Some(upper_work), "m")));
            assert_eq!((got_what, got_why), (sub(what), sub(why)), "{upper_work:?}");
        }
    }

    #[test]
    fn lower_inside_upper_or_work_is_refused_upper_inside_lower_is_not() {
        let t = Tree::new();
        fs::create_dir(t.p("u/lower")).expect("mkdir");
        for (lowers, name) in [(["u/lower"], "upperdir"), (["u"], "upperdir"), (["w"], "workdir")] {
            let (what, why, _) = usage(validate(&t.args(&lowers, Some(("u", "w")), "m")));
            assert!(what.starts_with("lowerdir \""), "{lowers:?}: {what}");
            assert!(why.starts_with(&format!("is the {name} ")), "{lowers:?}: {why}");
        }
        // Kernel overlayfs allows upper and work inside a lower (e.g. lowerdir=/).
        fs::create_dir_all(t.p("l1/up")).expect("mkdir");
        fs::create_dir_all(t.p("l1/wk")).expect("mkdir");
        let layers = validate(&t.args(&["l1"], Some(("l1/up", "l1/wk")), "m")).expect("allowed");
        assert_eq!(layers.upper.map(|uw| uw.upper), Some(t.c("l1/up")));
    }

    #[test]
    fn no_upper_or_work_is_the_mountpoint_or_beneath_it() {
        let t = Tree::new();
        for d in ["m/low", "m/up", "m/wk"] {
            fs::create_dir(t.p(d)).expect("mkdir");
        }
        let cases: &[(&[&str], (&str, &str), &str)] = &[
            (&["l1"], ("m/up", "w"), "upperdir \"{m/up}\""),
            (&["l1"], ("m/up", "m/wk"), "upperdir \"{m/up}\""),
            (&["l1"], ("u", "m"), "workdir \"{m}\""),
        ];
        for &(lowers, upper_work, what) in cases {
            // upper and work on one fs inside the mountpoint: only the mountpoint rule fires.
            let (got_what, why, fix) = usage(validate(&t.args(lowers, Some(upper_work), "m")));
            let what = what
                .replace("{m}", &t.p("m").display().to_string())
                .replace("{m/up}", &t.p("m/up").display().to_string());
            assert_eq!(got_what, what, "{lowers:?} {upper_work:?}");
            assert!(
                why.starts_with(&format!(
                    "is the mountpoint \"{}\" or inside it",
                    t.c("m").display()
                )),
                "{why}"
            );
            assert_eq!(
                fix,
                "mount somewhere else, or move the layer out of the mountpoint"
            );
        }
    }

    #[test]
    fn a_lower_may_be_the_mountpoint_or_beneath_it() {
        // Kernel overlayfs allows `lowerdir=/etc,... /etc`; verlay opens layers before
        // mounting, so it can too.
        let t = Tree::new();
        fs::create_dir(t.p("m/low")).expect("mkdir");
        for lowers in [&["m"][..], &["l1", "m/low"][..]] {
            validate(&t.args(lowers, Some(("u", "w")), "m")).expect("lower at the mountpoint");
        }
        symlink("m", t.p("m-link")).expect("symlink");
        validate(&t.args(&["m/low"], None, "m-link")).expect("through a symlink too");
    }

    #[test]
    fn workdir_may_hold_only_overlayfs_entries() {
        let t = Tree::new();
        for own in WORKDIR_OWN_ENTRIES {
            fs::create_dir(t.p("w").join(own)).expect("mkdir");
        }
        fs::write(t.p("w/work/leftover"), "x").expect("write");
        validate(&t.args(&["l1"], Some(("u", "w")), "m")).expect("own entries are fine");

        fs::write(t.p("w/notes.txt"), "x").expect("write");
        fs::create_dir(t.p("w/data")).expect("mkdir");
        let (what, why, fix) = usage(validate(&t.args(&["l1"], Some(("u", "w")), "m")));
        assert_eq!(what, format!("workdir \"{}\"", t.p("w").display()));
        assert_eq!(
            why,
            "holds files that are not overlayfs's own: \"data\", \"notes.txt\" \
             (only work, index, incompat may be there)"
        );
        assert_eq!(fix, "empty it or pass another workdir");
    }

    #[test]
    fn many_foreign_workdir_entries_are_summarised() {
        let t = Tree::new();
        for i in 0..8 {
            fs::write(t.p(&format!("w/f{i}")), "x").expect("write");
        }
        let (_, why, _) = usage(validate(&t.args(&["l1"], Some(("u", "w")), "m")));
        assert_eq!(
            why,
            "holds files that are not overlayfs's own: \"f0\", \"f1\", \"f2\", \"f3\", \"f4\", \
             and 3 more (only work, index, incompat may be there)"
        );
    }

    #[test]
    fn upper_and_work_on_different_filesystems_are_refused() {
        let t = Tree::new();
        // /dev/shm is a tmpfs on most Linux systems; without one this check cannot be
        // exercised here, and saying so beats a test that passes vacuously.
        let Ok(shm) = tempfile::tempdir_in("/dev/shm") else {
            eprintln!("skipped: no /dev/shm to put a workdir on another filesystem");
            return;
        };
        let shm_dev = fs::metadata(shm.path()).expect("stat").dev();
        if shm_dev == fs::metadata(t.p("u")).expect("stat").dev() {
            eprintln!("skipped: /dev/shm is on the temp dir's filesystem");
            return;
        }
        let mut args = t.args(&["l1"], Some(("u", "w")), "m");
        args.opts.workdir = Some(shm.path().to_path_buf());
        let (what, why, fix) = usage(validate(&args));
        assert_eq!(what, format!("workdir \"{}\"", shm.path().display()));
        assert!(
            why.starts_with(&format!(
                "is on a different filesystem than upperdir \"{}\"",
                t.c("u").display()
            )),
            "{why}"
        );
        assert_eq!(fix, "put workdir on the upperdir's filesystem, e.g. next to it");
    }

    #[test]
    fn upper_without_work_is_refused_even_when_built_by_hand() {
        let t = Tree::new();
        let mut args = t.args(&["l1"], Some(("u", "w")), "m");
        args.opts.workdir = None;
        let (_, why, _) = usage(validate(&args));
        assert_eq!(why, "given without workdir");
        args.opts.workdir = Some(t.p("w"));
        args.opts.upperdir = None;
        let (_, why, _) = usage(validate(&args));
        assert_eq!(why, "given without upperdir");
    }

    #[test]
    fn validate_changes_nothing_on_disk() {
        let t = Tree::new();
        fs::write(t.p("w/junk"), "x").expect("write");
        let before = t.snapshot();
        let cases = [
            t.args(&["l1", "l2"], Some(("u", "w")), "m"), // foreign workdir entry
            t.args(&["l1", "nope"], Some(("u", "new-w")), "m"), // missing lower
            t.args(&["l1"], Some(("u", "new-w")), "m"),   // missing workdir
            t.args(&["l1"], Some(("new-u", "w")), "new-m"), // missing upper
            t.args(&["l1"], None, "new-m"),               // missing mountpoint
            t.args(&["l1"], None, "m"),                   // valid
        ];
        for args in &cases {
            let _ = validate(args);
            assert_eq!(t.snapshot(), before, "{args:?}");
        }
    }

    #[test]
    fn usage_errors_display_what_why_fix() {
        let t = Tree::new();
        let err = validate(&t.args(&["nope"], None, "m")).expect_err("missing lower");
        assert_eq!(
            err.to_string(),
            format!(
                "lowerdir \"{}\" (layer 1 of 1, top first): does not exist \
                 (create it or fix the -o lowerdir= list)",
                t.p("nope").display()
            )
        );
    }
}
