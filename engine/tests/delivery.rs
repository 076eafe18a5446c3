//! Mail injected over SMTP leaves through gannet's SMTP client to a server nobody on
//! this project wrote (aiosmtpd), with every outcome an event: delivery, bounce with
//! its class, transient failure with retries, and messages recovered after a restart
//! delivered from their last state.

mod common;

use common::Daemon;
use common::peers::free_port;
use common::relay::{delivery_config, dns, inject, of, sink, wait_events};

#[test]
fn relays_with_per_recipient_outcomes_and_retries() {
    let sink = sink();
    let dns = dns();
    let config = delivery_config(&format!("\"d.test\" = [\"127.0.0.1:{}\"]", sink.port))
        + &format!(
            "dns_server = \"127.0.0.1:{}\"\nsmtp_port = {}\n",
            dns.port, sink.port
        );
    let mut daemon = Daemon::start("", &config);
    let id = inject(
        &daemon,
        &[
            "ok1@d.test",
            "ok2@d.test",
            "permfail@d.test",
            "tempfail@d.test",
            "x@nowhere.test",
            "m@mx.test",
            "f@fo.test",
        ],
        "Subject: relay\r\nX-Gannet-Tenant: acme\r\n\r\n..leading dot\r\nline\r\n...\r\n.\r\n",
    );
    let events = wait_events(&daemon, "outcomes and two retries", |e| {
        of(e, "delivery", "ok2@d.test").len() == 1
            && of(e, "bounce", "permfail@d.test").len() == 1
            && of(e, "transient_failure", "tempfail@d.test").len() >= 2
            && of(e, "bounce", "x@nowhere.test").len() == 1
            && of(e, "delivery", "m@mx.test").len() == 1
            && of(e, "delivery", "f@fo.test").len() == 1
    });
    let delivered = of(&events, "delivery", "ok1@d.test");
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0]["message_id"], id);
    assert_eq!(delivered[0]["tenant"], "acme");
    assert_eq!(delivered[0]["site"], format!("127.0.0.1:{}", sink.port));
    assert!(
        delivered[0]["response"]
            .as_str()
            .unwrap()
            .starts_with("250 2.0.0")
    );
    assert_eq!(delivered[0]["response_code"], 250);
    assert_eq!(delivered[0]["enhanced_code"], "2.0.0");
    assert!(delivered[0]["msg_size"].as_u64().unwrap() > 50);
    assert_eq!(delivered[0]["queue"], "acme@d.test");
    let bounce = of(&events, "bounce", "permfail@d.test")[0];
    assert_eq!(bounce["bounce_class"], 10);
    assert_eq!(
        (
            bounce["response_code"].as_u64(),
            bounce["enhanced_code"].as_str()
        ),
        (Some(550), Some("5.1.1"))
    );
    assert!(
        bounce["response"]
            .as_str()
            .unwrap()
            .starts_with("550 5.1.1")
    );
    let retries: Vec<u64> = of(&events, "transient_failure", "tempfail@d.test")
        .iter()
        .map(|e| e["num_retries"].as_u64().unwrap())
        .collect();
    assert!(retries.windows(2).all(|w| w[1] > w[0]), "{retries:?}");
    let nxdomain = of(&events, "bounce", "x@nowhere.test")[0];
    assert!(
        nxdomain["response"]
            .as_str()
            .unwrap()
            .starts_with("550 5.1.2"),
        "{nxdomain}"
    );
    assert_eq!(nxdomain["bounce_class"], 10);
    // mx.test went to its MX host, a site of its own.
    assert_eq!(
        of(&events, "delivery", "m@mx.test")[0]["site"],
        "mx1.mx.test"
    );

    // The sink got the two good d.test recipients in one transaction and m@mx.test in
    // another (another site), with the content intact.
    let messages = sink.messages();
    assert_eq!(messages.len(), 3, "{messages:#?}");
    let find = |rcpts: serde_json::Value| {
        messages
            .iter()
            .find(|m| m["rcpt_tos"] == rcpts)
            .unwrap_or_else(|| panic!("{rcpts} in {messages:#?}"))
    };
    find(serde_json::json!(["m@mx.test"]));
    // MX failover: the preferred host refused, the backup took the message.
    let failover = of(&events, "delivery", "f@fo.test")[0];
    assert_eq!(failover["site"], "dead.fo.test|live.fo.test");
    assert_eq!(failover["peer"], format!("127.0.0.1:{}", sink.port));
    find(serde_json::json!(["f@fo.test"]));
    let data = find(serde_json::json!(["ok1@d.test", "ok2@d.test"]))["data"]
        .as_str()
        .unwrap();
    assert!(data.starts_with("Received: from c.test"), "{data}");
    assert!(
        data.ends_with("\r\n\r\n.leading dot\r\nline\r\n..\r\n"),
        "{data:?}"
    );
    assert!(!data.contains("X-Gannet-Tenant"));

    // The spool keeps the message with its three finished recipients and its retries.
    daemon.stop();
    let spooled = common::spooled(&daemon.data_dir());
    assert_eq!(spooled.len(), 1);
}

#[test]
fn messages_recovered_after_a_restart_are_delivered() {
    let sink = sink();
    let dead = free_port();
    let mut daemon = Daemon::start(
        "",
        &delivery_config(&format!("\"d.test\" = [\"127.0.0.1:{dead}\"]")),
    );
    let id = inject(
        &daemon,
        &["a@d.test", "b@d.test"],
        "Subject: later\r\n\r\nbody\r\n.\r\n",
    );
    wait_events(&daemon, "a failed connection", |e| {
        !of(e, "transient_failure", "b@d.test").is_empty()
    });
    daemon.kill();

    // Restart with the route pointing at a live server: the recovered message goes out.
    let dir = std::mem::replace(&mut daemon.dir, tempfile::tempdir().unwrap());
    let config = common::config_text(
        dir.path(),
        "",
        &delivery_config(&format!("\"d.test\" = [\"127.0.0.1:{}\"]", sink.port)),
    );
    let mut restarted = Daemon::start_in(dir, &config);
    let events = wait_events(&restarted, "delivery after restart", |e| {
        of(e, "delivery", "b@d.test").len() == 1
    });
    assert_eq!(of(&events, "delivery", "a@d.test")[0]["message_id"], id);
    let messages = sink.messages();
    assert_eq!(messages.len(), 1);
    assert!(
        messages[0]["data"]
            .as_str()
            .unwrap()
            .ends_with("\r\n\r\nbody\r\n")
    );
    restarted.stop();
    assert!(
        common::spooled(&restarted.data_dir()).is_empty(),
        "the delivered message was tombstoned"
    );
}

/// A site is delivered by the shard that owns it: a message whose domains' sites are
/// owned by both shards crosses the core mesh, is delivered by the owner, and the
/// outcome comes back to the shard that spooled it (events, tombstone).
#[test]
fn parts_cross_to_the_shard_that_owns_their_site() {
    let sink = sink();
    let dns = dns();
    // One lookup at a time per shard: eight domains wait their turn for it.
    let config = delivery_config("")
        + &format!(
            "dns_server = \"127.0.0.1:{}\"\nsmtp_port = {}\ndns_lookups_max = 1\n",
            dns.port, sink.port
        );
    let mut daemon = Daemon::start("", &config);
    let recipients: Vec<String> = (0..8).map(|i| format!("r@h{i}.test")).collect();
    let refs: Vec<&str> = recipients.iter().map(String::as_str).collect();
    let id = inject(&daemon, &refs, "Subject: spread\r\n\r\nbody\r\n.\r\n");
    let events = wait_events(&daemon, "eight deliveries", |e| {
        recipients.iter().all(|r| of(e, "delivery", r).len() == 1)
    });
    assert!(
        daemon.metric("mesh_handoffs_total") >= 1,
        "no part crossed the mesh"
    );
    for r in &recipients {
        let e = of(&events, "delivery", r)[0];
        assert_eq!(e["message_id"], id);
        assert!(e["site"].as_str().unwrap().ends_with(".hop.test"), "{e}");
    }
    assert_eq!(sink.messages().len(), 8);
    daemon.stop();
    assert!(
        common::spooled(&daemon.data_dir()).is_empty(),
        "the home shard tombstoned the message"
    );
}

/// A message bound to a pool leaves from that pool's source address with its EHLO
/// name; others leave from the default source.
#[test]
fn egress_pools_bind_their_source_address() {
    let sink = sink();
    let config = delivery_config(&format!("\"d.test\" = [\"127.0.0.1:{}\"]", sink.port))
        + "sources = { lo2 = { source_ip = \"127.0.0.2\", ehlo_name = \"out2.test\" } }\n\
           pools = { second = [{ source = \"lo2\", weight = 1 }] }\n";
    let daemon = Daemon::start("", &config);
    inject(
        &daemon,
        &["a@d.test"],
        "Subject: pooled\r\nX-Gannet-Pool: second\r\n\r\nx\r\n.\r\n",
    );
    inject(&daemon, &["b@d.test"], "Subject: plain\r\n\r\ny\r\n.\r\n");
    let events = wait_events(&daemon, "two deliveries", |e| {
        of(e, "delivery", "a@d.test").len() == 1 && of(e, "delivery", "b@d.test").len() == 1
    });
    let pooled = of(&events, "delivery", "a@d.test")[0];
    assert_eq!(
        (
            pooled["egress_source"].as_str(),
            pooled["sending_ip"].as_str()
        ),
        (Some("lo2"), Some("127.0.0.2"))
    );
    assert_eq!(pooled["ip_pool"], "second");
    let messages = sink.messages();
    let by_rcpt = |r: &str| messages.iter().find(|m| m["rcpt_tos"][0] == r).unwrap();
    assert_eq!(
        (
            by_rcpt("a@d.test")["peer"].as_str(),
            by_rcpt("a@d.test")["helo"].as_str()
        ),
        (Some("127.0.0.2"), Some("out2.test"))
    );
    assert_eq!(
        (
            by_rcpt("b@d.test")["peer"].as_str(),
            by_rcpt("b@d.test")["helo"].as_str()
        ),
        (Some("127.0.0.1"), Some("gannet.test"))
    );
}

/// A connection with nothing left to send waits idle for its queue's next message
/// (`idle_timeout_secs`, 60 by default) and carries it; one the server closed
/// meanwhile (aiosmtpd's 421 after an idle timeout) is replaced without a failed
/// attempt; with `idle_timeout_secs = 0`, or no idle connection allowed per shard
/// (`idle_connections_max = 0`), each message has its own connection.
#[test]
fn idle_connections_carry_the_next_message_and_closed_ones_are_replaced() {
    // (sink's idle timeout, extra config, pause between the messages, same connection)
    let cases = [
        (None, "", 0, true),
        (Some(0.5), "", 1500, false),
        (
            None,
            "[delivery.shaping]\nidle_timeout_secs = 0\n",
            0,
            false,
        ),
        (None, "idle_connections_max = 0\n", 0, false),
    ];
    for (sink_timeout, extra, pause_ms, reused) in cases {
        let sink = common::relay::sink_closing_idle_sessions(sink_timeout);
        let config = delivery_config(&format!("\"d.test\" = [\"127.0.0.1:{}\"]", sink.port));
        let daemon = Daemon::start("", &(config + extra));
        for (n, rcpt) in ["a@d.test", "b@d.test"].into_iter().enumerate() {
            std::thread::sleep(std::time::Duration::from_millis(pause_ms * n as u64));
            inject(&daemon, &[rcpt], "Subject: idle\r\n\r\nbody\r\n.\r\n");
            wait_events(&daemon, rcpt, |e| of(e, "delivery", rcpt).len() == 1);
        }
        let events = daemon.events();
        assert!(
            !events.iter().any(|e| e["type"] == "transient_failure"),
            "{sink_timeout:?}: {events:#?}"
        );
        let messages = sink.messages();
        assert_eq!(messages.len(), 2);
        assert_eq!(
            messages[0]["peer_port"] == messages[1]["peer_port"],
            reused,
            "{sink_timeout:?} {extra:?}: {messages:?}"
        );
        if reused {
            // The gauge is refreshed by the queue maintainer (at least once a second).
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while daemon.metric("delivery_connections_idle") != 1 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no idle connection counted"
                );
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
}

/// Recipient domains come from outside: a stream of distinct ones must not grow the
/// DNS cache without bound. 300 domains that do not exist (NXDOMAIN from dnsmasq,
/// negatively cached) bounce, and each shard's cache stays within its 16 answers.
#[test]
fn the_dns_cache_stays_within_its_bound() {
    let dns = dns();
    let config = format!(
        "[delivery]\ndns_server = \"127.0.0.1:{}\"\ndns_cache_entries_max = 16\n",
        dns.port
    );
    let daemon = Daemon::start("recipients_max = 1000\n", &config);
    let rcpts: Vec<String> = (0..300).map(|i| format!("a@n{i}.test")).collect();
    let refs: Vec<&str> = rcpts.iter().map(String::as_str).collect();
    inject(
        &daemon,
        &refs,
        "Subject: many domains\r\n\r\nhello\r\n.\r\n",
    );
    // (The failure report to the sender, whose domain does not exist either,
    // bounces too: the null sender's bounce is not counted.)
    wait_events(&daemon, "300 bounces", |e| {
        e.iter()
            .filter(|e| e["type"] == "bounce" && e["sender"] != "")
            .count()
            == 300
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while daemon.metric("dns_cache_evicted_total") == 0 {
        assert!(std::time::Instant::now() < deadline, "nothing was evicted");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let cached = daemon.metric("dns_cache_entries");
    assert!(
        (1..=32).contains(&cached),
        "{cached} answers cached on 2 shards"
    );
    // The domains known to take no mail are bounded the same way.
    let known = daemon.metric("delivery_sites_known");
    assert!((1..=32).contains(&known), "{known} sites known on 2 shards");
}

/// A domain's site, once found in DNS, serves its later messages without another
/// lookup while its answers last: six messages one after another to a domain with
/// an MX take at most one lookup per shard (each shard keeps its own), and each
/// lookup three questions (MX, A, AAAA), not six lookups.
#[test]
fn a_known_site_takes_no_lookup_per_message() {
    let sink = sink();
    let dns = dns();
    let config = format!(
        "[delivery]\ntls = \"disabled\"\ndns_server = \"127.0.0.1:{}\"\nsmtp_port = {}\n",
        dns.port, sink.port
    );
    let daemon = Daemon::start("", &config);
    for i in 0..6 {
        inject(
            &daemon,
            &["m@mx.test"],
            "Subject: known site\r\n\r\nhello\r\n.\r\n",
        );
        wait_events(&daemon, "the message delivered", |e| {
            of(e, "delivery", "m@mx.test").len() == i + 1
        });
    }
    let lookups = daemon.metric("delivery_site_lookups_total");
    assert!(
        (1..=2).contains(&lookups),
        "{lookups} site lookups for 6 messages"
    );
    let questions = daemon.metric("dns_queries_total");
    assert!(
        questions <= 3 * lookups,
        "{questions} DNS questions for {lookups} lookups"
    );
    assert_eq!(sink.messages().len(), 6);
}
