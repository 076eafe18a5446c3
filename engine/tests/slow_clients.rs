//! Slow and many clients: connections that trickle a byte at a time (slowloris) over
//! SMTP and HTTP are cut off by per-request deadlines while other clients are served,
//! and 10,000 concurrent SMTP connections are held to the configured limits without
//! harm.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::Daemon;

/// A connection from `source` (any 127.0.0.0/8 address) to `to`.
fn connect_from(source: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::new(source, 0).into())?;
    socket.connect(&to.into())?;
    Ok(socket.into())
}

/// Raises this process's open-files limit to its hard limit (10,000 sockets).
fn raise_open_files() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the one struct passed.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit);
    }
}

/// A trickling client: the bytes of `script`, one every `every`, until the server
/// closes the connection; what the server said, and when it closed.
struct Trickler {
    stream: TcpStream,
    script: Vec<u8>,
    sent: usize,
    heard: Vec<u8>,
    closed: Option<Instant>,
}

impl Trickler {
    fn new(stream: TcpStream, script: &[u8]) -> Trickler {
        stream.set_nonblocking(true).unwrap();
        Trickler {
            stream,
            script: script.to_vec(),
            sent: 0,
            heard: Vec::new(),
            closed: None,
        }
    }

    /// One step: read what arrived, send the next byte.
    fn step(&mut self) {
        if self.closed.is_some() {
            return;
        }
        let mut buf = [0u8; 4096];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    self.closed = Some(Instant::now());
                    return;
                }
                Ok(n) => self.heard.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.closed = Some(Instant::now());
                    return;
                }
            }
        }
        if self.sent < self.script.len() {
            if self
                .stream
                .write(&self.script[self.sent..self.sent + 1])
                .is_ok()
            {
                self.sent += 1;
            }
        } else {
            // A script done: keep trickling harmless bytes.
            let _ = self.stream.write(b"x");
        }
    }

    fn heard(&self) -> String {
        String::from_utf8_lossy(&self.heard).into_owned()
    }
}

/// Steps every trickler every 200 ms until all are closed or `limit` passes.
fn trickle(tricklers: &mut [Trickler], limit: Duration) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline && tricklers.iter().any(|t| t.closed.is_none()) {
        for t in tricklers.iter_mut() {
            t.step();
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One SMTP transaction from 127.0.0.1: the final reply.
fn send_one(daemon: &Daemon, n: usize) -> String {
    daemon.send_message(&format!("r{n}@d.test"), "Subject: fast\r\n\r\nhello\r\n")
}

#[test]
fn smtp_slowloris_is_cut_off_by_per_command_and_data_deadlines_while_others_are_served() {
    let daemon = Daemon::start(
        "sessions_max = 400\nsessions_per_ip_max = 60\ncommand_timeout_secs = 2\ndata_timeout_secs = 2\n",
        "",
    );
    let attacker: IpAddr = "127.0.0.2".parse().unwrap();
    let started = Instant::now();
    let mut tricklers = Vec::new();
    // Half trickle a command line, half trickle message data after DATA.
    for i in 0..60 {
        let stream = connect_from(attacker, daemon.smtp).unwrap();
        let mut t = if i % 2 == 0 {
            Trickler::new(stream, b"EHLO slow.test\r\n")
        } else {
            let mut s = stream;
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut c = common::Client::from_stream(s.try_clone().unwrap());
            c.expect("220");
            c.send(b"EHLO s.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n");
            for code in ["250", "250", "250", "354"] {
                c.expect(code);
            }
            s = c.stream;
            Trickler::new(s, b"Subject: slow\r\n\r\nthis never ends")
        };
        t.step();
        tricklers.push(t);
    }
    // The per-address limit refuses a 61st from the same address at once.
    let mut extra = common::Client::from_stream(connect_from(attacker, daemon.smtp).unwrap());
    extra.expect("421 4.7.0");
    // Everyone else is served meanwhile.
    for n in 0..5 {
        let reply = send_one(&daemon, n);
        assert!(reply.starts_with("250 2.0.0"), "{reply}");
    }
    trickle(&mut tricklers, Duration::from_secs(15));
    for t in &tricklers {
        let closed = t.closed.expect("a trickling session was never cut off");
        assert!(t.heard().contains("421 4.4.2"), "{}", t.heard());
        // Cut at its deadline (2 s), long before its bytes stopped coming.
        assert!(
            closed - started < Duration::from_secs(10),
            "{:?}",
            closed - started
        );
        assert!(t.sent > 0);
    }
    let reply = send_one(&daemon, 99);
    assert!(reply.starts_with("250 2.0.0"), "{reply}");
}

#[test]
fn http_slowloris_heads_and_bodies_are_cut_off_while_others_are_served() {
    let daemon = Daemon::start(
        "",
        "request_head_timeout_secs = 2\nrequest_body_timeout_secs = 2\n",
    );
    let mut tricklers = Vec::new();
    for i in 0..40 {
        let stream = TcpStream::connect(daemon.http).unwrap();
        let script: &[u8] = if i % 2 == 0 {
            b"GET /health HTTP/1.1\r\nhost: slow\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n"
        } else {
            b"POST /api/v1/transmissions HTTP/1.1\r\nhost: s\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n{\"recipients\":"
        };
        let mut t = Trickler::new(stream, b"");
        // The body trickler sends its head at once, then trickles the body.
        if i % 2 == 1 {
            let head_end = script.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            t.stream.set_nonblocking(false).unwrap();
            t.stream.write_all(&script[..head_end]).unwrap();
            t.stream.set_nonblocking(true).unwrap();
            t.script = script[head_end..].to_vec();
        } else {
            t.script = script.to_vec();
        }
        tricklers.push(t);
    }
    let started = Instant::now();
    // Others are served meanwhile.
    assert_eq!(daemon.http_get("/health").0, 200);
    trickle(&mut tricklers, Duration::from_secs(15));
    for (i, t) in tricklers.iter().enumerate() {
        let closed = t
            .closed
            .unwrap_or_else(|| panic!("trickler {i} was never cut off: {}", t.heard()));
        assert!(
            closed - started < Duration::from_secs(10),
            "{:?}",
            closed - started
        );
        if i % 2 == 1 {
            assert!(t.heard().starts_with("HTTP/1.1 408"), "{}", t.heard());
        } else {
            assert!(!t.heard().contains("200 OK"), "{}", t.heard());
        }
    }
    assert_eq!(daemon.http_get("/health").0, 200);
}

#[test]
fn ten_thousand_concurrent_smtp_connections_are_held_to_the_limits() {
    raise_open_files();
    let daemon = Daemon::start("sessions_max = 2000\nsessions_per_ip_max = 1000\n", "");
    let mut held = Vec::new();
    let (mut greeted, mut refused) = (0, 0);
    for i in 0..10_000u32 {
        let source: IpAddr = format!("127.0.1.{}", 1 + i % 10).parse().unwrap();
        let stream = connect_from(source, daemon.smtp).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut c = common::Client::from_stream(stream);
        let reply = c.reply().unwrap_or_default();
        if reply.starts_with("220") {
            greeted += 1;
            held.push(c);
        } else {
            assert!(reply.starts_with("421 4.7.0"), "{reply}");
            refused += 1;
        }
    }
    assert_eq!((greeted, refused), (2000, 8000));
    assert_eq!(daemon.metric("smtp_sessions_active"), 2000);
    assert_eq!(daemon.http_get("/health").0, 200);
    // The sessions held still work.
    let c = held.last_mut().unwrap();
    c.send(b"NOOP\r\n");
    c.expect("250");
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(20);
    while daemon.metric("smtp_sessions_active") > 0 {
        assert!(Instant::now() < deadline, "sessions were not released");
        std::thread::sleep(Duration::from_millis(50));
    }
    let reply = send_one(&daemon, 1);
    assert!(reply.starts_with("250 2.0.0"), "{reply}");
}
