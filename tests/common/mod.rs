//! Machinery for differential mount tests: kernel overlayfs is the oracle, verlay the subject.
//!
//! Owns: layers built from a compact spec or a seeded generator, materialized twice (kernel
//! format for the reference, kernel/OCI mix for the subject); mount guards that always unmount;
//! tree snapshots and a comparison that prints a path-by-path diff. It never decides what is
//! correct by itself: whatever kernel overlayfs shows on the same layers is correct.
//!
//! Layer spec: entries separated by `;` or newlines, paths relative to the layer root, missing
//! parents created as 0755 dirs. A path component `NAME~N` is NAME padded with `x` to N bytes.
//!
//! ```text
//! f a=hello            regular file with content (no `=`: empty)
//! z big 1048576 4096:abc 65536:xyz   sparse file: size, then offset:content chunks
//! d sub 0755           directory (mode optional)
//! s link->target       symlink
//! h hl=a               hard link hl to a (same layer)
//! p fifo               fifo
//! c null 1:3           char device
//! w gone               whiteout, char 0/0 in both materializations
//! W gone2              whiteout, OCI `.wh.gone2` file for the subject
//! o dir                opaque dir, trusted.overlay.opaque=y in both
//! O dir2               opaque dir, OCI `.wh..wh..opq` for the subject
//! x a user.k=v         xattr
//! m a 4755 1000:1000   mode (or `-`) and optional owner uid:gid
//! ```
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::fmt;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a subject binary gets to show up in /proc/self/mountinfo.
/// Timestamps newer than (test start - this) are "now" and not compared.
const FRESH_MTIME_SLACK_NS: i128 = 60_000_000_000;
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(10);
/// Base mtime of layer entries (2021-01-01): far older than any test start, so the
/// comparison checks that copy-up preserves it.
const LAYER_MTIME_BASE: i64 = 1_609_459_200;
/// Name of the OCI opaque marker (`.wh..wh..opq`) and the OCI whiteout prefix.
pub const OCI_OPAQUE: &str = ".wh..wh..opq";
pub const OCI_WHITEOUT_PREFIX: &str = ".wh.";

// ---------------------------------------------------------------------------------------------
// small utilities

/// xorshift64* seeded through splitmix64, so seeds 0, 1, 2 give unrelated streams.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    pub fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }
    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len() as u64) as usize]
    }
}

/// FNV-1a: content identity for comparisons, not security.
pub fn fnv(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

pub fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

pub fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

pub fn errname(e: i32) -> String {
    let n = match e {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::EBADF => "EBADF",
        libc::EACCES => "EACCES",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::EMLINK => "EMLINK",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ELOOP => "ELOOP",
        libc::ENODATA => "ENODATA",
        libc::ENOTSUP => "ENOTSUP",
        libc::ERANGE => "ERANGE",
        libc::ENOMEM => "ENOMEM",
        libc::ENOSYS => "ENOSYS",
        libc::ESTALE => "ESTALE",
        libc::ECONNABORTED => "ECONNABORTED",
        libc::ENOTCONN => "ENOTCONN",
        libc::ETXTBSY => "ETXTBSY",
        libc::E2BIG => "E2BIG",
        _ => return format!("errno {e}"),
    };
    n.to_string()
}

/// Pad `name` with `x` to `len` bytes (the spec's `NAME~N`).
pub fn long_name(name: &str, len: usize) -> String {
    let mut s = name.to_string();
    while s.len() < len {
        s.push('x');
    }
    s
}

/// Expand `NAME~N` components of a path.
pub fn expand_path(p: &str) -> String {
    p.split('/')
        .map(|c| match c.rsplit_once('~') {
            Some((name, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
                long_name(name, n.parse().expect("digits"))
            }
            _ => c.to_string(),
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// Inverse of [`expand_path`] for display: long components become `NAME~N`.
pub fn short_path(p: &str) -> String {
    p.split('/')
        .map(|c| {
            if c.len() > 32 {
                format!("{}~{}", c.trim_end_matches('x'), c.len())
            } else {
                c.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// Each test thread gets its own umask (and cwd): the umask lives in fs_struct, which
/// `unshare(CLONE_FS)` makes private to the calling thread, so parallel tests can vary it.
pub fn private_umask_for_this_thread() {
    // SAFETY: unshare(CLONE_FS) only affects the calling thread's fs_struct.
    let r = unsafe { libc::unshare(libc::CLONE_FS) };
    assert_eq!(r, 0, "unshare(CLONE_FS): errno {}", last_errno());
}

pub fn now_ns() -> i128 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    d.as_nanos() as i128
}

/// Categories of difference that `VERLAY_DIFF_IGNORE` (comma-separated) can set aside while
/// exploring a subject with known divergences. Unset in CI: nothing is ignored.
pub const IGNORABLE: &[&str] = &[
    "dir-nlink",
    "nlink",
    "mode",
    "owner",
    "size",
    "link-group",
    "content",
    "target",
    "rdev",
    "xattrs",
    "mtime",
];

pub fn ignored(category: &str) -> bool {
    static SET: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    SET.get_or_init(|| {
        let v: Vec<String> = std::env::var("VERLAY_DIFF_IGNORE")
            .unwrap_or_default()
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        for c in &v {
            assert!(
                IGNORABLE.contains(&c.as_str()),
                "VERLAY_DIFF_IGNORE: unknown category {c:?}, known: {IGNORABLE:?}"
            );
        }
        v
    })
    .iter()
    .any(|c| c == category)
}

// ---------------------------------------------------------------------------------------------
// layers

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
            | Entry::Meta(p, _, _) => p,
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

fn check(r: libc::c_int, what: &str, p: &Path) {
    assert!(r == 0, "{what} {}: {}", p.display(), errname(last_errno()));
}

fn ensure_dir(p: &Path) {
    if std::fs::symlink_metadata(p).is_err() {
        if let Some(parent) = p.parent() {
            ensure_dir(parent);
        }
        std::fs::create_dir(p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        chmod(p, 0o755);
    }
}

fn chmod(p: &Path, mode: u32) {
    // SAFETY: valid C string; plain syscall.
    check(unsafe { libc::chmod(cpath(p).as_ptr(), mode) }, "chmod", p);
}

fn lchown(p: &Path, uid: u32, gid: u32) {
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

fn set_times(p: &Path, sec: i64, nsec: i64) {
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

/// Seeded random lower layers (2 or 3): nested dirs, files (some empty, some sparse), symlinks,
/// hard links, fifos, user xattrs, odd modes and owners, whiteouts and opaque dirs (both forms)
/// above the bottom layer, type changes across layers, 255-byte names.
pub fn random_layers(rng: &mut Rng) -> Layers {
    const NAMES: &[&str] = &["a", "b", "c", "d0", "d1", "d2", "f0", "f1", "s0", "p0", "e"];
    const FILE_MODES: &[u32] = &[
        0o644, 0o644, 0o600, 0o755, 0o4755, 0o2755, 0o6755, 0o000, 0o444, 0o700, 0o1644,
    ];
    const DIR_MODES: &[u32] = &[0o755, 0o755, 0o700, 0o2775, 0o1777, 0o711, 0o555, 0o000, 0o2770];
    const OWNERS: &[(u32, u32)] = &[
        (0, 0),
        (1000, 1000),
        (1001, 1001),
        (65534, 65534),
        (1000, 65534),
        (0, 1000),
    ];
    let nlayers = 2 + rng.below(2) as usize;
    // Merged kind of each path below the layer being generated ('f','d','l','p','c').
    let mut below: BTreeMap<String, char> = BTreeMap::new();
    let mut bottom_up = Vec::new();
    for li in 0..nlayers {
        let mut mine: BTreeMap<String, char> = BTreeMap::new();
        let mut entries = Vec::new();
        let n = 8 + rng.below(14);
        let mut tries = 0;
        while entries.len() < n as usize && tries < 200 {
            tries += 1;
            let reuse = li > 0 && !below.is_empty() && rng.chance(45);
            let path = if reuse {
                let keys: Vec<&String> = below.keys().collect();
                (*rng.pick(&keys)).clone()
            } else {
                let mut dirs: Vec<String> = vec![String::new()];
                dirs.extend(
                    below
                        .iter()
                        .chain(mine.iter())
                        .filter(|(p, k)| **k == 'd' && p.matches('/').count() < 2)
                        .map(|(p, _)| p.clone()),
                );
                let parent = rng.pick(&dirs).clone();
                let name = if rng.chance(4) {
                    long_name(&format!("L{}", rng.below(3)), 255)
                } else {
                    rng.pick(NAMES).to_string()
                };
                if parent.is_empty() {
                    name
                } else {
                    format!("{parent}/{name}")
                }
            };
            // No conflicts inside one layer: the path is new here and no ancestor is a non-dir here.
            if mine.contains_key(&path) {
                continue;
            }
            let ancestors: Vec<String> = {
                let mut v = Vec::new();
                let mut p = path.as_str();
                while let Some((a, _)) = p.rsplit_once('/') {
                    v.push(a.to_string());
                    p = a;
                }
                v
            };
            if ancestors.iter().any(|a| mine.get(a).is_some_and(|k| *k != 'd')) {
                continue;
            }
            for a in &ancestors {
                mine.entry(a.clone()).or_insert('d');
            }
            let below_kind = below.get(&path).copied();
            let roll = rng.below(100);
            let kind = if reuse && roll < 25 {
                entries.push(Entry::Whiteout(path.clone(), rng.chance(50)));
                mine.insert(path.clone(), 'w');
                continue;
            } else if reuse && below_kind == Some('d') && roll < 45 {
                entries.push(Entry::Opaque(path.clone(), rng.chance(50)));
                'd'
            } else {
                let files: Vec<String> = mine
                    .iter()
                    .filter(|(_, k)| **k == 'f')
                    .map(|(p, _)| p.clone())
                    .collect();
                match rng.below(100) {
                    0..=34 => {
                        let content = match rng.below(10) {
                            0..=1 => Content::Bytes(vec![]),
                            2 => Content::Sparse {
                                size: 1 << (12 + rng.below(9)),
                                chunks: vec![
                                    (rng.below(3) * 4096, b"head".to_vec()),
                                    (8192 + rng.below(4) * 512, format!("L{li}").into_bytes()),
                                ],
                            },
                            _ => Content::Bytes(
                                format!("layer{li}:{path}:{}", rng.below(1000))
                                    .repeat(1 + rng.below(40) as usize)
                                    .into_bytes(),
                            ),
                        };
                        entries.push(Entry::File(path.clone(), content));
                        'f'
                    }
                    35..=59 => {
                        entries.push(Entry::Dir(path.clone()));
                        'd'
                    }
                    60..=74 => {
                        let t = match rng.below(4) {
                            0 => "/nonexistent-verlay/passwd".to_string(),
                            1 => format!("../{}", rng.pick(NAMES)),
                            2 => "dangling".to_string(),
                            _ => rng.pick(NAMES).to_string(),
                        };
                        entries.push(Entry::Symlink(path.clone(), t));
                        'l'
                    }
                    75..=84 if !files.is_empty() => {
                        entries.push(Entry::Hardlink(path.clone(), rng.pick(&files).clone()));
                        'f'
                    }
                    85..=94 => {
                        entries.push(Entry::Fifo(path.clone()));
                        'p'
                    }
                    95..=96 => {
                        entries.push(Entry::Char(path.clone(), 1, 3));
                        'c'
                    }
                    _ => {
                        entries.push(Entry::File(path.clone(), Content::Bytes(b"plain".to_vec())));
                        'f'
                    }
                }
            };
            mine.insert(path.clone(), kind);
            if rng.chance(45) {
                let mode = match kind {
                    'd' => Some(*rng.pick(DIR_MODES)),
                    'l' => None,
                    _ => Some(*rng.pick(FILE_MODES)),
                };
                let owner = if rng.chance(70) {
                    Some(*rng.pick(OWNERS))
                } else {
                    None
                };
                entries.push(Entry::Meta(path.clone(), mode, owner));
            }
            if (kind == 'f' || kind == 'd') && rng.chance(20) {
                entries.push(Entry::Xattr(
                    path.clone(),
                    format!("user.k{}", rng.below(3)),
                    format!("v{li}"),
                ));
            }
        }
        // Fold this layer into the merged view below the next one (approximately: enough to
        // choose interesting names, the kernel decides what is really visible).
        for (p, k) in &mine {
            if *k == 'w' {
                let gone: Vec<String> = below
                    .keys()
                    .filter(|q| *q == p || q.starts_with(&format!("{p}/")))
                    .cloned()
                    .collect();
                for q in gone {
                    below.remove(&q);
                }
            } else {
                if *k != 'd' {
                    let gone: Vec<String> = below
                        .keys()
                        .filter(|q| q.starts_with(&format!("{p}/")))
                        .cloned()
                        .collect();
                    for q in gone {
                        below.remove(&q);
                    }
                }
                below.insert(p.clone(), *k);
            }
        }
        bottom_up.push(entries);
    }
    bottom_up.reverse();
    Layers { lowers: bottom_up }
}

// ---------------------------------------------------------------------------------------------
// mounts

/// What is being tested.
#[derive(Clone, Debug)]
pub enum Subject {
    /// A fuse-overlayfs-compatible binary: `$BIN -o lowerdir=..,upperdir=..,workdir=.. MNT`.
    Bin(PathBuf),
    /// Kernel overlayfs itself (`VERLAY_BIN=kernel`): validates the harness, must agree.
    Kernel,
}

impl Subject {
    pub fn from_env() -> Subject {
        match std::env::var_os("VERLAY_BIN") {
            Some(v) if v == "kernel" => Subject::Kernel,
            Some(v) => Subject::Bin(PathBuf::from(v)),
            None => match option_env!("CARGO_BIN_EXE_verlay") {
                Some(p) => Subject::Bin(PathBuf::from(p)),
                None => panic!("set VERLAY_BIN to the binary under test (or VERLAY_BIN=kernel)"),
            },
        }
    }
    /// Kernel overlayfs can't read OCI whiteouts, so a kernel subject gets kernel-format layers.
    pub fn format(&self) -> Format {
        match self {
            Subject::Bin(_) => Format::Mixed,
            Subject::Kernel => Format::Kernel,
        }
    }
}

thread_local! {
    static EXTRA_OPTS: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push(u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 4]).unwrap(), 8).unwrap());
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn is_mounted(mnt: &Path) -> bool {
    let s = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let want = mnt.to_string_lossy();
    s.lines()
        .any(|l| l.split(' ').nth(4).map(unescape_mountinfo).as_deref() == Some(&*want))
}

/// PIDs (not ours) whose command line has `mnt` as an argument: the daemon serving it.
pub fn daemon_pids(mnt: &Path) -> Vec<i32> {
    let me = std::process::id() as i32;
    let want = mnt.as_os_str().as_bytes();
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if pid == me {
                continue;
            }
            if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) {
                if cmd.split(|b| *b == 0).any(|a| a == want) {
                    out.push(pid);
                }
            }
        }
    }
    out
}

fn pid_alive(pid: i32) -> bool {
    // A zombie still answers kill(0); treat "Z" state as gone.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit_once(") ")
            .map(|(_, r)| r.starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// A mounted overlay; Drop unmounts it (also while a test panics) and ends its daemon by PID.
pub struct MountGuard {
    pub mnt: PathBuf,
    fuse: bool,
    child: Option<Child>,
    daemons: Vec<i32>,
}

impl MountGuard {
    pub fn kernel(lowers: &[PathBuf], upper: &Path, work: &Path, mnt: &Path) -> Result<MountGuard, String> {
        let lower: Vec<String> = lowers.iter().map(|l| l.display().to_string()).collect();
        let data = format!(
            "lowerdir={},upperdir={},workdir={},redirect_dir=on,index=off,metacopy=off,xino=off",
            lower.join(":"),
            upper.display(),
            work.display()
        );
        let d = CString::new(data.clone()).unwrap();
        let src = CString::new("overlay").unwrap();
        // SAFETY: valid C strings; mount(2) with a data string.
        let r = unsafe {
            libc::mount(
                src.as_ptr(),
                cpath(mnt).as_ptr(),
                src.as_ptr(),
                0,
                d.as_ptr().cast(),
            )
        };
        if r != 0 {
            return Err(format!(
                "mount -t overlay -o {data} {}: {}",
                mnt.display(),
                errname(last_errno())
            ));
        }
        Ok(MountGuard {
            mnt: mnt.to_path_buf(),
            fuse: false,
            child: None,
            daemons: vec![],
        })
    }

    /// Spawn the subject binary; panics with its stderr if the mount does not appear in time.
    /// Options the subject mounts of this thread add (e.g. `passthrough=1`).
    pub fn set_extra_opts(opts: &str) {
        EXTRA_OPTS.with(|o| *o.borrow_mut() = opts.to_string());
    }

    pub fn fuse(
        bin: &Path,
        lowers: &[PathBuf],
        upper: &Path,
        work: &Path,
        mnt: &Path,
        log: &Path,
    ) -> MountGuard {
        let lower: Vec<String> = lowers.iter().map(|l| l.display().to_string()).collect();
        let mut opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.join(":"),
            upper.display(),
            work.display()
        );
        EXTRA_OPTS.with(|o| {
            if !o.borrow().is_empty() {
                opts.push(',');
                opts.push_str(&o.borrow());
            }
        });
        let err = std::fs::File::create(log).unwrap();
        let mut child = Command::new(bin)
            .arg("-o")
            .arg(&opts)
            .arg(mnt)
            .stdin(Stdio::null())
            .stdout(err.try_clone().unwrap())
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        let start = Instant::now();
        let mut exited = false;
        loop {
            if is_mounted(mnt) {
                break;
            }
            if !exited {
                if let Ok(Some(st)) = child.try_wait() {
                    exited = true;
                    if !st.success() {
                        let e = std::fs::read_to_string(log).unwrap_or_default();
                        panic!(
                            "{} -o {opts} {} exited with {st}; stderr:\n{e}",
                            bin.display(),
                            mnt.display()
                        );
                    }
                }
            }
            if start.elapsed() > MOUNT_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                let e = std::fs::read_to_string(log).unwrap_or_default();
                panic!(
                    "{} did not mount {} within {:?}; stderr:\n{e}",
                    bin.display(),
                    mnt.display(),
                    MOUNT_TIMEOUT
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let daemons = daemon_pids(mnt);
        MountGuard {
            mnt: mnt.to_path_buf(),
            fuse: true,
            child: Some(child),
            daemons,
        }
    }

    pub fn subject(
        subject: &Subject,
        lowers: &[PathBuf],
        upper: &Path,
        work: &Path,
        mnt: &Path,
        log: &Path,
    ) -> MountGuard {
        match subject {
            Subject::Bin(b) => MountGuard::fuse(b, lowers, upper, work, mnt, log),
            Subject::Kernel => MountGuard::kernel(lowers, upper, work, mnt).unwrap_or_else(|e| panic!("{e}")),
        }
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        let c = cpath(&self.mnt);
        if self.fuse {
            let ok = Command::new("fusermount3")
                .arg("-u")
                .arg(&self.mnt)
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !ok {
                // SAFETY: valid C string.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        } else {
            let mut done = false;
            for _ in 0..20 {
                // SAFETY: valid C string.
                if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
                    done = true;
                    break;
                }
                if last_errno() != libc::EBUSY {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if !done && is_mounted(&self.mnt) {
                // SAFETY: valid C string.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
        // The daemon must be gone before anything else mounts the same upper.
        let start = Instant::now();
        while self.daemons.iter().any(|p| pid_alive(*p)) && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        for p in &self.daemons {
            if pid_alive(*p) {
                // SAFETY: signalling a PID we saw serving our own mountpoint.
                unsafe { libc::kill(*p, libc::SIGKILL) };
            }
        }
        if let Some(mut ch) = self.child.take() {
            if let Ok(None) = ch.try_wait() {
                let _ = ch.kill();
            }
            let _ = ch.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// the pair of mounts

pub struct Dirs {
    pub lowers: Vec<PathBuf>,
    pub upper: PathBuf,
    pub work: PathBuf,
    pub mnt: PathBuf,
}

impl Dirs {
    fn create(base: &Path, nlowers: usize) -> Dirs {
        let d = Dirs {
            lowers: (0..nlowers).map(|i| base.join(format!("l{i}"))).collect(),
            upper: base.join("upper"),
            work: base.join("work"),
            mnt: base.join("mnt"),
        };
        for p in d.lowers.iter().chain([&d.upper, &d.work, &d.mnt]) {
            std::fs::create_dir_all(p).unwrap();
            chmod(p, 0o755);
        }
        d
    }
}

/// Reference (kernel overlayfs) and subject mounted on identical layers.
pub struct Rig {
    // Fields drop in declaration order: both mounts go before the temp dir under them.
    pub reference: Option<MountGuard>,
    pub subject_mount: Option<MountGuard>,
    pub subject: Subject,
    pub layers: Layers,
    /// Timestamps older than this come from the layers or fixed utimes and must match exactly.
    pub start_ns: i128,
    pub ref_dirs: Dirs,
    pub sub_dirs: Dirs,
    log_seq: u32,
    pub tmp: tempfile::TempDir,
}

impl Rig {
    pub fn new(layers: Layers) -> Rig {
        private_umask_for_this_thread();
        let subject = Subject::from_env();
        let tmp = tempfile::Builder::new()
            .prefix("verlay-diff-")
            .tempdir_in("/tmp")
            .unwrap();
        chmod(tmp.path(), 0o755);
        let ref_dirs = Dirs::create(&tmp.path().join("ref"), layers.lowers.len());
        let sub_dirs = Dirs::create(&tmp.path().join("sub"), layers.lowers.len());
        for (i, l) in layers.lowers.iter().enumerate() {
            materialize(l, &ref_dirs.lowers[i], Format::Kernel, i as u64);
            materialize(l, &sub_dirs.lowers[i], subject.format(), i as u64);
        }
        let reference = MountGuard::kernel(&ref_dirs.lowers, &ref_dirs.upper, &ref_dirs.work, &ref_dirs.mnt)
            .unwrap_or_else(|e| panic!("reference: {e}"));
        let mut rig = Rig {
            reference: Some(reference),
            subject_mount: None,
            subject,
            layers,
            start_ns: 0,
            ref_dirs,
            sub_dirs,
            log_seq: 0,
            tmp,
        };
        rig.mount_subject();
        // File systems stamp with a coarse clock that lags now_ns() by up to a tick; every
        // preserved timestamp (layers: 2021, fixed utimes: 2001-2010) is far older anyway.
        rig.start_ns = now_ns() - FRESH_MTIME_SLACK_NS;
        rig
    }

    fn mount_subject(&mut self) {
        self.log_seq += 1;
        let log = self.tmp.path().join(format!("subject-{}.log", self.log_seq));
        let d = &self.sub_dirs;
        self.subject_mount = Some(MountGuard::subject(
            &self.subject,
            &d.lowers,
            &d.upper,
            &d.work,
            &d.mnt,
            &log,
        ));
    }

    pub fn ref_root(&self) -> &Path {
        &self.ref_dirs.mnt
    }
    pub fn sub_root(&self) -> &Path {
        &self.sub_dirs.mnt
    }

    pub fn unmount_subject(&mut self) {
        self.subject_mount = None;
    }

    /// Unmount the subject and mount it again on the same upper and workdir.
    pub fn remount_subject(&mut self) {
        self.unmount_subject();
        self.mount_subject();
    }

    /// Unmount the subject and mount KERNEL overlayfs on the subject's upper, with the subject's
    /// lowers rewritten to kernel format in place: the subject's upper must be kernel format.
    pub fn mount_kernel_on_subject_upper(&mut self) -> Result<(), String> {
        self.unmount_subject();
        for l in &self.sub_dirs.lowers {
            normalize_to_kernel_format(l);
        }
        let w = &self.sub_dirs.work;
        for e in std::fs::read_dir(w).unwrap().flatten() {
            let p = e.path();
            if std::fs::symlink_metadata(&p).map(|m| m.is_dir()).unwrap_or(false) {
                std::fs::remove_dir_all(&p).map_err(|e| format!("cleaning workdir {}: {e}", p.display()))?;
            } else {
                std::fs::remove_file(&p).map_err(|e| format!("cleaning workdir {}: {e}", p.display()))?;
            }
        }
        let d = &self.sub_dirs;
        let m = MountGuard::kernel(&d.lowers, &d.upper, &d.work, &d.mnt)?;
        self.subject_mount = Some(m);
        // From now on the subject's lowers are kernel format.
        self.subject = Subject::Kernel;
        Ok(())
    }

    /// The other direction of upper-format compatibility: unmount the reference, mount the
    /// SUBJECT on the kernel's lowers, upper and workdir (an upper written by kernel overlayfs)
    /// and compare with the reference's last tree. Ends the reference mount for good.
    pub fn mount_subject_on_kernel_upper(&mut self) -> Result<(), String> {
        let before = snapshot(self.ref_root());
        self.reference = None;
        let d = &self.ref_dirs;
        self.log_seq += 1;
        let log = self
            .tmp
            .path()
            .join(format!("subject-on-kernel-upper-{}.log", self.log_seq));
        let m = MountGuard::subject(&self.subject, &d.lowers, &d.upper, &d.work, &d.mnt, &log);
        let after = snapshot(self.ref_root());
        let r = compare(&before, &after, self.start_ns).map_err(|d| {
            format!("subject mounted on kernel overlayfs's upper: merged trees differ (ref = kernel, sub = subject)\n{d}")
        });
        drop(m);
        r
    }

    pub fn compare_trees(&self, what: &str) -> Result<(), String> {
        let r = snapshot(self.ref_root());
        let s = snapshot(self.sub_root());
        compare(&r, &s, self.start_ns)
            .map_err(|d| format!("{what}: merged trees differ (ref = kernel overlayfs, sub = subject)\n{d}"))
    }
}

// ---------------------------------------------------------------------------------------------
// snapshots

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
