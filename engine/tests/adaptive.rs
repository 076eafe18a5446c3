//! Adaptive delivery against a real SMTP server (aiosmtpd) answering like a mailbox
//! provider: response rules suspend a ready queue, make a block temporary, bounce
//! what waits — and only for the site that answered; events say which rule, until
//! when, and when it ended.

mod common;

use common::Daemon;
use common::relay::{inject, of, sink, wait_events};

/// Two sites, each its own sink, under the response rules `rules` (TOML lines of
/// `[delivery]`).
fn daemon_with_rules(rules: &str) -> (Daemon, common::relay::Sink, common::relay::Sink) {
    let (a, b) = (sink(), sink());
    let config = format!(
        "[delivery]\nretry_interval_secs = 1\nmax_retry_interval_secs = 1\n\
         routes = {{ \"a.test\" = [\"127.0.0.1:{}\"], \"b.test\" = [\"127.0.0.1:{}\"] }}\n{rules}",
        a.port, b.port
    );
    (Daemon::start("", &config), a, b)
}

fn adaptive<'a>(events: &'a [serde_json::Value], change: &str) -> Vec<&'a serde_json::Value> {
    events
        .iter()
        .filter(|e| e["type"] == "adaptive" && e["change"] == change)
        .collect()
}

#[test]
fn a_block_suspends_its_site_for_the_rule_s_duration_and_is_retried_not_bounced() {
    let (daemon, sink_a, _sink_b) = daemon_with_rules(
        "automation = [{ enhanced = ['5.7.1'], regex = 'TSS04', actions = ['suspend', 'transient'], duration = 3 }]\n",
    );
    inject(
        &daemon,
        &["blocked@a.test"],
        "Subject: one\r\n\r\nx\r\n.\r\n",
    );
    let events = wait_events(&daemon, "the rule firing", |e| {
        !adaptive(e, "fired").is_empty() && !of(e, "transient_failure", "blocked@a.test").is_empty()
    });
    let fired = adaptive(&events, "fired")[0];
    assert_eq!(fired["rule"], "default#0");
    assert_eq!(
        fired["actions"],
        serde_json::json!(["suspend", "transient"])
    );
    assert!(
        fired["reply"].as_str().unwrap().contains("[TSS04]"),
        "{fired}"
    );
    let until = fired["until_ms"].as_u64().unwrap();
    assert!(
        fired["queue"]
            .as_str()
            .unwrap()
            .ends_with(&format!("127.0.0.1:{}", sink_a.port))
    );
    // The 554 was settled as a temporary failure, saying why.
    let deferred = of(&events, "transient_failure", "blocked@a.test")[0];
    assert_eq!(deferred["response_code"], 454);
    assert!(
        deferred["response"]
            .as_str()
            .unwrap()
            .contains("made temporary by response rule default#0"),
        "{deferred}"
    );
    assert!(of(&events, "bounce", "blocked@a.test").is_empty());
    // While suspended, the other site delivers; the suspended one waits for the end.
    inject(
        &daemon,
        &["ok@a.test", "ok@b.test"],
        "Subject: two\r\n\r\ny\r\n.\r\n",
    );
    let events = wait_events(&daemon, "both delivered and the rule ended", |e| {
        !of(e, "delivery", "ok@a.test").is_empty()
            && !of(e, "delivery", "ok@b.test").is_empty()
            && !adaptive(e, "ended").is_empty()
    });
    let at = |rcpt: &str| {
        of(&events, "delivery", rcpt)[0]["timestamp_ms"]
            .as_u64()
            .unwrap()
    };
    assert!(at("ok@b.test") < until, "b.test was not held");
    assert!(
        at("ok@a.test") >= until,
        "a.test delivered at {} before {until}",
        at("ok@a.test")
    );
    let ended = adaptive(&events, "ended")[0];
    assert_eq!(ended["rule"], "default#0");
    assert!(ended["timestamp_ms"].as_u64().unwrap() >= until);
    // (blocked@a.test is retried once the suspension ends, and fires it again.)
    assert!(daemon.metric("adaptive_rules_fired_total") >= 1);
    assert!(daemon.metric("adaptive_rules_ended_total") >= 1);
}

#[test]
fn a_bounce_rule_bounces_what_waits_for_its_site_only() {
    let (daemon, _sink_a, _sink_b) = daemon_with_rules(
        "automation = [{ codes = [451], regex = 'unusual rate', actions = ['bounce'], duration = 60 }]\n",
    );
    inject(
        &daemon,
        &["throttled@a.test"],
        "Subject: one\r\n\r\nx\r\n.\r\n",
    );
    wait_events(&daemon, "the rule firing", |e| {
        !adaptive(e, "fired").is_empty()
    });
    inject(
        &daemon,
        &["ok@a.test", "ok@b.test"],
        "Subject: two\r\n\r\ny\r\n.\r\n",
    );
    let events = wait_events(&daemon, "a bounce and a delivery", |e| {
        !of(e, "bounce", "ok@a.test").is_empty() && !of(e, "delivery", "ok@b.test").is_empty()
    });
    let bounce = of(&events, "bounce", "ok@a.test")[0];
    assert!(
        bounce["response"]
            .as_str()
            .unwrap()
            .contains("bounced by response rule default#0"),
        "{bounce}"
    );
    // The reply that fired the rule was itself only a temporary failure.
    assert!(of(&events, "bounce", "throttled@a.test").is_empty());
}

/// A rule that cannot work stops gannetd at start with the key and the line.
#[test]
fn a_bad_rule_is_a_config_error_naming_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gannetd.toml");
    std::fs::write(
        &path,
        "[delivery]\nautomation = [{ regex = '(', actions = ['suspend'], duration = 3 }]\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gannetd"))
        .args(["--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "a configuration error");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(":2:"), "{err}");
    assert!(err.contains("delivery.automation[0]"), "{err}");
    assert!(err.contains("does not compile"), "{err}");
}

/// Adaptive backoff without a rule: a site that answers nothing but 4xx has its
/// connection limit halved once an interval shows the share of failures, and the
/// event says so; another site keeps its limit.
#[test]
fn a_site_that_fails_most_attempts_gets_fewer_connections() {
    let (daemon, sink_a, _sink_b) = daemon_with_rules(
        "[delivery.shaping]\nconnection_limit = 4\nbackoff_failure_percent = 50\nbackoff_interval_secs = 1\n",
    );
    for i in 0..12 {
        inject(
            &daemon,
            &["tempfail@a.test"],
            &format!("Subject: {i}\r\n\r\nx\r\n.\r\n"),
        );
    }
    inject(&daemon, &["ok@b.test"], "Subject: b\r\n\r\ny\r\n.\r\n");
    let events = wait_events(&daemon, "the limit lowered", |e| {
        !adaptive(e, "lowered").is_empty() && !of(e, "delivery", "ok@b.test").is_empty()
    });
    let lowered = adaptive(&events, "lowered");
    assert!(
        lowered.iter().all(|e| e["queue"]
            .as_str()
            .unwrap()
            .ends_with(&format!("127.0.0.1:{}", sink_a.port))),
        "{lowered:?}"
    );
    assert_eq!(lowered[0]["rule"], "backoff");
    assert_eq!(lowered[0]["set"], "connection_limit=2");
    // The gauges are refreshed by the maintainer's next round.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while daemon.metric("adaptive_queues_backed_off") == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the backoff gauge stayed 0"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// suspend_tenant: a block answered to one tenant's message holds that tenant's
/// mail to the site (from every shard) for the rule's duration; another tenant's
/// mail to the site, and the tenant's mail to other sites, go on.
#[test]
fn a_block_of_one_tenant_s_mail_holds_that_tenant_only() {
    let (daemon, sink_a, _sink_b) = daemon_with_rules(
        "automation = [{ enhanced = ['5.7.1'], regex = 'TSS04', actions = ['suspend_tenant', 'transient'], duration = 3 }]\n",
    );
    let acme = "X-Gannet-Tenant: acme\r\nSubject: a\r\n\r\nx\r\n.\r\n";
    inject(&daemon, &["blocked@a.test"], acme);
    let events = wait_events(&daemon, "the rule firing", |e| {
        !adaptive(e, "fired").is_empty()
    });
    let fired = adaptive(&events, "fired")[0];
    assert_eq!(fired["held"], serde_json::json!(["tenant acme"]), "{fired}");
    let until = fired["until_ms"].as_u64().unwrap();

    inject(&daemon, &["held@a.test"], acme);
    inject(
        &daemon,
        &["other@a.test"],
        "X-Gannet-Tenant: zeta\r\nSubject: z\r\n\r\nx\r\n.\r\n",
    );
    inject(&daemon, &["elsewhere@b.test"], acme);
    let events = wait_events(&daemon, "the others delivered, acme's held", |e| {
        !of(e, "delivery", "other@a.test").is_empty()
            && !of(e, "delivery", "elsewhere@b.test").is_empty()
            && !of(e, "delayed", "held@a.test").is_empty()
    });
    let delayed = of(&events, "delayed", "held@a.test")[0];
    assert!(
        delayed["response"]
            .as_str()
            .unwrap()
            .contains("tenant acme's mail to this provider is held by response rule default#0"),
        "{delayed}"
    );
    assert!(of(&events, "delivery", "held@a.test").is_empty());
    // Once the rule's time is up, acme's held mail goes.
    let events = wait_events(&daemon, "acme's held mail delivered", |e| {
        !of(e, "delivery", "held@a.test").is_empty()
    });
    let delivered = of(&events, "delivery", "held@a.test")[0];
    assert!(
        delivered["timestamp_ms"].as_u64().unwrap() >= until,
        "{delivered}"
    );
    assert!(
        sink_a
            .messages()
            .iter()
            .any(|m| m.to_string().contains("held@a.test"))
    );
}
