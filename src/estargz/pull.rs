//! `verlay image pull --lazy`: the manifest, the config and each layer's TOC, nothing else.
//!
//! Trust chain: the manifest's bytes hash to the digest asked for (or announced); each
//! layer's TOC digest is the manifest's `containerd.io/snapshot/stargz/toc.digest`
//! annotation, and the TOC fetched (footer, then the TOC member, by HTTP Range) must hash
//! to it, or the pull is refused; each chunk's digest is in that TOC, and the mount checks
//! every chunk against it before serving it ([`super::lazy`]).
//!
//! A lazy layer is stored under `chain_id(parent, TOC digest)`, not under the diffID of
//! the config: the diffID says what the whole uncompressed stream hashes to, and nothing
//! checks that until the layer is whole, so an ordinary pull never reuses a lazy layer.

use std::io::Write;
use std::path::PathBuf;

use serde_json::Value;

use super::toc::{self, Toc, TocMember};
use crate::digest::sha256_digest;
use crate::error::{Error, Result};
use crate::oci;
use crate::progress::Progress;
use crate::registry::client::{Client, Options};
use crate::registry::pull::{fetch_blob, fetch_manifest, record_image, start, Pulled, Start};
use crate::registry::reference::Reference;
use crate::store::lazy::LazyImport;
use crate::store::{blobs, chain_id, ImportOptions, Store};

/// Pull `reference` lazily into `store`: records the image, stores each layer as a
/// skeleton (every entry with its metadata, regular files empty and sparse) with its TOC.
pub fn pull_lazy(
    store: &Store,
    reference: &Reference,
    opts: &Options,
    progress: &Progress,
) -> Result<Pulled> {
    let Start {
        client,
        mut out,
        bytes,
        media_type: mt,
        digest,
        what,
        manifest: m,
    } = start(store, reference, opts)?;
    let raw: Value =
        serde_json::from_slice(&bytes).map_err(|e| Error::remote(&what, e.to_string(), "check the image"))?;
    fetch_blob(store, &client, &m.config, &mut out, progress)?;
    let config = blobs::read_blob(store, &m.config.digest)?;
    let diff_ids = oci::diff_ids(&config, &format!("config {} of {reference}", m.config.digest))?;
    if diff_ids.len() != m.layers.len() {
        return Err(Error::remote(
            &what,
            "the config's diff_ids do not match the layers",
            "push the image again",
        ));
    }
    let mut parent: Option<String> = None;
    for (i, layer) in m.layers.iter().enumerate() {
        let lwhat = format!("layer {} ({}) of {reference}", i + 1, layer.digest);
        let Some(want) = raw["layers"][i]["annotations"][toc::TOC_DIGEST_ANNOTATION].as_str() else {
            // never trust a TOC the manifest does not name: this layer is pulled whole
            let chain = pull_whole(
                store,
                &client,
                layer,
                &diff_ids[i],
                parent.as_deref(),
                &lwhat,
                &mut out,
                progress,
            )?;
            eprintln!(
                "verlay: layer {} ({}) has no {} annotation: pulled it fully (verified), the others stay lazy",
                i + 1,
                layer.digest,
                toc::TOC_DIGEST_ANNOTATION
            );
            parent = Some(chain.clone());
            out.chain_ids.push(chain);
            continue;
        };
        let chain = chain_id(parent.as_deref(), want);
        let one = OneLayer {
            client: &client,
            reference: &reference.to_string(),
            opts,
            blob: &layer.digest,
            size: layer.size,
            toc_digest: want,
            named_by: "the manifest's annotation",
            diff_id: serde_json::Value::String(diff_ids[i].clone()),
            what: &lwhat,
        };
        let (fetched, imported) = one.record(store, &chain, parent.clone())?;
        out.bytes_fetched += fetched;
        out.blobs_fetched += 1;
        out.layers_imported += usize::from(imported);
        tracing::info!(layer = %chain, index = i + 1, digest = %layer.digest, toc = %want, "recorded a lazy layer");
        parent = Some(chain.clone());
        out.chain_ids.push(chain);
    }
    record_image(store, &mut out, &bytes, mt, digest, &m.config.digest)?;
    Ok(out)
}

/// Pull one layer whole, as an ordinary pull does (blob checked against its digest, the
/// tar stream against the config's diffID), on `parent`; returns its chain ID.
#[allow(clippy::too_many_arguments)] // the pull's state, passed through
fn pull_whole(
    store: &Store,
    client: &Client,
    layer: &oci::Descriptor,
    diff_id: &str,
    parent: Option<&str>,
    what: &str,
    out: &mut Pulled,
    progress: &Progress,
) -> Result<String> {
    let chain = chain_id(parent, diff_id);
    fetch_blob(store, client, layer, out, progress)?;
    if !store.has_layer(&chain) {
        let p = blobs::blob_path(store, &layer.digest);
        let mut f = std::fs::File::open(&p).map_err(|e| Error::io("pull.import", &p, e))?;
        let got = store.import_layer(
            &mut f,
            &ImportOptions {
                parent: parent.map(str::to_owned),
                diff_id: Some(diff_id.to_string()),
                blob_digest: Some(layer.digest.clone()),
                source: what.to_string(),
                fsync_each: false,
            },
        )?;
        out.layers_imported += usize::from(got.new);
    }
    tracing::info!(layer = %chain, digest = %layer.digest, "no TOC annotation: layer pulled whole");
    Ok(chain)
}

/// The footer, then the TOC member, by two Range requests; returns the TOC, its offset and
/// the blob's bytes from that offset to its end (the TOC member and the footer: all that
/// was fetched).
fn fetch_toc(client: &Client, digest: &str, size: u64, what: &str) -> Result<(TocMember, u64, Vec<u8>)> {
    if size < toc::FOOTER_SIZE + 20 {
        return Err(toc::bad_layer(
            what,
            format!("the blob is {size} bytes, too small for eStargz"),
        ));
    }
    let foot_at = size - toc::FOOTER_SIZE;
    let footer = client.get_blob_range(digest, foot_at, size)?;
    let toc_offset = toc::parse_footer(&footer).map_err(|why| toc::bad_layer(what, why))?;
    if toc_offset >= foot_at || foot_at - toc_offset > toc::MAX_TOC_COMPRESSED {
        return Err(toc::bad_layer(
            what,
            format!(
                "the footer puts the TOC at {toc_offset}, {} bytes before the footer (at most {} accepted)",
                foot_at.saturating_sub(toc_offset),
                toc::MAX_TOC_COMPRESSED
            ),
        ));
    }
    let mut tail = client.get_blob_range(digest, toc_offset, foot_at)?;
    let toc = toc::read_toc_member(&tail).map_err(|why| toc::bad_layer(what, why))?;
    tail.extend_from_slice(&footer);
    Ok((toc, toc_offset, tail))
}

/// The layer's skeleton as a tar stream for the store's unpacker: every TOC entry with its
/// metadata (xattrs as PAX records, whiteouts as the OCI `.wh.` names they are), regular
/// files without data (their sizes returned, for the store to set), and the TOC entry itself
/// whole, as a full pull unpacks it. Returns the tar and (path, size, mtime) of each regular
/// file.
type Skeleton = (Vec<u8>, Vec<(PathBuf, u64, u64)>);

fn skeleton(toc: &Toc, member: &TocMember) -> std::result::Result<Skeleton, String> {
    let io = |e: std::io::Error| e.to_string();
    let mut b = tar::Builder::new(Vec::new());
    let mut sizes = Vec::new();
    for e in &toc.entries {
        let ty = match e.kind.as_str() {
            "chunk" => continue,
            "reg" => tar::EntryType::Regular,
            "dir" => tar::EntryType::Directory,
            "symlink" => tar::EntryType::Symlink,
            "hardlink" => tar::EntryType::Link,
            "char" => tar::EntryType::Char,
            "block" => tar::EntryType::Block,
            "fifo" => tar::EntryType::Fifo,
            other => return Err(format!("entry {:?} has an unknown type {other:?}", e.name)),
        };
        let x = e.xattr_values()?;
        if !x.is_empty() {
            let recs: Vec<(String, Vec<u8>)> = x
                .into_iter()
                .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v))
                .collect();
            b.append_pax_extensions(recs.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                .map_err(io)?;
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(ty);
        h.set_mode((e.mode & 0o7777) as u32);
        h.set_uid(e.uid as u64);
        h.set_gid(e.gid as u64);
        let mtime = toc::parse_modtime(&e.modtime).unwrap_or(0).max(0) as u64;
        h.set_mtime(mtime);
        h.set_size(0);
        if matches!(ty, tar::EntryType::Char | tar::EntryType::Block) {
            h.set_device_major(e.dev_major as u32).map_err(io)?;
            h.set_device_minor(e.dev_minor as u32).map_err(io)?;
        }
        match ty {
            tar::EntryType::Symlink | tar::EntryType::Link => {
                b.append_link(&mut h, &e.name, &e.link_name).map_err(io)?
            }
            _ => b.append_data(&mut h, &e.name, std::io::empty()).map_err(io)?,
        }
        if ty == tar::EntryType::Regular && e.size > 0 {
            if let Some(p) = toc::clean_name(&e.name)? {
                sizes.push((p, e.size as u64, mtime));
            }
        }
    }
    let mut h = member.header.clone();
    b.append_data(&mut h, toc::TOC_NAME, member.json.as_slice())
        .map_err(io)?;
    let mut v = b.into_inner().map_err(io)?;
    v.flush().map_err(io)?;
    Ok((v, sizes))
}

/// One layer of an image as containerd's snapshot labels describe it, for
/// [`record_remote_layer`] (the snapshotter's remote path; `pull_lazy` does the same for a
/// whole image).
#[derive(Debug, Clone)]
pub struct RemoteLayer {
    /// the image's reference (`containerd.io/snapshot/remote/stargz.reference` or
    /// `containerd.io/snapshot/cri.image-ref`)
    pub reference: Reference,
    /// the layer blob's digest (`.../stargz.digest` or `.../cri.layer-digest`)
    pub blob_digest: String,
    /// the TOC digest: the layer descriptor's `containerd.io/snapshot/stargz/toc.digest`
    /// annotation, which containerd passes on as a label (it read it from the manifest it
    /// verified by digest)
    pub toc_digest: Option<String>,
    /// the image manifest's digest (`.../cri.manifest-digest`): without a TOC label, the
    /// annotation is read from this manifest, fetched and checked against the digest
    pub manifest_digest: Option<String>,
}

/// What [`record_remote_layer`] stored.
#[derive(Debug, Clone)]
pub struct RecordedLayer {
    /// the layer's chain ID in the store: `chain_id(Some(key), TOC digest)`
    pub chain_id: String,
    /// the TOC digest the layer was checked against
    pub toc_digest: String,
    /// bytes fetched from the registry (manifest, footer, TOC)
    pub bytes_fetched: u64,
    /// false when the store had the layer already (nothing fetched but what found the TOC)
    pub imported: bool,
}

/// Record one eStargz layer lazily in `store` (footer and TOC only, as `pull --lazy`),
/// under `chain_id(Some(key), TOC digest)` with no parent: `key` is the caller's name for
/// the layer and its ancestry (containerd's chain ID), the TOC digest what is checked.
/// Returns `Ok(None)` when the layer is not eStargz as far as the labels and the manifest
/// tell (no TOC digest anywhere): the caller takes the ordinary path.
pub fn record_remote_layer(
    store: &Store,
    l: &RemoteLayer,
    key: &str,
    opts: &Options,
) -> Result<Option<RecordedLayer>> {
    let client = Client::new(&l.reference, opts)?;
    let blob = crate::digest::parse_digest(&l.blob_digest, "layer digest")?;
    let lwhat = format!("layer {} of {}", l.blob_digest, l.reference);
    let mut fetched = 0u64;
    let mut size = None;
    let want = match (&l.toc_digest, &l.manifest_digest) {
        (Some(t), _) => t.clone(),
        (None, Some(m)) => {
            let (bytes, _mt, _d) = fetch_manifest(&client, m, Some(m))?;
            fetched += bytes.len() as u64;
            let raw: Value = serde_json::from_slice(&bytes)
                .map_err(|e| Error::remote(&lwhat, e.to_string(), "check the image"))?;
            let Some(desc) = raw["layers"]
                .as_array()
                .and_then(|ls| ls.iter().find(|d| d["digest"].as_str() == Some(blob.as_str())))
            else {
                return Ok(None);
            };
            size = desc["size"].as_u64();
            match desc["annotations"][toc::TOC_DIGEST_ANNOTATION].as_str() {
                Some(t) => t.to_string(),
                None => return Ok(None),
            }
        }
        (None, None) => return Ok(None),
    };
    let want = crate::digest::parse_digest(&want, toc::TOC_DIGEST_ANNOTATION)?;
    let chain = chain_id(Some(key), &want);
    let mut out = RecordedLayer {
        chain_id: chain.clone(),
        toc_digest: want.clone(),
        bytes_fetched: fetched,
        imported: false,
    };
    if store.has_layer(&chain) {
        return Ok(Some(out));
    }
    blobs::ensure_dirs(store)?;
    let size = match size {
        Some(s) => s,
        None => remote_blob_size(&client, &blob, &lwhat)?,
    };
    let one = OneLayer {
        client: &client,
        reference: &l.reference.to_string(),
        opts,
        blob: &blob,
        size,
        toc_digest: &want,
        named_by: "the label",
        diff_id: serde_json::Value::Null,
        what: &lwhat,
    };
    let (got, imported) = one.record(store, &out.chain_id, None)?;
    out.bytes_fetched += got;
    out.imported = imported;
    Ok(Some(out))
}

/// The blob's size, from a HEAD request (containerd's labels do not carry it).
fn remote_blob_size(client: &Client, digest: &str, what: &str) -> Result<u64> {
    use crate::registry::client::Fail;
    let url = client.url(&format!("blobs/{digest}"));
    client.with_retries(&format!("HEAD blob {digest}"), || {
        let reply = client.request(ureq::http::Method::HEAD, &url, &[], &[])?;
        match reply.status {
            200 => {}
            s if s >= 500 || s == 429 => return Err(Fail::Transient(format!("HTTP {s}"))),
            s => {
                return Err(Fail::Fatal(Error::remote(
                    what,
                    format!("HEAD of the blob answered HTTP {s}"),
                    "check the image in the registry",
                )))
            }
        }
        reply
            .header("Content-Length")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| {
                Fail::Fatal(Error::remote(
                    what,
                    "HEAD of the blob gave no Content-Length",
                    "check the registry",
                ))
            })
    })
}

/// One eStargz layer to record lazily: where its blob is and what names its TOC.
struct OneLayer<'a> {
    client: &'a Client,
    reference: &'a str,
    opts: &'a Options,
    blob: &'a str,
    size: u64,
    /// the TOC digest the trusted side names (manifest annotation, or containerd's label)
    toc_digest: &'a str,
    /// that trusted side, for the refusal
    named_by: &'a str,
    /// the layer's diffID from the image config (Null when the caller has no config)
    diff_id: Value,
    what: &'a str,
}

impl OneLayer<'_> {
    /// Fetch the footer and TOC, check the TOC against its digest (or refuse, storing
    /// nothing), and import the skeleton under `chain` unless the store has it; the bytes
    /// fetched, and whether it was imported.
    fn record(&self, store: &Store, chain: &str, parent: Option<String>) -> Result<(u64, bool)> {
        let (member, toc_offset, tail) = fetch_toc(self.client, self.blob, self.size, self.what)?;
        let fetched = tail.len() as u64;
        let got = sha256_digest(&member.json);
        if got != self.toc_digest {
            return Err(Error::remote(
                self.what,
                format!(
                    "TOC digest mismatch: {} says {}, the TOC in the blob hashes to {got}",
                    self.named_by, self.toc_digest
                ),
                "refusing the layer, nothing was stored: the registry (or something between) serves a TOC the image does not name",
            ));
        }
        if store.has_layer(chain) {
            return Ok((fetched, false));
        }
        let what = |why| toc::bad_layer(self.what, why);
        let parsed = toc::parse_toc(&member.json).map_err(what)?;
        let table = toc::chunk_table(&parsed, toc_offset).map_err(what)?;
        let (tar, sizes) = skeleton(&parsed, &member).map_err(what)?;
        let imported = store.import_lazy(&LazyImport {
            chain_id: chain.to_string(),
            parent,
            skeleton: tar,
            sizes,
            chunks: table.chunks.len() as u64,
            toc_json: member.json,
            tail: (toc_offset, tail),
            lazy: serde_json::json!({
                "reference": self.reference,
                "plain_http": self.opts.plain_http,
                "tls_verify": self.opts.tls_verify,
                "blob_digest": self.blob,
                "blob_size": self.size,
                "toc_digest": self.toc_digest,
                "toc_offset": toc_offset,
                "diff_id": self.diff_id,
            }),
            source: self.what.to_string(),
        })?;
        Ok((fetched, imported))
    }
}
