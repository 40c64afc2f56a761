#!/usr/bin/env bash
# run.sh: the one test command (README "Tests"; .ci/run runs it after tests/setup.sh).
#
#   bash tests/run.sh [--e2e-only] [BIN]
#
#   1. cargo test --release: unit tests and the integration tests in tests/*.rs, including
#      those that mount for real (they need root and /dev/fuse), and the snapshotter crate's
#      (snapshotter/tests: gRPC against a running verlay-snapshotter)
#   then, without BIN: `bash install.sh --prefix P` into a new temporary prefix P (it builds
#   with cargo build --release when the binaries are older than the sources), check
#   "install" (the files, P/bin/verlay --version, `P/bin/verlay snapshotter --help`, the
#   unit's ExecStart; systemd-analyze verify where present), and BIN=P/bin/verlay for:
#   2. tests/e2e/pjdfstest.sh BIN: pjdfstest in a verlay mount, in its root and in a
#      directory of a lower layer, against tests/e2e/pjdfstest-expected.txt
#   3. tests/e2e/podman.sh BIN: podman run/create/diff/commit/mount with verlay as
#      mount_program, as root and rootless
#   4. tests/e2e/containerd.sh BIN: containerd with `verlay snapshotter` as proxy snapshotter
#      (import, pull, run, kill -9 during imports, restart under a running container)
#   4b. tests/e2e/containerd-lazy.sh BIN: the snapshotter as containerd's remote snapshotter
#      (ctr-remote image rpull of an eStargz image: no layer downloaded; ctr run reads lazily)
#   4c. tests/e2e/podman-lazy.sh BIN: `verlay als serve` as podman's additional layer store
#      (podman pull/run of an eStargz image without downloading its layers), root and rootless
#   5. tests/e2e/xfstests.sh BIN: fstests' quick subset (tests/e2e/xfstests-quick.txt) on
#      kernel overlayfs and on BIN, when $FSTESTS_DIR holds a built fstests tree (fstests is
#      not packaged and its source may not be kept here: docs/xfstests.md says how to build
#      it); without it the step prints why it did not run and counts as neither
#   6. check "uninstall": `bash install.sh --prefix P --uninstall` removes every file it
#      listed and leaves P empty
# Given BIN (e.g. /usr/bin/fuse-overlayfs, or ./target/release/verlay), nothing is installed
# and the scripts test BIN. --e2e-only skips step 1. Every step runs even when an earlier one
# failed. The last line is "N passed, N failed" over the e2e checks (cargo prints its own);
# the exit status is 1 when cargo test or any e2e check failed.
# Env: CARGO_TEST_TIMEOUT (s, default 1500); PJD_TIMEOUT and PODMAN_TIMEOUT (s per run,
# default 120; one run normally takes 2-5 s), CONTAINERD_TIMEOUT (s per step, default 120).
set -euo pipefail
# shellcheck source=tests/e2e/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/e2e/lib.sh"

CARGO=1
[ "${1:-}" = --e2e-only ] && { CARGO=0; shift; }
BIN=${1:-}
PREFIX=""
cleanup() {
  local rc=$?
  # an interrupted run: the temporary prefix goes, whatever is in it
  if [ -n "$PREFIX" ] && [ -d "$PREFIX" ]; then
    bash "$REPO/install.sh" --prefix "$PREFIX" --uninstall >/dev/null 2>&1 || true
    rm -rf "$PREFIX"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
export PJD_TIMEOUT=${PJD_TIMEOUT:-120} PODMAN_TIMEOUT=${PODMAN_TIMEOUT:-120}
cd "$REPO"

cargo_status=skipped
if [ "$CARGO" = 1 ]; then
  t=$(now)
  if timeout --kill-after=30 "${CARGO_TEST_TIMEOUT:-1500}" cargo test --release; then
    cargo_status="ok ($(since "$t") s)"
  else
    cargo_status="FAILED ($(since "$t") s)"
  fi
fi

# install: into a temporary prefix, the way users run verlay
# check_installed P: what install.sh promises is there and runs
check_installed() {
  local p=$1 f unit=$1/lib/systemd/system/verlay-snapshotter.service
  for f in bin/verlay bin/verlay-snapshotter; do
    [ -x "$p/$f" ] && [ "$(stat -c %a "$p/$f")" = 755 ] || { echo "$p/$f: missing or not mode 0755"; return 1; }
  done
  [ -f "$unit" ] || { echo "$unit: missing"; return 1; }
  "$p/bin/verlay" --version | grep -Eq '^verlay [0-9]+\.[0-9]+' || { echo "$p/bin/verlay --version: no version"; return 1; }
  "$p/bin/verlay" snapshotter --help | grep -q '^usage: verlay snapshotter' ||
    { echo "$p/bin/verlay snapshotter --help: not the snapshotter's help"; return 1; }
  grep -qx "ExecStart=$p/bin/verlay snapshotter --root /var/lib/verlay-snapshotter --address /run/verlay-snapshotter/verlay.sock" "$unit" ||
    { echo "$unit: ExecStart is not $p/bin/verlay snapshotter ..."; grep ExecStart "$unit"; return 1; }
  if command -v systemd-analyze >/dev/null; then systemd-analyze verify "$unit" || return 1; fi
  # completions: installed when this verlay prints them
  if "$p/bin/verlay" completions bash >/dev/null 2>&1; then
    [ -s "$p/share/bash-completion/completions/verlay" ] || { echo "verlay completions bash works but none were installed"; return 1; }
  fi
  for f in bin/verlay bin/verlay-snapshotter lib/systemd/system/verlay-snapshotter.service share/verlay/installed.txt; do
    grep -qx "file $p/$f" "$p/share/verlay/installed.txt" || { echo "installed.txt does not list $p/$f"; return 1; }
  done
}
passed=0 failed=0 times=""
if [ -z "$BIN" ]; then
  echo "=== install.sh into a temporary prefix"
  t=$(now)
  PREFIX=$(mktemp -d /tmp/verlay-prefix.XXXXXX)
  # the rootless podman test's user installs from it (tests/e2e/podman.sh)
  chmod 0755 "$PREFIX"
  if out=$(bash "$REPO/install.sh" --prefix "$PREFIX" 2>&1) && out=$out$'\n'$(check_installed "$PREFIX" 2>&1); then
    e2e_ok install "$(since "$t")"
    BIN=$PREFIX/bin/verlay
  else
    printf '%s\n' "$out" | tail -n 15 | sed 's/^/  | /'
    e2e_fail install "$(since "$t")" "bash install.sh --prefix $PREFIX failed"
    BIN=$REPO/target/release/verlay
    log "testing $BIN instead"
  fi
fi

for script in tests/e2e/pjdfstest.sh tests/e2e/podman.sh tests/e2e/containerd.sh tests/e2e/containerd-lazy.sh tests/e2e/podman-lazy.sh; do
  echo "=== $script $BIN"
  t=$(now) rc=0
  out=$(mktemp /tmp/verlay-e2e-out.XXXXXX)
  bash "$script" "$BIN" 2>&1 | tee "$out" || rc=$?
  ok=$(grep -c '^e2e: ok ' "$out" || true)
  bad=$(grep -c '^e2e: FAIL ' "$out" || true)
  rm -f "$out"
  # a script that stopped before reporting any check still counts as one failure
  [ "$rc" != 0 ] && [ "$bad" = 0 ] && { bad=1; echo "e2e: FAIL $script: exited $rc before reporting"; }
  passed=$((passed + ok)) failed=$((failed + bad))
  times="$times $(basename "$script" .sh) $(since "$t") s;"
done

if [ -n "${FSTESTS_DIR:-}" ]; then
  echo "=== tests/e2e/xfstests.sh $BIN (FSTESTS_DIR=$FSTESTS_DIR)"
  t=$(now) rc=0
  bash tests/e2e/xfstests.sh "$BIN" || rc=$?
  if [ "$rc" = 0 ]; then e2e_ok xfstests-quick "$(since "$t")"; else e2e_fail xfstests-quick "$(since "$t")" "exit $rc (table above)"; fi
  times="$times xfstests $(since "$t") s;"
else
  echo "=== xfstests: not run (FSTESTS_DIR is not set; docs/xfstests.md: build fstests, then FSTESTS_DIR=DIR bash tests/run.sh)"
fi

if [ -n "$PREFIX" ]; then
  echo "=== install.sh --uninstall"
  t=$(now)
  listed=$(awk '$1 == "file" || $1 == "dir" { print substr($0, length($1) + 2) }' "$PREFIX/share/verlay/installed.txt" 2>/dev/null || true)
  if ! out=$(bash "$REPO/install.sh" --prefix "$PREFIX" --uninstall 2>&1); then
    printf '%s\n' "$out" | sed 's/^/  | /'
    e2e_fail uninstall "$(since "$t")" "bash install.sh --prefix $PREFIX --uninstall failed"
  elif left=$(find "$PREFIX" -mindepth 1 | head -20) && [ -n "$left" ]; then
    printf '%s\n' "$left" | sed 's/^/  left: /'
    e2e_fail uninstall "$(since "$t")" "files left in $PREFIX"
  elif [ -z "$listed" ]; then
    e2e_fail uninstall "$(since "$t")" "installed.txt listed nothing"
  else
    e2e_ok uninstall "$(since "$t")"
    rmdir "$PREFIX"
  fi
fi
passed=$((passed + E2E_PASSED)) failed=$((failed + E2E_FAILED))

echo "=== cargo test: $cargo_status; e2e:$times"
echo "$passed passed, $failed failed"
[ "$failed" = 0 ] && [ "${cargo_status#FAILED}" = "$cargo_status" ]
