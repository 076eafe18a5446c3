//! Starting the real peers the tests talk to (aiosmtpd, dnsmasq, smtp-sink) on free
//! loopback ports, and stopping them by PID. Shared by the engine's unit tests
//! (included from `src/lib.rs`), its integration tests (included from
//! `tests/common`) and the benchmarks (included from `bench/src/lib.rs`).

#![allow(dead_code)]

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A peer process, stopped (SIGTERM, then reaped) when dropped.
#[derive(Debug)]
pub struct Peer(pub Child);

impl Drop for Peer {
    fn drop(&mut self) {
        // SAFETY: signalling a child this test started.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Postfix's smtp-sink on `port`, with its extra arguments (e.g. `-d dir/msg.` to
/// keep each transaction in a file); waits until it accepts connections.
pub fn smtp_sink(port: u16, extra: &[&str]) -> Peer {
    let child = Command::new("/usr/sbin/smtp-sink")
        .args(["-u", "nobody"])
        .args(extra)
        .args([&format!("127.0.0.1:{port}"), "100"])
        .stdout(Stdio::null())
        .spawn()
        .expect("smtp-sink (postfix) is installed by tools/install-peers.sh");
    let peer = Peer(child);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(Duration::from_millis(10));
    }
    peer
}

/// The venv's Python, which has aiosmtpd (tools/test.sh creates it).
pub fn python() -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/pyenv/bin/python3");
    assert!(
        path.exists(),
        "{} is missing; tools/test.sh creates it with aiosmtpd",
        path.display()
    );
    path
}

/// Starts aiosmtpd (tests/peers/aiosmtpd_sink.py) on a free port, storing messages in
/// `out`, with STARTTLS when `tls` gives a certificate and key; returns once it listens.
pub fn aiosmtpd(out: &Path, tls: Option<(&Path, &Path)>) -> (Peer, u16) {
    let port = free_port();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/aiosmtpd_sink.py");
    let mut command = Command::new(python());
    command.arg(script).arg(port.to_string()).arg(out);
    if let Some((cert, key)) = tls {
        command.arg("--tls").arg(cert).arg(key);
    }
    let mut child = command.stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    (Peer(child), port)
}

/// Starts dnsmasq on 127.0.0.1:`port`, answering for `.test` only (every name not in
/// `records` is NXDOMAIN), with `records` as extra options (`--mx-host=…`,
/// `--host-record=…`, TTLs).
pub fn dnsmasq(port: u16, records: &[String]) -> Peer {
    let child = Command::new("dnsmasq")
        .args([
            "--no-daemon",
            "--conf-file=/dev/null",
            "--pid-file=",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            &format!("--port={port}"),
            "--local=/test/",
        ])
        .args(records)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("dnsmasq is installed by tools/test.sh");
    // dnsmasq binds after it starts: wait until its socket is in the kernel's UDP
    // table (a query sent earlier would be lost and time out).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !udp_bound(port) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    Peer(child)
}

/// Whether some socket is bound to UDP `port` on 127.0.0.1 (from /proc/net/udp).
fn udp_bound(port: u16) -> bool {
    let wanted = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/udp")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(wanted.as_str()))
}
