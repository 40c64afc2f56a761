//! The rename sequences that take more than one rename(2): a directory's mark (redirect or
//! opaque) before it moves, the new parent marked impure, a replaced directory's whiteouts
//! cleared, and a directory moving onto a whiteout swapped with it (docs/ordering.md,
//! "rename"). The union decides what is needed; these make the writes, in this order.

use std::path::Path;

use rustix::fs::RenameFlags;

use super::store::Base;
use super::{Change, Occupant};
use crate::error::Result;
use crate::failpoint::crash_point;
use crate::layer::Kind;

/// What a directory is given before it moves (kernel overlayfs's ovl_set_redirect, or
/// opaque for a pure upper directory moving into a merged parent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DirMark {
    /// `overlay.redirect` with this value
    Redirect(Vec<u8>),
    /// `overlay.opaque=y`
    Opaque,
}

/// One rename that is not an exchange (see [`Change::move_to`]).
#[derive(Debug)]
pub struct Move<'a> {
    /// the old name
    pub old: &'a Path,
    /// the new name
    pub new: &'a Path,
    /// the moving object is a directory
    pub is_dir: bool,
    /// the moving directory's mark
    pub mark: Option<DirMark>,
    /// the new parent, to mark impure (the object has lower parts)
    pub impure_parent: Option<&'a Path>,
    /// the new name holds an upper directory, empty in the merged view: clear its whiteouts
    pub clear_target: bool,
    /// a lower layer still has the old name: leave a whiteout there
    pub whiteout_old: bool,
}

impl Change<'_> {
    /// Apply the mark a directory takes before it moves (docs/ordering.md, "rename").
    fn mark_dir(&self, rel: &Path, mark: &Option<DirMark>) -> Result<()> {
        match mark {
            Some(DirMark::Redirect(v)) => self.set_ovl_xattr(rel, "redirect", v),
            Some(DirMark::Opaque) => self.set_ovl_xattr(rel, "opaque", b"y"),
            None => Ok(()),
        }
    }

    /// rename.exchange: RENAME_EXCHANGE of `a` and `b`, each first given its mark (a
    /// redirect or opaque, `set_ovl_xattr.*`), then `rename.rename`.
    pub fn exchange(
        &self,
        a: &Path,
        a_mark: &Option<DirMark>,
        b: &Path,
        b_mark: &Option<DirMark>,
    ) -> Result<()> {
        self.mark_dir(a, a_mark)?;
        self.mark_dir(b, b_mark)?;
        self.rename(a, b, RenameFlags::EXCHANGE, false)
    }

    /// rename.move: `m.old` to `m.new`, in this order: the moving directory's mark
    /// (`set_ovl_xattr.redirect`/`.opaque`), the new parent marked impure, the whiteouts of
    /// a directory it replaces cleared (`clear_whiteouts.unlink`), then the rename itself.
    /// A directory moving onto a whiteout cannot replace it with rename(2): they are
    /// swapped (`rename.exchange`), and the whiteout, now at the old name, is removed
    /// there unless a lower layer still has that name (`rename.drop_whiteout`).
    pub fn move_to(&self, m: &Move<'_>) -> Result<()> {
        self.mark_dir(m.old, &m.mark)?;
        if let Some(p) = m.impure_parent {
            self.mark_impure(p)?;
        }
        if m.clear_target {
            self.clear_whiteouts(m.new)?;
        }
        let occupant = match self.dir.stat(m.new)? {
            None => Occupant::Nothing,
            Some(st) if Kind::from_mode(st.st_mode) == Kind::Dir => Occupant::Dir,
            Some(_) => Occupant::NonDir,
        };
        if m.is_dir && occupant == Occupant::NonDir {
            self.store
                .rename(Base::Upper, m.old, Base::Upper, m.new, RenameFlags::EXCHANGE)?;
            crash_point("rename.exchange");
            if !m.whiteout_old {
                self.store.unlink(Base::Upper, m.old)?;
                crash_point("rename.drop_whiteout");
            }
            return Ok(());
        }
        let flags = if occupant == Occupant::Nothing {
            RenameFlags::NOREPLACE
        } else {
            RenameFlags::empty()
        };
        self.rename(m.old, m.new, flags, m.whiteout_old)
    }
}
