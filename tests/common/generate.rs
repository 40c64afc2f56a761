//! Seeded random lower layers for the differential generator.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::fmt;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::*;

/// Seeded random lower layers (2 or 3): nested dirs, files (some empty, some sparse), symlinks,
/// hard links, fifos, user xattrs, odd modes and owners, whiteouts and opaque dirs (both forms)
/// above the bottom layer, type changes across layers, 255-byte names.
pub fn random_layers(rng: &mut Rng) -> Layers {
    const NAMES: &[&str] = &["a", "b", "c", "d0", "d1", "d2", "f0", "f1", "s0", "p0", "e"];
    const FILE_MODES: &[u32] = &[
        0o644, 0o644, 0o600, 0o755, 0o4755, 0o2755, 0o6755, 0o000, 0o444, 0o700, 0o1644,
    ];
    const DIR_MODES: &[u32] = &[0o755, 0o755, 0o700, 0o2775, 0o1777, 0o711, 0o555, 0o000, 0o2770];
    const OWNERS: &[(u32, u32)] = &[
        (0, 0),
        (1000, 1000),
        (1001, 1001),
        (65534, 65534),
        (1000, 65534),
        (0, 1000),
    ];
    let nlayers = 2 + rng.below(2) as usize;
    // Merged kind of each path below the layer being generated ('f','d','l','p','c').
    let mut below: BTreeMap<String, char> = BTreeMap::new();
    let mut bottom_up = Vec::new();
    for li in 0..nlayers {
        let mut mine: BTreeMap<String, char> = BTreeMap::new();
        let mut entries = Vec::new();
        let n = 8 + rng.below(14);
        let mut tries = 0;
        while entries.len() < n as usize && tries < 200 {
            tries += 1;
            let reuse = li > 0 && !below.is_empty() && rng.chance(45);
            let path = if reuse {
                let keys: Vec<&String> = below.keys().collect();
                (*rng.pick(&keys)).clone()
            } else {
                let mut dirs: Vec<String> = vec![String::new()];
                dirs.extend(
                    below
                        .iter()
                        .chain(mine.iter())
                        .filter(|(p, k)| **k == 'd' && p.matches('/').count() < 2)
                        .map(|(p, _)| p.clone()),
                );
                let parent = rng.pick(&dirs).clone();
                let name = if rng.chance(4) {
                    long_name(&format!("L{}", rng.below(3)), 255)
                } else {
                    rng.pick(NAMES).to_string()
                };
                if parent.is_empty() {
                    name
                } else {
                    format!("{parent}/{name}")
                }
            };
            // No conflicts inside one layer: the path is new here and no ancestor is a non-dir here.
            if mine.contains_key(&path) {
                continue;
            }
            let ancestors: Vec<String> = {
                let mut v = Vec::new();
                let mut p = path.as_str();
                while let Some((a, _)) = p.rsplit_once('/') {
                    v.push(a.to_string());
                    p = a;
                }
                v
            };
            if ancestors.iter().any(|a| mine.get(a).is_some_and(|k| *k != 'd')) {
                continue;
            }
            for a in &ancestors {
                mine.entry(a.clone()).or_insert('d');
            }
            let below_kind = below.get(&path).copied();
            let roll = rng.below(100);
            let kind = if reuse && roll < 25 {
                entries.push(Entry::Whiteout(path.clone(), rng.chance(50)));
                mine.insert(path.clone(), 'w');
                continue;
            } else if reuse && below_kind == Some('d') && roll < 45 {
                entries.push(Entry::Opaque(path.clone(), rng.chance(50)));
                'd'
            } else {
                let files: Vec<String> = mine
                    .iter()
                    .filter(|(_, k)| **k == 'f')
                    .map(|(p, _)| p.clone())
                    .collect();
                match rng.below(100) {
                    0..=34 => {
                        let content = match rng.below(10) {
                            0..=1 => Content::Bytes(vec![]),
                            2 => Content::Sparse {
                                size: 1 << (12 + rng.below(9)),
                                chunks: vec![
                                    (rng.below(3) * 4096, b"head".to_vec()),
                                    (8192 + rng.below(4) * 512, format!("L{li}").into_bytes()),
                                ],
                            },
                            _ => Content::Bytes(
                                format!("layer{li}:{path}:{}", rng.below(1000))
                                    .repeat(1 + rng.below(40) as usize)
                                    .into_bytes(),
                            ),
                        };
                        entries.push(Entry::File(path.clone(), content));
                        'f'
                    }
                    35..=59 => {
                        entries.push(Entry::Dir(path.clone()));
                        'd'
                    }
                    60..=74 => {
                        let t = match rng.below(4) {
                            0 => "/nonexistent-verlay/passwd".to_string(),
                            1 => format!("../{}", rng.pick(NAMES)),
                            2 => "dangling".to_string(),
                            _ => rng.pick(NAMES).to_string(),
                        };
                        entries.push(Entry::Symlink(path.clone(), t));
                        'l'
                    }
                    75..=84 if !files.is_empty() => {
                        entries.push(Entry::Hardlink(path.clone(), rng.pick(&files).clone()));
                        'f'
                    }
                    85..=94 => {
                        entries.push(Entry::Fifo(path.clone()));
                        'p'
                    }
                    95..=96 => {
                        entries.push(Entry::Char(path.clone(), 1, 3));
                        'c'
                    }
                    _ => {
                        entries.push(Entry::File(path.clone(), Content::Bytes(b"plain".to_vec())));
                        'f'
                    }
                }
            };
            mine.insert(path.clone(), kind);
            if rng.chance(45) {
                let mode = match kind {
                    'd' => Some(*rng.pick(DIR_MODES)),
                    'l' => None,
                    _ => Some(*rng.pick(FILE_MODES)),
                };
                let owner = if rng.chance(70) {
                    Some(*rng.pick(OWNERS))
                } else {
                    None
                };
                entries.push(Entry::Meta(path.clone(), mode, owner));
            }
            if (kind == 'f' || kind == 'd') && rng.chance(20) {
                entries.push(Entry::Xattr(
                    path.clone(),
                    format!("user.k{}", rng.below(3)),
                    format!("v{li}"),
                ));
            }
        }
        // Fold this layer into the merged view below the next one (approximately: enough to
        // choose interesting names, the kernel decides what is really visible).
        for (p, k) in &mine {
            if *k == 'w' {
                let gone: Vec<String> = below
                    .keys()
                    .filter(|q| *q == p || q.starts_with(&format!("{p}/")))
                    .cloned()
                    .collect();
                for q in gone {
                    below.remove(&q);
                }
            } else {
                if *k != 'd' {
                    let gone: Vec<String> = below
                        .keys()
                        .filter(|q| q.starts_with(&format!("{p}/")))
                        .cloned()
                        .collect();
                    for q in gone {
                        below.remove(&q);
                    }
                }
                below.insert(p.clone(), *k);
            }
        }
        bottom_up.push(entries);
    }
    bottom_up.reverse();
    Layers { lowers: bottom_up }
}
