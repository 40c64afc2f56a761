//! Rename: renameat2 (NOREPLACE, EXCHANGE) with redirects for directories that have
//! lower parts, as kernel overlayfs does.

use super::*;
use crate::upper::{DirMark, Move};

/// The two ends of a rename: parents, names as given, and their upper paths.
struct RenameEnds<'a> {
    oldp: Arc<Node>,
    name: &'a OsStr,
    newp: Arc<Node>,
    newname: &'a OsStr,
    old_path: PathBuf,
    new_path: PathBuf,
    old_plowers: Vec<LowerRef>,
    new_plowers: Vec<LowerRef>,
    same_dir: bool,
}

impl Union {
    /// FUSE rename (renameat2 flags: RENAME_NOREPLACE, RENAME_EXCHANGE).
    pub fn rename(
        &self,
        _ctx: &Ctx,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> Result<()> {
        let flags = RenameFlags::from_bits_retain(flags);
        if flags.contains(RenameFlags::WHITEOUT) {
            return errno(libc::EINVAL);
        }
        let exchange = flags.contains(RenameFlags::EXCHANGE);
        let noreplace = flags.contains(RenameFlags::NOREPLACE);
        if exchange && noreplace {
            return errno(libc::EINVAL);
        }
        let oldp = self.node(parent)?;
        let newp = self.node(newparent)?;
        let (src, _) = self.child(&oldp, name)?;
        let src_guard = Forget(self, src.id);
        let dst = match self.child(&newp, newname) {
            Ok((n, _)) => Some(n),
            Err(e) if e.errno() == libc::ENOENT => None,
            Err(e) => return Err(e),
        };
        let _dst_guard = dst.as_ref().map(|d| Forget(self, d.id));
        if let Some(d) = &dst {
            if d.id == src.id {
                return Ok(()); // same object (hard links to it, or the same name)
            }
        }
        if exchange && dst.is_none() {
            return errno(libc::ENOENT);
        }
        if noreplace && dst.is_some() {
            return errno(libc::EEXIST);
        }
        if let (false, Some(d)) = (exchange, &dst) {
            self.check_rename_target(&oldp, &newp, &src, d)?;
        }
        let _change = self.change()?;
        self.copy_up(&oldp)?;
        self.copy_up(&newp)?;
        self.copy_up(&src)?;
        if let (true, Some(d)) = (exchange, &dst) {
            self.copy_up(d)?;
        }
        let old_plowers = oldp.state.read().lowers.clone();
        let new_plowers = newp.state.read().lowers.clone();
        let ends = RenameEnds {
            // By the names given, not the node's first name: a hard link has several.
            old_path: self.path_of(&oldp)?.join(name),
            new_path: self.path_of(&newp)?.join(newname),
            old_plowers,
            new_plowers,
            same_dir: oldp.id == newp.id,
            oldp,
            name,
            newp,
            newname,
        };
        if exchange {
            let d = dst.as_ref().ok_or(Error::Errno(libc::ENOENT))?;
            self.rename_exchange(&ends, &src, d)?;
        } else {
            self.rename_move(&ends, &src, dst.as_ref())?;
        }
        drop(src_guard);
        Ok(())
    }

    /// A rename without RENAME_EXCHANGE onto an existing `d`: kinds must match, and a
    /// directory target must be empty in the merged view.
    fn check_rename_target(
        &self,
        oldp: &Arc<Node>,
        newp: &Arc<Node>,
        src: &Arc<Node>,
        d: &Arc<Node>,
    ) -> Result<()> {
        match (src.kind == Kind::Dir, d.kind == Kind::Dir) {
            (true, false) => errno(libc::ENOTDIR),
            (false, true) => errno(libc::EISDIR),
            (true, true) if !self.dir_is_empty(d)? => {
                // The kernel checks only a merged target's emptiness up front; a pure
                // upper target fails in vfs_rename, after the redirect was set, so an
                // over-long redirect reports EXDEV first.
                let target_pure_upper = d.snapshot().lowers.is_empty();
                if target_pure_upper && self.redirect_too_long(src, oldp.id == newp.id)? {
                    return errno(libc::EXDEV);
                }
                if target_pure_upper {
                    // As in the kernel, the source is copied up before rename(2) on
                    // the upper reports the target non-empty (visible as nlink 1 of a
                    // now merged directory).
                    self.copy_up(oldp)?;
                    self.copy_up(newp)?;
                    self.copy_up(src)?;
                }
                errno(libc::ENOTEMPTY)
            }
            _ => Ok(()),
        }
    }

    /// The mark a directory takes before it moves: one with lower parts keeps them by
    /// redirect; a pure upper directory moved into a merged parent must not start merging
    /// what is below its new name (it becomes opaque).
    fn dir_mark_for_rename(
        &self,
        n: &Arc<Node>,
        at: &Path,
        same_dir: bool,
        to_merged_parent: bool,
    ) -> Result<Option<DirMark>> {
        if n.kind != Kind::Dir {
            return Ok(None);
        }
        let up = self.upper()?;
        let st = n.snapshot();
        if let Some(first) = st.lowers.first() {
            // Kernel rules (ovl_set_redirect): keep a redirect that still holds (any
            // absolute one, or a relative one within the same parent); else write the
            // old name within the same parent, or the absolute lower path, which must
            // fit in redirect_max or the rename falls back to EXDEV.
            let existing = redirect_value(&up.dir, at)?;
            if let Some(v) = &existing {
                if same_dir || v.first() == Some(&b'/') {
                    return Ok(None);
                }
            }
            let value = if same_dir {
                at.file_name().map(|n| n.as_bytes().to_vec()).unwrap_or_default()
            } else {
                let mut v = b"/".to_vec();
                v.extend_from_slice(first.path.as_os_str().as_bytes());
                v
            };
            if value.len() > REDIRECT_MAX {
                return errno(libc::EXDEV);
            }
            Ok(Some(DirMark::Redirect(value)))
        } else if to_merged_parent && !dir_is_opaque(&up.dir, at)? {
            Ok(Some(DirMark::Opaque))
        } else {
            Ok(None)
        }
    }

    /// RENAME_EXCHANGE of `src` (at the old name) and `d` (at the new name).
    fn rename_exchange(&self, e: &RenameEnds<'_>, src: &Arc<Node>, d: &Arc<Node>) -> Result<()> {
        let up = self.change()?;
        let src_mark = self.dir_mark_for_rename(src, &e.old_path, e.same_dir, !e.new_plowers.is_empty())?;
        let d_mark = self.dir_mark_for_rename(d, &e.new_path, e.same_dir, !e.old_plowers.is_empty())?;
        up.exchange(&e.old_path, &src_mark, &e.new_path, &d_mark)?;
        self.rename_name(src, e.oldp.id, e.name, e.newp.id, e.newname);
        self.rename_name(d, e.newp.id, e.newname, e.oldp.id, e.name);
        {
            let mut ch = e.oldp.children.lock();
            ch.insert(Arc::from(e.name), d.id);
        }
        e.newp.children.lock().insert(Arc::from(e.newname), src.id);
        Ok(())
    }

    /// Move `src` to the new name, replacing `dst` if there is one, leaving a whiteout at
    /// the old name where a lower layer still has it.
    fn rename_move(&self, e: &RenameEnds<'_>, src: &Arc<Node>, dst: Option<&Arc<Node>>) -> Result<()> {
        let up = self.change()?;
        let mark = self.dir_mark_for_rename(src, &e.old_path, e.same_dir, !e.new_plowers.is_empty())?;
        let whiteout_old = self.lower_has(&e.old_plowers, e.name)?;
        let has_lower = {
            let st = src.snapshot();
            st.lower.is_some() || !st.lowers.is_empty()
        };
        let new_parent = self.path_of(&e.newp)?;
        let mut clear_target = false;
        if let Some(d) = dst {
            if d.kind != Kind::File {
                // What the replaced object was, for fstat through an fd still open on it
                // (generic/035): a regular file keeps its own fd, the others have none here.
                if let Ok(a) = self.attr(d, None) {
                    *d.gone_attr.lock() = Some(Box::new(a));
                }
                self.keep_gone(d);
            }
            // The target is empty in the merged view; only whiteouts can be left in its
            // upper copy, and rename(2) needs it truly empty.
            clear_target = d.kind == Kind::Dir && d.state.read().upper;
        }
        up.move_to(&Move {
            old: &e.old_path,
            new: &e.new_path,
            is_dir: src.kind == Kind::Dir,
            mark,
            impure_parent: has_lower.then_some(new_parent.as_path()),
            clear_target,
            whiteout_old,
        })?;
        if dst.is_some() {
            self.detach(&e.newp, e.newname);
        }
        e.oldp.children.lock().remove(e.name);
        self.rename_name(src, e.oldp.id, e.name, e.newp.id, e.newname);
        e.newp.children.lock().insert(Arc::from(e.newname), src.id);
        Ok(())
    }

    /// Would moving directory `n` to another parent need a redirect longer than the kernel
    /// writes? (Only when it has lower parts and no absolute redirect to keep.)
    pub(super) fn redirect_too_long(&self, n: &Node, same_dir: bool) -> Result<bool> {
        let st = n.snapshot();
        let Some(first) = st.lowers.first() else {
            return Ok(false);
        };
        if same_dir {
            return Ok(false);
        }
        if st.upper {
            if let Some(v) = redirect_value(&self.upper()?.dir, &self.path_of(n)?)? {
                if v.first() == Some(&b'/') {
                    return Ok(false);
                }
            }
        }
        Ok(first.path.as_os_str().len() + 1 > REDIRECT_MAX)
    }
}
