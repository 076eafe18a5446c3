//! dkim-bench: what DKIM signing costs.
//!
//! - Signatures per second on one core, RSA-2048, RSA-1024 and Ed25519, on 10 KiB
//!   messages (gannet's signer in-process: body hash, header canonicalization,
//!   signature).
//! - SMTP acceptance (durable, as smtp-accept-bench) with signing off, with one key,
//!   and with 10,000 Ed25519 keys (one per sending domain, messages spread over the
//!   10,000 domains), in one run; ratios to signing off.
//!
//! Appends the report to bench/RESULTS.md.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use clap::Parser;
use gannet_bench::harness::median_range;
use gannet_bench::servers;
use gannet_bench::{append_results, command_output, machine};
use gannet_engine::dkim::{Canon, Key, Signer, keys};

#[derive(Debug, Parser)]
#[command(
    about = "DKIM signing: signatures per second, and SMTP acceptance with signing on and off"
)]
struct Args {
    /// Signatures per algorithm in the in-process pass.
    #[arg(long, default_value_t = 5_000)]
    signatures: u64,
    /// Messages per SMTP run.
    #[arg(long, default_value_t = 30_000)]
    messages: u64,
    /// Concurrent SMTP sessions.
    #[arg(long, default_value_t = 50)]
    sessions: u64,
    /// Keys (sending domains) of the many-keys run.
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// Repetitions of each SMTP run.
    #[arg(long, default_value_t = 3)]
    repetitions: u64,
    #[arg(long, default_value = "target/release/gannetd")]
    gannetd: PathBuf,
    #[arg(long, default_value = "target/release/gannet-blast")]
    blast: PathBuf,
    #[arg(long, default_value = "/tmp/gannet-dkim-bench")]
    dir: PathBuf,
    #[arg(long, default_value = "bench/RESULTS.md")]
    results: String,
}

fn pem(der: &[u8]) -> String {
    let mut out = String::from("-----BEGIN PRIVATE KEY-----\n");
    for line in base64::engine::general_purpose::STANDARD
        .encode(der)
        .as_bytes()
        .chunks(64)
    {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out + "-----END PRIVATE KEY-----\n"
}

fn ed25519_pem() -> Result<String> {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(pem(pkcs8.as_ref()))
}

fn rsa_pem(dir: &Path, bits: u32) -> Result<String> {
    let path = dir.join(format!("rsa{bits}.pem"));
    let out = Command::new("openssl")
        .args(["genpkey", "-algorithm", "RSA", "-pkeyopt"])
        .arg(format!("rsa_keygen_bits:{bits}"))
        .arg("-out")
        .arg(&path)
        .output()
        .context("openssl (tools/install-peers.sh installs it)")?;
    if !out.status.success() {
        bail!("openssl: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(std::fs::read_to_string(path)?)
}

/// Signatures per second of one signer on one thread.
fn sign_rate(key: Key, n: u64) -> Result<f64> {
    let signer = Signer {
        domain: "bench.test".into(),
        selector: "s".into(),
        key,
        header_canon: Canon::Relaxed,
        body_canon: Canon::Relaxed,
        headers: ["from", "to", "subject", "date", "message-id"]
            .map(String::from)
            .to_vec(),
        oversign: Vec::new(),
        expire_secs: None,
        body_length: false,
    };
    let message = gannet_bench::mail::message(1, 10_240, "a@bench.test", "b@x.test");
    let start = Instant::now();
    for _ in 0..n {
        signer
            .sign(&message, 1_700_000_000)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

struct Run {
    rate: f64,
    p99: f64,
    cpu_ms: f64,
}

/// One SMTP acceptance run against gannetd with `dkim` as its [dkim] section.
fn smtp_run(args: &Args, dkim: &str, from_domains: Option<u64>) -> Result<Run> {
    let data = args.dir.join("daemon");
    let server = servers::gannetd(
        &args.gannetd,
        &data,
        0,
        "",
        &format!("[delivery]\nsuspended = true\n{dkim}"),
    )?;
    let addr = SocketAddr::from(([127, 0, 0, 1], server.port));
    let mut command = Command::new(&args.blast);
    command
        .args([
            "--server",
            &addr.to_string(),
            "--json-only",
            "--size",
            "10k",
        ])
        .args(["--messages", &args.messages.to_string()])
        .args(["--concurrency", &args.sessions.to_string()]);
    if let Some(n) = from_domains {
        command.args(["--from-domain-count", &n.to_string()]);
    } else {
        command.args(["--from", "blast@f0.test"]);
    }
    let run = gannet_bench::blast_against(&mut command, server, args.messages)?;
    Ok(Run {
        rate: run.rate,
        p99: run.p99,
        cpu_ms: run.cpu_ms_per_msg,
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    let keys_dir = args.dir.join("keys");
    let _ = std::fs::remove_dir_all(&keys_dir);
    std::fs::create_dir_all(&keys_dir)?;
    let rsa = rsa_pem(&keys_dir, 2048)?;
    // 1024 bits: signed by the rsa crate, not ring (see engine/src/dkim/keys.rs).
    let rsa_short = rsa_pem(&keys_dir, 1024)?;
    let ed = ed25519_pem()?;
    let parse = |pem: &str| keys::parse(pem.as_bytes()).map_err(|e| anyhow::anyhow!(e));
    let rsa_rate = sign_rate(parse(&rsa)?, args.signatures)?;
    let rsa_short_rate = sign_rate(parse(&rsa_short)?, args.signatures)?;
    let ed_rate = sign_rate(parse(&ed)?, args.signatures)?;
    eprintln!(
        "signatures/s on one core: rsa-2048 {rsa_rate:.0}, rsa-1024 {rsa_short_rate:.0}, ed25519 {ed_rate:.0}"
    );

    // One Ed25519 key per sending domain f0.test … fN-1.test.
    let mut entries = Vec::with_capacity(args.keys as usize);
    for d in 0..args.keys {
        let path = keys_dir.join(format!("f{d}.pem"));
        std::fs::write(&path, ed25519_pem()?)?;
        entries.push(format!(
            "{{ domain = \"f{d}.test\", selector = \"s\", key_file = \"{}\" }}",
            path.display()
        ));
    }
    let rsa_path = keys_dir.join("rsa2048.pem");
    let one = |path: &Path| {
        format!(
            "[dkim]\nkeys = [{{ domain = \"f0.test\", selector = \"s\", key_file = \"{}\" }}]\n",
            path.display()
        )
    };
    let many_keys = format!("Ed25519, {} keys (one per sending domain)", args.keys);
    let runs: Vec<(&str, String, Option<u64>)> = vec![
        ("signing off", String::new(), None),
        ("Ed25519, 1 key", one(&keys_dir.join("f0.pem")), None),
        ("RSA-2048, 1 key", one(&rsa_path), None),
        (
            &many_keys,
            format!("[dkim]\nkeys = [\n{}\n]\n", entries.join(",\n")),
            Some(args.keys),
        ),
    ];
    let mut results: Vec<Vec<Run>> = runs.iter().map(|_| Vec::new()).collect();
    for repetition in 0..args.repetitions {
        for (i, (name, dkim, from)) in runs.iter().enumerate() {
            let run = smtp_run(&args, dkim, *from)?;
            eprintln!("repetition {repetition}: {name}: {:.0} msgs/s", run.rate);
            results[i].push(run);
        }
    }
    let off = median_range(&results[0].iter().map(|r| r.rate).collect::<Vec<_>>()).0;
    let date = command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let revision = command_output("git", &["rev-parse", "--short", "HEAD"]);
    let mut md = format!(
        "\n## DKIM signing — {date}\n\n- command: `./target/release/dkim-bench{}`\n- machine: {}\n- revision: {revision}; 10 KiB messages; gannetd one shard per core, delivery suspended, 250 after fdatasync; {} sessions, a new connection per message; {} repetitions, median (min–max)\n\n\
         Signatures per second on one core (gannet's signer, relaxed/relaxed, 5 signed fields): RSA-2048 {rsa_rate:.0} ({:.3} ms each), RSA-1024 (rsa crate, blinded) {rsa_short_rate:.0} ({:.3} ms each), Ed25519 {ed_rate:.0} ({:.3} ms each).\n\n\
         | signing | msgs/s accepted | × signing off | p99 ms | gannetd CPU ms/msg |\n|---|---|---|---|---|\n",
        std::env::args()
            .skip(1)
            .map(|a| format!(" {a}"))
            .collect::<String>(),
        machine(),
        args.sessions,
        args.repetitions,
        1000.0 / rsa_rate,
        1000.0 / rsa_short_rate,
        1000.0 / ed_rate,
    );
    for ((name, ..), runs) in runs.iter().zip(&results) {
        let (rate, min, max) = median_range(&runs.iter().map(|r| r.rate).collect::<Vec<_>>());
        let p99 = median_range(&runs.iter().map(|r| r.p99).collect::<Vec<_>>()).0;
        let cpu = median_range(&runs.iter().map(|r| r.cpu_ms).collect::<Vec<_>>()).0;
        md.push_str(&format!(
            "| {name} | {rate:.0} ({min:.0}–{max:.0}) | {:.2} | {p99:.2} | {cpu:.3} |\n",
            rate / off
        ));
    }
    let many = median_range(&results[3].iter().map(|r| r.rate).collect::<Vec<_>>()).0;
    md.push_str(&format!(
        "\nGoal: acceptance with 10,000 Ed25519 keys within 15% of signing off{} ({:.0}% below).\n",
        match (args.keys, many >= off * 0.85) {
            (10_000, true) => " — met",
            (10_000, false) => " — not met",
            _ => " (this run used another key count)",
        },
        (1.0 - many / off) * 100.0
    ));
    print!("{md}");
    append_results(&args.results, &md)?;
    Ok(())
}
