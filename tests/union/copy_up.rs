//! Copy-up: data, holes, mode, owner, ns times and xattrs copied, parents first, the lower never
//! touched, the work dir left empty.

use super::*;

const COPY_UP_LOWER: &str = "d p 0750 1002:1003; d p/q 2711 1004:1005; f p/q/f=hello; \
     m p/q/f 7755 1000:1001; x p/q/f user.k=v; x p/q user.dk=dv; x p user.pk=pv; f p/q/g=other; \
     t p/q/f 1500000000.123456789; t p/q/g 1500000001.2; t p/q 1400000000.987654321; t p 1300000000.000000005";

#[test]
fn copy_up_keeps_data_mode_owner_times_and_xattrs_of_the_object_and_its_parents() {
    struct Row<'a> {
        case: &'a str,
        target: &'a str,
        op: &'a dyn Fn(&Fx) -> Result<(), String>,
        data: Option<&'a str>,
        mode: u32,
        owner: (u32, u32),
        mtime_kept: bool,
        xattrs: &'a [&'a str],
    }
    let setattr = |path: &'static str, sa: SetAttr| move |fx: &Fx| fx.setattr(path, sa);
    let chmod = setattr(
        "p/q/f",
        SetAttr {
            mode: Some(0o604),
            ..SetAttr::default()
        },
    );
    let chown = setattr(
        "p/q/f",
        SetAttr {
            uid: Some(2000),
            gid: Some(2001),
            ..SetAttr::default()
        },
    );
    let atime = setattr(
        "p/q/f",
        SetAttr {
            atime: Some(Some(ts("1234.5"))),
            ..SetAttr::default()
        },
    );
    let truncate = setattr(
        "p/q/f",
        SetAttr {
            size: Some(3),
            ..SetAttr::default()
        },
    );
    let dir_chmod = setattr(
        "p/q",
        SetAttr {
            mode: Some(0o700),
            ..SetAttr::default()
        },
    );
    let setxattr = |fx: &Fx| fx.run("setxattr p/q/f user.new=1");
    let open_w = |fx: &Fx| {
        let id = fx.id("p/q/f")?;
        let fh = ok(fx.u.open(&ROOT, id, libc::O_WRONLY))?;
        fx.u.release(fh);
        Ok(())
    };
    let write = |fx: &Fx| {
        let id = fx.id("p/q/f")?;
        let fh = ok(fx.u.open(&ROOT, id, libc::O_RDWR))?;
        let r = ok(fx.u.write(&ROOT, 1, fh, 0, b"HE"));
        fx.u.release(fh);
        r.map(drop)
    };
    let rows = [
        Row {
            case: "chmod",
            target: "p/q/f",
            op: &chmod,
            data: Some("hello"),
            mode: 0o604,
            owner: (1000, 1001),
            mtime_kept: true,
            xattrs: &["user.k=v"],
        },
        Row {
            // chown of a non-directory clears setuid and setgid, keeps sticky (as on any fs)
            case: "chown",
            target: "p/q/f",
            op: &chown,
            data: Some("hello"),
            mode: 0o1755,
            owner: (2000, 2001),
            mtime_kept: true,
            xattrs: &["user.k=v"],
        },
        Row {
            case: "utimes (atime only)",
            target: "p/q/f",
            op: &atime,
            data: Some("hello"),
            mode: 0o7755,
            owner: (1000, 1001),
            mtime_kept: true,
            xattrs: &["user.k=v"],
        },
        Row {
            case: "setxattr",
            target: "p/q/f",
            op: &setxattr,
            data: Some("hello"),
            mode: 0o7755,
            owner: (1000, 1001),
            mtime_kept: true,
            xattrs: &["user.k=v", "user.new=1"],
        },
        Row {
            case: "open for write",
            target: "p/q/f",
            op: &open_w,
            data: Some("hello"),
            mode: 0o7755,
            owner: (1000, 1001),
            mtime_kept: true,
            xattrs: &["user.k=v"],
        },
        Row {
            case: "write",
            target: "p/q/f",
            op: &write,
            data: Some("HEllo"),
            mode: 0o7755,
            owner: (1000, 1001),
            mtime_kept: false,
            xattrs: &["user.k=v"],
        },
        Row {
            case: "truncate",
            target: "p/q/f",
            op: &truncate,
            data: Some("hel"),
            mode: 0o7755,
            owner: (1000, 1001),
            mtime_kept: false,
            xattrs: &["user.k=v"],
        },
        Row {
            case: "chmod of a dir copies up the dir alone",
            target: "p/q",
            op: &dir_chmod,
            data: None,
            mode: 0o700,
            owner: (1004, 1005),
            mtime_kept: true,
            xattrs: &["user.dk=dv"],
        },
    ];
    for r in rows {
        let case = r.case;
        let fx = Fx::new(Some(""), &[COPY_UP_LOWER]);
        let before = fx.attr(r.target).expect("attr before");
        (r.op)(&fx).unwrap_or_else(|e| panic!("{case}: {e}"));
        let up = fx.up(r.target);
        let low = fx.low(0, r.target);
        let (um, lm) = (
            std::fs::symlink_metadata(&up).unwrap_or_else(|e| panic!("{case}: not copied up: {e}")),
            std::fs::symlink_metadata(&low).expect("lower"),
        );
        assert_eq!(um.mode() & libc::S_IFMT, lm.mode() & libc::S_IFMT, "{case}: type");
        if let Some(d) = r.data {
            assert_eq!(
                String::from_utf8_lossy(&std::fs::read(&up).expect("read")),
                d,
                "{case}: upper data"
            );
            assert_eq!(fx.cat(r.target).expect("cat"), d, "{case}: merged data");
        }
        assert_eq!(
            format!("{:o}", um.mode() & 0o7777),
            format!("{:o}", r.mode),
            "{case}: upper mode"
        );
        assert_eq!((um.uid(), um.gid()), r.owner, "{case}: upper owner");
        if r.mtime_kept {
            assert_eq!(
                (um.mtime(), um.mtime_nsec()),
                (lm.mtime(), lm.mtime_nsec()),
                "{case}: mtime"
            );
        }
        if case.starts_with("utimes") {
            assert_eq!(
                (um.atime(), um.atime_nsec()),
                (1234, 500_000_000),
                "{case}: atime"
            );
        }
        assert_tokens(
            &format!("{case}: upper xattrs"),
            &user_xattrs(&up),
            &r.xattrs.join(" "),
        );
        // The merged view shows what is on disk, and st_ino did not move.
        let a = fx.attr(r.target).expect("attr after");
        assert_eq!(a.perm, um.mode() & 0o7777, "{case}: merged mode");
        assert_eq!((a.uid, a.gid), (um.uid(), um.gid()), "{case}: merged owner");
        assert_eq!(
            (a.mtime.tv_sec, a.mtime.tv_nsec),
            (um.mtime(), um.mtime_nsec()),
            "{case}: merged mtime"
        );
        assert_eq!(a.ino, before.ino, "{case}: st_ino changed by copy-up");
        // Parents: copied first, each with its own mode, owner, times and xattrs.
        let mut anc = Path::new(r.target).parent();
        while let Some(p) = anc.filter(|p| !p.as_os_str().is_empty()) {
            let rel = p.to_str().expect("utf8");
            let (u, l) = (fx.up(rel), fx.low(0, rel));
            let (um, lm) = (
                std::fs::symlink_metadata(&u).expect("parent up"),
                std::fs::symlink_metadata(&l).expect("parent low"),
            );
            assert_eq!(um.mode(), lm.mode(), "{case}: mode of parent {rel}");
            assert_eq!(
                (um.uid(), um.gid()),
                (lm.uid(), lm.gid()),
                "{case}: owner of parent {rel}"
            );
            assert_eq!(
                (um.mtime(), um.mtime_nsec()),
                (lm.mtime(), lm.mtime_nsec()),
                "{case}: mtime of parent {rel}"
            );
            assert_eq!(user_xattrs(&u), user_xattrs(&l), "{case}: xattrs of parent {rel}");
            anc = p.parent();
        }
        // Siblings stay below.
        let sibling = if r.target == "p/q" { "p/q/f" } else { "p/q/g" };
        assert!(!fx.up(sibling).exists(), "{case}: {sibling} was copied up too");
        fx.finish(case);
    }
}

#[test]
fn copy_up_keeps_holes_in_sparse_files() {
    let size: u64 = 64 << 20;
    let spec = format!("z s {size} 0:head 33554432:middle {}:tail", size - 4);
    let fx = Fx::new(Some(""), &[&spec]);
    fx.run_all("copy-up", "chmod s 0600");
    let (up, low) = (fx.up("s"), fx.low(0, "s"));
    let (um, lm) = (
        std::fs::metadata(&up).expect("upper"),
        std::fs::metadata(&low).expect("lower"),
    );
    assert_eq!(um.len(), size, "size");
    assert!(
        um.blocks() <= lm.blocks() + 64,
        "holes filled: upper has {} blocks, lower {}",
        um.blocks(),
        lm.blocks()
    );
    let id = fx.id("s").expect("lookup");
    assert_eq!(
        fx.u.getattr(id, None).expect("getattr").blocks,
        um.blocks(),
        "st_blocks shown"
    );
    let fh = fx.u.open(&ROOT, id, libc::O_RDONLY).expect("open");
    for (off, want) in [
        (0u64, &b"head"[..]),
        (33554432, b"middle"),
        (size - 4, b"tail"),
        (4096, &[0u8; 6][..]),
    ] {
        assert_eq!(
            fx.u.read(fh, off, want.len() as u32).expect("read"),
            want,
            "data at {off}"
        );
    }
    assert_eq!(
        fx.u.lseek(fh, 0, libc::SEEK_HOLE).expect("SEEK_HOLE"),
        4096,
        "first hole"
    );
    fx.u.release(fh);
    fx.finish("sparse");
}
