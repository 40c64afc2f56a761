//! The names the option parser knows (kernel/FUSE pass-through options, fstab-only ones) and
//! the `verlay --help` text that lists them; the unit tests check that the two agree.

/// Subcommand words reserved so that a later version can add them without changing what an
/// old command line means (none at the moment).
pub(super) const RESERVED_SUBCOMMANDS: &[&str] = &[];

/// Bare kernel/FUSE mount options passed through to the mount.
pub(super) const FUSE_FLAG_OPTIONS: &[&str] = &[
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
pub(super) const FUSE_VALUE_OPTIONS: &[&str] = &[
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
pub(super) const FSTAB_ONLY_OPTIONS: &[&str] = &[
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
    writeback=0|1       the kernel's FUSE writeback cache (default 0): write(2) fills
                        the page cache and the kernel sends the daemon whole pages
                        later. Faster small writes; a failed write is reported at
                        fsync/close, and unsynced writes die with the daemon (see
                        docs/ordering.md). Ignored with passthrough=1.

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
    io_uring=auto|on|off
                        how requests travel between kernel and daemon: io_uring
                        queues (Linux 6.14+) or /dev/fuse. off (default): /dev/fuse;
                        auto: io_uring when the kernel offers it, which needs root to
                        have set /sys/module/fuse/parameters/enable_uring to Y (verlay
                        does not change that system-wide switch); on: io_uring or fail.
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
pub(super) const USAGE_HINT: &str =
    "usage: verlay [-f] [-d] -o lowerdir=L1:L2,upperdir=U,workdir=W MOUNTPOINT; see verlay --help";
