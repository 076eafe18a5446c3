//! Reading and editing the header section of a message gannet has already checked
//! (`message::prepare`): CRLF lines, folded fields, a blank line before the body (or
//! none). What policy scripts use to read, add and remove header fields.

use std::ops::Range;

/// One header field: its whole extent (folded lines and the final CRLF included)
/// and its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub whole: Range<usize>,
    pub name: Range<usize>,
    /// After the colon, up to the final CRLF.
    pub value: Range<usize>,
}

/// The header fields of `message`, in order, read as they are asked for (no list
/// is built); [`Fields::end`] then says where the header section ends.
pub fn fields(message: &[u8]) -> Fields<'_> {
    Fields {
        message,
        pos: 0,
        done: false,
    }
}

/// The fields of a header section, one at a time ([`fields`]).
#[derive(Debug, Clone)]
pub struct Fields<'a> {
    message: &'a [u8],
    pos: usize,
    done: bool,
}

impl Fields<'_> {
    /// Where the header section ends — the index of the blank line, or the end of
    /// the message — once every field has been read.
    pub fn end(mut self) -> usize {
        while self.next().is_some() {}
        self.pos
    }
}

impl Iterator for Fields<'_> {
    type Item = Field;

    fn next(&mut self) -> Option<Field> {
        let message = self.message;
        if self.done || self.pos >= message.len() {
            self.done = true;
            return None;
        }
        let start = self.pos;
        let (content_end, line_end) = line(message, start);
        if content_end == start {
            // The blank line: the header section ends here.
            self.done = true;
            return None;
        }
        let content = &message[start..content_end];
        let colon = memchr::memchr(b':', content).unwrap_or(content.len());
        let mut field = Field {
            whole: start..line_end,
            name: start..start + colon,
            value: (start + colon + 1).min(content_end)..content_end,
        };
        self.pos = line_end;
        // Folded lines (starting with a space or a tab) belong to the field.
        while matches!(message.get(self.pos), Some(b' ' | b'\t')) {
            let (content_end, line_end) = line(message, self.pos);
            field.whole.end = line_end;
            field.value.end = content_end;
            self.pos = line_end;
        }
        Some(field)
    }
}

/// The line starting at `pos`: where its content ends (its CRLF) and where the next
/// line starts; the end of the message for both when no CRLF follows.
fn line(message: &[u8], pos: usize) -> (usize, usize) {
    let mut from = pos;
    while let Some(n) = message
        .get(from..)
        .and_then(|rest| memchr::memchr(b'\n', rest))
    {
        let at = from + n;
        if at > pos && message[at - 1] == b'\r' {
            return (at - 1, at + 1);
        }
        from = at + 1;
    }
    (message.len(), message.len())
}

fn named<'a>(message: &'a [u8], name: &'a str) -> impl Iterator<Item = Field> + 'a {
    fields(message).filter(move |f| {
        message[f.name.clone()]
            .trim_ascii_end()
            .eq_ignore_ascii_case(name.as_bytes())
    })
}

/// The first field named `name` (any case): its value unfolded and trimmed.
pub fn first_value(message: &[u8], name: &str) -> Option<String> {
    let field = named(message, name).next()?;
    Some(crate::message::unfold(&message[field.value]))
}

/// Every field as (name, value unfolded and trimmed), in order.
pub fn all(message: &[u8]) -> Vec<(String, String)> {
    fields(message)
        .map(|f| {
            let name = String::from_utf8_lossy(message[f.name].trim_ascii_end()).into_owned();
            (name, crate::message::unfold(&message[f.value]))
        })
        .collect()
}

/// Removes every field named `name` (any case); how many there were.
pub fn remove_all(message: &mut Vec<u8>, name: &str) -> usize {
    // No list of the fields: each search starts where the last field removed was
    // (usually there is none or one).
    let mut removed = 0;
    let mut from = 0;
    loop {
        let Some(field) = named(&message[from..], name).next() else {
            return removed;
        };
        let whole = from + field.whole.start..from + field.whole.end;
        from = whole.start;
        message.drain(whole);
        removed += 1;
    }
}

/// Why `name: value` cannot be a header field, if it cannot: a name of printable
/// characters without a colon (RFC 5322 2.2), a value without CR or LF (a script
/// must not end the header section early or smuggle a field in).
pub fn check(name: &str, value: &str) -> Result<(), String> {
    if name.is_empty() || !name.bytes().all(|b| (33..=126).contains(&b) && b != b':') {
        return Err(format!("{name:?} is not a header field name"));
    }
    if value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
        return Err(format!("the value of {name} has a line break or NUL"));
    }
    Ok(())
}

/// Adds `name: value` as the last header field (checked with [`check`]).
pub fn append(message: &mut Vec<u8>, name: &str, value: &str) -> Result<(), String> {
    check(name, value)?;
    let end = fields(message).end();
    let mut line = Vec::with_capacity(name.len() + value.len() + 4);
    line.extend_from_slice(name.as_bytes());
    line.extend_from_slice(b": ");
    line.extend_from_slice(value.as_bytes());
    line.extend_from_slice(b"\r\n");
    let at = if end == message.len() {
        // No blank line: the field goes at the end, after a CRLF ending the last.
        if !message.is_empty() && !message.ends_with(b"\r\n") {
            message.extend_from_slice(b"\r\n");
        }
        message.len()
    } else {
        end
    };
    message.splice(at..at, line);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSG: &[u8] = b"Received: from a\r\n\tby b\r\nSubject: hello\r\n  world\r\nX-Tag: one\r\nx-tag: two\r\n\r\nbody\r\nX-Tag: not a header\r\n";

    #[test]
    fn every_field_comes_with_its_value_unfolded() {
        let all = all(MSG);
        assert_eq!(
            all,
            [
                ("Received", "from a by b"),
                ("Subject", "hello world"),
                ("X-Tag", "one"),
                ("x-tag", "two"),
            ]
            .map(|(n, v)| (n.to_string(), v.to_string()))
        );
    }

    #[test]
    fn fields_fold_and_end_at_the_blank_line() {
        let f: Vec<Field> = fields(MSG).collect();
        let end = fields(MSG).end();
        assert_eq!(f.len(), 4);
        assert_eq!(&MSG[f[1].whole.clone()], b"Subject: hello\r\n  world\r\n");
        assert_eq!(&MSG[end..end + 2], b"\r\n");
        assert_eq!(first_value(MSG, "SUBJECT").as_deref(), Some("hello world"));
        assert_eq!(first_value(MSG, "x-tag").as_deref(), Some("one"));
        assert_eq!(first_value(MSG, "missing"), None);
    }

    #[test]
    fn removing_and_appending_keep_the_body() {
        let mut m = MSG.to_vec();
        assert_eq!(remove_all(&mut m, "X-TAG"), 2);
        append(&mut m, "X-Routed", "by script").unwrap();
        assert_eq!(
            m,
            b"Received: from a\r\n\tby b\r\nSubject: hello\r\n  world\r\nX-Routed: by script\r\n\r\nbody\r\nX-Tag: not a header\r\n"
        );
        // A message of headers only gets its field after the last one.
        let mut h = b"Subject: x".to_vec();
        append(&mut h, "X-A", "1").unwrap();
        assert_eq!(h, b"Subject: x\r\nX-A: 1\r\n");
        for (name, value) in [
            ("Bad Name", "v"),
            ("", "v"),
            ("A:B", "v"),
            ("X", "a\r\nBcc: x"),
        ] {
            assert!(append(&mut h, name, value).is_err(), "{name:?} {value:?}");
        }
    }
}
