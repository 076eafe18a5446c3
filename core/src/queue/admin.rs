//! The operator's side of a shard's queues: what the admin API lists and inspects,
//! and what its verbs change — suspensions of ready queues, administrative bounces.
//!
//! Listing must not slow delivery, even when a client asks every 100 ms: the parts
//! waiting in each scheduled queue are counted as they come and go
//! ([`ScheduledCounts`], one hash per part entering or leaving the timer wheel or the
//! held list — retries only: a first attempt is due at once and never enters them),
//! so a listing costs the number of queues, never the number of parts. Only what
//! cannot be counted that way (the oldest message, the next due time of each
//! scheduled queue) is found by a scan, and only when asked for (`detail`).

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};

use serde::Serialize;

use super::{Message, Part, Queues, ReadyQueue, list, queue_name};
use crate::config::automation::ActionName;
use crate::config::shaping::Rate;
use crate::shaping::{QueueName, QueueSelector, Shaping};

/// Parts in the scheduled queue, by scheduled queue name.
#[derive(Debug, Default)]
pub struct ScheduledCounts {
    /// By a hash of the name's fields: the name itself is built only when a queue
    /// first appears. (Two names with one 64-bit hash would share a count: a
    /// listing's error, never a delivery's.)
    by_queue: HashMap<u64, ScheduledCount>,
}

#[derive(Debug, Clone)]
struct ScheduledCount {
    name: String,
    /// In the timer wheel, waiting for their due time.
    waiting: usize,
    /// Due, but held by a suspension of their scheduled queue.
    held: usize,
}

/// Where in the scheduled queue a part is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Place {
    Waiting,
    Held,
}

fn queue_hash(queue: &QueueName<'_>) -> u64 {
    let mut h = DefaultHasher::new();
    queue.campaign.hash(&mut h);
    queue.tenant.hash(&mut h);
    queue.domain.hash(&mut h);
    h.finish()
}

impl ScheduledCounts {
    pub(super) fn add(&mut self, part: &Part, place: Place) {
        let m = part.message.borrow();
        let queue = queue_name(&m, &part.domain);
        let count = self
            .by_queue
            .entry(queue_hash(&queue))
            .or_insert_with(|| ScheduledCount {
                name: queue.to_string(),
                waiting: 0,
                held: 0,
            });
        match place {
            Place::Waiting => count.waiting += 1,
            Place::Held => count.held += 1,
        }
    }

    pub(super) fn remove(&mut self, part: &Part, place: Place) {
        let m = part.message.borrow();
        let hash = queue_hash(&queue_name(&m, &part.domain));
        if let Some(count) = self.by_queue.get_mut(&hash) {
            match place {
                Place::Waiting => count.waiting = count.waiting.saturating_sub(1),
                Place::Held => count.held = count.held.saturating_sub(1),
            }
            if count.waiting == 0 && count.held == 0 {
                self.by_queue.remove(&hash);
            }
        }
    }

    /// Scheduled queues with parts.
    pub fn len(&self) -> usize {
        self.by_queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_queue.is_empty()
    }
}

/// An operator's suspension of one ready queue (`egress_source->site_name`): no
/// connection opens for it until it is lifted or expires; its parts wait in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ReadySuspension {
    pub id: String,
    pub name: String,
    pub reason: String,
    pub expires_unix_ms: u64,
}

/// An operator's bounce: every part of the selected scheduled queues is bounced
/// now, and so is every part of them that comes due (or is injected) until it
/// expires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct AdminBounce {
    pub id: String,
    #[serde(flatten)]
    pub queues: QueueSelector,
    pub reason: String,
    pub expires_unix_ms: u64,
    /// No event for the recipients it bounces.
    #[serde(default)]
    pub suppress_logging: bool,
}

impl AdminBounce {
    pub fn bounces(&self, queue: &QueueName<'_>, now_ms: u64) -> bool {
        now_ms < self.expires_unix_ms && self.queues.selects(queue)
    }
}

/// An operator's rebind (KumoMTA's `/api/admin/rebind/v1`): the messages of the
/// selected scheduled queues received before it was made send through another
/// egress pool from their next attempt. Kept (in `admin.json`) until no message it
/// applies to can remain, so that messages recovered after a restart are rebound
/// again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Rebind {
    pub id: String,
    #[serde(flatten)]
    pub queues: QueueSelector,
    pub pool: String,
    pub reason: String,
    /// Messages received before this (unix ms) are rebound.
    pub created_unix_ms: u64,
    /// Make every rebound part due now (not only those whose pool changed).
    #[serde(default)]
    pub always_flush: bool,
    /// No AdminRebind event per message rebound.
    #[serde(default)]
    pub suppress_logging: bool,
    /// When no message it applies to can be left (created + max_age).
    pub expires_unix_ms: u64,
}

impl Rebind {
    /// Rebinds `message` if it is one of this rebind's (received before it, with a
    /// part in a selected queue): sets its pool; true when the pool changed.
    pub fn apply<'a>(
        &self,
        message: &mut Message,
        mut domains: impl Iterator<Item = &'a str>,
    ) -> Option<bool> {
        if message.received_ms >= self.created_unix_ms {
            return None;
        }
        let selected = domains.any(|d| self.queues.selects(&queue_name(message, d)));
        if !selected {
            return None;
        }
        let changed = message.meta("pool") != Some(self.pool.as_str());
        if changed {
            message.meta.retain(|(k, _)| k != "pool");
            message.meta.push(("pool".to_string(), self.pool.clone()));
        }
        Some(changed)
    }
}

/// A scheduled queue in a listing.
#[derive(Debug, Clone, Serialize)]
pub struct ScheduledInfo {
    pub name: String,
    /// Parts waiting for their due time, and parts held by a suspension.
    pub waiting: usize,
    pub held: usize,
    /// With `detail`: when the oldest of its messages was received, and when its
    /// next part is due (unix ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oldest_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_due_ms: Option<u64>,
}

/// The limits of a ready queue that adaptive delivery may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Limits {
    pub connection_limit: usize,
    pub max_message_rate: Rate,
    pub max_connection_rate: Rate,
    pub max_deliveries_per_connection: usize,
}

impl From<&Shaping> for Limits {
    fn from(s: &Shaping) -> Limits {
        Limits {
            connection_limit: s.connection_limit,
            max_message_rate: s.max_message_rate,
            max_connection_rate: s.max_connection_rate,
            max_deliveries_per_connection: s.max_deliveries_per_connection,
        }
    }
}

/// A response rule in force on a ready queue.
#[derive(Debug, Clone, Serialize)]
pub struct RuleInForce {
    pub rule: String,
    pub until_ms: u64,
    pub actions: Vec<&'static str>,
}

/// A ready queue in a listing.
#[derive(Debug, Clone, Serialize)]
pub struct ReadyInfo {
    pub name: String,
    pub source: String,
    pub site: String,
    /// Parts of this shard's messages, and parts other shards handed over.
    pub parts: usize,
    pub remote: usize,
    pub connections: usize,
    /// The limits in effect (the configuration, then response rules in force, then
    /// adaptive backoff) and those configured.
    pub effective: Limits,
    pub configured: Limits,
    /// Why no connection opens: an operator's suspension or a response rule, and
    /// until when (unix ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suspended_until_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suspended_by: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rules_in_force: Vec<RuleInForce>,
    /// The connection limit adaptive backoff imposes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backoff_limit: Option<usize>,
    /// Failed connections in a row, and when the next may be tried (unix ms).
    pub connect_failures: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_retry_at_ms: Option<u64>,
    /// This node's side of the limits shared by the cluster (`[cluster]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterShare>,
    /// The limits over several queues it is in (`delivery.limits`), this shard's
    /// side of each.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub limits: Vec<super::limits::GroupInfo>,
}

/// A ready queue's share of the limits the cluster's nodes share.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterShare {
    /// Connections this node has claimed of the shared connection_limit.
    pub connections_claimed: usize,
    /// Tokens leased and not spent yet, of the message and connection rates.
    pub message_tokens: u32,
    pub connection_tokens: u32,
    /// The fallback in force while the shared Redis cannot be reached.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback: Option<crate::config::Fallback>,
}

/// One shard's queues, as the admin API lists them.
#[derive(Debug, Clone, Serialize)]
pub struct Listing {
    pub scheduled: Vec<ScheduledInfo>,
    pub ready: Vec<ReadyInfo>,
    /// Due parts not yet in a ready queue (their site is being looked up).
    pub due: usize,
}

/// What a bounce would take, or took: parts and recipients by scheduled queue.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Tally {
    pub parts: BTreeMap<String, usize>,
    pub recipients: usize,
}

impl Tally {
    pub fn add(&mut self, part: &Part) {
        let m = part.message.borrow();
        let name = queue_name(&m, &part.domain).to_string();
        *self.parts.entry(name).or_default() += 1;
        self.recipients += part.rcpts.len();
    }

    pub fn total(&self) -> usize {
        self.parts.values().sum()
    }
}

/// A ready queue's name as KumoMTA writes it (`source->site@smtp_client`) or as
/// gannet does (`source->site`): gannet's form.
pub fn ready_queue_name(name: &str) -> &str {
    name.trim().trim_end_matches("@smtp_client")
}

/// The suspension of `suspensions` in force on ready queue `key` at `now_ms`.
pub(super) fn ready_suspension<'a>(
    suspensions: &'a [ReadySuspension],
    key: &str,
    now_ms: u64,
) -> Option<&'a ReadySuspension> {
    (suspensions.iter()).find(|s| s.name == key && s.expires_unix_ms > now_ms)
}

impl Queues {
    /// Replaces the operator's ready-queue suspensions; every ready queue with parts
    /// is looked at again (one lifted may open connections now).
    pub fn set_ready_suspensions(&mut self, suspensions: Vec<ReadySuspension>) {
        self.ready_suspensions = suspensions;
        for (key, q) in self.ready.iter_mut() {
            if !q.is_empty() {
                list(&mut self.listed, q, key.as_str());
            }
        }
    }

    /// The operator's suspension of ready queue `key` in force at `now_ms`.
    pub fn ready_suspension(&self, key: &str, now_ms: u64) -> Option<&ReadySuspension> {
        ready_suspension(&self.ready_suspensions, key, now_ms)
    }

    /// Replaces the operator's bounces in force.
    pub fn set_admin_bounces(&mut self, bounces: Vec<AdminBounce>) {
        self.bounces = bounces;
    }

    /// The operator's bounce that takes `part`, if one is in force.
    pub fn admin_bounce(&self, part: &Part, now_ms: u64) -> Option<&AdminBounce> {
        if self.bounces.is_empty() {
            return None;
        }
        let m = part.message.borrow();
        let queue = queue_name(&m, &part.domain);
        self.bounces.iter().find(|b| b.bounces(&queue, now_ms))
    }

    /// Takes every part of this shard's messages in the selected scheduled queues out
    /// of the scheduled queue (waiting or held), the due list and the ready queues.
    /// Parts handed to another shard are not here: they come back with their report.
    pub fn take_selected(&mut self, selector: &QueueSelector) -> Vec<Part> {
        self.take_where(|part: &Part| {
            let m = part.message.borrow();
            selector.selects(&queue_name(&m, &part.domain))
        })
    }

    /// Takes every part for which `selects` is true out of the scheduled queue
    /// (waiting or held), the due list and the ready queues (a transmission's parts
    /// when it is canceled).
    pub fn take_where(&mut self, selects: impl Fn(&Part) -> bool) -> Vec<Part> {
        let mut out = self.take_waiting_where(&selects);
        let (held, kept): (Vec<Part>, Vec<Part>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(&selects);
        self.held = kept;
        for part in held {
            self.counts.remove(&part, Place::Held);
            out.push(part);
        }
        let (due, kept): (Vec<Part>, Vec<Part>) = std::mem::take(&mut self.due)
            .into_iter()
            .partition(&selects);
        self.due = kept;
        out.extend(due);
        out.extend(self.take_ready_where(&selects));
        out
    }

    /// Applies `rebind` to the messages of this shard's queued parts: their pool is
    /// set, and the parts of a message whose pool changed (every rebound part with
    /// `always_flush`) are made due now — out of the scheduled queue, the held list
    /// and the ready queues — to be placed again with a source of the new pool.
    /// Returns the messages rebound. Parts handed to another shard keep their
    /// attempt; their message is rebound for the next.
    pub fn rebind(&mut self, rebind: &Rebind, now_ms: u64) -> Vec<crate::id::MessageId> {
        let mut rebound = std::collections::HashSet::new();
        let mut flush = std::collections::HashSet::new();
        self.for_each_part(|part, _| {
            let mut m = part.message.borrow_mut();
            let id = m.id;
            if rebound.contains(&id) {
                return;
            }
            let domain: &str = &part.domain;
            if let Some(changed) = rebind.apply(&mut m, std::iter::once(domain)) {
                rebound.insert(id);
                if changed || rebind.always_flush {
                    flush.insert(id);
                }
            }
        });
        if !flush.is_empty() {
            let selects = |part: &Part| flush.contains(&part.message.borrow().id);
            let parts = self.take_waiting_where(selects);
            self.due_now(parts, now_ms);
            // Held parts stay held: the suspension decides when they go.
            for mut part in self.take_ready_where(selects) {
                part.site = None;
                part.egress = None;
                self.due.push(part);
            }
        }
        rebound.into_iter().collect()
    }

    /// Takes the parts of this shard's messages out of the ready queues for which
    /// `take` is true (a response rule's new hold on their tenant or campaign).
    pub fn take_ready_where(&mut self, take: impl Fn(&Part) -> bool) -> Vec<Part> {
        let mut out = Vec::new();
        for q in self.ready.values_mut() {
            if !q.parts.iter().any(&take) {
                continue;
            }
            let (taken, kept): (Vec<Part>, Vec<Part>) =
                std::mem::take(&mut q.parts).into_iter().partition(&take);
            q.parts = kept.into();
            out.extend(taken);
        }
        out
    }

    /// Visits every part of this shard's messages the queues hold (not those handed
    /// to another shard): an operator's scan, never on the delivery path.
    pub fn for_each_part(&self, mut visit: impl FnMut(&Part, &'static str)) {
        for part in self.scheduled.iter() {
            visit(part, "scheduled");
        }
        for part in &self.held {
            visit(part, "held");
        }
        for part in &self.due {
            visit(part, "due");
        }
        for q in self.ready.values() {
            for part in &q.parts {
                visit(part, "ready");
            }
        }
    }

    /// What a bounce of `selector` would take now (a dry run).
    pub fn count_selected(&self, selector: &QueueSelector) -> Tally {
        let mut tally = Tally::default();
        self.for_each_part(|part, _| {
            let m = part.message.borrow();
            if selector.selects(&queue_name(&m, &part.domain)) {
                drop(m);
                tally.add(part);
            }
        });
        tally
    }

    /// The shard's scheduled and ready queues. `detail` adds each scheduled queue's
    /// oldest message and next due time, found by a scan of the scheduled parts.
    pub fn listing(&self, now_ms: u64, detail: bool) -> Listing {
        let mut scheduled: Vec<ScheduledInfo> = (self.counts.by_queue.values())
            .map(|c| ScheduledInfo {
                name: c.name.clone(),
                waiting: c.waiting,
                held: c.held,
                oldest_ms: None,
                next_due_ms: None,
            })
            .collect();
        scheduled.sort_by(|a, b| a.name.cmp(&b.name));
        if detail {
            let mut found: HashMap<u64, (u64, u64)> = HashMap::new();
            let mut note = |part: &Part, due: u64| {
                let m = part.message.borrow();
                let hash = queue_hash(&queue_name(&m, &part.domain));
                let entry = found.entry(hash).or_insert((u64::MAX, u64::MAX));
                entry.0 = entry.0.min(m.received_ms);
                entry.1 = entry.1.min(due);
            };
            for part in self.scheduled.iter() {
                note(part, part.due_ms);
            }
            for part in &self.held {
                note(part, now_ms);
            }
            let by_name: HashMap<&str, (u64, u64)> = (self.counts.by_queue.iter())
                .filter_map(|(hash, c)| Some((c.name.as_str(), *found.get(hash)?)))
                .collect();
            for info in &mut scheduled {
                if let Some((oldest, due)) = by_name.get(info.name.as_str()) {
                    info.oldest_ms = Some(*oldest);
                    info.next_due_ms = Some(*due);
                }
            }
        }
        let mut ready: Vec<ReadyInfo> = (self.ready.iter())
            .map(|(key, q)| self.ready_info(key, q, now_ms))
            .collect();
        ready.sort_by(|a, b| a.name.cmp(&b.name));
        Listing {
            scheduled,
            ready,
            due: self.due.len(),
        }
    }

    fn ready_info(&self, key: &str, q: &ReadyQueue, now_ms: u64) -> ReadyInfo {
        let rules = &self.shaping.rules;
        let rule_name = |r: u16| rules.get(r).map_or_else(String::new, |r| r.name.clone());
        let rules_in_force = (q.adaptive.in_force().iter())
            .filter(|(_, until)| *until > now_ms)
            .map(|(r, until)| RuleInForce {
                rule: rule_name(*r),
                until_ms: *until,
                actions: rules.get(*r).map(|r| r.actions()).unwrap_or_default(),
            })
            .collect();
        let (suspended_until_ms, suspended_by) = match self.ready_suspension(key, now_ms) {
            Some(s) => (
                Some(s.expires_unix_ms),
                Some(format!("admin suspension {}: {}", s.id, s.reason)),
            ),
            None => {
                let by_rule = (q.adaptive.in_force().iter())
                    .filter(|(r, until)| {
                        *until > now_ms && rules.get(*r).is_some_and(|x| x.has(ActionName::Suspend))
                    })
                    .max_by_key(|(_, until)| *until);
                match by_rule {
                    Some((r, until)) => (
                        Some(*until),
                        Some(format!("response rule {}", rule_name(*r))),
                    ),
                    None => (None, None),
                }
            }
        };
        ReadyInfo {
            name: key.to_string(),
            source: q.egress.name.clone(),
            site: q.site.name.clone(),
            parts: q.parts.len(),
            remote: q.remote.len(),
            connections: q.connections,
            effective: Limits::from(&q.shaping),
            configured: Limits::from(&q.configured),
            suspended_until_ms,
            suspended_by,
            rules_in_force,
            backoff_limit: q.feedback.limit,
            connect_failures: q.health.failures,
            connect_retry_at_ms: q.health.backing_off(now_ms).then_some(q.health.retry_at_ms),
            cluster: q.connection_share().map(|(claimed, down)| {
                let tokens =
                    |t: &crate::shaping::Throttle| t.lease_state().map_or((None, 0), |s| s);
                let (message_down, message_tokens) = tokens(&q.messages);
                let (connection_down, connection_tokens) = tokens(&q.connects);
                ClusterShare {
                    connections_claimed: claimed,
                    message_tokens,
                    connection_tokens,
                    fallback: down.or(message_down).or(connection_down),
                }
            }),
            limits: q.groups(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;
    use std::sync::Arc;

    use super::*;
    use crate::id::MessageId;
    use crate::queue::{Message, Routes, split};
    use crate::shaping::ShapingTable;

    fn message(
        received_ms: u64,
        tenant: Option<&str>,
        recipients: &[&str],
    ) -> Rc<RefCell<Message>> {
        Rc::new(RefCell::new(Message {
            id: MessageId {
                hi: received_ms,
                lo: 1,
            },
            sender: "s@b.test".into(),
            recipients: recipients.iter().map(|r| r.to_string()).collect(),
            meta: tenant
                .map(|t| vec![("tenant".into(), t.into())])
                .unwrap_or_default(),
            queue: String::new(),
            received_ms,
            size: 10,
            attempts: 0,
            done: vec![],
            open_parts: 0,
            due_by_domain: Vec::new(),
        }))
    }

    fn counts(q: &Queues) -> Vec<(String, usize, usize)> {
        let listing = q.listing(0, false);
        (listing.scheduled.into_iter())
            .map(|s| (s.name, s.waiting, s.held))
            .collect()
    }

    fn selector(domain: &str) -> QueueSelector {
        QueueSelector {
            domain: Some(domain.into()),
            ..QueueSelector::default()
        }
    }

    /// The counts a listing shows follow every way a part enters or leaves the
    /// scheduled queue, and a detailed listing finds the oldest and next due.
    #[test]
    fn scheduled_counts_follow_the_parts() {
        let mut q = Queues::new(10, Arc::new(ShapingTable::new(&Default::default())));
        let a = message(1, Some("acme"), &["x@a.test", "y@b.test"]);
        let b = message(2, None, &["z@a.test"]);
        for (m, due) in [(&a, 100), (&b, 200)] {
            for mut part in split(m, 0) {
                part.due_ms = due;
                q.schedule(part);
            }
        }
        // Due at once: not counted as scheduled.
        q.schedule(split(&message(3, None, &["n@a.test"]), 0).remove(0));
        assert_eq!(
            counts(&q),
            [
                ("a.test".to_string(), 1, 0),
                ("acme@a.test".to_string(), 1, 0),
                ("acme@b.test".to_string(), 1, 0)
            ]
        );
        let detailed = q.listing(0, true);
        let acme = &detailed.scheduled[1];
        assert_eq!((acme.oldest_ms, acme.next_due_ms), (Some(1), Some(100)));
        assert_eq!(detailed.due, 1);

        q.promote(150);
        assert_eq!(counts(&q), [("a.test".to_string(), 1, 0)]);
        let due: Vec<Part> = std::mem::take(&mut q.due);
        for part in due {
            q.hold(part);
        }
        assert_eq!(q.listing(0, false).scheduled.len(), 3);
        assert_eq!(q.retry_now(&QueueSelector::default(), 150), 1);
        // The part due at once (a.test) was held with acme's two; the retry made
        // a.test's waiting part due.
        assert_eq!(
            counts(&q),
            [
                ("a.test".to_string(), 0, 1),
                ("acme@a.test".to_string(), 0, 1),
                ("acme@b.test".to_string(), 0, 1)
            ]
        );
        q.set_suspensions(Vec::new(), 150);
        assert!(counts(&q).is_empty(), "released: {:?}", counts(&q));
    }

    /// A bounce takes the selected parts from everywhere the shard keeps them; a dry
    /// run counts the same parts and takes nothing.
    #[test]
    fn bounces_take_the_selected_parts_and_dry_runs_count_them() {
        let mut q = Queues::new(10, Arc::new(ShapingTable::new(&Default::default())));
        let mut routes = std::collections::BTreeMap::new();
        routes.insert(
            "*".to_string(),
            crate::config::Route::to_hosts(vec![crate::config::Listen(
                "127.0.0.1:25".parse().unwrap(),
            )]),
        );
        let routes = Routes::new(&routes);
        let m = message(1, None, &["x@a.test", "y@a.test", "z@b.test"]);
        let mut parts = split(&m, 0);
        let mut ready = parts.remove(0);
        ready.site = routes.site(&ready.domain);
        q.push_ready(ready).unwrap();
        let mut waiting = parts.remove(0);
        waiting.due_ms = 500;
        q.schedule(waiting);
        let other = split(&message(2, None, &["w@a.test"]), 0).remove(0);
        let mut held = other;
        held.due_ms = 600;
        q.hold(held);

        let dry = q.count_selected(&selector("a.test"));
        assert_eq!((dry.total(), dry.recipients), (2, 3));
        assert_eq!(dry.parts.get("a.test"), Some(&2));
        assert_eq!(q.count_selected(&QueueSelector::default()).total(), 3);

        let taken = q.take_selected(&selector("A.test"));
        assert_eq!(taken.len(), 2);
        assert!(taken.iter().all(|p| &*p.domain == "a.test"));
        assert_eq!(q.ready_len(), 0);
        assert_eq!(counts(&q), [("b.test".to_string(), 1, 0)]);

        let bounce = AdminBounce {
            id: "b".into(),
            queues: selector("b.test"),
            reason: "r".into(),
            expires_unix_ms: 1000,
            suppress_logging: false,
        };
        q.set_admin_bounces(vec![bounce]);
        q.promote(500);
        let part = q.due.pop().unwrap();
        assert!(q.admin_bounce(&part, 999).is_some());
        assert!(q.admin_bounce(&part, 1000).is_none(), "expired");
    }

    /// A rebind sets the pool of the messages it selects that were received before
    /// it, and makes their parts due now to be placed again.
    #[test]
    fn a_rebind_moves_older_messages_to_another_pool() {
        let mut q = Queues::new(10, Arc::new(ShapingTable::new(&Default::default())));
        let mut routes = std::collections::BTreeMap::new();
        routes.insert(
            "*".to_string(),
            crate::config::Route::to_hosts(vec![crate::config::Listen(
                "127.0.0.1:25".parse().unwrap(),
            )]),
        );
        let routes = Routes::new(&routes);
        let old = message(1, Some("acme"), &["x@a.test"]);
        let young = message(500, Some("acme"), &["y@a.test"]);
        let other = message(2, Some("zeta"), &["z@a.test"]);
        let mut waiting = split(&old, 0).remove(0);
        waiting.due_ms = 900;
        q.schedule(waiting);
        let mut ready = split(&young, 0).remove(0);
        ready.site = routes.site(&ready.domain);
        q.push_ready(ready).unwrap();
        let mut z = split(&other, 0).remove(0);
        z.due_ms = 900;
        q.schedule(z);
        let rebind = Rebind {
            id: "r".into(),
            queues: QueueSelector {
                tenant: Some("acme".into()),
                ..QueueSelector::default()
            },
            pool: "warm".into(),
            reason: "move".into(),
            created_unix_ms: 100,
            always_flush: false,
            suppress_logging: false,
            expires_unix_ms: 10_000,
        };
        let rebound = q.rebind(&rebind, 50);
        assert_eq!(rebound, [old.borrow().id]);
        assert_eq!(old.borrow().meta("pool"), Some("warm"));
        assert_eq!(
            young.borrow().meta("pool"),
            None,
            "received after the rebind"
        );
        assert_eq!(other.borrow().meta("pool"), None, "another tenant");
        assert_eq!(q.due.len(), 1, "its part is due now");
        assert_eq!(q.due[0].due_ms, 50);
        assert_eq!(counts(&q), [("zeta@a.test".to_string(), 1, 0)]);
        // Again: rebound, but its pool is the same: nothing moves.
        assert_eq!(q.rebind(&rebind, 60), [old.borrow().id]);
        assert_eq!((q.due.len(), q.due[0].due_ms), (1, 50));
    }

    /// An operator's suspension of a ready queue holds its connections until it is
    /// lifted; the listing says so, and shows effective and configured limits.
    #[test]
    fn a_ready_queue_suspension_holds_connections_until_lifted() {
        let mut q = Queues::new(0, Arc::new(ShapingTable::new(&Default::default())));
        let mut routes = std::collections::BTreeMap::new();
        routes.insert(
            "*".to_string(),
            crate::config::Route::to_hosts(vec![crate::config::Listen(
                "127.0.0.1:25".parse().unwrap(),
            )]),
        );
        let routes = Routes::new(&routes);
        let mut part = split(&message(1, None, &["x@a.test"]), 0).remove(0);
        part.site = routes.site(&part.domain);
        q.push_ready(part).unwrap();
        let key = q.ready.keys().next().unwrap().clone();
        assert_eq!(ready_queue_name(&format!("{key}@smtp_client")), key);
        q.set_ready_suspensions(vec![ReadySuspension {
            id: "s1".into(),
            name: key.clone(),
            reason: "block".into(),
            expires_unix_ms: 1000,
        }]);
        let mut out = Vec::new();
        assert_eq!(q.open_connections(10, &mut out), Some(1000));
        assert!(out.is_empty());
        let listing = q.listing(10, false);
        let info = &listing.ready[0];
        assert_eq!(info.suspended_until_ms, Some(1000));
        assert_eq!(
            info.suspended_by.as_deref(),
            Some("admin suspension s1: block")
        );
        assert_eq!(info.effective, info.configured);
        assert_eq!(info.parts, 1);
        q.set_ready_suspensions(Vec::new());
        assert_eq!(q.open_connections(20, &mut out), None);
        assert_eq!(out, [key]);
    }
}
