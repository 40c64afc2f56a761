#!/usr/bin/env bash
# podman.sh: real podman containers whose rootfs is a verlay mount, as root and rootless.
#
#   tests/e2e/podman.sh [BIN]           BIN: default ./target/release/verlay
#
# Two parts, each one tests/e2e/podman-run.sh call with its own work dir:
#   root      podman-run.sh -x BIN
#   rootless  rootless-user.sh add verlayci, then podman-run.sh -u verlayci -x BIN; the user is
#             removed at the end (if this script created it)
# podman-run.sh runs `podman run --rm` with overlay.mount_program=BIN on the 3-layer test image
# of tests/e2e/image.sh, checking its replaced file, whiteout and opaque dir; with -x also
# create+start (write, delete, append, mkdir in an opaque dir), diff, commit, a run of the
# committed image checking the result, and as root podman mount/umount. Each step must succeed. podman calls BIN as `BIN -o OPTS MERGED`
# with empty options (",,", a trailing ","), "volatile", and a lowerdir-only mount for diff/commit.
# Needs root; podman, runc, uidmap, busybox-static, jq (tests/setup.sh installs them).
# Env: PODMAN_TIMEOUT (s, per part, default 120), KEEP=1 keeps the work dir.
set -euo pipefail
# shellcheck source=tests/e2e/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

need_root
BIN=$(resolve_bin "${1:-}")
command -v podman >/dev/null || die "podman missing: bash tests/setup.sh"
ROOTLESS_USER=verlayci

WORK=$(mktemp -d /tmp/verlay-podman.XXXXXX)
chmod 0755 "$WORK"
CREATED_USER=0
cleanup() {
  local rc=$?
  if [ "$CREATED_USER" = 1 ]; then
    bash "$E2E/rootless-user.sh" remove "$ROOTLESS_USER" >/dev/null 2>&1 ||
      { log "could not remove user $ROOTLESS_USER"; rc=1; }
  fi
  if [ "${KEEP:-0}" = 1 ] || [ "$rc" != 0 ]; then
    log "kept $WORK (podman-run.sh logs: $WORK/*/podman.log, $WORK/*/mount_program.log)"
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

part() {  # part NAME [podman-run.sh options]: one podman-run.sh call, its own work dir
  local name=$1 t rc=0; shift
  t=$(now)
  timeout --kill-after=10 "${PODMAN_TIMEOUT:-120}" \
    bash "$E2E/podman-run.sh" -w "$WORK/$name" "$@" > "$WORK/$name.log" 2>&1 || rc=$?
  # podman-run.sh prints one timing line per podman step, then the mount program's argv shapes
  grep -E '^\[ *[0-9.]+s\] podman |^FAILED|^Error' "$WORK/$name.log" | sed 's/^/  /' || true
  if [ "$rc" = 0 ]; then
    e2e_ok "podman-$name" "$(since "$t")"
  else
    [ "$rc" = 124 ] && log "podman-run.sh timed out after ${PODMAN_TIMEOUT:-120} s"
    tail -n 15 "$WORK/$name.log" | sed 's/^/  | /'
    e2e_fail "podman-$name" "$(since "$t")" "podman-run.sh exited $rc; see $WORK/$name.log and $WORK/$name/podman.log"
  fi
}

part root -x "$BIN"

t=$(now)
if id "$ROOTLESS_USER" >/dev/null 2>&1; then
  log "user $ROOTLESS_USER already exists: using it, not removing it"
elif bash "$E2E/rootless-user.sh" add "$ROOTLESS_USER" > "$WORK/rootless-user.log" 2>&1; then
  CREATED_USER=1
else
  CREATED_USER=1
  cat "$WORK/rootless-user.log" >&2
  e2e_fail podman-rootless "$(since "$t")" "rootless-user.sh add $ROOTLESS_USER failed"
  e2e_summary
fi
# the rootless mount program runs as that user: it must be able to reach BIN
RBIN=$BIN
if ! runuser -u "$ROOTLESS_USER" -- test -x "$BIN"; then
  RBIN=$WORK/bin/$(basename "$BIN")
  install -D -m 0755 "$BIN" "$RBIN"
fi
part rootless -u "$ROOTLESS_USER" -x "$RBIN"

e2e_summary
