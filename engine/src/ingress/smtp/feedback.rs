//! Mail to `inbound.domains`: read as a report (`crate::feedback`), recorded as
//! out_of_band or spam_complaint events, and never relayed. A hard out-of-band
//! bounce and a complaint add their recipient to its tenant's suppression list as
//! `[suppression]` says — only when the report quotes a feedback token that
//! verifies: anyone can send mail to these domains, and a forged report must not
//! suppress an address.

use std::rc::Rc;

use crate::events::{Event, Returned};
use crate::feedback::Feedback;
use crate::merge::tracking::Tracked;
use crate::metrics::ShardMetrics;
use crate::shard::Shard;
use crate::suppression::Kind;
use gannet_core::bounce;
use gannet_core::reply::Response;

/// Whether `rcpt` is at one of `inbound.domains`.
pub fn is_inbound(shard: &Shard, rcpt: &str) -> bool {
    let domain = rcpt.rsplit_once('@').map_or("", |(_, d)| d);
    (shard.config().inbound.domains.iter()).any(|d| d.eq_ignore_ascii_case(domain))
}

/// Reads one message sent to an inbound domain and records what it reports. The
/// MIME parse runs on a thread of its own (a report can be as large as any
/// message), never on the shard.
pub async fn consume(shard: &Rc<Shard>, message: Vec<u8>, peer: std::net::IpAddr, now: u64) {
    let metrics = &shard.metrics;
    let shared = shard.shared.clone();
    let parsed = crate::io::on_thread("gannet-feedback", move || {
        crate::feedback::parse(&message, &shared.tracking_key)
    })
    .await
    .flatten();
    let Some(feedback) = parsed else {
        ShardMetrics::add(&metrics.inbound_unrecognized_total, 1);
        return;
    };
    let remote_addr = peer.to_string();
    let suppression = &shard.config().suppression;
    match feedback {
        Feedback::Bounce { original, failed } => {
            let verified = original.is_some();
            let o = original.unwrap_or_else(unnamed);
            for f in &failed {
                let digits: String = f.reason.chars().take_while(char::is_ascii_digit).collect();
                let code = digits
                    .parse::<u16>()
                    .ok()
                    .filter(|c| (400..600).contains(c));
                let code = code.unwrap_or(if f.status.starts_with('4') { 450 } else { 550 });
                let text = f.reason.get(digits.len()..).unwrap_or("").trim();
                let text =
                    if gannet_core::reply::is_enhanced_code(text.split(' ').next().unwrap_or("")) {
                        text.to_string()
                    } else {
                        format!("{} {text}", f.status)
                    };
                let class = bounce::classify(&Response::local(code, text));
                let error_code = code.to_string();
                ShardMetrics::add(&metrics.inbound_bounces_total, 1);
                shard.event(&Event::OutOfBand(Returned {
                    bounce_class: Some(class),
                    raw_reason: Some(&f.reason),
                    error_code: Some(&error_code),
                    ..returned(shard, &o, &f.rcpt, &remote_addr, now)
                }));
                if verified
                    && shard.shared.suppressions.hard_bounce(
                        suppression,
                        &o.tenant,
                        &f.rcpt,
                        class,
                        format!("out-of-band bounce class {class}: {}", f.reason),
                        now,
                    )
                {
                    ShardMetrics::add(&metrics.suppression_auto_added_total, 1);
                }
            }
        }
        Feedback::Complaint {
            original,
            feedback_type,
            rcpt,
            user_agent,
            reported_by,
        } => {
            let verified = original.is_some();
            let o = original.unwrap_or_else(unnamed);
            let rcpt = rcpt.unwrap_or_default();
            ShardMetrics::add(&metrics.inbound_complaints_total, 1);
            shard.event(&Event::SpamComplaint(Returned {
                fbtype: Some(&feedback_type),
                user_agent: user_agent.as_deref(),
                report_by: reported_by.as_deref(),
                ..returned(shard, &o, &rcpt, &remote_addr, now)
            }));
            if verified
                && suppression.auto_add_complaints
                && !rcpt.is_empty()
                && feedback_type != "not-spam"
            {
                shard.shared.suppressions.add_auto(
                    &o.tenant,
                    &rcpt,
                    Kind::NonTransactional,
                    "Spam Complaint",
                    format!("{feedback_type} report"),
                    now,
                );
                ShardMetrics::add(&metrics.suppression_auto_added_total, 1);
            }
        }
    }
}

/// The event of a report about message `o` (its token's fields) and `rcpt`, with
/// nothing of the report itself yet.
fn returned<'a>(
    shard: &Shard,
    o: &'a Tracked,
    rcpt: &'a str,
    remote_addr: &str,
    now: u64,
) -> Returned<'a> {
    Returned {
        timestamp_ms: now,
        shard: shard.id,
        message_id: &o.message_id,
        rcpt_to: rcpt,
        transmission_id: &o.transmission_id,
        campaign_id: &o.campaign_id,
        tenant: &o.tenant,
        template_id: &o.template_id,
        bounce_class: None,
        raw_reason: None,
        error_code: None,
        fbtype: None,
        user_agent: None,
        report_by: None,
        remote_addr: remote_addr.to_string(),
    }
}

/// What a report that names no message of ours says of it: nothing.
fn unnamed() -> Tracked {
    Tracked {
        kind: crate::merge::tracking::Kind::Feedback,
        message_id: String::new(),
        rcpt_to: String::new(),
        transmission_id: String::new(),
        campaign_id: String::new(),
        tenant: String::new(),
        template_id: String::new(),
        url: String::new(),
    }
}
