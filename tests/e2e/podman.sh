#!/usr/bin/env bash
# podman.sh: real podman containers whose rootfs is a verlay mount, as root and rootless.
#
#   tests/e2e/podman.sh [BIN]           BIN: default ./target/release/verlay
#
# Two parts, each one tests/e2e/podman-run.sh call with its own work dir:
#   root      podman-run.sh -x BIN
#   rootless  rootless-user.sh add verlayci; verlayci installs verlay for itself, the way a
#             user without root does (`install.sh --user --from BIN's directory`, into
#             ~verlayci/.local), then podman-run.sh -u verlayci -x ~verlayci/.local/bin/verlay;
#             then `install.sh --user --uninstall`. Checks user-install (the files, --version)
#             and user-uninstall (every listed path gone). The user is removed at the end (if
#             this script created it). A BIN that is not a verlay with verlay-snapshotter
#             beside it (e.g. fuse-overlayfs) is copied to a place verlayci can run it from.
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
# as_user CMD...: CMD as the rootless user, in a clean environment with its own HOME
UHOME=$(getent passwd "$ROOTLESS_USER" | cut -d: -f6)
as_user() { runuser -u "$ROOTLESS_USER" -- env -i HOME="$UHOME" PATH=/usr/local/bin:/usr/bin:/bin "$@"; }
# reach DIR/NAME...: DIR if the rootless user can run every DIR/NAME, else a copy in WORK
reach() {
  local d=$1 n ok=1; shift
  for n in "$@"; do runuser -u "$ROOTLESS_USER" -- test -x "$d/$n" || ok=0; done
  if [ "$ok" = 1 ]; then echo "$d"; return; fi
  mkdir -p "$WORK/from"
  for n in "$@"; do install -m 0755 "$d/$n" "$WORK/from/$n"; done
  echo "$WORK/from"
}
USER_INSTALL=0
if [ "$(basename "$BIN")" = verlay ] && [ -x "$(dirname "$BIN")/verlay-snapshotter" ]; then
  USER_INSTALL=1
fi
if [ "$USER_INSTALL" = 1 ]; then
  t=$(now)
  # install.sh and packaging/ where the user can read them (the checkout may be in /root)
  mkdir -p "$WORK/installer"
  cp -r "$REPO/install.sh" "$REPO/packaging" "$WORK/installer/"
  chmod -R a+rX "$WORK/installer"
  FROM=$(reach "$(dirname "$BIN")" verlay verlay-snapshotter)
  RBIN=$UHOME/.local/bin/verlay
  if as_user bash "$WORK/installer/install.sh" --user --from "$FROM" > "$WORK/user-install.log" 2>&1 &&
    as_user "$RBIN" --version >> "$WORK/user-install.log" 2>&1 &&
    [ "$(stat -c %U "$RBIN")" = "$ROOTLESS_USER" ] &&
    [ -f "$UHOME/.config/systemd/user/verlay-snapshotter.service" ] &&
    grep -q "^ExecStart=$UHOME/.local/bin/verlay snapshotter " "$UHOME/.config/systemd/user/verlay-snapshotter.service"; then
    e2e_ok user-install "$(since "$t")"
  else
    tail -n 15 "$WORK/user-install.log" | sed 's/^/  | /'
    e2e_fail user-install "$(since "$t")" "install.sh --user as $ROOTLESS_USER failed; see $WORK/user-install.log"
  fi
else
  RBIN=$(reach "$(dirname "$BIN")" "$(basename "$BIN")")/$(basename "$BIN")
fi
log "rootless mount program: $RBIN"
part rootless -u "$ROOTLESS_USER" -x "$RBIN"

if [ "$USER_INSTALL" = 1 ]; then
  t=$(now)
  M=$UHOME/.local/share/verlay/installed.txt
  listed=$(awk '$1 == "file" || $1 == "dir" { print substr($0, length($1) + 2) }' "$M" 2>/dev/null || true)
  if ! as_user bash "$WORK/installer/install.sh" --user --uninstall > "$WORK/user-uninstall.log" 2>&1; then
    sed 's/^/  | /' "$WORK/user-uninstall.log"
    e2e_fail user-uninstall "$(since "$t")" "install.sh --user --uninstall as $ROOTLESS_USER failed"
  else
    left=$(while read -r f; do
      if [ -n "$f" ] && { [ -e "$f" ] || [ -L "$f" ]; }; then echo "$f"; fi
    done <<<"$listed")
    if [ -z "$listed" ]; then
      e2e_fail user-uninstall "$(since "$t")" "$M listed nothing"
    elif [ -n "$left" ]; then
      printf '%s\n' "$left" | sed 's/^/  left: /'
      e2e_fail user-uninstall "$(since "$t")" "install.sh --user --uninstall left files behind"
    else
      e2e_ok user-uninstall "$(since "$t")"
    fi
  fi
fi

e2e_summary
