//! Merged directory listings: upper over lowers, whiteouts and opaque dirs applied.
//!
//! A listing is built once per open directory (at offset 0) and served by index, so offsets
//! stay stable while entries are added or removed. Building it costs one pass over each
//! layer's directory; no per-entry lookup is done except for char devices, which may be
//! whiteouts.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use super::*;
use crate::error::Result;
use crate::layer::{is_whiteout_stat, Kind, LayerDir, OCI_OPAQUE_MARKER, OCI_WHITEOUT_PREFIX};
use crate::union::inode::Node;
use crate::union::{LowerHint, Union, MAX_HINTED_LOWERS};

/// One entry of a merged listing.
#[derive(Clone, Debug)]
pub struct DirEntry {
    /// name
    pub name: OsString,
    /// d_ino (st_ino where the node is known)
    pub ino: u64,
    /// d_type
    pub kind: Kind,
    /// what the listing saw of this name in the lower dirs (for readdirplus lookups)
    pub hint: LowerHint,
}

fn kind_of(layer: &LayerDir, rel: &std::path::Path, k: Option<Kind>) -> Result<Option<(Kind, bool)>> {
    match k {
        Some(Kind::Char) | None => match layer.stat(rel)? {
            Some(st) => Ok(Some((Kind::from_mode(st.st_mode), is_whiteout_stat(&st)))),
            None => Ok(None),
        },
        Some(k) => Ok(Some((k, false))),
    }
}

impl Union {
    /// The merged listing of a directory node, with "." and "..".
    pub fn merged_entries(&self, node: &Arc<Node>) -> Result<Vec<DirEntry>> {
        let st = node.snapshot();
        let path = self.path_of(node)?;
        let mut out = vec![
            DirEntry {
                name: ".".into(),
                ino: node.ino(),
                kind: Kind::Dir,
                hint: LowerHint::default(),
            },
            DirEntry {
                name: "..".into(),
                ino: 0,
                kind: Kind::Dir,
                hint: LowerHint::default(),
            },
        ];
        let mut seen: HashSet<OsString> = HashSet::new();
        let is_root = node.id == crate::union::inode::ROOT_ID;
        if st.upper || is_root {
            self.upper_entries(node, &path, &mut seen, &mut out)?;
        }
        // Which lower dirs hold each name, or an OCI whiteout of it: complete listings, so a
        // lookup may skip the layers where a name is absent.
        let hinted = st.lowers.len() <= MAX_HINTED_LOWERS;
        let mut hints: std::collections::HashMap<OsString, LowerHint> = std::collections::HashMap::new();
        for (li, l) in st.lowers.iter().enumerate() {
            let bit = 1u64 << li.min(63);
            let layer = &self.lowers[l.layer];
            let mut hidden_here: Vec<OsString> = Vec::new();
            let disk = self.lower_dir_entries(l)?;
            for e in disk {
                let b = e.name.as_bytes();
                if b == OCI_OPAQUE_MARKER.as_bytes() {
                    continue;
                }
                if let Some(rest) = b.strip_prefix(OCI_WHITEOUT_PREFIX.as_bytes()) {
                    let hidden = OsStr::from_bytes(rest).to_os_string();
                    if hinted {
                        hints.entry(hidden.clone()).or_default().oci_whiteout |= bit;
                    }
                    hidden_here.push(hidden);
                    continue;
                }
                if hinted {
                    hints.entry(e.name.clone()).or_default().present |= bit;
                }
                if seen.contains(&e.name) {
                    continue;
                }
                let rel = l.path.join(&e.name);
                let Some((kind, whiteout)) = kind_of(layer, &rel, e.kind)? else {
                    continue;
                };
                seen.insert(e.name.clone());
                if whiteout {
                    continue;
                }
                let ino = self
                    .known_child_ino(node, &e.name)
                    .unwrap_or_else(|| self.map_ino(l.layer + 1, e.ino));
                out.push(DirEntry {
                    name: e.name,
                    ino,
                    kind,
                    hint: LowerHint::default(),
                });
            }
            // An OCI whiteout hides the name in the layers below, not beside it.
            seen.extend(hidden_here);
        }
        if hinted {
            for e in out.iter_mut().skip(2) {
                if let Some(h) = hints.get(&e.name) {
                    e.hint = *h;
                }
            }
        }
        Ok(out)
    }

    /// The upper's part of a merged listing (none on a read-only mount).
    fn upper_entries(
        &self,
        node: &Arc<Node>,
        path: &std::path::Path,
        seen: &mut HashSet<OsString>,
        out: &mut Vec<DirEntry>,
    ) -> Result<()> {
        let Some(up) = &self.upper else {
            return Ok(());
        };
        let impure = up.is_impure(path)?;
        for e in up.dir.read_dir(path)? {
            let rel = path.join(&e.name);
            let Some((kind, whiteout)) = kind_of(&up.dir, &rel, e.kind)? else {
                continue;
            };
            let fresh = seen.insert(e.name.clone());
            if whiteout || !fresh {
                continue;
            }
            // d_ino must equal st_ino: a copied-up entry reports its origin's.
            let ino = match self.known_child_ino(node, &e.name) {
                Some(ino) => ino,
                None if impure => up.origin(&rel)?.unwrap_or_else(|| self.map_ino(0, e.ino)),
                None => self.map_ino(0, e.ino),
            };
            out.push(DirEntry {
                name: e.name,
                ino,
                kind,
                hint: LowerHint::default(),
            });
        }
        Ok(())
    }

    /// The raw entries of one lower dir. A verified layer shows what its manifest lists:
    /// entries it does not list are hidden, and entries it lists but the layer lacks are
    /// shown (and fail with EIO when used), so damage is visible instead of silently missing.
    fn lower_dir_entries(&self, l: &LowerRef) -> Result<Vec<crate::layer::RawEntry>> {
        let layer = &self.lowers[l.layer];
        let mut listed = match self.verified(l.layer) {
            Some(v) => Some(v.listed(&l.path)?),
            None => None,
        };
        let mut disk = layer.read_dir(&l.path)?;
        if let Some(listed) = &mut listed {
            disk.retain(|e| listed.remove(&e.name).is_some());
            for (name, kind) in listed.drain() {
                if kind != Kind::Char {
                    disk.push(crate::layer::RawEntry {
                        name,
                        kind: Some(kind),
                        ino: 0,
                    });
                }
            }
        }
        Ok(disk)
    }
}

// FUSE directory operations.
impl Union {
    /// FUSE opendir.
    pub fn opendir(&self, id: u64) -> Result<u64> {
        let node = self.node(id)?;
        if node.kind != Kind::Dir {
            return errno(libc::ENOTDIR);
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.dirs.write().insert(
            fh,
            Arc::new(DirHandle {
                entries: Mutex::new(None),
            }),
        );
        Ok(fh)
    }

    /// FUSE readdir: entries from `offset` on (offset = index + 1 of the previous entry).
    pub fn readdir(&self, id: u64, fh: u64, offset: u64) -> Result<Arc<Vec<dir::DirEntry>>> {
        let node = self.node(id)?;
        let h = self
            .dirs
            .read()
            .get(&fh)
            .cloned()
            .ok_or(Error::Errno(libc::EBADF))?;
        let mut slot = h.entries.lock();
        if offset == 0 || slot.is_none() {
            *slot = Some(Arc::new(self.merged_entries(&node)?));
        }
        Ok(slot.clone().unwrap_or_default())
    }

    /// FUSE readdir without a directory handle, at `cookie` (0, or one made by
    /// [`dir_cookie`] for an entry sent earlier).
    ///
    /// The FUSE adapter answers OPENDIR with ENOSYS, so the kernel sends no OPENDIR or
    /// RELEASEDIR (two requests per directory a walk opens) and caches listings itself
    /// (FOPEN_CACHE_DIR is the kernel's default without opendir). A read from 0 takes a
    /// fresh snapshot of the merged listing; later reads name their snapshot by the
    /// generation in the cookie, so offsets stay stable while the directory changes, as
    /// with a handle. A snapshot is dropped when a read reaches its end (the kernel's last,
    /// empty read), when newer ones push it out ([`LISTINGS_PER_DIR`]) or when the kernel
    /// forgets the directory; a reader whose snapshot is gone continues at its index in a
    /// fresh one.
    pub fn readdir_at(&self, id: u64, cookie: u64) -> Result<DirRead> {
        let node = self.node(id)?;
        if node.kind != Kind::Dir {
            return errno(libc::ENOTDIR);
        }
        let gen = (cookie >> 32) as u32;
        let start = (cookie & u64::from(u32::MAX)) as usize;
        if cookie != 0 {
            let mut all = self.listings.lock();
            if let Some(list) = all.get_mut(&id) {
                if let Some(i) = list.iter().position(|l| l.gen == gen) {
                    let entries = list[i].entries.clone();
                    if start >= entries.len() {
                        list.remove(i);
                        if list.is_empty() {
                            all.remove(&id);
                        }
                    }
                    return Ok(DirRead { entries, start, gen });
                }
            }
        }
        let entries = Arc::new(self.merged_entries(&node)?);
        let gen = loop {
            // Below 2^31 and never 0 (see dir_cookie).
            let g = self.next_listing.fetch_add(1, Ordering::Relaxed) & 0x7fff_ffff;
            if g != 0 {
                break g;
            }
        };
        if start < entries.len() {
            let mut all = self.listings.lock();
            let list = all.entry(id).or_default();
            if list.len() >= LISTINGS_PER_DIR {
                list.remove(0);
            }
            list.push(Listing {
                gen,
                entries: entries.clone(),
            });
        }
        Ok(DirRead { entries, start, gen })
    }

    /// FUSE releasedir.
    pub fn releasedir(&self, fh: u64) {
        self.dirs.write().remove(&fh);
    }

    /// FUSE fsyncdir.
    pub fn fsyncdir(&self, id: u64) -> Result<()> {
        let node = self.node(id)?;
        let Some(up) = &self.upper else {
            return Ok(());
        };
        // The kernel sends no SYNCFS to a FUSE mount and fuser has no hook for it: fsync of
        // the root (`sync MOUNTPOINT`) is the way to sync the whole upper filesystem.
        if id == ROOT_ID {
            return up.syncfs();
        }
        if node.state.read().unlinked {
            // A removed directory still open (seed 344): sync its upper object through the fd
            // kept at the removal, as kernel overlayfs syncs the removed real directory; a
            // lower one has nothing in the upper to sync.
            let fd = self.unlinked_fd(&node, None, true).ok();
            return up.sync_file(fd, false);
        }
        if !node.state.read().upper {
            return up.sync_dir(None);
        }
        let path = self.path_of(&node)?;
        up.sync_dir(Some(&path))
    }

    /// FUSE statfs: the upper's filesystem (or the top lower's for a read-only mount).
    pub fn statfs(&self) -> Result<rustix::fs::StatVfs> {
        let fd = match &self.upper {
            Some(u) => &u.dir.root,
            None => &self.lowers[0].root,
        };
        Ok(rustix::fs::fstatvfs(fd)?)
    }
}
