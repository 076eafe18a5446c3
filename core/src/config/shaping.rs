//! Traffic shaping in the configuration: the knobs of a ready queue
//! (`egress_source->site_name`), their defaults, and provider rules that change them
//! for sites whose MX hosts end in a suffix. These can be changed while gannetd runs
//! (SIGHUP reloads them from the configuration file).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::Bounded;

/// Shaping knobs. Every one is optional: the defaults fill what `delivery.shaping`
/// leaves out, and a provider rule sets only what it names.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Knobs {
    /// Connections at once from one egress source to one site.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_limit: Option<Bounded<1, 10_000>>,
    /// Messages sent over one connection before it is closed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_deliveries_per_connection: Option<Bounded<1, 1_000_000>>,
    /// Recipients per SMTP transaction.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_recipients_per_batch: Option<Bounded<1, 100_000>>,
    /// Messages per time unit to the site (`"100/s"`, `"2000/min"`, `"50000/h"`,
    /// `"unlimited"`), with bursts up to the count.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_message_rate: Option<Rate>,
    /// New connections per time unit to the site.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connection_rate: Option<Rate>,
    /// Parts waiting in the ready queue; past it, a part is delayed (returned to its
    /// scheduled queue with a Delayed event).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_ready: Option<Bounded<1, 100_000_000>>,
    /// Timeouts per SMTP phase, in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_timeout_secs: Option<Bounded<1, 3600>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub banner_timeout_secs: Option<Bounded<1, 3600>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ehlo_timeout_secs: Option<Bounded<1, 3600>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub starttls_timeout_secs: Option<Bounded<1, 3600>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mail_from_timeout_secs: Option<Bounded<1, 3600>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rcpt_to_timeout_secs: Option<Bounded<1, 3600>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_timeout_secs: Option<Bounded<1, 3600>>,
    /// From the end of the message to the final reply.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dot_timeout_secs: Option<Bounded<1, 3600>>,
    /// How long a connection with nothing to send stays open for the queue's next
    /// message before it says QUIT (0: at once).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_timeout_secs: Option<Bounded<0, 3600>>,
    /// To a pipelining server, send the next message's MAIL, RCPT and DATA in the same
    /// write as a message's end of data (RFC 2920 3.1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pipeline_next_message: Option<bool>,
    /// Connection failures in a row (no host of the site could be reached, or every
    /// one refused the session) after which every part waiting in the ready queue is
    /// deferred. Before that, each failed connection defers one part.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_failures_max: Option<Bounded<1, 1000>>,
    /// After a failed connection no new one is opened for 1 s, doubled for each
    /// further failure in a row, up to this.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_backoff_max_secs: Option<Bounded<1, 86_400>>,
    /// Adaptive backoff without a rule: when at least this percentage of a ready
    /// queue's attempts in one interval failed temporarily (no connection, a 421, a
    /// transaction with only 4xx replies), its connection_limit is halved (and its
    /// max_message_rate with it); each interval with under half that share adds one
    /// connection back, up to the configured limit. 0: off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backoff_failure_percent: Option<Bounded<0, 100>>,
    /// The interval over which attempts are counted; the limit changes at most once
    /// per interval.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backoff_interval_secs: Option<Bounded<1, 3600>>,
    /// STARTTLS toward the site: "disabled", "opportunistic" or "required". Unset:
    /// `delivery.tls`. A destination's own policy (MTA-STS enforce, DANE, a route's
    /// mode) goes over it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<super::TlsMode>,
    /// In opportunistic mode, when the TLS handshake fails after the server accepted
    /// STARTTLS, connect to the same host again and deliver without TLS (KumoMTA's
    /// `opportunistic_tls_reconnect_on_failed_handshake`). Never for a destination
    /// under MTA-STS enforce or DANE, or whose mode is required.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub opportunistic_tls_reconnect_on_failed_handshake: Option<bool>,
    /// The retry schedule and maximum age of the mail to the provider's sites, over
    /// `delivery`'s (a scheduled queue's rule, `delivery.queues`, goes over these).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_interval_secs: Option<Bounded<1, 31_536_000>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_retry_interval_secs: Option<Bounded<1, 31_536_000>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_age_secs: Option<Bounded<1, 31_536_000>>,
}

impl Knobs {
    /// The knobs set, as `name=value` words (`connection_limit=1
    /// max_message_rate=10/min`), for events and the admin API.
    pub fn describe(&self) -> String {
        let Ok(toml::Value::Table(set)) = toml::Value::try_from(self) else {
            return String::new();
        };
        let words: Vec<String> = (set.iter())
            .map(|(name, value)| match value {
                toml::Value::String(text) => format!("{name}={text}"),
                other => format!("{name}={other}"),
            })
            .collect();
        words.join(" ")
    }

    /// The defaults (documented in default.toml).
    pub fn builtin() -> Knobs {
        Knobs {
            connection_limit: Some(Bounded(32)),
            max_deliveries_per_connection: Some(Bounded(1024)),
            max_recipients_per_batch: Some(Bounded(100)),
            max_message_rate: Some(Rate::Unlimited),
            max_connection_rate: Some(Rate::Unlimited),
            max_ready: Some(Bounded(1_000_000)),
            connect_timeout_secs: Some(Bounded(30)),
            banner_timeout_secs: Some(Bounded(60)),
            ehlo_timeout_secs: Some(Bounded(60)),
            starttls_timeout_secs: Some(Bounded(60)),
            mail_from_timeout_secs: Some(Bounded(300)),
            rcpt_to_timeout_secs: Some(Bounded(300)),
            data_timeout_secs: Some(Bounded(120)),
            data_dot_timeout_secs: Some(Bounded(600)),
            idle_timeout_secs: Some(Bounded(60)),
            pipeline_next_message: Some(true),
            connection_failures_max: Some(Bounded(3)),
            connection_backoff_max_secs: Some(Bounded(300)),
            backoff_failure_percent: Some(Bounded(0)),
            backoff_interval_secs: Some(Bounded(60)),
            // From delivery.tls (ShapingTable::new).
            tls: None,
            opportunistic_tls_reconnect_on_failed_handshake: Some(false),
            // From delivery's retry schedule (queue::settle::retry_policy).
            retry_interval_secs: None,
            max_retry_interval_secs: None,
            max_age_secs: None,
        }
    }
}

/// A rule for the sites of one provider.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Provider {
    /// The rule applies to a site when one of its MX host names ends with one of these
    /// (case-insensitive; e.g. `".google.com"`).
    pub mx_suffix: Vec<String>,
    /// Only for these egress sources; empty: every source.
    pub sources: Vec<String>,
    pub shaping: Knobs,
    /// Response rules for the provider's sites (adaptive delivery).
    pub automation: Vec<super::automation::Automation>,
    /// Limits over all the provider's sites together, for each egress source
    /// (KumoMTA's `provider_connection_limit` and `provider_max_message_rate`): a
    /// [`SharedLimit`] named `provider:<name>`, `per = "source"`.
    pub provider_connection_limit: Option<Bounded<1, 1_000_000>>,
    pub provider_max_message_rate: Option<Rate>,
    pub provider_max_connection_rate: Option<Rate>,
}

impl Provider {
    /// The limit over all the provider's sites its `provider_*` keys set, if any.
    pub fn provider_limit(&self, name: &str) -> Option<SharedLimit> {
        let limit = SharedLimit {
            per: LimitScope::Source,
            providers: vec![name.to_string()],
            sources: Vec::new(),
            connection_limit: self.provider_connection_limit,
            max_message_rate: self.provider_max_message_rate,
            max_connection_rate: self.provider_max_connection_rate,
        };
        limit.sets_any().then_some(limit)
    }
}

/// A limit over several ready queues together (`delivery.limits.<name>`): the
/// connections open at once, messages and new connections per time unit of every
/// queue in its scope — one limit for each egress source, for each site, or one
/// for all — on this node, or on every node of a cluster (`[cluster]`). A queue
/// sends only what its own shaping and every limit it is in allow (KumoMTA's
/// `additional_connection_limits` and `additional_message_rate_throttles`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SharedLimit {
    /// `"source"`: each egress source has its own limit over the sites in scope;
    /// `"site"`: each site has its own over the sources in scope; `"all"`: one
    /// limit for every queue in scope.
    pub per: LimitScope,
    /// Only the queues to these providers' sites (`delivery.providers`, with their
    /// sources); empty: every site.
    pub providers: Vec<String>,
    /// Only the queues from these egress sources; empty: every source.
    pub sources: Vec<String>,
    pub connection_limit: Option<Bounded<1, 1_000_000>>,
    pub max_message_rate: Option<Rate>,
    pub max_connection_rate: Option<Rate>,
}

impl SharedLimit {
    /// Whether it limits anything.
    pub fn sets_any(&self) -> bool {
        self.connection_limit.is_some()
            || self.max_message_rate.is_some_and(|r| r != Rate::Unlimited)
            || self
                .max_connection_rate
                .is_some_and(|r| r != Rate::Unlimited)
    }
}

/// What one [`SharedLimit`] is kept for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitScope {
    #[default]
    Source,
    Site,
    All,
}

/// Providers by name; every matching rule applies, in name order.
pub type Providers = BTreeMap<String, Provider>;

/// A rate: `count` per `per_ms` milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rate {
    Unlimited,
    Per { count: u64, per_ms: u64 },
}

impl std::str::FromStr for Rate {
    type Err = String;

    fn from_str(text: &str) -> Result<Rate, String> {
        let bad = || {
            format!(
                "`{text}` is not a rate such as \"100/s\", \"2000/min\", \"50000/h\", \"1000000/d\" or \"unlimited\""
            )
        };
        let text = text.trim();
        if text.eq_ignore_ascii_case("unlimited") {
            return Ok(Rate::Unlimited);
        }
        let (count, unit) = text.split_once('/').ok_or_else(bad)?;
        let count: u64 = count.trim().parse().map_err(|_| bad())?;
        let per_ms = match unit.trim().to_ascii_lowercase().as_str() {
            "s" | "sec" | "second" => 1000,
            "m" | "min" | "minute" => 60_000,
            "h" | "hr" | "hour" => 3_600_000,
            "d" | "day" => 86_400_000,
            _ => return Err(bad()),
        };
        if count == 0 || count > 1_000_000_000 {
            return Err(format!(
                "`{text}`: the count must be between 1 and 1000000000"
            ));
        }
        Ok(Rate::Per { count, per_ms })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rate::Unlimited => f.write_str("unlimited"),
            Rate::Per { count, per_ms } => {
                let unit = match per_ms {
                    1000 => "s",
                    60_000 => "min",
                    3_600_000 => "h",
                    _ => "d",
                };
                write!(f, "{count}/{unit}")
            }
        }
    }
}

impl Serialize for Rate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Rate, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_in_every_unit_and_bad_ones_say_why() {
        assert_eq!(
            "100/s".parse(),
            Ok(Rate::Per {
                count: 100,
                per_ms: 1000
            })
        );
        assert_eq!(
            " 20 / min".parse(),
            Ok(Rate::Per {
                count: 20,
                per_ms: 60_000
            })
        );
        assert_eq!(
            "5/H".parse::<Rate>().unwrap().to_string(),
            "5/h".to_string()
        );
        assert_eq!("Unlimited".parse(), Ok(Rate::Unlimited));
        let knobs = Knobs {
            connection_limit: Some(Bounded(1)),
            max_message_rate: "10/min".parse().ok(),
            pipeline_next_message: Some(false),
            ..Knobs::default()
        };
        assert_eq!(
            knobs.describe(),
            "connection_limit=1 max_message_rate=10/min pipeline_next_message=false"
        );
        for bad in ["", "10", "10/week", "x/s", "0/s", "-1/s", "/s"] {
            let err = bad.parse::<Rate>().unwrap_err();
            assert!(err.contains(bad.trim()), "{bad}: {err}");
        }
    }
}
