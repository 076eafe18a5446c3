//! The event hose's webhooks, against a real receiver (Python's http.server): the
//! Webhooks API and its bad forms, batches in SparkPost's format with the webhook's
//! auth and headers, and every event of a 10,000-message relay delivered exactly once
//! across a `kill -9` of gannetd and an outage of the receiver (a batch in flight at
//! the kill may come twice, with the same batch id: the documented exception).

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use common::Daemon;
use common::admin::{curl_as, json};
use common::load::{Load, delivered};
use common::peers::{free_port, webhook_receiver, webhook_receiver_on};
use common::relay::dumping_smtp_sink;
use serde_json::Value;

const APP_KEY: &str = "app-key-5b1e0c7d2a9f8e63";
const ZETA_KEY: &str = "zeta-key-0c4d8e2f6a1b3957";

fn keys() -> String {
    let digest = gannet_core::auth::KeyDigest::of;
    format!(
        "api_keys = [{{ name = \"app\", key_sha256 = \"{}\" }}, {{ name = \"zeta\", key_sha256 = \"{}\", tenant = \"zeta\" }}]\n",
        digest(APP_KEY),
        digest(ZETA_KEY)
    )
}

/// A config on fixed loopback ports (a restart finds them again), relaying to `sink`.
fn config(dir: &Path, smtp: u16, http: u16, sink: u16) -> String {
    format!(
        "[server]\nhostname = \"gannet.test\"\ndata_dir = \"{}\"\nshards = 2\n\
         [smtp]\nlisten = [\"127.0.0.1:{smtp}\"]\n\
         [http]\nlisten = [\"127.0.0.1:{http}\"]\n{}\
         [delivery]\nretry_interval_secs = 1\nmax_retry_interval_secs = 2\n\
         routes = {{ \"*\" = [\"127.0.0.1:{sink}\"] }}\n\
         [events]\nbatch_wait_ms = 200\nretry_interval_max_secs = 1\n",
        dir.join("data").display(),
        keys()
    )
}

/// A POSTed batch as the receiver stored it.
struct Posted {
    headers: Value,
    body: Value,
}

/// Every batch the receiver stored in `out`, in arrival order (pings and token
/// requests aside).
fn batches(out: &Path) -> Vec<Posted> {
    let mut names: Vec<String> = std::fs::read_dir(out)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort_by_key(|n| {
        let ns: u128 = n.split('-').next().unwrap().parse().unwrap();
        ns
    });
    names
        .iter()
        .filter_map(|n| {
            let v: Value = serde_json::from_slice(&std::fs::read(out.join(n)).ok()?).ok()?;
            let posted = Posted {
                headers: v["headers"].clone(),
                body: v["body"].clone(),
            };
            let ping = posted.body == serde_json::json!([{"msys": {}}]);
            (v["path"] != "/token" && !ping).then_some(posted)
        })
        .collect()
}

/// The message_event (or other class) object of each event of a batch.
fn events_of(batch: &Posted) -> Vec<Value> {
    batch
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            e["msys"]
                .as_object()
                .unwrap()
                .values()
                .next()
                .unwrap()
                .clone()
        })
        .collect()
}

fn create(daemon: &Daemon, key: &str, body: &Value) -> (u16, Value) {
    let (status, text) = curl_as(
        daemon,
        Some(key),
        "POST",
        "/api/v1/webhooks",
        Some(("application/json", &body.to_string())),
    );
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[test]
fn the_webhooks_api_refuses_bad_forms_and_keeps_tenants_apart() {
    let out = tempfile::tempdir().unwrap();
    let (_receiver, port) = webhook_receiver(out.path(), 200);
    let target = format!("http://127.0.0.1:{port}/hook");
    // config_text puts its extra text right after [http]'s listen: the keys.
    let dir = tempfile::tempdir().unwrap();
    let text = common::config_text(dir.path(), "", &keys());
    let daemon = Daemon::start_in(dir, &text);
    let cases: &[(Value, u16, &str)] = &[
        (
            serde_json::json!({"target": target}),
            422,
            "name is required",
        ),
        (
            serde_json::json!({"name": "x", "target": "ftp://h/"}),
            422,
            "http:// or https://",
        ),
        (
            serde_json::json!({"name": "x", "target": "not a url"}),
            422,
            "target",
        ),
        (
            serde_json::json!({"name": "x", "target": target, "events": ["delivery", "teleport"]}),
            422,
            "teleport",
        ),
        (
            serde_json::json!({"name": "x", "target": target, "events": []}),
            422,
            "at least one",
        ),
        (
            serde_json::json!({"name": "x", "target": target, "auth_type": "basic"}),
            422,
            "auth_credentials.username",
        ),
        (
            serde_json::json!({"name": "x", "target": target, "auth_type": "oauth2"}),
            422,
            "auth_request_details.url",
        ),
        (
            serde_json::json!({"name": "x", "target": target, "auth_type": "kerberos"}),
            422,
            "kerberos",
        ),
        (
            serde_json::json!({"name": "x", "target": target, "custom_headers": {"bad header": "v"}}),
            422,
            "bad header",
        ),
        (
            serde_json::json!({"name": "x", "target": target, "colour": "red"}),
            422,
            "colour",
        ),
        (
            serde_json::json!({"name": 7, "target": target}),
            422,
            "name",
        ),
        // A target that does not take SparkPost's ping is refused.
        (
            serde_json::json!({"name": "x", "target": format!("http://127.0.0.1:{}/", free_port())}),
            400,
            "did not accept a test batch",
        ),
    ];
    for (body, status, needle) in cases {
        let (got, reply) = create(&daemon, APP_KEY, body);
        assert_eq!(got, *status, "{body}: {reply}");
        assert!(reply.to_string().contains(needle), "{body}: {reply}");
        assert!(reply["errors"][0]["message"].is_string(), "{reply}");
    }
    let (status, text) = curl_as(
        &daemon,
        Some(APP_KEY),
        "POST",
        "/api/v1/webhooks",
        Some(("application/json", "{\"name\":")),
    );
    assert_eq!(status, 400, "{text}");
    let (status, text) = curl_as(
        &daemon,
        Some(APP_KEY),
        "POST",
        "/api/v1/webhooks",
        Some(("text/plain", "x")),
    );
    assert_eq!(status, 415, "{text}");
    let (status, _) = curl_as(&daemon, None, "GET", "/api/v1/webhooks", None);
    assert_eq!(status, 401);

    // A webhook of tenant zeta, with basic auth and a custom header.
    let (status, made) = create(
        &daemon,
        ZETA_KEY,
        &serde_json::json!({
            "name": "zeta hook", "target": target, "events": ["delivery", "bounce"],
            "auth_type": "basic", "auth_credentials": {"username": "u", "password": "secret-pw"},
            "custom_headers": {"x-customer": "zeta"},
        }),
    );
    assert_eq!(status, 200, "{made}");
    let id = made["results"]["id"].as_str().unwrap().to_string();
    let path = format!("/api/v1/webhooks/{id}");
    let (status, text) = curl_as(&daemon, Some(ZETA_KEY), "GET", &path, None);
    assert_eq!(status, 200, "{text}");
    let shown = json(&text)["results"].clone();
    assert_eq!(shown["name"], "zeta hook");
    assert_eq!(shown["events"], serde_json::json!(["delivery", "bounce"]));
    assert_eq!(shown["auth_credentials"]["username"], "u");
    assert!(
        !text.contains("secret-pw"),
        "passwords are never shown: {text}"
    );
    // Another tenant's key (or none) does not see it.
    let (status, _) = curl_as(&daemon, Some(APP_KEY), "GET", &path, None);
    assert_eq!(status, 404);
    let (_, text) = curl_as(&daemon, Some(APP_KEY), "GET", "/api/v1/webhooks", None);
    assert_eq!(json(&text)["results"], serde_json::json!([]));
    let (_, text) = curl_as(&daemon, Some(ZETA_KEY), "GET", "/api/v1/webhooks", None);
    assert_eq!(json(&text)["results"][0]["id"], id.as_str());
    // PUT changes what it is given; a bad change is refused and changes nothing.
    let (status, text) = curl_as(
        &daemon,
        Some(ZETA_KEY),
        "PUT",
        &path,
        Some(("application/json", "{\"events\":[\"warp\"]}")),
    );
    assert_eq!(status, 422, "{text}");
    let (status, text) = curl_as(
        &daemon,
        Some(ZETA_KEY),
        "PUT",
        &path,
        Some((
            "application/json",
            "{\"name\":\"renamed\",\"active\":false}",
        )),
    );
    assert_eq!(status, 200, "{text}");
    let (_, text) = curl_as(&daemon, Some(ZETA_KEY), "GET", &path, None);
    let shown = json(&text)["results"].clone();
    assert_eq!(
        (shown["name"].as_str(), shown["active"].as_bool()),
        (Some("renamed"), Some(false))
    );
    assert_eq!(shown["events"], serde_json::json!(["delivery", "bounce"]));
    // validate sends the message and shows the answer.
    let (status, text) = curl_as(
        &daemon,
        Some(ZETA_KEY),
        "POST",
        &format!("{path}/validate"),
        Some(("application/json", "{\"message\":{\"msys\":{\"hello\":1}}}")),
    );
    assert_eq!(status, 200, "{text}");
    let answer = json(&text)["results"].clone();
    assert_eq!(answer["msg"], "Test POST to endpoint succeeded", "{answer}");
    assert_eq!(answer["response"]["status"], 200);
    let sent = batches(out.path());
    let validated = sent
        .iter()
        .find(|b| b.body["msys"]["hello"] == 1)
        .expect("the validate POST");
    assert_eq!(validated.headers["authorization"], "Basic dTpzZWNyZXQtcHc=");
    assert_eq!(validated.headers["x-customer"], "zeta");
    assert_eq!(
        validated.headers["x-messagesystems-webhook-id"],
        id.as_str()
    );
    let (status, text) = curl_as(
        &daemon,
        Some(ZETA_KEY),
        "GET",
        &format!("{path}/batch-status?limit=x"),
        None,
    );
    assert_eq!(status, 422, "{text}");
    let (status, text) = curl_as(
        &daemon,
        Some(ZETA_KEY),
        "GET",
        &format!("{path}/batch-status"),
        None,
    );
    assert_eq!(
        (status, json(&text)["results"].clone()),
        (200, serde_json::json!([])),
        "{text}"
    );
    // The definition survives a restart (webhooks.json).
    let mut daemon = daemon;
    daemon.stop();
    let dir = std::mem::replace(&mut daemon.dir, tempfile::tempdir().unwrap());
    let text = std::fs::read_to_string(dir.path().join("gannetd.toml")).unwrap();
    let daemon = Daemon::start_in(dir, &text);
    let (status, text) = curl_as(&daemon, Some(ZETA_KEY), "GET", &path, None);
    assert_eq!(
        (status, json(&text)["results"]["name"].as_str()),
        (200, Some("renamed")),
        "{text}"
    );
    // DELETE: 204, then gone.
    let (status, _) = curl_as(&daemon, Some(APP_KEY), "DELETE", &path, None);
    assert_eq!(status, 404, "only its tenant may delete it");
    let (status, _) = curl_as(&daemon, Some(ZETA_KEY), "DELETE", &path, None);
    assert_eq!(status, 204);
    let (status, _) = curl_as(&daemon, Some(ZETA_KEY), "GET", &path, None);
    assert_eq!(status, 404);
    let (status, _) = curl_as(&daemon, Some(ZETA_KEY), "PATCH", &path, None);
    assert_eq!(status, 405);
}

const MESSAGES: usize = 10_000;
const CLIENTS: usize = 8;
const KILL_AFTER: usize = 4_000;

#[test]
fn every_event_of_a_relay_reaches_a_webhook_once_across_a_kill_and_an_outage() {
    let (_sink, sink_port, dumps) = dumping_smtp_sink();
    let out = tempfile::tempdir().unwrap();
    let (receiver, hook_port) = webhook_receiver(out.path(), 200);
    let (smtp, http) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let text = config(dir.path(), smtp, http, sink_port);
    let mut daemon = Daemon::start_in(dir, &text);
    let token = format!("http://127.0.0.1:{hook_port}/token");
    let (status, made) = create(
        &daemon,
        APP_KEY,
        &serde_json::json!({
            "name": "everything",
            "target": format!("http://127.0.0.1:{hook_port}/events"),
            "events": ["injection", "delivery", "delay", "bounce"],
            "auth_type": "oauth2",
            "auth_request_details": {"url": token, "body": {"client_id": "gannet", "client_secret": "s3"}},
        }),
    );
    assert_eq!(status, 200, "{made}");
    let id = made["results"]["id"].as_str().unwrap().to_string();

    let load = Load::start(daemon.smtp, MESSAGES, CLIENTS);
    load.pause_after(KILL_AFTER);
    daemon.kill();
    let shipped_at_kill = batches(out.path()).len();
    let dir = std::mem::replace(&mut daemon.dir, tempfile::tempdir().unwrap());
    let mut daemon = Daemon::start_in(dir, &text);
    assert_eq!(daemon.smtp.port(), smtp, "restarted on its fixed port");
    load.resume(daemon.smtp);
    // The receiver goes away for a while, then comes back on its port.
    std::thread::sleep(Duration::from_millis(1500));
    drop(receiver);
    std::thread::sleep(Duration::from_secs(4));
    let _receiver = webhook_receiver_on(hook_port, out.path(), 200);
    let acked = load.finish();
    assert!(acked.len() >= MESSAGES, "{} acknowledged", acked.len());

    // Wait until every acknowledged message is delivered and the webhook has every
    // event written: every message with an injection event has its delivery event,
    // but for at most one per client — a message being received at the kill, never
    // acknowledged and not recovered (its client sent it again as a new message).
    let sink_name = format!("webhook-{id}");
    let deadline = Instant::now() + Duration::from_secs(300);
    let (seen, posted) = loop {
        let seen = delivered(dumps.path());
        let posted = batches(out.path());
        let mut injected = HashSet::new();
        let mut done = HashSet::new();
        for batch in &posted {
            for e in events_of(batch) {
                let m = e["message_id"].as_str().unwrap_or("").to_string();
                match e["type"].as_str() {
                    Some("injection") => injected.insert(m),
                    Some("delivery") => done.insert(m),
                    _ => false,
                };
            }
        }
        let undelivered = injected.iter().filter(|m| !done.contains(*m)).count();
        let lag = || {
            let (_, metrics) = daemon.http_get("/metrics");
            let prefix = format!("gannet_hose_lag_bytes{{sink=\"{sink_name}\"}} ");
            metrics
                .lines()
                .find_map(|l| l.strip_prefix(&prefix).map(str::to_string))
        };
        if acked.iter().all(|s| seen.contains_key(s))
            && undelivered <= CLIENTS
            && lag().as_deref() == Some("0")
        {
            // Whatever was in the last batch is in `posted` if the lag was 0 before.
            let posted = batches(out.path());
            break (seen, posted);
        }
        assert!(
            Instant::now() < deadline,
            "events incomplete: {} injected, {} delivered; {} of {} acknowledged at the sink",
            injected.len(),
            done.len(),
            acked.iter().filter(|s| seen.contains_key(s)).count(),
            acked.len()
        );
        std::thread::sleep(Duration::from_millis(500));
    };

    // Every event came once — apart from a batch sent again after the kill, which
    // has the same batch id.
    let mut batch_of: HashMap<String, HashSet<String>> = HashMap::new();
    let mut count: HashMap<String, usize> = HashMap::new();
    let mut by_message: HashMap<String, Vec<Value>> = HashMap::new();
    for batch in &posted {
        assert_eq!(batch.headers["authorization"], "Bearer tok-gannet");
        assert_eq!(batch.headers["content-type"], "application/json");
        assert_eq!(batch.headers["x-messagesystems-webhook-id"], id.as_str());
        let batch_id = batch.headers["x-messagesystems-batch-id"]
            .as_str()
            .unwrap()
            .to_string();
        for e in events_of(batch) {
            let event_id = e["event_id"].as_str().unwrap().to_string();
            batch_of
                .entry(event_id.clone())
                .or_default()
                .insert(batch_id.clone());
            let n = count.entry(event_id).or_insert(0);
            *n += 1;
            if *n == 1 {
                by_message
                    .entry(e["message_id"].as_str().unwrap().to_string())
                    .or_default()
                    .push(e);
            }
        }
    }
    let repeated: Vec<_> = count.iter().filter(|(_, n)| **n > 1).collect();
    for (event_id, _) in &repeated {
        assert_eq!(
            batch_of[*event_id].len(),
            1,
            "event {event_id} came twice in different batches"
        );
    }
    let repeated_batches: HashSet<_> = repeated
        .iter()
        .flat_map(|(e, _)| batch_of[*e].iter())
        .collect();
    assert!(
        repeated_batches.len() <= 2,
        "more than the batch in flight (per shard) came twice: {repeated_batches:?}"
    );

    // Per message: one injection, and between one delivery event and as many as the
    // sink got copies (a message delivered before the kill and not yet tombstoned is
    // delivered, and evented, again).
    let mut seqs_with_events = HashSet::new();
    let mut orphans = Vec::new();
    for (message, events) in &by_message {
        let injections: Vec<&Value> = events.iter().filter(|e| e["type"] == "injection").collect();
        assert_eq!(injections.len(), 1, "{message}: {events:#?}");
        let injection = injections[0];
        assert_eq!(injection["recv_method"], "esmtp");
        assert_eq!(injection["msg_from"], "s@client.test");
        let seq: usize = injection["subject"]
            .as_str()
            .unwrap()
            .strip_prefix("seq ")
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(
            injection["rcpt_to"],
            format!("r{seq}@d{}.test", seq % common::load::DOMAINS)
        );
        let deliveries = events.iter().filter(|e| e["type"] == "delivery").count();
        let copies = seen.get(&seq).copied().unwrap_or(0);
        if deliveries == 0 {
            orphans.push(seq);
            continue;
        }
        assert!(
            deliveries <= copies,
            "{message} (seq {seq}): {deliveries} delivery events, {copies} copies"
        );
        for e in events {
            assert!(e["timestamp"].as_str().unwrap().parse::<u64>().unwrap() > 1_700_000_000);
            assert_eq!(
                e["routing_domain"],
                format!("d{}.test", seq % common::load::DOMAINS)
            );
        }
        seqs_with_events.insert(seq);
    }
    // A message with only its injection event was not acknowledged: its seq was
    // sent again and delivered under another id.
    assert!(
        orphans.len() <= CLIENTS,
        "{} injections without delivery: {orphans:?}",
        orphans.len()
    );
    for seq in &orphans {
        assert!(
            seqs_with_events.contains(seq),
            "seq {seq}: only an injection event"
        );
    }
    let missing: Vec<_> = acked
        .iter()
        .filter(|s| !seqs_with_events.contains(s))
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged messages without events: {missing:?}"
    );

    // The outage shows in the status and the metrics; the lag is gone.
    let (_, text) = curl_as(
        &daemon,
        Some(APP_KEY),
        "GET",
        &format!("/api/v1/webhooks/{id}/batch-status?limit=1000"),
        None,
    );
    let statuses = json(&text)["results"].as_array().unwrap().clone();
    assert!(
        statuses
            .iter()
            .any(|b| b["response_code"] == "0" || b["attempts"].as_u64() > Some(1)),
        "{statuses:#?}"
    );
    let sink = format!("webhook-{id}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let value = |name: &str| daemon.sink_metric(name, &sink);
        if value("hose_lag_bytes") == 0 {
            assert!(
                value("hose_batch_failures_total") > 0,
                "the outage failed batches"
            );
            assert!(value("hose_events_shipped_total") > 0);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the webhook still lags: {} bytes",
            value("hose_lag_bytes")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    eprintln!(
        "webhook relay: {MESSAGES} messages, {} batches ({shipped_at_kill} before the kill), {} events, \
         {} events sent twice in {} batches, {duplicates} messages delivered twice, {} \
         unacknowledged messages with an injection event only",
        posted.len(),
        count.len(),
        repeated.len(),
        repeated_batches.len(),
        orphans.len()
    );
    daemon.stop();
}
