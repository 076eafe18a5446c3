//! plan-bench: is the capacity planner right? For four workloads it asks
//! `gannet-plan plan` what one core sustains and which resource saturates first,
//! then offers gannetd that load and more, and compares. Three are limited by the
//! CPU on this machine; the fourth runs on a disk made slow (writes throttled by a
//! blkio cgroup, see `gannet_bench::blkio`), so that a bottleneck other than the
//! CPU is predicted and checked too.
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
use gannet_bench::blkio::Throttle;
use gannet_bench::harness::Sink;
use gannet_bench::{append_results, command_line, command_output, machine, servers};
use gannet_tools::plan::calibrate::{confine, process_cpu_seconds, process_written_bytes};

#[derive(Debug, Parser)]
#[command(about = "The capacity planner's predictions against measured runs")]
struct Args {
    /// Workloads to run (smtp-4k, smtp-tls-rsa-32k, http-ed25519-8k,
    /// smtp-16k-slow-disk; the last needs root and cgroup v1 blkio).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "smtp-4k,smtp-tls-rsa-32k,http-ed25519-8k,smtp-16k-slow-disk"
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
    /// Writes to the disk throttled to this many bytes per second (0: the disk as it
    /// is), for gannetd and for the planner's measurement of the disk alike.
    disk_write_bytes_per_s: u64,
}

/// Every workload: one core (cores = 1) used to the full (utilization = 1): the
/// planner's raw capacity, which the runs then measure.
const CASES: &[Case] = &[
    Case {
        name: "smtp-4k",
        toml: "messages_per_day = 10_000_000\ndestination_domains = 1\nsizes = [[4096, 1.0]]\nmessages_per_inbound_connection = 20\nack_p99_ms = 2000\n[host]\ncores = 1\nutilization = 1.0\n",
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
        disk_write_bytes_per_s: 0,
    },
    Case {
        name: "smtp-tls-rsa-32k",
        toml: "messages_per_day = 10_000_000\ndestination_domains = 1\nsizes = [[32768, 1.0]]\nmessages_per_inbound_connection = 20\nack_p99_ms = 2000\n[dkim]\nkeys = 1\nalgorithm = \"rsa2048\"\n[tls]\ninbound_share = 1.0\n[host]\ncores = 1\nutilization = 1.0\n",
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
        disk_write_bytes_per_s: 0,
    },
    Case {
        name: "http-ed25519-8k",
        toml: "messages_per_day = 10_000_000\ndestination_domains = 1\nsizes = [[8192, 1.0]]\nhttp_share = 1.0\nack_p99_ms = 2000\n[dkim]\nkeys = 1\nalgorithm = \"ed25519\"\n[host]\ncores = 1\nutilization = 1.0\n",
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
        disk_write_bytes_per_s: 0,
    },
    // A slow disk (this machine's own writes 1.5 GB/s, far more than one core can
    // fill): writes throttled to 8 MiB/s by a blkio cgroup, so that the disk's
    // bandwidth, not the CPU, is what runs out first.
    Case {
        name: "smtp-16k-slow-disk",
        toml: "messages_per_day = 10_000_000\ndestination_domains = 1\nsizes = [[16384, 1.0]]\nmessages_per_inbound_connection = 20\nack_p99_ms = 2000\n[host]\ncores = 1\nutilization = 1.0\n",
        blast: &[
            "--size",
            "16k",
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
        disk_write_bytes_per_s: 8 << 20,
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
    /// The disk's busy share, or with a throttled disk the share of its allowed
    /// bandwidth written.
    disk_busy: f64,
    /// Bytes gannetd wrote to the disk per message delivered.
    disk_bytes: f64,
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
    let mut skipped = Vec::new();
    for name in &args.workloads {
        let case = CASES
            .iter()
            .find(|c| c.name == name)
            .with_context(|| format!("no workload {name}"))?;
        let workload = args.dir.join(format!("{}.toml", case.name));
        std::fs::write(&workload, case.toml)?;
        let throttle = if case.disk_write_bytes_per_s > 0 {
            if let Some(why) = Throttle::unavailable() {
                eprintln!("{}: skipped ({why})", case.name);
                skipped.push((case.name, why));
                continue;
            }
            match Throttle::create(
                &format!("gannet-plan-bench-{}", std::process::id()),
                &args.dir,
                case.disk_write_bytes_per_s,
            ) {
                Ok(throttle) => Some(throttle),
                Err(e) => {
                    let why = format!("{e:#}");
                    eprintln!("{}: skipped ({why})", case.name);
                    skipped.push((case.name, why));
                    continue;
                }
            }
        } else {
            None
        };
        // With a throttled disk, the profile's disk is measured again under the
        // throttle (`calibrate --disk-only`), as a planner measures a candidate device.
        let case_profile = match &throttle {
            Some(throttle) => {
                let out = args.dir.join(format!("profile-{}.json", case.name));
                let mut command = Command::new(&args.plan);
                command
                    .args(["calibrate", "--messages", "200", "--disk-only"])
                    .arg(&profile)
                    .arg("--dir")
                    .arg(args.dir.join("disk-probe"))
                    .arg("--out")
                    .arg(&out)
                    .stdout(Stdio::null());
                throttle.run_inside(&mut command)?;
                if !command.status()?.success() {
                    bail!("gannet-plan calibrate --disk-only failed");
                }
                out
            }
            None => profile.clone(),
        };
        let out = Command::new(&args.plan)
            .arg("plan")
            .arg(&workload)
            .arg("--profile")
            .arg(&case_profile)
            .arg("--json")
            .output()?;
        if !out.status.success() {
            bail!("gannet-plan plan: {}", String::from_utf8_lossy(&out.stderr));
        }
        let plan: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let predicted = plan["sustainable_per_s"].as_f64().unwrap_or(0.0);
        let bottleneck = plan["bottleneck"].as_str().unwrap_or("").to_string();
        // The workloads' own volume is light (116 msgs/s): the plan's p99 there is
        // what it predicts below the knee.
        let ack_p99 = plan["ack_p99_ms"].as_f64().unwrap_or(f64::NAN);
        let disk_bytes = plan["disk_bytes_per_message"].as_f64().unwrap_or(f64::NAN);
        eprintln!(
            "{}: predicted {predicted:.0} msgs/s, {bottleneck} first",
            case.name
        );
        let mut points = Vec::new();
        for load in &args.loads {
            let point = run_point(&args, case, predicted * load, throttle.as_ref())?;
            eprintln!("  {point:?}");
            points.push(point);
        }
        report.push((case, predicted, bottleneck, (ack_p99, disk_bytes), points));
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
    for (case, predicted, bottleneck, _, points) in &report {
        let measured = points.iter().map(|p| p.delivered).fold(0.0, f64::max);
        let last = points.last().cloned();
        let observed = match &last {
            Some(p) if p.cpu_cores >= p.disk_busy && p.cpu_cores > 0.85 => "cpu",
            Some(p) if p.disk_busy > 0.85 && case.disk_write_bytes_per_s > 0 => "disk bandwidth",
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
    for (name, why) in &skipped {
        writeln!(md, "| {name} | skipped: {why} | | | | |")?;
    }
    for (case, predicted, _, (ack_p99, disk_bytes), points) in &report {
        writeln!(
            md,
            "\n{} (predicted {predicted:.0} msgs/s, ack p99 {ack_p99:.1} ms below the knee, {disk_bytes:.0} disk bytes per message):\n",
            case.name
        )?;
        if case.disk_write_bytes_per_s > 0 {
            writeln!(
                md,
                "The disk's writes throttled to {} MiB/s (a blkio cgroup holding gannetd, and the planner's disk measurement, `gannet-plan calibrate --disk-only`); \"disk busy\" is the share of that bandwidth gannetd wrote.\n",
                case.disk_write_bytes_per_s >> 20
            )?;
        }
        writeln!(
            md,
            "| offered msgs/s | × predicted | accepted msgs/s | delivered msgs/s | ack p50 ms | ack p99 ms | gannetd CPU (cores) | disk busy | disk bytes/msg | failed |"
        )?;
        writeln!(md, "|---|---|---|---|---|---|---|---|---|---|")?;
        for p in points {
            writeln!(
                md,
                "| {:.0} | {:.2} | {:.0} | {:.0} | {:.1} | {:.1} | {:.2} | {:.0}% | {:.0} | {} |",
                p.offered,
                p.offered / predicted.max(1e-9),
                p.accepted,
                p.delivered,
                p.p50_ms,
                p.p99_ms,
                p.cpu_cores,
                p.disk_busy * 100.0,
                p.disk_bytes,
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
fn run_point(args: &Args, case: &Case, offered: f64, throttle: Option<&Throttle>) -> Result<Point> {
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
    if let Some(throttle) = throttle {
        throttle.add(server.pid)?;
    }
    let written = || throttle.map_or(0, Throttle::written);
    let target = if case.http {
        format!("127.0.0.1:{}", server.http_port)
    } else {
        format!("127.0.0.1:{}", server.port)
    };
    let received0 = sink.received()?;
    let (cpu0, busy0, written0, bytes0, t0) = (
        process_cpu_seconds(server.pid),
        gannet_bench::device_busy_ms(&dir),
        written(),
        process_written_bytes(server.pid),
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
    let bytes = process_written_bytes(server.pid).saturating_sub(bytes0);
    let busy = match throttle {
        Some(throttle) => {
            written().saturating_sub(written0) as f64 / throttle.write_bytes_per_s as f64
        }
        None => gannet_bench::device_busy_ms(&dir).saturating_sub(busy0) as f64 / 1000.0,
    };
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
        disk_bytes: bytes as f64 / delivered.max(1) as f64,
        failed: result["messages_failed"].as_u64().unwrap_or(0),
    })
}
