//! Fault injection on the simulated disk: each fault has a precise, reported outcome,
//! never a panic, and never an acknowledged message lost to anything but the disk lying.

mod common;

use gannet_spool::{CrashMode, MessageId, SimStorage, Spool, SpoolConfig, SpoolError};

fn config() -> SpoolConfig {
    SpoolConfig {
        segment_bytes: 16 << 10,
        control_reserve_bytes: 1 << 10,
        sync_retry_interval_ms: 1,
        ..SpoolConfig::for_shard(1)
    }
}

/// A simulated disk and a started spool on it.
fn sim_spool(seed: u64) -> (SimStorage, Spool<SimStorage>) {
    let storage = SimStorage::new(seed);
    let (spool, _) = Spool::open(storage.clone(), config()).unwrap();
    common::start(&spool);
    (storage, spool)
}

/// Appends `count` messages and waits for each to be durable.
async fn append_acked(spool: &Spool<SimStorage>, count: usize, body_len: usize) -> Vec<MessageId> {
    let mut ids = Vec::new();
    for _ in 0..count {
        let msg = common::message(spool.next_id(), body_len, 2);
        spool
            .durable(spool.append_message(&msg).unwrap())
            .await
            .unwrap();
        ids.push(msg.id);
    }
    ids
}

/// Waits (bounded) for the probe sync after a failure to restore health.
async fn wait_healthy(spool: &Spool<SimStorage>) {
    for _ in 0..200 {
        if spool.is_healthy() {
            return;
        }
        glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
    }
    panic!("spool did not become healthy: {:?}", spool.stats());
}

fn live_ids(recovered: &gannet_spool::Recovered) -> Vec<MessageId> {
    recovered.live.iter().map(|m| m.id).collect()
}

#[test]
fn torn_writes_are_cut_off_and_reported() {
    common::run(|| async {
        let mut torn_seen = 0;
        for seed in 0..40 {
            let storage = SimStorage::new(seed);
            let (spool, _) = Spool::open(storage.clone(), config()).unwrap();
            common::start(&spool);
            let acked = append_acked(&spool, 3, 900).await;
            let unacked = common::message(spool.next_id(), 5000, 1);
            let _never_synced = spool.append_message(&unacked).unwrap();
            let (_, recovered) = Spool::open(storage.crash(CrashMode::Torn), config()).unwrap();
            let live = live_ids(&recovered);
            assert_eq!(
                &live[..3],
                &acked[..],
                "seed {seed}: acknowledged messages lost"
            );
            assert_eq!(recovered.report.corrupt_regions(), 0, "seed {seed}");
            if live.len() == 3 && recovered.report.torn_bytes() > 0 {
                torn_seen += 1;
            }
            for m in &recovered.live {
                assert_eq!(
                    m.message.get().body.as_slice(),
                    common::body_for(m.id, m.message.get().body.len())
                );
            }
        }
        assert!(
            torn_seen > 5,
            "the simulator tore only {torn_seen} of 40 crashes"
        );
    });
}

#[test]
fn a_lost_fdatasync_loses_only_that_batch_and_recovery_stays_consistent() {
    common::run(|| async {
        let (storage, spool) = sim_spool(7);
        let kept = append_acked(&spool, 2, 500).await;
        storage.lose_syncs(1);
        let lost = append_acked(&spool, 1, 500).await;
        let (_, recovered) = Spool::open(storage.crash(CrashMode::Clean), config()).unwrap();
        // A disk that lies about a flush loses what it lied about, and nothing else:
        // the recovered set is a clean prefix, with no corrupt record passed as valid.
        assert_eq!(live_ids(&recovered), kept);
        assert!(!live_ids(&recovered).contains(&lost[0]));
        assert_eq!(recovered.report.corrupt_regions(), 0);
        assert!(recovered.report.torn_bytes() == 0);
    });
}

#[test]
fn a_bit_flip_in_a_record_is_skipped_and_reported() {
    for (what, at) in [("payload", 60usize), ("header", 9usize)] {
        common::run(move || async move {
            let storage = SimStorage::new(3);
            let (spool, _) = Spool::open(storage.clone(), config()).unwrap();
            common::start(&spool);
            let ids = append_acked(&spool, 3, 700).await;
            let victim = spool.get(ids[1]).unwrap().loc();
            spool.close().await;
            let crashed = storage.crash(CrashMode::Clean);
            crashed.flip_bit(victim.seq, victim.offset as usize + at, 3);
            let (_, recovered) = Spool::open(crashed, config()).unwrap();
            assert_eq!(live_ids(&recovered), vec![ids[0], ids[2]], "flip in {what}");
            let report = &recovered.report.segments[0];
            assert_eq!(report.corrupt.len(), 1, "flip in {what}");
            assert_eq!(report.corrupt[0].offset, victim.offset as usize);
            assert_eq!(report.corrupt[0].bytes, victim.len as usize);
            let want = if what == "payload" {
                "record payload checksum mismatch"
            } else {
                "record header checksum mismatch"
            };
            assert_eq!(report.corrupt[0].reason, want);
        });
    }
}

#[test]
fn a_damaged_segment_header_makes_only_that_segment_unusable() {
    common::run(|| async {
        let (storage, spool) = sim_spool(4);
        // Enough to fill several 16 KiB segments.
        let ids = append_acked(&spool, 12, 4000).await;
        let first_seq = spool.get(ids[0]).unwrap().loc().seq;
        let later: Vec<_> = ids
            .iter()
            .copied()
            .filter(|id| spool.get(*id).unwrap().loc().seq != first_seq)
            .collect();
        spool.close().await;
        let crashed = storage.crash(CrashMode::Clean);
        crashed.flip_bit(first_seq, 20, 0);
        let (spool, recovered) = Spool::open(crashed.clone(), config()).unwrap();
        assert_eq!(recovered.report.unusable_segments(), 1);
        assert_eq!(live_ids(&recovered), later);
        // The shard keeps working: new appends go to a new segment and the damaged
        // one stays on disk for the operator.
        common::start(&spool);
        let fresh = append_acked(&spool, 1, 100).await;
        assert!(spool.get(fresh[0]).unwrap().loc().seq > first_seq);
        spool.maintain().await.unwrap();
        assert!(!crashed.durable_image(first_seq).is_empty());
    });
}

#[test]
fn a_full_disk_is_an_error_and_space_comes_back_after_tombstones() {
    common::run(|| async {
        let storage = SimStorage::new(5);
        storage.set_space_bytes_max(Some(4 * (16 << 10)));
        let (spool, _) = Spool::open(storage.clone(), config()).unwrap();
        common::start(&spool);
        let mut acked = Vec::new();
        let err = loop {
            let msg = common::message(spool.next_id(), 3000, 1);
            match spool.append_message(&msg) {
                Ok(ticket) => {
                    spool.durable(ticket).await.unwrap();
                    acked.push(msg.id);
                }
                Err(err) => break err,
            }
        };
        assert!(
            matches!(err, SpoolError::NoSpace { bytes: 16384, .. }),
            "{err}"
        );
        assert!(err.to_string().starts_with("spool disk is full"), "{err}");
        assert!(acked.len() >= 12, "only {} fit", acked.len());
        // Every acknowledged message is still readable in place.
        for id in &acked {
            assert!(spool.get(*id).is_some());
        }
        for id in &acked {
            spool
                .durable(spool.append_tombstone(*id).unwrap())
                .await
                .unwrap();
        }
        let report = spool.maintain().await.unwrap();
        assert!(report.segments_deleted >= 3, "{report:?}");
        append_acked(&spool, 3, 3000).await;
    });
}

#[test]
fn a_failed_sync_is_never_acknowledged_and_the_spool_recovers() {
    common::run(|| async {
        let (storage, spool) = sim_spool(6);
        let kept = append_acked(&spool, 2, 400).await;
        storage.fail_syncs(1);
        let doomed = common::message(spool.next_id(), 400, 1);
        let ticket = spool.append_message(&doomed).unwrap();
        let err = spool.durable(ticket).await.unwrap_err();
        assert!(matches!(err, SpoolError::SyncFailed { .. }), "{err}");
        // The failed message is abandoned (tombstoned), and once the probe sync that
        // follows succeeds, the spool takes appends again.
        assert!(spool.get(doomed.id).is_none());
        wait_healthy(&spool).await;
        let after = append_acked(&spool, 1, 400).await;
        spool.close().await;
        let (_, recovered) = Spool::open(storage.crash(CrashMode::Clean), config()).unwrap();
        let live = live_ids(&recovered);
        assert_eq!(live, [kept, after].concat());
        assert_eq!(spool.stats().sync_failures, 1);
    });
}

#[test]
fn appends_are_refused_while_unhealthy() {
    common::run(|| async {
        let storage = SimStorage::new(8);
        let (spool, _) = Spool::open(storage.clone(), config()).unwrap();
        // No committer yet: the failure and the refusal can be observed in order.
        storage.fail_syncs(2);
        let msg = common::message(spool.next_id(), 100, 1);
        let ticket = spool.append_message(&msg).unwrap();
        common::start(&spool);
        assert!(spool.durable(ticket).await.is_err());
        let next = common::message(spool.next_id(), 100, 1);
        match spool.append_message(&next) {
            Err(SpoolError::Unhealthy) => {}
            other => panic!("expected Unhealthy, got {other:?}"),
        }
    });
}

#[test]
fn updates_and_tombstones_for_unknown_messages_are_refused() {
    common::run(|| async {
        let (spool, _) = Spool::open(SimStorage::new(9), config()).unwrap();
        let id = spool.next_id();
        let err = spool.append_tombstone(id).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("tombstone for message {id}, which is not live in this spool")
        );
        assert_eq!(spool.stats().appends, 0);
    });
}

#[test]
fn oversized_records_get_a_segment_of_their_own_and_too_large_ones_are_refused() {
    common::run(|| async {
        let storage = SimStorage::new(10);
        let config = SpoolConfig {
            record_bytes_max: 100 << 10,
            ..config()
        };
        let (spool, _) = Spool::open(storage.clone(), config.clone()).unwrap();
        common::start(&spool);
        let big = append_acked(&spool, 1, 50 << 10).await;
        assert_eq!(spool.get(big[0]).unwrap().get().body.len(), 50 << 10);
        let huge = common::message(spool.next_id(), 200 << 10, 1);
        assert!(matches!(
            spool.append_message(&huge),
            Err(SpoolError::RecordTooLarge { max: 102400, .. })
        ));
        spool.close().await;
        let (_, recovered) = Spool::open(storage.crash(CrashMode::Clean), config).unwrap();
        assert_eq!(live_ids(&recovered), big);
    });
}

#[test]
fn what_was_appended_during_a_failed_sync_is_not_acknowledged_by_a_later_one() {
    common::run(|| async {
        let storage = SimStorage::new(11);
        // Syncs take a few scheduler turns, so appends land while one is in flight;
        // one sync at a time keeps the second append in the open epoch meanwhile.
        storage.set_sync_yields(4);
        let config = SpoolConfig {
            commit_syncs_in_flight_max: 1,
            ..config()
        };
        let (spool, _) = Spool::open(storage.clone(), config.clone()).unwrap();
        common::start(&spool);
        let kept = append_acked(&spool, 1, 300).await;
        storage.fail_syncs(1);
        let first = common::message(spool.next_id(), 300, 1);
        let first_ticket = spool.append_message(&first).unwrap();
        // Let the committer close the epoch and start its (failing) sync.
        glommio::executor().yield_task_queue_now().await;
        let during = common::message(spool.next_id(), 300, 1);
        let during_ticket = spool.append_message(&during).unwrap();
        assert_ne!(
            first_ticket, during_ticket,
            "the second append must be in the next epoch"
        );
        assert!(spool.durable(first_ticket).await.is_err());
        // Its own sync would succeed, but its bytes were written beside a failed
        // write-back: it must not be acknowledged.
        let err = spool.durable(during_ticket).await.unwrap_err();
        assert!(
            err.to_string()
                .contains("written while a sync of the same segment failed"),
            "{err}"
        );
        assert!(spool.get(first.id).is_none() && spool.get(during.id).is_none());
        wait_healthy(&spool).await;
        let after = append_acked(&spool, 1, 300).await;
        spool.close().await;
        let (_, recovered) = Spool::open(storage.crash(CrashMode::Clean), config).unwrap();
        assert_eq!(live_ids(&recovered), [kept, after].concat());
    });
}

#[test]
fn overlapping_syncs_acknowledge_only_what_is_durable() {
    common::run(|| async {
        let storage = SimStorage::new(12);
        storage.set_sync_yields(3);
        let (spool, _) = Spool::open(storage.clone(), config()).unwrap();
        common::start(&spool);
        let tasks: Vec<_> = (0..12)
            .map(|i| {
                let spool = spool.clone();
                glommio::spawn_local(async move {
                    let mut ids = Vec::new();
                    for _ in 0..5 {
                        for _ in 0..i {
                            glommio::executor().yield_task_queue_now().await;
                        }
                        let msg = common::message(spool.next_id(), 200, 1);
                        spool
                            .durable(spool.append_message(&msg).unwrap())
                            .await
                            .unwrap();
                        ids.push(msg.id);
                    }
                    ids
                })
            })
            .collect();
        let mut acked = Vec::new();
        for task in tasks {
            acked.extend(task.await);
        }
        let stats = spool.stats();
        assert!(
            stats.syncs_in_flight_max > 1,
            "syncs never overlapped: {stats:?}"
        );
        // Crash without closing: everything acknowledged was durable when it was acked.
        let (_, recovered) = Spool::open(storage.crash(CrashMode::Clean), config()).unwrap();
        acked.sort();
        assert_eq!(live_ids(&recovered), acked);
    });
}

#[test]
fn batches_are_bounded_while_syncs_are_busy() {
    common::run(|| async {
        let storage = SimStorage::new(13);
        storage.set_sync_yields(20);
        let config = SpoolConfig {
            commit_batch_records_max: 3,
            commit_syncs_in_flight_max: 1,
            ..config()
        };
        let (spool, _) = Spool::open(storage.clone(), config.clone()).unwrap();
        common::start(&spool);
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let spool = spool.clone();
                glommio::spawn_local(async move {
                    let msg = common::message(spool.next_id(), 100, 1);
                    spool
                        .durable(spool.append_message(&msg).unwrap())
                        .await
                        .unwrap();
                    msg.id
                })
            })
            .collect();
        let mut acked = Vec::new();
        for task in tasks {
            acked.push(task.await);
        }
        let stats = spool.stats();
        assert!(stats.batch_records_max_seen <= 3, "{stats:?}");
        assert!(
            stats.syncs >= 7,
            "20 records in batches of at most 3: {stats:?}"
        );
        let (_, recovered) = Spool::open(storage.crash(CrashMode::Clean), config).unwrap();
        acked.sort();
        assert_eq!(live_ids(&recovered), acked);
    });
}
