//! The configuration: a TOML file whose every key has a default, so that gannetd runs
//! with no file at all. The documented default is embedded (`default.toml`) and a unit
//! test keeps it identical to the defaults in code.
//!
//! Unknown keys and bad values are errors that name the key path and the line.
//!
//! One file per section (`server.rs` holds `[server]`, `[spool]` and `[events]`;
//! `smtp.rs`, `policy.rs`, `http.rs`, `delivery.rs`, `dkim.rs`; `shaping.rs` the
//! shaping knobs that `[delivery]` and the provider rules share; `automation.rs` the
//! response rules of adaptive delivery; `net.rs` CIDRs).
//! This file has the whole, its loading and cross-section checks, and the value
//! types every section uses (`Bounded`, `Listen`).

pub mod automation;
pub mod cluster;
pub mod delivery;
pub mod dkim;
pub mod dsn;
pub mod events;
pub mod http;
pub mod inbound;
pub mod net;
pub mod policy;
pub mod server;
pub mod shaping;
pub mod smtp;
pub mod suppression;

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

pub use cluster::{ClusterConfig, Fallback, RedisUrl};
pub use delivery::{
    DaneConfig, DeliveryConfig, EgressSource, IpLookup, MtaStsConfig, PoolMember, Route, RouteAuth,
    TlsMode, TlsReportingConfig,
};
pub use dsn::DsnConfig;
pub use events::{AmqpSink, AmqpUrl, EventsConfig, MetricsApiConfig};
pub use http::{ApiKey, HttpConfig, HttpListener, Role, Services};
pub use inbound::InboundConfig;
pub use net::Cidr;
pub use policy::{Action, Phase, PolicyConfig, ReplyText, Rule};
pub use server::{ServerConfig, SpoolSection};
pub use smtp::{SmtpConfig, User};
pub use suppression::SuppressionConfig;

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
    pub suppression: SuppressionConfig,
    pub dsn: DsnConfig,
    pub inbound: InboundConfig,
    pub delivery: DeliveryConfig,
    pub dkim: dkim::DkimConfig,
    pub cluster: ClusterConfig,
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
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

    /// Reads and checks a configuration file, and the provider files it names.
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = read(path)?;
        let mut config = Config::parse(&text, &path.display().to_string())?;
        let base = path.parent().unwrap_or(std::path::Path::new("."));
        for file in config.delivery.provider_files.clone() {
            let path = base.join(&file);
            let text = read(&path)?;
            let origin = path.display().to_string();
            let found: ProviderFile = parse_located(&text, &origin)?;
            for (name, provider) in found.providers {
                check_provider(
                    &config.delivery.sources,
                    &format!("providers.{name}"),
                    &provider,
                )
                .map_err(|(key, message)| located(&text, &origin, key, None, message))?;
                config.delivery.providers.entry(name).or_insert(provider);
            }
        }
        if !config.delivery.provider_files.is_empty() {
            let origin = path.display().to_string();
            config
                .check_named_providers()
                .map_err(|(key, message)| located(&text, &origin, key, None, message))?;
        }
        Ok(config)
    }

    /// Parses configuration text; `origin` names it in errors. Provider files are
    /// not read (see [`Config::load`]).
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let config: Config = parse_located(text, origin)?;
        config
            .check()
            .map_err(|(key, message)| located(text, origin, key, None, message))?;
        Ok(config)
    }

    /// The hose's broker sinks.
    fn check_events(&self) -> Result<(), (String, String)> {
        let mut sinks = std::collections::HashSet::new();
        for (i, sink) in self.events.amqp.iter().enumerate() {
            let key = |field: &str| format!("events.amqp[{i}].{field}");
            let name_ok = !sink.name.is_empty()
                && sink
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !name_ok {
                return Err((
                    key("name"),
                    "a sink's name is letters, digits, - and _ (it names its cursor file)".into(),
                ));
            }
            if !sinks.insert(&sink.name) {
                return Err((key("name"), format!("a second sink named `{}`", sink.name)));
            }
            AmqpUrl::parse(&sink.url).map_err(|e| (key("url"), e))?;
            if let Err(unknown) = crate::event_types::TypeSet::of(&sink.events) {
                return Err((key("events"), format!("unknown event type `{unknown}`")));
            }
            if !matches!(
                sink.exchange_type.as_str(),
                "topic" | "direct" | "fanout" | "headers"
            ) {
                return Err((
                    key("exchange_type"),
                    format!(
                        "`{}` is not topic, direct, fanout or headers",
                        sink.exchange_type
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Warm-up plans and the sources that follow them.
    fn check_warmup_plans(&self) -> Result<(), (String, String)> {
        for (name, plan) in &self.delivery.warmups {
            if plan.schedule.is_empty() || plan.schedule.len() > 366 {
                return Err((
                    format!("delivery.warmups.{name}.schedule"),
                    "give one daily budget per day of the plan, 1 to 366 of them".into(),
                ));
            }
        }
        for (name, source) in &self.delivery.sources {
            let key = |k: &str| format!("delivery.sources.{name}.{k}");
            match (source.warmup.is_empty(), source.warmup_start.is_empty()) {
                (true, true) => continue,
                (true, false) => {
                    return Err((
                        key("warmup_start"),
                        "set warmup (a plan) too, or neither".into(),
                    ));
                }
                (false, true) => {
                    return Err((
                        key("warmup_start"),
                        "a source that warms up needs the plan's first day, e.g. \"2026-12-01\""
                            .into(),
                    ));
                }
                (false, false) => {}
            }
            if !self.delivery.warmups.contains_key(&source.warmup) {
                return Err((
                    key("warmup"),
                    format!(
                        "plan `{}` is not defined in delivery.warmups",
                        source.warmup
                    ),
                ));
            }
            if delivery::parse_date(&source.warmup_start).is_none() {
                return Err((
                    key("warmup_start"),
                    format!(
                        "`{}` is not a date such as \"2026-12-01\"",
                        source.warmup_start
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The providers warm-up plans and limits name exist.
    fn check_named_providers(&self) -> Result<(), (String, String)> {
        for (name, plan) in &self.delivery.warmups {
            for provider in &plan.providers {
                if !self.delivery.providers.contains_key(provider) {
                    return Err((
                        format!("delivery.warmups.{name}.providers"),
                        format!("provider `{provider}` is not defined in delivery.providers"),
                    ));
                }
            }
        }
        for (name, limit) in &self.delivery.limits {
            if let Some(provider) =
                (limit.providers.iter()).find(|p| !self.delivery.providers.contains_key(*p))
            {
                return Err((
                    format!("delivery.limits.{name}.providers"),
                    format!("provider `{provider}` is not defined in delivery.providers"),
                ));
            }
        }
        Ok(())
    }

    /// The limits over several ready queues: each limits something, from sources
    /// that exist.
    fn check_limits(&self) -> Result<(), (String, String)> {
        for (name, limit) in &self.delivery.limits {
            let key = format!("delivery.limits.{name}");
            if name.trim().is_empty() || name.chars().any(|c| c.is_whitespace() || c == '@') {
                return Err((
                    key,
                    "a limit's name must not be empty nor hold spaces or `@`".into(),
                ));
            }
            if !limit.sets_any() {
                return Err((
                    key,
                    "limits nothing: give connection_limit, max_message_rate or max_connection_rate".into(),
                ));
            }
            if let Some(source) = unknown_source(&self.delivery.sources, &limit.sources) {
                return Err((
                    format!("{key}.sources"),
                    format!("source `{source}` is not defined in delivery.sources"),
                ));
            }
        }
        Ok(())
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
        for (name, source) in &self.delivery.sources {
            let key = format!("delivery.sources.{name}");
            let addr_ok = |text: &str| text.parse::<std::net::SocketAddr>().is_ok();
            if !source.ha_proxy_server.is_empty() {
                if !addr_ok(&source.ha_proxy_server) {
                    return Err((
                        format!("{key}.ha_proxy_server"),
                        format!("`{}` is not ip:port", source.ha_proxy_server),
                    ));
                }
                if !source.socks5_proxy_server.is_empty() {
                    return Err((
                        format!("{key}.socks5_proxy_server"),
                        "a source goes through one relay: ha_proxy_server or socks5_proxy_server"
                            .into(),
                    ));
                }
                if source.source_ip.is_empty() {
                    return Err((
                        format!("{key}.source_ip"),
                        "a source behind ha_proxy_server needs the address the relay sends from"
                            .into(),
                    ));
                }
            }
            if !source.socks5_proxy_server.is_empty() && !addr_ok(&source.socks5_proxy_server) {
                return Err((
                    format!("{key}.socks5_proxy_server"),
                    format!("`{}` is not ip:port", source.socks5_proxy_server),
                ));
            }
            if source.socks5_username.len() > 255 || source.socks5_password.len() > 255 {
                return Err((
                    format!("{key}.socks5_username"),
                    "SOCKS5 usernames and passwords are at most 255 bytes (RFC 1929)".into(),
                ));
            }
        }
        for (domain, route) in &self.delivery.routes {
            let key = format!("delivery.routes.{domain}");
            if route.hosts.is_empty() {
                return Err((key, "a route needs at least one host".into()));
            }
            if let Some(auth) = &route.auth {
                if route.tls == Some(TlsMode::Disabled) {
                    return Err((
                        format!("{key}.auth"),
                        "AUTH credentials are sent only over TLS; this route's tls is \"disabled\""
                            .into(),
                    ));
                }
                if auth.username.is_empty() {
                    return Err((format!("{key}.auth.username"), "is empty".into()));
                }
            }
            if !route.server_name.is_empty() && !is_dns_name(&route.server_name) {
                return Err((
                    format!("{key}.server_name"),
                    format!("`{}` is not a DNS name", route.server_name),
                ));
            }
        }
        for (i, rule) in self.delivery.queues.iter().enumerate() {
            let key = format!("delivery.queues[{i}]");
            let sets = rule.retry_interval_secs.is_some()
                || rule.max_retry_interval_secs.is_some()
                || rule.max_age_secs.is_some()
                || rule.tls.is_some();
            if !sets {
                return Err((
                    key,
                    "the rule sets nothing (retry_interval_secs, max_retry_interval_secs, max_age_secs or tls)".into(),
                ));
            }
            for (name, value) in [
                ("tenant", &rule.tenant),
                ("campaign", &rule.campaign),
                ("domain", &rule.domain),
            ] {
                if value
                    .as_deref()
                    .is_some_and(|v| v.trim().is_empty() || v == ".")
                {
                    return Err((format!("{key}.{name}"), "is empty".into()));
                }
            }
        }
        self.check_warmup_plans()?;
        self.check_limits()?;
        self.cluster.check()?;
        self.check_events()?;
        if self.delivery.provider_files.is_empty() {
            // With provider files, the providers that plans and limits name are
            // checked once the files are read (`Config::load`).
            self.check_named_providers()?;
        }
        for (i, rule) in self.delivery.automation.iter().enumerate() {
            if let Some(source) = unknown_source(&self.delivery.sources, &rule.sources) {
                return Err((
                    format!("delivery.automation[{i}].sources"),
                    format!("source `{source}` is not defined in delivery.sources"),
                ));
            }
        }
        for (name, provider) in &self.delivery.providers {
            check_provider(
                &self.delivery.sources,
                &format!("delivery.providers.{name}"),
                provider,
            )?;
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

/// A file of provider rules (`delivery.provider_files`).
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ProviderFile {
    providers: std::collections::BTreeMap<String, shaping::Provider>,
}

fn read(path: &std::path::Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// `text` (from `origin`) deserialized, or the error with its key and line. Also
/// for the other TOML files gannet's tools read (the capacity planner's workloads).
pub fn parse_located<T: serde::de::DeserializeOwned>(
    text: &str,
    origin: &str,
) -> Result<T, ConfigError> {
    let de = toml::Deserializer::parse(text).map_err(|e| {
        located(
            text,
            origin,
            String::new(),
            e.span(),
            e.message().trim().to_string(),
        )
    })?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        located(
            text,
            origin,
            key,
            inner.span(),
            inner.message().trim().to_string(),
        )
    })
}

/// An error at `key` of `text` (from `origin`): at `span`, or where the key is set.
pub fn located(
    text: &str,
    origin: &str,
    key: String,
    span: Option<std::ops::Range<usize>>,
    message: String,
) -> ConfigError {
    let span = span.or_else(|| find_key(text, &key));
    let (line, column) = span.map_or((0, 0), |s| line_col(text, s.start));
    ConfigError::Invalid {
        origin: origin.to_string(),
        key,
        line,
        column,
        message,
    }
}

/// The first of `names` that is neither `default` nor one of `sources`.
fn unknown_source<'a>(
    sources: &std::collections::BTreeMap<String, EgressSource>,
    names: &'a [String],
) -> Option<&'a str> {
    (names.iter())
        .find(|s| *s != "default" && !sources.contains_key(*s))
        .map(String::as_str)
}

/// Checks a provider (at `key`, in the main file or a provider file) against the
/// egress sources defined: it has an MX suffix, and every source it and its response
/// rules name exists.
/// Whether `name` is a DNS name a certificate can be checked against.
pub fn is_dns_name(name: &str) -> bool {
    let labels_ok = name.split('.').all(|l| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    });
    labels_ok && name.len() <= 253
}

fn check_provider(
    sources: &std::collections::BTreeMap<String, EgressSource>,
    key: &str,
    provider: &shaping::Provider,
) -> Result<(), (String, String)> {
    if provider.mx_suffix.iter().all(|s| s.trim().is_empty()) {
        return Err((
            format!("{key}.mx_suffix"),
            "a provider rule needs at least one MX suffix".into(),
        ));
    }
    let undefined = |s: &str| format!("source `{s}` is not defined in delivery.sources");
    if let Some(source) = unknown_source(sources, &provider.sources) {
        return Err((format!("{key}.sources"), undefined(source)));
    }
    for (i, rule) in provider.automation.iter().enumerate() {
        if let Some(source) = unknown_source(sources, &rule.sources) {
            return Err((format!("{key}.automation[{i}].sources"), undefined(source)));
        }
    }
    Ok(())
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
    // A table of its own (`[delivery.limits.x]`): its header.
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_start();
        if let Some(inner) = trimmed.strip_prefix('[') {
            let inner = inner.trim_start_matches('[');
            let path: String = (inner.split(']').next().unwrap_or(""))
                .chars()
                .filter(|c| *c != '"' && *c != '\'' && !c.is_whitespace())
                .collect();
            if path == key.replace(' ', "") {
                let start = offset + (line.len() - trimmed.len());
                return Some(start..start + line.trim_end().len() - (line.len() - trimmed.len()));
            }
        }
        offset += line.len();
    }
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
    fn limits_over_several_queues_are_checked_and_keyed_by_their_scope() {
        // Each error names the key and its line.
        check_err(
            "[delivery.limits.x]\nper = \"source\"\n",
            &["t.toml:1:", "delivery.limits.x", "limits nothing"],
        );
        check_err(
            "[delivery.limits.x]\nconnection_limit = 0\n",
            &["t.toml:2:", "connection_limit"],
        );
        check_err(
            "[delivery.limits.x]\nper = \"tenant\"\nconnection_limit = 2\n",
            &["t.toml:2:", "per", "tenant"],
        );
        check_err(
            "[delivery.limits.x]\nmax_message_rate = \"fast\"\n",
            &["max_message_rate", "not a rate"],
        );
        check_err(
            "[delivery.limits.x]\nconnection_limit = 2\nsources = [\"ip9\"]\n",
            &["delivery.limits.x.sources", "source `ip9` is not defined"],
        );
        check_err(
            "[delivery.limits.x]\nconnection_limit = 2\nproviders = [\"nope\"]\n",
            &[
                "delivery.limits.x.providers",
                "provider `nope` is not defined",
            ],
        );
        check_err(
            "[delivery.limits.\"a b\"]\nconnection_limit = 2\n",
            &["delivery.limits.a b", "must not be empty nor hold spaces"],
        );
        check_err(
            "[delivery.providers.p]\nmx_suffix = [\".p.test\"]\nprovider_connection_limit = -1\n",
            &["t.toml:3:", "provider_connection_limit"],
        );
        let config = Config::parse(
            "[delivery.sources.ip1]\n[delivery.sources.ip2]\n\
             [delivery.providers.p]\nmx_suffix = [\".p.test\"]\nprovider_connection_limit = 5\n\
             [delivery.limits.site]\nper = \"site\"\nmax_message_rate = \"10/s\"\n\
             [delivery.limits.all]\nper = \"all\"\nsources = [\"ip2\"]\nmax_connection_rate = \"1/s\"\n\
             [delivery.limits.p-only]\nproviders = [\"p\"]\nconnection_limit = 9\n",
            "t.toml",
        )
        .unwrap();
        let table = crate::shaping::ShapingTable::new(&config.delivery);
        let keys = |source: &str, host: &str| -> Vec<String> {
            (table
                .limits_for(source, "site1", [host].into_iter())
                .into_iter())
            .map(|(key, _)| key)
            .collect()
        };
        assert_eq!(
            keys("ip1", "mx.p.test"),
            ["limit:p-only@ip1", "limit:site@site1", "provider:p@ip1"]
        );
        assert_eq!(
            keys("ip2", "mx.other.test"),
            ["limit:all", "limit:site@site1"]
        );
        let values = table.limits_for("ip1", "s", ["mx.p.test"].into_iter());
        assert_eq!(values[2].1.connection_limit, Some(5));
        assert_eq!(values[2].1.max_message_rate, shaping::Rate::Unlimited);
    }

    #[test]
    fn provider_files_add_providers_and_their_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("gannetd.toml");
        std::fs::write(
            &main,
            "[delivery]\nprovider_files = [\"p.toml\"]\n\
             [delivery.providers.yahoo]\nmx_suffix = [\".mine.test\"]\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("p.toml"),
            "[providers.yahoo]\nmx_suffix = [\".yahoodns.net\"]\n\
             [providers.google]\nmx_suffix = [\".google.com\"]\n\
             [[providers.google.automation]]\nenhanced = [\"4.7.28\"]\nactions = [\"suspend\"]\nduration = \"1h\"\n",
        )
        .unwrap();
        let config = Config::load(&main).unwrap();
        let providers = &config.delivery.providers;
        assert_eq!(providers.len(), 2);
        assert_eq!(
            providers["yahoo"].mx_suffix,
            vec![".mine.test"],
            "the main file wins"
        );
        assert_eq!(providers["google"].automation.len(), 1);
        // A bad rule in a provider file: that file, its key and line.
        std::fs::write(
            dir.path().join("p.toml"),
            "[providers.google]\nmx_suffix = [\".google.com\"]\n\
             [[providers.google.automation]]\nenhanced = [\"4.7.x\"]\nactions = [\"suspend\"]\nduration = \"1h\"\n",
        )
        .unwrap();
        let err = Config::load(&main).unwrap_err().to_string();
        assert!(err.contains("p.toml:3:"), "{err}");
        assert!(err.contains("providers.google.automation[0]"), "{err}");
        // A source the main file does not define.
        std::fs::write(
            dir.path().join("p.toml"),
            "[providers.google]\nmx_suffix = [\".google.com\"]\nsources = [\"ip7\"]\n",
        )
        .unwrap();
        let err = Config::load(&main).unwrap_err().to_string();
        assert!(err.contains("p.toml:3:"), "{err}");
        assert!(err.contains("source `ip7` is not defined"), "{err}");
        // A file that is not there.
        std::fs::remove_file(dir.path().join("p.toml")).unwrap();
        let err = Config::load(&main).unwrap_err().to_string();
        assert!(err.contains("p.toml"), "{err}");
    }

    /// The starter rules shipped in tuning/providers.toml load, and react to the
    /// replies their comments name.
    #[test]
    fn the_starter_provider_rules_match_the_replies_they_describe() {
        let text = include_str!("../../../tuning/providers.toml");
        let file: ProviderFile = parse_located(text, "providers.toml").unwrap();
        let mut delivery = DeliveryConfig::default();
        for (name, provider) in file.providers {
            check_provider(&delivery.sources, &name, &provider).unwrap();
            delivery.providers.insert(name, provider);
        }
        let rules = crate::adaptive::Rules::new(&delivery);
        let fires = |host: &str, code: u16, reply: &str| -> Vec<String> {
            let mut names = Vec::new();
            for i in rules.for_queue("default", [host].into_iter()) {
                let rule = rules.get(i).unwrap();
                if rule.matches(code, reply) {
                    names.push(rule.name.clone());
                }
            }
            names
        };
        for (host, code, reply, want) in [
            (
                "gmail-smtp-in.l.google.com",
                421,
                "421 4.7.28 Gmail has detected an unusual rate of unsolicited mail originating from your IP address.",
                "google#0",
            ),
            (
                "aspmx.l.google.com",
                421,
                "421 4.7.0 Try again later, closing connection.",
                "google#1",
            ),
            (
                "mta7.am0.yahoodns.net",
                421,
                "421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or user complaints",
                "yahoo#0",
            ),
            (
                "mta7.am0.yahoodns.net",
                554,
                "554 5.7.9 [TSS09] All messages from 192.0.2.1 will be permanently deferred; Retrying will NOT succeed",
                "yahoo#1",
            ),
            (
                "eur.olc.protection.outlook.com",
                421,
                "421 4.7.650 The mail server [192.0.2.1] has been temporarily rate limited due to IP reputation.",
                "outlook#0",
            ),
            (
                "eur.olc.protection.outlook.com",
                451,
                "451 4.7.500 Server busy. Please try again later from [192.0.2.1].",
                "outlook#1",
            ),
            (
                "eur.olc.protection.outlook.com",
                550,
                "550 5.7.606 Access denied, banned sending IP [192.0.2.1].",
                "outlook#2",
            ),
            (
                "x.mail.protection.outlook.com",
                550,
                "550 5.7.606 Access denied, banned sending IP [192.0.2.1].",
                "office365#1",
            ),
            (
                "mx1a1.comcast.net",
                421,
                "421 Service not available RL000001",
                "comcast#0",
            ),
        ] {
            assert_eq!(fires(host, code, reply), vec![want.to_string()], "{reply}");
        }
        // Ordinary replies fire nothing.
        for (host, code, reply) in [
            ("aspmx.l.google.com", 250, "250 2.0.0 OK"),
            (
                "aspmx.l.google.com",
                550,
                "550 5.1.1 The email account that you tried to reach does not exist.",
            ),
            ("mta7.am0.yahoodns.net", 421, "421 4.7.0 [TSS05] other"),
        ] {
            assert!(fires(host, code, reply).is_empty(), "{reply}");
        }
    }

    #[test]
    fn broker_sinks_are_checked() {
        check_err(
            "[[events.amqp]]\nname = \"r\"\nurl = \"http://h/\"\n",
            &["events.amqp[0].url", "not an amqp://"],
        );
        check_err(
            "[[events.amqp]]\nname = \"r\"\nurl = \"amqp://h\"\nevents = [\"delivery\", \"warp\"]\n",
            &["events.amqp[0].events", "warp"],
        );
        check_err(
            "[[events.amqp]]\nname = \"a b\"\nurl = \"amqp://h\"\n",
            &["events.amqp[0].name"],
        );
        check_err(
            "[[events.amqp]]\nname = \"r\"\nurl = \"amqp://h\"\n[[events.amqp]]\nname = \"r\"\nurl = \"amqp://h\"\n",
            &["events.amqp[1].name", "second sink"],
        );
        check_err(
            "[[events.amqp]]\nname = \"r\"\nurl = \"amqp://h\"\nexchange_type = \"circle\"\n",
            &["events.amqp[0].exchange_type"],
        );
        check_err(
            "[[events.amqp]]\nname = \"r\"\nurl = \"amqp://h\"\nqueue = \"x\"\n",
            &["t.toml:4:", "unknown field `queue`"],
        );
        let ok = Config::parse(
            "[[events.amqp]]\nname = \"rabbit\"\nurl = \"amqp://u:p@127.0.0.1:5673/%2f\"\n",
            "t.toml",
        )
        .unwrap();
        assert_eq!(ok.events.amqp[0].exchange, "gannet.events");
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
        // A response rule that cannot work names its provider, its index and line.
        check_err(
            "[delivery.providers.yahoo]\nmx_suffix = [\".yahoodns.net\"]\n[[delivery.providers.yahoo.automation]]\nregex = '[TSS04'\nduration = \"2h\"\nactions = [\"suspend\"]\n",
            &[
                "t.toml:3:",
                "delivery.providers.yahoo.automation[0]",
                "does not compile (unclosed character class)",
            ],
        );
        check_err(
            "[delivery]\nautomation = [{ regex = \"x\", duration = \"1h\", actions = [\"slow\"] }]\n",
            &[
                "t.toml:2:",
                "delivery.automation[0]",
                "unknown variant `slow`",
            ],
        );
        check_err(
            "[delivery]\nautomation = [{ regex = \"x\", duration = \"1h\", actions = [\"suspend\"], sources = [\"ip9\"] }]\n",
            &[
                "t.toml:2:",
                "delivery.automation[0].sources",
                "source `ip9` is not defined",
            ],
        );
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
        check_err(
            "[spool]\ncommit_window_us = 0\ncommit_gather_max_us = 250000\n",
            &[
                "t.toml:3:",
                "spool.commit_gather_max_us",
                "between 0 and 100000",
            ],
        );
        check_err(
            "[spool]\ncommit_gather_max_us = \"5ms\"\n",
            &["t.toml:2:", "spool.commit_gather_max_us"],
        );
        check_err(
            "[delivery]\nip_lookup = \"ipv6_first\"\n",
            &[
                "t.toml:2:",
                "delivery.ip_lookup",
                "unknown variant `ipv6_first`",
            ],
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
