//! IP warm-up against real peers: MX records from dnsmasq (the provider is matched
//! on the MX host), two sources of one pool (127.0.0.1 and 127.0.0.2) each with a
//! day's budget of two messages to the provider, delivering to aiosmtpd. The pool's
//! sources share the day's mail until both budgets are spent; the rest waits for
//! the next day; the admin API and gannetctl show the standings, and the counts
//! survive a restart on the same fixed ports.

mod common;

use clap::Parser;
use common::Daemon;
use common::admin::{ADMIN_KEY, admin_key_config, curl, json};
use common::peers::free_port;
use common::relay::{dns, inject, sink, wait_events};

/// Today in UTC as `YYYY-MM-DD` (the plan starts today: day 1).
fn today() -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn count(events: &[serde_json::Value], kind: &str, source: Option<&str>) -> usize {
    (events.iter())
        .filter(|e| e["type"] == kind && source.is_none_or(|s| e["egress_source"] == s))
        .count()
}

#[test]
fn warming_sources_share_the_day_s_budget_and_the_rest_waits_for_tomorrow() {
    let (sink, dns) = (sink(), dns());
    let (smtp, http) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let start = today();
    let config = format!(
        "[server]\nhostname = \"gannet.test\"\ndata_dir = \"{}\"\nshards = 2\n\
         [smtp]\nlisten = [\"127.0.0.1:{smtp}\"]\n\
         [http]\nlisten = [\"127.0.0.1:{http}\"]\n{}\
         [delivery]\ndns_server = \"127.0.0.1:{}\"\nsmtp_port = {}\ntls = \"disabled\"\n\
         sources = {{ a = {{ source_ip = \"127.0.0.1\", warmup = \"new\", warmup_start = \"{start}\" }}, \
                      b = {{ source_ip = \"127.0.0.2\", warmup = \"new\", warmup_start = \"{start}\" }} }}\n\
         pools = {{ warm = [{{ source = \"a\" }}, {{ source = \"b\" }}] }}\n\
         warmups = {{ new = {{ schedule = [2, 1000] }} }}\n\
         [delivery.providers.mxtest]\nmx_suffix = [\"mx.test\"]\n",
        dir.path().join("data").display(),
        admin_key_config(),
        dns.port,
        sink.port
    );
    let mut daemon = Daemon::start_in(dir, &config);
    for n in 0..5 {
        inject(
            &daemon,
            &[&format!("r{n}@mx.test")],
            "X-Gannet-Pool: warm\r\nSubject: warm\r\n\r\nx\r\n.\r\n",
        );
    }
    let events = wait_events(&daemon, "four deliveries and one put off", |e| {
        count(e, "delivery", None) == 4 && count(e, "delayed", None) == 1
    });
    // Two from each source: when one had spent its budget the other took the rest.
    assert_eq!(count(&events, "delivery", Some("a")), 2);
    assert_eq!(count(&events, "delivery", Some("b")), 2);
    let delayed = events.iter().find(|e| e["type"] == "delayed").unwrap();
    let reply = delayed["response"].as_str().unwrap();
    assert!(
        reply.contains("IP warm-up")
            && reply.contains("pool warm")
            && reply.contains("provider mxtest"),
        "{delayed}"
    );
    assert_eq!(sink.messages().len(), 4);
    assert_eq!(daemon.metric("delivery_warmup_delayed_total"), 1);

    // The standings, over the admin API and gannetctl.
    let (status, text) = curl(&daemon, "GET", "/api/admin/warmup/v1", None);
    assert_eq!(status, 200, "{text}");
    let standings = json(&text);
    let mut seen: Vec<(String, u64, u64, u64)> = (standings.as_array().unwrap().iter())
        .map(|s| {
            (
                s["source"].as_str().unwrap().to_string(),
                s["day"].as_u64().unwrap(),
                s["used"].as_u64().unwrap(),
                s["budget"].as_u64().unwrap(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(seen, [("a".into(), 1, 2, 2), ("b".into(), 1, 2, 2)]);
    let endpoint = format!("http://{}", daemon.http);
    let cli = gannet_tools::ctl::Cli::try_parse_from([
        "gannetctl",
        "--endpoint",
        &endpoint,
        "--key",
        ADMIN_KEY,
        "warmup",
    ])
    .unwrap();
    let mut out = Vec::new();
    gannet_tools::ctl::run(cli, &mut out).unwrap();
    let table = String::from_utf8(out).unwrap();
    assert!(
        table.contains("PROVIDER") && table.contains("mxtest"),
        "{table}"
    );

    // A restart on the same ports keeps today's counts: the next message waits too.
    daemon.stop();
    let dir = std::mem::replace(&mut daemon.dir, tempfile::tempdir().unwrap());
    daemon = Daemon::start_in(dir, &config);
    assert_eq!((daemon.smtp.port(), daemon.http.port()), (smtp, http));
    let (_, text) = curl(&daemon, "GET", "/api/admin/warmup/v1", None);
    assert!(
        json(&text)
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["used"] == 2),
        "{text}"
    );
    inject(
        &daemon,
        &["after@mx.test"],
        "X-Gannet-Pool: warm\r\nSubject: warm\r\n\r\nx\r\n.\r\n",
    );
    wait_events(&daemon, "the new message put off", |e| {
        (e.iter()).any(|e| e["type"] == "delayed" && e["rcpt_to"] == "after@mx.test")
    });
    assert_eq!(sink.messages().len(), 4);
}

#[test]
fn a_damaged_warmup_file_stops_the_start_with_its_line() {
    let err = common::start_refused_with(&[("warmup.json", "{\"day\": \"monday\"}")]);
    assert!(err.contains("warmup.json:1:"), "{err}");
}
