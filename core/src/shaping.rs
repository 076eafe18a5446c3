//! Traffic shaping and suspension, as data: the knobs resolved for one ready queue,
//! the GCRA throttles that enforce its rates, and the administrative suspensions of
//! scheduled queues. Nothing here does I/O or reads the clock.

use std::rc::Rc;
use std::time::Duration;

use crate::config::shaping::{Knobs, LimitScope, Rate, SharedLimit};
use crate::config::{DeliveryConfig, TlsMode};
use crate::lease::{Gcra, Leased, TokenSource};

/// Timeouts per SMTP phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    pub banner: Duration,
    pub ehlo: Duration,
    pub starttls: Duration,
    pub mail: Duration,
    pub rcpt: Duration,
    pub data: Duration,
    /// From the end of data to the final reply.
    pub data_done: Duration,
}

impl Default for Timeouts {
    /// RFC 5321 4.5.3.2's minimums, shortened for connect, banner and EHLO.
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(30),
            banner: Duration::from_secs(60),
            ehlo: Duration::from_secs(60),
            starttls: Duration::from_secs(60),
            mail: Duration::from_secs(300),
            rcpt: Duration::from_secs(300),
            data: Duration::from_secs(120),
            data_done: Duration::from_secs(600),
        }
    }
}

/// The shaping of one ready queue (`egress_source->site_name`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shaping {
    pub connection_limit: usize,
    pub max_deliveries_per_connection: usize,
    pub max_recipients_per_batch: usize,
    pub max_message_rate: Rate,
    pub max_connection_rate: Rate,
    pub max_ready: usize,
    pub timeouts: Timeouts,
    /// How long an idle connection waits for the queue's next message.
    pub idle_timeout: Duration,
    /// Whether the next message's envelope follows a message's end of data.
    pub pipeline_next_message: bool,
    /// Connection failures in a row before the whole ready queue is deferred.
    pub connection_failures_max: u32,
    /// The longest wait before a new connection after failed ones.
    pub connection_backoff_max: Duration,
    /// Adaptive backoff: the share of failed attempts (percent; 0: off) that halves
    /// the connection limit, and the interval attempts are counted over.
    pub backoff_failure_percent: u8,
    pub backoff_interval: Duration,
    /// STARTTLS toward the site (a destination's own policy goes over it).
    pub tls: TlsMode,
    /// After a failed opportunistic handshake, deliver over a new plaintext
    /// connection to the same host.
    pub tls_reconnect_plaintext: bool,
    /// A provider's retry schedule and maximum age (seconds), when it sets them.
    pub retry: RetryKnobs,
}

/// Retry settings a rule may set (None: left as they were).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetryKnobs {
    pub interval_s: Option<u64>,
    pub max_interval_s: Option<u64>,
    pub max_age_s: Option<u64>,
}

impl Shaping {
    /// `base` with what `knobs` sets.
    pub fn with(mut self, knobs: &Knobs) -> Shaping {
        let secs = |k: Option<crate::config::Bounded<1, 3600>>, d: Duration| {
            k.map_or(d, |v| Duration::from_secs(v.get()))
        };
        if let Some(v) = knobs.connection_limit {
            self.connection_limit = v.usize();
        }
        if let Some(v) = knobs.max_deliveries_per_connection {
            self.max_deliveries_per_connection = v.usize();
        }
        if let Some(v) = knobs.max_recipients_per_batch {
            self.max_recipients_per_batch = v.usize();
        }
        if let Some(v) = knobs.max_ready {
            self.max_ready = v.usize();
        }
        self.max_message_rate = knobs.max_message_rate.unwrap_or(self.max_message_rate);
        self.max_connection_rate = knobs
            .max_connection_rate
            .unwrap_or(self.max_connection_rate);
        let t = &mut self.timeouts;
        t.connect = secs(knobs.connect_timeout_secs, t.connect);
        t.banner = secs(knobs.banner_timeout_secs, t.banner);
        t.ehlo = secs(knobs.ehlo_timeout_secs, t.ehlo);
        t.starttls = secs(knobs.starttls_timeout_secs, t.starttls);
        t.mail = secs(knobs.mail_from_timeout_secs, t.mail);
        t.rcpt = secs(knobs.rcpt_to_timeout_secs, t.rcpt);
        t.data = secs(knobs.data_timeout_secs, t.data);
        t.data_done = secs(knobs.data_dot_timeout_secs, t.data_done);
        if let Some(v) = knobs.idle_timeout_secs {
            self.idle_timeout = Duration::from_secs(v.get());
        }
        self.pipeline_next_message = knobs
            .pipeline_next_message
            .unwrap_or(self.pipeline_next_message);
        if let Some(v) = knobs.connection_failures_max {
            self.connection_failures_max = v.get() as u32;
        }
        if let Some(v) = knobs.connection_backoff_max_secs {
            self.connection_backoff_max = Duration::from_secs(v.get());
        }
        if let Some(v) = knobs.backoff_failure_percent {
            self.backoff_failure_percent = v.get() as u8;
        }
        if let Some(v) = knobs.backoff_interval_secs {
            self.backoff_interval = Duration::from_secs(v.get());
        }
        self.tls = knobs.tls.unwrap_or(self.tls);
        let secs = |v: Option<crate::config::Bounded<1, 31_536_000>>| v.map(|v| v.get());
        self.retry = RetryKnobs {
            interval_s: secs(knobs.retry_interval_secs).or(self.retry.interval_s),
            max_interval_s: secs(knobs.max_retry_interval_secs).or(self.retry.max_interval_s),
            max_age_s: secs(knobs.max_age_secs).or(self.retry.max_age_s),
        };
        self.tls_reconnect_plaintext = knobs
            .opportunistic_tls_reconnect_on_failed_handshake
            .unwrap_or(self.tls_reconnect_plaintext);
        self
    }
}

/// The shaping configuration: the defaults and the provider rules.
#[derive(Debug, Clone)]
pub struct ShapingTable {
    default: Shaping,
    /// Each provider's scope and knobs, in name order.
    providers: Vec<(Scope, Knobs)>,
    /// The response rules (adaptive delivery), compiled.
    pub rules: crate::adaptive::Rules,
    /// Whether a provider sets a retry knob (else settling never resolves shaping).
    pub providers_set_retry: bool,
    /// The scheduled queues' rules (`delivery.queues`).
    pub queue_rules: Vec<crate::config::delivery::QueueRule>,
    /// Limits over several ready queues (`delivery.limits`, and the providers'
    /// `provider_*` keys), in name order.
    limits: Vec<LimitRule>,
}

/// One limit over several ready queues, compiled.
#[derive(Debug, Clone)]
struct LimitRule {
    /// `limit:<name>` or `provider:<name>`.
    name: String,
    per: LimitScope,
    /// The queue must be in one of these (the providers named; every queue when
    /// none is named), and from one of `sources` (empty: any).
    every_site: bool,
    scopes: Vec<Scope>,
    sources: Vec<String>,
    values: LimitValues,
}

/// What a limit over several ready queues allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitValues {
    /// Connections open at once (None: no limit).
    pub connection_limit: Option<usize>,
    pub max_message_rate: Rate,
    pub max_connection_rate: Rate,
}

impl LimitValues {
    fn of(limit: &SharedLimit) -> LimitValues {
        LimitValues {
            connection_limit: limit.connection_limit.map(|v| v.usize()),
            max_message_rate: limit.max_message_rate.unwrap_or(Rate::Unlimited),
            max_connection_rate: limit.max_connection_rate.unwrap_or(Rate::Unlimited),
        }
    }
}

/// Compiles the limits over several queues: `delivery.limits`, then each
/// provider's `provider_*` keys.
fn limit_rules(config: &DeliveryConfig) -> Vec<LimitRule> {
    let scope_of =
        |name: &String| (config.providers.get(name)).map(|p| Scope::new(&p.mx_suffix, &p.sources));
    let rule = |name: String, limit: &SharedLimit| LimitRule {
        name,
        per: limit.per,
        every_site: limit.providers.is_empty(),
        scopes: limit.providers.iter().filter_map(scope_of).collect(),
        sources: limit.sources.clone(),
        values: LimitValues::of(limit),
    };
    let named = (config.limits.iter()).map(|(name, limit)| rule(format!("limit:{name}"), limit));
    let providers = (config.providers.iter()).filter_map(|(name, provider)| {
        let limit = provider.provider_limit(name)?;
        Some(rule(format!("provider:{name}"), &limit))
    });
    named.chain(providers).collect()
}

impl ShapingTable {
    pub fn new(config: &DeliveryConfig) -> ShapingTable {
        let builtin = Shaping {
            connection_limit: 0,
            max_deliveries_per_connection: 0,
            max_recipients_per_batch: 0,
            max_message_rate: Rate::Unlimited,
            max_connection_rate: Rate::Unlimited,
            max_ready: 0,
            timeouts: Timeouts::default(),
            idle_timeout: Duration::ZERO,
            pipeline_next_message: false,
            connection_failures_max: 0,
            connection_backoff_max: Duration::ZERO,
            backoff_failure_percent: 0,
            backoff_interval: Duration::ZERO,
            tls: config.tls,
            tls_reconnect_plaintext: false,
            retry: RetryKnobs::default(),
        }
        .with(&Knobs::builtin());
        let providers = (config.providers.values())
            .map(|p| (Scope::new(&p.mx_suffix, &p.sources), p.shaping.clone()))
            .collect();
        let providers_set_retry = config.providers.values().any(|p| {
            let k = &p.shaping;
            k.retry_interval_secs.is_some()
                || k.max_retry_interval_secs.is_some()
                || k.max_age_secs.is_some()
        });
        ShapingTable {
            default: builtin.with(&config.shaping),
            providers,
            rules: crate::adaptive::Rules::new(config),
            providers_set_retry,
            queue_rules: config.queues.clone(),
            limits: limit_rules(config),
        }
    }

    /// The limits over several queues that the queue from `source` to `site`
    /// (served by `hosts`) is in: each one's key (the same on every node:
    /// `limit:<name>`, then `@<source>` or `@<site>` when it is kept per source or
    /// per site) and what it allows.
    pub fn limits_for<'a>(
        &self,
        source: &str,
        site: &str,
        hosts: impl Iterator<Item = &'a str> + Clone,
    ) -> Vec<(String, LimitValues)> {
        (self.limits.iter())
            .filter(|l| l.sources.is_empty() || l.sources.iter().any(|s| s == source))
            .filter(|l| l.every_site || l.scopes.iter().any(|s| s.applies(source, hosts.clone())))
            .map(|l| {
                let key = match l.per {
                    LimitScope::Source => format!("{}@{source}", l.name),
                    LimitScope::Site => format!("{}@{site}", l.name),
                    LimitScope::All => l.name.clone(),
                };
                (key, l.values)
            })
            .collect()
    }

    /// The shaping of the queue from `source` to the site served by `hosts`.
    pub fn resolve<'a>(
        &self,
        source: &str,
        hosts: impl Iterator<Item = &'a str> + Clone,
    ) -> Shaping {
        let mut shaping = self.default;
        for (scope, knobs) in &self.providers {
            if scope.applies(source, hosts.clone()) {
                shaping = shaping.with(knobs);
            }
        }
        shaping
    }
}

/// The ready queues a provider applies to: from its sources, to the sites with an MX
/// host name ending in one of its suffixes (no sources: every source; no suffixes:
/// every site).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Scope {
    /// Lower case, without a trailing dot.
    suffixes: Vec<String>,
    sources: Vec<String>,
}

impl Scope {
    pub fn new(mx_suffix: &[String], sources: &[String]) -> Scope {
        Scope {
            suffixes: (mx_suffix.iter())
                .map(|s| s.trim().trim_end_matches('.').to_ascii_lowercase())
                .filter(|s| !s.is_empty())
                .collect(),
            sources: sources.to_vec(),
        }
    }

    /// The MX suffixes (empty: every site).
    pub fn suffixes(&self) -> &[String] {
        &self.suffixes
    }

    /// Whether the queue from `source` to the site served by `hosts` is in scope.
    pub fn applies<'a>(&self, source: &str, mut hosts: impl Iterator<Item = &'a str>) -> bool {
        if !self.sources.is_empty() && !self.sources.iter().any(|s| s == source) {
            return false;
        }
        self.suffixes.is_empty()
            || hosts.any(|host| {
                let host = host.trim_end_matches('.');
                (self.suffixes.iter()).any(|suffix| ends_with_ignore_case(host, suffix))
            })
    }
}

pub(crate) fn ends_with_ignore_case(text: &str, suffix: &str) -> bool {
    text.len() >= suffix.len()
        && text.as_bytes()[text.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
}

/// A rate limit: a generic cell rate algorithm (one emission interval per event,
/// bursts up to the rate's count), kept here, or shared by the cluster's nodes with
/// its tokens leased ([`crate::lease`]). Times in microseconds.
#[derive(Debug, Default)]
pub struct Throttle {
    local: Gcra,
    shared: Option<Box<Leased>>,
}

impl Throttle {
    pub fn new(rate: Rate) -> Throttle {
        let mut t = Throttle::default();
        t.local.set_rate(rate);
        t
    }

    /// A throttle shared under `key` with the other nodes, its tokens leased from
    /// `source` (an unlimited rate asks nothing).
    pub fn shared(rate: Rate, key: String, source: Rc<dyn TokenSource>) -> Throttle {
        let mut t = Throttle::new(rate);
        t.shared = Some(Box::new(Leased::new(source, key, rate)));
        t
    }

    /// Changes the rate, keeping what has been spent.
    pub fn set_rate(&mut self, rate: Rate) {
        self.local.set_rate(rate);
        if let Some(shared) = self.shared.as_mut() {
            shared.set_rate(rate);
        }
    }

    /// How long until an event may pass (zero: now).
    pub fn wait(&self, now_us: u64) -> Duration {
        match &self.shared {
            Some(shared) if !self.local.is_unlimited() => shared.wait(now_us),
            _ => self.local.wait(now_us),
        }
    }

    /// Counts an event at `now_us` if it may pass now.
    pub fn acquire(&mut self, now_us: u64) -> Result<(), Duration> {
        match self.shared.as_mut() {
            Some(shared) if !self.local.is_unlimited() => shared.acquire(now_us),
            _ => self.local.acquire(now_us),
        }
    }

    /// Undoes the event [`Throttle::acquire`] counted just now (another limit
    /// refused the same event).
    pub fn refund(&mut self) {
        match self.shared.as_mut() {
            Some(shared) if !self.local.is_unlimited() => shared.refund(),
            _ => self.local.refund(),
        }
    }

    /// A shared throttle takes the answer to its lease if it has come, and gives
    /// back tokens it has held unspent for two lease windows.
    pub fn settle(&mut self, now_us: u64) {
        if let Some(shared) = self.shared.as_mut() {
            shared.settle(now_us);
        }
    }

    /// Whether the throttle is shared, and if so its fallback in force and its
    /// leased tokens not spent (the admin API).
    pub fn lease_state(&self) -> Option<(Option<crate::config::Fallback>, u32)> {
        self.shared.as_ref().map(|s| (s.down(), s.tokens()))
    }
}

/// The scheduled queues an operator's verb (a suspension, a retry) applies to: those
/// matching every field given (case-insensitively), or, when `queue_names` is given,
/// exactly those queues. No field at all selects every queue.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueSelector {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub campaign: Option<String>,
    /// Exact scheduled queue names; when given, they alone decide.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queue_names: Vec<String>,
}

impl QueueSelector {
    /// Whether `queue` is one of the selected.
    pub fn selects(&self, queue: &QueueName<'_>) -> bool {
        if !self.queue_names.is_empty() {
            return self.queue_names.iter().any(|n| queue.equals(n));
        }
        let field = |want: &Option<String>, have: Option<&str>| {
            want.as_deref()
                .is_none_or(|w| have.is_some_and(|h| h.eq_ignore_ascii_case(w)))
        };
        field(&self.domain, Some(queue.domain))
            && field(&self.tenant, queue.tenant)
            && field(&self.campaign, queue.campaign)
    }
}

/// An administrative suspension of scheduled queues: their parts stay queued until
/// it is lifted or expires.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Suspension {
    pub id: String,
    #[serde(flatten)]
    pub queues: QueueSelector,
    pub reason: String,
    pub expires_unix_ms: u64,
}

impl Suspension {
    /// Whether the suspension holds the scheduled queue of a part at `now_ms`.
    pub fn holds(&self, queue: &QueueName<'_>, now_ms: u64) -> bool {
        now_ms < self.expires_unix_ms && self.queues.selects(queue)
    }
}

/// A scheduled queue's name in parts: `campaign:tenant@domain!routing_domain`,
/// campaign, tenant and routing domain optional (KumoMTA's naming).
#[derive(Debug, Clone, Copy)]
pub struct QueueName<'a> {
    pub campaign: Option<&'a str>,
    pub tenant: Option<&'a str>,
    pub domain: &'a str,
    /// The domain whose route or MX the queue's mail takes instead (a policy
    /// script's `routing_domain`).
    pub routing: Option<&'a str>,
}

impl QueueName<'_> {
    fn equals(&self, name: &str) -> bool {
        let (name, routing) = match name.rsplit_once('!') {
            Some((name, routing)) => (name, Some(routing)),
            None => (name, None),
        };
        let same_routing = match (routing, self.routing) {
            (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
            (None, None) => true,
            _ => false,
        };
        if !same_routing {
            return false;
        }
        let (campaign, rest) = match name.split_once(':') {
            Some((c, rest)) => (Some(c), rest),
            None => (None, name),
        };
        let (tenant, domain) = match rest.rsplit_once('@') {
            Some((t, d)) => (Some(t), d),
            None => (None, rest),
        };
        campaign == self.campaign
            && tenant == self.tenant
            && domain.eq_ignore_ascii_case(self.domain)
    }
}

impl std::fmt::Display for QueueName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(c) = self.campaign {
            write!(f, "{c}:")?;
        }
        if let Some(t) = self.tenant {
            write!(f, "{t}@")?;
        }
        f.write_str(self.domain)?;
        if let Some(r) = self.routing {
            write!(f, "!{r}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn table(toml: &str) -> ShapingTable {
        let config = Config::parse(toml, "t.toml").expect("config");
        ShapingTable::new(&config.delivery)
    }

    #[test]
    fn provider_rules_apply_over_the_defaults_by_mx_suffix_and_source() {
        let t = table(
            r#"
[delivery]
sources = { ip2 = { source_ip = "127.0.0.2" } }
[delivery.shaping]
connection_limit = 8
max_message_rate = "100/s"
data_dot_timeout_secs = 100
[delivery.providers.big]
mx_suffix = [".Big.Example."]
shaping = { connection_limit = 2, max_message_rate = "unlimited", connect_timeout_secs = 5 }
[delivery.providers.big-ip2]
mx_suffix = ["big.example"]
sources = ["ip2"]
shaping = { max_ready = 10 }
"#,
        );
        let plain = t.resolve("default", ["mx.small.example"].into_iter());
        assert_eq!(plain.connection_limit, 8);
        assert_eq!(
            plain.max_message_rate,
            Rate::Per {
                count: 100,
                per_ms: 1000
            }
        );
        assert_eq!(plain.max_deliveries_per_connection, 1024, "builtin default");
        assert_eq!(plain.timeouts.data_done, Duration::from_secs(100));
        assert_eq!(plain.timeouts.connect, Duration::from_secs(30));
        let big = t.resolve(
            "default",
            ["mx1.other.test", "MX2.big.example."].into_iter(),
        );
        assert_eq!(big.connection_limit, 2);
        assert_eq!(big.max_message_rate, Rate::Unlimited);
        assert_eq!(big.timeouts.connect, Duration::from_secs(5));
        assert_eq!(big.timeouts.data_done, Duration::from_secs(100));
        assert_eq!(big.max_ready, 1_000_000);
        let big2 = t.resolve("ip2", ["mx.big.example"].into_iter());
        assert_eq!((big2.connection_limit, big2.max_ready), (2, 10));
        let not_suffix = t.resolve("ip2", ["mx.notbig.example.org"].into_iter());
        assert_eq!(not_suffix.connection_limit, 8);
    }

    #[test]
    fn the_throttle_allows_a_burst_then_one_per_interval() {
        let mut t = Throttle::new(Rate::Per {
            count: 5,
            per_ms: 1000,
        });
        for _ in 0..5 {
            t.acquire(0).expect("burst");
        }
        assert_eq!(t.acquire(0), Err(Duration::from_millis(200)));
        assert_eq!(t.acquire(199_999), Err(Duration::from_micros(1)));
        t.acquire(200_000).expect("one interval later");
        assert!(t.acquire(200_000).is_err());
        // Idle time refills the burst, but never beyond it.
        for _ in 0..5 {
            t.acquire(10_000_000).expect("refilled");
        }
        assert!(t.acquire(10_000_000).is_err());
        t.set_rate(Rate::Unlimited);
        t.acquire(10_000_000).expect("unlimited");
        // Tightened live: the spent allowance is kept.
        t.set_rate(Rate::Per {
            count: 1,
            per_ms: 60_000,
        });
        assert!(t.acquire(10_000_000).is_err());
    }

    #[test]
    fn suspensions_match_by_fields_or_exact_queue_names_until_they_expire() {
        let s = |domain: Option<&str>, tenant: Option<&str>, names: &[&str]| Suspension {
            id: "1".into(),
            queues: QueueSelector {
                domain: domain.map(Into::into),
                tenant: tenant.map(Into::into),
                campaign: None,
                queue_names: names.iter().map(|n| n.to_string()).collect(),
            },
            reason: "test".into(),
            expires_unix_ms: 1000,
        };
        let q = QueueName {
            campaign: Some("spring"),
            tenant: Some("acme"),
            domain: "a.test",
            routing: None,
        };
        assert_eq!(q.to_string(), "spring:acme@a.test");
        assert!(s(Some("A.test"), None, &[]).holds(&q, 0));
        assert!(s(None, Some("acme"), &[]).holds(&q, 0));
        assert!(!s(None, Some("other"), &[]).holds(&q, 0));
        assert!(!s(Some("b.test"), None, &[]).holds(&q, 0));
        assert!(s(None, None, &[]).holds(&q, 999), "everything");
        assert!(!s(None, None, &[]).holds(&q, 1000), "expired");
        assert!(s(Some("b.test"), None, &["x@y.test", "spring:acme@a.test"]).holds(&q, 0));
        assert!(!s(None, None, &["acme@a.test"]).holds(&q, 0));
        let plain = QueueName {
            campaign: None,
            tenant: None,
            domain: "a.test",
            routing: None,
        };
        assert!(s(None, None, &["a.test"]).holds(&plain, 0));
        assert!(!s(None, Some("acme"), &[]).holds(&plain, 0));
        // A routing domain is part of the name (a domain selector still holds it).
        let routed = QueueName {
            routing: Some("relay.test"),
            ..plain
        };
        assert_eq!(routed.to_string(), "a.test!relay.test");
        assert!(s(None, None, &["a.test!Relay.test"]).holds(&routed, 0));
        assert!(!s(None, None, &["a.test"]).holds(&routed, 0));
        assert!(!s(None, None, &["a.test!relay.test"]).holds(&plain, 0));
        assert!(s(Some("a.test"), None, &[]).holds(&routed, 0));
    }
}
