//! A real docker-registry (Debian's, distribution 2.8) for the registry and lazy-pull
//! tests: started on a free 127.0.0.1 port, killed by PID on drop.

use std::fs;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::tools::have;

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A docker-registry process storing under `dir/data`; killed by PID on drop.
pub struct Registry {
    pub child: Child,
    pub addr: SocketAddr,
    pub dir: PathBuf,
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

    /// A plain-HTTP registry storing under `dir/data`.
    pub fn start(dir: &Path) -> Registry {
        let data = dir.join("data");
        Registry::start_with(
            dir,
            |port| {
                format!(
                    "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n  \
                     delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\nhealth:\n  storagedriver:\n    enabled: false\n",
                    data.display()
                )
            },
            |reg| http_status(reg.addr, "GET", "/v2/") == Some(200),
        )
    }

    /// docker-registry with the configuration `config(port)` makes (storing under
    /// `dir/data`), waited for (15 s at most) until `ready` says it serves. The free port is
    /// found by binding and closing it, so another process may take it before the registry
    /// binds it: a few ports are tried.
    pub fn start_with(
        dir: &Path,
        config: impl Fn(u16) -> String,
        ready: impl Fn(&Registry) -> bool,
    ) -> Registry {
        assert!(
            have("docker-registry"),
            "docker-registry is not installed (bash tests/setup.sh installs it)"
        );
        fs::create_dir_all(dir.join("data")).expect("mkdir data");
        for attempt in 1..=3 {
            let port = free_port();
            let mut reg = Registry::spawn(dir, port, &config(port));
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                if ready(&reg) {
                    return reg;
                }
                let log = || fs::read_to_string(dir.join("registry.log")).unwrap_or_default();
                if let Ok(Some(st)) = reg.child.try_wait() {
                    let log = log();
                    if attempt < 3 && log.contains("address already in use") {
                        break;
                    }
                    panic!("docker-registry exited ({st}):\n{log}");
                }
                assert!(
                    Instant::now() < deadline,
                    "docker-registry did not answer on {}:\n{}",
                    reg.addr,
                    log()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        unreachable!("the last attempt returns or panics")
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
pub fn http_status(addr: SocketAddr, method: &str, path: &str) -> Option<u16> {
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
