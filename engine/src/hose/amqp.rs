//! An AMQP 0-9-1 publisher with publisher confirms: the hose's broker sink
//! (RabbitMQ). Each event of a batch is one persistent message (SparkPost's event
//! object as JSON, `message_id` = the event id for consumers that deduplicate,
//! `type` = the event type), routed by `routing_key_prefix` + the event type; the
//! batch counts as shipped once the broker has confirmed every message (`basic.ack`).
//! A `basic.nack`, a closed channel or connection, or no confirm within
//! `events.request_timeout_secs` fails the batch: the connection is dropped and the
//! whole batch published again on a new one (at least once; the ids tell copies).
//!
//! Written for a blocking sink thread over `std::net::TcpStream` (rustls for
//! `amqps://`): the subset of the protocol a publisher needs — the handshake with
//! PLAIN authentication, one channel, `confirm.select`, `exchange.declare`,
//! `basic.publish`, and the frames the broker may send back. (The AMQP crates
//! available run their own executors and reactor threads.)

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gannet_core::config::{AmqpSink, AmqpUrl};

use super::sparkpost::{Events, Filter, TypeSet};

const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_HEARTBEAT: u8 = 8;
const FRAME_END: u8 = 0xCE;
/// The largest frame we ask for (the broker may ask for less).
const FRAME_MAX: u32 = 128 << 10;
const CHANNEL: u16 = 1;

/// A broker sink: its settings and, between batches, its open connection.
pub struct AmqpPublisher {
    config: AmqpSink,
    url: AmqpUrl,
    filter: Filter,
    timeout: Duration,
    connection: Option<Connection>,
}

impl std::fmt::Debug for AmqpPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpPublisher")
            .field("name", &self.config.name)
            .field("connected", &self.connection.is_some())
            .finish()
    }
}

impl AmqpPublisher {
    pub fn new(config: AmqpSink, timeout: Duration) -> Result<AmqpPublisher, String> {
        let url = AmqpUrl::parse(&config.url)?;
        let types = if config.events.is_empty() {
            TypeSet::of(&super::sparkpost::default_types())
        } else {
            TypeSet::of(&config.events)
        }
        .map_err(|unknown| format!("unknown event type {unknown}"))?;
        let filter = Filter {
            types,
            tenant: config.tenant.clone(),
        };
        Ok(AmqpPublisher {
            config,
            url,
            filter,
            timeout,
            connection: None,
        })
    }

    fn publish_batch(&mut self, events: &Events) -> Result<(), String> {
        if self.connection.is_none() {
            self.connection = Some(Connection::open(&self.url, &self.config, self.timeout)?);
        }
        let connection = self.connection.as_mut().expect("opened above");
        let result = connection.publish(&self.config, events, self.timeout);
        if result.is_err() {
            // Whatever state the channel is in, a new connection starts clean.
            self.connection = None;
        }
        result
    }
}

impl super::Sink for AmqpPublisher {
    fn filter(&self) -> Option<Filter> {
        Some(self.filter.clone())
    }

    fn send(&mut self, _batch: &super::BatchRef<'_>, events: &Events) -> Result<String, String> {
        self.publish_batch(events)
            .map(|()| format!("{} confirmed", events.len()))
    }
}

/// The byte stream: plain TCP or TLS.
enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => &s.sock,
        }
    }
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

/// An open connection with its confirm-mode channel.
struct Connection {
    stream: Stream,
    frame_max: u32,
    /// The delivery tag of the next message published on the channel.
    next_tag: u64,
    /// Read but not yet parsed.
    input: Vec<u8>,
}

/// A method's arguments, encoded.
#[derive(Default)]
struct Args(Vec<u8>);

impl Args {
    fn method(class: u16, method: u16) -> Args {
        let mut args = Args(Vec::with_capacity(64));
        args.u16(class).u16(method);
        args
    }
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    /// A short string (at most 255 bytes; longer is cut at a character boundary).
    fn short(&mut self, s: &str) -> &mut Self {
        let mut end = s.len().min(255);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.u8(end as u8);
        self.0.extend_from_slice(&s.as_bytes()[..end]);
        self
    }
    fn long(&mut self, bytes: &[u8]) -> &mut Self {
        self.u32(bytes.len() as u32);
        self.0.extend_from_slice(bytes);
        self
    }
}

/// Reads a method's arguments.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        if self.0.len() < n {
            return Err("a truncated method frame".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_be_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn short(&mut self) -> Result<String, String> {
        let n = self.u8()? as usize;
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }
}

/// A frame read from the broker.
struct Frame {
    kind: u8,
    channel: u16,
    payload: Vec<u8>,
}

impl Frame {
    /// (class, method, arguments) of a method frame.
    fn method(&self) -> Option<(u16, u16, Fields<'_>)> {
        if self.kind != FRAME_METHOD || self.payload.len() < 4 {
            return None;
        }
        let class = u16::from_be_bytes([self.payload[0], self.payload[1]]);
        let method = u16::from_be_bytes([self.payload[2], self.payload[3]]);
        Some((class, method, Fields(&self.payload[4..])))
    }
}

impl Connection {
    fn open(url: &AmqpUrl, config: &AmqpSink, timeout: Duration) -> Result<Connection, String> {
        let addr = format!("{}:{}", url.host, url.port);
        let addrs: Vec<std::net::SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(&addr)
            .map_err(|e| format!("resolving {addr}: {e}"))?
            .collect();
        let mut last = format!("{addr}: no address");
        let mut tcp = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, timeout) {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last = format!("connecting to {a}: {e}"),
            }
        }
        let tcp = tcp.ok_or(last)?;
        tcp.set_nodelay(true).map_err(|e| e.to_string())?;
        tcp.set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        tcp.set_write_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        let stream = if url.tls {
            let name = rustls::pki_types::ServerName::try_from(url.host.clone())
                .map_err(|e| format!("{}: {e}", url.host))?;
            let tls = rustls::ClientConnection::new(tls_config(), name)
                .map_err(|e| format!("TLS: {e}"))?;
            Stream::Tls(Box::new(rustls::StreamOwned::new(tls, tcp)))
        } else {
            Stream::Plain(tcp)
        };
        let mut connection = Connection {
            stream,
            frame_max: FRAME_MAX,
            next_tag: 1,
            input: Vec::with_capacity(4096),
        };
        connection.handshake(url, config)?;
        Ok(connection)
    }

    fn handshake(&mut self, url: &AmqpUrl, config: &AmqpSink) -> Result<(), String> {
        self.stream
            .write_all(b"AMQP\x00\x00\x09\x01")
            .map_err(|e| format!("sending the protocol header: {e}"))?;
        self.expect(0, 10, 10, "connection.start")?;
        let mut response = Vec::new();
        response.push(0);
        response.extend_from_slice(url.user.as_bytes());
        response.push(0);
        response.extend_from_slice(url.password.as_bytes());
        let mut start_ok = Args::method(10, 11);
        start_ok
            .long(&client_properties())
            .short("PLAIN")
            .long(&response)
            .short("en_US");
        self.send_method(0, &start_ok)?;
        let tune = self.expect(0, 10, 30, "connection.tune")?;
        let mut fields = Fields(&tune.payload[4..]);
        let channel_max = fields.u16()?;
        let server_frame_max = fields.u32()?;
        self.frame_max = match server_frame_max {
            0 => FRAME_MAX,
            n => n.min(FRAME_MAX),
        };
        let mut tune_ok = Args::method(10, 31);
        // No heartbeats: an idle publisher's connection that died is found by the
        // next batch's write or read timeout, and replaced.
        tune_ok.u16(channel_max).u32(self.frame_max).u16(0);
        self.send_method(0, &tune_ok)?;
        let mut open = Args::method(10, 40);
        open.short(&url.vhost).short("").u8(0);
        self.send_method(0, &open)?;
        self.expect(0, 10, 41, "connection.open-ok")?;
        let mut channel = Args::method(20, 10);
        channel.short("");
        self.send_method(CHANNEL, &channel)?;
        self.expect(CHANNEL, 20, 11, "channel.open-ok")?;
        let mut confirm = Args::method(85, 10);
        confirm.u8(0);
        self.send_method(CHANNEL, &confirm)?;
        self.expect(CHANNEL, 85, 11, "confirm.select-ok")?;
        if config.declare {
            let mut declare = Args::method(40, 10);
            // durable; not passive, auto-delete, internal or no-wait; no arguments.
            declare
                .u16(0)
                .short(&config.exchange)
                .short(&config.exchange_type)
                .u8(0b0000_0010)
                .u32(0);
            self.send_method(CHANNEL, &declare)?;
            self.expect(CHANNEL, 40, 11, "exchange.declare-ok")?;
        }
        Ok(())
    }

    /// Publishes every event, then waits for the broker to confirm them all.
    fn publish(
        &mut self,
        config: &AmqpSink,
        events: &Events,
        timeout: Duration,
    ) -> Result<(), String> {
        let first = self.next_tag;
        let mut out = Vec::with_capacity(events.body.len() + events.len() * 200);
        for event in &events.items {
            let body = events.object(event);
            let event_id = event.event_id.as_str();
            let mut publish = Args::method(60, 40);
            publish
                .u16(0)
                .short(&config.exchange)
                .short(&format!("{}{}", config.routing_key_prefix, event.kind))
                .u8(0);
            frame_into(&mut out, FRAME_METHOD, CHANNEL, &publish.0);
            let mut header = Args::default();
            // content-type, delivery-mode, message-id, timestamp, type, app-id.
            let flags: u16 = 1 << 15 | 1 << 12 | 1 << 7 | 1 << 6 | 1 << 5 | 1 << 3;
            header
                .u16(60)
                .u16(0)
                .u64(body.len() as u64)
                .u16(flags)
                .short("application/json")
                .u8(2)
                .short(event_id)
                .u64(event.timestamp_ms / 1000)
                .short(event.kind)
                .short("gannet");
            frame_into(&mut out, FRAME_HEADER, CHANNEL, &header.0);
            let chunk = (self.frame_max as usize).saturating_sub(8).max(1);
            for piece in body.chunks(chunk) {
                frame_into(&mut out, FRAME_BODY, CHANNEL, piece);
            }
            self.next_tag += 1;
        }
        self.stream
            .write_all(&out)
            .and_then(|()| self.stream.flush())
            .map_err(|e| format!("publishing: {e}"))?;
        let last = self.next_tag - 1;
        let mut confirmed = vec![false; (last + 1 - first) as usize];
        let mut all_up_to = first - 1;
        let deadline = Instant::now() + timeout;
        while all_up_to < last {
            if Instant::now() >= deadline {
                return Err(format!(
                    "the broker confirmed {} of {} messages within {timeout:?}",
                    confirmed.iter().filter(|c| **c).count(),
                    confirmed.len()
                ));
            }
            let frame = self.read_frame()?;
            let Some((class, method, mut fields)) = frame.method() else {
                continue;
            };
            match (class, method) {
                // basic.ack
                (60, 80) => {
                    let tag = fields.u64()?;
                    let multiple = fields.u8()? & 1 == 1;
                    let from = if multiple { first } else { tag };
                    for t in from.max(first)..=tag.min(last) {
                        confirmed[(t - first) as usize] = true;
                    }
                    while all_up_to < last && confirmed[(all_up_to + 1 - first) as usize] {
                        all_up_to += 1;
                    }
                }
                // basic.nack
                (60, 120) => {
                    let tag = fields.u64()?;
                    return Err(format!("the broker refused message {tag} (basic.nack)"));
                }
                _ => self.refused(&frame)?,
            }
        }
        Ok(())
    }

    /// Reads frames until method `class.method` on `channel`; a close is the error.
    fn expect(
        &mut self,
        channel: u16,
        class: u16,
        method: u16,
        what: &str,
    ) -> Result<Frame, String> {
        loop {
            let frame = self.read_frame()?;
            if let Some((c, m, _)) = frame.method() {
                if (c, m) == (class, method) && frame.channel == channel {
                    return Ok(frame);
                }
                self.refused(&frame)?;
                return Err(format!("expected {what}, got method {c}.{m}"));
            }
        }
    }

    /// Err for a frame that closes the connection or the channel; Ok for others
    /// (ignored).
    fn refused(&mut self, frame: &Frame) -> Result<(), String> {
        let Some((class, method, mut fields)) = frame.method() else {
            return Ok(());
        };
        match (class, method) {
            (10, 50) | (20, 40) => {
                let code = fields.u16()?;
                let text = fields.short()?;
                // Answer the close (close-ok) so the broker can let go at once.
                let ok = if class == 10 {
                    Args::method(10, 51)
                } else {
                    Args::method(20, 41)
                };
                let _ = self.send_method(frame.channel, &ok);
                let what = if class == 10 { "connection" } else { "channel" };
                Err(format!("the broker closed the {what}: {code} {text}"))
            }
            _ => Ok(()),
        }
    }

    fn send_method(&mut self, channel: u16, args: &Args) -> Result<(), String> {
        let mut out = Vec::with_capacity(args.0.len() + 8);
        frame_into(&mut out, FRAME_METHOD, channel, &args.0);
        self.stream
            .write_all(&out)
            .and_then(|()| self.stream.flush())
            .map_err(|e| format!("writing to the broker: {e}"))
    }

    fn read_frame(&mut self) -> Result<Frame, String> {
        loop {
            if self.input.len() >= 7 {
                if self.input.starts_with(b"AMQP") {
                    return Err("the broker speaks another AMQP version".into());
                }
                let size = u32::from_be_bytes([
                    self.input[3],
                    self.input[4],
                    self.input[5],
                    self.input[6],
                ]) as usize;
                if size > self.frame_max.max(FRAME_MAX) as usize + 1024 {
                    return Err(format!("a frame of {size} bytes from the broker"));
                }
                if self.input.len() > 7 + size {
                    if self.input[7 + size] != FRAME_END {
                        return Err("a frame without its end marker from the broker".into());
                    }
                    let frame = Frame {
                        kind: self.input[0],
                        channel: u16::from_be_bytes([self.input[1], self.input[2]]),
                        payload: self.input[7..7 + size].to_vec(),
                    };
                    self.input.drain(..8 + size);
                    if frame.kind == FRAME_HEARTBEAT {
                        continue;
                    }
                    return Ok(frame);
                }
            }
            let mut chunk = [0u8; 16 << 10];
            let n = self
                .stream
                .read(&mut chunk)
                .map_err(|e| format!("reading from the broker: {e}"))?;
            if n == 0 {
                return Err("the broker closed the connection".into());
            }
            self.input.extend_from_slice(&chunk[..n]);
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        let _ = self.stream.tcp().shutdown(std::net::Shutdown::Both);
    }
}

fn frame_into(out: &mut Vec<u8>, kind: u8, channel: u16, payload: &[u8]) {
    out.push(kind);
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out.push(FRAME_END);
}

/// The client-properties table: product, version, and the capabilities we use.
fn client_properties() -> Vec<u8> {
    let mut table = Vec::new();
    let mut long_string = |name: &str, value: &str| {
        table.push(name.len() as u8);
        table.extend_from_slice(name.as_bytes());
        table.push(b'S');
        table.extend_from_slice(&(value.len() as u32).to_be_bytes());
        table.extend_from_slice(value.as_bytes());
    };
    long_string("product", "gannet");
    long_string("version", env!("CARGO_PKG_VERSION"));
    let mut capabilities = Vec::new();
    let name = "publisher_confirms";
    capabilities.push(name.len() as u8);
    capabilities.extend_from_slice(name.as_bytes());
    capabilities.extend_from_slice(b"t\x01");
    let name = "capabilities";
    table.push(name.len() as u8);
    table.extend_from_slice(name.as_bytes());
    table.push(b'F');
    table.extend_from_slice(&(capabilities.len() as u32).to_be_bytes());
    table.extend_from_slice(&capabilities);
    table
}

fn tls_config() -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_and_fields_round_trip() {
        let mut args = Args::method(60, 80);
        args.u64(42).u8(1).short("é".repeat(200).as_str());
        let mut out = Vec::new();
        frame_into(&mut out, FRAME_METHOD, 1, &args.0);
        assert_eq!(out[0], FRAME_METHOD);
        assert_eq!(*out.last().unwrap(), FRAME_END);
        let frame = Frame {
            kind: out[0],
            channel: u16::from_be_bytes([out[1], out[2]]),
            payload: out[7..out.len() - 1].to_vec(),
        };
        let (class, method, mut fields) = frame.method().unwrap();
        assert_eq!((class, method, frame.channel), (60, 80, 1));
        assert_eq!(fields.u64().unwrap(), 42);
        assert_eq!(fields.u8().unwrap(), 1);
        // Cut at 255 bytes, on a character boundary.
        assert_eq!(fields.short().unwrap(), "é".repeat(127));
        assert!(fields.u8().is_err(), "nothing left");
    }
}
