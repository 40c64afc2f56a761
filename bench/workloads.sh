#!/usr/bin/env bash
# bench/workloads.sh: the workload set of bench/run.sh: the same workloads on the same cached
# layers, on kernel overlayfs or on any program with fuse-overlayfs's command line.
#
#   bash bench/workloads.sh MODE [--json FILE] [--only w1,w2,...] [--label TEXT]
#   bash bench/workloads.sh --list          # workload names
#   bash bench/workloads.sh --prepare       # build the cached layers only
# MODE:
#   kernel          mount -t overlay (lowerdir=over:small:big)
#   fuse:PROGRAM    PROGRAM -o lowerdir=...,upperdir=...,workdir=... MNT
#                   (unmounted with fusermount3 -u MNT, the daemon waited for)
#
# Output: one line per workload "name<TAB>seconds<TAB>extra" on stdout, and a JSON file
# (default $BENCH_ROOT/results/<mode>-<time>.json) that bench/run.sh's report.py reads.
#
# Environment:
#   BENCH_ROOT       scratch and cache root (default /tmp/bl). The layers are built once
#                    under $BENCH_ROOT/layers and reused (~5 GB with the caches).
#   BENCH_FUSE_OPTS  extra -o options for fuse:PROGRAM (e.g. "verify=off,passthrough=1")
#   BENCH_REPS       repetitions of the data-heavy groups (default 3; the fastest is kept)
#   BENCH_SHORT=1    short fio time limits, 1 repetition (smoke runs only)
#
# Must run as root (mounts, drop_caches, whiteout char devices). Needs fio, python3, tar,
# fuse3 (fusermount3) and cargo (bench/run.sh installs what is missing); the build workload's
# crates are fetched from crates.io once and vendored.
#
# "Cold" means: a fresh mount (fresh empty upper and work dirs), then
# `sync; echo 3 > /proc/sys/vm/drop_caches`. A VM's host may still cache the virtual disk, so
# cold reads can be cold in the guest only. Noise: a VM that hands freed guest memory back
# to its host (free page reporting) fills the page cache at 0.4-5 GB/s depending on which
# pages the allocator hands out; smallread, seqread, copyup and seqwrite therefore run
# BENCH_REPS times, each on a fresh mount, and report the fastest (noise only adds time).
set -Eeuo pipefail

BENCH_VERSION=3
LAYER_VERSION=1              # bump when the layer generator changes
BL=${BENCH_ROOT:-/tmp/bl}
LAYERS=$BL/layers
CACHE=$BL/cache
PY=/usr/bin/python3
[ -x "$PY" ] || PY=$(command -v python3)

WORKLOADS="check statwalk-cold statwalk-warm readdir-cold readdir-warm smallread-cold seqread-cold randread-cold copyup copyup-durable seqwrite seqwrite-durable randwrite untar metadata cp-tree rm-copied rm-lower build"

die() { echo "workloads.sh: error: $*" >&2; exit 1; }
log() { echo "workloads.sh: $*" >&2; }

# ---------------------------------------------------------------- arguments
MODE="" JSON_OUT="" ONLY="" LABEL="" PREPARE_ONLY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --list) for w in $WORKLOADS; do echo "$w"; done; exit 0 ;;
    --prepare) PREPARE_ONLY=1 ;;
    --json) JSON_OUT=$2; shift ;;
    --only) ONLY=$2; shift ;;
    --label) LABEL=$2; shift ;;
    -h|--help) sed -n '2,/^set -Eeuo/p' "$0" | sed '$d'; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [ -z "$MODE" ] || die "one MODE only (got '$MODE' and '$1')"; MODE=$1 ;;
  esac
  shift
done
[ "$(id -u)" = 0 ] || die "must run as root (mounts, drop_caches, mknod whiteouts)"
if [ "$PREPARE_ONLY" = 0 ]; then
  [ -n "$MODE" ] || die "missing MODE: kernel | fuse:PROGRAM (see --help)"
  case "$MODE" in
    kernel) PROG="" ;;
    fuse:*) PROG=${MODE#fuse:}
            [ -x "$PROG" ] || PROG=$(command -v "$PROG" 2>/dev/null) || die "fuse program '${MODE#fuse:}' not found or not executable"
            ;;
    *) die "unknown MODE '$MODE': use kernel or fuse:PROGRAM" ;;
  esac
fi
want() { [ -z "$ONLY" ] && return 0; case ",$ONLY," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

# ---------------------------------------------------------------- dependencies
ensure_deps() {
  local missing=()
  command -v fio >/dev/null || missing+=(fio)
  command -v fusermount3 >/dev/null || missing+=(fuse3)
  command -v tar >/dev/null || missing+=(tar)
  [ -x "$PY" ] || missing+=(python3)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]} with apt-get"
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2 \
      || die "could not install ${missing[*]}; install them and re-run"
  fi
  command -v cargo >/dev/null || [ -x "$HOME/.cargo/bin/cargo" ] || die "cargo not found (needed for the build workload and its vendored sources)"
  command -v cargo >/dev/null || export PATH=$HOME/.cargo/bin:$PATH
}

# ---------------------------------------------------------------- timing helpers
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.3f", b-a}'; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }

# ---------------------------------------------------------------- layer generation
# Layer "small" (a): deterministic tree, ~100k files in ~5k dirs (seeded PRNG,
#   log-normal sizes, median 2 KiB, ~0.75 GB), plus bigdir/ with 50,000 entries.
# Layer "over" (c): on top of (a): overrides 1000 files, whiteouts 1000 files
#   and 20 whole dirs (char 0/0), 20 opaque dirs (trusted.overlay.opaque=y),
#   1000 new files; in bigdir/ 500 whiteouts + 500 new entries.
# Layer "big" (b): big/{seqread,copyup,randread}.bin, 1 GiB of random data each.
# Mount order (top first): lowerdir=over:small:big
gen_small_and_over() {
  "$PY" - "$LAYERS" <<'PYEOF'
import os, sys, random, json, hashlib, stat
root = sys.argv[1]
SEED = 20240611
rng = random.Random(SEED)
NDIRS, NFILES = 5000, 100000
small = os.path.join(root, "small")
over = os.path.join(root, "over")
BUF = random.Random(SEED + 1).randbytes(16 << 20)
SYL = ["ba","co","de","fu","gi","ho","ja","ki","lu","me","no","pa","qui","ro",
       "sa","te","vi","wo","xe","zu","lib","bin","doc","man","share","conf",
       "data","util","core","test","net","gtk","py","x86","64","locale","icons"]
EXT = [".txt",".h",".c",".py",".so",".gz",".png",".html",".json",".mo",
       ".conf","",".rs",".xml",".svg",".pyc",".js",".md"]
def word(r): return "".join(r.choice(SYL) for _ in range(r.randint(1, 4)))

# ---- directories: random tree, depth <= 7
dirs = ["tree"]; depth = {"tree": 0}; children = {"tree": set()}; subdirs = {"tree": []}
while len(dirs) < NDIRS:
    if rng.random() < 0.15:
        parent = dirs[rng.randrange(min(len(dirs), 40))]   # a few "hub" dirs
    else:
        parent = dirs[rng.randrange(len(dirs))]
    if depth[parent] >= 7:
        continue
    n = word(rng)
    if n in children[parent]:
        n = f"{n}-{len(dirs)}"
    children[parent].add(n)
    p = f"{parent}/{n}"
    dirs.append(p); depth[p] = depth[parent] + 1; children[p] = set(); subdirs[p] = []
    subdirs[parent].append(p)

# ---- files: Pareto-weighted across dirs
weights = [rng.paretovariate(1.2) for _ in dirs]
owner = rng.choices(range(len(dirs)), weights=weights, k=NFILES)
files = []   # (path, kind, size, mode, target)
for i, di in enumerate(owner):
    d = dirs[di]
    n = word(rng) + rng.choice(EXT)
    if n in children[d]:
        n = f"{n}.{i}"
    children[d].add(n)
    p = f"{d}/{n}"
    if rng.random() < 0.02:
        files.append((p, "l", 0, 0o777, rng.choice(sorted(children[d]))))
    else:
        size = min(int(rng.lognormvariate(7.62, 1.6)), 8 << 20)
        mode = 0o755 if rng.random() < 0.10 else 0o644
        files.append((p, "f", size, mode, None))

def data_for(path, size):
    h = int.from_bytes(hashlib.sha1(path.encode()).digest()[:6], "little")
    off = h % (len(BUF) - size) if size < len(BUF) else 0
    return BUF[off:off + size]

T0 = 1600000000
for d in dirs:
    os.makedirs(os.path.join(small, d), exist_ok=True)
total = 0
for i, (p, kind, size, mode, tgt) in enumerate(files):
    full = os.path.join(small, p)
    if kind == "l":
        os.symlink(tgt, full)
        os.utime(full, (T0 + i, T0 + i), follow_symlinks=False)
    else:
        with open(full, "wb") as f:
            f.write(data_for(p, size))
        os.chmod(full, mode)
        os.utime(full, (T0 + i, T0 + i))
        total += size
bigdir = os.path.join(small, "bigdir")
os.makedirs(bigdir)
for i in range(50000):
    open(os.path.join(bigdir, f"entry-{i:06d}"), "wb").close()
for d in reversed(dirs):
    os.utime(os.path.join(small, d), (T0, T0))

# ---- subtree sets for untar / smallread, cp-tree, rm-lower (disjoint)
nfiles_in = {d: 0 for d in dirs}
for p, kind, *_ in files:
    nfiles_in[p.rsplit("/", 1)[0]] += 1
subtree = {}
for d in reversed(dirs):          # children appear after parents
    subtree[d] = nfiles_in[d] + sum(subtree[c] for c in subdirs[d])
used = set()
def pick(target, rnd):
    chosen, remaining = [], target
    cands = sorted(dirs[1:])
    rnd.shuffle(cands)
    for d in cands:
        if remaining < 300: break
        if any(d == u or d.startswith(u + "/") or u.startswith(d + "/") for u in used): continue
        if 50 <= subtree[d] <= remaining:
            chosen.append(d); used.add(d); remaining -= subtree[d]
    return sorted(chosen), target - remaining
prng = random.Random(SEED + 2)
untar_set, untar_n = pick(30000, prng)
cp_set, cp_n = pick(10000, prng)
rm_set, rm_n = pick(10000, prng)

# ---- layer (c) "over"
orng = random.Random(SEED + 3)
def inside(p, ds): return any(p == d or p.startswith(d + "/") for d in ds)
leaves = sorted(d for d in dirs[1:] if not subdirs[d] and not inside(d, used))
sel = orng.sample(leaves, 40)
del_dirs, opq_dirs = sorted(sel[:20]), sorted(sel[20:])
reg = [f for f in files if f[1] == "f" and not inside(f[0], used) and not inside(f[0], sel)]
pickf = orng.sample(reg, 2000)
ovr_files = sorted(f[0] for f in pickf[:1000])
wh_files = sorted(f[0] for f in pickf[1000:])
cand_dirs = [d for d in dirs if not inside(d, used) and not inside(d, sel)]
new_files = []
for i in range(1000):
    d = orng.choice(cand_dirs)
    n = f"new-{i:04d}-{word(orng)}.txt"
    new_files.append(f"{d}/{n}")
os.makedirs(over)
def mkparent(p):
    os.makedirs(os.path.join(over, os.path.dirname(p)), exist_ok=True)
def whiteout(p):
    mkparent(p); os.mknod(os.path.join(over, p), stat.S_IFCHR | 0o600, os.makedev(0, 0))
def override_bytes(p): return b"override:" + p.encode() + b"\n"
for p in ovr_files:
    mkparent(p)
    with open(os.path.join(over, p), "wb") as f: f.write(override_bytes(p))
for p in wh_files: whiteout(p)
for d in del_dirs: whiteout(d)
opq_content = {}
for d in opq_dirs:
    os.makedirs(os.path.join(over, d))
    os.setxattr(os.path.join(over, d), "trusted.overlay.opaque", b"y")
    opq_content[d] = [f"opq-{k}.txt" for k in range(3)]
    for n in opq_content[d]:
        with open(os.path.join(over, d, n), "wb") as f: f.write(b"opaque " + d.encode() + b"\n")
for p in new_files:
    mkparent(p)
    with open(os.path.join(over, p), "wb") as f: f.write(b"new:" + p.encode() + b"\n")
bw = orng.sample(range(50000), 500)
os.makedirs(os.path.join(over, "bigdir"))
for i in bw: whiteout(f"bigdir/entry-{i:06d}")
for i in range(500):
    open(os.path.join(over, "bigdir", f"new-{i:06d}"), "wb").close()
# directories in "over" copy mode/times from "small" so the merged view keeps them
for dp, dn, fn in os.walk(over, topdown=False):
    rel = os.path.relpath(dp, over)
    src = os.path.join(small, rel)
    if os.path.isdir(src) and not rel in opq_dirs:
        st = os.stat(src); os.chmod(dp, stat.S_IMODE(st.st_mode)); os.utime(dp, (st.st_atime, st.st_mtime))

# ---- expected merged view
ents = set(dirs) | {f[0] for f in files}
ents = {e for e in ents if not inside(e, del_dirs)}
ents = {e for e in ents if not any(e.startswith(d + "/") for d in opq_dirs)}
ents |= {f"{d}/{n}" for d in opq_dirs for n in opq_content[d]}
ents -= set(wh_files)
ents |= set(new_files)
srng = random.Random(SEED + 4)
ovr_set, new_set = set(ovr_files), set(new_files)
kept = [f for f in files if f[1] == "f" and f[0] in ents and f[0] not in ovr_set and f[0] not in new_set]
unchanged = srng.sample(kept, 50)
manifest = {
    "small_files": NFILES, "small_dirs": NDIRS, "small_bytes": total,
    "merged_tree_entries": len(ents),          # == `find MNT/tree | wc -l`
    "merged_bigdir_entries": 50000,
    "untar_set": untar_set, "untar_files": untar_n,
    "cp_set": cp_set, "cp_files": cp_n,
    "rm_set": rm_set, "rm_files": rm_n,
    "deleted_dirs": del_dirs,
    "opaque_dirs": {d: opq_content[d] for d in opq_dirs},
    "whiteout_sample": srng.sample(wh_files, 50),
    "override_sample": {p: hashlib.sha256(override_bytes(p)).hexdigest() for p in srng.sample(ovr_files, 50)},
    "new_sample": srng.sample(new_files, 50),
    "unchanged_sample": {f[0]: hashlib.sha256(data_for(f[0], f[2])).hexdigest() for f in unchanged},
    "bigdir_whiteouts": [f"entry-{i:06d}" for i in sorted(bw)[:20]],
}
with open(os.path.join(root, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
print(f"small: {len(dirs)} dirs, {len(files)} files, {total/2**20:.0f} MiB; merged tree entries {len(ents)}; "
      f"untar set {untar_n} files, cp set {cp_n}, rm set {rm_n}", file=sys.stderr)
PYEOF
}

prepare_layers() {
  if [ "$(cat "$LAYERS/.complete" 2>/dev/null)" != "$LAYER_VERSION" ]; then
    log "building layers under $LAYERS (once; a few minutes)"
    rm -rf "$LAYERS"; mkdir -p "$LAYERS"
    gen_small_and_over
    mkdir -p "$LAYERS/big/big"
    for f in seqread copyup randread; do
      head -c 1G /dev/urandom > "$LAYERS/big/big/$f.bin"
    done
    sync
    echo "$LAYER_VERSION" > "$LAYERS/.complete"
  fi
  mkdir -p "$CACHE"
  # tarball for untar: the untar_set subtrees of layer (a), uncompressed
  if [ ! -s "$CACHE/untar.tar" ] || [ "$(cat "$CACHE/.untar" 2>/dev/null)" != "$LAYER_VERSION" ]; then
    log "building untar tarball"
    mapfile -t set < <("$PY" -c 'import json,sys; print("\n".join(json.load(open(sys.argv[1]))["untar_set"]))' "$LAYERS/manifest.json")
    tar -C "$LAYERS/small" --sort=name -cf "$CACHE/untar.tar.tmp" "${set[@]}"
    mv "$CACHE/untar.tar.tmp" "$CACHE/untar.tar"; echo "$LAYER_VERSION" > "$CACHE/.untar"
  fi
  # build workload: pjdfstest 0.2.2 (a small Rust CLI, ~20 s debug build on 2 cores)
  # with its dependencies vendored so that `cargo build --offline` works.
  if [ ! -f "$CACHE/build-src/.complete" ]; then
    log "preparing vendored crate source for the build workload (needs crates.io once)"
    rm -rf "$CACHE/build-src" "$CACHE/build-fetch"
    local src
    src=$(ls -d "$HOME"/.cargo/registry/src/*/pjdfstest-0.2.2 2>/dev/null | head -1 || true)
    if [ -z "$src" ]; then
      mkdir -p "$CACHE/build-fetch/src"
      printf '[package]\nname = "fetch"\nversion = "0.0.0"\nedition = "2021"\n[dependencies]\npjdfstest = "=0.2.2"\n' > "$CACHE/build-fetch/Cargo.toml"
      echo 'fn main() {}' > "$CACHE/build-fetch/src/main.rs"
      (cd "$CACHE/build-fetch" && cargo fetch -q) >&2 || die "cargo fetch of pjdfstest 0.2.2 failed"
      src=$(ls -d "$HOME"/.cargo/registry/src/*/pjdfstest-0.2.2 | head -1)
    fi
    cp -a "$src" "$CACHE/build-src"
    mkdir -p "$CACHE/build-src/.cargo"
    (cd "$CACHE/build-src" && cargo vendor -q --locked vendor > .cargo/config.toml) >&2 || die "cargo vendor failed"
    rm -rf "$CACHE/build-fetch"
    touch "$CACHE/build-src/.complete"
  fi
}

# ---------------------------------------------------------------- mounting
RUN="" MNT="" MOUNTED=0 FUSE_PID=""
LOWER="$LAYERS/over:$LAYERS/small:$LAYERS/big"

is_mounted() { awk -v m="$1" '$5 == m {f=1} END {exit !f}' /proc/self/mountinfo; }

mount_fresh() {
  rm -rf "$RUN/upper" "$RUN/work"
  mkdir -p "$RUN/upper" "$RUN/work" "$RUN/mnt"
  MNT=$RUN/mnt
  local opts="lowerdir=$LOWER,upperdir=$RUN/upper,workdir=$RUN/work"
  if [ "$MODE" = kernel ]; then
    mount -t overlay overlay -o "$opts" "$MNT" || die "kernel overlay mount failed"
  else
    [ -n "${BENCH_FUSE_OPTS:-}" ] && opts="$opts,$BENCH_FUSE_OPTS"
    "$PROG" -o "$opts" "$MNT" >>"$RUN/fuse.log" 2>&1 &
    FUSE_PID=$!
    local i rc exited=0
    for i in $(seq 1 200); do
      is_mounted "$MNT" && break
      if [ $exited = 0 ] && ! kill -0 "$FUSE_PID" 2>/dev/null; then
        # the launcher exited: fine if it daemonised after mounting
        exited=1; rc=0; wait "$FUSE_PID" || rc=$?
        [ $rc = 0 ] || { tail -5 "$RUN/fuse.log" >&2; die "$PROG exited with status $rc before mounting"; }
      fi
      sleep 0.05
    done
    is_mounted "$MNT" || { tail -5 "$RUN/fuse.log" >&2; die "$PROG did not mount $MNT within 10 s"; }
  fi
  MOUNTED=1
}

umount_fresh() {
  [ "$MOUNTED" = 1 ] || return 0
  if [ "$MODE" = kernel ]; then
    umount "$MNT" || { sleep 1; umount "$MNT"; }
  else
    fusermount3 -u "$MNT" || { sleep 1; fusermount3 -u "$MNT"; }
    # wait for the daemon serving this mount to exit (it may have forked away
    # from FUSE_PID); it is found by its own mountpoint argument.
    local i p a alive args
    for i in $(seq 1 100); do
      alive=0
      for p in /proc/[0-9]*; do
        [ "${p#/proc/}" = $$ ] && continue
        # a process may exit between the glob and the read
        { mapfile -d '' args < "$p/cmdline"; } 2>/dev/null || continue
        for a in "${args[@]}"; do [ "$a" = "$MNT" ] && { alive=1; break 2; }; done
      done
      [ $alive = 0 ] && break
      sleep 0.1
    done
    wait "$FUSE_PID" 2>/dev/null || true
  fi
  MOUNTED=0
  rm -rf "$RUN/upper" "$RUN/work"
}

cleanup() {
  local rc=$?
  if [ "$MOUNTED" = 1 ] && [ -n "$MNT" ]; then
    if [ "$MODE" = kernel ]; then umount "$MNT" 2>/dev/null || umount -l "$MNT" 2>/dev/null || true
    else fusermount3 -u "$MNT" 2>/dev/null || fusermount3 -uz "$MNT" 2>/dev/null || true; fi
  fi
  [ -n "$RUN" ] && ! is_mounted "$RUN/mnt" && rm -rf "$RUN"
  exit $rc
}

# ---------------------------------------------------------------- results
RESULTS=""
EMIT_TO=""   # set by best_of: collect repetitions instead of reporting
REP=0
emit() {  # name seconds extra [fio-json]
  if [ -n "$EMIT_TO" ]; then
    local fj=""
    [ -n "${4:-}" ] && { fj="$4.rep$REP"; cp "$4" "$fj"; }
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$fj" >> "$EMIT_TO"
    return 0
  fi
  printf '%s\t%s\t%s\n' "$1" "$2" "$3"
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4:-}" >> "$RESULTS"
}

fio_run() {  # name out.json fio-args...
  local name=$1 out=$2; shift 2
  fio --name="$name" --ioengine=psync --output-format=json --output="$out" "$@" >/dev/null
}
fio_summary() {  # out.json read|write
  "$PY" - "$1" "$2" <<'PYEOF'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]; d = j[sys.argv[2]]
print(f"{d['bw_bytes']/2**20:.1f} MiB/s, {d['iops']:.0f} IOPS, {d['io_bytes']/2**20:.0f} MiB in {j['job_runtime']/1000:.2f} s, clat p50 {d['clat_ns']['percentile'].get('50.000000', 0)/1000:.1f} us p99 {d['clat_ns']['percentile'].get('99.000000', 0)/1000:.1f} us")
PYEOF
}

fio_secs() { "$PY" -c 'import json,sys; print("%.3f" % (json.load(open(sys.argv[1]))["jobs"][0]["job_runtime"] / 1000))' "$1"; }

manifest() { "$PY" -c 'import json,sys; v=json.load(open(sys.argv[1]))[sys.argv[2]]; print("\n".join(v) if isinstance(v, list) else v)' "$LAYERS/manifest.json" "$1"; }

# ---------------------------------------------------------------- workloads
w_check() {
  # merged-view semantics against the generator's manifest: kernel-format
  # whiteouts (char 0/0) for files and dirs, opaque dirs (trusted.overlay.opaque),
  # overridden and new files, bigdir merge.
  local t0 t1 out
  t0=$(now)
  out=$("$PY" - "$MNT" "$LAYERS/manifest.json" <<'PYEOF'
import os, sys, json, hashlib
mnt, man = sys.argv[1], json.load(open(sys.argv[2]))
errs = []
def sha(p):
    with open(p, "rb") as f: return hashlib.sha256(f.read()).hexdigest()
n = 0
for dp, dn, fn in os.walk(os.path.join(mnt, "tree")):
    n += len(dn) + len(fn)
n += 1
if n != man["merged_tree_entries"]: errs.append(f"tree has {n} entries, expected {man['merged_tree_entries']}")
for p in man["whiteout_sample"]:
    if os.path.lexists(os.path.join(mnt, p)): errs.append(f"whiteout ignored: {p}")
for d in man["deleted_dirs"]:
    if os.path.lexists(os.path.join(mnt, d)): errs.append(f"dir whiteout ignored: {d}")
for d, names in man["opaque_dirs"].items():
    got = sorted(os.listdir(os.path.join(mnt, d)))
    if got != sorted(names): errs.append(f"opaque dir {d}: {got[:5]}")
for p, h in man["override_sample"].items():
    if sha(os.path.join(mnt, p)) != h: errs.append(f"override not seen: {p}")
for p, h in man["unchanged_sample"].items():
    if sha(os.path.join(mnt, p)) != h: errs.append(f"content differs: {p}")
for p in man["new_sample"]:
    if not os.path.isfile(os.path.join(mnt, p)): errs.append(f"new file missing: {p}")
names = os.listdir(os.path.join(mnt, "bigdir"))
if len(names) != man["merged_bigdir_entries"]: errs.append(f"bigdir has {len(names)} entries, expected {man['merged_bigdir_entries']}")
s = set(names)
for e in man["bigdir_whiteouts"]:
    if e in s: errs.append(f"bigdir whiteout ignored: {e}")
for e in os.listdir(mnt):
    st = os.lstat(os.path.join(mnt, e))
print("ok" if not errs else f"FAIL {len(errs)}: " + "; ".join(errs[:4]))
PYEOF
)
  t1=$(now)
  emit check "$(secs "$t0" "$t1")" "$out"
}

w_statwalk() {
  # find -printf '' alone does not lstat non-directories (find uses d_type);
  # %s forces an lstat of every entry, which is what "stat walk" means here.
  local tag=$1 t0 t1 n
  t0=$(now)
  n=$(find "$MNT/tree" -printf '%s\n' | wc -l)
  t1=$(now)
  emit "statwalk-$tag" "$(secs "$t0" "$t1")" "$n entries"
}

w_readdir() {
  local tag=$1 t0 t1 n
  t0=$(now)
  n=$(ls -f "$MNT/bigdir" | wc -l)
  t1=$(now)
  emit "readdir-$tag" "$(secs "$t0" "$t1")" "$((n - 2)) entries (ls -f, no stat)"
}

w_smallread() {
  local t0 t1 bytes set
  mapfile -t set < <(manifest untar_set)
  t0=$(now)
  bytes=$(tar -C "$MNT" -cf - "${set[@]}" | wc -c)
  t1=$(now)
  emit smallread-cold "$(secs "$t0" "$t1")" "tar of $(manifest untar_files) files, $((bytes / 1048576)) MiB stream"
}

w_seqread() {
  local t0 t1
  t0=$(now)
  fio_run seqread "$RUN/seqread.json" --filename="$MNT/big/seqread.bin" --readonly --rw=read --bs=1M --size=1G
  t1=$(now)
  emit seqread-cold "$(fio_secs "$RUN/seqread.json")" "$(fio_summary "$RUN/seqread.json" read); fio wall $(secs "$t0" "$t1")s" "$RUN/seqread.json"
}

w_randread() {
  local t0 t1 rt=20
  [ "${BENCH_SHORT:-0}" = 1 ] && rt=3
  t0=$(now)
  fio_run randread "$RUN/randread.json" --filename="$MNT/big/randread.bin" --readonly --rw=randread --bs=4k --size=1G --runtime=$rt --time_based
  t1=$(now)
  emit randread-cold "$(fio_secs "$RUN/randread.json")" "$(fio_summary "$RUN/randread.json" read); time-based ${rt}s, compare IOPS" "$RUN/randread.json"
}

w_copyup() {
  local t0 t1 t2 res
  t0=$(now)
  res=$("$PY" - "$MNT/big/copyup.bin" <<'PYEOF'
import os, sys, time
t0 = time.perf_counter(); fd = os.open(sys.argv[1], os.O_WRONLY)
t1 = time.perf_counter(); os.write(fd, b"x")
t2 = time.perf_counter(); os.close(fd)
t3 = time.perf_counter()
print(f"{t3-t0:.3f} open={t1-t0:.3f}s write={t2-t1:.4f}s close={t3-t2:.4f}s")
PYEOF
)
  t1=$(now); sync; t2=$(now)
  local size; size=$(stat -c %s "$MNT/big/copyup.bin")
  [ "$size" = 1073741824 ] || res="$res SIZE-WRONG:$size"
  [ -f "$RUN/upper/big/copyup.bin" ] && res="$res, upper copy $(stat -c %s "$RUN/upper/big/copyup.bin") B" || res="$res, NO upper copy"
  # kernel overlayfs fsyncs the copied file inside copy-up; a FUSE program may
  # not: copyup-durable adds the global sync that follows, for a fair comparison.
  emit copyup "${res%% *}" "${res#* } sync-after=$(secs "$t1" "$t2")s (wall incl. python $(secs "$t0" "$t1")s)"
  emit copyup-durable "$(awk -v a="${res%% *}" -v b="$(secs "$t1" "$t2")" 'BEGIN{printf "%.3f", a+b}')" "open+write+close, then sync"
}

# Buffered writes (no fsync in fio) measure the file system's write path; the
# sync that follows measures the flush (seqwrite-durable).
w_seqwrite() {
  local t0 t1 t2 fs
  mkdir -p "$MNT/w"; sync
  t0=$(now)
  fio_run seqwrite "$RUN/seqwrite.json" --filename="$MNT/w/seqwrite.bin" --rw=write --bs=1M --size=1G --fallocate=none
  t1=$(now); sync; t2=$(now)
  fs=$(fio_secs "$RUN/seqwrite.json")
  emit seqwrite "$fs" "$(fio_summary "$RUN/seqwrite.json" write); buffered, no fsync; fio wall $(secs "$t0" "$t1")s" "$RUN/seqwrite.json"
  emit seqwrite-durable "$(awk -v a="$fs" -v b="$(secs "$t1" "$t2")" 'BEGIN{printf "%.3f", a+b}')" "fio job + sync (sync=$(secs "$t1" "$t2")s)"
}

w_randwrite() {
  local t0 t1 rt=30
  [ "${BENCH_SHORT:-0}" = 1 ] && rt=5
  # target: a new 1 GiB upper file, written and flushed untimed
  mkdir -p "$MNT/w"
  fio_run prep "$RUN/prep.json" --filename="$MNT/w/randwrite.bin" --rw=write --bs=1M --size=1G --fallocate=none
  drop_caches
  t0=$(now)
  fio_run randwrite "$RUN/randwrite.json" --filename="$MNT/w/randwrite.bin" --rw=randwrite --bs=4k --size=1G --runtime=$rt --fallocate=none
  t1=$(now); sync; t2=$(now)
  emit randwrite "$(fio_secs "$RUN/randwrite.json")" "$(fio_summary "$RUN/randwrite.json" write); 1 GiB or ${rt}s, buffered; sync after=$(secs "$t1" "$t2")s" "$RUN/randwrite.json"
}

w_untar() {
  local t0 t1 t2 n
  mkdir -p "$MNT/untar"; sync
  t0=$(now)
  tar -C "$MNT/untar" -xf "$CACHE/untar.tar"
  t1=$(now); sync; t2=$(now)
  n=$(find "$MNT/untar" ! -type d | wc -l)
  emit untar "$(secs "$t0" "$t2")" "tar=$(secs "$t0" "$t1")s sync=$(secs "$t1" "$t2")s, $n files+symlinks (expected $(manifest untar_files))"
}

w_metadata() {
  local res
  res=$("$PY" - "$MNT/meta" 20000 <<'PYEOF'
import os, sys, time
d, n = sys.argv[1], int(sys.argv[2])
os.mkdir(d)
names = [f"{d}/f{i:06d}" for i in range(n)]
t0 = time.perf_counter()
for p in names: os.close(os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
t1 = time.perf_counter()
for p in names: os.stat(p)
t2 = time.perf_counter()
for p in names: os.unlink(p)
t3 = time.perf_counter()
print(f"{t3-t0:.3f} create={t1-t0:.3f}s stat={t2-t1:.3f}s unlink={t3-t2:.3f}s ({n} files, one dir)")
PYEOF
)
  emit metadata "${res%% *}" "${res#* }"
}

w_cp_rm() {
  local t0 t1 t2 set rmset d
  mapfile -t set < <(manifest cp_set)
  mapfile -t rmset < <(manifest rm_set)
  mkdir -p "$MNT/copy"; sync
  local src=() ; for d in "${set[@]}"; do src+=("$MNT/$d"); done
  # cp -a of lower subtrees into a new upper dir (names are made unique by index)
  t0=$(now)
  local i=0; for d in "${src[@]}"; do mkdir "$MNT/copy/$i"; cp -a "$d" "$MNT/copy/$i/"; i=$((i + 1)); done
  sync; t1=$(now)
  emit cp-tree "$(secs "$t0" "$t1")" "cp -a of $(manifest cp_files) lower files within the mount, incl. sync"
  sync; echo 3 > /proc/sys/vm/drop_caches
  t0=$(now); rm -rf "$MNT/copy"; sync; t1=$(now)
  emit rm-copied "$(secs "$t0" "$t1")" "rm -rf of the copied tree (upper only), incl. sync"
  local tgt=(); for d in "${rmset[@]}"; do tgt+=("$MNT/$d"); done
  t0=$(now); rm -rf "${tgt[@]}"; sync; t1=$(now)
  local left=0; for d in "${tgt[@]}"; do [ -e "$d" ] && left=$((left + 1)); done
  emit rm-lower "$(secs "$t0" "$t1")" "rm -rf of $(manifest rm_files) lower files (whiteouts), incl. sync; $left dirs left"
}

w_build() {
  local t0 t1 t2 rc=0
  sync
  t0=$(now)
  cp -a "$CACHE/build-src" "$MNT/build"
  t1=$(now)
  ( cd "$MNT/build" && env -u CARGO_TARGET_DIR -u RUSTC_WRAPPER -u CARGO_BUILD_TARGET_DIR \
      cargo build --offline -j2 -q ) > "$RUN/build.log" 2>&1 || rc=$?
  t2=$(now)
  if [ $rc != 0 ]; then tail -5 "$RUN/build.log" >&2; fi
  emit build "$(secs "$t1" "$t2")" "cargo build --offline -j2 (debug build of pjdfstest 0.2.2 and its 65 vendored dependencies); cp -a of source $(secs "$t0" "$t1")s; rc=$rc"
}

# ---------------------------------------------------------------- main
ensure_deps
prepare_layers
[ "$PREPARE_ONLY" = 1 ] && { log "layers ready under $LAYERS"; exit 0; }

RUN=$BL/run/$$
mkdir -p "$RUN"
trap cleanup EXIT
trap 'exit 130' INT TERM
RESULTS=$RUN/results.tsv; : > "$RESULTS"
STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
T_ALL=$(now)

group() {  # run "$@" on a fresh mount with cold caches
  mount_fresh; drop_caches
  "$@"
  umount_fresh
  return 0
}
# Data-heavy workloads are noisy here (page-cache fills run at 0.4-5 GB/s
# depending on whether the VM's free memory is still backed by the host), and
# noise only adds time: run the group REPS times, each on a fresh mount, and
# report the fastest run per workload, with all runs in extra.
REPS=${BENCH_REPS:-3}
[ "${BENCH_SHORT:-0}" = 1 ] && REPS=${BENCH_REPS:-1}
best_of() {  # fn...
  local r tmp=$RUN/best.tsv
  : > "$tmp"
  for r in $(seq 1 "$REPS"); do REP=$r EMIT_TO=$tmp group "$@"; done
  local name
  for name in $(cut -f1 "$tmp" | awk '!seen[$0]++'); do
    local line all
    all=$(awk -F'\t' -v n="$name" '$1 == n {printf "%s%s", sep, $2; sep=" "}' "$tmp")
    line=$(awk -F'\t' -v n="$name" '$1 == n' "$tmp" | sort -t$'\t' -k2,2g | head -1)
    IFS=$'\t' read -r _ s x fj <<< "$line"
    if [ "$REPS" -gt 1 ]; then x="best of $REPS ($all s); $x"; fi
    emit "$name" "$s" "$x" "$fj"
  done
}
want check && group w_check
if want statwalk-cold || want statwalk-warm; then
  group eval 'w_statwalk cold; w_statwalk warm'
fi
if want readdir-cold || want readdir-warm; then
  group eval 'w_readdir cold; w_readdir warm'
fi
want smallread-cold && best_of w_smallread
want seqread-cold && best_of w_seqread
want randread-cold && group w_randread
if want copyup || want copyup-durable; then best_of w_copyup; fi
if want seqwrite || want seqwrite-durable; then best_of w_seqwrite; fi
want randwrite && group w_randwrite
want untar && group w_untar
want metadata && group w_metadata
if want cp-tree || want rm-copied || want rm-lower; then group w_cp_rm; fi
want build && group w_build
T_END=$(now)

# ---------------------------------------------------------------- JSON
if [ -z "$JSON_OUT" ]; then
  mkdir -p "$BL/results"
  JSON_OUT=$BL/results/$(echo "$MODE" | tr -c 'A-Za-z0-9_-' '_' | sed 's/_*$//')-$(date +%Y%m%dT%H%M%S).json
fi
VERSION_TXT=""
case "$MODE" in
  kernel) VERSION_TXT="overlay params: $(for p in /sys/module/overlay/parameters/*; do printf '%s=%s ' "$(basename "$p")" "$(cat "$p")"; done)" ;;
  fuse:*) VERSION_TXT=$("$PROG" --version 2>&1 | grep -v 'unknown argument' | head -3 | tr '\n' ' ' || true) ;;
esac
B_MODE=$MODE B_LABEL=$LABEL B_VERSION=$VERSION_TXT B_STARTED=$STARTED B_TOTAL=$(secs "$T_ALL" "$T_END") \
B_BENCH_VERSION=$BENCH_VERSION B_LAYER_VERSION=$LAYER_VERSION \
"$PY" - "$RESULTS" "$JSON_OUT" <<'PYEOF'
import json, sys, platform, os
res = []
for line in open(sys.argv[1]):
    name, s, extra, fj = line.rstrip("\n").split("\t")
    r = {"workload": name, "seconds": float(s), "extra": extra}
    if fj:
        j = json.load(open(fj))["jobs"][0]
        d = j["write"] if j["write"]["io_bytes"] else j["read"]
        r["fio"] = {"bw_bytes": d["bw_bytes"], "iops": d["iops"], "io_bytes": d["io_bytes"],
                    "job_runtime_ms": j["job_runtime"],
                    "clat_p50_ns": d["clat_ns"]["percentile"].get("50.000000"),
                    "clat_p99_ns": d["clat_ns"]["percentile"].get("99.000000")}
    res.append(r)
E = os.environ
out = {"bench_version": int(E["B_BENCH_VERSION"]), "layer_version": int(E["B_LAYER_VERSION"]),
       "mode": E["B_MODE"], "label": E["B_LABEL"], "version": E["B_VERSION"].strip(),
       "started": E["B_STARTED"], "total_seconds": float(E["B_TOTAL"]),
       "kernel": platform.release(), "cpus": os.cpu_count(),
       "bench_fuse_opts": os.environ.get("BENCH_FUSE_OPTS", ""),
       "short": os.environ.get("BENCH_SHORT", "0") == "1",
       "results": res}
json.dump(out, open(sys.argv[2], "w"), indent=1)
PYEOF
log "total $(secs "$T_ALL" "$T_END") s; JSON: $JSON_OUT"
