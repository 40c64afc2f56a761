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
    /// `writeback=0|1`: accepted for fuse-overlayfs compatibility and ignored: verlay never
    /// turns on the kernel's writeback cache (docs/benchmarks.md says why).
    pub writeback: bool,
    /// `passthrough=0|1`: FUSE passthrough for open upper files (root only); default off.
    pub passthrough: bool,
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
            writeback: true,
            passthrough: false,
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

/// Subcommand words reserved so that a later version can add them without changing what an
/// old command line means (none at the moment).
const RESERVED_SUBCOMMANDS: &[&str] = &[];

/// Bare kernel/FUSE mount options passed through to the mount.
const FUSE_FLAG_OPTIONS: &[&str] = &[
    "dev",
    "nodev",
    "suid",
    "nosuid",
    "exec",
    "noexec",
    "atime",
    "noatime",
    "diratime",
    "nodiratime",
    "relatime",
    "norelatime",
    "strictatime",
    "nostrictatime",
    "lazytime",
    "nolazytime",
    "ro",
    "rw",
    "sync",
    "async",
    "dirsync",
    "allow_other",
    "allow_root",
    "auto_unmount",
    "default_permissions",
    "kernel_cache",
    "auto_cache",
];

/// `name=value` kernel/FUSE mount options passed through to the mount.
const FUSE_VALUE_OPTIONS: &[&str] = &[
    "max_read",
    "max_write",
    "fsname",
    "subtype",
    "context",
    "fscontext",
    "defcontext",
    "rootcontext",
];

/// Options that only mean something to mount(8) and fstab. `mount.fuse3` may leave them
/// in the option string; they are accepted and have no effect (not even a log line).
const FSTAB_ONLY_OPTIONS: &[&str] = &[
    "defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group", "_netdev", "nofail",
];

/// `verlay --help`.
pub const HELP: &str = "\
verlay: a FUSE overlay filesystem with kernel-overlayfs semantics, verified layers
and an ordered upper layer. A drop-in replacement for fuse-overlayfs.

USAGE:
    verlay [-f] [-d] -o lowerdir=L1[:L2...][,upperdir=U,workdir=W][,OPTION...] MOUNTPOINT
    verlay SOURCE MOUNTPOINT -o OPTIONS      (the form mount -t fuse3.verlay runs)
    verlay demo                              (mount throwaway layers to try verlay)
    verlay layer|image|verify ...            (the layer store and registries, see below)
    verlay snapshotter --root DIR --address SOCK   (containerd proxy snapshotter; --help)
    verlay commit MOUNTPOINT --store DIR [--parent CHAIN_ID] [--output layer.tar]
                                             (the upper of a live mount becomes a new
                                             layer of the store; writers pause briefly;
                                             prints its chain ID and diffID)
    verlay completions bash|zsh|fish         (a shell completion script)
    verlay --help | --version
    verlay SUBCOMMAND --help                 (what it does, with examples)

    -o may be given several times, anywhere, and glued (-oOPTIONS). SOURCE is any word
    (e.g. `overlay`); it is only shown in the mount table. Unmount with
    `fusermount3 -u MOUNTPOINT` (or `umount MOUNTPOINT` as root).

FLAGS:
    -f, --foreground    stay in the foreground
    -d, --debug         log every request (implies -f, as in libfuse); same as -o debug
    -s                  single-threaded; same as -o threaded=0
    -o OPTIONS          comma-separated mount options, see below
    -h, --help          print this help
    -V, --version       print the version
    --                  everything after it is SOURCE / MOUNTPOINT

OPTION SYNTAX:
    Options are separated by `,`. A backslash escapes the next character: `\\,` is a
    comma inside a value, `\\:` a colon inside one lowerdir path, `\\\\` a backslash.
    Empty options (`,,`, leading or trailing `,`) are ignored. Relative paths are taken
    from the current directory; symlinks in them are kept as given.

LAYERS:
    lowerdir=L1:L2:...  read-only layers, L1 on top. Required. Repeating lowerdir=
                        replaces the list.
    lowerdir+=L         append one lower layer below the others (repeatable; the path
                        is not split on `:`).
    upperdir=U          writable layer. Needs workdir. Without upperdir and workdir the
                        mount is read-only.
    workdir=W           scratch directory on the same filesystem as U, not inside U
                        (nor U inside W). It must be empty or hold only overlayfs's own
                        entries: work, index, incompat.

DURABILITY:
    fsync=0|1           fsync the upper layer (default 1). fsync=0 trades crash safety
                        for speed: no sync at all, fsync from programs succeeds at once.
    volatile            fsync=0, plus kernel overlayfs's marker workdir/work/incompat/volatile:
                        removed (after one syncfs) at a clean unmount; a mount that finds
                        it after an unclean stop (daemon killed, crash) refuses.
    volatile_recover    accept such an upper as it is: remove the marker and mount.
    writeback=0|1       accepted for fuse-overlayfs compatibility; verlay never lets
                        the kernel hold dirty pages of the upper (writes reach the
                        daemon, or the upper file directly with passthrough).

OWNERSHIP:
    uidmapping=C:H:L[:C:H:L...]
                        container uid C..C+L is host uid H..H+L on disk. A leading `:`
                        is allowed (podman sends one). Ranges may not overlap.
    gidmapping=C:H:L[:C:H:L...]
                        the same for gids.
    squash_to_root      show every file as owned by root; chown succeeds and is dropped.
    squash_to_uid=N     show every file as owned by uid N.
    squash_to_gid=N     show every file as owned by gid N.
    xattr_permissions=0|1|2
                        keep owner and mode in an xattr instead of chown/chmod:
                        0 off (default), 1 trusted.overlay.override_stat,
                        2 user.containers.override_stat (rootless).

LAYER VERIFICATION:
    verify=on|off|require
                        on (default): check lower files that a layer manifest lists,
                        on first read; a mismatch is EIO, never wrong data.
                        off: never check. require: refuse layers without a manifest.

BEHAVIOUR:
    redirect_dir=off|follow|nofollow|on
                        kernel overlayfs's directory rename mode (default off: renaming
                        a merged directory fails with EXDEV and tools fall back to copy).
    static_nlink        report nlink 1 for directories (cheaper, like fuse-overlayfs).
    noacl               do not support POSIX ACLs.
    noxattrs=0|1        1: refuse extended attributes.
    passthrough=0|1     1: as root, reads and writes of open upper files go straight to
                        the upper file in the kernel (FUSE passthrough): near-kernel write
                        speed, but writes through files already open can then be neither
                        refused after a failed fsync nor paused by verlay commit (which
                        refuses while such files are open). 0 (default): every write
                        goes through the daemon.
    timeout=SECONDS     how long the kernel may cache names and attributes (e.g. 1.5).
    threaded=N          N worker threads (at most 256); 0 single-threaded; 1 the default count.
    fast_ino=0|1        accepted for fuse-overlayfs compatibility.
    debug               same as -d.

PASSED TO THE MOUNT:
    dev nodev suid nosuid exec noexec atime noatime diratime nodiratime relatime
    norelatime strictatime nostrictatime lazytime nolazytime ro rw sync async dirsync
    allow_other allow_root auto_unmount default_permissions kernel_cache auto_cache
    max_read=N max_write=N fsname=S subtype=S context=S fscontext=S defcontext=S
    rootcontext=S

    fstab-only options (defaults auto noauto user nouser users owner group _netdev
    nofail comment=... x-...) are accepted and have no effect. Any other option name is
    ignored with a warning, as fuse-overlayfs does; a known option with a bad value is
    an error.

LAYER STORE AND REGISTRIES:
    verlay layer import --store S [--parent C] [--diff-id D] [--fsync-each] TAR
                        import a layer tarball (tar, gzip, zstd); prints its chain ID
    verlay layer path|ls|seal ...  see `verlay layer --help`
    verlay image import --store S [--ref R] [--name N] OCI-DIR|OCI-TAR|DOCKER-TAR
                        import an image; prints the lowerdir= value that mounts it
    verlay image pull --store S [--plain-http] [--retries N] [--timeout SECS] REF
                        pull REF (HOST[:PORT]/NAME[:TAG|@DIGEST]) from a registry over the
                        OCI distribution API; resumes an interrupted pull; prints lowerdir=
    verlay image push --store S [--image NAME] [--plain-http] [--retries N]
                      [--timeout SECS] [--chunk-size BYTES] REF
                        push an image the store holds (pulled or imported) to REF
    verlay image ls --store S      the images the store can push
    verlay verify [--store S] LAYER... | verlay verify --store S --all
                        check layers against their manifests (exit 0 clean, 1 damage)
    Every subcommand takes --store DIR (or $VERLAY_STORE), --quiet (no progress or
    summary on stderr) and --format text|json (json for layer ls, image ls and verify).
    Commands that write to a store (layer import, image import, image pull, commit)
    create a missing one; the others refuse it.
    Registries are spoken to over HTTPS (plain HTTP with --plain-http, and for 127.0.0.1
    and localhost unless --tls-verify or a certs.d CA); logins from podman's auth.json or
    docker's config.json (--authfile, --creds U:P); see docs/registry.md. Failed requests
    are retried --retries times (default 5) with backoff, --timeout (default 30 s) bounds
    each connect, read and write.

EXIT STATUS:
    0   success (the filesystem was unmounted cleanly; --help; --version)
    1   the mount failed or the filesystem failed while mounted
    2   bad command line or configuration; nothing was mounted or changed

EXAMPLES:
    verlay -o lowerdir=/layers/app:/layers/base,upperdir=/c/upper,workdir=/c/work /c/merged
    verlay -o lowerdir=/layers/app:/layers/base /mnt/ro        (read-only)
    verlay -o 'lowerdir=/srv/a\\:b' /mnt                         (a colon in a path)
    mount -t fuse3.verlay overlay /c/merged \\
        -o lowerdir=/layers/base,upperdir=/c/upper,workdir=/c/work
    # fstab:
    overlay /c/merged fuse3.verlay lowerdir=/layers/base,upperdir=/c/upper,workdir=/c/work 0 0
";

/// The usage line repeated in argument errors, so they can be acted on without `--help`.
const USAGE_HINT: &str =
    "usage: verlay [-f] [-d] -o lowerdir=L1:L2,upperdir=U,workdir=W MOUNTPOINT; see verlay --help";

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

/// Command-line flags that can also be spelled as `-o` options.
#[derive(Default)]
struct HelperFlags {
    debug: bool,
}

/// Parse every `-o` string, in order, into one [`OverlayOptions`], then check the rules
/// that span several options (lowerdir present, upperdir and workdir together).
fn parse_options(
    strings: &[OsString],
    cwd: &Path,
    helper: &mut HelperFlags,
) -> Result<OverlayOptions, Error> {
    let mut opts = OverlayOptions::default();
    // fsync=1 after volatile must not turn fsync back on, so keep them apart until the end.
    let mut fsync_option = true;
    for string in strings {
        for raw in split_unescaped(string.as_bytes(), b',') {
            if raw.is_empty() {
                continue;
            }
            apply_option(&mut opts, &mut fsync_option, helper, raw, cwd)?;
        }
    }
    opts.fsync = fsync_option && !opts.volatile;

    if opts.lowerdirs.len() > MAX_LOWERS {
        return Err(Error::usage(
            "lowerdir",
            format!(
                "{} lower layers; at most {MAX_LOWERS} are allowed (kernel overlayfs's limit)",
                opts.lowerdirs.len()
            ),
            "merge layers (verlay commit) or mount fewer",
        ));
    }
    if opts.lowerdirs.is_empty() {
        return Err(Error::usage(
            "lowerdir",
            "missing",
            "give at least one lower layer: -o lowerdir=/path[:/path...]",
        ));
    }
    match (&opts.upperdir, &opts.workdir) {
        (Some(upper), None) => {
            return Err(Error::usage(
                format!("upperdir \"{}\"", upper.display()),
                "given without workdir",
                "add -o workdir=DIR on the same filesystem, or drop upperdir for a read-only mount",
            ))
        }
        (None, Some(work)) => {
            return Err(Error::usage(
                format!("workdir \"{}\"", work.display()),
                "given without upperdir",
                "add -o upperdir=DIR, or drop workdir for a read-only mount",
            ))
        }
        _ => {}
    }
    Ok(opts)
}

/// Apply one non-empty raw option (escapes still in place) to `opts`.
fn apply_option(
    opts: &mut OverlayOptions,
    fsync_option: &mut bool,
    helper: &mut HelperFlags,
    raw: &[u8],
    cwd: &Path,
) -> Result<(), Error> {
    let shown = String::from_utf8_lossy(&unescape(raw)).into_owned();
    let (name, value) = match raw.iter().position(|&b| b == b'=') {
        Some(eq) => (&raw[..eq], Some(&raw[eq + 1..])),
        None => (raw, None),
    };
    // A name that is not UTF-8 cannot be one of ours.
    let Ok(name) = std::str::from_utf8(name) else {
        opts.ignored.push(shown);
        return Ok(());
    };
    let opt = OptionText {
        name,
        value,
        shown: &shown,
    };

    match name {
        "lowerdir" => opts.lowerdirs = opt.path_list(cwd)?,
        "lowerdir+" => opts.lowerdirs.push(opt.path(cwd)?),
        "upperdir" => opts.upperdir = Some(opt.path(cwd)?),
        "workdir" => opts.workdir = Some(opt.path(cwd)?),
        "volatile" => {
            opt.flag()?;
            opts.volatile = true;
        }
        "fsync" => *fsync_option = opt.bool01()?,
        "volatile_recover" => {
            opt.flag()?;
            opts.volatile_recover = true;
        }
        "writeback" => opts.writeback = opt.bool01()?,
        "passthrough" => opts.passthrough = opt.bool01()?,
        "uidmapping" => opts.uid_mappings = opt.mappings()?,
        "gidmapping" => opts.gid_mappings = opt.mappings()?,
        "squash_to_root" => {
            opt.flag()?;
            opts.squash_to_root = true;
        }
        "squash_to_uid" => opts.squash_to_uid = Some(opt.id()?),
        "squash_to_gid" => opts.squash_to_gid = Some(opt.id()?),
        "xattr_permissions" => opts.xattr_permissions = opt.xattr_permissions()?,
        "verify" => opts.verify = opt.verify()?,
        "redirect_dir" => opts.redirect_dir = opt.redirect_dir()?,
        "static_nlink" => {
            opt.flag()?;
            opts.static_nlink = true;
        }
        "noacl" => {
            opt.flag()?;
            opts.noacl = true;
        }
        "noxattrs" => opts.noxattrs = opt.bool01()?,
        "fast_ino" => opts.fast_ino = opt.bool01()?,
        "timeout" => opts.timeout = Some(opt.timeout()?),
        "threaded" => opts.threads = opt.threads()?,
        "debug" => {
            opt.flag()?;
            helper.debug = true;
        }
        "plugins" => {
            // fuse-overlayfs loads data-source plugins from these paths; serving the raw
            // directory instead would show different content, so refuse rather than ignore.
            return Err(Error::usage(
                format!("-o {shown}"),
                "verlay has no layer plugins",
                "remove the plugins= option; layers must be plain directories",
            ));
        }
        _ if value.is_none() && FUSE_FLAG_OPTIONS.contains(&name) => {
            opts.fuse_options.push(shown);
        }
        _ if value.is_some() && FUSE_VALUE_OPTIONS.contains(&name) => {
            opts.fuse_options.push(shown);
        }
        _ if (value.is_none() && FSTAB_ONLY_OPTIONS.contains(&name))
            || name.starts_with("x-")
            || name == "comment" => {}
        _ => opts.ignored.push(shown),
    }
    Ok(())
}

/// One option being parsed, for error messages that quote it as the user wrote it.
struct OptionText<'a> {
    name: &'a str,
    /// The raw value after the first `=`, escapes still in place.
    value: Option<&'a [u8]>,
    /// The whole option, unescaped, lossily decoded: what error messages show.
    shown: &'a str,
}

impl OptionText<'_> {
    fn what(&self) -> String {
        format!("-o {}", self.shown)
    }

    fn error(&self, why: impl Into<String>, fix: impl Into<String>) -> Error {
        Error::usage(self.what(), why, fix)
    }

    /// A bare option such as `volatile`: a value is a mistake, not something to guess at.
    fn flag(&self) -> Result<(), Error> {
        match self.value {
            None => Ok(()),
            Some(_) => Err(self.error("takes no value", format!("write just `{}`", self.name))),
        }
    }

    /// The value, required and non-empty, escapes kept.
    fn raw_value(&self) -> Result<&[u8], Error> {
        match self.value {
            Some(v) if !v.is_empty() => Ok(v),
            _ => Err(self.error("needs a value", format!("write {}=VALUE", self.name))),
        }
    }

    /// The value unescaped as text; non-UTF-8 cannot be a number or a keyword.
    fn text(&self) -> Result<String, Error> {
        let raw = self.raw_value()?;
        String::from_utf8(unescape(raw)).map_err(|_| self.error("value is not valid UTF-8", "fix the value"))
    }

    fn path(&self, cwd: &Path) -> Result<PathBuf, Error> {
        let raw = self.raw_value()?;
        Ok(resolve(cwd, unescape(raw)))
    }

    /// A `:`-separated list of paths; `\:` keeps a colon inside a path.
    fn path_list(&self, cwd: &Path) -> Result<Vec<PathBuf>, Error> {
        let raw = self.raw_value()?;
        let mut paths = Vec::new();
        for (i, piece) in split_unescaped(raw, b':').into_iter().enumerate() {
            if piece.is_empty() {
                // Kernel 6.5+ reads `::` as the start of data-only layers; we have none,
                // and an empty path from a stray colon must not silently mean the cwd.
                return Err(self.error(
                    format!("path {} of the list is empty", i + 1),
                    "remove the stray `:` (data-only layers `::` are not supported); \
                     escape a colon inside a path as \\:",
                ));
            }
            paths.push(resolve(cwd, unescape(piece)));
        }
        Ok(paths)
    }

    fn bool01(&self) -> Result<bool, Error> {
        match self.text()?.as_str() {
            "0" => Ok(false),
            "1" => Ok(true),
            _ => Err(self.error(
                "expected 0 or 1",
                format!("write {}=0 or {}=1", self.name, self.name),
            )),
        }
    }

    /// A uid or gid. `-1` is what chown(2) uses for "unchanged", never an owner.
    fn id(&self) -> Result<u32, Error> {
        let text = self.text()?;
        match parse_decimal_u32(&text) {
            Some(id) if id != u32::MAX => Ok(id),
            Some(_) => Err(self.error(
                "4294967295 is (uid_t)-1, which chown(2) reads as \"unchanged\"",
                "give a real id, e.g. 0",
            )),
            None => Err(self.error(
                "not an id (a decimal number from 0 to 4294967294)",
                format!("write {}=N, e.g. {}=0", self.name, self.name),
            )),
        }
    }

    fn xattr_permissions(&self) -> Result<u8, Error> {
        match self.text()?.as_str() {
            "0" => Ok(0),
            "1" => Ok(1),
            "2" => Ok(2),
            _ => Err(self.error(
                "expected 0, 1 or 2",
                "0 off, 1 trusted.overlay.override_stat, 2 user.containers.override_stat",
            )),
        }
    }

    fn verify(&self) -> Result<VerifyMode, Error> {
        match self.text()?.as_str() {
            "on" => Ok(VerifyMode::On),
            "off" => Ok(VerifyMode::Off),
            "require" => Ok(VerifyMode::Require),
            _ => Err(self.error(
                "expected on, off or require",
                "write verify=on, verify=off or verify=require",
            )),
        }
    }

    fn redirect_dir(&self) -> Result<RedirectDir, Error> {
        match self.text()?.as_str() {
            "off" => Ok(RedirectDir::Off),
            "follow" => Ok(RedirectDir::Follow),
            "nofollow" => Ok(RedirectDir::NoFollow),
            "on" => Ok(RedirectDir::On),
            _ => Err(self.error(
                "expected off, follow, nofollow or on",
                "write e.g. redirect_dir=off",
            )),
        }
    }

    /// Seconds, fractional allowed, as fuse-overlayfs's strtod.
    fn timeout(&self) -> Result<Duration, Error> {
        let text = self.text()?;
        text.parse::<f64>()
            .ok()
            .filter(|secs| *secs <= MAX_TIMEOUT_SECS)
            .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
            .ok_or_else(|| {
                self.error(
                    format!("not a number of seconds from 0 to {MAX_TIMEOUT_SECS:.0}"),
                    "write timeout=SECONDS, e.g. timeout=1.5",
                )
            })
    }

    fn threads(&self) -> Result<Option<usize>, Error> {
        let text = self.text()?;
        let n = parse_decimal_u32(&text)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| {
                self.error(
                    "not a number of threads",
                    "write threaded=N, e.g. threaded=4 (0: single-threaded)",
                )
            })?;
        if n > MAX_THREADS {
            return Err(self.error(
                format!(
                    "{n} threads is more than the {MAX_THREADS} allowed (each holds a /dev/fuse descriptor)"
                ),
                format!("write threaded=N with N from 0 to {MAX_THREADS}, e.g. threaded=4"),
            ));
        }
        Ok(match n {
            // fuse-overlayfs: threaded=0 is its single-threaded loop and threaded=1
            // its multi-threaded loop with libfuse's default thread count.
            0 => Some(1),
            1 => None,
            n => Some(n),
        })
    }

    /// `C:H:L[:C:H:L...]`, optionally with a leading `:` (podman's form).
    fn mappings(&self) -> Result<Vec<IdMapping>, Error> {
        let text = self.text()?;
        let body = text.strip_prefix(':').unwrap_or(&text);
        let fix = format!(
            "write {}=CONTAINER:HOST:LENGTH[:CONTAINER:HOST:LENGTH...], e.g. {}=0:100000:65536",
            self.name, self.name
        );
        let fields: Vec<&str> = body.split(':').collect();
        if body.is_empty() || fields.len() % 3 != 0 {
            return Err(self.error(
                format!(
                    "{} numbers; a mapping is a multiple of three (container:host:length)",
                    if body.is_empty() { 0 } else { fields.len() }
                ),
                fix,
            ));
        }
        if fields.len() / 3 > MAX_MAPPINGS {
            return Err(self.error(
                format!(
                    "{} ranges; at most {MAX_MAPPINGS} are allowed (the kernel's limit for an id map)",
                    fields.len() / 3
                ),
                fix,
            ));
        }
        let mut mappings: Vec<IdMapping> = Vec::with_capacity(fields.len() / 3);
        for triple in fields.chunks_exact(3) {
            let mut numbers = [0u32; 3];
            for (slot, field) in numbers.iter_mut().zip(triple) {
                *slot = parse_decimal_u32(field).ok_or_else(|| {
                    self.error(
                        format!("{field:?} is not an id (a decimal number below 2^32)"),
                        fix.clone(),
                    )
                })?;
            }
            let [container, host, len] = numbers;
            let mapping = IdMapping { container, host, len };
            if len == 0 {
                return Err(self.error(format!("range {container}:{host}:0 has length 0"), fix.clone()));
            }
            // Ids are 32 bits: a range must end at or before 2^32.
            let limit = 1u64 << 32;
            if u64::from(container) + u64::from(len) > limit || u64::from(host) + u64::from(len) > limit {
                return Err(self.error(
                    format!("range {container}:{host}:{len} runs past the largest id"),
                    fix.clone(),
                ));
            }
            // Overlapping ranges would make an id map two ways; the kernel refuses such
            // user-namespace maps too.
            if let Some(other) = mappings.iter().find(|m| overlaps(m, &mapping)) {
                return Err(self.error(
                    format!(
                        "ranges {}:{}:{} and {container}:{host}:{len} overlap",
                        other.container, other.host, other.len
                    ),
                    fix.clone(),
                ));
            }
            mappings.push(mapping);
        }
        Ok(mappings)
    }
}

/// True when two mappings share a container id or a host id.
fn overlaps(a: &IdMapping, b: &IdMapping) -> bool {
    let intersect = |a0: u32, b0: u32| {
        let (a0, b0) = (u64::from(a0), u64::from(b0));
        a0 < b0 + u64::from(b.len) && b0 < a0 + u64::from(a.len)
    };
    intersect(a.container, b.container) || intersect(a.host, b.host)
}

/// Decimal digits only: `str::parse` would also take a leading `+`.
fn parse_decimal_u32(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Most worker threads `threaded=N` may ask for. Each one holds its own /dev/fuse clone fd,
/// so a count near the descriptor limit (1024 by default) made the daemon die with EMFILE
/// after the mount was made, leaving a dead mount; 256 is far more than the CPUs of any
/// machine this serves and leaves the rest of the limit to the layers.
pub const MAX_THREADS: usize = 256;
/// Longest `timeout=` in seconds (about 31 years): longer is forever to a cache, and the
/// bound keeps every addition to a clock or to jiffies from overflowing.
pub const MAX_TIMEOUT_SECS: f64 = 1e9;
/// Most lower layers: kernel overlayfs's own limit (OVL_MAX_STACK). Each one holds open
/// directory fds for the whole mount.
pub const MAX_LOWERS: usize = 500;
/// Most ranges in one `uidmapping=` / `gidmapping=`: the kernel's limit for a user
/// namespace map (/proc/PID/uid_map takes 340 extents).
pub const MAX_MAPPINGS: usize = 340;

/// Split on `sep` where it is not preceded by an escaping backslash. Escapes stay in the
/// pieces, so that an option can be split on `,` and its value again on `:`.
fn split_unescaped(s: &[u8], sep: u8) -> Vec<&[u8]> {
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'\\' {
            i += 2;
        } else if s[i] == sep {
            pieces.push(&s[start..i]);
            i += 1;
            start = i;
        } else {
            i += 1;
        }
    }
    pieces.push(&s[start.min(s.len())..]);
    pieces
}

/// Drop escaping backslashes: `\x` is `x` (libfuse's rule). A lone trailing backslash
/// escapes nothing and is kept.
fn unescape(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.iter();
    while let Some(&b) = bytes.next() {
        if b == b'\\' {
            out.push(*bytes.next().unwrap_or(&b'\\'));
        } else {
            out.push(b);
        }
    }
    out
}

/// Anchor a path at `cwd` if it is relative. Lexical only: symlinks are resolved later,
/// by [`crate::config`], against the filesystem the caller meant.
fn resolve(cwd: &Path, bytes: Vec<u8>) -> PathBuf {
    let path = PathBuf::from(OsString::from_vec(bytes));
    if path.is_absolute() {
        path
    } else {
        cwd.join(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CWD: &str = "/g";

    fn argv(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    fn parse_args(args: &[&str]) -> Result<Command, Error> {
        parse(argv(args), Path::new(CWD))
    }

    fn mount(args: &[&str]) -> MountArgs {
        match parse_args(args) {
            Ok(Command::Mount(m)) => m,
            other => panic!("{args:?}: expected a mount, got {other:?}"),
        }
    }

    /// Options of `verlay -o OPTS /m`.
    fn opts(o: &str) -> OverlayOptions {
        mount(&["-o", o, "/m"]).opts
    }

    fn usage_error(args: &[&str]) -> (String, String, String) {
        match parse_args(args) {
            Err(Error::Usage { what, why, fix }) => (what, why, fix),
            other => panic!("{args:?}: expected a usage error, got {other:?}"),
        }
    }

    fn paths(ps: &[&str]) -> Vec<PathBuf> {
        ps.iter().map(PathBuf::from).collect()
    }

    fn map(container: u32, host: u32, len: u32) -> IdMapping {
        IdMapping { container, host, len }
    }

    #[test]
    fn podman_argv_parses_exactly() {
        // The option strings podman's overlay driver sends to fuse-overlayfs.
        let cases: &[(&str, &[&str], &str, &str, bool)] = &[
            (
                "lowerdir=G/overlay/l/A:G/overlay/l/B,upperdir=G/overlay/x/diff,workdir=G/overlay/x/work,,volatile",
                &["/g/G/overlay/l/A", "/g/G/overlay/l/B"],
                "/g/G/overlay/x/diff",
                "/g/G/overlay/x/work",
                true,
            ),
            (
                "lowerdir=G/overlay/l/A:G/overlay/l/B,upperdir=G/overlay/x/diff,workdir=G/overlay/x/work,",
                &["/g/G/overlay/l/A", "/g/G/overlay/l/B"],
                "/g/G/overlay/x/diff",
                "/g/G/overlay/x/work",
                false,
            ),
            (
                "lowerdir=/s/l/A,upperdir=/s/x/diff,workdir=/s/x/work,uidmapping=:0:100000:65536,gidmapping=:0:100000:65536",
                &["/s/l/A"],
                "/s/x/diff",
                "/s/x/work",
                false,
            ),
        ];
        for &(o, lowers, upper, work, volatile) in cases {
            let got = opts(o);
            assert_eq!(got.lowerdirs, paths(lowers), "{o}");
            assert_eq!(got.upperdir, Some(PathBuf::from(upper)), "{o}");
            assert_eq!(got.workdir, Some(PathBuf::from(work)), "{o}");
            assert_eq!(got.volatile, volatile, "{o}");
            assert_eq!(got.fsync, !volatile, "{o}");
            assert!(got.ignored.is_empty(), "{o}: {:?}", got.ignored);
            assert!(got.fuse_options.is_empty(), "{o}: {:?}", got.fuse_options);
        }
        let mapped = opts(cases[2].0);
        assert_eq!(mapped.uid_mappings, vec![map(0, 100000, 65536)]);
        assert_eq!(mapped.gid_mappings, vec![map(0, 100000, 65536)]);
    }

    #[test]
    fn podman_multi_range_mapping_with_leading_colon() {
        let got = opts("lowerdir=/l,uidmapping=:0:1:1001:1001:0:1:1002:1002:64535");
        assert_eq!(
            got.uid_mappings,
            vec![map(0, 1, 1001), map(1001, 0, 1), map(1002, 1002, 64535)]
        );
        // Without the leading colon too.
        assert_eq!(
            opts("lowerdir=/l,gidmapping=0:1:10").gid_mappings,
            vec![map(0, 1, 10)]
        );
    }

    #[test]
    fn command_forms() {
        let plain = mount(&["-o", "lowerdir=/l", "/m"]);
        assert_eq!(plain.source, None);
        assert_eq!(plain.mountpoint, PathBuf::from("/m"));
        assert!(!plain.foreground && !plain.debug);

        // mount.fuse3: SOURCE MOUNTPOINT -o OPTS.
        let fstab = mount(&["overlay", "/m", "-o", "rw,lowerdir=/l"]);
        assert_eq!(fstab.source.as_deref(), Some("overlay"));
        assert_eq!(fstab.mountpoint, PathBuf::from("/m"));
        assert_eq!(fstab.opts.lowerdirs, paths(&["/l"]));
        assert_eq!(fstab.opts.fuse_options, vec!["rw".to_string()]);

        // -o several times, anywhere, glued; later lowerdir= replaces.
        let spread = mount(&["-olowerdir=/a", "/m", "-o", "upperdir=/u", "-oworkdir=/w"]);
        assert_eq!(spread.opts.lowerdirs, paths(&["/a"]));
        assert_eq!(spread.opts.upperdir, Some(PathBuf::from("/u")));
        assert_eq!(spread.opts.workdir, Some(PathBuf::from("/w")));

        let flags = mount(&["-f", "-o", "lowerdir=/l", "/m"]);
        assert!(flags.foreground && !flags.debug);
        for debug in [
            &["-d", "-o", "lowerdir=/l", "/m"][..],
            &["-o", "lowerdir=/l,debug", "/m"],
        ] {
            let m = mount(debug);
            assert!(m.debug && m.foreground, "{debug:?}: -d implies -f as in libfuse");
        }
        assert_eq!(mount(&["-s", "-o", "lowerdir=/l", "/m"]).opts.threads, Some(1));

        // After `--`, a leading dash is a path.
        let dashed = mount(&["-o", "lowerdir=/l", "--", "-m"]);
        assert_eq!(dashed.mountpoint, PathBuf::from("/g/-m"));

        // Relative mountpoint joins the cwd.
        assert_eq!(
            mount(&["-o", "lowerdir=/l", "merged"]).mountpoint,
            PathBuf::from("/g/merged")
        );
    }

    #[test]
    fn help_and_version() {
        let cases: &[(&[&str], Command)] = &[
            (&["--help"], Command::Help),
            (&["-h"], Command::Help),
            (&["-o", "lowerdir=/l", "/m", "--help"], Command::Help),
            // Help wins over errors elsewhere on the line, as in libfuse.
            (&["--bogus", "-h"], Command::Help),
            (&["-o", "timeout=abc", "-h"], Command::Help),
            (&["--version"], Command::Version),
            (&["-V"], Command::Version),
        ];
        for (args, want) in cases {
            assert_eq!(parse_args(args).ok().as_ref(), Some(want), "{args:?}");
        }
        for word in RESERVED_SUBCOMMANDS {
            let (what, why, _) = usage_error(&[word, "x"]);
            assert_eq!(what, format!("verlay {word}"));
            assert_eq!(why, "not implemented in this version");
        }
    }

    #[test]
    fn positional_errors_say_what_was_expected() {
        let cases: &[(&[&str], &str, &str)] = &[
            (&["-o", "lowerdir=/l"], "MOUNTPOINT", "missing"),
            (&[], "MOUNTPOINT", "missing"),
            (
                &["-o", "lowerdir=/l", "a", "b", "c"],
                "argument \"c\"",
                "unexpected; expected at most SOURCE and MOUNTPOINT",
            ),
            (&["-o", "lowerdir=/l", ""], "MOUNTPOINT", "empty"),
            (&["-o"], "-o", "needs a value"),
            (&["-x", "-o", "lowerdir=/l", "/m"], "flag \"-x\"", "unknown flag"),
        ];
        for &(args, what, why) in cases {
            let (got_what, got_why, fix) = usage_error(args);
            assert_eq!((got_what.as_str(), got_why.as_str()), (what, why), "{args:?}");
            assert!(!fix.is_empty(), "{args:?}");
        }
    }

    #[test]
    fn option_splitting_and_escapes() {
        let cases: &[(&str, &[&str])] = &[
            // Empty options anywhere are ignored.
            (",lowerdir=/a,", &["/a"]),
            (",,lowerdir=/a,,,", &["/a"]),
            // `\,` is a comma inside a path, `\:` a colon inside one lower path.
            (r"lowerdir=/a\,b", &["/a,b"]),
            (r"lowerdir=/a\:b:/c", &["/a:b", "/c"]),
            (r"lowerdir=/a\\:/c", &["/a\\", "/c"]),
            (r"lowerdir=/a\\\:b", &["/a\\:b"]),
            // Relative lowers join the cwd without resolving anything.
            ("lowerdir=l/A:../x:/abs", &["/g/l/A", "/g/../x", "/abs"]),
            // lowerdir+= appends one path, colon and all; lowerdir= resets.
            ("lowerdir=/a,lowerdir+=/b:c", &["/a", "/b:c"]),
            ("lowerdir+=/a,lowerdir+=rel", &["/a", "/g/rel"]),
            ("lowerdir+=/a,lowerdir=/b", &["/b"]),
        ];
        for &(o, want) in cases {
            assert_eq!(opts(o).lowerdirs, paths(want), "{o}");
        }
        // Escaped commas in a pass-through option are unescaped once.
        assert_eq!(
            opts(r"lowerdir=/l,fsname=a\,b").fuse_options,
            vec!["fsname=a,b".to_string()]
        );
        let with_comma = opts(r"lowerdir=/l,upperdir=/u\,1,workdir=w\:2");
        assert_eq!(with_comma.upperdir, Some(PathBuf::from("/u,1")));
        assert_eq!(with_comma.workdir, Some(PathBuf::from("/g/w:2")));
    }

    #[test]
    fn typed_values() {
        let o = opts(
            "lowerdir=/l,squash_to_root,squash_to_uid=1000,squash_to_gid=0,static_nlink,noacl,\
             timeout=1.5,threaded=8,verify=require,redirect_dir=nofollow,xattr_permissions=2,\
             noxattrs=1,writeback=0,fast_ino=1",
        );
        assert!(o.squash_to_root && o.static_nlink && o.noacl && o.noxattrs && o.fast_ino);
        assert!(!o.writeback);
        assert_eq!(o.squash_to_uid, Some(1000));
        assert_eq!(o.squash_to_gid, Some(0));
        assert_eq!(o.timeout, Some(Duration::from_millis(1500)));
        assert_eq!(o.threads, Some(8));
        assert_eq!(o.verify, VerifyMode::Require);
        assert_eq!(o.redirect_dir, RedirectDir::NoFollow);
        assert_eq!(o.xattr_permissions, 2);
        assert!(o.ignored.is_empty() && o.fuse_options.is_empty());

        let defaults = opts("lowerdir=/l");
        assert_eq!(
            defaults,
            OverlayOptions {
                lowerdirs: paths(&["/l"]),
                ..OverlayOptions::default()
            }
        );
        assert!(defaults.fsync && defaults.writeback && defaults.is_read_only());
        assert_eq!(defaults.verify, VerifyMode::On);
        assert_eq!(defaults.redirect_dir, RedirectDir::Off);

        let cases: &[(&str, Option<usize>)] = &[
            ("threaded=0", Some(1)),
            ("threaded=1", None),
            ("threaded=2", Some(2)),
        ];
        for &(o, want) in cases {
            assert_eq!(opts(&format!("lowerdir=/l,{o}")).threads, want, "{o}");
        }
        for (o, want) in [("verify=on", VerifyMode::On), ("verify=off", VerifyMode::Off)] {
            assert_eq!(opts(&format!("lowerdir=/l,{o}")).verify, want, "{o}");
        }
        assert_eq!(opts("lowerdir=/l,timeout=0").timeout, Some(Duration::ZERO));
    }

    #[test]
    fn fsync_and_volatile() {
        let cases: &[(&str, bool, bool)] = &[
            ("", true, false),
            (",fsync=1", true, false),
            (",fsync=0", false, false),
            (",volatile", false, true),
            // volatile wins whatever the order.
            (",volatile,fsync=1", false, true),
            (",fsync=1,volatile", false, true),
        ];
        for &(o, fsync, volatile) in cases {
            let got = opts(&format!("lowerdir=/l{o}"));
            assert_eq!((got.fsync, got.volatile), (fsync, volatile), "{o}");
        }
        assert!(opts("lowerdir=/l,volatile,volatile_recover").volatile_recover);
        assert!(!opts("lowerdir=/l,volatile").volatile_recover);
    }

    #[test]
    fn pass_through_ignored_and_fstab_options() {
        let o = opts(
            "lowerdir=/l,nodev,nosuid,allow_other,default_permissions,ro,max_read=131072,\
             context=\"system_u:object_r:container_file_t:s0\",fsname=x,\
             index=off,userxattr,metacopy=on,allow_other=1,\
             defaults,nofail,_netdev,x-systemd.requires=/x,comment=hi",
        );
        assert_eq!(
            o.fuse_options,
            vec![
                "nodev",
                "nosuid",
                "allow_other",
                "default_permissions",
                "ro",
                "max_read=131072",
                "context=\"system_u:object_r:container_file_t:s0\"",
                "fsname=x",
            ]
        );
        // Unknown names (kernel-only options, a flag given a value) are reported, not fatal.
        assert_eq!(
            o.ignored,
            vec!["index=off", "userxattr", "metacopy=on", "allow_other=1"]
        );
    }

    #[test]
    fn malformed_values_are_errors() {
        // (option, why); `what` quotes the option as written.
        let cases: &[(&str, &str)] = &[
            ("timeout=abc", "not a number of seconds from 0 to 1000000000"),
            ("timeout=-1", "not a number of seconds from 0 to 1000000000"),
            ("timeout=inf", "not a number of seconds from 0 to 1000000000"),
            ("timeout=", "needs a value"),
            ("timeout", "needs a value"),
            ("threaded=x", "not a number of threads"),
            ("threaded=-1", "not a number of threads"),
            ("timeout=1e10", "not a number of seconds from 0 to 1000000000"),
            (
                "threaded=1000000000",
                "1000000000 threads is more than the 256 allowed (each holds a /dev/fuse descriptor)",
            ),
            (
                "threaded=257",
                "257 threads is more than the 256 allowed (each holds a /dev/fuse descriptor)",
            ),
            ("verify=maybe", "expected on, off or require"),
            ("redirect_dir=yes", "expected off, follow, nofollow or on"),
            (
                "squash_to_uid=-1",
                "not an id (a decimal number from 0 to 4294967294)",
            ),
            (
                "squash_to_gid=+5",
                "not an id (a decimal number from 0 to 4294967294)",
            ),
            (
                "squash_to_uid=4294967296",
                "not an id (a decimal number from 0 to 4294967294)",
            ),
            (
                "squash_to_uid=4294967295",
                "4294967295 is (uid_t)-1, which chown(2) reads as \"unchanged\"",
            ),
            ("fsync=2", "expected 0 or 1"),
            ("writeback=yes", "expected 0 or 1"),
            ("xattr_permissions=3", "expected 0, 1 or 2"),
            ("volatile=1", "takes no value"),
            ("volatile_recover=1", "takes no value"),
            ("squash_to_root=0", "takes no value"),
            ("upperdir=", "needs a value"),
            ("workdir", "needs a value"),
            ("lowerdir+=", "needs a value"),
            ("plugins=/x.so", "verlay has no layer plugins"),
        ];
        for &(o, why) in cases {
            let (what, got_why, fix) = usage_error(&["-o", &format!("lowerdir=/l,{o}"), "/m"]);
            assert_eq!(what, format!("-o {o}"), "{o}");
            assert_eq!(got_why, why, "{o}");
            assert!(!fix.is_empty(), "{o}");
        }
    }

    #[test]
    fn malformed_lowerdir_lists_are_errors() {
        let cases: &[(&str, &str)] = &[
            ("lowerdir=", "needs a value"),
            ("lowerdir", "needs a value"),
            ("lowerdir=a::b", "path 2 of the list is empty"),
            ("lowerdir=:a", "path 1 of the list is empty"),
            ("lowerdir=a:", "path 2 of the list is empty"),
        ];
        for &(o, why) in cases {
            let (what, got_why, _) = usage_error(&["-o", o, "/m"]);
            assert_eq!(what, format!("-o {o}"), "{o}");
            assert_eq!(got_why, why, "{o}");
        }
    }

    #[test]
    fn malformed_mappings_are_errors() {
        let cases: &[(&str, &str)] = &[
            (
                "0:1",
                "2 numbers; a mapping is a multiple of three (container:host:length)",
            ),
            (
                "0:1:2:3",
                "4 numbers; a mapping is a multiple of three (container:host:length)",
            ),
            (
                ":",
                "0 numbers; a mapping is a multiple of three (container:host:length)",
            ),
            ("", "needs a value"),
            ("0:x:1", "\"x\" is not an id (a decimal number below 2^32)"),
            ("0::1", "\"\" is not an id (a decimal number below 2^32)"),
            ("0:-1:1", "\"-1\" is not an id (a decimal number below 2^32)"),
            (
                "0:4294967296:1",
                "\"4294967296\" is not an id (a decimal number below 2^32)",
            ),
            ("0:0:0", "range 0:0:0 has length 0"),
            ("4294967295:0:2", "range 4294967295:0:2 runs past the largest id"),
            ("0:4294967295:2", "range 0:4294967295:2 runs past the largest id"),
            ("0:100:10:5:200:10", "ranges 0:100:10 and 5:200:10 overlap"),
            ("0:100:10:50:105:10", "ranges 0:100:10 and 50:105:10 overlap"),
        ];
        for name in ["uidmapping", "gidmapping"] {
            for &(value, why) in cases {
                let o = format!("{name}={value}");
                let (what, got_why, fix) = usage_error(&["-o", &format!("lowerdir=/l,{o}"), "/m"]);
                assert_eq!(what, format!("-o {o}"), "{o}");
                assert_eq!(got_why, why, "{o}");
                assert!(
                    value.is_empty() || fix.contains("CONTAINER:HOST:LENGTH"),
                    "{o}: {fix}"
                );
            }
        }
        // The largest range that fits is fine.
        assert_eq!(
            opts("lowerdir=/l,uidmapping=4294967295:0:1").uid_mappings,
            vec![map(u32::MAX, 0, 1)]
        );
    }

    #[test]
    fn layer_set_rules() {
        let cases: &[(&str, &str, &str)] = &[
            ("upperdir=/u", "lowerdir", "missing"),
            ("", "lowerdir", "missing"),
            (",,", "lowerdir", "missing"),
            (
                "lowerdir=/l,upperdir=/u",
                "upperdir \"/u\"",
                "given without workdir",
            ),
            (
                "lowerdir=/l,workdir=w",
                "workdir \"/g/w\"",
                "given without upperdir",
            ),
        ];
        for &(o, what, why) in cases {
            let (got_what, got_why, _) = usage_error(&["-o", o, "/m"]);
            assert_eq!((got_what.as_str(), got_why.as_str()), (what, why), "{o:?}");
        }
        // No -o at all is a missing lowerdir, not a crash.
        let (what, _, fix) = usage_error(&["/m"]);
        assert_eq!(what, "lowerdir");
        assert!(fix.contains("-o lowerdir="), "{fix}");
    }

    #[test]
    fn error_display_reads_what_why_fix() {
        let err = parse_args(&["-o", "lowerdir=/l,timeout=abc", "/m"]).err();
        assert_eq!(
            err.map(|e| e.to_string()).as_deref(),
            Some("-o timeout=abc: not a number of seconds from 0 to 1000000000 (write timeout=SECONDS, e.g. timeout=1.5)")
        );
    }

    #[test]
    fn non_utf8_paths_survive() {
        let args = vec![
            OsString::from("-o"),
            OsString::from_vec(b"lowerdir=/l\xff:r\xfe".to_vec()),
            OsString::from_vec(b"/m\xfd".to_vec()),
        ];
        let Ok(Command::Mount(m)) = parse(args, Path::new(CWD)) else {
            panic!("non-UTF-8 paths must parse");
        };
        let lowers: Vec<&[u8]> = m
            .opts
            .lowerdirs
            .iter()
            .map(|p| p.as_os_str().as_bytes())
            .collect();
        assert_eq!(lowers, vec![&b"/l\xff"[..], &b"/g/r\xfe"[..]]);
        assert_eq!(m.mountpoint.as_os_str().as_bytes(), b"/m\xfd");
    }

    #[test]
    fn help_documents_every_option() {
        let names = [
            "lowerdir=",
            "lowerdir+=",
            "upperdir=",
            "workdir=",
            "fsync=",
            "volatile",
            "volatile_recover",
            "writeback=",
            "uidmapping=",
            "gidmapping=",
            "squash_to_root",
            "squash_to_uid=",
            "squash_to_gid=",
            "xattr_permissions=",
            "verify=",
            "redirect_dir=",
            "static_nlink",
            "noacl",
            "noxattrs=",
            "timeout=",
            "threaded=",
            "fast_ino=",
            "debug",
            "-f",
            "-d",
            "-s",
            "-o",
            "--help",
            "--version",
            "demo",
            "snapshotter",
            "SOURCE MOUNTPOINT",
            "EXIT STATUS",
            "EXAMPLES",
        ];
        for name in names.iter().chain(FUSE_FLAG_OPTIONS).chain(FSTAB_ONLY_OPTIONS) {
            assert!(HELP.contains(name), "--help does not mention {name}");
        }
        for name in FUSE_VALUE_OPTIONS {
            assert!(
                HELP.contains(&format!("{name}=")),
                "--help does not mention {name}="
            );
        }
        for code in [EXIT_OK, EXIT_FAILURE, EXIT_USAGE] {
            assert!(
                HELP.contains(&format!("\n    {code}   ")),
                "--help does not document exit {code}"
            );
        }
    }

    #[test]
    fn split_and_unescape_primitives() {
        let cases: &[(&[u8], &[&[u8]])] = &[
            (b"", &[b""]),
            (b"a,b", &[b"a", b"b"]),
            (b"a\\,b,c", &[b"a\\,b", b"c"]),
            (b"a\\\\,b", &[b"a\\\\", b"b"]),
            (b"a\\", &[b"a\\"]),
            (b",", &[b"", b""]),
        ];
        for &(input, want) in cases {
            assert_eq!(split_unescaped(input, b','), want.to_vec(), "{input:?}");
        }
        let unescapes: &[(&[u8], &[u8])] = &[
            (b"a\\,b", b"a,b"),
            (b"a\\:b", b"a:b"),
            (b"a\\\\b", b"a\\b"),
            (b"a\\", b"a\\"),
            (b"plain", b"plain"),
        ];
        for &(input, want) in unescapes {
            assert_eq!(unescape(input), want, "{input:?}");
        }
    }
}
