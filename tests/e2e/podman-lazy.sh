#!/usr/bin/env bash
# podman-lazy.sh: podman runs an eStargz image lazily through `verlay als serve`, the
# additional layer store (containers/storage `additionallayerstores = ["MNT:ref"]`), as root
# and rootless.
#
#   tests/e2e/podman-lazy.sh [BIN]      BIN: default ./target/release/verlay
#
# Setup: the 3-layer test image (tests/e2e/image.sh) is imported into a verlay store,
# converted with `verlay image convert --estargz` (64 KiB chunks) and pushed to a local
# docker-registry (tests/e2e/registry-env.sh). Then, per part, podman 4.3 with a private
# storage.conf (CONTAINERS_STORAGE_CONF; graphroot and runroot in the work dir) naming the
# store, and `verlay als serve` on that store's mountpoint (VERLAY_LAZY_BACKGROUND=off, so
# that the registry's byte counts show what reads fetched). Checks, per part:
#   pull    `podman pull` of the eStargz image: every layer comes from the layer store (its
#           diff in podman's graphroot is a symlink into the store's mount, 3 of them) and
#           the registry served less than 5% of the layers' bytes (footers and TOCs)
#   run     `podman run` printing /etc/motd (the file layer 2 replaced), checking the
#           whiteout and the opaque dir, and the owner of /etc/passwd (0:0); the 1 MiB
#           layer 3 is not read, and the registry served less than 5% of its bytes
#   blob    `podman run` printing sha256sum /data/blob: the original's, fetched on demand
#   rmi     `podman rmi`: podman's use and release calls to the store (create <layer>/use,
#           rmdir <layer>) drew no warning from podman
# root: podman with its own kernel overlay driver, in a private mount namespace (/run and
# /var/lib as in podman-run.sh). rootless: user verlayci (tests/e2e/rootless-user.sh),
# native rootless overlay (userxattr), and the store started with `podman unshare` so that
# its mount is in podman's user and mount namespaces (as stargz-store's rootless setup).
# Teardown (also on failure): containers removed; the layer stores, podman's pause process
# and the registry stopped by PID; mounts under the work dir unmounted; the rootless user
# removed if this script made it.
# Needs root; podman, runc, uidmap, docker-registry, busybox-static, jq, curl (tests/setup.sh).
# Env: PODMAN_TIMEOUT (s per podman step, default 120), KEEP=1 keeps the work dir.
set -euo pipefail
# shellcheck source=tests/e2e/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

TO=${PODMAN_TIMEOUT:-120}
ROOTLESS_USER=verlayci

# ------------------------------------------------------------------ inner part
# Runs inside a private mount namespace (unshare -m); settings come in the environment:
# WORK, BIN (the verlay to run), PART (root|rootless), IMAGE, ESGZ_LAYERS, ESGZ_SIZES,
# WANT_BLOB, REGLOG, CGPARENT, FUSE_NODE.
if [ "${_PL_INNER:-}" = 1 ]; then
  P=$WORK/$PART
  # the layer store's PID file: in a directory the part's user may write
  PIDF=$P/home/als.pid
  if [ "$PART" = root ]; then
    mount --bind "$P/ns/run" /run
    mount -t overlay overlay -o "lowerdir=/var/lib,upperdir=$P/ns/varlib-upper,workdir=$P/ns/varlib-work" /var/lib
  elif [ -n "$FUSE_NODE" ]; then
    mount --bind "$FUSE_NODE" /dev/fuse
  fi
  # no --root, --runroot, --storage-driver (storage.conf has them): podman 4.3 drops the
  # storage.conf driver options (additionallayerstores) when any of them is given
  G=(--tmpdir "$P/tmp"
     --cgroup-manager cgroupfs --events-backend file --runtime runc --network-config-dir "$P/networks")
  R=(--network none)
  [ "$PART" = root ] && R+=(--ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" --ulimit nproc=32768:32768 --cgroup-parent "/$CGPARENT")
  # pm ARGS...: podman as this part's user, bounded; stderr to the part's podman.log
  pm() {
    echo "+ podman $*" >> "$P/podman.log"
    if [ "$PART" = root ]; then
      timeout "$TO" env CONTAINERS_CONF="$P/containers.conf" CONTAINERS_STORAGE_CONF="$P/storage.conf" \
        podman "${G[@]}" "$@" 2>>"$P/podman.log"
    else
      timeout "$TO" runuser -u "$ROOTLESS_USER" -- env -i HOME="$P/home" XDG_RUNTIME_DIR="$P/xdg-run" \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        CONTAINERS_CONF="$P/containers.conf" CONTAINERS_STORAGE_CONF="$P/storage.conf" \
        podman "${G[@]}" "$@" 2>>"$P/podman.log"
    fi
  }
  # moved DIGESTS...: blob bytes the registry wrote since this part began
  moved() {
    local d sum=0 n
    for d in "$@"; do
      n=$(tail -n +"$((REG_MARK + 1))" "$REGLOG" | grep 'msg="response completed"' | grep -F "/blobs/$d" |
        sed -n 's/.*http.response.written=\([0-9]*\).*/\1/p' | awk '{ s += $1 } END { print s + 0 }')
      sum=$((sum + n))
    done
    echo "$sum"
  }
  ALS_PID=""
  inner_cleanup() {
    local rc=$? f
    pm rm -a -f >/dev/null 2>&1 || true
    if [ -z "$ALS_PID" ] && [ -s "$PIDF" ]; then ALS_PID=$(cat "$PIDF"); fi
    if [ -n "$ALS_PID" ]; then
      # SIGTERM unmounts the store; SIGKILL if it has not gone within 5 s
      kill "$ALS_PID" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$ALS_PID" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$ALS_PID" 2>/dev/null || true
    fi
    for f in "$P/tmp/pause.pid" "$P/xdg-run/libpod/tmp/pause.pid"; do
      [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
    done
    { grep -F " $P/" /proc/self/mountinfo || true; } | awk '{print $5}' | sort -r | while read -r m; do
      fusermount3 -u "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done
    exit "$rc"
  }
  trap inner_cleanup EXIT
  REG_MARK=$(wc -l < "$REGLOG")
  read -r -a LAYERS <<<"$ESGZ_LAYERS"
  read -r -a SIZES <<<"$ESGZ_SIZES"
  TOTAL=$((SIZES[0] + SIZES[1] + SIZES[2]))

  # the layer store: root runs it here; rootless in podman's namespaces (podman unshare)
  # (not under `timeout`: it serves until the teardown stops it by PID)
  als=(env VERLAY_LAZY_BACKGROUND=off RUST_LOG=verlay=info VERLAY_LOG_FILE="$P/als.log"
       "$BIN" als serve --store "$P/store" --pid-file "$PIDF" "$P/als")
  if [ "$PART" = root ]; then
    "${als[@]}" 2>>"$P/als.log" &
    ALS_PID=$!
  else
    runuser -u "$ROOTLESS_USER" -- env -i HOME="$P/home" XDG_RUNTIME_DIR="$P/xdg-run" \
      PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      CONTAINERS_CONF="$P/containers.conf" CONTAINERS_STORAGE_CONF="$P/storage.conf" \
      podman "${G[@]}" unshare "${als[@]}" 2>>"$P/podman.log" &
  fi
  for _ in $(seq 100); do [ -s "$PIDF" ] && break; sleep 0.1; done
  [ -s "$PIDF" ] || { echo "verlay als serve did not start:"; tail -5 "$P/als.log" "$P/podman.log"; exit 1; }
  ALS_PID=$(cat "$PIDF")
  echo "verlay als serve: pid $ALS_PID, mounted on $P/als"

  echo "=== pull"
  pm pull -q --tls-verify=false "$IMAGE"
  links=$(find "$P/root/overlay" -mindepth 2 -maxdepth 2 -name diff -type l | wc -l)
  find "$P/root/overlay" -mindepth 2 -maxdepth 2 -name diff -type l -printf '%p -> %l\n' | sed "s#$WORK#WORK#g"
  [ "$links" = 3 ] || { echo "want 3 layers from the layer store (diff symlinks), have $links"; exit 1; }
  n=$(moved "${LAYERS[@]}")
  echo "figure: $PART: podman pull moved $n of $TOTAL layer bytes ($(awk -v a="$n" -v b="$TOTAL" 'BEGIN { printf "%.2f", 100 * a / b }')%)"
  [ $((n * 20)) -lt "$TOTAL" ] || { echo "more than 5% of the layers' bytes moved"; exit 1; }

  echo "=== run"
  pm run --rm "${R[@]}" "$IMAGE" sh -c 'cat /etc/motd; test ! -e /etc/remove-me && test ! -e /opaque/a &&
    test ! -e /opaque/keep && test -f /opaque/b && echo semantics-ok; stat -c owner=%u:%g /etc/passwd' | tee "$P/run.out"
  grep -qx "motd from layer2" "$P/run.out"
  grep -qx semantics-ok "$P/run.out"
  grep -qx owner=0:0 "$P/run.out"
  n3=$(moved "${LAYERS[2]}")
  n=$(moved "${LAYERS[@]}")
  echo "figure: $PART: after podman run (cat /etc/motd): $n of $TOTAL layer bytes moved; layer 3 (/data, not read): $n3 of ${SIZES[2]}"
  [ $((n3 * 20)) -lt "${SIZES[2]}" ] || { echo "layer 3 was fetched though nothing read it"; exit 1; }
  [ "$n" -lt "$TOTAL" ] || { echo "every layer byte moved"; exit 1; }

  echo "=== blob"
  got=$(pm run --rm "${R[@]}" "$IMAGE" sha256sum /data/blob | cut -d' ' -f1)
  n3=$(moved "${LAYERS[2]}")
  echo "figure: $PART: sha256sum /data/blob in a container: layer 3 bytes moved now $n3 of ${SIZES[2]}"
  [ "$got" = "$WANT_BLOB" ] || { echo "/data/blob: sha256 $got, want $WANT_BLOB"; exit 1; }
  echo "lazy pulls logged by the layer store: $(grep -c "image pulled lazily" "$P/als.log" || true)"

  echo "=== rmi"
  # podman told the store it used each layer (create <layer>/use) and released it (rmdir
  # <layer>); an answer other than ENOENT makes podman warn "Unexpected error by Additional
  # Layer Store ... GC doesn't seem to be supported"
  pm rmi "$IMAGE" >/dev/null
  if grep "Additional Layer Store" "$P/podman.log"; then echo "podman warned about the layer store"; exit 1; fi
  uses=$(grep -c "podman uses a layer" "$P/als.log" || true)
  releases=$(grep -c "podman released a layer" "$P/als.log" || true)
  echo "use calls: $uses, release calls: $releases"
  [ "$uses" -ge 3 ] && [ "$releases" -ge 3 ] || { echo "want the use and release calls of the 3 layers"; exit 1; }
  exit 0
fi

# ------------------------------------------------------------------ outer part
need_root
BIN=$(resolve_bin "${1:-}")
for t in podman runc docker-registry jq curl; do
  command -v "$t" >/dev/null || die "$t missing: bash tests/setup.sh"
done
WORK=$(mktemp -d /tmp/verlay-podman-lazy.XXXXXX)
chmod 0755 "$WORK"
REG=$WORK/reg
CREATED_USER=0
CGPARENT="podman-lazy-$(basename "$WORK" | tr -c 'A-Za-z0-9\n' -)"
cleanup() {
  local rc=$? p args anc=" " q=$$
  bash "$E2E/registry-env.sh" stop "$REG" >/dev/null 2>&1 || true
  # any process still naming WORK (a layer store, conmon), except this script and its callers
  while [ "$q" -gt 1 ]; do anc="$anc$q "; q=$(awk '/^PPid:/{print $2}' /proc/$q/status); done
  for p in /proc/[0-9]*; do
    case "$anc" in *" ${p#/proc/} "*) continue ;; esac
    args=$( { tr '\0' ' ' < "$p/cmdline"; } 2>/dev/null) || continue
    case "$args" in *"$WORK/"*) log "leftover pid ${p#/proc/}: ${args:0:100}"; kill "${p#/proc/}" 2>/dev/null || true ;; esac
  done
  awk -v w="$WORK/" 'index($5, w) == 1 { print $5 }' /proc/self/mountinfo | sort -r | while read -r m; do
    fusermount3 -u "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
  done
  for d in /sys/fs/cgroup/*/"$CGPARENT"; do
    [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  done
  if [ "$CREATED_USER" = 1 ]; then
    bash "$E2E/rootless-user.sh" remove "$ROOTLESS_USER" >/dev/null 2>&1 || { log "could not remove user $ROOTLESS_USER"; rc=1; }
  fi
  if [ "${KEEP:-0}" = 1 ] || [ "$rc" != 0 ] || [ "$E2E_FAILED" != 0 ]; then
    log "kept $WORK (per part: podman.log, als.log; registry: $REG/registry.log)"
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

v() { timeout "$TO" "$BIN" "$@"; }
IMG=$WORK/image
timeout "$TO" bash "$E2E/image.sh" "$IMG" >/dev/null
# shellcheck disable=SC1091
. "$IMG/image.env"
S=$WORK/src-store
v image import -q --store "$S" --name test "$IMG/oci" >/dev/null
v image convert -q --store "$S" --estargz --chunk-size 65536 test esgz >/dev/null
# a random port may be taken (other tests run here): up to 5 ports are tried
for try in 1 2 3 4 5; do
  PORT=$(shuf -i 20000-40000 -n 1)
  timeout "$TO" bash "$E2E/registry-env.sh" start "$REG" "$PORT" >/dev/null 2>"$WORK/registry-start.err" && break
  [ "$try" = 5 ] && { cat "$WORK/registry-start.err" >&2; die "the registry did not start"; }
done
IMAGE=127.0.0.1:$PORT/lazy/test:esgz
v image push -q --store "$S" --image esgz "$IMAGE" >/dev/null
MANIFEST=$(curl -fsS -H 'Accept: application/vnd.oci.image.manifest.v1+json' "http://127.0.0.1:$PORT/v2/lazy/test/manifests/esgz")
ESGZ_LAYERS=$(jq -r '[.layers[].digest] | join(" ")' <<<"$MANIFEST")
ESGZ_SIZES=$(jq -r '[.layers[].size | tostring] | join(" ")' <<<"$MANIFEST")
jq -e '(.layers | length) == 3 and (.layers | all(.annotations["containerd.io/snapshot/stargz/toc.digest"]))' <<<"$MANIFEST" >/dev/null ||
  die "the pushed eStargz image does not have 3 layers with TOC annotations"
# shellcheck disable=SC2086
set -- $LAYER_DIGESTS
WANT_BLOB=$(tar -xzOf "$IMG/oci/blobs/sha256/${3#sha256:}" ./data/blob | sha256sum | cut -d' ' -f1)
log "image $IMAGE: layers $ESGZ_SIZES bytes"

# setup_part NAME [USER]: the part's directories and podman configuration
setup_part() {
  local p=$WORK/$1
  mkdir -p "$p"/{root,runroot,tmp,home,xdg-run,networks,store,als,ns/run,ns/varlib-upper,ns/varlib-work}
  chmod 0755 "$p"; chmod 0700 "$p/xdg-run"
  : > "$p/podman.log"; : > "$p/als.log"
  cat > "$p/containers.conf" <<EOF
[containers]
netns = "none"
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$p/tmp/events.log"
runtime = "runc"
tmp_dir = "$p/tmp"
[network]
network_config_dir = "$p/networks"
EOF
  cat > "$p/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$p/root"
runroot = "$p/runroot"
# rootless podman's graphroot
rootless_storage_path = "$p/root"
[storage.options]
additionallayerstores = ["$p/als:ref"]
EOF
  if [ -n "${2:-}" ]; then
    chown -R "$2": "$p"/{root,runroot,tmp,home,xdg-run,networks,store,als,podman.log,als.log}
  fi
}

export WORK IMAGE ESGZ_LAYERS ESGZ_SIZES WANT_BLOB CGPARENT TO ROOTLESS_USER
export REGLOG=$REG/registry.log
# part NAME BIN: the inner part in a private mount namespace, as one e2e check
part() {
  local name=$1
  _PL_INNER=1 PART=$name BIN=$2 unshare -m --propagation private bash "$0"
}

setup_part root
export FUSE_NODE=""
e2e_check podman-lazy-root part root "$BIN"

t=$(now)
if id "$ROOTLESS_USER" >/dev/null 2>&1; then
  log "user $ROOTLESS_USER already exists: using it, not removing it"
elif bash "$E2E/rootless-user.sh" add "$ROOTLESS_USER" > "$WORK/rootless-user.log" 2>&1; then
  CREATED_USER=1
else
  CREATED_USER=1
  cat "$WORK/rootless-user.log" >&2
  e2e_fail podman-lazy-rootless "$(since "$t")" "rootless-user.sh add $ROOTLESS_USER failed"
  e2e_summary
fi
setup_part rootless "$ROOTLESS_USER"
# a verlay the user can run
install -m 0755 "$BIN" "$WORK/rootless/verlay"
FUSE_NODE=""
if ! runuser -u "$ROOTLESS_USER" -- test -r /dev/fuse -a -w /dev/fuse; then
  # as podman-run.sh: a 0666 node bound over /dev/fuse in the private mount namespace
  FUSE_NODE=$WORK/rootless/fuse
  mknod -m 666 "$FUSE_NODE" c 10 229
fi
export FUSE_NODE
e2e_check podman-lazy-rootless part rootless "$WORK/rootless/verlay"
e2e_summary
