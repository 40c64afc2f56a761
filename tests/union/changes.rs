//! Changes as tables of ops, each checked in the merged view, on disk (kernel format) and after a
//! remount: the whiteouts and opaque dirs left by unlink/rmdir/mkdir, rename with redirects,
//! NOREPLACE, EXCHANGE and errnos.

use super::*;

struct Case<'a> {
    case: &'a str,
    upper: &'a str,
    lowers: &'a [&'a str],
    /// `op args [=> ERRNO]; ...`
    ops: &'a str,
    /// merged tree after the ops
    merged: &'a str,
    /// upper on disk after the ops
    disk: &'a str,
}

fn run_cases(cases: &[Case]) {
    for c in cases {
        let mut fx = Fx::new(Some(c.upper), c.lowers);
        fx.run_all(c.case, c.ops);
        assert_tokens(&format!("{}: merged view", c.case), &fx.merged(), c.merged);
        assert_tokens(
            &format!("{}: upper on disk", c.case),
            &disk_tree(fx.upper.as_ref().expect("upper")),
            c.disk,
        );
        fx.finish(c.case);
        fx.remount();
        assert_tokens(
            &format!("{}: merged view after remount", c.case),
            &fx.merged(),
            c.merged,
        );
    }
}

#[test]
fn unlink_and_rmdir_leave_whiteouts_exactly_where_a_lower_name_would_show() {
    run_cases(&[
        Case {
            case: "unlink a lower file",
            upper: "",
            lowers: &["f a=1; f b=2"],
            ops: "unlink a",
            merged: "b=2",
            disk: "a(wh)",
        },
        Case {
            case: "unlink an upper-only file leaves no whiteout",
            upper: "f a=1",
            lowers: &["f b=2"],
            ops: "unlink a",
            merged: "b=2",
            disk: "",
        },
        Case {
            case: "unlink an upper file over a lower one",
            upper: "f a=up",
            lowers: &["f a=low"],
            ops: "unlink a",
            merged: "",
            disk: "a(wh)",
        },
        Case {
            case: "unlink a file only in the bottom lower",
            upper: "",
            lowers: &["f b=1", "f a=1"],
            ops: "unlink a",
            merged: "b=1",
            disk: "a(wh)",
        },
        Case {
            case: "unlink deep copies up the parents only",
            upper: "",
            lowers: &["f a/b/c=1; f a/b/d=2"],
            ops: "unlink a/b/c",
            merged: "a/ a/b/ a/b/d=2",
            disk: "a/ a/b/ a/b/c(wh)",
        },
        Case {
            case: "unlink symlink and fifo",
            upper: "",
            lowers: &["s l->x; p f"],
            ops: "unlink l; unlink f",
            merged: "",
            disk: "l(wh) f(wh)",
        },
        Case {
            case: "rmdir an empty lower dir",
            upper: "",
            lowers: &["d d"],
            ops: "rmdir d",
            merged: "",
            disk: "d(wh)",
        },
        Case {
            case: "rmdir a non-empty merged dir",
            upper: "f d/u=1",
            lowers: &["f d/x=1"],
            ops: "rmdir d => ENOTEMPTY",
            merged: "d/ d/u=1 d/x=1",
            disk: "d/ d/u=1",
        },
        Case {
            case: "rmdir a non-empty lower dir changes nothing",
            upper: "",
            lowers: &["f d/x=1"],
            ops: "rmdir d => ENOTEMPTY",
            merged: "d/ d/x=1",
            disk: "",
        },
        Case {
            case: "rmdir a merged dir whose lower entries are all whited out",
            upper: "d d; w d/x; w d/y",
            lowers: &["f d/x=1; f d/y=2"],
            ops: "rmdir d",
            merged: "",
            disk: "d(wh)",
        },
        Case {
            case: "unlink every lower entry, then rmdir",
            upper: "",
            lowers: &["f d/x=1", "f d/y=2; d d/e"],
            ops: "rmdir d => ENOTEMPTY; unlink d/x; unlink d/y; rmdir d => ENOTEMPTY; rmdir d/e; rmdir d",
            merged: "",
            disk: "d(wh)",
        },
        Case {
            case: "rmdir a dir emptied by a middle layer's whiteout",
            upper: "",
            lowers: &["W d/x", "f d/x=1"],
            ops: "rmdir d",
            merged: "",
            disk: "d(wh)",
        },
        Case {
            case: "rmdir a dir emptied by a middle opaque dir",
            upper: "",
            lowers: &["o d", "f d/x=1"],
            ops: "rmdir d",
            merged: "",
            disk: "d(wh)",
        },
        Case {
            case: "rmdir an upper-only dir",
            upper: "d n",
            lowers: &["f a=1"],
            ops: "rmdir n",
            merged: "a=1",
            disk: "",
        },
        Case {
            case: "errnos",
            upper: "",
            lowers: &["f a=1; d d"],
            ops: "unlink d => EISDIR; rmdir a => ENOTDIR; unlink b => ENOENT; rmdir b => ENOENT; \
                  unlink a; unlink a => ENOENT",
            merged: "d/",
            disk: "a(wh)",
        },
    ]);
}

#[test]
fn creating_over_a_whiteout_never_brings_back_the_lower_object() {
    run_cases(&[
        Case {
            case: "mkdir over a whiteout makes an opaque dir",
            upper: "",
            lowers: &["f d/x=1"],
            ops: "unlink d/x; rmdir d; mkdir d",
            merged: "d/",
            disk: "d/(opaque)",
        },
        Case {
            case: "mkdir over a whiteout that was on disk already",
            upper: "w d",
            lowers: &["f d/x=1"],
            ops: "mkdir d; create d/y=2",
            merged: "d/ d/y=2",
            disk: "d/(opaque) d/y=2",
        },
        Case {
            case: "mkdir where a lower file was",
            upper: "",
            lowers: &["f d=file"],
            ops: "unlink d; mkdir d",
            merged: "d/",
            disk: "d/(opaque)",
        },
        Case {
            case: "mkdir of a new name is not opaque",
            upper: "",
            lowers: &["f a=1"],
            ops: "mkdir n",
            merged: "a=1 n/",
            disk: "n/",
        },
        Case {
            case: "re-created file starts empty",
            upper: "",
            lowers: &["f a=old"],
            ops: "unlink a; create a",
            merged: "a=",
            disk: "a=",
        },
        Case {
            case: "re-created file holds only the new data",
            upper: "",
            lowers: &["f a=old-and-long"],
            ops: "unlink a; create a=new",
            merged: "a=new",
            disk: "a=new",
        },
        Case {
            case: "a file where a lower dir was",
            upper: "",
            lowers: &["d d"],
            ops: "rmdir d; create d=f",
            merged: "d=f",
            disk: "d=f",
        },
        Case {
            case: "symlink and fifo over whiteouts",
            upper: "",
            lowers: &["f a=1; f b=2"],
            ops: "unlink a; symlink a target; unlink b; mknod b",
            merged: "a->target b(fifo)",
            disk: "a->target b(fifo)",
        },
        Case {
            case: "names that exist give EEXIST",
            upper: "",
            lowers: &["f a=1; d d"],
            ops: "create a=x => EEXIST; mkdir a => EEXIST; mkdir d => EEXIST; symlink d t => EEXIST; \
                  mknod a => EEXIST; link a d => EEXIST",
            merged: "a=1 d/",
            disk: "",
        },
        Case {
            case: "a whiteout cannot be made through the union",
            upper: "",
            lowers: &["f a=1"],
            ops: "mkwhiteout n => EPERM",
            merged: "a=1",
            disk: "",
        },
        Case {
            case: "link to a lower file copies it up",
            upper: "",
            lowers: &["f a=1"],
            ops: "link a b",
            merged: "a=1 b=1",
            disk: "a=1 b=1",
        },
        Case {
            case: "link over a whiteout",
            upper: "",
            lowers: &["f a=1; f b=old"],
            ops: "unlink b; link a b",
            merged: "a=1 b=1",
            disk: "a=1 b=1",
        },
    ]);
}

#[test]
fn rename_follows_kernel_overlayfs_with_redirect_dir() {
    run_cases(&[
        Case {
            case: "lower file within a dir",
            upper: "",
            lowers: &["f a=1"],
            ops: "rename a b",
            merged: "b=1",
            disk: "a(wh) b=1",
        },
        Case {
            case: "upper-only file leaves no whiteout",
            upper: "f a=1",
            lowers: &["f c=3"],
            ops: "rename a b",
            merged: "b=1 c=3",
            disk: "b=1",
        },
        Case {
            case: "lower file between dirs",
            upper: "",
            lowers: &["f d1/a=1; d d2"],
            ops: "rename d1/a d2/b",
            merged: "d1/ d2/ d2/b=1",
            disk: "d1/ d1/a(wh) d2/ d2/b=1",
        },
        Case {
            case: "over an existing lower file",
            upper: "",
            lowers: &["f a=1; f b=2"],
            ops: "rename a b",
            merged: "b=1",
            disk: "a(wh) b=1",
        },
        Case {
            case: "upper-only file over a lower file",
            upper: "f a=1",
            lowers: &["f b=2"],
            ops: "rename a b",
            merged: "b=1",
            disk: "b=1",
        },
        Case {
            case: "onto a whited-out name",
            upper: "",
            lowers: &["f a=1; f b=2"],
            ops: "unlink b; rename a b noreplace",
            merged: "b=1",
            disk: "a(wh) b=1",
        },
        Case {
            case: "lower dir in the same parent gets a relative redirect",
            upper: "",
            lowers: &["f d/x=1; f d/sub/y=2"],
            ops: "rename d e",
            merged: "e/ e/x=1 e/sub/ e/sub/y=2",
            disk: "d(wh) e/(redirect=d)",
        },
        Case {
            case: "lower dir to another parent gets an absolute redirect",
            upper: "",
            lowers: &["f a/d/x=1; d p"],
            ops: "rename a/d p/e",
            merged: "a/ p/ p/e/ p/e/x=1",
            disk: "a/ a/d(wh) p/ p/e/(redirect=/a/d)",
        },
        Case {
            case: "merged dir keeps both parts",
            upper: "f d/u=up",
            lowers: &["f d/x=l0", "f d/y=l1"],
            ops: "rename d e",
            merged: "e/ e/u=up e/x=l0 e/y=l1",
            disk: "d(wh) e/(redirect=d) e/u=up",
        },
        Case {
            case: "renamed twice, changed in between",
            upper: "",
            lowers: &["f d/x=1; f d/y=2; d p"],
            ops: "rename d e; unlink e/x; create e/z=3; rename e p/f",
            merged: "p/ p/f/ p/f/y=2 p/f/z=3",
            disk: "d(wh) p/ p/f/(redirect=/d) p/f/x(wh) p/f/z=3",
        },
        Case {
            case: "renamed twice in the same parent keeps the first redirect",
            upper: "",
            lowers: &["f d/x=1"],
            ops: "rename d e; rename e f",
            merged: "f/ f/x=1",
            disk: "d(wh) f/(redirect=d)",
        },
        Case {
            case: "copy-up inside a renamed dir reads the old path",
            upper: "",
            lowers: &["f d/x=1"],
            ops: "rename d e; chmod e/x 0600",
            merged: "e/ e/x=1",
            disk: "d(wh) e/(redirect=d) e/x=1",
        },
        Case {
            case: "rmdir of a renamed dir emptied of its lower entries",
            upper: "",
            lowers: &["f d/x=1"],
            ops: "rename d e; rmdir e => ENOTEMPTY; unlink e/x; rmdir e",
            merged: "",
            disk: "d(wh)",
        },
        Case {
            case: "dir onto an empty lower dir",
            upper: "",
            lowers: &["f d/x=1; d e"],
            ops: "rename d e",
            merged: "e/ e/x=1",
            disk: "d(wh) e/(redirect=d)",
        },
        Case {
            case: "upper-only dir into a merged parent over a whiteout is opaque",
            upper: "",
            lowers: &["f e/z=1"],
            ops: "unlink e/z; rmdir e; mkdir n; create n/a=1; rename n e",
            merged: "e/ e/a=1",
            disk: "e/(opaque) e/a=1",
        },
        Case {
            case: "NOREPLACE onto an existing name",
            upper: "f u=1",
            lowers: &["f a=1; f b=2; d d"],
            ops: "rename a b noreplace => EEXIST; rename u b noreplace => EEXIST; rename d b noreplace => EEXIST",
            merged: "a=1 b=2 d/ u=1",
            disk: "u=1",
        },
        Case {
            case: "EXCHANGE two lower files",
            upper: "",
            lowers: &["f a=1; f b=2"],
            ops: "rename a b exchange",
            merged: "a=2 b=1",
            disk: "a=2 b=1",
        },
        Case {
            case: "EXCHANGE a file with a lower dir",
            upper: "",
            lowers: &["f a=1; f d/x=2"],
            ops: "rename a d exchange",
            merged: "a/ a/x=2 d=1",
            disk: "a/(redirect=d) d=1",
        },
        Case {
            case: "EXCHANGE with a missing name",
            upper: "",
            lowers: &["f a=1"],
            ops: "rename a b exchange => ENOENT",
            merged: "a=1",
            disk: "",
        },
        Case {
            case: "dir onto a non-empty dir",
            upper: "",
            lowers: &["f d/x=1; f e/y=2"],
            ops: "rename d e => ENOTEMPTY",
            merged: "d/ d/x=1 e/ e/y=2",
            disk: "",
        },
        Case {
            case: "dir onto a file, file onto a dir",
            upper: "",
            lowers: &["f a=1; d d"],
            ops: "rename d a => ENOTDIR; rename a d => EISDIR",
            merged: "a=1 d/",
            disk: "",
        },
        Case {
            case: "missing source",
            upper: "",
            lowers: &["f a=1"],
            ops: "rename b c => ENOENT; rename a/b c => ENOTDIR",
            merged: "a=1",
            disk: "",
        },
    ]);
}
