//! DKIM canonicalization (RFC 6376 3.4): header fields and bodies, "simple" and
//! "relaxed".

use std::sync::LazyLock;

use memchr::memmem;

pub use gannet_core::config::dkim::Canon;

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
    static CRLF: LazyLock<memmem::Finder<'static>> = LazyLock::new(|| memmem::Finder::new(b"\r\n"));
    let mut fields: Vec<Field<'_>> = Vec::new();
    let mut pos = 0;
    while pos < message.len() {
        let end = CRLF
            .find(&message[pos..])
            .map_or(message.len(), |i| pos + i);
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
    if canon == Canon::Relaxed {
        // A last line without a line break that is only WSP is empty once relaxed.
        let last = memchr::memrchr(b'\n', body).map_or(0, |i| i + 1);
        if body[last..].iter().all(|b| matches!(b, b' ' | b'\t')) {
            end = last;
        }
    }
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
            relaxed_body(body, sink);
        }
    }
}

/// Relaxed body canonicalization of a body whose trailing empty lines are gone.
///
/// Most lines need no rewriting: a line does only if it does not end in CRLF or its
/// content has a tab, two spaces in a row or a space at its end. Those spots are found
/// with SIMD searches over the whole body (each search runs again only once the line
/// walk has passed its last hit), so a clean body costs one `memchr` per line and is
/// hashed in one piece; only the lines with a spot are rewritten.
fn relaxed_body(body: &[u8], sink: &mut impl FnMut(&[u8])) {
    static DOUBLE_SPACE: LazyLock<memmem::Finder<'static>> =
        LazyLock::new(|| memmem::Finder::new(b"  "));
    static SPACE_CRLF: LazyLock<memmem::Finder<'static>> =
        LazyLock::new(|| memmem::Finder::new(b" \r\n"));
    // The next hit of each search at or after the current line's start (body.len():
    // none left).
    let find = |kind: usize, from: usize| -> usize {
        let rest = &body[from..];
        let hit = match kind {
            0 => memchr::memchr(b'\t', rest),
            1 => DOUBLE_SPACE.find(rest),
            _ => SPACE_CRLF.find(rest),
        };
        hit.map_or(body.len(), |i| from + i)
    };
    let mut next = [find(0, 0), find(1, 0), find(2, 0)];
    let mut line_buf = Vec::new();
    let mut clean_from = 0;
    let mut line_start = 0;
    let mut rewrite = |start: usize, content_end: usize, clean_from: &mut usize| {
        if *clean_from < start {
            sink(&body[*clean_from..start]);
        }
        line_buf.clear();
        let mut pending_space = false;
        for &b in &body[start..content_end] {
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
    };
    for newline in memchr::memchr_iter(b'\n', body) {
        let line_end = newline + 1;
        let ends_crlf = newline > line_start && body[newline - 1] == b'\r';
        // A line that does not end in CRLF keeps its LF as content (and gets a CRLF).
        let content_end = if ends_crlf { newline - 1 } else { line_end };
        for (kind, hit) in next.iter_mut().enumerate() {
            if *hit < line_start {
                *hit = find(kind, line_start);
            }
        }
        let spot = next.iter().any(|&hit| hit < content_end);
        if !ends_crlf || spot {
            rewrite(line_start, content_end, &mut clean_from);
            clean_from = line_end;
        }
        line_start = line_end;
    }
    if line_start < body.len() {
        // The last line has no line break: always rewritten (it gets its CRLF).
        rewrite(line_start, body.len(), &mut clean_from);
        clean_from = body.len();
    }
    if clean_from < body.len() {
        sink(&body[clean_from..]);
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

    /// Relaxed canonicalization line by line, as RFC 6376 3.4.4 states it.
    fn relaxed_reference(body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for line in body.split_inclusive(|&b| b == b'\n') {
            let content = line.strip_suffix(b"\r\n").unwrap_or(line);
            let mut pending_space = false;
            for &b in content {
                if matches!(b, b' ' | b'\t') {
                    pending_space = true;
                } else {
                    if pending_space {
                        out.push(b' ');
                        pending_space = false;
                    }
                    out.push(b);
                }
            }
            out.extend_from_slice(b"\r\n");
        }
        // Trailing empty lines go.
        while out.ends_with(b"\r\n\r\n") {
            out.truncate(out.len() - 2);
        }
        if out == b"\r\n" {
            out.clear();
        }
        out
    }

    #[test]
    fn relaxed_bodies_match_the_line_by_line_rule() {
        // Bodies drawn from the bytes that matter (a tiny xorshift, so the cases are
        // the same on every run): tabs, spaces, CR and LF in every arrangement.
        let alphabet = b"ab \t\r\n\n";
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for case in 0..20_000 {
            let len = case % 40;
            let body: Vec<u8> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    alphabet[(state % alphabet.len() as u64) as usize]
                })
                .collect();
            assert_eq!(
                body_of(Canon::Relaxed, &body),
                relaxed_reference(&body),
                "body {:?}",
                String::from_utf8_lossy(&body)
            );
        }
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
