# shellcheck shell=bash disable=SC2034  # sourced; REPO, E2E and the counters are used by the sourcing scripts
# lib.sh: helpers shared by tests/setup.sh, tests/run.sh and tests/e2e/*.sh (source it).
#
# Results: each e2e check prints one line "e2e: ok NAME (T s)" or "e2e: FAIL NAME (T s): WHY";
# tests/run.sh counts those lines. Nothing here kills or unmounts anything it did not start.

# The repository root, and this directory: the e2e scripts and the harnesses they call
# (image.sh, registry-env.sh, containerd-env.sh, podman-run.sh, rootless-user.sh,
# pjdfstest-run.sh). Nothing here reads a file outside the repository.
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
E2E=$REPO/tests/e2e

# rustup installs into ~/.cargo/bin, which CI's environment may not have on PATH.
case ":$PATH:" in *":$HOME/.cargo/bin:"*) ;; *) [ -d "$HOME/.cargo/bin" ] && PATH=$HOME/.cargo/bin:$PATH ;; esac
export PATH

log() { echo "$(basename "$0"): $*" >&2; }
die() { log "error: $*"; exit 2; }

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

E2E_PASSED=0 E2E_FAILED=0
e2e_ok()   { E2E_PASSED=$((E2E_PASSED + 1)); echo "e2e: ok $1 ($2 s)"; }
e2e_fail() { E2E_FAILED=$((E2E_FAILED + 1)); echo "e2e: FAIL $1 ($2 s): $3"; }
# The last line of an e2e script: its own tally; exit status 1 when anything failed.
e2e_summary() {
  echo "$(basename "$0"): $E2E_PASSED passed, $E2E_FAILED failed"
  [ "$E2E_FAILED" = 0 ]
}

# The binary under test: $1, else $VERLAY_BIN, else the release build. Absolute path.
resolve_bin() {
  local b=${1:-${VERLAY_BIN:-$REPO/target/release/verlay}}
  [ -x "$b" ] || die "$b: not an executable (build it: cargo build --release, or pass BIN)"
  readlink -f "$b"
}

need_root() { [ "$(id -u)" = 0 ] || die "run as root (FUSE allow_other, pjdfstest's user switching, podman as root)"; }

is_mounted() { awk -v m="$1" '$5 == m { found = 1 } END { exit !found }' /proc/self/mountinfo; }

# PIDs whose argv ends with MOUNTPOINT: the daemon a mount program left behind.
# fuse-overlayfs and verlay both keep their argv when they daemonise.
pids_serving() {
  local m=$1 p last
  for p in /proc/[0-9]*; do
    last=$(tr '\0' '\n' < "$p/cmdline" 2>/dev/null | tail -n 1) || continue
    [ "$last" = "$m" ] && echo "${p#/proc/}"
  done
  return 0
}

# Unmount MOUNTPOINT and stop the daemon serving it (PIDS, found at mount time). Gentle
# first: after fusermount3 -u the daemon exits by itself (fuse-overlayfs takes about 1.5 s).
# Then SIGTERM by PID after 5 s, SIGKILL after 7 s, and a lazy unmount, so that a hung
# daemon cannot leave a dead mount behind.
unmount_and_stop() {
  local m=$1; shift
  local p i alive
  if is_mounted "$m"; then fusermount3 -u "$m" 2>/dev/null || true; fi
  for i in $(seq 70); do
    alive=""
    for p in "$@"; do kill -0 "$p" 2>/dev/null && alive="$alive $p"; done
    [ -z "$alive" ] && break
    if [ "$i" = 50 ]; then
      for p in $alive; do log "daemon $p still running 5 s after unmount: SIGTERM"; kill "$p" 2>/dev/null || true; done
    fi
    sleep 0.1
  done
  for p in "$@"; do
    if kill -0 "$p" 2>/dev/null; then log "daemon $p: SIGKILL"; kill -9 "$p" 2>/dev/null || true; fi
  done
  if is_mounted "$m"; then fusermount3 -u -z "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; fi
  return 0
}

# e2e_check NAME CMD...: one e2e result from a command's status. CMD runs in a subshell with
# errexit on (bash ignores errexit in a function called from `cmd || ...`), so the first
# failing step fails the check. Its output goes to $WORK/NAME.out; its lines "figure: X" are
# shown. Returns 0: a failed check is counted (e2e_summary) and the script goes on.
e2e_check() {
  local name=$1 t rc; shift
  t=$(now)
  set +e
  (set -e; "$@") > "$WORK/$name.out" 2>&1 </dev/null
  rc=$?
  set -e
  if [ "$rc" = 0 ]; then e2e_ok "$name" "$(since "$t")"; else
    tail -n 15 "$WORK/$name.out" | sed 's/^/  | /'
    e2e_fail "$name" "$(since "$t")" "exited $rc; see $WORK/$name.out"
  fi
  sed -n 's/^figure: /  /p' "$WORK/$name.out"
  return 0
}

# e2e_reap_under DIR: what a test's containerd left under DIR, for its teardown: verlay
# daemons serving a mount there (none expected; logged, stopped by PID) and the mounts.
e2e_reap_under() {
  local w=$1 p m
  for p in $(pgrep -f "verlay overlay $w/" 2>/dev/null || true); do
    log "leftover verlay daemon $p: $(tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null)"; kill "$p" 2>/dev/null || true
  done
  awk -v w="$w/" 'index($5, w) == 1 { print $5 }' /proc/self/mountinfo | sort -r | while read -r m; do
    fusermount3 -u "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
  done
}
