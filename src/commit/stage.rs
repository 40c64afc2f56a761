//! The staging dir of a commit, `STORE/tmp/commit-PID-NANOS`, on the store's filesystem:
//! the frozen copy of the upper's file data (`data/`), and, when a directory was renamed,
//! the snapshot laid out again as an upper tree (`upper/`) with a read-only union over it
//! and the lowers: the merged view at the commit instant.
//!
//! Must not: write anywhere but the staging dir; outlive the commit (a crash leaves it to
//! the next store operation, which empties `STORE/tmp`).

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timestamps, XattrFlags};
use tracing::warn;

use super::snapshot::{DataLoc, Snap};
use crate::error::{Error, Result};
use crate::layer::{Kind, LayerDir};
use crate::store::Store;

/// Buffer for copying file data where the kernel cannot (and into the tar stream).
pub(super) const COPY_BUF: usize = 1 << 20;

/// Offsets in `data/packed` are multiples of this (a filesystem block), so each file's
/// holes stay holes and its data is block-aligned.
pub(super) const PACK_ALIGN: u64 = 4096;

/// Step 1's store check, before anything changes: `store` is a directory outside the
/// mount (st_dev `mount_dev`).
pub(super) fn check_store(store: &Path, mount_dev: u64) -> Result<()> {
    let store_what = || format!("store \"{}\"", store.display());
    let sst = match rustix::fs::stat(store) {
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => st,
        Ok(_) => {
            return Err(Error::usage(
                store_what(),
                "not a directory",
                "give --store a layer store directory",
            ))
        }
        Err(e) => {
            return Err(Error::usage(
                store_what(),
                io::Error::from(e).to_string(),
                "create it (mkdir) or give the --store of an existing layer store",
            ))
        }
    };
    if sst.st_dev == mount_dev {
        return Err(Error::usage(
            store_what(),
            "it is inside the mount being committed (the copy would wait for the writers it pauses)",
            "put the store outside the mount",
        ));
    }
    Ok(())
}

/// The staging copy of the upper's file data: `data/ID` files (reflinks) and one packed
/// file holding every copied file at its own offset. Packing keeps the freeze to one
/// create in all, where a file per copy costs a create (and a journal entry) each.
pub(super) struct Staged {
    pub dir: OwnedFd,
    pub packed: OwnedFd,
}

impl Staged {
    pub fn open_file(&self, id: u64) -> rustix::io::Result<OwnedFd> {
        rustix::fs::openat(
            &self.dir,
            id.to_string().as_str(),
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
    }
}

/// The staging dir. Dropping it removes it, however the commit ends.
pub(super) struct Staging(PathBuf);

impl Staging {
    /// Make the staging dir in `STORE/tmp`, with its empty `data/` and `data/packed`.
    pub fn create(store: &Store) -> Result<(Staging, Staged)> {
        let staging = store.tmp_path("commit");
        std::fs::create_dir(&staging).map_err(|e| Error::io("commit.staging", &staging, e))?;
        let staging = Staging(staging);
        let data_path = staging.0.join("data");
        std::fs::create_dir(&data_path).map_err(|e| Error::io("commit.staging", &data_path, e))?;
        let dir = rustix::fs::open(
            &data_path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io("commit.staging", &data_path, e.into()))?;
        let packed = rustix::fs::openat(
            &dir,
            "packed",
            OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| Error::io("commit.staging", &data_path, e.into()))?;
        Ok((staging, Staged { dir, packed }))
    }

    /// Step 6: lay the snapshot out as an upper tree in `upper/` and open the merged view
    /// over it and `lowers`. Also returns, per staged inode id, the st_ino of its file in
    /// that tree (the union's inode numbers of hard links derive from it).
    pub fn merged_view(
        &self,
        data: &Staged,
        snap: &Snap,
        lowers: &[PathBuf],
    ) -> Result<(crate::union::Union, HashMap<u64, u64>)> {
        let tree = self.0.join("upper");
        std::fs::create_dir(&tree).map_err(|e| Error::io("commit.materialize", &tree, e))?;
        let tree_fd = rustix::fs::open(
            &tree,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io("commit.materialize", &tree, e.into()))?;
        let mut made = HashMap::new();
        materialize(&tree_fd, data, Path::new(""), snap, true, &mut made)?;
        let inos = made.into_iter().map(|(id, (_, ino))| (id, ino)).collect();
        Ok((merged_view(&tree, lowers)?, inos))
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            if e.kind() != io::ErrorKind::NotFound {
                warn!(path = %self.0.display(), error = %e, "could not remove the commit's staging dir");
            }
        }
    }
}

/// Copy `len` bytes from `src` at `src_off` to `dst` at `dst_off`, skipping holes
/// (SEEK_DATA/SEEK_HOLE) and letting the kernel copy (copy_file_range), with a read/write
/// fallback across filesystems.
pub(super) fn copy_range(
    src: &OwnedFd,
    src_off: u64,
    dst: &OwnedFd,
    dst_off: u64,
    len: u64,
) -> rustix::io::Result<()> {
    use rustix::io::Errno;
    let end = src_off + len;
    let mut pos = src_off;
    let mut buf = Vec::new();
    while pos < end {
        let data = match rustix::fs::seek(src, rustix::fs::SeekFrom::Data(pos)) {
            Ok(d) => d,
            Err(Errno::NXIO) => break, // only a hole remains
            Err(Errno::INVAL | Errno::NOTSUP) => pos,
            Err(e) => return Err(e),
        };
        if data >= end {
            break;
        }
        let hole = rustix::fs::seek(src, rustix::fs::SeekFrom::Hole(data)).map_or(end, |h| h.min(end));
        let mut off_in = data;
        let mut off_out = dst_off + (data - src_off);
        while off_in < hole {
            let want = (hole - off_in).min(1 << 30) as usize;
            match rustix::fs::copy_file_range(src, Some(&mut off_in), dst, Some(&mut off_out), want) {
                Ok(0) => return Err(Errno::NODATA), // shorter than it said: never when frozen
                Ok(_) => {}
                Err(Errno::XDEV | Errno::NOSYS | Errno::INVAL | Errno::OPNOTSUPP) => {
                    buf.resize(COPY_BUF, 0);
                    let n = rustix::io::pread(src, &mut buf[..want.min(COPY_BUF)], off_in)?;
                    if n == 0 {
                        return Err(Errno::NODATA);
                    }
                    let mut done = 0;
                    while done < n {
                        done += rustix::io::pwrite(dst, &buf[done..n], off_out + done as u64)?;
                    }
                    off_in += n as u64;
                    off_out += n as u64;
                }
                Err(e) => return Err(e),
            }
        }
        pos = hole;
    }
    Ok(())
}

/// Lay the snapshot out as an upper tree at `dir/rel` (owners, modes, raw xattrs, times),
/// file data hard-linked from `data/` (so hard links stay links).
fn materialize(
    dir: &OwnedFd,
    data: &Staged,
    rel: &Path,
    s: &Snap,
    root: bool,
    made: &mut HashMap<u64, (PathBuf, u64)>,
) -> Result<()> {
    let at = if root { Path::new(".") } else { rel };
    let err = |op: &'static str| move |e: rustix::io::Errno| Error::io(op, rel, e.into());
    match s.kind {
        Kind::Dir => {
            if !root {
                rustix::fs::mkdirat(dir, at, Mode::from_raw_mode(0o700)).map_err(err("commit.mkdir"))?;
            }
            for c in &s.children {
                materialize(dir, data, &rel.join(&c.name), c, false, made)?;
            }
        }
        Kind::File => materialize_file(dir, data, rel, at, s, made)?,
        Kind::Symlink => {
            let t = s.target.clone().unwrap_or_default();
            rustix::fs::symlinkat(t.as_os_str(), dir, at).map_err(err("commit.symlink"))?;
        }
        k => {
            let ft = match k {
                Kind::Char => FileType::CharacterDevice,
                Kind::Block => FileType::BlockDevice,
                Kind::Socket => FileType::Socket,
                _ => FileType::Fifo,
            };
            rustix::fs::mknodat(dir, at, ft, Mode::from_raw_mode(0o600), s.rdev)
                .map_err(err("commit.mknod"))?;
        }
    }
    set_metadata(dir, rel, at, s)
}

/// A regular file of the tree: a link to its staged data file, a copy out of
/// `data/packed`, or another link to a file of its link group already laid out.
fn materialize_file(
    dir: &OwnedFd,
    data: &Staged,
    rel: &Path,
    at: &Path,
    s: &Snap,
    made: &mut HashMap<u64, (PathBuf, u64)>,
) -> Result<()> {
    let err = |op: &'static str| move |e: rustix::io::Errno| Error::io(op, rel, e.into());
    let d = s
        .data
        .ok_or_else(|| Error::io("commit.materialize", rel, io::Error::other("no data")))?;
    if let Some((first, _)) = made.get(&d.id) {
        // Another name of an inode already laid out: a hard link again.
        return rustix::fs::linkat(dir, first.as_path(), dir, at, AtFlags::empty())
            .map_err(err("commit.link"));
    }
    match d.loc {
        DataLoc::File => rustix::fs::linkat(&data.dir, d.id.to_string().as_str(), dir, at, AtFlags::empty())
            .map_err(err("commit.link"))?,
        DataLoc::Packed(off) => {
            let f = rustix::fs::openat(
                dir,
                at,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .map_err(err("commit.create"))?;
            copy_range(&data.packed, off, &f, 0, d.size).map_err(err("commit.copy"))?;
            rustix::fs::ftruncate(&f, d.size).map_err(err("commit.copy"))?;
        }
    }
    let ino = rustix::fs::statat(dir, at, AtFlags::SYMLINK_NOFOLLOW)
        .map_err(err("commit.stat"))?
        .st_ino;
    made.insert(d.id, (rel.to_path_buf(), ino));
    Ok(())
}

/// Owner, mode, raw xattrs and times of a laid-out object, as the snapshot has them.
fn set_metadata(dir: &OwnedFd, rel: &Path, at: &Path, s: &Snap) -> Result<()> {
    let err = |op: &'static str| move |e: rustix::io::Errno| Error::io(op, rel, e.into());
    let uid = Some(rustix::fs::Uid::from_raw(s.uid));
    let gid = Some(rustix::fs::Gid::from_raw(s.gid));
    if let Err(e) = rustix::fs::chownat(dir, at, uid, gid, AtFlags::SYMLINK_NOFOLLOW) {
        // Rootless: files keep our own ids; the layer items come from the snapshot anyway.
        if e != rustix::io::Errno::PERM {
            return Err(err("commit.chown")(e));
        }
    }
    if s.kind != Kind::Symlink {
        rustix::fs::chmodat(dir, at, Mode::from_raw_mode(s.perm), AtFlags::empty())
            .map_err(err("commit.chmod"))?;
        let fd = rustix::fs::openat(
            dir,
            at,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(err("commit.open"))?;
        let p = PathBuf::from(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd)));
        for (n, v) in &s.xattrs {
            rustix::fs::setxattr(&p, n.as_os_str(), v, XattrFlags::empty())
                .map_err(err("commit.setxattr"))?;
        }
    }
    let times = Timestamps {
        last_access: s.mtime,
        last_modification: s.mtime,
    };
    rustix::fs::utimensat(dir, at, &times, AtFlags::SYMLINK_NOFOLLOW).map_err(err("commit.utimens"))
}

/// A read-only union over the staging tree (as the top layer) and the mount's lowers: the
/// merged view at the commit instant, read with the same code that serves the mount.
fn merged_view(tree: &Path, lowers: &[PathBuf]) -> Result<crate::union::Union> {
    let mut layers = vec![LayerDir::open(tree, 1, "commit-staging".into())?];
    let mut verified = vec![None];
    for (i, l) in lowers.iter().enumerate() {
        layers.push(LayerDir::open(l, i + 2, format!("lower{i}"))?);
        verified.push(
            crate::lower::verify::VerifiedLayer::open(
                l,
                crate::lower::verify::VerifyMode::On,
                crate::estargz::lazy::chunk_source(l)?,
            )?
            .map(Arc::new),
        );
    }
    crate::union::Union::new(
        layers,
        None,
        crate::union::UnionOptions {
            ids: Default::default(),
            verified,
            passthrough: false,
            atime: Default::default(),
            writeback: false,
        },
    )
}
