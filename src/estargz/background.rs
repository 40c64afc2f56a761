//! The background fetch of a lazy layer, and its seal.
//!
//! After the mount's first lookup or read of the layer, one thread fetches the parts of the
//! layer's compressed blob that `lazy/blob` lacks (its range map, [`ranges`], says
//! which: the pull put the TOC and footer there, reads put the spans they fetched), in
//! order from the blob's start, in Range requests of at most [`SEGMENT`] bytes, so every
//! byte of the blob crosses the network once. Each range is durable in the file before the
//! map records it; a fetch killed at any point resumes from the map at the next mount
//! (crash points `lazy.blob_data`, `lazy.segment`). Each chunk whose compressed span is
//! then complete and that the cache lacks is inflated, verified against its TOC digest and
//! written to the cache, so reads find it there (the blob is in TOC order: the files a
//! `.prefetch.landmark` marks come first in a blob, so first here too). A chunk that does
//! not match is logged and left out.
//!
//! Why the compressed blob and not the tar stream rebuilt from the chunks: the TOC has no
//! tar headers (PAX records, padding, the end of archive), so the diffID cannot be checked
//! without the header members anyway; and with the whole blob, the seal is the store's
//! ordinary import, which checks the blob digest of the manifest and the diffID of the
//! config in one streamed pass (memory bounded by its buffers, not the layer's size), and
//! the blob is kept for `image push`, as an ordinary pull keeps it.
//!
//! When the blob is whole, [`Store::seal_lazy`] turns the layer into an ordinary one (then
//! its lazy children, whose blobs are whole). A blob or diffID mismatch seals nothing: one
//! error line, the layer stays lazy, and the blob is dropped, so the next mount fetches it
//! again rather than trusting bytes that did not verify.

use std::fs::File;
use std::path::Path;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tracing::{error, info, warn};

use super::lazy::{inflate, Shared, MAX_RUN};
use crate::error::{Error, Result};
use crate::failpoint::crash_point;
use crate::store::lazy::{ranges, Sealed, BLOB_FILE, LAZY_DIR};
use crate::store::Store;

/// Bytes of the blob fetched by one Range request.
const SEGMENT: u64 = MAX_RUN;
/// Failed requests in a row before the background fetch gives up (reads still fetch what
/// they need; the next mount starts it again).
const BACKGROUND_TRIES: u32 = 5;
/// How long the seal waits for the store's lock (another process holds it while it imports,
/// records or removes layers); then the layer stays lazy until the next mount.
const SEAL_LOCK_WAIT: Duration = Duration::from_secs(60);

/// How often a mount whose layer another process fetches checks whether it still does.
const FETCH_LOCK_RETRY: Duration = Duration::from_secs(2);
/// How many times (30 minutes): then the mount leaves the layer to the next one.
const FETCH_LOCK_TRIES: u32 = 900;

/// How long the background fetch waits before it starts: containerd mounts an image's
/// rootfs for a moment (to read its `/etc/passwd`) before the container's mount, and a
/// request in flight when such a mount is unmounted is lost with the process (measured with
/// tests/e2e/containerd-lazy.sh: the first container moved twice the layers' bytes).
const BACKGROUND_DELAY: Duration = Duration::from_secs(1);

/// The background fetch, then the seal.
pub(super) fn run(s: &Shared) {
    // before the fetch lock: a mount that lives less than this takes nothing, and the lock
    // is left to the mount that stays
    std::thread::sleep(BACKGROUND_DELAY);
    // One fetch per layer on the machine: every mount of the layer (containerd mounts a
    // rootfs more than once; podman and a snapshotter may share a store) starts this
    // thread, and two fetches would move the blob twice and race on its file and seal.
    let _held = match fetch_lock_when_free(s) {
        Ok(Some(l)) => l,
        Ok(None) => {
            info!(layer = %s.layer, "another process kept fetching this lazy layer in the background; this mount leaves it to that one");
            return;
        }
        Err(e) => {
            warn!(layer = %s.layer, error = %e, "cannot lock the lazy layer for the background fetch; reads still fetch what they need");
            return;
        }
    };
    let in_lazy_dir = match fetch_blob(s) {
        Ok(Some(bytes)) => {
            info!(layer = %s.layer, bytes, "background fetch done: the lazy layer's blob is whole");
            true
        }
        Ok(None) => false,
        Err(e) => {
            warn!(layer = %s.layer, error = %e, "background fetch of a lazy layer gave up; reads still fetch what they need");
            return;
        }
    };
    // the blob checked on its own first, so that a bad one is dropped (and fetched again by
    // the next mount) even while the layer waits for its parent to seal
    let p = s.layer_dir.join(LAZY_DIR).join(BLOB_FILE);
    if in_lazy_dir {
        if let Err(why) = check_blob(&p, &s.blob) {
            error!(layer = %s.layer, error = %why, "the lazy layer's blob does not seal: it does not hash to the manifest's digest; it stays lazy, its blob dropped");
            if let Err(e) = s.blob_file.drop_all() {
                warn!(layer = %s.layer, error = %e, "cannot drop the lazy layer's blob file");
            }
            return;
        }
    }
    seal(s);
}

/// The fetch lock ([`fetch_lock`]), tried again every [`FETCH_LOCK_RETRY`] while another
/// process holds it, so that this mount takes over when that one goes (a container that
/// exits while another runs on the same layer); None after [`FETCH_LOCK_TRIES`] tries. The
/// other process's fetch and seal are then this one's: what it recorded is not fetched
/// again, and a sealed layer is found sealed.
fn fetch_lock_when_free(s: &Shared) -> Result<Option<File>> {
    for i in 0..FETCH_LOCK_TRIES {
        if let Some(l) = fetch_lock(s)? {
            return Ok(Some(l));
        }
        if i == 0 {
            info!(layer = %s.layer, "another process fetches this lazy layer in the background; this mount takes over if it goes");
        }
        std::thread::sleep(FETCH_LOCK_RETRY);
    }
    Ok(None)
}

/// An exclusive lock on the layer's `lazy` directory, held until the seal is done, or None
/// when another process holds it (the lock goes with that process, killed or not).
fn fetch_lock(s: &Shared) -> Result<Option<File>> {
    let dir = s.layer_dir.join(LAZY_DIR);
    let d = File::open(&dir).map_err(|e| Error::io("lazy.lock", &dir, e))?;
    match rustix::fs::flock(&d, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(Some(d)),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
        Err(e) => Err(Error::io("lazy.lock", &dir, e.into())),
    }
}

/// The layer's chain ID and store, from its directory `STORE/layers/<hex>`.
fn chain_of(layer_dir: &Path) -> Option<(String, &Path)> {
    let hex = layer_dir.file_name()?.to_str()?;
    let root = layer_dir.parent()?.parent()?;
    Some((format!("sha256:{hex}"), root))
}

fn seal(s: &Shared) {
    let Some((chain, root)) = chain_of(&s.layer_dir) else {
        warn!(layer = %s.layer, "a lazy layer outside a store is not sealed");
        return;
    };
    let wait = seal_lock_wait();
    let store = match Store::open_within(root, wait) {
        Ok(Some(st)) => st,
        Ok(None) => {
            warn!(layer = %s.layer, waited_ms = wait.as_millis() as u64,
                "the store stayed locked by another process: the lazy layer is not sealed now; the next mount seals it");
            return;
        }
        Err(e) => {
            error!(layer = %s.layer, error = %e, "cannot open the store to seal the lazy layer; it stays lazy");
            return;
        }
    };
    // this layer, then the lazy children its seal lets seal (bounded by the store's layers)
    let mut work = vec![chain];
    let mut budget = store.chain_ids().map(|c| c.len()).unwrap_or(0) + 1;
    while let Some(c) = work.pop() {
        if budget == 0 {
            break;
        }
        budget -= 1;
        match store.seal_lazy(&c) {
            Ok(Sealed::As(_)) => work.extend(store.lazy_children(&c).unwrap_or_default()),
            Ok(Sealed::Incomplete) => {}
            Ok(Sealed::WaitingForParent) => {
                info!(layer = %c, "lazy layer whole; it seals after its parent")
            }
            Err(e) => {
                error!(layer = %c, error = %e, "the lazy layer's blob does not seal (blob digest or diffID mismatch); it stays lazy, its blob dropped");
                let d = store.layer_dir(&c).join(LAZY_DIR);
                if let Err(e) = ranges::drop_blob(&d.join(ranges::RANGES_FILE), &d.join(BLOB_FILE)) {
                    warn!(layer = %c, error = %e, "cannot drop the lazy layer's blob file");
                }
            }
        }
    }
}

/// How long the seal waits for the store's lock ([`SEAL_LOCK_WAIT`], or
/// `VERLAY_LAZY_SEAL_WAIT_MS` in the mount's environment: the tests shorten it).
fn seal_lock_wait() -> Duration {
    std::env::var("VERLAY_LAZY_SEAL_WAIT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or(SEAL_LOCK_WAIT)
}

/// Does the file `p` hash to `digest`? (streamed: one buffer of memory) A file gone is no
/// mismatch: the seal of this layer from its parent's thread moved it into the store, which
/// verified it.
fn check_blob(p: &Path, digest: &str) -> std::result::Result<(), String> {
    let mut f = match File::open(p) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.to_string()),
    };
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| e.to_string())?;
    let got = format!("sha256:{}", crate::digest::hex(&h.finalize()));
    if got == digest {
        Ok(())
    } else {
        Err(format!("expected {digest}, the blob fetched hashes to {got}"))
    }
}

/// Fetch the ranges of the blob that `lazy/blob` lacks (its range map says which: what the
/// pull, reads and earlier runs moved is not fetched again), in order, caching the chunks
/// each completes; returns the bytes fetched, or None when the store has the blob already.
/// Bounded: every request either adds a range to the map or counts a failure,
/// [`BACKGROUND_TRIES`] in a row end it.
fn fetch_blob(s: &Shared) -> Result<Option<u64>> {
    if let Some((_, root)) = chain_of(&s.layer_dir) {
        let kept = root
            .join("blobs/sha256")
            .join(s.blob.trim_start_matches("sha256:"));
        if kept.is_file() {
            return Ok(None); // the store has it whole (sealed, or pulled): nothing to fetch
        }
    }
    let b = &s.blob_file;
    let mut order: Vec<usize> = (0..s.table.chunks.len()).collect();
    order.sort_by_key(|&k| s.table.chunks[k].blob_end);
    // chunk index -> its file (the first name of a hard-linked file), by first chunk
    let mut owners: Vec<(usize, &Path)> = s
        .table
        .files
        .iter()
        .map(|(p, &(first, _, _))| (first, p.as_path()))
        .collect();
    owners.sort();
    owners.dedup_by_key(|o| o.0);
    let mut c = Caching {
        order,
        next: 0,
        owners,
    };
    let (mut failures, mut fetched) = (0u32, 0u64);
    loop {
        b.reload();
        let have = b.ranges();
        // everything before the first gap is there: cache the chunks it completes
        c.upto(s, have.prefix());
        let Some(&(from, to)) = have.missing(s.blob_size).first() else {
            break;
        };
        let end = to.min(from + SEGMENT);
        let got = s.client().and_then(|c| c.get_blob_range(&s.blob, from, end));
        let body = match got {
            Ok(b) if b.len() as u64 == end - from => b,
            r => {
                failures += 1;
                if failures >= BACKGROUND_TRIES {
                    return Err(r.err().unwrap_or_else(|| {
                        Error::remote(&s.layer, "short Range answers", "check the registry")
                    }));
                }
                std::thread::sleep(crate::registry::client::backoff(failures + 3));
                continue;
            }
        };
        failures = 0;
        let p = s.layer_dir.join(LAZY_DIR).join(BLOB_FILE);
        b.store(from, &body)
            .map_err(|e| Error::io("lazy.blob_write", &p, e))?;
        fetched += body.len() as u64;
        crash_point("lazy.segment");
    }
    Ok(Some(fetched))
}

/// Which chunks the background fetch has considered for the cache.
struct Caching<'a> {
    /// chunk indices by the end of their compressed spans
    order: Vec<usize>,
    /// the next of `order` to consider
    next: usize,
    /// (first chunk, path) of each file, sorted
    owners: Vec<(usize, &'a Path)>,
}

impl Caching<'_> {
    /// Cache every chunk whose span ends within the first `have` bytes of the blob file and
    /// that the cache lacks.
    fn upto(&mut self, s: &Shared, have: u64) {
        let chunks = &s.table.chunks;
        let mut file: Option<(usize, File)> = None;
        while self.next < self.order.len() && chunks[self.order[self.next]].blob_end <= have {
            let k = self.order[self.next];
            self.next += 1;
            if s.is_present(k) {
                continue;
            }
            let (first, rel) = self.owners[self.owners.partition_point(|o| o.0 <= k).saturating_sub(1)];
            let ch = &chunks[k];
            let Some(span) = s.blob_file.read(ch.blob_off, ch.blob_end) else {
                warn!(layer = %s.layer, "cannot read the lazy layer's blob file");
                return;
            };
            let data = inflate(&span, ch.inner, ch.len);
            if data.len() as u64 != ch.len || Sha256::digest(&data)[..] != ch.digest[..] {
                error!(layer = %s.layer, path = %rel.display(), offset = ch.file_off,
                    "background fetch: a chunk does not match its TOC digest; not cached");
                continue;
            }
            let mut f = match file.take() {
                Some((o, f)) if o == first => Some(f),
                _ => None,
            };
            s.cache(&mut f, rel, k, ch, &data);
            file = f.map(|f| (first, f));
        }
    }
}
