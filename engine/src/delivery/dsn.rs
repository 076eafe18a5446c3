//! Delivery status notifications to the envelope sender (RFC 3464), made when an
//! attempt settles: a failure report for recipients that bounced or expired, a
//! delay report once a recipient has waited `dsn.delay_warning_secs`, a "relayed"
//! report for recipients that asked NOTIFY=SUCCESS (gannet does not pass DSN
//! requests to the next hop, so it reports the hand-over itself, RFC 3461 5.2.2).
//! A recipient's NOTIFY decides for it; without one, `[dsn]` does. Never for the
//! null sender (which every report itself has), and for HTTP transmissions only
//! when `dsn.transmissions` says so.
//!
//! The report is a new message, spooled on this shard and queued like any other.
//! It is appended before the update or tombstone that settles the recipients it
//! reports on, so a crash can leave it and not them (the recipients are tried
//! again: at worst a second report), never them without it.

use gannet_core::dsn::{self, Action, Notify, Report, ReportRcpt};
use gannet_core::queue::settle::Verdict;
use gannet_core::queue::{self, Message, Part};
use gannet_spool::MessageRecord;

use super::Dispatcher;
use super::client::Response;
use crate::events::Event;
use crate::metrics::ShardMetrics;

/// What the attempt was, as far as a report tells it.
pub(super) struct Attempted<'a> {
    pub part: &'a Part,
    pub results: &'a [(u32, Response)],
    pub verdicts: &'a [(u32, Verdict)],
    pub peer: Option<std::net::SocketAddr>,
    pub now: u64,
    /// The part's retry schedule and maximum age.
    pub retry: queue::settle::RetryPolicy,
}

/// Makes, spools and queues the report this attempt calls for, if any.
pub(super) fn report(d: &Dispatcher, m: &Message, a: &Attempted<'_>) {
    if m.sender.is_empty() {
        return;
    }
    let config = &d.shard.config().dsn;
    if m.meta("transmission_id").is_some() && !config.transmissions {
        return;
    }
    let default = Notify {
        success: false,
        failure: config.failure,
        delay: config.delay_default,
    };
    let rcpts_meta = m.meta(dsn::META_RCPTS);
    // Worked out once, and only when a recipient could want a delay report.
    let mut delay_due = None;
    let mut chosen: Vec<(u32, Action, &Response)> = Vec::new();
    for ((i, verdict), (_, response)) in a.verdicts.iter().zip(a.results) {
        let asked = dsn::rcpt_from_meta(rcpts_meta, *i as usize).notify;
        let notify = asked.unwrap_or(default);
        let action = match verdict {
            Verdict::Bounce | Verdict::Expiration if notify.failure => Action::Failed,
            Verdict::TransientFailure
                if notify.delay
                    && *delay_due.get_or_insert_with(|| crosses_delay_threshold(d, m, a)) =>
            {
                Action::Delayed
            }
            Verdict::Delivery if notify.success => Action::Relayed,
            _ => continue,
        };
        chosen.push((*i, action, response));
    }
    if chosen.is_empty() {
        return;
    }
    let Some(original) = d.shard.spool.get(m.id) else {
        tracing::warn!(shard = d.shard.id, id = %m.id, "no spool record for a delivery report");
        return;
    };
    // One report per kind, as Postfix sends them: a failure, a delay, a success.
    for action in [Action::Failed, Action::Delayed, Action::Relayed] {
        let group: Vec<(u32, &Response)> = chosen
            .iter()
            .filter(|c| c.1 == action)
            .map(|c| (c.0, c.2))
            .collect();
        if !group.is_empty() {
            make(d, m, a, original.get(), action, &group);
        }
    }
}

/// Makes, spools and queues one report of `action` on `group`'s recipients.
fn make(
    d: &Dispatcher,
    m: &Message,
    a: &Attempted<'_>,
    original: &gannet_spool::record::ArchivedMessageRecord,
    action: Action,
    group: &[(u32, &Response)],
) {
    let config = &d.shard.config().dsn;
    let spool = &d.shard.spool;
    let rcpts_meta = m.meta(dsn::META_RCPTS);
    let (_, recipients, meta) = original.envelope();
    let meta_value = |key: &str| meta.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
    let body = original.body.as_slice();
    let full = meta_value(dsn::META_RET) == Some("FULL")
        && body.len() as u64 <= config.full_message_bytes_max.get();
    let hostname = &d.shard.config().server.hostname;
    let id = spool.next_id();
    let message_id = format!("{id}@{hostname}");
    let remote = a
        .part
        .site
        .as_ref()
        .map(|s| s.name.clone())
        .or_else(|| a.peer.map(|p| format!("[{}]", p.ip())));
    let asked: Vec<dsn::RcptDsn> = group
        .iter()
        .map(|(i, _)| dsn::rcpt_from_meta(rcpts_meta, *i as usize))
        .collect();
    let retry_until = queue::settle::expiry_ms(m, a.retry.max_age_ms) / 1000;
    let diagnostics: Vec<String> = group.iter().map(|g| g.1.to_string()).collect();
    let rcpts = group
        .iter()
        .zip(&asked)
        .zip(&diagnostics)
        .map(|(((i, response), rcpt), diagnostic)| {
            let expired = action == Action::Failed && response.code < 500;
            ReportRcpt {
                final_rcpt: recipients.get(*i as usize).map_or("", String::as_str),
                original: rcpt.orcpt.as_ref(),
                action,
                status: if expired {
                    // Expired at max_age after temporary failures (RFC 3463).
                    "4.4.7".to_string()
                } else {
                    dsn::status_of(response.code, response.enhanced_code())
                },
                // A reply a server gave (not one made up for a failed connection).
                remote_mta: a.peer.and(remote.as_deref()),
                diagnostic: Some(diagnostic.as_str()),
                last_attempt_secs: a.now / 1000,
                will_retry_until_secs: (action == Action::Delayed).then_some(retry_until),
            }
        })
        .collect::<Vec<_>>();
    let report = dsn::report(&Report {
        hostname,
        message_id: &message_id,
        to: &m.sender,
        envid: meta_value(dsn::META_ENVID),
        arrival_secs: m.received_ms / 1000,
        now_secs: a.now / 1000,
        rcpts,
        original: body,
        full,
    });
    let tenant = m.meta("tenant").map(str::to_string);
    let pool = m.meta("pool").unwrap_or("default").to_string();
    let sender_domain = m
        .sender
        .rsplit_once('@')
        .map_or("", |(_, d)| d)
        .to_ascii_lowercase();
    let mut record_meta = vec![
        ("pool".to_string(), pool.clone()),
        (dsn::META_REPORT_FOR.to_string(), m.id.to_string()),
    ];
    if let Some(tenant) = &tenant {
        record_meta.push(("tenant".to_string(), tenant.clone()));
    }
    let queue = queue::scheduled_queue(None, tenant.as_deref(), &sender_domain, None);
    let own = Own {
        id,
        sender: String::new(),
        recipients: vec![m.sender.clone()],
        meta: record_meta,
        tenant: tenant.as_deref(),
        pool: &pool,
        queue,
        body: report,
        protocol: "DSN",
        now: a.now,
    };
    // Its durability is not awaited: it is appended before the record that settles
    // the recipients it reports on, and commits in order with it.
    if let Err(err) = d.spool_own(own) {
        tracing::warn!(shard = d.shard.id, id = %m.id, "delivery report not spooled: {err}");
        return;
    }
    let counter = match action {
        Action::Failed => &d.shard.metrics.dsn_failure_reports_total,
        Action::Delayed => &d.shard.metrics.dsn_delay_reports_total,
        Action::Relayed => &d.shard.metrics.dsn_success_reports_total,
    };
    ShardMetrics::add(counter, 1);
}

/// A message gannet writes itself (a DSN, a TLS-RPT report).
pub(super) struct Own<'a> {
    /// From the shard's spool (`next_id`), so that the message can name itself.
    pub id: gannet_spool::MessageId,
    /// Empty: the null sender.
    pub sender: String,
    pub recipients: Vec<String>,
    pub meta: Vec<(String, String)>,
    pub tenant: Option<&'a str>,
    pub pool: &'a str,
    pub queue: String,
    pub body: Vec<u8>,
    /// The reception event's protocol (`DSN`, `TLSRPT`).
    pub protocol: &'static str,
    pub now: u64,
}

impl Dispatcher {
    /// Appends `own` to this shard's spool, records its reception and queues it;
    /// the ticket says when it is durable.
    pub(super) fn spool_own(
        &self,
        own: Own<'_>,
    ) -> Result<gannet_spool::Ticket, gannet_spool::SpoolError> {
        let shard = &self.shard;
        let id = own.id;
        let body = self.signed(own.body, own.tenant, own.now);
        let record = MessageRecord {
            id,
            sender: own.sender,
            recipients: own.recipients,
            meta: own.meta,
            queue: own.queue,
            attempts: 0,
            due_unix_ms: own.now,
            received_unix_ms: own.now,
            done: Vec::new(),
            body,
        };
        let ticket = shard.spool.append_message(&record)?;
        shard.event(&Event::Reception {
            timestamp_ms: own.now,
            message_id: id.to_string(),
            shard: shard.id,
            sender: &record.sender,
            rcpt_to: &record.recipients,
            msg_size: record.body.len(),
            peer: String::new(),
            helo: &shard.config().server.hostname,
            protocol: own.protocol,
            tls: None,
            auth_user: None,
            tenant: own.tenant,
            campaign_id: None,
            ip_pool: own.pool,
            queue: &record.queue,
            subject: None,
        });
        self.enqueue_spooled(record, own.now);
        Ok(ticket)
    }

    /// `body` with the DKIM signatures of the keys for its From domain (or tenant)
    /// before it: TLS-RPT reports by mail must carry one (RFC 8460 5.3), and DSNs
    /// fare better with one. Own mail is never refused for want of a key (its
    /// message would be lost): without one, or when signing fails, it goes unsigned.
    fn signed(&self, body: Vec<u8>, tenant: Option<&str>, now_ms: u64) -> Vec<u8> {
        let shard = &self.shard;
        match shard.dkim().sign(&body, tenant, now_ms / 1000) {
            Ok(None) | Err(crate::dkim::DkimFailure::NoKey(_)) => body,
            Ok(Some(mut signed)) => {
                ShardMetrics::add(&shard.metrics.dkim_signatures_total, 1);
                signed.extend_from_slice(&body);
                signed
            }
            Err(err) => {
                ShardMetrics::add(&shard.metrics.dkim_failures_total, 1);
                tracing::warn!(shard = shard.id, "own message not signed: {err}");
                body
            }
        }
    }
}

/// Whether this attempt is the first one past `dsn.delay_warning_secs` after
/// reception: the attempt before it (its due time less the interval that
/// scheduled it, which is no earlier than when it really ran) was still under the
/// threshold. So a delay report goes at most once per part, with no state kept;
/// an attempt near the threshold put off by more than the threshold's margin (a
/// suspension, say) can skip it.
fn crosses_delay_threshold(d: &Dispatcher, m: &Message, a: &Attempted<'_>) -> bool {
    let threshold = d.shard.config().dsn.delay_warning_secs.get() * 1000;
    let age = a.now.saturating_sub(m.received_ms);
    if age < threshold {
        return false;
    }
    let previous = if a.part.attempts == 0 {
        m.received_ms
    } else {
        let interval = queue::next_due_ms(
            0,
            a.part.attempts,
            a.retry.interval_s,
            a.retry.max_interval_s,
            0,
        );
        a.part.due_ms.saturating_sub(interval)
    };
    previous.saturating_sub(m.received_ms) < threshold
}
