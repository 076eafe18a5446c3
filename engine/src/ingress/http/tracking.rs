//! The engagement tracking endpoints: `GET /o/<token>` answers a 1×1 transparent GIF
//! and records an open; `GET /c/<token>` redirects (302) to the link the token names
//! and records a click; `POST /u/<token>` with `List-Unsubscribe=One-Click` (RFC
//! 8058, what a mail client sends for `List-Unsubscribe-Post`) records a
//! list_unsubscribe event and, with `suppression.auto_add_unsubscribes`, puts the
//! recipient on its tenant's non-transactional suppression list (`GET` shows a
//! page whose button posts it: a link scanner's GET unsubscribes nobody). A token
//! whose signature does not verify is a 404 and records nothing, so the redirect
//! cannot be pointed anywhere else.

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
    let engagement = engagement(shard, &t, head, peer, unix_ms());
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

/// `/u/<token>`: one-click unsubscribe (RFC 8058).
pub fn unsubscribe(
    shard: &Rc<Shard>,
    token: &str,
    head: &hyper::http::request::Parts,
    body: &[u8],
    peer: Option<IpAddr>,
) -> Reply {
    let metrics = &shard.metrics;
    let Some(t) = shard
        .shared
        .tracking_key
        .open(token)
        .filter(|t| t.kind == Kind::Unsubscribe)
    else {
        ShardMetrics::add(&metrics.tracking_bad_tokens_total, 1);
        return Reply::error(
            404,
            "1600",
            "resource not found",
            "unknown unsubscribe link",
        );
    };
    match head.method {
        hyper::Method::GET | hyper::Method::HEAD => {
            return Reply {
                status: 200,
                content_type: "text/html; charset=utf-8",
                body: bytes::Bytes::from_static(
                    b"<!doctype html><html><body><form method=\"post\">\
                      <input type=\"hidden\" name=\"List-Unsubscribe\" value=\"One-Click\">\
                      <button type=\"submit\">Unsubscribe</button></form></body></html>",
                ),
                location: None,
            };
        }
        hyper::Method::POST => {}
        _ => return super::method_not_allowed(),
    }
    // `List-Unsubscribe=One-Click`, form-urlencoded or as a multipart field.
    let asked = body.windows(b"One-Click".len()).any(|w| w == b"One-Click")
        && body
            .windows(b"List-Unsubscribe".len())
            .any(|w| w.eq_ignore_ascii_case(b"List-Unsubscribe"));
    if !asked {
        return Reply::error(
            400,
            "1300",
            "invalid data format/type",
            "a one-click unsubscribe posts List-Unsubscribe=One-Click (RFC 8058)",
        );
    }
    let now = unix_ms();
    ShardMetrics::add(&metrics.list_unsubscribes_total, 1);
    shard.event(&Event::ListUnsubscribe(engagement(
        shard, &t, head, peer, now,
    )));
    if shard.config().suppression.auto_add_unsubscribes {
        shard.shared.suppressions.add_auto(
            &t.tenant,
            &t.rcpt_to,
            crate::suppression::Kind::NonTransactional,
            "List Unsubscribe",
            format!("one-click unsubscribe from message {}", t.message_id),
            now,
        );
        ShardMetrics::add(&metrics.suppression_auto_added_total, 1);
    }
    Reply {
        status: 200,
        content_type: "text/plain; charset=utf-8",
        body: bytes::Bytes::from_static(b"You are unsubscribed.\n"),
        location: None,
    }
}

/// The event of a token's use: what the token names, who used it (an
/// unsubscribe token's URL is empty, so it records no link).
fn engagement<'t>(
    shard: &Shard,
    t: &'t crate::merge::tracking::Tracked,
    head: &'t hyper::http::request::Parts,
    peer: Option<IpAddr>,
    now: u64,
) -> Engagement<'t> {
    Engagement {
        timestamp_ms: now,
        shard: shard.id,
        message_id: &t.message_id,
        rcpt_to: &t.rcpt_to,
        transmission_id: &t.transmission_id,
        campaign_id: &t.campaign_id,
        tenant: &t.tenant,
        template_id: &t.template_id,
        target_link_url: &t.url,
        user_agent: head
            .headers
            .get(hyper::header::USER_AGENT)
            .and_then(|v| v.to_str().ok()),
        ip_address: peer.map(|ip| ip.to_string()),
    }
}
