//! DANE (RFC 7672) against real servers on loopback. The DNS server is a stub
//! (tests/peers/dns_stub.py, dnspython) that stands in for a validating resolver:
//! it sets the AD bit on answers for the zones the test calls signed, which is the
//! only DNSSEC signal gannet uses (it trusts its resolver's AD bit, as Postfix
//! does). aiosmtpd presents per MX name (SNI) a self-signed certificate or one from
//! the test's CA. DANE-EE by public key and by certificate, DANE-TA with the name
//! check, records that do not match, an unsigned zone, unusable records, a failed
//! TLSA lookup, and DANE's precedence over MTA-STS.

mod common;

use std::fmt::Write as _;

use common::Daemon;
use common::peers::{dns_stub, free_port};
use common::pki::{TestCa, self_signed, smtp_with_sni};
use common::relay::{inject, wait_events};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn sha256(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

fn spki(der: &[u8]) -> Vec<u8> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    cert.tbs_certificate.subject_pki.raw.to_vec()
}

fn one<'a>(events: &'a [serde_json::Value], kind: &str, rcpt: &str) -> &'a serde_json::Value {
    (events.iter())
        .find(|e| e["type"] == kind && e["rcpt_to"] == rcpt)
        .unwrap_or_else(|| panic!("no {kind} for {rcpt}: {events:#?}"))
}

#[test]
fn dane_authenticates_by_tlsa_records_only_from_signed_zones() {
    let ca = TestCa::new("gannet DANE CA");
    let certs = tempfile::tempdir().unwrap();
    let dir = certs.path();
    let ee = self_signed(dir, "mx.ee.test");
    let eefull = self_signed(dir, "mx.eefull.test");
    for name in [
        "mx.eebad.test",
        "mx.insecure.test",
        "mx.unusable.test",
        "mx.servfail.test",
    ] {
        self_signed(dir, name);
    }
    let both = self_signed(dir, "mx.both.test");
    ca.issue(&["mx.ta.test"], true).serve_as(dir, "mx.ta.test");
    ca.issue(&["elsewhere.test"], true)
        .serve_as(dir, "mx.taname.test");
    let (_smtp_peer, port, out) = smtp_with_sni(dir);
    let domains = [
        ("ee", format!("3 1 1 {}", sha256(&spki(&ee.der)))),
        ("eefull", format!("3 0 1 {}", sha256(&eefull.der))),
        ("eebad", format!("3 1 1 {}", "00".repeat(32))),
        ("ta", format!("2 0 1 {}", sha256(&ca.der()))),
        ("taname", format!("2 0 1 {}", sha256(&ca.der()))),
        ("insecure", format!("3 1 1 {}", "00".repeat(32))),
        ("unusable", format!("1 1 1 {}", "00".repeat(32))),
        ("servfail", format!("3 1 1 {}", "00".repeat(32))),
        ("both", format!("3 1 1 {}", sha256(&spki(&both.der)))),
    ];
    let mut zone = String::from("$ORIGIN .\n$TTL 60\n");
    for (name, tlsa) in &domains {
        let _ = writeln!(zone, "{name}.test. IN MX 10 mx.{name}.test.");
        let _ = writeln!(zone, "mx.{name}.test. IN A 127.0.0.1");
        let _ = writeln!(zone, "_{port}._tcp.mx.{name}.test. IN TLSA {tlsa}");
    }
    // both.test also publishes MTA-STS (whose policy host answers nothing): DANE
    // goes first, so no fetch is even tried.
    zone.push_str(
        "_mta-sts.both.test. IN TXT \"v=STSv1; id=1\"\nmta-sts.both.test. IN A 127.0.0.1\n",
    );
    zone.push_str("b.test. IN MX 10 mx.ee.test.\n");
    let zone_file = out.path().join("zone.txt");
    std::fs::write(&zone_file, zone).unwrap();
    let secure: Vec<String> = (domains.iter())
        .filter(|(d, _)| *d != "insecure")
        .map(|(d, _)| format!("{d}.test"))
        .collect();
    let secure: Vec<&str> = secure.iter().map(String::as_str).collect();
    let tlsa_servfail = format!("_{port}._tcp.mx.servfail.test");
    let (_dns_peer, dns_port) = dns_stub(&zone_file, &secure, &[&tlsa_servfail]);

    let config = format!(
        "[delivery]\ndns_server = \"127.0.0.1:{dns_port}\"\nsmtp_port = {port}\nretry_interval_secs = 60\n\
         [delivery.dane]\nenabled = true\n\
         [delivery.mta_sts]\nhttps_port = {}\nfetch_timeout_secs = 2\n\
         [delivery.shaping]\nopportunistic_tls_reconnect_on_failed_handshake = true\n",
        free_port()
    );
    let daemon = Daemon::start("", &config);
    for (name, _) in &domains {
        inject(
            &daemon,
            &[&format!("r@{name}.test")],
            "Subject: dane\r\n\r\nhello\r\n.\r\n",
        );
    }
    let events = wait_events(&daemon, "six deliveries and three deferrals", |e| {
        let n = |kind: &str| e.iter().filter(|e| e["type"] == kind).count();
        n("delivery") >= 6 && n("transient_failure") >= 3
    });
    // DANE-EE by key and by certificate: self-signed certificates authenticated;
    // DANE-TA: the CA's chain, valid for the MX name. An unsigned zone's records
    // are ignored (opportunistic TLS); a signed zone's unusable records still
    // demand TLS.
    for name in ["ee", "eefull", "ta", "insecure", "unusable", "both"] {
        let delivered = one(&events, "delivery", &format!("r@{name}.test"));
        assert!(
            delivered["tls"]
                .as_str()
                .is_some_and(|t| t.starts_with("TLS")),
            "{delivered}"
        );
    }
    // No match (and no plaintext fallback, whatever the shaping says), a TA chain
    // for another name, a TLSA lookup that failed: deferred, never bounced.
    for (name, says) in [
        ("eebad", "handshake failed"),
        ("taname", "handshake failed"),
        (
            "servfail",
            "TLSA records of mx.servfail.test could not be read",
        ),
    ] {
        let deferred = one(&events, "transient_failure", &format!("r@{name}.test"));
        let why = deferred["response"].as_str().unwrap();
        assert!(
            why.starts_with("451 4.7.5") && why.contains(says),
            "{deferred}"
        );
    }
    assert_eq!(daemon.metric("delivery_tls_plaintext_fallbacks_total"), 0);
    assert_eq!(daemon.metric("delivery_mta_sts_fetch_failures_total"), 0);
    assert_eq!(daemon.metric("delivery_mta_sts_policies_fetched_total"), 0);
    let stored: Vec<serde_json::Value> = (1..)
        .map_while(|n| std::fs::read_to_string(out.path().join(format!("{n}.json"))).ok())
        .map(|t| serde_json::from_str(&t).unwrap())
        .collect();
    assert!(stored.iter().all(|m| m["tls"] == true));
}
