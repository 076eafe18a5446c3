//! The cluster link against a real Redis (redis-server, started by each test on a
//! loopback port): three links — three nodes' worth, each with its own connection —
//! leasing from one shared throttle get together what its limit allows (within 5%),
//! tokens given back are leased again, a Redis that stops makes every lease fall back
//! as configured at once, and the links recover when it returns on the same port.
//! Nodes count each other (a link dropped leaves at once, a gannetd killed with -9
//! is forgotten after the heartbeats' time to live). gannetd with `[cluster]`
//! reports the link in its metrics.

mod common;

use std::time::{Duration, Instant};

use common::Daemon;
use common::peers::{redis_server, redis_server_on};
use gannet_core::config::shaping::Rate;
use gannet_core::config::{ClusterConfig, Fallback, RedisUrl};
use gannet_engine::cluster::{Answer, Link};

fn config(port: u16, fallback: Fallback) -> ClusterConfig {
    ClusterConfig {
        redis_url: RedisUrl(format!("redis://127.0.0.1:{port}/")),
        fallback,
        ..ClusterConfig::default()
    }
}

fn lease(link: &Link, key: &str, rate: Rate, wanted: u32) -> Answer {
    link.lease(key, rate, wanted)
        .wait(Duration::from_secs(5))
        .expect("the link answers within its timeout")
}

#[test]
fn three_nodes_together_stay_within_the_shared_limit() {
    let (_redis, port) = redis_server();
    // 100 a second, a burst of 100 (as the local throttle allows).
    let rate = Rate::Per {
        count: 100,
        per_ms: 1000,
    };
    let window = Duration::from_secs(3);
    let links: Vec<Link> = (0..3)
        .map(|i| Link::start(&config(port, Fallback::Open), &format!("node-{i}")).unwrap())
        .collect();
    let started = Instant::now();
    let got: Vec<u64> = std::thread::scope(|s| {
        let nodes: Vec<_> = (links.iter())
            .map(|link| {
                s.spawn(move || {
                    let mut got = 0u64;
                    while started.elapsed() < window {
                        match lease(link, "mx.shared.test", rate, 10) {
                            Answer::Granted { tokens, wait_ms } => {
                                got += u64::from(tokens);
                                if tokens == 0 {
                                    std::thread::sleep(Duration::from_millis(wait_ms.max(1)));
                                }
                            }
                            other => panic!("Redis is up: {other:?}"),
                        }
                    }
                    got
                })
            })
            .collect();
        nodes.into_iter().map(|n| n.join().unwrap()).collect()
    });
    let total: u64 = got.iter().sum();
    // The burst, then one token every 10 ms over the window.
    let allowed = 100.0 + 100.0 * window.as_secs_f64();
    assert!(
        (total as f64) <= allowed * 1.05 && (total as f64) >= allowed * 0.95,
        "{got:?} = {total}, allowed {allowed}"
    );
    assert!(
        got.iter().all(|g| *g > 0),
        "every node leased some: {got:?}"
    );
    // Each alone would have taken all of it: the limit is the cluster's.
    for link in &links {
        assert!(
            link.stats()
                .calls_total
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0
        );
        assert_eq!(
            link.stats()
                .failures_total
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
    }
}

#[test]
fn tokens_given_back_are_leased_again() {
    let (_redis, port) = redis_server();
    let link = Link::start(&config(port, Fallback::Open), "node-a").unwrap();
    let rate = Rate::Per {
        count: 60,
        per_ms: 60_000,
    };
    // The whole burst, then nothing for a second's worth of waiting.
    assert_eq!(
        lease(&link, "back.test", rate, 100),
        Answer::Granted {
            tokens: 60,
            wait_ms: 1000
        }
    );
    let Answer::Granted { tokens: 0, wait_ms } = lease(&link, "back.test", rate, 1) else {
        panic!("the burst is spent");
    };
    assert!((900..=1000).contains(&wait_ms), "{wait_ms}");
    link.give_back("back.test", rate, 20);
    let Answer::Granted { tokens, .. } = lease(&link, "back.test", rate, 100) else {
        panic!("Redis is up");
    };
    assert!((20..=21).contains(&tokens), "{tokens}");
    // Another throttle is another key; an unlimited rate asks Redis nothing.
    let leased = || (link.stats().tokens_leased_total).load(std::sync::atomic::Ordering::Relaxed);
    let before = leased();
    assert!(matches!(
        lease(&link, "other.test", rate, 5),
        Answer::Granted { tokens: 5, .. }
    ));
    assert_eq!(
        lease(&link, "free.test", Rate::Unlimited, 7),
        Answer::Granted {
            tokens: 7,
            wait_ms: 0
        }
    );
    assert_eq!(leased(), before + 5);
}

#[test]
fn a_stopped_redis_falls_back_as_configured_and_its_return_is_taken_up() {
    use std::sync::atomic::Ordering::Relaxed;
    let (redis, port) = redis_server();
    let open = Link::start(&config(port, Fallback::Open), "node-open").unwrap();
    let closed = Link::start(&config(port, Fallback::Closed), "node-closed").unwrap();
    let rate = Rate::Per {
        count: 1000,
        per_ms: 1000,
    };
    assert!(matches!(
        lease(&open, "k", rate, 1),
        Answer::Granted { tokens: 1, .. }
    ));
    assert!(matches!(
        lease(&closed, "k", rate, 1),
        Answer::Granted { tokens: 1, .. }
    ));
    assert!(open.stats().up.load(Relaxed));
    drop(redis);
    let asked = Instant::now();
    assert_eq!(lease(&open, "k", rate, 1), Answer::Down(Fallback::Open));
    assert_eq!(lease(&closed, "k", rate, 1), Answer::Down(Fallback::Closed));
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "{:?}",
        asked.elapsed()
    );
    assert!(!open.stats().up.load(Relaxed));
    assert!(open.stats().failures_total.load(Relaxed) >= 1);
    // Back on the same port: the links connect again by themselves.
    let _redis = redis_server_on(port);
    let deadline = Instant::now() + Duration::from_secs(10);
    let back = loop {
        let answer = lease(&open, "k", rate, 1);
        if matches!(answer, Answer::Granted { .. }) || Instant::now() > deadline {
            break answer;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        matches!(back, Answer::Granted { tokens: 1, .. }),
        "{back:?}"
    );
    assert!(open.stats().up.load(Relaxed));
    // Up, down, up again.
    assert_eq!(open.stats().state_changes_total.load(Relaxed), 3);
}

/// Waits up to `secs` for `f` to hold.
fn eventually(secs: u64, f: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

#[test]
fn nodes_count_each_other_and_one_that_stops_leaves() {
    let (_redis, port) = redis_server();
    let mut links: Vec<Link> = (0..3)
        .map(|i| Link::start(&config(port, Fallback::Open), &format!("node-{i}")).unwrap())
        .collect();
    assert!(
        eventually(5, || links.iter().all(|l| l.nodes() == 3)),
        "{:?}",
        links.iter().map(Link::nodes).collect::<Vec<_>>()
    );
    // A link dropped (its node stopping) leaves the set at once.
    links.pop();
    assert!(
        eventually(4, || links.iter().all(|l| l.nodes() == 2)),
        "{:?}",
        links.iter().map(Link::nodes).collect::<Vec<_>>()
    );
}

#[test]
fn a_killed_gannetd_is_forgotten_within_seconds() {
    let (_redis, port) = redis_server();
    let extra = format!("[cluster]\nredis_url = \"redis://127.0.0.1:{port}/\"\n");
    let (a, mut b) = (Daemon::start("", &extra), Daemon::start("", &extra));
    let nodes = |d: &Daemon| {
        let (_, body) = d.http_get("/metrics");
        (body.lines())
            .find_map(|l| l.strip_prefix("gannet_cluster_nodes "))
            .and_then(|v| v.parse::<u64>().ok())
    };
    assert!(eventually(5, || nodes(&a) == Some(2) && nodes(&b) == Some(2)));
    // kill -9: no goodbye; the other counts it out after NODE_TTL.
    b.kill();
    let killed = Instant::now();
    assert!(eventually(10, || nodes(&a) == Some(1)), "{:?}", nodes(&a));
    let took = killed.elapsed();
    assert!(
        took >= gannet_engine::cluster::NODE_TTL - Duration::from_secs(2),
        "forgotten after {took:?}: not by its heartbeats' end"
    );
}

#[test]
fn gannetd_reports_its_link_to_the_shared_redis() {
    let (_redis, port) = redis_server();
    let daemon = Daemon::start(
        "",
        &format!("[cluster]\nredis_url = \"redis://127.0.0.1:{port}/\"\n"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = daemon.http_get("/metrics");
        if body.lines().any(|l| l == "gannet_cluster_redis_up 1") {
            break;
        }
        assert!(Instant::now() < deadline, "no link reported:\n{body}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
