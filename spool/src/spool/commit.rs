//! The group commit: the committer task closes the open epoch, fdatasyncs the
//! segments it touched and resolves every waiter of the epoch at once, in order.

use std::time::Instant;

use super::*;

impl<S: Storage + 'static> Spool<S> {
    /// The committer: closes epochs and starts their syncs — several at once, each on
    /// its own sync slot — until [`Spool::close`]. Spawn it once on the shard's
    /// executor.
    pub async fn run_committer(self) {
        let inner = &*self.inner;
        let commit = &inner.commit;
        let slots = commit.pace.borrow().slots_max();
        loop {
            let work = poll_fn(|cx| {
                commit.pace.borrow_mut().ran(Instant::now);
                let pending = inner.state.borrow().epoch_records > 0
                    || !commit.ready.borrow().is_empty()
                    || commit.probe.get();
                let in_flight = commit.in_flight.get();
                // While holding batches, one sync runs at a time: the next batch
                // grows behind it.
                let slots = if commit.closing.get() {
                    slots
                } else {
                    commit.pace.borrow().slots()
                };
                if pending && in_flight < slots {
                    Poll::Ready(true)
                } else if commit.closing.get() && !pending && in_flight == 0 {
                    Poll::Ready(false)
                } else {
                    commit.committer.set(Some(cx.waker().clone()));
                    Poll::Pending
                }
            })
            .await;
            if !work {
                break;
            }
            let mut gathered = false;
            if commit.probe.get() {
                // The last sync failed: give the disk (or the operator) a moment, then
                // tombstone what was abandoned (into a fresh segment): that sync both
                // probes the disk and makes the abandonment durable.
                if !commit.closing.get() {
                    let pause = inner.config.sync_retry_interval_ms;
                    glommio::timer::sleep(Duration::from_millis(pause)).await;
                }
                if let Err(err) = self.write_abandon_tombstones() {
                    tracing::error!(error = %err, "spool still failing; cannot write abandon tombstones");
                    if commit.closing.get() {
                        // Shutting down: the messages stay abandoned in memory only; a
                        // restart may deliver them (at least once, never lost).
                        commit.probe.set(false);
                    }
                    continue;
                }
                commit.probe.set(false);
            } else if commit.ready.borrow().is_empty() && !commit.closing.get() {
                match self.gather().await {
                    Some(was_gathering) => gathered = was_gathering,
                    // The pace changed its mind (a sync must finish first).
                    None => continue,
                }
                if inner.config.commit_window_us > 0 && !gathered {
                    let below_bounds = {
                        let state = inner.state.borrow();
                        state.epoch_records < inner.config.commit_batch_records_max
                            && state.epoch_bytes < inner.config.commit_batch_bytes_max
                    };
                    if below_bounds {
                        let window = Duration::from_micros(inner.config.commit_window_us);
                        glommio::timer::sleep(window).await;
                    }
                }
            }
            let queued = commit.ready.borrow_mut().pop_front();
            let closed = match queued {
                Some(closed) => closed,
                None => self.close_epoch(),
            };
            commit.in_flight.set(commit.in_flight.get() + 1);
            let mut state = inner.state.borrow_mut();
            let peak = &mut state.stats.syncs_in_flight_max;
            *peak = (*peak).max(commit.in_flight.get() as u64);
            state.stats.gathered_syncs += u64::from(gathered);
            drop(state);
            let slot = (closed.epoch % slots as u64) as usize;
            glommio::spawn_local(self.clone().sync_epoch(closed, slot)).detach();
        }
        commit.stopped.set(true);
        wake_all(commit);
    }

    /// Holds the open batch for as long as the pace says (appends keep joining it).
    /// Some(true) when the pace held batches (the core is loaded), Some(false) when it
    /// said to sync at once, None when a running sync must finish first.
    async fn gather(&self) -> Option<bool> {
        let commit = &self.inner.commit;
        let mut gathering = false;
        loop {
            let now = Instant::now();
            let next = {
                let pace = commit.pace.borrow();
                gathering |= !pace.hold().is_zero();
                pace.next(now, commit.in_flight.get())
            };
            match next {
                pace::Next::Sync => return Some(gathering),
                pace::Next::WaitForSlot => return None,
                pace::Next::WaitUntil(until) => {
                    glommio::timer::sleep(until.saturating_duration_since(now)).await;
                    if commit.closing.get() || !commit.ready.borrow().is_empty() {
                        return Some(gathering);
                    }
                }
            }
        }
    }

    /// Closes the open epoch (opening the next) and takes its bookkeeping.
    fn close_epoch(&self) -> ClosedEpoch {
        self.close_epoch_in(&mut self.inner.state.borrow_mut())
    }

    /// Closes the open epoch (opening the next). The vectors it takes are allocated
    /// again by the next epoch: a few allocations per batch, none per message.
    pub(super) fn close_epoch_in(&self, state: &mut State) -> ClosedEpoch {
        let commit = &self.inner.commit;
        let epoch = commit.open_epoch.get();
        commit.open_epoch.set(epoch + 1);
        commit.pace.borrow_mut().batch_closed();
        let records = std::mem::take(&mut state.epoch_records) as u64;
        let seen = &mut state.stats.batch_records_max_seen;
        *seen = (*seen).max(records);
        ClosedEpoch {
            epoch,
            bytes: std::mem::take(&mut state.epoch_bytes),
            segments: std::mem::take(&mut state.epoch_segments),
            abandon_on_failure: std::mem::take(&mut state.epoch_abandon_on_failure),
        }
    }

    async fn sync_epoch(self, closed: ClosedEpoch, slot: usize) {
        let started = std::time::Instant::now();
        let mut result = Ok(());
        let mut disk = Duration::ZERO;
        for segment in &closed.segments {
            // The epoch's records may still be staged in memory: write them (and
            // whatever was appended since) first, then sync.
            let written = self
                .write_out(segment)
                .await
                .map_err(|e| SpoolError::SyncFailed {
                    seq: segment.seq(),
                    reason: format!("writing: {e}"),
                });
            let synced = match written {
                Ok(()) => {
                    let syncing = Instant::now();
                    let synced = self.inner.storage.sync(segment, slot).await;
                    disk += syncing.elapsed();
                    synced
                }
                Err(err) => Err(err),
            };
            if let Err(err) = synced {
                result = Err(err);
                break;
            }
        }
        let commit = &self.inner.commit;
        commit.in_flight.set(commit.in_flight.get() - 1);
        // The pace weighs the core's delay against the disk's part of a sync: the
        // write before it is CPU (a copy into the page cache) on another thread, whose
        // wait for a core would otherwise make a loaded core look disk-bound.
        commit.pace.borrow_mut().synced(disk);
        {
            let stats = &mut self.inner.state.borrow_mut().stats;
            stats.syncs += 1;
            stats
                .sync_latency
                .record(started.elapsed().as_micros() as u64);
        }
        if let Err(err) = result {
            tracing::error!(epoch = closed.epoch, error = %err, "spool sync failed; its messages are not acknowledged");
            self.inner.state.borrow_mut().stats.sync_failures += 1;
            // What was appended while this sync ran may have been in the write-back
            // that failed, and the kernel has marked those pages clean: a later sync
            // would report success for data that is gone. So every batch closed but not
            // yet synced, and the open epoch, fail too; the segment is sealed and
            // nothing is appended to it again.
            self.inner.state.borrow_mut().active = None;
            let queued: Vec<ClosedEpoch> = commit.ready.borrow_mut().drain(..).collect();
            let open = self.close_epoch();
            let reason = format!("written while a sync of the same segment failed ({err})");
            let seq = closed.segments.last().map_or(0, |s| s.seq());
            self.finish_epoch(closed, Err(err));
            for epoch in queued.into_iter().chain([open]) {
                let err = SpoolError::SyncFailed {
                    seq,
                    reason: reason.clone(),
                };
                self.finish_epoch(epoch, Err(err));
            }
        } else {
            self.finish_epoch(closed, Ok(()));
        }
        self.resolve_in_order();
        if let Some(waker) = commit.committer.take() {
            commit.pace.borrow_mut().woke(Instant::now());
            waker.wake();
        }
    }

    /// Writes what `segment` has staged through the writer thread, after the write
    /// in flight (another sync's, or a full stage's) if there is one.
    async fn write_out(&self, segment: &Segment) -> std::io::Result<()> {
        segment.no_write_in_flight().await;
        if let Some(job) = segment.begin_write() {
            self.write_stage(segment, job).await;
        }
        segment.write_result()
    }

    /// Runs a write `segment` began on the writer thread and ends it.
    pub(super) async fn write_stage(&self, segment: &Segment, job: crate::segment::WriteJob) {
        let result = self.inner.writer.write(job).await;
        segment.end_write(result);
        // Not in `state`: glommio polls a spawned task at once, and the append that
        // spawned this one may still hold the state (when the write was that quick).
        let writes = &self.inner.commit.stage_writes;
        writes.set(writes.get() + 1);
    }

    /// Records an epoch's outcome; failed epochs abandon the messages they held.
    fn finish_epoch(&self, closed: ClosedEpoch, result: Result<(), SpoolError>) {
        let commit = &self.inner.commit;
        commit
            .unsynced_bytes
            .set(commit.unsynced_bytes.get().saturating_sub(closed.bytes));
        let ok = result.is_ok();
        if let Err(err) = result {
            let mut state = self.inner.state.borrow_mut();
            let state = &mut *state;
            for id in closed.abandon_on_failure {
                if let Some(entry) = state.index.remove(&id) {
                    forget(state, entry.msg);
                }
                state.abandoned.push(id);
            }
            commit.healthy.set(false);
            commit.probe.set(true);
            commit
                .last_failed
                .set(commit.last_failed.get().max(closed.epoch));
            commit.failed.borrow_mut().insert(closed.epoch, err);
        }
        commit.finished.borrow_mut().insert(closed.epoch, ok);
    }

    /// Moves `done_epoch` over every finished epoch that has no unfinished one before
    /// it, and wakes the waiters.
    fn resolve_in_order(&self) {
        let commit = &self.inner.commit;
        let mut finished = commit.finished.borrow_mut();
        let mut advanced = false;
        while let Some(ok) = finished.remove(&(commit.done_epoch.get() + 1)) {
            let epoch = commit.done_epoch.get() + 1;
            commit.done_epoch.set(epoch);
            if ok && epoch > commit.last_failed.get() {
                commit.healthy.set(true);
            }
            advanced = true;
        }
        drop(finished);
        if advanced {
            wake_all(commit);
        }
    }

    /// Writes a tombstone for every abandoned message into the open epoch, starting a
    /// segment if none is active (so a probe always has something real to sync).
    fn write_abandon_tombstones(&self) -> Result<(), SpoolError> {
        let mut state = self.inner.state.borrow_mut();
        let state = &mut *state;
        if state.active.is_none() {
            self.rotate(state, 0)?;
        }
        let abandoned = std::mem::take(&mut state.abandoned);
        for (i, &id) in abandoned.iter().enumerate() {
            let record = Record::Tombstone(&TombstoneRecord { id });
            match self.write_record(state, record, record.len_bound()) {
                Ok(loc) => self.note_append(state, loc),
                Err(err) => {
                    state.abandoned.extend_from_slice(&abandoned[i..]);
                    return Err(err);
                }
            }
            state.epoch_abandon_on_failure.push(id);
        }
        if state.epoch_segments.is_empty() {
            let active = state.active.expect("rotated above");
            state
                .epoch_segments
                .push(state.segments[&active].segment.clone());
        }
        Ok(())
    }

    /// Stops taking appends, makes everything appended durable and stops the committer.
    pub async fn close(&self) {
        let commit = &self.inner.commit;
        commit.closing.set(true);
        if let Some(waker) = commit.committer.take() {
            waker.wake();
        }
        // The maintenance task ends now too, not at its next round.
        if let Some(waker) = commit.preparer.take() {
            waker.wake();
        }
        poll_fn(|cx| {
            if commit.stopped.get() {
                Poll::Ready(())
            } else {
                commit.waiters.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await;
    }
}

fn wake_all(commit: &Commit) {
    let waiters = std::mem::take(&mut *commit.waiters.borrow_mut());
    for waker in waiters {
        waker.wake();
    }
}
