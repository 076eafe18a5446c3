//! The queue model end to end: suspensions and retries through the admin API (with
//! curl), a full ready queue delaying parts, message rates and provider rules
//! shaping delivery, shaping changed live by SIGHUP, expiration at max_age, and
//! domains sharing MX hosts delivered as one site to postfix's smtp-sink.

mod common;

use std::process::Command;
use std::time::Duration;

use common::Daemon;
use common::admin::{Case, admin_key_config, curl, curl_as, json, refused};
use common::peers::free_port;
use common::relay::{delivery_config, dns, dumping_smtp_sink, inject, of, sink, wait_events};

const SUSPEND: &str = "/api/admin/suspend/v1";

#[test]
fn suspended_queues_hold_their_parts_until_resumed() {
    let sink = sink();
    let routes = format!(
        "\"d.test\" = [\"127.0.0.1:{0}\"], \"s.test\" = [\"127.0.0.1:{0}\"]",
        sink.port
    );
    let daemon = Daemon::start(
        "",
        &format!(
            "{}{}suspensions_max = 2\n",
            admin_key_config(),
            delivery_config(&routes)
        ),
    );

    // The admin API needs a key with the admin role.
    let (status, text) = curl_as(&daemon, None, "GET", SUSPEND, None);
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("role = \\\"admin\\\""), "{text}");
    let (status, _) = curl_as(&daemon, Some("not-a-key"), "GET", SUSPEND, None);
    assert_eq!(status, 401);

    // Bad requests get precise errors and change nothing.
    let bad: [Case; 6] = [
        (
            "POST",
            Some(("application/json", "{\"reason\":")),
            400,
            "EOF",
        ),
        (
            "POST",
            Some(("application/json", "{\"domain\":\"s.test\"}")),
            400,
            "reason",
        ),
        (
            "POST",
            Some((
                "application/json",
                "{\"reason\":\"r\",\"duration\":\"soon\"}",
            )),
            400,
            "duration",
        ),
        (
            "POST",
            Some(("application/json", "{\"reason\":\"r\",\"bogus\":1}")),
            400,
            "bogus",
        ),
        (
            "POST",
            Some(("text/plain", "{\"reason\":\"r\"}")),
            415,
            "application/json",
        ),
        (
            "DELETE",
            Some(("application/json", "{\"id\":\"nope\"}")),
            404,
            "nope",
        ),
    ];
    for text in refused(&daemon, SUSPEND, &bad) {
        assert!(json(&text)["errors"][0]["message"].is_string(), "{text}");
    }
    assert_eq!(curl(&daemon, "GET", SUSPEND, None), (200, "[]".into()));

    let (status, text) = curl(
        &daemon,
        "POST",
        SUSPEND,
        Some((
            "application/json",
            r#"{"domain":"S.test","reason":"provider asked us to pause","duration":"10m"}"#,
        )),
    );
    assert_eq!(status, 200, "{text}");
    let id = json(&text)["id"].as_str().unwrap().to_string();
    let (_, list) = curl(&daemon, "GET", SUSPEND, None);
    let list = json(&list);
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(list[0]["domain"], "s.test");
    assert_eq!(list[0]["reason"], "provider asked us to pause");
    // KumoMTA lists the time left as humantime writes it ("9m 59s").
    let left = humantime::parse_duration(list[0]["duration"].as_str().unwrap())
        .unwrap()
        .as_secs();
    assert!((590..=600).contains(&left), "{list}");

    inject(
        &daemon,
        &["a@d.test", "b@s.test"],
        "Subject: held\r\n\r\nx\r\n.\r\n",
    );
    let events = wait_events(&daemon, "a delivery and a held part", |e| {
        of(e, "delivery", "a@d.test").len() == 1 && of(e, "delayed", "b@s.test").len() == 1
    });
    let held = of(&events, "delayed", "b@s.test")[0];
    assert!(
        held["response"]
            .as_str()
            .unwrap()
            .contains("queue suspended"),
        "{held}"
    );
    assert_eq!(held["queue"], "s.test");
    assert_eq!(held["num_retries"], 0);
    // The queue gauges are brought up to date every 100 ms or so.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while daemon.metric("queue_held_parts") != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "queue_held_parts never reached 1"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(of(&daemon.events(), "delivery", "b@s.test").is_empty());

    let (status, text) = curl(
        &daemon,
        "DELETE",
        SUSPEND,
        Some(("application/json", &format!("{{\"id\":\"{id}\"}}"))),
    );
    assert_eq!(status, 200, "{text}");
    wait_events(&daemon, "the held part delivered", |e| {
        of(e, "delivery", "b@s.test").len() == 1
    });
    assert_eq!(sink.messages().len(), 2);
    assert_eq!(curl(&daemon, "GET", SUSPEND, None), (200, "[]".into()));

    // Suspensions are bounded (delivery.suspensions_max).
    let define = |domain: &str| {
        let body = format!("{{\"domain\":\"{domain}\",\"reason\":\"r\"}}");
        curl(&daemon, "POST", SUSPEND, Some(("application/json", &body)))
    };
    assert_eq!(define("a.test").0, 200);
    assert_eq!(define("b.test").0, 200);
    let (status, text) = define("c.test");
    assert_eq!(status, 422, "{text}");
    assert!(text.contains("delivery.suspensions_max"), "{text}");
    assert_eq!(
        json(&curl(&daemon, "GET", SUSPEND, None).1)
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

/// A destination that accepts TCP connections (the kernel completes them) but never
/// greets: a connection to it waits for the banner, holding its ready queue full.
const RETRY: &str = "/api/admin/retry/v1";

/// Deferred parts wait for their retry time (an hour here) until the operator asks
/// for a retry now: then the selected queues are tried at once, the others keep
/// their schedule. Bad requests get precise errors.
#[test]
fn retry_now_tries_the_selected_scheduled_queues_at_once() {
    let sink = sink();
    let routes = format!(
        "\"d.test\" = [\"127.0.0.1:{0}\"], \"e.test\" = [\"127.0.0.1:{0}\"]",
        sink.port
    );
    let daemon = Daemon::start(
        "",
        &format!(
            "{}[delivery]\nretry_interval_secs = 3600\nmax_retry_interval_secs = 3600\nroutes = {{ {routes} }}\n",
            admin_key_config(),
        ),
    );
    let bad: [Case; 4] = [
        (
            "POST",
            Some(("application/json", "{\"domain\":\"d.test\"}")),
            400,
            "reason",
        ),
        (
            "POST",
            Some(("application/json", "{\"reason\":\"r\",\"when\":1}")),
            400,
            "when",
        ),
        (
            "POST",
            Some(("text/plain", "{\"reason\":\"r\"}")),
            415,
            "application/json",
        ),
        ("GET", None, 405, ""),
    ];
    refused(&daemon, RETRY, &bad);
    let (status, _) = curl_as(
        &daemon,
        None,
        "POST",
        RETRY,
        Some(("application/json", "{\"reason\":\"r\"}")),
    );
    assert_eq!(status, 401, "the admin role is needed");

    // The sink answers 451 to `tempfail@`: each part is deferred for an hour.
    inject(
        &daemon,
        &["tempfail@d.test", "tempfail@e.test"],
        "Subject: r\r\n\r\nx\r\n.\r\n",
    );
    wait_events(&daemon, "a first attempt to each", |e| {
        of(e, "transient_failure", "tempfail@d.test").len() == 1
            && of(e, "transient_failure", "tempfail@e.test").len() == 1
    });
    let (status, text) = curl(
        &daemon,
        "POST",
        RETRY,
        Some((
            "application/json",
            r#"{"domain":"D.test","reason":"provider unblocked us"}"#,
        )),
    );
    assert_eq!(status, 202, "{text}");
    assert_eq!(json(&text)["id"], 1);
    wait_events(&daemon, "d.test tried again at once", |e| {
        of(e, "transient_failure", "tempfail@d.test").len() == 2
    });
    std::thread::sleep(Duration::from_millis(500));
    let events = daemon.events();
    assert_eq!(
        of(&events, "transient_failure", "tempfail@e.test").len(),
        1,
        "e.test keeps its schedule"
    );
    // No selector: every scheduled queue.
    let (status, text) = curl(
        &daemon,
        "POST",
        RETRY,
        Some(("application/json", r#"{"reason":"all"}"#)),
    );
    assert_eq!(status, 202, "{text}");
    assert_eq!(json(&text)["id"], 2);
    wait_events(&daemon, "both tried again", |e| {
        of(e, "transient_failure", "tempfail@d.test").len() == 3
            && of(e, "transient_failure", "tempfail@e.test").len() == 2
    });
}

#[test]
fn a_full_ready_queue_delays_parts_untried() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let config = delivery_config(&format!("\"full.test\" = [\"127.0.0.1:{port}\"]"))
        + "[delivery.shaping]\nconnection_limit = 1\nmax_ready = 1\nbanner_timeout_secs = 60\n";
    let daemon = Daemon::start("", &config);
    inject(&daemon, &["x@full.test"], "Subject: one\r\n\r\nx\r\n.\r\n");
    inject(&daemon, &["y@full.test"], "Subject: two\r\n\r\ny\r\n.\r\n");
    // The second part finds the queue full, is delayed, and again at its retry.
    let events = wait_events(&daemon, "two delays", |e| {
        of(e, "delayed", "y@full.test").len() >= 2
    });
    for delayed in of(&events, "delayed", "y@full.test") {
        assert!(
            delayed["response"]
                .as_str()
                .unwrap()
                .starts_with("451 4.4.5 ready queue full"),
            "{delayed}"
        );
        assert_eq!(delayed["num_retries"], 0, "a delay is not an attempt");
    }
    assert!(of(&events, "transient_failure", "y@full.test").is_empty());
    assert!(daemon.metric("delivery_delayed_total") >= 2);
    drop(silent);
}

/// A provider rule matched on the MX suffix limits the message rate of its sites:
/// 2/s with bursts of 2 spaces six messages over at least two seconds.
#[test]
fn provider_rules_shape_the_message_rate_of_matching_sites() {
    let sink = sink();
    let dns = dns();
    let config = delivery_config("")
        + &format!(
            "dns_server = \"127.0.0.1:{}\"\nsmtp_port = {}\n\
             [delivery.providers.rated]\nmx_suffix = [\".Rated.test\"]\n\
             shaping = {{ max_message_rate = \"2/s\", connection_limit = 1 }}\n",
            dns.port, sink.port
        );
    let daemon = Daemon::start("", &config);
    let rcpts: Vec<String> = (0..6).map(|i| format!("r{i}@rated.test")).collect();
    for r in &rcpts {
        inject(&daemon, &[r], "Subject: rated\r\n\r\nx\r\n.\r\n");
    }
    let events = wait_events(&daemon, "six deliveries", |e| {
        rcpts.iter().all(|r| of(e, "delivery", r).len() == 1)
    });
    let mut times: Vec<u64> = rcpts
        .iter()
        .map(|r| {
            of(&events, "delivery", r)[0]["timestamp_ms"]
                .as_u64()
                .unwrap()
        })
        .collect();
    times.sort_unstable();
    // Burst of two, then one every 500 ms: the sixth no earlier than 2 s after the
    // first (less a little for the clock's millisecond rounding).
    let span = times[5] - times[0];
    assert!(
        span >= 1900,
        "six messages at 2/s took only {span} ms: {times:?}"
    );
    assert_eq!(
        of(&events, "delivery", "r0@rated.test")[0]["site"],
        "mx1.rated.test"
    );
}

/// Shaping changes while running: a rate of 1/h holds all but the first message;
/// after the file says "unlimited" and SIGHUP, the rest go. A file that does not
/// parse is refused on SIGHUP and the running configuration stays.
#[test]
fn sighup_reloads_shaping_while_running() {
    let sink = sink();
    let route = format!("\"d.test\" = [\"127.0.0.1:{}\"]", sink.port);
    let daemon = Daemon::start(
        "",
        &(delivery_config(&route) + "[delivery.shaping]\nmax_message_rate = \"1/h\"\n"),
    );
    for r in ["a@d.test", "b@d.test", "c@d.test"] {
        inject(&daemon, &[r], "Subject: live\r\n\r\nx\r\n.\r\n");
    }
    wait_events(&daemon, "the first delivery", |e| {
        e.iter().filter(|e| e["type"] == "delivery").count() == 1
    });
    std::thread::sleep(Duration::from_millis(600));
    let path = daemon.dir.path().join("gannetd.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let hup = || {
        // SAFETY: signalling the daemon this test started.
        unsafe { libc::kill(daemon.child.id() as i32, libc::SIGHUP) };
    };
    std::fs::write(&path, text.replace("\"1/h\"", "\"fast\"")).unwrap();
    hup();
    let log_has = |needle: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if daemon
                .log
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains(needle))
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    };
    assert!(
        log_has("`fast` is not a rate"),
        "{:#?}",
        daemon.log.lock().unwrap()
    );
    assert_eq!(
        daemon
            .events()
            .iter()
            .filter(|e| e["type"] == "delivery")
            .count(),
        1,
        "still held at 1/h"
    );
    std::fs::write(&path, text.replace("\"1/h\"", "\"unlimited\"")).unwrap();
    hup();
    assert!(log_has("SIGHUP: configuration reloaded"));
    wait_events(&daemon, "the rest delivered", |e| {
        e.iter().filter(|e| e["type"] == "delivery").count() == 3
    });
    assert_eq!(sink.messages().len(), 3);
}

#[test]
fn messages_expire_at_max_age() {
    let dead = free_port();
    let config = delivery_config(&format!("\"d.test\" = [\"127.0.0.1:{dead}\"]"))
        .replace("[delivery]\n", "[delivery]\nmax_age_secs = 1\n");
    let mut daemon = Daemon::start("", &config);
    let id = inject(&daemon, &["late@d.test"], "Subject: old\r\n\r\nx\r\n.\r\n");
    let events = wait_events(&daemon, "an expiration", |e| {
        of(e, "expiration", "late@d.test").len() == 1
    });
    let failures = of(&events, "transient_failure", "late@d.test");
    assert!(
        !failures.is_empty(),
        "the first attempt fails before max_age"
    );
    let expired = of(&events, "expiration", "late@d.test")[0];
    assert_eq!(expired["message_id"], id.as_str());
    assert!(expired["queue_time"].as_u64().unwrap() >= 1000, "{expired}");
    daemon.stop();
    assert!(common::spooled(&daemon.data_dir()).is_empty(), "tombstoned");
}

/// Two domains with the same MX host are one site (one ready queue, one
/// connection's worth of work) delivered to postfix's smtp-sink.
#[test]
fn domains_sharing_mx_hosts_are_one_site_delivered_to_smtp_sink() {
    let (_sink, port, dumps) = dumping_smtp_sink();
    let dns = dns();
    let config = delivery_config("")
        + &format!(
            "dns_server = \"127.0.0.1:{}\"\nsmtp_port = {port}\n",
            dns.port
        );
    let daemon = Daemon::start("", &config);
    // Injected by swaks.
    let out = Command::new("swaks")
        .args(["--server", &daemon.smtp.to_string(), "--helo", "c.test"])
        .args(["--from", "s@b.test", "--to", "a@sh1.test,b@sh2.test"])
        .args(["--header", "Subject: shared", "--body", "x"])
        .output()
        .expect("swaks is installed by tools/install-peers.sh");
    let transcript = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && transcript.contains("<-  250 2.0.0 OK queued as "),
        "{transcript}"
    );
    let events = wait_events(&daemon, "two deliveries", |e| {
        of(e, "delivery", "a@sh1.test").len() == 1 && of(e, "delivery", "b@sh2.test").len() == 1
    });
    for r in ["a@sh1.test", "b@sh2.test"] {
        let e = of(&events, "delivery", r)[0];
        assert_eq!(e["site"], "mx.shared.test");
        assert_eq!(e["peer"], format!("127.0.0.1:{port}"));
        assert!(e["response"].as_str().unwrap().starts_with("250"), "{e}");
    }
    // Two parts (one per domain), two transactions at smtp-sink.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let n = std::fs::read_dir(dumps.path()).unwrap().count();
        if n == 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "smtp-sink dumped {n} transactions"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
