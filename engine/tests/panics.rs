//! The panic policy: a panic on any shard ends the whole process (SIGABRT) after
//! logging where it happened, so that the supervisor restarts it — never a process
//! that runs on with one dead core whose listeners take connections nobody serves.
//! The restart keeps every acknowledged message.
//!
//! And input that once panicked a shard (click tracking of a link whose first bytes
//! cut a character) is served.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use common::{Daemon, curl};
use serde_json::json;

const KEY: &str = "gannet-panic-key-6b2e91c04d7f3a58";

fn config_extra() -> String {
    format!(
        "api_keys = [{{ name = \"t\", key_sha256 = \"{}\", tenant = \"acme\" }}]\n",
        gannet_core::auth::KeyDigest::of(KEY)
    )
}

/// Sends one message over SMTP; its queue id.
fn send_one(daemon: &Daemon, tag: &str) -> String {
    daemon.send_accepted(
        &format!("{tag}@d.test"),
        &format!("Subject: {tag}\r\n\r\nbody\r\n"),
    )
}

#[test]
fn a_panic_on_a_shard_aborts_the_process_and_the_restart_keeps_acknowledged_mail() {
    let mut daemon = Daemon::start("", "");
    let ids: Vec<String> = (0..6)
        .map(|i| send_one(&daemon, &format!("p{i}")))
        .collect();
    // Several requests: SO_REUSEPORT may hand them to either shard; the first that
    // reaches a shard ends the process.
    let _ = curl(&daemon, "POST", "/debug/panic", &[], None);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = daemon.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "gannetd kept running after a panic"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.signal(), Some(libc::SIGABRT), "{status}");
    let log = daemon.log.lock().unwrap().join("\n");
    assert!(
        log.contains("panic requested by POST /debug/panic") && log.contains("aborting"),
        "{log}"
    );
    // The supervisor's restart: at once, everything acknowledged is back.
    let dir = std::mem::replace(&mut daemon.dir, tempfile::tempdir().unwrap());
    let config = std::fs::read_to_string(dir.path().join("gannetd.toml")).unwrap();
    let mut daemon = Daemon::start_in(dir, &config);
    send_one(&daemon, "after");
    daemon.stop();
    let spooled = common::spooled(&daemon.data_dir());
    for id in &ids {
        assert!(spooled.iter().any(|m| &m.id == id), "{id} lost");
    }
    assert_eq!(spooled.len(), ids.len() + 1);
}

#[test]
fn click_tracking_of_links_that_cut_characters_is_served() {
    let mut daemon = Daemon::start("", &config_extra());
    for href in ["ñññññ", "https:/é/x", "http://例え.jp/", "日本語のリンク"] {
        let body = json!({
            "options": {"click_tracking": true, "open_tracking": true},
            "recipients": [{"address": "a@x.test"}],
            "content": {"from": "s@s.test", "subject": "s", "html": format!("<p><a href=\"{href}\">link</a></p>")}
        });
        let (status, text) = curl(
            &daemon,
            "POST",
            "/api/v1/transmissions",
            &[&format!("Authorization: {KEY}")],
            Some(("application/json", body.to_string().as_bytes())),
        );
        assert_eq!(status, 200, "{href}: {text}");
    }
    assert_eq!(daemon.child.try_wait().unwrap(), None);
    daemon.stop();
    assert_eq!(common::spooled(&daemon.data_dir()).len(), 4);
}
