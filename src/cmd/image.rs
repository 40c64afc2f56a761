//! `verlay image import|pull|push|ls`: arguments and output. The work is
//! [`crate::store::image`]'s and [`crate::registry`]'s.
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::json;

use super::{existing_store, print_json, progress, store_for_writing, Format, Global};
use crate::error::Result;
use crate::registry::{Options, Reference};
use crate::store::image;

#[derive(Debug, Subcommand)]
pub enum ImageCmd {
    /// Import an OCI layout directory, OCI archive or docker-save tarball; prints its lowerdir=
    #[command(
        long_about = "Import every layer of an image (an OCI layout directory, an OCI archive, or a \
                      `docker save` tarball) into the store, and print the lowerdir= value that \
                      mounts it. A missing store is created.",
        after_help = "Example:\n    verlay image import --store /var/lib/verlay alpine.tar\n    \
                      verlay -o lowerdir=$(verlay image import --store S alpine.tar | cut -d= -f2) /mnt"
    )]
    Import {
        /// the image in an OCI layout with several (its org.opencontainers.image.ref.name)
        #[arg(long = "ref", value_name = "NAME")]
        reference: Option<String>,
        /// the name to record it under in the store (default: its reference)
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
        /// OCI layout directory, OCI archive or docker-save tarball
        source: PathBuf,
    },
    /// Pull REF from a registry (HTTPS, logins from auth.json); prints its lowerdir=
    #[command(
        long_about = "Pull an image from a registry over the OCI distribution API into the store: \
                      HTTPS with the system's CAs and containers' certs.d (plain HTTP with \
                      --plain-http, and for localhost), logins from podman's auth.json or \
                      docker's config.json. An interrupted pull resumes. Prints the lowerdir= \
                      value that mounts it. A missing store is created.",
        after_help = "Examples:\n    verlay image pull --store /var/lib/verlay docker.io/library/alpine:3.20\n    \
                      verlay image pull --store S --plain-http localhost:5000/app:1"
    )]
    Pull {
        /// record the image and return: layers (eStargz) are fetched chunk by chunk as the
        /// mount reads them, each chunk verified against the TOC the manifest names
        #[arg(long)]
        lazy: bool,
        #[command(flatten)]
        registry: RegistryArgs,
        /// HOST[:PORT]/NAME[:TAG|@DIGEST], or a docker short name (alpine)
        reference: String,
    },
    /// Push an image the store holds (pulled, imported or committed) to REF
    #[command(after_help = "Example:\n    verlay image push --store /var/lib/verlay \
                            --image docker.io/library/alpine:3.20 registry.example:5000/alpine:3.20")]
    Push {
        /// the store's image to push (default: REF)
        #[arg(long, value_name = "NAME")]
        image: Option<String>,
        /// bytes per upload chunk
        #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u64).range(1..))]
        chunk_size: Option<u64>,
        #[command(flatten)]
        registry: RegistryArgs,
        /// HOST[:PORT]/NAME[:TAG]
        reference: String,
    },
    /// Convert an image of the store to eStargz (lazily pullable); prints its lowerdir=
    #[command(
        after_help = "Example:\n    verlay image convert --store S --estargz app:1 app:1-esgz\n    \
                            verlay image push --store S --image app:1-esgz registry.example:5000/app:1-esgz"
    )]
    Convert {
        /// the eStargz format (the only one)
        #[arg(long, required = true)]
        estargz: bool,
        /// uncompressed bytes per chunk
        #[arg(long, value_name = "BYTES", default_value_t = crate::estargz::writer::DEFAULT_CHUNK,
              value_parser = clap::value_parser!(u64).range(4096..=(16 << 20)))]
        chunk_size: u64,
        /// the store's image to convert
        source: String,
        /// the name to record the converted image under
        name: String,
    },
    /// List the images the store holds (--format json for scripts)
    #[command(after_help = "Example:\n    verlay image ls --store /var/lib/verlay --format json")]
    Ls,
}

/// How to reach a registry (the flags of `pull` and `push`, podman's spelling).
#[derive(Debug, Args)]
pub struct RegistryArgs {
    /// speak plain HTTP (the default for 127.0.0.1 and localhost)
    #[arg(long)]
    plain_http: bool,
    /// check the registry's certificate (false: accept any); true speaks HTTPS to localhost too
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true")]
    tls_verify: Option<bool>,
    /// the one auth file to read credentials from (default: podman's, then docker's)
    #[arg(long, value_name = "FILE")]
    authfile: Option<PathBuf>,
    /// credentials that win over any auth file
    #[arg(long, value_name = "USER:PASSWORD")]
    creds: Option<String>,
    /// how many times a failed request is tried again (default 5)
    #[arg(long, value_name = "N")]
    retries: Option<u32>,
    /// seconds any connect, read or write may take (default 30)
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    timeout: Option<u64>,
}

impl RegistryArgs {
    pub(super) fn options(self, chunk_size: Option<u64>) -> Options {
        let mut o = Options {
            plain_http: self.plain_http,
            tls_verify: self.tls_verify,
            authfile: self.authfile,
            creds: self.creds,
            ..Default::default()
        };
        if let Some(n) = self.retries {
            o.retries = n;
        }
        if let Some(n) = self.timeout {
            o.timeout = Duration::from_secs(n);
        }
        if let Some(n) = chunk_size {
            o.chunk_size = usize::try_from(n).unwrap_or(usize::MAX);
        }
        o
    }
}

/// Run one `verlay image` subcommand.
pub fn run(g: &Global, c: ImageCmd) -> Result<()> {
    match c {
        ImageCmd::Import {
            reference,
            name,
            source,
        } => {
            let store = store_for_writing(g, "verlay image import")?;
            let progress = progress(g);
            let chains =
                image::import_image(&store, &source, reference.as_deref(), name.as_deref(), &progress)?;
            progress.finish(&format!("imported {}", source.display()));
            println!("{}", image::lowerdir(&store, &chains)?);
            Ok(())
        }
        ImageCmd::Pull {
            lazy,
            registry,
            reference,
        } => {
            let reference = Reference::parse(&reference)?;
            let opts = registry.options(None);
            let store = store_for_writing(g, "verlay image pull")?;
            let progress = progress(g);
            let got = if lazy {
                crate::estargz::pull::pull_lazy(&store, &reference, &opts, &progress)?
            } else {
                crate::registry::pull::pull(&store, &reference, &opts, &progress)?
            };
            progress.say(&format!(
                "verlay: pulled {} (manifest {}): {} layers, {} new; {} blobs fetched ({} bytes), {} already in the store",
                got.name,
                got.manifest,
                got.chain_ids.len(),
                got.layers_imported,
                got.blobs_fetched,
                got.bytes_fetched,
                got.blobs_present
            ));
            println!("{}", image::lowerdir(&store, &got.chain_ids)?);
            Ok(())
        }
        ImageCmd::Push {
            image,
            chunk_size,
            registry,
            reference,
        } => {
            let reference = Reference::parse(&reference)?;
            let opts = registry.options(chunk_size);
            let store = existing_store(g, "verlay image push")?;
            let source = image.unwrap_or_else(|| reference.to_string());
            let progress = progress(g);
            let got = crate::registry::push::push(&store, &source, &reference, &opts, &progress)?;
            progress.say(&format!(
                "verlay: pushed {source} to {reference} (manifest {}): {} blobs uploaded in {} sessions \
                 ({} bytes sent), {} already in the registry",
                got.manifest, got.blobs_uploaded, got.sessions, got.bytes_sent, got.blobs_present
            ));
            println!("{reference}@{}", got.manifest);
            Ok(())
        }
        ImageCmd::Convert {
            estargz: _,
            chunk_size,
            source,
            name,
        } => {
            let store = existing_store(g, "verlay image convert")?;
            let got = crate::estargz::convert::convert(&store, &source, &name, chunk_size)?;
            eprintln!(
                "verlay: converted {source} to eStargz as {name} (manifest {}): {} layers",
                got.manifest,
                got.layers.len()
            );
            println!("{}", image::lowerdir(&store, &got.chain_ids)?);
            Ok(())
        }
        ImageCmd::Ls => {
            let store = existing_store(g, "verlay image ls")?;
            let records = crate::store::blobs::list_records(&store)?;
            if g.format == Format::Json {
                let v: Vec<_> = records
                    .iter()
                    .map(|r| {
                        json!({
                            "name": r.name,
                            "manifest": r.manifest,
                            "media_type": r.media_type,
                            "config": r.config,
                            "chain_ids": r.chain_ids,
                        })
                    })
                    .collect();
                print_json(&serde_json::Value::Array(v));
                return Ok(());
            }
            println!("{:40}  {:71}  LAYERS", "NAME", "MANIFEST");
            for r in records {
                println!("{:40}  {:71}  {}", r.name, r.manifest, r.chain_ids.len());
            }
            Ok(())
        }
    }
}
