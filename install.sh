#!/usr/bin/env bash
# install.sh: install verlay and verlay-snapshotter into a prefix, or remove them again.
#
#   bash install.sh [--prefix P] [--user] [--from DIR]     install
#   bash install.sh [--prefix P] [--user] --uninstall      remove exactly what was installed
#
#   --prefix P   where to install (default /usr/local; with --user, ~/.local)
#   --user       for the calling user, no root needed: prefix ~/.local, the systemd user unit in
#                ${XDG_CONFIG_HOME:-~/.config}/systemd/user
#   --from DIR   take verlay and verlay-snapshotter from DIR instead of building them
#                (default: ./target/release, built with `cargo build --release` when a binary
#                is missing or older than the sources)
#
# Installs P/bin/verlay, P/bin/verlay-snapshotter, the snapshotter's systemd unit
# verlay-snapshotter.service (P/lib/systemd/system, or the user unit directory with --user),
# shell completions when `verlay completions SHELL` exists, and the list of what it installed,
# P/share/verlay/installed.txt, which --uninstall reads. Installing again replaces the previous
# installation in that prefix. It writes no configuration of podman or containerd: it prints
# the storage.conf and config.toml snippets to add. Exit status 0 on success, 1 on failure,
# 2 on a bad command line.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ME=install.sh
die() { echo "$ME: error: $*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }
bad_usage() { echo "$ME: $* (see bash install.sh --help)" >&2; exit 2; }

PREFIX="" USER_MODE=0 FROM="" UNINSTALL=0
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) [ $# -ge 2 ] || bad_usage "--prefix wants a directory"; PREFIX=$2; shift 2 ;;
    --prefix=*) PREFIX=${1#--prefix=}; shift ;;
    --user) USER_MODE=1; shift ;;
    --from) [ $# -ge 2 ] || bad_usage "--from wants a directory"; FROM=$2; shift 2 ;;
    --from=*) FROM=${1#--from=}; shift ;;
    --uninstall) UNINSTALL=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) bad_usage "unknown argument $1" ;;
  esac
done

if [ "$USER_MODE" = 1 ]; then
  [ -n "${HOME:-}" ] && [ -d "$HOME" ] || die "HOME (${HOME:-unset}) is not a directory (--user installs into ~/.local)"
  PREFIX=${PREFIX:-$HOME/.local}
  UNITDIR=${XDG_CONFIG_HOME:-$HOME/.config}/systemd/user
  UNIT_TEMPLATE=$REPO/packaging/verlay-snapshotter.user.service
else
  PREFIX=${PREFIX:-/usr/local}
  UNITDIR=$PREFIX/lib/systemd/system
  UNIT_TEMPLATE=$REPO/packaging/verlay-snapshotter.service
fi
case "$PREFIX" in /*) ;; *) PREFIX=$PWD/$PREFIX ;; esac
case "$UNITDIR" in /*) ;; *) UNITDIR=$PWD/$UNITDIR ;; esac
# The manifest holds one path per line
case "$PREFIX$UNITDIR" in *$'\n'*) die "a path with a newline in it is not supported" ;; esac
PREFIX=${PREFIX%/}
BINDIR=$PREFIX/bin
MANIFEST=$PREFIX/share/verlay/installed.txt

# --- uninstall LIST: remove the files LIST (a manifest) names, then the directories install
# made (when empty), deepest first. Nothing else is touched.
uninstall() {
  local kind path n=0 lines=()
  mapfile -t lines < "$1"
  for ((i = ${#lines[@]} - 1; i >= 0; i--)); do
    kind=${lines[i]%% *} path=${lines[i]#* }
    case "$kind" in
      file)
        case "$path" in /*) ;; *) die "$MANIFEST: not an absolute path: $path" ;; esac
        [ "$path" = "$MANIFEST" ] && [ -n "${2:-}" ] && continue
        if [ -e "$path" ] || [ -L "$path" ]; then rm -f -- "$path"; n=$((n + 1)); fi ;;
      dir) if [ -d "$path" ]; then rmdir -- "$path" 2>/dev/null || true; fi ;;
      '#'* | '') ;;
      *) die "$MANIFEST: unknown line: ${lines[i]}" ;;
    esac
  done
  [ -n "${2:-}" ] || echo "$ME: removed $n files listed in $MANIFEST"
}

if [ "$UNINSTALL" = 1 ]; then
  [ -f "$MANIFEST" ] || die "$MANIFEST: no such file (nothing installed in $PREFIX by install.sh; give the same --prefix/--user as at install)"
  uninstall "$MANIFEST"
  exit 0
fi

# --- the binaries: --from DIR, or this checkout's release build (built when stale)
if [ -n "$FROM" ]; then
  SRC=$(cd "$FROM" && pwd) || die "--from $FROM: not a directory"
  for b in verlay verlay-snapshotter; do
    [ -x "$SRC/$b" ] || die "$SRC/$b: missing or not executable (--from wants a directory holding both binaries)"
  done
else
  SRC=$REPO/target/release
  [ -f "$REPO/Cargo.toml" ] || die "$REPO is not a verlay checkout (no Cargo.toml): pass --from DIR"
  stale=""
  for b in verlay verlay-snapshotter; do
    if [ ! -x "$SRC/$b" ]; then
      stale="$SRC/$b is missing"
    elif [ -z "$stale" ]; then
      newer=$(cd "$REPO" && find src snapshotter/src vendor Cargo.toml Cargo.lock snapshotter/Cargo.toml \
        -newer "$SRC/$b" -type f -print -quit 2>/dev/null || true)
      [ -n "$newer" ] && stale="$REPO/$newer is newer than $SRC/$b"
    fi
  done
  if [ -n "$stale" ]; then
    command -v cargo >/dev/null || die "$stale and cargo is not in the PATH (install Rust with rustup, or pass --from DIR)"
    echo "$ME: $stale: cargo build --release"
    (cd "$REPO" && cargo build --release) ||
      die "cargo build --release failed (build as the owner of $REPO, or pass --from DIR)"
  fi
fi

# the prefix, or the directory it would be made in, must be writable
d=$PREFIX
while [ ! -d "$d" ]; do d=$(dirname "$d"); done
[ -w "$d" ] || die "$d: not writable by $(id -un) (run as root, or use --user for ~/.local, or --prefix DIR)"

# --- install, recording every directory made and every file written. Over an earlier
# installation: its directories stay listed, files are replaced by rename (a running verlay
# keeps its inode, and the path never goes missing), and its files this one does not
# install again are removed at the end.
RECORD=$(mktemp "${TMPDIR:-/tmp}/verlay-install.XXXXXX")
OLD=$(mktemp "${TMPDIR:-/tmp}/verlay-install-old.XXXXXX")
trap 'rm -f "$RECORD" "$OLD"' EXIT
if [ -f "$MANIFEST" ]; then
  echo "$ME: replacing the installation listed in $MANIFEST"
  cp "$MANIFEST" "$OLD"
  grep '^dir /' "$OLD" >> "$RECORD" || true
fi
mkdirs() {  # mkdirs DIR: mkdir -p, recording each directory it creates (parents first)
  local d=$1 missing=()
  while [ ! -d "$d" ]; do missing=("$d" "${missing[@]}"); d=$(dirname "$d"); done
  for d in "${missing[@]}"; do mkdir -m 0755 -- "$d"; echo "dir $d" >> "$RECORD"; done
}
put() {  # put MODE SRC DEST: copy SRC to DEST (replacing it: a running binary keeps its inode)
  mkdirs "$(dirname "$3")"
  install -m "$1" -T -- "$2" "$3.verlay-new"
  mv -f -- "$3.verlay-new" "$3"
  echo "file $3" >> "$RECORD"
}

put 0755 "$SRC/verlay" "$BINDIR/verlay"
put 0755 "$SRC/verlay-snapshotter" "$BINDIR/verlay-snapshotter"
"$BINDIR/verlay" --version >/dev/null || die "$BINDIR/verlay --version failed"

unit=$(mktemp "${TMPDIR:-/tmp}/verlay-unit.XXXXXX")
trap 'rm -f "$RECORD" "$OLD" "$unit"' EXIT
[ -f "$UNIT_TEMPLATE" ] || die "$UNIT_TEMPLATE: missing (install.sh needs the packaging/ directory beside it)"
sed "s#@BINDIR@#$BINDIR#g" "$UNIT_TEMPLATE" > "$unit"
put 0644 "$unit" "$UNITDIR/verlay-snapshotter.service"

# shell completions, when this verlay can print them
completions=""
for sh in bash zsh fish; do
  case "$sh" in
    bash) dest=$PREFIX/share/bash-completion/completions/verlay ;;
    zsh) dest=$PREFIX/share/zsh/site-functions/_verlay ;;
    fish) dest=$PREFIX/share/fish/vendor_completions.d/verlay.fish ;;
  esac
  if "$BINDIR/verlay" completions "$sh" > "$unit" 2>/dev/null && [ -s "$unit" ]; then
    put 0644 "$unit" "$dest"
    completions="$completions $sh"
  fi
done

mkdirs "$(dirname "$MANIFEST")"
{
  echo "# installed by verlay's install.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ); bash install.sh$([ "$USER_MODE" = 1 ] && echo ' --user') --prefix $PREFIX --uninstall removes these"
  cat "$RECORD"
  echo "file $MANIFEST"
} > "$MANIFEST.verlay-new"
mv -f "$MANIFEST.verlay-new" "$MANIFEST"
# the earlier installation's files that this one does not have
grep -vxF -f "$MANIFEST" "$OLD" > "$unit" || true
uninstall "$unit" stale

# --- what the user does next
if [ "$USER_MODE" = 1 ]; then
  STORAGE_CONF=${XDG_CONFIG_HOME:-$HOME/.config}/containers/storage.conf
  # shellcheck disable=SC2016  # printed for the user, who expands it
  SOCK='$XDG_RUNTIME_DIR/verlay-snapshotter/verlay.sock'
  SYSTEMCTL="systemctl --user"
else
  STORAGE_CONF=/etc/containers/storage.conf
  SOCK=/run/verlay-snapshotter/verlay.sock
  SYSTEMCTL=systemctl
fi
cat <<EOF
installed $("$BINDIR/verlay" --version) into $PREFIX:
  $BINDIR/verlay
  $BINDIR/verlay-snapshotter
  $UNITDIR/verlay-snapshotter.service
  completions:${completions:- none (this verlay has no \`completions\` command)}
  list of files: $MANIFEST (bash install.sh$([ "$USER_MODE" = 1 ] && echo ' --user') --prefix $PREFIX --uninstall)

podman: add to $STORAGE_CONF
  [storage]
  driver = "overlay"

  [storage.options.overlay]
  mount_program = "$BINDIR/verlay"

containerd: add to /etc/containerd/config.toml (version = 2), then restart containerd
  [proxy_plugins]
    [proxy_plugins.verlay]
      type = "snapshot"
      address = "$SOCK"
and start the snapshotter: $SYSTEMCTL daemon-reload && $SYSTEMCTL enable --now verlay-snapshotter
EOF
case "$UNITDIR" in
  /etc/systemd/system | /usr/local/lib/systemd/system | /usr/lib/systemd/system | /lib/systemd/system | \
    "${XDG_CONFIG_HOME:-$HOME/.config}/systemd/user") ;;
  *) echo "  (systemd does not look in $UNITDIR: first $SYSTEMCTL link $UNITDIR/verlay-snapshotter.service)" ;;
esac
case ":$PATH:" in
  *":$BINDIR:"*) ;;
  *) echo "containerd and ctr run \`verlay\` from their PATH (mounts of type fuse3.verlay): add $BINDIR to it" ;;
esac
