//! relay-bench: end-to-end relay, side by side.
//!
//! N messages of a given size, injected by postfix's smtp-source (an independent
//! client; one process per destination domain, a new connection per message, S
//! sessions in all), relayed over SMTP to postfix's smtp-sink, timed from the first
//! injection to the last message counted at the sink:
//! - `pipe`: smtp-source straight to smtp-sink (the limit: no MTA in the way);
//! - `gannet`: gannetd, durable before 250, MX records for the domains served by a
//!   real DNS server (unbound; each domain its own MX host name, so its own site), delivering to
//!   the sink.
//!
//! - `postfix`: the system Postfix as a relay, a transport map sending every domain to
//!   the sink;
//! - `gannet-listing`: gannetd as `gannet`, while an operator's client lists every
//!   queue through the admin API (`/api/admin/queues/v1`) every `--list-every-ms`
//!   (100 ms): what looking costs the relay (listings made, their mean latency).
//! - `gannet-hose`: gannetd as `gannet` with the event hose shipping everything: two
//!   webhooks (minimal receivers in this process, `gannet_bench::hook`) and a
//!   RabbitMQ node of the benchmark's own (`[[events.amqp]]`, a durable queue bound
//!   to every event), all subscribed to every event type; it reports the events each
//!   got, the broker's CPU, and how long after the last delivery every sink had
//!   caught up; `gannet-webhooks` the same without the broker.
//! - `gannet-untallied`: gannetd as `gannet` with the Metrics API's tally off
//!   (`[events.metrics] enabled = false`): what tallying every event costs.
//! - `gannet-tls` and `gannet-mta-sts`: gannetd delivering over STARTTLS to
//!   gannet-sink (smtp-sink has no TLS) with a certificate for every MX host from a CA
//!   made for the run (`gannet_bench::sts`), trusted through `delivery.tls_ca_file`.
//!   `gannet-tls`: opportunistic TLS, the domains publish no MTA-STS policy (the
//!   `_mta-sts` lookup answers NXDOMAIN); `gannet-mta-sts`: every domain publishes an
//!   `enforce` policy (TXT record, policy served over HTTPS by the bench), so every
//!   delivery needs a matching MX and a verified certificate. Both first relay one
//!   message per domain untimed (the policy cache warm); the report compares the two.
//!
//! For every run it reports msgs/s, the ratio to the pipe, the server's CPU per
//! message and its peak RSS; for gannet also the memory per queued message (delivery
//! suspended, N messages queued). The report is appended to bench/RESULTS.md.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use gannet_bench::servers::{self, Server};
use gannet_bench::{append_results, command_line, command_output, machine, tree_cpu_seconds};

#[derive(Debug, Parser)]
#[command(about = "End-to-end relay: gannet vs postfix vs the direct source→sink pipe")]
struct Args {
    /// Messages per run.
    #[arg(long, default_value_t = 100_000)]
    messages: u64,
    /// Concurrent injecting sessions in all (a new connection per message).
    #[arg(long, default_value_t = 50)]
    sessions: u64,
    /// Message size in bytes.
    #[arg(long, default_value_t = 10_240)]
    size: usize,
    /// Destination domains (one smtp-source process each).
    #[arg(long, default_value_t = 20)]
    domains: u64,
    /// Systems to run, in order (also `gannet-listing`, `gannet-hose`,
    /// `gannet-webhooks`, `gannet-untallied`, `gannet-tls`, `gannet-mta-sts`); a
    /// system may repeat.
    #[arg(long, value_delimiter = ',', default_value = "gannet,pipe,postfix")]
    systems: Vec<String>,
    /// How often `gannet-listing` lists every queue.
    #[arg(long, default_value_t = 100)]
    list_every_ms: u64,
    /// gannetd shard counts to run (0: one per core).
    #[arg(long, value_delimiter = ',', default_value = "1,0")]
    gannet_shards: Vec<usize>,
    /// Extra `[server]` keys for gannetd, e.g. "spin_before_park_us = 50".
    #[arg(long, default_value = "")]
    gannet_server_extra: String,
    /// More gannetd configuration, appended after its `[delivery]` keys, e.g.
    /// "[delivery.shaping]\npipeline_next_message = false".
    #[arg(long, default_value = "")]
    gannet_config_extra: String,
    /// The gannetd binary.
    #[arg(long, default_value = "target/release/gannetd")]
    gannetd: PathBuf,
    /// The gannet-sink binary (the TLS systems' receiver).
    #[arg(long, default_value = "target/release/gannet-sink")]
    sink: PathBuf,
    /// Scratch directory for gannet's data.
    #[arg(long, default_value = "/tmp/gannet-relay-bench")]
    dir: PathBuf,
    /// Messages queued (delivery suspended) to measure gannet's memory per queued
    /// message (0 skips it).
    #[arg(long, default_value_t = 50_000)]
    queued_messages: u64,
    /// Give up on a run after this long.
    #[arg(long, default_value_t = 1800)]
    timeout_secs: u64,
    /// Markdown report appended here ("" to skip).
    #[arg(long, default_value = "bench/RESULTS.md")]
    results: String,
}

/// What a run relays to: it counts the messages it received.
trait Receiver {
    fn port(&self) -> u16;
    fn pid(&self) -> u32;
    fn received(&self) -> u64;
    /// Waits until the sink has `count` more messages than `base`; returns when it got
    /// the last one.
    fn wait_for(&self, base: u64, count: u64, timeout: Duration) -> Result<Instant>;
}

/// smtp-sink with its `-c` counter read live: how many messages it has received.
struct CountingSink {
    server: Server,
    received: Arc<AtomicU64>,
    /// When the count first reached each target asked for (set by the reader).
    reached: Arc<Mutex<Option<(u64, Instant)>>>,
}

impl CountingSink {
    fn start() -> Result<CountingSink> {
        let mut server = servers::smtp_sink(&["-c"], true)?;
        let mut stdout = server
            .child
            .as_mut()
            .and_then(|c| c.stdout.take())
            .context("smtp-sink's output")?;
        let received = Arc::new(AtomicU64::new(0));
        let reached: Arc<Mutex<Option<(u64, Instant)>>> = Arc::new(Mutex::new(None));
        std::thread::spawn({
            let (received, reached) = (received.clone(), reached.clone());
            move || {
                // Counter lines end in '\r': "sess=1 quit=1 mesg=2".
                let mut buf = [0u8; 4096];
                let mut line = Vec::new();
                while let Ok(n) = stdout.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    for b in &buf[..n] {
                        if *b != b'\r' {
                            line.push(*b);
                            continue;
                        }
                        let text = String::from_utf8_lossy(&line);
                        if let Some(m) = text
                            .split("mesg=")
                            .nth(1)
                            .and_then(|m| m.trim().parse::<u64>().ok())
                        {
                            received.store(m, Ordering::Release);
                            let mut r = reached.lock().unwrap_or_else(|e| e.into_inner());
                            if let Some((target, at)) = r.as_mut()
                                && m >= *target
                                && *target != u64::MAX
                            {
                                *at = Instant::now();
                                *target = u64::MAX;
                            }
                        }
                        line.clear();
                    }
                }
            }
        });
        Ok(CountingSink {
            server,
            received,
            reached,
        })
    }
}

impl Receiver for CountingSink {
    fn port(&self) -> u16 {
        self.server.port
    }

    fn pid(&self) -> u32 {
        self.server.pid
    }

    fn received(&self) -> u64 {
        self.received.load(Ordering::Acquire)
    }

    fn wait_for(&self, base: u64, count: u64, timeout: Duration) -> Result<Instant> {
        let target = base + count;
        *self.reached.lock().unwrap_or_else(|e| e.into_inner()) = Some((target, Instant::now()));
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((u64::MAX, at)) = *self.reached.lock().unwrap_or_else(|e| e.into_inner()) {
                return Ok(at);
            }
            if self.received.load(Ordering::Acquire) >= target {
                // Reached before the target was set.
                return Ok(Instant::now());
            }
            if Instant::now() > deadline {
                bail!(
                    "the sink got {} of {count} messages in {timeout:?}",
                    self.received.load(Ordering::Acquire) - base
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// gannet-sink offering STARTTLS with the rig's certificate for every MX host; its
/// count is polled over HTTP.
struct TlsSink {
    sink: gannet_bench::harness::Sink,
}

impl TlsSink {
    fn tls_sessions(&self) -> u64 {
        (self.sink.totals().ok())
            .and_then(|t| t["tls_sessions"].as_u64())
            .unwrap_or(0)
    }
}

impl Receiver for TlsSink {
    fn port(&self) -> u16 {
        self.sink.smtp.port()
    }

    fn pid(&self) -> u32 {
        self.sink.pid()
    }

    fn received(&self) -> u64 {
        self.sink.received().unwrap_or(0)
    }

    fn wait_for(&self, base: u64, count: u64, timeout: Duration) -> Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            let received = self.sink.received()?;
            if received >= base + count {
                return Ok(Instant::now());
            }
            if Instant::now() > deadline {
                bail!(
                    "the sink got {} of {count} messages in {timeout:?}",
                    received - base
                );
            }
            // Polled (an HTTP request each): the last message is seen within 5 ms.
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// The TLS systems' rig: the sink, the CA and the policy server, and a DNS server
/// whose domains publish MTA-STS policies (the plain one publishes none).
struct TlsRig {
    sink: TlsSink,
    pki: gannet_bench::sts::BenchPki,
    policies: gannet_bench::sts::PolicyServer,
    sts_dns_port: u16,
    _sts_dns: gannet_bench::peers::Peer,
    _pki_dir: tempfile::TempDir,
}

impl TlsRig {
    fn start(args: &Args) -> Result<TlsRig> {
        // Not under `args.dir`, which every gannetd run starts by emptying.
        let pki_dir = tempfile::tempdir()?;
        let pki = gannet_bench::sts::BenchPki::create(pki_dir.path(), args.domains)?;
        let sink = gannet_bench::harness::Sink::start(
            &args.sink,
            &[
                "--tls-cert",
                pki.sink_cert.to_str().unwrap_or_default(),
                "--tls-key",
                pki.sink_key.to_str().unwrap_or_default(),
            ],
        )?;
        let policies = gannet_bench::sts::PolicyServer::start(pki.policy_tls.clone())?;
        let (sts_dns, sts_dns_port) = servers::bench_dns_with(
            &args.dir.join("dns-sts"),
            args.domains,
            &gannet_bench::sts::policy_records(args.domains),
        )?;
        Ok(TlsRig {
            sink: TlsSink { sink },
            pki,
            policies,
            sts_dns_port,
            _sts_dns: sts_dns,
            _pki_dir: pki_dir,
        })
    }
}

/// What the TLS systems measured besides the relay.
#[derive(Debug)]
struct TlsRun {
    /// Sessions that started TLS at the sink during the timed run.
    tls_sessions: u64,
    /// MTA-STS policies gannetd fetched in all (warm-up included), and during the
    /// timed run.
    policies_fetched: f64,
    policies_fetched_in_run: f64,
}

/// Runs one smtp-source per domain, splitting the messages and sessions; waits for
/// all of them.
fn inject(args: &Args, port: u16, messages: u64) -> Result<()> {
    let domains = args.domains.max(1);
    let mut children = Vec::new();
    for d in 0..domains {
        let share = |total: u64| total / domains + u64::from(d < total % domains);
        let (m, s) = (share(messages), share(args.sessions).max(1));
        if m == 0 {
            continue;
        }
        let child = Command::new("/usr/sbin/smtp-source")
            .args([
                "-s",
                &s.to_string(),
                "-m",
                &m.to_string(),
                "-l",
                &args.size.to_string(),
                "-f",
                "bench@source.test",
                "-t",
                &format!("rcpt@d{d}.test"),
                &format!("127.0.0.1:{port}"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("running smtp-source (install postfix)")?;
        children.push(child);
    }
    for child in children {
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "smtp-source failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    Ok(())
}

/// A field of /proc/PID/status in kB.
fn status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// What one run measured.
#[derive(Debug)]
struct Run {
    system: String,
    seconds: f64,
    injected_s: f64,
    server_cpu_s: f64,
    /// The sink's CPU in the run: what receiving the messages costs a minimal server.
    sink_cpu_s: f64,
    peak_rss_kb: Option<u64>,
    /// gannet-listing: listings answered, and their mean latency (ms).
    listings: Option<(u64, f64)>,
    hose: Option<HoseRun>,
    /// CPU of the Metrics API's tally thread (gannet runs with the tally on).
    tally_cpu_s: Option<f64>,
    tls: Option<TlsRun>,
}

/// The name of the Metrics API's tally thread (the hose's sink `metrics`; Linux
/// keeps 15 bytes of a thread's name).
const TALLY_THREAD: &str = "gannet-hose-met";
/// How `gannet-untallied` runs are named after the server.
const UNTALLIED: &str = ", Metrics API tally off";

/// What `gannet-hose` measured besides the relay.
#[derive(Debug)]
struct HoseRun {
    /// Events each webhook receiver got.
    webhook_events: [u64; 2],
    /// Seconds from the last delivery until no sink lagged.
    caught_up_s: f64,
    broker_cpu_s: f64,
    /// CPU of gannetd's hose threads (reading, converting, sending).
    hose_cpu_s: f64,
}

/// The event hose's receivers for `gannet-hose`: two webhooks and a broker.
struct HoseReceivers {
    hooks: [gannet_bench::hook::HookReceiver; 2],
    rabbit: gannet_bench::peers::Rabbit,
    _dir: tempfile::TempDir,
}

impl HoseReceivers {
    fn start() -> Result<HoseReceivers> {
        let dir = tempfile::tempdir()?;
        let rabbit = gannet_bench::peers::Rabbit::start(dir.path());
        rabbit.client(&["declare", "gannet.events", "bench-events"]);
        Ok(HoseReceivers {
            hooks: [
                gannet_bench::hook::HookReceiver::start()?,
                gannet_bench::hook::HookReceiver::start()?,
            ],
            rabbit,
            _dir: dir,
        })
    }

    fn events(&self) -> [u64; 2] {
        [0, 1].map(|i| self.hooks[i].events.load(Ordering::Relaxed))
    }
}

/// The inject key of `gannet-hose` (it makes the webhooks).
const INJECT_KEY: &str = "relay-bench-inject-key-77d1";

impl Run {
    fn rate(&self, messages: u64) -> f64 {
        messages as f64 / self.seconds
    }
}

/// The admin key of `gannet-listing` (its digest goes in the config).
const ADMIN_KEY: &str = "relay-bench-admin-key-5e0c";

/// Lists every queue every `every` until `stop`: (listings answered, total latency).
fn list_queues(
    http: std::net::SocketAddr,
    every: Duration,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(u64, Duration)> {
    std::thread::spawn(move || {
        let (mut answered, mut spent) = (0, Duration::ZERO);
        while !stop.load(Ordering::Acquire) {
            let t0 = Instant::now();
            let listed = gannet_bench::http_request(
                http,
                "GET",
                "/api/admin/queues/v1",
                Some(ADMIN_KEY),
                b"",
            );
            if let Ok((200, _)) = listed {
                answered += 1;
                spent += t0.elapsed();
            }
            std::thread::sleep(every.saturating_sub(t0.elapsed()));
        }
        (answered, spent)
    })
}

fn gannet_delivery(dns_port: u16, sink_port: u16) -> String {
    format!(
        "[delivery]\ndns_server = \"127.0.0.1:{dns_port}\"\nsmtp_port = {sink_port}\ntls = \"disabled\"\n"
    )
}

/// The systems that relay over TLS to the rig's sink.
fn tls_system(system: &str) -> bool {
    matches!(system, "gannet-tls" | "gannet-mta-sts")
}

fn relay_run(
    args: &Args,
    system: &str,
    shards: usize,
    plain_sink: &CountingSink,
    dns_port: u16,
    receivers: Option<&HoseReceivers>,
    tls_rig: Option<&TlsRig>,
) -> Result<Run> {
    let tls_rig = tls_rig.filter(|_| tls_system(system));
    let sink: &dyn Receiver = match tls_rig {
        Some(rig) => &rig.sink,
        None => plain_sink,
    };
    let sink_port = sink.port();
    // gannetd relaying to the sink: `[http]` keys first, then `delivery`, the
    // command line's extra configuration and `more`.
    let gannet_with = |http_keys: &str, delivery: &str, more: &str| {
        servers::gannetd(
            &args.gannetd,
            &args.dir,
            shards,
            &args.gannet_server_extra,
            &(http_keys.to_string() + delivery + &args.gannet_config_extra + more),
        )
    };
    let gannet = |http_keys: &str, more: &str| {
        gannet_with(http_keys, &gannet_delivery(dns_port, sink_port), more)
    };
    let server = match system {
        "pipe" => None,
        "gannet" => Some(gannet("", "")?),
        "gannet-untallied" => {
            let mut server = gannet("", "\n[events.metrics]\nenabled = false\n")?;
            server.name = format!("{}{UNTALLIED}", server.name);
            Some(server)
        }
        "gannet-listing" => {
            let keys = format!(
                "api_keys = [{{ name = \"ops\", key_sha256 = \"{}\", role = \"admin\" }}]\n",
                gannet_core::auth::KeyDigest::of(ADMIN_KEY)
            );
            let mut server = gannet(&keys, "")?;
            server.name = format!("{}, listing every {} ms", server.name, args.list_every_ms);
            Some(server)
        }
        "gannet-hose" | "gannet-webhooks" => {
            let receivers = receivers.context("the hose's systems need their receivers")?;
            let broker = if system == "gannet-hose" {
                format!(
                    "\n[[events.amqp]]\nname = \"rabbit\"\nurl = \"amqp://guest:guest@127.0.0.1:{}/%2f\"\n",
                    receivers.rabbit.port
                )
            } else {
                String::new()
            };
            let keys = format!(
                "api_keys = [{{ name = \"app\", key_sha256 = \"{}\" }}]\n",
                gannet_core::auth::KeyDigest::of(INJECT_KEY)
            );
            let mut server = gannet(&keys, &broker)?;
            let http = std::net::SocketAddr::from(([127, 0, 0, 1], server.http_port));
            for (i, hook) in receivers.hooks.iter().enumerate() {
                let body = serde_json::json!({
                    "name": format!("bench {i}"),
                    "target": format!("http://127.0.0.1:{}/", hook.port),
                });
                let (status, reply) = gannet_bench::http_request(
                    http,
                    "POST",
                    "/api/v1/webhooks",
                    Some(INJECT_KEY),
                    body.to_string().as_bytes(),
                )?;
                if status != 200 {
                    bail!(
                        "creating a webhook: {status} {}",
                        String::from_utf8_lossy(&reply)
                    );
                }
            }
            server.name = if broker.is_empty() {
                format!("{}, hose: 2 webhooks", server.name)
            } else {
                format!("{}, hose: 2 webhooks + RabbitMQ", server.name)
            };
            Some(server)
        }
        "gannet-tls" | "gannet-mta-sts" => {
            let rig = tls_rig.context("the TLS systems need their rig")?;
            let (dns, what) = if system == "gannet-mta-sts" {
                (rig.sts_dns_port, "MTA-STS enforce for every domain")
            } else {
                (dns_port, "opportunistic TLS, no MTA-STS policy")
            };
            let delivery = format!(
                "[delivery]\ndns_server = \"127.0.0.1:{dns}\"\nsmtp_port = {sink_port}\ntls = \"opportunistic\"\ntls_ca_file = \"{}\"\n",
                rig.pki.ca_file.display()
            );
            let more = format!(
                "\n[delivery.mta_sts]\nenabled = true\nhttps_port = {}\n",
                rig.policies.port
            );
            let mut server = gannet_with("", &delivery, &more)?;
            server.name = format!("{}, {what} → gannet-sink (STARTTLS)", server.name);
            Some(server)
        }
        "postfix" => {
            let transport: Vec<String> = (0..args.domains)
                .map(|d| format!("d{d}.test=smtp:[127.0.0.1]:{sink_port}"))
                .collect();
            Some(servers::postfix(
                args.sessions,
                args.size * 4,
                &[
                    format!("transport_maps = inline:{{{}}}", transport.join(", ")),
                    "default_destination_concurrency_limit = 50".into(),
                ],
            )?)
        }
        other => bail!("unknown system {other}"),
    };
    let (name, port, pid) = match &server {
        Some(s) => (s.name.clone(), s.port, Some(s.pid)),
        None => (
            "pipe (smtp-source → smtp-sink)".to_string(),
            sink_port,
            None,
        ),
    };
    // The TLS systems start warm: rounds of a few messages per domain relayed
    // untimed, until a round fetched no policy, so that every shard has resolved every
    // site and cached every policy (each shard keeps its own cache; which shard
    // resolves a domain follows the injecting connection).
    const FETCHED: &str = "delivery_mta_sts_policies_fetched_total";
    let tls_http = match (&server, tls_rig) {
        (Some(s), Some(_)) => Some((
            s.port,
            std::net::SocketAddr::from(([127, 0, 0, 1], s.http_port)),
        )),
        _ => None,
    };
    let mut fetched0 = 0.0;
    if let Some((port, http)) = tls_http {
        for round in 0..10 {
            let base = sink.received();
            let n = args.domains * 4;
            inject(args, port, n)?;
            sink.wait_for(base, n, Duration::from_secs(args.timeout_secs))?;
            let fetched = gannet_bench::gannet_metric(http, FETCHED)?;
            if round > 0 && fetched == fetched0 {
                break;
            }
            fetched0 = fetched;
        }
    }
    let tls_http = tls_http.map(|(_, http)| http);
    let tls_sessions0 = tls_rig.map_or(0, |r| r.sink.tls_sessions());
    let base = sink.received();
    let hose_system = matches!(system, "gannet-hose" | "gannet-webhooks");
    let events0 = receivers.map(|r| r.events()).unwrap_or_default();
    let broker = receivers
        .and_then(|r| r.rabbit.vm_pid())
        .filter(|_| system == "gannet-hose");
    let broker_cpu0 = broker.map_or(0.0, tree_cpu_seconds);
    let hose_cpu0 = pid.map_or(0.0, |p| gannet_bench::threads_cpu_seconds(p, "gannet-hose"));
    let tally_cpu0 = pid.map_or(0.0, |p| gannet_bench::threads_cpu_seconds(p, TALLY_THREAD));
    let cpu0 = pid.map_or(0.0, tree_cpu_seconds);
    let sink_cpu0 = tree_cpu_seconds(sink.pid());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let lister = match &server {
        Some(s) if system == "gannet-listing" => Some(list_queues(
            std::net::SocketAddr::from(([127, 0, 0, 1], s.http_port)),
            Duration::from_millis(args.list_every_ms),
            stop.clone(),
        )),
        _ => None,
    };
    let t0 = Instant::now();
    inject(args, port, args.messages)?;
    let injected_s = t0.elapsed().as_secs_f64();
    let last = sink.wait_for(base, args.messages, Duration::from_secs(args.timeout_secs))?;
    let seconds = last.duration_since(t0).as_secs_f64();
    let server_cpu_s = pid.map_or(0.0, tree_cpu_seconds) - cpu0;
    let sink_cpu_s = tree_cpu_seconds(sink.pid()) - sink_cpu0;
    let tls = match (tls_http, tls_rig) {
        (Some(http), Some(rig)) => {
            let fetched = gannet_bench::gannet_metric(http, FETCHED)?;
            Some(TlsRun {
                tls_sessions: rig.sink.tls_sessions() - tls_sessions0,
                policies_fetched: fetched,
                policies_fetched_in_run: fetched - fetched0,
            })
        }
        _ => None,
    };
    let hose = match &server {
        Some(s) if hose_system => {
            let http = std::net::SocketAddr::from(([127, 0, 0, 1], s.http_port));
            let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
            while gannet_bench::gannet_metric(http, "hose_lag_bytes")? > 0.0 {
                if Instant::now() > deadline {
                    bail!("the hose did not catch up");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let caught_up_s = last.elapsed().as_secs_f64();
            let events = receivers.map(|r| r.events()).unwrap_or_default();
            Some(HoseRun {
                webhook_events: [events[0] - events0[0], events[1] - events0[1]],
                caught_up_s,
                broker_cpu_s: broker.map_or(0.0, tree_cpu_seconds) - broker_cpu0,
                hose_cpu_s: gannet_bench::threads_cpu_seconds(s.pid, "gannet-hose") - hose_cpu0,
            })
        }
        _ => None,
    };
    let tally_cpu_s = match (&server, system) {
        (Some(s), "gannet" | "gannet-listing" | "gannet-hose" | "gannet-webhooks") => {
            Some(gannet_bench::threads_cpu_seconds(s.pid, TALLY_THREAD) - tally_cpu0)
        }
        _ => None,
    };
    stop.store(true, Ordering::Release);
    let listings = lister.map(|l| {
        let (n, spent) = l.join().unwrap_or_default();
        (n, spent.as_secs_f64() * 1000.0 / n.max(1) as f64)
    });
    let peak_rss_kb = match (&server, system) {
        (
            Some(s),
            "gannet" | "gannet-listing" | "gannet-hose" | "gannet-webhooks" | "gannet-untallied"
            | "gannet-tls" | "gannet-mta-sts",
        ) => Some(status_kb(s.pid, "VmHWM:")),
        _ => None,
    };
    if let Some(server) = server {
        server.stop()?;
    }
    Ok(Run {
        system: name,
        seconds,
        injected_s,
        server_cpu_s,
        sink_cpu_s,
        peak_rss_kb,
        listings,
        hose,
        tally_cpu_s,
        tls,
    })
}

/// gannet's memory per queued message: delivery suspended, `n` messages injected.
/// (anonymous kB per message, file-backed kB per message: the spool's mapped pages)
fn queued_memory(args: &Args) -> Result<(f64, f64)> {
    let server = servers::gannetd(
        &args.gannetd,
        &args.dir,
        0,
        "",
        "[delivery]\nsuspended = true\n",
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let (anon0, file0) = (
        status_kb(server.pid, "RssAnon:"),
        status_kb(server.pid, "RssFile:"),
    );
    inject(args, server.port, args.queued_messages)?;
    std::thread::sleep(Duration::from_millis(300));
    let (anon1, file1) = (
        status_kb(server.pid, "RssAnon:"),
        status_kb(server.pid, "RssFile:"),
    );
    server.stop()?;
    let n = args.queued_messages.max(1) as f64;
    Ok((
        (anon1.saturating_sub(anon0)) as f64 * 1024.0 / n,
        (file1.saturating_sub(file0)) as f64 * 1024.0 / n,
    ))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let sink = CountingSink::start()?;
    let (dns, dns_port) = servers::bench_dns(&args.dir.join("dns"), args.domains)?;
    let receivers = if (args.systems.iter()).any(|s| s == "gannet-hose" || s == "gannet-webhooks") {
        Some(HoseReceivers::start()?)
    } else {
        None
    };
    let tls_rig = if args.systems.iter().any(|s| tls_system(s)) {
        Some(TlsRig::start(&args)?)
    } else {
        None
    };
    let mut runs = Vec::new();
    for system in &args.systems {
        let shard_counts: Vec<usize> = if system.starts_with("gannet") {
            args.gannet_shards.clone()
        } else {
            vec![0]
        };
        for shards in shard_counts {
            let run = relay_run(
                &args,
                system,
                shards,
                &sink,
                dns_port,
                receivers.as_ref(),
                tls_rig.as_ref(),
            )?;
            println!(
                "{}",
                serde_json::json!({
                    "system": run.system, "messages": args.messages,
                    "seconds": (run.seconds * 1000.0).round() / 1000.0,
                    "msgs_per_s": run.rate(args.messages).round(),
                    "injection_seconds": (run.injected_s * 1000.0).round() / 1000.0,
                    "server_cpu_ms_per_msg": run.server_cpu_s * 1000.0 / args.messages as f64,
                    "sink_cpu_ms_per_msg": run.sink_cpu_s * 1000.0 / args.messages as f64,
                    "peak_rss_kb": run.peak_rss_kb,
                    "listings": run.listings.map(|l| l.0),
                    "listing_ms": run.listings.map(|l| l.1),
                    "hose_webhook_events": run.hose.as_ref().map(|h| h.webhook_events),
                    "hose_caught_up_s": run.hose.as_ref().map(|h| h.caught_up_s),
                    "broker_cpu_ms_per_msg": run.hose.as_ref().map(|h| h.broker_cpu_s * 1000.0 / args.messages as f64),
                    "hose_cpu_ms_per_msg": run.hose.as_ref().map(|h| h.hose_cpu_s * 1000.0 / args.messages as f64),
                    "tally_cpu_ms_per_msg": run.tally_cpu_s.map(|t| t * 1000.0 / args.messages as f64),
                    "tls_sessions": run.tls.as_ref().map(|t| t.tls_sessions),
                    "mta_sts_policies_fetched": run.tls.as_ref().map(|t| t.policies_fetched),
                    "mta_sts_policies_fetched_in_run": run.tls.as_ref().map(|t| t.policies_fetched_in_run),
                })
            );
            runs.push(run);
        }
    }
    let queued = if args.queued_messages > 0 && args.systems.iter().any(|s| s == "gannet") {
        Some(queued_memory(&args)?)
    } else {
        None
    };
    sink.server.stop()?;
    let policies_served = tls_rig
        .as_ref()
        .map(|r| r.policies.served.load(Ordering::Relaxed));
    drop(tls_rig);
    drop(dns);
    let _ = std::fs::remove_dir_all(&args.dir);

    use std::fmt::Write as _;
    let mut md = String::new();
    let rev = command_output("git", &["rev-parse", "--short", "HEAD"]);
    let date = command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let command = command_line();
    writeln!(md, "\n## End-to-end relay — {date}\n")?;
    writeln!(md, "- command: `{command}`")?;
    writeln!(md, "- machine: {}", machine())?;
    writeln!(
        md,
        "- revision: {rev}; {} messages of {} bytes to {} domains, injected by smtp-source ({} sessions in all, a new connection per message), relayed to postfix's smtp-sink (the TLS systems: to gannet-sink over STARTTLS); timed from the first injection to the last message at the sink; load generator, relay and sink share the machine's cores",
        args.messages, args.size, args.domains, args.sessions
    )?;
    writeln!(
        md,
        "- gannet: 250 after fdatasync, MX from unbound (one site per domain); postfix: relay with a transport map to the sink (fsync per queue file)\n"
    )?;
    writeln!(
        md,
        "| system | msgs/s end to end | × pipe | injection done (s) | last delivery (s) | server CPU ms / msg | sink CPU ms / msg | peak RSS MiB |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|---|")?;
    let pipe = runs
        .iter()
        .find(|r| r.system.starts_with("pipe"))
        .map(|r| r.rate(args.messages));
    for run in &runs {
        let ratio = pipe.map_or("—".into(), |p| {
            format!("{:.0}%", run.rate(args.messages) / p * 100.0)
        });
        let cpu = if run.system.starts_with("pipe") {
            "—".to_string()
        } else {
            format!("{:.3}", run.server_cpu_s * 1000.0 / args.messages as f64)
        };
        writeln!(
            md,
            "| {} | {:.0} | {ratio} | {:.1} | {:.1} | {cpu} | {:.3} | {} |",
            run.system,
            run.rate(args.messages),
            run.injected_s,
            run.seconds,
            run.sink_cpu_s * 1000.0 / args.messages as f64,
            run.peak_rss_kb
                .map_or("—".into(), |kb| format!("{:.0}", kb as f64 / 1024.0)),
        )?;
    }
    // Listed runs against the mean of the same gannet's runs without listing.
    let mean = |rates: &[f64]| rates.iter().sum::<f64>() / rates.len().max(1) as f64;
    for run in &runs {
        if let Some((n, ms)) = run.listings {
            let name = run.system.split(", listing").next().unwrap_or("");
            let plain: Vec<f64> = (runs.iter())
                .filter(|r| r.listings.is_none() && r.system == name)
                .map(|r| r.rate(args.messages))
                .collect();
            let ratio = if plain.is_empty() {
                "—".into()
            } else {
                format!("{:.2}×", run.rate(args.messages) / mean(&plain))
            };
            writeln!(
                md,
                "\n{}: {n} listings of every queue answered during the run, {ms:.1} ms each on average; throughput {ratio} the mean of the same gannet's runs without listing.",
                run.system
            )?;
        }
    }
    for run in &runs {
        if let Some(hose) = &run.hose {
            let name = run.system.split(", hose").next().unwrap_or("");
            let plain: Vec<f64> = (runs.iter())
                .filter(|r| r.hose.is_none() && r.listings.is_none() && r.system == name)
                .map(|r| r.rate(args.messages))
                .collect();
            let plain_cpu: Vec<f64> = (runs.iter())
                .filter(|r| r.hose.is_none() && r.listings.is_none() && r.system == name)
                .map(|r| r.server_cpu_s * 1000.0 / args.messages as f64)
                .collect();
            let (ratio, cpu) = if plain.is_empty() {
                ("—".into(), "—".into())
            } else {
                (
                    format!("{:.3}×", run.rate(args.messages) / mean(&plain)),
                    format!("{:.3}", mean(&plain_cpu)),
                )
            };
            writeln!(
                md,
                "\n{}: the webhooks got {} and {} events, every sink had caught up {:.2} s after the last delivery; gannetd's hose threads used {:.3} ms of CPU per message ({:.1}% of gannetd's), the broker {:.3} ms; throughput {ratio} the mean of the same gannet's runs without the hose (server CPU {:.3} ms/msg against {cpu}).",
                run.system,
                hose.webhook_events[0],
                hose.webhook_events[1],
                hose.caught_up_s,
                hose.hose_cpu_s * 1000.0 / args.messages as f64,
                hose.hose_cpu_s / run.server_cpu_s.max(1e-9) * 100.0,
                hose.broker_cpu_s * 1000.0 / args.messages as f64,
                run.server_cpu_s * 1000.0 / args.messages as f64,
            )?;
        }
    }
    // The Metrics API's tally: its thread's CPU, and plain runs with it against
    // runs without it.
    let tallied: Vec<&Run> = (runs.iter())
        .filter(|r| r.tally_cpu_s.is_some() && r.hose.is_none() && r.listings.is_none())
        .collect();
    let untallied: Vec<f64> = (runs.iter())
        .filter(|r| r.system.ends_with(UNTALLIED))
        .map(|r| r.rate(args.messages))
        .collect();
    if !tallied.is_empty() && !untallied.is_empty() {
        let cpu: f64 = tallied.iter().filter_map(|r| r.tally_cpu_s).sum();
        let server: f64 = tallied.iter().map(|r| r.server_cpu_s).sum();
        let rates: Vec<f64> = tallied.iter().map(|r| r.rate(args.messages)).collect();
        writeln!(
            md,
            "\nMetrics API tally: its thread used {:.4} ms of CPU per message ({:.1}% of gannetd's) in the runs with it; their throughput was {:.3}× the mean of the runs without it.",
            cpu * 1000.0 / (args.messages as f64 * tallied.len() as f64),
            cpu / server.max(1e-9) * 100.0,
            mean(&rates) / mean(&untallied),
        )?;
    }
    // MTA-STS enforce for every domain against opportunistic TLS without policies.
    let with_tls = |what: &str| -> Vec<&Run> {
        (runs.iter())
            .filter(|r| r.tls.is_some() && r.system.contains(what))
            .collect()
    };
    let (sts, plain_tls) = (with_tls("MTA-STS enforce"), with_tls("no MTA-STS policy"));
    if !sts.is_empty() && !plain_tls.is_empty() {
        let rates =
            |runs: &[&Run]| -> Vec<f64> { runs.iter().map(|r| r.rate(args.messages)).collect() };
        let cpu = |runs: &[&Run]| -> Vec<f64> {
            (runs.iter())
                .map(|r| r.server_cpu_s * 1000.0 / args.messages as f64)
                .collect()
        };
        let fetched: Vec<String> = (sts.iter())
            .filter_map(|r| r.tls.as_ref())
            .map(|t| {
                format!(
                    "{:.0} ({:.0} in the timed run)",
                    t.policies_fetched, t.policies_fetched_in_run
                )
            })
            .collect();
        let sessions: Vec<String> = (runs.iter())
            .filter_map(|r| r.tls.as_ref())
            .map(|t| t.tls_sessions.to_string())
            .collect();
        writeln!(
            md,
            "\nMTA-STS enforce for every domain, cache warm: {} runs at {:.0} msgs/s on average against {:.0} for {} runs of opportunistic TLS with no policy: {:.3}× (server CPU {:.3} against {:.3} ms/msg). Policies fetched per enforce run: {}; served by the bench's HTTPS server in all: {}. TLS sessions at the sink per run, in order: {}.",
            sts.len(),
            mean(&rates(&sts)),
            mean(&rates(&plain_tls)),
            plain_tls.len(),
            mean(&rates(&sts)) / mean(&rates(&plain_tls)),
            mean(&cpu(&sts)),
            mean(&cpu(&plain_tls)),
            fetched.join(", "),
            policies_served.unwrap_or(0),
            sessions.join(", "),
        )?;
    }
    if let Some((anon, file)) = queued {
        writeln!(
            md,
            "\nMemory per queued message (gannet, delivery suspended, {} messages queued): {anon:.0} bytes anonymous (the envelope in memory), {file:.0} bytes of mapped spool pages resident (the body, in the page cache).",
            args.queued_messages
        )?;
    }
    print!("{md}");
    append_results(&args.results, &md)?;
    Ok(())
}
