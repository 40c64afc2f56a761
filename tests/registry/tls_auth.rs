//! TLS and authentication (issue 16, "registries as they are"): docker-registry over TLS with
//! a CA the test makes (openssl CLI), trusted through a containers certs.d directory given by
//! VERLAY_CERTS_DIR; htpasswd basic auth with credentials written by `podman login`; token
//! auth with a token server in the test process issuing RS256 JWTs docker-registry checks
//! against the test's certificate. Every refusal is a clear error naming the registry and
//! what to do. Registries and token servers listen on 127.0.0.1 only. Needs openssl, htpasswd
//! (apache2-utils) and podman besides docker-registry (bash tests/setup.sh installs them).

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
    let data = dir.join("data");
    Registry::start_with(
        dir,
        |port| {
            format!(
                "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: 127.0.0.1:{port}\n  tls:\n    certificate: {}\n    key: {}\n\
                 health:\n  storagedriver:\n    enabled: false\n{auth_yaml}",
                data.display(),
                pki.path("server.crt").display(),
                pki.path("server.key").display(),
            )
        },
        |reg| {
            let log = fs::read_to_string(reg.dir.join("registry.log")).unwrap_or_default();
            log.contains("listening on")
                && TcpStream::connect_timeout(&reg.addr, Duration::from_secs(1)).is_ok()
        },
    )
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
                let denied = br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#;
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
