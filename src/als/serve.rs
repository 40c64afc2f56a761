//! Mount the additional layer store and serve it in the foreground until it is unmounted
//! (`fusermount3 -u MNT`, `umount MNT`) or signalled (SIGTERM, SIGINT, SIGHUP unmount it).

use std::path::PathBuf;
use std::sync::Arc;

use fuser::{Config, MountOption, SessionACL};
use tracing::info;

use super::fuse::AlsFs;
use super::Als;
use crate::error::{Error, Result};
use crate::registry::Options;

/// FUSE worker threads: lookups block while a reference is pulled, and reads while chunks
/// are fetched; a few threads keep the other layers answering meanwhile.
const THREADS: usize = 4;

/// What `verlay als serve` was given.
#[derive(Debug)]
pub struct ServeArgs {
    /// the verlay store lazy pulls go into
    pub store: PathBuf,
    /// where to mount (the path storage.conf's `additionallayerstores` names, with `:ref`)
    pub mountpoint: PathBuf,
    /// how to reach registries
    pub registry: Options,
    /// a file to write this process's PID into once the mount is live
    pub pid_file: Option<PathBuf>,
}

fn config() -> Config {
    let mut cfg = Config::default();
    let mut opts = vec![
        MountOption::FSName("verlay-als".into()),
        MountOption::Subtype("verlay-als".into()),
        MountOption::DefaultPermissions,
    ];
    // As root (also root of podman's user namespace, `podman unshare`): setuid binaries and
    // device nodes of the layers work in containers, as with a layer on disk.
    if rustix::process::geteuid().is_root() {
        opts.push(MountOption::Suid);
        opts.push(MountOption::Dev);
    }
    cfg.mount_options = opts;
    // podman's overlay mount and the containers' processes are other users
    cfg.acl = SessionACL::All;
    cfg.n_threads = Some(THREADS);
    cfg.clone_fd = true;
    cfg.io_uring = fuser::IoUringMode::Off;
    cfg
}

/// Mount and serve until unmounted.
pub fn serve(a: ServeArgs) -> Result<()> {
    // the store is created (and its lock checked) before mounting: a bad --store fails here
    drop(crate::store::Store::open(&a.store)?);
    let store = a
        .store
        .canonicalize()
        .map_err(|e| Error::io("als.store", &a.store, e))?;
    let als = Arc::new(Als::new(store, a.registry));
    let mut session = fuser::Session::new(AlsFs(als), &a.mountpoint, &config()).map_err(|e| {
        Error::io(
            "mount",
            &a.mountpoint,
            std::io::Error::other(format!(
                "cannot mount: {e} (check that /dev/fuse exists and fusermount3 is installed)"
            )),
        )
    })?;
    crate::mount::unmount_on_signals(&mut session, &a.mountpoint)?;
    if let Some(p) = &a.pid_file {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .map_err(|e| Error::io("als.pid_file", p, e))?;
    }
    info!(mountpoint = %a.mountpoint.display(), "additional layer store mounted");
    session
        .run()
        .map_err(|e| Error::io("fuse session", &a.mountpoint, e))?;
    info!("additional layer store unmounted");
    Ok(())
}
