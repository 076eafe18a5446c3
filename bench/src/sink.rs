//! The smart sink's rules and counters: what to answer per recipient domain (accept,
//! a percentage of 4xx or 5xx with realistic provider texts, latency per SMTP phase,
//! dropping the connection in DATA), and what was received (per domain, per reply
//! code, and whether each message arrived intact).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// The sink's configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SinkConfig {
    /// Rules for every domain without its own.
    pub default: Rule,
    /// Rules by recipient domain (lower-case).
    pub domains: BTreeMap<String, Rule>,
    pub responses: Responses,
}

/// What the sink does for one recipient domain.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Rule {
    /// Recipients answered with a 4xx at RCPT, in percent.
    pub tempfail_percent: f64,
    /// Recipients answered with a 5xx at RCPT, in percent.
    pub permfail_percent: f64,
    /// Transactions whose connection is dropped in DATA (no final reply), in percent.
    pub drop_in_data_percent: f64,
    /// Delay before each reply, per phase, in milliseconds.
    pub latency_ms: Latency,
    /// Messages one connection may send to the domain per minute (0: no limit);
    /// past it, RCPT gets a provider's 421 rate-limit reply and the connection is
    /// closed (the provider-throttling scenario).
    pub messages_per_minute_per_connection: u64,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Latency {
    pub banner: u64,
    pub ehlo: u64,
    pub mail: u64,
    pub rcpt: u64,
    /// Before the reply to the end of data.
    pub data: u64,
}

/// Reply texts, one drawn at random per refusal. Each must start with its code.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Responses {
    pub tempfail: Vec<String>,
    pub permfail: Vec<String>,
}

impl Default for Responses {
    /// Texts modelled on what large mailbox providers answer.
    fn default() -> Self {
        Responses {
            tempfail: vec![
                "451 4.7.28 Our system has detected an unusual rate of unsolicited mail originating from your IP address. To protect our users from spam, mail sent from your IP address has been temporarily rate limited.".into(),
                "421 4.7.0 [TSS04] Messages from this IP temporarily deferred due to unexpected volume or user complaints".into(),
                "451 4.3.0 Mail server temporarily rejected message.".into(),
                "452 4.2.2 The email account that you tried to reach is over quota.".into(),
            ],
            permfail: vec![
                "550 5.1.1 The email account that you tried to reach does not exist.".into(),
                "554 5.7.1 [P2] Message blocked due to spam content in the message.".into(),
                "550 5.7.26 This mail has been blocked because the sender is unauthenticated.".into(),
                "552 5.2.2 The recipient's mailbox is full and can't accept messages now.".into(),
            ],
        }
    }
}

impl SinkConfig {
    pub fn load(path: &Path) -> Result<SinkConfig> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let config: SinkConfig =
            toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<()> {
        let rules = std::iter::once(("default", &self.default))
            .chain(self.domains.iter().map(|(d, r)| (d.as_str(), r)));
        for (name, rule) in rules {
            for (key, v) in [
                ("tempfail_percent", rule.tempfail_percent),
                ("permfail_percent", rule.permfail_percent),
                ("drop_in_data_percent", rule.drop_in_data_percent),
            ] {
                if !(0.0..=100.0).contains(&v) {
                    bail!("{name}.{key}: {v} is not a percentage (0 to 100)");
                }
            }
            if rule.tempfail_percent + rule.permfail_percent > 100.0 {
                bail!("{name}: tempfail_percent + permfail_percent pass 100");
            }
        }
        for (key, list, class) in [
            ("tempfail", &self.responses.tempfail, '4'),
            ("permfail", &self.responses.permfail, '5'),
        ] {
            if list.is_empty() {
                bail!("responses.{key}: needs at least one reply");
            }
            for text in list {
                let ok = text.len() >= 4
                    && text.starts_with(class)
                    && text.as_bytes()[..3].iter().all(u8::is_ascii_digit)
                    && text.as_bytes()[3] == b' ';
                if !ok {
                    bail!(
                        "responses.{key}: `{text}` does not start with a {class}xx code and a space"
                    );
                }
            }
        }
        Ok(())
    }

    /// The rule for a recipient domain.
    pub fn rule(&self, domain: &str) -> &Rule {
        self.domains.get(domain).unwrap_or(&self.default)
    }
}

/// What the sink answers to one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Refuse(String),
}

/// The reply past a domain's messages_per_minute_per_connection: Gmail's.
pub const RATE_LIMITED: &str = "421 4.7.28 Our system has detected an unusual rate of unsolicited mail originating from your IP address. To protect our users from spam, mail sent from your IP address has been temporarily rate limited.";

/// A connection's messages per domain within the last minute.
#[derive(Debug, Default)]
pub struct ConnectionRate {
    sent: BTreeMap<String, std::collections::VecDeque<std::time::Instant>>,
}

impl ConnectionRate {
    /// Counts a message to `domain` at `now` if the connection may send one more
    /// within `per_minute` (0: no limit); false when it may not.
    pub fn admit(&mut self, domain: &str, per_minute: u64, now: std::time::Instant) -> bool {
        if per_minute == 0 {
            return true;
        }
        let times = self.sent.entry(domain.to_string()).or_default();
        while times
            .front()
            .is_some_and(|t| now.duration_since(*t) >= std::time::Duration::from_secs(60))
        {
            times.pop_front();
        }
        if times.len() as u64 >= per_minute {
            return false;
        }
        times.push_back(now);
        true
    }
}

/// Decides a recipient: `tempfail@` and `permfail@` always fail, others by the
/// domain's percentages (`roll` uniform in 0..100).
pub fn verdict(config: &SinkConfig, rcpt: &str, roll: f64, pick: usize) -> Verdict {
    let (local, domain) = rcpt.rsplit_once('@').unwrap_or((rcpt, ""));
    let r = &config.responses;
    let choose = |list: &Vec<String>| list[pick % list.len()].clone();
    if local.eq_ignore_ascii_case("tempfail") {
        return Verdict::Refuse(choose(&r.tempfail));
    }
    if local.eq_ignore_ascii_case("permfail") {
        return Verdict::Refuse(choose(&r.permfail));
    }
    let rule = config.rule(&domain.to_ascii_lowercase());
    if roll < rule.tempfail_percent {
        Verdict::Refuse(choose(&r.tempfail))
    } else if roll < rule.tempfail_percent + rule.permfail_percent {
        Verdict::Refuse(choose(&r.permfail))
    } else {
        Verdict::Accept
    }
}

/// Counters for one domain.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DomainCounts {
    pub rcpt_accepted: u64,
    pub rcpt_tempfailed: u64,
    pub rcpt_permfailed: u64,
    /// Messages received (final 250), counted once per recipient domain.
    pub messages: u64,
    /// Accepted recipients of received messages.
    pub recipients: u64,
    /// Transactions dropped in DATA on purpose.
    pub dropped: u64,
    /// 421s for passing messages_per_minute_per_connection.
    #[serde(default)]
    pub rate_limited: u64,
}

/// Everything the sink counted.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counts {
    pub sessions: u64,
    pub messages: u64,
    pub bytes: u64,
    /// Messages whose digest header matched their body, did not, or had none.
    pub intact: u64,
    pub damaged: u64,
    pub unchecked: u64,
    pub dropped: u64,
    /// Sessions that started TLS (STARTTLS, when the sink has a certificate).
    #[serde(default)]
    pub tls_sessions: u64,
    /// Replies by code (RCPT verdicts and final replies).
    pub replies: BTreeMap<u16, u64>,
    pub domains: BTreeMap<String, DomainCounts>,
}

impl Counts {
    pub fn add(&mut self, other: &Counts) {
        self.sessions += other.sessions;
        self.messages += other.messages;
        self.bytes += other.bytes;
        self.intact += other.intact;
        self.damaged += other.damaged;
        self.unchecked += other.unchecked;
        self.dropped += other.dropped;
        self.tls_sessions += other.tls_sessions;
        for (code, n) in &other.replies {
            *self.replies.entry(*code).or_default() += n;
        }
        for (domain, c) in &other.domains {
            let d = self.domains.entry(domain.clone()).or_default();
            d.rcpt_accepted += c.rcpt_accepted;
            d.rcpt_tempfailed += c.rcpt_tempfailed;
            d.rcpt_permfailed += c.rcpt_permfailed;
            d.messages += c.messages;
            d.recipients += c.recipients;
            d.dropped += c.dropped;
            d.rate_limited += c.rate_limited;
        }
    }

    pub fn domain(&mut self, domain: &str) -> &mut DomainCounts {
        if !self.domains.contains_key(domain) {
            self.domains
                .insert(domain.to_string(), DomainCounts::default());
        }
        self.domains.get_mut(domain).expect("inserted")
    }

    /// Recipients answered (accepted, refused for now or for good).
    pub fn tried(&self) -> u64 {
        (self.domains.values())
            .map(|d| d.rcpt_accepted + d.rcpt_tempfailed + d.rcpt_permfailed)
            .sum()
    }

    pub fn reply(&mut self, code: u16) {
        *self.replies.entry(code).or_default() += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_follow_the_domain_rules_and_special_local_parts() {
        let config: SinkConfig = toml::from_str(
            "[domains.\"slow.test\"]\ntempfail_percent = 10\npermfail_percent = 5\n",
        )
        .unwrap();
        config.check().unwrap();
        assert_eq!(verdict(&config, "a@fast.test", 0.0, 0), Verdict::Accept);
        assert!(
            matches!(verdict(&config, "a@slow.test", 9.9, 0), Verdict::Refuse(t) if t.starts_with('4'))
        );
        assert!(
            matches!(verdict(&config, "a@SLOW.test", 14.9, 1), Verdict::Refuse(t) if t.starts_with('5'))
        );
        assert_eq!(verdict(&config, "a@slow.test", 15.0, 0), Verdict::Accept);
        assert!(
            matches!(verdict(&config, "tempfail@fast.test", 99.0, 2), Verdict::Refuse(t) if t.starts_with("4"))
        );
        assert!(
            matches!(verdict(&config, "PermFail@fast.test", 99.0, 3), Verdict::Refuse(t) if t.starts_with("5"))
        );
    }

    #[test]
    fn a_connection_s_rate_is_counted_per_domain_over_a_minute() {
        let mut rate = ConnectionRate::default();
        let t0 = std::time::Instant::now();
        assert!(rate.admit("a.test", 2, t0));
        assert!(rate.admit("a.test", 2, t0));
        assert!(!rate.admit("a.test", 2, t0));
        assert!(rate.admit("b.test", 2, t0), "per domain");
        assert!(rate.admit("a.test", 0, t0), "no limit");
        assert!(rate.admit("a.test", 2, t0 + std::time::Duration::from_secs(60)));
    }

    #[test]
    fn bad_configs_name_the_key() {
        let bad = [
            (
                "[default]\ntempfail_percent = 120\n",
                "default.tempfail_percent",
            ),
            (
                "[domains.\"x.test\"]\ntempfail_percent = 60\npermfail_percent = 50\n",
                "x.test",
            ),
            (
                "[responses]\ntempfail = [\"550 5.0.0 no\"]\n",
                "responses.tempfail",
            ),
            ("[responses]\npermfail = []\n", "responses.permfail"),
        ];
        for (text, needle) in bad {
            let config: SinkConfig = toml::from_str(text).unwrap();
            let err = config.check().unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
        assert!(toml::from_str::<SinkConfig>("[default]\nbogus = 1\n").is_err());
    }
}
