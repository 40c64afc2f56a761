//! xattrs through the union: user xattrs copied up and changed, the overlay's own escaped.

use super::*;

#[test]
fn user_set_overlay_xattrs_are_stored_escaped_and_private_ones_never_listed() {
    let fx = Fx::new(
        Some(""),
        &["f a=1; x a user.k=v; f n=1; x n trusted.overlay.overlay.nested=yes; o op; f d/x=1; f e/y=1"],
    );
    let listed = |path: &str| -> Vec<String> {
        let id = fx.id(path).expect("lookup");
        let raw = fx.u.listxattr(id).expect("listxattr");
        let mut v: Vec<String> = raw
            .split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect();
        v.sort();
        v
    };
    let get = |path: &str, n: &str| -> Result<String, String> {
        let id = fx.id(path)?;
        ok(fx.u.getxattr(id, name(n))).map(|v| String::from_utf8_lossy(&v).into_owned())
    };
    // A user's trusted.overlay.* is escaped on disk and read back by its own name.
    let id = fx.id("a").expect("a");
    fx.u.setxattr(&ROOT, id, name("trusted.overlay.foo"), b"bar", 0)
        .expect("setxattr");
    fx.u.setxattr(&ROOT, id, name("trusted.overlay.opaque"), b"y", 0)
        .expect("setxattr");
    let up = fx.up("a");
    assert_eq!(
        get_xattr(&up, "trusted.overlay.overlay.foo").as_deref(),
        Some(&b"bar"[..]),
        "escaped on disk"
    );
    assert_eq!(
        get_xattr(&up, "trusted.overlay.foo"),
        None,
        "never stored unescaped"
    );
    assert_eq!(
        get_xattr(&up, "trusted.overlay.opaque"),
        None,
        "never stored unescaped"
    );
    assert_eq!(get("a", "trusted.overlay.foo"), Ok("bar".into()));
    assert_eq!(get("a", "trusted.overlay.overlay.foo"), Err("ENODATA".into()));
    assert_eq!(get("a", "user.k"), Ok("v".into()));
    assert_eq!(
        listed("a"),
        ["trusted.overlay.foo", "trusted.overlay.opaque", "user.k"]
    );
    fx.u.removexattr(id, name("trusted.overlay.foo"))
        .expect("removexattr");
    assert_eq!(
        get_xattr(&up, "trusted.overlay.overlay.foo"),
        None,
        "removed on disk"
    );
    assert_eq!(listed("a"), ["trusted.overlay.opaque", "user.k"]);
    // An escaped xattr in a lower (a nested overlay's layer) shows by its user name.
    assert_eq!(get("n", "trusted.overlay.nested"), Ok("yes".into()));
    assert_eq!(listed("n"), ["trusted.overlay.nested"]);
    // The overlay's own xattrs (opaque, redirect, origin) are never shown or writable.
    fx.run_all(
        "private",
        "unlink d/x; rmdir d; mkdir d; rename e f; chmod n 0600",
    );
    assert!(
        get_xattr(&fx.up("d"), "trusted.overlay.opaque").is_some(),
        "d is opaque on disk"
    );
    assert!(
        get_xattr(&fx.up("f"), "trusted.overlay.redirect").is_some(),
        "f has a redirect on disk"
    );
    for p in ["op", "d", "f", "n"] {
        let shown = listed(p);
        assert!(
            shown
                .iter()
                .all(|n| n.starts_with("user.") || n == "trusted.overlay.nested"),
            "{p}: private xattrs listed: {shown:?}"
        );
        for private in [
            "trusted.overlay.opaque",
            "trusted.overlay.redirect",
            "trusted.verlay.origin",
        ] {
            assert_eq!(get(p, private), Err("ENODATA".into()), "{p}: {private}");
        }
    }
    let nid = fx.id("n").expect("n");
    assert_eq!(
        ok(fx.u.setxattr(&ROOT, nid, name("trusted.verlay.origin"), b"1", 0)),
        Err("EPERM".into())
    );
    // Removing an xattr the file lacks fails without copying it up.
    let yid = fx.id("f/y").expect("f/y");
    assert_eq!(
        ok(fx.u.removexattr(yid, name("user.none"))),
        Err("ENODATA".into())
    );
    assert!(!fx.up("f/y").exists(), "removexattr of a missing xattr copied up");
    fx.finish("xattrs");
}

/// File capabilities (VFS_CAP_REVISION_2): CAP_NET_BIND_SERVICE permitted.
const CAPS_V2: [u8; 20] = [0, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

#[test]
fn absent_file_capabilities_are_remembered_until_something_adds_them() {
    // The kernel asks for security.capability before every write; its absence is cached
    // per node, and every way of giving the object capabilities must show through.
    // Node ids are looked up once, as the kernel does while it holds the inode: a fresh
    // lookup would forget the cached answer anyway.
    let fx = Fx::new(Some(""), &["f a=1; f b=2; f c=3"]);
    let caps = |id: u64| -> Result<Vec<u8>, String> { ok(fx.u.getxattr(id, name("security.capability"))) };
    let (a, b) = (fx.id("a").expect("a"), fx.id("b").expect("b"));
    for id in [a, b] {
        assert_eq!(caps(id), Err("ENODATA".into()), "{id}: a lower file without caps");
        assert_eq!(caps(id), Err("ENODATA".into()), "{id}: asked again (cached)");
    }
    // setxattr (with its copy-up) and removexattr through the union.
    fx.u.setxattr(&ROOT, a, name("security.capability"), &CAPS_V2, 0)
        .expect("setxattr");
    assert_eq!(caps(a), Ok(CAPS_V2.to_vec()), "set after a cached miss");
    fx.u.removexattr(a, name("security.capability"))
        .expect("removexattr");
    assert_eq!(caps(a), Err("ENODATA".into()), "removed");
    assert_eq!(caps(a), Err("ENODATA".into()), "removed, cached");
    fx.u.setxattr(&ROOT, a, name("security.capability"), &CAPS_V2, 0)
        .expect("setxattr on the upper copy");
    assert_eq!(
        caps(a),
        Ok(CAPS_V2.to_vec()),
        "set on the upper after a cached miss"
    );
    // Another object with caps takes the name of one known to have none.
    let c = fx.id("c").expect("c");
    assert_eq!(caps(c), Err("ENODATA".into()), "c");
    fx.run_all("rename", "rename a c");
    let c = fx.id("c").expect("c after rename");
    assert_eq!(caps(c), Ok(CAPS_V2.to_vec()), "renamed over a cached miss");
    // Copy-up carries the lower's (absent) caps; the cache stays right.
    fx.run_all("chmod", "chmod b 0600");
    assert_eq!(caps(b), Err("ENODATA".into()), "after copy-up");
    fx.finish("caps");
}
