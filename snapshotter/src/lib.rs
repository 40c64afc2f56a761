//! verlay's containerd snapshotter: serves containerd's snapshots gRPC API as a proxy plugin,
//! handing out `fuse3.verlay` mounts, and turns every Commit into an ordered, sealed layer.
//!
//! Module map:
//! - [`snapshots`]: the state (redb records, snapshot directories) and containerd's rules;
//!   the ordering of Commit is in its module doc.
//! - [`service`]: the gRPC service over it (blocking work off the async runtime).
//! - [`filter`]: Walk filters.
//! - [`remote`]: containerd's remote snapshotter labels: eStargz layers recorded lazily.
//! - [`error`]: the one error type and the one place a gRPC status code is chosen.
//!
//! Kept out of the `verlay` crate so that the core builds without tonic, tokio and redb.
pub mod error;
pub mod filter;
pub mod remote;
pub mod service;
pub mod snapshots;
