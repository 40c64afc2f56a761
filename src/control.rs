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
//! Protocol (one JSON object per line, each request answered by one line):
//! - `{"op":"info"}` -> `{"ok":true,"read_only":B,"upper":P,"lowers":[P...],"xattr_prefix":S}`
//! - `{"op":"freeze"}` -> the same once the commit gate is held exclusive ([`Union::freeze`]),
//!   plus `"waited_us"`; or `{"ok":false,"error":"read-only"}`. The gate stays held until
//!   the next line (`{"op":"thaw"}`) or until the connection ends, so a commit process that
//!   dies (kill -9 included) never leaves the mount frozen; the answer to `thaw` carries
//!   `"paused_us"`.
//!
//! Must not: touch the upper (the commit process copies it), or block FUSE workers beyond
//! the gate.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::union::Union;

/// Pause after a failed accept before the next.
const ACCEPT_RETRY_PAUSE: Duration = Duration::from_millis(100);

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
                    // EMFILE and the like persist for a while: without the pause this
                    // loop would spin (and log) until they clear.
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
fn describe(union: &Union) -> Value {
    let lowers: Vec<String> = union
        .lowers
        .iter()
        .map(|l| l.path.to_string_lossy().into_owned())
        .collect();
    match &union.upper {
        Some(up) => json!({
            "ok": true,
            "read_only": false,
            "upper": up.dir.path.to_string_lossy(),
            "lowers": lowers,
            "xattr_prefix": up.xattr_prefix,
        }),
        None => json!({"ok": true, "read_only": true, "lowers": lowers}),
    }
}

fn send(w: &mut UnixStream, v: &Value) -> std::io::Result<()> {
    let mut line = v.to_string();
    line.push('\n');
    w.write_all(line.as_bytes())
}

/// Longest request line read: every request is a few dozen bytes, and a client that sends
/// more must not make the daemon buffer it.
const MAX_REQUEST_LINE: u64 = 4096;
/// Longest a client may hold a freeze: every writer of the mount waits meanwhile, and a
/// commit copies only the files changed since the last one under it. A client silent for
/// longer is stuck (stopped, or wedged on its disk); the mount thaws, and its `thaw` is
/// answered as a failure, so the commit publishes nothing.
const MAX_FREEZE: Duration = Duration::from_secs(600);

/// One line of `r` without its newline: `None` at EOF, an error for a line over `cap`
/// bytes (nothing past the cap is buffered).
fn read_line_capped(r: &mut impl BufRead, cap: u64) -> Option<std::io::Result<String>> {
    let mut line = Vec::new();
    match r.by_ref().take(cap + 1).read_until(b'\n', &mut line) {
        Ok(0) => None,
        Ok(_) if line.last() == Some(&b'\n') => {
            line.pop();
            Some(String::from_utf8(line).map_err(std::io::Error::other))
        }
        Ok(n) if n as u64 > cap => Some(Err(std::io::Error::other(format!(
            "request line longer than {cap} bytes"
        )))),
        // The last line, without a newline before EOF.
        Ok(_) => Some(String::from_utf8(line).map_err(std::io::Error::other)),
        Err(e) => Some(Err(e)),
    }
}

fn serve_one(union: &Weak<Union>, conn: UnixStream) -> std::io::Result<()> {
    let mut w = conn.try_clone()?;
    let reader = conn.try_clone()?;
    let mut lines = BufReader::new(conn);
    let mut next_line = |freeze: bool| {
        // Between requests a client may idle as long as it likes (it holds nothing); a
        // frozen mount waits for its thaw at most MAX_FREEZE.
        reader.set_read_timeout(freeze.then_some(MAX_FREEZE))?;
        read_line_capped(&mut lines, MAX_REQUEST_LINE).transpose()
    };
    while let Some(line) = next_line(false)? {
        let req: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        // Held for one request only (a freeze included): an idle client must not keep the
        // union, and the upper's lock, alive after the session ended.
        let Some(union) = union.upgrade() else {
            return send(&mut w, &json!({"ok": false, "error": "unmounted"}));
        };
        let union = &*union;
        match req.get("op").and_then(Value::as_str) {
            Some("info") => send(&mut w, &describe(union))?,
            Some("freeze") if union.upper.is_none() => {
                send(&mut w, &json!({"ok": false, "error": "read-only"}))?
            }
            Some("freeze") => {
                let asked = Instant::now();
                let frozen = union.freeze();
                // Writable opens hold the gate, so no new passthrough writer appears now; those
                // already open write straight to the upper file and cannot be paused.
                let bypassing = union.passthrough_writers();
                if bypassing > 0 {
                    drop(frozen);
                    return send(
                        &mut w,
                        &json!({"ok": false, "error": "passthrough-writers", "count": bypassing}),
                    );
                }
                let held = Instant::now();
                crate::upper::crash_point("gate.freeze");
                let mut answer = describe(union);
                answer["waited_us"] = json!(held.duration_since(asked).as_micros() as u64);
                let sent = send(&mut w, &answer);
                // Held until the client says thaw, or is gone (EOF, error, or a send that
                // failed because it died).
                let next = if sent.is_ok() {
                    next_line(true).transpose()
                } else {
                    None
                };
                drop(frozen);
                let paused = held.elapsed();
                crate::upper::crash_point("gate.thaw");
                info!(
                    step = "commit.thaw",
                    paused_us = paused.as_micros() as u64,
                    "writers resumed after a commit's freeze"
                );
                match next {
                    Some(Ok(l)) if l.contains("thaw") => send(
                        &mut w,
                        &json!({"ok": true, "paused_us": paused.as_micros() as u64}),
                    )?,
                    Some(Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        warn!(
                            step = "commit.thaw",
                            paused_us = paused.as_micros() as u64,
                            "a commit held the freeze past its limit; writers resumed"
                        );
                        return send(&mut w, &json!({"ok": false, "error": "freeze-timeout"}));
                    }
                    _ => return Ok(()),
                }
            }
            _ => send(&mut w, &json!({"ok": false, "error": "unknown request"}))?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_are_capped() {
        let read = |input: &[u8]| {
            let mut r = BufReader::new(input);
            let mut out = Vec::new();
            while let Some(l) = read_line_capped(&mut r, 8) {
                out.push(l.map_err(|e| e.to_string()));
            }
            out
        };
        assert_eq!(read(b"a\nbb\n"), [Ok("a".into()), Ok("bb".into())]);
        assert_eq!(
            read(b"12345678\nlast"),
            [Ok("12345678".into()), Ok("last".into())]
        );
        let long = read(&[b'x'; 100_000]);
        assert!(
            matches!(&long[0], Err(e) if e.contains("longer than 8")),
            "{:?}",
            &long[0]
        );
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo("/a\\040b"), PathBuf::from("/a b"));
        assert_eq!(unescape_mountinfo("/a\\134b"), PathBuf::from("/a\\b"));
        assert_eq!(unescape_mountinfo("/plain"), PathBuf::from("/plain"));
    }
}
