//! `verlay als serve`: an *additional layer store* for podman (containers/storage), so that
//! `podman run` of an eStargz image starts without downloading its layers, reading them
//! through verlay's lazy, verified pull.
//!
//! The interface (containers/storage v1.43, podman 4.3; `drivers/overlay/overlay.go`
//! `getAdditionalLayerPath`, `store.go` `LookupAdditionalLayer`, the caller in
//! containers/image `storage/storage_dest.go`): storage.conf names the store with
//! `additionallayerstores = ["/MNT:ref"]`. For each layer of an image it pulls, podman first
//! stats `MNT/<base64(ref)>/<blob digest>/{diff,info,blob}`; `ref` is the image reference
//! as written (`127.0.0.1:5000/app:1`, docker.io names in full), base64 with the standard
//! alphabet and padding (a `/` of that alphabet would split it into path components; no
//! valid reference gives one, and the lookup joins them anyway), `blob digest` the
//! manifest's layer digest. If all three exist the layer is not downloaded:
//! `info` is decoded as storage's `Layer` JSON (`compressed-diff-digest`, `compressed-size`,
//! `diff-digest` = the config's diffID, `diff-size`, `compression`), and the layer's `diff`
//! directory in podman's graph root becomes a symlink to `MNT/.../diff`, which kernel
//! overlayfs (or fuse-overlayfs) then mounts as a lower layer. `blob` is read only by
//! `podman push`/`save` of the image (layers.go `Diff`); the run path only stats it.
//! podman tells the store which layers it uses by creating `<layer>/use` and releases one
//! by `rmdir <layer>`; a store that counts uses answers both with ENOENT (this one counts
//! nothing and keeps every layer in the verlay store; it answers ENOENT all the same, so
//! podman does not warn).
//!
//! Design (the simplest that works with podman 4.3.1 here): one read-only FUSE filesystem.
//! - A lookup of `<base64 ref>/<digest>` runs `verlay image pull --lazy` of that reference
//!   into the store ([`image::resolve`]: manifest, config and the TOCs only), once per
//!   reference (concurrent lookups wait for the same pull; a failure is remembered for
//!   [`FAILED_PULL_TTL`], logged once, and is EIO). Every request to the registry is bounded
//!   ([`PULL_TIMEOUT`] of silence, [`PULL_RETRIES`] retries).
//! - `diff/` shows the layer's own files, not an overlay of several: whiteouts stay visible
//!   as 0/0 character devices and opaque directories answer `trusted.overlay.opaque` and
//!   `user.overlay.opaque` (kernel overlayfs as root, and with `userxattr` rootless, reads
//!   one or the other), because podman stacks the layers itself. It serves the store's lazy
//!   layer directory through the same [`VerifiedLayer`] as a verlay mount's lower: metadata
//!   checked against the layer manifest at lookup, every chunk of a regular file fetched by
//!   HTTP Range on first read and checked against the TOC digest the image manifest names
//!   before it is served or cached (docs/lazy.md). A sealed layer is served from the
//!   ordinary layer it became.
//! - `info` is generated from the manifest and the config; `blob` has the blob's size and
//!   reads from the store's copy when the store has the whole blob (sealed), and is EIO with
//!   one log line otherwise: serving registry bytes that nothing has verified is not done.
//! - Rootless: started with `podman unshare` (as stargz-store is), so that the mount is in
//!   podman's user and mount namespaces and the owners the layer records (uid 0, ...) are
//!   the container's.
//!
//! [`fuse`] is the thin adapter; this module decides what each node is.

pub mod fuse;
pub mod image;
pub mod serve;

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rustix::fs::{OFlags, Stat};
use tracing::{error, info, warn};

use crate::error::{Error, Result};
use crate::layer::Kind;
use crate::lower::verify::FileChunks;
use crate::registry::Options;
use image::{Diff, Image, Layer};

/// The root's node id (FUSE_ROOT_ID).
pub const ROOT: u64 = 1;
/// st_ino of the store's own nodes (root, reference and layer dirs, `info`, `blob`): their
/// node id with this bit, apart from the inode numbers of the layers' files.
const SYNTH_INO: u64 = 1 << 63;
/// How long one registry request may stay silent during a pull.
pub const PULL_TIMEOUT: Duration = Duration::from_secs(10);
/// Retries of a failed registry request during a pull.
pub const PULL_RETRIES: u32 = 2;
/// A failed pull is not tried again for this long (podman looks up every layer in turn).
pub const FAILED_PULL_TTL: Duration = Duration::from_secs(10);
/// Caps: nodes the kernel holds at once, references pulled, open files and directories.
const MAX_NODES: usize = 1 << 20;
const MAX_IMAGES: usize = 1024;
const MAX_HANDLES: usize = 1 << 16;
/// Largest directory listed (entries).
const MAX_DIR_ENTRIES: usize = 1 << 20;

/// The names of an opaque directory's marker that overlayfs reads (root: trusted,
/// rootless with `userxattr`: user).
const OPAQUE_XATTRS: [&str; 2] = ["trusted.overlay.opaque", "user.overlay.opaque"];

/// What a node of the mount is.
#[derive(Debug, Clone)]
enum Node {
    /// the mountpoint: one directory per base64 reference
    Root,
    /// `<base64 ref>`, or the leading components of one that has a `/`
    RefPart(Arc<str>),
    /// `<base64 ref>/<digest>`: `diff`, `info`, `blob`
    Layer(Arc<Layer>),
    /// `<layer>/info`
    Info(Arc<Vec<u8>>),
    /// `<layer>/blob`
    Blob(Arc<Layer>),
    /// a file of a layer (`rel` empty: `diff` itself)
    Diff { diff: Arc<Diff>, rel: PathBuf },
}

/// The attributes of a node.
#[derive(Debug, Clone)]
pub enum Attr {
    /// a file of a layer, as its store directory has it
    Stat(Box<Stat>),
    /// one of the store's own nodes
    Synth { ino: u64, kind: Kind, size: u64 },
}

/// A looked-up node: its id and attributes.
#[derive(Debug)]
pub struct Entry {
    /// node id
    pub id: u64,
    /// attributes
    pub attr: Attr,
}

/// One directory entry.
#[derive(Debug, Clone)]
pub struct DirEntry {
    /// name
    pub name: OsString,
    /// kind
    pub kind: Kind,
    /// inode number shown (1 when unknown)
    pub ino: u64,
}

/// An open file or directory.
enum Handle {
    /// a layer's regular file: reads go through its verifier
    File {
        diff: Arc<Diff>,
        rel: PathBuf,
        fd: OwnedFd,
        fc: FileChunks,
    },
    /// `info`
    Bytes(Arc<Vec<u8>>),
    /// `blob`, from the store's whole copy
    Blob(std::fs::File),
    /// a directory listing, taken at open (shared: each READDIR pages through it)
    Dir(Arc<Vec<DirEntry>>),
}

struct Slot {
    node: Node,
    lookups: u64,
    key: Option<(u64, OsString)>,
}

#[derive(Default)]
struct Nodes {
    by_id: HashMap<u64, Slot>,
    by_key: HashMap<(u64, OsString), u64>,
    next: u64,
}

/// A pull of one reference: done (the image), failed (when, why), or not yet.
type Pull = Arc<Mutex<Option<std::result::Result<Arc<Image>, (Instant, String)>>>>;

/// The additional layer store.
pub struct Als {
    store: PathBuf,
    opts: Options,
    nodes: Mutex<Nodes>,
    pulls: Mutex<HashMap<String, Pull>>,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
}

impl Als {
    /// A store that pulls into the verlay store at `store` with `opts`.
    pub fn new(store: PathBuf, opts: Options) -> Als {
        let mut nodes = Nodes {
            next: ROOT + 1,
            ..Default::default()
        };
        nodes.by_id.insert(
            ROOT,
            Slot {
                node: Node::Root,
                lookups: 1,
                key: None,
            },
        );
        Als {
            store,
            opts,
            nodes: Mutex::new(nodes),
            pulls: Mutex::new(HashMap::new()),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
        }
    }

    fn node(&self, id: u64) -> Result<Node> {
        match self.nodes.lock().by_id.get(&id) {
            Some(s) => Ok(s.node.clone()),
            None => Err(Error::Errno(libc::ESTALE)),
        }
    }

    /// The image of `reference`, pulled once; see the module doc.
    fn image(&self, reference: &str) -> Result<Arc<Image>> {
        let pull = {
            let mut pulls = self.pulls.lock();
            if !pulls.contains_key(reference) && pulls.len() >= MAX_IMAGES {
                warn!(
                    reference,
                    images = MAX_IMAGES,
                    "too many images served; not pulling another"
                );
                return Err(Error::Errno(libc::ENOSPC));
            }
            pulls.entry(reference.to_string()).or_default().clone()
        };
        let mut slot = pull.lock();
        match &*slot {
            Some(Ok(img)) => return Ok(img.clone()),
            Some(Err((at, why))) if at.elapsed() < FAILED_PULL_TTL => {
                return Err(Error::remote(
                    format!("lazy pull of {reference}"),
                    why.clone(),
                    "see the log line above",
                ))
            }
            _ => {}
        }
        let t = Instant::now();
        match image::resolve(&self.store, reference, &self.opts) {
            Ok(img) => {
                info!(
                    reference,
                    layers = img.layers.len(),
                    ms = t.elapsed().as_millis() as u64,
                    "image pulled lazily"
                );
                let img = Arc::new(img);
                *slot = Some(Ok(img.clone()));
                Ok(img)
            }
            Err(e) => {
                error!(reference, error = %e, "lazy pull failed; the layer store answers EIO for this image");
                *slot = Some(Err((Instant::now(), e.to_string())));
                Err(Error::remote(
                    format!("lazy pull of {reference}"),
                    e.to_string(),
                    "see the log",
                ))
            }
        }
    }

    /// The node `name` in `parent`, before it has an id.
    fn child(&self, parent: &Node, name: &OsStr) -> Result<Node> {
        let enoent = Err(Error::Errno(libc::ENOENT));
        let Some(s) = name.to_str() else { return enoent };
        match parent {
            Node::Root if image::is_base64_piece(s) && s.len() <= 2 * image::MAX_REF => {
                Ok(Node::RefPart(Arc::from(s)))
            }
            Node::RefPart(text) if s.starts_with("sha256:") => {
                let reference = match image::decode_ref(text) {
                    Ok(r) => r,
                    Err(e) => {
                        warn!(name = %text, error = %e, "looked up a name that is not base64(image reference)");
                        return enoent;
                    }
                };
                let img = self.image(&reference)?;
                match img.layers.get(s) {
                    Some(l) => Ok(Node::Layer(l.clone())),
                    None => {
                        info!(reference, digest = s, "not a layer of the image");
                        enoent
                    }
                }
            }
            Node::RefPart(text) if image::is_base64_piece(s) && text.len() + s.len() < 2 * image::MAX_REF => {
                Ok(Node::RefPart(Arc::from(format!("{text}/{s}"))))
            }
            Node::Layer(l) => match s {
                "diff" => Ok(Node::Diff {
                    diff: l.diff.clone(),
                    rel: PathBuf::new(),
                }),
                "info" => Ok(Node::Info(l.info.clone())),
                "blob" => Ok(Node::Blob(l.clone())),
                // "use" and anything else: absent (see the module doc)
                _ => enoent,
            },
            Node::Diff { diff, rel } => {
                if s == "." || s == ".." || s.contains('/') {
                    return enoent;
                }
                Ok(Node::Diff {
                    diff: diff.clone(),
                    rel: rel.join(name),
                })
            }
            Node::Info(_) | Node::Blob(_) => Err(Error::Errno(libc::ENOTDIR)),
            _ => enoent,
        }
    }

    /// Attributes of `node` (node id `id`).
    fn attr(&self, id: u64, node: &Node) -> Result<Attr> {
        let synth = |kind, size| Attr::Synth {
            ino: id | SYNTH_INO,
            kind,
            size,
        };
        Ok(match node {
            Node::Root | Node::RefPart(_) | Node::Layer(_) => synth(Kind::Dir, 0),
            Node::Info(b) => synth(Kind::File, b.len() as u64),
            Node::Blob(l) => synth(Kind::File, l.blob_size),
            Node::Diff { diff, rel } => {
                let st = diff.dir.stat(rel)?;
                // the layer root is the store's directory itself; every other entry must be
                // what the manifest lists (EIO, logged once, when it is not)
                let st = if rel.as_os_str().is_empty() {
                    st
                } else {
                    diff.verified.check(&diff.dir, rel, st)?
                };
                Attr::Stat(Box::new(st.ok_or(Error::Errno(libc::ENOENT))?))
            }
        })
    }

    /// LOOKUP: the child's id (the same one while the kernel holds it) and attributes.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<Entry> {
        let p = self.node(parent)?;
        let key = (parent, name.to_os_string());
        let existing = self.nodes.lock().by_key.get(&key).copied();
        let (id, node) = match existing.map(|id| (id, self.node(id))) {
            Some((id, Ok(n))) => (id, n),
            _ => {
                let n = self.child(&p, name)?;
                (0, n)
            }
        };
        // attributes first: a lookup that fails leaves no node behind
        let attr = self.attr(id, &node)?;
        let mut nodes = self.nodes.lock();
        let id = match nodes.by_key.get(&key).copied() {
            Some(id) if nodes.by_id.contains_key(&id) => id,
            _ => {
                if nodes.by_id.len() >= MAX_NODES {
                    error!(
                        nodes = MAX_NODES,
                        "too many nodes held by the kernel; refusing lookups"
                    );
                    return Err(Error::Errno(libc::ENOMEM));
                }
                let id = nodes.next;
                nodes.next += 1;
                nodes.by_id.insert(
                    id,
                    Slot {
                        node,
                        lookups: 0,
                        key: Some(key.clone()),
                    },
                );
                nodes.by_key.insert(key, id);
                id
            }
        };
        if let Some(s) = nodes.by_id.get_mut(&id) {
            s.lookups += 1;
        }
        let attr = match attr {
            Attr::Synth { kind, size, .. } => Attr::Synth {
                ino: id | SYNTH_INO,
                kind,
                size,
            },
            a => a,
        };
        Ok(Entry { id, attr })
    }

    /// FORGET: the kernel dropped `n` references to `id`.
    pub fn forget(&self, id: u64, n: u64) {
        if id == ROOT {
            return;
        }
        let mut nodes = self.nodes.lock();
        let gone = match nodes.by_id.get_mut(&id) {
            Some(s) => {
                s.lookups = s.lookups.saturating_sub(n);
                s.lookups == 0
            }
            None => false,
        };
        if gone {
            if let Some(Slot { key: Some(k), .. }) = nodes.by_id.remove(&id) {
                if nodes.by_key.get(&k) == Some(&id) {
                    nodes.by_key.remove(&k);
                }
            }
        }
    }

    /// GETATTR.
    pub fn getattr(&self, id: u64) -> Result<Attr> {
        let n = self.node(id)?;
        self.attr(id, &n)
    }

    /// READLINK of a layer's symlink.
    pub fn readlink(&self, id: u64) -> Result<OsString> {
        match self.node(id)? {
            Node::Diff { diff, rel } => diff.dir.readlink(&rel),
            _ => Err(Error::Errno(libc::EINVAL)),
        }
    }

    fn add_handle(&self, h: Handle) -> Result<u64> {
        let mut hs = self.handles.lock();
        if hs.len() >= MAX_HANDLES {
            error!(handles = MAX_HANDLES, "too many open files in the layer store");
            return Err(Error::Errno(libc::ENFILE));
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        hs.insert(fh, Arc::new(h));
        Ok(fh)
    }

    fn handle(&self, fh: u64) -> Result<Arc<Handle>> {
        self.handles
            .lock()
            .get(&fh)
            .cloned()
            .ok_or(Error::Errno(libc::EBADF))
    }

    /// OPEN (read-only; `write` asks for any write access).
    pub fn open(&self, id: u64, write: bool) -> Result<u64> {
        if write {
            return Err(Error::Errno(libc::EROFS));
        }
        let h = match self.node(id)? {
            Node::Info(b) => Handle::Bytes(b),
            Node::Blob(l) => match std::fs::File::open(&l.blob_path) {
                Ok(f) => Handle::Blob(f),
                Err(e) => {
                    error!(path = %l.blob_path.display(), error = %e,
                        "blob of a lazy layer not sealed yet: not served (podman reads it only to push or save the image; wait for the seal, or pull the image without the layer store)");
                    return Err(Error::Errno(libc::EIO));
                }
            },
            Node::Diff { diff, rel } => {
                let entry = diff.verified.entry(&rel)?.ok_or(Error::Errno(libc::ENOENT))?;
                let fd = diff.dir.open_file(&rel, OFlags::RDONLY)?;
                let st = rustix::fs::fstat(&fd)?;
                let fc = diff
                    .verified
                    .file_chunks(&entry, st.st_ino)
                    .ok_or(Error::Errno(libc::EISDIR))?;
                Handle::File { diff, rel, fd, fc }
            }
            _ => return Err(Error::Errno(libc::EISDIR)),
        };
        self.add_handle(h)
    }

    /// READ.
    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        match &*self.handle(fh)? {
            Handle::File { diff, rel, fd, fc } => diff.verified.read(rel, fc, fd, offset, size),
            Handle::Bytes(b) => {
                let at = (offset as usize).min(b.len());
                let end = at.saturating_add(size as usize).min(b.len());
                Ok(b[at..end].to_vec())
            }
            Handle::Blob(f) => crate::layer::read_at(f, offset, size),
            Handle::Dir(_) => Err(Error::Errno(libc::EISDIR)),
        }
    }

    /// RELEASE / RELEASEDIR.
    pub fn release(&self, fh: u64) {
        self.handles.lock().remove(&fh);
    }

    /// OPENDIR: the listing is taken once, so that READDIR pages through a fixed list.
    pub fn opendir(&self, id: u64) -> Result<u64> {
        let list = match self.node(id)? {
            // nothing is listed: names appear when looked up (as stargz-store does)
            Node::Root | Node::RefPart(_) => Vec::new(),
            Node::Layer(_) => ["diff", "info", "blob"]
                .iter()
                .map(|n| DirEntry {
                    name: n.into(),
                    kind: if *n == "diff" { Kind::Dir } else { Kind::File },
                    ino: 1,
                })
                .collect(),
            Node::Diff { diff, rel } => list_layer_dir(&diff, &rel)?,
            Node::Info(_) | Node::Blob(_) => return Err(Error::Errno(libc::ENOTDIR)),
        };
        self.add_handle(Handle::Dir(Arc::new(list)))
    }

    /// The listing of an open directory.
    pub fn dir_entries(&self, fh: u64) -> Result<Arc<Vec<DirEntry>>> {
        match &*self.handle(fh)? {
            Handle::Dir(l) => Ok(l.clone()),
            _ => Err(Error::Errno(libc::ENOTDIR)),
        }
    }

    /// GETXATTR: a layer file's own xattrs; an opaque directory answers both marker names.
    pub fn getxattr(&self, id: u64, name: &OsStr) -> Result<Vec<u8>> {
        let Node::Diff { diff, rel } = self.node(id)? else {
            return Err(Error::Errno(libc::ENODATA));
        };
        if OPAQUE_XATTRS.iter().any(|x| name == *x) {
            for x in OPAQUE_XATTRS {
                if diff.dir.get_xattr(&rel, OsStr::new(x))?.as_deref() == Some(&b"y"[..]) {
                    return Ok(b"y".to_vec());
                }
            }
            return Err(Error::Errno(libc::ENODATA));
        }
        diff.dir.get_xattr(&rel, name)?.ok_or(Error::Errno(libc::ENODATA))
    }

    /// LISTXATTR: NUL-terminated names.
    pub fn listxattr(&self, id: u64) -> Result<Vec<u8>> {
        let Node::Diff { diff, rel } = self.node(id)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for n in diff.dir.list_xattr(&rel)? {
            out.extend_from_slice(n.as_bytes());
            out.push(0);
        }
        Ok(out)
    }

    /// STATFS: the store's filesystem.
    pub fn statfs(&self) -> Result<rustix::fs::StatVfs> {
        Ok(rustix::fs::statvfs(&self.store)?)
    }

    /// CREATE / MKNOD: `<layer>/use` is podman saying it uses the layer (ENOENT tells it
    /// that this store understood); nothing else can be created, so the answer is always
    /// an error.
    pub fn create(&self, parent: u64, name: &OsStr) -> Error {
        match self.node(parent) {
            Ok(Node::Layer(l)) if name == "use" => {
                info!(digest = %l.digest, "podman uses a layer");
                Error::Errno(libc::ENOENT)
            }
            Ok(_) => Error::Errno(libc::EROFS),
            Err(e) => e,
        }
    }

    /// RMDIR: `rmdir <ref>/<digest>` is podman releasing the layer (ENOENT: understood; the
    /// layer stays in the verlay store).
    pub fn rmdir(&self, parent: u64, name: &OsStr) -> Result<()> {
        match self.node(parent)? {
            Node::RefPart(_) if name.as_bytes().starts_with(b"sha256:") => {
                info!(digest = %name.to_string_lossy(), "podman released a layer");
                Err(Error::Errno(libc::ENOENT))
            }
            _ => Err(Error::Errno(libc::EROFS)),
        }
    }
}

/// The entries of a layer directory the manifest lists (an entry on disk that it does not
/// list is hidden, as a verlay mount hides it), with the inode numbers on disk.
fn list_layer_dir(diff: &Diff, rel: &Path) -> Result<Vec<DirEntry>> {
    let listed = diff.verified.listed(rel)?;
    if listed.len() > MAX_DIR_ENTRIES {
        error!(path = %rel.display(), entries = listed.len(), "directory too large to list");
        return Err(Error::Errno(libc::EIO));
    }
    let inos: HashMap<OsString, u64> = diff
        .dir
        .read_dir(rel)?
        .into_iter()
        .take(MAX_DIR_ENTRIES)
        .map(|e| (e.name, e.ino))
        .collect();
    let mut out: Vec<DirEntry> = listed
        .into_iter()
        .map(|(name, kind)| DirEntry {
            ino: inos.get(&name).copied().unwrap_or(1),
            name,
            kind,
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}
