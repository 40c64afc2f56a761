//! `verlay layer import|path|ls|seal`: arguments and output. The work is
//! [`crate::store::Store`]'s and [`crate::lower::manifest`]'s.
use std::path::PathBuf;

use clap::Subcommand;
use serde_json::json;

use super::{existing_store, print_json, store_for_writing, Format, Global};
use crate::error::{Error, Result};
use crate::lower::manifest;
use crate::progress::human;
use crate::store::ImportOptions;

#[derive(Debug, Subcommand)]
pub enum LayerCmd {
    /// Import a layer tarball (tar, tar.gz, tar.zst) into the store; prints its chain ID
    #[command(
        long_about = "Import a layer tarball (tar, gzip or zstd) into the store, crash-safely: the \
                      layer is unpacked, sealed with a manifest and published by one rename. \
                      Prints the layer's chain ID. A missing store is created.",
        after_help = "Example:\n    verlay layer import --store /var/lib/verlay base.tar.gz\n    \
                      verlay layer import --store /var/lib/verlay --parent sha256:4f2a... app.tar"
    )]
    Import {
        /// chain ID of the layer below this one
        #[arg(long, value_name = "CHAIN_ID")]
        parent: Option<String>,
        /// the diffID the uncompressed tarball must hash to (checked)
        #[arg(long, value_name = "sha256:HEX")]
        diff_id: Option<String>,
        /// fsync each file as it is written (slower; for measurements)
        #[arg(long)]
        fsync_each: bool,
        /// the layer tarball
        file: PathBuf,
    },
    /// Print the directory of a layer, to pass in lowerdir=
    #[command(after_help = "Example:\n    verlay layer path --store /var/lib/verlay sha256:4f2a")]
    Path {
        /// the layer's chain ID (a unique prefix is enough)
        chain_id: String,
    },
    /// List the layers of the store (--format json for scripts)
    #[command(after_help = "Examples:\n    verlay layer ls --store /var/lib/verlay\n    \
                            verlay layer ls --store /var/lib/verlay --format json")]
    Ls {
        /// print whole IDs
        #[arg(long)]
        no_trunc: bool,
    },
    /// Write a manifest of digests beside a layer directory (DIR.verlay-manifest)
    #[command(
        long_about = "Hash every file of a layer directory and write its manifest beside it \
                      (DIR.verlay-manifest); a mount with verify=on then checks each file on first \
                      read. Prints the manifest's digest and path.",
        after_help = "Example:\n    verlay layer seal /layers/base"
    )]
    Seal {
        /// bytes per hashed chunk, a power of two from 4096 to 1048576 (default 4096; 65536
        /// writes the first manifest format, as older verlay did)
        #[arg(long, value_name = "BYTES")]
        chunk_size: Option<u64>,
        /// the layer directory
        dir: PathBuf,
    },
}

/// Run one `verlay layer` subcommand.
pub fn run(g: &Global, c: LayerCmd) -> Result<()> {
    match c {
        LayerCmd::Import {
            parent,
            diff_id,
            fsync_each,
            file,
        } => {
            let store = store_for_writing(g, "verlay layer import")?;
            let mut f = std::fs::File::open(&file).map_err(|e| {
                Error::usage(
                    format!("layer tarball \"{}\"", file.display()),
                    e.to_string(),
                    "give the path of a tar, tar.gz or tar.zst layer",
                )
            })?;
            let opts = ImportOptions {
                parent,
                diff_id,
                blob_digest: None,
                source: file.display().to_string(),
                fsync_each,
            };
            let progress = super::progress(g);
            let size = f.metadata().ok().map(|m| m.len());
            let got = store.import_layer(&mut progress.reader(&mut f, "layer", size), &opts)?;
            progress.layer_done();
            progress.finish(&format!("imported {}", file.display()));
            println!("{}", got.chain_id);
            Ok(())
        }
        LayerCmd::Path { chain_id } => {
            let store = existing_store(g, "verlay layer path")?;
            let chain = store.resolve(&chain_id)?;
            println!("{}", store.diff_dir(&chain).display());
            Ok(())
        }
        LayerCmd::Ls { no_trunc } => ls(g, no_trunc),
        LayerCmd::Seal { chunk_size, dir } => seal(chunk_size, &dir),
    }
}

fn ls(g: &Global, full: bool) -> Result<()> {
    let store = existing_store(g, "verlay layer ls")?;
    let layers = store.list()?;
    if g.format == Format::Json {
        let v: Vec<_> = layers
            .iter()
            .map(|l| {
                let r = l.record.as_ref();
                let get = |k: &str| {
                    r.and_then(|r| r.get(k))
                        .cloned()
                        .unwrap_or(serde_json::Value::Null)
                };
                json!({
                    "chain_id": l.chain_id,
                    "diff_id": get("diff_id"),
                    "parent": get("parent"),
                    "size": get("size"),
                    "entries": get("entries"),
                    "state": l.state,
                    "path": store.diff_dir(&l.chain_id),
                })
            })
            .collect();
        print_json(&serde_json::Value::Array(v));
        return Ok(());
    }
    let short = |s: &str| -> String {
        if full || s.len() <= 19 {
            s.to_string()
        } else {
            s[..19].to_string()
        }
    };
    let w = if full { 71 } else { 19 };
    println!(
        "{:w$}  {:w$}  {:w$}  {:>10}  {:>8}  STATE",
        "CHAIN ID", "DIFF ID", "PARENT", "SIZE", "ENTRIES"
    );
    for l in layers {
        let r = l.record.as_ref();
        let field = |k: &str| r.and_then(|r| r.get(k)).and_then(|v| v.as_str()).unwrap_or("-");
        let num = |k: &str| r.and_then(|r| r.get(k)).and_then(|v| v.as_u64());
        println!(
            "{:w$}  {:w$}  {:w$}  {:>10}  {:>8}  {}",
            short(&l.chain_id),
            short(field("diff_id")),
            short(field("parent")),
            num("size").map(human).unwrap_or_else(|| "-".into()),
            num("entries")
                .map(|n| n.to_string())
                .unwrap_or_else(|| "-".into()),
            l.state
        );
    }
    Ok(())
}

/// `verlay layer seal DIR`: writes `DIR.verlay-manifest` and prints `DIGEST MANIFEST_PATH`.
fn seal(chunk_size: Option<u64>, dir: &std::path::Path) -> Result<()> {
    let chunk_size = match chunk_size {
        None => manifest::CHUNK_SIZE,
        Some(n) if manifest::valid_chunk_size(n) => n,
        Some(_) => {
            return Err(Error::usage(
                "verlay layer seal --chunk-size",
                "needs a power of two from 4096 to 1048576",
                "leave it out for the default 4096, or pass 65536 for the first manifest format",
            ))
        }
    };
    if !dir.is_dir() {
        return Err(Error::usage(
            format!("layer {:?}", dir.display().to_string()),
            "not a directory",
            "pass the layer's directory (the one given in lowerdir=)",
        ));
    }
    let digest = manifest::seal_with_chunk_size(dir, chunk_size)?;
    println!("{digest} {}", manifest::manifest_path(dir).display());
    Ok(())
}
