//! smtp-accept-bench: SMTP acceptance with a durable ack, side by side.
//!
//! The same load — N messages of a given size, S concurrent sessions, a new
//! connection per message — is offered to:
//! - `sink`: postfix's smtp-sink, which stores nothing (the direct source→sink pipe:
//!   the limit of this machine with no MTA in the way);
//! - `gannet`: gannetd, which says 250 only after the message is fdatasynced;
//! - `postfix`: Postfix with delivery deferred, so it only accepts and queues (it
//!   fsyncs every queue file).
//!
//! Two drivers offer the load: postfix's smtp-source (an independent client) and a
//! client built in here that also measures the accept latency (end of data → 250).
//! A fixed-rate pass offers every system half of the first system's (gannet's) peak
//! rate and reports the latency there.
//! For every run it reports msgs/s, the ratio to the direct pipe, server CPU seconds
//! per 1000 messages and device flushes per message, and appends a markdown report to
//! bench/RESULTS.md.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Parser;
use gannet_bench::servers::{self, Server};
use gannet_bench::{
    append_results, command_line, command_output, device_flushes, gannet_metric, machine,
    tree_cpu_seconds,
};
use hdrhistogram::Histogram;

#[derive(Debug, Parser)]
#[command(
    about = "SMTP acceptance with durable ack: gannet vs postfix vs the direct source→sink pipe"
)]
struct Args {
    /// Messages per run.
    #[arg(long, default_value_t = 50_000)]
    messages: u64,
    /// Concurrent sessions.
    #[arg(long, default_value_t = 50)]
    sessions: u64,
    /// Message size in bytes.
    #[arg(long, default_value_t = 10_240)]
    size: usize,
    /// Systems to run, in order. The first system's peak sets the rate of the
    /// fixed-rate passes, which every system gets.
    #[arg(long, value_delimiter = ',', default_value = "gannet,sink,postfix")]
    systems: Vec<String>,
    /// gannetd shard counts to run (0: one per core). With the load generator on the
    /// same machine, fewer shards than cores leave it a core.
    #[arg(long, value_delimiter = ',', default_value = "1,0")]
    gannet_shards: Vec<usize>,
    /// Drivers to use.
    #[arg(long, value_delimiter = ',', default_value = "smtp-source,builtin")]
    drivers: Vec<String>,
    /// Extra `[server]` keys for gannetd, e.g. "spin_before_park_us = 50".
    #[arg(long, default_value = "")]
    gannet_server_extra: String,
    /// The gannetd binary.
    #[arg(long, default_value = "target/release/gannetd")]
    gannetd: PathBuf,
    /// An earlier gannetd, run as system `gannet-baseline` (same shard counts) to
    /// compare before and after in one run.
    #[arg(long)]
    baseline_gannetd: Option<PathBuf>,
    /// Extra `[server]` keys (or whole sections) for gannet-baseline instead of
    /// --gannet-server-extra, e.g. "[spool]\ncommit_gather_max_us = 0" to compare one
    /// binary with itself under another setting.
    #[arg(long)]
    baseline_server_extra: Option<String>,
    /// Scratch directory for gannet's data (on the disk being measured).
    #[arg(long, default_value = "/tmp/gannet-smtp-bench")]
    dir: PathBuf,
    /// Messages for the half-load latency pass (0 skips it).
    #[arg(long, default_value_t = 20_000)]
    half_load_messages: u64,
    /// Markdown report appended here ("" to skip).
    #[arg(long, default_value = "bench/RESULTS.md")]
    results: String,
}

fn start_sink() -> Result<Server> {
    servers::smtp_sink(&[], false)
}

fn start_gannet(args: &Args, shards: usize, baseline: bool) -> Result<Server> {
    let binary = match (&args.baseline_gannetd, baseline) {
        (Some(binary), true) => binary,
        (None, true) => bail!("system gannet-baseline needs --baseline-gannetd"),
        (_, false) => &args.gannetd,
    };
    let extra = match (&args.baseline_server_extra, baseline) {
        (Some(extra), true) => extra,
        _ => &args.gannet_server_extra,
    };
    let mut server = servers::gannetd(
        binary,
        &args.dir,
        shards,
        extra,
        "[delivery]\nsuspended = true\n",
    )?;
    if baseline {
        server.name = server.name.replacen("gannet", "gannet-baseline", 1);
    }
    Ok(server)
}

/// The system Postfix accepting on a free port and only queueing (delivery deferred).
fn start_postfix(args: &Args) -> Result<Server> {
    servers::postfix(
        args.sessions,
        args.size * 4,
        &[
            "relayhost = [127.0.0.1]:9".into(),
            "defer_transports = smtp".into(),
        ],
    )
}

/// What one run measured.
#[derive(Debug)]
struct Run {
    system: String,
    driver: &'static str,
    messages: u64,
    errors: u64,
    seconds: f64,
    server_cpu_s: f64,
    flushes: u64,
    /// gannetd only: its syncs during the run, and the share of them whose batch was
    /// held to gather more (the core was busy).
    syncs: Option<(f64, f64)>,
    /// End of data → 250, microseconds (built-in driver only).
    accept: Option<Histogram<u64>>,
}

impl Run {
    fn msgs_per_s(&self) -> f64 {
        self.messages as f64 / self.seconds
    }

    fn json(&self, pipe: Option<f64>) -> serde_json::Value {
        let q = |q: f64| self.accept.as_ref().map(|h| h.value_at_quantile(q));
        serde_json::json!({
            "system": self.system, "driver": self.driver, "messages": self.messages,
            "errors": self.errors, "msgs_per_s": self.msgs_per_s().round(),
            "of_direct_pipe": pipe.map(|p| (self.msgs_per_s() / p * 1000.0).round() / 1000.0),
            "server_cpu_s_per_1000_msgs": (self.server_cpu_s / self.messages.max(1) as f64 * 1000.0 * 1e4).round() / 1e4,
            "flushes_per_msg": (self.flushes as f64 / self.messages.max(1) as f64 * 1e3).round() / 1e3,
            "syncs_per_msg": self.syncs.map(|(n, _)| (n / self.messages.max(1) as f64 * 1e3).round() / 1e3),
            "syncs_gathered": self.syncs.map(|(_, share)| (share * 1e3).round() / 1e3),
            "accept_latency_us_p50": q(0.5), "accept_latency_us_p99": q(0.99),
        })
    }
}

fn smtp_source(args: &Args, port: u16) -> Result<u64> {
    let out = Command::new("/usr/sbin/smtp-source")
        .args([
            "-s",
            &args.sessions.to_string(),
            "-m",
            &args.messages.to_string(),
            "-l",
            &args.size.to_string(),
            "-f",
            "bench@source.test",
            "-t",
            "rcpt@sink.test",
            &format!("127.0.0.1:{port}"),
        ])
        .output()
        .context("running smtp-source (install postfix)")?;
    if !out.status.success() {
        bail!(
            "smtp-source failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // smtp-source stops at the first error, so a success is every message accepted.
    Ok(0)
}

/// The message the built-in driver sends: headers and 76-column lines up to `size`.
fn message(size: usize) -> Vec<u8> {
    let mut m =
        b"From: <bench@source.test>\r\nTo: <rcpt@sink.test>\r\nSubject: benchmark\r\n\r\n".to_vec();
    let line = [b'x'; 76];
    while m.len() + 78 <= size {
        m.extend_from_slice(&line);
        m.extend_from_slice(b"\r\n");
    }
    m.extend_from_slice(b".\r\n");
    m
}

fn read_reply(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<u16> {
    loop {
        if let Some(lf) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=lf).collect();
            if line.len() >= 4 && line[3] == b'-' {
                continue;
            }
            let code = std::str::from_utf8(&line[..3.min(line.len())])?.parse()?;
            return Ok(code);
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            bail!("connection closed");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// One message on a new connection; returns the accept latency in µs.
fn transaction(port: u16, body: &[u8]) -> Result<u64> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut buf = Vec::with_capacity(1024);
    let mut step = |s: &mut TcpStream, cmd: &[u8], want: u16| -> Result<()> {
        if !cmd.is_empty() {
            s.write_all(cmd)?;
        }
        let code = read_reply(s, &mut buf)?;
        if code != want {
            bail!("expected {want}, got {code}");
        }
        Ok(())
    };
    step(&mut s, b"", 220)?;
    step(&mut s, b"EHLO bench.test\r\n", 250)?;
    step(&mut s, b"MAIL FROM:<bench@source.test>\r\n", 250)?;
    step(&mut s, b"RCPT TO:<rcpt@sink.test>\r\n", 250)?;
    step(&mut s, b"DATA\r\n", 354)?;
    s.write_all(&body[..body.len() - 3])?;
    let t0 = Instant::now();
    step(&mut s, b".\r\n", 250)?;
    let accept = t0.elapsed().as_micros() as u64;
    s.write_all(b"QUIT\r\n")?;
    Ok(accept)
}

/// The built-in driver: `sessions` threads, each a new connection per message. With
/// `rate`, messages start on a fixed schedule (open loop) instead of back to back.
fn builtin(
    args: &Args,
    port: u16,
    messages: u64,
    rate: Option<f64>,
) -> Result<(u64, Histogram<u64>)> {
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let body = Arc::new(message(args.size));
    let start = Instant::now();
    let workers: Vec<_> = (0..args.sessions)
        .map(|_| {
            let (next, errors, body) = (next.clone(), errors.clone(), body.clone());
            std::thread::spawn(move || {
                let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= messages {
                        break;
                    }
                    if let Some(rate) = rate {
                        let due = start + Duration::from_secs_f64(n as f64 / rate);
                        if let Some(wait) = due.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                    }
                    match transaction(port, &body) {
                        Ok(us) => {
                            let _ = hist.record(us.max(1));
                        }
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                hist
            })
        })
        .collect();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for worker in workers {
        hist.add(
            worker
                .join()
                .map_err(|_| anyhow!("a driver thread panicked"))?,
        )?;
    }
    Ok((errors.load(Ordering::Relaxed), hist))
}

fn measure(
    args: &Args,
    server: &Server,
    driver: &'static str,
    messages: u64,
    rate: Option<f64>,
) -> Result<Run> {
    let disk = if args.dir.exists() {
        args.dir.clone()
    } else {
        PathBuf::from("/")
    };
    let cpu0 = tree_cpu_seconds(server.pid);
    let flushes0 = device_flushes(&disk);
    let syncs0 = gannet_syncs(server);
    let t0 = Instant::now();
    let (errors, accept) = match driver {
        "smtp-source" => (smtp_source(args, server.port)?, None),
        _ => {
            let (errors, hist) = builtin(args, server.port, messages, rate)?;
            (errors, Some(hist))
        }
    };
    let seconds = t0.elapsed().as_secs_f64();
    let server_cpu_s = tree_cpu_seconds(server.pid) - cpu0;
    let flushes = device_flushes(&disk) - flushes0;
    // gannetd copies its spool counters into the metrics every 100 ms; one without
    // them (an older baseline) shows none.
    let syncs = syncs0.and_then(|(syncs0, gathered0)| {
        std::thread::sleep(Duration::from_millis(300));
        let (syncs, gathered) = gannet_syncs(server)?;
        if syncs == 0.0 {
            return None;
        }
        let syncs = syncs - syncs0;
        Some((syncs, (gathered - gathered0) / syncs.max(1.0)))
    });
    Ok(Run {
        system: server.name.clone(),
        driver,
        messages,
        errors,
        seconds,
        server_cpu_s,
        flushes,
        syncs,
        accept,
    })
}

/// gannetd's spool syncs so far and those that gathered (None for other systems).
fn gannet_syncs(server: &Server) -> Option<(f64, f64)> {
    if !server.name.starts_with("gannet") {
        return None;
    }
    let http = std::net::SocketAddr::from(([127, 0, 0, 1], server.http_port));
    let syncs = gannet_metric(http, "spool_syncs_total").ok()?;
    let gathered = gannet_metric(http, "spool_gathered_syncs_total").ok()?;
    Some((syncs, gathered))
}

/// The direct pipe's rate with the same driver.
fn pipe_rate(runs: &[Run], driver: &str) -> Option<f64> {
    runs.iter()
        .find(|r| r.system == "sink" && r.driver == driver)
        .map(Run::msgs_per_s)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut runs: Vec<Run> = Vec::new();
    let mut fixed_rate: Option<f64> = None;
    let mut plan: Vec<(String, usize)> = Vec::new();
    for system in &args.systems {
        if system == "gannet" || system == "gannet-baseline" {
            plan.extend(args.gannet_shards.iter().map(|s| (system.clone(), *s)));
        } else {
            plan.push((system.clone(), 0));
        }
    }
    for (system, shards) in &plan {
        let server = match system.as_str() {
            "sink" => start_sink()?,
            "gannet" => start_gannet(&args, *shards, false)?,
            "gannet-baseline" => start_gannet(&args, *shards, true)?,
            "postfix" => start_postfix(&args)?,
            other => bail!("unknown system {other}"),
        };
        for driver in &args.drivers {
            let driver: &'static str = if driver == "smtp-source" {
                "smtp-source"
            } else {
                "builtin"
            };
            let run = measure(&args, &server, driver, args.messages, None)?;
            println!("{}", run.json(pipe_rate(&runs, driver)));
            runs.push(run);
        }
        if args.half_load_messages > 0 {
            let rate = *fixed_rate.get_or_insert_with(|| {
                runs.iter()
                    .filter(|r| r.system == server.name)
                    .map(Run::msgs_per_s)
                    .fold(0.0, f64::max)
                    / 2.0
            });
            let mut run = measure(
                &args,
                &server,
                "builtin",
                args.half_load_messages,
                Some(rate),
            )?;
            run.driver = "builtin, fixed rate";
            println!("{}", run.json(None));
            runs.push(run);
        }
        server.stop()?;
    }
    let _ = std::fs::remove_dir_all(&args.dir);

    let mut md = String::new();
    use std::fmt::Write as _;
    let rev = command_output("git", &["rev-parse", "--short", "HEAD"]);
    let date = command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let command = command_line();
    writeln!(md, "\n## SMTP acceptance with durable ack — {date}\n")?;
    writeln!(md, "- command: `{command}`")?;
    writeln!(md, "- machine: {}", machine())?;
    writeln!(
        md,
        "- revision: {rev}; {} messages of {} bytes per run, {} concurrent sessions, a new connection per message; load generators run on the same 2 cores",
        args.messages, args.size, args.sessions
    )?;
    if let Some(rate) = fixed_rate {
        writeln!(
            md,
            "- fixed rate: {rate:.0} msgs/s offered to every system (half of the first system's peak), {} messages",
            args.half_load_messages
        )?;
    }
    writeln!(
        md,
        "- sink = postfix smtp-sink (stores nothing: the direct source→sink pipe); gannet = gannetd, 250 after fdatasync (group commit); postfix = Postfix with delivery deferred (fsync per message)"
    )?;
    if let Some(baseline) = &args.baseline_gannetd {
        let extra = match &args.baseline_server_extra {
            Some(extra) => format!(" with `{}`", extra.replace('\n', " ")),
            None => String::new(),
        };
        writeln!(md, "- gannet-baseline = {}{extra}", baseline.display())?;
    }
    writeln!(md)?;
    writeln!(
        md,
        "| system | driver | msgs/s | × direct pipe | server CPU s / 1000 msgs | device flushes / msg | spool syncs / msg (gathered) | accept p50 / p99 µs | errors |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|---|---|")?;
    for run in &runs {
        // A fixed-rate run is not compared: every system was offered the same rate.
        let pipe = if run.driver == "builtin" || run.driver == "smtp-source" {
            pipe_rate(&runs, run.driver)
        } else {
            None
        };
        let j = run.json(pipe);
        let latency = match &run.accept {
            Some(h) => format!(
                "{} / {}",
                h.value_at_quantile(0.5),
                h.value_at_quantile(0.99)
            ),
            None => "—".into(),
        };
        let syncs = match run.syncs {
            Some((n, gathered)) => format!(
                "{:.3} ({:.0}%)",
                n / run.messages.max(1) as f64,
                gathered * 100.0
            ),
            None => "—".into(),
        };
        writeln!(
            md,
            "| {} | {} | {:.0} | {} | {} | {} | {syncs} | {latency} | {} |",
            run.system,
            run.driver,
            run.msgs_per_s(),
            j["of_direct_pipe"]
                .as_f64()
                .map_or("—".into(), |r| format!("{:.0}%", r * 100.0)),
            j["server_cpu_s_per_1000_msgs"],
            j["flushes_per_msg"],
            run.errors,
        )?;
    }
    print!("{md}");
    append_results(&args.results, &md)?;
    Ok(())
}
