//! Delivery's TLS against real servers on loopback: routes to smarthosts (aiosmtpd
//! with STARTTLS and AUTH) with their own TLS mode, certificate name and
//! credentials; a certificate authority of the test's own trusted through
//! `delivery.tls_ca_file`; and what happens when an opportunistic handshake fails,
//! per provider rule.

mod common;

use std::ffi::OsString;

use common::Daemon;
use common::peers::{Peer, aiosmtpd_args};
use common::pki::{TestCa, self_signed};
use common::relay::{dns, inject, wait_events};

/// aiosmtpd with `args`, storing what it accepts in a directory of its own.
struct Server {
    _peer: Peer,
    port: u16,
    out: tempfile::TempDir,
}

fn server(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Server {
    let out = tempfile::tempdir().unwrap();
    let args: Vec<OsString> = args.iter().map(|a| a.as_ref().to_os_string()).collect();
    let (peer, port) = aiosmtpd_args(out.path(), &args);
    Server {
        _peer: peer,
        port,
        out,
    }
}

impl Server {
    fn messages(&self) -> Vec<serde_json::Value> {
        (1..)
            .map_while(|n| std::fs::read_to_string(self.out.path().join(format!("{n}.json"))).ok())
            .map(|text| serde_json::from_str(&text).unwrap())
            .collect()
    }
}

fn one<'a>(events: &'a [serde_json::Value], kind: &str, rcpt: &str) -> &'a serde_json::Value {
    let found: Vec<_> = (events.iter())
        .filter(|e| e["type"] == kind && e["rcpt_to"] == rcpt)
        .collect();
    assert!(!found.is_empty(), "no {kind} for {rcpt}: {events:#?}");
    found[0]
}

#[test]
fn routes_to_smarthosts_authenticate_over_verified_tls_and_defer_when_refused() {
    let ca = TestCa::new("gannet test CA");
    let relay = ca.issue(&["relay.test"], true);
    let plain = server(&[
        &"--tls",
        &relay.cert,
        &relay.key,
        &"--auth",
        &"user",
        &"s3cret",
    ]);
    // AUTH required and no STARTTLS offered.
    let cleartext = server(&[&"--auth", &"user", &"s3cret"]);
    let login = server(&[
        &"--tls",
        &relay.cert,
        &relay.key,
        &"--auth",
        &"user",
        &"s3cret",
        &"--auth-mechs",
        &"LOGIN",
    ]);
    let route = |port: u16, name: &str, password: &str| {
        format!(
            "{{ hosts = [\"127.0.0.1:{port}\"], tls = \"required\", server_name = \"{name}\", \
             auth = {{ username = \"user\", password = \"{password}\" }} }}"
        )
    };
    let config = format!(
        "[delivery]\nretry_interval_secs = 60\ntls_ca_file = \"{}\"\nroutes = {{ \
         \"plain.test\" = {}, \"login.test\" = {}, \"wrong.test\" = {}, \"name.test\" = {}, \
         \"notls.test\" = {{ hosts = [\"127.0.0.1:{}\"], auth = {{ username = \"user\", password = \"s3cret\" }} }} }}\n",
        ca.ca_file().display(),
        route(plain.port, "relay.test", "s3cret"),
        route(login.port, "relay.test", "s3cret"),
        route(plain.port, "relay.test", "wrong"),
        // A certificate that does not name the route's server_name.
        route(plain.port, "other.test", "s3cret"),
        cleartext.port,
    );
    let daemon = Daemon::start("", &config);
    for rcpt in [
        "a@plain.test",
        "b@login.test",
        "c@wrong.test",
        "d@name.test",
        "e@notls.test",
    ] {
        inject(&daemon, &[rcpt], "Subject: via relay\r\n\r\nhello\r\n.\r\n");
    }
    let events = wait_events(&daemon, "two deliveries and three deferrals", |e| {
        let n = |kind: &str| e.iter().filter(|e| e["type"] == kind).count();
        n("delivery") >= 2 && n("transient_failure") >= 3
    });
    // PLAIN (offered first) and LOGIN (the only one offered) both authenticate, over
    // TLS with a certificate the test's CA issued for the route's server_name.
    for (server, rcpt) in [(&plain, "a@plain.test"), (&login, "b@login.test")] {
        let delivery = one(&events, "delivery", rcpt);
        assert!(
            delivery["tls"]
                .as_str()
                .is_some_and(|t| t.starts_with("TLS")),
            "{delivery}"
        );
        let got = server.messages();
        let stored = got.iter().find(|m| m["rcpt_tos"][0] == rcpt).unwrap();
        assert_eq!(stored["auth_user"], "user");
        assert_eq!(stored["tls"], true);
    }
    // Refused credentials and a certificate for another name defer; nothing bounces.
    let wrong = one(&events, "transient_failure", "c@wrong.test");
    let reason = wrong["response"].as_str().unwrap();
    assert!(
        reason.starts_with("451 4.4.2") && reason.contains("AUTH") && reason.contains("535"),
        "{wrong}"
    );
    let name = one(&events, "transient_failure", "d@name.test");
    let reason = name["response"].as_str().unwrap();
    assert!(
        reason.starts_with("451 4.7.5") && reason.contains("handshake"),
        "{name}"
    );
    // Credentials never go out in plaintext: a server without STARTTLS is not sent
    // them (the route's mode is the shaping's opportunistic), and the mail waits.
    let notls = one(&events, "transient_failure", "e@notls.test");
    let reason = notls["response"].as_str().unwrap();
    assert!(
        reason.starts_with("451 4.7.5") && reason.contains("only over TLS"),
        "{notls}"
    );
    assert!(cleartext.messages().is_empty());
    assert!(events.iter().all(|e| e["type"] != "bounce"), "{events:#?}");
    assert_eq!(plain.messages().len(), 1);
}

#[test]
fn route_credentials_need_tls_and_a_bad_ca_file_stops_the_start() {
    for (route, says) in [
        (
            "{ hosts = [\"127.0.0.1:25\"], tls = \"disabled\", auth = { username = \"u\", password = \"p\" } }",
            &["delivery.routes.x.test.auth", "only over TLS"][..],
        ),
        (
            "{ hosts = [] }",
            &["delivery.routes.x.test", "at least one host"],
        ),
        (
            "{ hosts = [\"127.0.0.1:25\"], tsl = \"required\" }",
            &["tsl", "gannetd.toml:"],
        ),
        (
            "{ hosts = [\"127.0.0.1:25\"], server_name = \"a b\" }",
            &["server_name", "not a DNS name"],
        ),
    ] {
        let err = common::config_refused(&format!(
            "[delivery]\nroutes = {{ \"x.test\" = {route} }}\n"
        ));
        assert!(says.iter().all(|s| err.contains(s)), "{route}: {err}");
    }
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("ca.pem");
    std::fs::write(&bad, "not a certificate\n").unwrap();
    let config = format!("[delivery]\ntls_ca_file = \"{}\"\n", bad.display());
    let err = common::config_refused(&config);
    assert!(
        err.contains("delivery.tls_ca_file") && err.contains("no certificate"),
        "{err}"
    );
}

#[test]
fn a_failed_opportunistic_handshake_falls_back_to_plaintext_only_where_a_rule_says() {
    let dir = tempfile::tempdir().unwrap();
    let cert = self_signed(dir.path(), "sink.test");
    // STARTTLS offered, and every handshake fails (TLS 1.0/1.1 only).
    let broken = server(&[&"--broken-tls", &cert.cert, &cert.key]);
    let dns = dns();
    // rated.test's MX is under .rated.test (the provider that falls back); mx.test's
    // is not; h0.test's provider turns TLS off altogether.
    let config = format!(
        "[delivery]\ndns_server = \"127.0.0.1:{}\"\nsmtp_port = {}\nretry_interval_secs = 60\n\
         [delivery.providers.rated]\nmx_suffix = [\".rated.test\"]\n\
         shaping = {{ opportunistic_tls_reconnect_on_failed_handshake = true }}\n\
         [delivery.providers.plain]\nmx_suffix = [\".hop.test\"]\nshaping = {{ tls = \"disabled\" }}\n",
        dns.port, broken.port
    );
    let daemon = Daemon::start("", &config);
    for rcpt in ["a@rated.test", "b@mx.test", "c@h0.test"] {
        inject(&daemon, &[rcpt], "Subject: fallback\r\n\r\nhello\r\n.\r\n");
    }
    let events = wait_events(&daemon, "two deliveries and a deferral", |e| {
        let n = |kind: &str| e.iter().filter(|e| e["type"] == kind).count();
        n("delivery") >= 2 && n("transient_failure") >= 1
    });
    let a = one(&events, "delivery", "a@rated.test");
    assert!(a["tls"].is_null(), "delivered in plaintext: {a}");
    let c = one(&events, "delivery", "c@h0.test");
    assert!(c["tls"].is_null(), "{c}");
    let b = one(&events, "transient_failure", "b@mx.test");
    let reason = b["response"].as_str().unwrap();
    assert!(
        reason.starts_with("451 4.7.5") && reason.contains("handshake failed"),
        "{b}"
    );
    // One fallback (rated.test); TLS disabled by the rule never tried a handshake.
    assert_eq!(daemon.metric("delivery_tls_plaintext_fallbacks_total"), 1);
    let stored = broken.messages();
    assert_eq!(stored.len(), 2);
    assert!(stored.iter().all(|m| m["tls"] == false));
}
