//! The one error type of verlay, and the one place an errno is chosen.
//!
//! Every fallible function in the library returns [`Result`]. The FUSE adapter calls
//! [`Error::errno`] to answer the kernel; the command line prints [`Error`]'s `Display`
//! once. OS errors are converted at the syscall boundary, never compared by hand.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// Result with verlay's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in verlay.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// A plain errno from the union's rules (ENOENT, EEXIST, ENOTEMPTY, EXDEV, ...).
    Errno(i32),
    /// A syscall on a real layer failed; carries the syscall's own errno.
    Io {
        /// what was being done, e.g. "copy_up.rename"
        op: &'static str,
        /// the path relative to the layer root (or absolute for setup)
        path: PathBuf,
        /// the OS error
        source: io::Error,
    },
    /// A bad command line or mount configuration: `what: why (fix)`.
    Usage {
        /// the option or object that is wrong, e.g. `lowerdir "/l1"`
        what: String,
        /// why it is wrong
        why: String,
        /// what the user should do
        fix: String,
    },
    /// A registry (or the network to it) failed or refused a request, after the retries that
    /// make sense: `what: why (fix)`. A runtime failure, not a usage error.
    Remote {
        /// the request or object, e.g. `blob sha256:... of 127.0.0.1:5000/test`
        what: String,
        /// why it failed
        why: String,
        /// what the user should do
        fix: String,
    },
    /// A lower file's content does not match its manifest digest.
    Corrupt {
        /// layer identifier
        layer: String,
        /// path inside the layer
        path: PathBuf,
        /// expected digest
        expected: String,
        /// digest of what is on disk
        actual: String,
    },
    /// The manifest lists an entry that the layer lacks.
    MissingInLayer {
        /// layer identifier
        layer: String,
        /// path inside the layer
        path: PathBuf,
    },
    /// A previous fsync of the upper failed; writes fail until remount.
    UpperPoisoned,
}

impl Error {
    /// A usage/configuration error in the `what: why (fix)` form.
    pub fn usage(what: impl Into<String>, why: impl Into<String>, fix: impl Into<String>) -> Self {
        Error::Usage {
            what: what.into(),
            why: why.into(),
            fix: fix.into(),
        }
    }

    /// A registry failure in the `what: why (fix)` form.
    pub fn remote(what: impl Into<String>, why: impl Into<String>, fix: impl Into<String>) -> Self {
        Error::Remote {
            what: what.into(),
            why: why.into(),
            fix: fix.into(),
        }
    }

    /// An I/O error from a syscall on `path` while doing `op`.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// The errno the FUSE adapter answers with. The only place an errno is chosen.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Errno(e) => *e,
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::Usage { .. } => libc::EINVAL,
            Error::Remote { .. } => libc::EIO,
            // A damaged layer must never look like a missing file: EIO, not ENOENT.
            Error::Corrupt { .. } | Error::MissingInLayer { .. } | Error::UpperPoisoned => libc::EIO,
        }
    }

    /// Damage to a lower layer, found against its manifest: the verifier has logged it once,
    /// with the layer and the path, so callers need not log it again.
    pub fn is_integrity(&self) -> bool {
        matches!(self, Error::Corrupt { .. } | Error::MissingInLayer { .. })
    }

    /// True for errors that are bugs or damage (logged at error), false for the errnos
    /// that applications expect in normal use (ENOENT on lookup, EEXIST, ...).
    pub fn is_internal(&self) -> bool {
        match self {
            Error::Errno(_) => false,
            Error::Io { source, .. } => !matches!(
                source.raw_os_error(),
                Some(
                    libc::ENOENT
                        | libc::EEXIST
                        | libc::ENOTEMPTY
                        | libc::ENOTDIR
                        | libc::EISDIR
                        | libc::ENODATA
                        | libc::ERANGE
                        | libc::EACCES
                        | libc::EPERM
                        | libc::ENAMETOOLONG
                        | libc::ENOSPC
                        | libc::EDQUOT
                        | libc::ELOOP
                        | libc::EOPNOTSUPP
                        | libc::EXDEV
                        | libc::EINVAL
                        | libc::EFBIG
                        | libc::EAGAIN
                )
            ),
            Error::Usage { .. } | Error::Remote { .. } => false,
            Error::Corrupt { .. } | Error::MissingInLayer { .. } | Error::UpperPoisoned => true,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Errno(e) => write!(f, "{}", io::Error::from_raw_os_error(*e)),
            Error::Io { op, path, source } => {
                write!(f, "{op} {}: {source}", path.display())
            }
            Error::Usage { what, why, fix } | Error::Remote { what, why, fix } => {
                write!(f, "{what}: {why} ({fix})")
            }
            Error::Corrupt {
                layer,
                path,
                expected,
                actual,
            } => write!(
                f,
                "layer {layer}: {}: does not match the layer manifest (expected {expected}, found {actual})",
                path.display()
            ),
            Error::MissingInLayer { layer, path } => write!(
                f,
                "layer {layer}: {}: listed in the layer manifest but missing from the layer",
                path.display()
            ),
            Error::UpperPoisoned => write!(
                f,
                "the upper layer failed an fsync earlier; writes are refused until remount"
            ),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<rustix::io::Errno> for Error {
    fn from(e: rustix::io::Errno) -> Self {
        Error::Errno(e.raw_os_error())
    }
}

/// Shorthand for an errno error.
pub fn errno<T>(e: i32) -> Result<T> {
    Err(Error::Errno(e))
}

/// Turn ENOENT into `None`, for lookups where absence is the normal answer.
pub trait NotFoundOk<T> {
    /// `Ok(Some(v))`, `Ok(None)` on ENOENT, or the error.
    fn not_found_ok(self) -> Result<Option<T>>;
}

impl<T> NotFoundOk<T> for std::result::Result<T, rustix::io::Errno> {
    fn not_found_ok(self) -> Result<Option<T>> {
        match self {
            Ok(v) => Ok(Some(v)),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}
