//! Changing `server.shards` between runs strands no mail: lowering it makes the
//! remaining shards adopt the spools of the shards that are gone, with every
//! message's exact retry state; raising it leaves every spool with its shard. The
//! adopted mail is then delivered, once.

mod common;

use std::collections::BTreeMap;

use common::Daemon;
use common::peers::free_port;
use common::relay::sink;

/// (attempts, due, recipients) of every spooled message, by id.
fn states(daemon: &Daemon) -> BTreeMap<String, (u32, u64, Vec<String>)> {
    common::spooled(&daemon.data_dir())
        .into_iter()
        .map(|m| (m.id, (m.attempts, m.due_ms, m.recipients)))
        .collect()
}

fn shard_dirs(daemon: &Daemon) -> Vec<String> {
    let mut dirs: Vec<String> = std::fs::read_dir(daemon.data_dir().join("spool"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    dirs.sort();
    dirs
}

/// Sends `n` messages to `domain`, one connection each (so SO_REUSEPORT spreads them
/// over the shards).
fn send(daemon: &Daemon, domain: &str, n: usize) {
    for i in 0..n {
        daemon.send_accepted(
            &format!("r{i}@{domain}"),
            &format!("Subject: {domain} {i}\r\n\r\nhello\r\n"),
        );
    }
}

/// Restarts `daemon` (stopped) on `config`.
fn restart(daemon: &mut Daemon, config: &str) -> Daemon {
    let dir = std::mem::replace(&mut daemon.dir, tempfile::tempdir().unwrap());
    Daemon::start_in(dir, config)
}

#[test]
fn lowering_the_shard_count_adopts_the_spools_of_the_shards_gone_and_raising_it_keeps_them() {
    let sink = sink();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = |shards: usize, delivery: &str| {
        format!(
            "[server]\nhostname = \"gannet.test\"\ndata_dir = \"{}\"\nshards = {shards}\npin_cores = false\n\
             [smtp]\nlisten = [\"127.0.0.1:0\"]\n[http]\nlisten = [\"127.0.0.1:0\"]\n\
             [delivery]\nretry_interval_secs = 3600\nmax_retry_interval_secs = 3600\n{delivery}\n\
             [delivery.shaping]\nconnection_backoff_max_secs = 1\n",
            data.display()
        )
    };
    let dead = format!("routes = {{ \"*\" = [\"127.0.0.1:{}\"] }}", free_port());
    let live = format!("routes = {{ \"*\" = [\"127.0.0.1:{}\"] }}", sink.port);

    // Four shards: 20 messages tried once (a refused connection: retry in an hour),
    // then 20 never tried (delivery suspended).
    let mut daemon = Daemon::start_in(dir, &config(4, &dead));
    send(&daemon, "retry.test", 20);
    common::relay::wait_events(&daemon, "20 deferrals", |e| {
        e.iter()
            .filter(|e| e["type"] == "transient_failure")
            .count()
            == 20
    });
    daemon.stop();
    let mut daemon = restart(&mut daemon, &config(4, "suspended = true"));
    send(&daemon, "fresh.test", 20);
    daemon.stop();
    let before = states(&daemon);
    assert_eq!(before.len(), 40);
    let shards_used: std::collections::BTreeSet<u16> = common::spooled(&daemon.data_dir())
        .iter()
        .map(|m| m.shard)
        .collect();
    assert!(
        shards_used.iter().any(|s| *s >= 1),
        "the kernel spread 40 connections over one shard only: {shards_used:?}"
    );

    // One shard: it adopts spools 1, 2 and 3 with every message's exact state.
    let mut daemon = restart(&mut daemon, &config(1, "suspended = true"));
    let log = daemon.log.lock().unwrap().join("\n");
    assert!(
        log.contains("adopted the spool of a shard beyond server.shards"),
        "{log}"
    );
    daemon.stop();
    assert_eq!(states(&daemon), before);
    assert_eq!(shard_dirs(&daemon), ["0"]);

    // Three shards, delivering: the never-tried messages leave once each; the
    // deferred ones wait for their hour with their attempt counted.
    let mut daemon = restart(&mut daemon, &config(3, &live));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while sink.messages().len() < 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "adopted mail not delivered"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    daemon.stop();
    let delivered: Vec<String> = sink
        .messages()
        .iter()
        .map(|m| m["rcpt_tos"][0].as_str().unwrap().to_string())
        .collect();
    let distinct: std::collections::BTreeSet<&String> = delivered.iter().collect();
    assert_eq!((delivered.len(), distinct.len()), (20, 20));
    assert!(delivered.iter().all(|r| r.ends_with("@fresh.test")));
    let after = states(&daemon);
    assert_eq!(after.len(), 20);
    for (id, state) in &after {
        assert_eq!(Some(state), before.get(id), "{id}");
        assert_eq!(state.0, 1);
    }
    assert_eq!(shard_dirs(&daemon), ["0", "1", "2"]);
}

/// An adoption cut short after the copies were durable but before the old directory
/// went (restored here from a copy taken before the adoption) is done again without
/// queueing anything twice.
#[test]
fn an_adoption_interrupted_before_the_old_spool_went_queues_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = |shards: usize| {
        format!(
            "[server]\nhostname = \"gannet.test\"\ndata_dir = \"{}\"\nshards = {shards}\npin_cores = false\n\
             [smtp]\nlisten = [\"127.0.0.1:0\"]\n[http]\nlisten = [\"127.0.0.1:0\"]\n\
             [spool]\nsegment_bytes = 1048576\n[delivery]\nsuspended = true\n",
            data.display()
        )
    };
    let mut daemon = Daemon::start_in(dir, &config(4));
    send(&daemon, "x.test", 30);
    daemon.stop();
    let before = states(&daemon);
    let backup = tempfile::tempdir().unwrap();
    let spool = daemon.data_dir().join("spool");
    for j in 1..4 {
        let from = spool.join(j.to_string());
        let to = backup.path().join(j.to_string());
        std::fs::create_dir(&to).unwrap();
        for file in std::fs::read_dir(&from).unwrap() {
            let file = file.unwrap();
            std::fs::copy(file.path(), to.join(file.file_name())).unwrap();
        }
    }
    let mut daemon = restart(&mut daemon, &config(1));
    daemon.stop();
    assert_eq!(states(&daemon), before);
    // The crash: the old directories are back beside the adopted copies.
    for j in 1..4 {
        std::fs::rename(backup.path().join(j.to_string()), spool.join(j.to_string())).unwrap();
    }
    let mut daemon = restart(&mut daemon, &config(1));
    daemon.stop();
    assert_eq!(states(&daemon), before);
    assert_eq!(common::spooled(&daemon.data_dir()).len(), 30);
    assert_eq!(shard_dirs(&daemon), ["0"]);
}
