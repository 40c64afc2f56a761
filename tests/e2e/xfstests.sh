#!/usr/bin/env bash
# xfstests.sh: fstests (xfstests) generic tests on verlay, against kernel overlayfs as reference.
#
#   FSTESTS_DIR=/path/to/built/fstests tests/e2e/xfstests.sh [BIN]   BIN: default target/release/verlay
#
# Runs each test of a list twice with fstests' own overlay mode (`./check -overlay`, see its
# README.overlay): on kernel overlayfs, then on verlay. Both runs use the same two ext4 loop
# devices (sparse images in a mktemp dir) as TEST_DEV and SCRATCH_DEV. For the verlay run,
# tests/e2e/xfstests-wrap.sh is first in PATH as mount, umount and df: `mount -t overlay
# -o lowerdir=..,upperdir=..,workdir=.. SRC MNT` becomes `BIN -o ... SRC MNT`; fstests still
# believes it tests overlay (FSTYP=overlay, its overlay helpers, its checks).
#
# fstests is not built here: build it outside the repository (source: github.com/kdave/xfstests,
# tag v2026.01.05; build deps and steps in docs/xfstests.md) and point FSTESTS_DIR at it.
#
# Each test runs as its own `./check -overlay generic/NNN` under `timeout` (fstests has no
# per-test limit); after each, everything under the work dir is unmounted and every verlay
# daemon the wrapper started is stopped by PID. Prints one line per test:
#   generic/NNN  kernel=pass verlay=fail  (12.0 s / 40.1 s)  DIFF
# and exits 1 when a test passes on kernel overlayfs but not on verlay and is not listed in
# tests/e2e/xfstests-expected.txt (or is listed there and passes: a stale entry), 2 on a
# setup error.
#
# Env:
#   FSTESTS_DIR     built fstests tree (required)
#   XFST_TESTS      tests to run, e.g. "generic/001 generic/002"; default: the list in
#                   XFST_LIST, default tests/e2e/xfstests-quick.txt (about 9 min)
#   XFST_GROUP      instead: every test of this group in fstests' tests/generic/group.list,
#                   e.g. XFST_GROUP=all (the whole generic group: hours) or XFST_GROUP=quick
#   XFST_TIMEOUT    seconds per test and filesystem (default 300); over it is "timeout"
#   XFST_ONLY       kernel or verlay: run one side only (no comparison)
#   XFST_IMG_SIZE   size of each ext4 image (default 4G, sparse)
#   KEEP=1          keep the work dir (logs, fstests results) even on success
# Needs root, losetup, mkfs.ext4, fusermount3, kernel overlayfs.
set -euo pipefail
# shellcheck source=tests/e2e/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

need_root
[ -n "${FSTESTS_DIR:-}" ] || die "FSTESTS_DIR is not set (build fstests outside the repository as docs/xfstests.md says, then FSTESTS_DIR=/path/to/fstests $0)"
FSTESTS_DIR=$(readlink -f "$FSTESTS_DIR")
[ -x "$FSTESTS_DIR/check" ] && [ -x "$FSTESTS_DIR/ltp/fsstress" ] \
  || die "FSTESTS_DIR=$FSTESTS_DIR: no built fstests there (./check and ltp/fsstress missing: run make in it)"
BIN=$(resolve_bin "${1:-}")
EXPECTED=$REPO/tests/e2e/xfstests-expected.txt
WRAP=$REPO/tests/e2e/xfstests-wrap.sh
TIMEOUT=${XFST_TIMEOUT:-300}
ONLY=${XFST_ONLY:-}
for c in losetup mkfs.ext4 fusermount3 timeout; do
  command -v "$c" >/dev/null || die "$c missing (apt-get install util-linux e2fsprogs fuse3 coreutils)"
done
case $ONLY in "" | kernel | verlay) ;; *) die "XFST_ONLY=$ONLY: kernel or verlay" ;; esac

if [ -n "${XFST_TESTS:-}" ]; then
  read -r -a TESTS <<< "$XFST_TESTS"
elif [ -n "${XFST_GROUP:-}" ]; then
  mapfile -t TESTS < <(awk -v g="$XFST_GROUP" '/^[0-9]/ { for (i = 2; i <= NF; i++) if ($i == g) { print "generic/" $1; break } }' \
    "$FSTESTS_DIR/tests/generic/group.list")
else
  LIST=${XFST_LIST:-$REPO/tests/e2e/xfstests-quick.txt}
  mapfile -t TESTS < <(sed 's/#.*//' "$LIST" | awk 'NF { print $1 }')
fi
[ "${#TESTS[@]}" -gt 0 ] || die "no tests selected"

WORK=$(mktemp -d /tmp/verlay-xfstests.XXXXXX)
chmod 0755 "$WORK"
LOOPS=()
FAILED_SETUP=0

# Unmount everything mounted under WORK (deepest first, verlay mounts before their base) and
# stop every daemon the wrapper recorded, by PID. Used after each test and at exit.
unmount_all() {
  local m i pid mnt
  for i in 1 2 3; do
    mapfile -t ms < <(awk -v w="$WORK/" 'index($5, w) == 1 { print $5 }' /proc/self/mountinfo | sort -r)
    [ "${#ms[@]}" = 0 ] && break
    for m in "${ms[@]}"; do
      case $(awk -v m="$m" '$5 == m { t = $(NF - 2) } END { print t }' /proc/self/mountinfo) in
        fuse.*) fusermount3 -u "$m" 2>/dev/null || fusermount3 -u -z "$m" 2>/dev/null || true ;;
        *) umount "$m" 2>/dev/null || { [ "$i" = 3 ] && umount -l "$m" 2>/dev/null; } || true ;;
      esac
    done
    stop_daemons
  done
  stop_daemons
}

stop_daemons() {
  [ -f "$WORK/verlay.pids" ] || return 0
  local pid mnt i alive
  for i in $(seq 70); do
    alive=0
    while read -r pid mnt; do
      serves "$pid" "$mnt" || continue
      alive=1
      if [ "$i" = 50 ]; then log "verlay daemon $pid ($mnt) still running 5 s after unmount: SIGTERM"; kill "$pid" 2>/dev/null || true; fi
    done < "$WORK/verlay.pids"
    [ "$alive" = 0 ] && return 0
    sleep 0.1
  done
  while read -r pid mnt; do
    if serves "$pid" "$mnt"; then log "verlay daemon $pid: SIGKILL"; kill -9 "$pid" 2>/dev/null || true; fi
    is_mounted "$mnt" && { fusermount3 -u -z "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || true; }
  done < "$WORK/verlay.pids"
}

# Is PID still the daemon serving MNT? (A recorded PID may have been reused since.)
serves() {
  local last
  last=$(tr '\0' '\n' 2>/dev/null < "/proc/$1/cmdline" | tail -n 1) || return 1
  [ "$last" = "$2" ]
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  [ -n "${CHECK_PID:-}" ] && kill -- "-$CHECK_PID" 2>/dev/null
  unmount_all
  local l
  for l in "${LOOPS[@]}"; do losetup -d "$l" 2>/dev/null || log "could not detach $l"; done
  rm -f "$WORK"/*.img
  if [ "${KEEP:-0}" = 1 ] || [ "$rc" != 0 ]; then log "logs kept in $WORK"; else rm -rf "$WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Two ext4 loop devices: TEST_DEV and SCRATCH_DEV. fstests' -overlay mode makes the
# lower/upper/work dirs on them and mounts the overlay at $TEST_DIR/ovl-mnt etc.
for d in test scratch; do
  truncate -s "${XFST_IMG_SIZE:-4G}" "$WORK/$d.img"
  l=$(losetup --find --show "$WORK/$d.img") || die "losetup failed (no free loop device?)"
  LOOPS+=("$l")
  mkfs.ext4 -q -F "$l" >/dev/null || die "mkfs.ext4 $l failed"
  mkdir -p "$WORK/$d"
done
cat > "$WORK/local.config" <<EOF
export TEST_DEV=${LOOPS[0]}
export TEST_DIR=$WORK/test
export SCRATCH_DEV=${LOOPS[1]}
export SCRATCH_MNT=$WORK/scratch
export FSTYP=ext4
EOF
mkdir -p "$WORK/bin" "$WORK/logs"
for p in mount umount df; do ln -s "$WRAP" "$WORK/bin/$p"; done
REAL_MOUNT=$(type -P mount) REAL_UMOUNT=$(type -P umount) REAL_DF=$(type -P df)

# run_one MODE TEST: one fstests run; sets RESULT to pass, fail, notrun, timeout or error.
# Runs in this shell (not in $(...)) so that a signal interrupts the wait and the EXIT trap
# kills the test's process group at once.
run_one() {
  local mode=$1 t=$2 rc=0 path=$PATH
  local log=$WORK/logs/$mode-${t//\//-}.log
  [ "$mode" = verlay ] && path=$WORK/bin:$PATH
  (
    cd "$FSTESTS_DIR"
    exec setsid env PATH="$path" HOST_OPTIONS="$WORK/local.config" RESULT_BASE="$WORK/results-$mode" \
      XFST_VERLAY="$BIN" XFST_PIDS="$WORK/verlay.pids" XFST_REAL_MOUNT="$REAL_MOUNT" \
      XFST_REAL_UMOUNT="$REAL_UMOUNT" XFST_REAL_DF="$REAL_DF" \
      timeout --kill-after=10 "$TIMEOUT" ./check -overlay "$t"
  ) > "$log" 2>&1 &
  CHECK_PID=$!
  wait "$CHECK_PID" || rc=$?
  CHECK_PID=
  unmount_all
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then RESULT=timeout
  elif grep -q "^Passed all 1 tests" "$log"; then RESULT=pass
  elif grep -q "^Not run: $t\$" "$log"; then RESULT=notrun
  elif grep -q "^Failures: $t\$" "$log"; then RESULT=fail
  else RESULT=error
  fi
}

expected() { grep -v '^#' "$EXPECTED" 2>/dev/null | awk '{ print $1 }' | grep -qxF "$1"; }

log "${#TESTS[@]} tests, up to $TIMEOUT s each, logs in $WORK/logs"
printf '%-12s %-15s %-15s %-18s %s\n' test kernel verlay "time (s)" difference
declare -A R
T0=$(now)
BAD=0 SAME=0 DIFF=0
for t in "${TESTS[@]}"; do
  k=- v=- tk=0 tv=0 note=""
  if [ "$ONLY" != verlay ]; then s=$(now); run_one kernel "$t"; k=$RESULT; tk=$(since "$s"); fi
  if [ "$ONLY" != kernel ]; then s=$(now); run_one verlay "$t"; v=$RESULT; tv=$(since "$s"); fi
  R[$t]="$k $v"
  if [ -z "$ONLY" ]; then
    if [ "$k" = "$v" ]; then
      SAME=$((SAME + 1))
      if [ "$k" = pass ] && expected "$t"; then note="stale entry in $(basename "$EXPECTED")"; BAD=$((BAD + 1)); fi
    else
      DIFF=$((DIFF + 1)) note=DIFF
      if [ "$k" = pass ]; then
        if expected "$t"; then note="DIFF (expected: $(grep "^$t " "$EXPECTED" | cut -d' ' -f2- | cut -c1-60))"
        else note="DIFF: passes on kernel overlayfs only"; BAD=$((BAD + 1)); fi
      fi
    fi
  fi
  why=""
  for m in kernel verlay; do
    r=${k}; [ "$m" = verlay ] && r=$v
    [ "$r" = notrun ] && why=$(sed -n "s|^$t.*\[not run\] ||p" "$WORK/logs/$m-${t//\//-}.log" | head -n 1 | cut -c1-50)
  done
  printf '%-12s %-15s %-15s %-18s %s\n' "$t" "kernel=$k" "verlay=$v" "$tk / $tv" "$note${why:+ [$why]}"
done
for m in k v; do
  [ "$m" = k ] && [ "$ONLY" = verlay ] && continue
  [ "$m" = v ] && [ "$ONLY" = kernel ] && continue
  line=""
  for r in pass fail notrun timeout error; do
    n=0
    for x in "${R[@]}"; do
      read -r a b <<< "$x"
      [ "$m" = k ] && [ "$a" = "$r" ] && n=$((n + 1))
      [ "$m" = v ] && [ "$b" = "$r" ] && n=$((n + 1))
    done
    line="$line $r $n,"
  done
  echo "$([ "$m" = k ] && echo "kernel overlayfs" || echo "verlay          "):${line%,}"
done
echo "xfstests.sh: ${#TESTS[@]} tests in $(since "$T0") s; same result $SAME, different $DIFF, unexpected $BAD"
[ "$BAD" = 0 ] || exit 1
