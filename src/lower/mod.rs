//! One read-only lower layer's integrity: its manifest (`manifest/`: format, build, scrub), lazy verification
//! on first read (`verify.rs`), the seam through which a lazily pulled layer's missing bytes
//! arrive (`source.rs`, implemented in `estargz/`), and the `verlay verify` / `verlay layer seal` commands
//! (`cmd.rs`). The layer id is in every error.
pub mod manifest;
pub mod source;
pub mod verify;
