#!/usr/bin/env bash
# pjdfstest.sh: POSIX conformance of a verlay mount (pjdfstest 0.2.2), in two places.
#
#   tests/e2e/pjdfstest.sh [BIN]        BIN: default ./target/release/verlay
#                                       (tests/run.sh passes an installed PREFIX/bin/verlay)
#
# Builds two lower layers and an empty upper and workdir, mounts
#   BIN -o lowerdir=L1:L2,upperdir=U,workdir=W MNT
# (as root verlay adds allow_other,default_permissions itself, like fuse-overlayfs), then runs
# tests/e2e/pjdfstest-run.sh twice, with --expected-failures tests/e2e/pjdfstest-expected.txt:
#   root      in MNT: pjdfstest's fresh temporary directory is made in the merged root
#   existing  in MNT/existing, a directory that exists in both lower layers: its parent
#             must be copied up before pjdfstest's temporary directory can be made in it
# (pjdfstest only ever touches files it created itself; copy-up of lower files is covered by
# the Rust integration tests, not here.)
# Each fails if any case beyond the expected list fails (or an expected one passes); every case
# runs once, nothing is re-run.
# Also checks that the lower layers are byte-for-byte unchanged afterwards and that the
# merged view of existing/ is right before the run.
# Needs root; pjdfstest, fuse3 (tests/setup.sh installs them). Env: PJD_TIMEOUT (s, per
# run, default 120), KEEP=1 keeps the work dir. One run takes a few seconds.
set -euo pipefail
# shellcheck source=tests/e2e/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

need_root
BIN=$(resolve_bin "${1:-}")
RUNNER=$E2E/pjdfstest-run.sh
EXPECTED=$E2E/pjdfstest-expected.txt
command -v fusermount3 >/dev/null || die "fusermount3 missing: bash tests/setup.sh"

WORK=$(mktemp -d /tmp/verlay-pjdfstest.XXXXXX)
# pjdfstest switches to the users nobody and tests: every directory above the mount must
# be searchable by them (mktemp -d makes 0700)
chmod 0755 "$WORK"
L1=$WORK/lower1 L2=$WORK/lower2 U=$WORK/upper W=$WORK/work M=$WORK/merged
mkdir -p "$L1/existing" "$L2/existing/sub" "$U" "$W" "$M"
echo one > "$L2/existing/file1"
echo two > "$L2/existing/file2"
echo three > "$L2/existing/sub/file3"
echo shadowed-by-l1 > "$L1/existing/file2"
echo top > "$L1/existing/top"
chmod -R a+rX,go-w "$WORK"
layer_sums() { (cd "$WORK" && find lower1 lower2 -printf '%p %y %m %U:%G %s\n' | sort && find lower1 lower2 -type f -exec sha256sum {} + | sort); }
BEFORE=$(layer_sums)

DAEMONS=()
cleanup() {
  local rc=$?
  unmount_and_stop "$M" "${DAEMONS[@]}"
  if is_mounted "$M"; then log "could not unmount $M"; rc=1; fi
  if [ "${KEEP:-0}" = 1 ]; then
    log "kept $WORK"
  elif [ "$rc" != 0 ]; then
    log "kept the logs in $WORK"
    rm -rf "$L1" "$L2" "$U" "$W" 2>/dev/null || true
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

t=$(now)
if ! "$BIN" -o "lowerdir=$L1:$L2,upperdir=$U,workdir=$W" "$M" </dev/null >"$WORK/mount.log" 2>&1; then
  cat "$WORK/mount.log" >&2
  for n in root existing; do e2e_fail "pjdfstest-$n" "$(since "$t")" "mount failed: $BIN"; done
  e2e_summary
fi
mapfile -t DAEMONS < <(pids_serving "$M")
if ! is_mounted "$M"; then
  cat "$WORK/mount.log" >&2
  for n in root existing; do e2e_fail "pjdfstest-$n" "$(since "$t")" "$BIN exited 0 but $M is not mounted"; done
  e2e_summary
fi
log "mounted $M with $BIN (daemon pid ${DAEMONS[*]:-unknown}) in $(since "$t") s"

# the merged view pjdfstest's second run works in: L1 shadows L2, both contribute
got=$( (cd "$M/existing" && find . -type f -printf '%p=' -exec cat {} \; | sort | tr '\n' ' ') || true)
want='./file1=one ./file2=shadowed-by-l1 ./sub/file3=three ./top=top '
if [ "$got" != "$want" ]; then
  for n in root existing; do e2e_fail "pjdfstest-$n" "$(since "$t")" "merged existing/ is wrong: got '$got', want '$want'"; done
  e2e_summary
fi

run() {  # run NAME DIR
  local name=$1 dir=$2 t rc=0 counts
  t=$(now)
  timeout --kill-after=10 "${PJD_TIMEOUT:-120}" \
    bash "$RUNNER" "$dir" --expected-failures "$EXPECTED" --log "$WORK/pjdfstest-$name.log" \
    > "$WORK/summary-$name.log" 2>&1 || rc=$?
  # failing names and the counts; the expected failures are in the log
  grep -Ev '^(expected failure: |[0-9]+ passed, )' "$WORK/summary-$name.log" | sed 's/^/  /' || true
  counts=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$WORK/summary-$name.log" | tail -n 1 || true)
  if [ -n "$counts" ]; then
    echo "  pjdfstest in $name: $counts, $(grep -c '^expected failure: ' "$WORK/summary-$name.log" || true) expected failures"
  fi
  if [ "$rc" = 0 ]; then
    e2e_ok "pjdfstest-$name" "$(since "$t")"
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    e2e_fail "pjdfstest-$name" "$(since "$t")" "timed out after ${PJD_TIMEOUT:-120} s"
  else
    local why="pjdfstest-run.sh exited $rc without a summary; see $WORK/summary-$name.log"
    [ -n "$counts" ] && why="failures beyond $(basename "$EXPECTED"); log $WORK/pjdfstest-$name.log"
    e2e_fail "pjdfstest-$name" "$(since "$t")" "$why"
  fi
}
run root "$M"
run existing "$M/existing"

if [ "$(layer_sums)" != "$BEFORE" ]; then
  e2e_fail lower-layers-unchanged 0 "a lower layer was modified through the mount"
  diff <(echo "$BEFORE") <(layer_sums) | head -20 >&2 || true
else
  e2e_ok lower-layers-unchanged 0
fi
e2e_summary
