//! Events: every disposition of a message is a record in its shard's event log.
//!
//! Each shard appends JSON lines to `<data_dir>/events/<shard>/events.jsonl` through
//! its own buffer (no sharing between shards) and rotates the file by size, keeping a
//! bounded number of old files (`events.<unix_ms>.jsonl`). The buffer is written out
//! by [`flush`], which the shard calls on a short timer and at shutdown: the write
//! and any rotation (rename, open, directory listing, removals) run on glommio's
//! blocking thread, so a slow file system never stalls the shard, and events recorded
//! meanwhile go to a second buffer. Events never travel through the mail queues.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::value::RawValue;

/// One event, serialised as a JSON object with a `type` field (SparkPost-style names).
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event<'a> {
    /// A message was accepted and is durable in the spool.
    Reception {
        timestamp_ms: u64,
        message_id: String,
        shard: u16,
        sender: &'a str,
        rcpt_to: &'a [String],
        msg_size: usize,
        peer: String,
        helo: &'a str,
        protocol: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        tls: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        auth_user: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        tenant: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        campaign_id: Option<&'a str>,
        ip_pool: &'a str,
        queue: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        subject: Option<&'a str>,
    },
    /// A message generated from an HTTP transmission is durable and queued.
    Injection {
        timestamp_ms: u64,
        shard: u16,
        message_id: String,
        transmission_id: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        campaign_id: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        template_id: Option<&'a str>,
        rcpt_to: &'a str,
        msg_from: &'a str,
        subject: &'a str,
        msg_size: usize,
        ip_pool: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        tenant: Option<&'a str>,
        queue: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        rcpt_meta: Option<&'a RawValue>,
        #[serde(skip_serializing_if = "Option::is_none")]
        rcpt_tags: Option<&'a RawValue>,
        /// A sandbox transmission is generated and evented but never queued.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        sandbox: bool,
    },
    /// A recipient of a transmission for whom no message could be generated.
    GenerationFailure {
        timestamp_ms: u64,
        shard: u16,
        transmission_id: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        campaign_id: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        template_id: Option<&'a str>,
        rcpt_to: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        rcpt_meta: Option<&'a serde_json::Map<String, serde_json::Value>>,
        #[serde(skip_serializing_if = "<[String]>::is_empty")]
        rcpt_tags: &'a [String],
        reason: &'a str,
    },
    /// A recipient's mail client loaded the open pixel.
    Open(Engagement<'a>),
    /// A recipient followed a tracked link.
    Click(Engagement<'a>),
    /// A recipient was accepted by the destination (2xx).
    Delivery(Outcome<'a>),
    /// A recipient failed temporarily (4xx, or no connection) and will be retried.
    TransientFailure(Outcome<'a>),
    /// A recipient failed permanently (5xx); `bounce_class` says why.
    Bounce(Outcome<'a>),
    /// A recipient was bounced by an operator's bounce (the admin API), not by a
    /// reply: KumoMTA's AdminBounce.
    AdminBounce(Outcome<'a>),
    /// An operator's rebind moved a queued message to another egress pool (the
    /// admin API): KumoMTA's AdminRebind.
    AdminRebind {
        timestamp_ms: u64,
        shard: u16,
        message_id: String,
        pool: &'a str,
        reason: &'a str,
    },
    /// A recipient was still undelivered at max_age and is given up.
    Expiration(Outcome<'a>),
    /// A recipient's attempt was put off without being tried (its ready queue was
    /// full, or its scheduled queue is suspended); not counted as a retry.
    Delayed(Outcome<'a>),
    /// A response rule (adaptive delivery) fired on a ready queue, or ended.
    Adaptive {
        timestamp_ms: u64,
        shard: u16,
        /// The ready queue: `egress_source->site_name`.
        queue: &'a str,
        /// Where the rule is written: `default#0`, `yahoo#1`; `backoff` for adaptive
        /// backoff (shaping's backoff_failure_percent).
        rule: &'a str,
        /// `fired` (it is in force from now), `extended` (it fired again while in
        /// force) or `ended`; for backoff, `lowered` or `raised` (the connection
        /// limit, in `set`).
        change: &'a str,
        /// Until when it is in force (unix ms; not for `ended`).
        #[serde(skip_serializing_if = "Option::is_none")]
        until_ms: Option<u64>,
        actions: Vec<&'a str>,
        /// What the rule sets: `connection_limit=1 max_message_rate=10/min`.
        #[serde(skip_serializing_if = "str::is_empty")]
        set: &'a str,
        /// The reply that fired it.
        #[serde(skip_serializing_if = "Option::is_none")]
        reply: Option<&'a str>,
        /// Whose mail it holds back from the provider (suspend_tenant,
        /// suspend_campaign): "tenant acme", "campaign spring".
        #[serde(skip_serializing_if = "Vec::is_empty")]
        held: Vec<String>,
    },
    /// A policy phase (or a limit) refused a session, a recipient or a message.
    PolicyRejection {
        timestamp_ms: u64,
        shard: u16,
        phase: &'a str,
        peer: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        sender: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        rcpt_to: Option<&'a str>,
        reply: String,
    },
}

/// An open or a click, from the signed token of the pixel or link.
#[derive(Debug, Serialize)]
pub struct Engagement<'a> {
    pub timestamp_ms: u64,
    pub shard: u16,
    pub message_id: &'a str,
    pub rcpt_to: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub transmission_id: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub campaign_id: &'a str,
    /// The link followed (clicks).
    #[serde(skip_serializing_if = "str::is_empty")]
    pub target_link_url: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip_address: Option<String>,
}

/// What happened to one recipient in one delivery attempt.
#[derive(Debug, Serialize)]
pub struct Outcome<'a> {
    pub timestamp_ms: u64,
    pub shard: u16,
    pub message_id: String,
    pub sender: &'a str,
    pub rcpt_to: &'a str,
    /// The recipient's scheduled queue, `campaign:tenant@domain`.
    pub queue: String,
    /// The destination site (its hosts); empty when there was no route.
    pub site: &'a str,
    /// The egress source the attempt used, and its address when it binds one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress_source: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sending_ip: Option<String>,
    /// The host that answered, if a connection was made.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// The reply, `code text`.
    pub response: String,
    /// Its code, and its enhanced status code (RFC 3463) when it has one.
    pub response_code: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enhanced_code: Option<&'a str>,
    /// The message's size in bytes.
    pub msg_size: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bounce_class: Option<u16>,
    pub num_retries: u32,
    /// Milliseconds since reception.
    pub queue_time: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip_pool: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub campaign_id: Option<&'a str>,
    /// For messages generated from a transmission: its id, the recipient's metadata
    /// and tags.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transmission_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rcpt_meta: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rcpt_tags: Option<&'a RawValue>,
}

/// A shard's event log: the buffer events are recorded into, and the file writer
/// (away on the blocking thread while a flush runs).
#[derive(Debug)]
pub struct EventLog {
    /// `None` while a flush has it on the blocking thread.
    writer: Option<Writer>,
    /// Serialised events not yet written.
    buffer: Vec<u8>,
    /// The buffer a finished flush handed back, reused by the next (no allocation per
    /// flush once both have grown).
    spare: Vec<u8>,
    /// Events lost because serialising or writing failed (reported as a metric).
    pub dropped: u64,
}

/// The event log's file and its rotation. Plain blocking file I/O: it runs on
/// glommio's blocking thread (see [`flush`]), or in tests.
#[derive(Debug)]
struct Writer {
    dir: PathBuf,
    file: File,
    /// Bytes in the current file.
    file_bytes: u64,
    file_bytes_max: u64,
    files_kept: usize,
}

const CURRENT: &str = "events.jsonl";

impl EventLog {
    pub fn open(dir: &Path, file_bytes_max: u64, files_kept: usize) -> std::io::Result<EventLog> {
        std::fs::create_dir_all(dir)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(CURRENT))?;
        let file_bytes = file.metadata()?.len();
        let writer = Writer {
            dir: dir.to_path_buf(),
            file,
            file_bytes,
            file_bytes_max,
            files_kept,
        };
        Ok(EventLog {
            writer: Some(writer),
            buffer: Vec::with_capacity(64 << 10),
            spare: Vec::with_capacity(64 << 10),
            dropped: 0,
        })
    }

    /// Adds an event to the buffer.
    pub fn record(&mut self, event: &Event<'_>) {
        let before = self.buffer.len();
        if serde_json::to_writer(&mut self.buffer, event).is_err() {
            self.buffer.truncate(before);
            self.dropped += 1;
            return;
        }
        self.buffer.push(b'\n');
    }

    /// The writer and the events to write, when there are some and no flush is
    /// running; recording continues into the spare buffer.
    fn take_batch(&mut self) -> Option<(Writer, Vec<u8>)> {
        if self.buffer.is_empty() {
            return None;
        }
        let writer = self.writer.take()?;
        let batch = std::mem::replace(&mut self.buffer, std::mem::take(&mut self.spare));
        Some((writer, batch))
    }

    /// Takes back the writer and the written (or lost) batch's buffer.
    fn put_back(&mut self, writer: Writer, mut batch: Vec<u8>, lost: u64) {
        self.writer = Some(writer);
        self.dropped += lost;
        batch.clear();
        self.spare = batch;
    }

    /// Writes the buffer out here and now (blocking; for tests and tools).
    pub fn flush_blocking(&mut self) {
        if let Some((mut writer, batch)) = self.take_batch() {
            let lost = writer.write(&batch);
            self.put_back(writer, batch, lost);
        }
    }
}

/// Writes `log`'s buffer out on glommio's blocking thread, rotating first when the
/// file would pass its size bound. This is a buffered `write` into the page cache;
/// event logs are not fsynced (the spool is the durable record of a message, events
/// are its history). Does nothing while another flush of the same log runs.
pub async fn flush(log: &std::cell::RefCell<EventLog>) -> bool {
    let Some((mut writer, batch)) = log.borrow_mut().take_batch() else {
        return false;
    };
    let (writer, batch, lost) = glommio::executor()
        .spawn_blocking(move || {
            let lost = writer.write(&batch);
            (writer, batch, lost)
        })
        .await;
    log.borrow_mut().put_back(writer, batch, lost);
    true
}

impl Writer {
    /// Writes `batch`, rotating first when the file would pass its size bound; the
    /// number of events lost.
    fn write(&mut self, batch: &[u8]) -> u64 {
        if self.file_bytes > 0
            && self.file_bytes + batch.len() as u64 > self.file_bytes_max
            && let Err(err) = self.rotate()
        {
            tracing::warn!(dir = %self.dir.display(), "event log rotation failed: {err}");
        }
        match self.file.write_all(batch) {
            Ok(()) => {
                self.file_bytes += batch.len() as u64;
                0
            }
            Err(err) => {
                let lost = batch.iter().filter(|b| **b == b'\n').count() as u64;
                tracing::warn!(dir = %self.dir.display(), lost, "event log write failed: {err}");
                lost
            }
        }
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let now = gannet_core::clock::unix_ms();
        let mut rotated = self.dir.join(format!("events.{now}.jsonl"));
        let mut n = 0;
        while rotated.exists() {
            n += 1;
            rotated = self.dir.join(format!("events.{now}-{n}.jsonl"));
        }
        std::fs::rename(self.dir.join(CURRENT), &rotated)?;
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(CURRENT))?;
        self.file_bytes = 0;
        let mut old: Vec<PathBuf> = std::fs::read_dir(&self.dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("events.") && n != CURRENT)
            })
            .collect();
        old.sort_by_key(|p| rotated_stamp(p));
        while old.len() > self.files_kept {
            std::fs::remove_file(old.remove(0))?;
        }
        Ok(())
    }
}

/// (unix_ms, n) of `events.<unix_ms>[-n].jsonl`, for ordering rotated files.
fn rotated_stamp(path: &Path) -> (u64, u64) {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let stem = name
        .strip_prefix("events.")
        .and_then(|s| s.strip_suffix(".jsonl"))
        .unwrap_or("");
    let (ms, n) = stem.split_once('-').unwrap_or((stem, "0"));
    (ms.parse().unwrap_or(0), n.parse().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejection(reply: &str) -> Event<'_> {
        Event::PolicyRejection {
            timestamp_ms: 1,
            shard: 0,
            phase: "rcpt_to",
            peer: "127.0.0.1".into(),
            sender: Some("a@b.test"),
            rcpt_to: None,
            reply: reply.into(),
        }
    }

    #[test]
    fn writes_json_lines_and_rotates_by_size() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = EventLog::open(dir.path(), 4096, 2).unwrap();
        let reply = "x".repeat(1000);
        for _ in 0..20 {
            log.record(&rejection(&reply));
            log.flush_blocking();
        }
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names.len(), 3, "current + 2 kept: {names:?}");
        for name in names {
            let text = std::fs::read_to_string(dir.path().join(&name)).unwrap();
            assert!(text.len() <= 4096 + 1100, "{name}: {}", text.len());
            for line in text.lines() {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                assert_eq!(v["type"], "policy_rejection");
                assert_eq!(v["sender"], "a@b.test");
                assert!(v.get("rcpt_to").is_none());
            }
        }
    }

    #[test]
    fn a_flush_runs_off_the_executor_and_events_recorded_meanwhile_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        glommio::LocalExecutorBuilder::default()
            .spawn(move || async move {
                let log = std::rc::Rc::new(std::cell::RefCell::new(
                    EventLog::open(&path, 1 << 20, 2).unwrap(),
                ));
                for _ in 0..3 {
                    log.borrow_mut().record(&rejection("first"));
                }
                let flushing = glommio::spawn_local({
                    let log = log.clone();
                    async move { flush(&log).await }
                });
                // Let the first flush take its batch to the blocking thread.
                glommio::executor().yield_now().await;
                assert!(log.borrow().writer.is_none(), "the flush is away");
                // Meanwhile events go to the other buffer, and a second flush waits its
                // turn (does nothing).
                log.borrow_mut().record(&rejection("second"));
                flush(&log).await;
                flushing.await;
                let text = std::fs::read_to_string(path.join(CURRENT)).unwrap();
                assert_eq!(text.lines().count(), 3);
                flush(&log).await;
                let text = std::fs::read_to_string(path.join(CURRENT)).unwrap();
                let replies: Vec<String> = text
                    .lines()
                    .map(|l| {
                        serde_json::from_str::<serde_json::Value>(l).unwrap()["reply"].to_string()
                    })
                    .collect();
                assert_eq!(
                    replies,
                    ["\"first\"", "\"first\"", "\"first\"", "\"second\""]
                );
                assert_eq!(log.borrow().dropped, 0);
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
