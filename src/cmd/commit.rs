//! `verlay commit MOUNTPOINT --store DIR [--parent CHAIN_ID] [--output layer.tar]`: the
//! words after `commit` into [`CommitArgs`], and the result printed (the chain ID and the
//! diffID on stdout, the pause on stderr). The commit itself is [`crate::commit::commit`].
use std::ffi::OsString;
use std::path::PathBuf;

use crate::commit::{commit, CommitArgs};
use crate::error::{Error, Result};

/// Usage of the command, repeated in its argument errors.
pub const USAGE: &str = "verlay commit MOUNTPOINT --store DIR [--parent CHAIN_ID] [--output layer.tar]";

fn usage(why: impl Into<String>) -> Error {
    Error::usage("verlay commit", why, format!("usage: {USAGE}"))
}

/// Parse `verlay commit ...` (the words after `commit`).
pub fn parse(args: &[OsString]) -> Result<CommitArgs> {
    let mut mountpoint = None;
    let mut store = None;
    let mut parent = None;
    let mut output = None;
    let mut it = args.iter();
    let mut only_positional = false;
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if only_positional || !s.starts_with("--") {
            if mountpoint.replace(PathBuf::from(a)).is_some() {
                return Err(usage("expected one MOUNTPOINT"));
            }
            continue;
        }
        if s == "--" {
            only_positional = true;
            continue;
        }
        let (name, inline) = match s.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(OsString::from(v))),
            None => (s.to_string(), None),
        };
        let slot = match name.as_str() {
            "--store" => &mut store,
            "--parent" => &mut parent,
            "--output" => &mut output,
            _ => return Err(usage(format!("unknown option {name}"))),
        };
        let v = match inline {
            Some(v) => v,
            None => it
                .next()
                .cloned()
                .ok_or_else(|| usage(format!("{name} needs a value")))?,
        };
        *slot = Some(v);
    }
    let mountpoint = mountpoint.ok_or_else(|| usage("MOUNTPOINT is required"))?;
    let store = store.ok_or_else(|| usage("--store DIR is required"))?;
    Ok(CommitArgs {
        mountpoint,
        store: PathBuf::from(store),
        parent: parent.map(|p| p.to_string_lossy().into_owned()),
        output: output.map(PathBuf::from),
    })
}

/// `verlay commit ...`: commit, then print the chain ID and the diffID.
pub fn run(args: Vec<OsString>) -> Result<()> {
    if matches!(
        args.first().and_then(|a| a.to_str()),
        Some("-h" | "--help" | "help")
    ) {
        println!("{USAGE}");
        return Ok(());
    }
    let a = parse(&args)?;
    let c = commit(&a, &crate::progress::Progress::new(crate::progress::Mode::Auto))?;
    eprintln!(
        "verlay commit: writers paused for {:.3} ms ({} entries, {} bytes of file data copied)",
        c.paused_us as f64 / 1000.0,
        c.entries,
        c.bytes
    );
    println!("chain_id {}", c.chain_id);
    println!("diff_id {}", c.diff_id);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_is_parsed_or_refused() {
        let os = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        let a = parse(&os(&[
            "/m",
            "--store",
            "/s",
            "--parent=sha256:ab",
            "--output",
            "o.tar",
        ]))
        .unwrap();
        assert_eq!(a.mountpoint, PathBuf::from("/m"));
        assert_eq!(a.store, PathBuf::from("/s"));
        assert_eq!(a.parent.as_deref(), Some("sha256:ab"));
        assert_eq!(a.output, Some(PathBuf::from("o.tar")));
        let a = parse(&os(&["--store", "/s", "--", "--odd-mountpoint"])).unwrap();
        assert_eq!(a.mountpoint, PathBuf::from("--odd-mountpoint"));
        for (args, why) in [
            (&["/m"][..], "--store DIR is required"),
            (&["--store", "/s"][..], "MOUNTPOINT is required"),
            (&["/m", "/n", "--store", "/s"][..], "expected one MOUNTPOINT"),
            (&["/m", "--store"][..], "--store needs a value"),
            (&["/m", "--store", "/s", "--force"][..], "unknown option --force"),
        ] {
            match parse(&os(args)) {
                Err(Error::Usage { why: w, .. }) => assert_eq!(w, why, "{args:?}"),
                other => panic!("{args:?}: {other:?}"),
            }
        }
    }
}
