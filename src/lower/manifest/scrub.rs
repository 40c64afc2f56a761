//! Scrub: check a whole layer against its manifest and list every problem found.

use super::build::*;
use super::*;

/// One thing wrong with a layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// The manifest lists it; the layer lacks it (for a directory, what it held is not
    /// reported again).
    Missing {
        /// path in the layer
        path: PathBuf,
    },
    /// The layer holds it; the manifest does not list it (for a directory, what it holds is
    /// not reported again).
    Unlisted {
        /// path in the layer
        path: PathBuf,
    },
    /// A chunk of a regular file does not match its digest.
    Content {
        /// path in the layer
        path: PathBuf,
        /// chunk index (byte offset = chunk * chunk_size)
        chunk: u64,
        /// the manifest's chunk size
        chunk_size: u64,
        /// "sha256:<hex>" from the manifest
        expected: String,
        /// "sha256:<hex>" of what is on disk, or why it could not be read
        actual: String,
    },
    /// Type, mode, owner, size, device, symlink target, xattrs or hard links differ.
    Metadata {
        /// path in the layer
        path: PathBuf,
        /// e.g. "mode 0644, manifest says 0755"
        what: String,
    },
}

impl Problem {
    /// The path the problem is about.
    pub fn path(&self) -> &Path {
        match self {
            Problem::Missing { path }
            | Problem::Unlisted { path }
            | Problem::Content { path, .. }
            | Problem::Metadata { path, .. } => path,
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Missing { path } => {
                write!(
                    f,
                    "{}: listed in the manifest but missing from the layer",
                    show(path)
                )
            }
            Problem::Unlisted { path } => write!(f, "{}: in the layer but not in the manifest", show(path)),
            Problem::Content {
                path,
                chunk,
                chunk_size,
                expected,
                actual,
            } => write!(
                f,
                "{}: chunk {chunk} (bytes {}..{}) does not match (expected {expected}, found {actual})",
                show(path),
                chunk * chunk_size,
                (chunk + 1) * chunk_size
            ),
            Problem::Metadata { path, what } => write!(f, "{}: {what}", show(path)),
        }
    }
}

fn dev_str(rdev: u64) -> String {
    format!("{}:{}", rustix::fs::major(rdev), rustix::fs::minor(rdev))
}

fn xattr_problems(e: &ManifestEntry, on_disk: &[(OsString, Vec<u8>)], out: &mut Vec<Problem>) {
    let want: HashMap<&OsStr, &[u8]> = e
        .xattrs
        .iter()
        .map(|(n, v)| (n.as_os_str(), v.as_slice()))
        .collect();
    let have: HashMap<&OsStr, &[u8]> = on_disk
        .iter()
        .map(|(n, v)| (n.as_os_str(), v.as_slice()))
        .collect();
    let meta = |what: String| Problem::Metadata {
        path: e.path.clone(),
        what,
    };
    for (n, v) in &e.xattrs {
        match have.get(n.as_os_str()) {
            None => out.push(meta(format!("xattr {} missing", n.to_string_lossy()))),
            Some(h) if *h != v.as_slice() => out.push(meta(format!(
                "xattr {} is {:?}, manifest says {:?}",
                n.to_string_lossy(),
                bstr(h),
                bstr(v)
            ))),
            Some(_) => {}
        }
    }
    for (n, _) in on_disk {
        if !want.contains_key(n.as_os_str()) {
            out.push(meta(format!("xattr {} not in the manifest", n.to_string_lossy())));
        }
    }
}

/// Check every entry of the layer against the manifest (and the manifest itself first, see
/// [`Manifest::check`]); `progress(done_bytes, total_bytes)` is called as it goes. Damage is
/// returned as [`Problem`]s, in manifest order; `Err` means the manifest itself is damaged or
/// the layer could not be opened at all.
pub fn scrub(
    layer_dir: &Path,
    manifest: &Manifest,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Vec<Problem>> {
    manifest.check()?;
    let layer = LayerDir::open(layer_dir, 0, "scrub".into())?;
    let mut total = 0u64;
    for e in manifest.iter() {
        let e = e?;
        total += e.size;
    }
    let mut done = 0u64;
    progress(done, total);
    let mut problems = Vec::new();
    // Directories missing (or of the wrong type): what they held is not reported again.
    let mut gone: HashSet<PathBuf> = HashSet::new();
    // Hard links: inode -> (group, first path), and group -> inode.
    let mut inode_group: HashMap<(u64, u64), (u32, PathBuf)> = HashMap::new();
    let mut group_inode: HashMap<u32, ((u64, u64), PathBuf)> = HashMap::new();
    let chunk_size = manifest.chunk_size();
    let mut buf = vec![0u8; HASH_BLOCK.max(chunk_size as usize)];
    for e in manifest.iter() {
        let e = e?;
        let meta = |what: String| Problem::Metadata {
            path: e.path.clone(),
            what,
        };
        if e.path.parent().is_some_and(|p| gone.contains(p)) {
            gone.insert(e.path.clone());
            done += e.size;
            continue;
        }
        let st = match layer.stat(&e.path) {
            Ok(Some(st)) => st,
            Ok(None) => {
                problems.push(Problem::Missing { path: e.path.clone() });
                gone.insert(e.path.clone());
                done += e.size;
                progress(done, total);
                continue;
            }
            Err(err) => {
                problems.push(meta(format!("cannot stat: {err}")));
                gone.insert(e.path.clone());
                done += e.size;
                continue;
            }
        };
        let kind = Kind::from_mode(st.st_mode);
        let rdev = st.st_rdev;
        if kind != e.kind {
            problems.push(meta(format!(
                "type {}, manifest says {}",
                kind_name(kind, rdev),
                kind_name(e.kind, e.rdev)
            )));
            gone.insert(e.path.clone());
            done += e.size;
            continue;
        }
        attr_problems(&e, &st, &mut problems);
        match read_xattrs(&layer, &e.path) {
            Ok(x) => xattr_problems(&e, &x, &mut problems),
            Err(err) => problems.push(meta(format!("cannot read xattrs: {err}"))),
        }
        if kind != Kind::Dir {
            link_problems(&e, &st, &mut inode_group, &mut group_inode, &mut problems);
        }
        match kind {
            Kind::Symlink => match layer.readlink(&e.path) {
                Ok(t) if Some(&t) != e.target.as_ref() => problems.push(meta(format!(
                    "symlink target {:?}, manifest says {:?}",
                    t,
                    e.target.as_deref().unwrap_or_default()
                ))),
                Ok(_) => {}
                Err(err) => problems.push(meta(format!("cannot read symlink: {err}"))),
            },
            Kind::File => {
                let size = st_size(&st);
                if size != e.size {
                    problems.push(meta(format!("size {size}, manifest says {}", e.size)));
                    done += e.size;
                    progress(done, total);
                } else {
                    scrub_content(&layer, &e, chunk_size, &mut buf, &mut problems, &mut |n| {
                        done += n;
                        progress(done, total);
                    });
                }
            }
            Kind::Dir => match layer.read_dir(&e.path) {
                Ok(ents) => problems.extend(unlisted(manifest, &e.path, &ents)?),
                Err(err) => problems.push(meta(format!("cannot list: {err}"))),
            },
            Kind::Fifo | Kind::Char | Kind::Block | Kind::Socket => {}
        }
    }
    progress(total, total);
    Ok(problems)
}

/// Mode, owner and device number of the entry `e` (its kind already matched) against `st`.
fn attr_problems(e: &ManifestEntry, st: &Stat, problems: &mut Vec<Problem>) {
    let meta = |what: String| Problem::Metadata {
        path: e.path.clone(),
        what,
    };
    let perm = st.st_mode & 0o7777;
    if perm != e.perm {
        problems.push(meta(format!("mode {perm:04o}, manifest says {:04o}", e.perm)));
    }
    if st.st_uid != e.uid {
        problems.push(meta(format!("owner uid {}, manifest says {}", st.st_uid, e.uid)));
    }
    if st.st_gid != e.gid {
        problems.push(meta(format!("group gid {}, manifest says {}", st.st_gid, e.gid)));
    }
    let rdev = st.st_rdev;
    if matches!(e.kind, Kind::Char | Kind::Block) && rdev != e.rdev {
        problems.push(meta(format!(
            "device {}, manifest says {}",
            dev_str(rdev),
            dev_str(e.rdev)
        )));
    }
}

/// The names in directory `dir` (read as `ents`) that the manifest does not list, sorted.
fn unlisted(manifest: &Manifest, dir: &Path, ents: &[crate::layer::RawEntry]) -> Result<Vec<Problem>> {
    let listed: HashSet<&[u8]> = manifest
        .child_range(dir)?
        .map(|i| manifest.key(i).map(|(_, n)| n))
        .collect::<Result<_>>()?;
    let mut extra: Vec<PathBuf> = ents
        .iter()
        .filter(|d| !listed.contains(d.name.as_bytes()))
        .map(|d| dir.join(&d.name))
        .collect();
    extra.sort();
    Ok(extra.into_iter().map(|path| Problem::Unlisted { path }).collect())
}

/// Two entries share an inode exactly when the manifest gives them the same non-zero group.
fn link_problems(
    e: &ManifestEntry,
    st: &Stat,
    inode_group: &mut HashMap<(u64, u64), (u32, PathBuf)>,
    group_inode: &mut HashMap<u32, ((u64, u64), PathBuf)>,
    out: &mut Vec<Problem>,
) {
    let ino = (st.st_dev, st.st_ino);
    if let Some((g, first)) = inode_group.get(&ino) {
        if *g == 0 || *g != e.link_group {
            out.push(Problem::Metadata {
                path: e.path.clone(),
                what: format!(
                    "hard link to {}, manifest says they are separate files",
                    show(first)
                ),
            });
        }
    } else if st.st_nlink > 1 || e.link_group != 0 {
        inode_group.insert(ino, (e.link_group, e.path.clone()));
    }
    if e.link_group != 0 {
        match group_inode.get(&e.link_group) {
            Some((i, first)) if *i != ino => out.push(Problem::Metadata {
                path: e.path.clone(),
                what: format!("not a hard link to {}, manifest says it is", show(first)),
            }),
            Some(_) => {}
            None => {
                group_inode.insert(e.link_group, (ino, e.path.clone()));
            }
        }
    }
}

/// Hash a file chunk by chunk against its manifest digests; one problem per bad chunk.
/// Reads `buf.len()` bytes at a time (a multiple of the chunk size).
fn scrub_content(
    layer: &LayerDir,
    e: &ManifestEntry,
    chunk_size: u64,
    buf: &mut [u8],
    out: &mut Vec<Problem>,
    advance: &mut dyn FnMut(u64),
) {
    let expected = |chunk: u64| {
        e.chunks
            .get(chunk as usize)
            .map(|d| format!("sha256:{}", hex(d)))
            .unwrap_or_default()
    };
    let unreadable = |chunk: u64, why: String| Problem::Content {
        path: e.path.clone(),
        chunk,
        chunk_size,
        expected: expected(chunk),
        actual: format!("unreadable ({why})"),
    };
    let mut f = match layer.open_file(&e.path, OFlags::RDONLY) {
        Ok(fd) => std::fs::File::from(fd),
        Err(err) => {
            out.push(unreadable(0, err.to_string()));
            advance(e.size);
            return;
        }
    };
    let mut left = e.size;
    let mut chunk = 0u64;
    while left > 0 {
        let len = left.min(buf.len() as u64) as usize;
        let block = &mut buf[..len];
        match read_full(&mut f, block) {
            Ok(n) if n == len => {
                for (got, want) in chunk_digests(block, chunk_size).zip(&e.chunks[chunk as usize..]) {
                    if &got != want {
                        out.push(Problem::Content {
                            path: e.path.clone(),
                            chunk,
                            chunk_size,
                            expected: format!("sha256:{}", hex(want)),
                            actual: format!("sha256:{}", hex(&got)),
                        });
                    }
                    chunk += 1;
                }
            }
            Ok(n) => {
                out.push(unreadable(
                    chunk + n as u64 / chunk_size,
                    format!("ends {} bytes early", left - n as u64),
                ));
                advance(left);
                return;
            }
            Err(err) => {
                out.push(unreadable(chunk, err.to_string()));
                advance(left);
                return;
            }
        }
        left -= len as u64;
        advance(len as u64);
    }
}
