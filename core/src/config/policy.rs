//! `[policy]`: the metadata headers and the declarative rules applied in the SMTP
//! phases, with the replies they give.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{Bounded, Cidr};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    pub tenant_header: String,
    pub campaign_header: String,
    pub pool_header: String,
    /// The header that gives a message its own expiry (seconds from reception, or
    /// an RFC 3339 time); lifted into its metadata and removed like the others.
    pub expires_header: String,
    pub default_pool: String,
    pub tenant_pools: BTreeMap<String, String>,
    pub rules: Vec<Rule>,
    /// A Lua policy script (empty: none), loaded into one VM per shard.
    pub script: String,
    /// VM instructions one hook call may run before it is stopped (a tempfail).
    pub script_instruction_budget: Bounded<10_000, 1_000_000_000>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            tenant_header: "X-Gannet-Tenant".into(),
            campaign_header: "X-Gannet-Campaign".into(),
            pool_header: "X-Gannet-Pool".into(),
            expires_header: "X-Gannet-Expires".into(),
            default_pool: "default".into(),
            tenant_pools: BTreeMap::new(),
            rules: Vec::new(),
            script: String::new(),
            script_instruction_budget: Bounded(1_000_000),
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
