//! Every message acknowledged with 250 survives a SIGKILL of the daemon: after a
//! restart the spool recovers each one, intact, with its envelope.

mod common;

use common::Daemon;

#[test]
fn acknowledged_messages_survive_sigkill() {
    let mut daemon = Daemon::start("", "");
    let mut sent = Vec::new();
    for connection in 0..10 {
        let mut client = daemon.connect();
        client.expect("220");
        client.send(b"EHLO c.test\r\n");
        client.expect("250");
        for n in 0..5 {
            let tag = format!("{connection}-{n}");
            client.send(
                format!(
                    "MAIL FROM:<s{tag}@b.test>\r\nRCPT TO:<r{tag}@d.test>\r\nRCPT TO:<x{tag}@e.test>\r\nDATA\r\n"
                )
                .as_bytes(),
            );
            client.expect("250 2.1.0");
            client.expect("250 2.1.5");
            client.expect("250 2.1.5");
            client.expect("354");
            client.send(format!("Subject: restart {tag}\r\n\r\nbody {tag}\r\n.\r\n").as_bytes());
            let reply = client.expect("250 2.0.0 OK queued as ");
            let id = reply.trim_end().rsplit(' ').next().unwrap().to_string();
            sent.push((id, tag));
        }
        // Some connections are left open, mid-session, when the daemon dies.
        if connection % 2 == 0 {
            client.send(b"QUIT\r\n");
            client.expect("221");
        }
    }
    daemon.kill();

    let dir = std::mem::replace(&mut daemon.dir, tempfile::tempdir().unwrap());
    let config = std::fs::read_to_string(dir.path().join("gannetd.toml")).unwrap();
    let mut restarted = Daemon::start_in(dir, &config);
    let log = restarted.log.lock().unwrap().join("\n");
    let live: usize = log
        .lines()
        .filter(|l| l.contains("spool recovered"))
        .map(|l| {
            l.split("live=")
                .nth(1)
                .unwrap()
                .split(' ')
                .next()
                .unwrap()
                .parse::<usize>()
                .unwrap()
        })
        .sum();
    assert_eq!(live, sent.len(), "{log}");
    restarted.stop();

    let spooled = common::spooled(&restarted.data_dir());
    assert_eq!(spooled.len(), sent.len());
    for (id, tag) in &sent {
        let m = spooled
            .iter()
            .find(|m| &m.id == id)
            .unwrap_or_else(|| panic!("{id} lost"));
        assert_eq!(m.sender, format!("s{tag}@b.test"));
        assert_eq!(
            m.recipients,
            [format!("r{tag}@d.test"), format!("x{tag}@e.test")]
        );
        assert_eq!(m.queue, "d.test");
        let body = String::from_utf8_lossy(&m.body);
        assert!(
            body.contains(&format!("\r\nSubject: restart {tag}\r\n")),
            "{body}"
        );
        assert!(body.ends_with(&format!("\r\n\r\nbody {tag}\r\n")), "{body}");
    }
}

/// SIGTERM while a client is inside DATA: the transaction finishes (250, durable),
/// the client is then told 421, idle sessions are told 421 at once, and the daemon
/// exits cleanly with the message in its spool.
#[test]
fn sigterm_lets_transactions_in_progress_finish() {
    let mut daemon = Daemon::start("", "");
    let mut idle = daemon.connect();
    idle.expect("220");
    let mut busy = daemon.connect();
    busy.expect("220");
    busy.send(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n");
    for code in ["250", "250", "250", "354"] {
        busy.expect(code);
    }
    busy.send(b"Subject: in flight\r\n\r\nfirst half\r\n");
    // SAFETY: signalling the child this test started.
    unsafe { libc::kill(daemon.child.id() as i32, libc::SIGTERM) };
    idle.expect("421 4.3.2");
    idle.expect_closed();
    busy.send(b"second half\r\n.\r\n");
    busy.expect("250 2.0.0 OK queued as");
    busy.send(b"NOOP\r\n");
    busy.expect("421 4.3.2");
    busy.expect_closed();
    daemon.stop();
    let spooled = common::spooled(&daemon.data_dir());
    assert_eq!(spooled.len(), 1);
    assert!(spooled[0].body.ends_with(b"first half\r\nsecond half\r\n"));
}
