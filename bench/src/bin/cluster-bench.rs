//! cluster-bench: what sharing a node's throttles through Redis costs its relay.
//!
//! The same SMTP load (gannet-blast, a new connection every `--per-connection`
//! messages) is relayed by gannetd on one shard to postfix's smtp-sink by a static
//! route, its ready queue shaped by a message rate, a connection rate and a
//! connection limit that do not bind (the cost of keeping them is measured, not of
//! waiting for them):
//! - `local`: the throttles kept by the node alone;
//! - `shared`: the same throttles shared through a Redis (`[cluster] redis_url`,
//!   redis-server started here): tokens leased in batches, connections claimed;
//! - `local+limits`, `shared+limits`: each with a limit over several queues besides
//!   (`[delivery.limits]`, per source; not binding either), kept by the node's
//!   in-process store or through Redis: every message takes a token of the queue's
//!   rate and of the limit's, every connection claims from both.
//!
//! Systems run `--rounds` times, interleaved; the median is kept: messages relayed
//! per second (from the first injected to the last delivered), gannetd's CPU µs per
//! message, and for `shared` the link's calls to Redis and the commands Redis
//! counted (`INFO stats`, total_commands_processed: each script's call and the
//! commands it runs inside Redis) per delivered message. Goal (issue 22): `shared`
//! within 10% of `local`'s throughput. Results go to bench/RESULTS.md.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use gannet_bench::{append_results, command_line, command_output, machine, servers};
use gannet_tools::plan::calibrate::{confine, process_cpu_seconds};

#[derive(Debug, Parser)]
#[command(about = "Relay throughput with throttles shared through Redis against local ones")]
struct Args {
    /// Messages per round.
    #[arg(long, default_value_t = 40_000)]
    messages: u64,
    /// Rounds per system (interleaved; the median is kept).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Messages per connection.
    #[arg(long, default_value_t = 20)]
    per_connection: u64,
    #[arg(long, default_value = "local,shared,local+limits,shared+limits")]
    systems: String,
    #[arg(long, default_value = "target/release/gannetd")]
    gannetd: PathBuf,
    #[arg(long, default_value = "target/release/gannet-blast")]
    blast: PathBuf,
    #[arg(long, default_value = "/tmp/gannet-cluster-bench")]
    dir: PathBuf,
    /// Markdown report appended here ("" to skip).
    #[arg(long, default_value = "bench/RESULTS.md")]
    results: String,
}

/// Limits that do not bind at this machine's rates, so the cost measured is that
/// of keeping them.
const SHAPING: &str = "[delivery.shaping]\nmax_message_rate = \"1000000/s\"\n\
                       max_connection_rate = \"100000/s\"\nconnection_limit = 32\n";

/// A limit over several queues, per source, that does not bind either.
const LIMITS: &str = "[delivery.limits.per-ip]\nper = \"source\"\nconnection_limit = 1000\n\
                      max_message_rate = \"1000000/s\"\nmax_connection_rate = \"100000/s\"\n";

/// One round's figures.
#[derive(Debug, Clone, Copy, Default)]
struct Measured {
    /// Messages relayed per second.
    rate: f64,
    cpu_us: f64,
    /// Per delivered message: the link's calls, and the commands Redis counted.
    calls: f64,
    commands: f64,
}

/// redis-server on a free loopback port, confined to core 1 with the load.
struct Redis {
    child: std::process::Child,
    port: u16,
}

impl Redis {
    fn start(dir: &std::path::Path) -> Result<Redis> {
        std::fs::create_dir_all(dir)?;
        let (child, port) = gannet_bench::peers::spawn_listening(|port| {
            let mut command = Command::new("redis-server");
            command
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            command
        });
        confine(child.id(), 1);
        Ok(Redis { child, port })
    }

    /// `total_commands_processed` from `INFO stats` (over RESP, no client library).
    fn commands(&self) -> Result<u64> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(b"*2\r\n$4\r\nINFO\r\n$5\r\nstats\r\n")?;
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        while reader.read_line(&mut line)? > 0 {
            if let Some(n) = line.trim_end().strip_prefix("total_commands_processed:") {
                return Ok(n.parse()?);
            }
            line.clear();
        }
        bail!("redis INFO stats has no total_commands_processed")
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One round of `system`.
fn round(args: &Args, system: &str, redis: &Redis) -> Result<Measured> {
    let dir = args.dir.join(system.replace('+', "-"));
    let (base, limits) = match system.strip_suffix("+limits") {
        Some(base) => (base, LIMITS),
        None => (system, ""),
    };
    let cluster = match base {
        "local" => String::new(),
        "shared" => format!(
            "[cluster]\nredis_url = \"redis://127.0.0.1:{}/\"\n",
            redis.port
        ),
        other => bail!("no system {other} (local, shared, local+limits, shared+limits)"),
    };
    let sink = servers::smtp_sink(&[], false)?;
    confine(sink.pid, 1);
    let rest = format!(
        "[delivery]\nroutes = {{ \"ok.test\" = [\"127.0.0.1:{}\"] }}\n{SHAPING}{limits}{cluster}",
        sink.port
    );
    let server = servers::gannetd(&args.gannetd, &dir, 1, "pin_cores = false", &rest)?;
    confine(server.pid, 0);
    let http = SocketAddr::from(([127, 0, 0, 1], server.http_port));
    if base == "shared" {
        // The link up before the load, as a running node's is.
        let deadline = Instant::now() + Duration::from_secs(10);
        while gannet_bench::gannet_metric(http, "cluster_redis_up")? < 1.0 {
            if Instant::now() > deadline {
                bail!("gannetd's cluster link never came up");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let (cpu0, calls0, commands0) = (
        process_cpu_seconds(server.pid),
        gannet_bench::gannet_metric(http, "cluster_redis_calls_total")?,
        redis.commands()?,
    );
    let started = Instant::now();
    let result = gannet_bench::blast_on_core_1(
        &args.blast,
        server.port,
        args.messages,
        args.per_connection,
        "ok.test:100",
    )
    .with_context(|| system.to_string())?;
    let accepted = result["recipients_accepted"].as_f64().unwrap_or(0.0);
    gannet_bench::wait_delivered(http, accepted).with_context(|| system.to_string())?;
    let seconds = started.elapsed().as_secs_f64();
    let cpu = process_cpu_seconds(server.pid) - cpu0;
    let calls = gannet_bench::gannet_metric(http, "cluster_redis_calls_total")? - calls0;
    let commands = (redis.commands()? - commands0) as f64;
    server.stop()?;
    sink.stop()?;
    Ok(Measured {
        rate: accepted / seconds,
        cpu_us: cpu * 1e6 / accepted,
        calls: calls / accepted,
        commands: commands / accepted,
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    for bin in [&args.gannetd, &args.blast] {
        if !bin.exists() {
            bail!("{} is missing: cargo build --release", bin.display());
        }
    }
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        bail!("cluster-bench needs two cores: gannetd on one, the load on the other");
    }
    servers::install_bench_peers()?;
    let redis = Redis::start(&args.dir.join("redis"))?;
    let systems: Vec<&str> = args.systems.split(',').collect();
    let mut measured: Vec<Vec<Measured>> = vec![Vec::new(); systems.len()];
    for r in 0..args.rounds {
        for (i, system) in systems.iter().enumerate() {
            let m = round(&args, system, &redis)?;
            eprintln!(
                "round {r} {system}: {:.0} msgs/s, {:.1} µs/msg, {:.4} calls/msg, {:.4} Redis commands/msg",
                m.rate, m.cpu_us, m.calls, m.commands
            );
            measured[i].push(m);
        }
    }
    let median = |v: Vec<f64>| gannet_bench::harness::median_range(&v).0;
    let rows: Vec<(&str, Measured)> = systems
        .iter()
        .zip(&measured)
        .map(|(system, m)| {
            let of = |f: fn(&Measured) -> f64| median(m.iter().map(f).collect());
            let row = Measured {
                rate: of(|x| x.rate),
                cpu_us: of(|x| x.cpu_us),
                calls: of(|x| x.calls),
                commands: of(|x| x.commands),
            };
            (*system, row)
        })
        .collect();

    use std::fmt::Write as _;
    let mut md = String::new();
    let rev = command_output("git", &["rev-parse", "--short", "HEAD"]);
    let date = command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    writeln!(md, "\n## Shared throttles through Redis — {date}\n")?;
    writeln!(md, "- command: `{}`", command_line())?;
    writeln!(md, "- machine: {}", machine())?;
    writeln!(
        md,
        "- revision: {rev}; gannetd on one shard confined to core 0 relaying to smtp-sink by a static route; gannet-blast, smtp-sink and redis-server on core 1: {} messages of 4 KiB per round, 32 connections of {} messages; message rate, connection rate and connection limit set but not binding; {} interleaved rounds, medians\n",
        args.messages, args.per_connection, args.rounds
    )?;
    writeln!(
        md,
        "| system | msgs/s relayed | against local | gannetd CPU µs per message | link calls per message | Redis commands per message |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|")?;
    let local = rows.iter().find(|r| r.0 == "local").map(|r| r.1);
    for (system, m) in &rows {
        let against = local.map_or("—".to_string(), |l| {
            format!("{:+.1}%", (m.rate / l.rate - 1.0) * 100.0)
        });
        writeln!(
            md,
            "| {system} | {:.0} | {against} | {:.1} | {:.4} | {:.4} |",
            m.rate, m.cpu_us, m.calls, m.commands
        )?;
    }
    writeln!(
        md,
        "\nGoal: `shared` within 10% of `local`'s throughput. `+limits`: a limit over several queues (per source) kept besides."
    )?;
    print!("{md}");
    append_results(&args.results, &md)?;
    drop(redis);
    let _ = std::fs::remove_dir_all(&args.dir);
    Ok(())
}
