//! The gannet engine: one executor per core accepts mail over ESMTP, makes it durable
//! in the shard's spool before acknowledging it, and delivers it over SMTP from the
//! shard that owns the destination site. `gannetd` (src/main.rs) is its command line;
//! benchmarks link the library to measure its parts. ARCHITECTURE.md maps the code.

pub mod admin;
pub mod cluster;
pub mod delivery;
pub mod dkim;
pub mod dns;
pub mod events;
pub mod feedback;
pub mod hose;
pub mod inbox;
pub mod ingress;
pub mod io;
pub mod jobs;
pub mod json;
pub mod limits;
pub mod live;
pub mod merge;
pub mod mesh;
pub mod metrics;
pub mod notes;
pub mod policy;
pub mod registry;
pub mod runtime;
pub mod services;
pub mod shard;
pub mod storage;
pub mod suppression;
pub mod timer;
pub mod tls;

#[cfg(test)]
#[path = "../tests/peers/support.rs"]
mod test_peers;
pub mod warmup;
