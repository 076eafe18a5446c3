//! fault-bench: gannetd killed with SIGKILL again and again under SMTP and HTTP
//! injection load, each time started again at once on the same fixed ports, as a
//! supervisor's restart loop does. Reports how long each restart took to greet again,
//! how much was acknowledged, whether anything acknowledged was lost (it must not be),
//! and how many messages the spool holds twice. Appends the figures to
//! bench/RESULTS.md.
//!
//! Delivery is suspended so that every message accepted stays in the spool, which is
//! read at the end (shard directories, as `gannet-spool list` does).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "fault-bench", about = "kill -9 under load, immediate restarts")]
struct Args {
    /// SIGKILLs, each followed by an immediate restart.
    #[arg(long, default_value_t = 20)]
    kills: usize,
    /// Load between kills, milliseconds (a random time up to this).
    #[arg(long, default_value_t = 2000)]
    load_ms: u64,
    /// SMTP clients (a new connection per message) and HTTP clients.
    #[arg(long, default_value_t = 8)]
    smtp_clients: usize,
    #[arg(long, default_value_t = 4)]
    http_clients: usize,
    /// Shards of gannetd (0: one per core).
    #[arg(long, default_value_t = 0)]
    shards: usize,
    #[arg(long, default_value = "target/release/gannetd")]
    gannetd: PathBuf,
    /// Scratch directory (removed first).
    #[arg(long, default_value = "/tmp/gannet-fault-bench")]
    dir: PathBuf,
    /// Where to append the report ("" for nowhere).
    #[arg(long, default_value = "bench/RESULTS.md")]
    results: String,
}

const KEY: &str = "fault-bench-key-2f8e4c1a9b7d3065";

#[derive(Default)]
struct Acked {
    smtp: BTreeSet<String>,
    http: BTreeSet<String>,
}

fn smtp_client(addr: SocketAddr, n0: usize, stop: Arc<AtomicBool>, acked: Arc<Mutex<Acked>>) {
    let body = format!("{}\r\n", "z".repeat(76)).repeat(130); // ~10 KiB
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let ok = (|| -> Option<()> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
            // write! writes in pieces: without this, Nagle holds them for an ACK.
            s.set_nodelay(true).ok()?;
            let mut r = BufReader::new(s.try_clone().ok()?);
            let reply = |r: &mut BufReader<TcpStream>| -> Option<String> {
                let mut all = String::new();
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).ok()? == 0 {
                        return None;
                    }
                    all.push_str(&line);
                    if line.as_bytes().get(3) != Some(&b'-') {
                        return Some(all);
                    }
                }
            };
            reply(&mut r).filter(|l| l.starts_with("220"))?;
            write!(
                s,
                "EHLO f.test\r\nMAIL FROM:<s@b.test>\r\nRCPT TO:<s{n0}-{n}@d.test>\r\nDATA\r\n"
            )
            .ok()?;
            for code in ["250", "250", "250", "354"] {
                reply(&mut r).filter(|l| l.lines().last().is_some_and(|l| l.starts_with(code)))?;
            }
            write!(s, "Subject: fault {n0}-{n}\r\n\r\n{body}.\r\n").ok()?;
            let line = reply(&mut r)?;
            let id = line.trim_end().strip_prefix("250 2.0.0 OK queued as ")?;
            acked.lock().ok()?.smtp.insert(id.to_string());
            let _ = s.write_all(b"QUIT\r\n");
            Some(())
        })();
        if ok.is_none() {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn http_client(addr: SocketAddr, n0: usize, stop: Arc<AtomicBool>, acked: Arc<Mutex<Acked>>) {
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let rcpt = format!("h{n0}-{n}@x.test");
        let body = serde_json::json!({
            "recipients": [{"address": rcpt}],
            "content": {"from": "s@s.test", "subject": "fault", "text": "hello {{address}}"}
        })
        .to_string();
        let ok = (|| -> Option<()> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
            write!(
                s,
                "POST /api/v1/transmissions HTTP/1.1\r\nhost: f\r\nauthorization: {KEY}\r\n\
                 content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
            .ok()?;
            let mut reply = String::new();
            s.read_to_string(&mut reply).ok()?;
            reply.starts_with("HTTP/1.1 200").then_some(())?;
            acked.lock().ok()?.http.insert(rcpt);
            Some(())
        })();
        if ok.is_none() {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn start(gannetd: &Path, config: &Path) -> Result<Child> {
    Command::new(gannetd)
        .args([
            "--config",
            config.to_str().unwrap_or_default(),
            "--log",
            "error",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", gannetd.display()))
}

/// Waits until gannetd greets on `smtp`: the time from the start.
fn greets(child: &mut Child, smtp: SocketAddr, started: Instant) -> Result<Duration> {
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("gannetd exited at start: {status}");
        }
        if let Ok(s) = TcpStream::connect_timeout(&smtp, Duration::from_millis(200)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut line = String::new();
            if BufReader::new(s).read_line(&mut line).is_ok() && line.starts_with("220") {
                return Ok(started.elapsed());
            }
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("gannetd did not greet within 60 s of its start");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// (id, recipients) of every live message in the spool under `data`.
fn spooled(data: &Path) -> Result<Vec<(String, Vec<String>)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(data.join("spool"))? {
        let entry = entry?;
        let Some(shard) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u16>().ok())
        else {
            continue;
        };
        let storage = gannet_spool::FileStorage::read_only(entry.path())?;
        let (_, recovered) =
            gannet_spool::Spool::open(storage, gannet_spool::SpoolConfig::for_shard(shard))?;
        for live in recovered.live {
            let m = live.message.get();
            let recipients = m.recipients.iter().map(|r| r.to_string()).collect();
            out.push((live.id.to_string(), recipients));
        }
    }
    Ok(out)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() -> Result<()> {
    let args = Args::parse();
    let _ = std::fs::remove_dir_all(&args.dir);
    std::fs::create_dir_all(&args.dir)?;
    let (smtp_port, http_port) = (gannet_bench::free_port(), gannet_bench::free_port());
    let smtp: SocketAddr = format!("127.0.0.1:{smtp_port}").parse()?;
    let http: SocketAddr = format!("127.0.0.1:{http_port}").parse()?;
    let data = args.dir.join("data");
    let config = args.dir.join("gannetd.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nhostname = \"fault.test\"\ndata_dir = \"{}\"\nshards = {}\n\
             [smtp]\nlisten = [\"{smtp}\"]\nsessions_max = 100000\nsessions_per_ip_max = 100000\n\
             [http]\nlisten = [\"{http}\"]\n\
             api_keys = [{{ name = \"f\", key_sha256 = \"{}\", tenant = \"t\" }}]\n\
             [delivery]\nsuspended = true\n",
            data.display(),
            args.shards,
            gannet_core::auth::KeyDigest::of(KEY)
        ),
    )?;
    let mut child = start(&args.gannetd, &config)?;
    greets(&mut child, smtp, Instant::now())?;

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Acked::default()));
    let mut clients = Vec::new();
    for c in 0..args.smtp_clients {
        let (stop, acked) = (stop.clone(), acked.clone());
        clients.push(std::thread::spawn(move || {
            smtp_client(smtp, c, stop, acked)
        }));
    }
    for c in 0..args.http_clients {
        let (stop, acked) = (stop.clone(), acked.clone());
        clients.push(std::thread::spawn(move || {
            http_client(http, c, stop, acked)
        }));
    }
    let run_started = Instant::now();
    let mut restarts = Vec::new();
    for kill in 0..args.kills {
        std::thread::sleep(Duration::from_millis(fastrand::u64(
            200..=args.load_ms.max(200),
        )));
        let before = {
            let a = acked.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
            a.smtp.len() + a.http.len()
        };
        child.kill()?;
        child.wait()?;
        // At once, on the same ports.
        let started = Instant::now();
        child = start(&args.gannetd, &config)?;
        let took = greets(&mut child, smtp, started)
            .with_context(|| format!("restart {} of {}", kill + 1, args.kills))?;
        println!(
            "kill {:>2}: {before} acknowledged so far; greeting again {:.0} ms after the restart",
            kill + 1,
            took.as_secs_f64() * 1000.0
        );
        restarts.push(took);
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.join();
    }
    let elapsed = run_started.elapsed();
    // SAFETY: signalling the child we started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait()?;

    let acked = acked.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let spooled = spooled(&data)?;
    let ids: BTreeSet<&str> = spooled.iter().map(|(id, _)| id.as_str()).collect();
    let mut by_rcpt: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, recipients) in &spooled {
        for r in recipients {
            *by_rcpt.entry(r.as_str()).or_default() += 1;
        }
    }
    let lost_smtp = acked
        .smtp
        .iter()
        .filter(|id| !ids.contains(id.as_str()))
        .count();
    let lost_http = acked
        .http
        .iter()
        .filter(|r| !by_rcpt.contains_key(r.as_str()))
        .count();
    let duplicates: usize = by_rcpt.values().map(|n| n - 1).sum();
    // Written and synced, but the client never saw its acknowledgement (the kill came
    // between the sync and the reply): a client that sends again duplicates these.
    let unacknowledged = spooled
        .iter()
        .filter(|(id, recipients)| {
            !acked.smtp.contains(id) && !recipients.iter().any(|r| acked.http.contains(r))
        })
        .count();
    restarts.sort();
    let report = format!(
        "\n## fault-bench at {} ({})\n\n\
         Command: `./target/release/fault-bench --kills {} --load-ms {} --smtp-clients {} --http-clients {}`\n\
         Machine: {}. gannetd with {} shard(s), delivery suspended; SMTP clients send 10 KiB messages, \
         one connection each; HTTP clients POST single-recipient transmissions.\n\n\
         | kills | restarts that failed | greeting again after restart (min / median / max) | acknowledged SMTP + HTTP | lost | spooled | spooled, never acknowledged | duplicates in the spool | run |\n\
         |---|---|---|---|---|---|---|---|---|\n\
         | {} | 0 | {:.0} / {:.0} / {:.0} ms | {} + {} | {} | {} | {} | {} | {:.1} s |\n\n\
         Restart time grows with the spool: each start recovers every live message, and with \
         delivery suspended they add up ({} live at the end).\n",
        gannet_bench::command_output("git", &["rev-parse", "--short", "HEAD"]),
        gannet_bench::command_output("date", &["-u", "+%Y-%m-%d"]),
        args.kills,
        args.load_ms,
        args.smtp_clients,
        args.http_clients,
        gannet_bench::machine(),
        if args.shards == 0 {
            "one per core".to_string()
        } else {
            args.shards.to_string()
        },
        args.kills,
        percentile(&restarts, 0.0).as_secs_f64() * 1000.0,
        percentile(&restarts, 0.5).as_secs_f64() * 1000.0,
        percentile(&restarts, 1.0).as_secs_f64() * 1000.0,
        acked.smtp.len(),
        acked.http.len(),
        lost_smtp + lost_http,
        spooled.len(),
        unacknowledged,
        duplicates,
        elapsed.as_secs_f64(),
        spooled.len(),
    );
    print!("{report}");
    gannet_bench::append_results(&args.results, &report)?;
    let _ = std::fs::remove_dir_all(&args.dir);
    if lost_smtp + lost_http > 0 {
        bail!("{} acknowledged messages lost", lost_smtp + lost_http);
    }
    Ok(())
}
