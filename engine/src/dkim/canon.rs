//! DKIM canonicalization (RFC 6376 3.4): header fields and bodies, "simple" and
//! "relaxed".

use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Canon {
    Simple,
    Relaxed,
}

impl Canon {
    pub fn name(self) -> &'static str {
        match self {
            Canon::Simple => "simple",
            Canon::Relaxed => "relaxed",
        }
    }
}

/// One header field as it stands in the message: its name and the whole field
/// (name, colon, value with its folding, without the final CRLF).
#[derive(Debug, Clone, Copy)]
pub struct Field<'a> {
    pub name: &'a [u8],
    pub raw: &'a [u8],
}

/// Splits a message into its header fields and its body (after the empty line; empty
/// when there is none).
pub fn split(message: &[u8]) -> (Vec<Field<'_>>, &[u8]) {
    let mut fields: Vec<Field<'_>> = Vec::new();
    let mut pos = 0;
    while pos < message.len() {
        let end = memchr::memmem::find(&message[pos..], b"\r\n").map_or(message.len(), |i| pos + i);
        let line = &message[pos..end];
        let next = (end + 2).min(message.len());
        if line.is_empty() {
            return (fields, &message[next..]);
        }
        if matches!(line[0], b' ' | b'\t') {
            // A continuation: the field grows to the end of this line.
            if let Some(last) = fields.last_mut() {
                let start = last.raw.as_ptr() as usize - message.as_ptr() as usize;
                last.raw = &message[start..end];
            }
        } else {
            let name_end = memchr::memchr(b':', line).unwrap_or(line.len());
            fields.push(Field {
                name: trim_wsp(&line[..name_end]),
                raw: line,
            });
        }
        pos = next;
    }
    (fields, &message[message.len()..])
}

fn trim_wsp(s: &[u8]) -> &[u8] {
    let start = s
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(s.len());
    let end = s
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .map_or(start, |i| i + 1);
    &s[start..end]
}

/// Appends a header field canonicalized, followed by CRLF when `crlf`.
pub fn header(canon: Canon, raw: &[u8], crlf: bool, out: &mut Vec<u8>) {
    match canon {
        Canon::Simple => out.extend_from_slice(raw),
        Canon::Relaxed => {
            let colon = memchr::memchr(b':', raw).unwrap_or(raw.len());
            for &b in trim_wsp(&raw[..colon]) {
                out.push(b.to_ascii_lowercase());
            }
            out.push(b':');
            // Unfold, turn every run of WSP into one SP, drop WSP at both ends.
            let mut pending_space = false;
            let mut started = false;
            for &b in raw.get(colon + 1..).unwrap_or(&[]) {
                match b {
                    b'\r' | b'\n' => {}
                    b' ' | b'\t' => pending_space = started,
                    _ => {
                        if pending_space {
                            out.push(b' ');
                            pending_space = false;
                        }
                        started = true;
                        out.push(b);
                    }
                }
            }
        }
    }
    if crlf {
        out.extend_from_slice(b"\r\n");
    }
}

/// Feeds a body, canonicalized, to `sink` (RFC 6376 3.4.3 and 3.4.4): trailing empty
/// lines are dropped; "simple" makes an empty body one CRLF, "relaxed" leaves it
/// empty and also drops trailing WSP on lines and turns runs of WSP into one SP.
pub fn body(canon: Canon, body: &[u8], sink: &mut impl FnMut(&[u8])) {
    // Trailing CRLFs (and, relaxed, lines of only WSP) are not part of the body.
    let mut end = body.len();
    loop {
        let line_start = body[..end.saturating_sub(2)]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        let ends_crlf = end >= 2 && &body[end - 2..end] == b"\r\n";
        if !ends_crlf {
            break;
        }
        let line = &body[line_start..end - 2];
        let empty = match canon {
            Canon::Simple => line.is_empty(),
            Canon::Relaxed => line.iter().all(|b| matches!(b, b' ' | b'\t')),
        };
        if !empty {
            break;
        }
        end = line_start;
        if end == 0 {
            break;
        }
    }
    let body = &body[..end];
    match canon {
        Canon::Simple => {
            if body.is_empty() {
                sink(b"\r\n");
                return;
            }
            sink(body);
            if !body.ends_with(b"\r\n") {
                sink(b"\r\n");
            }
        }
        Canon::Relaxed => {
            if body.is_empty() {
                return;
            }
            // Runs of lines that relaxed canonicalization leaves as they are (no tab,
            // no double space, no space before the line end) are hashed in one piece;
            // only the other lines are rewritten.
            let mut line_buf = Vec::with_capacity(1024);
            let mut clean_from = 0;
            let mut at = 0;
            for line in body.split_inclusive(|&b| b == b'\n') {
                let content = line.strip_suffix(b"\r\n").unwrap_or(line);
                let ends_crlf = content.len() != line.len();
                let clean = ends_crlf
                    && !content.ends_with(b" ")
                    && memchr::memchr(b'\t', content).is_none()
                    && memchr::memmem::find(content, b"  ").is_none();
                if !clean {
                    if clean_from < at {
                        sink(&body[clean_from..at]);
                    }
                    line_buf.clear();
                    let mut pending_space = false;
                    for &b in content {
                        if matches!(b, b' ' | b'\t') {
                            pending_space = true;
                        } else {
                            if pending_space {
                                line_buf.push(b' ');
                                pending_space = false;
                            }
                            line_buf.push(b);
                        }
                    }
                    line_buf.extend_from_slice(b"\r\n");
                    sink(&line_buf);
                    clean_from = at + line.len();
                }
                at += line.len();
            }
            if clean_from < at {
                sink(&body[clean_from..at]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_of(canon: Canon, input: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        body(canon, input, &mut |chunk| out.extend_from_slice(chunk));
        out
    }

    #[test]
    fn bodies() {
        // RFC 6376 3.4.5's example.
        let b = b" C \r\nD \t E\r\n\r\n\r\n";
        assert_eq!(body_of(Canon::Relaxed, b), b" C\r\nD E\r\n");
        assert_eq!(body_of(Canon::Simple, b), b" C \r\nD \t E\r\n");
        assert_eq!(body_of(Canon::Simple, b""), b"\r\n");
        assert_eq!(body_of(Canon::Relaxed, b""), b"");
        assert_eq!(body_of(Canon::Simple, b"\r\n\r\n"), b"\r\n");
        assert_eq!(body_of(Canon::Relaxed, b"\r\n \r\n"), b"");
        assert_eq!(body_of(Canon::Simple, b"no crlf"), b"no crlf\r\n");
        assert_eq!(body_of(Canon::Relaxed, b"x  \t\r\n  \r\n"), b"x\r\n");
        // Clean lines pass through in runs around the rewritten ones.
        assert_eq!(
            body_of(Canon::Relaxed, b"a b\r\nc  d\r\ne\r\nf\t\r\ng"),
            b"a b\r\nc d\r\ne\r\nf\r\ng\r\n"
        );
        assert_eq!(body_of(Canon::Relaxed, b" lead\r\n"), b" lead\r\n");
    }

    #[test]
    fn headers() {
        let mut out = Vec::new();
        header(
            Canon::Relaxed,
            b"SUBJect \t:  AbC \r\n\t def  ",
            true,
            &mut out,
        );
        assert_eq!(out, b"subject:AbC def\r\n");
        out.clear();
        header(Canon::Simple, b"SUBJect \t:  AbC", false, &mut out);
        assert_eq!(out, b"SUBJect \t:  AbC");
    }

    #[test]
    fn splitting() {
        let m = b"A: 1\r\nB: 2\r\n  more\r\nC:3\r\n\r\nbody\r\n";
        let (fields, body) = split(m);
        assert_eq!(fields.len(), 3);
        assert_eq!(fields[1].name, b"B");
        assert_eq!(fields[1].raw, b"B: 2\r\n  more");
        assert_eq!(body, b"body\r\n");
        let (fields, body) = split(b"A: 1\r\n");
        assert_eq!((fields.len(), body), (1, &b""[..]));
    }
}
