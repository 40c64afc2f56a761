//! eStargz and lazy pull against a real registry (Debian's docker-registry on a free
//! 127.0.0.1 port, killed by PID on drop), through the fault-injecting proxy
//! (tests/faultproxy) that counts every byte it forwards:
//! - `verlay image convert --estargz` makes blobs that `gzip -dc | tar t` reads as the same
//!   files (plus the landmark and the TOC), whose TOC hashes to the manifest annotation, and
//!   an ordinary pull of the pushed image mounts the same tree as the original;
//! - `verlay image pull --lazy` moves only the TOCs; a first read fetches little more than
//!   its own chunk; every file then reads byte for byte as after a full pull; a remount
//!   reads everything from the cache without the network;
//! - damage: a chunk the proxy corrupts is EIO with one log line, never cached, and read
//!   fine once the proxy stops; a corrupted cache is found and fetched again; a cut network
//!   is EIO within a bounded time, then reads work again;
//! - a TOC that does not hash to the manifest's annotation is refused, nothing stored.
//!
//! Needs docker-registry (bash tests/setup.sh installs it), root (FUSE mounts) and the
//! test image of tests/e2e/image.sh.

#[macro_use]
mod common;
mod faultproxy;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::cmd::{test_image, verlay};
use common::mount::{Launch, Mount};
use common::registry::Registry;
use faultproxy::{FaultProxy, Faults};

/// A verlay mount in the foreground with the background fetch off
/// (`VERLAY_LAZY_BACKGROUND=off`), so that what a read moves can be counted. The guard
/// unmounts and reaps it.
fn quiet(opts: &str, mnt: &Path, log: &Path) -> Mount {
    Launch::verlay(opts, mnt)
        .log(log)
        .env("VERLAY_LAZY_BACKGROUND", "off")
        .start()
}
use sha2::{Digest, Sha256};

/// The chunk size the tests convert with.
const CHUNK: u64 = 65536;

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn sha256_hex(b: &[u8]) -> String {
    format!("{:x}", Sha256::digest(b))
}

/// A store's blob.
fn blob(store: &Path, digest: &str) -> Vec<u8> {
    fs::read(
        store
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:")),
    )
    .expect("blob")
}

/// The manifest (as JSON) of the store's image `name`.
fn manifest(store: &Path, name: &str) -> serde_json::Value {
    let rec: serde_json::Value =
        serde_json::from_slice(&fs::read(store.join("images").join(format!("{name}.json"))).expect("record"))
            .expect("json");
    serde_json::from_slice(&blob(store, rec["manifest"].as_str().expect("manifest"))).expect("manifest json")
}

/// The test image imported, converted to eStargz, pushed to a registry, and pulled whole;
/// a proxy in front of the registry for the lazy pulls.
struct Scratch {
    proxy: FaultProxy,
    reg: Registry,
    /// source store: "test" and its eStargz form "esgz"
    src: PathBuf,
    /// lowerdir of a full pull of the eStargz image
    full_lower: String,
    t: tempfile::TempDir,
}

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let t = tempfile::Builder::new()
            .prefix(&format!("verlay-lazy-{tag}-"))
            .tempdir()
            .expect("tempdir");
        test_image(t.path());
        let img = t.path().join("img");
        let src = t.path().join("src");
        verlay(&[
            "image",
            "import",
            "--store",
            p(&src),
            "--name",
            "test",
            p(&img.join("oci")),
        ])
        .printed("import");
        let chunk = CHUNK.to_string();
        verlay(&[
            "image",
            "convert",
            "--store",
            p(&src),
            "--estargz",
            "--chunk-size",
            &chunk,
            "test",
            "esgz",
        ])
        .printed("convert");
        let reg = Registry::start(&t.path().join("reg"));
        let target = format!("{}/lazy/test:esgz", reg.addr);
        verlay(&["image", "push", "--store", p(&src), "--image", "esgz", &target]).printed("push");
        let full = t.path().join("full");
        let full_lower = verlay(&["image", "pull", "--store", p(&full), &target]).printed("full pull");
        let proxy = FaultProxy::start(reg.addr, Faults::default());
        Scratch {
            proxy,
            reg,
            src,
            full_lower,
            t,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.t.path().join(name)
    }

    /// The image's reference through the proxy.
    fn proxied(&self) -> String {
        format!("{}/lazy/test:esgz", self.proxy.addr)
    }

    /// Lazy pull into `store` through the proxy; returns the lowerdir.
    fn lazy_pull(&self, store: &Path) -> String {
        verlay(&["image", "pull", "--lazy", "--store", p(store), &self.proxied()]).printed("lazy pull")
    }

    /// Mount `lowerdir` read-only at `name`, logging to `name.log`, without background fetch.
    fn mount(&self, lowerdir: &str, name: &str) -> Mount {
        let mnt = self.path(name);
        fs::create_dir_all(&mnt).expect("mkdir mnt");
        quiet(
            &format!("ro,lowerdir={lowerdir}"),
            &mnt,
            &self.path(&format!("{name}.log")),
        )
    }

    /// Body bytes of blob GETs the proxy forwarded since the last clear.
    fn blob_bytes(&self) -> u64 {
        self.proxy
            .log()
            .iter()
            .filter(|e| e.method == "GET" && e.path.contains("/blobs/"))
            .map(|e| e.response_forwarded)
            .sum()
    }
}

/// Every entry under `root`: path -> (type, mode, owner, size, link target, content hash).
fn tree(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let e = e.expect("entry");
            let path = e.path();
            let m = fs::symlink_metadata(&path).expect("lstat");
            let rel = path.strip_prefix(root).expect("under root").display().to_string();
            let what = if m.is_dir() {
                stack.push(path.clone());
                String::from("dir")
            } else if m.file_type().is_symlink() {
                format!("link {}", fs::read_link(&path).expect("readlink").display())
            } else if m.is_file() {
                format!(
                    "file {}",
                    sha256_hex(&fs::read(&path).unwrap_or_else(|e| panic!("read {rel}: {e}")))
                )
            } else {
                format!("other rdev {}", m.rdev())
            };
            let size = if m.is_dir() { 0 } else { m.len() };
            out.insert(
                rel,
                format!(
                    "{what} mode {:o} {}:{} size {size} mtime {}",
                    m.mode(),
                    m.uid(),
                    m.gid(),
                    m.mtime()
                ),
            );
        }
    }
    out
}

fn eio(r: std::io::Result<Vec<u8>>, what: &str) {
    match r {
        Err(e) if e.raw_os_error() == Some(libc::EIO) => {}
        Err(e) => panic!("{what}: expected EIO, got {e}"),
        Ok(v) => panic!("{what}: expected EIO, read {} bytes", v.len()),
    }
}

/// Log lines at ERROR or WARN that mention `needle`.
fn lines_with<'a>(log: &'a str, needle: &str) -> Vec<&'a str> {
    log.lines()
        .filter(|l| l.contains(needle) && (l.contains("ERROR") || l.contains("WARN")))
        .collect()
}

/// The store layer directory (top first) of a lowerdir entry holding `rel`.
fn layer_with(lowerdir: &str, rel: &str) -> PathBuf {
    lowerdir
        .split(':')
        .map(PathBuf::from)
        .find(|d| d.join(rel).exists())
        .unwrap_or_else(|| panic!("no layer of {lowerdir} has {rel}"))
}

#[test]
fn convert_makes_estargz_that_gzip_reads_and_a_full_pull_mounts_as_the_original() {
    let s = Scratch::new("convert");
    let orig = manifest(&s.src, "test");
    let esgz = manifest(&s.src, "esgz");
    let layers = esgz["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), orig["layers"].as_array().expect("layers").len());
    for (i, l) in layers.iter().enumerate() {
        let b = blob(&s.src, l["digest"].as_str().expect("digest"));
        let list = |bytes: &[u8]| -> Vec<String> {
            let f = s.path("blob.tmp");
            fs::write(&f, bytes).expect("write");
            let out = Command::new("sh")
                .arg("-c")
                .arg(format!("gzip -dc '{}' | tar t", f.display()))
                .output()
                .expect("gzip | tar");
            assert!(
                out.status.success(),
                "layer {i}: gzip -dc | tar t: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::to_owned)
                .collect();
            v.sort();
            v
        };
        let mut want = list(&blob(
            &s.src,
            orig["layers"][i]["digest"].as_str().expect("digest"),
        ));
        want.extend([
            ".no.prefetch.landmark".to_string(),
            "stargz.index.json".to_string(),
        ]);
        want.sort();
        assert_eq!(list(&b), want, "layer {i}: the eStargz blob lists other files");
        // the footer: 51 bytes naming the TOC offset, and the TOC hashes to the annotation
        let foot = &b[b.len() - 51..];
        assert_eq!(&foot[..4], &[0x1f, 0x8b, 8, 4], "layer {i}: footer gzip header");
        assert_eq!(&foot[32..38], b"STARGZ", "layer {i}: footer magic");
        let off = u64::from_str_radix(std::str::from_utf8(&foot[16..32]).expect("hex"), 16).expect("offset")
            as usize;
        let mut toc = Vec::new();
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(&b[off..b.len() - 51]));
        let mut e = ar
            .entries()
            .expect("toc tar")
            .next()
            .expect("toc entry")
            .expect("toc entry");
        assert_eq!(&*e.path_bytes(), b"stargz.index.json");
        std::io::Read::read_to_end(&mut e, &mut toc).expect("toc");
        assert_eq!(
            format!("sha256:{}", sha256_hex(&toc)),
            l["annotations"]["containerd.io/snapshot/stargz/toc.digest"]
                .as_str()
                .expect("annotation"),
            "layer {i}: TOC digest"
        );
    }
    // a full pull (done by Scratch) mounts as the original image, plus the two eStargz files
    let orig_lower = verlay(&[
        "image",
        "import",
        "--store",
        p(&s.src),
        "--name",
        "again",
        p(&s.path("img/oci")),
    ])
    .printed("import");
    let a = s.mount(&orig_lower, "orig");
    let b = s.mount(&s.full_lower, "full");
    let mut want = tree(&s.path("orig"));
    let got = tree(&s.path("full"));
    for extra in [".no.prefetch.landmark", "stargz.index.json"] {
        assert!(got.contains_key(extra), "{extra} missing from the full pull");
    }
    want.extend(
        got.iter()
            .filter(|(k, _)| k.as_str() == ".no.prefetch.landmark" || k.as_str() == "stargz.index.json")
            .map(|(k, v)| (k.clone(), v.clone())),
    );
    assert_eq!(
        got, want,
        "a full pull of the eStargz image differs from the original"
    );
    drop((a, b));
}

#[test]
fn lazy_pull_moves_only_tocs_reads_fetch_their_chunks_and_every_file_matches_a_full_pull() {
    let s = Scratch::new("reads");
    let blobs_total: u64 = manifest(&s.src, "esgz")["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["size"].as_u64().expect("size"))
        .sum();
    let store = s.path("lz");
    s.proxy.clear();
    let lower = s.lazy_pull(&store);
    let pulled = s.blob_bytes();
    assert!(
        pulled * 20 < blobs_total,
        "a lazy pull moved {pulled} bytes of blobs, more than 5% of the {blobs_total} of the layers"
    );
    let full = s.mount(&s.full_lower, "full");
    let m = s.mount(&lower, "m");
    // first read: /etc/passwd, small; only its chunk (and neighbours) may move
    s.proxy.clear();
    let passwd = fs::read(s.path("m/etc/passwd")).expect("read passwd");
    assert_eq!(passwd, fs::read(s.path("full/etc/passwd")).expect("full passwd"));
    let first = s.blob_bytes();
    assert!(first > 0, "the first read moved nothing: it was not lazy");
    assert!(
        first <= 2 * CHUNK,
        "the first read of a small file moved {first} bytes, more than 2 chunks"
    );
    // a read in the middle of the 1 MiB blob moves about one chunk
    s.proxy.clear();
    let f = fs::File::open(s.path("m/data/blob")).expect("open blob");
    let mut buf = vec![0u8; 100];
    f.read_exact_at(&mut buf, 500_000).expect("read blob middle");
    let mut want = vec![0u8; 100];
    fs::File::open(s.path("full/data/blob"))
        .expect("open")
        .read_exact_at(&mut want, 500_000)
        .expect("read");
    assert_eq!(buf, want);
    drop(f);
    let mid = s.blob_bytes();
    assert!(
        mid <= 2 * CHUNK + 4096,
        "a 100-byte read of a 1 MiB file moved {mid} bytes"
    );
    // every file, byte for byte
    s.proxy.clear();
    assert_eq!(
        tree(&s.path("m")),
        tree(&s.path("full")),
        "the lazy mount differs from the full pull"
    );
    let rest = s.blob_bytes();
    assert!(
        rest + first + mid <= blobs_total,
        "reading everything moved {} bytes, more than the layers' {blobs_total}",
        rest + first + mid
    );
    eprintln!(
        "lazy: layers {blobs_total} B; lazy pull moved {pulled} B; first read (etc/passwd) {first} B; \
         100 B in the middle of data/blob {mid} B; every other file {rest} B"
    );
    let log = m.log();
    assert!(lines_with(&log, "").is_empty(), "errors or warnings:\n{log}");
    drop(m);
    // remount: everything comes from the cache, verified, without the network
    s.proxy.clear();
    let m2 = s.mount(&lower, "m");
    assert_eq!(
        tree(&s.path("m")),
        tree(&s.path("full")),
        "the remounted lazy mount differs"
    );
    assert_eq!(s.blob_bytes(), 0, "a remount fetched again what the cache had");
    drop((m2, full));
}

#[test]
fn damage_is_eio_logged_and_never_served_and_the_layer_recovers() {
    let s = Scratch::new("damage");
    let store = s.path("lz");
    let lower = s.lazy_pull(&store);
    let full = s.mount(&s.full_lower, "full");
    let want = fs::read(s.path("full/data/blob")).expect("full blob");
    let layer = layer_with(&lower, "data/blob");
    let cached = layer.join("data/blob");

    // 1. the registry (the proxy) corrupts every blob body: EIO, one log line, not cached
    let m = s.mount(&lower, "m");
    s.proxy.set(Faults {
        tamper_blobs: true,
        ..Faults::default()
    });
    eio(fs::read(s.path("m/data/blob")), "read of a corrupted chunk");
    eio(
        fs::read(s.path("m/data/blob")),
        "second read of a corrupted chunk",
    );
    let log = m.log();
    let bad = lines_with(&log, "data/blob");
    assert_eq!(bad.len(), 1, "one log line for data/blob, got:\n{log}");
    assert!(
        bad[0].contains(layer.to_str().expect("utf-8")),
        "the line names the layer: {}",
        bad[0]
    );
    assert!(
        fs::read(&cached).expect("cache").iter().all(|&b| b == 0),
        "corrupt bytes reached the cache"
    );
    s.proxy.set(Faults::default());
    assert!(
        fs::read(s.path("m/data/blob")).expect("read after the fault") == want,
        "wrong bytes after the fault"
    );
    drop(m);

    // 2. a corrupted cache: found on the first read after a mount, fetched again
    let f = fs::OpenOptions::new()
        .write(true)
        .open(&cached)
        .expect("open cache");
    f.write_all_at(&[0xAA], 300_000).expect("damage cache");
    drop(f);
    let m = s.mount(&lower, "m2");
    s.proxy.clear();
    assert!(
        fs::read(s.path("m2/data/blob")).expect("read with a bad cache") == want,
        "wrong bytes from a damaged cache"
    );
    let log = m.log();
    assert_eq!(
        lines_with(&log, "data/blob").len(),
        1,
        "one line for the damaged cache:\n{log}"
    );
    let fetched = s.blob_bytes();
    assert!(
        fetched > 0 && fetched <= 2 * CHUNK,
        "the damaged chunk alone is fetched again, not {fetched} bytes"
    );
    drop(m);

    // 3. the network cut: bounded EIO, then reads work again
    let m = s.mount(&lower, "m3");
    s.proxy.set(Faults {
        refuse: 1000,
        ..Faults::default()
    });
    let t0 = Instant::now();
    eio(fs::read(s.path("m3/bin/busybox")), "read with the network cut");
    assert!(
        t0.elapsed() < Duration::from_secs(60),
        "EIO took {:?}",
        t0.elapsed()
    );
    assert!(
        !lines_with(&m.log(), "bin/busybox").is_empty(),
        "the failed fetch is logged:\n{}",
        m.log()
    );
    s.proxy.set(Faults::default());
    assert_eq!(
        fs::read(s.path("m3/bin/busybox")).expect("read after the network is back"),
        fs::read(s.path("full/bin/busybox")).expect("full busybox")
    );
    drop((m, full));
}

#[test]
fn a_copy_up_of_a_lazy_file_fetches_and_verifies_it_whole_first() {
    let s = Scratch::new("copyup");
    let lower = s.lazy_pull(&s.path("lz"));
    let full = s.mount(&s.full_lower, "full");
    for d in ["u", "w", "m"] {
        fs::create_dir_all(s.path(d)).expect("mkdir");
    }
    let opts = format!(
        "lowerdir={lower},upperdir={},workdir={}",
        p(&s.path("u")),
        p(&s.path("w"))
    );
    let m = quiet(&opts, &s.path("m"), &s.path("m.log"));
    s.proxy.clear();
    // append to the 1 MiB file without reading it: the copy-up needs every chunk
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(s.path("m/data/blob"))
        .expect("open for append");
    std::io::Write::write_all(&mut f, b"tail").expect("append");
    drop(f);
    let mut want = fs::read(s.path("full/data/blob")).expect("full blob");
    want.extend_from_slice(b"tail");
    assert!(
        fs::read(s.path("u/data/blob")).expect("upper copy") == want,
        "the copied-up file is not the original plus the tail"
    );
    assert!(
        s.blob_bytes() >= 1 << 20,
        "the copy-up fetched only {} bytes of a 1 MiB file",
        s.blob_bytes()
    );
    // a corrupted chunk stops a copy-up: nothing reaches the upper
    s.proxy.set(Faults {
        tamper_blobs: true,
        ..Faults::default()
    });
    let r = fs::OpenOptions::new().append(true).open(s.path("m/bin/busybox"));
    assert_eq!(
        r.map(|_| ()).map_err(|e| e.raw_os_error()),
        Err(Some(libc::EIO)),
        "a copy-up of a corrupt lazy file"
    );
    assert!(
        !s.path("u/bin/busybox").exists(),
        "a corrupt file reached the upper"
    );
    drop((m, full));
}

#[test]
fn the_background_fetch_caches_every_chunk_and_then_reads_need_no_network() {
    let s = Scratch::new("background");
    let store = s.path("lz");
    let lower = s.lazy_pull(&store);
    let full = s.mount(&s.full_lower, "full");
    let mnt = s.path("m");
    fs::create_dir_all(&mnt).expect("mkdir");
    let m = Launch::verlay(&format!("ro,lowerdir={lower}"), &mnt)
        .log(&s.path("m.log"))
        .start();
    // one small read starts it
    assert_eq!(
        fs::read(mnt.join("etc/passwd")).expect("passwd"),
        fs::read(s.path("full/etc/passwd")).expect("full")
    );
    let presents: Vec<PathBuf> = lower
        .split(':')
        .map(|d| Path::new(d).with_file_name("lazy").join("present"))
        .collect();
    let t0 = Instant::now();
    loop {
        let missing: usize = presents
            .iter()
            .map(|p| fs::read(p).expect("present").iter().filter(|&&b| b != 1).count())
            .sum();
        if missing == 0 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{missing} chunks still missing after a minute:\n{}",
            m.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // the network gone, every file still reads as after a full pull
    s.proxy.set(Faults {
        refuse: 1000,
        ..Faults::default()
    });
    s.proxy.clear();
    assert_eq!(
        tree(&mnt),
        tree(&s.path("full")),
        "the lazy mount differs after the background fetch"
    );
    assert!(
        s.proxy.log().is_empty(),
        "reads after the background fetch went to the network"
    );
    let log = m.log();
    assert!(lines_with(&log, "").is_empty(), "errors or warnings:\n{log}");
    drop((m, full));
}

#[test]
fn a_toc_that_does_not_match_the_manifest_annotation_is_refused() {
    let s = Scratch::new("tocdigest");
    // the same image with layer 1's annotation changed, recorded in the source store
    let mut m = manifest(&s.src, "esgz");
    m["layers"][0]["annotations"]["containerd.io/snapshot/stargz/toc.digest"] =
        serde_json::Value::String(format!("sha256:{}", sha256_hex(b"another TOC")));
    let bytes = serde_json::to_vec(&m).expect("json");
    let digest = format!("sha256:{}", sha256_hex(&bytes));
    fs::write(s.src.join("blobs/sha256").join(&digest[7..]), &bytes).expect("manifest blob");
    let mut rec: serde_json::Value =
        serde_json::from_slice(&fs::read(s.src.join("images/esgz.json")).expect("record")).expect("json");
    rec["name"] = "bad".into();
    rec["manifest"] = digest.into();
    fs::write(
        s.src.join("images/bad.json"),
        serde_json::to_vec(&rec).expect("json"),
    )
    .expect("record");
    let target = format!("{}/lazy/test:bad", s.reg.addr);
    verlay(&["image", "push", "--store", p(&s.src), "--image", "bad", &target]).printed("push");
    let store = s.path("lz");
    let out = verlay(&["image", "pull", "--lazy", "--store", p(&store), &target]);
    assert_eq!(
        out.code,
        Some(1),
        "a lazy pull of a mismatching TOC must fail:\n{}",
        out.stderr
    );
    assert!(out.stderr.contains("TOC digest mismatch"), "{}", out.stderr);
    let layers: Vec<_> = fs::read_dir(store.join("layers"))
        .map(|d| d.flatten().collect())
        .unwrap_or_default();
    assert!(layers.is_empty(), "a refused pull stored layers: {layers:?}");
    assert!(!store.join("images/127.0.0.1").exists());
}
