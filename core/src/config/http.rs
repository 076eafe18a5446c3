//! `[http]`: the HTTP listeners, the services each serves, API keys and their roles,
//! mail merge and tracking settings.

use serde::Deserialize;

use super::{Bounded, Cidr, Listen};

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
    /// One-click unsubscribe (RFC 8058) in every non-transactional message of a
    /// transmission whose content has no List-Unsubscribe of its own:
    /// `List-Unsubscribe: <…/u/…>` and `List-Unsubscribe-Post`.
    pub list_unsubscribe: bool,
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
            list_unsubscribe: true,
            click_tracking_default: false,
        }
    }
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
