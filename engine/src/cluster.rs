//! The cluster link: throttles shared by the gannet nodes that send from the same IP
//! ranges, through one Redis (`[cluster] redis_url`).
//!
//! A throttle's state is a GCRA theoretical arrival time kept in Redis under
//! `gannet:throttle:<name>`, in µs of Redis's own clock (the nodes' clocks do not
//! matter). [`LEASE_SCRIPT`] takes up to the tokens asked for that conform now and
//! moves the time on by as many; [`GIVE_BACK_SCRIPT`] moves it back for tokens a node
//! leased and did not use. A node asks for about its own rate over
//! `lease_window_ms` at a time, so Redis sees a few calls a second per throttle
//! whatever the message rate.
//!
//! One thread per process owns the connection, so a shard never waits on Redis: it
//! sends a request ([`Link::lease`]) and takes the answer when it comes
//! ([`Pending`]). While Redis cannot be reached (connecting, or a call failing or
//! taking longer than `redis_timeout_ms`), the link is down: a lease is answered
//! [`Answer::Down`] with the configured fallback at once, tokens given back are
//! dropped (their time passes anyway), and the thread connects again at most once a
//! second. Each change of state is logged and counted. Every second the link also
//! notes its node in a set of live nodes (`gannet:nodes`, scored by Redis's clock)
//! and counts them: a node not heard from for [`NODE_TTL`] is forgotten, one that
//! stops leaves at once; the count is what a throttle falling back open shares its
//! limit by.
//!
//! Every script touches one key, so the same scripts run on one Redis or on a Redis
//! Cluster (`redis_cluster = true`: the client finds the nodes from `redis_url` and
//! routes each call by its key; the shared limits spread over the slots).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use gannet_core::config::shaping::Rate;
use gannet_core::config::{ClusterConfig, Fallback};
pub use gannet_core::lease::Answer;
use gannet_core::lease::{Asked, TokenSource};

/// A Redis script that starts with `now`, Redis's clock in µs (the nodes' clocks
/// never enter a throttle).
macro_rules! redis_script {
    ($body:literal) => {
        concat!(
            "local clock = redis.call('TIME')\n",
            "local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])",
            $body
        )
    };
}

/// Takes up to `ARGV[3]` tokens of throttle `KEYS[1]` (emission interval `ARGV[1]`
/// µs, tolerance `ARGV[2]` µs: a burst of the whole count, as the local throttle
/// allows) that conform now; answers the tokens taken and the µs until the next
/// conforms. The time is kept as an integer string (Lua 5.1 would print a double of
/// this size with an exponent), expiring once it is in the past.
pub const LEASE_SCRIPT: &str = redis_script!(
    r#"
local emission = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local wanted = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local room = 0
if tat - now <= tolerance then
  room = math.floor((now + tolerance - tat) / emission) + 1
end
local granted = math.min(wanted, room)
if granted > 0 then
  tat = tat + granted * emission
  redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
end
local wait = tat - tolerance - now
if wait < 0 then wait = 0 end
return { granted, wait }
"#
);

/// Gives `ARGV[2]` unused tokens of throttle `KEYS[1]` (emission interval `ARGV[1]`
/// µs) back: the time moves back by as many intervals, never before now.
pub const GIVE_BACK_SCRIPT: &str = redis_script!(
    r#"
local tat = tonumber(redis.call('GET', KEYS[1]))
if not tat then return 0 end
tat = tat - tonumber(ARGV[1]) * tonumber(ARGV[2])
if tat <= now then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
end
return 1
"#
);

/// Claims connections of the limit `ARGV[3]` shared under `KEYS[1]` (a hash:
/// claimant → `held:wanted:when`) for claimant `ARGV[1]` (a node, or one shard of a
/// node as `node#shard`), which wants `ARGV[2]` and has `ARGV[4]` open: it may have
/// what the other claimants heard from within `ARGV[5]` µs do not hold, and while
/// another waits for more than it holds, no more than an even share (or what it
/// has open) — as `gannet_core::lease::claim_share`. A claim not renewed within
/// that time (its node died; claims holding or wanting connections are renewed
/// each second) is dropped. Records the claimant's holding (what it may have, or
/// has open if more) and answers `{allowed, 1 if another waits else 0}`; a claim
/// of none removes the claimant. One key only, so that it runs on a Redis Cluster.
pub const CLAIM_SCRIPT: &str = redis_script!(
    r#"
local node = ARGV[1]
local wanted = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local open = tonumber(ARGV[4])
local ttl = tonumber(ARGV[5])
local others, wanting, starved = 0, 1, false
local entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  local other = entries[i]
  if other ~= node then
    local held, wants, seen = string.match(entries[i + 1], '^(%d+):(%d+):(%d+)$')
    if seen and tonumber(seen) >= now - ttl then
      held, wants = tonumber(held), tonumber(wants)
      others = others + held
      wanting = wanting + 1
      if wants > held then starved = true end
    else
      redis.call('HDEL', KEYS[1], other)
    end
  end
end
local allowed = math.max(0, math.min(wanted, limit - others))
if starved then
  allowed = math.min(allowed, math.max(math.ceil(limit / wanting), open))
end
if wanted == 0 and open == 0 then
  redis.call('HDEL', KEYS[1], node)
else
  redis.call('HSET', KEYS[1], node, math.max(allowed, open) .. ':' .. wanted .. ':' .. string.format('%.0f', now))
  redis.call('PEXPIRE', KEYS[1], math.ceil(ttl / 1000) * 4)
end
return { allowed, starved and 1 or 0 }
"#
);

/// Notes this node in the set of live nodes `KEYS[1]` (a sorted set scored by
/// Redis's clock, µs) as `ARGV[1]`, forgets the nodes not heard from for `ARGV[2]`
/// µs, and answers those left (this one included), in name order.
pub const HEARTBEAT_SCRIPT: &str = redis_script!(
    r#"
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], string.format('%.0f', now), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now - ttl))
redis.call('PEXPIRE', KEYS[1], math.ceil(ttl / 1000) * 2)
local nodes = redis.call('ZRANGE', KEYS[1], 0, -1)
table.sort(nodes)
return nodes
"#
);

/// The set of live nodes.
const NODES_KEY: &str = "gannet:nodes";

/// The operator's verbs in force across the cluster: a hash of `kind:id` → the
/// item's JSON (suspensions, ready-queue suspensions, bounces), kept in step by
/// every node (`admin::cluster`).
const ADMIN_KEY: &str = "gannet:admin";

/// How often a link that is down tries to connect again, and how often a node
/// tells the others it lives.
const RECONNECT: Duration = Duration::from_secs(1);
const HEARTBEAT: Duration = Duration::from_secs(1);

/// A node not heard from for this long no longer counts (it died: a node that
/// stops cleanly leaves the set at once).
pub const NODE_TTL: Duration = Duration::from_secs(5);

/// A lease asked for, answered later.
#[derive(Debug)]
pub struct Pending(Receiver<Answer>);

impl Pending {
    /// The answer, if it has come.
    pub fn try_take(&self) -> Option<Answer> {
        self.0.try_recv().ok()
    }

    /// The answer, waiting up to `timeout` (for threads that may block).
    pub fn wait(&self, timeout: Duration) -> Option<Answer> {
        self.0.recv_timeout(timeout).ok()
    }
}

impl Asked for Pending {
    fn answer(&mut self) -> Option<Answer> {
        self.try_take()
    }
}

/// A throttle's GCRA parameters in µs (as the local `Throttle`'s).
#[derive(Debug, Clone, Copy)]
struct Gcra {
    emission_us: u64,
    tolerance_us: u64,
}

impl Gcra {
    /// None for an unlimited rate (nothing to share).
    fn of(rate: Rate) -> Option<Gcra> {
        let (emission_us, tolerance_us) = gannet_core::lease::Gcra::params(rate)?;
        Some(Gcra {
            emission_us,
            tolerance_us,
        })
    }
}

enum Job {
    Lease {
        key: String,
        gcra: Gcra,
        wanted: u32,
        reply: Sender<Answer>,
    },
    GiveBack {
        key: String,
        gcra: Gcra,
        tokens: u32,
    },
    Claim {
        key: String,
        /// The shard claiming for itself (a limit over several queues, which each
        /// shard claims on its own), or None for the node.
        shard: Option<usize>,
        limit: u32,
        wanted: u32,
        open: u32,
        reply: Sender<Answer>,
    },
    /// Sets (`Some`) or removes an item of the shared admin hash.
    Admin {
        field: String,
        value: Option<String>,
    },
}

/// The shared admin hash as last read (each heartbeat), and which connection read
/// it: a new connection (Redis restarted, perhaps empty) starts the nodes' syncing
/// afresh.
#[derive(Debug, Clone, Default)]
pub struct AdminItems {
    /// Counts the reads.
    pub read: u64,
    /// Counts the connections made.
    pub connection: u64,
    pub items: Vec<(String, String)>,
}

/// The link's counters, for the metrics.
#[derive(Debug, Default)]
pub struct LinkStats {
    /// Whether Redis answered the last call (or the last connection attempt).
    pub up: AtomicBool,
    pub calls_total: AtomicU64,
    pub failures_total: AtomicU64,
    /// Changes of `up`, the first state noted included (the hose's `cluster`
    /// events follow this count).
    pub state_changes_total: AtomicU64,
    pub tokens_leased_total: AtomicU64,
    pub tokens_returned_total: AtomicU64,
    /// The live nodes last counted (this one included; 1 until Redis answers):
    /// while Redis is down, a throttle that falls back open takes this share.
    pub nodes: AtomicU64,
}

/// The process's link to the shared Redis: a thread and its request channel. The
/// thread ends when the link is dropped.
#[derive(Debug)]
pub struct Link {
    jobs: Sender<Job>,
    stats: Arc<LinkStats>,
    /// The admin hash as last read; None while Redis cannot be reached.
    admin: Arc<std::sync::Mutex<Option<AdminItems>>>,
    /// The live nodes' names as last counted, and this node's.
    members: Arc<std::sync::Mutex<Vec<String>>>,
    node: String,
    fallback: Fallback,
    /// The time a lease is sized to last (`lease_window_ms`).
    window_ms: u64,
}

impl Link {
    /// Starts the link of `config` (its URL set; checked when the file was read) for
    /// the node named `node` (unique among the live nodes: `host:pid`).
    pub fn start(config: &ClusterConfig, node: &str) -> Result<Link, String> {
        let url = config.redis_url.0.as_str();
        let client = if config.redis_cluster {
            let timeout = Duration::from_millis(config.redis_timeout_ms.get());
            Client::Cluster(
                redis::cluster::ClusterClient::builder([url])
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .build()
                    .map_err(|e| format!("cluster.redis_url: {e}"))?,
            )
        } else {
            Client::Single(redis::Client::open(url).map_err(|e| format!("cluster.redis_url: {e}"))?)
        };
        let (jobs, queue) = crossbeam_channel::unbounded();
        let stats = Arc::new(LinkStats::default());
        stats.nodes.store(1, Ordering::Relaxed);
        let admin = Arc::new(std::sync::Mutex::new(None));
        let members = Arc::new(std::sync::Mutex::new(Vec::new()));
        let thread = Thread {
            node: node.to_string(),
            heartbeat: redis::Script::new(HEARTBEAT_SCRIPT),
            next_heartbeat: Instant::now(),
            client,
            timeout: Duration::from_millis(config.redis_timeout_ms.get()),
            fallback: config.fallback,
            stats: stats.clone(),
            lease: redis::Script::new(LEASE_SCRIPT),
            give_back: redis::Script::new(GIVE_BACK_SCRIPT),
            claim: redis::Script::new(CLAIM_SCRIPT),
            connection: None,
            next_attempt: Instant::now(),
            known: false,
            admin: admin.clone(),
            connections: 0,
            reads: 0,
            members: members.clone(),
        };
        std::thread::Builder::new()
            .name("gannet-cluster".into())
            .spawn(move || thread.run(queue))
            .map_err(|e| format!("starting the cluster link's thread: {e}"))?;
        Ok(Link {
            jobs,
            stats,
            admin,
            members,
            node: node.to_string(),
            fallback: config.fallback,
            window_ms: config.lease_window_ms.get(),
        })
    }

    /// Asks for up to `wanted` tokens of the shared throttle `key` at `rate`.
    pub fn lease(&self, key: &str, rate: Rate, wanted: u32) -> Pending {
        let (reply, answer) = crossbeam_channel::bounded(1);
        let Some(gcra) = Gcra::of(rate) else {
            let _ = reply.send(Answer::Granted {
                tokens: wanted,
                wait_ms: 0,
            });
            return Pending(answer);
        };
        self.send_asking(
            Job::Lease {
                key: key.to_string(),
                gcra,
                wanted,
                reply,
            },
            answer,
        )
    }

    /// Sends a job that is answered; a link whose thread has gone answers it
    /// down at once.
    fn send_asking(&self, job: Job, answer: Receiver<Answer>) -> Pending {
        if let Err(failed) = self.jobs.send(job)
            && let Job::Lease { reply, .. } | Job::Claim { reply, .. } = failed.0
        {
            let _ = reply.send(Answer::Down(self.fallback));
        }
        Pending(answer)
    }

    /// Claims `wanted` of the `limit` connections shared under `key` for this node
    /// (or for its shard `shard`), which has `open` open; answered with how many it
    /// may have open.
    pub fn claim(
        &self,
        key: &str,
        shard: Option<usize>,
        limit: u32,
        wanted: u32,
        open: u32,
    ) -> Pending {
        let (reply, answer) = crossbeam_channel::bounded(1);
        let job = Job::Claim {
            key: key.to_string(),
            shard,
            limit,
            wanted,
            open,
            reply,
        };
        self.send_asking(job, answer)
    }

    /// Gives `tokens` leased from `key` at `rate` and not used back.
    pub fn give_back(&self, key: &str, rate: Rate, tokens: u32) {
        if let Some(gcra) = Gcra::of(rate)
            && tokens > 0
        {
            let _ = self.jobs.send(Job::GiveBack {
                key: key.to_string(),
                gcra,
                tokens,
            });
        }
    }

    /// This node's name among the live nodes (`host:pid`).
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The live nodes' names as last counted (this one included), in name order.
    pub fn members(&self) -> Vec<String> {
        self.members
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The shared admin hash as last read (None while Redis cannot be reached).
    pub fn admin_items(&self) -> Option<AdminItems> {
        self.admin.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Sets (`Some`) or removes an item of the shared admin hash.
    pub fn publish(&self, field: &str, value: Option<String>) {
        let _ = self.jobs.send(Job::Admin {
            field: field.to_string(),
            value,
        });
    }

    /// What shared throttles do while Redis cannot be reached.
    pub fn fallback(&self) -> Fallback {
        self.fallback
    }

    pub fn stats(&self) -> &LinkStats {
        &self.stats
    }

    /// The live nodes last counted, this one included (at least 1).
    pub fn nodes(&self) -> u64 {
        self.stats.nodes.load(Ordering::Relaxed).max(1)
    }

    /// The link's Prometheus lines.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let s = &self.stats;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        for (name, kind, help, value) in [
            (
                "cluster_redis_up",
                "gauge",
                "Whether the shared Redis answered the last call (1) or not (0).",
                u64::from(s.up.load(Ordering::Relaxed)),
            ),
            (
                "cluster_redis_calls_total",
                "counter",
                "Calls made to the shared Redis (leases, tokens given back, connection claims, heartbeats, the shared admin verbs).",
                load(&s.calls_total),
            ),
            (
                "cluster_redis_failures_total",
                "counter",
                "Connections and calls to the shared Redis that failed or timed out.",
                load(&s.failures_total),
            ),
            (
                "cluster_redis_state_changes_total",
                "counter",
                "Times the shared Redis became reachable or unreachable.",
                load(&s.state_changes_total),
            ),
            (
                "cluster_nodes",
                "gauge",
                "Live gannet nodes sharing the Redis, this one included (last counted).",
                self.nodes(),
            ),
            (
                "cluster_tokens_leased_total",
                "counter",
                "Tokens of shared throttles leased from Redis.",
                load(&s.tokens_leased_total),
            ),
            (
                "cluster_tokens_returned_total",
                "counter",
                "Leased tokens given back unused.",
                load(&s.tokens_returned_total),
            ),
        ] {
            let _ = writeln!(out, "# HELP gannet_{name} {help}");
            let _ = writeln!(out, "# TYPE gannet_{name} {kind}");
            let _ = writeln!(out, "gannet_{name} {value}");
        }
    }
}

/// A shard's handle on the link: the shared rates of its ready queues lease
/// through it (`Queues::set_token_source`), and with a shard number, its side of
/// the limits over several queues (`Queues::set_group_source`), which every shard
/// of every node claims on its own.
#[derive(Debug, Clone)]
pub struct Tokens {
    link: Arc<Link>,
    /// The shard claiming connections (None: the node, for its ready queues,
    /// which live on one shard each), and how many shards the node has.
    shard: Option<usize>,
    shards: u64,
}

impl Tokens {
    /// For the ready queues' own limits (each queue lives on one shard).
    pub fn node(link: Arc<Link>) -> Tokens {
        Tokens {
            link,
            shard: None,
            shards: 1,
        }
    }

    /// For shard `shard`'s side of the limits over several queues, of `shards`.
    pub fn shard(link: Arc<Link>, shard: usize, shards: usize) -> Tokens {
        Tokens {
            link,
            shard: Some(shard),
            shards: shards.max(1) as u64,
        }
    }
}

impl TokenSource for Tokens {
    fn ask(&self, key: &str, rate: Rate, wanted: u32) -> Box<dyn Asked> {
        // One box per lease (a few a second per throttle, not per message).
        Box::new(self.link.lease(key, rate, wanted))
    }

    fn give_back(&self, key: &str, rate: Rate, tokens: u32) {
        self.link.give_back(key, rate, tokens);
    }

    fn claim(&self, key: &str, limit: u32, wanted: u32, open: u32) -> Box<dyn Asked> {
        Box::new(self.link.claim(key, self.shard, limit, wanted, open))
    }

    /// The shares a limit falls back to: the live nodes, times the shards of each
    /// when every shard keeps its own side.
    fn nodes(&self) -> u64 {
        self.link.nodes().saturating_mul(self.shards)
    }

    fn window_ms(&self) -> u64 {
        self.link.window_ms
    }
}

/// How the link's thread connects: to one Redis, or to a Redis Cluster.
enum Client {
    Single(redis::Client),
    Cluster(redis::cluster::ClusterClient),
}

/// The link's thread: the connection and the scripts.
struct Thread {
    /// This node's name in the set of live nodes.
    node: String,
    heartbeat: redis::Script,
    next_heartbeat: Instant,
    client: Client,
    timeout: Duration,
    fallback: Fallback,
    stats: Arc<LinkStats>,
    lease: redis::Script,
    give_back: redis::Script,
    claim: redis::Script,
    /// A single Redis's connection, or a Redis Cluster's (which routes each call
    /// by its key, and follows the slots when they move).
    connection: Option<Box<dyn redis::ConnectionLike + Send>>,
    /// When a link that is down may try to connect again.
    next_attempt: Instant,
    /// Whether a state has been noted yet.
    known: bool,
    /// Where the admin hash read each heartbeat goes, and the counts it carries.
    admin: Arc<std::sync::Mutex<Option<AdminItems>>>,
    connections: u64,
    reads: u64,
    /// The live nodes' names, as last counted.
    members: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Thread {
    fn run(mut self, queue: Receiver<Job>) {
        self.connect();
        loop {
            let wait = self
                .next_heartbeat
                .saturating_duration_since(Instant::now());
            let job = match queue.recv_timeout(wait.min(RECONNECT)) {
                Ok(job) => Some(job),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            if self.connection.is_none() && Instant::now() >= self.next_attempt {
                self.connect();
            }
            if let Some(job) = job {
                self.serve(job);
            }
            if Instant::now() >= self.next_heartbeat {
                self.beat();
            }
        }
        // Stopping: this node leaves the set at once (best effort; a node that dies
        // is forgotten after NODE_TTL).
        if let Some(connection) = self.connection.as_deref_mut() {
            let _ = redis::cmd("ZREM")
                .arg(NODES_KEY)
                .arg(&self.node)
                .query::<u64>(connection);
        }
    }

    /// Tells the other nodes this one lives, and counts them.
    fn beat(&mut self) {
        self.next_heartbeat = Instant::now() + HEARTBEAT;
        let Some(connection) = self.connection.as_deref_mut() else {
            return;
        };
        self.stats.calls_total.fetch_add(1, Ordering::Relaxed);
        let counted = self
            .heartbeat
            .key(NODES_KEY)
            .arg(&self.node)
            .arg(NODE_TTL.as_micros() as u64)
            .invoke::<Vec<String>>(connection);
        match counted {
            Ok(nodes) => {
                let n = (nodes.len() as u64).max(1);
                self.stats.nodes.store(n, Ordering::Relaxed);
                *self.members.lock().unwrap_or_else(|e| e.into_inner()) = nodes;
            }
            Err(err) => return self.failed(&err),
        }
        self.stats.calls_total.fetch_add(1, Ordering::Relaxed);
        let read = redis::cmd("HGETALL")
            .arg(ADMIN_KEY)
            .query::<Vec<(String, String)>>(connection);
        match read {
            Ok(items) => {
                self.reads += 1;
                *self.admin.lock().unwrap_or_else(|e| e.into_inner()) = Some(AdminItems {
                    read: self.reads,
                    connection: self.connections,
                    items,
                });
            }
            Err(err) => self.failed(&err),
        }
    }

    fn connect(&mut self) {
        let connected =
            match &self.client {
                Client::Single(client) => client
                    .get_connection_with_timeout(self.timeout)
                    .and_then(|c| {
                        c.set_read_timeout(Some(self.timeout))?;
                        c.set_write_timeout(Some(self.timeout))?;
                        Ok(Box::new(c) as Box<dyn redis::ConnectionLike + Send>)
                    }),
                Client::Cluster(client) => client
                    .get_connection()
                    .map(|c| Box::new(c) as Box<dyn redis::ConnectionLike + Send>),
            };
        match connected {
            Ok(c) => {
                self.connection = Some(c);
                self.connections += 1;
                self.state(true, "connected");
            }
            Err(err) => {
                self.stats.failures_total.fetch_add(1, Ordering::Relaxed);
                self.next_attempt = Instant::now() + RECONNECT;
                self.state(false, &err.to_string());
            }
        }
    }

    /// Notes whether Redis is reachable; a change is logged and counted.
    fn state(&mut self, up: bool, why: &str) {
        // The first attempt's outcome counts as a change either way (an operator
        // learns of a Redis down at start too).
        if self.stats.up.swap(up, Ordering::Relaxed) == up && self.known {
            return;
        }
        self.known = true;
        self.stats
            .state_changes_total
            .fetch_add(1, Ordering::Relaxed);
        if up {
            tracing::info!("cluster: the shared Redis is reachable; throttles are shared");
        } else {
            tracing::warn!(fallback = ?self.fallback,
                "cluster: the shared Redis cannot be reached ({why}); throttles fall back");
        }
    }

    fn serve(&mut self, job: Job) {
        let Some(connection) = self.connection.as_deref_mut() else {
            if let Job::Lease { reply, .. } | Job::Claim { reply, .. } = job {
                let _ = reply.send(Answer::Down(self.fallback));
            }
            return;
        };
        self.stats.calls_total.fetch_add(1, Ordering::Relaxed);
        let failed = match job {
            Job::Lease {
                key,
                gcra,
                wanted,
                reply,
            } => {
                let result = self
                    .lease
                    .key(format!("gannet:throttle:{key}"))
                    .arg(gcra.emission_us)
                    .arg(gcra.tolerance_us)
                    .arg(wanted)
                    .invoke::<(u64, u64)>(connection);
                match result {
                    Ok((tokens, wait_us)) => {
                        let tokens = u32::try_from(tokens).unwrap_or(wanted).min(wanted);
                        self.stats
                            .tokens_leased_total
                            .fetch_add(u64::from(tokens), Ordering::Relaxed);
                        let _ = reply.send(Answer::Granted {
                            tokens,
                            wait_ms: wait_us.div_ceil(1000),
                        });
                        None
                    }
                    Err(err) => {
                        let _ = reply.send(Answer::Down(self.fallback));
                        Some(err)
                    }
                }
            }
            Job::Claim {
                key,
                shard,
                limit,
                wanted,
                open,
                reply,
            } => {
                let claimant = match shard {
                    Some(shard) => format!("{}#{shard}", self.node),
                    None => self.node.clone(),
                };
                let result = self
                    .claim
                    .key(format!("gannet:connections:{key}"))
                    .arg(claimant)
                    .arg(wanted)
                    .arg(limit)
                    .arg(open)
                    .arg(NODE_TTL.as_micros() as u64)
                    .invoke::<(u64, u64)>(connection);
                match result {
                    Ok((allowed, waiting)) => {
                        let allowed = u32::try_from(allowed).unwrap_or(0);
                        let _ = reply.send(Answer::Claimed {
                            allowed,
                            others_waiting: waiting > 0,
                        });
                        None
                    }
                    Err(err) => {
                        let _ = reply.send(Answer::Down(self.fallback));
                        Some(err)
                    }
                }
            }
            Job::Admin { field, value } => {
                let cmd = match value {
                    Some(value) => {
                        let mut cmd = redis::cmd("HSET");
                        cmd.arg(ADMIN_KEY).arg(field).arg(value);
                        cmd
                    }
                    None => {
                        let mut cmd = redis::cmd("HDEL");
                        cmd.arg(ADMIN_KEY).arg(field);
                        cmd
                    }
                };
                cmd.query::<u64>(connection).err()
            }
            Job::GiveBack { key, gcra, tokens } => {
                let result = self
                    .give_back
                    .key(format!("gannet:throttle:{key}"))
                    .arg(gcra.emission_us)
                    .arg(tokens)
                    .invoke::<u64>(connection);
                match result {
                    Ok(_) => {
                        self.stats
                            .tokens_returned_total
                            .fetch_add(u64::from(tokens), Ordering::Relaxed);
                        None
                    }
                    Err(err) => Some(err),
                }
            }
        };
        if let Some(err) = failed {
            self.failed(&err);
        }
    }

    /// A failed call leaves the connection in an unknown state: a new one is made
    /// (at once, then once a second while it fails).
    fn failed(&mut self, err: &redis::RedisError) {
        self.stats.failures_total.fetch_add(1, Ordering::Relaxed);
        self.connection = None;
        *self.admin.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.next_attempt = Instant::now();
        self.state(false, &err.to_string());
    }
}
