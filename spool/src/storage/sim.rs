//! A simulated disk for deterministic fault-injection tests.
//!
//! It keeps two images of every segment: the memory the writer appends to (the page
//! cache) and what a sync made durable (the platter). [`SimStorage::crash`] throws the
//! page cache away and returns a new storage holding only the durable images, plus, in
//! [`CrashMode::Torn`], a random subset of the unsynced sectors, the last one possibly
//! cut short — what a power cut during writeback leaves. Other faults: syncs that report
//! success but persist nothing (a lying disk), syncs that fail (EIO), bit flips at rest
//! and a disk-space limit (ENOSPC when a segment is preallocated).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use super::{Storage, now_unix_ms};
use crate::error::SpoolError;
use crate::segment::{HeapBytes, SEGMENT_HEADER_BYTES, Segment, SegmentHeader};

/// What survives a simulated crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashMode {
    /// Exactly what the last successful syncs covered.
    Clean,
    /// Plus random unsynced sectors, one possibly torn inside.
    Torn,
}

/// Sector size for torn writes.
const SECTOR_BYTES: usize = 512;

#[derive(Debug)]
struct SimSegment {
    /// The writer's memory, while the segment is open in this "boot".
    live: Option<Rc<Segment>>,
    /// What is on the simulated platter.
    durable: Vec<u8>,
}

#[derive(Debug)]
struct Disk {
    segments: BTreeMap<u64, SimSegment>,
    rng: fastrand::Rng,
    space_bytes_max: Option<u64>,
    lose_syncs: u32,
    fail_syncs: u32,
    /// Each sync yields to the executor this many times before it completes, so that
    /// appends can land while it is "in flight".
    sync_yields: u32,
    syncs: u64,
}

/// A simulated shard directory with fault injection. Cheap to clone (shared disk).
#[derive(Debug, Clone)]
pub struct SimStorage {
    disk: Rc<RefCell<Disk>>,
}

impl SimStorage {
    /// An empty disk; `seed` drives every random choice (torn sectors).
    pub fn new(seed: u64) -> SimStorage {
        SimStorage {
            disk: Rc::new(RefCell::new(Disk {
                segments: BTreeMap::new(),
                rng: fastrand::Rng::with_seed(seed),
                space_bytes_max: None,
                lose_syncs: 0,
                fail_syncs: 0,
                sync_yields: 0,
                syncs: 0,
            })),
        }
    }

    /// Limits the total size of all segments; creating one past it is ENOSPC.
    pub fn set_space_bytes_max(&self, limit: Option<u64>) {
        self.disk.borrow_mut().space_bytes_max = limit;
    }

    /// The next `count` syncs report success but persist nothing.
    pub fn lose_syncs(&self, count: u32) {
        self.disk.borrow_mut().lose_syncs = count;
    }

    /// The next `count` syncs fail with an I/O error and persist nothing.
    pub fn fail_syncs(&self, count: u32) {
        self.disk.borrow_mut().fail_syncs = count;
    }

    /// Makes each sync yield `count` times before completing (syncs take "time").
    pub fn set_sync_yields(&self, count: u32) {
        self.disk.borrow_mut().sync_yields = count;
    }

    /// How many syncs were asked for (successful, lost or failed).
    pub fn syncs(&self) -> u64 {
        self.disk.borrow().syncs
    }

    /// Flips one bit of the durable image of segment `seq` (damage at rest).
    pub fn flip_bit(&self, seq: u64, offset: usize, bit: u8) {
        let mut disk = self.disk.borrow_mut();
        let segment = disk.segments.get_mut(&seq).expect("no such segment");
        segment.durable[offset] ^= 1 << (bit % 8);
    }

    /// The durable image of segment `seq`.
    pub fn durable_image(&self, seq: u64) -> Vec<u8> {
        self.disk.borrow().segments[&seq].durable.clone()
    }

    /// Power cut: a new storage holding what survived. The old one must not be used.
    pub fn crash(&self, mode: CrashMode) -> SimStorage {
        let mut disk = self.disk.borrow_mut();
        let mut rng = fastrand::Rng::with_seed(disk.rng.u64(..));
        let mut survivors = BTreeMap::new();
        for (&seq, segment) in &disk.segments {
            let mut image = segment.durable.clone();
            if let (CrashMode::Torn, Some(live)) = (mode, &segment.live) {
                tear(&mut image, live.written(), &mut rng);
            }
            survivors.insert(
                seq,
                SimSegment {
                    live: None,
                    durable: image,
                },
            );
        }
        SimStorage {
            disk: Rc::new(RefCell::new(Disk {
                segments: survivors,
                rng,
                space_bytes_max: disk.space_bytes_max,
                lose_syncs: 0,
                fail_syncs: 0,
                sync_yields: 0,
                syncs: 0,
            })),
        }
    }
}

/// Copies a random subset of the sectors where `cache` differs from `image`; one
/// copied sector may stop part-way.
fn tear(image: &mut [u8], cache: &[u8], rng: &mut fastrand::Rng) {
    let mut torn_one = false;
    for start in (0..cache.len()).step_by(SECTOR_BYTES) {
        let end = (start + SECTOR_BYTES).min(cache.len());
        if image[start..end] == cache[start..end] || !rng.bool() {
            continue;
        }
        let cut = if !torn_one && rng.u8(..4) == 0 {
            torn_one = true;
            start + rng.usize(0..end - start)
        } else {
            end
        };
        image[start..cut].copy_from_slice(&cache[start..cut]);
    }
}

impl Storage for SimStorage {
    fn list(&self) -> Result<Vec<u64>, SpoolError> {
        Ok(self.disk.borrow().segments.keys().copied().collect())
    }

    fn create(&self, seq: u64, shard: u16, len: usize) -> Result<Rc<Segment>, SpoolError> {
        let mut disk = self.disk.borrow_mut();
        assert!(!disk.segments.contains_key(&seq), "segment {seq} exists");
        let used: u64 = disk.segments.values().map(|s| s.durable.len() as u64).sum();
        if disk
            .space_bytes_max
            .is_some_and(|max| used + len as u64 > max)
        {
            return Err(SpoolError::NoSpace {
                seq,
                bytes: len as u64,
            });
        }
        let header = SegmentHeader {
            shard,
            seq,
            len: len as u64,
            created_unix_ms: now_unix_ms(),
        };
        let mut durable = vec![0u8; len];
        durable[..SEGMENT_HEADER_BYTES].copy_from_slice(&header.encode());
        let memory = HeapBytes::from_slice(&durable);
        let segment = Rc::new(Segment::from_heap(seq, memory, SEGMENT_HEADER_BYTES));
        disk.segments.insert(
            seq,
            SimSegment {
                live: Some(segment.clone()),
                durable,
            },
        );
        Ok(segment)
    }

    fn open(&self, seq: u64) -> Result<Rc<Segment>, SpoolError> {
        let mut disk = self.disk.borrow_mut();
        let Some(stored) = disk.segments.get_mut(&seq) else {
            return Err(SpoolError::io(
                "opening",
                seq,
                std::io::ErrorKind::NotFound.into(),
            ));
        };
        let len = stored.durable.len();
        let segment = Rc::new(Segment::from_heap(
            seq,
            HeapBytes::from_slice(&stored.durable),
            len,
        ));
        stored.live = Some(segment.clone());
        Ok(segment)
    }

    fn sync_slots(&self) -> usize {
        4
    }

    async fn sync(&self, segment: &Segment, _slot: usize) -> Result<(), SpoolError> {
        let yields = self.disk.borrow().sync_yields;
        for _ in 0..yields {
            yield_now().await;
        }
        let mut disk = self.disk.borrow_mut();
        disk.syncs += 1;
        let seq = segment.seq();
        if disk.fail_syncs > 0 {
            disk.fail_syncs -= 1;
            return Err(SpoolError::SyncFailed {
                seq,
                reason: "injected EIO".into(),
            });
        }
        if disk.lose_syncs > 0 {
            disk.lose_syncs -= 1;
            return Ok(());
        }
        let Some(stored) = disk.segments.get_mut(&seq) else {
            return Err(SpoolError::SyncFailed {
                seq,
                reason: "segment was removed".into(),
            });
        };
        let written = segment.written();
        stored.durable[..written.len()].copy_from_slice(written);
        Ok(())
    }

    /// The simulated disk has no extents to write ahead: nothing to prepare.
    async fn prepare_next(&self, _seq: u64, _shard: u16, _len: usize) {}

    fn publishing(&self) -> Option<u64> {
        None
    }

    fn created_unprepared(&self) -> u64 {
        0
    }

    async fn remove(&self, seq: u64) -> Result<(), SpoolError> {
        self.disk.borrow_mut().segments.remove(&seq);
        Ok(())
    }
}

/// Gives other tasks a turn once.
async fn yield_now() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            std::task::Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tearing_copies_only_differing_sectors_and_never_more_than_the_cache() {
        let mut rng = fastrand::Rng::with_seed(1);
        let cache: Vec<u8> = (0..4096).map(|i| (i % 251) as u8 + 1).collect();
        for _ in 0..50 {
            let mut image = vec![0u8; 8192];
            tear(&mut image, &cache, &mut rng);
            for (i, &b) in image.iter().enumerate() {
                assert!(b == 0 || (i < cache.len() && b == cache[i]), "byte {i}");
            }
        }
    }
}
