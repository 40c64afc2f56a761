//! The command-line layer of the subcommands: parsing words into the typed arguments the
//! domain modules take, and printing what they return. No domain logic here.
pub mod commit;
