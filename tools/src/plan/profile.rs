//! A host's profile: what `gannet-plan calibrate` measured on it, per core, through
//! gannetd itself (JSON, with the revision and date).

use serde::{Deserialize, Serialize};

/// A cost that grows with the message: `base + per_kib × KiB`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Linear {
    pub base: f64,
    pub per_kib: f64,
}

impl Linear {
    pub fn at(&self, bytes: f64) -> f64 {
        self.base + self.per_kib * bytes / 1024.0
    }

    /// The line through two measurements `(bytes, value)` (a flat line when both are
    /// at the same size; never negative).
    pub fn through(a: (f64, f64), b: (f64, f64)) -> Linear {
        let dx = (b.0 - a.0) / 1024.0;
        let per_kib = if dx.abs() < f64::EPSILON {
            0.0
        } else {
            ((b.1 - a.1) / dx).max(0.0)
        };
        Linear {
            base: (a.1 - per_kib * a.0 / 1024.0).max(0.0),
            per_kib,
        }
    }
}

/// The machine calibrated.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Host {
    pub cores: usize,
    pub memory_bytes: u64,
    pub cpu: String,
    pub kernel: String,
    /// The filesystem and device of the directory calibrated in.
    pub disk: String,
}

/// The disk under the spool.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Disk {
    /// A 4 KiB write and fdatasync: its latency at the 50th and 99th percentiles.
    pub flush_p50_us: f64,
    pub flush_p99_us: f64,
    /// Sequential writes of 1 MiB, each followed by fdatasync (group commit's
    /// pattern): bytes per second.
    pub bandwidth_bytes_per_s: f64,
}

/// TLS on gannetd's side of a connection.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct TlsCost {
    /// CPU per handshake (STARTTLS, TLS 1.3, ECDHE), µs.
    pub handshake_us: f64,
    /// CPU per KiB carried under TLS beyond plaintext, µs.
    pub per_kib_us: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Profile {
    /// gannet's revision and the UTC date of the calibration.
    pub revision: String,
    pub date: String,
    pub host: Host,
    /// Executors gannetd ran with while calibrated (the costs below are per core).
    pub shards: usize,
    /// The share of a saturated core's time gannetd's threads get (relaying as fast
    /// as it can, confined to the core): the rest goes to the kernel's work for its
    /// connections and to the scheduler. A core's capacity is this share over the
    /// CPU per message.
    pub core_share: f64,
    /// CPU µs per message accepted over SMTP (durable 250, delivery suspended).
    pub smtp_accept_us: Linear,
    /// CPU µs per message accepted over SMTP and delivered once over SMTP.
    pub relay_us: Linear,
    /// CPU µs per message generated from an HTTP transmission (per recipient).
    pub http_us: Linear,
    /// CPU µs per message generated from an HTTP transmission and delivered once
    /// over SMTP. (Absent from older profiles: generation plus SMTP relay's delivery
    /// part stands in.)
    #[serde(default)]
    pub http_relay_us: Linear,
    /// CPU µs per DKIM signature, by algorithm (`rsa2048`, `ed25519`).
    pub dkim_us: std::collections::BTreeMap<String, Linear>,
    pub tls: TlsCost,
    pub disk: Disk,
    /// Spool bytes written per message accepted, and per message accepted and
    /// delivered (the delivery's records).
    pub spool_accept_bytes: Linear,
    pub spool_relay_bytes: Linear,
    /// Bytes sent to the disk per message accepted, and accepted and delivered, at
    /// saturation: pages written back, so a partly filled page flushed and then
    /// appended to is written again. What the disk's bandwidth is spent on. (Absent
    /// from older profiles: the spool bytes stand in.)
    #[serde(default)]
    pub disk_write_accept_bytes: Linear,
    #[serde(default)]
    pub disk_write_relay_bytes: Linear,
    /// Resident memory per queued message, and gannetd's resident memory idle.
    pub queued_bytes_per_message: f64,
    pub base_rss_bytes: f64,
    /// Resident memory per DKIM key configured (RSA-2048, parsed at start).
    pub dkim_key_bytes: f64,
    /// Resident memory per destination domain with mail queued (its scheduled
    /// queue), beyond the messages'. (Absent from older profiles: 0.)
    #[serde(default)]
    pub queue_bytes: f64,
    /// The acknowledgement's p99 (ms) relaying 2 KiB messages at half the core's
    /// relay rate over 64 connections, less the disk's flush p50 + p99: the part of
    /// the wait that is the protocol and the core's scheduling, not the disk.
    /// (Absent from profiles calibrated before it was measured: 0.)
    #[serde(default)]
    pub ack_p99_base_ms: f64,
}

impl Profile {
    pub fn load(path: &std::path::Path) -> Result<Profile, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| {
            format!(
                "{}:{}:{}: not a gannet-plan profile: {e}",
                path.display(),
                e.line(),
                e.column()
            )
        })
    }

    /// DKIM CPU per signature for `algorithm` at `bytes`; None when it was not
    /// calibrated (for RSA sizes not measured, scaled from rsa2048 by the cube of
    /// the size ratio, as RSA signing grows).
    pub fn dkim_at(&self, algorithm: &str, bytes: f64) -> Option<f64> {
        if algorithm == "none" {
            return Some(0.0);
        }
        if let Some(cost) = self.dkim_us.get(algorithm) {
            return Some(cost.at(bytes));
        }
        let bits: f64 = algorithm.strip_prefix("rsa")?.parse().ok()?;
        let rsa = self.dkim_us.get("rsa2048")?;
        let scale = (bits / 2048.0).powi(3);
        Some(rsa.base * scale + rsa.per_kib * bytes / 1024.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_through_two_points() {
        let l = Linear::through((1024.0, 110.0), (11.0 * 1024.0, 210.0));
        assert!((l.per_kib - 10.0).abs() < 1e-9);
        assert!((l.base - 100.0).abs() < 1e-9);
        assert!((l.at(5.0 * 1024.0) - 150.0).abs() < 1e-9);
        // Noise that makes the larger size cheaper gives a flat line, not a negative
        // slope.
        let flat = Linear::through((1024.0, 110.0), (2048.0, 100.0));
        assert_eq!(flat.per_kib, 0.0);
        assert_eq!(flat.base, 110.0);
    }
}
