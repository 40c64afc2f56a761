//! The mount form, `verlay [-f] [-d] [-s] -o OPTS MOUNTPOINT` and `verlay SOURCE MOUNTPOINT -o
//! OPTS`, exactly as podman, containerd and mount.fuse3 call fuse-overlayfs: argv goes to
//! [`crate::cli::parse`] unchanged, and the typed arguments to [`crate::mount::run`].
use std::ffi::OsString;
use std::process::ExitCode;

use crate::cli::{self, Command};

/// Parse and run the mount form (or its `--help` / `--version`).
pub fn main(args: Vec<OsString>) -> ExitCode {
    let cwd = std::env::current_dir().unwrap_or_default();
    let cmd = match cli::parse(args, &cwd) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("verlay: {e}");
            return ExitCode::from(cli::EXIT_USAGE);
        }
    };
    match cmd {
        Command::Help => {
            print!("{}", cli::HELP);
            ExitCode::SUCCESS
        }
        Command::Version => {
            println!("verlay {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Mount(m) => {
            crate::logging::init(m.debug);
            // New files get exactly the mode the kernel sends (already under the caller's
            // umask); our own umask must not strip bits again.
            rustix::process::umask(rustix::fs::Mode::empty());
            super::finish("verlay", crate::mount::run(m))
        }
    }
}
