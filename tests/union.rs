//! The union core reproduces kernel overlayfs semantics without a FUSE mount: lookup and readdir
//! over upper and lowers with whiteouts (char 0/0 and OCI `.wh.NAME`), opaque dirs (xattr and
//! `.wh..wh..opq`) and redirects; copy-up (data, holes, mode, owner, ns times, xattrs, parents
//! first, lower never touched, work dir left empty); the whiteouts and opaque dirs left by
//! unlink/rmdir/mkdir; rename (redirects, NOREPLACE, EXCHANGE, errnos); st_ino stability; open
//! handles across copy-up and unlink; escaping of the overlay's own xattrs; EROFS without an
//! upper. Every case checks the union's answers, the upper on disk in kernel format, and the
//! merged view of a fresh union over the same directories (what a remount would show).

#[macro_use]
mod common;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use common::expand_path as expand;
use rustix::fs::{FileType, Timespec};
use tempfile::TempDir;
use verlay::layer::{Kind, LayerDir};
use verlay::union::inode::ROOT_ID;
use verlay::union::{Attr, Ctx, SetAttr, Union, UnionOptions};
use verlay::upper::Upper;

const ROOT: Ctx = Ctx {
    uid: 0,
    gid: 0,
    pid: 1,
    umask: 0,
};
/// renameat2 flags (linux/fs.h).
const RENAME_NOREPLACE: u32 = 1;
const RENAME_EXCHANGE: u32 = 2;

// ------------------------------------------------------------------------------------------
// layers from the compact spec of tests/common (`common::parse_layer`, `t path SEC.NSEC`
// for times), OCI whiteouts and opaque markers (`W`, `O`) in OCI form

fn build(dir: &Path, spec: &str) {
    std::fs::create_dir_all(dir).expect("mkdir layer");
    common::materialize(&common::parse_layer(spec), dir, common::Format::Mixed, 0);
}

fn ts(s: &str) -> Timespec {
    let (sec, nsec) = s.split_once('.').unwrap_or((s, "0"));
    Timespec {
        tv_sec: sec.parse().expect("seconds"),
        tv_nsec: format!("{nsec:0<9}").parse().expect("nanoseconds"),
    }
}

fn get_xattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    let n = rustix::fs::lgetxattr_query(p, name).ok()?;
    let mut buf = vec![0u8; n];
    let n = rustix::fs::lgetxattr(p, name, &mut buf[..]).ok()?;
    buf.truncate(n);
    Some(buf)
}

fn xattr_names(p: &Path) -> Vec<String> {
    let n = rustix::fs::llistxattr_query(p).expect("listxattr");
    let mut buf = vec![0u8; n];
    let n = rustix::fs::llistxattr(p, &mut buf[..]).expect("listxattr");
    let mut v: Vec<String> = buf[..n]
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    v.sort();
    v
}

/// `user.*` xattrs as `k=v`, sorted.
fn user_xattrs(p: &Path) -> Vec<String> {
    xattr_names(p)
        .into_iter()
        .filter(|n| n.starts_with("user."))
        .map(|n| {
            let v = get_xattr(p, &n).unwrap_or_default();
            format!("{n}={}", String::from_utf8_lossy(&v))
        })
        .collect()
}

// ------------------------------------------------------------------------------------------
// on-disk views

/// Pre-order relative paths under `dir`, sorted per directory.
fn walk(dir: &Path, rel: &str, out: &mut Vec<String>) {
    let mut names: Vec<String> = std::fs::read_dir(dir.join(rel))
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for n in names {
        let r = if rel.is_empty() { n } else { format!("{rel}/{n}") };
        out.push(r.clone());
        if std::fs::symlink_metadata(dir.join(&r)).expect("lstat").is_dir() {
            walk(dir, &r, out);
        }
    }
}

/// Everything about a layer that a change to it would alter (ctime included, atime not).
fn fingerprint(dir: &Path) -> Vec<String> {
    let mut paths = vec![String::new()];
    walk(dir, "", &mut paths);
    paths
        .into_iter()
        .map(|rel| {
            let p = dir.join(&rel);
            let m = std::fs::symlink_metadata(&p).expect("lstat");
            let data = if m.is_file() {
                let d = std::fs::read(&p).expect("read");
                d.iter()
                    .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
            } else {
                0
            };
            let xattrs: Vec<String> = xattr_names(&p)
                .into_iter()
                .map(|n| format!("{n}={:?}", get_xattr(&p, &n)))
                .collect();
            format!(
                "{rel:?} mode={:o} {}:{} size={} blocks={} mtime={}.{} ctime={}.{} ino={} nlink={} rdev={} data={data:x} {xattrs:?}",
                m.mode(),
                m.uid(),
                m.gid(),
                m.size(),
                m.blocks(),
                m.mtime(),
                m.mtime_nsec(),
                m.ctime(),
                m.ctime_nsec(),
                m.ino(),
                m.nlink(),
                m.rdev()
            )
        })
        .collect()
}

/// The upper as tokens: `f=data`, `d/`, `d/(opaque)`, `d/(redirect=V)`, `w(wh)`, `l->t`,
/// `p(fifo)`, `c(chr)`.
fn disk_tree(dir: &Path) -> Vec<String> {
    let mut paths = Vec::new();
    walk(dir, "", &mut paths);
    paths
        .into_iter()
        .map(|rel| {
            let p = dir.join(&rel);
            let m = std::fs::symlink_metadata(&p).expect("lstat");
            let ft = m.file_type();
            use std::os::unix::fs::FileTypeExt;
            if ft.is_dir() {
                let mut s = format!("{rel}/");
                if get_xattr(&p, "trusted.overlay.opaque").as_deref() == Some(b"y") {
                    s.push_str("(opaque)");
                }
                if let Some(v) = get_xattr(&p, "trusted.overlay.redirect") {
                    s.push_str(&format!("(redirect={})", String::from_utf8_lossy(&v)));
                }
                s
            } else if ft.is_file() {
                format!(
                    "{rel}={}",
                    String::from_utf8_lossy(&std::fs::read(&p).expect("read"))
                )
            } else if ft.is_symlink() {
                format!("{rel}->{}", std::fs::read_link(&p).expect("readlink").display())
            } else if ft.is_char_device() && m.rdev() == 0 {
                format!("{rel}(wh)")
            } else if ft.is_char_device() {
                format!("{rel}(chr)")
            } else if ft.is_fifo() {
                format!("{rel}(fifo)")
            } else {
                format!("{rel}(other)")
            }
        })
        .collect()
}

fn assert_tokens(what: &str, got: &[String], want: &str) {
    let mut got = got.to_vec();
    got.sort();
    let mut want: Vec<String> = want.split_whitespace().map(expand).collect();
    want.sort();
    assert!(
        got == want,
        "{what}\n--- expected\n  {}\n--- got\n  {}\n",
        want.join("\n  "),
        got.join("\n  ")
    );
}

// ------------------------------------------------------------------------------------------
// the fixture: layers in a temp dir and a union over them

fn ename(e: i32) -> String {
    let names = [
        (libc::ENOENT, "ENOENT"),
        (libc::ENOTDIR, "ENOTDIR"),
        (libc::EISDIR, "EISDIR"),
        (libc::EEXIST, "EEXIST"),
        (libc::ENOTEMPTY, "ENOTEMPTY"),
        (libc::EXDEV, "EXDEV"),
        (libc::EROFS, "EROFS"),
        (libc::EPERM, "EPERM"),
        (libc::EINVAL, "EINVAL"),
        (libc::ENAMETOOLONG, "ENAMETOOLONG"),
        (libc::ENODATA, "ENODATA"),
        (libc::EBADF, "EBADF"),
        (libc::EACCES, "EACCES"),
        (libc::EIO, "EIO"),
    ];
    names
        .iter()
        .find(|(n, _)| *n == e)
        .map_or_else(|| format!("errno {e}"), |(_, s)| s.to_string())
}

fn ok<T>(r: verlay::error::Result<T>) -> Result<T, String> {
    r.map_err(|e| ename(e.errno()))
}

fn name(s: &str) -> &OsStr {
    OsStr::new(s)
}

struct Fx {
    _tmp: TempDir,
    lowers: Vec<PathBuf>,
    upper: Option<PathBuf>,
    work: PathBuf,
    lower_prints: Vec<Vec<String>>,
    u: Union,
}

fn open_union(lowers: &[PathBuf], upper: Option<&Path>, work: &Path) -> Union {
    let first = usize::from(upper.is_some());
    let l = lowers
        .iter()
        .enumerate()
        .map(|(i, p)| LayerDir::open(p, i + first, format!("lower{i}")).expect("open lower"))
        .collect();
    let up = upper.map(|u| Upper::open(u, work, false).expect("open upper"));
    Union::new(l, up, UnionOptions::default()).expect("Union::new")
}

impl Fx {
    /// `lowers[0]` is the top lower; `upper: None` makes a read-only union.
    fn new(upper: Option<&str>, lowers: &[&str]) -> Fx {
        let tmp = tempfile::Builder::new()
            .prefix("verlay-union")
            .tempdir()
            .expect("tempdir");
        let lowers: Vec<PathBuf> = lowers
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                let p = tmp.path().join(format!("l{i}"));
                build(&p, spec);
                p
            })
            .collect();
        let upper = upper.map(|spec| {
            let p = tmp.path().join("upper");
            build(&p, spec);
            p
        });
        let work = tmp.path().join("work");
        std::fs::create_dir(&work).expect("mkdir work");
        let lower_prints = lowers.iter().map(|l| fingerprint(l)).collect();
        let u = open_union(&lowers, upper.as_deref(), &work);
        Fx {
            _tmp: tmp,
            lowers,
            upper,
            work,
            lower_prints,
            u,
        }
    }

    /// A fresh union over the same directories: what a remount shows.
    fn remount(&mut self) {
        self.u = open_union(&self.lowers, self.upper.as_deref(), &self.work);
    }

    fn up(&self, rel: &str) -> PathBuf {
        self.upper.as_ref().expect("upper").join(expand(rel))
    }

    fn low(&self, i: usize, rel: &str) -> PathBuf {
        self.lowers[i].join(expand(rel))
    }

    fn id(&self, path: &str) -> Result<u64, String> {
        let mut id = ROOT_ID;
        for c in expand(path).split('/').filter(|c| !c.is_empty()) {
            id = ok(self.u.lookup(id, name(c)))?.id;
        }
        Ok(id)
    }

    fn attr(&self, path: &str) -> Result<Attr, String> {
        let id = self.id(path)?;
        ok(self.u.getattr(id, None))
    }

    fn parent(&self, path: &str) -> Result<(u64, String), String> {
        let p = expand(path);
        let (dir, base) = p.rsplit_once('/').unwrap_or(("", &p));
        Ok((self.id(dir)?, base.to_string()))
    }

    fn read_id(&self, id: u64) -> Result<Vec<u8>, String> {
        let fh = ok(self.u.open(&ROOT, id, libc::O_RDONLY))?;
        let data = ok(self.u.read(fh, 0, 1 << 20));
        self.u.release(fh);
        data
    }

    fn cat(&self, path: &str) -> Result<String, String> {
        let id = self.id(path)?;
        Ok(String::from_utf8_lossy(&self.read_id(id)?).into_owned())
    }

    /// What a name shows: `=data`, `/`, `->target`, `(fifo)`, `(chr)` or an errno name.
    fn show(&self, path: &str) -> String {
        let r = (|| {
            let id = self.id(path)?;
            let a = ok(self.u.getattr(id, None))?;
            Ok::<_, String>(match a.kind {
                Kind::File => format!("={}", String::from_utf8_lossy(&self.read_id(id)?)),
                Kind::Dir => "/".to_string(),
                Kind::Symlink => format!("->{}", ok(self.u.readlink(id))?.to_string_lossy()),
                Kind::Fifo => "(fifo)".to_string(),
                Kind::Char => "(chr)".to_string(),
                k => format!("({k:?})"),
            })
        })();
        r.unwrap_or_else(|e| e)
    }

    /// The raw listing of a directory, with "." and "..".
    fn readdir(&self, path: &str) -> Result<Vec<verlay::union::dir::DirEntry>, String> {
        let id = self.id(path)?;
        let fh = ok(self.u.opendir(id))?;
        let r = ok(self.u.readdir(id, fh, 0));
        self.u.releasedir(fh);
        Ok(r?.as_ref().clone())
    }

    /// The merged tree as tokens (as `disk_tree`, without whiteouts and markers).
    fn merged(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.merged_rec("", &mut out);
        out
    }

    fn merged_rec(&self, dir: &str, out: &mut Vec<String>) {
        let entries = self
            .readdir(dir)
            .unwrap_or_else(|e| panic!("readdir {dir:?}: {e}"));
        for e in entries {
            let n = e.name.to_string_lossy().into_owned();
            if n == "." || n == ".." {
                continue;
            }
            let p = if dir.is_empty() { n } else { format!("{dir}/{n}") };
            let shown = self.show(&p);
            if shown == "/" {
                out.push(format!("{p}/"));
                self.merged_rec(&p, out);
            } else {
                out.push(format!("{p}{shown}"));
            }
        }
    }

    /// Run one op of the little language used by the tables.
    fn run(&self, op: &str) -> Result<(), String> {
        let w: Vec<&str> = op.split_whitespace().collect();
        let arg = |i: usize| *w.get(i).unwrap_or_else(|| panic!("op {op:?}: missing argument"));
        match w[0] {
            "unlink" => {
                let (p, n) = self.parent(arg(1))?;
                ok(self.u.unlink(&ROOT, p, name(&n)))
            }
            "rmdir" => {
                let (p, n) = self.parent(arg(1))?;
                ok(self.u.rmdir(&ROOT, p, name(&n)))
            }
            "mkdir" => {
                let (p, n) = self.parent(arg(1))?;
                ok(self.u.mkdir(&ROOT, p, name(&n), 0o755)).map(drop)
            }
            "mknod" => {
                let (p, n) = self.parent(arg(1))?;
                ok(self.u.mknod(&ROOT, p, name(&n), libc::S_IFIFO | 0o644, 0)).map(drop)
            }
            "mkwhiteout" => {
                let (p, n) = self.parent(arg(1))?;
                ok(self.u.mknod(&ROOT, p, name(&n), libc::S_IFCHR | 0o644, 0)).map(drop)
            }
            "symlink" => {
                let (p, n) = self.parent(arg(1))?;
                ok(self.u.symlink(&ROOT, p, name(&n), name(arg(2)))).map(drop)
            }
            "create" => {
                let (path, data) = arg(1).split_once('=').unwrap_or((arg(1), ""));
                let (p, n) = self.parent(path)?;
                let (_, fh) = ok(self.u.create(&ROOT, p, name(&n), 0o644, libc::O_WRONLY))?;
                let r = ok(self.u.write(&ROOT, 1, fh, 0, data.as_bytes()));
                self.u.release(fh);
                r.map(drop)
            }
            "write" => {
                let (path, data) = arg(1).split_once('=').expect("write P=data");
                let id = self.id(path)?;
                let fh = ok(self.u.open(&ROOT, id, libc::O_WRONLY | libc::O_TRUNC))?;
                let r = ok(self.u.write(&ROOT, 1, fh, 0, data.as_bytes()));
                self.u.release(fh);
                r.map(drop)
            }
            "link" => {
                let id = self.id(arg(1))?;
                let (p, n) = self.parent(arg(2))?;
                ok(self.u.link(&ROOT, id, p, name(&n))).map(drop)
            }
            "rename" => {
                let (op_, on) = self.parent(arg(1))?;
                let (np, nn) = self.parent(arg(2))?;
                let flags = match w.get(3) {
                    None => 0,
                    Some(&"noreplace") => RENAME_NOREPLACE,
                    Some(&"exchange") => RENAME_EXCHANGE,
                    Some(f) => panic!("rename flag {f:?}"),
                };
                ok(self.u.rename(&ROOT, op_, name(&on), np, name(&nn), flags))
            }
            "chmod" => {
                let mode = u32::from_str_radix(arg(2), 8).expect("mode");
                self.setattr(
                    arg(1),
                    SetAttr {
                        mode: Some(mode),
                        ..SetAttr::default()
                    },
                )
            }
            "setxattr" => {
                let (k, v) = arg(2).split_once('=').expect("k=v");
                let id = self.id(arg(1))?;
                ok(self.u.setxattr(&ROOT, id, name(k), v.as_bytes(), 0))
            }
            _ => panic!("unknown op {op:?}"),
        }
    }

    fn setattr(&self, path: &str, sa: SetAttr) -> Result<(), String> {
        let id = self.id(path)?;
        ok(self.u.setattr(&ROOT, id, None, sa)).map(drop)
    }

    /// Run `a; b => ERRNO; c`: each op must give what it says (default: success).
    fn run_all(&self, what: &str, ops: &str) {
        for item in ops.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            let (op, want) = match item.split_once("=>") {
                Some((o, w)) => (o.trim(), w.trim()),
                None => (item, "ok"),
            };
            let got = match self.run(op) {
                Ok(()) => "ok".to_string(),
                Err(e) => e,
            };
            assert_eq!(got, want, "{what}: op `{op}`");
        }
    }

    /// The lowers are exactly as built, and nothing is left in workdir/work.
    fn finish(&self, what: &str) {
        for (i, l) in self.lowers.iter().enumerate() {
            let now = fingerprint(l);
            assert!(
                now == self.lower_prints[i],
                "{what}: lower {i} was modified\n--- before\n  {}\n--- after\n  {}",
                self.lower_prints[i].join("\n  "),
                now.join("\n  ")
            );
        }
        if self.upper.is_some() {
            // Only the shared whiteout stays, as kernel overlayfs keeps its own: a char 0/0
            // device that every whiteout of the upper is a hard link to.
            let mut left = Vec::new();
            for e in std::fs::read_dir(self.work.join("work")).expect("read workdir/work") {
                let e = e.expect("entry");
                let name = e.file_name().to_string_lossy().into_owned();
                let st = rustix::fs::lstat(e.path()).expect("lstat");
                let whiteout =
                    FileType::from_raw_mode(st.st_mode) == FileType::CharacterDevice && st.st_rdev == 0;
                if !(name.starts_with(verlay::upper::SHARED_WHITEOUT_PREFIX) && whiteout) {
                    left.push(name);
                }
            }
            assert!(left.is_empty(), "{what}: left in workdir/work: {left:?}");
        }
    }
}

// ------------------------------------------------------------------------------------------
// lookup

#[test]
fn lookup_finds_the_topmost_entry_and_honours_whiteouts_and_opaque_dirs() {
    // (case, upper, lowers top first, [(path, what it shows)])
    type Row<'a> = (&'a str, &'a str, &'a [&'a str], &'a [(&'a str, &'a str)]);
    let rows: &[Row] = &[
        ("upper over lower", "f a=up", &["f a=low"], &[("a", "=up")]),
        (
            "top lower over bottom lower",
            "",
            &["f a=l0", "f a=l1"],
            &[("a", "=l0")],
        ),
        (
            "name only in the bottom lower",
            "",
            &["f b=l0", "f a=l1"],
            &[("a", "=l1"), ("b", "=l0")],
        ),
        (
            "upper char whiteout hides the lower",
            "w a",
            &["f a=low; f b=low"],
            &[("a", "ENOENT"), ("b", "=low")],
        ),
        (
            "middle char whiteout hides the bottom",
            "",
            &["w a", "f a=low"],
            &[("a", "ENOENT")],
        ),
        (
            "middle OCI whiteout hides the bottom",
            "",
            &["W a; f b=l0", "f a=low; f b=l1"],
            &[("a", "ENOENT"), ("b", "=l0")],
        ),
        (
            "OCI whiteout hides the layers below, not its own",
            "",
            &["W a; f a=l0", "f a=l1"],
            &[("a", "=l0")],
        ),
        (
            "a whiteout below does not hide the upper",
            "f a=up",
            &["w a", "f a=low"],
            &[("a", "=up")],
        ),
        (
            "a whiteout hides a whole lower dir",
            "w d",
            &["f d/x=1"],
            &[("d", "ENOENT"), ("d/x", "ENOENT")],
        ),
        (
            "upper opaque dir hides the lower dir",
            "o d; f d/y=up",
            &["f d/x=low"],
            &[("d", "/"), ("d/x", "ENOENT"), ("d/y", "=up")],
        ),
        (
            "upper dir merges with the lower",
            "f d/y=up",
            &["f d/x=low"],
            &[("d/x", "=low"), ("d/y", "=up")],
        ),
        (
            "middle opaque dir (xattr) hides the bottom",
            "",
            &["o d; f d/y=l0", "f d/x=l1"],
            &[("d/x", "ENOENT"), ("d/y", "=l0")],
        ),
        (
            "middle opaque dir (OCI) hides the bottom",
            "",
            &["O d; f d/y=l0", "f d/x=l1"],
            &[("d/x", "ENOENT"), ("d/y", "=l0")],
        ),
        (
            "an opaque dir hides only what is below it",
            "",
            &["f d/x=l0", "o d; f d/y=l1", "f d/z=l2"],
            &[("d/x", "=l0"), ("d/y", "=l1"), ("d/z", "ENOENT")],
        ),
        (
            "upper whiteout inside a merged dir",
            "d d; w d/x",
            &["f d/x=low; f d/y=low"],
            &[("d/x", "ENOENT"), ("d/y", "=low")],
        ),
        (
            "lower file over lower dir",
            "",
            &["f d=file", "f d/x=1"],
            &[("d", "=file"), ("d/x", "ENOTDIR")],
        ),
        (
            "lower dir over lower file",
            "",
            &["f d/x=1", "f d=file"],
            &[("d", "/"), ("d/x", "=1")],
        ),
        (
            "upper file over lower dir",
            "f d=up",
            &["f d/x=1"],
            &[("d", "=up"), ("d/x", "ENOTDIR")],
        ),
        (
            "upper dir over lower file",
            "d d",
            &["f d=low"],
            &[("d", "/"), ("d/x", "ENOENT")],
        ),
        (
            "ENOENT for a missing name, ENOTDIR below a file",
            "",
            &["f a=1; d d"],
            &[
                ("b", "ENOENT"),
                ("b/c", "ENOENT"),
                ("d/c", "ENOENT"),
                ("a/c", "ENOTDIR"),
            ],
        ),
        (
            "symlinks and fifos",
            "",
            &["s l->some/target; p fifo"],
            &[("l", "->some/target"), ("fifo", "(fifo)")],
        ),
        (
            "a real char device is no whiteout",
            "",
            &["c null 1:3"],
            &[("null", "(chr)")],
        ),
        (
            "255-byte names work, 256 bytes is ENAMETOOLONG",
            "f u~255=up",
            &["f n~255=low; f d/m~255=deep"],
            &[
                ("n~255", "=low"),
                ("u~255", "=up"),
                ("d/m~255", "=deep"),
                ("n~256", "ENAMETOOLONG"),
            ],
        ),
    ];
    for (case, upper, lowers, checks) in rows {
        let fx = Fx::new(Some(upper), lowers);
        for (path, want) in *checks {
            assert_eq!(fx.show(path), *want, "{case}: {path}");
        }
        fx.finish(case);
    }
}

#[test]
fn lookup_never_finds_oci_whiteouts_and_opaque_markers() {
    // readdir never lists them (see below); lookup must agree, or `stat`/`cat` would see
    // files `ls` does not show.
    let fx = Fx::new(Some(""), &["W a; O d; f d/y=1", "f a=1; f d/x=1"]);
    assert_eq!(fx.show("a"), "ENOENT");
    assert_eq!(fx.show(".wh.a"), "ENOENT");
    assert_eq!(fx.show("d/.wh..wh..opq"), "ENOENT");
    fx.finish("oci markers");
}

#[test]
fn redirect_in_a_lower_layer_is_followed() {
    // A lower that was once an upper: `e` was renamed from `d` (relative redirect), `d`
    // was whited out. Kernel overlayfs follows redirects in lower layers too.
    let fx = Fx::new(Some(""), &["d e; x e trusted.overlay.redirect=d; w d", "f d/x=1"]);
    assert_eq!(fx.show("d"), "ENOENT");
    assert_eq!(fx.show("e/x"), "=1");
    fx.finish("lower redirect");
}

// ------------------------------------------------------------------------------------------
// readdir

#[test]
fn readdir_lists_the_merged_view_once_without_whiteouts_or_markers() {
    // (case, upper, lowers, dir, listing: `name` file, `name/` dir, `name@` symlink,
    // `name|` fifo, `name%` char device)
    type Row<'a> = (&'a str, &'a str, &'a [&'a str], &'a str, &'a str);
    let rows: &[Row] = &[
        (
            "names from every layer, each once",
            "f a=u; f u=u; d sub",
            &[
                "f a=1; f b=1; d sub; s l->a",
                "f b=2; f c=2; f sub/x=0; p fifo; c null 1:3",
            ],
            "",
            "a b c fifo| l@ null% sub/ u",
        ),
        ("upper whiteout", "w a", &["f a; f b"], "", "b"),
        ("middle char whiteout", "", &["w a", "f a; f b"], "", "b"),
        ("middle OCI whiteout", "", &["W a; f c", "f a; f b"], "", "b c"),
        (
            "OCI whiteout applies below, not in its own layer",
            "",
            &["W a; f a", "f a; f b"],
            "",
            "a b",
        ),
        ("upper opaque dir", "o d; f d/u", &["f d/x"], "d", "u"),
        (
            "middle opaque dir (xattr)",
            "",
            &["o d; f d/y", "f d/x"],
            "d",
            "y",
        ),
        ("middle opaque dir (OCI)", "", &["O d; f d/y", "f d/x"], "d", "y"),
        (
            "upper whiteout inside a merged dir",
            "d d; w d/x",
            &["f d/x; f d/y"],
            "d",
            "y",
        ),
        ("file over dir", "", &["f d", "f d/x"], "", "d"),
        (
            "dir over file: only the dir part",
            "",
            &["f d/x", "f d"],
            "d",
            "x",
        ),
        ("pure upper dir", "d n; f n/a", &["f b"], "n", "a"),
        ("empty merged dir", "d d; w d/x", &["f d/x"], "d", ""),
    ];
    for (case, upper, lowers, dir, want) in rows {
        let fx = Fx::new(Some(upper), lowers);
        let entries = fx.readdir(dir).unwrap_or_else(|e| panic!("{case}: readdir: {e}"));
        let names: Vec<String> = entries
            .iter()
            .map(|e| e.name.to_string_lossy().into_owned())
            .collect();
        assert_eq!(&names[..2], &[".", ".."], "{case}: first entries");
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), names.len(), "{case}: duplicates in {names:?}");
        if !dir.is_empty() {
            // the root's "." is readdir_dot_of_the_root_reports_the_root_st_ino
            let dir_attr = fx.attr(dir).expect("dir attr");
            assert_eq!(entries[0].ino, dir_attr.ino, "{case}: d_ino of \".\"");
        }
        let mut got = Vec::new();
        for e in &entries[2..] {
            let n = e.name.to_string_lossy().into_owned();
            let p = if dir.is_empty() {
                n.clone()
            } else {
                format!("{dir}/{n}")
            };
            let a = fx
                .attr(&p)
                .unwrap_or_else(|err| panic!("{case}: listed {p} but lookup says {err}"));
            assert_eq!(e.kind, a.kind, "{case}: d_type of {p}");
            let suffix = match a.kind {
                Kind::Dir => "/",
                Kind::Symlink => "@",
                Kind::Fifo => "|",
                Kind::Char => "%",
                _ => "",
            };
            got.push(format!("{n}{suffix}"));
        }
        assert_tokens(case, &got, want);
        fx.finish(case);
    }
}

#[test]
fn readdir_dot_of_the_root_reports_the_root_st_ino() {
    let fx = Fx::new(Some("f u=1"), &["f a=1"]);
    let e = fx.readdir("").expect("readdir");
    assert_eq!(e[0].name, ".");
    assert_eq!(
        e[0].ino,
        fx.attr("").expect("root").ino,
        "d_ino of \".\" in the root"
    );
    fx.finish("root dot");
}

#[test]
fn readdir_d_ino_matches_st_ino_after_copy_up_and_remount() {
    // Kernel overlayfs recomputes d_ino for copied-up entries (impure dirs), so `ls -i`
    // and `stat` agree; find/du/rsync pair the two.
    let mut fx = Fx::new(Some(""), &["f a=1; f d/b=2"]);
    fx.run_all("copy-up", "chmod a 0600; chmod d/b 0600");
    for round in ["same mount", "after remount"] {
        for (dir, n) in [("", "a"), ("d", "b")] {
            let e = fx.readdir(dir).expect("readdir");
            let d_ino = e.iter().find(|e| e.name == n).expect("listed").ino;
            let p = if dir.is_empty() {
                n.to_string()
            } else {
                format!("{dir}/{n}")
            };
            assert_eq!(d_ino, fx.attr(&p).expect("attr").ino, "{round}: d_ino of {p}");
        }
        fx.remount();
    }
    fx.finish("d_ino");
}

// The tests of copy-up, changes, inodes and open handles, and xattrs (tests/union/).
#[path = "union/changes.rs"]
mod changes;
#[path = "union/copy_up.rs"]
mod copy_up;
#[path = "union/inodes.rs"]
mod inodes;
#[path = "union/xattrs.rs"]
mod xattrs;

// ------------------------------------------------------------------------------------------
// read-only

#[test]
fn read_only_union_refuses_every_change_with_erofs() {
    let fx = Fx::new(None, &["f a=1; x a user.k=v; d e; f d/x=1", "f b=2"]);
    let setattr = |sa: SetAttr| fx.setattr("a", sa);
    let open = |flags: i32| -> Result<(), String> {
        let fh = ok(fx.u.open(&ROOT, fx.id("a")?, flags))?;
        fx.u.release(fh);
        Ok(())
    };
    let xattr_id = fx.id("a").expect("a");
    let changes: Vec<(&str, Result<(), String>)> = vec![
        (
            "chmod",
            setattr(SetAttr {
                mode: Some(0o600),
                ..SetAttr::default()
            }),
        ),
        (
            "chown",
            setattr(SetAttr {
                uid: Some(5),
                ..SetAttr::default()
            }),
        ),
        (
            "truncate",
            setattr(SetAttr {
                size: Some(0),
                ..SetAttr::default()
            }),
        ),
        (
            "utimes",
            setattr(SetAttr {
                mtime: Some(None),
                ..SetAttr::default()
            }),
        ),
        ("open O_WRONLY", open(libc::O_WRONLY)),
        ("open O_RDWR", open(libc::O_RDWR)),
        ("open O_TRUNC", open(libc::O_RDONLY | libc::O_TRUNC)),
        ("create", fx.run("create n=x")),
        ("mkdir", fx.run("mkdir n")),
        ("mknod", fx.run("mknod n")),
        ("symlink", fx.run("symlink n t")),
        ("link", fx.run("link a n")),
        ("unlink", fx.run("unlink a")),
        ("unlink bottom", fx.run("unlink b")),
        ("rmdir", fx.run("rmdir e")),
        ("rename", fx.run("rename a n")),
        ("rename over", fx.run("rename a b")),
        ("exchange", fx.run("rename a b exchange")),
        (
            "setxattr",
            ok(fx.u.setxattr(&ROOT, xattr_id, name("user.new"), b"1", 0)),
        ),
        ("removexattr", ok(fx.u.removexattr(xattr_id, name("user.k")))),
    ];
    for (what, r) in changes {
        assert_eq!(r, Err("EROFS".to_string()), "{what}");
    }
    // Reading still works.
    assert_tokens("read-only view", &fx.merged(), "a=1 b=2 d/ d/x=1 e/");
    assert_eq!(ok(fx.u.getxattr(xattr_id, name("user.k"))), Ok(b"v".to_vec()));
    fx.finish("read-only");
}

// ------------------------------------------------------------------------------------------
// the helpers themselves

#[test]
fn layer_spec_builds_kernel_and_oci_forms() {
    let fx = Fx::new(
        Some("w a; o d; d e 0700 7:8; t e 100.5"),
        &["W b; O c; f n~255=1"],
    );
    assert_tokens(
        "upper",
        &disk_tree(fx.upper.as_ref().expect("upper")),
        "a(wh) d/(opaque) e/",
    );
    let e = std::fs::metadata(fx.up("e")).expect("e");
    assert_eq!(
        (e.mode() & 0o7777, e.uid(), e.gid(), e.mtime(), e.mtime_nsec()),
        (0o700, 7, 8, 100, 500_000_000)
    );
    assert!(fx.low(0, ".wh.b").is_file() && fx.low(0, "c/.wh..wh..opq").is_file());
    assert_eq!(
        fx.low(0, "n~255").file_name().map(|n| n.as_bytes().len()),
        Some(255)
    );
}

/// Reads without a directory handle (the kernel after OPENDIR answered ENOSYS) name their
/// snapshot in the offset: a reader keeps its listing while the directory changes (no entry
/// skipped or repeated), a read from 0 sees the change, and the snapshot goes at its end.
#[test]
fn readdir_without_handle_keeps_its_snapshot_across_changes() {
    let fx = Fx::new(Some("d d; f d/a; f d/b"), &["f d/c; f d/e"]);
    let id = fx.id("d").expect("lookup d");
    let names = |r: &verlay::union::DirRead| -> Vec<String> {
        r.entries[r.start..]
            .iter()
            .map(|e| e.name.to_string_lossy().into_owned())
            .collect()
    };
    let first = fx.u.readdir_at(id, 0).expect("readdir_at 0");
    let all = names(&first);
    assert_eq!(all.len(), 6, "{all:?}"); // . .. a b c e
    let (dir, base) = fx.parent("d/a").expect("parent");
    fx.u.unlink(&ROOT, dir, name(&base)).expect("unlink d/a");
    let cont =
        fx.u.readdir_at(id, verlay::union::dir_cookie(first.gen, 3))
            .expect("readdir_at 3");
    assert_eq!(cont.gen, first.gen, "the reader keeps its snapshot");
    assert_eq!(names(&cont), all[3..].to_vec());
    let fresh = fx.u.readdir_at(id, 0).expect("readdir_at 0 again");
    assert_ne!(fresh.gen, first.gen);
    assert!(!names(&fresh).contains(&"a".to_string()), "{:?}", names(&fresh));
    // The kernel's last read (past the end) drops the snapshot; a late reader continues at
    // its index in a new one.
    let end =
        fx.u.readdir_at(id, verlay::union::dir_cookie(first.gen, all.len()))
            .expect("readdir_at end");
    assert_eq!(end.start, end.entries.len());
    let late =
        fx.u.readdir_at(id, verlay::union::dir_cookie(first.gen, 2))
            .expect("readdir_at late");
    assert_ne!(late.gen, first.gen);
    assert_eq!(names(&late).len(), 3, "{:?}", names(&late));
}

/// Whiteouts are hard links to one shared whiteout inode in the work dir (as kernel
/// overlayfs makes them), not an inode each; when the shared one disappears (the next mount
/// clears the work dir), the next whiteout makes a new one.
#[test]
fn whiteouts_share_one_inode_and_survive_losing_the_shared_one() {
    let fx = Fx::new(Some(""), &["f a=1; f b=2; f c=3; d d; f d/e=4"]);
    fx.run_all("unlinks", "unlink a; unlink b; unlink d/e");
    let ino = |rel: &str| {
        let st = rustix::fs::lstat(fx.up(rel)).expect("lstat");
        assert_eq!(
            (FileType::from_raw_mode(st.st_mode), st.st_rdev),
            (FileType::CharacterDevice, 0),
            "{rel} is a whiteout"
        );
        (st.st_ino, st.st_nlink)
    };
    let (first, nlink) = ino("a");
    assert_eq!(ino("b").0, first, "b shares a's whiteout inode");
    assert_eq!(ino("d/e").0, first, "d/e shares it too");
    assert_eq!(nlink, 4, "three whiteouts and the shared one in the work dir");
    // Lose the shared whiteout behind verlay's back: the next whiteout still works.
    for e in std::fs::read_dir(fx.work.join("work")).expect("read work") {
        std::fs::remove_file(e.expect("entry").path()).expect("remove shared whiteout");
    }
    fx.run_all("unlink after the shared whiteout went", "unlink c");
    let (other, _) = ino("c");
    assert_ne!(other, first, "a new shared whiteout");
    assert_eq!(fx.merged(), vec!["d/".to_string()]);
    fx.finish("whiteouts share an inode");
}

/// While the kernel holds a reference to a name's node, every lookup of the name returns that
/// node id, however lookups and forgets interleave on many threads; once every reference is
/// forgotten, no node is left. One object behind two node ids would be two kernel inodes, and
/// what the kernel checks on one inode (ETXTBSY, locks, leases) would miss the other.
#[test]
fn concurrent_lookups_and_forgets_of_one_name_give_one_node_id() {
    let fx = Fx::new(Some("f up=u"), &["f low=l; f dir/x=1"]);
    let u = &fx.u;
    for n in ["up", "low", "dir"] {
        let held = ok(u.lookup(ROOT_ID, name(n))).expect("lookup").id;
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..2000 {
                        let e = u.lookup(ROOT_ID, name(n)).expect("lookup");
                        assert_eq!(e.id, held, "{n}: a second node id while one is held");
                        u.forget(e.id, 1);
                    }
                });
            }
        });
        u.forget(held, 1);
        // No reference held: lookups and forgets racing may make new nodes, but never leak.
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..2000 {
                        let e = u.lookup(ROOT_ID, name(n)).expect("lookup");
                        u.forget(e.id, 1);
                    }
                });
            }
        });
        assert_eq!(
            u.node_count(),
            1,
            "{n}: nodes left after every reference was forgotten"
        );
    }
}

/// Two names of one upper object, looked up separately, are one node: the kernel caches
/// attributes per node id, so a second id would show stale owner, mode and size through one
/// name after a change through the other (issue 13). Once every reference is forgotten, no
/// node is left.
#[test]
fn upper_hard_link_names_are_one_node() {
    let fx = Fx::new(Some("f x=1; h d/y=x"), &["f low=l"]);
    let u = &fx.u;
    let x = ok(u.lookup(ROOT_ID, name("x"))).expect("lookup x");
    let d = ok(u.lookup(ROOT_ID, name("d"))).expect("lookup d");
    let y = ok(u.lookup(d.id, name("y"))).expect("lookup d/y");
    assert_eq!(y.id, x.id, "d/y: a second node id for the object of x");
    u.forget(x.id, 1);
    // Held through d/y only: the node's first name is x; a change through it shows.
    let y2 = ok(u.lookup(d.id, name("y"))).expect("lookup d/y again");
    assert_eq!(y2.id, x.id);
    u.forget(y2.id, 1);
    u.forget(y.id, 1);
    u.forget(d.id, 1);
    assert_eq!(
        u.node_count(),
        1,
        "nodes left after every reference was forgotten"
    );
}

/// A hard link made in another directory: once the kernel forgets the first name's
/// directory (it holds the object through the new name only), requests on the object still
/// find it (its path went through the forgotten directory: ESTALE), also after the name the
/// kernel held is removed; and forgetting the object frees the directory it kept.
#[test]
fn hard_linked_node_keeps_the_directories_of_its_names() {
    let fx = Fx::new(Some("f top=1"), &["f low=l"]);
    let u = &fx.u;
    let e = ok(u.mkdir(&ROOT, ROOT_ID, name("e"), 0o755)).expect("mkdir e");
    let a = ok(u.mknod(&ROOT, e.id, name("a"), libc::S_IFREG | 0o644, 0)).expect("mknod e/a");
    let b = ok(u.link(&ROOT, a.id, ROOT_ID, name("b"))).expect("link e/a b");
    assert_eq!(b.id, a.id);
    // The kernel drops the dentries e/a and e: their references go.
    u.forget(a.id, 1);
    u.forget(e.id, 1);
    ok(u.listxattr(a.id)).expect("listxattr through b after e was forgotten");
    ok(u.getattr(a.id, None)).expect("getattr");
    ok(u.unlink(&ROOT, ROOT_ID, name("b"))).expect("unlink b");
    let sa = SetAttr {
        mode: Some(0o600),
        ..Default::default()
    };
    let attr = ok(u.setattr(&ROOT, a.id, None, sa)).expect("chmod through the node, its name e/a left");
    assert_eq!(attr.perm & 0o7777, 0o600);
    assert_eq!(
        std::fs::metadata(fx.up("e/a")).expect("upper e/a").mode() & 0o7777,
        0o600
    );
    u.forget(a.id, 1);
    assert_eq!(
        u.node_count(),
        1,
        "the directory kept for the object's name was not freed"
    );
}
