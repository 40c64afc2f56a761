#!/usr/bin/env bash
# setup.sh: install what verlay's build and tests need, then build.
#
#   bash tests/setup.sh [--no-build]
#
# Debian 12, as root. Idempotent: apt runs only when a package is missing, pjdfstest is
# installed only when absent, the dummy user "tests" only created when missing.
#   - Debian packages: fuse3 (fusermount3), attr, and the container stack the podman
#     e2e test drives (podman, runc, crun, uidmap, slirp4netns, fuse-overlayfs, catatonit,
#     busybox-static, jq, skopeo, umoci; python3 for tests/e2e/image.sh); docker-registry (distribution 2.8) for
#     tests/registry.rs and the containerd e2e test, containerd and curl for the latter, and
#     protobuf-compiler (protoc), which builds the snapshotter's gRPC code; stargz-snapshotter
#     for its ctr-remote (tests/e2e/containerd-lazy.sh pulls with `ctr-remote image rpull`).
#   - pjdfstest 0.2.2 (crates.io) for tests/e2e/pjdfstest.sh.
#   - the user "tests", one of pjdfstest's two dummy users (the other is "nobody").
#   - cargo build --release --all-targets (skipped with --no-build).
# The Rust toolchain itself (rustup, rust-version in Cargo.toml) must already be there.
set -euo pipefail
# shellcheck source=tests/e2e/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/e2e/lib.sh"

BUILD=1
case "${1:-}" in --no-build) BUILD=0 ;; "") ;; *) die "usage: setup.sh [--no-build]" ;; esac
need_root
command -v cargo >/dev/null || die "cargo not found (install Rust with rustup; see rust-version in Cargo.toml)"

PKGS=(fuse3 attr podman runc crun uidmap slirp4netns fuse-overlayfs catatonit
      busybox-static jq python3 skopeo umoci procps util-linux passwd
      strace xfsprogs e2fsprogs dosfstools zstd tar
      containerd docker-registry curl protobuf-compiler apache2-utils openssl time
      stargz-snapshotter)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  t=$(now)
  export DEBIAN_FRONTEND=noninteractive
  alog=$(mktemp /tmp/verlay-apt.XXXXXX)
  { apt-get update -qq && apt-get install -y -qq -o Dpkg::Use-Pty=0 "${missing[@]}"; } >"$alog" 2>&1 ||
    { cat "$alog" >&2; rm -f "$alog"; die "apt-get failed"; }
  rm -f "$alog"
  log "apt done in $(since "$t") s"
fi

if ! command -v pjdfstest >/dev/null; then
  log "cargo install pjdfstest 0.2.2 (about 1 min)"
  t=$(now)
  cargo install pjdfstest --version 0.2.2 --locked --quiet
  log "pjdfstest installed in $(since "$t") s"
fi

# pjdfstest switches to a user "tests"; a leftover group of that name must not stop us.
if ! getent passwd tests >/dev/null; then
  if getent group tests >/dev/null; then
    useradd --system --no-create-home --gid tests --shell /usr/sbin/nologin tests
  else
    useradd --system --no-create-home --user-group --shell /usr/sbin/nologin tests
  fi
fi

if [ "$BUILD" = 1 ]; then
  t=$(now)
  (cd "$REPO" && cargo build --release --all-targets)
  log "build done in $(since "$t") s"
fi
