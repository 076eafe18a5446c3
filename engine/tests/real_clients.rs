//! Real SMTP clients (swaks, Python's smtplib) deliver into gannetd with STARTTLS,
//! implicit TLS, AUTH and pipelining; the messages are then found intact in the spool.
//! The peers are installed by `tools/test.sh`.

mod common;

use std::process::Command;

use common::Daemon;

fn require(program: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{program} is not installed; tools/test.sh installs the test peers"
    );
}

fn swaks(args: &[&str]) -> (bool, String) {
    let out = Command::new("swaks").args(args).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn swaks_and_smtplib_deliver_into_the_spool() {
    require("swaks");
    require("python3");
    let hash = common::hash_password("s3cret");
    let mut daemon = Daemon::start(
        &format!("users = [{{ name = \"app\", password_hash = \"{hash}\" }}]\n"),
        "",
    );
    let smtp = daemon.smtp.to_string();
    let smtps = daemon.smtps.unwrap().to_string();

    let (ok, out) = swaks(&[
        "--server",
        &smtp,
        "--from",
        "sw@b.test",
        "--to",
        "x@d.test",
        "--tls",
        "--auth",
        "PLAIN",
        "--auth-user",
        "app",
        "--auth-password",
        "s3cret",
        "--header",
        "Subject: swaks starttls",
        "--header",
        "X-Gannet-Tenant: acme",
        "--body",
        "hello from swaks",
    ]);
    assert!(ok && out.contains("250 2.0.0 OK queued as"), "{out}");
    let (ok, out) = swaks(&[
        "--server",
        &smtps,
        "--tlsc",
        "--from",
        "sw@b.test",
        "--to",
        "y@d.test",
        "--auth",
        "LOGIN",
        "--auth-user",
        "app",
        "--auth-password",
        "s3cret",
        "--header",
        "Subject: swaks implicit tls",
    ]);
    assert!(ok && out.contains("250 2.0.0 OK queued as"), "{out}");
    let (ok, out) = swaks(&[
        "--server",
        &smtp,
        "--pipeline",
        "--from",
        "sw@b.test",
        "--to",
        "p1@d.test,p2@e.test",
        "--header",
        "Subject: swaks pipelined",
    ]);
    assert!(ok && out.contains("250 2.0.0 OK queued as"), "{out}");
    let (ok, out) = swaks(&[
        "--server",
        &smtp,
        "--tls",
        "--from",
        "sw@b.test",
        "--to",
        "x@d.test",
        "--auth",
        "PLAIN",
        "--auth-user",
        "app",
        "--auth-password",
        "wrong",
    ]);
    assert!(!ok && out.contains("535 5.7.8"), "{out}");

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/smtplib_client.py");
    let out = Command::new("python3")
        .args([
            script,
            &daemon.smtp.port().to_string(),
            &daemon.smtps.unwrap().port().to_string(),
            "app",
            "s3cret",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(results["starttls"][0], 250, "{results}");
    assert_eq!(results["implicit_tls"][0], 250, "{results}");
    assert_eq!(results["partial_refused"]["bad@"][0], 501, "{results}");
    assert_eq!(results["bad_login"][0], 535, "{results}");

    // Every accepted message's wait for durability is in the latency histogram, and
    // the spool's syncs reach /metrics with the shard's periodic round.
    let accepted = daemon.metric("smtp_messages_accepted_total");
    assert_eq!(accepted, 6);
    assert_eq!(daemon.metric("smtp_accept_durable_seconds_count"), accepted);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while daemon.metric("spool_sync_seconds_count") == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no spool sync in /metrics"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    daemon.stop();
    let spooled = common::spooled(&daemon.data_dir());
    let find = |subject: &str| {
        spooled
            .iter()
            .find(|m| String::from_utf8_lossy(&m.body).contains(&format!("Subject: {subject}\r\n")))
            .unwrap_or_else(|| panic!("{subject:?} not spooled"))
    };
    let m = find("swaks starttls");
    let body = String::from_utf8_lossy(&m.body);
    assert!(body.contains("with ESMTPSA\r\n\t(using TLSv1."), "{body}");
    assert!(!body.contains("X-Gannet-Tenant"), "{body}");
    assert!(
        m.meta.contains(&("tenant".into(), "acme".into())),
        "{:?}",
        m.meta
    );
    assert_eq!(m.queue, "acme@d.test");
    assert!(body.contains("hello from swaks"));
    assert!(String::from_utf8_lossy(&find("swaks implicit tls").body).contains("with ESMTPSA"));
    assert_eq!(
        find("swaks pipelined").recipients,
        ["p1@d.test", "p2@e.test"]
    );
    let m = find("smtplib starttls");
    assert_eq!(m.recipients, ["a@d.test", "b@d.test"]);
    assert_eq!(m.queue, "spring:d.test");
    assert!(String::from_utf8_lossy(&m.body).contains(&"héllo wörld\r\n".repeat(3)));
    let m = find("smtplib utf8");
    assert_eq!(
        (m.sender.as_str(), m.recipients.as_slice()),
        ("ü@b.test", ["ö@d.test".to_string()].as_slice())
    );
    assert!(String::from_utf8_lossy(&m.body).contains("with UTF8SMTPSA"));
    assert_eq!(find("smtplib partial").recipients, ["ok@d.test"]);
    assert_eq!(spooled.len(), 6);
}
