//! Counters for the Prometheus endpoint. Each shard owns one [`ShardMetrics`] and is
//! its only writer (relaxed atomics on memory no other core writes: no contention);
//! the HTTP handler on any shard reads them all.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use gannet_spool::{LATENCY_BOUNDS_US, LatencyCounts, latency_bucket};

macro_rules! metrics {
    ($( $(#[doc = $doc:literal])* $name:ident : $kind:literal ),* $(,)?) => {
        /// One shard's counters, gauges and latency histograms.
        #[derive(Debug, Default)]
        pub struct ShardMetrics {
            $( $(#[doc = $doc])* pub $name: AtomicU64, )*
            /// From the spool's append of an SMTP message to its durability: what
            /// the 250 waits for.
            pub smtp_accept_durable: Histogram,
            /// One group commit: writing the staged records and fdatasync (copied
            /// from the spool's counts by the shard's periodic round).
            pub spool_sync: Histogram,
        }

        impl ShardMetrics {
            fn each(&self) -> impl Iterator<Item = (&'static str, &'static str, &'static str, u64)> + '_ {
                [$( (stringify!($name), $kind, concat!($($doc),*), self.$name.load(Ordering::Relaxed)) ),*].into_iter()
            }
        }
    };
}

metrics! {
    /// SMTP sessions accepted.
    smtp_sessions_total: "counter",
    /// SMTP sessions open now.
    smtp_sessions_active: "gauge",
    /// SMTP sessions refused at connect (limits or policy).
    smtp_sessions_refused_total: "counter",
    /// Messages accepted (durable, 250 sent).
    smtp_messages_accepted_total: "counter",
    /// Recipients of accepted messages.
    smtp_recipients_accepted_total: "counter",
    /// Bytes of accepted messages as spooled.
    smtp_message_bytes_total: "counter",
    /// Messages refused after DATA or BDAT (content, size, policy or spool).
    smtp_messages_rejected_total: "counter",
    /// Recipients refused (relay, policy, limits, syntax).
    smtp_recipients_rejected_total: "counter",
    /// Messages refused because the spool could not make them durable.
    smtp_spool_failures_total: "counter",
    /// Commands answered with a 5xx syntax or sequence error.
    smtp_bad_commands_total: "counter",
    /// STARTTLS handshakes completed.
    smtp_tls_handshakes_total: "counter",
    /// Connections dropped for plaintext pipelined after STARTTLS.
    smtp_starttls_injection_total: "counter",
    /// AUTH attempts that failed.
    smtp_auth_failures_total: "counter",
    /// Policy script hook calls that failed (a run-time error or the instruction
    /// budget exceeded): each gave the client 451 4.3.0.
    policy_script_failures_total: "counter",
    /// HTTP requests answered, and those answered with a 4xx or 5xx status.
    http_requests_total: "counter",
    http_requests_failed_total: "counter",
    /// Transmissions accepted over the HTTP API.
    http_transmissions_total: "counter",
    /// Recipients accepted in transmissions, and recipients refused (bad address).
    http_recipients_accepted_total: "counter",
    http_recipients_rejected_total: "counter",
    /// Messages generated from transmissions and spooled, and their bytes.
    http_messages_generated_total: "counter",
    http_message_bytes_total: "counter",
    /// Recipients whose message could not be generated (generation_failure).
    http_generation_failures_total: "counter",
    /// Transmissions spooled and still being generated, and their recipients not yet
    /// generated.
    http_generation_jobs: "gauge",
    http_generation_pending_recipients: "gauge",
    /// Opens and clicks recorded by the tracking endpoints, and requests for them
    /// with a token that did not verify.
    tracking_opens_total: "counter",
    tracking_clicks_total: "counter",
    tracking_bad_tokens_total: "counter",
    /// Mail to `inbound.domains`: out-of-band bounces (one per failed recipient),
    /// spam complaints, and messages that were neither (dropped).
    inbound_bounces_total: "counter",
    inbound_complaints_total: "counter",
    inbound_unrecognized_total: "counter",
    /// One-click unsubscribes (RFC 8058 POSTs to /u/<token>).
    list_unsubscribes_total: "counter",
    /// DKIM signatures made, and messages refused or failed for want of one.
    dkim_signatures_total: "counter",
    dkim_failures_total: "counter",
    /// Recipients delivered (2xx from the destination).
    delivery_delivered_total: "counter",
    /// Recipient attempts that failed temporarily (retried later).
    delivery_transient_failures_total: "counter",
    /// Recipients bounced (5xx).
    delivery_bounced_total: "counter",
    /// Recipients expired at max_age.
    delivery_expired_total: "counter",
    /// Recipients bounced by an operator's bounce (admin API).
    delivery_admin_bounced_total: "counter",
    /// Recipients given no message because their tenant's suppression list has them
    /// (policy_rejection events with phase suppression).
    suppressed_recipients_total: "counter",
    /// Recipients added to a suppression list by a hard bounce, complaint or
    /// unsubscribe.
    suppression_auto_added_total: "counter",
    /// Delivery status notifications made (RFC 3464), by what they report: a
    /// failure, a delay, a hand-over (NOTIFY=SUCCESS).
    dsn_failure_reports_total: "counter",
    dsn_delay_reports_total: "counter",
    dsn_success_reports_total: "counter",
    /// Parts put off to the next day: every source of their pool had sent its IP
    /// warm-up budget toward the site's provider.
    delivery_warmup_delayed_total: "counter",
    /// MTA-STS policies fetched (new or changed ids, refreshes), and fetches that
    /// failed (no address or connection, an untrusted certificate, not 200
    /// text/plain, not a valid policy).
    delivery_mta_sts_policies_fetched_total: "counter",
    delivery_mta_sts_fetch_failures_total: "counter",
    /// TLS-RPT reports sent (one per address), and sends that failed (tried again
    /// at the next round, for a day).
    delivery_tls_reports_sent_total: "counter",
    delivery_tls_report_failures_total: "counter",
    /// Connections made again without TLS after an opportunistic handshake failed
    /// (shaping's opportunistic_tls_reconnect_on_failed_handshake).
    delivery_tls_plaintext_fallbacks_total: "counter",
    /// Recipient attempts put off untried (ready queue full, queue suspended).
    delivery_delayed_total: "counter",
    /// Response rules (adaptive delivery) that fired on a ready queue, and that ended.
    adaptive_rules_fired_total: "counter",
    adaptive_rules_ended_total: "counter",
    /// Parts handed to the shard that owns their site.
    mesh_handoffs_total: "counter",
    /// Parts delivered by their own shard because the owner's inbox was full.
    mesh_inbox_full_total: "counter",
    /// Message parts waiting for their retry time.
    queue_scheduled_parts: "gauge",
    /// Message parts due and waiting for a connection.
    queue_ready_parts: "gauge",
    /// Message parts held by a suspension of their scheduled queue.
    queue_held_parts: "gauge",
    /// Delivery connections open and waiting for their queue's next message.
    delivery_connections_idle: "gauge",
    /// Answers in the shard's DNS cache.
    dns_cache_entries: "gauge",
    /// Answers dropped from the DNS cache to keep it within dns_cache_entries_max
    /// before they expired.
    dns_cache_evicted_total: "counter",
    /// Questions sent to the DNS server (not answered from the cache).
    dns_queries_total: "counter",
    /// Domains whose site was looked up in DNS (a lookup task: MX, then addresses);
    /// a domain whose site is known takes none until its answers expire.
    delivery_site_lookups_total: "counter",
    /// Sites (or reasons a domain has none) known from DNS on the shard.
    delivery_sites_known: "gauge",
    /// Ready queues with a response rule in force, and with a connection limit
    /// lowered by adaptive backoff.
    adaptive_queues_with_rules: "gauge",
    adaptive_queues_backed_off: "gauge",
    /// UDP queries sent again because no answer came within a try's share of
    /// dns_timeout_secs (a lost query or answer, or a slow server).
    dns_queries_resent_total: "counter",
    /// UDP sockets opened for DNS questions: one per resolution that asked the
    /// server (a domain's MX and its hosts' addresses share it).
    dns_sockets_opened_total: "counter",
    /// Events lost because the event log could not be written.
    events_dropped_total: "counter",
    /// Records appended to the spool (messages, retry updates, tombstones).
    spool_records_total: "counter",
    /// Bytes of those records (framing included): the spool's write rate before
    /// page rounding, whatever has since been reclaimed.
    spool_appended_bytes_total: "counter",
    /// Group commits (one fdatasync of each segment they touched), and those whose
    /// batch was held to gather more records because work queued on the core.
    spool_syncs_total: "counter",
    spool_gathered_syncs_total: "counter",
    /// Spool segments created on the shard's core at a rotation because none had
    /// been prepared ahead (fallocate and fsyncs while the shard waits).
    spool_segments_created_unprepared_total: "counter",
    /// Staged spool records written to their segment file by the spool's writer
    /// thread, and on the shard's core (a read of bytes not yet written, or a stage
    /// that filled while a write was in flight).
    spool_stage_writes_total: "counter",
    spool_stage_writes_inline_total: "counter",
    /// The spool committer's mean scheduling delay (from being woken to being polled),
    /// in microseconds: how long work queued on the core makes a task wait; the
    /// committer holds batches once it passes a third of a sync.
    spool_committer_delay_us: "gauge",
    /// Spool segments on disk, their bytes (preallocated), and the messages and
    /// bytes of them still live.
    spool_segments: "gauge",
    spool_disk_bytes: "gauge",
    spool_live_messages: "gauge",
    spool_live_bytes: "gauge",
    /// Microseconds the shard's executor spent running tasks (its load: the rate of
    /// this counter over wall time).
    shard_busy_us_total: "counter",
}

/// A latency histogram in the spool's buckets ([`LATENCY_BOUNDS_US`]), rendered as
/// a Prometheus histogram in seconds. One shard writes it; any reads it.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket, not cumulative (the last: above every bound).
    counts: [AtomicU64; LATENCY_BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn record(&self, elapsed: std::time::Duration) {
        let us = elapsed.as_micros() as u64;
        self.counts[latency_bucket(us)].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Takes over counts kept elsewhere (the spool's, which are not atomic).
    pub fn store(&self, from: &LatencyCounts) {
        for (to, n) in self.counts.iter().zip(from.counts) {
            to.store(n, Ordering::Relaxed);
        }
        self.sum_us.store(from.sum_us, Ordering::Relaxed);
    }

    fn render(out: &mut String, name: &str, help: &str, shards: &[(usize, &Histogram)]) {
        let _ = writeln!(out, "# HELP gannet_{name} {help}");
        let _ = writeln!(out, "# TYPE gannet_{name} histogram");
        for (shard, histogram) in shards {
            let mut cumulative = 0;
            for (i, count) in histogram.counts.iter().enumerate() {
                cumulative += count.load(Ordering::Relaxed);
                let le = LATENCY_BOUNDS_US
                    .get(i)
                    .map_or("+Inf".to_string(), |us| (*us as f64 / 1e6).to_string());
                let _ = writeln!(
                    out,
                    "gannet_{name}_bucket{{shard=\"{shard}\",le=\"{le}\"}} {cumulative}"
                );
            }
            let sum = histogram.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
            let _ = writeln!(out, "gannet_{name}_sum{{shard=\"{shard}\"}} {sum}");
            let _ = writeln!(out, "gannet_{name}_count{{shard=\"{shard}\"}} {cumulative}");
        }
    }
}

impl ShardMetrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn sub(counter: &AtomicU64, n: u64) {
        counter.fetch_sub(n, Ordering::Relaxed);
    }
}

/// The Prometheus text exposition of every shard's metrics, labelled by shard.
pub fn render(shards: &[std::sync::Arc<ShardMetrics>]) -> String {
    let mut out = String::with_capacity(4096);
    let Some(first) = shards.first() else {
        return out;
    };
    for (i, (name, kind, help, _)) in first.each().enumerate() {
        let _ = writeln!(out, "# HELP gannet_{name} {}", help.trim());
        let _ = writeln!(out, "# TYPE gannet_{name} {kind}");
        for (shard, metrics) in shards.iter().enumerate() {
            let value = metrics.each().nth(i).map_or(0, |m| m.3);
            let _ = writeln!(out, "gannet_{name}{{shard=\"{shard}\"}} {value}");
        }
    }
    let each = |pick: fn(&ShardMetrics) -> &Histogram| {
        shards
            .iter()
            .enumerate()
            .map(|(i, m)| (i, pick(m)))
            .collect::<Vec<_>>()
    };
    Histogram::render(
        &mut out,
        "smtp_accept_durable_seconds",
        "From spooling an SMTP message to its being durable (what the 250 waits for).",
        &each(|m| &m.smtp_accept_durable),
    );
    Histogram::render(
        &mut out,
        "spool_sync_seconds",
        "One spool group commit: writing its records and fdatasync.",
        &each(|m| &m.spool_sync),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn renders_every_shard() {
        let shards = vec![
            Arc::new(ShardMetrics::default()),
            Arc::new(ShardMetrics::default()),
        ];
        ShardMetrics::add(&shards[1].smtp_messages_accepted_total, 3);
        let text = render(&shards);
        assert!(text.contains("# TYPE gannet_smtp_messages_accepted_total counter\n"));
        assert!(text.contains("gannet_smtp_messages_accepted_total{shard=\"0\"} 0\n"));
        assert!(text.contains("gannet_smtp_messages_accepted_total{shard=\"1\"} 3\n"));
        assert!(text.contains("# HELP gannet_smtp_sessions_active SMTP sessions open now.\n"));
        assert!(text.contains("# TYPE gannet_spool_sync_seconds histogram\n"));
    }

    #[test]
    fn histograms_render_cumulative_buckets_in_seconds() {
        let shards = vec![Arc::new(ShardMetrics::default())];
        let h = &shards[0].smtp_accept_durable;
        for us in [80, 300, 300, 3_000_000] {
            h.record(std::time::Duration::from_micros(us));
        }
        let text = render(&shards);
        let name = "gannet_smtp_accept_durable_seconds";
        for line in [
            format!("{name}_bucket{{shard=\"0\",le=\"0.0001\"}} 1\n"),
            format!("{name}_bucket{{shard=\"0\",le=\"0.00025\"}} 1\n"),
            format!("{name}_bucket{{shard=\"0\",le=\"0.0005\"}} 3\n"),
            format!("{name}_bucket{{shard=\"0\",le=\"1\"}} 3\n"),
            format!("{name}_bucket{{shard=\"0\",le=\"+Inf\"}} 4\n"),
            format!("{name}_sum{{shard=\"0\"}} 3.00068\n"),
            format!("{name}_count{{shard=\"0\"}} 4\n"),
        ] {
            assert!(text.contains(&line), "{line} in\n{text}");
        }
        // Copied counts replace what was there.
        let mut counts = LatencyCounts::default();
        counts.record(1_500);
        shards[0].spool_sync.store(&counts);
        let text = render(&shards);
        assert!(text.contains("gannet_spool_sync_seconds_bucket{shard=\"0\",le=\"0.001\"} 0\n"));
        assert!(text.contains("gannet_spool_sync_seconds_bucket{shard=\"0\",le=\"0.002\"} 1\n"));
    }
}
