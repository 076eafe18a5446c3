//! `kill -9` under load, then an immediate restart on the same fixed ports — as a
//! supervisor's restart loop does it. Every restart must succeed at once (the old
//! connections' FIN_WAIT and TIME_WAIT states on the listening port must not block
//! the bind), and every message acknowledged over SMTP (250) or HTTP (200) before any
//! of the kills must be in the spool at the end. Duplicates are counted and printed.
//!
//! The ports are chosen once, at the start of the test, and then fixed: port 0 would
//! give every restart a fresh port and hide what an operator meets.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Client, Daemon};

const KEY: &str = "gannet-crash-key-0d4c1b8e7a2f3e95";
const ROUNDS: usize = 5;
const SMTP_CLIENTS: usize = 4;
const HTTP_CLIENTS: usize = 2;

/// A port that is free now (the kernel's choice for port 0, released at once).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// What the clients were told was accepted.
#[derive(Default)]
struct Acked {
    /// Queue ids from "250 2.0.0 OK queued as <id>".
    smtp: BTreeSet<String>,
    /// Recipient addresses of single-recipient transmissions answered 200.
    http: BTreeSet<String>,
}

/// Sends messages one per connection until `stop`; a failure anywhere in a
/// transaction (the daemon died) only means that message was not acknowledged.
fn smtp_client(addr: SocketAddr, client: usize, stop: Arc<AtomicBool>, acked: Arc<Mutex<Acked>>) {
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let Ok(stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let mut c = Client::from_stream(stream);
        let script = format!(
            "EHLO c{client}.test\r\nMAIL FROM:<s@b.test>\r\nRCPT TO:<r{client}-{n}@d.test>\r\nDATA\r\n"
        );
        let ok = (|| {
            c.reply().filter(|r| r.starts_with("220"))?;
            c.stream.write_all(script.as_bytes()).ok()?;
            for code in ["250", "250", "250", "354"] {
                c.reply()
                    .filter(|r| r.lines().last().is_some_and(|l| l.starts_with(code)))?;
            }
            let line = "x".repeat(76);
            let body = format!(
                "Subject: crash {client}-{n}\r\n\r\n{}.\r\n",
                format!("{line}\r\n").repeat(30)
            );
            c.stream.write_all(body.as_bytes()).ok()?;
            let reply = c.reply()?;
            let id = reply
                .trim_end()
                .strip_prefix("250 2.0.0 OK queued as ")?
                .to_string();
            acked.lock().unwrap().smtp.insert(id);
            let _ = c.stream.write_all(b"QUIT\r\n");
            let _ = c.reply();
            Some(())
        })();
        if ok.is_none() {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// POSTs single-recipient transmissions over keep-alive-less HTTP/1.1 until `stop`.
fn http_client(addr: SocketAddr, client: usize, stop: Arc<AtomicBool>, acked: Arc<Mutex<Acked>>) {
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let rcpt = format!("h{client}-{n}@x.test");
        let body = serde_json::json!({
            "recipients": [{"address": rcpt}],
            "content": {"from": "s@s.test", "subject": "crash", "text": "hello {{address}}"}
        })
        .to_string();
        let request = format!(
            "POST /api/v1/transmissions HTTP/1.1\r\nhost: t\r\nauthorization: {KEY}\r\n\
             content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let ok = (|| {
            let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .ok()?;
            stream.write_all(request.as_bytes()).ok()?;
            let mut reply = String::new();
            stream.read_to_string(&mut reply).ok()?;
            reply.starts_with("HTTP/1.1 200").then_some(())?;
            acked.lock().unwrap().http.insert(rcpt);
            Some(())
        })();
        if ok.is_none() {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

#[test]
fn kill_9_under_load_restarts_at_once_on_the_same_ports_and_loses_nothing() {
    let (smtp, http) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[server]\nhostname = \"gannet.test\"\ndata_dir = \"{}\"\nshards = 2\n\
         [smtp]\nlisten = [\"127.0.0.1:{smtp}\"]\n\
         [http]\nlisten = [\"127.0.0.1:{http}\"]\n\
         api_keys = [{{ name = \"t\", key_sha256 = \"{}\", tenant = \"acme\" }}]\n\
         [delivery]\nsuspended = true\n",
        dir.path().join("data").display(),
        gannet_core::auth::KeyDigest::of(KEY)
    );
    let mut daemon = Daemon::start_in(dir, &config);
    assert_eq!(daemon.smtp.port(), smtp);
    assert_eq!(daemon.http.port(), http);

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Acked::default()));
    let mut clients = Vec::new();
    for c in 0..SMTP_CLIENTS {
        let (stop, acked, addr) = (stop.clone(), acked.clone(), daemon.smtp);
        clients.push(std::thread::spawn(move || {
            smtp_client(addr, c, stop, acked)
        }));
    }
    for c in 0..HTTP_CLIENTS {
        let (stop, acked, addr) = (stop.clone(), acked.clone(), daemon.http);
        clients.push(std::thread::spawn(move || {
            http_client(addr, c, stop, acked)
        }));
    }

    let mut before_kill = Vec::new();
    for round in 0..ROUNDS {
        // Let the load reach the daemon (and leave closed connections on its port).
        let count = || {
            let a = acked.lock().unwrap();
            a.smtp.len() + a.http.len()
        };
        let start = count();
        let deadline = Instant::now() + Duration::from_secs(60);
        while count() < start + 40 {
            assert!(Instant::now() < deadline, "round {round}: no load accepted");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(fastrand::u64(0..300)));
        daemon.kill();
        before_kill.push(count());
        // At once, on the same ports: start_in fails the test if gannetd exits
        // (for example "cannot listen on 127.0.0.1:…: Address already in use").
        let dir = std::mem::replace(&mut daemon.dir, tempfile::tempdir().unwrap());
        let started = Instant::now();
        daemon = Daemon::start_in(dir, &config);
        assert_eq!((daemon.smtp.port(), daemon.http.port()), (smtp, http));
        eprintln!(
            "round {round}: killed after {} acknowledged messages; restarted in {:?}",
            before_kill[round],
            started.elapsed()
        );
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    daemon.stop();

    let acked = acked.lock().unwrap();
    let spooled = common::spooled(&daemon.data_dir());
    let ids: BTreeSet<&str> = spooled.iter().map(|m| m.id.as_str()).collect();
    let lost: Vec<&String> = acked
        .smtp
        .iter()
        .filter(|id| !ids.contains(id.as_str()))
        .collect();
    assert!(
        lost.is_empty(),
        "{} SMTP messages lost: {lost:?}",
        lost.len()
    );
    let mut by_rcpt: BTreeMap<&str, usize> = BTreeMap::new();
    for m in &spooled {
        for r in &m.recipients {
            *by_rcpt.entry(r.as_str()).or_default() += 1;
        }
    }
    let lost: Vec<&String> = acked
        .http
        .iter()
        .filter(|r| !by_rcpt.contains_key(r.as_str()))
        .collect();
    assert!(
        lost.is_empty(),
        "{} HTTP messages lost: {lost:?}",
        lost.len()
    );
    let duplicates: usize = by_rcpt.values().map(|n| n - 1).sum();
    eprintln!(
        "{ROUNDS} kills: {} SMTP and {} HTTP messages acknowledged, all spooled; \
         {} spooled in all, {duplicates} duplicates",
        acked.smtp.len(),
        acked.http.len(),
        spooled.len()
    );
    assert!(acked.smtp.len() > ROUNDS * 10 && acked.http.len() > ROUNDS);
}

/// What a power cut leaves of files written without a sync — the generated TLS pair
/// and tracking key empty or cut short, a temporary file beside them — does not stop
/// the next start: gannetd makes them again (nothing was ever signed with what they
/// hold) and says so.
#[test]
fn generated_files_torn_by_a_power_cut_are_made_again_at_start() {
    let mut daemon = Daemon::start("", "");
    let data = daemon.data_dir();
    daemon.stop();
    let tls = data.join("tls");
    std::fs::write(tls.join("self-signed.crt"), b"").unwrap();
    std::fs::write(tls.join("self-signed.key"), b"-----BEGIN PRIV").unwrap();
    std::fs::write(tls.join(".self-signed.key.tmp"), b"-----BEGIN").unwrap();
    std::fs::write(data.join("tracking.key"), b"1234567").unwrap();

    let dir = std::mem::replace(&mut daemon.dir, tempfile::tempdir().unwrap());
    let config = std::fs::read_to_string(dir.path().join("gannetd.toml")).unwrap();
    let mut daemon = Daemon::start_in(dir, &config);
    let log = daemon.log.lock().unwrap().join("\n");
    assert!(log.contains("is unusable"), "{log}");
    assert!(log.contains("not a whole key"), "{log}");
    let cert = std::fs::read_to_string(tls.join("self-signed.crt")).unwrap();
    assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"), "{cert}");
    assert_eq!(std::fs::read(data.join("tracking.key")).unwrap().len(), 32);
    // The new pair serves STARTTLS.
    let mut client = daemon.connect();
    client.expect("220");
    client.send(b"EHLO c.test\r\n");
    assert!(client.expect("250").contains("STARTTLS"));
    client.send(b"STARTTLS\r\n");
    client.expect("220 2.0.0");
    drop(client);
    daemon.stop();
}
