//! The spool on real files: mapped segments, io_uring fdatasync, deletion and
//! compaction of segment files, and recovery from the directory.

mod common;

use std::rc::Rc;

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
        // Each record holds its 2000-byte body and a header of less than a KiB.
        assert!(
            (64 * 20 * 2000..64 * 20 * 3000).contains(&stats.appended_bytes),
            "{} bytes appended",
            stats.appended_bytes
        );
        assert!(
            stats.syncs * 4 <= stats.appends,
            "{} syncs for {} appends",
            stats.syncs,
            stats.appends
        );
        // Every sync was timed, into the bucket its duration belongs to.
        let latency = &stats.sync_latency;
        assert_eq!(latency.counts.iter().sum::<u64>(), stats.syncs);
        assert!(
            latency.sum_us > 0,
            "a real fdatasync takes time: {latency:?}"
        );
        spool.close().await;
    });
}

/// Staged records reach their file through the spool's writer thread — at each
/// sync, and when a stage fills between syncs — never on the executor (unless the
/// stage fills while a write is in flight), and every acknowledged message is
/// recovered whole from the file.
#[test]
fn stages_are_written_by_the_writer_thread() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let config = || SpoolConfig {
        segment_bytes: 16 << 20,
        ..config()
    };
    let (ids, stats) = common::run({
        let path = path.clone();
        move || async move {
            let (spool, _) = Spool::open(FileStorage::open_dir(&path).unwrap(), config()).unwrap();
            // 64 records of 40 KiB, 2.5 MiB, appended before the committer starts:
            // the 1 MiB stage fills twice and goes out to the writer thread each
            // time, and the sync writes the rest.
            let mut ids = Vec::new();
            let mut last = None;
            for _ in 0..64 {
                let msg = common::message(spool.next_id(), 40 << 10, 1);
                last = Some(spool.append_message(&msg).unwrap());
                ids.push(msg.id);
                // Let a full stage's write end (the writer thread wakes this
                // executor) before the next stage fills.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
                while spool.stats().stage_writes_in_flight > 0
                    && std::time::Instant::now() < deadline
                {
                    glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
                }
            }
            common::start(&spool);
            spool.durable(last.unwrap()).await.unwrap();
            let stats = spool.stats();
            spool.close().await;
            (ids, stats)
        }
    });
    assert_eq!(stats.stage_writes_inline, 0, "{stats:?}");
    assert_eq!((stats.stage_writes, stats.syncs), (3, 1), "{stats:?}");
    common::run(move || async move {
        let (_spool, recovered) =
            Spool::open(FileStorage::open_dir(&path).unwrap(), config()).unwrap();
        let mut got: Vec<MessageId> = recovered.live.iter().map(|m| m.id).collect();
        let mut want = ids;
        got.sort();
        want.sort();
        assert_eq!(got, want);
        for live in &recovered.live {
            let body = live.message.get().body.as_slice();
            assert_eq!(body, common::body_for(live.id, body.len()).as_slice());
        }
    });
}

/// The write barrier runs before every write of records, on the thread that writes
/// them: whatever the owner buffered before an append (the engine's events) reaches
/// the page cache before the record does.
#[test]
fn the_write_barrier_runs_before_every_write_of_records() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    // The owner's "events": how many records it announced before appending them.
    let announced = Arc::new(AtomicUsize::new(0));
    // What each barrier call saw: (thread name, announced, ids found in the file).
    let calls: Arc<Mutex<Vec<(String, usize, usize)>>> = Arc::default();
    let ids: Arc<Mutex<Vec<MessageId>>> = Arc::default();
    let barrier = {
        let (announced, calls, ids, path) =
            (announced.clone(), calls.clone(), ids.clone(), path.clone());
        gannet_spool::segment::WriteBarrier(Arc::new(move || {
            let seen = announced.load(Ordering::SeqCst);
            let mut file = Vec::new();
            for entry in std::fs::read_dir(&path).unwrap() {
                file.extend(std::fs::read(entry.unwrap().path()).unwrap());
            }
            let ids = ids.lock().unwrap().clone();
            let in_file = ids
                .iter()
                .filter(|id| memchr_find(&file, format!("{id} line 00000000").as_bytes()))
                .count();
            let thread = std::thread::current().name().unwrap_or("").to_string();
            calls.lock().unwrap().push((thread, seen, in_file));
        }))
    };
    let config = move || SpoolConfig {
        segment_bytes: 16 << 20,
        write_barrier: Some(barrier.clone()),
        ..config()
    };
    let stats = common::run({
        let (path, announced, ids) = (path.clone(), announced.clone(), ids.clone());
        move || async move {
            let (spool, _) = Spool::open(FileStorage::open_dir(&path).unwrap(), config()).unwrap();
            let mut last = None;
            for _ in 0..64 {
                let msg = common::message(spool.next_id(), 40 << 10, 1);
                ids.lock().unwrap().push(msg.id);
                announced.fetch_add(1, Ordering::SeqCst);
                last = Some(spool.append_message(&msg).unwrap());
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
                while spool.stats().stage_writes_in_flight > 0
                    && std::time::Instant::now() < deadline
                {
                    glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
                }
            }
            common::start(&spool);
            spool.durable(last.unwrap()).await.unwrap();
            let stats = spool.stats();
            spool.close().await;
            stats
        }
    });
    let calls = calls.lock().unwrap().clone();
    assert_eq!(
        calls.len() as u64,
        stats.stage_writes + stats.stage_writes_inline,
        "{calls:?}"
    );
    assert!(calls.len() >= 3, "{calls:?}");
    // Each write carried only records announced before its barrier ran: at every
    // barrier, the file holds no more records than were announced at the one before.
    for pair in calls.windows(2) {
        assert!(pair[1].2 <= pair[0].1, "{calls:?}");
    }
    assert!(calls.iter().all(|c| c.0 == "gannet-spool-2"), "{calls:?}");
}

fn memchr_find(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
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

/// Whether any extent of `path` is allocated but unwritten (fallocate's kind), by
/// FIEMAP; None when the filesystem does not report extents.
fn has_unwritten_extents(path: &Path) -> Option<bool> {
    use std::os::fd::AsRawFd;
    const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
    const FIEMAP_FLAG_SYNC: u32 = 1;
    const FIEMAP_EXTENT_UNWRITTEN: u32 = 0x800;
    const EXTENTS: usize = 64;
    // struct fiemap (32 bytes) followed by EXTENTS struct fiemap_extent (56 bytes).
    let mut buf = vec![0u64; (32 + 56 * EXTENTS) / 8];
    buf[1] = u64::MAX; // fm_length
    let words = buf.as_mut_ptr().cast::<u32>();
    // SAFETY: `buf` is large enough for the header and EXTENTS extents; the u32
    // fields written are fm_flags (word 4) and fm_extent_count (word 6).
    unsafe {
        *words.add(4) = FIEMAP_FLAG_SYNC;
        *words.add(6) = EXTENTS as u32;
    }
    let file = std::fs::File::open(path).unwrap();
    // SAFETY: FS_IOC_FIEMAP reads and writes within the buffer sized above.
    if unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP, buf.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: fm_mapped_extents (word 5), filled in by the kernel.
    let mapped = unsafe { *words.add(5) } as usize;
    Some((0..mapped.min(EXTENTS)).any(|i| {
        // fe_flags: 40 bytes into extent i.
        // SAFETY: within the buffer (i < EXTENTS).
        let flags = unsafe { *words.add((32 + 56 * i + 40) / 4) };
        flags & FIEMAP_EXTENT_UNWRITTEN != 0
    }))
}

/// Once the active segment is an eighth used, the spool fills a spare file with
/// zeros and makes it the next segment ahead of time (header, name, sync slots), so
/// that the rotation does no blocking work: segment 2 exists, empty, before the first
/// one is full, and becomes the active one (same inode) with its blocks written —
/// unlike the first one, preallocated with fallocate, whose extents are unwritten
/// (where the filesystem reports extents). A stale spare is removed when the
/// directory is opened again, messages in a segment made from a spare recover, and a
/// prepared segment never used reads as an empty segment.
#[test]
fn spare_segments_are_filled_ahead_and_become_the_next_segment() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let spare = path.join(gannet_spool::SPARE_FILE_NAME);
    let ids = common::run({
        let (path, spare) = (path.clone(), spare.clone());
        move || async move {
            let storage = FileStorage::open_dir(&path).unwrap();
            let first = storage.segment_path(1);
            let second = storage.segment_path(2);
            let third = storage.segment_path(3);
            let (spool, _) = Spool::open(storage, config()).unwrap();
            common::start(&spool);
            let mut ids = Vec::new();
            let write = async |count: usize, ids: &mut Vec<MessageId>| {
                for _ in 0..count {
                    let msg = common::message(spool.next_id(), 4000, 1);
                    spool
                        .write(gannet_spool::Record::Message(&msg))
                        .await
                        .unwrap();
                    ids.push(msg.id);
                }
            };
            // Under an eighth of 256 KiB: nothing prepared yet.
            write(4, &mut ids).await;
            spool.prepare_next_segment().await;
            assert!(!spare.exists());
            assert!(!second.exists());
            write(8, &mut ids).await;
            spool.prepare_next_segment().await;
            assert!(!spare.exists(), "the spare became segment 2");
            let meta = std::fs::metadata(&second).unwrap();
            assert_eq!(meta.len(), 256 << 10);
            // Past the first segment's end: segment 2 is the one prepared.
            write(60, &mut ids).await;
            assert_eq!(std::fs::metadata(&second).unwrap().ino(), meta.ino());
            if let Some(unwritten) = has_unwritten_extents(&first) {
                assert!(unwritten, "fallocate leaves unwritten extents");
                assert_eq!(has_unwritten_extents(&second), Some(false));
            }
            // Segment 3 is prepared and then never used.
            spool.prepare_next_segment().await;
            assert!(third.exists());
            spool.close().await;
            ids
        }
    });
    std::fs::write(&spare, b"half filled by a run that crashed").unwrap();
    common::run(move || async move {
        let (_spool, recovered) =
            Spool::open(FileStorage::open_dir(&path).unwrap(), config()).unwrap();
        assert!(!spare.exists());
        let got: Vec<MessageId> = recovered.live.iter().map(|m| m.id).collect();
        assert_eq!(got, ids);
        assert!(recovered.report.segments.iter().all(|s| s.is_clean()));
        let unused = recovered.report.segments.iter().find(|s| s.seq == 3);
        assert_eq!(unused.map(|s| s.records), Some(0), "{:?}", recovered.report);
    });
}

/// A record larger than a segment gets a segment of its own sized to fit: if the next
/// segment was prepared ahead at the ordinary size, that one is dropped (never renamed
/// over, never reused at the wrong size) and everything recovers.
#[test]
fn a_prepared_segment_of_the_wrong_size_is_dropped_for_an_oversized_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let ids = common::run({
        let path = path.clone();
        move || async move {
            let storage = FileStorage::open_dir(&path).unwrap();
            let second = storage.segment_path(2);
            let (spool, _) = Spool::open(storage, config()).unwrap();
            common::start(&spool);
            let mut ids = Vec::new();
            for body in [40_000, 40_000] {
                let msg = common::message(spool.next_id(), body, 1);
                spool
                    .write(gannet_spool::Record::Message(&msg))
                    .await
                    .unwrap();
                ids.push(msg.id);
            }
            spool.prepare_next_segment().await;
            assert_eq!(std::fs::metadata(&second).unwrap().len(), 256 << 10);
            let big = common::message(spool.next_id(), 400_000, 1);
            spool
                .write(gannet_spool::Record::Message(&big))
                .await
                .unwrap();
            ids.push(big.id);
            let len = std::fs::metadata(&second).unwrap().len();
            assert!(len > 400_000, "segment 2 is the oversized one: {len}");
            let after = common::message(spool.next_id(), 1000, 1);
            spool
                .write(gannet_spool::Record::Message(&after))
                .await
                .unwrap();
            ids.push(after.id);
            spool.close().await;
            ids
        }
    });
    common::run(move || async move {
        let (_spool, recovered) =
            Spool::open(FileStorage::open_dir(&path).unwrap(), config()).unwrap();
        let got: Vec<MessageId> = recovered.live.iter().map(|m| m.id).collect();
        assert_eq!(got, ids);
        assert!(recovered.report.segments.iter().all(|s| s.is_clean()));
    });
}

/// A rotation that takes the next number while its spare is still being filled wins
/// (the rename never replaces a segment); the filled spare is kept and becomes the
/// segment after, without being filled again.
#[test]
fn a_spare_that_lost_its_number_to_a_rotation_serves_the_next_one() {
    use gannet_spool::Storage;
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    common::run(move || async move {
        let storage = FileStorage::open_dir(&path).unwrap();
        let len = 256 << 10;
        // The rotation made segment 2 itself (fallocate) before the spare was ready.
        let _second = storage.create(2, 7, len).unwrap();
        storage.prepare_next(2, 7, len).await;
        assert_eq!(storage.prepared(), None);
        let spare = path.join(gannet_spool::SPARE_FILE_NAME);
        let inode = std::fs::metadata(&spare).expect("the spare is kept").ino();
        storage.prepare_next(3, 7, len).await;
        assert_eq!(storage.prepared(), Some((3, len)));
        assert!(!spare.exists());
        let third = std::fs::metadata(storage.segment_path(3)).unwrap();
        assert_eq!(third.ino(), inode, "the kept spare became segment 3");
        let segment = storage.create(3, 7, len).unwrap();
        assert_eq!(segment.seq(), 3);
    });
}

/// While a prepared segment is being published under its number (off the
/// executor), the storage says so, and a rotation takes the number after it: the
/// two never meet on one file (they did: "File exists" refused appends until the
/// publication ended). The late one, published, is an empty segment the next
/// creation removes.
#[test]
fn a_rotation_during_a_publication_takes_the_next_number() {
    use gannet_spool::Storage;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    common::run(move || async move {
        let storage = Rc::new(FileStorage::open_dir(&path).unwrap());
        let len = 256 << 10;
        let _first = storage.create(1, 7, len).unwrap();
        // The publication (a rename and two fsyncs) is watched from this task every
        // 50 µs; a fast disk may finish one unseen, so up to 20 are tried.
        let mut seq = 2;
        for _ in 0..20 {
            let preparing = glommio::spawn_local({
                let storage = storage.clone();
                async move { storage.prepare_next(seq, 7, len).await }
            });
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while storage.publishing().is_none() && storage.prepared().is_none() {
                glommio::timer::sleep(std::time::Duration::from_micros(50)).await;
                assert!(std::time::Instant::now() < deadline, "no publication");
            }
            if storage.publishing() != Some(seq) {
                // Published before it was seen: the rotation finds it prepared.
                preparing.await;
                assert_eq!(storage.create(seq, 7, len).unwrap().seq(), seq);
                seq += 1;
                continue;
            }
            // What the spool's rotation does now: the number after.
            let next = storage.create(seq + 1, 7, len).unwrap();
            assert_eq!(next.seq(), seq + 1);
            preparing.await;
            assert_eq!(storage.publishing(), None);
            assert_eq!(storage.prepared(), Some((seq, len)));
            // The next creation finds the prepared segment is not its own: removed.
            let _after = storage.create(seq + 2, 7, len).unwrap();
            assert!(!storage.segment_path(seq).exists());
            let listed = storage.list().unwrap();
            assert_eq!(listed.last(), Some(&(seq + 2)));
            assert!(!listed.contains(&seq), "{listed:?}");
            return;
        }
        panic!("no publication was seen in progress in 20 tries");
    });
}

/// The next segment is asked for by the append that finds the active one an eighth
/// full, not at the next maintenance round: with rounds a minute apart, every
/// rotation after the first still finds its segment prepared (none is made on the
/// executor), and every acknowledged message reads back after a restart.
#[test]
fn appends_ask_for_the_next_segment_before_the_active_one_runs_out() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let config = SpoolConfig {
        segment_bytes: 1 << 20,
        maintenance_interval_ms: 60_000,
        ..config()
    };
    let ids = common::run({
        let (path, config) = (path.clone(), config.clone());
        move || async move {
            let (spool, _) = Spool::open(FileStorage::open_dir(&path).unwrap(), config).unwrap();
            common::start(&spool);
            glommio::spawn_local(spool.clone().run_maintenance()).detach();
            let mut ids = Vec::new();
            // About 95 messages of 10 KiB fill a segment: six rotations.
            for _ in 0..600 {
                let msg = common::message(spool.next_id(), 10 << 10, 1);
                spool
                    .write(gannet_spool::Record::Message(&msg))
                    .await
                    .unwrap();
                ids.push(msg.id);
            }
            let stats = spool.stats();
            assert!(stats.segments >= 6, "{stats:?}");
            assert_eq!(
                stats.segments_created_unprepared, 1,
                "only the first segment was made at a rotation: {stats:?}"
            );
            spool.close().await;
            ids
        }
    });
    common::run(move || async move {
        let (_, recovered) = Spool::open(FileStorage::open_dir(&path).unwrap(), config).unwrap();
        let got: Vec<MessageId> = recovered.live.iter().map(|m| m.id).collect();
        assert_eq!(got, ids);
    });
}
