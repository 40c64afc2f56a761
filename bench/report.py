#!/usr/bin/env python3
"""Helpers for bench/run.sh (not meant to be called by hand).

  report.py rss-watch OUT.json
      Reads workloads.sh's stdout on stdin and passes it through unchanged.
      Meanwhile it finds the FUSE daemon(s) serving workloads.sh's mount (a
      process one of whose argv elements is BENCH_ROOT/run/<pid>/mnt) and reads
      VmHWM from /proc/PID/status every 0.1 s until the daemon exits, so the last
      value is read just before the unmount. Each workload line is attributed to
      the daemon(s) alive when it was printed: OUT.json maps workload -> peak
      RSS in KiB of the daemon that served it. (Workloads that workloads.sh
      runs best-of-N print after their mounts are gone and get no value.)

  report.py table RUN.json
      Prints the markdown results table for a run described by RUN.json
      (written by run.sh): seconds per workload and mode, verlay's ratios,
      the create/unlink scaling rows and the daemon peak RSS rows.
"""
import json
import os
import re
import select
import sys
import time

# ---------------------------------------------------------------- rss-watch


def proc_status_kib(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def find_daemons(root_run):
    pat = re.compile(re.escape(root_run) + r"/[0-9]+/mnt")
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
            with open(f"/proc/{d}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if comm.startswith("fusermount"):
            continue
        if any(pat.fullmatch(a.decode(errors="replace")) for a in args):
            found.append(int(d))
    return found


def rss_watch(out_path):
    root_run = os.path.join(os.environ.get("BENCH_ROOT", "/tmp/bl"), "run")
    hwm = {}          # pid -> last VmHWM seen (KiB)
    anon = {}         # pid -> largest RssAnon seen (KiB): the daemon's own memory, without
                      # file pages it has mapped (a verified layer's manifest, shared with
                      # the page cache and reclaimable)
    alive = set()
    per_workload = {}
    order = []        # daemons in the order seen
    stdin = sys.stdin.buffer
    buf = b""

    def see_anon(pid):
        a = proc_status_kib(pid, "RssAnon")
        if a is not None:
            anon[pid] = max(anon.get(pid, 0), a)

    def refresh():
        for pid in list(alive):
            v = proc_status_kib(pid, "VmHWM")
            if v is None:
                alive.discard(pid)
            else:
                hwm[pid] = max(hwm.get(pid, 0), v)
                see_anon(pid)
        if not alive:
            for pid in find_daemons(root_run):
                v = proc_status_kib(pid, "VmHWM")
                if v is not None:
                    alive.add(pid)
                    if pid not in hwm:
                        order.append(pid)
                    hwm[pid] = max(hwm.get(pid, 0), v)
                    see_anon(pid)

    pending = []      # (workload, pids) waiting for the daemons' final value
    eof = False
    while not eof:
        r, _, _ = select.select([stdin], [], [], 0.1)
        if r:
            chunk = os.read(stdin.fileno(), 65536)
            if not chunk:
                eof = True
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                sys.stdout.buffer.write(line + b"\n")
                sys.stdout.buffer.flush()
                name = line.split(b"\t", 1)[0].decode(errors="replace")
                refresh()
                if name and alive:
                    pending.append((name, set(alive)))
        refresh()
    if buf:
        sys.stdout.buffer.write(buf)
    per_workload_anon = {}
    for name, pids in pending:
        vals = [hwm[p] for p in pids if p in hwm]
        if vals:
            per_workload[name] = max(vals)
        vals = [anon[p] for p in pids if p in anon]
        if vals:
            per_workload_anon[name] = max(vals)
    json.dump({"per_workload_kib": per_workload,
               "per_workload_anon_kib": per_workload_anon,
               "daemons": [{"pid": p, "vmhwm_kib": hwm[p]} for p in order],
               "max_kib": max(hwm.values()) if hwm else None},
              open(out_path, "w"), indent=1)


# ---------------------------------------------------------------- table

TIME_BASED = {"randread-cold"}
DESC = {
    "check": "merged-view check (walk + 100 hashes)",
    "statwalk-cold": "stat walk, 104,525 entries, cold",
    "statwalk-warm": "stat walk, warm",
    "readdir-cold": "readdir 50k-entry dir, cold",
    "readdir-warm": "readdir 50k-entry dir, warm",
    "smallread-cold": "small reads: tar 29,755 lower files",
    "seqread-cold": "seq read 1 GiB lower file",
    "randread-cold": "rand read 4k (time-based; IOPS)",
    "copyup": "copy-up 1 GiB (open+1 byte write)",
    "copyup-durable": "copy-up 1 GiB + sync",
    "seqwrite": "seq write 1 GiB, buffered",
    "seqwrite-durable": "seq write 1 GiB + sync",
    "randwrite": "rand write 4k over 1 GiB upper file",
    "untar": "untar 29,755 files + sync",
    "metadata": "create+stat+unlink 20k files, one dir",
    "cp-tree": "cp -a 9,817 lower files + sync",
    "rm-copied": "rm -rf of that copy + sync",
    "rm-lower": "rm -rf 9,724 lower files (whiteouts) + sync",
    "build": "cargo build -j2 (pjdfstest + 65 deps)",
}


def mean(xs):
    return sum(xs) / len(xs) if xs else None


def fmt_s(v):
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def fmt_r(v):
    return "-" if v is None else f"{v:.2f}"


def table(run_path):
    run = json.load(open(run_path))
    modes = run["modes"]
    ids = [m["id"] for m in modes]
    secs = {i: {} for i in ids}
    iops = {i: {} for i in ids}
    wl = []
    for m in modes:
        for p in m["runs"]:
            if not os.path.exists(p):
                continue
            j = json.load(open(p))
            for r in j["results"]:
                w = r["workload"]
                if w not in wl:
                    wl.append(w)
                secs[m["id"]].setdefault(w, []).append(r["seconds"])
                if "fio" in r:
                    iops[m["id"]].setdefault(w, []).append(r["fio"]["iops"])
    fuse = [i for i in ids if i != "kernel"]
    # The ratios are of verlay's default configuration when the run has it (what podman and
    # containerd users get), else of verlay with passthrough=1; verify=on / verify=off compares
    # the two passthrough=1 columns.
    ver = "verlaydef" if "verlaydef" in ids else "verlay"
    label = {m["id"]: m["label"] for m in modes}
    # the opt-in variants of the default (io_uring=on, writeback=1) get their own ratio to the
    # kernel column, beside the default's ratios
    extra = [i for i in ("verlayur", "verlaywb") if i in ids and "kernel" in ids]
    refs = [i for i in ids if i not in (ver, "verlayv") and i not in extra]
    has_v = "verlayv" in ids and "verlay" in ids

    head = ["workload"] + [f"{label[i]}" for i in ids]
    head += [f"{label[ver]} / {label[i]}" for i in refs]
    head += [f"{label[i]} / {label['kernel']}" for i in extra]
    if has_v:
        head.append("verify=on / verify=off")
    out = []
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))

    def ratio(a, b):  # verlay cost / ref cost
        if a is None or b is None or b <= 0:
            return None
        return a / b

    for w in wl:
        row = [f"{w}: {DESC.get(w, '')}".rstrip(": ")]
        tb = w in TIME_BASED
        for i in ids:
            vals = secs[i].get(w, [])
            if tb and iops[i].get(w):
                row.append(" / ".join(f"{v/1000:.1f}k" for v in iops[i][w]) + " IOPS")
            else:
                row.append(" / ".join(fmt_s(v) for v in vals) or "-")
        for r in refs:
            if tb and iops[ver].get(w) and iops[r].get(w):
                row.append(fmt_r(ratio(mean(iops[r][w]), mean(iops[ver][w]))))
            else:
                row.append(fmt_r(ratio(mean(secs[ver].get(w, [])), mean(secs[r].get(w, [])))))
        for x in extra:
            if tb and iops[x].get(w) and iops["kernel"].get(w):
                row.append(fmt_r(ratio(mean(iops["kernel"][w]), mean(iops[x][w]))))
            else:
                row.append(fmt_r(ratio(mean(secs[x].get(w, [])), mean(secs["kernel"].get(w, [])))))
        if has_v:
            if tb and iops["verlay"].get(w) and iops["verlayv"].get(w):
                row.append(fmt_r(ratio(mean(iops["verlay"][w]), mean(iops["verlayv"][w]))))
            else:
                row.append(fmt_r(ratio(mean(secs["verlayv"].get(w, [])), mean(secs["verlay"].get(w, [])))))
        out.append("| " + " | ".join(row) + " |")

    # scaling: µs/op
    sc = {i: {} for i in ids}   # id -> op -> n -> [us]
    sizes = []
    for m in modes:
        for p in m.get("scaling", []):
            if not os.path.exists(p):
                continue
            j = json.load(open(p))
            for r in j["results"]:
                n = r["entries"]
                if n not in sizes:
                    sizes.append(n)
                for op in ("create", "unlink"):
                    sc[m["id"]].setdefault(op, {}).setdefault(n, []).append(r[f"{op}_us"])
    sizes.sort()
    if sizes:
        for op in ("create", "unlink"):
            for n in sizes:
                row = [f"{op} µs/op, {n:,} entries in one dir"]
                for i in ids:
                    vals = sc[i].get(op, {}).get(n, [])
                    row.append(" / ".join(f"{v:.1f}" for v in vals) or "-")
                for r in refs:
                    row.append(fmt_r(ratio(mean(sc[ver].get(op, {}).get(n, [])),
                                           mean(sc[r].get(op, {}).get(n, [])))))
                for x in extra:
                    row.append(fmt_r(ratio(mean(sc[x].get(op, {}).get(n, [])),
                                           mean(sc["kernel"].get(op, {}).get(n, [])))))
                if has_v:
                    row.append(fmt_r(ratio(mean(sc["verlayv"].get(op, {}).get(n, [])),
                                           mean(sc["verlay"].get(op, {}).get(n, [])))))
                out.append("| " + " | ".join(row) + " |")
            lo, hi = sizes[0], sizes[-1]
            row = [f"**{op}: cost at {hi:,} / cost at {lo:,}**"]
            for i in ids:
                a, b = mean(sc[i].get(op, {}).get(hi, [])), mean(sc[i].get(op, {}).get(lo, []))
                row.append(f"**{fmt_r(ratio(a, b))}x**" if a and b else "-")
            row += [""] * (len(refs) + len(extra) + (1 if has_v else 0))
            out.append("| " + " | ".join(row) + " |")

    # peak RSS
    def mib(k):
        return None if k is None else k / 1024

    rss_rows = [("statwalk-warm", "daemon peak RSS (VmHWM) after the stat walks, MiB"),
                ("metadata", "daemon peak RSS after metadata (20k create/stat/unlink), MiB"),
                ("build", "daemon peak RSS after build, MiB")]
    rss = {i: [] for i in ids}
    sc_rss = {i: [] for i in ids}
    for m in modes:
        for p in m.get("rss", []):
            if os.path.exists(p):
                rss[m["id"]].append(json.load(open(p)))
        for p in m.get("scaling", []):
            if os.path.exists(p):
                v = json.load(open(p)).get("vmhwm_kib")
                if v:
                    sc_rss[m["id"]].append(v)

    def rss_row(title, getter):
        row = [title]
        vals = {}
        for i in ids:
            if i == "kernel":
                row.append("– (in kernel)")
                continue
            vs = [v for v in (getter(i)) if v is not None]
            vals[i] = mean(vs)
            row.append(" / ".join(f"{mib(v):.1f}" for v in vs) or "-")
        for r in refs:
            row.append("-" if r == "kernel" else fmt_r(ratio(vals.get(ver), vals.get(r))))
        row += ["-"] * len(extra)
        if has_v:
            row.append(fmt_r(ratio(vals.get("verlayv"), vals.get("verlay"))))
        return "| " + " | ".join(row) + " |"

    any_rss = any(rss[i] for i in ids)
    if any_rss:
        for w, title in rss_rows:
            if any(x["per_workload_kib"].get(w) for i in ids for x in rss[i]):
                out.append(rss_row(f"**{title}**" if w == "statwalk-warm" else title,
                                   lambda i, w=w: [x["per_workload_kib"].get(w) for x in rss[i]]))
            if w == "statwalk-warm" and any(x.get("per_workload_anon_kib", {}).get(w)
                                            for i in ids for x in rss[i]):
                out.append(rss_row("daemon peak anonymous RSS (RssAnon, without mapped files) "
                                   "after the stat walks, MiB",
                                   lambda i: [x.get("per_workload_anon_kib", {}).get("statwalk-warm")
                                              for x in rss[i]]))
        out.append(rss_row("daemon peak RSS, largest over all mounts of the workload set, MiB",
                           lambda i: [x.get("max_kib") for x in rss[i]]))
    if any(sc_rss[i] for i in ids):
        out.append(rss_row("daemon peak RSS after the scaling run, MiB", lambda i: sc_rss[i]))

    print("\n".join(out))
    print()
    for m in modes:
        tots = []
        for p in m["runs"]:
            if os.path.exists(p):
                tots.append(f"{json.load(open(p))['total_seconds']:.0f}")
        v = m.get("version", "")
        print(f"- {m['label']}: `{m['spec']}`"
              + (f" with `-o {m['opts']}`" if m.get("opts") else "")
              + (f"; {v}" if v else "")
              + (f"; workload set wall time {' / '.join(tots)} s" if tots else ""))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "rss-watch":
        rss_watch(sys.argv[2])
    elif len(sys.argv) == 3 and sys.argv[1] == "table":
        table(sys.argv[2])
    else:
        sys.exit(__doc__)
