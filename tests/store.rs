//! The layer store's promises: an imported layer is exactly the tarball in kernel overlayfs
//! format (whiteouts, opaque dirs, hard links, xattrs, owners, modes, mtimes), chain IDs are
//! docker's, and nothing is ever published from a hostile, truncated, mismatching or
//! interrupted import (leftovers are removed, and reported, by the next store command).
//! Hostile input (768 MiB PAX and GNU long-name headers, blobs that are symlinks to
//! /dev/zero, devices or FIFOs, absurd descriptor sizes) is refused with exit 2 in bounded
//! memory and time: each such run is measured with /usr/bin/time (Debian package `time`)
//! and killed by coreutils `timeout` if it hangs.
//!
//! Tarballs are made with the `tar` command (and `zstd`, `gzip`), the image with
//! tests/e2e/image.sh; hostile entries tar refuses to write are made with
//! the tar crate's raw headers. Ownership and device cases need root: the tests say when
//! they skip.

#[macro_use]
mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{e2e_script, have, sh, Launch, Mount};
use sha2::{Digest, Sha256};

const BIN: &str = env!("CARGO_BIN_EXE_verlay");
/// The test image's builder.
fn recipe() -> PathBuf {
    e2e_script("image.sh")
}

fn verlay(args: &[&OsStr]) -> Output {
    Command::new(BIN).args(args).output().expect("run verlay")
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

fn sha256_file(p: &Path) -> String {
    format!("sha256:{:x}", Sha256::digest(fs::read(p).unwrap()))
}

/// `verlay layer import`; returns (stdout line, stderr, success).
fn import(store: &Path, file: &Path, extra: &[&str]) -> (String, String, bool) {
    let mut args: Vec<&OsStr> = vec![
        "layer".as_ref(),
        "import".as_ref(),
        "--store".as_ref(),
        store.as_os_str(),
    ];
    args.extend(extra.iter().map(OsStr::new));
    args.push(file.as_os_str());
    let out = verlay(&args);
    (
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
        out.status.success(),
    )
}

fn import_ok(store: &Path, file: &Path, extra: &[&str]) -> String {
    let (out, err, ok) = import(store, file, extra);
    assert!(ok, "import of {} failed: {err}", file.display());
    out
}

fn diff_dir(store: &Path, chain: &str) -> PathBuf {
    store
        .join("layers")
        .join(chain.trim_start_matches("sha256:"))
        .join("diff")
}

fn dir_names(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = match fs::read_dir(p) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

/// Nothing published and no leftover: the promise of every refused import.
fn assert_nothing_published(store: &Path) {
    assert_eq!(
        dir_names(&store.join("layers")),
        Vec::<String>::new(),
        "layers/ must stay empty"
    );
    assert_eq!(
        dir_names(&store.join("tmp")),
        Vec::<String>::new(),
        "tmp/ must be cleaned"
    );
}

fn xattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    match rustix::fs::lgetxattr(p, name, &mut buf[..]) {
        Ok(n) => {
            buf.truncate(n);
            Some(buf)
        }
        Err(_) => None,
    }
}

/// A tree with one of everything a layer can hold, and the tar of it.
fn build_rich_tree(dir: &Path) -> PathBuf {
    let src = dir.join("src");
    let root = is_root();
    sh(&format!(
        r#"
        cd {d}; mkdir -p src/dir/sub src/opaque src/ro
        echo hello > src/dir/file
        printf 'suid' > src/suid; chmod 4755 src/suid
        printf 'sgid' > src/sgid; chmod 2711 src/sgid
        ln src/dir/file src/dir/hardlink
        ln -s ../dir/file src/dir/sub/link
        ln -s /etc/passwd src/abs-link
        mkfifo src/fifo; chmod 0640 src/fifo
        : > src/dir/.wh.gone
        : > src/opaque/.wh..wh..opq
        echo new > src/opaque/new
        echo ro > src/ro/f; chmod 0555 src/ro
        setfattr -n user.note -v 'layer note' src/dir/file
        setfattr -n user.dirnote -v d src/dir
        touch -h -d '2021-02-03 04:05:06.123456789' src/dir/sub/link
        touch -d '2020-01-01 00:00:00.5' src/dir/file
        touch -d '2019-06-07 08:09:10.987654321' src/dir/sub src/ro
        chmod 0750 src/dir
        touch -d '2018-01-01 12:00:00' src/dir
        "#,
        d = dir.display()
    ));
    if root {
        sh(&format!(
            r#"cd {d}; chown 1234:5678 src/dir/file; chown -h 4321:8765 src/abs-link
               mknod src/null c 1 3; chown 7:9 src/null; chmod 4755 src/suid
               touch -d '2020-01-01 00:00:00.5' src/dir/file; touch -d '2018-01-01 12:00:00' src/dir"#,
            d = dir.display()
        ));
    }
    let tar = dir.join("rich.tar");
    sh(&format!(
        "tar --format=pax --xattrs --xattrs-include='*' --numeric-owner -C {} -cf {} .",
        src.display(),
        tar.display()
    ));
    tar
}

fn check_rich_layer(d: &Path) {
    let m = |p: &str| fs::symlink_metadata(d.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    assert_eq!(fs::read(d.join("dir/file")).unwrap(), b"hello\n");
    assert_eq!(m("dir/file").ino(), m("dir/hardlink").ino(), "hard link kept");
    assert_eq!(m("dir/file").nlink(), 2);
    assert_eq!(
        fs::read_link(d.join("dir/sub/link")).unwrap(),
        Path::new("../dir/file")
    );
    assert_eq!(
        fs::read_link(d.join("abs-link")).unwrap(),
        Path::new("/etc/passwd")
    );
    assert!(m("fifo").file_type().is_fifo());
    assert_eq!(m("fifo").mode() & 0o7777, 0o640);
    assert_eq!(m("sgid").mode() & 0o7777, 0o2711);
    assert_eq!(m("dir").mode() & 0o7777, 0o750);
    assert_eq!(m("ro").mode() & 0o7777, 0o555);
    // mtimes, with the nanoseconds PAX carries
    assert_eq!(
        (m("dir/file").mtime(), m("dir/file").mtime_nsec()),
        (1577836800, 500_000_000)
    );
    assert_eq!(
        (m("dir/sub").mtime(), m("dir/sub").mtime_nsec()),
        (1559894950, 987_654_321)
    );
    assert_eq!(
        (m("dir/sub/link").mtime(), m("dir/sub/link").mtime_nsec()),
        (1612325106, 123_456_789)
    );
    // a directory's mtime survives its children being created after it
    assert_eq!(m("dir").mtime(), 1514808000);
    assert_eq!(
        xattr(&d.join("dir/file"), "user.note").as_deref(),
        Some(&b"layer note"[..])
    );
    assert_eq!(xattr(&d.join("dir"), "user.dirnote").as_deref(), Some(&b"d"[..]));
    // OCI whiteouts in kernel overlayfs form
    assert!(
        !d.join("dir/.wh.gone").exists(),
        "the OCI marker itself is not kept"
    );
    assert!(!d.join("opaque/.wh..wh..opq").exists());
    let (opaque_name, wh_root) = if is_root() {
        ("trusted.overlay.opaque", true)
    } else {
        ("user.overlay.opaque", false)
    };
    assert_eq!(xattr(&d.join("opaque"), opaque_name).as_deref(), Some(&b"y"[..]));
    assert_eq!(fs::read(d.join("opaque/new")).unwrap(), b"new\n");
    if wh_root {
        let wh = m("dir/gone");
        assert!(
            wh.file_type().is_char_device() && wh.rdev() == 0,
            "whiteout is char 0/0"
        );
        assert_eq!(m("suid").mode() & 0o7777, 0o4755, "setuid kept");
        assert_eq!((m("dir/file").uid(), m("dir/file").gid()), (1234, 5678));
        assert_eq!((m("abs-link").uid(), m("abs-link").gid()), (4321, 8765));
        let null = m("null");
        assert!(null.file_type().is_char_device());
        assert_eq!(null.rdev(), rustix::fs::makedev(1, 3));
        assert_eq!((null.uid(), null.gid()), (7, 9));
    } else {
        eprintln!("not root: owner, setuid, device and char-0/0 whiteout checks skipped");
    }
}

#[test]
fn plain_gzip_and_zstd_tarballs_import_to_the_same_exact_layer() {
    let t = tempfile::tempdir().unwrap();
    let tar = build_rich_tree(t.path());
    let diff_id = sha256_file(&tar);
    let gz = t.path().join("rich.tar.gz");
    sh(&format!("gzip -c {} > {}", tar.display(), gz.display()));
    let mut inputs = vec![tar.clone(), gz];
    if have("zstd") {
        let zst = t.path().join("rich.tar.zst");
        sh(&format!("zstd -q -c {} > {}", tar.display(), zst.display()));
        inputs.push(zst);
    } else {
        eprintln!("zstd not installed: zstd case skipped");
    }
    for (i, input) in inputs.iter().enumerate() {
        let store = t.path().join(format!("store{i}"));
        let chain = import_ok(&store, input, &[]);
        assert_eq!(
            chain,
            diff_id,
            "{}: a base layer's chain ID is its diffID",
            input.display()
        );
        check_rich_layer(&diff_dir(&store, &chain));
        let rec: serde_json::Value = serde_json::from_slice(
            &fs::read(store.join("layers").join(&chain[7..]).join("layer.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(rec["diff_id"], diff_id);
        assert_eq!(rec["chain_id"], chain);
        assert!(rec["parent"].is_null());
        assert!(rec["manifest_digest"].as_str().unwrap().starts_with("sha256:"));
        assert!(rec["entries"].as_u64().unwrap() >= 15);
        assert!(store
            .join("layers")
            .join(&chain[7..])
            .join("diff.verlay-manifest")
            .is_file());
        assert_nothing_left_in_tmp(&store);
    }
}

fn assert_nothing_left_in_tmp(store: &Path) {
    assert_eq!(dir_names(&store.join("tmp")), Vec::<String>::new());
}

#[test]
fn child_chain_id_is_sha256_of_parent_space_diff_id_and_reimport_is_a_no_op() {
    let t = tempfile::tempdir().unwrap();
    sh(&format!(
        "cd {}; mkdir a b; echo base > a/f; echo child > b/g; tar -C a -cf a.tar .; tar -C b -cf b.tar .",
        t.path().display()
    ));
    let store = t.path().join("store");
    let (a, b) = (t.path().join("a.tar"), t.path().join("b.tar"));
    let base = import_ok(&store, &a, &["--fsync-each"]);
    let child = import_ok(&store, &b, &["--parent", &base]);
    let hand = format!(
        "sha256:{:x}",
        Sha256::digest(format!("{} {}", sha256_file(&a), sha256_file(&b)).as_bytes())
    );
    assert_eq!(child, hand);
    // `printf '%s %s' A B | sha256sum`, as docker documents it, gives the same
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("printf '%s %s' {} {} | sha256sum", base, sha256_file(&b)))
        .output()
        .unwrap();
    assert_eq!(
        format!("sha256:{}", &String::from_utf8_lossy(&out.stdout)[..64]),
        child
    );

    let rec_path = store.join("layers").join(&child[7..]).join("layer.json");
    let before = fs::read(&rec_path).unwrap();
    assert_eq!(
        import_ok(&store, &b, &["--parent", &base]),
        child,
        "re-import prints the chain ID"
    );
    assert_eq!(
        import_ok(&store, &b, &["--parent", &base, "--diff-id", &sha256_file(&b)]),
        child
    );
    assert_eq!(fs::read(&rec_path).unwrap(), before, "re-import writes nothing");
    assert_eq!(dir_names(&store.join("layers")).len(), 2);

    // layer path and ls
    let out = verlay(&[
        "layer".as_ref(),
        "path".as_ref(),
        "--store".as_ref(),
        store.as_os_str(),
        child.as_ref(),
    ]);
    assert!(out.status.success());
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert_eq!(fs::read(p.join("g")).unwrap(), b"child\n");
    fs::remove_file(store.join("layers").join(&base[7..]).join("diff.verlay-manifest")).unwrap();
    let out = verlay(&[
        "layer".as_ref(),
        "ls".as_ref(),
        "--store".as_ref(),
        store.as_os_str(),
        "--no-trunc".as_ref(),
    ]);
    let ls = String::from_utf8_lossy(&out.stdout);
    let line = |id: &str| {
        ls.lines()
            .find(|l| l.starts_with(id))
            .unwrap_or_else(|| panic!("{id} in\n{ls}"))
    };
    assert!(line(&child).ends_with("ok"), "{ls}");
    assert!(line(&child).contains(&base), "parent shown: {ls}");
    assert!(line(&base).ends_with("missing manifest"), "{ls}");

    // an unknown parent is refused
    let (_, err, ok) = import(&store, &b, &["--parent", &format!("sha256:{}", "0".repeat(64))]);
    assert!(!ok && err.contains("import the parent layer first"), "{err}");
}

#[test]
fn diff_id_mismatch_is_refused_and_nothing_published() {
    let t = tempfile::tempdir().unwrap();
    sh(&format!(
        "cd {}; mkdir a; echo x > a/f; tar -C a -cf a.tar .",
        t.path().display()
    ));
    let store = t.path().join("store");
    let wrong = format!("sha256:{}", "ab".repeat(32));
    let (_, err, ok) = import(&store, &t.path().join("a.tar"), &["--diff-id", &wrong]);
    assert!(!ok);
    assert!(err.contains("diffID mismatch") && err.contains(&wrong), "{err}");
    assert_nothing_published(&store);
}

/// A tar with raw entries that GNU tar will not write: (name, type, link target, data).
fn raw_tar(path: &Path, entries: &[(&str, tar::EntryType, &str, &[u8])]) {
    let mut b = tar::Builder::new(fs::File::create(path).unwrap());
    for (name, ty, link, data) in entries {
        let mut h = tar::Header::new_ustar();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_entry_type(*ty);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.finish().unwrap();
}

#[test]
fn hostile_tarballs_are_refused_and_nothing_is_published() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let outside = d.join("outside");
    fs::create_dir(&outside).unwrap();
    sh(&format!(
        r#"cd {d}; mkdir src; echo evil > src/x
        tar -P --transform='s,^x$,../x,' -C src -cf dotdot.tar x
        tar -P --transform='s,^x$,a/../../x,' -C src -cf dotdot2.tar x
        tar -P --transform='s,^x$,/abs-x,' -C src -cf abs.tar x
        ln -s {out} src/a
        tar -C src -cf through-symlink.tar a
        tar -P -C src --transform='s,^x$,a/pwned,' -rf through-symlink.tar x
        mkdir -p nested/d; ln -s .. nested/d/up; tar -C nested -cf nested.tar d
        tar -P -C src --transform='s,^x$,d/up/up/pwned2,' -rf nested.tar x
        printf 'garbage that is not a tar archive%.0s' $(seq 40) > garbage.tar
        "#,
        d = d.display(),
        out = outside.display()
    ));
    let e = tar::EntryType::Regular;
    raw_tar(
        &d.join("hardlink-out.tar"),
        &[("pw", tar::EntryType::Link, "../../../etc/passwd", b"")],
    );
    raw_tar(
        &d.join("hardlink-abs.tar"),
        &[("pw", tar::EntryType::Link, "/etc/passwd", b"")],
    );
    raw_tar(
        &d.join("hardlink-missing.tar"),
        &[("pw", tar::EntryType::Link, "etc/passwd", b"")],
    );
    raw_tar(
        &d.join("hardlink-through-symlink.tar"),
        &[
            ("a", tar::EntryType::Symlink, "/etc", b""),
            ("pw", tar::EntryType::Link, "a/passwd", b""),
        ],
    );
    raw_tar(&d.join("whiteout-dotdot.tar"), &[("d/.wh...", e, "", b"")]);
    // truncated: cut inside a file's data, and cut cleanly after an entry (no end blocks)
    sh(&format!(
        r#"cd {d}; mkdir big; head -c 100000 /dev/urandom > big/f; echo tail > big/g
        tar --sort=name -C big -cf big.tar .; head -c 60000 big.tar > cut-data.tar
        head -c 102400 big.tar > cut-boundary.tar
        gzip -c big.tar | head -c 50000 > cut.tar.gz"#,
        d = d.display()
    ));
    let cases: &[(&str, &str)] = &[
        ("dotdot.tar", "'..' component"),
        ("dotdot2.tar", "'..' component"),
        ("abs.tar", "absolute name"),
        ("through-symlink.tar", "goes through a symlink"),
        ("nested.tar", "goes through a symlink"),
        ("hardlink-out.tar", "'..' component"),
        ("hardlink-abs.tar", "absolute name"),
        ("hardlink-missing.tar", "not in the layer"),
        ("hardlink-through-symlink.tar", "goes through a symlink"),
        ("whiteout-dotdot.tar", "whiteout of an invalid name"),
        ("garbage.tar", "malformed"),
        ("cut-data.tar", "truncated"),
        ("cut-boundary.tar", "truncated"),
        ("cut.tar.gz", "truncated"),
    ];
    for (file, why) in cases {
        let store = d.join(format!("store-{file}"));
        let (out, err, ok) = import(&store, &d.join(file), &[]);
        assert!(!ok, "{file} must be refused, got {out}");
        assert!(err.contains(why), "{file}: expected \"{why}\" in: {err}");
        assert!(err.contains("nothing was published"), "{file}: {err}");
        assert_nothing_published(&store);
    }
    assert_eq!(
        dir_names(&outside),
        Vec::<String>::new(),
        "nothing written outside the layer"
    );
    assert!(!d.join("x").exists() && !Path::new("/abs-x").exists());
}

/// The test image, built once per test binary.
fn test_image() -> Option<&'static Path> {
    static IMG: OnceLock<Option<PathBuf>> = OnceLock::new();
    IMG.get_or_init(|| {
        for (what, ok) in [
            (
                "busybox-static (/bin/busybox)",
                Path::new("/bin/busybox").exists(),
            ),
            ("jq", have("jq")),
            ("tests/e2e/image.sh", recipe().exists()),
        ] {
            if !ok {
                eprintln!("SKIP image tests: {what} missing");
                return None;
            }
        }
        let dir = tempfile::tempdir().unwrap().keep();
        let out = Command::new("bash")
            .arg(recipe())
            .arg(dir.join("img"))
            .output()
            .unwrap();
        if !out.status.success() {
            eprintln!(
                "SKIP image tests: {} failed: {}",
                recipe().display(),
                String::from_utf8_lossy(&out.stderr)
            );
            return None;
        }
        Some(dir.join("img"))
    })
    .as_deref()
}

fn image_import(store: &Path, src: &Path) -> Output {
    verlay(&[
        "image".as_ref(),
        "import".as_ref(),
        "--store".as_ref(),
        store.as_os_str(),
        src.as_os_str(),
    ])
}

fn env_var(img: &Path, name: &str) -> String {
    let env = fs::read_to_string(img.join("image.env")).unwrap();
    let line = env.lines().find(|l| l.starts_with(&format!("{name}="))).unwrap();
    line[name.len() + 1..].trim_matches('"').to_string()
}

#[test]
fn image_import_from_oci_layout_docker_archive_and_oci_archive_mounts_with_whiteouts_resolved() {
    let Some(img) = test_image() else { return };
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("store");
    let mut lowerdirs = Vec::new();
    for src in [
        img.join("oci"),
        img.join("image.docker.tar"),
        img.join("image.oci.tar"),
    ] {
        let out = image_import(&store, &src);
        assert!(
            out.status.success(),
            "{}: {}",
            src.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        lowerdirs.push(String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
    assert!(lowerdirs.iter().all(|l| *l == lowerdirs[0]), "{lowerdirs:?}");
    let lowerdir = &lowerdirs[0];

    // chain IDs by hand from the image's diff IDs, top layer first in lowerdir=
    let ids: Vec<String> = env_var(img, "DIFF_IDS").split(' ').map(str::to_owned).collect();
    let mut chains = vec![ids[0].clone()];
    for id in &ids[1..] {
        let prev = chains.last().unwrap();
        chains.push(format!(
            "sha256:{:x}",
            Sha256::digest(format!("{prev} {id}").as_bytes())
        ));
    }
    let want: Vec<String> = chains
        .iter()
        .rev()
        .map(|c| diff_dir(&store.canonicalize().unwrap(), c).display().to_string())
        .collect();
    assert_eq!(*lowerdir, want.join(":"));
    assert_eq!(dir_names(&store.join("layers")).len(), 3);

    // the layers in kernel overlayfs form
    let l2 = diff_dir(&store, &chains[1]);
    if is_root() {
        let wh = fs::symlink_metadata(l2.join("etc/remove-me")).unwrap();
        assert!(wh.file_type().is_char_device() && wh.rdev() == 0);
        assert_eq!(
            xattr(&l2.join("opaque"), "trusted.overlay.opaque").as_deref(),
            Some(&b"y"[..])
        );
    }
    let l3 = diff_dir(&store, &chains[2]);
    assert_eq!(
        fs::metadata(l3.join("data/blob")).unwrap().ino(),
        fs::metadata(l3.join("data/hardlink")).unwrap().ino()
    );

    // the merged view, through kernel overlayfs
    let mnt = t.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let guard = if is_root() {
        Mount::kernel_overlay(&format!("ro,lowerdir={lowerdir}"), &mnt).ok()
    } else {
        None
    };
    if guard.is_none() {
        eprintln!("kernel overlayfs mount not possible here: merged-view checks skipped");
        return;
    }
    let res = std::panic::catch_unwind(|| {
        assert!(!mnt.join("etc/remove-me").exists(), "whiteout resolved");
        assert_eq!(
            dir_names(&mnt.join("opaque")),
            vec!["b"],
            "opaque dir hides layer 1"
        );
        assert_eq!(fs::read(mnt.join("etc/motd")).unwrap(), b"motd from layer2\n");
        assert_eq!(fs::read(mnt.join("etc/layer2")).unwrap(), b"new in layer2\n");
        assert_eq!(fs::read_link(mnt.join("data/link")).unwrap(), Path::new("blob"));
        assert_eq!(fs::read(mnt.join("data/hardlink")).unwrap().len(), 1 << 20);
        assert!(
            fs::metadata(mnt.join("bin/busybox"))
                .unwrap()
                .permissions()
                .mode()
                & 0o111
                != 0
        );
    });
    drop(guard);
    if let Err(p) = res {
        std::panic::resume_unwind(p);
    }
}

#[test]
fn image_with_a_corrupt_blob_is_refused_and_that_layer_not_published() {
    let Some(img) = test_image() else { return };
    let t = tempfile::tempdir().unwrap();
    let oci = t.path().join("oci");
    sh(&format!("cp -r {} {}", img.join("oci").display(), oci.display()));
    // flip one byte in the middle of layer 3's blob
    let digests = env_var(img, "LAYER_DIGESTS");
    let l3 = digests
        .split(' ')
        .nth(2)
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let blob = oci.join("blobs/sha256").join(&l3);
    let mut bytes = fs::read(&blob).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    fs::write(&blob, bytes).unwrap();
    let store = t.path().join("store");
    let out = image_import(&store, &oci);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("mismatch") || err.contains("malformed") || err.contains("truncated"),
        "{err}"
    );
    assert!(err.contains("layer 3"), "names the layer: {err}");
    assert_eq!(
        dir_names(&store.join("layers")).len(),
        2,
        "layers 1 and 2 are fine, 3 is not published"
    );
    assert_nothing_left_in_tmp(&store);
}

#[test]
fn import_killed_midway_leaves_no_layer_and_the_next_command_removes_and_reports_the_leftover() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    // ~512 MiB in one file: long enough to be caught in the middle of the unpack.
    sh(&format!(
        "cd {}; mkdir big; for i in 1 2 3 4; do head -c 1M /dev/urandom > big/small$i; done
         truncate -s 512M big/zeros; tar --sort=name -C big -cf big.tar .",
        d.display()
    ));
    let store = d.join("store");
    let mut child = Command::new(BIN)
        .args(["layer", "import", "--store"])
        .arg(&store)
        .arg(d.join("big.tar"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill as soon as the import has started writing its temporary layer.
    let deadline = Instant::now() + Duration::from_secs(30);
    let started = loop {
        let tmp = dir_names(&store.join("tmp"));
        if let Some(u) = tmp.first() {
            if dir_names(&store.join("tmp").join(u).join("diff")).len() >= 2 {
                break true;
            }
        }
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            break false;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
        rustix::process::Signal::KILL,
    )
    .ok();
    let status = child.wait().unwrap();
    assert!(
        started,
        "the import finished before it could be killed ({status})"
    );
    assert_eq!(
        dir_names(&store.join("layers")),
        Vec::<String>::new(),
        "nothing published"
    );
    let leftovers = dir_names(&store.join("tmp"));
    assert_eq!(leftovers.len(), 1, "the killed import's temporary dir is left");

    let out = verlay(&[
        "layer".as_ref(),
        "ls".as_ref(),
        "--store".as_ref(),
        store.as_os_str(),
    ]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("removed the leftover of an interrupted import") && err.contains(&leftovers[0]),
        "{err}"
    );
    assert_nothing_published(&store);

    // and the layer imports cleanly afterwards
    let chain = import_ok(&store, &d.join("big.tar"), &[]);
    assert_eq!(chain, sha256_file(&d.join("big.tar")));
}

#[test]
fn full_disk_says_disk_full_and_publishes_nothing() {
    if !is_root() {
        eprintln!("SKIP: needs root to mount a small tmpfs");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    sh(&format!(
        "cd {}; mkdir src small; head -c 3M /dev/urandom > src/f; tar -C src -cf l.tar .",
        d.display()
    ));
    let small = d.join("small");
    let Ok(guard) = Mount::try_fs(&["-t", "tmpfs", "-o", "size=1m", "tmpfs"], &small) else {
        eprintln!("SKIP: cannot mount tmpfs");
        return;
    };
    let store = small.join("store");
    let (_, err, ok) = import(&store, &d.join("l.tar"), &[]);
    let listing = (dir_names(&store.join("layers")), dir_names(&store.join("tmp")));
    drop(guard);
    assert!(!ok);
    assert!(
        err.contains("disk full") && err.contains("nothing was published"),
        "{err}"
    );
    assert_eq!(listing, (Vec::new(), Vec::new()));
}

/// An import that dies right after each named step (VERLAY_CRASH_AT aborts the process:
/// no cleanup runs, as with kill -9) leaves either no layer or a complete one that
/// verifies clean; the next store command removes the leftover and a re-import works.
#[test]
fn import_crashed_after_each_step_leaves_no_layer_or_a_complete_one() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    sh(&format!(
        "cd {}; mkdir src; echo a > src/a; mkdir src/d; head -c 200000 /dev/urandom > src/d/big
         ln -s a src/link; tar --sort=name -C src -cf layer.tar .",
        d.display()
    ));
    let steps = [
        "import.unpack",
        "import.fsync",
        "import.seal",
        "import.record",
        "import.publish",
    ];
    for step in steps {
        let store = d.join(format!("store-{step}"));
        let out = Command::new(BIN)
            .args(["layer", "import", "--store"])
            .arg(&store)
            .arg(d.join("layer.tar"))
            .env("VERLAY_CRASH_AT", step)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{step}: the import must have died");
        let published = dir_names(&store.join("layers"));
        if step == "import.publish" {
            // The rename happened: the layer is complete and verifies clean.
            assert_eq!(published.len(), 1, "{step}: {published:?}");
            let diff = store.join("layers").join(&published[0]).join("diff");
            let v = Command::new(BIN).arg("verify").arg(&diff).output().unwrap();
            assert_eq!(
                v.status.code(),
                Some(0),
                "{step}: {}",
                String::from_utf8_lossy(&v.stdout)
            );
        } else {
            assert_eq!(
                published,
                Vec::<String>::new(),
                "{step}: nothing may be published"
            );
        }
        // The next store command cleans up, and importing again gives the complete layer.
        let chain = import_ok(&store, &d.join("layer.tar"), &[]);
        assert_eq!(
            dir_names(&store.join("tmp")),
            Vec::<String>::new(),
            "{step}: tmp/ cleaned"
        );
        let v = Command::new(BIN)
            .arg("verify")
            .arg(diff_dir(&store, &chain))
            .output()
            .unwrap();
        assert_eq!(
            v.status.code(),
            Some(0),
            "{step}: re-imported layer verifies clean"
        );
    }
}

/// An unprivileged user can import layers (podman rootless keeps its store under $HOME):
/// owners are the importer's, whiteouts stay in OCI form (no mknod without CAP_MKNOD), opaque
/// dirs get `user.overlay.opaque`; the layer verifies clean and mounts with the whiteout and
/// the opaque dir applied.
#[test]
fn unprivileged_import_verifies_and_mounts_with_whiteouts_and_opaque_dirs() {
    if !is_root() {
        eprintln!("SKIP: needs root to switch to an unprivileged uid and to mount");
        return;
    }
    const NOBODY: u32 = 65534;
    let t = tempfile::Builder::new()
        .prefix("verlay-store.")
        .tempdir_in("/tmp")
        .unwrap();
    let d = t.path();
    fs::set_permissions(d, fs::Permissions::from_mode(0o777)).unwrap();
    sh(&format!(
        "cd {}; mkdir -p base/dir top/dir mnt
         echo a > base/a; echo gone > base/gone; echo x > base/dir/x
         echo y > top/dir/y; : > top/.wh.gone; : > top/dir/.wh..wh..opq
         tar --sort=name --owner=1234 --group=1234 -C base -cf base.tar .
         tar --sort=name -C top -cf top.tar .
         chmod 0644 base.tar top.tar",
        d.display()
    ));
    let as_nobody = |args: &[&OsStr]| {
        use std::os::unix::process::CommandExt;
        let out = Command::new(BIN)
            .args(args)
            .uid(NOBODY)
            .gid(NOBODY)
            .output()
            .unwrap();
        (
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
            out.status.success(),
        )
    };
    let store = d.join("store");
    let imp = |tar: &str, parent: Option<&str>| {
        let mut a: Vec<&OsStr> = vec![
            "layer".as_ref(),
            "import".as_ref(),
            "--store".as_ref(),
            store.as_os_str(),
        ];
        if let Some(p) = parent {
            a.push("--parent".as_ref());
            a.push(p.as_ref());
        }
        let tar = d.join(tar);
        a.push(tar.as_os_str());
        let (out, err, ok) = as_nobody(&a);
        assert!(ok, "unprivileged import of {tar:?}: {err}");
        out
    };
    let base = imp("base.tar", None);
    let top = imp("top.tar", Some(&base));
    for chain in [&base, &top] {
        let diff = diff_dir(&store, chain);
        let (out, err, ok) = as_nobody(&["verify".as_ref(), diff.as_os_str()]);
        assert!(ok, "verify {chain}: {out}{err}");
        let m = fs::symlink_metadata(diff.join(if chain == &base { "a" } else { "dir/y" })).unwrap();
        assert_eq!(m.uid(), NOBODY, "the importer owns what it unpacked");
    }
    // Linux >= 5.8 lets anyone make a char 0/0 whiteout; older kernels keep the OCI form.
    let top_diff = diff_dir(&store, &top);
    let kernel_wh = fs::symlink_metadata(top_diff.join("gone"))
        .is_ok_and(|m| m.file_type().is_char_device() && m.rdev() == 0);
    assert!(
        kernel_wh || top_diff.join(".wh.gone").is_file(),
        "the whiteout is kept"
    );
    assert_eq!(
        xattr(&diff_dir(&store, &top).join("dir"), "user.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    let mnt = d.join("mnt");
    let opts = format!(
        "lowerdir={}:{}",
        diff_dir(&store, &top).display(),
        diff_dir(&store, &base).display()
    );
    let v = Launch::verlay(&opts, &mnt).log(&d.join("verlay.log")).start();
    assert_eq!(fs::read(mnt.join("a")).unwrap(), b"a\n");
    assert!(!mnt.join("gone").exists(), "the whiteout hides gone");
    assert_eq!(
        dir_names(&mnt.join("dir")),
        vec!["y".to_string()],
        "dir is opaque"
    );
    assert!(!v.log().contains("ERROR"), "{}", v.log());
    drop(v);
}

// Hostile input with bounded memory and time: tests/store/hostile.rs.
#[path = "store/hostile.rs"]
mod hostile;
