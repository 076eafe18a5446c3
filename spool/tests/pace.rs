//! The group commit's pace on a real executor: an idle core syncs every lone append on
//! its own; a core with work queued on it holds batches, so syncs fall well below appends,
//! and every append is still acknowledged only once durable.

mod common;

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use gannet_spool::{CrashMode, SimStorage, Spool, SpoolConfig};

fn config() -> SpoolConfig {
    SpoolConfig::for_shard(3)
}

#[test]
fn an_idle_core_syncs_each_lone_append_on_its_own() {
    common::run(|| async {
        let storage = SimStorage::new(11);
        let (spool, _) = Spool::open(storage.clone(), config()).unwrap();
        common::start(&spool);
        for _ in 0..20 {
            let msg = common::message(spool.next_id(), 300, 1);
            spool
                .durable(spool.append_message(&msg).unwrap())
                .await
                .unwrap();
        }
        let stats = spool.stats();
        assert_eq!(stats.appends, 20);
        // (Whether a batch was held depends on the OS not preempting this thread, so
        // only the outcome is checked: nothing waits for company that never comes.)
        assert_eq!(stats.syncs, 20, "one sync per lone append: {stats:?}");
    });
}

#[test]
fn a_loaded_core_holds_batches_and_acknowledges_only_what_is_durable() {
    common::run(|| async {
        let storage = SimStorage::new(12);
        let (spool, _) = Spool::open(storage.clone(), config()).unwrap();
        common::start(&spool);
        let stop = Rc::new(Cell::new(false));
        // Tasks that keep the core busy: each works 300 µs between yields, so a woken
        // task waits about that long (or longer) for its turn.
        let hogs: Vec<_> = (0..4)
            .map(|_| {
                let stop = stop.clone();
                glommio::spawn_local(async move {
                    while !stop.get() {
                        let until = Instant::now() + Duration::from_micros(300);
                        while Instant::now() < until {
                            std::hint::spin_loop();
                        }
                        glommio::executor().yield_now().await;
                    }
                })
            })
            .collect();
        let appenders: Vec<_> = (0..16)
            .map(|_| {
                let spool = spool.clone();
                glommio::spawn_local(async move {
                    let mut acked = Vec::new();
                    for _ in 0..25 {
                        let msg = common::message(spool.next_id(), 300, 1);
                        let ticket = spool.append_message(&msg).unwrap();
                        spool.durable(ticket).await.unwrap();
                        acked.push(msg.id);
                        glommio::executor().yield_now().await;
                    }
                    acked
                })
            })
            .collect();
        let mut acked = Vec::new();
        for appender in appenders {
            acked.extend(appender.await);
        }
        stop.set(true);
        for hog in hogs {
            hog.await;
        }
        let stats = spool.stats();
        assert_eq!(stats.appends, 400);
        assert!(stats.gathered_syncs > 0, "no batch was held: {stats:?}");
        assert!(
            stats.syncs * 4 <= stats.appends,
            "a loaded core should sync far less than once per append: {stats:?}"
        );
        // Held batches change when, never whether, an append is durable: a crash now
        // keeps every acknowledged message.
        let (_, recovered) = Spool::open(storage.crash(CrashMode::Torn), config()).unwrap();
        let live: std::collections::BTreeSet<_> = recovered.live.iter().map(|m| m.id).collect();
        assert!(acked.iter().all(|id| live.contains(id)));
    });
}
