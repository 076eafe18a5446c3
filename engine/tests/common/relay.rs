//! Helpers of the relay tests: an aiosmtpd sink, a dnsmasq with MX records, injection
//! with Python's smtplib, and waiting for events.

use std::process::Command;
use std::time::{Duration, Instant};

use super::Daemon;
use super::peers::{Peer, aiosmtpd_with, dnsmasq, python};

/// aiosmtpd on a free port, with the directory it stores messages in.
pub struct Sink {
    /// Declared before `out` so the server stops before its directory goes.
    _peer: Peer,
    pub port: u16,
    pub out: tempfile::TempDir,
}

pub fn sink() -> Sink {
    sink_closing_idle_sessions(None)
}

/// A sink that closes sessions idle for `secs` (with a 421), as servers do.
pub fn sink_closing_idle_sessions(secs: Option<f64>) -> Sink {
    let out = tempfile::tempdir().unwrap();
    let (peer, port) = aiosmtpd_with(out.path(), None, secs);
    Sink {
        _peer: peer,
        port,
        out,
    }
}

/// A sink whose every reply to an end of data comes `secs` late.
pub fn slow_sink(secs: f64) -> Sink {
    let out = tempfile::tempdir().unwrap();
    let args = ["--data-latency".into(), secs.to_string().into()];
    let (peer, port) = super::peers::aiosmtpd_args(out.path(), &args);
    Sink {
        _peer: peer,
        port,
        out,
    }
}

impl Sink {
    /// The sink's connection counts: `open`, `max_open` (the most at once), `total`,
    /// and SMTP sessions (EHLO to QUIT): `sessions`, `max_sessions`.
    pub fn connections(&self) -> serde_json::Value {
        std::fs::read_to_string(self.out.path().join("connections.state"))
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_else(|| serde_json::json!({"open": 0, "max_open": 0, "total": 0, "sessions": 0, "max_sessions": 0}))
    }

    pub fn messages(&self) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        for n in 1.. {
            match std::fs::read_to_string(self.out.path().join(format!("{n}.json"))) {
                Ok(text) => out.push(serde_json::from_str(&text).unwrap()),
                Err(_) => break,
            }
        }
        out
    }
}

pub fn delivery_config(routes: &str) -> String {
    format!(
        "[delivery]\nretry_interval_secs = 1\nmax_retry_interval_secs = 1\nroutes = {{ {routes} }}\n"
    )
}

/// A real DNS server (dnsmasq) on a loopback port: mx.test has the MX mx1.mx.test at
/// 127.0.0.1; fo.test a dead preferred MX and a live backup; every other name under
/// .test does not exist (NXDOMAIN).
pub struct Dns {
    _peer: Peer,
    pub port: u16,
}

pub fn dns() -> Dns {
    let records = [
        "--local-ttl=60",
        "--mx-host=mx.test,mx1.mx.test,10",
        "--host-record=mx1.mx.test,127.0.0.1",
        // fo.test: the preferred MX refuses connections, the backup answers.
        "--mx-host=fo.test,dead.fo.test,10",
        "--mx-host=fo.test,live.fo.test,20",
        "--host-record=dead.fo.test,127.0.0.2",
        "--host-record=live.fo.test,127.0.0.1",
        // h0.test … h7.test: eight sites (one MX name each), spread over the shards.
        "--mx-host=h0.test,mx0.hop.test,10",
        "--host-record=mx0.hop.test,127.0.0.1",
        "--mx-host=h1.test,mx1.hop.test,10",
        "--host-record=mx1.hop.test,127.0.0.1",
        "--mx-host=h2.test,mx2.hop.test,10",
        "--host-record=mx2.hop.test,127.0.0.1",
        "--mx-host=h3.test,mx3.hop.test,10",
        "--host-record=mx3.hop.test,127.0.0.1",
        "--mx-host=h4.test,mx4.hop.test,10",
        "--host-record=mx4.hop.test,127.0.0.1",
        "--mx-host=h5.test,mx5.hop.test,10",
        "--host-record=mx5.hop.test,127.0.0.1",
        "--mx-host=h6.test,mx6.hop.test,10",
        "--host-record=mx6.hop.test,127.0.0.1",
        "--mx-host=h7.test,mx7.hop.test,10",
        "--host-record=mx7.hop.test,127.0.0.1",
        // sh1.test and sh2.test share one MX: one site.
        "--mx-host=sh1.test,mx.shared.test,10",
        "--mx-host=sh2.test,mx.shared.test,10",
        "--host-record=mx.shared.test,127.0.0.1",
        // rated.test: an MX under .rated.test, for provider rules.
        "--mx-host=rated.test,mx1.rated.test,10",
        "--host-record=mx1.rated.test,127.0.0.1",
    ]
    .map(String::from);
    let (peer, port) = dnsmasq(&records);
    Dns { _peer: peer, port }
}

/// Waits until `done` holds for the daemon's events.
pub fn wait_events(
    daemon: &Daemon,
    what: &str,
    done: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let events = daemon.events();
        if done(&events) {
            return events;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {events:#?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn of<'a>(
    events: &'a [serde_json::Value],
    kind: &str,
    rcpt: &str,
) -> Vec<&'a serde_json::Value> {
    events
        .iter()
        .filter(|e| e["type"] == kind && e["rcpt_to"] == rcpt)
        .collect()
}

/// postfix's smtp-sink on a free port, dumping each transaction to a file in the
/// directory returned.
pub fn dumping_smtp_sink() -> (Peer, u16, tempfile::TempDir) {
    let dumps = tempfile::tempdir().unwrap();
    // smtp-sink writes its dumps as the user `nobody`.
    std::fs::set_permissions(
        dumps.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let template = format!("{}/m.", dumps.path().display());
    let (peer, port) = super::peers::smtp_sink(&["-d", &template]);
    (peer, port, dumps)
}

/// Python's smtplib sending one message (read on standard input) and printing the
/// final reply.
const SMTPLIB_SEND: &str = r#"
import smtplib, sys
port, sender, rcpts = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
body = sys.stdin.buffer.read()
with smtplib.SMTP("127.0.0.1", port) as s:
    s.ehlo("c.test")
    s.mail(sender)
    for r in rcpts:
        code, text = s.rcpt(r)
        assert code == 250, (r, code, text)
    code, text = s.data(body)
    print(code, text.decode())
"#;

/// Injects a message with Python's smtplib (an independent client) and returns its
/// queue id. `data` is the DATA payload as it travels (dot-stuffed, ending in
/// `.\r\n`); smtplib is given the message itself and does the stuffing.
pub fn inject(daemon: &Daemon, recipients: &[&str], data: &str) -> String {
    let payload = data
        .strip_suffix(".\r\n")
        .expect("a DATA payload ends with .CRLF");
    let message: String = payload
        .split_inclusive("\r\n")
        .map(|line| line.strip_prefix('.').unwrap_or(line))
        .collect();
    let out = super::run_with_input(
        Command::new(python())
            .arg("-c")
            .arg(SMTPLIB_SEND)
            .arg(daemon.smtp.port().to_string())
            .arg("s@b.test")
            .args(recipients),
        message.as_bytes(),
    );
    let reply = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && reply.starts_with("250 2.0.0 OK queued as "),
        "smtplib: {reply} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    reply.trim_end().rsplit(' ').next().unwrap().to_string()
}
