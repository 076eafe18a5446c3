//! Transmission jobs: a transmission (content + recipients + substitution data)
//! becomes one message per recipient, each spooled and queued like a message received
//! over SMTP. What a job is and how one recipient's message is rendered is `merge`'s;
//! this module runs jobs on a shard.
//!
//! A single-recipient transmission is generated inside its request. A larger one is
//! first spooled whole as a *job* record (the request, with its stored template and
//! recipient list resolved) and acknowledged; the shard then generates it in batches:
//! render a batch, append every message, wait for the one group commit that covers
//! them, queue them, and append an Update to the job whose `attempts` counts the
//! recipients generated so far. A restart resumes a job from that count (the batch in
//! flight at a crash may be generated twice, never lost); the job's Tombstone follows
//! its last batch. A job's chunks are spread over the shards through the mesh
//! (`notes::Note::Generate`, routed by the inbox to [`Jobs::generate_chunk`]).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use gannet_spool::{MessageId, MessageRecord, SpoolError, UpdateRecord};
use serde_json::Value;

use crate::delivery::Dispatcher;
use crate::events::Event;
use crate::merge::content::{Rcpt, Stamp};
use crate::merge::template::Scope;
use crate::merge::{JOB_KIND, Job, rcpt_meta, tracking};
use crate::metrics::ShardMetrics;
use crate::policy::script::{Message as ScriptMessage, Outcome};
use crate::shard::Shard;
use gannet_core::clock::unix_ms;

/// Recipients rendered and committed together.
const BATCH: usize = 256;

/// Where a job's chunks report: (chunk, spooled).
type ChunkSender = glommio::channels::local_channel::LocalSender<(u32, bool)>;

/// A shard's transmission jobs: what generating needs (the shard's spool and keys,
/// delivery to queue what it spools) and the jobs this shard coordinates, by number,
/// with the channel on which their chunks report back (from this shard's own tasks
/// and, through the inbox, from other shards).
#[derive(Debug)]
pub struct Jobs {
    pub shard: Rc<Shard>,
    delivery: Rc<Dispatcher>,
    next: Cell<u64>,
    running: RefCell<HashMap<u64, Rc<ChunkSender>>>,
}

impl Jobs {
    pub fn new(shard: Rc<Shard>, delivery: Rc<Dispatcher>) -> Jobs {
        Jobs {
            shard,
            delivery,
            next: Cell::new(0),
            running: RefCell::new(HashMap::new()),
        }
    }

    /// Called by the inbox when another shard finished a chunk of job `key`.
    pub fn chunk_done(&self, key: u64, chunk: u32, ok: bool) {
        if let Some(tx) = self.running.borrow().get(&key) {
            let _ = tx.try_send((chunk, ok));
        }
    }

    /// Renders recipient `i`'s message as a spool record.
    fn render(&self, job: &Job, i: usize, now_ms: u64) -> Result<(MessageRecord, String), String> {
        let spec = &job.stored.spec;
        let rcpt = &job.recipients()[i];
        let layers = [
            &rcpt.substitution_data,
            &spec.substitution_data,
            &rcpt.metadata,
            &spec.metadata,
        ];
        let scope = Scope { layers: &layers };
        let (email, name, header_to) = rcpt.address.parts();
        let id = self.shard.spool.next_id();
        let id_text = id.to_string();
        let message_id = format!("{id_text}@{}", self.shard.config().server.hostname);
        let options = &spec.options;
        let http = &self.shard.config().http;
        let open = options.open_tracking.unwrap_or(http.open_tracking_default);
        let click = options
            .click_tracking
            .unwrap_or(http.click_tracking_default);
        let tracker = tracking::Track {
            key: &self.shard.shared.tracking_key,
            base_url: &self.shard.shared.tracking_base_url,
            open,
            click,
            // The queue id, as every later event names the message.
            message_id: &id_text,
            rcpt_to: email,
            transmission_id: &job.id,
            campaign_id: job.campaign().unwrap_or(""),
            tenant: job.stored.tenant.as_deref().unwrap_or(""),
            template_id: job.stored.template_id.as_deref().unwrap_or(""),
        };
        let track = (open || click).then_some(tracker);
        // One signed token per message (an HMAC and ~200 bytes): the link must
        // name the message and recipient it unsubscribes.
        let unsubscribe = (http.list_unsubscribe && !options.transactional.unwrap_or(false))
            .then(|| tracker.unsubscribe_url());
        let feedback =
            (!self.shard.config().inbound.no_feedback_header).then(|| tracker.feedback_token());
        let generated = job
            .content
            .generate(
                Rcpt {
                    email,
                    name,
                    header_to,
                },
                scope,
                Stamp {
                    message_id: &message_id,
                    unix_secs: now_ms / 1000,
                    list_unsubscribe: unsubscribe.as_deref(),
                    feedback: feedback.as_deref(),
                },
                track,
            )
            .map_err(|e| e.0)?;
        let sender = rcpt
            .return_path
            .as_deref()
            .or(spec.return_path.as_deref())
            .unwrap_or(&generated.from_email)
            .to_string();
        let mut meta = vec![
            ("pool".to_string(), job.stored.pool.clone()),
            ("transmission_id".to_string(), job.id.clone()),
        ];
        if let Some(tenant) = &job.stored.tenant {
            meta.push(("tenant".to_string(), tenant.clone()));
        }
        if let Some(campaign) = job.campaign() {
            meta.push(("campaign".to_string(), campaign.to_string()));
        }
        // Checked when the transmission was accepted; relative to its acceptance.
        if let Ok(Some(at)) = spec.options.expires_ms(job.stored.received_ms) {
            meta.push((
                gannet_core::queue::settle::META_EXPIRES.to_string(),
                at.to_string(),
            ));
        }
        let rcpt_meta = rcpt_meta(&spec.metadata, &rcpt.metadata);
        if !rcpt_meta.is_empty() {
            meta.push((
                "rcpt_meta".to_string(),
                Value::Object(rcpt_meta).to_string(),
            ));
        }
        if !rcpt.tags.is_empty() {
            meta.push((
                "rcpt_tags".to_string(),
                serde_json::to_string(&rcpt.tags).unwrap_or_default(),
            ));
        }
        if let Some(template) = &job.stored.template_id {
            meta.push(("template_id".to_string(), template.clone()));
        }
        let mut message = ScriptMessage {
            sender,
            recipients: vec![email.to_string()],
            meta,
            body: generated.body,
        };
        // The script's http_message_generated: it may set the tenant, campaign,
        // pool, routing domain and keys of its own, and edit header fields, before
        // the message is signed. A refusal or a failure is this recipient's
        // generation failure.
        if let Some(script) = self.shard.script() {
            let outcome;
            (outcome, message) = script.http_message_generated(message);
            match outcome {
                Outcome::Continue => {}
                Outcome::Reject(reply) => {
                    let mut line = Vec::new();
                    reply.encode(&mut line);
                    let line = String::from_utf8_lossy(&line);
                    return Err(format!("refused by the policy script: {}", line.trim_end()));
                }
                Outcome::Failed(why) => {
                    ShardMetrics::add(&self.shard.metrics.policy_script_failures_total, 1);
                    return Err(format!("the policy script failed: {why}"));
                }
            }
        }
        let tenant = message.meta("tenant");
        // DKIM, once per generated message.
        let body = match self.shard.dkim().sign(&message.body, tenant, now_ms / 1000) {
            Ok(None) => std::mem::take(&mut message.body),
            Ok(Some(mut signed)) => {
                ShardMetrics::add(&self.shard.metrics.dkim_signatures_total, 1);
                signed.extend_from_slice(&message.body);
                signed
            }
            Err(err) => {
                ShardMetrics::add(&self.shard.metrics.dkim_failures_total, 1);
                return Err(err.to_string());
            }
        };
        let size_max = self.shard.config().smtp.message_bytes_max.usize();
        if body.len() > size_max {
            return Err(format!(
                "the generated message has {} bytes, more than smtp.message_bytes_max ({size_max})",
                body.len()
            ));
        }
        let queue = gannet_core::queue::scheduled_queue(
            message.meta("campaign"),
            message.meta("tenant"),
            crate::policy::domain_of(email),
            message.meta("routing_domain"),
        );
        let ScriptMessage {
            sender,
            recipients,
            meta,
            ..
        } = message;
        Ok((
            MessageRecord {
                id,
                sender,
                recipients,
                meta,
                queue,
                attempts: 0,
                due_unix_ms: job.stored.due_ms,
                received_unix_ms: now_ms,
                done: Vec::new(),
                body,
            },
            generated.subject,
        ))
    }

    /// Generates recipients `range`, spools them in one group commit and queues them.
    /// Returns the recipients that got no message, with why (each also evented as a
    /// generation_failure).
    pub async fn generate(
        &self,
        job: &Job,
        range: std::ops::Range<usize>,
    ) -> Result<Vec<(usize, String)>, SpoolError> {
        let now_ms = unix_ms();
        let tracked = self.shard.shared.transmissions.get(&job.id);
        if tracked.as_ref().is_some_and(|t| t.canceled()) {
            // Canceled (DELETE /api/v1/transmissions/{id}): nothing more is made.
            return Ok(Vec::new());
        }
        let mut suppressed = 0u64;
        let mut rendered = Vec::with_capacity(range.len());
        let mut failures = Vec::new();
        let options = &job.stored.spec.options;
        let check = options.skip_suppression != Some(true);
        let kind = crate::suppression::Kind::of(options.transactional.unwrap_or(false));
        let lists = &self.shard.shared.suppressions;
        for i in range {
            if check && !lists.is_empty() {
                let email = job.recipients()[i].address.parts().0;
                if lists.is_suppressed(job.stored.tenant.as_deref(), email, kind) {
                    // Accepted with the transmission, as SparkPost does, and
                    // rejected here: no message, a policy_rejection event.
                    self.suppressed(job, email, kind, now_ms);
                    suppressed += 1;
                    continue;
                }
            }
            match self.render(job, i, now_ms) {
                Ok((record, subject)) => rendered.push((i, record, subject)),
                Err(reason) => {
                    self.failed(job, i, &reason, now_ms);
                    failures.push((i, reason));
                }
            }
        }
        // Rendering failures and suppressions now; the generated (and those the spool
        // refuses) once appended, below — a sandbox's at once.
        let failed_rendering = failures.len();
        if let Some(t) = &tracked {
            let counted = if job.sandbox {
                rendered.len() as u64
            } else {
                0
            };
            t.count(counted, failed_rendering as u64, suppressed);
            if job.sandbox {
                self.finish_tracked(t);
            }
        }
        if job.sandbox {
            for (_, record, subject) in &rendered {
                self.injected(job, record, subject);
            }
            return Ok(failures);
        }
        // A record the spool refuses for what it is (too large) fails its recipient
        // alone; any other refusal is the spool's state (full, unhealthy) and fails
        // the chunk, whose records appended so far are tombstoned so that trying the
        // chunk again cannot queue them twice.
        // Each injection event is recorded as its message is appended, before the
        // message can reach its segment (the spool's write barrier writes the events
        // first), so a crash cannot leave a recoverable message without its
        // injection. A chunk the spool then refuses leaves injection events for the
        // messages it tombstones.
        let mut batch = Vec::with_capacity(rendered.len());
        let mut tickets = Vec::with_capacity(rendered.len());
        for (i, record, subject) in rendered {
            match self.shard.spool.append_message(&record) {
                Ok(ticket) => {
                    self.injected(job, &record, &subject);
                    tickets.push(ticket);
                    batch.push(record);
                }
                Err(err @ SpoolError::RecordTooLarge { .. }) => {
                    let reason = format!("the generated message cannot be spooled: {err}");
                    self.failed(job, i, &reason, now_ms);
                    failures.push((i, reason));
                }
                Err(err) => {
                    for record in &batch {
                        let _ = self.shard.spool.append_tombstone(record.id);
                    }
                    return Err(err);
                }
            }
        }
        // A failed sync fails its whole epoch, and the spool itself tombstones every
        // message of it.
        for ticket in tickets {
            self.shard.spool.durable(ticket).await?;
        }
        let generated = batch.len();
        if let Some(t) = &tracked {
            t.count(
                generated as u64,
                (failures.len() - failed_rendering) as u64,
                0,
            );
            self.finish_tracked(t);
        }
        let bytes: usize = batch.iter().map(|r| r.body.len()).sum();
        ShardMetrics::add(&self.shard.metrics.http_message_bytes_total, bytes as u64);
        for record in batch {
            let due = record.due_unix_ms;
            self.delivery.enqueue_spooled(record, due);
        }
        ShardMetrics::add(
            &self.shard.metrics.http_messages_generated_total,
            generated as u64,
        );
        Ok(failures)
    }

    /// Generates every recipient now, batch by batch (inside a request). Returns the
    /// recipients that got no message with why, and, if the spool stopped it, where:
    /// recipients from that index on got nothing either.
    pub async fn generate_all(
        &self,
        job: &Job,
    ) -> (Vec<(usize, String)>, Option<(usize, SpoolError)>) {
        let total = job.recipients().len();
        let mut failures = Vec::new();
        for start in (0..total).step_by(BATCH) {
            match self.generate(job, start..(start + BATCH).min(total)).await {
                Ok(more) => failures.extend(more),
                Err(err) => return (failures, Some((start, err))),
            }
            glommio::yield_if_needed().await;
        }
        (failures, None)
    }

    fn injected(&self, job: &Job, record: &MessageRecord, subject: &str) {
        self.shard.event(&Event::Injection {
            timestamp_ms: record.received_unix_ms,
            shard: self.shard.id,
            message_id: record.id.to_string(),
            transmission_id: &job.id,
            // The message's own: the policy script may have changed the job's.
            campaign_id: meta_str(record, "campaign"),
            template_id: job.stored.template_id.as_deref(),
            rcpt_to: &record.recipients[0],
            msg_from: &record.sender,
            subject,
            msg_size: record.body.len(),
            ip_pool: meta_str(record, "pool").unwrap_or(&job.stored.pool),
            tenant: meta_str(record, "tenant"),
            queue: &record.queue,
            rcpt_meta: meta_value(record, "rcpt_meta"),
            rcpt_tags: meta_value(record, "rcpt_tags"),
            sandbox: job.sandbox,
        });
    }

    /// Notes the transmission's final record once every recipient is dealt with.
    fn finish_tracked(&self, t: &crate::registry::Transmission) {
        self.shard.shared.transmissions.finish_if_done(t, unix_ms());
    }

    fn suppressed(&self, job: &Job, email: &str, kind: crate::suppression::Kind, now_ms: u64) {
        ShardMetrics::add(&self.shard.metrics.suppressed_recipients_total, 1);
        self.shard.event(&Event::PolicyRejection {
            timestamp_ms: now_ms,
            shard: self.shard.id,
            phase: "suppression",
            peer: String::new(),
            sender: None,
            rcpt_to: Some(email),
            reply: format!(
                "554 5.7.1 recipient address was suppressed due to customer policy ({})",
                kind.name()
            ),
            message_id: None,
            tenant: job.stored.tenant.as_deref(),
            campaign_id: job.campaign(),
            transmission_id: Some(&job.id),
        });
    }

    fn failed(&self, job: &Job, i: usize, reason: &str, now_ms: u64) {
        ShardMetrics::add(&self.shard.metrics.http_generation_failures_total, 1);
        let spec = &job.stored.spec;
        let rcpt = &job.recipients()[i];
        let meta = rcpt_meta(&spec.metadata, &rcpt.metadata);
        self.shard.event(&Event::GenerationFailure {
            timestamp_ms: now_ms,
            shard: self.shard.id,
            transmission_id: &job.id,
            campaign_id: job.campaign(),
            template_id: job.stored.template_id.as_deref(),
            tenant: job.stored.tenant.as_deref(),
            rcpt_to: rcpt.address.parts().0,
            rcpt_meta: (!meta.is_empty()).then_some(&meta),
            rcpt_tags: &rcpt.tags,
            reason,
        });
    }

    /// Generates one chunk of a job on this shard; false if the spool refused it.
    pub async fn generate_chunk(&self, job: &Job, chunk: u32) -> bool {
        match self
            .generate(job, chunk_range(chunk, job.recipients().len()))
            .await
        {
            Ok(_) => true,
            Err(err) => {
                tracing::error!(shard = self.shard.id, transmission = %job.id, chunk, "generation failed: {err}");
                false
            }
        }
    }
}

fn meta_value<'a>(record: &'a MessageRecord, key: &str) -> Option<&'a serde_json::value::RawValue> {
    serde_json::from_str(meta_str(record, key)?).ok()
}

fn meta_str<'a>(record: &'a MessageRecord, key: &str) -> Option<&'a str> {
    gannet_core::queue::meta_value(&record.meta, key)
}

/// Where a spooled job stands: recipients `[0, prefix)` are generated, and so are the
/// chunks in `done` (numbers of `BATCH`-recipient chunks past the prefix, finished out
/// of order by other shards). Stored in the job's Update record as `attempts` and
/// `done`.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    pub prefix: usize,
    pub done: Vec<u32>,
}

impl Progress {
    /// The chunks still to generate.
    fn todo(&self, total: usize) -> impl Iterator<Item = u32> + '_ {
        let chunks = total.div_ceil(BATCH) as u32;
        ((self.prefix / BATCH) as u32..chunks).filter(|c| !self.done.contains(c))
    }
}

/// Starts generating spooled jobs one after the other, as one task on the shard
/// that spooled (or recovered) them.
pub fn start(this: &Rc<Jobs>, jobs: Vec<(Job, MessageId, Progress)>) {
    let metrics = &this.shard.metrics;
    for (job, _, progress) in &jobs {
        let total = job.recipients().len();
        let pending: usize = progress
            .todo(total)
            .map(|c| chunk_range(c, total).len())
            .sum();
        ShardMetrics::add(&metrics.http_generation_jobs, 1);
        ShardMetrics::add(&metrics.http_generation_pending_recipients, pending as u64);
    }
    let this = this.clone();
    glommio::spawn_local(async move {
        let shard = &this.shard;
        let mut jobs = jobs.into_iter();
        for (job, record, progress) in jobs.by_ref() {
            if shard.shutdown.is_raised() {
                break;
            }
            run_job(this.clone(), Arc::new(job), record, progress).await;
        }
        // Jobs not started (shutting down) leave the gauges; they resume at start-up.
        for (job, _, progress) in jobs {
            let total = job.recipients().len();
            let pending: usize = progress
                .todo(total)
                .map(|c| chunk_range(c, total).len())
                .sum();
            ShardMetrics::sub(&shard.metrics.http_generation_jobs, 1);
            ShardMetrics::sub(
                &shard.metrics.http_generation_pending_recipients,
                pending as u64,
            );
        }
    })
    .detach();
}

/// The first wait before a chunk the spool refused is tried again, and the longest.
const CHUNK_RETRY_FIRST: std::time::Duration = std::time::Duration::from_secs(1);
const CHUNK_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(60);

/// Chunks in flight per shard: one rendering while another waits for its commit.
const CHUNKS_IN_FLIGHT_PER_SHARD: usize = 2;

fn chunk_range(chunk: u32, total: usize) -> std::ops::Range<usize> {
    let start = chunk as usize * BATCH;
    start..(start + BATCH).min(total)
}

/// Generates a job's remaining chunks, spread over every shard (chunk `c` to shard
/// `c mod shards`, or here when that shard's inbox is full), checkpointing as chunks
/// finish, then ends the job. Each shard spools and queues the messages it
/// generates, so the work of a large transmission uses every core.
async fn run_job(this: Rc<Jobs>, job: Arc<Job>, record: MessageId, progress: Progress) {
    let shard = &this.shard;
    let total = job.recipients().len();
    let mut finished: std::collections::BTreeSet<u32> = progress.done.iter().copied().collect();
    let mut prefix = (progress.prefix / BATCH) as u32;
    let mut todo: std::collections::VecDeque<u32> = progress.todo(total).collect();
    let key = this.next.get();
    this.next.set(key + 1);
    let (tx, rx) = glommio::channels::local_channel::new_unbounded();
    let tx = Rc::new(tx);
    this.running.borrow_mut().insert(key, tx.clone());
    // However the task ends, the job and what is left of it leave the gauges.
    let left = Rc::new(std::cell::Cell::new(
        todo.iter()
            .map(|&c| chunk_range(c, total).len())
            .sum::<usize>(),
    ));
    let _gauges = Finally({
        let this = this.clone();
        let left = left.clone();
        move || {
            let shard = &this.shard;
            this.running.borrow_mut().remove(&key);
            ShardMetrics::sub(&shard.metrics.http_generation_jobs, 1);
            ShardMetrics::sub(
                &shard.metrics.http_generation_pending_recipients,
                left.get() as u64,
            );
        }
    });
    let shards = shard.shared.mesh.shards();
    let window = shards * CHUNKS_IN_FLIGHT_PER_SHARD;
    let mut in_flight = 0;
    // A chunk the spool refused (full disk, failed sync) is tried again after a
    // backoff; meanwhile no new chunk starts.
    let mut failures_in_row = 0u32;
    let mut paused_until = std::time::Instant::now();
    loop {
        while std::time::Instant::now() >= paused_until
            && in_flight < window
            && !shard.shutdown.is_raised()
        {
            let Some(chunk) = todo.pop_front() else { break };
            in_flight += 1;
            let to = (chunk as usize % shards) as u16;
            if to != shard.id {
                let note = crate::notes::Note::Generate(Box::new(crate::notes::GenerateChunk {
                    home: shard.id,
                    key,
                    job: job.clone(),
                    chunk,
                }));
                if shard.shared.mesh.send(to, note).is_ok() {
                    continue;
                }
            }
            let (job, this, tx) = (job.clone(), this.clone(), tx.clone());
            glommio::spawn_local(async move {
                let ok = this.generate_chunk(&job, chunk).await;
                let _ = tx.try_send((chunk, ok));
            })
            .detach();
        }
        if in_flight == 0 {
            if todo.is_empty() || shard.shutdown.is_raised() {
                break;
            }
            shard
                .shutdown
                .sleep(paused_until.saturating_duration_since(std::time::Instant::now()))
                .await;
            continue;
        }
        let Some((chunk, ok)) = futures_lite::future::or(rx.recv(), async {
            shard.shutdown.wait().await;
            None
        })
        .await
        else {
            return; // shutting down: the job resumes at start-up
        };
        in_flight -= 1;
        if !ok {
            // Nothing of that chunk is queued (what it appended is tombstoned): try
            // it again, after 1 s doubling up to a minute.
            failures_in_row = failures_in_row.saturating_add(1);
            let backoff = CHUNK_RETRY_FIRST
                .saturating_mul(1 << (failures_in_row - 1).min(16))
                .min(CHUNK_RETRY_MAX);
            tracing::warn!(shard = shard.id, transmission = %job.id, chunk, "generation of a chunk failed; trying it again in {backoff:?}");
            paused_until = std::time::Instant::now() + backoff;
            todo.push_front(chunk);
            continue;
        }
        failures_in_row = 0;
        let n = chunk_range(chunk, total).len();
        ShardMetrics::sub(&shard.metrics.http_generation_pending_recipients, n as u64);
        left.set(left.get() - n);
        finished.insert(chunk);
        while finished.remove(&prefix) {
            prefix += 1;
        }
        let update = UpdateRecord {
            id: record,
            attempts: (prefix as usize * BATCH).min(total) as u32,
            due_unix_ms: job.stored.due_ms,
            queue: JOB_KIND.to_string(),
            done: finished.iter().copied().collect(),
        };
        // Durable with the next commit; losing it regenerates a few chunks after a
        // restart, and the next checkpoint supersedes it.
        if let Err(err) = shard.spool.append_update(&update) {
            tracing::error!(shard = shard.id, transmission = %job.id, "job checkpoint failed: {err}");
        }
    }
    if !todo.is_empty() {
        return; // shutting down: the job resumes at start-up
    }
    let tombstone = gannet_spool::TombstoneRecord { id: record };
    if let Err(err) = shard
        .spool
        .write(gannet_spool::Record::Tombstone(&tombstone))
        .await
    {
        tracing::warn!(shard = shard.id, transmission = %job.id, "job tombstone failed: {err}");
    }
    tracing::debug!(shard = shard.id, transmission = %job.id, recipients = total, "transmission generated");
}

/// Runs a closure when dropped (however the task ends).
struct Finally<F: FnMut()>(F);

impl<F: FnMut()> Drop for Finally<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}
