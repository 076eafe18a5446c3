//! Kill -9 of gannetd in the middle of a 20,000-message relay run (injected over SMTP
//! by eight clients, relayed to postfix's smtp-sink over 20 domains), restart, and
//! every acknowledged message is delivered at least once. Messages delivered but not
//! yet tombstoned when the daemon died are delivered again: the test reports them.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Daemon;
use common::relay::dumping_smtp_sink;

const MESSAGES: usize = 20_000;
const CLIENTS: usize = 8;
const KILL_AFTER: usize = 8_000;
const DOMAINS: usize = 20;
/// Messages per client connection before it reconnects.
const PER_CONNECTION: usize = 200;

/// Where the clients inject: None while the daemon is down.
type Target = Arc<Mutex<Option<SocketAddr>>>;

fn read_reply(reader: &mut BufReader<TcpStream>) -> std::io::Result<String> {
    let mut reply = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        reply.push_str(&line);
        if line.len() < 4 || line.as_bytes()[3] != b'-' {
            return Ok(reply);
        }
    }
}

/// Sends one connection's worth of messages from `seqs`, advancing it past each
/// acknowledged one (a message whose 250 was not read is sent again next time).
fn session(
    addr: SocketAddr,
    seqs: &mut std::ops::Range<usize>,
    acked: &Mutex<Vec<usize>>,
) -> std::io::Result<()> {
    let stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    read_reply(&mut reader)?;
    writer.write_all(b"EHLO client.test\r\n")?;
    read_reply(&mut reader)?;
    for _ in 0..PER_CONNECTION {
        let Some(seq) = seqs.clone().next() else {
            break;
        };
        let envelope = format!(
            "MAIL FROM:<s@client.test>\r\nRCPT TO:<r{seq}@d{}.test>\r\nDATA\r\n",
            seq % DOMAINS
        );
        writer.write_all(envelope.as_bytes())?;
        for expected in ["250", "250", "354"] {
            let reply = read_reply(&mut reader)?;
            if !reply.starts_with(expected) {
                return Err(std::io::Error::other(reply));
            }
        }
        let message = format!("Subject: seq {seq}\r\n\r\nmessage {seq}\r\n.\r\n");
        writer.write_all(message.as_bytes())?;
        let reply = read_reply(&mut reader)?;
        if !reply.starts_with("250 ") {
            return Err(std::io::Error::other(reply));
        }
        acked.lock().unwrap().push(seq);
        seqs.next();
    }
    writer.write_all(b"QUIT\r\n")?;
    Ok(())
}

fn client(target: Target, mut seqs: std::ops::Range<usize>, acked: Arc<Mutex<Vec<usize>>>) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while !seqs.is_empty() {
        assert!(Instant::now() < deadline, "injection stalled at {seqs:?}");
        let addr = *target.lock().unwrap();
        match addr {
            Some(addr) => {
                if session(addr, &mut seqs, &acked).is_err() {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Sequence numbers in the transactions smtp-sink dumped, with their counts.
fn delivered(dumps: &std::path::Path) -> HashMap<usize, usize> {
    let mut seen = HashMap::new();
    for entry in std::fs::read_dir(dumps).unwrap() {
        // smtp-sink may rename or still be writing a file: it is read on a later scan.
        let Ok(bytes) = std::fs::read(entry.unwrap().path()) else {
            continue;
        };
        let text = String::from_utf8_lossy(&bytes);
        if let Some(rest) = text.split("\nSubject: seq ").nth(1) {
            let seq: usize = rest.split_whitespace().next().unwrap().parse().unwrap();
            *seen.entry(seq).or_insert(0) += 1;
        }
    }
    seen
}

#[test]
fn a_killed_relay_delivers_every_acknowledged_message_after_restart() {
    let (_sink, port, dumps) = dumping_smtp_sink();
    let config = format!(
        "[delivery]\nretry_interval_secs = 1\nmax_retry_interval_secs = 2\nroutes = {{ \"*\" = [\"127.0.0.1:{port}\"] }}\n"
    );
    let mut daemon = Daemon::start("", &config);
    let started = Instant::now();

    let target: Target = Arc::new(Mutex::new(Some(daemon.smtp)));
    let acked = Arc::new(Mutex::new(Vec::with_capacity(MESSAGES)));
    let per_client = MESSAGES / CLIENTS;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (target, acked) = (target.clone(), acked.clone());
            std::thread::spawn(move || client(target, c * per_client..(c + 1) * per_client, acked))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(300);
    while acked.lock().unwrap().len() < KILL_AFTER {
        assert!(Instant::now() < deadline, "injection too slow");
        std::thread::sleep(Duration::from_millis(5));
    }
    *target.lock().unwrap() = None;
    daemon.kill();
    let acked_at_kill = acked.lock().unwrap().len();
    let killed_at = started.elapsed();
    let delivered_at_kill = delivered(dumps.path()).len();

    let dir = std::mem::replace(&mut daemon.dir, tempfile::tempdir().unwrap());
    let config = std::fs::read_to_string(dir.path().join("gannetd.toml")).unwrap();
    let mut restarted = Daemon::start_in(dir, &config);
    *target.lock().unwrap() = Some(restarted.smtp);
    for c in clients {
        c.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let injected_at = started.elapsed();
    assert!(acked.len() >= MESSAGES, "{} acknowledged", acked.len());

    let deadline = Instant::now() + Duration::from_secs(300);
    let seen = loop {
        let seen = delivered(dumps.path());
        if acked.iter().all(|seq| seen.contains_key(seq)) {
            break seen;
        }
        let missing = acked.iter().filter(|seq| !seen.contains_key(seq)).count();
        assert!(
            Instant::now() < deadline,
            "{missing} acknowledged messages never delivered"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let delivered_at = started.elapsed();
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    eprintln!(
        "relay crash: {MESSAGES} messages; killed at {killed_at:.1?} after {acked_at_kill} \
         acknowledged and {delivered_at_kill} delivered; all injected at {injected_at:.1?}, \
         every acknowledged message delivered by {delivered_at:.1?}; {duplicates} delivered \
         twice (delivered before the kill, not yet tombstoned)"
    );
    restarted.stop();
    assert!(
        common::spooled(&restarted.data_dir()).is_empty(),
        "every delivered message is tombstoned"
    );
}
