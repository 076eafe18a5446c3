//! Crash test with real processes: a child appends under load and is killed with
//! SIGKILL at random moments, again and again on the same directory. After each kill
//! the spool is recovered and checked: every message whose append was acknowledged is
//! present and intact, every acknowledged tombstone holds, and every record recovered
//! (acknowledged or not) is intact — nothing damaged passes as valid.
//!
//! The child is this test binary run again with `GANNET_SPOOL_CRASH_DIR` set.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gannet_spool::{FileStorage, MessageId, Record, Spool, SpoolConfig};

const CHILD_ENV: &str = "GANNET_SPOOL_CRASH_DIR";
/// The child stops by itself after this long, should the parent die.
const CHILD_LIFETIME_MAX: Duration = Duration::from_secs(30);
const ROUNDS: usize = 15;
const APPENDERS: usize = 32;

fn config() -> SpoolConfig {
    SpoolConfig {
        // Small segments: many rotations, and segments kept alive by one or two
        // messages, which exercises deletion and compaction under the kills.
        segment_bytes: 256 << 10,
        control_reserve_bytes: 16 << 10,
        maintenance_interval_ms: 20,
        ..SpoolConfig::for_shard(0)
    }
}

/// The child: recover, then append from many tasks until killed, printing each
/// acknowledgement only after the append is durable.
#[test]
#[ignore = "run by crash::repeated_sigkill_never_loses_an_acknowledged_record"]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    common::run(move || async move {
        let (spool, _) = Spool::open(FileStorage::open_dir(&dir).unwrap(), config()).unwrap();
        common::start(&spool);
        glommio::spawn_local(spool.clone().run_maintenance()).detach();
        println!("READY");
        let started = Instant::now();
        let tasks: Vec<_> = (0..APPENDERS)
            .map(|task| {
                let spool = spool.clone();
                glommio::spawn_local(async move {
                    let mut rng = fastrand::Rng::with_seed(task as u64 ^ fastrand::u64(..));
                    while started.elapsed() < CHILD_LIFETIME_MAX {
                        let len = rng.usize(0..20_000);
                        let msg = common::message(spool.next_id(), len, 1 + rng.usize(0..3));
                        spool.write(Record::Message(&msg)).await.unwrap();
                        say(&format!("A {} {}", msg.id, msg.body.len()));
                        if rng.u8(..10) != 0 {
                            // Announced first: once appended, a tombstone may reach
                            // recovery (the page cache survives SIGKILL) before it is
                            // acknowledged here.
                            say(&format!("t {}", msg.id));
                            spool
                                .durable(spool.append_tombstone(msg.id).unwrap())
                                .await
                                .unwrap();
                            say(&format!("T {}", msg.id));
                        }
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await;
        }
    });
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").unwrap();
    out.flush().unwrap();
}

#[test]
fn repeated_sigkill_never_loses_an_acknowledged_record() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    // Every acknowledged message with its body length, and acknowledged tombstones.
    let mut acked: BTreeMap<MessageId, usize> = BTreeMap::new();
    let mut ended: BTreeSet<MessageId> = BTreeSet::new();
    let mut ending: BTreeSet<MessageId> = BTreeSet::new();
    let mut total_acks = 0;
    for round in 0..ROUNDS {
        let stderr_path = dir.path().join("child-stderr.txt");
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "crash_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, dir.path().join("spool"))
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.ends_with("READY") {
                    let _ = ready_tx.send(());
                }
                lines.push(line);
            }
            lines
        });
        // Recovery time is not part of the window: kill at a random moment of the load.
        let ready = ready_rx.recv_timeout(Duration::from_secs(20));
        if ready.is_ok() {
            std::thread::sleep(Duration::from_millis(rng.u64(50..500)));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let lines = reader.join().unwrap();
        let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
        assert!(
            ready.is_ok(),
            "round {round}: child never became ready: {lines:?}\n{stderr}"
        );
        for line in &lines {
            let mut words = line.split(' ');
            match (words.next(), words.next(), words.next()) {
                (Some("A"), Some(id), Some(len)) => {
                    acked.insert(id.parse().unwrap(), len.parse().unwrap());
                    total_acks += 1;
                }
                (Some("t"), Some(id), None) => {
                    ending.insert(id.parse().unwrap());
                }
                (Some("T"), Some(id), None) => {
                    ended.insert(id.parse().unwrap());
                }
                _ => {}
            }
        }

        let storage = FileStorage::read_only(dir.path().join("spool")).unwrap();
        let (_, recovered) = Spool::open(storage, config()).unwrap();
        assert_eq!(
            recovered.report.corrupt_regions(),
            0,
            "round {round}: {:?}",
            recovered.report
        );
        let live: BTreeMap<MessageId, &[u8]> = recovered
            .live
            .iter()
            .map(|m| (m.id, m.message.get().body.as_slice()))
            .collect();
        for (id, len) in &acked {
            if ended.contains(id) {
                assert!(
                    !live.contains_key(id),
                    "round {round}: tombstoned {id} came back"
                );
            } else if ending.contains(id) && !live.contains_key(id) {
                // Its tombstone was appended, not yet acknowledged, and survived.
            } else {
                let body = live
                    .get(id)
                    .unwrap_or_else(|| panic!("round {round}: acknowledged {id} lost"));
                assert_eq!(body.len(), *len, "round {round}: {id} has the wrong length");
            }
        }
        for (id, body) in &live {
            assert_eq!(
                *body,
                common::body_for(*id, body.len()).as_slice(),
                "round {round}: {id} damaged"
            );
        }
    }
    assert!(
        total_acks > 1000,
        "only {total_acks} acknowledged appends over {ROUNDS} rounds"
    );
}
