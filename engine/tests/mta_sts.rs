//! MTA-STS (RFC 8461) against real servers on loopback: dnsmasq serves the MX,
//! address and `_mta-sts` TXT records; Python's HTTPS server serves the policies with
//! a certificate from the test's own CA (trusted through `delivery.tls_ca_file`);
//! aiosmtpd receives, presenting per MX name (SNI) a certificate the CA issued or a
//! self-signed one. Each mode's accept and refuse paths, policy fetch failures, and
//! the cache: kept across `kill -9` and a restart on the same fixed ports, so
//! policies stay in force while their HTTPS host is down.

mod common;

use std::path::Path;

use common::Daemon;
use common::peers::{dnsmasq, free_port, https_server};
use common::pki::{TestCa, self_signed, smtp_with_sni};
use common::relay::{inject, wait_events};

/// The test's domains and what their policy host serves (None: no TXT record).
const DOMAINS: [(&str, Option<&str>); 8] = [
    ("enforce", Some("mode: enforce\nmx: mx.enforce.test")),
    // Enforced, but the MX host's certificate is self-signed.
    ("badmx", Some("mode: enforce\nmx: mx.badmx.test")),
    // Testing: reported, not enforced (the same self-signed certificate).
    ("testing", Some("mode: testing\nmx: mx.testing.test")),
    // Enforced, and the MX host is not one the policy names.
    ("nomatch", Some("mode: enforce\nmx: *.elsewhere.test")),
    // A TXT record whose policy cannot be had: 404, text/html, an untrusted
    // certificate on the policy host. No policy applies.
    ("notfound", Some("")),
    ("html", Some("mode: enforce\nmx: mx.html.test")),
    ("untrusted", Some("mode: enforce\nmx: mx.untrusted.test")),
    ("nopolicy", None),
];

fn one<'a>(events: &'a [serde_json::Value], kind: &str, rcpt: &str) -> &'a serde_json::Value {
    let found: Vec<_> = (events.iter())
        .filter(|e| e["type"] == kind && e["rcpt_to"] == rcpt)
        .collect();
    assert!(!found.is_empty(), "no {kind} for {rcpt}: {events:#?}");
    found[found.len() - 1]
}

fn count(events: &[serde_json::Value], kind: &str, rcpt: &str) -> usize {
    (events.iter())
        .filter(|e| e["type"] == kind && e["rcpt_to"] == rcpt)
        .count()
}

/// The policy files under `root`, by policy host.
fn write_policies(root: &Path) {
    for (name, policy) in DOMAINS {
        let Some(policy) = policy else { continue };
        if policy.is_empty() {
            continue;
        }
        let dir = root.join(format!("mta-sts.{name}.test/.well-known"));
        std::fs::create_dir_all(&dir).unwrap();
        let text = format!(
            "version: STSv1\r\n{}\r\nmax_age: 86400\r\n",
            policy.replace('\n', "\r\n")
        );
        std::fs::write(dir.join("mta-sts.txt"), text).unwrap();
        if name == "html" {
            std::fs::write(dir.join("mta-sts.txt.type"), "text/html").unwrap();
        }
    }
}

fn gets(root: &Path) -> Vec<String> {
    std::fs::read_to_string(root.join("gets.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn policies_are_enforced_tested_or_absent_and_outlive_their_https_host() {
    let ca = TestCa::new("gannet test CA");
    // SMTP: a CA certificate for mx.enforce.test; self-signed for the rest.
    let smtp_certs = tempfile::tempdir().unwrap();
    ca.issue(&["mx.enforce.test"], true)
        .serve_as(smtp_certs.path(), "mx.enforce.test");
    let (_smtp_peer, smtp_port, _out) = smtp_with_sni(smtp_certs.path());
    // HTTPS: one CA certificate for every policy host but mta-sts.untrusted.test.
    let web = tempfile::tempdir().unwrap();
    write_policies(web.path());
    let hosts: Vec<String> = (DOMAINS.iter())
        .filter(|(d, _)| *d != "untrusted")
        .map(|(d, _)| format!("mta-sts.{d}.test"))
        .collect();
    let host_refs: Vec<&str> = hosts.iter().map(String::as_str).collect();
    let policy_cert = ca.issue(&host_refs, true);
    let web_certs = tempfile::tempdir().unwrap();
    self_signed(web_certs.path(), "mta-sts.untrusted.test");
    let (https_peer, https_port) = https_server(
        web.path(),
        &policy_cert.cert,
        &policy_cert.key,
        Some(web_certs.path()),
    );
    let mut records = vec!["--local-ttl=60".to_string()];
    for (name, policy) in DOMAINS {
        records.push(format!("--mx-host={name}.test,mx.{name}.test,10"));
        records.push(format!("--host-record=mx.{name}.test,127.0.0.1"));
        if policy.is_some() {
            records.push(format!(
                "--txt-record=_mta-sts.{name}.test,v=STSv1; id=20261207"
            ));
            records.push(format!("--host-record=mta-sts.{name}.test,127.0.0.1"));
        }
    }
    let (_dns_peer, dns_port) = dnsmasq(&records);

    let dir = tempfile::tempdir().unwrap();
    let (smtp, http) = (free_port(), free_port());
    let config = format!(
        "[server]\nhostname = \"gannet.test\"\ndata_dir = \"{}\"\nshards = 2\n\
         [smtp]\nlisten = [\"127.0.0.1:{smtp}\"]\n[http]\nlisten = [\"127.0.0.1:{http}\"]\n\
         [delivery]\ndns_server = \"127.0.0.1:{dns_port}\"\nsmtp_port = {smtp_port}\n\
         retry_interval_secs = 60\ntls_ca_file = \"{}\"\n\
         [delivery.mta_sts]\nhttps_port = {https_port}\nfetch_timeout_secs = 10\n",
        dir.path().join("data").display(),
        ca.ca_file().display(),
    );
    let mut daemon = Daemon::start_in(dir, &config);
    for (name, _) in DOMAINS {
        inject(
            &daemon,
            &[&format!("r@{name}.test")],
            "Subject: sts\r\n\r\nhello\r\n.\r\n",
        );
    }
    let events = wait_events(&daemon, "six deliveries and two deferrals", |e| {
        let n = |kind: &str| e.iter().filter(|e| e["type"] == kind).count();
        n("delivery") >= 6 && n("transient_failure") >= 2
    });
    // Enforced: TLS with the CA's certificate for the MX name.
    let enforced = one(&events, "delivery", "r@enforce.test");
    assert!(
        enforced["tls"]
            .as_str()
            .is_some_and(|t| t.starts_with("TLS")),
        "{enforced}"
    );
    // Enforced against a certificate nobody vouches for, or an MX the policy does
    // not name: deferred (never bounced, never delivered without).
    let bad = one(&events, "transient_failure", "r@badmx.test");
    let why = bad["response"].as_str().unwrap();
    assert!(
        why.starts_with("451 4.7.5") && why.contains("certificate"),
        "{bad}"
    );
    let nomatch = one(&events, "transient_failure", "r@nomatch.test");
    let why = nomatch["response"].as_str().unwrap();
    assert!(
        why.starts_with("451 4.7.5")
            && why.contains("matches its MTA-STS policy")
            && why.contains("*.elsewhere.test"),
        "{nomatch}"
    );
    // Testing mode, and the domains whose policy could not be had: delivered as
    // without a policy (opportunistic TLS, any certificate).
    for name in ["testing", "notfound", "html", "untrusted", "nopolicy"] {
        let delivered = one(&events, "delivery", &format!("r@{name}.test"));
        assert!(delivered["tls"].is_string(), "{delivered}");
    }
    assert!(
        events
            .iter()
            .all(|e| e["type"] != "bounce" || e["rcpt_to"] == "s@b.test")
    );
    // One fetch per domain with a TXT record (untrusted's never got past TLS);
    // none for nopolicy.
    let fetched = gets(web.path());
    assert_eq!(fetched.len(), 6, "{fetched:?}");
    assert!(
        fetched
            .iter()
            .all(|g| g.ends_with(" /.well-known/mta-sts.txt"))
    );
    assert_eq!(daemon.metric("delivery_mta_sts_fetch_failures_total"), 3);
    assert_eq!(daemon.metric("delivery_mta_sts_policies_fetched_total"), 4);

    // The policies are kept on disk; after kill -9, with the policy host gone, the
    // restarted daemon (same fixed ports) still enforces them and fetches nothing.
    let data = daemon.data_dir();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let kept = loop {
        let text: String = (0..2)
            .filter_map(|s| std::fs::read_to_string(data.join(format!("mta-sts/{s}.json"))).ok())
            .collect();
        if ["enforce.test", "badmx.test", "testing.test", "nomatch.test"]
            .iter()
            .all(|d| text.contains(d))
            || std::time::Instant::now() > deadline
        {
            break text;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(
        kept.contains("\"enforce.test\"") && kept.contains("nomatch.test"),
        "{kept}"
    );
    drop(https_peer);
    daemon.kill();
    let dir = std::mem::replace(&mut daemon.dir, tempfile::tempdir().unwrap());
    let daemon = Daemon::start_in(dir, &config);
    assert_eq!(daemon.smtp.port(), smtp, "restarted on its fixed port");
    inject(
        &daemon,
        &["again@enforce.test"],
        "Subject: sts\r\n\r\nagain\r\n.\r\n",
    );
    inject(
        &daemon,
        &["again@badmx.test"],
        "Subject: sts\r\n\r\nagain\r\n.\r\n",
    );
    let events = wait_events(&daemon, "the cached policies applied", |e| {
        count(e, "delivery", "again@enforce.test") == 1
            && count(e, "transient_failure", "again@badmx.test") >= 1
    });
    let again = one(&events, "delivery", "again@enforce.test");
    assert!(again["tls"].is_string(), "{again}");
    assert_eq!(
        gets(web.path()).len(),
        6,
        "nothing fetched after the restart"
    );
    assert_eq!(daemon.metric("delivery_mta_sts_policies_fetched_total"), 0);
}
