//! http-bench: HTTP injection (SparkPost's Transmissions API), side by side with SMTP.
//!
//! gannetd runs with delivery suspended, so what is measured is injection until
//! durable and queued. In each repetition, on a fresh data directory:
//! - `merge`: one transmission of N recipients (an HTML + text template with loops,
//!   per-recipient substitution data), timed from the first byte of the request to
//!   the moment the last recipient's message is spooled and queued (the generation
//!   gauges at zero); the reply comes once the job is durable;
//! - `http-single`: gannet-blast POSTs single-recipient transmissions from C
//!   concurrent clients (keep-alive);
//! - `smtp`: gannet-blast injects the same number of messages, of the mean size the
//!   merge generated, over SMTP from C concurrent sessions (a session per 1,000
//!   messages) — the same messages, the other way in.
//!
//! Reports medians and min–max of recipients (messages) per second, the ratios to
//! SMTP, latency percentiles, and gannetd's CPU per message, and appends them to
//! bench/RESULTS.md.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use gannet_bench::harness::median_range;
use gannet_bench::servers::{self, Server};
use gannet_bench::{
    append_results, command_output, gannet_metric, http_request, machine, tree_cpu_seconds,
};
use serde_json::{Value, json};

#[derive(Debug, Parser)]
#[command(
    about = "HTTP injection (transmissions with mail merge) vs SMTP injection of the same messages"
)]
struct Args {
    /// Recipients of the merged transmission.
    #[arg(long, default_value_t = 100_000)]
    recipients: u64,
    /// Single-recipient requests (and SMTP messages) per repetition.
    #[arg(long, default_value_t = 50_000)]
    messages: u64,
    /// Concurrent HTTP clients and SMTP sessions.
    #[arg(long, default_value_t = 50)]
    concurrency: u64,
    /// Repetitions (each on a fresh daemon).
    #[arg(long, default_value_t = 3)]
    repetitions: u64,
    /// gannetd shards (0: one per core).
    #[arg(long, default_value_t = 0)]
    shards: usize,
    /// The gannetd binary.
    #[arg(long, default_value = "target/release/gannetd")]
    gannetd: PathBuf,
    /// The gannet-blast binary.
    #[arg(long, default_value = "target/release/gannet-blast")]
    blast: PathBuf,
    /// Scratch directory for gannet's data.
    #[arg(long, default_value = "/tmp/gannet-http-bench")]
    dir: PathBuf,
    /// Where the report is appended ("" for nowhere).
    #[arg(long, default_value = "bench/RESULTS.md")]
    results: String,
}

const KEY: &str = "http-bench-key-7d0c2b94e1a8";

/// gannetd with an API key and delivery suspended; its HTTP and SMTP addresses.
fn start(args: &Args) -> Result<(Server, SocketAddr, SocketAddr)> {
    let digest = gannet_core::auth::KeyDigest::of(KEY);
    // A million recipients inline is a ~160 MB request.
    let rest = format!(
        "api_keys = [{{ name = \"bench\", key_sha256 = \"{digest}\" }}]\nrequest_bytes_max = 1073741824\n\
         [delivery]\nsuspended = true\n"
    );
    let server = servers::gannetd(&args.gannetd, &args.dir, args.shards, "", &rest)?;
    let listeners: Value = serde_json::from_str(&std::fs::read_to_string(
        args.dir.join("data/listeners.json"),
    )?)?;
    let addr = |key: &str| -> Result<SocketAddr> {
        Ok(listeners[key][0].as_str().context("listener")?.parse()?)
    };
    Ok((server, addr("http")?, addr("smtp")?))
}

/// A newsletter of `n` recipients: text and HTML with a loop, a default, a link.
fn transmission(n: u64) -> Vec<u8> {
    let recipients: Vec<Value> = (0..n)
        .map(|i| {
            json!({
                "address": {"email": format!("user{i}@d{}.test", i % 1000), "name": format!("User {i}")},
                "substitution_data": {
                    "first": format!("Name{i}"),
                    "points": i * 7 % 1000,
                    "items": [format!("item{}", i % 13), format!("item{}", i % 17)],
                }
            })
        })
        .collect();
    let filler_text = "Lorem ipsum dolor sit amet, consectetur adipiscing elit. ".repeat(20);
    let filler_html = "<p>Lorem ipsum dolor sit amet, consectetur adipiscing elit.</p>".repeat(20);
    json!({
        "campaign_id": "http-bench",
        "substitution_data": {"shop": "Gannet Outfitters", "year": 2026},
        "recipients": recipients,
        "content": {
            "from": {"email": "news@gannet.test", "name": "{{ shop }}"},
            "subject": "{{ first }}, your {{ year }} offers",
            "text": format!("Hi {{{{ first or 'there' }}}},\nYou have {{{{ points }}}} points.\n{{{{ each items }}}}- {{{{ loop_var }}}}\n{{{{ end }}}}\n{filler_text}\n"),
            "html": format!("<html><body><p>Hi {{{{ first or 'there' }}}},</p><p>You have <b>{{{{ points }}}}</b> points.</p><ul>{{{{ each items }}}}<li>{{{{ loop_var }}}}</li>{{{{ end }}}}</ul>{filler_html}<a href=\"https://gannet.test/u?n={{{{ first }}}}\">unsubscribe</a></body></html>"),
        }
    })
    .to_string()
    .into_bytes()
}

struct Merge {
    rate: f64,
    ack_ms: f64,
    mean_size: f64,
    cpu_ms_per_msg: f64,
}

fn merge(args: &Args, body: &[u8]) -> Result<Merge> {
    let (server, http, _) = start(args)?;
    let cpu0 = tree_cpu_seconds(server.pid);
    let t0 = Instant::now();
    let (status, reply) = http_request(http, "POST", "/api/v1/transmissions", Some(KEY), body)?;
    let ack = t0.elapsed();
    if status != 200 {
        bail!(
            "transmission refused: {status} {}",
            String::from_utf8_lossy(&reply)
        );
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while gannet_metric(http, "http_generation_jobs")? > 0.0 {
        if Instant::now() > deadline {
            bail!("generation did not finish");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let seconds = t0.elapsed().as_secs_f64();
    let generated = gannet_metric(http, "http_messages_generated_total")?;
    let bytes = gannet_metric(http, "http_message_bytes_total")?;
    let cpu = tree_cpu_seconds(server.pid) - cpu0;
    server.stop()?;
    if generated as u64 != args.recipients {
        bail!("{generated} of {} recipients generated", args.recipients);
    }
    Ok(Merge {
        rate: generated / seconds,
        ack_ms: ack.as_secs_f64() * 1000.0,
        mean_size: bytes / generated,
        cpu_ms_per_msg: cpu * 1000.0 / generated,
    })
}

struct Blast {
    rate: f64,
    p50: f64,
    p99: f64,
    cpu_ms_per_msg: f64,
}

fn blast(args: &Args, http: bool, size: usize) -> Result<Blast> {
    let (server, http_addr, smtp_addr) = start(args)?;
    let target = if http { http_addr } else { smtp_addr };
    let mut command = Command::new(&args.blast);
    command.args([
        "--server",
        &target.to_string(),
        "--messages",
        &args.messages.to_string(),
        "--concurrency",
        &args.concurrency.to_string(),
        "--per-connection",
        "1000",
        "--size",
        &size.to_string(),
        "--json-only",
    ]);
    if http {
        command.args(["--http", "--api-key", KEY]);
    }
    let run = gannet_bench::blast_against(&mut command, server, args.messages)?;
    Ok(Blast {
        rate: run.rate,
        p50: run.p50,
        p99: run.p99,
        cpu_ms_per_msg: run.cpu_ms_per_msg,
    })
}

fn cell(values: &[f64], digits: usize) -> String {
    let (median, min, max) = median_range(values);
    format!("{median:.digits$} ({min:.digits$}–{max:.digits$})")
}

fn main() -> Result<()> {
    let args = Args::parse();
    for binary in [&args.gannetd, &args.blast] {
        if !Path::new(binary).exists() {
            bail!("{} is missing: cargo build --release", binary.display());
        }
    }
    let body = transmission(args.recipients);
    let (mut merges, mut singles, mut smtps) = (Vec::new(), Vec::new(), Vec::new());
    for repetition in 0..args.repetitions {
        let m = merge(&args, &body)?;
        eprintln!(
            "repetition {repetition}: merge {:.0} recipients/s (reply after {:.0} ms, {:.0} B per message)",
            m.rate, m.ack_ms, m.mean_size
        );
        let size = m.mean_size as usize;
        let h = blast(&args, true, size)?;
        eprintln!("repetition {repetition}: http single {:.0} msgs/s", h.rate);
        let s = blast(&args, false, size)?;
        eprintln!("repetition {repetition}: smtp {:.0} msgs/s", s.rate);
        merges.push(m);
        singles.push(h);
        smtps.push(s);
    }
    let pick = |v: &[Blast], f: fn(&Blast) -> f64| v.iter().map(f).collect::<Vec<_>>();
    let merge_rates: Vec<f64> = merges.iter().map(|m| m.rate).collect();
    let smtp_rate = median_range(&pick(&smtps, |b| b.rate)).0;
    let single_rate = median_range(&pick(&singles, |b| b.rate)).0;
    let merge_rate = median_range(&merge_rates).0;
    let date = command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let revision = command_output("git", &["rev-parse", "--short", "HEAD"]);
    let command_line = std::env::args().collect::<Vec<_>>().join(" ");
    let mut md = format!(
        "\n## HTTP injection: transmissions with mail merge vs SMTP — {date}\n\n\
         - command: `{}`\n- machine: {}\n- revision: {revision}; gannetd shards: {}; delivery suspended (durable and queued is the end point); {} repetitions, median (min–max)\n\n\
         | way in | load | msgs/s | × SMTP | p50 / p99 ms | gannetd CPU ms/msg |\n|---|---|---|---|---|---|\n",
        if command_line.starts_with("target/") {
            format!("./{command_line}")
        } else {
            command_line
        },
        machine(),
        if args.shards == 0 {
            "one per core".to_string()
        } else {
            args.shards.to_string()
        },
        args.repetitions,
    );
    md.push_str(&format!(
        "| HTTP, one transmission | {} recipients, HTML + text template, per-recipient data | {} | {:.2} | reply {} ms | {} |\n",
        args.recipients,
        cell(&merge_rates, 0),
        merge_rate / smtp_rate,
        cell(&merges.iter().map(|m| m.ack_ms).collect::<Vec<_>>(), 0),
        cell(&merges.iter().map(|m| m.cpu_ms_per_msg).collect::<Vec<_>>(), 3),
    ));
    let ways = [
        (
            "HTTP, single-recipient requests",
            "clients, 1,000 requests per connection",
            &singles,
            single_rate,
        ),
        (
            "SMTP",
            "sessions, 1,000 messages per session",
            &smtps,
            smtp_rate,
        ),
    ];
    for (name, how, runs, rate) in ways {
        md.push_str(&format!(
            "| {name} | {} messages, {} {how} | {} | {:.2} | {} / {} | {} |\n",
            args.messages,
            args.concurrency,
            cell(&pick(runs, |b| b.rate), 0),
            rate / smtp_rate,
            cell(&pick(runs, |b| b.p50), 2),
            cell(&pick(runs, |b| b.p99), 2),
            cell(&pick(runs, |b| b.cpu_ms_per_msg), 3),
        ));
    }
    md.push_str(&format!(
        "\nGenerated messages averaged {:.0} bytes; the SMTP and single-request runs send messages of that size. Goal (for 100,000 recipients): ≥ 50,000 generated recipients/s{}.\n",
        merges.iter().map(|m| m.mean_size).sum::<f64>() / merges.len() as f64,
        match (args.recipients, merge_rate >= 50_000.0) {
            (100_000, true) => " — met",
            (100_000, false) => " — not met",
            _ => "",
        },
    ));
    print!("{md}");
    append_results(&args.results, &md)?;
    Ok(())
}
