//! `verlay layer import|path|ls|seal` and `verlay image import`.
use std::ffi::OsString;

use crate::error::{Error, Result};

/// `verlay layer SUBCOMMAND ...`.
pub fn layer(args: Vec<OsString>) -> Result<()> {
    if args.first().map(|a| a == "seal").unwrap_or(false) {
        return crate::lower::cmd::seal(args[1..].to_vec());
    }
    Err(Error::usage("verlay layer", "not implemented in this version", "see verlay --help"))
}

/// `verlay image SUBCOMMAND ...`.
pub fn image(args: Vec<OsString>) -> Result<()> {
    let _ = args;
    Err(Error::usage("verlay image", "not implemented in this version", "see verlay --help"))
}
