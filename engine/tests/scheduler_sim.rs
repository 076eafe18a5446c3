//! A deterministic simulation of the scheduler: the engine's own queue code (the
//! timer wheel, ready queues, connection health, the verdict and retry decisions of
//! `queue::settle`, `ClientError::response`) and the real spool on the simulated disk,
//! driven by a seeded random number generator in virtual time, against simulated
//! remote sites that accept, defer (4xx), bounce (5xx), refuse the session with a 554
//! banner, refuse the connection, or drop it mid-transaction — and against crashes of
//! the process that lose every spool write not yet synced.
//!
//! Invariants, checked for every seed:
//! - no acknowledged message is lost: after every crash each acknowledged message
//!   with an unfinished recipient is recovered, and in the end every acknowledged
//!   recipient reaches a final verdict (delivered, bounced or expired);
//! - nothing is bounced by a connection-level failure: every bounce answers a 5xx to
//!   the recipient's own transaction;
//! - the retry schedule is respected: no part is tried before it is due — across
//!   crashes too — and each retry is due no earlier than the schedule says.
//!
//! A failure names its seed; `SIM_SEED=<seed> cargo test --test scheduler_sim` replays
//! it alone, step by step the same.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;

use gannet_core::queue::health::AfterFailure;
use gannet_core::queue::settle::{self, After, RetryPolicy, Verdict};
use gannet_core::queue::{self, Egress, Message, Part, Queues, Site};
use gannet_core::shaping::ShapingTable;
use gannet_engine::delivery::client::{ClientError, Response};
use gannet_spool::{
    CrashMode, MessageId, MessageRecord, SimStorage, Spool, SpoolConfig, UpdateRecord,
};

const SEEDS: u64 = 1500;
const STEPS: usize = 120;
const SITES: usize = 3;
const DOMAINS: usize = 6;
const POLICY: RetryPolicy = RetryPolicy {
    interval_s: 60,
    max_interval_s: 1800,
    max_age_ms: 8 * 3600 * 1000,
};

/// How a simulated site behaves for a while.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Mostly accepts; some recipients get 4xx or 5xx.
    Healthy,
    /// Greets with 554 5.7.1 (a blocklisting).
    Blocked,
    /// Refuses TCP connections.
    Down,
    /// Drops connections in the middle of transactions.
    Flaky,
    /// Accepts everything (the end of each run).
    Perfect,
}

/// Where each recipient's final verdict came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Transaction(u16),
    Connection,
}

struct Sim {
    seed: u64,
    rng: fastrand::Rng,
    now: u64,
    storage: SimStorage,
    spool: Spool<SimStorage>,
    queues: Queues,
    sites: Vec<Rc<Site>>,
    modes: Vec<Mode>,
    egress: Rc<Egress>,
    /// Acknowledged messages: their recipients.
    acked: BTreeMap<MessageId, Vec<String>>,
    /// Final verdicts per (message, recipient), with where they came from.
    finals: BTreeMap<(MessageId, u32), (Verdict, Source)>,
    /// Messages whose tombstone was appended (possibly lost in a crash).
    finished: BTreeMap<MessageId, ()>,
    /// The earliest a part (message, domain) may be tried again, as its last retry
    /// scheduled it: kept across a clean crash (every write synced), forgotten at a
    /// torn one (unsynced retry state may be lost: the part is retried from its last
    /// durable state, which is allowed).
    not_before: BTreeMap<(MessageId, std::rc::Rc<str>), u64>,
    crashes: u32,
    attempts: u64,
}

fn spool_config() -> SpoolConfig {
    SpoolConfig {
        segment_bytes: 16 << 10,
        ..SpoolConfig::for_shard(0)
    }
}

impl Sim {
    fn fail(&self, what: String) -> ! {
        panic!(
            "seed {}: {what} (replay: SIM_SEED={} cargo test --test scheduler_sim)",
            self.seed, self.seed
        )
    }

    fn site_of(&self, domain: &str) -> Rc<Site> {
        let n: usize = domain
            .trim_start_matches('d')
            .split('.')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        self.sites[n % SITES].clone()
    }

    /// A message accepted the way the SMTP server accepts one: acknowledged only
    /// once the spool says it is durable.
    async fn inject(&mut self) {
        let recipients: Vec<String> = (0..self.rng.usize(1..=3))
            .map(|i| format!("r{i}@d{}.test", self.rng.usize(0..DOMAINS)))
            .collect();
        let record = MessageRecord {
            id: self.spool.next_id(),
            sender: "s@b.test".into(),
            recipients: recipients.clone(),
            meta: Vec::new(),
            queue: "q".into(),
            attempts: 0,
            due_unix_ms: self.now,
            received_unix_ms: self.now,
            done: Vec::new(),
            body: b"Subject: sim\r\n\r\nbody\r\n".to_vec(),
        };
        let ticket = self.spool.append_message(&record).unwrap();
        self.spool.durable(ticket).await.unwrap();
        self.acked.insert(record.id, recipients);
        let due = record.due_unix_ms;
        let message = gannet_engine::delivery::queued_message(record);
        self.enqueue(message, due);
    }

    fn enqueue(&mut self, message: Message, due: u64) {
        let message = Rc::new(RefCell::new(message));
        let parts = queue::split(&message, due);
        if parts.is_empty() {
            self.tombstone(message.borrow().id);
        }
        for part in parts {
            self.queues.schedule(part);
        }
    }

    fn tombstone(&mut self, id: MessageId) {
        // Not awaited, as the dispatcher does: a crash may lose it.
        let _ = self.spool.append_tombstone(id);
        self.finished.insert(id, ());
    }

    fn persist(&mut self, m: &Message) {
        let update = UpdateRecord {
            id: m.id,
            attempts: m.attempts,
            due_unix_ms: m.persisted_due_ms(self.now),
            queue: m.queue.clone(),
            done: m.done.clone(),
        };
        let _ = self.spool.append_update(&update);
    }

    /// Settles one part with one reply per recipient, as the dispatcher does.
    fn settle(&mut self, mut part: Part, replies: &[Response], source: Source) {
        if part.due_ms > self.now {
            self.fail(format!(
                "a part due at {} was tried at {}",
                part.due_ms, self.now
            ));
        }
        let message = part.message.clone();
        let mut m = message.borrow_mut();
        let key = (m.id, part.domain.clone());
        if let Some(at) = self
            .not_before
            .get(&key)
            .copied()
            .filter(|at| *at > self.now)
        {
            self.fail(format!(
                "{} of {} tried at {}, before its retry time {at}",
                key.1, key.0, self.now
            ));
        }
        let expired = settle::expired(&m, self.now, POLICY.max_age_ms);
        let mut verdicts = Vec::new();
        for (k, i) in part.rcpts.iter().enumerate() {
            let reply = &replies[k.min(replies.len() - 1)];
            let verdict = settle::verdict(reply.code, expired);
            let source = match source {
                Source::Connection => Source::Connection,
                Source::Transaction(_) => Source::Transaction(reply.code),
            };
            if verdict == Verdict::Bounce && source == Source::Connection {
                self.fail(format!("a connection-level failure bounced {reply}"));
            }
            if verdict.is_final() {
                self.finals.insert((m.id, *i), (verdict, source));
            }
            verdicts.push((*i, verdict));
        }
        let attempts_before = part.attempts;
        let jitter = self.rng.u64(0..=1000);
        let after = settle::apply(&mut m, &mut part, &verdicts, self.now, &POLICY, jitter);
        if after == After::Retry {
            self.not_before.insert(key, part.due_ms);
        } else {
            self.not_before.remove(&key);
        }
        match after {
            After::MessageDone => {
                let id = m.id;
                drop(m);
                self.tombstone(id);
            }
            After::PartDone => self.persist(&m),
            After::Retry => {
                let doublings = attempts_before.min(32);
                let base = (POLICY.interval_s << doublings).min(POLICY.max_interval_s) * 1000;
                if part.due_ms < self.now + base || part.due_ms > self.now + base + base / 10 {
                    self.fail(format!(
                        "retry {} due at +{} ms, the schedule says +{base} ms (+10% jitter)",
                        part.attempts,
                        part.due_ms - self.now
                    ));
                }
                self.persist(&m);
                drop(m);
                self.queues.schedule(part);
            }
        }
    }

    /// One connection to a ready queue's site.
    fn connect(&mut self, key: &str) {
        let Some(q) = self.queues.ready.get(key) else {
            return;
        };
        let site = q.site.clone();
        let site_index = self.sites.iter().position(|s| s.name == site.name).unwrap();
        let mode = self.modes[site_index];
        let addr = site.hosts[0];
        let failure = match mode {
            Mode::Down => Some(ClientError::Connect {
                addr,
                source: std::io::ErrorKind::ConnectionRefused.into(),
            }),
            Mode::Blocked => Some(ClientError::Refused {
                phase: "banner",
                response: Response::local(554, "5.7.1 blocked: your address is listed"),
            }),
            _ => None,
        };
        self.attempts += 1;
        if let Some(err) = failure {
            let response = err.response();
            if response.code >= 500 || response.code < 400 {
                self.fail(format!("a connection failure became {response}"));
            }
            let q = self.queues.ready.get_mut(key).unwrap();
            let shaping = q.shaping;
            let after = q.health.failed(
                self.now,
                shaping.connection_failures_max,
                shaping.connection_backoff_max,
            );
            while let Some(part) = self
                .queues
                .ready
                .get_mut(key)
                .and_then(|q| q.parts.pop_front())
            {
                self.settle(part, std::slice::from_ref(&response), Source::Connection);
                if after == AfterFailure::DeferOne {
                    break;
                }
            }
            return;
        }
        self.queues.ready.get_mut(key).unwrap().health.succeeded();
        for _ in 0..self.rng.usize(1..=4) {
            let Some(part) = self
                .queues
                .ready
                .get_mut(key)
                .and_then(|q| q.parts.pop_front())
            else {
                break;
            };
            if mode == Mode::Flaky && self.rng.u8(0..3) == 0 {
                // Dropped mid-transaction: every recipient of the part gets the
                // connection's failure, and the connection is gone.
                let err = ClientError::Io {
                    phase: "DATA",
                    source: std::io::ErrorKind::ConnectionReset.into(),
                };
                self.settle(part, &[err.response()], Source::Connection);
                return;
            }
            let replies: Vec<Response> = part
                .rcpts
                .iter()
                .map(|_| match (mode, self.rng.u8(0..10)) {
                    (Mode::Perfect, _) | (_, 0..=6) => Response::local(250, "2.0.0 ok"),
                    (_, 7 | 8) => Response::local(451, "4.2.0 try later"),
                    _ => Response::local(550, "5.1.1 no such user"),
                })
                .collect();
            self.settle(part, &replies, Source::Transaction(0));
        }
    }

    /// One round of the maintainer: due parts to their ready queues, connections
    /// within each listed queue's shaping and health.
    fn round(&mut self) {
        self.queues.promote(self.now);
        for mut part in std::mem::take(&mut self.queues.due) {
            part.site = Some(self.site_of(&part.domain));
            part.egress = Some(self.egress.clone());
            if let Err(mut part) = self.queues.push_ready(part) {
                part.due_ms = self.now + 1000;
                self.queues.schedule(part);
            }
        }
        // The engine's own choice of connections (Queues::open_connections); each
        // simulated connection is over at once, and ends as the engine's do.
        let mut opened = Vec::new();
        self.queues.open_connections(self.now, &mut opened);
        for key in opened {
            self.connect(&key);
            self.queues.connection_ended(&key);
        }
    }

    /// The process dies: every spool write not yet synced may be lost. The queues are
    /// rebuilt from what the spool recovers, as at start-up.
    async fn crash(&mut self) {
        self.crashes += 1;
        if self.rng.bool() {
            // Killed once every write was synced: the retry state is exact.
            self.spool.close().await;
            self.storage = self.storage.crash(CrashMode::Clean);
        } else {
            self.storage = self.storage.crash(CrashMode::Torn);
            self.not_before.clear();
        }
        let (spool, recovered) = Spool::open(self.storage.clone(), spool_config()).unwrap();
        glommio::spawn_local(spool.clone().run_committer()).detach();
        self.spool = spool;
        let live: BTreeMap<MessageId, _> = recovered.live.iter().map(|l| (l.id, l)).collect();
        for (id, recipients) in &self.acked {
            let open = (0..recipients.len() as u32).any(|i| !self.finals.contains_key(&(*id, i)));
            if open && !live.contains_key(id) {
                self.fail(format!(
                    "acknowledged message {id} lost in crash {}",
                    self.crashes
                ));
            }
        }
        self.queues = Queues::new(self.now, Arc::new(ShapingTable::new(&Default::default())));
        for l in recovered.live {
            let m = l.message.get();
            let message = Message {
                id: l.id,
                sender: m.sender.to_string(),
                recipients: m.recipients.iter().map(|r| r.to_string()).collect(),
                meta: Vec::new(),
                queue: l.state.queue.clone(),
                received_ms: m.received_unix_ms.to_native(),
                size: m.body.len(),
                attempts: l.state.attempts,
                done: l.state.done.clone(),
                open_parts: 0,
                due_by_domain: Vec::new(),
            };
            // Recovered parts must not come due before their persisted schedule.
            self.enqueue(message, l.state.due_unix_ms);
        }
    }
}

async fn run_seed(seed: u64) -> (u32, u64, usize) {
    let storage = SimStorage::new(seed);
    let (spool, _) = Spool::open(storage.clone(), spool_config()).unwrap();
    glommio::spawn_local(spool.clone().run_committer()).detach();
    let now = 1_700_000_000_000;
    let sites = (0..SITES)
        .map(|i| {
            let host: std::net::SocketAddr = format!("127.0.0.{}:25", i + 1).parse().unwrap();
            Rc::new(Site {
                name: format!("mx{i}.sim"),
                hosts: vec![host],
                host_names: vec![format!("mx{i}.sim")],
                tls: Default::default(),
                auth: None,
            })
        })
        .collect();
    let mut sim = Sim {
        seed,
        rng: fastrand::Rng::with_seed(seed),
        now,
        storage,
        spool,
        queues: Queues::new(now, Arc::new(ShapingTable::new(&Default::default()))),
        sites,
        modes: vec![Mode::Healthy; SITES],
        egress: Rc::new(Egress::default_source()),
        acked: BTreeMap::new(),
        finals: BTreeMap::new(),
        finished: BTreeMap::new(),
        not_before: BTreeMap::new(),
        crashes: 0,
        attempts: 0,
    };
    for _ in 0..STEPS {
        if sim.rng.u8(0..4) != 0 {
            for _ in 0..sim.rng.usize(1..=3) {
                sim.inject().await;
            }
        }
        if sim.rng.u8(0..8) == 0 {
            let site = sim.rng.usize(0..SITES);
            sim.modes[site] = match sim.rng.u8(0..5) {
                0 => Mode::Blocked,
                1 => Mode::Down,
                2 => Mode::Flaky,
                _ => Mode::Healthy,
            };
        }
        sim.round();
        if sim.rng.u8(0..25) == 0 {
            sim.crash().await;
        }
        // Time passes: a little, or up to the next due part.
        let step = match sim.queues.next_due() {
            Some(due) if sim.rng.bool() => due.saturating_sub(sim.now).max(1),
            _ => sim.rng.u64(1..5_000),
        };
        sim.now += step;
        // Let the committer sync what was appended.
        glommio::yield_if_needed().await;
        if sim.rng.bool() {
            glommio::executor().yield_now().await;
        }
    }
    // Every site accepts from now on: every acknowledged recipient must end.
    sim.modes = vec![Mode::Perfect; SITES];
    for _ in 0..2000 {
        if sim.queues.scheduled_len() + sim.queues.ready_len() == 0 {
            break;
        }
        sim.round();
        sim.now = sim
            .queues
            .next_due()
            .map_or(sim.now + 1000, |due| due.max(sim.now + 1));
        glommio::executor().yield_now().await;
    }
    for (id, recipients) in &sim.acked {
        for i in 0..recipients.len() as u32 {
            match sim.finals.get(&(*id, i)) {
                None => sim.fail(format!("acknowledged recipient {i} of {id} never finished")),
                Some((Verdict::Bounce, Source::Transaction(code))) if *code < 500 => {
                    sim.fail(format!("{id} bounced on a {code}"))
                }
                Some(_) => {}
            }
        }
    }
    (sim.crashes, sim.attempts, sim.acked.len())
}

#[test]
fn the_scheduler_keeps_its_invariants_over_thousands_of_seeds() {
    let seeds: Vec<u64> = match std::env::var("SIM_SEED") {
        Ok(seed) => vec![seed.parse().expect("SIM_SEED is a number")],
        Err(_) => (0..SEEDS).collect(),
    };
    let (crashes, attempts, messages) =
        glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .spin_before_park(std::time::Duration::from_millis(0))
            .make()
            .expect("glommio executor (memlock limit?)")
            .run(async move {
                let mut totals = (0, 0, 0);
                for seed in seeds {
                    let (c, a, m) = run_seed(seed).await;
                    totals = (totals.0 + c, totals.1 + a, totals.2 + m);
                }
                totals
            });
    eprintln!(
        "{messages} messages, {attempts} connections, {crashes} crashes, all invariants held"
    );
    assert!(crashes > 0 && attempts > 0 && messages > 0);
}
