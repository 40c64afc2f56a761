#!/usr/bin/env bash
# registry-env.sh: a private OCI registry (Debian's docker-registry, distribution 2.8) on
# 127.0.0.1, plain HTTP, no auth, storing under one directory; and skopeo kept off the host.
#
#   tests/e2e/registry-env.sh start  DIR [PORT]   default port 5000; prints REGISTRY=127.0.0.1:PORT
#   tests/e2e/registry-env.sh stop   DIR          stops it by PID (SIGTERM, SIGKILL after 5 s)
#   tests/e2e/registry-env.sh skopeo DIR ARGS...  skopeo ARGS, its blob-info cache under DIR
#   tests/e2e/registry-env.sh push   DIR OCI_LAYOUT:TAG NAME:TAG   oci:... -> docker://ADDR/NAME:TAG
#
# Clients need --tls-verify=false (skopeo, podman) or --plain-http (ctr). Used by
# tests/e2e/containerd.sh and tests/registry.rs. Needs docker-registry, skopeo, curl.
set -euo pipefail

die() { echo "registry-env.sh: error: $*" >&2; exit 2; }

cmd=${1:?usage: registry-env.sh start|stop|skopeo|push DIR ...}
DIR=${2:?need DIR}
shift 2
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
PIDF=$DIR/registry.pid
# How long start waits for the registry to answer (0.1 s steps).
START_STEPS=100

alive() { [ -f "$PIDF" ] && kill -0 "$(cat "$PIDF")" 2>/dev/null; }

# skopeo as root always writes /var/lib/containers/cache/blob-info-cache-v1.boltdb, whatever
# its flags say: run it in a private mount namespace where /var/lib is a kernel overlay whose
# upper dir is under DIR.
sk() {
  mkdir -p "$DIR/ns/varlib-upper" "$DIR/ns/varlib-work"
  unshare -m --propagation private sh -c '
    mount -t overlay overlay -o "lowerdir=/var/lib,upperdir=$0/ns/varlib-upper,workdir=$0/ns/varlib-work" /var/lib &&
    exec skopeo "$@"' "$DIR" "$@"
}

case "$cmd" in
start)
  PORT=${1:-5000}
  alive && die "a registry already runs in $DIR (pid $(cat "$PIDF"))"
  command -v docker-registry >/dev/null || die "docker-registry missing: bash tests/setup.sh"
  mkdir -p "$DIR/data"
  cat > "$DIR/config.yml" <<EOF
version: 0.1
log:
  level: info
storage:
  filesystem:
    rootdirectory: $DIR/data
  delete:
    enabled: true
  cache:
    blobdescriptor: inmemory
http:
  addr: 127.0.0.1:$PORT
health:
  storagedriver:
    enabled: false
EOF
  # setsid: a Ctrl-C of the caller does not reach it; stop kills it by PID
  setsid docker-registry serve "$DIR/config.yml" >"$DIR/registry.log" 2>&1 </dev/null &
  echo $! > "$PIDF"
  echo "127.0.0.1:$PORT" > "$DIR/registry.addr"
  for _ in $(seq "$START_STEPS"); do
    curl -fsS "http://127.0.0.1:$PORT/v2/" >/dev/null 2>&1 && break
    alive || { tail -n 5 "$DIR/registry.log" >&2; die "the registry exited (port $PORT taken?)"; }
    sleep 0.1
  done
  curl -fsS "http://127.0.0.1:$PORT/v2/" >/dev/null || die "the registry does not answer on 127.0.0.1:$PORT"
  echo "REGISTRY=127.0.0.1:$PORT"
  echo "REGISTRY_PID=$(cat "$PIDF")"
  ;;
stop)
  if [ -f "$PIDF" ]; then
    pid=$(cat "$PIDF")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
    rm -f "$PIDF"
  fi
  ;;
skopeo) sk "$@" ;;
push)
  src=${1:?need OCI_LAYOUT:TAG}
  dst=${2:?need NAME:TAG}
  sk copy -q --dest-tls-verify=false "oci:$src" "docker://$(cat "$DIR/registry.addr")/$dst"
  ;;
*) die "unknown command $cmd (start, stop, skopeo, push)" ;;
esac
