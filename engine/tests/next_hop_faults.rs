//! Next hops that fail at the connection level — a blocklisting's 554 banner, EHLO
//! refused, a connection closed or reset mid-DATA, a tarpit — defer their messages
//! and never bounce them; the site's next host is tried first; one failed connection
//! defers one message, and only failures in a row defer the whole ready queue.
//! The misbehaving servers are tests/peers/faulty_mx.py; the good one is aiosmtpd.

mod common;

use common::Daemon;
use common::peers::{Peer, faulty_mx};
use common::relay::{of, sink, wait_events};

/// A faulty next hop with the file its connections are counted in.
struct Faulty {
    _peer: Peer,
    port: u16,
    count: tempfile::NamedTempFile,
}

impl Faulty {
    fn start(mode: &str) -> Faulty {
        let count = tempfile::NamedTempFile::new().unwrap();
        let (peer, port) = faulty_mx(mode, count.path());
        Faulty {
            _peer: peer,
            port,
            count,
        }
    }

    fn connections(&self) -> usize {
        std::fs::read_to_string(self.count.path())
            .unwrap()
            .lines()
            .count()
    }
}

/// Sends one message per recipient in one SMTP session.
fn send_each(daemon: &Daemon, recipients: &[String]) {
    let mut c = daemon.connect();
    c.expect("220");
    c.send(b"EHLO c.test\r\n");
    c.expect("250");
    for rcpt in recipients {
        c.send(format!("MAIL FROM:<s@b.test>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n").as_bytes());
        c.expect("250");
        c.expect("250");
        c.expect("354");
        c.send(format!("Subject: to {rcpt}\r\n\r\nhello\r\n.\r\n").as_bytes());
        c.expect("250 2.0.0");
    }
    c.send(b"QUIT\r\n");
    c.expect("221");
}

#[test]
fn a_blocklisting_banner_defers_tries_the_next_host_and_fails_connections_one_part_at_a_time() {
    let good = sink();
    let blocked_first = Faulty::start("banner554");
    let blocked_only = Faulty::start("banner554");
    let config = format!(
        "[delivery]\nretry_interval_secs = 3600\nmax_retry_interval_secs = 3600\n\
         routes = {{ \"d.test\" = [\"127.0.0.1:{}\", \"127.0.0.1:{}\"], \"b.test\" = [\"127.0.0.1:{}\"] }}\n\
         [delivery.shaping]\nconnection_limit = 1\nconnection_failures_max = 3\n",
        blocked_first.port, good.port, blocked_only.port
    );
    let mut daemon = Daemon::start("", &config);
    let blocked: Vec<String> = (0..10).map(|i| format!("r{i}@b.test")).collect();
    let mut all = blocked.clone();
    all.push("ok@d.test".into());
    send_each(&daemon, &all);

    let events = wait_events(&daemon, "a delivery and ten deferrals", |e| {
        of(e, "delivery", "ok@d.test").len() == 1
            && blocked
                .iter()
                .all(|r| of(e, "transient_failure", r).len() == 1)
    });
    // The site's second host took the message its first host refused to talk about.
    assert_eq!(good.messages().len(), 1);
    assert!(blocked_first.connections() >= 1);
    assert!(events.iter().all(|e| e["type"] != "bounce"), "{events:#?}");
    for r in &blocked {
        let e = of(&events, "transient_failure", r)[0];
        assert_eq!(e["response_code"], 451, "{e}");
        let text = e["response"].as_str().unwrap();
        assert!(
            text.contains("refused the session at banner") && text.contains("554 5.7.1"),
            "{text}"
        );
    }
    // Three connections, each deferring one part, until the third failure in a row
    // deferred the rest: 1 + 1 + 8, never all ten on the first failure.
    assert_eq!(blocked_only.connections(), 3);
    // The backoff spaced them: the second a second after the first, the rest two
    // seconds later, together (less a few milliseconds: the backoff counts from the
    // failed connection, the event's time from its settling just after).
    let mut times: Vec<u64> = blocked
        .iter()
        .map(|r| {
            of(&events, "transient_failure", r)[0]["timestamp_ms"]
                .as_u64()
                .unwrap()
        })
        .collect();
    times.sort();
    assert!(times[1] - times[0] >= 950, "{times:?}");
    assert!(times[2] - times[1] >= 1950, "{times:?}");
    assert!(times[9] - times[2] < 1000, "{times:?}");
    daemon.stop();
    // Deferred mail stays queued, attempts counted.
    let spooled = common::spooled(&daemon.data_dir());
    assert_eq!(spooled.len(), 10);
}

#[test]
fn refused_greetings_dropped_and_reset_connections_and_tarpits_defer() {
    let ehlo = Faulty::start("ehlo554");
    let close = Faulty::start("close");
    let reset = Faulty::start("reset_data");
    let tarpit = Faulty::start("tarpit");
    let config = format!(
        "[delivery]\nretry_interval_secs = 3600\nmax_retry_interval_secs = 3600\n\
         routes = {{ \"ehlo.test\" = [\"127.0.0.1:{}\"], \"close.test\" = [\"127.0.0.1:{}\"], \
         \"reset.test\" = [\"127.0.0.1:{}\"], \"tarpit.test\" = [\"127.0.0.1:{}\"] }}\n\
         [delivery.shaping]\nbanner_timeout_secs = 1\nconnection_failures_max = 1\n",
        ehlo.port, close.port, reset.port, tarpit.port
    );
    let mut daemon = Daemon::start("", &config);
    let rcpts: Vec<String> = ["ehlo", "close", "reset", "tarpit"]
        .iter()
        .map(|d| format!("a@{d}.test"))
        .collect();
    send_each(&daemon, &rcpts);
    let events = wait_events(&daemon, "four deferrals", |e| {
        rcpts
            .iter()
            .all(|r| of(e, "transient_failure", r).len() == 1)
    });
    assert!(events.iter().all(|e| e["type"] != "bounce"), "{events:#?}");
    let response = |r: &str| {
        of(&events, "transient_failure", r)[0]["response"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(response("a@ehlo.test").contains("554 5.7.1"));
    assert!(response("a@tarpit.test").contains("timeout"));
    for f in [&ehlo, &close, &reset, &tarpit] {
        assert_eq!(f.connections(), 1);
    }
    daemon.stop();
    assert_eq!(common::spooled(&daemon.data_dir()).len(), 4);
}

/// A DNS server that is down (nothing listens: ICMP port unreachable) or silent (a
/// socket that never answers: every try times out) defers the mail; nothing bounces.
#[test]
fn a_dns_server_down_or_silent_defers_and_bounces_nothing() {
    // Bound and kept, never read: queries to it are swallowed.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let down = {
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    for (what, server) in [("down", down), ("silent", silent.local_addr().unwrap())] {
        let config = format!(
            "[delivery]\nretry_interval_secs = 3600\nmax_retry_interval_secs = 3600\n\
             dns_server = \"{server}\"\ndns_timeout_secs = 1\n"
        );
        let mut daemon = Daemon::start("", &config);
        send_each(
            &daemon,
            &["a@mx.test".to_string(), "b@other.test".to_string()],
        );
        let events = wait_events(&daemon, "two deferrals", |e| {
            of(e, "transient_failure", "a@mx.test").len() == 1
                && of(e, "transient_failure", "b@other.test").len() == 1
        });
        assert!(
            events.iter().all(|e| e["type"] != "bounce"),
            "{what}: {events:#?}"
        );
        let text = of(&events, "transient_failure", "a@mx.test")[0]["response"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(text.contains("4.4.3"), "{what}: {text}");
        daemon.stop();
        assert_eq!(common::spooled(&daemon.data_dir()).len(), 2, "{what}");
    }
    drop(silent);
}
