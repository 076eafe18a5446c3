//! Delivery status notifications: the SMTP parameters a client asks for them with
//! (RFC 3461: `NOTIFY` and `ORCPT` on RCPT, `RET` and `ENVID` on MAIL, xtext), how
//! they are kept in a message's metadata, and the report itself (RFC 3464: a
//! `multipart/report` with a human part, a `message/delivery-status` part and the
//! original message or its header).

use crate::reply::Reply;

/// NOTIFY: when the sender wants a report for a recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Notify {
    pub success: bool,
    pub failure: bool,
    pub delay: bool,
}

impl Notify {
    /// `NEVER`, or a comma-separated list of `SUCCESS`, `FAILURE`, `DELAY` (any case).
    pub fn parse(text: &str) -> Result<Notify, Reply> {
        if text.eq_ignore_ascii_case("NEVER") {
            return Ok(Notify::default());
        }
        let mut notify = Notify::default();
        for word in text.split(',') {
            let flag = match word.to_ascii_uppercase().as_str() {
                "SUCCESS" => &mut notify.success,
                "FAILURE" => &mut notify.failure,
                "DELAY" => &mut notify.delay,
                _ => return Err(BAD_NOTIFY),
            };
            if *flag {
                return Err(BAD_NOTIFY);
            }
            *flag = true;
        }
        Ok(notify)
    }

    /// As kept in the metadata: `SFD` letters, `N` for NEVER.
    fn code(self) -> String {
        let mut code = String::new();
        for (on, letter) in [(self.success, 'S'), (self.failure, 'F'), (self.delay, 'D')] {
            if on {
                code.push(letter);
            }
        }
        if code.is_empty() {
            code.push('N');
        }
        code
    }

    fn from_code(code: &str) -> Option<Notify> {
        if code.is_empty() || !code.chars().all(|c| "SFDN".contains(c)) {
            return None;
        }
        Some(Notify {
            success: code.contains('S'),
            failure: code.contains('F'),
            delay: code.contains('D'),
        })
    }
}

const BAD_NOTIFY: Reply = Reply::fixed(
    501,
    "5.5.4",
    "NOTIFY must be NEVER or a list of SUCCESS, FAILURE and DELAY",
);
const BAD_XTEXT: Reply = Reply::fixed(501, "5.5.4", "malformed xtext in a DSN parameter");

/// RET: what of the message a failure report returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ret {
    Full,
    Hdrs,
}

impl Ret {
    pub fn parse(text: &str) -> Result<Ret, Reply> {
        if text.eq_ignore_ascii_case("FULL") {
            Ok(Ret::Full)
        } else if text.eq_ignore_ascii_case("HDRS") {
            Ok(Ret::Hdrs)
        } else {
            Err(Reply::fixed(501, "5.5.4", "RET must be FULL or HDRS"))
        }
    }
}

/// Decodes xtext (RFC 3461 4): `+XX` is the byte with hex value XX (upper-case
/// digits); other characters stand for themselves.
pub fn xtext_decode(text: &str) -> Result<String, Reply> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => {
                let hex = text.get(i + 1..i + 3).ok_or(BAD_XTEXT)?;
                if !hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
                {
                    return Err(BAD_XTEXT);
                }
                out.push(u8::from_str_radix(hex, 16).map_err(|_| BAD_XTEXT)?);
                i += 3;
            }
            b'=' => return Err(BAD_XTEXT),
            b if (33..127).contains(&b) => {
                out.push(b);
                i += 1;
            }
            _ => return Err(BAD_XTEXT),
        }
    }
    String::from_utf8(out).map_err(|_| BAD_XTEXT)
}

/// ORCPT: `addr-type;xtext` (`rfc822;a@b.test`), decoded: (type, address).
pub fn parse_orcpt(text: &str) -> Result<(String, String), Reply> {
    let bad = Reply::fixed(501, "5.5.4", "ORCPT must be addr-type;address");
    let (kind, address) = text.split_once(';').ok_or(bad.clone())?;
    if kind.is_empty() || !kind.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(bad);
    }
    let address = if kind.eq_ignore_ascii_case("utf-8") {
        // RFC 6533's utf-8-addr-xtext: \x{HEX} escapes; kept as given.
        address.to_string()
    } else {
        xtext_decode(address)?
    };
    if address.is_empty() || address.len() > 500 {
        return Err(bad);
    }
    Ok((kind.to_ascii_lowercase(), address))
}

/// One recipient's DSN parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RcptDsn {
    pub notify: Option<Notify>,
    /// (address type, address) as the client gave it.
    pub orcpt: Option<(String, String)>,
}

/// The metadata keys a message's DSN parameters are kept under.
pub const META_RET: &str = "dsn_ret";
pub const META_ENVID: &str = "dsn_envid";
/// Per recipient, in order, separated by LF: `<notify code> <orcpt type>;<orcpt>`
/// or `-` for a recipient without parameters.
pub const META_RCPTS: &str = "dsn_rcpts";
/// On a report gannet made: the id of the message it reports on.
pub const META_REPORT_FOR: &str = "dsn_for";

/// The metadata entries for a transaction's DSN parameters (none when it had none).
pub fn to_meta(ret: Option<Ret>, envid: Option<&str>, rcpts: &[RcptDsn]) -> Vec<(String, String)> {
    let mut meta = Vec::new();
    if let Some(ret) = ret {
        let ret = if ret == Ret::Full { "FULL" } else { "HDRS" };
        meta.push((META_RET.to_string(), ret.to_string()));
    }
    if let Some(envid) = envid {
        meta.push((META_ENVID.to_string(), envid.to_string()));
    }
    if rcpts.iter().any(|r| *r != RcptDsn::default()) {
        let lines: Vec<String> = rcpts
            .iter()
            .map(|r| {
                let notify = r.notify.map_or("-".to_string(), Notify::code);
                match &r.orcpt {
                    Some((kind, address)) => format!("{notify} {kind};{address}"),
                    None => notify,
                }
            })
            .collect();
        meta.push((META_RCPTS.to_string(), lines.join("\n")));
    }
    meta
}

/// Recipient `index`'s parameters from a message's `dsn_rcpts` metadata.
pub fn rcpt_from_meta(rcpts: Option<&str>, index: usize) -> RcptDsn {
    let Some(line) = rcpts.and_then(|r| r.split('\n').nth(index)) else {
        return RcptDsn::default();
    };
    let (notify, orcpt) = match line.split_once(' ') {
        Some((n, o)) => (n, Some(o)),
        None => (line, None),
    };
    RcptDsn {
        notify: Notify::from_code(notify),
        orcpt: orcpt
            .and_then(|o| o.split_once(';'))
            .map(|(k, a)| (k.to_string(), a.to_string())),
    }
}

/// What happened to a recipient a report is about (RFC 3464 2.3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Failed,
    Delayed,
    /// Delivered to a next hop that was not asked for DSNs (RFC 3461 5.2.2).
    Relayed,
}

impl Action {
    fn name(self) -> &'static str {
        match self {
            Action::Failed => "failed",
            Action::Delayed => "delayed",
            Action::Relayed => "relayed",
        }
    }
}

/// One recipient of a report.
#[derive(Debug, Clone)]
pub struct ReportRcpt<'a> {
    pub final_rcpt: &'a str,
    pub original: Option<&'a (String, String)>,
    pub action: Action,
    /// RFC 3463 status (`5.1.1`).
    pub status: String,
    /// The host that answered, if one did.
    pub remote_mta: Option<&'a str>,
    /// The reply (`550 5.1.1 no such user`), for Diagnostic-Code.
    pub diagnostic: Option<&'a str>,
    pub last_attempt_secs: u64,
    /// Delayed: until when gannet keeps trying.
    pub will_retry_until_secs: Option<u64>,
}

/// A report to make.
#[derive(Debug, Clone)]
pub struct Report<'a> {
    /// The reporting MTA's host name.
    pub hostname: &'a str,
    /// The report's own Message-ID (without brackets).
    pub message_id: &'a str,
    /// Where it goes: the original envelope sender.
    pub to: &'a str,
    pub envid: Option<&'a str>,
    pub arrival_secs: u64,
    pub now_secs: u64,
    pub rcpts: Vec<ReportRcpt<'a>>,
    /// The original message as spooled (header and body, CRLF).
    pub original: &'a [u8],
    /// Whether to return the whole message (else its header only).
    pub full: bool,
}

/// Text fit for one header field line: no control characters, bounded.
fn field(text: &str) -> String {
    let clean: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let mut out = String::new();
    for c in clean
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
    {
        if out.len() + c.len_utf8() > 900 {
            break;
        }
        out.push(c);
    }
    out
}

/// The status a reply stands for: its enhanced code, or the class's generic one.
pub fn status_of(code: u16, enhanced: Option<&str>) -> String {
    match enhanced {
        Some(e) => e.to_string(),
        None if code >= 500 => "5.0.0".into(),
        None if code >= 400 => "4.0.0".into(),
        None => "2.0.0".into(),
    }
}

/// The header section of a message (up to and including the blank line), or the
/// whole message when it has no body.
pub fn header_section(message: &[u8]) -> &[u8] {
    match message.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(at) => &message[..at + 4],
        None => message,
    }
}

/// The whole report message, header and body, CRLF line endings.
pub fn report(r: &Report<'_>) -> Vec<u8> {
    let date = crate::message::rfc5322_date;
    let global = !r.to.is_ascii() || r.rcpts.iter().any(|x| !x.final_rcpt.is_ascii());
    let boundary = format!(
        "{}/{}",
        r.message_id.replace(['@', '<', '>'], "."),
        r.now_secs
    );
    let failed = r.rcpts.iter().any(|x| x.action == Action::Failed);
    let delayed = r.rcpts.iter().any(|x| x.action == Action::Delayed);
    let subject = if failed {
        "Undelivered Mail Returned to Sender"
    } else if delayed {
        "Delayed Mail (still being retried)"
    } else {
        "Successful Mail Delivery Report"
    };
    let mut out = String::new();
    let mut line = |text: &str| {
        out.push_str(text);
        out.push_str("\r\n");
    };
    line(&format!(
        "From: Mail Delivery System <MAILER-DAEMON@{}>",
        r.hostname
    ));
    line(&format!("To: <{}>", field(r.to)));
    line(&format!("Subject: {subject}"));
    line(&format!("Date: {}", date(r.now_secs)));
    line(&format!("Message-ID: <{}>", r.message_id));
    line("Auto-Submitted: auto-replied");
    line("MIME-Version: 1.0");
    line(&format!(
        "Content-Type: multipart/report; report-type={}; boundary=\"{boundary}\"",
        if global {
            "global-delivery-status"
        } else {
            "delivery-status"
        }
    ));
    line("");
    line("This is a MIME-encapsulated message.");
    line("");
    line(&format!("--{boundary}"));
    line("Content-Type: text/plain; charset=utf-8");
    line("Content-Transfer-Encoding: 8bit");
    line("");
    line(&format!("This is the mail system at host {}.", r.hostname));
    line("");
    for rcpt in &r.rcpts {
        let what = match rcpt.action {
            Action::Failed => "could not be delivered; gannet has given up on it",
            Action::Delayed => "has not been delivered yet; gannet keeps trying",
            Action::Relayed => "was delivered to the next mail server",
        };
        line(&format!(
            "Your message to <{}> {what}.",
            field(rcpt.final_rcpt)
        ));
        if let Some(diagnostic) = rcpt.diagnostic {
            let host = rcpt.remote_mta.unwrap_or("the destination");
            line(&format!("  {host} said: {}", field(diagnostic)));
        }
        if let Some(until) = rcpt.will_retry_until_secs {
            line(&format!("  It will be tried until {}.", date(until)));
        }
    }
    line("");
    line(&format!("--{boundary}"));
    line(&format!(
        "Content-Type: message/{}",
        if global {
            "global-delivery-status"
        } else {
            "delivery-status"
        }
    ));
    line("");
    line(&format!("Reporting-MTA: dns; {}", r.hostname));
    if let Some(envid) = r.envid {
        line(&format!("Original-Envelope-Id: {}", field(envid)));
    }
    line(&format!("Arrival-Date: {}", date(r.arrival_secs)));
    for rcpt in &r.rcpts {
        line("");
        let kind = if rcpt.final_rcpt.is_ascii() {
            "rfc822"
        } else {
            "utf-8"
        };
        line(&format!(
            "Final-Recipient: {kind}; {}",
            field(rcpt.final_rcpt)
        ));
        if let Some((kind, address)) = rcpt.original {
            line(&format!(
                "Original-Recipient: {}; {}",
                field(kind),
                field(address)
            ));
        }
        line(&format!("Action: {}", rcpt.action.name()));
        line(&format!("Status: {}", field(&rcpt.status)));
        if let Some(host) = rcpt.remote_mta {
            line(&format!("Remote-MTA: dns; {}", field(host)));
        }
        if let Some(diagnostic) = rcpt.diagnostic {
            line(&format!("Diagnostic-Code: smtp; {}", field(diagnostic)));
        }
        line(&format!(
            "Last-Attempt-Date: {}",
            date(rcpt.last_attempt_secs)
        ));
        if let Some(until) = rcpt.will_retry_until_secs {
            line(&format!("Will-Retry-Until: {}", date(until)));
        }
    }
    line("");
    line(&format!("--{boundary}"));
    let (kind, content) = if r.full {
        (
            if global {
                "message/global"
            } else {
                "message/rfc822"
            },
            r.original,
        )
    } else {
        (
            if global {
                "message/global-headers"
            } else {
                "text/rfc822-headers"
            },
            header_section(r.original),
        )
    };
    line(&format!("Content-Type: {kind}"));
    line("");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(content);
    if !bytes.ends_with(b"\r\n") {
        bytes.extend_from_slice(b"\r\n");
    }
    bytes.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    bytes
}

/// The reply for a DSN parameter given twice.
pub const DUPLICATE_PARAM: Reply = Reply::fixed(501, "5.5.4", "a DSN parameter was given twice");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_parse_and_bad_forms_are_refused() {
        assert_eq!(
            Notify::parse("success,Delay").unwrap(),
            Notify {
                success: true,
                failure: false,
                delay: true
            }
        );
        assert_eq!(Notify::parse("NEVER").unwrap(), Notify::default());
        for bad in [
            "",
            "NEVER,FAILURE",
            "FAILURE,FAILURE",
            "SOMETIMES",
            "FAILURE,",
        ] {
            assert_eq!(Notify::parse(bad).unwrap_err().code, 501, "{bad}");
        }
        assert_eq!(Ret::parse("hdrs").unwrap(), Ret::Hdrs);
        assert!(Ret::parse("ALL").is_err());
        assert_eq!(xtext_decode("a+2Bb+3Dc").unwrap(), "a+b=c");
        for bad in ["a+2", "a+zz", "a+2b", "a=b", "a b", "+FF"] {
            assert!(xtext_decode(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_orcpt("rfc822;Ann+40x.test").unwrap(),
            ("rfc822".to_string(), "Ann@x.test".to_string())
        );
        assert!(parse_orcpt("rfc822").is_err());
        assert!(parse_orcpt(";a@b").is_err());
        assert!(parse_orcpt("rfc822;").is_err());
    }

    #[test]
    fn parameters_survive_the_metadata() {
        let rcpts = [
            RcptDsn::default(),
            RcptDsn {
                notify: Some(Notify {
                    success: false,
                    failure: true,
                    delay: true,
                }),
                orcpt: Some(("rfc822".into(), "ann@x.test".into())),
            },
            RcptDsn {
                notify: Some(Notify::default()),
                orcpt: None,
            },
        ];
        let meta = to_meta(Some(Ret::Hdrs), Some("env 1"), &rcpts);
        let get = |k: &str| meta.iter().find(|m| m.0 == k).map(|m| m.1.as_str());
        assert_eq!(get(META_RET), Some("HDRS"));
        assert_eq!(get(META_ENVID), Some("env 1"));
        for (i, r) in rcpts.iter().enumerate() {
            assert_eq!(&rcpt_from_meta(get(META_RCPTS), i), r, "{i}");
        }
        assert_eq!(rcpt_from_meta(get(META_RCPTS), 9), RcptDsn::default());
        assert!(to_meta(None, None, &[RcptDsn::default()]).is_empty());
    }

    #[test]
    fn the_report_is_a_multipart_report_with_the_status_fields() {
        let orcpt = ("rfc822".to_string(), "Ann@x.test".to_string());
        let original = b"From: s@s.test\r\nSubject: hi\r\n\r\nthe body\r\n";
        let report = report(&Report {
            hostname: "mx.gannet.test",
            message_id: "dsn1@mx.gannet.test",
            to: "s@s.test",
            envid: Some("E1"),
            arrival_secs: 1_795_509_825,
            now_secs: 1_795_509_900,
            rcpts: vec![ReportRcpt {
                final_rcpt: "ann@x.test",
                original: Some(&orcpt),
                action: Action::Failed,
                status: "5.1.1".into(),
                remote_mta: Some("mx.x.test"),
                diagnostic: Some("550 5.1.1 no such\r\nuser"),
                last_attempt_secs: 1_795_509_899,
                will_retry_until_secs: None,
            }],
            original,
            full: false,
        });
        let text = String::from_utf8(report).unwrap();
        assert!(text.contains("report-type=delivery-status"), "{text}");
        assert!(
            text.contains("\r\nAction: failed\r\nStatus: 5.1.1\r\n"),
            "{text}"
        );
        assert!(
            text.contains("Diagnostic-Code: smtp; 550 5.1.1 no such user\r\n"),
            "{text}"
        );
        assert!(
            text.contains("Original-Recipient: rfc822; Ann@x.test\r\n"),
            "{text}"
        );
        assert!(text.contains("Original-Envelope-Id: E1\r\n"), "{text}");
        assert!(text.contains(
            "Content-Type: text/rfc822-headers\r\n\r\nFrom: s@s.test\r\nSubject: hi\r\n\r\n"
        ));
        assert!(!text.contains("the body"), "{text}");
        assert!(text.ends_with("--\r\n"));
        assert!(text.lines().all(|l| l.len() < 998));
    }
}
