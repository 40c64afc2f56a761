#!/usr/bin/env bash
# podman-run.sh: real podman containers (storage driver overlay) whose rootfs is mounted by
# MOUNT_PROGRAM (overlay.mount_program), as root or rootless; logs how podman calls it.
# tests/e2e/podman.sh calls it once as root and once rootless.
#
#   tests/e2e/podman-run.sh [-u USER] [-w WORK] [-x] [-k] [-r N] MOUNT_PROGRAM [CMD...]
#
#   MOUNT_PROGRAM  a verlay binary (or anything with fuse-overlayfs's command line), or the
#                  word `native`: podman's own kernel overlay driver, no mount program
#   CMD            what the first `podman run --rm` runs; default: a check of the image's
#                  replaced file, whiteout and opaque dir that prints semantics-ok
#   -u USER        rootless, as USER (tests/e2e/rootless-user.sh add USER makes one)
#   -w WORK        work dir (default: a new /tmp/podman-run.XXXXXX)
#   -x             more paths: create+start (write, delete, append, mkdir in an opaque dir),
#                  diff, commit, a run of the committed image checking the result, and (root
#                  only) podman mount/umount
#   -k             keep all of WORK (default: only the logs)
#   -r N           run the first `podman run --rm` N more times (bench/containers.sh times
#                  these from the timing lines)
#
# The image is tests/e2e/image.sh's, loaded with `podman load`. Writes WORK/mount_program.log
# (one block per call: argv, uid, cwd, uid_map, fds), WORK/mount_program.env (each call's
# environment) and WORK/podman.log, and prints one timing line per podman step. Exits non-zero
# if any podman step fails.
#
# Flags this host needs (podman 4.3.1, Debian 12, cgroup v1 hybrid, no CAP_SYS_RESOURCE):
# --runtime runc (crun 1.8 refuses hybrid cgroups), --ulimit nofile/nproc within the hard
# limits (podman's default nofile=1048576 fails setrlimit), --cgroup-manager cgroupfs,
# --events-backend file, --network none, a private --cgroup-parent (removed at the end).
#
# Isolation: everything runs in a private mount namespace (unshare -m). As root, /run is
# bind-mounted from WORK/ns/run and /var/lib is a kernel overlay whose upper dir is in WORK,
# because podman and runc as root write /run/runc, /run/containers/networks and
# /var/lib/containers/cache whatever --root/--runroot say. Rootless, /dev/fuse is bind-mounted
# from a 0666 node in WORK when the host's /dev/fuse is not world-writable (some machines
# have it 0600, and every rootless FUSE mount then fails with "failed to open /dev/fuse:
# Permission denied").
# Cleanup: containers removed; the rootless pause process and any process naming WORK on its
# command line stopped by PID; mounts under WORK unmounted; the cgroup parent removed.
#
# Needs root; podman, runc, uidmap, fuse3, busybox-static, jq (tests/setup.sh installs them).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REF=localhost/verlay-test:1

# ------------------------------------------------------------------ inner part
# Runs inside the private mount namespace; settings come in the environment.
if [ "${_PR_INNER:-}" = 1 ]; then
  if [ -z "$_PR_USER" ]; then
    mount --bind "$WORK/ns/run" /run
    mount -t overlay overlay \
      -o "lowerdir=/var/lib,upperdir=$WORK/ns/varlib-upper,workdir=$WORK/ns/varlib-work" /var/lib
  elif [ -n "${_PR_FUSE_NODE:-}" ]; then
    mount --bind "$_PR_FUSE_NODE" /dev/fuse
  fi
  G=(--root "$WORK/root" --runroot "$WORK/runroot" --tmpdir "$WORK/tmp" --storage-driver overlay
     --cgroup-manager cgroupfs --events-backend file --runtime runc
     --network-config-dir "$WORK/networks")
  [ "$_PR_NATIVE" = 1 ] || G+=(--storage-opt "overlay.mount_program=$WORK/bin/mount_program")
  R=(--network none)
  if [ -z "$_PR_USER" ]; then
    # no CAP_SYS_RESOURCE here: podman's default rlimits (nofile 1048576) fail
    # with "setrlimit RLIMIT_NOFILE: Operation not permitted"; podman caps its
    # children's nproc hard limit at 32768
    R+=(--ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" --ulimit nproc=32768:32768
        --cgroup-parent "/$_PR_CGPARENT")
  fi
  P() {
    local t0 t1 rc=0
    t0=$(date +%s.%N)
    echo "+ podman $*" >> "$WORK/podman.log"
    if [ -n "$_PR_USER" ]; then
      runuser -u "$_PR_USER" -- env -i HOME="$WORK/home" XDG_RUNTIME_DIR="$WORK/xdg-run" \
        PATH="$WORK/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        CONTAINERS_CONF="$WORK/containers.conf" CONTAINERS_STORAGE_CONF="$WORK/storage.conf" \
        podman "${G[@]}" "$@" 2>>"$WORK/podman.log" || rc=$?
    else
      env PATH="$WORK/bin:$PATH" CONTAINERS_CONF="$WORK/containers.conf" \
        CONTAINERS_STORAGE_CONF="$WORK/storage.conf" \
        podman "${G[@]}" "$@" 2>>"$WORK/podman.log" || rc=$?
    fi
    t1=$(date +%s.%N)
    awk -v a="$t0" -v b="$t1" -v c="$1" -v r="$rc" 'BEGIN{printf "[%6.3fs] podman %s -> rc=%d\n", b-a, c, r}' >&2
    echo "--- podman $1 rc=$rc" >> "$WORK/mount_program.log"
    return $rc
  }
  fail=0
  P load -i "$WORK/image.tar" >/dev/null || fail=1
  P run --rm "${R[@]}" "$REF" "$@" || fail=1
  for _ in $(seq "$_PR_REPEAT"); do P run --rm "${R[@]}" "$REF" "$@" || fail=1; done
  if [ "$_PR_EXERCISE" = 1 ]; then
    id=$(P create "${R[@]}" "$REF" sh -c \
      'echo new > /etc/new; rm /etc/motd; echo more >> /data/blob; mkdir -p /opaque/d') || fail=1
    P start -a "$id" || fail=1
    P diff "$id" || fail=1
    P commit -q "$id" localhost/podman-run-committed:1 >/dev/null || fail=1
    P run --rm "${R[@]}" localhost/podman-run-committed:1 sh -c \
      'test -f /etc/new && ! test -e /etc/motd && test -d /opaque/d && ! test -e /opaque/a &&
       test "$(tail -c 5 /data/blob)" = more && echo committed-ok' || fail=1
    if [ -z "$_PR_USER" ]; then
      m=$(P mount "$id") && ls "$m/etc" >/dev/null && P umount "$id" >/dev/null || fail=1
    fi
    P rm "$id" >/dev/null || fail=1
  fi
  P rm -a -f >/dev/null 2>&1 || true
  # unmount whatever is still mounted under WORK in this namespace
  { grep -F " $WORK/" /proc/self/mountinfo || true; } | awk '{print $5}' | sort -r | while read -r m; do
    fusermount3 -u "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
  done
  exit $fail
fi

# ------------------------------------------------------------------ outer part
usage() { awk 'NR>1 && /^#/ {sub(/^# ?/, ""); print; next} NR>1 {exit}' "$0"; exit 2; }
USER_=""; WORK=""; EXERCISE=0; KEEP=0; REPEAT=0
while getopts "u:w:xkr:h" o; do
  case $o in
    u) USER_=$OPTARG;; w) WORK=$OPTARG;; x) EXERCISE=1;; k) KEEP=1;; r) REPEAT=$OPTARG;; *) usage;;
  esac
done
shift $((OPTIND-1))
[ $# -ge 1 ] || usage
case $REPEAT in ''|*[!0-9]*) echo "-r wants a number" >&2; exit 2;; esac
[ "$REPEAT" -le 1000 ] || { echo "-r is capped at 1000" >&2; exit 2; }
if [ "$1" = native ]; then MP=native; else
  MP=$(readlink -f "$1")
  [ -x "$MP" ] || { echo "mount program $MP is not executable" >&2; exit 2; }
fi
shift
[ $# -gt 0 ] || set -- sh -c 'test "$(cat /etc/motd)" = "motd from layer2" && test ! -e /etc/remove-me &&
  test ! -e /opaque/a && test -f /opaque/b && test -L /data/link && echo semantics-ok'
[ "$(id -u)" = 0 ] || { echo "run as root (it uses unshare -m; rootless runs use -u USER)" >&2; exit 2; }
command -v podman >/dev/null || { echo "podman missing: bash tests/setup.sh" >&2; exit 2; }
if [ -n "$USER_" ]; then
  id "$USER_" >/dev/null 2>&1 || { echo "no user $USER_: bash $HERE/rootless-user.sh add $USER_" >&2; exit 2; }
  grep -q "^$USER_:" /etc/subuid || { echo "$USER_ has no /etc/subuid range" >&2; exit 2; }
fi

[ -n "$WORK" ] || WORK=$(mktemp -d /tmp/podman-run.XXXXXX)
mkdir -p "$WORK"; WORK=$(cd "$WORK" && pwd)
mkdir -p "$WORK"/{bin,root,runroot,tmp,home,xdg-run,networks,ns/run,ns/varlib-upper,ns/varlib-work}
chmod 755 "$WORK"; chmod 700 "$WORK/xdg-run"
: > "$WORK/mount_program.log"; : > "$WORK/mount_program.env"; : > "$WORK/podman.log"

bash "$HERE/image.sh" "$WORK/image" "$REF" >/dev/null || { echo "tests/e2e/image.sh failed" >&2; exit 2; }
# a copy the rootless user can read
cp "$WORK/image/image.docker.tar" "$WORK/image.tar"

# The logging wrapper podman execs as its mount program.  The exec keeps the PID,
# so the real program sees exactly podman's argv, env, cwd and fds.
cat > "$WORK/bin/mount_program" <<EOF
#!/bin/sh
fds=\$(for f in 0 1 2; do printf '%s->%s ' \$f "\$(readlink /proc/\$\$/fd/\$f)"; done)
{
  echo "=== \$(date +%s.%N) pid=\$\$ uid=\$(id -u) gid=\$(id -g) cwd=\$(pwd) argc=\$# fds: \$fds"
  i=1; for a in "\$@"; do echo "argv[\$i]=\$a"; i=\$((i+1)); done
  echo "uid_map: \$(tr -s ' ' < /proc/self/uid_map | tr '\n' ';')"
} >> "$WORK/mount_program.log" 2>&1
{ echo "=== pid=\$\$"; env | sort; } >> "$WORK/mount_program.env" 2>&1
exec "$MP" "\$@"
EOF
# podman unmounts mount_program mounts with `fusermount3 -u MERGED` (then
# `fusermount -u`, then umount2(MNT_DETACH)): log those too
for f in fusermount3 fusermount; do
  cat > "$WORK/bin/$f" <<EOF
#!/bin/sh
echo "=== \$(date +%s.%N) $f uid=\$(id -u) argv: \$*" >> "$WORK/mount_program.log"
exec /usr/bin/fusermount3 "\$@"
EOF
done
chmod 755 "$WORK/bin/"*

CGPARENT="podman-run-$(basename "$WORK" | tr -c 'A-Za-z0-9\n' -)"
cat > "$WORK/containers.conf" <<EOF
[containers]
netns = "none"
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$WORK/tmp/events.log"
runtime = "runc"
tmp_dir = "$WORK/tmp"
# conmon runs 'podman container cleanup' (which unmounts) with this environment
conmon_env_vars = ["PATH=$WORK/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
[network]
network_config_dir = "$WORK/networks"
EOF
cat > "$WORK/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$WORK/root"
runroot = "$WORK/runroot"
[storage.options.overlay]
EOF
[ "$MP" = native ] || echo "mount_program = \"$WORK/bin/mount_program\"" >> "$WORK/storage.conf"

FUSE_NODE=""
if [ -n "$USER_" ]; then
  chown -R "$USER_": "$WORK"/{root,runroot,tmp,home,xdg-run,networks,mount_program.log,mount_program.env,podman.log}
  chown "$USER_": "$WORK/image.tar"
  if ! runuser -u "$USER_" -- test -r /dev/fuse -a -w /dev/fuse; then
    FUSE_NODE="$WORK/ns/fuse"
    rm -f "$FUSE_NODE"; mknod -m 666 "$FUSE_NODE" c 10 229
    echo "note: /dev/fuse is $(stat -c %a /dev/fuse) on the host; using a 0666 node in a private mount namespace" >&2
  fi
fi

cleanup() {
  local rc=$?
  # rootless podman leaves a pause process (catatonit -P) holding its user namespace
  for f in "$WORK/tmp/pause.pid" "$WORK/xdg-run/libpod/tmp/pause.pid"; do
    [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
  done
  # any process still naming WORK on its command line (conmon, mount program
  # daemons), except this script and its callers
  local anc=" " q=$$
  while [ "$q" -gt 1 ]; do anc="$anc$q "; q=$(awk '/^PPid:/{print $2}' /proc/$q/status); done
  local p pid args
  for p in /proc/[0-9]*; do
    pid=${p#/proc/}
    case "$anc" in *" $pid "*) continue;; esac
    # a process may exit between the glob and the read
    args=$( { tr '\0' ' ' < "$p/cmdline"; } 2>/dev/null) || continue
    case "$args" in
      *"$WORK/"*) echo "killing leftover pid $pid: ${args:0:100}" >&2; kill "$pid" 2>/dev/null || true ;;
    esac
  done
  sleep 0.2
  { grep -F " $WORK/" /proc/self/mountinfo || true; } | awk '{print $5}' | sort -r | while read -r m; do
    echo "unmounting leftover $m" >&2; fusermount3 -u "$m" 2>/dev/null || umount -l "$m" || true
  done
  for d in /sys/fs/cgroup/*/"$CGPARENT"; do
    [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  done
  if [ "$KEEP" = 0 ]; then
    rm -rf "${WORK:?}"/{root,runroot,tmp,home,xdg-run,networks,ns,image,image.tar,bin}
  fi
  exit $rc
}
trap cleanup EXIT

echo "podman-run: work dir $WORK, mount program $MP, ${USER_:-root}" >&2
export WORK _PR_INNER=1 _PR_USER="$USER_" _PR_EXERCISE="$EXERCISE" _PR_CGPARENT="$CGPARENT" \
       _PR_FUSE_NODE="$FUSE_NODE" _PR_REPEAT="$REPEAT" _PR_NATIVE=$([ "$MP" = native ] && echo 1 || echo 0)
rc=0
unshare -m --propagation private bash "$0" "$@" || rc=$?
unset _PR_INNER
echo "--- distinct mount_program argv shapes (paths shortened):" >&2
{ grep -E '^argv|fusermount' "$WORK/mount_program.log" || true; } | sed -E "s#$WORK#WORK#g; s#/[0-9a-f]{64}/#/ID/#g; s#/l/[A-Z0-9]{26}#/l/L#g; s#^=== [0-9.]+ #=== #" | sort | uniq -c >&2
if [ $rc != 0 ]; then echo "FAILED; see $WORK/podman.log:" >&2; tail -5 "$WORK/podman.log" >&2; fi
exit $rc
