//! A fault-injecting HTTP/1.1 proxy on 127.0.0.1 for the registry tests.
//!
//! It forwards each client connection to the registry, one request/response exchange at a
//! time, and understands just enough HTTP (request and response heads, Content-Length and
//! chunked bodies) to do two things a plain TCP proxy cannot:
//! - inject faults at chosen points of an exchange: refuse the connection, stall it past the
//!   client's timeout, cut a request body halfway, drop a response after the registry has
//!   done the work, cut a response body halfway, delay, throttle, flip a byte of a blob;
//! - record what it saw: every request's method, path, `Content-Range`/`Range` and how many
//!   body bytes it forwarded to the registry, so a test can check that no upload session was
//!   sent the same byte range twice.
//!
//! Faults are drawn from a seeded generator, one draw per exchange keyed by the connection's
//! accept number and the exchange's number in it, so the same seed and the same sequential
//! client give the same faults.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often each fault happens, per thousand exchanges, and the other knobs.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// seed of the generator
    pub seed: u64,
    /// close the connection as soon as it is accepted
    pub refuse: u32,
    /// read the request head, then hold the connection for `stall_ms` and close it
    pub stall: u32,
    /// forward part of a request body, then close both sides
    pub cut_request_body: u32,
    /// forward the whole request and let the registry answer, but close without the answer
    pub drop_response: u32,
    /// forward part of a response body, then close
    pub cut_response_body: u32,
    /// how long a stall lasts
    pub stall_ms: u64,
    /// up to this many ms of delay before each forwarded response piece
    pub delay_ms: u64,
    /// forward response bodies at about this many bytes a second
    pub throttle: Option<u64>,
    /// flip one byte of every blob body (GET .../blobs/sha256:...) longer than 4 KiB
    pub tamper_blobs: bool,
    /// answer every request 401 with a bearer challenge, as a registry that wants a login
    pub require_auth: bool,
    /// once this many PATCH requests have been forwarded whole, hold every new exchange
    /// (read nothing of it, forward nothing) for `stall_ms`: a client killed then has no
    /// chunk in flight at the registry
    pub hold_after_patches: Option<u64>,
}

/// One request/response exchange as the proxy saw it.
#[derive(Debug, Clone, Default)]
pub struct Exchange {
    /// connection number (accept order)
    pub conn: u64,
    /// request method
    pub method: String,
    /// request path, query removed
    pub path: String,
    /// the query string
    pub query: String,
    /// request `Content-Range`
    pub content_range: Option<String>,
    /// request `Range`
    pub range: Option<String>,
    /// declared request body length
    pub body_len: u64,
    /// request body bytes forwarded to the registry
    pub body_forwarded: u64,
    /// the registry's status, if it answered
    pub status: Option<u16>,
    /// response body bytes forwarded to the client
    pub response_forwarded: u64,
    /// the fault injected, if any
    pub fault: Option<&'static str>,
}

impl Exchange {
    /// The upload session id of a request on `/v2/REPO/blobs/uploads/ID`.
    pub fn upload_id(&self) -> Option<&str> {
        let (_, id) = self.path.split_once("/blobs/uploads/")?;
        (!id.is_empty()).then_some(id)
    }

    /// The start offset of `Content-Range: START-END`.
    pub fn range_start(&self) -> Option<u64> {
        self.content_range.as_deref()?.split_once('-')?.0.parse().ok()
    }
}

/// The running proxy; stops accepting on drop.
pub struct FaultProxy {
    /// where clients connect
    pub addr: SocketAddr,
    faults: Arc<Mutex<Faults>>,
    log: Arc<Mutex<Vec<Exchange>>>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

/// splitmix64 over (seed, n): one independent draw per exchange.
fn draw(seed: u64, n: u64) -> u64 {
    let mut z = seed.wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl FaultProxy {
    /// Start a proxy to `upstream` with `faults`.
    pub fn start(upstream: SocketAddr, faults: Faults) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        listener.set_nonblocking(true).expect("nonblocking listener");
        let addr = listener.local_addr().expect("proxy address");
        let faults = Arc::new(Mutex::new(faults));
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        // PATCH requests forwarded whole so far
        let patches = Arc::new(AtomicU64::new(0));
        let (f2, l2, s2) = (faults.clone(), log.clone(), stop.clone());
        let accept = std::thread::spawn(move || {
            let mut conn = 0u64;
            while !s2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        conn += 1;
                        let (f, l, x) = (f2.clone(), l2.clone(), patches.clone());
                        std::thread::spawn(move || {
                            let _ = serve(conn, client, upstream, &f, &l, &x);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        FaultProxy {
            addr,
            faults,
            log,
            stop,
            accept: Some(accept),
        }
    }

    /// Change the faults for the exchanges to come.
    pub fn set(&self, faults: Faults) {
        *self.faults.lock().expect("faults lock") = faults;
    }

    /// Everything seen so far.
    pub fn log(&self) -> Vec<Exchange> {
        self.log.lock().expect("log lock").clone()
    }

    /// Forget the log.
    pub fn clear(&self) {
        self.log.lock().expect("log lock").clear();
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// A parsed message head.
struct Head {
    raw: Vec<u8>,
    first: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn len(&self) -> Option<u64> {
        self.get("Content-Length").and_then(|v| v.trim().parse().ok())
    }
    fn chunked(&self) -> bool {
        self.get("Transfer-Encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    }
}

/// Read a message head; `None` at a clean end of stream.
fn read_head(r: &mut impl BufRead) -> std::io::Result<Option<Head>> {
    let mut raw = Vec::new();
    let mut lines = Vec::new();
    loop {
        let mut line = Vec::new();
        let n = r.read_until(b'\n', &mut line)?;
        if n == 0 {
            return if raw.is_empty() {
                Ok(None)
            } else {
                Err(std::io::ErrorKind::UnexpectedEof.into())
            };
        }
        raw.extend_from_slice(&line);
        let text = String::from_utf8_lossy(&line).trim_end().to_string();
        if text.is_empty() {
            break;
        }
        lines.push(text);
    }
    let first = lines.first().cloned().unwrap_or_default();
    let headers = lines
        .iter()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok(Some(Head { raw, first, headers }))
}

/// Copy exactly `n` bytes, calling `piece` before each write (it may flip bytes, sleep, or
/// return false to stop: a cut). Returns the bytes written.
fn copy_n(
    from: &mut impl Read,
    to: &mut impl Write,
    n: u64,
    mut piece: impl FnMut(u64, &mut [u8]) -> Option<usize>,
) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 16 << 10];
    let mut done = 0u64;
    while done < n {
        let want = (n - done).min(buf.len() as u64) as usize;
        let k = from.read(&mut buf[..want])?;
        if k == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let allowed = piece(done, &mut buf[..k]).unwrap_or(k).min(k);
        to.write_all(&buf[..allowed])?;
        done += allowed as u64;
        if allowed < k {
            return Ok(done);
        }
    }
    Ok(done)
}

/// Forward a chunked body as it is (framing included); returns the data bytes.
fn copy_chunked(from: &mut impl BufRead, to: &mut impl Write) -> std::io::Result<u64> {
    let mut total = 0;
    loop {
        let mut line = Vec::new();
        from.read_until(b'\n', &mut line)?;
        to.write_all(&line)?;
        let size = u64::from_str_radix(
            String::from_utf8_lossy(&line)
                .trim()
                .split(';')
                .next()
                .unwrap_or(""),
            16,
        )
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidData))?;
        if size == 0 {
            // trailers up to the empty line
            loop {
                let mut t = Vec::new();
                from.read_until(b'\n', &mut t)?;
                to.write_all(&t)?;
                if t == b"\r\n" || t == b"\n" || t.is_empty() {
                    return Ok(total);
                }
            }
        }
        total += copy_n(from, to, size + 2, |_, _| None)? - 2;
    }
}

const FAULTS: [&str; 5] = [
    "refuse",
    "stall",
    "cut_request_body",
    "drop_response",
    "cut_response_body",
];

fn serve(
    conn: u64,
    client: TcpStream,
    upstream: SocketAddr,
    faults: &Mutex<Faults>,
    log: &Mutex<Vec<Exchange>>,
    patches: &AtomicU64,
) -> std::io::Result<()> {
    client.set_nonblocking(false)?;
    client.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut creader = BufReader::new(client.try_clone()?);
    let mut cwriter = client.try_clone()?;
    let mut up: Option<(BufReader<TcpStream>, TcpStream)> = None;
    let mut k = 0u64;
    loop {
        let f = faults.lock().expect("faults lock").clone();
        // one draw per exchange: connection number (accept order) and exchange number in the
        // connection, so the draws do not depend on thread timing
        let r = draw(f.seed, conn * 1024 + k);
        k += 1;
        let roll = (r % 1000) as u32;
        let mut acc = 0;
        let mut fault = None;
        for (name, p) in FAULTS.iter().zip([
            f.refuse,
            f.stall,
            f.cut_request_body,
            f.drop_response,
            f.cut_response_body,
        ]) {
            acc += p;
            if fault.is_none() && roll < acc {
                fault = Some(*name);
            }
        }
        let cut_frac = (r >> 20) % 1000; // where in a body a cut falls, per mille
        let delay = if f.delay_ms > 0 { (r >> 40) % f.delay_ms } else { 0 };

        if f.hold_after_patches
            .is_some_and(|n| patches.load(Ordering::SeqCst) >= n)
        {
            // hold a request, not an idle connection: the client saves its session record
            // after the last answer and before it sends the next request, so a "hold" logged
            // before the request arrives would race with that save
            if creader.fill_buf()?.is_empty() {
                return Ok(());
            }
            log.lock().expect("log").push(Exchange {
                conn,
                fault: Some("hold"),
                ..Exchange::default()
            });
            std::thread::sleep(Duration::from_millis(f.stall_ms));
            let _ = client.shutdown(Shutdown::Both);
            return Ok(());
        }
        if fault == Some("refuse") && up.is_none() {
            log.lock().expect("log").push(Exchange {
                conn,
                fault,
                ..Exchange::default()
            });
            let _ = client.shutdown(Shutdown::Both);
            return Ok(());
        }
        let Some(req) = read_head(&mut creader)? else {
            return Ok(());
        };
        let mut parts = req.first.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let target = parts.next().unwrap_or("").to_string();
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p.to_string(), q.to_string()),
            None => (target.clone(), String::new()),
        };
        let mut ex = Exchange {
            conn,
            method: method.clone(),
            path: path.clone(),
            query,
            content_range: req.get("Content-Range").map(str::to_owned),
            range: req.get("Range").map(str::to_owned),
            body_len: req.len().unwrap_or(0),
            ..Exchange::default()
        };
        let record = |ex: Exchange| log.lock().expect("log").push(ex);
        if req.chunked() {
            // verlay always sends sized bodies; anything else is out of scope here
            ex.fault = Some("unsupported chunked request");
            record(ex);
            return Ok(());
        }
        if f.require_auth {
            let mut body = Vec::new();
            copy_n(&mut creader, &mut body, ex.body_len, |_, _| None)?;
            let body = r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#;
            write!(
                cwriter,
                "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"http://127.0.0.1:9/token\",service=\"test\"\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )?;
            ex.status = Some(401);
            record(ex);
            continue;
        }
        if fault == Some("stall") {
            ex.fault = fault;
            record(ex);
            std::thread::sleep(Duration::from_millis(f.stall_ms));
            let _ = client.shutdown(Shutdown::Both);
            return Ok(());
        }
        if up.is_none() {
            let s = TcpStream::connect(upstream)?;
            up = Some((BufReader::new(s.try_clone()?), s));
        }
        let Some((ureader, uwriter)) = up.as_mut() else {
            return Ok(());
        };
        uwriter.write_all(&req.raw)?;
        // request body, maybe cut
        let body_len = ex.body_len;
        let cut_at = (fault == Some("cut_request_body") && body_len >= 2)
            .then(|| (body_len * cut_frac / 1000).clamp(1, body_len - 1));
        let sent = copy_n(&mut creader, uwriter, body_len, |done, buf| {
            let end = done + buf.len() as u64;
            match cut_at {
                Some(c) if end > c => Some((c - done) as usize),
                _ => None,
            }
        })?;
        ex.body_forwarded = sent;
        if method == "PATCH" && sent == body_len && cut_at.is_none() {
            patches.fetch_add(1, Ordering::SeqCst);
        }
        if cut_at.is_some() {
            ex.fault = fault;
            record(ex);
            let _ = uwriter.flush();
            // let the registry read what was sent before it sees the connection close
            std::thread::sleep(Duration::from_millis(50));
            let _ = uwriter.shutdown(Shutdown::Both);
            let _ = client.shutdown(Shutdown::Both);
            return Ok(());
        }
        // the response
        let Some(resp) = read_head(ureader)? else {
            record(ex);
            let _ = client.shutdown(Shutdown::Both);
            return Ok(());
        };
        let status: u16 = resp
            .first
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        ex.status = Some(status);
        let bodiless = method == "HEAD" || status == 204 || status == 304 || (100..200).contains(&status);
        if fault == Some("drop_response") {
            // the registry did the work; the client never hears of it
            if !bodiless {
                if let Some(n) = resp.len() {
                    copy_n(ureader, &mut std::io::sink(), n, |_, _| None)?;
                } else if resp.chunked() {
                    copy_chunked(ureader, &mut std::io::sink())?;
                }
            }
            ex.fault = fault;
            record(ex);
            let _ = client.shutdown(Shutdown::Both);
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(delay));
        cwriter.write_all(&resp.raw)?;
        let blob_get = method == "GET" && path.contains("/blobs/sha256:");
        if !bodiless {
            if let Some(n) = resp.len() {
                let cut_at = (fault == Some("cut_response_body") && n >= 2)
                    .then(|| (n * cut_frac / 1000).clamp(1, n - 1));
                let tamper = f.tamper_blobs && blob_get && n > 4096 && (200..300).contains(&status);
                let throttle = f.throttle;
                let got = copy_n(ureader, &mut cwriter, n, |done, buf| {
                    if tamper && done == 0 {
                        buf[0] ^= 0x55;
                    }
                    if let Some(bps) = throttle {
                        std::thread::sleep(Duration::from_micros(buf.len() as u64 * 1_000_000 / bps.max(1)));
                    }
                    match cut_at {
                        Some(c) if done + buf.len() as u64 > c => Some((c - done) as usize),
                        _ => None,
                    }
                })?;
                ex.response_forwarded = got;
                if cut_at.is_some() {
                    ex.fault = fault;
                    record(ex);
                    let _ = cwriter.flush();
                    let _ = client.shutdown(Shutdown::Both);
                    return Ok(());
                }
                if tamper {
                    ex.fault = Some("tamper");
                }
            } else if resp.chunked() {
                ex.response_forwarded = copy_chunked(ureader, &mut cwriter)?;
            } else {
                // delimited by close
                let mut rest = Vec::new();
                ureader.read_to_end(&mut rest)?;
                cwriter.write_all(&rest)?;
                ex.response_forwarded = rest.len() as u64;
                record(ex);
                let _ = client.shutdown(Shutdown::Both);
                return Ok(());
            }
        }
        cwriter.flush()?;
        record(ex);
        if resp
            .get("Connection")
            .is_some_and(|c| c.eq_ignore_ascii_case("close"))
            || req
                .get("Connection")
                .is_some_and(|c| c.eq_ignore_ascii_case("close"))
        {
            let _ = client.shutdown(Shutdown::Both);
            return Ok(());
        }
    }
}
