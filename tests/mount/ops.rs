//! The operations of the differential test: their text form (parsed by `parse_op`, shown by
//! `Display`), how one is applied to a mount through raw syscalls (`apply`), and how results
//! are normalized and shown. Shared by the generator and the focused cases (tests/mount.rs).

use super::*;

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Op {
    Create {
        path: String,
        mode: u32,
        umask: u32,
        excl: bool,
    },
    Write {
        path: String,
        off: u64,
        len: usize,
        seed: u8,
    },
    Append {
        path: String,
        len: usize,
        seed: u8,
    },
    Overwrite {
        path: String,
        len: usize,
        seed: u8,
    },
    Truncate {
        path: String,
        len: u64,
    },
    Read {
        path: String,
    },
    Mkdir {
        path: String,
        mode: u32,
        umask: u32,
    },
    Rmdir {
        path: String,
    },
    Unlink {
        path: String,
    },
    Link {
        src: String,
        dst: String,
    },
    Symlink {
        target: String,
        path: String,
    },
    Mkfifo {
        path: String,
        mode: u32,
        umask: u32,
    },
    Mknod {
        path: String,
        major: u32,
        minor: u32,
    },
    Rename {
        src: String,
        dst: String,
        flags: u32,
    },
    Chmod {
        path: String,
        mode: u32,
    },
    Chown {
        path: String,
        uid: u32,
        gid: u32,
    },
    /// nanoseconds since the epoch, or TS_NOW / TS_OMIT
    Utime {
        path: String,
        atime: i64,
        mtime: i64,
    },
    SetXattr {
        path: String,
        name: String,
        value: String,
    },
    RemoveXattr {
        path: String,
        name: String,
    },
    GetXattr {
        path: String,
        name: String,
    },
    ListXattr {
        path: String,
    },
    Stat {
        path: String,
    },
    Readdir {
        path: String,
    },
    Readlink {
        path: String,
    },
    /// flags: r, w, rw, a (O_WRONLY|O_APPEND), rt (O_RDWR|O_TRUNC)
    Open {
        slot: usize,
        path: String,
        flags: String,
    },
    ReadFd {
        slot: usize,
        off: u64,
        len: usize,
    },
    WriteFd {
        slot: usize,
        off: u64,
        len: usize,
        seed: u8,
    },
    TruncFd {
        slot: usize,
        len: u64,
    },
    Fstat {
        slot: usize,
    },
    Fchmod {
        slot: usize,
        mode: u32,
    },
    Close {
        slot: usize,
    },
    Fchown {
        slot: usize,
        uid: u32,
        gid: u32,
    },
    Fsync {
        slot: usize,
    },
    Fgetxattr {
        slot: usize,
        name: String,
    },
    /// A POSIX ACL (`u::7,u:1000:6,g::5,m::7,o::0`) set as the binary xattr, as setfacl does.
    SetAcl {
        path: String,
        default: bool,
        spec: String,
    },
    /// `echo 2 > /proc/sys/vm/drop_caches`: the kernel evicts unused dentries and inodes,
    /// so it FORGETs the subject's nodes, and the next use of each name is a fresh LOOKUP.
    DropCaches,
    /// The inner op as another user: euid/egid and supplementary groups switched for this
    /// thread only (see [`Identity`]).
    As {
        uid: u32,
        gid: u32,
        groups: Vec<u32>,
        op: Box<Op>,
    },
}

pub(crate) fn p(s: &str) -> String {
    if s.is_empty() {
        ".".into()
    } else {
        short_path(s)
    }
}

pub(crate) fn ts(t: i64) -> String {
    match t {
        TS_NOW => "now".into(),
        TS_OMIT => "omit".into(),
        t => t.to_string(),
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use Op::*;
        match self {
            Create {
                path,
                mode,
                umask,
                excl,
            } => {
                write!(
                    f,
                    "create {} {mode:04o} umask={umask:03o}{}",
                    p(path),
                    if *excl { " excl" } else { "" }
                )
            }
            Write { path, off, len, seed } => write!(f, "write {} {off} {len} {seed}", p(path)),
            Append { path, len, seed } => write!(f, "append {} {len} {seed}", p(path)),
            Overwrite { path, len, seed } => write!(f, "overwrite {} {len} {seed}", p(path)),
            Truncate { path, len } => write!(f, "truncate {} {len}", p(path)),
            Read { path } => write!(f, "read {}", p(path)),
            Mkdir { path, mode, umask } => write!(f, "mkdir {} {mode:04o} umask={umask:03o}", p(path)),
            Rmdir { path } => write!(f, "rmdir {}", p(path)),
            Unlink { path } => write!(f, "unlink {}", p(path)),
            Link { src, dst } => write!(f, "link {} {}", p(src), p(dst)),
            Symlink { target, path } => write!(f, "symlink {} {}", p(target), p(path)),
            Mkfifo { path, mode, umask } => write!(f, "mkfifo {} {mode:04o} umask={umask:03o}", p(path)),
            Mknod { path, major, minor } => write!(f, "mknod {} {major}:{minor}", p(path)),
            Rename { src, dst, flags } => write!(
                f,
                "rename {} {}{}",
                p(src),
                p(dst),
                match *flags {
                    RENAME_NOREPLACE => " noreplace",
                    RENAME_EXCHANGE => " exchange",
                    _ => "",
                }
            ),
            Chmod { path, mode } => write!(f, "chmod {} {mode:04o}", p(path)),
            Chown { path, uid, gid } => write!(f, "chown {} {}:{}", p(path), *uid as i32, *gid as i32),
            Utime { path, atime, mtime } => write!(f, "utime {} {} {}", p(path), ts(*atime), ts(*mtime)),
            SetXattr { path, name, value } => write!(f, "setxattr {} {}={value}", p(path), short_path(name)),
            RemoveXattr { path, name } => write!(f, "rmxattr {} {}", p(path), short_path(name)),
            GetXattr { path, name } => write!(f, "getxattr {} {}", p(path), short_path(name)),
            ListXattr { path } => write!(f, "listxattr {}", p(path)),
            Stat { path } => write!(f, "stat {}", p(path)),
            Readdir { path } => write!(f, "readdir {}", p(path)),
            Readlink { path } => write!(f, "readlink {}", p(path)),
            Open { slot, path, flags } => write!(f, "open {slot} {} {flags}", p(path)),
            ReadFd { slot, off, len } => write!(f, "readfd {slot} {off} {len}"),
            WriteFd { slot, off, len, seed } => write!(f, "writefd {slot} {off} {len} {seed}"),
            TruncFd { slot, len } => write!(f, "truncfd {slot} {len}"),
            Fstat { slot } => write!(f, "fstat {slot}"),
            Fchmod { slot, mode } => write!(f, "fchmod {slot} {mode:04o}"),
            Close { slot } => write!(f, "close {slot}"),
            Fchown { slot, uid, gid } => write!(f, "fchown {slot} {}:{}", *uid as i32, *gid as i32),
            Fsync { slot } => write!(f, "fsync {slot}"),
            DropCaches => write!(f, "dropcaches"),
            Fgetxattr { slot, name } => write!(f, "fgetxattr {slot} {}", short_path(name)),
            SetAcl { path, default, spec } => write!(
                f,
                "setacl {} {} {spec}",
                p(path),
                if *default { "default" } else { "access" }
            ),
            As { uid, gid, groups, op } => {
                let g: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
                if g.is_empty() {
                    write!(f, "as {uid}:{gid} {op}")
                } else {
                    write!(f, "as {uid}:{gid}+{} {op}", g.join("+"))
                }
            }
        }
    }
}

/// Parse the `Display` form back (used by the focused tests and to replay logs by hand).
pub(crate) fn parse_op(s: &str) -> Op {
    use Op::*;
    let w: Vec<&str> = s.split_whitespace().collect();
    let bad = || -> ! { panic!("bad op {s:?}") };
    if w.first() == Some(&"as") {
        let (u, g) = w.get(1).and_then(|x| x.split_once(':')).unwrap_or_else(|| bad());
        let mut ids = g.split('+');
        let g = ids.next().unwrap_or_else(|| bad());
        let groups = ids.map(|x| x.parse().unwrap_or_else(|_| bad())).collect();
        let inner = parse_op(&w[2..].join(" "));
        return As {
            uid: u.parse().unwrap_or_else(|_| bad()),
            gid: g.parse().unwrap_or_else(|_| bad()),
            groups,
            op: Box::new(inner),
        };
    }
    let path = |i: usize| -> String {
        let x = w.get(i).unwrap_or_else(|| bad());
        if *x == "." {
            String::new()
        } else {
            expand_path(x)
        }
    };
    let num = |i: usize| -> u64 { w.get(i).and_then(|x| x.parse().ok()).unwrap_or_else(|| bad()) };
    let oct = |i: usize| -> u32 {
        w.get(i)
            .and_then(|x| u32::from_str_radix(x, 8).ok())
            .unwrap_or_else(|| bad())
    };
    let seed = |i: usize| -> u8 {
        w.get(i)
            .map(|x| x.parse().unwrap_or_else(|_| bad()))
            .unwrap_or(65)
    };
    let umask = || -> u32 {
        w.iter()
            .find_map(|x| x.strip_prefix("umask="))
            .map(|u| u32::from_str_radix(u, 8).unwrap_or_else(|_| bad()))
            .unwrap_or(0o022)
    };
    let t = |i: usize| -> i64 {
        match w.get(i) {
            Some(&"now") => TS_NOW,
            Some(&"omit") => TS_OMIT,
            Some(x) => x.parse().unwrap_or_else(|_| bad()),
            None => bad(),
        }
    };
    match *w.first().unwrap_or_else(|| bad()) {
        "create" => Create {
            path: path(1),
            mode: oct(2),
            umask: umask(),
            excl: w.contains(&"excl"),
        },
        "write" => Write {
            path: path(1),
            off: num(2),
            len: num(3) as usize,
            seed: seed(4),
        },
        "append" => Append {
            path: path(1),
            len: num(2) as usize,
            seed: seed(3),
        },
        "overwrite" => Overwrite {
            path: path(1),
            len: num(2) as usize,
            seed: seed(3),
        },
        "truncate" => Truncate {
            path: path(1),
            len: num(2),
        },
        "read" => Read { path: path(1) },
        "mkdir" => Mkdir {
            path: path(1),
            mode: oct(2),
            umask: umask(),
        },
        "rmdir" => Rmdir { path: path(1) },
        "unlink" => Unlink { path: path(1) },
        "link" => Link {
            src: path(1),
            dst: path(2),
        },
        "symlink" => Symlink {
            target: path(1),
            path: path(2),
        },
        "mkfifo" => Mkfifo {
            path: path(1),
            mode: oct(2),
            umask: umask(),
        },
        "mknod" => {
            let (a, b) = w.get(2).and_then(|x| x.split_once(':')).unwrap_or_else(|| bad());
            Mknod {
                path: path(1),
                major: a.parse().unwrap_or_else(|_| bad()),
                minor: b.parse().unwrap_or_else(|_| bad()),
            }
        }
        "rename" => Rename {
            src: path(1),
            dst: path(2),
            flags: match w.get(3) {
                None => 0,
                Some(&"noreplace") => RENAME_NOREPLACE,
                Some(&"exchange") => RENAME_EXCHANGE,
                _ => bad(),
            },
        },
        "chmod" => Chmod {
            path: path(1),
            mode: oct(2),
        },
        "chown" => {
            let (u, g) = w.get(2).and_then(|x| x.split_once(':')).unwrap_or_else(|| bad());
            let id = |x: &str| x.parse::<i32>().unwrap_or_else(|_| bad()) as u32;
            Chown {
                path: path(1),
                uid: id(u),
                gid: id(g),
            }
        }
        "utime" => Utime {
            path: path(1),
            atime: t(2),
            mtime: t(3),
        },
        "setxattr" => {
            let (n, v) = w.get(2).and_then(|x| x.split_once('=')).unwrap_or_else(|| bad());
            SetXattr {
                path: path(1),
                name: expand_path(n),
                value: v.into(),
            }
        }
        "rmxattr" => RemoveXattr {
            path: path(1),
            name: expand_path(w.get(2).unwrap_or_else(|| bad())),
        },
        "getxattr" => GetXattr {
            path: path(1),
            name: expand_path(w.get(2).unwrap_or_else(|| bad())),
        },
        "listxattr" => ListXattr { path: path(1) },
        "stat" => Stat { path: path(1) },
        "readdir" => Readdir { path: path(1) },
        "readlink" => Readlink { path: path(1) },
        "open" => Open {
            slot: num(1) as usize,
            path: path(2),
            flags: w.get(3).unwrap_or_else(|| bad()).to_string(),
        },
        "readfd" => ReadFd {
            slot: num(1) as usize,
            off: num(2),
            len: num(3) as usize,
        },
        "writefd" => WriteFd {
            slot: num(1) as usize,
            off: num(2),
            len: num(3) as usize,
            seed: seed(4),
        },
        "truncfd" => TruncFd {
            slot: num(1) as usize,
            len: num(2),
        },
        "fstat" => Fstat {
            slot: num(1) as usize,
        },
        "fchmod" => Fchmod {
            slot: num(1) as usize,
            mode: oct(2),
        },
        "close" => Close {
            slot: num(1) as usize,
        },
        "fchown" => {
            let (u, g) = w.get(2).and_then(|x| x.split_once(':')).unwrap_or_else(|| bad());
            let id = |x: &str| x.parse::<i32>().unwrap_or_else(|_| bad()) as u32;
            Fchown {
                slot: num(1) as usize,
                uid: id(u),
                gid: id(g),
            }
        }
        "fsync" => Fsync {
            slot: num(1) as usize,
        },
        "dropcaches" => DropCaches,
        "fgetxattr" => Fgetxattr {
            slot: num(1) as usize,
            name: expand_path(w.get(2).unwrap_or_else(|| bad())),
        },
        "setacl" => SetAcl {
            path: path(1),
            default: match w.get(2) {
                Some(&"default") => true,
                Some(&"access") => false,
                _ => bad(),
            },
            spec: w.get(3).unwrap_or_else(|| bad()).to_string(),
        },
        _ => bad(),
    }
}

pub(crate) type Res = Result<String, i32>;

/// Drop the stat fields of categories set aside by VERLAY_DIFF_IGNORE.
pub(crate) fn normalize_result(r: &Res) -> Res {
    match r {
        Ok(s) => Ok(s
            .split(' ')
            .filter(|t| {
                let nlink = ignored("nlink") || ignored("dir-nlink") && s.starts_with("d ");
                !(nlink && t.starts_with("nlink=")
                    || ignored("mtime") && t.starts_with("mtime=")
                    || ignored("size") && t.starts_with("size="))
            })
            .collect::<Vec<_>>()
            .join(" ")),
        Err(e) => Err(*e),
    }
}

pub(crate) fn show(r: &Res) -> String {
    match r {
        Ok(s) if s.is_empty() => "Ok".into(),
        Ok(s) => format!("Ok({s})"),
        Err(e) => format!("Err({})", errname(*e)),
    }
}

/// Open fds of one mount, closed on drop (before the mount guards unmount).
#[derive(Default)]
pub(crate) struct Fds(pub(crate) BTreeMap<usize, i32>);

impl Fds {
    pub(crate) fn close(&mut self, slot: usize) {
        if let Some(fd) = self.0.remove(&slot) {
            // SAFETY: an fd we opened and still own.
            unsafe { libc::close(fd) };
        }
    }
    pub(crate) fn close_all(&mut self) {
        let slots: Vec<usize> = self.0.keys().copied().collect();
        for s in slots {
            self.close(s);
        }
    }
}

impl Drop for Fds {
    fn drop(&mut self) {
        self.close_all();
    }
}

/// An xattr value as the op log shows it: text, or hex when it is not UTF-8 (an ACL).
pub(crate) fn xattr_shown(v: &[u8]) -> String {
    match std::str::from_utf8(v) {
        Ok(t) => t.to_string(),
        Err(_) => v.iter().map(|b| format!("{b:02x}")).collect(),
    }
}

/// The xattr form of a POSIX ACL (linux/posix_acl_xattr.h: version 2, then tag, perm, id
/// per entry, sorted by tag and id as the kernel requires) from `u::7,u:1000:6,g::5,m::7,o::0`.
pub(crate) fn acl_bytes(spec: &str) -> Vec<u8> {
    let mut entries: Vec<(u16, u32, u16)> = spec
        .split(',')
        .map(|e| {
            let mut f = e.split(':');
            let (t, id, perm) = (
                f.next().unwrap_or(""),
                f.next().unwrap_or(""),
                f.next().unwrap_or("0"),
            );
            let tag = match (t, id.is_empty()) {
                ("u", true) => 0x01,
                ("u", false) => 0x02,
                ("g", true) => 0x04,
                ("g", false) => 0x08,
                ("m", _) => 0x10,
                ("o", _) => 0x20,
                _ => panic!("bad ACL entry {e:?}"),
            };
            let id = if id.is_empty() {
                u32::MAX
            } else {
                id.parse().expect("ACL id")
            };
            (tag, id, perm.parse().expect("ACL perm"))
        })
        .collect();
    entries.sort();
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, id, perm) in entries {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

/// Another caller for the ops inside: euid, egid and supplementary groups switched with the
/// raw per-thread syscalls (glibc's wrappers would switch every thread of the test process),
/// root again on drop. Real and saved ids stay 0, so switching back is allowed and the
/// capabilities come back with euid 0.
pub(crate) struct Identity;

impl Identity {
    pub(crate) fn switch(uid: u32, gid: u32, groups: &[u32]) -> Identity {
        let keep = u32::MAX; // (uid_t)-1: leave unchanged
                             // SAFETY: raw syscalls on this thread's credentials with a valid group array.
        let r = unsafe {
            [
                libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()),
                libc::syscall(libc::SYS_setresgid, keep, gid, keep),
                libc::syscall(libc::SYS_setresuid, keep, uid, keep),
            ]
        };
        let id = Identity;
        assert!(
            r == [0, 0, 0],
            "switching to {uid}:{gid} {groups:?}: {r:?} errno {}",
            last_errno()
        );
        id
    }
}

impl Drop for Identity {
    fn drop(&mut self) {
        let keep = u32::MAX;
        // SAFETY: as in switch; an empty group list.
        let r = unsafe {
            [
                libc::syscall(libc::SYS_setresuid, keep, 0u32, keep),
                libc::syscall(libc::SYS_setresgid, keep, 0u32, keep),
                libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<u32>()),
            ]
        };
        if r != [0, 0, 0] {
            // Never go on as someone else: every later check would be wrong.
            eprintln!("could not switch back to root: {r:?} errno {}", last_errno());
            std::process::abort();
        }
    }
}

pub(crate) fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add((i % 251) as u8)).collect()
}

pub(crate) struct Ctx<'a> {
    pub(crate) root: &'a Path,
    pub(crate) start_ns: i128,
}

impl Ctx<'_> {
    pub(crate) fn c(&self, rel: &str) -> CString {
        let mut s = self.root.to_string_lossy().into_owned();
        if !rel.is_empty() {
            s.push('/');
            s.push_str(rel);
        }
        CString::new(s).unwrap()
    }
    pub(crate) fn stat_line(&self, st: &libc::stat) -> String {
        let kind = kind_of(st.st_mode);
        let mut s = format!(
            "{kind} {:04o} {}:{} nlink={}",
            st.st_mode & 0o7777,
            st.st_uid,
            st.st_gid,
            st.st_nlink
        );
        if kind != 'd' {
            s += &format!(" size={}", st.st_size);
        }
        let mtime = st.st_mtime as i128 * 1_000_000_000 + st.st_mtime_nsec as i128;
        if mtime < self.start_ns {
            s += &format!(" mtime={mtime}");
        }
        s
    }
}

pub(crate) fn rc(r: libc::c_int) -> Res {
    if r < 0 {
        Err(last_errno())
    } else {
        Ok(String::new())
    }
}

pub(crate) fn with_umask<T>(u: u32, f: impl FnOnce() -> T) -> T {
    // SAFETY: umask is per thread here (common::private_umask_for_this_thread).
    let old = unsafe { libc::umask(u) };
    let r = f();
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    r
}

pub(crate) fn open_at(c: &CString, flags: i32, mode: u32) -> Result<i32, i32> {
    // SAFETY: valid C string.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_NONBLOCK | libc::O_CLOEXEC, mode) };
    if fd < 0 {
        Err(last_errno())
    } else {
        Ok(fd)
    }
}

pub(crate) fn write_and_close(fd: i32, buf: &[u8], off: Option<u64>) -> Res {
    // SAFETY: fd is open; buffer valid for its length.
    let n = unsafe {
        match off {
            Some(o) => libc::pwrite(fd, buf.as_ptr().cast(), buf.len(), o as i64),
            None => libc::write(fd, buf.as_ptr().cast(), buf.len()),
        }
    };
    let e = last_errno();
    // SAFETY: our fd.
    unsafe { libc::close(fd) };
    if n < 0 {
        Err(e)
    } else {
        Ok(format!("{n}"))
    }
}

pub(crate) fn apply(ctx: &Ctx, op: &Op, fds: &mut Fds) -> Res {
    use Op::*;
    // SAFETY: every call below gets valid C strings, buffers of the stated length and fds we own.
    unsafe {
        match op {
            Create {
                path,
                mode,
                umask,
                excl,
            } => {
                let c = ctx.c(path);
                let fl = libc::O_CREAT | libc::O_WRONLY | if *excl { libc::O_EXCL } else { 0 };
                let fd = with_umask(*umask, || open_at(&c, fl, *mode))?;
                libc::close(fd);
                Ok(String::new())
            }
            Write { path, off, len, seed } => {
                let fd = open_at(&ctx.c(path), libc::O_WRONLY, 0)?;
                write_and_close(fd, &data(*len, *seed), Some(*off))
            }
            Append { path, len, seed } => {
                let fd = open_at(&ctx.c(path), libc::O_WRONLY | libc::O_APPEND, 0)?;
                write_and_close(fd, &data(*len, *seed), None)
            }
            Overwrite { path, len, seed } => {
                let fd = open_at(&ctx.c(path), libc::O_WRONLY | libc::O_TRUNC, 0)?;
                write_and_close(fd, &data(*len, *seed), None)
            }
            Truncate { path, len } => rc(libc::truncate(ctx.c(path).as_ptr(), *len as i64)),
            Read { path } => {
                let fd = open_at(&ctx.c(path), libc::O_RDONLY, 0)?;
                let mut out = Vec::new();
                let mut buf = vec![0u8; 65536];
                loop {
                    let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
                    if n < 0 {
                        let e = last_errno();
                        libc::close(fd);
                        return Err(e);
                    }
                    if n == 0 {
                        break;
                    }
                    out.extend_from_slice(&buf[..n as usize]);
                }
                libc::close(fd);
                Ok(format!("len={} hash={:016x}", out.len(), fnv(&out)))
            }
            Mkdir { path, mode, umask } => {
                with_umask(*umask, || rc(libc::mkdir(ctx.c(path).as_ptr(), *mode)))
            }
            Rmdir { path } => rc(libc::rmdir(ctx.c(path).as_ptr())),
            Unlink { path } => rc(libc::unlink(ctx.c(path).as_ptr())),
            Link { src, dst } => rc(libc::link(ctx.c(src).as_ptr(), ctx.c(dst).as_ptr())),
            Symlink { target, path } => {
                let t = CString::new(target.as_str()).unwrap();
                rc(libc::symlink(t.as_ptr(), ctx.c(path).as_ptr()))
            }
            Mkfifo { path, mode, umask } => {
                with_umask(*umask, || rc(libc::mkfifo(ctx.c(path).as_ptr(), *mode)))
            }
            Mknod { path, major, minor } => rc(libc::mknod(
                ctx.c(path).as_ptr(),
                libc::S_IFCHR | 0o644,
                libc::makedev(*major, *minor),
            )),
            Rename { src, dst, flags } => {
                let r = libc::syscall(
                    libc::SYS_renameat2,
                    libc::AT_FDCWD,
                    ctx.c(src).as_ptr(),
                    libc::AT_FDCWD,
                    ctx.c(dst).as_ptr(),
                    *flags,
                );
                rc(r as libc::c_int)
            }
            Chmod { path, mode } => rc(libc::chmod(ctx.c(path).as_ptr(), *mode)),
            Chown { path, uid, gid } => rc(libc::lchown(ctx.c(path).as_ptr(), *uid, *gid)),
            Utime { path, atime, mtime } => {
                let t = |x: i64| match x {
                    TS_NOW => libc::timespec {
                        tv_sec: 0,
                        tv_nsec: libc::UTIME_NOW,
                    },
                    TS_OMIT => libc::timespec {
                        tv_sec: 0,
                        tv_nsec: libc::UTIME_OMIT,
                    },
                    x => libc::timespec {
                        tv_sec: x / 1_000_000_000,
                        tv_nsec: x % 1_000_000_000,
                    },
                };
                let tv = [t(*atime), t(*mtime)];
                rc(libc::utimensat(
                    libc::AT_FDCWD,
                    ctx.c(path).as_ptr(),
                    tv.as_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW,
                ))
            }
            SetXattr { path, name, value } => {
                let n = CString::new(name.as_str()).unwrap();
                let v = xattr_value(value);
                rc(libc::lsetxattr(
                    ctx.c(path).as_ptr(),
                    n.as_ptr(),
                    v.as_ptr().cast(),
                    v.len(),
                    0,
                ))
            }
            RemoveXattr { path, name } => {
                let n = CString::new(name.as_str()).unwrap();
                rc(libc::lremovexattr(ctx.c(path).as_ptr(), n.as_ptr()))
            }
            GetXattr { path, name } => {
                let n = CString::new(name.as_str()).unwrap();
                let mut v = vec![0u8; 4096];
                let r = libc::lgetxattr(ctx.c(path).as_ptr(), n.as_ptr(), v.as_mut_ptr().cast(), v.len());
                if r < 0 {
                    Err(last_errno())
                } else {
                    Ok(xattr_shown(&v[..r as usize]))
                }
            }
            ListXattr { path } => {
                let full = ctx.root.join(path);
                user_xattrs(&full).map(|x| format!("{x:?}"))
            }
            Stat { path } => {
                let mut st: libc::stat = std::mem::zeroed();
                if libc::lstat(ctx.c(path).as_ptr(), &mut st) < 0 {
                    return Err(last_errno());
                }
                Ok(ctx.stat_line(&st))
            }
            Readdir { path } => {
                let full = if path.is_empty() {
                    ctx.root.to_path_buf()
                } else {
                    ctx.root.join(path)
                };
                let rd = std::fs::read_dir(&full).map_err(|e| e.raw_os_error().unwrap_or(0))?;
                let mut names = rd
                    .filter(|e| {
                        // Kernel overlayfs lists the whiteouts of a lower dir that is not
                        // merged, though lookup says ENOENT: not an entry of the merged view.
                        e.as_ref().map_or(true, |e| {
                            std::fs::symlink_metadata(full.join(e.file_name()))
                                .map_or_else(|err| err.raw_os_error() != Some(libc::ENOENT), |_| true)
                        })
                    })
                    .map(|e| e.map(|e| short_path(&e.file_name().to_string_lossy())))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| e.raw_os_error().unwrap_or(0))?;
                names.sort();
                Ok(format!("[{}]", names.join(",")))
            }
            Readlink { path } => {
                let mut v = vec![0u8; 4096];
                let r = libc::readlink(ctx.c(path).as_ptr(), v.as_mut_ptr().cast(), v.len());
                if r < 0 {
                    Err(last_errno())
                } else {
                    Ok(short_path(&String::from_utf8_lossy(&v[..r as usize])))
                }
            }
            Open { slot, path, flags } => {
                fds.close(*slot);
                let fl = match flags.as_str() {
                    "r" => libc::O_RDONLY,
                    "w" => libc::O_WRONLY,
                    "rw" => libc::O_RDWR,
                    "a" => libc::O_WRONLY | libc::O_APPEND,
                    "rt" => libc::O_RDWR | libc::O_TRUNC,
                    _ => panic!("bad open flags {flags}"),
                };
                let fd = open_at(&ctx.c(path), fl, 0)?;
                fds.0.insert(*slot, fd);
                Ok(String::new())
            }
            ReadFd { slot, off, len } => {
                let Some(fd) = fds.0.get(slot) else {
                    return Ok("no fd".into());
                };
                let mut v = vec![0u8; *len];
                let n = libc::pread(*fd, v.as_mut_ptr().cast(), v.len(), *off as i64);
                if n < 0 {
                    return Err(last_errno());
                }
                Ok(format!("len={n} hash={:016x}", fnv(&v[..n as usize])))
            }
            WriteFd { slot, off, len, seed } => {
                let Some(fd) = fds.0.get(slot) else {
                    return Ok("no fd".into());
                };
                let v = data(*len, *seed);
                let n = libc::pwrite(*fd, v.as_ptr().cast(), v.len(), *off as i64);
                if n < 0 {
                    return Err(last_errno());
                }
                Ok(n.to_string())
            }
            TruncFd { slot, len } => {
                let Some(fd) = fds.0.get(slot) else {
                    return Ok("no fd".into());
                };
                rc(libc::ftruncate(*fd, *len as i64))
            }
            Fstat { slot } => {
                let Some(fd) = fds.0.get(slot) else {
                    return Ok("no fd".into());
                };
                let mut st: libc::stat = std::mem::zeroed();
                if libc::fstat(*fd, &mut st) < 0 {
                    return Err(last_errno());
                }
                Ok(ctx.stat_line(&st))
            }
            Fchmod { slot, mode } => {
                let Some(fd) = fds.0.get(slot) else {
                    return Ok("no fd".into());
                };
                rc(libc::fchmod(*fd, *mode))
            }
            Close { slot } => {
                let Some(fd) = fds.0.remove(slot) else {
                    return Ok("no fd".into());
                };
                rc(libc::close(fd))
            }
            Fchown { slot, uid, gid } => {
                let Some(fd) = fds.0.get(slot) else {
                    return Ok("no fd".into());
                };
                rc(libc::fchown(*fd, *uid, *gid))
            }
            Fsync { slot } => {
                let Some(fd) = fds.0.get(slot) else {
                    return Ok("no fd".into());
                };
                rc(libc::fsync(*fd))
            }
            DropCaches => match std::fs::write("/proc/sys/vm/drop_caches", "2") {
                Ok(()) => {
                    // The kernel queues the FORGETs and the daemon serves them on its own
                    // threads: give them time to land before the next op looks names up
                    // (else the lookups find the old nodes still live). Nothing shows when
                    // they have; a late one only makes the step test less, never fail. One
                    // bounded write and one sleep per op: never a loop.
                    std::thread::sleep(std::time::Duration::from_millis(200));
                    Ok(String::new())
                }
                Err(e) => Err(e.raw_os_error().unwrap_or(libc::EIO)),
            },
            Fgetxattr { slot, name } => {
                let Some(fd) = fds.0.get(slot) else {
                    return Ok("no fd".into());
                };
                let n = CString::new(name.as_str()).unwrap();
                let mut v = vec![0u8; 4096];
                let r = libc::fgetxattr(*fd, n.as_ptr(), v.as_mut_ptr().cast(), v.len());
                if r < 0 {
                    Err(last_errno())
                } else {
                    Ok(xattr_shown(&v[..r as usize]))
                }
            }
            SetAcl { path, default, spec } => {
                let n = if *default {
                    c"system.posix_acl_default"
                } else {
                    c"system.posix_acl_access"
                };
                let v = acl_bytes(spec);
                rc(libc::lsetxattr(
                    ctx.c(path).as_ptr(),
                    n.as_ptr(),
                    v.as_ptr().cast(),
                    v.len(),
                    0,
                ))
            }
            As { uid, gid, groups, op } => {
                let _id = Identity::switch(*uid, *gid, groups);
                apply(ctx, op, fds)
            }
        }
    }
}

/// The object an op acts on and where it is afterwards: its st_ino must not change there
/// (copy-up, rename) whenever kernel overlayfs keeps it.
pub(crate) fn tracked(op: &Op) -> Option<(&str, &str)> {
    use Op::*;
    match op {
        Chmod { path, .. }
        | Chown { path, .. }
        | Utime { path, .. }
        | SetXattr { path, .. }
        | SetAcl { path, .. }
        | RemoveXattr { path, .. }
        | Write { path, .. }
        | Append { path, .. }
        | Overwrite { path, .. }
        | Truncate { path, .. } => Some((path, path)),
        Rename { src, dst, .. } => Some((src, dst)),
        Link { src, .. } => Some((src, src)),
        As { op, .. } => tracked(op),
        _ => None,
    }
}

pub(crate) fn ino(root: &Path, rel: &str) -> Option<u64> {
    std::fs::symlink_metadata(root.join(rel)).ok().map(|m| m.ino())
}
