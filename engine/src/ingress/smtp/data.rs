//! The message-data scanner for DATA (dot-transparent) and BDAT (binary chunks).
//!
//! It is sans-IO: fed whatever bytes arrived, it copies content into the body,
//! unstuffs dots, finds the end of DATA and notes every violation, and never needs to
//! look back more than one byte. Security rules (SMTP smuggling, CVE-2023-51764/5/6):
//! DATA ends only at `<CR><LF>.<CR><LF>` where the first CRLF is a real line ending;
//! a bare LF never starts a line for dot handling, so `<LF>.<CR><LF>` and `<LF>.<LF>`
//! are content, and a message containing a bare CR or LF is flagged.

/// What the scanner found wrong with the content (the message is refused after its
/// end has been read, so the session stays in step with the client).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Violations {
    pub bare_cr: bool,
    pub bare_lf: bool,
    pub nul: bool,
    pub line_too_long: bool,
    pub too_big: bool,
}

/// Scans one message's data.
#[derive(Debug)]
pub struct Scanner {
    /// DATA mode: dot-unstuffing and end detection. BDAT mode: neither.
    dot_transparent: bool,
    /// Normalise bare CR/LF to CRLF instead of copying them (when they are allowed).
    normalize: bool,
    line_bytes_max: usize,
    body_bytes_max: usize,
    /// At the start of a line that began after a real CRLF (or at the start of DATA).
    line_start: bool,
    /// The current line began with a '.' that was removed.
    after_dot: bool,
    /// The last byte seen was a CR, not yet known to start a CRLF.
    pending_cr: bool,
    /// Octets in the current line so far, line ending excluded.
    line_len: usize,
    pub violations: Violations,
    /// Content octets seen, including those not kept once `too_big`.
    pub seen_bytes: u64,
}

/// What a call to [`Scanner::feed`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scan {
    /// All input consumed; the message continues.
    More,
    /// The end of DATA was found after consuming this many bytes of the input.
    End(usize),
}

impl Scanner {
    pub fn data(line_bytes_max: usize, body_bytes_max: usize, normalize: bool) -> Scanner {
        Scanner::new(true, line_bytes_max, body_bytes_max, normalize)
    }

    pub fn bdat(line_bytes_max: usize, body_bytes_max: usize, normalize: bool) -> Scanner {
        Scanner::new(false, line_bytes_max, body_bytes_max, normalize)
    }

    fn new(dot: bool, line_bytes_max: usize, body_bytes_max: usize, normalize: bool) -> Scanner {
        Scanner {
            dot_transparent: dot,
            normalize,
            // The limit counts the CRLF; the scanner counts the line without it.
            line_bytes_max: line_bytes_max.saturating_sub(2),
            body_bytes_max,
            line_start: true,
            after_dot: false,
            pending_cr: false,
            line_len: 0,
            violations: Violations::default(),
            seen_bytes: 0,
        }
    }

    /// Consumes `input`, appending content to `body`.
    pub fn feed(&mut self, input: &[u8], body: &mut Vec<u8>) -> Scan {
        let mut i = 0;
        while i < input.len() {
            if self.pending_cr {
                self.pending_cr = false;
                if input[i] == b'\n' {
                    i += 1;
                    if self.dot_transparent && self.after_dot && self.line_len == 0 {
                        return Scan::End(i);
                    }
                    self.emit(body, b"\r\n");
                    self.end_line(true);
                    continue;
                }
                self.violations.bare_cr = true;
                let bytes: &[u8] = if self.normalize { b"\r\n" } else { b"\r" };
                self.emit(body, bytes);
                self.end_line(false);
                continue;
            }
            let b = input[i];
            if self.line_start && self.dot_transparent && b == b'.' && !self.after_dot {
                // A leading dot is removed; "." alone on a line ends DATA.
                self.after_dot = true;
                self.line_start = false;
                i += 1;
                continue;
            }
            match b {
                b'\r' => {
                    self.pending_cr = true;
                    i += 1;
                }
                b'\n' => {
                    self.violations.bare_lf = true;
                    let bytes: &[u8] = if self.normalize { b"\r\n" } else { b"\n" };
                    self.emit(body, bytes);
                    self.end_line(false);
                    i += 1;
                }
                _ => {
                    let run_end =
                        memchr::memchr2(b'\r', b'\n', &input[i..]).map_or(input.len(), |n| i + n);
                    let run = &input[i..run_end];
                    if memchr::memchr(0, run).is_some() {
                        self.violations.nul = true;
                    }
                    self.line_len += run.len();
                    if self.line_len > self.line_bytes_max {
                        self.violations.line_too_long = true;
                    }
                    self.line_start = false;
                    self.emit(body, run);
                    i = run_end;
                }
            }
        }
        Scan::More
    }

    /// Ends a BDAT message: a trailing CR is content (BDAT has no line structure to
    /// complete), though a bare one.
    pub fn finish_chunks(&mut self, body: &mut Vec<u8>) {
        if self.pending_cr {
            self.pending_cr = false;
            self.violations.bare_cr = true;
            self.emit(body, b"\r");
        }
    }

    /// `real_crlf`: the line ended with CRLF, so the next one may start with a dot that
    /// matters. After a bare CR or LF it may not (that is the smuggling defence).
    fn end_line(&mut self, real_crlf: bool) {
        self.line_start = real_crlf;
        self.after_dot = false;
        self.line_len = 0;
    }

    fn emit(&mut self, body: &mut Vec<u8>, bytes: &[u8]) {
        self.seen_bytes += bytes.len() as u64;
        if self.violations.too_big || body.len() + bytes.len() > self.body_bytes_max {
            self.violations.too_big = true;
            return;
        }
        body.extend_from_slice(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` to a DATA scanner in pieces of every size from 1 to 7 bytes and
    /// checks that each split gives the same body, consumed length and violations.
    fn check(input: &[u8], body: Option<&[u8]>, violations: Violations) {
        for piece in 1..=7 {
            let mut scanner = Scanner::data(1000, 1 << 20, false);
            let mut out = Vec::new();
            let mut end = None;
            for (n, chunk) in input.chunks(piece).enumerate() {
                if let Scan::End(k) = scanner.feed(chunk, &mut out) {
                    end = Some(n * piece + k);
                    break;
                }
            }
            match body {
                Some(expected) => {
                    assert_eq!(end, Some(input.len()), "end of {input:?} (piece {piece})");
                    assert_eq!(out, expected, "body of {input:?} (piece {piece})");
                }
                None => assert_eq!(end, None, "{input:?} must not end (piece {piece})"),
            }
            assert_eq!(scanner.violations, violations, "{input:?} (piece {piece})");
        }
    }

    const CLEAN: Violations = Violations {
        bare_cr: false,
        bare_lf: false,
        nul: false,
        line_too_long: false,
        too_big: false,
    };

    #[test]
    fn ends_and_unstuffs() {
        check(b".\r\n", Some(b""), CLEAN);
        check(b"a\r\n.\r\n", Some(b"a\r\n"), CLEAN);
        check(b"a\r\n..b\r\n.\r\n", Some(b"a\r\n.b\r\n"), CLEAN);
        check(b"..\r\n.\r\n", Some(b".\r\n"), CLEAN);
        check(b"a.\r\n.b\r\n.\r\n", Some(b"a.\r\nb\r\n"), CLEAN);
        check(b"\r\n\r\n.\r\n", Some(b"\r\n\r\n"), CLEAN);
    }

    #[test]
    fn smuggling_sequences_never_end_data() {
        let lf = Violations {
            bare_lf: true,
            ..CLEAN
        };
        let cr = Violations {
            bare_cr: true,
            ..CLEAN
        };
        check(b"a\n.\r\n", None, lf);
        check(b"a\n.\n", None, lf);
        check(b"a\r\n.\n", None, lf);
        check(b"a\r.\r\n", None, cr);
        check(b"a\r\n.\r", None, CLEAN);
        // The smuggled commands stay content until the real end.
        check(
            b"a\n.\r\nMAIL FROM:<x@y>\r\n.\r\n",
            Some(b"a\n.\r\nMAIL FROM:<x@y>\r\n"),
            lf,
        );
        check(b"a\r.\rb\r\n.\r\n", Some(b"a\r.\rb\r\n"), cr);
    }

    #[test]
    fn limits_and_nul() {
        let mut scanner = Scanner::data(10, 1 << 20, false);
        let mut out = Vec::new();
        assert_eq!(scanner.feed(b"12345678\r\n.\r\n", &mut out), Scan::End(13));
        assert!(!scanner.violations.line_too_long);
        let mut scanner = Scanner::data(10, 1 << 20, false);
        assert_eq!(scanner.feed(b"123456789\r\n.\r\n", &mut out), Scan::End(14));
        assert!(scanner.violations.line_too_long);

        let mut scanner = Scanner::data(1000, 5, false);
        let mut out = Vec::new();
        assert_eq!(
            scanner.feed(b"abc\r\ndef\r\n.\r\n", &mut out),
            Scan::End(13)
        );
        assert!(scanner.violations.too_big);
        assert_eq!(scanner.seen_bytes, 10);

        let mut scanner = Scanner::data(1000, 100, false);
        scanner.feed(b"a\0b\r\n.\r\n", &mut out);
        assert!(scanner.violations.nul);
    }

    #[test]
    fn normalizes_when_allowed() {
        let mut scanner = Scanner::data(1000, 100, true);
        let mut out = Vec::new();
        assert_eq!(scanner.feed(b"a\nb\rc\r\n.\r\n", &mut out), Scan::End(10));
        assert_eq!(out, b"a\r\nb\r\nc\r\n");
    }

    #[test]
    fn bdat_is_binary() {
        let mut scanner = Scanner::bdat(1000, 100, false);
        let mut out = Vec::new();
        assert_eq!(scanner.feed(b"a\r\n.\r\n..\r", &mut out), Scan::More);
        assert_eq!(scanner.feed(b"\n", &mut out), Scan::More);
        scanner.finish_chunks(&mut out);
        assert_eq!(out, b"a\r\n.\r\n..\r\n");
        assert_eq!(scanner.violations, CLEAN);
    }
}
