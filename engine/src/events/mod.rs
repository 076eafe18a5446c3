//! Events: every disposition of a message is a record in its shard's event log.
//!
//! Each shard appends JSON lines to `<data_dir>/events/<shard>/events.jsonl` through
//! its own buffer (no sharing between shards) and rotates the file by size ([`log`]:
//! positions, rotation, retention, reading). The buffer is written before every
//! write of spool records (the spool's write barrier) and by [`flush`], which the
//! shard calls on a short timer and at shutdown, on glommio's blocking thread; so a
//! slow file system never stalls the shard. Events never travel through the mail
//! queues; the hose ships them from the files.

pub mod log;

use std::sync::Arc;

pub use log::{EventFiles, Limits};
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
        #[serde(skip_serializing_if = "Option::is_none")]
        tenant: Option<&'a str>,
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
    /// A recipient unsubscribed with the message's one-click link (RFC 8058).
    ListUnsubscribe(Engagement<'a>),
    /// A remote server bounced a message after accepting it (its DSN came to an
    /// `inbound.domains` address).
    OutOfBand(Returned<'a>),
    /// A mailbox provider's feedback loop reported a complaint (ARF).
    SpamComplaint(Returned<'a>),
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
        /// force), `shared` (it fired on another node of the cluster and is in
        /// force here too) or `ended`; for backoff, `lowered` or `raised` (the connection
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
    /// The shared Redis of the cluster (`[cluster]`) became reachable (throttles are
    /// shared) or unreachable (they fall back); the first state after start too.
    /// Recorded by shard 0.
    Cluster {
        timestamp_ms: u64,
        shard: u16,
        /// `reachable` or `unreachable`.
        change: &'a str,
        /// What shared throttles do while it is unreachable.
        fallback: gannet_core::config::Fallback,
        /// The live nodes last counted, this one included.
        nodes: u64,
    },
    /// A policy phase (or a limit) refused a session, a recipient or a message; or
    /// a recipient was suppressed (phase `suppression`: its tenant's suppression
    /// list; the message, or the transmission, went on without it).
    PolicyRejection {
        timestamp_ms: u64,
        shard: u16,
        phase: &'a str,
        /// The client's address; empty for a transmission's recipient.
        peer: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        sender: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        rcpt_to: Option<&'a str>,
        reply: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        message_id: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        tenant: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        campaign_id: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        transmission_id: Option<&'a str>,
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
    /// The message's tenant and template (tokens of older versions carry neither).
    #[serde(skip_serializing_if = "str::is_empty")]
    pub tenant: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub template_id: &'a str,
    /// The link followed (clicks).
    #[serde(skip_serializing_if = "str::is_empty")]
    pub target_link_url: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip_address: Option<String>,
}

/// A report that came back about a message sent: what it names of the message
/// (from its feedback token; empty when the report quoted none that verified).
#[derive(Debug, Serialize)]
pub struct Returned<'a> {
    pub timestamp_ms: u64,
    pub shard: u16,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub message_id: &'a str,
    pub rcpt_to: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub transmission_id: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub campaign_id: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub tenant: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub template_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bounce_class: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw_reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_code: Option<&'a str>,
    /// A complaint's Feedback-Type (abuse, fraud, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fbtype: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<&'a str>,
    /// Who reported it (the report's Reporting-MTA or Source-IP).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report_by: Option<&'a str>,
    /// The client that brought the report.
    pub remote_addr: String,
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

/// Writes `log`'s pending events on glommio's blocking thread (the shard's periodic
/// round); true when there were some. See [`log`] for who else writes them and why.
/// Every few seconds it also deletes the rotated files no longer needed.
pub async fn flush(log: &Arc<EventFiles>) -> bool {
    let pending = log.has_pending();
    let prune = log.prune_due(gannet_core::clock::unix_ms());
    if !pending && !prune {
        return false;
    }
    let log = log.clone();
    glommio::executor()
        .spawn_blocking(move || {
            log.write_pending();
            if prune && let Err(err) = log.prune() {
                tracing::warn!(dir = %log.dir().display(), "pruning the event log: {err}");
            }
        })
        .await;
    pending
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
            message_id: None,
            tenant: None,
            campaign_id: None,
            transmission_id: None,
        }
    }

    fn limits(file_bytes_max: u64, files_kept: usize) -> Limits {
        Limits {
            file_bytes_max,
            files_kept,
            unshipped_bytes_max: u64::MAX,
        }
    }

    fn names(dir: &std::path::Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    /// Reads every line from `lsn` to the end, across rotations.
    fn read_all(log: &EventFiles, mut lsn: u64) -> (Vec<String>, u64) {
        let mut lines = Vec::new();
        let mut buf = Vec::new();
        loop {
            let mut open = match log.open_at(lsn).unwrap() {
                log::At::File(open) => open,
                log::At::Gap(next) => {
                    lsn = next;
                    continue;
                }
            };
            loop {
                let more = open.read_lines(log, &mut buf, 3000).unwrap();
                lines.extend(
                    std::str::from_utf8(&buf)
                        .unwrap()
                        .lines()
                        .map(str::to_string),
                );
                if !more {
                    break;
                }
                if buf.is_empty() {
                    return (lines, open.pos);
                }
            }
            lsn = open.pos;
        }
    }

    #[test]
    fn writes_json_lines_rotates_by_size_and_reads_back_by_position() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventFiles::open(dir.path(), limits(4096, 2)).unwrap();
        let reply = "x".repeat(1000);
        // A reader opened at the start of the current file before it rotates.
        let mut early = match log.open_at(0).unwrap() {
            log::At::File(open) => open,
            log::At::Gap(_) => panic!("nothing deleted yet"),
        };
        for i in 0..20 {
            log.record(&rejection(&format!("{i} {reply}")));
            log.write_pending();
            log.prune().unwrap();
        }
        let names = names(dir.path());
        assert_eq!(names.len(), 3, "current + 2 kept: {names:?}");
        assert!(names[0].len() == "events..jsonl".len() + 20, "{names:?}");
        let mut total = 0;
        for name in &names {
            let text = std::fs::read_to_string(dir.path().join(name)).unwrap();
            assert!(text.len() <= 4096 + 1100, "{name}: {}", text.len());
            total += text.len() as u64;
            for line in text.lines() {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                assert_eq!(v["type"], "policy_rejection");
                assert_eq!(v["sender"], "a@b.test");
                assert!(v.get("rcpt_to").is_none());
            }
        }
        // The first kept file starts where the deleted ones ended.
        let first: u64 = names[0][7..27].parse().unwrap();
        assert_eq!(first + total, log.end());
        // Reading from a deleted position skips to the first kept one; reading
        // from there gets every kept line in order.
        let (lines, end) = read_all(&log, 0);
        assert_eq!(end, log.end());
        let numbers: Vec<u64> = lines
            .iter()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["reply"]
                    .as_str()
                    .unwrap()
                    .split(' ')
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap()
            })
            .collect();
        assert_eq!(
            numbers,
            ((20 - numbers.len() as u64)..20).collect::<Vec<_>>()
        );
        // The early reader finishes its (now rotated and deleted) file from its
        // open descriptor, then says so.
        let mut buf = Vec::new();
        assert!(early.read_lines(&log, &mut buf, 1 << 20).unwrap());
        assert!(buf.starts_with(b"{\"type\":\"policy_rejection\""));
        assert!(!early.read_lines(&log, &mut buf, 1 << 20).unwrap());
        // A restart continues the positions.
        drop(log);
        let log = EventFiles::open(dir.path(), limits(4096, 2)).unwrap();
        assert_eq!(log.end(), first + total);
    }

    #[test]
    fn unshipped_files_are_kept_until_shipped_or_over_their_bound() {
        let dir = tempfile::tempdir().unwrap();
        let mut bounds = limits(2048, 1);
        bounds.unshipped_bytes_max = 12_000;
        let log = EventFiles::open(dir.path(), bounds).unwrap();
        log.set_shipped(0);
        let reply = "y".repeat(1000);
        for _ in 0..8 {
            log.record(&rejection(&reply));
            log.write_pending();
            log.prune().unwrap();
        }
        // Nothing shipped: every file is kept (8 KiB is under the bound).
        assert_eq!(names(dir.path()).len(), 8);
        assert_eq!(log.pruned_unshipped(), 0);
        // Shipped up to the fourth file: the first three go (one is kept beyond).
        let starts: Vec<u64> = names(dir.path())[..7]
            .iter()
            .map(|n| n[7..27].parse().unwrap())
            .collect();
        log.set_shipped(starts[3]);
        log.prune().unwrap();
        assert_eq!(names(dir.path()).len(), 5);
        // Past the bound, unshipped files go too, and are counted.
        for _ in 0..10 {
            log.record(&rejection(&reply));
            log.write_pending();
            log.prune().unwrap();
        }
        let on_disk: u64 = names(dir.path())
            .iter()
            .map(|n| std::fs::metadata(dir.path().join(n)).unwrap().len())
            .sum();
        assert!(on_disk <= 12_000 + 2100, "{on_disk}");
        assert!(log.pruned_unshipped() > 0);
    }

    #[test]
    fn a_torn_last_line_is_cut_back_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventFiles::open(dir.path(), limits(1 << 20, 2)).unwrap();
        log.record(&rejection("whole"));
        log.write_pending();
        let whole = log.end();
        drop(log);
        let path = dir.path().join("events.jsonl");
        let mut text = std::fs::read(&path).unwrap();
        text.extend_from_slice(b"{\"type\":\"deliv");
        std::fs::write(&path, &text).unwrap();
        let log = EventFiles::open(dir.path(), limits(1 << 20, 2)).unwrap();
        assert_eq!(log.end(), whole);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), whole);
        log.record(&rejection("next"));
        log.write_pending();
        let (lines, _) = read_all(&log, 0);
        assert_eq!(lines.len(), 2);
    }

    #[test]
    fn a_flush_runs_off_the_executor_and_events_recorded_meanwhile_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        glommio::LocalExecutorBuilder::default()
            .spawn(move || async move {
                let log = Arc::new(EventFiles::open(&path, limits(1 << 20, 2)).unwrap());
                for _ in 0..3 {
                    log.record(&rejection("first"));
                }
                let flushing = glommio::spawn_local({
                    let log = log.clone();
                    async move { flush(&log).await }
                });
                glommio::executor().yield_now().await;
                log.record(&rejection("second"));
                flushing.await;
                flush(&log).await;
                let text = std::fs::read_to_string(path.join("events.jsonl")).unwrap();
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
                assert_eq!(log.dropped(), 0);
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
