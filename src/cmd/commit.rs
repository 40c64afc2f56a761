//! `verlay commit MOUNTPOINT --store DIR [--parent CHAIN_ID] [--output layer.tar]`: the
//! arguments into [`CommitArgs`], and the result printed (the chain ID and the diffID on
//! stdout, the pause on stderr). The commit itself is [`crate::commit::commit`].
use std::path::PathBuf;

use clap::Args;

use super::{progress, store_dir, Global};
use crate::commit::{commit, CommitArgs};
use crate::error::Result;
use crate::store::Store;

#[derive(Debug, Args)]
pub struct CommitCmd {
    /// the mountpoint of a live verlay mount with an upper
    #[arg(value_name = "MOUNTPOINT")]
    mountpoint: PathBuf,
    /// chain ID of the store layer the mount's lowers are (the new layer goes on it)
    #[arg(long, value_name = "CHAIN_ID")]
    parent: Option<String>,
    /// also write the layer tarball here
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,
}

/// `verlay commit ...`: commit, then print the chain ID and the diffID.
pub fn run(g: &Global, c: CommitCmd) -> Result<()> {
    let a = CommitArgs {
        mountpoint: c.mountpoint,
        store: store_dir(g, "verlay commit")?,
        parent: c.parent,
        output: c.output,
    };
    create_missing_store(&a)?;
    let progress = progress(g);
    let got = commit(&a, &progress)?;
    if !g.quiet {
        eprintln!(
            "verlay commit: writers paused for {:.3} ms ({} entries, {} bytes of file data copied)",
            got.paused_us as f64 / 1000.0,
            got.entries,
            got.bytes
        );
    }
    println!("chain_id {}", got.chain_id);
    println!("diff_id {}", got.diff_id);
    Ok(())
}

/// The store rule of every writing command: a missing store is created on first use. Only
/// when its parent exists and is outside the mount (a store inside the mount is refused by
/// the commit's own check, and nothing is created there); the commit then finds an empty
/// store, as after `verlay layer import` into a new one.
fn create_missing_store(a: &CommitArgs) -> Result<()> {
    if a.store.exists() {
        return Ok(());
    }
    let parent = match a.store.parent() {
        Some(p) if p.as_os_str().is_empty() => std::path::Path::new("."),
        Some(p) => p,
        None => return Ok(()),
    };
    let (Ok(pst), Ok(mst)) = (rustix::fs::stat(parent), rustix::fs::stat(&a.mountpoint)) else {
        // the commit's checks name what is missing
        return Ok(());
    };
    if pst.st_dev == mst.st_dev {
        return Ok(());
    }
    // Opening creates it; the lock is released at once (the commit takes it again).
    drop(Store::open(&a.store)?);
    Ok(())
}
