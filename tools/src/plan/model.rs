//! From a workload and a host profile: the rate one host sustains, the resource that
//! saturates first, and the hosts the workload needs — with the arithmetic of each
//! resource spelled out, so that a planner can check it and a benchmark can refute it.
//!
//! Each resource gives the message rate (injected messages per second) at which it
//! reaches the host's allowed utilization:
//! - CPU: cores × utilization / CPU per message; CPU per message sums acceptance
//!   (SMTP or HTTP generation), TLS on the way in, DKIM, and every delivery attempt
//!   with its TLS, at the calibrated per-core costs for each size of the mix.
//! - Disk: group commit makes one flush serve every acknowledgement waiting for it,
//!   so flushes do not cap the rate; bandwidth does (spent on the bytes gannetd
//!   writes per message, as calibrated: whole pages, so more than the spool
//!   holds), and the acknowledgement latency
//!   target caps it lower: an acknowledgement waits for the flush in progress and its
//!   own (p50 + p99 flush at no load), and each flush carries what arrived during
//!   the last, so at a share ρ of the disk's bandwidth the latency is that floor
//!   over (1 − ρ) — on top of what the protocol and the core's scheduling add,
//!   measured by the calibration below the knee. The CPU's own queueing is left
//!   out: below the CPU limit it stays near that measurement (bench/RESULTS.md's
//!   planner runs), past it the host is over capacity anyway.
//! - Memory: the deferred backlog (deliveries deferred at least once, times the
//!   time they spend waiting on the retry schedule) at the calibrated memory per
//!   queued message, plus gannetd's idle footprint.
//! - Spool space (when the host names it): the same backlog in spool bytes.
//! - Ports: every outbound connection closed holds its local port in TIME_WAIT for
//!   60 s towards that destination address; a source address has `ephemeral_ports`
//!   of them per destination, and the busiest destination runs out first.

use serde::Serialize;

use super::profile::Profile;
use super::workload::Workload;

/// TIME_WAIT on Linux (TCP_TIMEWAIT_LEN).
const TIME_WAIT_SECS: f64 = 60.0;
/// A latency target met up to this share of the allowed disk utilization does not
/// make the latency the bottleneck: the queueing model puts an unbounded wait at a
/// full disk, so at 100% allowed any target would otherwise trim the bandwidth limit
/// by a hair and be named instead of the bandwidth that actually runs out.
const NEAR: f64 = 0.98;

#[derive(Debug, Clone, Serialize)]
pub struct Resource {
    pub name: &'static str,
    /// Injected messages per second at which this resource reaches the allowed
    /// utilization (infinite: it never does).
    pub limit_per_s: f64,
    /// Its use at the workload's peak, per host, against its limit (with the plan's
    /// host count).
    pub peak_use: f64,
    pub reasoning: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub average_per_s: f64,
    pub peak_per_s: f64,
    /// What one host sustains: the lowest resource limit.
    pub sustainable_per_s: f64,
    pub bottleneck: &'static str,
    pub hosts: u64,
    pub cores: f64,
    pub memory_bytes: f64,
    /// CPU µs per injected message, by part.
    pub cpu_us: CpuParts,
    /// The acknowledgement p99 predicted at each host's share of the peak (ms; null
    /// when no host meets the workload).
    pub ack_p99_ms: f64,
    /// Bytes written to the disk per injected message (the bandwidth's divisor).
    pub disk_bytes_per_message: f64,
    /// Deliveries per outbound connection, the busiest domain and the rest together.
    pub messages_per_outbound_connection: f64,
    pub resources: Vec<Resource>,
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CpuParts {
    pub accept: f64,
    pub tls_in: f64,
    pub dkim: f64,
    pub delivery: f64,
    pub tls_out: f64,
    pub total: f64,
}

/// Delivery attempts per delivery when a share `p` of attempts is deferred, retried
/// at most `tries` times in all.
fn attempts(p: f64, tries: u32) -> f64 {
    (0..tries).map(|i| p.powi(i as i32)).sum()
}

/// The retry schedule: (intervals before each retry, in order, within max_age).
fn retry_intervals(w: &Workload) -> Vec<f64> {
    let d = &w.deferral;
    let (mut out, mut waited, mut next) = (Vec::new(), 0.0, d.retry_interval_secs);
    while waited + next <= d.max_age_secs && out.len() < 10_000 {
        out.push(next);
        waited += next;
        next = (next * 2.0).min(d.max_retry_interval_secs);
    }
    out
}

/// The plan for `w` on hosts like `p`'s. Outbound connections are reused less
/// than `messages_per_outbound_connection` for domains whose mail trickles in, and
/// how much less depends on the rate each host runs at, which depends on the CPU
/// the handshakes cost: planned once at full reuse, then again at the reuse each
/// host's share of the peak gives (one pass: the second changes the rate little).
pub fn plan(w: &Workload, p: &Profile) -> Result<Plan, String> {
    let first = plan_at(w, p, w.messages_per_outbound_connection)?;
    let rate = if first.hosts > 0 {
        first.peak_per_s / first.hosts as f64
    } else {
        first.sustainable_per_s
    };
    let (reuse, note) = outbound_reuse(w, rate, first.cores);
    let mut plan = plan_at(w, p, reuse)?;
    plan.messages_per_outbound_connection = reuse;
    plan.notes.insert(0, note);
    Ok(plan)
}

/// Deliveries per outbound connection at `rate` injected msgs/s per host on
/// `cores`, and why. The busiest destination's connections are always busy
/// (`messages_per_outbound_connection`); the other domains share the rest of the
/// mail. With arrivals at r per second, a connection closes at the first gap longer
/// than the idle timeout T: it carries e^(rT) messages on average (at most the
/// configured number), when one of the `idle_connections_max` per core idle slots
/// is free for its domain, else one.
pub fn outbound_reuse(w: &Workload, rate: f64, cores: f64) -> (f64, String) {
    let most = w.messages_per_outbound_connection;
    let tail = w.destination_domains - 1.0;
    let busiest = w.busiest_destination_share;
    if tail < 1.0 || busiest >= 1.0 {
        return (
            most,
            format!("one destination domain: {most} deliveries per outbound connection"),
        );
    }
    let smtp = 1.0 - w.http_share;
    let deliveries = smtp * w.recipients_per_message + w.http_share;
    let per_domain = rate * deliveries * (1.0 - busiest) / tail;
    let kept = (per_domain * w.idle_timeout_secs).exp().min(most);
    let slots = (w.idle_connections_max * cores / tail).min(1.0);
    let tail_reuse = slots * kept + (1.0 - slots);
    let reuse = 1.0 / (busiest / most + (1.0 - busiest) / tail_reuse);
    (
        reuse,
        format!(
            "outbound connections: at {rate:.0} msgs/s per host the {tail:.0} domains besides the busiest get {per_domain:.3} deliveries/s each; a connection to one carries {kept:.1} on average ({} s idle timeout, idle slots for {:.0}% of them): {reuse:.1} deliveries per connection overall, of {most} at most",
            w.idle_timeout_secs,
            slots * 100.0
        ),
    )
}

fn plan_at(w: &Workload, p: &Profile, reuse: f64) -> Result<Plan, String> {
    let (average, peak) = w.rates();
    let cores = if w.host.cores > 0.0 {
        w.host.cores
    } else {
        p.host.cores as f64
    };
    let memory = if w.host.memory_gib > 0.0 {
        w.host.memory_gib * (1u64 << 30) as f64
    } else {
        p.host.memory_bytes as f64
    };
    let util = w.host.utilization;
    let mut notes = Vec::new();
    let dkim_cost = |bytes: f64| {
        p.dkim_at(&w.dkim.algorithm, bytes)
            .ok_or_else(|| format!("the profile has no DKIM cost for {}", w.dkim.algorithm))
    };
    let deferral = w.deferral.share;
    let intervals = retry_intervals(w);
    let tries = intervals.len() as u32 + 1;
    let per_delivery = attempts(deferral, tries);
    let smtp = 1.0 - w.http_share;
    let deliveries = smtp * w.recipients_per_message + w.http_share;

    // CPU per injected message, over the size mix.
    let mut cpu = CpuParts::default();
    // Spool bytes held per message (space), and bytes written to the disk per
    // message (bandwidth).
    let (mut spool_bytes, mut disk_bytes) = (0.0, 0.0);
    for &(bytes, share) in &w.sizes {
        let accept = p.smtp_accept_us.at(bytes);
        let delivery = (p.relay_us.at(bytes) - accept).max(0.0);
        let http = p.http_us.at(bytes);
        // A generated message's delivery, measured as such when the profile has it.
        let http_delivery = if p.http_relay_us.at(bytes) > 0.0 {
            (p.http_relay_us.at(bytes) - http).max(0.0)
        } else {
            delivery
        };
        cpu.accept += share * (smtp * accept + w.http_share * http);
        cpu.tls_in += share
            * smtp
            * w.tls.inbound_share
            * (p.tls.handshake_us / w.messages_per_inbound_connection
                + p.tls.per_kib_us * bytes / 1024.0);
        cpu.dkim += share * w.dkim.signatures_per_message * dkim_cost(bytes)?;
        cpu.delivery += share
            * per_delivery
            * (smtp * w.recipients_per_message * delivery + w.http_share * http_delivery);
        cpu.tls_out += share
            * deliveries
            * per_delivery
            * w.tls.outbound_share
            * (p.tls.handshake_us / reuse + p.tls.per_kib_us * bytes / 1024.0);
        let accepted = p.spool_accept_bytes.at(bytes);
        let delivered = (p.spool_relay_bytes.at(bytes) - accepted).max(0.0);
        spool_bytes += share * (accepted + deliveries * per_delivery * delivered);
        let (accepted, relayed) = if p.disk_write_accept_bytes.at(bytes) > 0.0 {
            (
                p.disk_write_accept_bytes.at(bytes),
                p.disk_write_relay_bytes.at(bytes),
            )
        } else {
            (
                p.spool_accept_bytes.at(bytes),
                p.spool_relay_bytes.at(bytes),
            )
        };
        let delivered = (relayed - accepted).max(0.0);
        disk_bytes += share * (accepted + deliveries * per_delivery * delivered);
    }
    cpu.total = cpu.accept + cpu.tls_in + cpu.dkim + cpu.delivery + cpu.tls_out;
    let mut resources = Vec::new();
    let cpu_limit = cores * util * p.core_share * 1e6 / cpu.total.max(1e-9);
    resources.push(Resource {
        name: "cpu",
        limit_per_s: cpu_limit,
        peak_use: 0.0,
        reasoning: format!(
            "{:.0} µs of CPU per message (acceptance {:.0}, TLS in {:.0}, DKIM {:.0}, {:.2} delivery attempts per message {:.0}, TLS out {:.0}); {cores} cores × {:.0}% × {:.0}% of a core for gannetd / {:.0} µs = {cpu_limit:.0} msgs/s",
            cpu.total,
            cpu.accept,
            cpu.tls_in,
            cpu.dkim,
            deliveries * per_delivery,
            cpu.delivery,
            cpu.tls_out,
            util * 100.0,
            p.core_share * 100.0,
            cpu.total
        ),
    });

    // Disk: bandwidth, and the latency target.
    let bandwidth = p.disk.bandwidth_bytes_per_s;
    let bw_limit = bandwidth * util / disk_bytes.max(1.0);
    resources.push(Resource {
        name: "disk bandwidth",
        limit_per_s: bw_limit,
        peak_use: 0.0,
        reasoning: format!(
            "{disk_bytes:.0} bytes written to the disk per message (with delivery records, as pages); the disk writes {:.1} MB/s with a flush per MiB; × {:.0}% = {bw_limit:.0} msgs/s",
            bandwidth / 1e6,
            util * 100.0
        ),
    });
    let floor_ms = (p.disk.flush_p50_us + p.disk.flush_p99_us) / 1000.0;
    let base_ms = p.ack_p99_base_ms;
    let share = (1.0 - floor_ms / (w.ack_p99_ms - base_ms)).max(0.0);
    let latency_limit = if base_ms + floor_ms >= w.ack_p99_ms {
        notes.push(format!(
            "acknowledgements wait {:.1} ms at the 99th percentile with the disk idle ({base_ms:.1} ms of protocol and scheduling measured below the knee, {floor_ms:.1} ms for a flush in progress and the next), more than the {} ms target: no rate meets it on this host",
            base_ms + floor_ms,
            w.ack_p99_ms
        ));
        0.0
    } else if share >= util * NEAR {
        // The target is met nearly to the allowed utilization: what runs out is the
        // bandwidth (equal limits: the bandwidth, listed first, is named).
        bw_limit
    } else {
        bandwidth / disk_bytes.max(1.0) * share
    };
    resources.push(Resource {
        name: "disk flush latency",
        limit_per_s: latency_limit,
        peak_use: 0.0,
        reasoning: format!(
            "ack p99 ≈ {base_ms:.2} ms (protocol and scheduling) + (flush p50 {:.2} + p99 {:.2} ms) / (1 − disk share); ≤ {} ms while the disk's share stays under {:.1}%{}: {latency_limit:.0} msgs/s",
            p.disk.flush_p50_us / 1000.0,
            p.disk.flush_p99_us / 1000.0,
            w.ack_p99_ms,
            share * 100.0,
            if share >= util * NEAR {
                ", at or past the bandwidth limit's"
            } else {
                ""
            }
        ),
    });

    // The deferred backlog: deliveries deferred at least once, and how long each
    // waits (interval k is waited when the first k attempts were deferred).
    let wait: f64 = (intervals.iter().enumerate())
        .map(|(k, interval)| deferral.powi(k as i32) * interval)
        .sum();
    let backlog_per_rate = deliveries * deferral * wait;
    let keys = w.dkim.keys * p.dkim_key_bytes;
    let queues = w.destination_domains * p.queue_bytes;
    let room = memory * util - p.base_rss_bytes - keys - queues;
    let mem_limit = if room <= 0.0 {
        notes.push(format!(
            "gannetd's idle footprint, its DKIM keys and the queues of {} destination domains take more than {:.0}% of {:.1} GiB",
            w.destination_domains,
            util * 100.0,
            memory / (1u64 << 30) as f64
        ));
        0.0
    } else if backlog_per_rate <= 0.0 {
        f64::INFINITY
    } else {
        room / (backlog_per_rate * p.queued_bytes_per_message.max(1.0))
    };
    resources.push(Resource {
        name: "memory",
        limit_per_s: mem_limit,
        peak_use: 0.0,
        reasoning: format!(
            "each msg/s keeps {backlog_per_rate:.1} deliveries waiting to be retried ({:.1}% deferred, {wait:.0} s waited on average once deferred), {:.0} bytes each, beside {:.0} MiB idle, {:.0} MiB for {} DKIM keys and {:.0} MiB for the queues of {} destination domains; {:.1} GiB × {:.0}%: {}",
            deferral * 100.0,
            p.queued_bytes_per_message,
            p.base_rss_bytes / (1u64 << 20) as f64,
            keys / (1u64 << 20) as f64,
            w.dkim.keys,
            queues / (1u64 << 20) as f64,
            w.destination_domains,
            memory / (1u64 << 30) as f64,
            util * 100.0,
            rate_text(mem_limit)
        ),
    });
    if w.host.spool_gib > 0.0 {
        let space = w.host.spool_gib * (1u64 << 30) as f64 * util;
        let per = backlog_per_rate * spool_bytes / deliveries.max(1.0);
        let space_limit = if per <= 0.0 {
            f64::INFINITY
        } else {
            space / per
        };
        resources.push(Resource {
            name: "spool space",
            limit_per_s: space_limit,
            peak_use: 0.0,
            reasoning: format!(
                "the deferred backlog holds {per:.0} spool bytes per msg/s; {:.0} GiB × {:.0}%: {}",
                w.host.spool_gib,
                util * 100.0,
                rate_text(space_limit)
            ),
        });
    }
    // A local port in TIME_WAIT blocks only the same (source, destination) pair:
    // the busiest destination's addresses run out first.
    // Its connections are always busy: they carry the most deliveries each.
    let connections = deliveries * per_delivery / reuse;
    let ports = w.host.source_ips * w.busiest_destination_ips * w.host.ephemeral_ports * util
        / TIME_WAIT_SECS;
    let busiest = deliveries * per_delivery * w.busiest_destination_share
        / w.messages_per_outbound_connection;
    let port_limit = if busiest > 0.0 {
        ports / busiest
    } else {
        f64::INFINITY
    };
    resources.push(Resource {
        name: "ephemeral ports",
        limit_per_s: port_limit,
        peak_use: 0.0,
        reasoning: format!(
            "{connections:.3} outbound connections per message ({reuse:.1} deliveries each); the busiest destination takes {:.0}% of the deliveries, {busiest:.3} connections per message ({} deliveries each) to its {} addresses; {} source address(es) × {} ports, each held 60 s in TIME_WAIT per destination address, × {:.0}%: {}",
            w.busiest_destination_share * 100.0,
            w.messages_per_outbound_connection,
            w.busiest_destination_ips,
            w.host.source_ips,
            w.host.ephemeral_ports,
            util * 100.0,
            rate_text(port_limit)
        ),
    });

    let (bottleneck, sustainable) = resources.iter().map(|r| (r.name, r.limit_per_s)).fold(
        ("none", f64::INFINITY),
        |best, r| {
            if r.1 < best.1 { r } else { best }
        },
    );
    let hosts = if sustainable > 0.0 {
        (peak / sustainable).ceil().max(1.0) as u64
    } else {
        0
    };
    for r in &mut resources {
        r.peak_use = if r.limit_per_s.is_finite() && r.limit_per_s > 0.0 && hosts > 0 {
            peak / hosts as f64 / r.limit_per_s * util
        } else {
            0.0
        };
    }
    if hosts == 0 {
        notes.push("no host meets this workload: see the resource at 0 msgs/s".into());
    }
    // The acknowledgement p99 at each host's share of the peak (the model of the
    // latency limit, evaluated there).
    let disk_share = if hosts > 0 {
        peak / hosts as f64 * disk_bytes / bandwidth.max(1.0)
    } else {
        1.0
    };
    let ack_p99_ms = if disk_share < 1.0 {
        base_ms + floor_ms / (1.0 - disk_share)
    } else {
        f64::INFINITY
    };
    Ok(Plan {
        average_per_s: average,
        peak_per_s: peak,
        sustainable_per_s: sustainable,
        bottleneck,
        hosts,
        cores,
        memory_bytes: memory,
        cpu_us: cpu,
        ack_p99_ms,
        disk_bytes_per_message: disk_bytes,
        messages_per_outbound_connection: reuse,
        resources,
        notes,
    })
}

fn rate_text(rate: f64) -> String {
    if rate.is_finite() {
        format!("{rate:.0} msgs/s")
    } else {
        "no limit".into()
    }
}

/// The plan as a table for people.
pub fn render(plan: &Plan, w: &Workload, p: &Profile) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "workload: {:.0} msgs/s on average, {:.0} at the peak (×{}); mean size {:.0} bytes; {:.0}% over HTTP; {:.1}% of attempts deferred; ack p99 target {} ms",
        plan.average_per_s,
        plan.peak_per_s,
        w.peak_factor,
        w.mean_size(),
        w.http_share * 100.0,
        w.deferral.share * 100.0,
        w.ack_p99_ms
    );
    let _ = writeln!(
        out,
        "host: {} cores, {:.1} GiB (profile of {} from {}, gannet {}), up to {:.0}% of each resource\n",
        plan.cores,
        plan.memory_bytes / (1u64 << 30) as f64,
        p.host.cpu,
        p.date,
        p.revision,
        w.host.utilization * 100.0
    );
    let _ = writeln!(
        out,
        "{:<20} {:>14} {:>10}  reasoning",
        "resource", "limit msgs/s", "peak use"
    );
    let mut sorted: Vec<&Resource> = plan.resources.iter().collect();
    sorted.sort_by(|a, b| a.limit_per_s.total_cmp(&b.limit_per_s));
    for r in sorted {
        let _ = writeln!(
            out,
            "{:<20} {:>14} {:>9.0}%  {}",
            r.name,
            if r.limit_per_s.is_finite() {
                format!("{:.0}", r.limit_per_s)
            } else {
                "—".into()
            },
            r.peak_use * 100.0,
            r.reasoning
        );
    }
    let _ = writeln!(
        out,
        "\none host sustains {:.0} msgs/s ({:.1} M/day); first to saturate: {}",
        plan.sustainable_per_s,
        plan.sustainable_per_s * 86400.0 / 1e6,
        plan.bottleneck
    );
    let _ = writeln!(
        out,
        "hosts for the peak: {} (each at {:.0} msgs/s at the peak, acknowledging within {} at the 99th percentile)",
        plan.hosts,
        if plan.hosts > 0 {
            plan.peak_per_s / plan.hosts as f64
        } else {
            0.0
        },
        if plan.ack_p99_ms.is_finite() {
            format!("{:.1} ms", plan.ack_p99_ms)
        } else {
            "no bound".to_string()
        }
    );
    for note in &plan.notes {
        let _ = writeln!(out, "note: {note}");
    }
    out
}
