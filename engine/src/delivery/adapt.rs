//! Adaptive delivery on the shard that owns a site: each attempt's replies are shown
//! to its ready queue's response rules (`gannet_core::adaptive`), the rules that fire
//! or end are events, and while a `transient` rule is in force a permanent reply is
//! settled as a temporary one. Suspensions, shaping and bounces take effect in the
//! queues (`gannet_core::queue`) and the maintainer.

use super::Dispatcher;
use super::client::Response;
use crate::events::Event;
use gannet_core::adaptive::Fired;
use gannet_core::clock::unix_ms;

/// Shows the replies of one attempt on ready queue `key` to its rules (each run of
/// equal replies once: a transaction's recipients often share one), records what
/// fires, and makes 5xx replies 4xx while a `transient` rule is in force.
/// `whose`: the tenant and campaign of the message the replies are about (none for
/// a failed connection), for suspend_tenant and suspend_campaign.
pub(super) fn observe(
    d: &Dispatcher,
    key: &str,
    replies: &mut [Response],
    whose: (Option<&str>, Option<&str>),
) {
    let now = unix_ms();
    let mut queues = d.queues.borrow_mut();
    if queues.ready.get(key).is_none_or(|q| q.adaptive.is_idle()) {
        return;
    }
    let site = queues.ready.get(key).map(|q| q.site.name.clone());
    for i in 0..replies.len() {
        if i > 0 && replies[i] == replies[i - 1] {
            continue;
        }
        let reply = &replies[i];
        // The rules read the whole reply as one line, code first (only for queues
        // that have rules: one string per distinct reply).
        let text = format!("{} {}", reply.code, reply.text.replace('\n', " "));
        for fired in queues.observe(key, reply.code, &text, now) {
            let holds = match (queues.rules().get(fired.rule), &site) {
                (Some(rule), Some(site)) => rule.holds(whose.0, whose.1, site, fired.until_ms),
                _ => Vec::new(),
            };
            if !holds.is_empty() {
                hold(d, &holds, now);
            }
            record(d, &queues, key, &fired, &text, &holds, now);
        }
    }
    if let Some(rule) = queues.transient_rule(key, now) {
        let name = queues.rules().get(rule).map_or("", |r| r.name.as_str());
        for reply in replies.iter_mut().filter(|r| r.code >= 500) {
            *reply = temporary(reply, name);
        }
    }
}

/// Publishes a rule's holds on tenants or campaigns to every shard (their messages
/// are spooled everywhere): a hold on the same mail and sites is extended.
fn hold(d: &Dispatcher, holds: &[gannet_core::adaptive::Hold], now: u64) {
    let shared = &d.shard.shared;
    let merged = shared
        .live
        .update(|state| crate::live::merge_holds(&mut state.holds, holds, now));
    for to in 0..shared.mesh.shards() {
        // A full inbox is a busy shard: it looks at the settings within a round.
        let _ = shared.mesh.send(to as u16, crate::notes::Note::Wake);
    }
    // The other nodes of the cluster hold the same mail (the tenant's messages are
    // spooled on them too).
    if let Some(link) = &shared.cluster {
        for hold in merged {
            if let Ok(json) = serde_json::to_string(&hold) {
                link.publish(&crate::admin::cluster::hold_field(&hold), Some(json));
            }
        }
    }
}

/// The event of a rule put in force here because it fired on another node of the
/// cluster (change `shared`).
pub(super) fn shared_fired(
    d: &Dispatcher,
    queues: &gannet_core::queue::Queues,
    key: &str,
    rule: u16,
    until_ms: u64,
    now: u64,
) {
    let Some(rule) = queues.rules().get(rule) else {
        return;
    };
    tracing::info!(shard = d.shard.id, queue = key, rule = %rule.name, until_ms, "response rule in force: it fired on another node");
    d.shard.event(&Event::Adaptive {
        timestamp_ms: now,
        shard: d.shard.id,
        queue: key,
        rule: &rule.name,
        change: "shared",
        until_ms: Some(until_ms),
        actions: rule.actions.iter().map(|a| a.name()).collect(),
        set: &rule.set_text,
        reply: None,
        held: Vec::new(),
    });
}

/// The event of a rule that fired (with the tenants or campaigns it holds).
fn record(
    d: &Dispatcher,
    queues: &gannet_core::queue::Queues,
    key: &str,
    fired: &Fired,
    reply: &str,
    holds: &[gannet_core::adaptive::Hold],
    now: u64,
) {
    let Some(rule) = queues.rules().get(fired.rule) else {
        return;
    };
    let metrics = &d.shard.metrics;
    if fired.new {
        metrics
            .adaptive_rules_fired_total
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    tracing::info!(shard = d.shard.id, queue = key, rule = %rule.name, until_ms = fired.until_ms, "response rule fired: {reply}");
    d.shard.event(&Event::Adaptive {
        timestamp_ms: now,
        shard: d.shard.id,
        queue: key,
        rule: &rule.name,
        change: if fired.new { "fired" } else { "extended" },
        until_ms: Some(fired.until_ms),
        actions: rule.actions.iter().map(|a| a.name()).collect(),
        set: &rule.set_text,
        reply: Some(reply),
        held: holds.iter().map(|h| h.who()).collect(),
    });
    // The other nodes of the cluster impose it on their queue of this name.
    if let Some(link) = &d.shard.shared.cluster {
        let shared = gannet_core::queue::adapt::SharedRule {
            queue: key.to_string(),
            rule: rule.name.clone(),
            until_ms: fired.until_ms,
        };
        if let Ok(json) = serde_json::to_string(&shared) {
            link.publish(
                &crate::admin::cluster::rule_field(key, &rule.name),
                Some(json),
            );
        }
    }
}

/// Counts one attempt on ready queue `key` for adaptive backoff (`failed`: no
/// connection, a 421, or only 4xx replies), and records a change of its connection
/// limit as an event (rule `backoff`). A lowering goes to the other nodes of the
/// cluster, which lower their queue of this name too.
pub(super) fn feedback(d: &Dispatcher, key: &str, failed: bool) {
    let now = unix_ms();
    let (change, interval) = {
        let mut queues = d.queues.borrow_mut();
        let Some(change) = queues.feedback(key, failed, now) else {
            return;
        };
        let interval = queues.ready.get(key).map(|q| q.shaping.backoff_interval);
        (change, interval.unwrap_or_default())
    };
    backoff_event(d, key, change, false, now);
    if let Some(link) = &d.shard.shared.cluster
        && change.to < change.from
    {
        let shared = gannet_core::queue::adapt::SharedBackoff {
            queue: key.to_string(),
            limit: change.to,
            until_ms: now + interval.as_millis() as u64,
        };
        if let Ok(json) = serde_json::to_string(&shared) {
            link.publish(&crate::admin::cluster::backoff_field(key), Some(json));
        }
    }
}

/// The event of a change of ready queue `key`'s connection limit by adaptive
/// backoff (`shared`: a lowering made on another node, taken up here).
pub(super) fn backoff_event(
    d: &Dispatcher,
    key: &str,
    change: gannet_core::queue::adapt::LimitChange,
    shared: bool,
    now: u64,
) {
    let lowered = change.to < change.from;
    tracing::info!(
        shard = d.shard.id,
        queue = key,
        from = change.from,
        to = change.to,
        shared,
        "adaptive backoff changed the connection limit"
    );
    let set = format!("connection_limit={}", change.to);
    d.shard.event(&Event::Adaptive {
        timestamp_ms: now,
        shard: d.shard.id,
        queue: key,
        rule: "backoff",
        change: match (shared, lowered) {
            (true, _) => "shared",
            (false, true) => "lowered",
            (false, false) => "raised",
        },
        until_ms: None,
        actions: Vec::new(),
        set: &set,
        reply: None,
        held: Vec::new(),
    });
}

/// Whether an attempt's replies count as a temporary failure of the site for
/// adaptive backoff: a 421 (the server closing), or nothing but 4xx.
pub(super) fn failed_attempt(replies: &[Response]) -> bool {
    replies.iter().any(|r| r.code == 421)
        || (!replies.is_empty() && replies.iter().all(|r| (400..500).contains(&r.code)))
}

/// Records the rules that ended on each queue.
pub(super) fn ended(
    d: &Dispatcher,
    queues: &gannet_core::queue::Queues,
    ended: &[(String, u16)],
    now: u64,
) {
    for (key, rule) in ended {
        let Some(rule) = queues.rules().get(*rule) else {
            continue;
        };
        tracing::info!(shard = d.shard.id, queue = %key, rule = %rule.name, "response rule ended");
        d.shard
            .metrics
            .adaptive_rules_ended_total
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        d.shard.event(&Event::Adaptive {
            timestamp_ms: now,
            shard: d.shard.id,
            queue: key,
            rule: &rule.name,
            change: "ended",
            until_ms: None,
            actions: rule.actions.iter().map(|a| a.name()).collect(),
            set: &rule.set_text,
            reply: None,
            held: Vec::new(),
        });
    }
}

/// A permanent reply made temporary by rule `rule`: 5yz becomes 4yz, an enhanced
/// code 5.x.y becomes 4.x.y, and the text says why.
fn temporary(reply: &Response, rule: &str) -> Response {
    let text = match (reply.enhanced_code(), reply.text.strip_prefix('5')) {
        (Some(_), Some(rest)) => format!("4{rest}"),
        _ => reply.text.clone(),
    };
    Response::local(
        reply.code - 100,
        format!("{text} (made temporary by response rule {rule})"),
    )
}

/// The reply every part that a bounce rule takes out of its ready queue gets.
pub(super) fn bounce_reply(d: &Dispatcher, rule: u16, key: &str) -> Response {
    let queues = d.queues.borrow();
    let name = queues.rules().get(rule).map_or("", |r| r.name.as_str());
    Response::local(
        550,
        format!("5.7.1 bounced by response rule {name} while in force for {key}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permanent_replies_become_temporary_with_their_reason() {
        let r = temporary(&Response::local(554, "5.7.1 blocked\nby policy"), "y#0");
        assert_eq!(r.code, 454);
        assert_eq!(
            r.text,
            "4.7.1 blocked\nby policy (made temporary by response rule y#0)"
        );
        let r = temporary(&Response::local(550, "no such user"), "d#1");
        assert_eq!(
            (r.code, r.text.as_str()),
            (450, "no such user (made temporary by response rule d#1)")
        );
    }
}
