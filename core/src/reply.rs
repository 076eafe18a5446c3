//! SMTP replies: a code, an enhanced status code (RFC 3463) and text.
//!
//! Replies the server sends often are constants; the rest are built with
//! [`Reply::new`]. Every reply the session sends goes through [`Reply::encode`].

use std::borrow::Cow;

/// One SMTP reply. `enhanced` is empty for the replies that carry none (220, 221 and
/// EHLO's 250 lines, where RFC 2034 does not use one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub enhanced: &'static str,
    pub text: Cow<'static, str>,
}

impl Reply {
    pub const fn fixed(code: u16, enhanced: &'static str, text: &'static str) -> Reply {
        Reply {
            code,
            enhanced,
            text: Cow::Borrowed(text),
        }
    }

    pub fn new(code: u16, enhanced: &'static str, text: impl Into<Cow<'static, str>>) -> Reply {
        Reply {
            code,
            enhanced,
            text: text.into(),
        }
    }

    /// A reply whose text comes from configuration (`"550 5.7.1 text"` already split).
    pub fn configured(code: u16, enhanced_and_text: &str) -> Reply {
        Reply {
            code,
            enhanced: "",
            text: Cow::Owned(enhanced_and_text.to_string()),
        }
    }

    pub fn is_positive(&self) -> bool {
        self.code < 400
    }

    /// Appends the reply, one line per line of text, to `out`. Several replies go out
    /// per message, so this allocates nothing beyond growing `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let code = [
            b'0' + (self.code / 100 % 10) as u8,
            b'0' + (self.code / 10 % 10) as u8,
            b'0' + (self.code % 10) as u8,
        ];
        let mut lines = self.text.split('\n').peekable();
        while let Some(line) = lines.next() {
            let sep = if lines.peek().is_none() { b' ' } else { b'-' };
            out.extend_from_slice(&code);
            out.push(sep);
            if !self.enhanced.is_empty() {
                out.extend_from_slice(self.enhanced.as_bytes());
                out.push(b' ');
            }
            out.extend_from_slice(line.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
}

pub const OK: Reply = Reply::fixed(250, "2.0.0", "OK");
pub const SENDER_OK: Reply = Reply::fixed(250, "2.1.0", "sender OK");
pub const RECIPIENT_OK: Reply = Reply::fixed(250, "2.1.5", "recipient OK");
pub const RESET_OK: Reply = Reply::fixed(250, "2.0.0", "reset");
pub const BYE: Reply = Reply::fixed(221, "2.0.0", "bye");
pub const START_DATA: Reply = Reply::fixed(354, "", "end data with <CR><LF>.<CR><LF>");
pub const READY_TLS: Reply = Reply::fixed(220, "2.0.0", "ready to start TLS");
pub const AUTH_OK: Reply = Reply::fixed(235, "2.7.0", "authentication succeeded");
pub const VRFY_DISABLED: Reply = Reply::fixed(
    252,
    "2.5.0",
    "VRFY is disabled; send some mail and it will be delivered if it can",
);

pub const UNKNOWN_COMMAND: Reply = Reply::fixed(500, "5.5.1", "command not recognized");
pub const LINE_TOO_LONG: Reply = Reply::fixed(500, "5.5.2", "line too long");
pub const SYNTAX: Reply = Reply::fixed(501, "5.5.4", "syntax error in parameters");
pub const NEED_HELO: Reply = Reply::fixed(503, "5.5.1", "send EHLO or HELO first");
pub const NEED_MAIL: Reply = Reply::fixed(503, "5.5.1", "send MAIL FROM first");
pub const NESTED_MAIL: Reply = Reply::fixed(503, "5.5.1", "a transaction is already in progress");
pub const NOT_DURING_BDAT: Reply =
    Reply::fixed(503, "5.5.1", "only BDAT, RSET or QUIT may follow BDAT");
pub const BAD_PARAM: Reply = Reply::fixed(555, "5.5.4", "unsupported MAIL or RCPT parameter");
pub const NEED_SMTPUTF8: Reply = Reply::fixed(
    553,
    "5.6.7",
    "non-ASCII address needs the SMTPUTF8 parameter",
);
pub const TOO_MANY_RECIPIENTS: Reply = Reply::fixed(452, "4.5.3", "too many recipients");
pub const TOO_BIG: Reply = Reply::fixed(552, "5.3.4", "message exceeds the size limit");
/// Every recipient of the message is on its tenant's suppression list.
pub const ALL_SUPPRESSED: Reply = Reply::fixed(
    550,
    "5.7.1",
    "every recipient is suppressed due to customer policy",
);
pub const RELAY_DENIED: Reply = Reply::fixed(550, "5.7.1", "relaying denied");
pub const BARE_LINE_ENDING: Reply = Reply::fixed(
    550,
    "5.6.0",
    "message contains a bare CR or LF; lines must end with CRLF",
);
pub const DATA_LINE_TOO_LONG: Reply =
    Reply::fixed(554, "5.6.0", "message has a line longer than the limit");
pub const NUL_IN_DATA: Reply = Reply::fixed(554, "5.6.0", "message contains a NUL byte");
pub const SPOOL_FAILED: Reply = Reply::fixed(
    451,
    "4.3.0",
    "message not accepted: could not be stored safely, try again later",
);
pub const SPOOL_FULL: Reply = Reply::fixed(
    452,
    "4.3.1",
    "message not accepted: the mail system is full, try again later",
);
pub const SPOOL_UNHEALTHY: Reply = Reply::fixed(
    421,
    "4.3.0",
    "storage is failing; closing connection, try again later",
);
pub const TOO_MANY_ERRORS: Reply =
    Reply::fixed(421, "4.7.0", "too many errors; closing connection");
pub const TIMEOUT: Reply = Reply::fixed(421, "4.4.2", "timeout; closing connection");
pub const SHUTTING_DOWN: Reply =
    Reply::fixed(421, "4.3.2", "server shutting down; closing connection");
pub const TOO_MANY_SESSIONS: Reply =
    Reply::fixed(421, "4.7.0", "too many connections; try again later");
pub const TLS_UNAVAILABLE: Reply = Reply::fixed(454, "4.7.0", "TLS not available");
pub const ALREADY_TLS: Reply = Reply::fixed(503, "5.5.1", "TLS already active");
pub const AUTH_FAILED: Reply = Reply::fixed(535, "5.7.8", "authentication credentials invalid");
pub const AUTH_NEEDS_TLS: Reply = Reply::fixed(
    538,
    "5.7.11",
    "encryption required for requested authentication mechanism",
);
pub const AUTH_CANCELLED: Reply = Reply::fixed(501, "5.0.0", "authentication cancelled");
pub const AUTH_BAD_MECHANISM: Reply =
    Reply::fixed(504, "5.5.4", "unrecognized authentication mechanism");
pub const ALREADY_AUTH: Reply = Reply::fixed(503, "5.5.1", "already authenticated");
pub const AUTH_UNAVAILABLE: Reply =
    Reply::fixed(502, "5.5.1", "AUTH is not available on this connection");

/// One reply from the server: its code and its text lines (codes removed), joined by
/// newlines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub code: u16,
    pub text: String,
}

impl Response {
    /// A reply made up locally for a failure that had no server reply.
    pub fn local(code: u16, text: impl Into<String>) -> Response {
        Response {
            code,
            text: text.into(),
        }
    }

    /// The enhanced status code (RFC 3463) the text starts with, if any.
    pub fn enhanced_code(&self) -> Option<&str> {
        let first = self.text.split_whitespace().next()?;
        is_enhanced_code(first).then_some(first)
    }

    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    /// The same, where the code must end at a space (bounce classification reads
    /// the first space-separated word).
    pub fn enhanced(&self) -> Option<&str> {
        let first = self.text.split(' ').next()?;
        is_enhanced_code(first).then_some(first)
    }
}

/// Whether `word` is an RFC 3463 enhanced status code: class 2, 4 or 5, then a
/// subject and a detail of one to three digits each.
pub fn is_enhanced_code(word: &str) -> bool {
    let mut parts = word.split('.');
    let number = |p: Option<&str>| {
        p.is_some_and(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
    };
    parts.next().is_some_and(|c| matches!(c, "2" | "4" | "5"))
        && number(parts.next())
        && number(parts.next())
        && parts.next().is_none()
}

impl std::fmt::Display for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.code, self.text.replace('\n', " / "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_single_and_multi_line() {
        let mut out = Vec::new();
        OK.encode(&mut out);
        Reply::new(250, "", "host\nPIPELINING\nSIZE 10").encode(&mut out);
        assert_eq!(
            out,
            b"250 2.0.0 OK\r\n250-host\r\n250-PIPELINING\r\n250 SIZE 10\r\n"
        );
    }
}
