//! Steps 1 (the mount's half), 3, 4 and 5 of a commit: find the mount's daemon, freeze the
//! mount through its control socket ([`crate::control`]), read the upper's tree into memory
//! and copy its file data into the staging dir, thaw.
//!
//! Must not: write to the upper or the mount; keep the gate for anything but the walk;
//! read a live upper file once the daemon has thawed.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rustix::fs::{AtFlags, Mode, OFlags, Timespec};
use tracing::info;

use super::stage::{copy_range, Staged, PACK_ALIGN};
use crate::control::{
    read_line, write_line, Op, Refusal, Reply, Request, Response, MAX_RESPONSE_LINE, PROTOCOL_VERSION,
};
use crate::error::{Error, Result};
use crate::failpoint::crash_point;
use crate::layer::{is_whiteout_stat, Kind, LayerDir};

/// Longest wait for one answer of the daemon: it answers at once, or after in-flight
/// requests leave the gate (freeze); one that says nothing for this long is wedged, and a
/// commit must fail, not wait with it.
const DAEMON_ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// A connection to the daemon of the mount being committed.
pub(super) struct Daemon {
    stream: UnixStream,
    lines: io::BufReader<UnixStream>,
    socket: PathBuf,
}

impl Daemon {
    fn request(&mut self, op: Op) -> io::Result<Reply> {
        let req = Request {
            v: PROTOCOL_VERSION,
            op,
        };
        write_line(&mut self.stream, &req)?;
        let Some(line) = read_line(&mut self.lines, MAX_RESPONSE_LINE)? else {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the daemon closed the control connection",
            ));
        };
        let resp: Response = serde_json::from_slice(&line).map_err(|e| {
            io::Error::other(format!(
                "unexpected answer {:?} ({e}; a daemon of another verlay version?)",
                String::from_utf8_lossy(&line)
            ))
        })?;
        if resp.v != PROTOCOL_VERSION {
            return Err(io::Error::other(format!(
                "the daemon speaks control protocol {}, this verlay {PROTOCOL_VERSION}",
                resp.v
            )));
        }
        Ok(resp.reply)
    }
}

/// The mount being committed, as its daemon describes it.
pub(super) struct LiveMount {
    /// st_dev of the mount
    pub dev: u64,
    pub upper: PathBuf,
    pub lowers: Vec<PathBuf>,
    pub xattr_prefix: String,
}

/// Check that `mp` is the root of a live verlay mount with an upper and connect to its
/// daemon.
pub(super) fn connect(mp: &Path) -> Result<(Daemon, LiveMount)> {
    let what = || format!("mount \"{}\"", mp.display());
    let canon = std::fs::canonicalize(mp).map_err(|e| {
        Error::usage(
            what(),
            e.to_string(),
            "give the mountpoint of a running verlay mount",
        )
    })?;
    let st = rustix::fs::stat(&canon).map_err(|e| Error::io("commit.stat", &canon, e.into()))?;
    let mounts = crate::control::mounts()?;
    let Some(m) = mounts
        .iter()
        .rev()
        .find(|m| m.dev == st.st_dev && m.mount_point == canon)
    else {
        return Err(Error::usage(
            what(),
            "not a verlay mount (not a mount point at all)",
            "give the mountpoint of a running verlay mount, not a directory inside it",
        ));
    };
    if m.fstype != "fuse.verlay" {
        return Err(Error::usage(
            what(),
            format!("not a verlay mount (its type is {})", m.fstype),
            "give the mountpoint of a running verlay mount",
        ));
    }
    let socket = crate::control::socket_path(st.st_dev);
    let stream = UnixStream::connect(&socket).map_err(|e| {
        Error::usage(
            what(),
            format!("its daemon does not answer on {} ({e})", socket.display()),
            "it may have been mounted by an older verlay, by another user, or its daemon died; remount it",
        )
    })?;
    stream
        .set_read_timeout(Some(DAEMON_ANSWER_WAIT))
        .map_err(|e| Error::io("commit.connect", &socket, e))?;
    let lines = io::BufReader::new(
        stream
            .try_clone()
            .map_err(|e| Error::io("commit.connect", &socket, e))?,
    );
    let mut d = Daemon {
        stream,
        lines,
        socket,
    };
    let desc = match d.request(Op::Info) {
        Ok(Reply::Mount(desc)) => desc,
        Ok(other) => {
            return Err(Error::io(
                "commit.info",
                &d.socket,
                io::Error::other(format!("unexpected answer {other:?}")),
            ))
        }
        Err(e) => return Err(Error::io("commit.info", &d.socket, e)),
    };
    let Some(upper) = desc.upper else {
        return Err(Error::usage(
            what(),
            "read-only verlay mount: it has no upper layer, so there is nothing to commit",
            "mount it with upperdir= and workdir=",
        ));
    };
    let mount = LiveMount {
        dev: st.st_dev,
        upper: PathBuf::from(upper.dir),
        lowers: desc.lowers.into_iter().map(PathBuf::from).collect(),
        xattr_prefix: upper.xattr_prefix,
    };
    Ok((d, mount))
}

/// Step 2's end, outside the freeze: flush what would otherwise reach the upper (or slow
/// the copy) while writers are paused.
pub(super) fn sync_before_freeze(mountpoint: &Path, upper: &LayerDir) -> Result<()> {
    // Pages a program dirtied through a shared mmap reach the daemon only at writeback:
    // syncfs of the mount sends them now, so the snapshot holds what was written before the
    // commit began. (Not while frozen: those writes would wait for the gate we hold.)
    let mp_fd = rustix::fs::open(
        mountpoint,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::io("commit.syncfs", mountpoint, e.into()))?;
    rustix::fs::syncfs(&mp_fd).map_err(|e| Error::io("commit.syncfs", mountpoint, e.into()))?;
    drop(mp_fd);
    // Write the upper's dirty pages back now, outside the freeze: the copy under the freeze
    // makes as many dirty pages again, and with both the kernel throttles the copier
    // (balance_dirty_pages), which lengthens the pause (seen: 2.8 s instead of 0.4 s, 1 GiB).
    rustix::fs::syncfs(&upper.root).map_err(|e| Error::io("commit.syncfs", &upper.path, e.into()))
}

/// One object of the frozen upper.
#[derive(Debug)]
pub(super) struct Snap {
    pub name: OsString,
    pub kind: Kind,
    pub whiteout: bool,
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u64,
    pub mtime: Timespec,
    /// xattrs as stored in the upper (overlay metadata included)
    pub xattrs: Vec<(OsString, Vec<u8>)>,
    pub target: Option<OsString>,
    /// regular files: the staging data file and its size
    pub data: Option<DataFile>,
    pub children: Vec<Snap>,
}

/// Where a regular file's frozen data is in the staging dir.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DataLoc {
    /// `data/ID`, a reflink of the upper file
    File,
    /// at this offset of `data/packed`
    Packed(u64),
}

/// The frozen data of one upper inode (hard links share it).
#[derive(Debug, Clone, Copy)]
pub(super) struct DataFile {
    /// one per upper inode, so it names a link group
    pub id: u64,
    pub loc: DataLoc,
    pub size: u64,
    /// links of the upper inode
    pub nlink: u64,
}

/// The frozen upper, and what taking it cost.
pub(super) struct Taken {
    pub root: Snap,
    /// entries of the upper
    pub entries: u64,
    /// bytes of file data copied
    pub bytes: u64,
    /// a directory carries `overlay.redirect` (the layer needs the merged view)
    pub redirects: bool,
    /// how long the daemon held writers, as it measured
    pub paused_us: u64,
}

/// Steps 3-5: freeze the mount, snapshot the upper into `data`, thaw.
pub(super) fn take(mut daemon: Daemon, upper: &LayerDir, data: &Staged, mountpoint: &Path) -> Result<Taken> {
    let asked = Instant::now();
    let frozen = daemon
        .request(Op::Freeze)
        .map_err(|e| Error::io("commit.freeze", &daemon.socket, e))?;
    match frozen {
        Reply::Frozen { .. } => {}
        Reply::Refused(Refusal::PassthroughWriters { count: n }) => {
            return Err(Error::usage(
                format!("verlay commit {}", mountpoint.display()),
                format!(
                    "{n} file(s) are open for writing on a mount with passthrough=1: their writes go \
                     straight to the upper file and cannot be paused for a point-in-time copy"
                ),
                "close them and commit again, or remount without passthrough=1",
            ))
        }
        other => {
            return Err(Error::io(
                "commit.freeze",
                &daemon.socket,
                io::Error::other(format!("the daemon refused: {other:?}")),
            ))
        }
    }
    let held = Instant::now();
    crash_point("commit.freeze");
    let mut walker = UpperSnapshot {
        upper,
        data,
        packed_end: 0,
        copied: HashMap::new(),
        next_id: 0,
        entries: 0,
        bytes: 0,
        redirects: false,
        reflinks: true,
    };
    let snap = walker
        .walk(Path::new(""), OsString::new())
        .and_then(|s| walker.finish().map(|()| s));
    crash_point("commit.snapshot");
    let thawed = daemon.request(Op::Thaw);
    let snap = snap?;
    // Without the daemon's answer we cannot know the gate was held to the end.
    let not_confirmed = |why: String| {
        Error::io(
            "commit.thaw",
            &daemon.socket,
            io::Error::other(format!(
                "the daemon did not confirm the freeze held ({why}); nothing was committed"
            )),
        )
    };
    let paused_us = match thawed {
        Ok(Reply::Thawed { paused_us }) => paused_us,
        Ok(other) => return Err(not_confirmed(format!("{other:?}"))),
        Err(e) => return Err(not_confirmed(e.to_string())),
    };
    crash_point("commit.thaw");
    drop(daemon);
    info!(
        step = "commit.thaw",
        paused_us,
        waited_us = held.duration_since(asked).as_micros() as u64,
        entries = walker.entries,
        bytes = walker.bytes,
        reflink = walker.reflinks,
        "snapshot of the upper taken; writers resumed"
    );
    Ok(Taken {
        root: snap,
        entries: walker.entries,
        bytes: walker.bytes,
        redirects: walker.redirects,
        paused_us,
    })
}

/// State of the walk that takes the snapshot.
struct UpperSnapshot<'a> {
    upper: &'a LayerDir,
    data: &'a Staged,
    /// end of the data in `data/packed`
    packed_end: u64,
    /// upper st_ino -> its data file, for hard links
    copied: HashMap<u64, DataFile>,
    next_id: u64,
    entries: u64,
    bytes: u64,
    redirects: bool,
    reflinks: bool,
}

impl UpperSnapshot<'_> {
    fn walk(&mut self, rel: &Path, name: OsString) -> Result<Snap> {
        let st = self
            .upper
            .stat(rel)?
            .ok_or_else(|| Error::io("commit.snapshot", rel, io::Error::from(io::ErrorKind::NotFound)))?;
        self.entries += 1;
        let kind = Kind::from_mode(st.st_mode);
        let mut xattrs = Vec::new();
        if kind != Kind::Symlink {
            for n in self.upper.list_xattr(rel)? {
                if let Some(v) = self.upper.get_xattr(rel, &n)? {
                    xattrs.push((n, v));
                }
            }
            xattrs.sort();
        }
        let mut snap = Snap {
            name,
            kind,
            whiteout: is_whiteout_stat(&st),
            perm: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev,
            mtime: Timespec {
                tv_sec: st.st_mtime,
                tv_nsec: st.st_mtime_nsec as _,
            },
            xattrs,
            target: None,
            data: None,
            children: Vec::new(),
        };
        match kind {
            Kind::Dir => {
                if snap
                    .xattrs
                    .iter()
                    .any(|(n, _)| n == "trusted.overlay.redirect" || n == "user.overlay.redirect")
                {
                    self.redirects = true;
                }
                let mut names: Vec<OsString> =
                    self.upper.read_dir(rel)?.into_iter().map(|e| e.name).collect();
                names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
                for n in names {
                    let child = self.walk(&rel.join(&n), n)?;
                    snap.children.push(child);
                }
            }
            Kind::Symlink => snap.target = Some(self.upper.readlink(rel)?),
            Kind::File => snap.data = Some(self.copy_data(rel, &st)?),
            _ => {}
        }
        Ok(snap)
    }

    fn copy_data(&mut self, rel: &Path, st: &rustix::fs::Stat) -> Result<DataFile> {
        if st.st_nlink > 1 {
            if let Some(d) = self.copied.get(&st.st_ino) {
                return Ok(*d);
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let ioerr = |e: rustix::io::Errno| Error::io("commit.snapshot", rel, e.into());
        let src = self.upper.open_file(rel, OFlags::RDONLY).map_err(|e| match e {
            Error::Errno(n) => Error::io("commit.snapshot", rel, io::Error::from_raw_os_error(n)),
            e => e,
        })?;
        // The size is the upper file's while frozen; the copy is what the layer gets.
        let size = rustix::fs::fstat(&src).map_err(ioerr)?.st_size as u64;
        let mut loc = None;
        if self.reflinks {
            let name = id.to_string();
            let dst = rustix::fs::openat(
                &self.data.dir,
                name.as_str(),
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .map_err(ioerr)?;
            if rustix::fs::ioctl_ficlone(&dst, &src).is_ok() {
                loc = Some(DataLoc::File);
            } else {
                // No reflink here (ext4, tmpfs, another filesystem): stop trying after the
                // first refusal, and pack copies instead.
                self.reflinks = false;
                drop(dst);
                rustix::fs::unlinkat(&self.data.dir, name.as_str(), AtFlags::empty()).map_err(ioerr)?;
            }
        }
        let loc = match loc {
            Some(l) => l,
            None => {
                let off = self.packed_end.next_multiple_of(PACK_ALIGN);
                copy_range(&src, 0, &self.data.packed, off, size)
                    .map_err(|e| Error::io("commit.copy", rel, io::Error::from(e)))?;
                self.packed_end = off + size;
                DataLoc::Packed(off)
            }
        };
        self.bytes += size;
        let d = DataFile {
            id,
            loc,
            size,
            nlink: st.st_nlink,
        };
        if st.st_nlink > 1 {
            self.copied.insert(st.st_ino, d);
        }
        Ok(d)
    }

    /// Give `data/packed` its full length (a trailing hole of the last file included).
    fn finish(&self) -> Result<()> {
        rustix::fs::ftruncate(&self.data.packed, self.packed_end)
            .map_err(|e| Error::io("commit.snapshot", "data/packed", e.into()))
    }
}
