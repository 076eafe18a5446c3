//! The spool storage a shard runs on: files in production, or the spool crate's
//! simulated disk, which lets in-process tests make fdatasync fail under a real SMTP
//! session. Dispatch is one `match` per segment operation (create, sync, remove), not
//! per message byte.

use std::rc::Rc;

use gannet_spool::segment::Segment;
use gannet_spool::{FileStorage, SimStorage, SpoolError, Storage};

/// One per shard, made at start and never moved after: the file variant's size
/// (a few hundred bytes) costs nothing, and boxing it would add a pointer hop to
/// every segment operation.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum ShardStorage {
    File(FileStorage),
    /// Only tests build this variant.
    #[cfg_attr(not(test), allow(dead_code))]
    Sim(SimStorage),
}

impl Storage for ShardStorage {
    fn list(&self) -> Result<Vec<u64>, SpoolError> {
        match self {
            ShardStorage::File(s) => s.list(),
            ShardStorage::Sim(s) => s.list(),
        }
    }

    fn create(&self, seq: u64, shard: u16, len: usize) -> Result<Rc<Segment>, SpoolError> {
        match self {
            ShardStorage::File(s) => s.create(seq, shard, len),
            ShardStorage::Sim(s) => s.create(seq, shard, len),
        }
    }

    fn open(&self, seq: u64) -> Result<Rc<Segment>, SpoolError> {
        match self {
            ShardStorage::File(s) => s.open(seq),
            ShardStorage::Sim(s) => s.open(seq),
        }
    }

    fn sync_slots(&self) -> usize {
        match self {
            ShardStorage::File(s) => s.sync_slots(),
            ShardStorage::Sim(s) => s.sync_slots(),
        }
    }

    async fn sync(&self, segment: &Segment, slot: usize) -> Result<(), SpoolError> {
        match self {
            ShardStorage::File(s) => s.sync(segment, slot).await,
            ShardStorage::Sim(s) => s.sync(segment, slot).await,
        }
    }

    fn publishing(&self) -> Option<u64> {
        match self {
            ShardStorage::File(s) => s.publishing(),
            ShardStorage::Sim(s) => s.publishing(),
        }
    }

    fn created_unprepared(&self) -> u64 {
        match self {
            ShardStorage::File(s) => s.created_unprepared(),
            ShardStorage::Sim(s) => s.created_unprepared(),
        }
    }

    async fn prepare_next(&self, seq: u64, shard: u16, len: usize) {
        match self {
            ShardStorage::File(s) => s.prepare_next(seq, shard, len).await,
            ShardStorage::Sim(s) => s.prepare_next(seq, shard, len).await,
        }
    }

    async fn remove(&self, seq: u64) -> Result<(), SpoolError> {
        match self {
            ShardStorage::File(s) => s.remove(seq).await,
            ShardStorage::Sim(s) => s.remove(seq).await,
        }
    }
}
