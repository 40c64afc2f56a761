//! The gRPC face: containerd's Snapshots service (via the `containerd-snapshots` crate) over
//! [`Snapshots`]. Every call runs on a blocking thread: the database commits and the seal of
//! a layer fsync, and must not stall the async runtime that serves other calls.

use std::collections::HashMap;
use std::sync::Arc;

use containerd_snapshots::api::types::Mount;
use containerd_snapshots::tonic::Status;
use containerd_snapshots::{Info, Snapshotter, Usage};
use tracing::{debug, error};

use crate::error::Result;
use crate::snapshots::Snapshots;

/// The service handed to tonic.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Snapshots>,
}

impl Service {
    /// Serve `snapshots`.
    pub fn new(snapshots: Snapshots) -> Service {
        Service {
            inner: Arc::new(snapshots),
        }
    }

    /// Run `f` on a blocking thread and log the outcome once, with the call's name.
    async fn call<T, F>(&self, op: &'static str, key: &str, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&Snapshots) -> Result<T> + Send + 'static,
    {
        let inner = self.inner.clone();
        let r = tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| Status::internal(format!("{op}: worker thread failed: {e}")))?;
        match r {
            Ok(v) => {
                debug!(op, key, "ok");
                Ok(v)
            }
            Err(e) => {
                if e.is_internal() {
                    error!(op, key, error = %e, "snapshot call failed");
                } else {
                    debug!(op, key, error = %e, "refused");
                }
                Err(Status::from(e))
            }
        }
    }
}

/// The stream Walk returns: the matching snapshots, read in one transaction.
pub type InfoStream = tokio_stream::Iter<std::vec::IntoIter<Result<Info, Status>>>;

#[containerd_snapshots::tonic::async_trait]
impl Snapshotter for Service {
    type Error = Status;
    type InfoStream = InfoStream;

    async fn stat(&self, key: String) -> Result<Info, Status> {
        let k = key.clone();
        self.call("stat", &key, move |s| s.stat(&k)).await
    }

    async fn update(&self, info: Info, fieldpaths: Option<Vec<String>>) -> Result<Info, Status> {
        let key = info.name.clone();
        self.call("update", &key, move |s| s.update(info, fieldpaths))
            .await
    }

    async fn usage(&self, key: String) -> Result<Usage, Status> {
        let k = key.clone();
        self.call("usage", &key, move |s| s.usage(&k)).await
    }

    async fn mounts(&self, key: String) -> Result<Vec<Mount>, Status> {
        let k = key.clone();
        self.call("mounts", &key, move |s| s.mounts(&k)).await
    }

    async fn prepare(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Status> {
        let k = key.clone();
        self.call("prepare", &key, move |s| s.create(false, &k, &parent, labels))
            .await
    }

    async fn view(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Status> {
        let k = key.clone();
        self.call("view", &key, move |s| s.create(true, &k, &parent, labels))
            .await
    }

    async fn commit(&self, name: String, key: String, labels: HashMap<String, String>) -> Result<(), Status> {
        let k = key.clone();
        self.call("commit", &key, move |s| s.commit(&name, &k, labels))
            .await
    }

    async fn remove(&self, key: String) -> Result<(), Status> {
        let k = key.clone();
        self.call("remove", &key, move |s| s.remove(&k)).await
    }

    async fn clear(&self) -> Result<(), Status> {
        self.call("cleanup", "", |s| s.cleanup().map(|_| ())).await
    }

    async fn list(&self, _snapshotter: String, filters: Vec<String>) -> Result<InfoStream, Status> {
        let infos = self.call("walk", "", move |s| s.list(&filters)).await?;
        let items: Vec<Result<Info, Status>> = infos.into_iter().map(Ok).collect();
        Ok(tokio_stream::iter(items))
    }
}
