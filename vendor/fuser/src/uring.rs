//! verlay patch: FUSE over io_uring (Linux 6.14+, `CONFIG_FUSE_IO_URING`).
//!
//! After INIT (with `FUSE_OVER_IO_URING` granted), the kernel routes ordinary requests
//! through io_uring queues instead of `/dev/fuse`: one queue per possible CPU
//! (`num_possible_cpus()` in `fs/fuse/dev_uring.c`), and the ring becomes ready, and
//! requests flow, only once every queue has an entry registered. Until then the kernel
//! holds new requests back; if a `FUSE_IO_URING_CMD_REGISTER` fails, it drops io_uring
//! for the connection and sends everything through `/dev/fuse` again.
//!
//! Each worker thread here owns one io_uring (`IORING_SETUP_SQE128`) with one entry:
//! a 288-byte `fuse_uring_req_header` buffer (in/out header, per-op header,
//! `fuse_uring_ent_in_out`) and a payload buffer. It registers the entry, waits for a
//! request, runs it through the usual dispatch, writes the reply into the same buffers
//! and sends `FUSE_IO_URING_CMD_COMMIT_AND_FETCH`, which both commits the reply and
//! takes the next request. One entry per ring keeps a worker's buffers its own and means
//! no task work arrives while a request is being served; a queue gets several workers
//! (each with its ring) so that one slow request does not hold up its CPU's queue.
//!
//! FORGET, INTERRUPT and notifications stay on `/dev/fuse` (the kernel sends forgets
//! and interrupts there; a notification through the ring is refused), so the
//! `/dev/fuse` workers keep running beside the rings.
//!
//! All the unsafe code of this feature is in this module.

use std::alloc::Layout;
use std::io;
use std::os::fd::AsFd;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::time::Duration;

use io_uring::IoUring;
use io_uring::cqueue;
use io_uring::opcode;
use io_uring::squeue;
use io_uring::types;
use log::debug;
use log::error;
use log::warn;
use parking_lot::Condvar;
use parking_lot::Mutex;

use crate::Filesystem;
use crate::channel::Channel;
use crate::channel::ChannelSender;
use crate::ll::Operation;
use crate::request::RequestWithSender;
use crate::session::SessionEventLoop;

/// Whether to serve requests through io_uring.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum IoUringMode {
    /// `/dev/fuse` only.
    #[default]
    Off,
    /// io_uring when the kernel offers it (`FUSE_OVER_IO_URING` in INIT), else `/dev/fuse`.
    Auto,
    /// io_uring or fail the mount.
    On,
}

/// `enum fuse_uring_cmd` (include/uapi/linux/fuse.h).
const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;

/// `struct fuse_uring_req_header`: in/out header (128), per-op header (128),
/// `struct fuse_uring_ent_in_out` (32).
const HEADER_SZ: usize = 288;
const OP_IN_OFF: usize = 128;
const OP_IN_MAX: usize = 128;
const ENT_IN_OUT_OFF: usize = 256;
const IN_HEADER_SZ: usize = 40; // struct fuse_in_header
const OUT_HEADER_SZ: usize = 16; // struct fuse_out_header
/// `FUSE_MIN_READ_BUFFER` (fs/fuse/fuse_i.h): the kernel's floor for the payload size.
const MIN_PAYLOAD: usize = 8192;
/// Room kept in front of the registered payload so that the in header and the per-op
/// header can be copied right before the payload, which makes the request one contiguous
/// slice for the parser without copying the payload. A multiple of 8 (header alignment).
const PREFIX: usize = 256;
/// Byte offset of `len` in `struct io_uring_sqe` (the io-uring crate's `UringCmd80`
/// builder sets `addr` but not `len`; the FUSE register command needs `len` = 2 iovecs).
const SQE_LEN_OFF: usize = 24;
/// How long one wait for a completion lasts before the worker looks at the stop flag.
const WAIT_SLICE: Duration = Duration::from_secs(1);
/// Retries of a command the kernel answered with EAGAIN/EINTR (bounded: never spin).
const MAX_RETRIES: u32 = 100;

/// The payload size the kernel requires of every entry (`fuse_uring_create`):
/// at least `FUSE_MIN_READ_BUFFER`, `max_write` and `max_pages` pages.
pub(crate) fn payload_size(max_write: u32, max_pages: u16) -> usize {
    let pages = usize::from(max_pages) * page_size::get();
    MIN_PAYLOAD.max(max_write as usize).max(pages)
}

/// Number of queues the kernel expects: one per possible CPU.
pub(crate) fn nr_queues() -> usize {
    std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| count_cpu_list(s.trim()))
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Count of CPUs in a list such as `0-3,8,10-11`.
fn count_cpu_list(s: &str) -> Option<usize> {
    let mut n = 0usize;
    for part in s.split(',') {
        n += match part.split_once('-') {
            Some((a, b)) => {
                b.parse::<usize>()
                    .ok()?
                    .checked_sub(a.parse::<usize>().ok()?)?
                    + 1
            }
            None => {
                part.parse::<usize>().ok()?;
                1
            }
        };
    }
    (n > 0).then_some(n)
}

/// A zeroed, page-aligned heap buffer whose address the kernel is given. Only ever
/// accessed through the methods below, while the kernel is not writing it (between a
/// completion and the next submission of the same entry).
struct KernelBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the buffer is plain memory owned by one worker; the raw pointer is not shared
// with another thread of this process.
unsafe impl Send for KernelBuf {}

impl KernelBuf {
    fn new(len: usize) -> io::Result<Self> {
        let layout = Layout::from_size_align(len, page_size::get())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: `layout` has a non-zero size (callers pass at least HEADER_SZ).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        Ok(Self { ptr, layout })
    }

    fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The whole buffer.
    ///
    /// # Safety
    /// The kernel must not be writing the buffer: the entry is in userspace (its request
    /// arrived and its next command is not yet submitted), or was never registered.
    unsafe fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr/len come from one live allocation, zero-initialised; the caller
        // guarantees the kernel does not write it meanwhile, and &mut self excludes
        // other references from this process.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl KernelBuf {
    /// A shared view of `range` only, so that a reply may be written past it meanwhile.
    ///
    /// # Safety
    /// As for `bytes_mut`, and nothing may write `range` while the slice lives.
    unsafe fn region(&self, range: std::ops::Range<usize>) -> &[u8] {
        assert!(range.start <= range.end && range.end <= self.layout.size());
        // SAFETY: in bounds of the live allocation (asserted); the caller guarantees no
        // writer of this range while the slice lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(range.start), range.len()) }
    }
}

impl Drop for KernelBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once. The ring that knew
        // the address is dropped first (field order in `Worker`), so the kernel no longer
        // holds a command that points here.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// One worker's ring with its single entry.
pub(crate) struct Worker {
    // Field order matters: the ring (and with it any command the kernel still holds)
    // is dropped before the buffers it points into.
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    iov: Box<[libc::iovec; 2]>,
    header: KernelBuf,
    payload: KernelBuf,
    payload_sz: usize,
    qid: u16,
}

// SAFETY: the iovec array holds pointers into this worker's own buffers; a Worker moves
// to its thread once and is used there only.
unsafe impl Send for Worker {}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").field("qid", &self.qid).finish()
    }
}

/// The rings made before INIT is answered (so that a failure there can still refuse
/// `FUSE_OVER_IO_URING` instead of leaving the kernel waiting for registrations).
#[derive(Debug)]
pub(crate) struct UringPool {
    workers: Vec<Worker>,
}

impl UringPool {
    /// `workers_per_queue` rings for each of the kernel's queues, buffers of `payload_sz`.
    pub(crate) fn prepare(workers_per_queue: usize, payload_sz: usize) -> io::Result<Self> {
        let queues = nr_queues();
        let Ok(_) = u16::try_from(queues) else {
            return Err(io::Error::other(format!(
                "{queues} CPUs: more queues than FUSE allows"
            )));
        };
        let mut workers = Vec::with_capacity(queues * workers_per_queue);
        for qid in 0..queues {
            for _ in 0..workers_per_queue.max(1) {
                workers.push(Worker::new(qid as u16, payload_sz)?);
            }
        }
        Ok(Self { workers })
    }

    pub(crate) fn into_workers(self) -> Vec<Worker> {
        self.workers
    }

    pub(crate) fn len(&self) -> usize {
        self.workers.len()
    }
}

impl Worker {
    fn new(qid: u16, payload_sz: usize) -> io::Result<Self> {
        // 2 SQEs: at most one command of the entry is ever in flight, plus slack.
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder().build(2)?;
        let header = KernelBuf::new(page_size::get().max(HEADER_SZ))?;
        let payload = KernelBuf::new(PREFIX + payload_sz)?;
        let iov = Box::new([
            libc::iovec {
                iov_base: header.as_ptr().cast(),
                iov_len: HEADER_SZ,
            },
            libc::iovec {
                // SAFETY: PREFIX < the allocation's size (PREFIX + payload_sz).
                iov_base: unsafe { payload.as_ptr().add(PREFIX) }.cast(),
                iov_len: payload_sz,
            },
        ]);
        Ok(Self {
            ring,
            iov,
            header,
            payload,
            payload_sz,
            qid,
        })
    }

    /// `struct fuse_uring_cmd_req` in the SQE's 80-byte command area.
    fn cmd(&self, commit_id: u64) -> [u8; 80] {
        let mut cmd = [0u8; 80];
        cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
        cmd[16..18].copy_from_slice(&self.qid.to_ne_bytes());
        cmd
    }

    fn push(&mut self, dev: i32, cmd_op: u32, commit_id: u64) -> io::Result<()> {
        let mut op = opcode::UringCmd80::new(types::Fd(dev), cmd_op).cmd(self.cmd(commit_id));
        if cmd_op == CMD_REGISTER {
            op = op.addr(Some(self.iov.as_ptr() as u64));
        }
        let mut sqe = op.build().user_data(u64::from(cmd_op));
        if cmd_op == CMD_REGISTER {
            // SAFETY: Entry128 is #[repr(C)] over the kernel's 128-byte io_uring_sqe
            // (checked below); `len` is the u32 at byte 24 of struct io_uring_sqe.
            unsafe {
                const _: () = assert!(std::mem::size_of::<squeue::Entry128>() == 128);
                let p = (&mut sqe as *mut squeue::Entry128)
                    .cast::<u8>()
                    .add(SQE_LEN_OFF);
                p.cast::<u32>().write_unaligned(2);
            }
        }
        // SAFETY: the SQE points at `self.iov` and the buffers, which live as long as
        // the ring (same struct, dropped after it).
        unsafe { self.ring.submission().push(&sqe) }
            .map_err(|_| io::Error::other("io_uring submission queue full"))
    }

    /// Submit what is queued and wait up to WAIT_SLICE for a completion.
    fn wait(&mut self) -> io::Result<Option<i32>> {
        let ts = types::Timespec::from(WAIT_SLICE);
        let args = types::SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) => {}
            Err(e) => return Err(e),
        }
        Ok(self.ring.completion().next().map(|c| c.result()))
    }

    /// Lay the request out contiguously (in header, per-op header, payload) in front of
    /// the payload and return its range in the payload buffer, plus its commit id.
    fn request_range(&mut self) -> Result<(std::ops::Range<usize>, u64, u64), String> {
        let payload_cap = self.payload_sz;
        // SAFETY: called right after a successful completion: the entry is in userspace.
        let header = unsafe { self.header.bytes_mut() };
        let len = u32::from_ne_bytes(header[0..4].try_into().unwrap_or_default()) as usize;
        let unique = u64::from_ne_bytes(header[8..16].try_into().unwrap_or_default());
        let ent = &header[ENT_IN_OUT_OFF..ENT_IN_OUT_OFF + 32];
        let commit_id = u64::from_ne_bytes(ent[8..16].try_into().unwrap_or_default());
        let payload_len = u32::from_ne_bytes(ent[16..20].try_into().unwrap_or_default()) as usize;
        let op_len = len
            .checked_sub(IN_HEADER_SZ + payload_len)
            .ok_or("length below its parts")?;
        if op_len > OP_IN_MAX || payload_len > payload_cap || commit_id == 0 {
            return Err(format!(
                "bad ring request: len {len} payload {payload_len} commit {commit_id}"
            ));
        }
        let mut in_hdr = [0u8; IN_HEADER_SZ + OP_IN_MAX];
        in_hdr[..IN_HEADER_SZ].copy_from_slice(&header[..IN_HEADER_SZ]);
        in_hdr[IN_HEADER_SZ..IN_HEADER_SZ + op_len]
            .copy_from_slice(&header[OP_IN_OFF..OP_IN_OFF + op_len]);
        let start = PREFIX - op_len - IN_HEADER_SZ;
        // SAFETY: as above, the kernel is done with this entry until the next commit.
        let payload = unsafe { self.payload.bytes_mut() };
        payload[start..PREFIX].copy_from_slice(&in_hdr[..IN_HEADER_SZ + op_len]);
        Ok((start..PREFIX + payload_len, commit_id, unique))
    }

    /// A reply whose `len` argument bytes are already in the payload: the out header.
    fn put_direct_reply(&mut self, out: &[u8; OUT_HEADER_SZ], len: usize) {
        // SAFETY: the entry is in userspace until the COMMIT_AND_FETCH pushed after this.
        let header = unsafe { self.header.bytes_mut() };
        header[..OUT_HEADER_SZ].copy_from_slice(out);
        header[ENT_IN_OUT_OFF + 16..ENT_IN_OUT_OFF + 20]
            .copy_from_slice(&(len as u32).to_ne_bytes());
    }

    /// Copy a reply (out header + arguments, as for `/dev/fuse`) into the entry.
    fn put_reply(&mut self, reply: &[u8], unique: u64) {
        let cap = self.payload_sz;
        // SAFETY: the entry is in userspace until the COMMIT_AND_FETCH pushed after this.
        let header = unsafe { self.header.bytes_mut() };
        let (out, args) = if reply.len() >= OUT_HEADER_SZ && reply.len() - OUT_HEADER_SZ <= cap {
            reply.split_at(OUT_HEADER_SZ)
        } else {
            error!(
                "io_uring reply of {} bytes does not fit the ring buffer: EIO",
                reply.len()
            );
            header[..4].copy_from_slice(&(OUT_HEADER_SZ as u32).to_ne_bytes());
            header[4..8].copy_from_slice(&(-libc::EIO).to_ne_bytes());
            header[8..16].copy_from_slice(&unique.to_ne_bytes());
            header[ENT_IN_OUT_OFF + 16..ENT_IN_OUT_OFF + 20].copy_from_slice(&0u32.to_ne_bytes());
            return;
        };
        header[..OUT_HEADER_SZ].copy_from_slice(out);
        header[ENT_IN_OUT_OFF + 16..ENT_IN_OUT_OFF + 20]
            .copy_from_slice(&(args.len() as u32).to_ne_bytes());
        // SAFETY: as above.
        let payload = unsafe { self.payload.bytes_mut() };
        payload[PREFIX..PREFIX + args.len()].copy_from_slice(args);
    }
}

/// Where a reply to a ring request goes: the worker waits on it after dispatch and
/// copies it into its entry.
#[derive(Debug, Default)]
pub(crate) struct ReplySlot {
    reply: Mutex<Option<Reply>>,
    ready: Condvar,
    /// Where the reply's arguments may be written straight away: the entry's payload,
    /// when the request has none (READ, GETATTR, ...) so that the request's own bytes
    /// are not there. Taken by the first reply.
    direct: Mutex<Option<Direct>>,
    /// The last reply's buffer, reused (a read reply of up to max_write bytes would
    /// otherwise be a fresh large allocation, i.e. an mmap, per request).
    spare: Mutex<Vec<u8>>,
}

/// A reply as the worker receives it.
#[derive(Debug)]
enum Reply {
    /// Out header and arguments, to be copied into the entry.
    Copied(Vec<u8>),
    /// Out header; the `len` argument bytes are already in the entry's payload.
    Direct([u8; OUT_HEADER_SZ], usize),
}

/// The entry's payload area, for a reply written in place.
#[derive(Debug)]
struct Direct {
    ptr: *mut u8,
    cap: usize,
}

// SAFETY: points into the worker's payload buffer, which outlives the request; only the
// one reply of the request writes through it (see `ReplySlot::direct`), and the worker
// reads what it wrote only after taking the reply under the slot's lock.
unsafe impl Send for Direct {}

/// The reply sender of a ring request (with the `/dev/fuse` sender for backing ids).
#[derive(Debug, Clone)]
pub(crate) struct UringSender {
    pub(crate) slot: Arc<ReplySlot>,
    pub(crate) dev: ChannelSender,
}

impl UringSender {
    pub(crate) fn send(&self, data: &[io::IoSlice<'_>]) -> io::Result<()> {
        let total: usize = data.iter().map(|d| d.len()).sum();
        let direct = self.slot.direct.lock().take();
        let reply = match direct {
            Some(area) if total >= OUT_HEADER_SZ && total - OUT_HEADER_SZ <= area.cap => {
                let mut header = [0u8; OUT_HEADER_SZ];
                let mut skip = OUT_HEADER_SZ;
                let mut off = 0usize;
                for slice in data {
                    let (head, args) = slice.split_at(skip.min(slice.len()));
                    header[OUT_HEADER_SZ - skip..OUT_HEADER_SZ - skip + head.len()]
                        .copy_from_slice(head);
                    skip -= head.len();
                    // SAFETY: off + args.len() <= total - OUT_HEADER_SZ <= area.cap: inside
                    // the payload area. The request's own bytes are not there (`direct` is
                    // offered only for requests without payload), the worker does not touch
                    // the area until it takes this reply, the kernel not until the commit;
                    // `args` is the caller's memory, so the two do not overlap.
                    unsafe {
                        std::ptr::copy_nonoverlapping(args.as_ptr(), area.ptr.add(off), args.len())
                    };
                    off += args.len();
                }
                Reply::Direct(header, off)
            }
            _ => {
                let mut v = std::mem::take(&mut *self.slot.spare.lock());
                v.clear();
                v.reserve(total);
                for d in data {
                    v.extend_from_slice(d);
                }
                Reply::Copied(v)
            }
        };
        let mut r = self.slot.reply.lock();
        if r.is_some() {
            warn!("second reply to one io_uring request ignored");
            return Ok(());
        }
        *r = Some(reply);
        self.slot.ready.notify_one();
        Ok(())
    }
}

impl ReplySlot {
    /// Wait for the reply; bounded slices, logging if a reply is late.
    fn take(&self) -> Reply {
        let mut r = self.reply.lock();
        let mut waited = 0u32;
        loop {
            if let Some(v) = r.take() {
                return v;
            }
            if self.ready.wait_for(&mut r, WAIT_SLICE).timed_out() {
                waited += 1;
                if waited % 60 == 0 {
                    warn!("io_uring worker still waiting for a reply after {waited} s");
                }
            }
        }
    }
}

/// Serve requests on one ring until the connection ends.
pub(crate) fn run_worker<FS: Filesystem>(
    mut w: Worker,
    se: SessionEventLoop<FS>,
    dev: Channel,
    stop: Arc<AtomicBool>,
) -> io::Result<()> {
    let fd = dev.as_fd().as_raw_fd();
    pin_to_cpu(w.qid);
    let slot = Arc::new(ReplySlot::default());
    let sender = UringSender {
        slot: slot.clone(),
        dev: dev.sender(),
    };
    let (mut last_op, mut last_commit) = (CMD_REGISTER, 0u64);
    w.push(fd, CMD_REGISTER, 0)?;
    let mut retries = 0u32;
    let mut registered = false;
    loop {
        let Some(res) = w.wait()? else {
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            continue;
        };
        if res == -libc::EAGAIN || res == -libc::EINTR {
            retries += 1;
            if retries > MAX_RETRIES {
                ring_failed(w.qid, registered, -res);
            }
            std::thread::sleep(Duration::from_millis(10));
            w.push(fd, last_op, last_commit)?;
            continue;
        }
        retries = 0;
        if res < 0 {
            let errno = -res;
            if matches!(errno, libc::ENOTCONN | libc::ECONNABORTED | libc::ENODEV) {
                debug!("io_uring queue {} ends: connection closed", w.qid);
                return Ok(());
            }
            if !registered {
                // The kernel dropped io_uring for the connection and serves /dev/fuse.
                warn!(
                    "io_uring register failed on queue {} (errno {errno}); serving /dev/fuse",
                    w.qid
                );
                return Ok(());
            }
            ring_failed(w.qid, registered, errno);
        }
        registered = true;
        let commit = serve_one(&mut w, &se, &sender, &slot);
        (last_op, last_commit) = (CMD_COMMIT_AND_FETCH, commit);
        w.push(fd, CMD_COMMIT_AND_FETCH, commit)?;
    }
}

/// A committed command the kernel refused: the entry is lost and its queue could stall,
/// so the daemon stops (the kernel then fails the mount's requests with ENOTCONN instead
/// of leaving callers waiting).
fn ring_failed(qid: u16, registered: bool, errno: i32) -> ! {
    error!(
        "io_uring queue {qid} failed (errno {errno}, registered {registered}); aborting the daemon"
    );
    std::process::abort()
}

/// Run one request from the entry and put its reply there; returns the commit id.
fn serve_one<FS: Filesystem>(
    w: &mut Worker,
    se: &SessionEventLoop<FS>,
    sender: &UringSender,
    slot: &ReplySlot,
) -> u64 {
    let (range, commit_id, unique) = match w.request_range() {
        Ok(r) => r,
        Err(msg) => {
            error!("{msg}");
            // SAFETY: the entry is in userspace (a request arrived).
            let header = unsafe { w.header.bytes_mut() };
            let commit = u64::from_ne_bytes(
                header[ENT_IN_OUT_OFF + 8..ENT_IN_OUT_OFF + 16]
                    .try_into()
                    .unwrap_or_default(),
            );
            let unique = u64::from_ne_bytes(header[8..16].try_into().unwrap_or_default());
            w.put_reply(&errno_reply(unique, libc::EIO), unique);
            return commit;
        }
    };
    if range.end == PREFIX {
        // SAFETY: PREFIX < the payload allocation's size (PREFIX + payload_sz).
        let ptr = unsafe { w.payload.as_ptr().add(PREFIX) };
        *slot.direct.lock() = Some(Direct {
            ptr,
            cap: w.payload_sz,
        });
    }
    {
        // SAFETY: the entry is in userspace; only the request's range is borrowed (a
        // direct reply writes after it), and the slice is dropped before the reply is
        // put into the entry.
        let in_place = unsafe { w.payload.region(range) };
        // The parser needs the in header 8-byte aligned; every per-op header the kernel
        // sends is a multiple of 8 bytes, so this copy is for a kernel that breaks that.
        let mut aligned: Vec<u64> = Vec::new();
        let data = if (in_place.as_ptr() as usize) % std::mem::align_of::<u64>() == 0 {
            in_place
        } else {
            aligned.resize(in_place.len().div_ceil(8), 0);
            let bytes: &mut [u8] = zerocopy::IntoBytes::as_mut_bytes(aligned.as_mut_slice());
            bytes[..in_place.len()].copy_from_slice(in_place);
            &bytes[..in_place.len()]
        };
        match RequestWithSender::new_uring(sender.clone(), data) {
            Some(req) => {
                if let Ok(Operation::Destroy(_)) = req.request.operation() {
                    req.reply::<crate::ReplyEmpty>().ok();
                } else {
                    req.dispatch(se);
                }
            }
            None => {
                let _ = sender.send(&[io::IoSlice::new(&errno_reply(unique, libc::EIO))]);
            }
        }
    }
    *slot.direct.lock() = None;
    match slot.take() {
        Reply::Copied(reply) => {
            w.put_reply(&reply, unique);
            *slot.spare.lock() = reply;
        }
        Reply::Direct(header, len) => w.put_direct_reply(&header, len),
    }
    commit_id
}

fn errno_reply(unique: u64, errno: i32) -> [u8; OUT_HEADER_SZ] {
    let mut b = [0u8; OUT_HEADER_SZ];
    b[..4].copy_from_slice(&(OUT_HEADER_SZ as u32).to_ne_bytes());
    b[4..8].copy_from_slice(&(-errno).to_ne_bytes());
    b[8..16].copy_from_slice(&unique.to_ne_bytes());
    b
}

/// Requests from CPU n arrive on queue n; serve them on that CPU (as libfuse does).
/// Best effort: a failure only costs locality.
fn pin_to_cpu(qid: u16) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(usize::from(qid)).is_ok() {
        if let Err(e) = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set) {
            debug!("io_uring queue {qid}: cannot pin to its CPU: {e}");
        }
    }
}

#[cfg(test)]
mod test {
    use super::count_cpu_list;
    use super::payload_size;

    #[test]
    fn cpu_lists() {
        assert_eq!(count_cpu_list("0"), Some(1));
        assert_eq!(count_cpu_list("0-1"), Some(2));
        assert_eq!(count_cpu_list("0-3,8,10-11"), Some(7));
        assert_eq!(count_cpu_list(""), None);
        assert_eq!(count_cpu_list("3-1"), None);
    }

    #[test]
    fn payload_floor() {
        assert_eq!(payload_size(4096, 1), 8192);
        assert_eq!(
            payload_size(1 << 20, 256),
            (1 << 20).max(256 * page_size::get())
        );
    }
}
