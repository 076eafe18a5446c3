//! backlog-bench: a campaign queued behind a provider's block, then the block lifts.
//!
//! 1. Fresh relay: gannetd relays `--fresh-messages` to an accepting gannet-sink; the
//!    rate (blast start → the sink has them all) is the reference for the drain.
//! 2. The block: on a new data directory, gannet-sink answers 451 to every recipient
//!    and gannetd (retries an hour apart) gets `--messages` of `--size` to
//!    `--domains` domains from gannet-blast; each is tried once and deferred.
//! 3. The wait: with the whole campaign deferred, gannetd's anonymous memory per
//!    queued message (RssAnon after, minus before the injection — the bodies are in
//!    the spool's file mapping, not counted) and its CPU over `--idle-secs`.
//! 4. A restart: SIGTERM, then gannetd starts again on the same ports and data;
//!    the time until it listens is the recovery of the whole backlog.
//! 5. The block lifts: the sink is replaced by an accepting one on the same port and
//!    the operator asks for a retry of every queue (POST /api/admin/retry/v1); the
//!    time until the sink has every message gives the drain rate, compared with 1.
//!
//! Everything runs on loopback, bounded by the counts given; results are appended to
//! bench/RESULTS.md.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use gannet_bench::harness::Sink;
use gannet_bench::servers::start_gannetd;
use gannet_bench::{
    append_results, command_line, command_output, free_port, gannet_metric, http_request, machine,
    proc_status_kb, tree_cpu_seconds,
};

/// The admin key the bench gives gannetd (a benchmark's own, on loopback).
const ADMIN_KEY: &str = "backlog-bench-admin-key-5e0c7a91";

#[derive(Debug, Parser)]
#[command(
    about = "a million-message backlog: memory, idle CPU, restart, and the drain after a block"
)]
struct Args {
    /// Messages queued behind the block.
    #[arg(long, default_value_t = 1_000_000)]
    messages: u64,
    /// Messages of the fresh-relay reference.
    #[arg(long, default_value_t = 100_000)]
    fresh_messages: u64,
    /// Message size (gannet-blast syntax).
    #[arg(long, default_value = "5k")]
    size: String,
    /// Destination domains.
    #[arg(long, default_value_t = 1000)]
    domains: u64,
    /// Injecting sessions (gannet-blast), and connections gannetd may open to the sink.
    #[arg(long, default_value_t = 50)]
    sessions: u64,
    /// How long the deferred backlog is watched for CPU use.
    #[arg(long, default_value_t = 10)]
    idle_secs: u64,
    #[arg(long, default_value = "target/release/gannetd")]
    gannetd: PathBuf,
    #[arg(long, default_value = "target/release/gannet-sink")]
    sink: PathBuf,
    #[arg(long, default_value = "target/release/gannet-blast")]
    blast: PathBuf,
    /// Scratch directory (on the disk being measured).
    #[arg(long, default_value = "/tmp/gannet-backlog-bench")]
    dir: PathBuf,
    /// Markdown report appended here ("" to skip).
    #[arg(long, default_value = "bench/RESULTS.md")]
    results: String,
}

/// gannetd on fixed loopback ports and a data directory that survives restarts.
struct Gannetd {
    child: Option<Child>,
    config: PathBuf,
    data: PathBuf,
    binary: PathBuf,
    http: SocketAddr,
    /// The SMTP listener (known once started).
    smtp: SocketAddr,
}

impl Gannetd {
    fn configure(args: &Args, dir: &Path, sink: SocketAddr) -> Result<Gannetd> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        let (smtp, http) = (free_port(), free_port());
        let data = dir.join("data");
        let config = format!(
            "[server]\nhostname = \"bench.test\"\ndata_dir = \"{}\"\n\
             [smtp]\nlisten = [\"127.0.0.1:{smtp}\"]\nsessions_per_ip_max = 100000\nsessions_max = 100000\n\
             [http]\nlisten = [\"127.0.0.1:{http}\"]\n\
             api_keys = [{{ name = \"ops\", key_sha256 = \"{}\", role = \"admin\" }}]\n\
             services = [\"admin\", \"metrics\"]\n\
             [delivery]\ntls = \"disabled\"\nroutes = {{ \"*\" = [\"{sink}\"] }}\n\
             retry_interval_secs = 3600\nmax_retry_interval_secs = 3600\n\
             shaping = {{ connection_limit = {} }}\n",
            data.display(),
            gannet_core::auth::KeyDigest::of(ADMIN_KEY),
            args.sessions,
        );
        let path = dir.join("gannetd.toml");
        std::fs::write(&path, config)?;
        Ok(Gannetd {
            child: None,
            config: path,
            data,
            binary: args.gannetd.clone(),
            http: SocketAddr::from(([127, 0, 0, 1], http)),
            smtp: SocketAddr::from(([127, 0, 0, 1], smtp)),
        })
    }

    /// Starts it; returns once it listens, with the time that took.
    fn start(&mut self) -> Result<Duration> {
        let t0 = Instant::now();
        let limit = Duration::from_secs(600);
        let (child, listeners) = start_gannetd(&self.binary, &self.config, &self.data, limit)?;
        self.child = Some(child);
        self.smtp = listeners["smtp"][0].as_str().unwrap_or("").parse()?;
        Ok(t0.elapsed())
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGTERM, and waits for it to exit.
    fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling the child we started.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            child.wait()?;
        }
        Ok(())
    }
}

impl Drop for Gannetd {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// A process's anonymous resident memory (kB): heap and stacks, not file mappings.
fn rss_anon_kb(pid: u32) -> u64 {
    proc_status_kb(pid, "RssAnon:")
}

/// Injects `messages` with gannet-blast; the injection rate.
fn blast(args: &Args, to: SocketAddr, messages: u64) -> Result<f64> {
    let out = Command::new(&args.blast)
        .args(["--server", &to.to_string()])
        .args(["--messages", &messages.to_string()])
        .args(["--concurrency", &args.sessions.to_string()])
        .args(["--size", &args.size])
        .args(["--domain-count", &args.domains.to_string()])
        .args(["--per-connection", "100", "--json-only"])
        .output()
        .context("running gannet-blast")?;
    let result: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("gannet-blast result")?;
    if result["messages_sent"].as_u64() != Some(messages) {
        bail!("gannet-blast: {result}");
    }
    Ok(result["msgs_per_s"].as_f64().unwrap_or(0.0))
}

/// Waits until the sink has received `n` messages.
fn wait_received(sink: &Sink, what: &str, limit: Duration, n: u64) -> Result<()> {
    let t0 = Instant::now();
    loop {
        let received = sink.received().unwrap_or(0);
        if received >= n {
            return Ok(());
        }
        if t0.elapsed() > limit {
            bail!("{what}: not within {limit:?} (received {received} of {n})");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// POST /api/admin/retry/v1 for every queue.
fn retry_all(http: SocketAddr) -> Result<()> {
    let body = br#"{"reason":"the provider lifted its block"}"#;
    let (status, reply) = http_request(http, "POST", "/api/admin/retry/v1", Some(ADMIN_KEY), body)?;
    if status != 202 {
        bail!(
            "retry refused ({status}): {}",
            String::from_utf8_lossy(&reply)
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let limit = Duration::from_secs(3600);
    let sink_at = SocketAddr::from(([127, 0, 0, 1], free_port()));

    // 1. The fresh-relay reference.
    let fresh = {
        let sink = Sink::start_at(&args.sink, sink_at, &[])?;
        let mut gannetd = Gannetd::configure(&args, &args.dir.join("fresh"), sink_at)?;
        gannetd.start()?;
        let t0 = Instant::now();
        blast(&args, gannetd.smtp, args.fresh_messages)?;
        let n = args.fresh_messages;
        wait_received(&sink, "fresh relay", limit, n)?;
        let rate = n as f64 / t0.elapsed().as_secs_f64();
        gannetd.stop()?;
        rate
    };
    let _ = std::fs::remove_dir_all(args.dir.join("fresh"));
    println!("fresh relay: {fresh:.0} msgs/s");

    // 2. The block.
    let refusing = Sink::start_at(&args.sink, sink_at, &["--tempfail-percent", "100"])?;
    let mut gannetd = Gannetd::configure(&args, &args.dir.join("backlog"), sink_at)?;
    gannetd.start()?;
    std::thread::sleep(Duration::from_secs(1));
    let anon_before = rss_anon_kb(gannetd.pid());
    let t0 = Instant::now();
    let inject_rate = blast(&args, gannetd.smtp, args.messages)?;
    let n = args.messages;
    // Every message tried once and deferred: all of them in the scheduled queues (the
    // sink's own counts miss the recipients of a session it closed with 421).
    let scheduled = || gannet_metric(gannetd.http, "queue_scheduled_parts").unwrap_or(0.0);
    while (scheduled() as u64) < n {
        if t0.elapsed() > limit {
            bail!(
                "not every message was deferred within {limit:?}: {}",
                scheduled()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let deferred_s = t0.elapsed().as_secs_f64();
    println!("injected at {inject_rate:.0} msgs/s; all tried and deferred after {deferred_s:.0} s");

    // 3. The wait.
    std::thread::sleep(Duration::from_secs(2));
    let anon_after = rss_anon_kb(gannetd.pid());
    let per_msg = (anon_after.saturating_sub(anon_before) * 1024) as f64 / n as f64;
    let cpu0 = tree_cpu_seconds(gannetd.pid());
    std::thread::sleep(Duration::from_secs(args.idle_secs));
    let idle_cpu = (tree_cpu_seconds(gannetd.pid()) - cpu0) / args.idle_secs as f64;
    println!(
        "memory {per_msg:.0} B/msg anonymous; idle CPU {:.2}% of a core",
        idle_cpu * 100.0
    );

    // 4. A restart.
    gannetd.stop()?;
    let recovery = gannetd.start()?;
    let anon_recovered = rss_anon_kb(gannetd.pid());
    println!("restart: listening after {:.2} s", recovery.as_secs_f64());

    // 5. The block lifts.
    drop(refusing);
    // The refusing sink's closed sessions may hold the port for a moment.
    let accepting = {
        let t0 = Instant::now();
        loop {
            match Sink::start_at(&args.sink, sink_at, &[]) {
                Ok(sink) => break sink,
                Err(e) if t0.elapsed() > Duration::from_secs(60) => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    };
    let t0 = Instant::now();
    retry_all(gannetd.http)?;
    wait_received(&accepting, "the drain", limit, n)?;
    let drain = n as f64 / t0.elapsed().as_secs_f64();
    println!(
        "drain: {drain:.0} msgs/s ({:.0}% of fresh)",
        drain / fresh * 100.0
    );
    gannetd.stop()?;
    drop(accepting);
    let spool_bytes = command_output("du", &["-sb", &args.dir.to_string_lossy()]);
    let _ = std::fs::remove_dir_all(&args.dir);

    let mut md = String::new();
    use std::fmt::Write as _;
    let rev = command_output("git", &["rev-parse", "--short", "HEAD"]);
    let date = command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    writeln!(md, "\n## A backlog behind a provider's block — {date}\n")?;
    writeln!(md, "- command: `{}`", command_line())?;
    writeln!(md, "- machine: {}", machine())?;
    writeln!(
        md,
        "- revision: {rev}; {n} messages of {} to {} domains, {} sessions; gannet-sink answers 451 to every recipient, then is replaced by an accepting one; retries an hour apart, lifted by POST /api/admin/retry/v1; spool and sink on this machine's disk and cores (du of the scratch directory after the drain: {})\n",
        args.size,
        args.domains,
        args.sessions,
        spool_bytes.split_whitespace().next().unwrap_or("?"),
    )?;
    writeln!(md, "| measure | value |\n|---|---|")?;
    writeln!(
        md,
        "| injection while the sink refuses | {inject_rate:.0} msgs/s |"
    )?;
    writeln!(
        md,
        "| every message tried once and deferred after | {deferred_s:.0} s |"
    )?;
    writeln!(
        md,
        "| anonymous memory per queued message (RssAnon {} → {} kB; bodies are in the spool mapping) | {per_msg:.0} bytes |",
        anon_before, anon_after
    )?;
    writeln!(
        md,
        "| CPU while the backlog waits ({} s) | {:.2}% of a core |",
        args.idle_secs,
        idle_cpu * 100.0
    )?;
    writeln!(
        md,
        "| restart with the backlog: start → listening | {:.2} s ({:.2} s per million; RssAnon after {} kB) |",
        recovery.as_secs_f64(),
        recovery.as_secs_f64() * 1e6 / n as f64,
        anon_recovered
    )?;
    writeln!(
        md,
        "| fresh relay ({} messages) | {fresh:.0} msgs/s |",
        args.fresh_messages
    )?;
    writeln!(
        md,
        "| drain after the retry | {drain:.0} msgs/s ({:.0}% of fresh) |",
        drain / fresh * 100.0
    )?;
    print!("{md}");
    append_results(&args.results, &md)?;
    Ok(())
}
