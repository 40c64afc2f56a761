//! `verlay demo`: mounts a bundled two-layer example with an upper and shows, step by step,
//! the merged view, a copy-up, a whiteout, a directory rename, a corrupt lower caught, and a
//! commit of the upper into a new layer, then unmounts.
//!
//! The example layers are built into the binary and written to a fresh temporary
//! directory, so the demo runs from anywhere and changes nothing else on the machine.
//! The lower layers use the OCI forms (`.wh.NAME`, `.wh..wh..opq`) that image layers carry;
//! the upper is written in kernel overlayfs format.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// (layer, path, content); a path ending in '/' is a directory.
const EXAMPLE: &[(&str, &str, &str)] = &[
    ("base", "etc/", ""),
    ("base", "etc/motd", "Welcome to the base layer.\n"),
    (
        "base",
        "etc/remove-me",
        "This file is deleted by the app layer.\n",
    ),
    ("base", "etc/hosts", "127.0.0.1 localhost\n"),
    ("base", "opaque/", ""),
    (
        "base",
        "opaque/from-base",
        "hidden by the app layer's opaque marker\n",
    ),
    ("base", "srv/", ""),
    ("base", "srv/data/", ""),
    ("base", "srv/data/records.txt", "1 alpha\n2 beta\n"),
    ("base", "opt/", ""),
    (
        "base",
        "opt/report.txt",
        "quarterly report: all figures verified\n",
    ),
    ("app", "etc/", ""),
    (
        "app",
        "etc/motd",
        "Welcome to the app layer (replaces base's motd).\n",
    ),
    ("app", "etc/.wh.remove-me", ""),
    ("app", "opaque/", ""),
    ("app", "opaque/.wh..wh..opq", ""),
    ("app", "opaque/from-app", "the only file visible in /opaque\n"),
    ("app", "bin/", ""),
    ("app", "bin/hello", "#!/bin/sh\necho hello from the app layer\n"),
];

/// The demo's directory (`dir`: the layers, upper, work, store) and its mount; Drop unmounts
/// if still mounted and removes the directory.
struct Demo {
    dir: PathBuf,
    mnt: PathBuf,
    mounted: bool,
    /// This binary, run for the mount, `verify` and `commit`.
    exe: PathBuf,
    /// The daemon's log (`VERLAY_LOG_FILE`).
    log: PathBuf,
}

impl Drop for Demo {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("fusermount3").arg("-u").arg(&self.mnt).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn io<T>(what: &'static str, p: &Path, r: std::io::Result<T>) -> Result<T> {
    r.map_err(|e| Error::io(what, p, e))
}

fn show_tree(title: &str, root: &Path) -> Result<()> {
    println!("  {title}:");
    let mut stack = vec![root.to_path_buf()];
    let mut lines = Vec::new();
    while let Some(d) = stack.pop() {
        let mut names: Vec<_> = io("readdir", &d, std::fs::read_dir(&d))?
            .filter_map(|e| e.ok())
            .collect();
        names.sort_by_key(|e| e.file_name());
        for e in names {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap_or(&p).display().to_string();
            let md = io("lstat", &p, std::fs::symlink_metadata(&p))?;
            use std::os::unix::fs::{FileTypeExt, MetadataExt};
            let ft = md.file_type();
            let what = if ft.is_dir() {
                stack.push(p.clone());
                "dir".to_string()
            } else if ft.is_char_device() && md.rdev() == 0 {
                "whiteout (char 0/0)".to_string()
            } else {
                format!("{} bytes", md.len())
            };
            lines.push(format!("    /{rel:<28} {what}"));
        }
    }
    lines.sort();
    for l in lines {
        println!("{l}");
    }
    Ok(())
}

fn read(p: &Path) -> Result<String> {
    io("read", p, std::fs::read_to_string(p))
}

/// Run the demo: one named step after another, each printing what it shows.
pub fn run() -> Result<()> {
    let mut demo = Demo::create()?;
    demo.seal()?;
    demo.mount()?;
    demo.merged_view()?;
    demo.copy_up()?;
    demo.whiteout()?;
    demo.rename_dir()?;
    demo.corrupt_lower()?;
    println!("\n6. The upper, in kernel overlayfs format (mountable by `mount -t overlay` too):");
    show_tree("upper", &demo.dir.join("upper"))?;
    demo.commit()?;
    demo.unmount()
}

impl Demo {
    /// A fresh directory with the example layers, an empty upper, work and mountpoint.
    fn create() -> Result<Demo> {
        let base = std::env::temp_dir().join(format!("verlay-demo-{}", std::process::id()));
        let exe = io("current_exe", Path::new("verlay"), std::env::current_exe())?;
        let demo = Demo {
            dir: base.clone(),
            mnt: base.join("merged"),
            mounted: false,
            exe,
            log: base.join("verlay.log"),
        };
        for d in ["base", "app", "upper", "work", "merged"] {
            io("mkdir", &base.join(d), std::fs::create_dir_all(base.join(d)))?;
        }
        for (layer, path, content) in EXAMPLE {
            let p = base.join(layer).join(path);
            if path.ends_with('/') {
                io("mkdir", &p, std::fs::create_dir_all(&p))?;
            } else {
                io("write", &p, std::fs::write(&p, content))?;
            }
        }
        Ok(demo)
    }

    /// Seal both lower layers: each gets a manifest of digests beside it, and the mount
    /// checks every lower read against it.
    fn seal(&self) -> Result<()> {
        for layer in ["base", "app"] {
            let digest = crate::lower::manifest::seal(&self.dir.join(layer))?;
            println!("$ verlay layer seal {layer}   ->  {digest}");
        }
        Ok(())
    }

    /// `verlay -o lowerdir=app:base,upperdir=upper,workdir=work merged`.
    fn mount(&mut self) -> Result<()> {
        let base = &self.dir;
        let opts = format!(
            "lowerdir={}:{},upperdir={},workdir={}",
            base.join("app").display(),
            base.join("base").display(),
            base.join("upper").display(),
            base.join("work").display()
        );
        println!(
            "verlay demo: two lower layers (app over base) and an empty upper in {}\n",
            base.display()
        );
        println!("$ verlay -o {opts} {}", self.mnt.display());
        let started = Instant::now();
        let st = io(
            "spawn",
            &self.exe,
            Command::new(&self.exe)
                .arg("-o")
                .arg(&opts)
                .arg(&self.mnt)
                .env("VERLAY_LOG_FILE", &self.log)
                .status(),
        )?;
        if !st.success() {
            return Err(Error::usage(
                "verlay demo",
                "the mount failed",
                "see the message above",
            ));
        }
        self.mounted = true;
        println!(
            "  mounted in {:.0} ms\n",
            started.elapsed().as_secs_f64() * 1000.0
        );
        Ok(())
    }

    fn merged_view(&self) -> Result<()> {
        println!("1. The merged view: app's motd hides base's, etc/remove-me is whited out (OCI .wh.),");
        println!("   /opaque shows only the app layer (.wh..wh..opq):");
        show_tree("merged", &self.mnt)?;
        println!("  /etc/motd reads: {}", read(&self.mnt.join("etc/motd"))?.trim());
        Ok(())
    }

    fn copy_up(&self) -> Result<()> {
        println!("\n2. Copy-up: append a line to /srv/data/records.txt (a base-layer file).");
        let rec = self.mnt.join("srv/data/records.txt");
        {
            use std::io::Write;
            let mut f = io("open", &rec, std::fs::OpenOptions::new().append(true).open(&rec))?;
            io("write", &rec, f.write_all(b"3 gamma\n"))?;
        }
        println!("  merged /srv/data/records.txt: {:?}", read(&rec)?);
        println!(
            "  base layer's copy, untouched:  {:?}",
            read(&self.dir.join("base/srv/data/records.txt"))?
        );
        println!(
            "  upper now holds the copy:      {:?}",
            read(&self.dir.join("upper/srv/data/records.txt"))?
        );
        Ok(())
    }

    fn whiteout(&self) -> Result<()> {
        println!("\n3. Whiteout: rm /etc/hosts (a base-layer file).");
        io(
            "unlink",
            &self.mnt.join("etc/hosts"),
            std::fs::remove_file(self.mnt.join("etc/hosts")),
        )?;
        println!(
            "  merged /etc/hosts exists: {}",
            self.mnt.join("etc/hosts").exists()
        );
        println!(
            "  base layer still has it:  {}",
            self.dir.join("base/etc/hosts").exists()
        );
        Ok(())
    }

    fn rename_dir(&self) -> Result<()> {
        println!("\n4. Directory rename of a lower directory: mv /srv/data /srv/archive (no EXDEV).");
        io(
            "rename",
            &self.mnt,
            std::fs::rename(self.mnt.join("srv/data"), self.mnt.join("srv/archive")),
        )?;
        println!(
            "  merged /srv/archive/records.txt: {:?}",
            read(&self.mnt.join("srv/archive/records.txt"))?
        );
        let archive = self.dir.join("upper/srv/archive");
        let redirect =
            crate::layer::get_xattr_path(&archive, std::ffi::OsStr::new("trusted.overlay.redirect"))?.or(
                crate::layer::get_xattr_path(&archive, std::ffi::OsStr::new("user.overlay.redirect"))?,
            );
        if let Some(r) = redirect {
            println!(
                "  upper /srv/archive carries overlay.redirect = {:?}",
                String::from_utf8_lossy(&r)
            );
        }
        Ok(())
    }

    fn corrupt_lower(&self) -> Result<()> {
        println!(
            "\n5. A corrupt byte in a lower layer is caught: flip one byte of base/opt/report.txt on disk."
        );
        let lower_file = self.dir.join("base/opt/report.txt");
        let mut bytes = io("read", &lower_file, std::fs::read(&lower_file))?;
        bytes[10] ^= 0x20;
        io("write", &lower_file, std::fs::write(&lower_file, &bytes))?;
        match std::fs::read(self.mnt.join("opt/report.txt")) {
            Ok(b) => println!("  read returned {} bytes: NOT caught", b.len()),
            Err(e) => println!("  cat /opt/report.txt: {e}  (the corrupt content is never served)"),
        }
        let logged = std::fs::read_to_string(&self.log).unwrap_or_default();
        if let Some(line) = logged.lines().find(|l| l.contains("report.txt")) {
            println!(
                "  log: {}",
                line.split_once(' ').map(|x| x.1).unwrap_or(line).trim()
            );
        }
        let out = io(
            "spawn",
            &self.exe,
            Command::new(&self.exe)
                .arg("verify")
                .arg(self.dir.join("base"))
                .output(),
        )?;
        println!(
            "  $ verlay verify base   (exit {})",
            out.status.code().unwrap_or(-1)
        );
        for l in String::from_utf8_lossy(&out.stdout).lines() {
            println!("    {l}");
        }
        Ok(())
    }

    fn commit(&self) -> Result<()> {
        println!("\n7. Commit: the live upper becomes a new layer of a store (writers on the mount would");
        println!("   pause only while its data is copied), and an OCI layer tarball:");
        let store = self.dir.join("store");
        io("mkdir", &store, std::fs::create_dir_all(&store))?;
        let tarball = self.dir.join("layer.tar");
        println!(
            "$ verlay commit {} --store {} --output {}",
            self.mnt.display(),
            store.display(),
            tarball.display()
        );
        let out = io(
            "spawn",
            &self.exe,
            Command::new(&self.exe)
                .arg("commit")
                .arg(&self.mnt)
                .arg("--store")
                .arg(&store)
                .arg("--output")
                .arg(&tarball)
                .output(),
        )?;
        for l in String::from_utf8_lossy(&out.stdout)
            .lines()
            .chain(String::from_utf8_lossy(&out.stderr).lines())
        {
            println!("    {l}");
        }
        let chain = String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("chain_id sha256:").map(str::to_owned));
        if let Some(hex) = chain {
            // The whiteout of /etc/hosts and the renamed /srv/archive (whole, opaque, with a
            // whiteout at its old name) are in kernel format again once imported.
            show_tree(
                "committed layer",
                &crate::store::diff_dir_at(&store, &format!("sha256:{hex}")),
            )?;
        }
        Ok(())
    }

    fn unmount(&mut self) -> Result<()> {
        println!("\n$ fusermount3 -u {}", self.mnt.display());
        let st = io(
            "fusermount3",
            Path::new("fusermount3"),
            Command::new("fusermount3").arg("-u").arg(&self.mnt).status(),
        )?;
        self.mounted = !st.success();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && is_mounted(&self.mnt) {
            std::thread::sleep(Duration::from_millis(20));
        }
        println!("  unmounted; the example layers are unchanged, the demo directory is removed.");
        Ok(())
    }
}

fn is_mounted(p: &Path) -> bool {
    let s = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let needle = p.display().to_string();
    s.lines().any(|l| l.split(' ').nth(4) == Some(needle.as_str()))
}
