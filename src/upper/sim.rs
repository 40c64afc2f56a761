//! A simulated [`UpperStore`] that models POSIX durability, for crash-point enumeration
//! against power loss (docs/ordering.md, "The simulated store").
//!
//! The model (as turmoil-fs): every inode has a current and a durable state. File data and
//! metadata (mode, owner, xattrs) become durable when the file is fsynced; a directory's
//! entries (create, link, unlink, rename in or out of it) and its own metadata become
//! durable when the directory is fsynced; syncfs makes everything durable. A rename across
//! directories is an entry change in each, durable in each only after that one's fsync.
//! A new inode's durable state is the one it had when created (empty data, no entries).
//! [`SimStore::crash`] returns the durable image: what a power loss at this instant leaves.
//!
//! Faults: [`SimStore::fail_at`] makes the N-th operation (counting from 1) fail with an
//! errno and no effect. [`SimStore::crash_after`] records the durable image right after the
//! K-th operation (K = 0: before any), so one run gives the image of one crash point.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::os::fd::BorrowedFd;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use rustix::fs::{FileType, OFlags, RenameFlags, Timestamps, XattrFlags};
use rustix::io::{Errno, Result};

use super::store::{Base, Meta, StoreFile, UpperStore};
use crate::layer::Kind;

const UPPER: u64 = 1;
const WORK: u64 = 2;

#[derive(Clone, Debug, Default)]
struct State {
    data: Vec<u8>,
    mode: u32,
    uid: u32,
    gid: u32,
    xattrs: BTreeMap<OsString, Vec<u8>>,
    entries: BTreeMap<OsString, u64>,
}

#[derive(Clone, Debug)]
struct Inode {
    kind: Kind,
    rdev: u64,
    target: OsString,
    cur: State,
    dur: State,
}

/// One object of an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// file type
    pub kind: Kind,
    /// file data (files), target (symlinks)
    pub data: Vec<u8>,
    /// permission bits
    pub mode: u32,
    /// owner
    pub uid: u32,
    /// xattrs
    pub xattrs: BTreeMap<OsString, Vec<u8>>,
    /// device number
    pub rdev: u64,
}

impl Node {
    /// Is this a whiteout?
    pub fn is_whiteout(&self) -> bool {
        self.kind == Kind::Char && self.rdev == 0
    }
}

/// The trees of the upper and the work dir, by path.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Image {
    /// upperdir
    pub upper: BTreeMap<PathBuf, Node>,
    /// `workdir/work`
    pub work: BTreeMap<PathBuf, Node>,
}

#[derive(Debug)]
struct Inner {
    inodes: HashMap<u64, Inode>,
    next: u64,
    ops: u64,
    crash_after: Option<u64>,
    crashed: Option<Image>,
    fail_at: Option<(u64, Errno)>,
    refuse_rename_whiteout: bool,
}

/// The simulated store; clones share the same state.
#[derive(Clone, Debug)]
pub struct SimStore(Arc<Mutex<Inner>>);

impl Default for SimStore {
    fn default() -> Self {
        Self::new()
    }
}

fn dir_inode() -> Inode {
    let st = State {
        mode: 0o755,
        ..State::default()
    };
    Inode {
        kind: Kind::Dir,
        rdev: 0,
        target: OsString::new(),
        cur: st.clone(),
        dur: st,
    }
}

impl Inner {
    fn root(at: Base) -> u64 {
        match at {
            Base::Upper => UPPER,
            Base::Work => WORK,
        }
    }

    fn lookup(&self, at: Base, rel: &Path) -> Result<Option<u64>> {
        let mut ino = Self::root(at);
        for c in rel.components() {
            let Component::Normal(name) = c else { continue };
            let node = &self.inodes[&ino];
            if node.kind != Kind::Dir {
                return Ok(None);
            }
            match node.cur.entries.get(name) {
                Some(&i) => ino = i,
                None => return Ok(None),
            }
        }
        Ok(Some(ino))
    }

    fn get(&self, at: Base, rel: &Path) -> Result<u64> {
        self.lookup(at, rel)?.ok_or(Errno::NOENT)
    }

    /// The parent directory's inode and the last name.
    fn parent(&self, at: Base, rel: &Path) -> Result<(u64, OsString)> {
        let name = rel.file_name().ok_or(Errno::INVAL)?.to_os_string();
        let p = self.get(at, rel.parent().unwrap_or(Path::new("")))?;
        if self.inodes[&p].kind != Kind::Dir {
            return Err(Errno::NOTDIR);
        }
        Ok((p, name))
    }

    fn child(&self, dir: u64, name: &OsStr) -> Option<u64> {
        self.inodes[&dir].cur.entries.get(name).copied()
    }

    fn make(&mut self, at: Base, rel: &Path, kind: Kind, mode: u32, rdev: u64, target: &OsStr) -> Result<u64> {
        let (p, name) = self.parent(at, rel)?;
        if self.child(p, &name).is_some() {
            return Err(Errno::EXIST);
        }
        let ino = self.next;
        self.next += 1;
        let st = State {
            mode: mode & 0o7777,
            uid: rustix::process::geteuid().as_raw(),
            gid: rustix::process::getegid().as_raw(),
            ..State::default()
        };
        self.inodes.insert(
            ino,
            Inode {
                kind,
                rdev,
                target: target.to_os_string(),
                cur: st.clone(),
                dur: st,
            },
        );
        self.inodes.get_mut(&p).expect("parent").cur.entries.insert(name, ino);
        Ok(ino)
    }

    fn node(&mut self, ino: u64) -> &mut Inode {
        self.inodes.get_mut(&ino).expect("inode")
    }

    fn image(&self, durable: bool) -> Image {
        let mut img = Image::default();
        self.walk(UPPER, PathBuf::new(), durable, &mut img.upper, 0);
        self.walk(WORK, PathBuf::new(), durable, &mut img.work, 0);
        img
    }

    fn walk(&self, dir: u64, path: PathBuf, durable: bool, out: &mut BTreeMap<PathBuf, Node>, depth: usize) {
        let d = &self.inodes[&dir];
        let st = if durable { &d.dur } else { &d.cur };
        if depth > 64 {
            return;
        }
        for (name, &ino) in &st.entries {
            let i = &self.inodes[&ino];
            let s = if durable { &i.dur } else { &i.cur };
            let p = path.join(name);
            out.insert(
                p.clone(),
                Node {
                    kind: i.kind,
                    data: if i.kind == Kind::Symlink {
                        i.target.as_encoded_bytes().to_vec()
                    } else {
                        s.data.clone()
                    },
                    mode: s.mode,
                    uid: s.uid,
                    xattrs: s.xattrs.clone(),
                    rdev: i.rdev,
                },
            );
            if i.kind == Kind::Dir {
                self.walk(ino, p, durable, out, depth + 1);
            }
        }
    }
}

impl SimStore {
    /// An empty upper and work dir, both durable.
    pub fn new() -> SimStore {
        let mut inodes = HashMap::new();
        inodes.insert(UPPER, dir_inode());
        inodes.insert(WORK, dir_inode());
        SimStore(Arc::new(Mutex::new(Inner {
            inodes,
            next: 3,
            ops: 0,
            crash_after: None,
            crashed: None,
            fail_at: None,
            refuse_rename_whiteout: false,
        })))
    }

    /// Operations done so far (each method call except stat, read_dir and get_xattr).
    pub fn ops(&self) -> u64 {
        self.0.lock().ops
    }

    /// Record the durable image right after operation `k` (now, if `k` is the current count).
    pub fn crash_after(&self, k: u64) {
        let mut g = self.0.lock();
        g.crash_after = Some(k);
        g.crashed = if g.ops == k { Some(g.image(true)) } else { None };
    }

    /// The image recorded by [`SimStore::crash_after`], if that point was reached.
    pub fn crashed(&self) -> Option<Image> {
        self.0.lock().crashed.clone()
    }

    /// The durable image now: what a power loss at this instant leaves.
    pub fn crash(&self) -> Image {
        self.0.lock().image(true)
    }

    /// The current image (what a process crash leaves: the page cache survives).
    pub fn current(&self) -> Image {
        self.0.lock().image(false)
    }

    /// Make operation number `n` (counting from 1) fail with `e`, without effect.
    pub fn fail_at(&self, n: u64, e: Errno) {
        self.0.lock().fail_at = Some((n, e));
    }

    /// Refuse RENAME_WHITEOUT with EINVAL, as a kernel does in a user namespace.
    pub fn refuse_rename_whiteout(&self, on: bool) {
        self.0.lock().refuse_rename_whiteout = on;
    }

    fn op<T>(&self, f: impl FnOnce(&mut Inner) -> Result<T>) -> Result<T> {
        let mut g = self.0.lock();
        let n = g.ops + 1;
        g.ops = n;
        let r = match g.fail_at {
            Some((at, e)) if at == n => Err(e),
            _ => f(&mut g),
        };
        if g.crash_after == Some(n) {
            g.crashed = Some(g.image(true));
        }
        r
    }

    fn read<T>(&self, f: impl FnOnce(&Inner) -> Result<T>) -> Result<T> {
        f(&self.0.lock())
    }
}

fn sim(f: &StoreFile) -> Result<u64> {
    match f {
        StoreFile::Sim(i) => Ok(*i),
        StoreFile::Real(_) => Err(Errno::BADF),
    }
}

impl UpperStore for SimStore {
    fn mkdir(&self, at: Base, rel: &Path, mode: u32) -> Result<()> {
        self.op(|s| s.make(at, rel, Kind::Dir, mode, 0, OsStr::new("")).map(drop))
    }

    fn create_file(&self, at: Base, rel: &Path, mode: u32, _flags: OFlags) -> Result<StoreFile> {
        self.op(|s| s.make(at, rel, Kind::File, mode, 0, OsStr::new("")).map(StoreFile::Sim))
    }

    fn write_at(&self, f: &StoreFile, off: u64, data: &[u8]) -> Result<usize> {
        let ino = sim(f)?;
        self.op(|s| {
            let d = &mut s.node(ino).cur.data;
            let end = off as usize + data.len();
            if d.len() < end {
                d.resize(end, 0);
            }
            d[off as usize..end].copy_from_slice(data);
            Ok(data.len())
        })
    }

    fn copy_from(&self, f: &StoreFile, input: BorrowedFd<'_>, len: u64) -> crate::error::Result<()> {
        let ino = sim(f)?;
        let mut buf = vec![0u8; len as usize];
        let mut done = 0;
        while done < buf.len() {
            let n = rustix::io::pread(input, &mut buf[done..], done as u64)?;
            if n == 0 {
                break;
            }
            done += n;
        }
        buf.truncate(done);
        buf.resize(len as usize, 0);
        self.op(|s| {
            s.node(ino).cur.data = buf;
            Ok(())
        })?;
        Ok(())
    }

    fn set_len(&self, f: &StoreFile, len: u64) -> Result<()> {
        let ino = sim(f)?;
        self.op(|s| {
            s.node(ino).cur.data.resize(len as usize, 0);
            Ok(())
        })
    }

    fn fchown(&self, f: &StoreFile, uid: u32, gid: u32) -> Result<()> {
        let ino = sim(f)?;
        self.op(|s| {
            let n = s.node(ino);
            n.cur.uid = uid;
            n.cur.gid = gid;
            Ok(())
        })
    }

    fn fsync_file(&self, f: &StoreFile) -> Result<()> {
        let ino = sim(f)?;
        self.op(|s| {
            let n = s.node(ino);
            n.dur = n.cur.clone();
            Ok(())
        })
    }

    fn fsync_dir(&self, at: Base, rel: &Path) -> Result<()> {
        self.op(|s| {
            let ino = s.get(at, rel)?;
            let n = s.node(ino);
            if n.kind != Kind::Dir {
                return Err(Errno::NOTDIR);
            }
            n.dur = n.cur.clone();
            Ok(())
        })
    }

    fn syncfs(&self) -> Result<()> {
        self.op(|s| {
            for n in s.inodes.values_mut() {
                n.dur = n.cur.clone();
            }
            Ok(())
        })
    }

    fn rename(&self, from: Base, old: &Path, to: Base, new: &Path, flags: RenameFlags) -> Result<()> {
        self.op(|s| {
            if flags.contains(RenameFlags::WHITEOUT) && s.refuse_rename_whiteout {
                return Err(Errno::INVAL);
            }
            let (op, on) = s.parent(from, old)?;
            let (np, nn) = s.parent(to, new)?;
            let src = s.child(op, &on).ok_or(Errno::NOENT)?;
            let dst = s.child(np, &nn);
            if flags.contains(RenameFlags::EXCHANGE) {
                let dst = dst.ok_or(Errno::NOENT)?;
                s.node(op).cur.entries.insert(on, dst);
                s.node(np).cur.entries.insert(nn, src);
                return Ok(());
            }
            if let Some(d) = dst {
                if d == src {
                    return Ok(());
                }
                if flags.contains(RenameFlags::NOREPLACE) {
                    return Err(Errno::EXIST);
                }
                let (sk, dk) = (s.inodes[&src].kind, s.inodes[&d].kind);
                match (sk == Kind::Dir, dk == Kind::Dir) {
                    (true, false) => return Err(Errno::NOTDIR),
                    (false, true) => return Err(Errno::ISDIR),
                    (true, true) if !s.inodes[&d].cur.entries.is_empty() => return Err(Errno::NOTEMPTY),
                    _ => {}
                }
            }
            s.node(op).cur.entries.remove(&on);
            s.node(np).cur.entries.insert(nn, src);
            if flags.contains(RenameFlags::WHITEOUT) {
                s.make(from, old, Kind::Char, 0, 0, OsStr::new(""))?;
            }
            Ok(())
        })
    }

    fn link(&self, from: Base, old: &Path, to: Base, new: &Path) -> Result<()> {
        self.op(|s| {
            let src = s.get(from, old)?;
            if s.inodes[&src].kind == Kind::Dir {
                return Err(Errno::PERM);
            }
            let (np, nn) = s.parent(to, new)?;
            if s.child(np, &nn).is_some() {
                return Err(Errno::EXIST);
            }
            s.node(np).cur.entries.insert(nn, src);
            Ok(())
        })
    }

    fn unlink(&self, at: Base, rel: &Path) -> Result<()> {
        self.op(|s| {
            let (p, name) = s.parent(at, rel)?;
            let ino = s.child(p, &name).ok_or(Errno::NOENT)?;
            if s.inodes[&ino].kind == Kind::Dir {
                return Err(Errno::ISDIR);
            }
            s.node(p).cur.entries.remove(&name);
            Ok(())
        })
    }

    fn rmdir(&self, at: Base, rel: &Path) -> Result<()> {
        self.op(|s| {
            let (p, name) = s.parent(at, rel)?;
            let ino = s.child(p, &name).ok_or(Errno::NOENT)?;
            if s.inodes[&ino].kind != Kind::Dir {
                return Err(Errno::NOTDIR);
            }
            if !s.inodes[&ino].cur.entries.is_empty() {
                return Err(Errno::NOTEMPTY);
            }
            s.node(p).cur.entries.remove(&name);
            Ok(())
        })
    }

    fn mknod(&self, at: Base, rel: &Path, ft: FileType, mode: u32, rdev: u64) -> Result<()> {
        let kind = Kind::from_mode(ft.as_raw_mode());
        self.op(|s| s.make(at, rel, kind, mode, rdev, OsStr::new("")).map(drop))
    }

    fn symlink(&self, target: &OsStr, at: Base, rel: &Path) -> Result<()> {
        self.op(|s| s.make(at, rel, Kind::Symlink, 0o777, 0, target).map(drop))
    }

    fn set_xattr(&self, at: Base, rel: &Path, name: &OsStr, value: &[u8], _flags: XattrFlags) -> Result<()> {
        self.op(|s| {
            let ino = s.get(at, rel)?;
            s.node(ino).cur.xattrs.insert(name.to_os_string(), value.to_vec());
            Ok(())
        })
    }

    fn remove_xattr(&self, at: Base, rel: &Path, name: &OsStr) -> Result<()> {
        self.op(|s| {
            let ino = s.get(at, rel)?;
            s.node(ino).cur.xattrs.remove(name).map(drop).ok_or(Errno::NODATA)
        })
    }

    fn chown(&self, at: Base, rel: &Path, uid: Option<u32>, gid: Option<u32>) -> Result<()> {
        self.op(|s| {
            let ino = s.get(at, rel)?;
            let n = s.node(ino);
            n.cur.uid = uid.unwrap_or(n.cur.uid);
            n.cur.gid = gid.unwrap_or(n.cur.gid);
            Ok(())
        })
    }

    fn chmod(&self, at: Base, rel: &Path, mode: u32) -> Result<()> {
        self.op(|s| {
            let ino = s.get(at, rel)?;
            s.node(ino).cur.mode = mode & 0o7777;
            Ok(())
        })
    }

    fn utimens(&self, at: Base, rel: &Path, _times: &Timestamps) -> Result<()> {
        self.op(|s| s.get(at, rel).map(drop))
    }

    fn truncate(&self, at: Base, rel: &Path, len: u64) -> Result<()> {
        self.op(|s| {
            let ino = s.get(at, rel)?;
            s.node(ino).cur.data.resize(len as usize, 0);
            Ok(())
        })
    }

    fn stat(&self, at: Base, rel: &Path) -> Result<Option<Meta>> {
        self.read(|s| {
            Ok(s.lookup(at, rel)?.map(|i| {
                let n = &s.inodes[&i];
                Meta {
                    kind: n.kind,
                    mode: n.cur.mode,
                    size: n.cur.data.len() as u64,
                    rdev: n.rdev,
                }
            }))
        })
    }

    fn read_dir(&self, at: Base, rel: &Path) -> Result<Vec<(OsString, Option<Kind>)>> {
        self.read(|s| {
            let ino = s.get(at, rel)?;
            let n = &s.inodes[&ino];
            if n.kind != Kind::Dir {
                return Err(Errno::NOTDIR);
            }
            Ok(n.cur
                .entries
                .iter()
                .map(|(k, i)| (k.clone(), Some(s.inodes[i].kind)))
                .collect())
        })
    }

    fn get_xattr(&self, at: Base, rel: &Path, name: &OsStr) -> Result<Option<Vec<u8>>> {
        self.read(|s| {
            let ino = s.get(at, rel)?;
            Ok(s.inodes[&ino].cur.xattrs.get(name).cloned())
        })
    }
}
