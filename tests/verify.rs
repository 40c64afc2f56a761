//! Verified layers in a real mount: content or metadata that does not match a lower layer's
//! manifest is never served. Each kind of damage gives EIO (or a refused mount) for exactly
//! the damaged path, every other file is served correctly, one log line names the layer and
//! the path, and `verlay verify` reports the same damage.

#[macro_use]
mod common;

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Launch, Mount, Rig};

const BIN: &str = env!("CARGO_BIN_EXE_verlay");

/// A mount (the common guard, dropped first) with its log and the temp dir under it.
struct Mounted {
    _guard: Mount,
    mnt: PathBuf,
    log: PathBuf,
    _tmp: tempfile::TempDir,
}

/// A lower layer `base` (and optionally a second one `top`) built by `make`, sealed, then
/// damaged by `damage`, mounted with an upper.
fn setup(
    make: impl FnOnce(&Path, &Path),
    damage: impl FnOnce(&Path, &Path),
    opts: &str,
) -> Result<Mounted, String> {
    let tmp = tempfile::Builder::new()
        .prefix("verlay-verify-")
        .tempdir_in("/tmp")
        .unwrap();
    let t = tmp.path();
    for d in ["top", "base", "u", "w", "m"] {
        fs::create_dir(t.join(d)).unwrap();
    }
    fs::set_permissions(t, fs::Permissions::from_mode(0o755)).unwrap();
    make(&t.join("top"), &t.join("base"));
    for l in ["top", "base"] {
        let out = Command::new(BIN)
            .args(["layer", "seal"])
            .arg(t.join(l))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "seal {l}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    damage(&t.join("top"), &t.join("base"));
    let log = t.join("verlay.log");
    let rig = Rig::named(t, &["top", "base"], "u", "w", "m");
    let o = format!("{}{opts}", rig.opts(""));
    // The launcher forks the daemon (as podman runs it); a refused mount returns its stderr.
    let guard = match Launch::verlay(&o, &rig.mnt)
        .background()
        .env("VERLAY_LOG_FILE", &log)
        .try_start()
    {
        Ok(g) => g,
        Err((_, stderr)) => return Err(stderr),
    };
    Ok(Mounted {
        _guard: guard,
        mnt: rig.mnt.clone(),
        log,
        _tmp: tmp,
    })
}

fn eio<T: std::fmt::Debug>(r: std::io::Result<T>, what: &str) {
    match r {
        Err(e) if e.raw_os_error() == Some(libc::EIO) => {}
        other => panic!("{what}: expected EIO, got {other:?}"),
    }
}

fn big(seed: u8) -> Vec<u8> {
    (0..1_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8 ^ seed)
        .collect()
}

/// The base layer every case starts from.
fn standard(_top: &Path, base: &Path) {
    fs::write(base.join("big"), big(1)).unwrap();
    fs::create_dir(base.join("d")).unwrap();
    fs::write(base.join("d/small"), b"small file\n").unwrap();
    fs::write(base.join("d/other"), b"other file\n").unwrap();
    symlink("d/small", base.join("link")).unwrap();
}

/// Every undamaged file reads back as it was.
fn others_fine(m: &Mounted, except: &[&str]) {
    let want: [(&str, Vec<u8>); 3] = [
        ("big", big(1)),
        ("d/small", b"small file\n".to_vec()),
        ("d/other", b"other file\n".to_vec()),
    ];
    for (p, data) in want {
        if except.contains(&p) {
            continue;
        }
        assert_eq!(
            fs::read(m.mnt.join(p)).unwrap_or_else(|e| panic!("{p}: {e}")),
            data,
            "{p}"
        );
    }
}

/// One error line in the daemon's log names the layer and the path.
fn logged(m: &Mounted, layer_dir_suffix: &str, path: &str) {
    let log = fs::read_to_string(&m.log).unwrap_or_default();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("ERROR") && l.contains(&format!("path={path}")))
        .collect();
    assert_eq!(lines.len(), 1, "one error line for {path}, got:\n{log}");
    assert!(
        lines[0].contains(layer_dir_suffix),
        "the line names the layer: {}",
        lines[0]
    );
}

/// `verlay verify` reports the damage (exit 1, the path named) for the damaged layer.
fn scrub_reports(layer: &Path, path: &str) {
    let out = Command::new(BIN).arg("verify").arg(layer).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "verify exit code; output:\n{text}");
    assert!(text.contains(path), "verify names {path}:\n{text}");
}

#[test]
fn flipped_byte_in_a_large_file_is_eio_only_where_it_is_read() {
    let m = setup(
        standard,
        |_, base| {
            let mut b = big(1);
            b[600_000] ^= 0xff;
            fs::write(base.join("big"), b).unwrap();
        },
        "",
    )
    .unwrap();
    use std::io::{Read, Seek, SeekFrom};
    let mut f = fs::File::open(m.mnt.join("big")).unwrap();
    // The first 64 KiB chunk is intact and served.
    let mut head = vec![0u8; 4096];
    f.read_exact(&mut head).unwrap();
    assert_eq!(head, big(1)[..4096]);
    f.seek(SeekFrom::Start(600_000)).unwrap();
    eio(f.read(&mut head), "read of the damaged chunk");
    eio(f.read(&mut head), "read of the damaged chunk, again");
    eio(fs::read(m.mnt.join("big")), "whole read");
    // A copy-up must not turn the corrupt lower into a good-looking upper file.
    eio(
        fs::OpenOptions::new().append(true).open(m.mnt.join("big")),
        "copy-up of a corrupt file",
    );
    assert!(!m._tmp.path().join("u/big").exists(), "nothing copied up");
    others_fine(&m, &["big"]);
    logged(&m, "/base", "big");
    scrub_reports(&m._tmp.path().join("base"), "big");
}

#[test]
fn truncated_extended_deleted_files_are_eio_not_enoent() {
    let m = setup(
        standard,
        |_, base| {
            fs::write(base.join("big"), &big(1)[..500_000]).unwrap();
            fs::write(base.join("d/small"), b"small file\nplus more\n").unwrap();
            fs::remove_file(base.join("d/other")).unwrap();
        },
        "",
    )
    .unwrap();
    eio(fs::read(m.mnt.join("big")), "truncated");
    eio(fs::read(m.mnt.join("d/small")), "extended");
    eio(
        fs::metadata(m.mnt.join("d/other")),
        "deleted: a file the layer should hold is EIO, not ENOENT",
    );
    let names: Vec<String> = fs::read_dir(m.mnt.join("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.contains(&"other".to_string()),
        "a missing file still shows in the listing: {names:?}"
    );
    logged(&m, "/base", "d/other");
    scrub_reports(&m._tmp.path().join("base"), "d/other");
}

#[test]
fn added_file_is_hidden_and_changed_metadata_is_eio() {
    let m = setup(
        standard,
        |_, base| {
            fs::write(base.join("d/added"), b"not in the manifest").unwrap();
            fs::set_permissions(base.join("d/small"), fs::Permissions::from_mode(0o600)).unwrap();
            std::os::unix::fs::lchown(base.join("d/other"), Some(1234), None).unwrap();
            fs::remove_file(base.join("link")).unwrap();
            symlink("d/other", base.join("link")).unwrap();
        },
        "",
    )
    .unwrap();
    let e = fs::metadata(m.mnt.join("d/added")).unwrap_err();
    assert_eq!(
        e.raw_os_error(),
        Some(libc::ENOENT),
        "an unlisted entry is not shown"
    );
    let names: Vec<String> = fs::read_dir(m.mnt.join("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.contains(&"added".to_string()), "{names:?}");
    eio(fs::metadata(m.mnt.join("d/small")), "changed mode");
    eio(fs::metadata(m.mnt.join("d/other")), "changed owner");
    eio(fs::read_link(m.mnt.join("link")), "changed symlink target");
    assert_eq!(fs::read(m.mnt.join("big")).unwrap(), big(1));
    logged(&m, "/base", "d/small");
    scrub_reports(&m._tmp.path().join("base"), "d/added");
}

#[test]
fn files_swapped_between_layers_are_both_eio() {
    let m = setup(
        |top, base| {
            standard(top, base);
            fs::write(top.join("t"), b"from the top layer\n").unwrap();
            fs::write(base.join("b"), b"from the base layer").unwrap();
        },
        |top, base| {
            // Each layer's file now holds the other's content, at the other's size: both
            // the size check and the content check must refuse it.
            fs::write(top.join("t"), b"from the base layer").unwrap();
            fs::write(base.join("b"), b"from the top layer\n").unwrap();
        },
        "",
    )
    .unwrap();
    eio(fs::read(m.mnt.join("t")), "top file holding other content");
    eio(fs::read(m.mnt.join("b")), "base file holding other content");
    others_fine(&m, &[]);
}

#[test]
fn corrupt_manifest_refuses_the_mount() {
    let err = setup(
        standard,
        |_, base| {
            let mpath = PathBuf::from(format!("{}.verlay-manifest", base.display()));
            let mut b = fs::read(&mpath).unwrap();
            let n = b.len();
            b.truncate(n / 2);
            fs::write(&mpath, b).unwrap();
        },
        "",
    )
    .err()
    .expect("a mount over a corrupt manifest must fail");
    assert!(err.contains("manifest"), "the error names the manifest: {err}");
}

#[test]
fn verify_require_refuses_a_layer_without_manifest_and_off_serves_damage() {
    let err = setup(
        standard,
        |top, _| {
            fs::remove_file(PathBuf::from(format!("{}.verlay-manifest", top.display()))).unwrap();
        },
        ",verify=require",
    )
    .err()
    .expect("verify=require without a manifest must fail");
    assert!(err.contains("verify=require"), "{err}");
    // verify=off: no checks at all (like fuse-overlayfs): the damaged byte is served.
    let m = setup(
        standard,
        |_, base| {
            let mut b = big(1);
            b[10] ^= 1;
            fs::write(base.join("big"), b).unwrap();
        },
        ",verify=off",
    )
    .unwrap();
    assert_eq!(fs::read(m.mnt.join("big")).unwrap().len(), 1_000_000);
}

/// pread of `len` bytes at `at` with readahead off, so the daemon sees exactly this read.
fn pread_at(f: &fs::File, at: u64, len: usize) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len];
    let n = f.read_at(&mut buf, at)?;
    buf.truncate(n);
    Ok(buf)
}

fn open_random(p: &Path) -> fs::File {
    let f = fs::File::open(p).unwrap();
    rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::Random).unwrap();
    f
}

/// With 4 KiB chunks (what `layer seal` writes), a damaged byte fails only reads of its own
/// 4 KiB chunk; reads of the neighbours, aligned or not, crossing chunk boundaries and the
/// end of the file, return exactly the layer's bytes.
#[test]
fn damage_fails_only_its_own_4k_chunk_and_reads_around_it_are_exact() {
    const AT: usize = 600_000; // chunk 146: bytes 598016..602112
    let m = setup(
        standard,
        |_, base| {
            let mut b = big(1);
            b[AT] ^= 0x40;
            fs::write(base.join("big"), b).unwrap();
        },
        "",
    )
    .unwrap();
    let want = big(1);
    let f = open_random(&m.mnt.join("big"));
    let bad = 598_016u64..602_112;
    eio(pread_at(&f, bad.start, 4096), "read of the damaged chunk");
    eio(
        pread_at(&f, 599_000, 100),
        "unaligned read inside the damaged chunk",
    );
    // The kernel reads page by page: a read crossing into the damaged chunk returns the
    // verified bytes before it (a short read), or EIO; never a damaged byte.
    match pread_at(&f, bad.start - 10, 20) {
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "crossing read: {e}"),
        Ok(got) => assert_eq!(
            got,
            want[bad.start as usize - 10..bad.start as usize],
            "crossing read"
        ),
    }
    let mut seed = 12345u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut cases: Vec<(u64, usize)> = vec![
        (bad.start - 4096, 4096),
        (bad.end, 4096),
        (bad.end + 1, 8191),
        (0, 1),
        (999_999, 10),
        (995_000, 65_536),
        (1_000_000, 4096),
    ];
    for _ in 0..300 {
        cases.push((next() % 1_000_100, (next() % 20_000) as usize + 1));
    }
    for (at, len) in cases {
        let end = at + len as u64;
        if at < bad.end && end > bad.start {
            continue;
        }
        let lo = (at as usize).min(want.len());
        let hi = (end as usize).min(want.len());
        assert_eq!(
            pread_at(&f, at, len).unwrap_or_else(|e| panic!("read {len} at {at}: {e}")),
            want[lo..hi],
            "read {len} at {at}"
        );
    }
    logged(&m, "/base", "big");
}

/// A manifest of the first format (64 KiB chunks, no feature flag) still verifies: a damaged
/// byte fails its whole 64 KiB chunk and nothing else.
#[test]
fn manifest_with_64k_chunks_still_verifies() {
    use verlay::lower::manifest::{seal_with_chunk_size, Manifest, LEGACY_CHUNK_SIZE};
    const AT: usize = 600_000; // chunk 9 of 64 KiB: bytes 589824..655360
    let m = setup(
        standard,
        |_, base| {
            seal_with_chunk_size(base, LEGACY_CHUNK_SIZE).unwrap();
            let mut b = big(1);
            b[AT] ^= 0x40;
            fs::write(base.join("big"), b).unwrap();
        },
        "",
    )
    .unwrap();
    let base = m._tmp.path().join("base");
    let manifest = Manifest::open_beside(&base).unwrap().unwrap();
    assert_eq!(manifest.chunk_size(), LEGACY_CHUNK_SIZE);
    let want = big(1);
    let f = open_random(&m.mnt.join("big"));
    eio(
        pread_at(&f, 590_000, 4096),
        "read 10 KiB before the damage, same 64 KiB chunk",
    );
    eio(
        pread_at(&f, 650_000, 10),
        "read after the damage, same 64 KiB chunk",
    );
    assert_eq!(pread_at(&f, 585_728, 4096).unwrap(), want[585_728..589_824]);
    assert_eq!(pread_at(&f, 655_360, 70_000).unwrap(), want[655_360..725_360]);
    others_fine(&m, &["big"]);
    logged(&m, "/base", "big");
    scrub_reports(&base, "big");
}
