//! gannet-forward: the reference for a relay that opens a new connection for every
//! delivery — an SMTP relay with no queue, no disk and no DNS (glommio, one executor
//! per core). Each message it receives is sent on at once over a new connection to
//! the next hop (`--to`), and its client gets the next hop's own reply to the data.
//! Every message so costs two TCP connections, as for an MTA relaying to thousands
//! of destinations where no delivery connection can be reused; gannet-bench runs it
//! as the system `forward` to show how close gannet comes to that bound.
//!
//! With `--dns`, it first finds the next hop as an MTA must for a domain it has not
//! seen: the MX of the first recipient's domain, then that host's address (with
//! gannet's own resolver and cache, asking the given server), and connects to that
//! address on `--to`'s port. gannet-bench runs it so as the system `forward-dns` in
//! many-domains, where every message goes to a new domain: the rig's DNS server then
//! costs the reference what it costs gannet.
//!
//! On start it prints one JSON line: `{"smtp":"ip:port"}`; SIGTERM/SIGINT stop it.

use std::io::Write as _;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use futures_lite::AsyncWriteExt;
use gannet_bench::wire::{read_more, take_line};
use glommio::net::{TcpListener, TcpStream};
use glommio::{LocalExecutorPoolBuilder, PoolPlacement};

#[derive(Debug, Parser)]
#[command(about = "An SMTP relay with no queue: each message goes on over a new connection")]
struct Args {
    /// SMTP listen address.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The next hop.
    #[arg(long)]
    to: SocketAddr,
    /// Executors (0: one per core).
    #[arg(long, default_value_t = 0)]
    shards: usize,
    /// Resolve each message's next hop through this DNS server (MX of the first
    /// recipient's domain, then its address) and connect there on `--to`'s port.
    #[arg(long)]
    dns: Option<SocketAddr>,
}

/// Longest command or reply line accepted.
const LINE_MAX: usize = 4096;
/// Largest message accepted.
const MESSAGE_MAX: usize = 64 << 20;
/// A client or next hop silent this long is dropped.
const IDLE: Duration = Duration::from_secs(60);

fn main() -> Result<()> {
    let args = Args::parse();
    let shards = if args.shards == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        args.shards
    };
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, stop.clone())?;
    }
    let fds = gannet_bench::reuseport_listeners(args.listen, shards)?;
    let smtp = fds[0].local_addr()?;
    let fds = Arc::new(Mutex::new(fds));
    let next = Arc::new(AtomicUsize::new(0));
    let (to, dns) = (args.to, args.dns);
    let _pool = LocalExecutorPoolBuilder::new(PoolPlacement::Unbound(shards))
        .on_all_shards(move || {
            next.fetch_add(1, Ordering::Relaxed);
            let fd = fds.lock().map(|mut f| f.pop()).ok().flatten();
            async move {
                let Some(fd) = fd else { return };
                let raw = std::os::fd::IntoRawFd::into_raw_fd(fd);
                // SAFETY: `raw` is a listening TCP socket whose ownership into_raw_fd
                // just gave up; the glommio listener closes it.
                let listener = unsafe { <TcpListener as std::os::fd::FromRawFd>::from_raw_fd(raw) };
                // gannet's defaults: a 5 s timeout, A then AAAA, 100,000 answers kept.
                let resolver = dns.map(|server| {
                    Rc::new(gannet_engine::dns::Resolver::new(
                        server,
                        Duration::from_secs(5),
                        gannet_core::config::IpLookup::Ipv4ThenIpv6,
                        100_000,
                    ))
                });
                serve(listener, Hop { to, resolver }).await;
            }
        })
        .map_err(|e| anyhow::anyhow!("starting executors: {e}"))?;
    println!("{}", serde_json::json!({ "smtp": smtp }));
    std::io::stdout().flush()?;
    while !stop.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::process::exit(0);
}

/// Where messages go on: `to`, or (with a resolver) the MX of their domain on `to`'s
/// port.
#[derive(Clone)]
struct Hop {
    to: SocketAddr,
    resolver: Option<Rc<gannet_engine::dns::Resolver>>,
}

impl Hop {
    /// The address to deliver a message for `rcpt` (a `RCPT TO:<...>` line) to.
    async fn address(&self, rcpt: &str) -> Result<SocketAddr, Closed> {
        let Some(resolver) = &self.resolver else {
            return Ok(self.to);
        };
        let domain = rcpt
            .rsplit_once('@')
            .map(|(_, d)| d.split(['>', ' ']).next().unwrap_or(""))
            .ok_or(Closed)?;
        let asking = resolver.asking();
        let host = match asking.mx_until(domain).await.map_err(|_| Closed)?.0 {
            gannet_engine::dns::Mx::Hosts(groups) => {
                groups.into_iter().flatten().next().ok_or(Closed)?
            }
            _ => return Err(Closed),
        };
        let ip = (asking.addresses_until(&host).await.map_err(|_| Closed)?.0)
            .into_iter()
            .next()
            .ok_or(Closed)?;
        Ok(SocketAddr::new(ip, self.to.port()))
    }
}

async fn serve(listener: TcpListener, hop: Hop) {
    loop {
        match listener.accept().await {
            Ok(stream) => {
                // Replies go out as soon as they are written (no Nagle delay behind
                // the client's delayed ACK).
                let _ = stream.set_nodelay(true);
                let hop = hop.clone();
                glommio::spawn_local(async move {
                    let mut client = Wire::new(stream);
                    let _ = session(&mut client, &hop).await;
                })
                .detach();
            }
            Err(_) => glommio::timer::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// The connection closed, timed out or broke the protocol.
#[derive(Debug)]
struct Closed;

impl From<std::io::Error> for Closed {
    fn from(_: std::io::Error) -> Closed {
        Closed
    }
}

impl From<glommio::GlommioError<()>> for Closed {
    fn from(_: glommio::GlommioError<()>) -> Closed {
        Closed
    }
}

/// One side of a connection: buffered input, lines and replies.
struct Wire {
    stream: TcpStream,
    input: Vec<u8>,
}

impl Wire {
    fn new(stream: TcpStream) -> Wire {
        Wire {
            stream,
            input: Vec::with_capacity(16 << 10),
        }
    }

    async fn fill(&mut self) -> Result<(), Closed> {
        if read_more(&mut self.stream, &mut self.input, IDLE).await? {
            Ok(())
        } else {
            Err(Closed)
        }
    }

    /// The next line, without its line ending.
    async fn line(&mut self) -> Result<String, Closed> {
        loop {
            if let Some(line) = take_line(&mut self.input) {
                return Ok(line);
            }
            if self.input.len() > LINE_MAX {
                return Err(Closed);
            }
            self.fill().await?;
        }
    }

    /// A whole (possibly multi-line) reply: its code and its last line.
    async fn reply(&mut self) -> Result<(u16, String), Closed> {
        loop {
            let line = self.line().await?;
            if line.as_bytes().get(3) == Some(&b'-') {
                continue;
            }
            let code = line.get(..3).and_then(|c| c.parse().ok()).ok_or(Closed)?;
            return Ok((code, line));
        }
    }

    async fn send(&mut self, text: &[u8]) -> Result<(), Closed> {
        self.stream.write_all(text).await?;
        Ok(())
    }

    /// Message data up to and including the final `.CRLF`, dot-stuffing kept.
    async fn data(&mut self) -> Result<Vec<u8>, Closed> {
        let mut scanned: usize = 0;
        let end = loop {
            if self.input.starts_with(b".\r\n") {
                break 3;
            }
            let from = scanned.saturating_sub(4);
            if let Some(at) = memchr::memmem::find(&self.input[from..], b"\r\n.\r\n") {
                break from + at + 5;
            }
            scanned = self.input.len();
            if scanned > MESSAGE_MAX {
                return Err(Closed);
            }
            self.fill().await?;
        };
        Ok(self.input.drain(..end).collect())
    }
}

/// Serves one client: each transaction's data goes on over a new connection.
async fn session(client: &mut Wire, hop: &Hop) -> Result<(), Closed> {
    client
        .send(b"220 forward.test ESMTP gannet-forward\r\n")
        .await?;
    let mut sender: Option<String> = None;
    let mut rcpts: Vec<String> = Vec::new();
    loop {
        let line = client.line().await?;
        let verb = line
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        let reply: String = match verb.as_str() {
            "EHLO" => {
                "250-forward.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 67108864".into()
            }
            "HELO" => "250 forward.test".into(),
            "MAIL" => {
                sender = Some(line);
                rcpts.clear();
                "250 2.1.0 OK".into()
            }
            "RCPT" if sender.is_some() => {
                rcpts.push(line);
                "250 2.1.5 OK".into()
            }
            "DATA" if sender.is_some() && !rcpts.is_empty() => {
                client.send(b"354 go ahead\r\n").await?;
                let data = client.data().await?;
                let mail = sender.take().unwrap_or_default();
                let reply = match forward(hop, &mail, &rcpts, &data).await {
                    Ok(line) => line,
                    Err(Closed) => "451 4.4.2 the next hop failed".into(),
                };
                rcpts.clear();
                reply
            }
            "RCPT" | "DATA" => "503 5.5.1 MAIL and RCPT first".into(),
            "RSET" => {
                sender = None;
                rcpts.clear();
                "250 2.0.0 OK".into()
            }
            "NOOP" => "250 2.0.0 OK".into(),
            "QUIT" => {
                client.send(b"221 2.0.0 bye\r\n").await?;
                return Ok(());
            }
            _ => "502 5.5.2 command not recognised".into(),
        };
        client.send(format!("{reply}\r\n").as_bytes()).await?;
    }
}

/// Sends one message over a new connection to `to` (MAIL, RCPT and DATA pipelined,
/// as the next hop offers PIPELINING); the next hop's reply to the data.
async fn forward(hop: &Hop, mail: &str, rcpts: &[String], data: &[u8]) -> Result<String, Closed> {
    let to = hop
        .address(rcpts.first().map_or("", String::as_str))
        .await?;
    let stream = TcpStream::connect(to).await?;
    stream.set_nodelay(true)?;
    let mut hop = Wire::new(stream);
    if hop.reply().await?.0 != 220 {
        return Err(Closed);
    }
    hop.send(b"EHLO forward.test\r\n").await?;
    if hop.reply().await?.0 != 250 {
        return Err(Closed);
    }
    let mut envelope = String::with_capacity(64 * (rcpts.len() + 2));
    for line in std::iter::once(mail).chain(rcpts.iter().map(String::as_str)) {
        envelope.push_str(line);
        envelope.push_str("\r\n");
    }
    envelope.push_str("DATA\r\n");
    hop.send(envelope.as_bytes()).await?;
    let (mail_code, mail_reply) = hop.reply().await?;
    let mut accepted = 0;
    let mut refused = String::new();
    for _ in rcpts {
        let (code, line) = hop.reply().await?;
        if code / 100 == 2 {
            accepted += 1;
        } else {
            refused = line;
        }
    }
    let (data_code, data_reply) = hop.reply().await?;
    let result = if mail_code / 100 != 2 {
        mail_reply
    } else if accepted == 0 {
        refused
    } else if data_code != 354 {
        data_reply
    } else {
        hop.send(data).await?;
        hop.reply().await?.1
    };
    // QUIT without waiting for its 221: the reply to the client does not wait on it.
    let _ = hop.send(b"QUIT\r\n").await;
    Ok(result)
}
