//! DKIM end to end: messages injected over SMTP (Python's smtplib) and HTTP pass
//! through gannet to an aiosmtpd sink, and every signature they carry is verified by
//! dkimpy (an independent implementation) with the public keys served from its
//! `dnsfunc` — RSA (1024, 2048 and 3072 bits, made by openssl) and Ed25519 (made by
//! ring),
//! every canonicalization pair, over-signing, 8-bit bodies, long folded headers,
//! empty bodies and trailing blank lines.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::relay::{delivery_config, inject, sink};
use common::{Client, Daemon};
use serde_json::{Value, json};

const KEY: &str = "dkim-test-key-0c51";

struct Keys {
    dir: tempfile::TempDir,
}

impl Keys {
    fn new() -> Keys {
        let dir = tempfile::tempdir().unwrap();
        common::ed25519_key(dir.path());
        for bits in [1024, 2048, 3072] {
            let out = Command::new("openssl")
                .args(["genpkey", "-algorithm", "RSA", "-pkeyopt"])
                .arg(format!("rsa_keygen_bits:{bits}"))
                .arg("-out")
                .arg(dir.path().join(format!("rsa{bits}.pem")))
                .output()
                .expect("openssl is installed by tools/install-peers.sh");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Keys { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.pem"))
    }
}

/// (domain, selector, key file, header canon, body canon, extra TOML)
type KeySpec<'a> = (&'a str, &'a str, &'a str, &'a str, &'a str, &'a str);

const KEYS: &[KeySpec] = &[
    ("rr.test", "r", "rsa2048", "relaxed", "relaxed", ""),
    ("rr.test", "e", "ed25519", "relaxed", "relaxed", ""),
    ("ss.test", "r", "rsa2048", "simple", "simple", ""),
    ("ss.test", "e", "ed25519", "simple", "simple", ""),
    // A 1024-bit key (ring refuses it; signed by the `rsa` crate).
    ("ss.test", "old", "rsa1024", "relaxed", "simple", ""),
    (
        "rs.test",
        "e",
        "ed25519",
        "relaxed",
        "simple",
        "oversign = [\"from\", \"subject\", \"to\"], ",
    ),
    (
        "sr.test",
        "r",
        "rsa3072",
        "simple",
        "relaxed",
        "body_length = true, ",
    ),
    (
        "esp.test",
        "esp",
        "ed25519",
        "relaxed",
        "relaxed",
        "tenants = [\"acme\"], ",
    ),
];

fn dkim_config(keys: &Keys, mode: &str) -> String {
    let entries: Vec<String> = KEYS
        .iter()
        .map(|(domain, selector, file, h, b, extra)| {
            format!(
                "{{ domain = \"{domain}\", selector = \"{selector}\", key_file = \"{}\", header_canonicalization = \"{h}\", body_canonicalization = \"{b}\", {extra}}}",
                keys.path(file).display()
            )
            .replace(", }", " }")
        })
        .collect();
    format!(
        "[dkim]\nmode = \"{mode}\"\nkeys = [\n{}\n]\n",
        entries.join(",\n")
    )
}

/// The TXT records dkimpy looks up: `selector._domainkey.domain.` → record.
fn dns_records(keys: &Keys) -> Value {
    let mut records = serde_json::Map::new();
    for (domain, selector, file, ..) in KEYS {
        let key = gannet_engine::dkim::keys::load(&keys.path(file)).unwrap();
        records.insert(
            format!("{selector}._domainkey.{domain}."),
            key.dns_record().into(),
        );
    }
    Value::Object(records)
}

fn received(sink: &common::relay::Sink, n: usize) -> Vec<Value> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let messages = sink.messages();
        if messages.len() >= n {
            return messages;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {n} arrived",
            messages.len()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn data(message: &Value) -> Vec<u8> {
    message["data"]
        .as_str()
        .unwrap()
        .chars()
        .map(|c| c as u8)
        .collect()
}

#[test]
fn every_signature_combination_verifies_with_dkimpy() {
    let keys = Keys::new();
    let records = dns_records(&keys);
    let sink = sink();
    let digest = gannet_core::auth::KeyDigest::of(KEY);
    let routes = format!("\"x.test\" = [\"127.0.0.1:{}\"]", sink.port);
    let daemon = Daemon::start(
        "",
        &format!(
            "api_keys = [{{ name = \"t\", key_sha256 = \"{digest}\", tenant = \"acme\" }}]\n{}\n{}",
            delivery_config(&routes),
            dkim_config(&keys, "optional")
        ),
    );
    let long = "word ".repeat(120);
    // (From domain, recipient, the message as DATA carries it)
    let cases: Vec<(&str, &str, String)> = vec![
        (
            "rr.test",
            "eightbit@x.test",
            "From: A <a@rr.test>\r\nTo: eightbit@x.test\r\nSubject: Grüße\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nGrüße aus Köln — ça va?\r\n.\r\n".into(),
        ),
        (
            "ss.test",
            "folded@x.test",
            format!("From: a@ss.test\r\nTo: folded@x.test\r\nSubject: a subject\r\n folded over\r\n\tthree lines\r\nX-Long: {long}\r\n\r\nbody  with   spaces \r\n.\r\n"),
        ),
        (
            "rs.test",
            "empty@x.test",
            "From: a@rs.test\r\nTo: empty@x.test\r\nSubject: empty body\r\n\r\n.\r\n".into(),
        ),
        (
            "sr.test",
            "trailing@x.test",
            "From: a@sub.sr.test\r\nTo: trailing@x.test\r\nSubject: trailing\r\n\r\nbody\r\n\r\n\r\n\r\n.\r\n".into(),
        ),
        (
            "esp.test",
            "tenant@x.test",
            "From: a@nokey.test\r\nTo: tenant@x.test\r\nSubject: tenant\r\nX-Gannet-Tenant: acme\r\n\r\nsigned by the ESP\r\n.\r\n".into(),
        ),
    ];
    for (_, rcpt, message) in &cases {
        inject(&daemon, &[rcpt], message);
    }
    // One over HTTP, signed per generated message (tenant acme, From rr.test).
    let body = json!({
        "recipients": [{"address": "http@x.test"}],
        "content": {"from": "news@rr.test", "subject": "über", "text": "hällo", "html": "<p>hällo</p>"}
    });
    let (status, reply) = common::curl(
        &daemon,
        "POST",
        "/api/v1/transmissions",
        &[&format!("Authorization: {KEY}")],
        Some(("application/json", body.to_string().as_bytes())),
    );
    assert_eq!(status, 200, "{reply}");

    let messages = received(&sink, cases.len() + 1);
    let by_rcpt = |rcpt: &str| {
        messages
            .iter()
            .find(|m| m["rcpt_tos"][0] == rcpt)
            .unwrap_or_else(|| panic!("{rcpt} missing"))
    };
    // Every signature expected for each message is there and verifies.
    // (recipient, [(d=, s=, c=)])
    type Expected<'a> = (&'a str, Vec<(&'a str, &'a str, &'a str)>);
    let expect: Vec<Expected> = vec![
        (
            "eightbit@x.test",
            vec![
                ("rr.test", "r", "relaxed/relaxed"),
                ("rr.test", "e", "relaxed/relaxed"),
            ],
        ),
        (
            "folded@x.test",
            vec![
                ("ss.test", "r", "simple/simple"),
                ("ss.test", "e", "simple/simple"),
                ("ss.test", "old", "relaxed/simple"),
            ],
        ),
        ("empty@x.test", vec![("rs.test", "e", "relaxed/simple")]),
        ("trailing@x.test", vec![("sr.test", "r", "simple/relaxed")]),
        (
            "tenant@x.test",
            vec![("esp.test", "esp", "relaxed/relaxed")],
        ),
        (
            "http@x.test",
            vec![
                ("rr.test", "r", "relaxed/relaxed"),
                ("rr.test", "e", "relaxed/relaxed"),
                ("esp.test", "esp", "relaxed/relaxed"),
            ],
        ),
    ];
    for (rcpt, signatures) in expect {
        let message = data(by_rcpt(rcpt));
        let results = common::dkimpy_verify(&records, &message);
        assert_eq!(results.len(), signatures.len(), "{rcpt}: {results:?}");
        for (d, s, c) in signatures {
            let found = results
                .iter()
                .find(|r| r["d"] == d && r["s"] == s)
                .unwrap_or_else(|| panic!("{rcpt}: no {s}._domainkey.{d} in {results:?}"));
            assert_eq!(found["c"], c, "{rcpt}");
            assert_eq!(
                found["ok"],
                true,
                "{rcpt}: {found} did not verify:\n{}",
                String::from_utf8_lossy(&message)
            );
        }
    }
    // Over-signing: a Subject added in transit breaks the rs.test signature.
    let mut tampered = b"Subject: added later\r\n".to_vec();
    tampered.extend_from_slice(&data(by_rcpt("empty@x.test")));
    assert_eq!(common::dkimpy_verify(&records, &tampered)[0]["ok"], false);
    assert_eq!(daemon.metric("dkim_signatures_total"), 6);
    // l= where the key asks for it (sr.test): the relaxed body "body\r\n".
    let trailing = String::from_utf8_lossy(&data(by_rcpt("trailing@x.test"))).replace("\r\n", "");
    assert!(trailing.contains(" l=6;"), "{trailing}");
}

#[test]
fn required_signing_refuses_mail_no_key_signs() {
    let keys = Keys::new();
    let daemon = Daemon::start("", &dkim_config(&keys, "required"));
    let mut client = Client::connect(daemon.smtp);
    client.expect("220");
    client.send(b"EHLO c.test\r\nMAIL FROM:<a@nokey.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\n");
    client.expect("250");
    client.expect("250");
    client.expect("250");
    client.expect("354");
    client.send(b"From: a@nokey.test\r\nSubject: x\r\n\r\nx\r\n.\r\n");
    let reply = client.expect("550 5.7.1");
    assert!(reply.contains("nokey.test"), "{reply}");
    // A signed domain is accepted on the same connection.
    client.send(b"MAIL FROM:<a@rr.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\n");
    client.expect("250");
    client.expect("250");
    client.expect("354");
    client.send(b"From: a@rr.test\r\nSubject: x\r\n\r\nx\r\n.\r\n");
    client.expect("250 2.0.0");
    assert_eq!(daemon.metric("dkim_failures_total"), 1);
    // The refusal is an event too.
    let events = common::relay::wait_events(&daemon, "the policy rejection", |e| {
        e.iter().any(|e| e["type"] == "policy_rejection")
    });
    let rejection = events
        .iter()
        .find(|e| e["type"] == "policy_rejection")
        .unwrap();
    assert_eq!(rejection["phase"], "data");
    assert!(
        rejection["reply"]
            .as_str()
            .unwrap()
            .starts_with("550 5.7.1"),
        "{rejection}"
    );
}

#[test]
fn an_unusable_key_stops_the_start_and_fails_the_check_with_its_file_named() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.pem");
    std::fs::write(
        &bad,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let config = common::config_text(
        dir.path(),
        "",
        &format!(
            "[dkim]\nkeys = [{{ domain = \"a.test\", selector = \"s\", key_file = \"{}\" }}]\n",
            bad.display()
        ),
    );
    let path = dir.path().join("g.toml");
    std::fs::write(&path, config).unwrap();
    for flag in ["--config", "--check-config"] {
        let out = Command::new(env!("CARGO_BIN_EXE_gannetd"))
            .args([flag, path.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{flag}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("dkim.keys[0].key_file") && err.contains("bad.pem"),
            "{flag}: {err}"
        );
    }
}

/// Keys are reloaded on SIGHUP without a restart: a key added to the file signs the
/// next message; a file whose key cannot be loaded keeps the running keys.
#[test]
fn keys_are_reloaded_on_sighup() {
    let keys = Keys::new();
    let records = dns_records(&keys);
    let sink = sink();
    let routes = format!("\"x.test\" = [\"127.0.0.1:{}\"]", sink.port);
    let only_rr = format!(
        "[dkim]\nkeys = [{{ domain = \"rr.test\", selector = \"e\", key_file = \"{}\" }}]\n",
        keys.path("ed25519").display()
    );
    let daemon = Daemon::start("", &format!("{}\n{only_rr}", delivery_config(&routes)));
    let path = daemon.dir.path().join("gannetd.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let hup = |daemon: &Daemon, needle: &str, count: usize| {
        // SAFETY: signalling the daemon this test started.
        unsafe { libc::kill(daemon.child.id() as i32, libc::SIGHUP) };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while daemon
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
            < count
        {
            assert!(
                std::time::Instant::now() < deadline,
                "no {needle:?} in the log"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    let message = |from: &str, rcpt: &str| {
        format!("From: {from}\r\nTo: {rcpt}\r\nSubject: reload\r\n\r\nbody\r\n.\r\n")
    };
    inject(
        &daemon,
        &["before@x.test"],
        &message("a@ss.test", "before@x.test"),
    );
    // ss.test gets a key; the running daemon signs with it after SIGHUP.
    let with_ss = text.replace(
        "keys = [{",
        &format!(
            "keys = [{{ domain = \"ss.test\", selector = \"r\", key_file = \"{}\" }}, {{",
            keys.path("rsa2048").display()
        ),
    );
    std::fs::write(&path, &with_ss).unwrap();
    hup(&daemon, "SIGHUP: configuration reloaded", 1);
    inject(
        &daemon,
        &["after@x.test"],
        &message("a@ss.test", "after@x.test"),
    );
    // A key file that cannot be loaded: the reload keeps the running keys.
    let broken = with_ss.replace(
        &keys.path("ed25519").display().to_string(),
        "/nonexistent.pem",
    );
    std::fs::write(&path, broken).unwrap();
    hup(&daemon, "DKIM keys not reloaded", 1);
    inject(
        &daemon,
        &["kept@x.test"],
        &message("a@rr.test", "kept@x.test"),
    );

    let messages = received(&sink, 3);
    let of = |rcpt: &str| data(messages.iter().find(|m| m["rcpt_tos"][0] == rcpt).unwrap());
    assert!(
        common::dkimpy_verify(&records, &of("before@x.test")).is_empty(),
        "no key for ss.test yet"
    );
    let after = common::dkimpy_verify(&records, &of("after@x.test"));
    assert_eq!(
        (after.len(), &after[0]["d"], &after[0]["ok"]),
        (1, &json!("ss.test"), &json!(true))
    );
    let kept = common::dkimpy_verify(&records, &of("kept@x.test"));
    assert_eq!(
        (kept.len(), &kept[0]["d"], &kept[0]["ok"]),
        (1, &json!("rr.test"), &json!(true))
    );
}
