//! gannet's durable spool.
//!
//! Each shard owns a directory of fixed-size, preallocated segment files, maps them and
//! appends records (message, update, tombstone) to the newest one. Appends are staged in
//! memory and written into the page cache in one `pwrite` per batch, on the spool's
//! writer thread; durability comes from group commit — one fdatasync through io_uring
//! for every batch of appends — and an append is reported durable only after the sync
//! that covers it returned. At start-up a shard recovers its live messages,
//! with their exact retry state, from its segments; afterwards the engine never reads
//! the spool except for message bodies, which it reads in place from the mapping.
//!
//! Code map: [`record`] (format and checksums), [`segment`] (the mapped bytes: the only
//! `unsafe`), [`storage`] (files, or a fault-injecting simulated disk), [`spool`]
//! (writer, group commit, index, space), [`recovery`] (scan and rebuild), [`id`].

pub mod durable;
pub mod error;
pub mod record;
pub mod recovery;
pub mod segment;
pub mod spool;
pub mod storage;

pub use error::SpoolError;
/// Message ids live in gannet-core, below the spool, so that the queues (also in
/// gannet-core) can name messages; the spool re-exports them.
pub use gannet_core::id;
pub use id::{IdGenerator, MessageId};
pub use record::{MessageRecord, Record, TombstoneRecord, UpdateRecord};
pub use recovery::{RecordLoc, RecoveryReport, SegmentReport, scan_segment};
pub use spool::{
    LATENCY_BOUNDS_US, LatencyCounts, LiveMessage, MaintenanceReport, MessageRef, Recovered,
    RetryState, Spool, SpoolConfig, SpoolStats, Ticket, latency_bucket,
};
pub use storage::{
    CrashMode, FileStorage, LOCK_FILE_NAME, SPARE_FILE_NAME, SimStorage, Storage, segment_file_name,
};
