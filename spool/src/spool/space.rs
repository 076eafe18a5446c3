//! Space: deleting segments that hold no live message, copying the live messages of
//! the oldest segment forward when sealed segments hold far more than the live set,
//! and keeping a spare segment ready.

use super::*;

impl<S: Storage + 'static> Spool<S> {
    /// Deletes dead segments (oldest first) and compacts the oldest one while sealed
    /// segments hold too much more than the live set.
    pub async fn maintain(&self) -> Result<MaintenanceReport, SpoolError> {
        let mut report = MaintenanceReport::default();
        // Only segments that existed when the pass began: copies made by this pass land
        // in newer ones, so the pass always ends.
        let seq_end = self.inner.state.borrow().next_seq;
        loop {
            let (head, dead, over) = {
                let state = self.inner.state.borrow();
                let Some((&head, info)) = state.segments.iter().next() else {
                    break;
                };
                if state.active == Some(head) || head >= seq_end {
                    break;
                }
                (
                    head,
                    info.live_messages == 0,
                    self.over_space_budget(&state),
                )
            };
            if !dead {
                if !over {
                    break;
                }
                let (copied, bytes) = self.copy_forward(head).await?;
                report.messages_copied += copied;
                report.bytes_copied += bytes;
                let state = self.inner.state.borrow();
                if state
                    .segments
                    .get(&head)
                    .is_some_and(|i| i.live_messages > 0)
                {
                    // A message was updated or copied concurrently; try next pass.
                    break;
                }
            }
            self.inner.storage.remove(head).await?;
            let mut state = self.inner.state.borrow_mut();
            if let Some(gone) = state.segments.remove(&head) {
                state.stats.stage_writes_inline += gone.segment.inline_writes();
            }
            drop(state);
            report.segments_deleted += 1;
        }
        Ok(report)
    }

    fn over_space_budget(&self, state: &State) -> bool {
        let slack = 2 * self.inner.config.segment_bytes as u64;
        let allowed = state.live_bytes
            * (100 + u64::from(self.inner.config.space_overhead_percent_max))
            / 100;
        sealed_bytes(state) > allowed + slack
    }

    /// Copies the live messages of segment `seq` to the active segment with their
    /// current retry state. The index moves to a copy only once the copy is durable,
    /// so a failed sync leaves the original authoritative and the segment in place.
    async fn copy_forward(&self, seq: u64) -> Result<(u64, u64), SpoolError> {
        let segment = self.inner.state.borrow().segments[&seq].segment.clone();
        // (original, its update at copy time, the copy's location)
        let mut moved: Vec<(MessageId, IndexEntry, RecordLoc)> = Vec::new();
        let mut last = None;
        {
            let mut state = self.inner.state.borrow_mut();
            let state = &mut *state;
            let mut copies = Vec::new();
            scan_segment(&segment, |loc, payload| {
                let Payload::Message(m) = payload else { return };
                let id = MessageId::from(&m.id);
                let Some(entry) = state.index.get(&id).filter(|e| e.msg == loc) else {
                    return;
                };
                // Compaction is off the hot path: an owned copy per moved message is fine.
                let mut copy: MessageRecord = rkyv::deserialize::<_, rkyv::rancor::Error>(m)
                    .expect("validated record deserializes");
                let update = entry
                    .update
                    .map(|at| payload_at(&state.segments[&at.seq].segment, at));
                if let Some(Ok(Payload::Update(u))) = update {
                    let s = RetryState::of_update(u);
                    (copy.attempts, copy.due_unix_ms, copy.queue, copy.done) =
                        (s.attempts, s.due_unix_ms, s.queue, s.done);
                }
                copies.push((*entry, copy));
            });
            for (entry, copy) in &copies {
                let record = Record::Message(copy);
                let loc = self.write_record(state, record, record.len_bound())?;
                self.note_append(state, loc);
                last = Some(Ticket {
                    epoch: self.inner.commit.open_epoch.get(),
                });
                moved.push((copy.id, *entry, loc));
            }
        }
        let Some(ticket) = last else {
            return Ok((0, 0));
        };
        self.durable(ticket).await?;
        let mut state = self.inner.state.borrow_mut();
        let (mut count, mut bytes) = (0, 0);
        for (id, original, copy) in moved {
            let Some(entry) = state.index.get_mut(&id) else {
                continue;
            };
            if entry.msg != original.msg {
                continue;
            }
            entry.msg = copy;
            // An update appended after the copy is newer than it and stays.
            if entry.update == original.update {
                entry.update = None;
            }
            forget(&mut state, original.msg);
            let info = state.segments.get_mut(&copy.seq).expect("copy segment");
            info.live_messages += 1;
            info.live_bytes += u64::from(copy.len);
            state.live_bytes += u64::from(copy.len);
            count += 1;
            bytes += u64::from(copy.len);
        }
        Ok((count, bytes))
    }

    /// Gets the next segment ready (see `Storage::prepare_next`) once it is due
    /// ([`next_segment_due`]).
    pub async fn prepare_next_segment(&self) {
        let next = next_segment_due(&self.inner.state.borrow());
        if let Some(seq) = next {
            let config = &self.inner.config;
            let storage = &self.inner.storage;
            storage
                .prepare_next(seq, config.shard, config.segment_bytes)
                .await;
        }
    }

    /// Runs [`Spool::maintain`] every `maintenance_interval_ms` until the spool closes,
    /// and prepares the next segment when it is time: at each round, and as soon as
    /// an append finds the active segment an eighth full.
    pub async fn run_maintenance(self) {
        let period = Duration::from_millis(self.inner.config.maintenance_interval_ms);
        let mut next_round = std::time::Instant::now() + period;
        while !self.inner.commit.closing.get() {
            let wait = next_round.saturating_duration_since(std::time::Instant::now());
            futures_lite::future::or(glommio::timer::sleep(wait), self.prepare_asked()).await;
            if self.inner.commit.closing.get() {
                break;
            }
            if std::time::Instant::now() >= next_round {
                if let Err(err) = self.maintain().await {
                    tracing::warn!(error = %err, "spool maintenance failed; will retry");
                }
                next_round = std::time::Instant::now() + period;
            }
            self.prepare_next_segment().await;
        }
    }

    /// Resolves when an append has asked for the next segment (see `note_append`), or
    /// the spool is closing.
    async fn prepare_asked(&self) {
        let commit = &self.inner.commit;
        std::future::poll_fn(|cx| {
            if commit.prepare_pending.replace(false) || commit.closing.get() {
                Poll::Ready(())
            } else {
                commit.preparer.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await
    }
}

/// The number of the next segment once it is worth preparing: when the active one
/// is an eighth used — a spool that stores little never writes a spare, and one
/// under load has it before the active segment runs out.
pub(super) fn next_segment_due(state: &State) -> Option<u64> {
    let segment = &state.segments[&state.active?].segment;
    (segment.frontier() >= segment.len() / 8).then_some(state.next_seq)
}

pub(super) fn sealed_bytes(state: &State) -> u64 {
    state
        .segments
        .iter()
        .filter(|(seq, _)| Some(**seq) != state.active)
        // Files are preallocated: a sealed segment occupies its whole capacity.
        .map(|(_, info)| info.segment.len() as u64)
        .sum()
}
