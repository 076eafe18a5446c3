//! script-bench: what the Lua policy script costs per message.
//!
//! The same SMTP load (gannet-blast, as fast as it goes, a new connection every
//! `--per-connection` messages, delivery suspended so that acceptance is measured)
//! is offered to gannetd on one shard with:
//! - `none`: no script;
//! - `empty`: a script with an empty function at every phase gannet calls (connect,
//!   EHLO, MAIL, RCPT, message received);
//! - `lua`: a typical rule set written in Lua — a refused client network, refused
//!   sender and recipient domains (ten each), and after DATA the tenant set from a
//!   header and the header removed;
//! - `rules`: the same refusals as declarative `[policy] rules`, and the tenant from
//!   the tenant header (what gannet does without a script).
//!
//! Every system runs `--rounds` times, interleaved (none, empty, lua, rules, none, …)
//! so that drift of the machine touches them alike; the median of its rounds is
//! kept: messages accepted per second and gannetd's CPU µs per message. Goals (issue
//! 21): an empty hook set under 5% of CPU per message, the typical set under 15%.
//! Results go to bench/RESULTS.md.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use clap::Parser;
use gannet_bench::{append_results, command_line, command_output, machine, servers};
use gannet_tools::plan::calibrate::{confine, process_cpu_seconds};

#[derive(Debug, Parser)]
#[command(
    about = "The Lua policy script's cost per message: none, empty hooks, a typical set in Lua and as rules"
)]
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
    #[arg(long, default_value = "none,empty,lua,rules")]
    systems: String,
    #[arg(long, default_value = "target/release/gannetd")]
    gannetd: PathBuf,
    #[arg(long, default_value = "target/release/gannet-blast")]
    blast: PathBuf,
    #[arg(long, default_value = "/tmp/gannet-script-bench")]
    dir: PathBuf,
    /// Markdown report appended here ("" to skip).
    #[arg(long, default_value = "bench/RESULTS.md")]
    results: String,
}

const EMPTY: &str = r#"
gannet.on("smtp_server_connection_accepted", function(conn) end)
gannet.on("smtp_server_ehlo", function(domain, conn) end)
gannet.on("smtp_server_mail_from", function(sender, conn) end)
gannet.on("smtp_server_mail_rcpt_to", function(rcpt, conn) end)
gannet.on("smtp_server_data", function(msg, conn) end)
gannet.on("smtp_server_message_received", function(msg, conn) end)
"#;

const TYPICAL: &str = r#"
local refused_senders = {}
for i = 1, 10 do refused_senders["spam" .. i .. ".test"] = true end
local refused_recipients = {}
for i = 1, 9 do refused_recipients["closed" .. i .. ".test"] = true end
refused_recipients["blocked.test"] = true

gannet.on("smtp_server_connection_accepted", function(conn)
  local peer = conn:get_meta("received_from")
  if peer:sub(1, 8) == "192.0.2." then gannet.reject(554, "5.7.1 not from this network") end
end)
gannet.on("smtp_server_mail_from", function(sender, conn)
  if refused_senders[sender.domain] then gannet.reject(550, "5.7.1 sender refused") end
end)
gannet.on("smtp_server_mail_rcpt_to", function(rcpt, conn)
  if refused_recipients[rcpt.domain] then gannet.reject(550, "5.7.1 recipient refused") end
end)
gannet.on("smtp_server_message_received", function(msg, conn)
  local tenant = msg:get_first_named_header_value("X-Bench-Tenant") or "acme"
  msg:set_meta("tenant", tenant)
  msg:remove_all_named_headers("X-Bench-Tenant")
end)
"#;

fn rules() -> String {
    let senders: Vec<String> = (1..=10).map(|i| format!("\"spam{i}.test\"")).collect();
    let mut recipients: Vec<String> = (1..=9).map(|i| format!("\"closed{i}.test\"")).collect();
    recipients.push("\"blocked.test\"".into());
    format!(
        "tenant_header = \"X-Bench-Tenant\"\nrules = [\n\
         {{ phase = \"connect\", client_networks = [\"192.0.2.0/24\"], action = \"reject\" }},\n\
         {{ phase = \"mail_from\", sender_domains = [{}], action = \"reject\" }},\n\
         {{ phase = \"rcpt_to\", recipient_domains = [{}], action = \"reject\" }},\n]\n",
        senders.join(", "),
        recipients.join(", ")
    )
}

/// One round: (messages accepted per second, gannetd CPU µs per message accepted).
fn round(args: &Args, system: &str) -> Result<(f64, f64)> {
    let dir = args.dir.join(system);
    let policy = match system {
        "none" => String::new(),
        "empty" | "lua" => {
            let script = args.dir.join(format!("{system}.lua"));
            std::fs::create_dir_all(&args.dir)?;
            std::fs::write(&script, if system == "empty" { EMPTY } else { TYPICAL })?;
            format!("script = \"{}\"\n", script.display())
        }
        "rules" => rules(),
        other => bail!("no system {other} (none, empty, lua, rules)"),
    };
    let rest = format!("[policy]\n{policy}[delivery]\nsuspended = true\n");
    let server = servers::gannetd(&args.gannetd, &dir, 1, "pin_cores = false", &rest)?;
    confine(server.pid, 0);
    let cpu0 = process_cpu_seconds(server.pid);
    let out = Command::new("taskset")
        .args(["-c", "1"])
        .arg(&args.blast)
        .args([
            "--server",
            &format!("127.0.0.1:{}", server.port),
            "--json-only",
        ])
        .args(["--messages", &args.messages.to_string()])
        .args(["--per-connection", &args.per_connection.to_string()])
        .args(["--concurrency", "32", "--size", "4k"])
        // 2% of the mail to a refused domain: the refusal path is exercised too.
        .args(["--domains", "ok.test:98,blocked.test:2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .context("running gannet-blast")?;
    let cpu = process_cpu_seconds(server.pid) - cpu0;
    server.stop()?;
    if !out.status.success() {
        bail!("gannet-blast: {}", String::from_utf8_lossy(&out.stderr));
    }
    let result: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let accepted = result["recipients_accepted"].as_f64().unwrap_or(0.0);
    let seconds = result["seconds"].as_f64().unwrap_or(f64::NAN);
    if accepted < 1.0 {
        bail!("{system}: nothing accepted: {result}");
    }
    Ok((accepted / seconds, cpu * 1e6 / accepted))
}

fn main() -> Result<()> {
    let args = Args::parse();
    for bin in [&args.gannetd, &args.blast] {
        if !bin.exists() {
            bail!("{} is missing: cargo build --release", bin.display());
        }
    }
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        bail!("script-bench needs two cores: gannetd on one, the load on the other");
    }
    let systems: Vec<&str> = args.systems.split(',').collect();
    let mut measured: Vec<Vec<(f64, f64)>> = vec![Vec::new(); systems.len()];
    for r in 0..args.rounds {
        for (i, system) in systems.iter().enumerate() {
            let m = round(&args, system)?;
            eprintln!("round {r} {system}: {:.0} msgs/s, {:.1} µs/msg", m.0, m.1);
            measured[i].push(m);
        }
    }
    let median = |v: Vec<f64>| gannet_bench::harness::median_range(&v).0;
    let rows: Vec<(&str, f64, f64)> = systems
        .iter()
        .zip(&measured)
        .map(|(s, m)| {
            let rates = m.iter().map(|x| x.0).collect();
            let cpus = m.iter().map(|x| x.1).collect();
            (*s, median(rates), median(cpus))
        })
        .collect();
    let base = rows.iter().find(|r| r.0 == "none").map(|r| r.2);

    use std::fmt::Write as _;
    let mut md = String::new();
    let rev = command_output("git", &["rev-parse", "--short", "HEAD"]);
    let date = command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    writeln!(md, "\n## Policy script cost per message — {date}\n")?;
    writeln!(md, "- command: `{}`", command_line())?;
    writeln!(md, "- machine: {}", machine())?;
    writeln!(
        md,
        "- revision: {rev}; gannetd on one shard confined to core 0, delivery suspended (acceptance), gannet-blast on core 1: {} messages of 4 KiB per round, 32 connections of {} messages, 2% to a refused domain; {} interleaved rounds per system, medians\n",
        args.messages, args.per_connection, args.rounds
    )?;
    writeln!(
        md,
        "| system | msgs/s | gannetd CPU µs per message | CPU against no script |"
    )?;
    writeln!(md, "|---|---|---|---|")?;
    for (system, rate, cpu) in &rows {
        let against = base.map_or(String::from("—"), |b| {
            format!("{:+.1}%", (cpu / b - 1.0) * 100.0)
        });
        writeln!(md, "| {system} | {rate:.0} | {cpu:.1} | {against} |")?;
    }
    writeln!(
        md,
        "\nGoals: `empty` under +5%, `lua` under +15% of the CPU per message without a script."
    )?;
    print!("{md}");
    append_results(&args.results, &md)?;
    let _ = std::fs::remove_dir_all(&args.dir);
    Ok(())
}
