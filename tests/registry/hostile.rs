//! Hostile registries (issue 13, item 4): a tiny loopback HTTP server in the test, so the
//! replies can be what no real registry sends.

use super::*;

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
