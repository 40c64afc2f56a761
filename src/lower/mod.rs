//! One read-only lower layer's integrity: its manifest (`manifest/`: format, build, scrub), lazy verification
//! on first read (`verify.rs`), and the `verlay verify` / `verlay layer seal` commands
//! (`cmd.rs`). The layer id is in every error.
pub mod manifest;
pub mod verify;
