//! gannet-blast: an SMTP load generator. Concurrency, a target rate or as fast as
//! possible, a message count or a duration, fixed sizes or a size distribution,
//! recipients per message, weighted destination domains, STARTTLS, AUTH, pipelining on
//! or off, connections reused for N messages. Every message carries a digest header
//! that gannet-sink checks.
//!
//! A progress bar on a terminal; at the end a summary and one JSON line: messages
//! sent, msgs/s, errors by reply code, transaction latency percentiles.

use std::collections::BTreeMap;
use std::io::{IsTerminal as _, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use clap::Parser;
use gannet_bench::mail::{Weighted, message, parse_size};
use hdrhistogram::Histogram;

#[derive(Debug, Parser)]
#[command(about = "SMTP and HTTP (SparkPost transmissions) load generator")]
struct Args {
    /// The server to inject into.
    #[arg(long, default_value = "127.0.0.1:2025")]
    server: SocketAddr,
    /// Concurrent connections.
    #[arg(long, default_value_t = 50)]
    concurrency: u64,
    /// Messages to send (ignored with --duration).
    #[arg(long, default_value_t = 10_000)]
    messages: u64,
    /// Send for this long instead of a count ("30s", "2m").
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Messages per second in all (0: as fast as possible).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Message size ("10k"), or a distribution ("1k:50,10k:40,100k:10").
    #[arg(long, default_value = "10k")]
    size: String,
    /// Recipients per message.
    #[arg(long, default_value_t = 1)]
    recipients: u64,
    /// Destination domains with weights ("a.test:3,b.test:1").
    #[arg(long, default_value = "sink.test")]
    domains: String,
    /// Instead of --domains: this many domains, d0.test … dN-1.test, equally likely.
    #[arg(long)]
    domain_count: Option<u64>,
    /// Envelope sender.
    #[arg(long, default_value = "blast@blast.test")]
    from: String,
    /// Instead of --from: senders in this many domains, blast@f0.test … (message n
    /// from domain n mod count), e.g. to exercise one DKIM key per sending domain.
    #[arg(long)]
    from_domain_count: Option<u64>,
    /// Messages per connection before it is closed (1: a new connection per message).
    #[arg(long, default_value_t = 1)]
    per_connection: u64,
    /// Send commands one at a time even when the server offers PIPELINING.
    #[arg(long)]
    no_pipelining: bool,
    /// STARTTLS (any certificate is accepted: benchmarks run against test servers).
    #[arg(long)]
    starttls: bool,
    /// AUTH PLAIN as `user:password`.
    #[arg(long)]
    auth: Option<String>,
    /// Timeout of every reply.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Print only the JSON line (no progress bar, no summary).
    #[arg(long)]
    json_only: bool,
    /// Inject over HTTP instead: each message is a SparkPost transmission (inline
    /// text content with a substitution per recipient) POSTed to --server, which is
    /// then an HTTP listener; --per-connection requests share a keep-alive connection.
    #[arg(long)]
    http: bool,
    /// The API key for --http (the Authorization header); also GANNET_API_KEY.
    #[arg(long, env = "GANNET_API_KEY", default_value = "")]
    api_key: String,
}

/// What the workers share.
struct Shared {
    args: Args,
    sizes: Weighted<usize>,
    domains: Weighted<String>,
    start: Instant,
    next: AtomicU64,
    sent: AtomicU64,
    failed: AtomicU64,
    recipients_accepted: AtomicU64,
    stop: AtomicBool,
    errors: Mutex<BTreeMap<String, u64>>,
    latency: Mutex<Histogram<u64>>,
    tls: Arc<rustls::ClientConfig>,
}

impl Shared {
    fn error(&self, what: impl Into<String>) {
        *self
            .errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(what.into())
            .or_default() += 1;
    }

    /// The next message number to send, or None when done.
    fn take(&self) -> Option<u64> {
        if self.stop.load(Ordering::Relaxed) {
            return None;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        match self.args.duration {
            Some(d) if self.start.elapsed() >= d => return None,
            None if n >= self.args.messages => return None,
            _ => {}
        }
        if self.args.rate > 0.0 {
            let due = self.start + Duration::from_secs_f64(n as f64 / self.args.rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        Some(n)
    }
}

/// A plain or TLS connection.
enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// An SMTP client connection.
struct Client {
    stream: Stream,
    input: Vec<u8>,
    pipelining: bool,
}

/// A failure that ends the connection: a reply code, or a transport error.
enum Failure {
    Reply(u16),
    Io(&'static str),
}

impl Client {
    /// The next reply: its code and whether it listed PIPELINING (for EHLO).
    fn reply(&mut self) -> Result<(u16, String), Failure> {
        let mut text = String::new();
        loop {
            if let Some(lf) = memchr::memchr(b'\n', &self.input) {
                let line: Vec<u8> = self.input.drain(..=lf).collect();
                let line = String::from_utf8_lossy(&line);
                text.push_str(&line);
                if line.len() >= 4 && line.as_bytes()[3] == b'-' {
                    continue;
                }
                let code = line
                    .get(..3)
                    .and_then(|c| c.parse().ok())
                    .ok_or(Failure::Io("bad reply"))?;
                return Ok((code, text));
            }
            self.fill()?;
        }
    }

    fn expect(&mut self, want: u16) -> Result<String, Failure> {
        let (code, text) = self.reply()?;
        if code != want {
            return Err(Failure::Reply(code));
        }
        Ok(text)
    }

    fn send(&mut self, bytes: &[u8]) -> Result<(), Failure> {
        self.stream
            .write_all(bytes)
            .map_err(|_| Failure::Io("write"))
    }

    fn connect(shared: &Shared) -> Result<Client, Failure> {
        let args = &shared.args;
        let tcp = TcpStream::connect_timeout(&args.server, args.timeout)
            .map_err(|_| Failure::Io("connect"))?;
        let _ = tcp.set_nodelay(true);
        let _ = tcp.set_read_timeout(Some(args.timeout));
        let mut c = Client {
            stream: Stream::Plain(tcp),
            input: Vec::with_capacity(4096),
            pipelining: false,
        };
        if args.http {
            return Ok(c);
        }
        c.expect(220)?;
        c.send(b"EHLO blast.test\r\n")?;
        let mut ehlo = c.expect(250)?;
        if args.starttls {
            c.send(b"STARTTLS\r\n")?;
            c.expect(220)?;
            let Stream::Plain(tcp) = c.stream else {
                return Err(Failure::Io("tls"));
            };
            let name = rustls::pki_types::ServerName::IpAddress(args.server.ip().into());
            let conn = rustls::ClientConnection::new(shared.tls.clone(), name)
                .map_err(|_| Failure::Io("tls"))?;
            c.stream = Stream::Tls(Box::new(rustls::StreamOwned::new(conn, tcp)));
            c.send(b"EHLO blast.test\r\n")?;
            ehlo = c.expect(250)?;
        }
        c.pipelining = !args.no_pipelining && ehlo.to_ascii_uppercase().contains("PIPELINING");
        if let Some(auth) = &args.auth {
            let (user, password) = auth.split_once(':').unwrap_or((auth, ""));
            let token =
                base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
            c.send(format!("AUTH PLAIN {token}\r\n").as_bytes())?;
            c.expect(235)?;
        }
        Ok(c)
    }

    /// One HTTP transmission; the number of recipients accepted. The connection is
    /// kept unless the server closes it.
    fn transmission(&mut self, shared: &Shared, seq: u64) -> Result<(u64, bool), Failure> {
        let args = &shared.args;
        let recipients: Vec<serde_json::Value> = (0..args.recipients)
            .map(|k| {
                let domain = shared.domains.pick(fastrand::u64(..));
                serde_json::json!({
                    "address": format!("u{seq}-{k}@{domain}"),
                    "substitution_data": {"n": seq, "k": k},
                })
            })
            .collect();
        let size = *shared.sizes.pick(fastrand::u64(..));
        let message = message(seq, size, &args.from, "x@x.test");
        let head_end = memchr::memmem::find(&message, b"\r\n\r\n").map_or(0, |i| i + 4);
        let text = String::from_utf8_lossy(&message[head_end..]);
        let body = serde_json::json!({
            "recipients": recipients,
            "content": {
                "from": args.from,
                "subject": "blast {{ n }}",
                "text": format!("Recipient {{{{ k }}}} of {{{{ n }}}}\r\n{text}"),
            },
        })
        .to_string();
        let request = format!(
            "POST /api/v1/transmissions HTTP/1.1\r\nhost: {}\r\nauthorization: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            args.server,
            args.api_key,
            body.len()
        );
        self.send(request.as_bytes())?;
        let (status, keep, reply) = self.http_response()?;
        if status != 200 {
            return Err(Failure::Reply(status));
        }
        let reply: serde_json::Value =
            serde_json::from_slice(&reply).map_err(|_| Failure::Io("bad json"))?;
        let accepted = reply["results"]["total_accepted_recipients"]
            .as_u64()
            .ok_or(Failure::Io("bad json"))?;
        Ok((accepted, keep))
    }

    /// Reads an HTTP response: status, whether the connection stays open, body.
    fn http_response(&mut self) -> Result<(u16, bool, Vec<u8>), Failure> {
        loop {
            if let Some(end) = memchr::memmem::find(&self.input, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.input[..end]).to_ascii_lowercase();
                let status = head
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .ok_or(Failure::Io("bad http"))?;
                let header = |name: &str| {
                    head.lines()
                        .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
                };
                let length: usize = header("content-length:")
                    .and_then(|v| v.parse().ok())
                    .ok_or(Failure::Io("no content-length"))?;
                let keep = header("connection:").is_none_or(|v| v != "close");
                while self.input.len() < end + 4 + length {
                    self.fill()?;
                }
                let body = self.input[end + 4..end + 4 + length].to_vec();
                self.input.drain(..end + 4 + length);
                return Ok((status, keep, body));
            }
            self.fill()?;
        }
    }

    fn fill(&mut self) -> Result<(), Failure> {
        let mut chunk = [0u8; 8192];
        let n = self
            .stream
            .read(&mut chunk)
            .map_err(|_| Failure::Io("read"))?;
        if n == 0 {
            return Err(Failure::Io("closed"));
        }
        self.input.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// One transaction; the number of recipients accepted.
    fn transaction(&mut self, shared: &Shared, seq: u64) -> Result<u64, Failure> {
        let args = &shared.args;
        let rcpts: Vec<String> = (0..args.recipients)
            .map(|k| format!("u{seq}-{k}@{}", shared.domains.pick(fastrand::u64(..))))
            .collect();
        let size = *shared.sizes.pick(fastrand::u64(..));
        let from = match args.from_domain_count {
            Some(n) => format!("blast@f{}.test", seq % n.max(1)),
            None => args.from.clone(),
        };
        let body = message(seq, size, &from, &rcpts[0]);
        let mail = format!("MAIL FROM:<{from}>\r\n");
        let mut accepted = 0;
        if self.pipelining {
            let mut batch = mail.into_bytes();
            for r in &rcpts {
                batch.extend_from_slice(format!("RCPT TO:<{r}>\r\n").as_bytes());
            }
            batch.extend_from_slice(b"DATA\r\n");
            self.send(&batch)?;
            self.expect(250)?;
            for _ in &rcpts {
                match self.reply()? {
                    (250 | 251, _) => accepted += 1,
                    (code, _) => shared.error(code.to_string()),
                }
            }
            let (code, _) = self.reply()?;
            if code != 354 {
                if accepted > 0 {
                    return Err(Failure::Reply(code));
                }
                return Ok(0);
            }
            if accepted == 0 {
                // DATA was accepted though no recipient was: end it empty.
                self.send(b".\r\n")?;
                self.reply()?;
                return Ok(0);
            }
        } else {
            self.send(mail.as_bytes())?;
            self.expect(250)?;
            for r in &rcpts {
                self.send(format!("RCPT TO:<{r}>\r\n").as_bytes())?;
                match self.reply()? {
                    (250 | 251, _) => accepted += 1,
                    (code, _) => shared.error(code.to_string()),
                }
            }
            if accepted == 0 {
                self.send(b"RSET\r\n")?;
                self.reply()?;
                return Ok(0);
            }
            self.send(b"DATA\r\n")?;
            self.expect(354)?;
        }
        let mut data = Vec::with_capacity(body.len() + body.len() / 50 + 5);
        for line in body.split_inclusive(|b| *b == b'\n') {
            if line.first() == Some(&b'.') {
                data.push(b'.');
            }
            data.extend_from_slice(line);
        }
        data.extend_from_slice(b".\r\n");
        self.send(&data)?;
        self.expect(250)?;
        Ok(accepted)
    }
}

fn worker(shared: Arc<Shared>) -> Histogram<u64> {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("bounds");
    let mut client: Option<(Client, u64)> = None;
    while let Some(seq) = shared.take() {
        let mut used_up = false;
        let (mut c, used) = match client.take() {
            Some(c) => c,
            None => match Client::connect(&shared) {
                Ok(c) => (c, 0),
                Err(f) => {
                    record_failure(&shared, f);
                    continue;
                }
            },
        };
        let t0 = Instant::now();
        let outcome = if shared.args.http {
            c.transmission(&shared, seq).map(|(accepted, keep)| {
                if !keep {
                    used_up = true;
                }
                accepted
            })
        } else {
            c.transaction(&shared, seq)
        };
        match outcome {
            Ok(accepted) => {
                let _ = hist.record(t0.elapsed().as_micros().max(1) as u64);
                if accepted > 0 {
                    shared.sent.fetch_add(1, Ordering::Relaxed);
                    shared
                        .recipients_accepted
                        .fetch_add(accepted, Ordering::Relaxed);
                } else {
                    shared.failed.fetch_add(1, Ordering::Relaxed);
                }
                if used + 1 < shared.args.per_connection && !used_up {
                    client = Some((c, used + 1));
                } else if !shared.args.http {
                    let _ = c.send(b"QUIT\r\n");
                    let _ = c.reply();
                }
            }
            Err(f) => record_failure(&shared, f),
        }
    }
    if let Some((mut c, _)) = client
        && !shared.args.http
    {
        let _ = c.send(b"QUIT\r\n");
        let _ = c.reply();
    }
    hist
}

fn record_failure(shared: &Shared, failure: Failure) {
    shared.failed.fetch_add(1, Ordering::Relaxed);
    match failure {
        Failure::Reply(code) => shared.error(code.to_string()),
        Failure::Io(what) => shared.error(what),
    }
}

/// TLS that accepts any server certificate (the load generator talks to test servers):
/// gannet's own opportunistic client configuration.
fn tls_config() -> Arc<rustls::ClientConfig> {
    gannet_engine::delivery::tls::ClientTls::new().opportunistic
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.concurrency == 0 || args.recipients == 0 || args.per_connection == 0 {
        bail!("--concurrency, --recipients and --per-connection must be at least 1");
    }
    if args.http && (args.starttls || args.auth.is_some()) {
        bail!("--http sends plain HTTP with --api-key; --starttls and --auth are for SMTP");
    }
    let sizes = Weighted::parse(&args.size, parse_size).context("--size")?;
    let domains = match args.domain_count {
        Some(0) => bail!("--domain-count must be at least 1"),
        Some(n) => Weighted::from_items((0..n).map(|d| format!("d{d}.test")).collect()),
        None => Weighted::parse(&args.domains, |d| Ok(d.to_string())).context("--domains")?,
    };
    let show = !args.json_only && std::io::stderr().is_terminal();
    let shared = Arc::new(Shared {
        sizes,
        domains,
        start: Instant::now(),
        next: AtomicU64::new(0),
        sent: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        recipients_accepted: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        errors: Mutex::new(BTreeMap::new()),
        latency: Mutex::new(Histogram::new_with_bounds(1, 3_600_000_000, 3)?),
        tls: tls_config(),
        args,
    });
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    let workers: Vec<_> = (0..shared.args.concurrency)
        .map(|_| {
            let shared = shared.clone();
            std::thread::spawn(move || worker(shared))
        })
        .collect();
    let bar = show.then(|| {
        let bar = match shared.args.duration {
            Some(_) => indicatif::ProgressBar::new_spinner(),
            None => indicatif::ProgressBar::new(shared.args.messages),
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} {per_sec} {msg}",
            )
            .expect("template"),
        );
        bar
    });
    while !workers.iter().all(|w| w.is_finished()) {
        if stop.load(Ordering::Relaxed) {
            shared.stop.store(true, Ordering::Relaxed);
        }
        if let Some(bar) = &bar {
            bar.set_position(
                shared.sent.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed),
            );
            bar.set_message(format!("failed {}", shared.failed.load(Ordering::Relaxed)));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for w in workers {
        let hist = w.join().map_err(|_| anyhow::anyhow!("a worker panicked"))?;
        shared
            .latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add(hist)?;
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let seconds = shared.start.elapsed().as_secs_f64();
    let sent = shared.sent.load(Ordering::Relaxed);
    let hist = shared
        .latency
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let ms = |q: f64| (hist.value_at_quantile(q) as f64 / 1000.0 * 1000.0).round() / 1000.0;
    let errors = shared
        .errors
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let result = serde_json::json!({
        "messages_sent": sent,
        "messages_failed": shared.failed.load(Ordering::Relaxed),
        "recipients_accepted": shared.recipients_accepted.load(Ordering::Relaxed),
        "seconds": (seconds * 1000.0).round() / 1000.0,
        "msgs_per_s": (sent as f64 / seconds).round(),
        "errors": errors,
        "latency_ms": {
            "p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99), "p99.9": ms(0.999),
            "max": (hist.max() as f64 / 1000.0 * 1000.0).round() / 1000.0,
        },
    });
    if !shared.args.json_only {
        eprintln!(
            "sent {sent} messages in {seconds:.2} s ({:.0} msgs/s), {} failed; transaction latency ms p50 {} p90 {} p99 {} p99.9 {} max {}",
            sent as f64 / seconds,
            result["messages_failed"],
            result["latency_ms"]["p50"],
            result["latency_ms"]["p90"],
            result["latency_ms"]["p99"],
            result["latency_ms"]["p99.9"],
            result["latency_ms"]["max"],
        );
        if !errors.is_empty() {
            eprintln!("errors: {}", serde_json::to_string(&errors)?);
        }
    }
    println!("{result}");
    Ok(())
}
