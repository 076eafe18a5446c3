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

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::rc::Rc;

use gannet_spool::MessageId;

/// A message in memory.
#[derive(Debug)]
pub struct Message {
    pub id: MessageId,
    pub sender: String,
    pub recipients: Vec<String>,
    pub meta: Vec<(String, String)>,
    pub queue: String,
    pub received_ms: u64,
    /// Delivery attempts made (the highest of any part).
    pub attempts: u32,
    /// Finished recipients (delivered, bounced or expired), by index.
    pub done: Vec<u32>,
    /// Parts not yet finished; the message is finished when this reaches 0.
    pub open_parts: usize,
}

impl Message {
    pub fn is_done(&self, rcpt: u32) -> bool {
        self.done.contains(&rcpt)
    }

    pub fn meta(&self, key: &str) -> Option<&str> {
        self.meta
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
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
    /// static route): what a certificate must match when TLS is required.
    pub host_names: Vec<String>,
}

/// Where connections come from: an egress source of the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Egress {
    pub name: String,
    pub source_ip: Option<std::net::IpAddr>,
    /// None: the dispatcher's EHLO name.
    pub ehlo_name: Option<String>,
}

impl Egress {
    /// The source every configuration has: no binding, the default EHLO name.
    pub fn default_source() -> Egress {
        Egress {
            name: "default".into(),
            source_ip: None,
            ehlo_name: None,
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
    pub fn new(routes: &BTreeMap<String, Vec<SocketAddr>>) -> Routes {
        let site = |hosts: &Vec<SocketAddr>| {
            let mut names: Vec<String> = hosts.iter().map(ToString::to_string).collect();
            names.sort();
            Rc::new(Site {
                name: names.join(","),
                hosts: hosts.clone(),
                host_names: hosts.iter().map(|h| h.ip().to_string()).collect(),
            })
        };
        let mut out = Routes::default();
        for (domain, hosts) in routes {
            if domain == "*" {
                out.fallback = Some(site(hosts));
            } else {
                out.by_domain
                    .insert(domain.to_ascii_lowercase(), site(hosts));
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
    /// The recipients' domain, lower-case.
    pub domain: String,
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
            domain,
            site: None,
            egress: None,
            rcpts,
            attempts,
            due_ms,
        })
        .collect();
    message.borrow_mut().open_parts = parts.len();
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

/// The scheduled queue (parts waiting for their due time), parts due but not yet
/// resolved to a site, and the ready queues (per site, parts due now). Bounded by
/// memory only for now; `max_ready` and the timer wheel come with the delivery issue.
#[derive(Debug, Default)]
pub struct Queues {
    scheduled: BinaryHeap<Reverse<(u64, u64)>>,
    waiting: HashMap<u64, Part>,
    next_seq: u64,
    /// Due parts whose site is not known yet.
    pub unresolved: Vec<Part>,
    /// Ready queues by name (`egress_source->site_name`).
    pub ready: HashMap<String, ReadyQueue>,
}

/// One site's ready queue and its connections.
#[derive(Debug)]
pub struct ReadyQueue {
    pub site: Rc<Site>,
    pub egress: Rc<Egress>,
    /// Parts of messages this shard spooled.
    pub parts: VecDeque<Part>,
    /// Parts other shards handed to this one, the owner of the site.
    pub remote: VecDeque<crate::mesh::Handoff>,
    pub connections: usize,
}

impl ReadyQueue {
    fn new(site: Rc<Site>, egress: Rc<Egress>) -> ReadyQueue {
        ReadyQueue {
            site,
            egress,
            parts: VecDeque::new(),
            remote: VecDeque::new(),
            connections: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.parts.len() + self.remote.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Queues {
    /// Adds a part: to its site's ready queue when due (or to `unresolved` when its
    /// site is not known yet), else to the scheduled queue.
    pub fn push(&mut self, part: Part, now_ms: u64) {
        if part.due_ms <= now_ms {
            let Some(site) = part.site.clone() else {
                self.unresolved.push(part);
                return;
            };
            let egress = part
                .egress
                .clone()
                .unwrap_or_else(|| Rc::new(Egress::default_source()));
            self.ready
                .entry(ready_key(&egress, &site))
                .or_insert_with(|| ReadyQueue::new(site, egress))
                .parts
                .push_back(part);
        } else {
            let seq = self.next_seq;
            self.next_seq += 1;
            self.scheduled.push(Reverse((part.due_ms, seq)));
            self.waiting.insert(seq, part);
        }
    }

    /// Adds a part handed over by another shard to its site's ready queue.
    pub fn push_remote(
        &mut self,
        site: Rc<Site>,
        egress: Rc<Egress>,
        handoff: crate::mesh::Handoff,
    ) {
        self.ready
            .entry(ready_key(&egress, &site))
            .or_insert_with(|| ReadyQueue::new(site, egress))
            .remote
            .push_back(handoff);
    }

    /// Moves every part due at `now_ms` to its ready queue; returns how many moved.
    pub fn promote(&mut self, now_ms: u64) -> usize {
        let mut moved = 0;
        while let Some(Reverse((due, seq))) = self.scheduled.peek().copied() {
            if due > now_ms {
                break;
            }
            self.scheduled.pop();
            if let Some(part) = self.waiting.remove(&seq) {
                self.push(part, now_ms);
                moved += 1;
            }
        }
        moved
    }

    /// When the earliest scheduled part is due.
    pub fn next_due(&self) -> Option<u64> {
        self.scheduled.peek().map(|Reverse((due, _))| *due)
    }

    pub fn scheduled_len(&self) -> usize {
        self.waiting.len()
    }

    pub fn ready_len(&self) -> usize {
        self.ready.values().map(ReadyQueue::len).sum::<usize>() + self.unresolved.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(recipients: &[&str]) -> Rc<RefCell<Message>> {
        Rc::new(RefCell::new(Message {
            id: MessageId { hi: 1, lo: 1 },
            sender: "s@b.test".into(),
            recipients: recipients.iter().map(|r| r.to_string()).collect(),
            meta: vec![],
            queue: "d.test".into(),
            received_ms: 0,
            attempts: 0,
            done: vec![1],
            open_parts: 0,
        }))
    }

    fn routes() -> Routes {
        let mut map = BTreeMap::new();
        map.insert("a.test".to_string(), vec!["127.0.0.1:25".parse().unwrap()]);
        map.insert("b.test".to_string(), vec!["127.0.0.1:25".parse().unwrap()]);
        map.insert(
            "c.test".to_string(),
            vec![
                "127.0.0.2:25".parse::<SocketAddr>().unwrap(),
                "127.0.0.1:26".parse().unwrap(),
            ],
        );
        Routes::new(&map)
    }

    #[test]
    fn parts_group_recipients_by_domain_and_skip_finished_ones() {
        let m = message(&["x@a.test", "done@a.test", "y@A.TEST", "z@c.test"]);
        let parts = split(&m, 0);
        let summary: Vec<(&str, Vec<u32>)> = parts
            .iter()
            .map(|p| (p.domain.as_str(), p.rcpts.clone()))
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
    fn scheduled_parts_become_ready_when_due() {
        let mut q = Queues::default();
        let m = message(&["x@a.test", "done@a.test", "z@c.test"]);
        let r = routes();
        for (i, mut part) in split(&m, 0).into_iter().enumerate() {
            part.due_ms = 100 * (i as u64 + 1);
            part.site = r.site(&part.domain);
            q.push(part, 50);
        }
        assert_eq!(
            (q.scheduled_len(), q.ready_len(), q.next_due()),
            (2, 0, Some(100))
        );
        assert_eq!(q.promote(150), 1);
        assert_eq!(
            (q.scheduled_len(), q.ready_len(), q.next_due()),
            (1, 1, Some(200))
        );
        assert_eq!(q.promote(1000), 1);
        assert_eq!(
            (q.scheduled_len(), q.ready_len(), q.next_due()),
            (0, 2, None)
        );
    }
}
