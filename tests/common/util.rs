//! Small helpers of the differential machinery: a seeded PRNG, a content hash, errno names,
//! long-name padding, a private umask per thread, and the `VERLAY_DIFF_IGNORE` switch.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::fmt;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// xorshift64* seeded through splitmix64, so seeds 0, 1, 2 give unrelated streams.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }
    /// The generator at state `state` as it is (it must not be 0): no seed mixing, for a
    /// test whose recorded seeds name states (tests/powercut.rs).
    pub fn from_state(state: u64) -> Rng {
        Rng(state)
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
