//! `verlay snapshotter ...` runs `verlay-snapshotter` from beside this binary (else from the
//! PATH): the gRPC stack lives in that crate, not in verlay. Its arguments are that binary's
//! and are passed on untouched.
use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::process::ExitCode;

use clap::Args;

/// Listed for `--help` and completions only: [`super::main`] passes these words on unparsed.
#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n    verlay snapshotter --root /var/lib/verlay-snapshotter \
                        --address /run/verlay-snapshotter.sock"
)]
pub struct SnapshotterArgs {
    /// verlay-snapshotter's own arguments (see `verlay snapshotter --help`)
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<OsString>,
}

/// Replace this process with `verlay-snapshotter ARGS`; returns only on failure.
pub fn exec(args: Vec<OsString>) -> ExitCode {
    const BIN: &str = "verlay-snapshotter";
    let sibling = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(BIN)))
        .filter(|p| p.is_file());
    let program = sibling.unwrap_or_else(|| BIN.into());
    let e = std::process::Command::new(&program).args(args).exec();
    eprintln!(
        "verlay snapshotter: {}: {e} (build it with `cargo build --release`; it is installed beside verlay)",
        program.display()
    );
    ExitCode::from(1)
}
