//! Bounces, shaped like KumoMTA's `/api/admin/bounce/v1`: POST defines one — every
//! queued part of the selected scheduled queues is bounced (an AdminBounce event per
//! recipient unless `suppress_logging`), and so is every part of them that comes due
//! or is injected until it expires; GET lists them with what each has bounced; DELETE
//! `{id}` cancels one. gannet adds `dry_run`: count what a bounce would take now,
//! by scheduled queue, and change nothing.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{
    DurationText, Reply, ask, error, expiry, invalid, lift, new_id, parse_with_reason, remaining,
    saved_and_applied, selector,
};
use crate::live::LiveBounce;
use crate::notes::Question;
use crate::shard::Shard;
use gannet_core::clock::unix_ms;
use gannet_core::queue::admin::AdminBounce;

pub const PATH: &str = "/api/admin/bounce/v1";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BounceRequest {
    campaign: Option<String>,
    tenant: Option<String>,
    domain: Option<String>,
    /// KumoMTA's; gannet routes by the recipient's domain, so only null is taken.
    routing_domain: Option<String>,
    reason: String,
    duration: Option<DurationText>,
    expires: Option<String>,
    #[serde(default)]
    suppress_logging: bool,
    #[serde(default)]
    queue_names: Vec<String>,
    #[serde(default)]
    dry_run: bool,
}

/// POST: defines a bounce (with its id), or with `dry_run` counts what it would take.
pub async fn bounce(shard: &Shard, body: &[u8]) -> Reply {
    let request: BounceRequest = match parse_with_reason(body, |r: &BounceRequest| &r.reason) {
        Ok(r) => r,
        Err(reply) => return reply,
    };
    if request.routing_domain.is_some() {
        return invalid(
            "routing_domain: gannet has no routing domains (a message is routed by its recipient's domain); select with domain",
        );
    }
    let expires_unix_ms = match expiry(request.duration.as_ref(), request.expires.as_deref()) {
        Ok(at) => at,
        Err(reply) => return reply,
    };
    let queues = selector(
        request.domain,
        request.tenant,
        request.campaign,
        request.queue_names,
    );
    if request.dry_run {
        let answers = match ask(shard, Question::Count(queues)).await {
            Ok(a) => a,
            Err(reply) => return reply,
        };
        let mut bounced: BTreeMap<String, u64> = BTreeMap::new();
        let mut recipients = 0;
        for (_, answer) in &answers {
            if let Some(by_queue) = answer["bounced"].as_object() {
                for (queue, n) in by_queue {
                    *bounced.entry(queue.clone()).or_default() += n.as_u64().unwrap_or(0);
                }
            }
            recipients += answer["recipients"].as_u64().unwrap_or(0);
        }
        let total: u64 = bounced.values().sum();
        return (
            200,
            serde_json::json!({
                "dry_run": true,
                "bounced": bounced,
                "total_bounced": total,
                "recipients": recipients,
            })
            .to_string(),
        );
    }
    let bounce = AdminBounce {
        id: new_id(),
        queues,
        reason: request.reason,
        expires_unix_ms,
        suppress_logging: request.suppress_logging,
    };
    let id = bounce.id.clone();
    let now = unix_ms();
    let shared = &shard.shared;
    let max = shared.config.delivery.suspensions_max.usize();
    let added = shared.live.update(|state| {
        state.bounces.retain(|b| b.bounce.expires_unix_ms > now);
        if state.bounces.len() >= max {
            return false;
        }
        tracing::info!(?bounce, "bounce defined");
        state.bounces.push(LiveBounce::new(bounce));
        true
    });
    if !added {
        return error(
            422,
            "too many bounces",
            &format!(
                "at most {max} bounces are active at once (delivery.suspensions_max); cancel some first"
            ),
        );
    }
    if let Err(reply) = saved_and_applied(shard).await {
        return reply;
    }
    // KumoMTA's response (200, as it answers): the shards sweep their queues
    // within a round, so the counts are not known yet.
    (
        200,
        serde_json::json!({ "id": id, "bounced": {}, "total_bounced": 0 }).to_string(),
    )
}

/// GET: the bounces in force (KumoMTA's list entry), each with the time left and
/// what it has bounced by scheduled queue since gannetd started.
pub fn list(shard: &Shard) -> Reply {
    let now = unix_ms();
    let state = shard.shared.live.snapshot();
    let list: Vec<serde_json::Value> = (state.bounces.iter())
        .filter(|b| b.bounce.expires_unix_ms > now)
        .map(|b| {
            let bounced = b.counts();
            let total: usize = bounced.values().sum();
            let q = &b.bounce.queues;
            serde_json::json!({
                "id": b.bounce.id,
                "campaign": q.campaign,
                "tenant": q.tenant,
                "domain": q.domain,
                "routing_domain": null,
                "queue_names": q.queue_names,
                "reason": b.bounce.reason,
                "duration": remaining(b.bounce.expires_unix_ms, now),
                "suppress_logging": b.bounce.suppress_logging,
                "bounced": bounced,
                "total_bounced": total,
            })
        })
        .collect();
    (200, serde_json::Value::Array(list).to_string())
}

/// DELETE: cancels a bounce by id (what it bounced stays bounced).
pub async fn cancel(shard: &Shard, body: &[u8]) -> Reply {
    lift(
        shard,
        body,
        |state| &mut state.bounces,
        |b| (&b.bounce.id, b.bounce.expires_unix_ms),
        "bounce",
    )
    .await
}
