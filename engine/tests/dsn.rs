//! Delivery status notifications (RFC 3461/3464): Python's smtplib asks for them
//! per recipient (NOTIFY, ORCPT) and per message (RET, ENVID) after EHLO offers
//! DSN; the reports reach the sender's own server (aiosmtpd) through gannet's queue
//! and Python's email package reads them: a failure with its status and original
//! recipient, one delay report however many retries follow, a "relayed" report for
//! NOTIFY=SUCCESS, the header or the whole message as RET says, nothing for
//! NOTIFY=NEVER and nothing for the null sender. Bad parameters get 501 5.5.4.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::relay::sink;
use common::{Daemon, run_with_input};
use serde_json::{Value, json};

/// Reads every report the sink got (null sender) with Python's email package.
const READ_REPORTS: &str = r#"
import email, json, os, sys
from email import policy
out = []
d = sys.argv[1]
for name in sorted(os.listdir(d), key=lambda n: int(n.split('.')[0]) if n[0].isdigit() else 0):
    if not name.endswith('.json'):
        continue
    m = json.load(open(os.path.join(d, name)))
    if m['mail_from'] not in ('', '<>'):
        continue
    msg = email.message_from_bytes(m['data'].encode('latin-1'), policy=policy.compat32)
    parts = msg.get_payload()
    status = parts[1].get_payload()
    per_message = status[0]
    rcpts = [{k: v for k, v in block.items()} for block in status[1:]]
    out.append({
        'to': m['rcpt_tos'],
        'subject': msg['Subject'],
        'content_type': msg.get_content_type(),
        'report_type': msg.get_param('report-type'),
        'human': parts[0].get_payload(),
        'status_type': parts[1].get_content_type(),
        'envelope_id': per_message.get('Original-Envelope-Id'),
        'reporting_mta': per_message.get('Reporting-MTA'),
        'rcpts': rcpts,
        'returned_type': parts[2].get_content_type(),
        'returned': parts[2].as_string(),
    })
print(json.dumps(out))
"#;

fn reports(dir: &std::path::Path) -> Vec<Value> {
    let out = run_with_input(
        Command::new(common::peers::python())
            .arg("-c")
            .arg(READ_REPORTS)
            .arg(dir),
        b"",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Vec<Value>>(&out.stdout).unwrap()
}

/// Sends with smtplib: `(sender, mail options, [(rcpt, rcpt options)], subject)`.
fn send(daemon: &Daemon, sender: &str, mail: &[&str], rcpts: &[(&str, &[&str])], subject: &str) {
    let script = format!(
        r#"
import smtplib, json
s = smtplib.SMTP('127.0.0.1', {port})
s.ehlo('client.test')
assert s.has_extn('dsn'), s.esmtp_features
code, text = s.mail({sender:?}, {mail})
assert code == 250, (code, text)
for rcpt, options in {rcpts}:
    code, text = s.rcpt(rcpt, options)
    assert code == 250, (rcpt, code, text)
code, text = s.data('From: <a@s.test>\r\nSubject: {subject}\r\n\r\nthe body of {subject}\r\n')
assert code == 250, (code, text)
s.quit()
"#,
        port = daemon.smtp.port(),
        mail = serde_json::to_string(mail).unwrap(),
        rcpts = serde_json::to_string(rcpts).unwrap(),
    );
    let out = run_with_input(
        Command::new(common::peers::python()).arg("-c").arg(script),
        b"",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn reports_go_to_the_sender_as_each_recipient_asked() {
    let sink = sink();
    let extra = format!(
        "[delivery]\nretry_interval_secs = 1\nmax_retry_interval_secs = 1\n\
         routes = {{ \"x.test\" = [\"127.0.0.1:{0}\"], \"y.test\" = [\"127.0.0.1:{0}\"], \"s.test\" = [\"127.0.0.1:{0}\"] }}\n\
         [dsn]\ndelay_warning_secs = 2\n[suppression]\nauto_add_hard_bounces = false\n",
        sink.port
    );
    let daemon = Daemon::start("", &extra);
    send(
        &daemon,
        "sender@s.test",
        &["RET=HDRS", "ENVID=env+2B1"],
        &[
            (
                "permfail@x.test",
                &["NOTIFY=FAILURE,DELAY", "ORCPT=rfc822;Perm+40X.test"],
            ),
            ("tempfail@x.test", &["NOTIFY=DELAY"]),
            ("ok@x.test", &["NOTIFY=SUCCESS"]),
            ("permfail@y.test", &["NOTIFY=NEVER"]),
        ],
        "asked",
    );
    // No NOTIFY: a failure report by default ([dsn] failure), the whole message.
    send(
        &daemon,
        "plain@s.test",
        &["RET=FULL"],
        &[("permfail@y.test", &[])],
        "plain",
    );
    // The null sender never gets one.
    send(
        &daemon,
        "",
        &[],
        &[("permfail@x.test", &["NOTIFY=FAILURE"])],
        "null",
    );

    // failed (asked), relayed, delayed (once, after 2 s), failed (default).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = reports(sink.out.path());
        if got.len() >= 4 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} reports: {got:#?} {:#?}",
            got.len(),
            daemon.events()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A few more retries of tempfail@ bring no second delay report.
    std::thread::sleep(Duration::from_secs(3));
    let got = reports(sink.out.path());
    assert_eq!(got.len(), 4, "{got:#?}");
    let action = |r: &Value| r["rcpts"][0]["Action"].as_str().unwrap_or("").to_string();
    let find = |rcpt: &str, act: &str| {
        got.iter()
            .find(|r| {
                r["rcpts"].as_array().unwrap().iter().any(|x| {
                    x["Final-Recipient"] == format!("rfc822; {rcpt}") && x["Action"] == act
                })
            })
            .unwrap_or_else(|| panic!("{act} report for {rcpt}: {got:#?}"))
            .clone()
    };
    for r in &got {
        assert_eq!(r["content_type"], "multipart/report", "{r}");
        assert_eq!(r["report_type"], "delivery-status", "{r}");
        assert_eq!(r["status_type"], "message/delivery-status", "{r}");
        assert_eq!(r["reporting_mta"], "dns; gannet.test", "{r}");
        assert_eq!(r["rcpts"].as_array().unwrap().len(), 1, "{r}");
        assert!(!action(r).is_empty(), "{r}");
    }
    let failed = find("permfail@x.test", "failed");
    assert_eq!(failed["to"], json!(["sender@s.test"]));
    let rcpt = &failed["rcpts"][0];
    assert_eq!(rcpt["Status"], "5.1.1", "{failed}");
    assert_eq!(
        rcpt["Original-Recipient"], "rfc822; Perm@X.test",
        "{failed}"
    );
    assert!(
        rcpt["Diagnostic-Code"]
            .as_str()
            .unwrap()
            .starts_with("smtp; 550 5.1.1"),
        "{failed}"
    );
    assert_eq!(failed["envelope_id"], "env+1", "{failed}");
    assert_eq!(failed["subject"], "Undelivered Mail Returned to Sender");
    // RET=HDRS: the header, not the body.
    assert_eq!(failed["returned_type"], "text/rfc822-headers");
    assert!(
        failed["returned"]
            .as_str()
            .unwrap()
            .contains("Subject: asked"),
        "{failed}"
    );
    assert!(
        !failed["returned"].as_str().unwrap().contains("the body of"),
        "{failed}"
    );

    let delayed = find("tempfail@x.test", "delayed");
    let rcpt = &delayed["rcpts"][0];
    assert!(
        rcpt["Status"].as_str().unwrap().starts_with("4."),
        "{delayed}"
    );
    assert!(rcpt["Will-Retry-Until"].is_string(), "{delayed}");
    assert_eq!(delayed["subject"], "Delayed Mail (still being retried)");

    let relayed = find("ok@x.test", "relayed");
    assert!(
        relayed["rcpts"][0]["Status"]
            .as_str()
            .unwrap()
            .starts_with("2."),
        "{relayed}"
    );

    let plain = find("permfail@y.test", "failed");
    assert_eq!(plain["to"], json!(["plain@s.test"]));
    assert_eq!(plain["returned_type"], "message/rfc822");
    assert!(
        plain["returned"]
            .as_str()
            .unwrap()
            .contains("the body of plain"),
        "{plain}"
    );

    // Counted; the null-sender and NOTIFY=NEVER failures made none.
    assert_eq!(daemon.metric("dsn_failure_reports_total"), 2);
    assert_eq!(daemon.metric("dsn_delay_reports_total"), 1);
    assert_eq!(daemon.metric("dsn_success_reports_total"), 1);
}

#[test]
fn bad_dsn_parameters_get_501() {
    let daemon = Daemon::start("", "");
    let mut client = daemon.connect();
    client.expect("220");
    client.send(b"EHLO c.test\r\n");
    let ehlo = client.expect("250");
    assert!(ehlo.contains("DSN"), "{ehlo}");
    for (line, code) in [
        ("MAIL FROM:<a@s.test> RET=ALL", "501 5.5.4"),
        ("MAIL FROM:<a@s.test> ENVID=bad+zz", "501 5.5.4"),
        ("MAIL FROM:<a@s.test> ENVID=x ENVID=y", "501 5.5.4"),
        ("MAIL FROM:<a@s.test> RET=FULL ENVID=ok+2B", "250"),
        ("RCPT TO:<r@x.test> NOTIFY=SOMETIMES", "501 5.5.4"),
        ("RCPT TO:<r@x.test> NOTIFY=NEVER,FAILURE", "501 5.5.4"),
        (
            "RCPT TO:<r@x.test> NOTIFY=FAILURE NOTIFY=DELAY",
            "501 5.5.4",
        ),
        ("RCPT TO:<r@x.test> ORCPT=r@x.test", "501 5.5.4"),
        ("RCPT TO:<r@x.test> ORCPT=rfc822;bad+q", "501 5.5.4"),
        ("RCPT TO:<r@x.test> COLOUR=blue", "555 5.5.4"),
        (
            "RCPT TO:<r@x.test> NOTIFY=FAILURE ORCPT=rfc822;r+40x.test",
            "250",
        ),
    ] {
        client.send(format!("{line}\r\n").as_bytes());
        let reply = client.expect(&code[..3]);
        assert!(reply.starts_with(code), "{line}: {reply}");
    }
    // HELO offers no extensions: a DSN parameter is refused.
    client.send(
        b"RSET\r\nHELO c.test\r\nMAIL FROM:<a@s.test>\r\nRCPT TO:<r@x.test> NOTIFY=FAILURE\r\n",
    );
    client.expect("250");
    client.expect("250");
    client.expect("250");
    client.expect("555");
    client.send(b"QUIT\r\n");
}
