//! Installs the tracing subscriber (only the binaries call this; the library only emits).
use tracing_subscriber::EnvFilter;

/// Log to stderr (or to `$VERLAY_LOG_FILE` when set, which survives daemonizing), at
/// `RUST_LOG` or, with `-d`, debug.
pub fn init(debug: bool) {
    init_with_default(if debug { "verlay=debug" } else { "verlay=warn" });
}

/// [`init`] with `default` as the filter when `RUST_LOG` is unset (another binary built on
/// the library, such as the snapshotter, names its own crate there).
pub fn init_with_default(default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    if let Some(path) = std::env::var_os("VERLAY_LOG_FILE") {
        if let Ok(f) = std::fs::OpenOptions::new().create(true).append(true).open(&path) {
            let _ = builder
                .with_writer(std::sync::Mutex::new(f))
                .with_ansi(false)
                .try_init();
            return;
        }
    }
    // colours only for a terminal: a daemon's stderr is usually a log file (the
    // snapshotter's under containerd, a test's), where escape codes are noise
    use std::io::IsTerminal;
    let _ = builder
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}
