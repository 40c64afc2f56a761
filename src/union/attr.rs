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
    /// node, or the fd kept at its removal ([`Node::gone_fd`]: directories and the special
    /// files the kernel opens itself); with `need_upper`, only one on the upper object (never
    /// change a lower through an fd).
    ///
    /// A change through an fd of an unlinked lower file (only read-only fds stay on a lower)
    /// fails with EEXIST, as on kernel overlayfs: its copy-up links the copy at the name the
    /// file had (`ovl_copy_up_tmpfile`, linkat onto the dentry's old name), where the unlink
    /// left a whiteout.
    pub(super) fn unlinked_fd(&self, node: &Node, fh: Option<u64>, need_upper: bool) -> Result<Arc<OwnedFd>> {
        // A removed lower directory's copy-up renames the copy onto its old name, where the
        // removal left a whiteout: ENOTDIR from rename(2) on kernel overlayfs (seed 4614).
        let kept = || match node.gone_fd.lock().clone() {
            Some((fd, on_upper)) if on_upper || !need_upper => Ok(fd),
            Some(_) if node.kind == Kind::Dir => errno(libc::ENOTDIR),
            Some(_) => errno(libc::EEXIST),
            None => errno(libc::ENOENT),
        };
        if node.kind == Kind::Dir {
            return kept();
        }
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
            None => kept(),
        }
    }

    /// Before a directory, fifo, device, socket or symlink is removed or replaced: keep an fd
    /// on its object in `gone_fd`, for requests through an fd the kernel still has open on it
    /// (as kernel overlayfs answers them from the removed inode; a regular file has the
    /// daemon's own handles). O_PATH for the non-directories: it opens no device and joins no
    /// fifo. Dropped with the node, when the kernel forgets it. Best effort: without it those
    /// requests fail with ENOENT.
    pub(super) fn keep_gone(&self, node: &Node) {
        let flags = match node.kind {
            Kind::File => return,
            Kind::Dir => OFlags::RDONLY | OFlags::DIRECTORY,
            _ => OFlags::PATH,
        };
        let st = node.snapshot();
        let fd = if st.upper {
            self.path_of(node)
                .and_then(|p| self.upper()?.dir.open_file(&p, flags))
                .map(|fd| (fd, true))
        } else {
            let lref = match node.kind {
                Kind::Dir => st.lowers.first(),
                _ => st.lower.as_ref(),
            };
            lref.ok_or(Error::Errno(libc::ENOENT))
                .and_then(|l| self.lowers[l.layer].open_file(&l.path, flags))
                .map(|fd| (fd, false))
        };
        match fd {
            Ok((fd, on_upper)) => *node.gone_fd.lock() = Some((Arc::new(fd), on_upper)),
            Err(e) => debug!(op = "keep_gone", ino = node.id, "no fd on a removed object: {e}"),
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
                // Owner, mode and times as changed through an fd since the removal.
                if let Ok(fd) = self.unlinked_fd(node, None, false) {
                    let now = self.attr_from(node, &rustix::fs::fstat(&*fd)?);
                    (a.uid, a.gid, a.perm) = (now.uid, now.gid, now.perm);
                    (a.atime, a.mtime, a.ctime) = (now.atime, now.mtime, now.ctime);
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
    /// An empty SETATTR (FUSE_HANDLE_KILLPRIV_V2) from a non-root caller: a chown that removes
    /// bits is a chmod, for the owner only (setattr_prepare), so EPERM before any copy-up;
    /// the kernel's kill before a write is allowed. Told apart by the syscall the caller is
    /// in ([`caller_in_chown`]); where that cannot be read, a node with a writable handle is
    /// taken to be written. A fifo or device node is never killed for a write (the kernel
    /// does that for regular files only), so there it is a chown (seed 6209: a setuid fifo).
    fn check_empty_setattr(&self, ctx: &Ctx, node: &Node) -> Result<()> {
        let st = self.real_stat(node)?;
        let gid = self.opts.ids.gid_from_disk(st.st_gid);
        let owner = self.opts.ids.uid_from_disk(st.st_uid) == ctx.uid;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return match chown_privs_to_kill(ctx, st.st_mode, gid) != 0 && !owner {
                true => errno(libc::EPERM),
                false => Ok(()),
            };
        }
        let kill = privs_to_kill(ctx, st.st_mode, gid);
        if kill == 0 || owner {
            return Ok(());
        }
        let chown = caller_in_chown(ctx).unwrap_or_else(|| {
            !node
                .handles
                .lock()
                .iter()
                .filter_map(std::sync::Weak::upgrade)
                .any(|h| h.writable)
        });
        if chown {
            return errno(libc::EPERM);
        }
        Ok(())
    }

    /// After the daemon's own chown of `path` (mode `before` until then): clear the setgid a
    /// caller without CAP_FSETID also loses (privs_to_kill; chown_privs_to_kill for a fifo or
    /// device node, which only a chown clears), which the capable daemon kept.
    fn kill_privs_after(
        &self,
        ctx: &Ctx,
        up: &crate::upper::Change<'_>,
        path: &Path,
        before: &Stat,
    ) -> Result<()> {
        let gid = self.opts.ids.gid_from_disk(before.st_gid);
        let kill = match before.st_mode & libc::S_IFMT == libc::S_IFREG {
            true => privs_to_kill(ctx, before.st_mode, gid),
            false => chown_privs_to_kill(ctx, before.st_mode, gid),
        };
        if let (true, Some(now)) = (kill != 0, up.dir.stat(path)?) {
            up.chmod(path, now.st_mode & 0o7777 & !kill)?;
        }
        Ok(())
    }

    /// FUSE setattr.
    pub fn setattr(&self, ctx: &Ctx, id: u64, fh: Option<u64>, sa: SetAttr) -> Result<Attr> {
        let node = self.node(id)?;
        let unlinked = node.state.read().unlinked;
        if unlinked {
            let times_only = sa.size.is_none() && sa.uid.is_none() && sa.gid.is_none() && sa.mode.is_none();
            if self.opts.writeback
                && times_only
                && node.kind != Kind::Dir
                && self
                    .unlinked_fd(&node, fh, true)
                    .is_err_and(|e| matches!(e.errno(), libc::ENOENT | libc::EEXIST))
            {
                // With the writeback cache the kernel writes back the times of a file whose
                // last name went (unlink and rename-over mark its ctime) at its next close or
                // writeback: when no fd on an upper object is left (none, or only read-only
                // ones on the lower file), there is nothing to set. An error here would be
                // recorded as a write-back error and fail that close(2), or the mount's next
                // syncfs (`verlay commit` stops on it); the kernel ignores the attributes.
                return Ok(self.attr(&node, fh).unwrap_or_else(|_| gone_file_attr(&node)));
            }
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
        // With FUSE_HANDLE_KILLPRIV_V2, chown(-1, -1) and the kernel's file_remove_privs (a
        // write by a caller without CAP_FSETID to a setuid/setgid file, passthrough writes
        // included, which never reach the daemon) arrive as a SETATTR that changes nothing.
        let nothing = sa.mode.is_none()
            && sa.uid.is_none()
            && sa.gid.is_none()
            && sa.size.is_none()
            && sa.atime.is_none()
            && sa.mtime.is_none();
        if nothing && ctx.uid != 0 {
            self.check_empty_setattr(ctx, &node)?;
        }
        let up = self.change()?;
        self.copy_up_with(&node, sa.size != Some(0))?;
        let path = self.path_of(&node)?;
        if nothing {
            // The upper's own chown(-1, -1) drops what any chown drops (setuid, group-executable
            // setgid, security.capability); a caller without CAP_FSETID also loses setgid
            // outside its group (privs_to_kill), as on kernel overlayfs. (A root write to a
            // setuid file with file capabilities sends the same request, and so loses setuid
            // too; kernel overlayfs keeps it.)
            let before = up.dir.stat(&path)?;
            up.chown(&path, None, None)?;
            if let (Some(st), true) = (before, ctx.uid != 0) {
                self.kill_privs_after(ctx, &up, &path, &st)?;
            }
        }
        if sa.uid.is_some() || sa.gid.is_some() {
            // The upper's own chown (the daemon's, capable) drops setuid and group-executable
            // setgid; a caller outside the old group also loses setgid (chown_common asks
            // setattr_should_drop_sgid with the caller's credentials, before the change).
            let before = match sa.kill_suid_gid && ctx.uid != 0 {
                true => up.dir.stat(&path)?,
                false => None,
            };
            up.chown(
                &path,
                sa.uid.map(|u| self.opts.ids.uid_to_disk(u)),
                sa.gid.map(|g| self.opts.ids.gid_to_disk(g)),
            )?;
            if let Some(st) = before {
                self.kill_privs_after(ctx, &up, &path, &st)?;
            }
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

/// The attributes answered for a file that no name and no fd reach any more (see
/// [`Union::setattr`]): its type and st_ino, no links, the rest zero.
fn gone_file_attr(node: &Node) -> Attr {
    let zero = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    Attr {
        ino: node.ino.load(Ordering::Relaxed),
        size: 0,
        blocks: 0,
        atime: zero,
        mtime: zero,
        ctime: zero,
        kind: node.kind,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
    }
}
