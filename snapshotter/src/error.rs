//! The one error type of the snapshotter, and the one place a gRPC status code is chosen.
//!
//! containerd turns the status codes back into its `errdefs` (NotFound, AlreadyExists,
//! FailedPrecondition, InvalidArgument), and its metadata layer and garbage collector act on
//! them, so the code of each case is part of the API, not decoration.

use std::fmt;
use std::io;
use std::path::PathBuf;

use containerd_snapshots::tonic::Status;

/// Result with the snapshotter's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the snapshotter.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// No snapshot has that key (or a parent named in a request does not exist).
    NotFound(String),
    /// Prepare/View with a key, or Commit with a name, that is already taken.
    AlreadyExists(String),
    /// The snapshot is in the wrong state for the call (Commit of a view, Remove of a parent,
    /// Mounts of a committed snapshot, a snapshot busy in another call).
    FailedPrecondition(String),
    /// A malformed request (parent not committed, unknown update field, bad filter).
    InvalidArgument(String),
    /// The metadata database failed.
    Db {
        /// what was being done, e.g. "prepare.insert"
        op: &'static str,
        /// redb's error (boxed: it is several times larger than every other variant)
        source: Box<redb::Error>,
    },
    /// A record in the database does not decode (or encode).
    BadRecord {
        /// the snapshot key
        key: String,
        /// serde's message
        why: String,
    },
    /// A syscall on the snapshot directories failed.
    Io {
        /// the step, e.g. "commit.syncfs"
        op: &'static str,
        /// the path it was done on
        path: PathBuf,
        /// the OS error
        source: io::Error,
    },
    /// verlay's library failed (sealing a layer).
    Verlay {
        /// the step, e.g. "commit.seal"
        op: &'static str,
        /// verlay's error
        source: verlay::error::Error,
    },
    /// A bad command line or root directory: `what: why (fix)`.
    Usage {
        /// the argument or object that is wrong
        what: String,
        /// why
        why: String,
        /// what to do
        fix: String,
    },
}

impl Error {
    /// A database error during `op`.
    pub fn db(op: &'static str, e: impl Into<redb::Error>) -> Self {
        Error::Db {
            op,
            source: Box::new(e.into()),
        }
    }

    /// An I/O error during `op` on `path`.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// A usage error in the `what: why (fix)` form.
    pub fn usage(what: impl Into<String>, why: impl Into<String>, fix: impl Into<String>) -> Self {
        Error::Usage {
            what: what.into(),
            why: why.into(),
            fix: fix.into(),
        }
    }

    /// Errors of the snapshotter itself (disk, database), as opposed to the caller's.
    pub fn is_internal(&self) -> bool {
        matches!(
            self,
            Error::Db { .. } | Error::BadRecord { .. } | Error::Io { .. } | Error::Verlay { .. }
        )
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NotFound(m)
            | Error::AlreadyExists(m)
            | Error::FailedPrecondition(m)
            | Error::InvalidArgument(m) => f.write_str(m),
            Error::Db { op, source } => write!(f, "{op}: metadata database: {source}"),
            Error::BadRecord { key, why } => write!(f, "metadata record {key:?} is damaged: {why}"),
            Error::Io { op, path, source } => write!(f, "{op} {}: {source}", path.display()),
            Error::Verlay { op, source } => write!(f, "{op}: {source}"),
            Error::Usage { what, why, fix } => write!(f, "{what}: {why} ({fix})"),
        }
    }
}

impl std::error::Error for Error {}

/// The only place a status code is chosen.
impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let msg = e.to_string();
        match e {
            Error::NotFound(_) => Status::not_found(msg),
            Error::AlreadyExists(_) => Status::already_exists(msg),
            Error::FailedPrecondition(_) => Status::failed_precondition(msg),
            Error::InvalidArgument(_) | Error::Usage { .. } => Status::invalid_argument(msg),
            Error::Db { .. } | Error::BadRecord { .. } | Error::Io { .. } | Error::Verlay { .. } => {
                Status::internal(msg)
            }
        }
    }
}
