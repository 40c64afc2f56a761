//! Image manifests, indexes and configs as the distribution API and image layouts carry
//! them: OCI image manifest v1 and Docker v2 schema 2, OCI image index and Docker manifest
//! list. Pure parsing, no I/O. Shared by [`crate::registry`] (pull, push) and
//! [`crate::store::image`] (image import), so neither imports the other for it; the parse
//! errors are worded for a registry's documents, which is where whole manifests are parsed.

use serde_json::Value;

use crate::digest::parse_digest;
use crate::error::{Error, Result};

/// The longest JSON document (manifest, index, config, a registry's error body) read into
/// memory, from a registry or from an image on disk, so that what imports can be pushed and
/// pulled again.
pub const MAX_DOC: u64 = 8 << 20;

/// OCI image manifest.
pub const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Docker image manifest v2 schema 2.
pub const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// OCI image index.
pub const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker manifest list.
pub const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// OCI image config.
pub const MT_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

/// What a pull asks for, best first.
pub const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json";

/// A content descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    /// media type
    pub media_type: String,
    /// `sha256:HEX`
    pub digest: String,
    /// size in bytes
    pub size: u64,
}

/// An image manifest: the config and the layers, base first.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// the image config blob
    pub config: Descriptor,
    /// the layer blobs, base first
    pub layers: Vec<Descriptor>,
}

fn bad(what: &str, why: impl Into<String>) -> Error {
    Error::remote(
        what.to_string(),
        why.into(),
        "the registry serves something that is not an image this verlay understands",
    )
}

fn descriptor(v: &Value, what: &str) -> Result<Descriptor> {
    let s = |k: &str| v.get(k).and_then(Value::as_str);
    let digest = s("digest").ok_or_else(|| bad(what, "a descriptor has no digest"))?;
    Ok(Descriptor {
        media_type: s("mediaType").unwrap_or_default().to_string(),
        digest: parse_digest(digest, "descriptor digest")?,
        size: descriptor_size(v).map_err(|why| bad(what, why))?,
    })
}

/// Largest blob a descriptor may announce: 1 TiB, far above any real layer (registries cap
/// layers at tens of GiB). A larger size is forged or corrupt, and is refused when parsed
/// rather than carried along to a later push.
pub const MAX_BLOB_SIZE: u64 = 1 << 40;

/// The `size` of a descriptor: present, an integer, from 0 to [`MAX_BLOB_SIZE`]. The error
/// is the reason, for the caller to wrap.
pub fn descriptor_size(v: &Value) -> std::result::Result<u64, String> {
    let Some(size) = v.get("size") else {
        return Err("a descriptor has no size".into());
    };
    match size.as_u64() {
        Some(n) if n <= MAX_BLOB_SIZE => Ok(n),
        _ => Err(format!(
            "a descriptor's size {size} is not a byte count from 0 to {MAX_BLOB_SIZE} (1 TiB)"
        )),
    }
}

/// The media type of a manifest document: the `Content-Type` the registry sent, else the
/// document's own `mediaType`, else an OCI manifest (the field is optional there).
pub fn media_type(bytes: &[u8], content_type: Option<&str>) -> String {
    let from_header = content_type
        .map(|c| c.split(';').next().unwrap_or("").trim())
        .filter(|c| [MT_OCI_MANIFEST, MT_DOCKER_MANIFEST, MT_OCI_INDEX, MT_DOCKER_LIST].contains(c));
    if let Some(c) = from_header {
        return c.to_string();
    }
    let doc: Option<Value> = serde_json::from_slice(bytes).ok();
    match doc
        .as_ref()
        .and_then(|d| d.get("mediaType"))
        .and_then(Value::as_str)
    {
        Some(m) => m.to_string(),
        None if doc.as_ref().is_some_and(|d| d.get("manifests").is_some()) => MT_OCI_INDEX.to_string(),
        None => MT_OCI_MANIFEST.to_string(),
    }
}

/// Is this media type an index / manifest list?
pub fn is_index(media_type: &str) -> bool {
    media_type == MT_OCI_INDEX || media_type == MT_DOCKER_LIST
}

/// Parse an image manifest (`what` names it in errors).
pub fn parse(bytes: &[u8], what: &str) -> Result<Manifest> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| bad(what, format!("not valid JSON: {e}")))?;
    if v.get("schemaVersion").and_then(Value::as_u64) != Some(2) {
        return Err(bad(
            what,
            "not a schema version 2 manifest (schema 1 is not supported)",
        ));
    }
    let config = descriptor(v.get("config").ok_or_else(|| bad(what, "no config"))?, what)?;
    let layers = v
        .get("layers")
        .and_then(Value::as_array)
        .ok_or_else(|| bad(what, "no layers"))?
        .iter()
        .map(|l| descriptor(l, what))
        .collect::<Result<Vec<_>>>()?;
    Ok(Manifest { config, layers })
}

/// The OCI name of this machine's architecture.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        a => a,
    }
}

/// Pick the linux image for this machine's architecture out of an index.
pub fn pick_platform(bytes: &[u8], what: &str) -> Result<Descriptor> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| bad(what, format!("not valid JSON: {e}")))?;
    let all = v
        .get("manifests")
        .and_then(Value::as_array)
        .ok_or_else(|| bad(what, "an index without manifests"))?;
    let arch = host_arch();
    let found = all.iter().find(|m| {
        let p = m.get("platform");
        let f = |k: &str| p.and_then(|p| p.get(k)).and_then(Value::as_str);
        f("os") == Some("linux") && f("architecture") == Some(arch)
    });
    match found {
        Some(m) => descriptor(m, what),
        None => Err(Error::remote(
            what.to_string(),
            format!("the index has no linux/{arch} image"),
            "pull a reference that has one, or pin a manifest digest with NAME@sha256:...",
        )),
    }
}

/// The diff IDs of an image config, base layer first.
pub fn diff_ids(config: &[u8], what: &str) -> Result<Vec<String>> {
    let v: Value = serde_json::from_slice(config).map_err(|e| bad(what, format!("not valid JSON: {e}")))?;
    v.get("rootfs")
        .and_then(|r| r.get("diff_ids"))
        .and_then(Value::as_array)
        .ok_or_else(|| bad(what, "no rootfs.diff_ids"))?
        .iter()
        .map(|d| {
            d.as_str()
                .ok_or_else(|| bad(what, "a diff_id is not a string"))
                .and_then(|d| parse_digest(d, "diff_id"))
        })
        .collect()
}

/// The OCI layer media type for a blob that starts with `magic`.
pub fn layer_media_type(magic: &[u8]) -> &'static str {
    if magic.starts_with(&[0x1f, 0x8b]) {
        "application/vnd.oci.image.layer.v1.tar+gzip"
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        "application/vnd.oci.image.layer.v1.tar+zstd"
    } else {
        "application/vnd.oci.image.layer.v1.tar"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_and_indexes_parse() {
        let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{MT_DOCKER_MANIFEST}","config":{{"mediaType":"x","digest":"{}","size":3}},
               "layers":[{{"mediaType":"l","digest":"{}","size":7}}]}}"#,
            d('a'),
            d('b')
        );
        let p = parse(m.as_bytes(), "m").unwrap();
        assert_eq!((p.config.size, p.layers.len(), p.layers[0].size), (3, 1, 7));
        assert_eq!(media_type(m.as_bytes(), Some("text/plain")), MT_DOCKER_MANIFEST);
        assert_eq!(media_type(br#"{"manifests":[]}"#, None), MT_OCI_INDEX);
        let idx = format!(
            r#"{{"manifests":[{{"digest":"{}","size":1,"platform":{{"os":"linux","architecture":"s390x"}}}},
               {{"digest":"{}","size":2,"platform":{{"os":"linux","architecture":"{}"}}}}]}}"#,
            d('c'),
            d('e'),
            host_arch()
        );
        assert_eq!(pick_platform(idx.as_bytes(), "i").unwrap().digest, d('e'));
        assert!(parse(br#"{"schemaVersion":1}"#, "m").is_err());
        assert_eq!(
            layer_media_type(&[0x1f, 0x8b, 8]),
            "application/vnd.oci.image.layer.v1.tar+gzip"
        );
    }
}
