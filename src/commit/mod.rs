//! `verlay commit`: the upper of a live mount becomes a new layer of the store.
//!
//! Owns: finding the mount's daemon ([`crate::control`]), the point-in-time snapshot of the
//! upper taken while the daemon holds its commit gate (`snapshot`), the staging dir in the
//! store (`stage`), the translation of the kernel overlayfs upper into layer entries
//! (`translate`), and the OCI layer tarball (`tar`) handed to [`Store::import_layer`],
//! which publishes the layer crash-safely. Parsing and printing of `verlay commit` live in
//! [`crate::cmd::commit`].
//!
//! Sequence (docs/ordering.md, "commit"; each step is a crash point):
//! 1. checks: MOUNTPOINT is the root of a verlay mount with an upper, the store exists and is
//!    not inside the mount, the parent layer is in the store. Nothing is changed before
//!    they pass.
//! 2. the store is opened (its lock held to the end; leftovers of earlier runs removed) and
//!    a staging dir `STORE/tmp/commit-PID-NANOS` is made, on the store's filesystem.
//!    Then, still outside the freeze, a syncfs of the mount (shared-mmap writes reach the
//!    daemon) and of the upper's filesystem (the copy below is not throttled behind its
//!    dirty pages).
//! 3. `commit.freeze`: the daemon holds the gate exclusive: no change to the upper runs.
//! 4. `commit.snapshot`: the upper's tree (names, types, modes, owners, times, xattrs,
//!    symlink targets, device numbers, hard links) is read into memory and every regular
//!    file's data is copied into the staging dir, once per inode: a FICLONE reflink into
//!    `data/N` when the filesystem can, else copy_file_range (holes kept) into one file,
//!    `data/packed`, at a block-aligned offset (one create for all: the freeze is shorter).
//! 5. `commit.thaw`: the daemon releases the gate; writers go on. Everything after this
//!    reads only the staging copy and the lower layers, which never change.
//! 6. `commit.materialize` (only when a directory carries `overlay.redirect`): the snapshot
//!    is laid out as a real upper tree in `staging/upper`, so the merged view of renamed
//!    directories can be read with the union code itself.
//! 7. the tar is written into a pipe read by the store's import (`import.unpack` ...
//!    `import.publish`), and into the `--output` file if asked.
//! 8. `commit.output`: the tarball is published at `--output` (temp, fsync, rename).
//! 9. `commit.cleanup`: the staging dir is removed.
//!
//! Must not: write to the mount, the upper or the lowers; hold the gate for anything but
//! step 4; read a live upper file after step 5.

mod snapshot;
mod stage;
mod tar;
mod translate;

use std::path::PathBuf;

use tracing::info;

use crate::error::{Error, Result};
use crate::failpoint::crash_point;
use crate::layer::LayerDir;
use crate::progress::Progress;
use crate::store::{ImportOptions, Store};

/// What to commit, and where.
#[derive(Debug, Clone)]
pub struct CommitArgs {
    /// the mount to commit
    pub mountpoint: PathBuf,
    /// the layer store
    pub store: PathBuf,
    /// chain ID (or unique prefix) of the layer below
    pub parent: Option<String>,
    /// also write the layer tarball here
    pub output: Option<PathBuf>,
}

/// What a commit produced.
#[derive(Debug, Clone)]
pub struct Committed {
    /// chain ID of the new (or already present) layer
    pub chain_id: String,
    /// sha256 of the uncompressed tar stream
    pub diff_id: String,
    /// how long the daemon held writers, as it measured
    pub paused_us: u64,
    /// entries of the upper snapshot
    pub entries: u64,
    /// bytes of file data copied into the staging dir
    pub bytes: u64,
}

/// Commit the upper of the mount at `a.mountpoint` into the store (the steps of the module
/// doc).
pub fn commit(a: &CommitArgs, progress: &Progress) -> Result<Committed> {
    // 1. checks, before anything changes.
    let (daemon, mount) = snapshot::connect(&a.mountpoint)?;
    stage::check_store(&a.store, mount.dev)?;
    if let Some(o) = &a.output {
        tar::Output::check(o)?;
    }
    let own: &'static str = if mount.xattr_prefix == "user.overlay." {
        "user.overlay."
    } else {
        "trusted.overlay."
    };
    check_parent_store(a)?;
    // 2. the store, the staging dir on its filesystem, and a sync outside the freeze.
    let store = Store::open(&a.store)?;
    let parent = a.parent.as_deref().map(|p| store.resolve(p)).transpose()?;
    let (staging, data) = stage::Staging::create(&store)?;
    let upper = LayerDir::open(&mount.upper, 0, "upper".into())?;
    snapshot::sync_before_freeze(&a.mountpoint, &upper)?;
    // 3-5. freeze, snapshot, thaw.
    let snapshot::Taken {
        root,
        entries,
        bytes,
        redirects,
        paused_us,
    } = snapshot::take(daemon, &upper, &data, &a.mountpoint)?;
    // 6. the merged view (for renamed directories), and the layer's items.
    let (merged, tree_inos) = if redirects {
        let (u, inos) = staging.merged_view(&data, &root, &mount.lowers)?;
        crash_point("commit.materialize");
        (Some(u), inos)
    } else {
        (None, Default::default())
    };
    let items = translate::items(own, merged.as_ref(), tree_inos, &root)?;
    drop(root);
    // 7. the tarball, into the import (and the output file).
    let mut output = a.output.as_deref().map(tar::Output::create).transpose()?;
    let opts = ImportOptions {
        parent,
        diff_id: None,
        blob_digest: None,
        source: format!("commit of {}", a.mountpoint.display()),
        fsync_each: false,
    };
    let (imported, diff_id, tar_bytes) = tar::import(
        &store,
        &opts,
        &items,
        &data,
        merged.as_ref(),
        output.as_mut(),
        progress,
    )?;
    check_recorded(&store, &imported.chain_id, &diff_id)?;
    // 8. the output tarball.
    if let Some(o) = output.take() {
        o.publish()?;
        crash_point("commit.output");
    }
    // 9. cleanup.
    drop(merged);
    drop(staging);
    crash_point("commit.cleanup");
    info!(
        layer = %imported.chain_id,
        diff_id = %diff_id,
        bytes = tar_bytes,
        new = imported.new,
        paused_us,
        "committed the upper into a layer"
    );
    Ok(Committed {
        chain_id: imported.chain_id,
        diff_id,
        paused_us,
        entries,
        bytes,
    })
}

/// No layer can be in a directory that is not a store yet: a `--parent` there is refused
/// before the store is opened, which would make it one.
fn check_parent_store(a: &CommitArgs) -> Result<()> {
    match &a.parent {
        Some(p) if !crate::store::is_store(&a.store) => Err(Error::usage(
            format!("--parent \"{p}\""),
            format!("not in the store {} (it holds no layers)", a.store.display()),
            "commit the parent layer first, or fix --store",
        )),
        _ => Ok(()),
    }
}

/// The store recorded the diffID the tarball hashes to (it hashed the stream it read).
fn check_recorded(store: &Store, chain_id: &str, diff_id: &str) -> Result<()> {
    let recorded = store
        .record(chain_id)?
        .get("diff_id")
        .and_then(serde_json::Value::as_str)
        .map(str::to_owned);
    if recorded.as_deref() == Some(diff_id) {
        return Ok(());
    }
    Err(Error::io(
        "commit.import",
        store.diff_dir(chain_id),
        std::io::Error::other(format!(
            "the store recorded diffID {recorded:?}, the tarball hashes to {diff_id}"
        )),
    ))
}
