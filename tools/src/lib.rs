//! Operator tools for gannet. The `gannet-spool` command's logic lives here so that it
//! can be tested without spawning it.

pub mod spool_inspect;
