//! Egress through relays, per source, against real peers: aiosmtpd reading HAProxy's
//! PROXY protocol (the header's source is the address the relay would send from),
//! and microsocks, a SOCKS5 server with username and password, connecting to
//! aiosmtpd from an address of its own (so the MX host sees the proxy, not gannet).

mod common;

use std::process::{Command, Stdio};

use common::Daemon;
use common::peers::{Peer, aiosmtpd_args, spawn_listening};
use common::relay::{inject, wait_events};

fn stored(out: &std::path::Path) -> Vec<serde_json::Value> {
    (1..)
        .map_while(|n| std::fs::read_to_string(out.join(format!("{n}.json"))).ok())
        .map(|t| serde_json::from_str(&t).unwrap())
        .collect()
}

#[test]
fn sources_send_through_proxy_protocol_and_socks5_relays() {
    let proxied_out = tempfile::tempdir().unwrap();
    let (_proxied, proxied_port) = aiosmtpd_args(proxied_out.path(), &["--proxy-protocol".into()]);
    let plain_out = tempfile::tempdir().unwrap();
    let (_plain, plain_port) = aiosmtpd_args(plain_out.path(), &[]);
    // microsocks connects onward from 127.0.0.5.
    let (socks, socks_port) = spawn_listening(|port| {
        let mut command = Command::new("microsocks");
        command
            .args(["-i", "127.0.0.1", "-p", &port.to_string()])
            .args(["-u", "relay", "-P", "s3cret", "-b", "127.0.0.5"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        command
    });
    let _socks = Peer(socks);
    let config = format!(
        "[delivery]\nretry_interval_secs = 60\n\
         routes = {{ \"far.test\" = [\"127.0.0.9:25\"], \"sox.test\" = [\"127.0.0.1:{plain_port}\"], \
                     \"bad.test\" = [\"127.0.0.1:{plain_port}\"] }}\n\
         sources = {{ far = {{ source_ip = \"198.51.100.7\", ha_proxy_server = \"127.0.0.1:{proxied_port}\" }}, \
                      sox = {{ socks5_proxy_server = \"127.0.0.1:{socks_port}\", socks5_username = \"relay\", socks5_password = \"s3cret\" }}, \
                      bad = {{ socks5_proxy_server = \"127.0.0.1:{socks_port}\", socks5_username = \"relay\", socks5_password = \"wrong\" }} }}\n\
         pools = {{ far = [{{ source = \"far\" }}], sox = [{{ source = \"sox\" }}], bad = [{{ source = \"bad\" }}] }}\n"
    );
    let daemon = Daemon::start("", &config);
    inject(
        &daemon,
        &["r@far.test"],
        "X-Gannet-Pool: far\r\nSubject: p\r\n\r\nx\r\n.\r\n",
    );
    inject(
        &daemon,
        &["r@sox.test"],
        "X-Gannet-Pool: sox\r\nSubject: s\r\n\r\nx\r\n.\r\n",
    );
    inject(
        &daemon,
        &["r@bad.test"],
        "X-Gannet-Pool: bad\r\nSubject: b\r\n\r\nx\r\n.\r\n",
    );
    let events = wait_events(&daemon, "two deliveries and a deferral", |e| {
        let n = |kind: &str| e.iter().filter(|e| e["type"] == kind).count();
        n("delivery") >= 2 && n("transient_failure") >= 1
    });
    // PROXY protocol: the relay is told to connect from the source's address to the
    // MX host.
    let proxied = stored(proxied_out.path());
    assert_eq!(proxied.len(), 1, "{proxied:?}");
    assert_eq!(proxied[0]["proxy_src"], "198.51.100.7");
    assert_eq!(proxied[0]["proxy_dst"], "127.0.0.9:25");
    assert_eq!(proxied[0]["rcpt_tos"][0], "r@far.test");
    // SOCKS5: the MX host sees the proxy's address.
    let plain = stored(plain_out.path());
    assert_eq!(plain.len(), 1, "{plain:?}");
    assert_eq!(plain[0]["rcpt_tos"][0], "r@sox.test");
    assert_eq!(plain[0]["peer"], "127.0.0.5");
    // A proxy that refuses the credentials: deferred, never bounced.
    let bad = (events.iter())
        .find(|e| e["type"] == "transient_failure" && e["rcpt_to"] == "r@bad.test")
        .unwrap();
    let why = bad["response"].as_str().unwrap();
    assert!(
        why.starts_with("451 4.4.2") && why.contains("username and password"),
        "{bad}"
    );
    assert!(
        events
            .iter()
            .all(|e| e["type"] != "bounce" || e["rcpt_to"] == "s@b.test")
    );
}

#[test]
fn relay_settings_are_checked() {
    for (source, key, says) in [
        (
            "{ ha_proxy_server = \"127.0.0.1:9\" }",
            "far.source_ip",
            "needs the address",
        ),
        (
            "{ source_ip = \"192.0.2.1\", ha_proxy_server = \"relay:9\" }",
            "far.ha_proxy_server",
            "not ip:port",
        ),
        (
            "{ source_ip = \"192.0.2.1\", ha_proxy_server = \"127.0.0.1:9\", socks5_proxy_server = \"127.0.0.1:8\" }",
            "far.socks5_proxy_server",
            "one relay",
        ),
        (
            "{ socks5_proxy_server = \"127.0.0.1\" }",
            "far.socks5_proxy_server",
            "not ip:port",
        ),
    ] {
        let err = common::config_refused(&format!(
            "[delivery]\nsuspended = true\nsources = {{ far = {source} }}\n"
        ));
        assert!(
            err.contains(&format!("delivery.sources.{key}")) && err.contains(says),
            "{source}: {err}"
        );
    }
}
