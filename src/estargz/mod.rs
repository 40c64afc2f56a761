//! eStargz: a gzip layer whose files can be fetched one chunk at a time (the format of
//! containerd/stargz-snapshotter, docs/estargz.md there), and verlay's lazy pull of it.
//!
//! - [`toc`]: the TOC (`stargz.index.json`), the footer, the chunk table; every size capped.
//! - [`writer`]: a tar stream into an eStargz blob.
//! - [`convert`]: `verlay image convert --estargz`, an image of the store into eStargz.
//! - [`pull`]: `verlay image pull --lazy`: manifest, config and TOCs only; the trust chain
//!   manifest digest → TOC digest (layer annotation) → each chunk's digest.
//! - [`lazy`]: the mount side: a read of a chunk not yet verified fetches it (HTTP Range),
//!   verifies it, caches it in the store's layer, then serves it.
//! - [`background`]: the background fetch of the rest of the blob, then the seal.
mod background;
pub mod convert;
pub mod lazy;
pub mod pull;
pub mod toc;
pub mod writer;
