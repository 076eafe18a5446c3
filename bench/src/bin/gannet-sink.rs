//! gannet-sink: a "smart sink" for benchmarks and tests — an SMTP server (glommio,
//! one executor per core) that answers as configured per recipient domain (accept, a
//! percentage of 4xx/5xx with realistic provider texts, latency per phase, dropping
//! the connection in DATA; `tempfail@` and `permfail@` always fail), counts what it
//! received (per domain, per reply code), checks each message's digest header, serves
//! its counters as JSON over HTTP (`GET /total`: the message count alone) and prints
//! them when stopped (SIGTERM/SIGINT). With `--tls-cert` and `--tls-key` it offers
//! STARTTLS with that certificate (rustls) and counts the sessions that used it.
//!
//! On start it prints one JSON line: `{"smtp":"ip:port","http":"ip:port"}`.

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use gannet_bench::mail::{Integrity, check};
use gannet_bench::sink::{ConnectionRate, Counts, RATE_LIMITED, SinkConfig, Verdict, verdict};
use gannet_bench::wire::take_line;
use gannet_engine::io::Conn;
use glommio::net::TcpListener;
use glommio::{LocalExecutorPoolBuilder, PoolPlacement};

#[derive(Debug, Parser)]
#[command(about = "A configurable SMTP sink that counts and checks what it receives")]
struct Args {
    /// SMTP listen address.
    #[arg(long, default_value = "127.0.0.1:2526")]
    listen: SocketAddr,
    /// HTTP listen address for the counters (GET any path).
    #[arg(long, default_value = "127.0.0.1:0")]
    http: SocketAddr,
    /// Rules and responses (TOML; see bench/sink.example.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Executors (0: one per core).
    #[arg(long, default_value_t = 0)]
    shards: usize,
    /// Overrides `default.tempfail_percent`.
    #[arg(long)]
    tempfail_percent: Option<f64>,
    /// Overrides `default.permfail_percent`.
    #[arg(long)]
    permfail_percent: Option<f64>,
    /// Overrides `default.drop_in_data_percent`.
    #[arg(long)]
    drop_in_data_percent: Option<f64>,
    /// Sets the default latency of every phase, in milliseconds.
    #[arg(long)]
    latency_ms: Option<u64>,
    /// Overrides `default.messages_per_minute_per_connection` (past it: 421 and the
    /// connection closes).
    #[arg(long)]
    messages_per_minute_per_connection: Option<u64>,
    /// Certificate chain (PEM) to offer STARTTLS with (with --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

/// Longest command line accepted.
const LINE_MAX: usize = 4096;
/// Largest message accepted (SIZE).
const MESSAGE_MAX: usize = 64 << 20;
const IDLE: Duration = Duration::from_secs(300);

fn main() -> Result<()> {
    let args = Args::parse();
    let mut config = match &args.config {
        Some(path) => SinkConfig::load(path)?,
        None => SinkConfig::default(),
    };
    if let Some(v) = args.tempfail_percent {
        config.default.tempfail_percent = v;
    }
    if let Some(v) = args.permfail_percent {
        config.default.permfail_percent = v;
    }
    if let Some(v) = args.drop_in_data_percent {
        config.default.drop_in_data_percent = v;
    }
    if let Some(n) = args.messages_per_minute_per_connection {
        config.default.messages_per_minute_per_connection = n;
    }
    if let Some(ms) = args.latency_ms {
        let l = &mut config.default.latency_ms;
        (l.banner, l.ehlo, l.mail, l.rcpt, l.data) = (ms, ms, ms, ms, ms);
    }
    let config = Arc::new(config);
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(gannet_engine::tls::server_config(
            cert,
            key,
            std::path::Path::new(""),
            "",
        )?),
        _ => None,
    };
    let http = std::net::TcpListener::bind(args.http)
        .with_context(|| format!("listening on {}", args.http))?;
    let shards = if args.shards == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        args.shards
    };
    let counts: Arc<Vec<Mutex<Counts>>> =
        Arc::new((0..shards).map(|_| Mutex::new(Counts::default())).collect());
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, stop.clone())?;
    }
    let fds = gannet_bench::reuseport_listeners(args.listen, shards)?;
    let smtp = fds[0].local_addr()?;
    let fds = Arc::new(Mutex::new(fds));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let _pool = LocalExecutorPoolBuilder::new(PoolPlacement::Unbound(shards))
        .on_all_shards({
            let (config, counts, tls) = (config.clone(), counts.clone(), tls.clone());
            move || {
                let shard = next.fetch_add(1, Ordering::Relaxed);
                let fd = fds.lock().map(|mut f| f.pop()).ok().flatten();
                async move {
                    let Some(fd) = fd else { return };
                    let raw = std::os::fd::IntoRawFd::into_raw_fd(fd);
                    // SAFETY: `raw` is a listening TCP socket whose ownership
                    // into_raw_fd just gave up; the glommio listener closes it.
                    let listener =
                        unsafe { <TcpListener as std::os::fd::FromRawFd>::from_raw_fd(raw) };
                    serve(listener, config, tls, counts, shard).await;
                }
            }
        })
        .map_err(|e| anyhow::anyhow!("starting executors: {e}"))?;
    println!(
        "{}",
        serde_json::json!({ "smtp": smtp, "http": http.local_addr()? })
    );
    std::io::stdout().flush()?;
    std::thread::spawn({
        let counts = counts.clone();
        move || serve_http(http, counts)
    });
    while !stop.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(50));
    }
    // Whoever started the sink may have stopped reading its output: not an error.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", serde_json::to_string(&merged(&counts))?);
    let _ = out.flush();
    std::process::exit(0);
}

fn merged(counts: &[Mutex<Counts>]) -> Counts {
    let mut all = Counts::default();
    for c in counts {
        all.add(&c.lock().unwrap_or_else(|e| e.into_inner()));
    }
    all
}

/// Answers HTTP requests: `GET /total` with the number of messages received and of
/// recipients answered (cheap enough to poll), any other path with every counter.
fn serve_http(listener: std::net::TcpListener, counts: Arc<Vec<Mutex<Counts>>>) {
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let mut head = [0u8; 4096];
        let n = stream.read(&mut head).unwrap_or(0);
        let total = head[..n].starts_with(b"GET /total ");
        let body = if total {
            let (mut messages, mut tried) = (0, 0);
            for c in counts.iter() {
                let c = c.lock().unwrap_or_else(|e| e.into_inner());
                messages += c.messages;
                tried += c.tried();
            }
            serde_json::json!({ "messages": messages, "tried": tried }).to_string()
        } else {
            serde_json::to_string(&merged(&counts)).unwrap_or_default()
        };
        let _ = write!(
            stream,
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
    }
}

async fn serve(
    listener: TcpListener,
    config: Arc<SinkConfig>,
    tls: Option<Arc<rustls::ServerConfig>>,
    counts: Arc<Vec<Mutex<Counts>>>,
    shard: usize,
) {
    loop {
        match listener.accept().await {
            Ok(stream) => {
                let (config, counts, tls) = (config.clone(), counts.clone(), tls.clone());
                let _ = stream.set_nodelay(true);
                glommio::spawn_local(async move {
                    let mut s = Session {
                        conn: Conn::Plain(stream),
                        tls,
                        input: Vec::with_capacity(16 << 10),
                        output: Vec::with_capacity(1024),
                        config,
                        counts,
                        shard,
                        rate: ConnectionRate::default(),
                    };
                    let _ = s.run().await;
                })
                .detach();
            }
            Err(_) => glommio::timer::sleep(Duration::from_millis(10)).await,
        }
    }
}

struct Session {
    conn: Conn,
    /// Offered as STARTTLS until the session has started it.
    tls: Option<Arc<rustls::ServerConfig>>,
    input: Vec<u8>,
    output: Vec<u8>,
    config: Arc<SinkConfig>,
    counts: Arc<Vec<Mutex<Counts>>>,
    shard: usize,
    /// Messages this connection sent per domain (messages_per_minute_per_connection).
    rate: ConnectionRate,
}

/// The session ended (the client left, or the sink dropped it on purpose).
struct Closed;

impl From<std::io::Error> for Closed {
    fn from(_: std::io::Error) -> Closed {
        Closed
    }
}

impl Session {
    fn count(&self, f: impl FnOnce(&mut Counts)) {
        f(&mut self.counts[self.shard]
            .lock()
            .unwrap_or_else(|e| e.into_inner()));
    }

    fn reply(&mut self, text: &str) {
        self.output.extend_from_slice(text.as_bytes());
        self.output.extend_from_slice(b"\r\n");
    }

    async fn flush(&mut self) -> Result<(), Closed> {
        if !self.output.is_empty() {
            self.conn.write_all(&self.output, IDLE).await?;
            self.output.clear();
        }
        Ok(())
    }

    async fn pause(ms: u64) {
        if ms > 0 {
            glommio::timer::sleep(Duration::from_millis(ms)).await;
        }
    }

    /// Reads more input; replies queued so far go out first (pipelining: they are
    /// sent when the client's batch is used up).
    async fn fill(&mut self) -> Result<(), Closed> {
        self.flush().await?;
        let mut chunk = [0u8; 16 << 10];
        match self.conn.read(&mut chunk, IDLE).await? {
            0 => Err(Closed),
            n => {
                self.input.extend_from_slice(&chunk[..n]);
                Ok(())
            }
        }
    }

    async fn line(&mut self) -> Result<String, Closed> {
        loop {
            if let Some(line) = take_line(&mut self.input) {
                return Ok(line);
            }
            if self.input.len() > LINE_MAX {
                self.input.clear();
                self.reply("500 5.5.2 line too long");
                continue;
            }
            self.fill().await?;
        }
    }

    async fn run(&mut self) -> Result<(), Closed> {
        self.count(|c| c.sessions += 1);
        let latency = self.config.default.latency_ms;
        Self::pause(latency.banner).await;
        self.reply("220 sink.test ESMTP gannet-sink");
        let mut rcpts: Vec<String> = Vec::new();
        let mut in_tx = false;
        loop {
            let line = self.line().await?;
            let verb = line
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_ascii_uppercase();
            match verb.as_str() {
                "EHLO" => {
                    Self::pause(latency.ehlo).await;
                    let starttls = if self.tls.is_some() {
                        "250-STARTTLS\r\n"
                    } else {
                        ""
                    };
                    self.reply(&format!(
                        "250-sink.test\r\n250-PIPELINING\r\n{starttls}250-8BITMIME\r\n250-SMTPUTF8\r\n250-SIZE {MESSAGE_MAX}\r\n250 ENHANCEDSTATUSCODES"
                    ));
                }
                "STARTTLS" if self.tls.is_some() && !in_tx => {
                    // Whatever the client pipelined after STARTTLS is discarded (RFC
                    // 3207): the session starts over inside TLS.
                    self.input.clear();
                    self.reply("220 2.0.0 ready to start TLS");
                    self.flush().await?;
                    let config = self.tls.take().ok_or(Closed)?;
                    self.conn.start_tls(config, IDLE).await?;
                    self.count(|c| c.tls_sessions += 1);
                }
                "HELO" => {
                    Self::pause(latency.ehlo).await;
                    self.reply("250 sink.test");
                }
                "MAIL" => {
                    Self::pause(latency.mail).await;
                    rcpts.clear();
                    in_tx = true;
                    self.reply("250 2.1.0 OK");
                }
                "RCPT" if in_tx => {
                    if !self.rcpt(&line, &mut rcpts).await {
                        // Rate limited: 421, and the connection closes.
                        self.flush().await?;
                        return Ok(());
                    }
                }
                "DATA" if in_tx && rcpts.is_empty() => {
                    self.reply("554 5.5.1 no valid recipients");
                    in_tx = false;
                }
                "DATA" if in_tx => {
                    self.data(&rcpts).await?;
                    rcpts.clear();
                    in_tx = false;
                }
                "RCPT" | "DATA" => self.reply("503 5.5.1 MAIL first"),
                "RSET" => {
                    rcpts.clear();
                    in_tx = false;
                    self.reply("250 2.0.0 OK");
                }
                "NOOP" => self.reply("250 2.0.0 OK"),
                "QUIT" => {
                    self.reply("221 2.0.0 bye");
                    self.flush().await?;
                    return Ok(());
                }
                _ => self.reply("502 5.5.2 command not recognised"),
            }
        }
    }

    /// Answers a RCPT; false when the connection passed the domain's rate and is
    /// to be closed (after a 421).
    async fn rcpt(&mut self, line: &str, rcpts: &mut Vec<String>) -> bool {
        let address = line
            .split_once('<')
            .and_then(|(_, rest)| rest.split_once('>'))
            .map(|(a, _)| a.to_string())
            .unwrap_or_default();
        let domain = address
            .rsplit_once('@')
            .map_or("", |(_, d)| d)
            .to_ascii_lowercase();
        let rule = self.config.rule(&domain).clone();
        Self::pause(rule.latency_ms.rcpt).await;
        // One message per transaction counts toward the domain's rate.
        let first_of_domain = !rcpts
            .iter()
            .any(|r| r.to_ascii_lowercase().ends_with(&format!("@{domain}")));
        if first_of_domain
            && !self.rate.admit(
                &domain,
                rule.messages_per_minute_per_connection,
                std::time::Instant::now(),
            )
        {
            self.count(|c| {
                c.domain(&domain).rate_limited += 1;
                c.reply(421);
            });
            self.reply(RATE_LIMITED);
            return false;
        }
        let v = verdict(
            &self.config,
            &address,
            fastrand::f64() * 100.0,
            fastrand::usize(..),
        );
        match v {
            Verdict::Accept => {
                self.count(|c| {
                    c.domain(&domain).rcpt_accepted += 1;
                    c.reply(250);
                });
                rcpts.push(address);
                self.reply("250 2.1.5 OK");
            }
            Verdict::Refuse(text) => {
                let code: u16 = text[..3].parse().unwrap_or(550);
                self.count(|c| {
                    let d = c.domain(&domain);
                    if code >= 500 {
                        d.rcpt_permfailed += 1;
                    } else {
                        d.rcpt_tempfailed += 1;
                    }
                    c.reply(code);
                });
                self.reply(&text);
            }
        }
        true
    }

    async fn data(&mut self, rcpts: &[String]) -> Result<(), Closed> {
        let first_domain = rcpts[0]
            .rsplit_once('@')
            .map_or("", |(_, d)| d)
            .to_ascii_lowercase();
        let rule = self.config.rule(&first_domain).clone();
        let drop = fastrand::f64() * 100.0 < rule.drop_in_data_percent;
        self.reply("354 end data with <CR><LF>.<CR><LF>");
        if drop {
            // Dropped on purpose once the message has started to arrive.
            if self.input.is_empty() {
                self.fill().await?;
            }
            self.count(|c| {
                c.dropped += 1;
                c.domain(&first_domain).dropped += 1;
            });
            return Err(Closed);
        }
        // The message: until CRLF.CRLF (a message may also be empty: ".CRLF" first).
        let mut scanned: usize = 0;
        let end = loop {
            if self.input.starts_with(b".\r\n") {
                break 0;
            }
            let from = scanned.saturating_sub(4);
            if let Some(at) = memchr::memmem::find(&self.input[from..], b"\r\n.\r\n") {
                break from + at + 2;
            }
            scanned = self.input.len();
            if scanned > MESSAGE_MAX {
                self.input.clear();
                self.reply("552 5.3.4 message too big");
                return Ok(());
            }
            self.fill().await?;
        };
        let raw: Vec<u8> = self.input.drain(..end + 3).collect();
        let message = unstuff(&raw[..end]);
        let integrity = check(&message);
        Self::pause(rule.latency_ms.data).await;
        self.count(|c| {
            c.messages += 1;
            c.bytes += message.len() as u64;
            match integrity {
                Integrity::Intact => c.intact += 1,
                Integrity::Damaged => c.damaged += 1,
                Integrity::Unchecked => c.unchecked += 1,
            }
            c.reply(250);
            let mut seen: Vec<String> = Vec::new();
            for rcpt in rcpts {
                let domain = rcpt
                    .rsplit_once('@')
                    .map_or("", |(_, d)| d)
                    .to_ascii_lowercase();
                let d = c.domain(&domain);
                d.recipients += 1;
                if !seen.contains(&domain) {
                    d.messages += 1;
                    seen.push(domain);
                }
            }
        });
        self.reply("250 2.0.0 OK queued");
        Ok(())
    }
}

/// Undoes dot-stuffing: a line starting with ".." loses one dot.
fn unstuff(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    for line in data.split_inclusive(|b| *b == b'\n') {
        out.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
    }
    out
}
