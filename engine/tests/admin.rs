//! The operator's admin API end to end, with curl and a real SMTP server (aiosmtpd)
//! answering like a mailbox provider: listing the queues and inspecting a message
//! while mail waits for retries, bouncing with a dry run first, suspending a ready
//! queue by its KumoMTA name — and the suspensions and bounces still in force after
//! a restart on the same fixed ports; a damaged `admin.json` stops the start with
//! its line and column.

mod common;

use std::time::{Duration, Instant};

use common::Daemon;
use common::admin::{Case, admin_key_config, curl, json, refused};
use common::peers::free_port;
use common::relay::{inject, of, sink, wait_events};

const QUEUES: &str = "/api/admin/queues/v1";
const SUMMARY: &str = "/api/admin/queue-summary/v1";
const INSPECT: &str = "/api/admin/inspect-message/v1";
const BOUNCE: &str = "/api/admin/bounce/v1";
const READY: &str = "/api/admin/suspend-ready-q/v1";
const SUSPEND: &str = "/api/admin/suspend/v1";

fn post(daemon: &Daemon, path: &str, body: &str) -> (u16, serde_json::Value) {
    let (status, text) = curl(daemon, "POST", path, Some(("application/json", body)));
    (status, json(&text))
}

fn get(daemon: &Daemon, path: &str) -> serde_json::Value {
    let (status, text) = curl(daemon, "GET", path, None);
    assert_eq!(status, 200, "GET {path}: {text}");
    json(&text)
}

/// Polls `path` until `done` holds for its answer.
fn wait_for(
    daemon: &Daemon,
    path: &str,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let value = get(daemon, path);
        if done(&value) {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: {value:#}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The scheduled queue `name` in a listing.
fn scheduled<'a>(listing: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    (listing["scheduled"].as_array()?.iter()).find(|q| q["name"] == name)
}

#[test]
fn operators_list_inspect_bounce_and_suspend_and_it_outlives_a_restart() {
    let (a, b) = (sink(), sink());
    let (smtp, http) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    // Retries an hour apart: what the sink defers waits in the scheduled queue.
    let config = format!(
        "[server]\nhostname = \"gannet.test\"\ndata_dir = \"{}\"\nshards = 2\n\
         [smtp]\nlisten = [\"127.0.0.1:{smtp}\"]\n\
         [http]\nlisten = [\"127.0.0.1:{http}\"]\n{}\
         [delivery]\nretry_interval_secs = 3600\n\
         routes = {{ \"a.test\" = [\"127.0.0.1:{}\"], \"b.test\" = [\"127.0.0.1:{}\"] }}\n",
        dir.path().join("data").display(),
        admin_key_config(),
        a.port,
        b.port
    );
    let mut daemon = Daemon::start_in(dir, &config);

    // Three messages the sink defers (451 4.7.28), two of tenant acme.
    let mut ids = Vec::new();
    for tenant in ["acme", "acme", "zeta"] {
        ids.push(inject(
            &daemon,
            &["throttled@b.test"],
            &format!("X-Gannet-Tenant: {tenant}\r\nSubject: later\r\n\r\nbody\r\n.\r\n"),
        ));
    }
    wait_events(&daemon, "three deferrals", |e| {
        of(e, "transient_failure", "throttled@b.test").len() == 3
    });

    // The listing counts them by scheduled queue; detail adds oldest and next due.
    let listing = wait_for(
        &daemon,
        &format!("{QUEUES}?detail=true"),
        "the listing",
        |l| scheduled(l, "acme@b.test").is_some_and(|q| q["waiting"] == 2),
    );
    let acme = scheduled(&listing, "acme@b.test").unwrap();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(acme["oldest_ms"].as_u64().unwrap() <= now_ms, "{acme}");
    assert!(
        acme["next_due_ms"].as_u64().unwrap() > now_ms + 3_000_000,
        "an hour away: {acme}"
    );
    assert_eq!(scheduled(&listing, "zeta@b.test").unwrap()["waiting"], 1);
    let ready = listing["ready"].as_array().unwrap();
    let b_queue = format!("default->127.0.0.1:{}", b.port);
    let site = ready.iter().find(|q| q["name"] == b_queue.as_str());
    let site = site.unwrap_or_else(|| panic!("{listing:#}"));
    assert_eq!(site["effective"]["connection_limit"], 32);
    assert_eq!(site["effective"], site["configured"]);
    let summary = get(&daemon, SUMMARY);
    assert_eq!(summary["total"]["waiting"], 3, "{summary}");
    assert_eq!(summary["shards"].as_array().unwrap().len(), 2);
    let limited = get(&daemon, &format!("{QUEUES}?limit=1"));
    assert_eq!(limited["scheduled"][0]["name"], "acme@b.test", "{limited}");
    assert_eq!(limited["scheduled"].as_array().unwrap().len(), 1);

    // A message by id: envelope, metadata, headers, retry state, where its part is.
    let found = get(&daemon, &format!("{INSPECT}?id={}&want_body=true", ids[0]));
    assert_eq!(found["id"], ids[0].as_str());
    assert_eq!(found["message"]["sender"], "s@b.test");
    assert_eq!(found["message"]["recipient"][0], "throttled@b.test");
    assert_eq!(found["message"]["meta"]["tenant"], "acme");
    assert_eq!(found["message"]["num_attempts"], 1);
    assert!(found["message"]["data"].as_str().unwrap().contains("body"));
    assert!(
        found["headers"]
            .as_str()
            .unwrap()
            .contains("Subject: later")
    );
    assert_eq!(found["parts"][0]["state"], "scheduled", "{found:#}");
    assert_eq!(found["parts"][0]["queue"], "acme@b.test");
    assert!(found["shard"].as_u64().unwrap() < 2);
    let (status, text) = curl(
        &daemon,
        "GET",
        &format!("{INSPECT}?id={}", "0".repeat(32)),
        None,
    );
    assert_eq!(status, 404, "{text}");
    let (status, text) = curl(&daemon, "GET", &format!("{INSPECT}?id=zz"), None);
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("not a message id"), "{text}");

    // One scheduled queue, as KumoMTA's inspect-sched-q shows it.
    let q = get(
        &daemon,
        "/api/admin/inspect-sched-q/v1?queue_name=acme%40b.test&limit=1",
    );
    assert_eq!(q["queue_name"], "acme@b.test");
    assert_eq!(q["num_scheduled"], 2, "{q:#}");
    assert_eq!(q["messages"].as_array().unwrap().len(), 1, "limit 1");
    assert_eq!(q["messages"][0]["message"]["meta"]["tenant"], "acme");
    assert_eq!(q["delayed_metric"], 0);
    let (status, text) = curl(&daemon, "GET", "/api/admin/inspect-sched-q/v1", None);
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("queue_name"), "{text}");

    // A dry run counts what a bounce would take and takes nothing.
    let (status, dry) = post(
        &daemon,
        BOUNCE,
        r#"{"tenant":"acme","reason":"bad list","dry_run":true}"#,
    );
    assert_eq!(status, 200, "{dry}");
    assert_eq!(dry["total_bounced"], 2, "{dry}");
    assert_eq!(dry["bounced"]["acme@b.test"], 2);
    assert_eq!(dry["recipients"], 2);
    assert!(daemon.events().iter().all(|e| e["type"] != "admin_bounce"));

    // The bounce: acme's two are bounced now, zeta's stays; while it is in force a
    // new message of acme's is bounced on arrival.
    let (status, made) = post(
        &daemon,
        BOUNCE,
        r#"{"tenant":"acme","reason":"bad list","duration":"10m"}"#,
    );
    assert_eq!(status, 200, "{made}");
    let bounce_id = made["id"].as_str().unwrap().to_string();
    inject(
        &daemon,
        &["fresh@b.test"],
        "X-Gannet-Tenant: acme\r\nSubject: new\r\n\r\nx\r\n.\r\n",
    );
    let events = wait_events(&daemon, "three admin bounces", |e| {
        e.iter().filter(|e| e["type"] == "admin_bounce").count() == 3
    });
    let bounced = of(&events, "admin_bounce", "fresh@b.test")[0];
    assert!(
        bounced["response"].as_str().unwrap().contains("bad list"),
        "{bounced}"
    );
    assert_eq!(bounced["tenant"], "acme");
    assert!(of(&events, "delivery", "fresh@b.test").is_empty());
    let list = get(&daemon, BOUNCE);
    assert_eq!(list[0]["id"], bounce_id.as_str());
    assert_eq!(list[0]["tenant"], "acme");
    assert_eq!(list[0]["total_bounced"], 3, "{list}");
    let listing = wait_for(&daemon, QUEUES, "acme's queue gone", |l| {
        scheduled(l, "acme@b.test").is_none()
    });
    assert_eq!(scheduled(&listing, "zeta@b.test").unwrap()["waiting"], 1);

    // A ready queue suspended by its KumoMTA name: a.test's mail waits in it.
    let a_queue = format!("default->127.0.0.1:{}", a.port);
    let (status, made) = post(
        &daemon,
        READY,
        &format!(r#"{{"name":"{a_queue}@smtp_client","reason":"block","duration":"1h"}}"#),
    );
    assert_eq!(status, 200, "{made}");
    let ready_id = made["id"].as_str().unwrap().to_string();
    let (status, made) = post(
        &daemon,
        SUSPEND,
        r#"{"domain":"c.test","reason":"kept too"}"#,
    );
    assert_eq!(status, 200, "{made}");
    inject(&daemon, &["held@a.test"], "Subject: wait\r\n\r\nx\r\n.\r\n");
    let listing = wait_for(&daemon, QUEUES, "a.test's ready queue", |l| {
        // Its part waits in the owner shard's queue: spooled there, or handed over.
        (l["ready"].as_array().unwrap().iter()).any(|q| {
            q["name"] == a_queue.as_str()
                && q["parts"].as_u64().unwrap() + q["remote"].as_u64().unwrap() == 1
        })
    });
    let q = (listing["ready"].as_array().unwrap().iter())
        .find(|q| q["name"] == a_queue.as_str())
        .unwrap();
    assert_eq!(
        q["suspended_by"],
        format!("admin suspension {ready_id}: block").as_str()
    );
    assert_eq!(q["connections"], 0);
    let list = get(&daemon, READY);
    assert_eq!(list[0]["name"], a_queue.as_str());
    assert!(list[0]["expires"].as_str().unwrap().ends_with('Z'));
    std::thread::sleep(Duration::from_millis(500));
    assert!(a.messages().is_empty());

    // Restart on the same ports: the suspensions and the bounce are still in force,
    // and the held message is still held.
    daemon.stop();
    let dir = std::mem::replace(&mut daemon.dir, tempfile::tempdir().unwrap());
    daemon = Daemon::start_in(dir, &config);
    assert_eq!((daemon.smtp.port(), daemon.http.port()), (smtp, http));
    assert_eq!(get(&daemon, READY)[0]["id"], ready_id.as_str());
    assert_eq!(get(&daemon, SUSPEND)[0]["domain"], "c.test");
    assert_eq!(get(&daemon, BOUNCE)[0]["id"], bounce_id.as_str());
    std::thread::sleep(Duration::from_millis(500));
    assert!(a.messages().is_empty(), "still suspended after the restart");

    // Lifted: delivered. Cancelled: acme's mail flows again.
    let lift = |path: &str, id: &str| {
        let body = format!("{{\"id\":\"{id}\"}}");
        curl(&daemon, "DELETE", path, Some(("application/json", &body)))
    };
    assert_eq!(lift(READY, &ready_id).0, 200);
    wait_events(&daemon, "the held message delivered", |e| {
        of(e, "delivery", "held@a.test").len() == 1
    });
    assert_eq!(lift(BOUNCE, &bounce_id).0, 200);
    assert_eq!(get(&daemon, BOUNCE), serde_json::json!([]));
    inject(
        &daemon,
        &["after@b.test"],
        "X-Gannet-Tenant: acme\r\nSubject: ok\r\n\r\nx\r\n.\r\n",
    );
    wait_events(&daemon, "delivery after the cancel", |e| {
        of(e, "delivery", "after@b.test").len() == 1
    });
    assert_eq!(lift(BOUNCE, &bounce_id).0, 404);
}

#[test]
fn bad_admin_requests_get_precise_errors() {
    let daemon = Daemon::start("", &admin_key_config());
    let json_body = |b: &'static str| Some(("application/json", b));
    let ready: [Case; 5] = [
        ("POST", json_body(r#"{"reason":"r"}"#), 400, "name"),
        (
            "POST",
            json_body(r#"{"name":"gmail","reason":"r"}"#),
            400,
            "egress_source->site_name",
        ),
        (
            "POST",
            json_body(r#"{"name":"a->b","reason":" "}"#),
            400,
            "reason",
        ),
        (
            "POST",
            json_body(r#"{"name":"a->b","reason":"r","expires":"soon"}"#),
            400,
            "RFC 3339",
        ),
        ("DELETE", json_body(r#"{"id":"x"}"#), 404, "x"),
    ];
    refused(&daemon, READY, &ready);
    let bounce: [Case; 5] = [
        (
            "POST",
            json_body(r#"{"reason":"r","routing_domain":"x.test"}"#),
            400,
            "routing_domain",
        ),
        (
            "POST",
            json_body(r#"{"reason":"r","bogus":true}"#),
            400,
            "bogus",
        ),
        (
            "POST",
            json_body(r#"{"reason":"r","duration":"forever"}"#),
            400,
            "duration",
        ),
        ("POST", Some(("text/plain", "{}")), 415, "application/json"),
        ("PUT", None, 405, "PUT"),
    ];
    refused(&daemon, BOUNCE, &bounce);
    let (status, text) = curl(&daemon, "GET", &format!("{QUEUES}?detail=maybe"), None);
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("detail"), "{text}");
    let (status, text) = curl(&daemon, "GET", &format!("{QUEUES}?limit=-1"), None);
    assert_eq!(status, 400, "{text}");
    let (status, text) = curl(&daemon, "GET", INSPECT, None);
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("id"), "{text}");
    // Nothing was made, and the server still answers.
    assert_eq!(get(&daemon, READY), serde_json::json!([]));
    assert_eq!(get(&daemon, BOUNCE), serde_json::json!([]));
    assert_eq!(get(&daemon, QUEUES)["scheduled"], serde_json::json!([]));
}

#[test]
fn a_damaged_admin_file_stops_the_start_with_its_line() {
    let err = common::start_refused_with(&[(
        "admin.json",
        "{\n  \"suspensions\": [\n    {\"id\": 7}\n  ]\n}\n",
    )]);
    assert!(err.contains("admin.json:3:"), "{err}");
    assert!(err.contains("fix or remove the file"), "{err}");
}

/// What kcli (KumoMTA's CLI, `kumo-api-types`) reads from the answers, declared
/// with the same field types: an id in UUID form, durations as humantime writes
/// them, expiry times in RFC 3339, tallies as maps of counts.
mod kcli {
    use std::collections::HashMap;

    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    pub struct IdResponse {
        pub id: String,
    }

    #[derive(Debug, Deserialize)]
    pub struct SuspendV1ListEntry {
        pub id: String,
        pub campaign: Option<String>,
        pub tenant: Option<String>,
        pub domain: Option<String>,
        pub reason: String,
        pub duration: String,
    }

    #[derive(Debug, Deserialize)]
    pub struct SuspendReadyQueueV1ListEntry {
        pub id: String,
        pub name: String,
        pub reason: String,
        pub duration: String,
        pub expires: String,
    }

    #[derive(Debug, Deserialize)]
    pub struct BounceV1Response {
        pub id: String,
        pub bounced: HashMap<String, usize>,
        pub total_bounced: usize,
    }

    #[derive(Debug, Deserialize)]
    pub struct BounceV1ListEntry {
        pub id: String,
        pub campaign: Option<String>,
        pub tenant: Option<String>,
        pub domain: Option<String>,
        pub routing_domain: Option<String>,
        pub reason: String,
        pub duration: String,
        pub bounced: HashMap<String, usize>,
        pub total_bounced: usize,
    }

    #[derive(Debug, Deserialize)]
    pub struct InspectMessageV1Response {
        pub id: String,
        pub message: MessageInformation,
    }

    #[derive(Debug, Deserialize)]
    pub struct InspectQueueV1Response {
        pub queue_name: String,
        pub messages: Vec<InspectMessageV1Response>,
        pub num_scheduled: usize,
        pub queue_config: serde_json::Value,
        pub delayed_metric: usize,
        pub now: String,
        pub last_changed: String,
    }

    #[derive(Debug, Deserialize)]
    pub struct MessageInformation {
        pub sender: String,
        pub recipient: Vec<String>,
        pub meta: serde_json::Map<String, serde_json::Value>,
        pub data: Option<String>,
        pub due: Option<String>,
        pub num_attempts: Option<u16>,
    }

    /// uuid's `parse_str`: hyphenated (8-4-4-4-12) or simple (32 hex digits).
    pub fn is_uuid(id: &str) -> bool {
        let hex = id.replace('-', "");
        let groups: Vec<usize> = id.split('-').map(str::len).collect();
        hex.len() == 32
            && hex.chars().all(|c| c.is_ascii_hexdigit())
            && (groups == [32] || groups == [8, 4, 4, 4, 12])
    }
}

/// Requests as kcli sends them (its serde output: nulls for absent selectors,
/// humantime durations, KumoMTA ready-queue names) and answers read as kcli reads
/// them.
#[test]
fn kcli_requests_and_answers_keep_kumomta_s_shapes() {
    let daemon = Daemon::start("", &admin_key_config());
    let parse = |status: u16, text: &str| {
        assert!((200..300).contains(&status), "{status}: {text}");
        text.to_string()
    };
    let call = |method: &str, path: &str, body: &str| {
        let (status, text) = curl(&daemon, method, path, Some(("application/json", body)));
        parse(status, &text)
    };
    let read = |path: &str| {
        let (status, text) = curl(&daemon, "GET", path, None);
        parse(status, &text)
    };

    let made: kcli::IdResponse = serde_json::from_str(&call(
        "POST",
        SUSPEND,
        r#"{"campaign":null,"tenant":null,"domain":"k.test","reason":"kcli","duration":"1h 30m"}"#,
    ))
    .unwrap();
    assert!(kcli::is_uuid(&made.id), "{}", made.id);
    let list: Vec<kcli::SuspendV1ListEntry> = serde_json::from_str(&read(SUSPEND)).unwrap();
    assert_eq!(list[0].id, made.id);
    assert_eq!(
        (
            list[0].campaign.as_deref(),
            list[0].tenant.as_deref(),
            list[0].domain.as_deref()
        ),
        (None, None, Some("k.test"))
    );
    assert_eq!(list[0].reason, "kcli");
    let left = humantime::parse_duration(&list[0].duration)
        .unwrap()
        .as_secs();
    assert!((5390..=5400).contains(&left), "{}", list[0].duration);
    call("DELETE", SUSPEND, &format!(r#"{{"id":"{}"}}"#, made.id));

    let made: kcli::IdResponse = serde_json::from_str(&call(
        "POST",
        READY,
        r#"{"name":"src->mx.k.test@smtp_client","reason":"kcli","duration":"5m"}"#,
    ))
    .unwrap();
    assert!(kcli::is_uuid(&made.id));
    let list: Vec<kcli::SuspendReadyQueueV1ListEntry> = serde_json::from_str(&read(READY)).unwrap();
    assert_eq!(
        (list[0].id.as_str(), list[0].name.as_str()),
        (made.id.as_str(), "src->mx.k.test")
    );
    assert_eq!(list[0].reason, "kcli");
    assert!(humantime::parse_duration(&list[0].duration).is_ok());
    assert!(
        humantime::parse_rfc3339(&list[0].expires).is_ok(),
        "{}",
        list[0].expires
    );
    call("DELETE", READY, &format!(r#"{{"id":"{}"}}"#, made.id));

    let made: kcli::BounceV1Response = serde_json::from_str(&call(
        "POST",
        BOUNCE,
        r#"{"campaign":null,"tenant":"kcli","domain":null,"routing_domain":null,"reason":"kcli","duration":"5m","suppress_logging":false}"#,
    ))
    .unwrap();
    assert!(kcli::is_uuid(&made.id));
    assert_eq!((made.bounced.len(), made.total_bounced), (0, 0));
    let list: Vec<kcli::BounceV1ListEntry> = serde_json::from_str(&read(BOUNCE)).unwrap();
    let entry = &list[0];
    assert_eq!(entry.id, made.id);
    assert_eq!(entry.tenant.as_deref(), Some("kcli"));
    assert!(entry.campaign.is_none() && entry.domain.is_none() && entry.routing_domain.is_none());
    assert_eq!(entry.reason, "kcli");
    assert!(humantime::parse_duration(&entry.duration).is_ok());
    assert_eq!((entry.bounced.len(), entry.total_bounced), (0, 0));
    call("DELETE", BOUNCE, &format!(r#"{{"id":"{}"}}"#, made.id));

    // Delivery is suspended in this daemon: the message stays queued.
    let id = daemon.send_accepted("k@k.test", "Subject: kcli\r\n\r\nbody\r\n");
    assert!(kcli::is_uuid(&id), "a message id is a SpoolId: {id}");
    let found: kcli::InspectMessageV1Response =
        serde_json::from_str(&read(&format!("{INSPECT}?id={id}&want_body=true"))).unwrap();
    assert_eq!(found.id, id);
    assert_eq!(found.message.recipient, ["k@k.test"]);
    assert!(!found.message.sender.is_empty());
    assert!(
        found.message.meta.contains_key("peer"),
        "{:?}",
        found.message.meta
    );
    assert!(found.message.data.unwrap().contains("Subject: kcli"));
    assert!(humantime::parse_rfc3339(&found.message.due.unwrap()).is_ok());
    assert_eq!(found.message.num_attempts, Some(0));
    let queue: kcli::InspectQueueV1Response = serde_json::from_str(&read(
        "/api/admin/inspect-sched-q/v1?queue_name=k.test&want_body=true&limit=5",
    ))
    .unwrap();
    assert_eq!(
        (queue.queue_name.as_str(), queue.num_scheduled),
        ("k.test", 1)
    );
    assert_eq!(queue.messages[0].id, id);
    assert!(queue.messages[0].message.data.is_some());
    assert!(queue.queue_config.is_object());
    assert_eq!(queue.delayed_metric, 0);
    for time in [&queue.now, &queue.last_changed] {
        assert!(humantime::parse_rfc3339(time).is_ok(), "{time}");
    }
}

/// A rebind moves the queued messages of a scheduled queue to another pool — also
/// after a restart, for the messages recovered from the spool — and leaves the
/// messages received after it on theirs.
#[test]
fn a_rebind_moves_queued_mail_to_another_pool_and_outlives_a_restart() {
    let sink = sink();
    let (smtp, http) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[server]\nhostname = \"gannet.test\"\ndata_dir = \"{}\"\nshards = 2\n\
         [smtp]\nlisten = [\"127.0.0.1:{smtp}\"]\n\
         [http]\nlisten = [\"127.0.0.1:{http}\"]\n{}\
         [delivery]\nretry_interval_secs = 1\ntls = \"disabled\"\n\
         routes = {{ \"r.test\" = [\"127.0.0.1:{}\"] }}\n\
         sources = {{ a = {{ source_ip = \"127.0.0.1\" }}, b = {{ source_ip = \"127.0.0.2\" }} }}\n\
         pools = {{ first = [{{ source = \"a\" }}], second = [{{ source = \"b\" }}] }}\n",
        dir.path().join("data").display(),
        admin_key_config(),
        sink.port
    );
    let mut daemon = Daemon::start_in(dir, &config);
    let (status, held) = post(&daemon, SUSPEND, r#"{"domain":"r.test","reason":"hold"}"#);
    assert_eq!(status, 200, "{held}");
    let pooled = "X-Gannet-Pool: first\r\nSubject: p\r\n\r\nx\r\n.\r\n";
    let old = inject(&daemon, &["old@r.test"], pooled);
    wait_events(&daemon, "the message held", |e| {
        !of(e, "delayed", "old@r.test").is_empty()
    });

    // Bad requests first: precise errors, nothing made.
    let bad: [Case; 4] = [
        (
            "POST",
            Some((
                "application/json",
                r#"{"reason":"r","data":{"pool":"nope"}}"#,
            )),
            400,
            "pool `nope`",
        ),
        (
            "POST",
            Some(("application/json", r#"{"reason":"r","data":{"ip":"x"}}"#)),
            400,
            "data.ip",
        ),
        (
            "POST",
            Some((
                "application/json",
                r#"{"reason":"r","data":{"pool":"second"},"trigger_rebind_event":true}"#,
            )),
            400,
            "Lua",
        ),
        (
            "POST",
            Some(("application/json", r#"{"reason":"r"}"#)),
            400,
            "data",
        ),
    ];
    refused(&daemon, "/api/admin/rebind/v1", &bad);
    let (status, made) = post(
        &daemon,
        "/api/admin/rebind/v1",
        r#"{"domain":"r.test","reason":"move","data":{"pool":"second"},"suppress_logging":false}"#,
    );
    assert_eq!(status, 200, "{made}");
    wait_events(&daemon, "the rebind event", |e| {
        (e.iter()).any(|e| {
            e["type"] == "admin_rebind" && e["message_id"] == old.as_str() && e["pool"] == "second"
        })
    });
    // Received after the rebind: stays on its pool.
    inject(&daemon, &["new@r.test"], pooled);

    // Restart on the same ports: the recovered message is rebound again.
    daemon.stop();
    let dir = std::mem::replace(&mut daemon.dir, tempfile::tempdir().unwrap());
    daemon = Daemon::start_in(dir, &config);
    assert_eq!((daemon.smtp.port(), daemon.http.port()), (smtp, http));
    let body = format!("{{\"id\":\"{}\"}}", held["id"].as_str().unwrap());
    let (status, text) = curl(
        &daemon,
        "DELETE",
        SUSPEND,
        Some(("application/json", &body)),
    );
    assert_eq!(status, 200, "{text}");
    let events = wait_events(&daemon, "both delivered", |e| {
        !of(e, "delivery", "old@r.test").is_empty() && !of(e, "delivery", "new@r.test").is_empty()
    });
    assert_eq!(
        of(&events, "delivery", "old@r.test")[0]["egress_source"],
        "b"
    );
    assert_eq!(
        of(&events, "delivery", "new@r.test")[0]["egress_source"],
        "a"
    );
}

/// The admin verbs on a loaded server: while clients send 400 messages, an operator
/// lists every queue (with detail), reads the summary, inspects a message, counts a
/// bounce, suspends and lifts a ready queue of another site. Every answer is right,
/// and every message arrives.
#[test]
fn admin_verbs_answer_while_mail_flows_and_nothing_is_lost() {
    let (a, b) = (sink(), sink());
    let config = format!(
        "{}[delivery]\ntls = \"disabled\"\n\
         routes = {{ \"a.test\" = [\"127.0.0.1:{}\"], \"b.test\" = [\"127.0.0.1:{}\"] }}\n",
        admin_key_config(),
        a.port,
        b.port
    );
    let daemon = std::sync::Arc::new(Daemon::start("", &config));
    const CLIENTS: usize = 4;
    const EACH: usize = 100;
    let senders: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let daemon = daemon.clone();
            std::thread::spawn(move || {
                (0..EACH)
                    .map(|n| {
                        daemon.send_accepted(
                            &format!("c{c}n{n}@a.test"),
                            "Subject: load\r\n\r\nx\r\n",
                        )
                    })
                    .collect::<Vec<String>>()
            })
        })
        .collect();
    let other = format!("default->127.0.0.1:{}", b.port);
    let mut rounds = 0;
    while senders.iter().any(|s| !s.is_finished()) || rounds < 5 {
        rounds += 1;
        let listing = get(&daemon, &format!("{QUEUES}?detail=true"));
        assert!(
            listing["ready"].is_array() && listing["scheduled"].is_array(),
            "{listing}"
        );
        let summary = get(&daemon, SUMMARY);
        assert_eq!(summary["shards"].as_array().unwrap().len(), 2, "{summary}");
        let (status, dry) = post(
            &daemon,
            BOUNCE,
            r#"{"domain":"none.test","reason":"r","dry_run":true}"#,
        );
        assert_eq!(
            (status, dry["total_bounced"].as_u64()),
            (200, Some(0)),
            "{dry}"
        );
        let (status, made) = post(
            &daemon,
            READY,
            &format!(r#"{{"name":"{other}","reason":"load test","duration":"1m"}}"#),
        );
        assert_eq!(status, 200, "{made}");
        let body = format!("{{\"id\":\"{}\"}}", made["id"].as_str().unwrap());
        let (status, text) = curl(&daemon, "DELETE", READY, Some(("application/json", &body)));
        assert_eq!(status, 200, "{text}");
    }
    let ids: Vec<String> = senders
        .into_iter()
        .flat_map(|s| s.join().unwrap())
        .collect();
    assert_eq!(ids.len(), CLIENTS * EACH);
    let (status, text) = curl(&daemon, "GET", &format!("{INSPECT}?id={}", ids[0]), None);
    // Delivered already (404) or still queued (200): either is a precise answer.
    assert!(status == 200 || status == 404, "{status}: {text}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while a.messages().len() < CLIENTS * EACH {
        assert!(
            Instant::now() < deadline,
            "{} of {} arrived",
            a.messages().len(),
            CLIENTS * EACH
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(rounds >= 5);
}
