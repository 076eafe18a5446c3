//! Where segments live: the [`Storage`] trait, the real implementation on files
//! ([`FileStorage`]) and a simulated disk that injects faults ([`SimStorage`]).
//!
//! Everything above this trait (writer, group commit, recovery, compaction) is the same
//! code in production and in fault-injection tests.

mod file;
mod sim;

use std::future::Future;
use std::rc::Rc;

pub use file::{FileStorage, LOCK_FILE_NAME, SPARE_FILE_NAME, segment_file_name};
pub use sim::{CrashMode, SimStorage};

use crate::error::SpoolError;
use crate::segment::Segment;

/// A shard's set of segments on some medium.
pub trait Storage {
    /// The sequence numbers of the segments present, ascending.
    fn list(&self) -> Result<Vec<u64>, SpoolError>;

    /// Creates segment `seq` with `len` bytes of preallocated capacity, its header
    /// already written and durable. A full disk is [`SpoolError::NoSpace`]; nothing is
    /// left behind on failure.
    fn create(&self, seq: u64, shard: u16, len: usize) -> Result<Rc<Segment>, SpoolError>;

    /// Opens segment `seq` for reading its whole capacity (recovery, inspection).
    fn open(&self, seq: u64) -> Result<Rc<Segment>, SpoolError>;

    /// How many syncs of one segment may be in flight at once: `sync` calls with
    /// different `slot`s (below this) may overlap.
    fn sync_slots(&self) -> usize;

    /// Makes every byte written to `segment` so far durable (fdatasync). May be called
    /// while appends continue; those are not covered. Each slot must report every
    /// write-back error that happens after the segment was created, independently of
    /// the other slots (on Linux: one open file description per slot, opened before
    /// any data was written — errors are reported once per description).
    fn sync(&self, segment: &Segment, slot: usize) -> impl Future<Output = Result<(), SpoolError>>;

    /// Gets segment `seq` of `len` bytes ready ahead of time, so that a later `create`
    /// with the same arguments does no blocking work and its syncs are cheaper (see
    /// `file.rs`). May do nothing. A prepared segment that is never created must
    /// read as an empty segment. No default body, so that a storage wrapping another
    /// cannot forget to forward it.
    fn prepare_next(&self, seq: u64, shard: u16, len: usize) -> impl Future<Output = ()>;

    /// The segment `prepare_next` is publishing under its number right now, off the
    /// executor (None when none is): `create` of that number could meet the file
    /// half made, so a rotation takes the number after it.
    fn publishing(&self) -> Option<u64>;

    /// Segments `create` had to make itself, on the shard's executor, because none
    /// was prepared for it (0 for a storage with nothing to prepare).
    fn created_unprepared(&self) -> u64;

    /// Deletes segment `seq`; mappings already handed out stay readable.
    fn remove(&self, seq: u64) -> impl Future<Output = Result<(), SpoolError>>;
}

/// Wall-clock unix milliseconds.
pub(crate) fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
