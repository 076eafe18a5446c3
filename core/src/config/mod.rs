//! The configuration: a TOML file whose every key has a default, so that gannetd runs
//! with no file at all. The documented default is embedded (`default.toml`) and a unit
//! test keeps it identical to the defaults in code.
//!
//! Unknown keys and bad values are errors that name the key path and the line.

pub mod dkim;
pub mod net;
pub mod shaping;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

pub use net::Cidr;

use crate::auth::PasswordHash;

/// The documented default configuration, printed by `--print-default-config`.
pub const DEFAULT_TOML: &str = include_str!("default.toml");

/// Everything gannetd can be told.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub smtp: SmtpConfig,
    pub policy: PolicyConfig,
    pub http: HttpConfig,
    pub spool: SpoolSection,
    pub events: EventsConfig,
    pub delivery: DeliveryConfig,
    pub dkim: dkim::DkimConfig,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Empty: the machine's host name (resolved at start-up).
    pub hostname: String,
    pub data_dir: PathBuf,
    /// 0: one per available core.
    pub shards: usize,
    /// How long an idle executor spins before it parks in io_uring (microseconds).
    pub spin_before_park_us: Bounded<0, 100_000>,
    /// Pin each executor to its own core (false: the kernel schedules them).
    pub pin_cores: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            hostname: String::new(),
            data_dir: PathBuf::from("data"),
            shards: 0,
            spin_before_park_us: Bounded(0),
            pin_cores: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SmtpConfig {
    pub listen: Vec<Listen>,
    pub tls_listen: Vec<Listen>,
    pub relay_from: Vec<Cidr>,
    pub message_bytes_max: Bounded<1024, { 1 << 30 }>,
    pub recipients_max: Bounded<100, 100_000>,
    pub command_line_bytes_max: Bounded<512, 65536>,
    pub data_line_bytes_max: Bounded<1000, { 1 << 20 }>,
    pub sessions_max: Bounded<1, 1_000_000>,
    pub sessions_per_ip_max: Bounded<1, 1_000_000>,
    pub command_timeout_secs: Bounded<1, 3600>,
    pub data_timeout_secs: Bounded<1, 3600>,
    /// Message data must keep arriving at this rate on average (bytes per second):
    /// each byte received extends the DATA/BDAT deadline by 1/rate seconds.
    pub data_rate_min_bytes_per_sec: Bounded<1, 1_000_000_000>,
    /// When this share of `sessions_max` is in use (percent), every session's
    /// command and data timeouts shrink to `stress_timeout_secs`.
    pub stress_sessions_percent: Bounded<1, 100>,
    pub stress_timeout_secs: Bounded<1, 3600>,
    pub bad_commands_max: Bounded<1, 1000>,
    pub reject_bare_line_endings: bool,
    pub auth_requires_tls: bool,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub users: Vec<User>,
}

impl Default for SmtpConfig {
    fn default() -> Self {
        SmtpConfig {
            listen: vec![Listen("127.0.0.1:2025".parse().expect("literal"))],
            tls_listen: Vec::new(),
            relay_from: vec![
                "127.0.0.0/8".parse().expect("literal"),
                "::1/128".parse().expect("literal"),
            ],
            message_bytes_max: Bounded(25 << 20),
            recipients_max: Bounded(1000),
            command_line_bytes_max: Bounded(512),
            data_line_bytes_max: Bounded(1000),
            sessions_max: Bounded(2000),
            sessions_per_ip_max: Bounded(500),
            command_timeout_secs: Bounded(300),
            data_timeout_secs: Bounded(300),
            data_rate_min_bytes_per_sec: Bounded(500),
            stress_sessions_percent: Bounded(80),
            stress_timeout_secs: Bounded(10),
            bad_commands_max: Bounded(10),
            reject_bare_line_endings: true,
            auth_requires_tls: true,
            tls_cert: PathBuf::new(),
            tls_key: PathBuf::new(),
            users: Vec::new(),
        }
    }
}

/// An AUTH identity: a user name and a password hash (never the password).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    pub password_hash: PasswordHash,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    pub tenant_header: String,
    pub campaign_header: String,
    pub pool_header: String,
    pub default_pool: String,
    pub tenant_pools: BTreeMap<String, String>,
    pub rules: Vec<Rule>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            tenant_header: "X-Gannet-Tenant".into(),
            campaign_header: "X-Gannet-Campaign".into(),
            pool_header: "X-Gannet-Pool".into(),
            default_pool: "default".into(),
            tenant_pools: BTreeMap::new(),
            rules: Vec::new(),
        }
    }
}

/// A declarative policy rule: in `phase`, if every matcher given matches, `action`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub phase: Phase,
    #[serde(default)]
    pub client_networks: Vec<Cidr>,
    #[serde(default)]
    pub sender_domains: Vec<String>,
    #[serde(default)]
    pub recipient_domains: Vec<String>,
    #[serde(default)]
    pub size_bytes_over: Option<u64>,
    pub action: Action,
    /// Overrides the action's default reply, e.g. `"550 5.7.1 no mail from you"`.
    #[serde(default)]
    pub reply: Option<ReplyText>,
}

/// The SMTP phases a declarative rule can act in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Connect,
    Ehlo,
    MailFrom,
    RcptTo,
    Data,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Accept,
    Reject,
    Tempfail,
}

/// A complete SMTP reply line: a 4xx or 5xx code, an enhanced status code, text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyText {
    pub code: u16,
    pub text: String,
}

impl<'de> Deserialize<'de> for ReplyText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ReplyText, D::Error> {
        let s = String::deserialize(d)?;
        let bad = || {
            serde::de::Error::custom(format!(
                "`{s}` is not an SMTP reply such as \"550 5.7.1 text\" (4xx or 5xx, enhanced code, text)"
            ))
        };
        let (code, text) = s.split_once(' ').ok_or_else(bad)?;
        let code: u16 = code.parse().map_err(|_| bad())?;
        let enhanced = text.split(' ').next().unwrap_or("");
        let class_ok = enhanced.starts_with(&code.to_string()[..1]);
        let shape_ok = enhanced.split('.').count() == 3
            && enhanced
                .split('.')
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
        if !(400..600).contains(&code)
            || !class_ok
            || !shape_ok
            || text.bytes().any(|b| !(0x20..=0x7e).contains(&b))
        {
            return Err(bad());
        }
        Ok(ReplyText {
            code,
            text: text.to_string(),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    pub listen: Vec<Listen>,
    /// HTTPS listeners (the certificate and key of `smtp.tls_cert`/`smtp.tls_key`).
    pub tls_listen: Vec<Listen>,
    /// What `listen` and `tls_listen` serve.
    pub services: Services,
    /// More listeners, each serving only the services it names (for example the
    /// tracking endpoints on a public address, admin and metrics on a private one).
    pub listeners: Vec<HttpListener>,
    /// Networks allowed to use the admin API (queue suspensions), besides its key.
    pub admin_from: Vec<Cidr>,
    /// Keys for the injection API and, with `role = "admin"`, the admin API
    /// (`Authorization` header); none: both are off.
    pub api_keys: Vec<ApiKey>,
    /// A request head must arrive whole within this (slowloris); a body within
    /// `request_body_timeout_secs`, extended by a second per
    /// `request_body_rate_min_bytes_per_sec` bytes received.
    pub request_head_timeout_secs: Bounded<1, 3600>,
    pub request_body_timeout_secs: Bounded<1, 3600>,
    pub request_body_rate_min_bytes_per_sec: Bounded<1, 1_000_000_000>,
    /// Stored templates and recipient lists per tenant at most.
    pub templates_max: Bounded<1, 1_000_000>,
    pub recipient_lists_max: Bounded<1, 1_000_000>,
    /// Largest request body (a transmission with its recipients), bytes.
    pub request_bytes_max: Bounded<1024, { 1 << 30 }>,
    /// Requests handled at once per shard; more get 503.
    pub requests_in_flight_max: Bounded<1, 100_000>,
    /// Recipients per job record of a transmission generated after its reply.
    pub job_recipients_max: Bounded<1, 1_000_000>,
    /// Where recipients' mail clients reach the tracking endpoints (`/o/…`, `/c/…`);
    /// empty: `http://` and the first `listen` address.
    pub tracking_base_url: String,
    /// Open and click tracking for transmissions that do not say.
    pub open_tracking_default: bool,
    pub click_tracking_default: bool,
}

/// An API key: a name, the SHA-256 of the key (never the key), the tenant its mail,
/// templates and recipient lists belong to, and what it may do.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    pub name: String,
    pub key_sha256: crate::auth::KeyDigest,
    #[serde(default)]
    pub tenant: Option<String>,
    #[serde(default)]
    pub role: Role,
}

/// What an API key may do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Transmissions, templates, recipient lists, KumoMTA's inject API.
    #[default]
    Inject,
    /// The admin API (queue suspensions); nothing else.
    Admin,
}

/// What an HTTP listener serves. `/health` is served by every listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Services {
    /// Transmissions, templates, recipient lists, KumoMTA's inject API.
    pub inject: bool,
    /// The open pixel and click redirect (`/o/…`, `/c/…`): what faces the internet.
    pub tracking: bool,
    /// The admin API (`/api/admin/…`).
    pub admin: bool,
    /// Prometheus `/metrics`.
    pub metrics: bool,
}

impl Services {
    pub const ALL: Services = Services {
        inject: true,
        tracking: true,
        admin: true,
        metrics: true,
    };
}

impl Default for Services {
    fn default() -> Self {
        Services::ALL
    }
}

impl<'de> Deserialize<'de> for Services {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Services, D::Error> {
        let names = Vec::<String>::deserialize(d)?;
        let mut s = Services {
            inject: false,
            tracking: false,
            admin: false,
            metrics: false,
        };
        for name in &names {
            match name.as_str() {
                "inject" => s.inject = true,
                "tracking" => s.tracking = true,
                "admin" => s.admin = true,
                "metrics" => s.metrics = true,
                other => {
                    return Err(serde::de::Error::custom(format!(
                        "`{other}` is not a service: use \"inject\", \"tracking\", \"admin\" or \"metrics\""
                    )));
                }
            }
        }
        if names.is_empty() {
            return Err(serde::de::Error::custom(
                "a listener must serve at least one service",
            ));
        }
        Ok(s)
    }
}

/// An HTTP listener of its own (`[[http.listeners]]`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpListener {
    pub address: Listen,
    /// HTTPS, with the certificate and key of `smtp.tls_cert`/`smtp.tls_key`.
    #[serde(default)]
    pub tls: bool,
    pub services: Services,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: vec![Listen("127.0.0.1:8000".parse().expect("literal"))],
            tls_listen: Vec::new(),
            services: Services::ALL,
            listeners: Vec::new(),
            admin_from: vec![
                "127.0.0.0/8".parse().expect("literal"),
                "::1/128".parse().expect("literal"),
            ],
            api_keys: Vec::new(),
            request_head_timeout_secs: Bounded(30),
            request_body_timeout_secs: Bounded(30),
            request_body_rate_min_bytes_per_sec: Bounded(500),
            templates_max: Bounded(10_000),
            recipient_lists_max: Bounded(10_000),
            request_bytes_max: Bounded(32 << 20),
            requests_in_flight_max: Bounded(256),
            job_recipients_max: Bounded(10_000),
            tracking_base_url: String::new(),
            open_tracking_default: false,
            click_tracking_default: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpoolSection {
    pub segment_bytes: Bounded<{ 1 << 20 }, { 1 << 34 }>,
    pub commit_window_us: Bounded<0, 100_000>,
}

impl Default for SpoolSection {
    fn default() -> Self {
        SpoolSection {
            segment_bytes: Bounded(64 << 20),
            commit_window_us: Bounded(0),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventsConfig {
    pub file_bytes_max: Bounded<4096, { 1 << 40 }>,
    pub files_kept: Bounded<0, 100_000>,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            file_bytes_max: Bounded(64 << 20),
            files_kept: Bounded(8),
        }
    }
}

/// When delivery uses STARTTLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsMode {
    Disabled,
    /// Use it when offered, accepting any certificate; fall back to plaintext when not.
    Opportunistic,
    /// Refuse to deliver unless STARTTLS succeeds with a certificate valid for the host.
    Required,
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
    /// to in order of preference (`host:port`). Domains without a route go to their
    /// MX hosts.
    pub routes: BTreeMap<String, Vec<Listen>>,
    /// Egress sources by name: the local address to send from and the EHLO name.
    /// A source named `default` (no binding, the default EHLO name) always exists.
    pub sources: BTreeMap<String, EgressSource>,
    /// Egress pools by name: weighted sources. The set_binding phase names a message's
    /// pool; the source is drawn per attempt by weight. A pool named `default` holding
    /// the `default` source exists unless configured.
    pub pools: BTreeMap<String, Vec<PoolMember>>,
    /// Port of the MX hosts (25; tests point it at a sink).
    pub smtp_port: Bounded<1, 65535>,
    /// DNS server (`ip` or `ip:port`); empty: the first nameserver of /etc/resolv.conf.
    pub dns_server: String,
    pub dns_timeout_secs: Bounded<1, 60>,
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
            routes: BTreeMap::new(),
            sources: BTreeMap::new(),
            pools: BTreeMap::new(),
            smtp_port: Bounded(25),
            dns_server: String::new(),
            dns_timeout_secs: Bounded(5),
            dns_lookups_max: Bounded(64),
            dns_cache_entries_max: Bounded(100_000),
            idle_connections_max: Bounded(1000),
            suspensions_max: Bounded(10_000),
            suspended: false,
        }
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

/// A listener address (`ip:port`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen(pub SocketAddr);

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Listen, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map(Listen).map_err(|_| {
            serde::de::Error::custom(format!(
                "`{s}` is not a listen address such as \"127.0.0.1:2025\" or \"[::1]:2025\""
            ))
        })
    }
}

/// An integer that must lie in `MIN..=MAX` (checked when the file is read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bounded<const MIN: u64, const MAX: u64>(pub u64);

impl<const MIN: u64, const MAX: u64> Bounded<MIN, MAX> {
    pub fn get(self) -> u64 {
        self.0
    }

    pub fn usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

impl<'de, const MIN: u64, const MAX: u64> Deserialize<'de> for Bounded<MIN, MAX> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = i64::deserialize(d)?;
        match u64::try_from(v) {
            Ok(v) if (MIN..=MAX).contains(&v) => Ok(Bounded(v)),
            _ => Err(serde::de::Error::custom(format!(
                "{v} is out of range: must be between {MIN} and {MAX}"
            ))),
        }
    }
}

/// A configuration file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `key` is the dotted path of the offending key (empty for a syntax error).
    #[error("{origin}:{line}:{column}: {}{message}", key_prefix(key))]
    Invalid {
        origin: String,
        key: String,
        line: usize,
        column: usize,
        message: String,
    },
}

fn key_prefix(key: &str) -> String {
    if key.is_empty() || key == "." {
        String::new()
    } else {
        format!("key `{key}`: ")
    }
}

impl Config {
    /// The embedded default.
    pub fn embedded_default() -> Config {
        Config::parse(DEFAULT_TOML, "<default>").expect("the embedded default config parses")
    }

    /// Reads and checks a configuration file.
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Parses configuration text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let located = |key: String, span: Option<std::ops::Range<usize>>, message: String| {
            let (line, column) = span.map_or((0, 0), |s| line_col(text, s.start));
            ConfigError::Invalid {
                origin: origin.to_string(),
                key,
                line,
                column,
                message,
            }
        };
        let de = toml::Deserializer::parse(text)
            .map_err(|e| located(String::new(), e.span(), e.message().trim().to_string()))?;
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            located(key, inner.span(), inner.message().trim().to_string())
        })?;
        config.check().map_err(|(key, message)| {
            let span = find_key(text, &key);
            located(key, span, message)
        })?;
        Ok(config)
    }

    /// Checks that span several keys.
    fn check(&self) -> Result<(), (String, String)> {
        for (i, key) in self.http.api_keys.iter().enumerate() {
            if key.tenant.as_deref().is_some_and(|t| t.trim().is_empty()) {
                return Err((
                    format!("http.api_keys[{i}].tenant"),
                    "a tenant name must not be empty (leave the key out for none)".into(),
                ));
            }
        }
        for (name, source) in &self.delivery.sources {
            if !source.source_ip.is_empty() && source.source_ip.parse::<std::net::IpAddr>().is_err()
            {
                return Err((
                    format!("delivery.sources.{name}.source_ip"),
                    format!("`{}` is not an IP address", source.source_ip),
                ));
            }
        }
        for (name, members) in &self.delivery.pools {
            if members.is_empty() {
                return Err((
                    format!("delivery.pools.{name}"),
                    "a pool needs at least one source".into(),
                ));
            }
            for member in members {
                if member.source != "default" && !self.delivery.sources.contains_key(&member.source)
                {
                    return Err((
                        format!("delivery.pools.{name}"),
                        format!(
                            "source `{}` is not defined in delivery.sources",
                            member.source
                        ),
                    ));
                }
            }
        }
        for (name, provider) in &self.delivery.providers {
            if provider.mx_suffix.iter().all(|s| s.trim().is_empty()) {
                return Err((
                    format!("delivery.providers.{name}.mx_suffix"),
                    "a provider rule needs at least one MX suffix".into(),
                ));
            }
            for source in &provider.sources {
                if source != "default" && !self.delivery.sources.contains_key(source) {
                    return Err((
                        format!("delivery.providers.{name}.sources"),
                        format!("source `{source}` is not defined in delivery.sources"),
                    ));
                }
            }
        }
        let pool_known = |pool: &str| pool == "default" || self.delivery.pools.contains_key(pool);
        if !pool_known(&self.policy.default_pool) {
            return Err((
                "policy.default_pool".into(),
                format!(
                    "pool `{}` is not defined in delivery.pools",
                    self.policy.default_pool
                ),
            ));
        }
        for (tenant, pool) in &self.policy.tenant_pools {
            if !pool_known(pool) {
                return Err((
                    "policy.tenant_pools".into(),
                    format!("tenant `{tenant}`: pool `{pool}` is not defined in delivery.pools"),
                ));
            }
        }
        if !self.delivery.dns_server.is_empty() && self.dns_server().is_none() {
            return Err((
                "delivery.dns_server".into(),
                format!(
                    "`{}` is not an IP address or ip:port",
                    self.delivery.dns_server
                ),
            ));
        }
        if self.smtp.listen.is_empty() && self.smtp.tls_listen.is_empty() {
            return Err((
                "smtp.listen".into(),
                "no SMTP listener: give smtp.listen or smtp.tls_listen at least one address".into(),
            ));
        }
        if self.smtp.tls_cert.as_os_str().is_empty() != self.smtp.tls_key.as_os_str().is_empty() {
            return Err((
                "smtp.tls_cert".into(),
                "tls_cert and tls_key must be given together (or both left empty for a generated self-signed pair)".into(),
            ));
        }
        let mut names = std::collections::HashSet::new();
        for user in &self.smtp.users {
            if user.name.is_empty() || !names.insert(user.name.as_str()) {
                return Err((
                    "smtp.users".into(),
                    format!("user name `{}` is empty or given twice", user.name),
                ));
            }
        }
        for (i, rule) in self.policy.rules.iter().enumerate() {
            let key = format!("policy.rules[{i}]");
            let uses_recipient = !rule.recipient_domains.is_empty();
            let uses_sender = !rule.sender_domains.is_empty();
            let uses_size = rule.size_bytes_over.is_some();
            let allowed = match rule.phase {
                Phase::Connect | Phase::Ehlo => !uses_recipient && !uses_sender && !uses_size,
                Phase::MailFrom => !uses_recipient,
                Phase::RcptTo | Phase::Data => true,
            };
            if !allowed {
                return Err((
                    key,
                    format!(
                        "phase {:?} cannot match on what the client has not sent yet (sender, recipient or size)",
                        rule.phase
                    ),
                ));
            }
            if rule.action == Action::Accept && rule.phase != Phase::RcptTo {
                return Err((
                    key,
                    "action \"accept\" is only meaningful in phase rcpt_to (it permits relaying to matching recipients)".into(),
                ));
            }
            if let Some(reply) = &rule.reply {
                let expected = match rule.action {
                    Action::Reject => 5,
                    Action::Tempfail => 4,
                    Action::Accept => 2,
                };
                if reply.code / 100 != expected {
                    return Err((
                        format!("{key}.reply"),
                        format!(
                            "reply code {} does not fit action {:?}",
                            reply.code, rule.action
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The configured DNS server (port 53 unless given), if one is configured.
    pub fn dns_server(&self) -> Option<SocketAddr> {
        let text = self.delivery.dns_server.trim();
        text.parse::<SocketAddr>().ok().or_else(|| {
            text.parse::<std::net::IpAddr>()
                .ok()
                .map(|ip| SocketAddr::new(ip, 53))
        })
    }

    /// Applies the defaults that depend on the machine.
    pub fn resolve(mut self) -> Config {
        if self.server.hostname.is_empty() {
            self.server.hostname = machine_hostname();
        }
        if self.server.shards == 0 {
            self.server.shards = std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1);
        }
        self
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    // The offset comes from the TOML parser; never slice inside a character.
    let before = &text[..text.floor_char_boundary(offset)];
    let line = before.bytes().filter(|b| *b == b'\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

/// The span of the line that sets a dotted key: its last component if a line sets it,
/// else the nearest enclosing key that a line sets (an inline table).
fn find_key(text: &str, key: &str) -> Option<std::ops::Range<usize>> {
    key.rsplit('.').find_map(|part| {
        let name = part.split('[').next()?;
        let mut offset = 0;
        for line in text.split_inclusive('\n') {
            let trimmed = line.trim_start();
            if !name.is_empty()
                && trimmed.starts_with(name)
                && trimmed[name.len()..].trim_start().starts_with('=')
            {
                let start = offset + (line.len() - trimmed.len());
                return Some(start..start + name.len());
            }
            offset += line.len();
        }
        None
    })
}

fn machine_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_equals_code_defaults() {
        assert_eq!(Config::embedded_default(), Config::default());
        assert_eq!(Config::parse("", "empty").unwrap(), Config::default());
    }

    /// Parses `text` and expects an error whose message contains every `needle`.
    fn check_err(text: &str, needles: &[&str]) {
        let err = Config::parse(text, "t.toml").expect_err(text).to_string();
        for needle in needles {
            assert!(err.contains(needle), "{err:?} lacks {needle:?}");
        }
    }

    #[test]
    fn bad_forms_name_key_and_line() {
        check_err(
            "[smtp]\nlisen = []\n",
            &["t.toml:2:", "unknown field `lisen`"],
        );
        check_err(
            "[server]\nshards = 1\n[smtp]\nrecipients_max = 5\n",
            &["t.toml:4:", "smtp.recipients_max", "between 100 and 100000"],
        );
        check_err(
            "[smtp]\nrelay_from = [\"127.0.0.0/8\", \"10.0.0/8\"]\n",
            &["t.toml:2:", "smtp.relay_from", "10.0.0/8"],
        );
        check_err(
            "[smtp]\nlisten = [\"localhost\"]\n",
            &["t.toml:2:", "smtp.listen", "listen address"],
        );
        check_err(
            "[http]\nlisten = \"127.0.0.1:1\"\n",
            &["t.toml:2:", "http.listen", "sequence"],
        );
        check_err("[smtp\n", &["t.toml:1:"]);
        check_err(
            "[smtp]\nlisten = []\ntls_listen = []\n",
            &["t.toml:2:", "smtp.listen", "no SMTP listener"],
        );
        check_err(
            "[smtp]\ntls_cert = \"a.pem\"\n",
            &["t.toml:2:", "smtp.tls_cert", "together"],
        );
        check_err(
            "[policy]\nrules = [{ phase = \"connect\", sender_domains = [\"x\"], action = \"reject\" }]\n",
            &["t.toml:2:", "policy.rules[0]", "not sent yet"],
        );
        check_err(
            "[policy]\nrules = [{ phase = \"rcpt_to\", action = \"reject\", reply = \"450 4.7.1 no\" }]\n",
            &["policy.rules[0].reply", "does not fit"],
        );
        check_err(
            "[policy]\nrules = [{ phase = \"rcpt_to\", action = \"reject\", reply = \"550 no\" }]\n",
            &["t.toml:2:", "policy.rules[0].reply", "not an SMTP reply"],
        );
        check_err(
            "[policy]\nrules = [{ phase = \"later\", action = \"reject\" }]\n",
            &["t.toml:2:", "policy.rules[0].phase", "later"],
        );
        check_err(
            "[delivery]\npools = { warm = [{ source = \"nope\" }] }\n",
            &[
                "t.toml:2:",
                "delivery.pools.warm",
                "source `nope` is not defined",
            ],
        );
        check_err(
            "[delivery]\nsources = { a = { source_ip = \"10.0.0\" } }\n",
            &["delivery.sources.a.source_ip", "not an IP address"],
        );
        check_err(
            "[policy]\ndefault_pool = \"warm\"\n",
            &["t.toml:2:", "policy.default_pool", "`warm` is not defined"],
        );
        check_err(
            "[[smtp.users]]\nname = \"a\"\npassword_hash = \"plain\"\n",
            &["t.toml:3:", "smtp.users[0].password_hash"],
        );
    }

    #[test]
    fn good_file_overrides_some_keys() {
        let config = Config::parse(
            "[smtp]\nlisten = [\"127.0.0.1:0\", \"[::1]:0\"]\nrecipients_max = 100\n\
             [delivery]\npools = { warm = [{ source = \"default\" }] }\n\
             [policy]\ntenant_pools = { acme = \"warm\" }\n\
             rules = [{ phase = \"rcpt_to\", recipient_domains = [\"b.test\"], action = \"accept\" }]\n",
            "t",
        )
        .unwrap();
        assert_eq!(config.smtp.listen.len(), 2);
        assert_eq!(config.smtp.recipients_max.get(), 100);
        assert_eq!(
            config.smtp.message_bytes_max,
            SmtpConfig::default().message_bytes_max
        );
        assert_eq!(config.policy.tenant_pools["acme"], "warm");
        assert_eq!(config.policy.rules[0].phase, Phase::RcptTo);
    }
}
