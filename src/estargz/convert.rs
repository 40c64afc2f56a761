//! `verlay image convert --estargz`: an image of the store into a new eStargz image of the
//! store (new layer blobs, config with the new diffIDs, an OCI manifest whose layers carry
//! the TOC digest annotation), pushable with `verlay image push`.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};

use serde_json::{json, Value};

use super::toc::{TOC_DIGEST_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION};
use super::writer;
use crate::digest::sha256_digest;
use crate::error::{Error, Result};
use crate::oci;
use crate::store::{blobs, chain_id, ImportOptions, Store};

/// The media type of an eStargz layer (it is a gzip tar).
const MT_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// What a conversion made.
#[derive(Debug)]
pub struct Converted {
    /// the new image's manifest digest
    pub manifest: String,
    /// the new image's chain IDs, base first
    pub chain_ids: Vec<String>,
    /// (blob digest, TOC digest) of each new layer
    pub layers: Vec<(String, String)>,
}

fn decompressed(f: File, what: &str) -> Result<Box<dyn Read>> {
    let mut r = BufReader::with_capacity(1 << 20, f);
    let magic = r
        .fill_buf()
        .map_err(|e| Error::io("convert.read", what, e))?
        .to_vec();
    Ok(if magic.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::bufread::MultiGzDecoder::new(r))
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::stream::read::Decoder::with_buffer(r).map_err(|e| Error::io("convert.zstd", what, e))?)
    } else {
        Box::new(r)
    })
}

/// Convert the store's image `source` into an eStargz image recorded as `name`.
pub fn convert(store: &Store, source: &str, name: &str, chunk: u64) -> Result<Converted> {
    let rec = blobs::find_record(store, source)?;
    let mbytes = blobs::read_blob(store, &rec.manifest)?;
    let what = format!("image {source}");
    let m = oci::parse(&mbytes, &what)?;
    let cbytes = blobs::read_blob(store, &m.config.digest)?;
    let mut config: Value = serde_json::from_slice(&cbytes).map_err(|e| {
        Error::usage(
            &what,
            format!("its config is not JSON: {e}"),
            "import the image again",
        )
    })?;
    let mut layers = Vec::new();
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    let mut chains = Vec::new();
    let mut parent: Option<String> = None;
    for (i, l) in m.layers.iter().enumerate() {
        let src = blobs::blob_path(store, &l.digest);
        let f = File::open(&src).map_err(|e| Error::io("convert.open_blob", &src, e))?;
        let tmp = store.tmp_path("estargz");
        let out = File::create(&tmp).map_err(|e| Error::io("convert.create", &tmp, e))?;
        let written = writer::write(decompressed(f, &l.digest)?, std::io::BufWriter::new(out), chunk)
            .map_err(|why| {
                let _ = std::fs::remove_file(&tmp);
                Error::usage(
                    format!("layer {} ({}) of {source}", i + 1, l.digest),
                    why,
                    "this layer cannot be converted",
                )
            })?;
        let mut f = File::open(&tmp).map_err(|e| Error::io("convert.open", &tmp, e))?;
        let digest = blobs::put_stream(store, None, Some(written.size), &mut f);
        let _ = std::fs::remove_file(&tmp);
        let digest = digest?;
        // The new layer into the store too, checked against its diffID on the way.
        let p = blobs::blob_path(store, &digest);
        let mut f = File::open(&p).map_err(|e| Error::io("convert.import", &p, e))?;
        let got = store.import_layer(
            &mut f,
            &ImportOptions {
                parent: parent.clone(),
                diff_id: Some(written.diff_id.clone()),
                blob_digest: Some(digest.clone()),
                source: format!("eStargz layer {} of {name}", i + 1),
                fsync_each: false,
            },
        )?;
        debug_assert_eq!(got.chain_id, chain_id(parent.as_deref(), &written.diff_id));
        descs.push(json!({
            "mediaType": MT_LAYER_GZIP,
            "digest": digest,
            "size": written.size,
            "annotations": {
                TOC_DIGEST_ANNOTATION: written.toc_digest,
                UNCOMPRESSED_SIZE_ANNOTATION: written.uncompressed.to_string(),
            }
        }));
        tracing::info!(layer = i + 1, blob = %digest, toc = %written.toc_digest, "converted a layer to eStargz");
        layers.push((digest, written.toc_digest));
        diff_ids.push(Value::String(written.diff_id));
        parent = Some(got.chain_id.clone());
        chains.push(got.chain_id);
    }
    config["rootfs"] = json!({"type": "layers", "diff_ids": diff_ids});
    let cbytes = serde_json::to_vec(&config)
        .map_err(|e| Error::io("convert.config", "config", std::io::Error::other(e)))?;
    let cdigest = sha256_digest(&cbytes);
    blobs::put_bytes(store, &cdigest, &cbytes)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": oci::MT_OCI_MANIFEST,
        "config": {"mediaType": oci::MT_OCI_CONFIG, "digest": cdigest, "size": cbytes.len()},
        "layers": descs,
    });
    let mbytes = serde_json::to_vec(&manifest)
        .map_err(|e| Error::io("convert.manifest", "manifest", std::io::Error::other(e)))?;
    let mdigest = sha256_digest(&mbytes);
    blobs::put_bytes(store, &mdigest, &mbytes)?;
    blobs::write_record(
        store,
        &blobs::ImageRecord {
            name: name.to_string(),
            manifest: mdigest.clone(),
            media_type: oci::MT_OCI_MANIFEST.into(),
            config: cdigest,
            chain_ids: chains.clone(),
        },
    )?;
    Ok(Converted {
        manifest: mdigest,
        chain_ids: chains,
        layers,
    })
}
