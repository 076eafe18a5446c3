use super::model::plan;
use super::profile::{Disk, Host, Linear, Profile, TlsCost};
use super::workload::Workload;

/// A profile with round numbers, to check the arithmetic by hand.
fn profile() -> Profile {
    Profile {
        revision: "test".into(),
        date: "2026-12-07".into(),
        host: Host {
            cores: 4,
            memory_bytes: 16 << 30,
            cpu: "test cpu".into(),
            kernel: "test".into(),
            disk: "test".into(),
        },
        shards: 1,
        core_share: 1.0,
        // 100 µs + 10 µs per KiB to accept; relaying adds 50 µs + 5 per KiB.
        smtp_accept_us: Linear {
            base: 100.0,
            per_kib: 10.0,
        },
        relay_us: Linear {
            base: 150.0,
            per_kib: 15.0,
        },
        http_us: Linear {
            base: 40.0,
            per_kib: 2.0,
        },
        // Not measured (an older profile): generation plus SMTP's delivery part.
        http_relay_us: Linear::default(),
        dkim_us: [
            (
                "rsa2048".to_string(),
                Linear {
                    base: 1000.0,
                    per_kib: 1.0,
                },
            ),
            (
                "ed25519".to_string(),
                Linear {
                    base: 50.0,
                    per_kib: 1.0,
                },
            ),
        ]
        .into(),
        tls: TlsCost {
            handshake_us: 1000.0,
            per_kib_us: 1.0,
        },
        disk: Disk {
            flush_p50_us: 1000.0,
            flush_p99_us: 4000.0,
            bandwidth_bytes_per_s: 100e6,
        },
        spool_accept_bytes: Linear {
            base: 1000.0,
            per_kib: 1024.0,
        },
        spool_relay_bytes: Linear {
            base: 1100.0,
            per_kib: 1024.0,
        },
        // Not measured (an older profile): the spool bytes stand in.
        disk_write_accept_bytes: Linear::default(),
        disk_write_relay_bytes: Linear::default(),
        queued_bytes_per_message: 1000.0,
        base_rss_bytes: (1u64 << 30) as f64,
        dkim_key_bytes: 0.0,
        queue_bytes: 0.0,
        ack_p99_base_ms: 0.0,
    }
}

fn workload(extra: &str) -> Workload {
    Workload::parse(
        &format!("messages_per_day = 86400000\nsizes = [[10240, 1.0]]\n{extra}"),
        "w.toml",
    )
    .unwrap()
}

fn limit(p: &super::model::Plan, name: &str) -> f64 {
    p.resources
        .iter()
        .find(|r| r.name == name)
        .unwrap()
        .limit_per_s
}

#[test]
fn cpu_per_message_adds_up_by_hand() {
    // SMTP, one recipient, no TLS, no DKIM, nothing deferred: accept 100 + 10×10 =
    // 200 µs, delivery (150 + 150) − 200 = 100 µs: 300 µs; 4 cores × 75% → 10,000/s.
    let w = workload("");
    let p = plan(&w, &profile()).unwrap();
    assert!((p.cpu_us.total - 300.0).abs() < 1e-6, "{:?}", p.cpu_us);
    assert!((limit(&p, "cpu") - 10_000.0).abs() < 1e-6);
    assert_eq!(p.average_per_s, 1000.0);
    assert_eq!(p.peak_per_s, 1000.0);
    // Half the messages with two recipients, DKIM rsa2048, TLS in and out.
    let w = workload(
        "recipients_per_message = 2\n[dkim]\nalgorithm = \"rsa2048\"\n[tls]\ninbound_share = 1.0\noutbound_share = 0.5\n",
    );
    let p = plan(&w, &profile()).unwrap();
    assert!((p.cpu_us.accept - 200.0).abs() < 1e-6);
    // 1000 µs handshake over 10 messages per connection + 10 KiB × 1 µs.
    assert!((p.cpu_us.tls_in - 110.0).abs() < 1e-6);
    assert!((p.cpu_us.dkim - 1010.0).abs() < 1e-6);
    assert!((p.cpu_us.delivery - 200.0).abs() < 1e-6);
    // Two deliveries, half of them over TLS: 2 × 0.5 × 110.
    assert!((p.cpu_us.tls_out - 110.0).abs() < 1e-6);
    assert_eq!(p.bottleneck, "cpu");
    // Over HTTP: generation 40 + 2 × 10 = 60 µs; its delivery SMTP's 100 µs, or,
    // measured for generated messages, 90 + 3 × 10 − 60 = 60 µs.
    let w = workload("http_share = 1.0\n");
    let p = plan(&w, &profile()).unwrap();
    assert!((p.cpu_us.accept - 60.0).abs() < 1e-6, "{:?}", p.cpu_us);
    assert!((p.cpu_us.delivery - 100.0).abs() < 1e-6);
    let mut measured = profile();
    measured.http_relay_us = Linear {
        base: 90.0,
        per_kib: 3.0,
    };
    let p = plan(&w, &measured).unwrap();
    assert!((p.cpu_us.delivery - 60.0).abs() < 1e-6, "{:?}", p.cpu_us);
}

#[test]
fn deferrals_cost_attempts_and_memory() {
    // 50% deferred, retries every 300 s (max 300 s), for 900 s: three retries, four
    // tries. Attempts per delivery: 1 + .5 + .25 + .125 = 1.875.
    let w = workload(
        "[deferral]\nshare = 0.5\nretry_interval_secs = 300\nmax_retry_interval_secs = 300\nmax_age_secs = 900\n",
    );
    let p = plan(&w, &profile()).unwrap();
    assert!((p.cpu_us.delivery - 187.5).abs() < 1e-6, "{:?}", p.cpu_us);
    // Waited once deferred: 300 + .5 × 300 + .25 × 300 = 525 s; each msg/s keeps
    // .5 × 525 = 262.5 deliveries of 1000 bytes: (16 GiB × .75 − 1 GiB) / 262,500.
    let expected = ((16u64 << 30) as f64 * 0.75 - (1u64 << 30) as f64) / 262_500.0;
    assert!((limit(&p, "memory") - expected).abs() < 1e-6);
    // Nothing deferred: memory is no limit.
    let p = plan(&workload(""), &profile()).unwrap();
    assert!(limit(&p, "memory").is_infinite());
}

#[test]
fn the_disk_limits_by_bandwidth_and_by_the_latency_target() {
    // 11,240 bytes accepted + 100 for the delivery: 11,340 per message.
    let p = plan(&workload("ack_p99_ms = 50\n"), &profile()).unwrap();
    let per = 11_340.0;
    assert!((limit(&p, "disk bandwidth") - 100e6 * 0.75 / per).abs() < 1e-6);
    // The floor is 1 + 4 = 5 ms: under 50 ms while the disk is under 90% busy —
    // beyond the 75% allowed, so the bandwidth's limit is the latency's too; at 95%
    // allowed, the latency target binds first.
    assert!((limit(&p, "disk flush latency") - 100e6 / per * 0.75).abs() < 1e-6);
    assert_eq!(p.bottleneck, "disk bandwidth");
    let p = plan(
        &workload("ack_p99_ms = 50\n[host]\nutilization = 0.95\n"),
        &profile(),
    )
    .unwrap();
    assert!((limit(&p, "disk flush latency") - 100e6 / per * 0.9).abs() < 1e-6);
    assert_eq!(p.bottleneck, "disk flush latency");
    // Bytes written to the disk, when measured, are what the bandwidth is spent
    // on: 2,000 + 10,240 accepted, 600 more for the delivery.
    let mut written = profile();
    written.disk_write_accept_bytes = Linear {
        base: 2000.0,
        per_kib: 1024.0,
    };
    written.disk_write_relay_bytes = Linear {
        base: 2600.0,
        per_kib: 1024.0,
    };
    let p = plan(&workload("ack_p99_ms = 50\n"), &written).unwrap();
    assert!((limit(&p, "disk bandwidth") - 100e6 * 0.75 / 12_840.0).abs() < 1e-6);
    // A loose target lets the disk fill past the allowed utilization: the latency
    // limit is the bandwidth's, and the bandwidth is named first, even at 100%.
    let mut slow = profile();
    slow.disk.bandwidth_bytes_per_s = 1e6;
    let p = plan(
        &workload("ack_p99_ms = 2000\n[host]\nutilization = 1.0\n"),
        &slow,
    )
    .unwrap();
    assert!((limit(&p, "disk flush latency") - limit(&p, "disk bandwidth")).abs() < 1e-9);
    assert_eq!(p.bottleneck, "disk bandwidth");
    // What the protocol and scheduling add comes off the target: 5 ms of floor
    // under 50 − 25 ms while the disk is under 80% busy.
    let mut waits = profile();
    waits.ack_p99_base_ms = 25.0;
    let p = plan(&workload("ack_p99_ms = 50\n"), &waits).unwrap();
    assert!((limit(&p, "disk flush latency") - 100e6 / per * 0.75).abs() < 1e-6);
    // At the peak (1,000/s on one host, the disk 11.34% busy) the predicted p99 is
    // 25 + 5 / (1 − 0.1134) ms.
    assert_eq!(p.hosts, 1);
    assert!((p.ack_p99_ms - (25.0 + 5.0 / (1.0 - 1000.0 * per / 100e6))).abs() < 1e-9);
    let p = plan(&workload("ack_p99_ms = 30\n"), &waits).unwrap();
    assert_eq!(limit(&p, "disk flush latency"), 0.0);
    assert!(p.notes.iter().any(|n| n.contains("25.0 ms of protocol")));
    // A target under the floor: no rate meets it, and the plan says so.
    let p = plan(&workload("ack_p99_ms = 4\n"), &profile()).unwrap();
    assert_eq!(p.sustainable_per_s, 0.0);
    assert_eq!(p.bottleneck, "disk flush latency");
    assert_eq!(p.hosts, 0);
    assert!(
        p.notes
            .iter()
            .any(|n| n.contains("more than the 4 ms target"))
    );
}

#[test]
fn hosts_cover_the_peak_and_name_the_first_bottleneck() {
    // 1,000/s on average, ×3 at the peak; one host does 10,000/s on CPU but the
    // disk's bandwidth allows 6,614/s.
    let w = workload("peak_factor = 3\n[host]\ncores = 4\n");
    let p = plan(&w, &profile()).unwrap();
    assert_eq!(p.bottleneck, "disk bandwidth");
    assert_eq!(p.hosts, 1);
    // Twenty times the volume: ceil(60,000 / 6,613.8) = 10 hosts.
    let w = Workload::parse(
        "messages_per_hour = 72000000\npeak_factor = 3\nsizes = [[10240, 1.0]]\n",
        "w.toml",
    )
    .unwrap();
    let p = plan(&w, &profile()).unwrap();
    assert_eq!(p.peak_per_s, 60_000.0);
    assert_eq!(p.hosts, 10);
    let disk = p
        .resources
        .iter()
        .find(|r| r.name == "disk bandwidth")
        .unwrap();
    assert!((disk.peak_use - 6000.0 / disk.limit_per_s * 0.75).abs() < 1e-9);
    // More cores move the bottleneck nowhere (the disk is shared); a host with a
    // faster disk is CPU-bound.
    let mut fast = profile();
    fast.disk.bandwidth_bytes_per_s = 1e9;
    let p = plan(&workload(""), &fast).unwrap();
    assert_eq!(p.bottleneck, "cpu");
}

#[test]
fn an_uncalibrated_rsa_size_scales_from_rsa2048() {
    let w = workload("[dkim]\nalgorithm = \"rsa4096\"\n");
    let p = plan(&w, &profile()).unwrap();
    // 1000 µs × 8 + 10 KiB × 1 µs.
    assert!((p.cpu_us.dkim - 8010.0).abs() < 1e-6);
    let mut bare = profile();
    bare.dkim_us.clear();
    let err = plan(&workload("[dkim]\nalgorithm = \"ed25519\"\n"), &bare).unwrap_err();
    assert!(err.contains("no DKIM cost for ed25519"), "{err}");
}

#[test]
fn bad_workloads_name_the_key_and_line() {
    let cases: &[(&str, &str)] = &[
        (
            "sizes = [[10240, 1.0]]\n",
            "set messages_per_day or messages_per_hour",
        ),
        (
            "messages_per_day = 10\nmessages_per_hour = 1\nsizes = [[1, 1.0]]\n",
            "w.toml:2:1: key `messages_per_hour`: set messages_per_day or messages_per_hour, not both",
        ),
        (
            "messages_per_day = 10\nsizes = [[1000, 0.5], [2000, 0.2]]\n",
            "w.toml:2:1: key `sizes`: the shares sum to 0.7, not 1",
        ),
        (
            "messages_per_day = 10\nsizes = [[1000, 1.0]]\nhttp_share = 2\n",
            "w.toml:3:1: key `http_share`: must be between 0 and 1",
        ),
        (
            "messages_per_day = 10\nsizes = [[1000, 1.0]]\n[dkim]\nalgorithm = \"dsa\"\n",
            "w.toml:4:1: key `dkim.algorithm`: unknown algorithm",
        ),
        (
            "messages_per_day = 10\nsizes = [[1000, 1.0]]\n[deferral]\nshare = 1.5\n",
            "w.toml:4:1: key `deferral.share`: must be at least 0 and under 0.99",
        ),
        (
            "messages_per_day = 10\nsizes = [[1000, 1.0]]\npeak = 3\n",
            "w.toml:3:1: key `peak`: unknown field `peak`",
        ),
        (
            "messages_per_day = \"many\"\nsizes = [[1000, 1.0]]\n",
            "w.toml:1:20: key `messages_per_day`: invalid type",
        ),
        (
            "messages_per_day = 10\nsizes = [[1000, 1.0]]\n[host]\nutilization = 0\n",
            "w.toml:4:1: key `host.utilization`: must be in (0, 1]",
        ),
    ];
    for (text, expected) in cases {
        let err = Workload::parse(text, "w.toml").unwrap_err().to_string();
        assert!(err.contains(expected), "{text:?}: {err}");
    }
}

#[test]
fn connections_to_a_long_tail_of_domains_are_reused_less() {
    // 1,000 msgs/s, 30% to the busiest domain, the rest over 100,000 others: each
    // gets 0.007/s, so a connection idle for up to 60 s carries e^0.42 = 1.52
    // messages — and only 4 × 1,000 idle slots for 100,000 domains: 4% of them keep
    // one. 1 / (0.3 / 10 + 0.7 / (0.04 × 1.522 + 0.96)) = 1.397 per connection.
    let w =
        workload("destination_domains = 100001\n[tls]\noutbound_share = 1.0\n[host]\ncores = 4\n");
    let (reuse, note) = super::model::outbound_reuse(&w, 1000.0, 4.0);
    let kept = 0.42f64.exp();
    let expected = 1.0 / (0.3 / 10.0 + 0.7 / (0.04 * kept + 0.96));
    assert!((reuse - expected).abs() < 1e-9, "{reuse} {expected}");
    assert!(
        note.contains("100000 domains besides the busiest"),
        "{note}"
    );
    // The plan uses it: each delivery pays a handshake over `reuse` deliveries.
    let p = plan(&w, &profile()).unwrap();
    assert_eq!(p.hosts, 1);
    assert!((p.messages_per_outbound_connection - expected).abs() < 1e-9);
    assert!((p.cpu_us.tls_out - (1000.0 / expected + 10.0)).abs() < 1e-6);
    // A few busy domains keep the configured reuse.
    let w = workload("destination_domains = 10\n");
    let (reuse, _) = super::model::outbound_reuse(&w, 1000.0, 4.0);
    assert_eq!(reuse, 10.0);
    let w = workload("destination_domains = 1\n");
    assert_eq!(super::model::outbound_reuse(&w, 1.0, 1.0).0, 10.0);
}

#[test]
fn every_domain_queue_takes_memory() {
    // 100,000 domains × 10,000 bytes beside 1 GiB idle: more than 75% of 1 GiB.
    let mut p = profile();
    p.queue_bytes = 10_000.0;
    let w = workload("destination_domains = 100000\n[host]\nmemory_gib = 1\n");
    let made = plan(&w, &p).unwrap();
    assert_eq!(limit(&made, "memory"), 0.0);
    assert_eq!(made.hosts, 0);
    assert!(
        made.notes
            .iter()
            .any(|n| n.contains("queues of 100000 destination domains")),
        "{:?}",
        made.notes
    );
    // With room, the queues come off what the deferred backlog may use.
    let w = workload(
        "destination_domains = 100000\n[deferral]\nshare = 0.5\nretry_interval_secs = 300\nmax_retry_interval_secs = 300\nmax_age_secs = 900\n",
    );
    let made = plan(&w, &p).unwrap();
    let expected =
        ((16u64 << 30) as f64 * 0.75 - (1u64 << 30) as f64 - 1e9) / (0.5 * 525.0 * 1000.0);
    assert!((limit(&made, "memory") - expected).abs() < 1e-6);
}
