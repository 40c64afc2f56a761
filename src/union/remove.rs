//! Removing: unlink and rmdir, leaving a whiteout where a lower layer still has the name;
//! what becomes of the node of a removed name.

use super::*;

impl Union {
    /// Remove `name` from the merged view of `parent`, leaving a whiteout when a lower
    /// layer still has the name.
    pub(super) fn remove(&self, parent_id: u64, name: &OsStr, want_dir: bool) -> Result<()> {
        let parent = self.node(parent_id)?;
        let (r, path) = self.peek(&parent, name)?.ok_or(Error::Errno(libc::ENOENT))?;
        let is_dir = r.kind == Kind::Dir;
        if want_dir && !is_dir {
            return errno(libc::ENOTDIR);
        }
        if !want_dir && is_dir {
            return errno(libc::EISDIR);
        }
        let up = self.change()?;
        if is_dir {
            let (child, _) = self.child(&parent, name)?;
            let empty = self.dir_is_empty(&child);
            if let Ok(a) = self.attr(&child, None) {
                *child.gone_attr.lock() = Some(Box::new(a));
            }
            self.forget_node(child.id, 1);
            if !empty? {
                return errno(libc::ENOTEMPTY);
            }
            self.keep_gone(&child);
        }
        if matches!(r.kind, Kind::Fifo | Kind::Char | Kind::Block | Kind::Socket) {
            // The kernel opens these itself (no handle here): keep what the object was and
            // an fd on it, for fstat, fchmod, ... while something still has it open.
            let known = parent.children.lock().get(name).copied();
            if let Some(child) = known.and_then(|id| self.nodes.get(id)) {
                if let Ok(a) = self.attr(&child, None) {
                    *child.gone_attr.lock() = Some(Box::new(a));
                }
                self.keep_gone(&child);
            }
        }
        self.copy_up(&parent)?;
        let plowers = parent.state.read().lowers.clone();
        let need_whiteout = self.lower_has(&plowers, name)?;
        match (r.upper, need_whiteout) {
            (true, true) => up.whiteout(&path, if is_dir { Occupant::Dir } else { Occupant::NonDir })?,
            (true, false) => up.remove(&path, is_dir)?,
            (false, true) => up.whiteout(&path, Occupant::Nothing)?,
            (false, false) => return errno(libc::ENOENT),
        }
        // A multiply-linked upper file: the object lives on, maybe under a name its node
        // does not know (a hard link made before the node was last forgotten).
        let still_linked = (!is_dir && r.upper)
            .then_some(r.st.as_ref())
            .flatten()
            .filter(|s| s.st_nlink > 1)
            .map(|s| s.st_ino);
        let known = parent.children.lock().get(name).copied();
        self.detach(&parent, name);
        if let (Some(real_ino), Some(id)) = (still_linked, known) {
            self.follow_link(&parent, id, &path, real_ino);
        }
        Ok(())
    }

    /// Most directory entries read to find another name of an unlinked object.
    pub(super) const FOLLOW_LINK_MAX_ENTRIES: usize = 1 << 16;

    /// The node of an upper object whose last known name just went away, while the object
    /// keeps `st_nlink` > 0: it takes another name of the object in the same directory, so
    /// a file handle of it stays valid, as on kernel overlayfs (fstests generic/426 `-u`).
    /// Only then: one listing of that directory, at most
    /// [`Self::FOLLOW_LINK_MAX_ENTRIES`] entries; a link elsewhere is not searched.
    pub(super) fn follow_link(&self, parent: &Node, id: u64, path: &Path, real_ino: u64) {
        let Some(node) = self.nodes.get(id) else { return };
        if !node.state.read().unlinked {
            return; // it knew another name
        }
        let Some(dir) = path.parent() else { return };
        let Ok(up) = self.upper() else { return };
        let Ok(entries) = up.dir.read_dir(dir) else { return };
        let other = entries
            .into_iter()
            .take(Self::FOLLOW_LINK_MAX_ENTRIES)
            .find(|e| e.ino == real_ino);
        let Some(other) = other else {
            debug!(
                op = "unlink",
                ino = id,
                "no other name of the object in its directory"
            );
            return;
        };
        debug!(op = "unlink", ino = id, name = ?other.name, "node follows another name of its object");
        // The node's state before the parent's child table, the order forget_node takes them.
        let mut st = node.state.write();
        if !st.unlinked {
            return;
        }
        let mut children = parent.children.lock();
        if let Some(&cid) = children.get(&other.name) {
            if cid != id && self.nodes.get(cid).is_some() {
                return; // that name has its own node: the object is reachable through it
            }
        }
        st.unlinked = false;
        st.parent = parent.id;
        st.name = Arc::from(other.name.as_os_str());
        children.insert(st.name.clone(), node.id);
        drop(children);
        drop(st);
        self.repin(&node);
    }

    /// Forget the name→node link after the name went away; the node lives on for open fds
    /// and under its other names (hard links).
    pub(super) fn detach(&self, parent: &Node, name: &OsStr) {
        let id = parent.children.lock().remove(name);
        if let Some(node) = id.and_then(|id| self.nodes.get(id)) {
            let mut st = node.state.write();
            if st.parent == parent.id && &*st.name == name {
                match st.aliases.pop() {
                    Some((p, n)) => {
                        st.parent = p;
                        st.name = Arc::from(n.as_os_str());
                    }
                    None => st.unlinked = true,
                }
            } else {
                st.aliases.retain(|(p, n)| !(*p == parent.id && n == name));
            }
            drop(st);
            self.repin(&node);
        }
    }

    /// Record that the name (`from`, `old`) of a node is now (`to`, `new`).
    pub(super) fn rename_name(&self, node: &Node, from: u64, old: &OsStr, to: u64, new: &OsStr) {
        let mut st = node.state.write();
        if st.parent == from && &*st.name == old {
            st.parent = to;
            st.name = Arc::from(new);
            st.unlinked = false;
        } else if let Some(a) = st.aliases.iter_mut().find(|(p, n)| *p == from && n == old) {
            *a = (to, new.to_os_string());
        } else {
            st.parent = to;
            st.name = Arc::from(new);
            st.unlinked = false;
        }
        drop(st);
        self.repin(node);
    }

    /// FUSE unlink.
    pub fn unlink(&self, _ctx: &Ctx, parent: u64, name: &OsStr) -> Result<()> {
        self.remove(parent, name, false)
    }

    /// FUSE rmdir.
    pub fn rmdir(&self, _ctx: &Ctx, parent: u64, name: &OsStr) -> Result<()> {
        self.remove(parent, name, true)
    }

    /// Is a directory empty in the merged view?
    pub(super) fn dir_is_empty(&self, node: &Arc<Node>) -> Result<bool> {
        let entries = self.merged_entries(node)?;
        Ok(entries.iter().all(|e| e.name == "." || e.name == ".."))
    }
}
