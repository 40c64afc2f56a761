#!/usr/bin/env bash
# bench/lazy.sh — lazy pulling through a slow link: containerd's overlayfs snapshotter (full
# pull) vs stargz-snapshotter 0.12 vs verlay's remote snapshotter, the same eStargz image.
# Not part of CI. Run as root on a machine like CI's (Debian 12, /dev/fuse).
#
# Usage:
#   bash bench/lazy.sh [--quick] [--runs N] [--ways a,b,c] [--files N] [--mb M]
#                      [--rate MBPS] [--delay-ms MS] [--out FILE] [--keep]
#
#   --quick       a smoke run: 200 files, 50 MB, 1 run per way
#   --runs N      cold runs per way, interleaved a b c a b c ... (default 3); medians reported
#   --ways LIST   a subset of a,b,c (default all three)
#   --files N --mb M   the data layer: N files adding up to about M MB (default 2000, 500)
#   --rate MBPS --delay-ms MS   the proxy's link (default 50 MB/s, 2 ms per request)
#   --out FILE    the markdown results (default BENCH_ROOT/verlay-lazy/<time>/results.md)
#   --keep        keep each run's directory (containerd's root, logs) under the results dir
#
# The image (bench/lazy.py image, seeded, cached under BENCH_ROOT/verlay-lazy/image-*):
# layer 1 a busybox base, layer 2 /data/hello.txt (one line, last in the blob) and N files of
# incompressible bytes. `verlay image import`, `verlay image convert --estargz` (default
# chunk size), `verlay image push` to a local docker-registry (tests/e2e/registry-env.sh).
# Every pull goes through bench/lazy.py proxy in front of that registry: MBPS shared by all
# connections, MS added to each request, bytes counted with the time of each write.
#
# The ways, each run cold (a new containerd, tests/e2e/containerd-env.sh, with a new root;
# a new snapshotter root):
#   a  containerd's overlayfs snapshotter: `ctr image pull --plain-http`, then `ctr run`
#   b  stargz-snapshotter 0.12: its daemon built here from Debian's Go packages
#      (bench/stargz/main.go, GOPATH mode, offline, ~1.5 min the first time), started inside containerd's mount
#      namespace (nsenter: / is a private mount here, so mounts it made on the host would not
#      reach containerd); `ctr-remote image rpull --plain-http --snapshotter stargz`, `ctr run`
#   c  verlay's snapshotter (`verlay-snapshotter`, as tests/e2e/containerd-lazy.sh runs it);
#      `ctr-remote image rpull --plain-http --snapshotter verlay`, `ctr run`
# The container runs `cat /data/hello.txt; find /data -type f -exec cat {} + | wc -c`; each
# output line is stamped as it arrives. Per run: the pull's time and bytes; time and bytes
# from the pull's start to the first line (hello.txt, checked); to the second (every /data
# file read: the byte count is checked against the image). Bytes are the proxy's (responses,
# heads included) up to each moment. A run whose output is wrong or whose step fails is
# counted as failed and left out of the medians (no retry).
#
# Cleanup (also on failure or Ctrl-C): each run's containerd and shims, snapshotter daemons,
# the registry and the proxy are stopped by PID; mounts under the work dir unmounted (in
# containerd's namespace too); the work dir removed unless --keep.
# Environment: BENCH_ROOT (default /tmp/bl; ~3 GB for the default image and its cache),
# LAZY_TIMEOUT (s per step, default 600).
set -Eeuo pipefail
# shellcheck source=tests/e2e/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../tests/e2e/lib.sh"
HERE=$REPO/bench

CMDLINE="bash bench/lazy.sh"; for a in "$@"; do CMDLINE+=" $(printf '%q' "$a")"; done
RUNS=3 WAYS=a,b,c FILES=2000 MB=500 RATE=50 DELAY=2 OUT="" KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) FILES=200 MB=50 RUNS=1 ;;
    --runs) RUNS=$2; shift ;;
    --ways) WAYS=$2; shift ;;
    --files) FILES=$2; shift ;;
    --mb) MB=$2; shift ;;
    --rate) RATE=$2; shift ;;
    --delay-ms) DELAY=$2; shift ;;
    --out) OUT=$2; shift ;;
    --keep) KEEP=1 ;;
    -h|--help) sed -n '2,/^set -Eeuo/p' "$0" | sed '$d'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done
for v in RUNS FILES MB; do [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "--${v,,} wants a positive number"; done
[ "$RUNS" -le 20 ] || die "--runs is capped at 20"
[[ "$WAYS" =~ ^[abc](,[abc])*$ ]] || die "--ways wants a subset of a,b,c"
need_root
export BENCH_ROOT=${BENCH_ROOT:-/tmp/bl}
TO=${LAZY_TIMEOUT:-600}
C=$REPO/tests/e2e/containerd-env.sh
REGENV=$REPO/tests/e2e/registry-env.sh
LZ=$BENCH_ROOT/verlay-lazy
mkdir -p "$LZ"

# ---------------------------------------------------------------- 1. install, build
pkgs=(containerd runc stargz-snapshotter docker-registry busybox-static jq curl python3 util-linux fuse3)
[[ "$WAYS" == *b* ]] && pkgs+=(golang-go golang-github-containerd-stargz-snapshotter-dev)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } >&2 ||
    die "apt-get install ${missing[*]} failed"
fi
log "cargo build --release"
(cd "$REPO" && cargo build --release -q) >&2 || die "cargo build --release failed"
BIN=$(resolve_bin "")
BINDIR=$(dirname "$BIN")
VSNAP=$BINDIR/verlay-snapshotter
[ -x "$VSNAP" ] || die "$VSNAP missing after the build"
# mount.fuse3 looks for `verlay` in the PATH: in containerd's (--path) and in ctr's own, for
# ctr run mounts the rootfs itself for a moment to read /etc/group (containerd 1.6's
# WithAdditionalGIDs), as tests/e2e/containerd-lazy.sh does
export PATH=$BINDIR:$PATH

# stargz-snapshotter's daemon, from Debian's Go packages, offline (GOPATH mode). Debian has
# no k8s.io/cri-api, which service/resolver/cri.go (CRI mirror config, unused here) imports:
# a GOPATH entry in front of Debian's holds the package `service` (Debian's files, copied)
# and `service/resolver` without cri.go. Every other package is Debian's, unchanged.
SGBIN=$LZ/containerd-stargz-grpc
STARGZ_NOTE=""
if [[ "$WAYS" == *b* ]]; then
  log "go build bench/stargz (stargz-snapshotter $(dpkg-query -W -f='${Version}' golang-github-containerd-stargz-snapshotter-dev))"
  SGSRC=/usr/share/gocode/src/github.com/containerd/stargz-snapshotter/service
  SGOV=$LZ/gopath/src/github.com/containerd/stargz-snapshotter/service
  rm -rf "$LZ/gopath"
  mkdir -p "$SGOV/resolver"
  find "$SGSRC" -maxdepth 1 -name '*.go' ! -name '*_test.go' -exec cp {} "$SGOV/" \;
  cp "$SGSRC/resolver/registry.go" "$SGOV/resolver/"
  if ! (cd "$REPO" && GO111MODULE=off GOPATH=$LZ/gopath:/usr/share/gocode GOPROXY=off GOFLAGS= \
        GOCACHE=$LZ/gocache timeout 1800 go build -o "$SGBIN.new" ./bench/stargz) > "$LZ/go-build.log" 2>&1; then
    STARGZ_NOTE="the stargz daemon did not build (go build, GOPATH mode, from Debian's Go packages): $(grep -m3 -E 'cannot find package|error|undefined' "$LZ/go-build.log" | tr '\n' ' ')"
    log "$STARGZ_NOTE; full log $LZ/go-build.log; going on without way b"
    WAYS=$(tr ',' '\n' <<<"$WAYS" | grep -v '^b$' | paste -sd,)
  else
    mv "$SGBIN.new" "$SGBIN"
  fi
fi
IFS=, read -r -a WAY_IDS <<< "$WAYS"
[ ${#WAY_IDS[@]} -gt 0 ] || die "no way left to run"

# ---------------------------------------------------------------- 2. the image (cached)
IMG=$LZ/image-$FILES-$MB-v1
if [ ! -f "$IMG/done" ]; then
  log "building the image: $FILES files, ~$MB MB, then convert --estargz (a few minutes for 500 MB)"
  rm -rf "$IMG"
  python3 "$HERE/lazy.py" image "$IMG" --files "$FILES" --bytes "$((MB * 1000000))" >/dev/null
  timeout "$TO" "$BIN" image import -q --store "$IMG/store" --name lazy "$IMG/oci" >/dev/null
  timeout "$TO" "$BIN" image convert -q --store "$IMG/store" --estargz lazy esgz >/dev/null
  rm -rf "$IMG/oci/blobs"  # the store has what push needs; image.json stays
  touch "$IMG/done"
fi

STAMP=$(date +%Y%m%dT%H%M%S)
RES=$LZ/$STAMP
WORK=$RES/work
mkdir -p "$WORK"
[ -n "$OUT" ] || OUT=$RES/results.md

# ---------------------------------------------------------------- cleanup
PROXY_PID="" RUN_D="" RUN_SNAP_PID="" RUN_SG_PID=""
stop_pid() {  # PID SIGNAL: signal it, wait up to 10 s, then SIGKILL
  local p=$1
  [ -n "$p" ] || return 0
  kill "-$2" "$p" 2>/dev/null || return 0
  for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || return 0; sleep 0.1; done
  log "pid $p still running 10 s after SIG$2: SIGKILL"; kill -9 "$p" 2>/dev/null || true
}
stop_run() {  # the current run's daemons and mounts
  local d=$RUN_D cpid=""
  [ -n "$d" ] || return 0
  [ -f "$d/ctd/containerd.pid" ] && cpid=$(cat "$d/ctd/containerd.pid")
  # stargz's daemon: SIGTERM closes the snapshotter (it unmounts its layers); then whatever is
  # still mounted under the run dir in containerd's namespace
  stop_pid "$RUN_SG_PID" TERM
  if [ -n "$cpid" ] && kill -0 "$cpid" 2>/dev/null; then
    nsenter -t "$cpid" -m sh -c 'awk -v w="$0/" "index(\$5, w) == 1 { print \$5 }" /proc/self/mountinfo |
      sort -r | while read -r m; do umount "$m" 2>/dev/null || umount -l "$m"; done' "$d" 2>/dev/null || true
  fi
  bash "$C" stop "$d/ctd" >/dev/null 2>&1 || true
  stop_pid "$RUN_SNAP_PID" TERM
  e2e_reap_under "$d"
  RUN_D="" RUN_SNAP_PID="" RUN_SG_PID=""
  if [ "$KEEP" = 0 ]; then rm -rf "$d"; fi
}
cleanup() {
  local rc=$?
  stop_run
  stop_pid "$PROXY_PID" TERM
  bash "$REGENV" stop "$WORK/reg" >/dev/null 2>&1 || true
  if awk -v r="$WORK/" 'index($5, r) == 1 {f=1} END {exit !f}' /proc/self/mountinfo; then
    log "warning: mounts left under $WORK"
  fi
  [ "$KEEP" = 1 ] || rm -rf "$WORK/reg"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- 3. registry, push, proxy
RPORT=$(shuf -i 20000-40000 -n 1)
timeout 60 bash "$REGENV" start "$WORK/reg" "$RPORT" >/dev/null
log "verlay image push to 127.0.0.1:$RPORT (direct, not through the proxy)"
timeout "$TO" "$BIN" image push -q --store "$IMG/store" --image esgz "127.0.0.1:$RPORT/lazy/big:esgz" >/dev/null
setsid python3 "$HERE/lazy.py" proxy --upstream "127.0.0.1:$RPORT" --rate "$RATE" --delay-ms "$DELAY" \
  --log "$WORK/proxy.log" --port-file "$WORK/proxy.port" --max-seconds 7200 >"$WORK/proxy.err" 2>&1 </dev/null &
PROXY_PID=$!
for _ in $(seq 100); do [ -s "$WORK/proxy.port" ] && break; sleep 0.05; done
[ -s "$WORK/proxy.port" ] || { cat "$WORK/proxy.err" >&2; die "the proxy did not start"; }
PPORT=$(cat "$WORK/proxy.port")
REF=127.0.0.1:$PPORT/lazy/big:esgz
TOC=$(python3 "$HERE/lazy.py" toc-bytes "127.0.0.1:$RPORT" lazy/big esgz)

# ---------------------------------------------------------------- 4. runs
# the container's command: the first line is hello.txt, the second the bytes of every file
CMD='cat /data/hello.txt; find /data -type f -exec cat {} + | wc -c'
HELLO=$(jq -r .hello "$IMG/image.json")
DATA_BYTES=$(jq -r .data_bytes "$IMG/image.json")
until_() { python3 "$HERE/lazy.py" until "$PPORT" "$1"; }

start_env() {  # WAY DIR: the snapshotter(s) and containerd for one cold run
  local w=$1 d=$2 cpid
  case $w in
    a) timeout 60 bash "$C" start "$d/ctd" >/dev/null ;;
    b)
      timeout 60 bash "$C" start "$d/ctd" --proxy "stargz=$d/sg.sock" >/dev/null
      cpid=$(cat "$d/ctd/containerd.pid")
      # in containerd's mount namespace (setsid and nsenter -m exec: $! is the daemon)
      setsid nsenter -t "$cpid" -m -- "$SGBIN" --root "$d/sgroot" --address "$d/sg.sock" \
        >"$d/stargz.log" 2>&1 </dev/null &
      RUN_SG_PID=$!
      disown "$RUN_SG_PID"  # no job report if it has to be killed
      for _ in $(seq 200); do [ -S "$d/sg.sock" ] && return 0; sleep 0.05; done
      tail -5 "$d/stargz.log" >&2; return 1 ;;
    c)
      VERLAY_LOG_FILE= setsid "$VSNAP" --root "$d/vroot" --address "$d/snap.sock" >"$d/snap.log" 2>&1 </dev/null &
      RUN_SNAP_PID=$!
      disown "$RUN_SNAP_PID"
      for _ in $(seq 200); do [ -S "$d/snap.sock" ] && break; sleep 0.05; done
      [ -S "$d/snap.sock" ] || { tail -5 "$d/snap.log" >&2; return 1; }
      VERLAY_LOG_FILE=$d/verlay.log timeout 60 bash "$C" start "$d/ctd" --proxy "verlay=$d/snap.sock" --path "$BINDIR" >/dev/null ;;
  esac
}

pull() {  # WAY DIR
  local sock=$2/ctd/containerd.sock
  case $1 in
    a) timeout "$TO" ctr -a "$sock" image pull --plain-http "$REF" ;;
    b) timeout "$TO" ctr-remote -a "$sock" image rpull --plain-http --snapshotter stargz "$REF" ;;
    c) timeout "$TO" ctr-remote -a "$sock" image rpull --plain-http --snapshotter verlay "$REF" ;;
  esac
}

stamp() { local l; while IFS= read -r l; do printf '%s %s\n' "$EPOCHREALTIME" "$l"; done; }

one_run() {  # WAY N: one cold run; appends one JSON line to RES/runs.jsonl
  local w=$1 n=$2 d=$WORK/$1-$2 sn t0 tp t1="" t2="" l1="" l2="" ok=true why="" rc
  RUN_D=$d
  mkdir -p "$d"
  case $w in a) sn=() ;; b) sn=(--snapshotter stargz) ;; c) sn=(--snapshotter verlay) ;; esac
  start_env "$w" "$d" || { why="the environment did not start"; ok=false; }
  sleep 1  # nothing of the start-up in the counts
  t0=$EPOCHREALTIME
  if $ok && ! pull "$w" "$d" >"$d/pull.out" 2>&1; then ok=false why="pull failed: $(tail -n 2 "$d/pull.out" | tr '\n' ' ')"; fi
  tp=$EPOCHREALTIME
  if $ok; then
    set +e
    timeout "$TO" bash "$C" run "$d/ctd" "${sn[@]}" "$REF" "lazy-$w-$n" \
      sh -c "$CMD" 2>"$d/run.err" | stamp > "$d/run.out"
    rc=${PIPESTATUS[0]}
    set -e
    read -r t1 l1 < <(sed -n 1p "$d/run.out") || true
    read -r t2 l2 < <(sed -n 2p "$d/run.out") || true
    if [ "$rc" != 0 ]; then ok=false why="ctr run exited $rc: $(tail -n 2 "$d/run.err" | tr '\n' ' ')"
    elif [ "$l1" != "$HELLO" ]; then ok=false why="first line '$l1', want '$HELLO'"
    elif [ "${l2// /}" != "$DATA_BYTES" ]; then ok=false why="read ${l2// /} bytes of /data, want $DATA_BYTES"
    fi
  fi
  local b0 bp b1=0 b2=0
  b0=$(until_ "$t0"); bp=$(until_ "$tp")
  [ -n "$t1" ] && b1=$(until_ "$t1")
  [ -n "$t2" ] && b2=$(until_ "$t2")
  jq -n -c --arg way "$w" --argjson run "$n" --argjson ok "$ok" --arg why "$why" \
    --argjson t0 "$t0" --argjson tp "$tp" --arg t1 "$t1" --arg t2 "$t2" \
    --argjson b0 "$b0" --argjson bp "$bp" --argjson b1 "$b1" --argjson b2 "$b2" '{
      way: $way, run: $run, ok: $ok, why: $why, t0: $t0,
      pull_s: ($tp - $t0), pull_bytes: ($bp - $b0),
      first_s: (if $t1 == "" then null else ($t1 | tonumber) - $t0 end),
      first_bytes: (if $t1 == "" then null else $b1 - $b0 end),
      all_s: (if $t2 == "" then null else ($t2 | tonumber) - $t0 end),
      all_bytes: (if $t2 == "" then null else $b2 - $b0 end),
      read_s: (if $t2 == "" or $t1 == "" then null else ($t2 | tonumber) - ($t1 | tonumber) end)}' \
    | tee -a "$RES/runs.jsonl" >&2
  $ok || log "run $w-$n FAILED: $why"
  stop_run
}

LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
for n in $(seq "$RUNS"); do
  for w in "${WAY_IDS[@]}"; do
    log "run $n/$RUNS, way $w"
    one_run "$w" "$n"
  done
done
LOAD1=$(cut -d' ' -f1-3 /proc/loadavg)

# ---------------------------------------------------------------- 5. report
jq -n --argjson img "$(cat "$IMG/image.json")" --argjson toc "$TOC" --arg ways "$WAYS" '
  $img + $toc + {ways: ($ways | split(","))}' > "$RES/meta.json"
DATE=$(date -u '+%Y-%m-%d %H:%M UTC')
MEM=$(awk '/^MemTotal:/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)
{
  echo "Command: \`$CMDLINE\`"
  echo "Date: $DATE; kernel \`$(uname -r)\`; nproc $(nproc); memory $MEM; load average $LOAD0 before, $LOAD1 after"
  echo "verlay $(cd "$REPO" && git describe --always --dirty 2>/dev/null || echo '?'); containerd $(containerd --version | awk '{print $3}');" \
    "stargz-snapshotter $(dpkg-query -W -f='${Version}' golang-github-containerd-stargz-snapshotter-dev 2>/dev/null || echo 'not installed') (Debian, built with $(go version 2>/dev/null | awk '{print $3}' || echo 'no go'))"
  echo "Image: $(jq -r '"\(.files) files in /data, \(.data_bytes) bytes; eStargz layers \(.layers_bytes) bytes, TOCs + footers \(.toc_bytes) bytes"' "$RES/meta.json")"
  echo "Link: $RATE MB/s shared, $DELAY ms added per request; $RUNS cold run(s) per way, medians"
  [ -z "$STARGZ_NOTE" ] || echo "Way b left out: $STARGZ_NOTE"
  echo
  python3 "$HERE/lazy.py" report "$RES/runs.jsonl" "$RES/meta.json"
} > "$OUT"
cat "$OUT"
log "results in $OUT (runs: $RES/runs.jsonl, proxy log: $WORK/proxy.log)"
