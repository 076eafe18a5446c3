//! The benchmark harness: named scenarios run against gannet and its peers with the
//! same load (gannet-blast into the system, the system relaying to gannet-sink),
//! systems alternating between repetitions, and what each run measured.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::servers::{self, Server};
use crate::tree_cpu_seconds;

/// A scenario: the load and what the sink does.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: &'static str,
    pub what: &'static str,
    /// Relays deliver to the sink; otherwise systems only accept (durably).
    pub relay: bool,
    pub messages: u64,
    pub concurrency: u64,
    pub size: &'static str,
    /// Destination domains d0.test … (weights equal).
    pub domains: u64,
    /// gannet-sink arguments (faults, latency).
    pub sink_args: &'static [&'static str],
    /// Injected over HTTP as single-recipient transmissions (gannet only: the peers
    /// have no injection API).
    pub http: bool,
    /// A run lasts this long (seconds) and counts what reached the sink by then
    /// (0: it lasts until every message was delivered or tried).
    pub window_s: u64,
    /// The domains' MX is Gmail's host name (in the rig's DNS, pointing at the sink),
    /// so that provider rules apply (provider-throttling).
    pub provider_mx: bool,
}

/// The API key the harness gives gannet for HTTP scenarios.
const HTTP_KEY: &str = "harness-key-93b1c07e";

/// The scenarios at full scale; `scale` divides the message counts (tests use tiny
/// runs).
pub fn scenarios(scale: u64) -> Vec<Scenario> {
    let n = |m: u64| (m / scale.max(1)).max(20);
    vec![
        Scenario {
            name: "durable-accept",
            what: "ingress only: 10 KiB messages, a new connection per message, acknowledged once durable",
            relay: false,
            messages: n(50_000),
            concurrency: 50,
            size: "10k",
            domains: 20,
            sink_args: &[],
            http: false,
            window_s: 0,
            provider_mx: false,
        },
        Scenario {
            name: "relay",
            what: "inject → deliver: 10 KiB messages to 20 domains, timed to the last message at the sink",
            relay: true,
            messages: n(50_000),
            concurrency: 50,
            size: "10k",
            domains: 20,
            sink_args: &[],
            http: false,
            window_s: 0,
            provider_mx: false,
        },
        Scenario {
            name: "backpressure",
            what: "relay while the sink answers 5% of recipients 4xx, 1% 5xx, with 20 ms latency per phase",
            relay: true,
            messages: n(20_000),
            concurrency: 50,
            size: "10k",
            domains: 20,
            sink_args: &[
                "--tempfail-percent",
                "5",
                "--permfail-percent",
                "1",
                "--latency-ms",
                "20",
            ],
            http: false,
            window_s: 0,
            provider_mx: false,
        },
        Scenario {
            name: "many-domains",
            what: "relay to 10,000 domains (each its own MX host for gannet and KumoMTA)",
            relay: true,
            messages: n(50_000),
            concurrency: 50,
            size: "10k",
            domains: 10_000.min(n(50_000)),
            sink_args: &[],
            http: false,
            window_s: 0,
            provider_mx: false,
        },
        Scenario {
            name: "large",
            what: "relay of 100 KiB messages",
            relay: true,
            messages: n(10_000),
            concurrency: 50,
            size: "100k",
            domains: 20,
            sink_args: &[],
            http: false,
            window_s: 0,
            provider_mx: false,
        },
        Scenario {
            name: "http-inject",
            what: "inject → deliver: single-recipient SparkPost transmissions (3 KiB text) over HTTP, 100 per keep-alive connection, to 20 domains",
            relay: true,
            messages: n(50_000),
            concurrency: 50,
            size: "3k",
            domains: 20,
            sink_args: &[],
            http: true,
            window_s: 0,
            provider_mx: false,
        },
        Scenario {
            name: "provider-throttling",
            what: "relay to a provider (its MX Gmail's host name in the rig's DNS) that takes 60 messages a minute per connection and answers 421 4.7.28 past it, closing the connection; counted over a fixed window: messages delivered per minute and 421s provoked",
            relay: true,
            messages: n(20_000),
            concurrency: 50,
            size: "10k",
            domains: 1,
            sink_args: &["--messages-per-minute-per-connection", "60"],
            http: false,
            window_s: (120 / scale.max(1)).max(30),
            provider_mx: true,
        },
    ]
}

/// Where the harness finds its tools and keeps its scratch data.
#[derive(Debug, Clone)]
pub struct Tools {
    pub gannetd: PathBuf,
    pub blast: PathBuf,
    pub sink: PathBuf,
    /// The no-queue relay that opens a new connection per delivery (`forward`).
    pub forward: PathBuf,
    pub scratch: PathBuf,
    /// Where Haraka is (or gets) installed with npm.
    pub haraka: PathBuf,
    /// KumoMTA's daemon, when there is one to compare with.
    pub kumod: Option<PathBuf>,
    /// Another gannetd (an earlier build) run as `gannet-baseline` with the same
    /// configuration: a change compared with what it changed, in one run.
    pub baseline: Option<PathBuf>,
}

/// What one run measured.
#[derive(Debug, Clone)]
pub struct Run {
    pub scenario: &'static str,
    pub system: String,
    pub repetition: u64,
    /// Messages accepted by the system (the generator's count).
    pub sent: u64,
    /// Messages the sink received (relay scenarios).
    pub delivered: u64,
    /// Accepted (durable-accept) or delivered (relay) messages per second.
    pub rate: f64,
    pub seconds: f64,
    /// The generator's result (latency percentiles, errors).
    pub blast: serde_json::Value,
    pub cpu_s: f64,
    pub peak_rss_kb: u64,
    /// Flush requests the block device under the system's queue completed during the
    /// run (field 16 of its stat): what makes a 250 durable, and what it costs.
    pub flushes: u64,
    /// (seconds since start, messages at the sink or accepted so far).
    pub timeline: Vec<(f64, u64)>,
    /// Replies of 421 the sink gave (what the system provoked), and the
    /// connections it accepted.
    pub refused_421: u64,
    pub sessions: u64,
}

/// A running gannet-sink.
/// gannet-sink, stopped when dropped.
#[derive(Debug)]
pub struct Sink {
    child: Child,
    pub smtp: std::net::SocketAddr,
    pub http: std::net::SocketAddr,
}

impl Sink {
    /// Starts `binary` (gannet-sink) on a free loopback port with `args`.
    pub fn start(binary: &Path, args: &[&str]) -> Result<Sink> {
        Sink::start_at(binary, "127.0.0.1:0".parse()?, args)
    }

    /// Starts `binary` (gannet-sink) listening on `at` with `args`.
    pub fn start_at(binary: &Path, at: std::net::SocketAddr, args: &[&str]) -> Result<Sink> {
        let mut command = Command::new(binary);
        command.args(["--listen", &at.to_string()]).args(args);
        let (child, v) = servers::spawn_announcing(&mut command, binary)?;
        Ok(Sink {
            smtp: v["smtp"].as_str().unwrap_or("").parse()?,
            http: v["http"].as_str().unwrap_or("").parse()?,
            child,
        })
    }

    /// The sink's process.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Messages received so far.
    pub fn received(&self) -> Result<u64> {
        Ok(self.progress()?.0)
    }

    /// The sink's counters: `/total` (the message count alone, cheap to poll) or
    /// every counter (`/counts`).
    fn counters(&self, path: &str) -> Result<serde_json::Value> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(self.http)?;
        s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        Ok(serde_json::from_str(body)?)
    }

    /// Every counter of the sink (sessions, replies by code, per domain).
    pub fn totals(&self) -> Result<serde_json::Value> {
        self.counters("/counts")
    }

    /// Messages received so far, and recipients the sink has answered (accepted,
    /// refused for now or for good): once that reaches the recipients sent, every
    /// message has been tried at least once.
    pub fn progress(&self) -> Result<(u64, u64)> {
        let v = self.counters("/total")?;
        let tried = v["tried"].as_u64().unwrap_or(0);
        Ok((v["messages"].as_u64().unwrap_or(0), tried))
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        // SAFETY: signalling the child we started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// Peak resident memory of a process tree, sampled (kB).
pub fn tree_rss_kb(root: u32) -> u64 {
    let mut total = 0;
    let mut frontier = vec![root];
    let mut seen = std::collections::HashSet::new();
    while let Some(pid) = frontier.pop() {
        if !seen.insert(pid) {
            continue;
        }
        total += crate::proc_status_kb(pid, "VmRSS:");
        if let Ok(children) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
            frontier.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
    }
    total
}

/// Starts `system` for `scenario`, accepting on a loopback port and relaying to the
/// sink (or only accepting).
fn start_system(
    system: &str,
    scenario: &Scenario,
    sink: &Sink,
    tools: &Tools,
    dns_port: Option<u16>,
) -> Result<Option<Server>> {
    let sink_port = sink.smtp.port();
    let dir = tools.scratch.join("gannet");
    Ok(match system {
        "pipe" => None,
        "forward" => Some(servers::forward(&tools.forward, sink.smtp, None)?),
        "forward-dns" => Some(servers::forward(
            &tools.forward,
            sink.smtp,
            Some(dns_port.context("forward-dns runs only where the scenario has DNS")?),
        )?),
        "gannet" | "gannet-baseline" | "gannet-rules" => {
            let binary = if system != "gannet-baseline" {
                &tools.gannetd
            } else {
                tools.baseline.as_ref().context(
                    "gannet-baseline: no baseline gannetd (give --baseline-gannetd PATH)",
                )?
            };
            // As many connections to the sink as Postfix
            // (default_destination_concurrency_limit) and KumoMTA (connection_limit)
            // are given: the scenario's session count.
            let shaping = format!(
                "shaping = {{ connection_limit = {} }}\n",
                scenario.concurrency
            );
            let delivery = if !scenario.relay {
                "[delivery]\nsuspended = true\n".to_string()
            } else if let Some(dns) = dns_port {
                format!(
                    "[delivery]\ndns_server = \"127.0.0.1:{dns}\"\nsmtp_port = {sink_port}\ntls = \"disabled\"\n{shaping}"
                )
            } else {
                format!(
                    "[delivery]\ntls = \"disabled\"\nroutes = {{ \"*\" = [\"127.0.0.1:{sink_port}\"] }}\n{shaping}"
                )
            };
            // gannet-rules: the starter provider rules (tuning/providers.toml).
            let delivery = if system == "gannet-rules" {
                let rules = std::env::current_dir()?.join("tuning/providers.toml");
                if !rules.is_file() {
                    bail!(
                        "gannet-rules: {} is missing (run from the repository's root)",
                        rules.display()
                    );
                }
                format!("{delivery}provider_files = [\"{}\"]\n", rules.display())
            } else {
                delivery
            };
            let keys = if scenario.http {
                format!(
                    "api_keys = [{{ name = \"harness\", key_sha256 = \"{}\" }}]\n",
                    gannet_core::auth::KeyDigest::of(HTTP_KEY)
                )
            } else {
                String::new()
            };
            Some(servers::gannetd(
                binary,
                &dir,
                0,
                "",
                &format!("{keys}{delivery}"),
            )?)
        }
        "postfix" => {
            let settings = if scenario.relay {
                let map = tools.scratch.join("transport");
                std::fs::create_dir_all(&tools.scratch)?;
                std::fs::write(&map, format!("* smtp:[127.0.0.1]:{sink_port}\n"))?;
                vec![
                    format!("transport_maps = texthash:{}", map.display()),
                    "default_destination_concurrency_limit = 50".into(),
                ]
            } else {
                vec![
                    "relayhost = [127.0.0.1]:9".into(),
                    "defer_transports = smtp".into(),
                ]
            };
            Some(servers::postfix(
                scenario.concurrency,
                200 << 10,
                &settings,
            )?)
        }
        "haraka" => {
            if !scenario.relay {
                bail!(
                    "haraka forwards at queue time and keeps no durable queue: relay scenarios only"
                );
            }
            let domains: Vec<String> = (0..scenario.domains)
                .map(|d| format!("d{d}.test"))
                .collect();
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            Some(servers::haraka(
                &tools.haraka,
                &tools.scratch.join("haraka"),
                sink_port,
                &domains,
                cores,
            )?)
        }
        "kumomta" | "kumomta-sync" => {
            let Some(kumod) = &tools.kumod else {
                bail!("{system}: no kumod (give --kumod PATH or put kumod on PATH)");
            };
            Some(servers::kumod(
                kumod,
                &tools.scratch.join("kumomta"),
                sink_port,
                scenario.relay,
                system == "kumomta-sync",
                scenario.concurrency,
                dns_port,
            )?)
        }
        other => {
            bail!(
                "unknown system `{other}` (gannet, postfix, haraka, kumomta, kumomta-sync, pipe, forward, forward-dns)"
            )
        }
    })
}

/// Whether a system takes part in a scenario (Haraka and the forward relays have no
/// queue to accept into; only gannet has an HTTP injection API; the resolving
/// forward relay only where gannet resolves: many-domains).
pub fn applies(system: &str, scenario: &Scenario) -> bool {
    if system == "gannet-rules" || scenario.provider_mx {
        // The provider's rules against the systems that queue and retry.
        return scenario.provider_mx
            && matches!(
                system,
                "gannet" | "gannet-rules" | "gannet-baseline" | "postfix"
            );
    }
    if scenario.http {
        return system.starts_with("gannet");
    }
    if system == "forward-dns" {
        return scenario.name == "many-domains";
    }
    !matches!(system, "haraka" | "forward") || scenario.relay
}

/// Runs one scenario on one system.
pub fn run(scenario: &Scenario, system: &str, repetition: u64, tools: &Tools) -> Result<Run> {
    let sink = Sink::start(&tools.sink, scenario.sink_args)?;
    // gannet and KumoMTA find many-domains' sites through DNS (one MX host per
    // domain); Postfix and Haraka route every domain to the sink.
    let resolves = matches!(
        system,
        "gannet" | "gannet-baseline" | "gannet-rules" | "kumomta" | "kumomta-sync" | "forward-dns"
    );
    let dns = if resolves && scenario.provider_mx {
        Some(servers::provider_dns(
            &tools.scratch.join("dns"),
            scenario.domains,
        )?)
    } else if resolves && scenario.name == "many-domains" {
        Some(servers::bench_dns(
            &tools.scratch.join("dns"),
            scenario.domains,
        )?)
    } else {
        None
    };
    let server = start_system(system, scenario, &sink, tools, dns.as_ref().map(|d| d.1))?;
    let target = match &server {
        Some(s) if scenario.http => s.http_port,
        Some(s) => s.port,
        None => sink.smtp.port(),
    };
    let http_args: &[&str] = if scenario.http {
        &["--http", "--api-key", HTTP_KEY, "--per-connection", "100"]
    } else {
        &[]
    };
    let pid = server.as_ref().map(|s| s.pid);
    let cpu0 = pid.map_or(0.0, tree_cpu_seconds);
    let queue_dir = queue_dir(system, tools);
    let flushes0 = crate::device_flushes(&queue_dir);
    let start = Instant::now();
    let mut blast = Command::new(&tools.blast)
        .args(["--server", &format!("127.0.0.1:{target}"), "--json-only"])
        .args(["--messages", &scenario.messages.to_string()])
        .args(http_args)
        .args(["--concurrency", &scenario.concurrency.to_string()])
        .args([
            "--size",
            scenario.size,
            "--domain-count",
            &scenario.domains.to_string(),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", tools.blast.display()))?;
    // Sample progress (the sink's count for relays) until the generator is done and,
    // for relays, until the sink stops receiving.
    let mut timeline = Vec::new();
    let mut peak_rss_kb = 0;
    let mut blast_done = None;
    let mut last_change = (Instant::now(), u64::MAX);
    let deadline = start + Duration::from_secs(3600);
    loop {
        let at = start.elapsed().as_secs_f64();
        let (received, tried) = sink.progress().unwrap_or((0, 0));
        if let Some(pid) = pid {
            peak_rss_kb = peak_rss_kb.max(tree_rss_kb(pid));
        }
        if received + tried != last_change.1 {
            last_change = (Instant::now(), received + tried);
        }
        timeline.push((at, received));
        if blast_done.is_none() && blast.try_wait()?.is_some() {
            blast_done = Some(start.elapsed());
        }
        if scenario.window_s > 0 && start.elapsed() >= Duration::from_secs(scenario.window_s) {
            // A fixed window: what reached the sink by now counts.
            if blast_done.is_none() {
                let _ = blast.kill();
            }
            break;
        }
        if let Some(done) = blast_done {
            // A relay ends once every message reached the sink or was at least tried
            // there (a 4xx is retried on the system's own schedule, minutes later);
            // a system that stops sending for 30 s ends it too (the time is to the
            // last message received, so waiting costs the system nothing).
            let quiet = last_change.0.elapsed() > Duration::from_secs(30);
            let tried_all = received >= scenario.messages || tried >= scenario.messages;
            if !scenario.relay
                || tried_all
                || quiet
                || start.elapsed() > done + Duration::from_secs(600)
            {
                break;
            }
        }
        if Instant::now() > deadline {
            bail!("{} on {system} did not finish in an hour", scenario.name);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = blast.wait_with_output()?;
    let result: serde_json::Value = match serde_json::from_slice(&out.stdout) {
        Ok(v) => v,
        // A window that ended before the generator did: no result to read.
        Err(_) if scenario.window_s > 0 => serde_json::Value::Null,
        Err(err) => return Err(err).context("gannet-blast result"),
    };
    let totals = sink.totals().unwrap_or_default();
    let refused_421 = totals["replies"]["421"].as_u64().unwrap_or(0);
    let sessions = totals["sessions"].as_u64().unwrap_or(0);
    let cpu_s = pid.map_or(0.0, tree_cpu_seconds) - cpu0;
    let flushes = crate::device_flushes(&queue_dir).saturating_sub(flushes0);
    let sent = result["messages_sent"].as_u64().unwrap_or(0);
    let delivered = sink.received().unwrap_or(0);
    let (rate, seconds) = if scenario.window_s > 0 {
        let window = scenario.window_s as f64;
        (delivered as f64 / window, window)
    } else if scenario.relay && system != "pipe" {
        // To the last message at the sink.
        let last = timeline
            .iter()
            .find(|(_, n)| *n >= delivered)
            .map_or(0.0, |(t, _)| *t);
        (delivered as f64 / last.max(1e-3), last)
    } else {
        let s = result["seconds"].as_f64().unwrap_or(1.0);
        (sent as f64 / s.max(1e-3), s)
    };
    if !scenario.relay {
        // The accept timeline is the generator's; keep the sink's empty samples out.
        timeline.clear();
    }
    if let Some(server) = server {
        server.stop()?;
    }
    drop(sink);
    drop(dns);
    let _ = std::fs::remove_dir_all(tools.scratch.join("gannet"));
    Ok(Run {
        scenario: scenario.name,
        system: system.to_string(),
        repetition,
        sent,
        delivered,
        rate,
        seconds,
        blast: result,
        cpu_s,
        peak_rss_kb,
        flushes,
        timeline,
        refused_421,
        sessions,
    })
}

/// Where a system keeps its queue (the device whose flushes count).
fn queue_dir(system: &str, tools: &Tools) -> PathBuf {
    match system {
        "postfix" => PathBuf::from(servers::POSTFIX_INSTANCE),
        "haraka" => tools.haraka.clone(),
        "kumomta" | "kumomta-sync" => tools.scratch.join("kumomta"),
        _ => tools.scratch.clone(),
    }
}

/// Whether a system's 250 means the message is on stable storage, by its design:
/// gannet acknowledges after fdatasync, Postfix after fsync of the queue file;
/// Haraka (queue/smtp_forward) after the next hop accepted, keeping nothing itself;
/// the pipe is the sink's 250, which stores nothing. The report prints it beside the
/// measured flushes per message, so a synced and an unsynced system are never
/// compared without saying so.
pub fn durable_ack(system: &str) -> &'static str {
    match system {
        "gannet" | "gannet-baseline" => "yes (fdatasync, group commit)",
        "postfix" => "yes (fsync per message)",
        "haraka" => "no (forwards before it answers; no queue of its own)",
        "pipe" => "no (the sink stores nothing)",
        "forward" | "forward-dns" => "no (no queue: relays the sink's reply)",
        "kumomta" => "no (RocksDB write without a sync: KumoMTA's default)",
        "kumomta-sync" => "yes (msg:set_force_sync(true))",
        _ => "unknown",
    }
}

/// The median and the range of some numbers.
pub fn median_range(values: &[f64]) -> (f64, f64, f64) {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = if v.is_empty() {
        0.0
    } else if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    (mid, *v.first().unwrap_or(&0.0), *v.last().unwrap_or(&0.0))
}

/// Whether a path's parent exists (for output files).
pub fn ensure_parent(path: &Path) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    Ok(())
}
