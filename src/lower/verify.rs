//! Lazy verification of a lower layer against its manifest, inside the mount.
//!
//! Nothing is hashed up front. Lookup checks an entry's metadata against the manifest (a
//! file the manifest lists but the layer lacks is EIO, never ENOENT; an entry it does not
//! list is hidden). The first read of each content chunk hashes it; a match is remembered in a
//! bounded LRU so later reads cost nothing, a mismatch is EIO every time and one log line
//! naming the layer and the file. Copy-up verifies the whole file first, so a corrupt lower
//! never becomes a good-looking upper file.

use std::collections::HashMap;
use std::ffi::OsString;
use std::num::NonZeroUsize;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use lru::LruCache;
use parking_lot::Mutex;
use rustix::fs::Stat;
use tracing::{error, warn};

use crate::error::{Error, Result};
use crate::layer::{Kind, LayerDir};
use crate::lower::manifest::{chunk_digest, hex, Manifest, ManifestEntry, CHUNK_SIZE};

/// Chunks remembered as verified per layer: 64 Ki chunks of 64 KiB cover 4 GiB of data
/// read, in about 5 MiB of memory.
const VERDICT_CACHE: usize = 64 * 1024;
/// (layer, path) pairs whose integrity error was already logged.
const LOGGED_CACHE: usize = 4096;

/// The mount option `verify=`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum VerifyMode {
    /// verify every lower that has a manifest
    #[default]
    On,
    /// no checks (like fuse-overlayfs)
    Off,
    /// refuse to mount a lower without a manifest
    Require,
}

/// A lower layer's manifest and what has been verified of it.
#[derive(Debug)]
pub struct VerifiedLayer {
    manifest: Manifest,
    /// the layer directory, named in every error
    layer: String,
    /// (st_ino, chunk) of chunks whose content matched
    verified: Mutex<LruCache<(u64, u64), ()>>,
    logged: Mutex<LruCache<(PathBuf, String), ()>>,
}

impl VerifiedLayer {
    /// Open the manifest of `dir` under `mode`: `None` when the layer has none (or verify is
    /// off); an error when `require` finds none, when the manifest is damaged, or when the
    /// store recorded another digest for it.
    pub fn open(dir: &Path, mode: VerifyMode) -> Result<Option<VerifiedLayer>> {
        if mode == VerifyMode::Off {
            return Ok(None);
        }
        let manifest = match Manifest::open_beside(dir)? {
            Some(m) => m,
            None if mode == VerifyMode::Require => {
                return Err(Error::usage(
                    format!("lowerdir \"{}\"", dir.display()),
                    "has no manifest and verify=require is set",
                    format!(
                        "seal it with `verlay layer seal {}`, import it with `verlay layer import`, or mount with verify=on",
                        dir.display()
                    ),
                ))
            }
            None => return Ok(None),
        };
        check_store_record(dir, &manifest)?;
        let cap = |n| NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN);
        Ok(Some(VerifiedLayer {
            manifest,
            layer: dir.display().to_string(),
            verified: Mutex::new(LruCache::new(cap(VERDICT_CACHE))),
            logged: Mutex::new(LruCache::new(cap(LOGGED_CACHE))),
        }))
    }

    /// Log an integrity error once per (layer, path, kind of error).
    fn log_once(&self, path: &Path, e: &Error) {
        let kind = match e {
            Error::Corrupt { .. } => "corrupt",
            Error::MissingInLayer { .. } => "missing",
            _ => "other",
        };
        if self
            .logged
            .lock()
            .put((path.to_path_buf(), kind.into()), ())
            .is_none()
        {
            match e {
                Error::Corrupt { expected, actual, .. } => error!(
                    layer = %self.layer, path = %path.display(), expected = %expected, actual = %actual,
                    "lower layer content or metadata does not match its manifest; serving EIO"
                ),
                _ => error!(layer = %self.layer, path = %path.display(), error = %e,
                    "lower layer does not match its manifest; serving EIO"),
            }
        }
    }

    fn corrupt(&self, path: &Path, expected: String, actual: String) -> Error {
        let e = Error::Corrupt {
            layer: self.layer.clone(),
            path: path.to_path_buf(),
            expected,
            actual,
        };
        self.log_once(path, &e);
        e
    }

    /// The manifest's entry for `rel`.
    pub fn entry(&self, rel: &Path) -> Result<Option<ManifestEntry>> {
        self.manifest.lookup(rel)
    }

    /// Check what the layer has at `rel` (`st`: its lstat, None when absent) against the
    /// manifest. Returns the stat when the entry is visible, None when it is absent or not
    /// listed (hidden, logged), and EIO when it is missing or its metadata differs.
    pub fn check(&self, layer: &LayerDir, rel: &Path, st: Option<Stat>) -> Result<Option<Stat>> {
        let entry = self.manifest.lookup(rel)?;
        match (entry, st) {
            (None, None) => Ok(None),
            (None, Some(_)) => {
                if self
                    .logged
                    .lock()
                    .put((rel.to_path_buf(), "unlisted".into()), ())
                    .is_none()
                {
                    warn!(layer = %self.layer, path = %rel.display(),
                        "entry not listed in the layer manifest; hidden");
                }
                Ok(None)
            }
            (Some(_), None) => {
                let e = Error::MissingInLayer {
                    layer: self.layer.clone(),
                    path: rel.to_path_buf(),
                };
                self.log_once(rel, &e);
                Err(e)
            }
            (Some(e), Some(st)) => {
                if let Some((want, got)) = metadata_mismatch(layer, rel, &e, &st)? {
                    return Err(self.corrupt(rel, want, got));
                }
                Ok(Some(st))
            }
        }
    }

    /// Names the manifest lists in directory `rel`, with their kinds.
    pub fn listed(&self, rel: &Path) -> Result<HashMap<OsString, Kind>> {
        Ok(self
            .manifest
            .children(rel)?
            .into_iter()
            .filter_map(|e| e.path.file_name().map(|n| (n.to_os_string(), e.kind)))
            .collect())
    }

    /// Verify the chunks of the file `rel` (open as `fd`, inode `ino`) that
    /// `[offset, offset + len)` touches.
    pub fn verify_range(
        &self,
        rel: &Path,
        chunks: &[[u8; 32]],
        fd: impl AsFd,
        ino: u64,
        offset: u64,
        len: u64,
    ) -> Result<()> {
        if len == 0 || chunks.is_empty() {
            return Ok(());
        }
        let first = offset / CHUNK_SIZE;
        let last = ((offset + len - 1) / CHUNK_SIZE).min(chunks.len() as u64 - 1);
        let mut buf = Vec::new();
        for c in first..=last {
            if self.verified.lock().get(&(ino, c)).is_some() {
                continue;
            }
            buf.resize(CHUNK_SIZE as usize, 0);
            let mut got = 0;
            while got < buf.len() {
                let n = rustix::io::pread(fd.as_fd(), &mut buf[got..], c * CHUNK_SIZE + got as u64)?;
                if n == 0 {
                    break;
                }
                got += n;
            }
            let actual = chunk_digest(&buf[..got]);
            let expected = chunks[c as usize];
            if actual != expected {
                return Err(self.corrupt(
                    rel,
                    format!("chunk {c} sha256:{}", hex(&expected)),
                    format!("sha256:{}", hex(&actual)),
                ));
            }
            self.verified.lock().put((ino, c), ());
        }
        Ok(())
    }

    /// Verify a whole file (before a copy-up).
    pub fn verify_file(&self, layer: &LayerDir, rel: &Path, st: &Stat) -> Result<()> {
        let Some(e) = self.manifest.lookup(rel)? else {
            return Ok(());
        };
        if Kind::from_mode(st.st_mode) != Kind::File {
            return Ok(());
        }
        let f = layer.open_file(rel, rustix::fs::OFlags::RDONLY)?;
        self.verify_range(rel, &e.chunks, &f, st.st_ino, 0, st.st_size as u64)
    }
}

/// What differs between the manifest's entry and the object on disk, as (expected, actual).
fn metadata_mismatch(
    layer: &LayerDir,
    rel: &Path,
    e: &ManifestEntry,
    st: &Stat,
) -> Result<Option<(String, String)>> {
    let kind = Kind::from_mode(st.st_mode);
    let perm = st.st_mode & 0o7777;
    let m = |what: &str, want: String, got: String| Some((format!("{what} {want}"), format!("{what} {got}")));
    if kind != e.kind {
        return Ok(m("type", format!("{:?}", e.kind), format!("{kind:?}")));
    }
    if perm != e.perm {
        return Ok(m("mode", format!("{:04o}", e.perm), format!("{perm:04o}")));
    }
    if (st.st_uid, st.st_gid) != (e.uid, e.gid) {
        return Ok(m(
            "owner",
            format!("{}:{}", e.uid, e.gid),
            format!("{}:{}", st.st_uid, st.st_gid),
        ));
    }
    match kind {
        Kind::File if st.st_size as u64 != e.size => {
            return Ok(m("size", e.size.to_string(), st.st_size.to_string()));
        }
        Kind::Char | Kind::Block if st.st_rdev != e.rdev => {
            return Ok(m("device", e.rdev.to_string(), st.st_rdev.to_string()));
        }
        Kind::Symlink => {
            let target = layer.readlink(rel)?;
            if Some(&target) != e.target.as_ref() {
                return Ok(m(
                    "symlink target",
                    format!("{:?}", e.target.clone().unwrap_or_default()),
                    format!("{target:?}"),
                ));
            }
        }
        _ => {}
    }
    Ok(None)
}

/// A layer imported into a store has its manifest digest recorded in `layer.json` beside
/// the `diff` directory; a manifest that does not match the record is refused.
fn check_store_record(dir: &Path, manifest: &Manifest) -> Result<()> {
    let Some(parent) = dir.parent() else { return Ok(()) };
    let record = parent.join("layer.json");
    let bytes = match std::fs::read(&record) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("read layer record", record, e)),
    };
    let v: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| Error::io("parse layer record", &record, std::io::Error::other(e)))?;
    let Some(want) = v.get("manifest_digest").and_then(|d| d.as_str()) else {
        return Ok(());
    };
    let got = manifest.digest();
    if want != got {
        return Err(Error::usage(
            format!("lowerdir \"{}\"", dir.display()),
            format!("its manifest's digest is {got}, but the layer store recorded {want}: the manifest was changed"),
            format!("check the layer with `verlay verify {}` and re-import it", dir.display()),
        ));
    }
    Ok(())
}
