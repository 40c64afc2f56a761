#!/usr/bin/env python3
"""bench/uring-ab.py: rough A/B of FUSE round-trip cost, verlay io_uring=off vs io_uring=on.

Usage (as root, /sys/module/fuse/parameters/enable_uring set to Y, else io_uring=on fails):
    python3 bench/uring-ab.py ./target/release/verlay [ROUNDS]

Mounts verlay over a fresh lower/upper in /tmp with io_uring=off and io_uring=on in turn
(the order alternates each round), and times per mount: 20,000 getxattr of a missing
user xattr (one GETXATTR each, answered ENODATA), 2,000 create+close+unlink in a new
directory (about 7 requests per file), a 64 MiB write in 1 MiB writes (1 MiB WRITE requests,
no writeback cache) and its read back after dropping its pages (posix_fadvise). Prints each
figure per round and the medians. Wall-clock: on a shared machine a rough comparison only.
"""
import os, subprocess, sys, time, tempfile, statistics, errno
if len(sys.argv) < 2 or os.geteuid() != 0:
    sys.exit(__doc__)
verlay = sys.argv[1]; rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
base = tempfile.mkdtemp(prefix="verlay-uring-ab-", dir="/tmp")
d = {k: os.path.join(base, k) for k in ("l", "u", "w", "m")}
for p in d.values(): os.makedirs(p)
open(os.path.join(d["l"], "x"), "w").write("x")
def mount(mode):
    o = f"lowerdir={d['l']},upperdir={d['u']},workdir={d['w']},io_uring={mode}"
    subprocess.run([verlay, "-o", o, d["m"]], check=True, timeout=60)
def umount():
    subprocess.run(["fusermount3", "-u", d["m"]], check=True, timeout=60)
    time.sleep(1.5)
def getxattr_loop(n=20000):
    p = os.path.join(d["m"], "x"); t = time.perf_counter()
    for _ in range(n):
        try: os.getxattr(p, "user.nope")
        except OSError as e: assert e.errno == errno.ENODATA
    return (time.perf_counter() - t) / n * 1e6
def create_unlink(n=2000):
    dd = os.path.join(d["m"], f"c{time.monotonic_ns()}"); os.mkdir(dd); t = time.perf_counter()
    for i in range(n):
        f = os.path.join(dd, f"f{i}"); os.close(os.open(f, os.O_CREAT | os.O_WRONLY, 0o644)); os.unlink(f)
    r = (time.perf_counter() - t) / n * 1e6; os.rmdir(dd); return r
def seq(mb=64):
    p = os.path.join(d["m"], "big"); buf = b"\xab" * (1 << 20)
    t = time.perf_counter(); fd = os.open(p, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    for _ in range(mb): os.write(fd, buf)
    os.close(fd); w = mb / (time.perf_counter() - t)
    fd = os.open(p, os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    t = time.perf_counter()
    while os.read(fd, 1 << 20): pass
    os.close(fd); r = mb / (time.perf_counter() - t); os.unlink(p); return w, r
res = {m: {"getxattr us": [], "create+unlink us/file": [], "write MB/s": [], "read MB/s": []} for m in ("off", "on")}
print("load before:", open("/proc/loadavg").read().strip())
for r in range(rounds):
    for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
        mount(mode)
        try:
            res[mode]["getxattr us"].append(getxattr_loop())
            res[mode]["create+unlink us/file"].append(create_unlink())
            w, rd = seq(); res[mode]["write MB/s"].append(w); res[mode]["read MB/s"].append(rd)
        finally:
            umount()
print("load after:", open("/proc/loadavg").read().strip())
for k in res["off"]:
    off, on = res["off"][k], res["on"][k]
    print(f"{k:24} off median {statistics.median(off):8.1f} {['%.1f' % x for x in off]}   on median {statistics.median(on):8.1f} {['%.1f' % x for x in on]}")
subprocess.run(["rm", "-rf", base])
