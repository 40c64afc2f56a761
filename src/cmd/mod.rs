//! The command-line layer: every subcommand's parsing (clap derive) and printing, over the
//! domain modules, which take typed arguments and return values.
//!
//! Two grammars share argv. The first word decides: a subcommand name ([`SUBCOMMANDS`]) goes
//! to clap; anything else is the fuse-overlayfs mount form (`verlay [-f] [-d] -o OPTS MNT`,
//! `verlay SOURCE MNT -o OPTS`), handed unchanged to [`crate::cli`], whose libfuse option
//! syntax (several `-o`, glued `-oOPTS`, options anywhere) clap cannot express and podman and
//! mount.fuse3 rely on. So `verlay --help` and `verlay --version` are the mount parser's too.
//!
//! Exit codes everywhere: 0 success, 1 failure at run time, 2 usage (nothing was changed).
//! `verlay verify` adds its own meaning of 1: damage found.
//!
//! Store rule: a command that writes to a store (`layer import`, `image import`, `image pull`,
//! `commit`) creates a missing one on first use; a command that only reads one (`layer ls`,
//! `layer path`, `image ls`, `image push`, `verify`) refuses a missing one with exit 2.
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};

use crate::error::{Error, Result};
use crate::store::Store;

pub mod als;
pub mod commit;
pub mod image;
pub mod layer;
pub mod mount;
pub mod snapshotter;
pub mod verify;

/// The first words that select a subcommand; any other argv is the mount form.
pub const SUBCOMMANDS: &[&str] = &[
    "demo",
    "layer",
    "image",
    "verify",
    "commit",
    "snapshotter",
    "als",
    "completions",
];

/// `verlay SUBCOMMAND ...` (the mount form is [`crate::cli`]'s; see `verlay --help`).
#[derive(Debug, Parser)]
#[command(
    name = "verlay",
    version,
    about = "A FUSE overlay filesystem with kernel-overlayfs semantics, verified layers and an \
             ordered upper; its layer store and registry client",
    disable_help_subcommand = true,
    after_help = "The mount form (fuse-overlayfs compatible) is described by `verlay --help`:\n    \
                  verlay [-f] [-d] [-s] -o lowerdir=L1:L2,upperdir=U,workdir=W MOUNTPOINT"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Sub,
}

/// Flags every subcommand accepts, in one place.
#[derive(Debug, Clone, Args)]
pub struct Global {
    /// The layer store directory (created on first use by commands that write to it)
    #[arg(long, global = true, env = "VERLAY_STORE", value_name = "DIR")]
    pub store: Option<PathBuf>,
    /// Print no progress and no summary on stderr (results on stdout stay)
    #[arg(long, short = 'q', global = true)]
    pub quiet: bool,
    /// Output format of `layer ls`, `image ls` and `verify` (json: for scripts)
    #[arg(long, global = true, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

/// How listings and verdicts are printed on stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// columns for people
    Text,
    /// one JSON document (an array, or an object for verify)
    Json,
}

/// What a long command reports on stderr while it works (`--quiet`: nothing; else
/// progress on a terminal and one summary line otherwise).
pub fn progress(g: &Global) -> crate::progress::Progress {
    crate::progress::Progress::new(crate::progress::Mode::quiet_if(g.quiet))
}

#[derive(Debug, Subcommand)]
pub enum Sub {
    /// Mount throwaway example layers and show what verlay does, step by step
    #[command(after_help = "Example:\n    verlay demo")]
    Demo,
    /// Layers of the store: import a tarball, print a layer's path, list, seal a directory
    #[command(subcommand, arg_required_else_help = true)]
    Layer(layer::LayerCmd),
    /// Images: import an OCI/docker archive, pull from and push to registries, list
    #[command(subcommand, arg_required_else_help = true)]
    Image(image::ImageCmd),
    /// Check layers against their manifests (exit 0 clean, 1 damage found, 2 usage)
    #[command(
        long_about = "Check every file of each layer against the layer's manifest (digests of \
                      each chunk, modes, owners, xattrs), and report each problem on stdout as \
                      `layer L: PATH: what is wrong`. A LAYER is a layer directory, or a chain ID \
                      (sha256:HEX) of the store given with --store. Exit 0: every layer clean; \
                      1: damage found; 2: bad command line.",
        after_help = "Examples:\n    verlay verify /layers/base\n    \
                      verlay verify --store /var/lib/verlay sha256:4f2a...\n    \
                      verlay verify --store /var/lib/verlay --all --format json"
    )]
    Verify(verify::VerifyArgs),
    /// Turn the upper of a live mount into a new layer of the store (writers pause briefly)
    #[command(
        long_about = "Commit the upper layer of a live verlay mount into a new layer of the store: \
                      writers on the mount are paused while the upper is snapshotted (milliseconds), \
                      then the snapshot is translated to OCI whiteouts, hashed and published. \
                      Prints `chain_id sha256:...` and `diff_id sha256:...` on stdout. A missing \
                      store is created.",
        after_help = "Example:\n    verlay commit /c/merged --store /var/lib/verlay --output layer.tar"
    )]
    Commit(commit::CommitCmd),
    /// Run the containerd proxy snapshotter (verlay-snapshotter; see `verlay snapshotter --help`)
    #[command(disable_help_flag = true)]
    Snapshotter(snapshotter::SnapshotterArgs),
    /// Serve podman an additional layer store (eStargz images run lazily; `verlay als serve`)
    #[command(subcommand, arg_required_else_help = true)]
    Als(als::AlsCmd),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    #[command(
        after_help = "Examples:\n    verlay completions bash > /usr/share/bash-completion/completions/verlay\n    \
                      verlay completions zsh > /usr/local/share/zsh/site-functions/_verlay\n    \
                      verlay completions fish > ~/.config/fish/completions/verlay.fish"
    )]
    Completions {
        /// the shell to complete for
        shell: clap_complete::Shell,
    },
}

/// The whole command: argv without argv\[0\], to an exit code. Errors are printed once here.
pub fn main(args: Vec<OsString>) -> ExitCode {
    let Some(at) = subcommand_at(&args) else {
        return mount::main(args);
    };
    if args[at] == "snapshotter" {
        // Its flags are the other binary's: passed on untouched (including --help).
        return snapshotter::exec(args[at + 1..].to_vec());
    }
    let name = command_name(&args[at..]);
    let cli = match Cli::try_parse_from(std::iter::once(OsString::from("verlay")).chain(args)) {
        Ok(c) => c,
        Err(e) => return clap_error(&name, e),
    };
    let g = cli.global;
    match cli.command {
        Sub::Demo => finish("verlay demo", crate::demo::run()),
        Sub::Layer(c) => finish(&name, layer::run(&g, c)),
        Sub::Image(c) => {
            // pull and push report each failed attempt as it happens (warn), not only the last
            if matches!(c, image::ImageCmd::Pull { .. } | image::ImageCmd::Push { .. }) {
                crate::logging::init(false);
            }
            finish(&name, image::run(&g, c))
        }
        Sub::Verify(a) => match verify::run(&g, a) {
            // The scrub's own exit code: 0 clean, 1 damage found.
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                eprintln!("{name}: {e}");
                ExitCode::from(2)
            }
        },
        Sub::Commit(c) => {
            crate::logging::init(false);
            finish(&name, commit::run(&g, c))
        }
        Sub::Snapshotter(a) => snapshotter::exec(a.args),
        Sub::Als(c) => {
            crate::logging::init(false);
            finish(&name, als::run(&g, c))
        }
        Sub::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "verlay", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
    }
}

/// Where the subcommand word is, if argv is a subcommand's: the first word, or the first
/// after shared flags (`verlay --store S layer ls`), which the mount form never uses.
fn subcommand_at(args: &[OsString]) -> Option<usize> {
    let mut i = 0;
    while let Some(w) = args.get(i).and_then(|a| a.to_str()) {
        if SUBCOMMANDS.contains(&w) {
            return Some(i);
        }
        i += match w {
            "-q" | "--quiet" => 1,
            "--store" | "--format" => 2,
            _ if w.starts_with("--store=") || w.starts_with("--format=") => 1,
            _ => return None,
        };
    }
    None
}

/// `verlay layer import` for `layer import ...`: the words naming the subcommand, for
/// messages.
fn command_name(args: &[OsString]) -> String {
    let mut name = String::from("verlay");
    for (i, a) in args.iter().take(2).enumerate() {
        let Some(w) = a.to_str() else { break };
        if w.starts_with('-') || (i == 1 && !matches!(args[0].to_str(), Some("layer" | "image" | "als"))) {
            break;
        }
        name.push(' ');
        name.push_str(w);
    }
    name
}

/// A clap refusal as one `what: why (fix)` line and exit 2; `--help`, `--version` and a bare
/// `verlay layer`/`verlay image` print to stdout and exit 0.
fn clap_error(name: &str, e: clap::Error) -> ExitCode {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            print!("{}", e.render());
            return ExitCode::SUCCESS;
        }
        _ => {}
    }
    let args: Vec<String> = match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(s)) => vec![s.clone()],
        Some(ContextValue::Strings(v)) => v.clone(),
        _ => Vec::new(),
    };
    // `--store <DIR>` reads `--store DIR`, as in the usage lines.
    let args = args.join(", ").replace(['<', '>'], "");
    let why = match e.kind() {
        ErrorKind::MissingRequiredArgument => format!("{args} is required"),
        ErrorKind::UnknownArgument if args.starts_with('-') => format!("unknown option {args}"),
        ErrorKind::UnknownArgument => format!("unexpected argument {args}"),
        _ => {
            let text = e.render().to_string();
            let line = text.lines().next().unwrap_or("bad command line");
            line.strip_prefix("error: ").unwrap_or(line).to_string()
        }
    };
    eprintln!("{name}: {why} (see {name} --help)");
    ExitCode::from(2)
}

/// Print a subcommand's error once; usage errors exit 2, others 1.
pub fn finish(what: &str, r: Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{what}: {e}");
            match e {
                Error::Usage { .. } => ExitCode::from(2),
                _ => ExitCode::from(1),
            }
        }
    }
}

/// `--store DIR` (or `$VERLAY_STORE`), which this subcommand needs.
fn store_dir(g: &Global, cmd: &str) -> Result<PathBuf> {
    g.store.clone().ok_or_else(|| {
        Error::usage(
            "command line",
            "--store DIR is required",
            format!("give --store DIR or set VERLAY_STORE; see {cmd} --help"),
        )
    })
}

/// The store of a command that writes to it: created on first use.
fn store_for_writing(g: &Global, cmd: &str) -> Result<Store> {
    Store::open(&store_dir(g, cmd)?)
}

/// The store of a command that only reads it: a missing store is refused, never created.
fn existing_store_dir(g: &Global, cmd: &str) -> Result<PathBuf> {
    let dir = store_dir(g, cmd)?;
    check_is_store(&dir)?;
    Ok(dir)
}

/// Refuse a directory that is not a layer store.
fn check_is_store(dir: &Path) -> Result<()> {
    if crate::store::is_store(dir) {
        return Ok(());
    }
    Err(Error::usage(
        format!("--store {:?}", dir.display().to_string()),
        "not a verlay layer store (it has no layers/ directory)",
        "pass the directory given to verlay layer import --store, or create the store by \
         importing or pulling into it",
    ))
}

/// A read-only command's opened store.
fn existing_store(g: &Global, cmd: &str) -> Result<Store> {
    Store::open(&existing_store_dir(g, cmd)?)
}

/// Print `v` as one JSON document on stdout.
fn print_json(v: &serde_json::Value) {
    // A Value always serializes.
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> std::result::Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("verlay").chain(args.iter().copied()))
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_subcommand_is_dispatched_to_clap_and_listed() {
        let cmd = Cli::command();
        let names: Vec<&str> = cmd.get_subcommands().map(|c| c.get_name()).collect();
        assert_eq!(names, SUBCOMMANDS, "SUBCOMMANDS must match the clap subcommands");
    }

    #[test]
    fn shared_flags_are_accepted_before_and_after_the_subcommand() {
        for args in [
            &["--store", "/s", "--format", "json", "-q", "layer", "ls"][..],
            &["layer", "ls", "--store=/s", "--format=json", "--quiet"][..],
        ] {
            let c = parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            assert_eq!(c.global.store, Some(PathBuf::from("/s")), "{args:?}");
            assert_eq!(
                (c.global.format, c.global.quiet),
                (Format::Json, true),
                "{args:?}"
            );
            assert!(matches!(
                c.command,
                Sub::Layer(layer::LayerCmd::Ls { no_trunc: false })
            ));
        }
    }

    #[test]
    fn commit_words_and_refusals() {
        let c = parse(&[
            "commit",
            "/m",
            "--store",
            "/s",
            "--parent=sha256:ab",
            "--output",
            "o.tar",
        ])
        .unwrap();
        let Sub::Commit(_) = c.command else {
            panic!("{c:?}")
        };
        assert_eq!(c.global.store, Some(PathBuf::from("/s")));
        // `--` ends the options: a mountpoint may start with a dash.
        assert!(parse(&["commit", "--", "--odd"]).is_ok());
        use clap::error::ErrorKind;
        for (args, kind) in [
            (&["commit"][..], ErrorKind::MissingRequiredArgument),
            (&["commit", "/m", "/n"][..], ErrorKind::UnknownArgument),
            (&["commit", "/m", "--store"][..], ErrorKind::InvalidValue),
            (&["commit", "/m", "--force"][..], ErrorKind::UnknownArgument),
            (
                &["image", "pull", "--tls-verify=maybe", "r"][..],
                ErrorKind::InvalidValue,
            ),
            (
                &["image", "pull", "--timeout", "0", "r"][..],
                ErrorKind::ValueValidation,
            ),
        ] {
            match parse(args) {
                Err(e) => assert_eq!(e.kind(), kind, "{args:?}: {e}"),
                Ok(c) => panic!("{args:?}: {c:?}"),
            }
        }
    }

    #[test]
    fn tls_verify_is_a_flag_with_an_optional_value() {
        for (arg, want) in [("--tls-verify", Some(true)), ("--tls-verify=false", Some(false))] {
            let c = parse(&["image", "pull", arg, "r"]).unwrap();
            let Sub::Image(image::ImageCmd::Pull {
                registry, reference, ..
            }) = c.command
            else {
                panic!("{arg}")
            };
            assert_eq!(
                (registry.options(None).tls_verify, reference.as_str()),
                (want, "r")
            );
        }
    }

    #[test]
    fn only_subcommand_words_leave_the_mount_form() {
        let os = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        for (args, want) in [
            (&["layer", "ls"][..], Some(0)),
            (&["--store", "/s", "-q", "layer", "ls"][..], Some(3)),
            (&["--format=json", "verify", "--all"][..], Some(1)),
            (&["-o", "lowerdir=/l", "/m"][..], None),
            (&["-f", "-o", "lowerdir=/l", "layer"][..], None),
            (&["overlay", "/m", "-o", "lowerdir=/l"][..], None),
            (&["--store", "/s"][..], None),
            (&[][..], None),
        ] {
            assert_eq!(subcommand_at(&os(args)), want, "{args:?}");
        }
    }

    #[test]
    fn command_names_in_messages() {
        let os = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            command_name(&os(&["layer", "import", "x"])),
            "verlay layer import"
        );
        assert_eq!(command_name(&os(&["layer", "--store", "s"])), "verlay layer");
        assert_eq!(command_name(&os(&["commit", "/m"])), "verlay commit");
        assert_eq!(command_name(&os(&["verify", "--all"])), "verlay verify");
    }
}
