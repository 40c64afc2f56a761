//! POSIX ACLs where the union must act for the caller: the mode and access ACL a new object
//! gets from its parent's default ACL (the kernel's `posix_acl_create`), and whether the
//! caller may keep a setgid bit (`in_group_or_capable`, `privs_to_kill`). Pure, apart from reading the
//! caller's credentials from /proc.
//!
//! The upper filesystem does the rest (mode <-> access ACL on chmod and setxattr), since the
//! ACLs live there as the `system.posix_acl_*` xattrs of the upper objects.

use crate::union::Ctx;

/// Access ACL xattr: the ACL checked on access; its owner, group (or mask) and other
/// entries are the mode's permission bits.
pub const POSIX_ACL_ACCESS: &str = "system.posix_acl_access";
/// Default ACL xattr of a directory: what new entries inherit.
pub const POSIX_ACL_DEFAULT: &str = "system.posix_acl_default";
/// Both names share this prefix.
pub const POSIX_ACL_PREFIX: &str = "system.posix_acl_";

/// The xattr form's version (linux/posix_acl_xattr.h POSIX_ACL_XATTR_VERSION).
const XATTR_VERSION: u32 = 2;
/// Header: the version; each entry: tag (u16), perm (u16), id (u32), little endian.
const HEADER: usize = 4;
const ENTRY: usize = 8;
/// Entry tags (linux/posix_acl.h).
const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const GROUP: u16 = 0x08;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;
/// Capability number of CAP_FSETID (linux/capability.h).
const CAP_FSETID: u32 = 4;

/// What `posix_acl_create` gives a new object made with `mode` under a default ACL
/// (`default_acl`, the parent's xattr value): the new mode, and the access ACL to store
/// (None when it says no more than the mode). None when the value is not a valid ACL
/// (then the caller's umask applies, as without an ACL).
pub fn create_masq(default_acl: &[u8], mode: u32) -> Option<(u32, Option<Vec<u8>>)> {
    if default_acl.len() < HEADER
        || (default_acl.len() - HEADER) % ENTRY != 0
        || u32::from_le_bytes(default_acl[..4].try_into().ok()?) != XATTR_VERSION
    {
        return None;
    }
    let mut acl = default_acl.to_vec();
    let n = (acl.len() - HEADER) / ENTRY;
    let perm_at = |i: usize| HEADER + i * ENTRY + 2;
    let tag =
        |acl: &[u8], i: usize| u16::from_le_bytes([acl[HEADER + i * ENTRY], acl[HEADER + i * ENTRY + 1]]);
    let get = |acl: &[u8], i: usize| u16::from_le_bytes([acl[perm_at(i)], acl[perm_at(i) + 1]]) as u32;
    let set = |acl: &mut [u8], i: usize, v: u32| {
        acl[perm_at(i)..perm_at(i) + 2].copy_from_slice(&(v as u16).to_le_bytes())
    };
    // posix_acl_create_masq (fs/posix_acl.c), entry by entry.
    let mut m = mode;
    let (mut group_obj, mut mask_obj, mut not_equiv) = (None, None, false);
    for i in 0..n {
        match tag(&acl, i) {
            USER_OBJ => {
                let p = get(&acl, i) & ((m >> 6) | !0o7);
                set(&mut acl, i, p);
                m &= (p << 6) | !0o700;
            }
            USER | GROUP => not_equiv = true,
            GROUP_OBJ => group_obj = Some(i),
            OTHER => {
                let p = get(&acl, i) & (m | !0o7);
                set(&mut acl, i, p);
                m &= p | !0o7;
            }
            MASK => {
                mask_obj = Some(i);
                not_equiv = true;
            }
            _ => return None,
        }
    }
    let g = mask_obj.or(group_obj)?;
    let p = get(&acl, g) & ((m >> 3) | !0o7);
    set(&mut acl, g, p);
    m &= (p << 3) | !0o070;
    let new_mode = (mode & !0o777) | (m & 0o777);
    Some((new_mode, not_equiv.then_some(acl)))
}

/// The kernel's `in_group_or_capable` for the caller of a request: is it in group `gid`
/// (its fsgid or a supplementary group) or does it hold CAP_FSETID? Read from
/// /proc/PID/status; a request without a caller (pid 0) or one whose status is gone is
/// treated as capable, leaving the mode as it is.
pub fn in_group_or_capable(ctx: &Ctx, gid: u32) -> bool {
    if ctx.gid == gid {
        return true;
    }
    let (in_group, capable) = caller_creds(ctx, gid);
    in_group || capable
}

/// The setuid and setgid bits that a write, truncate or fallocate by the caller removes
/// from a regular file of `mode` and group `gid`: the kernel's `should_remove_suid` with
/// `setattr_should_drop_sgid` (Linux 6.2+), which kernel overlayfs applies with the
/// caller's credentials (`file_remove_privs` on the overlay file). Setuid always; setgid
/// when the file is group-executable or the caller is outside its group; nothing for a
/// caller with CAP_FSETID. The FUSE kernel module without HANDLE_KILLPRIV checks only
/// setuid and group-executable setgid (`fuse_setattr`), so the daemon must do this itself.
/// Reads /proc only when `mode` has one of the bits.
pub fn privs_to_kill(ctx: &Ctx, mode: u32, gid: u32) -> u32 {
    if mode & libc::S_IFMT != libc::S_IFREG || mode & (libc::S_ISUID | libc::S_ISGID) == 0 {
        return 0;
    }
    let (in_group, capable) = caller_creds(ctx, gid);
    if capable {
        return 0;
    }
    let mut kill = mode & libc::S_ISUID;
    if mode & libc::S_ISGID != 0 && (mode & libc::S_IXGRP != 0 || !(in_group || ctx.gid == gid)) {
        kill |= libc::S_ISGID;
    }
    kill
}

/// The setuid and setgid bits that a chown(2) by the caller (any owner and group, -1 included)
/// removes from an object of `mode` and group `gid`: the kernel's `chown_common`, which asks for
/// ATTR_KILL_SUID and `setattr_should_drop_sgid` on every non-directory (fifos and device
/// nodes too, not only regular files as a write does). Setuid always; setgid when the object
/// is group-executable or the caller is outside its group without CAP_FSETID. A non-owner
/// without CAP_FOWNER may not make that change (setattr_prepare: EPERM).
pub fn chown_privs_to_kill(ctx: &Ctx, mode: u32, gid: u32) -> u32 {
    if mode & libc::S_IFMT == libc::S_IFDIR || mode & (libc::S_ISUID | libc::S_ISGID) == 0 {
        return 0;
    }
    let mut kill = mode & libc::S_ISUID;
    if mode & libc::S_ISGID != 0 && (mode & libc::S_IXGRP != 0 || !in_group_or_capable(ctx, gid)) {
        kill |= libc::S_ISGID;
    }
    kill
}

/// Is the caller of a request inside chown(2) (chown, fchown, lchown, fchownat), from
/// /proc/PID/syscall (PID: the calling thread, as FUSE sends it)? None when that cannot be
/// read (no caller, the thread gone, no permission), or a 32-bit caller's numbers.
///
/// With FUSE_HANDLE_KILLPRIV_V2, chown(-1, -1) and the kernel's `file_remove_privs` before a
/// write arrive as the same empty SETATTR (no FATTR_FH, FATTR_CTIME or FATTR_KILL_SUIDGID
/// in either, measured on Linux 6.18): only the syscall the caller is blocked in tells
/// them apart.
pub fn caller_in_chown(ctx: &Ctx) -> Option<bool> {
    if ctx.pid == 0 {
        return None;
    }
    // "NR arg1 ... sp pc" while blocked in a syscall (here: waiting for this reply).
    let text = std::fs::read_to_string(format!("/proc/{}/syscall", ctx.pid)).ok()?;
    let nr: libc::c_long = text.split_whitespace().next()?.parse().ok()?;
    #[cfg(target_arch = "x86_64")]
    if nr == libc::SYS_chown || nr == libc::SYS_lchown {
        return Some(true);
    }
    Some(nr == libc::SYS_fchown || nr == libc::SYS_fchownat)
}

/// (in group `gid` by a supplementary group, holds CAP_FSETID) for the caller, from
/// /proc/PID/status; (true, true) for a request without a caller (pid 0) or one whose
/// status is gone, so that nothing is removed for it.
fn caller_creds(ctx: &Ctx, gid: u32) -> (bool, bool) {
    if ctx.pid == 0 {
        return (true, true);
    }
    let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", ctx.pid)) else {
        return (true, true);
    };
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or("")
    };
    let in_group = field("Groups:")
        .split_whitespace()
        .any(|g| g.parse::<u32>() == Ok(gid));
    let capable = u64::from_str_radix(field("CapEff:"), 16).is_ok_and(|c| c & (1 << CAP_FSETID) != 0);
    (in_group, capable)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        let mut v = XATTR_VERSION.to_le_bytes().to_vec();
        for (t, p, id) in entries {
            v.extend_from_slice(&t.to_le_bytes());
            v.extend_from_slice(&p.to_le_bytes());
            v.extend_from_slice(&id.to_le_bytes());
        }
        v
    }

    #[test]
    fn create_masq_matches_the_kernel() {
        let u = u32::MAX;
        let minimal = acl(&[(USER_OBJ, 7, u), (GROUP_OBJ, 7, u), (OTHER, 7, u)]);
        // (default ACL, requested mode, new mode, access ACL stored)
        type Case<'a> = (&'a [u8], u32, u32, Option<Vec<u8>>);
        let cases: &[Case] = &[
            (&minimal, 0o40777, 0o40777, None),
            (&minimal, 0o100666, 0o100666, None),
            (&minimal, 0o102755, 0o102755, None),
            (
                &acl(&[(USER_OBJ, 6, u), (GROUP_OBJ, 4, u), (OTHER, 0, u)]),
                0o100666,
                0o100640,
                None,
            ),
            (
                &acl(&[
                    (USER_OBJ, 7, u),
                    (USER, 7, 1000),
                    (GROUP_OBJ, 5, u),
                    (MASK, 7, u),
                    (OTHER, 5, u),
                ]),
                0o40750,
                0o40750,
                Some(acl(&[
                    (USER_OBJ, 7, u),
                    (USER, 7, 1000),
                    (GROUP_OBJ, 5, u),
                    (MASK, 5, u),
                    (OTHER, 0, u),
                ])),
            ),
        ];
        for (i, (d, mode, want_mode, want_acl)) in cases.iter().enumerate() {
            let (m, a) = create_masq(d, *mode).unwrap();
            assert_eq!((m, &a), (*want_mode, want_acl), "case {i}: mode {m:o}");
        }
        assert_eq!(create_masq(b"\x01\0\0\0", 0o644), None);
        assert_eq!(create_masq(&minimal[..10], 0o644), None);
    }

    #[test]
    fn a_caller_in_the_group_or_without_pid_keeps_setgid() {
        let ctx = Ctx {
            uid: 1000,
            gid: 1000,
            pid: 0,
            umask: 0,
        };
        assert!(in_group_or_capable(&ctx, 5));
        let me = Ctx {
            pid: std::process::id(),
            ..ctx
        };
        assert!(in_group_or_capable(&me, 1000));
    }
}
