#!/usr/bin/env bash
# rootless-user.sh: the unprivileged user tests/e2e/podman.sh runs rootless podman as.
#
#   tests/e2e/rootless-user.sh add|remove|check USER
#
#   add     creates USER (no login shell use, home /tmp/USER-home, mode 0700) with one
#           /etc/subuid and /etc/subgid range of 65536 ids from 100000 (or the range useradd
#           already gave it: Debian 12's useradd adds one when /etc/subuid exists). Idempotent.
#   remove  stops USER's processes by PID (SIGTERM, then SIGKILL), deletes the user, its
#           subid ranges and its home
#   check   prints what rootless podman will find: ids, ranges, newuidmap, /dev/fuse
#
# Needs root and uidmap (newuidmap/newgidmap, setuid root).
set -euo pipefail

die() { echo "rootless-user.sh: error: $*" >&2; exit 2; }

cmd=${1:?usage: rootless-user.sh add|remove|check USER}
U=${2:?need USER}
[ "$(id -u)" = 0 ] || die "run as root"
HOME_DIR=/tmp/$U-home
SUBID_START=100000
SUBID_COUNT=65536

check() {
  id "$U"
  echo "subuid: $(grep "^$U:" /etc/subuid || echo none)"
  echo "subgid: $(grep "^$U:" /etc/subgid || echo none)"
  ls -l /usr/bin/newuidmap /usr/bin/newgidmap
  echo "/dev/fuse: $(stat -c '%A %U' /dev/fuse)" \
    "($(runuser -u "$U" -- test -w /dev/fuse && echo writable || echo NOT writable) by $U)"
  runuser -u "$U" -- unshare -Ur true || die "unshare -Ur as $U failed"
}

case "$cmd" in
add)
  id "$U" >/dev/null 2>&1 || useradd -M -d "$HOME_DIR" -s /bin/sh -U "$U"
  mkdir -p "$HOME_DIR"
  chown "$U": "$HOME_DIR"
  chmod 700 "$HOME_DIR"
  touch /etc/subuid /etc/subgid
  range=$SUBID_START-$((SUBID_START + SUBID_COUNT - 1))
  grep -q "^$U:" /etc/subuid || usermod --add-subuids "$range" "$U"
  grep -q "^$U:" /etc/subgid || usermod --add-subgids "$range" "$U"
  check
  ;;
remove)
  if id "$U" >/dev/null 2>&1; then
    for p in $(ps -o pid= -u "$U" 2>/dev/null); do kill "$p" 2>/dev/null || true; done
    for _ in $(seq 20); do [ -z "$(ps -o pid= -u "$U" 2>/dev/null)" ] && break; sleep 0.1; done
    for p in $(ps -o pid= -u "$U" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
    userdel "$U" 2>/dev/null || userdel -f "$U"
  fi
  # userdel removes the subid lines on Debian 12; older shadow versions do not
  sed -i "/^$U:/d" /etc/subuid /etc/subgid 2>/dev/null || true
  rm -rf "$HOME_DIR"
  ;;
check) check ;;
*) die "unknown command $cmd (add, remove, check)" ;;
esac
