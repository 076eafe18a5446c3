//! `[delivery]`: outbound delivery — EHLO name, STARTTLS mode, retry schedule, DNS,
//! routes, egress sources and pools, and the default shaping.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{Bounded, Listen, shaping};

/// When delivery uses STARTTLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsMode {
    Disabled,
    /// Use it when offered, accepting any certificate; fall back to plaintext when not.
    Opportunistic,
    /// Refuse to deliver unless STARTTLS succeeds with a certificate valid for the host.
    Required,
}

/// Which address records of an MX host delivery asks for, and in what order it
/// tries the addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IpLookup {
    /// A; AAAA only when the host has no A record. A sender's reputation is built
    /// on its IPv4 addresses, and a new host costs one question, not two.
    Ipv4ThenIpv6,
    /// AAAA; A only when the host has no AAAA record.
    Ipv6ThenIpv4,
    /// A and AAAA (Postfix's `inet_protocols = all`): IPv4 addresses tried first.
    Ipv4AndIpv6,
    Ipv4Only,
    Ipv6Only,
}

/// Outbound delivery: routes, retry schedule, connection behaviour.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeliveryConfig {
    /// Name given in EHLO; empty: `server.hostname`.
    pub ehlo_name: String,
    pub tls: TlsMode,
    /// First retry after this long; each later one waits twice as long as the last.
    pub retry_interval_secs: Bounded<1, 31_536_000>,
    pub max_retry_interval_secs: Bounded<1, 31_536_000>,
    /// A message older than this is expired (bounced) instead of retried.
    pub max_age_secs: Bounded<1, 31_536_000>,
    /// Shaping of every ready queue (`egress_source->site_name`): connections,
    /// rates, batch sizes, timeouts per SMTP phase. What is left out keeps its
    /// built-in default.
    pub shaping: shaping::Knobs,
    /// Provider rules: shaping for the sites whose MX hosts end in a suffix.
    pub providers: shaping::Providers,
    /// Static routes: a domain, or `*` for every other domain, to the hosts to deliver
    /// to in order of preference (`host:port`), or to a smarthost table with its TLS
    /// mode, certificate name and AUTH credentials. Domains without a route go to
    /// their MX hosts.
    pub routes: BTreeMap<String, Route>,
    /// Egress sources by name: the local address to send from and the EHLO name.
    /// Files of provider rules (`[providers.<name>]` tables, as under
    /// `delivery.providers`), read when the configuration is loaded and on SIGHUP;
    /// relative paths are from the configuration file's directory. A provider this
    /// file defines itself wins over a file's of the same name.
    pub provider_files: Vec<String>,
    /// Limits over several ready queues together: per egress source, per site or
    /// for all, over every site or a provider's (`shaping::SharedLimit`).
    pub limits: BTreeMap<String, shaping::SharedLimit>,
    /// Response rules for every site (adaptive delivery); providers add their own.
    pub automation: Vec<super::automation::Automation>,
    /// A source named `default` (no binding, the default EHLO name) always exists.
    pub sources: BTreeMap<String, EgressSource>,
    /// Egress pools by name: weighted sources. The set_binding phase names a message's
    /// pool; the source is drawn per attempt by weight. A pool named `default` holding
    /// the `default` source exists unless configured.
    pub pools: BTreeMap<String, Vec<PoolMember>>,
    /// IP warm-up plans by name: how many messages a day a source that follows one
    /// may send to each provider, rising day by day (`sources.<name>.warmup`).
    pub warmups: BTreeMap<String, WarmupPlan>,
    /// Certificate authorities (PEM) trusted besides the built-in roots when delivery
    /// checks a certificate; empty: the roots only.
    pub tls_ca_file: std::path::PathBuf,
    /// Settings of scheduled queues: every rule whose tenant, campaign and domain
    /// match a message's part applies, in order (a later one over an earlier one).
    pub queues: Vec<QueueRule>,
    /// MTA-STS (RFC 8461): policies looked up, fetched, cached and applied.
    pub mta_sts: MtaStsConfig,
    /// DANE (RFC 7672): TLSA records of MX hosts, when the resolver validates.
    pub dane: DaneConfig,
    /// TLS-RPT (RFC 8460): outcomes per policy domain, reported daily.
    pub tls_reporting: TlsReportingConfig,
    /// Port of the MX hosts (25; tests point it at a sink).
    pub smtp_port: Bounded<1, 65535>,
    /// DNS server (`ip` or `ip:port`); empty: the first nameserver of /etc/resolv.conf.
    pub dns_server: String,
    pub dns_timeout_secs: Bounded<1, 60>,
    /// The address records asked for an MX host (A, AAAA or both, and which first).
    pub ip_lookup: IpLookup,
    /// Destination lookups in flight at once per shard; more wait their turn (a burst
    /// of new domains must not flood the resolver into dropping queries).
    pub dns_lookups_max: Bounded<1, 100_000>,
    /// Answers a shard's DNS cache holds at most (the soonest to expire go first).
    pub dns_cache_entries_max: Bounded<16, 100_000_000>,
    /// Delivery connections per shard that may wait idle (shaping's
    /// idle_timeout_secs) at once; past it a connection with nothing to send closes
    /// at once, so a burst to many sites does not hold a socket per site.
    pub idle_connections_max: Bounded<0, 1_000_000>,
    /// Scheduled-queue suspensions active at once (admin API); every due part is
    /// checked against each.
    pub suspensions_max: Bounded<1, 1_000_000>,
    /// Accept and queue, but make no delivery attempts (like Postfix's
    /// defer_transports): for maintenance windows and ingress-only benchmarks.
    pub suspended: bool,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            ehlo_name: String::new(),
            tls: TlsMode::Opportunistic,
            retry_interval_secs: Bounded(1200),
            max_retry_interval_secs: Bounded(43_200),
            max_age_secs: Bounded(604_800),
            shaping: shaping::Knobs::builtin(),
            providers: BTreeMap::new(),
            provider_files: Vec::new(),
            limits: BTreeMap::new(),
            automation: Vec::new(),
            routes: BTreeMap::new(),
            sources: BTreeMap::new(),
            pools: BTreeMap::new(),
            warmups: BTreeMap::new(),
            tls_ca_file: std::path::PathBuf::new(),
            queues: Vec::new(),
            mta_sts: MtaStsConfig::default(),
            dane: DaneConfig::default(),
            tls_reporting: TlsReportingConfig::default(),
            smtp_port: Bounded(25),
            dns_server: String::new(),
            dns_timeout_secs: Bounded(5),
            ip_lookup: IpLookup::Ipv4ThenIpv6,
            dns_lookups_max: Bounded(64),
            dns_cache_entries_max: Bounded(100_000),
            idle_connections_max: Bounded(1000),
            suspensions_max: Bounded(10_000),
            suspended: false,
        }
    }
}

/// A rule for the scheduled queues (`campaign:tenant@domain`) it matches: their
/// retry schedule, maximum age and TLS mode.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueRule {
    /// The message's tenant; unset: any.
    pub tenant: Option<String>,
    pub campaign: Option<String>,
    /// The recipients' domain (`example.com`), or every domain under one
    /// (`.example.com`); unset: any.
    pub domain: Option<String>,
    pub retry_interval_secs: Option<Bounded<1, 31_536_000>>,
    pub max_retry_interval_secs: Option<Bounded<1, 31_536_000>>,
    pub max_age_secs: Option<Bounded<1, 31_536_000>>,
    /// STARTTLS for this mail ("required" keeps it off plaintext connections;
    /// its own ready queues). A destination's MTA-STS enforce or DANE still goes
    /// first.
    pub tls: Option<TlsMode>,
}

impl QueueRule {
    /// Whether the rule applies to a part of `domain` (lower case) of a message of
    /// `tenant` and `campaign`.
    pub fn applies(&self, tenant: Option<&str>, campaign: Option<&str>, domain: &str) -> bool {
        let same = |want: &Option<String>, have: Option<&str>| {
            want.as_deref().is_none_or(|w| have == Some(w))
        };
        let domain_ok = match self.domain.as_deref() {
            None => true,
            Some(suffix) if suffix.starts_with('.') => {
                domain.len() > suffix.len()
                    && domain
                        .get(domain.len() - suffix.len()..)
                        .is_some_and(|t| t.eq_ignore_ascii_case(suffix))
            }
            Some(exact) => exact.eq_ignore_ascii_case(domain),
        };
        domain_ok && same(&self.tenant, tenant) && same(&self.campaign, campaign)
    }
}

/// `[delivery.mta_sts]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MtaStsConfig {
    /// Look up each destination domain's `_mta-sts` record and apply its policy.
    pub enabled: bool,
    /// Port of the policy hosts (`mta-sts.<domain>`; 443, tests point it elsewhere).
    pub https_port: Bounded<1, 65535>,
    /// The whole fetch of a policy: connection, TLS, request and body.
    pub fetch_timeout_secs: Bounded<1, 300>,
    /// Policies each shard keeps at most (the soonest to expire go first).
    pub cache_entries_max: Bounded<16, 10_000_000>,
    /// A cached policy this old is fetched again in the background the next time
    /// its domain is resolved (its TXT id unchanged), so a policy in use never
    /// expires.
    pub refresh_secs: Bounded<60, 31_557_600>,
}

impl Default for MtaStsConfig {
    fn default() -> Self {
        MtaStsConfig {
            enabled: true,
            https_port: Bounded(443),
            fetch_timeout_secs: Bounded(30),
            cache_entries_max: Bounded(100_000),
            refresh_secs: Bounded(86_400),
        }
    }
}

/// `[delivery.dane]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DaneConfig {
    /// Look up TLSA records for MX hosts whose MX answer the resolver validated
    /// (its AD bit) and authenticate their certificates by them. Needs a
    /// DNSSEC-validating resolver on a trusted path (`delivery.dns_server`, e.g.
    /// unbound on the host).
    pub enabled: bool,
}

/// `[delivery.tls_reporting]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsReportingConfig {
    /// Count TLS outcomes for domains under MTA-STS or DANE and send each its
    /// aggregate report.
    pub enabled: bool,
    /// `organization-name` of the reports; empty: `server.hostname`.
    pub organization_name: String,
    /// `contact-info`; empty: `postmaster@<server.hostname>`.
    pub contact_info: String,
    /// The envelope and From address of mailed reports; empty:
    /// `noreply-smtp-tls-reporting@<server.hostname>`.
    pub sender: String,
    /// The period a report covers, aligned to the UTC epoch: a day (RFC 8460 4.1).
    /// Shorter only for tests.
    pub period_secs: Bounded<5, 86_400>,
    /// How long after a period ends its reports are sent (every shard has written
    /// its counts by then).
    pub send_after_secs: Bounded<2, 86_400>,
    /// Policy domains counted per shard and period; past it, new ones are not.
    pub domains_max: Bounded<1, 10_000_000>,
}

impl Default for TlsReportingConfig {
    fn default() -> Self {
        TlsReportingConfig {
            enabled: true,
            organization_name: String::new(),
            contact_info: String::new(),
            sender: String::new(),
            period_secs: Bounded(86_400),
            send_after_secs: Bounded(900),
            domains_max: Bounded(100_000),
        }
    }
}

/// A static route: hosts in order of preference, and how to talk to them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Route {
    pub hosts: Vec<Listen>,
    /// STARTTLS toward these hosts; None: the ready queue's shaping (`tls`).
    pub tls: Option<TlsMode>,
    /// The name the hosts' certificates must carry when TLS is required, also sent
    /// as SNI; empty: each host's address.
    pub server_name: String,
    /// Credentials for SMTP AUTH (PLAIN, or LOGIN when the server offers only that),
    /// sent only over TLS.
    pub auth: Option<RouteAuth>,
}

impl Route {
    /// A route to `hosts` with nothing else said.
    pub fn to_hosts(hosts: Vec<Listen>) -> Route {
        Route {
            hosts,
            ..Route::default()
        }
    }
}

/// The table form of a route.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteTable {
    hosts: Vec<Listen>,
    #[serde(default)]
    tls: Option<TlsMode>,
    #[serde(default)]
    server_name: String,
    #[serde(default)]
    auth: Option<RouteAuth>,
}

/// AUTH credentials of a route.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteAuth {
    pub username: String,
    pub password: String,
}

impl<'de> Deserialize<'de> for Route {
    /// `["10.0.0.5:25"]`, or `{ hosts = ["10.0.0.5:587"], tls = "required",
    /// server_name = "relay.example.com", auth = { username, password } }`.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Route, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Route;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of host:port, or a table with `hosts`")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Route, A::Error> {
                let hosts =
                    Vec::<Listen>::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))?;
                Ok(Route::to_hosts(hosts))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Route, A::Error> {
                let t = RouteTable::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(Route {
                    hosts: t.hosts,
                    tls: t.tls,
                    server_name: t.server_name,
                    auth: t.auth,
                })
            }
        }
        d.deserialize_any(Visit)
    }
}

/// An egress source.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EgressSource {
    /// Local address to bind before connecting; empty: the kernel chooses.
    pub source_ip: String,
    /// EHLO name for connections from this source; empty: `delivery.ehlo_name`.
    pub ehlo_name: String,
    /// The warm-up plan (`delivery.warmups`) the source follows; empty: none, the
    /// source is warm.
    pub warmup: String,
    /// The plan's first day, `YYYY-MM-DD` (UTC).
    pub warmup_start: String,
    /// An HAProxy PROXY-protocol relay (`host:port`) the connections go through:
    /// it connects to the MX host from `source_ip` (which is the relay's, not this
    /// host's).
    pub ha_proxy_server: String,
    /// A SOCKS5 proxy (`ip:port`) the connections go through, with
    /// `socks5_username` and `socks5_password` when it asks for them; the MX host
    /// sees the proxy's address (`source_ip` then binds the connection to the
    /// proxy).
    pub socks5_proxy_server: String,
    pub socks5_username: String,
    pub socks5_password: String,
}

/// An IP warm-up plan.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmupPlan {
    /// Messages a day to each provider: the first number on the plan's first day,
    /// the second on the second, …; after the last day the source is warm.
    pub schedule: Vec<Bounded<1, 1_000_000_000>>,
    /// The providers (`delivery.providers`) the budgets apply to; empty: every one.
    /// Sites of no provider are not limited.
    #[serde(default)]
    pub providers: Vec<String>,
}

/// `YYYY-MM-DD` as days since 1970-01-01.
pub fn parse_date(text: &str) -> Option<i64> {
    let mut parts = text.trim().split('-');
    let (y, m, d) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || y.len() != 4 || m.len() != 2 || d.len() != 2 {
        return None;
    }
    let (y, m, d): (i64, u32, u32) = (y.parse().ok()?, m.parse().ok()?, d.parse().ok()?);
    if !(1..=12).contains(&m) || d == 0 {
        return None;
    }
    let days = crate::clock::days_from_civil(y, m, d);
    // A day past its month's end (2026-02-30) comes back as another date.
    (crate::clock::civil_from_days(days) == (y, m, d)).then_some(days)
}

/// A source in a pool, with its weight.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolMember {
    pub source: String,
    #[serde(default = "one")]
    pub weight: Bounded<1, 1_000_000>,
}

fn one() -> Bounded<1, 1_000_000> {
    Bounded(1)
}
