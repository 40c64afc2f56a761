//! st_ino and nlink stability across copy-up and remount, and open handles across copy-up and
//! unlink.

use super::*;

#[test]
fn st_ino_is_stable_across_copy_up_rename_and_remount() {
    let mut fx = Fx::new(Some(""), &["f a=1; f d/x=2; d p"]);
    let a = fx.attr("a").expect("a").ino;
    let d = fx.attr("d").expect("d").ino;
    let x = fx.attr("d/x").expect("d/x").ino;
    assert_eq!(
        a,
        std::fs::metadata(fx.low(0, "a")).expect("lower").ino(),
        "st_ino of a lower file"
    );
    fx.run_all("changes", "chmod a 0600");
    assert_eq!(fx.attr("a").expect("a").ino, a, "after copy-up");
    assert_ne!(
        std::fs::metadata(fx.up("a")).expect("upper").ino(),
        a,
        "the copy is a new inode"
    );
    fx.run_all("changes", "rename a p/b; rename d p/e");
    let check = |fx: &Fx, when: &str| {
        assert_eq!(fx.attr("p/b").expect("p/b").ino, a, "file {when}");
        assert_eq!(fx.attr("p/e").expect("p/e").ino, d, "dir {when}");
        assert_eq!(
            fx.attr("p/e/x").expect("p/e/x").ino,
            x,
            "file in a renamed dir {when}"
        );
        assert_eq!(fx.show("a"), "ENOENT");
        assert_eq!(fx.show("d"), "ENOENT");
    };
    check(&fx, "after rename");
    fx.remount();
    check(&fx, "after remount");
    fx.finish("st_ino");
}

#[test]
fn lower_hard_links_share_st_ino_and_nlink_until_one_is_copied_up() {
    let mut fx = Fx::new(Some(""), &["f a=1; h b=a; f c=3"]);
    let (a, b) = (fx.attr("a").expect("a"), fx.attr("b").expect("b"));
    assert_eq!((a.nlink, b.nlink), (2, 2), "nlink of lower hard links");
    assert_eq!(a.ino, b.ino, "lower hard links share st_ino");
    assert_eq!(fx.attr("c").expect("c").nlink, 1);
    fx.run_all("copy-up", "write a=new");
    for round in ["same mount", "after remount"] {
        let (a2, b2) = (fx.attr("a").expect("a"), fx.attr("b").expect("b"));
        assert_ne!(a2.ino, b2.ino, "{round}: copy-up (index=off) breaks the link");
        assert_eq!(b2.ino, b.ino, "{round}: the lower name keeps its st_ino");
        assert_eq!((a2.nlink, b2.nlink), (1, 2), "{round}: nlink");
        assert_eq!(fx.cat("a").expect("a"), "new", "{round}");
        assert_eq!(
            fx.cat("b").expect("b"),
            "1",
            "{round}: the other name keeps the lower data"
        );
        fx.remount();
    }
    fx.finish("hard links");
}

// ------------------------------------------------------------------------------------------
// open handles

#[test]
fn read_only_handle_opened_before_copy_up_reads_the_new_data() {
    // (case, how the file is copied up and changed)
    let rows: &[(&str, &str)] = &[
        ("write through another handle", "write a=new-data"),
        ("chmod, then write", "chmod a 0600; write a=new-data"),
    ];
    for (case, ops) in rows {
        let fx = Fx::new(Some(""), &["f a=old"]);
        let id = fx.id("a").expect("a");
        let fh = fx.u.open(&ROOT, id, libc::O_RDONLY).expect("open");
        assert_eq!(fx.u.read(fh, 0, 100).expect("read"), b"old", "{case}: before");
        fx.run_all(case, ops);
        assert_eq!(fx.u.read(fh, 0, 100).expect("read"), b"new-data", "{case}: after");
        fx.u.release(fh);
        assert_eq!(
            std::fs::read(fx.low(0, "a")).expect("lower"),
            b"old",
            "{case}: lower"
        );
        fx.finish(case);
    }
}

#[test]
fn handle_of_an_unlinked_file_still_writes_and_reports_nlink_0() {
    // (case, upper, lowers, disk after unlink)
    let rows: &[(&str, &str, &[&str], &str)] = &[
        ("lower file", "", &["f a=lower"], "a(wh)"),
        ("upper-only file", "f a=upper", &["f b=1"], ""),
        ("upper file over lower", "f a=upper", &["f a=lower"], "a(wh)"),
    ];
    for (case, upper, lowers, disk) in rows {
        let fx = Fx::new(Some(upper), lowers);
        let id = fx.id("a").expect("a");
        let fh = fx.u.open(&ROOT, id, libc::O_RDWR).expect("open");
        fx.run_all(case, "unlink a");
        assert_eq!(
            fx.u.write(&ROOT, 1, fh, 0, b"written after unlink")
                .expect("write"),
            20,
            "{case}"
        );
        assert_eq!(
            fx.u.read(fh, 0, 100).expect("read"),
            b"written after unlink",
            "{case}"
        );
        for with_fh in [Some(fh), None] {
            let a =
                fx.u.getattr(id, with_fh)
                    .unwrap_or_else(|e| panic!("{case}: getattr {with_fh:?}: {e}"));
            assert_eq!((a.nlink, a.size), (0, 20), "{case}: getattr {with_fh:?}");
        }
        assert_eq!(fx.show("a"), "ENOENT", "{case}");
        assert_tokens(case, &disk_tree(fx.upper.as_ref().expect("upper")), disk);
        fx.u.release(fh);
        fx.finish(case);
    }
}
