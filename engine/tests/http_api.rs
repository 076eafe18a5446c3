//! The HTTP injection API end to end: SparkPost's official Python client sends
//! transmissions over HTTPS; curl sends the bad requests; messages arrive at an
//! aiosmtpd sink and are taken apart by Python's email parser.

mod common;

use std::process::Command;

use common::relay::{delivery_config, of, sink, wait_events};
use common::{Daemon, curl, run_with_input};
use serde_json::{Value, json};

const KEY: &str = "gannet-test-key-5c1e0b7f2a9d4e61";

fn key_config() -> String {
    format!(
        "api_keys = [{{ name = \"tests\", key_sha256 = \"{}\", tenant = \"acme\" }}]\ntls_listen = [\"127.0.0.1:0\"]\n",
        gannet_core::auth::KeyDigest::of(KEY)
    )
}

/// A daemon with the test key whose mail for x.test and y.test goes to `port`.
fn daemon(port: u16, http_extra: &str) -> Daemon {
    let routes =
        format!("\"x.test\" = [\"127.0.0.1:{port}\"], \"y.test\" = [\"127.0.0.1:{port}\"]");
    Daemon::start(
        "",
        &format!("{}{http_extra}\n{}", key_config(), delivery_config(&routes)),
    )
}

fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// POSTs JSON with the test key.
fn post(daemon: &Daemon, path: &str, body: &Value) -> (u16, Value) {
    let (status, text) = curl(
        daemon,
        "POST",
        path,
        &[&format!("Authorization: {KEY}")],
        Some(("application/json", body.to_string().as_bytes())),
    );
    (status, parse(&text))
}

/// SparkPost's Python client with the test key (`common::sparkpost_client`).
fn sparkpost_client(daemon: &Daemon, script: &str) -> Value {
    common::sparkpost_client(daemon, KEY, script)
}

/// Python's email parser on a received message: headers, and each leaf part's
/// content type, disposition, filename, content id and decoded text.
const DISSECT: &str = r#"
import email, email.policy, json, sys
msg = email.message_from_bytes(sys.stdin.buffer.read(), policy=email.policy.default)
def tree(part):
    if part.is_multipart():
        return {"type": part.get_content_type(), "parts": [tree(p) for p in part.iter_parts()]}
    payload = part.get_payload(decode=True)
    text = payload.decode("utf-8") if part.get_content_maintype() == "text" else None
    return {"type": part.get_content_type(), "disposition": part.get_content_disposition(),
            "filename": part.get_filename(), "cid": part.get("Content-ID"),
            "text": text, "bytes": len(payload)}
print(json.dumps({"headers": {k: str(v) for k, v in msg.items()}, "body": tree(msg)}))
"#;

fn dissect(data: &str) -> Value {
    let out = run_with_input(
        Command::new(common::peers::python()).arg("-c").arg(DISSECT),
        &data.chars().map(|c| c as u8).collect::<Vec<u8>>(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse(String::from_utf8_lossy(&out.stdout).trim())
}

/// Waits for `n` messages at the sink, keyed by recipient.
fn received(sink: &common::relay::Sink, n: usize) -> std::collections::BTreeMap<String, Value> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let messages = sink.messages();
        if messages.len() >= n {
            return messages
                .into_iter()
                .map(|m| (m["rcpt_tos"][0].as_str().unwrap().to_string(), m))
                .collect();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {n} messages arrived",
            messages.len()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn sparkpost_client_sends_inline_content_merged_per_recipient() {
    let sink = sink();
    let daemon = daemon(sink.port, "");
    let result = sparkpost_client(
        &daemon,
        r#"
r = sp.transmissions.send(
    recipients=[
        {"address": {"email": "ann@x.test", "name": "Ann Lee"},
         "substitution_data": {"first": "Ann", "items": ["tea", "<cake>"]},
         "tags": ["vip"], "metadata": {"uid": 1}},
        {"address": "bob@y.test", "metadata": {"uid": 2}},
        "carol@x.test",
    ],
    from_email="Shop <shop@s.test>",
    subject="Hello {{ first or 'friend' }}",
    text="Hi {{ first or 'friend' }}, uid {{ uid }}.",
    html="<p>Hi {{ first or 'friend' }}</p><ul>{{ each items }}<li>{{ loop_var }}</li>{{ end }}</ul>",
    campaign="spring-sale",
    metadata={"source": "tests"},
    substitution_data={"first": "friend"},
    custom_headers={"X-Campaign-Note": "note for {{ first }}"},
)
print(json.dumps(r))
"#,
    );
    assert_eq!(result["total_accepted_recipients"], 3, "{result}");
    assert_eq!(result["total_rejected_recipients"], 0, "{result}");
    let transmission = result["id"].as_str().unwrap().to_string();

    let messages = received(&sink, 3);
    let ann = dissect(messages["ann@x.test"]["data"].as_str().unwrap());
    assert_eq!(messages["ann@x.test"]["mail_from"], "shop@s.test");
    assert_eq!(ann["headers"]["Subject"], "Hello Ann");
    assert_eq!(ann["headers"]["From"], "Shop <shop@s.test>");
    assert_eq!(ann["headers"]["To"], "Ann Lee <ann@x.test>");
    assert_eq!(ann["headers"]["X-Campaign-Note"], "note for Ann");
    assert_eq!(ann["body"]["type"], "multipart/alternative");
    let parts = ann["body"]["parts"].as_array().unwrap();
    assert_eq!(parts[0]["type"], "text/plain");
    assert_eq!(
        parts[0]["text"].as_str().unwrap().trim_end(),
        "Hi Ann, uid 1."
    );
    assert_eq!(parts[1]["type"], "text/html");
    assert_eq!(
        parts[1]["text"].as_str().unwrap().trim_end(),
        "<p>Hi Ann</p><ul><li>tea</li><li>&lt;cake&gt;</li></ul>"
    );
    // bob: the transmission's substitution data is the default; his metadata fills uid.
    let bob = dissect(messages["bob@y.test"]["data"].as_str().unwrap());
    assert_eq!(bob["headers"]["Subject"], "Hello friend");
    assert_eq!(
        bob["body"]["parts"][0]["text"].as_str().unwrap().trim_end(),
        "Hi friend, uid 2."
    );
    let carol = dissect(messages["carol@x.test"]["data"].as_str().unwrap());
    assert_eq!(
        carol["body"]["parts"][0]["text"]
            .as_str()
            .unwrap()
            .trim_end(),
        "Hi friend, uid ."
    );

    // Every message has an injection and a delivery event carrying the transmission,
    // campaign, recipient metadata and tags.
    let events = wait_events(&daemon, "three deliveries", |e| {
        e.iter().filter(|e| e["type"] == "delivery").count() == 3
    });
    for rcpt in ["ann@x.test", "bob@y.test", "carol@x.test"] {
        for kind in ["injection", "delivery"] {
            let found = of(&events, kind, rcpt);
            assert_eq!(found.len(), 1, "{kind} {rcpt}: {events:#?}");
            assert_eq!(found[0]["transmission_id"], transmission.as_str());
            assert_eq!(found[0]["campaign_id"], "spring-sale");
            assert_eq!(found[0]["tenant"], "acme");
            assert_eq!(found[0]["rcpt_meta"]["source"], "tests");
        }
    }
    let ann_delivery = of(&events, "delivery", "ann@x.test")[0];
    assert_eq!(ann_delivery["rcpt_tags"], json!(["vip"]));
    assert_eq!(ann_delivery["rcpt_meta"]["uid"], 1);
    assert_eq!(
        of(&events, "injection", "ann@x.test")[0]["subject"],
        "Hello Ann"
    );
    assert_eq!(daemon.metric("http_messages_generated_total"), 3);
}

#[test]
fn one_recipient_with_attachments_inline_images_and_amp() {
    let sink = sink();
    let daemon = daemon(sink.port, "");
    let png = [0x89u8, b'P', b'N', b'G', 0, 1, 2, 3, 255];
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(png);
    let body = json!({
        "recipients": [{"address": {"email": "dee@x.test", "name": "Dée Ünïcode"}}],
        "return_path": "bounces@s.test",
        "content": {
            "from": {"email": "news@s.test", "name": "Nouvelles"},
            "subject": "Prix spéciaux pour {{ who }}",
            "reply_to": "help@s.test",
            "text": "Bonjour {{ who }} — ça va?",
            "html": "<p>Bonjour {{ who }}</p><img src=\"cid:logo.png\">",
            "amp_html": "<!doctype html><html ⚡4email><body>{{ who }}</body></html>",
            "attachments": [{"name": "report.bin", "type": "application/octet-stream", "data": b64}],
            "inline_images": [{"name": "logo.png", "type": "image/png", "data": b64}]
        },
        "substitution_data": {"who": "Dée"}
    });
    let (status, reply) = post(&daemon, "/api/v1/transmissions", &body);
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["results"]["total_accepted_recipients"], 1);

    let messages = received(&sink, 1);
    let message = &messages["dee@x.test"];
    assert_eq!(message["mail_from"], "bounces@s.test");
    let m = dissect(message["data"].as_str().unwrap());
    assert_eq!(m["headers"]["Subject"], "Prix spéciaux pour Dée");
    assert_eq!(m["headers"]["To"], "Dée Ünïcode <dee@x.test>");
    assert_eq!(m["headers"]["Reply-To"], "help@s.test");
    assert!(
        m["headers"]["Message-ID"]
            .as_str()
            .unwrap()
            .ends_with("@gannet.test>"),
        "{m}"
    );
    assert!(m["headers"].get("Date").is_some());
    // mixed [ alternative [ text, amp, related [ html, image ] ], attachment ]
    let body = &m["body"];
    assert_eq!(body["type"], "multipart/mixed", "{m}");
    let alternative = &body["parts"][0];
    assert_eq!(alternative["type"], "multipart/alternative");
    assert_eq!(alternative["parts"][0]["type"], "text/plain");
    assert_eq!(
        alternative["parts"][0]["text"].as_str().unwrap().trim_end(),
        "Bonjour Dée — ça va?"
    );
    assert_eq!(alternative["parts"][1]["type"], "text/x-amp-html");
    let related = &alternative["parts"][2];
    assert_eq!(related["type"], "multipart/related");
    assert_eq!(related["parts"][0]["type"], "text/html");
    assert!(
        related["parts"][0]["text"]
            .as_str()
            .unwrap()
            .contains("<p>Bonjour Dée</p>")
    );
    assert_eq!(related["parts"][1]["type"], "image/png");
    assert_eq!(related["parts"][1]["cid"], "<logo.png>");
    assert_eq!(related["parts"][1]["bytes"], png.len());
    let attachment = &body["parts"][1];
    assert_eq!(attachment["disposition"], "attachment");
    assert_eq!(attachment["filename"], "report.bin");
    assert_eq!(attachment["bytes"], png.len());
}

#[test]
fn rfc822_content_with_substitutions_and_a_scheduled_start() {
    let sink = sink();
    let daemon = daemon(sink.port, "");
    let start_ms = gannet_core::clock::unix_ms() + 2_000;
    let secs = start_ms / 1000 + 1;
    let body = json!({
        "options": {"start_time": rfc3339(secs)},
        "recipients": [{"address": "eve@x.test", "substitution_data": {"code": "A1"}}],
        "content": {"email_rfc822": "From: Shop <shop@s.test>\nTo: eve@x.test\nSubject: code {{code}}\n\nYour code is {{code}}.\n"}
    });
    let (status, reply) = post(&daemon, "/api/v1/transmissions", &body);
    assert_eq!(status, 200, "{reply}");
    let messages = received(&sink, 1);
    let data = messages["eve@x.test"]["data"].as_str().unwrap();
    assert!(data.contains("Subject: code A1\r\n"), "{data}");
    assert!(data.contains("Your code is A1.\r\n"), "{data}");
    assert_eq!(messages["eve@x.test"]["mail_from"], "shop@s.test");
    let events = wait_events(&daemon, "the delivery", |e| {
        !of(e, "delivery", "eve@x.test").is_empty()
    });
    let delivery = of(&events, "delivery", "eve@x.test")[0];
    assert!(
        delivery["timestamp_ms"].as_u64().unwrap() >= secs * 1000,
        "delivered before start_time: {delivery}"
    );
}

/// `YYYY-MM-DDTHH:MM:SSZ` for unix seconds.
fn rfc3339(secs: u64) -> String {
    let out = Command::new("date")
        .args(["-u", "-d", &format!("@{secs}"), "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn a_recipient_whose_rendering_fails_does_not_stop_the_others() {
    let sink = sink();
    let daemon = daemon(sink.port, "");
    let body = json!({
        "recipients": [
            {"address": "ok1@x.test", "substitution_data": {"items": ["a"]}},
            {"address": "bad@x.test", "substitution_data": {"items": "not a list"}, "tags": ["t"]},
            {"address": "not an address"},
            {"address": {"email": "ok2@x.test", "header_to": "\"The Team\" <team@x.test>"}}
        ],
        "content": {"from": "s@s.test", "subject": "s", "text": "{{ each items }}{{ loop_var }}{{ end }}!"}
    });
    let (status, reply) = post(&daemon, "/api/v1/transmissions", &body);
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["results"]["total_accepted_recipients"], 3, "{reply}");
    assert_eq!(reply["results"]["total_rejected_recipients"], 1, "{reply}");
    let messages = received(&sink, 2);
    assert!(messages.contains_key("ok1@x.test") && messages.contains_key("ok2@x.test"));
    // header_to shows another address in To (SparkPost's CC and BCC).
    let ok2 = dissect(messages["ok2@x.test"]["data"].as_str().unwrap());
    assert_eq!(ok2["headers"]["To"], "The Team <team@x.test>");
    let events = wait_events(&daemon, "the generation failure", |e| {
        !of(e, "generation_failure", "bad@x.test").is_empty()
    });
    let failure = of(&events, "generation_failure", "bad@x.test")[0];
    assert!(
        failure["reason"]
            .as_str()
            .unwrap()
            .contains("each needs an array"),
        "{failure}"
    );
    assert_eq!(failure["rcpt_tags"], json!(["t"]));
    assert_eq!(daemon.metric("http_generation_failures_total"), 1);
}

/// A recipient whose message cannot be spooled (here: far over the size limit) in
/// the middle of a large transmission fails alone: the others of its chunk and the
/// job go on, the job ends, and a restart generates nothing again.
#[test]
fn a_recipient_whose_message_cannot_be_spooled_fails_alone_and_nothing_is_duplicated() {
    let mut daemon = Daemon::start("message_bytes_max = 20000\n", &key_config());
    let n = 600;
    // Small enough for the job record (2 × message_bytes_max + 1 MiB), but three
    // times over in the rendered message: more than a spool record may hold.
    let big = "x".repeat(500_000);
    let recipients: Vec<Value> = (0..n)
        .map(|i| {
            let data = if i == 300 { big.as_str() } else { "" };
            json!({"address": format!("r{i}@x.test"), "substitution_data": {"big": data}})
        })
        .collect();
    let body = json!({
        "recipients": recipients,
        "content": {"from": "s@s.test", "subject": "s", "text": "hello {{ big }}{{ big }}{{ big }}"}
    });
    let (status, reply) = post(&daemon, "/api/v1/transmissions", &body);
    assert_eq!(status, 200, "{reply}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while daemon.metric("http_generation_jobs") > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the job did not finish: {:#?}",
            daemon.log.lock().unwrap()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let events = wait_events(&daemon, "the generation failure", |e| {
        !of(e, "generation_failure", "r300@x.test").is_empty()
    });
    let reason = of(&events, "generation_failure", "r300@x.test")[0]["reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(reason.contains("smtp.message_bytes_max"), "{reason}");
    let count = |daemon: &Daemon| {
        let spooled = common::spooled(&daemon.data_dir());
        let rcpts: std::collections::BTreeSet<String> =
            spooled.iter().map(|m| m.recipients[0].clone()).collect();
        (spooled.len(), rcpts.len())
    };
    daemon.stop();
    assert_eq!(count(&daemon), (n - 1, n - 1));
    let dir = std::mem::replace(&mut daemon.dir, tempfile::tempdir().unwrap());
    let config = std::fs::read_to_string(dir.path().join("gannetd.toml")).unwrap();
    let mut daemon = Daemon::start_in(dir, &config);
    assert_eq!(daemon.metric("http_generation_jobs"), 0);
    daemon.stop();
    assert_eq!(count(&daemon), (n - 1, n - 1));
}

/// SparkPost's Python client lists and gets transmissions with their state and
/// counts, and deletes a scheduled one: its queued messages are dropped and no
/// more generated; one already sent cannot be deleted (409).
#[test]
fn transmissions_are_listed_and_got_and_a_scheduled_one_canceled() {
    let sink = sink();
    let mut daemon = daemon(sink.port, "");
    let later = rfc3339(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 3600,
    );
    let got = sparkpost_client(
        &daemon,
        &format!(
            r#"
import time, warnings
warnings.simplefilter("ignore")
scheduled = sp.transmissions.send(recipients=["a@x.test", "b@x.test", "c@x.test"],
    from_email="app@sender.test", subject="later", text="t", campaign="spring",
    description="the spring sale", start_time="{later}")
now = sp.transmissions.send(recipients=["d@x.test"], from_email="app@sender.test",
    subject="now", text="t", campaign="receipts")
for _ in range(200):
    got = sp.transmissions.get(scheduled["id"])
    if got["num_generated"] == 3:
        break
    time.sleep(0.05)
listed = sp.transmissions.list()
only_spring = sp.transmissions.list(campaign_id="spring")
try:
    sp.transmissions.delete(now["id"])
    refused = None
except Exception as e:
    refused = str(e)
deleted = sp.transmissions.delete(scheduled["id"])
after = sp.transmissions.get(scheduled["id"])
print(json.dumps({{"scheduled": scheduled["id"], "now": now["id"], "got": got,
    "listed": listed, "only_spring": only_spring, "refused": refused,
    "deleted": deleted, "after": after}}))
"#
        ),
    );
    let got_one = &got["got"];
    assert_eq!(got_one["id"], got["scheduled"]);
    assert_eq!(got_one["state"], "submitted", "{got_one}");
    assert_eq!(
        (
            got_one["num_rcpts"].as_u64(),
            got_one["num_generated"].as_u64()
        ),
        (Some(3), Some(3))
    );
    assert_eq!(got_one["description"], "the spring sale");
    assert_eq!(got_one["campaign_id"], "spring");
    let listed = got["listed"].as_array().unwrap();
    assert_eq!(listed.len(), 2, "{listed:#?}");
    assert_eq!(listed[0]["id"], got["now"], "newest first");
    assert_eq!(got["only_spring"].as_array().unwrap().len(), 1);
    assert!(got["refused"].as_str().unwrap().contains("409"), "{got}");
    assert_eq!(got["after"]["state"], "Canceled");
    // The receipt is delivered; the canceled transmission's messages never are.
    wait_events(&daemon, "the receipt's delivery", |events| {
        events
            .iter()
            .any(|e| e["type"] == "delivery" && e["rcpt_to"] == "d@x.test")
    });
    let (status, _) = curl(
        &daemon,
        "DELETE",
        "/api/v1/transmissions/0000nope",
        &[&format!("Authorization: {KEY}")],
        None,
    );
    assert_eq!(status, 404);
    let (status, _) = curl(
        &daemon,
        "GET",
        "/api/v1/transmissions/0000nope",
        &[&format!("Authorization: {KEY}")],
        None,
    );
    assert_eq!(status, 404);
    let (status, _) = curl(
        &daemon,
        "DELETE",
        "/api/v1/transmissions",
        &[&format!("Authorization: {KEY}")],
        None,
    );
    assert_eq!(status, 405, "a DELETE of the collection needs campaign_id");
    daemon.stop();
    let scheduled = got["scheduled"].as_str().unwrap();
    let left: Vec<_> = common::spooled(&daemon.data_dir())
        .into_iter()
        .filter(|m| {
            m.meta
                .iter()
                .any(|(k, v)| k == "transmission_id" && v == scheduled)
        })
        .collect();
    assert!(
        left.is_empty(),
        "the canceled transmission's messages are gone: {}",
        left.len()
    );
    // Its state survives a restart.
    let dir = std::mem::replace(&mut daemon.dir, tempfile::tempdir().unwrap());
    let text = std::fs::read_to_string(dir.path().join("gannetd.toml")).unwrap();
    let daemon = Daemon::start_in(dir, &text);
    let (status, text) = curl(
        &daemon,
        "GET",
        &format!("/api/v1/transmissions/{scheduled}"),
        &[&format!("Authorization: {KEY}")],
        None,
    );
    assert_eq!(status, 200, "{text}");
    assert_eq!(parse(&text)["results"]["transmission"]["state"], "Canceled");
}

#[test]
fn bad_requests_get_sparkpost_errors_and_queue_nothing() {
    let daemon = daemon(1, "request_bytes_max = 4096\n");
    let path = "/api/v1/transmissions";
    let good = json!({
        "recipients": [{"address": "a@x.test"}],
        "content": {"from": "s@s.test", "subject": "s", "text": "t"}
    });
    let with = |pointer: &str, value: Value| {
        let mut body = good.clone();
        let (parent, key) = pointer.rsplit_once('/').unwrap();
        match body.pointer_mut(parent).unwrap() {
            Value::Object(map) => {
                map.insert(key.to_string(), value);
            }
            Value::Array(items) => items[key.parse::<usize>().unwrap()] = value,
            other => panic!("{pointer} in {other}"),
        }
        body.to_string()
    };
    let auth = format!("Authorization: {KEY}");
    let basic = {
        use base64::Engine as _;
        format!(
            "Authorization: Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{KEY}:"))
        )
    };
    // The good request is accepted with each accepted form of the key.
    for header in [
        auth.as_str(),
        basic.as_str(),
        &format!("Authorization: Bearer {KEY}"),
    ] {
        let (status, text) = curl(
            &daemon,
            "POST",
            path,
            &[header],
            Some(("application/json", good.to_string().as_bytes())),
        );
        assert_eq!(status, 200, "{header}: {text}");
    }
    let big = "x".repeat(5000);
    // (headers, content type, body, status, code, words the description must contain)
    type Case<'a> = (Vec<&'a str>, &'a str, String, u16, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec![],
            "application/json",
            good.to_string(),
            401,
            "",
            "API key",
        ),
        (
            vec!["Authorization: wrong-key"],
            "application/json",
            good.to_string(),
            401,
            "",
            "API key",
        ),
        (
            vec![&auth],
            "application/json",
            "{\"recipients\": [".into(),
            400,
            "1300",
            "parsing request as json",
        ),
        (
            vec![&auth],
            "application/json",
            "[1, 2]".into(),
            422,
            "1300",
            "invalid type",
        ),
        (
            vec![&auth],
            "text/plain",
            good.to_string(),
            415,
            "",
            "application/json",
        ),
        (
            vec![&auth],
            "application/json",
            big.clone(),
            413,
            "",
            "4096",
        ),
        (
            vec![&auth],
            "application/json",
            with("/recipients", json!("a@x.test")),
            422,
            "1300",
            "recipients",
        ),
        (
            vec![&auth],
            "application/json",
            with("/content/subject", json!(5)),
            422,
            "1300",
            "content.subject",
        ),
        (
            vec![&auth],
            "application/json",
            with("/content", json!({"template_id": "nope"})),
            422,
            "1300",
            "\"nope\" does not exist",
        ),
        (
            vec![&auth],
            "application/json",
            with("/recipients", json!({"list_id": "nope"})),
            422,
            "1300",
            "\"nope\" does not exist",
        ),
        (
            vec![&auth],
            "application/json",
            with("/recipients", json!([])),
            422,
            "1400",
            "recipient",
        ),
        (
            vec![&auth],
            "application/json",
            with("/recipients", json!([{"address": "no-at-sign"}])),
            422,
            "1300",
            "not an email address",
        ),
        (
            vec![&auth],
            "application/json",
            with(
                "/recipients",
                json!([{"address": "a b@x.test"}, {"address": "@x"}]),
            ),
            422,
            "1300",
            "no recipient",
        ),
        (
            vec![&auth],
            "application/json",
            with("/content/from", json!("not-an-address")),
            422,
            "1300",
            "content.from",
        ),
        (
            vec![&auth],
            "application/json",
            with("/content/subject", Value::Null),
            422,
            "1400",
            "content.subject",
        ),
        (
            vec![&auth],
            "application/json",
            with("/content/text", json!("{{ if x }}open")),
            422,
            "3000",
            "part text: line 1: if without end",
        ),
        (
            vec![&auth],
            "application/json",
            with("/content/text", json!("a\nb {{ x ")),
            422,
            "3000",
            "line 2",
        ),
        (
            vec![&auth],
            "application/json",
            with("/content", json!({"from": "s@s.test", "subject": "s"})),
            422,
            "1400",
            "text, html or amp_html",
        ),
        (
            vec![&auth],
            "application/json",
            with("/content", json!({"email_rfc822": "x", "subject": "s"})),
            422,
            "1301",
            "email_rfc822",
        ),
        (
            vec![&auth],
            "application/json",
            with("/content/headers", json!({"Bad Name": "v"})),
            422,
            "1300",
            "header name",
        ),
        (
            vec![&auth],
            "application/json",
            with("/content/headers", json!({"X-A": "v\r\nBcc: evil@x.test"})),
            422,
            "1300",
            "one line",
        ),
        (
            vec![&auth],
            "application/json",
            with(
                "/content/attachments",
                json!([{"name": "a", "type": "text/plain", "data": "!!"}]),
            ),
            422,
            "1300",
            "base64",
        ),
        (
            vec![&auth],
            "application/json",
            with("/recipients/0/return_path", json!(1)),
            422,
            "1300",
            "return_path",
        ),
    ];
    for (headers, content_type, body, status, code, words) in &cases {
        let (got, text) = curl(
            &daemon,
            "POST",
            path,
            headers,
            Some((content_type, body.as_bytes())),
        );
        let reply = parse(&text);
        let error = &reply["errors"][0];
        assert_eq!(got, *status, "{body}: {text}");
        assert!(error["message"].is_string(), "{text}");
        if !code.is_empty() {
            assert_eq!(error["code"], *code, "{body}: {text}");
        }
        let described = format!(
            "{} {}",
            error["message"].as_str().unwrap(),
            error["description"].as_str().unwrap_or("")
        );
        assert!(described.contains(words), "{body}: {text} lacks {words:?}");
    }
    // Bad start time, unknown pool, wrong method, unknown endpoint.
    let mut body = good.clone();
    body["options"] = json!({"start_time": "tomorrow"});
    assert_eq!(post(&daemon, path, &body).0, 422);
    body["options"] = json!({"ip_pool": "nope"});
    let (status, reply) = post(&daemon, path, &body);
    assert_eq!(status, 422, "{reply}");
    assert!(
        reply["errors"][0]["description"]
            .as_str()
            .unwrap()
            .contains("ip_pool")
    );
    let (status, text) = curl(&daemon, "PATCH", path, &[&auth], None);
    assert_eq!(
        (status, parse(&text)["errors"][0]["code"].as_str()),
        (405, Some("1102")),
        "{text}"
    );
    let (status, text) = curl(&daemon, "GET", "/api/v1/nothing", &[&auth], None);
    assert_eq!(
        (status, parse(&text)["errors"][0]["code"].as_str()),
        (404, Some("1101")),
        "{text}"
    );
    // Only the three good requests were generated; the shard kept serving.
    assert_eq!(daemon.metric("http_messages_generated_total"), 3);
    assert_eq!(daemon.http_get("/health").0, 200);
}

#[test]
fn sparkpost_client_uses_stored_templates_and_recipient_lists_which_survive_restart() {
    let sink = sink();
    let mut daemon = daemon(sink.port, "");
    let result = sparkpost_client(
        &daemon,
        r#"
out = {}
out["create"] = sp.templates.create(id="welcome", name="Welcome", from_email="Shop <shop@s.test>",
    subject="Welcome {{ name }}", text="Hello {{ name }}, plan {{ plan or 'basic' }}",
    html="<p>Hello {{ name }}</p>", published=True)
out["update"] = sp.templates.update("welcome", subject="Draft {{ name }}")
out["draft"] = sp.templates.get("welcome", draft=True)
out["published"] = sp.templates.get("welcome", draft=False)
out["preview"] = sp.templates.preview("welcome", {"name": "Zed"}, draft=True)
out["list"] = sp.recipient_lists.create(id="vips", name="VIPs", recipients=[
    {"address": {"email": "v1@x.test", "name": "Vee"}, "substitution_data": {"name": "Vee", "plan": "gold"}},
    {"address": "v2@y.test", "substitution_data": {"name": "Wu"}},
    {"address": "not an address"}])
out["by_list"] = sp.transmissions.send(recipient_list="vips", template="welcome", campaign="c1")
out["draft_send"] = sp.transmissions.send(recipients=["dee@x.test"], template="welcome",
    use_draft_template=True, substitution_data={"name": "Dee"})
out["templates"] = sp.templates.list()
out["lists"] = sp.recipient_lists.list()
out["got_list"] = sp.recipient_lists.get("vips", show_recipients=True)
print(json.dumps(out))
"#,
    );
    assert_eq!(result["create"]["id"], "welcome", "{result}");
    assert_eq!(result["draft"]["content"]["subject"], "Draft {{ name }}");
    assert_eq!(
        result["published"]["content"]["subject"],
        "Welcome {{ name }}"
    );
    assert_eq!(result["published"]["has_draft"], true);
    assert_eq!(result["preview"]["subject"], "Draft Zed");
    assert_eq!(result["preview"]["text"], "Hello Zed, plan basic");
    assert_eq!(result["preview"]["from"]["email"], "shop@s.test");
    assert_eq!(result["list"]["total_accepted_recipients"], 2);
    assert_eq!(result["list"]["total_rejected_recipients"], 1);
    assert_eq!(result["by_list"]["total_accepted_recipients"], 2);
    assert_eq!(result["draft_send"]["total_accepted_recipients"], 1);
    assert_eq!(result["templates"][0]["id"], "welcome");
    assert_eq!(result["lists"][0]["total_accepted_recipients"], 2);
    assert_eq!(
        result["got_list"]["recipients"].as_array().unwrap().len(),
        2
    );

    let messages = received(&sink, 3);
    let text = |rcpt: &str| {
        let m = dissect(messages[rcpt]["data"].as_str().unwrap());
        let subject = m["headers"]["Subject"].as_str().unwrap().to_string();
        let text = m["body"]["parts"][0]["text"]
            .as_str()
            .unwrap()
            .trim_end()
            .to_string();
        (subject, text)
    };
    assert_eq!(
        text("v1@x.test"),
        ("Welcome Vee".into(), "Hello Vee, plan gold".into())
    );
    assert_eq!(
        text("v2@y.test"),
        ("Welcome Wu".into(), "Hello Wu, plan basic".into())
    );
    assert_eq!(
        text("dee@x.test"),
        ("Draft Dee".into(), "Hello Dee, plan basic".into())
    );
    let events = wait_events(&daemon, "three injections", |e| {
        e.iter().filter(|e| e["type"] == "injection").count() == 3
    });
    assert_eq!(
        of(&events, "injection", "v1@x.test")[0]["template_id"],
        "welcome"
    );

    // Bad forms: a template that does not parse names its part and line; ids taken,
    // unknown and invalid; a list with no good address.
    let auth = format!("Authorization: {KEY}");
    let cases = [
        (
            "POST",
            "/api/v1/templates",
            json!({"name": "t", "content": {"from": "a@s.test", "subject": "s", "html": "<p>\n{{ if x }}"}}),
            422,
            "part html: line 2",
        ),
        (
            "POST",
            "/api/v1/templates",
            json!({"id": "welcome", "name": "t", "content": {"from": "a@s.test", "subject": "s", "text": "t"}}),
            409,
            "already exists",
        ),
        (
            "POST",
            "/api/v1/templates",
            json!({"id": "../x", "name": "t", "content": {"from": "a@s.test", "subject": "s", "text": "t"}}),
            422,
            "id",
        ),
        (
            "POST",
            "/api/v1/templates",
            json!({"name": "t"}),
            422,
            "content",
        ),
        (
            "PUT",
            "/api/v1/templates/welcome",
            json!({"content": {"text": "{{ each }}"}}),
            422,
            "part text",
        ),
        (
            "PUT",
            "/api/v1/templates/nope",
            json!({"name": "x"}),
            404,
            "does not exist",
        ),
        (
            "POST",
            "/api/v1/templates/nope/preview",
            json!({}),
            404,
            "does not exist",
        ),
        (
            "POST",
            "/api/v1/recipient-lists",
            json!({"id": "l", "recipients": [{"address": "bad"}]}),
            422,
            "no recipient",
        ),
        (
            "POST",
            "/api/v1/recipient-lists",
            json!({"id": "vips", "recipients": [{"address": "a@x.test"}]}),
            409,
            "already exists",
        ),
        (
            "POST",
            "/api/v1/recipient-lists",
            json!({"id": "l", "recipients": []}),
            422,
            "at least one",
        ),
        (
            "DELETE",
            "/api/v1/recipient-lists/nope",
            json!({}),
            404,
            "does not exist",
        ),
    ];
    for (method, path, body, status, words) in cases {
        let (got, text) = curl(
            &daemon,
            method,
            path,
            &[&auth],
            Some(("application/json", body.to_string().as_bytes())),
        );
        assert_eq!(got, status, "{method} {path} {body}: {text}");
        assert!(
            text.contains(words),
            "{method} {path}: {text} lacks {words:?}"
        );
    }
    // A failed update changed nothing.
    let (_, text) = curl(
        &daemon,
        "GET",
        "/api/v1/templates/welcome?draft=true",
        &[&auth],
        None,
    );
    assert_eq!(
        parse(&text)["results"]["content"]["subject"],
        "Draft {{ name }}"
    );

    // Both survive a restart; deleting them is durable too.
    daemon.stop();
    let dir = std::mem::replace(&mut daemon.dir, tempfile::tempdir().unwrap());
    let config = std::fs::read_to_string(dir.path().join("gannetd.toml")).unwrap();
    let daemon = Daemon::start_in(dir, &config);
    let (status, text) = curl(&daemon, "GET", "/api/v1/templates/welcome", &[&auth], None);
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        parse(&text)["results"]["content"]["subject"],
        "Draft {{ name }}"
    );
    let (status, text) = curl(
        &daemon,
        "GET",
        "/api/v1/recipient-lists/vips",
        &[&auth],
        None,
    );
    assert_eq!(
        (
            status,
            parse(&text)["results"]["total_accepted_recipients"].as_u64()
        ),
        (200, Some(2)),
        "{text}"
    );
    for path in ["/api/v1/templates/welcome", "/api/v1/recipient-lists/vips"] {
        assert_eq!(curl(&daemon, "DELETE", path, &[&auth], None).0, 200);
        assert_eq!(curl(&daemon, "GET", path, &[&auth], None).0, 404);
    }
}

#[test]
fn a_large_transmission_is_acknowledged_then_generated_and_survives_a_crash() {
    // Delivery stays suspended: every generated message is found in the spool. The
    // transmission is spooled as three jobs of 1,000 recipients.
    let mut daemon = Daemon::start("", &format!("{}job_recipients_max = 1000\n", key_config()));
    let n = 3000;
    let recipients: Vec<Value> = (0..n)
        .map(|i| json!({"address": format!("r{i}@x.test"), "substitution_data": {"i": i}}))
        .collect();
    let body = json!({
        "recipients": recipients,
        "content": {"from": "s@s.test", "subject": "n {{ i }}", "text": "number {{ i }}"}
    });
    let (status, reply) = post(&daemon, "/api/v1/transmissions", &body);
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["results"]["total_accepted_recipients"], n);
    // Killed at once: the job is durable, generation may be anywhere.
    daemon.kill();
    let dir = std::mem::replace(&mut daemon.dir, tempfile::tempdir().unwrap());
    let config = std::fs::read_to_string(dir.path().join("gannetd.toml")).unwrap();
    let mut daemon = Daemon::start_in(dir, &config);
    let resumed = daemon
        .log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("resuming transmission generation"));
    eprintln!("generation resumed after the crash: {resumed}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while daemon.metric("http_generation_jobs") > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "generation did not finish"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(daemon.metric("http_generation_pending_recipients"), 0);
    daemon.stop();
    // Every recipient has a message with its own substitution (chunks in flight at
    // the crash may have been generated twice); the jobs themselves are gone.
    let spooled = common::spooled(&daemon.data_dir());
    let mut seen = std::collections::BTreeSet::new();
    for s in &spooled {
        assert_eq!(
            s.recipients.len(),
            1,
            "a job record is still live: {:?}",
            s.meta
        );
        let i: usize = s.recipients[0]
            .trim_start_matches('r')
            .split('@')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let text = String::from_utf8_lossy(&s.body);
        assert!(text.contains(&format!("Subject: n {i}\r\n")), "{text}");
        seen.insert(i);
    }
    assert_eq!(
        seen.len(),
        n,
        "{} of {n} recipients have a message",
        seen.len()
    );
    // Duplicates are bounded by the chunks in flight at the crash (2 per shard of
    // 256 recipients, possibly done on the other shard before the home shard synced
    // its checkpoint) and one more whose checkpoint was not yet synced.
    assert!(
        spooled.len() <= n + 5 * 256,
        "{} messages for {n} recipients",
        spooled.len()
    );
}

#[test]
fn kumo_inject_api_with_jinja_builder_content_and_deferred_generation() {
    let sink = sink();
    let daemon = daemon(sink.port, "");
    let path = "/api/inject/v1";
    // Builder content, generated inside the request: one recipient's rendering
    // fails (division by zero), one address is bad; the others arrive.
    let body = json!({
        "envelope_sender": "bounce@s.test",
        "recipients": [
            {"email": "k1@x.test", "name": "Kay One", "substitutions": {"name": "Kay", "n": 2}},
            {"email": "k2@y.test", "substitutions": {"n": 0}},
            {"email": "bad address"},
            {"email": "k3@x.test"}
        ],
        "substitutions": {"name": "friend", "n": 1, "shop": "<Shop & Co>"},
        "content": {
            "from": {"email": "news@s.test", "name": "{{ shop }}"},
            "subject": "Hi {{ name }} ({{ 10 // n }})",
            "text_body": "Hello {{ name }} from {{ shop }}{% for i in range(2) %} {{ i }}{% endfor %}",
            "html_body": "<p>Hello {{ name }} from {{ shop }}</p>",
            "headers": {"X-Tag": "t-{{ name }}"},
            "attachments": [{"data": "plain text file", "content_type": "text/plain", "file_name": "a.txt"}]
        }
    });
    let (status, reply) = post(&daemon, path, &body);
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["success_count"], 2, "{reply}");
    assert_eq!(reply["fail_count"], 2, "{reply}");
    let failed: Vec<&str> = reply["failed_recipients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        failed.contains(&"bad address") && failed.contains(&"k2@y.test"),
        "{reply}"
    );
    assert!(reply["errors"].to_string().contains("k2@y.test"), "{reply}");

    let messages = received(&sink, 2);
    assert_eq!(messages["k1@x.test"]["mail_from"], "bounce@s.test");
    let k1 = dissect(messages["k1@x.test"]["data"].as_str().unwrap());
    assert_eq!(k1["headers"]["Subject"], "Hi Kay (5)");
    assert_eq!(k1["headers"]["To"], "Kay One <k1@x.test>");
    assert_eq!(k1["headers"]["X-Tag"], "t-Kay");
    assert_eq!(k1["headers"]["From"], "\"<Shop & Co>\" <news@s.test>");
    let alternative = &k1["body"]["parts"][0];
    assert_eq!(
        alternative["parts"][0]["text"].as_str().unwrap().trim_end(),
        "Hello Kay from <Shop & Co> 0 1"
    );
    assert_eq!(
        alternative["parts"][1]["text"].as_str().unwrap().trim_end(),
        "<p>Hello Kay from &lt;Shop &amp; Co&gt;</p>"
    );
    assert_eq!(k1["body"]["parts"][1]["filename"], "a.txt");
    assert_eq!(k1["body"]["parts"][1]["text"], "plain text file");
    let k3 = dissect(messages["k3@x.test"]["data"].as_str().unwrap());
    assert_eq!(k3["headers"]["Subject"], "Hi friend (10)");

    // An RFC 822 template, generated after the reply.
    let recipients: Vec<Value> = (0..300)
        .map(|i| json!({"email": format!("d{i}@y.test"), "substitutions": {"i": i}}))
        .collect();
    let body = json!({
        "envelope_sender": "bounce@s.test",
        "recipients": recipients,
        "content": "From: s@s.test\nSubject: number {{ i }}\n\nbody {{ i }}\n",
        "deferred_generation": true
    });
    let (status, reply) = post(&daemon, path, &body);
    assert_eq!(
        (status, reply["success_count"].as_u64()),
        (200, Some(300)),
        "{reply}"
    );
    let messages = received(&sink, 302);
    let d7 = messages["d7@y.test"]["data"].as_str().unwrap();
    assert!(
        d7.contains("Subject: number 7\r\n") && d7.contains("body 7\r\n"),
        "{d7}"
    );

    // Static: nothing is substituted. Bad forms are refused whole.
    let body = json!({
        "envelope_sender": "bounce@s.test",
        "recipients": [{"email": "st@x.test"}],
        "content": "From: s@s.test\nSubject: {{ kept }}\n\nx\n",
        "template_dialect": "Static"
    });
    assert_eq!(post(&daemon, path, &body).1["success_count"], 1);
    let messages = received(&sink, 303);
    assert!(
        messages["st@x.test"]["data"]
            .as_str()
            .unwrap()
            .contains("Subject: {{ kept }}")
    );
    let base = json!({"envelope_sender": "b@s.test", "recipients": [{"email": "a@x.test"}], "content": "Subject: x\n\ny\n"});
    let with = |key: &str, value: Value| {
        let mut body = base.clone();
        body[key] = value;
        body
    };
    let cases = [
        (
            with("template_dialect", json!("Handlebars")),
            422,
            "Handlebars",
        ),
        (
            with("content", json!("Subject: {% if %}\n\nx")),
            422,
            "line 1",
        ),
        (
            with(
                "content",
                json!({"subject": "s", "text_body": "t", "from": {"email": "f@s.test"}, "bogus": 1}),
            ),
            422,
            "bogus",
        ),
        (with("content", json!(5)), 422, "RFC 822"),
        (
            with("envelope_sender", json!("not an address")),
            422,
            "return_path",
        ),
        (with("recipients", json!([])), 422, "recipient"),
        (with("recipients", json!("a@x.test")), 422, "recipients"),
    ];
    for (body, status, words) in cases {
        let (got, text) = curl(
            &daemon,
            "POST",
            path,
            &[&format!("Authorization: Bearer {KEY}")],
            Some(("application/json", body.to_string().as_bytes())),
        );
        assert_eq!(got, status, "{body}: {text}");
        assert!(text.contains(words), "{body}: {text} lacks {words:?}");
    }
}

/// Requests in flight per shard are bounded: with `requests_in_flight_max = 1` on one
/// shard, a request whose body is still arriving holds the only slot and the next
/// gets 503 (monitoring excepted); once it completes, requests are served again.
#[test]
fn requests_past_the_in_flight_bound_get_503() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config_text(
        dir.path(),
        "",
        &format!("{}requests_in_flight_max = 1\n", key_config()),
    );
    config = config.replace("shards = 2", "shards = 1");
    let daemon = Daemon::start_in(dir, &config);
    let body = json!({
        "recipients": [{"address": "a@x.test"}],
        "content": {"from": "s@s.test", "subject": "s", "text": "t"}
    })
    .to_string();
    let mut slow = std::net::TcpStream::connect(daemon.http).unwrap();
    let head = format!(
        "POST /api/v1/transmissions HTTP/1.1\r\nhost: x\r\nauthorization: {KEY}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    slow.write_all(head.as_bytes()).unwrap();
    slow.write_all(&body.as_bytes()[..10]).unwrap();
    // The slow request is being read; another one is refused, while monitoring is
    // still answered.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (status, text) = post_raw(&daemon, &body);
        if status == 503 {
            assert!(text.contains("too many requests in flight"), "{text}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never 503: {status} {text}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(curl(&daemon, "GET", "/health", &[], None).0, 200);
    slow.write_all(&body.as_bytes()[10..]).unwrap();
    let mut reply = [0u8; 512];
    let n = slow.read(&mut reply).unwrap();
    let reply = String::from_utf8_lossy(&reply[..n]);
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    drop(slow);
    assert_eq!(post_raw(&daemon, &body).0, 200);
}

fn post_raw(daemon: &Daemon, body: &str) -> (u16, String) {
    curl(
        daemon,
        "POST",
        "/api/v1/transmissions",
        &[&format!("Authorization: {KEY}")],
        Some(("application/json", body.as_bytes())),
    )
}

#[test]
fn open_and_click_tracking_rewrite_html_and_record_events() {
    let sink = sink();
    let daemon = daemon(sink.port, "");
    let body = json!({
        "options": {"open_tracking": true, "click_tracking": true, "inline_css": true},
        "campaign_id": "tracked",
        "recipients": [{"address": "t1@x.test", "substitution_data": {"id": "a b&c"}}],
        "content": {
            "from": "s@s.test",
            "subject": "s",
            "text": "plain https://x.test/kept",
            "html": "<html><head><style>a { color: red }</style></head><body><a href=\"https://shop.test/p?id={{ id }}\">buy</a> <a href=\"mailto:h@s.test\">mail</a></body></html>"
        }
    });
    let (status, reply) = post(&daemon, "/api/v1/transmissions", &body);
    assert_eq!(status, 200, "{reply}");
    let messages = received(&sink, 1);
    let m = dissect(messages["t1@x.test"]["data"].as_str().unwrap());
    let html = m["body"]["parts"][1]["text"].as_str().unwrap().to_string();
    let text = m["body"]["parts"][0]["text"].as_str().unwrap();
    assert!(
        text.contains("https://x.test/kept"),
        "text parts are not rewritten: {text}"
    );
    assert!(html.contains("href=\"mailto:h@s.test\""), "{html}");
    // inline_css moved the style sheet's rule onto the links.
    assert!(html.contains("style=\"color: red;\""), "{html}");
    let base = format!("http://{}", daemon.http);
    let url_after = |marker: &str| -> String {
        let at = html
            .find(&format!("{base}{marker}"))
            .unwrap_or_else(|| panic!("{marker} in {html}"));
        html[at + base.len()..]
            .split('"')
            .next()
            .unwrap()
            .to_string()
    };
    let click = url_after("/c/");
    let open = url_after("/o/");

    // The click redirects to the link with its substitution; the pixel is a GIF.
    let out = Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-A",
            "TestAgent/1.0",
            "-w",
            "%{http_code} %{redirect_url}",
        ])
        .arg(format!("{base}{click}"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "302 https://shop.test/p?id=a%20b%26c"
    );
    let out = Command::new("curl")
        .args(["-sS", "-w", "\n%{http_code} %{content_type}"])
        .arg(format!("{base}{open}"))
        .output()
        .unwrap();
    assert!(out.stdout.starts_with(b"GIF89a"), "{:?}", out.stdout);
    assert!(String::from_utf8_lossy(&out.stdout).ends_with("200 image/gif"));
    // A forged or altered token is not found and records nothing.
    let mut forged = click.clone();
    forged.push('A');
    assert_eq!(curl(&daemon, "GET", &forged, &[], None).0, 404);
    assert_eq!(curl(&daemon, "GET", "/c/AAAA", &[], None).0, 404);

    let events = wait_events(&daemon, "open and click", |e| {
        !of(e, "click", "t1@x.test").is_empty() && !of(e, "open", "t1@x.test").is_empty()
    });
    let delivery = wait_events(&daemon, "delivery", |e| {
        !of(e, "delivery", "t1@x.test").is_empty()
    });
    let message_id = &of(&delivery, "delivery", "t1@x.test")[0]["message_id"];
    let clicked = of(&events, "click", "t1@x.test");
    assert_eq!(clicked.len(), 1, "{events:#?}");
    assert_eq!(
        clicked[0]["target_link_url"],
        "https://shop.test/p?id=a%20b%26c"
    );
    assert_eq!(clicked[0]["user_agent"], "TestAgent/1.0");
    assert_eq!(clicked[0]["campaign_id"], "tracked");
    assert_eq!(clicked[0]["transmission_id"], reply["results"]["id"]);
    assert_eq!(&clicked[0]["message_id"], message_id);
    assert_eq!(
        &of(&events, "open", "t1@x.test")[0]["message_id"],
        message_id
    );
    assert_eq!(daemon.metric("tracking_bad_tokens_total"), 2);
}

/// One-click unsubscribe (RFC 8058): a non-transactional message carries
/// List-Unsubscribe and List-Unsubscribe-Post; curl's POST of
/// List-Unsubscribe=One-Click records a list_unsubscribe event and suppresses the
/// recipient for non-transactional mail; a GET only shows the button; a
/// transactional message, or one whose content sets its own header, gets none.
#[test]
fn one_click_unsubscribe_records_an_event_and_suppresses() {
    let sink = sink();
    let daemon = daemon(sink.port, "");
    let send = |rcpt: &str, options: Value, headers: Value| {
        let body = json!({
            "options": options,
            "campaign_id": "news",
            "recipients": [{"address": rcpt}],
            "content": {"from": "s@s.test", "subject": "s", "text": "t", "headers": headers}
        });
        let (status, reply) = post(&daemon, "/api/v1/transmissions", &body);
        assert_eq!(status, 200, "{reply}");
    };
    send("u1@x.test", json!({}), json!({}));
    send("u2@x.test", json!({"transactional": true}), json!({}));
    send(
        "u3@x.test",
        json!({}),
        json!({"List-Unsubscribe": "<mailto:off@s.test>"}),
    );
    let messages = received(&sink, 3);
    let headers = |rcpt: &str| dissect(messages[rcpt]["data"].as_str().unwrap())["headers"].clone();
    let h1 = headers("u1@x.test");
    let base = format!("http://{}", daemon.http);
    let link = h1["List-Unsubscribe"]
        .as_str()
        .unwrap_or_else(|| panic!("{h1}"));
    assert_eq!(
        h1["List-Unsubscribe-Post"], "List-Unsubscribe=One-Click",
        "{h1}"
    );
    let path = link
        .strip_prefix(&format!("<{base}"))
        .and_then(|l| l.strip_suffix('>'))
        .unwrap_or_else(|| panic!("{link}"))
        .to_string();
    assert!(headers("u2@x.test")["List-Unsubscribe"].is_null());
    assert_eq!(
        headers("u3@x.test")["List-Unsubscribe"],
        "<mailto:off@s.test>"
    );

    // A GET (a link scanner) unsubscribes nobody.
    let (status, page) = curl(&daemon, "GET", &path, &[], None);
    assert_eq!(status, 200);
    assert!(page.contains("One-Click"), "{page}");
    // A POST without the key is refused; a forged token is not found.
    let post_form = |path: &str, body: &str| {
        let form = ("application/x-www-form-urlencoded", body.as_bytes());
        curl(&daemon, "POST", path, &[], Some(form)).0
    };
    assert_eq!(post_form(&path, "x=y"), 400);
    assert_eq!(
        post_form(&format!("{path}A"), "List-Unsubscribe=One-Click"),
        404
    );
    let out = Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-d",
            "List-Unsubscribe=One-Click",
        ])
        .arg(format!("{base}{path}"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    let events = wait_events(&daemon, "the unsubscribe", |e| {
        !of(e, "list_unsubscribe", "u1@x.test").is_empty()
    });
    let event = of(&events, "list_unsubscribe", "u1@x.test")[0];
    assert_eq!(event["campaign_id"], "news");
    assert_eq!(
        event["message_id"],
        of(&events, "injection", "u1@x.test")[0]["message_id"]
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| e["type"] == "list_unsubscribe")
            .count(),
        1
    );
    let (status, text) = curl(
        &daemon,
        "GET",
        "/api/v1/suppression-list/u1@x.test",
        &[&format!("Authorization: {KEY}")],
        None,
    );
    assert_eq!(status, 200, "{text}");
    let entries: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        entries["results"][0]["type"], "non_transactional",
        "{entries}"
    );
    assert_eq!(
        entries["results"][0]["source"], "List Unsubscribe",
        "{entries}"
    );
    assert_eq!(daemon.metric("list_unsubscribes_total"), 1);
}

/// A sandbox transmission is generated and evented (so templates can be tried on
/// real data) but nothing is spooled or sent.
#[test]
fn sandbox_transmissions_are_generated_but_never_queued() {
    let sink = sink();
    let daemon = daemon(sink.port, "");
    let body = json!({
        "options": {"sandbox": true},
        "recipients": [
            {"address": "s1@x.test", "substitution_data": {"n": 1}},
            {"address": "s2@x.test", "substitution_data": {"n": 2}}
        ],
        "content": {"from": "s@s.test", "subject": "try {{ n }}", "text": "t"}
    });
    let (status, reply) = post(&daemon, "/api/v1/transmissions", &body);
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["results"]["total_accepted_recipients"], 2);
    let events = wait_events(&daemon, "two injections", |e| {
        e.iter().filter(|e| e["type"] == "injection").count() == 2
    });
    let s2 = of(&events, "injection", "s2@x.test")[0];
    assert_eq!(s2["sandbox"], true);
    assert_eq!(s2["subject"], "try 2");
    // Nothing queued: a real message sent afterwards is the only one to arrive.
    let real = json!({
        "recipients": [{"address": "real@x.test"}],
        "content": {"from": "s@s.test", "subject": "real", "text": "t"}
    });
    assert_eq!(post(&daemon, "/api/v1/transmissions", &real).0, 200);
    let messages = received(&sink, 1);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(sink.messages().len(), 1);
    assert!(messages.contains_key("real@x.test"));
    assert_eq!(daemon.metric("http_messages_generated_total"), 1);
}

const KEY_BETA: &str = "gannet-test-key-beta-77d0e9a1c3f2";
const KEY_ADMIN: &str = "gannet-test-key-admin-0b91f4e6d2a8";

/// curl with a key (or none) against any address: (status, body as JSON or text).
fn call(
    addr: std::net::SocketAddr,
    key: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> (u16, String) {
    let mut command = Command::new("curl");
    command.args([
        "-sS",
        "-X",
        method,
        "-w",
        "\n%{http_code}",
        &format!("http://{addr}{path}"),
    ]);
    if let Some(key) = key {
        command.args(["-H", &format!("Authorization: {key}")]);
    }
    let input = body.map(|b| b.to_string()).unwrap_or_default();
    if body.is_some() {
        command.args([
            "-H",
            "content-type: application/json",
            "--data-binary",
            "@-",
        ]);
    }
    let out = run_with_input(&mut command, input.as_bytes());
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, status) = text.rsplit_once('\n').unwrap();
    (status.parse().unwrap(), body.to_string())
}

/// Stored templates and recipient lists belong to the tenant of the key that stored
/// them: another tenant's key gets 404 for every verb and cannot send with them, and
/// the ids live side by side. Keys have roles (an injection key cannot use the admin
/// API, nor an admin key inject), stored items are bounded per tenant, and a
/// listener serves only its services: tracking alone on one port, everything else
/// without tracking on the other.
#[test]
fn tenants_own_their_stored_items_keys_have_roles_and_listeners_serve_their_services() {
    let keys = format!(
        "api_keys = [{{ name = \"a\", key_sha256 = \"{}\", tenant = \"acme\" }}, \
                     {{ name = \"b\", key_sha256 = \"{}\", tenant = \"beta\" }}, \
                     {{ name = \"ops\", key_sha256 = \"{}\", role = \"admin\" }}]\n\
         services = [\"inject\", \"admin\", \"metrics\"]\n\
         listeners = [{{ address = \"127.0.0.1:0\", services = [\"tracking\"] }}]\n\
         templates_max = 2\nrecipient_lists_max = 1\n",
        gannet_core::auth::KeyDigest::of(KEY),
        gannet_core::auth::KeyDigest::of(KEY_BETA),
        gannet_core::auth::KeyDigest::of(KEY_ADMIN),
    );
    let mut daemon = Daemon::start("", &keys);
    let main = daemon.http;
    let listeners: Value =
        parse(&std::fs::read_to_string(daemon.data_dir().join("listeners.json")).unwrap());
    assert_eq!(
        listeners["http_listeners"][0]["services"],
        json!(["tracking"])
    );
    let public: std::net::SocketAddr = listeners["http_listeners"][0]["address"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();

    let template = |text: &str| {
        json!({"id": "welcome", "name": "Welcome", "published": true,
               "content": {"from": "s@s.test", "subject": "hi", "text": text}})
    };
    let (status, text) = call(
        main,
        Some(KEY),
        "POST",
        "/api/v1/templates",
        Some(&template("acme's")),
    );
    assert_eq!(status, 200, "{text}");
    let list = json!({"id": "list1", "recipients": [{"address": "r@x.test"}]});
    let (status, text) = call(
        main,
        Some(KEY),
        "POST",
        "/api/v1/recipient-lists",
        Some(&list),
    );
    assert_eq!(status, 200, "{text}");

    // Beta sees none of it, whatever the verb.
    for (method, path, body) in [
        ("GET", "/api/v1/templates/welcome", None),
        (
            "PUT",
            "/api/v1/templates/welcome",
            Some(json!({"content": {"text": "stolen"}})),
        ),
        ("POST", "/api/v1/templates/welcome/preview", Some(json!({}))),
        ("DELETE", "/api/v1/templates/welcome", None),
        (
            "GET",
            "/api/v1/recipient-lists/list1?show_recipients=true",
            None,
        ),
        (
            "PUT",
            "/api/v1/recipient-lists/list1",
            Some(json!({"name": "mine now"})),
        ),
        ("DELETE", "/api/v1/recipient-lists/list1", None),
    ] {
        let (status, text) = call(main, Some(KEY_BETA), method, path, body.as_ref());
        assert_eq!(status, 404, "{method} {path}: {text}");
    }
    for path in ["/api/v1/templates", "/api/v1/recipient-lists"] {
        let (status, text) = call(main, Some(KEY_BETA), "GET", path, None);
        assert_eq!(
            (status, parse(&text)["results"].clone()),
            (200, json!([])),
            "{path}"
        );
    }
    for content in [
        json!({"recipients": [{"address": "a@x.test"}], "content": {"template_id": "welcome"}}),
        json!({"recipients": {"list_id": "list1"}, "content": {"from": "s@s.test", "subject": "s", "text": "t"}}),
    ] {
        let (status, text) = call(
            main,
            Some(KEY_BETA),
            "POST",
            "/api/v1/transmissions",
            Some(&content),
        );
        assert_eq!(status, 422, "{text}");
        assert!(text.contains("does not exist"), "{text}");
    }
    // Beta's own "welcome" lives beside acme's.
    let (status, text) = call(
        main,
        Some(KEY_BETA),
        "POST",
        "/api/v1/templates",
        Some(&template("beta's")),
    );
    assert_eq!(status, 200, "{text}");
    // Bounds per tenant: acme may have 2 templates and 1 list.
    let second = json!({"id": "two", "name": "Two", "content": {"from": "s@s.test", "subject": "s", "text": "t"}});
    assert_eq!(
        call(main, Some(KEY), "POST", "/api/v1/templates", Some(&second)).0,
        200
    );
    let third = json!({"id": "three", "name": "Three", "content": {"from": "s@s.test", "subject": "s", "text": "t"}});
    let (status, text) = call(main, Some(KEY), "POST", "/api/v1/templates", Some(&third));
    assert_eq!(status, 422, "{text}");
    assert!(text.contains("http.templates_max"), "{text}");
    let list2 = json!({"id": "list2", "recipients": [{"address": "r@x.test"}]});
    let (status, text) = call(
        main,
        Some(KEY),
        "POST",
        "/api/v1/recipient-lists",
        Some(&list2),
    );
    assert_eq!(status, 422, "{text}");
    assert!(text.contains("http.recipient_lists_max"), "{text}");

    // Roles.
    let (status, text) = call(main, Some(KEY), "GET", "/api/admin/suspend/v1", None);
    assert_eq!(status, 403, "{text}");
    assert_eq!(
        call(main, Some(KEY_ADMIN), "GET", "/api/admin/suspend/v1", None).0,
        200
    );
    let one = json!({"recipients": [{"address": "a@x.test"}], "content": {"from": "s@s.test", "subject": "s", "text": "t"}});
    let (status, text) = call(
        main,
        Some(KEY_ADMIN),
        "POST",
        "/api/v1/transmissions",
        Some(&one),
    );
    assert_eq!(status, 403, "{text}");

    // Listeners serve their services only; /health everywhere.
    assert_eq!(call(main, None, "GET", "/metrics", None).0, 200);
    assert_eq!(call(main, None, "GET", "/o/anything", None).0, 404);
    assert!(
        call(main, None, "GET", "/o/anything", None)
            .1
            .contains("no endpoint")
    );
    assert_eq!(call(public, None, "GET", "/health", None).0, 200);
    let (status, text) = call(public, None, "GET", "/o/anything", None);
    assert_eq!(status, 404);
    assert!(text.contains("unknown tracking link"), "{text}");
    for (method, path) in [
        ("GET", "/metrics"),
        ("POST", "/api/v1/transmissions"),
        ("GET", "/api/v1/templates"),
        ("GET", "/api/admin/suspend/v1"),
    ] {
        let (status, text) = call(public, Some(KEY), method, path, Some(&one));
        assert_eq!(status, 404, "{method} {path}: {text}");
    }

    // Ownership survives a restart.
    daemon.stop();
    let dir = std::mem::replace(&mut daemon.dir, tempfile::tempdir().unwrap());
    let config = std::fs::read_to_string(dir.path().join("gannetd.toml")).unwrap();
    let daemon = Daemon::start_in(dir, &config);
    let text_of = |key| {
        let (_, body) = call(
            daemon.http,
            Some(key),
            "GET",
            "/api/v1/templates/welcome",
            None,
        );
        parse(&body)["results"]["content"]["text"].clone()
    };
    assert_eq!(text_of(KEY), "acme's");
    assert_eq!(text_of(KEY_BETA), "beta's");
    assert_eq!(
        call(
            daemon.http,
            Some(KEY_BETA),
            "GET",
            "/api/v1/recipient-lists/list1",
            None
        )
        .0,
        404
    );
}
