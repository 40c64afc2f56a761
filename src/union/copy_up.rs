//! Copy-up: a lower object (parents first) copied to the upper before any change to it.

use super::*;

impl Union {
    /// Copy a node (and its parents first) up to the upper, once.
    pub fn copy_up(&self, node: &Arc<Node>) -> Result<()> {
        self.copy_up_with(node, true)
    }

    /// Copy-up; `with_data: false` for a copy that is about to be truncated to zero (open with
    /// O_TRUNC, truncate to 0): only metadata is copied, as kernel overlayfs does.
    pub(super) fn copy_up_with(&self, node: &Arc<Node>, with_data: bool) -> Result<()> {
        if node.state.read().upper {
            return Ok(());
        }
        let up = self.change()?;
        let parent_id = node.state.read().parent;
        if node.id != ROOT_ID {
            let parent = self.node(parent_id)?;
            self.copy_up(&parent)?;
        }
        let _single = node.copy_up.lock();
        let st = node.snapshot();
        if st.upper {
            return Ok(());
        }
        if st.unlinked {
            return errno(libc::ENOENT);
        }
        let src = match node.kind {
            Kind::Dir => st.lowers.first().cloned(),
            _ => st.lower.clone(),
        }
        .ok_or(Error::Errno(libc::ENOENT))?;
        let layer = &self.lowers[src.layer];
        let lst = self
            .lower_stat(src.layer, &src.path)?
            .ok_or(Error::Errno(libc::ENOENT))?;
        if let (Some(v), true) = (self.verified(src.layer), with_data) {
            // A corrupt lower never becomes a good-looking upper file.
            v.verify_file(layer, &src.path, &lst)?;
        }
        let dst = self.path_of(node)?;
        // Kernel overlayfs with index=off breaks a lower hard link on copy-up and shows the
        // copy with its own inode number; other objects keep theirs (recorded as origin).
        let breaks_link = node.kind != Kind::Dir && lst.st_nlink > 1;
        let origin = if breaks_link { None } else { Some(node.ino()) };
        debug!(op = "copy_up", ino = node.ino(), path = %dst.display(), layer = %layer.name, "copy-up");
        // Publishing the copy changes the parent's times; the copy-up is not a change the
        // user made, so they are put back (as ovl_copy_up_one does).
        let parent_path = dst.parent().map(Path::to_path_buf).unwrap_or_default();
        let parent_times = up.dir.stat(&parent_path)?;
        up.copy_up(layer, &src.path, &lst, &dst, origin, with_data)?;
        // Kernel format: a directory holding copied-up entries is "impure", so readers know
        // to look for origins when reporting d_ino.
        up.mark_impure(&parent_path)?;
        if let Some(pt) = parent_times {
            if let Err(e) = up.utimens(&parent_path, &crate::upper::stat_times(&pt)) {
                debug!(error = %e, "could not restore the parent's times after copy-up");
            }
        }
        if breaks_link {
            if let Some(st) = up.dir.stat(&dst)? {
                node.ino.store(self.map_ino(0, st.st_ino), Ordering::Relaxed);
            }
        }
        {
            let mut w = node.state.write();
            w.upper = true;
        }
        node.forget_no_caps();
        if node.kind == Kind::File {
            self.switch_handles_to_upper(node, &dst)?;
        }
        // nlink (merged directories report 1) and st_ino may have changed behind the
        // kernel's attribute cache.
        self.invalidate(node.id);
        Ok(())
    }

    /// Tell the kernel to drop its cached attributes of a node.
    pub(super) fn invalidate(&self, id: u64) {
        if let Some(f) = self.invalidator.get() {
            (f.0)(id);
        }
    }

    /// Install the function that drops the kernel's cached attributes of a node (the FUSE
    /// adapter's notifier). Called once, after the session exists.
    pub fn set_invalidator(&self, f: Invalidator) {
        let _ = self.invalidator.set(f);
    }
}
