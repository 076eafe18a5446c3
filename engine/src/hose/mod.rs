//! The event hose: ships every shard's event log to the sinks that subscribe —
//! SparkPost-style webhooks ([`webhook`]), and message brokers — in SparkPost's event
//! format ([`sparkpost`]), each from its own durable cursor ([`cursor`]).
//!
//! The hose reads the log files the shards write (`events::log`), never the mail
//! queues, and takes no lock a shard takes: each sink is a thread of its own that
//! polls the logs' end positions (atomics), reads new lines with positional reads,
//! converts them, and sends a batch. A batch is the events of one shard's log from
//! the sink's cursor on, up to `events.batch_events_max`, sent once that many are
//! waiting or the oldest has waited `events.batch_wait_ms`. The cursor moves past a
//! batch only when the receiver has acknowledged it (a 2xx, a broker's confirm), and
//! is written at once: a restart resends only the batch that was in flight, with the
//! same batch id, and never skips one. A batch that fails is retried with doubling
//! pauses (1 s up to `events.retry_interval_max_secs`) for
//! `events.retry_max_secs` (8 hours), then given up and counted. Events of types a
//! sink does not want, or of another tenant, move its cursor without being sent, as
//! do those the policy script's `should_enqueue_log_record` declines for a webhook
//! or a broker (asked in a VM of the sink's own thread; a failing call sends).
//!
//! A sink is the part that differs: [`Sink::send`] takes the converted events of a
//! batch. A webhook POSTs them as one JSON array; a broker publishes one message per
//! event. Another sink (Kafka, say) is another implementation of the trait: cursor,
//! batching, retry and metrics come with the driver.

pub mod amqp;
pub mod cursor;
pub mod sparkpost;
pub mod tally;
pub mod webhook;

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::events::{EventFiles, Limits};
use crate::policy::script::{Hook, Script};
use cursor::Cursor;
use gannet_core::config::EventsConfig;
use sparkpost::{Events, Filter};

/// A log with this many bytes waiting is sent at once, without waiting for more.
const FULL_BATCH_BYTES: u64 = 256 << 10;
/// Bytes read from a log per batch at most.
const READ_BYTES: usize = 1 << 20;
/// How often an idle sink looks at the logs' ends.
const POLL: Duration = Duration::from_millis(50);
/// Batch outcomes kept per sink for the batch-status API.
const BATCHES_KEPT: usize = 100;
/// The first pause after a failed batch (it doubles).
const FIRST_RETRY: Duration = Duration::from_secs(1);

/// What every sink's driver follows.
#[derive(Debug, Clone)]
pub struct HoseSettings {
    pub batch_events_max: usize,
    pub batch_wait: Duration,
    pub retry_max: Duration,
    pub retry_interval_max: Duration,
    pub request_timeout: Duration,
    pub webhooks_max: usize,
    /// The brokers (`[[events.amqp]]`).
    pub amqp: Vec<gannet_core::config::AmqpSink>,
    /// The Metrics API's tally (`[events.metrics]`).
    pub metrics: gannet_core::config::MetricsApiConfig,
}

impl HoseSettings {
    pub fn from_config(events: &EventsConfig) -> HoseSettings {
        HoseSettings {
            batch_events_max: events.batch_events_max.usize(),
            batch_wait: Duration::from_millis(events.batch_wait_ms.get()),
            retry_max: Duration::from_secs(events.retry_max_secs.get()),
            retry_interval_max: Duration::from_secs(events.retry_interval_max_secs.get()),
            request_timeout: Duration::from_secs(events.request_timeout_secs.get()),
            webhooks_max: events.webhooks_max.usize(),
            amqp: events.amqp.clone(),
            metrics: events.metrics.clone(),
        }
    }
}

/// Opens the event log of every shard (`0..shards`) and of every shard directory a
/// larger shard count left behind (shipped, never written again).
pub fn open_logs(
    data_dir: &Path,
    shards: usize,
    events: &EventsConfig,
) -> anyhow::Result<Vec<Arc<EventFiles>>> {
    let root = data_dir.join("events");
    let mut count = shards;
    if let Ok(entries) = std::fs::read_dir(&root) {
        for entry in entries.flatten() {
            if let Some(n) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<usize>().ok())
                && n < usize::from(u16::MAX)
            {
                count = count.max(n + 1);
            }
        }
    }
    let limits = Limits {
        file_bytes_max: events.file_bytes_max.get(),
        files_kept: events.files_kept.usize(),
        unshipped_bytes_max: events.unshipped_bytes_max.get(),
    };
    (0..count)
        .map(|i| {
            let dir = root.join(i.to_string());
            EventFiles::open(&dir, limits)
                .map(Arc::new)
                .map_err(|e| anyhow::anyhow!("opening the event log {}: {e}", dir.display()))
        })
        .collect()
}

/// The hose: the logs, the sinks running on them, the stored webhooks.
#[derive(Debug)]
pub struct Hose {
    data_dir: PathBuf,
    logs: Vec<Arc<EventFiles>>,
    /// Shards (the first logs); the rest are left-overs of a larger shard count.
    shards: usize,
    pub settings: HoseSettings,
    pub webhooks: webhook::Webhooks,
    /// The Metrics API's tally (None when `events.metrics.enabled` is false).
    pub tally: Option<Arc<tally::Tally>>,
    sinks: Mutex<BTreeMap<String, Running>>,
    stopping: AtomicBool,
    /// The live settings, for the policy script's `should_enqueue_log_record`.
    live: Arc<crate::live::Live>,
}

#[derive(Debug)]
struct Running {
    status: Arc<SinkStatus>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// One sink's progress, for the metrics and the batch-status API.
#[derive(Debug)]
pub struct SinkStatus {
    pub name: String,
    /// Shipped position per log.
    positions: Vec<AtomicU64>,
    pub events_total: AtomicU64,
    pub batches_total: AtomicU64,
    pub batch_failures_total: AtomicU64,
    /// Events given up after `retry_max`.
    pub events_dropped_total: AtomicU64,
    /// Lines that were not events (damaged, or from a newer version), skipped.
    pub lines_skipped_total: AtomicU64,
    /// Events the policy script's `should_enqueue_log_record` kept from this sink.
    pub events_declined_total: AtomicU64,
    /// Calls of `should_enqueue_log_record` that failed (their events were sent).
    pub script_failures_total: AtomicU64,
    /// Bytes of events deleted (past `unshipped_bytes_max`) before this sink read them.
    pub bytes_lost_total: AtomicU64,
    /// Unix ms of the oldest event not yet shipped (0: none waiting).
    pub oldest_unshipped_ms: AtomicU64,
    pub last_success_ms: AtomicU64,
    pub last_failure_ms: AtomicU64,
    batches: Mutex<VecDeque<BatchStatus>>,
}

/// One batch's latest attempt, as SparkPost's batch-status shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BatchStatus {
    pub batch_id: String,
    pub ts: String,
    pub attempts: u32,
    pub response_code: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_code: Option<String>,
}

impl SinkStatus {
    fn new(name: String, logs: usize) -> SinkStatus {
        SinkStatus {
            name,
            positions: (0..logs).map(|_| AtomicU64::new(0)).collect(),
            events_total: AtomicU64::new(0),
            batches_total: AtomicU64::new(0),
            batch_failures_total: AtomicU64::new(0),
            events_dropped_total: AtomicU64::new(0),
            lines_skipped_total: AtomicU64::new(0),
            events_declined_total: AtomicU64::new(0),
            script_failures_total: AtomicU64::new(0),
            bytes_lost_total: AtomicU64::new(0),
            oldest_unshipped_ms: AtomicU64::new(0),
            last_success_ms: AtomicU64::new(0),
            last_failure_ms: AtomicU64::new(0),
            batches: Mutex::new(VecDeque::new()),
        }
    }

    /// The latest batches, newest first.
    pub fn batches(&self, limit: usize) -> Vec<BatchStatus> {
        let batches = self.batches.lock().unwrap_or_else(PoisonError::into_inner);
        batches.iter().rev().take(limit).cloned().collect()
    }

    fn note_batch(&self, status: BatchStatus) {
        let mut batches = self.batches.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(last) = batches.back_mut()
            && last.batch_id == status.batch_id
        {
            *last = status;
            return;
        }
        if batches.len() >= BATCHES_KEPT {
            batches.pop_front();
        }
        batches.push_back(status);
    }
}

/// Where a batch goes.
pub trait Sink: Send {
    /// The events it wants now (a webhook's may change while it runs); None when
    /// the sink is gone (its webhook deleted) and its thread should end.
    fn filter(&self) -> Option<Filter>;
    /// Whether it takes batches now (an inactive webhook waits, keeping its cursor).
    fn active(&self) -> bool {
        true
    }
    /// Sends one batch; Ok with the receiver's answer (`200`) once it is
    /// acknowledged, Err with the failure (`503`, `connection refused`).
    fn send(&mut self, batch: &BatchRef<'_>, events: &Events) -> Result<String, String>;
    /// The position per log from which the sink reads, when the sink keeps them
    /// itself together with what it did with each batch (the metrics tally): the
    /// driver then starts there rather than at its cursor file's.
    fn positions(&self) -> Option<Vec<u64>> {
        None
    }
    /// Whether the policy script's `should_enqueue_log_record` decides which events
    /// it gets (the sinks that ship events out do; the metrics tally counts all).
    fn asks_the_script(&self) -> bool {
        true
    }
}

/// Which batch a sink is given: its id (stable across resends), its log, and the
/// position just past its last line.
#[derive(Debug, Clone, Copy)]
pub struct BatchRef<'a> {
    pub id: &'a str,
    pub log: usize,
    pub end: u64,
}

impl Hose {
    pub fn new(
        data_dir: &Path,
        logs: Vec<Arc<EventFiles>>,
        shards: usize,
        settings: HoseSettings,
        live: Arc<crate::live::Live>,
    ) -> anyhow::Result<Hose> {
        let tally = if settings.metrics.enabled {
            let tally =
                tally::Tally::open(data_dir, logs.len(), &settings.metrics).map_err(|e| {
                    anyhow::anyhow!(
                        "opening the metrics tally in {}/metrics: {e}",
                        data_dir.display()
                    )
                })?;
            Some(Arc::new(tally))
        } else {
            None
        };
        Ok(Hose {
            data_dir: data_dir.to_path_buf(),
            webhooks: webhook::Webhooks::open(data_dir)?,
            tally,
            logs,
            shards,
            settings,
            sinks: Mutex::new(BTreeMap::new()),
            stopping: AtomicBool::new(false),
            live,
        })
    }

    /// Shard `id`'s log.
    pub fn log(&self, id: usize) -> Option<&Arc<EventFiles>> {
        self.logs.get(id)
    }

    /// Starts a sink for every stored webhook and every configured broker, and the
    /// metrics tally's.
    pub fn start(self: &Arc<Self>) {
        if let Some(tally) = &self.tally {
            let sink = tally::TallySink {
                tally: tally.clone(),
            };
            self.start_sink(tally::SINK.to_string(), Box::new(sink));
        }
        for hook in self.webhooks.all() {
            self.start_webhook(&hook.id);
        }
        for broker in &self.settings.amqp {
            match amqp::AmqpPublisher::new(broker.clone(), self.settings.request_timeout) {
                Ok(sink) => self.start_sink(format!("amqp-{}", broker.name), Box::new(sink)),
                // The config check refuses what `new` would.
                Err(err) => tracing::error!(sink = %broker.name, "broker sink not started: {err}"),
            }
        }
    }

    /// Starts the sink of webhook `id` (stored already), from the logs' ends if it
    /// has no cursor yet.
    pub fn start_webhook(self: &Arc<Self>, id: &str) {
        let sink = WebhookSink {
            hose: Arc::downgrade(self),
            id: id.to_string(),
            poster: webhook::Poster::new(self.settings.request_timeout),
        };
        self.start_sink(webhook_sink_name(id), Box::new(sink));
    }

    /// Stops a sink and deletes its cursor (its webhook was deleted).
    pub fn remove_sink(&self, name: &str) {
        let running = self
            .sinks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
        if let Some(running) = running {
            running.stop.store(true, Ordering::Release);
        }
        let _ = gannet_spool::durable::remove_file(&self.cursor_path(name));
        self.update_shipped();
    }

    /// A running sink's status.
    pub fn status(&self, name: &str) -> Option<Arc<SinkStatus>> {
        let sinks = self.sinks.lock().unwrap_or_else(PoisonError::into_inner);
        sinks.get(name).map(|r| r.status.clone())
    }

    fn cursor_path(&self, name: &str) -> PathBuf {
        self.data_dir.join("hose").join(format!("{name}.cursor"))
    }

    pub fn start_sink(self: &Arc<Self>, name: String, sink: Box<dyn Sink>) {
        if self.stopping.load(Ordering::Acquire) {
            return;
        }
        let mut cursor = match Cursor::open(&self.cursor_path(&name), self.logs.len(), |i| {
            self.logs[i].end()
        }) {
            Ok(cursor) => cursor,
            Err(err) => {
                tracing::error!(sink = %name, "cannot open the sink's cursor; it does not run: {err}");
                return;
            }
        };
        if let Some(positions) = sink.positions() {
            for (i, position) in positions.into_iter().enumerate().take(self.logs.len()) {
                if let Err(err) = cursor.set(i, position) {
                    tracing::error!(sink = %name, "cannot set the sink's cursor; it does not run: {err}");
                    return;
                }
            }
        }
        let status = Arc::new(SinkStatus::new(name.clone(), self.logs.len()));
        for (i, position) in status.positions.iter().enumerate() {
            position.store(cursor.get(i), Ordering::Release);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut sinks = self.sinks.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(old) = sinks.remove(&name) {
            old.stop.store(true, Ordering::Release);
        }
        let driver = Driver {
            hose: self.clone(),
            sink,
            cursor,
            status: status.clone(),
            stop: stop.clone(),
            readers: (0..self.logs.len()).map(|_| None).collect(),
            waiting_since: vec![None; self.logs.len()],
            buf: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name(format!(
                "gannet-hose-{}",
                name.chars().take(4).collect::<String>()
            ))
            .spawn(move || driver.run());
        match thread {
            Ok(thread) => {
                sinks.insert(
                    name,
                    Running {
                        status,
                        stop,
                        thread: Some(thread),
                    },
                );
            }
            Err(err) => tracing::error!(sink = %name, "cannot start the sink's thread: {err}"),
        }
        drop(sinks);
        self.update_shipped();
    }

    /// Tells each log how far every sink has shipped it (files wholly shipped may
    /// then be deleted).
    fn update_shipped(&self) {
        let sinks = self.sinks.lock().unwrap_or_else(PoisonError::into_inner);
        for (i, log) in self.logs.iter().enumerate() {
            let shipped = sinks
                .values()
                .map(|r| r.status.positions[i].load(Ordering::Acquire))
                .min()
                .unwrap_or(u64::MAX);
            log.set_shipped(shipped);
        }
    }

    /// Stops every sink; waits up to `grace` for their threads (a batch in flight is
    /// sent again after the restart).
    pub fn stop(&self, grace: Duration) {
        self.stopping.store(true, Ordering::Release);
        let threads: Vec<_> = {
            let mut sinks = self.sinks.lock().unwrap_or_else(PoisonError::into_inner);
            sinks
                .values_mut()
                .filter_map(|r| {
                    r.stop.store(true, Ordering::Release);
                    r.thread.take()
                })
                .collect()
        };
        let deadline = Instant::now() + grace;
        for thread in threads {
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
        // Left-over logs are pruned here, as no shard prunes them.
        for log in &self.logs[self.shards.min(self.logs.len())..] {
            let _ = log.prune();
        }
    }

    /// The hose's Prometheus lines.
    pub fn render_metrics(&self, out: &mut String) {
        let sinks: Vec<Arc<SinkStatus>> = {
            let sinks = self.sinks.lock().unwrap_or_else(PoisonError::into_inner);
            sinks.values().map(|r| r.status.clone()).collect()
        };
        let now = gannet_core::clock::unix_ms();
        type Pick = fn(&SinkStatus, &[Arc<EventFiles>], u64) -> u64;
        let series: [(&str, &str, &str, Pick); 10] = [
            (
                "hose_events_shipped_total",
                "counter",
                "Events a sink's receiver acknowledged.",
                |s, _, _| s.events_total.load(Ordering::Relaxed),
            ),
            (
                "hose_batches_total",
                "counter",
                "Batches a sink's receiver acknowledged.",
                |s, _, _| s.batches_total.load(Ordering::Relaxed),
            ),
            (
                "hose_batch_failures_total",
                "counter",
                "Attempts to send a batch that failed (each is retried).",
                |s, _, _| s.batch_failures_total.load(Ordering::Relaxed),
            ),
            (
                "hose_events_dropped_total",
                "counter",
                "Events given up after events.retry_max_secs of failures.",
                |s, _, _| s.events_dropped_total.load(Ordering::Relaxed),
            ),
            (
                "hose_lines_skipped_total",
                "counter",
                "Log lines that were not events gannet knows (damaged), skipped.",
                |s, _, _| s.lines_skipped_total.load(Ordering::Relaxed),
            ),
            (
                "hose_events_declined_total",
                "counter",
                "Events the policy script's should_enqueue_log_record kept from a sink.",
                |s, _, _| s.events_declined_total.load(Ordering::Relaxed),
            ),
            (
                "hose_script_failures_total",
                "counter",
                "Calls of should_enqueue_log_record that failed; their events were sent.",
                |s, _, _| s.script_failures_total.load(Ordering::Relaxed),
            ),
            (
                "hose_bytes_lost_total",
                "counter",
                "Bytes of events deleted past events.unshipped_bytes_max before the sink read them.",
                |s, _, _| s.bytes_lost_total.load(Ordering::Relaxed),
            ),
            (
                "hose_lag_bytes",
                "gauge",
                "Bytes of events written and not yet shipped, over all shards.",
                |s, logs, _| {
                    logs.iter()
                        .zip(&s.positions)
                        .map(|(l, p)| l.end().saturating_sub(p.load(Ordering::Relaxed)))
                        .sum()
                },
            ),
            (
                "hose_lag_seconds",
                "gauge",
                "Age of the oldest event not yet shipped (0: none waiting).",
                |s, _, now| match s.oldest_unshipped_ms.load(Ordering::Relaxed) {
                    0 => 0,
                    ms => now.saturating_sub(ms) / 1000,
                },
            ),
        ];
        for (name, kind, help, pick) in series {
            let _ = writeln!(out, "# HELP gannet_{name} {help}");
            let _ = writeln!(out, "# TYPE gannet_{name} {kind}");
            for sink in &sinks {
                let value = pick(sink, &self.logs, now);
                let _ = writeln!(out, "gannet_{name}{{sink=\"{}\"}} {value}", sink.name);
            }
        }
        let _ = writeln!(
            out,
            "# HELP gannet_events_unshipped_pruned_bytes_total Bytes of events deleted past events.unshipped_bytes_max before every sink shipped them."
        );
        let _ = writeln!(
            out,
            "# TYPE gannet_events_unshipped_pruned_bytes_total counter"
        );
        for (i, log) in self.logs.iter().enumerate() {
            let _ = writeln!(
                out,
                "gannet_events_unshipped_pruned_bytes_total{{shard=\"{i}\"}} {}",
                log.pruned_unshipped()
            );
        }
        if let Some(tally) = &self.tally {
            let (rows, keys, folded) = tally.read(|s| (s.rows(), s.keys().len(), s.folded));
            for (name, kind, help, value) in [
                (
                    "metrics_api_rows",
                    "gauge",
                    "Rows (bucket x key) the Metrics API's tally holds, over its three resolutions.",
                    rows as u64,
                ),
                (
                    "metrics_api_keys",
                    "gauge",
                    "Distinct combinations of the dimensions tallied.",
                    keys as u64,
                ),
                (
                    "metrics_api_folded_total",
                    "counter",
                    "Events tallied under (other) past events.metrics.keys_max.",
                    folded,
                ),
            ] {
                let _ = writeln!(out, "# HELP gannet_{name} {help}");
                let _ = writeln!(out, "# TYPE gannet_{name} {kind}");
                let _ = writeln!(out, "gannet_{name} {value}");
            }
        }
    }
}

/// A webhook's sink name: `webhook:<id>` in metrics, the cursor's file name.
pub fn webhook_sink_name(id: &str) -> String {
    format!("webhook-{id}")
}

/// A webhook: the stored definition, read again for every batch.
struct WebhookSink {
    hose: std::sync::Weak<Hose>,
    id: String,
    poster: webhook::Poster,
}

impl WebhookSink {
    fn hook(&self) -> Option<Arc<webhook::Webhook>> {
        self.hose.upgrade()?.webhooks.get(&self.id)
    }
}

impl Sink for WebhookSink {
    fn filter(&self) -> Option<Filter> {
        let hook = self.hook()?;
        Some(Filter {
            types: sparkpost::TypeSet::of(&hook.events).unwrap_or_default(),
            tenant: hook.tenant.clone(),
        })
    }

    fn active(&self) -> bool {
        self.hook().is_some_and(|h| h.active)
    }

    fn send(&mut self, batch: &BatchRef<'_>, events: &Events) -> Result<String, String> {
        let Some(hook) = self.hook() else {
            return Err("the webhook was deleted".into());
        };
        let body = events.array();
        let answer = self.poster.post(&hook, batch.id, &body);
        if answer.ok() {
            Ok(answer.status.to_string())
        } else {
            Err(answer.describe())
        }
    }
}

/// One sink's thread: reads, converts, sends, moves the cursor.
struct Driver {
    hose: Arc<Hose>,
    sink: Box<dyn Sink>,
    cursor: Cursor,
    status: Arc<SinkStatus>,
    stop: Arc<AtomicBool>,
    readers: Vec<Option<crate::events::log::OpenLog>>,
    /// Since when each log has had events waiting.
    waiting_since: Vec<Option<Instant>>,
    buf: Vec<u8>,
}

/// A batch read from one log.
struct Batch {
    log: usize,
    start: u64,
    end: u64,
    events: Events,
}

impl Driver {
    fn run(mut self) {
        tracing::info!(sink = %self.status.name, "event sink started");
        let mut next = 0;
        // This thread's VM of the policy script (a VM never leaves its thread).
        let mut scripts = crate::live::ScriptCache::default();
        while !self.stopped() {
            let Some(filter) = self.sink.filter() else {
                break;
            };
            let script = if self.sink.asks_the_script() {
                scripts
                    .get(&self.hose.live, || {
                        format!("event sink {}", self.status.name)
                    })
                    .filter(|s| s.has(Hook::LogRecord))
            } else {
                None
            };
            if !self.sink.active() {
                self.status.oldest_unshipped_ms.store(0, Ordering::Relaxed);
                self.pause(Duration::from_secs(1));
                continue;
            }
            let Some(log) = self.due_log(next) else {
                self.pause(POLL);
                continue;
            };
            next = log + 1;
            let batch = match self.read_batch(log, &filter, script.as_deref()) {
                Ok(batch) => batch,
                Err(err) => {
                    tracing::warn!(sink = %self.status.name, log, "reading the event log: {err}");
                    self.readers[log] = None;
                    self.pause(Duration::from_secs(1));
                    continue;
                }
            };
            if batch.start == batch.end {
                // Nothing whole to read yet.
                self.pause(POLL);
                continue;
            }
            if !batch.events.is_empty() && !self.send(&batch) {
                // Stopped while retrying: the batch is sent again after the restart.
                break;
            }
            self.advance(batch.log, batch.end);
        }
        if let Err(err) = self.cursor.sync() {
            tracing::warn!(sink = %self.status.name, "syncing the cursor: {err}");
        }
        tracing::info!(sink = %self.status.name, "event sink stopped");
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire) || self.hose.stopping.load(Ordering::Acquire)
    }

    /// Sleeps `pause`, waking early when stopped.
    fn pause(&self, pause: Duration) {
        let until = Instant::now() + pause;
        while !self.stopped() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            std::thread::sleep(left.min(POLL));
        }
    }

    /// The next log (from `from`, round robin) whose waiting events make a batch:
    /// enough of them, or waiting long enough.
    fn due_log(&mut self, from: usize) -> Option<usize> {
        let logs = self.hose.logs.len();
        let mut oldest: Option<Instant> = None;
        let mut due = None;
        for k in 0..logs {
            let i = (from + k) % logs;
            let waiting = self.hose.logs[i].end().saturating_sub(self.cursor.get(i));
            if waiting == 0 {
                self.waiting_since[i] = None;
                continue;
            }
            let since = *self.waiting_since[i].get_or_insert_with(Instant::now);
            oldest = Some(oldest.map_or(since, |o| o.min(since)));
            if due.is_none()
                && (waiting >= FULL_BATCH_BYTES || since.elapsed() >= self.hose.settings.batch_wait)
            {
                due = Some(i);
            }
        }
        if oldest.is_none() {
            self.status.oldest_unshipped_ms.store(0, Ordering::Relaxed);
        }
        due
    }

    /// Reads and converts the next batch of `log` from the cursor.
    fn read_batch(
        &mut self,
        log: usize,
        filter: &Filter,
        script: Option<&Script>,
    ) -> std::io::Result<Batch> {
        let files = self.hose.logs[log].clone();
        self.buf.clear();
        let mut start = self.cursor.get(log);
        if start > files.end() {
            // The log is shorter than the cursor: its files were removed by hand.
            tracing::warn!(sink = %self.status.name, log, cursor = start, end = files.end(),
                "event log behind the sink's cursor (files removed?); shipping from its current file");
            start = match files.open_at(0)? {
                crate::events::log::At::Gap(next) => next,
                crate::events::log::At::File(_) => 0,
            };
            self.cursor.set(log, start)?;
            self.readers[log] = None;
        }
        // Open (or reopen) the file at the cursor; move past deleted files.
        for _ in 0..8 {
            if self.readers[log].as_ref().is_some_and(|r| r.pos == start) {
                let reader = self.readers[log].as_mut().expect("checked");
                if reader.read_lines(&files, &mut self.buf, READ_BYTES)? {
                    break;
                }
                // The file is finished: the rest is in the next one.
                self.readers[log] = None;
                continue;
            }
            match files.open_at(start)? {
                crate::events::log::At::File(open) => self.readers[log] = Some(open),
                crate::events::log::At::Gap(next) => {
                    let lost = next.saturating_sub(start);
                    self.status
                        .bytes_lost_total
                        .fetch_add(lost, Ordering::Relaxed);
                    tracing::warn!(sink = %self.status.name, log, lost_bytes = lost,
                        "events deleted before this sink shipped them (events.unshipped_bytes_max)");
                    start = next;
                    self.cursor.set(log, start)?;
                    self.buf.clear();
                }
            }
        }
        let mut events = Events::new();
        let mut consumed = 0;
        for line in self.buf.split_inclusive(|b| *b == b'\n') {
            let lsn = start + consumed as u64;
            consumed += line.len();
            let text = line.strip_suffix(b"\n").unwrap_or(line);
            let before = events.len();
            if let Err(err) = sparkpost::convert(text, log as u16, lsn, filter, &mut events) {
                self.status
                    .lines_skipped_total
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(sink = %self.status.name, log, lsn, "skipping an event log line: {err}");
            }
            // The script is asked only about what the sink would be sent.
            if let Some(script) = script
                && events.len() > before
                && !self.script_keeps(script, text)
            {
                let declined = events.len() - before;
                self.status
                    .events_declined_total
                    .fetch_add(declined as u64, Ordering::Relaxed);
                events.truncate(before);
            }
            if events.len() >= self.hose.settings.batch_events_max {
                break;
            }
        }
        let end = start + consumed as u64;
        if let Some(reader) = &mut self.readers[log] {
            // Positional reads: the next batch starts after the last line taken.
            reader.pos = end;
        }
        if let Some(first) = events.items.first() {
            self.status
                .oldest_unshipped_ms
                .store(first.timestamp_ms.max(1), Ordering::Relaxed);
        }
        Ok(Batch {
            log,
            start,
            end,
            events,
        })
    }

    /// `should_enqueue_log_record` on one log line: a failure sends the event (one
    /// too many is better than one lost) and is counted, and logged at the 1st,
    /// 10th, 100th, … failure of this sink.
    fn script_keeps(&self, script: &Script, line: &[u8]) -> bool {
        match script.should_enqueue_log_record(line, &self.status.name) {
            Ok(keep) => keep,
            Err(err) => {
                let n = self
                    .status
                    .script_failures_total
                    .fetch_add(1, Ordering::Relaxed)
                    + 1;
                let mut m = n;
                while m.is_multiple_of(10) {
                    m /= 10;
                }
                if m == 1 {
                    tracing::warn!(sink = %self.status.name, failures = n,
                        "the policy script failed on an event, which is sent: {err}");
                }
                true
            }
        }
    }

    /// Sends a batch until it is acknowledged (true), given up (true: the cursor
    /// moves past it), or the sink is stopped (false).
    fn send(&mut self, batch: &Batch) -> bool {
        // Stable across resends (also after a restart): the log and the position.
        let batch_id = format!("{:04x}{:016x}", batch.log, batch.start);
        let started = Instant::now();
        let mut pause = FIRST_RETRY;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let at = BatchRef {
                id: &batch_id,
                log: batch.log,
                end: batch.end,
            };
            let result = self.sink.send(&at, &batch.events);
            let now = gannet_core::clock::unix_ms();
            let (response_code, failure_code) = match &result {
                Ok(code) => (code.clone(), None),
                Err(err) => ("0".to_string(), Some(err.clone())),
            };
            self.status.note_batch(BatchStatus {
                batch_id: batch_id.clone(),
                ts: gannet_core::clock::rfc3339_millis(now),
                attempts,
                response_code,
                failure_code,
            });
            match result {
                Ok(_) => {
                    self.status.last_success_ms.store(now, Ordering::Relaxed);
                    self.status.batches_total.fetch_add(1, Ordering::Relaxed);
                    self.status
                        .events_total
                        .fetch_add(batch.events.len() as u64, Ordering::Relaxed);
                    return true;
                }
                Err(err) => {
                    self.status.last_failure_ms.store(now, Ordering::Relaxed);
                    self.status
                        .batch_failures_total
                        .fetch_add(1, Ordering::Relaxed);
                    if attempts == 1 || attempts % 10 == 0 {
                        tracing::warn!(sink = %self.status.name, batch = %batch_id, attempts, "event batch not delivered: {err}");
                    }
                    if started.elapsed() >= self.hose.settings.retry_max {
                        tracing::error!(sink = %self.status.name, batch = %batch_id, attempts,
                            events = batch.events.len(), "giving up an event batch (events.retry_max_secs)");
                        self.status
                            .events_dropped_total
                            .fetch_add(batch.events.len() as u64, Ordering::Relaxed);
                        return true;
                    }
                }
            }
            self.pause(pause);
            if self.stopped() || self.sink.filter().is_none() {
                return false;
            }
            pause = (pause * 2).min(self.hose.settings.retry_interval_max);
        }
    }

    /// Moves the cursor of `log` to `end` (written at once) and tells the log.
    fn advance(&mut self, log: usize, end: u64) {
        if let Err(err) = self.cursor.set(log, end) {
            tracing::error!(sink = %self.status.name, "writing the cursor: {err}");
        }
        self.status.positions[log].store(end, Ordering::Release);
        self.hose.update_shipped();
    }
}
