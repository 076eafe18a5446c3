//! Reports that come back: a remote server's DSN (an out-of-band bounce) and a
//! feedback loop's ARF report (a spam complaint), sent by Python's smtplib to an
//! `inbound.domains` address, quoting the X-Gannet-Id header of a message gannet
//! delivered — out_of_band and spam_complaint events naming that message (its
//! transmission, campaign), the recipient suppressed, the Metrics API counting
//! them; a report with a forged token names no message and suppresses nobody;
//! other mail to the domain is dropped and counted, never relayed.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::relay::{of, sink, wait_events};
use common::{Daemon, curl, run_with_input};
use serde_json::{Value, json};

const KEY: &str = "inbound-key-3a7c9e1b5d2f4a60";

/// Sends `data` with smtplib from `sender` to `rcpt`; returns the final reply.
fn send(daemon: &Daemon, sender: &str, rcpt: &str, data: &str) -> String {
    let script = format!(
        r#"
import smtplib, sys
s = smtplib.SMTP('127.0.0.1', {port})
s.ehlo('mx.remote.test')
code, text = s.mail({sender:?})
assert code == 250, (code, text)
code, text = s.rcpt({rcpt:?})
assert code == 250, (code, text)
code, text = s.data(sys.stdin.read())
print(code, text.decode())
s.quit()
"#,
        port = daemon.smtp.port(),
    );
    let out = run_with_input(
        Command::new(common::peers::python()).arg("-c").arg(script),
        data.as_bytes(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn dsn(original_header: &str, rcpt: &str) -> String {
    format!(
        "From: Mail Delivery System <MAILER-DAEMON@mx.x.test>\r\nTo: bounces@fb.test\r\n\
         Subject: Undelivered Mail Returned to Sender\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=delivery-status; boundary=\"R1\"\r\n\r\n\
         --R1\r\nContent-Type: text/plain\r\n\r\nI could not deliver your message.\r\n\
         --R1\r\nContent-Type: message/delivery-status\r\n\r\n\
         Reporting-MTA: dns; mx.x.test\r\nArrival-Date: Mon, 7 Dec 2026 04:00:00 +0000\r\n\r\n\
         Final-Recipient: rfc822; {rcpt}\r\nAction: failed\r\nStatus: 5.1.1\r\n\
         Diagnostic-Code: smtp; 550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown\r\n\r\n\
         --R1\r\nContent-Type: text/rfc822-headers\r\n\r\n{original_header}\r\n--R1--\r\n"
    )
}

fn arf(original: &str, rcpt: &str) -> String {
    format!(
        "From: FBL <fbl@isp.test>\r\nTo: fbl@fb.test\r\nSubject: complaint\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=feedback-report; boundary=\"F1\"\r\n\r\n\
         --F1\r\nContent-Type: text/plain\r\n\r\nThis is an email abuse report.\r\n\
         --F1\r\nContent-Type: message/feedback-report\r\n\r\n\
         Feedback-Type: abuse\r\nUser-Agent: ISP-FBL/2.0\r\nVersion: 1\r\n\
         Original-Rcpt-To: <{rcpt}>\r\nSource-IP: 192.0.2.25\r\n\r\n\
         --F1\r\nContent-Type: message/rfc822\r\n\r\n{original}\r\n--F1--\r\n"
    )
}

#[test]
fn bounces_and_complaints_that_come_back_name_their_message() {
    let sink = sink();
    let extra = format!(
        "api_keys = [{{ name = \"app\", key_sha256 = \"{}\" }}]\n\
         [delivery]\nretry_interval_secs = 1\nroutes = {{ \"x.test\" = [\"127.0.0.1:{}\"] }}\n\
         [inbound]\ndomains = [\"fb.test\"]\n[events]\nbatch_wait_ms = 100\n",
        gannet_core::auth::KeyDigest::of(KEY),
        sink.port
    );
    // Relay from loopback is off: fb.test takes mail from anyone.
    let daemon = Daemon::start("relay_from = []\n", &extra);
    let (status, text) = curl(
        &daemon,
        "POST",
        "/api/v1/transmissions",
        &[&format!("Authorization: {KEY}")],
        Some((
            "application/json",
            json!({"campaign_id": "spring",
                   "recipients": [{"address": "ann@x.test"}, {"address": "bob@x.test"}],
                   "content": {"from": "news@s.test", "subject": "hello", "text": "hi"}})
            .to_string()
            .as_bytes(),
        )),
    );
    assert_eq!(status, 200, "{text}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let messages = loop {
        let m = sink.messages();
        if m.len() >= 2 {
            break m;
        }
        assert!(Instant::now() < deadline, "deliveries");
        std::thread::sleep(Duration::from_millis(50));
    };
    let header_of = |rcpt: &str| -> String {
        let m = messages.iter().find(|m| m["rcpt_tos"][0] == rcpt).unwrap();
        let data = m["data"].as_str().unwrap();
        let header = data.split("\r\n\r\n").next().unwrap();
        assert!(header.contains("X-Gannet-Id: "), "{header}");
        header.to_string()
    };
    let ann = header_of("ann@x.test");

    // The remote server's DSN, to the return path's domain.
    let reply = send(&daemon, "", "bounces@fb.test", &dsn(&ann, "ann@x.test"));
    assert!(reply.starts_with("250"), "{reply}");
    // The ISP's complaint about the same message.
    let reply = send(
        &daemon,
        "fbl@isp.test",
        "fbl@fb.test",
        &arf(&format!("{ann}\r\n\r\nhi\r\n"), "ann@x.test"),
    );
    assert!(reply.starts_with("250"), "{reply}");
    // A forged report (its token from another key) about bob.
    let forged = header_of("bob@x.test").replace("X-Gannet-Id: ", "X-Gannet-Id: AAAA");
    let reply = send(&daemon, "", "bounces@fb.test", &dsn(&forged, "bob@x.test"));
    assert!(reply.starts_with("250"), "{reply}");
    // Not a report: dropped, counted.
    let reply = send(
        &daemon,
        "someone@else.test",
        "postmaster@fb.test",
        "Subject: hi\r\n\r\nhello\r\n",
    );
    assert!(reply.starts_with("250"), "{reply}");

    let events = wait_events(&daemon, "the reports' events", |e| {
        of(e, "out_of_band", "ann@x.test").len() == 1
            && of(e, "spam_complaint", "ann@x.test").len() == 1
            && of(e, "out_of_band", "bob@x.test").len() == 1
    });
    let injection = &of(&events, "injection", "ann@x.test")[0];
    let bounce = of(&events, "out_of_band", "ann@x.test")[0];
    assert_eq!(bounce["message_id"], injection["message_id"], "{bounce}");
    assert_eq!(
        bounce["transmission_id"], injection["transmission_id"],
        "{bounce}"
    );
    assert_eq!(bounce["campaign_id"], "spring", "{bounce}");
    assert_eq!(bounce["bounce_class"], 10, "{bounce}");
    assert_eq!(bounce["error_code"], "550", "{bounce}");
    let complaint = of(&events, "spam_complaint", "ann@x.test")[0];
    assert_eq!(
        complaint["message_id"], injection["message_id"],
        "{complaint}"
    );
    assert_eq!(complaint["fbtype"], "abuse", "{complaint}");
    assert_eq!(complaint["user_agent"], "ISP-FBL/2.0", "{complaint}");
    assert_eq!(complaint["report_by"], "192.0.2.25", "{complaint}");
    let forged = of(&events, "out_of_band", "bob@x.test")[0];
    assert!(forged["message_id"].is_null(), "{forged}");
    // Nothing sent to fb.test was relayed or queued.
    assert!(events.iter().all(|e| {
        e["rcpt_to"]
            .as_str()
            .is_none_or(|r| !r.ends_with("@fb.test"))
            || e["type"] != "delivery"
    }));
    assert_eq!(sink.messages().len(), 2);
    assert_eq!(daemon.metric("inbound_bounces_total"), 2);
    assert_eq!(daemon.metric("inbound_complaints_total"), 1);
    assert_eq!(daemon.metric("inbound_unrecognized_total"), 1);

    // Ann is suppressed (hard bounce: both kinds; the complaint too); bob is not.
    let suppressed = |rcpt: &str| -> Value {
        let (status, text) = curl(
            &daemon,
            "GET",
            &format!("/api/v1/suppression-list/{rcpt}"),
            &[&format!("Authorization: {KEY}")],
            None,
        );
        if status == 404 {
            return Value::Null;
        }
        serde_json::from_str(&text).unwrap()
    };
    let entries = suppressed("ann@x.test");
    let sources: Vec<&str> = entries["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["source"].as_str().unwrap())
        .collect();
    assert!(sources.contains(&"Bounce Rule"), "{entries}");
    assert!(
        sources.contains(&"Spam Complaint") || sources.contains(&"Bounce Rule"),
        "{entries}"
    );
    assert!(suppressed("bob@x.test").is_null());

    // The Metrics API counts them for the campaign.
    let from = &gannet_core::clock::rfc3339(gannet_core::clock::unix_ms() - 3_600_000)[..16];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, text) = curl(
            &daemon,
            "GET",
            &format!(
                "/api/v1/metrics/deliverability/campaign?from={from}&metrics=count_outofband_bounce,count_spam_complaint,count_hard_bounce"
            ),
            &[&format!("Authorization: {KEY}")],
            None,
        );
        assert_eq!(status, 200, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        let spring = v["results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["campaign_id"] == "spring")
            .cloned();
        // Each count comes from its own event, in any order: wait for all three.
        let counted = |s: &Value, key: &str| s[key].as_u64().unwrap_or(0) >= 1;
        if spring.as_ref().is_some_and(|s| {
            [
                "count_spam_complaint",
                "count_outofband_bounce",
                "count_hard_bounce",
            ]
            .iter()
            .all(|key| counted(s, key))
        }) {
            let s = spring.unwrap();
            assert_eq!(s["count_spam_complaint"], 1, "{s}");
            assert_eq!(s["count_outofband_bounce"], 1, "{s}");
            assert_eq!(s["count_hard_bounce"], 1, "{s}");
            break;
        }
        assert!(Instant::now() < deadline, "{v}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
