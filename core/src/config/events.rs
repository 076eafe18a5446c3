//! `[events]`: the shards' event logs and the hose that ships them — batching,
//! retries, webhook bounds — and the message brokers it publishes to
//! (`[[events.amqp]]`).

use serde::Deserialize;

use super::Bounded;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventsConfig {
    pub file_bytes_max: Bounded<4096, { 1 << 40 }>,
    pub files_kept: Bounded<0, 100_000>,
    /// Event files the hose has not shipped yet are kept up to this many bytes per
    /// shard; past it the oldest go (and are counted as lost).
    pub unshipped_bytes_max: Bounded<{ 1 << 20 }, { 1 << 50 }>,
    /// The hose: events in one batch at most.
    pub batch_events_max: Bounded<1, 100_000>,
    /// A batch goes out when this many milliseconds passed since its first event
    /// was written, full or not.
    pub batch_wait_ms: Bounded<0, 600_000>,
    /// A batch that keeps failing is given up after this long.
    pub retry_max_secs: Bounded<0, 2_592_000>,
    /// Pauses between attempts double from 1 s up to this.
    pub retry_interval_max_secs: Bounded<1, 86_400>,
    /// One POST to a webhook (connect, send, answer) at most.
    pub request_timeout_secs: Bounded<1, 600>,
    /// Webhooks at most (all tenants).
    pub webhooks_max: Bounded<0, 10_000>,
    /// AMQP 0-9-1 brokers (RabbitMQ) the hose publishes every event to.
    pub amqp: Vec<AmqpSink>,
    /// SparkPost's Metrics API, tallied from the events.
    pub metrics: MetricsApiConfig,
}

/// `[events.metrics]`: the deliverability metrics (`/api/v1/metrics`) gannet tallies
/// from its own events, per minute, hour and day, for every combination of tenant,
/// recipient domain, campaign, template, sending IP, IP pool and sending domain.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsApiConfig {
    pub enabled: bool,
    /// Minute buckets (precisions 1min, 5min, 15min) are kept this long.
    pub minute_retention_hours: Bounded<1, 8_760>,
    /// Hour buckets (precisions hour, 12hr) are kept this long.
    pub hour_retention_days: Bounded<1, 3_660>,
    /// Day buckets (precisions day, week, month) are kept this long.
    pub retention_days: Bounded<1, 36_600>,
    /// Distinct combinations of the dimensions at most; past it new ones are
    /// tallied under `(other)` in every dimension (counted).
    pub keys_max: Bounded<1, 100_000_000>,
    /// Messages remembered as opened or clicked, for the unique counts
    /// (count_unique_rendered, count_unique_clicked); the oldest are forgotten first.
    pub engaged_messages_max: Bounded<1, 1_000_000_000>,
}

impl Default for MetricsApiConfig {
    fn default() -> Self {
        MetricsApiConfig {
            enabled: true,
            minute_retention_hours: Bounded(48),
            hour_retention_days: Bounded(31),
            retention_days: Bounded(183),
            keys_max: Bounded(1_000_000),
            engaged_messages_max: Bounded(2_000_000),
        }
    }
}

/// A broker the hose publishes to: one persistent message per event (SparkPost's
/// event object, `application/json`), routing key `routing_key_prefix` + the event
/// type, with publisher confirms.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpSink {
    /// Names the sink in metrics and its cursor file.
    pub name: String,
    /// `amqp://user:password@host:port/vhost` (`amqps://` for TLS; the vhost
    /// percent-encoded, `%2f` for `/`).
    pub url: String,
    #[serde(default = "default_exchange")]
    pub exchange: String,
    /// Declared (durable) at connect unless `declare = false`.
    #[serde(default = "default_exchange_type")]
    pub exchange_type: String,
    #[serde(default = "yes")]
    pub declare: bool,
    /// Event types published (SparkPost's names); empty: all of SparkPost's.
    #[serde(default)]
    pub events: Vec<String>,
    #[serde(default)]
    pub routing_key_prefix: String,
    /// Only this tenant's events.
    #[serde(default)]
    pub tenant: Option<String>,
}

fn default_exchange() -> String {
    "gannet.events".into()
}

fn default_exchange_type() -> String {
    "topic".into()
}

fn yes() -> bool {
    true
}

/// A parsed `amqp://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmqpUrl {
    pub tls: bool,
    pub user: String,
    pub password: String,
    pub host: String,
    pub port: u16,
    pub vhost: String,
}

impl AmqpUrl {
    /// Parses `amqp[s]://[user[:password]@]host[:port][/vhost]` (RabbitMQ's URI
    /// spec: user, password and vhost percent-decoded; the defaults guest, guest,
    /// 5672 or 5671, and `/`).
    pub fn parse(url: &str) -> Result<AmqpUrl, String> {
        let (tls, rest) = if let Some(rest) = url.strip_prefix("amqps://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("amqp://") {
            (false, rest)
        } else {
            return Err(format!("`{url}` is not an amqp:// or amqps:// URL"));
        };
        let (authority, vhost) = match rest.split_once('/') {
            Some((a, v)) => (a, Some(v)),
            None => (rest, None),
        };
        let (userinfo, host, port) = super::net::split_authority(url, authority)?;
        let (user, password) = match userinfo {
            Some(u) => match u.split_once(':') {
                Some((user, password)) => (decode(user)?, decode(password)?),
                None => (decode(u)?, String::new()),
            },
            None => ("guest".into(), "guest".into()),
        };
        let port = port.unwrap_or(if tls { 5671 } else { 5672 });
        let vhost = match vhost {
            None | Some("") => "/".to_string(),
            Some(v) => decode(v)?,
        };
        Ok(AmqpUrl {
            tls,
            user,
            password,
            host: host.to_string(),
            port,
            vhost,
        })
    }
}

/// Percent-decoding (`%2f` is `/`).
fn decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent-encoding in `{text}`"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("`{text}` is not UTF-8 once decoded"))
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            file_bytes_max: Bounded(64 << 20),
            files_kept: Bounded(8),
            unshipped_bytes_max: Bounded(32 << 30),
            batch_events_max: Bounded(1000),
            batch_wait_ms: Bounded(1000),
            retry_max_secs: Bounded(28_800),
            retry_interval_max_secs: Bounded(300),
            request_timeout_secs: Bounded(30),
            webhooks_max: Bounded(100),
            amqp: Vec::new(),
            metrics: MetricsApiConfig::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amqp_urls() {
        let url = AmqpUrl::parse("amqp://u%40x:p%3Aw@rabbit.test:5673/%2fprod").unwrap();
        assert_eq!(
            url,
            AmqpUrl {
                tls: false,
                user: "u@x".into(),
                password: "p:w".into(),
                host: "rabbit.test".into(),
                port: 5673,
                vhost: "/prod".into(),
            }
        );
        let url = AmqpUrl::parse("amqps://h").unwrap();
        assert_eq!(
            (url.port, url.vhost.as_str(), url.user.as_str()),
            (5671, "/", "guest")
        );
        let url = AmqpUrl::parse("amqp://[::1]:5700/v").unwrap();
        assert_eq!((url.host.as_str(), url.port), ("::1", 5700));
        for bad in ["http://h/", "amqp://", "amqp://h:99999/", "amqp://h/%zz"] {
            assert!(AmqpUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
