//! script-bench: what the Lua policy script costs per message.
//!
//! The same SMTP load (gannet-blast, as fast as it goes, a new connection every
//! `--per-connection` messages) is offered to gannetd on one shard, in two modes:
//! `accept` (delivery suspended: acceptance alone) and `relay` (each message also
//! delivered to postfix's smtp-sink by a static route; the round ends once all are),
//! with:
//! - `none`: no script;
//! - `empty`: a script with an empty function at every phase gannet calls (connect,
//!   EHLO, MAIL, RCPT, data, message received);
//! - `lua`: a typical rule set written in Lua — a refused client network, refused
//!   sender and recipient domains (ten each), and after DATA the tenant set from a
//!   header and the header removed;
//! - `rules`: the same refusals as declarative `[policy] rules`, and the tenant from
//!   the tenant header (what gannet does without a script).
//!
//! Every system runs `--rounds` times, interleaved (none, empty, lua, rules, none, …)
//! so that drift of the machine touches them alike; the median of its rounds is
//! kept: messages accepted per second, gannetd's CPU µs per message (all its threads'
//! run time) and of it the user-space µs (what a script adds: it makes no system
//! call). The whole CPU of a round moves by 5–10% between rounds of one system on
//! this machine, mostly the kernel's network work; so besides the change in whole
//! CPU, the table gives the change in user CPU against the whole CPU without a
//! script. And because a hook's work is a few µs in 70 that move by 5, the hooks'
//! own work is measured apart as well, in this process on one thread
//! ([`hooks_alone`]: the same calls for the same message mix, no network), and set
//! against the whole CPU per message of `none`. Goals (issue 21): an empty hook set under 5% of CPU per message, the
//! typical set under 15%. Results go to bench/RESULTS.md.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Parser;
use gannet_bench::{append_results, command_line, command_output, machine, servers};
use gannet_tools::plan::calibrate::{confine, process_cpu_seconds, process_user_cpu_seconds};

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
    /// A script of your own, measured as the system `file` (`--systems none,file`).
    #[arg(long)]
    script: Option<PathBuf>,
    /// `accept` (delivery suspended) and/or `relay` (delivered to smtp-sink).
    #[arg(long, default_value = "accept,relay")]
    modes: String,
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

/// One round's figures.
#[derive(Debug, Clone, Copy)]
struct Measured {
    /// Messages accepted per second.
    rate: f64,
    /// gannetd's CPU µs per message accepted: all of it, and in user space.
    cpu_us: f64,
    user_us: f64,
}

/// The hooks' own work per message, in this process on one thread (no sockets, no
/// spool): what the session asks of the script for each message the load sends —
/// per connection of `per_connection` messages the connection and EHLO hooks, per
/// message MAIL and RCPT (2% to the refused domain, whose RCPT the typical set
/// refuses) and, when accepted, the data and received hooks on a 4 KiB message
/// with its Received field, the envelope copied into the message object as the
/// session copies it. The thread's CPU µs per message.
fn hooks_alone(source: &str, messages: u64, per_connection: u64) -> Result<f64> {
    use gannet_engine::policy::Client;
    use gannet_engine::policy::script::{ConnSlot, Hook, Message, Outcome, Script};
    let script = Script::load("bench.lua", source, 1_000_000).map_err(anyhow::Error::msg)?;
    let client = Client {
        ip: std::net::IpAddr::from([127, 0, 0, 1]),
        helo: Some("blast.test"),
        tls: false,
        auth_user: None,
    };
    let mut body = b"Received: from blast.test ([127.0.0.1]) by gannet.bench (gannet) with ESMTP id 0123456789abcdef; Mon, 7 Dec 2026 18:00:00 +0000\r\n".to_vec();
    body.extend_from_slice(&gannet_bench::mail::message(
        1,
        4096,
        "s@bench.test",
        "r@ok.test",
    ));
    let sender = "s@bench.test".to_string();
    let (ok, refused) = ("r@ok.test".to_string(), "r@blocked.test".to_string());
    let mut slot = ConnSlot::default();
    let started = thread_cpu_seconds();
    for n in 0..messages {
        if n % per_connection == 0 {
            slot = ConnSlot::default();
            script.connection_accepted(&slot, &client);
            script.ehlo(&slot, &client);
        }
        script.mail_from(&slot, &client, &sender);
        let rcpt = if n % 50 == 0 { &refused } else { &ok };
        if script.rcpt_to(&slot, &client, rcpt) != Outcome::Continue {
            continue;
        }
        let message = Message {
            sender: sender.clone(),
            recipients: vec![rcpt.clone()],
            meta: Vec::new(),
            body: std::mem::take(&mut body),
        };
        let (_, back) = script.smtp_message(
            &[Hook::Data, Hook::MessageReceived],
            &slot,
            &client,
            message,
        );
        body = back.body;
    }
    Ok((thread_cpu_seconds() - started) * 1e6 / messages as f64)
}

/// This thread's CPU time so far.
fn thread_cpu_seconds() -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

/// One round of `system` in `mode`.
fn round(args: &Args, mode: &str, system: &str) -> Result<Measured> {
    let dir = args.dir.join(format!("{mode}-{system}"));
    let policy = match system {
        "none" => String::new(),
        "empty" | "lua" => {
            let script = args.dir.join(format!("{system}.lua"));
            std::fs::create_dir_all(&args.dir)?;
            std::fs::write(&script, if system == "empty" { EMPTY } else { TYPICAL })?;
            format!("script = \"{}\"\n", script.display())
        }
        "rules" => rules(),
        "file" => match &args.script {
            Some(path) => format!("script = \"{}\"\n", std::fs::canonicalize(path)?.display()),
            None => bail!("the system file needs --script"),
        },
        other => bail!("no system {other} (none, empty, lua, rules, file)"),
    };
    let sink = match mode {
        "accept" => None,
        "relay" => {
            let sink = servers::smtp_sink(&[], false)?;
            confine(sink.pid, 1);
            Some(sink)
        }
        other => bail!("no mode {other} (accept, relay)"),
    };
    let delivery = match &sink {
        None => "suspended = true\n".to_string(),
        // Both domains: without a script the refused domain's mail is accepted and
        // delivered too.
        Some(sink) => format!(
            "routes = {{ \"ok.test\" = [\"127.0.0.1:{0}\"], \"blocked.test\" = [\"127.0.0.1:{0}\"] }}\n",
            sink.port
        ),
    };
    let rest = format!("[policy]\n{policy}[delivery]\n{delivery}");
    let server = servers::gannetd(&args.gannetd, &dir, 1, "pin_cores = false", &rest)?;
    confine(server.pid, 0);
    let (cpu0, user0) = (
        process_cpu_seconds(server.pid),
        process_user_cpu_seconds(server.pid),
    );
    // 2% of the mail to a refused domain: the refusal path is exercised too.
    let result = gannet_bench::blast_on_core_1(
        &args.blast,
        server.port,
        args.messages,
        args.per_connection,
        "ok.test:98,blocked.test:2",
    )
    .with_context(|| format!("{mode} {system}"))?;
    let accepted = result["recipients_accepted"].as_f64().unwrap_or(0.0);
    let seconds = result["seconds"].as_f64().unwrap_or(f64::NAN);
    if sink.is_some() {
        // Relaying: the round ends once every accepted message is delivered.
        let http = std::net::SocketAddr::from(([127, 0, 0, 1], server.http_port));
        gannet_bench::wait_delivered(http, accepted).with_context(|| format!("{mode} {system}"))?;
    }
    let cpu = process_cpu_seconds(server.pid) - cpu0;
    let user = process_user_cpu_seconds(server.pid) - user0;
    server.stop()?;
    if let Some(sink) = sink {
        sink.stop()?;
    }
    Ok(Measured {
        rate: accepted / seconds,
        cpu_us: cpu * 1e6 / accepted,
        user_us: user * 1e6 / accepted,
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
        bail!("script-bench needs two cores: gannetd on one, the load on the other");
    }
    let systems: Vec<&str> = args.systems.split(',').collect();
    let modes: Vec<&str> = args.modes.split(',').collect();
    let runs: Vec<(&str, &str)> = modes
        .iter()
        .flat_map(|m| systems.iter().map(move |s| (*m, *s)))
        .collect();
    // The hooks' own work, in process (steady: no network, no other process).
    let mut alone: Vec<(&str, f64)> = Vec::new();
    for system in systems.iter().filter(|s| matches!(**s, "empty" | "lua")) {
        let source = if *system == "empty" { EMPTY } else { TYPICAL };
        let rounds: Vec<f64> = (0..args.rounds.max(3))
            .map(|_| hooks_alone(source, args.messages, args.per_connection))
            .collect::<Result<_>>()?;
        let us = gannet_bench::harness::median_range(&rounds).0;
        eprintln!("hooks alone {system}: {us:.2} µs/msg");
        alone.push((system, us));
    }
    let mut measured: Vec<Vec<Measured>> = vec![Vec::new(); runs.len()];
    for r in 0..args.rounds {
        for (i, (mode, system)) in runs.iter().enumerate() {
            let m = round(&args, mode, system)?;
            eprintln!(
                "round {r} {mode} {system}: {:.0} msgs/s, {:.1} µs/msg, {:.1} user",
                m.rate, m.cpu_us, m.user_us
            );
            measured[i].push(m);
        }
    }
    let median = |v: Vec<f64>| gannet_bench::harness::median_range(&v).0;
    let rows: Vec<(&str, &str, Measured)> = runs
        .iter()
        .zip(&measured)
        .map(|((mode, system), m)| {
            let of = |f: fn(&Measured) -> f64| median(m.iter().map(f).collect());
            let row = Measured {
                rate: of(|x| x.rate),
                cpu_us: of(|x| x.cpu_us),
                user_us: of(|x| x.user_us),
            };
            (*mode, *system, row)
        })
        .collect();

    use std::fmt::Write as _;
    let mut md = String::new();
    let rev = command_output("git", &["rev-parse", "--short", "HEAD"]);
    let date = command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    writeln!(md, "\n## Policy script cost per message — {date}\n")?;
    writeln!(md, "- command: `{}`", command_line())?;
    writeln!(md, "- machine: {}", machine())?;
    writeln!(
        md,
        "- revision: {rev}; gannetd on one shard confined to core 0 (accept: delivery suspended; relay: delivered to smtp-sink on core 1 by a static route), gannet-blast on core 1: {} messages of 4 KiB per round, 32 connections of {} messages, 2% to a refused domain; {} interleaved rounds per mode and system, medians\n",
        args.messages, args.per_connection, args.rounds
    )?;
    writeln!(
        md,
        "| mode | system | msgs/s | gannetd CPU µs per message | of it user space | CPU against no script | user CPU added, against the whole CPU without a script |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|")?;
    for (mode, system, m) in &rows {
        let base = rows
            .iter()
            .find(|r| r.0 == *mode && r.1 == "none")
            .map(|r| r.2);
        let (against, added) = base.map_or(("—".to_string(), "—".to_string()), |b| {
            (
                format!("{:+.1}%", (m.cpu_us / b.cpu_us - 1.0) * 100.0),
                format!("{:+.1}%", (m.user_us - b.user_us) / b.cpu_us * 100.0),
            )
        });
        writeln!(
            md,
            "| {mode} | {system} | {:.0} | {:.1} | {:.1} | {against} | {added} |",
            m.rate, m.cpu_us, m.user_us
        )?;
    }
    if !alone.is_empty() {
        writeln!(
            md,
            "\nThe hooks' own work per message, measured in process on one thread (`hooks_alone`: the same hook calls for the same message mix, no network or spool; median of {} runs of {} messages), against the whole CPU per message of `none` above:\n",
            args.rounds.max(3),
            args.messages
        )?;
        writeln!(
            md,
            "| system | hook CPU µs per message | {} |",
            modes
                .iter()
                .map(|m| format!("against {m} none"))
                .collect::<Vec<_>>()
                .join(" | ")
        )?;
        writeln!(md, "|---|---|{}", "---|".repeat(modes.len()))?;
        for (system, us) in &alone {
            let shares: Vec<String> = modes
                .iter()
                .map(|mode| {
                    rows.iter()
                        .find(|r| r.0 == *mode && r.1 == "none")
                        .map_or("—".to_string(), |r| {
                            format!("{:+.1}%", us / r.2.cpu_us * 100.0)
                        })
                })
                .collect();
            writeln!(md, "| {system} | {us:.2} | {} |", shares.join(" | "))?;
        }
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
