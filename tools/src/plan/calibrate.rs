//! `gannet-plan calibrate`: short, bounded measurements of this host through gannetd
//! itself, written as a profile.
//!
//! Each measurement starts a fresh gannetd with one shard, every thread of it
//! confined to core 0, drives it as fast as it goes from 64 connections of this
//! process's threads on the other cores (so that the load and the sink do not share
//! the measured core), and reads gannetd's own CPU time from /proc before and after:
//! what one saturated core spends per message (each measurement the median of three
//! rounds of at least a second each), and the share of that core gannetd gets while relaying flat out. Sizes are measured at two points and joined by a line:
//! - SMTP acceptance (durable 250, delivery suspended): CPU, spool bytes (records
//!   appended) and bytes written to the disk, memory per queued message;
//! - memory per destination domain's queue (the same messages to one domain and
//!   to as many domains);
//! - relay (acceptance and one delivery to a sink in this process, by a static
//!   route): CPU, spool bytes and bytes written to the disk; and the acknowledgement's p99 at half the relay
//!   rate (2 KiB messages at a fixed rate);
//! - DKIM (acceptance with an Ed25519 or RSA-2048 key, less acceptance without);
//! - TLS (STARTTLS with one message per connection, less plaintext; and bulk);
//! - HTTP transmissions (generation per recipient, delivery suspended; and
//!   generation with one delivery to the sink);
//! - the disk: 4 KiB write + fdatasync latencies, and 1 MiB write + fdatasync
//!   bandwidth, in the directory given (put it on the spool's filesystem).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use super::profile::{Disk, Host, Linear, Profile, TlsCost};

/// The API key the calibration's gannetd accepts transmissions with.
const KEY: &str = "gannet-plan-calibration-key";
/// The sizes measured (bytes).
const SMALL: usize = 2 << 10;
const LARGE: usize = 64 << 10;
/// Measured rounds per measurement (their median is kept).
const ROUNDS: u64 = 3;
/// Messages per SMTP connection (acceptance, DKIM, relay).
const PER_CONNECTION: u64 = 50;
/// DKIM keys loaded beside the signing one, to measure a key's memory.
const DKIM_KEYS: usize = 500;
/// A measured round lasts at least this long (more messages than asked for when
/// gannetd is fast), so that a round is not a blip of a noisy machine.
const MIN_ROUND_SECS: f64 = 1.0;
/// Seconds of fixed-rate load for the acknowledgement latency.
const LATENCY_SECS: f64 = 2.0;
/// Concurrent client connections: enough that gannetd, not the client, sets the
/// pace, so that costs are measured at saturation (where a core batches the most
/// work per wake-up, and where capacity is decided).
const CONNECTIONS: usize = 64;

#[derive(Debug, Clone)]
pub struct Options {
    pub gannetd: PathBuf,
    /// Scratch directory, on the filesystem the spool will use.
    pub dir: PathBuf,
    /// Messages per measurement.
    pub messages: u64,
    pub revision: String,
}

/// Measures this host; `say` is told what is being measured.
pub fn calibrate(o: &Options, say: &mut dyn FnMut(&str)) -> Result<Profile> {
    if o.messages < 10 {
        bail!("--messages: at least 10 per measurement");
    }
    std::fs::create_dir_all(&o.dir).with_context(|| format!("creating {}", o.dir.display()))?;
    let host = host(&o.dir);
    // gannetd on core 0, the load and the sink on the others.
    let load_cores = (host.cores > 1).then_some(1);
    let n = o.messages;
    // Before each measurement, untimed: connections made, caches and buffers grown,
    // so that what is measured is the steady state.
    let warm = (n / 4).max(10);

    say("disk: flush latency and bandwidth");
    let disk = disk(&o.dir, n.clamp(50, 1000) as usize)?;

    say("SMTP acceptance");
    let mut accept = Vec::new();
    let mut spool_accept = Vec::new();
    let mut write_accept = Vec::new();
    let (mut queued, mut base_rss) = (0.0, 0.0);
    for size in [SMALL, LARGE] {
        let g = Gannetd::start(o, "accept", "")?;
        let rss0 = g.status_kb("VmRSS:") * 1024;
        let t = Instant::now();
        smtp_load(g.smtp, warm, size, PER_CONNECTION, None, load_cores)?;
        let n = enough(n, warm, t.elapsed());
        let anon0 = g.status_kb("RssAnon:") * 1024;
        let (written0, appended0) = (g.written_bytes(), g.appended_bytes()?);
        let cpu = g.measure(|_| smtp_load(g.smtp, n, size, PER_CONNECTION, None, load_cores))?;
        let per_message = |bytes: f64| bytes / (ROUNDS * n) as f64;
        write_accept.push((
            size as f64,
            per_message(g.written_bytes().saturating_sub(written0) as f64),
        ));
        spool_accept.push((size as f64, per_message(g.appended_bytes()? - appended0)));
        if size == SMALL {
            base_rss = rss0 as f64;
            let anon = g.status_kb("RssAnon:") * 1024;
            queued = anon.saturating_sub(anon0) as f64 / (ROUNDS * n) as f64;
        }
        g.stop()?;
        accept.push((size as f64, cpu / n as f64));
    }
    let smtp_accept_us = Linear::through(accept[0], accept[1]);

    say("queues per destination domain");
    // The same messages to one domain and to as many domains as messages: the
    // difference in resident memory is the domains' queues.
    let domains = n.clamp(100, 2000);
    let mut grown = Vec::new();
    for spread in [1, domains] {
        let g = Gannetd::start(o, "queues", "")?;
        let anon0 = g.status_kb("RssAnon:") * 1024;
        let mut client = Client::connect(g.smtp, None)?;
        let body = message(SMALL, 0);
        for k in 0..domains {
            client.send_to(&body, &format!("r{k}@d{}.dest.test", k % spread))?;
        }
        grown.push((g.status_kb("RssAnon:") * 1024).saturating_sub(anon0) as f64);
        g.stop()?;
    }
    let queue_bytes = ((grown[1] - grown[0]) / (domains - 1) as f64).max(0.0);

    say("relay to a sink");
    let mut relay = Vec::new();
    let mut spool_relay = Vec::new();
    let mut write_relay = Vec::new();
    // gannetd's share of its saturated core while relaying: the rest is the
    // kernel's work for it (network softirqs) and the scheduler's.
    let mut shares = Vec::new();
    let mut ack_p99_ms = 0.0;
    for size in [SMALL, LARGE] {
        let sink = Sink::start(load_cores)?;
        let g = Gannetd::start(o, "relay", &sink.route())?;
        let t = Instant::now();
        smtp_load(g.smtp, warm, size, PER_CONNECTION, None, load_cores)?;
        sink.wait_for(warm, Duration::from_secs(600))?;
        let n = enough(n, warm, t.elapsed());
        let (written0, appended0) = (g.written_bytes(), g.appended_bytes()?);
        let (cpu, share) = g.measure_share(|round| {
            smtp_load(g.smtp, n, size, PER_CONNECTION, None, load_cores)?;
            sink.wait_for(warm + (round + 1) * n, Duration::from_secs(600))
        })?;
        let per_message = |bytes: f64| bytes / (ROUNDS * n) as f64;
        write_relay.push((
            size as f64,
            per_message(g.written_bytes().saturating_sub(written0) as f64),
        ));
        spool_relay.push((size as f64, per_message(g.appended_bytes()? - appended0)));
        shares.push(share);
        if size == SMALL {
            // The acknowledgement's wait below the knee: half of what this core
            // relays, offered at a fixed rate.
            // The median of three probes: a stall of the machine (this is often a
            // virtual one) in one of them is not the host's latency.
            let rate = 0.5 * share * 1e6 * n as f64 / cpu.max(1.0);
            let mut p99s = Vec::new();
            for _ in 0..ROUNDS {
                let mut latencies = paced_latencies(g.smtp, rate, LATENCY_SECS, size, load_cores)?;
                p99s.push(quantile(&mut latencies, 0.99));
            }
            ack_p99_ms = median(p99s);
        }
        g.stop()?;
        relay.push((size as f64, cpu / n as f64));
    }

    let mut dkim_us = std::collections::BTreeMap::new();
    let mut dkim_key_bytes = 0.0;
    for (name, algorithm, bits) in [
        ("ed25519", crate::keys::Algorithm::Ed25519, 0),
        ("rsa2048", crate::keys::Algorithm::Rsa, 2048),
    ] {
        say(&format!("DKIM {name}"));
        let (pkcs8, _, _) = crate::keys::generate(algorithm, bits).map_err(|e| anyhow!(e))?;
        let key = o.dir.join(format!("{name}.pem"));
        std::fs::write(&key, crate::keys::pem(&pkcs8))?;
        let mut points = Vec::new();
        // The RSA runs also load DKIM_KEYS more keys (for other domains), to measure
        // a key's memory.
        let more = if bits > 0 { DKIM_KEYS } else { 0 };
        let entries: Vec<String> = std::iter::once("calib.test".to_string())
            .chain((0..more).map(|i| format!("k{i}.calib.test")))
            .map(|domain| {
                format!(
                    "{{ domain = \"{domain}\", selector = \"s\", key_file = \"{}\" }}",
                    key.display()
                )
            })
            .collect();
        let config = format!("[dkim]\nkeys = [{}]\n", entries.join(", "));
        for size in [SMALL, LARGE] {
            let g = Gannetd::start(o, "dkim", &config)?;
            if more > 0 && size == SMALL {
                let rss = (g.status_kb("VmRSS:") * 1024) as f64;
                dkim_key_bytes = ((rss - base_rss) / more as f64).max(0.0);
            }
            let t = Instant::now();
            smtp_load(g.smtp, warm, size, PER_CONNECTION, None, load_cores)?;
            let n = enough(n, warm, t.elapsed());
            let cpu =
                g.measure(|_| smtp_load(g.smtp, n, size, PER_CONNECTION, None, load_cores))?;
            let signed = g.metric("dkim_signatures_total")? - warm as f64;
            g.stop()?;
            if signed < (ROUNDS * n) as f64 {
                bail!("DKIM {name}: {signed} of {} messages signed", ROUNDS * n);
            }
            points.push((size as f64, cpu / n as f64 - smtp_accept_us.at(size as f64)));
        }
        dkim_us.insert(name.to_string(), Linear::through(points[0], points[1]));
    }

    say("TLS");
    let tls_client = tls_client();
    let handshakes = n.min(2000);
    let per_connection_cpu = |tls: Option<Arc<rustls::ClientConfig>>| -> Result<f64> {
        let g = Gannetd::start(o, "tls", "")?;
        smtp_load(g.smtp, warm, SMALL, 1, tls.clone(), load_cores)?;
        let cpu =
            g.measure(|_| smtp_load(g.smtp, handshakes, SMALL, 1, tls.clone(), load_cores))?;
        g.stop()?;
        Ok(cpu / handshakes as f64)
    };
    let handshake_us =
        (per_connection_cpu(Some(tls_client.clone()))? - per_connection_cpu(None)?).max(0.0);
    let g = Gannetd::start(o, "tls", "")?;
    smtp_load(
        g.smtp,
        warm,
        LARGE,
        PER_CONNECTION,
        Some(tls_client.clone()),
        load_cores,
    )?;
    let bulk = g.measure(|_| {
        smtp_load(
            g.smtp,
            n,
            LARGE,
            PER_CONNECTION,
            Some(tls_client.clone()),
            load_cores,
        )
    })?;
    g.stop()?;
    let extra =
        bulk / n as f64 - smtp_accept_us.at(LARGE as f64) - handshake_us / PER_CONNECTION as f64;
    let tls = TlsCost {
        handshake_us,
        per_kib_us: (extra / (LARGE as f64 / 1024.0)).max(0.0),
    };

    say("HTTP transmissions");
    let mut http = Vec::new();
    for size in [SMALL, LARGE] {
        let g = Gannetd::start(o, "http", "")?;
        let t = Instant::now();
        http_load(&g, warm, size, load_cores)?;
        let n = enough(n, warm, t.elapsed());
        let cpu = g.measure(|_| http_load(&g, n, size, load_cores))?;
        g.stop()?;
        http.push((size as f64, cpu / n as f64));
    }
    say("HTTP transmissions relayed to a sink");
    let mut http_relay = Vec::new();
    for size in [SMALL, LARGE] {
        let sink = Sink::start(load_cores)?;
        let g = Gannetd::start(o, "http-relay", &sink.route())?;
        let t = Instant::now();
        http_load(&g, warm, size, load_cores)?;
        sink.wait_for(warm, Duration::from_secs(600))?;
        let n = enough(n, warm, t.elapsed());
        let cpu = g.measure(|round| {
            http_load(&g, n, size, load_cores)?;
            sink.wait_for(warm + (round + 1) * n, Duration::from_secs(600))
        })?;
        g.stop()?;
        http_relay.push((size as f64, cpu / n as f64));
    }

    Ok(Profile {
        revision: o.revision.clone(),
        date: utc_now(),
        host,
        shards: 1,
        core_share: shares.iter().copied().fold(0.0, f64::max).clamp(0.5, 1.0),
        smtp_accept_us,
        relay_us: Linear::through(relay[0], relay[1]),
        http_us: Linear::through(http[0], http[1]),
        http_relay_us: Linear::through(http_relay[0], http_relay[1]),
        dkim_us,
        tls,
        disk,
        spool_accept_bytes: Linear::through(spool_accept[0], spool_accept[1]),
        spool_relay_bytes: Linear::through(spool_relay[0], spool_relay[1]),
        disk_write_accept_bytes: Linear::through(write_accept[0], write_accept[1]),
        disk_write_relay_bytes: Linear::through(write_relay[0], write_relay[1]),
        queued_bytes_per_message: queued,
        base_rss_bytes: base_rss,
        dkim_key_bytes,
        queue_bytes,
        ack_p99_base_ms: (ack_p99_ms - (disk.flush_p50_us + disk.flush_p99_us) / 1000.0).max(0.0),
    })
}

/// Messages per round: at least `n`, and enough for [`MIN_ROUND_SECS`] at the
/// rate the warm-up (`warm` messages in `took`) went, within 20 × `n`.
fn enough(n: u64, warm: u64, took: Duration) -> u64 {
    let rate = warm as f64 / took.as_secs_f64().max(1e-3);
    ((rate * MIN_ROUND_SECS) as u64).clamp(n, n.saturating_mul(20))
}

/// What the machine is.
fn host(dir: &Path) -> Host {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let memory_bytes = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024;
    let disk = mount_of(dir);
    Host {
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory_bytes,
        cpu,
        kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
        disk,
    }
}

/// The filesystem holding `dir`, as "device on mount point (type)": the longest
/// mount point that is a prefix of it.
pub fn mount_of(dir: &Path) -> String {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3 && dir.starts_with(f[1]))
                .then(|| (f[1].len(), format!("{} on {} ({})", f[0], f[1], f[2])))
        })
        .max()
        .map(|(_, d)| d)
        .unwrap_or_default()
}

/// Flush latency (4 KiB + fdatasync, `n` times) and bandwidth (1 MiB + fdatasync,
/// 64 times) in `dir`.
pub fn disk(dir: &Path, n: usize) -> Result<Disk> {
    use std::os::unix::fs::FileExt as _;
    let path = dir.join("flush-probe");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let page = [0x5au8; 4096];
    let mut latencies = Vec::with_capacity(n);
    for i in 0..n {
        let t0 = Instant::now();
        file.write_all_at(&page, (i * 4096) as u64)?;
        file.sync_data()?;
        latencies.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    let chunk = vec![0xa5u8; 1 << 20];
    let t0 = Instant::now();
    for i in 0..64u64 {
        file.write_all_at(&chunk, i << 20)?;
        file.sync_data()?;
    }
    let bandwidth = (64u64 << 20) as f64 / t0.elapsed().as_secs_f64();
    drop(file);
    let _ = std::fs::remove_file(&path);
    Ok(Disk {
        flush_p50_us: quantile(&mut latencies, 0.5),
        flush_p99_us: quantile(&mut latencies, 0.99),
        bandwidth_bytes_per_s: bandwidth,
    })
}

/// Sets thread `tid`'s (0: the calling thread's) cores to `cores`.
fn set_affinity(tid: i32, cores: std::ops::Range<usize>) {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET writes inside it, and
    // sched_setaffinity only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for core in cores {
            libc::CPU_SET(core, &mut set);
        }
        libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Pins the calling thread to the cores from `from` on (when given).
fn pin(from: Option<usize>) {
    let Some(from) = from else { return };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    set_affinity(0, from..cores.max(from + 1));
}

/// Confines every thread of process `pid` to `core` (threads it starts later
/// inherit that), as `taskset -a -p -c <core> <pid>` does.
pub fn confine(pid: u32, core: usize) {
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Some(tid) = task
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<i32>().ok())
        {
            set_affinity(tid, core..core + 1);
        }
    }
}

/// CPU seconds process `pid` used so far: every thread's time on a CPU from
/// /proc/PID/task/*/schedstat (nanoseconds; /proc/PID/stat counts in ticks of 10 ms,
/// too coarse for short runs).
/// Bytes process `pid` has sent to the disk so far: `write_bytes` of /proc/PID/io,
/// pages dirtied for writeback (a partly filled page flushed and written to again
/// counts again).
pub fn process_written_bytes(pid: u32) -> u64 {
    proc_number(pid, "io", "write_bytes:")
}

/// The number after `field` on its line of /proc/PID/`file` (0 when absent).
fn proc_number(pid: u32, file: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The middle of `v` once sorted (the upper one of an even count).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The value at quantile `q` of `v`, which it sorts (nearest rank; 0 for none).
fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get((v.len().saturating_sub(1) as f64 * q).round() as usize)
        .copied()
        .unwrap_or(0.0)
}

pub fn process_cpu_seconds(pid: u32) -> f64 {
    let ns: u64 = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|task| {
            let stat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
            stat.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum();
    ns as f64 / 1e9
}

/// CPU seconds the process `pid` has spent in user space, all its threads
/// (/proc/PID/stat's utime, in clock ticks: 10 ms at the usual 100 Hz).
pub fn process_user_cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name (which may hold spaces) in parentheses:
    // state is the first, utime the twelfth.
    let ticks: u64 = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(11)?.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf reads a constant of the system.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    ticks as f64 / hz as f64
}

/// A gannetd started for one measurement, in its own data directory.
struct Gannetd {
    child: Child,
    smtp: SocketAddr,
    http: SocketAddr,
}

impl Gannetd {
    fn start(o: &Options, name: &str, extra: &str) -> Result<Gannetd> {
        let dir = o.dir.join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let data = dir.join("data");
        let delivery = if extra.contains("[delivery]") {
            ""
        } else {
            "[delivery]\nsuspended = true\n"
        };
        let config = format!(
            "[server]\nhostname = \"calibrate.test\"\ndata_dir = \"{}\"\nshards = 1\npin_cores = false\n\
             [smtp]\nlisten = [\"127.0.0.1:0\"]\n\
             [http]\nlisten = [\"127.0.0.1:0\"]\napi_keys = [{{ name = \"calibrate\", key_sha256 = \"{}\" }}]\n\
             {extra}\n{delivery}",
            data.display(),
            gannet_core::auth::KeyDigest::of(KEY)
        );
        let path = dir.join("gannetd.toml");
        std::fs::write(&path, config)?;
        let log = std::fs::File::create(dir.join("gannetd.log"))?;
        let child = Command::new(&o.gannetd)
            .arg("--config")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} (give --gannetd)", o.gannetd.display()))?;
        let mut g = Gannetd {
            child,
            smtp: "127.0.0.1:0".parse()?,
            http: "127.0.0.1:0".parse()?,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let listeners = data.join("listeners.json");
        let text = loop {
            if let Ok(text) = std::fs::read_to_string(&listeners) {
                break text;
            }
            if let Some(status) = g.child.try_wait()? {
                bail!(
                    "gannetd exited with {status}: see {}",
                    dir.join("gannetd.log").display()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "gannetd did not start within 30 s: see {}",
                    dir.join("gannetd.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let v: serde_json::Value = serde_json::from_str(&text)?;
        let first = |key: &str| -> Result<SocketAddr> {
            v[key][0]
                .as_str()
                .and_then(|a| a.parse().ok())
                .ok_or_else(|| anyhow!("listeners.json has no {key} listener"))
        };
        g.smtp = first("smtp")?;
        g.http = first("http")?;
        if std::thread::available_parallelism().map_or(1, |n| n.get()) > 1 {
            confine(g.child.id(), 0);
        }
        Ok(g)
    }

    fn cpu_s(&self) -> f64 {
        process_cpu_seconds(self.child.id())
    }

    /// Bytes gannetd has sent to the disk ([`process_written_bytes`] of /proc/PID/io: pages
    /// dirtied for writeback, so a partly filled page flushed and written to again
    /// counts again).
    fn written_bytes(&self) -> u64 {
        process_written_bytes(self.child.id())
    }

    fn status_kb(&self, field: &str) -> u64 {
        proc_number(self.child.id(), "status", field)
    }

    /// Runs `load` ROUNDS times (told the round); the median of gannetd's CPU µs
    /// per round, and of its CPU's share of the wall time.
    fn measure_share(&self, mut load: impl FnMut(u64) -> Result<()>) -> Result<(f64, f64)> {
        let (mut cpus, mut shares) = (Vec::new(), Vec::new());
        for round in 0..ROUNDS {
            let (before, t0) = (self.cpu_s(), Instant::now());
            load(round)?;
            let cpu = (self.cpu_s() - before) * 1e6;
            cpus.push(cpu);
            shares.push(cpu / (t0.elapsed().as_secs_f64() * 1e6).max(1.0));
        }
        Ok((median(cpus), median(shares)))
    }

    /// [`Gannetd::measure_share`]'s CPU µs alone.
    fn measure(&self, load: impl FnMut(u64) -> Result<()>) -> Result<f64> {
        Ok(self.measure_share(load)?.0)
    }

    /// The admin client (`gannetctl`'s) on this gannetd's HTTP listener.
    fn client(&self) -> crate::ctl::Client {
        crate::ctl::Client::new(&format!("http://{}", self.http), Some(KEY.to_string()))
    }

    /// Bytes of the records gannetd's spool has appended so far: counted as they are
    /// appended, so a segment reclaimed once its messages were delivered still
    /// counts (the spool's files alone miss it). The counter reaches the metrics
    /// on the shard's periodic round, so this waits out the longest one first.
    fn appended_bytes(&self) -> Result<f64> {
        std::thread::sleep(Duration::from_millis(600));
        self.metric("spool_appended_bytes_total")
    }

    /// The sum of a metric (`gannet_` left out) over its shards.
    fn metric(&self, name: &str) -> Result<f64> {
        let metrics = crate::ctl::top::parse_metrics(&self.client().text("GET", "/metrics", None)?);
        Ok(crate::ctl::top::total(&metrics, name))
    }

    /// SIGTERM and wait.
    fn stop(mut self) -> Result<()> {
        // SAFETY: signalling the child this process started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("gannetd did not stop within 60 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }
}

impl Drop for Gannetd {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A message of `size` bytes (headers and lines of text), From calib.test.
fn message(size: usize, n: u64) -> Vec<u8> {
    let mut m =
        format!("From: <c@calib.test>\r\nTo: <r{n}@dest.test>\r\nSubject: calibration {n}\r\n\r\n")
            .into_bytes();
    let line = b"gannet capacity calibration: the quick brown fox jumps over the lazy dog.\r\n";
    while m.len() + line.len() <= size {
        m.extend_from_slice(line);
    }
    m.resize(size.max(m.len()), b'x');
    if !m.ends_with(b"\r\n") {
        m.extend_from_slice(b"\r\n");
    }
    m
}

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// A blocking SMTP client connection.
struct Client {
    stream: Box<dyn Stream>,
    input: Vec<u8>,
}

impl Client {
    fn connect(addr: SocketAddr, tls: Option<Arc<rustls::ClientConfig>>) -> Result<Client> {
        let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
        tcp.set_read_timeout(Some(Duration::from_secs(60)))?;
        tcp.set_nodelay(true)?;
        let mut c = Client {
            stream: Box::new(tcp.try_clone()?),
            input: Vec::new(),
        };
        c.expect("220")?;
        c.command("EHLO calibrate.test", "250")?;
        if let Some(config) = tls {
            c.command("STARTTLS", "220")?;
            let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
            let conn = rustls::ClientConnection::new(config, name)?;
            c.stream = Box::new(rustls::StreamOwned::new(conn, tcp));
            c.input.clear();
            c.command("EHLO calibrate.test", "250")?;
        }
        Ok(c)
    }

    /// Reads one reply (every line of it); fails unless it starts with `code`.
    fn expect(&mut self, code: &str) -> Result<()> {
        loop {
            while let Some(lf) = self.input.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.input.drain(..=lf).collect();
                let text = String::from_utf8_lossy(&line);
                if text.len() >= 4 && text.as_bytes()[3] == b'-' {
                    continue;
                }
                if text.starts_with(code) {
                    return Ok(());
                }
                bail!("expected {code}, got {}", text.trim_end());
            }
            let mut buf = [0u8; 4096];
            let n = self.stream.read(&mut buf)?;
            if n == 0 {
                bail!("the server closed the connection");
            }
            self.input.extend_from_slice(&buf[..n]);
        }
    }

    fn command(&mut self, line: &str, code: &str) -> Result<()> {
        self.stream.write_all(line.as_bytes())?;
        self.stream.write_all(b"\r\n")?;
        self.stream.flush()?;
        self.expect(code)
    }

    /// One transaction, pipelined as injectors do with PIPELINING (RFC 2920):
    /// MAIL, RCPT and DATA in one write, then their three replies.
    fn send(&mut self, body: &[u8], n: u64) -> Result<()> {
        self.send_to(body, &format!("r{n}@dest.test"))
    }

    /// [`Client::send`] to `recipient`.
    fn send_to(&mut self, body: &[u8], recipient: &str) -> Result<()> {
        let commands = format!("MAIL FROM:<c@calib.test>\r\nRCPT TO:<{recipient}>\r\nDATA\r\n");
        self.stream.write_all(commands.as_bytes())?;
        self.stream.flush()?;
        self.expect("250")?;
        self.expect("250")?;
        self.expect("354")?;
        self.stream.write_all(body)?;
        self.stream.write_all(b".\r\n")?;
        self.stream.flush()?;
        self.expect("250")
    }
}

/// `total` messages of `size` over `CONNECTIONS` concurrent connections carrying
/// `per_connection` each, from threads pinned to `core`.
fn smtp_load(
    addr: SocketAddr,
    total: u64,
    size: usize,
    per_connection: u64,
    tls: Option<Arc<rustls::ClientConfig>>,
    core: Option<usize>,
) -> Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let (next, tls) = (next.clone(), tls.clone());
            std::thread::spawn(move || -> Result<()> {
                pin(core);
                let body = message(size, 0);
                loop {
                    let mut client: Option<Client> = None;
                    for _ in 0..per_connection {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        if n >= total {
                            return Ok(());
                        }
                        let c = match &mut client {
                            Some(c) => c,
                            None => client.insert(Client::connect(addr, tls.clone())?),
                        };
                        c.send(&body, n)?;
                    }
                    if let Some(mut c) = client {
                        let _ = c.command("QUIT", "221");
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join()
            .map_err(|_| anyhow!("a client thread panicked"))??;
    }
    Ok(())
}

/// Messages of `size` offered at `rate` per second for `seconds` over `CONNECTIONS`
/// connections (message k is due at k / rate; each connection takes every
/// CONNECTIONS-th): every acknowledgement's latency in ms, counted from when the
/// message was due, so that a client held up by a slow reply does not hide the wait
/// of the messages behind it.
fn paced_latencies(
    addr: SocketAddr,
    rate: f64,
    seconds: f64,
    size: usize,
    core: Option<usize>,
) -> Result<Vec<f64>> {
    let total = (rate * seconds).max(CONNECTIONS as f64) as u64;
    // Connections are made before the start; the first half second is not counted
    // (the core's caches and gannetd's batching settle).
    let start = Instant::now() + Duration::from_secs(1);
    let counted = (rate * 0.5) as u64;
    let threads: Vec<_> = (0..CONNECTIONS as u64)
        .map(|t| {
            std::thread::spawn(move || -> Result<Vec<f64>> {
                pin(core);
                let body = message(size, 0);
                let mut latencies = Vec::new();
                let mut client = Some(Client::connect(addr, None)?);
                let mut sent = 0;
                for k in (t..total).step_by(CONNECTIONS) {
                    let due = start + Duration::from_secs_f64(k as f64 / rate);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    if sent == PER_CONNECTION {
                        if let Some(mut c) = client.take() {
                            let _ = c.command("QUIT", "221");
                        }
                        sent = 0;
                    }
                    let c = match &mut client {
                        Some(c) => c,
                        None => client.insert(Client::connect(addr, None)?),
                    };
                    c.send(&body, k)?;
                    sent += 1;
                    if k >= counted {
                        latencies.push(due.elapsed().as_secs_f64() * 1e3);
                    }
                }
                Ok(latencies)
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in threads {
        all.extend(
            t.join()
                .map_err(|_| anyhow!("a client thread panicked"))??,
        );
    }
    Ok(all)
}

/// `total` recipients in transmissions of 500, each message of about `size`;
/// returns once gannetd has generated them all.
fn http_load(g: &Gannetd, total: u64, size: usize, core: Option<usize>) -> Result<()> {
    pin(core);
    let text = String::from_utf8_lossy(&message(size, 0))
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    let before = g.metric("http_messages_generated_total")?;
    let client = g.client();
    let mut sent = 0;
    while sent < total {
        let batch = (total - sent).min(500);
        let recipients: Vec<serde_json::Value> = (sent..sent + batch)
            .map(|n| serde_json::json!({ "address": format!("r{n}@dest.test") }))
            .collect();
        let body = serde_json::json!({
            "recipients": recipients,
            "content": { "from": "c@calib.test", "subject": "calibration", "text": text },
        });
        client
            .request("POST", "/api/v1/transmissions", Some(&body))
            .context("POST /api/v1/transmissions")?;
        sent += batch;
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while g.metric("http_messages_generated_total")? - before < total as f64 {
        if Instant::now() > deadline {
            bail!("gannetd did not generate {total} messages within 10 minutes");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// The calibration's SMTP sink: accepts everything and counts messages.
struct Sink {
    addr: SocketAddr,
    received: Arc<AtomicU64>,
}

impl Sink {
    /// gannetd's configuration delivering dest.test to this sink.
    fn route(&self) -> String {
        format!(
            "[delivery]\nsuspended = false\ntls = \"disabled\"\nroutes = {{ \"dest.test\" = [\"{}\"] }}\n",
            self.addr
        )
    }

    fn start(core: Option<usize>) -> Result<Sink> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let received = Arc::new(AtomicU64::new(0));
        std::thread::spawn({
            let received = received.clone();
            move || {
                pin(core);
                for stream in listener.incoming().flatten() {
                    let received = received.clone();
                    std::thread::spawn(move || {
                        pin(core);
                        let _ = sink_session(stream, &received);
                    });
                }
            }
        });
        Ok(Sink { addr, received })
    }

    fn wait_for(&self, n: u64, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        while self.received.load(Ordering::Acquire) < n {
            if Instant::now() > deadline {
                bail!(
                    "the sink got {} of {n} messages",
                    self.received.load(Ordering::Acquire)
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }
}

fn sink_session(stream: TcpStream, received: &AtomicU64) -> std::io::Result<()> {
    // Replies are small writes: without this, Nagle's algorithm holds each until the
    // client's delayed ACK.
    stream.set_nodelay(true)?;
    let mut out = stream.try_clone()?;
    let mut input = BufReader::with_capacity(64 << 10, stream);
    out.write_all(b"220 sink ESMTP\r\n")?;
    let mut line = Vec::new();
    loop {
        line.clear();
        if input.read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        let verb = line
            .get(..4)
            .map(|v| v.to_ascii_uppercase())
            .unwrap_or_default();
        let reply: &[u8] = match verb.as_slice() {
            b"EHLO" => b"250-sink\r\n250-PIPELINING\r\n250 8BITMIME\r\n",
            b"DATA" => {
                out.write_all(b"354 go\r\n")?;
                loop {
                    line.clear();
                    if input.read_until(b'\n', &mut line)? == 0 {
                        return Ok(());
                    }
                    if line == b".\r\n" {
                        break;
                    }
                }
                received.fetch_add(1, Ordering::AcqRel);
                b"250 2.0.0 ok\r\n"
            }
            b"QUIT" => {
                out.write_all(b"221 bye\r\n")?;
                return Ok(());
            }
            _ => b"250 ok\r\n",
        };
        out.write_all(reply)?;
    }
}

/// A TLS client that accepts gannetd's generated self-signed certificate: the
/// calibration measures the cost of TLS, not of trust.
fn tls_client() -> Arc<rustls::ClientConfig> {
    #[derive(Debug)]
    struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);
    impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
        fn verify_server_cert(
            &self,
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &[rustls::pki_types::CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    Arc::new(config)
}

/// "2026-12-07 09:30 UTC"
fn utc_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
