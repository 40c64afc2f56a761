//! The mount form's command line: fuse-overlayfs-compatible argv and `-o` option strings,
//! turned into typed [`Command`]s. The subcommands (`verlay layer ...`) are [`crate::cmd`]'s,
//! which sends every other argv here unchanged.
//!
//! This module owns the syntax only. It is pure: no syscalls, no filesystem access, no
//! logging. Relative paths are joined to the `cwd` the caller passes in, lexically and
//! without resolving symlinks (podman hands us `l/XXXX` symlinks relative to its graph
//! root, and they must keep meaning what they meant in podman's working directory).
//! Whether the paths exist, are directories or overlap is [`crate::config`]'s job.
//!
//! Two command forms are accepted, because podman, containerd and `mount.fuse3` call
//! fuse-overlayfs in both and must be able to call us unchanged:
//!
//! - `verlay [-f] [-d] -o lowerdir=L1:L2,upperdir=U,workdir=W[,OPTION...] MOUNTPOINT`
//! - `verlay SOURCE MOUNTPOINT -o OPTIONS` (what `mount -t fuse3.verlay` runs)
//!
//! Option strings follow libfuse's `fuse_opt` rules (split on unescaped `,`, a backslash
//! escapes the next character) and kernel overlayfs's lowerdir rules (split on unescaped
//! `:`). Unknown option names are tolerated and reported back in
//! [`OverlayOptions::ignored`], as fuse-overlayfs does; malformed values of known
//! options are errors.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::Error;

/// Exit status for success, including `--help` and `--version`.
pub const EXIT_OK: u8 = 0;
/// Exit status when the mount or the filesystem failed at run time.
pub const EXIT_FAILURE: u8 = 1;
/// Exit status for a bad command line or a configuration rejected before mounting.
pub const EXIT_USAGE: u8 = 2;

/// What the user asked verlay to do.
// Built once per process and matched once, so the size gap between `Mount` and the unit
// variants costs nothing; boxing would only make every caller unbox.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Mount an overlay.
    Mount(MountArgs),
    /// `-h` / `--help`: print [`HELP`].
    Help,
    /// `-V` / `--version`.
    Version,
}

/// Arguments of the mount command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountArgs {
    /// `-f`: stay in the foreground. Also set by `-d` and `-o debug`, as libfuse does.
    pub foreground: bool,
    /// `-d`, `--debug` or `-o debug`: log every request.
    pub debug: bool,
    /// The SOURCE word of the `verlay SOURCE MOUNTPOINT` form (`mount.fuse3` passes the
    /// fstab device column); it has no meaning beyond being shown in the mount table.
    pub source: Option<String>,
    /// Where to mount; joined to the cwd when relative.
    pub mountpoint: PathBuf,
    /// Everything given with `-o`.
    pub opts: OverlayOptions,
}

/// The `-o` options, typed. Paths are absolute (joined to the cwd), never canonicalized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayOptions {
    /// Lower layers, leftmost = top (searched first), as in kernel overlayfs.
    pub lowerdirs: Vec<PathBuf>,
    /// The writable layer; `None` (together with `workdir`) means a read-only mount.
    pub upperdir: Option<PathBuf>,
    /// Scratch directory on the upper's filesystem, for copy-up and whiteouts.
    pub workdir: Option<PathBuf>,
    /// `volatile`: skip every fsync, as kernel overlayfs's `volatile`. Implies `!fsync`.
    pub volatile: bool,
    /// Whether to fsync the upper. `fsync=0` or `volatile` turn it off; default on.
    pub fsync: bool,
    /// `volatile_recover`: accept an upper whose volatile marker an unclean stop left
    /// behind (remove the marker and mount).
    pub volatile_recover: bool,
    /// `uidmapping=`: container-to-host uid ranges.
    pub uid_mappings: Vec<IdMapping>,
    /// `gidmapping=`: container-to-host gid ranges.
    pub gid_mappings: Vec<IdMapping>,
    /// `squash_to_root`: show every file as owned by root; chown is accepted and dropped.
    pub squash_to_root: bool,
    /// `squash_to_uid=N`: show every file as owned by uid N.
    pub squash_to_uid: Option<u32>,
    /// `squash_to_gid=N`: show every file as owned by gid N.
    pub squash_to_gid: Option<u32>,
    /// `timeout=SECONDS`: kernel cache timeout for entries and attributes.
    pub timeout: Option<Duration>,
    /// Worker threads: `threaded=N` (N >= 2), `threaded=0` or `-s` give `Some(1)`;
    /// `threaded=1` (fuse-overlayfs's "multi-threaded, default count") gives `None`.
    pub threads: Option<usize>,
    /// `verify=on|off|require`: checking lower files against layer manifests.
    pub verify: VerifyMode,
    /// `redirect_dir=on|off|follow|nofollow`, kernel overlayfs's directory rename mode.
    pub redirect_dir: RedirectDir,
    /// `static_nlink`: report nlink 1 for directories instead of counting subdirectories.
    pub static_nlink: bool,
    /// `noacl`: do not offer POSIX ACLs to the kernel.
    pub noacl: bool,
    /// `noxattrs=1`: refuse extended attributes (ENOTSUP).
    pub noxattrs: bool,
    /// `writeback=0|1`: the kernel's FUSE writeback cache for writes the daemon serves
    /// (default off; docs/ordering.md, "Writeback cache", says what it changes).
    pub writeback: bool,
    /// `passthrough=0|1`: FUSE passthrough for open upper files (root only); default off.
    pub passthrough: bool,
    /// `io_uring=auto|on|off`: FUSE over io_uring (Linux 6.14+, enable_uring=Y).
    pub io_uring: IoUring,
    /// `fast_ino=0|1`: fuse-overlayfs's cheaper inode numbering; accepted for
    /// compatibility, the union decides whether it matters.
    pub fast_ino: bool,
    /// `xattr_permissions=0|1|2`: keep owner and mode in an xattr (1: `trusted.`,
    /// 2: `user.`) instead of real chown/chmod, as fuse-overlayfs does.
    pub xattr_permissions: u8,
    /// Kernel and FUSE mount options to pass through, unescaped, in the order given
    /// (e.g. `nodev`, `allow_other`, `fsname=x`, `context=...`).
    pub fuse_options: Vec<String>,
    /// Options whose name verlay does not know, as given. The caller logs each as
    /// "unknown option ignored: X" and carries on, as fuse-overlayfs does.
    pub ignored: Vec<String>,
}

impl Default for OverlayOptions {
    fn default() -> Self {
        OverlayOptions {
            lowerdirs: Vec::new(),
            upperdir: None,
            workdir: None,
            volatile: false,
            fsync: true,
            volatile_recover: false,
            uid_mappings: Vec::new(),
            gid_mappings: Vec::new(),
            squash_to_root: false,
            squash_to_uid: None,
            squash_to_gid: None,
            timeout: None,
            threads: None,
            verify: VerifyMode::default(),
            redirect_dir: RedirectDir::default(),
            static_nlink: false,
            noacl: false,
            noxattrs: false,
            writeback: false,
            passthrough: false,
            io_uring: IoUring::default(),
            fast_ino: false,
            xattr_permissions: 0,
            fuse_options: Vec::new(),
            ignored: Vec::new(),
        }
    }
}

impl OverlayOptions {
    /// True without an upper layer: nothing can be written.
    pub fn is_read_only(&self) -> bool {
        self.upperdir.is_none()
    }
}

/// One range of an id mapping: ids `container..container+len` inside the mount are
/// `host..host+len` on disk. Same order as `/proc/self/uid_map` and podman's
/// `uidmapping=` strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdMapping {
    /// First id as seen through the mount.
    pub container: u32,
    /// First id as stored in the layers.
    pub host: u32,
    /// Number of ids in the range; never 0.
    pub len: u32,
}

/// How lower files are checked against their layer manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VerifyMode {
    /// Check layers that have a manifest; serve layers without one as they are.
    #[default]
    On,
    /// Never check.
    Off,
    /// Refuse to mount a lower layer that has no manifest.
    Require,
}

/// Kernel overlayfs's `redirect_dir=` modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RedirectDir {
    /// Renaming a merged directory fails with EXDEV; existing redirects are not followed.
    #[default]
    Off,
    /// Follow redirects found in the layers, never create new ones.
    Follow,
    /// Neither follow nor create redirects.
    NoFollow,
    /// Create and follow redirects.
    On,
}

/// `io_uring=` modes: how requests travel between the kernel and the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoUring {
    /// Through io_uring queues when the kernel offers them (`FUSE_OVER_IO_URING` in
    /// INIT, i.e. /sys/module/fuse/parameters/enable_uring is Y), else /dev/fuse.
    Auto,
    /// Through io_uring queues, or the mount fails.
    On,
    /// Through /dev/fuse only. The default: on the 2-CPU machines measured (idle,
    /// docs/benchmarks.md, 2026-12-07 23:50) io_uring was slower in every loop of
    /// bench/uring-ab.py and in random writes, so an admin who sets enable_uring for another
    /// FUSE filesystem must not silently slow verlay down.
    #[default]
    Off,
}

mod help;
mod options;
#[cfg(test)]
mod tests;

pub use help::HELP;
use help::{RESERVED_SUBCOMMANDS, USAGE_HINT};
use options::{parse_options, resolve, HelperFlags};
pub use options::{upper_work_pair, MAX_LOWERS, MAX_MAPPINGS, MAX_THREADS, MAX_TIMEOUT_SECS};

/// Parse the command line. `args` excludes argv\[0\]; `cwd` anchors relative paths.
pub fn parse(args: Vec<OsString>, cwd: &Path) -> Result<Command, Error> {
    // Subcommands are dispatched before this parser (crate::cmd); reserved words are refused
    // so that a later version can add them without changing what an old command line means.
    if let Some(first) = args.first().and_then(|a| a.to_str()) {
        if RESERVED_SUBCOMMANDS.contains(&first) {
            return Err(Error::usage(
                format!("verlay {first}"),
                "not implemented in this version",
                "see verlay --help for what this version can do",
            ));
        }
    }

    let mut foreground = false;
    let mut debug = false;
    let mut single_threaded = false;
    let mut help = false;
    let mut version = false;
    let mut option_strings: Vec<OsString> = Vec::new();
    let mut positionals: Vec<OsString> = Vec::new();
    // Deferred so that `--help` or `--version` anywhere still wins, as in libfuse.
    let mut first_error: Option<Error> = None;

    let mut args = args.into_iter();
    let mut only_positionals = false;
    while let Some(arg) = args.next() {
        let bytes = arg.as_bytes();
        if only_positionals || !bytes.starts_with(b"-") || bytes == b"-" {
            positionals.push(arg);
            continue;
        }
        match bytes {
            b"--" => only_positionals = true,
            b"-h" | b"--help" => help = true,
            b"-V" | b"--version" => version = true,
            b"-f" | b"--foreground" => foreground = true,
            // libfuse's -d also keeps the process in the foreground.
            b"-d" | b"--debug" => {
                debug = true;
                foreground = true;
            }
            b"-s" => single_threaded = true,
            b"-o" => match args.next() {
                Some(value) => option_strings.push(value),
                None => {
                    first_error.get_or_insert_with(|| {
                        Error::usage("-o", "needs a value", "write -o OPTIONS, e.g. -o lowerdir=/l1")
                    });
                }
            },
            _ if bytes.starts_with(b"-o") => {
                option_strings.push(OsString::from_vec(bytes[2..].to_vec()));
            }
            _ => {
                first_error.get_or_insert_with(|| {
                    Error::usage(
                        format!("flag {:?}", arg.to_string_lossy()),
                        "unknown flag",
                        USAGE_HINT,
                    )
                });
            }
        }
    }

    if help {
        return Ok(Command::Help);
    }
    if version {
        return Ok(Command::Version);
    }
    if let Some(err) = first_error {
        return Err(err);
    }

    let (source, mountpoint) = source_and_mountpoint(positionals)?;
    let mountpoint = resolve(cwd, mountpoint.into_vec());

    let mut helper = HelperFlags::default();
    let mut opts = parse_options(&option_strings, cwd, &mut helper)?;
    if helper.debug {
        debug = true;
        foreground = true;
    }
    if single_threaded {
        opts.threads = Some(1);
    }

    Ok(Command::Mount(MountArgs {
        foreground,
        debug,
        source,
        mountpoint,
        opts,
    }))
}

/// The positional arguments: `MOUNTPOINT` or `SOURCE MOUNTPOINT` (the fuse-overlayfs and
/// mount.fuse3 forms); the mountpoint not empty.
fn source_and_mountpoint(positionals: Vec<OsString>) -> Result<(Option<String>, OsString), Error> {
    let mut positionals = positionals.into_iter();
    let (source, mountpoint) = match (positionals.next(), positionals.next(), positionals.next()) {
        (None, _, _) => {
            return Err(Error::usage(
                "MOUNTPOINT",
                "missing",
                format!("give the directory to mount on; {USAGE_HINT}"),
            ))
        }
        (Some(mountpoint), None, _) => (None, mountpoint),
        (Some(source), Some(mountpoint), None) => (Some(source.to_string_lossy().into_owned()), mountpoint),
        (Some(_), Some(_), Some(extra)) => {
            return Err(Error::usage(
                format!("argument {:?}", extra.to_string_lossy()),
                "unexpected; expected at most SOURCE and MOUNTPOINT",
                format!("quote paths with spaces, put options after -o; {USAGE_HINT}"),
            ))
        }
    };
    if mountpoint.is_empty() {
        return Err(Error::usage(
            "MOUNTPOINT",
            "empty",
            "give the directory to mount on",
        ));
    }
    Ok((source, mountpoint))
}
