//! Hostile input with bounded memory and time (issue 13, item 4): huge PAX and GNU long-name
//! headers, blobs that are symlinks to /dev/zero, devices or FIFOs, absurd descriptor sizes;
//! each refused with exit 2, measured with /usr/bin/time and killed by `timeout` if it hangs.

use super::*;

/// Most a refused hostile import may use: RSS in KiB, as `/usr/bin/time` reports it.
const HOSTILE_MAX_RSS_KIB: u64 = 256 << 10;
/// Longest a refused hostile import may take; a hang is killed by `timeout` after
/// [`HOSTILE_KILL_AFTER`] and fails the test.
const HOSTILE_MAX_SECS: f64 = 20.0;
const HOSTILE_KILL_AFTER: &str = "60";
/// What the hostile headers claim: 768 MiB, what the old code read whole into memory.
const CLAIMED: u64 = 768 << 20;

/// One verlay run under `timeout` and `/usr/bin/time`.
#[derive(Debug)]
struct Measured {
    code: Option<i32>,
    stderr: String,
    rss_kib: u64,
    secs: f64,
}

/// `verlay ARGS` with its peak RSS and wall time measured; a hang is killed (the whole
/// process group, by coreutils `timeout`) rather than left to stall the suite.
fn verlay_measured(args: &[&OsStr]) -> Measured {
    assert!(
        Path::new("/usr/bin/time").exists(),
        "/usr/bin/time is needed to measure RSS (apt-get install time)"
    );
    let rss_file = tempfile::NamedTempFile::new().unwrap();
    let start = Instant::now();
    let out = Command::new("timeout")
        .args([
            "-s",
            "KILL",
            HOSTILE_KILL_AFTER,
            "/usr/bin/time",
            "-f",
            "%M",
            "-o",
        ])
        .arg(rss_file.path())
        .arg(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run timeout /usr/bin/time verlay");
    let secs = start.elapsed().as_secs_f64();
    let rss = fs::read_to_string(rss_file.path()).unwrap_or_default();
    Measured {
        code: out.status.code(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        // time(1) writes "Command exited with non-zero status N" before the figure
        rss_kib: rss
            .lines()
            .last()
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or(0),
        secs,
    }
}

/// Refused (not a crash, not a hang), saying `why`, within the memory and time bounds.
fn assert_refused_bounded(case: &str, m: &Measured, why: &str) {
    assert!(
        !matches!(m.code, Some(124) | Some(137) | None),
        "{case}: hang, killed after {HOSTILE_KILL_AFTER} s: {m:?}"
    );
    assert_eq!(m.code, Some(2), "{case}: expected a refusal (exit 2): {m:?}");
    assert!(
        m.stderr.contains(why),
        "{case}: expected \"{why}\" in: {}",
        m.stderr
    );
    assert!(m.rss_kib > 0, "{case}: no RSS figure from /usr/bin/time: {m:?}");
    assert!(
        m.rss_kib <= HOSTILE_MAX_RSS_KIB,
        "{case}: max RSS {} KiB is over {HOSTILE_MAX_RSS_KIB} KiB",
        m.rss_kib
    );
    assert!(m.secs < HOSTILE_MAX_SECS, "{case}: took {:.1} s", m.secs);
    eprintln!("{case}: refused in {:.2} s, max RSS {} KiB", m.secs, m.rss_kib);
}

/// A 512-byte GNU header (`ty` is the type flag byte), checksum set.
fn gnu_header(name: &str, ty: u8, size: u64) -> [u8; 512] {
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_entry_type(tar::EntryType::new(ty));
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(size);
    h.set_cksum();
    *h.as_bytes()
}

/// A tar whose first entry is an extended header of type `ty` ('x' PAX, 'L' GNU long name,
/// 'K' GNU long link) claiming `claimed` bytes, then a regular file `f` and the end blocks.
/// The claimed data is a hole of a sparse file: zeros that cost no disk, which the tar
/// crate read whole into memory (`read_to_end`) before yielding the entry.
fn claiming_tar(path: &Path, ty: u8, claimed: u64) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = fs::File::create(path).unwrap();
    let ext_name = if ty == b'x' {
        "./PaxHeaders/f"
    } else {
        "././@LongLink"
    };
    f.write_all(&gnu_header(ext_name, ty, claimed)).unwrap();
    f.seek(SeekFrom::Start(512 + claimed.div_ceil(512) * 512))
        .unwrap();
    f.write_all(&gnu_header("f", b'0', 1)).unwrap();
    let mut data = [0u8; 512];
    data[0] = b'x';
    f.write_all(&data).unwrap();
    f.write_all(&[0u8; 1024]).unwrap();
}

/// The layer store after a refusal: no layer, no image record, no kept blob, and nothing
/// left in tmp/ once the next store command has cleaned it.
fn assert_store_untouched(store: &Path) {
    let out = verlay(&[
        "layer".as_ref(),
        "ls".as_ref(),
        "--store".as_ref(),
        store.as_os_str(),
    ]);
    assert!(
        out.status.success(),
        "layer ls: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_nothing_published(store);
    for sub in ["images", "blobs/sha256"] {
        assert_eq!(
            dir_names(&store.join(sub)),
            Vec::<String>::new(),
            "{sub}/ must stay empty"
        );
    }
}

#[test]
fn huge_pax_and_gnu_long_name_headers_are_refused_in_bounded_memory() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    // Old code: the tar crate read the 768 MiB whole: 'x' imported with 781 MiB RSS, 'L'
    // grew to several GiB and aborted.
    let cases: &[(&str, u8, u64, &str)] = &[
        ("pax-768m.tar", b'x', CLAIMED, "extended headers"),
        ("longname-768m.tar", b'L', CLAIMED, "extended headers"),
        ("longlink-768m.tar", b'K', CLAIMED, "extended headers"),
        // under the budget, over PATH_MAX: read, then refused by name length
        ("longname-5000.tar", b'L', 5000, "longer than PATH_MAX (4096)"),
    ];
    for &(file, ty, claimed, why) in cases {
        let tarball = d.join(file);
        if claimed == 5000 {
            // a real 5000-byte name: the claimed data must be there, not zeros
            use std::io::Write;
            let mut f = fs::File::create(&tarball).unwrap();
            f.write_all(&gnu_header("././@LongLink", ty, 5001)).unwrap();
            let mut name = vec![b'a'; 5000];
            name.resize(5001usize.div_ceil(512) * 512, 0);
            f.write_all(&name).unwrap();
            f.write_all(&gnu_header("f", b'0', 0)).unwrap();
            f.write_all(&[0u8; 1024]).unwrap();
        } else {
            claiming_tar(&tarball, ty, claimed);
        }
        let store = d.join(format!("store-{file}"));
        let m = verlay_measured(&[
            "layer".as_ref(),
            "import".as_ref(),
            "--store".as_ref(),
            store.as_os_str(),
            tarball.as_os_str(),
        ]);
        assert_refused_bounded(file, &m, why);
        assert!(m.stderr.contains("nothing was published"), "{file}: {}", m.stderr);
        assert_store_untouched(&store);
    }
}

/// A docker-archive / oci-archive tarball: the same caps for the archive's own headers and
/// for its JSON members.
#[test]
fn hostile_image_archives_are_refused_in_bounded_memory() {
    use std::io::{Seek, SeekFrom, Write};
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    // an oci-archive whose first member has a 768 MiB PAX header (old code: read whole)
    let pax = d.join("pax.oci.tar");
    claiming_tar(&pax, b'x', CLAIMED);
    // a docker-archive whose manifest.json claims 768 MiB (a hole)
    let docker = d.join("huge-manifest.docker.tar");
    {
        let mut f = fs::File::create(&docker).unwrap();
        f.write_all(&gnu_header("manifest.json", b'0', CLAIMED)).unwrap();
        f.seek(SeekFrom::Start(512 + CLAIMED)).unwrap();
        f.write_all(&[0u8; 1024]).unwrap();
    }
    // an oci-archive whose index.json claims 768 MiB
    let index = d.join("huge-index.oci.tar");
    {
        let mut f = fs::File::create(&index).unwrap();
        f.write_all(&gnu_header("oci-layout", b'0', 0)).unwrap();
        f.write_all(&gnu_header("index.json", b'0', CLAIMED)).unwrap();
        f.seek(SeekFrom::Start(1024 + CLAIMED)).unwrap();
        f.write_all(&[0u8; 1024]).unwrap();
    }
    let cases: &[(&Path, &str)] = &[
        (&pax, "extended headers"),
        (
            &docker,
            "\"manifest.json\" is 805306368 bytes, larger than the 8388608 bytes",
        ),
        (
            &index,
            "\"index.json\" is 805306368 bytes, larger than the 8388608 bytes",
        ),
    ];
    for (i, &(src, why)) in cases.iter().enumerate() {
        let store = d.join(format!("store-{i}"));
        let m = verlay_measured(&[
            "image".as_ref(),
            "import".as_ref(),
            "--store".as_ref(),
            store.as_os_str(),
            src.as_os_str(),
        ]);
        assert_refused_bounded(&src.display().to_string(), &m, why);
        assert_store_untouched(&store);
    }
}

/// The blobs of a one-layer OCI image layout written into `dir`, with `layer_size` in place
/// of the layer descriptor's true size when given.
struct Layout {
    index: PathBuf,
    manifest: PathBuf,
    config: PathBuf,
    layer: PathBuf,
}

fn sha256_hex(b: &[u8]) -> String {
    format!("{:x}", Sha256::digest(b))
}

fn oci_layout(dir: &Path, layer_size: Option<serde_json::Value>) -> Layout {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| -> (String, PathBuf) {
        let hex = sha256_hex(bytes);
        let p = blobs.join(&hex);
        fs::write(&p, bytes).unwrap();
        (format!("sha256:{hex}"), p)
    };
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_path("hello").unwrap();
    h.set_mode(0o644);
    h.set_size(6);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_cksum();
    b.append(&h, &b"hello\n"[..]).unwrap();
    let layer = b.into_inner().unwrap();
    let (layer_digest, layer_path) = put(&layer);
    let config = serde_json::json!({
        "architecture": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    });
    let config = serde_json::to_vec(&config).unwrap();
    let (config_digest, config_path) = put(&config);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest,
                    "size": layer_size.unwrap_or(serde_json::json!(layer.len()))}],
    });
    let manifest = serde_json::to_vec(&manifest).unwrap();
    let (manifest_digest, manifest_path) = put(&manifest);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": manifest_digest, "size": manifest.len()}],
    });
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    Layout {
        index: dir.join("index.json"),
        manifest: manifest_path,
        config: config_path,
        layer: layer_path,
    }
}

/// Make `p` something other than the regular file it is.
fn replace_with(p: &Path, kind: &str) {
    fs::remove_file(p).unwrap();
    match kind {
        "symlink-to-dev-zero" => std::os::unix::fs::symlink("/dev/zero", p).unwrap(),
        "symlink-up-to-dev-zero" => {
            std::os::unix::fs::symlink("../../../../../../../../dev/zero", p).unwrap()
        }
        "symlink-loop" => std::os::unix::fs::symlink(p.file_name().unwrap(), p).unwrap(),
        "fifo" => rustix::fs::mknodat(
            rustix::fs::CWD,
            p,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap(),
        // the same device as /dev/zero, as a node inside the layout
        "dev-zero-node" => rustix::fs::mknodat(
            rustix::fs::CWD,
            p,
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::from_raw_mode(0o644),
            rustix::fs::makedev(1, 5),
        )
        .unwrap(),
        _ => unreachable!("{kind}"),
    }
}

#[test]
fn hostile_oci_layouts_are_refused_in_bounded_memory_and_time() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    // The intact layout imports: the hostile ones below differ from it in one file only.
    let good = d.join("good");
    oci_layout(&good, None);
    let out = image_import(&d.join("store-good"), &good);
    assert!(
        out.status.success(),
        "intact layout: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A symlink that stays inside the layout is followed, as docker save's duplicate layers
    // need: the layer blob linked to a copy of itself elsewhere in the layout.
    let linked = d.join("linked");
    let l = oci_layout(&linked, None);
    fs::create_dir(linked.join("elsewhere")).unwrap();
    fs::rename(&l.layer, linked.join("elsewhere/layer.tar")).unwrap();
    std::os::unix::fs::symlink("../../elsewhere/layer.tar", &l.layer).unwrap();
    let out = image_import(&d.join("store-linked"), &linked);
    assert!(
        out.status.success(),
        "layout with an inner symlink: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    type Pick = fn(&Layout) -> &Path;
    let index: Pick = |l| &l.index;
    let manifest: Pick = |l| &l.manifest;
    let config: Pick = |l| &l.config;
    let layer: Pick = |l| &l.layer;
    // (case, which file, what it becomes, why). Old code: a symlink to /dev/zero read the
    // device to the end (metadata().len() is 0 for it): 4 GiB RSS, then out of memory; a
    // FIFO blocked forever in open(2).
    let mut cases: Vec<(&str, Pick, &str, &str)> = vec![
        (
            "index-symlink",
            index,
            "symlink-to-dev-zero",
            "\"index.json\" is a symlink out of the image (to /dev/zero)",
        ),
        (
            "index-symlink-up",
            index,
            "symlink-up-to-dev-zero",
            "is a symlink out of the image",
        ),
        (
            "index-symlink-loop",
            index,
            "symlink-loop",
            "is a chain of more than 8 symlinks",
        ),
        (
            "manifest-symlink",
            manifest,
            "symlink-to-dev-zero",
            "is a symlink",
        ),
        ("config-symlink", config, "symlink-to-dev-zero", "is a symlink"),
        ("layer-symlink", layer, "symlink-to-dev-zero", "is a symlink"),
        ("layer-fifo", layer, "fifo", "is not a regular file (Fifo)"),
        ("config-fifo", config, "fifo", "is not a regular file (Fifo)"),
    ];
    if is_root() {
        cases.push((
            "config-device",
            config,
            "dev-zero-node",
            "is not a regular file (CharacterDevice)",
        ));
    }
    for (case, pick, kind, why) in cases {
        let src = d.join(case);
        let l = oci_layout(&src, None);
        replace_with(pick(&l), kind);
        let store = d.join(format!("store-{case}"));
        let m = verlay_measured(&[
            "image".as_ref(),
            "import".as_ref(),
            "--store".as_ref(),
            store.as_os_str(),
            src.as_os_str(),
        ]);
        assert_refused_bounded(case, &m, why);
        assert_store_untouched(&store);
    }

    // Descriptor sizes: absurd ones are refused when parsed, a wrong one against the blob.
    // Old code imported all three and kept the bogus size for a later push.
    let true_size = fs::metadata(oci_layout(&d.join("probe"), None).layer)
        .unwrap()
        .len();
    let sizes: &[(&str, serde_json::Value, String)] = &[
        (
            "size-2^62",
            serde_json::json!(4611686018427387904u64),
            "size 4611686018427387904 is not a byte count".into(),
        ),
        (
            "size-minus-1",
            serde_json::json!(-1),
            "size -1 is not a byte count".into(),
        ),
        (
            "size-off-by-one",
            serde_json::json!(true_size + 1),
            format!(
                "the blob has {true_size} bytes, its descriptor says {}",
                true_size + 1
            ),
        ),
    ];
    for (case, size, why) in sizes {
        let src = d.join(case);
        oci_layout(&src, Some(size.clone()));
        let store = d.join(format!("store-{case}"));
        let m = verlay_measured(&[
            "image".as_ref(),
            "import".as_ref(),
            "--store".as_ref(),
            store.as_os_str(),
            src.as_os_str(),
        ]);
        assert_refused_bounded(case, &m, why);
        assert_store_untouched(&store);
    }
}
