//! Attributes: stat of the real object, st_ino/st_nlink as kernel overlayfs reports them,
//! getattr and readlink.
//! setattr (chmod, chown, truncate, utimes).

use super::*;

impl Union {
    /// lstat of the real object behind a node.
    pub(super) fn real_stat(&self, node: &Node) -> Result<Stat> {
        let st = node.snapshot();
        if st.unlinked {
            return errno(libc::ENOENT);
        }
        if st.upper || node.id == ROOT_ID && self.upper.is_some() {
            let path = self.path_of(node)?;
            return self.upper()?.dir.stat(&path)?.ok_or(Error::Errno(libc::ENOENT));
        }
        let lref = match node.kind {
            Kind::Dir => st.lowers.first().cloned(),
            _ => st.lower.clone(),
        };
        let lref = lref.ok_or(Error::Errno(libc::ENOENT))?;
        self.lower_stat(lref.layer, &lref.path)?
            .ok_or(Error::Errno(libc::ENOENT))
    }

    pub(super) fn attr_from(&self, node: &Node, st: &Stat) -> Attr {
        let state = node.state.read();
        let kind = Kind::from_mode(st.st_mode);
        let mut nlink = st.st_nlink as u32; // an open, unlinked lower file keeps its lower count, as in the kernel
        if kind == Kind::Dir {
            // Kernel overlayfs reports nlink 1 for merged directories: the real count of
            // any one layer is wrong, and tools read 1 as "unknown".
            let merged = (state.upper && !state.lowers.is_empty()) || state.lowers.len() > 1;
            if merged {
                nlink = 1;
            }
        }
        let ino = node.ino();
        Attr {
            ino,
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            atime: ts_of(st.st_atime, st.st_atime_nsec as i64),
            mtime: ts_of(st.st_mtime, st.st_mtime_nsec as i64),
            ctime: ts_of(st.st_ctime, st.st_ctime_nsec as i64),
            kind,
            perm: st.st_mode & 0o7777,
            nlink,
            uid: self.opts.ids.uid_from_disk(st.st_uid),
            gid: self.opts.ids.gid_from_disk(st.st_gid),
            rdev: st.st_rdev,
            blksize: st.st_blksize as u32,
        }
    }

    /// An fd on the object of an unlinked node: the request's handle, or any open one of the
    /// node; with `need_upper`, only one on the upper object (never change a lower through
    /// an fd).
    ///
    /// A change through an fd of an unlinked lower file (only read-only fds stay on a lower)
    /// fails with EEXIST, as on kernel overlayfs: its copy-up links the copy at the name the
    /// file had (`ovl_copy_up_tmpfile`, linkat onto the dentry's old name), where the unlink
    /// left a whiteout.
    pub(super) fn unlinked_fd(&self, node: &Node, fh: Option<u64>, need_upper: bool) -> Result<Arc<OwnedFd>> {
        let ok = |h: &FileHandle| !need_upper || h.on_upper.load(Ordering::Acquire);
        if let Some(h) = fh.and_then(|fh| self.file(fh).ok()) {
            if ok(&h) {
                return Ok(h.fd.read().clone());
            }
        }
        let handles: Vec<_> = node.handles.lock().iter().filter_map(|w| w.upgrade()).collect();
        match handles.iter().find(|h| ok(h)) {
            Some(h) => Ok(h.fd.read().clone()),
            None if !handles.is_empty() => errno(libc::EEXIST),
            None => errno(libc::ENOENT),
        }
    }

    pub(super) fn attr(&self, node: &Node, fh: Option<u64>) -> Result<Attr> {
        let unlinked = node.state.read().unlinked;
        if unlinked {
            if node.kind == Kind::Dir {
                // A removed directory that is still open: what it was. The kernel reports
                // nlink 1 for a merged one (its rule for merged dirs), 0 for an upper one, and
                // the lower directory's own count for one that lives in a single lower layer
                // (that directory is still there).
                let mut a = *node.gone_attr.lock().clone().ok_or(Error::Errno(libc::ENOENT))?;
                if a.nlink != 1 && node.state.read().upper {
                    a.nlink = 0;
                }
                return Ok(a);
            }
            match self.unlinked_fd(node, fh, false) {
                Ok(fd) => {
                    let st = rustix::fs::fstat(&*fd)?;
                    return Ok(self.attr_from(node, &st));
                }
                Err(e) => {
                    // A device node or fifo opened by the kernel itself has no handle here:
                    // report what it was. A removed upper object has no links left; a
                    // lower one keeps its lower count, as in the kernel.
                    let Some(a) = node.gone_attr.lock().clone() else {
                        return Err(e);
                    };
                    let mut a = *a;
                    if node.state.read().upper {
                        a.nlink = 0;
                    }
                    return Ok(a);
                }
            }
        }
        let st = self.real_stat(node)?;
        Ok(self.attr_from(node, &st))
    }

    /// FUSE getattr.
    pub fn getattr(&self, id: u64, fh: Option<u64>) -> Result<Attr> {
        let node = self.node(id)?;
        self.attr(&node, fh)
    }

    /// FUSE readlink.
    pub fn readlink(&self, id: u64) -> Result<OsString> {
        let node = self.node(id)?;
        if node.kind != Kind::Symlink {
            return errno(libc::EINVAL);
        }
        let st = node.snapshot();
        if st.upper {
            let path = self.path_of(&node)?;
            self.upper()?.dir.readlink(&path)
        } else {
            let l = st.lower.ok_or(Error::Errno(libc::ENOENT))?;
            self.lowers[l.layer].readlink(&l.path)
        }
    }
}

impl Union {
    /// FUSE setattr.
    pub fn setattr(&self, ctx: &Ctx, id: u64, fh: Option<u64>, sa: SetAttr) -> Result<Attr> {
        let node = self.node(id)?;
        let unlinked = node.state.read().unlinked;
        if unlinked {
            // Only an open file can be reached once unlinked: work on its fd.
            let up = self.change()?;
            let fd = self.unlinked_fd(&node, fh, true)?;
            let f = up.file(fd.clone());
            if let Some(size) = sa.size {
                f.set_len(size)?;
                self.remove_privs(ctx, id, &up, &fd)?;
            }
            if sa.uid.is_some() || sa.gid.is_some() {
                f.set_owner(
                    sa.uid.map(|u| self.opts.ids.uid_to_disk(u)),
                    sa.gid.map(|g| self.opts.ids.gid_to_disk(g)),
                )?;
            }
            if let Some(mode) = sa.mode {
                f.set_mode(mode)?;
            }
            if sa.atime.is_some() || sa.mtime.is_some() {
                f.set_times(&timestamps(&sa))?;
            }
            return self.attr(&node, fh);
        }
        let up = self.change()?;
        self.copy_up_with(&node, sa.size != Some(0))?;
        let path = self.path_of(&node)?;
        if sa.uid.is_some() || sa.gid.is_some() {
            up.chown(
                &path,
                sa.uid.map(|u| self.opts.ids.uid_to_disk(u)),
                sa.gid.map(|g| self.opts.ids.gid_to_disk(g)),
            )?;
        }
        if let Some(mode) = sa.mode {
            up.chmod(&path, mode)?;
        }
        if let Some(size) = sa.size {
            match fh.and_then(|fh| self.file(fh).ok()).filter(|h| h.writable) {
                Some(h) => {
                    let fd = h.fd.read().clone();
                    up.file(fd).set_len(size)?;
                }
                None => up.truncate(&path, size)?,
            }
            // A truncation removes setuid/setgid for the caller (do_truncate asks
            // should_remove_suid); the daemon truncates as root, so do it here.
            if ctx.uid != 0 {
                if let Some(st) = up.dir.stat(&path)? {
                    let gid = self.opts.ids.gid_from_disk(st.st_gid);
                    let kill = privs_to_kill(ctx, st.st_mode, gid);
                    if kill != 0 {
                        up.chmod(&path, st.st_mode & 0o7777 & !kill)?;
                    }
                }
            }
        }
        if sa.atime.is_some() || sa.mtime.is_some() {
            up.utimens(&path, &timestamps(&sa))?;
        }
        self.attr(&node, fh)
    }
}
