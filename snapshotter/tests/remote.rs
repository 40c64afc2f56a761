//! The remote snapshotter protocol over gRPC, against a real registry (Debian's
//! docker-registry through tests/e2e/registry-env.sh) holding the test image
//! (tests/e2e/image.sh) converted to eStargz and pushed by the `verlay` binary:
//! - a Prepare with ctr-remote's labels records the layer lazily and answers AlreadyExists;
//!   the target is committed, labelled remote, found by containerd's own Walk filter;
//! - CRI's labels (no TOC label: the TOC digest read from the manifest) do the same;
//! - a TOC label that does not match the blob's TOC, and a layer without one, take the
//!   ordinary path (an active snapshot), with nothing stored;
//! - a child's mount is a verlay mount of the store layers, which reads the image's files
//!   (fetched on demand) byte for byte;
//! - Remove removes the store layers once no snapshot names them;
//! - a kill -9 between the store import and the record (`remote.import`) leaves a store
//!   layer that the restart removes, and the Prepare then works; after the record
//!   (`remote.db`) the restart keeps the target and its layer.
//!
//! Needs root (FUSE), docker-registry, jq, busybox-static (bash tests/setup.sh) and the
//! `verlay` binary beside `verlay-snapshotter` (`cargo build --release` at the workspace root).
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use containerd_snapshots::tonic::Code;

use common::*;

const TARGET: &str = "containerd.io/snapshot.ref";
const STARGZ_REF: &str = "containerd.io/snapshot/remote/stargz.reference";
const STARGZ_DIGEST: &str = "containerd.io/snapshot/remote/stargz.digest";
const TOC: &str = "containerd.io/snapshot/stargz/toc.digest";
const CRI_REF: &str = "containerd.io/snapshot/cri.image-ref";
const CRI_LAYER: &str = "containerd.io/snapshot/cri.layer-digest";
const CRI_MANIFEST: &str = "containerd.io/snapshot/cri.manifest-digest";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn verlay_bin() -> PathBuf {
    let b = Path::new(env!("CARGO_BIN_EXE_verlay-snapshotter")).with_file_name("verlay");
    assert!(
        b.exists(),
        "{} missing: cargo build --release at the workspace root",
        b.display()
    );
    b
}

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The registry of registry-env.sh, stopped by PID on drop.
struct Registry {
    dir: PathBuf,
    addr: String,
}

impl Registry {
    /// On a free port: found by binding and closing it, so another process may take it
    /// before the registry binds it; a few ports are tried.
    fn start(dir: &Path) -> Registry {
        let script = repo().join("tests/e2e/registry-env.sh");
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("free port")
                .port();
            let out = Command::new("bash")
                .arg(&script)
                .arg("start")
                .arg(dir)
                .arg(port.to_string())
                .stdin(Stdio::null())
                .output()
                .expect("registry-env.sh");
            if out.status.success() {
                return Registry {
                    dir: dir.to_path_buf(),
                    addr: format!("127.0.0.1:{port}"),
                };
            }
        }
        panic!(
            "the registry did not start on any of 5 free ports (see {}/registry.log)",
            dir.display()
        );
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(repo().join("tests/e2e/registry-env.sh"))
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

/// A verlay mount in the foreground; unmounted and reaped on drop.
struct FuseMount {
    child: Child,
    at: PathBuf,
}

fn is_mounted(at: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(at.to_str().expect("utf-8")))
}

impl FuseMount {
    /// With the background fetch off: reads fetch what they need, nothing else moves.
    fn start(opts: &str, at: &Path) -> FuseMount {
        Self::start_env(opts, at, &[("VERLAY_LAZY_BACKGROUND", "off")])
    }

    fn start_env(opts: &str, at: &Path, env: &[(&str, &str)]) -> FuseMount {
        std::fs::create_dir_all(at).expect("mkdir mountpoint");
        let child = Command::new(verlay_bin())
            .args(["-f", "-o", opts])
            .arg(at)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .env_remove("VERLAY_LAZY_BACKGROUND")
            .envs(env.iter().copied())
            .spawn()
            .expect("spawn verlay");
        let m = FuseMount {
            child,
            at: at.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !is_mounted(at) {
            assert!(Instant::now() < deadline, "verlay did not mount {}", at.display());
            std::thread::sleep(Duration::from_millis(20));
        }
        m
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3").arg("-u").arg(&self.at).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The pushed eStargz image: reference, manifest digest, layer digests and TOC digests.
struct Image {
    reference: String,
    manifest: String,
    layers: Vec<String>,
    tocs: Vec<String>,
    /// the plain gzip image's layer digests (no TOC)
    plain_layers: Vec<String>,
    /// the eStargz image's diffIDs (its config)
    diff_ids: Vec<String>,
}

fn manifest_of(store: &Path, name: &str) -> (String, serde_json::Value) {
    let rec: serde_json::Value = serde_json::from_slice(
        &std::fs::read(store.join("images").join(format!("{name}.json"))).expect("image record"),
    )
    .expect("json");
    let digest = rec["manifest"].as_str().expect("manifest digest").to_string();
    let blob = store
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"));
    (
        digest,
        serde_json::from_slice(&std::fs::read(blob).expect("manifest blob")).expect("json"),
    )
}

fn image(t: &Path, reg: &Registry) -> Image {
    let img = t.join("img");
    run(
        Command::new("bash")
            .arg(repo().join("tests/e2e/image.sh"))
            .arg(&img),
        "image.sh",
    );
    let s = t.join("src");
    let v = verlay_bin();
    run(
        Command::new(&v)
            .args(["image", "import", "-q", "--store"])
            .arg(&s)
            .args(["--name", "test"])
            .arg(img.join("oci")),
        "import",
    );
    run(
        Command::new(&v)
            .args(["image", "convert", "-q", "--store"])
            .arg(&s)
            .args(["--estargz", "--chunk-size", "65536", "test", "esgz"]),
        "convert",
    );
    let reference = format!("{}/remote/test:esgz", reg.addr);
    run(
        Command::new(&v)
            .args(["image", "push", "-q", "--store"])
            .arg(&s)
            .args(["--image", "esgz", &reference]),
        "push",
    );
    run(
        Command::new(&v)
            .args(["image", "push", "-q", "--store"])
            .arg(&s)
            .args(["--image", "test", &format!("{}/remote/test:plain", reg.addr)]),
        "push plain",
    );
    let (manifest, m) = manifest_of(&s, "esgz");
    let layers: Vec<String> = m["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["digest"].as_str().expect("digest").to_string())
        .collect();
    let tocs = m["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| {
            l["annotations"][TOC]
                .as_str()
                .expect("toc annotation")
                .to_string()
        })
        .collect();
    let config = m["config"]["digest"].as_str().expect("config digest");
    let config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(s.join("blobs/sha256").join(config.trim_start_matches("sha256:"))).expect("config"),
    )
    .expect("config json");
    let diff_ids = config["rootfs"]["diff_ids"]
        .as_array()
        .expect("diff_ids")
        .iter()
        .map(|d| d.as_str().expect("diff id").to_string())
        .collect();
    let (_, p) = manifest_of(&s, "test");
    let plain_layers = p["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["digest"].as_str().expect("digest").to_string())
        .collect();
    Image {
        reference,
        manifest,
        layers,
        tocs,
        plain_layers,
        diff_ids,
    }
}

fn store_layers(s: &Snapshotter) -> usize {
    std::fs::read_dir(s.root.join("store/layers"))
        .expect("store layers")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn estargz_layers_are_prepared_remotely_and_read_lazily() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let reg = Registry::start(&tmp.path().join("reg"));
    let img = image(tmp.path(), &reg);
    let s = Snapshotter::start(tmp.path(), None);
    let mut c = s.client().await;

    // layer 1 with ctr-remote's labels: AlreadyExists, the target committed and labelled
    let l1 = labels(&[
        (TARGET, "t1"),
        (STARGZ_REF, &img.reference),
        (STARGZ_DIGEST, &img.layers[0]),
        (TOC, &img.tocs[0]),
    ]);
    assert_eq!(
        code(prepare_labels(&mut c, "ns/1/extract t1", "", l1.clone()).await),
        Code::AlreadyExists
    );
    let info = stat(&mut c, "t1").await.expect("stat t1");
    assert_eq!(info.kind, 3, "committed: {info:?}");
    assert_eq!(
        info.labels
            .get("containerd.io/snapshot/remote")
            .map(String::as_str),
        Some("remote snapshot")
    );
    assert_eq!(
        code(stat(&mut c, "ns/1/extract t1").await),
        Code::NotFound,
        "the extraction key is not left behind"
    );
    // containerd's metadata store finds it with this Walk (metadata/snapshot.go)
    let f = r#"labels."containerd.io/snapshot.ref"==t1,parent=="""#;
    assert_eq!(walk(&mut c, &[f]).await.expect("walk"), ["t1"]);
    assert_eq!(store_layers(&s), 1);
    // the same layer prepared again (another namespace): AlreadyExists, nothing new
    assert_eq!(
        code(prepare_labels(&mut c, "ns2/1/extract t1", "", l1).await),
        Code::AlreadyExists
    );
    assert_eq!(store_layers(&s), 1);

    // layer 2 with CRI's labels, no TOC label: the TOC digest comes from the manifest
    let l2 = labels(&[
        (TARGET, "t2"),
        (CRI_REF, &img.reference),
        (CRI_LAYER, &img.layers[1]),
        (CRI_MANIFEST, &img.manifest),
    ]);
    assert_eq!(
        code(prepare_labels(&mut c, "ns/2/extract t2", "t1", l2).await),
        Code::AlreadyExists
    );
    assert_eq!(stat(&mut c, "t2").await.expect("stat t2").parent, "t1");
    assert_eq!(store_layers(&s), 2);

    // layer 3 under a TOC digest that is not its TOC's: refused, the ordinary path
    let bad = labels(&[
        (TARGET, "t3"),
        (STARGZ_REF, &img.reference),
        (STARGZ_DIGEST, &img.layers[2]),
        (TOC, &img.tocs[0]),
    ]);
    let m = prepare_labels(&mut c, "ns/3/extract t3", "t2", bad)
        .await
        .expect("ordinary prepare");
    assert_eq!(m[0].r#type, "fuse3.verlay", "{m:?}");
    assert!(
        m[0].options.iter().any(|o| o.starts_with("upperdir=")),
        "an active snapshot: {m:?}"
    );
    assert_eq!(code(stat(&mut c, "t3").await), Code::NotFound);
    assert_eq!(store_layers(&s), 2, "a layer whose TOC does not match was stored");
    remove(&mut c, "ns/3/extract t3").await.expect("remove t3 key");
    // a plain gzip layer (no TOC anywhere): the ordinary path
    let plain = labels(&[
        (TARGET, "p3"),
        (CRI_REF, &img.reference),
        (CRI_LAYER, &img.plain_layers[2]),
        (CRI_MANIFEST, &img.manifest),
    ]);
    prepare_labels(&mut c, "ns/4/extract p3", "t2", plain)
        .await
        .expect("ordinary prepare of a plain layer");
    remove(&mut c, "ns/4/extract p3").await.expect("remove p3 key");
    // layer 3 right
    let l3 = labels(&[
        (TARGET, "t3"),
        (STARGZ_REF, &img.reference),
        (STARGZ_DIGEST, &img.layers[2]),
        (TOC, &img.tocs[2]),
    ]);
    assert_eq!(
        code(prepare_labels(&mut c, "ns/5/extract t3", "t2", l3).await),
        Code::AlreadyExists
    );

    // a container's snapshot: a verlay mount of the three store layers, files read lazily
    let m = prepare(&mut c, "ctr", "t3").await.expect("prepare ctr");
    assert_eq!(m[0].r#type, "fuse3.verlay");
    let lower = m[0]
        .options
        .iter()
        .find_map(|o| o.strip_prefix("lowerdir="))
        .expect("lowerdir");
    assert_eq!(
        lower.split(':').filter(|l| l.contains("/store/layers/")).count(),
        3,
        "{lower}"
    );
    {
        let mnt = tmp.path().join("mnt");
        let _m = FuseMount::start(&m[0].options.join(","), &mnt);
        assert_eq!(
            std::fs::read_to_string(mnt.join("etc/motd")).expect("motd"),
            "motd from layer2\n"
        );
        assert!(!mnt.join("etc/remove-me").exists(), "whiteout");
        let blob = std::fs::read(mnt.join("data/blob")).expect("read /data/blob");
        let layer3 = tmp
            .path()
            .join("img/oci/blobs/sha256")
            .join(img.plain_layers[2].trim_start_matches("sha256:"));
        let want = Command::new("tar")
            .arg("-xzOf")
            .arg(&layer3)
            .arg("./data/blob")
            .output()
            .expect("tar")
            .stdout;
        assert_eq!(want.len(), 1 << 20, "the original /data/blob");
        assert!(
            blob == want,
            "/data/blob through the lazy mount differs from the original"
        );
    }

    // Remove: the store layers go once no snapshot names them
    remove(&mut c, "ctr").await.expect("remove ctr");
    remove(&mut c, "t3").await.expect("remove t3");
    assert_eq!(store_layers(&s), 2);
    remove(&mut c, "t2").await.expect("remove t2");
    remove(&mut c, "t1").await.expect("remove t1");
    assert_eq!(store_layers(&s), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_during_a_remote_prepare_leaves_no_half_recorded_layer() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let reg = Registry::start(&tmp.path().join("reg"));
    let img = image(tmp.path(), &reg);
    let l1 = labels(&[
        (TARGET, "t1"),
        (STARGZ_REF, &img.reference),
        (STARGZ_DIGEST, &img.layers[0]),
        (TOC, &img.tocs[0]),
    ]);
    {
        let mut s = Snapshotter::start(tmp.path(), Some("remote.import"));
        let mut c = s.client().await;
        assert!(prepare_labels(&mut c, "k1", "", l1.clone()).await.is_err());
        s.wait_dead();
        assert_eq!(
            store_layers(&s),
            1,
            "the crash point comes after the store import"
        );
    }
    {
        let mut s = Snapshotter::start(tmp.path(), Some("remote.db"));
        assert_eq!(
            store_layers(&s),
            0,
            "the restart removes the layer no record names"
        );
        let mut c = s.client().await;
        assert!(prepare_labels(&mut c, "k2", "", l1.clone()).await.is_err());
        s.wait_dead();
    }
    let s = Snapshotter::start(tmp.path(), None);
    let mut c = s.client().await;
    assert_eq!(store_layers(&s), 1, "the recorded layer stays");
    assert_eq!(stat(&mut c, "t1").await.expect("stat t1").kind, 3);
    assert_eq!(
        code(prepare_labels(&mut c, "k3", "", l1).await),
        Code::AlreadyExists
    );
    assert_eq!(store_layers(&s), 1);
}

/// The `layer.json` of each store layer, by chain hex.
fn store_records(s: &Snapshotter) -> Vec<(String, serde_json::Value)> {
    let mut v: Vec<_> = std::fs::read_dir(s.root.join("store/layers"))
        .expect("store layers")
        .map(|e| {
            let e = e.expect("dirent");
            let r = serde_json::from_slice(&std::fs::read(e.path().join("layer.json")).expect("layer.json"))
                .expect("json");
            (e.file_name().to_string_lossy().into_owned(), r)
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Layers recorded from containerd's labels (which carry no diffID) seal once a mount's
/// background fetch has their blobs: the import computes the diffID over the stream of the
/// blob that hashes to the labelled digest. Then a container's mount names the sealed
/// layers (no registry needed), a restart keeps them, and Remove removes them with their
/// blobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_layers_seal_with_the_diff_ids_their_blobs_hash_to() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let reg = Registry::start(&tmp.path().join("reg"));
    let img = image(tmp.path(), &reg);
    let mut s = Snapshotter::start(tmp.path(), None);
    let mut c = s.client().await;
    let mut parent = String::new();
    for i in 0..3 {
        let t = format!("t{}", i + 1);
        let l = labels(&[
            (TARGET, &t),
            (STARGZ_REF, &img.reference),
            (STARGZ_DIGEST, &img.layers[i]),
            (TOC, &img.tocs[i]),
        ]);
        assert_eq!(
            code(prepare_labels(&mut c, &format!("ns/{i}/extract {t}"), &parent, l).await),
            Code::AlreadyExists
        );
        parent = t;
    }
    let m = prepare(&mut c, "ctr", "t3").await.expect("prepare ctr");
    {
        // the background fetch on, as containerd's mounts have it
        let mnt = tmp.path().join("mnt");
        let _m = FuseMount::start_env(&m[0].options.join(","), &mnt, &[]);
        assert_eq!(
            std::fs::read_to_string(mnt.join("etc/motd")).expect("motd"),
            "motd from layer2\n"
        );
        let t0 = Instant::now();
        loop {
            let recs = store_records(&s);
            let lazy: Vec<_> = recs.iter().filter(|r| r.1.get("lazy").is_some()).collect();
            if lazy.len() == 3 && lazy.iter().all(|r| r.1.get("sealed").is_some()) {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "the remote layers did not seal in a minute: {recs:#?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let recs = store_records(&s);
    assert_eq!(recs.len(), 6, "3 lazy layers and the 3 they sealed as");
    for (i, blob) in img.layers.iter().enumerate() {
        let lazy = recs
            .iter()
            .find(|r| r.1["lazy"]["blob_digest"].as_str() == Some(blob))
            .expect("the lazy layer of the blob");
        assert!(
            lazy.1["lazy"]["diff_id"].is_null(),
            "containerd's labels carry no diffID"
        );
        let sealed = lazy.1["sealed"]
            .as_str()
            .expect("sealed")
            .trim_start_matches("sha256:");
        let (_, r) = recs.iter().find(|r| r.0 == sealed).expect("the sealed layer");
        assert!(r.get("lazy").is_none());
        assert_eq!(
            r["diff_id"].as_str(),
            Some(img.diff_ids[i].as_str()),
            "layer {i}: diffID"
        );
        assert_eq!(r["blob_digest"].as_str(), Some(blob.as_str()), "layer {i}: blob");
        assert!(
            s.root
                .join("store/blobs/sha256")
                .join(blob.trim_start_matches("sha256:"))
                .is_file(),
            "layer {i}: blob not kept"
        );
    }
    // a restart keeps the sealed layers (the records name them through the lazy ones)
    drop(c);
    drop(s);
    s = Snapshotter::start(tmp.path(), None);
    let mut c = s.client().await;
    assert_eq!(store_layers(&s), 6, "the restart removed sealed layers");
    // a new container's mount names the sealed layers, and reads without the registry
    drop(reg);
    let m = prepare(&mut c, "ctr2", "t3").await.expect("prepare ctr2");
    let lower = m[0]
        .options
        .iter()
        .find_map(|o| o.strip_prefix("lowerdir="))
        .expect("lowerdir")
        .to_string();
    let sealed: Vec<&str> = lower
        .split(':')
        .filter(|l| l.contains("/store/layers/"))
        .collect();
    assert_eq!(sealed.len(), 3, "{lower}");
    for l in &sealed {
        let r: serde_json::Value = serde_json::from_slice(
            &std::fs::read(Path::new(l).with_file_name("layer.json")).expect("layer.json"),
        )
        .expect("json");
        assert!(r.get("lazy").is_none(), "{l} is not the sealed layer");
    }
    {
        let mnt = tmp.path().join("mnt2");
        let _m = FuseMount::start(&m[0].options.join(","), &mnt);
        let blob = std::fs::read(mnt.join("data/blob")).expect("read /data/blob");
        let layer3 = tmp
            .path()
            .join("img/oci/blobs/sha256")
            .join(img.plain_layers[2].trim_start_matches("sha256:"));
        let want = Command::new("tar")
            .arg("-xzOf")
            .arg(&layer3)
            .arg("./data/blob")
            .output()
            .expect("tar")
            .stdout;
        assert!(blob == want, "/data/blob through the sealed layers differs");
    }
    // Remove: the lazy layers, the sealed ones and their blobs go
    for k in ["ctr", "ctr2", "t3", "t2", "t1"] {
        remove(&mut c, k).await.expect("remove");
    }
    assert_eq!(store_layers(&s), 0);
    for blob in &img.layers {
        assert!(
            !s.root
                .join("store/blobs/sha256")
                .join(blob.trim_start_matches("sha256:"))
                .exists(),
            "blob {blob} left"
        );
    }
}
