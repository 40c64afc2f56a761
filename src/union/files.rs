//! Open files: open, read, write, fsync, fallocate, lseek, release, and FUSE passthrough;
//! the switch of open handles to the upper after a copy-up.

use super::*;

impl Union {
    /// Register an open file; `on_upper`: `fd` is on the upper object.
    ///
    /// Done under the node's handle lock, which a copy-up's handle switch also takes: a
    /// copy-up that finished after `fd` was opened on the lower is never missed (the handle
    /// is opened again on the upper copy, and has nothing left to verify). The passthrough
    /// choice is made under the same lock (see [`Union::wants_passthrough`]). `exec`: the
    /// kernel opened it to run it (an O_TRUNC open of the node is then ETXTBSY).
    pub(super) fn add_file(
        &self,
        node: Arc<Node>,
        fd: OwnedFd,
        on_upper: bool,
        writable: bool,
        verify: Option<HandleVerify>,
        exec: bool,
    ) -> Result<u64> {
        let mut hs = node.handles.lock();
        hs.retain(|w| w.strong_count() > 0);
        let (fd, on_upper, verify) = if !on_upper && node.state.read().upper {
            let path = self.path_of(&node)?;
            (self.upper()?.dir.open_file(&path, OFlags::RDONLY)?, true, None)
        } else {
            (fd, on_upper, verify)
        };
        let passthrough = self.wants_passthrough(&node, &hs, on_upper, verify.is_some());
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let h = Arc::new(FileHandle {
            fd: RwLock::new(Arc::new(fd)),
            writable,
            on_upper: std::sync::atomic::AtomicBool::new(on_upper),
            verify,
            passthrough: std::sync::atomic::AtomicBool::new(passthrough),
            exec,
        });
        hs.push(Arc::downgrade(&h));
        drop(hs);
        self.files.write().insert(fh, h);
        Ok(fh)
    }

    /// Should a new handle of `node` use FUSE passthrough? `others`: the node's handles.
    ///
    /// - The kernel requires one mode for all open files of an inode: passthrough with one
    ///   backing file, or its page cache (fuse_file_io_open fails the open with EIO
    ///   otherwise). So a node with open handles keeps their mode.
    /// - An upper file: yes. The upper object never changes identity while open (rename and
    ///   unlink keep it), so the backing file stays the right one.
    /// - A lower file under an upper: no. The backing file is fixed at open, so a reader
    ///   would keep the lower after a copy-up (verlay switches it to the copy, as kernel
    ///   overlayfs does), and the write-open that copies up would have to share the lower
    ///   backing file: its writes would reach the lower layer (fuse-overlayfs 2.0's bug).
    /// - A lower file of a read-only mount (no copy-up ever): yes, unless a manifest must
    ///   check its reads (passthrough reads never reach the daemon).
    pub(super) fn wants_passthrough(
        &self,
        node: &Node,
        others: &[std::sync::Weak<FileHandle>],
        on_upper: bool,
        verified: bool,
    ) -> bool {
        if node.kind != Kind::File {
            return false;
        }
        // Before the mount-wide switch: a node whose handles use passthrough must go on
        // using it even after a later refusal turned passthrough off for new nodes.
        if let Some(other) = others.iter().find_map(|w| w.upgrade()) {
            return other.passthrough.load(Ordering::Acquire);
        }
        if !self.passthrough.load(Ordering::Relaxed) {
            return false;
        }
        if on_upper {
            true
        } else {
            self.upper.is_none() && !verified
        }
    }

    /// The fd a passthrough handle's backing file is made from, or None for a handle the
    /// daemon serves (reads, writes and the kernel's page cache).
    pub fn passthrough_fd(&self, fh: u64) -> Option<Arc<OwnedFd>> {
        let h = self.file(fh).ok()?;
        if h.passthrough.load(Ordering::Acquire) {
            Some(h.fd.read().clone())
        } else {
            None
        }
    }

    /// The kernel refused a backing file (no CAP_SYS_ADMIN, or a stacking limit): serve
    /// `fh` through the daemon, and stop offering passthrough for this mount.
    pub fn passthrough_refused(&self, fh: u64) {
        self.passthrough.store(false, Ordering::Relaxed);
        if let Ok(h) = self.file(fh) {
            h.passthrough.store(false, Ordering::Release);
        }
    }

    /// Is passthrough wanted (and not yet turned off)?
    pub fn passthrough_offered(&self) -> bool {
        self.passthrough.load(Ordering::Relaxed)
    }

    /// Was the writeback cache asked for (`writeback=1`, and an upper to write to)?
    pub fn writeback_wanted(&self) -> bool {
        self.opts.writeback
    }

    /// Turn passthrough off for this mount (the kernel did not offer it).
    pub fn disable_passthrough(&self) {
        self.passthrough.store(false, Ordering::Relaxed);
    }

    /// Open handles whose writes go straight to the upper file (passthrough), never
    /// through the daemon: anything that must stop all writers (a point-in-time capture of
    /// the upper) cannot pause these and has to wait for them to close.
    pub fn passthrough_writers(&self) -> usize {
        self.files
            .read()
            .values()
            .filter(|h| h.writable && h.passthrough.load(Ordering::Acquire))
            .count()
    }

    /// For a lower file of a verified layer: the chunk digests its reads are checked against.
    pub(super) fn handle_verify(&self, node: &Node, fd: &OwnedFd) -> Result<Option<HandleVerify>> {
        let st = node.snapshot();
        if st.upper {
            return Ok(None);
        }
        let Some(l) = st.lower else { return Ok(None) };
        let Some(v) = self.verified(l.layer) else {
            return Ok(None);
        };
        let Some(entry) = v.entry(&l.path)? else {
            return Ok(None);
        };
        let ino = rustix::fs::fstat(fd)?.st_ino;
        let Some(chunks) = v.file_chunks(&entry, ino) else {
            return Ok(None);
        };
        Ok(Some(HandleVerify {
            layer: v.clone(),
            path: l.path,
            chunks,
        }))
    }

    /// After a copy-up, point the node's read-only handles on the lower file at the upper
    /// copy (`path`, just published).
    pub(super) fn switch_handles_to_upper(&self, node: &Node, path: &Path) -> Result<()> {
        let handles: Vec<Arc<FileHandle>> = node.handles.lock().iter().filter_map(|w| w.upgrade()).collect();
        for h in handles {
            if h.on_upper.load(Ordering::Acquire) {
                continue;
            }
            let fd = self.upper()?.dir.open_file(path, OFlags::RDONLY)?;
            // Both under the lock: a read takes the fd and the flag together, so it never
            // checks the upper copy's bytes against the lower file's digests.
            let mut slot = h.fd.write();
            *slot = Arc::new(fd);
            h.on_upper.store(true, Ordering::Release);
            drop(slot);
        }
        Ok(())
    }

    pub(super) fn file(&self, fh: u64) -> Result<Arc<FileHandle>> {
        self.files
            .read()
            .get(&fh)
            .cloned()
            .ok_or(Error::Errno(libc::EBADF))
    }

    /// FUSE open.
    pub fn open(&self, ctx: &Ctx, id: u64, flags: i32) -> Result<u64> {
        let node = self.node(id)?;
        if node.kind == Kind::Dir {
            return errno(libc::EISDIR);
        }
        let oflags = open_flags(flags);
        // The kernel refuses a writable open of a running program (ETXTBSY) before asking us,
        // but checks O_RDONLY|O_TRUNC only after this OPEN has truncated (atomic_o_trunc): the
        // program's text would be cut under it (SIGBUS, SIGSEGV), and if it died fast enough
        // the open even succeeded. Its exec opens come here, so the check can be made here.
        if oflags.contains(OFlags::TRUNC) && self.executing(&node) {
            return errno(libc::ETXTBSY);
        }
        let writable = oflags.contains(OFlags::WRONLY)
            || oflags.contains(OFlags::RDWR)
            || oflags.contains(OFlags::TRUNC);
        // A read-only open changes nothing; a writable one may copy up or truncate (after a
        // failed fsync nothing may change the upper, an O_TRUNC included).
        let change = if writable { Some(self.change()?) } else { None };
        if writable {
            self.copy_up_with(&node, !oflags.contains(OFlags::TRUNC))?;
        }
        let mut oflags = oflags;
        if oflags.contains(OFlags::WRONLY) {
            oflags.remove(OFlags::WRONLY);
            oflags.insert(OFlags::RDWR);
        }
        // A writable open of an upper file (the O_TRUNC in it included) is a change made
        // through the upper; the rest open as they are.
        let on_upper_now = {
            let st = node.state.read();
            st.upper && !st.unlinked
        };
        let (mut fd, on_upper) = match &change {
            Some(up) if on_upper_now => (up.open_file(&self.path_of(&node)?, oflags)?, true),
            _ => self.open_real(&node, oflags)?,
        };
        if let (Some(up), true) = (&change, oflags.contains(OFlags::TRUNC) && ctx.uid != 0) {
            // The kernel leaves O_TRUNC to us (atomic_o_trunc), and the daemon truncates as
            // root; a truncation by an unprivileged caller must still drop setuid and setgid
            // as the VFS does (should_remove_suid).
            let shared = Arc::new(fd);
            self.remove_privs(ctx, node.id, up, &shared)?;
            fd = Arc::try_unwrap(shared).map_err(|_| Error::Errno(libc::EIO))?;
        }
        let verify = if on_upper {
            None
        } else {
            self.handle_verify(&node, &fd)?
        };
        let exec = flags & FMODE_EXEC_FLAG != 0;
        self.add_file(node, fd, on_upper, writable, verify, exec)
    }

    /// Does a running program have this file as its executable (an exec open of it is live)?
    /// Its handle is released when the program has exited; until the daemon has seen that
    /// release, an O_TRUNC open still finds it running.
    pub(super) fn executing(&self, node: &Node) -> bool {
        node.handles
            .lock()
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .any(|h| h.exec)
    }

    /// A new open of a file that has no name any more but is still open (the kernel reaches
    /// it by a file handle, open_by_handle_at): the object is opened again through one of
    /// its open fds (`/proc/self/fd/N`, as open(2) of that link does for a deleted file).
    pub(super) fn reopen_unlinked(&self, node: &Node, oflags: OFlags) -> Result<(OwnedFd, bool)> {
        let h = node.handles.lock().iter().find_map(|w| w.upgrade());
        let h = h.ok_or(Error::Errno(libc::ENOENT))?;
        let on_upper = h.on_upper.load(Ordering::Acquire);
        let fd = h.fd.read().clone();
        let writes = oflags.intersects(OFlags::WRONLY | OFlags::RDWR | OFlags::TRUNC);
        let fd = if on_upper && writes {
            // may write (truncate) the upper object: through upper/ (the caller's change is
            // already held; this one nests)
            self.change()?.reopen(&fd, oflags)?
        } else {
            crate::upper::file::reopen_fd(&fd, oflags)?
        };
        Ok((fd, on_upper))
    }

    /// Open the object of `node`; true when the fd is on the upper object.
    pub(super) fn open_real(&self, node: &Node, oflags: OFlags) -> Result<(OwnedFd, bool)> {
        let st = node.snapshot();
        if st.unlinked {
            return self.reopen_unlinked(node, oflags);
        }
        if st.upper {
            let path = self.path_of(node)?;
            let fd = match self.upper()?.dir.open_file(&path, oflags) {
                Err(e) if e.errno() == libc::EACCES && oflags.contains(OFlags::RDWR) => {
                    // An upgraded WRONLY open on a write-only file: open as asked.
                    let mut f = oflags;
                    f.remove(OFlags::RDWR);
                    f.insert(OFlags::WRONLY);
                    self.upper()?.dir.open_file(&path, f)
                }
                r => r,
            }?;
            if self.opts.atime == Atime::Never {
                // O_NOATIME needs the file's owner or CAP_FOWNER: best effort when rootless.
                if let Ok(fl) = rustix::fs::fcntl_getfl(&fd) {
                    let _ = rustix::fs::fcntl_setfl(&fd, fl | OFlags::NOATIME);
                }
            }
            Ok((fd, true))
        } else {
            let l = st.lower.ok_or(Error::Errno(libc::ENOENT))?;
            let fd = self.lowers[l.layer].open_file(
                &l.path,
                oflags & !(OFlags::RDWR | OFlags::WRONLY | OFlags::TRUNC | OFlags::APPEND),
            )?;
            Ok((fd, false))
        }
    }

    /// May the kernel keep its page cache of this file across opens? Yes for a file served
    /// from a lower layer: its content never changes while mounted (a copy-up keeps it), so
    /// warm reads need not come back here. Upper files are re-read after each open.
    pub fn keep_cache(&self, fh: u64) -> bool {
        self.file(fh)
            .map(|h| !h.on_upper.load(Ordering::Acquire))
            .unwrap_or(false)
    }

    /// The fd to use for a handle.
    pub(super) fn handle_fd(&self, h: &FileHandle) -> Result<Arc<OwnedFd>> {
        Ok(h.fd.read().clone())
    }

    /// FUSE read.
    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        let h = self.file(fh)?;
        let (fd, on_upper) = {
            let slot = h.fd.read();
            (slot.clone(), h.on_upper.load(Ordering::Acquire))
        };
        if let (Some(v), false) = (&h.verify, on_upper) {
            return v.layer.read(&v.path, &v.chunks, &*fd, offset, size);
        }
        crate::layer::read_at(&*fd, offset, size)
    }

    /// FUSE write, by `ctx` to node `id`.
    pub fn write(&self, ctx: &Ctx, id: u64, fh: u64, offset: u64, data: &[u8]) -> Result<usize> {
        let h = self.file(fh)?;
        if !h.writable {
            return errno(libc::EBADF);
        }
        let up = self.change()?;
        let fd = h.fd.read().clone();
        self.remove_privs(ctx, id, &up, &fd)?;
        up.file(fd).write_at(offset, data)
    }

    /// Remove setuid and setgid from the upper file open as `fd`, as a write, truncate or
    /// fallocate by `ctx` does on kernel overlayfs (`privs_to_kill`), and drop the kernel's
    /// cached mode of node `id` when they go. The daemon writes as root, so the upper
    /// filesystem never does it for the caller. A root caller (CAP_FSETID) and a file
    /// without the bits cost no /proc read.
    pub(super) fn remove_privs(&self, ctx: &Ctx, id: u64, up: &Change<'_>, fd: &Arc<OwnedFd>) -> Result<()> {
        if ctx.uid == 0 {
            return Ok(());
        }
        let st = rustix::fs::fstat(&**fd)?;
        let kill = privs_to_kill(ctx, st.st_mode, self.opts.ids.gid_from_disk(st.st_gid));
        if kill != 0 {
            up.file(fd.clone()).set_mode(st.st_mode & 0o7777 & !kill)?;
            self.invalidate(id);
        }
        Ok(())
    }

    /// FUSE fsync.
    pub fn fsync(&self, fh: u64, datasync: bool) -> Result<()> {
        let h = self.file(fh)?;
        let Some(up) = &self.upper else {
            return Ok(());
        };
        // A file still on a lower layer has nothing in the upper to sync (kernel overlayfs
        // does not sync lower files either).
        let fd = h.on_upper.load(Ordering::Acquire).then(|| h.fd.read().clone());
        up.sync_file(fd, datasync)
    }

    /// FUSE fallocate, by `ctx` on node `id`.
    pub fn fallocate(&self, ctx: &Ctx, id: u64, fh: u64, offset: u64, length: u64, mode: i32) -> Result<()> {
        let h = self.file(fh)?;
        if !h.writable {
            return errno(libc::EBADF);
        }
        let up = self.change()?;
        let fd = h.fd.read().clone();
        // ovl_fallocate removes privileges with the caller's credentials first.
        self.remove_privs(ctx, id, &up, &fd)?;
        up.file(fd).allocate(mode as u32, offset, length)
    }

    /// FUSE lseek (SEEK_DATA / SEEK_HOLE).
    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> Result<i64> {
        let h = self.file(fh)?;
        let fd = self.handle_fd(&h)?;
        let pos = match whence {
            libc::SEEK_DATA => rustix::fs::SeekFrom::Data(offset as u64),
            libc::SEEK_HOLE => rustix::fs::SeekFrom::Hole(offset as u64),
            libc::SEEK_SET => rustix::fs::SeekFrom::Start(offset as u64),
            libc::SEEK_END => rustix::fs::SeekFrom::End(offset),
            _ => return errno(libc::EINVAL),
        };
        Ok(rustix::fs::seek(&*fd, pos)? as i64)
    }

    /// FUSE release.
    pub fn release(&self, fh: u64) {
        self.files.write().remove(&fh);
    }
}
