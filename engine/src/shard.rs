//! What a shard's tasks share: [`Shared`] is the read-only state of the whole
//! process (configuration, TLS, credentials, policy, every shard's metrics, the
//! session counters, the mesh), [`Shard`] is one core's own state (spool, event log,
//! metrics, shutdown). The services built on a shard — delivery, transmission jobs —
//! hold it by `Rc`; `services` puts them together.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::IpAddr;
use std::rc::Rc;

use crate::policy::script::Script;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use gannet_spool::Spool;

use crate::events::{Event, EventFiles};
use crate::io::Shutdown;
use crate::metrics::ShardMetrics;
use crate::policy::Policy;
use crate::storage::ShardStorage;
use gannet_core::auth::Credentials;
use gannet_core::config::Config;
use gannet_core::message::MetaHeaders;

/// Process-wide state, built before the executors start and never written after.
#[derive(Debug)]
pub struct Shared {
    pub config: Config,
    pub credentials: Credentials,
    /// Keys of the HTTP injection API.
    pub api_keys: gannet_core::auth::ApiKeys,
    /// Stored templates and recipient lists.
    pub store: Arc<crate::merge::store::Store>,
    /// Signs and checks engagement tracking tokens.
    pub tracking_key: crate::merge::tracking::TrackingKey,
    /// `http.tracking_base_url`, or the default made from the first HTTP listener.
    pub tracking_base_url: String,
    /// None only if TLS could not be set up (then STARTTLS is not offered).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub policy: Box<dyn Policy + Send + Sync>,
    pub meta_headers: MetaHeaders,
    /// The shards' inboxes (parts handed to the owner of their site, and reports).
    pub mesh: crate::mesh::Mesh<crate::notes::Note>,
    /// Every shard's metrics, indexed by shard number.
    pub metrics: Vec<Arc<ShardMetrics>>,
    pub sessions: Arc<SessionLimits>,
    /// Shaping and suspensions, changeable while running.
    pub live: Arc<crate::live::Live>,
    /// The link to the shared Redis (`[cluster] redis_url`), when one is set.
    pub cluster: Option<Arc<crate::cluster::Link>>,
    /// The limits over several queues (`delivery.limits`) every shard keeps its
    /// side of, when no cluster shares them.
    pub limits: Arc<crate::limits::LocalLimits>,
    /// Rung by SIGTERM/SIGINT; wakes every shard's shutdown at once.
    pub stop: Arc<crate::io::StopBell>,
    /// IP warm-up budgets, shared by the shards' choices of egress source.
    pub warmup: crate::warmup::Warmup,
    /// The event hose: every shard's event log, the webhooks and the sinks.
    pub hose: Arc<crate::hose::Hose>,
    /// Every tenant's suppression list, consulted at injection.
    pub suppressions: Arc<crate::suppression::Suppressions>,
    /// The transmissions accepted (state and counts, for the Transmissions API).
    pub transmissions: crate::registry::Transmissions,
}

/// Session counts across all shards: the total and, per client address, an
/// approximate count in hashed buckets. Both are lock-free; a bucket collision can
/// only make the per-address limit stricter, never looser.
#[derive(Debug)]
pub struct SessionLimits {
    total: AtomicUsize,
    per_ip: Box<[AtomicU32]>,
    total_max: usize,
    per_ip_max: u32,
}

const IP_BUCKETS: usize = 4096;

impl SessionLimits {
    pub fn new(total_max: usize, per_ip_max: u32) -> SessionLimits {
        SessionLimits {
            total: AtomicUsize::new(0),
            per_ip: (0..IP_BUCKETS).map(|_| AtomicU32::new(0)).collect(),
            total_max,
            per_ip_max,
        }
    }

    fn bucket(&self, ip: IpAddr) -> &AtomicU32 {
        let hash = match ip {
            IpAddr::V4(v4) => crc32c::crc32c(&v4.octets()),
            IpAddr::V6(v6) => crc32c::crc32c(&v6.octets()),
        };
        &self.per_ip[hash as usize % IP_BUCKETS]
    }

    /// Counts a new session from `ip`, or says which limit it would pass.
    /// Sessions open now, on every shard.
    pub fn total(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// The most sessions at once.
    pub fn total_max(&self) -> usize {
        self.total_max
    }

    pub fn enter(self: &Arc<Self>, ip: IpAddr) -> Result<SessionSlot, &'static str> {
        if self.total.fetch_add(1, Ordering::AcqRel) >= self.total_max {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err("sessions_max");
        }
        let bucket = self.bucket(ip);
        if bucket.fetch_add(1, Ordering::AcqRel) >= self.per_ip_max {
            bucket.fetch_sub(1, Ordering::AcqRel);
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err("sessions_per_ip_max");
        }
        Ok(SessionSlot {
            limits: self.clone(),
            ip,
        })
    }
}

/// A counted session; dropping it gives the slot back.
#[derive(Debug)]
pub struct SessionSlot {
    limits: Arc<SessionLimits>,
    ip: IpAddr,
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.limits.bucket(self.ip).fetch_sub(1, Ordering::AcqRel);
        self.limits.total.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One core's state. Lives in an `Rc` on its executor and never crosses cores.
#[derive(Debug)]
pub struct Shard {
    pub id: u16,
    pub shared: Arc<Shared>,
    pub spool: Spool<ShardStorage>,
    /// The event log (shared with the spool's writer thread, which writes it out
    /// before each write of records, and with the hose, which reads it).
    pub events: Arc<EventFiles>,
    pub metrics: Arc<ShardMetrics>,
    pub shutdown: Shutdown,
    /// Sessions running on this shard (shutdown waits for them).
    pub sessions_active: Cell<usize>,
    /// HTTP requests being handled on this shard.
    pub http_in_flight: Cell<usize>,
    /// The DKIM keys as of a generation of the live settings.
    pub dkim: RefCell<(u64, Arc<crate::dkim::Signers>)>,
    /// user → SHA-256(user, password) of the last successful AUTH on this shard, so
    /// that a client logging in again pays one hash instead of a PBKDF2 run.
    pub auth_cache: RefCell<HashMap<String, [u8; 32]>>,
    /// Input buffers of ended SMTP sessions, for new ones: with a new connection per
    /// message (the common case) this spares a 64 KiB allocation and its zeroing per
    /// message.
    pub read_buffers: RefCell<Vec<Vec<u8>>>,
    /// This shard's VM of the policy script, as of a generation of the live settings.
    pub script: RefCell<crate::live::ScriptCache>,
}

/// Session input buffers a shard keeps for reuse at most.
const READ_BUFFERS_KEPT: usize = 64;

impl Shard {
    /// The policy script's VM on this shard, compiled again when the live settings
    /// carry another source (SIGHUP). The check is one atomic load per call.
    pub fn script(&self) -> Option<Rc<Script>> {
        self.script
            .borrow_mut()
            .get(&self.shared.live, || format!("shard {}", self.id))
    }

    /// Whether the process is stopping: this shard's shutdown is raised, or the stop
    /// bell rang and the shard's round has not raised it yet. Sessions look here
    /// between commands, so once any shard tells a client 421, a client of another
    /// shard is not told 250 to its next command.
    pub fn stopping(&self) -> bool {
        self.shutdown.is_raised() || self.shared.stop.is_rung()
    }

    /// A zeroed-once buffer of `len` bytes, from the pool when one fits.
    pub fn take_read_buffer(&self, len: usize) -> Vec<u8> {
        let mut pool = self.read_buffers.borrow_mut();
        match pool.iter().rposition(|b| b.len() == len) {
            Some(i) => pool.swap_remove(i),
            None => vec![0; len],
        }
    }

    /// Gives a session's input buffer back (its contents are overwritten before they
    /// are read again).
    pub fn return_read_buffer(&self, buffer: Vec<u8>) {
        let mut pool = self.read_buffers.borrow_mut();
        if pool.len() < READ_BUFFERS_KEPT {
            pool.push(buffer);
        }
    }

    /// The current DKIM keys: one atomic load per call, the live settings' lock only
    /// after a reload.
    pub fn dkim(&self) -> Arc<crate::dkim::Signers> {
        let live = &self.shared.live;
        let generation = live.generation();
        let mut cached = self.dkim.borrow_mut();
        if cached.0 != generation {
            *cached = (generation, live.snapshot().dkim.clone());
        }
        cached.1.clone()
    }

    pub fn event(&self, event: &Event<'_>) {
        self.events.record(event);
    }

    pub fn config(&self) -> &Config {
        &self.shared.config
    }
}
