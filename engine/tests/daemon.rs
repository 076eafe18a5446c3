//! gannetd as a process: configuration commands, start-up, exclusive spool, clean
//! stop on SIGTERM.

mod common;

use std::process::Command;

use common::Daemon;

fn gannetd(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_gannetd"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn starts_holds_its_spool_and_stops_on_sigterm() {
    let mut daemon = Daemon::start("", "");
    let data = daemon.data_dir();
    assert!(data.join("spool/0/LOCK").exists() && data.join("spool/1/LOCK").exists());
    assert_eq!(
        daemon.http_get("/health"),
        (200, "{\"status\":\"ok\"}".to_string())
    );
    let (status, body) = daemon.http_get("/nowhere");
    assert_eq!(status, 404);
    assert_eq!(
        body,
        "{\"errors\":[{\"code\":\"1101\",\"description\":\"no endpoint at /nowhere\",\"message\":\"invalid URI\"}]}"
    );

    // A second daemon on the same data directory is refused with a precise error.
    let config = common::config_text(daemon.dir.path(), "", "");
    let path = daemon.dir.path().join("second.toml");
    std::fs::write(&path, config).unwrap();
    let second = gannetd(&["--config", path.to_str().unwrap(), "--shards", "1"]);
    assert_eq!(second.status.code(), Some(1));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains("is in use by another process (is gannetd running?)"),
        "{err}"
    );

    daemon.stop();
    let log = daemon.log.lock().unwrap().join("\n");
    assert_eq!(
        log.matches("shard stopped; spool synced").count(),
        2,
        "{log}"
    );
    assert!(!data.join("listeners.json").exists());
}

#[test]
fn default_config_is_printed_and_checks_clean() {
    let out = gannetd(&["--print-default-config"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("listen = [\"127.0.0.1:2025\"]"));
    assert!(text.contains("listen = [\"127.0.0.1:8000\"]"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("default.toml");
    std::fs::write(&path, &text).unwrap();
    let out = gannetd(&["--check-config", path.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{}: ok\n", path.display())
    );
}

#[test]
fn bad_config_and_arguments_are_refused_precisely() {
    let dir = tempfile::tempdir().unwrap();
    let check = |text: &str, needles: &[&str]| {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        for args in [
            vec!["--check-config", path.to_str().unwrap()],
            vec!["--config", path.to_str().unwrap()],
        ] {
            let out = gannetd(&args);
            assert_eq!(out.status.code(), Some(2), "{text}: {out:?}");
            let err = String::from_utf8_lossy(&out.stderr);
            for needle in needles {
                assert!(err.contains(needle), "{err:?} lacks {needle:?}");
            }
        }
    };
    check(
        "[smtp]\nlisten = [\"127.0.0.1:0\"]\nrecipients_max = 10\n",
        &["bad.toml:3:", "smtp.recipients_max", "between 100 and"],
    );
    check("[smtpd]\n", &["bad.toml:1:", "unknown field `smtpd`"]);
    check(
        "[smtp]\nrelay_from = [\"300.0.0.0/8\"]\n",
        &["bad.toml:2:", "smtp.relay_from[0]"],
    );
    check("[smtp\n", &["bad.toml:1:"]);
    let out = gannetd(&["--check-config", "/nonexistent/gannetd.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("cannot read config file /nonexistent/gannetd.toml")
    );

    let path = dir.path().join("zero.toml");
    std::fs::write(&path, common::config_text(dir.path(), "", "")).unwrap();
    let out = gannetd(&["--config", path.to_str().unwrap(), "--shards", "70000"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("shards must be between 1 and 65535, got 70000")
    );

    // A port someone else holds is an error, not a silently shared port.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let text = common::config_text(dir.path(), "", "").replacen(
        "127.0.0.1:0",
        &format!("127.0.0.1:{port}"),
        1,
    );
    std::fs::write(&path, text).unwrap();
    let out = gannetd(&["--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains(&format!("smtp.listen: cannot listen on 127.0.0.1:{port}")),
        "{out:?}"
    );

    for (route, needle) in [
        ("example.test", "expected domain=host:port"),
        ("=127.0.0.1:25", "the domain is empty"),
        (
            "example.test=mx.example.test:25",
            "`mx.example.test:25` is not host:port",
        ),
    ] {
        let out = gannetd(&["--config", path.to_str().unwrap(), "--route", route]);
        assert_eq!(out.status.code(), Some(2), "{route}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(needle),
            "{out:?}"
        );
    }

    let out = gannetd(&["--no-such-flag"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unexpected argument '--no-such-flag'"));
}
