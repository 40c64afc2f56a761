#!/usr/bin/env bash
# xfstests-wrap.sh: turns fstests' `mount -t overlay` into a verlay mount. tests/e2e/xfstests.sh
# links it as mount, umount and df in a directory first in PATH; fstests takes its MOUNT_PROG,
# UMOUNT_PROG and DF_PROG from PATH (common/config: `type -P mount`), so every overlay mount
# of `./check -overlay` goes through here, and fstests still believes it tests overlay.
#
#   mount  -t overlay -o lowerdir=..,upperdir=..,workdir=.. [-o more] SOURCE TARGET
#          -> $XFST_VERLAY -o lowerdir=..,upperdir=..,workdir=..,more SOURCE TARGET
#          (verlay takes the kernel's overlay options and ignores the ones it has no use for);
#          the daemon's PID and TARGET go to $XFST_PIDS so the runner can stop it by PID.
#          Anything else (the ext4 base, remount) goes to the real mount unchanged.
#   umount ARGS: the real umount, then waits (at most 10 s, then SIGTERM, SIGKILL) for each
#          daemon whose mount is gone to exit: a FUSE unmount returns before the daemon has
#          closed its files in the base filesystem, and fstests unmounts that base next
#          (EBUSY otherwise).
#   df ARGS: the real df, with the type fuse.verlay shown as overlay (fstests' _fs_type reads
#          `df -T -P` and refuses a TEST_DEV mounted "as another fs type").
# Env (set by xfstests.sh): XFST_VERLAY, XFST_PIDS, XFST_REAL_MOUNT, XFST_REAL_UMOUNT,
# XFST_REAL_DF.
set -u

is_mounted() { awk -v m="$1" '$5 == m { found = 1 } END { exit !found }' /proc/self/mountinfo; }

# PIDs of $XFST_VERLAY whose argv ends with MOUNTPOINT (verlay keeps its argv when it
# daemonises; this script's own argv ends the same way, hence the executable check).
pids_serving() {
  local p last
  for p in /proc/[0-9]*; do
    [ "$(readlink "$p/exe" 2>/dev/null)" = "$XFST_VERLAY" ] || continue
    last=$(tr '\0' '\n' 2>/dev/null < "$p/cmdline" | tail -n 1) || continue
    [ "$last" = "$1" ] && echo "${p#/proc/}"
  done
  return 0
}

# Is PID still the daemon serving MNT? (A PID read earlier may have been reused since.)
serves() {
  local last
  last=$(tr '\0' '\n' 2>/dev/null < "/proc/$1/cmdline" | tail -n 1) || return 1
  [ "$last" = "$2" ]
}

wrap_mount() {
  local overlay=0 opts="" pos=() a
  while [ $# -gt 0 ]; do
    a=$1; shift
    case $a in
      -t) [ "${1:-}" = overlay ] && overlay=1; shift ;;
      -toverlay | --types=overlay) overlay=1 ;;
      -o) opts="$opts,${1:-}"; shift ;;
      -o*) opts="$opts,${a#-o}" ;;
      --options-mode | --options-source) shift ;;
      -*) ;;
      *) pos+=("$a") ;;
    esac
  done
  [ "$overlay" = 1 ] || exec "$XFST_REAL_MOUNT" "${ORIG[@]}"
  if [ "${#pos[@]}" != 2 ]; then
    echo "xfstests-wrap: mount -t overlay wants SOURCE and TARGET, got: ${ORIG[*]}" >&2
    exit 32
  fi
  local target rc=0 p
  target=$(readlink -f "${pos[1]}")
  "$XFST_VERLAY" -o "${opts#,}" "${pos[0]}" "$target" </dev/null || rc=$?
  for p in $(pids_serving "$target"); do echo "$p $target" >> "$XFST_PIDS"; done
  [ "$rc" = 0 ] || exit 32  # mount(8)'s "mount failure"
  exit 0
}

wrap_umount() {
  local rc=0 pid mnt i
  "$XFST_REAL_UMOUNT" "$@" || rc=$?
  [ -f "$XFST_PIDS" ] || exit "$rc"
  while read -r pid mnt; do
    is_mounted "$mnt" && continue
    for i in $(seq 100); do
      serves "$pid" "$mnt" || break
      [ "$i" = 90 ] && kill "$pid" 2>/dev/null
      sleep 0.1
    done
    serves "$pid" "$mnt" && kill -9 "$pid" 2>/dev/null
  done < "$XFST_PIDS"
  exit "$rc"
}

ORIG=("$@")
case $(basename "$0") in
  mount) wrap_mount "$@" ;;
  umount) wrap_umount "$@" ;;
  df)
    set -o pipefail
    "$XFST_REAL_DF" "$@" | sed 's/ fuse\.verlay / overlay     /'
    exit $?
    ;;
  *) echo "xfstests-wrap: called as $(basename "$0"); link it as mount, umount or df" >&2; exit 2 ;;
esac
