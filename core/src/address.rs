//! Paths and parameters of MAIL FROM and RCPT TO (RFC 5321 4.1.2, RFC 6531).
//!
//! Only the forms a real client sends are accepted: `<local@domain>` with a dot-atom
//! or quoted-string local part and a host name or address literal as the domain.
//! Source routes (`<@a,@b:user@c>`) are accepted and their route dropped, as RFC 5321
//! asks of servers.

use crate::reply::{self, Reply};

/// RFC 5321 4.5.3.1 size limits (octets).
pub const LOCAL_PART_BYTES_MAX: usize = 64;
pub const DOMAIN_BYTES_MAX: usize = 255;
pub const PATH_BYTES_MAX: usize = 256;

/// An envelope address as accepted: the text between the angle brackets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// `local@domain`; empty only for the null reverse-path `<>`.
    pub text: String,
}

impl Address {
    pub fn null() -> Address {
        Address {
            text: String::new(),
        }
    }

    pub fn is_ascii(&self) -> bool {
        self.text.is_ascii()
    }
}

/// Splits `<path> params…` (after `FROM:` or `TO:`) into the path and parameter text.
/// Tolerates a space after the colon, as most servers do.
pub fn split_path(args: &str) -> Result<(&str, &str), Reply> {
    let args = args.trim_start();
    if !args.starts_with('<') {
        return Err(Reply::fixed(501, "5.1.7", "address must be enclosed in <>"));
    }
    let close =
        args.find('>')
            .ok_or(Reply::fixed(501, "5.1.7", "address must be enclosed in <>"))?;
    let path = &args[1..close];
    let rest = &args[close + 1..];
    if !rest.is_empty() && !rest.starts_with(' ') {
        return Err(reply::SYNTAX);
    }
    Ok((path, rest.trim()))
}

/// Parses the inside of `<…>`. `allow_null` for MAIL FROM.
pub fn parse_path(path: &str, allow_null: bool) -> Result<Address, Reply> {
    if path.is_empty() {
        return if allow_null {
            Ok(Address::null())
        } else {
            Err(Reply::fixed(
                501,
                "5.1.3",
                "a recipient address cannot be empty",
            ))
        };
    }
    if path.len() > PATH_BYTES_MAX - 2 {
        return Err(Reply::fixed(501, "5.1.3", "address too long"));
    }
    // Drop an obsolete source route.
    let path = if path.starts_with('@') {
        match path.find(':') {
            Some(i) => &path[i + 1..],
            None => return Err(bad_address()),
        }
    } else {
        path
    };
    let at = local_part_end(path).ok_or_else(bad_address)?;
    let (local, domain) = (&path[..at], &path[at + 1..]);
    if local.len() > LOCAL_PART_BYTES_MAX {
        return Err(Reply::fixed(501, "5.1.3", "local part too long"));
    }
    if domain.len() > DOMAIN_BYTES_MAX {
        return Err(Reply::fixed(501, "5.1.2", "domain too long"));
    }
    if !valid_domain(domain) {
        return Err(Reply::fixed(501, "5.1.2", "bad domain syntax"));
    }
    Ok(Address {
        text: path.to_string(),
    })
}

fn bad_address() -> Reply {
    Reply::fixed(501, "5.1.3", "bad address syntax")
}

/// Validates the local part and returns the index of the `@` after it.
fn local_part_end(path: &str) -> Option<usize> {
    let bytes = path.as_bytes();
    if bytes.first() == Some(&b'"') {
        // quoted-string: qtext or quoted-pair, then the closing quote and '@'.
        let mut i = 1;
        while i < bytes.len() {
            match bytes[i] {
                b'\\' if i + 1 < bytes.len() && (32..127).contains(&bytes[i + 1]) => i += 2,
                b'"' => {
                    return (i > 1 && bytes.get(i + 1) == Some(&b'@')).then_some(i + 1);
                }
                32 | 33 | 35..=91 | 93..=126 => i += 1,
                128.. => i += 1,
                _ => return None,
            }
        }
        return None;
    }
    let at = path.rfind('@')?;
    let local = &path[..at];
    let atom_ok = local
        .split('.')
        .all(|atom| !atom.is_empty() && atom.bytes().all(is_atext));
    atom_ok.then_some(at)
}

fn is_atext(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b) || b >= 128
}

fn valid_domain(domain: &str) -> bool {
    if let Some(literal) = domain.strip_prefix('[') {
        let Some(literal) = literal.strip_suffix(']') else {
            return false;
        };
        if let Some(v6) = literal.strip_prefix("IPv6:") {
            return v6.parse::<std::net::Ipv6Addr>().is_ok();
        }
        return literal.parse::<std::net::Ipv4Addr>().is_ok();
    }
    !domain.is_empty() && domain.split('.').all(|label| valid_label(label, true))
}

/// Whether `name` is a domain name DNS can be asked about: labels of ASCII letters,
/// digits and hyphens ([`valid_label`]), 253 bytes at most; no address literal.
pub fn is_dns_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 253 && name.split('.').all(|l| valid_label(l, false))
}

/// One label of a domain name: 1 to 63 letters, digits or hyphens, no hyphen at
/// either end; with `utf8`, also bytes of non-ASCII characters (SMTPUTF8 names).
fn valid_label(label: &str, utf8: bool) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && !label.starts_with('-')
        && !label.ends_with('-')
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || (utf8 && b >= 128))
}

/// `KEY=value` parameters of MAIL and RCPT, keys upper-cased.
pub fn parse_params(params: &str) -> Result<Vec<(String, Option<&str>)>, Reply> {
    let mut out = Vec::new();
    for param in params.split(' ').filter(|p| !p.is_empty()) {
        let (key, value) = match param.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (param, None),
        };
        if key.is_empty()
            || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            || value.is_some_and(|v| v.is_empty() || v.bytes().any(|b| !(33..127).contains(&b)))
        {
            return Err(reply::SYNTAX);
        }
        out.push((key.to_ascii_uppercase(), value));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(args: &str, expected: Result<(&str, &str), u16>) {
        let got = split_path(args)
            .and_then(|(path, rest)| parse_path(path, true).map(|a| (a, rest.to_string())));
        match (got, expected) {
            (Ok((addr, rest)), Ok((text, params))) => {
                assert_eq!(
                    (addr.text.as_str(), rest.as_str()),
                    (text, params),
                    "{args}"
                )
            }
            (Err(reply), Err(code)) => assert_eq!(reply.code, code, "{args}"),
            (got, expected) => panic!("{args}: got {got:?}, expected {expected:?}"),
        }
    }

    #[test]
    fn paths() {
        check("<a@b.test>", Ok(("a@b.test", "")));
        check(" <a@b.test>", Ok(("a@b.test", "")));
        check(
            "<a@b.test> SIZE=10 BODY=8BITMIME",
            Ok(("a@b.test", "SIZE=10 BODY=8BITMIME")),
        );
        check("<>", Ok(("", "")));
        check("<\"a b\"@b.test>", Ok(("\"a b\"@b.test", "")));
        check("<@r1.test,@r2.test:a@b.test>", Ok(("a@b.test", "")));
        check(
            "<first.last+tag@sub.b-c.test>",
            Ok(("first.last+tag@sub.b-c.test", "")),
        );
        check("<a@[192.0.2.1]>", Ok(("a@[192.0.2.1]", "")));
        check("<a@[IPv6:2001:db8::1]>", Ok(("a@[IPv6:2001:db8::1]", "")));
        check("<ü@bücher.test>", Ok(("ü@bücher.test", "")));
        check("a@b.test", Err(501));
        check("<a@b.test", Err(501));
        check("<a@b.test>x", Err(501));
        check("<a@>", Err(501));
        check("<@b.test>", Err(501));
        check("<a..b@b.test>", Err(501));
        check("<.a@b.test>", Err(501));
        check("<a b@b.test>", Err(501));
        check("<a@b..test>", Err(501));
        check("<a@-b.test>", Err(501));
        check("<a@b_c.test>", Err(501));
        check("<a@[300.1.1.1]>", Err(501));
        check("<a@b.test@c.test>", Err(501));
        check(&format!("<{}@b.test>", "a".repeat(65)), Err(501));
        check(&format!("<a@{}.test>", "b".repeat(64)), Err(501));
        check(&format!("<a@{}>", "b.".repeat(130)), Err(501));
    }

    #[test]
    fn params() {
        assert_eq!(
            parse_params("size=10 SMTPUTF8").unwrap(),
            vec![
                ("SIZE".to_string(), Some("10")),
                ("SMTPUTF8".to_string(), None)
            ]
        );
        assert!(parse_params("SIZE=").is_err());
        assert!(parse_params("=1").is_err());
        assert!(parse_params("A_B=1").is_err());
    }

    #[test]
    fn dns_names_are_ascii_labels_without_edge_hyphens() {
        for good in ["example.com", "a-b.example", "xn--bcher-kva.example", "x"] {
            assert!(is_dns_name(good), "{good}");
        }
        let long = format!("{}.example", "a".repeat(64));
        let too_long = vec!["a".repeat(63); 5].join(".");
        for bad in [
            "",
            "a..b",
            "example.com.",
            "-a.example",
            "a-.example",
            "[10.0.0.1]",
            "b\u{fc}cher.example",
            "a b.example",
            long.as_str(),
            too_long.as_str(),
        ] {
            assert!(!is_dns_name(bad), "{bad}");
        }
        // An SMTP address's domain may be a U-label or a literal.
        assert!(valid_domain("b\u{fc}cher.example") && valid_domain("[10.0.0.1]"));
    }
}
