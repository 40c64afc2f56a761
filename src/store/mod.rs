//! The layer store: ordered, crash-safe import of OCI/Docker layer tarballs and images.
pub mod cmd;
