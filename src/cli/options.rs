//! `-o` option strings: libfuse `fuse_opt` splitting and escapes, each option applied to
//! [`OverlayOptions`], the rules that span several options, and the limits on values.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::Error;

use super::help::{FSTAB_ONLY_OPTIONS, FUSE_FLAG_OPTIONS, FUSE_VALUE_OPTIONS};
use super::*;

/// Command-line flags that can also be spelled as `-o` options.
#[derive(Default)]
pub(super) struct HelperFlags {
    pub(super) debug: bool,
}

/// Parse every `-o` string, in order, into one [`OverlayOptions`], then check the rules
/// that span several options (lowerdir present, upperdir and workdir together).
pub(super) fn parse_options(
    strings: &[OsString],
    cwd: &Path,
    helper: &mut HelperFlags,
) -> Result<OverlayOptions, Error> {
    let mut opts = OverlayOptions::default();
    // fsync=1 after volatile must not turn fsync back on, so keep them apart until the end.
    let mut fsync_option = true;
    for string in strings {
        for raw in split_unescaped(string.as_bytes(), b',') {
            if raw.is_empty() {
                continue;
            }
            apply_option(&mut opts, &mut fsync_option, helper, raw, cwd)?;
        }
    }
    opts.fsync = fsync_option && !opts.volatile;

    if opts.lowerdirs.len() > MAX_LOWERS {
        return Err(Error::usage(
            "lowerdir",
            format!(
                "{} lower layers; at most {MAX_LOWERS} are allowed (kernel overlayfs's limit)",
                opts.lowerdirs.len()
            ),
            "merge layers (verlay commit) or mount fewer",
        ));
    }
    if opts.lowerdirs.is_empty() {
        return Err(Error::usage(
            "lowerdir",
            "missing",
            "give at least one lower layer: -o lowerdir=/path[:/path...]",
        ));
    }
    upper_work_pair(opts.upperdir.as_deref(), opts.workdir.as_deref())?;
    Ok(opts)
}

/// upperdir and workdir go together: both (returned), or neither (a read-only mount). The
/// one check of the pairing, for the parser and for a hand-built [`MountArgs`]
/// ([`crate::config`]).
pub fn upper_work_pair<'a>(
    upper: Option<&'a Path>,
    work: Option<&'a Path>,
) -> crate::error::Result<Option<(&'a Path, &'a Path)>> {
    match (upper, work) {
        (Some(upper), Some(work)) => Ok(Some((upper, work))),
        (None, None) => Ok(None),
        (Some(upper), None) => Err(Error::usage(
            format!("upperdir \"{}\"", upper.display()),
            "given without workdir",
            "add -o workdir=DIR on the same filesystem, or drop upperdir for a read-only mount",
        )),
        (None, Some(work)) => Err(Error::usage(
            format!("workdir \"{}\"", work.display()),
            "given without upperdir",
            "add -o upperdir=DIR, or drop workdir for a read-only mount",
        )),
    }
}

/// Apply one non-empty raw option (escapes still in place) to `opts`.
fn apply_option(
    opts: &mut OverlayOptions,
    fsync_option: &mut bool,
    helper: &mut HelperFlags,
    raw: &[u8],
    cwd: &Path,
) -> Result<(), Error> {
    let shown = String::from_utf8_lossy(&unescape(raw)).into_owned();
    let (name, value) = match raw.iter().position(|&b| b == b'=') {
        Some(eq) => (&raw[..eq], Some(&raw[eq + 1..])),
        None => (raw, None),
    };
    // A name that is not UTF-8 cannot be one of ours.
    let Ok(name) = std::str::from_utf8(name) else {
        opts.ignored.push(shown);
        return Ok(());
    };
    let opt = OptionText {
        name,
        value,
        shown: &shown,
    };

    match name {
        "lowerdir" => opts.lowerdirs = opt.path_list(cwd)?,
        "lowerdir+" => opts.lowerdirs.push(opt.path(cwd)?),
        "upperdir" => opts.upperdir = Some(opt.path(cwd)?),
        "workdir" => opts.workdir = Some(opt.path(cwd)?),
        "volatile" => {
            opt.flag()?;
            opts.volatile = true;
        }
        "fsync" => *fsync_option = opt.bool01()?,
        "volatile_recover" => {
            opt.flag()?;
            opts.volatile_recover = true;
        }
        "writeback" => opts.writeback = opt.bool01()?,
        "passthrough" => opts.passthrough = opt.bool01()?,
        "io_uring" => {
            opts.io_uring = match opt.text()?.as_str() {
                "auto" => IoUring::Auto,
                "on" | "1" => IoUring::On,
                "off" | "0" => IoUring::Off,
                _ => {
                    return Err(opt.error(
                        "expected auto, on or off",
                        "write io_uring=auto, io_uring=on or io_uring=off",
                    ))
                }
            }
        }
        "uidmapping" => opts.uid_mappings = opt.mappings()?,
        "gidmapping" => opts.gid_mappings = opt.mappings()?,
        "squash_to_root" => {
            opt.flag()?;
            opts.squash_to_root = true;
        }
        "squash_to_uid" => opts.squash_to_uid = Some(opt.id()?),
        "squash_to_gid" => opts.squash_to_gid = Some(opt.id()?),
        "xattr_permissions" => opts.xattr_permissions = opt.xattr_permissions()?,
        "verify" => opts.verify = opt.verify()?,
        "redirect_dir" => opts.redirect_dir = opt.redirect_dir()?,
        "static_nlink" => {
            opt.flag()?;
            opts.static_nlink = true;
        }
        "noacl" => {
            opt.flag()?;
            opts.noacl = true;
        }
        "noxattrs" => opts.noxattrs = opt.bool01()?,
        "fast_ino" => opts.fast_ino = opt.bool01()?,
        "timeout" => opts.timeout = Some(opt.timeout()?),
        "threaded" => opts.threads = opt.threads()?,
        "debug" => {
            opt.flag()?;
            helper.debug = true;
        }
        "plugins" => {
            // fuse-overlayfs loads data-source plugins from these paths; serving the raw
            // directory instead would show different content, so refuse rather than ignore.
            return Err(Error::usage(
                format!("-o {shown}"),
                "verlay has no layer plugins",
                "remove the plugins= option; layers must be plain directories",
            ));
        }
        _ if value.is_none() && FUSE_FLAG_OPTIONS.contains(&name) => {
            opts.fuse_options.push(shown);
        }
        _ if value.is_some() && FUSE_VALUE_OPTIONS.contains(&name) => {
            opts.fuse_options.push(shown);
        }
        _ if (value.is_none() && FSTAB_ONLY_OPTIONS.contains(&name))
            || name.starts_with("x-")
            || name == "comment" => {}
        _ => opts.ignored.push(shown),
    }
    Ok(())
}

/// One option being parsed, for error messages that quote it as the user wrote it.
struct OptionText<'a> {
    name: &'a str,
    /// The raw value after the first `=`, escapes still in place.
    value: Option<&'a [u8]>,
    /// The whole option, unescaped, lossily decoded: what error messages show.
    shown: &'a str,
}

impl OptionText<'_> {
    fn what(&self) -> String {
        format!("-o {}", self.shown)
    }

    fn error(&self, why: impl Into<String>, fix: impl Into<String>) -> Error {
        Error::usage(self.what(), why, fix)
    }

    /// A bare option such as `volatile`: a value is a mistake, not something to guess at.
    fn flag(&self) -> Result<(), Error> {
        match self.value {
            None => Ok(()),
            Some(_) => Err(self.error("takes no value", format!("write just `{}`", self.name))),
        }
    }

    /// The value, required and non-empty, escapes kept.
    fn raw_value(&self) -> Result<&[u8], Error> {
        match self.value {
            Some(v) if !v.is_empty() => Ok(v),
            _ => Err(self.error("needs a value", format!("write {}=VALUE", self.name))),
        }
    }

    /// The value unescaped as text; non-UTF-8 cannot be a number or a keyword.
    fn text(&self) -> Result<String, Error> {
        let raw = self.raw_value()?;
        String::from_utf8(unescape(raw)).map_err(|_| self.error("value is not valid UTF-8", "fix the value"))
    }

    fn path(&self, cwd: &Path) -> Result<PathBuf, Error> {
        let raw = self.raw_value()?;
        Ok(resolve(cwd, unescape(raw)))
    }

    /// A `:`-separated list of paths; `\:` keeps a colon inside a path.
    fn path_list(&self, cwd: &Path) -> Result<Vec<PathBuf>, Error> {
        let raw = self.raw_value()?;
        let mut paths = Vec::new();
        for (i, piece) in split_unescaped(raw, b':').into_iter().enumerate() {
            if piece.is_empty() {
                // Kernel 6.5+ reads `::` as the start of data-only layers; we have none,
                // and an empty path from a stray colon must not silently mean the cwd.
                return Err(self.error(
                    format!("path {} of the list is empty", i + 1),
                    "remove the stray `:` (data-only layers `::` are not supported); \
                     escape a colon inside a path as \\:",
                ));
            }
            paths.push(resolve(cwd, unescape(piece)));
        }
        Ok(paths)
    }

    fn bool01(&self) -> Result<bool, Error> {
        match self.text()?.as_str() {
            "0" => Ok(false),
            "1" => Ok(true),
            _ => Err(self.error(
                "expected 0 or 1",
                format!("write {}=0 or {}=1", self.name, self.name),
            )),
        }
    }

    /// A uid or gid. `-1` is what chown(2) uses for "unchanged", never an owner.
    fn id(&self) -> Result<u32, Error> {
        let text = self.text()?;
        match parse_decimal_u32(&text) {
            Some(id) if id != u32::MAX => Ok(id),
            Some(_) => Err(self.error(
                "4294967295 is (uid_t)-1, which chown(2) reads as \"unchanged\"",
                "give a real id, e.g. 0",
            )),
            None => Err(self.error(
                "not an id (a decimal number from 0 to 4294967294)",
                format!("write {}=N, e.g. {}=0", self.name, self.name),
            )),
        }
    }

    fn xattr_permissions(&self) -> Result<u8, Error> {
        match self.text()?.as_str() {
            "0" => Ok(0),
            "1" => Ok(1),
            "2" => Ok(2),
            _ => Err(self.error(
                "expected 0, 1 or 2",
                "0 off, 1 trusted.overlay.override_stat, 2 user.containers.override_stat",
            )),
        }
    }

    fn verify(&self) -> Result<VerifyMode, Error> {
        match self.text()?.as_str() {
            "on" => Ok(VerifyMode::On),
            "off" => Ok(VerifyMode::Off),
            "require" => Ok(VerifyMode::Require),
            _ => Err(self.error(
                "expected on, off or require",
                "write verify=on, verify=off or verify=require",
            )),
        }
    }

    fn redirect_dir(&self) -> Result<RedirectDir, Error> {
        match self.text()?.as_str() {
            "off" => Ok(RedirectDir::Off),
            "follow" => Ok(RedirectDir::Follow),
            "nofollow" => Ok(RedirectDir::NoFollow),
            "on" => Ok(RedirectDir::On),
            _ => Err(self.error(
                "expected off, follow, nofollow or on",
                "write e.g. redirect_dir=off",
            )),
        }
    }

    /// Seconds, fractional allowed, as fuse-overlayfs's strtod.
    fn timeout(&self) -> Result<Duration, Error> {
        let text = self.text()?;
        text.parse::<f64>()
            .ok()
            .filter(|secs| *secs <= MAX_TIMEOUT_SECS)
            .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
            .ok_or_else(|| {
                self.error(
                    format!("not a number of seconds from 0 to {MAX_TIMEOUT_SECS:.0}"),
                    "write timeout=SECONDS, e.g. timeout=1.5",
                )
            })
    }

    fn threads(&self) -> Result<Option<usize>, Error> {
        let text = self.text()?;
        let n = parse_decimal_u32(&text)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| {
                self.error(
                    "not a number of threads",
                    "write threaded=N, e.g. threaded=4 (0: single-threaded)",
                )
            })?;
        if n > MAX_THREADS {
            return Err(self.error(
                format!(
                    "{n} threads is more than the {MAX_THREADS} allowed (each holds a /dev/fuse descriptor)"
                ),
                format!("write threaded=N with N from 0 to {MAX_THREADS}, e.g. threaded=4"),
            ));
        }
        Ok(match n {
            // fuse-overlayfs: threaded=0 is its single-threaded loop and threaded=1
            // its multi-threaded loop with libfuse's default thread count.
            0 => Some(1),
            1 => None,
            n => Some(n),
        })
    }

    /// `C:H:L[:C:H:L...]`, optionally with a leading `:` (podman's form).
    fn mappings(&self) -> Result<Vec<IdMapping>, Error> {
        let text = self.text()?;
        let body = text.strip_prefix(':').unwrap_or(&text);
        let fix = format!(
            "write {}=CONTAINER:HOST:LENGTH[:CONTAINER:HOST:LENGTH...], e.g. {}=0:100000:65536",
            self.name, self.name
        );
        let fields: Vec<&str> = body.split(':').collect();
        if body.is_empty() || fields.len() % 3 != 0 {
            return Err(self.error(
                format!(
                    "{} numbers; a mapping is a multiple of three (container:host:length)",
                    if body.is_empty() { 0 } else { fields.len() }
                ),
                fix,
            ));
        }
        if fields.len() / 3 > MAX_MAPPINGS {
            return Err(self.error(
                format!(
                    "{} ranges; at most {MAX_MAPPINGS} are allowed (the kernel's limit for an id map)",
                    fields.len() / 3
                ),
                fix,
            ));
        }
        let mut mappings: Vec<IdMapping> = Vec::with_capacity(fields.len() / 3);
        for triple in fields.chunks_exact(3) {
            let mut numbers = [0u32; 3];
            for (slot, field) in numbers.iter_mut().zip(triple) {
                *slot = parse_decimal_u32(field).ok_or_else(|| {
                    self.error(
                        format!("{field:?} is not an id (a decimal number below 2^32)"),
                        fix.clone(),
                    )
                })?;
            }
            let [container, host, len] = numbers;
            let mapping = IdMapping { container, host, len };
            if len == 0 {
                return Err(self.error(format!("range {container}:{host}:0 has length 0"), fix.clone()));
            }
            // Ids are 32 bits: a range must end at or before 2^32.
            let limit = 1u64 << 32;
            if u64::from(container) + u64::from(len) > limit || u64::from(host) + u64::from(len) > limit {
                return Err(self.error(
                    format!("range {container}:{host}:{len} runs past the largest id"),
                    fix.clone(),
                ));
            }
            // Overlapping ranges would make an id map two ways; the kernel refuses such
            // user-namespace maps too.
            if let Some(other) = mappings.iter().find(|m| overlaps(m, &mapping)) {
                return Err(self.error(
                    format!(
                        "ranges {}:{}:{} and {container}:{host}:{len} overlap",
                        other.container, other.host, other.len
                    ),
                    fix.clone(),
                ));
            }
            mappings.push(mapping);
        }
        Ok(mappings)
    }
}

/// True when two mappings share a container id or a host id.
fn overlaps(a: &IdMapping, b: &IdMapping) -> bool {
    let intersect = |a0: u32, b0: u32| {
        let (a0, b0) = (u64::from(a0), u64::from(b0));
        a0 < b0 + u64::from(b.len) && b0 < a0 + u64::from(a.len)
    };
    intersect(a.container, b.container) || intersect(a.host, b.host)
}

/// Decimal digits only: `str::parse` would also take a leading `+`.
fn parse_decimal_u32(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Most worker threads `threaded=N` may ask for. Each one holds its own /dev/fuse clone fd,
/// so a count near the descriptor limit (1024 by default) made the daemon die with EMFILE
/// after the mount was made, leaving a dead mount; 256 is far more than the CPUs of any
/// machine this serves and leaves the rest of the limit to the layers.
pub const MAX_THREADS: usize = 256;
/// Longest `timeout=` in seconds (about 31 years): longer is forever to a cache, and the
/// bound keeps every addition to a clock or to jiffies from overflowing.
pub const MAX_TIMEOUT_SECS: f64 = 1e9;
/// Most lower layers: kernel overlayfs's own limit (OVL_MAX_STACK). Each one holds open
/// directory fds for the whole mount.
pub const MAX_LOWERS: usize = 500;
/// Most ranges in one `uidmapping=` / `gidmapping=`: the kernel's limit for a user
/// namespace map (/proc/PID/uid_map takes 340 extents).
pub const MAX_MAPPINGS: usize = 340;

/// Split on `sep` where it is not preceded by an escaping backslash. Escapes stay in the
/// pieces, so that an option can be split on `,` and its value again on `:`.
pub(super) fn split_unescaped(s: &[u8], sep: u8) -> Vec<&[u8]> {
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'\\' {
            i += 2;
        } else if s[i] == sep {
            pieces.push(&s[start..i]);
            i += 1;
            start = i;
        } else {
            i += 1;
        }
    }
    pieces.push(&s[start.min(s.len())..]);
    pieces
}

/// Drop escaping backslashes: `\x` is `x` (libfuse's rule). A lone trailing backslash
/// escapes nothing and is kept.
pub(super) fn unescape(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.iter();
    while let Some(&b) = bytes.next() {
        if b == b'\\' {
            out.push(*bytes.next().unwrap_or(&b'\\'));
        } else {
            out.push(b);
        }
    }
    out
}

/// Anchor a path at `cwd` if it is relative. Lexical only: symlinks are resolved later,
/// by [`crate::config`], against the filesystem the caller meant.
pub(super) fn resolve(cwd: &Path, bytes: Vec<u8>) -> PathBuf {
    let path = PathBuf::from(OsString::from_vec(bytes));
    if path.is_absolute() {
        path
    } else {
        cwd.join(path)
    }
}
