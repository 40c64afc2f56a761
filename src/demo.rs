//! `verlay demo`: mounts bundled example layers and shows a copy-up and a whiteout.
use crate::error::Result;

/// Run the demo.
pub fn run() -> Result<()> {
    crate::error::errno(libc::ENOSYS)
}
