//! The chunk-source seam: where a layer whose data is not all on disk gets its missing bytes.
//!
//! [`verify::VerifiedLayer`](super::verify::VerifiedLayer) reads the regular files of a lazily
//! pulled layer through a [`ChunkSource`] instead of the lower file. `lower/` only defines the
//! trait; the implementation is the eStargz mount side
//! ([`crate::estargz::lazy::LazyLayer`]), injected by whoever opens the layer
//! (`mount.rs`, the commit's merged view) via [`crate::estargz::lazy::chunk_source`]. So
//! `lower/` never imports `estargz/`, which imports `lower/` for [`ChunkBits`].

use std::fmt::Debug;
use std::os::fd::BorrowedFd;
use std::path::Path;

use crate::error::{Error, Result};

pub use super::verify::ChunkBits;

/// The bytes of a layer's regular files that are fetched (and verified) on demand.
pub trait ChunkSource: Debug + Send + Sync {
    /// (index of the first chunk, chunk count, size) of the regular file `rel`, if the
    /// source has chunks for it.
    fn file(&self, rel: &Path) -> Option<(usize, usize, u64)>;

    /// Read `[offset, offset + size)` of the file `c.rel` (its local file open as `fd`), every
    /// chunk it touches verified first (and its bit set in `c.bits`).
    fn read(&self, c: &ReadCtx<'_>, fd: BorrowedFd<'_>, offset: u64, size: u64) -> Result<Vec<u8>>;

    /// The layer was looked up or read: the source may start fetching in the background
    /// (called after the mount daemonized; once is enough, later calls do nothing).
    fn start_background(&self);
}

/// What one read of a file from a [`ChunkSource`] needs from the verifier: its verdict bits
/// and how to make (and log) an integrity error.
pub struct ReadCtx<'a> {
    /// path in the layer
    pub rel: &'a Path,
    /// index of the file's first chunk, and how many it has
    pub first: usize,
    /// chunk count
    pub count: usize,
    /// file size
    pub size: u64,
    /// which chunks of the file were verified in this mount
    pub bits: &'a ChunkBits,
    /// the logged EIO for a chunk that does not match: (expected, actual)
    pub corrupt: &'a (dyn Fn(String, String) -> Error + Sync),
}
