//! gannet-bench: one command that runs the named scenarios against gannet and its
//! peers with identical load — gannet-blast injecting, gannet-sink receiving — with
//! the systems' order rotating between repetitions, and writes a markdown report
//! (medians, min–max, ratios, CPU and peak RSS) to bench/RESULTS.md and SVG charts
//! (throughput over time, latency distribution) next to it.
//!
//! Systems: `gannet`; `postfix` (the system Postfix as a relay with a transport map to
//! the sink, or accepting only with delivery deferred); `haraka` (Haraka with
//! queue/smtp_forward to the sink, relay scenarios only: it keeps no durable queue);
//! `pipe` (the generator straight into the sink: the limit); `forward` (gannet-forward:
//! a relay with no queue that opens a new connection per message) and `forward-dns`
//! (the same, finding each next hop through the rig's DNS server; many-domains only).
//! Every process started is stopped by its PID.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Parser;
use gannet_bench::harness::{self, Run, Tools, median_range};
use gannet_bench::{append_results, charts, command_line, command_output, machine};

#[derive(Debug, Parser)]
#[command(about = "Side-by-side benchmark scenarios: gannet vs Postfix vs the direct pipe")]
struct Args {
    /// Scenarios to run (durable-accept, relay, backpressure, many-domains, large,
    /// http-inject, provider-throttling).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "durable-accept,relay,backpressure,many-domains,large"
    )]
    scenarios: Vec<String>,
    /// Systems to compare: gannet, postfix, haraka, kumomta (KumoMTA's default, no
    /// sync before its 250), kumomta-sync (with msg:set_force_sync(true)), pipe,
    /// gannet-baseline (--baseline-gannetd), gannet-rules (gannet with the starter
    /// provider rules, tuning/providers.toml; provider-throttling only). Default: all
    /// but the baseline and gannet-rules, the KumoMTA pair only when there is a kumod.
    #[arg(long, value_delimiter = ',')]
    systems: Vec<String>,
    /// KumoMTA's daemon to compare with (default: `kumod` on PATH, if any).
    #[arg(long)]
    kumod: Option<PathBuf>,
    /// Runs of each system per scenario (the order rotates each time).
    #[arg(long, default_value_t = 3)]
    repetitions: u64,
    /// Divide every scenario's message count by this (1: full scale).
    #[arg(long, default_value_t = 1)]
    scale: u64,
    /// The gannetd binary.
    #[arg(long, default_value = "target/release/gannetd")]
    gannetd: PathBuf,
    /// An earlier gannetd to run beside it as system `gannet-baseline` (same
    /// configuration), so that a change is measured against what it changed in one run.
    #[arg(long)]
    baseline_gannetd: Option<PathBuf>,
    /// Scratch directory (gannet's data, Postfix's transport map).
    #[arg(long, default_value = "/tmp/gannet-bench")]
    scratch: PathBuf,
    /// Where Haraka is installed (npm install Haraka@3.3.4 when missing).
    #[arg(long, default_value = "target/haraka")]
    haraka: PathBuf,
    /// Markdown report appended here ("" to skip).
    #[arg(long, default_value = "bench/RESULTS.md")]
    results: String,
    /// Directory for the SVG charts ("" to skip).
    #[arg(long, default_value = "bench/charts")]
    charts: String,
}

fn main() -> Result<()> {
    let mut args = Args::parse();
    let kumod = gannet_bench::servers::find_kumod(args.kumod.as_deref());
    if args.systems.is_empty() {
        args.systems = ["gannet", "postfix", "haraka", "pipe"]
            .map(String::from)
            .to_vec();
        if kumod.is_some() {
            args.systems
                .splice(3..3, ["kumomta".to_string(), "kumomta-sync".to_string()]);
        }
    }
    // A system that cannot run is named before any run starts, not an hour in.
    const SYSTEMS: [&str; 10] = [
        "gannet",
        "gannet-baseline",
        "gannet-rules",
        "postfix",
        "haraka",
        "kumomta",
        "kumomta-sync",
        "pipe",
        "forward",
        "forward-dns",
    ];
    if let Some(other) = args.systems.iter().find(|s| !SYSTEMS.contains(&s.as_str())) {
        bail!("unknown system `{other}` ({})", SYSTEMS.join(", "));
    }
    if args.systems.iter().any(|s| s == "gannet-baseline") {
        match &args.baseline_gannetd {
            Some(path) if path.is_file() => {}
            Some(path) => bail!("gannet-baseline: {} is not a file", path.display()),
            None => bail!("gannet-baseline: give the earlier gannetd with --baseline-gannetd PATH"),
        }
    }
    let kumod_version = if args.systems.iter().any(|s| s.starts_with("kumomta")) {
        let Some(kumod) = &kumod else {
            bail!("kumomta: no kumod (give --kumod PATH or put kumod on PATH)");
        };
        let out = std::process::Command::new(kumod)
            .arg("--version")
            .output()
            .with_context(|| format!("running {} --version", kumod.display()))?;
        if !out.status.success() {
            bail!("{} --version failed", kumod.display());
        }
        Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        None
    };
    let here = std::env::current_exe()?
        .parent()
        .context("the binary's directory")?
        .to_path_buf();
    let tools = Tools {
        gannetd: args.gannetd.clone(),
        blast: here.join("gannet-blast"),
        sink: here.join("gannet-sink"),
        forward: here.join("gannet-forward"),
        scratch: args.scratch.clone(),
        haraka: args.haraka.clone(),
        kumod,
        baseline: args.baseline_gannetd.clone(),
    };
    // Peers the systems need (Postfix, unbound), installed when missing.
    if !std::path::Path::new("/usr/sbin/postfix").exists() || !gannet_bench::servers::has_unbound()
    {
        gannet_bench::servers::install_bench_peers()?;
    }
    for tool in [&tools.gannetd, &tools.blast, &tools.sink] {
        if !tool.exists() {
            bail!("{} is missing: cargo build --release first", tool.display());
        }
    }
    let all = harness::scenarios(args.scale);
    let mut chosen = Vec::new();
    for name in &args.scenarios {
        match all.iter().find(|s| s.name == name) {
            Some(s) => chosen.push(s.clone()),
            None => bail!("unknown scenario `{name}`"),
        }
    }
    let mut runs: Vec<Run> = Vec::new();
    for scenario in &chosen {
        for rep in 0..args.repetitions {
            // Alternate: each repetition starts with the next system.
            let n = args.systems.len();
            for k in 0..n {
                let system = &args.systems[(k + rep as usize) % n];
                if !harness::applies(system, scenario) {
                    continue;
                }
                let run = harness::run(scenario, system, rep, &tools)
                    .with_context(|| format!("{} on {system}", scenario.name))?;
                println!(
                    "{}",
                    serde_json::json!({
                        "scenario": run.scenario, "system": run.system, "repetition": rep,
                        "msgs_per_s": run.rate.round(), "sent": run.sent, "delivered": run.delivered,
                        "seconds": run.seconds, "cpu_s": run.cpu_s, "peak_rss_kb": run.peak_rss_kb, "flushes": run.flushes,
                        "blast": run.blast, "refused_421": run.refused_421, "sink_sessions": run.sessions,
                    })
                );
                runs.push(run);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&args.scratch);
    let md = report(&args, &chosen, &runs, kumod_version.as_deref())?;
    print!("{md}");
    append_results(&args.results, &md)?;
    Ok(())
}

fn report(
    args: &Args,
    scenarios: &[harness::Scenario],
    runs: &[Run],
    kumod_version: Option<&str>,
) -> Result<String> {
    let mut md = String::new();
    let rev = command_output("git", &["rev-parse", "--short", "HEAD"]);
    let date = command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let command = command_line();
    writeln!(md, "\n## gannet-bench — {date}\n")?;
    writeln!(md, "- command: `{command}`")?;
    writeln!(md, "- machine: {}", machine())?;
    writeln!(
        md,
        "- revision: {rev}; {} repetitions per system, order rotating; load by gannet-blast (a new connection per message), received by gannet-sink; generator, system and sink share the machine's cores",
        args.repetitions
    )?;
    writeln!(
        md,
        "- gannet: 250 after fdatasync, one shard per core; postfix: Postfix as an instance of the bench's own (relay via a transport map to the sink, or delivery deferred for durable-accept); haraka: Haraka 3.3.4, one worker per core, queue/smtp_forward to the sink (250 after the sink accepted; relay scenarios only); kumomta: KumoMTA's kumod with a policy the bench writes (RocksDB spools in the scratch directory, every queue to the sink, MX from unbound for many-domains), without and with msg:set_force_sync(true); every system may open as many connections per destination as the scenario has sessions; pipe: generator → sink directly; forward: gannet-forward, a relay with no queue, no disk and no DNS that opens a new connection to the sink per message (two TCP connections per message: the bound when no delivery connection can be reused); forward-dns (many-domains only): the same relay finding each message's next hop first as gannet does (MX of the recipient's domain, then the host's address, from the rig's DNS server with gannet's resolver and cache)"
    )?;
    if let Some(version) = kumod_version {
        writeln!(md, "- KumoMTA: `{version}`")?;
    }
    if let Some(baseline) = args
        .baseline_gannetd
        .as_ref()
        .filter(|_| args.systems.iter().any(|s| s == "gannet-baseline"))
    {
        writeln!(
            md,
            "- gannet-baseline: `{}`, an earlier build run with gannet's configuration",
            baseline.display()
        )?;
    }
    for scenario in scenarios {
        let of = |system: &str| -> Vec<&Run> {
            runs.iter()
                .filter(|r| r.scenario == scenario.name && r.system == system)
                .collect()
        };
        if scenario.window_s > 0 {
            windowed(&mut md, args, scenario, &of)?;
            continue;
        }
        let med =
            |system: &str| median_range(&of(system).iter().map(|r| r.rate).collect::<Vec<_>>()).0;
        writeln!(
            md,
            "\n### {} — {} ({} messages of {}, {} sessions, {} domains)\n",
            scenario.name,
            scenario.what,
            scenario.messages,
            scenario.size,
            scenario.concurrency,
            scenario.domains
        )?;
        // With a forward relay in the run, each system is also set against it (the
        // bound when every delivery needs a new connection; forward-dns also finds
        // each next hop through the rig's DNS server, as gannet must).
        let references: Vec<(&str, f64)> = ["forward", "forward-dns"]
            .into_iter()
            .filter(|r| !of(r).is_empty())
            .map(|r| (r, med(r)))
            .collect();
        let forward_head: String = references
            .iter()
            .map(|(r, _)| format!(" × {r} |"))
            .collect();
        let forward_rule = "---|".repeat(references.len());
        writeln!(
            md,
            "| system | 250 durable | disk flushes / msg | msgs/s median (min–max) | × pipe |{forward_head} gannet ÷ system | transaction p50 / p99 ms | CPU s / 1000 msgs | peak RSS MiB | delivered / sent (all runs) | errors |"
        )?;
        writeln!(
            md,
            "|---|---|---|---|---|{forward_rule}---|---|---|---|---|---|"
        )?;
        let pipe = med("pipe");
        let gannet = med("gannet");
        for system in &args.systems {
            let rs = of(system);
            if rs.is_empty() {
                continue;
            }
            let (m, lo, hi) = median_range(&rs.iter().map(|r| r.rate).collect::<Vec<_>>());
            let lat = |q: &str| {
                median_range(
                    &rs.iter()
                        .filter_map(|r| r.blast["latency_ms"][q].as_f64())
                        .collect::<Vec<_>>(),
                )
                .0
            };
            let cpu = median_range(
                &rs.iter()
                    .map(|r| r.cpu_s * 1000.0 / r.sent.max(1) as f64)
                    .collect::<Vec<_>>(),
            )
            .0;
            let rss = median_range(
                &rs.iter()
                    .map(|r| r.peak_rss_kb as f64 / 1024.0)
                    .collect::<Vec<_>>(),
            )
            .0;
            let ratio = |a: f64, b: f64| {
                if a > 0.0 && b > 0.0 {
                    format!("{:.2}", a / b)
                } else {
                    "—".into()
                }
            };
            let errors: u64 = rs
                .iter()
                .filter_map(|r| r.blast["errors"].as_object())
                .flat_map(|e| e.values().filter_map(serde_json::Value::as_u64))
                .sum();
            let (delivered, sent): (u64, u64) = rs
                .iter()
                .fold((0, 0), |(d, s), r| (d + r.delivered, s + r.sent));
            let native = *system == "pipe";
            let flushes = median_range(
                &rs.iter()
                    .map(|r| r.flushes as f64 / r.sent.max(1) as f64)
                    .collect::<Vec<_>>(),
            )
            .0;
            writeln!(
                md,
                "| {system} | {} | {flushes:.2} | {m:.0} ({lo:.0}–{hi:.0}) | {} |{} {} | {:.2} / {:.2} | {} | {} | {} | {errors} |",
                harness::durable_ack(system),
                ratio(m, pipe),
                references
                    .iter()
                    .map(|(_, r)| format!(" {} |", ratio(m, *r)))
                    .collect::<String>(),
                if *system == "gannet" {
                    "—".into()
                } else {
                    ratio(gannet, m)
                },
                lat("p50"),
                lat("p99"),
                if native {
                    "—".into()
                } else {
                    format!("{cpu:.3}")
                },
                if native {
                    "—".into()
                } else {
                    format!("{rss:.0}")
                },
                if scenario.relay {
                    format!("{delivered} / {sent}")
                } else {
                    format!("— / {sent}")
                },
            )?;
        }
        if !args.charts.is_empty() {
            let dir = PathBuf::from(&args.charts);
            std::fs::create_dir_all(&dir)?;
            let first: Vec<&Run> = runs
                .iter()
                .filter(|r| r.scenario == scenario.name && r.repetition == 0)
                .collect();
            let tp = dir.join(format!("{}-throughput.svg", scenario.name));
            let lat = dir.join(format!("{}-latency.svg", scenario.name));
            if scenario.relay {
                charts::throughput(
                    &tp,
                    &format!("{}: messages/s at the sink", scenario.name),
                    &first,
                )?;
                writeln!(
                    md,
                    "\n![throughput]({})",
                    tp.strip_prefix("bench").unwrap_or(&tp).display()
                )?;
            }
            charts::latency(
                &lat,
                &format!("{}: transaction latency", scenario.name),
                &first,
            )?;
            writeln!(
                md,
                "![latency]({})",
                lat.strip_prefix("bench").unwrap_or(&lat).display()
            )?;
        }
    }
    Ok(md)
}

/// The table of a scenario counted over a fixed window (provider-throttling):
/// messages delivered per minute, and the 421s each system provoked.
fn windowed<'a>(
    md: &mut String,
    args: &Args,
    scenario: &harness::Scenario,
    of: &dyn Fn(&str) -> Vec<&'a Run>,
) -> Result<()> {
    writeln!(
        md,
        "\n### {} — {} ({} messages of {} queued by {} sessions, {} s window)\n",
        scenario.name,
        scenario.what,
        scenario.messages,
        scenario.size,
        scenario.concurrency,
        scenario.window_s
    )?;
    writeln!(
        md,
        "| system | delivered / min median (min–max) | 421s provoked median (min–max) | 421s per 100 delivered | connections opened | CPU s / 1000 delivered |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|")?;
    for system in &args.systems {
        let rs = of(system);
        if rs.is_empty() {
            continue;
        }
        let per_min: Vec<f64> = rs.iter().map(|r| r.rate * 60.0).collect();
        let refused: Vec<f64> = rs.iter().map(|r| r.refused_421 as f64).collect();
        let (m, lo, hi) = median_range(&per_min);
        let (rm, rlo, rhi) = median_range(&refused);
        let per_100 = median_range(
            &rs.iter()
                .map(|r| r.refused_421 as f64 * 100.0 / r.delivered.max(1) as f64)
                .collect::<Vec<_>>(),
        )
        .0;
        let cpu = median_range(
            &rs.iter()
                .map(|r| r.cpu_s * 1000.0 / r.delivered.max(1) as f64)
                .collect::<Vec<_>>(),
        )
        .0;
        let sessions = median_range(&rs.iter().map(|r| r.sessions as f64).collect::<Vec<_>>()).0;
        writeln!(
            md,
            "| {system} | {m:.0} ({lo:.0}–{hi:.0}) | {rm:.0} ({rlo:.0}–{rhi:.0}) | {per_100:.1} | {sessions:.0} | {cpu:.3} |"
        )?;
    }
    Ok(())
}
