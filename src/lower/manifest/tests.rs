//! Unit tests of the manifest: format round trips, damage detection, build and scrub.

use super::*;

#[test]
fn chunk_count_rounds_up() {
    for (size, n) in [
        (0, 0),
        (1, 1),
        (CHUNK_SIZE, 1),
        (CHUNK_SIZE + 1, 2),
        (3 * CHUNK_SIZE, 3),
    ] {
        assert_eq!(chunk_count(size, CHUNK_SIZE), n, "size {size}");
    }
}

#[test]
fn split_key_separates_parent_and_name() {
    let cases: &[(&str, Option<(&str, &str)>)] = &[
        ("", Some(("", ""))),
        (".", Some(("", ""))),
        ("a", Some(("", "a"))),
        ("a/b", Some(("a", "b"))),
        ("a/b/c", Some(("a/b", "c"))),
        ("./a/b", Some(("a", "b"))),
        ("a/", Some(("", "a"))),
        ("/a", None),
        ("a/../b", None),
    ];
    for (p, want) in cases {
        let got = split_key(Path::new(p));
        let got = got.as_ref().map(|(a, b)| (a.as_slice(), *b));
        let want = want.map(|(a, b)| (a.as_bytes(), b.as_bytes()));
        assert_eq!(got, want, "path {p:?}");
    }
}

#[test]
fn entry_path_refuses_keys_that_leave_the_layer() {
    let cases: &[(&str, &str, Option<&str>)] = &[
        ("", "", Some("")),
        ("", "a", Some("a")),
        ("a/b", "c", Some("a/b/c")),
        ("a", "", None),
        ("", "..", None),
        ("..", "x", None),
        ("a/../b", "x", None),
        ("/a", "x", None),
        ("a//b", "x", None),
        ("", "a/b", None),
    ];
    for (p, n, want) in cases {
        assert_eq!(
            entry_path(p.as_bytes(), n.as_bytes()),
            want.map(PathBuf::from),
            "parent {p:?} name {n:?}"
        );
    }
}

#[test]
fn manifest_path_is_beside_the_layer() {
    assert_eq!(
        manifest_path(Path::new("/s/l")),
        PathBuf::from("/s/l.verlay-manifest")
    );
    assert_eq!(
        manifest_path(Path::new("/s/l/")),
        PathBuf::from("/s/l.verlay-manifest")
    );
    assert_eq!(manifest_path(Path::new("l")), PathBuf::from("l.verlay-manifest"));
}

#[test]
fn short_and_foreign_bytes_are_corrupt_not_a_panic() {
    // Magic, version and flags right, everything else garbage.
    let mut garbage = vec![0xa5u8; 300];
    garbage[..8].copy_from_slice(&MAGIC);
    garbage[8..12].copy_from_slice(&VERSION.to_le_bytes());
    garbage[hdr::INCOMPAT..hdr::INCOMPAT + 4].fill(0);
    for bytes in [vec![], vec![0u8; 10], vec![0u8; 200], garbage] {
        match Manifest::from_bytes(bytes, Path::new("/x/l.verlay-manifest")) {
            Err(Error::Corrupt { layer, .. }) => assert_eq!(layer, "/x/l"),
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }
}
