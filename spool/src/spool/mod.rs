//! One shard's spool: the single writer of its segments, its group commit, its index of
//! live messages and its space management.
//!
//! ## Group commit
//! An append serializes the record into the active segment's stage at its frontier
//! and joins the open *epoch*. The committer task closes the open epoch, fdatasyncs the
//! segments it touched through io_uring and resolves it: every waiter of that epoch is
//! told "durable" (or the sync's error) at once. Appends keep landing in the next epoch
//! while a sync is in flight, so batches form by themselves under load and a lone
//! append waits for one sync. When work queues up on the core, the committer also
//! holds batches to gather more (see `pace`).
//!
//! ## Space
//! Segments are deleted oldest first, and only when no live message is in them: that
//! one rule makes it safe to drop their updates and tombstones too (every record they
//! refer to is in an older segment, already gone, or superseded by a newer copy). A few
//! long-lived messages would pin everything behind them, so when sealed segments hold
//! far more bytes than the live set, the oldest segment's live messages are copied
//! forward (with their current retry state) and the segment is deleted.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::future::{Future, poll_fn};
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::Duration;

use crate::error::SpoolError;
use crate::id::{IdGenerator, MessageId};
use crate::record::{
    ArchivedMessageRecord, ArchivedUpdateRecord, MessageRecord, Payload, Record, TombstoneRecord,
    UpdateRecord,
};
use crate::recovery::{
    IndexEntry, RecordLoc, RecoveryReport, SegmentReport, payload_at, rebuild, scan_segment,
    verified_payload_at,
};
use crate::segment::{SEGMENT_HEADER_BYTES, Segment};
use crate::storage::{Storage, now_unix_ms};

mod commit;
mod pace;
mod space;
mod write;

use space::sealed_bytes;

/// Tunables of one shard's spool. Every bound is named with its unit last.
#[derive(Debug, Clone)]
pub struct SpoolConfig {
    /// The shard this spool belongs to (stamped in ids and segment headers).
    pub shard: u16,
    /// Capacity of an ordinary segment. A record larger than this gets a segment of
    /// its own, sized to fit.
    pub segment_bytes: usize,
    /// The largest record accepted (message size plus envelope and metadata).
    pub record_bytes_max: usize,
    /// Room a new message must leave free in the active segment. Updates and
    /// tombstones may use it, so that when the disk is full and no segment can be
    /// created, messages can still be finished — which is what frees space.
    pub control_reserve_bytes: usize,
    /// How long the committer waits for more appends before syncing a batch that is
    /// below both batch bounds, whatever the load. 0: no fixed wait (the pace below
    /// decides).
    pub commit_window_us: u64,
    /// While work stays queued on the shard's core, the committer runs one sync at a
    /// time and holds each batch while appends keep coming, for a hold that starts at
    /// the core's scheduling delay and grows while the load lasts, at most this long
    /// (see `pace`). 0: never hold.
    pub commit_gather_max_us: u64,
    /// Records in one batch (one sync) at most. A full batch is closed at once: it
    /// skips the window and waits for a sync slot as it is.
    pub commit_batch_records_max: usize,
    /// Bytes in one batch at most (the batch that crosses it is closed at once).
    pub commit_batch_bytes_max: usize,
    /// [`Spool::write`] waits while more than this many bytes are appended but not yet
    /// durable (back-pressure on the page cache and on ack latency).
    pub unsynced_bytes_max: usize,
    /// Sealed segments may hold this many percent more bytes than the live messages
    /// (plus two segments of slack) before the oldest one is compacted.
    pub space_overhead_percent_max: u32,
    /// Syncs that may run at once (capped by the storage's slots). Overlapping syncs
    /// let the device work on one batch while the previous one flushes.
    pub commit_syncs_in_flight_max: usize,
    /// Period of the background maintenance (deleting and compacting segments).
    pub maintenance_interval_ms: u64,
    /// After a failed sync, how long the committer waits before probing the disk again.
    pub sync_retry_interval_ms: u64,
    /// Runs before every write of records into a segment file (the engine writes its
    /// event log there, so that no record reaches the file ahead of an event recorded
    /// before it).
    pub write_barrier: Option<crate::segment::WriteBarrier>,
}

impl SpoolConfig {
    /// Defaults for `shard`.
    pub fn for_shard(shard: u16) -> SpoolConfig {
        SpoolConfig {
            shard,
            ..SpoolConfig::default()
        }
    }
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            shard: 0,
            segment_bytes: 64 << 20,
            record_bytes_max: 256 << 20,
            control_reserve_bytes: 1 << 20,
            commit_window_us: 0,
            commit_gather_max_us: 5_000,
            commit_batch_records_max: 4096,
            commit_batch_bytes_max: 32 << 20,
            unsynced_bytes_max: 128 << 20,
            space_overhead_percent_max: 100,
            commit_syncs_in_flight_max: 4,
            maintenance_interval_ms: 250,
            sync_retry_interval_ms: 100,
            write_barrier: None,
        }
    }
}

/// Proof of an append: await it with [`Spool::durable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "an append is not durable until its ticket is awaited"]
pub struct Ticket {
    epoch: u64,
}

/// Retry state of a message, as the newest record says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryState {
    pub attempts: u32,
    pub due_unix_ms: u64,
    pub queue: String,
    pub done: Vec<u32>,
}

impl RetryState {
    fn of_message(m: &ArchivedMessageRecord) -> RetryState {
        RetryState {
            attempts: m.attempts.to_native(),
            due_unix_ms: m.due_unix_ms.to_native(),
            queue: m.queue.to_string(),
            done: m.done.iter().map(|d| d.to_native()).collect(),
        }
    }

    fn of_update(u: &ArchivedUpdateRecord) -> RetryState {
        RetryState {
            attempts: u.attempts.to_native(),
            due_unix_ms: u.due_unix_ms.to_native(),
            queue: u.queue.to_string(),
            done: u.done.iter().map(|d| d.to_native()).collect(),
        }
    }
}

/// A live message's record, read in place from the segment mapping (zero copy).
#[derive(Debug, Clone)]
pub struct MessageRef {
    segment: Rc<Segment>,
    loc: RecordLoc,
}

impl MessageRef {
    /// The archived message: envelope, metadata and body, borrowed from the mapping.
    /// Its checksum was verified when it was appended or recovered; a read checks
    /// the header and rkyv's validation of the payload, not the body's CRC again.
    pub fn get(&self) -> &ArchivedMessageRecord {
        match verified_payload_at(&self.segment, self.loc) {
            Ok(Payload::Message(m)) => m,
            Ok(_) => unreachable!("index points a message at a non-message record"),
            // The bytes were valid when appended or recovered and nothing writes below a
            // frontier; only an outside process scribbling on the file can get here.
            Err(bad) => panic!(
                "spool record {:?} changed under its mapping: {}",
                self.loc,
                bad.describe()
            ),
        }
    }

    /// Where the record is.
    pub fn loc(&self) -> RecordLoc {
        self.loc
    }
}

/// A message found live at recovery.
#[derive(Debug, Clone)]
pub struct LiveMessage {
    pub id: MessageId,
    pub message: MessageRef,
    pub state: RetryState,
}

/// What [`Spool::open`] recovered.
#[derive(Debug)]
pub struct Recovered {
    /// Live messages in id (≈ arrival) order.
    pub live: Vec<LiveMessage>,
    pub report: RecoveryReport,
}

/// What a maintenance pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MaintenanceReport {
    pub segments_deleted: u64,
    pub messages_copied: u64,
    pub bytes_copied: u64,
}

/// Upper bounds (µs) of the latency buckets the spool (and gannetd's metrics) count
/// in; one more bucket holds everything slower.
pub const LATENCY_BOUNDS_US: [u64; 12] = [
    100, 250, 500, 1_000, 2_000, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
];

/// Durations counted in the [`LATENCY_BOUNDS_US`] buckets.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LatencyCounts {
    /// Observations per bucket (not cumulative); the last is above every bound.
    pub counts: [u64; LATENCY_BOUNDS_US.len() + 1],
    pub sum_us: u64,
}

impl LatencyCounts {
    pub fn record(&mut self, us: u64) {
        self.counts[latency_bucket(us)] += 1;
        self.sum_us += us;
    }
}

/// The bucket of a duration: the first whose bound it does not pass.
pub fn latency_bucket(us: u64) -> usize {
    LATENCY_BOUNDS_US.partition_point(|&bound| bound < us)
}

/// Counters for metrics and benchmarks.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SpoolStats {
    pub appends: u64,
    /// Bytes of the records appended (framing included): what the spool has been
    /// given to write, whatever has since been reclaimed.
    pub appended_bytes: u64,
    pub syncs: u64,
    /// Syncs whose batch the pace held to gather more (work queued on the core).
    pub gathered_syncs: u64,
    /// The committer's mean scheduling delay: from being woken (by an append or a
    /// finished sync) to being polled, in µs.
    pub committer_delay_us: u64,
    pub sync_failures: u64,
    /// How long each epoch's sync took: writing its staged records and fdatasync of
    /// every segment it touched (the disk's part of the acknowledgement latency).
    pub sync_latency: LatencyCounts,
    /// The most syncs that were in flight at once.
    pub syncs_in_flight_max: u64,
    /// The most records one sync covered.
    pub batch_records_max_seen: u64,
    pub segments: u64,
    pub live_messages: u64,
    pub live_bytes: u64,
    pub sealed_bytes: u64,
    /// Segments created on the executor at a rotation because none was prepared
    /// (fallocate, fsync and a directory fsync while the shard waits).
    pub segments_created_unprepared: u64,
    /// Stages of records written by the spool's writer thread (off the executor) …
    pub stage_writes: u64,
    /// … and on the executor: a read of bytes not yet written, or a stage that filled
    /// while a write was in flight.
    pub stage_writes_inline: u64,
    /// Segments whose write is with the writer thread now (a writer that stopped
    /// keeps this at 1 while nothing is acknowledged).
    pub stage_writes_in_flight: u64,
}

/// An epoch closed for syncing.
#[derive(Debug)]
struct ClosedEpoch {
    epoch: u64,
    bytes: usize,
    segments: Vec<Rc<Segment>>,
    /// Messages to abandon if the epoch fails (new ones, and abandon-tombstoned ones).
    abandon_on_failure: Vec<MessageId>,
}

#[derive(Debug)]
struct SegmentInfo {
    segment: Rc<Segment>,
    live_messages: u64,
    live_bytes: u64,
}

#[derive(Debug)]
struct State {
    segments: BTreeMap<u64, SegmentInfo>,
    /// The segment appends go to; `None` until the first append (or after a failure).
    active: Option<u64>,
    next_seq: u64,
    index: HashMap<MessageId, IndexEntry>,
    ids: IdGenerator,
    live_bytes: u64,
    // The open epoch: what the next sync will cover.
    epoch_records: usize,
    epoch_bytes: usize,
    epoch_segments: Vec<Rc<Segment>>,
    /// Messages first written in the open epoch, and abandon-tombstones written in it:
    /// if its sync fails, all of these are (again) to be tombstoned.
    epoch_abandon_on_failure: Vec<MessageId>,
    /// Messages whose append was refused by a failed sync and whose tombstone is not
    /// yet durable. Bounded by what the failed batches held.
    abandoned: Vec<MessageId>,
    stats: SpoolStats,
}

struct Commit {
    /// Appends join this epoch.
    open_epoch: Cell<u64>,
    /// Every epoch up to this one is resolved.
    done_epoch: Cell<u64>,
    /// Resolved epochs whose sync failed (one entry per failed epoch).
    failed: RefCell<BTreeMap<u64, SpoolError>>,
    /// Epochs whose sync finished (true: it succeeded) but that wait for an earlier
    /// epoch: epochs resolve strictly in order.
    finished: RefCell<BTreeMap<u64, bool>>,
    /// Syncs running now.
    in_flight: Cell<usize>,
    /// Epochs closed because they reached a batch bound while every sync slot was
    /// busy; synced in order before the open epoch.
    ready: RefCell<std::collections::VecDeque<ClosedEpoch>>,
    /// The newest epoch that failed; a success after it makes the spool healthy.
    last_failed: Cell<u64>,
    /// Bytes appended but not yet covered by a finished sync.
    unsynced_bytes: Cell<usize>,
    healthy: Cell<bool>,
    /// A sync that must run even with nothing appended (probing after a failure).
    probe: Cell<bool>,
    closing: Cell<bool>,
    stopped: Cell<bool>,
    committer: Cell<Option<Waker>>,
    waiters: RefCell<Vec<Waker>>,
    /// When the committer starts the next sync.
    pace: RefCell<pace::Pace>,
    /// The next segment's number once an append asked for it to be prepared (the
    /// active one passed an eighth), so that each is asked for once.
    prepare_asked: Cell<u64>,
    /// An ask the maintenance task has not taken yet, and the task's waker.
    prepare_pending: Cell<bool>,
    preparer: Cell<Option<Waker>>,
    /// Stages written by the writer thread.
    stage_writes: Cell<u64>,
}

impl std::fmt::Debug for Commit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Commit")
            .field("open_epoch", &self.open_epoch.get())
            .field("done_epoch", &self.done_epoch.get())
            .field("healthy", &self.healthy.get())
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Inner<S: Storage> {
    storage: S,
    config: SpoolConfig,
    state: RefCell<State>,
    commit: Commit,
    writer: write::Writer,
}

/// One shard's spool. A cheap handle (`Rc`); not `Send`: it lives on its shard's core.
#[derive(Debug)]
pub struct Spool<S: Storage> {
    inner: Rc<Inner<S>>,
}

impl<S: Storage> Clone for Spool<S> {
    fn clone(&self) -> Self {
        Spool {
            inner: self.inner.clone(),
        }
    }
}

impl<S: Storage + 'static> Spool<S> {
    /// Recovers the shard from `storage` and returns the spool with its live set.
    /// Appends go to new segments; recovered ones are only read, then deleted or
    /// compacted by maintenance.
    pub fn open(storage: S, config: SpoolConfig) -> Result<(Spool<S>, Recovered), SpoolError> {
        assert!(
            config.segment_bytes > SEGMENT_HEADER_BYTES,
            "segment_bytes too small"
        );
        assert!(
            config.segment_bytes < u32::MAX as usize,
            "segment offsets must fit u32"
        );
        let seqs = storage.list()?;
        let mut segments = Vec::with_capacity(seqs.len());
        let mut unopenable = Vec::new();
        for &seq in &seqs {
            match storage.open(seq) {
                Ok(segment) => segments.push(segment),
                Err(SpoolError::BadSegment { seq, reason }) => unopenable.push((seq, reason)),
                Err(err) => return Err(err),
            }
        }
        let mut rebuilt = rebuild(&segments);
        for (seq, reason) in unopenable {
            rebuilt
                .report
                .segments
                .push(SegmentReport::unusable(seq, reason));
        }
        let mut infos = BTreeMap::new();
        // Reports of unopenable segments come last, after one report per opened segment.
        for (segment, report) in segments.iter().zip(&rebuilt.report.segments) {
            // A segment with a damaged header is left alone on disk for the operator.
            if report.unusable.is_none() {
                let info = SegmentInfo {
                    segment: segment.clone(),
                    live_messages: 0,
                    live_bytes: 0,
                };
                infos.insert(segment.seq(), info);
            }
        }
        let mut live_bytes = 0;
        let mut live = Vec::with_capacity(rebuilt.index.len());
        for (&id, entry) in &rebuilt.index {
            let info = infos
                .get_mut(&entry.msg.seq)
                .expect("indexed segment is open");
            info.live_messages += 1;
            info.live_bytes += u64::from(entry.msg.len);
            live_bytes += u64::from(entry.msg.len);
            let message = MessageRef {
                segment: info.segment.clone(),
                loc: entry.msg,
            };
            let state = match entry.update {
                Some(loc) => match payload_at(&infos[&loc.seq].segment, loc) {
                    Ok(Payload::Update(u)) => RetryState::of_update(u),
                    other => unreachable!("index update points at {other:?}"),
                },
                None => RetryState::of_message(message.get()),
            };
            live.push(LiveMessage { id, message, state });
        }
        live.sort_unstable_by_key(|m| m.id);
        let state = State {
            segments: infos,
            active: None,
            next_seq: seqs.last().map_or(1, |s| s + 1),
            index: rebuilt.index,
            ids: IdGenerator::new(config.shard, rebuilt.newest_id, fastrand::u32(..)),
            live_bytes,
            epoch_records: 0,
            epoch_bytes: 0,
            epoch_segments: Vec::new(),
            epoch_abandon_on_failure: Vec::new(),
            abandoned: Vec::new(),
            stats: SpoolStats::default(),
        };
        let pace_limits = pace::Limits {
            slots: config
                .commit_syncs_in_flight_max
                .clamp(1, storage.sync_slots()),
            gather_max: Duration::from_micros(config.commit_gather_max_us),
        };
        let spool = Spool {
            inner: Rc::new(Inner {
                writer: write::Writer::new(config.shard),
                storage,
                config,
                state: RefCell::new(state),
                commit: Commit {
                    open_epoch: Cell::new(1),
                    done_epoch: Cell::new(0),
                    failed: RefCell::new(BTreeMap::new()),
                    finished: RefCell::new(BTreeMap::new()),
                    in_flight: Cell::new(0),
                    ready: RefCell::new(std::collections::VecDeque::new()),
                    last_failed: Cell::new(0),
                    unsynced_bytes: Cell::new(0),
                    healthy: Cell::new(true),
                    probe: Cell::new(false),
                    closing: Cell::new(false),
                    stopped: Cell::new(false),
                    committer: Cell::new(None),
                    waiters: RefCell::new(Vec::new()),
                    pace: RefCell::new(pace::Pace::new(pace_limits)),
                    prepare_asked: Cell::new(0),
                    prepare_pending: Cell::new(false),
                    preparer: Cell::new(None),
                    stage_writes: Cell::new(0),
                },
            }),
        };
        Ok((
            spool,
            Recovered {
                live,
                report: rebuilt.report,
            },
        ))
    }

    /// The storage underneath (tests use it to inject faults).
    pub fn storage(&self) -> &S {
        &self.inner.storage
    }

    /// The configuration in force.
    pub fn config(&self) -> &SpoolConfig {
        &self.inner.config
    }

    /// A fresh message id for this shard.
    pub fn next_id(&self) -> MessageId {
        self.inner.state.borrow_mut().ids.next(now_unix_ms())
    }

    /// False after a failed sync, until a sync succeeds again.
    pub fn is_healthy(&self) -> bool {
        self.inner.commit.healthy.get()
    }

    /// Counters.
    pub fn stats(&self) -> SpoolStats {
        let state = self.inner.state.borrow();
        let mut stats = state.stats.clone();
        stats.segments = state.segments.len() as u64;
        stats.live_messages = state.index.len() as u64;
        stats.live_bytes = state.live_bytes;
        stats.sealed_bytes = sealed_bytes(&state);
        stats.committer_delay_us = self.inner.commit.pace.borrow().delay().as_micros() as u64;
        stats.segments_created_unprepared = self.inner.storage.created_unprepared();
        stats.stage_writes = self.inner.commit.stage_writes.get();
        for info in state.segments.values() {
            stats.stage_writes_inline += info.segment.inline_writes();
            stats.stage_writes_in_flight += u64::from(info.segment.write_in_flight());
        }
        stats
    }

    /// The live message `id`, read in place.
    pub fn get(&self, id: MessageId) -> Option<MessageRef> {
        let state = self.inner.state.borrow();
        let entry = state.index.get(&id)?;
        let segment = state.segments[&entry.msg.seq].segment.clone();
        Some(MessageRef {
            segment,
            loc: entry.msg,
        })
    }

    /// Appends a new message. Durable once the ticket resolves.
    pub fn append_message(&self, message: &MessageRecord) -> Result<Ticket, SpoolError> {
        self.append(Record::Message(message))
    }

    /// Appends new retry state for a live message.
    pub fn append_update(&self, update: &UpdateRecord) -> Result<Ticket, SpoolError> {
        self.append(Record::Update(update))
    }

    /// Appends the end of a live message; its space becomes reclaimable.
    pub fn append_tombstone(&self, id: MessageId) -> Result<Ticket, SpoolError> {
        self.append(Record::Tombstone(&TombstoneRecord { id }))
    }

    /// Waits until the append behind `ticket` is durable, or its sync failed.
    pub fn durable(
        &self,
        ticket: Ticket,
    ) -> impl Future<Output = Result<(), SpoolError>> + 'static {
        let inner = self.inner.clone();
        poll_fn(move |cx| {
            let commit = &inner.commit;
            if commit.done_epoch.get() >= ticket.epoch {
                return Poll::Ready(match commit.failed.borrow().get(&ticket.epoch) {
                    Some(err) => Err(err.duplicate()),
                    None => Ok(()),
                });
            }
            if commit.stopped.get() {
                return Poll::Ready(Err(SpoolError::Unhealthy));
            }
            commit.waiters.borrow_mut().push(cx.waker().clone());
            Poll::Pending
        })
    }

    /// Appends a record and waits until it is durable, first waiting while too many
    /// bytes are unsynced. This is what the engine calls before it says 250.
    pub async fn write(&self, record: Record<'_>) -> Result<(), SpoolError> {
        self.write_and(record, || {}).await
    }

    /// [`Spool::write`], calling `appended` once the record is appended and before
    /// it can reach the file (it is only staged in memory then): with the write
    /// barrier, what `appended` buffers is written before the record is (the engine
    /// records a message's reception event here). Not called if the append fails.
    pub async fn write_and(
        &self,
        record: Record<'_>,
        appended: impl FnOnce(),
    ) -> Result<(), SpoolError> {
        while self.inner.commit.unsynced_bytes.get() > self.inner.config.unsynced_bytes_max {
            let open = Ticket {
                epoch: self.inner.commit.open_epoch.get(),
            };
            // Its result belongs to other appenders; we only wait for room.
            let _ = self.durable(open).await;
        }
        let ticket = self.append(record)?;
        appended();
        self.durable(ticket).await
    }

    fn append(&self, record: Record<'_>) -> Result<Ticket, SpoolError> {
        let inner = &*self.inner;
        let commit = &inner.commit;
        if !commit.healthy.get() || commit.closing.get() {
            return Err(SpoolError::Unhealthy);
        }
        let bound = record.len_bound();
        if bound > inner.config.record_bytes_max {
            return Err(SpoolError::RecordTooLarge {
                bytes: bound,
                max: inner.config.record_bytes_max,
            });
        }
        let mut state = inner.state.borrow_mut();
        let id = record.id();
        if !matches!(record, Record::Message(_)) && !state.index.contains_key(&id) {
            // Refused before anything is written: an update or tombstone for a message
            // that is not live (finished twice, or never spooled here).
            return Err(SpoolError::UnknownMessage {
                id,
                kind: record.kind().name(),
            });
        }
        let loc = self.write_record(&mut state, record, bound)?;
        match record {
            Record::Message(_) => {
                let old = state.index.insert(
                    id,
                    IndexEntry {
                        msg: loc,
                        update: None,
                    },
                );
                if let Some(old) = old {
                    forget(&mut state, old.msg);
                } else {
                    state.epoch_abandon_on_failure.push(id);
                }
                let info = state.segments.get_mut(&loc.seq).expect("active segment");
                info.live_messages += 1;
                info.live_bytes += u64::from(loc.len);
                state.live_bytes += u64::from(loc.len);
            }
            Record::Update(_) => {
                state.index.get_mut(&id).expect("checked above").update = Some(loc);
            }
            Record::Tombstone(_) => {
                let old = state.index.remove(&id).expect("checked above");
                forget(&mut state, old.msg);
            }
        }
        self.note_append(&mut state, loc);
        Ok(Ticket {
            epoch: commit.open_epoch.get(),
        })
    }

    /// Adds an appended record to the open epoch and wakes the committer.
    fn note_append(&self, state: &mut State, loc: RecordLoc) {
        let commit = &self.inner.commit;
        state.stats.appends += 1;
        state.stats.appended_bytes += u64::from(loc.len);
        state.epoch_records += 1;
        let now = std::time::Instant::now();
        commit
            .pace
            .borrow_mut()
            .appended(now, state.epoch_records == 1);
        state.epoch_bytes += loc.len as usize;
        let segment = &state.segments[&loc.seq].segment;
        if !state
            .epoch_segments
            .last()
            .is_some_and(|s| Rc::ptr_eq(s, segment))
        {
            state.epoch_segments.push(segment.clone());
        }
        commit
            .unsynced_bytes
            .set(commit.unsynced_bytes.get() + loc.len as usize);
        // Once the next segment is due, it is asked for at once rather than at the
        // next maintenance round: a small or fast-filling segment would otherwise run
        // out first, and its successor be made on this core.
        if commit.prepare_asked.get() < state.next_seq
            && let Some(next) = space::next_segment_due(state)
        {
            commit.prepare_asked.set(next);
            commit.prepare_pending.set(true);
            if let Some(waker) = commit.preparer.take() {
                waker.wake();
            }
        }
        let config = &self.inner.config;
        if state.epoch_records >= config.commit_batch_records_max
            || state.epoch_bytes >= config.commit_batch_bytes_max
        {
            // The batch is full: close it now, so that it waits for a sync slot as it
            // is and later appends start the next batch.
            let closed = self.close_epoch_in(state);
            commit.ready.borrow_mut().push_back(closed);
        }
        if let Some(waker) = commit.committer.take() {
            commit.pace.borrow_mut().woke(now);
            waker.wake();
        }
    }

    /// Serializes `record` into the active segment, rotating (or creating a segment
    /// sized for an oversized record) when it does not fit. If no segment can be
    /// created, the active one stays active for the records that still fit.
    fn write_record(
        &self,
        state: &mut State,
        record: Record<'_>,
        bound: usize,
    ) -> Result<RecordLoc, SpoolError> {
        let reserve = match record {
            Record::Message(_) => self.control_reserve(),
            Record::Update(_) | Record::Tombstone(_) => 0,
        };
        let fits = state
            .active
            .is_some_and(|seq| state.segments[&seq].segment.remaining() >= bound + reserve);
        if !fits {
            self.rotate(state, bound + reserve)?;
        }
        if let Some(loc) = self.try_write(state, record, bound)? {
            return Ok(loc);
        }
        // The bound was an underestimate (a bug, but not worth losing mail over).
        tracing::warn!(
            bound,
            kind = record.kind().name(),
            "record outgrew its length bound"
        );
        self.rotate(state, 2 * bound + reserve)?;
        let loc = self.try_write(state, record, 2 * bound)?;
        Ok(loc.expect("record fits a fresh segment twice its bound"))
    }

    /// The reserve in force: the configured one, but never more than an eighth of a
    /// segment, so that it cannot make every message need a segment of its own.
    fn control_reserve(&self) -> usize {
        self.inner
            .config
            .control_reserve_bytes
            .min(self.inner.config.segment_bytes / 8)
    }

    fn rotate(&self, state: &mut State, room: usize) -> Result<(), SpoolError> {
        let inner = &*self.inner;
        let len = inner
            .config
            .segment_bytes
            .max((SEGMENT_HEADER_BYTES + room).next_multiple_of(4096));
        // The next number, unless its prepared segment is being published right now
        // (renamed into place off the executor): creating it here could meet the
        // file half made — that took appends down with "File exists" until the
        // publication ended. The number after it is free; the prepared one, once
        // published, is an empty segment nothing refers to, removed at the next
        // rotation (and read as empty by a recovery before it).
        let mut seq = state.next_seq;
        if inner.storage.publishing() == Some(seq) {
            seq += 1;
        }
        let segment = inner.storage.create(seq, inner.config.shard, len)?;
        if let Some(barrier) = &inner.config.write_barrier {
            segment.set_barrier(barrier.clone());
        }
        if let Some(old) = state.active.and_then(|a| state.segments.get(&a)) {
            // Its staged records are written by the sync of their epoch, which covers
            // this segment (and reports a write error).
            old.segment.seal();
        }
        state.next_seq = seq + 1;
        state.segments.insert(
            seq,
            SegmentInfo {
                segment,
                live_messages: 0,
                live_bytes: 0,
            },
        );
        state.active = Some(seq);
        Ok(())
    }

    /// Writes `record` at the active segment's frontier within `room` bytes: `Ok(None)`
    /// when it does not fit (or there is no active segment).
    fn try_write(
        &self,
        state: &State,
        record: Record<'_>,
        room: usize,
    ) -> Result<Option<RecordLoc>, SpoolError> {
        let Some(seq) = state.active else {
            return Ok(None);
        };
        let segment = &state.segments[&seq].segment;
        let written = segment
            .append_with(room, |at, tail| {
                let len = record.write_into(tail, seq, at)?;
                Some((
                    len,
                    RecordLoc {
                        seq,
                        offset: at as u32,
                        len: len as u32,
                    },
                ))
            })
            .map_err(|e| SpoolError::io("writing", seq, e));
        if let Some(job) = segment.take_ready_write() {
            // The stage filled up: the writer thread writes it while appends go on.
            let (spool, segment) = (self.clone(), segment.clone());
            glommio::spawn_local(async move { spool.write_stage(&segment, job).await }).detach();
        }
        written
    }
}

/// Drops a superseded or finished message copy from its segment's live counts.
fn forget(state: &mut State, loc: RecordLoc) {
    if let Some(info) = state.segments.get_mut(&loc.seq) {
        info.live_messages -= 1;
        info.live_bytes -= u64::from(loc.len);
    }
    state.live_bytes -= u64::from(loc.len);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_fall_in_the_first_bucket_whose_bound_they_do_not_pass() {
        assert_eq!(latency_bucket(0), 0);
        assert_eq!(latency_bucket(100), 0);
        assert_eq!(latency_bucket(101), 1);
        assert_eq!(latency_bucket(2_000), 4);
        assert_eq!(latency_bucket(1_000_000), LATENCY_BOUNDS_US.len() - 1);
        assert_eq!(latency_bucket(1_000_001), LATENCY_BOUNDS_US.len());
        let mut counts = LatencyCounts::default();
        for us in [50, 150, 150, 5_000_000] {
            counts.record(us);
        }
        assert_eq!(counts.counts[0], 1);
        assert_eq!(counts.counts[1], 2);
        assert_eq!(counts.counts[LATENCY_BOUNDS_US.len()], 1);
        assert_eq!(counts.sum_us, 5_000_350);
    }
}
