//! The union core reproduces kernel overlayfs semantics without a FUSE mount: lookup and readdir
//! over upper and lowers with whiteouts (char 0/0 and OCI `.wh.NAME`), opaque dirs (xattr and
//! `.wh..wh..opq`) and redirects; copy-up (data, holes, mode, owner, ns times, xattrs, parents
//! first, lower never touched, work dir left empty); the whiteouts and opaque dirs left by
//! unlink/rmdir/mkdir; rename (redirects, NOREPLACE, EXCHANGE, errnos); st_ino stability; open
//! handles across copy-up and unlink; escaping of the overlay's own xattrs; EROFS without an
//! upper. Every case checks the union's answers, the upper on disk in kernel format, and the
//! merged view of a fresh union over the same directories (what a remount would show).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, Timespec, Timestamps, CWD};
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
// layers from a compact spec
//
// Entries separated by `;`, paths relative to the layer root, missing parents made as dirs.
// A path component `NAME~N` is NAME padded with `x` to N bytes.
//
//   f a=hello          file with content (no `=`: empty)
//   z s SIZE O:DATA..  sparse file: size, then offset:data chunks
//   d dir [MODE [U:G]] directory
//   s link->target     symlink
//   h b=a              hard link b to a
//   p fifo             fifo
//   c null 1:3         char device
//   w gone             whiteout, char 0/0
//   W gone             OCI whiteout `.wh.gone`
//   o dir              opaque dir, trusted.overlay.opaque=y
//   O dir              opaque dir, OCI `.wh..wh..opq`
//   x path k=v         xattr
//   m path MODE [U:G]  mode (`-` = leave) and owner
//   t path SEC.NSEC    atime and mtime (applied last)

fn expand(p: &str) -> String {
    p.split('/')
        .map(|c| match c.split_once('~') {
            Some((base, n)) => {
                let n: usize = n.parse().expect("NAME~N");
                format!("{base}{}", "x".repeat(n - base.len()))
            }
            None => c.to_string(),
        })
        .collect::<Vec<_>>()
        .join("/")
}

fn ts(s: &str) -> Timespec {
    let (sec, nsec) = s.split_once('.').unwrap_or((s, "0"));
    Timespec {
        tv_sec: sec.parse().expect("seconds"),
        tv_nsec: format!("{nsec:0<9}").parse().expect("nanoseconds"),
    }
}

fn parents(p: &Path) {
    std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir -p");
}

fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    rustix::fs::lsetxattr(p, name, value, rustix::fs::XattrFlags::empty())
        .unwrap_or_else(|e| panic!("setxattr {name} {}: {e}", p.display()));
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

fn mknod(p: &Path, ft: FileType, dev: u64) {
    parents(p);
    rustix::fs::mknodat(CWD, p, ft, Mode::from_raw_mode(0o644), dev)
        .unwrap_or_else(|e| panic!("mknod {}: {e}", p.display()));
}

fn meta(p: &Path, args: &[&str]) {
    if let Some(o) = args.get(1) {
        let (u, g) = o.split_once(':').expect("U:G");
        std::os::unix::fs::lchown(p, u.parse().ok(), g.parse().ok()).expect("lchown");
    }
    match args.first() {
        Some(&"-") | None => {}
        Some(m) => {
            let mode = u32::from_str_radix(m, 8).expect("octal mode");
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
        }
    }
}

fn build(dir: &Path, spec: &str) {
    std::fs::create_dir_all(dir).expect("mkdir layer");
    let mut times = Vec::new();
    for item in spec.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        let (tag, rest) = item
            .split_once(' ')
            .unwrap_or_else(|| panic!("bad layer entry {item:?}"));
        let rest = rest.trim();
        let w: Vec<&str> = rest.split_whitespace().collect();
        let at = |s: &str| dir.join(expand(s.trim()));
        match tag {
            "f" => {
                let (p, c) = rest.split_once('=').unwrap_or((rest, ""));
                let p = at(p);
                parents(&p);
                std::fs::write(&p, c).expect("write");
            }
            "z" => {
                let p = at(w[0]);
                parents(&p);
                let f = std::fs::File::create(&p).expect("create");
                f.set_len(w[1].parse().expect("size")).expect("set_len");
                for c in &w[2..] {
                    let (o, d) = c.split_once(':').expect("offset:data");
                    f.write_all_at(d.as_bytes(), o.parse().expect("offset"))
                        .expect("write");
                }
            }
            "d" | "o" | "O" => {
                let p = at(w[0]);
                std::fs::create_dir_all(&p).expect("mkdir");
                if tag == "o" {
                    set_xattr(&p, "trusted.overlay.opaque", b"y");
                }
                if tag == "O" {
                    std::fs::write(p.join(".wh..wh..opq"), "").expect("opq");
                }
                meta(&p, &w[1..]);
            }
            "s" => {
                let (p, t) = rest.split_once("->").expect("s link->target");
                let p = at(p);
                parents(&p);
                std::os::unix::fs::symlink(t.trim(), &p).expect("symlink");
            }
            "h" => {
                let (p, t) = rest.split_once('=').expect("h new=old");
                let p = at(p);
                parents(&p);
                std::fs::hard_link(at(t), &p).expect("link");
            }
            "p" => mknod(&at(w[0]), FileType::Fifo, 0),
            "c" => {
                let (a, b) = w[1].split_once(':').expect("major:minor");
                let dev = rustix::fs::makedev(a.parse().expect("major"), b.parse().expect("minor"));
                mknod(&at(w[0]), FileType::CharacterDevice, dev);
            }
            "w" => mknod(&at(w[0]), FileType::CharacterDevice, 0),
            "W" => {
                let p = at(w[0]);
                parents(&p);
                let name = p.file_name().expect("name").to_string_lossy().into_owned();
                std::fs::write(p.with_file_name(format!(".wh.{name}")), "").expect("oci whiteout");
            }
            "x" => {
                let (k, v) = w[1].split_once('=').expect("k=v");
                set_xattr(&at(w[0]), k, v.as_bytes());
            }
            "m" => meta(&at(w[0]), &w[1..]),
            "t" => times.push((at(w[0]), ts(w[1]))),
            _ => panic!("bad layer entry {item:?}"),
        }
    }
    for (p, t) in times {
        let t = Timestamps {
            last_access: t,
            last_modification: t,
        };
        rustix::fs::utimensat(CWD, &p, &t, AtFlags::SYMLINK_NOFOLLOW).expect("utimensat");
    }
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

// ------------------------------------------------------------------------------------------
// copy-up

const COPY_UP_LOWER: &str = "d p 0750 1002:1003; d p/q 2711 1004:1005; f p/q/f=hello; \
     m p/q/f 7755 1000:1001; x p/q/f user.k=v; x p/q user.dk=dv; x p user.pk=pv; f p/q/g=other; \
     t p/q/f 1500000000.123456789; t p/q/g 1500000001.2; t p/q 1400000000.987654321; t p 1300000000.000000005";

#[test]
fn copy_up_keeps_data_mode_owner_times_and_xattrs_of_the_object_and_its_parents() {
    struct Row<'a> {
        case: &'a str,
        target: &'a str,
        op: &'a dyn Fn(&Fx) -> Result<(), String>,
        data: Option<&'a str>,
        mode: u32,
        owner: (u32, u32),
        mtime_kept: bool,
        xattrs: &'a [&'a str],
    }
    let setattr = |path: &'static str, sa: SetAttr| move |fx: &Fx| fx.setattr(path, sa);
    let chmod = setattr(
        "p/q/f",
        SetAttr {
            mode: Some(0o604),
            ..SetAttr::default()
        },
    );
    let chown = setattr(
        "p/q/f",
        SetAttr {
            uid: Some(2000),
            gid: Some(2001),
            ..SetAttr::default()
        },
    );
    let atime = setattr(
        "p/q/f",
        SetAttr {
            atime: Some(Some(ts("1234.5"))),
            ..SetAttr::default()
        },
    );
    let truncate = setattr(
        "p/q/f",
        SetAttr {
            size: Some(3),
            ..SetAttr::default()
        },
    );
    let dir_chmod = setattr(
        "p/q",
        SetAttr {
            mode: Some(0o700),
            ..SetAttr::default()
        },
    );
    let setxattr = |fx: &Fx| fx.run("setxattr p/q/f user.new=1");
    let open_w = |fx: &Fx| {
        let id = fx.id("p/q/f")?;
        let fh = ok(fx.u.open(&ROOT, id, libc::O_WRONLY))?;
        fx.u.release(fh);
        Ok(())
    };
    let write = |fx: &Fx| {
        let id = fx.id("p/q/f")?;
        let fh = ok(fx.u.open(&ROOT, id, libc::O_RDWR))?;
        let r = ok(fx.u.write(&ROOT, 1, fh, 0, b"HE"));
        fx.u.release(fh);
        r.map(drop)
    };
    let rows = [
        Row {
            case: "chmod",
            target: "p/q/f",
            op: &chmod,
            data: Some("hello"),
            mode: 0o604,
            owner: (1000, 1001),
            mtime_kept: true,
            xattrs: &["user.k=v"],
        },
        Row {
            // chown of a non-directory clears setuid and setgid, keeps sticky (as on any fs)
            case: "chown",
            target: "p/q/f",
            op: &chown,
            data: Some("hello"),
            mode: 0o1755,
            owner: (2000, 2001),
            mtime_kept: true,
            xattrs: &["user.k=v"],
        },
        Row {
            case: "utimes (atime only)",
            target: "p/q/f",
            op: &atime,
            data: Some("hello"),
            mode: 0o7755,
            owner: (1000, 1001),
            mtime_kept: true,
            xattrs: &["user.k=v"],
        },
        Row {
            case: "setxattr",
            target: "p/q/f",
            op: &setxattr,
            data: Some("hello"),
            mode: 0o7755,
            owner: (1000, 1001),
            mtime_kept: true,
            xattrs: &["user.k=v", "user.new=1"],
        },
        Row {
            case: "open for write",
            target: "p/q/f",
            op: &open_w,
            data: Some("hello"),
            mode: 0o7755,
            owner: (1000, 1001),
            mtime_kept: true,
            xattrs: &["user.k=v"],
        },
        Row {
            case: "write",
            target: "p/q/f",
            op: &write,
            data: Some("HEllo"),
            mode: 0o7755,
            owner: (1000, 1001),
            mtime_kept: false,
            xattrs: &["user.k=v"],
        },
        Row {
            case: "truncate",
            target: "p/q/f",
            op: &truncate,
            data: Some("hel"),
            mode: 0o7755,
            owner: (1000, 1001),
            mtime_kept: false,
            xattrs: &["user.k=v"],
        },
        Row {
            case: "chmod of a dir copies up the dir alone",
            target: "p/q",
            op: &dir_chmod,
            data: None,
            mode: 0o700,
            owner: (1004, 1005),
            mtime_kept: true,
            xattrs: &["user.dk=dv"],
        },
    ];
    for r in rows {
        let case = r.case;
        let fx = Fx::new(Some(""), &[COPY_UP_LOWER]);
        let before = fx.attr(r.target).expect("attr before");
        (r.op)(&fx).unwrap_or_else(|e| panic!("{case}: {e}"));
        let up = fx.up(r.target);
        let low = fx.low(0, r.target);
        let (um, lm) = (
            std::fs::symlink_metadata(&up).unwrap_or_else(|e| panic!("{case}: not copied up: {e}")),
            std::fs::symlink_metadata(&low).expect("lower"),
        );
        assert_eq!(um.mode() & libc::S_IFMT, lm.mode() & libc::S_IFMT, "{case}: type");
        if let Some(d) = r.data {
            assert_eq!(
                String::from_utf8_lossy(&std::fs::read(&up).expect("read")),
                d,
                "{case}: upper data"
            );
            assert_eq!(fx.cat(r.target).expect("cat"), d, "{case}: merged data");
        }
        assert_eq!(
            format!("{:o}", um.mode() & 0o7777),
            format!("{:o}", r.mode),
            "{case}: upper mode"
        );
        assert_eq!((um.uid(), um.gid()), r.owner, "{case}: upper owner");
        if r.mtime_kept {
            assert_eq!(
                (um.mtime(), um.mtime_nsec()),
                (lm.mtime(), lm.mtime_nsec()),
                "{case}: mtime"
            );
        }
        if case.starts_with("utimes") {
            assert_eq!(
                (um.atime(), um.atime_nsec()),
                (1234, 500_000_000),
                "{case}: atime"
            );
        }
        assert_tokens(
            &format!("{case}: upper xattrs"),
            &user_xattrs(&up),
            &r.xattrs.join(" "),
        );
        // The merged view shows what is on disk, and st_ino did not move.
        let a = fx.attr(r.target).expect("attr after");
        assert_eq!(a.perm, um.mode() & 0o7777, "{case}: merged mode");
        assert_eq!((a.uid, a.gid), (um.uid(), um.gid()), "{case}: merged owner");
        assert_eq!(
            (a.mtime.tv_sec, a.mtime.tv_nsec),
            (um.mtime(), um.mtime_nsec()),
            "{case}: merged mtime"
        );
        assert_eq!(a.ino, before.ino, "{case}: st_ino changed by copy-up");
        // Parents: copied first, each with its own mode, owner, times and xattrs.
        let mut anc = Path::new(r.target).parent();
        while let Some(p) = anc.filter(|p| !p.as_os_str().is_empty()) {
            let rel = p.to_str().expect("utf8");
            let (u, l) = (fx.up(rel), fx.low(0, rel));
            let (um, lm) = (
                std::fs::symlink_metadata(&u).expect("parent up"),
                std::fs::symlink_metadata(&l).expect("parent low"),
            );
            assert_eq!(um.mode(), lm.mode(), "{case}: mode of parent {rel}");
            assert_eq!(
                (um.uid(), um.gid()),
                (lm.uid(), lm.gid()),
                "{case}: owner of parent {rel}"
            );
            assert_eq!(
                (um.mtime(), um.mtime_nsec()),
                (lm.mtime(), lm.mtime_nsec()),
                "{case}: mtime of parent {rel}"
            );
            assert_eq!(user_xattrs(&u), user_xattrs(&l), "{case}: xattrs of parent {rel}");
            anc = p.parent();
        }
        // Siblings stay below.
        let sibling = if r.target == "p/q" { "p/q/f" } else { "p/q/g" };
        assert!(!fx.up(sibling).exists(), "{case}: {sibling} was copied up too");
        fx.finish(case);
    }
}

#[test]
fn copy_up_keeps_holes_in_sparse_files() {
    let size: u64 = 64 << 20;
    let spec = format!("z s {size} 0:head 33554432:middle {}:tail", size - 4);
    let fx = Fx::new(Some(""), &[&spec]);
    fx.run_all("copy-up", "chmod s 0600");
    let (up, low) = (fx.up("s"), fx.low(0, "s"));
    let (um, lm) = (
        std::fs::metadata(&up).expect("upper"),
        std::fs::metadata(&low).expect("lower"),
    );
    assert_eq!(um.len(), size, "size");
    assert!(
        um.blocks() <= lm.blocks() + 64,
        "holes filled: upper has {} blocks, lower {}",
        um.blocks(),
        lm.blocks()
    );
    let id = fx.id("s").expect("lookup");
    assert_eq!(
        fx.u.getattr(id, None).expect("getattr").blocks,
        um.blocks(),
        "st_blocks shown"
    );
    let fh = fx.u.open(&ROOT, id, libc::O_RDONLY).expect("open");
    for (off, want) in [
        (0u64, &b"head"[..]),
        (33554432, b"middle"),
        (size - 4, b"tail"),
        (4096, &[0u8; 6][..]),
    ] {
        assert_eq!(
            fx.u.read(fh, off, want.len() as u32).expect("read"),
            want,
            "data at {off}"
        );
    }
    assert_eq!(
        fx.u.lseek(fh, 0, libc::SEEK_HOLE).expect("SEEK_HOLE"),
        4096,
        "first hole"
    );
    fx.u.release(fh);
    fx.finish("sparse");
}

// ------------------------------------------------------------------------------------------
// changes: tables of ops, checked in the merged view, on disk, and after a remount

struct Case<'a> {
    case: &'a str,
    upper: &'a str,
    lowers: &'a [&'a str],
    /// `op args [=> ERRNO]; ...`
    ops: &'a str,
    /// merged tree after the ops
    merged: &'a str,
    /// upper on disk after the ops
    disk: &'a str,
}

fn run_cases(cases: &[Case]) {
    for c in cases {
        let mut fx = Fx::new(Some(c.upper), c.lowers);
        fx.run_all(c.case, c.ops);
        assert_tokens(&format!("{}: merged view", c.case), &fx.merged(), c.merged);
        assert_tokens(
            &format!("{}: upper on disk", c.case),
            &disk_tree(fx.upper.as_ref().expect("upper")),
            c.disk,
        );
        fx.finish(c.case);
        fx.remount();
        assert_tokens(
            &format!("{}: merged view after remount", c.case),
            &fx.merged(),
            c.merged,
        );
    }
}

#[test]
fn unlink_and_rmdir_leave_whiteouts_exactly_where_a_lower_name_would_show() {
    run_cases(&[
        Case {
            case: "unlink a lower file",
            upper: "",
            lowers: &["f a=1; f b=2"],
            ops: "unlink a",
            merged: "b=2",
            disk: "a(wh)",
        },
        Case {
            case: "unlink an upper-only file leaves no whiteout",
            upper: "f a=1",
            lowers: &["f b=2"],
            ops: "unlink a",
            merged: "b=2",
            disk: "",
        },
        Case {
            case: "unlink an upper file over a lower one",
            upper: "f a=up",
            lowers: &["f a=low"],
            ops: "unlink a",
            merged: "",
            disk: "a(wh)",
        },
        Case {
            case: "unlink a file only in the bottom lower",
            upper: "",
            lowers: &["f b=1", "f a=1"],
            ops: "unlink a",
            merged: "b=1",
            disk: "a(wh)",
        },
        Case {
            case: "unlink deep copies up the parents only",
            upper: "",
            lowers: &["f a/b/c=1; f a/b/d=2"],
            ops: "unlink a/b/c",
            merged: "a/ a/b/ a/b/d=2",
            disk: "a/ a/b/ a/b/c(wh)",
        },
        Case {
            case: "unlink symlink and fifo",
            upper: "",
            lowers: &["s l->x; p f"],
            ops: "unlink l; unlink f",
            merged: "",
            disk: "l(wh) f(wh)",
        },
        Case {
            case: "rmdir an empty lower dir",
            upper: "",
            lowers: &["d d"],
            ops: "rmdir d",
            merged: "",
            disk: "d(wh)",
        },
        Case {
            case: "rmdir a non-empty merged dir",
            upper: "f d/u=1",
            lowers: &["f d/x=1"],
            ops: "rmdir d => ENOTEMPTY",
            merged: "d/ d/u=1 d/x=1",
            disk: "d/ d/u=1",
        },
        Case {
            case: "rmdir a non-empty lower dir changes nothing",
            upper: "",
            lowers: &["f d/x=1"],
            ops: "rmdir d => ENOTEMPTY",
            merged: "d/ d/x=1",
            disk: "",
        },
        Case {
            case: "rmdir a merged dir whose lower entries are all whited out",
            upper: "d d; w d/x; w d/y",
            lowers: &["f d/x=1; f d/y=2"],
            ops: "rmdir d",
            merged: "",
            disk: "d(wh)",
        },
        Case {
            case: "unlink every lower entry, then rmdir",
            upper: "",
            lowers: &["f d/x=1", "f d/y=2; d d/e"],
            ops: "rmdir d => ENOTEMPTY; unlink d/x; unlink d/y; rmdir d => ENOTEMPTY; rmdir d/e; rmdir d",
            merged: "",
            disk: "d(wh)",
        },
        Case {
            case: "rmdir a dir emptied by a middle layer's whiteout",
            upper: "",
            lowers: &["W d/x", "f d/x=1"],
            ops: "rmdir d",
            merged: "",
            disk: "d(wh)",
        },
        Case {
            case: "rmdir a dir emptied by a middle opaque dir",
            upper: "",
            lowers: &["o d", "f d/x=1"],
            ops: "rmdir d",
            merged: "",
            disk: "d(wh)",
        },
        Case {
            case: "rmdir an upper-only dir",
            upper: "d n",
            lowers: &["f a=1"],
            ops: "rmdir n",
            merged: "a=1",
            disk: "",
        },
        Case {
            case: "errnos",
            upper: "",
            lowers: &["f a=1; d d"],
            ops: "unlink d => EISDIR; rmdir a => ENOTDIR; unlink b => ENOENT; rmdir b => ENOENT; \
                  unlink a; unlink a => ENOENT",
            merged: "d/",
            disk: "a(wh)",
        },
    ]);
}

#[test]
fn creating_over_a_whiteout_never_brings_back_the_lower_object() {
    run_cases(&[
        Case {
            case: "mkdir over a whiteout makes an opaque dir",
            upper: "",
            lowers: &["f d/x=1"],
            ops: "unlink d/x; rmdir d; mkdir d",
            merged: "d/",
            disk: "d/(opaque)",
        },
        Case {
            case: "mkdir over a whiteout that was on disk already",
            upper: "w d",
            lowers: &["f d/x=1"],
            ops: "mkdir d; create d/y=2",
            merged: "d/ d/y=2",
            disk: "d/(opaque) d/y=2",
        },
        Case {
            case: "mkdir where a lower file was",
            upper: "",
            lowers: &["f d=file"],
            ops: "unlink d; mkdir d",
            merged: "d/",
            disk: "d/(opaque)",
        },
        Case {
            case: "mkdir of a new name is not opaque",
            upper: "",
            lowers: &["f a=1"],
            ops: "mkdir n",
            merged: "a=1 n/",
            disk: "n/",
        },
        Case {
            case: "re-created file starts empty",
            upper: "",
            lowers: &["f a=old"],
            ops: "unlink a; create a",
            merged: "a=",
            disk: "a=",
        },
        Case {
            case: "re-created file holds only the new data",
            upper: "",
            lowers: &["f a=old-and-long"],
            ops: "unlink a; create a=new",
            merged: "a=new",
            disk: "a=new",
        },
        Case {
            case: "a file where a lower dir was",
            upper: "",
            lowers: &["d d"],
            ops: "rmdir d; create d=f",
            merged: "d=f",
            disk: "d=f",
        },
        Case {
            case: "symlink and fifo over whiteouts",
            upper: "",
            lowers: &["f a=1; f b=2"],
            ops: "unlink a; symlink a target; unlink b; mknod b",
            merged: "a->target b(fifo)",
            disk: "a->target b(fifo)",
        },
        Case {
            case: "names that exist give EEXIST",
            upper: "",
            lowers: &["f a=1; d d"],
            ops: "create a=x => EEXIST; mkdir a => EEXIST; mkdir d => EEXIST; symlink d t => EEXIST; \
                  mknod a => EEXIST; link a d => EEXIST",
            merged: "a=1 d/",
            disk: "",
        },
        Case {
            case: "a whiteout cannot be made through the union",
            upper: "",
            lowers: &["f a=1"],
            ops: "mkwhiteout n => EPERM",
            merged: "a=1",
            disk: "",
        },
        Case {
            case: "link to a lower file copies it up",
            upper: "",
            lowers: &["f a=1"],
            ops: "link a b",
            merged: "a=1 b=1",
            disk: "a=1 b=1",
        },
        Case {
            case: "link over a whiteout",
            upper: "",
            lowers: &["f a=1; f b=old"],
            ops: "unlink b; link a b",
            merged: "a=1 b=1",
            disk: "a=1 b=1",
        },
    ]);
}

#[test]
fn rename_follows_kernel_overlayfs_with_redirect_dir() {
    run_cases(&[
        Case {
            case: "lower file within a dir",
            upper: "",
            lowers: &["f a=1"],
            ops: "rename a b",
            merged: "b=1",
            disk: "a(wh) b=1",
        },
        Case {
            case: "upper-only file leaves no whiteout",
            upper: "f a=1",
            lowers: &["f c=3"],
            ops: "rename a b",
            merged: "b=1 c=3",
            disk: "b=1",
        },
        Case {
            case: "lower file between dirs",
            upper: "",
            lowers: &["f d1/a=1; d d2"],
            ops: "rename d1/a d2/b",
            merged: "d1/ d2/ d2/b=1",
            disk: "d1/ d1/a(wh) d2/ d2/b=1",
        },
        Case {
            case: "over an existing lower file",
            upper: "",
            lowers: &["f a=1; f b=2"],
            ops: "rename a b",
            merged: "b=1",
            disk: "a(wh) b=1",
        },
        Case {
            case: "upper-only file over a lower file",
            upper: "f a=1",
            lowers: &["f b=2"],
            ops: "rename a b",
            merged: "b=1",
            disk: "b=1",
        },
        Case {
            case: "onto a whited-out name",
            upper: "",
            lowers: &["f a=1; f b=2"],
            ops: "unlink b; rename a b noreplace",
            merged: "b=1",
            disk: "a(wh) b=1",
        },
        Case {
            case: "lower dir in the same parent gets a relative redirect",
            upper: "",
            lowers: &["f d/x=1; f d/sub/y=2"],
            ops: "rename d e",
            merged: "e/ e/x=1 e/sub/ e/sub/y=2",
            disk: "d(wh) e/(redirect=d)",
        },
        Case {
            case: "lower dir to another parent gets an absolute redirect",
            upper: "",
            lowers: &["f a/d/x=1; d p"],
            ops: "rename a/d p/e",
            merged: "a/ p/ p/e/ p/e/x=1",
            disk: "a/ a/d(wh) p/ p/e/(redirect=/a/d)",
        },
        Case {
            case: "merged dir keeps both parts",
            upper: "f d/u=up",
            lowers: &["f d/x=l0", "f d/y=l1"],
            ops: "rename d e",
            merged: "e/ e/u=up e/x=l0 e/y=l1",
            disk: "d(wh) e/(redirect=d) e/u=up",
        },
        Case {
            case: "renamed twice, changed in between",
            upper: "",
            lowers: &["f d/x=1; f d/y=2; d p"],
            ops: "rename d e; unlink e/x; create e/z=3; rename e p/f",
            merged: "p/ p/f/ p/f/y=2 p/f/z=3",
            disk: "d(wh) p/ p/f/(redirect=/d) p/f/x(wh) p/f/z=3",
        },
        Case {
            case: "renamed twice in the same parent keeps the first redirect",
            upper: "",
            lowers: &["f d/x=1"],
            ops: "rename d e; rename e f",
            merged: "f/ f/x=1",
            disk: "d(wh) f/(redirect=d)",
        },
        Case {
            case: "copy-up inside a renamed dir reads the old path",
            upper: "",
            lowers: &["f d/x=1"],
            ops: "rename d e; chmod e/x 0600",
            merged: "e/ e/x=1",
            disk: "d(wh) e/(redirect=d) e/x=1",
        },
        Case {
            case: "rmdir of a renamed dir emptied of its lower entries",
            upper: "",
            lowers: &["f d/x=1"],
            ops: "rename d e; rmdir e => ENOTEMPTY; unlink e/x; rmdir e",
            merged: "",
            disk: "d(wh)",
        },
        Case {
            case: "dir onto an empty lower dir",
            upper: "",
            lowers: &["f d/x=1; d e"],
            ops: "rename d e",
            merged: "e/ e/x=1",
            disk: "d(wh) e/(redirect=d)",
        },
        Case {
            case: "upper-only dir into a merged parent over a whiteout is opaque",
            upper: "",
            lowers: &["f e/z=1"],
            ops: "unlink e/z; rmdir e; mkdir n; create n/a=1; rename n e",
            merged: "e/ e/a=1",
            disk: "e/(opaque) e/a=1",
        },
        Case {
            case: "NOREPLACE onto an existing name",
            upper: "f u=1",
            lowers: &["f a=1; f b=2; d d"],
            ops: "rename a b noreplace => EEXIST; rename u b noreplace => EEXIST; rename d b noreplace => EEXIST",
            merged: "a=1 b=2 d/ u=1",
            disk: "u=1",
        },
        Case {
            case: "EXCHANGE two lower files",
            upper: "",
            lowers: &["f a=1; f b=2"],
            ops: "rename a b exchange",
            merged: "a=2 b=1",
            disk: "a=2 b=1",
        },
        Case {
            case: "EXCHANGE a file with a lower dir",
            upper: "",
            lowers: &["f a=1; f d/x=2"],
            ops: "rename a d exchange",
            merged: "a/ a/x=2 d=1",
            disk: "a/(redirect=d) d=1",
        },
        Case {
            case: "EXCHANGE with a missing name",
            upper: "",
            lowers: &["f a=1"],
            ops: "rename a b exchange => ENOENT",
            merged: "a=1",
            disk: "",
        },
        Case {
            case: "dir onto a non-empty dir",
            upper: "",
            lowers: &["f d/x=1; f e/y=2"],
            ops: "rename d e => ENOTEMPTY",
            merged: "d/ d/x=1 e/ e/y=2",
            disk: "",
        },
        Case {
            case: "dir onto a file, file onto a dir",
            upper: "",
            lowers: &["f a=1; d d"],
            ops: "rename d a => ENOTDIR; rename a d => EISDIR",
            merged: "a=1 d/",
            disk: "",
        },
        Case {
            case: "missing source",
            upper: "",
            lowers: &["f a=1"],
            ops: "rename b c => ENOENT; rename a/b c => ENOTDIR",
            merged: "a=1",
            disk: "",
        },
    ]);
}

// ------------------------------------------------------------------------------------------
// st_ino and nlink

#[test]
fn st_ino_is_stable_across_copy_up_rename_and_remount() {
    let mut fx = Fx::new(Some(""), &["f a=1; f d/x=2; d p"]);
    let a = fx.attr("a").expect("a").ino;
    let d = fx.attr("d").expect("d").ino;
    let x = fx.attr("d/x").expect("d/x").ino;
    assert_eq!(
        a,
        std::fs::metadata(fx.low(0, "a")).expect("lower").ino(),
        "st_ino of a lower file"
    );
    fx.run_all("changes", "chmod a 0600");
    assert_eq!(fx.attr("a").expect("a").ino, a, "after copy-up");
    assert_ne!(
        std::fs::metadata(fx.up("a")).expect("upper").ino(),
        a,
        "the copy is a new inode"
    );
    fx.run_all("changes", "rename a p/b; rename d p/e");
    let check = |fx: &Fx, when: &str| {
        assert_eq!(fx.attr("p/b").expect("p/b").ino, a, "file {when}");
        assert_eq!(fx.attr("p/e").expect("p/e").ino, d, "dir {when}");
        assert_eq!(
            fx.attr("p/e/x").expect("p/e/x").ino,
            x,
            "file in a renamed dir {when}"
        );
        assert_eq!(fx.show("a"), "ENOENT");
        assert_eq!(fx.show("d"), "ENOENT");
    };
    check(&fx, "after rename");
    fx.remount();
    check(&fx, "after remount");
    fx.finish("st_ino");
}

#[test]
fn lower_hard_links_share_st_ino_and_nlink_until_one_is_copied_up() {
    let mut fx = Fx::new(Some(""), &["f a=1; h b=a; f c=3"]);
    let (a, b) = (fx.attr("a").expect("a"), fx.attr("b").expect("b"));
    assert_eq!((a.nlink, b.nlink), (2, 2), "nlink of lower hard links");
    assert_eq!(a.ino, b.ino, "lower hard links share st_ino");
    assert_eq!(fx.attr("c").expect("c").nlink, 1);
    fx.run_all("copy-up", "write a=new");
    for round in ["same mount", "after remount"] {
        let (a2, b2) = (fx.attr("a").expect("a"), fx.attr("b").expect("b"));
        assert_ne!(a2.ino, b2.ino, "{round}: copy-up (index=off) breaks the link");
        assert_eq!(b2.ino, b.ino, "{round}: the lower name keeps its st_ino");
        assert_eq!((a2.nlink, b2.nlink), (1, 2), "{round}: nlink");
        assert_eq!(fx.cat("a").expect("a"), "new", "{round}");
        assert_eq!(
            fx.cat("b").expect("b"),
            "1",
            "{round}: the other name keeps the lower data"
        );
        fx.remount();
    }
    fx.finish("hard links");
}

// ------------------------------------------------------------------------------------------
// open handles

#[test]
fn read_only_handle_opened_before_copy_up_reads_the_new_data() {
    // (case, how the file is copied up and changed)
    let rows: &[(&str, &str)] = &[
        ("write through another handle", "write a=new-data"),
        ("chmod, then write", "chmod a 0600; write a=new-data"),
    ];
    for (case, ops) in rows {
        let fx = Fx::new(Some(""), &["f a=old"]);
        let id = fx.id("a").expect("a");
        let fh = fx.u.open(&ROOT, id, libc::O_RDONLY).expect("open");
        assert_eq!(fx.u.read(fh, 0, 100).expect("read"), b"old", "{case}: before");
        fx.run_all(case, ops);
        assert_eq!(fx.u.read(fh, 0, 100).expect("read"), b"new-data", "{case}: after");
        fx.u.release(fh);
        assert_eq!(
            std::fs::read(fx.low(0, "a")).expect("lower"),
            b"old",
            "{case}: lower"
        );
        fx.finish(case);
    }
}

#[test]
fn handle_of_an_unlinked_file_still_writes_and_reports_nlink_0() {
    // (case, upper, lowers, disk after unlink)
    let rows: &[(&str, &str, &[&str], &str)] = &[
        ("lower file", "", &["f a=lower"], "a(wh)"),
        ("upper-only file", "f a=upper", &["f b=1"], ""),
        ("upper file over lower", "f a=upper", &["f a=lower"], "a(wh)"),
    ];
    for (case, upper, lowers, disk) in rows {
        let fx = Fx::new(Some(upper), lowers);
        let id = fx.id("a").expect("a");
        let fh = fx.u.open(&ROOT, id, libc::O_RDWR).expect("open");
        fx.run_all(case, "unlink a");
        assert_eq!(
            fx.u.write(&ROOT, 1, fh, 0, b"written after unlink")
                .expect("write"),
            20,
            "{case}"
        );
        assert_eq!(
            fx.u.read(fh, 0, 100).expect("read"),
            b"written after unlink",
            "{case}"
        );
        for with_fh in [Some(fh), None] {
            let a =
                fx.u.getattr(id, with_fh)
                    .unwrap_or_else(|e| panic!("{case}: getattr {with_fh:?}: {e}"));
            assert_eq!((a.nlink, a.size), (0, 20), "{case}: getattr {with_fh:?}");
        }
        assert_eq!(fx.show("a"), "ENOENT", "{case}");
        assert_tokens(case, &disk_tree(fx.upper.as_ref().expect("upper")), disk);
        fx.u.release(fh);
        fx.finish(case);
    }
}

// ------------------------------------------------------------------------------------------
// xattrs

#[test]
fn user_set_overlay_xattrs_are_stored_escaped_and_private_ones_never_listed() {
    let fx = Fx::new(
        Some(""),
        &["f a=1; x a user.k=v; f n=1; x n trusted.overlay.overlay.nested=yes; o op; f d/x=1; f e/y=1"],
    );
    let listed = |path: &str| -> Vec<String> {
        let id = fx.id(path).expect("lookup");
        let raw = fx.u.listxattr(id).expect("listxattr");
        let mut v: Vec<String> = raw
            .split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect();
        v.sort();
        v
    };
    let get = |path: &str, n: &str| -> Result<String, String> {
        let id = fx.id(path)?;
        ok(fx.u.getxattr(id, name(n))).map(|v| String::from_utf8_lossy(&v).into_owned())
    };
    // A user's trusted.overlay.* is escaped on disk and read back by its own name.
    let id = fx.id("a").expect("a");
    fx.u.setxattr(&ROOT, id, name("trusted.overlay.foo"), b"bar", 0)
        .expect("setxattr");
    fx.u.setxattr(&ROOT, id, name("trusted.overlay.opaque"), b"y", 0)
        .expect("setxattr");
    let up = fx.up("a");
    assert_eq!(
        get_xattr(&up, "trusted.overlay.overlay.foo").as_deref(),
        Some(&b"bar"[..]),
        "escaped on disk"
    );
    assert_eq!(
        get_xattr(&up, "trusted.overlay.foo"),
        None,
        "never stored unescaped"
    );
    assert_eq!(
        get_xattr(&up, "trusted.overlay.opaque"),
        None,
        "never stored unescaped"
    );
    assert_eq!(get("a", "trusted.overlay.foo"), Ok("bar".into()));
    assert_eq!(get("a", "trusted.overlay.overlay.foo"), Err("ENODATA".into()));
    assert_eq!(get("a", "user.k"), Ok("v".into()));
    assert_eq!(
        listed("a"),
        ["trusted.overlay.foo", "trusted.overlay.opaque", "user.k"]
    );
    fx.u.removexattr(id, name("trusted.overlay.foo"))
        .expect("removexattr");
    assert_eq!(
        get_xattr(&up, "trusted.overlay.overlay.foo"),
        None,
        "removed on disk"
    );
    assert_eq!(listed("a"), ["trusted.overlay.opaque", "user.k"]);
    // An escaped xattr in a lower (a nested overlay's layer) shows by its user name.
    assert_eq!(get("n", "trusted.overlay.nested"), Ok("yes".into()));
    assert_eq!(listed("n"), ["trusted.overlay.nested"]);
    // The overlay's own xattrs (opaque, redirect, origin) are never shown or writable.
    fx.run_all(
        "private",
        "unlink d/x; rmdir d; mkdir d; rename e f; chmod n 0600",
    );
    assert!(
        get_xattr(&fx.up("d"), "trusted.overlay.opaque").is_some(),
        "d is opaque on disk"
    );
    assert!(
        get_xattr(&fx.up("f"), "trusted.overlay.redirect").is_some(),
        "f has a redirect on disk"
    );
    for p in ["op", "d", "f", "n"] {
        let shown = listed(p);
        assert!(
            shown
                .iter()
                .all(|n| n.starts_with("user.") || n == "trusted.overlay.nested"),
            "{p}: private xattrs listed: {shown:?}"
        );
        for private in [
            "trusted.overlay.opaque",
            "trusted.overlay.redirect",
            "trusted.verlay.origin",
        ] {
            assert_eq!(get(p, private), Err("ENODATA".into()), "{p}: {private}");
        }
    }
    let nid = fx.id("n").expect("n");
    assert_eq!(
        ok(fx.u.setxattr(&ROOT, nid, name("trusted.verlay.origin"), b"1", 0)),
        Err("EPERM".into())
    );
    // Removing an xattr the file lacks fails without copying it up.
    let yid = fx.id("f/y").expect("f/y");
    assert_eq!(
        ok(fx.u.removexattr(yid, name("user.none"))),
        Err("ENODATA".into())
    );
    assert!(!fx.up("f/y").exists(), "removexattr of a missing xattr copied up");
    fx.finish("xattrs");
}

/// File capabilities (VFS_CAP_REVISION_2): CAP_NET_BIND_SERVICE permitted.
const CAPS_V2: [u8; 20] = [0, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

#[test]
fn absent_file_capabilities_are_remembered_until_something_adds_them() {
    // The kernel asks for security.capability before every write; its absence is cached
    // per node, and every way of giving the object capabilities must show through.
    // Node ids are looked up once, as the kernel does while it holds the inode: a fresh
    // lookup would forget the cached answer anyway.
    let fx = Fx::new(Some(""), &["f a=1; f b=2; f c=3"]);
    let caps = |id: u64| -> Result<Vec<u8>, String> { ok(fx.u.getxattr(id, name("security.capability"))) };
    let (a, b) = (fx.id("a").expect("a"), fx.id("b").expect("b"));
    for id in [a, b] {
        assert_eq!(caps(id), Err("ENODATA".into()), "{id}: a lower file without caps");
        assert_eq!(caps(id), Err("ENODATA".into()), "{id}: asked again (cached)");
    }
    // setxattr (with its copy-up) and removexattr through the union.
    fx.u.setxattr(&ROOT, a, name("security.capability"), &CAPS_V2, 0)
        .expect("setxattr");
    assert_eq!(caps(a), Ok(CAPS_V2.to_vec()), "set after a cached miss");
    fx.u.removexattr(a, name("security.capability"))
        .expect("removexattr");
    assert_eq!(caps(a), Err("ENODATA".into()), "removed");
    assert_eq!(caps(a), Err("ENODATA".into()), "removed, cached");
    fx.u.setxattr(&ROOT, a, name("security.capability"), &CAPS_V2, 0)
        .expect("setxattr on the upper copy");
    assert_eq!(
        caps(a),
        Ok(CAPS_V2.to_vec()),
        "set on the upper after a cached miss"
    );
    // Another object with caps takes the name of one known to have none.
    let c = fx.id("c").expect("c");
    assert_eq!(caps(c), Err("ENODATA".into()), "c");
    fx.run_all("rename", "rename a c");
    let c = fx.id("c").expect("c after rename");
    assert_eq!(caps(c), Ok(CAPS_V2.to_vec()), "renamed over a cached miss");
    // Copy-up carries the lower's (absent) caps; the cache stays right.
    fx.run_all("chmod", "chmod b 0600");
    assert_eq!(caps(b), Err("ENODATA".into()), "after copy-up");
    fx.finish("caps");
}

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
