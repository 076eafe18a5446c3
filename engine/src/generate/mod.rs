//! Mail merge: a transmission (content + recipients + substitution data) becomes one
//! message per recipient, each spooled and queued like a message received over SMTP.
//!
//! A single-recipient transmission is generated inside its request. A larger one is
//! first spooled whole as a *job* record (the request, with its stored template and
//! recipient list resolved) and acknowledged; the shard then generates it in batches:
//! render a batch, append every message, wait for the one group commit that covers
//! them, queue them, and append an Update to the job whose `attempts` counts the
//! recipients generated so far. A restart resumes a job from that count (the batch in
//! flight at a crash may be generated twice, never lost); the job's Tombstone follows
//! its last batch.

pub mod content;
pub mod store;
pub mod template;
pub mod transmission;

use std::rc::Rc;

use gannet_spool::{MessageId, MessageRecord, SpoolError, UpdateRecord};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::clock::unix_ms;
use crate::events::Event;
use crate::metrics::ShardMetrics;
use crate::shard::Shard;
use content::{Content, Rcpt, Stamp};
use template::Scope;
use transmission::{RecipientSpec, Spec};

/// Recipients rendered and committed together.
const BATCH: usize = 256;

/// The `kind` meta value of a job record in the spool.
pub const JOB_KIND: &str = "transmission";

/// What a job record's body holds.
#[derive(Debug, Serialize, Deserialize)]
pub struct Stored {
    pub spec: Spec,
    pub pool: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_id: Option<String>,
    pub due_ms: u64,
    pub received_ms: u64,
}

/// A transmission ready to generate: its recipients inline and its content compiled.
#[derive(Debug)]
pub struct Job {
    pub id: String,
    pub stored: Stored,
    pub content: Content,
    pub sandbox: bool,
}

/// Why one recipient got no message.
#[derive(Debug)]
pub enum Failure {
    Render(String),
    Spool(SpoolError),
}

impl Job {
    pub fn recipients(&self) -> &[RecipientSpec] {
        match &self.stored.spec.recipients {
            Some(transmission::Recipients::Inline(list)) => list,
            _ => &[],
        }
    }

    fn campaign(&self) -> Option<&str> {
        self.stored
            .spec
            .campaign_id
            .as_deref()
            .filter(|c| !c.is_empty())
    }

    /// Renders recipient `i`'s message as a spool record.
    fn render(
        &self,
        shard: &Shard,
        i: usize,
        now_ms: u64,
    ) -> Result<(MessageRecord, String), String> {
        let spec = &self.stored.spec;
        let rcpt = &self.recipients()[i];
        let layers = [
            &rcpt.substitution_data,
            &spec.substitution_data,
            &rcpt.metadata,
            &spec.metadata,
        ];
        let scope = Scope { layers: &layers };
        let (email, name, header_to) = rcpt.address.parts();
        let id = shard.spool.next_id();
        let message_id = format!("{id}@{}", shard.config().server.hostname);
        let generated = self
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
                },
            )
            .map_err(|e| e.0)?;
        let sender = rcpt
            .return_path
            .as_deref()
            .or(spec.return_path.as_deref())
            .unwrap_or(&generated.from_email)
            .to_string();
        let domain = crate::policy::domain_of(email);
        let queue =
            crate::queue::scheduled_queue(self.campaign(), self.stored.tenant.as_deref(), domain);
        let mut meta = vec![
            ("pool".to_string(), self.stored.pool.clone()),
            ("transmission_id".to_string(), self.id.clone()),
        ];
        if let Some(tenant) = &self.stored.tenant {
            meta.push(("tenant".to_string(), tenant.clone()));
        }
        if let Some(campaign) = self.campaign() {
            meta.push(("campaign".to_string(), campaign.to_string()));
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
        if let Some(template) = &self.stored.template_id {
            meta.push(("template_id".to_string(), template.clone()));
        }
        Ok((
            MessageRecord {
                id,
                sender,
                recipients: vec![email.to_string()],
                meta,
                queue,
                attempts: 0,
                due_unix_ms: self.stored.due_ms,
                received_unix_ms: now_ms,
                done: Vec::new(),
                body: generated.body,
            },
            generated.subject,
        ))
    }

    /// Generates recipients `range`, spools them in one group commit and queues them.
    /// Returns the recipients that got no message, with why (each also evented as a
    /// generation_failure).
    pub async fn generate(
        &self,
        shard: &Rc<Shard>,
        range: std::ops::Range<usize>,
    ) -> Result<Vec<(usize, String)>, SpoolError> {
        let now_ms = unix_ms();
        let mut batch = Vec::with_capacity(range.len());
        let mut failures = Vec::new();
        for i in range {
            match self.render(shard, i, now_ms) {
                Ok(rendered) => batch.push(rendered),
                Err(reason) => {
                    self.failed(shard, i, &reason, now_ms);
                    failures.push((i, reason));
                }
            }
        }
        if self.sandbox {
            for (record, subject) in &batch {
                self.injected(shard, record, subject);
            }
            return Ok(failures);
        }
        let mut tickets = Vec::with_capacity(batch.len());
        for (record, _) in &batch {
            tickets.push(shard.spool.append_message(record)?);
        }
        for ticket in tickets {
            shard.spool.durable(ticket).await?;
        }
        let generated = batch.len();
        let bytes: usize = batch.iter().map(|(r, _)| r.body.len()).sum();
        ShardMetrics::add(&shard.metrics.http_message_bytes_total, bytes as u64);
        for (record, subject) in batch {
            self.injected(shard, &record, &subject);
            let due = record.due_unix_ms;
            let message = crate::delivery::dispatcher::message_from_record(record);
            shard.dispatcher.enqueue(shard, message, due);
        }
        ShardMetrics::add(
            &shard.metrics.http_messages_generated_total,
            generated as u64,
        );
        Ok(failures)
    }

    fn injected(&self, shard: &Shard, record: &MessageRecord, subject: &str) {
        shard.event(&Event::Injection {
            timestamp_ms: record.received_unix_ms,
            shard: shard.id,
            message_id: record.id.to_string(),
            transmission_id: &self.id,
            campaign_id: self.campaign(),
            template_id: self.stored.template_id.as_deref(),
            rcpt_to: &record.recipients[0],
            msg_from: &record.sender,
            subject,
            msg_size: record.body.len(),
            ip_pool: &self.stored.pool,
            tenant: self.stored.tenant.as_deref(),
            queue: &record.queue,
            rcpt_meta: meta_value(record, "rcpt_meta"),
            rcpt_tags: meta_value(record, "rcpt_tags"),
            sandbox: self.sandbox,
        });
    }

    fn failed(&self, shard: &Shard, i: usize, reason: &str, now_ms: u64) {
        ShardMetrics::add(&shard.metrics.http_generation_failures_total, 1);
        let spec = &self.stored.spec;
        let rcpt = &self.recipients()[i];
        let meta = rcpt_meta(&spec.metadata, &rcpt.metadata);
        shard.event(&Event::GenerationFailure {
            timestamp_ms: now_ms,
            shard: shard.id,
            transmission_id: &self.id,
            campaign_id: self.campaign(),
            template_id: self.stored.template_id.as_deref(),
            rcpt_to: rcpt.address.parts().0,
            rcpt_meta: (!meta.is_empty()).then_some(&meta),
            rcpt_tags: &rcpt.tags,
            reason,
        });
    }
}

fn meta_value<'a>(record: &'a MessageRecord, key: &str) -> Option<&'a serde_json::value::RawValue> {
    let text = record
        .meta
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())?;
    serde_json::from_str(text).ok()
}

/// The recipient's metadata over the transmission's (what events report as rcpt_meta).
pub fn rcpt_meta(
    transmission: &Map<String, Value>,
    recipient: &Map<String, Value>,
) -> Map<String, Value> {
    let mut merged = transmission.clone();
    for (k, v) in recipient {
        merged.insert(k.clone(), v.clone());
    }
    merged
}

/// Starts generating a spooled job from recipient `from` on, as its own task on the
/// shard that spooled (or recovered) it.
pub fn start_job(shard: &Rc<Shard>, job: Job, record: MessageId, from: usize) {
    let pending = job.recipients().len().saturating_sub(from) as u64;
    let metrics = &shard.metrics;
    ShardMetrics::add(&metrics.http_generation_jobs, 1);
    ShardMetrics::add(&metrics.http_generation_pending_recipients, pending);
    glommio::spawn_local(run_job(shard.clone(), job, record, from)).detach();
}

/// Generates a job from recipient `from` on, checkpointing after each batch, then
/// ends the job.
async fn run_job(shard: Rc<Shard>, job: Job, record: MessageId, from: usize) {
    let total = job.recipients().len();
    let mut next = from;
    // However the task ends, the job and what is left of it leave the gauges.
    let left = Rc::new(std::cell::Cell::new(total - from));
    let _gauges = Finally({
        let metrics = shard.metrics.clone();
        let left = left.clone();
        move || {
            ShardMetrics::sub(&metrics.http_generation_jobs, 1);
            ShardMetrics::sub(
                &metrics.http_generation_pending_recipients,
                left.get() as u64,
            );
        }
    });
    while next < total && !shard.shutdown.is_raised() {
        let end = (next + BATCH).min(total);
        if let Err(err) = job.generate(&shard, next..end).await {
            // The spool refused or failed a sync: nothing of this batch is queued, and
            // the job stays in the spool to resume from its last checkpoint on restart.
            tracing::error!(shard = shard.id, transmission = %job.id, "generation stopped: {err}");
            return;
        }
        ShardMetrics::sub(
            &shard.metrics.http_generation_pending_recipients,
            (end - next) as u64,
        );
        left.set(total - end);
        next = end;
        let update = UpdateRecord {
            id: record,
            attempts: next as u32,
            due_unix_ms: job.stored.due_ms,
            queue: JOB_KIND.to_string(),
            done: Vec::new(),
        };
        // Durable with the next batch's commit; losing it regenerates one batch.
        if let Err(err) = shard.spool.append_update(&update) {
            tracing::error!(shard = shard.id, transmission = %job.id, "job checkpoint failed: {err}");
            return;
        }
        glommio::yield_if_needed().await;
    }
    if next < total {
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

/// Rebuilds a job from its spool record (at start-up).
pub fn recover(id: MessageId, body: &[u8]) -> Result<Job, String> {
    let stored: Stored = serde_json::from_slice(body).map_err(|e| format!("job record: {e}"))?;
    let substitute = stored.spec.options.perform_substitutions.unwrap_or(true);
    let content = stored
        .spec
        .content
        .as_ref()
        .ok_or("job record without content")?
        .compile(substitute)
        .map_err(|r| r.description)?;
    Ok(Job {
        id: id.to_string(),
        sandbox: false,
        stored,
        content,
    })
}

/// Runs a closure when dropped (however the task ends).
struct Finally<F: FnMut()>(F);

impl<F: FnMut()> Drop for Finally<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}
