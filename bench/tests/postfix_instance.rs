//! The bench's Postfix runs as an instance of its own and leaves the host's Postfix
//! as it was: `/etc/postfix` is byte for byte the same after a run (once the one line
//! that allows the instance is there), and the host's Postfix master, holding port 25,
//! stays up — the same process, the port still its — through the run. (On a machine
//! where the host's Postfix is not configured its smtpd cannot greet, so the test
//! checks the master and its port, not a greeting.) The instance itself relays a
//! message to smtp-sink.
//!
//! Needs root, as Postfix does.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use gannet_bench::servers;

/// Every file under `dir` with its contents' SHA-256.
fn checksums(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                todo.push(path);
            } else if kind.is_file() {
                let bytes = std::fs::read(&path).unwrap();
                let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
                let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
                out.insert(path.display().to_string(), hex);
            }
        }
    }
    out
}

/// The PID of the host's Postfix master, if it runs.
fn host_master() -> Option<u32> {
    let ok = Command::new("postfix")
        .arg("status")
        .output()
        .ok()?
        .status
        .success();
    if !ok {
        return None;
    }
    std::fs::read_to_string("/var/spool/postfix/pid/master.pid")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether process `pid` holds a socket listening on port 25.
fn holds_port_25(pid: u32) -> bool {
    let out = Command::new("ss")
        .args(["-tlnpH", "sport = :25"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).contains(&format!("pid={pid},"))
}

#[test]
fn the_bench_postfix_is_an_instance_of_its_own_and_the_hosts_postfix_is_untouched() {
    servers::allow_postfix_instance().unwrap();
    // A host Postfix on port 25: the one running, or the host's default instance
    // started for this test (and stopped after it).
    let started_host = host_master().is_none();
    if started_host {
        let out = Command::new("postfix").arg("start").output().unwrap();
        assert!(
            out.status.success(),
            "starting the host's Postfix: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let master = host_master().expect("the host's Postfix runs");
    assert!(
        holds_port_25(master),
        "the host's Postfix does not hold port 25"
    );
    let before = checksums(Path::new("/etc/postfix"));

    let sink = servers::smtp_sink(&[], false).unwrap();
    let bench = servers::postfix(
        4,
        10 << 20,
        &[format!("relayhost = [127.0.0.1]:{}", sink.port)],
    )
    .unwrap();
    assert_ne!(bench.port, 25);
    assert_ne!(bench.pid, master);
    // The instance takes and relays mail.
    let mut s = TcpStream::connect(("127.0.0.1", bench.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    let mut expect = |r: &mut BufReader<TcpStream>, code: &str| loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        assert!(line.starts_with(code), "expected {code}: {line}");
        if line.as_bytes().get(3) == Some(&b' ') {
            break;
        }
    };
    expect(&mut r, "220");
    s.write_all(b"EHLO c.test\r\n").unwrap();
    expect(&mut r, "250");
    s.write_all(b"MAIL FROM:<a@b.test>\r\n").unwrap();
    expect(&mut r, "250");
    s.write_all(b"RCPT TO:<c@d.test>\r\n").unwrap();
    expect(&mut r, "250");
    s.write_all(b"DATA\r\n").unwrap();
    expect(&mut r, "354");
    s.write_all(b"Subject: instance\r\n\r\nhello\r\n.\r\nQUIT\r\n")
        .unwrap();
    expect(&mut r, "250");
    assert!(
        holds_port_25(master),
        "the host's Postfix lost port 25 during the run"
    );
    bench.stop().unwrap();
    sink.stop().unwrap();

    assert_eq!(
        host_master(),
        Some(master),
        "the host's Postfix master changed"
    );
    assert!(holds_port_25(master));
    let after = checksums(Path::new("/etc/postfix"));
    assert_eq!(before, after, "/etc/postfix changed during the bench run");
    if started_host {
        let _ = Command::new("postfix").arg("stop").output();
    }
}
