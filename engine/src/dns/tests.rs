//! The resolver against dnsmasq (a real DNS server on a loopback port), and the
//! meaning of MX answers that dnsmasq cannot serve (null MX).

use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::rr::rdata::MX;
use hickory_proto::rr::{Name, RData};

use super::{Answer, DnsError, IpLookup, Mx, Resolver, mx_meaning, site_name};
use crate::test_peers::Peer;

fn dnsmasq() -> (Peer, u16) {
    // big.test has 60 addresses: over 512 octets, so the UDP answer is truncated and
    // the resolver must ask again over TCP.
    let mut records: Vec<String> = (1..=60)
        .map(|i| format!("--host-record=big.test,127.0.1.{i}"))
        .collect();
    records.extend(
        [
            "--local-ttl=300",
            "--neg-ttl=300",
            "--mx-host=a.test,mx1.a.test,10",
            "--mx-host=a.test,mx2.a.test,10",
            "--mx-host=a.test,backup.a.test,20",
            "--mx-host=b.test,mx2.a.test,10",
            "--mx-host=b.test,mx1.a.test,10",
            "--mx-host=b.test,backup.a.test,20",
            "--host-record=mx1.a.test,127.0.0.2",
            "--host-record=mx2.a.test,127.0.0.3,::1",
            "--host-record=backup.a.test,127.0.0.4",
            "--host-record=c.test,127.0.0.5",
        ]
        .map(String::from),
    );
    crate::test_peers::dnsmasq(&records)
}

fn run<F: Future<Output = ()> + 'static>(f: impl FnOnce() -> F + Send + 'static) {
    glommio::LocalExecutorBuilder::default()
        .spawn(f)
        .unwrap()
        .join()
        .unwrap();
}

#[test]
fn mx_addresses_site_names_and_cache_against_dnsmasq() {
    let (server, port) = dnsmasq();
    let mut server = Some(server);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    run(move || async move {
        let r = Resolver::new(addr, Duration::from_secs(2), IpLookup::Ipv4AndIpv6, 1000);
        let a = r.mx("a.test").await.unwrap();
        let hosts = vec![
            vec!["mx1.a.test".to_string(), "mx2.a.test".to_string()],
            vec!["backup.a.test".to_string()],
        ];
        assert_eq!(a, Mx::Hosts(hosts.clone()));
        // b.test lists the same MXes in another order: the same site.
        let Mx::Hosts(b) = r.mx("B.TEST").await.unwrap() else {
            panic!()
        };
        assert_eq!(site_name(&b), site_name(&hosts));
        assert_eq!(site_name(&hosts), "mx1.a.test,mx2.a.test|backup.a.test");
        // No MX: the domain itself (implicit MX); unknown: NXDOMAIN.
        assert_eq!(
            r.mx("c.test").await.unwrap(),
            Mx::Hosts(vec![vec!["c.test".to_string()]])
        );
        assert_eq!(r.mx("nowhere.test").await.unwrap(), Mx::NxDomain);
        assert_eq!(
            r.addresses("mx1.a.test").await.unwrap(),
            vec!["127.0.0.2".parse::<std::net::IpAddr>().unwrap()]
        );
        assert_eq!(
            r.addresses("mx2.a.test").await.unwrap(),
            vec![
                "127.0.0.3".parse::<std::net::IpAddr>().unwrap(),
                "::1".parse().unwrap()
            ]
        );
        assert_eq!(
            r.addresses("[127.0.0.9]").await.unwrap(),
            vec!["127.0.0.9".parse::<std::net::IpAddr>().unwrap()]
        );
        // Each of those lookups was a resolution of its own: a socket per lookup
        // that asked the server.
        assert_eq!(r.stats().sockets, 6);
        // One resolution asks all its questions from one socket: a domain's MX,
        // then its hosts' A and AAAA (here b.test's MX, answered before from the
        // cache, and three hosts, two of them cached).
        let asking = r.asking();
        let (Mx::Hosts(groups), _) = asking.mx_until("b.test").await.unwrap() else {
            panic!()
        };
        let queries = r.stats().queries;
        for host in groups.iter().flatten() {
            assert!(!asking.addresses_until(host).await.unwrap().0.is_empty());
        }
        let (.., none) = asking.addresses_until("none.test").await.unwrap();
        assert!(none > 0);
        drop(asking);
        let stats = r.stats();
        assert_eq!(
            (stats.queries - queries, stats.sockets),
            (3, 7),
            "backup.a.test's A and AAAA, and none.test's A (NXDOMAIN: no AAAA asked), \
             from one new socket: {stats:?}"
        );
        // A truncated UDP answer is asked again over TCP and read whole.
        let big = r.addresses("big.test").await.unwrap();
        assert_eq!(big.len(), 60, "{big:?}");
        drop(server.take());
        // Answers (positive and negative) are served from the cache afterwards.
        assert_eq!(r.mx("a.test").await.unwrap(), Mx::Hosts(hosts));
        assert_eq!(r.mx("nowhere.test").await.unwrap(), Mx::NxDomain);
        // A question the cache cannot answer now times out: a temporary failure.
        let err = r.mx("new.test").await.unwrap_err();
        assert!(
            matches!(err, DnsError::Timeout { .. } | DnsError::Io(_)),
            "{err}"
        );
        assert!(matches!(
            r.mx("bad..name").await.unwrap_err(),
            DnsError::BadName(_)
        ));
    });
}

/// Each `ip_lookup` asks for what it keeps: a fallback family only when the first
/// has no records for a name that exists, nothing more for a name that does not.
#[test]
fn ip_lookup_asks_for_the_families_it_keeps() {
    let records: Vec<String> = [
        "--host-record=v4.test,127.0.0.7",
        "--host-record=v6.test,::7",
        "--host-record=both.test,127.0.0.8,::8",
    ]
    .map(String::from)
    .to_vec();
    let (server, port) = crate::test_peers::dnsmasq(&records);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    run(move || async move {
        let v4: std::net::IpAddr = "127.0.0.7".parse().unwrap();
        let v6: std::net::IpAddr = "::7".parse().unwrap();
        let b4: std::net::IpAddr = "127.0.0.8".parse().unwrap();
        let b6: std::net::IpAddr = "::8".parse().unwrap();
        // (strategy, host, addresses, questions asked)
        let cases = [
            (IpLookup::Ipv4ThenIpv6, "v4.test", vec![v4], 1),
            (IpLookup::Ipv4ThenIpv6, "v6.test", vec![v6], 2),
            (IpLookup::Ipv4ThenIpv6, "both.test", vec![b4], 1),
            (IpLookup::Ipv4ThenIpv6, "none.test", vec![], 1),
            (IpLookup::Ipv6ThenIpv4, "v4.test", vec![v4], 2),
            (IpLookup::Ipv6ThenIpv4, "both.test", vec![b6], 1),
            (IpLookup::Ipv4AndIpv6, "both.test", vec![b4, b6], 2),
            (IpLookup::Ipv4AndIpv6, "v4.test", vec![v4], 2),
            (IpLookup::Ipv4AndIpv6, "none.test", vec![], 1),
            (IpLookup::Ipv4Only, "v6.test", vec![], 1),
            (IpLookup::Ipv4Only, "both.test", vec![b4], 1),
            (IpLookup::Ipv6Only, "v4.test", vec![], 1),
            (IpLookup::Ipv6Only, "both.test", vec![b6], 1),
        ];
        for (strategy, host, want, questions) in cases {
            let r = Resolver::new(addr, Duration::from_secs(5), strategy, 100);
            let (got, until) = r.asking().addresses_until(host).await.unwrap();
            assert_eq!(got, want, "{strategy:?} {host}");
            assert!(until > gannet_core::clock::unix_ms(), "{strategy:?} {host}");
            assert_eq!(r.stats().queries, questions, "{strategy:?} {host}");
        }
    });
    drop(server);
}

#[test]
fn null_mx_and_empty_exchanges() {
    let mx = |pref, name: &str| RData::MX(MX::new(pref, Name::from_ascii(name).unwrap()));
    assert_eq!(
        mx_meaning(Answer::Records(vec![mx(0, ".")]), "x.test"),
        Mx::NoMail
    );
    assert_eq!(
        mx_meaning(
            Answer::Records(vec![
                mx(20, "B.x.test."),
                mx(10, "a.x.test."),
                mx(20, "a2.x.test.")
            ]),
            "x.test"
        ),
        Mx::Hosts(vec![
            vec!["a.x.test".into()],
            vec!["a2.x.test".into(), "b.x.test".into()]
        ])
    );
    assert_eq!(
        mx_meaning(Answer::NoData, "X.test"),
        Mx::Hosts(vec![vec!["x.test".into()]])
    );
}

/// A lost UDP query is sent again: a relay in front of dnsmasq drops the first
/// datagram it gets, and the lookup still succeeds within the timeout.
#[test]
fn a_lost_udp_query_is_sent_again() {
    let (server, port) = dnsmasq();
    let relay = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let relay_addr = relay.local_addr().unwrap();
    relay
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let forwarded = std::thread::spawn(move || {
        let upstream = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        upstream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut buf = [0u8; 4096];
        let mut seen = 0;
        while let Ok((n, client)) = relay.recv_from(&mut buf) {
            seen += 1;
            if seen == 1 {
                continue; // lost
            }
            upstream.send_to(&buf[..n], ("127.0.0.1", port)).unwrap();
            let (m, _) = upstream.recv_from(&mut buf).unwrap();
            relay.send_to(&buf[..m], client).unwrap();
            return seen;
        }
        seen
    });
    run(move || async move {
        // 3 s per try: the relay thread and dnsmasq may wait for a core while the
        // other tests of this binary run beside them. (This test failed beside them
        // although the resent query was answered: the first try's receive, dropped
        // at its timeout, took the answer — one receive now spans the tries.)
        let r = Resolver::new(
            relay_addr,
            Duration::from_secs(9),
            IpLookup::Ipv4AndIpv6,
            1000,
        );
        let a = r.mx("a.test").await.unwrap();
        assert!(matches!(a, Mx::Hosts(_)), "{a:?}");
        let stats = r.stats();
        assert_eq!((stats.queries, stats.resent), (1, 1));
    });
    assert_eq!(forwarded.join().unwrap(), 2, "the query was sent twice");
    drop(server);
}

/// Queries in flight at once each get an ephemeral port of their own. glommio's
/// `UdpSocket::bind` (SO_REUSEPORT) let the kernel give one port to several of them
/// and spread the answers among them: in a relay to 2,500 domains about one answer
/// in a thousand went to a socket that discarded it, and its query waited a try's
/// timeout (1.7 s) to be sent again.
#[test]
fn concurrent_queries_get_ports_of_their_own() {
    run(|| async {
        let server: SocketAddr = "127.0.0.1:53".parse().unwrap();
        // Fewer than a default soft limit of 1,024 open files.
        let sockets: Vec<_> = (0..800)
            .map(|_| super::query_socket(server).unwrap())
            .collect();
        let mut ports: Vec<u16> = sockets
            .iter()
            .map(|s| s.local_addr().unwrap().port())
            .collect();
        ports.sort_unstable();
        let before = ports.len();
        ports.dedup();
        assert_eq!(ports.len(), before, "some queries share a port");
    });
}

/// Many lookups at once against dnsmasq, as many in flight as a shard allows by
/// default (`delivery.dns_lookups_max`, 64): every one is answered by its first
/// query. (All 600 at once flood dnsmasq's one socket once each lookup's second
/// question follows its first on the same socket without delay: the kernel drops
/// what overflows its receive buffer, and the resends, timed out together, flood
/// it again.)
#[test]
fn concurrent_lookups_are_answered_without_resending() {
    let names = 600;
    let records: Vec<String> = (0..names)
        .map(|i| format!("--host-record=h{i}.test,127.0.2.{}", i % 250 + 1))
        .collect();
    let (server, port) = crate::test_peers::dnsmasq(&records);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    run(move || async move {
        let r = std::rc::Rc::new(Resolver::new(
            addr,
            Duration::from_secs(9),
            IpLookup::Ipv4AndIpv6,
            10_000,
        ));
        let in_flight = std::rc::Rc::new(glommio::sync::Semaphore::new(64));
        let lookups: Vec<_> = (0..names)
            .map(|i| {
                let r = r.clone();
                let in_flight = in_flight.clone();
                glommio::spawn_local(async move {
                    let _permit = in_flight.acquire_permit(1).await;
                    r.addresses(&format!("h{i}.test")).await
                })
            })
            .collect();
        for (i, lookup) in lookups.into_iter().enumerate() {
            let ips = lookup.await.unwrap();
            assert_eq!(ips.len(), 1, "h{i}.test: {ips:?}");
        }
        let stats = r.stats();
        // An A and an AAAA question per name.
        assert_eq!(stats.queries, 2 * names as u64);
        assert_eq!(stats.resent, 0, "answers went astray: {stats:?}");
    });
    drop(server);
}
