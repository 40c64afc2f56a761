//! Extended attributes: the overlay's own names hidden, `user.*`/`trusted.*` mapped to the
//! upper's namespace, POSIX ACLs.

use super::*;

impl Union {
    pub(super) fn xattr_source(&self, node: &Node) -> Result<(&LayerDir, PathBuf)> {
        let st = node.snapshot();
        if st.upper || (node.id == ROOT_ID && self.upper.is_some()) {
            Ok((&self.upper()?.dir, self.path_of(node)?))
        } else {
            let l = match node.kind {
                Kind::Dir => st.lowers.first().cloned(),
                _ => st.lower,
            }
            .ok_or(Error::Errno(libc::ENOENT))?;
            Ok((&self.lowers[l.layer], l.path))
        }
    }

    /// The xattr name mapping of this mount.
    pub(super) fn xattr_names(&self) -> XattrNames {
        match &self.upper {
            Some(u) => u.names(),
            None => XattrNames {
                own: if rustix::process::geteuid().is_root() {
                    "trusted.overlay."
                } else {
                    "user.overlay."
                },
            },
        }
    }

    /// FUSE getxattr.
    pub fn getxattr(&self, id: u64, name: &OsStr) -> Result<Vec<u8>> {
        let node = self.node(id)?;
        let killpriv = name == KILLPRIV_XATTR;
        if killpriv && node.no_caps_known() && !node.state.read().unlinked {
            return errno(libc::ENODATA);
        }
        let epoch = node.caps_epoch();
        let disk = self
            .xattr_names()
            .to_disk(name)
            .ok_or(Error::Errno(libc::ENODATA))?;
        let v = if node.state.read().unlinked {
            self.unlinked_xattr(&node, &disk)?
        } else {
            let (layer, path) = self.xattr_source(&node)?;
            layer.get_xattr(&path, &disk)?
        };
        if killpriv && v.is_none() {
            node.note_no_caps(epoch);
        }
        v.ok_or(Error::Errno(libc::ENODATA))
    }

    /// An xattr of an unlinked object, read through an fd still open on it (fgetxattr on
    /// a removed file answers from the file, as on kernel overlayfs). By the fd's
    /// `/proc/self/fd` link: the fd kept on a removed special file is O_PATH, which
    /// fgetxattr refuses.
    pub(super) fn unlinked_xattr(&self, node: &Node, disk: &OsStr) -> Result<Option<Vec<u8>>> {
        let fd = self.unlinked_fd(node, None, false)?;
        let mut buf = vec![0u8; XATTR_SIZE_MAX];
        match rustix::fs::getxattr(fd_link(&fd).as_str(), disk, &mut buf) {
            Ok(n) => {
                buf.truncate(n);
                Ok(Some(buf))
            }
            Err(rustix::io::Errno::NODATA) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The xattr names of an unlinked object, through an fd still open on it.
    pub(super) fn unlinked_xattr_names(&self, node: &Node) -> Result<Vec<OsString>> {
        let fd = self.unlinked_fd(node, None, false)?;
        let mut buf = vec![0u8; XATTR_LIST_MAX];
        let n = rustix::fs::listxattr(fd_link(&fd).as_str(), &mut buf)?;
        Ok(buf[..n.min(buf.len())]
            .split(|b| *b == 0)
            .filter(|n| !n.is_empty())
            .map(|n| OsStr::from_bytes(n).to_os_string())
            .collect())
    }

    /// FUSE listxattr: the names, each followed by a NUL.
    pub fn listxattr(&self, id: u64) -> Result<Vec<u8>> {
        let node = self.node(id)?;
        let all = if node.state.read().unlinked {
            self.unlinked_xattr_names(&node)?
        } else {
            let (layer, path) = self.xattr_source(&node)?;
            layer.list_xattr(&path)?
        };
        let names = self.xattr_names();
        let mut out = Vec::new();
        for n in all {
            if let Some(shown) = names.from_disk(&n) {
                out.extend_from_slice(shown.as_bytes());
                out.push(0);
            }
        }
        Ok(out)
    }

    /// FUSE setxattr.
    pub fn setxattr(&self, ctx: &Ctx, id: u64, name: &OsStr, value: &[u8], flags: i32) -> Result<()> {
        let disk = self
            .xattr_names()
            .to_disk(name)
            .ok_or(Error::Errno(libc::EPERM))?;
        let node = self.node(id)?;
        let up = self.change()?;
        self.copy_up(&node)?;
        let path = self.path_of(&node)?;
        let is_acl = name.as_bytes().starts_with(POSIX_ACL_PREFIX.as_bytes());
        if name == POSIX_ACL_ACCESS {
            // Setting an access ACL is a chmod: the upper filesystem updates the mode bits,
            // but it runs as the daemon and so never clears setgid for the caller. As
            // ovl_set_or_remove_acl does, clear it first when the caller is neither in the
            // file's group nor has CAP_FSETID.
            if let Some(st) = up.dir.stat(&path)? {
                let gid = self.opts.ids.gid_from_disk(st.st_gid);
                if st.st_mode & libc::S_ISGID != 0 && !in_group_or_capable(ctx, gid) {
                    up.chmod(&path, st.st_mode & 0o7777 & !libc::S_ISGID)?;
                }
            }
        }
        let r = up.set_xattr(&path, &disk, value, XattrFlags::from_bits_retain(flags as u32));
        node.forget_no_caps();
        if is_acl {
            // The mode changed with the ACL, behind the kernel's attribute cache.
            self.invalidate(node.id);
        }
        r
    }

    /// FUSE removexattr.
    pub fn removexattr(&self, id: u64, name: &OsStr) -> Result<()> {
        let disk = self
            .xattr_names()
            .to_disk(name)
            .ok_or(Error::Errno(libc::ENODATA))?;
        let node = self.node(id)?;
        // Removing an xattr the object does not have must not copy it up. An ACL is the
        // exception once the object is upper: kernel overlayfs asks the upper filesystem to
        // set "no ACL", which succeeds whether there was one or not (ovl_set_or_remove_acl
        // checks only a lower object's ACL).
        let is_acl = name.as_bytes().starts_with(POSIX_ACL_PREFIX.as_bytes());
        let (layer, path) = self.xattr_source(&node)?;
        if !(is_acl && node.state.read().upper) && layer.get_xattr(&path, &disk)?.is_none() {
            return errno(libc::ENODATA);
        }
        let up = self.change()?;
        self.copy_up(&node)?;
        let path = self.path_of(&node)?;
        let r = up.remove_xattr(&path, &disk);
        node.forget_no_caps();
        r
    }

    /// st_ino of a known child, for readdir's d_ino.
    pub(super) fn known_child_ino(&self, node: &Node, name: &OsStr) -> Option<u64> {
        let id = *node.children.lock().get(name)?;
        self.nodes.get(id).map(|n| n.ino())
    }
}

/// `/proc/self/fd/N` of an open fd: a path to its object, also for an O_PATH fd.
fn fd_link(fd: &OwnedFd) -> String {
    format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(fd))
}
