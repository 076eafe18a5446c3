//! The SMTP server spoken to in raw bytes, one script per behaviour (data-driven).
//!
//! Script lines: `> text` sends text + CRLF; `>> raw` sends raw bytes with `\r`, `\n`,
//! `\t`, `\0` and `\\` escapes; `< prefix` expects a reply whose last line starts with
//! prefix; `<~ a|b|!c` expects a reply containing a and b and not c; `<closed`
//! expects the server to close the connection. Each script runs on a fresh connection
//! whose 220 greeting has been read.

mod common;

use base64::Engine as _;
use common::{Client, Daemon};

fn unescape(raw: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            let mut buf = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            continue;
        }
        match chars.next() {
            Some('r') => out.push(b'\r'),
            Some('n') => out.push(b'\n'),
            Some('t') => out.push(b'\t'),
            Some('0') => out.push(0),
            Some('\\') => out.push(b'\\'),
            other => panic!("bad escape \\{other:?} in {raw:?}"),
        }
    }
    out
}

fn run_on(client: &mut Client, name: &str, script: &str) {
    eprintln!("script: {name}");
    for line in script
        .lines()
        .map(str::trim_start)
        .filter(|l| !l.is_empty())
    {
        if let Some(raw) = line.strip_prefix(">> ") {
            client.send_lossy(&unescape(raw));
        } else if let Some(text) = line.strip_prefix("> ") {
            client.send_lossy(format!("{text}\r\n").as_bytes());
        } else if line == "<closed" {
            client.expect_closed();
        } else if let Some(needles) = line.strip_prefix("<~ ") {
            let reply = client
                .reply()
                .unwrap_or_else(|| panic!("{name}: closed, expected {needles:?}"));
            for needle in needles.split('|') {
                match needle.strip_prefix('!') {
                    Some(absent) => assert!(
                        !reply.contains(absent),
                        "{name}: {reply:?} contains {absent:?}"
                    ),
                    None => assert!(reply.contains(needle), "{name}: {reply:?} lacks {needle:?}"),
                }
            }
        } else if let Some(prefix) = line.strip_prefix("< ") {
            let reply = client
                .reply()
                .unwrap_or_else(|| panic!("{name}: closed, expected {prefix:?}"));
            let last = reply.trim_end().lines().last().unwrap_or("").to_string();
            assert!(
                last.starts_with(prefix),
                "{name}: expected {prefix:?}, got {reply:?}"
            );
        } else {
            panic!("{name}: bad script line {line:?}");
        }
    }
}

fn run(daemon: &Daemon, name: &str, script: &str) {
    let mut client = daemon.connect();
    client.expect("220 gannet.test ESMTP");
    run_on(&mut client, name, script);
}

const TRANSACTION: &str = "
    > EHLO client.test
    < 250
    > MAIL FROM:<a@b.test>
    < 250 2.1.0
    > RCPT TO:<c@d.test>
    < 250 2.1.5
";

#[test]
fn protocol_with_relay_from_loopback() {
    let hash = common::hash_password("pw");
    let mut daemon = Daemon::start(
        &format!(
            "message_bytes_max = 20000\nrecipients_max = 100\nbad_commands_max = 10\n\
             users = [{{ name = \"app\", password_hash = \"{hash}\" }}]\n"
        ),
        "",
    );
    let long_line = "x".repeat(1100);
    // Written with script escapes: 250 lines of 100 octets.
    let big_body = format!(
        "Subject: big\\r\\n\\r\\n{}",
        format!("{}\\r\\n", "y".repeat(98)).repeat(250)
    );
    let many_rcpts: String = (0..100)
        .map(|i| format!("> RCPT TO:<r{i}@d.test>\n< 250 2.1.5\n"))
        .collect();
    let scripts: Vec<(&str, String)> = vec![
        ("ehlo advertises extensions", "
            > EHLO client.test
            <~ 250-gannet.test greets client.test|PIPELINING|SIZE 20000|8BITMIME|SMTPUTF8|ENHANCEDSTATUSCODES|CHUNKING|DSN|STARTTLS|!AUTH
            > EHLO
            < 501 5.5.4
        ".into()),
        ("helo takes no parameters", "
            > HELO client.test
            < 250 gannet.test greets client.test
            > MAIL FROM:<a@b.test> SIZE=10
            < 555 5.5.4
            > MAIL FROM:<a@b.test>
            < 250 2.1.0
        ".into()),
        ("commands out of sequence", "
            > MAIL FROM:<a@b.test>
            < 503 5.5.1
            > EHLO c.test
            < 250
            > RCPT TO:<a@b.test>
            < 503 5.5.1
            > DATA
            < 503 5.5.1
            > MAIL FROM:<a@b.test>
            < 250
            > MAIL FROM:<a@b.test>
            < 503 5.5.1
            > DATA
            < 554 5.5.1
            > RSET
            < 250 2.0.0
            > DATA
            < 503 5.5.1
        ".into()),
        ("address syntax", "
            > EHLO c.test
            < 250
            > MAIL FROM:a@b.test
            < 501 5.1.7
            > MAIL FROM:<a@b..test>
            < 501 5.1.2
            > MAIL FROM:<a b@b.test>
            < 501 5.1.3
            > MAIL FROM:<ü@b.test>
            < 553 5.6.7
            > MAIL FROM:<ü@b.test> SMTPUTF8
            < 250 2.1.0
            > RCPT TO:<>
            < 501 5.1.3
            > RCPT TO:<a@>
            < 501
            > RCPT TO:<x@y.test> COLOUR=blue
            < 555 5.5.4
            > RCPT TO:<x@y.test> NOTIFY=SOMETIMES
            < 501 5.5.4
            > RCPT TO:<ü@y.test>
            < 250 2.1.5
        ".into()),
        ("mail parameters", "
            > EHLO c.test
            < 250
            > MAIL FROM:<a@b.test> SIZE=20001
            < 552 5.3.4
            > MAIL FROM:<a@b.test> FOO=1
            < 555 5.5.4
            > MAIL FROM:<a@b.test> BODY=BINARYMIME
            < 555 5.5.4
            > MAIL FROM:<a@b.test> SIZE=x
            < 501 5.5.4
            > MAIL FROM:<> BODY=8BITMIME SIZE=100 AUTH=<>
            < 250 2.1.0
        ".into()),
        ("too many recipients", format!("
            > EHLO c.test
            < 250
            > MAIL FROM:<a@b.test>
            < 250
            {many_rcpts}
            > RCPT TO:<one-too-many@d.test>
            < 452 4.5.3
            > DATA
            < 354
            >> Subject: many\\r\\n\\r\\nhi\\r\\n.\\r\\n
            < 250 2.0.0 OK queued as
        ")),
        ("over-long command line", format!("
            > NOOP {long_line}
            < 500 5.5.2
            > NOOP
            < 250 2.0.0
        ")),
        ("message over the size limit", format!("
            {TRANSACTION}
            > DATA
            < 354
            >> {big_body}.\\r\\n
            < 552 5.3.4
            > NOOP
            < 250
        ")),
        ("bare LF in data", format!("
            {TRANSACTION}
            > DATA
            < 354
            >> Subject: x\\r\\n\\r\\na\\nb\\r\\n.\\r\\n
            < 550 5.6.0
            > NOOP
            < 250
        ")),
        ("bare CR in data", format!("
            {TRANSACTION}
            > DATA
            < 354
            >> Subject: x\\r\\n\\r\\na\\rb\\r\\n.\\r\\n
            < 550 5.6.0
        ")),
        ("smuggling with LF.CRLF", format!("
            {TRANSACTION}
            > DATA
            < 354
            >> Subject: x\\r\\n\\r\\nhello\\n.\\r\\nMAIL FROM:<evil@x.test>\\r\\nRCPT TO:<v@y.test>\\r\\nDATA\\r\\nsmuggled\\r\\n.\\r\\nNOOP\\r\\n
            < 550 5.6.0
            < 250 2.0.0 OK
        ")),
        ("smuggling with LF.LF", format!("
            {TRANSACTION}
            > DATA
            < 354
            >> Subject: x\\r\\n\\r\\nhello\\n.\\nMAIL FROM:<evil@x.test>\\r\\n.\\r\\nNOOP\\r\\n
            < 550 5.6.0
            < 250 2.0.0 OK
        ")),
        ("smuggling with CR.CR", format!("
            {TRANSACTION}
            > DATA
            < 354
            >> Subject: x\\r\\n\\r\\nhello\\r.\\rMAIL FROM:<evil@x.test>\\r\\n.\\r\\nNOOP\\r\\n
            < 550 5.6.0
            < 250 2.0.0 OK
        ")),
        ("NUL in data", format!("
            {TRANSACTION}
            > DATA
            < 354
            >> Subject: x\\r\\n\\r\\na\\0b\\r\\n.\\r\\n
            < 554 5.6.0
        ")),
        ("over-long data line", format!("
            {TRANSACTION}
            > DATA
            < 354
            >> Subject: x\\r\\n\\r\\n{long_line}\\r\\n.\\r\\n
            < 554 5.6.0
        ")),
        ("malformed header", format!("
            {TRANSACTION}
            > DATA
            < 354
            >> Subject: x\\r\\nnot a header line\\r\\n\\r\\nbody\\r\\n.\\r\\n
            < 554 5.6.0 malformed header on line 2
        ")),
        ("pipelined transaction", "
            >> EHLO c.test\\r\\nMAIL FROM:<a@b.test>\\r\\nRCPT TO:<c@d.test>\\r\\nRCPT TO:<bad@>\\r\\nRCPT TO:<e@f.test>\\r\\nDATA\\r\\n
            < 250
            < 250 2.1.0
            < 250 2.1.5
            < 501
            < 250 2.1.5
            < 354
            >> Subject: pipelined\\r\\n\\r\\n..dot-stuffed\\r\\n.\\r\\nMAIL FROM:<a@b.test>\\r\\nRCPT TO:<g@h.test>\\r\\nDATA\\r\\n
            < 250 2.0.0 OK queued as
            < 250 2.1.0
            < 250 2.1.5
            < 354
            >> Subject: behind the dot\\r\\n\\r\\nnext\\r\\n.\\r\\nQUIT\\r\\n
            < 250 2.0.0 OK queued as
            < 221 2.0.0
            <closed
        ".into()),
        ("BDAT chunks", format!("
            {TRANSACTION}
            >> BDAT 20\\r\\nSubject: chunked\\r\\n\\r\\n
            < 250 2.0.0 20 octets received
            > DATA
            < 503 5.5.1
            >> BDAT 6 LAST\\r\\nbody\\r\\n
            < 250 2.0.0 OK queued as
            >> BDAT 0 LAST\\r\\n
            < 503 5.5.1
        ")),
        ("BDAT outside a transaction is read and refused", "
            > EHLO c.test
            < 250
            >> BDAT 12\\r\\nRSET\\r\\nQUIT\\r\\n
            < 503 5.5.1
            > NOOP
            < 250
        ".into()),
        ("BDAT without a size ends the session", "
            > EHLO c.test
            < 250
            > BDAT x
            < 501 5.5.4
            <closed
        ".into()),
        ("RSET ends BDAT", format!("
            {TRANSACTION}
            >> BDAT 3\\r\\nabc
            < 250 2.0.0
            > MAIL FROM:<a@b.test>
            < 503 5.5.1
            > RSET
            < 250 2.0.0
            > MAIL FROM:<a@b.test>
            < 250 2.1.0
        ")),
        ("small verbs", "
            > VRFY someone
            < 252 2.5.0
            > EXPN list
            < 502 5.5.1
            > HELP
            < 214 2.0.0
            > NOOP anything
            < 250 2.0.0
            > FOO
            < 500 5.5.1
            >> NOOP\\0\\r\\n
            < 500 5.5.2
            > QUIT now
            < 501 5.5.4
            > quit
            < 221 2.0.0
            <closed
        ".into()),
        ("too many bad commands", format!("
            {}
            > FOO
            < 500 5.5.1
            < 421 4.7.0
            <closed
        ", "> FOO\n< 500 5.5.1\n".repeat(9))),
        ("STARTTLS with arguments", "
            > EHLO c.test
            < 250
            > STARTTLS now
            < 501 5.5.4
        ".into()),
        ("plaintext pipelined after STARTTLS drops the connection", "
            > EHLO c.test
            < 250
            >> STARTTLS\\r\\nEHLO evil.test\\r\\n
            < 220 2.0.0
            <closed
        ".into()),
        ("AUTH needs TLS here", "
            > EHLO c.test
            < 250
            > AUTH PLAIN AGFwcABwdw==
            < 538 5.7.11
        ".into()),
    ];
    for (name, script) in &scripts {
        run(&daemon, name, script);
    }

    // An abrupt disconnect in DATA stores nothing.
    let accepted_before = daemon.metric("smtp_messages_accepted_total");
    let mut client = daemon.connect();
    client.expect("220");
    run_on(
        &mut client,
        "disconnect in data",
        &format!("{TRANSACTION}\n> DATA\n< 354\n>> Subject: cut\\r\\n\\r\\nhalf a mess"),
    );
    drop(client);
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(
        daemon.metric("smtp_messages_accepted_total"),
        accepted_before
    );
    assert_eq!(
        accepted_before, 4,
        "too many recipients, pipelined (two), BDAT, and none other"
    );

    daemon.stop();
    let spooled = common::spooled(&daemon.data_dir());
    assert_eq!(spooled.len(), 4);
    // The transaction sent behind the first one's final dot is a message of its own.
    let behind = spooled
        .iter()
        .find(|m| String::from_utf8_lossy(&m.body).contains("Subject: behind the dot"))
        .expect("the message pipelined behind the dot is spooled");
    assert_eq!(behind.recipients, ["g@h.test"]);
    assert!(
        String::from_utf8_lossy(&behind.body).ends_with("\r\n\r\nnext\r\n"),
        "{:?}",
        String::from_utf8_lossy(&behind.body)
    );
    let pipelined = spooled
        .iter()
        .find(|m| String::from_utf8_lossy(&m.body).contains("Subject: pipelined"))
        .expect("the pipelined message is spooled");
    assert_eq!(pipelined.recipients, ["c@d.test", "e@f.test"]);
    let body = String::from_utf8_lossy(&pipelined.body);
    assert!(
        body.starts_with(
            "Received: from c.test ([127.0.0.1])\r\n\tby gannet.test (gannet) with ESMTP\r\n"
        ),
        "{body}"
    );
    assert!(
        body.contains(&format!("Message-ID: <{}@gannet.test>\r\n", pipelined.id)),
        "{body}"
    );
    assert!(body.ends_with("\r\n\r\n.dot-stuffed\r\n"), "{body:?}");
    let chunked = spooled
        .iter()
        .find(|m| String::from_utf8_lossy(&m.body).contains("Subject: chunked"))
        .expect("the BDAT message is spooled");
    assert!(
        chunked.body.ends_with(b"\r\n\r\nbody\r\n"),
        "{:?}",
        String::from_utf8_lossy(&chunked.body)
    );
    assert!(
        !spooled
            .iter()
            .any(|m| String::from_utf8_lossy(&m.body).contains("evil"))
    );

    let events = daemon.events();
    let receptions = events.iter().filter(|e| e["type"] == "reception").count();
    assert_eq!(receptions, 4);
    assert!(events.iter().any(|e| e["type"] == "policy_rejection"
        && e["phase"] == "data"
        && e["reply"].as_str().unwrap().starts_with("550 5.6.0")));
}

#[test]
fn relay_control_auth_and_policy_rules() {
    let hash = common::hash_password("s3cret");
    let daemon = Daemon::start(
        &format!(
            "relay_from = [\"10.0.0.0/8\"]\nauth_requires_tls = false\n\
             users = [{{ name = \"app\", password_hash = \"{hash}\" }}]\n"
        ),
        "[policy]\nrules = [\n\
           { phase = \"connect\", client_networks = [\"127.0.0.2\"], action = \"reject\", reply = \"554 5.7.1 no service for you\" },\n\
           { phase = \"mail_from\", sender_domains = [\".spam.test\"], action = \"tempfail\" },\n\
           { phase = \"rcpt_to\", recipient_domains = [\"inbound.test\"], action = \"accept\" },\n\
           { phase = \"data\", size_bytes_over = 2000, action = \"reject\", reply = \"550 5.7.1 too large for this policy\" },\n\
         ]\n",
    );
    let b64 = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
    let good_plain = b64(b"\0app\0s3cret");
    let bad_plain = b64(b"\0app\0wrong");
    let scripts: Vec<(&str, String)> = vec![
        (
            "relay is denied to a client outside relay_from",
            "
            > EHLO c.test
            <~ AUTH PLAIN LOGIN
            > MAIL FROM:<a@b.test>
            < 250
            > RCPT TO:<x@elsewhere.test>
            < 550 5.7.1
            > RCPT TO:<x@inbound.test>
            < 250 2.1.5
        "
            .into(),
        ),
        (
            "AUTH PLAIN",
            format!(
                "
            > EHLO c.test
            < 250
            > AUTH PLAIN {bad_plain}
            < 535 5.7.8
            > AUTH PLAIN {good_plain}
            < 235 2.7.0
            > AUTH PLAIN {good_plain}
            < 503 5.5.1
            > MAIL FROM:<a@b.test>
            < 250
            > RCPT TO:<x@elsewhere.test>
            < 250 2.1.5
        "
            ),
        ),
        (
            "AUTH PLAIN with a challenge",
            format!(
                "
            > EHLO c.test
            < 250
            > AUTH PLAIN
            < 334
            > {good_plain}
            < 235 2.7.0
        "
            ),
        ),
        (
            "AUTH LOGIN",
            format!(
                "
            > EHLO c.test
            < 250
            > AUTH LOGIN
            < 334 VXNlcm5hbWU6
            > {}
            < 334 UGFzc3dvcmQ6
            > {}
            < 235 2.7.0
        ",
                b64(b"app"),
                b64(b"s3cret")
            ),
        ),
        (
            "AUTH failures",
            format!(
                "
            > AUTH PLAIN {good_plain}
            < 503 5.5.1
            > EHLO c.test
            < 250
            > AUTH LOGIN {}
            < 334 UGFzc3dvcmQ6
            > {}
            < 535 5.7.8
            > AUTH PLAIN
            < 334
            > *
            < 501 5.0.0
            > AUTH PLAIN !!!
            < 501 5.5.2
            > AUTH CRAM-MD5
            < 504 5.5.4
            > AUTH
            < 501 5.5.4
            > MAIL FROM:<a@b.test>
            < 250
            > AUTH PLAIN {good_plain}
            < 503 5.5.1
        ",
                b64(b"nobody"),
                b64(b"s3cret")
            ),
        ),
        (
            "mail_from rule",
            "
            > EHLO c.test
            < 250
            > MAIL FROM:<a@x.spam.test>
            < 451 4.7.1
            > MAIL FROM:<a@b.test>
            < 250
        "
            .into(),
        ),
        (
            "data rule",
            format!(
                "
            > EHLO c.test
            < 250
            > MAIL FROM:<a@b.test>
            < 250
            > RCPT TO:<x@inbound.test>
            < 250
            > DATA
            < 354
            >> Subject: big\\r\\n\\r\\n{}\\r\\n.\\r\\n
            < 550 5.7.1 too large for this policy
        ",
                vec!["z".repeat(900); 3].join("\\r\\n")
            ),
        ),
    ];
    for (name, script) in &scripts {
        run(&daemon, name, script);
    }

    // A client from 127.0.0.2 is refused at connect.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(
            &"127.0.0.2:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
    socket.connect(&daemon.smtp.into()).unwrap();
    let mut client = Client::from_stream(socket.into());
    client.expect("554 5.7.1 no service for you");
    client.expect_closed();
}

#[test]
fn session_limits_and_timeouts() {
    let daemon = Daemon::start(
        "sessions_per_ip_max = 2\ncommand_timeout_secs = 1\ndata_timeout_secs = 1\n",
        "",
    );
    let mut first = daemon.connect();
    first.expect("220");
    let mut second = daemon.connect();
    second.expect("220");
    let mut third = daemon.connect();
    third.expect("421 4.7.0 too many connections");
    third.expect_closed();

    // An idle client is dropped after command_timeout_secs, freeing its slot.
    first.expect("421 4.4.2");
    first.expect_closed();
    let mut fourth = daemon.connect();
    fourth.expect("220");

    // A client that stalls inside DATA is dropped after data_timeout_secs.
    run_on(
        &mut fourth,
        "stall in data",
        &format!("{TRANSACTION}\n> DATA\n< 354\n>> Subject: slow\\r\\n"),
    );
    fourth.expect("421 4.4.2");
    fourth.expect_closed();
    drop(second);
    assert_eq!(daemon.metric("smtp_messages_accepted_total"), 0);
    assert!(daemon.metric("smtp_sessions_refused_total") >= 1);
}
