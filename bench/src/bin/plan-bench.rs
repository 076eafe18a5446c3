//! plan-bench: is the capacity planner right? For three workloads it asks
//! `gannet-plan plan` what one core sustains and which resource saturates first,
//! then offers gannetd that load and more, and compares.
//!
//! gannetd runs on one shard confined to core 0 (every thread's CPU affinity); the load
//! (gannet-blast, at a fixed rate) and the sink (gannet-sink, reached by a static
//! route) run on the other core, so that the planner's "one core" is literal. The
//! profile is calibrated the same way (`gannet-plan calibrate`, unless `--profile`
//! gives one). Each workload runs at fractions of the predicted sustainable rate
//! (`--loads`, by default 0.5, 0.8, 1.0, 1.15 and 1.3×) for `--seconds` each: the
//! delivered rate, the acknowledgement latency (p50, p99), gannetd's CPU (in cores)
//! and the disk's busy share. The measured sustainable rate is the highest rate
//! delivered; the observed bottleneck is the resource closest to saturation at the
//! highest load. The report (prediction against measurement, goal ±20% and the same
//! bottleneck) goes to bench/RESULTS.md, with charts of throughput and p99 against
//! offered load, the predicted knee marked.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use gannet_bench::harness::Sink;
use gannet_bench::{append_results, command_line, command_output, machine, servers};
use gannet_tools::plan::calibrate::{confine, process_cpu_seconds};

#[derive(Debug, Parser)]
#[command(about = "The capacity planner's predictions against measured runs")]
struct Args {
    /// Workloads to run (smtp-4k, smtp-tls-rsa-32k, http-ed25519-8k).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "smtp-4k,smtp-tls-rsa-32k,http-ed25519-8k"
    )]
    workloads: Vec<String>,
    /// Offered load, as multiples of the predicted sustainable rate.
    #[arg(long, value_delimiter = ',', default_value = "0.5,0.8,1.0,1.15,1.3")]
    loads: Vec<f64>,
    /// Seconds of load per point.
    #[arg(long, default_value_t = 15)]
    seconds: u64,
    /// A host profile to plan with (default: calibrate one first).
    #[arg(long)]
    profile: Option<PathBuf>,
    /// Messages per calibration measurement.
    #[arg(long, default_value_t = 3000)]
    calibrate_messages: u64,
    #[arg(long, default_value = "target/release/gannetd")]
    gannetd: PathBuf,
    #[arg(long, default_value = "target/release/gannet-plan")]
    plan: PathBuf,
    #[arg(long, default_value = "target/release/gannet-blast")]
    blast: PathBuf,
    #[arg(long, default_value = "target/release/gannet-sink")]
    sink: PathBuf,
    /// Scratch directory (on the disk to measure).
    #[arg(long, default_value = "/tmp/gannet-plan-bench")]
    dir: PathBuf,
    /// Markdown report appended here ("" to skip).
    #[arg(long, default_value = "bench/RESULTS.md")]
    results: String,
    /// Directory for the SVG charts ("" to skip).
    #[arg(long, default_value = "bench/charts")]
    charts: String,
}

const KEY: &str = "plan-bench-inject-key";

/// A workload: its file for the planner, and how the bench produces it.
struct Case {
    name: &'static str,
    toml: &'static str,
    /// gannet-blast's arguments (besides server, rate and duration).
    blast: &'static [&'static str],
    /// Messages each blast message makes (recipients of a transmission).
    per_blast: f64,
    /// DKIM algorithm for the key of blast.test ("" for none).
    dkim: &'static str,
    http: bool,
}

/// Every workload: one core (cores = 1) used to the full (utilization = 1): the
/// planner's raw capacity, which the runs then measure.
const CASES: &[Case] = &[
    Case {
        name: "smtp-4k",
        toml: "messages_per_day = 10_000_000\nsizes = [[4096, 1.0]]\nmessages_per_inbound_connection = 20\nack_p99_ms = 2000\n[host]\ncores = 1\nutilization = 1.0\n",
        blast: &[
            "--size",
            "4k",
            "--per-connection",
            "20",
            "--concurrency",
            "32",
            "--domains",
            "dest.test",
        ],
        per_blast: 1.0,
        dkim: "",
        http: false,
    },
    Case {
        name: "smtp-tls-rsa-32k",
        toml: "messages_per_day = 10_000_000\nsizes = [[32768, 1.0]]\nmessages_per_inbound_connection = 20\nack_p99_ms = 2000\n[dkim]\nkeys = 1\nalgorithm = \"rsa2048\"\n[tls]\ninbound_share = 1.0\n[host]\ncores = 1\nutilization = 1.0\n",
        blast: &[
            "--size",
            "32k",
            "--per-connection",
            "20",
            "--concurrency",
            "32",
            "--domains",
            "dest.test",
            "--starttls",
        ],
        per_blast: 1.0,
        dkim: "rsa2048",
        http: false,
    },
    Case {
        name: "http-ed25519-8k",
        toml: "messages_per_day = 10_000_000\nsizes = [[8192, 1.0]]\nhttp_share = 1.0\nack_p99_ms = 2000\n[dkim]\nkeys = 1\nalgorithm = \"ed25519\"\n[host]\ncores = 1\nutilization = 1.0\n",
        blast: &[
            "--http",
            "--recipients",
            "10",
            "--size",
            "8k",
            "--per-connection",
            "50",
            "--concurrency",
            "8",
            "--domains",
            "dest.test",
        ],
        per_blast: 10.0,
        dkim: "ed25519",
        http: true,
    },
];

/// One point of a load curve.
#[derive(Debug, Clone)]
struct Point {
    offered: f64,
    /// Messages acknowledged (250, or recipients accepted over HTTP) per second.
    accepted: f64,
    delivered: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_cores: f64,
    disk_busy: f64,
    failed: u64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        bail!("plan-bench needs two cores: one for gannetd, one for the load and the sink");
    }
    for bin in [&args.gannetd, &args.plan, &args.blast, &args.sink] {
        if !bin.exists() {
            bail!("{} is missing: cargo build --release", bin.display());
        }
    }
    let _ = std::fs::remove_dir_all(&args.dir);
    std::fs::create_dir_all(&args.dir)?;
    let profile = match &args.profile {
        Some(p) => p.clone(),
        None => {
            let out = args.dir.join("profile.json");
            eprintln!("calibrating…");
            let status = Command::new(&args.plan)
                .args([
                    "calibrate",
                    "--messages",
                    &args.calibrate_messages.to_string(),
                ])
                .arg("--gannetd")
                .arg(&args.gannetd)
                .arg("--dir")
                .arg(args.dir.join("calibration"))
                .arg("--out")
                .arg(&out)
                .stdout(Stdio::null())
                .status()?;
            if !status.success() {
                bail!("gannet-plan calibrate failed");
            }
            out
        }
    };
    let mut report = Vec::new();
    for name in &args.workloads {
        let case = CASES
            .iter()
            .find(|c| c.name == name)
            .with_context(|| format!("no workload {name}"))?;
        let workload = args.dir.join(format!("{}.toml", case.name));
        std::fs::write(&workload, case.toml)?;
        let out = Command::new(&args.plan)
            .arg("plan")
            .arg(&workload)
            .arg("--profile")
            .arg(&profile)
            .arg("--json")
            .output()?;
        if !out.status.success() {
            bail!("gannet-plan plan: {}", String::from_utf8_lossy(&out.stderr));
        }
        let plan: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let predicted = plan["sustainable_per_s"].as_f64().unwrap_or(0.0);
        let bottleneck = plan["bottleneck"].as_str().unwrap_or("").to_string();
        eprintln!(
            "{}: predicted {predicted:.0} msgs/s, {bottleneck} first",
            case.name
        );
        let mut points = Vec::new();
        for load in &args.loads {
            let point = run_point(&args, case, predicted * load)?;
            eprintln!("  {point:?}");
            points.push(point);
        }
        report.push((case, predicted, bottleneck, points));
    }

    use std::fmt::Write as _;
    let mut md = String::new();
    let rev = command_output("git", &["rev-parse", "--short", "HEAD"]);
    let date = command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    writeln!(md, "\n## Capacity planner against measured runs — {date}\n")?;
    writeln!(md, "- command: `{}`", command_line())?;
    writeln!(md, "- machine: {}", machine())?;
    writeln!(
        md,
        "- revision: {rev}; gannetd on one shard confined to core 0 (every thread's CPU affinity), gannet-blast at a fixed rate and gannet-sink on core 1; {} s per point; profile `{}` (gannet-plan calibrate, same confinement); predictions from `gannet-plan plan` with cores = 1, utilization = 1",
        args.seconds,
        profile.display()
    )?;
    writeln!(
        md,
        "- measured sustainable: the highest delivered rate among the points; observed bottleneck: gannetd's CPU (cores) or the disk's busy share, whichever is nearer saturation at the highest load\n"
    )?;
    writeln!(
        md,
        "| workload | predicted msgs/s | measured msgs/s | measured / predicted | predicted bottleneck | observed bottleneck |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|")?;
    for (case, predicted, bottleneck, points) in &report {
        let measured = points.iter().map(|p| p.delivered).fold(0.0, f64::max);
        let last = points.last().cloned();
        let observed = match &last {
            Some(p) if p.cpu_cores >= p.disk_busy && p.cpu_cores > 0.85 => "cpu",
            Some(p) if p.disk_busy > 0.85 => "disk",
            _ => "none saturated",
        };
        writeln!(
            md,
            "| {} | {predicted:.0} | {measured:.0} | {:.2} | {bottleneck} | {observed} |",
            case.name,
            measured / predicted.max(1e-9),
        )?;
    }
    for (case, predicted, _, points) in &report {
        writeln!(md, "\n{} (predicted {predicted:.0} msgs/s):\n", case.name)?;
        writeln!(
            md,
            "| offered msgs/s | × predicted | accepted msgs/s | delivered msgs/s | ack p50 ms | ack p99 ms | gannetd CPU (cores) | disk busy | failed |"
        )?;
        writeln!(md, "|---|---|---|---|---|---|---|---|---|")?;
        for p in points {
            writeln!(
                md,
                "| {:.0} | {:.2} | {:.0} | {:.0} | {:.1} | {:.1} | {:.2} | {:.0}% | {} |",
                p.offered,
                p.offered / predicted.max(1e-9),
                p.accepted,
                p.delivered,
                p.p50_ms,
                p.p99_ms,
                p.cpu_cores,
                p.disk_busy * 100.0,
                p.failed
            )?;
        }
        if !args.charts.is_empty() {
            let dir = Path::new(&args.charts);
            std::fs::create_dir_all(dir)?;
            let delivered: Vec<(f64, f64)> =
                points.iter().map(|p| (p.offered, p.delivered)).collect();
            let offered: Vec<(f64, f64)> = points.iter().map(|p| (p.offered, p.offered)).collect();
            let accepted: Vec<(f64, f64)> =
                points.iter().map(|p| (p.offered, p.accepted)).collect();
            gannet_bench::charts::against_offered(
                &dir.join(format!("plan-{}-throughput.svg", case.name)),
                &format!("{}: delivered against offered", case.name),
                "messages/s",
                &[
                    ("delivered", delivered),
                    ("accepted", accepted),
                    ("offered", offered),
                ],
                *predicted,
                false,
            )?;
            let p99: Vec<(f64, f64)> = points
                .iter()
                .map(|p| (p.offered, p.p99_ms.max(0.01)))
                .collect();
            gannet_bench::charts::against_offered(
                &dir.join(format!("plan-{}-p99.svg", case.name)),
                &format!("{}: acknowledgement p99 against offered", case.name),
                "ms (log)",
                &[("ack p99", p99)],
                *predicted,
                true,
            )?;
            writeln!(
                md,
                "\nCharts: `bench/charts/plan-{0}-throughput.svg`, `bench/charts/plan-{0}-p99.svg`.",
                case.name
            )?;
        }
    }
    print!("{md}");
    append_results(&args.results, &md)?;
    let _ = std::fs::remove_dir_all(&args.dir);
    Ok(())
}

/// One point: gannetd, the sink and the load at `offered` messages per second.
fn run_point(args: &Args, case: &Case, offered: f64) -> Result<Point> {
    let sink = Sink::start(&args.sink, &[])?;
    confine(sink.pid(), 1);
    let dir = args.dir.join(case.name);
    let dkim = if case.dkim.is_empty() {
        String::new()
    } else {
        let key = args.dir.join(format!("{}.pem", case.dkim));
        if !key.exists() {
            let algorithm = if case.dkim == "ed25519" {
                "ed25519"
            } else {
                "rsa"
            };
            let keys = args.dir.join("keys");
            let _ = std::fs::remove_dir_all(&keys);
            std::fs::create_dir_all(&keys)?;
            let status = Command::new(args.plan.with_file_name("gannet-dkim"))
                .args([
                    "keygen",
                    "--domain",
                    "blast.test",
                    "--selector",
                    "s",
                    "--algorithm",
                    algorithm,
                ])
                .arg("--out")
                .arg(&keys)
                .stdout(Stdio::null())
                .status()
                .context("gannet-dkim (cargo build --release)")?;
            if !status.success() {
                bail!("gannet-dkim keygen failed");
            }
            std::fs::rename(keys.join("blast.test.s.pem"), &key)?;
        }
        format!(
            "[dkim]\nkeys = [{{ domain = \"blast.test\", selector = \"s\", key_file = \"{}\" }}]\n",
            key.display()
        )
    };
    let rest = format!(
        "api_keys = [{{ name = \"bench\", key_sha256 = \"{}\" }}]\n\
         [delivery]\ntls = \"disabled\"\nroutes = {{ \"dest.test\" = [\"{}\"] }}\n{dkim}",
        gannet_core::auth::KeyDigest::of(KEY),
        sink.smtp
    );
    let server = servers::gannetd(&args.gannetd, &dir, 1, "pin_cores = false", &rest)?;
    confine(server.pid, 0);
    let target = if case.http {
        format!("127.0.0.1:{}", server.http_port)
    } else {
        format!("127.0.0.1:{}", server.port)
    };
    let received0 = sink.received()?;
    let (cpu0, busy0, t0) = (
        process_cpu_seconds(server.pid),
        gannet_bench::device_busy_ms(&dir),
        Instant::now(),
    );
    let blast = Command::new("taskset")
        .args(["-c", "1"])
        .arg(&args.blast)
        .args(["--server", &target, "--json-only", "--api-key", KEY])
        .args(["--rate", &format!("{:.1}", offered / case.per_blast)])
        .args(["--duration", &format!("{}s", args.seconds)])
        .args(case.blast)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .context("running gannet-blast")?;
    let wall = t0.elapsed().as_secs_f64();
    let cpu = process_cpu_seconds(server.pid) - cpu0;
    let busy = gannet_bench::device_busy_ms(&dir).saturating_sub(busy0) as f64 / 1000.0;
    let delivered = sink.received()? - received0;
    if !blast.status.success() {
        bail!("gannet-blast: {}", String::from_utf8_lossy(&blast.stderr));
    }
    let result: serde_json::Value = serde_json::from_slice(&blast.stdout)?;
    server.stop()?;
    drop(sink);
    Ok(Point {
        offered,
        accepted: result["recipients_accepted"].as_f64().unwrap_or(0.0) / wall,
        delivered: delivered as f64 / wall,
        p50_ms: result["latency_ms"]["p50"].as_f64().unwrap_or(0.0),
        p99_ms: result["latency_ms"]["p99"].as_f64().unwrap_or(0.0),
        cpu_cores: cpu / wall,
        disk_busy: busy / wall,
        failed: result["messages_failed"].as_u64().unwrap_or(0),
    })
}
