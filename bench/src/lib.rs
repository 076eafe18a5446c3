//! Helpers shared by gannet's benchmarks: what machine this is, what the disk and the
//! processes under test did (device flushes, CPU seconds), and the report header.

pub mod blkio;
pub mod charts;
pub mod fuzz;
pub mod harness;
pub mod hook;
pub mod mail;
pub mod servers;
pub mod sink;
pub mod sts;
pub mod wire;

/// The engine tests' peer helpers (dnsmasq, smtp-sink, aiosmtpd), shared.
#[path = "../../engine/tests/peers/support.rs"]
pub mod peers;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// "major:minor" of the device holding `dir` (a partition's own, not its disk's).
pub fn device_id(dir: &Path) -> std::io::Result<String> {
    let dev = std::fs::metadata(dir)?.dev();
    Ok(format!("{}:{}", libc::major(dev), libc::minor(dev)))
}

/// Field `n` (from 0) of the block device statistics of the device holding `dir`.
fn device_stat(dir: &Path, n: usize) -> u64 {
    let Ok(id) = device_id(dir) else {
        return 0;
    };
    let stat = std::fs::read_to_string(format!("/sys/dev/block/{id}/stat"))
        .or_else(|_| std::fs::read_to_string(format!("/sys/dev/block/{id}/../stat")))
        .unwrap_or_default();
    stat.split_whitespace()
        .nth(n)
        .and_then(|f| f.parse().ok())
        .unwrap_or(0)
}

/// Flush requests completed by the block device holding `dir` (field 16 of its stat).
pub fn device_flushes(dir: &Path) -> u64 {
    device_stat(dir, 15)
}

/// Milliseconds the block device holding `dir` has been busy (io_ticks, field 10).
pub fn device_busy_ms(dir: &Path) -> u64 {
    device_stat(dir, 9)
}

/// CPU seconds (user + system) this process used so far.
pub fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// (pid, ppid, utime + stime, cutime + cstime) of a process, in clock ticks.
fn proc_stat(pid: u32) -> Option<(u32, u32, u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    // Fields after the name, 0-based: state(0) ppid(1) … utime(11) stime(12) cutime(13) cstime(14).
    Some((
        pid,
        num(1)? as u32,
        num(11)? + num(12)?,
        num(13)? + num(14)?,
    ))
}

/// CPU seconds used by the process tree under `root`: the root with its reaped
/// children, plus every live descendant.
pub fn tree_cpu_seconds(root: u32) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let all: Vec<(u32, u32, u64, u64)> = std::fs::read_dir("/proc")
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .filter_map(proc_stat)
                .collect()
        })
        .unwrap_or_default();
    let mut total = 0u64;
    let mut frontier = vec![root];
    let mut seen = std::collections::HashSet::new();
    while let Some(pid) = frontier.pop() {
        if !seen.insert(pid) {
            continue;
        }
        if let Some(p) = all.iter().find(|p| p.0 == pid) {
            total += p.2 + if pid == root { p.3 } else { 0 };
        }
        frontier.extend(all.iter().filter(|p| p.1 == pid).map(|p| p.0));
    }
    total as f64 / ticks
}

/// CPU seconds used so far by the threads of process `pid` whose names start with
/// `prefix` (live threads only).
pub fn threads_cpu_seconds(pid: u32, prefix: &str) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    let mut total = 0u64;
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        // "tid (name) state ...": the name may hold spaces; fields follow the ')'.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if !stat[open + 1..close].starts_with(prefix) {
            continue;
        }
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let num = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        // utime and stime are fields 14 and 15 of stat, 11 and 12 after the name.
        total += num(11) + num(12);
    }
    total as f64 / ticks
}

/// "2 cores (model), Linux x.y".
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown cpu".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} cores ({cpu}), Linux {}", kernel.trim())
}

/// This process's command line as a shell would take it back: arguments holding
/// spaces, quotes or newlines are single-quoted, a newline written `\n` inside
/// `$'…'` quoting.
pub fn command_line() -> String {
    std::env::args()
        .map(|arg| {
            let plain = !arg.is_empty()
                && arg
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@+%".contains(c));
            if plain {
                arg
            } else if arg.contains('\n') || arg.contains('\'') {
                let escaped = arg
                    .replace('\\', "\\\\")
                    .replace('\'', "\\'")
                    .replace('\n', "\\n");
                format!("$'{escaped}'")
            } else {
                format!("'{arg}'")
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A command's standard output, trimmed ("" if it cannot run).
pub fn command_output(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Appends `text` to the results file (skipped when `path` is empty).
pub fn append_results(path: &str, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    if path.is_empty() {
        return Ok(());
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?
        .write_all(text.as_bytes())
}

/// A `kB` field of /proc/<pid>/status (`VmRSS:`, `RssAnon:`, …); 0 when absent.
pub fn proc_status_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// One HTTP/1.1 request on a new connection (JSON body, `authorization: key` when
/// given): (status, body).
pub fn http_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: &[u8],
) -> anyhow::Result<(u16, Vec<u8>)> {
    use anyhow::Context as _;
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(120)))?;
    let auth = key.map_or(String::new(), |k| format!("authorization: {k}\r\n"));
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\n{auth}content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let end = memchr::memmem::find(&response, b"\r\n\r\n").context("no response head")?;
    let status = String::from_utf8_lossy(&response[..end])
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no status")?;
    Ok((status, response[end + 4..].to_vec()))
}

/// The sum over the shards of gannetd's metric `gannet_<name>`, read from /metrics at
/// `http` (a process-wide metric without labels is its one line).
pub fn gannet_metric(http: std::net::SocketAddr, name: &str) -> anyhow::Result<f64> {
    let (_, body) = http_request(http, "GET", "/metrics", None, b"")?;
    let (labelled, bare) = (format!("gannet_{name}{{"), format!("gannet_{name} "));
    Ok(String::from_utf8_lossy(&body)
        .lines()
        .filter(|l| l.starts_with(&labelled) || l.starts_with(&bare))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough for a benchmark).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// gannet-blast on core 1 against the SMTP port `port`: `messages` of 4 KiB over 32
/// connections of `per_connection` each, to `domains` (`a.test:98,b.test:2`); its
/// JSON result (at least one recipient accepted).
pub fn blast_on_core_1(
    blast: &Path,
    port: u16,
    messages: u64,
    per_connection: u64,
    domains: &str,
) -> anyhow::Result<serde_json::Value> {
    use anyhow::Context as _;
    let out = std::process::Command::new("taskset")
        .args(["-c", "1"])
        .arg(blast)
        .args(["--server", &format!("127.0.0.1:{port}"), "--json-only"])
        .args(["--messages", &messages.to_string()])
        .args(["--per-connection", &per_connection.to_string()])
        .args(["--concurrency", "32", "--size", "4k"])
        .args(["--domains", domains])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .output()
        .context("running gannet-blast")?;
    if !out.status.success() {
        anyhow::bail!("gannet-blast: {}", String::from_utf8_lossy(&out.stderr));
    }
    let result: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    if result["recipients_accepted"].as_f64().unwrap_or(0.0) < 1.0 {
        anyhow::bail!("nothing accepted: {result}");
    }
    Ok(result)
}

/// Waits until gannetd (its HTTP listener `http`) has delivered `count` messages,
/// for at most 300 s.
pub fn wait_delivered(http: std::net::SocketAddr, count: f64) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while gannet_metric(http, "delivery_delivered_total")? < count {
        if std::time::Instant::now() > deadline {
            anyhow::bail!("not every message was delivered within 300 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    Ok(())
}

/// What one gannet-blast run against a server measured.
#[derive(Debug, Clone, Copy)]
pub struct BlastRun {
    pub rate: f64,
    pub p50: f64,
    pub p99: f64,
    /// The server's CPU per accepted message, milliseconds.
    pub cpu_ms_per_msg: f64,
}

/// Runs a prepared gannet-blast `command` (with `--json-only`) against `server`,
/// stops the server, and checks that all `messages` were accepted.
pub fn blast_against(
    command: &mut std::process::Command,
    server: servers::Server,
    messages: u64,
) -> anyhow::Result<BlastRun> {
    use anyhow::Context as _;
    let cpu0 = tree_cpu_seconds(server.pid);
    let out = command.output().context("running gannet-blast")?;
    let cpu = tree_cpu_seconds(server.pid) - cpu0;
    server.stop()?;
    let result: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("gannet-blast result")?;
    let sent = result["messages_sent"].as_f64().unwrap_or(0.0);
    if sent as u64 != messages {
        anyhow::bail!("gannet-blast: {result}");
    }
    let latency = |q: &str| result["latency_ms"][q].as_f64().unwrap_or(0.0);
    Ok(BlastRun {
        rate: result["msgs_per_s"].as_f64().unwrap_or(0.0),
        p50: latency("p50"),
        p99: latency("p99"),
        cpu_ms_per_msg: cpu * 1000.0 / sent,
    })
}

/// One listening socket per executor, all on one port (SO_REUSEPORT; a probe bound
/// without it first picks the port when `addr`'s is 0 and refuses a port in use, so
/// two sinks never share one). Not duplicates of one socket: glommio's accept
/// toggles O_NONBLOCK on the open file description around a direct accept(2), and
/// executors sharing a description race on that flag until one of them blocks its
/// thread inside accept(2) with its sessions stalled behind it.
pub fn reuseport_listeners(
    addr: std::net::SocketAddr,
    count: usize,
) -> anyhow::Result<Vec<std::net::TcpListener>> {
    use anyhow::Context as _;
    let at = std::net::TcpListener::bind(addr)
        .and_then(|probe| probe.local_addr())
        .with_context(|| format!("listening on {addr}"))?;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count.max(1) {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(at),
            socket2::Type::STREAM,
            None,
        )?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket
            .bind(&at.into())
            .with_context(|| format!("listening on {at}"))?;
        socket.listen(1024)?;
        out.push(socket.into());
    }
    Ok(out)
}
