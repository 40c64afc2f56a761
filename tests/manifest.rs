//! The layer manifest records every entry of a real layer exactly (type, mode, owner, size,
//! device, symlink target, xattrs, hard links, chunk digests), deterministically; it opens
//! without parsing (milliseconds for 100,000 entries); a damaged manifest is an error, never
//! a panic; and `scrub` / `verlay verify` name every kind of damage to a layer precisely.
//!
//! Needs root (mknod, chown, trusted.* xattrs), like the mount tests.

use std::ffi::OsString;
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{lchown, symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use rustix::fs::{FileType, Mode, XattrFlags, CWD};
use sha2::{Digest, Sha256};
use verlay::digest::hex;
use verlay::error::Error;
use verlay::layer::Kind;
use verlay::lower::manifest::{self, chunk_digest, manifest_path, Manifest, Problem, CHUNK_SIZE};

/// Size of the multi-chunk file: three full chunks and a short fourth.
const BIG: usize = 3 * CHUNK_SIZE as usize + 1000;
/// Size of the sparse file (mostly a hole, some data in the middle).
const SPARSE: u64 = 10 * 1024 * 1024;

/// Deterministic bytes (xorshift), so content differs from chunk to chunk.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn write(p: &Path, data: &[u8], mode: u32) {
    fs::write(p, data).unwrap();
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

fn mknod(p: &Path, ft: FileType, mode: u32, major: u32, minor: u32) {
    rustix::fs::mknodat(
        CWD,
        p,
        ft,
        Mode::from_bits_truncate(mode),
        rustix::fs::makedev(major, minor),
    )
    .unwrap();
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

fn setxattr(p: &Path, name: &str, value: &[u8]) {
    rustix::fs::lsetxattr(p, name, value, XattrFlags::empty()).unwrap();
}

/// A layer with every kind of entry. `reverse` creates the same tree in another order (so
/// inode numbers and directory order differ, the content does not).
fn make_tree(root: &Path, reverse: bool) {
    type Step = Box<dyn Fn(&Path)>;
    let mut steps: Vec<Step> = vec![
        Box::new(|r| write(&r.join("a.txt"), b"hello\n", 0o644)),
        Box::new(|r| write(&r.join("empty"), b"", 0o600)),
        Box::new(|r| write(&r.join("big"), &pattern(BIG, 7), 0o644)),
        Box::new(|r| {
            let mut f = fs::File::create(r.join("sparse")).unwrap();
            f.set_len(SPARSE).unwrap();
            f.seek(SeekFrom::Start(SPARSE / 2)).unwrap();
            f.write_all(b"island in a hole").unwrap();
        }),
        Box::new(|r| write(&r.join("setuid"), b"#!/bin/sh\n", 0o4755)),
        Box::new(|r| {
            write(&r.join("owned"), b"mine", 0o640);
            lchown(r.join("owned"), Some(1234), Some(5678)).unwrap();
        }),
        Box::new(|r| symlink("a.txt", r.join("sl")).unwrap()),
        Box::new(|r| symlink("../nowhere/at all", r.join("dangling")).unwrap()),
        Box::new(|r| mknod(&r.join("fifo"), FileType::Fifo, 0o644, 0, 0)),
        Box::new(|r| mknod(&r.join("null"), FileType::CharacterDevice, 0o666, 1, 3)),
        Box::new(|r| mknod(&r.join("blk"), FileType::BlockDevice, 0o660, 7, 0)),
        Box::new(|r| {
            let _ = std::os::unix::net::UnixListener::bind(r.join("sock")).unwrap();
        }),
    ];
    // Directories first (their contents depend on them), then the rest in either order.
    fs::create_dir_all(root.join("d/e/f")).unwrap();
    fs::set_permissions(root.join("d"), fs::Permissions::from_mode(0o750)).unwrap();
    setxattr(&root.join("d/e"), "trusted.overlay.opaque", b"y");
    setxattr(&root.join("d/e"), "user.note", b"opaque dir");
    write(&root.join("d/e/f/deep"), b"deep", 0o444);
    mknod(&root.join("d/wh"), FileType::CharacterDevice, 0o000, 0, 0);
    write(&root.join("h1"), b"linked", 0o644);
    fs::hard_link(root.join("h1"), root.join("d/h2")).unwrap();
    setxattr(&root.join("h1"), "user.both", b"links share xattrs");
    if reverse {
        steps.reverse();
    }
    for s in &steps {
        s(root);
    }
}

/// A fresh layer with every kind of entry, sealed; returns (tempdir, layer dir).
fn sealed_tree() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let layer = tmp.path().join("layer");
    fs::create_dir(&layer).unwrap();
    make_tree(&layer, false);
    manifest::seal(&layer).unwrap();
    (tmp, layer)
}

fn open(layer: &Path) -> Manifest {
    Manifest::open(&manifest_path(layer)).unwrap()
}

fn scrub(layer: &Path) -> Vec<Problem> {
    let m = open(layer);
    let mut calls = 0u64;
    let mut last = (0, 0);
    let problems = manifest::scrub(layer, &m, &mut |done, total| {
        assert!(done <= total, "progress {done} of {total}");
        calls += 1;
        last = (done, total);
    })
    .unwrap();
    assert!(calls > 1, "progress was reported");
    assert_eq!(last.0, last.1, "progress ends at the total");
    problems
}

fn meta(path: &str, what: &str) -> Problem {
    Problem::Metadata {
        path: path.into(),
        what: what.into(),
    }
}

fn sha(d: &[u8; 32]) -> String {
    format!("sha256:{}", hex(d))
}

#[test]
fn roundtrip_records_every_kind_of_entry_exactly() {
    let (_tmp, layer) = sealed_tree();
    let m = open(&layer);
    let get = |p: &str| {
        m.lookup(Path::new(p))
            .unwrap()
            .unwrap_or_else(|| panic!("{p} listed"))
    };

    let root = get("");
    assert_eq!((root.kind, root.path.as_os_str().is_empty()), (Kind::Dir, true));

    let a = get("a.txt");
    assert_eq!((a.kind, a.perm, a.size, a.link_group), (Kind::File, 0o644, 6, 0));
    assert_eq!(a.chunks, vec![chunk_digest(b"hello\n")]);
    assert_eq!((a.uid, a.gid), (0, 0));

    let e = get("empty");
    assert_eq!((e.kind, e.perm, e.size), (Kind::File, 0o600, 0));
    assert!(e.chunks.is_empty(), "an empty file has no chunks");

    let big = get("big");
    let data = pattern(BIG, 7);
    let want: Vec<[u8; 32]> = data.chunks(CHUNK_SIZE as usize).map(chunk_digest).collect();
    assert_eq!(big.chunks.len(), 4);
    assert_eq!(big.chunks, want, "chunk digests, last one short");
    assert_eq!(big.size, BIG as u64);

    let sparse = get("sparse");
    assert_eq!(sparse.size, SPARSE);
    assert_eq!(sparse.chunks.len() as u64, SPARSE / CHUNK_SIZE);
    assert_eq!(
        sparse.chunks[0],
        chunk_digest(&vec![0u8; CHUNK_SIZE as usize]),
        "a hole hashes as zeros"
    );
    let mut island = vec![0u8; CHUNK_SIZE as usize];
    island[..16].copy_from_slice(b"island in a hole");
    assert_eq!(
        sparse.chunks[(SPARSE / 2 / CHUNK_SIZE) as usize],
        chunk_digest(&island)
    );

    assert_eq!(get("setuid").perm, 0o4755);
    let owned = get("owned");
    assert_eq!((owned.uid, owned.gid, owned.perm), (1234, 5678, 0o640));

    let sl = get("sl");
    assert_eq!(
        (sl.kind, sl.target.clone()),
        (Kind::Symlink, Some(OsString::from("a.txt")))
    );
    assert_eq!(sl.size, 0);
    assert_eq!(get("dangling").target, Some(OsString::from("../nowhere/at all")));

    assert_eq!((get("fifo").kind, get("fifo").perm), (Kind::Fifo, 0o644));
    let null = get("null");
    assert_eq!((null.kind, null.rdev), (Kind::Char, rustix::fs::makedev(1, 3)));
    let blk = get("blk");
    assert_eq!((blk.kind, blk.rdev), (Kind::Block, rustix::fs::makedev(7, 0)));
    assert_eq!(get("sock").kind, Kind::Socket);
    let wh = get("d/wh");
    assert_eq!(
        (wh.kind, wh.rdev, wh.perm),
        (Kind::Char, 0, 0),
        "a whiteout is char 0/0"
    );

    let d = get("d");
    assert_eq!((d.kind, d.perm), (Kind::Dir, 0o750));
    let de = get("d/e");
    assert_eq!(
        de.xattrs,
        vec![
            (OsString::from("trusted.overlay.opaque"), b"y".to_vec()),
            (OsString::from("user.note"), b"opaque dir".to_vec()),
        ],
        "all xattrs, sorted by name"
    );
    assert_eq!(get("d/e/f/deep").perm, 0o444);

    let h1 = get("h1");
    let h2 = get("d/h2");
    assert_ne!(h1.link_group, 0);
    assert_eq!(h1.link_group, h2.link_group, "hard links share a group");
    assert_eq!(h1.chunks, h2.chunks);
    assert_eq!(
        h2.xattrs,
        vec![(OsString::from("user.both"), b"links share xattrs".to_vec())]
    );
    assert_eq!(
        m.iter().filter(|e| e.as_ref().unwrap().link_group != 0).count(),
        2
    );

    // 1 root + 14 top-level + d/{e,e/f,e/f/deep,wh,h2} = 20
    assert_eq!(m.len(), 20);
    assert!(!m.is_empty());
    m.check().unwrap();
}

#[test]
fn lookup_and_children_answer_from_the_sorted_table() {
    let (_tmp, layer) = sealed_tree();
    let m = open(&layer);
    let names = |dir: &str| -> Vec<String> {
        m.children(Path::new(dir))
            .unwrap()
            .iter()
            .map(|e| e.path.to_string_lossy().into_owned())
            .collect()
    };
    assert_eq!(
        names(""),
        [
            "a.txt", "big", "blk", "d", "dangling", "empty", "fifo", "h1", "null", "owned", "setuid", "sl",
            "sock", "sparse"
        ]
    );
    assert_eq!(names("d"), ["d/e", "d/h2", "d/wh"]);
    assert_eq!(names("d/e/f"), ["d/e/f/deep"]);
    assert!(names("a.txt").is_empty(), "a file has no children");
    assert!(names("nope").is_empty());
    assert!(m.lookup(Path::new("nope")).unwrap().is_none());
    assert!(m.lookup(Path::new("d/nope")).unwrap().is_none());
    assert!(m.lookup(Path::new("d/e/f/deep/x")).unwrap().is_none());
    assert!(
        m.lookup(Path::new("/a.txt")).unwrap().is_none(),
        "absolute paths are never listed"
    );
    assert!(m.lookup(Path::new("d/../a.txt")).unwrap().is_none());
    assert_eq!(
        m.lookup(Path::new("./d/e")).unwrap().unwrap().path,
        PathBuf::from("d/e")
    );

    // iter: every entry once, parents before children, and lookup agrees with it.
    let all: Vec<_> = m.iter().collect::<Result<_, _>>().unwrap();
    assert_eq!(all.len(), m.len());
    for (i, e) in all.iter().enumerate() {
        assert_eq!(m.lookup(&e.path).unwrap().as_ref(), Some(e));
        if let Some(parent) = e.path.parent() {
            let pi = all.iter().position(|p| p.path == parent).expect("parent listed");
            assert!(pi < i, "{} comes after its parent", e.path.display());
        }
    }
}

#[test]
fn same_tree_gives_same_bytes_and_digest() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("other-name"));
    fs::create_dir(&a).unwrap();
    fs::create_dir(&b).unwrap();
    make_tree(&a, false);
    make_tree(&b, true);
    let bytes = manifest::build(&a).unwrap();
    assert_eq!(bytes, manifest::build(&a).unwrap(), "building twice");
    assert_eq!(
        bytes,
        manifest::build(&b).unwrap(),
        "same tree made in another order, another name"
    );

    // Times are not part of the manifest.
    let f = fs::File::options().write(true).open(a.join("big")).unwrap();
    f.set_modified(std::time::SystemTime::UNIX_EPOCH).unwrap();
    assert_eq!(bytes, manifest::build(&a).unwrap(), "after changing an mtime");

    // Sealing writes exactly these bytes beside the layer; the digest is their sha256.
    let digest = manifest::seal(&a).unwrap();
    let mpath = manifest_path(&a);
    assert_eq!(mpath, tmp.path().join("a.verlay-manifest"));
    assert_eq!(fs::read(&mpath).unwrap(), bytes);
    assert_eq!(digest, format!("sha256:{}", hex(&Sha256::digest(&bytes))));
    assert_eq!(Manifest::open(&mpath).unwrap().digest(), digest);
    assert_eq!(manifest::seal(&b).unwrap(), digest);
    let leftovers: Vec<_> = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp."))
        .collect();
    assert!(leftovers.is_empty(), "no temp file left: {leftovers:?}");

    // A one-byte change anywhere changes the digest.
    fs::write(a.join("a.txt"), b"hellO\n").unwrap();
    assert_ne!(manifest::seal(&a).unwrap(), digest);
}

#[test]
fn intact_layer_scrubs_clean() {
    let (_tmp, layer) = sealed_tree();
    assert_eq!(scrub(&layer), vec![]);
}

#[test]
fn scrub_finds_a_flipped_byte_in_the_right_chunk() {
    let (_tmp, layer) = sealed_tree();
    let mut data = pattern(BIG, 7);
    let at = 2 * CHUNK_SIZE as usize + CHUNK_SIZE as usize / 3;
    let want = chunk_digest(&data[2 * CHUNK_SIZE as usize..3 * CHUNK_SIZE as usize]);
    data[at] ^= 0x01;
    let got = chunk_digest(&data[2 * CHUNK_SIZE as usize..3 * CHUNK_SIZE as usize]);
    let mut f = fs::File::options().write(true).open(layer.join("big")).unwrap();
    f.seek(SeekFrom::Start(at as u64)).unwrap();
    f.write_all(&data[at..at + 1]).unwrap();
    drop(f);
    assert_eq!(
        scrub(&layer),
        vec![Problem::Content {
            path: "big".into(),
            chunk: 2,
            chunk_size: CHUNK_SIZE,
            expected: sha(&want),
            actual: sha(&got),
        }]
    );
}

#[test]
fn scrub_finds_truncated_and_extended_files() {
    let (_tmp, layer) = sealed_tree();
    fs::File::options()
        .write(true)
        .open(layer.join("big"))
        .unwrap()
        .set_len(100)
        .unwrap();
    fs::File::options()
        .append(true)
        .open(layer.join("a.txt"))
        .unwrap()
        .write_all(b"more")
        .unwrap();
    assert_eq!(
        scrub(&layer),
        vec![
            meta("a.txt", "size 10, manifest says 6"),
            meta("big", &format!("size 100, manifest says {BIG}")),
        ]
    );
}

#[test]
fn scrub_finds_deleted_and_added_entries() {
    let (_tmp, layer) = sealed_tree();
    fs::remove_file(layer.join("a.txt")).unwrap();
    fs::remove_dir_all(layer.join("d/e")).unwrap();
    write(&layer.join("d/new"), b"x", 0o644);
    fs::create_dir_all(layer.join("newdir/sub")).unwrap();
    assert_eq!(
        scrub(&layer),
        vec![
            // In manifest order: a directory's unlisted entries when it is visited.
            Problem::Unlisted {
                path: "newdir".into()
            },
            Problem::Missing { path: "a.txt".into() },
            Problem::Unlisted { path: "d/new".into() },
            // d/e/f and d/e/f/deep are not reported again under a missing d/e.
            Problem::Missing { path: "d/e".into() },
        ]
    );
}

#[test]
fn scrub_finds_changed_mode_owner_and_symlink_target() {
    let (_tmp, layer) = sealed_tree();
    fs::set_permissions(layer.join("setuid"), fs::Permissions::from_mode(0o755)).unwrap();
    lchown(layer.join("owned"), Some(0), None).unwrap();
    lchown(layer.join("a.txt"), None, Some(42)).unwrap();
    fs::remove_file(layer.join("sl")).unwrap();
    symlink("/etc/passwd", layer.join("sl")).unwrap();
    assert_eq!(
        scrub(&layer),
        vec![
            meta("a.txt", "group gid 42, manifest says 0"),
            meta("owned", "owner uid 0, manifest says 1234"),
            meta("setuid", "mode 0755, manifest says 4755"),
            meta("sl", "symlink target \"/etc/passwd\", manifest says \"a.txt\""),
        ]
    );
}

#[test]
fn scrub_finds_changed_type_device_xattrs_and_broken_links() {
    let (_tmp, layer) = sealed_tree();
    fs::remove_file(layer.join("d/wh")).unwrap();
    write(&layer.join("d/wh"), b"", 0o000);
    fs::remove_file(layer.join("null")).unwrap();
    mknod(&layer.join("null"), FileType::CharacterDevice, 0o666, 1, 5);
    rustix::fs::lremovexattr(layer.join("d/e"), "trusted.overlay.opaque").unwrap();
    setxattr(&layer.join("d/e/f"), "trusted.overlay.opaque", b"y");
    fs::remove_file(layer.join("d/h2")).unwrap();
    fs::copy(layer.join("h1"), layer.join("d/h2")).unwrap();
    setxattr(&layer.join("d/h2"), "user.both", b"links share xattrs");
    assert_eq!(
        scrub(&layer),
        vec![
            meta("null", "device 1:5, manifest says 1:3"),
            meta("d/e", "xattr trusted.overlay.opaque missing"),
            meta("d/h2", "not a hard link to h1, manifest says it is"),
            meta("d/wh", "type regular file, manifest says whiteout"),
            meta("d/e/f", "xattr trusted.overlay.opaque not in the manifest"),
        ]
    );
}

#[test]
fn scrub_refuses_a_corrupt_manifest() {
    let (_tmp, layer) = sealed_tree();
    let mpath = manifest_path(&layer);
    let mut bytes = fs::read(&mpath).unwrap();
    // A byte in the digest table: every structure still parses, the trailer catches it.
    let n = bytes.len();
    bytes[n - 32 - 40] ^= 0x80;
    fs::write(&mpath, &bytes).unwrap();
    let m = Manifest::open(&mpath).expect("the header is intact");
    match manifest::scrub(&layer, &m, &mut |_, _| {}) {
        Err(Error::Corrupt { path, .. }) => assert_eq!(path, mpath),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

/// Recompute the trailing sha256, so that damage reaches the structural checks.
fn fix_trailer(b: &mut [u8]) {
    let n = b.len();
    if n >= 32 {
        let d = Sha256::digest(&b[..n - 32]);
        b[n - 32..].copy_from_slice(&d);
    }
}

/// Use every read path of a manifest; must never panic.
fn exercise(bytes: Vec<u8>) -> bool {
    let Ok(m) = Manifest::from_bytes(bytes, Path::new("/x/l.verlay-manifest")) else {
        return false;
    };
    let ok = m.check().is_ok();
    for e in m.iter().take(100).flatten() {
        let _ = m.lookup(&e.path);
        let _ = m.children(&e.path);
    }
    for p in ["", "a.txt", "d", "d/e", "d/e/f/deep", "zzz", "big", "sparse"] {
        let _ = m.lookup(Path::new(p));
        let _ = m.children(Path::new(p));
        let _ = m.children_meta(Path::new(p));
        if let (Ok(kinds), Ok(full)) = (m.child_kinds(Path::new(p)), m.children(Path::new(p))) {
            let want: Vec<(OsString, Kind)> = full
                .iter()
                .map(|e| (e.path.file_name().unwrap_or_default().to_os_string(), e.kind))
                .collect();
            assert_eq!(kinds, want, "child_kinds of {p:?} agrees with children");
        }
        if let Ok(Some(e)) = m.lookup_meta(Path::new(p)) {
            let n = e.size.div_ceil(m.chunk_size());
            for i in [0, n.saturating_sub(1), n, u64::MAX - e.chunk_first] {
                let _ = m.chunk_digest(e.chunk_first.wrapping_add(i));
            }
        }
    }
    let _ = m.digest();
    ok
}

#[test]
fn damaged_manifest_bytes_give_errors_never_panics() {
    let (_tmp, layer) = sealed_tree();
    let good = fs::read(manifest_path(&layer)).unwrap();
    assert!(exercise(good.clone()));
    let mut undetected = 0;
    // The digest table is values, not structure: every byte there is caught the same way (by
    // the trailer), so a sample of it is enough; everything else is flipped byte by byte.
    let digests_off = u64::from_le_bytes(good[88..96].try_into().unwrap()) as usize;
    let digests_end = good.len() - 32;
    let flipped: Vec<usize> = (0..good.len())
        .filter(|i| !(digests_off..digests_end).contains(i) || (i - digests_off) % 61 == 0)
        .collect();
    for &i in &flipped {
        for mask in [0x01u8, 0x80, 0xff] {
            let mut b = good.clone();
            b[i] ^= mask;
            // As stored: every change is caught (by the header checks or the trailer).
            assert!(!exercise(b.clone()), "flip {mask:#x} at {i} went unnoticed");
            // With a matching trailer: decoding must still never panic.
            fix_trailer(&mut b);
            if exercise(b) {
                undetected += 1;
            }
        }
    }
    for &len in &flipped {
        let mut b = good[..len].to_vec();
        assert!(!exercise(b.clone()), "truncation to {len} went unnoticed");
        fix_trailer(&mut b);
        assert!(
            !exercise(b),
            "truncation to {len} with a fixed trailer went unnoticed"
        );
    }
    let mut longer = good.clone();
    longer.extend_from_slice(&[0; 7]);
    assert!(!exercise(longer));
    // Values such as a uid are not structure: a re-trailered change there is only caught
    // against the recorded digest (which the mount and store check).
    println!(
        "manifest of {} bytes: {} of {} re-trailered flips still well-formed",
        good.len(),
        undetected,
        flipped.len() * 3
    );

    // The same through the mmap: a truncated file on disk.
    let mpath = manifest_path(&layer);
    fs::write(&mpath, &good[..good.len() / 2]).unwrap();
    assert!(matches!(Manifest::open(&mpath), Err(Error::Corrupt { .. })));
    fs::write(&mpath, b"").unwrap();
    assert!(matches!(Manifest::open(&mpath), Err(Error::Corrupt { .. })));
}

/// Header offsets of the flag words (docs/layer-format.md).
const VERSION_AT: usize = 8;
const RO_COMPAT_AT: usize = 20;
const INCOMPAT_AT: usize = 24;
const COMPAT_AT: usize = 16;
const CHUNK_SIZE_AT: usize = 28;

#[test]
fn unknown_incompat_flags_refuse_unknown_ro_compat_and_compat_read() {
    let (_tmp, layer) = sealed_tree();
    let good = fs::read(manifest_path(&layer)).unwrap();
    let with = |at: usize, v: u32| {
        let mut b = good.clone();
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
        fix_trailer(&mut b);
        Manifest::from_bytes(b, Path::new("m"))
    };
    assert!(matches!(with(INCOMPAT_AT, 1 << 31), Err(Error::Usage { .. })));
    assert!(matches!(with(VERSION_AT, 2), Err(Error::Usage { .. })));
    for at in [RO_COMPAT_AT, COMPAT_AT] {
        let m = with(at, 1 << 5).unwrap();
        m.check().unwrap();
        assert_eq!(m.lookup(Path::new("a.txt")).unwrap().unwrap().size, 6);
    }
    assert_eq!(with(RO_COMPAT_AT, 1 << 5).unwrap().unknown_ro_compat(), 1 << 5);
}

fn verlay(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_verlay"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn verify_command_exit_codes_and_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let layer = tmp.path().join("l");
    fs::create_dir(&layer).unwrap();
    make_tree(&layer, false);
    let l = layer.to_str().unwrap();

    let (code, out, _) = verlay(&["verify", l]);
    assert_eq!(code, 1);
    assert_eq!(
        out,
        format!("layer {l}: no manifest: run verlay layer seal {l}\n")
    );

    let (code, out, err) = verlay(&["layer", "seal", l]);
    assert_eq!(code, 0, "{err}");
    let digest = open(&layer).digest();
    assert_eq!(out, format!("{digest} {}\n", manifest_path(&layer).display()));

    let (code, out, err) = verlay(&["verify", l]);
    assert_eq!((code, out.as_str()), (0, ""), "{err}");

    fs::remove_file(layer.join("d/e/f/deep")).unwrap();
    fs::set_permissions(layer.join("a.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    let (code, out, _) = verlay(&["verify", l]);
    assert_eq!(code, 1);
    assert_eq!(
        out,
        format!(
            "layer {l}: a.txt: mode 0600, manifest says 0644\n\
             layer {l}: d/e/f/deep: listed in the manifest but missing from the layer\n"
        )
    );

    // Usage errors exit 2.
    assert_eq!(verlay(&["verify"]).0, 2);
    assert_eq!(verlay(&["verify", "--bogus", l]).0, 2);
    assert_eq!(verlay(&["verify", "/does/not/exist"]).0, 2);
    let id = format!("sha256:{}", "ab".repeat(32));
    let (code, _, err) = verlay(&["verify", &id]);
    assert_eq!(code, 2);
    assert!(err.contains("needs a store"), "{err}");
    assert_eq!(verlay(&["layer", "seal"]).0, 2);

    // A store: STORE/layers/<hex>/diff, by chain ID and --all.
    let store = tmp.path().join("store");
    let hex1 = "cd".repeat(32);
    let diff = store.join("layers").join(&hex1).join("diff");
    fs::create_dir_all(&diff).unwrap();
    write(&diff.join("f"), b"content", 0o644);
    manifest::seal(&diff).unwrap();
    let s = store.to_str().unwrap();
    let (code, _, err) = verlay(&["verify", "--store", s, &id]);
    assert_eq!(code, 2);
    assert!(err.contains("not in store"), "{err}");
    assert_eq!(verlay(&["verify", "--store", s, &format!("sha256:{hex1}")]).0, 0);
    assert_eq!(verlay(&["verify", &format!("--store={s}"), "--all"]).0, 0);
    fs::write(diff.join("f"), b"CONTENT").unwrap();
    let (code, out, _) = verlay(&["verify", "--store", s, "--all"]);
    assert_eq!(code, 1);
    assert!(
        out.starts_with(&format!("layer sha256:{hex1}: f: chunk 0 ")),
        "{out}"
    );

    // A corrupt manifest is damage (exit 1) with its own line.
    let mpath = manifest_path(&diff);
    let mut b = fs::read(&mpath).unwrap();
    b[200] ^= 0xff;
    fs::write(&mpath, &b).unwrap();
    let (code, out, _) = verlay(&["verify", "--store", s, "--all"]);
    assert_eq!(code, 1);
    assert!(out.contains("damaged manifest"), "{out}");
}

/// 100,000 entries: open reads only the header, lookups are a binary search.
#[test]
fn hundred_thousand_entries_open_in_milliseconds() {
    const DIRS: usize = 100;
    const PER_DIR: usize = 1000;
    let tmp = tempfile::tempdir().unwrap();
    let layer = tmp.path().join("big-layer");
    let t = Instant::now();
    for d in 0..DIRS {
        let dir = layer.join(format!("dir{d:03}"));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..PER_DIR - 1 {
            fs::write(dir.join(format!("file{f:04}")), format!("{d}/{f}")).unwrap();
        }
    }
    let create = t.elapsed();
    let t = Instant::now();
    manifest::seal(&layer).unwrap();
    let seal = t.elapsed();
    let mpath = manifest_path(&layer);
    let size = fs::metadata(&mpath).unwrap().len();

    let t = Instant::now();
    let m = Manifest::open(&mpath).unwrap();
    let open = t.elapsed();
    assert_eq!(m.len(), 1 + DIRS * PER_DIR, "root + dirs + files");

    const LOOKUPS: usize = 100_000;
    let paths: Vec<PathBuf> = (0..LOOKUPS)
        .map(|i| {
            PathBuf::from(format!(
                "dir{:03}/file{:04}",
                (i * 7) % DIRS,
                (i * 13) % (PER_DIR - 1)
            ))
        })
        .collect();
    let t = Instant::now();
    for p in &paths {
        let e = m.lookup(p).unwrap().expect("listed");
        assert_eq!((&e.path, e.kind, e.chunks.len()), (p, Kind::File, 1));
    }
    let lookup = t.elapsed() / LOOKUPS as u32;
    let t = Instant::now();
    let kids = m.children(Path::new("dir050")).unwrap();
    let children = t.elapsed();
    assert_eq!(kids.len(), PER_DIR - 1);
    let t = Instant::now();
    let digest = m.digest();
    let digest_time = t.elapsed();
    let t = Instant::now();
    let problems = manifest::scrub(&layer, &m, &mut |_, _| {}).unwrap();
    let scrub = t.elapsed();
    assert!(problems.is_empty(), "{problems:?}");

    println!(
        "100k-entry layer: create {create:?}, seal {seal:?}, manifest {size} bytes ({digest}), \
         open {open:?}, lookup {lookup:?} each (avg of {LOOKUPS}), children of a \
         {}-entry dir {children:?}, digest {digest_time:?}, scrub {scrub:?}",
        PER_DIR - 1
    );
    assert!(open.as_millis() < 20, "open took {open:?}");
    assert!(lookup.as_micros() < 50, "lookup took {lookup:?}");
}

/// The chunk size is part of the format: what `seal` writes (4 KiB, with the incompat
/// feature that says the header's chunk size is to be honoured), the first format (64 KiB,
/// no feature) still read, and every other combination refused before anything is read.
#[test]
fn chunk_size_in_the_header_is_checked_and_both_sizes_read() {
    let tmp = tempfile::tempdir().unwrap();
    let layer = tmp.path().join("layer");
    fs::create_dir(&layer).unwrap();
    make_tree(&layer, false);
    let data = pattern(BIG, 7);

    let now = manifest::build(&layer).unwrap();
    let legacy = manifest::build_with_chunk_size(&layer, manifest::LEGACY_CHUNK_SIZE).unwrap();
    let u32_at = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    assert_eq!(
        (u32_at(&now, INCOMPAT_AT), u32_at(&now, CHUNK_SIZE_AT)),
        (1, 4096)
    );
    assert_eq!(
        (u32_at(&legacy, INCOMPAT_AT), u32_at(&legacy, CHUNK_SIZE_AT)),
        (0, 65536)
    );
    assert_ne!(now, legacy, "the chunk size changes the digest");
    for (bytes, cs) in [(&now, 4096u64), (&legacy, 65536)] {
        let m = Manifest::from_bytes(bytes.clone(), Path::new("m")).unwrap();
        m.check().unwrap();
        assert_eq!(m.chunk_size(), cs);
        let full = m.lookup(Path::new("big")).unwrap().unwrap();
        let want: Vec<[u8; 32]> = data.chunks(cs as usize).map(chunk_digest).collect();
        assert_eq!(full.chunks, want, "{cs}-byte chunks");
        let meta = m.lookup_meta(Path::new("big")).unwrap().unwrap();
        assert!(meta.chunks.is_empty(), "lookup_meta copies no digests");
        let in_place: Vec<[u8; 32]> = (0..want.len() as u64)
            .map(|i| m.chunk_digest(meta.chunk_first + i).unwrap())
            .collect();
        assert_eq!(in_place, want, "digests read in place");
    }

    let with = |base: &Vec<u8>, incompat: u32, chunk: u32| {
        let mut b = base.clone();
        b[INCOMPAT_AT..INCOMPAT_AT + 4].copy_from_slice(&incompat.to_le_bytes());
        b[CHUNK_SIZE_AT..CHUNK_SIZE_AT + 4].copy_from_slice(&chunk.to_le_bytes());
        fix_trailer(&mut b);
        Manifest::from_bytes(b, Path::new("m"))
    };
    for (incompat, chunk) in [(0, 4096), (0, 131072), (1, 0), (1, 3000), (1, 2048), (1, 2 << 20)] {
        match with(&now, incompat, chunk) {
            Err(Error::Corrupt { actual, .. }) => assert!(actual.contains("chunk size"), "{actual}"),
            other => panic!("incompat {incompat} chunk {chunk}: {other:?}"),
        }
    }
    // The legacy size with the feature flag is just another allowed size.
    assert!(with(&legacy, 1, 65536).is_ok());
}
