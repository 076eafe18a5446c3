//! gannetd as a process: starts, recovers its spool shards, holds them exclusively,
//! and stops cleanly on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The daemon under test; killed (by PID) if the test ends early.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn start(data_dir: &std::path::Path) -> (Daemon, mpsc::Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_gannetd"))
        .args([
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--shards",
            "2",
            "--log",
            "info",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (Daemon(child), rx)
}

fn wait_for(rx: &mpsc::Receiver<String>, what: &str, count: usize) -> Vec<String> {
    let mut seen = Vec::new();
    let mut hits = 0;
    while hits < count {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("no {what:?} in {seen:#?}"));
        if line.contains(what) {
            hits += 1;
        }
        seen.push(line);
    }
    seen
}

#[test]
fn starts_holds_its_spool_and_stops_on_sigterm() {
    let data = tempfile::tempdir().unwrap();
    let (mut daemon, logs) = start(data.path());
    let lines = wait_for(&logs, "shard ready", 2);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("spool recovered") && l.contains("live=0")),
        "{lines:#?}"
    );
    assert!(data.path().join("spool/0/LOCK").exists() && data.path().join("spool/1/LOCK").exists());

    // A second daemon on the same data directory is refused with a precise error.
    let second = Command::new(env!("CARGO_BIN_EXE_gannetd"))
        .args(["--data-dir", data.path().to_str().unwrap(), "--shards", "1"])
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains("is in use by another process (is gannetd running?)"),
        "{err}"
    );

    // SAFETY: sending a signal to the child we started.
    let sent = unsafe { libc::kill(daemon.0.id() as i32, libc::SIGTERM) };
    assert_eq!(sent, 0);
    wait_for(&logs, "shard stopped; spool synced", 2);
    let status = daemon.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

#[test]
fn bad_arguments_are_refused() {
    let data = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gannetd"))
        .args(["--data-dir", data.path().to_str().unwrap(), "--shards", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("shards must be between 1 and 65535, got 0")
    );
    let out = Command::new(env!("CARGO_BIN_EXE_gannetd"))
        .args(["--no-such-flag"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unexpected argument '--no-such-flag'"));
}
