#!/usr/bin/env bash
# containers.sh: the container workloads of the benchmark, verlay in its default configuration
# against the kernel overlay driver each container engine has built in, interleaved.
#
#   bash bench/containers.sh [--reps N] [--runs N] [--files N] [--only LIST] [--out FILE] [BIN]
#
#   podman-root      `podman run --rm IMAGE true` as root: podman's native overlay driver vs
#                    overlay.mount_program=verlay (tests/e2e/podman-run.sh, the test image)
#   podman-rootless  the same as an unprivileged user (tests/e2e/rootless-user.sh makes
#                    verlaybench; rootless native overlay needs Linux >= 5.11)
#   ctr-run          `ctr run --rm IMAGE id true`: containerd's overlayfs snapshotter vs the
#                    verlay snapshotter, in one containerd
#   unpack           `ctr image import` of the test image plus a layer of --files small files
#                    (default 20,000; tests/e2e/image.sh IMAGE_SMALL_FILES), each snapshotter
#                    in its own fresh containerd
#
#   --reps N   interleaved repetitions (default 3): native, verlay, native, verlay, ...
#   --runs N   timed container runs per repetition for podman and ctr run (default 5)
#   --only L   comma-separated subset of podman-root,podman-rootless,ctr-run,unpack
#   --out F    also write the result table (markdown) to F
#   BIN        the verlay binary (default target/release/verlay; verlay-snapshotter beside it)
#
# Prints one line per timed step, then a table of medians and the ratio verlay / native.
# Timings include the engine's own work (podman's storage, containerd's content store and
# gzip), which is the same on both sides: the ratio is what a user sees, not the mount alone.
# Nothing else should run on the machine meanwhile. Needs root and what tests/setup.sh installs.
# Cleanup: every containerd, snapshotter and podman it started is stopped by PID (the harness
# scripts' own cleanup), the bench user removed, the work dir deleted.
set -euo pipefail
# shellcheck source=tests/e2e/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../tests/e2e/lib.sh"

REPS=3 RUNS=5 FILES=20000 ONLY="podman-root,podman-rootless,ctr-run,unpack" OUT="" BINARG=""
while [ $# -gt 0 ]; do
  case "$1" in
    --reps) REPS=$2; shift ;;
    --runs) RUNS=$2; shift ;;
    --files) FILES=$2; shift ;;
    --only) ONLY=$2; shift ;;
    --out) OUT=$2; shift ;;
    -h|--help) awk 'NR>1 && /^#/ {sub(/^# ?/, ""); print; next} NR>1 {exit}' "$0"; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) BINARG=$1 ;;
  esac
  shift
done
for v in "$REPS" "$RUNS" "$FILES"; do
  case $v in ''|*[!0-9]*) die "--reps, --runs and --files want numbers" ;; esac
done
[ "$REPS" -ge 1 ] && [ "$REPS" -le 50 ] && [ "$RUNS" -ge 1 ] && [ "$RUNS" -le 100 ] ||
  die "--reps is 1..50, --runs 1..100"
need_root
BIN=$(resolve_bin "$BINARG")
BINDIR=$(dirname "$BIN")
[ -x "$BINDIR/verlay-snapshotter" ] || die "verlay-snapshotter not found beside $BIN"
C=$E2E/containerd-env.sh
BUSER=verlaybench
TO=300

# short: podman refuses a runroot path over 50 characters
WORK=$(mktemp -d /tmp/vbc.XXXXXX)
chmod 755 "$WORK"
touch "$WORK/ctds" "$WORK/snap-pids"
cleanup() {
  local rc=$? d p
  while read -r d; do bash "$C" stop "$d" >/dev/null 2>&1 || true; done < "$WORK/ctds"
  for p in $(cat "$WORK/snap-pids"); do kill "$p" 2>/dev/null || true; done
  awk -v w="$WORK/" 'index($5, w) == 1 { print $5 }' /proc/self/mountinfo | sort -r | while read -r m; do
    fusermount3 -u "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
  done
  if [ -f "$WORK/made-user" ]; then bash "$E2E/rootless-user.sh" remove "$BUSER" >/dev/null 2>&1 || true; fi
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
wants() { [[ ",$ONLY," == *",$1,"* ]]; }

# A copy of the binaries the bench user can execute (BIN may sit under root's home).
mkdir -p "$WORK/bin"
cp "$BIN" "$BINDIR/verlay-snapshotter" "$WORK/bin/"
chmod 755 "$WORK/bin" "$WORK/bin/"*
V=$WORK/bin/verlay
# containerd's mount.fuse3 and ctr's own temporary mounts look for `verlay` in the PATH
export PATH=$WORK/bin:$PATH

# samples NAME MODE: one line per timed step, "NAME MODE SECONDS", into WORK/samples
sample() { echo "$1 $2 $3" >> "$WORK/samples"; log "$1 $2: $3 s"; }

# podman: one podman-run.sh call (load, one untimed run, RUNS timed runs); the timing lines
# are "[ 0.512s] podman run -> rc=0"
podman_rep() {  # podman_rep NAME MODE [podman-run.sh options]
  local name=$1 mode=$2 mp=native t; shift 2
  [ "$mode" = verlay ] && mp=$V
  local out=$WORK/$name-$mode.log
  bash "$E2E/podman-run.sh" -w "$WORK/p-$mode" -r "$RUNS" "$@" "$mp" true > "$out" 2>&1 ||
    { tail -n 20 "$out" "$WORK/p-$mode/podman.log" >&2; die "podman-run.sh ($name, $mode) failed; logs above"; }
  grep -E '^\[ *[0-9.]+s\] podman run -> rc=0' "$out" | tail -n "$RUNS" |
    sed -E 's/^\[ *([0-9.]+)s\].*/\1/' | while read -r t; do sample "$name" "$mode" "$t"; done
  rm -rf "$WORK/p-$mode"
}

snap_start() {  # snap_start DIR
  local d=$1 i
  mkdir -p "$d"
  VERLAY_LOG_FILE= setsid "$V" snapshotter --root "$d/root" --address "$d/snap.sock" \
    >>"$d/snap.log" 2>&1 </dev/null &
  echo $! >> "$WORK/snap-pids"
  for i in $(seq 100); do [ -S "$d/snap.sock" ] && return 0; sleep 0.05; done
  tail -5 "$d/snap.log" >&2; die "snapshotter in $d did not start"
}
ctd_start() {  # ctd_start DIR: containerd on DIR/ctd with DIR's verlay snapshotter
  echo "$1/ctd" >> "$WORK/ctds"
  VERLAY_LOG_FILE=$1/verlay.log timeout "$TO" bash "$C" start "$1/ctd" \
    --proxy "verlay=$1/snap.sock" --path "$WORK/bin" >/dev/null
}
ctd_stop() { bash "$C" stop "$1/ctd" >/dev/null 2>&1 || true; }
timed() {  # timed NAME MODE CMD...: runs CMD, records its wall time
  local name=$1 mode=$2 a b; shift 2
  a=$(now)
  "$@" > "$WORK/last.out" 2>&1 || { cat "$WORK/last.out" >&2; die "$name ($mode) failed: $*"; }
  b=$(now)
  sample "$name" "$mode" "$(awk -v a="$a" -v b="$b" 'BEGIN { printf "%.3f", b - a }')"
}

if wants podman-root || wants podman-rootless || wants ctr-run; then
  bash "$E2E/image.sh" "$WORK/image" >/dev/null || die "tests/e2e/image.sh failed"
fi
if wants podman-rootless; then
  if ! id "$BUSER" >/dev/null 2>&1; then
    bash "$E2E/rootless-user.sh" add "$BUSER" >/dev/null && touch "$WORK/made-user"
  fi
fi
if wants unpack; then
  log "building the unpack image: test image + $FILES small files"
  IMAGE_SMALL_FILES=$FILES bash "$E2E/image.sh" "$WORK/big" localhost/verlay-bench-big:1 >/dev/null ||
    die "tests/e2e/image.sh (IMAGE_SMALL_FILES=$FILES) failed"
fi
if wants ctr-run; then
  snap_start "$WORK/run"
  ctd_start "$WORK/run"
  for sn in overlayfs verlay; do
    bash "$C" ctr "$WORK/run/ctd" image import --snapshotter "$sn" "$WORK/image/image.oci.tar" >/dev/null
    # the first run unpacks nothing more but mounts cold: untimed
    bash "$C" run "$WORK/run/ctd" --snapshotter "$sn" localhost/verlay-test:1 "warm-$sn" true >/dev/null
  done
fi

for rep in $(seq "$REPS"); do
  log "repetition $rep of $REPS"
  for mode in native verlay; do
    wants podman-root && podman_rep podman-root "$mode"
    wants podman-rootless && podman_rep podman-rootless "$mode" -u "$BUSER"
    if wants ctr-run; then
      sn=overlayfs; [ "$mode" = verlay ] && sn=verlay
      for i in $(seq "$RUNS"); do
        timed ctr-run "$mode" bash "$C" run "$WORK/run/ctd" --snapshotter "$sn" \
          localhost/verlay-test:1 "r$rep-$i" true
      done
    fi
    if wants unpack; then
      sn=overlayfs; [ "$mode" = verlay ] && sn=verlay
      d=$WORK/unpack-$rep-$mode
      snap_start "$d"
      ctd_start "$d"
      sync
      timed unpack "$mode" bash "$C" ctr "$d/ctd" image import --snapshotter "$sn" "$WORK/big/image.oci.tar"
      ctd_stop "$d"
      rm -rf "$d"
    fi
  done
done

table() {
  echo "| workload | native (median s) | verlay default (median s) | verlay / native | samples each |"
  echo "|---|---|---|---|---|"
  awk '{ v[$1 " " $2] = v[$1 " " $2] " " $3; n[$1 " " $2]++ ; if (!seen[$1]++) order[++k] = $1 }
       function median(s,   a, m, i, j, t) {
         m = split(s, a, " ")
         for (i = 1; i <= m; i++) for (j = i + 1; j <= m; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
         return m % 2 ? a[(m + 1) / 2] : (a[m / 2] + a[m / 2 + 1]) / 2
       }
       END {
         for (i = 1; i <= k; i++) {
           w = order[i]; a = median(v[w " native"]); b = median(v[w " verlay"])
           printf "| %s | %.3f | %.3f | %.2f | %d |\n", w, a, b, (a > 0 ? b / a : 0), n[w " verlay"]
         }
       }' "$WORK/samples"
}
echo
echo "bench/containers.sh, $(date -u +%Y-%m-%dT%H:%MZ), verlay $(cd "$REPO" && git describe --always --dirty), reps $REPS, runs $RUNS, files $FILES"
table | tee "${OUT:-/dev/null}"
