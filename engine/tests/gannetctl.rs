//! `gannetctl` against a running gannetd: every admin verb with its human table and
//! with `--json`, its errors (no selection, a wrong key), and `gannetctl top` driven
//! in a real terminal — tmux: start it, read the screen, press q.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use clap::Parser;
use common::Daemon;
use common::admin::{ADMIN_KEY, admin_key_config};
use common::relay::{inject, of, sink, wait_events};
use gannet_tools::ctl::{Cli, run};

/// Runs gannetctl in-process with `args` against `daemon`: Ok(output) or the error.
fn ctl(daemon: &Daemon, args: &[&str]) -> Result<String, String> {
    let endpoint = format!("http://{}", daemon.http);
    let mut argv = vec!["gannetctl", "--endpoint", &endpoint, "--key", ADMIN_KEY];
    argv.extend_from_slice(args);
    let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    run(cli, &mut out).map_err(|e| format!("{e:#}"))?;
    Ok(String::from_utf8(out).unwrap())
}

fn ok(daemon: &Daemon, args: &[&str]) -> String {
    ctl(daemon, args).unwrap_or_else(|e| panic!("gannetctl {args:?}: {e}"))
}

/// The id a verb printed (its last line).
fn printed_id(out: &str) -> String {
    out.trim().lines().last().unwrap().trim().to_string()
}

#[test]
fn every_verb_answers_in_tables_and_json() {
    let (a, b) = (sink(), sink());
    // The key joins the [http] section the test config opens.
    let config = format!(
        "{}[delivery]\nretry_interval_secs = 3600\n\
         routes = {{ \"a.test\" = [\"127.0.0.1:{}\"], \"b.test\" = [\"127.0.0.1:{}\"] }}\n",
        admin_key_config(),
        a.port,
        b.port
    );
    let daemon = Daemon::start("", &config);
    let id = inject(
        &daemon,
        &["throttled@b.test"],
        "X-Gannet-Tenant: acme\r\nSubject: later\r\n\r\nx\r\n.\r\n",
    );
    wait_events(&daemon, "a deferral", |e| {
        of(e, "transient_failure", "throttled@b.test").len() == 1
    });

    let deadline = Instant::now() + Duration::from_secs(20);
    let queues = loop {
        let out = ok(&daemon, &["queues", "--detail"]);
        if out.contains("acme@b.test") {
            break out;
        }
        assert!(Instant::now() < deadline, "{out}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(queues.contains("SCHEDULED QUEUE"), "{queues}");
    assert!(
        queues.contains("in 59m") || queues.contains("in 1h"),
        "{queues}"
    );
    assert!(
        queues.contains(&format!("default->127.0.0.1:{}", b.port)),
        "{queues}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&ok(&daemon, &["--json", "queues", "--limit", "1"])).unwrap();
    assert_eq!(json["scheduled"][0]["name"], "acme@b.test");

    let summary = ok(&daemon, &["summary"]);
    assert!(
        summary.contains("WAITING") && summary.contains("total"),
        "{summary}"
    );
    let inspected = ok(&daemon, &["inspect", &id, "--body"]);
    assert!(inspected.contains("throttled@b.test"), "{inspected}");
    assert!(inspected.contains("meta.tenant  acme"), "{inspected}");
    assert!(inspected.contains("scheduled"), "{inspected}");
    assert!(inspected.contains("Subject: later"), "{inspected}");
    let queue = ok(&daemon, &["inspect-queue", "acme@b.test"]);
    assert!(
        queue.contains("acme@b.test: 1 parts scheduled (0 held)"),
        "{queue}"
    );
    assert!(queue.contains(&id), "{queue}");

    // Suspensions of scheduled and ready queues: define, list, cancel.
    let s = printed_id(&ok(
        &daemon,
        &[
            "suspend",
            "--domain",
            "c.test",
            "--reason",
            "pause",
            "--duration",
            "10m",
        ],
    ));
    let list = ok(&daemon, &["suspend-list"]);
    assert!(
        list.contains(&s) && list.contains("domain=c.test"),
        "{list}"
    );
    assert_eq!(ok(&daemon, &["suspend-cancel", "--id", &s]).trim(), "OK");
    let name = format!("default->127.0.0.1:{}", a.port);
    let r = printed_id(&ok(
        &daemon,
        &["suspend-ready-q", "--name", &name, "--reason", "block"],
    ));
    let list = ok(&daemon, &["suspend-ready-q-list"]);
    assert!(list.contains(&name) && list.contains("block"), "{list}");
    assert_eq!(
        ok(&daemon, &["suspend-ready-q-cancel", "--id", &r]).trim(),
        "OK"
    );

    // Bounce: a dry run first, then for real, listed with its count, cancelled.
    let dry = ok(
        &daemon,
        &[
            "bounce",
            "--domain",
            "b.test",
            "--reason",
            "bad",
            "--dry-run",
        ],
    );
    assert!(dry.contains("dry run: 1 parts (1 recipients)"), "{dry}");
    let bounce = printed_id(&ok(
        &daemon,
        &["bounce", "--domain", "b.test", "--reason", "bad"],
    ));
    wait_events(&daemon, "the admin bounce", |e| {
        of(e, "admin_bounce", "throttled@b.test").len() == 1
    });
    let list = ok(&daemon, &["bounce-list"]);
    assert!(
        list.contains(&bounce) && list.contains("domain=b.test"),
        "{list}"
    );
    assert_eq!(
        ok(&daemon, &["bounce-cancel", "--id", &bounce]).trim(),
        "OK"
    );
    assert_eq!(
        ok(&daemon, &["retry", "--domain", "b.test", "--reason", "now"]).trim(),
        "1"
    );
    let rebind = printed_id(&ok(
        &daemon,
        &[
            "rebind", "--domain", "b.test", "--reason", "move", "--pool", "default",
        ],
    ));
    assert_eq!(rebind.len(), 36, "{rebind}");
    let err = ctl(
        &daemon,
        &[
            "rebind", "--domain", "b.test", "--reason", "m", "--pool", "nope",
        ],
    )
    .unwrap_err();
    assert!(err.contains("pool `nope`"), "{err}");

    // Errors say what is wrong.
    let err = ctl(&daemon, &["bounce", "--reason", "oops"]).unwrap_err();
    assert!(err.contains("--everything"), "{err}");
    let err = ctl(&daemon, &["suspend-cancel", "--id", "nope"]).unwrap_err();
    assert!(err.contains("404") && err.contains("nope"), "{err}");
    let endpoint = format!("http://{}", daemon.http);
    let cli = Cli::try_parse_from([
        "gannetctl",
        "--endpoint",
        &endpoint,
        "--key",
        "wrong",
        "summary",
    ])
    .unwrap();
    let err = format!("{:#}", run(cli, &mut Vec::new()).unwrap_err());
    assert!(
        err.contains("401") && err.contains("GANNET_ADMIN_KEY"),
        "{err}"
    );
}

/// The gannetctl binary beside this test's (cargo builds a package's binaries for
/// its integration tests; `cargo test --workspace` builds gannet-tools' too).
fn gannetctl_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let path = dir.join("gannetctl");
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build -p gannet-tools` (the test command's `cargo test --workspace` does)",
        path.display()
    );
    path
}

/// A tmux server of this test's own, killed when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .expect("tmux is installed by tools/install-peers.sh")
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "top"]).stdout).into()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        self.run(&["kill-server"]);
    }
}

#[test]
fn top_runs_in_a_real_terminal_and_quits_on_q() {
    let a = sink();
    let config = format!(
        "{}[delivery]\nroutes = {{ \"a.test\" = [\"127.0.0.1:{}\"] }}\n",
        admin_key_config(),
        a.port
    );
    let daemon = Daemon::start("", &config);
    let tmux = Tmux {
        socket: format!("gannet-test-{}", std::process::id()),
    };
    let command = format!(
        "{} --endpoint http://{} --key {ADMIN_KEY} top --interval 0.5",
        gannetctl_binary().display(),
        daemon.http
    );
    let started = tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "140",
        "-y",
        "45",
        &command,
    ]);
    assert!(started.status.success(), "{started:?}");
    for n in 0..5 {
        inject(
            &daemon,
            &[&format!("r{n}@a.test")],
            "Subject: t\r\n\r\nx\r\n.\r\n",
        );
    }
    wait_events(&daemon, "five deliveries", |e| {
        e.iter().filter(|e| e["type"] == "delivery").count() == 5
    });
    // The rates, the load of both cores, the spool and the site it delivered to.
    let site = format!("127.0.0.1:{}", a.port);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let screen = tmux.screen();
        let shown = [
            "delivered/s",
            "per-core load",
            "shard 0",
            "shard 1",
            "live messages",
            "busiest sites",
            "nothing suspended",
        ]
        .iter()
        .all(|n| screen.contains(n))
            && !screen.contains("ERROR");
        if shown {
            break;
        }
        assert!(Instant::now() < deadline, "top's screen:\n{screen}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // A suspension shows up on the next refresh.
    let name = format!("default->{site}");
    let made = common::admin::curl(
        &daemon,
        "POST",
        "/api/admin/suspend-ready-q/v1",
        Some((
            "application/json",
            &format!(r#"{{"name":"{name}","reason":"block"}}"#),
        )),
    );
    assert_eq!(made.0, 200, "{made:?}");
    inject(&daemon, &["held@a.test"], "Subject: t\r\n\r\nx\r\n.\r\n");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let screen = tmux.screen();
        if screen.contains(&format!("ready {name}: admin suspension")) {
            break;
        }
        assert!(Instant::now() < deadline, "top's screen:\n{screen}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Not even the connection that was open when the suspension came sends it.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(a.messages().len(), 5, "delivered while suspended");
    // q quits: the session (whose only program was top) ends.
    tmux.run(&["send-keys", "-t", "top", "q"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while tmux.run(&["has-session", "-t", "top"]).status.success() {
        assert!(
            Instant::now() < deadline,
            "top did not quit:\n{}",
            tmux.screen()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
