//! Delivery, by stage. A message's parts wait in the shard's scheduled queue (the
//! timer wheel) until due; the [`maintainer`] holds those whose scheduled queue is
//! suspended and opens connections within each ready queue's shaping; [`routing`]
//! finds each part's site (static route or MX) and egress source and puts it in the
//! ready queue `egress_source->site_name` of the shard that owns the site — here, or
//! over the mesh ([`handoff`]); a [`connection`] takes parts within max_message_rate
//! and sends them with the SMTP [`client`] (and its [`tls`]); and in [`settling`] the
//! shard that spooled the message settles every recipient — Delivery, Bounce
//! (classified by `gannet_core::bounce`), Expiration or TransientFailure with a
//! retry, or Delayed when a full ready queue (max_ready) or a suspension put it off
//! — in memory, in the spool (update or tombstone) and in the event log, and
//! reports to the sender what [`dsn`] says it asked for (RFC 3464).
//!
//! [`Dispatcher`] is a shard's delivery state; each stage is a set of functions over
//! it, and the tasks they spawn (the maintainer, one per connection, one per DNS
//! lookup) hold it by `Rc`.

mod adapt;
pub mod client;
pub mod connection;
mod dsn;
pub mod handoff;
pub mod inspect;
pub mod maintainer;
pub mod routing;
pub mod settling;
pub mod sts;
pub mod tls;
pub mod tlsrpt;

#[cfg(test)]
mod tests;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Duration;

use crate::dns::cache::TtlCache;
use crate::metrics::ShardMetrics;
use crate::policy::script::QueueConfig;
use crate::shard::Shard;
use client::{ClientOptions, Response, Timeouts};
use gannet_core::clock::unix_ms;
use gannet_core::queue::{self, Message, Part, Queues, Routes, Site};
use gannet_core::shaping::ShapingTable;
use gannet_spool::MessageRecord;
use tls::ClientTls;

/// A shard's delivery state.
#[derive(Debug)]
pub struct Dispatcher {
    /// The shard this delivery belongs to (its spool, events, metrics, shutdown).
    pub shard: Rc<Shard>,
    pub queues: RefCell<Queues>,
    routes: Routes,
    options: ClientOptions,
    tls: ClientTls,
    retry: queue::settle::RetryPolicy,
    suspended: bool,
    /// The generation of the live settings last applied.
    live_generation: Cell<u64>,
    /// The newest retry request applied (`crate::live::RetryRequest::seq`).
    retried_seq: Cell<u64>,
    /// The operator's bounces in force (with their tallies), and the ids of those
    /// whose first sweep of the queues this shard has made.
    bounces: RefCell<Vec<crate::live::LiveBounce>>,
    swept: RefCell<std::collections::HashSet<String>>,
    /// Response rules' holds on tenants and campaigns (from the live settings).
    holds: RefCell<Vec<gannet_core::adaptive::Hold>>,
    /// The operator's rebinds (applied to recovered messages as they are queued),
    /// and the ids of those this shard has applied to its queues.
    rebinds: RefCell<Vec<gannet_core::queue::admin::Rebind>>,
    rebound: RefCell<std::collections::HashSet<String>>,
    resolver: crate::dns::Resolver,
    /// MTA-STS policies of the domains this shard delivers to.
    sts: sts::Sts,
    /// TLS-RPT counts of this shard.
    tlsrpt: tlsrpt::Recorder,
    /// Whether DANE applies (`delivery.dane.enabled`).
    dane: bool,
    /// Connections waiting idle for their queue's next part, and the bound.
    idle_connections: Cell<usize>,
    idle_connections_max: usize,
    /// Bounds the lookups in flight (`dns_lookups_max`).
    lookups: glommio::sync::Semaphore,
    smtp_port: u16,
    /// Domains being resolved (the first waiting part's domain string, shared),
    /// with the parts waiting for the answer.
    resolving: RefCell<HashMap<Rc<str>, Vec<Part>>>,
    /// Sites found through DNS by domain — or why a domain has none (NXDOMAIN,
    /// null MX) — each kept until the first of its DNS answers expires and bounded
    /// like the resolver's cache: a part of a known domain is placed at once,
    /// without a lookup task, a site built again or its name made again.
    sites: RefCell<TtlCache<String, Result<Rc<Site>, Response>>>,
    /// Parts handed to the shard that owns their site, by token, until it reports.
    handed: RefCell<HashMap<u64, Part>>,
    next_token: Cell<u64>,
    /// Egress sources by name (always holding `default`).
    sources: HashMap<String, Rc<queue::Egress>>,
    /// Egress pools by name: sources with their weights (always holding `default`).
    pools: HashMap<String, Vec<(Rc<queue::Egress>, u32)>>,
    /// What the policy script's `get_queue_config` gave each scheduled queue (asked
    /// once per queue and VM, not per attempt).
    queue_configs: RefCell<ScriptQueueConfigs>,
    /// The policy script whose `get_egress_path_config` shaped the ready queues (its
    /// VM's id; None: no script has the hook).
    path_script: Cell<Option<u64>>,
    wake: Wake,
}

/// The policy script's queue settings by scheduled queue (and routing domain), for
/// the VM `script` (another VM asks again).
#[derive(Debug, Default)]
struct ScriptQueueConfigs {
    script: u64,
    by_queue: HashMap<String, Option<QueueConfig>>,
}

/// Queues whose script settings are kept at most; past it they are asked again.
const SCRIPT_QUEUE_CONFIGS_MAX: usize = 100_000;

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
    pub fn new(shard: Rc<Shard>, tls: ClientTls) -> Dispatcher {
        let config = &shard.shared.config;
        let d = &config.delivery;
        let ehlo_name = if d.ehlo_name.is_empty() {
            config.server.hostname.clone()
        } else {
            d.ehlo_name.clone()
        };
        let mut sources: HashMap<String, Rc<queue::Egress>> = d
            .sources
            .iter()
            .map(|(name, s)| {
                let proxy = if let Ok(server) = s.ha_proxy_server.parse() {
                    Some(queue::EgressProxy::HaProxy { server })
                } else if let Ok(server) = s.socks5_proxy_server.parse() {
                    let auth = (!s.socks5_username.is_empty())
                        .then(|| (s.socks5_username.clone(), s.socks5_password.clone()));
                    Some(queue::EgressProxy::Socks5 { server, auth })
                } else {
                    None
                };
                let egress = queue::Egress {
                    name: name.clone(),
                    source_ip: s.source_ip.parse().ok(),
                    ehlo_name: (!s.ehlo_name.is_empty()).then(|| s.ehlo_name.clone()),
                    proxy: proxy.map(Arc::new),
                };
                (name.clone(), Rc::new(egress))
            })
            .collect();
        sources
            .entry("default".into())
            .or_insert_with(|| Rc::new(queue::Egress::default_source()));
        let mut pools: HashMap<String, Vec<(Rc<queue::Egress>, u32)>> = d
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
        let rebinds = shard.shared.live.snapshot().rebinds.clone();
        let mut queues = Queues::new(unix_ms(), Arc::new(ShapingTable::new(&config.delivery)));
        queues.set_path_config(path_config(&shard));
        let shards = shard.shared.metrics.len();
        match &shard.shared.cluster {
            Some(link) => {
                queues.set_token_source(Rc::new(crate::cluster::Tokens::node(link.clone())));
                queues.set_group_source(Rc::new(crate::cluster::Tokens::shard(
                    link.clone(),
                    usize::from(shard.id),
                    shards,
                )));
            }
            None => queues.set_group_source(Rc::new(crate::limits::LocalTokens {
                limits: shard.shared.limits.clone(),
                shard: usize::from(shard.id),
            })),
        }
        Dispatcher {
            sources,
            pools,
            queues: RefCell::new(queues),
            routes: Routes::new(&d.routes),
            options: ClientOptions {
                ehlo_name,
                source: None,
                tls: client::TlsWant::of(d.tls),
                timeouts: Timeouts::default(),
                auth: None,
                proxy: None,
            },
            tls,
            retry: queue::settle::RetryPolicy {
                interval_s: d.retry_interval_secs.get(),
                max_interval_s: d.max_retry_interval_secs.get(),
                max_age_ms: d.max_age_secs.get() * 1000,
            },
            suspended: d.suspended,
            live_generation: Cell::new(0),
            retried_seq: Cell::new(0),
            bounces: RefCell::new(Vec::new()),
            swept: RefCell::new(std::collections::HashSet::new()),
            holds: RefCell::new(Vec::new()),
            // Rebinds from admin.json: recovered messages meet them in `enqueue`.
            rebound: RefCell::new(rebinds.iter().map(|r| r.id.clone()).collect()),
            rebinds: RefCell::new(rebinds),
            resolver: crate::dns::Resolver::new(
                config
                    .dns_server()
                    .or_else(crate::dns::Resolver::system_server)
                    .unwrap_or_else(|| "127.0.0.1:53".parse().expect("literal")),
                Duration::from_secs(d.dns_timeout_secs.get()),
                d.ip_lookup,
                d.dns_cache_entries_max.usize(),
            ),
            sts: sts::Sts::open(&d.mta_sts, &config.server.data_dir, usize::from(shard.id)),
            dane: d.dane.enabled,
            tlsrpt: tlsrpt::Recorder::new(
                &d.tls_reporting,
                &config.server.data_dir,
                usize::from(shard.id),
            ),
            smtp_port: u16::try_from(d.smtp_port.get()).unwrap_or(25),
            lookups: glommio::sync::Semaphore::new(d.dns_lookups_max.get()),
            idle_connections: Cell::new(0),
            idle_connections_max: d.idle_connections_max.usize(),
            resolving: RefCell::new(HashMap::new()),
            sites: RefCell::new(TtlCache::new(d.dns_cache_entries_max.usize())),
            handed: RefCell::new(HashMap::new()),
            next_token: Cell::new(0),
            queue_configs: RefCell::new(ScriptQueueConfigs::default()),
            path_script: Cell::new(None),
            wake: Wake::default(),
            shard,
        }
    }

    /// Draws a source from `pool` by weight (the default pool for an unknown name)
    /// for a part to `site` at `now`. A source in IP warm-up whose budget toward the
    /// site's provider is spent today is passed over (the drawn one is counted);
    /// Err(provider) when every source of the pool has spent it.
    fn choose_source(
        &self,
        pool: Option<&str>,
        site: &Site,
        now: u64,
    ) -> Result<Rc<queue::Egress>, String> {
        let members = pool
            .and_then(|p| self.pools.get(p))
            .unwrap_or_else(|| &self.pools["default"]);
        let warmup = &self.shard.shared.warmup.budgets;
        let provider = if warmup.is_empty() || !members.iter().any(|(s, _)| warmup.warming(&s.name))
        {
            None
        } else {
            warmup.provider_of(site.host_names.iter().map(String::as_str))
        };
        let Some(provider) = provider else {
            return Ok(draw(members, &[]));
        };
        // The warm-up path only: which members have spent their budget.
        let mut spent = vec![false; members.len()];
        loop {
            if spent.iter().all(|s| *s) {
                return Err(provider.to_string());
            }
            let i = draw_index(members, &spent);
            if warmup.take(&members[i].0.name, provider, now) {
                return Ok(members[i].0.clone());
            }
            spent[i] = true;
        }
    }

    /// Queues a message (just received, or recovered) for delivery at `due_ms`.
    pub fn enqueue(&self, mut message: Message, due_ms: u64) {
        for rebind in self.rebinds.borrow().iter() {
            // Only messages received before a rebind (recovered at start-up) can be
            // its; their domains are copied once (apply changes the message).
            if message.received_ms >= rebind.created_unix_ms {
                continue;
            }
            let domains: Vec<String> = (message.recipients.iter())
                .map(|r| r.rsplit_once('@').map_or("", |(_, d)| d).to_string())
                .collect();
            rebind.apply(&mut message, domains.iter().map(String::as_str));
        }
        let message = Rc::new(RefCell::new(message));
        let parts = queue::split(&message, due_ms);
        if parts.is_empty() {
            // Every recipient was finished before a crash lost the tombstone.
            settling::finish(self, &message.borrow());
            return;
        }
        let mut queues = self.queues.borrow_mut();
        for part in parts {
            queues.schedule(part);
        }
        drop(queues);
        self.wake.raise();
    }

    /// Queues a message just spooled (received or generated) for delivery at
    /// `due_ms`.
    pub fn enqueue_spooled(&self, record: MessageRecord, due_ms: u64) {
        self.enqueue(queued_message(record), due_ms);
    }

    /// Makes the maintainer look at the queues and the live settings now.
    pub fn wake_maintainer(&self) {
        self.wake.raise();
    }

    /// Applies the live settings (shaping, suspensions, bounces, holds) if they
    /// changed. Returns the parts a new bounce takes, with it, to be bounced, and
    /// the parts a new hold takes out of the ready queues, to be put off.
    fn refresh_live(&self, live: &crate::live::Live, now: u64) -> Taken {
        let generation = live.generation();
        if generation == self.live_generation.get() {
            return Taken::default();
        }
        let mut taken_by_holds = Vec::new();
        self.live_generation.set(generation);
        let state = live.snapshot();
        let mut queues = self.queues.borrow_mut();
        // Another policy script (SIGHUP) may shape the ready queues otherwise: each
        // is asked about again before the shaping is applied.
        let paths = (self.shard.script())
            .filter(|s| s.has(crate::policy::script::Hook::EgressPathConfig))
            .map(|s| s.id());
        if paths != self.path_script.get() {
            self.path_script.set(paths);
            queues.ask_paths_again();
        }
        queues.set_shaping(state.shaping.clone());
        queues.set_suspensions(state.suspensions.clone(), now);
        queues.set_ready_suspensions(state.ready_suspensions.clone());
        queues.set_admin_bounces(state.bounces.iter().map(|b| b.bounce.clone()).collect());
        for (key, rule, until) in queues.set_shared_rules(state.cluster_rules.clone(), now) {
            adapt::shared_fired(self, &queues, &key, rule, until, now);
        }
        for (key, change) in queues.set_shared_backoffs(state.cluster_backoffs.clone(), now) {
            adapt::backoff_event(self, &key, change, true, now);
        }
        *self.bounces.borrow_mut() = state.bounces.clone();
        // A hold new to this shard takes its tenant's (or campaign's) parts out of
        // the ready queues of the sites it holds: they wait with the rest.
        let new_holds: Vec<gannet_core::adaptive::Hold> = (state.holds.iter())
            .filter(|h| !self.holds.borrow().iter().any(|old| old == *h))
            .cloned()
            .collect();
        *self.holds.borrow_mut() = state.holds.clone();
        for hold in &new_holds {
            let parts = queues.take_ready_where(|part| {
                let site = part.site.as_deref();
                let m = part.message.borrow();
                site.is_some_and(|site| {
                    hold.holds(
                        m.meta("tenant"),
                        m.meta("campaign"),
                        &site.name,
                        site.host_names.iter().map(String::as_str),
                        now,
                    )
                })
            });
            taken_by_holds.extend(parts.into_iter().map(|p| (p, hold.clone())));
        }
        // A rebind new to this shard moves the messages its queues hold now.
        *self.rebinds.borrow_mut() = state.rebinds.clone();
        {
            let mut rebound = self.rebound.borrow_mut();
            rebound.retain(|id| state.rebinds.iter().any(|r| &r.id == id));
            for rebind in &state.rebinds {
                if !rebound.insert(rebind.id.clone()) {
                    continue;
                }
                let ids = queues.rebind(rebind, now);
                tracing::info!(
                    shard = self.shard.id,
                    id = rebind.id,
                    messages = ids.len(),
                    pool = rebind.pool,
                    "an operator's rebind moved queued messages"
                );
                if !rebind.suppress_logging {
                    for id in ids {
                        self.shard.event(&crate::events::Event::AdminRebind {
                            timestamp_ms: now,
                            shard: self.shard.id,
                            message_id: id.to_string(),
                            pool: &rebind.pool,
                            reason: &rebind.reason,
                        });
                    }
                }
            }
        }
        // A bounce new to this shard takes what its queues hold now; what comes due
        // later, or back from another shard, meets it on its way.
        let mut taken = Vec::new();
        let mut swept = self.swept.borrow_mut();
        swept.retain(|id| state.bounces.iter().any(|b| &b.bounce.id == id));
        for bounce in &state.bounces {
            if swept.insert(bounce.bounce.id.clone()) {
                let parts = queues.take_selected(&bounce.bounce.queues);
                tracing::info!(
                    shard = self.shard.id,
                    id = bounce.bounce.id,
                    parts = parts.len(),
                    "an operator's bounce took queued parts"
                );
                taken.extend(parts.into_iter().map(|p| (p, bounce.clone())));
            }
        }
        for request in &state.retries {
            if request.seq <= self.retried_seq.get() {
                continue;
            }
            self.retried_seq.set(request.seq);
            let parts = queues.retry_now(&request.queues, now);
            tracing::info!(
                shard = self.shard.id,
                seq = request.seq,
                parts,
                reason = request.reason,
                "scheduled parts made due now"
            );
        }
        Taken {
            bounced: taken,
            held: taken_by_holds,
        }
    }

    /// The response rule's hold on `part`'s tenant or campaign toward `site`, if
    /// one is in force.
    fn hold_for(&self, part: &Part, site: &Site, now: u64) -> Option<gannet_core::adaptive::Hold> {
        let holds = self.holds.borrow();
        if holds.is_empty() {
            return None;
        }
        let m = part.message.borrow();
        (holds.iter())
            .find(|h| {
                h.holds(
                    m.meta("tenant"),
                    m.meta("campaign"),
                    &site.name,
                    site.host_names.iter().map(String::as_str),
                    now,
                )
            })
            .cloned()
    }

    /// The operator's bounce in force that takes `part`, with its tally.
    fn admin_bounce(&self, part: &Part, now: u64) -> Option<crate::live::LiveBounce> {
        let queues = self.queues.borrow();
        let id = &queues.admin_bounce(part, now)?.id;
        self.bounces
            .borrow()
            .iter()
            .find(|b| &b.bounce.id == id)
            .cloned()
    }

    /// The retry time of a part put off without an attempt.
    fn delay_due(&self, part: &Part, now: u64) -> u64 {
        let retry = self.retry_for(part);
        queue::next_due_ms(
            now,
            part.attempts.max(1),
            retry.interval_s,
            retry.max_interval_s,
            fastrand::u64(0..=1000),
        )
    }

    /// A part's retry schedule and maximum age: delivery's, with what a provider
    /// rule of its ready queue and the rules of its scheduled queue set, and over
    /// those what the policy script's `get_queue_config` gives the queue (no lookup
    /// when no rule sets any and no script asks).
    fn retry_for(&self, part: &Part) -> queue::settle::RetryPolicy {
        let script = self
            .shard
            .script()
            .filter(|s| s.has(crate::policy::script::Hook::QueueConfig));
        let queues = self.queues.borrow();
        let table = queues.shaping_table();
        if script.is_none() && !table.providers_set_retry && table.queue_rules.is_empty() {
            return self.retry;
        }
        let m = part.message.borrow();
        let ready = match (&part.egress, &part.site) {
            (Some(egress), Some(site)) => Some((egress.name.as_str(), site.host_names.as_slice())),
            _ => None,
        };
        let mut policy = queue::settle::retry_policy(
            self.retry,
            table,
            ready,
            m.meta("tenant"),
            m.meta("campaign"),
            &part.domain,
        );
        if let Some(script) = script
            && let Some(config) = self.script_queue_config(&script, &m, &part.domain)
        {
            policy.interval_s = config.retry_interval_s.unwrap_or(policy.interval_s);
            policy.max_interval_s = config.max_retry_interval_s.unwrap_or(policy.max_interval_s);
            policy.max_age_ms = config.max_age_s.map_or(policy.max_age_ms, |s| s * 1000);
        }
        policy
    }

    /// What the script's `get_queue_config` gives the scheduled queue of `message`'s
    /// part to `domain`, asked once per queue (a failure is logged, counted and
    /// remembered as no settings: the configuration's stand).
    fn script_queue_config(
        &self,
        script: &crate::policy::script::Script,
        message: &Message,
        domain: &str,
    ) -> Option<QueueConfig> {
        let name = queue::queue_name(message, domain);
        let key = name.to_string();
        let mut cache = self.queue_configs.borrow_mut();
        if cache.script != script.id() || cache.by_queue.len() >= SCRIPT_QUEUE_CONFIGS_MAX {
            cache.script = script.id();
            cache.by_queue.clear();
        }
        if let Some(known) = cache.by_queue.get(&key) {
            return *known;
        }
        let config = match script.queue_config(domain, name.tenant, name.campaign, name.routing) {
            Ok(config) => config,
            Err(why) => {
                ShardMetrics::add(&self.shard.metrics.policy_script_failures_total, 1);
                tracing::warn!(
                    shard = self.shard.id,
                    queue = %key,
                    "policy script: {why} (the configuration's retry settings apply)"
                );
                None
            }
        };
        cache.by_queue.insert(key, config);
        config
    }
}

/// Asks the shard's policy script (`get_egress_path_config`) for the shaping of each
/// ready queue made (a failure is logged and counted; the configuration's stands).
fn path_config(shard: &Rc<Shard>) -> queue::PathConfig {
    let shard = Rc::downgrade(shard);
    queue::PathConfig::new(move |egress, site, domain| {
        let shard = shard.upgrade()?;
        let script = shard.script()?;
        match script.egress_path_config(domain, egress, &site.name) {
            Ok(knobs) => knobs,
            Err(why) => {
                ShardMetrics::add(&shard.metrics.policy_script_failures_total, 1);
                tracing::warn!(
                    shard = shard.id,
                    site = %site.name,
                    "policy script: {why} (the configuration's shaping applies)"
                );
                None
            }
        }
    })
}

/// What new live settings take out of the queues.
#[derive(Debug, Default)]
struct Taken {
    /// Parts an operator's new bounce takes, with it.
    bounced: Vec<(Part, crate::live::LiveBounce)>,
    /// Parts a response rule's new hold takes out of the ready queues.
    held: Vec<(Part, gannet_core::adaptive::Hold)>,
}

/// A source of `members` drawn by weight.
fn draw(members: &[(Rc<queue::Egress>, u32)], spent: &[bool]) -> Rc<queue::Egress> {
    members[draw_index(members, spent)].0.clone()
}

/// The index of a member drawn by weight among those not `spent` (all when `spent`
/// is empty; at least one must not be spent).
fn draw_index(members: &[(Rc<queue::Egress>, u32)], spent: &[bool]) -> usize {
    let open = |i: usize| !spent.get(i).copied().unwrap_or(false);
    let total: u64 = (members.iter().enumerate())
        .filter(|(i, _)| open(*i))
        .map(|(_, (_, w))| u64::from(*w))
        .sum();
    let mut pick = fastrand::u64(0..total.max(1));
    for (i, (_, weight)) in members.iter().enumerate() {
        if !open(i) {
            continue;
        }
        if pick < u64::from(*weight) {
            return i;
        }
        pick -= u64::from(*weight);
    }
    (0..members.len()).find(|i| open(*i)).unwrap_or(0)
}

/// The in-memory message for a record just spooled. Its fields move; the body is
/// dropped (delivery reads it from the spool mapping), and so is the metadata
/// delivery does not read.
pub fn queued_message(record: MessageRecord) -> Message {
    Message {
        id: record.id,
        sender: record.sender,
        recipients: record.recipients,
        meta: gannet_core::queue::delivery_meta(record.meta),
        queue: record.queue,
        received_ms: record.received_unix_ms,
        size: record.body.len(),
        attempts: record.attempts,
        done: record.done,
        open_parts: 0,
        due_by_domain: Vec::new(),
    }
}
