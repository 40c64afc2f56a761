//! `verlay verify` and `verlay layer seal`.
use std::ffi::OsString;

use crate::error::{Error, Result};

/// `verlay verify [--store DIR] LAYER... | --store DIR --all`: 0 clean, 1 damage found.
pub fn verify(args: Vec<OsString>) -> Result<u8> {
    let _ = args;
    Err(Error::usage("verlay verify", "not implemented in this version", "see verlay --help"))
}

/// `verlay layer seal DIR`.
pub fn seal(args: Vec<OsString>) -> Result<()> {
    let _ = args;
    Err(Error::usage("verlay layer seal", "not implemented in this version", "see verlay --help"))
}
