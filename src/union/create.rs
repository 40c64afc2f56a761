//! Creating: mknod, mkdir, symlink, create and link, over a whiteout where one is.

use super::*;

impl Union {
    /// Owner and mode of a new object: the caller's uid; the parent's group when the
    /// parent is setgid (and then setgid for new directories too), else the caller's gid.
    pub(super) fn new_owner(&self, ctx: &Ctx, parent: &Node, kind: Kind, mode: u32) -> Result<(Owner, u32)> {
        let pst = self.real_stat(parent)?;
        let mut mode = mode;
        let gid_disk = if pst.st_mode & libc::S_ISGID != 0 {
            if kind == Kind::Dir {
                mode |= libc::S_ISGID;
            }
            pst.st_gid
        } else {
            self.opts.ids.gid_to_disk(ctx.gid)
        };
        Ok((
            Owner {
                uid: self.opts.ids.uid_to_disk(ctx.uid),
                gid: gid_disk,
            },
            mode,
        ))
    }

    /// Common part of mknod/mkdir/symlink/create: check the name is free, copy the parent
    /// up, and create the object over a whiteout (opaque for directories) when one is there.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn make(
        &self,
        ctx: &Ctx,
        parent_id: u64,
        name: &OsStr,
        kind: Kind,
        mode: u32,
        rdev: u64,
        target: Option<&OsStr>,
        open_flags: OFlags,
    ) -> Result<(Entry, Option<OwnedFd>)> {
        let parent = self.node(parent_id)?;
        if parent.kind != Kind::Dir {
            return errno(libc::ENOTDIR);
        }
        check_name(name)?;
        let up = self.change()?;
        let ppath = self.path_of(&parent)?;
        let path = ppath.join(name);
        let plowers = parent.state.read().lowers.clone();
        // Is the name free? The upper decides first: a whiteout there means free (and the new
        // object goes over it), anything else means taken; with nothing in the upper, any
        // visible lower object takes the name.
        let whiteout_here = match up.dir.stat(&path)? {
            Some(st) if is_whiteout_stat(&st) => true,
            Some(_) => return errno(libc::EEXIST),
            None if !name.as_bytes().starts_with(OCI_WHITEOUT_PREFIX.as_bytes())
                && self.lower_has(&plowers, name)? =>
            {
                return errno(libc::EEXIST)
            }
            None => false,
        };
        self.copy_up(&parent)?;
        let occupant = if whiteout_here {
            Occupant::NonDir
        } else {
            Occupant::Nothing
        };
        // Something below was deleted here: a new directory must not show it again.
        let opaque = kind == Kind::Dir && whiteout_here;
        // posix_acl_create: a parent's default ACL replaces the umask and is inherited (as
        // the access ACL, and by a directory as its own default ACL). The object may be made
        // in the work dir, where the upper filesystem cannot inherit it, so it is set here.
        let default_acl = if kind == Kind::Symlink {
            None
        } else {
            up.dir.get_xattr(&ppath, OsStr::new(POSIX_ACL_DEFAULT))?
        };
        let (mode, access_acl) = match default_acl.as_deref().and_then(|d| acl::create_masq(d, mode)) {
            Some((m, a)) => (m, a),
            None if kind == Kind::Symlink => (mode, None),
            None => (mode & !(ctx.umask & 0o777), None),
        };
        let (owner, mode) = self.new_owner(ctx, &parent, kind, mode)?;
        let fd = up.create(
            &path, kind, mode, rdev, owner, target, open_flags, occupant, opaque,
        )?;
        if let Some(a) = &access_acl {
            up.set_xattr(&path, OsStr::new(POSIX_ACL_ACCESS), a, XattrFlags::empty())?;
        }
        if let (Kind::Dir, Some(d)) = (kind, &default_acl) {
            up.set_xattr(&path, OsStr::new(POSIX_ACL_DEFAULT), d, XattrFlags::empty())?;
        }
        trace!(op = "create", path = %path.display(), "created");
        // The new object is pure upper: nothing below shows through it (the name was free,
        // or a whiteout hid what is below and a directory made over it is opaque).
        let st = match &fd {
            Some(f) => rustix::fs::fstat(f)?,
            None => up.dir.stat(&path)?.ok_or(Error::Errno(libc::ENOENT))?,
        };
        let r = Resolved {
            kind,
            upper: true,
            lower: None,
            lowers: Vec::new(),
            ino: self.map_ino(0, st.st_ino),
            st: None,
        };
        // A new object: a record under its st_ino is of a removed one whose number the
        // upper filesystem reused, and its handles must stay stale.
        self.nodes.drop_gone_ino(r.ino);
        let node = self.install(&parent, name, r)?;
        let attr = self.attr_from(&node, &st);
        Ok((Entry { id: node.id, attr }, fd))
    }

    /// FUSE mknod.
    pub fn mknod(&self, ctx: &Ctx, parent: u64, name: &OsStr, mode: u32, rdev: u64) -> Result<Entry> {
        let kind = Kind::from_mode(mode);
        if kind == Kind::Char && rdev == 0 {
            // A 0/0 char device is a whiteout: the kernel refuses to create one through
            // an overlay rather than silently deleting the name.
            return errno(libc::EPERM);
        }
        if kind == Kind::Dir || kind == Kind::Symlink {
            return errno(libc::EINVAL);
        }
        Ok(self
            .make(ctx, parent, name, kind, mode, rdev, None, OFlags::empty())?
            .0)
    }

    /// FUSE mkdir.
    pub fn mkdir(&self, ctx: &Ctx, parent: u64, name: &OsStr, mode: u32) -> Result<Entry> {
        Ok(self
            .make(
                ctx,
                parent,
                name,
                Kind::Dir,
                mode | libc::S_IFDIR,
                0,
                None,
                OFlags::empty(),
            )?
            .0)
    }

    /// FUSE symlink.
    pub fn symlink(&self, ctx: &Ctx, parent: u64, name: &OsStr, target: &OsStr) -> Result<Entry> {
        if target.len() >= libc::PATH_MAX as usize {
            return errno(libc::ENAMETOOLONG);
        }
        Ok(self
            .make(
                ctx,
                parent,
                name,
                Kind::Symlink,
                libc::S_IFLNK | 0o777,
                0,
                Some(target),
                OFlags::empty(),
            )?
            .0)
    }

    /// FUSE create: make and open a regular file.
    pub fn create(
        &self,
        ctx: &Ctx,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
    ) -> Result<(Entry, u64)> {
        let oflags = open_flags(flags) & !(OFlags::TRUNC);
        let mut oflags = oflags;
        if oflags.contains(OFlags::WRONLY) {
            // Open read-write so the kernel's page cache can read back around partial
            // writes; permission was checked by the kernel on the create itself.
            oflags.remove(OFlags::WRONLY);
            oflags.insert(OFlags::RDWR);
        }
        let (entry, fd) = self.make(
            ctx,
            parent,
            name,
            Kind::File,
            mode | libc::S_IFREG,
            0,
            None,
            oflags,
        )?;
        // Past here the node has a reference the kernel never gets on failure: give it back.
        let opened = fd
            .ok_or(Error::Errno(libc::EIO))
            .and_then(|fd| self.add_file(self.node(entry.id)?, fd, true, true, None, false));
        match opened {
            Ok(fh) => Ok((entry, fh)),
            Err(e) => {
                self.forget_node(entry.id, 1);
                Err(e)
            }
        }
    }

    /// FUSE link.
    pub fn link(&self, _ctx: &Ctx, id: u64, newparent: u64, newname: &OsStr) -> Result<Entry> {
        let node = self.node(id)?;
        if node.kind == Kind::Dir {
            return errno(libc::EPERM);
        }
        let parent = self.node(newparent)?;
        if self.peek(&parent, newname)?.is_some() {
            return errno(libc::EEXIST);
        }
        let up = self.change()?;
        self.copy_up(&node)?;
        self.copy_up(&parent)?;
        let src = self.path_of(&node)?;
        let ppath = self.path_of(&parent)?;
        let dst = ppath.join(newname);
        let whiteout_here = matches!(up.dir.stat(&dst)?, Some(st) if is_whiteout_stat(&st));
        up.link(
            &src,
            &dst,
            if whiteout_here {
                Occupant::NonDir
            } else {
                Occupant::Nothing
            },
        )?;
        // The new name is the same object: the same node, one more kernel reference (the
        // kernel holds the node for the request, so it is live).
        let node = self.nodes.get_ref(node.id).ok_or(Error::Errno(libc::ESTALE))?;
        node.state
            .write()
            .aliases
            .push((parent.id, newname.to_os_string()));
        parent.children.lock().insert(Arc::from(newname), node.id);
        // Its names' parents stay known while it is, and a name looked up after the kernel
        // forgot the node finds it again.
        self.repin(&node);
        if let Ok(Some(st)) = up.dir.stat(&dst) {
            self.nodes.note_linked(st.st_ino, node.id);
        }
        match self.attr(&node, None) {
            Ok(attr) => Ok(Entry { id: node.id, attr }),
            Err(e) => {
                // Not handed to the kernel: the reference goes back.
                self.forget_node(node.id, 1);
                Err(e)
            }
        }
    }
}
