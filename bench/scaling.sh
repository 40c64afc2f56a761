#!/usr/bin/env bash
# bench/scaling.sh — per-operation cost of create and of unlink as one directory grows.
#
# Usage (as root; normally called by bench/run.sh):
#   bench/scaling.sh MODE --json FILE [--sizes "2500 5000 10000 20000"] [--tries 3]
# MODE: kernel | fuse:PROGRAM (PROGRAM -o lowerdir=...,upperdir=...,workdir=... MNT,
#       plus BENCH_FUSE_OPTS if set; unmounted with fusermount3 -u).
#
# One fresh mount per call, on the cached layers of bench/workloads.sh
# (lowerdir=BENCH_ROOT/layers/over:small:big, fresh empty upper and work), caches
# dropped after mounting. For each size N, in a new directory of the merged root:
# create N empty files (open O_CREAT|O_EXCL, close), then unlink them; µs/op is the
# loop's time / N (after an untimed warm-up of 1,000 creates and unlinks). Each size
# is measured TRIES times (sizes in increasing order, then again), each try in a new
# directory, and the fastest try is kept: on this VM noise only adds time (see
# bench/README.md). For a FUSE mode the daemon's VmHWM is read from
# /proc/PID/status just before the unmount (PID found by the mountpoint in its argv).
set -Eeuo pipefail

BL=${BENCH_ROOT:-/tmp/bl}
LAYERS=$BL/layers
MODE="" JSON="" SIZES="2500 5000 10000 20000" TRIES=3
die() { echo "scaling: error: $*" >&2; exit 1; }
log() { echo "scaling: $*" >&2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --json) JSON=$2; shift ;;
    --sizes) SIZES=$2; shift ;;
    --tries) TRIES=$2; shift ;;
    -h|--help) sed -n '2,/^set -Eeuo/p' "$0" | sed '$d'; exit 0 ;;
    -*) die "unknown option $1" ;;
    *) MODE=$1 ;;
  esac
  shift
done
[ "$(id -u)" = 0 ] || die "must run as root"
[ -n "$MODE" ] && [ -n "$JSON" ] || die "usage: scaling.sh MODE --json FILE [--sizes LIST]"
[ "$(cat "$LAYERS/.complete" 2>/dev/null)" != "" ] || die "no cached layers under $LAYERS (run bash bench/workloads.sh --prepare)"
PROG=""
case "$MODE" in
  kernel) ;;
  fuse:*) PROG=${MODE#fuse:}; [ -x "$PROG" ] || die "$PROG not executable" ;;
  *) die "MODE must be kernel or fuse:PROGRAM" ;;
esac

RUN=$BL/scaling/$$
MNT=$RUN/mnt
MOUNTED=0 DAEMON=""
is_mounted() { awk -v m="$1" '$5 == m {f=1} END {exit !f}' /proc/self/mountinfo; }
daemon_pids() {  # processes with MNT as one argv element (not fusermount3)
  local p a args
  for p in /proc/[0-9]*; do
    [ "${p#/proc/}" = $$ ] && continue
    { mapfile -d '' args < "$p/cmdline"; } 2>/dev/null || continue
    [ "$(cat "$p/comm" 2>/dev/null)" = fusermount3 ] && continue
    for a in "${args[@]}"; do [ "$a" = "$MNT" ] && { echo "${p#/proc/}"; break; }; done
  done
}
unmount() {
  [ "$MOUNTED" = 1 ] || return 0
  if [ -z "$PROG" ]; then umount "$MNT" || umount -l "$MNT"
  else
    fusermount3 -u "$MNT" || { sleep 1; fusermount3 -u "$MNT"; } || fusermount3 -uz "$MNT" || true
    local i p
    for p in $DAEMON; do  # wait for the daemon(s) we started to exit
      for i in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    done
  fi
  MOUNTED=0
}
cleanup() { local rc=$?; unmount || true; rm -rf "$RUN"; exit $rc; }
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$RUN/upper" "$RUN/work" "$MNT"
opts="lowerdir=$LAYERS/over:$LAYERS/small:$LAYERS/big,upperdir=$RUN/upper,workdir=$RUN/work"
if [ -z "$PROG" ]; then
  mount -t overlay overlay -o "$opts" "$MNT"
else
  [ -n "${BENCH_FUSE_OPTS:-}" ] && opts="$opts,$BENCH_FUSE_OPTS"
  "$PROG" -o "$opts" "$MNT" >>"$RUN/fuse.log" 2>&1 &
  LAUNCHER=$! exited=0
  for _ in $(seq 1 200); do
    is_mounted "$MNT" && break
    if [ $exited = 0 ] && ! kill -0 "$LAUNCHER" 2>/dev/null; then
      exited=1; wait "$LAUNCHER" || { cat "$RUN/fuse.log" >&2; die "$PROG exited with an error before mounting"; }
    fi
    sleep 0.05
  done
fi
is_mounted "$MNT" || die "mount of $MNT failed"
MOUNTED=1
[ -n "$PROG" ] && DAEMON=$(daemon_pids | tr '\n' ' ')
sync; echo 3 > /proc/sys/vm/drop_caches

res=$(python3 - "$MNT" "$TRIES" $SIZES <<'PYEOF'
import os, sys, time, json
mnt, tries, sizes = sys.argv[1], int(sys.argv[2]), [int(x) for x in sys.argv[3:]]
w = os.path.join(mnt, "warmup")          # untimed: first-touch costs of the daemon and python
os.mkdir(w)
for i in range(1000): os.close(os.open(f"{w}/f{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
for i in range(1000): os.unlink(f"{w}/f{i}")
os.rmdir(w)
runs = {n: [] for n in sizes}
for t in range(tries):
    for n in sizes:
        d = os.path.join(mnt, f"scale-{n}-{t}")
        os.mkdir(d)
        names = [os.path.join(d, f"f{i:06d}") for i in range(n)]
        os.sync()
        t0 = time.perf_counter()
        for p in names: os.close(os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        t1 = time.perf_counter()
        for p in names: os.unlink(p)
        t2 = time.perf_counter()
        os.rmdir(d)
        runs[n].append(((t1 - t0) / n * 1e6, (t2 - t1) / n * 1e6))
        print(f"scaling: try {t+1}: {n:6d} entries: create {runs[n][-1][0]:8.1f} us/op, unlink {runs[n][-1][1]:8.1f} us/op", file=sys.stderr)
out = [{"entries": n, "create_us": min(c for c, _ in runs[n]), "unlink_us": min(u for _, u in runs[n]),
        "create_us_all": [c for c, _ in runs[n]], "unlink_us_all": [u for _, u in runs[n]]} for n in sizes]
print(json.dumps(out))
PYEOF
)

hwm=""
if [ -n "$PROG" ]; then
  for p in $DAEMON; do
    v=$(awk '/^VmHWM:/ {print $2}' "/proc/$p/status" 2>/dev/null || true)
    [ -n "$v" ] && { [ -z "$hwm" ] || [ "$v" -gt "$hwm" ]; } && hwm=$v
  done
fi
unmount
python3 - "$JSON" "$MODE" "${BENCH_FUSE_OPTS:-}" "${hwm:-}" "$res" <<'PYEOF'
import json, sys
path, mode, opts, hwm, res = sys.argv[1:6]
json.dump({"mode": mode, "bench_fuse_opts": opts, "vmhwm_kib": int(hwm) if hwm else None,
           "results": json.loads(res)}, open(path, "w"), indent=1)
PYEOF
log "$MODE${BENCH_FUSE_OPTS:+ [$BENCH_FUSE_OPTS]}: done${hwm:+, daemon VmHWM $((hwm / 1024)) MiB}; $JSON"
