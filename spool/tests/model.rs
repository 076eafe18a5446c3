//! Property tests: any sequence of appends, updates, tombstones, maintenance passes and
//! crashes recovers to what a simple model of the spool says.

mod common;

use std::collections::BTreeMap;

use gannet_spool::{CrashMode, MessageId, SimStorage, Spool, SpoolConfig, UpdateRecord};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Append {
        body_len: usize,
        recipients: usize,
    },
    /// Update the n-th live message (modulo the live count).
    Update {
        pick: usize,
        attempts: u32,
        due: u64,
    },
    Tombstone {
        pick: usize,
    },
    Maintain,
    /// Crash after everything appended so far was acknowledged.
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0usize..3000, 1usize..4).prop_map(|(body_len, recipients)| Op::Append { body_len, recipients }),
        2 => (any::<usize>(), 1u32..20, any::<u64>()).prop_map(|(pick, attempts, due)| Op::Update { pick, attempts, due }),
        3 => any::<usize>().prop_map(|pick| Op::Tombstone { pick }),
        1 => Just(Op::Maintain),
        1 => Just(Op::Crash),
    ]
}

/// What the model remembers of a live message.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Model {
    body: Vec<u8>,
    recipients: usize,
    attempts: u32,
    due: u64,
    queue: String,
}

fn config() -> SpoolConfig {
    SpoolConfig {
        // Tiny segments: rotation, oversized records and compaction all happen.
        segment_bytes: 8 << 10,
        space_overhead_percent_max: 10,
        ..SpoolConfig::for_shard(3)
    }
}

fn check_recovered(recovered: &gannet_spool::Recovered, model: &BTreeMap<MessageId, Model>) {
    let got: BTreeMap<MessageId, Model> = recovered
        .live
        .iter()
        .map(|m| {
            let record = m.message.get();
            let state = Model {
                body: record.body.to_vec(),
                recipients: record.recipients.len(),
                attempts: m.state.attempts,
                due: m.state.due_unix_ms,
                queue: m.state.queue.clone(),
            };
            (m.id, state)
        })
        .collect();
    assert_eq!(got.len(), model.len(), "live count");
    assert_eq!(&got, model);
    assert_eq!(
        recovered.report.torn_bytes(),
        0,
        "a clean crash tears nothing"
    );
    assert_eq!(recovered.report.corrupt_regions(), 0);
}

fn run_ops(seed: u64, ops: Vec<Op>) {
    common::run(move || async move {
        let mut storage = SimStorage::new(seed);
        let (mut spool, _) = Spool::open(storage.clone(), config()).unwrap();
        common::start(&spool);
        let mut model: BTreeMap<MessageId, Model> = BTreeMap::new();
        for op in ops {
            match op {
                Op::Append {
                    body_len,
                    recipients,
                } => {
                    let id = spool.next_id();
                    let msg = common::message(id, body_len, recipients);
                    spool
                        .durable(spool.append_message(&msg).unwrap())
                        .await
                        .unwrap();
                    let state = Model {
                        body: msg.body,
                        recipients,
                        attempts: 0,
                        due: 0,
                        queue: msg.queue,
                    };
                    model.insert(id, state);
                }
                Op::Update {
                    pick,
                    attempts,
                    due,
                } if !model.is_empty() => {
                    let id = *model.keys().nth(pick % model.len()).unwrap();
                    let queue = format!("retry-{attempts}");
                    let update = UpdateRecord {
                        id,
                        attempts,
                        due_unix_ms: due,
                        queue: queue.clone(),
                        done: vec![0],
                    };
                    spool
                        .durable(spool.append_update(&update).unwrap())
                        .await
                        .unwrap();
                    let m = model.get_mut(&id).unwrap();
                    (m.attempts, m.due, m.queue) = (attempts, due, queue);
                }
                Op::Tombstone { pick } if !model.is_empty() => {
                    let id = *model.keys().nth(pick % model.len()).unwrap();
                    spool
                        .durable(spool.append_tombstone(id).unwrap())
                        .await
                        .unwrap();
                    model.remove(&id);
                    assert!(spool.get(id).is_none());
                }
                Op::Maintain => {
                    spool.maintain().await.unwrap();
                    let stats = spool.stats();
                    assert_eq!(stats.live_messages, model.len() as u64);
                }
                Op::Crash => {
                    spool.close().await;
                    storage = storage.crash(CrashMode::Clean);
                    let (reopened, recovered) = Spool::open(storage.clone(), config()).unwrap();
                    check_recovered(&recovered, &model);
                    spool = reopened;
                    common::start(&spool);
                }
                Op::Update { .. } | Op::Tombstone { .. } => {}
            }
            // Zero-copy reads agree with the model at every step.
            for (id, m) in &model {
                assert_eq!(
                    spool.get(*id).expect("live").get().body.as_slice(),
                    m.body.as_slice()
                );
            }
        }
        spool.close().await;
        let (_, recovered) = Spool::open(storage.crash(CrashMode::Clean), config()).unwrap();
        check_recovered(&recovered, &model);
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn recovery_matches_the_model(seed in any::<u64>(), ops in prop::collection::vec(op(), 1..120)) {
        run_ops(seed, ops);
    }
}

/// Messages appended with no acknowledgement awaited, then a torn crash: everything
/// that was acknowledged is recovered intact, and everything recovered is intact.
fn torn_crash(seed: u64, acked: usize, unacked: usize, body_len: usize) {
    common::run(move || async move {
        let storage = SimStorage::new(seed);
        let (spool, _) = Spool::open(storage.clone(), config()).unwrap();
        common::start(&spool);
        let mut bodies = BTreeMap::new();
        for _ in 0..acked {
            let msg = common::message(spool.next_id(), body_len, 1);
            spool
                .durable(spool.append_message(&msg).unwrap())
                .await
                .unwrap();
            bodies.insert(msg.id, (msg.body, true));
        }
        // Appended, never synced: the committer is not given a chance to run.
        for _ in 0..unacked {
            let msg = common::message(spool.next_id(), body_len, 1);
            let _unsynced = spool.append_message(&msg).unwrap();
            bodies.insert(msg.id, (msg.body, false));
        }
        let (_, recovered) = Spool::open(storage.crash(CrashMode::Torn), config()).unwrap();
        for m in &recovered.live {
            let (body, _) = bodies
                .get(&m.id)
                .expect("recovered an id that was never written");
            assert_eq!(
                m.message.get().body.as_slice(),
                body.as_slice(),
                "recovered body differs"
            );
        }
        let ids: Vec<_> = recovered.live.iter().map(|m| m.id).collect();
        for (id, (_, acked)) in &bodies {
            if *acked {
                assert!(ids.contains(id), "acknowledged {id} lost");
            }
        }
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn torn_crashes_keep_every_acknowledged_message(
        seed in any::<u64>(), acked in 0usize..20, unacked in 1usize..20, body_len in 0usize..3000,
    ) {
        torn_crash(seed, acked, unacked, body_len);
    }
}
