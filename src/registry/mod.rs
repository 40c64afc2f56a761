//! Images from and to OCI registries: `verlay image pull` and `verlay image push` over the
//! OCI distribution API (HTTPS, or plain HTTP when asked and for loopback registries).
//!
//! - [`reference`]: `HOST[:PORT]/NAME[:TAG][@DIGEST]`, pure.
//! - [`client`]: HTTP(S), retries with backoff, 401 answers, error classification.
//! - [`tls`]: the scheme rule and the trusted roots (system + containers `certs.d`).
//! - [`auth`]: challenges, the token flow, where `Authorization` may go; pure.
//! - [`credentials`]: auth.json, docker's config.json, credential helpers.
//! - [`pull`] and [`push`]: the two transfers, each a sequence of named steps.
//!
//! Manifests are parsed by [`crate::oci`]; blobs and image records are kept by
//! [`crate::store::blobs`]. The store never calls into this module (commands call both).
//!
//! Invariants: a blob is published in the store only once it hashes to its digest; a layer
//! reaches `STORE/layers/` only through [`crate::store::Store::import_layer`]; an upload
//! never sends a byte range the registry may already hold in the same session.
pub mod auth;
pub mod client;
pub mod credentials;
pub mod pull;
pub mod push;
pub mod reference;
pub mod tls;

pub use client::Options;
pub use reference::Reference;
