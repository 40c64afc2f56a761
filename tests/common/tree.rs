//! Tree snapshots of a mount and their path-by-path comparison.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::fmt;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::*;

#[derive(Clone, Debug, PartialEq, Default)]
pub struct Node {
    pub kind: char,
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub nlink: u64,
    pub rdev: (u32, u32),
    pub hash: u64,
    pub target: String,
    pub xattrs: Vec<(String, String)>,
    pub mtime_ns: i128,
    pub ino: u64,
    /// First path (sorted) with the same st_ino: hard-link structure, comparable across mounts.
    pub link_group: String,
    pub error: String,
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.error.is_empty() {
            return write!(f, "error {}", self.error);
        }
        write!(
            f,
            "{} {:04o} {}:{} nlink={}",
            self.kind, self.perm, self.uid, self.gid, self.nlink
        )?;
        match self.kind {
            'f' => write!(f, " size={} hash={:016x}", self.size, self.hash),
            'l' => write!(f, " -> {}", short_path(&self.target)),
            'c' | 'b' => write!(f, " rdev={}:{}", self.rdev.0, self.rdev.1),
            _ => Ok(()),
        }
    }
}

pub type Snapshot = BTreeMap<String, Node>;

pub fn kind_of(mode: u32) -> char {
    match mode & libc::S_IFMT {
        libc::S_IFREG => 'f',
        libc::S_IFDIR => 'd',
        libc::S_IFLNK => 'l',
        libc::S_IFIFO => 'p',
        libc::S_IFCHR => 'c',
        libc::S_IFBLK => 'b',
        libc::S_IFSOCK => 's',
        _ => '?',
    }
}

/// An xattr value from its compact spec form: `hex:0a0b..` (binary, e.g. a POSIX ACL),
/// `TEXT*N` (TEXT repeated N times: long values), else the text itself.
pub fn xattr_value(v: &str) -> Vec<u8> {
    if let Some(h) = v.strip_prefix("hex:") {
        return (0..h.len() / 2)
            .map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16).expect("hex xattr value"))
            .collect();
    }
    match v.rsplit_once('*') {
        Some((t, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
            t.repeat(n.parse().expect("digits")).into_bytes()
        }
        _ => v.as_bytes().to_vec(),
    }
}

/// user.*, security.* and system.posix_acl_* xattrs, sorted (trusted.* belongs to overlayfs
/// and must stay hidden); values that are not UTF-8 (ACLs) shown in hex.
pub fn user_xattrs(p: &Path) -> Result<Vec<(String, String)>, i32> {
    let c = cpath(p);
    let mut buf = vec![0u8; 65536];
    // SAFETY: valid C string and buffer of the given size.
    let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(last_errno());
    }
    let mut out = Vec::new();
    for name in buf[..n as usize].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let s = String::from_utf8_lossy(name).into_owned();
        if !(s.starts_with("user.") || s.starts_with("security.") || s.starts_with("system.posix_acl_")) {
            continue;
        }
        let cn = CString::new(name).unwrap();
        let mut v = vec![0u8; 65536];
        // SAFETY: valid C strings and buffer of the given size.
        let m = unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        let val = if m < 0 {
            format!("<{}>", errname(last_errno()))
        } else {
            match std::str::from_utf8(&v[..m as usize]) {
                Ok(t) => t.to_string(),
                Err(_) => v[..m as usize].iter().map(|b| format!("{b:02x}")).collect(),
            }
        };
        out.push((short_path(&s), val));
    }
    out.sort();
    Ok(out)
}

pub fn read_all(p: &Path) -> Result<Vec<u8>, i32> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(p)
        .map_err(|e| e.raw_os_error().unwrap_or(0))?;
    let mut v = Vec::new();
    f.read_to_end(&mut v).map_err(|e| e.raw_os_error().unwrap_or(0))?;
    Ok(v)
}

pub fn node_of(p: &Path) -> Node {
    let m = match std::fs::symlink_metadata(p) {
        Ok(m) => m,
        Err(e) => {
            return Node {
                error: format!("lstat {}", errname(e.raw_os_error().unwrap_or(0))),
                ..Node::default()
            }
        }
    };
    let kind = kind_of(m.mode());
    let mut n = Node {
        kind,
        perm: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        size: m.size(),
        nlink: m.nlink(),
        mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
        ino: m.ino(),
        ..Node::default()
    };
    if kind == 'c' || kind == 'b' {
        n.rdev = (libc::major(m.rdev()), libc::minor(m.rdev()));
    }
    match kind {
        'f' => match read_all(p) {
            Ok(d) => n.hash = fnv(&d),
            Err(e) => n.error = format!("read {}", errname(e)),
        },
        'l' => match std::fs::read_link(p) {
            Ok(t) => n.target = t.to_string_lossy().into_owned(),
            Err(e) => n.error = format!("readlink {e}"),
        },
        _ => {}
    }
    match user_xattrs(p) {
        Ok(x) => n.xattrs = x,
        Err(e) => n.error = format!("listxattr {}", errname(e)),
    }
    n
}

/// Everything under `root` (root itself as "."), without following symlinks.
pub fn snapshot(root: &Path) -> Snapshot {
    let mut snap = Snapshot::new();
    snap.insert(".".to_string(), node_of(root));
    fn rec(root: &Path, rel: &str, snap: &mut Snapshot) {
        let dir = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(rel)
        };
        let mut names: Vec<String> = match std::fs::read_dir(&dir) {
            Ok(rd) => match rd
                .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect::<Result<Vec<_>, _>>()
            {
                Ok(v) => v,
                Err(e) => {
                    let key = if rel.is_empty() { "." } else { rel };
                    snap.get_mut(key).unwrap().error = format!("readdir {e}");
                    return;
                }
            },
            Err(e) => {
                let key = if rel.is_empty() { "." } else { rel };
                snap.get_mut(key).unwrap().error = format!("opendir {e}");
                return;
            }
        };
        names.sort();
        for name in names {
            let r = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let n = node_of(&root.join(&r));
            // Kernel overlayfs lists the whiteouts of a lower directory that is not merged
            // (it iterates the real directory), yet lookup says ENOENT: such a name is not
            // part of the merged view, and verlay does not list it.
            if n.error == "lstat ENOENT" {
                continue;
            }
            let is_dir = n.kind == 'd';
            snap.insert(r.clone(), n);
            if is_dir {
                rec(root, &r, snap);
            }
        }
    }
    rec(root, "", &mut snap);
    let mut first: BTreeMap<u64, String> = BTreeMap::new();
    for (p, n) in &snap {
        if n.kind != 'd' && n.error.is_empty() {
            first.entry(n.ino).or_insert_with(|| p.clone());
        }
    }
    for n in snap.values_mut() {
        if n.kind != 'd' {
            n.link_group = first.get(&n.ino).cloned().unwrap_or_default();
        }
    }
    snap
}

/// Field-by-field differences of one path; mtime only where the reference's is older than
/// `start_ns` (preserved from a layer or set by a fixed utime).
pub fn node_diffs(r: &Node, s: &Node, start_ns: i128) -> Vec<String> {
    let mut d = Vec::new();
    if r.error != s.error {
        d.push(format!("error ref={:?} sub={:?}", r.error, s.error));
    }
    if r.kind != s.kind {
        d.push(format!("type ref={} sub={}", r, s));
        return d;
    }
    let mut f = |name: &str, a: String, b: String| {
        if a != b && !ignored(name) {
            d.push(format!("{name} ref={a} sub={b}"));
        }
    };
    f("mode", format!("{:04o}", r.perm), format!("{:04o}", s.perm));
    f(
        "owner",
        format!("{}:{}", r.uid, r.gid),
        format!("{}:{}", s.uid, s.gid),
    );
    f(
        if r.kind == 'd' { "dir-nlink" } else { "nlink" },
        r.nlink.to_string(),
        s.nlink.to_string(),
    );
    if r.kind != 'd' {
        f("size", r.size.to_string(), s.size.to_string());
        f("link-group", short_path(&r.link_group), short_path(&s.link_group));
    }
    f("content", format!("{:016x}", r.hash), format!("{:016x}", s.hash));
    f("target", short_path(&r.target), short_path(&s.target));
    f("rdev", format!("{:?}", r.rdev), format!("{:?}", s.rdev));
    f("xattrs", format!("{:?}", r.xattrs), format!("{:?}", s.xattrs));
    if r.mtime_ns < start_ns {
        f("mtime", r.mtime_ns.to_string(), s.mtime_ns.to_string());
    }
    d
}

/// First 30 differences, path by path, or Ok.
pub fn compare(r: &Snapshot, s: &Snapshot, start_ns: i128) -> Result<(), String> {
    let mut lines = Vec::new();
    let keys: BTreeSet<&String> = r.keys().chain(s.keys()).collect();
    for k in keys {
        match (r.get(k), s.get(k)) {
            (Some(a), None) => lines.push(format!("  {}: only in ref ({a})", short_path(k))),
            (None, Some(b)) => lines.push(format!("  {}: only in sub ({b})", short_path(k))),
            (Some(a), Some(b)) => {
                for d in node_diffs(a, b, start_ns) {
                    lines.push(format!("  {}: {d}", short_path(k)));
                }
            }
            (None, None) => unreachable!(),
        }
    }
    if lines.is_empty() {
        return Ok(());
    }
    let total = lines.len();
    lines.truncate(30);
    Err(format!(
        "{total} difference(s){}\n{}",
        if total > 30 { ", first 30" } else { "" },
        lines.join("\n")
    ))
}

pub fn assert_same_tree(r: &Path, s: &Path, start_ns: i128) {
    if let Err(d) = compare(&snapshot(r), &snapshot(s), start_ns) {
        panic!(
            "merged trees differ (ref = {}, sub = {})\n{d}",
            r.display(),
            s.display()
        );
    }
}
