#!/usr/bin/env bash
# pjdfstest-run.sh: one run of the POSIX conformance suite pjdfstest 0.2.2 (the Rust rewrite,
# crates.io) in a directory, summarised. tests/e2e/pjdfstest.sh calls it; it also runs alone.
#
#   tests/e2e/pjdfstest-run.sh DIR [--secondary DIR2] [--expected-failures FILE] [--log FILE]
#                              [PATTERN...]
#
#   DIR          a directory on the file system under test; pjdfstest works in a fresh
#                temporary directory under it and removes it afterwards
#   --secondary DIR2
#                a directory on another file system, for the EXDEV cases (default: the first
#                of /dev/shm /tmp /var/tmp /run whose device differs from DIR's)
#   --expected-failures FILE
#                cases expected to fail, one a line: NAME, whitespace, then the reason (an
#                entry without a reason is refused); '#' starts a comment line. An expected
#                case that fails counts as an expected failure; one that passes is a failure
#                (the list is stale)
#   --log FILE   keep pjdfstest's whole output there
#   PATTERN...   only the cases whose name contains one of these (to look at one case by hand)
#
# Every case runs once: nothing is re-run. Prints "FAILED: NAME" for each failure, "expected
# failure: NAME" for each expected one, then "N passed, N failed, N skipped". Exit status 0
# when nothing failed, 1 when something failed, 2 on a usage or set-up error.
#
# As root, pjdfstest switches to the users nobody and tests (tests/setup.sh creates "tests"):
# a FUSE mount must allow them in (allow_other) and every directory above DIR must be
# searchable by them, or every case that switches user fails with EACCES. The EROFS cases
# are skipped: they remount the file system read-only.
set -Eeuo pipefail

die() { echo "pjdfstest-run.sh: error: $*" >&2; exit 2; }

DIR="" SEC="" EXPECTED="" LOG="" PATTERNS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --secondary) SEC=${2:?--secondary wants a directory}; shift ;;
    --expected-failures) EXPECTED=${2:?--expected-failures wants a file}; shift ;;
    --log) LOG=${2:?--log wants a file}; shift ;;
    -h|--help) sed -n '2,/^set -Eeuo/p' "$0" | sed '$d'; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) if [ -z "$DIR" ]; then DIR=$1; else PATTERNS+=("$1"); fi ;;
  esac
  shift
done
[ -n "$DIR" ] || die "missing DIR (see --help)"
[ -d "$DIR" ] || die "$DIR is not a directory"
DIR=$(cd "$DIR" && pwd)

PJD=$(command -v pjdfstest 2>/dev/null || true)
[ -z "$PJD" ] && [ -x "$HOME/.cargo/bin/pjdfstest" ] && PJD=$HOME/.cargo/bin/pjdfstest
[ -n "$PJD" ] || die "pjdfstest not installed: bash tests/setup.sh (cargo install pjdfstest --version 0.2.2 --locked)"

getent passwd nobody >/dev/null || die "user 'nobody' missing"
getent passwd tests >/dev/null || die "user 'tests' missing (pjdfstest's second dummy user): bash tests/setup.sh"
[ "$(id -u)" = 0 ] || echo "pjdfstest-run.sh: not root: the cases that need root are skipped" >&2
NOBODY_GROUP=$(id -gn nobody)
TESTS_GROUP=$(id -gn tests)

dev_of() { stat -c %d "$1"; }
if [ -z "$SEC" ]; then
  for c in /dev/shm /tmp /var/tmp /run; do
    if [ -d "$c" ] && [ -w "$c" ] && [ "$(dev_of "$c")" != "$(dev_of "$DIR")" ]; then SEC=$c; break; fi
  done
  [ -n "$SEC" ] || die "no directory on another file system for the EXDEV cases; pass --secondary DIR2"
fi
[ "$(dev_of "$SEC")" != "$(dev_of "$DIR")" ] || die "--secondary $SEC is on the same file system as $DIR"

# The expected failures as a TOML string list; each entry must give its reason.
expected_list() {
  [ -n "$EXPECTED" ] || return 0
  [ -r "$EXPECTED" ] || die "cannot read $EXPECTED"
  awk -v f="$EXPECTED" '
    /^[[:space:]]*(#|$)/ { next }
    NF < 2 { printf "%s:%d: %s has no reason\n", f, NR, $1 > "/dev/stderr"; bad = 1; next }
    { printf "%s\"%s\"", (n++ ? ", " : ""), $1 }
    END { exit bad }' "$EXPECTED" || die "every entry of $EXPECTED needs a reason after its name"
}
EXPECTED_TOML=$(expected_list)

WORK=$(mktemp -d /tmp/pjdfstest-run.XXXXXX)
SECDIR=$(mktemp -d "$SEC/pjdfstest-sec.XXXXXX")
chmod 0755 "$SECDIR"
trap 'rm -rf "$WORK" "$SECDIR"' EXIT

# Features the Linux VFS has; the naptime suits nanosecond timestamps.
cat > "$WORK/pjdfstest.toml" <<EOF
[features]
posix_fallocate = {}
utime_now = {}
utimensat = {}
rename_ctime = {}

[settings]
naptime = 0.01
allow_remount = false
expected_failures = [$EXPECTED_TOML]

[dummy_auth]
entries = [["nobody", "$NOBODY_GROUP"], ["tests", "$TESTS_GROUP"]]
EOF

OUT=$WORK/out.log
rc=0
( cd "$DIR" && NO_COLOR=1 CLICOLOR=0 "$PJD" -c "$WORK/pjdfstest.toml" -p "$DIR" -s "$SECDIR" "${PATTERNS[@]}" ) > "$OUT" 2>&1 || rc=$?
sed -i 's/\x1b\[[0-9;]*m//g' "$OUT"
[ -n "$LOG" ] && cp "$OUT" "$LOG"

# "Summary: F failed, S skipped, P passed, E expected failures, T total"
summary=$(grep -E '^Summary: ' "$OUT" | tail -n 1 || true)
if [ -z "$summary" ]; then
  tail -n 20 "$OUT" >&2
  die "pjdfstest did not finish (exit $rc); its last lines are above"
fi
read -r failed skipped passed expected < <(echo "$summary" | awk '{ gsub(",", ""); print $2, $4, $6, $8 }')
awk '$NF == "FAILED" || / PASSED UNEXPECTEDLY$/ { print "FAILED: " $1 }' "$OUT"
[ "${expected:-0}" -gt 0 ] && awk '/ failed as expected$/ { print "expected failure: " $1 }' "$OUT"
echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" = 0 ]
