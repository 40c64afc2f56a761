//! `verlay verify` and `verlay layer seal`: the command-line face of the layer manifest.
//!
//! Owns argument handling and output only; the checks themselves are [`manifest::scrub`].
//! Problems go to stdout, one line each (`layer L: PATH: what is wrong`); progress goes to
//! stderr, and only when stderr is a terminal.
use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::digest::is_sha256_hex;
use crate::error::{Error, Result};
use crate::lower::manifest::{self, Manifest};

const VERIFY_USAGE: &str = "verlay verify [--store DIR] LAYER... | verlay verify --store DIR --all";
const SEAL_USAGE: &str = "verlay layer seal [--chunk-size BYTES] DIR\n  \
    --chunk-size BYTES  bytes per hashed chunk, a power of two from 4096 to 1048576 (default 4096; \
    65536 writes the first manifest format, as older verlay did)";

/// How often the progress line is redrawn.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// One layer to scrub: how the user named it, and its directory.
struct Target {
    label: String,
    dir: PathBuf,
}

/// A layer's directory in the store: `STORE/layers/<hex>/diff`.
fn store_layer_dir(store: &Path, hex: &str) -> PathBuf {
    store.join("layers").join(hex).join("diff")
}

fn usage_err(why: impl Into<String>) -> Error {
    Error::usage("verlay verify", why, format!("usage: {VERIFY_USAGE}"))
}

/// Parse `verlay verify` arguments into the layers to check; `None` for `--help`.
fn verify_targets(args: Vec<OsString>) -> Result<Option<Vec<Target>>> {
    let mut store: Option<PathBuf> = None;
    let mut all = false;
    let mut layers: Vec<OsString> = Vec::new();
    let mut it = args.into_iter();
    let mut options = true;
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if !options || !s.starts_with('-') || s == "-" {
            layers.push(a);
            continue;
        }
        if s == "--" {
            options = false;
        } else if s == "-h" || s == "--help" {
            return Ok(None);
        } else if s == "--all" {
            all = true;
        } else if s == "--store" {
            let v = it.next().ok_or_else(|| usage_err("--store needs a directory"))?;
            store = Some(PathBuf::from(v));
        } else if let Some(v) = s.strip_prefix("--store=") {
            store = Some(PathBuf::from(v));
        } else {
            return Err(usage_err(format!("unknown option {s}")));
        }
    }
    if let Some(st) = &store {
        if !st.join("layers").is_dir() {
            return Err(Error::usage(
                format!("--store {:?}", st.display().to_string()),
                "not a verlay layer store (it has no layers/ directory)",
                "pass the directory given to verlay layer import --store",
            ));
        }
    }
    let mut targets = Vec::new();
    if all {
        let Some(st) = &store else {
            return Err(usage_err("--all needs --store DIR"));
        };
        let dir = st.join("layers");
        let rd = std::fs::read_dir(&dir).map_err(|e| Error::io("readdir", &dir, e))?;
        let mut ids = Vec::new();
        for ent in rd {
            let ent = ent.map_err(|e| Error::io("readdir", &dir, e))?;
            let name = ent.file_name().to_string_lossy().into_owned();
            // Only published layers; leftovers of interrupted imports are the store's to clean.
            if is_sha256_hex(&name) && store_layer_dir(st, &name).is_dir() {
                ids.push(name);
            }
        }
        ids.sort();
        targets.extend(ids.into_iter().map(|h| Target {
            dir: store_layer_dir(st, &h),
            label: format!("sha256:{h}"),
        }));
    }
    for a in layers {
        let s = a.to_string_lossy().into_owned();
        if let Some(h) = s.strip_prefix("sha256:") {
            let Some(st) = &store else {
                return Err(Error::usage(
                    format!("layer {s}"),
                    "a chain ID needs a store",
                    "add --store DIR, or pass the layer directory",
                ));
            };
            if !is_sha256_hex(h) {
                return Err(Error::usage(
                    format!("layer {s}"),
                    "not a sha256 chain ID (64 lower-case hex digits after sha256:)",
                    "copy it from verlay layer ls --store DIR",
                ));
            }
            let dir = store_layer_dir(st, h);
            if !dir.is_dir() {
                return Err(Error::usage(
                    format!("layer {s}"),
                    format!("not in store {} (no {})", st.display(), dir.display()),
                    "check the chain ID with verlay layer ls --store DIR",
                ));
            }
            targets.push(Target { label: s, dir });
        } else {
            let dir = PathBuf::from(&a);
            if !dir.is_dir() {
                return Err(Error::usage(
                    format!("layer {:?}", s),
                    "not a directory",
                    "pass a layer directory, or a chain ID with --store DIR",
                ));
            }
            targets.push(Target { label: s, dir });
        }
    }
    if targets.is_empty() && !all {
        return Err(usage_err("no layer given"));
    }
    Ok(Some(targets))
}

/// A progress line on stderr, redrawn at most every [`PROGRESS_EVERY`].
struct ProgressLine<'a> {
    label: &'a str,
    last: Option<Instant>,
    drawn: bool,
}

impl ProgressLine<'_> {
    fn update(&mut self, done: u64, total: u64) {
        if self.last.is_some_and(|t| t.elapsed() < PROGRESS_EVERY) {
            return;
        }
        self.last = Some(Instant::now());
        let pct = done.saturating_mul(100).checked_div(total).unwrap_or(100);
        const MIB: u64 = 1024 * 1024;
        eprint!(
            "\r\x1b[Kverifying {}: {pct:3}% ({} of {} MiB)",
            self.label,
            done / MIB,
            total.div_ceil(MIB)
        );
        self.drawn = true;
    }

    fn clear(&mut self) {
        if self.drawn {
            eprint!("\r\x1b[K");
        }
    }
}

/// Scrub one layer, printing its problems; true if it is damaged.
fn verify_one(t: &Target, tty: bool) -> bool {
    let m = match Manifest::open_beside(&t.dir) {
        Ok(Some(m)) => m,
        Ok(None) => {
            println!(
                "layer {}: no manifest: run verlay layer seal {}",
                t.label,
                t.dir.display()
            );
            return true;
        }
        Err(e) => {
            print_error(t, &e);
            return true;
        }
    };
    let mut line = ProgressLine {
        label: &t.label,
        last: None,
        drawn: false,
    };
    let mut progress = |done: u64, total: u64| {
        if tty {
            line.update(done, total);
        }
    };
    let result = manifest::scrub(&t.dir, &m, &mut progress);
    line.clear();
    match result {
        Ok(problems) => {
            for p in &problems {
                println!("layer {}: {p}", t.label);
            }
            !problems.is_empty()
        }
        Err(e) => {
            print_error(t, &e);
            true
        }
    }
}

fn print_error(t: &Target, e: &Error) {
    match e {
        Error::Corrupt {
            path,
            expected,
            actual,
            ..
        } => println!(
            "layer {}: {}: damaged manifest (expected {expected}, found {actual})",
            t.label,
            path.display()
        ),
        e => println!("layer {}: {e}", t.label),
    }
}

/// `verlay verify [--store DIR] LAYER... | --store DIR --all`: 0 clean, 1 damage found.
pub fn verify(args: Vec<OsString>) -> Result<u8> {
    let Some(targets) = verify_targets(args)? else {
        println!("usage: {VERIFY_USAGE}");
        return Ok(0);
    };
    let tty = std::io::stderr().is_terminal();
    let mut damaged = 0usize;
    for t in &targets {
        if verify_one(t, tty) {
            damaged += 1;
        }
    }
    eprintln!(
        "verlay verify: {} layer{} checked, {damaged} damaged",
        targets.len(),
        if targets.len() == 1 { "" } else { "s" }
    );
    Ok(u8::from(damaged > 0))
}

/// `verlay layer seal DIR`: writes `DIR.verlay-manifest` and prints `DIGEST MANIFEST_PATH`.
pub fn seal(args: Vec<OsString>) -> Result<()> {
    let mut dirs = Vec::new();
    let mut chunk_size = manifest::CHUNK_SIZE;
    let mut args = args.into_iter();
    while let Some(a) = args.next() {
        match a.to_str() {
            Some("-h" | "--help") => {
                println!("usage: {SEAL_USAGE}");
                return Ok(());
            }
            Some("--chunk-size") => {
                let v = args
                    .next()
                    .and_then(|v| v.to_str().and_then(|v| v.parse::<u64>().ok()));
                chunk_size =
                    match v {
                        Some(n) if manifest::valid_chunk_size(n) => n,
                        _ => return Err(Error::usage(
                            "verlay layer seal --chunk-size",
                            "needs a power of two from 4096 to 1048576",
                            "leave it out for the default 4096, or pass 65536 for the first manifest format",
                        )),
                    };
            }
            Some(s) if s.starts_with('-') && s != "-" => {
                return Err(Error::usage(
                    "verlay layer seal",
                    format!("unknown option {s}"),
                    format!("usage: {SEAL_USAGE}"),
                ))
            }
            _ => dirs.push(PathBuf::from(a)),
        }
    }
    let [dir] = dirs.as_slice() else {
        return Err(Error::usage(
            "verlay layer seal",
            "needs exactly one layer directory",
            format!("usage: {SEAL_USAGE}"),
        ));
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
