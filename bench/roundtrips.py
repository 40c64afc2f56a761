#!/usr/bin/env python3
"""bench/roundtrips.py: count the FUSE requests (round trips) verlay serves for a workload.

Wall-clock times mean nothing on a loaded machine; the number of requests the kernel sends
is deterministic for a given kernel and set of mount options, and is what most FUSE levers
change. This mounts verlay over a fresh lower/upper, runs one workload, and prints the
requests served during it, per operation, from the daemon's control socket (`stats`).

Usage (as root; needs /dev/fuse):
    python3 bench/roundtrips.py [--verlay PATH] [--opts EXTRA] [--as UID] WORKLOAD...

Workloads:
    randwrite   4 KiB pwrite at 2,000 random 4 KiB-aligned offsets of a 64 MiB upper file
                (made and closed first; the count covers open + writes + close)
    metadata    create+close, stat, unlink of 2,000 files in one new directory (three phases)
    untar       extract a tar of 50 directories x 20 files of 1 KiB (1,050 entries)
    probe       stat 2,000 names that do not exist, twice (PATH / include-path searches)
--as UID runs the workload as that uid/gid (setpriv, no supplementary groups) in a directory
it owns; --opts adds mount options (e.g. passthrough=1).
"""

import argparse
import io
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_VERLAY = os.path.join(HERE, "..", "target", "release", "verlay")
FILES = 2000
WRITES = 2000
FILE_SIZE = 64 << 20


def stats(sock_path):
    """The daemon's per-operation request counts."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(sock_path)
        s.sendall(b'{"v":1,"op":"stats"}\n')
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    reply = json.loads(buf)["reply"]
    if "stats" not in reply:
        raise SystemExit(f"control socket refused stats: {reply}")
    return reply["stats"]["requests"]


def diff(after, before):
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def run_as(uid, code, *args):
    """Run python `code` (argv: args) as uid (setpriv) or as ourselves."""
    cmd = [sys.executable, "-c", code, *args]
    if uid is not None:
        cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *cmd]
    subprocess.run(cmd, check=True, timeout=600)


PREPARE_RANDWRITE = """
import os, sys
fd = os.open(sys.argv[1], os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
chunk = b"x" * (1 << 20)
for i in range(int(sys.argv[2]) >> 20):
    os.write(fd, chunk)
os.close(fd)
"""

RANDWRITE = """
import os, random, sys
rng = random.Random(42)
fd = os.open(sys.argv[1], os.O_WRONLY)
blocks = int(sys.argv[2]) // 4096
data = b"y" * 4096
for _ in range(int(sys.argv[3])):
    os.pwrite(fd, data, rng.randrange(blocks) * 4096)
os.close(fd)
"""

METADATA = """
import os, sys
d, n, phase = sys.argv[1], int(sys.argv[2]), sys.argv[3]
for i in range(n):
    p = os.path.join(d, "f%05d" % i)
    if phase == "create":
        os.close(os.open(p, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644))
    elif phase == "stat":
        os.stat(p)
    else:
        os.unlink(p)
"""

PROBE = """
import os, sys
for i in range(int(sys.argv[2])):
    try:
        os.stat(os.path.join(sys.argv[1], "missing%05d" % i))
    except FileNotFoundError:
        pass
"""


def small_tar(path):
    """50 dirs x 20 files of 1 KiB, deterministic (fixed mtimes, names, contents)."""
    with tarfile.open(path, "w") as t:
        for d in range(50):
            info = tarfile.TarInfo(f"tree/d{d:02}")
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
            t.addfile(info)
            for f in range(20):
                data = bytes([(d + f) % 256]) * 1024
                info = tarfile.TarInfo(f"tree/d{d:02}/f{f:02}")
                info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
                t.addfile(info, io.BytesIO(data))


def workload(name, mnt, sock, uid, tmp):
    """Run one workload; returns [(phase, request counts)]."""
    base = os.path.join(mnt, "w")
    os.mkdir(base)
    if uid is not None:
        os.chown(base, uid, uid)
    phases = []
    if name == "randwrite":
        f = os.path.join(base, "big")
        run_as(uid, PREPARE_RANDWRITE, f, str(FILE_SIZE))
        before = stats(sock)
        run_as(uid, RANDWRITE, f, str(FILE_SIZE), str(WRITES))
        phases.append((f"{WRITES} x 4 KiB random pwrite (+open/close)", diff(stats(sock), before)))
    elif name == "metadata":
        d = os.path.join(base, "dir")
        os.mkdir(d)
        if uid is not None:
            os.chown(d, uid, uid)
        for phase in ("create", "stat", "unlink"):
            before = stats(sock)
            run_as(uid, METADATA, d, str(FILES), phase)
            phases.append((f"{phase} x {FILES}", diff(stats(sock), before)))
    elif name == "probe":
        d = os.path.join(base, "dir")
        os.mkdir(d)
        for rnd in ("first", "second"):
            before = stats(sock)
            run_as(uid, PROBE, d, str(FILES))
            phases.append((f"stat of {FILES} missing names, {rnd} time", diff(stats(sock), before)))
    elif name == "untar":
        tar = os.path.join(tmp, "small.tar")
        small_tar(tar)
        before = stats(sock)
        cmd = ["tar", "-xf", tar, "-C", base]
        if uid is not None:
            os.chmod(tar, 0o644)
            cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *cmd]
        subprocess.run(cmd, check=True, timeout=600)
        phases.append(("untar 1,050 entries", diff(stats(sock), before)))
    else:
        raise SystemExit(f"unknown workload {name}")
    return phases


def mount(verlay, tmp, opts):
    dirs = {k: os.path.join(tmp, k) for k in ("lower", "upper", "work", "mnt")}
    for d in dirs.values():
        os.mkdir(d)
    os.chmod(tmp, 0o755)
    o = f"lowerdir={dirs['lower']},upperdir={dirs['upper']},workdir={dirs['work']}"
    if opts:
        o += "," + opts
    subprocess.run([verlay, "-o", o, dirs["mnt"]], check=True, timeout=60)
    st = os.stat(dirs["mnt"])
    sock = f"/run/verlay/{os.major(st.st_dev)}:{os.minor(st.st_dev)}.sock"
    for _ in range(100):  # the socket appears right after the mount; bounded wait
        if os.path.exists(sock):
            break
        time.sleep(0.05)
    return dirs["mnt"], sock


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--verlay", default=DEFAULT_VERLAY)
    ap.add_argument("--opts", default="")
    ap.add_argument("--as", dest="uid", type=int, default=None)
    ap.add_argument("workloads", nargs="+")
    a = ap.parse_args()
    for name in a.workloads:
        tmp = tempfile.mkdtemp(prefix="verlay-rt-")
        mnt = None
        try:
            mnt, sock = mount(a.verlay, tmp, a.opts)
            for phase, counts in workload(name, mnt, sock, a.uid, tmp):
                total = sum(counts.values())
                detail = " ".join(f"{k}={v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
                print(f"{name}: {phase}: {total} requests: {detail}")
        finally:
            if mnt:
                subprocess.run(["fusermount3", "-u", mnt], check=False, timeout=60)
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
