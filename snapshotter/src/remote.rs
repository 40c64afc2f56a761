//! containerd's remote snapshotter protocol, for eStargz layers.
//!
//! When containerd unpacks an image it calls Prepare for each layer with the label
//! `containerd.io/snapshot.ref` = the layer's chain ID (the name it will commit the snapshot
//! as) and, inherited from the layer descriptor, every annotation whose key starts with
//! `containerd.io/snapshot/`: the eStargz TOC digest
//! (`containerd.io/snapshot/stargz/toc.digest`), and what an image handler adds
//! (`ctr-remote image rpull`: `containerd.io/snapshot/remote/stargz.reference` and
//! `.../stargz.digest`; CRI: `containerd.io/snapshot/cri.image-ref`, `.../cri.layer-digest`,
//! `.../cri.manifest-digest`).
//!
//! If those labels name an eStargz layer, the snapshotter records it lazily in its store
//! (footer and TOC fetched, TOC checked against the digest, as `verlay image pull --lazy`),
//! commits a snapshot named after the target with the layer's skeleton as its directory,
//! and answers Prepare with AlreadyExists: containerd then finds the target with Stat (or a
//! Walk on the `containerd.io/snapshot.ref` label) and never downloads the layer
//! (stargz-snapshotter's `snapshot/snapshot.go` Prepare is the reference). Mounts over such
//! a snapshot are verlay mounts whose reads fetch and verify chunks on demand.
//!
//! Such a layer is recorded without a diffID (the labels carry the blob and TOC digests, not
//! the config's diffIDs). It still seals (docs/lazy.md): once a mount's background fetch has
//! the whole blob, the store's import checks it against the labelled blob digest (which
//! containerd read from the manifest it verified) and computes the diffID over the stream
//! in the same pass. The snapshot's mounts then name the sealed layer (`Snapshots`).
//!
//! Anything else (no target label, no reference, no TOC digest in the labels or in the
//! manifest, a registry that fails) takes the ordinary path: an active snapshot into which
//! containerd unpacks the layer it downloads.

use std::collections::HashMap;

use verlay::estargz::pull::RemoteLayer;
use verlay::estargz::toc::TOC_DIGEST_ANNOTATION;
use verlay::registry::reference::Reference;

/// The chain ID containerd will commit the prepared snapshot as.
pub const TARGET_REF_LABEL: &str = "containerd.io/snapshot.ref";
/// Set on a snapshot recorded lazily (stargz-snapshotter's marker of a remote snapshot).
pub const REMOTE_LABEL: &str = "containerd.io/snapshot/remote";
/// Its value.
pub const REMOTE_LABEL_VALUE: &str = "remote snapshot";
/// The image reference, from `ctr-remote image rpull` (stargz-snapshotter's handler).
const STARGZ_REFERENCE_LABEL: &str = "containerd.io/snapshot/remote/stargz.reference";
/// The layer blob's digest, from the same handler.
const STARGZ_DIGEST_LABEL: &str = "containerd.io/snapshot/remote/stargz.digest";
/// A TOC digest label some handlers set instead of passing the annotation on.
const STARGZ_TOC_LABEL: &str = "containerd.io/snapshot/remote/stargz.toc.digest";
/// The image reference, from containerd's CRI plugin.
const CRI_IMAGE_REF_LABEL: &str = "containerd.io/snapshot/cri.image-ref";
/// The layer blob's digest, from the CRI plugin.
const CRI_LAYER_DIGEST_LABEL: &str = "containerd.io/snapshot/cri.layer-digest";
/// The image manifest's digest, from the CRI plugin.
const CRI_MANIFEST_DIGEST_LABEL: &str = "containerd.io/snapshot/cri.manifest-digest";

/// What a Prepare's labels say about a layer that may be prepared remotely: the target
/// name, and where the layer comes from. None when the labels lack the target, the image
/// reference or the layer digest (an ordinary unpack, or `ctr snapshots prepare`).
pub fn from_labels(labels: &HashMap<String, String>) -> Option<(String, RemoteLayer)> {
    let target = labels.get(TARGET_REF_LABEL).filter(|t| !t.is_empty())?;
    let first = |keys: &[&str]| {
        keys.iter()
            .find_map(|k| labels.get(*k).filter(|v| !v.is_empty()))
            .cloned()
    };
    let reference = first(&[STARGZ_REFERENCE_LABEL, CRI_IMAGE_REF_LABEL])?;
    let blob_digest = first(&[STARGZ_DIGEST_LABEL, CRI_LAYER_DIGEST_LABEL])?;
    let reference = match Reference::parse(&reference) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(reference, error = %e, "the image reference of a remote snapshot does not parse; unpacking it the ordinary way");
            return None;
        }
    };
    Some((
        target.clone(),
        RemoteLayer {
            reference,
            blob_digest,
            toc_digest: first(&[TOC_DIGEST_ANNOTATION, STARGZ_TOC_LABEL]),
            manifest_digest: first(&[CRI_MANIFEST_DIGEST_LABEL]),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn ctr_remote_labels_name_the_layer() {
        let l = labels(&[
            (TARGET_REF_LABEL, "sha256:aa"),
            (STARGZ_REFERENCE_LABEL, "127.0.0.1:5000/x/y:1"),
            (STARGZ_DIGEST_LABEL, D),
            (TOC_DIGEST_ANNOTATION, D),
        ]);
        let (target, r) = from_labels(&l).expect("remote");
        assert_eq!(target, "sha256:aa");
        assert_eq!(r.reference.to_string(), "127.0.0.1:5000/x/y:1");
        assert_eq!(r.blob_digest, D);
        assert_eq!(r.toc_digest.as_deref(), Some(D));
        assert_eq!(r.manifest_digest, None);
    }

    #[test]
    fn cri_labels_name_the_layer_and_the_manifest() {
        let l = labels(&[
            (TARGET_REF_LABEL, "sha256:aa"),
            (CRI_IMAGE_REF_LABEL, "registry.example/app:1"),
            (CRI_LAYER_DIGEST_LABEL, D),
            (CRI_MANIFEST_DIGEST_LABEL, D),
        ]);
        let (_, r) = from_labels(&l).expect("remote");
        assert_eq!(r.toc_digest, None);
        assert_eq!(r.manifest_digest.as_deref(), Some(D));
    }

    #[test]
    fn without_target_reference_or_digest_it_is_an_ordinary_prepare() {
        let full = [
            (TARGET_REF_LABEL, "sha256:aa"),
            (STARGZ_REFERENCE_LABEL, "127.0.0.1:5000/x/y:1"),
            (STARGZ_DIGEST_LABEL, D),
        ];
        assert!(from_labels(&labels(&full)).is_some());
        for skip in 0..full.len() {
            let l: Vec<_> = full
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != skip)
                .map(|(_, kv)| *kv)
                .collect();
            assert!(from_labels(&labels(&l)).is_none(), "without {}", full[skip].0);
        }
    }
}
