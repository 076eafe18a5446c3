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

/// One of the link's metrics (they have no labels).
fn link_metric(d: &Daemon, name: &str) -> Option<u64> {
    let (_, body) = d.http_get("/metrics");
    let prefix = format!("gannet_{name} ");
    (body.lines())
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|v| v.parse::<u64>().ok())
}

#[test]
fn a_killed_gannetd_is_forgotten_within_seconds() {
    let (_redis, port) = redis_server();
    let extra = format!("[cluster]\nredis_url = \"redis://127.0.0.1:{port}/\"\n");
    let (a, mut b) = (Daemon::start("", &extra), Daemon::start("", &extra));
    let nodes = |d: &Daemon| link_metric(d, "cluster_nodes");
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

/// When each message reached the sink (unix seconds), in order.
fn received(sink: &common::relay::Sink) -> Vec<f64> {
    let mut times: Vec<f64> = (sink.messages().iter())
        .map(|m| m["received_at"].as_f64().expect("received_at"))
        .collect();
    times.sort_by(f64::total_cmp);
    times
}

/// `n` gannetds relaying shared.test to the sink on `sink_port` under `shaping`
/// (the lines of `[delivery.shaping]`), and `cluster` (empty: each on its own).
fn nodes(n: usize, sink_port: u16, shaping: &str, cluster: &str) -> Vec<Daemon> {
    nodes_with(n, sink_port, "", shaping, cluster)
}

/// [`nodes`] with further `[delivery]` keys.
fn nodes_with(
    n: usize,
    sink_port: u16,
    delivery: &str,
    shaping: &str,
    cluster: &str,
) -> Vec<Daemon> {
    let route = format!("\"shared.test\" = [\"127.0.0.1:{sink_port}\"]");
    let config = common::admin::admin_key_config()
        + &common::relay::delivery_config(&route)
        + delivery
        + &format!("[delivery.shaping]\n{shaping}\n{cluster}");
    (0..n).map(|_| Daemon::start("", &config)).collect()
}

/// Injects `each` messages into every node at once (numbered per node).
fn inject_each(daemons: &[Daemon], each: usize) {
    std::thread::scope(|s| {
        for (n, d) in daemons.iter().enumerate() {
            s.spawn(move || {
                for i in 0..each {
                    d.send_accepted(
                        &format!("n{n}-{i}@shared.test"),
                        "Subject: shared\r\n\r\nx\r\n",
                    );
                }
            });
        }
    });
}

/// Waits until the sink has `total` messages, and checks none came twice.
fn sink_got(sink: &common::relay::Sink, total: usize, secs: u64) {
    assert!(
        eventually(secs, || sink.messages().len() >= total),
        "the sink got {} of {total}",
        sink.messages().len()
    );
    assert_eq!(sink.messages().len(), total, "nothing sent twice");
}

/// Three gannetds under `cluster` sending at `rate` messages a second (a burst of
/// as many): `each` messages injected into every node at once. Returns the rate
/// the sink saw after the burst (messages past the burst over the span from the
/// first to the last), the nodes still running and when they started.
fn three_nodes_sending(cluster: &str, rate: u32, each: usize) -> (f64, Vec<Daemon>, Instant) {
    let sink = common::relay::sink();
    let started = Instant::now();
    let daemons = nodes(
        3,
        sink.port,
        &format!("max_message_rate = \"{rate}/s\""),
        cluster,
    );
    inject_each(&daemons, each);
    let total = 3 * each;
    sink_got(&sink, total, 120);
    let times = received(&sink);
    let span = times[total - 1] - times[0];
    let burst = rate as usize;
    ((total - burst) as f64 / span, daemons, started)
}

/// The cluster's combined message rate toward one site stays within the shared
/// limit (±5%) — neither over it nor wasting it — where the same three nodes each
/// on its own send three times as much; Redis is called a few times a second per
/// node, far less than once a message.
#[test]
fn three_gannetds_share_one_message_rate() {
    let (_redis, port) = redis_server();
    let shared = format!("[cluster]\nredis_url = \"redis://127.0.0.1:{port}/\"\n");
    let (rate, daemons, started) = three_nodes_sending(&shared, 20, 80);
    assert!(
        (19.0..=21.0).contains(&rate),
        "three nodes sharing 20/s sent {rate:.2}/s"
    );
    let leased: u64 = (daemons.iter())
        .filter_map(|d| link_metric(d, "cluster_tokens_leased_total"))
        .sum();
    let calls: u64 = (daemons.iter())
        .filter_map(|d| link_metric(d, "cluster_redis_calls_total"))
        .sum();
    eprintln!(
        "shared: {rate:.2}/s, {leased} tokens leased, {calls} Redis calls in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(leased >= 240, "{leased} tokens leased for 240 messages");
    // Bounded by time, not by messages: per node and second at most a lease a
    // window (four of 250 ms) and one asked ahead, a claim of connections and a
    // heartbeat, whatever the message rate.
    let per_node_s = calls as f64 / 3.0 / started.elapsed().as_secs_f64();
    assert!(
        per_node_s <= 10.0,
        "{per_node_s:.1} Redis calls a second per node"
    );
    drop(daemons);
    let (alone, _daemons, _) = three_nodes_sending("", 20, 80);
    eprintln!("each on its own: {alone:.2}/s");
    assert!(
        alone > 2.5 * 20.0,
        "three nodes each limited to 20/s on its own sent only {alone:.2}/s"
    );
}

/// The same through a Redis Cluster of three primaries: three gannetds share one
/// message rate (±5%) and one connection limit, and no call fails (a client not
/// following the cluster's slots would be told MOVED for most keys).
#[test]
fn three_gannetds_share_their_limits_through_a_redis_cluster() {
    let cluster = common::peers::redis_cluster();
    let shared = format!(
        "[cluster]\nredis_url = \"redis://127.0.0.1:{}/\"\nredis_cluster = true\n",
        cluster.ports[0]
    );
    let (rate, daemons, _) = three_nodes_sending(&shared, 20, 80);
    eprintln!("through a Redis Cluster: {rate:.2}/s");
    assert!(
        (19.0..=21.0).contains(&rate),
        "three nodes sharing 20/s through a Redis Cluster sent {rate:.2}/s"
    );
    for d in &daemons {
        assert_eq!(link_metric(d, "cluster_redis_up"), Some(1));
        assert_eq!(link_metric(d, "cluster_redis_failures_total"), Some(0));
        assert_eq!(link_metric(d, "cluster_nodes"), Some(3));
    }
    drop(daemons);
    let sink = common::relay::slow_sink(0.05);
    let daemons = nodes(3, sink.port, "connection_limit = 3", &shared);
    inject_each(&daemons, 40);
    sink_got(&sink, 120, 120);
    let most = sink.connections()["max_sessions"].as_u64().unwrap();
    assert!(
        most <= 3,
        "{most} sessions at once under a limit of 3 shared through a Redis Cluster"
    );
}

/// The cluster's connections to one site stay within the shared connection_limit
/// (three for three nodes) where each node on its own opens its own three; a slow
/// sink keeps them open.
#[test]
fn three_gannetds_share_one_connection_limit() {
    let (_redis, port) = redis_server();
    let shared = format!("[cluster]\nredis_url = \"redis://127.0.0.1:{port}/\"\n");
    let run = |cluster: &str| {
        let sink = common::relay::slow_sink(0.05);
        let daemons = nodes(3, sink.port, "connection_limit = 3", cluster);
        inject_each(&daemons, 40);
        sink_got(&sink, 120, 120);
        sink.connections()["max_open"].as_u64().unwrap()
    };
    let together = run(&shared);
    let alone = run("");
    eprintln!("most connections at once: {together} shared, {alone} each on its own");
    assert!(
        together <= 3,
        "{together} connections at once under a shared limit of 3"
    );
    assert!(alone > 3, "each node on its own opened only {alone} in all");
}

/// A node killed while it holds the whole shared connection limit keeps it only
/// until the others forget it (its heartbeats' time to live): then another node
/// takes the connections and delivers.
#[test]
fn a_killed_nodes_connections_return_to_the_cluster() {
    let (_redis, port) = redis_server();
    let shared = format!("[cluster]\nredis_url = \"redis://127.0.0.1:{port}/\"\n");
    let sink = common::relay::slow_sink(0.5);
    let mut daemons = nodes(2, sink.port, "connection_limit = 2", &shared);
    inject_each(&daemons[..1], 20);
    assert!(
        eventually(20, || sink.connections()["open"].as_u64() == Some(2)),
        "{}",
        sink.connections()
    );
    // The admin API shows the node's claim.
    let (status, body) = common::admin::curl(&daemons[0], "GET", "/api/admin/queues/v1", None);
    assert_eq!(status, 200, "{body}");
    let listing: serde_json::Value = serde_json::from_str(&body).unwrap();
    let share = &listing["ready"][0]["cluster"];
    assert_eq!(share["connections_claimed"], 2, "{listing}");
    assert!(share.get("fallback").is_none(), "{share}");
    daemons[0].kill();
    let killed = Instant::now();
    let before = sink.messages().len();
    let b = &daemons[1];
    for i in 0..6 {
        b.send_accepted(&format!("b{i}@shared.test"), "Subject: after\r\n\r\nx\r\n");
    }
    let from_b = || {
        (sink.messages().iter())
            .filter(|m| {
                m["rcpt_tos"][0]
                    .as_str()
                    .is_some_and(|r| r.starts_with('b'))
            })
            .count()
    };
    assert!(
        eventually(30, || from_b() == 6),
        "b delivered {} of 6",
        from_b()
    );
    let took = killed.elapsed();
    eprintln!("the killed node had delivered {before}; the other's six took {took:?}");
    // Held out while the dead node counted (about NODE_TTL after its last
    // heartbeat), then two at a time: three rounds of half a second.
    assert!(
        took >= gannet_engine::cluster::NODE_TTL - Duration::from_secs(2),
        "delivered after {took:?}: the dead node's connections were never held"
    );
}

/// The `cluster` events a node recorded: (change, fallback, nodes).
fn link_events(d: &Daemon) -> Vec<(String, String, u64)> {
    (d.events().iter())
        .filter(|e| e["type"] == "cluster")
        .map(|e| {
            let s = |k: &str| e[k].as_str().unwrap_or_default().to_string();
            (s("change"), s("fallback"), e["nodes"].as_u64().unwrap_or(0))
        })
        .collect()
}

/// Redis stopped under two nodes sharing 10/s that fall back open: each takes half
/// the limit on its own, so together they keep to it; each records the change as
/// an event, and when Redis is back on its port they share again and say so.
#[test]
fn gannetds_fall_back_open_to_their_share_and_recover() {
    let (redis, port) = redis_server();
    let shared =
        format!("[cluster]\nredis_url = \"redis://127.0.0.1:{port}/\"\nfallback = \"open\"\n");
    let sink = common::relay::sink();
    let daemons = nodes(2, sink.port, "max_message_rate = \"10/s\"", &shared);
    let up = |v: u64| {
        daemons
            .iter()
            .all(|d| link_metric(d, "cluster_redis_up") == Some(v))
    };
    assert!(eventually(10, || up(1)
        && daemons
            .iter()
            .all(|d| link_metric(d, "cluster_nodes") == Some(2))));
    drop(redis);
    assert!(
        eventually(10, || up(0)),
        "the nodes never noticed Redis stopping"
    );
    inject_each(&daemons, 30);
    sink_got(&sink, 60, 60);
    let times = received(&sink);
    // Each node's share: 5/s, a burst of 5.
    let rate = (60 - 10) as f64 / (times[59] - times[0]);
    eprintln!("two nodes falling back open to 5/s each: {rate:.2}/s together");
    assert!(
        (9.0..=11.5).contains(&rate),
        "{rate:.2}/s under a limit of 10/s"
    );
    for d in &daemons {
        let events = link_events(d);
        assert!(
            events.contains(&("unreachable".into(), "open".into(), 2)),
            "{events:?}"
        );
    }
    let _redis = redis_server_on(port);
    assert!(
        eventually(10, || up(1)),
        "the nodes never took Redis's return up"
    );
    for d in &daemons {
        assert!(
            eventually(5, || link_events(d)
                .last()
                .is_some_and(|e| e.0 == "reachable")),
            "{:?}",
            link_events(d)
        );
    }
}

/// A node that falls back closed sends nothing a shared limit holds while Redis is
/// down, and sends it all once Redis is back.
#[test]
fn a_gannetd_falling_back_closed_holds_its_mail_until_redis_returns() {
    let (redis, port) = redis_server();
    let shared =
        format!("[cluster]\nredis_url = \"redis://127.0.0.1:{port}/\"\nfallback = \"closed\"\n");
    let sink = common::relay::sink();
    let daemons = nodes(1, sink.port, "max_message_rate = \"100/s\"", &shared);
    let up = |v: u64| link_metric(&daemons[0], "cluster_redis_up") == Some(v);
    assert!(eventually(10, || up(1)));
    drop(redis);
    assert!(eventually(10, || up(0)));
    inject_each(&daemons, 5);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        sink.messages().len(),
        0,
        "sent while the shared limit was unknown"
    );
    let _redis = redis_server_on(port);
    sink_got(&sink, 5, 20);
    let events = link_events(&daemons[0]);
    assert!(
        events.contains(&("unreachable".into(), "closed".into(), 1)),
        "{events:?}"
    );
}

/// An admin API request with the admin key: (status, JSON body).
fn admin(d: &Daemon, method: &str, path: &str, body: Option<&str>) -> (u16, serde_json::Value) {
    let (status, text) =
        common::admin::curl(d, method, path, body.map(|b| ("application/json", b)));
    (status, serde_json::from_str(&text).unwrap_or_default())
}

/// The `adaptive` events `d` recorded with `change` (of `rule`, when given).
fn adaptive_events(d: &Daemon, change: &str, rule: Option<&str>) -> Vec<serde_json::Value> {
    (d.events().into_iter())
        .filter(|e| e["type"] == "adaptive" && e["change"] == change)
        .filter(|e| rule.is_none_or(|r| e["rule"] == r))
        .collect()
}

/// Suspends `domain`'s scheduled queues on `d` for an hour; answers the id.
fn suspend_domain(d: &Daemon, domain: &str) -> String {
    let body = format!(r#"{{"domain":"{domain}","reason":"r","duration":"1h"}}"#);
    let (status, made) = admin(d, "POST", "/api/admin/suspend/v1", Some(&body));
    assert_eq!(status, 200, "{made}");
    made["id"].as_str().unwrap().to_string()
}

/// The ids an admin listing (`GET path`) shows.
fn listed(d: &Daemon, path: &str) -> Vec<String> {
    let (_, list) = admin(d, "GET", path, None);
    (list.as_array().into_iter().flatten())
        .filter_map(|i| i["id"].as_str().map(str::to_string))
        .collect()
}

/// The shared admin hash is outside input (another node's, another version's, or
/// written by hand): items a node cannot read are left in it, logged once each,
/// and change nothing; the node goes on syncing its own verbs and delivering.
#[test]
fn unreadable_items_in_the_shared_hash_are_left_alone() {
    const SUSPEND: &str = "/api/admin/suspend/v1";
    let (_redis, port) = redis_server();
    let shared = format!("[cluster]\nredis_url = \"redis://127.0.0.1:{port}/\"\n");
    let sink = common::relay::sink();
    let daemons = nodes(1, sink.port, "", &shared);
    let d = &daemons[0];
    let later = gannet_core::clock::unix_ms() + 3_600_000;
    let bad = [
        (
            "suspension:torn",
            "{\"id\": \"torn\", \"expires_unix_ms\"".to_string(),
        ),
        (
            "suspension:typed",
            format!("{{\"id\": 5, \"domain\": [1], \"expires_unix_ms\": {later}}}"),
        ),
        (
            "bounce:half",
            format!("{{\"expires_unix_ms\": {later}, \"reason\": \"no id\"}}"),
        ),
        ("rule:default->x|y", format!("{{\"until_ms\": {later}}}")),
        ("ready_suspension:\u{1F4A5}", "\u{1}\u{FFFD}".to_string()),
        ("no-colon", "x".to_string()),
        ("warp:9", "{}".to_string()),
    ];
    let redis = |args: &[&str]| {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "redis-cli {args:?}");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    for (field, json) in &bad {
        redis(&["HSET", "gannet:admin", field, json]);
    }
    // Several reads of the hash (one a second).
    std::thread::sleep(Duration::from_secs(4));
    assert!(listed(d, SUSPEND).is_empty(), "nothing taken");
    let (_, rules) = admin(d, "GET", "/api/admin/queues/v1", None);
    assert!(
        !rules.to_string().contains("\"y\""),
        "no rule taken: {rules}"
    );
    let log = d.log.lock().unwrap().join("\n");
    for field in [
        "suspension:torn",
        "suspension:typed",
        "bounce:half",
        "rule:default->x|y",
    ] {
        let warned = log
            .lines()
            .filter(|l| l.contains("could not be read") && l.contains(field))
            .count();
        assert_eq!(warned, 1, "{field} logged once:\n{log}");
    }
    let fields = redis(&["HKEYS", "gannet:admin"]);
    for (field, _) in &bad {
        assert!(fields.contains(field), "{field} left in the hash: {fields}");
    }
    // The node still syncs its own verbs and delivers.
    let id = suspend_domain(d, "elsewhere.test");
    assert!(
        eventually(10, || redis(&["HKEYS", "gannet:admin"])
            .contains(&format!("suspension:{id}"))),
        "the node's own suspension is published"
    );
    d.send_accepted("ok@shared.test", "Subject: still\r\n\r\nx\r\n");
    sink_got(&sink, 1, 20);
}

/// A suspension made on one node holds mail on the other; lifted on the other, it
/// is lifted on the first; a bounce made on one bounces on the other; and a Redis
/// that restarts empty gets the nodes' verbs back from them rather than wiping
/// them.
#[test]
fn an_operators_verbs_on_one_node_apply_on_all() {
    const SUSPEND: &str = "/api/admin/suspend/v1";
    const BOUNCE: &str = "/api/admin/bounce/v1";
    let (redis, port) = redis_server();
    let shared = format!("[cluster]\nredis_url = \"redis://127.0.0.1:{port}/\"\n");
    let sink = common::relay::sink();
    let daemons = nodes(2, sink.port, "", &shared);
    let (a, b) = (&daemons[0], &daemons[1]);
    let (status, made) = admin(
        a,
        "POST",
        SUSPEND,
        Some(r#"{"domain":"shared.test","reason":"provider asked","duration":"1h"}"#),
    );
    assert_eq!(status, 200, "{made}");
    let id = made["id"].as_str().unwrap().to_string();
    assert!(
        eventually(10, || listed(b, SUSPEND) == [id.clone()]),
        "{:?}",
        listed(b, SUSPEND)
    );
    b.send_accepted("held@shared.test", "Subject: held\r\n\r\nx\r\n");
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        sink.messages().is_empty(),
        "sent through a suspension made on a"
    );

    // Redis restarted empty: the nodes put their verbs back; nothing is lifted.
    drop(redis);
    let redis = redis_server_on(port);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(listed(a, SUSPEND), vec![id.clone()]);
    assert_eq!(listed(b, SUSPEND), vec![id.clone()]);

    // Lifted on b: lifted on a, and b's message goes.
    let body = format!("{{\"id\":\"{id}\"}}");
    assert_eq!(admin(b, "DELETE", SUSPEND, Some(&body)).0, 200);
    assert!(
        eventually(10, || listed(a, SUSPEND).is_empty()),
        "{:?}",
        listed(a, SUSPEND)
    );
    sink_got(&sink, 1, 20);

    // A bounce made on b bounces what a is given.
    let (status, made) = admin(
        b,
        "POST",
        BOUNCE,
        Some(r#"{"domain":"shared.test","reason":"campaign withdrawn","duration":"1h"}"#),
    );
    assert_eq!(status, 200, "{made}");
    let bounce = made["id"].as_str().unwrap().to_string();
    assert!(eventually(10, || listed(a, BOUNCE) == [bounce.clone()]));
    a.send_accepted("gone@shared.test", "Subject: gone\r\n\r\nx\r\n");
    assert!(
        eventually(10, || a
            .events()
            .iter()
            .any(|e| e["type"] == "admin_bounce")),
        "a never bounced"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(sink.messages().len(), 1, "the bounced message was sent");
    drop(redis);
}

/// A response rule that fires on one node (the site said "unusual rate": suspend it
/// for a minute) is in force on the other node's queue of that name too: the other
/// records it as `shared` and holds its mail for the site.
#[test]
fn a_response_rule_fired_on_one_node_holds_the_site_on_all() {
    let (_redis, port) = redis_server();
    let shared = format!("[cluster]\nredis_url = \"redis://127.0.0.1:{port}/\"\n");
    let sink = common::relay::sink();
    let rule = "automation = [{ regex = 'unusual rate', actions = ['suspend'], duration = 60 }]\n";
    let daemons = nodes_with(2, sink.port, rule, "", &shared);
    let (a, b) = (&daemons[0], &daemons[1]);
    // b has the site's ready queue (it delivered there).
    b.send_accepted("first@shared.test", "Subject: first\r\n\r\nx\r\n");
    sink_got(&sink, 1, 20);
    a.send_accepted("throttled@shared.test", "Subject: refused\r\n\r\nx\r\n");
    let adaptive = |d: &Daemon, change: &str| adaptive_events(d, change, None);
    assert!(
        eventually(10, || !adaptive(a, "fired").is_empty()),
        "a's rule never fired"
    );
    assert!(
        eventually(10, || !adaptive(b, "shared").is_empty()),
        "b never took the rule up"
    );
    let fired = &adaptive(a, "fired")[0];
    let taken = &adaptive(b, "shared")[0];
    assert_eq!(taken["rule"], fired["rule"]);
    assert_eq!(taken["queue"], fired["queue"]);
    assert_eq!(taken["until_ms"], fired["until_ms"]);
    b.send_accepted("held@shared.test", "Subject: held\r\n\r\nx\r\n");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(sink.messages().len(), 1, "b sent through a's suspension");
}

/// A node whose delivery is suspended (`delivery.suspended`) still keeps in step
/// with the cluster: it records the link's state as an event and takes the verbs
/// made on other nodes (they apply once its delivery resumes).
#[test]
fn a_node_with_delivery_suspended_keeps_in_step() {
    const SUSPEND: &str = "/api/admin/suspend/v1";
    let (_redis, port) = redis_server();
    let shared = format!("[cluster]\nredis_url = \"redis://127.0.0.1:{port}/\"\n");
    let sink = common::relay::sink();
    let a = nodes(1, sink.port, "", &shared).remove(0);
    let b = nodes_with(1, sink.port, "suspended = true\n", "", &shared).remove(0);
    let id = suspend_domain(&a, "shared.test");
    assert!(
        eventually(10, || listed(&b, SUSPEND) == [id.clone()]),
        "{:?}",
        listed(&b, SUSPEND)
    );
    assert!(
        eventually(10, || link_events(&b)
            .iter()
            .any(|(change, _, _)| change == "reachable")),
        "{:?}",
        link_events(&b)
    );
}

/// Adaptive backoff that lowers a queue's connection limit on one node lowers the
/// queue of the same name on the others (each then raises it on its own results).
#[test]
fn a_backoff_on_one_node_lowers_the_queue_on_all() {
    let (_redis, port) = redis_server();
    let shared = format!("[cluster]\nredis_url = \"redis://127.0.0.1:{port}/\"\n");
    let sink = common::relay::sink();
    let shaping = "connection_limit = 8\nbackoff_failure_percent = 50\nbackoff_interval_secs = 1\n";
    let daemons = nodes(2, sink.port, shaping, &shared);
    let (a, b) = (&daemons[0], &daemons[1]);
    // b has the site's ready queue (it delivered there).
    b.send_accepted("first@shared.test", "Subject: first\r\n\r\nx\r\n");
    sink_got(&sink, 1, 20);
    // a's attempts fail with 451 (retried each second) until it backs off.
    for i in 0..12 {
        a.send_accepted(
            "tempfail@shared.test",
            &format!("Subject: refused {i}\r\n\r\nx\r\n"),
        );
    }
    let backoff = |d: &Daemon, change: &str| adaptive_events(d, change, Some("backoff"));
    assert!(
        eventually(30, || !backoff(a, "lowered").is_empty()),
        "a never backed off"
    );
    assert!(
        eventually(10, || !backoff(b, "shared").is_empty()),
        "b never took a's backoff up"
    );
    assert_eq!(backoff(a, "lowered")[0]["set"], "connection_limit=4");
    assert_eq!(backoff(b, "shared")[0]["set"], "connection_limit=4");
    let (_, listing) = admin(b, "GET", "/api/admin/queues/v1", None);
    assert_eq!(listing["ready"][0]["backoff_limit"], 4, "{listing}");
}

/// A suspend_tenant rule that fires on one node holds that tenant's mail to the
/// site on every node, while other tenants' mail goes on.
#[test]
fn a_tenant_held_on_one_node_is_held_on_all() {
    let (_redis, port) = redis_server();
    let shared = format!("[cluster]\nredis_url = \"redis://127.0.0.1:{port}/\"\n");
    let sink = common::relay::sink();
    let rule =
        "automation = [{ regex = 'unusual rate', actions = ['suspend_tenant'], duration = 60 }]\n";
    let daemons = nodes_with(2, sink.port, rule, "", &shared);
    let (a, b) = (&daemons[0], &daemons[1]);
    a.send_accepted(
        "throttled@shared.test",
        "X-Gannet-Tenant: acme\r\nSubject: refused\r\n\r\nx\r\n",
    );
    assert!(
        eventually(10, || (a.events().iter())
            .any(|e| e["type"] == "adaptive" && e["change"] == "fired")),
        "a's rule never fired"
    );
    // Taken up by b within a read of the hash or two.
    std::thread::sleep(Duration::from_secs(3));
    b.send_accepted(
        "held@shared.test",
        "X-Gannet-Tenant: acme\r\nSubject: held\r\n\r\nx\r\n",
    );
    b.send_accepted(
        "other@shared.test",
        "X-Gannet-Tenant: bob\r\nSubject: goes\r\n\r\nx\r\n",
    );
    sink_got(&sink, 1, 20);
    std::thread::sleep(Duration::from_secs(2));
    let got: Vec<String> = (sink.messages().iter())
        .map(|m| m["rcpt_tos"][0].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        got,
        ["other@shared.test"],
        "b sent acme's mail through a's hold"
    );
    let events = b.events();
    let delayed = common::relay::of(&events, "delayed", "held@shared.test");
    assert!(!delayed.is_empty(), "b's held message has no delayed event");
    let why = delayed[0]["response"].as_str().unwrap_or("");
    assert!(
        why.contains("tenant acme") && why.contains("held by response rule"),
        "{why}"
    );
}

/// `gannetctl cluster` on any node shows the shared Redis and the live nodes, this
/// one marked; a node on its own says it is not part of a cluster.
#[test]
fn gannetctl_shows_the_cluster() {
    use clap::Parser as _;
    let ctl = |d: &Daemon, args: &[&str]| {
        let endpoint = format!("http://{}", d.http);
        let mut argv = vec![
            "gannetctl",
            "--endpoint",
            &endpoint,
            "--key",
            common::admin::ADMIN_KEY,
        ];
        argv.extend_from_slice(args);
        let cli = gannet_tools::ctl::Cli::try_parse_from(argv).unwrap();
        let mut out = Vec::new();
        gannet_tools::ctl::run(cli, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    };
    let (_redis, port) = redis_server();
    let shared = format!("[cluster]\nredis_url = \"redis://127.0.0.1:{port}/\"\n");
    let sink = common::relay::sink();
    let daemons = nodes(2, sink.port, "", &shared);
    assert!(eventually(10, || {
        let v: serde_json::Value =
            serde_json::from_str(&ctl(&daemons[0], &["--json", "cluster"])).unwrap();
        v["nodes"].as_array().is_some_and(|n| n.len() == 2)
    }));
    let v: serde_json::Value =
        serde_json::from_str(&ctl(&daemons[1], &["--json", "cluster"])).unwrap();
    assert_eq!(v["redis_up"], true, "{v}");
    assert_eq!(v["fallback"], "open");
    let this = v["node"].as_str().unwrap().to_string();
    assert!(
        v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n == this.as_str()),
        "{v}"
    );
    let table = ctl(&daemons[1], &["cluster"]);
    assert!(table.starts_with("shared Redis: reachable"), "{table}");
    let marked: Vec<&str> = table.lines().filter(|l| l.contains("(this one)")).collect();
    assert_eq!(marked.len(), 1, "{table}");
    assert!(marked[0].contains(&this), "{table}");
    let alone = &nodes(1, sink.port, "", "")[0];
    assert!(ctl(alone, &["cluster"]).contains("not part of a cluster"));
}
