//! The event hose's broker sink against a RabbitMQ node the test starts: every event
//! of a relay published once (publisher confirms, persistent messages, routing key by
//! event type) across a `kill -9` of gannetd and a restart of the broker; a batch in
//! flight at either may be published twice, with the same message ids.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use common::Daemon;
use common::load::{Load, delivered};
use common::peers::{Rabbit, free_port};
use common::relay::dumping_smtp_sink;
use serde_json::Value;

const MESSAGES: usize = 3_000;
const CLIENTS: usize = 4;
const KILL_AFTER: usize = 1_200;

fn config(dir: &Path, smtp: u16, http: u16, sink: u16, rabbit: u16) -> String {
    format!(
        "[server]\nhostname = \"gannet.test\"\ndata_dir = \"{}\"\nshards = 2\n\
         [smtp]\nlisten = [\"127.0.0.1:{smtp}\"]\n\
         [http]\nlisten = [\"127.0.0.1:{http}\"]\n\
         [delivery]\nretry_interval_secs = 1\nmax_retry_interval_secs = 2\n\
         routes = {{ \"*\" = [\"127.0.0.1:{sink}\"] }}\n\
         [events]\nbatch_wait_ms = 200\nretry_interval_max_secs = 1\nrequest_timeout_secs = 5\n\
         [[events.amqp]]\nname = \"rabbit\"\nurl = \"amqp://guest:guest@127.0.0.1:{rabbit}/%2f\"\n\
         exchange = \"gannet.events\"\nevents = [\"injection\", \"delivery\", \"bounce\", \"delay\"]\n\
         routing_key_prefix = \"msys.\"\n",
        dir.join("data").display()
    )
}

/// The broker rejects what the config check would not: a sink to a port nobody
/// listens on keeps its events (and retries) without holding up mail.
#[test]
fn a_broker_that_is_down_keeps_its_events_and_mail_flows() {
    let (_sink, sink_port, dumps) = dumping_smtp_sink();
    let dir = tempfile::tempdir().unwrap();
    let (smtp, http) = (free_port(), free_port());
    let text = config(dir.path(), smtp, http, sink_port, free_port());
    let mut daemon = Daemon::start_in(dir, &text);
    for i in 0..20 {
        daemon.send_accepted(
            &format!("r{i}@d.test"),
            &format!("Subject: seq {i}\r\n\r\nbody\r\n"),
        );
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while delivered(dumps.path()).len() < 20 {
        assert!(
            Instant::now() < deadline,
            "mail does not flow without the broker"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let value = |name: &str| daemon.sink_metric(name, "amqp-rabbit");
        if value("hose_batch_failures_total") >= 2 {
            assert!(value("hose_lag_bytes") > 0, "the events wait");
            assert_eq!(value("hose_events_shipped_total"), 0);
            break;
        }
        assert!(Instant::now() < deadline, "no failed attempts");
        std::thread::sleep(Duration::from_millis(200));
    }
    daemon.stop();
}

#[test]
fn every_event_of_a_relay_is_published_once_across_a_kill_and_a_broker_restart() {
    let rabbit_dir = tempfile::tempdir().unwrap();
    let mut rabbit = Rabbit::start(rabbit_dir.path());
    rabbit.client(&["declare", "gannet.events", "events"]);
    let (_sink, sink_port, dumps) = dumping_smtp_sink();
    let (smtp, http) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let text = config(dir.path(), smtp, http, sink_port, rabbit.port);
    let mut daemon = Daemon::start_in(dir, &text);

    let load = Load::start(daemon.smtp, MESSAGES, CLIENTS);
    load.pause_after(KILL_AFTER);
    daemon.kill();
    let dir = std::mem::replace(&mut daemon.dir, tempfile::tempdir().unwrap());
    let mut daemon = Daemon::start_in(dir, &text);
    load.resume(daemon.smtp);
    // The broker goes down for a while and comes back with its queue.
    std::thread::sleep(Duration::from_millis(500));
    rabbit.stop_node();
    std::thread::sleep(Duration::from_secs(2));
    rabbit.start_node();
    let acked = load.finish();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let seen = delivered(dumps.path());
        let (_, metrics) = daemon.http_get("/metrics");
        let lag: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("gannet_hose_lag_bytes{sink=\"amqp-rabbit\"} "))
            .unwrap_or("1")
            .parse()
            .unwrap();
        if acked.iter().all(|s| seen.contains_key(s)) && lag == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not all delivered and published: lag {lag}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // Deliveries settle after their messages were injected: give the last batch
    // its wait, then drain.
    std::thread::sleep(Duration::from_millis(600));
    let drained = tempfile::NamedTempFile::new().unwrap();
    rabbit.client(&["drain", "events", drained.path().to_str().unwrap(), "2"]);
    let text = std::fs::read_to_string(drained.path()).unwrap();
    let messages: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();

    let mut count: HashMap<String, usize> = HashMap::new();
    let mut by_message: HashMap<String, Vec<Value>> = HashMap::new();
    for m in &messages {
        let event = m["body"]["msys"]["message_event"].clone();
        let kind = event["type"].as_str().unwrap();
        assert_eq!(m["routing_key"], format!("msys.{kind}"));
        assert_eq!(m["type"], kind);
        assert_eq!(m["message_id"], event["event_id"]);
        assert_eq!(m["content_type"], "application/json");
        assert_eq!(m["delivery_mode"], 2, "persistent");
        assert_eq!(m["app_id"], "gannet");
        let n = count
            .entry(event["event_id"].as_str().unwrap().to_string())
            .or_insert(0);
        *n += 1;
        if *n == 1 {
            by_message
                .entry(event["message_id"].as_str().unwrap().to_string())
                .or_default()
                .push(event);
        }
    }
    let twice = count.values().filter(|n| **n > 1).count();
    // At most the batches in flight (one per shard and restart) come twice.
    assert!(twice <= 4 * 1000, "{twice} events published twice");
    let seen = delivered(dumps.path());
    let mut seqs = HashSet::new();
    let mut orphans = Vec::new();
    for (message, events) in &by_message {
        let injection: Vec<&Value> = events.iter().filter(|e| e["type"] == "injection").collect();
        assert_eq!(injection.len(), 1, "{message}: {events:#?}");
        let seq: usize = injection[0]["subject"]
            .as_str()
            .unwrap()
            .strip_prefix("seq ")
            .unwrap()
            .parse()
            .unwrap();
        let deliveries = events.iter().filter(|e| e["type"] == "delivery").count();
        if deliveries == 0 {
            // Being received at the kill: never acknowledged, sent again.
            orphans.push(seq);
            continue;
        }
        assert!(
            deliveries <= seen[&seq],
            "{message}: {deliveries} deliveries"
        );
        seqs.insert(seq);
    }
    assert!(
        orphans.len() <= CLIENTS,
        "injections without delivery: {orphans:?}"
    );
    assert!(orphans.iter().all(|s| seqs.contains(s)), "{orphans:?}");
    let missing: Vec<_> = acked.iter().filter(|s| !seqs.contains(s)).collect();
    assert!(
        missing.is_empty(),
        "acknowledged messages without events: {missing:?}"
    );
    eprintln!(
        "broker relay: {MESSAGES} messages, {} published messages, {} events, {twice} published twice",
        messages.len(),
        count.len()
    );
    daemon.stop();
}
