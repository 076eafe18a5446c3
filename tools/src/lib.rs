//! Operator tools for gannet. The logic of `gannet-spool` and `gannetctl` lives here
//! so that it can be tested without spawning them.

pub mod ctl;
pub mod keys;
pub mod plan;
pub mod spool_inspect;
