//! `verlay als serve`, podman's additional layer store, against a real registry (Debian's
//! docker-registry, through tests/faultproxy, which counts the bytes it forwards), without
//! podman (tests/e2e/podman-lazy.sh runs podman on it):
//! - the paths containers/storage stats exist for every layer (`<base64 ref>/<digest>/`
//!   `diff`, `info`, `blob`), `info` says what the manifest and the config say, and looking
//!   them up moved only the TOCs;
//! - each `diff` is the layer's own files: layer 2's whiteout is a 0/0 character device and
//!   its opaque directory answers `trusted.overlay.opaque`, as overlayfs wants them;
//! - kernel overlayfs stacking the three `diff`s, as podman does, shows the image: the
//!   replaced file, the whiteout and the opaque dir hold; reading a small file does not fetch
//!   the 1 MiB layer 3; its file then reads byte for byte as the original;
//! - podman's use/release calls (`create <layer>/use`, `rmdir <layer>`) are ENOENT; `blob` of
//!   a layer not sealed is EIO with one log line;
//! - an image the registry lacks is EIO for its layers, logged once (lookups within
//!   `FAILED_PULL_TTL` reuse the failure); a name that is not base64 is ENOENT.
//!
//! Needs docker-registry (bash tests/setup.sh), root (FUSE, kernel overlayfs) and the test
//! image of tests/e2e/image.sh.

#[macro_use]
mod common;
mod faultproxy;

use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use common::cmd::{test_image, verlay};
use common::mount::{Launch, Mount};
use common::registry::Registry;
use faultproxy::{FaultProxy, Faults};

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn store_blob(store: &Path, digest: &str) -> Vec<u8> {
    fs::read(
        store
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:")),
    )
    .expect("blob")
}

fn json(b: &[u8]) -> serde_json::Value {
    serde_json::from_slice(b).expect("json")
}

/// Blob body bytes the proxy forwarded whose path names `needle`.
fn moved(proxy: &FaultProxy, needle: &str) -> u64 {
    proxy
        .log()
        .iter()
        .filter(|e| e.method == "GET" && e.path.contains("/blobs/") && e.path.contains(needle))
        .map(|e| e.response_forwarded)
        .sum()
}

#[test]
fn the_layer_store_serves_each_layer_lazily_as_podman_reads_it() {
    require_tools!("docker-registry");
    let t = tempfile::Builder::new()
        .prefix("verlay-als-")
        .tempdir()
        .expect("tempdir");
    test_image(t.path());
    let src = t.path().join("src");
    let lower = verlay(&[
        "image",
        "import",
        "--store",
        p(&src),
        "--name",
        "test",
        p(&t.path().join("img/oci")),
    ])
    .printed("import");
    verlay(&[
        "image",
        "convert",
        "--store",
        p(&src),
        "--estargz",
        "--chunk-size",
        "65536",
        "test",
        "esgz",
    ])
    .printed("convert");
    let reg = Registry::start(&t.path().join("reg"));
    let target = format!("{}/lazy/test:esgz", reg.addr);
    verlay(&["image", "push", "--store", p(&src), "--image", "esgz", &target]).printed("push");
    let proxy = FaultProxy::start(reg.addr, Faults::default());
    let reference = format!("{}/lazy/test:esgz", proxy.addr);

    let rec = json(&fs::read(src.join("images/esgz.json")).expect("record"));
    let m = json(&store_blob(&src, rec["manifest"].as_str().expect("manifest")));
    let config = json(&store_blob(&src, m["config"]["digest"].as_str().expect("config")));
    let layers = m["layers"].as_array().expect("layers").clone();
    assert_eq!(layers.len(), 3);
    let total: u64 = layers.iter().map(|l| l["size"].as_u64().expect("size")).sum();

    let mnt = t.path().join("als");
    fs::create_dir_all(&mnt).expect("mkdir");
    let args: Vec<OsString> = ["als", "serve", "--store", p(&t.path().join("store")), p(&mnt)]
        .iter()
        .map(OsString::from)
        .collect();
    let log = t.path().join("als.log");
    let als = Launch::verlay_argv(&args, &mnt)
        .background()
        .log(&log)
        .env("VERLAY_LAZY_BACKGROUND", "off")
        .env("RUST_LOG", "verlay=info")
        .start();
    assert_eq!(
        fs::read_dir(&mnt).expect("ls").count(),
        0,
        "the root lists nothing"
    );

    // what containers/storage stats, then decodes (overlay.go getAdditionalLayerPath)
    proxy.clear();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&reference);
    let mut diffs: Vec<PathBuf> = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let digest = l["digest"].as_str().expect("digest");
        let dir = mnt.join(&b64).join(digest);
        assert!(dir.join("diff").is_dir(), "{}: no diff dir", dir.display());
        assert_eq!(
            fs::metadata(dir.join("blob")).expect("blob").len(),
            l["size"].as_u64().unwrap()
        );
        let info = json(&fs::read(dir.join("info")).expect("info"));
        assert_eq!(info["compressed-diff-digest"], l["digest"]);
        assert_eq!(info["compressed-size"], l["size"]);
        assert_eq!(info["diff-digest"], config["rootfs"]["diff_ids"][i]);
        assert_eq!(info["compression"], 2);
        let want: u64 = l["annotations"]["io.containers.estargz.uncompressed-size"]
            .as_str()
            .expect("annotation")
            .parse()
            .expect("number");
        assert_eq!(info["diff-size"], want);
        // podman's use and release calls: understood (ENOENT), nothing else happens
        let e = fs::File::create(dir.join("use")).expect_err("create use");
        assert_eq!(
            e.raw_os_error(),
            Some(libc::ENOENT),
            "create {}/use",
            dir.display()
        );
        let e = fs::remove_dir(&dir).expect_err("rmdir layer");
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "rmdir {}", dir.display());
        diffs.push(dir.join("diff"));
    }
    let looked = moved(&proxy, "");
    eprintln!("als: lookups of the 3 layers moved {looked} of {total} layer bytes");
    assert!(
        looked * 20 < total,
        "the lookups moved {looked} bytes, more than 5% of {total}"
    );

    // layer 2 as its own files: whiteout and opaque marker as overlayfs reads them
    let wh = fs::symlink_metadata(diffs[1].join("etc/remove-me")).expect("whiteout");
    assert!(
        wh.file_type().is_char_device() && wh.rdev() == 0,
        "etc/remove-me is not a 0/0 whiteout"
    );
    let names = |d: &Path| -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(d)
            .expect("readdir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        names(&diffs[1].join("etc")),
        ["layer2", "motd", "remove-me"],
        "layer 2's etc/"
    );
    let mut v = [0u8; 8];
    let n = rustix::fs::getxattr(diffs[1].join("opaque"), "trusted.overlay.opaque", &mut v[..])
        .expect("opaque xattr");
    assert_eq!(&v[..n], b"y");
    let n = rustix::fs::getxattr(diffs[1].join("opaque"), "user.overlay.opaque", &mut v[..])
        .expect("opaque xattr");
    assert_eq!(&v[..n], b"y");

    // kernel overlayfs over the three diffs, top first, as podman mounts them
    let ovl = t.path().join("ovl");
    fs::create_dir_all(&ovl).expect("mkdir");
    // through symlinks, as podman's l/ links: a digest's ':' would split lowerdir=
    let links = t.path().join("l");
    fs::create_dir_all(&links).expect("mkdir");
    let mut lowers = Vec::new();
    for (i, d) in diffs.iter().enumerate().rev() {
        let l = links.join(format!("{i}"));
        std::os::unix::fs::symlink(d, &l).expect("symlink");
        lowers.push(p(&l).to_string());
    }
    let k = Mount::kernel_overlay(&format!("lowerdir={}", lowers.join(":")), &ovl).expect("kernel overlay");
    proxy.clear();
    assert_eq!(
        fs::read_to_string(ovl.join("etc/motd")).expect("motd"),
        "motd from layer2\n"
    );
    assert!(
        !ovl.join("etc/remove-me").exists(),
        "the whiteout did not hide etc/remove-me"
    );
    assert!(
        !ovl.join("opaque/a").exists() && ovl.join("opaque/b").exists(),
        "the opaque dir did not hide opaque/a"
    );
    let etc = names(&ovl.join("etc"));
    assert!(
        etc.contains(&"passwd".to_string()) && etc.contains(&"layer2".to_string()),
        "etc: {etc:?}"
    );
    assert!(
        !etc.contains(&"remove-me".to_string()),
        "the whiteout shows in readdir: {etc:?}"
    );
    let d3 = layers[2]["digest"].as_str().unwrap();
    assert_eq!(moved(&proxy, d3), 0, "reading etc/motd fetched from layer 3");
    let orig = lower.split(':').next().expect("top layer");
    let blob = fs::read(ovl.join("data/blob")).expect("read data/blob");
    assert!(
        blob == fs::read(Path::new(orig).join("data/blob")).expect("original"),
        "data/blob differs"
    );
    let l3 = moved(&proxy, d3);
    eprintln!(
        "als: reading data/blob ({} B) moved {l3} B of layer 3",
        blob.len()
    );
    assert!(l3 > 0, "data/blob came from nowhere");
    assert_eq!(fs::metadata(ovl.join("etc/passwd")).expect("passwd").uid(), 0);

    // a reference the registry does not have: EIO at once for every layer, one log line;
    // a name that is not base64: ENOENT, no pull
    let missing = base64::engine::general_purpose::STANDARD.encode(format!("{}/lazy/nope:1", proxy.addr));
    let zero = format!("sha256:{}", "0".repeat(64));
    for _ in 0..3 {
        let e = fs::metadata(mnt.join(&missing).join(&zero).join("diff")).expect_err("missing image");
        assert_eq!(
            e.raw_os_error(),
            Some(libc::EIO),
            "lookup in an image the registry lacks"
        );
    }
    let e = fs::metadata(mnt.join("not*base64").join(&zero)).expect_err("not base64");
    assert_eq!(e.raw_os_error(), Some(libc::ENOENT));

    // blob of a layer not sealed: refused, logged
    let e = fs::read(mnt.join(&b64).join(d3).join("blob")).expect_err("blob read");
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    drop(k);
    drop(als);
    let text = fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("not served"),
        "no log line for the refused blob:\n{text}"
    );
    assert!(
        text.contains("image pulled lazily"),
        "no log line for the pull:\n{text}"
    );
    let failed = text.lines().filter(|l| l.contains("lazy pull failed")).count();
    assert_eq!(
        failed, 1,
        "want one log line for the failed pull (retried lookups reuse it):\n{text}"
    );
}
