//! Layers from the compact spec (see the `common` module doc), materialized in kernel or
//! OCI form, and the rewrite of OCI markers into kernel form.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::fmt;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::*;

/// Base mtime of layer entries (2021-01-01): far older than any test start, so the
/// comparison checks that copy-up preserves it.
const LAYER_MTIME_BASE: i64 = 1_609_459_200;
/// Name of the OCI opaque marker (`.wh..wh..opq`) and the OCI whiteout prefix.
pub const OCI_OPAQUE: &str = ".wh..wh..opq";
pub const OCI_WHITEOUT_PREFIX: &str = ".wh.";

#[derive(Clone, Debug, PartialEq)]
pub enum Content {
    Bytes(Vec<u8>),
    Sparse { size: u64, chunks: Vec<(u64, Vec<u8>)> },
}

#[derive(Clone, Debug, PartialEq)]
pub enum Entry {
    File(String, Content),
    Dir(String),
    Symlink(String, String),
    /// new name, existing name
    Hardlink(String, String),
    Fifo(String),
    Char(String, u32, u32),
    /// path, OCI form for the subject
    Whiteout(String, bool),
    /// path, OCI form for the subject
    Opaque(String, bool),
    Xattr(String, String, String),
    Meta(String, Option<u32>, Option<(u32, u32)>),
    /// atime and mtime (seconds, nanoseconds), applied after every other entry
    Times(String, i64, i64),
}

impl Entry {
    pub fn path(&self) -> &str {
        match self {
            Entry::File(p, _)
            | Entry::Dir(p)
            | Entry::Symlink(p, _)
            | Entry::Hardlink(p, _)
            | Entry::Fifo(p)
            | Entry::Char(p, _, _)
            | Entry::Whiteout(p, _)
            | Entry::Opaque(p, _)
            | Entry::Xattr(p, _, _)
            | Entry::Meta(p, _, _)
            | Entry::Times(p, _, _) => p,
        }
    }
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sp = |p: &str| short_path(p);
        match self {
            Entry::File(p, Content::Bytes(b)) if b.is_empty() => write!(f, "f {}", sp(p)),
            Entry::File(p, Content::Bytes(b)) => {
                write!(f, "f {}={}", sp(p), String::from_utf8_lossy(b))
            }
            Entry::File(p, Content::Sparse { size, chunks }) => {
                write!(f, "z {} {}", sp(p), size)?;
                for (o, d) in chunks {
                    write!(f, " {}:{}", o, String::from_utf8_lossy(d))?;
                }
                Ok(())
            }
            Entry::Dir(p) => write!(f, "d {}", sp(p)),
            Entry::Symlink(p, t) => write!(f, "s {}->{}", sp(p), sp(t)),
            Entry::Hardlink(p, t) => write!(f, "h {}={}", sp(p), sp(t)),
            Entry::Fifo(p) => write!(f, "p {}", sp(p)),
            Entry::Char(p, a, b) => write!(f, "c {} {}:{}", sp(p), a, b),
            Entry::Whiteout(p, oci) => write!(f, "{} {}", if *oci { 'W' } else { 'w' }, sp(p)),
            Entry::Opaque(p, oci) => write!(f, "{} {}", if *oci { 'O' } else { 'o' }, sp(p)),
            Entry::Xattr(p, k, v) => write!(f, "x {} {}={}", sp(p), k, v),
            Entry::Meta(p, m, o) => {
                match m {
                    Some(m) => write!(f, "m {} {:04o}", sp(p), m)?,
                    None => write!(f, "m {} -", sp(p))?,
                }
                if let Some((u, g)) = o {
                    write!(f, " {u}:{g}")?;
                }
                Ok(())
            }
            Entry::Times(p, sec, nsec) => write!(f, "t {} {sec}.{nsec:09}", sp(p)),
        }
    }
}

pub fn parse_layer(spec: &str) -> Vec<Entry> {
    let mut out = Vec::new();
    for item in spec.split([';', '\n']).map(str::trim).filter(|s| !s.is_empty()) {
        let (tag, rest) = item
            .split_once(' ')
            .unwrap_or_else(|| panic!("bad layer entry {item:?}"));
        let rest = rest.trim();
        let words: Vec<&str> = rest.split_whitespace().collect();
        let bad = || -> ! { panic!("bad layer entry {item:?}") };
        let mode = |s: &str| u32::from_str_radix(s, 8).unwrap_or_else(|_| bad());
        let owner = |s: &str| {
            let (u, g) = s.split_once(':').unwrap_or_else(|| bad());
            (
                u.parse().unwrap_or_else(|_| bad()),
                g.parse().unwrap_or_else(|_| bad()),
            )
        };
        match tag {
            "f" => match rest.split_once('=') {
                Some((p, t)) => out.push(Entry::File(expand_path(p), Content::Bytes(t.as_bytes().to_vec()))),
                None => out.push(Entry::File(expand_path(rest), Content::Bytes(vec![]))),
            },
            "z" => {
                let size = words.get(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| bad());
                let chunks = words[2..]
                    .iter()
                    .map(|c| {
                        let (o, d) = c.split_once(':').unwrap_or_else(|| bad());
                        (o.parse().unwrap_or_else(|_| bad()), d.as_bytes().to_vec())
                    })
                    .collect();
                out.push(Entry::File(
                    expand_path(words[0]),
                    Content::Sparse { size, chunks },
                ));
            }
            "d" => {
                out.push(Entry::Dir(expand_path(words[0])));
                if let Some(m) = words.get(1) {
                    out.push(Entry::Meta(
                        expand_path(words[0]),
                        Some(mode(m)),
                        words.get(2).map(|o| owner(o)),
                    ));
                }
            }
            "s" => {
                let (p, t) = rest.split_once("->").unwrap_or_else(|| bad());
                out.push(Entry::Symlink(expand_path(p.trim()), expand_path(t.trim())));
            }
            "h" => {
                let (p, t) = rest.split_once('=').unwrap_or_else(|| bad());
                out.push(Entry::Hardlink(expand_path(p.trim()), expand_path(t.trim())));
            }
            "p" => out.push(Entry::Fifo(expand_path(rest))),
            "c" => {
                let (a, b) = owner(words.get(1).unwrap_or_else(|| bad()));
                out.push(Entry::Char(expand_path(words[0]), a, b));
            }
            "w" | "W" => out.push(Entry::Whiteout(expand_path(rest), tag == "W")),
            "o" | "O" => out.push(Entry::Opaque(expand_path(rest), tag == "O")),
            "x" => {
                let (k, v) = words
                    .get(1)
                    .and_then(|kv| kv.split_once('='))
                    .unwrap_or_else(|| bad());
                out.push(Entry::Xattr(expand_path(words[0]), k.to_string(), v.to_string()));
            }
            "m" => {
                let m = match words.get(1) {
                    Some(&"-") => None,
                    Some(m) => Some(mode(m)),
                    None => bad(),
                };
                out.push(Entry::Meta(
                    expand_path(words[0]),
                    m,
                    words.get(2).map(|o| owner(o)),
                ));
            }
            "t" => {
                let t = words.get(1).unwrap_or_else(|| bad());
                let (sec, nsec) = t.split_once('.').unwrap_or((t, "0"));
                out.push(Entry::Times(
                    expand_path(words[0]),
                    sec.parse().unwrap_or_else(|_| bad()),
                    format!("{nsec:0<9}").parse().unwrap_or_else(|_| bad()),
                ));
            }
            _ => bad(),
        }
    }
    out
}

/// Lower layers, top first (the order of `lowerdir=`).
#[derive(Clone, Debug, Default)]
pub struct Layers {
    pub lowers: Vec<Vec<Entry>>,
}

impl Layers {
    /// `specs[0]` is the top lower layer.
    pub fn parse(specs: &[&str]) -> Layers {
        Layers {
            lowers: specs.iter().map(|s| parse_layer(s)).collect(),
        }
    }
    /// Every path named in any layer, with its ancestors: names worth poking at, hidden or not.
    pub fn all_paths(&self) -> Vec<String> {
        let mut set = BTreeSet::new();
        for l in &self.lowers {
            for e in l {
                let mut p = e.path().to_string();
                loop {
                    set.insert(p.clone());
                    match p.rsplit_once('/') {
                        Some((a, _)) => p = a.to_string(),
                        None => break,
                    }
                }
            }
        }
        set.into_iter().collect()
    }
}

impl fmt::Display for Layers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, l) in self.lowers.iter().enumerate() {
            let items: Vec<String> = l.iter().map(|e| e.to_string()).collect();
            writeln!(f, "  lower {i}: \"{}\"", items.join("; "))?;
        }
        Ok(())
    }
}

pub fn check(r: libc::c_int, what: &str, p: &Path) {
    assert!(r == 0, "{what} {}: {}", p.display(), errname(last_errno()));
}

pub fn ensure_dir(p: &Path) {
    if std::fs::symlink_metadata(p).is_err() {
        if let Some(parent) = p.parent() {
            ensure_dir(parent);
        }
        std::fs::create_dir(p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        chmod(p, 0o755);
    }
}

pub fn chmod(p: &Path, mode: u32) {
    // SAFETY: valid C string; plain syscall.
    check(unsafe { libc::chmod(cpath(p).as_ptr(), mode) }, "chmod", p);
}

pub fn lchown(p: &Path, uid: u32, gid: u32) {
    // SAFETY: valid C string; plain syscall.
    check(unsafe { libc::lchown(cpath(p).as_ptr(), uid, gid) }, "lchown", p);
}

pub fn mknod(p: &Path, mode: u32, major: u32, minor: u32) {
    // SAFETY: valid C string; plain syscall.
    let r = unsafe { libc::mknod(cpath(p).as_ptr(), mode, libc::makedev(major, minor)) };
    check(r, "mknod", p);
}

pub fn lsetxattr(p: &Path, name: &str, value: &[u8]) {
    let n = CString::new(name).unwrap();
    // SAFETY: valid C strings and buffer.
    let r = unsafe {
        libc::lsetxattr(
            cpath(p).as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    check(r, &format!("setxattr {name}"), p);
}

pub fn set_times(p: &Path, sec: i64, nsec: i64) {
    let ts = [
        libc::timespec {
            tv_sec: sec,
            tv_nsec: nsec,
        },
        libc::timespec {
            tv_sec: sec,
            tv_nsec: nsec,
        },
    ];
    // SAFETY: valid C string and a two-element timespec array.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            cpath(p).as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    check(r, "utimensat", p);
}

/// Which form whiteouts and opaque dirs take on disk.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Format {
    /// char 0/0 whiteouts, trusted.overlay.opaque=y: what kernel overlayfs reads.
    Kernel,
    /// `W`/`O` entries in OCI form (`.wh.NAME`, `.wh..wh..opq`), the rest kernel form.
    Mixed,
}

/// Build one layer in `dir` (which must exist). `salt` varies the fixed mtimes per layer.
pub fn materialize(entries: &[Entry], dir: &Path, format: Format, salt: u64) {
    chmod(dir, 0o755);
    for e in entries {
        let p = dir.join(e.path());
        if let Some(parent) = p.parent() {
            ensure_dir(parent);
        }
        match e {
            Entry::File(_, Content::Bytes(b)) => {
                std::fs::write(&p, b).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
                chmod(&p, 0o644);
            }
            Entry::File(_, Content::Sparse { size, chunks }) => {
                let f = std::fs::File::create(&p).unwrap();
                f.set_len(*size).unwrap();
                for (o, d) in chunks {
                    f.write_all_at(d, *o).unwrap();
                }
                chmod(&p, 0o644);
            }
            Entry::Dir(_) => ensure_dir(&p),
            Entry::Symlink(_, t) => {
                std::os::unix::fs::symlink(t, &p).unwrap_or_else(|e| panic!("symlink {}: {e}", p.display()))
            }
            Entry::Hardlink(_, t) => {
                std::fs::hard_link(dir.join(t), &p).unwrap_or_else(|e| panic!("link {}: {e}", p.display()))
            }
            Entry::Fifo(_) => mknod(&p, libc::S_IFIFO | 0o644, 0, 0),
            Entry::Char(_, a, b) => mknod(&p, libc::S_IFCHR | 0o644, *a, *b),
            Entry::Whiteout(_, oci) => {
                // An OCI whiteout of a name longer than NAME_MAX - 4 cannot exist on disk.
                let fits = p
                    .file_name()
                    .is_some_and(|n| n.len() + OCI_WHITEOUT_PREFIX.len() <= 255);
                if *oci && format == Format::Mixed && fits {
                    let name = p.file_name().unwrap().to_str().unwrap();
                    let w = p.with_file_name(format!("{OCI_WHITEOUT_PREFIX}{name}"));
                    std::fs::write(&w, b"").unwrap_or_else(|e| panic!("write {}: {e}", w.display()));
                } else {
                    mknod(&p, libc::S_IFCHR, 0, 0);
                }
            }
            Entry::Opaque(_, oci) => {
                ensure_dir(&p);
                if *oci && format == Format::Mixed {
                    std::fs::write(p.join(OCI_OPAQUE), b"").unwrap();
                } else {
                    lsetxattr(&p, "trusted.overlay.opaque", b"y");
                }
            }
            Entry::Xattr(_, k, v) => lsetxattr(&p, &expand_path(k), &xattr_value(v)),
            Entry::Meta(_, mode, owner) => {
                let is_link = std::fs::symlink_metadata(&p)
                    .map(|m| m.file_type().is_symlink())
                    .unwrap_or(false);
                if let Some((u, g)) = owner {
                    lchown(&p, *u, *g);
                }
                if let (Some(m), false) = (mode, is_link) {
                    chmod(&p, *m);
                }
            }
            Entry::Times(..) => {}
        }
    }
    // Fixed, old mtimes everywhere (children before parents), so copy-up must preserve them.
    let mut all = Vec::new();
    walk_paths(dir, "", &mut all);
    for rel in all.iter().rev() {
        let h = fnv(format!("{salt}/{rel}").as_bytes());
        set_times(
            &dir.join(rel),
            LAYER_MTIME_BASE + (h % 10_000_000) as i64,
            ((h >> 32) % 1_000_000_000) as i64,
        );
    }
    set_times(dir, LAYER_MTIME_BASE, 0);
    for e in entries {
        if let Entry::Times(p, sec, nsec) = e {
            set_times(&dir.join(p), *sec, *nsec);
        }
    }
}

/// Pre-order list of relative paths under `dir`, sorted per directory, without following symlinks.
fn walk_paths(dir: &Path, rel: &str, out: &mut Vec<String>) {
    let mut names: Vec<String> = match std::fs::read_dir(dir.join(rel)) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => return,
    };
    names.sort();
    for n in names {
        let r = if rel.is_empty() { n } else { format!("{rel}/{n}") };
        out.push(r.clone());
        if std::fs::symlink_metadata(dir.join(&r))
            .map(|m| m.is_dir())
            .unwrap_or(false)
        {
            walk_paths(dir, &r, out);
        }
    }
}

/// Rewrite OCI markers in a materialized layer into kernel form, in place, keeping the inodes
/// of everything else (so `overlay.origin` handles in an upper still resolve) and dir mtimes.
pub fn normalize_to_kernel_format(dir: &Path) {
    let mut all = Vec::new();
    walk_paths(dir, "", &mut all);
    for rel in all {
        let p = dir.join(&rel);
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        if !name.starts_with(OCI_WHITEOUT_PREFIX) {
            continue;
        }
        let parent = p.parent().unwrap().to_path_buf();
        let pm = std::fs::symlink_metadata(&parent).unwrap();
        std::fs::remove_file(&p).unwrap();
        if name == OCI_OPAQUE {
            lsetxattr(&parent, "trusted.overlay.opaque", b"y");
        } else {
            mknod(
                &parent.join(&name[OCI_WHITEOUT_PREFIX.len()..]),
                libc::S_IFCHR,
                0,
                0,
            );
        }
        set_times(&parent, pm.mtime(), pm.mtime_nsec());
    }
}
