//! The end of an attempt: each recipient's reply becomes a verdict (queue::settle) —
//! Delivery, Bounce, Expiration, TransientFailure with a retry — recorded in the
//! event log and the metrics, and in the spool: an Update with the new retry state,
//! or a Tombstone when every recipient is finished. A part put off without an attempt
//! (full ready queue, suspension) is recorded as Delayed. Only the shard that spooled
//! a message settles it.

use gannet_spool::{Spool, UpdateRecord};

use super::Dispatcher;
use super::client::Response;
use crate::events::{Event, Outcome};
use crate::metrics::ShardMetrics;
use crate::storage::ShardStorage;
use gannet_core::bounce;
use gannet_core::clock::unix_ms;
use gannet_core::queue::{self, Message, Part, Site};

/// Applies one attempt's replies to a part's recipients.
pub(super) fn settle(
    d: &Dispatcher,
    part: Part,
    results: Vec<(u32, Response)>,
    peer: Option<std::net::SocketAddr>,
    tls: Option<&str>,
) {
    settle_as(d, part, results, peer, tls, None);
}

/// Bounces every recipient of a part for an operator's bounce: an AdminBounce
/// event each (unless the bounce suppresses them), counted in its tally.
pub(super) fn admin_bounce(d: &Dispatcher, part: Part, bounce: &crate::live::LiveBounce) {
    let b = &bounce.bounce;
    let reply = Response::local(
        550,
        format!("5.7.1 bounced by the operator ({}): {}", b.id, b.reason),
    );
    let queue = {
        let m = part.message.borrow();
        queue::queue_name(&m, &part.domain).to_string()
    };
    bounce.tally(queue, 1);
    let results = part.rcpts.iter().map(|i| (*i, reply.clone())).collect();
    settle_as(d, part, results, None, None, Some(b.suppress_logging));
}

/// Finishes a part of a canceled transmission (never tried): no event, no retry.
pub(super) fn cancel(d: &Dispatcher, part: Part) {
    let reply = Response::local(554, "5.7.1 the transmission was canceled".to_string());
    let results = part.rcpts.iter().map(|i| (*i, reply.clone())).collect();
    settle_as(d, part, results, None, None, Some(true));
}

/// `admin`: an operator's bounce (with whether its events are suppressed) rather
/// than an attempt's replies.
fn settle_as(
    d: &Dispatcher,
    mut part: Part,
    results: Vec<(u32, Response)>,
    peer: Option<std::net::SocketAddr>,
    tls: Option<&str>,
    admin: Option<bool>,
) {
    use queue::settle::{After, Verdict};
    let shard = &d.shard;
    let now = unix_ms();
    let retry = d.retry_for(&part);
    let message = part.message.clone();
    let mut m = message.borrow_mut();
    let expired = queue::settle::expired(&m, now, retry.max_age_ms);
    let mut verdicts = Vec::with_capacity(results.len());
    for (i, response) in &results {
        let verdict = match admin {
            Some(_) => Verdict::Bounce,
            None => queue::settle::verdict(response.code, expired),
        };
        let kind = match verdict {
            _ if admin.is_some() => Kind::AdminBounce,
            Verdict::Delivery => Kind::Delivery,
            Verdict::TransientFailure => Kind::TransientFailure,
            Verdict::Bounce => Kind::Bounce,
            Verdict::Expiration => Kind::Expiration,
        };
        let attempt = Attempt {
            egress: part.egress.as_deref(),
            site: part.site.as_deref(),
            peer,
            tls,
            retries: part.attempts,
            now,
        };
        if admin != Some(true) {
            record(d, &m, *i, &attempt, response, kind);
        }
        verdicts.push((*i, verdict));
    }
    if admin.is_none() {
        // Before the record that settles these recipients (see dsn.rs).
        super::dsn::report(
            d,
            &m,
            &super::dsn::Attempted {
                part: &part,
                results: &results,
                verdicts: &verdicts,
                peer,
                now,
                retry,
            },
        );
    }
    let jitter = fastrand::u64(0..=1000);
    let after = queue::settle::apply(&mut m, &mut part, &verdicts, now, &retry, jitter);
    match after {
        After::MessageDone => finish(d, &m),
        After::PartDone | After::Retry => {
            persist(&shard.spool, &m, m.persisted_due_ms(now), shard.id);
        }
    }
    if after == After::Retry {
        drop(m);
        let mut queues = d.queues.borrow_mut();
        if queues.admin_bounce(&part, now).is_some() {
            // An operator's bounce was set while the part was out: the maintainer
            // bounces it at its next round rather than at its retry.
            queues.due.push(part);
            drop(queues);
            d.wake_maintainer();
        } else {
            queues.schedule(part);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Delivery,
    TransientFailure,
    Bounce,
    Expiration,
    Delayed,
    AdminBounce,
}

/// What is known about one delivery attempt of a part.
struct Attempt<'a> {
    egress: Option<&'a queue::Egress>,
    /// None when the site could not be resolved.
    site: Option<&'a Site>,
    peer: Option<std::net::SocketAddr>,
    tls: Option<&'a str>,
    /// Attempts made for this part before this one.
    retries: u32,
    now: u64,
}

fn record(
    d: &Dispatcher,
    m: &Message,
    rcpt: u32,
    attempt: &Attempt<'_>,
    response: &Response,
    kind: Kind,
) {
    let shard = &d.shard;
    let Attempt {
        egress,
        site,
        peer,
        tls,
        retries,
        now,
    } = *attempt;
    let outcome = Outcome {
        timestamp_ms: now,
        shard: shard.id,
        message_id: m.id.to_string(),
        sender: &m.sender,
        rcpt_to: &m.recipients[rcpt as usize],
        queue: {
            let rcpt = &m.recipients[rcpt as usize];
            let domain = rcpt
                .rsplit_once('@')
                .map_or("", |(_, d)| d)
                .to_ascii_lowercase();
            queue::queue_name(m, &domain).to_string()
        },
        site: site.map_or("", |s| s.name.as_str()),
        egress_source: egress.map(|e| e.name.as_str()),
        sending_ip: egress.and_then(|e| e.source_ip).map(|ip| ip.to_string()),
        peer: peer.map(|p| p.to_string()),
        response: response.to_string(),
        response_code: response.code,
        enhanced_code: response.enhanced_code(),
        msg_size: m.size,
        bounce_class: match kind {
            Kind::Bounce => Some(bounce::classify(response)),
            _ => None,
        },
        num_retries: retries,
        queue_time: now.saturating_sub(m.received_ms),
        tls,
        ip_pool: m.meta("pool"),
        tenant: m.meta("tenant"),
        campaign_id: m.meta("campaign"),
        transmission_id: m.meta("transmission_id"),
        rcpt_meta: m
            .meta("rcpt_meta")
            .and_then(|j| serde_json::from_str(j).ok()),
        rcpt_tags: m
            .meta("rcpt_tags")
            .and_then(|j| serde_json::from_str(j).ok()),
    };
    if let Some(class) = outcome.bounce_class {
        suppress_hard_bounce(d, m, rcpt, class, &outcome.response, now);
    }
    let metrics = &shard.metrics;
    let (event, counter) = match kind {
        Kind::Delivery => (Event::Delivery(outcome), &metrics.delivery_delivered_total),
        Kind::TransientFailure => (
            Event::TransientFailure(outcome),
            &metrics.delivery_transient_failures_total,
        ),
        Kind::Bounce => (Event::Bounce(outcome), &metrics.delivery_bounced_total),
        Kind::Expiration => (Event::Expiration(outcome), &metrics.delivery_expired_total),
        Kind::Delayed => (Event::Delayed(outcome), &metrics.delivery_delayed_total),
        Kind::AdminBounce => (
            Event::AdminBounce(outcome),
            &metrics.delivery_admin_bounced_total,
        ),
    };
    ShardMetrics::add(counter, 1);
    shard.event(&event);
}

/// A hard bounce (`suppression.hard_bounce_classes`) puts its recipient on its
/// tenant's suppression list for all mail ("Bounce Rule"), unless turned off.
fn suppress_hard_bounce(d: &Dispatcher, m: &Message, rcpt: u32, class: u16, reply: &str, now: u64) {
    let added = d.shard.shared.suppressions.hard_bounce(
        &d.shard.config().suppression,
        m.meta("tenant").unwrap_or(""),
        &m.recipients[rcpt as usize],
        class,
        format!("bounce class {class}: {reply}"),
        now,
    );
    if added {
        ShardMetrics::add(&d.shard.metrics.suppression_auto_added_total, 1);
    }
}

/// Records a Delayed event for each recipient of a part.
pub(super) fn delayed(d: &Dispatcher, part: &Part, response: &Response, now: u64) {
    let m = part.message.borrow();
    let attempt = Attempt {
        egress: part.egress.as_deref(),
        site: part.site.as_deref(),
        peer: None,
        tls: None,
        retries: part.attempts,
        now,
    };
    for i in &part.rcpts {
        record(d, &m, *i, &attempt, response, Kind::Delayed);
    }
}

/// New retry state for a message that still has recipients to try.
fn persist(spool: &Spool<ShardStorage>, m: &Message, due_ms: u64, shard: u16) {
    let update = UpdateRecord {
        id: m.id,
        attempts: m.attempts,
        due_unix_ms: due_ms,
        queue: m.queue.clone(),
        done: m.done.clone(),
    };
    written(spool.append_update(&update), shard, "update");
}

/// Every recipient is finished: the message leaves the spool.
pub(super) fn finish(d: &Dispatcher, m: &Message) {
    written(
        d.shard.spool.append_tombstone(m.id),
        d.shard.id,
        "tombstone",
    );
}

/// Checks that an update or tombstone was written; its sync is not awaited. Losing
/// one is not losing mail: after a crash the message is retried from its last
/// durable state (at worst a recipient is delivered twice). A failed sync is logged
/// by the spool, which also turns unhealthy (new mail gets 421 until a sync succeeds
/// again), so no waiter task is spawned per record on the delivery path.
fn written(
    ticket: Result<gannet_spool::Ticket, gannet_spool::SpoolError>,
    shard: u16,
    what: &'static str,
) {
    if let Err(err) = ticket {
        tracing::warn!(shard, "spool {what} failed: {err}");
    }
}
