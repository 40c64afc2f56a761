//! The mount daemon's control channel: how `verlay commit` finds a live mount and pauses
//! its writers.
//!
//! Owns: the unix socket a daemon creates once its mount is live, named after the mount's
//! device number (`st_dev` of the mountpoint, which is what `verlay commit MOUNTPOINT` can
//! learn without the daemon's help), and the one-line JSON protocol spoken over it.
//!
//! Where: `/run/verlay/MAJOR:MINOR.sock` as root, `$XDG_RUNTIME_DIR/verlay/...` rootless
//! (`/tmp/verlay-UID/...` without XDG_RUNTIME_DIR). The directory is 0700 and the socket
//! 0600: only the daemon's own user (or root) may pause its mount. Device numbers of FUSE
//! mounts are reused once a mount is gone, so a daemon replaces a stale socket of that name
//! at start (a killed daemon leaves one), and removes its own at a clean stop.
//!
//! Protocol ([`PROTOCOL_VERSION`] 1): one JSON [`Request`] per line, each answered by one
//! [`Response`] line; both carry the version `v`, and a daemon refuses any other version
//! ([`Refusal::Version`]) before it reads the rest. Requests match exactly (serde, unknown
//! fields refused); a line that is not one is refused with [`Refusal::BadRequest`]. Lines
//! are capped ([`MAX_REQUEST_LINE`], [`MAX_RESPONSE_LINE`]): a longer one ends the
//! connection.
//! - `{"v":1,"op":"info"}` -> [`Reply::Mount`]: the lowers, and the upper unless read-only.
//! - `{"v":1,"op":"stats"}` -> [`Reply::Stats`]: the FUSE requests served so far, per
//!   operation (`bench/roundtrips.sh` counts a workload's round trips with it).
//! - `{"v":1,"op":"freeze"}` -> [`Reply::Frozen`] once the commit gate is held exclusive
//!   ([`Union::freeze`]), with `waited_us`; or [`Refusal::ReadOnly`] /
//!   [`Refusal::PassthroughWriters`]. The gate stays held until the next line or until the
//!   connection ends, so a commit process that dies (kill -9 included) never leaves the mount
//!   frozen. That next line releases the gate whatever it says; only an exact
//!   `{"v":1,"op":"thaw"}` is answered [`Reply::Thawed`] (with `paused_us`), anything else
//!   with a refusal, and the connection ends.
//!
//! Must not: touch the upper (the commit process copies it), or block FUSE workers beyond
//! the gate.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::union::Union;

/// Pause after a failed accept before the next: EMFILE and the like persist for a while,
/// and without the pause the accept loop would spin (and log) until they clear.
const ACCEPT_RETRY_PAUSE: Duration = Duration::from_millis(100);
/// Longest a client may hold a freeze: every writer of the mount waits meanwhile, and a
/// commit copies only the files changed since the last one under it. A client silent for
/// longer is stuck (stopped, or wedged on its disk); the mount thaws, and its `thaw` is
/// answered with a refusal, so the commit publishes nothing.
const MAX_FREEZE: Duration = Duration::from_secs(600);

/// The version of the protocol this daemon and this client speak.
pub const PROTOCOL_VERSION: u32 = 1;
/// Longest request line the daemon reads: requests are a few dozen bytes.
pub const MAX_REQUEST_LINE: usize = 4096;
/// Longest answer line the client reads: an answer lists the lower paths (up to PATH_MAX,
/// 4 KiB, each), so this allows thousands of lowers.
pub const MAX_RESPONSE_LINE: usize = 16 << 20;

/// What a client asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// describe the mount
    Info,
    /// the FUSE requests served so far
    Stats,
    /// hold the commit gate until the next line
    Freeze,
    /// the line that ends a freeze
    Thaw,
}

/// One request line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// [`PROTOCOL_VERSION`]
    pub v: u32,
    /// what is asked
    pub op: Op,
}

/// One answer line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Response {
    /// [`PROTOCOL_VERSION`]
    pub v: u32,
    /// the answer
    pub reply: Reply,
}

/// The answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// to `info`
    Mount(MountDesc),
    /// to `freeze`: the gate is held from now until the next line
    Frozen {
        /// the mount, as `info` describes it
        mount: MountDesc,
        /// how long taking the gate waited for running changes
        waited_us: u64,
    },
    /// to `stats`
    Stats {
        /// requests served per operation (`getxattr_capability` and `getxattr_acl` are the
        /// GETXATTRs of `security.capability` and `system.posix_acl_*`), since the daemon
        /// started; operations never asked are left out
        requests: std::collections::BTreeMap<String, u64>,
    },
    /// to the `thaw` that ended a freeze
    Thawed {
        /// how long the gate was held
        paused_us: u64,
    },
    /// the request was not carried out
    Refused(Refusal),
}

/// Why a request was not carried out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// `freeze` on a mount without an upper
    ReadOnly,
    /// `freeze` while files opened for writing bypass the daemon (FUSE passthrough)
    PassthroughWriters {
        /// how many
        count: u64,
    },
    /// the mount's session ended
    Unmounted,
    /// the request's `v` is not [`PROTOCOL_VERSION`]
    Version {
        /// the version asked for
        got: u32,
        /// the version this daemon speaks
        speaks: u32,
    },
    /// the client held the freeze longer than the daemon allows; writers resumed
    FreezeTimeout,
    /// the line is not a request (or not the one expected)
    BadRequest {
        /// what is wrong with it
        why: String,
    },
}

/// A mount as its daemon describes it. Paths are sent as (lossy) UTF-8 strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountDesc {
    /// the lower directories, top first
    pub lowers: Vec<String>,
    /// the upper, unless the mount is read-only
    pub upper: Option<UpperDesc>,
}

/// The upper of a mount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpperDesc {
    /// the upper directory
    pub dir: String,
    /// `trusted.overlay.` or `user.overlay.`
    pub xattr_prefix: String,
}

/// Parse one request line: the version first (so a newer client is told the version, not
/// that its request is garbage), then the request, exactly.
pub fn parse_request(line: &[u8]) -> std::result::Result<Op, Refusal> {
    #[derive(Deserialize)]
    struct Versioned {
        v: u32,
    }
    let bad = |e: serde_json::Error| Refusal::BadRequest { why: e.to_string() };
    let Versioned { v } = serde_json::from_slice(line).map_err(bad)?;
    if v != PROTOCOL_VERSION {
        return Err(Refusal::Version {
            got: v,
            speaks: PROTOCOL_VERSION,
        });
    }
    let req: Request = serde_json::from_slice(line).map_err(bad)?;
    Ok(req.op)
}

/// Read one line of at most `max` bytes (newline not counted); `None` at the end of the
/// stream. A longer line is an `InvalidData` error: the reader stops there, so a peer
/// cannot make it buffer without bound.
pub fn read_line(r: &mut impl BufRead, max: usize) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::new();
    let n = std::io::Read::take(&mut *r, max as u64 + 1).read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
    } else if buf.len() > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("control line longer than {max} bytes"),
        ));
    }
    Ok(Some(buf))
}

/// Write one JSON line.
pub fn write_line(w: &mut impl Write, v: &impl Serialize) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(v).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line)
}

/// The directory of control sockets for this user.
pub fn socket_dir() -> PathBuf {
    let uid = rustix::process::geteuid();
    if uid.is_root() {
        return PathBuf::from("/run/verlay");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("verlay"),
        _ => PathBuf::from(format!("/tmp/verlay-{}", uid.as_raw())),
    }
}

/// The control socket of the mount whose device number is `dev`.
pub fn socket_path(dev: u64) -> PathBuf {
    socket_dir().join(format!(
        "{}:{}.sock",
        rustix::fs::major(dev),
        rustix::fs::minor(dev)
    ))
}

/// One line of `/proc/self/mountinfo`, the fields verlay needs.
#[derive(Debug, Clone)]
pub struct MountInfo {
    /// st_dev of the files in the mount
    pub dev: u64,
    /// where it is mounted (unescaped)
    pub mount_point: PathBuf,
    /// e.g. `fuse.verlay`
    pub fstype: String,
}

/// Undo mountinfo's octal escapes (`\040` for a space, ...).
fn unescape_mountinfo(s: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// The mounts of this process's namespace, in mount order (a later line for the same
/// mount point is mounted on top of an earlier one).
pub fn mounts() -> Result<Vec<MountInfo>> {
    let p = Path::new("/proc/self/mountinfo");
    let text = std::fs::read_to_string(p).map_err(|e| Error::io("read mountinfo", p, e))?;
    let mut out = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let Some(sep) = f.iter().position(|x| *x == "-") else {
            continue;
        };
        if f.len() < 5 || sep + 1 >= f.len() {
            continue;
        }
        let Some((maj, min)) = f[2].split_once(':') else {
            continue;
        };
        let (Ok(maj), Ok(min)) = (maj.parse::<u32>(), min.parse::<u32>()) else {
            continue;
        };
        out.push(MountInfo {
            dev: rustix::fs::makedev(maj, min),
            mount_point: unescape_mountinfo(f[4]),
            fstype: f[sep + 1].to_string(),
        });
    }
    Ok(out)
}

/// The control socket of a running daemon. Dropping it removes the socket file.
#[derive(Debug)]
pub struct ControlSocket {
    path: PathBuf,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Create the control socket of the mount at `mountpoint` (live: `fuser::Session::new` has
/// returned) and serve it on a thread. Failing is not fatal for the mount: the caller logs
/// it and `verlay commit` then says the mount has no control channel.
pub fn serve(union: Arc<Union>, mountpoint: &Path) -> Result<ControlSocket> {
    // Our own mount is the last one listed at this mount point. Asking stat(2) would send a
    // request to ourselves before the session serves any.
    let dev = mounts()?
        .into_iter()
        .rev()
        .find(|m| m.mount_point == mountpoint && m.fstype.starts_with("fuse"))
        .map(|m| m.dev)
        .ok_or_else(|| {
            Error::io(
                "control.find_mount",
                mountpoint,
                std::io::Error::other("not in /proc/self/mountinfo"),
            )
        })?;
    let dir = socket_dir();
    std::fs::create_dir_all(&dir).map_err(|e| Error::io("control.mkdir", &dir, e))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::io("control.chmod", &dir, e))?;
    let path = socket_path(dev);
    // Bind under a temp name and rename over the final one: a stale socket of a killed
    // daemon (same device number, reused) is replaced in one step.
    let tmp = dir.join(format!(".{}.{}", std::process::id(), rustix::fs::minor(dev)));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(|e| Error::io("control.bind", &tmp, e))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io("control.chmod", &tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::io("control.publish", &path, e))?;
    info!(path = %path.display(), "control socket ready");
    // Weak: the union (and with it the upper's lock) must go when the session ends, not
    // when this thread does; a remount right after the unmount needs that lock.
    let union = Arc::downgrade(&union);
    std::thread::Builder::new()
        .name("verlay-control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    // A thread per client: one that sits idle must not keep another from
                    // being answered. Freezes still come one at a time (the gate).
                    Ok(c) => {
                        let union = union.clone();
                        let spawned = std::thread::Builder::new()
                            .name("verlay-control-client".into())
                            .spawn(move || {
                                if let Err(e) = serve_one(&union, c) {
                                    warn!(error = %e, "control connection failed");
                                }
                            });
                        if let Err(e) = spawned {
                            warn!(error = %e, "no thread for a control connection");
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "control socket accept failed");
                        std::thread::sleep(ACCEPT_RETRY_PAUSE);
                    }
                }
            }
        })
        .map_err(|e| Error::io("control.thread", &path, e))?;
    Ok(ControlSocket { path })
}

/// What a client needs to know about the mount.
fn describe(union: &Union) -> MountDesc {
    MountDesc {
        lowers: union
            .lowers
            .iter()
            .map(|l| l.path.to_string_lossy().into_owned())
            .collect(),
        upper: union.upper.as_ref().map(|up| UpperDesc {
            dir: up.dir.path.to_string_lossy().into_owned(),
            xattr_prefix: up.xattr_prefix.to_string(),
        }),
    }
}

fn send(w: &mut UnixStream, reply: Reply) -> std::io::Result<()> {
    write_line(
        w,
        &Response {
            v: PROTOCOL_VERSION,
            reply,
        },
    )
}

fn refuse(w: &mut UnixStream, r: Refusal) -> std::io::Result<()> {
    send(w, Reply::Refused(r))
}

fn serve_one(union: &Weak<Union>, conn: UnixStream) -> std::io::Result<()> {
    let mut w = conn.try_clone()?;
    let mut r = BufReader::new(conn);
    loop {
        let line = match read_line(&mut r, MAX_REQUEST_LINE) {
            Ok(Some(l)) => l,
            Ok(None) => return Ok(()),
            // Too long: the rest of it cannot be told from the next request.
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                return refuse(&mut w, Refusal::BadRequest { why: e.to_string() })
            }
            Err(e) => return Err(e),
        };
        // Held for one request only (a freeze included): an idle client must not keep the
        // union, and the upper's lock, alive after the session ended.
        let Some(union) = union.upgrade() else {
            return refuse(&mut w, Refusal::Unmounted);
        };
        match parse_request(&line) {
            Ok(Op::Info) => send(&mut w, Reply::Mount(describe(&union)))?,
            Ok(Op::Stats) => send(
                &mut w,
                Reply::Stats {
                    requests: crate::fuse::request_counts(),
                },
            )?,
            Ok(Op::Freeze) => {
                if !hold_freeze(&union, &mut w, &mut r)? {
                    return Ok(());
                }
            }
            Ok(Op::Thaw) => refuse(
                &mut w,
                Refusal::BadRequest {
                    why: "thaw without a freeze".into(),
                },
            )?,
            Err(why) => refuse(&mut w, why)?,
        }
    }
}

/// Answer a freeze: hold the gate until the next line (or the end of the connection),
/// then release it. Returns whether the connection goes on.
fn hold_freeze(union: &Union, w: &mut UnixStream, r: &mut BufReader<UnixStream>) -> std::io::Result<bool> {
    if union.upper.is_none() {
        refuse(w, Refusal::ReadOnly)?;
        return Ok(true);
    }
    let asked = Instant::now();
    let frozen = union.freeze();
    // Writable opens hold the gate, so no new passthrough writer appears now; those
    // already open write straight to the upper file and cannot be paused.
    let bypassing = union.passthrough_writers();
    if bypassing > 0 {
        drop(frozen);
        refuse(
            w,
            Refusal::PassthroughWriters {
                count: bypassing as u64,
            },
        )?;
        return Ok(false);
    }
    let held = Instant::now();
    crate::failpoint::crash_point("gate.freeze");
    let sent = send(
        w,
        Reply::Frozen {
            mount: describe(union),
            waited_us: held.duration_since(asked).as_micros() as u64,
        },
    );
    // Held until the client's next line, or until it is gone (EOF, error, or a send that
    // failed because it died).
    // Between requests a client may idle as long as it likes (it holds nothing); a frozen
    // mount waits for its thaw at most MAX_FREEZE.
    let next = if sent.is_ok() {
        r.get_ref().set_read_timeout(Some(MAX_FREEZE))?;
        let got = read_line(r, MAX_REQUEST_LINE);
        r.get_ref().set_read_timeout(None)?;
        got
    } else {
        Ok(None)
    };
    drop(frozen);
    let paused = held.elapsed();
    crate::failpoint::crash_point("gate.thaw");
    info!(
        step = "commit.thaw",
        paused_us = paused.as_micros() as u64,
        "writers resumed after a commit's freeze"
    );
    let next = match next {
        Ok(Some(next)) => next,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            warn!(
                step = "commit.thaw",
                paused_us = paused.as_micros() as u64,
                "a commit held the freeze past its limit; writers resumed"
            );
            refuse(w, Refusal::FreezeTimeout)?;
            return Ok(false);
        }
        Ok(None) | Err(_) => return Ok(false),
    };
    match parse_request(&next) {
        Ok(Op::Thaw) => {
            send(
                w,
                Reply::Thawed {
                    paused_us: paused.as_micros() as u64,
                },
            )?;
            Ok(true)
        }
        Ok(op) => {
            refuse(
                w,
                Refusal::BadRequest {
                    why: format!("expected thaw after freeze, got {op:?}"),
                },
            )?;
            Ok(false)
        }
        Err(why) => {
            refuse(w, why)?;
            Ok(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo("/a\\040b"), PathBuf::from("/a b"));
        assert_eq!(unescape_mountinfo("/a\\134b"), PathBuf::from("/a\\b"));
        assert_eq!(unescape_mountinfo("/plain"), PathBuf::from("/plain"));
    }

    /// A real union (a lower, an upper) served on one end of a socket pair; the other end
    /// is the client, with a read timeout as the watchdog.
    struct Served {
        _tmp: tempfile::TempDir,
        union: Arc<Union>,
        client: BufReader<UnixStream>,
        server: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    }

    fn served() -> Served {
        let tmp = tempfile::tempdir().unwrap();
        let (lower, upper, work) = (tmp.path().join("l"), tmp.path().join("u"), tmp.path().join("w"));
        for d in [&lower, &upper, &work] {
            std::fs::create_dir(d).unwrap();
        }
        let layers = vec![crate::layer::LayerDir::open(&lower, 1, "lower0".into()).unwrap()];
        let up = crate::upper::Upper::open(&upper, &work, false).unwrap();
        let union = Arc::new(Union::new(layers, Some(up), Default::default()).unwrap());
        let (client, server) = UnixStream::pair().unwrap();
        client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let weak = Arc::downgrade(&union);
        let server = std::thread::spawn(move || serve_one(&weak, server));
        Served {
            _tmp: tmp,
            union,
            client: BufReader::new(client),
            server: Some(server),
        }
    }

    impl Served {
        /// Send one raw line, read the answer (None: the daemon closed the connection).
        fn ask(&mut self, line: &[u8]) -> Option<Reply> {
            let mut l = line.to_vec();
            l.push(b'\n');
            self.client.get_mut().write_all(&l).unwrap();
            let answer = read_line(&mut self.client, MAX_RESPONSE_LINE).unwrap()?;
            let r: Response = serde_json::from_slice(&answer).unwrap();
            assert_eq!(r.v, PROTOCOL_VERSION);
            Some(r.reply)
        }

        fn closed(&mut self) -> bool {
            let ended = read_line(&mut self.client, MAX_RESPONSE_LINE).unwrap().is_none();
            self.server.take().unwrap().join().unwrap().unwrap();
            ended
        }

        /// The gate is free: a freeze from here is taken at once.
        fn assert_thawed(&self) {
            let (tx, rx) = std::sync::mpsc::channel();
            let u = self.union.clone();
            std::thread::spawn(move || {
                drop(u.freeze());
                let _ = tx.send(());
            });
            rx.recv_timeout(Duration::from_secs(10))
                .expect("the commit gate is still held");
        }
    }

    fn bad_request(r: Option<Reply>) -> String {
        match r {
            Some(Reply::Refused(Refusal::BadRequest { why })) => why,
            other => panic!("not a bad-request refusal: {other:?}"),
        }
    }

    #[test]
    fn unknown_protocol_version_is_refused() {
        let mut s = served();
        assert_eq!(
            s.ask(br#"{"v":2,"op":"info"}"#),
            Some(Reply::Refused(Refusal::Version { got: 2, speaks: 1 }))
        );
        // Refused before the rest is read: a newer client's new op is a version matter.
        assert_eq!(
            s.ask(br#"{"v":2,"op":"snapshot","x":1}"#),
            Some(Reply::Refused(Refusal::Version { got: 2, speaks: 1 }))
        );
        // The connection goes on.
        match s.ask(br#"{"v":1,"op":"info"}"#) {
            Some(Reply::Mount(m)) => {
                assert_eq!(m.lowers.len(), 1);
                assert!(m.upper.unwrap().dir.ends_with("/u"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn stats_are_answered_with_the_request_counts() {
        let mut s = served();
        match s.ask(br#"{"v":1,"op":"stats"}"#) {
            // No FUSE session in this test: whatever was counted, only served operations.
            Some(Reply::Stats { requests }) => assert!(requests.values().all(|n| *n > 0)),
            other => panic!("{other:?}"),
        }
        bad_request(s.ask(br#"{"v":1,"op":"stats","x":1}"#));
    }

    #[test]
    fn garbage_lines_are_refused_with_an_error_reply() {
        let mut s = served();
        for line in [
            &b"garbage"[..],
            b"",
            br#"{"op":"info"}"#,
            br#"{"v":1,"op":"Info"}"#,
            br#"{"v":1,"op":"info","extra":true}"#,
            br#"{"v":1,"op":"xthawx"}"#,
            b"{\"v\":1,\"op\":\"info\"}\xff",
        ] {
            let why = bad_request(s.ask(line));
            assert!(!why.is_empty(), "{}", String::from_utf8_lossy(line));
        }
        // A thaw outside a freeze is refused too.
        bad_request(s.ask(br#"{"v":1,"op":"thaw"}"#));
        assert!(matches!(s.ask(br#"{"v":1,"op":"info"}"#), Some(Reply::Mount(_))));
        // A line over the cap: refused, and the connection ends (no resynchronising).
        let long = vec![b' '; MAX_REQUEST_LINE + 1];
        assert!(bad_request(s.ask(&long)).contains("longer than"));
        assert!(s.closed());
    }

    #[test]
    fn only_an_exact_thaw_is_answered_thawed() {
        let mut s = served();
        assert!(matches!(
            s.ask(br#"{"v":1,"op":"freeze"}"#),
            Some(Reply::Frozen { .. })
        ));
        match s.ask(br#"{"v":1,"op":"thaw"}"#) {
            Some(Reply::Thawed { .. }) => {}
            other => panic!("{other:?}"),
        }
        s.assert_thawed();
        // The next line after a freeze releases the gate whatever it is; a line that only
        // contains "thaw" is refused, not answered as a thaw, and the connection ends.
        assert!(matches!(
            s.ask(br#"{"v":1,"op":"freeze"}"#),
            Some(Reply::Frozen { .. })
        ));
        bad_request(s.ask(b"xthawx"));
        s.assert_thawed();
        assert!(s.closed());
    }

    #[test]
    fn a_freeze_ends_with_the_connection() {
        let mut s = served();
        assert!(matches!(
            s.ask(br#"{"v":1,"op":"freeze"}"#),
            Some(Reply::Frozen { .. })
        ));
        s.client.get_ref().shutdown(std::net::Shutdown::Write).unwrap();
        assert!(s.closed());
        s.assert_thawed();
    }
}
