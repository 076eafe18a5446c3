//! The shard's queues, as data: messages in memory (the authoritative copy; the spool
//! is their durable shadow), split into parts — a message's pending recipients for one
//! destination site — which wait in the scheduled queue until due and then in the
//! ready queue of their site until a connection takes them.
//!
//! The body is not copied into memory: the connection that sends a message reads it
//! in place from the spool's mapping (page cache), so queued mail costs its envelope
//! in memory, not its size.
//!
//! Nothing here does I/O or reads the clock: the dispatcher passes `now`, so the retry
//! schedule is tested with plain numbers.

pub mod adapt;
pub mod admin;
pub mod health;
pub mod limits;
pub mod settle;
pub mod wheel;

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use crate::config::automation::ActionName;
use crate::id::MessageId;

use crate::shaping::{QueueName, QueueSelector, Shaping, ShapingTable, Suspension, Throttle};
use wheel::Wheel;

/// The metadata keys delivery reads from a queued message (egress pool, scheduled
/// queue, events). A queued message keeps only these in memory: the rest (the
/// client's address, the AUTH user, …) stays in its spool record, which events at
/// acceptance and the admin API read. A key delivery starts to read joins this list.
pub const DELIVERY_META_KEYS: &[&str] = &[
    "pool",
    // A message's own expiry (settle::META_EXPIRES), when it has one.
    "expires",
    "tenant",
    "campaign",
    // The domain whose route or MX the message takes instead of its recipients'
    // (set by a policy script).
    "routing_domain",
    "transmission_id",
    "rcpt_meta",
    "rcpt_tags",
    // DSN requests (NOTIFY and ORCPT per recipient), present only when a client
    // made them: settling reads them for every recipient it settles.
    "dsn_rcpts",
];

/// `meta` without the keys delivery never reads ([`DELIVERY_META_KEYS`]), its
/// allocation fitted: a queued message's memory counts (a million wait behind a
/// provider's block), and an SMTP message's `peer` alone cost ~150 bytes.
pub fn delivery_meta(mut meta: Vec<(String, String)>) -> Vec<(String, String)> {
    meta.retain(|(key, _)| DELIVERY_META_KEYS.contains(&key.as_str()));
    meta.shrink_to_fit();
    meta
}

/// The value of `key` in metadata pairs (the first, if it is given twice).
pub fn meta_value<'a>(meta: &'a [(String, String)], key: &str) -> Option<&'a str> {
    meta.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// A message in memory.
#[derive(Debug)]
pub struct Message {
    pub id: MessageId,
    pub sender: String,
    pub recipients: Vec<String>,
    /// The metadata delivery reads ([`delivery_meta`]).
    pub meta: Vec<(String, String)>,
    pub queue: String,
    pub received_ms: u64,
    /// The message's size in bytes (the body as spooled, headers included).
    pub size: usize,
    /// Delivery attempts made (the highest of any part).
    pub attempts: u32,
    /// Finished recipients (delivered, bounced or expired), by index.
    pub done: Vec<u32>,
    /// Parts not yet finished; the message is finished when this reaches 0.
    pub open_parts: usize,
    /// The due time of each open part, by domain. The spool keeps one due time per
    /// message, so what it is given is the latest of these: after a restart no part
    /// is tried before its own schedule (some later than theirs). The domain is the
    /// part's own (shared, not copied: a queued message's memory counts).
    pub due_by_domain: Vec<(Rc<str>, u64)>,
}

impl Message {
    /// The due time to persist: the latest of the open parts' (`now_ms` if none).
    pub fn persisted_due_ms(&self, now_ms: u64) -> u64 {
        self.due_by_domain
            .iter()
            .map(|(_, due)| *due)
            .max()
            .unwrap_or(now_ms)
    }

    /// Records a part's due time (or, with None, that the part is finished).
    pub fn set_part_due(&mut self, domain: &Rc<str>, due_ms: Option<u64>) {
        let at = self.due_by_domain.iter().position(|(d, _)| d == domain);
        match (at, due_ms) {
            (Some(i), Some(due)) => self.due_by_domain[i].1 = due,
            (None, Some(due)) => self.due_by_domain.push((domain.clone(), due)),
            (Some(i), None) => {
                self.due_by_domain.swap_remove(i);
            }
            (None, None) => {}
        }
    }

    pub fn is_done(&self, rcpt: u32) -> bool {
        self.done.contains(&rcpt)
    }

    pub fn meta(&self, key: &str) -> Option<&str> {
        meta_value(&self.meta, key)
    }
}

/// Where a site's mail goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    /// The site's name: its hosts grouped by preference and sorted (so that domains
    /// served by the same hosts share one ready queue).
    pub name: String,
    /// Addresses in order of preference.
    pub hosts: Vec<SocketAddr>,
    /// The host name behind each address (the MX name, or the address itself for a
    /// static route, or the route's server_name): what a certificate must match when
    /// TLS is required.
    pub host_names: Vec<String>,
    /// What TLS the destination demands beyond the ready queue's shaping (MTA-STS,
    /// DANE, a route's mode).
    pub tls: crate::tls_policy::SiteTls,
    /// AUTH credentials (a route to a smarthost).
    pub auth: Option<std::sync::Arc<crate::config::RouteAuth>>,
}

/// Where connections come from: an egress source of the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Egress {
    pub name: String,
    pub source_ip: Option<std::net::IpAddr>,
    /// None: the dispatcher's EHLO name.
    pub ehlo_name: Option<String>,
    /// A relay the connections go through (the source's address lives on it).
    pub proxy: Option<std::sync::Arc<EgressProxy>>,
}

/// A relay between gannet and the MX hosts, for sources whose addresses live on
/// another host (KumoMTA's proxy support).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EgressProxy {
    /// HAProxy's PROXY protocol (v2): gannet connects to `server` and says which
    /// source address and destination the relay should connect from and to
    /// (`Egress::source_ip`, the MX host), e.g. HAProxy with `usesrc clientip`.
    HaProxy { server: SocketAddr },
    /// SOCKS5 (RFC 1928) CONNECT through `server`, with username and password
    /// (RFC 1929) when given; the MX host sees the proxy's own address.
    Socks5 {
        server: SocketAddr,
        auth: Option<(String, String)>,
    },
}

impl Egress {
    /// The source every configuration has: no binding, the default EHLO name.
    pub fn default_source() -> Egress {
        Egress {
            name: "default".into(),
            source_ip: None,
            ehlo_name: None,
            proxy: None,
        }
    }
}

/// The name of a ready queue: `egress_source->site_name`.
pub fn ready_key(egress: &Egress, site: &Site) -> String {
    format!("{}->{}", egress.name, site.name)
}

/// Static routes: domain → hosts, with `*` as the fallback. Domains without a route
/// are resolved through DNS (MX).
#[derive(Debug, Default)]
pub struct Routes {
    by_domain: BTreeMap<String, Rc<Site>>,
    fallback: Option<Rc<Site>>,
}

impl Routes {
    pub fn new(routes: &BTreeMap<String, crate::config::Route>) -> Routes {
        let site = |domain: &str, route: &crate::config::Route| {
            let hosts: Vec<SocketAddr> = route.hosts.iter().map(|h| h.0).collect();
            let mut names: Vec<String> = hosts.iter().map(ToString::to_string).collect();
            names.sort();
            let host_names = hosts
                .iter()
                .map(|h| match route.server_name.as_str() {
                    "" => h.ip().to_string(),
                    name => name.to_ascii_lowercase(),
                })
                .collect();
            // A route with its own TLS mode, certificate name or credentials has ready
            // queues of its own: its connections are not another route's.
            let mut name = names.join(",");
            if route.tls.is_some() || route.auth.is_some() || !route.server_name.is_empty() {
                name.push_str(&format!(" (route {domain})"));
            }
            Rc::new(Site {
                name,
                hosts,
                host_names,
                tls: route.tls.map_or(
                    crate::tls_policy::SiteTls::Shaping,
                    crate::tls_policy::SiteTls::Mode,
                ),
                auth: route.auth.clone().map(std::sync::Arc::new),
            })
        };
        let mut out = Routes::default();
        for (domain, route) in routes {
            if domain == "*" {
                out.fallback = Some(site(domain, route));
            } else {
                out.by_domain
                    .insert(domain.to_ascii_lowercase(), site(domain, route));
            }
        }
        out
    }

    /// The static route of a recipient domain, if it has one.
    pub fn site(&self, domain: &str) -> Option<Rc<Site>> {
        self.by_domain
            .get(&domain.to_ascii_lowercase())
            .or(self.fallback.as_ref())
            .cloned()
    }
}

/// A message's pending recipients in one domain.
#[derive(Debug)]
pub struct Part {
    pub message: Rc<RefCell<Message>>,
    /// The recipients' domain, lower-case (shared with the message's due times).
    pub domain: Rc<str>,
    /// Where the part goes; resolved when it becomes due (routes or MX), cleared
    /// when it is rescheduled so that the next attempt sees current DNS.
    pub site: Option<Rc<Site>>,
    /// The source the next attempt uses, drawn from the message's pool when placed.
    pub egress: Option<Rc<Egress>>,
    /// Recipient indices into the message, not yet finished.
    pub rcpts: Vec<u32>,
    /// Attempts made for this part.
    pub attempts: u32,
    pub due_ms: u64,
}

/// Splits a message's unfinished recipients into parts by domain.
pub fn split(message: &Rc<RefCell<Message>>, due_ms: u64) -> Vec<Part> {
    let mut by_domain: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    {
        let m = message.borrow();
        for (i, rcpt) in m.recipients.iter().enumerate() {
            let i = i as u32;
            if m.is_done(i) {
                continue;
            }
            let domain = rcpt.rsplit_once('@').map_or("", |(_, d)| d);
            by_domain
                .entry(domain.to_ascii_lowercase())
                .or_default()
                .push(i);
        }
    }
    let attempts = message.borrow().attempts;
    let parts: Vec<Part> = by_domain
        .into_iter()
        .map(|(domain, rcpts)| Part {
            message: message.clone(),
            domain: domain.into(),
            site: None,
            egress: None,
            rcpts,
            attempts,
            due_ms,
        })
        .collect();
    let mut m = message.borrow_mut();
    m.open_parts = parts.len();
    m.due_by_domain = parts.iter().map(|p| (p.domain.clone(), due_ms)).collect();
    drop(m);
    parts
}

/// When the next attempt is due after `attempts` failed ones: the retry interval,
/// doubled for each earlier retry, capped, plus up to 10% jitter (from `jitter`, a
/// number in 0..1000 the caller draws) so that a burst of failures does not retry in
/// lockstep.
pub fn next_due_ms(
    now_ms: u64,
    attempts: u32,
    interval_s: u64,
    max_interval_s: u64,
    jitter: u64,
) -> u64 {
    let doublings = attempts.saturating_sub(1).min(32);
    let base_s = interval_s
        .saturating_mul(1u64 << doublings)
        .min(max_interval_s);
    let base_ms = base_s * 1000;
    now_ms + base_ms + base_ms / 10 * jitter.min(1000) / 1000
}

/// The shard's queues: the scheduled queue (a timer wheel of parts waiting for their
/// due time), parts due but not yet placed (`due`: their site is looked up, their
/// scheduled queue's suspensions checked), parts held by a suspension, and the ready
/// queues (per egress source and site, parts due now) with their shaping.
#[derive(Debug)]
pub struct Queues {
    /// What a policy script sets on a new ready queue's shaping.
    path_config: PathConfig,
    /// Where the ready queues' rates lease their tokens when they are shared by
    /// the cluster's nodes (None: each node keeps its own).
    tokens: Option<Rc<dyn crate::lease::TokenSource>>,
    /// The limits over several ready queues that this shard's queues are in.
    groups: limits::Groups,
    /// Response rules that fired on other nodes (`adapt::SharedRule`), imposed on
    /// queues made while they last.
    shared_rules: Vec<adapt::SharedRule>,
    /// Backoffs other nodes made (`adapt::SharedBackoff`), imposed on queues made
    /// while they last.
    shared_backoffs: Vec<adapt::SharedBackoff>,
    scheduled: Wheel<Part>,
    /// Due parts whose site is not known yet.
    pub due: Vec<Part>,
    /// Due parts whose scheduled queue is suspended.
    held: Vec<Part>,
    suspensions: Vec<Suspension>,
    /// When the earliest suspension expires (u64::MAX: none); held parts are looked
    /// at again only then or when the suspensions change, not every round.
    next_expiry_ms: u64,
    shaping: Arc<ShapingTable>,
    /// Ready queues by name (`egress_source->site_name`).
    pub ready: HashMap<String, ReadyQueue>,
    /// The ready queues that may need a connection: parts arrived, a connection
    /// ended, or a wait (message rate, connection rate, backoff) is running out. Only
    /// these are looked at when connections are opened — never every ready queue,
    /// which with thousands of destinations made each maintainer round cost as much
    /// as the queues it kept. A queue is listed at most once (`ReadyQueue::listed`).
    listed: Vec<String>,
    /// Ready queues with response rules in force (some may have ended since): the
    /// only ones looked at for expiry, bounces and suspensions.
    adapting: Vec<String>,
    /// Ready queues whose connection limit adaptive backoff has lowered.
    backed_off: usize,
    /// Parts waiting or held, by scheduled queue (for the admin API's listing).
    counts: admin::ScheduledCounts,
    /// The operator's suspensions of ready queues and bounces (the admin API).
    ready_suspensions: Vec<admin::ReadySuspension>,
    bounces: Vec<admin::AdminBounce>,
}

/// One ready queue: its parts, its connections and its shaping.
#[derive(Debug)]
pub struct ReadyQueue {
    pub site: Rc<Site>,
    pub egress: Rc<Egress>,
    /// Parts of messages this shard spooled.
    pub parts: VecDeque<Part>,
    /// Parts other shards handed to this one, the owner of the site.
    pub remote: VecDeque<Box<crate::handoff::Handoff>>,
    pub connections: usize,
    pub shaping: Shaping,
    /// max_message_rate: one token per message sent.
    pub messages: Throttle,
    /// max_connection_rate: one token per connection opened.
    pub connects: Throttle,
    /// The share of its connection_limit this node has claimed, when the limit is
    /// shared by the cluster's nodes.
    slots: Option<Box<crate::lease::Slots>>,
    /// The limits over several queues this one is in (`delivery.limits`).
    groups: Vec<limits::GroupRef>,
    /// Whether one of them limits messages.
    groups_rate_messages: bool,
    /// No connection is opened before this (unix ms): the message rate said to wait.
    pub throttled_until_ms: u64,
    /// Failed connections in a row and the backoff they impose.
    pub health: health::ConnectHealth,
    /// Its response rules: matches toward thresholds, rules in force.
    pub adaptive: crate::adaptive::Adaptive,
    /// Adaptive backoff: attempts and failures this interval, the limit imposed.
    pub feedback: adapt::Feedback,
    /// The connection limit before backoff (the shaping and the rules in force).
    configured_limit: usize,
    /// The shaping as configured, before response rules and backoff (the admin API
    /// shows both).
    configured: Shaping,
    /// What the policy script's `get_egress_path_config` set (over the table's).
    scripted: Option<crate::config::shaping::Knobs>,
    /// The domain the script was asked with (that of the part that made the queue),
    /// to ask again when the script changes.
    path_domain: String,
    /// Connections of this queue waiting for its next part (idle_timeout): woken, all
    /// of them, when a part arrives. A waker may be stale (its connection has gone
    /// on); waking it is harmless.
    pub idle: Vec<std::task::Waker>,
    /// On `Queues::listed`.
    listed: bool,
}

impl ReadyQueue {
    fn new(
        site: Rc<Site>,
        egress: Rc<Egress>,
        table: &ShapingTable,
        scripted: Option<crate::config::shaping::Knobs>,
        path_domain: String,
    ) -> ReadyQueue {
        let hosts = site.host_names.iter().map(String::as_str);
        let mut shaping = table.resolve(&egress.name, hosts.clone());
        if let Some(knobs) = &scripted {
            shaping = shaping.with(knobs);
        }
        let adaptive = crate::adaptive::Adaptive::new(table.rules.for_queue(&egress.name, hosts));
        ReadyQueue {
            site,
            egress,
            parts: VecDeque::new(),
            remote: VecDeque::new(),
            connections: 0,
            shaping,
            messages: Throttle::new(shaping.max_message_rate),
            connects: Throttle::new(shaping.max_connection_rate),
            slots: None,
            groups: Vec::new(),
            groups_rate_messages: false,
            throttled_until_ms: 0,
            health: health::ConnectHealth::default(),
            adaptive,
            feedback: adapt::Feedback::default(),
            configured_limit: shaping.connection_limit,
            configured: shaping,
            scripted,
            path_domain,
            idle: Vec::new(),
            listed: false,
        }
    }

    /// Makes the queue's message and connection rates shared by the cluster's
    /// nodes: keyed by the queue's name, which every node gives the same site from
    /// the same source.
    fn share_rates(&mut self, key: &str, source: &Rc<dyn crate::lease::TokenSource>) {
        let (messages, connects) = (
            self.shaping.max_message_rate,
            self.shaping.max_connection_rate,
        );
        self.messages = Throttle::shared(messages, format!("message-rate:{key}"), source.clone());
        self.connects =
            Throttle::shared(connects, format!("connection-rate:{key}"), source.clone());
        self.slots = Some(Box::new(crate::lease::Slots::new(
            source.clone(),
            key.to_string(),
        )));
    }

    /// The connections the queue may have open of `allowed` (its limit, or fewer
    /// after failures): when the limit is shared, at most this node's claim.
    fn shared_cap(&mut self, now_us: u64, allowed: usize) -> usize {
        let Some(slots) = self.slots.as_mut() else {
            return allowed;
        };
        let want = self.parts.len() + self.remote.len();
        let want = want.min(allowed).max(self.connections);
        let cap = (slots.allowed(
            now_us,
            self.shaping.connection_limit,
            want,
            self.connections,
        ))
        .min(allowed);
        if slots.others_waiting() {
            // Another node waits for this queue's connections: those idle here
            // close.
            self.wake_idle();
        }
        cap
    }

    /// Whether the queue's connection limit is shared, and if so this node's claim
    /// and the fallback in force (the admin API).
    pub fn connection_share(&self) -> Option<(usize, Option<crate::config::Fallback>)> {
        self.slots.as_ref().map(|s| s.state())
    }

    /// Joins the limits over several queues that `table` puts the queue in (and
    /// leaves those it no longer does).
    fn join_groups(&mut self, table: &ShapingTable, groups: &mut limits::Groups) {
        let hosts = self.site.host_names.iter().map(String::as_str);
        let joined: Vec<limits::GroupRef> = (table
            .limits_for(&self.egress.name, &self.site.name, hosts)
            .iter())
        .map(|(key, values)| groups.join(key, *values))
        .collect();
        // The connections open move with the queue (a reload changed its limits).
        let within = |g: &limits::GroupRef, list: &[limits::GroupRef]| {
            list.iter().any(|other| Rc::ptr_eq(g, other))
        };
        for g in self.groups.iter().filter(|g| !within(g, &joined)) {
            g.borrow_mut().moved(self.connections, false);
        }
        for g in joined.iter().filter(|g| !within(g, &self.groups)) {
            g.borrow_mut().moved(self.connections, true);
        }
        self.groups = joined;
        self.groups_rate_messages = self.groups.iter().any(|g| g.borrow().rates_messages());
    }

    /// Whether sending a message takes a token (the queue's message rate or a
    /// group's is limited): without one, no clock is read per message.
    pub fn rates_messages(&self) -> bool {
        self.shaping.max_message_rate != crate::config::shaping::Rate::Unlimited
            || self.groups_rate_messages
    }

    /// Takes a token of the queue's message rate and of every group's, or none of
    /// them and says how long to wait.
    pub fn acquire_message(&mut self, now_us: u64) -> Result<(), std::time::Duration> {
        acquire_all(&mut self.messages, &self.groups, now_us, |g| {
            &mut g.messages
        })
    }

    /// Takes a token of the queue's connection rate and of every group's, or none.
    fn acquire_connect(&mut self, now_us: u64) -> Result<(), std::time::Duration> {
        acquire_all(&mut self.connects, &self.groups, now_us, |g| {
            &mut g.connects
        })
    }

    /// `cap` within the room the groups' connection limits leave the queue (each
    /// group that holds it back counts what it wanted past that, and goes on
    /// `pressing`); and how soon a group's claim may change the room, when one
    /// holds the queue back.
    fn group_cap(
        &mut self,
        now_us: u64,
        cap: usize,
        pressing: &mut Vec<limits::GroupRef>,
    ) -> (usize, Option<std::time::Duration>) {
        let want = self.len().min(cap);
        let (mut capped, mut wait) = (cap, None);
        for group in &self.groups {
            let mut g = group.borrow_mut();
            let (room, listed) = g.room(self.connections, want);
            if listed {
                pressing.push(group.clone());
            }
            let may = self.connections.saturating_add(room);
            if may < want
                && let Some(w) = g.claim_wait(now_us)
            {
                wait = Some(wait.map_or(w, |earlier: std::time::Duration| earlier.min(w)));
            }
            capped = capped.min(may);
        }
        (capped, wait)
    }

    /// Whether a connection of the queue with nothing to send should close rather
    /// than wait idle: another queue sharing one of its connection limits (a limit
    /// over several queues, or the cluster's share of this queue's) waits for a
    /// connection.
    pub fn pressed(&self) -> bool {
        self.slots.as_ref().is_some_and(|s| s.others_waiting())
            || self.groups.iter().any(|g| g.borrow().pressed())
    }

    /// Notes a connection of the queue waiting idle for its next part: woken when
    /// a part arrives, or when [`ReadyQueue::pressed`] may have become true.
    pub fn park_idle(&mut self, waker: &std::task::Waker) {
        self.idle.push(waker.clone());
        for g in &self.groups {
            g.borrow_mut().park(waker);
        }
    }

    /// Counts a connection opened, in the queue and its groups.
    fn opened(&mut self) {
        self.connections += 1;
        for g in &self.groups {
            g.borrow_mut().opened();
        }
    }

    /// The limits over several queues this one is in (the admin API).
    pub fn groups(&self) -> Vec<limits::GroupInfo> {
        self.groups.iter().map(|g| g.borrow().info()).collect()
    }

    /// Tells the connections waiting idle that a part has arrived.
    fn wake_idle(&mut self) {
        for waker in self.idle.drain(..) {
            waker.wake();
        }
    }

    /// The shaping from `table`, with what the response rules in force set over it.
    fn reshape(&mut self, table: &ShapingTable) {
        let mut shaping = table.resolve(
            &self.egress.name,
            self.site.host_names.iter().map(String::as_str),
        );
        if let Some(knobs) = &self.scripted {
            shaping = shaping.with(knobs);
        }
        self.configured = shaping;
        for knobs in self.adaptive.knobs(&table.rules) {
            shaping = shaping.with(knobs);
        }
        self.configured_limit = shaping.connection_limit;
        self.shaping = adapt::backed_off(shaping, self.feedback.limit);
        self.messages.set_rate(self.shaping.max_message_rate);
        self.connects.set_rate(self.shaping.max_connection_rate);
        // The maintainer works out the wait again under the new rate.
        self.throttled_until_ms = 0;
    }

    pub fn len(&self) -> usize {
        self.parts.len() + self.remote.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn is_full(&self) -> bool {
        self.len() >= self.shaping.max_ready
    }
}

/// Takes a token of `own` and of each group's throttle `pick` chooses, or, when one
/// refuses, gives back those taken and says how long to wait.
fn acquire_all(
    own: &mut Throttle,
    groups: &[limits::GroupRef],
    now_us: u64,
    pick: impl Fn(&mut limits::Group) -> &mut Throttle,
) -> Result<(), std::time::Duration> {
    own.acquire(now_us)?;
    for (i, group) in groups.iter().enumerate() {
        if let Err(wait) = pick(&mut group.borrow_mut()).acquire(now_us) {
            for taken in &groups[..i] {
                pick(&mut taken.borrow_mut()).refund();
            }
            own.refund();
            return Err(wait);
        }
    }
    Ok(())
}

/// Lists the ready queue `q`, named `key`, to be looked at for connections (once).
/// (`key` is only copied when the queue is listed now.)
fn list(listed: &mut Vec<String>, q: &mut ReadyQueue, key: impl Into<String>) {
    if !q.listed {
        q.listed = true;
        listed.push(key.into());
    }
}

/// The scheduled queue a part belongs to: `campaign:tenant@domain!routing_domain`.
pub fn queue_name<'a>(message: &'a Message, domain: &'a str) -> QueueName<'a> {
    QueueName {
        campaign: message.meta("campaign"),
        tenant: message.meta("tenant"),
        domain,
        routing: message.meta("routing_domain"),
    }
}

/// How a [`PathConfig`] asks: (egress source, site, domain) to shaping knobs.
type AskPath = dyn Fn(&str, &Site, &str) -> Option<crate::config::shaping::Knobs>;

/// Shaping a policy script sets on a ready queue (`get_egress_path_config`), asked
/// once when the queue is made with the egress source's name, the site and the
/// domain of the part that made it (its routing domain when it has one); kept
/// over the configuration's shaping when that is reloaded.
#[derive(Default)]
pub struct PathConfig(Option<Box<AskPath>>);

impl PathConfig {
    pub fn new(
        ask: impl Fn(&str, &Site, &str) -> Option<crate::config::shaping::Knobs> + 'static,
    ) -> PathConfig {
        PathConfig(Some(Box::new(ask)))
    }

    fn ask(
        &self,
        egress: &str,
        site: &Site,
        domain: &str,
    ) -> Option<crate::config::shaping::Knobs> {
        self.0.as_ref().and_then(|ask| ask(egress, site, domain))
    }
}

impl std::fmt::Debug for PathConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "PathConfig(asked)"
        } else {
            "PathConfig(none)"
        })
    }
}

impl Queues {
    /// Shares the rates of the ready queues made from now on with the cluster's
    /// other nodes, leasing their tokens from `source`.
    pub fn set_token_source(&mut self, source: Rc<dyn crate::lease::TokenSource>) {
        self.tokens = Some(source);
    }

    /// Keeps the limits over several queues (`delivery.limits`) with `source`:
    /// every shard's groups of one key, and every node's with `[cluster]`, lease
    /// from it alike. Without one, each shard keeps its groups alone.
    pub fn set_group_source(&mut self, source: Rc<dyn crate::lease::TokenSource>) {
        self.groups.set_source(source);
    }

    /// Lets `path_config` set the shaping of the ready queues made from now on.
    pub fn set_path_config(&mut self, path_config: PathConfig) {
        self.path_config = path_config;
    }

    pub fn new(now_ms: u64, shaping: Arc<ShapingTable>) -> Queues {
        Queues {
            path_config: PathConfig::default(),
            tokens: None,
            groups: limits::Groups::default(),
            shared_rules: Vec::new(),
            shared_backoffs: Vec::new(),
            scheduled: Wheel::new(now_ms),
            due: Vec::new(),
            held: Vec::new(),
            suspensions: Vec::new(),
            next_expiry_ms: u64::MAX,
            shaping,
            ready: HashMap::new(),
            listed: Vec::new(),
            adapting: Vec::new(),
            backed_off: 0,
            counts: admin::ScheduledCounts::default(),
            ready_suspensions: Vec::new(),
            bounces: Vec::new(),
        }
    }

    /// Adds a part to the scheduled queue, or to `due` when it is due.
    pub fn schedule(&mut self, part: Part) {
        if part.due_ms > self.scheduled.now() {
            self.counts.add(&part, admin::Place::Waiting);
        }
        if let Err(part) = self.scheduled.insert(part.due_ms, part) {
            self.due.push(part);
        }
    }

    /// Moves every part due at `now_ms` to `due`.
    pub fn promote(&mut self, now_ms: u64) {
        let from = self.due.len();
        self.scheduled.advance(now_ms, &mut self.due);
        for part in &self.due[from..] {
            self.counts.remove(part, admin::Place::Waiting);
        }
    }

    /// Makes every scheduled part in a queue `selector` selects due now (an
    /// operator's "retry now", as Postfix's `postqueue -f`); parts held by a
    /// suspension stay held. Returns how many. A scan of the whole scheduled queue:
    /// an operator's verb, not a delivery path.
    pub fn retry_now(&mut self, selector: &QueueSelector, now_ms: u64) -> usize {
        let parts = self.take_waiting_where(|part| {
            let m = part.message.borrow();
            selector.selects(&queue_name(&m, &part.domain))
        });
        let count = parts.len();
        self.due_now(parts, now_ms);
        count
    }

    /// Takes the parts for which `take` is true out of the timer wheel.
    fn take_waiting_where(&mut self, take: impl FnMut(&Part) -> bool) -> Vec<Part> {
        let parts = self.scheduled.drain_where(take);
        for part in &parts {
            self.counts.remove(part, admin::Place::Waiting);
        }
        parts
    }

    /// Makes `parts` due at `now_ms`.
    fn due_now(&mut self, parts: Vec<Part>, now_ms: u64) {
        for mut part in parts {
            part.due_ms = now_ms;
            part.message
                .borrow_mut()
                .set_part_due(&part.domain, Some(now_ms));
            self.due.push(part);
        }
    }

    /// The suspension holding a part's scheduled queue, if any.
    pub fn suspension(&self, part: &Part, now_ms: u64) -> Option<&Suspension> {
        if self.suspensions.is_empty() {
            return None;
        }
        let m = part.message.borrow();
        let queue = queue_name(&m, &part.domain);
        self.suspensions.iter().find(|s| s.holds(&queue, now_ms))
    }

    /// Keeps a part until its scheduled queue's suspension ends.
    pub fn hold(&mut self, part: Part) {
        self.counts.add(&part, admin::Place::Held);
        self.held.push(part);
    }

    /// Replaces the suspensions; held parts no longer suspended become due.
    pub fn set_suspensions(&mut self, suspensions: Vec<Suspension>, now_ms: u64) {
        self.suspensions = suspensions;
        self.reevaluate(now_ms);
    }

    /// Makes held parts whose suspension ended due; returns when the next active
    /// suspension expires. Cheap when no suspension has expired since the last call.
    pub fn release(&mut self, now_ms: u64) -> Option<u64> {
        if now_ms < self.next_expiry_ms {
            return (self.next_expiry_ms != u64::MAX).then_some(self.next_expiry_ms);
        }
        self.reevaluate(now_ms)
    }

    /// Drops expired suspensions and checks every held part against the rest.
    fn reevaluate(&mut self, now_ms: u64) -> Option<u64> {
        self.suspensions.retain(|s| s.expires_unix_ms > now_ms);
        let held = std::mem::take(&mut self.held);
        for part in held {
            if self.suspension(&part, now_ms).is_some() {
                self.held.push(part);
            } else {
                self.counts.remove(&part, admin::Place::Held);
                self.due.push(part);
            }
        }
        let next = self.suspensions.iter().map(|s| s.expires_unix_ms).min();
        self.next_expiry_ms = next.unwrap_or(u64::MAX);
        next
    }

    /// The shaping table in force (provider rules, scheduled queues' rules).
    pub fn shaping_table(&self) -> &Arc<ShapingTable> {
        &self.shaping
    }

    /// Asks the [`PathConfig`] again for every ready queue, with the domain it was
    /// made for (the policy script changed); [`Queues::set_shaping`] applies the
    /// answers.
    pub fn ask_paths_again(&mut self) {
        for q in self.ready.values_mut() {
            q.scripted = self
                .path_config
                .ask(&q.egress.name, &q.site, &q.path_domain);
        }
    }

    /// Applies new shaping to every ready queue (rates keep what was spent); each
    /// queue with parts is looked at again under it.
    pub fn set_shaping(&mut self, shaping: Arc<ShapingTable>) {
        for (key, q) in self.ready.iter_mut() {
            let hosts = q.site.host_names.iter().map(String::as_str);
            let rules = shaping.rules.for_queue(&q.egress.name, hosts);
            q.adaptive = q
                .adaptive
                .rebase(&self.shaping.rules, &shaping.rules, rules);
            q.reshape(&shaping);
            q.join_groups(&shaping, &mut self.groups);
            if !q.is_empty() {
                list(&mut self.listed, q, key.as_str());
            }
        }
        self.shaping = shaping;
    }

    /// Adds work to the ready queue of `site` from `egress` (made when missing) with
    /// `add`, unless the queue is full (then `add` is not called and false is
    /// returned); the queue is then listed to be looked at for connections.
    fn add_ready(
        &mut self,
        site: Rc<Site>,
        egress: Rc<Egress>,
        domain: impl FnOnce() -> String,
        add: impl FnOnce(&mut ReadyQueue),
    ) -> bool {
        // The one allocation per part on this path: the queue's name.
        let key = ready_key(&egress, &site);
        let q = match self.ready.get_mut(&key) {
            Some(q) => q,
            None => {
                let domain = domain();
                let scripted = self.path_config.ask(&egress.name, &site, &domain);
                let mut q = ReadyQueue::new(site, egress, &self.shaping, scripted, domain);
                if let Some(source) = &self.tokens {
                    q.share_rates(&key, source);
                }
                q.join_groups(&self.shaping, &mut self.groups);
                self.ready.insert(key.clone(), q);
                if self.shared_backoffs.iter().any(|b| b.queue == key) {
                    self.impose_backoff(&key);
                }
                if self.shared_rules.iter().any(|r| r.queue == key) {
                    // (Their events are the other node's: this node only obeys.)
                    self.impose_shared(&key);
                }
                self.ready.get_mut(&key).expect("inserted above")
            }
        };
        if q.is_full() {
            return false;
        }
        add(q);
        q.wake_idle();
        list(&mut self.listed, q, key);
        true
    }

    /// Counts the connections to open now, one entry of `out` per connection (each
    /// counted in its queue's `connections` from here on), within each listed
    /// queue's shaping: connection_limit, max_connection_rate, the backoff after
    /// failures, a message-rate wait. Returns the earliest time a queue that is
    /// waiting must be looked at again. A queue stays listed while it waits and
    /// leaves the list once it has the connections it may have; a part arriving or
    /// a connection ending ([`Queues::connection_ended`]) lists it again.
    pub fn open_connections(&mut self, now_ms: u64, out: &mut Vec<String>) -> Option<u64> {
        let now_us = now_ms * 1000;
        let mut wake: Option<u64> = None;
        let mut later = |at: u64| wake = Some(wake.map_or(at, |w| w.min(at)));
        // The groups that held queues back claim what the last round wanted.
        self.groups.claim_pressing(now_us);
        for key in std::mem::take(&mut self.listed) {
            let Some(q) = self.ready.get_mut(&key) else {
                continue;
            };
            // An operator's suspension of the queue, or a response rule's.
            let suspended = (admin::ready_suspension(&self.ready_suspensions, &key, now_ms)
                .into_iter())
            .map(|s| s.expires_unix_ms)
            .chain(
                q.adaptive
                    .action_until(&self.shaping.rules, ActionName::Suspend),
            )
            .filter(|until| *until > now_ms)
            .max();
            let waiting = if q.is_empty() {
                false
            } else if let Some(until) = suspended {
                // Suspended: its parts wait in it, and no connection opens, until
                // the suspension or the rule ends.
                later(until);
                true
            } else if q.throttled_until_ms > now_ms {
                later(q.throttled_until_ms);
                true
            } else {
                let allowed = q
                    .health
                    .connections_allowed(now_ms, q.shaping.connection_limit);
                if allowed == 0 {
                    let backing_off = q.health.backing_off(now_ms);
                    if backing_off {
                        later(q.health.retry_at_ms);
                    }
                    backing_off
                } else {
                    let cap = q.shared_cap(now_us, allowed);
                    let (cap, group_wait) = q.group_cap(now_us, cap, &mut self.groups.pressing);
                    let wanted = q.len().min(cap);
                    // Held back by the share this node has claimed, or by a limit
                    // over several queues: looked at again when a claim may change
                    // it (or a connection ends).
                    let mut waiting = wanted < q.len().min(allowed) && q.connections >= wanted;
                    if waiting {
                        let claims = (q.slots.as_ref().map(|s| s.wait(now_us)))
                            .into_iter()
                            .chain(group_wait)
                            .min();
                        if let Some(wait) = claims {
                            later(now_ms + wait.as_millis() as u64);
                        }
                    }
                    while q.connections < wanted {
                        if let Err(wait) = q.acquire_connect(now_us) {
                            later(now_ms + wait.as_millis() as u64 + 1);
                            waiting = true;
                            break;
                        }
                        q.opened();
                        out.push(key.clone());
                    }
                    waiting
                }
            };
            if waiting {
                self.listed.push(key);
            } else {
                q.listed = false;
            }
        }
        wake
    }

    /// A connection of the ready queue `key` has ended: one fewer is counted, and
    /// the queue is looked at again (its parts may want another).
    pub fn connection_ended(&mut self, key: &str) {
        if let Some(q) = self.ready.get_mut(key) {
            q.connections = q.connections.saturating_sub(1);
            for g in &q.groups {
                g.borrow_mut().ended();
            }
            list(&mut self.listed, q, key);
        }
    }

    /// Adds a due part with a site to its ready queue; a full queue (max_ready) gives
    /// it back.
    pub fn push_ready(&mut self, part: Part) -> Result<(), Part> {
        let site = part.site.clone().expect("ready parts have a site");
        let egress = part
            .egress
            .clone()
            .unwrap_or_else(|| Rc::new(Egress::default_source()));
        // Only a new ready queue asks for its domain (shared handles, no copy here).
        let (message, part_domain) = (part.message.clone(), part.domain.clone());
        let domain = move || {
            let m = message.borrow();
            m.meta("routing_domain")
                .map_or_else(|| part_domain.to_string(), str::to_string)
        };
        let mut part = Some(part);
        if self.add_ready(site, egress, domain, |q| q.parts.extend(part.take())) {
            Ok(())
        } else {
            Err(part.take().expect("a refused part was not added"))
        }
    }

    /// Adds a part handed over by another shard to its site's ready queue; a full
    /// queue gives it back.
    pub fn push_remote(
        &mut self,
        site: Rc<Site>,
        egress: Rc<Egress>,
        handoff: Box<crate::handoff::Handoff>,
    ) -> Result<(), Box<crate::handoff::Handoff>> {
        // (A handoff carries copies of its envelope already; its domain is one more
        // small string.)
        let domain = (handoff.recipients.first())
            .and_then(|r| r.rsplit_once('@'))
            .map_or(String::new(), |(_, d)| d.to_ascii_lowercase());
        let mut handoff = Some(handoff);
        if self.add_ready(site, egress, || domain, |q| q.remote.extend(handoff.take())) {
            Ok(())
        } else {
            Err(handoff.take().expect("a refused handoff was not added"))
        }
    }

    /// Shared rates (the queues' with `[cluster]`, and the limits over several
    /// queues') take the answers to their leases and give back the tokens held
    /// unspent for two lease windows; shared connection limits claim anew.
    pub fn settle_leases(&mut self, now_ms: u64) {
        let now_us = now_ms * 1000;
        self.groups.settle(now_us);
        if self.tokens.is_none() {
            return;
        }
        for q in self.ready.values_mut() {
            q.messages.settle(now_us);
            q.connects.settle(now_us);
            // Claims what the queue wants now (less once connections end, none when
            // it is idle), and renews a claim held.
            let allowed = q
                .health
                .connections_allowed(now_ms, q.shaping.connection_limit);
            q.shared_cap(now_us, allowed);
        }
    }

    /// Forgets ready queues with nothing to do whose rate limits have recovered.
    pub fn forget_idle(&mut self, now_ms: u64) {
        let now_us = now_ms * 1000;
        self.ready.retain(|_, q| {
            !q.is_empty()
                || q.listed
                || q.connections > 0
                || q.health.backing_off(now_ms)
                || !q.adaptive.in_force().is_empty()
                || q.feedback.limit.is_some()
                || !q.messages.wait(now_us).is_zero()
                || !q.connects.wait(now_us).is_zero()
        });
        self.groups.forget_unused();
    }

    /// When the scheduled queue next has a part due (a lower bound).
    pub fn next_due(&self) -> Option<u64> {
        self.scheduled.next_deadline()
    }

    /// Parts in the scheduled queue, held ones included.
    pub fn scheduled_len(&self) -> usize {
        self.scheduled.len() + self.held.len()
    }

    pub fn held_len(&self) -> usize {
        self.held.len()
    }

    pub fn ready_len(&self) -> usize {
        self.ready.values().map(ReadyQueue::len).sum::<usize>() + self.due.len()
    }
}

/// `campaign:tenant@domain!routing_domain`, with absent parts left out (KumoMTA's
/// queue naming), the domain in lower case.
pub fn scheduled_queue(
    campaign: Option<&str>,
    tenant: Option<&str>,
    domain: &str,
    routing: Option<&str>,
) -> String {
    QueueName {
        campaign,
        tenant,
        domain: &domain.to_ascii_lowercase(),
        routing,
    }
    .to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn queued_messages_keep_only_the_metadata_delivery_reads() {
        let meta = vec![
            ("peer".to_string(), "192.0.2.7".to_string()),
            ("tenant".to_string(), "acme".to_string()),
            ("auth_user".to_string(), "u".to_string()),
            ("pool".to_string(), "warm".to_string()),
        ];
        let kept = delivery_meta(meta);
        assert_eq!(
            kept,
            vec![
                ("tenant".to_string(), "acme".to_string()),
                ("pool".to_string(), "warm".to_string())
            ]
        );
        assert_eq!(kept.capacity(), 2, "the allocation is fitted");
        let none = delivery_meta(vec![("peer".to_string(), "192.0.2.7".to_string())]);
        assert_eq!(none.capacity(), 0, "nothing kept: no allocation");
    }

    use super::*;
    use std::cell::Cell;

    fn message(recipients: &[&str]) -> Rc<RefCell<Message>> {
        Rc::new(RefCell::new(Message {
            id: MessageId { hi: 1, lo: 1 },
            sender: "s@b.test".into(),
            recipients: recipients.iter().map(|r| r.to_string()).collect(),
            meta: vec![],
            queue: "d.test".into(),
            received_ms: 0,
            size: 10,
            attempts: 0,
            done: vec![1],
            open_parts: 0,
            due_by_domain: Vec::new(),
        }))
    }

    fn routes() -> Routes {
        use crate::config::{Listen, Route};
        let route = |hosts: &[&str]| {
            Route::to_hosts(hosts.iter().map(|h| Listen(h.parse().unwrap())).collect())
        };
        let mut map = BTreeMap::new();
        map.insert("a.test".to_string(), route(&["127.0.0.1:25"]));
        map.insert("b.test".to_string(), route(&["127.0.0.1:25"]));
        map.insert(
            "c.test".to_string(),
            route(&["127.0.0.2:25", "127.0.0.1:26"]),
        );
        Routes::new(&map)
    }

    #[test]
    fn parts_group_recipients_by_domain_and_skip_finished_ones() {
        let m = message(&["x@a.test", "done@a.test", "y@A.TEST", "z@c.test"]);
        let parts = split(&m, 0);
        let summary: Vec<(&str, Vec<u32>)> = parts
            .iter()
            .map(|p| (&*p.domain, p.rcpts.clone()))
            .collect();
        assert_eq!(summary, vec![("a.test", vec![0, 2]), ("c.test", vec![3])]);
        assert_eq!(m.borrow().open_parts, 2);
        let r = routes();
        assert_eq!(r.site("B.test").unwrap().name, "127.0.0.1:25");
        let c = r.site("c.test").unwrap();
        assert_eq!(c.name, "127.0.0.1:26,127.0.0.2:25");
        assert_eq!(
            c.hosts[0],
            "127.0.0.2:25".parse::<SocketAddr>().unwrap(),
            "preference order kept"
        );
        assert!(r.site("nowhere.test").is_none());
    }

    #[test]
    fn retry_schedule_doubles_up_to_the_cap_with_bounded_jitter() {
        assert_eq!(next_due_ms(0, 1, 1200, 43_200, 0), 1_200_000);
        assert_eq!(next_due_ms(0, 2, 1200, 43_200, 0), 2_400_000);
        assert_eq!(next_due_ms(0, 3, 1200, 43_200, 0), 4_800_000);
        assert_eq!(next_due_ms(0, 9, 1200, 43_200, 0), 43_200_000);
        assert_eq!(next_due_ms(0, 200, 1200, 43_200, 0), 43_200_000);
        assert_eq!(
            next_due_ms(5, 1, 1200, 43_200, 1000),
            5 + 1_200_000 + 120_000
        );
    }

    #[test]
    fn scheduled_parts_become_due_in_time_and_ready_queues_are_bounded() {
        let table = Arc::new(ShapingTable::new(&crate::config::DeliveryConfig {
            shaping: crate::config::shaping::Knobs {
                max_ready: Some(crate::config::Bounded(1)),
                ..Default::default()
            },
            ..Default::default()
        }));
        let mut q = Queues::new(50, table);
        let m = message(&["x@a.test", "done@a.test", "z@c.test", "w@b.test"]);
        let r = routes();
        for (i, mut part) in split(&m, 0).into_iter().enumerate() {
            part.due_ms = 100 * (i as u64 + 1);
            part.site = r.site(&part.domain);
            q.schedule(part);
        }
        assert_eq!((q.scheduled_len(), q.ready_len()), (3, 0));
        let next = q.next_due().expect("scheduled");
        assert!((50..=100).contains(&next), "a lower bound of 100: {next}");
        q.promote(99);
        assert_eq!(q.due.len(), 0);
        q.promote(150);
        assert_eq!((q.scheduled_len(), q.due.len()), (2, 1));
        q.promote(1000);
        assert_eq!((q.scheduled_len(), q.due.len(), q.next_due()), (0, 3, None));
        // a.test and b.test share a site: the second is refused by max_ready = 1.
        let mut due = std::mem::take(&mut q.due);
        due.sort_by(|a, b| a.domain.cmp(&b.domain));
        let mut refused = Vec::new();
        for part in due {
            if let Err(part) = q.push_ready(part) {
                refused.push(part.domain);
            }
        }
        assert_eq!(refused, vec![std::rc::Rc::<str>::from("b.test")]);
        assert_eq!(q.ready.len(), 2);
        assert_eq!(q.ready_len(), 2);
    }

    /// Queues under the response rules of `toml_text` (a `[delivery]` section), with
    /// one part of a message to a.test ready.
    fn adaptive_queues(toml_text: &str) -> (Queues, String) {
        let config = crate::config::Config::parse(toml_text, "t.toml").unwrap();
        let mut q = Queues::new(0, Arc::new(ShapingTable::new(&config.delivery)));
        let m = message(&["x@a.test", "done@a.test"]);
        let mut part = split(&m, 0).remove(0);
        part.site = routes().site(&part.domain);
        q.push_ready(part).unwrap();
        let key = q.ready.keys().next().unwrap().clone();
        (q, key)
    }

    #[test]
    fn a_suspend_rule_holds_the_queue_s_connections_until_it_ends() {
        let (mut q, key) = adaptive_queues(
            "[delivery]\nautomation = [{ regex = 'TSS04', actions = ['suspend'], duration = 60 }]\n",
        );
        let mut out = Vec::new();
        assert!(q.observe(&key, 250, "250 2.0.0 OK", 1_000).is_empty());
        let fired = q.observe(&key, 421, "421 4.7.0 [TSS04] deferred", 1_000);
        assert_eq!((fired.len(), fired[0].until_ms), (1, 61_000));
        assert!(q.rules_in_force());
        assert_eq!(q.queues_with_rules(), 1);
        // No connection while suspended; the maintainer is told when to look again.
        assert_eq!(q.open_connections(2_000, &mut out), Some(61_000));
        assert!(out.is_empty());
        assert_eq!(q.next_rule_expiry(), Some(61_000));
        assert!(q.expire_rules(60_999).is_empty());
        let ended = q.expire_rules(61_000);
        assert_eq!(ended.len(), 1);
        assert!(!q.rules_in_force());
        q.open_connections(61_000, &mut out);
        assert_eq!(out, vec![key.clone()], "connections open again");
        // A queue with a rule in force is not forgotten while idle.
        q.observe(&key, 421, "421 [TSS04]", 70_000);
        q.ready.get_mut(&key).unwrap().parts.clear();
        q.ready.get_mut(&key).unwrap().connections = 0;
        q.forget_idle(80_000);
        assert!(q.ready.contains_key(&key));
    }

    #[test]
    fn a_rule_fired_on_another_node_holds_the_queue_here_and_queues_made_later() {
        let rules = "[delivery]\nautomation = [{ regex = 'TSS04', actions = ['suspend'], duration = 60 }]\n";
        let (mut q, key) = adaptive_queues(rules);
        let shared = |queue: &str, rule: &str, until_ms| adapt::SharedRule {
            queue: queue.into(),
            rule: rule.into(),
            until_ms,
        };
        // Unknown rules, other queues and expired ones are nothing here.
        let imposed = q.set_shared_rules(
            vec![
                shared(&key, "nonesuch#0", 61_000),
                shared("default->other", "default#0", 61_000),
                shared(&key, "default#0", 500),
            ],
            1_000,
        );
        assert!(imposed.is_empty());
        assert!(!q.rules_in_force());
        let imposed = q.set_shared_rules(vec![shared(&key, "default#0", 61_000)], 1_000);
        assert_eq!(imposed, vec![(key.clone(), 0, 61_000)]);
        let mut out = Vec::new();
        assert_eq!(q.open_connections(2_000, &mut out), Some(61_000));
        assert!(out.is_empty(), "suspended by the other node's rule");
        // Told again: nothing new.
        assert!(
            q.set_shared_rules(vec![shared(&key, "default#0", 61_000)], 2_000)
                .is_empty()
        );
        // A queue made while the rule lasts is held from the start.
        let (mut later, key) = adaptive_queues(rules);
        later.ready.clear();
        later.set_shared_rules(vec![shared(&key, "default#0", 61_000)], 1_000);
        let m = message(&["y@a.test"]);
        let mut part = split(&m, 0).remove(0);
        part.site = routes().site(&part.domain);
        later.push_ready(part).unwrap();
        assert_eq!(later.open_connections(2_000, &mut out), Some(61_000));
        assert!(out.is_empty());
        assert_eq!(later.expire_rules(61_000).len(), 1);
    }

    #[test]
    fn a_backoff_made_on_another_node_lowers_the_queue_once() {
        let on = "[delivery.shaping]\nconnection_limit = 8\nbackoff_failure_percent = 50\n";
        let (mut q, key) = adaptive_queues(on);
        let backoff = |limit, until_ms| adapt::SharedBackoff {
            queue: key.clone(),
            limit,
            until_ms,
        };
        let changes = q.set_shared_backoffs(vec![backoff(2, 60_000)], 1_000);
        assert_eq!(changes.len(), 1);
        assert_eq!((changes[0].1.from, changes[0].1.to), (8, 2));
        assert_eq!(q.ready[&key].shaping.connection_limit, 2);
        assert_eq!(q.queues_backed_off(), 1);
        // Raised here on its own results, it is not lowered again by the same one.
        q.ready.get_mut(&key).unwrap().feedback.limit = Some(5);
        assert!(
            q.set_shared_backoffs(vec![backoff(2, 60_000)], 2_000)
                .is_empty()
        );
        // A lower one is taken; a higher one changes nothing.
        assert_eq!(
            q.set_shared_backoffs(vec![backoff(1, 61_000)], 3_000).len(),
            1
        );
        assert!(
            q.set_shared_backoffs(vec![backoff(6, 62_000)], 4_000)
                .is_empty()
        );
        // A queue that does not back off is left alone.
        let (mut off, key) = adaptive_queues("[delivery.shaping]\nconnection_limit = 8\n");
        let changes = off.set_shared_backoffs(
            vec![adapt::SharedBackoff {
                queue: key.clone(),
                limit: 2,
                until_ms: 60_000,
            }],
            1_000,
        );
        assert!(changes.is_empty());
        assert_eq!(off.ready[&key].shaping.connection_limit, 8);
    }

    #[test]
    fn a_changed_path_config_reshapes_the_ready_queues_it_made() {
        let answer = Rc::new(Cell::new(3u64));
        let asked = Rc::new(RefCell::new(Vec::new()));
        let mut q = Queues::new(0, Arc::new(ShapingTable::new(&Default::default())));
        q.set_path_config(PathConfig::new({
            let (answer, asked) = (answer.clone(), asked.clone());
            move |egress, site, domain| {
                asked
                    .borrow_mut()
                    .push(format!("{egress} {} {domain}", site.name));
                Some(crate::config::shaping::Knobs {
                    connection_limit: Some(crate::config::Bounded(answer.get())),
                    ..Default::default()
                })
            }
        }));
        let m = message(&["x@a.test"]);
        let mut part = split(&m, 0).remove(0);
        part.site = routes().site(&part.domain);
        q.push_ready(part).unwrap();
        let key = q.ready.keys().next().unwrap().clone();
        let limit = |q: &Queues| q.ready[&key].shaping.connection_limit;
        assert_eq!(limit(&q), 3);
        // Another script: asked again with the same domain, in force after the
        // shaping is applied; the configuration's shaping stays under it.
        answer.set(5);
        q.ask_paths_again();
        q.set_shaping(Arc::new(ShapingTable::new(&Default::default())));
        assert_eq!(limit(&q), 5);
        assert_eq!(
            *asked.borrow(),
            ["default 127.0.0.1:25 a.test", "default 127.0.0.1:25 a.test"]
        );
        // A script without the hook: the configuration's shaping alone.
        q.set_path_config(PathConfig::default());
        q.ask_paths_again();
        q.set_shaping(Arc::new(ShapingTable::new(&Default::default())));
        assert_eq!(limit(&q), 32);
    }

    #[test]
    fn set_bounce_and_transient_rules_act_on_their_queue() {
        let (mut q, key) = adaptive_queues(
            "[delivery]\nautomation = [\n\
             { codes = [451], trigger = '2/min', set = { connection_limit = 1, max_message_rate = '10/min' }, duration = 60 },\n\
             { enhanced = ['5.7.1'], actions = ['bounce', 'transient'], duration = 30 },\n]\n",
        );
        let limit = |q: &Queues| q.ready[&key].shaping.connection_limit;
        assert_eq!(limit(&q), 32);
        assert!(q.observe(&key, 451, "451 4.7.1 slow down", 0).is_empty());
        assert_eq!(q.observe(&key, 451, "451 4.7.1 slow down", 10_000).len(), 1);
        assert_eq!(limit(&q), 1, "the rule's shaping is in force");
        assert_eq!(q.transient_rule(&key, 10_000), None);
        assert!(q.take_bounced(10_000).is_empty(), "no bounce rule in force");
        // A block: what waits is bounced, and 5xx replies count as temporary.
        assert_eq!(q.observe(&key, 554, "554 5.7.1 blocked", 20_000).len(), 1);
        let rule = q.transient_rule(&key, 20_000).expect("transient in force");
        let bounced = q.take_bounced(20_000);
        assert_eq!(bounced.len(), 1);
        assert_eq!((bounced[0].0.as_str(), bounced[0].1), (key.as_str(), rule));
        assert!(q.ready[&key].is_empty());
        // The block ends first, then the shaping.
        assert_eq!(q.expire_rules(50_000).len(), 1);
        assert_eq!(q.transient_rule(&key, 50_000), None);
        assert_eq!(limit(&q), 1);
        q.expire_rules(70_000);
        assert_eq!(limit(&q), 32, "back to the configured shaping");
        // A reload that drops the rules ends them too.
        q.observe(&key, 554, "554 5.7.1 blocked", 80_000);
        q.set_shaping(Arc::new(ShapingTable::new(&Default::default())));
        assert_eq!(q.transient_rule(&key, 80_000), None);
    }

    #[test]
    fn backoff_halves_the_connection_limit_on_failures_and_adds_one_back_per_good_interval() {
        let (mut q, key) = adaptive_queues(
            "[delivery.shaping]\nconnection_limit = 8\nmax_message_rate = '80/min'\n\
             backoff_failure_percent = 50\nbackoff_interval_secs = 10\n",
        );
        let shaping = |q: &Queues| {
            (
                q.ready[&key].shaping.connection_limit,
                q.ready[&key].shaping.max_message_rate.to_string(),
            )
        };
        // Nine failures in an interval are too few to judge; the interval ends.
        for t in 0..8 {
            assert_eq!(q.feedback(&key, true, t * 1000), None);
        }
        assert_eq!(q.feedback(&key, true, 10_000), None, "under 10 attempts");
        // Ten attempts, six failed (60% >= 50%): halved, the rate with it.
        for t in 0..10 {
            q.feedback(&key, t < 6, 11_000 + t * 500);
        }
        let change = q.feedback(&key, false, 20_000);
        assert_eq!(change, Some(adapt::LimitChange { from: 8, to: 4 }));
        assert_eq!(q.queues_backed_off(), 1);
        assert_eq!(shaping(&q), (4, "40/min".to_string()));
        // Still failing: halved again, never below one.
        for t in 0..10 {
            q.feedback(&key, true, 21_000 + t * 100);
        }
        assert_eq!(
            q.feedback(&key, true, 30_000),
            Some(adapt::LimitChange { from: 4, to: 2 })
        );
        // A mixed interval (30% failed: neither failing nor healthy) changes nothing.
        for t in 0..10 {
            q.feedback(&key, t < 3, 31_000 + t * 100);
        }
        assert_eq!(q.feedback(&key, false, 40_000), None);
        // Healthy intervals (under 25% failed) add one connection each, back to the
        // configured limit.
        let limits: Vec<usize> = (0..80)
            .filter_map(|i| q.feedback(&key, false, 41_000 + i * 1000))
            .map(|change| change.to)
            .collect();
        assert_eq!(limits, vec![3, 4, 5, 6, 7, 8]);
        assert_eq!(shaping(&q), (8, "80/min".to_string()));
        assert_eq!(q.ready[&key].feedback.limit, None);
        assert_eq!(q.queues_backed_off(), 0);
    }

    #[test]
    fn suspended_parts_are_held_until_the_suspension_is_lifted_or_expires() {
        let mut q = Queues::new(0, Arc::new(ShapingTable::new(&Default::default())));
        let m = message(&["x@a.test", "done@a.test", "z@c.test"]);
        m.borrow_mut().meta.push(("tenant".into(), "acme".into()));
        let suspension = Suspension {
            id: "s".into(),
            queues: QueueSelector {
                domain: Some("a.test".into()),
                tenant: Some("acme".into()),
                ..QueueSelector::default()
            },
            reason: "test".into(),
            expires_unix_ms: 500,
        };
        q.set_suspensions(vec![suspension.clone()], 0);
        for part in split(&m, 0) {
            if q.suspension(&part, 0).is_some() {
                q.hold(part);
            } else {
                q.schedule(part);
            }
        }
        assert_eq!((q.held_len(), q.due.len()), (1, 1));
        assert_eq!(q.release(100), Some(500));
        assert_eq!(q.held_len(), 1);
        assert_eq!(q.release(500), None, "expired");
        assert_eq!((q.held_len(), q.due.len()), (0, 2));
        let part = q.due.pop().unwrap();
        q.set_suspensions(vec![suspension], 0);
        let held = q.suspension(&part, 0).is_some();
        assert!(held == (&*part.domain == "a.test"));
        q.hold(part);
        q.set_suspensions(vec![], 0);
        assert_eq!((q.held_len(), q.due.len()), (0, 2), "lifted");
    }

    /// Connections are opened for the ready queues that changed, never by looking at
    /// every ready queue: a queue that has its connections leaves the list, a part
    /// or an ended connection lists it again, and a queue backing off stays listed
    /// with the time to look again.
    #[test]
    fn connections_are_opened_for_the_queues_that_changed() {
        let mut q = Queues::new(0, Arc::new(ShapingTable::new(&Default::default())));
        let egress = Rc::new(Egress::default_source());
        let site = |i: usize| {
            Rc::new(Site {
                name: format!("mx{i}.test"),
                hosts: vec!["127.0.0.1:25".parse().unwrap()],
                host_names: vec![format!("mx{i}.test")],
                tls: Default::default(),
                auth: None,
            })
        };
        let m = message(&["x@a.test"]);
        let part = |i: usize| {
            let mut p = split(&m, 0).pop().unwrap();
            p.site = Some(site(i));
            p.egress = Some(egress.clone());
            p
        };
        for i in 0..1000 {
            q.push_ready(part(i)).unwrap();
        }
        let mut opened = Vec::new();
        assert_eq!(q.open_connections(0, &mut opened), None);
        assert_eq!(opened.len(), 1000, "one connection per queue with a part");
        // Nothing changed: nothing is looked at, nothing opened.
        opened.clear();
        q.open_connections(1, &mut opened);
        assert!(opened.is_empty() && q.listed.is_empty());
        // A second part for a queue whose one connection is busy with the first
        // opens a second connection (the default limit allows it).
        q.push_ready(part(7)).unwrap();
        assert_eq!(q.listed, vec!["default->mx7.test".to_string()]);
        q.open_connections(2, &mut opened);
        assert_eq!(opened, vec!["default->mx7.test".to_string()]);
        assert_eq!(q.ready["default->mx7.test"].connections, 2);
        // A connection that ends lists its queue; with its parts still there and a
        // failure backing it off, the queue stays listed until the retry time.
        opened.clear();
        let key = "default->mx3.test";
        let r = q.ready.get_mut(key).unwrap();
        r.health.failed(10, 3, std::time::Duration::from_secs(5));
        q.connection_ended(key);
        assert_eq!(q.ready[key].connections, 0);
        let retry = q.ready[key].health.retry_at_ms;
        assert_eq!(q.open_connections(11, &mut opened), Some(retry));
        assert!(opened.is_empty());
        assert_eq!(q.listed, vec![key.to_string()]);
        // At the retry time one probe connection opens and the queue leaves the list.
        assert_eq!(q.open_connections(retry, &mut opened), None);
        assert_eq!(opened, vec![key.to_string()]);
        assert!(q.listed.is_empty());
        // Listed queues are never forgotten; idle unlisted ones are.
        for r in q.ready.values_mut() {
            r.parts.clear();
            r.connections = 0;
        }
        q.connection_ended(key);
        q.forget_idle(retry + 10_000);
        assert_eq!(q.ready.keys().collect::<Vec<_>>(), vec![key]);
    }

    /// Queues from `sources` to `sites` sites (mx<i>.hop.test), two parts each,
    /// under `toml_text`.
    fn grouped_queues(toml_text: &str, sources: &[&str], sites: usize) -> Queues {
        let config = crate::config::Config::parse(toml_text, "t.toml").unwrap();
        let mut q = Queues::new(0, Arc::new(ShapingTable::new(&config.delivery)));
        let m = message(&["x@a.test", "y@a.test"]);
        for source in sources {
            let egress = Rc::new(Egress {
                name: source.to_string(),
                ..Egress::default_source()
            });
            for i in 0..sites {
                let site = Rc::new(Site {
                    name: format!("mx{i}.hop.test"),
                    hosts: vec!["127.0.0.1:25".parse().unwrap()],
                    host_names: vec![format!("mx{i}.hop.test")],
                    tls: Default::default(),
                    auth: None,
                });
                for _ in 0..2 {
                    let mut p = split(&m, 0).pop().unwrap();
                    p.site = Some(site.clone());
                    p.egress = Some(egress.clone());
                    q.push_ready(p).unwrap();
                }
            }
        }
        q
    }

    #[test]
    fn a_limit_over_several_queues_caps_their_connections_together() {
        let mut q = grouped_queues(
            "[delivery.limits.per-ip]\nper = \"source\"\nconnection_limit = 3\n",
            &["default"],
            5,
        );
        let mut opened = Vec::new();
        q.open_connections(0, &mut opened);
        assert_eq!(opened.len(), 3, "{opened:?}: three for the source in all");
        let info = q.ready[&opened[0]].groups();
        assert_eq!(info.len(), 1);
        assert_eq!(info[0].key, "limit:per-ip@default");
        assert_eq!(
            (info[0].connections_open, info[0].connections_claimed),
            (3, Some(3))
        );
        // The queues held back stay listed; a connection that ends lets one open.
        assert!(!q.listed.is_empty());
        q.connection_ended(&opened[0]);
        let mut more = Vec::new();
        q.open_connections(1, &mut more);
        assert_eq!(more.len(), 1, "{more:?}");
        // Reloaded without the limit: the queues are free of it.
        let config = crate::config::Config::parse("", "t.toml").unwrap();
        q.set_shaping(Arc::new(ShapingTable::new(&config.delivery)));
        more.clear();
        q.open_connections(2, &mut more);
        assert_eq!(more.len(), 10 - 3, "two a queue now: {more:?}");
        assert!(q.ready.values().all(|r| r.groups().is_empty()));
        q.forget_idle(3);
        assert!(q.groups.is_empty(), "the limit is forgotten");
    }

    #[test]
    fn a_limit_over_several_queues_shares_one_message_rate() {
        let mut q = grouped_queues(
            "[delivery.providers.hop]\nmx_suffix = [\".hop.test\"]\n\
             provider_max_message_rate = \"3/s\"\n\
             shaping = { max_message_rate = \"2/s\" }\n",
            &["default", "other"],
            2,
        );
        let key = |source: &str, i: usize| format!("{source}->mx{i}.hop.test");
        let q0 = key("default", 0);
        let mut take = |k: &str, now_us: u64| {
            let r = q.ready.get_mut(k).unwrap();
            assert!(r.rates_messages());
            r.acquire_message(now_us).is_ok()
        };
        // The provider's 3/s is the default source's over both its sites…
        assert!(take(&q0, 0) && take(&q0, 0));
        assert!(!take(&q0, 0), "the queue's own 2/s");
        assert!(take(&key("default", 1), 0));
        assert!(!take(&key("default", 1), 0), "the provider's 3/s");
        // … and the other source has its own.
        assert!(take(&key("other", 0), 0));
        // A refusal by the limit took nothing from the queue's own rate: its second
        // token of the burst is still there.
        assert!(q.ready[&key("default", 1)].messages.wait(0).is_zero());
        let groups = q.ready[&q0].groups();
        assert_eq!(groups[0].key, "provider:hop@default");
    }

    #[test]
    fn retry_now_makes_the_selected_scheduled_parts_due_and_leaves_the_rest() {
        let mut q = Queues::new(0, Arc::new(ShapingTable::new(&Default::default())));
        let m = message(&["x@a.test", "done@d.test", "y@b.test", "z@c.test"]);
        for part in split(&m, 60_000) {
            q.schedule(part);
        }
        assert_eq!(q.scheduled_len(), 3);
        let b = QueueSelector {
            domain: Some("B.test".into()),
            ..QueueSelector::default()
        };
        assert_eq!(q.retry_now(&b, 10), 1);
        assert_eq!(q.due.len(), 1);
        assert_eq!(&*q.due[0].domain, "b.test");
        assert_eq!(q.due[0].due_ms, 10);
        assert!(m.borrow().due_by_domain.contains(&("b.test".into(), 10)));
        assert_eq!(q.scheduled_len(), 2);
        assert_eq!(q.retry_now(&b, 11), 0, "nothing left in that queue");
        assert_eq!(q.retry_now(&QueueSelector::default(), 12), 2, "everything");
        assert_eq!(q.scheduled_len(), 0);
        q.promote(100_000);
        assert_eq!(q.due.len(), 3, "no part was left behind in the wheel");
    }
}
