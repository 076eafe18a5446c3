//! Suppression lists: SparkPost's official Python client lists, gets, adds, updates
//! and deletes entries; curl sends the bad forms; transmissions and SMTP messages
//! skip suppressed recipients with policy_rejection events (transactional and
//! non-transactional kept apart, `skip_suppression` honoured); a hard bounce adds its
//! recipient; entries survive a restart; tenants are kept apart.

mod common;

use common::relay::{delivery_config, sink, wait_events};
use common::{Daemon, curl, sparkpost_client};
use serde_json::{Value, json};

const KEY: &str = "suppress-key-1b9e2c4d6f8a0357";
const ZETA: &str = "suppress-zeta-7e5c3a1f9d2b4608";

fn keys() -> String {
    let digest = gannet_core::auth::KeyDigest::of;
    format!(
        "api_keys = [{{ name = \"app\", key_sha256 = \"{}\" }}, {{ name = \"zeta\", key_sha256 = \"{}\", tenant = \"zeta\" }}]\ntls_listen = [\"127.0.0.1:0\"]\n",
        digest(KEY),
        digest(ZETA)
    )
}

fn call(daemon: &Daemon, key: &str, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let (status, text) = curl(
        daemon,
        method,
        path,
        &[&format!("Authorization: {key}")],
        body.map(|b| ("application/json", b.as_bytes())),
    );
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[test]
fn the_python_client_edits_the_list_and_bad_forms_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let text = common::config_text(dir.path(), "", &keys());
    let mut daemon = Daemon::start_in(dir, &text);
    let got = sparkpost_client(
        &daemon,
        KEY,
        r#"
sp.suppression_list.create([
    {"recipient": "One@X.test", "type": "non_transactional", "description": "asked by mail"},
    {"email": "two@x.test", "transactional": True, "non_transactional": True},
])
sp.suppression_list.update({"email": "three@y.test", "transactional": True, "description": "single"})
one = sp.suppression_list.get("one@x.test")
listed = sp.suppression_list.list(types="non_transactional")
everything = sp.suppression_list.list()
deleted = sp.suppression_list.delete("three@y.test")
try:
    sp.suppression_list.get("three@y.test")
    gone = False
except Exception as e:
    gone = "404" in str(e) or "not on the suppression list" in str(e)
print(json.dumps({"one": one, "listed": listed, "all": everything, "deleted": deleted, "gone": gone}))
"#,
    );
    let one = &got["one"];
    assert_eq!(one.as_array().unwrap().len(), 1, "{got}");
    assert_eq!(one[0]["recipient"], "one@x.test");
    assert_eq!(one[0]["type"], "non_transactional");
    assert_eq!(one[0]["source"], "Manually Added");
    assert_eq!(one[0]["description"], "asked by mail");
    assert_eq!(got["listed"].as_array().unwrap().len(), 2, "{got}");
    assert_eq!(got["all"].as_array().unwrap().len(), 4, "{got}");
    assert_eq!(
        (got["deleted"].as_bool(), got["gone"].as_bool()),
        (Some(true), Some(true))
    );

    // Search parameters.
    let (status, found) = call(
        &daemon,
        KEY,
        "GET",
        "/api/v1/suppression-list?domain=x.test&types=transactional",
        None,
    );
    assert_eq!(status, 200);
    assert_eq!(found["total_count"], 1, "{found}");
    assert_eq!(found["results"][0]["recipient"], "two@x.test");
    let (_, found) = call(
        &daemon,
        KEY,
        "GET",
        "/api/v1/suppression-list?per_page=1&page=2",
        None,
    );
    assert_eq!(
        (
            found["total_count"].as_u64(),
            found["results"].as_array().map(Vec::len)
        ),
        (Some(3), Some(1))
    );
    let (_, found) = call(
        &daemon,
        KEY,
        "GET",
        "/api/v1/suppression-list?description=ASKED",
        None,
    );
    assert_eq!(found["total_count"], 1);
    let (_, found) = call(
        &daemon,
        KEY,
        "GET",
        "/api/v1/suppression-list?from=2000-01-01T00:00&to=2001-01-01T00:00",
        None,
    );
    assert_eq!(found["total_count"], 0);
    // The other tenant sees nothing and deletes nothing.
    let (_, found) = call(&daemon, ZETA, "GET", "/api/v1/suppression-list", None);
    assert_eq!(found["total_count"], 0);
    let (status, _) = call(
        &daemon,
        ZETA,
        "DELETE",
        "/api/v1/suppression-list/one@x.test",
        None,
    );
    assert_eq!(status, 404);

    // Bad forms: precise errors, nothing stored.
    let bad: &[(&str, &str, Option<&str>, u16, &str)] = &[
        (
            "PUT",
            "/api/v1/suppression-list",
            Some(
                r#"{"recipients":[{"recipient":"ok@x.test","type":"transactional"},{"recipient":"not an address","type":"transactional"}]}"#,
            ),
            400,
            "recipients[1]",
        ),
        (
            "PUT",
            "/api/v1/suppression-list",
            Some(r#"{"recipients":[{"recipient":"a@x.test","type":"sometimes"}]}"#),
            400,
            "sometimes",
        ),
        (
            "PUT",
            "/api/v1/suppression-list",
            Some(r#"{"recipients":[{"recipient":"a@x.test"}]}"#),
            400,
            "give a type",
        ),
        (
            "PUT",
            "/api/v1/suppression-list",
            Some(r#"{"recipients":[]}"#),
            400,
            "at least one",
        ),
        (
            "PUT",
            "/api/v1/suppression-list",
            Some(r#"{"recipients":[{"recipient":"a@x.test","type":"transactional","colour":1}]}"#),
            422,
            "colour",
        ),
        (
            "PUT",
            "/api/v1/suppression-list",
            Some(r#"{"recipients":"#),
            400,
            "Problems parsing",
        ),
        (
            "PUT",
            "/api/v1/suppression-list",
            Some(r#"{}"#),
            422,
            "recipients",
        ),
        (
            "GET",
            "/api/v1/suppression-list?types=maybe",
            None,
            400,
            "maybe",
        ),
        (
            "GET",
            "/api/v1/suppression-list?from=yesterday",
            None,
            400,
            "from must be a time",
        ),
        (
            "GET",
            "/api/v1/suppression-list?per_page=0",
            None,
            400,
            "per_page",
        ),
        (
            "GET",
            "/api/v1/suppression-list/nobody@x.test",
            None,
            404,
            "not on the suppression list",
        ),
        (
            "DELETE",
            "/api/v1/suppression-list/nobody@x.test",
            None,
            404,
            "not on the suppression list",
        ),
        (
            "DELETE",
            "/api/v1/suppression-list/one@x.test",
            Some(r#"{"type":"never"}"#),
            400,
            "never",
        ),
        (
            "POST",
            "/api/v1/suppression-list",
            Some("{}"),
            405,
            "invalid HTTP method",
        ),
    ];
    for (method, path, body, status, needle) in bad {
        let (got, reply) = call(&daemon, KEY, method, path, *body);
        assert_eq!(got, *status, "{method} {path} {body:?}: {reply}");
        assert!(
            reply.to_string().contains(needle),
            "{method} {path}: {reply}"
        );
    }
    let (_, found) = call(&daemon, KEY, "GET", "/api/v1/suppression-list", None);
    assert_eq!(
        found["total_count"], 3,
        "no bad request stored anything: {found}"
    );
    // Deleting one kind leaves the other.
    let (status, _) = call(
        &daemon,
        KEY,
        "DELETE",
        "/api/v1/suppression-list/two@x.test",
        Some(r#"{"type":"transactional"}"#),
    );
    assert_eq!(status, 204);
    let (_, two) = call(
        &daemon,
        KEY,
        "GET",
        "/api/v1/suppression-list/two@x.test",
        None,
    );
    assert_eq!(two["results"].as_array().unwrap().len(), 1);
    assert_eq!(two["results"][0]["type"], "non_transactional");

    // Entries survive a restart.
    daemon.stop();
    let dir = std::mem::replace(&mut daemon.dir, tempfile::tempdir().unwrap());
    let daemon = Daemon::start_in(dir, &text);
    let (_, found) = call(&daemon, KEY, "GET", "/api/v1/suppression-list", None);
    assert_eq!(found["total_count"], 2, "{found}");
}

#[test]
fn injection_skips_suppressed_recipients_and_a_hard_bounce_suppresses() {
    let sink = sink();
    let routes = format!("\"x.test\" = [\"127.0.0.1:{}\"]", sink.port);
    let daemon = Daemon::start("", &format!("{}\n{}", keys(), delivery_config(&routes)));
    let (status, reply) = call(
        &daemon,
        KEY,
        "PUT",
        "/api/v1/suppression-list",
        Some(
            &json!({"recipients": [
                {"recipient": "news-off@x.test", "type": "non_transactional"},
                {"recipient": "all-off@x.test", "type": "non_transactional"},
                {"recipient": "all-off@x.test", "type": "transactional"},
            ]})
            .to_string(),
        ),
    );
    assert_eq!(status, 200, "{reply}");
    let transmit = |options: Value, id_note: &str| {
        let body = json!({
            "options": options,
            "campaign_id": id_note,
            "recipients": [{"address": "news-off@x.test"}, {"address": "all-off@x.test"}, {"address": "fine@x.test"}],
            "content": {"from": "app@sender.test", "subject": "s", "text": "t"},
        });
        let (status, reply) = call(
            &daemon,
            KEY,
            "POST",
            "/api/v1/transmissions",
            Some(&body.to_string()),
        );
        assert_eq!(status, 200, "{reply}");
        // SparkPost's way: accepted here, policy_rejection for the suppressed.
        assert_eq!(reply["results"]["total_accepted_recipients"], 3, "{reply}");
    };
    transmit(json!({}), "plain");
    transmit(json!({"transactional": true}), "receipt");
    transmit(json!({"skip_suppression": true}), "override");
    // 3 + 2 + 1 recipients get their message; the others a policy_rejection.
    let events = wait_events(&daemon, "6 deliveries and 3 suppressions", |events| {
        events.iter().filter(|e| e["type"] == "delivery").count() >= 6
            && events
                .iter()
                .filter(|e| e["type"] == "policy_rejection")
                .count()
                >= 3
    });
    let rejected: Vec<(String, String)> = events
        .iter()
        .filter(|e| e["type"] == "policy_rejection")
        .map(|e| {
            assert_eq!(e["phase"], "suppression");
            assert!(e["reply"].as_str().unwrap().starts_with("554 5.7.1"), "{e}");
            assert!(e["transmission_id"].is_string(), "{e}");
            (
                e["campaign_id"].as_str().unwrap().to_string(),
                e["rcpt_to"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let mut rejected = rejected;
    rejected.sort();
    assert_eq!(
        rejected,
        [
            ("plain".to_string(), "all-off@x.test".to_string()),
            ("plain".to_string(), "news-off@x.test".to_string()),
            ("receipt".to_string(), "all-off@x.test".to_string()),
        ]
    );

    // SMTP: the suppressed recipient is dropped, the others get the message; a
    // message with only suppressed recipients is refused.
    let mut client = daemon.connect();
    client.expect("220");
    client.send(b"EHLO c.test\r\nMAIL FROM:<s@c.test>\r\nRCPT TO:<news-off@x.test>\r\nRCPT TO:<smtp-fine@x.test>\r\nDATA\r\n");
    for code in ["250", "250", "250", "250", "354"] {
        client.expect(code);
    }
    client.send(b"Subject: smtp\r\n\r\nhello\r\n.\r\n");
    client.expect("250 2.0.0");
    client.send(b"MAIL FROM:<s@c.test>\r\nRCPT TO:<all-off@x.test>\r\nDATA\r\n");
    for code in ["250", "250", "354"] {
        client.expect(code);
    }
    client.send(b"Subject: smtp\r\n\r\nhello\r\n.\r\n");
    client.expect("550 5.7.1");
    client.send(b"QUIT\r\n");
    // The delivery, and both refusals' events (the second, of a later transaction,
    // may reach the event log after the delivery's).
    let events = wait_events(
        &daemon,
        "the SMTP message's delivery and refusals",
        |events| {
            let refusals = (events.iter())
                .filter(|e| e["type"] == "policy_rejection" && e["transmission_id"].is_null())
                .count();
            refusals >= 2
                && events
                    .iter()
                    .any(|e| e["type"] == "delivery" && e["rcpt_to"] == "smtp-fine@x.test")
        },
    );
    let smtp_rejections: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "policy_rejection" && e["transmission_id"].is_null())
        .collect();
    assert_eq!(smtp_rejections.len(), 2, "{smtp_rejections:#?}");
    assert!(smtp_rejections.iter().all(|e| e["phase"] == "suppression"));
    let reception = events.iter().find(|e| e["type"] == "reception").unwrap();
    assert_eq!(reception["rcpt_to"], json!(["smtp-fine@x.test"]));

    // A hard bounce (550 5.1.1, class 10) suppresses its recipient for both kinds.
    daemon.send_accepted("permfail@x.test", "Subject: b\r\n\r\nbody\r\n");
    wait_events(&daemon, "the bounce", |events| {
        events.iter().any(|e| e["type"] == "bounce")
    });
    let (status, entries) = call(
        &daemon,
        KEY,
        "GET",
        "/api/v1/suppression-list/permfail@x.test",
        None,
    );
    assert_eq!(status, 200, "{entries}");
    let entries = entries["results"].as_array().unwrap().clone();
    assert_eq!(entries.len(), 2, "{entries:#?}");
    assert!(
        entries.iter().all(|e| e["source"] == "Bounce Rule"),
        "{entries:#?}"
    );
    assert!(
        entries[0]["description"]
            .as_str()
            .unwrap()
            .contains("5.1.1")
    );
    let (_, text) = daemon.http_get("/metrics");
    assert!(
        text.contains("gannet_suppression_auto_added_total{shard="),
        "{text}"
    );
}
