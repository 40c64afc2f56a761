#!/usr/bin/env bash
# containerd-env.sh: a private containerd whose root, state, sockets and config are all under
# one directory; tests/e2e/containerd.sh runs one per check.
#
#   tests/e2e/containerd-env.sh start DIR [--proxy NAME=SOCKET]... [--path DIR]...
#   tests/e2e/containerd-env.sh ctr   DIR CTR-ARGS...    ctr -a DIR/containerd.sock CTR-ARGS
#   tests/e2e/containerd-env.sh run   DIR [CTR-RUN-FLAGS] IMAGE ID [CMD...]
#                                     ctr run --rm --cgroup "" --fifo-dir DIR/fifo ...
#   tests/e2e/containerd-env.sh stop  DIR                kill tasks, containerd, shims by PID
#
# start writes DIR/config.toml (CRI plugin disabled) with one [proxy_plugins.NAME] snapshotter
# per --proxy, starts containerd, waits for its socket and prints CONTAINERD_ADDRESS=...
# --path DIR goes first in containerd's PATH (its shims inherit it): mount.fuse3 looks there
# for PROGRAM when a snapshotter returns a mount of type fuse3.PROGRAM.
#
# containerd runs in its own mount namespace (unshare -m --propagation slave) with DIR/run
# bind-mounted over /run: containerd 1.6 hard-codes its shim sockets (/run/containerd/s/) and
# runc's state root (/run/containerd/runc), and this keeps them, and every rootfs mount made by
# containerd or its shims, off the host. Mounts made on the host later (a FUSE snapshotter
# mounting under its own root) still propagate into containerd's namespace.
# Hence `ctr run` and `ctr task exec` need --fifo-dir under DIR (run adds it): ctr's default,
# /run/containerd/fifo on the host, is not visible to the shim. --cgroup "" makes runc use
# /<id> in each hierarchy and remove it; the default /<namespace>/<id> leaves
# /sys/fs/cgroup/*/<namespace> behind.
# Needs root; containerd, runc (tests/setup.sh installs them).
set -euo pipefail

die() { echo "containerd-env.sh: error: $*" >&2; exit 2; }

cmd=${1:?usage: containerd-env.sh start|stop|ctr|run DIR ...}
DIR=${2:?need DIR}
shift 2
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
SOCK=$DIR/containerd.sock
PIDF=$DIR/containerd.pid
# How long start waits for the socket, and stop for containerd to exit (0.1 s steps).
STEPS=100

alive() { [ -f "$PIDF" ] && kill -0 "$(cat "$PIDF")" 2>/dev/null; }

case "$cmd" in
start)
  proxies=() xpath=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --proxy) proxies+=("${2:?--proxy wants NAME=SOCKET}"); shift 2 ;;
      --path) xpath="$xpath$(cd "${2:?--path wants a directory}" && pwd):"; shift 2 ;;
      *) die "unknown option $1" ;;
    esac
  done
  alive && die "containerd already runs in $DIR (pid $(cat "$PIDF"))"
  command -v containerd >/dev/null || die "containerd missing: bash tests/setup.sh"
  mkdir -p "$DIR"/{root,state,run,opt,fifo}
  {
    echo 'version = 2'
    echo "root = \"$DIR/root\""
    echo "state = \"$DIR/state\""
    echo 'disabled_plugins = ["io.containerd.grpc.v1.cri"]'
    echo '[grpc]'
    echo "  address = \"$SOCK\""
    echo '[ttrpc]'
    echo "  address = \"$SOCK.ttrpc\""
    echo '[debug]'
    echo "  address = \"$DIR/debug.sock\""
    echo '[plugins."io.containerd.internal.v1.opt"]'
    echo "  path = \"$DIR/opt\""
    if [ ${#proxies[@]} -gt 0 ]; then
      echo '[proxy_plugins]'
      for p in "${proxies[@]}"; do
        echo "  [proxy_plugins.${p%%=*}]"
        echo '    type = "snapshot"'
        echo "    address = \"${p#*=}\""
      done
    fi
  } > "$DIR/config.toml"
  rm -f "$SOCK" "$SOCK.ttrpc" "$DIR/debug.sock"
  # setsid: its own session, so the caller's Ctrl-C does not reach it; unshare without --fork
  # execs, so $! is containerd's own PID
  PATH="$xpath$PATH" setsid unshare -m --propagation slave \
    sh -c 'mount --bind "$0/run" /run && exec containerd --config "$0/config.toml"' "$DIR" \
    >"$DIR/containerd.log" 2>&1 </dev/null &
  echo $! > "$PIDF"
  for _ in $(seq "$STEPS"); do
    [ -S "$SOCK" ] && ctr -a "$SOCK" version >/dev/null 2>&1 && break
    alive || { tail -n 20 "$DIR/containerd.log" >&2; die "containerd exited"; }
    sleep 0.1
  done
  ctr -a "$SOCK" version >/dev/null 2>&1 || die "containerd did not answer on $SOCK in $((STEPS / 10)) s"
  echo "CONTAINERD_ADDRESS=$SOCK"
  echo "CONTAINERD_PID=$(cat "$PIDF")"
  ;;
ctr)
  exec ctr -a "$SOCK" "$@"
  ;;
run)
  exec ctr -a "$SOCK" run --rm --cgroup "" --fifo-dir "$DIR/fifo" "$@"
  ;;
stop)
  if alive; then
    # kill and delete every task in every namespace, so that no shim is left behind
    for ns in $(ctr -a "$SOCK" namespaces ls -q 2>/dev/null); do
      for t in $(ctr -a "$SOCK" -n "$ns" tasks ls -q 2>/dev/null); do
        ctr -a "$SOCK" -n "$ns" tasks kill -s SIGKILL "$t" 2>/dev/null || true
      done
      sleep 0.3
      for t in $(ctr -a "$SOCK" -n "$ns" tasks ls -q 2>/dev/null); do
        ctr -a "$SOCK" -n "$ns" tasks delete -f "$t" >/dev/null 2>&1 || true
      done
    done
    pid=$(cat "$PIDF")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq "$STEPS"); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then echo "containerd $pid ignored SIGTERM: SIGKILL" >&2; kill -9 "$pid" 2>/dev/null || true; fi
  fi
  # shims daemonise away from containerd; each wrote its own PID file
  while IFS= read -r f; do
    p=$(cat "$f" 2>/dev/null) || continue
    if [ -n "$p" ] && kill -0 "$p" 2>/dev/null; then echo "killing leftover shim $p" >&2; kill -9 "$p" 2>/dev/null || true; fi
  done < <(find "$DIR/state" -name shim.pid 2>/dev/null)
  rm -f "$PIDF"
  ;;
*) die "unknown command $cmd (start, stop, ctr, run)" ;;
esac
