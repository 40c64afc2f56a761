//! Lookup: resolving a name through the upper and the lowers (whiteouts, opaque
//! directories, redirects), installing nodes, forget, and export (NFS-style) lookups.

use super::*;

/// A lookup in progress: what was found so far, and the lower dirs still to search.
struct Walk {
    hint: Option<LowerHint>,
    kind: Option<Kind>,
    upper: bool,
    ino: u64,
    st: Option<Stat>,
    lower: Option<LowerRef>,
    lowers: Vec<LowerRef>,
    search: Vec<LowerRef>,
}

/// A lower directory's redirect `v` moves the rest of the search: an absolute value is the
/// path from each layer's root, a relative one replaces the last name.
fn redirect_rest(rest: &mut [LowerRef], v: &[u8]) {
    for later in rest {
        later.path = match v.strip_prefix(b"/") {
            Some(abs) => PathBuf::from(OsStr::from_bytes(abs)),
            None => later
                .path
                .parent()
                .unwrap_or(Path::new(""))
                .join(OsStr::from_bytes(v)),
        };
    }
}

impl Union {
    pub(super) fn upper_dir_is_opaque(&self, rel: &Path) -> Result<bool> {
        let up = self.upper()?;
        dir_is_opaque(&up.dir, rel)
    }

    /// Stop a list of lower directories at the first opaque one (it is kept, what is
    /// below it is not).
    pub(super) fn cut_at_opaque(&self, lowers: Vec<LowerRef>) -> Result<Vec<LowerRef>> {
        let mut out = Vec::new();
        for l in lowers {
            let layer = &self.lowers[l.layer];
            let opaque = dir_is_opaque(layer, &l.path)?;
            out.push(l);
            if opaque {
                break;
            }
        }
        Ok(out)
    }

    /// Redirect of an upper directory, as a list of places to look in the lowers.
    pub(super) fn redirect_of(
        &self,
        layer: &LayerDir,
        rel: &Path,
        parent_lowers: &[LowerRef],
        overlay_prefixes: bool,
    ) -> Result<Option<Vec<LowerRef>>> {
        let _ = overlay_prefixes;
        let Some(v) = redirect_value(layer, rel)? else {
            return Ok(None);
        };
        let v = OsStr::from_bytes(&v).to_os_string();
        let vb = v.as_bytes();
        if vb.first() == Some(&b'/') {
            // As ovl_lookup does for an absolute redirect: look the path up in each lower
            // layer from its root, and stop going down the layers after one in which the
            // path passes through an opaque directory, a whiteout or a non-directory.
            let path = PathBuf::from(OsStr::from_bytes(&vb[1..]));
            let mut out = Vec::new();
            for i in 0..self.lowers.len() {
                out.push(LowerRef {
                    layer: i,
                    path: path.clone(),
                });
                if self.path_stops_below(i, &path)? {
                    break;
                }
            }
            Ok(Some(out))
        } else {
            // Relative: the old name in the same parent.
            Ok(Some(
                parent_lowers
                    .iter()
                    .map(|p| LowerRef {
                        layer: p.layer,
                        path: p.path.join(&v),
                    })
                    .collect(),
            ))
        }
    }

    /// Does looking up `path` from the root of lower `layer` pass through something that
    /// hides the layers below: an opaque directory, a whiteout or a non-directory among its
    /// ancestors? (The path's own last component is judged by the caller.)
    pub(super) fn path_stops_below(&self, layer: usize, path: &Path) -> Result<bool> {
        let l = &self.lowers[layer];
        let mut prefix = PathBuf::new();
        let comps: Vec<_> = path.components().collect();
        for c in comps.iter().take(comps.len().saturating_sub(1)) {
            prefix.push(c);
            match l.stat(&prefix)? {
                None => {
                    if oci_whiteout_exists(l, &prefix)? {
                        return Ok(true);
                    }
                    return Ok(false);
                }
                Some(st) if Kind::from_mode(st.st_mode) != Kind::Dir => return Ok(true),
                Some(_) => {
                    if dir_is_opaque(l, &prefix)? {
                        return Ok(true);
                    }
                }
            }
        }
        Ok(false)
    }

    /// Find `name` under a parent whose merged path is `ppath` and whose lower dirs are
    /// `plowers`. ENOENT when nothing (or a whiteout) is there.
    pub(super) fn resolve(
        &self,
        ppath: &Path,
        pupper: bool,
        plowers: &[LowerRef],
        name: &OsStr,
    ) -> Result<Resolved> {
        self.resolve_hinted(ppath, pupper, plowers, name, None)
    }

    pub(super) fn resolve_hinted(
        &self,
        ppath: &Path,
        pupper: bool,
        plowers: &[LowerRef],
        name: &OsStr,
        hint: Option<LowerHint>,
    ) -> Result<Resolved> {
        let path = ppath.join(name);
        let mut w = Walk {
            hint: hint.filter(|_| plowers.len() <= MAX_HINTED_LOWERS),
            kind: None,
            upper: false,
            ino: 0,
            st: None,
            lower: None,
            lowers: Vec::new(),
            search: plowers
                .iter()
                .map(|p| LowerRef {
                    layer: p.layer,
                    path: p.path.join(name),
                })
                .collect(),
        };
        // A parent that is not in the upper has nothing under it there: no upper stat (a
        // cold walk of a lower tree then costs one stat per name, not two).
        if pupper {
            if let Some(r) = self.resolve_in_upper(&mut w, &path, plowers)? {
                return Ok(r);
            }
        }
        // `.wh.*` names in a lower layer are OCI whiteout markers, never objects.
        if name.as_bytes().starts_with(OCI_WHITEOUT_PREFIX.as_bytes()) {
            w.search.clear();
        }
        self.resolve_in_lowers(&mut w)?;
        match w.kind {
            Some(kind) => Ok(Resolved {
                kind,
                upper: w.upper,
                lower: w.lower,
                lowers: w.lowers,
                ino: w.ino,
                st: w.st,
            }),
            None => errno(libc::ENOENT),
        }
    }

    /// The upper step of a lookup: a whiteout is ENOENT, a non-directory ends the lookup
    /// (returned), a directory is recorded in `w` and decides where the lowers are searched
    /// (nowhere when opaque, the redirect's target when it has one).
    fn resolve_in_upper(&self, w: &mut Walk, path: &Path, plowers: &[LowerRef]) -> Result<Option<Resolved>> {
        let Some(up) = self.upper.as_ref() else {
            return Ok(None);
        };
        let Some(st) = up.dir.stat(path)? else {
            return Ok(None);
        };
        if is_whiteout_stat(&st) {
            return errno(libc::ENOENT);
        }
        let k = Kind::from_mode(st.st_mode);
        w.kind = Some(k);
        w.upper = true;
        w.ino = match up.origin(path)? {
            Some(o) => o,
            None => self.map_ino(0, st.st_ino),
        };
        if k != Kind::Dir {
            return Ok(Some(Resolved {
                kind: k,
                upper: true,
                lower: None,
                lowers: Vec::new(),
                ino: w.ino,
                st: Some(st),
            }));
        }
        w.st = Some(st);
        if dir_is_opaque(&up.dir, path)? {
            w.search.clear();
        } else if let Some(r) = self.redirect_of(&up.dir, path, plowers, true)? {
            w.search = r;
            // The hint was about the parent's lower dirs, not the redirect's.
            w.hint = None;
        }
        Ok(None)
    }

    /// The lower steps of a lookup: each candidate in `w.search`, top first, until a
    /// whiteout, a non-directory or an opaque directory ends the search.
    fn resolve_in_lowers(&self, w: &mut Walk) -> Result<()> {
        let mut i = 0;
        while i < w.search.len() {
            let cand = w.search[i].clone();
            let bit = 1u64 << i.min(63);
            i += 1;
            let layer = &self.lowers[cand.layer];
            let st = match w.hint {
                // Known absent from this lower dir: no stat, and the listing said whether an
                // OCI whiteout hides the name below.
                Some(h) if h.present & bit == 0 => {
                    if h.oci_whiteout & bit != 0 {
                        break;
                    }
                    continue;
                }
                _ => self.lower_stat(cand.layer, &cand.path)?,
            };
            match st {
                Some(st) if is_whiteout_stat(&st) => break,
                Some(st) => {
                    let k = Kind::from_mode(st.st_mode);
                    if k == Kind::Dir {
                        if w.kind.is_some() && w.kind != Some(Kind::Dir) {
                            break;
                        }
                        if w.kind.is_none() {
                            w.kind = Some(Kind::Dir);
                            w.ino = self.map_ino(cand.layer + 1, st.st_ino);
                            w.st = Some(st);
                        }
                        let opaque = dir_is_opaque(layer, &cand.path)?;
                        // A directory renamed in a layer that was once an upper carries a
                        // redirect: the layers below hold its contents under the old path.
                        if !opaque {
                            if let Some(v) = redirect_value(layer, &cand.path)? {
                                w.hint = None;
                                redirect_rest(&mut w.search[i..], &v);
                            }
                        }
                        w.lowers.push(cand);
                        if opaque {
                            break;
                        }
                    } else {
                        if w.kind.is_none() {
                            w.kind = Some(k);
                            w.ino = self.map_ino(cand.layer + 1, st.st_ino);
                            w.lower = Some(cand);
                            w.st = Some(st);
                        }
                        break;
                    }
                }
                None => {
                    if oci_whiteout_exists(layer, &cand.path)? {
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// The manifest of lower `layer`, when it is verified.
    pub(crate) fn verified(&self, layer: usize) -> Option<&Arc<VerifiedLayer>> {
        self.opts.verified.get(layer).and_then(Option::as_ref)
    }

    /// lstat of a lower object, checked against the layer's manifest when it has one: an
    /// entry the manifest lists but the layer lacks, or whose metadata differs, is EIO; an
    /// entry it does not list is absent.
    pub(super) fn lower_stat(&self, layer: usize, rel: &Path) -> Result<Option<Stat>> {
        let l = &self.lowers[layer];
        let st = l.stat(rel)?;
        match self.verified(layer) {
            Some(v) => v.check(l, rel, st),
            None => Ok(st),
        }
    }

    /// Is anything visible at `name` in the lower dirs `plowers` (ignoring the upper)?
    /// Decides whether removing the name from the upper needs a whiteout.
    pub(super) fn lower_has(&self, plowers: &[LowerRef], name: &OsStr) -> Result<bool> {
        for p in plowers {
            let layer = &self.lowers[p.layer];
            let cand = p.path.join(name);
            match self.lower_stat(p.layer, &cand)? {
                Some(st) if is_whiteout_stat(&st) => return Ok(false),
                Some(_) => return Ok(true),
                None => {
                    if oci_whiteout_exists(layer, &cand)? {
                        return Ok(false);
                    }
                }
            }
        }
        Ok(false)
    }

    /// Register (or refresh) the node for `name` under `parent`, taking one kernel ref.
    pub(super) fn install(&self, parent: &Node, name: &OsStr, r: Resolved) -> Result<Arc<Node>> {
        // An upper object with other names may have a live node already (known through a
        // name whose node the kernel kept): the kernel must see one node id per object.
        // Found before the child table is locked (finding it reads other nodes' state).
        let real = match (&r.st, r.upper, r.kind) {
            (Some(s), true, k) if k != Kind::Dir && s.st_nlink > 1 => Some(s.st_ino),
            _ => None,
        };
        let linked = real.and_then(|real| self.live_hard_link(&r, real));
        let mut children = parent.children.lock();
        if let Some(&id) = children.get(name) {
            if let Some(node) = self.nodes.get_ref(id) {
                if node.kind == r.kind {
                    let mut st = node.state.write();
                    // Never downgrade: a concurrent copy-up may have published the upper
                    // after this resolution looked.
                    st.upper |= r.upper;
                    if !st.upper {
                        st.lower = r.lower;
                    }
                    if st.lowers.is_empty() || r.upper == st.upper {
                        st.lowers = r.lowers;
                    }
                    drop(st);
                    // The name may now lead to another object of the same type.
                    node.forget_no_caps();
                    return Ok(node);
                }
                // Same name, another object: the old node stays for its open fds.
                self.nodes.forget(id, 1);
                node.state.write().unlinked = true;
            }
        }
        // None when the kernel forgot it meanwhile: then a new node.
        if let Some(node) = linked.and_then(|l| self.nodes.get_ref(l.id)) {
            let mut st = node.state.write();
            let known = (st.parent == parent.id && &*st.name == name)
                || st.aliases.iter().any(|(p, n)| *p == parent.id && n == name);
            if !known {
                st.aliases.push((parent.id, name.to_os_string()));
            }
            drop(st);
            children.insert(Arc::from(name), node.id);
            drop(children);
            self.repin(&node);
            return Ok(node);
        }
        // The id a forgotten node of this object had, so file handles made before stay valid.
        let id = self.nodes.id_for(r.ino, r.kind);
        let shared_name: Arc<OsStr> = Arc::from(name);
        let node = Arc::new(Node::new(
            id,
            r.kind,
            r.ino,
            NodeState {
                parent: parent.id,
                name: shared_name.clone(),
                unlinked: false,
                upper: r.upper,
                lower: r.lower,
                lowers: r.lowers,
                aliases: Default::default(),
                pinned: Default::default(),
            },
        ));
        self.nodes.insert(node.clone());
        if let Some(real) = real {
            self.nodes.note_linked(real, id);
        }
        children.insert(shared_name, id);
        Ok(node)
    }

    /// The live node of the upper object `real` (hard-linked) that resolution `r` found, if
    /// it still is that object; no reference taken. Kernel overlayfs has one inode per upper
    /// object; a second node id for it here would leave the kernel's cached attributes of one
    /// name stale after a change through the other. Needed once the kernel has forgotten the
    /// node the object was known through by the name being looked up.
    fn live_hard_link(&self, r: &Resolved, real: u64) -> Option<Arc<Node>> {
        let want = r.st.as_ref()?;
        let node = self.nodes.get(self.nodes.linked(real)?)?;
        let same = node.kind == r.kind
            && {
                let st = node.state.read();
                st.upper && !st.unlinked
            }
            && self
                .path_of(&node)
                .ok()
                .and_then(|p| self.upper.as_ref()?.dir.stat(&p).ok().flatten())
                .is_some_and(|s| s.st_ino == want.st_ino && s.st_dev == want.st_dev);
        same.then_some(node)
    }

    /// Hold one reference on the parent of each name of a node that has had a second name,
    /// and no more (see [`NodeState::pinned`]); to be called after any change of its names,
    /// with no child table locked (releasing a pin may drop a parent).
    pub(super) fn repin(&self, node: &Node) {
        let release: Vec<u64> = {
            let mut st = node.state.write();
            if st.aliases.is_empty() && st.pinned.is_empty() {
                return;
            }
            // A node the kernel has forgotten holds nothing (forget_node released its pins,
            // or will, under this lock).
            let live = self.nodes.get(node.id).is_some_and(|n| std::ptr::eq(&*n, node));
            let mut want: Vec<u64> = Vec::new();
            if live {
                want.extend(st.aliases.iter().map(|(p, _)| *p));
                if !st.unlinked {
                    want.push(st.parent);
                }
                want.retain(|p| *p != ROOT_ID && *p != node.id);
            }
            let mut kept: inode::ThinVec<u64> = Default::default();
            let mut release = Vec::new();
            for &p in st.pinned.iter() {
                match want.iter().position(|w| *w == p) {
                    Some(i) => {
                        want.swap_remove(i);
                        kept.push(p);
                    }
                    None => release.push(p),
                }
            }
            for p in want {
                // A parent the kernel forgot is not pinned; path_of goes through another name.
                if self.nodes.get_ref(p).is_some() {
                    kept.push(p);
                }
            }
            st.pinned = kept;
            release
        };
        for p in release {
            self.forget_node(p, 1);
        }
    }

    /// The child node for `name`, resolving it in the layers.
    pub(super) fn child(&self, parent: &Arc<Node>, name: &OsStr) -> Result<(Arc<Node>, PathBuf)> {
        let (node, path, _) = self.child_hinted(parent, name, None)?;
        Ok((node, path))
    }

    pub(super) fn child_hinted(
        &self,
        parent: &Arc<Node>,
        name: &OsStr,
        hint: Option<LowerHint>,
    ) -> Result<(Arc<Node>, PathBuf, Option<Stat>)> {
        check_name(name)?;
        if parent.kind != Kind::Dir {
            return errno(libc::ENOTDIR);
        }
        let ppath = self.path_of(parent)?;
        let (pupper, plowers) = {
            let s = parent.state.read();
            (s.upper, s.lowers.clone())
        };
        let r = self.resolve_hinted(&ppath, pupper, &plowers, name, hint)?;
        let st = r.st;
        let from_upper = r.upper;
        let node = self.install(parent, name, r)?;
        // A node that a concurrent copy-up already moved to the upper keeps its upper stat.
        let st = st.filter(|_| node.state.read().upper == from_upper);
        Ok((node, ppath.join(name), st))
    }

    /// FUSE lookup.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<Entry> {
        self.lookup_hinted(parent, name, None)
    }

    /// Lookup of a name just listed by readdir, with what the listing showed of the lower
    /// dirs (readdirplus).
    pub fn lookup_hinted(&self, parent: u64, name: &OsStr, hint: Option<LowerHint>) -> Result<Entry> {
        let parent = self.node(parent)?;
        let (node, _, st) = self.child_hinted(&parent, name, hint)?;
        // The stat the lookup just made describes the object, unless the node is an open
        // unlinked one (then attr() finds its fd).
        let attr = match st {
            Some(st) if !node.state.read().unlinked => Ok(self.attr_from(&node, &st)),
            _ => self.attr(&node, None),
        };
        match attr {
            Ok(attr) => Ok(Entry { id: node.id, attr }),
            Err(e) => {
                self.forget_node(node.id, 1);
                Err(e)
            }
        }
    }

    /// Does `name` exist under `parent` in the merged view? Does not take a kernel ref.
    pub(super) fn peek(&self, parent: &Arc<Node>, name: &OsStr) -> Result<Option<(Resolved, PathBuf)>> {
        check_name(name)?;
        let ppath = self.path_of(parent)?;
        let (pupper, plowers) = {
            let s = parent.state.read();
            (s.upper, s.lowers.clone())
        };
        match self.resolve(&ppath, pupper, &plowers, name) {
            Ok(r) => Ok(Some((r, ppath.join(name)))),
            Err(e) if e.errno() == libc::ENOENT => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// After the kernel forgot this many nodes, freed memory is returned to the system.
    pub(super) const TRIM_AFTER_FORGETS: u64 = 20_000;

    /// FUSE forget.
    pub fn forget(&self, id: u64, n: u64) {
        self.forget_many(std::iter::once((id, n)));
    }

    /// FUSE batch_forget: after a large batch (memory pressure, drop_caches), give the freed
    /// memory back so RSS follows the kernel's cache.
    pub fn forget_many(&self, nodes: impl Iterator<Item = (u64, u64)>) {
        let mut dropped = 0u64;
        for (id, n) in nodes {
            dropped += u64::from(self.forget_node(id, n));
        }
        let total = self.forgotten.fetch_add(dropped, Ordering::Relaxed) + dropped;
        if total / Self::TRIM_AFTER_FORGETS != (total - dropped) / Self::TRIM_AFTER_FORGETS {
            crate::sys::release_free_memory();
            debug!(
                forgotten = total,
                nodes = self.nodes.count(),
                "returned freed memory to the system"
            );
        }
    }

    /// Drop `n` references; true when the node went away. The references it held on other
    /// nodes (pins) go with it, iteratively: a chain of parents can be long.
    pub(super) fn forget_node(&self, id: u64, n: u64) -> bool {
        let mut work = Vec::new();
        let dropped = self.drop_node(id, n, &mut work);
        // Bounded: each round removes a node or drops a reference, and a node holds few pins.
        while let Some(p) = work.pop() {
            self.drop_node(p, 1, &mut work);
        }
        dropped
    }

    /// One step of [`Self::forget_node`]: the pins of a removed node are pushed on `work`.
    fn drop_node(&self, id: u64, n: u64, work: &mut Vec<u64>) -> bool {
        let Some(node) = self.nodes.forget(id, n) else {
            return false;
        };
        if node.kind == Kind::Dir {
            self.listings.lock().remove(&id);
        }
        self.nodes.drop_linked(id);
        // What is needed, then the state lock goes: a child table is locked below, and an
        // install holding one may be reading this node's state.
        let (parent, name, aliases, unlinked, pinned) = {
            let mut st = node.state.write();
            (
                st.parent,
                st.name.clone(),
                st.aliases.clone(),
                st.unlinked,
                std::mem::take(&mut st.pinned),
            )
        };
        // Its names (hard links: several) leave their parents' child tables.
        let names = std::iter::once((parent, &*name)).chain(aliases.iter().map(|(p, n)| (*p, n.as_os_str())));
        for (p, n) in names {
            if let Some(parent) = self.nodes.get(p) {
                let mut ch = parent.children.lock();
                if ch.get(n) == Some(&id) {
                    ch.remove(n);
                }
            }
        }
        if !unlinked {
            let gone = inode::Gone {
                parent,
                name,
                ino: node.ino(),
                kind: node.kind,
            };
            self.nodes.note_gone(id, gone);
        }
        work.extend(pinned.iter().copied());
        let pin = node.pin.swap(0, Ordering::AcqRel);
        if pin != 0 {
            work.push(pin);
        }
        true
    }

    /// Deepest chain of forgotten parents a file handle is revived through.
    pub(super) const REVIVE_MAX_DEPTH: usize = 4096;

    /// FUSE lookup of "." or ".." under `id`: how the kernel decodes a file handle whose
    /// inode it has dropped (FUSE_EXPORT_SUPPORT; fs/fuse/inode.c `fuse_get_dentry` and
    /// `fuse_get_parent`). "." must answer with the same id, or the kernel fails with EIO;
    /// an object that no longer exists is ESTALE.
    pub fn lookup_export(&self, id: u64, name: &OsStr) -> Result<Entry> {
        let node = self.revive(id, 0)?;
        let node = if name.as_bytes() == b".." {
            let parent = node.state.read().parent;
            let r = if node.id == ROOT_ID {
                Ok(node.clone())
            } else {
                self.revive(parent, 0)
            };
            self.forget_node(node.id, 1);
            r?
        } else {
            node
        };
        match self.attr(&node, None) {
            Ok(attr) => Ok(Entry { id: node.id, attr }),
            Err(e) => {
                self.forget_node(node.id, 1);
                Err(e)
            }
        }
    }

    /// The node `id` with one kernel reference taken: the live one, or, for a forgotten
    /// one, found again by name under its (revived) parent, with the same id when it is
    /// the same object (same st_ino). The revived node pins its parent (see [`Node::pin`]).
    pub(super) fn revive(&self, id: u64, depth: usize) -> Result<Arc<Node>> {
        if let Some(node) = self.nodes.get_ref(id) {
            if node.state.read().unlinked {
                debug!(op = "lookup_export", ino = id, "unlinked: stale");
                self.forget_node(id, 1);
                return errno(libc::ESTALE);
            }
            return Ok(node);
        }
        if depth > Self::REVIVE_MAX_DEPTH {
            return errno(libc::ESTALE);
        }
        let Some(gone) = self.nodes.gone(id) else {
            debug!(
                op = "lookup_export",
                ino = id,
                "forgotten node not remembered: stale"
            );
            return errno(libc::ESTALE);
        };
        let parent = self.revive(gone.parent, depth + 1)?;
        let found = self.child(&parent, &gone.name);
        let node = match found {
            Ok((node, _)) if node.id == id => node,
            Ok((node, _)) => {
                debug!(
                    op = "lookup_export",
                    ino = id,
                    found = node.id,
                    "another object under the name: stale"
                );
                self.forget_node(node.id, 1);
                self.forget_node(parent.id, 1);
                return errno(libc::ESTALE);
            }
            Err(e) => {
                self.forget_node(parent.id, 1);
                return match e.errno() {
                    libc::ENOENT | libc::ENOTDIR => errno(libc::ESTALE),
                    _ => Err(e),
                };
            }
        };
        // Keep the reference on the parent for this node (released by its forget); one is
        // enough, so a second reviver gives its reference back.
        if node
            .pin
            .compare_exchange(0, parent.id, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            self.forget_node(parent.id, 1);
        }
        Ok(node)
    }
}
