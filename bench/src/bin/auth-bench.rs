//! auth-bench: what failed SMTP AUTH attempts cost everyone else. Every failed login
//! runs the full PBKDF2 check of a password hash (tens of thousands of HMAC rounds);
//! a client guessing passwords sends one after the other. The benchmark offers
//! gannetd an acceptance load (a new connection per message, relayed from a trusted
//! network, no AUTH) alone, and again while `--guessers` sessions send wrong
//! passwords over STARTTLS, and reports the load's rate and latency both ways — for
//! this build and, side by side, an earlier one (`--baseline-gannetd`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use clap::Parser;
use gannet_bench::harness::median_range;
use gannet_bench::servers;
use gannet_bench::{append_results, command_output, machine, tree_cpu_seconds};

#[derive(Debug, Parser)]
#[command(about = "Acceptance latency while clients guess SMTP AUTH passwords")]
struct Args {
    /// Messages of the acceptance load per run.
    #[arg(long, default_value_t = 20_000)]
    messages: u64,
    /// Concurrent sessions of the acceptance load.
    #[arg(long, default_value_t = 20)]
    concurrency: u64,
    /// Concurrent sessions sending wrong passwords.
    #[arg(long, default_value_t = 4)]
    guessers: u64,
    /// Repetitions (each on a fresh daemon).
    #[arg(long, default_value_t = 3)]
    repetitions: u64,
    /// The gannetd binary.
    #[arg(long, default_value = "target/release/gannetd")]
    gannetd: PathBuf,
    /// An earlier gannetd run the same way, beside this one.
    #[arg(long)]
    baseline_gannetd: Option<PathBuf>,
    /// The gannet-blast binary.
    #[arg(long, default_value = "target/release/gannet-blast")]
    blast: PathBuf,
    /// Scratch directory.
    #[arg(long, default_value = "/tmp/gannet-auth-bench")]
    dir: PathBuf,
    /// Where the report is appended ("" for nowhere).
    #[arg(long, default_value = "bench/RESULTS.md")]
    results: String,
}

/// One run's figures for the acceptance load.
#[derive(Debug, Clone, Copy)]
struct Run {
    rate: f64,
    p50: f64,
    p99: f64,
    /// Wrong passwords answered (535) while the load ran.
    refused: u64,
    cpu_s: f64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let hash = password_hash(&args.gannetd)?;
    let mut binaries = vec![("this build", args.gannetd.clone())];
    if let Some(b) = &args.baseline_gannetd {
        binaries.push(("baseline", b.clone()));
    }
    let mut rows = Vec::new();
    for (name, binary) in &binaries {
        for guessing in [false, true] {
            let mut runs = Vec::new();
            for _ in 0..args.repetitions {
                runs.push(run(&args, binary, &hash, guessing)?);
            }
            eprintln!("{name}, guessing {guessing}: {runs:?}");
            rows.push((*name, binary.clone(), guessing, runs));
        }
    }
    let date = command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let revision = command_output("git", &["rev-parse", "--short", "HEAD"]);
    let command_line = std::env::args().collect::<Vec<_>>().join(" ");
    let mut md = format!(
        "\n## Acceptance while clients guess AUTH passwords — {date}\n\n\
         - command: `{}`\n- machine: {}\n- revision: {revision}; gannetd one shard per core, delivery suspended; \
         load: {} messages, {} sessions, a new connection per message, no AUTH (relay_from); \
         guessers: {} sessions sending AUTH PLAIN with a wrong password over STARTTLS, one after the other, \
         for as long as the load runs; {} repetitions, median (min–max)\n\n\
         | gannetd | guessers | msgs/s | p50 ms | p99 ms | wrong passwords answered | gannetd CPU s |\n|---|---|---|---|---|---|---|\n",
        if command_line.starts_with("target/") {
            format!("./{command_line}")
        } else {
            command_line
        },
        machine(),
        args.messages,
        args.concurrency,
        args.guessers,
        args.repetitions,
    );
    for (name, binary, guessing, runs) in &rows {
        let m = |f: fn(&Run) -> f64| median_range(&runs.iter().map(f).collect::<Vec<_>>());
        let (rate, lo, hi) = m(|r| r.rate);
        let (p50, ..) = m(|r| r.p50);
        let (p99, p99_lo, p99_hi) = m(|r| r.p99);
        let (refused, ..) = m(|r| r.refused as f64);
        let (cpu, ..) = m(|r| r.cpu_s);
        md.push_str(&format!(
            "| {name} (`{}`) | {} | {rate:.0} ({lo:.0}–{hi:.0}) | {p50:.2} | {p99:.2} ({p99_lo:.2}–{p99_hi:.2}) | {refused:.0} | {cpu:.2} |\n",
            binary.display(),
            if *guessing { args.guessers } else { 0 },
        ));
    }
    println!("{md}");
    if !args.results.is_empty() {
        append_results(&args.results, &md)?;
    }
    Ok(())
}

/// `gannetd --hash-password` of the right password.
fn password_hash(gannetd: &Path) -> Result<String> {
    let mut child = Command::new(gannetd)
        .arg("--hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {} --hash-password", gannetd.display()))?;
    use std::io::Write as _;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(b"right password")?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("--hash-password failed");
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

fn run(args: &Args, binary: &Path, hash: &str, guessing: bool) -> Result<Run> {
    let server = servers::gannetd_with(
        binary,
        &args.dir,
        0,
        "",
        &format!("users = [{{ name = \"app\", password_hash = \"{hash}\" }}]"),
        "[delivery]\nsuspended = true\n",
    )?;
    let target = format!("127.0.0.1:{}", server.port);
    // The guessers: far more attempts than the load lasts; stopped when it ends.
    let mut guessers = if guessing {
        Some(
            Command::new(&args.blast)
                .args(["--server", &target, "--json-only", "--starttls"])
                .args(["--auth", "app:wrong password"])
                .args(["--messages", "1000000"])
                .args(["--concurrency", &args.guessers.to_string()])
                .stdout(Stdio::null())
                .spawn()
                .context("starting the guessers")?,
        )
    } else {
        None
    };
    if guessing {
        // Let the guessing start before the load does.
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let refused0 = auth_failures(server.http_port);
    let cpu0 = tree_cpu_seconds(server.pid);
    let out = Command::new(&args.blast)
        .args(["--server", &target, "--json-only"])
        .args(["--messages", &args.messages.to_string()])
        .args(["--concurrency", &args.concurrency.to_string()])
        .args(["--size", "10k"])
        .output()
        .context("running the load")?;
    let cpu_s = tree_cpu_seconds(server.pid) - cpu0;
    let refused = auth_failures(server.http_port).saturating_sub(refused0);
    if let Some(g) = guessers.as_mut() {
        // SAFETY: signalling the child this run started.
        unsafe { libc::kill(g.id() as i32, libc::SIGTERM) };
        let _ = g.wait();
    }
    server.stop()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("load result")?;
    if v["messages_sent"].as_u64() != Some(args.messages) {
        bail!("the load did not complete: {v}");
    }
    let latency = |q: &str| v["latency_ms"][q].as_f64().unwrap_or(0.0);
    Ok(Run {
        rate: v["msgs_per_s"].as_f64().unwrap_or(0.0),
        p50: latency("p50"),
        p99: latency("p99"),
        refused,
        cpu_s,
    })
}

/// gannetd's count of failed AUTH attempts (its /metrics).
fn auth_failures(http_port: u16) -> u64 {
    let out = Command::new("curl")
        .args(["-s", &format!("http://127.0.0.1:{http_port}/metrics")])
        .output();
    let Ok(out) = out else { return 0 };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("gannet_smtp_auth_failures_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}
