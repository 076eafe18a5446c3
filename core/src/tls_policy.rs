//! What a destination asks of delivery's TLS, as data: MTA-STS (RFC 8461) policies
//! and their `_mta-sts` TXT records, DANE (RFC 7672) TLSA records, TLS-RPT
//! (RFC 8460) `_smtp._tls` records, and the TLS a site's connections must use. No
//! I/O: the engine fetches, looks up and verifies.

use std::sync::Arc;

use crate::config::TlsMode;

/// The TLS a site's connections must use, beyond the ready queue's shaping.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SiteTls {
    /// The ready queue's shaping (`tls`) decides.
    #[default]
    Shaping,
    /// A static route's own mode.
    Mode(TlsMode),
    /// `domain` publishes an MTA-STS policy. Enforce: only the MX hosts the policy
    /// names (the site holds no others) and TLS with a certificate valid for the MX
    /// host name (WebPKI), or no delivery. Testing: as the shaping says, with what
    /// happened reported (TLS-RPT). The policy travels with the site: the shard
    /// that owns the site (and reports on its sessions) need not have fetched it.
    Sts {
        domain: Arc<str>,
        enforce: bool,
        policy: Arc<StsPolicy>,
    },
    /// DANE for the MX hosts of `domain` (its MX answer was DNSSEC-validated): per
    /// address of the site, in the site's order, what its TLSA records demand.
    Dane {
        domain: Arc<str>,
        hosts: Arc<[HostDane]>,
    },
}

impl SiteTls {
    /// Whether a failed handshake may be followed by a plaintext connection: never
    /// when the destination demands TLS (MTA-STS enforce, DANE, a required route).
    pub fn allows_plaintext_fallback(&self) -> bool {
        match self {
            SiteTls::Shaping | SiteTls::Sts { enforce: false, .. } => true,
            SiteTls::Mode(mode) => *mode == TlsMode::Opportunistic,
            SiteTls::Sts { enforce: true, .. } | SiteTls::Dane { .. } => false,
        }
    }

    /// Whether the site's `host`-th address must not be tried (DANE could not read
    /// its TLSA records).
    pub fn host_unreachable(&self, host: usize) -> bool {
        matches!(self, SiteTls::Dane { hosts, .. } if hosts.get(host) == Some(&HostDane::Unreachable))
    }

    /// The policy domain whose outcomes TLS-RPT reports, if any.
    pub fn policy_domain(&self) -> Option<&str> {
        match self {
            SiteTls::Sts { domain, .. } | SiteTls::Dane { domain, .. } => Some(domain),
            _ => None,
        }
    }

    /// What the site's name carries so that mail under different policies never
    /// shares a ready queue (empty for none).
    pub fn name_suffix(&self) -> String {
        match self {
            SiteTls::Shaping => String::new(),
            SiteTls::Mode(_) => String::new(),
            SiteTls::Sts {
                domain,
                enforce: true,
                ..
            } => format!(" (mta-sts {domain})"),
            SiteTls::Sts {
                domain,
                enforce: false,
                ..
            } => format!(" (mta-sts testing {domain})"),
            SiteTls::Dane { domain, .. } => format!(" (dane {domain})"),
        }
    }
}

/// What DANE demands of one MX host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostDane {
    /// No secure TLSA records (the host's zone is unsigned, or securely has none):
    /// the queue's shaping decides, as without DANE.
    Absent,
    /// A secure TLSA RRset with no usable record (RFC 7672 2.2: TLS is still a
    /// must, unauthenticated).
    EncryptOnly,
    /// Usable DANE-TA(2) and DANE-EE(3) records: TLS, and the server's chain must
    /// match one of them.
    Authenticate(Arc<[Tlsa]>),
    /// The TLSA lookup failed: the host is not tried (RFC 7672 2.2.3).
    Unreachable,
}

/// A TLSA record (RFC 6698).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tlsa {
    pub usage: u8,
    pub selector: u8,
    pub matching: u8,
    pub data: Vec<u8>,
}

impl Tlsa {
    /// DANE-TA(2) or DANE-EE(3), selector Cert(0) or SPKI(1), matching Full(0),
    /// SHA2-256(1) or SHA2-512(2): the records RFC 7672 3.1 lets SMTP use. PKIX-TA(0)
    /// and PKIX-EE(1) are unusable for SMTP (3.1.3).
    pub fn usable(&self) -> bool {
        matches!(self.usage, 2 | 3)
            && matches!(self.selector, 0 | 1)
            && match self.matching {
                0 => !self.data.is_empty(),
                1 => self.data.len() == 32,
                2 => self.data.len() == 64,
                _ => false,
            }
    }
}

/// An MTA-STS policy's mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StsMode {
    Enforce,
    Testing,
    None,
}

impl StsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            StsMode::Enforce => "enforce",
            StsMode::Testing => "testing",
            StsMode::None => "none",
        }
    }
}

/// An MTA-STS policy (RFC 8461 3.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StsPolicy {
    pub mode: StsMode,
    /// Lower case, without a trailing dot; `*.example.net` matches one label.
    pub mx: Vec<String>,
    pub max_age_secs: u64,
}

/// The longest max_age a policy may give (RFC 8461 3.2: about one year).
pub const STS_MAX_AGE_SECS_MAX: u64 = 31_557_600;

impl StsPolicy {
    /// Reads a policy file. Unknown keys are ignored (RFC 8461 3.2); a missing or
    /// bad version, mode or max_age, or no `mx` outside mode none, is an error.
    pub fn parse(text: &str) -> Result<StsPolicy, String> {
        let (mut version, mut mode, mut max_age) = (None, None, None);
        let mut mx = Vec::new();
        for line in text.lines() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() {
                continue;
            }
            let Some((key, value)) = line.split_once(':') else {
                return Err(format!("line `{}` is not `key: value`", clip(line)));
            };
            let value = value.trim();
            match key.trim() {
                "version" => version = Some(value.to_string()),
                "mode" => {
                    mode = Some(match value {
                        "enforce" => StsMode::Enforce,
                        "testing" => StsMode::Testing,
                        "none" => StsMode::None,
                        other => return Err(format!("unknown mode `{}`", clip(other))),
                    })
                }
                "max_age" => {
                    let secs = value
                        .parse::<u64>()
                        .ok()
                        .filter(|s| *s <= STS_MAX_AGE_SECS_MAX && value.len() <= 10)
                        .ok_or_else(|| format!("max_age `{}` is not 0..31557600", clip(value)))?;
                    max_age = Some(secs);
                }
                "mx" => {
                    let pattern = value.trim_end_matches('.').to_ascii_lowercase();
                    let name = pattern.strip_prefix("*.").unwrap_or(&pattern);
                    if !crate::config::is_dns_name(name) {
                        return Err(format!("mx `{}` is not a host name pattern", clip(value)));
                    }
                    mx.push(pattern);
                }
                _ => {}
            }
        }
        match version.as_deref() {
            Some("STSv1") => {}
            Some(other) => return Err(format!("version `{}` is not STSv1", clip(other))),
            None => return Err("no version".into()),
        }
        let mode = mode.ok_or("no mode")?;
        let max_age_secs = max_age.ok_or("no max_age")?;
        if mx.is_empty() && mode != StsMode::None {
            return Err("no mx".into());
        }
        Ok(StsPolicy {
            mode,
            mx,
            max_age_secs,
        })
    }

    /// Whether MX host `host` is one the policy names (RFC 8461 4.1).
    pub fn matches(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.mx
            .iter()
            .any(|pattern| match pattern.strip_prefix("*.") {
                Some(parent) => host
                    .split_once('.')
                    .is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
                None => *pattern == host,
            })
    }

    /// The policy as served (for the cache file and TLS-RPT's `policy-string`).
    pub fn lines(&self) -> Vec<String> {
        let mut out = vec![
            "version: STSv1".to_string(),
            format!("mode: {}", self.mode.as_str()),
        ];
        out.extend(self.mx.iter().map(|m| format!("mx: {m}")));
        out.push(format!("max_age: {}", self.max_age_secs));
        out
    }
}

/// At most 64 characters of untrusted text, for an error (cut at a character).
fn clip(text: &str) -> String {
    text.chars().take(64).collect()
}

/// The `id` of a domain's `_mta-sts` TXT records (RFC 8461 3.1): exactly one record
/// starting `v=STSv1;` (others are ignored), with an id of 1 to 32 letters and
/// digits. None: the domain has no usable record.
pub fn sts_record_id(records: &[String]) -> Option<String> {
    let mut ours = records
        .iter()
        .filter(|r| r.starts_with("v=STSv1;") || r.as_str() == "v=STSv1");
    let record = ours.next()?;
    if ours.next().is_some() {
        return None;
    }
    let mut id = None;
    for field in record.split(';').skip(1) {
        let field = field.trim_matches([' ', '\t']);
        if field.is_empty() {
            continue;
        }
        let (key, value) = field.split_once('=')?;
        if key == "id" {
            let ok =
                (1..=32).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_alphanumeric());
            if !ok || id.is_some() {
                return None;
            }
            id = Some(value.to_string());
        }
    }
    id
}

/// The report addresses of a domain's `_smtp._tls` TXT records (RFC 8460 3):
/// exactly one record starting `v=TLSRPTv1`, whose `rua` lists `mailto:` and
/// `https:` URIs. None: the domain asks for no reports.
pub fn tlsrpt_rua(records: &[String]) -> Option<Vec<String>> {
    let mut ours = records.iter().filter(|r| {
        r.strip_prefix("v=TLSRPTv1")
            .is_some_and(|rest| rest.trim_start().starts_with(';') || rest.trim().is_empty())
    });
    let record = ours.next()?;
    if ours.next().is_some() {
        return None;
    }
    let mut rua = None;
    for field in record.split(';').skip(1) {
        let field = field.trim_matches([' ', '\t']);
        if let Some(value) = field.strip_prefix("rua=") {
            let uris: Vec<String> = value
                .split(',')
                .map(|u| u.trim().to_string())
                .filter(|u| {
                    u.get(..7)
                        .is_some_and(|p| p.eq_ignore_ascii_case("mailto:"))
                        || u.get(..8)
                            .is_some_and(|p| p.eq_ignore_ascii_case("https://"))
                })
                .collect();
            rua = Some(uris);
        }
    }
    rua.filter(|r| !r.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_reads_as_rfc_8461_writes_it() {
        let p = StsPolicy::parse(
            "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.Example.NET.\r\nmax_age: 86400\r\nextension: ignored\r\n",
        )
        .unwrap();
        assert_eq!(p.mode, StsMode::Enforce);
        assert_eq!(p.max_age_secs, 86400);
        assert!(p.matches("MAIL.example.com."));
        assert!(p.matches("mx1.example.net"));
        assert!(!p.matches("a.b.example.net"), "a wildcard is one label");
        assert!(!p.matches("example.net"));
        assert!(!p.matches("mail.example.com.evil"));
        assert_eq!(StsPolicy::parse(&p.lines().join("\n")).unwrap(), p);
        let none = StsPolicy::parse("version: STSv1\nmode: none\nmax_age: 0\n").unwrap();
        assert_eq!(none.mode, StsMode::None);
        for (bad, why) in [
            ("mode: enforce\nmx: a.b\nmax_age: 1", "no version"),
            (
                "version: STSv2\nmode: enforce\nmx: a.b\nmax_age: 1",
                "not STSv1",
            ),
            (
                "version: STSv1\nmode: strict\nmx: a.b\nmax_age: 1",
                "unknown mode",
            ),
            ("version: STSv1\nmode: enforce\nmax_age: 1", "no mx"),
            ("version: STSv1\nmode: enforce\nmx: a.b", "no max_age"),
            (
                "version: STSv1\nmode: enforce\nmx: a.b\nmax_age: -1",
                "max_age",
            ),
            (
                "version: STSv1\nmode: enforce\nmx: a.b\nmax_age: 99999999999999999999",
                "max_age",
            ),
            (
                "version: STSv1\nmode: enforce\nmx: a b\nmax_age: 1",
                "not a host name",
            ),
            (
                "version: STSv1\nmode: enforce\nmx: *.\nmax_age: 1",
                "not a host name",
            ),
            ("<html>é</html>", "not `key: value`"),
        ] {
            let err = StsPolicy::parse(bad).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }

    #[test]
    fn txt_records_give_an_id_or_nothing() {
        let one = |r: &str| sts_record_id(&[r.to_string()]);
        assert_eq!(
            one("v=STSv1; id=20160831085700Z;"),
            Some("20160831085700Z".into())
        );
        assert_eq!(one("v=STSv1;id=abc"), Some("abc".into()));
        assert_eq!(one("v=STSv1; id=bad-id;"), None);
        assert_eq!(one("v=STSv1; id=;"), None);
        assert_eq!(one("v=STSv1;"), None);
        assert_eq!(one("v=spf1 -all"), None);
        assert_eq!(one(&format!("v=STSv1; id={}", "a".repeat(33))), None);
        let two = ["v=STSv1; id=a".to_string(), "v=STSv1; id=b".to_string()];
        assert_eq!(sts_record_id(&two), None, "two records: no policy");
        let other = ["v=spf1 -all".to_string(), "v=STSv1; id=a".to_string()];
        assert_eq!(sts_record_id(&other), Some("a".into()));
    }

    #[test]
    fn tlsrpt_records_give_mailto_and_https_addresses() {
        let one = |r: &str| tlsrpt_rua(&[r.to_string()]);
        assert_eq!(
            one("v=TLSRPTv1; rua=mailto:tls@example.com,https://r.example.com/v1"),
            Some(vec![
                "mailto:tls@example.com".to_string(),
                "https://r.example.com/v1".to_string()
            ])
        );
        assert_eq!(one("v=TLSRPTv1;rua=ftp://x"), None);
        assert_eq!(one("v=TLSRPTv1"), None);
        assert_eq!(one("v=TLSRPTv10; rua=mailto:a@b"), None);
        let two = [
            "v=TLSRPTv1; rua=mailto:a@b".to_string(),
            "v=TLSRPTv1; rua=mailto:c@d".to_string(),
        ];
        assert_eq!(tlsrpt_rua(&two), None);
    }

    #[test]
    fn only_dane_ta_and_ee_records_are_usable() {
        let r = |usage, selector, matching, len| Tlsa {
            usage,
            selector,
            matching,
            data: vec![0; len],
        };
        assert!(r(3, 1, 1, 32).usable());
        assert!(r(2, 0, 2, 64).usable());
        assert!(r(3, 0, 0, 300).usable());
        assert!(!r(1, 1, 1, 32).usable(), "PKIX-EE");
        assert!(!r(0, 1, 1, 32).usable(), "PKIX-TA");
        assert!(!r(3, 1, 1, 31).usable(), "short digest");
        assert!(!r(3, 2, 1, 32).usable());
        assert!(!r(3, 1, 3, 32).usable());
        assert!(SiteTls::Shaping.allows_plaintext_fallback());
        let enforce = SiteTls::Sts {
            domain: "a.test".into(),
            enforce: true,
            policy: Arc::new(
                StsPolicy::parse("version: STSv1\nmode: enforce\nmx: a.b\nmax_age: 1").unwrap(),
            ),
        };
        assert!(!enforce.allows_plaintext_fallback());
        assert_eq!(enforce.policy_domain(), Some("a.test"));
        assert!(!SiteTls::Mode(TlsMode::Required).allows_plaintext_fallback());
    }
}
