//! The snapshotter's state: snapshot records in a redb database, snapshot directories on disk,
//! and containerd's rules over them. Synchronous; the gRPC layer calls it on blocking threads.
//!
//! Layout of the root directory `ROOT`:
//!
//! ```text
//! ROOT/lock                        flock(LOCK_EX) held while a snapshotter serves ROOT
//! ROOT/metadata.redb               key -> record (kind, id, parent, labels, times, usage)
//! ROOT/snapshots/<id>/fs           the snapshot's files: the upper of an active snapshot,
//!                                  a lower (in kernel overlayfs format) once committed
//! ROOT/snapshots/<id>/work         the workdir of an active snapshot's verlay mount
//! ROOT/snapshots/<id>/fs.verlay-manifest   a committed snapshot's layer manifest
//! ROOT/snapshots/<id>/layer.json   its manifest digest, checked by every verlay mount of it
//! ROOT/store/                      a verlay layer store holding the eStargz layers recorded
//!                                  lazily by a remote Prepare ([`crate::remote`]); such a
//!                                  committed snapshot's directory is its store layer's `diff`
//! ```
//!
//! Ordering (the promise: after a kill -9 or a power cut, every committed snapshot is complete
//! and sealed, and every directory is either in the database or removable garbage):
//!
//! - Prepare/View create the directories, then insert the record in one transaction: a crash
//!   in between leaves a directory no record names, removed by [`Snapshots::cleanup`].
//! - Commit waits until no verlay mount holds the upper (`commit.wait_upper`), makes the tree
//!   durable (`commit.syncfs`), seals it (`commit.seal`: manifest written and fsynced), writes
//!   `layer.json` (`commit.record`), and only then swaps the active record for the committed one
//!   in one transaction (`commit.db`). A crash before `commit.db` leaves the active snapshot as
//!   it was (containerd unpacks the layer again); after it, the layer is complete and verified
//!   on every read.
//! - A remote Prepare records the layer in the store first (built in `store/tmp`, published
//!   by one rename), then inserts the committed record in one transaction: a crash in
//!   between leaves a store layer no record names, removed at the next open.
//! - Remove deletes the record first, then renames the directory to `<id>.removing` and
//!   deletes it: a crash in between leaves garbage for Cleanup, never a record without its
//!   directory.
//!
//! Must not: hand out a mount of a committed layer that skips verification (mounts say
//! `verify=require`), or record a
//! snapshot as committed before its data and manifest are durable.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use containerd_snapshots::api::types::Mount;
use containerd_snapshots::{Info, Kind, Usage};
use redb::{Database, ReadableTable, TableDefinition};
use rustix::fs::FlockOperation;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use verlay::failpoint::Failpoints;

use crate::error::{Error, Result};
use crate::filter::{Filters, Subject};
use crate::remote;

/// key (containerd's snapshot key or committed name) -> JSON [`Record`].
const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
/// "next_id" and "version".
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Format version of the database; a newer one is refused at open.
const DB_VERSION: u64 = 1;
/// Only labels with this prefix pass from an active snapshot to the committed one
/// (containerd's `snapshots.FilterInheritedLabels`).
pub const INHERITED_LABEL_PREFIX: &str = "containerd.io/snapshot/";
/// The mount type handed to containerd: it runs `mount.fuse3 overlay TARGET -o ... -t verlay`,
/// which runs `verlay overlay TARGET -o ...` (verlay must be in containerd's PATH).
pub const MOUNT_TYPE: &str = "fuse3.verlay";
/// Every lower of a verlay mount handed out is a committed, sealed snapshot: `require` makes a
/// layer whose manifest went missing refuse to mount, where `on` (the default) would serve it
/// unchecked.
const VERIFY_OPTION: &str = "verify=require";
/// How long Commit waits for the verlay daemon of the upper to exit after containerd's
/// unmount (the daemon holds a flock on the upper until it has finished every request).
const UPPER_RELEASE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an operation on the remote layers' store waits for its lock (a verlay mount
/// holds it while it seals a layer: an import of that layer).
const STORE_WAIT: Duration = Duration::from_secs(60);

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum RecordKind {
    Active,
    View,
    Committed,
}

impl RecordKind {
    fn api(self) -> Kind {
        match self {
            RecordKind::Active => Kind::Active,
            RecordKind::View => Kind::View,
            RecordKind::Committed => Kind::Committed,
        }
    }
    fn name(self) -> &'static str {
        match self {
            RecordKind::Active => "active",
            RecordKind::View => "view",
            RecordKind::Committed => "committed",
        }
    }
}

/// One snapshot, as stored in the database.
#[derive(Serialize, Deserialize, Clone, Debug)]
struct Record {
    id: u64,
    kind: RecordKind,
    parent: String,
    labels: BTreeMap<String, String>,
    created: SystemTime,
    updated: SystemTime,
    /// bytes and inodes of the snapshot's own tree, measured at commit
    usage: Option<(i64, i64)>,
    /// the layer manifest's digest, for committed snapshots
    manifest_digest: Option<String>,
    /// a remote snapshot's directory (its lazy layer in `ROOT/store`), instead of
    /// `snapshots/<id>/fs`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lower: Option<PathBuf>,
}

impl Record {
    fn info(&self, name: &str) -> Info {
        Info {
            kind: self.kind.api(),
            name: name.to_string(),
            parent: self.parent.clone(),
            labels: self.labels.clone().into_iter().collect(),
            created_at: self.created,
            updated_at: self.updated,
        }
    }
}

fn encode(key: &str, r: &Record) -> Result<Vec<u8>> {
    serde_json::to_vec(r).map_err(|e| Error::BadRecord {
        key: key.to_string(),
        why: e.to_string(),
    })
}

fn decode(key: &str, bytes: &[u8]) -> Result<Record> {
    serde_json::from_slice(bytes).map_err(|e| Error::BadRecord {
        key: key.to_string(),
        why: e.to_string(),
    })
}

/// The snapshotter's crash points, armed by `VERLAY_SNAPSHOTTER_CRASH_AT=STEP[:N]` (see
/// [`verlay::failpoint`]): the crash tests' way to stop exactly between two steps (a kill -9
/// keeps the page cache, so this models a process crash, not a power cut).
static FAILPOINTS: Failpoints = Failpoints::new("VERLAY_SNAPSHOTTER_CRASH_AT");

/// The snapshotter's state over one root directory.
pub struct Snapshots {
    root: PathBuf,
    db: Database,
    /// keys being committed: Commit seals outside any transaction, so a second Commit or a
    /// Remove of the same key must be refused meanwhile
    busy: Mutex<HashSet<String>>,
    /// where remote Prepares record eStargz layers (`ROOT/store`, canonical), opened (and
    /// locked) per operation: the verlay mounts of those layers seal them in the same store
    store_dir: PathBuf,
    /// how remote Prepares and the mounts of their layers reach registries
    registry: verlay::registry::client::Options,
    /// holds the root's flock for the life of the process
    _lock: File,
}

/// Marks a key busy until dropped.
struct BusyGuard<'a> {
    set: &'a Mutex<HashSet<String>>,
    key: String,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut s) = self.set.lock() {
            s.remove(&self.key);
        }
    }
}

impl Snapshots {
    /// Open (or create) the root: take its lock, open the database, remove crash leftovers.
    pub fn open(root: &Path) -> Result<Snapshots> {
        std::fs::create_dir_all(root.join("snapshots"))
            .map_err(|e| Error::io("open.mkdir", root.join("snapshots"), e))?;
        let root = root
            .canonicalize()
            .map_err(|e| Error::io("open.canonicalize", root, e))?;
        // Mount options name snapshot paths unescaped (containerd and mount.fuse3 pass them on
        // as they are), so the resolved root must not contain the list separators.
        let text = root.to_string_lossy();
        if text.contains(',') || text.contains(':') {
            return Err(Error::usage(
                format!("--root {text:?}"),
                "contains ',' or ':', which would split the lowerdir= list of a mount",
                "choose a root path without them",
            ));
        }
        let lock_path = root.join("lock");
        let lock = File::create(&lock_path).map_err(|e| Error::io("open.lock", &lock_path, e))?;
        if let Err(e) = rustix::fs::flock(&lock, FlockOperation::NonBlockingLockExclusive) {
            return Err(Error::usage(
                format!("--root {}", root.display()),
                format!("in use by another verlay snapshotter ({e})"),
                "stop the other snapshotter, or use another root",
            ));
        }
        let db_path = root.join("metadata.redb");
        let db = Database::create(&db_path).map_err(|e| Error::db("open", e))?;
        let tx = db.begin_write().map_err(|e| Error::db("open", e))?;
        {
            let mut meta = tx.open_table(META).map_err(|e| Error::db("open", e))?;
            let version = meta
                .get("version")
                .map_err(|e| Error::db("open", e))?
                .map(|v| v.value());
            match version {
                None => {
                    meta.insert("version", DB_VERSION)
                        .map_err(|e| Error::db("open", e))?;
                }
                Some(v) if v > DB_VERSION => {
                    return Err(Error::usage(
                        db_path.display().to_string(),
                        format!("database format {v}, this snapshotter knows {DB_VERSION}"),
                        "use a newer verlay",
                    ))
                }
                Some(_) => {}
            }
            tx.open_table(SNAPSHOTS).map_err(|e| Error::db("open", e))?;
        }
        tx.commit().map_err(|e| Error::db("open", e))?;
        let store_dir = root.join("store");
        let store_dir = verlay::store::Store::open(&store_dir)
            .map_err(|source| Error::Verlay {
                op: "open.store",
                source,
            })?
            .root()
            .to_path_buf();
        let s = Snapshots {
            root,
            db,
            busy: Mutex::new(HashSet::new()),
            store_dir,
            registry: verlay::registry::client::Options::default(),
            _lock: lock,
        };
        let removed = s.cleanup()? + s.cleanup_store()?;
        info!(root = %s.root.display(), removed, "snapshotter root opened");
        Ok(s)
    }

    fn dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    fn fs(&self, id: u64) -> PathBuf {
        self.dir(id).join("fs")
    }

    fn get(&self, key: &str) -> Result<Option<Record>> {
        let tx = self.db.begin_read().map_err(|e| Error::db("read", e))?;
        let t = tx.open_table(SNAPSHOTS).map_err(|e| Error::db("read", e))?;
        match t.get(key).map_err(|e| Error::db("read", e))? {
            Some(v) => Ok(Some(decode(key, v.value())?)),
            None => Ok(None),
        }
    }

    fn must_get(&self, key: &str) -> Result<Record> {
        self.get(key)?
            .ok_or_else(|| Error::NotFound(format!("snapshot {key} does not exist: not found")))
    }

    fn all(&self) -> Result<Vec<(String, Record)>> {
        let tx = self.db.begin_read().map_err(|e| Error::db("read", e))?;
        let t = tx.open_table(SNAPSHOTS).map_err(|e| Error::db("read", e))?;
        let mut out = Vec::new();
        for row in t.iter().map_err(|e| Error::db("read", e))? {
            let (k, v) = row.map_err(|e| Error::db("read", e))?;
            out.push((k.value().to_string(), decode(k.value(), v.value())?));
        }
        Ok(out)
    }

    /// The fs directories of `parent` and its ancestors, nearest first.
    fn lowers(&self, parent: &str) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        let mut next = parent.to_string();
        while !next.is_empty() {
            // Parents are set at prepare and never change, so a chain cannot loop; a damaged
            // database could, and the walk (and this list) would then never end.
            if !seen.insert(next.clone()) {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {next} is its own ancestor (the database is damaged): failed precondition"
                )));
            }
            let r = self.get(&next)?.ok_or_else(|| {
                Error::NotFound(format!("parent snapshot {next} does not exist: not found"))
            })?;
            out.push(match &r.lower {
                Some(l) => self.sealed_lower(l),
                None => self.fs(r.id),
            });
            next = r.parent;
        }
        Ok(out)
    }

    fn mounts_of(&self, key: &str, r: &Record) -> Result<Vec<Mount>> {
        let lowers = self.lowers(&r.parent)?;
        let join = |ps: &[PathBuf]| {
            ps.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(":")
        };
        let fs = self.fs(r.id);
        let m = match (r.kind, lowers.is_empty()) {
            // No parent: the snapshot is its own directory; containerd writes the base layer
            // straight into it (kernel-speed unpack), and sealing covers it like any other.
            (RecordKind::Active, true) => Mount {
                r#type: "bind".into(),
                source: fs.display().to_string(),
                target: String::new(),
                options: vec!["rbind".into(), "rw".into()],
            },
            (RecordKind::View, true) => Mount {
                r#type: "bind".into(),
                source: fs.display().to_string(),
                target: String::new(),
                options: vec!["rbind".into(), "ro".into()],
            },
            (RecordKind::Active, false) => Mount {
                r#type: MOUNT_TYPE.into(),
                source: "overlay".into(),
                target: String::new(),
                options: vec![
                    format!("workdir={}", self.dir(r.id).join("work").display()),
                    format!("upperdir={}", fs.display()),
                    format!("lowerdir={}", join(&lowers)),
                    VERIFY_OPTION.into(),
                ],
            },
            // A view of committed layers is a read-only verlay mount, even for one layer: a
            // bind mount would serve the layer without checking it against its manifest.
            (RecordKind::View, false) => Mount {
                r#type: MOUNT_TYPE.into(),
                source: "overlay".into(),
                target: String::new(),
                options: vec![
                    format!("lowerdir={}", join(&lowers)),
                    VERIFY_OPTION.into(),
                    "ro".into(),
                ],
            },
            (RecordKind::Committed, _) => {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key} is committed, not active or view: failed precondition"
                )))
            }
        };
        Ok(vec![m])
    }

    /// Prepare (`kind` Active) or View: a new snapshot `key` on top of the committed `parent`.
    pub fn create(
        &self,
        kind_view: bool,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>> {
        if key.is_empty() {
            return Err(Error::InvalidArgument("snapshot key must not be empty".into()));
        }
        let kind = if kind_view {
            RecordKind::View
        } else {
            RecordKind::Active
        };
        let op = if kind_view { "view" } else { "prepare" };
        if !kind_view {
            if let Some((target, layer)) = remote::from_labels(&labels) {
                if self.prepare_remote(key, parent, &target, &layer, &labels)? {
                    return Err(Error::AlreadyExists(format!(
                        "target snapshot {target:?}: already exists"
                    )));
                }
            }
        }
        let tx = self.db.begin_write().map_err(|e| Error::db(op, e))?;
        let rec = {
            let mut t = tx.open_table(SNAPSHOTS).map_err(|e| Error::db(op, e))?;
            if t.get(key).map_err(|e| Error::db(op, e))?.is_some() {
                return Err(Error::AlreadyExists(format!(
                    "snapshot {key} already exists: already exists"
                )));
            }
            if !parent.is_empty() {
                let p = match t.get(parent).map_err(|e| Error::db(op, e))? {
                    Some(v) => decode(parent, v.value())?,
                    None => {
                        return Err(Error::NotFound(format!(
                            "parent snapshot {parent} does not exist: not found"
                        )))
                    }
                };
                if p.kind != RecordKind::Committed {
                    return Err(Error::InvalidArgument(format!(
                        "parent {parent} is not a committed snapshot: invalid argument"
                    )));
                }
            }
            let mut meta = tx.open_table(META).map_err(|e| Error::db(op, e))?;
            let id = meta
                .get("next_id")
                .map_err(|e| Error::db(op, e))?
                .map(|v| v.value())
                .unwrap_or(1);
            meta.insert("next_id", id + 1).map_err(|e| Error::db(op, e))?;
            // step create.mkdir: before the record, so a record always has its directory.
            let dir = self.dir(id);
            if dir.exists() {
                // a leftover of a crash between mkdir and the record, never named by a record
                std::fs::remove_dir_all(&dir).map_err(|e| Error::io("create.remove_stale", &dir, e))?;
            }
            std::fs::create_dir(&dir).map_err(|e| Error::io("create.mkdir", &dir, e))?;
            for sub in ["fs", "work"] {
                std::fs::create_dir(dir.join(sub))
                    .map_err(|e| Error::io("create.mkdir", dir.join(sub), e))?;
            }
            fsync_dir(&self.root.join("snapshots"), "create.fsync_dir")?;
            FAILPOINTS.crash_point("create.mkdir");
            let now = SystemTime::now();
            let rec = Record {
                id,
                kind,
                parent: parent.to_string(),
                labels: labels.into_iter().collect(),
                created: now,
                updated: now,
                usage: None,
                manifest_digest: None,
                lower: None,
            };
            t.insert(key, encode(key, &rec)?.as_slice())
                .map_err(|e| Error::db(op, e))?;
            rec
        };
        // step create.record
        tx.commit().map_err(|e| Error::db(op, e))?;
        info!(op, key, parent, id = rec.id, "snapshot created");
        self.mounts_of(key, &rec)
    }

    /// The mounts of an active snapshot or a view.
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let r = self.must_get(key)?;
        self.mounts_of(key, &r)
    }

    /// Stat: the snapshot's info.
    pub fn stat(&self, key: &str) -> Result<Info> {
        Ok(self.must_get(key)?.info(key))
    }

    /// Update the labels (the only mutable property), whole or per `labels.KEY` field path.
    pub fn update(&self, info: Info, fieldpaths: Option<Vec<String>>) -> Result<Info> {
        let key = info.name.clone();
        let tx = self.db.begin_write().map_err(|e| Error::db("update", e))?;
        let rec = {
            let mut t = tx.open_table(SNAPSHOTS).map_err(|e| Error::db("update", e))?;
            let mut rec = match t.get(key.as_str()).map_err(|e| Error::db("update", e))? {
                Some(v) => decode(&key, v.value())?,
                None => {
                    return Err(Error::NotFound(format!(
                        "snapshot {key} does not exist: not found"
                    )))
                }
            };
            let new: BTreeMap<String, String> = info.labels.into_iter().collect();
            match fieldpaths.filter(|f| !f.is_empty()) {
                None => rec.labels = new,
                Some(paths) => {
                    for p in paths {
                        if p == "labels" {
                            rec.labels = new.clone();
                        } else if let Some(k) = p.strip_prefix("labels.") {
                            match new.get(k) {
                                Some(v) => rec.labels.insert(k.to_string(), v.clone()),
                                None => rec.labels.remove(k),
                            };
                        } else {
                            return Err(Error::InvalidArgument(format!(
                                "cannot update {p:?} field on snapshot {key}: invalid argument"
                            )));
                        }
                    }
                }
            }
            rec.updated = SystemTime::now();
            t.insert(key.as_str(), encode(&key, &rec)?.as_slice())
                .map_err(|e| Error::db("update", e))?;
            rec
        };
        tx.commit().map_err(|e| Error::db("update", e))?;
        Ok(rec.info(&key))
    }

    /// Usage of the snapshot's own tree (parents excluded): measured now for an active
    /// snapshot, as recorded at commit for a committed one.
    pub fn usage(&self, key: &str) -> Result<Usage> {
        let r = self.must_get(key)?;
        let (size, inodes) = match r.usage {
            Some(u) => u,
            None => disk_usage(&self.fs(r.id))?,
        };
        Ok(Usage { size, inodes })
    }

    /// Commit the active snapshot `key` as `name`: ordered ingest (module doc).
    pub fn commit(&self, name: &str, key: &str, labels: HashMap<String, String>) -> Result<()> {
        if name.is_empty() {
            return Err(Error::InvalidArgument("commit name must not be empty".into()));
        }
        let _busy = self.mark_busy(key)?;
        let r = self.must_get(key)?;
        if r.kind != RecordKind::Active {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key} is a {}, not active: failed precondition",
                r.kind.name()
            )));
        }
        if self.get(name)?.is_some() {
            return Err(Error::AlreadyExists(format!(
                "snapshot {name} already exists: already exists"
            )));
        }
        let started = Instant::now();
        let fs = self.fs(r.id);
        // step commit.wait_upper: containerd has unmounted the snapshot, but the verlay
        // daemon may still be finishing; it holds the upper's flock until it exits, and we
        // keep ours until the record is written, so no new mount can change the tree.
        let upper = File::open(&fs).map_err(|e| Error::io("commit.open_upper", &fs, e))?;
        wait_flock(&upper, &fs)?;
        // step commit.syncfs: every file and directory of the upper written back, and any
        // writeback error since it was written reported (Linux >= 5.8 reports them through
        // the superblock), as the layer store's import does.
        rustix::fs::syncfs(&upper).map_err(|e| Error::io("commit.syncfs", &fs, e.into()))?;
        FAILPOINTS.crash_point("commit.syncfs");
        let (size, inodes) = disk_usage(&fs)?;
        // step commit.seal: the manifest, written and fsynced beside fs.
        let digest = verlay::lower::manifest::seal(&fs).map_err(|source| Error::Verlay {
            op: "commit.seal",
            source,
        })?;
        FAILPOINTS.crash_point("commit.seal");
        // step commit.record: the digest where every verlay mount of the layer checks it.
        // The file and field name are the layer store's (`store/mod.rs`), which
        // `lower::verify` reads at every mount of the layer.
        let dir = self.dir(r.id);
        let record = serde_json::to_vec_pretty(&serde_json::json!({
            "version": 1,
            "snapshot": name,
            "manifest_digest": digest,
        }))
        .map_err(|e| Error::BadRecord {
            key: name.to_string(),
            why: e.to_string(),
        })?;
        write_durably(&dir.join("layer.json"), &record)?;
        FAILPOINTS.crash_point("commit.record");
        // step commit.db: one transaction swaps the active record for the committed one.
        let tx = self.db.begin_write().map_err(|e| Error::db("commit", e))?;
        {
            let mut t = tx.open_table(SNAPSHOTS).map_err(|e| Error::db("commit", e))?;
            if t.get(name).map_err(|e| Error::db("commit", e))?.is_some() {
                return Err(Error::AlreadyExists(format!(
                    "snapshot {name} already exists: already exists"
                )));
            }
            if t.remove(key).map_err(|e| Error::db("commit", e))?.is_none() {
                return Err(Error::NotFound(format!(
                    "snapshot {key} does not exist: not found"
                )));
            }
            let mut merged: BTreeMap<String, String> = r
                .labels
                .iter()
                .filter(|(k, _)| k.starts_with(INHERITED_LABEL_PREFIX))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            merged.extend(labels);
            let now = SystemTime::now();
            let rec = Record {
                id: r.id,
                kind: RecordKind::Committed,
                parent: r.parent.clone(),
                labels: merged,
                created: now,
                updated: now,
                usage: Some((size, inodes)),
                manifest_digest: Some(digest.clone()),
                lower: None,
            };
            t.insert(name, encode(name, &rec)?.as_slice())
                .map_err(|e| Error::db("commit", e))?;
        }
        tx.commit().map_err(|e| Error::db("commit", e))?;
        FAILPOINTS.crash_point("commit.db");
        drop(upper);
        // The workdir only ever holds temps of a mount; a committed layer has no mount.
        let work = dir.join("work");
        if let Err(e) = std::fs::remove_dir_all(&work) {
            warn!(path = %work.display(), error = %e, "could not remove the workdir of a committed snapshot");
        }
        info!(key, name, id = r.id, digest = %digest, bytes = size, inodes,
              ms = started.elapsed().as_millis() as u64, "snapshot committed and sealed");
        Ok(())
    }

    fn mark_busy(&self, key: &str) -> Result<BusyGuard<'_>> {
        let mut s = self
            .busy
            .lock()
            .map_err(|_| Error::FailedPrecondition("snapshotter state poisoned".into()))?;
        if !s.insert(key.to_string()) {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key} is being committed: failed precondition"
            )));
        }
        Ok(BusyGuard {
            set: &self.busy,
            key: key.to_string(),
        })
    }

    /// Remove a snapshot; one that is the parent of another cannot be removed.
    pub fn remove(&self, key: &str) -> Result<()> {
        let _busy = self.mark_busy(key)?;
        let tx = self.db.begin_write().map_err(|e| Error::db("remove", e))?;
        let (id, lower) = {
            let mut t = tx.open_table(SNAPSHOTS).map_err(|e| Error::db("remove", e))?;
            let r = match t.get(key).map_err(|e| Error::db("remove", e))? {
                Some(v) => decode(key, v.value())?,
                None => {
                    return Err(Error::NotFound(format!(
                        "snapshot {key} does not exist: not found"
                    )))
                }
            };
            // A scan: parents are few and removals rare; an index would be one more thing
            // to keep consistent across crashes.
            for row in t.iter().map_err(|e| Error::db("remove", e))? {
                let (k, v) = row.map_err(|e| Error::db("remove", e))?;
                if decode(k.value(), v.value())?.parent == key {
                    return Err(Error::FailedPrecondition(format!(
                        "cannot remove snapshot {key} with child {}: failed precondition",
                        k.value()
                    )));
                }
            }
            t.remove(key).map_err(|e| Error::db("remove", e))?;
            (r.id, r.lower)
        };
        tx.commit().map_err(|e| Error::db("remove", e))?;
        FAILPOINTS.crash_point("remove.db");
        if let Some(lower) = lower {
            // a remote snapshot: its layer is in the store, and has no snapshots/<id>
            self.remove_store_layer_if_unused(&lower);
            info!(key, id, "remote snapshot removed");
            return Ok(());
        }
        // One rename takes the snapshot out of sight before its files go one by one: nobody
        // (a scrub, a debugging user) sees a half-removed layer under its id, and a crash
        // leaves a name Cleanup removes (not a number, so no record can name it).
        let dir = self.dir(id);
        let doomed = self.root.join("snapshots").join(format!("{id}.removing"));
        let gone = std::fs::rename(&dir, &doomed).and_then(|()| std::fs::remove_dir_all(&doomed));
        if let Err(e) = gone {
            // The record is gone; Cleanup removes what is left.
            warn!(key, path = %dir.display(), error = %e, "could not remove a snapshot directory; Cleanup will");
        }
        info!(key, id, "snapshot removed");
        Ok(())
    }

    /// Every snapshot that the filters select.
    pub fn list(&self, filters: &[String]) -> Result<Vec<Info>> {
        let f = Filters::parse(filters)?;
        Ok(self
            .all()?
            .into_iter()
            .filter(|(k, r)| {
                f.matches(&Subject {
                    name: k,
                    parent: &r.parent,
                    kind: r.kind.name(),
                    labels: &r.labels,
                })
            })
            .map(|(k, r)| r.info(&k))
            .collect())
    }

    /// Remove snapshot directories that no record names (leftovers of crashes, or of a
    /// Remove whose directory removal failed). Returns how many were removed.
    pub fn cleanup(&self) -> Result<usize> {
        // The write transaction excludes a concurrent Prepare between its mkdir and its
        // record (redb allows one writer at a time).
        let tx = self.db.begin_write().map_err(|e| Error::db("cleanup", e))?;
        let ids: HashSet<u64> = {
            let t = tx.open_table(SNAPSHOTS).map_err(|e| Error::db("cleanup", e))?;
            let mut ids = HashSet::new();
            for row in t.iter().map_err(|e| Error::db("cleanup", e))? {
                let (k, v) = row.map_err(|e| Error::db("cleanup", e))?;
                ids.insert(decode(k.value(), v.value())?.id);
            }
            ids
        };
        let base = self.root.join("snapshots");
        let mut removed = 0;
        for ent in std::fs::read_dir(&base).map_err(|e| Error::io("cleanup.readdir", &base, e))? {
            let ent = ent.map_err(|e| Error::io("cleanup.readdir", &base, e))?;
            let name = ent.file_name();
            let known = name
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|id| ids.contains(&id));
            if known {
                continue;
            }
            let p = ent.path();
            warn!(path = %p.display(), "removing a snapshot directory no record names (leftover of a crash)");
            let r = if ent.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            r.map_err(|e| Error::io("cleanup.remove", &p, e))?;
            removed += 1;
        }
        tx.abort().map_err(|e| Error::db("cleanup", e))?;
        Ok(removed)
    }
}

impl Snapshots {
    /// How remote Prepares (and the lazy mounts they lead to) reach registries.
    pub fn set_registry_options(&mut self, opts: verlay::registry::client::Options) {
        self.registry = opts;
    }

    /// The remote path of Prepare ([`crate::remote`]): true when the layer was recorded
    /// lazily and the committed snapshot `target` exists (Prepare then answers
    /// AlreadyExists); false for the ordinary path. A layer that is not eStargz, or a
    /// registry that fails, is logged and takes the ordinary path (containerd downloads it).
    fn prepare_remote(
        &self,
        key: &str,
        parent: &str,
        target: &str,
        layer: &verlay::estargz::pull::RemoteLayer,
        labels: &HashMap<String, String>,
    ) -> Result<bool> {
        // what the ordinary path refuses (key taken, parent missing or not committed), it
        // refuses with the right status code
        if self.get(key)?.is_some() {
            return Ok(false);
        }
        if !parent.is_empty() && self.get(parent)?.is_none_or(|p| p.kind != RecordKind::Committed) {
            return Ok(false);
        }
        if let Some(t) = self.get(target)? {
            return Ok(t.kind == RecordKind::Committed && t.parent == parent);
        }
        let started = Instant::now();
        let store = match self.store("prepare.remote") {
            Ok(st) => st,
            Err(e) => {
                warn!(key, target, error = %e, "cannot open the store: unpacking the layer the ordinary way");
                return Ok(false);
            }
        };
        let rec = match verlay::estargz::pull::record_remote_layer(&store, layer, target, &self.registry) {
            Ok(Some(r)) => r,
            Ok(None) => {
                info!(key, target, blob = %layer.blob_digest, "not an eStargz layer (no TOC digest): unpacking it the ordinary way");
                return Ok(false);
            }
            Err(e) => {
                warn!(key, target, blob = %layer.blob_digest, error = %e, "cannot record the layer lazily: unpacking it the ordinary way");
                return Ok(false);
            }
        };
        // step remote.import: the layer is in the store, no record names it yet
        FAILPOINTS.crash_point("remote.import");
        let lower = store.diff_dir(&rec.chain_id);
        let (size, inodes) = disk_usage(&lower)?;
        let manifest_digest = store
            .record(&rec.chain_id)
            .ok()
            .and_then(|v| v["manifest_digest"].as_str().map(str::to_owned));
        let tx = self
            .db
            .begin_write()
            .map_err(|e| Error::db("prepare.remote", e))?;
        {
            let mut t = tx
                .open_table(SNAPSHOTS)
                .map_err(|e| Error::db("prepare.remote", e))?;
            if let Some(v) = t.get(target).map_err(|e| Error::db("prepare.remote", e))? {
                // a concurrent Prepare of the same layer won
                let other = decode(target, v.value())?;
                return Ok(other.kind == RecordKind::Committed && other.parent == parent);
            }
            let mut meta = tx.open_table(META).map_err(|e| Error::db("prepare.remote", e))?;
            let id = meta
                .get("next_id")
                .map_err(|e| Error::db("prepare.remote", e))?
                .map(|v| v.value())
                .unwrap_or(1);
            meta.insert("next_id", id + 1)
                .map_err(|e| Error::db("prepare.remote", e))?;
            let mut all: BTreeMap<String, String> = labels.clone().into_iter().collect();
            all.insert(remote::REMOTE_LABEL.into(), remote::REMOTE_LABEL_VALUE.into());
            let now = SystemTime::now();
            let r = Record {
                id,
                kind: RecordKind::Committed,
                parent: parent.to_string(),
                labels: all,
                created: now,
                updated: now,
                usage: Some((size, inodes)),
                manifest_digest,
                lower: Some(lower.clone()),
            };
            t.insert(target, encode(target, &r)?.as_slice())
                .map_err(|e| Error::db("prepare.remote", e))?;
        }
        tx.commit().map_err(|e| Error::db("prepare.remote", e))?;
        FAILPOINTS.crash_point("remote.db");
        info!(key, target, parent, layer = %rec.chain_id, toc = %rec.toc_digest,
              bytes_fetched = rec.bytes_fetched, ms = started.elapsed().as_millis() as u64,
              "remote snapshot: eStargz layer recorded lazily, committed without download");
        Ok(true)
    }

    /// The store, locked, waiting for its lock at most [`STORE_WAIT`] (a mount may be
    /// sealing a layer into it).
    fn store(&self, op: &'static str) -> Result<verlay::store::Store> {
        match verlay::store::Store::open_within(&self.store_dir, STORE_WAIT) {
            Ok(Some(st)) => Ok(st),
            Ok(None) => Err(Error::FailedPrecondition(format!(
                "the store {} stayed locked for {} s (a verlay mount sealing a layer into it?): failed precondition",
                self.store_dir.display(),
                STORE_WAIT.as_secs()
            ))),
            Err(source) => Err(Error::Verlay { op, source }),
        }
    }

    /// The directory to mount for the remote snapshot layer `lower`: the ordinary layer it
    /// was sealed as (verlay's mounts seal a lazy layer once its blob is whole and verified),
    /// or itself.
    fn sealed_lower(&self, lower: &Path) -> PathBuf {
        let sealed = lower
            .parent()
            .and_then(|d| std::fs::read(d.join("layer.json")).ok())
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|r| r["sealed"].as_str().map(str::to_owned));
        match sealed {
            Some(c) => {
                let d = verlay::store::diff_dir_at(&self.store_dir, &c);
                // published whole by one rename: its layer.json says it is there
                if d.with_file_name("layer.json").is_file() {
                    d
                } else {
                    lower.to_path_buf()
                }
            }
            None => lower.to_path_buf(),
        }
    }

    /// The store layers that records name (remote snapshots' `lower`), and the ordinary
    /// layers those were sealed as.
    fn store_layers_in_use(&self) -> Result<HashSet<PathBuf>> {
        let mut out = HashSet::new();
        for l in self.all()?.into_iter().filter_map(|(_, r)| r.lower) {
            out.insert(self.sealed_lower(&l));
            out.insert(l);
        }
        Ok(out)
    }

    /// Remove the store layer of a removed remote snapshot, unless another record names it
    /// (the same layer in another namespace). Failures are logged: the next open removes
    /// what no record names.
    fn remove_store_layer_if_unused(&self, lower: &Path) {
        let _locked = match self.store("remove.store_layer") {
            Ok(st) => st,
            Err(e) => {
                warn!(path = %lower.display(), error = %e, "cannot lock the store to remove a layer; the next open will");
                return;
            }
        };
        let used = match self.store_layers_in_use() {
            Ok(used) => used,
            Err(e) => {
                warn!(path = %lower.display(), error = %e, "cannot tell whether a store layer is still used; leaving it");
                return;
            }
        };
        // the lazy layer, then the ordinary layer it was sealed as, and that one's blob
        let sealed = self.sealed_lower(lower);
        let mut doomed = vec![(lower.to_path_buf(), None)];
        if sealed != lower {
            let blob = sealed.parent().and_then(|d| self.store_blob_of(d));
            doomed.push((sealed, blob));
        }
        for (l, blob) in doomed {
            let Some(dir) = l.parent().filter(|_| !used.contains(&l)) else {
                continue;
            };
            if let Err(e) = self.remove_store_dir(dir) {
                warn!(path = %dir.display(), error = %e, "could not remove a store layer; the next open will");
                continue;
            }
            if let Some(b) = blob {
                if let Err(e) = std::fs::remove_file(&b) {
                    warn!(path = %b.display(), error = %e, "could not remove the blob of a sealed store layer");
                }
            }
        }
    }

    /// The kept blob (`store/blobs/`) of the ordinary store layer `dir`, from its record.
    fn store_blob_of(&self, dir: &Path) -> Option<PathBuf> {
        let b = std::fs::read(dir.join("layer.json")).ok()?;
        let r: serde_json::Value = serde_json::from_slice(&b).ok()?;
        let d = r["blob_digest"].as_str()?.strip_prefix("sha256:")?;
        Some(self.store_dir.join("blobs/sha256").join(d))
    }

    /// One rename out of `store/layers/` into `store/tmp/` (which every store open
    /// empties), then the removal.
    fn remove_store_dir(&self, dir: &Path) -> Result<()> {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let doomed = self.store_dir.join("tmp").join(format!("removing-{name}"));
        std::fs::rename(dir, &doomed).map_err(|e| Error::io("remove.store_layer", dir, e))?;
        std::fs::remove_dir_all(&doomed).map_err(|e| Error::io("remove.store_layer", &doomed, e))
    }

    /// At open: remove store layers no record names (a crash between a remote Prepare's
    /// store import and its record). Returns how many were removed.
    fn cleanup_store(&self) -> Result<usize> {
        let store = self.store("open.store")?;
        let used = self.store_layers_in_use()?;
        let chains = store.chain_ids().map_err(|source| Error::Verlay {
            op: "open.store_list",
            source,
        })?;
        let mut removed = 0;
        for c in chains {
            if used.contains(&store.diff_dir(&c)) {
                continue;
            }
            let dir = store.layer_dir(&c);
            warn!(path = %dir.display(), "removing a store layer no record names (leftover of a crash)");
            self.remove_store_dir(&dir)?;
            removed += 1;
        }
        Ok(removed)
    }
}

/// Take an exclusive flock on `f`, waiting (bounded) for a verlay daemon to release it.
fn wait_flock(f: &File, path: &Path) -> Result<()> {
    let deadline = Instant::now() + UPPER_RELEASE_TIMEOUT;
    loop {
        match rustix::fs::flock(f, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(()),
            Err(rustix::io::Errno::WOULDBLOCK) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(Error::FailedPrecondition(format!(
                    "upper {} is still mounted {} s after the commit began (unmount it first): failed precondition",
                    path.display(),
                    UPPER_RELEASE_TIMEOUT.as_secs()
                )))
            }
            Err(e) => return Err(Error::io("commit.flock", path, e.into())),
        }
    }
}

fn fsync_dir(dir: &Path, op: &'static str) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(op, dir, e))
}

/// Write `path` so that a crash leaves the old file or the new one: temp, fsync, rename,
/// fsync the directory.
fn write_durably(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()
    ));
    let mut f = File::create(&tmp).map_err(|e| Error::io("commit.record", &tmp, e))?;
    f.write_all(bytes)
        .map_err(|e| Error::io("commit.record", &tmp, e))?;
    f.sync_all()
        .map_err(|e| Error::io("commit.record_fsync", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io("commit.record_rename", path, e))?;
    fsync_dir(dir, "commit.record_fsync_dir")
}

/// Bytes (allocated blocks, as containerd's `fs.DiskUsage`) and inodes of a tree, each
/// inode counted once, not crossing into other filesystems.
fn disk_usage(root: &Path) -> Result<(i64, i64)> {
    let top = std::fs::symlink_metadata(root).map_err(|e| Error::io("usage.lstat", root, e))?;
    let mut seen = HashSet::new();
    let mut size = 0i64;
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).map_err(|e| Error::io("usage.lstat", &p, e))?;
        let first = seen.insert((m.dev(), m.ino()));
        if first {
            size += (m.blocks() as i64) * 512;
        }
        // A directory seen before is a bind mount of the tree inside itself: its walk
        // would never end.
        if first && m.is_dir() && m.dev() == top.dev() {
            for ent in std::fs::read_dir(&p).map_err(|e| Error::io("usage.readdir", &p, e))? {
                stack.push(ent.map_err(|e| Error::io("usage.readdir", &p, e))?.path());
            }
        }
    }
    Ok((size, seen.len() as i64))
}
