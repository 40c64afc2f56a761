//! An image as the additional layer store serves it: the lazy pull behind a lookup of
//! `<base64 ref>/<digest>`, and per layer what `info`, `blob` and `diff` show.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::layer::LayerDir;
use crate::lower::verify::{VerifiedLayer, VerifyMode};
use crate::progress::{Mode, Progress};
use crate::registry::{Options, Reference};
use crate::store::{blobs, Store};

/// Longest image reference accepted (docker's reference grammar caps names at 255 bytes;
/// a digest and a tag add less than 200).
pub const MAX_REF: usize = 1024;

/// containers/storage's `archive.Gzip` (pkg/archive/archive.go: Uncompressed 0, Bzip2 1,
/// Gzip 2): the `compression` of every eStargz layer.
const COMPRESSION_GZIP: u64 = 2;

/// One layer of a served image.
#[derive(Debug)]
pub struct Layer {
    /// the manifest's blob digest
    pub digest: String,
    /// the JSON containers/storage decodes into its `Layer` (the `info` file)
    pub info: Arc<Vec<u8>>,
    /// the compressed blob's size (the `blob` file's size)
    pub blob_size: u64,
    /// where the whole blob is, once the store has it (sealed, or pulled whole)
    pub blob_path: PathBuf,
    /// the layer's own files: what `diff/` shows
    pub diff: Arc<Diff>,
}

/// A store layer directory and its verifier (for a lazy layer, the chunk fetcher).
#[derive(Debug)]
pub struct Diff {
    /// the layer directory (`STORE/layers/<chain>/diff`)
    pub dir: LayerDir,
    /// its manifest and, for a lazy layer, where missing chunks come from
    pub verified: VerifiedLayer,
}

/// An image reference resolved by a lazy pull: its layers by compressed digest.
#[derive(Debug)]
pub struct Image {
    /// the reference as podman gave it (decoded)
    pub reference: String,
    /// layers by the manifest's blob digest
    pub layers: HashMap<String, Arc<Layer>>,
}

/// Decode the name podman looks up (`base64(ref)`, standard alphabet with padding; a `/`
/// of the alphabet makes it several path components, which the caller has joined again).
pub fn decode_ref(text: &str) -> Result<String> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(text.as_bytes())
        .map_err(|e| {
            Error::usage(
                format!("layer store name {text:?}"),
                format!("not base64: {e}"),
                "look up base64(image reference)",
            )
        })?;
    let s = String::from_utf8(raw).map_err(|_| {
        Error::usage(
            format!("layer store name {text:?}"),
            "not UTF-8 once decoded",
            "look up base64(image reference)",
        )
    })?;
    if s.len() > MAX_REF {
        return Err(Error::usage(
            format!("layer store name {text:?}"),
            "reference too long",
            "use a shorter reference",
        ));
    }
    Ok(s)
}

/// Could `name` be (a piece of) a base64 name? Anything else is absent at once, without a
/// pull (the kernel and tools probe names such as `.Trash` or `autorun.inf`).
pub fn is_base64_piece(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b))
}

/// Pull `reference` lazily into the store at `root` (`verlay image pull --lazy`), then open
/// each layer for serving. The store is locked only while this runs, so other verlay
/// commands (and a lazy layer's seal) can use it while the layer store serves.
pub fn resolve(root: &Path, reference: &str, opts: &Options) -> Result<Image> {
    let r = Reference::parse(reference)?;
    let store = Store::open(root)?;
    let quiet = Progress::new(Mode::Quiet);
    let pulled = crate::estargz::pull::pull_lazy(&store, &r, opts, &quiet)?;
    let manifest = blobs::read_blob(&store, &pulled.manifest)?;
    let what = format!("manifest {} of {reference}", pulled.manifest);
    let m = crate::oci::parse(&manifest, &what)?;
    let raw: Value = serde_json::from_slice(&manifest)
        .map_err(|e| Error::remote(&what, e.to_string(), "check the image"))?;
    let config = blobs::read_blob(&store, &m.config.digest)?;
    let diff_ids = crate::oci::diff_ids(&config, &what)?;
    if diff_ids.len() != m.layers.len() || pulled.chain_ids.len() != m.layers.len() {
        return Err(Error::remote(
            &what,
            "layers, diff_ids and chain IDs do not match",
            "push the image again",
        ));
    }
    let mut layers = HashMap::new();
    for (i, l) in m.layers.iter().enumerate() {
        let chain = &pulled.chain_ids[i];
        // a sealed lazy layer is served from the ordinary layer it became (as lowerdir= does)
        let served = store
            .record(chain)?
            .get("sealed")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .filter(|s| store.has_layer(s))
            .unwrap_or_else(|| chain.clone());
        let dir = store.diff_dir(&served);
        let verified = VerifiedLayer::open(
            &dir,
            VerifyMode::Require,
            crate::estargz::lazy::chunk_source(&dir)?,
        )?
        .ok_or_else(|| {
            Error::usage(
                format!("layer {served}"),
                "has no manifest",
                "pull the image again",
            )
        })?;
        let annotations = &raw["layers"][i]["annotations"];
        let diff_size = annotations[crate::estargz::toc::UNCOMPRESSED_SIZE_ANNOTATION]
            .as_str()
            .and_then(|s| s.parse::<u64>().ok());
        let mut info = json!({
            "compressed-diff-digest": l.digest,
            "compressed-size": l.size,
            "diff-digest": diff_ids[i],
            "compression": COMPRESSION_GZIP,
        });
        if let Some(n) = diff_size {
            info["diff-size"] = json!(n);
        }
        let info = serde_json::to_vec(&info).map_err(|e| Error::io("als.info", &dir, e.into()))?;
        let layer = Layer {
            digest: l.digest.clone(),
            info: Arc::new(info),
            blob_size: l.size,
            blob_path: blobs::blob_path(&store, &l.digest),
            diff: Arc::new(Diff {
                dir: LayerDir::open(&dir, i + 1, format!("layer{i}"))?,
                verified,
            }),
        };
        tracing::info!(layer = %served, digest = %l.digest, reference, "serving layer");
        layers.insert(l.digest.clone(), Arc::new(layer));
    }
    Ok(Image {
        reference: reference.to_string(),
        layers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_whose_base64_has_a_slash_decodes_from_its_joined_components() {
        // Only '?' or DEL at byte 3k+2 give a '/' in the base64 of ASCII text, so no valid
        // reference has one; the lookup joins the components anyway, and they decode.
        let r = "ab?cd";
        let b = base64::engine::general_purpose::STANDARD.encode(r);
        assert_eq!(b, "YWI/Y2Q=");
        assert!(b.split('/').all(is_base64_piece));
        assert_eq!(decode_ref(&b).expect("decode"), r);
        assert_eq!(
            decode_ref("MTI3LjAuMC4xOjUwMDAvbGF6eS90ZXN0OmVzZ3o=").expect("decode"),
            "127.0.0.1:5000/lazy/test:esgz"
        );
        assert!(!is_base64_piece(".Trash") && !is_base64_piece("") && !is_base64_piece("sha256:ab"));
        assert!(decode_ref("not*base64").is_err());
    }
}
