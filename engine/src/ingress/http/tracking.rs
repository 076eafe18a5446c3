//! The engagement tracking endpoints: `GET /o/<token>` answers a 1×1 transparent GIF
//! and records an open; `GET /c/<token>` redirects (302) to the link the token names
//! and records a click. A token whose signature does not verify is a 404 and records
//! nothing, so the redirect cannot be pointed anywhere else.

use std::net::IpAddr;
use std::rc::Rc;

use super::Reply;
use crate::events::{Engagement, Event};
use crate::merge::tracking::Kind;
use crate::metrics::ShardMetrics;
use crate::shard::Shard;
use gannet_core::clock::unix_ms;

/// A 1×1 transparent GIF.
const PIXEL: &[u8] = &[
    0x47, 0x49, 0x46, 0x38, 0x39, 0x61, 0x01, 0x00, 0x01, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00,
    0xff, 0xff, 0xff, 0x21, 0xf9, 0x04, 0x01, 0x00, 0x00, 0x00, 0x00, 0x2c, 0x00, 0x00, 0x00, 0x00,
    0x01, 0x00, 0x01, 0x00, 0x00, 0x02, 0x02, 0x44, 0x01, 0x00, 0x3b,
];

pub fn hit(
    shard: &Rc<Shard>,
    token: &str,
    click: bool,
    head: &hyper::http::request::Parts,
    peer: Option<IpAddr>,
) -> Reply {
    let metrics = &shard.metrics;
    let want = if click { Kind::Click } else { Kind::Open };
    let Some(t) = shard
        .shared
        .tracking_key
        .open(token)
        .filter(|t| t.kind == want)
    else {
        ShardMetrics::add(&metrics.tracking_bad_tokens_total, 1);
        return Reply::error(404, "1600", "resource not found", "unknown tracking link");
    };
    let user_agent = head
        .headers
        .get(hyper::header::USER_AGENT)
        .and_then(|v| v.to_str().ok());
    let engagement = Engagement {
        timestamp_ms: unix_ms(),
        shard: shard.id,
        message_id: &t.message_id,
        rcpt_to: &t.rcpt_to,
        transmission_id: &t.transmission_id,
        campaign_id: &t.campaign_id,
        tenant: &t.tenant,
        template_id: &t.template_id,
        target_link_url: &t.url,
        user_agent,
        ip_address: peer.map(|ip| ip.to_string()),
    };
    if click {
        ShardMetrics::add(&metrics.tracking_clicks_total, 1);
        shard.event(&Event::Click(engagement));
        Reply {
            status: 302,
            content_type: "text/plain",
            body: bytes::Bytes::new(),
            location: Some(t.url.clone()),
        }
    } else {
        ShardMetrics::add(&metrics.tracking_opens_total, 1);
        shard.event(&Event::Open(engagement));
        Reply {
            status: 200,
            content_type: "image/gif",
            body: bytes::Bytes::from_static(PIXEL),
            location: None,
        }
    }
}
