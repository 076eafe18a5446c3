//! Policy phases: the hook points of a message's path through ingress.
//!
//! The SMTP session calls a [`Policy`] at each phase — connect, ehlo, mail_from,
//! rcpt_to, data, set_binding, final_validation — and obeys its verdict. Today the
//! only implementation is [`rules::RulesPolicy`], the declarative rules of the
//! configuration. A Lua script ([`script::Script`], one VM per shard) is asked after
//! it, in the same phases.
//!
//! Every method is called on the hot path of a session: implementations must be cheap
//! (no I/O, no awaits) and must not panic on any input.

pub mod rules;
pub mod script;

use std::net::IpAddr;

use gannet_core::reply::Reply;

/// What a phase decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No opinion: the session's defaults apply (for rcpt_to: relay control).
    Continue,
    /// Accepted outright. For rcpt_to this permits relaying to the recipient even
    /// from a client that may not relay.
    Accept,
    /// Refused with this reply (4xx or 5xx).
    Reject(Reply),
}

/// What is known about the client when a phase runs. The declarative rules read only
/// the address; the rest is there for scripted policies.
#[derive(Debug, Clone, Copy)]
#[allow(dead_code)]
pub struct Client<'a> {
    pub ip: IpAddr,
    pub helo: Option<&'a str>,
    pub tls: bool,
    pub auth_user: Option<&'a str>,
}

/// A message after DATA, for the phases that see its content.
#[derive(Debug)]
#[allow(dead_code)]
pub struct Draft<'a> {
    pub sender: &'a str,
    pub recipients: &'a [String],
    pub size_bytes: u64,
    pub tenant: Option<&'a str>,
    pub campaign: Option<&'a str>,
    /// The pool named by the pool header, if any.
    pub requested_pool: Option<&'a str>,
}

/// The phases. Default methods say "no opinion".
pub trait Policy: std::fmt::Debug {
    fn connect(&self, _client: &Client<'_>) -> Verdict {
        Verdict::Continue
    }

    fn ehlo(&self, _client: &Client<'_>) -> Verdict {
        Verdict::Continue
    }

    fn mail_from(&self, _client: &Client<'_>, _sender: &str) -> Verdict {
        Verdict::Continue
    }

    fn rcpt_to(&self, _client: &Client<'_>, _sender: &str, _recipient: &str) -> Verdict {
        Verdict::Continue
    }

    fn data(&self, _client: &Client<'_>, _draft: &Draft<'_>) -> Verdict {
        Verdict::Continue
    }

    /// Chooses the egress pool the message will leave through.
    fn set_binding(&self, client: &Client<'_>, draft: &Draft<'_>) -> String;

    /// The last look before the message is spooled (DKIM signing will run here).
    fn final_validation(
        &self,
        _client: &Client<'_>,
        _draft: &Draft<'_>,
        _body: &mut Vec<u8>,
    ) -> Verdict {
        Verdict::Continue
    }
}

/// The domain of an address (`""` for the null sender).
pub fn domain_of(address: &str) -> &str {
    address.rsplit_once('@').map_or("", |(_, d)| d)
}
