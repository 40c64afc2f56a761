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
        if let Some(up) = &self.upper {
            if st.upper || is_root {
                let impure = up.is_impure(&path)?;
                for e in up.dir.read_dir(&path)? {
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
            }
        }
        // Which lower dirs hold each name, or an OCI whiteout of it: complete listings, so a
        // lookup may skip the layers where a name is absent.
        let hinted = st.lowers.len() <= MAX_HINTED_LOWERS;
        let mut hints: std::collections::HashMap<OsString, LowerHint> = std::collections::HashMap::new();
        for (li, l) in st.lowers.iter().enumerate() {
            let bit = 1u64 << li.min(63);
            let layer = &self.lowers[l.layer];
            let mut hidden_here: Vec<OsString> = Vec::new();
            // A verified layer shows what its manifest lists: entries it does not list are
            // hidden, and entries it lists but the layer lacks are shown (and fail with EIO
            // when used), so damage is visible instead of silently missing.
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
}
