#!/usr/bin/env python3
"""Helpers for bench/lazy.sh (not meant to be called by hand).

  lazy.py image OUT --files N --bytes B
      Writes an OCI image layout under OUT/oci (removed first): layer 1 a small base
      (Debian's /bin/busybox, static, one symlink per applet, /etc/passwd, /etc/group, empty
      /proc /sys /dev /tmp /root /var), layer 2 /data/hello.txt (one line) and N files of
      seeded pseudo-random bytes (incompressible) in /data/dNN/, 100 per directory, their sizes
      log-normal and scaled so that they add up to about B bytes (each 1 B .. 16 MiB).
      Deterministic (fixed seed, mtimes, owners, sorted entries, gzip without a name or time):
      the same busybox gives the same digests. Writes OUT/image.json: the data layer's file
      count and byte total, hello.txt's content and the busybox size, for the checks.

  lazy.py proxy --listen PORT --upstream HOST:PORT --rate MBPS --delay-ms MS --log FILE
                --port-file FILE [--max-seconds S] [--max-conns N]
      An HTTP/1.1 reverse proxy for the registry's pull side (GET and HEAD only) on
      127.0.0.1:PORT (0: a free port, written to --port-file). Every request waits MS ms before
      it goes upstream (one keep-alive connection per client connection); every response (head
      and body) goes through one shared token bucket of MBPS x 10^6 bytes/s, in 64 KiB writes.
      One log line per request (start, end, method, path, Range, status, bytes). It keeps the
      time and running total of each write, so GET /_proxy/bytes?until=EPOCH answers how many
      bytes it had sent by then ({"bytes": .., "requests": ..}; without until: now).
      Bounded: at most --max-conns client connections (more are closed at once), 30 s per
      upstream read, 120 s for an idle client connection, and the whole process exits by itself after --max-seconds (default 7200).

  lazy.py toc-bytes REGISTRY REPO TAG
      Reads the image's manifest from the registry (direct, not through the proxy) and each
      layer's eStargz footer (Range: the last 51 bytes): prints the layers' total size and the
      bytes from each TOC's offset to the end of its blob (TOC member + footer), as JSON.

  lazy.py until PROXYPORT EPOCH
      Prints the bytes the proxy had sent by EPOCH (an integer).

  lazy.py report RUNS.jsonl META.json
      Prints the markdown table of bench/lazy.sh: per way, the median of its cold runs.
"""
import bisect
import gzip
import hashlib
import http.client
import http.server
import io
import json
import math
import os
import random
import shutil
import socketserver
import statistics
import sys
import tarfile
import threading
import time
import urllib.request

MTIME = 1700000000
SEED = 20261207
MAX_FILE = 16 << 20
CHUNK = 64 << 10

# ---------------------------------------------------------------- image


class HashWriter:
    """A write-only file object that hashes and counts what goes through it."""

    def __init__(self, inner):
        self.inner, self.h, self.n = inner, hashlib.sha256(), 0

    def write(self, b):
        self.h.update(b)
        self.n += len(b)
        return self.inner.write(b)

    def tell(self):
        return self.n

    def flush(self):
        self.inner.flush()


def tar_info(name, kind, mode, size=0, link=""):
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.size, ti.linkname = kind, mode, size, link
    ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = MTIME, 0, 0, "", ""
    return ti


def write_layer(blobs, entries):
    """entries: (name, kind, mode, data-or-callable-or-None, link), sorted. Returns the
    descriptor and the diffID."""
    tmp = os.path.join(blobs, "layer.tmp")
    with open(tmp, "wb") as f:
        outer = HashWriter(f)
        with gzip.GzipFile(filename="", mode="wb", fileobj=outer, mtime=0, compresslevel=1) as gz:
            inner = HashWriter(gz)
            with tarfile.open(fileobj=inner, mode="w", format=tarfile.PAX_FORMAT) as tf:
                for name, kind, mode, data, link in entries:
                    if callable(data):
                        data = data()
                    size = len(data) if data is not None else 0
                    tf.addfile(tar_info(name, kind, mode, size, link),
                               io.BytesIO(data) if data is not None else None)
    dg = outer.h.hexdigest()
    os.rename(tmp, os.path.join(blobs, dg))
    desc = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": "sha256:" + dg, "size": outer.n}
    return desc, "sha256:" + inner.h.hexdigest()


def put_json(blobs, obj):
    b = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    dg = hashlib.sha256(b).hexdigest()
    with open(os.path.join(blobs, dg), "wb") as f:
        f.write(b)
    return "sha256:" + dg, len(b)


def base_entries():
    bb = "/bin/busybox"
    with open(bb, "rb") as f:
        busybox = f.read()
    applets = os.popen(f"{bb} --list").read().split()
    e = [("bin", tarfile.DIRTYPE, 0o755, None, ""),
         ("bin/busybox", tarfile.REGTYPE, 0o755, busybox, "")]
    e += [("bin/" + a, tarfile.SYMTYPE, 0o777, None, "busybox") for a in sorted(set(applets)) if a != "busybox"]
    e += [("dev", tarfile.DIRTYPE, 0o755, None, ""), ("etc", tarfile.DIRTYPE, 0o755, None, ""),
          ("etc/group", tarfile.REGTYPE, 0o644, b"root:x:0:\nnogroup:x:65534:\n", ""),
          ("etc/passwd", tarfile.REGTYPE, 0o644,
           b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n", ""),
          ("proc", tarfile.DIRTYPE, 0o755, None, ""), ("root", tarfile.DIRTYPE, 0o700, None, ""),
          ("sys", tarfile.DIRTYPE, 0o755, None, ""), ("tmp", tarfile.DIRTYPE, 0o1777, None, ""),
          ("var", tarfile.DIRTYPE, 0o755, None, "")]
    e.sort(key=lambda x: x[0])
    return e, len(busybox)


def data_sizes(n, total):
    rng = random.Random(SEED)
    raw = [rng.lognormvariate(0.0, 1.2) for _ in range(n)]
    scale = total / sum(raw)
    return [max(1, min(MAX_FILE, int(r * scale))) for r in raw]


def data_entries(n, total, hello):
    sizes = data_sizes(n, total)
    rng = random.Random(SEED + 1)
    e = [("data", tarfile.DIRTYPE, 0o755, None, "")]
    for i, s in enumerate(sizes):
        if i % 100 == 0:
            e.append(("data/d%02d" % (i // 100), tarfile.DIRTYPE, 0o755, None, ""))
        # the bytes are drawn when the entry is written, in this order (entries are sorted
        # already: dNN/fNNNNN), so one file is in memory at a time
        e.append(("data/d%02d/f%05d" % (i // 100, i), tarfile.REGTYPE, 0o644,
                  (lambda s=s: rng.randbytes(s)), ""))
    # last in the blob (and in name order), so the background fetches of both lazy
    # snapshotters reach it last: the first output needs an on-demand fetch
    e.append(("data/hello.txt", tarfile.REGTYPE, 0o644, hello, ""))
    return e, sizes


def cmd_image(argv):
    import argparse
    ap = argparse.ArgumentParser(prog="lazy.py image")
    ap.add_argument("out")
    ap.add_argument("--files", type=int, required=True)
    ap.add_argument("--bytes", type=int, required=True)
    a = ap.parse_args(argv)
    if not (1 <= a.files <= 100000 and 1 <= a.bytes <= (64 << 30)):
        sys.exit("lazy.py image: --files 1..100000 and --bytes 1..64 GiB")
    shutil.rmtree(a.out, ignore_errors=True)
    blobs = os.path.join(a.out, "oci", "blobs", "sha256")
    os.makedirs(blobs)
    hello = b"hello from the lazy bench image\n"
    base, busybox_size = base_entries()
    l1, d1 = write_layer(blobs, base)
    data, sizes = data_entries(a.files, a.bytes, hello)
    l2, d2 = write_layer(blobs, data)
    config = {"created": "2023-11-14T22:13:20Z", "architecture": "amd64", "os": "linux",
              "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/"},
              "rootfs": {"type": "layers", "diff_ids": [d1, d2]}}
    cdg, csize = put_json(blobs, config)
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cdg, "size": csize},
                "layers": [l1, l2]}
    mdg, msize = put_json(blobs, manifest)
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mdg,
                            "size": msize, "platform": {"architecture": "amd64", "os": "linux"},
                            "annotations": {"org.opencontainers.image.ref.name": "1",
                                            "io.containerd.image.name": "localhost/lazy-bench:1"}}]}
    with open(os.path.join(a.out, "oci", "index.json"), "w") as f:
        json.dump(index, f)
    with open(os.path.join(a.out, "oci", "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')
    info = {"files": a.files + 1, "data_bytes": sum(sizes) + len(hello), "hello": hello.decode().strip(),
            "hello_bytes": len(hello), "busybox_bytes": busybox_size,
            "layer_sizes": [l1["size"], l2["size"]], "manifest": mdg}
    with open(os.path.join(a.out, "image.json"), "w") as f:
        json.dump(info, f)
    print(json.dumps(info))


# ---------------------------------------------------------------- proxy

class Link:
    """The shared link: a token bucket (a virtual clock of when the link is next free) and the
    running total of bytes sent, with the time of each write."""

    MAX_SAMPLES = 4_000_000

    def __init__(self, rate):
        self.rate = rate
        self.lock = threading.Lock()
        self.next_free = 0.0
        self.total = 0
        self.requests = 0
        self.times, self.totals = [], []

    def send(self, wfile, b):
        with self.lock:
            start = max(time.time(), self.next_free)
            self.next_free = start + len(b) / self.rate
            done = self.next_free
        wait = done - time.time()
        if wait > 0:
            time.sleep(wait)
        wfile.write(b)
        with self.lock:
            self.total += len(b)
            if len(self.times) < self.MAX_SAMPLES:
                self.times.append(time.time())
                self.totals.append(self.total)

    def until(self, t):
        with self.lock:
            if t is None:
                return self.total
            i = bisect.bisect_right(self.times, t)
            return self.totals[i - 1] if i else 0


HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
       "transfer-encoding", "upgrade"}


class ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "lazy-bench-proxy"
    timeout = 120  # an idle client connection is closed after this (socket timeout, s)

    def log_message(self, fmt, *args):  # the per-request log line is ours (see forward)
        pass

    def upstream(self):
        c = getattr(self, "_up", None)
        if c is None:
            c = http.client.HTTPConnection(self.server.upstream, timeout=30)
            self._up = c
        return c

    def do_HEAD(self):
        self.forward()

    def do_GET(self):
        if self.path.startswith("/_proxy/bytes"):
            q = self.path.partition("?until=")[2]
            body = json.dumps({"bytes": self.server.link.until(float(q) if q else None),
                               "requests": self.server.link.requests}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.forward()

    def do_POST(self):
        self.send_error(405, "the bench proxy forwards pulls only")

    do_PUT = do_PATCH = do_DELETE = do_POST

    def forward(self):
        link, t0 = self.server.link, time.time()
        with link.lock:
            link.requests += 1
        time.sleep(self.server.delay)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
        # a kept-alive upstream connection the registry closed fails at once: one more try
        # on a new connection (GET and HEAD are idempotent)
        for attempt in (1, 2):
            try:
                up = self.upstream()
                up.request(self.command, self.path, headers=headers)
                r = up.getresponse()
                break
            except (OSError, http.client.HTTPException) as e:
                up.close()
                self._up = None
                if attempt == 2:
                    self.log(t0, 502, 0, f"upstream: {e}")
                    self.send_error(502, "upstream failed")
                    return
        length = r.getheader("Content-Length")
        head = [f"HTTP/1.1 {r.status} {r.reason}\r\n"]
        head += [f"{k}: {v}\r\n" for k, v in r.getheaders() if k.lower() not in HOP]
        body_expected = self.command != "HEAD" and r.status not in (204, 304)
        if body_expected and length is None:
            head.append("Connection: close\r\n")
            self.close_connection = True
        head.append("\r\n")
        sent = 0
        try:
            hb = "".join(head).encode("latin-1")
            link.send(self.wfile, hb)
            sent += len(hb)
            left = int(length) if length is not None else None
            while body_expected:
                b = r.read(CHUNK if left is None else min(CHUNK, left))
                if not b:
                    break
                link.send(self.wfile, b)
                sent += len(b)
                if left is not None:
                    left -= len(b)
                    if left == 0:
                        break
            if not body_expected:
                r.read()
        except OSError as e:
            up.close()
            self._up = None
            self.close_connection = True
            self.log(t0, r.status, sent, f"aborted: {e}")
            return
        self.log(t0, r.status, sent, "")

    def log(self, t0, status, sent, note):
        line = "%.6f %.6f %s %s range=%s %d %d %s\n" % (
            t0, time.time(), self.command, self.path, self.headers.get("Range", "-"), status, sent, note)
        with self.server.log_lock:
            self.server.logf.write(line)
            self.server.logf.flush()


class ProxyServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True

    def process_request(self, request, client_address):
        with self.conns_lock:
            if self.conns >= self.max_conns:
                request.close()
                return
            self.conns += 1
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.conns_lock:
                self.conns -= 1


def cmd_proxy(argv):
    import argparse
    ap = argparse.ArgumentParser(prog="lazy.py proxy")
    ap.add_argument("--listen", type=int, default=0)
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--rate", type=float, required=True, help="MB/s (10^6 bytes)")
    ap.add_argument("--delay-ms", type=float, required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--port-file", required=True)
    ap.add_argument("--max-seconds", type=float, default=7200)
    ap.add_argument("--max-conns", type=int, default=64)
    a = ap.parse_args(argv)
    srv = ProxyServer(("127.0.0.1", a.listen), ProxyHandler)
    srv.upstream, srv.delay, srv.link = a.upstream, a.delay_ms / 1000, Link(a.rate * 1e6)
    srv.logf, srv.log_lock = open(a.log, "a"), threading.Lock()
    srv.conns, srv.conns_lock, srv.max_conns = 0, threading.Lock(), a.max_conns

    def lifetime():
        time.sleep(a.max_seconds)
        sys.stderr.write(f"lazy.py proxy: exiting after its limit of {a.max_seconds:.0f} s\n")
        os._exit(3)
    threading.Thread(target=lifetime, daemon=True).start()
    with open(a.port_file + ".tmp", "w") as f:
        f.write(str(srv.server_address[1]))
    os.rename(a.port_file + ".tmp", a.port_file)
    srv.serve_forever()


def proxy_bytes(port, until=None):
    url = f"http://127.0.0.1:{port}/_proxy/bytes" + (f"?until={until}" if until is not None else "")
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


def cmd_until(argv):
    print(proxy_bytes(int(argv[0]), float(argv[1]))["bytes"])


# ---------------------------------------------------------------- toc-bytes

def cmd_toc_bytes(argv):
    reg, repo, tag = argv
    req = urllib.request.Request(f"http://{reg}/v2/{repo}/manifests/{tag}",
                                 headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        m = json.load(r)
    total = toc = 0
    for layer in m["layers"]:
        req = urllib.request.Request(f"http://{reg}/v2/{repo}/blobs/{layer['digest']}",
                                     headers={"Range": "bytes=-51"})
        with urllib.request.urlopen(req, timeout=30) as r:
            footer = r.read()
        i = footer.find(b"STARGZ")
        if len(footer) != 51 or i < 16:
            sys.exit(f"lazy.py toc-bytes: layer {layer['digest']} has no eStargz footer")
        off = int(footer[i - 16:i], 16)
        total += layer["size"]
        toc += layer["size"] - off
    print(json.dumps({"layers_bytes": total, "toc_bytes": toc, "layers": len(m["layers"])}))


# ---------------------------------------------------------------- report

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def cmd_report(argv):
    runs = [json.loads(line) for line in open(argv[0]) if line.strip()]
    meta = json.load(open(argv[1]))
    names = {"a": "(a) overlayfs, full pull", "b": "(b) stargz-snapshotter 0.12", "c": "(c) verlay snapshotter"}
    mb = lambda x: "-" if x is None else "%.1f" % (x / 1e6)
    s = lambda x: "-" if x is None else "%.2f" % x
    rows, agg = [], {}
    for w in meta["ways"]:
        ok = [r for r in runs if r["way"] == w and r["ok"]]
        failed = len([r for r in runs if r["way"] == w and not r["ok"]])
        a = {k: med([r.get(k) for r in ok]) for k in
             ("pull_s", "pull_bytes", "first_s", "first_bytes", "all_s", "all_bytes", "read_s")}
        agg[w] = a
        rows.append("| %s | %d%s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            names[w], len(ok), f" ({failed} failed)" if failed else "",
            s(a["pull_s"]), mb(a["pull_bytes"]), s(a["first_s"]), mb(a["first_bytes"]),
            s(a["read_s"]), s(a["all_s"]), mb(a["all_bytes"]),
            ", ".join("%.2f" % r["first_s"] for r in ok)))
    print("| way | runs | pull (s) | pull MB | first output (s) | MB before it | whole read (s) | "
          "pull start to all read (s) | MB by then | first output, each run (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print()
    need = meta["busybox_bytes"] + meta["hello_bytes"] + meta["toc_bytes"]
    full = agg.get("a", {})
    for w in ("b", "c"):
        if w not in agg or agg[w]["first_s"] is None:
            continue
        a = agg[w]
        print(f"- {names[w]}: first output {s(a['first_s'])} s", end="")
        if full.get("pull_s"):
            print(f" = {100 * a['first_s'] / full['pull_s']:.1f}% of the full pull (target ≤ 5%)", end="")
        if w == "c" and agg.get("b", {}).get("first_s"):
            print(f", {a['first_s'] / agg['b']['first_s']:.2f}x stargz's (target ≤ 1x)", end="")
        print(f"; {mb(a['first_bytes'])} MB before it = {a['first_bytes'] / need:.2f}x the container's "
              f"reads plus TOCs ({mb(need)} MB; target ≤ 2x)", end="")
        if full.get("pull_s"):
            print(f"; pull start to all read {a['all_s'] / full['pull_s']:.2f}x the full pull's time "
                  f"(target ≤ 1.1x)", end="")
            if full.get("all_s"):
                print(f", {a['all_s'] / full['all_s']:.2f}x (a)'s pull + run + read", end="")
        print(".")


def main():
    cmds = {"image": cmd_image, "proxy": cmd_proxy, "toc-bytes": cmd_toc_bytes, "until": cmd_until,
            "report": cmd_report}
    if len(sys.argv) < 2 or sys.argv[1] not in cmds:
        sys.exit(__doc__)
    cmds[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    main()
