//! Progress of the long commands (image pull, push and import, layer import, commit): bars on
//! a terminal, one summary line otherwise, nothing when quiet. Everything goes to stderr, so
//! what the commands print on stdout (a chain ID, a `lowerdir=` value) stays parseable.
//!
//! A [`Progress`] is passed by reference to the domain functions; their hooks only add to a
//! counter (an atomic, and an indicatif bar that throttles its own drawing). The mount daemon
//! never sees one: progress is for the command-line tools, not the FUSE path.
use std::io::{IsTerminal, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How a command reports progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Bars when stderr is a terminal, else one summary line at the end.
    Auto,
    /// Nothing.
    Quiet,
}

impl Mode {
    /// [`Mode::Quiet`] when `quiet` (a `--quiet` flag), else [`Mode::Auto`].
    pub fn quiet_if(quiet: bool) -> Mode {
        if quiet {
            Mode::Quiet
        } else {
            Mode::Auto
        }
    }
}

/// Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct Progress {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    /// Set when stderr is a terminal.
    bars: Option<MultiProgress>,
    /// Layers done / total, drawn above the byte bars.
    layers_bar: OnceLock<ProgressBar>,
    start: Instant,
    bytes: AtomicU64,
    layers: AtomicU64,
    entries: AtomicU64,
}

/// Bar templates (indicatif's syntax).
const BYTES_KNOWN: &str =
    "{prefix:>14} [{bar:30}] {binary_bytes:>10}/{binary_total_bytes:<10} {binary_bytes_per_sec:>12} ETA {eta}";
const BYTES_UNKNOWN: &str = "{prefix:>14} {spinner} {binary_bytes:>10} {binary_bytes_per_sec:>12} {msg}";
const COUNT: &str = "{prefix:>14} [{bar:30}] {pos}/{len} {msg}";

impl Progress {
    /// A progress reporter for `mode`; [`Mode::Auto`] looks at stderr once, here.
    pub fn new(mode: Mode) -> Progress {
        match mode {
            Mode::Quiet => Progress { inner: None },
            Mode::Auto => {
                let bars = std::io::stderr()
                    .is_terminal()
                    .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
                Progress {
                    inner: Some(Arc::new(Inner {
                        bars,
                        layers_bar: OnceLock::new(),
                        start: Instant::now(),
                        bytes: AtomicU64::new(0),
                        layers: AtomicU64::new(0),
                        entries: AtomicU64::new(0),
                    })),
                }
            }
        }
    }

    /// Nothing shown (library callers and tests).
    pub fn quiet() -> Progress {
        Progress::new(Mode::Quiet)
    }

    /// Whether bars are drawn (stderr is a terminal and not quiet).
    pub fn is_drawing(&self) -> bool {
        self.inner.as_ref().is_some_and(|i| i.bars.is_some())
    }

    /// Announce `total` layers; [`Progress::layer_done`] counts them off. Call once, before
    /// any bar is made, so the layer bar sits on top.
    pub fn layers(&self, total: u64) {
        let Some(i) = &self.inner else { return };
        let Some(m) = &i.bars else { return };
        i.layers_bar.get_or_init(|| {
            let bar = m.add(ProgressBar::new(total).with_style(style(COUNT)));
            bar.set_prefix("layers");
            bar
        });
    }

    /// One more layer finished (imported, fetched or found present).
    pub fn layer_done(&self) {
        if let Some(i) = &self.inner {
            i.layers.fetch_add(1, Ordering::Relaxed);
            if let Some(b) = i.layers_bar.get() {
                b.inc(1);
            }
        }
    }

    /// A bar for the bytes of one item (a blob, a layer tarball); `total` when known.
    pub fn bytes(&self, label: impl Into<String>, total: Option<u64>) -> Bar {
        let bar = self.inner.as_ref().and_then(|i| i.bars.as_ref()).map(|m| {
            let b = m.add(match total {
                Some(n) => ProgressBar::new(n).with_style(style(BYTES_KNOWN)),
                None => ProgressBar::no_length().with_style(style(BYTES_UNKNOWN)),
            });
            b.set_prefix(label.into());
            b
        });
        Bar {
            inner: self.inner.clone(),
            bar,
            entries: false,
        }
    }

    /// A bar counting entries (files hashed, entries copied) up to `total`.
    pub fn entries(&self, label: impl Into<String>, total: u64) -> Bar {
        let bar = self.inner.as_ref().and_then(|i| i.bars.as_ref()).map(|m| {
            let b = m.add(ProgressBar::new(total).with_style(style(COUNT)));
            b.set_prefix(label.into());
            b
        });
        Bar {
            inner: self.inner.clone(),
            bar,
            entries: true,
        }
    }

    /// `r`, counting what is read from it into a byte bar.
    pub fn reader<R: Read>(&self, r: R, label: impl Into<String>, total: Option<u64>) -> Counted<R> {
        Counted {
            inner: r,
            bar: self.bytes(label, total),
        }
    }

    /// Print `line` on stderr unless quiet (above the bars on a terminal).
    pub fn say(&self, line: &str) {
        let Some(i) = &self.inner else { return };
        match &i.bars {
            Some(m) => {
                let _ = m.println(line);
            }
            None => eprintln!("{line}"),
        }
    }

    /// The closing line, `verlay: WHAT: N layers, 12.3 MiB in 1.2 s` (the counts that were
    /// made), on stderr unless quiet.
    pub fn finish(&self, what: &str) {
        if let Some(b) = self.inner.as_ref().and_then(|i| i.layers_bar.get()) {
            b.finish();
        }
        self.say(&self.summary(what));
    }

    /// The text of [`Progress::finish`].
    pub fn summary(&self, what: &str) -> String {
        let Some(i) = &self.inner else {
            return String::new();
        };
        let mut parts = Vec::new();
        let layers = i.layers.load(Ordering::Relaxed);
        if layers > 0 {
            parts.push(format!("{layers} layer{}", if layers == 1 { "" } else { "s" }));
        }
        let entries = i.entries.load(Ordering::Relaxed);
        if entries > 0 {
            parts.push(format!("{entries} entries"));
        }
        parts.push(human(i.bytes.load(Ordering::Relaxed)));
        format!(
            "verlay: {what}: {} in {}",
            parts.join(", "),
            seconds(i.start.elapsed())
        )
    }
}

/// One bar; finished (left drawn with its final figures) when dropped.
pub struct Bar {
    inner: Option<Arc<Inner>>,
    bar: Option<ProgressBar>,
    entries: bool,
}

impl Bar {
    /// `n` more bytes (or entries, for an entry bar).
    pub fn inc(&self, n: u64) {
        if let Some(i) = &self.inner {
            let c = if self.entries { &i.entries } else { &i.bytes };
            c.fetch_add(n, Ordering::Relaxed);
        }
        if let Some(b) = &self.bar {
            b.inc(n);
        }
    }

    /// A short note after the figures (an unknown-length bar's state).
    pub fn note(&self, msg: &'static str) {
        if let Some(b) = &self.bar {
            b.set_message(msg);
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        if let Some(b) = &self.bar {
            // finish() draws the final state even when the throttle skipped every update.
            b.finish();
        }
    }
}

/// A reader that counts its bytes into a [`Bar`].
pub struct Counted<R> {
    inner: R,
    bar: Bar,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bar.inc(n as u64);
        Ok(n)
    }
}

fn style(template: &str) -> ProgressStyle {
    // The templates are constants; a bad one falls back to the default bar.
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

/// Bytes in binary units, one decimal.
pub fn human(n: u64) -> String {
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

fn seconds(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_counts_layers_entries_and_bytes() {
        let p = Progress::new(Mode::Auto);
        p.layers(2);
        let mut r = p.reader(&[7u8; 3000][..], "layer 1/2", Some(3000));
        std::io::copy(&mut r, &mut std::io::sink()).unwrap();
        drop(r);
        p.layer_done();
        p.layer_done();
        p.entries("files", 5).inc(5);
        let s = p.summary("imported x");
        assert!(
            s.starts_with("verlay: imported x: 2 layers, 5 entries, 2.9 KiB in "),
            "{s}"
        );
        assert!(s.ends_with(" s"), "{s}");
        assert_eq!(Progress::quiet().summary("x"), "");
        assert_eq!(human(1023), "1023 B");
        assert_eq!(human(12_897_485), "12.3 MiB");
    }
}
