//! The spool on real files: mapped segments, io_uring fdatasync, deletion and
//! compaction of segment files, and recovery from the directory.

mod common;

use std::path::Path;

use gannet_spool::{FileStorage, MessageId, Spool, SpoolConfig, UpdateRecord};

fn config() -> SpoolConfig {
    SpoolConfig {
        segment_bytes: 256 << 10,
        control_reserve_bytes: 8 << 10,
        ..SpoolConfig::for_shard(2)
    }
}

fn disk_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

#[test]
fn messages_survive_a_restart_with_their_retry_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let (ids, updated) = common::run({
        let path = path.clone();
        move || async move {
            let (spool, recovered) =
                Spool::open(FileStorage::open_dir(&path).unwrap(), config()).unwrap();
            assert!(recovered.live.is_empty());
            common::start(&spool);
            let mut ids = Vec::new();
            for i in 0..300 {
                let msg = common::message(spool.next_id(), 100 + i * 37, 1 + i % 3);
                spool
                    .write(gannet_spool::Record::Message(&msg))
                    .await
                    .unwrap();
                ids.push(msg.id);
            }
            let update = UpdateRecord {
                id: ids[7],
                attempts: 4,
                due_unix_ms: 1234,
                queue: "later".into(),
                done: vec![0],
            };
            spool
                .write(gannet_spool::Record::Update(&update))
                .await
                .unwrap();
            for id in &ids[100..200] {
                spool
                    .durable(spool.append_tombstone(*id).unwrap())
                    .await
                    .unwrap();
            }
            spool.close().await;
            (ids, update)
        }
    });
    common::run(move || async move {
        let (spool, recovered) =
            Spool::open(FileStorage::open_dir(&path).unwrap(), config()).unwrap();
        let want: Vec<MessageId> = ids[..100].iter().chain(&ids[200..]).copied().collect();
        let got: Vec<MessageId> = recovered.live.iter().map(|m| m.id).collect();
        assert_eq!(got, want);
        assert!(
            recovered.report.segments.iter().all(|s| s.is_clean()),
            "{:?}",
            recovered.report
        );
        for live in &recovered.live {
            let body = live.message.get().body.as_slice();
            assert_eq!(body, common::body_for(live.id, body.len()).as_slice());
        }
        let seventh = recovered.live.iter().find(|m| m.id == updated.id).unwrap();
        assert_eq!(
            (seventh.state.attempts, seventh.state.due_unix_ms),
            (4, 1234)
        );
        assert_eq!(seventh.state.queue, "later");
        assert_eq!(seventh.state.done, vec![0]);
        // New ids sort after everything recovered.
        assert!(spool.next_id() > *ids.last().unwrap());
    });
}

#[test]
fn concurrent_appenders_share_syncs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    common::run(move || async move {
        let (spool, _) = Spool::open(FileStorage::open_dir(&path).unwrap(), config()).unwrap();
        common::start(&spool);
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let spool = spool.clone();
                glommio::spawn_local(async move {
                    for _ in 0..20 {
                        let msg = common::message(spool.next_id(), 2000, 1);
                        spool
                            .write(gannet_spool::Record::Message(&msg))
                            .await
                            .unwrap();
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await;
        }
        let stats = spool.stats();
        assert_eq!(stats.appends, 64 * 20);
        assert!(
            stats.syncs * 4 <= stats.appends,
            "{} syncs for {} appends",
            stats.syncs,
            stats.appends
        );
        spool.close().await;
    });
}

#[test]
fn disk_use_follows_the_live_set_despite_long_lived_messages() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let config = config();
    let segment_bytes = config.segment_bytes as u64;
    common::run(move || async move {
        let (spool, _) =
            Spool::open(FileStorage::open_dir(&path).unwrap(), config.clone()).unwrap();
        common::start(&spool);
        let mut keep = Vec::new();
        for i in 0..3000 {
            let msg = common::message(spool.next_id(), 1000, 1);
            spool
                .write(gannet_spool::Record::Message(&msg))
                .await
                .unwrap();
            // One message in 100 lives on (a slow destination); the rest are delivered.
            if i % 100 == 0 {
                keep.push(msg.id);
            } else {
                spool
                    .durable(spool.append_tombstone(msg.id).unwrap())
                    .await
                    .unwrap();
            }
        }
        let before = disk_bytes(&path);
        let report = spool.maintain().await.unwrap();
        let after = disk_bytes(&path);
        let stats = spool.stats();
        assert!(report.messages_copied > 0, "{report:?}");
        assert!(before > 10 * segment_bytes, "only {before} bytes written");
        // Live set is ~30 KiB; allow the active segment, two of slack and 100% overhead.
        assert!(
            after <= 4 * segment_bytes,
            "{after} bytes on disk for {} live bytes",
            stats.live_bytes
        );
        assert_eq!(stats.live_messages, keep.len() as u64);
        spool.close().await;
        drop(spool); // releases the directory lock
        let (_, recovered) = Spool::open(FileStorage::open_dir(&path).unwrap(), config).unwrap();
        assert_eq!(
            recovered.live.iter().map(|m| m.id).collect::<Vec<_>>(),
            keep
        );
    });
}

#[test]
fn a_spool_directory_holding_junk_is_reported_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("00000000000000000001.seg"), b"short").unwrap();
    std::fs::write(dir.path().join("notes.txt"), b"ignored").unwrap();
    std::fs::write(
        dir.path().join("00000000000000000002.seg"),
        vec![0xa5u8; 8192],
    )
    .unwrap();
    let path = dir.path().to_path_buf();
    common::run(move || async move {
        let (spool, recovered) =
            Spool::open(FileStorage::open_dir(&path).unwrap(), config()).unwrap();
        let reasons: Vec<_> = recovered
            .report
            .segments
            .iter()
            .map(|s| (s.seq, s.unusable.clone()))
            .collect();
        assert_eq!(
            reasons,
            vec![
                (2, Some("bad segment magic".to_string())),
                (1, Some("file is only 5 bytes".to_string()))
            ]
        );
        common::start(&spool);
        let msg = common::message(spool.next_id(), 10, 1);
        spool
            .write(gannet_spool::Record::Message(&msg))
            .await
            .unwrap();
        assert_eq!(spool.get(msg.id).unwrap().loc().seq, 3);
        spool.close().await;
    });
}

#[test]
fn a_shard_directory_has_one_writer_and_no_reader_while_it_runs() {
    let dir = tempfile::tempdir().unwrap();
    let first = FileStorage::open_dir(dir.path()).unwrap();
    let second = FileStorage::open_dir(dir.path()).unwrap_err();
    assert!(
        second.to_string().contains("is in use by another process"),
        "{second}"
    );
    assert!(FileStorage::read_only(dir.path()).is_err());
    drop(first);
    let reader = FileStorage::read_only(dir.path()).unwrap();
    assert!(FileStorage::read_only(dir.path()).is_ok(), "readers share");
    assert!(
        FileStorage::open_dir(dir.path()).is_err(),
        "no writer while read"
    );
    drop(reader);
}
