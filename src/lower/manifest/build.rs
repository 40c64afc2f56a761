//! Building a manifest: walk a layer, hash every regular file by chunks, group hard links,
//! encode the tables, and seal (write the manifest beside the layer, fsync, rename).

use super::*;

/// One entry found by the walk, before link groups are known.
struct Found {
    parent: Vec<u8>,
    name: Vec<u8>,
    entry: ManifestEntry,
    /// (st_dev, st_ino) of a non-directory with more than one link
    inode: Option<(u64, u64)>,
}

pub(super) fn st_size(st: &Stat) -> u64 {
    u64::try_from(st.st_size).unwrap_or(0)
}

/// Hash a regular file chunk by chunk; an error if its size changed under us.
fn hash_file(layer: &LayerDir, rel: &Path, size: u64, chunk_size: u64) -> Result<Vec<[u8; 32]>> {
    // NONBLOCK: if a FIFO replaced the file since its lstat, open(2) must not wait for a
    // writer (the read then fails with EAGAIN). No effect on a regular file.
    let fd = layer
        .open_file(rel, OFlags::RDONLY | OFlags::NONBLOCK)
        .map_err(|e| Error::io("open", rel, std::io::Error::from_raw_os_error(e.errno())))?;
    let mut f = std::fs::File::from(fd);
    // Whole chunks per read (HASH_BLOCK and every chunk size are powers of two), and no
    // bigger buffer than the file needs: most files of a layer are small.
    let fits = size.div_ceil(chunk_size).max(1) * chunk_size;
    let mut buf = vec![0u8; (HASH_BLOCK as u64).max(chunk_size).min(fits) as usize];
    let mut out = Vec::with_capacity(chunk_count(size, chunk_size) as usize);
    let mut total = 0u64;
    loop {
        let n = read_full(&mut f, &mut buf).map_err(|e| Error::io("read", rel, e))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        // A file that keeps growing (a writer appending) would otherwise be read, and its
        // digests kept, for as long as it grows.
        if total > size {
            return Err(changed(layer, rel));
        }
        out.extend(chunk_digests(&buf[..n], chunk_size));
        if n < buf.len() {
            break;
        }
    }
    if total != size {
        return Err(changed(layer, rel));
    }
    Ok(out)
}

/// Read until `buf` is full or EOF; returns the bytes read.
pub(super) fn read_full(f: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn changed(layer: &LayerDir, rel: &Path) -> Error {
    Error::usage(
        format!("layer {}: {}", layer.path.display(), show(rel)),
        "changed while the manifest was being built",
        "stop writers to the layer and seal it again",
    )
}

fn io_err(op: &'static str, rel: &Path, e: Error) -> Error {
    match e {
        Error::Errno(n) => Error::io(op, rel, std::io::Error::from_raw_os_error(n)),
        e => e,
    }
}

/// Sorted xattrs of an object.
pub(super) fn read_xattrs(layer: &LayerDir, rel: &Path) -> Result<Vec<(OsString, Vec<u8>)>> {
    let mut names = layer.list_xattr(rel).map_err(|e| io_err("listxattr", rel, e))?;
    names.sort();
    let mut out = Vec::with_capacity(names.len());
    for n in names {
        if let Some(v) = layer.get_xattr(rel, &n).map_err(|e| io_err("getxattr", rel, e))? {
            out.push((n, v));
        }
    }
    Ok(out)
}

/// Walk a layer directory (not following symlinks, not crossing filesystems) and build the
/// manifest bytes with [`CHUNK_SIZE`] chunks; deterministic (same tree => same bytes => same
/// digest). Times are not recorded, so touching a file does not change the digest.
pub fn build(layer_dir: &Path) -> Result<Vec<u8>> {
    build_with_chunk_size(layer_dir, CHUNK_SIZE)
}

/// [`build`] with another chunk size: [`LEGACY_CHUNK_SIZE`] gives exactly the first format
/// (no feature flag), so an older layer's digest can be reproduced.
pub fn build_with_chunk_size(layer_dir: &Path, chunk_size: u64) -> Result<Vec<u8>> {
    if !valid_chunk_size(chunk_size) {
        return Err(Error::usage(
            "verlay layer seal",
            format!(
                "chunk size {chunk_size} is not a power of two from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE}"
            ),
            "use the default",
        ));
    }
    let layer = LayerDir::open(layer_dir, 0, "seal".into())?;
    let mut found = Vec::new();
    // Content of hard-linked files is hashed once per inode.
    let mut hashed: HashMap<(u64, u64), Vec<[u8; 32]>> = HashMap::new();
    let mut dirs_seen = HashSet::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let st = layer
            .stat(&rel)
            .map_err(|e| io_err("lstat", &rel, e))?
            .ok_or_else(|| changed(&layer, &rel))?;
        let kind = Kind::from_mode(st.st_mode);
        let ino = (st.st_dev, st.st_ino);
        let inode = (kind != Kind::Dir && st.st_nlink > 1).then_some(ino);
        let mut entry = ManifestEntry {
            path: rel.clone(),
            kind,
            perm: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            size: 0,
            rdev: 0,
            target: None,
            xattrs: read_xattrs(&layer, &rel)?,
            link_group: 0,
            chunks: Vec::new(),
            chunk_first: 0,
        };
        match kind {
            Kind::Dir => {
                // A directory is reached once unless a bind mount puts a tree inside itself
                // (same st_dev), whose walk would never end.
                if st.st_dev != layer.dev || !dirs_seen.insert(st.st_ino) {
                    return Err(Error::usage(
                        format!("layer {}: {}", layer.path.display(), show(&rel)),
                        "is a mount point; a layer must be one filesystem",
                        "unmount it, or copy the layer without it",
                    ));
                }
                let mut names: Vec<OsString> = layer
                    .read_dir(&rel)
                    .map_err(|e| io_err("readdir", &rel, e))?
                    .into_iter()
                    .map(|e| e.name)
                    .collect();
                // Reverse, so that popping visits in name order (the order does not change
                // the bytes, which are sorted below, but keeps errors reproducible).
                names.sort_by(|a, b| b.cmp(a));
                stack.extend(names.into_iter().map(|n| rel.join(n)));
            }
            Kind::File => {
                entry.size = st_size(&st);
                entry.chunks = match inode.and_then(|i| hashed.get(&i)) {
                    Some(c) => c.clone(),
                    None => {
                        let c = hash_file(&layer, &rel, entry.size, chunk_size)?;
                        if let Some(i) = inode {
                            hashed.insert(i, c.clone());
                        }
                        c
                    }
                };
            }
            Kind::Symlink => {
                entry.target = Some(layer.readlink(&rel).map_err(|e| io_err("readlink", &rel, e))?);
            }
            Kind::Char | Kind::Block => entry.rdev = st.st_rdev,
            Kind::Fifo | Kind::Socket => {}
        }
        let (parent, name) = split_key(&rel).ok_or_else(|| changed(&layer, &rel))?;
        found.push(Found {
            name: name.to_vec(),
            parent,
            entry,
            inode,
        });
    }
    found.sort_by(|a, b| (&a.parent, &a.name).cmp(&(&b.parent, &b.name)));
    assign_link_groups(&mut found);
    encode(&found, chunk_size)
}

/// Link groups numbered 1, 2, ... in entry order, only for inodes that appear at least twice
/// in this layer (a link to outside the layer, as containers/storage makes between layers,
/// is not a link within the layer).
fn assign_link_groups(found: &mut [Found]) {
    let mut seen: HashMap<(u64, u64), u32> = HashMap::new();
    for f in found.iter() {
        if let Some(i) = f.inode {
            *seen.entry(i).or_insert(0) += 1;
        }
    }
    let mut groups: HashMap<(u64, u64), u32> = HashMap::new();
    let mut next = 1;
    for f in found.iter_mut() {
        if let Some(i) = f.inode.filter(|i| seen.get(i).copied().unwrap_or(0) > 1) {
            f.entry.link_group = *groups.entry(i).or_insert_with(|| {
                next += 1;
                next - 1
            });
        }
    }
}

/// The tables being written; strings are deduplicated (parents repeat for every sibling).
#[derive(Default)]
struct Tables {
    strings: Vec<u8>,
    interned: HashMap<Vec<u8>, u32>,
    xattrs: Vec<u8>,
    digests: Vec<u8>,
}

fn too_big(what: &str) -> Error {
    Error::usage(
        "verlay layer seal",
        format!("the layer's {what} exceed the format's 4 GiB limit"),
        "split the layer",
    )
}

impl Tables {
    /// Put a string ref (offset, length) into `buf` at `at`.
    fn string(&mut self, buf: &mut [u8], at: usize, s: &[u8]) -> Result<()> {
        let len = u32::try_from(s.len()).map_err(|_| too_big("strings"))?;
        let off = if s.is_empty() {
            0
        } else if let Some(off) = self.interned.get(s) {
            *off
        } else {
            let off = u32::try_from(self.strings.len()).map_err(|_| too_big("strings"))?;
            u32::try_from(self.strings.len() + s.len()).map_err(|_| too_big("strings"))?;
            self.strings.extend_from_slice(s);
            self.interned.insert(s.to_vec(), off);
            off
        };
        put_u32(buf, at, off);
        put_u32(buf, at + 4, len);
        Ok(())
    }
}

fn encode(found: &[Found], chunk_size: u64) -> Result<Vec<u8>> {
    let mut t = Tables::default();
    let mut entries = vec![0u8; found.len() * ENTRY_SIZE];
    for (f, r) in found.iter().zip(entries.chunks_exact_mut(ENTRY_SIZE)) {
        let e = &f.entry;
        t.string(r, rec::PARENT, &f.parent)?;
        t.string(r, rec::NAME, &f.name)?;
        let target = e.target.as_deref().map(|t| t.as_bytes()).unwrap_or(b"");
        t.string(r, rec::TARGET, target)?;
        r[rec::KIND] = kind_code(e.kind);
        put_u32(r, rec::PERM, e.perm);
        put_u32(r, rec::UID, e.uid);
        put_u32(r, rec::GID, e.gid);
        put_u64(r, rec::SIZE, e.size);
        put_u64(r, rec::RDEV, e.rdev);
        put_u32(r, rec::LINK_GROUP, e.link_group);
        let xfirst = u32::try_from(t.xattrs.len() / XATTR_SIZE).map_err(|_| too_big("xattrs"))?;
        put_u32(r, rec::XATTR_COUNT, e.xattrs.len() as u32);
        put_u32(r, rec::XATTR_FIRST, xfirst);
        for (n, v) in &e.xattrs {
            let mut x = [0u8; XATTR_SIZE];
            t.string(&mut x, 0, n.as_bytes())?;
            t.string(&mut x, 8, v)?;
            t.xattrs.extend_from_slice(&x);
        }
        put_u64(r, rec::CHUNK_FIRST, (t.digests.len() / DIGEST_SIZE) as u64);
        for c in &e.chunks {
            t.digests.extend_from_slice(c);
        }
    }
    let entries_off = HEADER_SIZE;
    let xattrs_off = entries_off + entries.len();
    let strings_off = xattrs_off + t.xattrs.len();
    let digests_off = strings_off + t.strings.len();
    let total = digests_off + t.digests.len() + TRAILER_SIZE;
    let mut out = vec![0u8; HEADER_SIZE];
    out[hdr::MAGIC..hdr::MAGIC + 8].copy_from_slice(&MAGIC);
    put_u32(&mut out, hdr::VERSION, VERSION);
    put_u32(&mut out, hdr::HEADER_SIZE, HEADER_SIZE as u32);
    put_u32(&mut out, hdr::COMPAT, 0);
    put_u32(&mut out, hdr::RO_COMPAT, 0);
    let incompat = if chunk_size == LEGACY_CHUNK_SIZE {
        0
    } else {
        INCOMPAT_CHUNK_SIZE
    };
    put_u32(&mut out, hdr::INCOMPAT, incompat);
    // Fits: at most MAX_CHUNK_SIZE (build_with_chunk_size checked it).
    put_u32(&mut out, hdr::CHUNK_SIZE, chunk_size as u32);
    put_u64(&mut out, hdr::ENTRY_COUNT, found.len() as u64);
    put_u32(&mut out, hdr::ENTRY_SIZE, ENTRY_SIZE as u32);
    put_u64(&mut out, hdr::ENTRIES_OFF, entries_off as u64);
    put_u64(&mut out, hdr::XATTRS_OFF, xattrs_off as u64);
    put_u64(&mut out, hdr::XATTR_COUNT, (t.xattrs.len() / XATTR_SIZE) as u64);
    put_u64(&mut out, hdr::STRINGS_OFF, strings_off as u64);
    put_u64(&mut out, hdr::STRINGS_LEN, t.strings.len() as u64);
    put_u64(&mut out, hdr::DIGESTS_OFF, digests_off as u64);
    put_u64(
        &mut out,
        hdr::DIGEST_COUNT,
        (t.digests.len() / DIGEST_SIZE) as u64,
    );
    put_u64(&mut out, hdr::FILE_LEN, total as u64);
    out.reserve(total - HEADER_SIZE);
    out.extend_from_slice(&entries);
    out.extend_from_slice(&t.xattrs);
    out.extend_from_slice(&t.strings);
    out.extend_from_slice(&t.digests);
    let trailer = Sha256::digest(&out);
    out.extend_from_slice(&trailer);
    Ok(out)
}

/// build + write to `manifest_path(layer_dir)` crash-safely: a temp file in the same dir,
/// write, fsync, rename over the old manifest, fsync the dir. A crash leaves the old manifest
/// or the new one, never a torn one (at worst a stale `.NAME.tmp.PID` file). Returns the digest.
pub fn seal(layer_dir: &Path) -> Result<String> {
    seal_with_chunk_size(layer_dir, CHUNK_SIZE)
}

/// [`seal`] with [`build_with_chunk_size`].
pub fn seal_with_chunk_size(layer_dir: &Path, chunk_size: u64) -> Result<String> {
    let bytes = build_with_chunk_size(layer_dir, chunk_size)?;
    let target = manifest_path(layer_dir);
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp_name = OsString::from(".");
    tmp_name.push(target.file_name().unwrap_or_default());
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let write = || -> Result<()> {
        // A leftover of an earlier crash with the same pid.
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(Error::io("seal.remove_stale", &tmp, e))
            }
            _ => {}
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| Error::io("seal.create_tmp", &tmp, e))?;
        f.write_all(&bytes)
            .map_err(|e| Error::io("seal.write_tmp", &tmp, e))?;
        f.sync_all().map_err(|e| Error::io("seal.fsync_tmp", &tmp, e))?;
        std::fs::rename(&tmp, &target).map_err(|e| Error::io("seal.rename", &target, e))?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("seal.fsync_dir", &dir, e))?;
    Ok(sha256_id(&bytes))
}
