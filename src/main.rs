//! The `verlay` command: argv to [`verlay::cmd::main`], which prints any error once and
//! returns the documented exit code (0 success, 1 failure, 2 usage).
use std::process::ExitCode;

fn main() -> ExitCode {
    verlay::cmd::main(std::env::args_os().skip(1).collect())
}
