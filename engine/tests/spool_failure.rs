//! A spool that cannot store a message makes the server answer 451 4.3.0 — never
//! 250 — and keeps the session and the shard running.
//!
//! The daemon runs with a file-size limit (RLIMIT_FSIZE) below the segment size, so
//! preallocating the first spool segment fails (EFBIG) like a full disk would.

mod common;

use std::os::unix::process::CommandExt;

use common::Daemon;

#[test]
fn spool_write_failure_is_a_temporary_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::config_text(dir.path(), "", "[spool]\nsegment_bytes = 4194304\n");
    let daemon = Daemon::start_with(dir, &config, |command| {
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            command.pre_exec(|| {
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                let limit = libc::rlimit {
                    rlim_cur: 1 << 20,
                    rlim_max: 1 << 20,
                };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    for _ in 0..2 {
        let mut client = daemon.connect();
        client.expect("220");
        client.send(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n");
        client.expect("250");
        client.expect("250 2.1.0");
        client.expect("250 2.1.5");
        client.expect("354");
        client.send(b"Subject: not stored\r\n\r\nbody\r\n.\r\n");
        client.expect("451 4.3.0");
        client.send(b"NOOP\r\n");
        client.expect("250");
        client.send(b"QUIT\r\n");
        client.expect("221");
    }
    assert_eq!(daemon.metric("smtp_spool_failures_total"), 2);
    assert_eq!(daemon.metric("smtp_messages_accepted_total"), 0);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(!daemon.events().iter().any(|e| e["type"] == "reception"));
}
