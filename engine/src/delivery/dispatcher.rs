//! The shard's delivery loop. The queue maintainer takes due parts from the timer
//! wheel, holds those whose scheduled queue is suspended, finds each one's site
//! (static route or MX) and egress source, and puts it in the ready queue
//! `egress_source->site_name` of the shard that owns the site (here, or over the
//! mesh); it opens connections within each ready queue's shaping (connection_limit,
//! max_connection_rate). Each connection takes parts within max_message_rate, sends
//! them, and the shard that spooled the message settles every recipient — Delivery,
//! Bounce, Expiration or TransientFailure with a retry, or Delayed when a full
//! ready queue (max_ready) or a suspension put it off — in memory, in the spool
//! (update or tombstone) and in the event log.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Duration;

use gannet_spool::{Spool, UpdateRecord};

use super::bounce;
use super::client::{ClientOptions, Envelope, Response, Session, Timeouts};
use super::tls::ClientTls;
use crate::events::{Event, Outcome};
use crate::metrics::ShardMetrics;
use crate::queue::{self, Message, Part, Queues, Routes, Site};
use crate::shard::Shard;
use crate::storage::ShardStorage;
use gannet_core::clock::unix_ms;
use gannet_core::config::Config;
use gannet_core::shaping::ShapingTable;

/// A shard's delivery state.
#[derive(Debug)]
pub struct Dispatcher {
    pub queues: RefCell<Queues>,
    routes: Routes,
    options: ClientOptions,
    tls: ClientTls,
    retry: queue::settle::RetryPolicy,
    suspended: bool,
    /// The generation of the live settings last applied.
    live_generation: Cell<u64>,
    resolver: crate::dns::Resolver,
    /// Connections waiting idle for their queue's next part, and the bound.
    idle_connections: Cell<usize>,
    idle_connections_max: usize,
    /// Bounds the lookups in flight (`dns_lookups_max`).
    lookups: glommio::sync::Semaphore,
    smtp_port: u16,
    /// Domains being resolved, with the parts waiting for the answer.
    resolving: RefCell<std::collections::HashMap<String, Vec<Part>>>,
    /// Parts handed to the shard that owns their site, by token, until it reports.
    handed: RefCell<std::collections::HashMap<u64, Part>>,
    next_token: Cell<u64>,
    /// Egress sources by name (always holding `default`).
    sources: std::collections::HashMap<String, Rc<queue::Egress>>,
    /// Egress pools by name: sources with their weights (always holding `default`).
    pools: std::collections::HashMap<String, Vec<(Rc<queue::Egress>, u32)>>,
    wake: Wake,
}

/// Wakes the maintainer (a single waiter).
#[derive(Debug, Default)]
struct Wake {
    raised: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Wake {
    fn raise(&self) {
        self.raised.set(true);
        if let Some(waker) = self.waker.borrow_mut().take() {
            waker.wake();
        }
    }

    async fn wait(&self) {
        std::future::poll_fn(|cx| {
            if self.raised.replace(false) {
                Poll::Ready(())
            } else {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}

impl Dispatcher {
    pub fn new(config: &Config, tls: ClientTls) -> Dispatcher {
        let d = &config.delivery;
        let routes = d
            .routes
            .iter()
            .map(|(domain, hosts)| (domain.clone(), hosts.iter().map(|h| h.0).collect()))
            .collect();
        let ehlo_name = if d.ehlo_name.is_empty() {
            config.server.hostname.clone()
        } else {
            d.ehlo_name.clone()
        };
        let mut sources: std::collections::HashMap<String, Rc<queue::Egress>> = d
            .sources
            .iter()
            .map(|(name, s)| {
                let egress = queue::Egress {
                    name: name.clone(),
                    source_ip: s.source_ip.parse().ok(),
                    ehlo_name: (!s.ehlo_name.is_empty()).then(|| s.ehlo_name.clone()),
                };
                (name.clone(), Rc::new(egress))
            })
            .collect();
        sources
            .entry("default".into())
            .or_insert_with(|| Rc::new(queue::Egress::default_source()));
        let mut pools: std::collections::HashMap<String, Vec<(Rc<queue::Egress>, u32)>> = d
            .pools
            .iter()
            .map(|(name, members)| {
                let members = members
                    .iter()
                    .filter_map(|m| Some((sources.get(&m.source)?.clone(), m.weight.get() as u32)))
                    .collect();
                (name.clone(), members)
            })
            .collect();
        pools
            .entry("default".into())
            .or_insert_with(|| vec![(sources["default"].clone(), 1)]);
        Dispatcher {
            sources,
            pools,
            queues: RefCell::new(Queues::new(
                unix_ms(),
                Arc::new(ShapingTable::new(&config.delivery)),
            )),
            routes: Routes::new(&routes),
            options: ClientOptions {
                ehlo_name,
                source: None,
                tls: d.tls,
                timeouts: Timeouts::default(),
            },
            tls,
            retry: queue::settle::RetryPolicy {
                interval_s: d.retry_interval_secs.get(),
                max_interval_s: d.max_retry_interval_secs.get(),
                max_age_ms: d.max_age_secs.get() * 1000,
            },
            suspended: d.suspended,
            live_generation: Cell::new(0),
            resolver: crate::dns::Resolver::new(
                config
                    .dns_server()
                    .or_else(crate::dns::Resolver::system_server)
                    .unwrap_or_else(|| "127.0.0.1:53".parse().expect("literal")),
                Duration::from_secs(d.dns_timeout_secs.get()),
                d.dns_cache_entries_max.usize(),
            ),
            smtp_port: u16::try_from(d.smtp_port.get()).unwrap_or(25),
            lookups: glommio::sync::Semaphore::new(d.dns_lookups_max.get()),
            idle_connections: Cell::new(0),
            idle_connections_max: d.idle_connections_max.usize(),
            resolving: RefCell::new(std::collections::HashMap::new()),
            handed: RefCell::new(std::collections::HashMap::new()),
            next_token: Cell::new(0),
            wake: Wake::default(),
        }
    }

    /// Draws a source from `pool` by weight (the default pool for an unknown name).
    fn choose_source(&self, pool: Option<&str>) -> Rc<queue::Egress> {
        let members = pool
            .and_then(|p| self.pools.get(p))
            .unwrap_or_else(|| &self.pools["default"]);
        let total: u64 = members.iter().map(|(_, w)| u64::from(*w)).sum();
        let mut pick = fastrand::u64(0..total.max(1));
        for (source, weight) in members {
            if pick < u64::from(*weight) {
                return source.clone();
            }
            pick -= u64::from(*weight);
        }
        members[0].0.clone()
    }

    /// Queues a message (just received, or recovered) for delivery at `due_ms`.
    pub fn enqueue(&self, shard: &Shard, message: Message, due_ms: u64) {
        let message = Rc::new(RefCell::new(message));
        let parts = queue::split(&message, due_ms);
        if parts.is_empty() {
            // Every recipient was finished before a crash lost the tombstone.
            finish(shard, &message.borrow());
            return;
        }
        let mut queues = self.queues.borrow_mut();
        for part in parts {
            queues.schedule(part);
        }
        drop(queues);
        self.wake.raise();
    }

    /// Applies the live settings (shaping, suspensions) if they changed.
    fn refresh_live(&self, live: &crate::live::Live, now: u64) {
        let generation = live.generation();
        if generation == self.live_generation.get() {
            return;
        }
        self.live_generation.set(generation);
        let state = live.snapshot();
        let mut queues = self.queues.borrow_mut();
        queues.set_shaping(state.shaping.clone());
        queues.set_suspensions(state.suspensions.clone(), now);
    }

    /// The retry time of a part put off without an attempt.
    fn delay_due(&self, attempts: u32, now: u64) -> u64 {
        queue::next_due_ms(
            now,
            attempts.max(1),
            self.retry.interval_s,
            self.retry.max_interval_s,
            fastrand::u64(0..=1000),
        )
    }
}

/// How often idle ready queues are forgotten.
const FORGET_IDLE_MS: u64 = 10_000;

/// The queue maintainer: runs until shutdown.
pub async fn run(shard: Rc<Shard>) {
    let d = &shard.dispatcher;
    if d.suspended {
        tracing::info!(
            shard = shard.id,
            "delivery is suspended (delivery.suspended); messages stay queued"
        );
        shard.shutdown.wait().await;
        return;
    }
    let mut last_forget = unix_ms();
    while !shard.shutdown.is_raised() {
        let now = unix_ms();
        let now_us = now * 1000;
        d.refresh_live(&shard.shared.live, now);
        let mut to_open: Vec<String> = Vec::new();
        let mut to_resolve: Vec<String> = Vec::new();
        let mut to_place: Vec<Part> = Vec::new();
        // The earliest time something must be looked at again, besides the wheel.
        let mut wake_at = now + 1000;
        {
            let mut queues = d.queues.borrow_mut();
            queues.promote(now);
            if let Some(expiry) = queues.release(now) {
                wake_at = wake_at.min(expiry);
            }
            // Due parts: held when their scheduled queue is suspended, else they get
            // their site: a static route, or an MX lookup (one per domain at a time;
            // parts of a domain being resolved wait for that answer).
            let due = std::mem::take(&mut queues.due);
            let mut resolving = d.resolving.borrow_mut();
            for mut part in due {
                if let Some(s) = queues.suspension(&part, now) {
                    let why = Response::local(
                        451,
                        format!("4.4.5 queue suspended ({}): {}", s.id, s.reason),
                    );
                    delayed(&shard, &part, &why, now);
                    queues.hold(part);
                } else if let Some(site) = d.routes.site(&part.domain) {
                    part.site = Some(site);
                    to_place.push(part);
                } else if let Some(waiting) = resolving.get_mut(&part.domain) {
                    waiting.push(part);
                } else {
                    to_resolve.push(part.domain.clone());
                    resolving.insert(part.domain.clone(), vec![part]);
                }
            }
            // Connections within each queue's shaping.
            for (key, ready) in queues.ready.iter_mut() {
                if ready.throttled_until_ms > now {
                    wake_at = wake_at.min(ready.throttled_until_ms);
                    continue;
                }
                let allowed = ready
                    .health
                    .connections_allowed(now, ready.shaping.connection_limit);
                if allowed == 0 {
                    wake_at = wake_at.min(ready.health.retry_at_ms);
                    continue;
                }
                let wanted = ready.len().min(allowed);
                while ready.connections < wanted {
                    if let Err(wait) = ready.connects.acquire(now_us) {
                        wake_at = wake_at.min(now + wait.as_millis() as u64 + 1);
                        break;
                    }
                    ready.connections += 1;
                    to_open.push(key.clone());
                }
            }
            if now.saturating_sub(last_forget) >= FORGET_IDLE_MS {
                queues.forget_idle(now);
                last_forget = now;
            }
        }
        // Every connection counted above must be started, and every domain marked as
        // resolving must be resolved, before anything else.
        for key in to_open {
            glommio::spawn_local(connection(shard.clone(), key)).detach();
        }
        for domain in to_resolve {
            glommio::spawn_local(resolve(shard.clone(), domain)).detach();
        }
        if !to_place.is_empty() {
            for part in to_place {
                place(&shard, part, now);
            }
            // Placed parts may have filled a local ready queue: look again at once.
            continue;
        }
        let next = {
            let queues = d.queues.borrow();
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

/// Resolves a domain's site and moves the parts waiting for it on: to the site's
/// ready queue, or settled with the failure (a bounce for NXDOMAIN or null MX, a
/// transient failure for a DNS error).
async fn resolve(shard: Rc<Shard>, domain: String) {
    let d = &shard.dispatcher;
    let result = {
        let _permit = d.lookups.acquire_permit(1).await;
        resolve_site(&d.resolver, &domain, d.smtp_port).await
    };
    let waiting = d.resolving.borrow_mut().remove(&domain).unwrap_or_default();
    let now = unix_ms();
    for mut part in waiting {
        match &result {
            Ok(site) => {
                part.site = Some(site.clone());
                place(&shard, part, now);
            }
            Err(response) => {
                let results = part.rcpts.iter().map(|i| (*i, response.clone())).collect();
                settle(&shard, part, results, None, None);
            }
        }
    }
    d.wake.raise();
}

/// The site of a domain from DNS: MX hosts (or the implicit MX) and their addresses.
async fn resolve_site(
    resolver: &crate::dns::Resolver,
    domain: &str,
    port: u16,
) -> Result<Rc<Site>, Response> {
    use crate::dns::Mx;
    let groups = match resolver.mx(domain).await {
        Ok(Mx::Hosts(groups)) => groups,
        Ok(Mx::NxDomain) => {
            return Err(Response::local(
                550,
                format!("5.1.2 domain {domain} does not exist (NXDOMAIN)"),
            ));
        }
        Ok(Mx::NoMail) => {
            return Err(Response::local(
                556,
                format!("5.1.10 domain {domain} accepts no mail (null MX)"),
            ));
        }
        Err(err) => return Err(Response::local(451, format!("4.4.3 {err}"))),
    };
    let mut hosts = Vec::new();
    let mut host_names = Vec::new();
    let mut last_error = None;
    for name in groups.iter().flatten() {
        match resolver.addresses(name).await {
            Ok(addresses) => {
                for ip in addresses {
                    hosts.push(std::net::SocketAddr::new(ip, port));
                    host_names.push(name.clone());
                }
            }
            Err(err) => last_error = Some(err),
        }
    }
    if hosts.is_empty() {
        let why = last_error.map_or_else(
            || "no MX host has an address".to_string(),
            |e| e.to_string(),
        );
        return Err(Response::local(
            451,
            format!("4.4.4 cannot reach {domain}: {why}"),
        ));
    }
    Ok(Rc::new(Site {
        name: crate::dns::site_name(&groups),
        hosts,
        host_names,
    }))
}

/// Puts a part whose site is known where it is delivered: this shard's ready queue
/// when the site is ours, else the inbox of the shard that owns the site. A full
/// inbox means the owner is behind; the part is then delivered here instead of
/// waiting (the site's limits are per shard, so this can exceed them briefly).
fn place(shard: &Shard, mut part: Part, now: u64) {
    let d = &shard.dispatcher;
    let site = part.site.clone().expect("placed parts have a site");
    let egress = d.choose_source(part.message.borrow().meta("pool"));
    part.egress = Some(egress.clone());
    let mesh = &shard.shared.mesh;
    let owner = crate::mesh::owner(&site.name, mesh.shards());
    if owner == shard.id {
        push_ready(shard, part, now);
        return;
    }
    let token = d.next_token.get();
    d.next_token.set(token + 1);
    let handoff = {
        let m = part.message.borrow();
        let Some(stored) = shard.spool.get(m.id) else {
            drop(m);
            push_ready(shard, part, now);
            return;
        };
        gannet_core::handoff::Handoff {
            from: shard.id,
            token,
            sender: m.sender.clone(),
            recipients: part
                .rcpts
                .iter()
                .map(|i| m.recipients[*i as usize].clone())
                .collect(),
            // The one copy of the body a hop costs (the mapping stays on this shard).
            body: Arc::new(stored.get().body.to_vec()),
            site: gannet_core::handoff::SiteSpec {
                name: site.name.clone(),
                hosts: site.hosts.clone(),
                host_names: site.host_names.clone(),
            },
            egress: egress.name.clone(),
        }
    };
    match mesh.send(owner, crate::notes::Note::Handoff(Box::new(handoff))) {
        Ok(()) => {
            ShardMetrics::add(&shard.metrics.mesh_handoffs_total, 1);
            d.handed.borrow_mut().insert(token, part);
        }
        Err(_) => {
            ShardMetrics::add(&shard.metrics.mesh_inbox_full_total, 1);
            push_ready(shard, part, now);
        }
    }
}

/// Puts a part in this shard's ready queue, or delays it when the queue is full.
fn push_ready(shard: &Shard, part: Part, now: u64) {
    let refused = shard.dispatcher.queues.borrow_mut().push_ready(part);
    if let Err(part) = refused {
        delay(shard, part, now);
    }
}

/// The reply recorded for a part put off because its ready queue was full.
fn ready_queue_full() -> Response {
    Response::local(451, "4.4.5 ready queue full (max_ready); delayed")
}

/// Returns a part whose ready queue was full to the scheduled queue, untried.
fn delay(shard: &Shard, mut part: Part, now: u64) {
    let d = &shard.dispatcher;
    delayed(shard, &part, &ready_queue_full(), now);
    part.due_ms = d.delay_due(part.attempts, now);
    part.message
        .borrow_mut()
        .set_part_due(&part.domain, Some(part.due_ms));
    part.site = None;
    part.egress = None;
    d.queues.borrow_mut().schedule(part);
}

/// Records a Delayed event for each recipient of a part.
fn delayed(shard: &Shard, part: &Part, response: &Response, now: u64) {
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
        record(shard, &m, *i, &attempt, response, Kind::Delayed);
    }
}

/// The shard's inbox: parts handed over by other shards (to deliver) and reports of
/// parts this shard handed over (to settle).
pub async fn inbox(shard: Rc<Shard>) {
    let d = &shard.dispatcher;
    let mut notes = Vec::with_capacity(INBOX_BATCH);
    while !shard.shutdown.is_raised() {
        futures_lite::future::or(
            shard.shared.mesh.receive(shard.id, &mut notes, INBOX_BATCH),
            shard.shutdown.wait(),
        )
        .await;
        for note in notes.drain(..) {
            match note {
                crate::notes::Note::Handoff(h) => {
                    let site = Rc::new(Site {
                        name: h.site.name.clone(),
                        hosts: h.site.hosts.clone(),
                        host_names: h.site.host_names.clone(),
                    });
                    let egress = d
                        .sources
                        .get(&h.egress)
                        .unwrap_or_else(|| &d.sources["default"])
                        .clone();
                    let refused = d.queues.borrow_mut().push_remote(site, egress, h);
                    if let Err(h) = refused {
                        // Full: the home shard delays the part. Sent from a task, as
                        // this one must keep draining the inbox meanwhile.
                        let report = gannet_core::handoff::Report {
                            token: h.token,
                            results: Vec::new(),
                            peer: None,
                            tls: None,
                            delayed: true,
                        };
                        let (home, shard) = (h.from, shard.clone());
                        glommio::spawn_local(async move {
                            report_home(&shard, home, report).await;
                        })
                        .detach();
                    }
                    d.wake.raise();
                }
                crate::notes::Note::Wake => d.wake.raise(),
                crate::notes::Note::Generate(g) => {
                    let shard = shard.clone();
                    glommio::spawn_local(async move {
                        let ok = crate::generate::generate_chunk(&shard, &g.job, g.chunk).await;
                        let done = crate::notes::Note::Generated {
                            key: g.key,
                            chunk: g.chunk,
                            ok,
                        };
                        send_home(&shard, g.home, done).await;
                    })
                    .detach();
                }
                crate::notes::Note::Generated { key, chunk, ok } => {
                    shard.generation.chunk_done(key, chunk, ok);
                }
                crate::notes::Note::Report(r) => {
                    let Some(part) = d.handed.borrow_mut().remove(&r.token) else {
                        continue;
                    };
                    if r.delayed {
                        delay(&shard, part, unix_ms());
                        continue;
                    }
                    // One reply per recipient; a short report (never expected) leaves
                    // the missing recipients to be retried rather than forgotten.
                    let missing = Response::local(451, "4.3.0 no result from the owner shard");
                    let replies = pad(r.results, part.rcpts.len(), &missing);
                    let results = part.rcpts.iter().copied().zip(replies).collect();
                    settle(&shard, part, results, r.peer, r.tls.as_deref());
                }
            }
        }
    }
}

/// Notes taken from the inbox at a time.
const INBOX_BATCH: usize = 64;

/// Sends a report home, retrying while the home inbox is full (a report must not be
/// lost: the home shard holds the part until it hears back).
async fn report_home(shard: &Shard, to: u16, report: gannet_core::handoff::Report) {
    send_home(shard, to, crate::notes::Note::Report(report)).await;
}

/// Sends a note that must not be lost, retrying while the inbox is full.
async fn send_home(shard: &Shard, to: u16, mut note: crate::notes::Note) {
    loop {
        match shard.shared.mesh.send(to, note) {
            Ok(()) => return,
            Err(back) => {
                note = back;
                if shard.shutdown.is_raised() {
                    return;
                }
                crate::timer::sleep(Duration::from_millis(1)).await;
            }
        }
    }
}

/// Work a connection can take from a ready queue.
enum Work {
    Local(Part),
    Remote(Box<gannet_core::handoff::Handoff>),
}

/// What a connection may do next.
enum Next {
    Work(Work),
    /// The queue has work, but max_message_rate says to wait this long.
    Wait(Duration),
    Done,
}

/// A connection waits for the message rate in place when the wait is this short;
/// longer, it closes and the maintainer opens one when the rate allows.
const RATE_WAIT_IN_PLACE: Duration = Duration::from_secs(2);

/// Takes the next work of a ready queue (this shard's parts first) if its message
/// rate allows.
fn next_work(shard: &Shard, key: &str, rated: bool) -> Next {
    let mut queues = shard.dispatcher.queues.borrow_mut();
    let Some(q) = queues.ready.get_mut(key) else {
        return Next::Done;
    };
    if q.is_empty() {
        return Next::Done;
    }
    // No clock read per message when the rate is unlimited (the common case).
    let limited = q.shaping.max_message_rate != gannet_core::config::shaping::Rate::Unlimited;
    if rated
        && limited
        && let Err(wait) = q.messages.acquire(unix_ms() * 1000)
    {
        return Next::Wait(wait);
    }
    match q.parts.pop_front() {
        Some(part) => Next::Work(Work::Local(part)),
        None => q
            .remote
            .pop_front()
            .map_or(Next::Done, |h| Next::Work(Work::Remote(h))),
    }
}

/// Waits until the ready queue `key` has a part (true), or `limit` passes, the queue
/// is gone or the shard stops (false). False at once when the shard already has
/// `idle_connections_max` connections waiting.
async fn wait_for_work(shard: &Shard, key: &str, limit: Duration) -> bool {
    let d = &shard.dispatcher;
    if limit.is_zero()
        || shard.shutdown.is_raised()
        || d.idle_connections.get() >= d.idle_connections_max
    {
        return false;
    }
    /// Counts one idle connection for as long as it lives.
    struct Idle<'a>(&'a Cell<usize>);
    impl Drop for Idle<'_> {
        fn drop(&mut self) {
            self.0.set(self.0.get() - 1);
        }
    }
    d.idle_connections.set(d.idle_connections.get() + 1);
    let _idle = Idle(&d.idle_connections);
    let arrived = std::future::poll_fn(|cx| {
        let mut queues = shard.dispatcher.queues.borrow_mut();
        match queues.ready.get_mut(key) {
            None => Poll::Ready(false),
            Some(q) if !q.is_empty() => Poll::Ready(true),
            Some(q) => {
                q.idle.push(cx.waker().clone());
                Poll::Pending
            }
        }
    });
    let expired = async {
        shard.shutdown.sleep(limit).await;
        false
    };
    futures_lite::future::or(arrived, expired).await
}

/// The shaping a connection follows (read again per message: it may change live).
fn shaping_of(shard: &Shard, key: &str) -> Option<gannet_core::shaping::Shaping> {
    shard
        .dispatcher
        .queues
        .borrow()
        .ready
        .get(key)
        .map(|q| q.shaping)
}

/// Sends one message to `recipients` over `session` in batches; one reply per
/// recipient, and whether the connection broke. `next` (the first batch of the
/// following message) may be pipelined behind the last batch (see [`Session::send`]).
async fn deliver(
    session: &mut Session,
    batch_max: usize,
    sender: &str,
    recipients: &[String],
    body: &[u8],
    next: Option<Envelope<'_>>,
) -> (Vec<Response>, bool) {
    let mut results = Vec::with_capacity(recipients.len());
    let batches = recipients.len().div_ceil(batch_max);
    for (i, chunk) in recipients.chunks(batch_max).enumerate() {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let then = if i + 1 == batches { next } else { None };
        match session.send(sender, &refs, body, then).await {
            Ok(t) => results.extend((0..chunk.len()).map(|k| t.outcome(k).clone())),
            Err(err) => {
                let response = err.response();
                results.extend(chunk.iter().map(|_| response.clone()));
                return (pad(results, recipients.len(), &response), true);
            }
        }
    }
    (results, false)
}

/// Fills the replies of recipients never tried (after a broken connection).
fn pad(mut results: Vec<Response>, len: usize, response: &Response) -> Vec<Response> {
    results.resize(len, response.clone());
    results
}

/// A part taken from a ready queue with what sending it needs at hand.
enum Loaded {
    /// A part of a message this shard spooled; its body is read in place from the
    /// spool's mapping.
    Local {
        part: Part,
        sender: String,
        /// The part's recipients (allocated per part: the message keeps them with
        /// their per-recipient state, and a transaction needs them as one slice).
        recipients: Vec<String>,
        stored: gannet_spool::MessageRef,
    },
    Remote(Box<gannet_core::handoff::Handoff>),
}

impl Loaded {
    /// Gets `work` ready to send; None (logged) for a part whose message is gone
    /// from the spool.
    fn new(shard: &Shard, work: Work) -> Option<Loaded> {
        match work {
            Work::Remote(h) => Some(Loaded::Remote(h)),
            Work::Local(part) => {
                let (id, sender, recipients) = {
                    let m = part.message.borrow();
                    let recipients = part
                        .rcpts
                        .iter()
                        .map(|i| m.recipients[*i as usize].clone())
                        .collect();
                    (m.id, m.sender.clone(), recipients)
                };
                let Some(stored) = shard.spool.get(id) else {
                    tracing::error!(shard = shard.id, %id, "a queued message is missing from the spool; dropping it from the queue");
                    return None;
                };
                Some(Loaded::Local {
                    part,
                    sender,
                    recipients,
                    stored,
                })
            }
        }
    }

    /// Sender, recipients and body.
    fn envelope(&self) -> (&str, &[String], &[u8]) {
        match self {
            Loaded::Local {
                sender,
                recipients,
                stored,
                ..
            } => (sender, recipients, stored.get().body.as_slice()),
            Loaded::Remote(h) => (&h.sender, &h.recipients, &h.body),
        }
    }

    /// Puts the part back at the head of its ready queue, untried (taken ahead for a
    /// connection that then broke); fails it like a connection failure if the queue
    /// is gone.
    async fn give_back(self, shard: &Shard, key: &str) {
        let work = match self {
            Loaded::Local { part, .. } => Work::Local(part),
            Loaded::Remote(h) => Work::Remote(h),
        };
        let left = match (
            shard.dispatcher.queues.borrow_mut().ready.get_mut(key),
            work,
        ) {
            (Some(q), Work::Local(part)) => {
                q.parts.push_front(part);
                None
            }
            (Some(q), Work::Remote(h)) => {
                q.remote.push_front(h);
                None
            }
            (None, work) => Some(work),
        };
        if let Some(work) = left {
            fail(
                shard,
                work,
                &Response::local(451, "4.4.2 the connection was lost"),
            )
            .await;
        }
    }
}

/// Fails every recipient of `work` with `response`, as when no connection could be
/// made: settled here for a local part, reported home for a handed-off one.
async fn fail(shard: &Shard, work: Work, response: &Response) {
    match work {
        Work::Local(part) => {
            let results = part.rcpts.iter().map(|i| (*i, response.clone())).collect();
            settle(shard, part, results, None, None);
        }
        Work::Remote(h) => {
            let report = gannet_core::handoff::Report {
                token: h.token,
                results: vec![response.clone(); h.recipients.len()],
                peer: None,
                tls: None,
                delayed: false,
            };
            report_home(shard, h.from, report).await;
        }
    }
}

/// One connection's life: connect (hosts in preference order), send ready parts,
/// quit. A connection failure defers one ready part, or all of them after
/// `connection_failures_max` failures in a row, and backs the queue off.
async fn connection(shard: Rc<Shard>, key: String) {
    let d = &shard.dispatcher;
    let Some((site, egress, shaping)) = d
        .queues
        .borrow()
        .ready
        .get(&key)
        .map(|q| (q.site.clone(), q.egress.clone(), q.shaping))
    else {
        return;
    };
    let options = ClientOptions {
        source: egress.source_ip,
        ehlo_name: egress
            .ehlo_name
            .clone()
            .unwrap_or_else(|| d.options.ehlo_name.clone()),
        timeouts: shaping.timeouts,
        ..d.options.clone()
    };
    let mut session = None;
    let mut failure = Response::local(451, "4.4.4 the route has no hosts");
    for (host, name) in site.hosts.iter().zip(&site.host_names) {
        match Session::connect(*host, name, &options, &d.tls).await {
            Ok(s) => {
                session = Some((s, *host));
                break;
            }
            Err(err) => failure = err.response(),
        }
    }
    match session {
        None => {
            // A connection-level failure: deferred, never bounced (the response is a
            // 4xx, see ClientError::response); one part pays for this attempt, and
            // only failures in a row defer the whole queue (queue::health).
            let after = d.queues.borrow_mut().ready.get_mut(&key).map(|q| {
                q.health.failed(
                    unix_ms(),
                    q.shaping.connection_failures_max,
                    q.shaping.connection_backoff_max,
                )
            });
            tracing::debug!(shard = shard.id, queue = %key, ?after, "no connection: {failure}");
            if let Some(after) = after {
                while let Next::Work(work) = next_work(&shard, &key, false) {
                    fail(&shard, work, &failure).await;
                    if after == queue::health::AfterFailure::DeferOne {
                        break;
                    }
                }
            }
        }
        Some((mut session, host)) => {
            if let Some(q) = d.queues.borrow_mut().ready.get_mut(&key) {
                q.health.succeeded();
            }
            let mut sent = 0;
            let mut broken = false;
            // The part taken ahead, whose envelope may already follow the current
            // message's end of data (then it must be the next one sent).
            let mut ahead: Option<Loaded> = None;
            while !broken {
                let Some(shaping) = shaping_of(&shard, &key) else {
                    break;
                };
                let current = match ahead.take() {
                    Some(loaded) => loaded,
                    None if sent >= shaping.max_deliveries_per_connection => break,
                    None => match next_work(&shard, &key, true) {
                        Next::Work(work) => match Loaded::new(&shard, work) {
                            Some(loaded) => loaded,
                            None => continue,
                        },
                        Next::Done => {
                            // Nothing to send: wait idle for the queue's next part, and
                            // use the connection again if the server has not closed it.
                            if !wait_for_work(&shard, &key, shaping.idle_timeout).await {
                                break;
                            }
                            if session.peer_has_spoken() {
                                // Closed (or a 421) while idle: a new connection takes
                                // over; this one is only dropped.
                                tracing::debug!(shard = shard.id, queue = %key, "an idle delivery connection was closed by the server");
                                broken = true;
                                break;
                            }
                            continue;
                        }
                        Next::Wait(wait) if wait <= RATE_WAIT_IN_PLACE => {
                            shard.shutdown.sleep(wait).await;
                            if shard.shutdown.is_raised() {
                                break;
                            }
                            continue;
                        }
                        Next::Wait(wait) => {
                            if let Some(q) = d.queues.borrow_mut().ready.get_mut(&key) {
                                q.throttled_until_ms = unix_ms() + wait.as_millis() as u64;
                            }
                            break;
                        }
                    },
                };
                // Take the following part now, so that its envelope can go out with
                // this message's end of data.
                if shaping.pipeline_next_message
                    && session.pipelines()
                    && sent + 1 < shaping.max_deliveries_per_connection
                    && let Next::Work(work) = next_work(&shard, &key, true)
                {
                    ahead = Loaded::new(&shard, work);
                }
                let batch_max = shaping.max_recipients_per_batch;
                let next_refs: Vec<&str> = ahead.as_ref().map_or_else(Vec::new, |a| {
                    let recipients = a.envelope().1;
                    recipients[..recipients.len().min(batch_max)]
                        .iter()
                        .map(String::as_str)
                        .collect()
                });
                let next = ahead.as_ref().map(|a| {
                    let (sender, _, body) = a.envelope();
                    Envelope {
                        sender,
                        recipients: &next_refs,
                        body,
                    }
                });
                let (sender, recipients, body) = current.envelope();
                let (replies, failed) =
                    deliver(&mut session, batch_max, sender, recipients, body, next).await;
                broken = failed;
                match current {
                    Loaded::Local { part, .. } => {
                        let results = part.rcpts.iter().copied().zip(replies).collect();
                        settle(&shard, part, results, Some(host), session.tls.as_deref());
                    }
                    Loaded::Remote(h) => {
                        let report = gannet_core::handoff::Report {
                            token: h.token,
                            results: replies,
                            peer: Some(host),
                            tls: session.tls.clone(),
                            delayed: false,
                        };
                        report_home(&shard, h.from, report).await;
                    }
                }
                sent += 1;
            }
            if let Some(loaded) = ahead.take() {
                loaded.give_back(&shard, &key).await;
            }
            if !broken {
                session.quit().await;
            }
        }
    }
    if let Some(q) = d.queues.borrow_mut().ready.get_mut(&key) {
        q.connections -= 1;
    }
    d.wake.raise();
}

/// Applies one attempt's replies to a part's recipients.
fn settle(
    shard: &Shard,
    mut part: Part,
    results: Vec<(u32, Response)>,
    peer: Option<std::net::SocketAddr>,
    tls: Option<&str>,
) {
    use queue::settle::{After, Verdict};
    let d = &shard.dispatcher;
    let now = unix_ms();
    let message = part.message.clone();
    let mut m = message.borrow_mut();
    let expired = queue::settle::expired(&m, now, d.retry.max_age_ms);
    let mut verdicts = Vec::with_capacity(results.len());
    for (i, response) in &results {
        let verdict = queue::settle::verdict(response.code, expired);
        let kind = match verdict {
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
        record(shard, &m, *i, &attempt, response, kind);
        verdicts.push((*i, verdict));
    }
    let jitter = fastrand::u64(0..=1000);
    let after = queue::settle::apply(&mut m, &mut part, &verdicts, now, &d.retry, jitter);
    match after {
        After::MessageDone => finish(shard, &m),
        After::PartDone | After::Retry => {
            persist(&shard.spool, &m, m.persisted_due_ms(now), shard.id);
        }
    }
    if after == After::Retry {
        drop(m);
        d.queues.borrow_mut().schedule(part);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Delivery,
    TransientFailure,
    Bounce,
    Expiration,
    Delayed,
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
    shard: &Shard,
    m: &Message,
    rcpt: u32,
    attempt: &Attempt<'_>,
    response: &Response,
    kind: Kind,
) {
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
    };
    ShardMetrics::add(counter, 1);
    shard.event(&event);
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
fn finish(shard: &Shard, m: &Message) {
    written(shard.spool.append_tombstone(m.id), shard.id, "tombstone");
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
