//! The queue maintainer, one task per shard: promotes due parts from the timer
//! wheel, holds those whose scheduled queue is suspended, sends the rest to
//! [`super::routing`] (static route, or one MX lookup per domain at a time), opens
//! connections within the shaping of each ready queue that changed
//! (`Queues::open_connections`: connection_limit, max_connection_rate, backoff after
//! failures), forgets idle ready queues and publishes the queue gauges.

use std::rc::Rc;
use std::time::Duration;

use super::Dispatcher;
use super::client::Response;
use super::connection::{Work, connection, fail};
use super::routing::{place, resolve, site_found};
use super::settling::delayed;
use gannet_core::clock::unix_ms;
use gannet_core::queue::Part;
use gannet_core::queue::adapt::Bounced;

/// How often idle ready queues are forgotten.
const FORGET_IDLE_MS: u64 = 10_000;
/// How often shared rates take their leases' answers and give back what they hold
/// unspent (a fraction of the smallest lease window).
const SETTLE_LEASES_MS: u64 = 50;
/// How often the queue gauges are brought up to date, at most.
const GAUGES_MS: u64 = 100;

/// The queue maintainer: runs until shutdown.
pub async fn run(d: Rc<Dispatcher>) {
    let shard = &d.shard;
    // The cluster link's state changes already told, and the operator's verbs in
    // step with the other nodes' (shard 0 keeps both).
    let mut in_step = InStep::default();
    if d.suspended {
        tracing::info!(
            shard = shard.id,
            "delivery is suspended (delivery.suspended); messages stay queued"
        );
        // Still in step with the cluster: the verbs apply once delivery resumes,
        // and the link's changes are events.
        while !shard.shutdown.is_raised() && in_step.wanted(&d) {
            in_step.keep(&d, unix_ms()).await;
            shard.shutdown.sleep(Duration::from_millis(250)).await;
        }
        shard.shutdown.wait().await;
        return;
    }
    let mut last_forget = unix_ms();
    let mut last_settle = 0;
    let mut last_gauges = 0;
    while !shard.shutdown.is_raised() {
        let now = unix_ms();
        if in_step.wanted(&d) {
            in_step.keep(&d, now).await;
        }
        let taken = d.refresh_live(&shard.shared.live, now);
        for (part, bounce) in taken.bounced {
            super::settling::admin_bounce(&d, part, &bounce);
        }
        for (part, hold) in taken.held {
            super::routing::held_by_rule(&d, part, &hold, now);
        }
        let mut to_open: Vec<String> = Vec::new();
        let mut to_resolve: Vec<Rc<str>> = Vec::new();
        let mut to_place: Vec<Part> = Vec::new();
        let mut no_site: Vec<(Part, Response)> = Vec::new();
        let mut bounced = Vec::new();
        let mut admin_bounced: Vec<Part> = Vec::new();
        // The earliest time something must be looked at again, besides the wheel.
        let mut wake_at = now + 1000;
        {
            let mut queues = d.queues.borrow_mut();
            queues.promote(now);
            if let Some(expiry) = queues.release(now) {
                wake_at = wake_at.min(expiry);
            }
            // Due parts: held when their scheduled queue is suspended, else they get
            // their site: a static route, a site known from DNS, or an MX lookup (one
            // per domain at a time; parts of a domain being resolved wait for it).
            let due = std::mem::take(&mut queues.due);
            let mut resolving = d.resolving.borrow_mut();
            let sites = d.sites.borrow();
            for mut part in due {
                if queues.admin_bounce(&part, now).is_some() {
                    admin_bounced.push(part);
                    continue;
                }
                if let Some(s) = queues.suspension(&part, now) {
                    let why = Response::local(
                        451,
                        format!("4.4.5 queue suspended ({}): {}", s.id, s.reason),
                    );
                    delayed(&d, &part, &why, now);
                    queues.hold(part);
                    continue;
                }
                // The domain whose route or MX the part takes: the recipients', or
                // the routing_domain a policy script gave the message.
                let routing: Rc<str> = match part.message.borrow().meta("routing_domain") {
                    Some(other) => Rc::from(other),
                    None => part.domain.clone(),
                };
                if let Some(site) = d.routes.site(&routing) {
                    part.site = Some(site);
                    to_place.push(part);
                } else if let Some(known) = sites.get(&*routing, now) {
                    match known {
                        Ok(site) => {
                            part.site = Some(site);
                            to_place.push(part);
                        }
                        Err(response) => no_site.push((part, response)),
                    }
                } else if let Some(waiting) = resolving.get_mut(&routing) {
                    waiting.push(part);
                } else {
                    to_resolve.push(routing.clone());
                    resolving.insert(routing, vec![part]);
                }
            }
            // Connections within each queue's shaping, for the queues that changed.
            if let Some(at) = queues.open_connections(now, &mut to_open) {
                wake_at = wake_at.min(at);
            }
            // Response rules in force: those whose time is up end, and what waits
            // under a bounce rule is taken out to be bounced.
            if queues.rules_in_force() {
                let ended = queues.expire_rules(now);
                super::adapt::ended(&d, &queues, &ended, now);
                bounced = queues.take_bounced(now);
                if let Some(at) = queues.next_rule_expiry() {
                    wake_at = wake_at.min(at);
                }
            }
            if now.saturating_sub(last_settle) >= SETTLE_LEASES_MS {
                queues.settle_leases(now);
                last_settle = now;
            }
            if now.saturating_sub(last_forget) >= FORGET_IDLE_MS {
                queues.forget_idle(now);
                last_forget = now;
            }
        }
        // Every connection counted above must be started, and every domain marked as
        // resolving must be resolved, before anything else.
        for key in to_open {
            glommio::spawn_local(connection(d.clone(), key)).detach();
        }
        for domain in to_resolve {
            glommio::spawn_local(resolve(d.clone(), domain)).detach();
        }
        for part in admin_bounced {
            match d.admin_bounce(&part, now) {
                Some(bounce) => super::settling::admin_bounce(&d, part, &bounce),
                // Cannot happen within one round; never lose a part if it does.
                None => d.queues.borrow_mut().due.push(part),
            }
        }
        for (part, response) in no_site {
            site_found(&d, part, &Err(response), now);
        }
        for (key, rule, work) in bounced {
            let reply = super::adapt::bounce_reply(&d, rule, &key);
            let work = match work {
                Bounced::Local(part) => Work::Local(part),
                Bounced::Remote(handoff) => Work::Remote(handoff),
            };
            fail(&d, work, &reply).await;
        }
        if !to_place.is_empty() {
            for part in to_place {
                place(&d, part, now);
            }
            // Placed parts may have filled a local ready queue: look again at once.
            continue;
        }
        let next = {
            let queues = d.queues.borrow();
            // The gauges count every ready queue: at most every GAUGES_MS, not per
            // round (a round runs per event, and there may be thousands of queues).
            if now.saturating_sub(last_gauges) >= GAUGES_MS {
                last_gauges = now;
                let m = &shard.metrics;
                let gauge = |g: &std::sync::atomic::AtomicU64, v: usize| {
                    g.store(v as u64, std::sync::atomic::Ordering::Relaxed)
                };
                gauge(&m.queue_scheduled_parts, queues.scheduled_len());
                gauge(&m.queue_ready_parts, queues.ready_len());
                gauge(&m.queue_held_parts, queues.held_len());
                gauge(&m.delivery_connections_idle, d.idle_connections.get());
                let dns = d.resolver.stats();
                gauge(&m.dns_cache_entries, dns.cached);
                gauge(&m.dns_cache_evicted_total, dns.evicted as usize);
                gauge(&m.dns_queries_total, dns.queries as usize);
                gauge(&m.dns_queries_resent_total, dns.resent as usize);
                gauge(&m.dns_sockets_opened_total, dns.sockets as usize);
                gauge(&m.delivery_sites_known, d.sites.borrow().len());
                gauge(&m.adaptive_queues_with_rules, queues.queues_with_rules());
                gauge(&m.adaptive_queues_backed_off, queues.queues_backed_off());
            }
            queues.next_due().map_or(wake_at, |due| due.min(wake_at))
        };
        let sleep_ms = next.saturating_sub(unix_ms()).clamp(1, 1000);
        futures_lite::future::or(
            d.wake.wait(),
            shard.shutdown.sleep(Duration::from_millis(sleep_ms)),
        )
        .await;
    }
}

/// What shard 0 keeps in step with the cluster (`[cluster]`): the link's state
/// changes told as events, and the operator's verbs (`admin::cluster`).
#[derive(Default)]
struct InStep {
    link_changes: u64,
    verbs: crate::admin::cluster::Sync,
}

impl InStep {
    fn wanted(&self, d: &Dispatcher) -> bool {
        d.shard.id == 0 && d.shard.shared.cluster.is_some()
    }

    async fn keep(&mut self, d: &Dispatcher, now: u64) {
        self.link_changes = link_event(d, self.link_changes, now);
        crate::admin::cluster::sync(&d.shard, &mut self.verbs).await;
    }
}

/// Records a `cluster` event when the link to the shared Redis has changed state
/// since `told` changes; returns the changes told now.
fn link_event(d: &Dispatcher, told: u64, now: u64) -> u64 {
    use std::sync::atomic::Ordering::Relaxed;
    let Some(link) = &d.shard.shared.cluster else {
        return told;
    };
    let stats = link.stats();
    let changes = stats.state_changes_total.load(Relaxed);
    if changes != told {
        let up = stats.up.load(Relaxed);
        d.shard.event(&crate::events::Event::Cluster {
            timestamp_ms: now,
            shard: d.shard.id,
            change: if up { "reachable" } else { "unreachable" },
            fallback: link.fallback(),
            nodes: link.nodes(),
        });
    }
    changes
}
