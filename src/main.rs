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
            finish("verlay commit", verlay::cmd::commit::run(args))
        }
        Command::Layer(args) => finish("verlay layer", verlay::store::cmd::layer(args)),
        Command::Image(args) => {
            // pull and push report each failed attempt as it happens (warn), not only the last
            if args.first().is_some_and(|a| a == "pull" || a == "push") {
                verlay::logging::init(false);
            }
            finish("verlay image", verlay::store::cmd::image(args))
        }
        Command::Verify(args) => match verlay::lower::cmd::verify(args) {
            // The scrub's own exit code: 0 clean, 1 damage found.
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                eprintln!("verlay verify: {e}");
                ExitCode::from(2)
            }
        },
        Command::Snapshotter(args) => snapshotter(args),
        Command::Mount(m) => {
            verlay::logging::init(m.debug);
            // New files get exactly the mode the kernel sends (already under the caller's
            // umask); our own umask must not strip bits again.
            rustix::process::umask(rustix::fs::Mode::empty());
            finish("verlay", verlay::mount::run(m))
        }
    }
}

/// `verlay snapshotter ...` runs `verlay-snapshotter` from beside this binary (else from the
/// PATH): the gRPC stack lives in that crate, not in verlay.
fn snapshotter(args: Vec<std::ffi::OsString>) -> ExitCode {
    use std::os::unix::process::CommandExt;
    const BIN: &str = "verlay-snapshotter";
    let sibling = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(BIN)))
        .filter(|p| p.is_file());
    let program = sibling.unwrap_or_else(|| BIN.into());
    // exec only returns on failure
    let e = std::process::Command::new(&program).args(args).exec();
    eprintln!(
        "verlay snapshotter: {}: {e} (build it with `cargo build --release`; it is installed beside verlay)",
        program.display()
    );
    ExitCode::from(1)
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
