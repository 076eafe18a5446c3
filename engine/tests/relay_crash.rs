//! Kill -9 of gannetd in the middle of a 20,000-message relay run (injected over SMTP
//! by eight clients, relayed to postfix's smtp-sink over 20 domains), restart, and
//! every acknowledged message is delivered at least once. Messages delivered but not
//! yet tombstoned when the daemon died are delivered again: the test reports them.

mod common;

use std::time::{Duration, Instant};

use common::Daemon;
use common::load::{Load, delivered};
use common::relay::dumping_smtp_sink;

const MESSAGES: usize = 20_000;
const CLIENTS: usize = 8;
const KILL_AFTER: usize = 8_000;

#[test]
fn a_killed_relay_delivers_every_acknowledged_message_after_restart() {
    let (_sink, port, dumps) = dumping_smtp_sink();
    let config = format!(
        "[delivery]\nretry_interval_secs = 1\nmax_retry_interval_secs = 2\nroutes = {{ \"*\" = [\"127.0.0.1:{port}\"] }}\n"
    );
    let mut daemon = Daemon::start("", &config);
    let started = Instant::now();

    let load = Load::start(daemon.smtp, MESSAGES, CLIENTS);
    load.pause_after(KILL_AFTER);
    daemon.kill();
    let acked_at_kill = load.acked.lock().unwrap().len();
    let killed_at = started.elapsed();
    let delivered_at_kill = delivered(dumps.path()).len();

    let dir = std::mem::replace(&mut daemon.dir, tempfile::tempdir().unwrap());
    let config = std::fs::read_to_string(dir.path().join("gannetd.toml")).unwrap();
    let mut restarted = Daemon::start_in(dir, &config);
    load.resume(restarted.smtp);
    let acked = load.finish();
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
