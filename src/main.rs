//! The `verlay` command: parse, run, print the error once, exit with a documented code.
use std::process::ExitCode;

use verlay::cli::{self, Command};

/// Exit codes: 0 success, 1 runtime failure, 2 usage error.
fn main() -> ExitCode {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    let cwd = std::env::current_dir().unwrap_or_default();
    let cmd = match cli::parse(args, &cwd) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("verlay: {e}");
            return ExitCode::from(2);
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
        Command::Demo => match verlay::demo::run() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("verlay demo: {e}");
                ExitCode::from(1)
            }
        },
        Command::Commit(args) => {
            verlay::logging::init(false);
            finish("verlay commit", verlay::commit::cmd(args))
        }
        Command::Layer(args) => finish("verlay layer", verlay::store::cmd::layer(args)),
        Command::Image(args) => finish("verlay image", verlay::store::cmd::image(args)),
        Command::Verify(args) => match verlay::lower::cmd::verify(args) {
            // The scrub's own exit code: 0 clean, 1 damage found.
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                eprintln!("verlay verify: {e}");
                ExitCode::from(2)
            }
        },
        Command::Mount(m) => {
            verlay::logging::init(m.debug);
            // New files get exactly the mode the kernel sends (already under the caller's
            // umask); our own umask must not strip bits again.
            rustix::process::umask(rustix::fs::Mode::empty());
            finish("verlay", verlay::mount::run(m))
        }
    }
}

/// Print a subcommand's error once; usage errors exit 2, others 1.
fn finish(what: &str, r: verlay::error::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{what}: {e}");
            match e {
                verlay::error::Error::Usage { .. } => ExitCode::from(2),
                _ => ExitCode::from(1),
            }
        }
    }
}
