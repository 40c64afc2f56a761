//! `verlay layer import|path|ls|seal` and `verlay image import`: argument parsing and
//! output. The work is in [`super::Store`] and [`super::image`].
use std::ffi::OsString;
use std::path::PathBuf;

use super::{image, ImportOptions, Store};
use crate::error::{Error, Result};

const LAYER_USAGE: &str =
    "verlay layer import --store DIR [--parent CHAIN_ID] [--diff-id sha256:HEX] [--fsync-each] FILE\n\
     verlay layer path --store DIR CHAIN_ID\n\
     verlay layer ls --store DIR [--no-trunc]\n\
     verlay layer seal DIR";
const IMAGE_USAGE: &str = "verlay image import --store DIR [--ref NAME] [--name NAME] SOURCE\n\
     verlay image pull --store DIR [REGISTRY OPTIONS] [--retries N] [--timeout SECS] REF\n\
     verlay image push --store DIR [--image NAME] [REGISTRY OPTIONS] [--retries N] [--timeout SECS]\n\
     \x20                 [--chunk-size BYTES] REF\n\
     \x20 REGISTRY OPTIONS: --plain-http, --tls-verify[=true|false], --authfile FILE, --creds USER:PASSWORD\n\
     verlay image ls --store DIR";
/// The valued options of `image push`.
const PUSH_VALUED: &[&str] = &[
    "--store",
    "--retries",
    "--timeout",
    "--chunk-size",
    "--image",
    "--authfile",
    "--creds",
];

/// Parsed options of one subcommand: `--name VALUE` / `--name=VALUE`, flags and positionals.
struct Opts {
    cmd: &'static str,
    values: Vec<(&'static str, String)>,
    flags: Vec<&'static str>,
    positional: Vec<OsString>,
    /// `--tls-verify[=BOOL]` (podman's spelling: a flag with an optional inline value)
    tls_verify: Option<bool>,
}

impl Opts {
    fn parse(
        cmd: &'static str,
        args: &[OsString],
        valued: &[&'static str],
        flags: &[&'static str],
    ) -> Result<Opts> {
        let mut o = Opts {
            cmd,
            values: Vec::new(),
            flags: Vec::new(),
            positional: Vec::new(),
            tls_verify: None,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let s = a.to_string_lossy();
            if s == "--" {
                o.positional.extend(it.by_ref().cloned());
                break;
            }
            if !s.starts_with("--") || s.len() == 2 {
                o.positional.push(a.clone());
                continue;
            }
            let (name, inline) = match s.split_once('=') {
                Some((n, v)) => (n.to_string(), Some(v.to_string())),
                None => (s.to_string(), None),
            };
            if let Some(k) = valued.iter().find(|k| **k == name) {
                let v = match inline {
                    Some(v) => v,
                    None => it
                        .next()
                        .ok_or_else(|| o.usage(format!("{name} needs a value")))?
                        .to_str()
                        .ok_or_else(|| o.usage(format!("{name}: not valid UTF-8")))?
                        .to_string(),
                };
                o.values.push((k, v));
            } else if let Some(k) = flags.iter().find(|k| **k == name) {
                if *k == "--tls-verify" {
                    o.tls_verify = match inline.as_deref() {
                        None | Some("true") => Some(true),
                        Some("false") => Some(false),
                        Some(v) => return Err(o.usage(format!("--tls-verify={v}: true or false"))),
                    };
                }
                o.flags.push(k);
            } else {
                return Err(o.usage(format!("unknown option {name}")));
            }
        }
        Ok(o)
    }

    fn usage(&self, why: String) -> Error {
        let usage = if self.cmd.starts_with("verlay image") {
            IMAGE_USAGE
        } else {
            LAYER_USAGE
        };
        Error::usage(self.cmd, why, format!("usage:\n{usage}"))
    }

    fn value(&self, k: &str) -> Option<&str> {
        self.values
            .iter()
            .rev()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, k: &str) -> bool {
        self.flags.contains(&k)
    }

    fn store(&self) -> Result<Store> {
        let dir = self
            .value("--store")
            .map(PathBuf::from)
            .ok_or_else(|| self.usage("--store DIR is required".into()))?;
        Store::open(&dir)
    }

    /// Exactly `n` positionals.
    fn positionals(&self, n: usize, names: &str) -> Result<&[OsString]> {
        if self.positional.len() != n {
            return Err(self.usage(format!("expected {names}")));
        }
        Ok(&self.positional)
    }
}

/// `verlay layer SUBCOMMAND ...`.
pub fn layer(args: Vec<OsString>) -> Result<()> {
    let sub = args
        .first()
        .map(|a| a.to_string_lossy().into_owned())
        .unwrap_or_default();
    let rest = args.get(1..).unwrap_or_default();
    match sub.as_str() {
        "seal" => crate::lower::cmd::seal(rest.to_vec()),
        "import" => {
            let o = Opts::parse(
                "verlay layer import",
                rest,
                &["--store", "--parent", "--diff-id"],
                &["--fsync-each"],
            )?;
            let file = PathBuf::from(&o.positionals(1, "one FILE (a layer tarball)")?[0]);
            let store = o.store()?;
            let mut f = std::fs::File::open(&file).map_err(|e| {
                Error::usage(
                    format!("layer tarball \"{}\"", file.display()),
                    e.to_string(),
                    "give the path of a tar, tar.gz or tar.zst layer",
                )
            })?;
            let opts = ImportOptions {
                parent: o.value("--parent").map(str::to_owned),
                diff_id: o.value("--diff-id").map(str::to_owned),
                blob_digest: None,
                source: file.display().to_string(),
                fsync_each: o.flag("--fsync-each"),
            };
            let got = store.import_layer(&mut f, &opts)?;
            println!("{}", got.chain_id);
            Ok(())
        }
        "path" => {
            let o = Opts::parse("verlay layer path", rest, &["--store"], &[])?;
            let id = o.positionals(1, "one CHAIN_ID")?[0]
                .to_string_lossy()
                .into_owned();
            let store = o.store()?;
            let chain = store.resolve(&id)?;
            println!("{}", store.diff_dir(&chain).display());
            Ok(())
        }
        "ls" => {
            let o = Opts::parse("verlay layer ls", rest, &["--store"], &["--no-trunc"])?;
            o.positionals(0, "no arguments")?;
            let store = o.store()?;
            let full = o.flag("--no-trunc");
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
            for l in store.list()? {
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
        "" | "-h" | "--help" | "help" => {
            println!("{LAYER_USAGE}");
            Ok(())
        }
        other => Err(Error::usage(
            format!("verlay layer {other}"),
            "unknown subcommand",
            format!("usage:\n{LAYER_USAGE}"),
        )),
    }
}

/// `verlay image SUBCOMMAND ...`.
pub fn image(args: Vec<OsString>) -> Result<()> {
    let sub = args
        .first()
        .map(|a| a.to_string_lossy().into_owned())
        .unwrap_or_default();
    let rest = args.get(1..).unwrap_or_default();
    match sub.as_str() {
        "import" => {
            let o = Opts::parse("verlay image import", rest, &["--store", "--ref", "--name"], &[])?;
            let src = PathBuf::from(&o.positionals(1, "one SOURCE (OCI layout dir or image tar)")?[0]);
            let store = o.store()?;
            let chains = image::import_image(&store, &src, o.value("--ref"), o.value("--name"))?;
            println!("{}", image::lowerdir(&store, &chains)?);
            Ok(())
        }
        "pull" => {
            let o = Opts::parse(
                "verlay image pull",
                rest,
                &["--store", "--retries", "--timeout", "--authfile", "--creds"],
                &["--plain-http", "--tls-verify"],
            )?;
            let (reference, opts) = registry_args(&o)?;
            let store = o.store()?;
            let got = crate::registry::pull::pull(&store, &reference, &opts)?;
            eprintln!(
                "verlay: pulled {} (manifest {}): {} layers, {} new; {} blobs fetched ({} bytes), {} already in the store",
                got.name,
                got.manifest,
                got.chain_ids.len(),
                got.layers_imported,
                got.blobs_fetched,
                got.bytes_fetched,
                got.blobs_present
            );
            println!("{}", image::lowerdir(&store, &got.chain_ids)?);
            Ok(())
        }
        "push" => {
            let o = Opts::parse(
                "verlay image push",
                rest,
                PUSH_VALUED,
                &["--plain-http", "--tls-verify"],
            )?;
            let (reference, opts) = registry_args(&o)?;
            let store = o.store()?;
            let source = o
                .value("--image")
                .map(str::to_owned)
                .unwrap_or_else(|| reference.to_string());
            let got = crate::registry::push::push(&store, &source, &reference, &opts)?;
            eprintln!(
                "verlay: pushed {source} to {reference} (manifest {}): {} blobs uploaded in {} sessions \
                 ({} bytes sent), {} already in the registry",
                got.manifest, got.blobs_uploaded, got.sessions, got.bytes_sent, got.blobs_present
            );
            println!("{reference}@{}", got.manifest);
            Ok(())
        }
        "ls" => {
            let o = Opts::parse("verlay image ls", rest, &["--store"], &[])?;
            o.positionals(0, "no arguments")?;
            let store = o.store()?;
            println!("{:40}  {:71}  LAYERS", "NAME", "MANIFEST");
            for r in super::blobs::list_records(&store)? {
                println!("{:40}  {:71}  {}", r.name, r.manifest, r.chain_ids.len());
            }
            Ok(())
        }
        "" | "-h" | "--help" | "help" => {
            println!("{IMAGE_USAGE}");
            Ok(())
        }
        other => Err(Error::usage(
            format!("verlay image {other}"),
            "unknown subcommand",
            format!("usage:\n{IMAGE_USAGE}"),
        )),
    }
}

/// The reference and the transfer options of `image pull|push`.
fn registry_args(o: &Opts) -> Result<(crate::registry::Reference, crate::registry::Options)> {
    let r = o.positionals(1, "one REF (HOST[:PORT]/NAME[:TAG])")?[0].to_string_lossy();
    let reference = crate::registry::Reference::parse(&r)?;
    let mut opts = crate::registry::Options {
        plain_http: o.flag("--plain-http"),
        tls_verify: o.tls_verify,
        authfile: o.value("--authfile").map(PathBuf::from),
        creds: o.value("--creds").map(str::to_owned),
        ..Default::default()
    };
    let num = |k: &str, min: u64| -> Result<Option<u64>> {
        o.value(k)
            .map(|v| match v.parse::<u64>() {
                Ok(n) if n >= min => Ok(n),
                _ => Err(o.usage(format!("{k} {v}: not a whole number >= {min}"))),
            })
            .transpose()
    };
    if let Some(n) = num("--retries", 0)? {
        opts.retries = u32::try_from(n).unwrap_or(u32::MAX);
    }
    if let Some(n) = num("--timeout", 1)? {
        opts.timeout = std::time::Duration::from_secs(n);
    }
    if let Some(n) = num("--chunk-size", 1)? {
        opts.chunk_size = usize::try_from(n).unwrap_or(usize::MAX);
    }
    Ok((reference, opts))
}

/// Bytes in binary units, one decimal.
fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
