//! What the server does to a received message before it is spooled: validate the
//! header section, lift the tenant/campaign/pool headers into metadata (removing
//! them), add a Message-ID if there is none, and prepend the Received header.

use crate::reply::Reply;

/// Names of the headers whose values become metadata (matched case-insensitively).
#[derive(Debug, Clone)]
pub struct MetaHeaders {
    pub tenant: String,
    pub campaign: String,
    pub pool: String,
    pub expires: String,
}

/// Values lifted out of the header section.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Lifted {
    pub tenant: Option<String>,
    pub campaign: Option<String>,
    pub pool: Option<String>,
    pub expires: Option<String>,
    pub subject: Option<String>,
    pub has_message_id: bool,
}

/// The header section's extent and what was found in it.
#[derive(Debug)]
struct Fields {
    /// (start, end) byte ranges of whole fields (folded lines included, CRLF included)
    /// to drop from the message.
    drop: Vec<(usize, usize)>,
    /// Where the header section ends (index of the blank line, or the end).
    end: usize,
    lifted: Lifted,
}

fn bad_header(line: usize, why: &str) -> Reply {
    Reply::new(
        554,
        "5.6.0",
        format!("malformed header on line {line}: {why}"),
    )
}

fn scan_fields(body: &[u8], meta: &MetaHeaders) -> Result<Fields, Reply> {
    let mut fields = Fields {
        drop: Vec::new(),
        end: body.len(),
        lifted: Lifted::default(),
    };
    let mut pos = 0;
    let mut line_no = 0;
    // The field being read: (start, name, value start).
    let mut current: Option<(usize, &[u8], usize)> = None;
    let finish = |current: Option<(usize, &[u8], usize)>, end: usize, fields: &mut Fields| {
        let Some((start, name, value_start)) = current else {
            return;
        };
        let value = || unfold(&body[value_start..end]);
        let slot = if name.eq_ignore_ascii_case(meta.tenant.as_bytes()) {
            Some(&mut fields.lifted.tenant)
        } else if name.eq_ignore_ascii_case(meta.campaign.as_bytes()) {
            Some(&mut fields.lifted.campaign)
        } else if name.eq_ignore_ascii_case(meta.pool.as_bytes()) {
            Some(&mut fields.lifted.pool)
        } else if name.eq_ignore_ascii_case(meta.expires.as_bytes()) {
            Some(&mut fields.lifted.expires)
        } else {
            None
        };
        if let Some(slot) = slot {
            let v = value();
            if !v.is_empty() {
                *slot = Some(v);
            }
            fields.drop.push((start, end));
        } else if name.eq_ignore_ascii_case(b"message-id") {
            fields.lifted.has_message_id = true;
        } else if name.eq_ignore_ascii_case(b"subject") && fields.lifted.subject.is_none() {
            fields.lifted.subject = Some(value());
        }
    };
    while pos < body.len() {
        line_no += 1;
        let line_end =
            memchr::memmem::find(&body[pos..], b"\r\n").map_or(body.len(), |n| pos + n + 2);
        let line = &body[pos..line_end];
        let content = line.strip_suffix(b"\r\n").unwrap_or(line);
        if content.is_empty() {
            finish(current.take(), pos, &mut fields);
            fields.end = pos;
            return Ok(fields);
        }
        if content[0] == b' ' || content[0] == b'\t' {
            if current.is_none() {
                return Err(bad_header(line_no, "continuation line before any field"));
            }
        } else {
            finish(current.take(), pos, &mut fields);
            let colon = memchr::memchr(b':', content)
                .ok_or_else(|| bad_header(line_no, "no colon in a header field"))?;
            let name = trim_wsp_end(&content[..colon]);
            if name.is_empty() || !name.iter().all(|b| (33..=126).contains(b)) {
                return Err(bad_header(line_no, "bad field name"));
            }
            current = Some((pos, name, pos + colon + 1));
        }
        pos = line_end;
    }
    finish(current.take(), body.len(), &mut fields);
    Ok(fields)
}

fn trim_wsp_end(s: &[u8]) -> &[u8] {
    let end = s
        .iter()
        .rposition(|b| *b != b' ' && *b != b'\t')
        .map_or(0, |i| i + 1);
    &s[..end]
}

/// A header value with folding removed and surrounding white space trimmed.
pub(crate) fn unfold(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    text.split("\r\n")
        .map(|l| l.trim_matches([' ', '\t']))
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Everything the Received header says about the session.
#[derive(Debug)]
pub struct Trace<'a> {
    pub helo: &'a str,
    pub peer_ip: std::net::IpAddr,
    pub hostname: &'a str,
    /// RFC 3848 / RFC 6531 protocol name: ESMTP, ESMTPS, ESMTPSA, UTF8SMTPS, …
    pub protocol: &'a str,
    /// e.g. "TLSv1.3 with cipher TLS13_AES_128_GCM_SHA256"
    pub tls: Option<&'a str>,
    pub id: &'a str,
    /// The recipient, when there is exactly one.
    pub single_recipient: Option<&'a str>,
    pub unix_secs: u64,
}

/// Builds the message to spool from the received `body`.
pub fn prepare(
    body: &[u8],
    meta: &MetaHeaders,
    trace: &Trace<'_>,
) -> Result<(Vec<u8>, Lifted), Reply> {
    prepare_with(body, meta, trace, |_| None)
}

/// [`prepare`], with a header field of the caller's (a whole `Name: value\r\n`
/// line, made from what was lifted) added after Received.
pub fn prepare_with(
    body: &[u8],
    meta: &MetaHeaders,
    trace: &Trace<'_>,
    extra: impl FnOnce(&Lifted) -> Option<String>,
) -> Result<(Vec<u8>, Lifted), Reply> {
    let fields = scan_fields(body, meta)?;
    let mut received = String::with_capacity(256);
    received.push_str("Received: from ");
    received.push_str(trace.helo);
    received.push_str(&format!(
        " ({})\r\n\tby {} (gannet) with {}",
        ip_literal(trace.peer_ip),
        trace.hostname,
        trace.protocol
    ));
    if let Some(tls) = trace.tls {
        received.push_str(&format!("\r\n\t(using {tls})"));
    }
    received.push_str(&format!("\r\n\tid {}", trace.id));
    if let Some(rcpt) = trace.single_recipient {
        received.push_str(&format!("\r\n\tfor <{rcpt}>"));
    }
    received.push_str("; ");
    received.push_str(&rfc5322_date(trace.unix_secs));
    received.push_str("\r\n");
    let message_id = if fields.lifted.has_message_id {
        String::new()
    } else {
        format!("Message-ID: <{}@{}>\r\n", trace.id, trace.hostname)
    };
    let extra = extra(&fields.lifted).unwrap_or_default();
    let mut out = Vec::with_capacity(received.len() + extra.len() + body.len() + message_id.len());
    out.extend_from_slice(received.as_bytes());
    out.extend_from_slice(extra.as_bytes());
    let mut copied = 0;
    for &(start, end) in &fields.drop {
        out.extend_from_slice(&body[copied..start]);
        copied = end;
    }
    out.extend_from_slice(&body[copied..fields.end]);
    if fields.end > 0 && !body[..fields.end].ends_with(b"\r\n") {
        // A header section that ends the message without a final CRLF.
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(message_id.as_bytes());
    out.extend_from_slice(&body[fields.end..]);
    Ok((out, fields.lifted))
}

fn ip_literal(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => format!("[{v4}]"),
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => format!("[{v4}]"),
            None => format!("[IPv6:{v6}]"),
        },
    }
}

/// `Tue, 24 Nov 2026 02:27:37 +0000` (RFC 5322 3.3), in UTC.
pub fn rfc5322_date(unix_secs: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = unix_secs / 86_400;
    let secs = unix_secs % 86_400;
    let (year, month, day) = crate::clock::civil_from_days(days as i64);
    format!(
        "{}, {} {} {} {:02}:{:02}:{:02} +0000",
        DAYS[(days % 7) as usize],
        day,
        MONTHS[(month - 1) as usize],
        year,
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> MetaHeaders {
        MetaHeaders {
            tenant: "X-Gannet-Tenant".into(),
            campaign: "X-Gannet-Campaign".into(),
            pool: "X-Gannet-Pool".into(),
            expires: "X-Gannet-Expires".into(),
        }
    }

    fn trace() -> Trace<'static> {
        Trace {
            helo: "client.test",
            peer_ip: "127.0.0.1".parse().unwrap(),
            hostname: "mx.test",
            protocol: "ESMTPS",
            tls: Some("TLSv1.3 with cipher TLS13_AES_128_GCM_SHA256"),
            id: "ID1",
            single_recipient: Some("a@b.test"),
            unix_secs: 1_795_487_257,
        }
    }

    #[test]
    fn dates() {
        assert_eq!(rfc5322_date(0), "Thu, 1 Jan 1970 00:00:00 +0000");
        assert_eq!(rfc5322_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 +0000");
        assert_eq!(
            rfc5322_date(1_795_487_257),
            "Tue, 24 Nov 2026 02:27:37 +0000"
        );
    }

    #[test]
    fn lifts_meta_headers_adds_trace_and_message_id() {
        let body = b"Subject: hi\r\n\tthere\r\nx-gannet-tenant: acme\r\nX-Gannet-Campaign:\r\n spring\r\nFrom: a@b.test\r\n\r\nbody\r\nX-Gannet-Tenant: not a header\r\n";
        let (out, lifted) = prepare(body, &meta(), &trace()).unwrap();
        assert_eq!(lifted.tenant.as_deref(), Some("acme"));
        assert_eq!(lifted.campaign.as_deref(), Some("spring"));
        assert_eq!(lifted.subject.as_deref(), Some("hi there"));
        let text = String::from_utf8(out).unwrap();
        let expected = "Received: from client.test ([127.0.0.1])\r\n\tby mx.test (gannet) with ESMTPS\r\n\t(using TLSv1.3 with cipher TLS13_AES_128_GCM_SHA256)\r\n\tid ID1\r\n\tfor <a@b.test>; Tue, 24 Nov 2026 02:27:37 +0000\r\n\
             Subject: hi\r\n\tthere\r\nFrom: a@b.test\r\nMessage-ID: <ID1@mx.test>\r\n\r\nbody\r\nX-Gannet-Tenant: not a header\r\n";
        assert_eq!(text, expected);
    }

    #[test]
    fn keeps_existing_message_id_and_handles_headers_only() {
        let (out, lifted) = prepare(b"Message-Id: <x@y>\r\nSubject: s", &meta(), &trace()).unwrap();
        assert!(lifted.has_message_id);
        assert!(
            String::from_utf8(out)
                .unwrap()
                .ends_with("\r\nMessage-Id: <x@y>\r\nSubject: s\r\n")
        );
    }

    #[test]
    fn bad_headers_are_refused_with_line() {
        for (body, line) in [
            (&b"no colon here\r\n\r\nbody"[..], 1),
            (b" folded first: x\r\n\r\n", 1),
            (b"Subject: ok\r\nBad Name: x\r\n\r\n", 2),
            (b"Subject: ok\r\n: x\r\n\r\n", 2),
        ] {
            let err = prepare(body, &meta(), &trace()).unwrap_err();
            assert_eq!(err.code, 554);
            assert!(err.text.contains(&format!("line {line}")), "{err:?}");
        }
    }
}
