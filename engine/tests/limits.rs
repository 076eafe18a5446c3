//! Limits over several ready queues (`delivery.limits`, a provider's `provider_*`
//! keys) against real peers: gannetd with two shards resolves eight sites
//! (h0.test … h7.test, one MX name each under .hop.test, spread over both shards)
//! through dnsmasq and delivers to an aiosmtpd that counts its connections and
//! stamps each message's arrival. A limit per egress source holds the connections
//! and the message rate of all eight queues together, where each queue on its own
//! would send far more; with `[cluster]`, a provider's limit holds across the
//! nodes sharing a real Redis.

mod common;

use std::time::{Duration, Instant};

use common::Daemon;
use common::peers::redis_server;
use common::relay::{Dns, Sink, delivery_config, dns, slow_sink};

/// gannetd relaying h0.test … h7.test (through `dns`) to `sink`, with `extra`
/// (tables after `[delivery]`).
fn relay(dns: &Dns, sink: &Sink, extra: &str) -> Daemon {
    let config = common::admin::admin_key_config()
        + &delivery_config("")
        + &format!(
            "dns_server = \"127.0.0.1:{}\"\nsmtp_port = {}\n{extra}",
            dns.port, sink.port
        );
    Daemon::start("", &config)
}

/// Injects `each` messages to every one of the eight sites (one message each).
fn inject_spread(d: &Daemon, tag: &str, each: usize) {
    for i in 0..each {
        for site in 0..8 {
            d.send_accepted(
                &format!("{tag}{i}@h{site}.test"),
                "Subject: spread\r\n\r\nx\r\n",
            );
        }
    }
}

fn eventually(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

/// Waits until the sink has `total` messages, and checks none came twice.
fn sink_got(sink: &Sink, total: usize, secs: u64) {
    assert!(
        eventually(secs, || sink.messages().len() >= total),
        "the sink got {} of {total}",
        sink.messages().len()
    );
    assert_eq!(sink.messages().len(), total, "nothing sent twice");
}

/// The rate the sink saw once the limit's burst and the leases' ramp-up are past
/// (from the `2 × burst`th message on). Through Redis, tokens come a lease at a
/// time (a quarter of a second's worth, `lease_window_ms`), so messages arrive in
/// runs with pauses between: the rate is then taken from the start of one run to
/// the start of the last, a whole number of runs, not from wherever the count
/// falls within one.
fn rate_after_burst(sink: &Sink, burst: usize) -> f64 {
    let mut times: Vec<f64> = (sink.messages().iter())
        .map(|m| m["received_at"].as_f64().expect("received_at"))
        .collect();
    times.sort_by(f64::total_cmp);
    let from = 2 * burst;
    let runs: Vec<usize> = (from.max(1)..times.len())
        .filter(|&i| times[i] - times[i - 1] > 0.1)
        .collect();
    let (start, end) = match runs[..] {
        [first, .., last] if last - first >= burst => (first, last),
        _ => (from, times.len() - 1),
    };
    (end - start) as f64 / (times[end] - times[start])
}

/// The limits the admin API lists with the ready queues: (queue, limit key).
fn listed_limits(d: &Daemon) -> Vec<(String, serde_json::Value)> {
    let (status, body) = common::admin::curl(d, "GET", "/api/admin/queues/v1", None);
    assert_eq!(status, 200, "{body}");
    let listing: serde_json::Value = serde_json::from_str(&body).unwrap();
    let ready = listing["ready"].as_array().cloned().unwrap_or_default();
    (ready.iter())
        .flat_map(|q| {
            let name = q["name"].as_str().unwrap_or("").to_string();
            (q["limits"].as_array().cloned().unwrap_or_default())
                .into_iter()
                .map(move |l| (name.clone(), l))
        })
        .collect()
}

/// One connection limit per source over all eight sites: at most two SMTP sessions
/// at once in all (the queues live on both shards), where the same queues without
/// it open one or more each; the admin API shows the limit with each queue. (The
/// sink counts sessions from EHLO to QUIT: gannet closes without waiting for the
/// reply to QUIT, as Postfix does, so a connection it has ended may still be open
/// at the sink for an instant while the next one is accepted.)
#[test]
fn a_limit_per_source_caps_the_connections_of_every_site_together() {
    let dns = dns();
    let run = |limit: &str| {
        let sink = slow_sink(0.2);
        let mut d = relay(&dns, &sink, limit);
        inject_spread(&d, "c", 4);
        let limits = if limit.is_empty() {
            Vec::new()
        } else {
            // Seen while the queues wait for their turn.
            let mut seen = Vec::new();
            assert!(
                eventually(20, || {
                    seen = listed_limits(&d);
                    !seen.is_empty()
                }),
                "no limit listed"
            );
            seen
        };
        sink_got(&sink, 32, 60);
        d.stop();
        (sink.connections()["max_sessions"].as_u64().unwrap(), limits)
    };
    let (together, limits) =
        run("[delivery.limits.per-ip]\nper = \"source\"\nconnection_limit = 2\n");
    let (alone, _) = run("");
    eprintln!("most connections at once: {together} under the limit, {alone} without");
    assert!(
        together <= 2,
        "{together} connections at once under a limit of 2"
    );
    assert!(alone > 2, "without the limit only {alone} at once");
    for (queue, limit) in &limits {
        assert!(queue.ends_with(".hop.test"), "{queue}");
        assert_eq!(limit["key"], "limit:per-ip@default", "{limit}");
        assert!(
            limit["connections_claimed"].as_u64().unwrap() <= 2,
            "{limit}"
        );
    }
}

/// A provider's message rate over all its sites, per source: the eight queues
/// together send at 20 a second (±5%) after the burst, where each, limited to 20 a
/// second on its own, sends all its mail at once.
#[test]
fn a_providers_rate_holds_over_all_its_sites() {
    let dns = dns();
    let provider = "[delivery.shaping]\nmax_message_rate = \"20/s\"\n\
                    [delivery.providers.hop]\nmx_suffix = [\".hop.test\"]\n";
    let run = |extra: &str| {
        let sink = common::relay::sink();
        let mut d = relay(&dns, &sink, &format!("{provider}{extra}"));
        inject_spread(&d, "r", 15);
        sink_got(&sink, 120, 60);
        d.stop();
        rate_after_burst(&sink, 20)
    };
    let together = run("provider_max_message_rate = \"20/s\"\n");
    let alone = run("");
    eprintln!("{together:.2}/s under the provider's 20/s; {alone:.2}/s without it");
    assert!(
        (19.0..=21.0).contains(&together),
        "eight sites under a provider's 20/s sent {together:.2}/s"
    );
    assert!(
        alone > 3.0 * 20.0,
        "each site on its own at 20/s sent only {alone:.2}/s together"
    );
}

/// Two gannetds (two shards each) sharing one Redis under `provider` (the keys
/// of a provider over .hop.test), to `sink`: each sends ten messages to each of
/// the eight sites at once; returns once the sink has all 160.
fn two_nodes_sending(sink: &Sink, provider: &str) {
    let dns = dns();
    let (_redis, port) = redis_server();
    let extra = format!(
        "[delivery.providers.hop]\nmx_suffix = [\".hop.test\"]\n{provider}\n\
         [cluster]\nredis_url = \"redis://127.0.0.1:{port}/\"\n"
    );
    let mut daemons: Vec<Daemon> = (0..2).map(|_| relay(&dns, sink, &extra)).collect();
    std::thread::scope(|s| {
        for (n, d) in daemons.iter().enumerate() {
            s.spawn(move || inject_spread(d, &format!("n{n}-"), 10));
        }
    });
    sink_got(sink, 160, 90);
    for d in &mut daemons {
        d.stop();
    }
}

/// With `[cluster]`, a provider's message rate holds over the nodes sharing one
/// Redis: two gannetds send to the eight sites 20 messages a second together
/// (±5%) after the burst.
#[test]
fn a_providers_rate_holds_across_the_nodes_of_a_cluster() {
    let sink = common::relay::sink();
    two_nodes_sending(&sink, "provider_max_message_rate = \"20/s\"");
    let rate = rate_after_burst(&sink, 20);
    eprintln!("two nodes under a provider's 20/s: {rate:.2}/s");
    assert!(
        (19.0..=21.0).contains(&rate),
        "two nodes under a provider's 20/s sent {rate:.2}/s"
    );
}

/// With `[cluster]`, a provider's connection limit holds over the nodes sharing one
/// Redis: two gannetds (four shards claiming) have at most three sessions open at
/// once to the eight sites together.
#[test]
fn a_providers_connection_limit_holds_across_the_nodes_of_a_cluster() {
    let sink = slow_sink(0.05);
    two_nodes_sending(&sink, "provider_connection_limit = 3");
    let most = sink.connections()["max_sessions"].as_u64().unwrap();
    eprintln!("two nodes under a provider's limit of 3: at most {most} sessions at once");
    assert!(most <= 3, "{most} sessions at once under a shared 3");
}
