//! A webhook receiver for the benchmarks: a minimal HTTP/1.1 server (keep-alive,
//! `Content-Length` bodies) on a thread per connection, answering every POST 200 and
//! counting the events of each batch (their `{"msys":` envelopes). Minimal on
//! purpose: what a benchmark of the event hose measures is gannet's cost, not a
//! receiver's.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug)]
pub struct HookReceiver {
    pub port: u16,
    /// Events received (in every batch, pings included as 1).
    pub events: Arc<AtomicU64>,
    pub batches: Arc<AtomicU64>,
}

impl HookReceiver {
    pub fn start() -> std::io::Result<HookReceiver> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let events = Arc::new(AtomicU64::new(0));
        let batches = Arc::new(AtomicU64::new(0));
        std::thread::spawn({
            let (events, batches) = (events.clone(), batches.clone());
            move || {
                for stream in listener.incoming().flatten() {
                    let (events, batches) = (events.clone(), batches.clone());
                    std::thread::spawn(move || {
                        let _ = serve(stream, &events, &batches);
                    });
                }
            }
        });
        Ok(HookReceiver {
            port,
            events,
            batches,
        })
    }
}

fn serve(stream: TcpStream, events: &AtomicU64, batches: &AtomicU64) -> std::io::Result<()> {
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut body = Vec::new();
    loop {
        let mut length = 0usize;
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        body.resize(length, 0);
        reader.read_exact(&mut body)?;
        // Counted, not parsed: each event starts with its envelope.
        let n = memchr::memmem::find_iter(&body, b"{\"msys\":").count();
        events.fetch_add(n as u64, Ordering::Relaxed);
        batches.fetch_add(1, Ordering::Relaxed);
        writer.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")?;
    }
}
