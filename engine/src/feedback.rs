//! Reports that come back after delivery: out-of-band bounces (a remote server's
//! delivery status notification, RFC 3464) and spam complaints (feedback loop
//! reports, ARF: RFC 5965), read from the mail sent to `inbound.domains`.
//!
//! Each message gannet sends carries `X-Gannet-Id: <token>` (unless
//! `inbound.feedback_header` is off): a token signed with the tracking key naming
//! the message, its transmission, campaign, tenant and template (and, for a
//! message of one recipient, the recipient). Both kinds of report quote the
//! original header, so the token names the message a report is about; a report
//! without one (or with a forged one) still names its recipient.

use mail_parser::{MessageParser, MimeHeaders, PartType};

use crate::merge::tracking::{Kind, Tracked, TrackingKey};

/// The header that carries the token.
pub const HEADER: &str = "X-Gannet-Id";

/// What a report says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Feedback {
    /// A DSN: the recipients it reports failed.
    Bounce {
        original: Option<Tracked>,
        failed: Vec<Failed>,
    },
    /// An ARF report.
    Complaint {
        original: Option<Tracked>,
        /// Feedback-Type: abuse, fraud, virus, other, not-spam.
        feedback_type: String,
        /// Original-Rcpt-To, else the token's recipient.
        rcpt: Option<String>,
        user_agent: Option<String>,
        /// Reporting-MTA or Source-IP of the report, for the event.
        reported_by: Option<String>,
    },
}

/// One failed recipient of a DSN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failed {
    pub rcpt: String,
    /// Status (`5.1.1`).
    pub status: String,
    /// Diagnostic-Code's text without its type (`550 5.1.1 no such user`), or the
    /// status when the report gave none.
    pub reason: String,
}

/// Reads a report; None when the message is neither a DSN nor an ARF report.
pub fn parse(message: &[u8], key: &TrackingKey) -> Option<Feedback> {
    let parsed = MessageParser::default().parse(message)?;
    let content_type = parsed.content_type()?;
    if !content_type.ctype().eq_ignore_ascii_case("multipart")
        || !content_type
            .subtype()
            .is_some_and(|s| s.eq_ignore_ascii_case("report"))
    {
        return None;
    }
    let report_type = content_type.attribute("report-type")?.to_ascii_lowercase();
    let original = token(message, key);
    // The machine-readable part: message/delivery-status or message/feedback-report.
    let wanted = match report_type.as_str() {
        "delivery-status" | "global-delivery-status" => "delivery-status",
        "feedback-report" => "feedback-report",
        _ => return None,
    };
    let found = parsed.parts.iter().find_map(|part| {
        let ct = part.content_type()?;
        let sub = ct.subtype()?.to_ascii_lowercase();
        (ct.ctype().eq_ignore_ascii_case("message") && sub.ends_with(wanted)).then(|| {
            match &part.body {
                PartType::Message(m) => m.raw_message().to_vec(),
                _ => part.contents().to_vec(),
            }
        })
    });
    // A complaint whose machine part is missing or mislabelled (some feedback
    // loops send it as text/plain) is still a complaint, about the token's message.
    let fields = match found {
        Some(fields) => fields,
        None if wanted == "feedback-report" => Vec::new(),
        None => return None,
    };
    let blocks = field_blocks(&fields);
    if wanted == "delivery-status" {
        let failed = blocks
            .iter()
            .skip(1)
            .filter(|b| field(b, "action").is_some_and(|a| a.eq_ignore_ascii_case("failed")))
            .filter_map(|b| {
                let rcpt = address(field(b, "final-recipient")?)?;
                let status = field(b, "status").unwrap_or("5.0.0").to_string();
                let reason = field(b, "diagnostic-code")
                    .map(|d| {
                        d.split_once(';')
                            .map_or(d, |(_, text)| text)
                            .trim()
                            .to_string()
                    })
                    .unwrap_or_else(|| status.clone());
                Some(Failed {
                    rcpt,
                    status,
                    reason,
                })
            })
            .collect();
        return Some(Feedback::Bounce { original, failed });
    }
    let empty = Vec::new();
    let block = blocks.first().unwrap_or(&empty);
    let rcpt = field(block, "original-rcpt-to")
        .and_then(address)
        .or_else(|| {
            original
                .as_ref()
                .map(|t| t.rcpt_to.clone())
                .filter(|r| !r.is_empty())
        });
    Some(Feedback::Complaint {
        feedback_type: field(block, "feedback-type")
            .unwrap_or("abuse")
            .to_ascii_lowercase(),
        rcpt,
        user_agent: field(block, "user-agent").map(str::to_string),
        reported_by: field(block, "reporting-mta")
            .or_else(|| field(block, "source-ip"))
            .map(|v| {
                v.split_once(';')
                    .map_or(v, |(_, name)| name)
                    .trim()
                    .to_string()
            }),
        original,
    })
}

/// `rfc822; a@b.test` or `<a@b.test>`: the address.
fn address(value: &str) -> Option<String> {
    let value = value.split_once(';').map_or(value, |(_, a)| a).trim();
    let value = value.trim_start_matches('<').trim_end_matches('>').trim();
    (value.contains('@') && value.len() <= 320).then(|| value.to_string())
}

/// The header field blocks of a delivery-status or feedback-report body (each a
/// list of (lower-case name, value), continuation lines unfolded).
fn field_blocks(body: &[u8]) -> Vec<Vec<(String, String)>> {
    let text = String::from_utf8_lossy(body);
    let mut blocks = Vec::new();
    let mut block: Vec<(String, String)> = Vec::new();
    for line in text.split('\n').map(|l| l.trim_end_matches('\r')) {
        if line.trim().is_empty() {
            if !block.is_empty() {
                blocks.push(std::mem::take(&mut block));
            }
        } else if line.starts_with([' ', '\t']) {
            if let Some(last) = block.last_mut() {
                last.1.push(' ');
                last.1.push_str(line.trim());
            }
        } else if let Some((name, value)) = line.split_once(':') {
            block.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
    }
    if !block.is_empty() {
        blocks.push(block);
    }
    blocks
}

fn field<'b>(block: &'b [(String, String)], name: &str) -> Option<&'b str> {
    block
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// The first `X-Gannet-Id` in the report whose token verifies.
fn token(message: &[u8], key: &TrackingKey) -> Option<Tracked> {
    let needle = HEADER.as_bytes();
    let mut from = 0;
    while let Some(at) = message
        .get(from..)?
        .windows(needle.len() + 1)
        .position(|w| w[..needle.len()].eq_ignore_ascii_case(needle) && w[needle.len()] == b':')
    {
        let start = from + at + needle.len() + 1;
        let rest = message.get(start..)?;
        let end = rest
            .iter()
            .position(|b| *b == b'\r' || *b == b'\n')
            .unwrap_or(rest.len());
        let value = std::str::from_utf8(&rest[..end]).unwrap_or("").trim();
        if let Some(t) = key.open(value).filter(|t| t.kind == Kind::Feedback) {
            return Some(t);
        }
        from = start;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> TrackingKey {
        TrackingKey::new(b"0123456789abcdef0123456789abcdef")
    }

    fn tracked() -> Tracked {
        Tracked {
            kind: Kind::Feedback,
            message_id: "m1".into(),
            rcpt_to: "ann@x.test".into(),
            transmission_id: "t1".into(),
            campaign_id: "spring".into(),
            tenant: "acme".into(),
            template_id: "welcome".into(),
            url: String::new(),
        }
    }

    fn report(report_type: &str, machine: &str, status_part: &str, original: &str) -> Vec<u8> {
        format!(
            "From: MAILER-DAEMON@mx.x.test\r\nTo: bounces@b.test\r\nSubject: r\r\nMIME-Version: 1.0\r\n\
             Content-Type: multipart/report; report-type={report_type}; boundary=\"B\"\r\n\r\n\
             --B\r\nContent-Type: text/plain\r\n\r\nhuman words\r\n\
             --B\r\nContent-Type: message/{machine}\r\n\r\n{status_part}\r\n\
             --B\r\nContent-Type: text/rfc822-headers\r\n\r\n{original}\r\n--B--\r\n"
        )
        .into_bytes()
    }

    #[test]
    fn a_dsn_names_its_failed_recipients_and_the_original_message() {
        let key = key();
        let token = key.token(&tracked());
        let bytes = report(
            "delivery-status",
            "delivery-status",
            "Reporting-MTA: dns; mx.x.test\r\n\r\nFinal-Recipient: rfc822; Ann@x.test\r\nAction: failed\r\nStatus: 5.1.1\r\nDiagnostic-Code: smtp; 550 5.1.1\r\n  no such user\r\n\r\nFinal-Recipient: rfc822; bob@x.test\r\nAction: delayed\r\nStatus: 4.0.0",
            &format!("From: s@s.test\r\nX-Gannet-Id: {token}\r\nSubject: hi"),
        );
        let Some(Feedback::Bounce { original, failed }) = parse(&bytes, &key) else {
            panic!("not a bounce");
        };
        assert_eq!(original, Some(tracked()));
        assert_eq!(
            failed,
            vec![Failed {
                rcpt: "Ann@x.test".into(),
                status: "5.1.1".into(),
                reason: "550 5.1.1 no such user".into()
            }]
        );
    }

    #[test]
    fn an_arf_report_is_a_complaint_and_forged_tokens_name_nothing() {
        let key = key();
        let forged = TrackingKey::new(b"another key, another key, another").token(&tracked());
        let bytes = report(
            "feedback-report",
            "feedback-report",
            "Feedback-Type: abuse\r\nUser-Agent: SomeFBL/1.0\r\nVersion: 1\r\nOriginal-Rcpt-To: <ann@x.test>\r\nSource-IP: 192.0.2.1",
            &format!("From: s@s.test\r\nX-Gannet-Id: {forged}"),
        );
        assert_eq!(
            parse(&bytes, &key),
            Some(Feedback::Complaint {
                original: None,
                feedback_type: "abuse".into(),
                rcpt: Some("ann@x.test".into()),
                user_agent: Some("SomeFBL/1.0".into()),
                reported_by: Some("192.0.2.1".into()),
            })
        );
        // Not a report, a report of another type, garbage: nothing.
        assert_eq!(parse(b"Subject: hi\r\n\r\nbody\r\n", &key), None);
        assert_eq!(
            parse(
                &report(
                    "disposition-notification",
                    "disposition-notification",
                    "X: y",
                    ""
                ),
                &key
            ),
            None
        );
        assert_eq!(parse(&[0xff, 0xfe, 0x00], &key), None);
        // A feedback loop whose machine part is text/plain: a complaint about the
        // token's message and recipient.
        let token = key.token(&tracked());
        let text = String::from_utf8(report(
            "feedback-report",
            "plain",
            "This is a complaint.",
            &format!("From: s@s.test\r\nX-Gannet-Id: {token}"),
        ))
        .unwrap()
        .replace("message/plain", "text/plain");
        let Some(Feedback::Complaint {
            original,
            rcpt,
            feedback_type,
            ..
        }) = parse(text.as_bytes(), &key)
        else {
            panic!("not a complaint");
        };
        assert_eq!(original, Some(tracked()));
        assert_eq!(rcpt.as_deref(), Some("ann@x.test"));
        assert_eq!(feedback_type, "abuse");
        assert_eq!(parse(b"", &key), None);
    }
}
