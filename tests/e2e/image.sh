#!/usr/bin/env bash
# image.sh: the 3-layer test image, built offline by hand (tar, gzip -n, sha256sum, jq) from
# Debian's busybox-static. Used by tests/store.rs, tests/registry.rs, podman-run.sh and
# containerd.sh.
#
#   tests/e2e/image.sh OUT [NAME:TAG]        NAME:TAG default localhost/verlay-test:1
#
#   layer 1  /bin/busybox and one symlink per applet, /etc/passwd, /etc/group, /etc/motd,
#            /etc/remove-me, /opaque/{a,keep}, empty /proc /sys /dev /tmp (1777) /root (0700) /var
#   layer 2  /etc/motd replaced (a copy-up target), /etc/.wh.remove-me (whiteout),
#            /opaque/.wh..wh..opq (opaque dir: a and keep hidden), /opaque/b, /etc/layer2
#   layer 3  /data/blob (1 MiB of fixed pseudo-random bytes), /data/hardlink (a hard link to
#            it), /data/link -> blob (symlink)
#   layer 4  only with IMAGE_SMALL_FILES=N (bench/containers.sh): /many/dDDD/fNNNNNN, N files
#            of 0-16 KiB seeded random bytes, 100 per directory (an unpack workload)
#
# Writes under OUT (removed first):
#   oci/              OCI image layout, ref name TAG (skopeo: oci:OUT/oci:TAG)
#   image.oci.tar     the same layout as one tar (oci-archive, ctr image import)
#   image.docker.tar  docker-archive with RepoTags NAME:TAG (podman load, ctr image import)
#   image.env         IMAGE_REF, IMAGE_TAG, OCI_LAYOUT, OCI_ARCHIVE, DOCKER_ARCHIVE,
#                     MANIFEST_DIGEST, CONFIG_DIGEST, LAYER_DIGESTS, DIFF_IDS (shell syntax;
#                     the lists are space-separated, bottom layer first)
# Deterministic: the same busybox gives the same digests (fixed mtimes, sorted entries, numeric
# owner 0, gzip -n, the blob from a counter's sha256). Takes about 1 s.
# Needs busybox-static, jq, python3, GNU tar, gzip (tests/setup.sh installs them).
set -euo pipefail

die() { echo "image.sh: error: $*" >&2; exit 2; }

OUT=${1:?usage: image.sh OUT [NAME:TAG]}
REF=${2:-localhost/verlay-test:1}
NAME=${REF%:*}
TAG=${REF##*:}
if [ "$NAME" = "$REF" ] || [ -z "$TAG" ]; then die "NAME:TAG wanted, got '$REF'"; fi
BUSYBOX=/bin/busybox
# A fixed date for every entry, so that the digests depend on the content alone.
MTIME=@1700000000
BLOB_BYTES=$((1 << 20))
SMALL_FILES=${IMAGE_SMALL_FILES:-0}
case $SMALL_FILES in ''|*[!0-9]*) die "IMAGE_SMALL_FILES must be a number, got '$SMALL_FILES'" ;; esac
[ "$SMALL_FILES" -le 1000000 ] || die "IMAGE_SMALL_FILES is capped at 1000000"
LAYER_NUMS="1 2 3"
[ "$SMALL_FILES" = 0 ] || LAYER_NUMS="1 2 3 4"

[ -x "$BUSYBOX" ] || die "$BUSYBOX missing: apt-get install busybox-static"
# A dynamically linked busybox would not run in the image, which has no libc (ldd succeeds only
# on a dynamic executable).
if ldd "$BUSYBOX" >/dev/null 2>&1; then die "$BUSYBOX is dynamically linked: apt-get install busybox-static"; fi
for t in jq python3 sha256sum gzip; do command -v "$t" >/dev/null || die "$t missing: bash tests/setup.sh"; done

rm -rf "$OUT"
mkdir -p "$OUT/oci/blobs/sha256"
OUT=$(cd "$OUT" && pwd)
B=$OUT/oci/blobs/sha256
BUILD=$OUT/build
trap 'rm -rf "$BUILD"' EXIT

# ---------------------------------------------------------------- layer trees
L1=$BUILD/rootfs1 L2=$BUILD/rootfs2 L3=$BUILD/rootfs3
mkdir -p "$L1"/{bin,etc,proc,sys,dev,tmp,root,var,opaque} "$L2"/{etc,opaque} "$L3/data" "$BUILD/layers"
chmod 1777 "$L1/tmp"; chmod 700 "$L1/root"
cp "$BUSYBOX" "$L1/bin/busybox"; chmod 755 "$L1/bin/busybox"
for a in $("$BUSYBOX" --list); do
  [ "$a" = busybox ] || ln -sf busybox "$L1/bin/$a"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$L1/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$L1/etc/group"
echo "motd from layer1" > "$L1/etc/motd"
echo "this file is whited out by layer2" > "$L1/etc/remove-me"
echo "a from layer1 (hidden by opaque dir in layer2)" > "$L1/opaque/a"
echo "keep from layer1 (hidden by opaque dir in layer2)" > "$L1/opaque/keep"

echo "motd from layer2" > "$L2/etc/motd"
echo "new in layer2" > "$L2/etc/layer2"
: > "$L2/etc/.wh.remove-me"          # OCI whiteout: deletes /etc/remove-me
: > "$L2/opaque/.wh..wh..opq"        # OCI opaque marker: hides the lower /opaque/*
echo "b from layer2" > "$L2/opaque/b"

# sha256 of "0", "1", ... concatenated: incompressible, and the same on every machine
python3 - "$L3/data/blob" "$BLOB_BYTES" <<'EOF' || die "could not write the 1 MiB blob"
import hashlib, sys
n = int(sys.argv[2])
out = bytearray()
i = 0
while len(out) < n:
    out += hashlib.sha256(str(i).encode()).digest()
    i += 1
with open(sys.argv[1], "wb") as f:
    f.write(out[:n])
EOF
ln "$L3/data/blob" "$L3/data/hardlink"
ln -s blob "$L3/data/link"
if [ "$SMALL_FILES" != 0 ]; then
  python3 - "$BUILD/rootfs4/many" "$SMALL_FILES" <<'EOF' || die "could not write the small files"
import os, random, sys
root, n = sys.argv[1], int(sys.argv[2])
rng = random.Random(20000)  # seeded: the same bytes on every machine (Python >= 3.9)
for i in range(n):
    d = os.path.join(root, "d%03d" % (i // 100))
    if i % 100 == 0:
        os.makedirs(d)
    with open(os.path.join(d, "f%06d" % i), "wb") as f:
        f.write(rng.randbytes(rng.randrange(16385)))
EOF
fi

# ---------------------------------------------------------------- blobs
put_blob() {  # FILE: moves it into the layout under its sha256; prints the hex digest
  local h
  h=$(sha256sum "$1" | cut -d' ' -f1)
  mv "$1" "$B/$h"
  echo "$h"
}
LAYERS_JSON="[]" DIFFIDS_JSON="[]" LAYER_DIGESTS="" DIFF_IDS=""
for n in $LAYER_NUMS; do
  tar --sort=name --numeric-owner --owner=0 --group=0 --mtime="$MTIME" \
      --format=pax --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
      -C "$BUILD/rootfs$n" -cf "$BUILD/layers/$n.tar" .
  diffid=$(sha256sum "$BUILD/layers/$n.tar" | cut -d' ' -f1)
  gzip -n -c "$BUILD/layers/$n.tar" > "$BUILD/layer.gz"
  size=$(stat -c %s "$BUILD/layer.gz")
  dg=$(put_blob "$BUILD/layer.gz")
  LAYERS_JSON=$(jq -c --arg d "sha256:$dg" --argjson s "$size" \
    '. + [{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":$d,"size":$s}]' <<<"$LAYERS_JSON")
  DIFFIDS_JSON=$(jq -c --arg d "sha256:$diffid" '. + [$d]' <<<"$DIFFIDS_JSON")
  LAYER_DIGESTS="$LAYER_DIGESTS sha256:$dg" DIFF_IDS="$DIFF_IDS sha256:$diffid"
done

jq -n -c --argjson diffids "$DIFFIDS_JSON" '{
  "created": "2023-11-14T22:13:20Z",
  "architecture": "amd64", "os": "linux",
  "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/"},
  "rootfs": {"type": "layers", "diff_ids": $diffids},
  "history": ([{"created":"2023-11-14T22:13:20Z","created_by":"tests/e2e/image.sh layer1 busybox"},
              {"created":"2023-11-14T22:13:20Z","created_by":"tests/e2e/image.sh layer2 whiteouts"},
              {"created":"2023-11-14T22:13:20Z","created_by":"tests/e2e/image.sh layer3 data"}]
    + (if ($diffids | length) > 3 then
         [{"created":"2023-11-14T22:13:20Z","created_by":"tests/e2e/image.sh layer4 small files"}]
       else [] end))
}' > "$BUILD/config.json"
csize=$(stat -c %s "$BUILD/config.json")
cdg=$(put_blob "$BUILD/config.json")

jq -n -c --arg c "sha256:$cdg" --argjson cs "$csize" --argjson layers "$LAYERS_JSON" '{
  "schemaVersion": 2,
  "mediaType": "application/vnd.oci.image.manifest.v1+json",
  "config": {"mediaType":"application/vnd.oci.image.config.v1+json","digest":$c,"size":$cs},
  "layers": $layers
}' > "$BUILD/manifest.json"
msize=$(stat -c %s "$BUILD/manifest.json")
mdg=$(put_blob "$BUILD/manifest.json")

# ref.name is the tag (skopeo's oci:DIR:TAG); io.containerd.image.name is the name ctr
# image import gives the image
jq -n --arg m "sha256:$mdg" --argjson ms "$msize" --arg tag "$TAG" --arg full "$REF" '{
  "schemaVersion": 2,
  "mediaType": "application/vnd.oci.image.index.v1+json",
  "manifests": [{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":$m,"size":$ms,
                 "platform":{"architecture":"amd64","os":"linux"},
                 "annotations":{"org.opencontainers.image.ref.name":$tag,
                                "io.containerd.image.name":$full}}]
}' > "$OUT/oci/index.json"
echo '{"imageLayoutVersion":"1.0.0"}' > "$OUT/oci/oci-layout"

# oci-archive: the layout as one tar (what `podman save --format oci-archive` makes)
tar --sort=name --numeric-owner --owner=0 --group=0 --mtime="$MTIME" \
    -C "$OUT/oci" -cf "$OUT/image.oci.tar" oci-layout index.json blobs

# docker-archive (what `docker save` makes): manifest.json with RepoTags NAME:TAG, the config
# as <hex>.json, each layer uncompressed as <diffid>.tar. Made by hand: skopeo copy to
# docker-archive: would, as root, also write /var/lib/containers/cache.
DA=$BUILD/docker-archive
mkdir -p "$DA"
cp "$B/$cdg" "$DA/$cdg.json"
LAYER_FILES="[]" n=1
for d in $DIFF_IDS; do
  cp "$BUILD/layers/$n.tar" "$DA/${d#sha256:}.tar"
  LAYER_FILES=$(jq -c --arg f "${d#sha256:}.tar" '. + [$f]' <<<"$LAYER_FILES")
  n=$((n + 1))
done
jq -n -c --arg c "$cdg.json" --arg ref "$REF" --argjson l "$LAYER_FILES" \
  '[{"Config":$c,"RepoTags":[$ref],"Layers":$l}]' > "$DA/manifest.json"
top=${DIFF_IDS##* }
jq -n -c --arg name "$NAME" --arg tag "$TAG" --arg id "${top#sha256:}" '{($name):{($tag):$id}}' > "$DA/repositories"
(cd "$DA" && tar --sort=name --numeric-owner --owner=0 --group=0 --mtime="$MTIME" \
    -cf "$OUT/image.docker.tar" -- *)

cat > "$OUT/image.env" <<EOF
IMAGE_REF=$REF
IMAGE_TAG=$TAG
OCI_LAYOUT=$OUT/oci
OCI_ARCHIVE=$OUT/image.oci.tar
DOCKER_ARCHIVE=$OUT/image.docker.tar
MANIFEST_DIGEST=sha256:$mdg
CONFIG_DIGEST=sha256:$cdg
LAYER_DIGESTS="${LAYER_DIGESTS# }"
DIFF_IDS="${DIFF_IDS# }"
EOF
echo "image $REF built in $OUT"
cat "$OUT/image.env"
