//! Shared by the snapshotter's integration tests: a `verlay-snapshotter` process and a gRPC
//! client for it, and the calls the tests make.
// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use containerd_snapshots::api::snapshots::v1::snapshots_client::SnapshotsClient;
use containerd_snapshots::api::snapshots::v1::*;
use containerd_snapshots::api::types::Mount;
use containerd_snapshots::tonic::transport::{Channel, Endpoint, Uri};
use containerd_snapshots::tonic::{Code, Status};
use tokio::net::UnixStream;

/// A snapshotter process over a root; killed by PID and reaped on drop.
pub struct Snapshotter {
    pub child: Child,
    pub root: PathBuf,
    pub sock: PathBuf,
}

impl Snapshotter {
    pub fn start(dir: &Path, crash_at: Option<&str>) -> Snapshotter {
        let root = dir.join("root");
        let sock = dir.join("snap.sock");
        let _ = std::fs::remove_file(&sock);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_verlay-snapshotter"));
        cmd.arg("--root")
            .arg(&root)
            .arg("--address")
            .arg(&sock)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .env("RUST_LOG", "verlay_snapshotter=warn")
            .env_remove("VERLAY_SNAPSHOTTER_CRASH_AT");
        if let Some(step) = crash_at {
            cmd.env("VERLAY_SNAPSHOTTER_CRASH_AT", step);
        }
        let child = cmd.spawn().expect("spawn verlay-snapshotter");
        // Wait for a connection to succeed, not for the file: bind(2) creates the file a
        // moment before listen(2), and a connect in between is refused.
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(
                Instant::now() < deadline,
                "socket {} did not accept a connection",
                sock.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Snapshotter { child, root, sock }
    }

    pub async fn client(&self) -> SnapshotsClient<Channel> {
        let sock = self.sock.clone();
        let channel = Endpoint::try_from("http://[::]:50051")
            .expect("static uri")
            .connect_with_connector(tower::service_fn(move |_: Uri| UnixStream::connect(sock.clone())))
            .await
            .expect("connect to the snapshotter");
        SnapshotsClient::new(channel)
    }

    /// Wait for the process to die by itself (a crash point); panics after 10 s.
    pub fn wait_dead(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().expect("try_wait").is_none() {
            assert!(
                Instant::now() < deadline,
                "snapshotter did not stop at its crash point"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn snapshot_dirs(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.root.join("snapshots"))
            .expect("readdir snapshots")
            .map(|e| e.expect("dirent").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

impl Drop for Snapshotter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub async fn prepare(
    c: &mut SnapshotsClient<Channel>,
    key: &str,
    parent: &str,
) -> Result<Vec<Mount>, Status> {
    prepare_labels(c, key, parent, HashMap::new()).await
}

pub async fn prepare_labels(
    c: &mut SnapshotsClient<Channel>,
    key: &str,
    parent: &str,
    labels: HashMap<String, String>,
) -> Result<Vec<Mount>, Status> {
    let r = c
        .prepare(PrepareSnapshotRequest {
            snapshotter: "verlay".into(),
            key: key.into(),
            parent: parent.into(),
            labels,
        })
        .await?;
    Ok(r.into_inner().mounts)
}

pub async fn view(c: &mut SnapshotsClient<Channel>, key: &str, parent: &str) -> Result<Vec<Mount>, Status> {
    let r = c
        .view(ViewSnapshotRequest {
            snapshotter: "verlay".into(),
            key: key.into(),
            parent: parent.into(),
            labels: HashMap::new(),
        })
        .await?;
    Ok(r.into_inner().mounts)
}

pub async fn commit(
    c: &mut SnapshotsClient<Channel>,
    name: &str,
    key: &str,
    labels: HashMap<String, String>,
) -> Result<(), Status> {
    c.commit(CommitSnapshotRequest {
        snapshotter: "verlay".into(),
        name: name.into(),
        key: key.into(),
        labels,
    })
    .await
    .map(|_| ())
}

pub async fn stat(c: &mut SnapshotsClient<Channel>, key: &str) -> Result<Info, Status> {
    let r = c
        .stat(StatSnapshotRequest {
            snapshotter: "verlay".into(),
            key: key.into(),
        })
        .await?;
    Ok(r.into_inner().info.expect("stat returns info"))
}

pub async fn remove(c: &mut SnapshotsClient<Channel>, key: &str) -> Result<(), Status> {
    c.remove(RemoveSnapshotRequest {
        snapshotter: "verlay".into(),
        key: key.into(),
    })
    .await
    .map(|_| ())
}

pub async fn usage(c: &mut SnapshotsClient<Channel>, key: &str) -> (i64, i64) {
    let r = c
        .usage(UsageRequest {
            snapshotter: "verlay".into(),
            key: key.into(),
        })
        .await
        .expect("usage")
        .into_inner();
    (r.size, r.inodes)
}

pub async fn walk(c: &mut SnapshotsClient<Channel>, filters: &[&str]) -> Result<Vec<String>, Status> {
    let mut stream = c
        .list(ListSnapshotsRequest {
            snapshotter: "verlay".into(),
            filters: filters.iter().map(|s| s.to_string()).collect(),
        })
        .await?
        .into_inner();
    let mut names = Vec::new();
    while let Some(batch) = stream.message().await? {
        names.extend(batch.info.into_iter().map(|i| i.name));
    }
    names.sort();
    Ok(names)
}

pub fn code<T: std::fmt::Debug>(r: Result<T, Status>) -> Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => s.code(),
    }
}

/// The source directory of a bind mount.
pub fn bind_source(m: &[Mount]) -> PathBuf {
    assert_eq!(m.len(), 1, "{m:?}");
    assert_eq!(m[0].r#type, "bind", "{m:?}");
    PathBuf::from(&m[0].source)
}

pub fn write_layer(dir: &Path) {
    std::fs::create_dir_all(dir.join("etc")).expect("mkdir");
    std::fs::write(dir.join("etc/motd"), b"hello\n").expect("write");
    std::fs::write(dir.join("big"), vec![7u8; 200_000]).expect("write");
}
