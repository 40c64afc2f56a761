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

use faultproxy::{Exchange, FaultProxy, Faults};
use common::{dir_names, e2e_script, have};
use sha2::{Digest, Sha256};

const BIN: &str = env!("CARGO_BIN_EXE_verlay");
/// How long one verlay command may take before the test kills it and fails.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(180);

fn tempdir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("verlay-registry-{tag}-"))
        .tempdir()
        .expect("tempdir")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A docker-registry process storing under `dir/data`; killed by PID on drop.
struct Registry {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Registry {
    /// docker-registry serving `config` (written to DIR/config.yml) on 127.0.0.1:`port`,
    /// its output in DIR/registry.log; the caller waits until it answers.
    fn spawn(dir: &Path, port: u16, config: &str) -> Registry {
        fs::write(dir.join("config.yml"), config).expect("config");
        let log = fs::File::create(dir.join("registry.log")).expect("log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        Registry {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir: dir.to_path_buf(),
        }
    }

    fn start(dir: &Path) -> Registry {
        assert!(
            have("docker-registry"),
            "docker-registry is not installed (bash tests/setup.sh installs it)"
        );
        fs::create_dir_all(dir.join("data")).expect("mkdir data");
        // The free port is found by binding and closing it, so another process may take it
        // before the registry binds it: try a few ports.
        for attempt in 1..=3 {
            let port = free_port();
            let config = format!(
                "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n  \
                 delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\nhealth:\n  storagedriver:\n    enabled: false\n",
                dir.join("data").display()
            );
            let mut reg = Registry::spawn(dir, port, &config);
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                if http_status(reg.addr, "GET", "/v2/") == Some(200) {
                    return reg;
                }
                if let Ok(Some(st)) = reg.child.try_wait() {
                    let log = fs::read_to_string(dir.join("registry.log")).unwrap_or_default();
                    if attempt < 3 && log.contains("address already in use") {
                        break;
                    }
                    panic!("docker-registry exited ({st}):\n{log}");
                }
                assert!(
                    Instant::now() < deadline,
                    "docker-registry did not answer on {}",
                    reg.addr
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        unreachable!("the last attempt returns or panics")
    }

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

impl Drop for Registry {
    fn drop(&mut self) {
        // by PID: Child::kill signals exactly the process we started
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Status code of a bodyless request, by hand (HTTP/1.0, so the server closes).
fn http_status(addr: SocketAddr, method: &str, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    // distribution hides an OCI manifest from a client that does not accept the type
    let accept =
        "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: {accept}\r\n\r\n"
    )
    .ok()?;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf)
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
}

struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Out {
    fn ok(&self, what: &str) -> &Self {
        assert_eq!(self.code, Some(0), "{what} failed:\n{}", self.stderr);
        self
    }

    /// What a successful command printed (import and pull: the lowerdir), trimmed.
    fn printed(&self, what: &str) -> String {
        self.ok(what).stdout.trim().to_string()
    }
}

fn wait_out(mut child: Child, what: &str) -> Out {
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} took more than {COMMAND_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    Out {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn spawn(args: &[&str], env: &[(&str, &str)]) -> Child {
    Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run verlay")
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

fn verlay(args: &[&str]) -> Out {
    wait_out(spawn(args, &[]), &format!("verlay {}", args.join(" ")))
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

/// The test image (tests/e2e/image.sh) in `dir/img`; returns its env.
fn test_image(dir: &Path) -> BTreeMap<String, String> {
    let img = dir.join("img");
    let out = Command::new("bash")
        .arg(e2e_script("image.sh"))
        .arg(&img)
        .output()
        .expect("image.sh");
    assert!(
        out.status.success(),
        "image.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    fs::read_to_string(img.join("image.env"))
        .expect("image.env")
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches(['"', '\'']).to_string()))
        .collect()
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

// ---------------------------------------------------------------------------------------
// Hostile registries (issue 13, item 4): a tiny loopback HTTP server in the test, so the
// replies can be what no real registry sends.

/// One canned reply: status, extra headers, body.
type Canned = (u16, Vec<(String, String)>, Vec<u8>);

/// A loopback HTTP/1.1 server answering each `GET`/`HEAD` path from a table (404 for the
/// rest), one connection per request, and recording the paths asked for. Its thread ends
/// with the test process.
struct TinyServer {
    addr: SocketAddr,
    asked: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl TinyServer {
    /// Serve the routes `routes(port)` gives (the port is known once bound).
    fn start(routes: impl FnOnce(u16) -> BTreeMap<String, Canned>) -> TinyServer {
        use std::io::{BufRead, BufReader, Write};
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let routes = routes(addr.port());
        let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = asked.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                let mut reader = BufReader::new(conn.try_clone().expect("clone"));
                let mut first = String::new();
                if reader.read_line(&mut first).is_err() {
                    continue;
                }
                // the rest of the head, up to the blank line (at most 100 lines)
                for _ in 0..100 {
                    let mut line = String::new();
                    match reader.read_line(&mut line) {
                        Ok(0) | Err(_) => break,
                        Ok(_) if line == "\r\n" => break,
                        Ok(_) => {}
                    }
                }
                let mut parts = first.split_whitespace();
                let method = parts.next().unwrap_or("").to_string();
                let path = parts.next().unwrap_or("").to_string();
                log.lock().expect("log").push(path.clone());
                let (status, headers, body) =
                    routes
                        .get(&path)
                        .cloned()
                        .unwrap_or((404, vec![], b"{}".to_vec()));
                let mut head = format!(
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n",
                    body.len()
                );
                for (k, v) in headers {
                    head.push_str(&format!("{k}: {v}\r\n"));
                }
                head.push_str("\r\n");
                let _ = conn.write_all(head.as_bytes());
                if method != "HEAD" {
                    let _ = conn.write_all(&body);
                }
            }
        });
        TinyServer { addr, asked }
    }

    fn asked(&self) -> Vec<String> {
        self.asked.lock().expect("log").clone()
    }
}

/// A one-layer image as (manifest, config, layer) bytes, the layer descriptor's size
/// replaced by `layer_size` when given, and the config descriptor's by `config_size`.
fn tiny_image(
    layer_size: Option<serde_json::Value>,
    config_size: Option<serde_json::Value>,
) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_path("hello").expect("path");
    h.set_mode(0o644);
    h.set_size(6);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_cksum();
    b.append(&h, &b"hello\n"[..]).expect("append");
    let layer = b.into_inner().expect("tar");
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", sha256_hex(&layer))]},
    }))
    .expect("json");
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": format!("sha256:{}", sha256_hex(&config)),
                   "size": config_size.unwrap_or(serde_json::json!(config.len()))},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": format!("sha256:{}", sha256_hex(&layer)),
                    "size": layer_size.unwrap_or(serde_json::json!(layer.len()))}],
    }))
    .expect("json");
    (manifest, config, layer)
}

/// Routes serving `image` as `r:latest`; `blob_reply` may replace the reply for a blob
/// (given its digest and bytes), e.g. by a redirect.
fn tiny_routes(
    image: &(Vec<u8>, Vec<u8>, Vec<u8>),
    blob_reply: impl Fn(&str, &[u8]) -> Option<Vec<(String, Canned)>>,
) -> BTreeMap<String, Canned> {
    let (manifest, config, layer) = image;
    let mut routes = BTreeMap::new();
    routes.insert(
        "/v2/r/manifests/latest".to_string(),
        (
            200,
            vec![(
                "Content-Type".into(),
                "application/vnd.oci.image.manifest.v1+json".into(),
            )],
            manifest.clone(),
        ),
    );
    for blob in [config, layer] {
        let digest = format!("sha256:{}", sha256_hex(blob));
        let path = format!("/v2/r/blobs/{digest}");
        match blob_reply(&digest, blob) {
            Some(extra) => routes.extend(extra),
            None => {
                routes.insert(path, (200, vec![], blob.clone()));
            }
        }
    }
    routes
}

fn redirect(to: &str) -> Canned {
    (307, vec![("Location".into(), to.into())], vec![])
}

/// Nothing of the image in the store: no layer, no image record, no published blob.
fn assert_nothing_pulled(store: &Path) {
    for sub in ["layers", "images", "blobs/sha256"] {
        assert_eq!(
            dir_names(&store.join(sub)),
            Vec::<String>::new(),
            "{sub}/ must stay empty"
        );
    }
}

/// A pull from `server` into a new store `tag` under `dir`.
fn tiny_pull(dir: &Path, tag: &str, server: &TinyServer) -> (PathBuf, Out, Duration) {
    let store = dir.join(format!("store-{tag}"));
    let reference = format!("{}/r:latest", server.addr);
    let start = Instant::now();
    let out = pull(&store, &["--retries", "0", "--timeout", "30", &reference]);
    (store, out, start.elapsed())
}

#[test]
fn redirects_are_followed_only_to_hosts_the_first_request_may_reach() {
    let t = tempdir("redirect");
    let image = tiny_image(None, None);

    // Loopback redirects (a path on the same server for the config, an absolute URL to
    // localhost for the layer) are followed, by hand now that ureq's own following is off.
    let server = TinyServer::start(|port| {
        tiny_routes(&image, |digest, blob| {
            let storage = format!("/storage/{digest}");
            let to = if blob.len() >= 1024 {
                format!("http://localhost:{port}{storage}") // the layer: a tar is >= 1 KiB
            } else {
                storage.clone()
            };
            Some(vec![
                (format!("/v2/r/blobs/{digest}"), redirect(&to)),
                (storage, (200, vec![], blob.to_vec())),
            ])
        })
    });
    let (store, out, _) = tiny_pull(t.path(), "loopback", &server);
    out.ok("pull through loopback redirects");
    assert_eq!(dir_names(&store.join("layers")).len(), 1, "one layer pulled");
    let storage_hits = server
        .asked()
        .iter()
        .filter(|p| p.starts_with("/storage/"))
        .count();
    assert_eq!(
        storage_hits,
        2,
        "both blobs fetched from where they were redirected: {:?}",
        server.asked()
    );

    // A redirect off this machine without --plain-http is refused before any connection
    // (10.255.255.1 is never reached: a connect there would wait out --timeout 30). Old
    // code: ureq followed it.
    for to in ["http://10.255.255.1/blob", "http://example.invalid:5000/blob"] {
        let server = TinyServer::start(|_| {
            tiny_routes(&image, |digest, _| {
                Some(vec![(format!("/v2/r/blobs/{digest}"), redirect(to))])
            })
        });
        let (store, out, took) = tiny_pull(t.path(), "offhost", &server);
        assert_eq!(out.code, Some(2), "{to}: {}", out.stderr);
        assert!(
            out.stderr
                .contains(&format!("sends us to {to}, which is not on this machine"))
                && out.stderr.contains("--plain-http"),
            "{to}: {}",
            out.stderr
        );
        assert!(took < Duration::from_secs(10), "{to}: took {took:?}");
        assert_nothing_pulled(&store);
        let _ = fs::remove_dir_all(&store);
    }

    // A redirect loop ends after a bounded number of hops.
    let server = TinyServer::start(|_| {
        tiny_routes(&image, |digest, _| {
            let here = format!("/v2/r/blobs/{digest}");
            Some(vec![(here.clone(), redirect(&here))])
        })
    });
    let (store, out, took) = tiny_pull(t.path(), "loop", &server);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("more than 5 redirects"), "{}", out.stderr);
    assert!(took < Duration::from_secs(10), "loop took {took:?}");
    assert_eq!(
        server.asked().len(),
        1 + 6,
        "manifest, then 6 hops: {:?}",
        server.asked()
    );
    assert_nothing_pulled(&store);
}

#[test]
fn absurd_descriptor_sizes_are_refused_when_the_manifest_is_parsed() {
    let t = tempdir("sizes");
    // Old code: 2^62 was kept (and pushed later), -1 read as "no size"; a config of 100 MiB
    // would have been fetched and read whole into memory.
    let cases: &[(&str, Option<serde_json::Value>, Option<serde_json::Value>, &str)] = &[
        (
            "layer-2^62",
            Some(serde_json::json!(4611686018427387904u64)),
            None,
            "size 4611686018427387904 is not a byte count from 0 to 1099511627776",
        ),
        (
            "layer-minus-1",
            Some(serde_json::json!(-1)),
            None,
            "size -1 is not a byte count",
        ),
        (
            "config-minus-1",
            None,
            Some(serde_json::json!(-1)),
            "size -1 is not a byte count",
        ),
        (
            "config-100m",
            None,
            Some(serde_json::json!(100u64 << 20)),
            "the config is 104857600 bytes, larger than the 8388608 bytes",
        ),
    ];
    for (case, layer_size, config_size, why) in cases {
        let image = tiny_image(layer_size.clone(), config_size.clone());
        let server = TinyServer::start(|_| tiny_routes(&image, |_, _| None));
        let (store, out, _) = tiny_pull(t.path(), case, &server);
        assert_eq!(out.code, Some(1), "{case}: {}", out.stderr);
        assert!(
            out.stderr.contains(why),
            "{case}: expected {why:?} in: {}",
            out.stderr
        );
        assert!(
            !server.asked().iter().any(|p| p.contains("/blobs/")),
            "{case}: a blob was fetched: {:?}",
            server.asked()
        );
        assert_nothing_pulled(&store);
    }
}

// ============================================================================================
// TLS and authentication (issue 16, "registries as they are"): docker-registry over TLS with
// a CA the test makes (openssl CLI), trusted through a containers certs.d directory given by
// VERLAY_CERTS_DIR; htpasswd basic auth with credentials written by `podman login`; token
// auth with a token server in the test process issuing RS256 JWTs docker-registry checks
// against the test's certificate. Every refusal is a clear error naming the registry and
// what to do. Registries and token servers listen on 127.0.0.1 only. Needs openssl, htpasswd
// (apache2-utils) and podman besides docker-registry (bash tests/setup.sh installs them).
// ============================================================================================
mod tls_auth {
    use super::*;
    use base64::Engine;
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    const USER: &str = "alice";
    const PASSWORD: &str = "s3cret-Pw";
    const SERVICE: &str = "verlay-test-registry";
    const ISSUER: &str = "verlay-test-token-issuer";

    fn openssl(dir: &Path, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A CA `NAME.crt`/`NAME.key` in `dir`.
    fn make_ca(dir: &Path, name: &str) {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.crt"),
                "-subj",
                &format!("/CN={name}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
    }

    /// The certificates of one test: the registry's CA and server certificate (for
    /// 127.0.0.1), another CA nobody uses, and the token server's self-signed signing
    /// certificate.
    struct Pki {
        dir: PathBuf,
    }

    impl Pki {
        fn new(dir: &Path) -> Pki {
            fs::create_dir_all(dir).expect("mkdir pki");
            make_ca(dir, "ca");
            make_ca(dir, "other-ca");
            make_ca(dir, "token");
            openssl(
                dir,
                &[
                    "req",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-keyout",
                    "server.key",
                    "-out",
                    "server.csr",
                    "-subj",
                    "/CN=127.0.0.1",
                ],
            );
            fs::write(
                dir.join("server.ext"),
                "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
                 keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
            )
            .expect("ext");
            openssl(
                dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    "server.csr",
                    "-CA",
                    "ca.crt",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-days",
                    "2",
                    "-out",
                    "server.crt",
                    "-extfile",
                    "server.ext",
                ],
            );
            openssl(
                dir,
                &["x509", "-in", "token.crt", "-outform", "DER", "-out", "token.der"],
            );
            Pki {
                dir: dir.to_path_buf(),
            }
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.join(name)
        }

        /// A certs.d directory trusting CA file `ca` (e.g. "ca.crt") for `host`.
        fn certs_d(&self, name: &str, host: &str, ca: &str) -> PathBuf {
            let d = self.dir.join(name);
            fs::create_dir_all(d.join(host)).expect("mkdir certs.d");
            fs::copy(self.path(ca), d.join(host).join("ca.crt")).expect("copy ca");
            d
        }
    }

    /// docker-registry over TLS with `auth_yaml` (the `auth:` section, or empty), on a free
    /// 127.0.0.1 port.
    fn start_tls_registry(dir: &Path, pki: &Pki, auth_yaml: &str) -> Registry {
        assert!(
            have("docker-registry"),
            "docker-registry is not installed (bash tests/setup.sh installs it)"
        );
        fs::create_dir_all(dir.join("data")).expect("mkdir data");
        for attempt in 1..=3 {
            let port = free_port();
            let config = format!(
                "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: 127.0.0.1:{port}\n  tls:\n    certificate: {}\n    key: {}\n\
                 health:\n  storagedriver:\n    enabled: false\n{auth_yaml}",
                dir.join("data").display(),
                pki.path("server.crt").display(),
                pki.path("server.key").display(),
            );
            let mut reg = Registry::spawn(dir, port, &config);
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                let log = fs::read_to_string(dir.join("registry.log")).unwrap_or_default();
                if log.contains("listening on")
                    && TcpStream::connect_timeout(&reg.addr, Duration::from_secs(1)).is_ok()
                {
                    return reg;
                }
                if let Ok(Some(st)) = reg.child.try_wait() {
                    if attempt < 3 && log.contains("address already in use") {
                        break;
                    }
                    panic!("docker-registry exited ({st}):\n{log}");
                }
                assert!(
                    Instant::now() < deadline,
                    "docker-registry did not listen on {}:\n{log}",
                    reg.addr
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    fn b64url(b: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    }

    fn now_secs() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs() as i64
    }

    /// One token the server issued.
    #[derive(Debug, Clone)]
    struct Issued {
        user: Option<String>,
        scope: String,
        expired: bool,
    }

    /// A token server on 127.0.0.1 (plain HTTP, one request per connection): it requires
    /// USER:PASSWORD as basic credentials, and signs RS256 JWTs with the test's token key
    /// (certificate in the `x5c` header). The first `expired_first` tokens are long expired.
    struct TokenServer {
        addr: SocketAddr,
        issued: Arc<Mutex<Vec<Issued>>>,
        stop: Arc<AtomicBool>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl TokenServer {
        fn start(pki: &Pki, expired_first: usize) -> TokenServer {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind token server");
            listener.set_nonblocking(true).expect("nonblocking");
            let addr = listener.local_addr().expect("addr");
            let issued = Arc::new(Mutex::new(Vec::new()));
            let stop = Arc::new(AtomicBool::new(false));
            let key = pki.path("token.key");
            let x5c = base64::engine::general_purpose::STANDARD
                .encode(fs::read(pki.path("token.der")).expect("token.der"));
            let count = Arc::new(AtomicUsize::new(0));
            let (issued2, stop2) = (issued.clone(), stop.clone());
            let thread = std::thread::spawn(move || {
                while !stop2.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            let _ = s.set_nonblocking(false);
                            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                            serve_token(s, &key, &x5c, &issued2, &count, expired_first);
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            });
            TokenServer {
                addr,
                issued,
                stop,
                thread: Some(thread),
            }
        }

        fn issued(&self) -> Vec<Issued> {
            self.issued.lock().expect("lock").clone()
        }

        /// docker-registry's `auth:` section for this server.
        fn auth_yaml(&self, pki: &Pki) -> String {
            format!(
                "auth:\n  token:\n    realm: http://{}/token\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
                self.addr,
                pki.path("token.crt").display()
            )
        }
    }

    impl Drop for TokenServer {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    fn percent_decode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' && i + 2 < b.len() {
                if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                    out.push(v);
                    i += 3;
                    continue;
                }
            }
            out.push(if b[i] == b'+' { b' ' } else { b[i] });
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Read one request head (at most 16 KiB): the request line and the headers.
    fn read_head(s: &mut TcpStream) -> Option<(String, Vec<(String, String)>)> {
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            if buf.len() > 16 << 10 || s.read(&mut byte).ok()? == 0 {
                return None;
            }
            buf.push(byte[0]);
        }
        let text = String::from_utf8_lossy(&buf).into_owned();
        let mut lines = text.split("\r\n");
        let first = lines.next()?.to_string();
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        Some((first, headers))
    }

    fn respond(s: &mut TcpStream, status: &str, extra: &str, content_type: &str, body: &[u8]) {
        let _ = write!(
            s,
            "HTTP/1.1 {status}\r\n{extra}Content-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let _ = s.write_all(body);
    }

    fn basic_user(headers: &[(String, String)]) -> Option<String> {
        let v = headers.iter().find(|(k, _)| k == "authorization")?.1.clone();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(v.strip_prefix("Basic ")?)
            .ok()?;
        let text = String::from_utf8(raw).ok()?;
        let (u, p) = text.split_once(':')?;
        (u == USER && p == PASSWORD).then(|| u.to_string())
    }

    fn serve_token(
        mut s: TcpStream,
        key: &Path,
        x5c: &str,
        issued: &Mutex<Vec<Issued>>,
        count: &AtomicUsize,
        expired_first: usize,
    ) {
        let Some((line, headers)) = read_head(&mut s) else {
            return;
        };
        let target = line.split(' ').nth(1).unwrap_or("");
        let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
        let param = |k: &str| {
            query
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .find(|(n, _)| *n == k)
                .map(|(_, v)| percent_decode(v))
        };
        let denied = br#"{"errors":[{"code":"UNAUTHORIZED","message":"bad or missing credentials"}]}"#;
        let user = basic_user(&headers);
        if user.is_none() || param("service").as_deref() != Some(SERVICE) {
            respond(
                &mut s,
                "401 Unauthorized",
                "WWW-Authenticate: Basic realm=\"token\"\r\n",
                "application/json",
                denied,
            );
            return;
        }
        let scope = param("scope").unwrap_or_default();
        // repository:NAME:ACTIONS
        let access: Vec<serde_json::Value> = scope
            .split(' ')
            .filter_map(|sc| {
                let mut it = sc.splitn(3, ':');
                let (t, name, actions) = (it.next()?, it.next()?, it.next()?);
                Some(serde_json::json!({"type": t, "name": name, "actions": actions.split(',').collect::<Vec<_>>()}))
            })
            .collect();
        let n = count.fetch_add(1, Ordering::SeqCst);
        let expired = n < expired_first;
        let now = now_secs();
        let (nbf, exp) = if expired {
            (now - 7200, now - 3600)
        } else {
            (now - 10, now + 300)
        };
        let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [x5c]});
        let claims = serde_json::json!({
            "iss": ISSUER, "sub": user, "aud": SERVICE, "exp": exp, "nbf": nbf, "iat": nbf,
            "jti": format!("verlay-test-{n}"), "access": access,
        });
        let signing_input = format!(
            "{}.{}",
            b64url(header.to_string().as_bytes()),
            b64url(claims.to_string().as_bytes())
        );
        let mut child = Command::new("openssl")
            .args(["dgst", "-sha256", "-sign"])
            .arg(key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl dgst");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(signing_input.as_bytes())
            .expect("sign input");
        let sig = child.wait_with_output().expect("openssl dgst output").stdout;
        let jwt = format!("{signing_input}.{}", b64url(&sig));
        issued.lock().expect("lock").push(Issued { user, scope, expired });
        let body = serde_json::json!({"token": jwt, "expires_in": 300}).to_string();
        respond(&mut s, "200 OK", "", "application/json", body.as_bytes());
    }

    /// An isolated environment for verlay: its own HOME and XDG_RUNTIME_DIR (so the machine's
    /// auth files and certs.d are not read), `certs` as VERLAY_CERTS_DIR, `authfile` as
    /// REGISTRY_AUTH_FILE.
    struct Env {
        vars: Vec<(String, String)>,
    }

    impl Env {
        fn new(home: &Path, certs: Option<&Path>, authfile: Option<&Path>) -> Env {
            fs::create_dir_all(home.join("run")).expect("mkdir home");
            let mut vars = vec![
                ("HOME".to_string(), p(home).to_string()),
                ("XDG_RUNTIME_DIR".into(), p(&home.join("run")).to_string()),
                ("DOCKER_CONFIG".into(), p(&home.join("docker")).to_string()),
                // an empty certs.d unless one is given: never the machine's
                ("VERLAY_CERTS_DIR".into(), p(&home.join("certs.d")).to_string()),
            ];
            if let Some(c) = certs {
                vars[3].1 = p(c).to_string();
            }
            if let Some(a) = authfile {
                vars.push(("REGISTRY_AUTH_FILE".into(), p(a).to_string()));
            }
            Env { vars }
        }

        fn run(&self, args: &[&str]) -> Out {
            let env: Vec<(&str, &str)> = self.vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            wait_out(spawn(args, &env), &format!("verlay {}", args.join(" ")))
        }

        fn pull(&self, store: &Path, args: &[&str]) -> Out {
            self.run(&[&["image", "pull", "--store", p(store), "--retries", "1"], args].concat())
        }

        fn push(&self, store: &Path, args: &[&str]) -> Out {
            self.run(
                &[
                    &[
                        "image",
                        "push",
                        "--store",
                        p(store),
                        "--image",
                        "test",
                        "--retries",
                        "1",
                    ],
                    args,
                ]
                .concat(),
            )
        }
    }

    /// The command failed with exit code 1 and said each of `wants`.
    fn assert_fails(out: &Out, wants: &[&str]) {
        assert_eq!(out.code, Some(1), "expected a failure:\n{}", out.stderr);
        eprintln!("{}", out.stderr.trim());
        for w in wants {
            assert!(out.stderr.contains(w), "missing {w:?} in:\n{}", out.stderr);
        }
    }

    /// The test image imported as "test" into `dir/s1`; returns (image env, lowerdir).
    fn source_store(dir: &Path) -> (BTreeMap<String, String>, String) {
        let env = test_image(dir);
        let lower = import(&dir.join("s1"), &dir.join("img"), "test");
        (env, lower)
    }

    #[test]
    fn tls_registry_trusted_through_certs_d_pushes_and_pulls_and_a_wrong_ca_is_named() {
        for t in ["openssl", "docker-registry"] {
            assert!(have(t), "{t} is not installed (bash tests/setup.sh)");
        }
        let t = tempdir("tls");
        let (img_env, lower1) = source_store(t.path());
        let pki = Pki::new(&t.path().join("pki"));
        let reg = start_tls_registry(&t.path().join("reg"), &pki, "");
        let host = reg.addr.to_string();
        let good = pki.certs_d("certs-good", &host, "ca.crt");
        let env = Env::new(&t.path().join("home"), Some(&good), None);
        let target = format!("{host}/test:1");

        // a loopback registry with a CA in certs.d is spoken to over HTTPS
        let out = env.push(&t.path().join("s1"), &[&target]);
        out.ok("push over TLS");
        assert!(out.stdout.contains(&img_env["MANIFEST_DIGEST"]), "{}", out.stdout);
        assert_registry_has(&reg, &layout_blobs(&t.path().join("img")));
        let lower2 = env
            .pull(&t.path().join("s2"), &[&target])
            .printed("pull over TLS");
        assert_eq!(chains(&lower2), chains(&lower1));

        // a certs.d CA that did not sign the registry's certificate
        let wrong = pki.certs_d("certs-wrong", &host, "other-ca.crt");
        let env_wrong = Env::new(&t.path().join("home"), Some(&wrong), None);
        let s = t.path().join("s-wrong");
        assert_fails(
            &env_wrong.pull(&s, &[&target]),
            &[
                &format!("registry {host}"),
                "certificate not trusted",
                &format!("/etc/containers/certs.d/{host}/ca.crt"),
                "--tls-verify=false",
            ],
        );
        assert_eq!(dir_names(&s.join("images")), Vec::<String>::new());

        // no CA at all, HTTPS asked for with --tls-verify: the system roots do not know it
        let env_none = Env::new(&t.path().join("home"), None, None);
        assert_fails(
            &env_none.pull(&t.path().join("s-none"), &["--tls-verify", &target]),
            &["certificate not trusted", "--tls-verify=false"],
        );
        // without --tls-verify a loopback registry with no CA is plain HTTP, and says so
        assert_fails(
            &env_none.pull(&t.path().join("s-plain"), &[&target]),
            &[&format!("registry {host}"), "it speaks HTTPS", "--tls-verify"],
        );

        // --tls-verify=false talks HTTPS without checking the certificate
        let lower3 = env_none
            .pull(&t.path().join("s3"), &["--tls-verify=false", &target])
            .printed("pull with --tls-verify=false");
        assert_eq!(chains(&lower3), chains(&lower1));
    }

    #[test]
    fn basic_auth_over_tls_uses_the_auth_json_podman_login_wrote() {
        for t in ["openssl", "docker-registry", "htpasswd", "podman"] {
            assert!(have(t), "{t} is not installed (bash tests/setup.sh)");
        }
        let t = tempdir("basic");
        let (_, lower1) = source_store(t.path());
        let pki = Pki::new(&t.path().join("pki"));
        let htpasswd = t.path().join("htpasswd");
        let st = Command::new("htpasswd")
            .args(["-B", "-b", "-c"])
            .arg(&htpasswd)
            .args([USER, PASSWORD])
            .output()
            .expect("htpasswd");
        assert!(
            st.status.success(),
            "htpasswd: {}",
            String::from_utf8_lossy(&st.stderr)
        );
        let auth_yaml = format!(
            "auth:\n  htpasswd:\n    realm: verlay-test\n    path: {}\n",
            htpasswd.display()
        );
        let reg = start_tls_registry(&t.path().join("reg"), &pki, &auth_yaml);
        let host = reg.addr.to_string();
        let certs = pki.certs_d("certs", &host, "ca.crt");
        let target = format!("{host}/test:1");

        // podman login writes the auth.json verlay reads
        let authfile = t.path().join("auth.json");
        let out = Command::new("podman")
            .args(["login", "--cert-dir"])
            .arg(certs.join(&host))
            .arg("--authfile")
            .arg(&authfile)
            .args(["-u", USER, "-p", PASSWORD, &host])
            .env("HOME", t.path().join("home"))
            .stdin(Stdio::null())
            .output()
            .expect("podman login");
        assert!(
            out.status.success(),
            "podman login: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let written = fs::read_to_string(&authfile).expect("auth.json");
        assert!(
            written.contains(&host),
            "podman login wrote no entry for {host}: {written}"
        );

        // no credentials: the error says to log in
        let anon = Env::new(&t.path().join("home"), Some(&certs), None);
        assert_fails(
            &anon.push(&t.path().join("s1"), &[&target]),
            &[
                &format!("registry {host}"),
                "wants a user name and password",
                &format!("podman login {host}"),
            ],
        );

        let env = Env::new(&t.path().join("home"), Some(&certs), Some(&authfile));
        env.push(&t.path().join("s1"), &[&target])
            .ok("push with podman login's credentials");
        let lower2 = env
            .pull(&t.path().join("s2"), &[&target])
            .printed("pull with credentials");
        assert_eq!(chains(&lower2), chains(&lower1));
        // --authfile says the same as REGISTRY_AUTH_FILE
        anon.pull(&t.path().join("s2b"), &["--authfile", p(&authfile), &target])
            .ok("pull with --authfile");

        // credHelpers: `docker-credential-NAME get` with the server on stdin
        let bin = t.path().join("bin");
        fs::create_dir_all(&bin).expect("mkdir bin");
        let helper = bin.join("docker-credential-verlaytest");
        let asked = t.path().join("helper-asked");
        fs::write(
            &helper,
            format!(
                "#!/bin/sh\n[ \"$1\" = get ] || exit 3\ncat > {}\n\
                 printf '{{\"ServerURL\":\"%s\",\"Username\":\"{USER}\",\"Secret\":\"{PASSWORD}\"}}' \"$(cat {})\"\n",
                asked.display(),
                asked.display()
            ),
        )
        .expect("helper");
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&helper, fs::Permissions::from_mode(0o755)).expect("chmod helper");
        }
        let helper_auth = t.path().join("helper-auth.json");
        fs::write(
            &helper_auth,
            format!(r#"{{"auths":{{}},"credHelpers":{{"{host}":"verlaytest"}}}}"#),
        )
        .expect("helper auth.json");
        let mut env_helper = Env::new(&t.path().join("home"), Some(&certs), Some(&helper_auth));
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
        env_helper.vars.push(("PATH".into(), path));
        let lower3 = env_helper
            .pull(&t.path().join("s3"), &[&target])
            .printed("pull with a credential helper");
        assert_eq!(chains(&lower3), chains(&lower1));
        assert_eq!(fs::read_to_string(&asked).expect("the helper was asked"), host);

        // a wrong password in the auth file
        let bad = t.path().join("bad-auth.json");
        let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:wrong"));
        fs::write(&bad, format!(r#"{{"auths":{{"{host}":{{"auth":"{b64}"}}}}}}"#)).expect("bad auth.json");
        let env_bad = Env::new(&t.path().join("home"), Some(&certs), Some(&bad));
        let s = t.path().join("s-bad");
        assert_fails(
            &env_bad.pull(&s, &[&target]),
            &[
                &format!("registry {host}"),
                "HTTP 401",
                "wrong user name or password",
                &format!("podman login {host}"),
            ],
        );
        assert_eq!(dir_names(&s.join("images")), Vec::<String>::new());
    }

    #[test]
    fn token_auth_refuses_anonymous_then_works_with_credentials_and_refreshes_an_expired_token() {
        for t in ["openssl", "docker-registry"] {
            assert!(have(t), "{t} is not installed (bash tests/setup.sh)");
        }
        let t = tempdir("token");
        let (_, lower1) = source_store(t.path());
        let pki = Pki::new(&t.path().join("pki"));
        // the first token it issues is long expired: the registry refuses it, verlay fetches
        // another one and goes on
        let tokens = TokenServer::start(&pki, 1);
        let reg = start_tls_registry(&t.path().join("reg"), &pki, &tokens.auth_yaml(&pki));
        let host = reg.addr.to_string();
        let certs = pki.certs_d("certs", &host, "ca.crt");
        let target = format!("{host}/test:1");

        let anon = Env::new(&t.path().join("home"), Some(&certs), None);
        assert_fails(
            &anon.pull(&t.path().join("s-anon"), &[&target]),
            &[
                &format!("registry {host}"),
                &format!(
                    "token server http://{}/token refused anonymous access",
                    tokens.addr
                ),
                &format!("podman login {host}"),
            ],
        );
        assert!(
            tokens.issued().is_empty(),
            "a token was issued without credentials"
        );

        let authfile = t.path().join("auth.json");
        let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
        fs::write(
            &authfile,
            format!(r#"{{"auths":{{"{host}":{{"auth":"{b64}"}}}}}}"#),
        )
        .expect("auth.json");
        let env = Env::new(&t.path().join("home"), Some(&certs), Some(&authfile));
        env.push(&t.path().join("s1"), &[&target]).ok("push with a token");
        let issued = tokens.issued();
        assert!(issued.len() >= 2, "{issued:?}");
        assert!(issued[0].expired && !issued[1].expired, "{issued:?}");
        assert!(
            issued.iter().all(|i| i.user.as_deref() == Some(USER)),
            "{issued:?}"
        );
        assert!(
            // distribution writes the actions in either order
            issued.iter().any(|i| {
                let actions = i.scope.strip_prefix("repository:test:").unwrap_or("");
                let mut a: Vec<&str> = actions.split(',').collect();
                a.sort_unstable();
                a == ["pull", "push"]
            }),
            "push asked for no push scope: {issued:?}"
        );
        let lower2 = env
            .pull(&t.path().join("s2"), &[&target])
            .printed("pull with a token");
        assert_eq!(chains(&lower2), chains(&lower1));

        // a wrong password: the token server refuses it
        let bad = t.path().join("bad-auth.json");
        let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:wrong"));
        fs::write(&bad, format!(r#"{{"auths":{{"{host}":{{"auth":"{b64}"}}}}}}"#)).expect("bad auth.json");
        let env_bad = Env::new(&t.path().join("home"), Some(&certs), Some(&bad));
        assert_fails(
            &env_bad.pull(&t.path().join("s-bad"), &[&target]),
            &[
                &format!("refused user {USER}"),
                "wrong user name or password",
                &format!("podman login {host}"),
            ],
        );
        drop(reg);
        drop(tokens);

        // a token server that only ever issues expired tokens: one refresh, then a clear error
        let tokens = TokenServer::start(&pki, usize::MAX);
        let reg = start_tls_registry(&t.path().join("reg2"), &pki, &tokens.auth_yaml(&pki));
        let host = reg.addr.to_string();
        let certs = pki.certs_d("certs2", &host, "ca.crt");
        fs::write(
            &authfile,
            format!(
                r#"{{"auths":{{"{host}":{{"auth":"{}"}}}}}}"#,
                base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"))
            ),
        )
        .expect("auth.json");
        let env = Env::new(&t.path().join("home"), Some(&certs), Some(&authfile));
        assert_fails(
            &env.pull(&t.path().join("s-expired"), &[&format!("{host}/test:1")]),
            &[
                &format!("registry {host}"),
                "with a fresh token",
                "expired",
                "check the clocks",
            ],
        );
        assert_eq!(
            tokens.issued().len(),
            2,
            "expected exactly one refresh: {:?}",
            tokens.issued()
        );
    }

    /// A registry whose manifests need basic credentials and whose blobs refuse them: the
    /// situation of a blob 401 after a good manifest (no real registry does this on demand,
    /// so a minimal one serves the test image's manifest and refuses everything else).
    struct BlobRefuser {
        addr: SocketAddr,
        requests: Arc<Mutex<Vec<(String, bool)>>>,
        stop: Arc<AtomicBool>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl BlobRefuser {
        fn start(manifest: Vec<u8>, media_type: String, digest: String) -> BlobRefuser {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.set_nonblocking(true).expect("nonblocking");
            let addr = listener.local_addr().expect("addr");
            let requests = Arc::new(Mutex::new(Vec::new()));
            let stop = Arc::new(AtomicBool::new(false));
            let (req2, stop2) = (requests.clone(), stop.clone());
            let thread = std::thread::spawn(move || {
                while !stop2.load(Ordering::Relaxed) {
                    let Ok((mut s, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                    let Some((line, headers)) = read_head(&mut s) else {
                        continue;
                    };
                    let path = line.split(' ').nth(1).unwrap_or("").to_string();
                    let authorized = basic_user(&headers).is_some();
                    req2.lock().expect("lock").push((path.clone(), authorized));
                    let challenge = "WWW-Authenticate: Basic realm=\"verlay-test\"\r\n";
                    let denied =
                        br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#;
                    if path.contains("/manifests/") && authorized {
                        let extra = format!("Docker-Content-Digest: {digest}\r\n");
                        respond(&mut s, "200 OK", &extra, &media_type, &manifest);
                    } else {
                        respond(&mut s, "401 Unauthorized", challenge, "application/json", denied);
                    }
                }
            });
            BlobRefuser {
                addr,
                requests,
                stop,
                thread: Some(thread),
            }
        }
    }

    impl Drop for BlobRefuser {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    #[test]
    fn a_401_on_a_blob_after_a_good_manifest_says_so() {
        let t = tempdir("blob401");
        let env_img = test_image(t.path());
        let index: serde_json::Value =
            serde_json::from_slice(&fs::read(t.path().join("img/oci/index.json")).expect("index.json"))
                .expect("json");
        let m = &index["manifests"][0];
        let digest = m["digest"].as_str().expect("digest").to_string();
        assert_eq!(digest, env_img["MANIFEST_DIGEST"]);
        let media_type = m["mediaType"].as_str().expect("mediaType").to_string();
        let manifest = fs::read(
            t.path()
                .join("img/oci/blobs/sha256")
                .join(digest.trim_start_matches("sha256:")),
        )
        .expect("manifest blob");
        let reg = BlobRefuser::start(manifest, media_type, digest);
        let host = reg.addr.to_string();
        let env = Env::new(&t.path().join("home"), None, None);
        let s = t.path().join("s");
        assert_fails(
            &env.pull(
                &s,
                &[
                    "--creds",
                    &format!("{USER}:{PASSWORD}"),
                    &format!("{host}/test:1"),
                ],
            ),
            &[
                &format!("registry {host}"),
                "blobs/sha256:",
                "refused (HTTP 401",
                "although earlier requests with the same login were allowed",
                "check the account's access to test",
            ],
        );
        let reqs = reg.requests.lock().expect("lock").clone();
        assert!(
            reqs.iter().any(|(p, a)| p.contains("/manifests/") && *a),
            "{reqs:?}"
        );
        assert!(reqs.iter().any(|(p, a)| p.contains("/blobs/") && *a), "{reqs:?}");
        assert_eq!(dir_names(&s.join("images")), Vec::<String>::new());
        assert_eq!(dir_names(&s.join("layers")), Vec::<String>::new());
    }
}
