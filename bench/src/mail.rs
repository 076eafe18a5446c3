//! Test messages for the load generator and the sink: generated bodies carrying a
//! digest header (`X-Blast-Digest`), so that the sink can tell a message arrived
//! intact through any number of relays (which add headers but must not touch the
//! body), and the parsing of size distributions and weighted domain lists.

use anyhow::{Context, Result, bail};

/// The header holding the body's digest.
pub const DIGEST_HEADER: &str = "X-Blast-Digest";

/// CRC-32C of a body (the bytes after the blank line ending the header, as the
/// message is, not as it travels dot-stuffed), in hex.
pub fn digest(body: &[u8]) -> String {
    format!("{:08x}", crc32c::crc32c(body))
}

/// Builds message `seq` of about `size` bytes (headers included), with CRLF line
/// endings, lines of at most 78 octets and a digest header.
pub fn message(seq: u64, size: usize, from: &str, to: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(size);
    // Varied line content (a line starting with '.' now and then exercises
    // dot-stuffing along the way).
    let mut n = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let header_estimate = 300;
    while body.len() + header_estimate < size {
        n ^= n << 13;
        n ^= n >> 7;
        n ^= n << 17;
        let line = format!(
            "{}line {seq} {:016x} the quick brown fox jumps over the lazy dog 0123456789",
            if n.is_multiple_of(16) { "." } else { "" },
            n
        );
        body.extend_from_slice(line.as_bytes());
        body.extend_from_slice(b"\r\n");
    }
    if body.is_empty() {
        body.extend_from_slice(b"x\r\n");
    }
    let mut out = format!(
        "From: <{from}>\r\nTo: <{to}>\r\nSubject: blast {seq}\r\nMessage-ID: <{seq}.{:x}@blast.test>\r\n{DIGEST_HEADER}: {}\r\n\r\n",
        fastrand::u64(..),
        digest(&body)
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

/// What the sink found about a received message's integrity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Integrity {
    Intact,
    Damaged,
    /// No digest header: not a generated message.
    Unchecked,
}

/// Checks a received message (unstuffed, CRLF line endings) against its digest.
pub fn check(message: &[u8]) -> Integrity {
    let Some(split) = memchr::memmem::find(message, b"\r\n\r\n") else {
        return Integrity::Unchecked;
    };
    let (head, body) = (&message[..split + 2], &message[split + 4..]);
    let wanted = head
        .split(|b| *b == b'\n')
        .filter_map(|line| {
            let line = std::str::from_utf8(line).ok()?.trim_end();
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case(DIGEST_HEADER)
                .then(|| value.trim().to_string())
        })
        .next();
    match wanted {
        None => Integrity::Unchecked,
        Some(w) if w == digest(body) => Integrity::Intact,
        Some(_) => Integrity::Damaged,
    }
}

/// Weighted choices: `"a:3,b:1"` (weights optional, default 1).
#[derive(Debug, Clone)]
pub struct Weighted<T> {
    items: Vec<(T, u64)>,
    total: u64,
}

impl<T: Clone> Weighted<T> {
    pub fn parse(text: &str, item: impl Fn(&str) -> Result<T>) -> Result<Weighted<T>> {
        let mut items = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, weight) = match part.rsplit_once(':') {
                Some((name, weight)) => (
                    name,
                    weight
                        .parse::<u64>()
                        .with_context(|| format!("`{part}`: the weight must be a whole number"))?,
                ),
                None => (part, 1),
            };
            if weight == 0 {
                bail!("`{part}`: a weight must be at least 1");
            }
            items.push((item(name).with_context(|| format!("`{part}`"))?, weight));
        }
        if items.is_empty() {
            bail!("`{text}` names nothing");
        }
        let total = items.iter().map(|(_, w)| w).sum();
        Ok(Weighted { items, total })
    }

    pub fn from_items(items: Vec<T>) -> Weighted<T> {
        let total = items.len() as u64;
        Weighted {
            items: items.into_iter().map(|i| (i, 1)).collect(),
            total,
        }
    }

    /// Draws an item by weight from `r` in `0..total`.
    pub fn pick(&self, r: u64) -> &T {
        let mut r = r % self.total.max(1);
        for (item, weight) in &self.items {
            if r < *weight {
                return item;
            }
            r -= weight;
        }
        &self.items[0].0
    }

    pub fn total(&self) -> u64 {
        self.total
    }
}

/// A size such as `10240`, `10k`, `10KiB`, `1m`.
pub fn parse_size(text: &str) -> Result<usize> {
    let t = text.trim().to_ascii_lowercase();
    let (digits, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: usize = digits
        .parse()
        .with_context(|| format!("`{text}` is not a size such as 10240, 10k or 1m"))?;
    let mult = match unit.trim() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => 1 << 20,
        _ => bail!("`{text}` is not a size such as 10240, 10k or 1m"),
    };
    Ok(n * mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_messages_carry_a_digest_that_checks() {
        let m = message(7, 10_240, "a@s.test", "b@d.test");
        assert!((9_000..=10_500).contains(&m.len()), "{}", m.len());
        assert!(m.split(|b| *b == b'\n').all(|l| l.len() <= 80));
        assert_eq!(check(&m), Integrity::Intact);
        // A relay adding a header keeps it intact; a changed body does not.
        let mut relayed = b"Received: from x by y\r\n".to_vec();
        relayed.extend_from_slice(&m);
        assert_eq!(check(&relayed), Integrity::Intact);
        let mut damaged = m.clone();
        let last = damaged.len() - 3;
        damaged[last] ^= 1;
        assert_eq!(check(&damaged), Integrity::Damaged);
        assert_eq!(check(b"Subject: x\r\n\r\nbody\r\n"), Integrity::Unchecked);
        assert_eq!(
            check(&message(1, 0, "a@s.test", "b@d.test")),
            Integrity::Intact
        );
    }

    #[test]
    fn weights_and_sizes_parse_and_bad_ones_say_why() {
        let w = Weighted::parse("a.test:3, b.test", |s| Ok(s.to_string())).unwrap();
        assert_eq!(w.total(), 4);
        let picks: Vec<&String> = (0..4).map(|r| w.pick(r)).collect();
        assert_eq!(picks, ["a.test", "a.test", "a.test", "b.test"]);
        assert!(Weighted::parse("a:0", |s| Ok(s.to_string())).is_err());
        assert!(Weighted::parse("a:x", |s| Ok(s.to_string())).is_err());
        assert!(Weighted::parse(" , ", |s| Ok(s.to_string())).is_err());
        assert_eq!(parse_size("10k").unwrap(), 10_240);
        assert_eq!(parse_size("2MiB").unwrap(), 2 << 20);
        assert_eq!(parse_size("512").unwrap(), 512);
        let err = parse_size("10q").unwrap_err().to_string();
        assert!(err.contains("10q"), "{err}");
    }
}
