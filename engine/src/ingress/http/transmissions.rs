//! `POST /api/v1/transmissions`: SparkPost's Transmissions API.
//!
//! The request is checked and its content compiled before anything is spooled, so
//! a bad template or field is a 4xx with nothing queued. Recipients with a bad
//! address are counted as rejected and the others accepted, as SparkPost reports
//! it; no good recipient at all is a 422. One recipient is generated, spooled and
//! queued inside the request; more are spooled as one job and generated after the
//! response (see `generate`).

use std::net::IpAddr;
use std::rc::Rc;

use gannet_spool::{MessageId, MessageRecord, SpoolError};

use super::{Reply, parse_json};
use crate::jobs::Jobs;
use crate::merge::content::valid_email;
use crate::merge::store::TemplateOptions;
use crate::merge::transmission::{ContentSpec, Recipients, Refusal, Spec};
use crate::merge::{JOB_KIND, Job, Stored};
use crate::metrics::ShardMetrics;
use crate::policy::{Client, Draft};
use crate::shard::Shard;
use gannet_core::auth::ApiIdentity;
use gannet_core::clock::parse_rfc3339;
use gannet_core::clock::unix_ms;

impl From<Refusal> for Reply {
    fn from(r: Refusal) -> Reply {
        Reply::error(r.status, r.code, r.message, &r.description)
    }
}

fn spool_error(err: &SpoolError) -> Reply {
    match err {
        SpoolError::RecordTooLarge { .. } => Reply::error(
            413,
            "",
            "transmission too large",
            "the transmission does not fit in one spool record",
        ),
        SpoolError::Unhealthy => Reply::error(
            503,
            "",
            "spool unavailable",
            "the spool cannot take mail now; try again later",
        ),
        SpoolError::NoSpace { .. } => Reply::error(
            503,
            "",
            "spool full",
            "the mail system is full; nothing was stored, try again later",
        ),
        // Every other spool failure is of the disk, not of the request: nothing was
        // stored, and the same request may succeed later.
        other => Reply::error(
            503,
            "",
            "spool write failed",
            &format!("nothing was stored ({other}); try again later"),
        ),
    }
}

pub async fn create(
    jobs: &Rc<Jobs>,
    identity: &ApiIdentity,
    peer: Option<IpAddr>,
    body: &[u8],
) -> Reply {
    let spec: Spec = match parse_json(body) {
        Ok(spec) => spec,
        Err(reply) => return reply,
    };
    match prepare(&jobs.shard, identity, peer, spec) {
        Ok((job, rejected)) => submit(jobs, job, rejected.len()).await,
        Err(refusal) => refusal.into(),
    }
}

/// Checks a transmission and compiles it into a job; also returns how many
/// recipients were rejected (their addresses).
pub fn prepare(
    shard: &Shard,
    identity: &ApiIdentity,
    peer: Option<IpAddr>,
    mut spec: Spec,
) -> Result<(Job, Vec<String>), Refusal> {
    let config = shard.config();
    let now_ms = unix_ms();
    let recipients = match spec.recipients.take() {
        None => return Err(Refusal::missing("recipients is required")),
        Some(Recipients::Inline(list)) => list,
        Some(Recipients::Stored { list_id }) => match shard
            .shared
            .store
            .list(identity.tenant.as_deref(), &list_id)
        {
            // One copy per transmission: the job must hold its recipients even if the
            // list changes while it is generated.
            Some(list) => list.recipients.clone(),
            None => {
                return Err(Refusal::invalid(format!(
                    "recipient list {list_id:?} does not exist"
                )));
            }
        },
    };
    if recipients.is_empty() {
        return Err(Refusal::missing("at least one recipient is required"));
    }
    let Some(given) = spec.content.take() else {
        return Err(Refusal::missing("content object or template_id required"));
    };
    let template_id = given.template_id.clone();
    spec.content = Some(match &template_id {
        None => given,
        Some(id) => {
            let (content, options) = stored_template(shard, identity.tenant.as_deref(), id, given)?;
            let o = &mut spec.options;
            o.open_tracking = o.open_tracking.or(options.open_tracking);
            o.click_tracking = o.click_tracking.or(options.click_tracking);
            o.transactional = o.transactional.or(options.transactional);
            content
        }
    });
    let content_spec = spec.content.as_ref().expect("set above");
    let substitute = spec.options.perform_substitutions.unwrap_or(true);
    let mut content = content_spec.compile(substitute)?;
    content.inline_css = spec.options.inline_css.unwrap_or(false);
    for (field, path) in [(&spec.return_path, "return_path")] {
        if let Some(address) = field
            && !valid_email(address)
        {
            return Err(Refusal::invalid(format!(
                "{path}: {address:?} is not an email address"
            )));
        }
    }
    let due_ms = match spec.options.start_time.as_deref() {
        None => now_ms,
        Some(text) => match parse_rfc3339(text) {
            Some(ms) => ms.max(now_ms),
            None => {
                return Err(Refusal::invalid(format!(
                    "options.start_time: {text:?} is not a date and time (YYYY-MM-DDTHH:MM:SS with Z or an offset)"
                )));
            }
        },
    };
    spec.options.expires_ms(now_ms).map_err(Refusal::invalid)?;
    if let Some(pool) = &spec.options.ip_pool
        && !config.delivery.pools.contains_key(pool)
    {
        return Err(Refusal::invalid(format!(
            "options.ip_pool: no egress pool named {pool:?} (delivery.pools)"
        )));
    }
    let total = recipients.len();
    let mut accepted = Vec::with_capacity(total);
    let mut rejected = Vec::new();
    for (i, rcpt) in recipients.into_iter().enumerate() {
        let email = rcpt.address.parts().0;
        let return_path_ok = rcpt.return_path.as_deref().is_none_or(valid_email);
        if valid_email(email) && return_path_ok {
            accepted.push(rcpt);
            continue;
        }
        rejected.push(email.to_string());
        if total == 1 {
            return Err(Refusal::invalid(format!(
                "recipients[{i}]: {email:?} is not an email address"
            )));
        }
    }
    if accepted.is_empty() {
        return Err(Refusal::invalid("no recipient has a valid email address"));
    }
    let tenant = identity.tenant.clone();
    let campaign = spec.campaign_id.clone();
    let pool = shard.shared.policy.set_binding(
        &Client {
            ip: peer.unwrap_or(IpAddr::from([127, 0, 0, 1])),
            helo: None,
            tls: false,
            auth_user: Some(&identity.name),
        },
        &Draft {
            sender: spec.return_path.as_deref().unwrap_or(""),
            recipients: &[],
            size_bytes: 0,
            tenant: tenant.as_deref(),
            campaign: campaign.as_deref(),
            requested_pool: spec.options.ip_pool.as_deref(),
        },
    );
    let sandbox = spec.options.sandbox.unwrap_or(false);
    spec.recipients = Some(Recipients::Inline(accepted));
    let transmission_id = shard.spool.next_id().to_string();
    Ok((
        Job {
            id: transmission_id.clone(),
            stored: Stored {
                transmission_id,
                spec,
                pool,
                tenant,
                template_id,
                due_ms,
                received_ms: now_ms,
            },
            content: std::sync::Arc::new(content),
            sandbox,
        },
        rejected,
    ))
}

/// The content of a stored template for a transmission (its published version, or
/// its draft with `use_draft_template`), with the fields the transmission gives
/// beside `template_id` (from, subject, reply_to, headers) taking precedence; and
/// the template's options, the defaults for the transmission's.
fn stored_template(
    shard: &Shard,
    tenant: Option<&str>,
    id: &str,
    given: ContentSpec,
) -> Result<(ContentSpec, TemplateOptions), Refusal> {
    let Some(template) = shard.shared.store.template(tenant, id) else {
        return Err(Refusal::invalid(format!("template {id:?} does not exist")));
    };
    let draft = given.use_draft_template.unwrap_or(false);
    let version = if draft {
        &template.draft
    } else {
        &template.published
    };
    let Some(version) = version else {
        let which = if draft {
            "a draft"
        } else {
            "a published version (use_draft_template to send the draft)"
        };
        return Err(Refusal::invalid(format!("template {id:?} has no {which}")));
    };
    let mut content = version.content.clone();
    content.from = given.from.or(content.from);
    content.subject = given.subject.or(content.subject);
    content.reply_to = given.reply_to.or(content.reply_to);
    content.headers = given.headers.or(content.headers);
    Ok((content, version.options.clone()))
}

fn accepted_reply(job: &Job, accepted: usize, rejected: usize) -> Reply {
    Reply::json(
        200,
        serde_json::json!({
            "results": {
                "total_rejected_recipients": rejected,
                "total_accepted_recipients": accepted,
                "id": job.id,
            }
        })
        .to_string(),
    )
}

async fn submit(jobs: &Rc<Jobs>, job: Job, rejected: usize) -> Reply {
    let shard = &jobs.shard;
    let metrics = &shard.metrics;
    let count = job.recipients().len();
    register(shard, &job, rejected).await;
    ShardMetrics::add(&metrics.http_recipients_rejected_total, rejected as u64);
    if count == 1 || job.sandbox {
        // Generated inside the request: the reply says whether it was spooled.
        return match jobs.generate_all(&job).await {
            (failures, None) => {
                let generated = count - failures.len();
                ShardMetrics::add(&metrics.http_transmissions_total, 1);
                ShardMetrics::add(&metrics.http_recipients_accepted_total, generated as u64);
                accepted_reply(&job, generated, rejected + count - generated)
            }
            (_, Some((_, err))) => spool_error(&err),
        };
    }
    let spooled = match spool_jobs(shard, job).await {
        Ok(spooled) => spooled,
        Err(reply) => return reply,
    };
    ShardMetrics::add(&metrics.http_transmissions_total, 1);
    ShardMetrics::add(&metrics.http_recipients_accepted_total, count as u64);
    let reply = accepted_reply(&spooled[0].0, count, rejected);
    crate::jobs::start(jobs, spooled);
    reply
}

/// Remembers the transmission for the API's list, get and delete (a scheduled one
/// durably, on the blocking thread, before the reply).
async fn register(shard: &Shard, job: &Job, rejected: usize) {
    let spec = &job.stored.spec;
    let record = crate::registry::Record {
        id: job.id.clone(),
        tenant: job.stored.tenant.clone(),
        campaign_id: job.campaign().map(str::to_string),
        description: spec.description.clone(),
        template_id: job.stored.template_id.clone(),
        start_ms: job.stored.due_ms,
        created_ms: job.stored.received_ms,
        num_rcpts: job.recipients().len() as u64,
        num_invalid_recipients: rejected as u64,
        num_generated: 0,
        num_failed_gen: 0,
        num_suppressed: 0,
        canceled: false,
        generation_end_ms: None,
    };
    if record.start_ms > record.created_ms {
        let shared = shard.shared.clone();
        let now = record.created_ms;
        glommio::executor()
            .spawn_blocking(move || {
                shared.transmissions.add(record, now);
            })
            .await;
    } else {
        shard
            .shared
            .transmissions
            .add(record, job.stored.received_ms);
    }
}

/// A transmission as SparkPost's list and get show it.
fn show(t: &crate::registry::Transmission, now_ms: u64) -> serde_json::Value {
    let r = t.snapshot();
    let time = |ms: u64| gannet_core::clock::rfc3339_millis(ms);
    let mut value = serde_json::json!({
        "id": r.id,
        "state": t.state(now_ms),
        "campaign_id": r.campaign_id.clone().unwrap_or_default(),
        "description": r.description.clone().unwrap_or_default(),
        "content": { "template_id": r.template_id },
        "num_rcpts": r.num_rcpts,
        "num_generated": r.num_generated,
        "num_failed_gen": r.num_failed_gen,
        "num_invalid_recipients": r.num_invalid_recipients,
        "num_suppressed": r.num_suppressed,
        "generation_start_time": time(r.created_ms),
        "options": { "start_time": time(r.start_ms) },
    });
    if let Some(end) = r.generation_end_ms {
        value["generation_end_time"] = time(end).into();
    }
    value
}

/// `GET /api/v1/transmissions` (`campaign_id`, `template_id` filters; newest first)
/// and `GET /api/v1/transmissions/{id}`: the key's tenant's transmissions.
pub fn read(shard: &Shard, tenant: Option<&str>, id: Option<&str>, query: &str) -> Reply {
    let now = unix_ms();
    let registry = &shard.shared.transmissions;
    match id {
        Some(id) => match registry
            .get(id)
            .filter(|t| t.record.tenant.as_deref() == tenant)
        {
            Some(t) => Reply::json(
                200,
                serde_json::json!({ "results": { "transmission": show(&t, now) } }).to_string(),
            ),
            None => not_found(id),
        },
        None => {
            let campaign = super::query_value(query, "campaign_id");
            let template = super::query_value(query, "template_id");
            let listed: Vec<serde_json::Value> = registry
                .all()
                .iter()
                .filter(|t| {
                    let r = &t.record;
                    r.tenant.as_deref() == tenant
                        && campaign
                            .as_ref()
                            .is_none_or(|c| r.campaign_id.as_ref() == Some(c))
                        && template
                            .as_ref()
                            .is_none_or(|c| r.template_id.as_ref() == Some(c))
                })
                .map(|t| show(t, now))
                .collect();
            Reply::json(200, serde_json::json!({ "results": listed }).to_string())
        }
    }
}

fn not_found(id: &str) -> Reply {
    super::templates::not_found("transmission", id)
}

/// `DELETE /api/v1/transmissions/{id}` (or `?campaign_id=`): cancels scheduled
/// transmissions — their messages not yet tried are dropped on every shard and no
/// more are generated. One that is not scheduled (it is sending or sent) is 409.
pub async fn cancel(shard: &Shard, tenant: Option<&str>, id: Option<&str>, query: &str) -> Reply {
    let now = unix_ms();
    let registry = &shard.shared.transmissions;
    let chosen: Vec<std::sync::Arc<crate::registry::Transmission>> = match id {
        Some(id) => match registry
            .get(id)
            .filter(|t| t.record.tenant.as_deref() == tenant)
        {
            Some(t) if t.record.start_ms > now && !t.canceled() => vec![t],
            Some(t) => {
                return Reply::error(
                    409,
                    "2004",
                    "transmission cannot be canceled",
                    &format!(
                        "transmission {id:?} is {}: only a scheduled transmission (its start_time still ahead) can be",
                        t.state(now)
                    ),
                );
            }
            None => return not_found(id),
        },
        None => {
            let Some(campaign) = super::query_value(query, "campaign_id") else {
                return super::method_not_allowed();
            };
            registry
                .all()
                .into_iter()
                .filter(|t| {
                    t.record.tenant.as_deref() == tenant
                        && t.record.campaign_id.as_deref() == Some(campaign.as_str())
                        && t.record.start_ms > now
                        && !t.canceled()
                })
                .collect()
        }
    };
    for t in chosen {
        let shared = shard.shared.clone();
        let marked = t.clone();
        glommio::executor()
            .spawn_blocking(move || shared.transmissions.cancel(&marked))
            .await;
        let question = crate::notes::Question::CancelTransmission {
            id: t.record.id.clone(),
        };
        if let Err(reply) = crate::admin::ask(shard, question).await {
            return reply.into();
        }
    }
    Reply::no_content()
}

/// Spools a transmission to be generated after the reply: one job record per
/// `http.job_recipients_max` recipients, all in one commit. Returns the jobs with their
/// record ids, ready for `jobs::start`.
pub async fn spool_jobs(
    shard: &Shard,
    job: Job,
) -> Result<Vec<(Job, MessageId, crate::jobs::Progress)>, Reply> {
    let Job {
        id,
        mut stored,
        content,
        sandbox,
    } = job;
    let recipients = match stored.spec.recipients.take() {
        Some(Recipients::Inline(list)) => list,
        _ => Vec::new(),
    };
    let per_job = shard.config().http.job_recipients_max.usize();
    let mut recipients = recipients.into_iter();
    let mut jobs = Vec::new();
    let mut tickets = Vec::new();
    loop {
        // Each recipient moves once, into its job.
        let part: Vec<_> = recipients.by_ref().take(per_job).collect();
        if part.is_empty() {
            break;
        }
        let mut spec = stored.spec.clone();
        spec.recipients = Some(Recipients::Inline(part));
        let part_stored = Stored {
            spec,
            ..stored.clone_without_spec()
        };
        let record_id = shard.spool.next_id();
        let body = serde_json::to_vec(&part_stored).map_err(|err| {
            Reply::error(
                500,
                "",
                "transmission could not be stored",
                &err.to_string(),
            )
        })?;
        let record = MessageRecord {
            id: record_id,
            sender: String::new(),
            recipients: Vec::new(),
            meta: vec![("kind".to_string(), JOB_KIND.to_string())],
            queue: JOB_KIND.to_string(),
            attempts: 0,
            due_unix_ms: part_stored.due_ms,
            received_unix_ms: part_stored.received_ms,
            done: Vec::new(),
            body,
        };
        tickets.push(
            shard
                .spool
                .append_message(&record)
                .map_err(|e| spool_error(&e))?,
        );
        let part_job = Job {
            id: id.clone(),
            stored: part_stored,
            content: content.clone(),
            sandbox,
        };
        jobs.push((part_job, record_id, crate::jobs::Progress::default()));
    }
    for ticket in tickets {
        shard
            .spool
            .durable(ticket)
            .await
            .map_err(|e| spool_error(&e))?;
    }
    Ok(jobs)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::time::{Duration, Instant};

    use gannet_spool::{CrashMode, SimStorage, Spool, SpoolConfig};

    use gannet_core::auth::ApiIdentity;
    use gannet_core::config::Role;

    /// A chunk the spool refuses (here: the disk is full when its messages need a
    /// new segment) is tombstoned and generated again once there is room: every
    /// recipient ends with exactly one message, none stranded, none twice.
    #[test]
    fn a_chunk_the_spool_refuses_is_generated_again_once_space_returns() {
        glommio::LocalExecutorBuilder::default()
            .spawn(|| async move {
                let dir = tempfile::tempdir().unwrap();
                let storage = SimStorage::new(11);
                let config = SpoolConfig {
                    segment_bytes: 64 << 10,
                    sync_retry_interval_ms: 50,
                    ..SpoolConfig::for_shard(0)
                };
                let services =
                    crate::services::ShardServices::on_sim(dir.path(), storage.clone(), config);
                let shard = services.shard.clone();
                let n = 600;
                let text = "x".repeat(3000);
                let recipients: Vec<serde_json::Value> = (0..n)
                    .map(|i| serde_json::json!({"address": format!("r{i}@x.test")}))
                    .collect();
                let spec: crate::merge::transmission::Spec =
                    serde_json::from_value(serde_json::json!({
                        "recipients": recipients,
                        "content": {"from": "s@s.test", "subject": "s", "text": text}
                    }))
                    .unwrap();
                let identity = ApiIdentity {
                    name: "t".into(),
                    tenant: None,
                    role: Role::Inject,
                };
                let (job, _) = super::prepare(&shard, &identity, None, spec).unwrap();
                let jobs = super::spool_jobs(&shard, job).await.unwrap();
                // Room for what is there and two more segments: ~40 of 600 messages.
                let used = gannet_spool::Storage::list(&storage).unwrap().len() as u64 * (64 << 10);
                storage.set_space_bytes_max(Some(used + 2 * (64 << 10)));
                crate::jobs::start(&services.jobs, jobs);
                let pending = || {
                    shard
                        .metrics
                        .http_generation_pending_recipients
                        .load(std::sync::atomic::Ordering::Relaxed)
                };
                glommio::timer::sleep(Duration::from_millis(1500)).await;
                assert!(pending() > 0, "generation was not held up by the full disk");
                storage.set_space_bytes_max(None);
                let deadline = Instant::now() + Duration::from_secs(60);
                while shard
                    .metrics
                    .http_generation_jobs
                    .load(std::sync::atomic::Ordering::Relaxed)
                    > 0
                {
                    assert!(Instant::now() < deadline, "generation did not resume");
                    glommio::timer::sleep(Duration::from_millis(50)).await;
                }
                shard.spool.close().await;
                let (_, recovered) =
                    Spool::open(storage.crash(CrashMode::Clean), SpoolConfig::for_shard(0))
                        .unwrap();
                let mut seen = BTreeSet::new();
                for live in &recovered.live {
                    let m = live.message.get();
                    assert_eq!(m.recipients.len(), 1, "a job record is still live");
                    assert!(
                        seen.insert(m.recipients[0].to_string()),
                        "{} has two messages",
                        m.recipients[0]
                    );
                }
                assert_eq!(seen.len(), n);
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
