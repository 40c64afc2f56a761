//! `verlay image pull` / `verlay image push` against a real registry (Debian's
//! docker-registry, distribution 2.8, started on a free 127.0.0.1 port per test and killed by
//! PID on drop): what is pushed is byte-identical in the registry and pulls back to the same
//! layers; skopeo agrees in both directions; a pull killed with SIGKILL publishes nothing
//! half-done and resumes; pushes and pulls through a fault-injecting proxy (tests/faultproxy)
//! succeed, and no upload session is ever sent the same byte range twice; failures say what
//! failed and publish nothing. Against a tiny loopback server in the test: redirects are
//! followed only to hosts the first request may reach (refused before connecting, loops
//! bounded), and absurd descriptor sizes are refused before any blob is fetched.
//!
//! Needs docker-registry and skopeo (bash tests/setup.sh installs them); the test image is
//! tests/e2e/image.sh's.

mod faultproxy;
#[macro_use]
mod common;

use std::collections::BTreeMap;
use std::fs;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::cmd::{spawn_verlay as spawn, test_image, verlay, wait_out, Out};
use common::registry::{free_port, http_status, Registry};
use common::{dir_names, e2e_script, have};
use faultproxy::{Exchange, FaultProxy, Faults};
use sha2::{Digest, Sha256};

fn tempdir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("verlay-registry-{tag}-"))
        .tempdir()
        .expect("tempdir")
}

impl Registry {
    /// The registry's own copy of a blob.
    fn blob(&self, digest: &str) -> Option<Vec<u8>> {
        let hex = digest.trim_start_matches("sha256:");
        fs::read(
            self.dir
                .join("data/docker/registry/v2/blobs/sha256")
                .join(&hex[..2])
                .join(hex)
                .join("data"),
        )
        .ok()
    }
}

/// Poll `ready` while `child` (a verlay `what`) runs, for up to a minute; when it gives a
/// value, kill -9 the child by its handle and return the value. Fails with `never` if the
/// minute passes first.
fn kill_when<T>(child: &mut Child, what: &str, never: &str, mut ready: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    let found = loop {
        if let Some(found) = ready() {
            break found;
        }
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "the {what} ended before it could be killed"
        );
        assert!(Instant::now() < deadline, "{never}");
        std::thread::sleep(Duration::from_millis(5));
    };
    child.kill().unwrap_or_else(|e| panic!("kill -9 the {what}: {e}"));
    let _ = child.wait();
    found
}

/// `verlay image pull --store STORE ARGS...` (the reference last in `args`).
fn pull(store: &Path, args: &[&str]) -> Out {
    verlay(&[&["image", "pull", "--store", p(store)], args].concat())
}

/// `verlay image push --store STORE --image IMAGE ARGS...` (the target last in `args`).
fn push(store: &Path, image: &str, args: &[&str]) -> Out {
    verlay(&[&["image", "push", "--store", p(store), "--image", image], args].concat())
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// Import the test image's OCI layout into `store` under `name`; returns the lowerdir.
fn import(store: &Path, img: &Path, name: &str) -> String {
    verlay(&[
        "image",
        "import",
        "--store",
        p(store),
        "--name",
        name,
        p(&img.join("oci")),
    ])
    .printed("image import")
}

/// What most tests start from. Fields drop in order: the registry is killed before its
/// directory is removed.
struct Scratch {
    reg: Registry,
    /// the test image's image.env
    env: BTreeMap<String, String>,
    /// the test image (`tests/e2e/image.sh` output)
    img: PathBuf,
    /// a store holding the test image as "test"
    s1: PathBuf,
    /// the lowerdir of "test" in `s1`
    lower1: String,
    t: tempfile::TempDir,
}

impl Scratch {
    /// The test image, a registry and a store with the image imported, in a new temp dir.
    fn new(tag: &str) -> Scratch {
        let t = tempdir(tag);
        let env = test_image(t.path());
        let img = t.path().join("img");
        let reg = Registry::start(&t.path().join("reg"));
        let s1 = t.path().join("s1");
        let lower1 = import(&s1, &img, "test");
        Scratch {
            reg,
            env,
            img,
            s1,
            lower1,
            t,
        }
    }

    /// `name` in the temp dir.
    fn path(&self, name: impl AsRef<Path>) -> PathBuf {
        self.t.path().join(name)
    }
}

fn sha256_hex(b: &[u8]) -> String {
    format!("{:x}", Sha256::digest(b))
}

/// Chain IDs of a lowerdir (top first), as hex.
fn chains(lowerdir: &str) -> Vec<String> {
    lowerdir
        .split(':')
        .map(|d| {
            Path::new(d)
                .parent()
                .and_then(|l| l.file_name())
                .and_then(|n| n.to_str())
                .unwrap_or("")
                .to_string()
        })
        .collect()
}

/// The blobs of the test image's OCI layout: digest -> bytes.
fn layout_blobs(img: &Path) -> BTreeMap<String, Vec<u8>> {
    let dir = img.join("oci/blobs/sha256");
    dir_names(&dir)
        .into_iter()
        .map(|n| {
            let b = fs::read(dir.join(&n)).expect("layout blob");
            (format!("sha256:{n}"), b)
        })
        .collect()
}

/// Every blob of the layout is in the registry, byte for byte.
fn assert_registry_has(reg: &Registry, blobs: &BTreeMap<String, Vec<u8>>) {
    for (d, want) in blobs {
        let got = reg.blob(d).unwrap_or_else(|| panic!("registry lacks blob {d}"));
        assert!(
            got == *want,
            "registry's blob {d} differs from the source ({} vs {} bytes)",
            got.len(),
            want.len()
        );
    }
}

/// The promise of a store after anything, even a kill: every published blob hashes to its
/// name, every published layer verifies, and `images/` holds only complete records.
fn assert_store_consistent(store: &Path) {
    for n in dir_names(&store.join("blobs/sha256")) {
        let b = fs::read(store.join("blobs/sha256").join(&n)).expect("blob");
        assert_eq!(sha256_hex(&b), n, "published blob {n} does not hash to its name");
    }
    if !dir_names(&store.join("layers")).is_empty() {
        verlay(&["verify", "--store", p(store), "--all"]).ok("verify of the published layers");
    }
}

/// A pull (`args`: options, then the reference) into `store` fails with exit code 1, says
/// each of `wants`, and publishes nothing.
fn assert_pull_fails(store: &Path, args: &[&str], wants: &[&str]) {
    let out = pull(store, args);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    eprintln!("{}", out.stderr.trim());
    for want in wants {
        assert!(out.stderr.contains(want), "missing {want:?} in: {}", out.stderr);
    }
    assert_eq!(
        dir_names(&store.join("layers")),
        Vec::<String>::new(),
        "a layer was published"
    );
    assert_eq!(
        dir_names(&store.join("images")),
        Vec::<String>::new(),
        "an image was recorded"
    );
    assert_store_consistent(store);
}

/// No upload session was sent the same byte range twice: per session id, the PATCH body
/// bytes the proxy forwarded to the registry cover disjoint ranges.
fn assert_one_pass_per_session(log: &[Exchange]) -> BTreeMap<String, Vec<(u64, u64)>> {
    let mut sessions: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
    for e in log.iter().filter(|e| e.method == "PATCH") {
        let id = e.upload_id().expect("PATCH on an upload URL").to_string();
        let start = e
            .range_start()
            .unwrap_or_else(|| panic!("PATCH without Content-Range: {e:?}"));
        if e.body_forwarded > 0 {
            sessions
                .entry(id)
                .or_default()
                .push((start, start + e.body_forwarded));
        }
    }
    for (id, ranges) in &mut sessions {
        ranges.sort();
        for w in ranges.windows(2) {
            assert!(
                w[1].0 >= w[0].1,
                "upload session {id} was sent bytes {}..{} twice (ranges {ranges:?})",
                w[1].0,
                w[0].1.min(w[1].1)
            );
        }
    }
    sessions
}

#[test]
fn push_then_pull_gives_identical_blobs_layers_and_chain_ids() {
    let x = Scratch::new("roundtrip");
    let s2 = x.path("s2");
    let target = format!("{}/test:1", x.reg.addr);

    let out = push(&x.s1, "test", &["--chunk-size", "100000", &target]);
    out.ok("push");
    let manifest = &x.env["MANIFEST_DIGEST"];
    assert_eq!(out.stdout.trim(), format!("{target}@{manifest}"));
    assert_registry_has(&x.reg, &layout_blobs(&x.img));

    // a second push finds every blob in the registry and uploads nothing
    let again = push(&x.s1, "test", &[&target]);
    assert!(
        again
            .ok("second push")
            .stderr
            .contains("0 blobs uploaded in 0 sessions"),
        "{}",
        again.stderr
    );

    let lower2 = pull(&s2, &[&target]).printed("pull");
    assert_eq!(
        chains(&lower2),
        chains(&x.lower1),
        "pulled chain IDs differ from the imported ones"
    );
    assert!(
        lower2.starts_with(p(&s2.canonicalize().expect("canonical"))),
        "{lower2}"
    );
    assert_store_consistent(&s2);
    let ls = verlay(&["image", "ls", "--store", p(&s2)]);
    assert!(
        ls.ok("ls").stdout.contains(&target) && ls.stdout.contains(manifest),
        "{}",
        ls.stdout
    );

    // pulling again fetches nothing
    let again = pull(&s2, &[&target]);
    assert!(
        again
            .ok("second pull")
            .stderr
            .contains("0 blobs fetched (0 bytes), 4 already in the store"),
        "{}",
        again.stderr
    );

    // a docker-archive has no registry manifest: verlay makes one, and the layers are the same
    let s3 = x.path("s3");
    verlay(&[
        "image",
        "import",
        "--store",
        p(&s3),
        "--name",
        "d",
        p(&x.img.join("image.docker.tar")),
    ])
    .ok("import docker-archive");
    let target_d = format!("{}/fromdocker:1", x.reg.addr);
    push(&s3, "d", &[&target_d]).ok("push docker-archive image");
    let s4 = x.path("s4");
    let lower4 = pull(&s4, &[&target_d]).printed("pull");
    assert_eq!(chains(&lower4), chains(&x.lower1));
}

#[test]
fn skopeo_and_verlay_read_each_others_pushes_oci_docker_v2s2_and_index() {
    assert!(
        have("skopeo"),
        "skopeo is not installed (bash tests/setup.sh installs it)"
    );
    let x = Scratch::new("skopeo");
    let skopeo = |args: &[&str]| {
        // registry-env.sh keeps skopeo's root-only blob-info cache under the given dir
        let out = Command::new("bash")
            .arg(e2e_script("registry-env.sh"))
            .arg("skopeo")
            .arg(x.path("skopeo"))
            .args(args)
            .output()
            .expect("skopeo");
        assert!(
            out.status.success(),
            "skopeo {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };

    let pushed = format!("{}/byverlay:1", x.reg.addr);
    push(&x.s1, "test", &[&pushed]).ok("push");
    let out = x.path("skopeo-out");
    skopeo(&[
        "copy",
        "-q",
        "--src-tls-verify=false",
        &format!("docker://{pushed}"),
        &format!("oci:{}:1", p(&out)),
    ]);
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(out.join("index.json")).expect("index.json")).expect("json");
    assert_eq!(
        index["manifests"][0]["digest"].as_str(),
        Some(x.env["MANIFEST_DIGEST"].as_str())
    );

    let by_skopeo = format!("{}/byskopeo:1", x.reg.addr);
    skopeo(&[
        "copy",
        "-q",
        "--dest-tls-verify=false",
        &format!("oci:{}:1", p(&x.img.join("oci"))),
        &format!("docker://{by_skopeo}"),
    ]);
    let s2 = x.path("s2");
    let lower2 = pull(&s2, &[&by_skopeo]).printed("pull");
    assert_eq!(chains(&lower2), chains(&x.lower1));

    // Docker v2 schema 2 (skopeo converts the media types): pulled, and pushed on unchanged
    let v2s2 = format!("{}/v2s2:1", x.reg.addr);
    skopeo(&[
        "copy",
        "-q",
        "--dest-tls-verify=false",
        "--format",
        "v2s2",
        &format!("oci:{}:1", p(&x.img.join("oci"))),
        &format!("docker://{v2s2}"),
    ]);
    let s3 = x.path("s3");
    let pulled = pull(&s3, &[&v2s2]);
    assert_eq!(chains(&pulled.printed("pull v2s2")), chains(&x.lower1));
    let digest = manifest_in_summary(&pulled.stderr);
    assert_ne!(
        digest, x.env["MANIFEST_DIGEST"],
        "skopeo did not convert the manifest"
    );
    let rec = fs::read_to_string(
        s3.join("images")
            .join(format!("{}.json", v2s2.replace(':', "%3A").replace('/', "%2F"))),
    )
    .expect("image record");
    assert!(
        rec.contains("application/vnd.docker.distribution.manifest.v2+json"),
        "{rec}"
    );
    let again = format!("{}/v2s2-again:1", x.reg.addr);
    let pushed = push(&s3, &v2s2, &[&again]);
    assert_eq!(pushed.printed("push v2s2"), format!("{again}@{digest}"));

    // an index with two platforms: the linux image of this machine's architecture is chosen
    let multi = multi_arch_layout(&x.img, x.t.path(), &x.env["MANIFEST_DIGEST"]);
    let by_index = format!("{}/multi:1", x.reg.addr);
    skopeo(&[
        "copy",
        "-q",
        "--all",
        "--dest-tls-verify=false",
        &format!("oci:{}:1", p(&multi)),
        &format!("docker://{by_index}"),
    ]);
    let s4 = x.path("s4");
    let pulled = pull(&s4, &[&by_index]);
    assert_eq!(chains(&pulled.printed("pull index")), chains(&x.lower1));
    assert_eq!(manifest_in_summary(&pulled.stderr), x.env["MANIFEST_DIGEST"]);
}

/// The manifest digest in pull's summary line `... (manifest sha256:HEX): ...`.
fn manifest_in_summary(stderr: &str) -> String {
    let at = stderr.find("(manifest sha256:").expect("summary line") + "(manifest ".len();
    stderr[at..at + 71].to_string()
}

/// An OCI layout whose index.json names an image index of two platforms: an s390x variant
/// (the test image with another config) and the test image itself for this machine.
fn multi_arch_layout(img: &Path, dir: &Path, manifest: &str) -> PathBuf {
    let out = dir.join("multi");
    let blobs = out.join("blobs/sha256");
    fs::create_dir_all(&blobs).expect("mkdir");
    for (d, b) in layout_blobs(img) {
        fs::write(blobs.join(d.trim_start_matches("sha256:")), b).expect("copy blob");
    }
    fs::write(out.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).expect("oci-layout");
    let put = |b: &[u8]| {
        let hex = sha256_hex(b);
        fs::write(blobs.join(&hex), b).expect("blob");
        format!("sha256:{hex}")
    };
    let read = |d: &str| fs::read(blobs.join(d.trim_start_matches("sha256:"))).expect("blob");
    let man_bytes = read(manifest);
    let mut man: serde_json::Value = serde_json::from_slice(&man_bytes).expect("manifest");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&read(man["config"]["digest"].as_str().expect("config"))).expect("config");
    cfg["architecture"] = "s390x".into();
    let cfg2 = serde_json::to_vec(&cfg).expect("json");
    man["config"]["digest"] = put(&cfg2).into();
    man["config"]["size"] = cfg2.len().into();
    let man2 = serde_json::to_vec(&man).expect("json");
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        a => a,
    };
    let mt = "application/vnd.oci.image.manifest.v1+json";
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": mt, "digest": put(&man2), "size": man2.len(),
             "platform": {"os": "linux", "architecture": "s390x"}},
            {"mediaType": mt, "digest": manifest, "size": man_bytes.len(),
             "platform": {"os": "linux", "architecture": arch}},
        ],
    });
    let index = serde_json::to_vec(&index).expect("json");
    let top = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": put(&index),
            "size": index.len(),
            "annotations": {"org.opencontainers.image.ref.name": "1"},
        }],
    });
    fs::write(out.join("index.json"), serde_json::to_vec(&top).expect("json")).expect("index.json");
    out
}

#[test]
fn a_killed_pull_publishes_nothing_half_done_and_resumes_with_a_range_request() {
    let x = Scratch::new("kill");
    let target = format!("{}/test:1", x.reg.addr);
    push(&x.s1, "test", &[&target]).ok("push");

    // slow responses, so the kill lands in the middle of a blob
    let proxy = FaultProxy::start(
        x.reg.addr,
        Faults {
            throttle: Some(400_000),
            ..Faults::default()
        },
    );
    let via = format!("{}/test:1", proxy.addr);
    let s2 = x.path("s2");
    let mut child = spawn(&["image", "pull", "--store", p(&s2), &via], &[]);
    let incoming = s2.join("blobs/incoming");
    let (_, partial_hex) = kill_when(&mut child, "pull", "no partial blob appeared", || {
        dir_names(&incoming)
            .into_iter()
            .map(|n| (fs::metadata(incoming.join(&n)).map(|m| m.len()).unwrap_or(0), n))
            .find(|(len, _)| *len > 200_000)
    });
    let partial_len = fs::metadata(incoming.join(&partial_hex)).expect("partial").len();
    let total = layout_blobs(&x.img)[&format!("sha256:{partial_hex}")].len() as u64;
    assert!(partial_len < total, "the blob was complete when killed");

    // nothing half-done: the partial blob is not published, no image is recorded
    assert!(
        !s2.join("blobs/sha256").join(&partial_hex).exists(),
        "a partial blob was published"
    );
    assert_eq!(
        dir_names(&s2.join("images")),
        Vec::<String>::new(),
        "an image was recorded"
    );
    assert_store_consistent(&s2);

    // the next pull continues the partial blob with a Range request
    proxy.set(Faults::default());
    proxy.clear();
    let lower2 = pull(&s2, &[&via]).printed("resumed pull");
    assert_eq!(chains(&lower2), chains(&x.lower1));
    let get = proxy
        .log()
        .into_iter()
        .find(|e| e.method == "GET" && e.path.ends_with(&partial_hex))
        .expect("a GET of the partial blob");
    assert_eq!(
        get.range.as_deref(),
        Some(format!("bytes={partial_len}-").as_str()),
        "{get:?}"
    );
    assert_eq!(get.status, Some(206));
    assert_eq!(
        get.response_forwarded,
        total - partial_len,
        "bytes fetched again for the partial blob"
    );
    assert_store_consistent(&s2);
    assert!(!incoming.join(&partial_hex).exists());

    // a pull killed inside a layer import (after the manifest is sealed) leaves no layer
    // that looks complete; the next pull imports it
    let s3 = x.path("s3");
    let crashed = wait_out(
        spawn(
            &["image", "pull", "--store", p(&s3), &target],
            &[("VERLAY_CRASH_AT", "import.seal")],
        ),
        "pull with a crash point",
    );
    assert_ne!(crashed.code, Some(0));
    assert_eq!(dir_names(&s3.join("layers")), Vec::<String>::new());
    assert_eq!(dir_names(&s3.join("images")), Vec::<String>::new());
    let lower3 = pull(&s3, &[&target]).printed("pull after crash");
    assert_eq!(chains(&lower3), chains(&x.lower1));
    assert_store_consistent(&s3);
}

#[test]
fn a_killed_push_continues_its_upload_session_and_sends_no_range_twice() {
    let x = Scratch::new("killpush");
    const CHUNK: u64 = 65536;
    const CONFIRMED: u64 = 5;
    // after five chunks the proxy holds the next request, unread: the kill then finds no
    // chunk in flight at the registry
    let proxy = FaultProxy::start(
        x.reg.addr,
        Faults {
            hold_after_patches: Some(CONFIRMED),
            stall_ms: 30_000,
            ..Faults::default()
        },
    );
    let via = format!("{}/killed:1", proxy.addr);
    let chunk = CHUNK.to_string();
    let args = [
        "image",
        "push",
        "--store",
        p(&x.s1),
        "--image",
        "test",
        "--chunk-size",
        &chunk,
        &via,
    ];
    let mut child = spawn(&args, &[]);
    kill_when(&mut child, "push", "the push was never held", || {
        proxy.log().iter().any(|e| e.fault == Some("hold")).then_some(())
    });
    let saved = dir_names(&x.s1.join("uploads"));
    assert_eq!(saved.len(), 1, "one open upload session is saved: {saved:?}");
    let rec: serde_json::Value =
        serde_json::from_slice(&fs::read(x.s1.join("uploads").join(&saved[0])).expect("saved session"))
            .expect("json");
    assert_eq!(rec["offset"].as_u64(), Some(CONFIRMED * CHUNK), "{rec}");
    assert_eq!(
        http_status(x.reg.addr, "HEAD", "/v2/killed/manifests/1"),
        Some(404),
        "a tag was pushed"
    );

    proxy.set(Faults::default());
    let before = proxy.log().len();
    let first_id = proxy
        .log()
        .iter()
        .find(|e| e.method == "PATCH")
        .and_then(|e| e.upload_id().map(str::to_owned))
        .expect("a PATCH before the kill");
    verlay(&args).ok("push after the kill");
    let log = proxy.log();
    let resumed = log[before..]
        .iter()
        .find(|e| e.method == "PATCH")
        .expect("a PATCH after the kill");
    assert_eq!(
        resumed.upload_id(),
        Some(first_id.as_str()),
        "the session was not continued"
    );
    assert_eq!(resumed.range_start(), Some(CONFIRMED * CHUNK));
    assert_one_pass_per_session(&log);
    assert_registry_has(&x.reg, &layout_blobs(&x.img));
    assert_eq!(
        dir_names(&x.s1.join("uploads")),
        Vec::<String>::new(),
        "a finished session is still saved"
    );
    let s2 = x.path("s2");
    let lower2 = pull(&s2, &[&format!("{}/killed:1", x.reg.addr)]).printed("pull");
    assert_eq!(chains(&lower2), chains(&x.lower1));
}

#[test]
fn pushes_and_pulls_through_a_faulty_network_arrive_whole_and_send_each_range_once() {
    let x = Scratch::new("faults");
    let blobs = layout_blobs(&x.img);
    let mut seen: BTreeMap<&'static str, usize> = BTreeMap::new();
    let (mut restarts, mut resumed_gets, mut exchanges, mut resent) = (0usize, 0usize, 0usize, 0usize);
    // VERLAY_REGISTRY_SEEDS=N runs seeds 1..=N (a longer soak); VERLAY_REGISTRY_SEED=S one seed
    let seeds: Vec<u64> = match (
        std::env::var("VERLAY_REGISTRY_SEED")
            .ok()
            .and_then(|s| s.parse().ok()),
        std::env::var("VERLAY_REGISTRY_SEEDS")
            .ok()
            .and_then(|s| s.parse().ok()),
    ) {
        (Some(one), _) => vec![one],
        (None, Some(n)) => (1..=n).collect(),
        (None, None) => (1..=4).collect(),
    };
    // the default seeds are known to inject every kind of fault; a single seed may not
    let all_kinds = seeds.len() >= 4;
    for &seed in &seeds {
        let faults = Faults {
            seed,
            refuse: 30,
            stall: 10,
            cut_request_body: 40,
            drop_response: 30,
            cut_response_body: 60,
            stall_ms: 1500,
            delay_ms: 20,
            ..Faults::default()
        };
        let proxy = FaultProxy::start(x.reg.addr, faults.clone());
        let via = format!("{}/fault{seed}:1", proxy.addr);
        let common = ["--retries", "10", "--timeout", "1"];
        let out = push(
            &x.s1,
            "test",
            &[&["--chunk-size", "131072"], &common[..], &[&via]].concat(),
        );
        out.ok(&format!("push with seed {seed}"));
        let log = proxy.log();
        let sessions = assert_one_pass_per_session(&log);
        restarts += sessions.len().saturating_sub(blobs.len());
        // a chunk tried again in the same session: the first try never reached the registry
        // (refused, stalled) and the registry confirmed the offset before the second
        let mut tries: BTreeMap<(String, u64), usize> = BTreeMap::new();
        for e in log.iter().filter(|e| e.method == "PATCH") {
            if let (Some(id), Some(start)) = (e.upload_id(), e.range_start()) {
                *tries.entry((id.to_string(), start)).or_default() += 1;
            }
        }
        resent += tries.values().filter(|n| **n > 1).count();
        assert_registry_has(&x.reg, &blobs);
        // the tag names the pushed manifest
        assert_eq!(
            http_status(x.reg.addr, "HEAD", &format!("/v2/fault{seed}/manifests/1")),
            Some(200)
        );

        proxy.clear();
        // downloads: more cut bodies, to exercise Range resumption
        proxy.set(Faults {
            cut_response_body: 150,
            ..faults.clone()
        });
        let s2 = x.path(format!("pull{seed}"));
        let lower2 = pull(&s2, &[&common[..], &[&via]].concat()).printed(&format!("pull with seed {seed}"));
        assert_eq!(chains(&lower2), chains(&x.lower1), "seed {seed}");
        assert_store_consistent(&s2);
        let plog = proxy.log();
        resumed_gets += plog
            .iter()
            .filter(|e| e.range.is_some() && e.status == Some(206))
            .count();
        for e in log.iter().chain(&plog) {
            exchanges += 1;
            if let Some(f) = e.fault {
                *seen.entry(f).or_default() += 1;
            }
        }
    }
    eprintln!(
        "fault rounds: {exchanges} exchanges, faults {seen:?}, {restarts} upload sessions restarted, \
         {resent} chunks sent again in the same session after the registry confirmed the offset, \
         {resumed_gets} blob downloads resumed with Range"
    );
    if all_kinds {
        for kind in [
            "refuse",
            "stall",
            "cut_request_body",
            "drop_response",
            "cut_response_body",
        ] {
            assert!(
                seen.get(kind).copied().unwrap_or(0) > 0,
                "no {kind} fault was injected: {seen:?}"
            );
        }
        assert!(resumed_gets > 0, "no cut download was resumed");
        assert!(resent > 0, "no chunk was resumed in its session");
    }
}

#[test]
fn failures_say_what_failed_and_publish_nothing() {
    let x = Scratch::new("errors");
    let target = format!("{}/test:1", x.reg.addr);
    push(&x.s1, "test", &[&target]).ok("push");

    // unreachable registry: bounded retries, then what failed and what to do
    let s = x.path("unreachable");
    let dead = format!("127.0.0.1:{}/test:1", free_port());
    assert_pull_fails(
        &s,
        &["--retries", "2", &dead],
        &[
            "connection refused",
            "gave up after 3 attempts",
            "check that the registry at 127.0.0.1:",
        ],
    );

    // unknown tag
    let s = x.path("unknown");
    assert_pull_fails(
        &s,
        &[&format!("{}/test:nope", x.reg.addr)],
        &[
            "nope not found in the registry",
            "MANIFEST_UNKNOWN",
            "check the repository name and the tag",
        ],
    );

    // a blob altered on the way is refused, and no layer is made of it
    let proxy = FaultProxy::start(
        x.reg.addr,
        Faults {
            tamper_blobs: true,
            ..Faults::default()
        },
    );
    let s = x.path("tampered");
    assert_pull_fails(
        &s,
        &[&format!("{}/test:1", proxy.addr)],
        &["digest mismatch: expected sha256:", "nothing was published"],
    );
    assert!(proxy.log().iter().any(|e| e.fault == Some("tamper")));
    assert_eq!(
        dir_names(&s.join("blobs/incoming")),
        Vec::<String>::new(),
        "the bad download was kept"
    );

    // a registry that wants a login
    proxy.set(Faults {
        require_auth: true,
        ..Faults::default()
    });
    let s = x.path("auth");
    assert_pull_fails(
        &s,
        &[&format!("{}/test:1", proxy.addr)],
        &[
            "HTTP 401",
            "UNAUTHORIZED",
            "Bearer realm",
            "its token server http://127.0.0.1:9/token: connection refused",
        ],
    );

    // pushing an image the store does not hold
    let out = push(&x.s1, "nosuch", &[&target]);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains("image \"nosuch\": not in the store"),
        "{}",
        out.stderr
    );

    // a damaged blob in the store is caught before its digest is claimed, and the tag is
    // not pushed
    let big = layout_blobs(&x.img)
        .into_iter()
        .max_by_key(|(_, b)| b.len())
        .map(|(d, _)| d)
        .expect("a blob");
    let path = x.s1.join("blobs/sha256").join(big.trim_start_matches("sha256:"));
    let mut bytes = fs::read(&path).expect("store blob");
    bytes[1000] ^= 1;
    fs::write(&path, &bytes).expect("damage the store blob");
    let out = push(&x.s1, "test", &[&format!("{}/damaged:1", x.reg.addr)]);
    assert_ne!(out.code, Some(0));
    assert!(out.stderr.contains("damaged: it hashes to"), "{}", out.stderr);
    assert_eq!(
        http_status(x.reg.addr, "HEAD", "/v2/damaged/manifests/1"),
        Some(404)
    );
}

/// The check above is not vacuous: a client that resent a chunk blindly after a lost reply
/// (same session, same range) is caught.
#[test]
#[should_panic(expected = "was sent bytes 0..100 twice")]
fn the_one_pass_check_catches_a_blind_resend() {
    let patch = |conn| Exchange {
        conn,
        method: "PATCH".into(),
        path: "/v2/t/blobs/uploads/abc".into(),
        content_range: Some("0-99".into()),
        body_len: 100,
        body_forwarded: 100,
        ..Exchange::default()
    };
    assert_one_pass_per_session(&[patch(1), patch(2)]);
}
// Hostile registries: tests/registry/hostile.rs.
#[path = "registry/hostile.rs"]
mod hostile;

// TLS and authentication: tests/registry/tls_auth.rs.
#[path = "registry/tls_auth.rs"]
mod tls_auth;
