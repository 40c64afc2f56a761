//! Unit tests of the mount-form parser: both command forms, every option, escapes, limits,
//! and `--help` listing what the parser accepts.

use super::help::{FSTAB_ONLY_OPTIONS, FUSE_FLAG_OPTIONS, FUSE_VALUE_OPTIONS, RESERVED_SUBCOMMANDS};
use super::options::{split_unescaped, unescape};
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
    assert!(defaults.fsync && !defaults.writeback && defaults.is_read_only());
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
fn io_uring_modes() {
    assert_eq!(opts("lowerdir=/l").io_uring, IoUring::Off);
    for (v, m) in [
        ("auto", IoUring::Auto),
        ("on", IoUring::On),
        ("1", IoUring::On),
        ("off", IoUring::Off),
        ("0", IoUring::Off),
    ] {
        assert_eq!(opts(&format!("lowerdir=/l,io_uring={v}")).io_uring, m, "{v}");
    }
    let (_, why, fix) = usage_error(&["-o", "lowerdir=/l,io_uring=yes", "/m"]);
    assert_eq!(why, "expected auto, on or off");
    assert!(fix.contains("io_uring=auto"), "{fix}");
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
        "io_uring=",
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
