//! `verlay-snapshotter --root DIR --address SOCK`: containerd's proxy snapshotter.
//! `verlay snapshotter ...` runs this binary (it sits beside `verlay`).
//!
//! Exit codes: 0 after SIGTERM/SIGINT, 1 on a runtime failure, 2 on a usage error.
use std::path::PathBuf;
use std::process::ExitCode;

use containerd_snapshots::tonic::transport::Server;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tracing::info;
use verlay_snapshotter::error::Error;
use verlay_snapshotter::service::Service;
use verlay_snapshotter::snapshots::Snapshots;

const HELP: &str = "\
usage: verlay snapshotter --root DIR --address SOCK [--plain-http] [-d]

Serve containerd's snapshots API on the unix socket SOCK, keeping snapshots under DIR.
containerd config:
  [proxy_plugins.verlay]
    type = \"snapshot\"
    address = \"SOCK\"
Mounts are of type fuse3.verlay: `verlay` must be in the PATH of containerd and ctr.
Commit fsyncs and seals each layer (DIR/snapshots/ID/fs.verlay-manifest) before recording it.
Remote snapshotter: a Prepare whose labels name an eStargz layer (`ctr-remote image rpull
--snapshotter NAME`, or CRI) records it lazily in DIR/store (its TOC only) and answers
\"already exists\", so containerd does not download it; reads fetch and verify chunks.

  --root DIR       snapshot directories and metadata.redb (created if missing)
  --address SOCK   the unix socket to listen on (a stale socket file is replaced)
  --plain-http     speak plain HTTP to registries for remote snapshots (loopback
                   registries get plain HTTP without it)
  -d, --debug      log every call (RUST_LOG overrides; VERLAY_LOG_FILE sends logs to a file)
";

struct Args {
    root: PathBuf,
    address: PathBuf,
    plain_http: bool,
    debug: bool,
}

fn parse() -> Result<Option<Args>, Error> {
    let mut root = None;
    let mut address = None;
    let mut debug = false;
    let mut plain_http = false;
    let mut args = std::env::args_os().skip(1);
    while let Some(a) = args.next() {
        let a = a.to_string_lossy().into_owned();
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        let mut value = |what: &str| {
            inline
                .clone()
                .map(PathBuf::from)
                .or_else(|| args.next().map(PathBuf::from))
                .ok_or_else(|| Error::usage(what.to_string(), "needs a value", format!("write {what} PATH")))
        };
        match flag.as_str() {
            "--root" => root = Some(value("--root")?),
            "--address" => address = Some(value("--address")?),
            "-d" | "--debug" => debug = true,
            "--plain-http" => plain_http = true,
            "-h" | "--help" => {
                print!("{HELP}");
                return Ok(None);
            }
            "-V" | "--version" => {
                println!("verlay-snapshotter {}", env!("CARGO_PKG_VERSION"));
                return Ok(None);
            }
            _ => {
                return Err(Error::usage(
                    format!("argument {a:?}"),
                    "not understood",
                    "see --help",
                ))
            }
        }
    }
    let missing = |w: &str| Error::usage(w.to_string(), "is required", "see --help");
    let cwd = std::env::current_dir().unwrap_or_default();
    Ok(Some(Args {
        root: cwd.join(root.ok_or_else(|| missing("--root"))?),
        address: cwd.join(address.ok_or_else(|| missing("--address"))?),
        plain_http,
        debug,
    }))
}

fn init_logging(debug: bool) {
    verlay::logging::init_with_default(if debug {
        "verlay_snapshotter=debug,verlay=info"
    } else {
        "verlay_snapshotter=info,verlay=warn"
    });
}

async fn serve(args: Args) -> Result<(), Error> {
    let mut snapshots = Snapshots::open(&args.root)?;
    snapshots.set_registry_options(verlay::registry::client::Options {
        plain_http: args.plain_http,
        ..Default::default()
    });
    // A socket file left by a killed snapshotter refuses the bind; the root's lock (taken
    // above) says no other snapshotter of this root is alive to own it.
    match std::fs::remove_file(&args.address) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(Error::io("serve.remove_stale_socket", &args.address, e))
        }
        _ => {}
    }
    let listener =
        UnixListener::bind(&args.address).map_err(|e| Error::io("serve.bind", &args.address, e))?;
    info!(address = %args.address.display(), "serving containerd snapshots API");
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        info!("signal received: stopping");
    };
    let r = Server::builder()
        .add_service(containerd_snapshots::server(std::sync::Arc::new(Service::new(
            snapshots,
        ))))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await;
    let _ = std::fs::remove_file(&args.address);
    r.map_err(|e| Error::io("serve", &args.address, std::io::Error::other(e)))
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(Some(a)) => a,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("verlay snapshotter: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(args.debug);
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("verlay snapshotter: starting the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(serve(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("verlay snapshotter: {e}");
            match e {
                Error::Usage { .. } => ExitCode::from(2),
                _ => ExitCode::from(1),
            }
        }
    }
}
