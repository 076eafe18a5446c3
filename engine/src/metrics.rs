//! Counters for the Prometheus endpoint. Each shard owns one [`ShardMetrics`] and is
//! its only writer (relaxed atomics on memory no other core writes: no contention);
//! the HTTP handler on any shard reads them all.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! metrics {
    ($( $(#[doc = $doc:literal])* $name:ident : $kind:literal ),* $(,)?) => {
        /// One shard's counters and gauges.
        #[derive(Debug, Default)]
        pub struct ShardMetrics {
            $( $(#[doc = $doc])* pub $name: AtomicU64, )*
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
    /// Recipient attempts put off untried (ready queue full, queue suspended).
    delivery_delayed_total: "counter",
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
    /// Events lost because the event log could not be written.
    events_dropped_total: "counter",
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
    }
}
