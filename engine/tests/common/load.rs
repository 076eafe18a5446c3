//! Load that survives a daemon's kill: SMTP clients that keep injecting numbered
//! messages (`Subject: seq N`, one recipient in one of `DOMAINS` domains) into
//! whatever address the daemon has now, and counting what a dumping smtp-sink got.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const DOMAINS: usize = 20;
/// Messages per client connection before it reconnects.
const PER_CONNECTION: usize = 200;

/// Where the clients inject: None while the daemon is down.
pub type Target = Arc<Mutex<Option<SocketAddr>>>;

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

pub fn client(target: Target, mut seqs: std::ops::Range<usize>, acked: Arc<Mutex<Vec<usize>>>) {
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
pub fn delivered(dumps: &std::path::Path) -> HashMap<usize, usize> {
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

/// `clients` clients injecting messages `0..messages` (split evenly) into `target`,
/// and the sequence numbers acknowledged so far.
pub struct Load {
    pub target: Target,
    pub acked: Arc<Mutex<Vec<usize>>>,
    clients: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(addr: SocketAddr, messages: usize, clients: usize) -> Load {
        let target: Target = Arc::new(Mutex::new(Some(addr)));
        let acked = Arc::new(Mutex::new(Vec::with_capacity(messages)));
        let per_client = messages / clients;
        let clients = (0..clients)
            .map(|c| {
                let (target, acked) = (target.clone(), acked.clone());
                std::thread::spawn(move || {
                    client(target, c * per_client..(c + 1) * per_client, acked)
                })
            })
            .collect();
        Load {
            target,
            acked,
            clients,
        }
    }

    /// Waits until `n` messages are acknowledged, then stops the clients' sending
    /// (they wait for a new address).
    pub fn pause_after(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(300);
        while self.acked.lock().unwrap().len() < n {
            assert!(Instant::now() < deadline, "injection too slow");
            std::thread::sleep(Duration::from_millis(5));
        }
        *self.target.lock().unwrap() = None;
    }

    /// The clients go on, into `addr`.
    pub fn resume(&self, addr: SocketAddr) {
        *self.target.lock().unwrap() = Some(addr);
    }

    /// Waits for every client to finish; the sequence numbers acknowledged.
    pub fn finish(self) -> Vec<usize> {
        for c in self.clients {
            c.join().unwrap();
        }
        self.acked.lock().unwrap().clone()
    }
}
