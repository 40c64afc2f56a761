//! `verlay image import`: every layer of an OCI image layout (directory or tar) or a
//! docker-archive tar, in order, each on its parent.
//!
//! Owns: reading image metadata (index.json → manifest → config, or docker's
//! manifest.json), checking every blob against its digest and every layer's diffID against
//! the config's `rootfs.diff_ids`. The layers themselves go through
//! [`Store::import_layer`], so each one is published whole or not at all. Afterwards the
//! image's manifest, config and layer blobs are kept in the store with an image record
//! ([`super::blobs`]), so that `verlay image push` can send the very same image.
//!
//! Must not: trust a name from the image to point anywhere but inside the source.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use crate::progress::Progress;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::unpack::PATH_MAX;
use super::{chain_id, ImportOptions, Store};
use crate::digest::{parse_digest, sha256_digest};
use crate::error::{Error, Result};
use crate::oci::host_arch;

/// Largest JSON document (index, manifest, config, docker's manifest.json) read into
/// memory: the same cap as for a document from a registry, so that what imports can be
/// pushed and pulled again. Real ones are a few KiB (a config with a long history, a
/// multi-arch index: a few hundred KiB).
const MAX_JSON: u64 = crate::oci::MAX_DOC;
/// Symlink hops followed inside a docker-archive (legacy archives link duplicate layers).
const MAX_LINK_HOPS: usize = 8;
/// Index nesting followed in an OCI layout (an index may point to another index).
const MAX_INDEX_DEPTH: usize = 4;

const MT_INDEX_OCI: &str = "application/vnd.oci.image.index.v1+json";
const MT_INDEX_DOCKER: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Where the image's files come from.
enum Source {
    Dir(PathBuf),
    Tar {
        file: File,
        path: PathBuf,
        /// member name → (data offset, size)
        members: HashMap<String, (u64, u64)>,
        /// member name → symlink target (already joined to the member's dir)
        links: HashMap<String, String>,
    },
}

/// A member name inside the source, normalised; `None` if it would leave the source.
fn clean(name: &str) -> Option<String> {
    let mut out: Vec<&str> = Vec::new();
    if name.starts_with('/') {
        return None;
    }
    for c in name.split('/') {
        match c {
            "" | "." => {}
            ".." => return None,
            c => out.push(c),
        }
    }
    if out.is_empty() {
        None
    } else {
        Some(out.join("/"))
    }
}

impl Source {
    fn open(path: &Path) -> Result<Source> {
        let meta = std::fs::metadata(path).map_err(|e| {
            Error::usage(
                format!("image \"{}\"", path.display()),
                e.to_string(),
                "give an OCI image layout directory or a docker-archive / oci-archive tar",
            )
        })?;
        if meta.is_dir() {
            return Ok(Source::Dir(path.to_path_buf()));
        }
        let file = File::open(path).map_err(|e| Error::io("image.open", path, e))?;
        let mut magic = [0u8; 2];
        let n = (&file)
            .read(&mut magic)
            .map_err(|e| Error::io("image.read", path, e))?;
        if n == 2 && magic == [0x1f, 0x8b] {
            return Err(Error::usage(
                format!("image \"{}\"", path.display()),
                "the archive is gzip-compressed",
                "decompress it first (gunzip), then import the .tar",
            ));
        }
        (&file)
            .seek(SeekFrom::Start(0))
            .map_err(|e| Error::io("image.read", path, e))?;
        let mut members = HashMap::new();
        let mut links = HashMap::new();
        let bad = |e: std::io::Error| {
            Error::usage(
                format!("image archive \"{}\"", path.display()),
                format!("not a valid tar: {e}"),
                "give an OCI image layout directory or a docker-archive / oci-archive tar",
            )
        };
        let stream = super::unpack::HeaderBudget::new(&file);
        let budget = stream.state();
        let mut archive = tar::Archive::new(stream);
        let mut entries = archive.entries_with_seek().map_err(bad)?;
        while let Some(entry) = budget.next_entry(&mut entries) {
            let entry = entry.map_err(|e| {
                if budget.exceeded() {
                    Error::usage(
                        format!("image archive \"{}\"", path.display()),
                        super::unpack::BudgetState::why(),
                        "refusing to import it, nothing was published; check where the archive came from",
                    )
                } else {
                    bad(e)
                }
            })?;
            if entry.path_bytes().len() > PATH_MAX
                || entry.link_name_bytes().is_some_and(|l| l.len() > PATH_MAX)
            {
                return Err(Error::usage(
                    format!("image archive \"{}\"", path.display()),
                    format!("a member name or link target is longer than PATH_MAX ({PATH_MAX})"),
                    "refusing to import it, nothing was published; check where the archive came from",
                ));
            }
            let Ok(name) = std::str::from_utf8(&entry.path_bytes()).map(str::to_owned) else {
                continue;
            };
            let Some(name) = clean(&name) else { continue };
            let t = entry.header().entry_type();
            if t.is_file() {
                members.insert(name, (entry.raw_file_position(), entry.size()));
            } else if t.is_symlink() || t.is_hard_link() {
                let Some(target) = entry.link_name_bytes() else {
                    continue;
                };
                let Ok(target) = std::str::from_utf8(&target).map(str::to_owned) else {
                    continue;
                };
                // symlinks are relative to the member's directory, hard links to the root
                let joined = match (t.is_symlink(), name.rsplit_once('/')) {
                    (true, Some((dir, _))) => format!("{dir}/{target}"),
                    _ => target,
                };
                if let Some(j) = clean_dots(&joined) {
                    links.insert(name, j);
                }
            }
        }
        Ok(Source::Tar {
            file,
            path: path.to_path_buf(),
            members,
            links,
        })
    }

    fn describe(&self) -> String {
        match self {
            Source::Dir(p) => p.display().to_string(),
            Source::Tar { path, .. } => path.display().to_string(),
        }
    }

    /// Does the source hold `name`?
    fn has(&self, name: &str) -> bool {
        match self {
            // Present in any form: a symlink or a device is refused, with its reason, when
            // it is opened, rather than reported as missing.
            Source::Dir(d) => clean(name)
                .map(|n| d.join(n).symlink_metadata().is_ok())
                .unwrap_or(false),
            Source::Tar { .. } => self.locate(name).is_some(),
        }
    }

    fn locate(&self, name: &str) -> Option<(u64, u64)> {
        let Source::Tar { members, links, .. } = self else {
            return None;
        };
        let mut n = clean(name)?;
        for _ in 0..MAX_LINK_HOPS {
            if let Some(m) = members.get(&n) {
                return Some(*m);
            }
            n = links.get(&n)?.clone();
        }
        None
    }

    fn missing(&self, name: &str) -> Error {
        Error::usage(
            format!("image \"{}\"", self.describe()),
            format!("\"{name}\" is missing"),
            "the image is incomplete or not in OCI / docker-archive format; export it again",
        )
    }

    /// A reader over the member `name` and its size.
    fn reader(&self, name: &str) -> Result<(Box<dyn Read + Send + '_>, u64)> {
        match self {
            Source::Dir(d) => {
                let mut n = clean(name).ok_or_else(|| self.missing(name))?;
                for _ in 0..MAX_LINK_HOPS {
                    let p = d.join(&n);
                    if let Some((f, size)) = self.open_regular(&p, name)? {
                        return Ok((Box::new(f), size));
                    }
                    // A symlink that stays inside the source is followed here, by name, as
                    // in an archive (docker save links duplicate layers); the kernel never
                    // follows one, so /dev/zero or a FIFO outside is never opened.
                    let target = std::fs::read_link(&p).map_err(|e| Error::io("image.readlink", &p, e))?;
                    let t = target.to_string_lossy();
                    let joined = match n.rsplit_once('/') {
                        Some((dir, _)) => format!("{dir}/{t}"),
                        None => t.to_string(),
                    };
                    n = Some(joined)
                        .filter(|_| !t.starts_with('/'))
                        .and_then(|j| clean_dots(&j))
                        .filter(|j| !j.is_empty())
                        .ok_or_else(|| {
                            self.not_regular(name, format!("is a symlink out of the image (to {t})"))
                        })?;
                }
                Err(self.not_regular(name, format!("is a chain of more than {MAX_LINK_HOPS} symlinks")))
            }
            Source::Tar { file, path, .. } => {
                let (off, size) = self.locate(name).ok_or_else(|| self.missing(name))?;
                let mut f = file;
                f.seek(SeekFrom::Start(off))
                    .map_err(|e| Error::io("image.read", path, e))?;
                Ok((Box::new(f.take(size)), size))
            }
        }
    }

    /// Open a file of a layout directory: only a regular file is a blob or a document. A
    /// symlink is not followed (`/dev/zero` would be endless), and the open does not block
    /// (a FIFO would wait for a writer forever); fstat then tells what was opened.
    /// `None` when `p` is a symlink.
    fn open_regular(&self, p: &Path, name: &str) -> Result<Option<(File, u64)>> {
        use rustix::fs::{FileType, Mode, OFlags};
        let fd = match rustix::fs::open(
            p,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::LOOP) => return Ok(None),
            Err(rustix::io::Errno::NOENT) => return Err(self.missing(name)),
            Err(e) => return Err(Error::io("image.open", p, e.into())),
        };
        let st = rustix::fs::fstat(&fd).map_err(|e| Error::io("image.stat", p, e.into()))?;
        match FileType::from_raw_mode(st.st_mode) {
            FileType::RegularFile => Ok(Some((File::from(fd), st.st_size as u64))),
            t => Err(self.not_regular(name, format!("is not a regular file ({t:?})"))),
        }
    }

    fn not_regular(&self, name: &str, why: String) -> Error {
        Error::usage(
            format!("image \"{}\"", self.describe()),
            format!("\"{name}\" {why}"),
            "blobs and metadata must be regular files inside the image; copy it with cp -L or export it again",
        )
    }

    /// A small member, read whole, at most [`MAX_JSON`] bytes.
    fn read(&self, name: &str) -> Result<Vec<u8>> {
        let (r, size) = self.reader(name)?;
        let too_large = |size: u64| {
            Error::usage(
                format!("image \"{}\"", self.describe()),
                format!(
                    "\"{name}\" is {size} bytes, larger than the {MAX_JSON} bytes image metadata may have"
                ),
                "check where the image came from",
            )
        };
        if size > MAX_JSON {
            return Err(too_large(size));
        }
        let mut buf = Vec::with_capacity(size as usize);
        // The size was taken before reading; a file that grows since is still cut here.
        r.take(MAX_JSON + 1)
            .read_to_end(&mut buf)
            .map_err(|e| Error::io("image.read", PathBuf::from(name), e))?;
        if buf.len() as u64 > MAX_JSON {
            return Err(too_large(buf.len() as u64));
        }
        Ok(buf)
    }

    /// The `size` of a descriptor (`what` names it), which must be there and plausible.
    fn desc_size(&self, desc: &Value, what: &str) -> Result<u64> {
        crate::oci::descriptor_size(desc).map_err(|why| self.bad(format!("{what}: {why}")))
    }

    fn json(&self, name: &str) -> Result<Value> {
        let bytes = self.read(name)?;
        serde_json::from_slice(&bytes).map_err(|e| self.bad(format!("\"{name}\" is not valid JSON: {e}")))
    }

    fn bad(&self, why: String) -> Error {
        Error::usage(
            format!("image \"{}\"", self.describe()),
            why,
            "the image is damaged or in an unsupported format; export it again",
        )
    }

    /// A blob of an OCI layout, checked against its digest and size.
    fn blob(&self, digest: &str, size: u64) -> Result<Vec<u8>> {
        let digest = parse_digest(digest, "blob digest")?;
        let name = blob_name(&digest);
        let bytes = self.read(&name)?;
        check_blob(self, &name, &digest, Some(size), &bytes)?;
        Ok(bytes)
    }
}

/// Like [`clean`] but resolving `..` lexically (for symlink targets inside an archive).
fn clean_dots(name: &str) -> Option<String> {
    let mut out: Vec<&str> = Vec::new();
    for c in name.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop()?;
            }
            c => out.push(c),
        }
    }
    Some(out.join("/"))
}

fn blob_name(digest: &str) -> String {
    format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"))
}

fn check_blob(src: &Source, name: &str, digest: &str, size: Option<u64>, bytes: &[u8]) -> Result<()> {
    if let Some(s) = size {
        if s != bytes.len() as u64 {
            return Err(src.bad(format!(
                "blob {name}: size {} differs from the {s} bytes its descriptor says",
                bytes.len()
            )));
        }
    }
    let got = sha256_digest(bytes);
    if got != digest {
        return Err(src.bad(format!(
            "blob {name}: digest mismatch: expected {digest}, got {got}"
        )));
    }
    Ok(())
}

/// One layer to import: where its blob is and what digests it must have.
struct LayerRef {
    name: String,
    /// the size its descriptor gives (an OCI layout's; a docker-archive has none)
    size: Option<u64>,
    blob_digest: Option<String>,
    diff_id: String,
}

/// The digest a docker-archive member name carries: `blobs/sha256/HEX` (docker 25+) or
/// `HEX.tar` / `HEX.json` (skopeo, podman).
fn digest_in_name(name: &str) -> Option<String> {
    let base = name
        .strip_prefix("blobs/sha256/")
        .or_else(|| name.strip_suffix(".tar"))
        .or_else(|| name.strip_suffix(".json"))?;
    parse_digest(base, "member").ok()
}

fn str_field<'v>(v: &'v Value, key: &str) -> Option<&'v str> {
    v.get(key).and_then(Value::as_str)
}

/// The diff IDs of an image config.
/// The layer list of an image manifest (`what` names it in errors) with the diff IDs of its
/// config, which must pair up one to one.
fn layers_and_diff_ids<'a>(
    src: &Source,
    cfg_bytes: &[u8],
    layers: Option<&'a Value>,
    what: &str,
) -> Result<(&'a Vec<Value>, Vec<String>)> {
    let config: Value = serde_json::from_slice(cfg_bytes).map_err(|e| src.bad(format!("config: {e}")))?;
    let ids = diff_ids(src, &config)?;
    let layers = layers
        .and_then(Value::as_array)
        .ok_or_else(|| src.bad(format!("{what} has no layers")))?;
    if layers.len() != ids.len() {
        return Err(src.bad(format!(
            "{what} lists {} layers but the config {} diff_ids",
            layers.len(),
            ids.len()
        )));
    }
    Ok((layers, ids))
}

fn diff_ids(src: &Source, config: &Value) -> Result<Vec<String>> {
    let ids = config
        .get("rootfs")
        .and_then(|r| r.get("diff_ids"))
        .and_then(Value::as_array)
        .ok_or_else(|| src.bad("the image config has no rootfs.diff_ids".into()))?;
    ids.iter()
        .map(|d| {
            d.as_str()
                .ok_or_else(|| src.bad("a diff_id in the image config is not a string".into()))
                .and_then(|d| parse_digest(d, "diff_id"))
        })
        .collect()
}

/// Pick one manifest descriptor out of an OCI index.
fn pick<'v>(src: &Source, index: &'v Value, reference: Option<&str>) -> Result<&'v Value> {
    let all: Vec<&Value> = index
        .get("manifests")
        .and_then(Value::as_array)
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    let by_ref: Vec<&Value> = match reference {
        Some(r) => all
            .iter()
            .copied()
            .filter(|m| {
                let ann = m.get("annotations");
                let a = |k| ann.and_then(|a| str_field(a, k));
                a("org.opencontainers.image.ref.name") == Some(r) || a("io.containerd.image.name") == Some(r)
            })
            .collect(),
        None => all.clone(),
    };
    if by_ref.len() == 1 {
        return Ok(by_ref[0]);
    }
    let for_us: Vec<&Value> = by_ref
        .iter()
        .copied()
        .filter(|m| {
            m.get("platform")
                .map(|p| {
                    str_field(p, "os") == Some("linux") && str_field(p, "architecture") == Some(host_arch())
                })
                .unwrap_or(false)
        })
        .collect();
    match (by_ref.len(), for_us.len()) {
        (0, _) => Err(src.bad(match reference {
            Some(r) => format!("index.json has no image named \"{r}\""),
            None => "index.json lists no image".into(),
        })),
        (_, 1) => Ok(for_us[0]),
        _ => Err(Error::usage(
            format!("image \"{}\"", src.describe()),
            "index.json lists several images",
            "pick one with --ref NAME (its org.opencontainers.image.ref.name)",
        )),
    }
}

/// What the store keeps of an imported image besides its layers, so that `verlay image push`
/// can send it (see [`super::blobs`]): the manifest (the layout's own, or one made
/// for a docker-archive, which has none), its media type, and the config.
struct Kept {
    /// the layout's manifest bytes and media type; `None` for a docker-archive
    manifest: Option<(Vec<u8>, String)>,
    config: Vec<u8>,
    /// the name the image has in the source (OCI ref name, docker RepoTag)
    name: Option<String>,
}

/// The layers of an OCI layout (index.json at the top of the source).
fn oci_layers(src: &Source, reference: Option<&str>) -> Result<(Vec<LayerRef>, Kept)> {
    let mut index = src.json("index.json")?;
    let mut depth = 0;
    let mut name = None;
    let (manifest, manifest_bytes, manifest_mt) = loop {
        let desc = pick(src, &index, if depth == 0 { reference } else { None })?.clone();
        if depth == 0 {
            name = desc
                .get("annotations")
                .and_then(|a| str_field(a, "org.opencontainers.image.ref.name"))
                .map(str::to_owned);
        }
        let digest =
            str_field(&desc, "digest").ok_or_else(|| src.bad("a descriptor has no digest".into()))?;
        let size = src.desc_size(&desc, &format!("manifest {digest}"))?;
        let bytes = src.blob(digest, size)?;
        let doc: Value =
            serde_json::from_slice(&bytes).map_err(|e| src.bad(format!("manifest {digest}: {e}")))?;
        let mt = str_field(&desc, "mediaType").or_else(|| str_field(&doc, "mediaType"));
        if matches!(mt, Some(MT_INDEX_OCI) | Some(MT_INDEX_DOCKER)) {
            depth += 1;
            if depth > MAX_INDEX_DEPTH {
                return Err(src.bad("image indexes nest too deeply".into()));
            }
            index = doc;
            continue;
        }
        let mt = mt.unwrap_or(crate::oci::MT_OCI_MANIFEST).to_string();
        break (doc, bytes, mt);
    };
    let cfg = manifest
        .get("config")
        .ok_or_else(|| src.bad("the manifest has no config".into()))?;
    let cfg_digest = str_field(cfg, "digest").ok_or_else(|| src.bad("the config has no digest".into()))?;
    let cfg_bytes = src.blob(cfg_digest, src.desc_size(cfg, "the config")?)?;
    let (layers, ids) = layers_and_diff_ids(src, &cfg_bytes, manifest.get("layers"), "the manifest")?;
    let refs = layers
        .iter()
        .zip(ids)
        .map(|(l, diff_id)| {
            let d = str_field(l, "digest").ok_or_else(|| src.bad("a layer has no digest".into()))?;
            let d = parse_digest(d, "layer digest")?;
            Ok(LayerRef {
                name: blob_name(&d),
                size: Some(src.desc_size(l, &format!("layer {d}"))?),
                blob_digest: Some(d),
                diff_id,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let kept = Kept {
        manifest: Some((manifest_bytes, manifest_mt)),
        config: cfg_bytes,
        name,
    };
    Ok((refs, kept))
}

/// The layers of a docker-archive (manifest.json at the top of the source).
fn docker_layers(src: &Source, reference: Option<&str>) -> Result<(Vec<LayerRef>, Kept)> {
    let manifest = src.json("manifest.json")?;
    let images = manifest
        .as_array()
        .ok_or_else(|| src.bad("manifest.json is not a list".into()))?;
    let chosen: Vec<&Value> = images
        .iter()
        .filter(|m| match reference {
            Some(r) => m
                .get("RepoTags")
                .and_then(Value::as_array)
                .map(|t| t.iter().any(|t| t.as_str() == Some(r)))
                .unwrap_or(false),
            None => true,
        })
        .collect();
    let image = match chosen.len() {
        1 => chosen[0],
        0 => return Err(src.bad("manifest.json lists no (matching) image".into())),
        _ => {
            return Err(Error::usage(
                format!("image \"{}\"", src.describe()),
                "manifest.json lists several images",
                "pick one with --ref NAME:TAG (one of its RepoTags)",
            ))
        }
    };
    let cfg_name = str_field(image, "Config").ok_or_else(|| src.bad("manifest.json has no Config".into()))?;
    let cfg_bytes = src.read(cfg_name)?;
    if let Some(d) = digest_in_name(cfg_name) {
        check_blob(src, cfg_name, &d, None, &cfg_bytes)?;
    }
    let (layers, ids) = layers_and_diff_ids(src, &cfg_bytes, image.get("Layers"), "manifest.json")?;
    let refs = layers
        .iter()
        .zip(ids)
        .map(|(l, diff_id)| {
            let name = l
                .as_str()
                .ok_or_else(|| src.bad("a layer name in manifest.json is not a string".into()))?;
            Ok(LayerRef {
                name: name.to_string(),
                size: None,
                blob_digest: digest_in_name(name),
                diff_id,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let name = image
        .get("RepoTags")
        .and_then(Value::as_array)
        .and_then(|t| t.first())
        .and_then(Value::as_str)
        .map(str::to_owned);
    let kept = Kept {
        manifest: None,
        config: cfg_bytes,
        name,
    };
    Ok((refs, kept))
}

/// Keep the image's blobs in the store and record it under `name` (else its own name, else
/// its manifest digest). A docker-archive gets an OCI manifest made from its config and
/// layer blobs as they are in the archive.
fn keep(
    store: &Store,
    src: &Source,
    layers: &[LayerRef],
    kept: Kept,
    name: Option<&str>,
    chains: &[String],
) -> Result<()> {
    use super::blobs;
    use crate::oci as rm;
    let cfg_digest = sha256_digest(&kept.config);
    blobs::put_bytes(store, &cfg_digest, &kept.config)?;
    let mut descs = Vec::with_capacity(layers.len());
    for l in layers {
        let (r, size) = src.reader(&l.name)?;
        check_layer_size(src, l, size)?;
        let mut r = r.take(size);
        let mut magic = [0u8; 4];
        let n = read_prefix(&mut r, &mut magic)
            .map_err(|e| Error::io("image.keep", PathBuf::from(&l.name), e))?;
        let mut whole = std::io::Read::chain(&magic[..n], r);
        let digest = blobs::put_stream(store, l.blob_digest.as_deref(), Some(size), &mut whole)?;
        descs.push(serde_json::json!({
            "mediaType": rm::layer_media_type(&magic[..n]),
            "digest": digest,
            "size": size,
        }));
    }
    let (bytes, media_type) = match kept.manifest {
        Some(m) => m,
        None => {
            let m = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": rm::MT_OCI_MANIFEST,
                "config": {"mediaType": rm::MT_OCI_CONFIG, "digest": cfg_digest, "size": kept.config.len()},
                "layers": descs,
            });
            let bytes = serde_json::to_vec(&m)
                .map_err(|e| Error::io("image.keep", PathBuf::from("manifest"), std::io::Error::other(e)))?;
            (bytes, rm::MT_OCI_MANIFEST.to_string())
        }
    };
    let manifest = sha256_digest(&bytes);
    blobs::put_bytes(store, &manifest, &bytes)?;
    blobs::write_record(
        store,
        &blobs::ImageRecord {
            name: name
                .map(str::to_owned)
                .or(kept.name)
                .unwrap_or_else(|| manifest.clone()),
            manifest,
            media_type,
            config: cfg_digest,
            chain_ids: chains.to_vec(),
        },
    )
}

/// A layer blob must have the size its descriptor gives: the manifest that says so is kept
/// and pushed as it is.
fn check_layer_size(src: &Source, l: &LayerRef, size: u64) -> Result<()> {
    match l.size {
        Some(want) if want != size => Err(src.bad(format!(
            "layer {}: the blob has {size} bytes, its descriptor says {want}",
            l.name
        ))),
        _ => Ok(()),
    }
}

/// Read up to `buf.len()` bytes (fewer only at the end of the stream).
fn read_prefix(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Import every layer of the image at `source`; returns the chain IDs, base layer first. The
/// image's blobs are kept in the store and it is recorded under `name` (default: its own
/// name in the source), so that it can be pushed.
pub fn import_image(
    store: &Store,
    source: &Path,
    reference: Option<&str>,
    name: Option<&str>,
    progress: &Progress,
) -> Result<Vec<String>> {
    let src = Source::open(source)?;
    let (layers, kept) = if src.has("index.json") {
        oci_layers(&src, reference)?
    } else if src.has("manifest.json") {
        docker_layers(&src, reference)?
    } else {
        return Err(Error::usage(
            format!("image \"{}\"", source.display()),
            "neither index.json (OCI layout) nor manifest.json (docker-archive) found",
            "give an OCI image layout directory or a docker-archive / oci-archive tar",
        ));
    };
    let mut parent: Option<String> = None;
    let mut chains = Vec::with_capacity(layers.len());
    progress.layers(layers.len() as u64);
    for (i, l) in layers.iter().enumerate() {
        let chain = chain_id(parent.as_deref(), &l.diff_id);
        if !store.has_layer(&chain) {
            let (r, size) = src.reader(&l.name)?;
            check_layer_size(&src, l, size)?;
            // Bytes past the size are never read, so the count and the digest agree.
            let label = format!("layer {}/{}", i + 1, layers.len());
            let mut r = progress.reader(r.take(size), label, Some(size));
            let opts = ImportOptions {
                parent: parent.clone(),
                diff_id: Some(l.diff_id.clone()),
                blob_digest: l.blob_digest.clone(),
                source: format!("{} layer {} ({})", src.describe(), i + 1, l.name),
                fsync_each: false,
            };
            let got = store.import_layer(&mut r, &opts)?;
            debug_assert_eq!(got.chain_id, chain);
        }
        progress.layer_done();
        tracing::info!(layer = %chain, index = i + 1, "image layer in the store");
        parent = Some(chain.clone());
        chains.push(chain);
    }
    keep(store, &src, &layers, kept, name, &chains)?;
    Ok(chains)
}

/// The `lowerdir=` value that mounts the image: top layer first (a sealed lazy layer by its
/// ordinary layer).
pub fn lowerdir(store: &Store, chains: &[String]) -> Result<String> {
    let dirs: Vec<String> = chains
        .iter()
        .rev()
        .map(|c| {
            let sealed = store
                .record(c)
                .ok()
                .and_then(|r| r["sealed"].as_str().map(str::to_owned));
            sealed.filter(|s| store.has_layer(s)).unwrap_or_else(|| c.clone())
        })
        .map(|c| store.diff_dir(&c).display().to_string())
        .collect();
    if dirs.iter().any(|d| d.contains(':') || d.contains(',')) {
        return Err(Error::usage(
            format!("store \"{}\"", store.root().display()),
            "its path contains ':' or ',', which cannot be written in lowerdir=",
            "use a store path without ':' and ','",
        ));
    }
    Ok(dirs.join(":"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_names_stay_inside() {
        assert_eq!(clean("./a//b").as_deref(), Some("a/b"));
        assert_eq!(clean("/etc/shadow"), None);
        assert_eq!(clean("a/../../x"), None);
        assert_eq!(clean_dots("a/../b").as_deref(), Some("b"));
        assert_eq!(clean_dots("../b"), None);
    }

    #[test]
    fn digests_in_docker_names() {
        let h = "a".repeat(64);
        assert_eq!(digest_in_name(&format!("{h}.tar")), Some(format!("sha256:{h}")));
        assert_eq!(
            digest_in_name(&format!("blobs/sha256/{h}")),
            Some(format!("sha256:{h}"))
        );
        assert_eq!(digest_in_name("0123/layer.tar"), None);
    }
}
