//! `verlay als serve`: arguments. The work is [`crate::als`]'s.
use std::path::PathBuf;

use clap::Subcommand;

use super::image::RegistryArgs;
use super::{store_dir, Global};
use crate::als::serve::{serve, ServeArgs};
use crate::error::Result;

#[derive(Debug, Subcommand)]
pub enum AlsCmd {
    /// Serve podman an additional layer store: eStargz images run without pulling their layers
    #[command(
        long_about = "Mount a read-only additional layer store for podman (containers/storage's \
                      `additionallayerstores`) at MOUNTPOINT and serve it in the foreground. A \
                      lookup of MOUNTPOINT/<base64 ref>/<layer digest> pulls the image lazily into \
                      --store (manifest, config, TOCs); the layer's diff/ then reads its files on \
                      demand, every chunk verified against the TOC the manifest names. Unmount \
                      (fusermount3 -u MOUNTPOINT) or SIGTERM to stop. Rootless: run it with \
                      `podman unshare`. VERLAY_LAZY_BACKGROUND=off keeps it from fetching whole \
                      layers in the background.",
        after_help = "Example:\n    \
            verlay als serve --store /var/lib/verlay-als /var/lib/verlay-als/store &\n    \
            # storage.conf: [storage.options] additionallayerstores = [\"/var/lib/verlay-als/store:ref\"]\n    \
            podman run --tls-verify=false 127.0.0.1:5000/app:1-esgz cat /etc/motd"
    )]
    Serve {
        #[command(flatten)]
        registry: RegistryArgs,
        /// write this process's PID to FILE once the mount is live
        #[arg(long, value_name = "FILE")]
        pid_file: Option<PathBuf>,
        /// where to mount (an existing directory)
        mountpoint: PathBuf,
    },
}

/// Run one `verlay als` subcommand.
pub fn run(g: &Global, c: AlsCmd) -> Result<()> {
    match c {
        AlsCmd::Serve {
            registry,
            pid_file,
            mountpoint,
        } => {
            let store = store_dir(g, "verlay als serve")?;
            let mut opts = registry.options(None);
            // a lookup waits for the pull: shorter bounds than `image pull`'s defaults
            // (crate::als::PULL_TIMEOUT, PULL_RETRIES) where the command line left those
            if opts.timeout == crate::registry::Options::default().timeout {
                opts.timeout = crate::als::PULL_TIMEOUT;
            }
            if opts.retries == crate::registry::Options::default().retries {
                opts.retries = crate::als::PULL_RETRIES;
            }
            serve(ServeArgs {
                store,
                mountpoint,
                registry: opts,
                pid_file,
            })
        }
    }
}
