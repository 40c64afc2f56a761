//! Step 6's second half: the frozen upper, in kernel overlayfs form, becomes the entries
//! of an OCI layer, in tar order. Whiteouts become `.wh.NAME`, opaque directories get
//! `.wh..wh..opq`, overlay metadata xattrs are dropped (escaped ones unescaped), and a
//! directory with a redirect (renamed: OCI has no redirects) goes in whole and opaque, as
//! the merged view at the commit instant shows it.
//!
//! Must not: read the live upper (only the snapshot, the staging tree and the lowers).

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

use tracing::warn;

use super::snapshot::{DataFile, Snap};
use crate::error::{Error, Result};
use crate::layer::{Kind, OCI_OPAQUE_MARKER, OCI_WHITEOUT_PREFIX};

/// The overlay namespaces: their xattrs are overlay metadata, never layer content.
const OVERLAY_NAMESPACES: [&str; 2] = ["trusted.overlay.", "user.overlay."];

/// The items of the layer made of the snapshot `root`. `own` is the mount's overlay
/// xattr namespace; `merged` (with the staging tree's inode numbers per staged inode) is
/// given when a directory carries a redirect.
pub(super) fn items(
    own: &'static str,
    merged: Option<&crate::union::Union>,
    tree_inos: HashMap<u64, u64>,
    root: &Snap,
) -> Result<Vec<Item>> {
    let mut tr = Translator {
        own,
        merged,
        tree_inos,
        items: Vec::new(),
    };
    tr.dir(b"", root)?;
    Ok(tr.items)
}

/// What an entry of the tarball is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ItemKind {
    Dir,
    File,
    Symlink,
    Fifo,
    Char,
    Block,
    /// `.wh.NAME`
    Whiteout,
    /// `.wh..wh..opq`
    Opaque,
}

/// Where a file's data comes from.
#[derive(Debug, Clone, Copy)]
pub(super) enum Data {
    None,
    /// the staging copy
    Staged(DataFile),
    /// a node of the read-only union over the staging copy and the lowers
    Union {
        node: u64,
        size: u64,
    },
}

/// One entry of the layer, in tar order.
#[derive(Debug)]
pub(super) struct Item {
    /// path relative to the layer root, no leading `./`; empty for the root
    pub path: Vec<u8>,
    pub kind: ItemKind,
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub rdev: u64,
    /// xattrs as users see them (private ones dropped, escaped ones unescaped), sorted
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    pub target: Vec<u8>,
    pub data: Data,
    /// inode identity, for hard links within the layer
    pub link_key: Option<u64>,
}

impl Item {
    fn marker(parent: &[u8], name: &[u8], kind: ItemKind) -> Item {
        Item {
            path: join(parent, name),
            kind,
            perm: 0,
            uid: 0,
            gid: 0,
            mtime: 0,
            rdev: 0,
            xattrs: Vec::new(),
            target: Vec::new(),
            data: Data::None,
            link_key: None,
        }
    }
}

fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    if parent.is_empty() {
        name.to_vec()
    } else {
        [parent, b"/", name].concat()
    }
}

/// The xattrs of a layer entry, from names users see: drops overlay metadata of either
/// namespace (what is left of it after `XattrNames::from_disk` is the other namespace's).
fn keep_visible(own: &str, name: &[u8]) -> bool {
    !OVERLAY_NAMESPACES
        .iter()
        .any(|ns| *ns != own && name.starts_with(ns.as_bytes()))
}

/// Translate an upper's raw xattrs into what the layer carries.
fn layer_xattrs(own: &'static str, raw: &[(OsString, Vec<u8>)]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let names = crate::upper::XattrNames { own };
    let mut out: Vec<(Vec<u8>, Vec<u8>)> = raw
        .iter()
        .filter_map(|(n, v)| {
            let shown = names.from_disk(n)?;
            keep_visible(own, shown.as_bytes()).then(|| (shown.into_vec(), v.clone()))
        })
        .collect();
    out.sort();
    out
}

fn is_opaque(raw: &[(OsString, Vec<u8>)]) -> bool {
    raw.iter().any(|(n, v)| {
        (n == "trusted.overlay.opaque" || n == "user.overlay.opaque" || n == "user.fuseoverlayfs.opaque")
            && v.first() == Some(&b'y')
    })
}

fn has_redirect(raw: &[(OsString, Vec<u8>)]) -> bool {
    raw.iter()
        .any(|(n, _)| n == "trusted.overlay.redirect" || n == "user.overlay.redirect")
}

/// Builds the item list: the upper's diff, with renamed directories made whole.
struct Translator<'a> {
    own: &'static str,
    /// for directories with a redirect: the merged view at the commit instant
    merged: Option<&'a crate::union::Union>,
    /// staged inode id -> st_ino of its file in the staging tree (with a merged view)
    tree_inos: HashMap<u64, u64>,
    items: Vec<Item>,
}

/// Sort key of a child: its name in the tarball.
fn tar_name(s: &Snap) -> Vec<u8> {
    if s.whiteout {
        [OCI_WHITEOUT_PREFIX.as_bytes(), s.name.as_bytes()].concat()
    } else {
        s.name.as_bytes().to_vec()
    }
}

impl Translator<'_> {
    fn base(&self, path: Vec<u8>, s: &Snap, kind: ItemKind) -> Item {
        Item {
            path,
            kind,
            perm: s.perm,
            uid: s.uid,
            gid: s.gid,
            mtime: s.mtime.tv_sec,
            rdev: s.rdev,
            xattrs: layer_xattrs(self.own, &s.xattrs),
            target: Vec::new(),
            data: Data::None,
            link_key: None,
        }
    }

    /// The directory `s` at `path` and everything below it.
    fn dir(&mut self, path: &[u8], s: &Snap) -> Result<()> {
        let item = self.base(path.to_vec(), s, ItemKind::Dir);
        self.items.push(item);
        let opaque = is_opaque(&s.xattrs);
        if !opaque && has_redirect(&s.xattrs) && !path.is_empty() {
            // OCI has no redirects: the renamed directory goes in whole, opaque, as the
            // merged view shows it.
            self.items
                .push(Item::marker(path, OCI_OPAQUE_MARKER.as_bytes(), ItemKind::Opaque));
            return self.merged_dir(path);
        }
        // The opaque marker (None) sorts among the entries by its name, like any other.
        let mut kids: Vec<(Vec<u8>, Option<&Snap>)> =
            s.children.iter().map(|c| (tar_name(c), Some(c))).collect();
        if opaque && !path.is_empty() {
            kids.push((OCI_OPAQUE_MARKER.as_bytes().to_vec(), None));
        }
        kids.sort_by(|a, b| a.0.cmp(&b.0));
        for (tname, c) in kids {
            let cpath = join(path, &tname);
            let Some(c) = c else {
                self.items
                    .push(Item::marker(path, OCI_OPAQUE_MARKER.as_bytes(), ItemKind::Opaque));
                continue;
            };
            if c.name.as_bytes().starts_with(OCI_WHITEOUT_PREFIX.as_bytes()) {
                return Err(Error::usage(
                    format!("upper entry \"{}\"", String::from_utf8_lossy(&cpath)),
                    "its name starts with .wh., which an OCI layer reads as a whiteout",
                    "rename it through the mount and commit again",
                ));
            }
            if c.whiteout {
                self.items.push(Item::marker(path, &tname, ItemKind::Whiteout));
                continue;
            }
            match c.kind {
                Kind::Dir => self.dir(&cpath, c)?,
                Kind::File => {
                    let mut it = self.base(cpath, c, ItemKind::File);
                    if let Some(d) = c.data {
                        it.data = Data::Staged(d);
                        it.link_key = (d.nlink > 1).then(|| self.staging_key(d.id));
                    }
                    self.items.push(it);
                }
                Kind::Symlink => {
                    let mut it = self.base(cpath, c, ItemKind::Symlink);
                    it.target = c.target.clone().unwrap_or_default().into_vec();
                    it.xattrs.clear();
                    self.items.push(it);
                }
                Kind::Fifo => self.items.push(self.base(cpath, c, ItemKind::Fifo)),
                Kind::Char => self.items.push(self.base(cpath, c, ItemKind::Char)),
                Kind::Block => self.items.push(self.base(cpath, c, ItemKind::Block)),
                Kind::Socket => {
                    warn!(path = %String::from_utf8_lossy(&cpath), "a socket cannot go into a layer tarball; skipped");
                }
            }
        }
        Ok(())
    }

    /// Link key of a staged inode: with a merged view, the number the union reports for
    /// its file in the staging tree (a link group may span a renamed directory and the rest).
    fn staging_key(&self, id: u64) -> u64 {
        match (self.merged, self.tree_inos.get(&id)) {
            // The staging tree is the union's top layer (index 1: 0 would be an upper).
            (Some(u), Some(ino)) => u.map_ino(1, *ino),
            _ => id,
        }
    }

    /// The children of the merged directory at `path`, from the union.
    fn merged_dir(&mut self, path: &[u8]) -> Result<()> {
        let u = self.merged.ok_or_else(|| {
            Error::io(
                "commit.merged",
                bytes_path(path),
                io::Error::other("no merged view"),
            )
        })?;
        let mut id = crate::union::inode::ROOT_ID;
        for c in path.split(|b| *b == b'/') {
            id = u.lookup(id, OsStr::from_bytes(c))?.id;
        }
        self.merged_children(u, id, path)
    }

    fn merged_children(&mut self, u: &crate::union::Union, id: u64, path: &[u8]) -> Result<()> {
        let fh = u.opendir(id)?;
        let listed = u.readdir(id, fh, 0);
        u.releasedir(fh);
        let mut names: Vec<OsString> = listed?
            .iter()
            .filter(|e| e.name != "." && e.name != "..")
            .map(|e| e.name.clone())
            .collect();
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for n in names {
            let e = u.lookup(id, &n)?;
            let a = e.attr;
            let cpath = join(path, n.as_bytes());
            let mut xattrs = Vec::new();
            if a.kind != Kind::Symlink {
                for name in u.listxattr(e.id)?.split(|b| *b == 0).filter(|n| !n.is_empty()) {
                    if !keep_visible(self.own, name) {
                        continue;
                    }
                    if let Ok(v) = u.getxattr(e.id, OsStr::from_bytes(name)) {
                        xattrs.push((name.to_vec(), v));
                    }
                }
                xattrs.sort();
            }
            let kind = match a.kind {
                Kind::Dir => ItemKind::Dir,
                Kind::File => ItemKind::File,
                Kind::Symlink => ItemKind::Symlink,
                Kind::Fifo => ItemKind::Fifo,
                Kind::Char => ItemKind::Char,
                Kind::Block => ItemKind::Block,
                Kind::Socket => {
                    warn!(path = %String::from_utf8_lossy(&cpath), "a socket cannot go into a layer tarball; skipped");
                    continue;
                }
            };
            let item = Item {
                path: cpath.clone(),
                kind,
                perm: a.perm,
                uid: a.uid,
                gid: a.gid,
                mtime: a.mtime.tv_sec,
                rdev: a.rdev,
                xattrs,
                target: if kind == ItemKind::Symlink {
                    u.readlink(e.id)?.into_vec()
                } else {
                    Vec::new()
                },
                data: if kind == ItemKind::File {
                    Data::Union {
                        node: e.id,
                        size: a.size,
                    }
                } else {
                    Data::None
                },
                link_key: (kind == ItemKind::File && a.nlink > 1).then_some(a.ino),
            };
            self.items.push(item);
            if kind == ItemKind::Dir {
                self.merged_children(u, e.id, &cpath)?;
            }
        }
        Ok(())
    }
}

pub(super) fn bytes_path(b: &[u8]) -> PathBuf {
    PathBuf::from(OsStr::from_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_xattrs_are_dropped_and_escaped_ones_unescaped() {
        let raw: Vec<(OsString, Vec<u8>)> = [
            ("trusted.overlay.opaque", "y"),
            ("trusted.overlay.redirect", "/a"),
            ("trusted.overlay.overlay.mine", "1"),
            ("trusted.verlay.origin", "9"),
            ("user.verlay.origin", "9"),
            ("user.overlay.opaque", "y"),
            ("user.fuseoverlayfs.opaque", "y"),
            ("user.k", "v"),
            ("security.capability", "c"),
        ]
        .iter()
        .map(|(n, v)| (OsString::from(n), v.as_bytes().to_vec()))
        .collect();
        let got = layer_xattrs("trusted.overlay.", &raw);
        let names: Vec<String> = got
            .iter()
            .map(|(n, _)| String::from_utf8_lossy(n).into_owned())
            .collect();
        assert_eq!(names, ["security.capability", "trusted.overlay.mine", "user.k"]);
    }
}
