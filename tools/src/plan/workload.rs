//! The workload a capacity plan is made for: a TOML file (`tuning/workloads/*.toml`
//! are examples). Unknown keys and bad values are errors naming the key and line.

use serde::Deserialize;

use gannet_core::config::{ConfigError, located, parse_located};

/// What the sender sends, and what it expects of the hosts.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// Messages injected per day, on average (or `messages_per_hour`).
    #[serde(default)]
    pub messages_per_day: Option<f64>,
    #[serde(default)]
    pub messages_per_hour: Option<f64>,
    /// The busiest hour against the average hour.
    #[serde(default = "one")]
    pub peak_factor: f64,
    /// Message sizes: `[[bytes, share], …]`, shares summing to 1.
    pub sizes: Vec<(f64, f64)>,
    /// Recipients per injected message (each a delivery of its own).
    #[serde(default = "one")]
    pub recipients_per_message: f64,
    /// Share of messages injected over HTTP (each recipient of a transmission is a
    /// message), the rest over SMTP.
    #[serde(default)]
    pub http_share: f64,
    #[serde(default)]
    pub dkim: Dkim,
    #[serde(default)]
    pub tls: Tls,
    #[serde(default)]
    pub deferral: Deferral,
    /// The destination that takes the most outbound connections (a large mailbox
    /// provider): its share of them, and the MX addresses they spread over. Ports
    /// in TIME_WAIT count per destination address.
    #[serde(default = "busiest_share")]
    pub busiest_destination_share: f64,
    #[serde(default = "busiest_ips")]
    pub busiest_destination_ips: f64,
    /// SMTP messages per inbound connection, and deliveries per outbound one (at
    /// most: a connection to a domain whose mail trickles in is reused only while
    /// its next message comes within the idle timeout).
    #[serde(default = "ten")]
    pub messages_per_inbound_connection: f64,
    #[serde(default = "ten")]
    pub messages_per_outbound_connection: f64,
    /// Destination domains mailed (the busiest among them): each has a queue of its
    /// own, and the rest share what the busiest does not take.
    #[serde(default = "thousand")]
    pub destination_domains: f64,
    /// gannetd's `[delivery] idle_timeout_secs` and `idle_connections_max` (per
    /// core): how long, and for how many domains at once, a connection waits for
    /// its queue's next message.
    #[serde(default = "sixty")]
    pub idle_timeout_secs: f64,
    #[serde(default = "thousand")]
    pub idle_connections_max: f64,
    /// The acknowledgement latency the injectors can accept at the 99th percentile.
    #[serde(default = "fifty")]
    pub ack_p99_ms: f64,
    #[serde(default)]
    pub host: HostLimits,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Dkim {
    /// Signing keys configured (each kept parsed in memory).
    #[serde(default)]
    pub keys: f64,
    /// "rsa2048", "rsa1024", "rsa3072", "rsa4096", "ed25519" or "none".
    #[serde(default = "none")]
    pub algorithm: String,
    /// Signatures per message.
    #[serde(default = "one")]
    pub signatures_per_message: f64,
}

impl Default for Dkim {
    fn default() -> Dkim {
        Dkim {
            keys: 0.0,
            algorithm: none(),
            signatures_per_message: 1.0,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// Share of inbound SMTP connections that use STARTTLS.
    #[serde(default)]
    pub inbound_share: f64,
    /// Share of outbound deliveries over TLS.
    #[serde(default)]
    pub outbound_share: f64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Deferral {
    /// Share of delivery attempts answered 4xx (or failing to connect).
    #[serde(default)]
    pub share: f64,
    /// The retry schedule: the first interval, doubling up to the maximum, until
    /// max_age.
    #[serde(default = "retry_interval")]
    pub retry_interval_secs: f64,
    #[serde(default = "max_retry_interval")]
    pub max_retry_interval_secs: f64,
    #[serde(default = "max_age")]
    pub max_age_secs: f64,
}

impl Default for Deferral {
    fn default() -> Deferral {
        Deferral {
            share: 0.0,
            retry_interval_secs: retry_interval(),
            max_retry_interval_secs: max_retry_interval(),
            max_age_secs: max_age(),
        }
    }
}

/// What one host may use.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HostLimits {
    /// Cores for gannet (0: the calibrated host's).
    #[serde(default)]
    pub cores: f64,
    /// Memory in GiB (0: the calibrated host's).
    #[serde(default)]
    pub memory_gib: f64,
    /// Spool disk space in GiB for the deferred backlog (0: not a limit).
    #[serde(default)]
    pub spool_gib: f64,
    /// Share of each resource the plan may use at the peak (the rest is headroom).
    #[serde(default = "utilization")]
    pub utilization: f64,
    /// Egress source addresses per host (each has its own ephemeral ports).
    #[serde(default = "one")]
    pub source_ips: f64,
    /// Ephemeral ports per source address (net.ipv4.ip_local_port_range).
    #[serde(default = "ports")]
    pub ephemeral_ports: f64,
}

impl Default for HostLimits {
    fn default() -> HostLimits {
        HostLimits {
            cores: 0.0,
            memory_gib: 0.0,
            spool_gib: 0.0,
            utilization: utilization(),
            source_ips: 1.0,
            ephemeral_ports: ports(),
        }
    }
}

fn one() -> f64 {
    1.0
}
fn ten() -> f64 {
    10.0
}
fn fifty() -> f64 {
    50.0
}
fn sixty() -> f64 {
    60.0
}
fn thousand() -> f64 {
    1000.0
}
fn busiest_share() -> f64 {
    0.3
}
fn busiest_ips() -> f64 {
    4.0
}
fn none() -> String {
    "none".into()
}
fn retry_interval() -> f64 {
    300.0
}
fn max_retry_interval() -> f64 {
    3600.0
}
fn max_age() -> f64 {
    5.0 * 86400.0
}
fn utilization() -> f64 {
    0.75
}
fn ports() -> f64 {
    28232.0
}

/// The DKIM algorithms the planner knows (and the profile calibrates).
pub const ALGORITHMS: &[&str] = &[
    "none", "rsa1024", "rsa2048", "rsa3072", "rsa4096", "ed25519",
];

impl Workload {
    /// Parses a workload file's text (`origin` names it in errors).
    pub fn parse(text: &str, origin: &str) -> Result<Workload, ConfigError> {
        let w: Workload = parse_located(text, origin)?;
        let bad = |key: &str, message: &str| {
            Err(located(
                text,
                origin,
                key.to_string(),
                None,
                message.to_string(),
            ))
        };
        match (w.messages_per_day, w.messages_per_hour) {
            (None, None) => {
                return bad(
                    "messages_per_day",
                    "set messages_per_day or messages_per_hour",
                );
            }
            (Some(_), Some(_)) => {
                return bad(
                    "messages_per_hour",
                    "set messages_per_day or messages_per_hour, not both",
                );
            }
            (Some(n), None) if !(n > 0.0 && n.is_finite()) => {
                return bad("messages_per_day", "must be a positive number");
            }
            (None, Some(n)) if !(n > 0.0 && n.is_finite()) => {
                return bad("messages_per_hour", "must be a positive number");
            }
            _ => {}
        }
        if !(w.peak_factor >= 1.0 && w.peak_factor.is_finite()) {
            return bad("peak_factor", "must be at least 1");
        }
        if w.sizes.is_empty() {
            return bad("sizes", "give at least one [bytes, share]");
        }
        if w.sizes
            .iter()
            .any(|(b, s)| !(*b >= 1.0 && b.is_finite() && *s > 0.0 && *s <= 1.0))
        {
            return bad("sizes", "each entry is [bytes ≥ 1, share in (0, 1]]");
        }
        let total: f64 = w.sizes.iter().map(|(_, s)| s).sum();
        if (total - 1.0).abs() > 0.001 {
            return bad("sizes", &format!("the shares sum to {total}, not 1"));
        }
        let shares = [
            ("http_share", w.http_share),
            ("tls.inbound_share", w.tls.inbound_share),
            ("tls.outbound_share", w.tls.outbound_share),
            ("busiest_destination_share", w.busiest_destination_share),
        ];
        for (key, v) in shares {
            if !(0.0..=1.0).contains(&v) {
                return bad(key, "must be between 0 and 1");
            }
        }
        if !(0.0..0.99).contains(&w.deferral.share) {
            return bad("deferral.share", "must be at least 0 and under 0.99");
        }
        let at_least_one = [
            ("recipients_per_message", w.recipients_per_message),
            ("busiest_destination_ips", w.busiest_destination_ips),
            (
                "messages_per_inbound_connection",
                w.messages_per_inbound_connection,
            ),
            (
                "messages_per_outbound_connection",
                w.messages_per_outbound_connection,
            ),
            ("dkim.signatures_per_message", w.dkim.signatures_per_message),
            ("destination_domains", w.destination_domains),
            ("host.source_ips", w.host.source_ips),
            ("host.ephemeral_ports", w.host.ephemeral_ports),
            (
                "deferral.retry_interval_secs",
                w.deferral.retry_interval_secs,
            ),
        ];
        for (key, v) in at_least_one {
            if !(v >= 1.0 && v.is_finite()) {
                return bad(key, "must be at least 1");
            }
        }
        if w.deferral.max_retry_interval_secs < w.deferral.retry_interval_secs {
            return bad(
                "deferral.max_retry_interval_secs",
                "must be at least retry_interval_secs",
            );
        }
        if w.deferral.max_age_secs.is_nan()
            || w.deferral.max_age_secs < w.deferral.retry_interval_secs
        {
            return bad(
                "deferral.max_age_secs",
                "must be at least retry_interval_secs",
            );
        }
        if !(w.ack_p99_ms > 0.0 && w.ack_p99_ms.is_finite()) {
            return bad("ack_p99_ms", "must be a positive number of milliseconds");
        }
        if !(w.host.utilization > 0.0 && w.host.utilization <= 1.0) {
            return bad("host.utilization", "must be in (0, 1]");
        }
        for (key, v) in [
            ("host.cores", w.host.cores),
            ("host.memory_gib", w.host.memory_gib),
            ("host.spool_gib", w.host.spool_gib),
            ("dkim.keys", w.dkim.keys),
            ("idle_timeout_secs", w.idle_timeout_secs),
            ("idle_connections_max", w.idle_connections_max),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return bad(key, "must be 0 or more");
            }
        }
        if !ALGORITHMS.contains(&w.dkim.algorithm.as_str()) {
            return bad(
                "dkim.algorithm",
                &format!("unknown algorithm; one of {}", ALGORITHMS.join(", ")),
            );
        }
        Ok(w)
    }

    pub fn load(path: &std::path::Path) -> Result<Workload, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Workload::parse(&text, &path.display().to_string()).map_err(|e| e.to_string())
    }

    /// Messages per second on average and at the peak.
    pub fn rates(&self) -> (f64, f64) {
        let per_s = match (self.messages_per_day, self.messages_per_hour) {
            (Some(day), _) => day / 86400.0,
            (None, Some(hour)) => hour / 3600.0,
            (None, None) => 0.0,
        };
        (per_s, per_s * self.peak_factor)
    }

    /// The mean message size in bytes.
    pub fn mean_size(&self) -> f64 {
        self.sizes.iter().map(|(b, s)| b * s).sum()
    }
}
