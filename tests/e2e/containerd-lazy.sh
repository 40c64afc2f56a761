#!/usr/bin/env bash
# containerd-lazy.sh: verlay's snapshotter as containerd's remote snapshotter, end to end.
#
#   tests/e2e/containerd-lazy.sh [BIN]  BIN: default ./target/release/verlay
#                                       (verlay-snapshotter beside it, as for containerd.sh)
#
# The test image (tests/e2e/image.sh) is imported into a verlay store, converted with
# `verlay image convert --estargz` (64 KiB chunks) and pushed with `verlay image push` to a
# local docker-registry (tests/e2e/registry-env.sh), together with its plain gzip form.
# A private containerd (tests/e2e/containerd-env.sh) has `verlay snapshotter` as its proxy
# snapshotter "verlay". Checks:
#   rpull          `ctr-remote image rpull --plain-http --snapshotter verlay` of the eStargz
#                  image: every layer is prepared remotely (the snapshotter logs it; three
#                  committed snapshots labelled containerd.io/snapshot/remote), containerd's
#                  content store holds no layer blob, and the registry served less than 5%
#                  of the layers' bytes (the footers and TOCs; its access log is counted)
#   run-lazy       `ctr run --snapshotter verlay` of the image: cat of the 1 MiB /data/blob
#                  (fetched on demand) is byte for byte the file of the original layer, and
#                  moves no more than the layers' bytes (3170245 of 2109846 before issue 17);
#                  a second container checks the whiteout, the opaque dir and a write
#   plain-fallback rpull of the plain gzip image: no remote snapshot (not eStargz), the
#                  layers are downloaded and unpacked the ordinary way; the same checks run
#   restart        kill -9 of the snapshotter and a restart: the remote snapshots are still
#                  there, and /data/blob reads byte for byte in a new container
#   remove         `ctr image rm --sync` of the eStargz image: containerd's GC removes the
#                  remote snapshots and the snapshotter their layers in its store
# Teardown (also on failure): containerd, its shims and the registry stopped by PID, the
# snapshotter killed by PID, mounts under the work dir unmounted.
# Needs root; containerd, runc, ctr-remote (Debian's stargz-snapshotter), docker-registry,
# busybox-static, jq (tests/setup.sh). Env: CONTAINERD_TIMEOUT (s per step, default 120),
# KEEP=1 keeps the work dir.
set -euo pipefail
# shellcheck source=tests/e2e/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

need_root
BIN=$(resolve_bin "${1:-}")
BINDIR=$(dirname "$BIN")
SNAP=$BINDIR/verlay-snapshotter
[ -x "$SNAP" ] || die "$SNAP not found (cargo build --release builds it beside verlay)"
for t in containerd ctr-remote docker-registry jq; do
  command -v "$t" >/dev/null || die "$t missing: bash tests/setup.sh"
done
C=$E2E/containerd-env.sh
REGENV=$E2E/registry-env.sh
TO=${CONTAINERD_TIMEOUT:-120}
# containerd's mount.fuse3 looks for `verlay` in the PATH
export PATH=$BINDIR:$PATH

WORK=$(mktemp -d /tmp/verlay-ctd-lazy.XXXXXX)
D=$WORK/ctd-env
REG=$WORK/reg
SNAP_PID=""
cleanup() {
  local rc=$? p m
  bash "$C" stop "$D/ctd" >/dev/null 2>&1 || true
  bash "$REGENV" stop "$REG" >/dev/null 2>&1 || true
  # the restart check runs in a subshell: the PID of the snapshotter it started is in the file
  [ -s "$D/snap.pid" ] && SNAP_PID=$(cat "$D/snap.pid")
  if [ -n "$SNAP_PID" ]; then
    kill "$SNAP_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$SNAP_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$SNAP_PID" 2>/dev/null || true
  fi
  e2e_reap_under "$WORK"
  if [ "${KEEP:-0}" = 1 ] || [ "$rc" != 0 ] || [ "$E2E_FAILED" != 0 ]; then
    log "kept $WORK (snapshotter: $D/snap.log, containerd: $D/ctd/containerd.log, verlay: $D/verlay.log, registry: $REG/registry.log)"
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

v() { timeout "$TO" "$BIN" "$@"; }
ctr_() { timeout "$TO" bash "$C" ctr "$D/ctd" "$@"; }
rpull() { timeout "$TO" ctr-remote -a "$D/ctd/containerd.sock" image rpull --plain-http --snapshotter verlay "$1"; }
# run_ IMAGE ID CMD...: ctr run --rm on the verlay snapshotter, stdout only. containerd 1.6's
# shim sometimes loses a mount helper's exit status (ECHILD, containerd#4387; see
# containerd.sh): that one error is retried once, and said so.
run_() {
  local rc=0
  timeout "$TO" bash "$C" run "$D/ctd" --snapshotter verlay "$@" 2>"$WORK/run.err" || rc=$?
  if [ "$rc" != 0 ] && grep -q "failed with ECHILD" "$WORK/run.err"; then
    echo "containerd lost the mount helper's exit status (ECHILD, containerd#4387): retrying once" >&2
    rc=0
    timeout "$TO" bash "$C" run "$D/ctd" --snapshotter verlay "$@" 2>"$WORK/run.err" || rc=$?
  fi
  cat "$WORK/run.err" >&2
  return "$rc"
}
# layer_bytes DIGESTS...: bytes the registry wrote for GETs of those blobs since the log began
# (distribution logs each response with http.response.written)
layer_bytes() {
  local d sum=0 n
  for d in "$@"; do
    n=$(grep 'msg="response completed"' "$REG/registry.log" | grep -F "/blobs/$d" |
      sed -n 's/.*http.response.written=\([0-9]*\).*/\1/p' | awk '{ s += $1 } END { print s + 0 }')
    sum=$((sum + n))
  done
  echo "$sum"
}

CHECK='cat /etc/motd; test ! -e /etc/remove-me && test ! -e /opaque/a && test -f /opaque/b &&
       echo written > /root/w && cat /root/w && echo semantics-ok'

# --- setup: the image, its eStargz form, both pushed; the snapshotter and containerd
IMG=$WORK/image
timeout "$TO" bash "$E2E/image.sh" "$IMG" >/dev/null
# shellcheck disable=SC1091
. "$IMG/image.env"
S=$WORK/store
v image import -q --store "$S" --name test "$IMG/oci" >/dev/null
v image convert -q --store "$S" --estargz --chunk-size 65536 test esgz >/dev/null
PORT=$(shuf -i 20000-40000 -n 1)
timeout "$TO" bash "$REGENV" start "$REG" "$PORT" >/dev/null
R=127.0.0.1:$PORT
v image push -q --store "$S" --image esgz "$R/lazy/test:esgz" >/dev/null
v image push -q --store "$S" --image test "$R/lazy/test:plain" >/dev/null
# the eStargz layers as the registry has them: digest and size, bottom first
ESGZ_MANIFEST=$(curl -fsS -H 'Accept: application/vnd.oci.image.manifest.v1+json' "http://$R/v2/lazy/test/manifests/esgz")
mapfile -t ESGZ_LAYERS < <(jq -r '.layers[].digest' <<<"$ESGZ_MANIFEST")
ESGZ_TOTAL=$(jq '[.layers[].size] | add' <<<"$ESGZ_MANIFEST")
[ "${#ESGZ_LAYERS[@]}" = 3 ] && jq -e '.layers | all(.annotations["containerd.io/snapshot/stargz/toc.digest"])' <<<"$ESGZ_MANIFEST" >/dev/null ||
  die "the pushed eStargz image does not have 3 layers with TOC annotations"
# the original /data/blob, from the plain layer 3
# shellcheck disable=SC2086
set -- $LAYER_DIGESTS
WANT_BLOB=$(tar -xzOf "$IMG/oci/blobs/sha256/${3#sha256:}" ./data/blob | sha256sum | cut -d' ' -f1)

# snap_start: the snapshotter on D/root, socket D/snap.sock, its PID in SNAP_PID
snap_start() {
  VERLAY_LOG_FILE= setsid "$SNAP" --root "$D/root" --address "$D/snap.sock" >>"$D/snap.log" 2>&1 </dev/null &
  SNAP_PID=$!
  echo "$SNAP_PID" > "$D/snap.pid"
  # no "Killed" job report when the restart check kills it
  disown "$SNAP_PID"
  for _ in $(seq 100); do [ -S "$D/snap.sock" ] && return 0; sleep 0.05; done
  tail -5 "$D/snap.log" >&2; return 1
}
mkdir -p "$D"
snap_start || die "the snapshotter did not start"
VERLAY_LOG_FILE=$D/verlay.log timeout "$TO" bash "$C" start "$D/ctd" --proxy "verlay=$D/snap.sock" --path "$BINDIR" >/dev/null

# --- rpull of the eStargz image: no layer downloaded
rpull_lazy() {
  local before after moved n d
  before=$(layer_bytes "${ESGZ_LAYERS[@]}")
  rpull "$R/lazy/test:esgz"
  after=$(layer_bytes "${ESGZ_LAYERS[@]}")
  moved=$((after - before))
  n=$(grep -c "committed without download" "$D/snap.log" || true)
  echo "remote snapshots prepared: $n"
  [ "$n" = 3 ] || { echo "want 3 layers prepared remotely"; return 1; }
  ctr_ snapshots --snapshotter verlay ls
  n=$(ctr_ snapshots --snapshotter verlay ls | awk 'NR > 1 && $NF == "Committed"' | wc -l)
  [ "$n" = 3 ] || { echo "want 3 committed snapshots, have $n"; return 1; }
  for d in "${ESGZ_LAYERS[@]}"; do
    if ctr_ content ls -q | grep -qx "$d"; then echo "containerd downloaded layer $d"; return 1; fi
  done
  echo "figure: rpull moved $moved of $ESGZ_TOTAL layer bytes ($(awk -v a="$moved" -v b="$ESGZ_TOTAL" 'BEGIN { printf "%.2f", 100 * a / b }')%)"
  [ $((moved * 20)) -lt "$ESGZ_TOTAL" ] || { echo "more than 5% of the layers' bytes moved"; return 1; }
}

# --- run: the file read on demand is the original's, byte for byte
run_lazy() {
  local before got moved cached
  before=$(layer_bytes "${ESGZ_LAYERS[@]}")
  run_ "$R/lazy/test:esgz" lazy-cat cat /data/blob > "$WORK/blob.out"
  got=$(sha256sum < "$WORK/blob.out" | cut -d' ' -f1)
  moved=$(($(layer_bytes "${ESGZ_LAYERS[@]}") - before))
  echo "figure: first container (cat /data/blob, $(stat -c %s "$WORK/blob.out") bytes out) moved $moved layer bytes"
  [ "$got" = "$WANT_BLOB" ] || { echo "/data/blob read through the lazy mount: sha256 $got, want $WANT_BLOB"; return 1; }
  run_ "$R/lazy/test:esgz" lazy-check sh -c "$CHECK" | tee "$WORK/check.out"
  grep -qx semantics-ok "$WORK/check.out"
  grep -qx "motd from layer2" "$WORK/check.out"
  # the bytes came from the registry, through the snapshotter's lazy layers, whose chunk
  # caches now hold them
  [ "$moved" -gt 0 ] || { echo "reading /data/blob moved no layer bytes"; return 1; }
  # no byte twice: reads keep what they fetch in the store's lazy/blob, and the background
  # fetch neither asks for it again nor starts in containerd's momentary rootfs mount
  [ "$moved" -le "$ESGZ_TOTAL" ] || { echo "the first container moved more than the layers' $ESGZ_TOTAL bytes"; return 1; }
  cached=$(cat "$D"/root/store/layers/*/lazy/present | tr -d '\000' | wc -c)
  echo "chunks cached in the snapshotter's store: $cached"
  [ "$cached" -gt 0 ]
}

# --- a plain gzip image through rpull: the ordinary path
plain_fallback() {
  local n0 n1
  n0=$(grep -c "committed without download" "$D/snap.log" || true)
  rpull "$R/lazy/test:plain"
  n1=$(grep -c "committed without download" "$D/snap.log" || true)
  [ "$n0" = "$n1" ] || { echo "a plain gzip layer was prepared remotely"; return 1; }
  grep -q "not an eStargz layer" "$D/snap.log"
  run_ "$R/lazy/test:plain" plain-check sh -c "$CHECK" | tee "$WORK/plain.out"
  grep -qx semantics-ok "$WORK/plain.out"
}

# --- kill -9 of the snapshotter, restart: the remote snapshots are still there (records and
# store layers), the image runs again byte for byte
restart() {
  local p=$SNAP_PID got i
  kill -9 "$p"; while kill -0 "$p" 2>/dev/null; do sleep 0.05; done
  rm -f "$D/snap.sock"
  snap_start
  # containerd's client redials after its backoff (about 1 s): wait for a Stat to get through
  for i in $(seq 100); do
    ctr_ snapshots --snapshotter verlay info "$TOP" >/dev/null 2>&1 && break
    sleep 0.1
  done
  ctr_ snapshots --snapshotter verlay info "$TOP" | grep -q '"containerd.io/snapshot/remote"'
  run_ "$R/lazy/test:esgz" lazy-restart cat /data/blob > "$WORK/blob2.out"
  got=$(sha256sum < "$WORK/blob2.out" | cut -d' ' -f1)
  [ "$got" = "$WANT_BLOB" ] || { echo "/data/blob after a restart: sha256 $got, want $WANT_BLOB"; return 1; }
}

# --- removing the image: containerd's garbage collector removes the remote snapshots, and
# the snapshotter their store layers
remove() {
  local n i
  ctr_ image rm --sync "$R/lazy/test:esgz"
  for i in $(seq 50); do
    n=$(find "$D/root/store/layers" -mindepth 1 -maxdepth 1 | wc -l)
    [ "$n" = 0 ] && break
    sleep 0.1
  done
  ctr_ snapshots --snapshotter verlay ls
  echo "store layers left: $n"
  [ "$n" = 0 ]
  if grep -q "$TOP" <(ctr_ snapshots --snapshotter verlay ls); then echo "the top remote snapshot is still there"; return 1; fi
}

e2e_check rpull rpull_lazy || true
# the top layer's snapshot: the committed one no other snapshot names as parent
TOP=$(ctr_ snapshots --snapshotter verlay ls | awk '
  NR > 1 && $NF == "Committed" { c[$1] = 1; if (NF == 3) p[$2] = 1 }
  END { for (k in c) if (!(k in p)) print k }')
e2e_check run-lazy run_lazy || true
e2e_check plain-fallback plain_fallback || true
e2e_check restart restart || true
e2e_check remove remove || true
e2e_summary
