#!/usr/bin/env bash
# run.sh: the one test command (README "Tests"; .ci/run runs it after tests/setup.sh).
#
#   bash tests/run.sh [--e2e-only] [BIN]
#
#   1. cargo test --release: unit tests and the integration tests in tests/*.rs, including
#      those that mount for real (they need root and /dev/fuse), and the snapshotter crate's
#      (snapshotter/tests: gRPC against a running verlay-snapshotter)
#   2. tests/e2e/pjdfstest.sh BIN: pjdfstest in a verlay mount, in its root and in a
#      directory of a lower layer, against tests/e2e/pjdfstest-expected.txt
#   3. tests/e2e/podman.sh BIN: podman run/create/diff/commit/mount with verlay as
#      mount_program, as root and rootless
#   4. tests/e2e/containerd.sh BIN: containerd with `verlay snapshotter` as proxy snapshotter
#      (import, pull, run, kill -9 during imports, restart under a running container)
# BIN defaults to ./target/release/verlay (--e2e-only skips step 1, e.g. to try the e2e
# scripts with BIN=/usr/bin/fuse-overlayfs). Every step runs even when an earlier one
# failed. The last line is "N passed, N failed" over the e2e checks (cargo prints its own);
# the exit status is 1 when cargo test or any e2e check failed.
# Env: CARGO_TEST_TIMEOUT (s, default 900); PJD_TIMEOUT and PODMAN_TIMEOUT (s per run,
# default 120; one run normally takes 2-5 s), CONTAINERD_TIMEOUT (s per step, default 120).
set -euo pipefail
# shellcheck source=tests/e2e/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/e2e/lib.sh"

CARGO=1
[ "${1:-}" = --e2e-only ] && { CARGO=0; shift; }
BIN=${1:-$REPO/target/release/verlay}
export PJD_TIMEOUT=${PJD_TIMEOUT:-120} PODMAN_TIMEOUT=${PODMAN_TIMEOUT:-120}
cd "$REPO"

cargo_status=skipped
if [ "$CARGO" = 1 ]; then
  t=$(now)
  if timeout --kill-after=30 "${CARGO_TEST_TIMEOUT:-900}" cargo test --release; then
    cargo_status="ok ($(since "$t") s)"
  else
    cargo_status="FAILED ($(since "$t") s)"
  fi
fi

passed=0 failed=0 times=""
for script in tests/e2e/pjdfstest.sh tests/e2e/podman.sh tests/e2e/containerd.sh; do
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

echo "=== cargo test: $cargo_status; e2e:$times"
echo "$passed passed, $failed failed"
[ "$failed" = 0 ] && [ "${cargo_status#FAILED}" = "$cargo_status" ]
