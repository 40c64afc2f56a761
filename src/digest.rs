//! Digests as verlay writes and reads them: lower-case hex, and content ids in the OCI
//! form `sha256:HEX` (layer diffIDs and chain IDs, blob and manifest digests, manifest
//! chunk digests in messages).
//!
//! Owns: the one hex encoder, the `sha256:` prefix, and what a valid sha256 id is.
//! Must not: know where digests are used (the store's layout, the registry's API).

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The algorithm prefix of an OCI content id.
pub const SHA256_PREFIX: &str = "sha256:";
/// Hex digits of a sha256 (32 bytes).
pub const SHA256_HEX_LEN: usize = 64;

/// Lower-case hex of some bytes.
pub fn hex(d: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(d.len() * 2);
    for b in d {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

/// `sha256:HEX` of a finished sha256 (the 32 bytes a hasher returns).
pub fn sha256_id(raw: &[u8]) -> String {
    format!("{SHA256_PREFIX}{}", hex(raw))
}

/// `sha256:HEX` of some bytes.
pub fn sha256_digest(bytes: &[u8]) -> String {
    sha256_id(&Sha256::digest(bytes))
}

/// The hex part of a `sha256:HEX` id (a bare hex id as it is).
pub fn hex_part(id: &str) -> &str {
    id.strip_prefix(SHA256_PREFIX).unwrap_or(id)
}

/// Is `s` the canonical hex of a sha256: 64 lower-case hex digits, no prefix?
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == SHA256_HEX_LEN
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Normalise a `sha256:HEX` (or bare 64-hex, either case) id to `sha256:` and lower-case
/// hex; `what` names it in the error.
pub fn parse_digest(s: &str, what: &str) -> Result<String> {
    let hexpart = hex_part(s);
    if hexpart.len() == SHA256_HEX_LEN && hexpart.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(format!("{SHA256_PREFIX}{}", hexpart.to_ascii_lowercase()))
    } else {
        Err(Error::usage(
            format!("{what} \"{s}\""),
            "not a sha256 digest",
            "give it as sha256: followed by 64 hex digits",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_lower_case_and_complete() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        assert_eq!(hex(&[]), "");
    }

    #[test]
    fn sha256_of_known_input() {
        // sha256("abc"), FIPS 180-2 appendix B.1
        assert_eq!(
            sha256_digest(b"abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn ids_are_normalised_or_refused() {
        let lower = "ab".repeat(32);
        let want = format!("sha256:{lower}");
        for ok in [want.clone(), lower.clone(), format!("sha256:{}", "AB".repeat(32))] {
            assert_eq!(parse_digest(&ok, "x").unwrap(), want, "{ok}");
        }
        for bad in ["", "sha256:", "sha256:abc", &"g".repeat(64), &"a".repeat(65)] {
            match parse_digest(bad, "x") {
                Err(Error::Usage { why, .. }) => assert_eq!(why, "not a sha256 digest"),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        assert!(is_sha256_hex(&lower));
        assert!(!is_sha256_hex(&"AB".repeat(32)), "canonical hex is lower case");
        assert!(!is_sha256_hex(&want), "no prefix");
        assert_eq!(hex_part(&want), lower);
        assert_eq!(hex_part(&lower), lower);
    }
}
