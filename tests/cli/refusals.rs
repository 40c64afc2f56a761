//! Bad input: a rejected command line prints one `verlay: what: why (fix)` line, exits 2 and
//! changes nothing on disk (checked with a snapshot of the sandbox before and after).

use super::*;

/// Run `verlay ARGS`, expecting a usage/config refusal that names each of `needles`, and check
/// that no file under the sandbox changed and nothing got mounted.
fn assert_refused(sb: &Sandbox, args: &[OsString], needles: &[&str]) {
    let roots = sb.roots();
    let before = snapshot(&roots);
    let mnt = sb.p("m");
    let f = launch(args, None, Some(&mnt));
    assert_eq!(f.code(), Some(2), "verlay {args:?} should exit 2: {f:#?}");
    assert!(f.pipes_eof, "pipes left open after a refusal: {f:#?}");
    assert_eq!(f.stdout, "", "verlay {args:?} printed to stdout");
    let err = f.stderr.as_str();
    let line = err
        .strip_suffix('\n')
        .unwrap_or_else(|| panic!("stderr is not one line ending in a newline: {err:?}"));
    assert!(!line.contains('\n'), "stderr has more than one line:\n{err}");
    let body = line
        .strip_prefix("verlay: ")
        .unwrap_or_else(|| panic!("stderr does not start with `verlay: `: {line:?}"));
    // what: why (fix)
    let (what_why, fix) = body
        .strip_suffix(')')
        .and_then(|b| b.rsplit_once(" ("))
        .unwrap_or_else(|| panic!("no `(fix)` at the end of {line:?}"));
    let (what, why) = what_why
        .split_once(": ")
        .unwrap_or_else(|| panic!("no `what: why` in {line:?}"));
    assert!(
        !what.is_empty() && !why.is_empty() && !fix.is_empty(),
        "empty part in {line:?}"
    );
    for needle in needles {
        assert!(line.contains(needle), "{line:?} does not name {needle:?}");
    }
    assert!(!f.mounted_at_exit && !is_mounted(&mnt), "mounted after a refusal");
    assert_eq!(
        sb.own_processes(),
        Vec::<i32>::new(),
        "a verlay process survived the refusal"
    );
    let after = snapshot(&roots);
    assert!(
        before == after,
        "verlay {args:?} changed the disk although it refused:\n{}",
        snapshot_diff(&before, &after)
    );
}

#[test]
fn refusal_missing_lowerdir_option() {
    let sb = Sandbox::new();
    let opts = format!("upperdir={},workdir={}", sb.p("u").display(), sb.p("w").display());
    assert_refused(&sb, &o_args(&opts, &sb.p("m")), &["lowerdir"]);
}

/// Out-of-range option values are refused before anything is mounted. `threaded=1000000000`
/// used to mount, then the daemon died with EMFILE opening its /dev/fuse clone fds and left
/// a dead mount ("Transport endpoint is not connected").
#[test]
fn refusal_option_values_out_of_range_before_mounting() {
    let sb = Sandbox::new();
    sb.mkdir("l1");
    sb.mkdir("l2");
    sb.mkdir("u");
    sb.mkdir("w");
    sb.mkdir("m");
    let many_lowers = vec![sb.p("l1").display().to_string(); 501].join(":");
    let many_ranges = (0..341)
        .map(|i| format!("{}:{}:1", i, 100_000 + i))
        .collect::<Vec<_>>()
        .join(":");
    let cases: Vec<(String, Vec<&str>)> = vec![
        (
            "threaded=1000000000".into(),
            vec![
                "-o threaded=1000000000",
                "more than the 256 allowed",
                "threaded=N with N from 0 to 256",
            ],
        ),
        (
            "threaded=257".into(),
            vec!["-o threaded=257", "more than the 256 allowed"],
        ),
        (
            "timeout=1e12".into(),
            vec!["-o timeout=1e12", "from 0 to 1000000000"],
        ),
        (
            format!("uidmapping={many_ranges}"),
            vec!["341 ranges; at most 340 are allowed"],
        ),
        (
            format!("gidmapping={many_ranges}"),
            vec!["341 ranges; at most 340 are allowed"],
        ),
    ];
    for (opt, needles) in &cases {
        let opts = format!("{},{opt}", sb.rw_opts());
        assert_refused(&sb, &o_args(&opts, &sb.p("m")), needles);
    }
    let opts = format!(
        "lowerdir={many_lowers},upperdir={},workdir={}",
        sb.p("u").display(),
        sb.p("w").display()
    );
    assert_refused(
        &sb,
        &o_args(&opts, &sb.p("m")),
        &["lowerdir", "501 lower layers; at most 500 are allowed"],
    );
}

#[test]
fn refusal_lowerdir_that_does_not_exist() {
    let sb = Sandbox::new();
    let nope = sb.p("nope");
    let opts = format!(
        "lowerdir={}:{},upperdir={},workdir={}",
        sb.p("l1").display(),
        nope.display(),
        sb.p("u").display(),
        sb.p("w").display()
    );
    assert_refused(
        &sb,
        &o_args(&opts, &sb.p("m")),
        &["lowerdir", &format!("\"{}\"", nope.display()), "does not exist"],
    );
}

#[test]
fn refusal_lowerdir_that_is_a_file() {
    let sb = Sandbox::new();
    let file = sb.write("file", "not a layer");
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        file.display(),
        sb.p("u").display(),
        sb.p("w").display()
    );
    assert_refused(
        &sb,
        &o_args(&opts, &sb.p("m")),
        &["lowerdir", &format!("\"{}\"", file.display()), "not a directory"],
    );
}

#[test]
fn refusal_upperdir_that_does_not_exist() {
    let sb = Sandbox::new();
    let nope = sb.p("no-upper");
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        sb.p("l1").display(),
        nope.display(),
        sb.p("w").display()
    );
    assert_refused(
        &sb,
        &o_args(&opts, &sb.p("m")),
        &["upperdir", &format!("\"{}\"", nope.display()), "does not exist"],
    );
}

#[test]
fn refusal_upperdir_without_workdir() {
    let sb = Sandbox::new();
    let opts = format!(
        "lowerdir={},upperdir={}",
        sb.p("l1").display(),
        sb.p("u").display()
    );
    assert_refused(
        &sb,
        &o_args(&opts, &sb.p("m")),
        &[&format!("upperdir \"{}\"", sb.p("u").display()), "workdir"],
    );
}

#[test]
fn refusal_workdir_without_upperdir() {
    let sb = Sandbox::new();
    let opts = format!(
        "lowerdir={},workdir={}",
        sb.p("l1").display(),
        sb.p("w").display()
    );
    assert_refused(
        &sb,
        &o_args(&opts, &sb.p("m")),
        &[&format!("workdir \"{}\"", sb.p("w").display()), "upperdir"],
    );
}

#[test]
fn refusal_workdir_on_another_filesystem_than_upperdir() {
    let mut sb = Sandbox::new();
    let shm = match tempfile::tempdir_in("/dev/shm") {
        Ok(d) => d,
        Err(e) => {
            eprintln!("skipped: cannot create a workdir on /dev/shm ({e})");
            return;
        }
    };
    let shm_dev = fs::metadata(shm.path()).expect("stat /dev/shm dir").dev();
    if shm_dev == fs::metadata(sb.p("u")).expect("stat upper").dev() {
        eprintln!("skipped: /dev/shm and the temp dir are on one filesystem");
        return;
    }
    let work = shm.path().to_path_buf();
    sb.extra.push(shm);
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        sb.p("l1").display(),
        sb.p("u").display(),
        work.display()
    );
    assert_refused(
        &sb,
        &o_args(&opts, &sb.p("m")),
        &[&format!("workdir \"{}\"", work.display()), "filesystem"],
    );
}

#[test]
fn refusal_workdir_holding_a_foreign_file() {
    let sb = Sandbox::new();
    sb.write("w/notes.txt", "someone's data");
    assert_refused(
        &sb,
        &o_args(&sb.rw_opts(), &sb.p("m")),
        &[&format!("workdir \"{}\"", sb.p("w").display()), "notes.txt"],
    );
}

#[test]
fn refusal_mountpoint_that_does_not_exist() {
    let sb = Sandbox::new();
    let nope = sb.p("no-mnt");
    assert_refused(
        &sb,
        &o_args(&sb.rw_opts(), &nope),
        &["mountpoint", &format!("\"{}\"", nope.display()), "does not exist"],
    );
    assert!(!nope.exists(), "the missing mountpoint was created");
}

#[test]
fn refusal_malformed_option_values() {
    for bad in [
        "uidmapping=1:2",
        "gidmapping=0:1000",
        "timeout=abc",
        "threaded=x",
        "verify=maybe",
        "fsync=yes",
        "squash_to_uid=root",
    ] {
        let sb = Sandbox::new();
        let opts = format!("{},{bad}", sb.rw_opts());
        assert_refused(&sb, &o_args(&opts, &sb.p("m")), &[&format!("-o {bad}")]);
    }
}

#[test]
fn refusal_empty_command_line() {
    let sb = Sandbox::new();
    assert_refused(&sb, &[], &["MOUNTPOINT", "--help"]);
}

#[test]
fn refusal_unknown_flag() {
    let sb = Sandbox::new();
    let mut args = os(&["--frobnicate"]);
    args.extend(o_args(&sb.rw_opts(), &sb.p("m")));
    assert_refused(&sb, &args, &["--frobnicate"]);
}
