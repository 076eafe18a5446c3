//! The load generator and the smart sink as processes: their counts agree with each
//! other and with postfix's smtp-sink, the sink's fault injection produces the
//! configured percentages, special local parts always fail, latency is applied, and
//! bad arguments and configuration files are refused with the key named.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running gannet-sink; stopped (SIGTERM) when dropped.
struct Sink {
    child: Child,
    smtp: SocketAddr,
    http: SocketAddr,
}

impl Sink {
    fn start(args: &[&str]) -> Sink {
        let mut child = Command::new(env!("CARGO_BIN_EXE_gannet-sink"))
            .args(["--listen", "127.0.0.1:0", "--shards", "2"])
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        Sink {
            smtp: v["smtp"].as_str().unwrap().parse().unwrap(),
            http: v["http"].as_str().unwrap().parse().unwrap(),
            child,
        }
    }

    /// `GET path` from the sink's HTTP endpoint (with curl): the body.
    fn get(&self, path: &str) -> Vec<u8> {
        Command::new("curl")
            .args(["-sS", &format!("http://{}{path}", self.http)])
            .output()
            .unwrap()
            .stdout
    }

    /// The counters, over HTTP.
    fn counts(&self) -> serde_json::Value {
        serde_json::from_slice(&self.get("/")).unwrap()
    }

    /// `GET /total`: the cheap count of messages received, as the sink writes it.
    fn total_text(&self) -> String {
        String::from_utf8_lossy(&self.get("/total")).into_owned()
    }

    /// Messages received so far (from `GET /total`).
    fn total(&self) -> u64 {
        serde_json::from_str::<serde_json::Value>(&self.total_text()).unwrap()["messages"]
            .as_u64()
            .unwrap()
    }

    /// Stops the sink; the counters it prints at exit.
    fn stop(mut self) -> serde_json::Value {
        // SAFETY: signalling the child this test started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let mut text = String::new();
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        self.child.wait().unwrap();
        serde_json::from_str(text.trim()).unwrap()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        // SAFETY: signalling the child this test started (gone already is harmless).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn blast(server: SocketAddr, args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_gannet-blast"))
        .args(["--server", &server.to_string(), "--json-only"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn blast_and_sink_agree_on_counts() {
    let sink = Sink::start(&[]);
    let result = blast(
        sink.smtp,
        &[
            "--messages",
            "2000",
            "--concurrency",
            "16",
            "--recipients",
            "3",
            "--domains",
            "a.test:3,b.test:1",
            "--size",
            "1k:50,20k:50",
            "--per-connection",
            "10",
        ],
    );
    assert_eq!(result["messages_sent"], 2000, "{result}");
    assert_eq!(result["recipients_accepted"], 6000);
    assert_eq!(result["errors"], serde_json::json!({}));
    let live = sink.counts();
    assert_eq!(sink.total_text(), "{\"messages\":2000,\"tried\":6000}");
    let counts = sink.stop();
    assert_eq!(live, counts, "HTTP and exit counters agree");
    assert_eq!(counts["messages"], 2000);
    assert_eq!(counts["intact"], 2000, "{counts}");
    assert_eq!(counts["damaged"], 0);
    // 10 messages per connection; each worker's last connection may carry fewer.
    let sessions = counts["sessions"].as_u64().unwrap();
    assert!((200..=216).contains(&sessions), "{sessions}");
    let domains = &counts["domains"];
    let accepted = |d: &str| domains[d]["rcpt_accepted"].as_u64().unwrap();
    assert_eq!(accepted("a.test") + accepted("b.test"), 6000);
    // 3:1 weights, within a generous tolerance.
    let share = accepted("a.test") as f64 / 6000.0;
    assert!((0.70..0.80).contains(&share), "{share}");
    // Pipelining off, STARTTLS refused by this sink: the run reports the error code.
    let sink = Sink::start(&[]);
    let plain = blast(
        sink.smtp,
        &["--messages", "50", "--concurrency", "2", "--no-pipelining"],
    );
    assert_eq!(plain["messages_sent"], 50);
    let tls = blast(
        sink.smtp,
        &["--messages", "5", "--concurrency", "1", "--starttls"],
    );
    assert_eq!(tls["messages_sent"], 0);
    assert_eq!(tls["errors"]["502"], 5, "{tls}");
    let counts = sink.stop();
    assert_eq!(counts["messages"], 50);
    assert_eq!(counts["tls_sessions"], 0);
    // With a certificate the sink offers STARTTLS and counts the sessions that used it.
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = gannet_bench::sts::BenchPki::create(pki_dir.path(), 1).unwrap();
    let sink = Sink::start(&[
        "--tls-cert",
        pki.sink_cert.to_str().unwrap(),
        "--tls-key",
        pki.sink_key.to_str().unwrap(),
    ]);
    let tls = blast(
        sink.smtp,
        &["--messages", "6", "--concurrency", "2", "--starttls"],
    );
    assert_eq!(tls["messages_sent"], 6, "{tls}");
    let plain = blast(sink.smtp, &["--messages", "4", "--concurrency", "1"]);
    assert_eq!(plain["messages_sent"], 4, "{plain}");
    let counts = sink.stop();
    assert_eq!(counts["messages"], 10, "{counts}");
    assert_eq!(counts["intact"], 10, "{counts}");
    assert_eq!(counts["tls_sessions"], 6, "{counts}");
}

#[test]
fn blast_and_postfix_smtp_sink_agree_on_counts() {
    let (mut sink, port) = gannet_bench::peers::spawn_listening(|port| {
        let mut command = Command::new("/usr/sbin/smtp-sink");
        command
            .args(["-c", "-u", "nobody", &format!("127.0.0.1:{port}"), "100"])
            .stdout(Stdio::piped());
        command
    });
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let result = blast(
        addr,
        &[
            "--messages",
            "1500",
            "--concurrency",
            "8",
            "--per-connection",
            "5",
        ],
    );
    assert_eq!(result["messages_sent"], 1500);
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: signalling the child this test started.
    unsafe { libc::kill(sink.id() as i32, libc::SIGTERM) };
    let mut text = String::new();
    sink.stdout
        .take()
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    sink.wait().unwrap();
    let last = text.rsplit('\r').find(|l| l.contains("mesg=")).unwrap();
    assert!(last.trim().ends_with("mesg=1500"), "{last}");
}

#[test]
fn fault_injection_gives_the_configured_percentages() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sink.toml");
    std::fs::write(
        &config,
        "[domains.\"f.test\"]\ntempfail_percent = 10\npermfail_percent = 5\ndrop_in_data_percent = 10\n\
         [domains.\"slow.test\"]\nlatency_ms = { rcpt = 30 }\n",
    )
    .unwrap();
    let sink = Sink::start(&["--config", config.to_str().unwrap()]);
    let n = 4000u64;
    let result = blast(
        sink.smtp,
        &[
            "--messages",
            &n.to_string(),
            "--concurrency",
            "16",
            "--domains",
            "f.test",
            "--size",
            "1k",
        ],
    );
    let counts = sink.counts();
    let f = &counts["domains"]["f.test"];
    let pct = |v: &serde_json::Value, of: u64| v.as_u64().unwrap() as f64 * 100.0 / of as f64;
    let temp = pct(&f["rcpt_tempfailed"], n);
    let perm = pct(&f["rcpt_permfailed"], n);
    assert!((7.5..12.5).contains(&temp), "tempfail {temp}%: {counts}");
    assert!((3.0..7.0).contains(&perm), "permfail {perm}%: {counts}");
    let data_tx = f["rcpt_accepted"].as_u64().unwrap();
    let dropped = pct(&f["dropped"], data_tx);
    assert!(
        (7.5..12.5).contains(&dropped),
        "dropped {dropped}%: {counts}"
    );
    assert_eq!(
        f["messages"].as_u64().unwrap() + f["dropped"].as_u64().unwrap(),
        data_tx
    );
    // The generator saw the same refusals (by code) and the drops (as closed).
    let errors = &result["errors"];
    let by_class = |class: char| -> u64 {
        errors
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.starts_with(class))
            .map(|(_, v)| v.as_u64().unwrap())
            .sum()
    };
    assert_eq!(
        by_class('4'),
        f["rcpt_tempfailed"].as_u64().unwrap(),
        "{result}"
    );
    assert_eq!(
        by_class('5'),
        f["rcpt_permfailed"].as_u64().unwrap(),
        "{result}"
    );
    assert_eq!(errors["closed"], f["dropped"], "{result}");
    assert_eq!(result["messages_sent"], f["messages"]);

    // Latency per phase is applied (a lower bound: three RCPTs wait 30 ms each).
    let slow = blast(
        sink.smtp,
        &[
            "--messages",
            "4",
            "--concurrency",
            "1",
            "--domains",
            "slow.test",
            "--recipients",
            "3",
        ],
    );
    assert!(
        slow["latency_ms"]["p50"].as_f64().unwrap() >= 90.0,
        "{slow}"
    );

    // tempfail@ and permfail@ always fail, whatever the domain (Python's smtplib).
    let script = format!(
        "import smtplib\ns = smtplib.SMTP('127.0.0.1', {})\nprint(s.rcpt('x@a.test') if s.mail('s@t.test') else '')\n\
         print(s.rcpt('tempfail@a.test')[0], s.rcpt('permfail@a.test')[0])\ns.quit()\n",
        sink.smtp.port()
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let codes = text.lines().last().unwrap_or("");
    let (t, p) = codes.split_once(' ').unwrap();
    assert!(t.starts_with('4') && p.starts_with('5'), "{text}");
}

#[test]
fn bad_arguments_and_configs_are_refused_with_the_key_named() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[default]\ntempfail_percent = 150\n",
            "default.tempfail_percent",
        ),
        ("[default]\nbogus = 1\n", "bogus"),
        (
            "[responses]\npermfail = [\"250 ok\"]\n",
            "responses.permfail",
        ),
    ];
    for (text, needle) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_gannet-sink"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--config",
                path.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(needle),
            "{text}: {err}"
        );
    }
    let blast_err = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_gannet-blast"))
            .args(["--server", "127.0.0.1:9"])
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    assert!(blast_err(&["--size", "10q"]).contains("10q"));
    assert!(blast_err(&["--domains", "a.test:0"]).contains("a.test:0"));
    assert!(blast_err(&["--concurrency", "0"]).contains("--concurrency"));
    // Nothing listening: every message is a counted connect error, not a crash.
    let out = Command::new(env!("CARGO_BIN_EXE_gannet-blast"))
        .args([
            "--server",
            "127.0.0.1:9",
            "--messages",
            "3",
            "--concurrency",
            "1",
            "--json-only",
        ])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (
            v["messages_failed"].as_u64(),
            v["errors"]["connect"].as_u64()
        ),
        (Some(3), Some(3))
    );
}

#[test]
fn the_example_config_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/sink.example.toml");
    let config = gannet_bench::sink::SinkConfig::load(std::path::Path::new(path)).unwrap();
    assert_eq!(config.rule("backpressure.test").latency_ms.rcpt, 20);
}

/// The harness end to end at a tiny scale: gannet and the pipe, three scenarios
/// (one over HTTP), a report with both systems and the charts.
/// gannet-forward on a loopback port with `args`: the child and where it listens.
fn start_forward(args: &[&str]) -> (Child, SocketAddr) {
    let mut forward = Command::new(env!("CARGO_BIN_EXE_gannet-forward"))
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(forward.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    (forward, v["smtp"].as_str().unwrap().parse().unwrap())
}

/// The forward relay (gannet-bench's `forward`, the bound when no delivery connection
/// can be reused) opens a new connection to the next hop for every message, delivers
/// each intact, and gives its client the next hop's own reply.
#[test]
fn the_forward_relay_opens_a_connection_per_message_and_relays_the_replies() {
    let sink = Sink::start(&[]);
    let (mut forward, at) = start_forward(&["--shards", "2", "--to", &sink.smtp.to_string()]);
    let result = blast(
        at,
        &[
            "--messages",
            "200",
            "--concurrency",
            "8",
            "--recipients",
            "2",
            "--per-connection",
            "10",
        ],
    );
    assert_eq!(result["messages_sent"], 200, "{result}");
    assert_eq!(result["errors"], serde_json::json!({}));
    // A recipient the next hop refuses: its refusal is the reply to the data.
    let script = format!(
        "import smtplib\n\
         s = smtplib.SMTP('127.0.0.1', {})\n\
         try:\n    s.sendmail('a@x.test', ['permfail@y.test'], 'Subject: x\\r\\n\\r\\nx\\r\\n')\n\
         except smtplib.SMTPDataError as e:\n    print(e.smtp_code)\n",
        at.port()
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    let code = String::from_utf8_lossy(&out.stdout);
    assert!(
        code.trim().starts_with('5'),
        "{code} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // SAFETY: signalling the child this test started.
    unsafe { libc::kill(forward.id() as i32, libc::SIGTERM) };
    forward.wait().unwrap();
    let counts = sink.stop();
    assert_eq!(counts["messages"], 200, "{counts}");
    assert_eq!(counts["intact"], 200, "{counts}");
    // One session per message (and one for the refused recipient), where the
    // client used 20.
    assert_eq!(counts["sessions"], 201, "{counts}");
}

/// With `--dns` (gannet-bench's `forward-dns`) the relay finds each message's next
/// hop from DNS first — the MX of the recipient's domain, then its address — and
/// connects there on `--to`'s port; a domain DNS does not know gets 451, and the
/// relay goes on.
#[test]
fn the_forward_relay_with_dns_finds_the_next_hop_through_mx() {
    let sink = Sink::start(&[]);
    let (_dns, dns_port) = gannet_bench::peers::dnsmasq(&[
        "--mx-host=a.test,mx.a.test,10".into(),
        "--host-record=mx.a.test,127.0.0.1".into(),
    ]);
    // `--to` names only the port: the address comes from DNS.
    let (mut forward, at) = start_forward(&[
        "--shards",
        "1",
        "--to",
        &format!("127.0.0.2:{}", sink.smtp.port()),
        "--dns",
        &format!("127.0.0.1:{dns_port}"),
    ]);
    let script = format!(
        "import smtplib\n\
         s = smtplib.SMTP('127.0.0.1', {})\n\
         for rcpt in ['x@a.test', 'y@nowhere.test', 'z@a.test']:\n\
         \x20   try:\n\
         \x20       s.sendmail('a@x.test', [rcpt], 'Subject: x\\r\\n\\r\\nx\\r\\n')\n\
         \x20       print(rcpt, 250)\n\
         \x20   except smtplib.SMTPDataError as e:\n\
         \x20       print(rcpt, e.smtp_code)\n",
        at.port()
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        printed.lines().collect::<Vec<_>>(),
        ["x@a.test 250", "y@nowhere.test 451", "z@a.test 250"],
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // SAFETY: signalling the child this test started.
    unsafe { libc::kill(forward.id() as i32, libc::SIGTERM) };
    forward.wait().unwrap();
    let counts = sink.stop();
    assert_eq!(counts["messages"], 2, "{counts}");
    assert_eq!(counts["domains"]["a.test"]["messages"], 2, "{counts}");
    assert_eq!(counts["sessions"], 2, "{counts}");
}

#[test]
fn the_harness_runs_tiny_scenarios_end_to_end() {
    let gannetd = gannetd();
    let dir = tempfile::tempdir().unwrap();
    let results = dir.path().join("RESULTS.md");
    let charts = dir.path().join("charts");
    let out = Command::new(env!("CARGO_BIN_EXE_gannet-bench"))
        .args([
            "--scenarios",
            "durable-accept,relay,http-inject",
            "--systems",
            "gannet,pipe,forward",
        ])
        .args(["--repetitions", "2", "--scale", "1000"])
        .args(["--gannetd", gannetd.to_str().unwrap()])
        .args(["--scratch", dir.path().join("scratch").to_str().unwrap()])
        .args([
            "--results",
            results.to_str().unwrap(),
            "--charts",
            charts.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // One JSON line per run: durable-accept on gannet and the pipe (the forward relay
    // has no queue to accept into), relay on all three, HTTP injection on gannet
    // alone, each twice, the systems alternating.
    let runs: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(runs.len(), 12);
    assert_eq!(
        (runs[0]["system"].as_str(), runs[2]["system"].as_str()),
        (Some("gannet"), Some("pipe"))
    );
    for run in &runs {
        assert_eq!(run["sent"], 50, "{run}");
        if run["scenario"] != "durable-accept" {
            assert_eq!(run["delivered"], 50, "{run}");
        }
        // A durable 250 shows on the block device: gannet's accepts flushed it.
        if run["scenario"] == "durable-accept" && run["system"] == "gannet" {
            assert!(run["flushes"].as_u64().unwrap() >= 1, "{run}");
        }
    }
    let report = std::fs::read_to_string(&results).unwrap();
    for needle in [
        "### durable-accept",
        "### relay",
        "### http-inject",
        "| gannet | yes (fdatasync, group commit) |",
        "| pipe | no (the sink stores nothing) |",
        "| forward | no (no queue: relays the sink's reply) |",
        "× forward",
        "disk flushes / msg",
        "100 / 100",
    ] {
        assert!(report.contains(needle), "{needle}: {report}");
    }
    for chart in [
        "relay-throughput.svg",
        "relay-latency.svg",
        "durable-accept-latency.svg",
    ] {
        let svg = std::fs::read_to_string(charts.join(chart)).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("gannet"), "{chart}");
    }
}

/// A system that cannot run is refused before any run starts, with the reason: an
/// unknown name, KumoMTA without a kumod that runs, a baseline without its binary.
#[test]
fn the_harness_names_a_system_it_cannot_run_before_running_any() {
    let dir = tempfile::tempdir().unwrap();
    for (systems, kumod, expected) in [
        ("gannet,exim", None, "unknown system `exim`"),
        (
            "gannet,kumomta",
            Some("/nonexistent/kumod"),
            "running /nonexistent/kumod --version",
        ),
        (
            "gannet,gannet-baseline",
            None,
            "give the earlier gannetd with --baseline-gannetd",
        ),
    ] {
        let mut bench = Command::new(env!("CARGO_BIN_EXE_gannet-bench"));
        bench
            .args(["--systems", systems, "--scenarios", "relay"])
            .args(["--scale", "1000", "--results", "", "--charts", ""])
            .args(["--scratch", dir.path().to_str().unwrap()]);
        if let Some(kumod) = kumod {
            bench.args(["--kumod", kumod]);
        }
        let out = bench.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(expected),
            "{stderr}"
        );
        assert!(out.stdout.is_empty(), "nothing ran");
    }
}

/// The gannetd binary of this build profile (built if the workspace has not yet).
fn gannetd() -> std::path::PathBuf {
    let bin_dir = std::path::Path::new(env!("CARGO_BIN_EXE_gannet-blast"))
        .parent()
        .unwrap()
        .to_path_buf();
    let gannetd = bin_dir.join("gannetd");
    if !gannetd.exists() {
        let profile = if bin_dir.ends_with("release") {
            vec!["--release"]
        } else {
            vec![]
        };
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "gannet-engine", "--bin", "gannetd"])
            .args(profile)
            .status()
            .unwrap();
        assert!(status.success());
    }
    gannetd
}

/// STARTTLS and AUTH PLAIN against gannetd (which offers both); a wrong password is
/// counted as 535 per message, and no AUTH from a network without relay rights as 550.
#[test]
fn blast_uses_starttls_and_auth_with_gannetd() {
    let gannetd = gannetd();
    let hash = run_with_input(Command::new(&gannetd).arg("--hash-password"), b"s3cret");
    let hash = String::from_utf8(hash).unwrap().trim().to_string();
    let (dir, mut daemon, listeners) = start_gannetd(
        &gannetd,
        &format!(
            "[smtp]\nlisten = [\"127.0.0.1:0\"]\nrelay_from = []\n\
             users = [{{ name = \"app\", password_hash = \"{hash}\" }}]\n"
        ),
    );
    let smtp = listener(&listeners, "smtp");
    let ok = blast(
        smtp,
        &[
            "--messages",
            "40",
            "--concurrency",
            "4",
            "--starttls",
            "--auth",
            "app:s3cret",
        ],
    );
    let bad = blast(
        smtp,
        &[
            "--messages",
            "3",
            "--concurrency",
            "1",
            "--starttls",
            "--auth",
            "app:wrong",
        ],
    );
    let anonymous = blast(
        smtp,
        &["--messages", "2", "--concurrency", "1", "--starttls"],
    );
    // SAFETY: signalling the child this test started.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    daemon.wait().unwrap();
    drop(dir);
    assert_eq!(ok["messages_sent"], 40, "{ok}");
    assert_eq!(bad["errors"]["535"], 3, "{bad}");
    assert_eq!(anonymous["errors"]["550"], 2, "{anonymous}");
}

/// gannetd (one shard, delivery suspended) with `sections` (an `[smtp]` section at
/// least, then anything); returns its directory, process and listeners.
fn start_gannetd(
    gannetd: &std::path::Path,
    sections: &str,
) -> (tempfile::TempDir, std::process::Child, serde_json::Value) {
    start_gannetd_delivering(gannetd, sections, "[delivery]\nsuspended = true\n")
}

/// The first address gannetd listens on for `kind` ("smtp", "http"), from its
/// listeners file.
fn listener(listeners: &serde_json::Value, kind: &str) -> SocketAddr {
    listeners[kind][0].as_str().unwrap().parse().unwrap()
}

/// Like [`start_gannetd`], with `delivery` as the `[delivery]` configuration.
fn start_gannetd_delivering(
    gannetd: &std::path::Path,
    sections: &str,
    delivery: &str,
) -> (tempfile::TempDir, std::process::Child, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gannetd.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nhostname = \"gannet.test\"\ndata_dir = \"{}\"\nshards = 1\n{sections}\n\
             {delivery}",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let daemon = Command::new(gannetd)
        .args(["--config", config.to_str().unwrap(), "--log", "warn"])
        .spawn()
        .unwrap();
    let listeners = dir.path().join("data/listeners.json");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !listeners.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "gannetd did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let v = serde_json::from_str(&std::fs::read_to_string(&listeners).unwrap()).unwrap();
    (dir, daemon, v)
}

/// gannetd relays to the smart sink, which drops a fifth of its connections in DATA
/// and defers 5% of recipients: connections break while the next message's envelope
/// is already pipelined behind the current one's end, and still every message
/// arrives intact, once, after retries.
#[test]
fn relay_to_a_faulty_sink_delivers_every_message_once() {
    let gannetd = gannetd();
    let sink = Sink::start(&["--drop-in-data-percent", "20", "--tempfail-percent", "5"]);
    let (dir, mut daemon, listeners) = start_gannetd_delivering(
        &gannetd,
        "[smtp]\nlisten = [\"127.0.0.1:0\"]\n",
        &format!(
            "[delivery]\nretry_interval_secs = 1\nmax_retry_interval_secs = 2\n\
             routes = {{ \"*\" = [\"{}\"] }}\n[delivery.shaping]\nconnection_limit = 2\n",
            sink.smtp
        ),
    );
    let smtp = listener(&listeners, "smtp");
    let sent = blast(
        smtp,
        &[
            "--messages",
            "400",
            "--concurrency",
            "8",
            "--domains",
            "a.test",
        ],
    );
    assert_eq!(sent["messages_sent"], 400, "{sent}");
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while sink.total() < 400 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} of 400 delivered",
            sink.total()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Nothing more arrives: no message was delivered twice.
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: signalling the child this test started.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    daemon.wait().unwrap();
    drop(dir);
    let counts = sink.stop();
    assert_eq!(counts["messages"], 400, "{counts}");
    assert_eq!(counts["intact"], 400, "{counts}");
    let dropped = counts["dropped"].as_u64().unwrap();
    assert!(dropped > 0, "the sink dropped no connection: {counts}");
}

/// HTTP injection: gannet-blast POSTs transmissions (two recipients each, several
/// per keep-alive connection); its counts agree with gannetd's, and a wrong key is
/// counted as 401 per request.
#[test]
fn blast_injects_transmissions_over_http() {
    let gannetd = gannetd();
    let key = "blast-test-key-41f0";
    let digest = run_with_input(Command::new(&gannetd).arg("--hash-api-key"), key.as_bytes());
    let digest = String::from_utf8(digest).unwrap().trim().to_string();
    let (dir, mut daemon, listeners) = start_gannetd(
        &gannetd,
        &format!(
            "[smtp]\nlisten = [\"127.0.0.1:0\"]\n[http]\nlisten = [\"127.0.0.1:0\"]\n\
             api_keys = [{{ name = \"blast\", key_sha256 = \"{digest}\" }}]\n"
        ),
    );
    let http = listener(&listeners, "http");
    let common = [
        "--http",
        "--concurrency",
        "4",
        "--per-connection",
        "10",
        "--size",
        "2k",
    ];
    let ok = blast(
        http,
        &[
            &common[..],
            &["--messages", "60", "--recipients", "2", "--api-key", key],
        ]
        .concat(),
    );
    let bad = blast(
        http,
        &[&common[..], &["--messages", "5", "--api-key", "wrong"]].concat(),
    );
    let metrics = Command::new("curl")
        .args(["-sS", &format!("http://{http}/metrics")])
        .output()
        .unwrap();
    // SAFETY: signalling the child this test started.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    daemon.wait().unwrap();
    drop(dir);
    assert_eq!(ok["messages_sent"], 60, "{ok}");
    assert_eq!(ok["recipients_accepted"], 120, "{ok}");
    assert_eq!(bad["errors"]["401"], 5, "{bad}");
    let generated: u64 = String::from_utf8_lossy(&metrics.stdout)
        .lines()
        .filter(|l| l.starts_with("gannet_http_messages_generated_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(generated, 120);
}

fn run_with_input(command: &mut Command, input: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    out.stdout
}
