#!/usr/bin/env bash
# containerd.sh: containerd 1.6 with verlay as its proxy snapshotter, end to end.
#
#   tests/e2e/containerd.sh [BIN]       BIN: default ./target/release/verlay
#                                       (verlay-snapshotter must sit beside it, as in an
#                                       install.sh prefix: tests/run.sh passes PREFIX/bin/verlay)
#
# Each check runs its own `verlay snapshotter` (a snapshotter's state belongs to one containerd
# root) and a private containerd (tests/e2e/containerd-env.sh), with BIN's directory first in
# the PATH of containerd and ctr (containerd runs mount.fuse3 ... -t verlay). The image is
# tests/e2e/image.sh's. Checks:
#   smoke            import + run (whiteout, opaque dir, write) with verlay and with containerd's
#                    own overlayfs snapshotter in one containerd; the timings are printed
#   import, run      ctr image import, ctr run checking the whiteout, the opaque dir, a write
#   sealed           every committed layer has a manifest and `verlay verify` finds it clean
#   view             `ctr snapshots view` of the top layer: a read-only verlay mount, merged right
#   restart-running  kill -9 of the snapshotter while a container runs, restart: the container
#                    still reads and writes its rootfs; a new container runs
#   kill-import-STEP the snapshotter killed (kill -9 from inside, VERLAY_SNAPSHOTTER_CRASH_AT)
#                    at a commit step during an import; restart: every sealed layer verifies,
#                    re-import and run work (STEP: commit.syncfs, commit.seal, commit.db)
#   kill-import-timed  kill -9 from outside at a random moment of an import; same checks
#   corrupt-eio      a byte changed in a committed layer: reading the file in a container
#                    fails (EIO) and the verlay log names the file
#   unsealed-refused a committed layer's manifest removed: the container does not start
#   registry, pull   ctr image pull --plain-http from a local docker-registry
#                    (tests/e2e/registry-env.sh), then run
#   pull-killed      the snapshotter killed at commit.seal during a pull; restart, pull, run
#   timing           ctr run on verlay vs overlayfs, 5 runs each, medians
# Needs root; containerd, runc, busybox-static, jq, docker-registry, skopeo (tests/setup.sh).
# Env: CONTAINERD_TIMEOUT (s, per step, default 120), KEEP=1 keeps the work dir.
set -euo pipefail
# shellcheck source=tests/e2e/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

need_root
BIN=$(resolve_bin "${1:-}")
BINDIR=$(dirname "$BIN")
SNAP=$BINDIR/verlay-snapshotter
[ -x "$SNAP" ] || die "$SNAP not found (cargo build --release builds it beside verlay)"
command -v containerd >/dev/null || die "containerd missing: bash tests/setup.sh"
C=$E2E/containerd-env.sh
REGENV=$E2E/registry-env.sh
TO=${CONTAINERD_TIMEOUT:-120}
# containerd's mount.fuse3 and ctr's temp-mount both look for `verlay` in the PATH
export PATH=$BINDIR:$PATH

WORK=$(mktemp -d /tmp/verlay-containerd.XXXXXX)
# What cleanup must stop, one per line (checks run in subshells, so not in shell variables).
touch "$WORK/ctds" "$WORK/regs" "$WORK/snap-pids"
cleanup() {
  local rc=$? d p
  while read -r d; do bash "$C" stop "$d" >/dev/null 2>&1 || true; done < "$WORK/ctds"
  while read -r d; do bash "$REGENV" stop "$d" >/dev/null 2>&1 || true; done < "$WORK/regs"
  for p in $(cat "$WORK/snap-pids"); do kill "$p" 2>/dev/null || true; done
  for p in $(cat "$WORK/snap-pids"); do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
  done
  e2e_reap_under "$WORK"
  if [ "${KEEP:-0}" = 1 ] || [ "$rc" != 0 ] || [ "$E2E_FAILED" != 0 ]; then
    log "kept $WORK (snapshotter logs: $WORK/*/snap.log, containerd: $WORK/*/ctd/containerd.log, verlay: $WORK/*/verlay.log)"
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# snap_start DIR [ENV=VALUE...]: a snapshotter on DIR/root, socket DIR/snap.sock
snap_start() {
  local d=$1 i; shift
  mkdir -p "$d"
  # `verlay snapshotter` execs verlay-snapshotter from beside it: same PID
  env "$@" VERLAY_LOG_FILE= setsid "$BIN" snapshotter --root "$d/root" --address "$d/snap.sock" \
    >>"$d/snap.log" 2>&1 </dev/null &
  echo $! > "$d/snap.pid"
  # no "Killed" job report from the shell when a test kills it
  disown $!
  echo $! >> "$WORK/snap-pids"
  for i in $(seq 100); do [ -S "$d/snap.sock" ] && return 0; sleep 0.05; done
  log "snapshotter in $d did not start:"; tail -5 "$d/snap.log" >&2
  return 1
}
snap_kill9() { local p; p=$(cat "$1/snap.pid"); kill -9 "$p" 2>/dev/null || true; while kill -0 "$p" 2>/dev/null; do sleep 0.05; done; }
snap_wait_dead() { local p i; p=$(cat "$1/snap.pid"); for i in $(seq 200); do kill -0 "$p" 2>/dev/null || return 0; sleep 0.05; done; return 1; }
# ctd_start DIR: containerd on DIR/ctd with the snapshotter of DIR; FUSE daemons log to DIR/verlay.log
ctd_start() {
  echo "$1/ctd" >> "$WORK/ctds"
  VERLAY_LOG_FILE=$1/verlay.log timeout "$TO" bash "$C" start "$1/ctd" --proxy "verlay=$1/snap.sock" --path "$BINDIR" >/dev/null
}
ctr_() { local d=$1; shift; timeout "$TO" bash "$C" ctr "$d/ctd" "$@"; }
# After a snapshotter restart containerd's gRPC client fails fast (Unavailable, "connection
# closed") until its reconnect backoff dials again, about 1 s: wait until a Prepare reaches
# the snapshotter, up to 10 s.
ctd_reconnect() {
  local i
  for i in $(seq 100); do
    if timeout "$TO" bash "$C" ctr "$1/ctd" snapshots --snapshotter verlay prepare "probe-$i" >/dev/null 2>&1; then
      timeout "$TO" bash "$C" ctr "$1/ctd" snapshots --snapshotter verlay rm "probe-$i"
      echo "containerd reached the restarted snapshotter after $i tries"
      return 0
    fi
    sleep 0.1
  done
  echo "containerd did not reconnect to the restarted snapshotter in 10 s"; return 1
}
# run_sn DIR SNAPSHOTTER CTR-RUN-ARGS...: ctr run --rm. containerd 1.6's shim sometimes loses
# the exit status of a mount helper to its own child reaper and gives up with "mount helper
# ... failed with ECHILD (retired 10 times)" (containerd#4387; seen here about once in 300
# runs, under load): that one error is retried once, and said so.
run_sn() {
  local d=$1 sn=$2 out rc=0; shift 2
  out=$(timeout "$TO" bash "$C" run "$d/ctd" --snapshotter "$sn" "$@" 2>&1) || rc=$?
  if [ "$rc" != 0 ] && grep -q "failed with ECHILD" <<<"$out"; then
    echo "containerd lost the mount helper's exit status (ECHILD, containerd#4387): retrying once" >&2
    rc=0
    out=$(timeout "$TO" bash "$C" run "$d/ctd" --snapshotter "$sn" "$@" 2>&1) || rc=$?
  fi
  printf '%s\n' "$out"
  return "$rc"
}
run_() { local d=$1; shift; run_sn "$d" verlay "$@"; }
# every layer the snapshotter sealed verifies clean (an active snapshot has no manifest)
verify_sealed() {
  local d=$1 n=0 m
  for m in "$d"/root/snapshots/*/fs.verlay-manifest; do
    [ -e "$m" ] || continue
    if ! "$BIN" verify "${m%.verlay-manifest}" >>"$d/verify.log" 2>&1; then
      # containerd's garbage collector may remove an uncommitted snapshot meanwhile
      [ -e "$m" ] || continue
      echo "verlay verify ${m%.verlay-manifest} failed:"; tail -5 "$d/verify.log"; return 1
    fi
    n=$((n + 1))
  done
  echo "$n"
}

# expect_line LINE CMD...: CMD succeeds and prints LINE (its output is shown)
expect_line() { local want=$1 out; shift; out=$("$@"); echo "$out"; grep -qx "$want" <<<"$out"; }

CHECK='cat /etc/motd; test ! -e /etc/remove-me && test ! -e /opaque/a && test -f /opaque/b &&
       echo written > /root/w && cat /root/w && echo semantics-ok'

IMG=$WORK/image
timeout "$TO" bash "$E2E/image.sh" "$IMG" >/dev/null
TAR=$IMG/image.oci.tar
REF=localhost/verlay-test:1

# timed LABEL CMD...: CMD, then "[  T s] LABEL -> rc=N" on stderr; CMD's status
timed() {
  local a rc=0
  a=$(now)
  "${@:2}" || rc=$?
  awk -v a="$a" -v b="$(now)" -v l="$1" -v r="$rc" 'BEGIN { printf "[%6.3fs] %s -> rc=%d\n", b - a, l, r }' >&2
  return "$rc"
}

# --- smoke: verlay next to containerd's own overlayfs snapshotter, in one containerd
smoke() {
  local d=$WORK/smoke sn
  snap_start "$d"
  ctd_start "$d"
  for sn in verlay overlayfs; do
    timed "import($sn)" ctr_ "$d" image import --snapshotter "$sn" "$TAR" >/dev/null
    timed "run($sn)" expect_line semantics-ok run_sn "$d" "$sn" "$REF" "smoke-$sn" sh -c "$CHECK"
  done
}
e2e_check smoke smoke
bash "$C" stop "$WORK/smoke/ctd" >/dev/null 2>&1 || true
grep -E '^\[ *[0-9.]+s\] (import|run)' "$WORK/smoke.out" | sed 's/^/  /' || true

# --- import, run, sealed
M=$WORK/main
snap_start "$M" && ctd_start "$M" || { e2e_fail containerd-start 0 "see $M/snap.log, $M/ctd/containerd.log"; e2e_summary; exit 1; }
e2e_check import ctr_ "$M" image import --snapshotter verlay "$TAR"
run_semantics() { expect_line semantics-ok run_ "$M" "$REF" "$1" sh -c "$CHECK"; }
e2e_check run run_semantics c-run
sealed() { local n; n=$(verify_sealed "$M") || return 1; echo "$n layers sealed and clean"; [ "$n" -ge 3 ]; }
e2e_check sealed sealed

# --- a View of the image's top layer, mounted as `ctr snapshots mounts` says (a read-only
# verlay mount of the three committed layers)
view() {
  local top cmd
  top=$(ctr_ "$M" snapshots --snapshotter verlay ls | awk '
    NR > 1 && $3 == "Committed" { c[$1] = 1; if ($2 != "") p[$2] = 1 }
    END { for (k in c) if (!(k in p)) print k }')
  [ -n "$top" ] || { echo "no top committed snapshot"; return 1; }
  mkdir -p "$WORK/view"
  ctr_ "$M" snapshots --snapshotter verlay view v-test "$top" >/dev/null
  cmd=$(ctr_ "$M" snapshots --snapshotter verlay mounts "$WORK/view" v-test)
  echo "$cmd"
  case "$cmd" in "mount -t fuse3.verlay "*lowerdir=*) ;; *) echo "not a verlay mount"; return 1 ;; esac
  # mount(8) passes -t fuse3.verlay on to mount.fuse3, which then looks for a program of that
  # name; containerd runs mount.fuse3 with -t verlay, and so do we
  mount.fuse3 overlay "$WORK/view" -o "${cmd##* -o }" -t verlay
  expect_line "motd from layer2" cat "$WORK/view/etc/motd"
  if touch "$WORK/view/new" 2>/dev/null; then echo "a view is writable"; umount "$WORK/view"; return 1; fi
  test ! -e "$WORK/view/etc/remove-me"
  umount "$WORK/view"
  # ctr's lease ends with the view command, so containerd's GC may have removed the view
  # already (the mount is of its parents only, so it was not disturbed)
  local out
  out=$(ctr_ "$M" snapshots --snapshotter verlay rm v-test 2>&1) || grep -q "not found" <<<"$out"
}
e2e_check view view

# --- restart of the snapshotter while a container runs
restart_running() {
  ctr_ "$M" run -d --cgroup "" --fifo-dir "$M/ctd/fifo" --snapshotter verlay "$REF" bg sleep 600 >/dev/null
  snap_kill9 "$M"
  snap_start "$M"
  ctd_reconnect "$M"
  expect_line after-restart ctr_ "$M" task exec --fifo-dir "$M/ctd/fifo" --exec-id e1 bg sh -c \
    'cat /etc/motd && echo after-restart > /root/r && cat /root/r'
  ctr_ "$M" task kill -s SIGKILL bg; sleep 0.3
  ctr_ "$M" task delete bg >/dev/null; ctr_ "$M" container delete bg
  run_semantics c-after-restart
}
e2e_check restart-running restart_running

# --- corrupt a committed layer: EIO in the container, one log line naming the file
corrupt_eio() {
  local blob
  blob=$(ls "$M"/root/snapshots/*/fs/data/blob | head -1)
  printf 'X' | dd of="$blob" bs=1 seek=70000 conv=notrunc status=none
  local out
  if out=$(run_ "$M" "$REF" c-corrupt cat /data/blob); then
    echo "reading a corrupted layer file succeeded"; return 1
  fi
  grep "Input/output error" <<<"$out"
  grep -q "data/blob" "$M/verlay.log" && grep -q "does not match its manifest" "$M/verlay.log"
}
e2e_check corrupt-eio corrupt_eio

# --- a committed layer whose manifest went missing is refused (mounts say verify=require),
# not served unchecked
unsealed_refused() {
  local man out
  man=$(ls "$M"/root/snapshots/*/fs.verlay-manifest | head -1)
  mv "$man" "$man.away"
  if out=$(run_ "$M" "$REF" c-unsealed true); then
    mv "$man.away" "$man"; echo "a layer without its manifest was mounted"; return 1
  fi
  mv "$man.away" "$man"
  grep "no manifest and verify=require" <<<"$out"
}
e2e_check unsealed-refused unsealed_refused

# --- kill -9 of the snapshotter during an import, at named commit steps and at a random time
kill_import() {  # kill_import DIR STEP|timed
  local d=$1 step=$2 n
  if [ "$step" = timed ]; then
    snap_start "$d"
    ctd_start "$d"
    ctr_ "$d" image import --snapshotter verlay "$TAR" >/dev/null 2>&1 &
    local ip=$!
    sleep "0.$(shuf -i 10-40 -n 1)"
    snap_kill9 "$d"
    if wait "$ip"; then echo "the import finished before the kill"; else echo "the kill interrupted the import"; fi
  else
    snap_start "$d" VERLAY_SNAPSHOTTER_CRASH_AT="$step"
    ctd_start "$d"
    if ctr_ "$d" image import --snapshotter verlay "$TAR" >/dev/null 2>&1; then
      echo "import succeeded although the snapshotter was to die at $step"; return 1
    fi
    snap_wait_dead "$d" || { echo "the snapshotter did not die at $step"; return 1; }
  fi
  snap_start "$d"
  ctd_reconnect "$d"
  n=$(verify_sealed "$d") || return 1
  echo "after the kill: $n sealed layers, all clean"
  ctr_ "$d" image import --snapshotter verlay "$TAR" >/dev/null
  expect_line semantics-ok run_ "$d" "$REF" c-kill sh -c "$CHECK"
  n=$(verify_sealed "$d") || return 1
  echo "after re-import: $n sealed layers, all clean"
}
for step in commit.syncfs commit.seal commit.db timed; do
  e2e_check "kill-import-$step" kill_import "$WORK/kill-$step" "$step"
  bash "$C" stop "$WORK/kill-$step/ctd" >/dev/null 2>&1 || true
done

# --- pull from a local registry; then a pull during which the snapshotter dies at the
# commit.seal step of the first layer, is restarted, and the pull is repeated
REG=$WORK/reg
PORT=$(shuf -i 20000-40000 -n 1)
registry() {
  echo "$REG" >> "$WORK/regs"
  timeout "$TO" bash "$REGENV" start "$REG" "$PORT" >/dev/null
  timeout "$TO" bash "$REGENV" push "$REG" "$IMG/oci:1" test:1 >/dev/null
}
pull() {
  local d=$WORK/pull
  snap_start "$d"
  ctd_start "$d"
  ctr_ "$d" image pull --plain-http --snapshotter verlay "127.0.0.1:$PORT/test:1" >/dev/null
  expect_line semantics-ok run_ "$d" "127.0.0.1:$PORT/test:1" c-pull sh -c "$CHECK"
  verify_sealed "$d" >/dev/null
}
pull_killed() {
  local d=$WORK/pull-killed n
  snap_start "$d" VERLAY_SNAPSHOTTER_CRASH_AT=commit.seal
  ctd_start "$d"
  if ctr_ "$d" image pull --plain-http --snapshotter verlay "127.0.0.1:$PORT/test:1" >/dev/null 2>&1; then
    echo "the pull succeeded although the snapshotter was to die at commit.seal"; return 1
  fi
  snap_wait_dead "$d"
  snap_start "$d"
  ctd_reconnect "$d"
  n=$(verify_sealed "$d")
  echo "after the kill: $n sealed layers, all clean"
  ctr_ "$d" image pull --plain-http --snapshotter verlay "127.0.0.1:$PORT/test:1" >/dev/null
  expect_line semantics-ok run_ "$d" "127.0.0.1:$PORT/test:1" c-pull sh -c "$CHECK"
  verify_sealed "$d" >/dev/null
}
if e2e_check registry registry; then :; fi
e2e_check pull pull
e2e_check pull-killed pull_killed

# --- timing: ctr run on verlay vs containerd's overlayfs snapshotter (same containerd)
timing() {
  local sn i t a b
  ctr_ "$M" image import --snapshotter overlayfs "$TAR" >/dev/null
  for sn in verlay overlayfs; do
    for i in 1 2 3 4 5; do
      a=$(now)
      run_sn "$M" "$sn" "$REF" "t-$sn-$i" cat /etc/motd >/dev/null
      b=$(now)
      awk -v a="$a" -v b="$b" 'BEGIN { printf "%.3f\n", b - a }'
    done | sort -n | awk -v sn="$sn" '{ v[NR] = $1 } END { printf "timing: ctr run (%s): median %s s, min %s s, max %s s\n", sn, v[3], v[1], v[5] }'
  done
}
e2e_check timing timing
grep '^timing:' "$WORK/timing.out" | sed 's/^/  /' || true

e2e_summary
