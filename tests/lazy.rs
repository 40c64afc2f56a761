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
use verlay::store::lazy::ranges::{self, Ranges, RANGES_FILE};

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
    // the read kept the chunk's compressed span in lazy/blob: it comes from there, verified
    assert_eq!(
        s.blob_bytes(),
        0,
        "the damaged chunk was fetched although lazy/blob has its span"
    );
    drop(m);
    // 2b. the cache and lazy/blob both damaged: the chunk alone is fetched again
    let f = fs::OpenOptions::new()
        .write(true)
        .open(&cached)
        .expect("open cache");
    f.write_all_at(&[0xAA], 300_000).expect("damage cache");
    drop(f);
    let kept = layer.with_file_name("lazy").join("blob");
    let len = fs::metadata(&kept).expect("lazy/blob").len();
    fs::write(&kept, vec![0u8; len as usize]).expect("damage lazy/blob");
    let m = s.mount(&lower, "m2");
    s.proxy.clear();
    assert!(
        fs::read(s.path("m2/data/blob")).expect("read with a bad cache and blob file") == want,
        "wrong bytes from a damaged cache and blob file"
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

/// Record `m` (a manifest) as the image `name` of the source store, with `blobs` (a new
/// config, say) stored beside, and push it to the registry; returns the direct reference.
fn push_variant(s: &Scratch, name: &str, m: &serde_json::Value, blobs: &[Vec<u8>]) -> String {
    for b in blobs {
        fs::write(s.src.join("blobs/sha256").join(sha256_hex(b)), b).expect("blob");
    }
    let bytes = serde_json::to_vec(m).expect("json");
    let digest = format!("sha256:{}", sha256_hex(&bytes));
    fs::write(s.src.join("blobs/sha256").join(&digest[7..]), &bytes).expect("manifest blob");
    let mut rec: serde_json::Value =
        serde_json::from_slice(&fs::read(s.src.join("images/esgz.json")).expect("record")).expect("json");
    rec["name"] = name.into();
    rec["manifest"] = digest.into();
    rec["config"] = m["config"]["digest"].clone();
    fs::write(
        s.src.join(format!("images/{name}.json")),
        serde_json::to_vec(&rec).expect("json"),
    )
    .expect("record");
    let target = format!("{}/lazy/test:{name}", s.reg.addr);
    verlay(&["image", "push", "--store", p(&s.src), "--image", name, &target]).printed("push");
    target
}

/// The `layer.json` of the store layer holding the lowerdir entry `diff`.
fn record_of(diff: &str) -> serde_json::Value {
    let p = Path::new(diff).with_file_name("layer.json");
    serde_json::from_slice(&fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).expect("json")
}

/// The range map of the lazy layer holding the lowerdir entry `diff`: which bytes of its
/// blob `lazy/blob` has.
fn map_of(diff: &str) -> Ranges {
    let digest = record_of(diff)["lazy"]["blob_digest"]
        .as_str()
        .expect("blob digest")
        .to_string();
    let map = Path::new(diff).with_file_name("lazy").join(RANGES_FILE);
    ranges::load(&map, &digest).0
}

/// The byte ranges `[start, end)` of the blob `digest` that GETs through the proxy asked
/// for (every GET of a layer blob must be a Range request), in order.
fn ranges_asked(s: &Scratch, digest: &str) -> Vec<(u64, u64)> {
    s.proxy
        .log()
        .iter()
        .filter(|e| e.method == "GET" && e.path.ends_with(digest))
        .map(|e| {
            let r = e
                .range
                .as_deref()
                .unwrap_or_else(|| panic!("a GET of the whole blob {digest}"));
            let (a, b) = r
                .strip_prefix("bytes=")
                .and_then(|r| r.split_once('-'))
                .unwrap_or_else(|| panic!("Range {r}"));
            (a.parse().expect("start"), b.parse::<u64>().expect("end") + 1)
        })
        .collect()
}

/// The ranges asked more than once: pairs that overlap.
fn overlaps(asked: &[(u64, u64)]) -> Vec<((u64, u64), (u64, u64))> {
    let mut v = asked.to_vec();
    v.sort();
    v.windows(2)
        .filter(|w| w[0].1 > w[1].0)
        .map(|w| (w[0], w[1]))
        .collect()
}

/// (digest, size) of each layer of the converted image.
fn layer_blobs(s: &Scratch) -> Vec<(String, u64)> {
    manifest(&s.src, "esgz")["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| {
            (
                l["digest"].as_str().expect("digest").to_string(),
                l["size"].as_u64().expect("size"),
            )
        })
        .collect()
}

/// The lowerdir entry of the lazy layer whose blob is `digest`.
fn diff_of<'a>(lowerdir: &'a str, digest: &str) -> &'a str {
    lowerdir
        .split(':')
        .find(|d| record_of(d)["lazy"]["blob_digest"].as_str() == Some(digest))
        .unwrap_or_else(|| panic!("no lazy layer of {lowerdir} has blob {digest}"))
}

/// Wait (at most a minute) until every lazy layer of `lowerdir` is sealed.
fn wait_sealed(lowerdir: &str, m: &Mount) {
    let t0 = Instant::now();
    loop {
        let waiting = lowerdir
            .split(':')
            .filter(|d| record_of(d).get("sealed").is_none())
            .count();
        if waiting == 0 {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{waiting} layers not sealed after a minute:\n{}",
            m.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The chain hex names of a lowerdir, top first.
fn chains(lowerdir: &str) -> Vec<String> {
    lowerdir
        .split(':')
        .map(|d| {
            Path::new(d)
                .parent()
                .and_then(|l| l.file_name())
                .expect("layer dir")
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

/// Every directory under `STORE/layers/` is a whole layer (record, diff, manifest), and
/// every lazy layer marked sealed names a whole ordinary layer.
fn store_is_whole(store: &Path) {
    for e in fs::read_dir(store.join("layers")).expect("layers").flatten() {
        let d = e.path();
        let rec: serde_json::Value = serde_json::from_slice(
            &fs::read(d.join("layer.json")).unwrap_or_else(|e| panic!("{}: no layer.json: {e}", d.display())),
        )
        .unwrap_or_else(|e| panic!("{}: bad layer.json: {e}", d.display()));
        assert!(d.join("diff").is_dir(), "{}: no diff/", d.display());
        assert!(
            d.join("diff.verlay-manifest").is_file(),
            "{}: no manifest",
            d.display()
        );
        if let Some(sealed) = rec.get("sealed").and_then(|s| s.as_str()) {
            let to = store.join("layers").join(sealed.trim_start_matches("sha256:"));
            let r: serde_json::Value =
                serde_json::from_slice(&fs::read(to.join("layer.json")).expect("sealed record"))
                    .expect("json");
            assert!(r.get("lazy").is_none(), "{} sealed as a lazy layer", d.display());
        }
    }
}

#[test]
fn the_background_fetch_seals_each_layer_as_a_full_pull_does_and_then_no_network_is_needed() {
    let s = Scratch::new("seal");
    let store = s.path("lz");
    let lower = s.lazy_pull(&store);
    // the full pull's records (its store is under the mount point "full")
    let full_recs: Vec<serde_json::Value> = s.full_lower.split(':').map(record_of).collect();
    let full = s.mount(&s.full_lower, "full");
    let mnt = s.path("m");
    fs::create_dir_all(&mnt).expect("mkdir");
    let m = Launch::verlay(&format!("ro,lowerdir={lower}"), &mnt)
        .log(&s.path("m.log"))
        .start();
    assert_eq!(
        fs::read(mnt.join("etc/passwd")).expect("passwd"),
        fs::read(s.path("full/etc/passwd")).expect("full")
    );
    wait_sealed(&lower, &m);
    let log = m.log();
    assert!(lines_with(&log, "").is_empty(), "errors or warnings:\n{log}");
    // the lazy mount still reads right, from the cache
    assert_eq!(
        tree(&mnt),
        tree(&s.path("full")),
        "the lazy mount differs after sealing"
    );
    drop(m);
    // the same layers as an ordinary pull: chain IDs, records, blobs kept
    let sealed = s.lazy_pull(&store);
    assert_eq!(
        chains(&sealed),
        chains(&s.full_lower),
        "sealed chain IDs differ from a full pull's"
    );
    for (d, b) in sealed.split(':').zip(&full_recs) {
        let a = record_of(d);
        assert!(a.get("lazy").is_none(), "{d} is still lazy");
        for k in [
            "diff_id",
            "blob_digest",
            "manifest_digest",
            "parent",
            "entries",
            "size",
        ] {
            assert_eq!(a[k], b[k], "{k} of {d} differs from the full pull's");
        }
        let blob = a["blob_digest"].as_str().expect("blob digest");
        assert!(
            store.join("blobs/sha256").join(&blob[7..]).is_file(),
            "blob {blob} not kept"
        );
    }
    store_is_whole(&store);
    // a mount of the sealed layers needs no network
    s.proxy.set(Faults {
        refuse: 1000,
        ..Faults::default()
    });
    s.proxy.clear();
    let m2 = s.mount(&sealed, "m");
    assert_eq!(tree(&mnt), tree(&s.path("full")), "the sealed mount differs");
    assert!(
        s.proxy.log().is_empty(),
        "a mount of sealed layers went to the network"
    );
    drop((m2, full));
}

#[test]
fn a_diff_id_that_does_not_match_seals_nothing_and_the_lazy_layer_stays() {
    let s = Scratch::new("badseal");
    let mut m = manifest(&s.src, "esgz");
    let mut config: serde_json::Value =
        serde_json::from_slice(&blob(&s.src, m["config"]["digest"].as_str().expect("config")))
            .expect("config json");
    config["rootfs"]["diff_ids"][0] = format!("sha256:{}", sha256_hex(b"another layer")).into();
    let cbytes = serde_json::to_vec(&config).expect("json");
    m["config"]["digest"] = format!("sha256:{}", sha256_hex(&cbytes)).into();
    m["config"]["size"] = cbytes.len().into();
    let target = push_variant(&s, "baddiff", &m, &[cbytes]);
    let proxied = target.replace(&s.reg.addr.to_string(), &s.proxy.addr.to_string());
    let store = s.path("lz");
    let lower = verlay(&["image", "pull", "--lazy", "--store", p(&store), &proxied]).printed("lazy pull");
    let mnt = s.path("m");
    fs::create_dir_all(&mnt).expect("mkdir");
    let m = Launch::verlay(&format!("ro,lowerdir={lower}"), &mnt)
        .log(&s.path("m.log"))
        .start();
    let full = s.mount(&s.full_lower, "full");
    assert_eq!(
        fs::read(mnt.join("etc/passwd")).expect("passwd"),
        fs::read(s.path("full/etc/passwd")).expect("full")
    );
    let t0 = Instant::now();
    while lines_with(&m.log(), "does not seal").is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no seal verdict in a minute:\n{}",
            m.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let log = m.log();
    let bad = lines_with(&log, "does not seal");
    assert_eq!(bad.len(), 1, "one log line for the mismatch:\n{log}");
    assert!(bad[0].contains("diffID mismatch"), "{}", bad[0]);
    assert_eq!(lines_with(&log, "").len(), 1, "other errors or warnings:\n{log}");
    for d in lower.split(':') {
        let r = record_of(d);
        assert!(
            r.get("sealed").is_none() && r.get("lazy").is_some(),
            "{d} was sealed"
        );
    }
    let layers = fs::read_dir(store.join("layers")).expect("layers").count();
    assert_eq!(
        layers, 3,
        "a layer was published although its diffID does not match"
    );
    store_is_whole(&store);
    // the lazy layers still serve every file right
    assert_eq!(tree(&mnt), tree(&s.path("full")), "the lazy mount differs");
    drop((m, full));
}

/// Every crash point of the background fetch and the seal (the `import.*` steps are the
/// store's import, run by the seal), as the source spells them.
const SEAL_POINTS: &[&str] = &[
    "lazy.span",
    "lazy.blob_data",
    "lazy.segment",
    "import.unpack",
    "import.fsync",
    "import.seal",
    "import.record",
    "import.publish",
    "lazy_seal.import",
    "lazy_seal.blob",
    "lazy_seal.record",
];

#[test]
fn kill_9_at_each_step_of_the_background_fetch_and_seal_resumes_and_never_half_seals() {
    // the list is complete: every crash point of the fetch and the seal is in it
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/src");
    for f in [
        "estargz/background.rs",
        "estargz/lazy.rs",
        "store/lazy/ranges.rs",
        "store/lazy.rs",
    ] {
        let text = fs::read_to_string(Path::new(src).join(f)).expect("source");
        for part in text.split("crash_point(\"").skip(1) {
            let name = part.split('"').next().expect("name");
            assert!(
                SEAL_POINTS.contains(&name),
                "crash point {name} of {f} is not tested"
            );
        }
    }
    let s = Scratch::new("kill");
    let full = s.mount(&s.full_lower, "full");
    for (i, point) in SEAL_POINTS.iter().enumerate() {
        let store = s.path(&format!("lz{i}"));
        let lower = s.lazy_pull(&store);
        let mnt = s.path(&format!("m{i}"));
        fs::create_dir_all(&mnt).expect("mkdir");
        let mut m = Launch::verlay(&format!("ro,lowerdir={lower}"), &mnt)
            .log(&s.path(&format!("m{i}.log")))
            .env("VERLAY_CRASH_AT", point)
            // a read's own fetch: no background fetch to have the span first
            .env(
                "VERLAY_LAZY_BACKGROUND",
                if *point == "lazy.span" { "off" } else { "on" },
            )
            .start();
        let _ = fs::read(mnt.join("etc/passwd"));
        let st = m.wait_within(Duration::from_secs(60));
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            st.and_then(|s| s.signal()),
            Some(9),
            "{point}: the daemon was not killed there:\n{}",
            m.log()
        );
        m.umount_dead();
        drop(m);
        store_is_whole(&store);
        // blobs fetched whole before the kill (their range maps say so) are not fetched again
        let whole: Vec<String> = lower
            .split(':')
            .filter(|d| {
                let r = record_of(d);
                let size = r["lazy"]["blob_size"].as_u64().expect("size");
                map_of(d).covers(0, size)
            })
            .map(|d| {
                record_of(d)["lazy"]["blob_digest"]
                    .as_str()
                    .expect("digest")
                    .to_string()
            })
            .collect();
        if !whole.is_empty() {
            // reads (background fetch off) take what the blob file has, verified: every
            // file reads right and the whole blobs are not asked for
            s.proxy.clear();
            let q = s.mount(&lower, &format!("m{i}"));
            assert_eq!(tree(&mnt), tree(&s.path("full")), "{point}: reads after the kill");
            drop(q);
            for b in &whole {
                assert!(
                    !s.proxy.log().iter().any(|e| e.path.ends_with(b.as_str())),
                    "{point}: a read fetched blob {b}, which the blob file has whole"
                );
            }
        }
        s.proxy.clear();
        let mut m = Launch::verlay(&format!("ro,lowerdir={lower}"), &mnt)
            .log(&s.path(&format!("m{i}b.log")))
            .start();
        // a lookup starts the background fetch (a read could fetch its own chunk)
        fs::metadata(mnt.join("etc/passwd")).expect("stat");
        wait_sealed(&lower, &m);
        let log = m.log();
        let bad: Vec<&str> = lines_with(&log, "")
            .into_iter()
            .filter(|l| !l.contains("removed the leftover of an interrupted import"))
            .collect();
        assert!(bad.is_empty(), "{point}: errors or warnings:\n{log}");
        m.unmount();
        for b in &whole {
            assert!(
                !s.proxy.log().iter().any(|e| e.path.ends_with(b.as_str())),
                "{point}: blob {b}, whole before the kill, was fetched again"
            );
        }
        store_is_whole(&store);
        let sealed = s.lazy_pull(&store);
        assert_eq!(
            chains(&sealed),
            chains(&s.full_lower),
            "{point}: sealed chain IDs"
        );
        let m2 = s.mount(&sealed, &format!("m{i}"));
        assert_eq!(
            tree(&mnt),
            tree(&s.path("full")),
            "{point}: the sealed mount differs"
        );
        drop(m2);
        eprintln!(
            "kill at {point}: {} blobs whole before the kill; resumed and sealed",
            whole.len()
        );
    }
    drop(full);
}

#[test]
fn a_layer_without_the_toc_annotation_is_pulled_whole_and_the_others_stay_lazy() {
    let s = Scratch::new("mixed");
    // the eStargz image with its base layer replaced by the original plain gzip one
    let orig = manifest(&s.src, "test");
    let ocfg: serde_json::Value =
        serde_json::from_slice(&blob(&s.src, orig["config"]["digest"].as_str().expect("cfg"))).expect("json");
    let mut m = manifest(&s.src, "esgz");
    let mut config: serde_json::Value =
        serde_json::from_slice(&blob(&s.src, m["config"]["digest"].as_str().expect("config"))).expect("json");
    config["rootfs"]["diff_ids"][0] = ocfg["rootfs"]["diff_ids"][0].clone();
    m["layers"][0] = orig["layers"][0].clone();
    assert!(m["layers"][0]
        .get("annotations")
        .is_none_or(|a| a.get("containerd.io/snapshot/stargz/toc.digest").is_none()));
    let cbytes = serde_json::to_vec(&config).expect("json");
    m["config"]["digest"] = format!("sha256:{}", sha256_hex(&cbytes)).into();
    m["config"]["size"] = cbytes.len().into();
    let target = push_variant(&s, "mixed", &m, &[cbytes]);
    let proxied = target.replace(&s.reg.addr.to_string(), &s.proxy.addr.to_string());
    let store = s.path("lz");
    let out = verlay(&["image", "pull", "--lazy", "--store", p(&store), &proxied]);
    let lower = out.printed("lazy pull of a mixed image");
    let said: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains("pulled it fully"))
        .collect();
    assert_eq!(said.len(), 1, "one line about the whole layer:\n{}", out.stderr);
    assert!(said[0].contains("layer 1 "), "{}", said[0]);
    let dirs: Vec<&str> = lower.split(':').collect();
    assert!(
        record_of(dirs[2]).get("lazy").is_none(),
        "the unannotated layer is lazy"
    );
    assert!(record_of(dirs[0]).get("lazy").is_some() && record_of(dirs[1]).get("lazy").is_some());
    // the whole layer is the ordinary pull's: same chain ID, same record
    let whole = s.path("whole");
    let wl =
        verlay(&["image", "pull", "--store", p(&whole), &target]).printed("full pull of the mixed image");
    assert_eq!(chains(&lower)[2], chains(&wl)[2]);
    assert_eq!(
        record_of(dirs[2])["diff_id"],
        record_of(wl.split(':').nth(2).expect("base"))["diff_id"]
    );
    let full = s.mount(&wl, "full");
    let mm = s.mount(&lower, "m");
    assert_eq!(
        tree(&s.path("m")),
        tree(&s.path("full")),
        "the mixed lazy mount differs"
    );
    let log = mm.log();
    assert!(lines_with(&log, "").is_empty(), "errors or warnings:\n{log}");
    drop((mm, full));
}

#[test]
fn push_of_a_lazily_pulled_image_fetches_its_blobs_verified_and_pulls_back_whole() {
    let s = Scratch::new("push");
    let store = s.path("lz");
    let lower = s.lazy_pull(&store);
    assert!(lower.split(':').all(|d| record_of(d).get("lazy").is_some()));
    let again = format!("{}/lazy/again:1", s.reg.addr);
    // a corrupted source: the push fails, no blob kept
    s.proxy.set(Faults {
        tamper_blobs: true,
        ..Faults::default()
    });
    let out = verlay(&[
        "image",
        "push",
        "--store",
        p(&store),
        "--image",
        &s.proxied(),
        &again,
    ]);
    assert_ne!(out.code, Some(0), "a push of corrupted blobs succeeded");
    let layers = manifest(&s.src, "esgz")["layers"]
        .as_array()
        .expect("layers")
        .clone();
    for l in &layers {
        let d = l["digest"].as_str().expect("digest");
        assert!(
            !store.join("blobs/sha256").join(&d[7..]).exists(),
            "a corrupted blob {d} was kept"
        );
    }
    s.proxy.set(Faults::default());
    verlay(&[
        "image",
        "push",
        "--store",
        p(&store),
        "--image",
        &s.proxied(),
        &again,
    ])
    .printed("push");
    let back = s.path("back");
    let bl = verlay(&["image", "pull", "--store", p(&back), &again]).printed("pull back");
    assert_eq!(
        chains(&bl),
        chains(&s.full_lower),
        "the pushed image's layers differ"
    );
    let full = s.mount(&s.full_lower, "full");
    let b = s.mount(&bl, "b");
    assert_eq!(
        tree(&s.path("b")),
        tree(&s.path("full")),
        "the image pulled back differs"
    );
    drop((b, full));
}

#[test]
fn a_stalled_registry_is_eio_in_bounded_time_logged_once_and_reads_work_when_it_is_back() {
    let s = Scratch::new("stall");
    let store = s.path("lz");
    let lower = s.lazy_pull(&store);
    let full = s.mount(&s.full_lower, "full");
    let m = s.mount(&lower, "m");
    s.proxy.set(Faults {
        stall: 1000,
        stall_ms: 120_000,
        ..Faults::default()
    });
    let t0 = Instant::now();
    eio(
        fs::read(s.path("m/data/blob")),
        "a read with the registry stalled",
    );
    let took = t0.elapsed();
    // Each FUSE read waits at most 3 attempts of 10 s of silence (plus backoff), then is EIO
    // with one error line. The kernel retries a failed readahead once with a smaller read
    // (seen here: one request for the whole file, then one for its first 64 KiB), so one
    // read(2) through the page cache may make two such requests, never more.
    let log = m.log();
    let lines = lines_with(&log, "could not fetch");
    assert!(
        (1..=2).contains(&lines.len()) && lines.iter().all(|l| l.contains("data/blob")),
        "one log line per failed request:\n{log}"
    );
    assert!(
        took < Duration::from_secs(35) * lines.len() as u32,
        "EIO took {took:?} for {} requests",
        lines.len()
    );
    // nothing partial: the layer's cache has no chunk (nothing else was read)
    let pres = fs::read(
        layer_with(&lower, "data/blob")
            .with_file_name("lazy")
            .join("present"),
    )
    .expect("present");
    assert!(pres.iter().all(|&b| b == 0), "a failed read cached chunks");
    s.proxy.set(Faults::default());
    assert_eq!(
        fs::read(s.path("m/data/blob")).expect("read once the registry is back"),
        fs::read(s.path("full/data/blob")).expect("full")
    );
    eprintln!("stall: EIO after {took:?}, {} failed requests", lines.len());
    drop((m, full));
}

#[test]
fn corrupt_blobs_in_the_background_fetch_seal_nothing_and_are_fetched_again_by_the_next_mount() {
    let s = Scratch::new("bgdamage");
    let store = s.path("lz");
    let lower = s.lazy_pull(&store);
    s.proxy.set(Faults {
        tamper_blobs: true,
        ..Faults::default()
    });
    let mnt = s.path("m");
    fs::create_dir_all(&mnt).expect("mkdir");
    let m = Launch::verlay(&format!("ro,lowerdir={lower}"), &mnt)
        .log(&s.path("m.log"))
        .start();
    // a lookup starts the background fetch (a read would be served EIO: the proxy corrupts it)
    fs::metadata(mnt.join("etc/passwd")).expect("stat");
    // the proxy flips a byte of every blob body over 4 KiB: each layer whose blob before
    // its TOC (what the background fetch asks for: the pull keeps the TOC and footer it
    // fetched) is more than that
    let tampered: Vec<&str> = lower
        .split(':')
        .filter(|d| record_of(d)["lazy"]["toc_offset"].as_u64().expect("toc offset") > 4096)
        .collect();
    assert!(!tampered.is_empty());
    let t0 = Instant::now();
    while lines_with(&m.log(), "does not seal").len() < tampered.len() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "not every layer's verdict in a minute:\n{}",
            m.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let log = m.log();
    let bad = lines_with(&log, "does not seal");
    assert_eq!(bad.len(), tampered.len(), "one line per corrupted layer:\n{log}");
    assert!(
        bad.iter().all(|l| l.contains("does not hash to the manifest")),
        "{log}"
    );
    drop(m);
    for d in lower.split(':') {
        let r = record_of(d);
        assert!(
            r.get("sealed").is_none(),
            "{d} was sealed with a corrupt layer below or in it"
        );
        let blob = r["lazy"]["blob_digest"].as_str().expect("digest");
        if tampered.contains(&d) {
            assert!(
                !store.join("blobs/sha256").join(&blob[7..]).exists(),
                "a corrupt blob was kept"
            );
            let left = fs::metadata(Path::new(d).with_file_name("lazy").join("blob")).map_or(0, |m| m.len());
            assert!(
                map_of(d).is_empty() && left == 0,
                "a corrupt blob was left for the next mount to trust ({left} bytes, map {:?})",
                map_of(d)
            );
        }
    }
    assert_eq!(fs::read_dir(store.join("layers")).expect("layers").count(), 3);
    store_is_whole(&store);
    // the registry right again: the next mount fetches the blobs again and seals
    s.proxy.set(Faults::default());
    let m = Launch::verlay(&format!("ro,lowerdir={lower}"), &mnt)
        .log(&s.path("m2.log"))
        .start();
    fs::metadata(mnt.join("etc/passwd")).expect("stat");
    wait_sealed(&lower, &m);
    drop(m);
    let sealed = s.lazy_pull(&store);
    assert_eq!(chains(&sealed), chains(&s.full_lower));
    let full = s.mount(&s.full_lower, "full");
    let m2 = s.mount(&sealed, "m");
    assert_eq!(tree(&mnt), tree(&s.path("full")), "the sealed mount differs");
    drop((m2, full));
}

/// Reads (background fetch off), then the background fetch and the seal: the Range requests
/// of every layer blob, pull included, never ask for a byte twice and add up to the blob.
#[test]
fn every_byte_of_a_layer_blob_crosses_the_network_once_reads_and_background_fetch_included() {
    let s = Scratch::new("once");
    let layers = layer_blobs(&s);
    let blobs_total: u64 = layers.iter().map(|l| l.1).sum();
    let store = s.path("lz");
    s.proxy.clear();
    let lower = s.lazy_pull(&store);
    let pulled: u64 = layers
        .iter()
        .flat_map(|(d, _)| ranges_asked(&s, d))
        .map(|r| r.1 - r.0)
        .sum();
    let full = s.mount(&s.full_lower, "full");
    {
        let _m = s.mount(&lower, "m");
        for f in ["etc/passwd", "etc/motd"] {
            assert_eq!(
                fs::read(s.path("m").join(f)).expect("read"),
                fs::read(s.path("full").join(f)).expect("full")
            );
        }
        let mut buf = vec![0u8; 100];
        fs::File::open(s.path("m/data/blob"))
            .expect("open")
            .read_exact_at(&mut buf, 500_000)
            .expect("read");
    }
    // what the pull and the reads asked for is in lazy/blob, by the maps
    let mut read_bytes = 0;
    for (d, _) in &layers {
        let map = map_of(diff_of(&lower, d));
        for r in ranges_asked(&s, d) {
            assert!(
                map.covers(r.0, r.1),
                "layer {d}: {r:?} was fetched but is not in its map {map:?}"
            );
            read_bytes += r.1 - r.0;
        }
    }
    read_bytes -= pulled;
    assert!(read_bytes > 0, "the reads moved nothing");
    let mnt = s.path("m");
    let m = Launch::verlay(&format!("ro,lowerdir={lower}"), &mnt)
        .log(&s.path("m.log"))
        .start();
    fs::metadata(mnt.join("etc/passwd")).expect("stat");
    wait_sealed(&lower, &m);
    let log = m.log();
    assert!(lines_with(&log, "").is_empty(), "errors or warnings:\n{log}");
    drop(m);
    let mut moved = 0;
    for (d, size) in &layers {
        let asked = ranges_asked(&s, d);
        let twice = overlaps(&asked);
        assert!(twice.is_empty(), "layer {d}: bytes asked twice: {twice:?}");
        let sum: u64 = asked.iter().map(|r| r.1 - r.0).sum();
        assert_eq!(sum, *size, "layer {d}: the requests do not add up to the blob");
        moved += sum;
    }
    let forwarded: u64 = s
        .proxy
        .log()
        .iter()
        .filter(|e| e.method == "GET" && layers.iter().any(|(d, _)| e.path.ends_with(d.as_str())))
        .map(|e| e.response_forwarded)
        .sum();
    eprintln!(
        "once: layer blobs {blobs_total} B; moved {forwarded} B in all (lazy pull {pulled} B, reads {read_bytes} B, \
         background fetch {} B)",
        moved - pulled - read_bytes
    );
    assert!(
        forwarded <= blobs_total,
        "{forwarded} bytes of layer blobs moved for {blobs_total} bytes of layers"
    );
    // and the sealed layers read as a full pull
    let sealed = s.lazy_pull(&store);
    assert_eq!(chains(&sealed), chains(&s.full_lower));
    let m2 = s.mount(&sealed, "m");
    assert_eq!(tree(&mnt), tree(&s.path("full")), "the sealed mount differs");
    drop((m2, full));
}

/// A background fetch killed right after it recorded a range (`lazy.segment`): the next
/// mount asks only for what the range maps lack at the kill, and seals.
#[test]
fn a_background_fetch_killed_mid_way_resumes_from_the_range_maps_without_asking_twice() {
    let s = Scratch::new("resume");
    let layers = layer_blobs(&s);
    let store = s.path("lz");
    let lower = s.lazy_pull(&store);
    let full = s.mount(&s.full_lower, "full");
    {
        let _m = s.mount(&lower, "m");
        assert_eq!(
            fs::read(s.path("m/etc/passwd")).expect("read"),
            fs::read(s.path("full/etc/passwd")).expect("full")
        );
    }
    let covered = |r: &Ranges| r.iter().map(|x| x.1 - x.0).sum::<u64>();
    let before: u64 = lower.split(':').map(|d| covered(&map_of(d))).sum();
    let mnt = s.path("m");
    let mut m = Launch::verlay(&format!("ro,lowerdir={lower}"), &mnt)
        .log(&s.path("m.log"))
        .env("VERLAY_CRASH_AT", "lazy.segment")
        .start();
    let _ = fs::metadata(mnt.join("etc/passwd"));
    let st = m.wait_within(Duration::from_secs(60));
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(st.and_then(|s| s.signal()), Some(9), "not killed:\n{}", m.log());
    m.umount_dead();
    drop(m);
    let at_kill: Vec<(String, u64, Ranges)> = layers
        .iter()
        .map(|(d, size)| (d.clone(), *size, map_of(diff_of(&lower, d))))
        .collect();
    let after: u64 = at_kill.iter().map(|l| covered(&l.2)).sum();
    assert!(
        after > before,
        "the killed background fetch recorded nothing ({before} bytes before, {after} after)"
    );
    s.proxy.clear();
    let mut m = Launch::verlay(&format!("ro,lowerdir={lower}"), &mnt)
        .log(&s.path("m2.log"))
        .start();
    fs::metadata(mnt.join("etc/passwd")).expect("stat");
    wait_sealed(&lower, &m);
    let log = m.log();
    assert!(lines_with(&log, "").is_empty(), "errors or warnings:\n{log}");
    m.unmount();
    let mut resumed = 0;
    for (d, size, map) in &at_kill {
        let asked = ranges_asked(&s, d);
        for r in &asked {
            let again: Vec<_> = map.iter().filter(|x| x.0 < r.1 && r.0 < x.1).collect();
            assert!(
                again.is_empty(),
                "layer {d}: {r:?} asked again, the map had {again:?} at the kill"
            );
        }
        assert!(
            overlaps(&asked).is_empty(),
            "layer {d}: asked twice after the resume"
        );
        let sum: u64 = asked.iter().map(|r| r.1 - r.0).sum();
        assert_eq!(
            sum,
            size - covered(map),
            "layer {d}: the resume asked for other than the gaps"
        );
        resumed += sum;
    }
    eprintln!(
        "resume: maps covered {before} B before the kill, {after} B at it; the resume moved {resumed} B"
    );
    let sealed = s.lazy_pull(&store);
    assert_eq!(chains(&sealed), chains(&s.full_lower));
    let m2 = s.mount(&sealed, "m");
    assert_eq!(tree(&mnt), tree(&s.path("full")), "the sealed mount differs");
    drop((m2, full));
}

/// Another process holds the store's lock (a snapshotter's operation, a long import): the
/// seal waits for it a bounded time (`VERLAY_LAZY_SEAL_WAIT_MS`), warns, leaves the layer
/// lazy and serving; the next mount seals it.
#[test]
fn the_seal_waits_a_bounded_time_for_a_locked_store_and_the_next_mount_seals() {
    let s = Scratch::new("lockwait");
    let store = s.path("lz");
    let lower = s.lazy_pull(&store);
    // the store lock held as another verlay process holds it (an flock on STORE/lock; this
    // process's open file, so the mount's flock conflicts with it)
    let held = fs::File::options()
        .read(true)
        .write(true)
        .open(store.join("lock"))
        .expect("store lock");
    rustix::fs::flock(&held, rustix::fs::FlockOperation::NonBlockingLockExclusive).expect("flock");
    let mnt = s.path("m");
    fs::create_dir_all(&mnt).expect("mkdir");
    let m = Launch::verlay(&format!("ro,lowerdir={lower}"), &mnt)
        .log(&s.path("m.log"))
        .env("VERLAY_LAZY_SEAL_WAIT_MS", "1000")
        .start();
    fs::metadata(mnt.join("etc/passwd")).expect("stat");
    // each layer's background thread: its blob whole, then a bounded wait and a warning
    let t0 = Instant::now();
    while lines_with(&m.log(), "stayed locked").len() < 3 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no bounded wait for the store lock:\n{}",
            m.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for d in lower.split(':') {
        assert!(
            record_of(d).get("sealed").is_none(),
            "{d} sealed under a held lock"
        );
    }
    let full = s.mount(&s.full_lower, "full");
    assert_eq!(tree(&mnt), tree(&s.path("full")), "the lazy mount differs");
    let log = m.log();
    assert_eq!(lines_with(&log, "").len(), 3, "other errors or warnings:\n{log}");
    drop((m, held));
    let m = Launch::verlay(&format!("ro,lowerdir={lower}"), &mnt)
        .log(&s.path("m2.log"))
        .start();
    fs::metadata(mnt.join("etc/passwd")).expect("stat");
    wait_sealed(&lower, &m);
    drop((m, full));
}

/// Another process fetches the layers (holds their fetch locks, as a second mount of them
/// does): this mount's background fetch fetches nothing meanwhile, takes over when the locks
/// go, and seals.
#[test]
fn a_mount_takes_over_the_background_fetch_when_the_process_that_had_it_goes() {
    let s = Scratch::new("takeover");
    let store = s.path("lz");
    let lower = s.lazy_pull(&store);
    let held: Vec<fs::File> = lower
        .split(':')
        .map(|d| {
            let f = fs::File::open(Path::new(d).with_file_name("lazy")).expect("lazy dir");
            rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).expect("flock");
            f
        })
        .collect();
    let covered = || -> u64 {
        lower
            .split(':')
            .map(|d| map_of(d).iter().map(|r| r.1 - r.0).sum::<u64>())
            .sum()
    };
    let before = covered();
    let mnt = s.path("m");
    fs::create_dir_all(&mnt).expect("mkdir");
    let m = Launch::verlay(&format!("ro,lowerdir={lower}"), &mnt)
        .log(&s.path("m.log"))
        .start();
    fs::metadata(mnt.join("etc/passwd")).expect("stat");
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        covered(),
        before,
        "fetched although another process has the layers"
    );
    for d in lower.split(':') {
        assert!(record_of(d).get("sealed").is_none(), "{d} sealed");
    }
    drop(held);
    wait_sealed(&lower, &m);
    let log = m.log();
    assert!(lines_with(&log, "").is_empty(), "errors or warnings:\n{log}");
    drop(m);
}
