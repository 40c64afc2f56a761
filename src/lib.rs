//! verlay: a FUSE overlay filesystem with kernel-overlayfs semantics.
//!
//! Module map:
//! - [`cli`]: fuse-overlayfs-compatible argv / `-o` parsing, pure.
//! - [`config`]: checks of the layer directories before anything is changed.
//! - [`layer`]: read access to one real directory tree (a lower, or the upper for reads).
//! - [`upper`]: the only writer of upperdir and workdir, in named, ordered steps.
//! - [`union`]: kernel-overlayfs semantics (lookup, copy-up, whiteouts, redirects); no fuser.
//! - [`fuse`]: the thin FUSE adapter over the union.
//! - [`mount`]: daemonizing and the FUSE session.
//! - [`store`]: the layer store (crash-safe layer and image import).
//! - [`registry`]: image pull and push over the OCI distribution API.
//! - [`control`]: the daemon's control socket (how `verlay commit` pauses writers).
//! - [`commit`]: a live upper into a new layer of the store (snapshot, translate, stage, tar).
//! - [`cmd`]: parsing and printing of subcommands (`verlay commit`), over the domain modules.
//! - [`digest`]: hex and `sha256:` ids, used by the store, the registry, lowers and commit.
//! - [`sys`]: the only `unsafe` code.
//!
//! Invariants: nothing is ever written to a lower layer; every new upper object is built in
//! the work dir and published by one rename; an errno is chosen only in `error.rs`.
pub mod cli;
pub mod cmd;
pub mod commit;
pub mod config;
pub mod control;
pub mod demo;
pub mod digest;
pub mod error;
pub mod failpoint;
pub mod fuse;
pub mod layer;
pub mod logging;
pub mod lower;
pub mod mount;
pub mod oci;
pub mod registry;
pub mod store;
pub mod sys;
pub mod union;
pub mod upper;
