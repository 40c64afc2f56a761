//! What the integration tests share (`mod common;` in every tests/*.rs; one test binary each,
//! so each uses a part and the rest is allowed to be dead code):
//!
//! - [`mount`]: the one mount guard, [`Mount`] (unmounts and ends its daemon by PID on Drop,
//!   also when a test panics), and [`Launch`], how a FUSE daemon is started;
//! - [`rig`]: the one rig, [`Rig`] (lower, upper, work and mount dirs, `-o` options, mount),
//!   and small helpers (the binary, e2e scripts, `dir_names`, `scratch`, `as_user`);
//! - [`cmd`]: verlay run as a command (`Out`, bounded wait) and the test image;
//! - [`proc`]: the mount table and the process table (mountinfo, daemon PIDs, liveness);
//! - [`disk`]: loop devices and filesystems on them; [`tools`]: installed tools, `run`;
//! - the differential machinery of tests/mount.rs (kernel overlayfs is the oracle, the subject
//!   is compared with it): [`layers`] (layers from a compact spec, materialized in kernel and
//!   OCI form), [`generate`] (seeded random layers), [`pair`] (reference and subject on
//!   identical layers), [`tree`] (snapshots and a path-by-path diff), [`util`]. It never decides
//!   what is correct by itself: whatever kernel overlayfs shows on the same layers is correct.
//!
//! Layer spec: entries separated by `;` or newlines, paths relative to the layer root, missing
//! parents created as 0755 dirs. A path component `NAME~N` is NAME padded with `x` to N bytes.
//!
//! ```text
//! f a=hello            regular file with content (no `=`: empty)
//! z big 1048576 4096:abc 65536:xyz   sparse file: size, then offset:content chunks
//! d sub 0755           directory (mode optional)
//! s link->target       symlink
//! h hl=a               hard link hl to a (same layer)
//! p fifo               fifo
//! c null 1:3           char device
//! w gone               whiteout, char 0/0 in both materializations
//! W gone2              whiteout, OCI `.wh.gone2` file for the subject
//! o dir                opaque dir, trusted.overlay.opaque=y in both
//! O dir2               opaque dir, OCI `.wh..wh..opq` for the subject
//! x a user.k=v         xattr
//! m a 4755 1000:1000   mode (or `-`) and optional owner uid:gid
//! t a 1500000000.5     atime and mtime (applied after the fixed mtimes every entry gets)
//! ```
#![allow(dead_code, unused_imports, unused_macros)]

/// Skip the test (return from it) unless every tool is installed.
macro_rules! require_tools {
    ($($tool:expr),+) => {
        for t in [$($tool),+] {
            if !$crate::common::tools::have(t) {
                eprintln!("SKIP {}: `{t}` is not installed", module_path!());
                return;
            }
        }
    };
}

pub mod cmd;
pub mod disk;
pub mod mount;
pub mod proc;
pub mod registry;
pub mod rig;
// Only std, so the snapshotter crate's tests include it too.
pub mod tools;

// The differential machinery calls libc directly (xattrs, mknod, mount(2), unshare); each
// unsafe block says why it is sound.
#[allow(unsafe_code)]
pub mod generate;
#[allow(unsafe_code)]
pub mod layers;
#[allow(unsafe_code)]
pub mod pair;
#[allow(unsafe_code)]
pub mod tree;
#[allow(unsafe_code)]
pub mod util;

pub use disk::{LoopDev, LoopFs};
pub use generate::*;
pub use layers::*;
pub use mount::{Launch, Mount, Stop, WAIT};
pub use pair::*;
pub use proc::{daemon_pids, is_mounted};
pub use rig::{as_user, dir_names, e2e_script, scratch, sh, verlay_bin, Rig};
pub use tools::{have, run};
pub use tree::*;
pub use util::*;
