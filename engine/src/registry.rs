//! The transmissions accepted through SparkPost's API, for its list, get and delete:
//! each one's description, its state and its counts (recipients, generated, failed,
//! suppressed).
//!
//! Shared by every shard (one lock, taken once per transmission and per generated
//! chunk, never per message). Kept in `<data_dir>/transmissions.jsonl`, an
//! append-only log of each transmission's record as accepted and as finished (or
//! canceled). A scheduled transmission's record and a cancellation are written and
//! fsynced before the API answers; the others are written by a flusher thread within
//! half a second (no write or sync on the injection path; a crash loses at most those
//! lines: the transmission's messages are in the spool either way). Read back at
//! start-up (a torn last line ignored); only the newest `KEPT` transmissions are kept
//! (a log with many more lines is rewritten whole). Counts made while a transmission
//! was generating when gannetd stopped restart from its last written record.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};

const FILE: &str = "transmissions.jsonl";
/// Transmissions remembered (the newest).
const KEPT: usize = 10_000;

/// What is written of a transmission.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub campaign_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_id: Option<String>,
    /// When its messages may be sent (its start_time, or when it was accepted).
    pub start_ms: u64,
    pub created_ms: u64,
    /// Recipients accepted, and refused for a bad address.
    pub num_rcpts: u64,
    pub num_invalid_recipients: u64,
    #[serde(default)]
    pub num_generated: u64,
    #[serde(default)]
    pub num_failed_gen: u64,
    #[serde(default)]
    pub num_suppressed: u64,
    #[serde(default)]
    pub canceled: bool,
    #[serde(default)]
    pub generation_end_ms: Option<u64>,
}

/// A transmission being counted.
#[derive(Debug)]
pub struct Transmission {
    pub record: Record,
    generated: AtomicU64,
    failed: AtomicU64,
    suppressed: AtomicU64,
    canceled: AtomicBool,
    /// Written as finished already.
    finished: AtomicBool,
}

impl Transmission {
    fn new(record: Record) -> Transmission {
        Transmission {
            generated: AtomicU64::new(record.num_generated),
            failed: AtomicU64::new(record.num_failed_gen),
            suppressed: AtomicU64::new(record.num_suppressed),
            canceled: AtomicBool::new(record.canceled),
            finished: AtomicBool::new(record.generation_end_ms.is_some() || record.canceled),
            record,
        }
    }

    pub fn canceled(&self) -> bool {
        self.canceled.load(Ordering::Acquire)
    }

    /// Counts recipients generated, failed and suppressed.
    pub fn count(&self, generated: u64, failed: u64, suppressed: u64) {
        self.generated.fetch_add(generated, Ordering::Relaxed);
        self.failed.fetch_add(failed, Ordering::Relaxed);
        self.suppressed.fetch_add(suppressed, Ordering::Relaxed);
    }

    /// Every recipient has been dealt with.
    fn done(&self) -> bool {
        self.generated.load(Ordering::Relaxed)
            + self.failed.load(Ordering::Relaxed)
            + self.suppressed.load(Ordering::Relaxed)
            >= self.record.num_rcpts
    }

    /// The record as of now.
    pub fn snapshot(&self) -> Record {
        let mut record = self.record.clone();
        record.num_generated = self.generated.load(Ordering::Relaxed);
        record.num_failed_gen = self.failed.load(Ordering::Relaxed);
        record.num_suppressed = self.suppressed.load(Ordering::Relaxed);
        record.canceled = self.canceled();
        record
    }

    /// SparkPost's state: "submitted" (scheduled: its start time is ahead),
    /// "Generating", "Success" or "Canceled".
    pub fn state(&self, now_ms: u64) -> &'static str {
        if self.canceled() {
            "Canceled"
        } else if !self.done() {
            "Generating"
        } else if self.record.start_ms > now_ms {
            "submitted"
        } else {
            "Success"
        }
    }
}

/// Every transmission remembered.
#[derive(Debug)]
pub struct Transmissions {
    map: Mutex<BTreeMap<String, Arc<Transmission>>>,
    log: Arc<Log>,
}

/// The log file and the lines waiting for the flusher.
#[derive(Debug)]
struct Log {
    file: Mutex<File>,
    pending: Mutex<Vec<u8>>,
}

impl Log {
    /// Writes (and syncs) the waiting lines.
    fn flush(&self) {
        let mut file = self.file.lock().unwrap_or_else(PoisonError::into_inner);
        let lines =
            std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner));
        if lines.is_empty() {
            return;
        }
        if let Err(err) = file.write_all(&lines).and_then(|()| file.sync_data()) {
            tracing::error!("writing the transmissions log: {err}");
        }
    }
}

impl Transmissions {
    pub fn open(data_dir: &Path) -> anyhow::Result<Transmissions> {
        let path = data_dir.join(FILE);
        let log = crate::json::read_log::<Record>(&path)?;
        let mut records: BTreeMap<String, Record> = BTreeMap::new();
        for record in log.values {
            records.insert(record.id.clone(), record);
        }
        // Ids are message ids: in time order. The newest KEPT stay.
        while records.len() > KEPT {
            records.pop_first();
        }
        if log.lines > 2 * records.len() + 1000 || log.torn {
            crate::json::rewrite_log(&path, records.values())?;
        }
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let map = records
            .into_iter()
            .map(|(id, record)| (id, Arc::new(Transmission::new(record))))
            .collect();
        let log = Arc::new(Log {
            file: Mutex::new(file),
            pending: Mutex::new(Vec::new()),
        });
        let weak = Arc::downgrade(&log);
        std::thread::Builder::new()
            .name("gannet-txlog".into())
            .spawn(move || {
                // Ends when the registry is dropped.
                while let Some(log) = weak.upgrade() {
                    log.flush();
                    drop(log);
                    std::thread::sleep(std::time::Duration::from_millis(500));
                }
            })?;
        Ok(Transmissions {
            map: Mutex::new(map),
            log,
        })
    }

    /// Queues a record's line for the flusher; with `sync`, writes it (and every
    /// line before it) and syncs now (blocking).
    fn write(&self, record: &Record, sync: bool) {
        {
            let mut pending = self
                .log
                .pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            // A Record always serialises.
            let _ = serde_json::to_writer(&mut *pending, record);
            pending.push(b'\n');
        }
        if sync {
            self.log.flush();
        }
    }

    /// Remembers a transmission just accepted. A scheduled one (`start_ms` ahead of
    /// `now_ms`) is written and synced before this returns (blocking); the others
    /// within half a second.
    pub fn add(&self, record: Record, now_ms: u64) -> Arc<Transmission> {
        self.write(&record, record.start_ms > now_ms);
        let transmission = Arc::new(Transmission::new(record));
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        map.insert(transmission.record.id.clone(), transmission.clone());
        while map.len() > KEPT {
            map.pop_first();
        }
        transmission
    }

    pub fn get(&self, id: &str) -> Option<Arc<Transmission>> {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()
    }

    /// Every transmission, newest first.
    pub fn all(&self) -> Vec<Arc<Transmission>> {
        let map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        map.values().rev().cloned().collect()
    }

    /// Notes a transmission's final record once every recipient is dealt with
    /// (called after each chunk; once).
    pub fn finish_if_done(&self, transmission: &Transmission, now_ms: u64) {
        if transmission.done() && !transmission.finished.swap(true, Ordering::AcqRel) {
            let mut record = transmission.snapshot();
            record.generation_end_ms = Some(now_ms);
            self.write(&record, false);
        }
    }

    /// Marks a transmission canceled (blocking: written and synced first).
    /// Lines waiting for the flusher are written first.
    pub fn cancel(&self, transmission: &Transmission) {
        let mut record = transmission.snapshot();
        record.canceled = true;
        self.write(&record, true);
        transmission.canceled.store(true, Ordering::Release);
        transmission.finished.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, rcpts: u64, start_ms: u64) -> Record {
        Record {
            id: id.into(),
            tenant: None,
            campaign_id: Some("spring".into()),
            description: None,
            template_id: None,
            start_ms,
            created_ms: 1,
            num_rcpts: rcpts,
            num_invalid_recipients: 0,
            num_generated: 0,
            num_failed_gen: 0,
            num_suppressed: 0,
            canceled: false,
            generation_end_ms: None,
        }
    }

    #[test]
    fn states_counts_and_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let all = Transmissions::open(dir.path()).unwrap();
        let a = all.add(record("0001", 3, 10), 20);
        let b = all.add(record("0002", 1, 1_000), 20);
        assert_eq!(a.state(20), "Generating");
        a.count(2, 0, 1);
        all.finish_if_done(&a, 20);
        assert_eq!(a.state(20), "Success");
        b.count(1, 0, 0);
        assert_eq!(b.state(20), "submitted");
        all.cancel(&b);
        assert_eq!(b.state(20), "Canceled");
        all.log.flush();
        drop(all);
        let all = Transmissions::open(dir.path()).unwrap();
        let a = all.get("0001").unwrap().snapshot();
        assert_eq!(
            (a.num_generated, a.num_suppressed, a.generation_end_ms),
            (2, 1, Some(20))
        );
        assert!(all.get("0002").unwrap().canceled());
        assert_eq!(all.all()[0].record.id, "0002", "newest first");
    }
}
