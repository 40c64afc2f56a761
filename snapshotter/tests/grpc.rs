//! containerd's snapshotter rules, checked over gRPC against a running `verlay-snapshotter`:
//! status codes of refused calls, label inheritance, usage without parents, field-path
//! updates, walk filters, cleanup of leftovers, and the ordering of Commit under a kill -9 at
//! every named step (a killed process keeps the page cache: this models a crash of the
//! snapshotter, not a power cut).
mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use containerd_snapshots::api::snapshots::v1::*;
use containerd_snapshots::tonic::Code;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_calls_carry_containerds_status_codes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s = Snapshotter::start(tmp.path(), None);
    let mut c = s.client().await;

    prepare(&mut c, "a", "").await.expect("prepare a");
    assert_eq!(
        code(prepare(&mut c, "a", "").await),
        Code::AlreadyExists,
        "duplicate prepare"
    );
    assert_eq!(
        code(view(&mut c, "a", "").await),
        Code::AlreadyExists,
        "view on a taken key"
    );
    assert_eq!(
        code(prepare(&mut c, "b", "nope").await),
        Code::NotFound,
        "missing parent"
    );
    assert_eq!(
        code(prepare(&mut c, "b", "a").await),
        Code::InvalidArgument,
        "active parent"
    );
    assert_eq!(code(stat(&mut c, "nope").await), Code::NotFound);
    assert_eq!(code(remove(&mut c, "nope").await), Code::NotFound);
    assert_eq!(
        code(commit(&mut c, "x", "nope", HashMap::new()).await),
        Code::NotFound
    );

    view(&mut c, "v", "").await.expect("view v");
    assert_eq!(
        code(commit(&mut c, "x", "v", HashMap::new()).await),
        Code::FailedPrecondition,
        "commit of a view"
    );
    commit(&mut c, "c1", "a", HashMap::new()).await.expect("commit a");
    prepare(&mut c, "a2", "c1").await.expect("prepare a2");
    assert_eq!(
        code(commit(&mut c, "c1", "a2", HashMap::new()).await),
        Code::AlreadyExists,
        "commit onto a taken name"
    );
    let mounts = c.mounts(MountsRequest {
        snapshotter: "verlay".into(),
        key: "c1".into(),
    });
    assert_eq!(
        code(mounts.await),
        Code::FailedPrecondition,
        "mounts of a committed snapshot"
    );
    // the refused calls changed nothing
    assert_eq!(walk(&mut c, &[]).await.expect("walk"), ["a2", "c1", "v"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_seals_the_layer_and_inherits_only_snapshot_labels() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s = Snapshotter::start(tmp.path(), None);
    let mut c = s.client().await;

    let l = labels(&[
        ("containerd.io/snapshot/keep", "1"),
        ("containerd.io/gc.root", "drop"),
    ]);
    let m = prepare_labels(&mut c, "a", "", l).await.expect("prepare");
    assert_eq!(m[0].options, ["rbind", "rw"]);
    let fs = bind_source(&m);
    write_layer(&fs);
    let active_usage = usage(&mut c, "a").await;
    assert_eq!(active_usage.1, 4, "root, etc, etc/motd, big");

    commit(&mut c, "c1", "a", labels(&[("new", "2")]))
        .await
        .expect("commit");
    assert_eq!(
        code(stat(&mut c, "a").await),
        Code::NotFound,
        "commit removes the active key"
    );
    let info = stat(&mut c, "c1").await.expect("stat c1");
    assert_eq!(info.kind, 3, "committed");
    assert_eq!(info.parent, "");
    assert_eq!(
        info.labels,
        labels(&[("containerd.io/snapshot/keep", "1"), ("new", "2")])
    );
    assert_eq!(
        usage(&mut c, "c1").await,
        active_usage,
        "usage recorded at commit"
    );

    // sealed: a manifest beside the layer whose digest the record names
    let manifest = verlay::lower::manifest::Manifest::open_beside(&fs)
        .expect("open manifest")
        .expect("a committed layer has a manifest");
    manifest.check().expect("manifest intact");
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fs.parent().expect("dir").join("layer.json")).expect("layer.json"),
    )
    .expect("json");
    assert_eq!(record["manifest_digest"], manifest.digest());
    assert!(manifest.lookup(Path::new("etc/motd")).expect("lookup").is_some());
    assert!(
        !fs.parent().expect("dir").join("work").exists(),
        "workdir of a committed snapshot removed"
    );

    // a child is a verlay mount over the parent; its usage excludes the parent
    let m = prepare(&mut c, "b", "c1").await.expect("prepare b");
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].r#type, "fuse3.verlay");
    let upper = m[0]
        .options
        .iter()
        .find_map(|o| o.strip_prefix("upperdir="))
        .expect("upperdir");
    assert!(m[0].options.iter().any(|o| o.starts_with("workdir=")));
    assert_eq!(
        m[0].options.iter().find_map(|o| o.strip_prefix("lowerdir=")),
        Some(fs.to_str().expect("utf-8"))
    );
    assert!(
        m[0].options.iter().any(|o| o == "verify=require"),
        "committed lowers are always verified: {m:?}"
    );
    assert_eq!(usage(&mut c, "b").await.1, 1, "only the child's own root dir");
    std::fs::write(Path::new(upper).join("x"), b"x").expect("write upper");
    commit(&mut c, "c2", "b", HashMap::new()).await.expect("commit b");
    let info = stat(&mut c, "c2").await.expect("stat c2");
    assert_eq!(info.parent, "c1");

    // a view of committed layers is a read-only verlay mount (verified), lowers top first
    let m = view(&mut c, "v", "c2").await.expect("view");
    assert_eq!(m[0].r#type, "fuse3.verlay");
    let lowers = m[0]
        .options
        .iter()
        .find_map(|o| o.strip_prefix("lowerdir="))
        .expect("lowerdir");
    assert_eq!(lowers, format!("{}:{}", Path::new(upper).display(), fs.display()));
    assert!(!m[0].options.iter().any(|o| o.starts_with("upperdir=")));
    assert!(m[0].options.iter().any(|o| o == "verify=require"), "{m:?}");
    let again = c
        .mounts(MountsRequest {
            snapshotter: "verlay".into(),
            key: "v".into(),
        })
        .await
        .expect("mounts")
        .into_inner()
        .mounts;
    assert_eq!(again, m, "Mounts returns what View returned");
    assert_eq!(stat(&mut c, "v").await.expect("stat v").kind, 1, "view");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_with_children_cannot_be_removed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s = Snapshotter::start(tmp.path(), None);
    let mut c = s.client().await;
    prepare(&mut c, "a", "").await.expect("prepare");
    commit(&mut c, "c1", "a", HashMap::new()).await.expect("commit");
    prepare(&mut c, "b", "c1").await.expect("prepare child");
    view(&mut c, "v", "c1").await.expect("view child");
    assert_eq!(code(remove(&mut c, "c1").await), Code::FailedPrecondition);
    remove(&mut c, "b").await.expect("remove b");
    assert_eq!(
        code(remove(&mut c, "c1").await),
        Code::FailedPrecondition,
        "the view is a child too"
    );
    remove(&mut c, "v").await.expect("remove v");
    remove(&mut c, "c1").await.expect("remove c1");
    assert_eq!(walk(&mut c, &[]).await.expect("walk"), Vec::<String>::new());
    assert_eq!(
        s.snapshot_dirs(),
        Vec::<String>::new(),
        "directories removed with their records"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_follows_field_paths_and_walk_filters() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s = Snapshotter::start(tmp.path(), None);
    let mut c = s.client().await;
    prepare_labels(&mut c, "a", "", labels(&[("x", "1"), ("y", "2")]))
        .await
        .expect("prepare");
    let update = |labels: HashMap<String, String>, paths: &[&str]| UpdateSnapshotRequest {
        snapshotter: "verlay".into(),
        info: Some(Info {
            name: "a".into(),
            labels,
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: paths.iter().map(|p| p.to_string()).collect(),
        }),
    };
    // labels.y absent from the request: removed; labels.z present: set; x untouched
    let got = c
        .update(update(
            labels(&[("z", "3"), ("x", "ignored")]),
            &["labels.y", "labels.z"],
        ))
        .await
        .expect("update")
        .into_inner()
        .info
        .expect("info");
    assert_eq!(got.labels, labels(&[("x", "1"), ("z", "3")]));
    assert_eq!(got.kind, 2, "kind unchanged");
    // "labels" replaces them all
    c.update(update(labels(&[("only", "1")]), &["labels"]))
        .await
        .expect("update all");
    assert_eq!(
        stat(&mut c, "a").await.expect("stat").labels,
        labels(&[("only", "1")])
    );
    let bad = c.update(update(HashMap::new(), &["parent"])).await;
    assert_eq!(code(bad), Code::InvalidArgument, "parent is immutable");

    commit(&mut c, "c1", "a", labels(&[("containerd.io/gc.root", "t")]))
        .await
        .expect("commit");
    prepare(&mut c, "b", "c1").await.expect("prepare b");
    assert_eq!(walk(&mut c, &["kind==committed"]).await.expect("walk"), ["c1"]);
    assert_eq!(walk(&mut c, &["parent==c1"]).await.expect("walk"), ["b"]);
    assert_eq!(
        walk(&mut c, &[r#"labels."containerd.io/gc.root""#])
            .await
            .expect("walk"),
        ["c1"]
    );
    assert_eq!(
        walk(&mut c, &["kind==active", "name==c1"]).await.expect("walk"),
        ["b", "c1"]
    );
    assert_eq!(code(walk(&mut c, &["name~=c.*"]).await), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_removes_directories_no_record_names() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s = Snapshotter::start(tmp.path(), None);
    let mut c = s.client().await;
    prepare(&mut c, "a", "").await.expect("prepare");
    let orphan = s.root.join("snapshots/999/fs/etc");
    std::fs::create_dir_all(&orphan).expect("mkdir orphan");
    std::fs::write(orphan.join("f"), b"x").expect("write");
    c.cleanup(CleanupRequest {
        snapshotter: "verlay".into(),
    })
    .await
    .expect("cleanup");
    assert_eq!(
        s.snapshot_dirs(),
        ["1"],
        "the orphan is gone, the live snapshot stays"
    );
    stat(&mut c, "a").await.expect("a is intact");
}

/// kill -9 at each named step of Commit, restart: before `commit.db` the active snapshot is
/// intact and no committed one exists; after it, the layer is committed and sealed. Either
/// way the commit can be done (again) and the result is whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_commit_leaves_the_active_snapshot_or_a_sealed_layer() {
    for (step, committed) in [
        ("commit.syncfs", false),
        ("commit.seal", false),
        ("commit.record", false),
        ("commit.db", true),
    ] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let fs = {
            let mut s = Snapshotter::start(tmp.path(), Some(step));
            let mut c = s.client().await;
            let fs = bind_source(&prepare(&mut c, "a", "").await.expect("prepare"));
            write_layer(&fs);
            let r = commit(&mut c, "c1", "a", HashMap::new()).await;
            assert!(
                r.is_err(),
                "{step}: the commit call must fail when the process dies"
            );
            s.wait_dead();
            fs
        };
        let s = Snapshotter::start(tmp.path(), None);
        let mut c = s.client().await;
        if committed {
            assert_eq!(code(stat(&mut c, "a").await), Code::NotFound, "{step}");
            assert_eq!(stat(&mut c, "c1").await.expect("c1").kind, 3, "{step}");
        } else {
            assert_eq!(
                stat(&mut c, "a").await.expect("a").kind,
                2,
                "{step}: still active"
            );
            assert_eq!(
                code(stat(&mut c, "c1").await),
                Code::NotFound,
                "{step}: nothing half-committed"
            );
            commit(&mut c, "c1", "a", HashMap::new())
                .await
                .expect("commit again");
        }
        let m = verlay::lower::manifest::Manifest::open_beside(&fs)
            .expect("manifest")
            .expect("a committed layer is sealed");
        let problems = verlay::lower::manifest::scrub(&fs, &m, &mut |_, _| {}).expect("scrub");
        assert!(problems.is_empty(), "{step}: {problems:?}");
    }
}

/// kill -9 between a Prepare's mkdir and its record: after a restart the key does not exist
/// and the directory is gone (startup runs Cleanup).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_prepare_leaves_no_snapshot_and_no_directory() {
    let tmp = tempfile::tempdir().expect("tempdir");
    {
        let mut s = Snapshotter::start(tmp.path(), Some("create.mkdir"));
        let mut c = s.client().await;
        assert!(prepare(&mut c, "a", "").await.is_err());
        s.wait_dead();
        assert_eq!(s.snapshot_dirs(), ["1"], "the crash left the directory behind");
    }
    let s = Snapshotter::start(tmp.path(), None);
    let mut c = s.client().await;
    assert_eq!(code(stat(&mut c, "a").await), Code::NotFound);
    assert_eq!(
        s.snapshot_dirs(),
        Vec::<String>::new(),
        "startup cleanup removed it"
    );
    prepare(&mut c, "a", "").await.expect("the key is free");
}

#[test]
fn a_second_snapshotter_on_the_same_root_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let _s = Snapshotter::start(tmp.path(), None);
    let out = Command::new(env!("CARGO_BIN_EXE_verlay-snapshotter"))
        .arg("--root")
        .arg(tmp.path().join("root"))
        .arg("--address")
        .arg(tmp.path().join("other.sock"))
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another verlay snapshotter"), "{err}");
}
