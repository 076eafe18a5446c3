//! Retry schedules, maximum ages and TLS modes per scheduled queue and per provider
//! rule, and a message's own expiry (injection header, transmission option), against
//! real peers: dnsmasq's MX records, aiosmtpd answering 451 to `tempfail@` (and
//! offering no STARTTLS), Python's smtplib and curl as the clients. delivery's own
//! retry interval is an hour: whatever retries within the test's seconds does so
//! because a rule said so.

mod common;

use common::Daemon;
use common::relay::{dns, inject, sink, wait_events};

const KEY: &str = "gannet-retry-key-0b1c2d3e4f5a6b7c";

fn count(events: &[serde_json::Value], kind: &str, rcpt: &str) -> usize {
    (events.iter())
        .filter(|e| e["type"] == kind && e["rcpt_to"] == rcpt)
        .count()
}

#[test]
fn queues_and_providers_set_their_own_retries_ages_and_tls_and_messages_expire() {
    let (sink, dns) = (sink(), dns());
    let config = format!(
        "api_keys = [{{ name = \"t\", key_sha256 = \"{}\", tenant = \"acme\" }}]\n\
         [delivery]\ndns_server = \"127.0.0.1:{}\"\nsmtp_port = {}\n\
         retry_interval_secs = 3600\nmax_retry_interval_secs = 3600\n\
         [[delivery.queues]]\ntenant = \"fast\"\nretry_interval_secs = 1\nmax_retry_interval_secs = 1\n\
         [[delivery.queues]]\ndomain = \"h1.test\"\nretry_interval_secs = 1\nmax_retry_interval_secs = 1\n\
         [[delivery.queues]]\ncampaign = \"secure\"\ntls = \"required\"\n\
         [delivery.providers.rated]\nmx_suffix = [\".rated.test\"]\n\
         shaping = {{ retry_interval_secs = 1, max_retry_interval_secs = 1, max_age_secs = 3 }}\n",
        gannet_core::auth::KeyDigest::of(KEY),
        dns.port,
        sink.port
    );
    let daemon = Daemon::start("", &config);
    // A tenant's rule: retried every second; the same failure without it waits
    // delivery's hour.
    inject(
        &daemon,
        &["tempfail@mx.test"],
        "X-Gannet-Tenant: fast\r\nSubject: a\r\n\r\nx\r\n.\r\n",
    );
    inject(
        &daemon,
        &["tempfail@h2.test"],
        "Subject: b\r\n\r\nx\r\n.\r\n",
    );
    // A provider rule: retried every second, expired after three.
    inject(
        &daemon,
        &["tempfail@rated.test"],
        "Subject: c\r\n\r\nx\r\n.\r\n",
    );
    // The message's own expiry (two seconds), under the tenant's fast retries.
    inject(
        &daemon,
        &["tempfail@h0.test"],
        "X-Gannet-Tenant: fast\r\nX-Gannet-Expires: 2\r\nSubject: d\r\n\r\nx\r\n.\r\n",
    );
    // A campaign's rule demands TLS, which the sink does not offer: deferred; the
    // same mail without the campaign is delivered.
    inject(
        &daemon,
        &["r@h3.test"],
        "X-Gannet-Campaign: secure\r\nSubject: e\r\n\r\nx\r\n.\r\n",
    );
    inject(
        &daemon,
        &["r@h4.test"],
        "X-Gannet-Campaign: other\r\nSubject: f\r\n\r\nx\r\n.\r\n",
    );
    // A transmission's own expiry (options.expires), retried by h1.test's rule.
    let body = br#"{"options": {"expires": 2}, "recipients": [{"address": "tempfail@h1.test"}],
        "content": {"from": "s@b.test", "subject": "g", "text": "x"}}"#;
    let auth = format!("Authorization: {KEY}");
    let (status, reply) = common::curl(
        &daemon,
        "POST",
        "/api/v1/transmissions",
        &[&auth],
        Some(("application/json", body)),
    );
    assert_eq!(status, 200, "{reply}");

    let events = wait_events(&daemon, "the expirations", |e| {
        count(e, "expiration", "tempfail@rated.test") == 1
            && count(e, "expiration", "tempfail@h0.test") == 1
            && count(e, "expiration", "tempfail@h1.test") == 1
            && count(e, "transient_failure", "tempfail@mx.test") >= 3
            && count(e, "delivery", "r@h4.test") == 1
            && count(e, "transient_failure", "r@h3.test") == 1
    });
    assert_eq!(
        count(&events, "transient_failure", "tempfail@h2.test"),
        1,
        "delivery's hour"
    );
    assert_eq!(count(&events, "expiration", "tempfail@mx.test"), 0);
    // Expired by the provider's max_age (3 s) after a few one-second retries, and by
    // the message's own two seconds: never before them.
    for (rcpt, after_ms) in [
        ("tempfail@rated.test", 3000),
        ("tempfail@h0.test", 2000),
        ("tempfail@h1.test", 2000),
    ] {
        let expired = events
            .iter()
            .find(|e| e["type"] == "expiration" && e["rcpt_to"] == rcpt)
            .unwrap();
        let first = events
            .iter()
            .find(|e| e["type"] == "transient_failure" && e["rcpt_to"] == rcpt)
            .unwrap_or_else(|| panic!("{rcpt} was tried before it expired: {events:#?}"));
        let waited =
            expired["timestamp_ms"].as_u64().unwrap() - first["timestamp_ms"].as_u64().unwrap();
        assert!(
            waited + 1000 >= after_ms,
            "{rcpt} expired {waited} ms after its first failure"
        );
    }
    let secure = events
        .iter()
        .find(|e| e["type"] == "transient_failure" && e["rcpt_to"] == "r@h3.test")
        .unwrap();
    let why = secure["response"].as_str().unwrap();
    assert!(
        why.starts_with("451 4.7.5") && why.contains("STARTTLS"),
        "{secure}"
    );
}

#[test]
fn bad_expiries_and_queue_rules_are_refused_precisely() {
    let config = format!(
        "api_keys = [{{ name = \"t\", key_sha256 = \"{}\" }}]\n[delivery]\nsuspended = true\n",
        gannet_core::auth::KeyDigest::of(KEY)
    );
    let daemon = Daemon::start("", &config);
    let mut client = daemon.connect();
    client.expect("220");
    client.send(b"EHLO c.test\r\nMAIL FROM:<s@b.test>\r\nRCPT TO:<r@x.test>\r\nDATA\r\n");
    client.expect("250");
    client.expect("250");
    client.expect("250");
    client.expect("354");
    client.send(b"X-Gannet-Expires: tomorrow\r\nSubject: x\r\n\r\nx\r\n.\r\n");
    let reply = client.expect("554");
    assert!(
        reply.contains("5.6.0") && reply.contains("X-Gannet-Expires"),
        "{reply}"
    );
    // The session goes on.
    client.send(b"NOOP\r\n");
    client.expect("250");
    let auth = format!("Authorization: {KEY}");
    for bad in [r#""soon""#, "-1", "true", r#""2099-01-01T00:00:00Z""#] {
        let body = format!(
            r#"{{"options": {{"expires": {bad}}}, "recipients": [{{"address": "r@x.test"}}],
                "content": {{"from": "s@b.test", "subject": "g", "text": "x"}}}}"#
        );
        let (status, reply) = common::curl(
            &daemon,
            "POST",
            "/api/v1/transmissions",
            &[&auth],
            Some(("application/json", body.as_bytes())),
        );
        assert_eq!(status, 422, "{bad}: {reply}");
        assert!(reply.contains("options.expires"), "{reply}");
    }
    for (rule, says) in [
        ("tenant = \"a\"", "sets nothing"),
        ("domain = \"\"\nmax_age_secs = 5", "is empty"),
        ("tls = \"sometimes\"\ntenant = \"a\"", "unknown variant"),
    ] {
        let err = common::config_refused(&format!(
            "[delivery]\nsuspended = true\n[[delivery.queues]]\n{rule}\n"
        ));
        assert!(
            err.contains("delivery.queues") && err.contains(says),
            "{rule}: {err}"
        );
    }
}
