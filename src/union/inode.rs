//! The inode table: FUSE node ids, lookup counts, and where each merged object lives.
//!
//! A node is created by lookup (or create) and dropped when the kernel forgets it. Node ids
//! are never reused during a mount, so a stale id can never name a different object. The
//! st_ino users see is separate: stable across copy-up, rename and remount.
//!
//! File handles: FUSE encodes a handle in the kernel from the node id alone (fs/fuse/inode.c
//! `fuse_encode_fh`: node id + generation, the daemon is not asked). To decode one whose
//! inode it has dropped, the kernel sends LOOKUP(id, ".") (with FUSE_EXPORT_SUPPORT). So
//! a forgotten node leaves a small record ([`Gone`]: parent id, name, st_ino) in a bounded
//! table; the id can be revived from it, and a later lookup of the same object (same
//! st_ino) gets the same id back, so the kernel never sees one object under two ids.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::layer::Kind;

/// FUSE node id of the root directory.
pub const ROOT_ID: u64 = 1;

/// A place in a lower layer: layer index (0 = top lower) and path in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LowerRef {
    /// index into the lower list (0 = leftmost in lowerdir=)
    pub layer: usize,
    /// path relative to the layer root
    pub path: PathBuf,
}

/// Where a merged object lives now. Changed only under the node's lock.
#[derive(Clone, Debug)]
pub struct NodeState {
    /// parent node id (meaningless once `unlinked`)
    pub parent: u64,
    /// name in the parent (shared with the parent's child table: one allocation)
    pub name: Arc<std::ffi::OsStr>,
    /// no longer reachable by any name (open fds keep working)
    pub unlinked: bool,
    /// the object exists in the upper at the merged path
    pub upper: bool,
    /// non-directories: the lower object (the origin once copied up)
    pub lower: Option<LowerRef>,
    /// directories: the lower directories merged under it, top first (empty when opaque
    /// or pure upper)
    pub lowers: Vec<LowerRef>,
    /// other names of the same upper object (hard links made through this mount), so the
    /// node stays reachable when its first name goes away
    pub aliases: ThinVec<(u64, OsString)>,
    /// parents this node holds one reference on, one per name, once it has had a second
    /// name (see `Union::repin`): the kernel's dentries pin only the parents of the names
    /// it holds, and the node's path goes through its first name, whose parent the kernel
    /// may have forgotten while it holds the object through another
    pub pinned: ThinVec<u64>,
}

/// One merged object known to the kernel.
#[derive(Debug)]
pub struct Node {
    /// FUSE node id
    pub id: u64,
    /// file type; fixed for the node's life (a name that changes type gets a new node)
    pub kind: Kind,
    /// st_ino shown to users; changes only when a copy-up breaks a lower hard link
    /// (kernel overlayfs with index=off gives the copy the upper's own inode number)
    pub ino: AtomicU64,
    /// kernel lookup count
    pub lookups: AtomicU64,
    /// location, under its own lock
    pub state: RwLock<NodeState>,
    /// serializes copy-up of this node (single flight)
    pub copy_up: Mutex<()>,
    /// open file handles of this node: switched to the upper copy by a copy-up, and used for
    /// fstat/fchmod of an unlinked file (the kernel sends those without a file handle)
    pub handles: Mutex<ThinVec<std::sync::Weak<crate::union::FileHandle>>>,
    /// the node this one holds one reference on (0: none). A node revived from a file
    /// handle has no kernel dentry pinning its parent (the kernel's dentry is disconnected),
    /// so it pins the parent itself, released when the kernel forgets this node.
    pub pin: AtomicU64,
    /// attributes of a removed directory (reported with nlink 0 while it is still open)
    pub gone_attr: Mutex<Option<Box<crate::union::Attr>>>,
    /// a removed directory, fifo, device, socket or symlink: an fd on its object, opened
    /// before the removal (true: on the upper), for fstat, fchown, fchmod, fgetxattr, ...
    /// through an fd the kernel still has open on it (the kernel opens these without asking
    /// the daemon, so it has no handle of its own); O_PATH except for directories
    pub gone_fd: Mutex<Option<(Arc<std::os::fd::OwnedFd>, bool)>>,
    /// directories: live child nodes by name, so a name keeps its node while known
    pub children: Mutex<ChildMap>,
    /// whether the object is known to have no `security.capability` xattr (see
    /// [`crate::union::KILLPRIV_XATTR`]): an epoch in the high bits, bumped by anything
    /// that could add one, and the "known absent" bit in bit 0
    pub no_caps: AtomicU64,
}

impl Node {
    /// A node with one lookup and no handles, children or remembered removal.
    pub fn new(id: u64, kind: Kind, ino: u64, state: NodeState) -> Node {
        Node {
            id,
            kind,
            ino: AtomicU64::new(ino),
            lookups: AtomicU64::new(1),
            state: RwLock::new(state),
            copy_up: Mutex::new(()),
            handles: Mutex::new(Default::default()),
            gone_attr: Mutex::new(None),
            gone_fd: Mutex::new(None),
            children: Mutex::new(ChildMap::default()),
            no_caps: AtomicU64::new(0),
            pin: AtomicU64::new(0),
        }
    }

    /// st_ino shown to users.
    pub fn ino(&self) -> u64 {
        self.ino.load(Ordering::Relaxed)
    }

    /// Is the object known to have no `security.capability`?
    pub fn no_caps_known(&self) -> bool {
        self.no_caps.load(Ordering::Acquire) & 1 == 1
    }

    /// The epoch to pass to [`Node::note_no_caps`], read before looking.
    pub fn caps_epoch(&self) -> u64 {
        self.no_caps.load(Ordering::Acquire) & !1
    }

    /// Record that a look that started at `epoch` found no `security.capability`; ignored
    /// when something changed the object since (the look may predate the change).
    pub fn note_no_caps(&self, epoch: u64) {
        let _ = self
            .no_caps
            .compare_exchange(epoch, epoch | 1, Ordering::AcqRel, Ordering::Relaxed);
    }

    /// The object's xattrs may have changed (setxattr, removexattr, copy-up, another
    /// object under the node): look again next time.
    pub fn forget_no_caps(&self) {
        let _ = self
            .no_caps
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |v| {
                Some((v & !1).wrapping_add(2))
            });
    }

    /// Snapshot of the state.
    pub fn snapshot(&self) -> NodeState {
        self.state.read().clone()
    }
}

/// Live child nodes of a directory by name. Most nodes are files with no children, so the
/// table is allocated on first use (a node stays 40 bytes smaller).
#[derive(Debug, Default)]
// The box is the point: an empty HashMap is 48 bytes inline in every node, a None is 8.
#[allow(clippy::box_collection)]
pub struct ChildMap(Option<Box<HashMap<Arc<std::ffi::OsStr>, u64>>>);

impl ChildMap {
    /// Node id of a child.
    pub fn get(&self, name: &std::ffi::OsStr) -> Option<&u64> {
        self.0.as_ref()?.get(name)
    }

    /// Record a child.
    pub fn insert(&mut self, name: Arc<std::ffi::OsStr>, id: u64) {
        self.0.get_or_insert_with(Default::default).insert(name, id);
    }

    /// Forget a child; the table goes when the last one does.
    pub fn remove(&mut self, name: &std::ffi::OsStr) -> Option<u64> {
        let map = self.0.as_mut()?;
        let id = map.remove(name);
        if map.is_empty() {
            self.0 = None;
        }
        id
    }
}

const SHARDS: usize = 64;

/// How many forgotten nodes are remembered for file handles. About 100 bytes each (the name
/// is shared with the dropped node), so 6.5 MiB at most; beyond, the oldest handles go stale
/// (ESTALE) once their inode has left the kernel's cache, as on NFS.
pub const GONE_MAX: usize = 1 << 16;

/// What is left of a forgotten node: enough to find it again by name.
#[derive(Clone, Debug)]
pub struct Gone {
    /// parent node id when forgotten
    pub parent: u64,
    /// name in that parent
    pub name: Arc<std::ffi::OsStr>,
    /// st_ino shown to users: identifies the object when it is looked up again
    pub ino: u64,
    /// file type
    pub kind: Kind,
}

/// Forgotten nodes by id and by st_ino, oldest first, at most [`GONE_MAX`].
#[derive(Debug, Default)]
struct GoneTable {
    by_id: HashMap<u64, Gone>,
    by_ino: HashMap<u64, u64>,
    order: std::collections::VecDeque<u64>,
}

/// All live nodes, sharded so lookups on many threads do not contend on one lock.
#[derive(Debug)]
pub struct NodeTable {
    shards: Vec<RwLock<HashMap<u64, Arc<Node>>>>,
    next_id: AtomicU64,
    gone: Mutex<GoneTable>,
    linked: Mutex<LinkedTable>,
}

/// Live nodes of upper objects with more than one name, by the upper's own inode number, and
/// back: a name looked up after the kernel forgot the node it was known through must get the
/// object's live node (the kernel caches attributes per node id). A hint only: callers check
/// the object before sharing (see `Union::live_hard_link`).
#[derive(Debug, Default)]
struct LinkedTable {
    by_real: HashMap<u64, u64>,
    by_id: HashMap<u64, u64>,
}

impl NodeTable {
    /// A table holding only the root.
    pub fn new(root: Node) -> NodeTable {
        let shards: Vec<_> = (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect();
        shards[ROOT_ID as usize % SHARDS]
            .write()
            .insert(ROOT_ID, Arc::new(root));
        NodeTable {
            shards,
            next_id: AtomicU64::new(ROOT_ID + 1),
            gone: Mutex::new(GoneTable::default()),
            linked: Mutex::new(LinkedTable::default()),
        }
    }

    fn shard(&self, id: u64) -> &RwLock<HashMap<u64, Arc<Node>>> {
        &self.shards[id as usize % SHARDS]
    }

    /// The node with this id.
    pub fn get(&self, id: u64) -> Option<Arc<Node>> {
        self.shard(id).read().get(&id).cloned()
    }

    /// The node with this id, with one more kernel reference taken under the shard lock,
    /// so a concurrent forget cannot drop it in between.
    pub fn get_ref(&self, id: u64) -> Option<Arc<Node>> {
        let shard = self.shard(id).read();
        let node = shard.get(&id)?;
        node.lookups.fetch_add(1, Ordering::AcqRel);
        Some(node.clone())
    }

    /// A new node id.
    pub fn alloc_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Insert a node.
    pub fn insert(&self, node: Arc<Node>) {
        self.shard(node.id).write().insert(node.id, node);
    }

    /// Drop `n` kernel references; removes the node when none are left. Returns the node
    /// if it was removed.
    pub fn forget(&self, id: u64, n: u64) -> Option<Arc<Node>> {
        if id == ROOT_ID {
            return None;
        }
        let mut shard = self.shard(id).write();
        let node = shard.get(&id)?;
        let have = node.lookups.load(Ordering::Acquire);
        if have < n {
            // The kernel holds more references than were counted: a reply that handed it
            // the node went uncounted (the node may already have been dropped too early).
            tracing::warn!(
                op = "forget",
                ino = id,
                have,
                n,
                "forget of more references than counted"
            );
        }
        node.lookups.store(have.saturating_sub(n), Ordering::Release);
        if have <= n {
            return shard.remove(&id);
        }
        None
    }

    /// Remember a node the kernel forgot (not an unlinked one: its handles must go stale).
    pub fn note_gone(&self, id: u64, g: Gone) {
        let mut t = self.gone.lock();
        if let Some(old) = t.by_ino.insert(g.ino, id) {
            if old != id {
                t.by_id.remove(&old);
            }
        }
        if t.by_id.insert(id, g).is_none() {
            t.order.push_back(id);
        }
        // Bounded: drop the oldest records (skipping ids already taken back).
        while t.by_id.len() > GONE_MAX {
            let Some(old) = t.order.pop_front() else { break };
            if let Some(g) = t.by_id.remove(&old) {
                if t.by_ino.get(&g.ino) == Some(&old) {
                    t.by_ino.remove(&g.ino);
                }
            }
        }
        // The order queue keeps ids already taken back; keep it within twice the bound.
        if t.order.len() > 2 * GONE_MAX {
            let GoneTable { by_id, order, .. } = &mut *t;
            order.retain(|i| by_id.contains_key(i));
        }
    }

    /// What is left of forgotten node `id`.
    pub fn gone(&self, id: u64) -> Option<Gone> {
        self.gone.lock().by_id.get(&id).cloned()
    }

    /// The id a forgotten node of this object (st_ino and kind) had, taken back for a new
    /// node of it; else a fresh id.
    pub fn id_for(&self, ino: u64, kind: Kind) -> u64 {
        let mut t = self.gone.lock();
        if let Some(&id) = t.by_ino.get(&ino) {
            if t.by_id.get(&id).is_some_and(|g| g.kind == kind) {
                t.by_ino.remove(&ino);
                t.by_id.remove(&id);
                return id;
            }
        }
        drop(t);
        self.alloc_id()
    }

    /// Forget the record of an object that no longer exists (its handles must go stale,
    /// and a new object given the same st_ino by the upper filesystem must get a new id).
    pub fn drop_gone_ino(&self, ino: u64) {
        let mut t = self.gone.lock();
        if let Some(id) = t.by_ino.remove(&ino) {
            t.by_id.remove(&id);
        }
    }

    /// Record live node `id` as the node of the upper object whose own inode number is
    /// `real` (a hard-linked one).
    pub fn note_linked(&self, real: u64, id: u64) {
        let mut t = self.linked.lock();
        if let Some(old) = t.by_real.insert(real, id) {
            if old != id {
                t.by_id.remove(&old);
            }
        }
        if let Some(old) = t.by_id.insert(id, real) {
            if old != real && t.by_real.get(&old) == Some(&id) {
                t.by_real.remove(&old);
            }
        }
    }

    /// The live node last recorded for the upper object `real`, if any.
    pub fn linked(&self, real: u64) -> Option<u64> {
        self.linked.lock().by_real.get(&real).copied()
    }

    /// Node `id` went away: drop its hard-link record (not a newer node's).
    pub fn drop_linked(&self, id: u64) {
        let mut t = self.linked.lock();
        if let Some(real) = t.by_id.remove(&id) {
            if t.by_real.get(&real) == Some(&id) {
                t.by_real.remove(&real);
            }
        }
    }

    /// Number of live nodes (the root included, so never zero).
    pub fn count(&self) -> usize {
        self.shards.iter().map(|s| s.read().len()).sum()
    }
}

/// A list that costs one pointer while empty: most nodes never get an open handle or a second
/// name, and a node table of 100,000 entries pays for every empty `Vec` (24 bytes each).
#[derive(Clone, Debug)]
// The box is the point, as for ChildMap: an empty Vec is 24 bytes inline, a None is 8.
#[allow(clippy::box_collection)]
pub struct ThinVec<T>(Option<Box<Vec<T>>>);

impl<T> Default for ThinVec<T> {
    fn default() -> Self {
        ThinVec(None)
    }
}

impl<T> std::ops::Deref for ThinVec<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        self.0.as_deref().map(Vec::as_slice).unwrap_or(&[])
    }
}

impl<T> std::ops::DerefMut for ThinVec<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        self.0.as_deref_mut().map(Vec::as_mut_slice).unwrap_or(&mut [])
    }
}

impl<T> ThinVec<T> {
    /// Append.
    pub fn push(&mut self, v: T) {
        self.0.get_or_insert_with(Default::default).push(v);
    }

    /// Remove the last element; the list goes back to one pointer when it empties.
    pub fn pop(&mut self) -> Option<T> {
        let v = self.0.as_mut()?.pop();
        self.shrink();
        v
    }

    /// Keep what `f` accepts.
    pub fn retain(&mut self, f: impl FnMut(&T) -> bool) {
        if let Some(v) = self.0.as_mut() {
            v.retain(f);
        }
        self.shrink();
    }

    fn shrink(&mut self) {
        if self.0.as_ref().is_some_and(|v| v.is_empty()) {
            self.0 = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Gone, Kind, Node, NodeTable, ThinVec, GONE_MAX, ROOT_ID};
    use std::sync::Arc;

    fn table() -> NodeTable {
        NodeTable::new(Node::new(
            ROOT_ID,
            Kind::Dir,
            1,
            super::NodeState {
                parent: ROOT_ID,
                name: Arc::from(std::ffi::OsStr::new("")),
                unlinked: false,
                upper: false,
                lower: None,
                lowers: Vec::new(),
                aliases: Default::default(),
                pinned: Default::default(),
            },
        ))
    }

    fn gone(ino: u64, kind: Kind) -> Gone {
        Gone {
            parent: ROOT_ID,
            name: Arc::from(std::ffi::OsStr::new("f")),
            ino,
            kind,
        }
    }

    #[test]
    fn forgotten_object_gets_its_old_id_back_once_and_only_for_the_same_kind() {
        let t = table();
        let id = t.alloc_id();
        t.note_gone(id, gone(77, Kind::File));
        assert_eq!(t.gone(id).map(|g| g.ino), Some(77));
        assert_ne!(
            t.id_for(77, Kind::Dir),
            id,
            "another kind under that st_ino is another object"
        );
        assert_eq!(t.id_for(77, Kind::File), id);
        assert!(t.gone(id).is_none(), "taken back: the record is gone");
        assert_ne!(t.id_for(77, Kind::File), id, "an id is live at most once");
    }

    #[test]
    fn a_new_object_with_a_reused_st_ino_gets_a_new_id() {
        let t = table();
        let id = t.alloc_id();
        t.note_gone(id, gone(5, Kind::File));
        t.drop_gone_ino(5);
        assert!(t.gone(id).is_none());
        assert_ne!(t.id_for(5, Kind::File), id);
    }

    #[test]
    fn forgotten_records_are_bounded_oldest_first() {
        let t = table();
        let first = t.alloc_id();
        t.note_gone(first, gone(1_000_000, Kind::File));
        for i in 0..GONE_MAX as u64 + 10 {
            let id = t.alloc_id();
            t.note_gone(id, gone(i, Kind::File));
        }
        let g = t.gone.lock();
        assert_eq!(g.by_id.len(), GONE_MAX);
        assert!(g.by_ino.len() <= GONE_MAX);
        assert!(g.order.len() <= 2 * GONE_MAX);
        drop(g);
        assert!(t.gone(first).is_none(), "the oldest record went first");
        assert_ne!(
            t.id_for(1_000_000, Kind::File),
            first,
            "its st_ino gets a fresh id"
        );
    }

    #[test]
    fn hard_link_records_follow_the_newest_node_and_go_with_it() {
        let t = table();
        let (a, b) = (t.alloc_id(), t.alloc_id());
        t.note_linked(900, a);
        assert_eq!(t.linked(900), Some(a));
        t.note_linked(900, b);
        assert_eq!(t.linked(900), Some(b), "the newer node of the object");
        t.drop_linked(a);
        assert_eq!(
            t.linked(900),
            Some(b),
            "an older node's end leaves the newer record"
        );
        t.drop_linked(b);
        assert_eq!(t.linked(900), None);
        let l = t.linked.lock();
        assert!(l.by_real.is_empty() && l.by_id.is_empty(), "nothing left behind");
    }

    #[test]
    fn thin_vec_is_one_pointer_and_frees_its_list_when_empty() {
        assert_eq!(std::mem::size_of::<ThinVec<(u64, std::ffi::OsString)>>(), 8);
        let mut v: ThinVec<u32> = ThinVec::default();
        assert!(v.is_empty() && v.0.is_none());
        v.push(1);
        v.push(2);
        v.push(3);
        assert_eq!(&*v, &[1, 2, 3]);
        v.retain(|x| *x != 2);
        assert_eq!(&*v, &[1, 3]);
        v.iter_mut().for_each(|x| *x *= 10);
        assert_eq!(v.pop(), Some(30));
        v.retain(|x| *x != 10);
        assert!(v.0.is_none(), "emptied by retain: back to no allocation");
        v.push(4);
        assert_eq!(v.pop(), Some(4));
        assert!(v.0.is_none(), "emptied by pop: back to no allocation");
        assert_eq!(v.pop(), None);
    }
}
