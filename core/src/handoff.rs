//! What one shard hands another to deliver, and the report that comes back: owned
//! values that cross cores (the engine's mesh carries them).

use std::net::SocketAddr;
use std::sync::Arc;

use crate::reply::Response;

/// A destination site crosses cores as it is (owned values and `Arc`s).
pub type SiteSpec = crate::queue::Site;

/// A part for the owner of its site to deliver.
#[derive(Debug)]
pub struct Handoff {
    /// The shard that spooled the message (it gets the report).
    pub from: u16,
    /// The sender's handle for the part.
    pub token: u64,
    pub sender: String,
    pub recipients: Vec<String>,
    /// One copy of the body per hop: the spool mapping cannot leave its shard.
    pub body: Arc<Vec<u8>>,
    pub site: SiteSpec,
    /// The egress source drawn for this attempt (by name; every shard has the same
    /// configuration).
    pub egress: String,
    /// The message's tenant and campaign: a response rule that fires on the owner
    /// (suspend_tenant, suspend_campaign) holds back whose mail this is. (At most two
    /// short strings per hop, beside the body's copy.)
    pub tenant: Option<String>,
    pub campaign: Option<String>,
}

/// The outcome of a handed-off part, for the shard that spooled the message.
#[derive(Debug)]
pub struct Report {
    pub token: u64,
    /// One reply per recipient of the handoff, in order.
    pub results: Vec<Response>,
    pub peer: Option<SocketAddr>,
    pub tls: Option<String>,
    /// The owner's ready queue was full (max_ready): nothing was tried, and the part
    /// is delayed rather than failed.
    pub delayed: bool,
}
