#!/usr/bin/env bash
# bench/run.sh — verlay against kernel overlayfs, fuse-overlayfs 1.10 (C) and
# fuse-overlayfs 2.0 (Rust), same workloads on the same cached layers, one run.
# Not part of CI. Run as root on a machine like CI's (Debian 12, /dev/fuse).
#
# Usage:
#   bash bench/run.sh [--quick] [--reps N] [--out FILE] [--modes LIST] [--no-scaling|--scaling-only]
#
#   --quick       smoke run (a few minutes per mode set): BENCH_SHORT=1 and a
#                 subset of the workloads; scaling at 2,500 and 20,000 entries, 1 try
#   --reps N      run the mode sequence N times, interleaved: kernel, 1.10, 2.0,
#                 verlay, then again kernel, 1.10, ... (default 1)
#   --out FILE    markdown results file (default BENCH_ROOT/verlay-bench/<time>/results.md)
#   --modes LIST  comma-separated subset of: kernel,fo110,fo20,verlaydef,verlay,verlayv,verlaynp,
#                 verlayur,verlaywb (default all but verlaynp, verlayur and verlaywb).
#                 verlayur is the default plus io_uring=on (enable_uring is set to Y for that
#                 mode only), verlaywb the default plus writeback=1. verlaydef is verlay with no options at all, as
#                 podman and the snapshotter run it (verify=on: it checks the layers sealed for
#                 verlayv, passthrough off); verlay and verlayv use passthrough=1, verlaynp not
#   --no-scaling  skip the create/unlink scaling workload
#   --scaling-only  run only the scaling workload (no workloads.sh, no RSS rows
#                 but the scaling mount's)
#
# What it does:
#   1. installs what is missing (idempotent): Debian's fio, fuse3, fuse-overlayfs
#      (C 1.10), python3, tar; fuse-overlayfs 2.0.0 from crates.io with
#      `cargo install fuse-overlayfs --version 2.0.0 --locked --root /opt/fuse-overlayfs-rs`
#      (about 1.5 min; only when mode fo20 is asked for and it is missing); builds verlay (`cargo build --release`);
#      builds the cached layers (bench/workloads.sh --prepare, once, ~2 min).
#   2. runs the workload set, bench/workloads.sh, once per mode: kernel | fuse:/usr/bin/fuse-overlayfs | fuse:/opt/fuse-overlayfs-rs/bin/fuse-overlayfs
#      | fuse:target/release/verlay with BENCH_FUSE_OPTS=verify=off, and again with
#      verify=on over the same layers sealed with `verlay layer seal` (mode verlayv).
#   3. runs bench/scaling.sh per mode: create and unlink cost (µs/op) at 2.5k, 5k,
#      10k and 20k entries in one directory (fastest of 3 tries), and the 20k/2.5k ratio.
#   4. watches each FUSE daemon's VmHWM (/proc/PID/status, found by the mountpoint
#      in its argv, read every 0.1 s until it exits) and reports the peak RSS of the
#      daemon that served the stat walks (and of the other mounts).
#   5. prints one table (seconds per workload and mode, ratios verlay/kernel,
#      verlay/fuse-overlayfs 1.10, verlay/fuse-overlayfs 2.0, peak RSS rows) with the
#      command, date, kernel, CPUs and memory on top, and writes it as markdown.
#
# Environment: BENCH_ROOT (default /tmp/bl; ~10 GB free while running), BENCH_REPS
# (workloads.sh's best-of count for the data-heavy groups, default 3, 1 with --quick).
# Wall time: full run ~15 min per --reps on 2 cores; --quick ~5 min.
set -Eeuo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
OVB=$HERE/workloads.sh
export BENCH_ROOT=${BENCH_ROOT:-/tmp/bl}
FO_RS_ROOT=/opt/fuse-overlayfs-rs
FO_RS=$FO_RS_ROOT/bin/fuse-overlayfs
FO_C=/usr/bin/fuse-overlayfs
QUICK_WORKLOADS="check,statwalk-cold,statwalk-warm,readdir-cold,readdir-warm,seqread-cold,randread-cold,copyup,copyup-durable,seqwrite,seqwrite-durable,metadata"

CMDLINE="bash bench/run.sh"; for a in "$@"; do CMDLINE+=" $(printf '%q' "$a")"; done
die() { echo "bench/run.sh: error: $*" >&2; exit 1; }
log() { echo "bench/run.sh: $*" >&2; }

QUICK=0 REPS=1 OUT="" MODES="kernel,fo110,fo20,verlaydef,verlay,verlayv" SCALING=1 SETS=1
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --reps) REPS=$2; shift ;;
    --out) OUT=$2; shift ;;
    --modes) MODES=$2; shift ;;
    --no-scaling) SCALING=0 ;;
    --scaling-only) SETS=0 ;;
    -h|--help) sed -n '2,/^set -Eeuo/p' "$0" | sed '$d'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done
[[ "$REPS" =~ ^[1-9][0-9]*$ ]] || die "--reps wants a positive number"
[ "$(id -u)" = 0 ] || die "must run as root (mounts, drop_caches)"
command -v cargo >/dev/null || { [ -x "$HOME/.cargo/bin/cargo" ] && export PATH=$HOME/.cargo/bin:$PATH; } \
  || die "cargo not found"

# ---------------------------------------------------------------- 1. install
t_install=$(date +%s)
missing=()
for p in fio fuse3 fuse-overlayfs python3 tar procps; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } >&2 \
    || die "apt-get install ${missing[*]} failed"
fi
# fuse-overlayfs 2.0 only when its mode is asked for (the install takes minutes)
if [[ ",$MODES," == *,fo20,* ]] &&
   ! { [ -x "$FO_RS" ] && grep -q '"fuse-overlayfs 2.0.0 ' "$FO_RS_ROOT/.crates.toml" 2>/dev/null; }; then
  log "cargo install fuse-overlayfs 2.0.0 into $FO_RS_ROOT (about 1.5 min)"
  cargo install fuse-overlayfs --version 2.0.0 --locked --root "$FO_RS_ROOT" >&2 \
    || die "cargo install fuse-overlayfs 2.0.0 failed"
fi
log "cargo build --release"
(cd "$REPO" && cargo build --release -q) >&2 || die "cargo build --release failed"
VERLAY=$(cd "$REPO" && cargo metadata --format-version 1 --no-deps 2>/dev/null \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/verlay
[ -x "$VERLAY" ] || die "verlay binary not found at $VERLAY"
bash "$OVB" --prepare >&2 || die "workloads.sh --prepare failed"
log "set-up done in $(( $(date +%s) - t_install )) s"

# ---------------------------------------------------------------- modes
declare -A SPEC OPTS LABEL VERSION
SPEC[kernel]=kernel;               OPTS[kernel]="";         LABEL[kernel]="kernel overlayfs"
SPEC[fo110]=fuse:$FO_C;            OPTS[fo110]="";          LABEL[fo110]="fuse-overlayfs 1.10"
SPEC[fo20]=fuse:$FO_RS;            OPTS[fo20]="";           LABEL[fo20]="fuse-overlayfs 2.0"
# verlaydef: no options, what podman's mount_program and the snapshotter's mounts get
# (passthrough off: every write through the daemon, strict fsync-failure refusal and commit
# pauses; verify=on, so it checks the layers when verlayv's manifests are beside them, as the
# snapshotter's sealed layers are checked). verlay and verlayv run with FUSE passthrough
# (opt-in); verlaynp is passthrough off with verify=off.
SPEC[verlaydef]=fuse:$VERLAY; OPTS[verlaydef]="";             LABEL[verlaydef]="verlay (default)"
SPEC[verlay]=fuse:$VERLAY;   OPTS[verlay]=verify=off,passthrough=1; LABEL[verlay]="verlay verify=off"
SPEC[verlayv]=fuse:$VERLAY;  OPTS[verlayv]=verify=on,passthrough=1; LABEL[verlayv]="verlay verify=on"
SPEC[verlaynp]=fuse:$VERLAY; OPTS[verlaynp]=verify=off;             LABEL[verlaynp]="verlay verify=off passthrough=0"
# the default plus one opt-in lever each: FUSE over io_uring (run_mode sets the fuse module's
# enable_uring to Y for this mode only and puts it back), and the writeback cache
SPEC[verlayur]=fuse:$VERLAY; OPTS[verlayur]=io_uring=on;            LABEL[verlayur]="verlay io_uring=on"
SPEC[verlaywb]=fuse:$VERLAY; OPTS[verlaywb]=writeback=1;            LABEL[verlaywb]="verlay writeback=1"
VERSION[kernel]="overlay params: $(for p in /sys/module/overlay/parameters/*; do printf '%s=%s ' "$(basename "$p")" "$(cat "$p" 2>/dev/null)"; done)"
# a program's first two --version lines; "not installed" when it is absent (fo20 is installed
# only when its mode runs)
prog_version() { if [ -x "$1" ]; then { "$1" --version 2>&1 || true; } | { grep -v 'unknown argument' || true; } | head -2 | tr '\n' ' '; else echo "not installed"; fi; }
VERSION[fo110]=$(prog_version "$FO_C")
VERSION[fo20]=$(prog_version "$FO_RS")
VERSION[verlay]="verlay $(cd "$REPO" && git describe --always --dirty 2>/dev/null || echo '?'), release build"
VERSION[verlayv]="${VERSION[verlay]}; layers sealed with verlay layer seal (manifests beside them)"
VERSION[verlaynp]=${VERSION[verlay]}
VERSION[verlaydef]=${VERSION[verlay]}
VERSION[verlayur]=${VERSION[verlay]}
VERSION[verlaywb]=${VERSION[verlay]}
IFS=, read -r -a MODE_IDS <<< "$MODES"
for m in "${MODE_IDS[@]}"; do [ -n "${SPEC[$m]:-}" ] || die "unknown mode '$m' (kernel,fo110,fo20,verlaydef,verlay,verlayv,verlaynp,verlayur,verlaywb)"; done
# verify=on needs manifests beside the cached layers (sealing reads them; it changes nothing
# in them). verify=off ignores the manifests.
if [[ ",$MODES," == *,verlayv,* ]]; then
  for l in "$BENCH_ROOT"/layers/*/; do
    l=${l%/}
    # Reuse a manifest newer than the layer, unless it is of the first format (64 KiB chunks,
    # no feature flag): the bench measures what `layer seal` writes now (flag 1, 4 KiB).
    if [ -e "$l.verlay-manifest" ] && [ "$l.verlay-manifest" -nt "$l" ] &&
       [ "$(od -An -tu4 -j24 -N8 "$l.verlay-manifest" | xargs)" = "1 4096" ]; then
      continue
    fi
    log "sealing $l for verify=on"
    "$VERLAY" layer seal "$l" >&2 || die "verlay layer seal $l failed"
  done
fi

STAMP=$(date +%Y%m%dT%H%M%S)
RES=$BENCH_ROOT/verlay-bench/$STAMP
mkdir -p "$RES"
[ -n "$OUT" ] || OUT=$RES/results.md
ONLY=() SIZES="2500 5000 10000 20000" TRIES=3
if [ "$QUICK" = 1 ]; then export BENCH_SHORT=1; ONLY=(--only "$QUICK_WORKLOADS"); SIZES="2500 20000" TRIES=1; fi

DATE=$(date -u '+%Y-%m-%d %H:%M UTC')
MEM=$(awk '/^MemTotal:/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)
CPU=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
HEADER="Command: \`$CMDLINE\`
Date: $DATE; kernel \`$(uname -r)\`; nproc $(nproc); memory $MEM; CPU ${CPU:-?}; $( . /etc/os-release 2>/dev/null; echo "${PRETTY_NAME:-?}")"
echo "$HEADER"
echo "Results: $RES"

# ---------------------------------------------------------------- 2-4. runs
leftover_check() {  # nothing of ours may stay mounted
  if awk -v r="$BENCH_ROOT/" 'index($5, r) == 1 {f=1} END {exit !f}' /proc/self/mountinfo; then
    log "warning: mounts left under $BENCH_ROOT:"; awk -v r="$BENCH_ROOT/" 'index($5, r) == 1 {print "  " $5}' /proc/self/mountinfo >&2
  fi
}
URING_PARAM=/sys/module/fuse/parameters/enable_uring
URING_WAS=$(cat "$URING_PARAM" 2>/dev/null || echo N)
restore_uring() { [ -w "$URING_PARAM" ] && echo "$URING_WAS" > "$URING_PARAM" 2>/dev/null || true; }
trap 'restore_uring; leftover_check' EXIT

run_mode() {  # id rep
  local id=$1 rep=$2 json=$RES/$1-rep$2.json rss=$RES/$1-rep$2.rss.json sc=$RES/$1-rep$2.scaling.json rc=0
  if [ "$id" = verlayur ]; then
    echo Y > "$URING_PARAM" || die "cannot set $URING_PARAM (io_uring=on needs it)"
  fi
  if [ "$SETS" = 0 ]; then :
  elif [ "$id" = kernel ]; then
    log "rep $rep: ${LABEL[$id]} (${SPEC[$id]}): workload set"
    BENCH_FUSE_OPTS="" bash "$OVB" "${SPEC[$id]}" --json "$json" --label "${LABEL[$id]}" "${ONLY[@]}" || rc=$?
  else
    log "rep $rep: ${LABEL[$id]} (${SPEC[$id]}${OPTS[$id]:+ -o ${OPTS[$id]}}): workload set"
    set +e
    BENCH_FUSE_OPTS=${OPTS[$id]} bash "$OVB" "${SPEC[$id]}" --json "$json" --label "${LABEL[$id]}" "${ONLY[@]}" \
      | python3 "$HERE/report.py" rss-watch "$rss"
    rc=${PIPESTATUS[0]}
    set -e
  fi
  [ "$rc" = 0 ] || log "warning: workloads.sh ${SPEC[$id]} exited with $rc"
  if [ "$SCALING" = 1 ]; then
    log "rep $rep: ${LABEL[$id]}: scaling ($SIZES entries, best of $TRIES)"
    BENCH_FUSE_OPTS=${OPTS[$id]} bash "$HERE/scaling.sh" "${SPEC[$id]}" --json "$sc" --sizes "$SIZES" --tries "$TRIES" \
      || log "warning: scaling.sh ${SPEC[$id]} failed"
  fi
  restore_uring
}
T0=$(date +%s)
for rep in $(seq 1 "$REPS"); do
  for id in "${MODE_IDS[@]}"; do run_mode "$id" "$rep"; done
done
log "all runs done in $(( $(date +%s) - T0 )) s"

# ---------------------------------------------------------------- 5. table
for m in "${MODE_IDS[@]}"; do
  printf '%s\t%s\t%s\t%s\t%s\n' "$m" "${SPEC[$m]}" "${OPTS[$m]}" "${LABEL[$m]}" "${VERSION[$m]}"
done > "$RES/modes.tsv"
python3 - "$RES" "$CMDLINE" "$DATE" "$REPS" "$QUICK" <<'PYEOF'
import json, sys
res, cmd, date, reps, quick = sys.argv[1:]
modes = []
for line in open(f"{res}/modes.tsv"):
    i, s, o, l, v = line.rstrip("\n").split("\t")
    reps_ = range(1, int(reps) + 1)
    modes.append({"id": i, "spec": s, "opts": o, "label": l, "version": v.strip(),
                  "runs": [f"{res}/{i}-rep{r}.json" for r in reps_],
                  "rss": [f"{res}/{i}-rep{r}.rss.json" for r in reps_],
                  "scaling": [f"{res}/{i}-rep{r}.scaling.json" for r in reps_]})
json.dump({"command": cmd, "date": date, "reps": int(reps), "quick": quick == "1", "modes": modes},
          open(f"{res}/run.json", "w"), indent=1)
PYEOF
{
  echo "# verlay benchmark results"
  echo
  echo "$HEADER" | sed 's/$/  /'
  echo
  echo "Workloads: bench/workloads.sh$([ "$QUICK" = 1 ] && echo " (--quick: BENCH_SHORT=1, --only $QUICK_WORKLOADS)")$([ "$SETS" = 0 ] && echo " not run (--scaling-only)"), then bench/scaling.sh (fastest of $TRIES tries per size); $REPS run(s) per mode, interleaved; one value per run (\"a / b\"), ratios of the means; ratio > 1 = verlay slower (randread: ratio of IOPS, same sense)."
  echo
  python3 "$HERE/report.py" table "$RES/run.json"
} > "$OUT"
echo
sed -n '/^Workloads:/,$p' "$OUT"
echo
echo "Markdown: $OUT"
