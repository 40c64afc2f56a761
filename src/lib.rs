//! verlay: a FUSE overlay filesystem with kernel-overlayfs semantics.
//!
//! Module map (who may call whom: docs/architecture.md):
//! - [`cli`]: fuse-overlayfs-compatible argv / `-o` parsing into typed options, pure.
//! - [`config`]: typed options into checked directories, before anything is changed.
//! - [`mount`]: opening the layers, the upper's lock, daemonizing, the FUSE session.
//! - [`fuse`]: the thin FUSE adapter over the union.
//! - [`union`]: kernel-overlayfs semantics (lookup, copy-up, whiteouts, redirects); no fuser.
//! - [`layer`]: read access to one real directory tree (a lower, or the upper for reads).
//! - [`lower`]: layer manifests and the lazy digest check of lower files.
//! - [`upper`]: the only writer of upperdir and workdir, in named, ordered steps.
//! - [`control`]: the daemon's control socket (how `verlay commit` pauses writers).
//! - [`commit`]: a live upper into a new layer of the store (snapshot, translate, stage, tar).
//! - [`progress`]: progress bars and summary lines of the long commands, on stderr.
//! - [`cmd`]: every subcommand's parsing (clap) and printing, over the domain modules; any
//!   other argv is the mount form, parsed by [`cli`].
//! - [`store`]: the layer store (crash-safe layer and image import, blobs, image records).
//! - [`registry`]: image pull and push over the OCI distribution API; uses the store.
//! - [`estargz`]: the eStargz layer format, `image convert --estargz` and lazy pull.
//! - [`oci`]: manifests, indexes and configs, pure; shared by the store and the registry.
//! - [`digest`]: hex and `sha256:` ids, used by the store, the registry, lowers and commit.
//! - [`failpoint`]: named crash points (`VERLAY_CRASH_AT=STEP[:N]`) for the crash tests.
//! - [`error`]: the one error enum and its errno.
//! - [`logging`]: the tracing subscriber `main` installs.
//! - [`demo`]: `verlay demo`, a self-contained tour.
//! - [`als`]: `verlay als serve`, podman's additional layer store over lazy eStargz pulls.
//! - [`sys`]: the only `unsafe` code.
//!
//! Invariants: nothing is ever written to a lower layer; every new upper object is built in
//! the work dir and published by one rename; an errno is chosen only in `error.rs`.
pub mod als;
pub mod cli;
pub mod cmd;
pub mod commit;
pub mod config;
pub mod control;
pub mod demo;
pub mod digest;
pub mod error;
pub mod estargz;
pub mod failpoint;
pub mod fuse;
pub mod layer;
pub mod logging;
pub mod lower;
pub mod mount;
pub mod oci;
pub mod progress;
pub mod registry;
pub mod store;
pub mod sys;
pub mod union;
pub mod upper;
