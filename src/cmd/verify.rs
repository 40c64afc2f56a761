//! `verlay verify`: which layers to check, and the verdicts printed. The checks themselves
//! are [`manifest::scrub`]. Problems go to stdout, one line each (`layer L: PATH: what is
//! wrong`) or as one JSON document with `--format json`; progress goes to stderr, and only
//! when stderr is a terminal and not `--quiet`.
use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::json;

use super::{check_is_store, print_json, Format, Global};
use crate::digest::is_sha256_hex;
use crate::error::{Error, Result};
use crate::lower::manifest::{self, Manifest};
use crate::store;

/// How often the progress line is redrawn.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// every layer of the store (needs --store)
    #[arg(long)]
    all: bool,
    /// layer directories, or chain IDs (sha256:HEX) of the store
    #[arg(value_name = "LAYER")]
    layers: Vec<OsString>,
}

/// One layer to scrub: how the user named it, and its directory.
struct Target {
    label: String,
    dir: PathBuf,
}

fn usage_err(why: impl Into<String>) -> Error {
    Error::usage("verlay verify", why, "see verlay verify --help")
}

/// The layers to check.
fn targets(g: &Global, a: VerifyArgs) -> Result<Vec<Target>> {
    if let Some(st) = &g.store {
        check_is_store(st)?;
    }
    let mut targets = Vec::new();
    if a.all {
        let Some(st) = &g.store else {
            return Err(usage_err("--all needs --store DIR"));
        };
        for chain in store::chain_ids_at(st)? {
            let dir = store::diff_dir_at(st, &chain);
            // Only published layers; leftovers of interrupted imports are the store's to clean.
            if dir.is_dir() {
                targets.push(Target { dir, label: chain });
            }
        }
    }
    for l in a.layers {
        let s = l.to_string_lossy().into_owned();
        if let Some(h) = s.strip_prefix("sha256:") {
            let Some(st) = &g.store else {
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
            let dir = store::diff_dir_at(st, &s);
            if !dir.is_dir() {
                return Err(Error::usage(
                    format!("layer {s}"),
                    format!("not in store {} (no {})", st.display(), dir.display()),
                    "check the chain ID with verlay layer ls --store DIR",
                ));
            }
            targets.push(Target { label: s, dir });
        } else {
            let dir = PathBuf::from(&l);
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
    if targets.is_empty() && !a.all {
        return Err(usage_err("no layer given"));
    }
    Ok(targets)
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

/// Scrub one layer: its problems, each one line (empty: clean).
fn verify_one(t: &Target, show_progress: bool) -> Vec<String> {
    let m = match Manifest::open_beside(&t.dir) {
        Ok(Some(m)) => m,
        Ok(None) => return vec![format!("no manifest: run verlay layer seal {}", t.dir.display())],
        Err(e) => return vec![describe(&e)],
    };
    let mut line = ProgressLine {
        label: &t.label,
        last: None,
        drawn: false,
    };
    let mut progress = |done: u64, total: u64| {
        if show_progress {
            line.update(done, total);
        }
    };
    let result = manifest::scrub(&t.dir, &m, &mut progress);
    line.clear();
    match result {
        Ok(problems) => problems.iter().map(|p| p.to_string()).collect(),
        Err(e) => vec![describe(&e)],
    }
}

fn describe(e: &Error) -> String {
    match e {
        Error::Corrupt {
            path,
            expected,
            actual,
            ..
        } => format!(
            "{}: damaged manifest (expected {expected}, found {actual})",
            path.display()
        ),
        e => e.to_string(),
    }
}

/// `verlay verify`: 0 clean, 1 damage found.
pub fn run(g: &Global, a: VerifyArgs) -> Result<u8> {
    let targets = targets(g, a)?;
    let quiet = g.quiet;
    let show_progress = !quiet && std::io::stderr().is_terminal();
    let mut damaged = 0usize;
    let mut report = Vec::new();
    for t in &targets {
        let problems = verify_one(t, show_progress);
        if !problems.is_empty() {
            damaged += 1;
        }
        if g.format == Format::Json {
            report.push(json!({
                "layer": t.label,
                "path": t.dir,
                "ok": problems.is_empty(),
                "problems": problems,
            }));
        } else {
            for p in &problems {
                println!("layer {}: {p}", t.label);
            }
        }
    }
    if g.format == Format::Json {
        print_json(&json!({
            "checked": targets.len(),
            "damaged": damaged,
            "layers": report,
        }));
    }
    if !quiet {
        eprintln!(
            "verlay verify: {} layer{} checked, {damaged} damaged",
            targets.len(),
            if targets.len() == 1 { "" } else { "s" }
        );
    }
    Ok(u8::from(damaged > 0))
}
