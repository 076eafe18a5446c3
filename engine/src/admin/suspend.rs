//! Suspensions of scheduled queues, shaped like KumoMTA's `/api/admin/suspend/v1`
//! (POST defines one, GET lists them, DELETE lifts one), and retrying scheduled
//! queues now (`/api/admin/retry/v1`, POST: what Postfix's `postqueue -f` does for
//! its whole queue).

use serde::Deserialize;

use super::{
    DurationText, Reply, add_bounded, expiry, lift, new_id, parse_with_reason, remaining, selector,
    wake_all,
};
use crate::shard::Shard;
use gannet_core::clock::unix_ms;
use gannet_core::shaping::Suspension;

pub const SUSPEND: &str = "/api/admin/suspend/v1";
pub const RETRY: &str = "/api/admin/retry/v1";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SuspendRequest {
    domain: Option<String>,
    tenant: Option<String>,
    campaign: Option<String>,
    #[serde(default)]
    queue_names: Vec<String>,
    reason: String,
    duration: Option<DurationText>,
    expires: Option<String>,
}

/// A retry request: the selector's fields as in [`SuspendRequest`], spelled out in
/// each (serde's `flatten` does not work with `deny_unknown_fields`, and an unknown
/// field must be refused by name).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetryBody {
    domain: Option<String>,
    tenant: Option<String>,
    campaign: Option<String>,
    #[serde(default)]
    queue_names: Vec<String>,
    reason: String,
}

/// POST: defines a suspension and returns its id.
pub async fn suspend(shard: &Shard, body: &[u8]) -> Reply {
    let request: SuspendRequest = match parse_with_reason(body, |r: &SuspendRequest| &r.reason) {
        Ok(r) => r,
        Err(reply) => return reply,
    };
    let expires_unix_ms = match expiry(request.duration.as_ref(), request.expires.as_deref()) {
        Ok(at) => at,
        Err(reply) => return reply,
    };
    let suspension = Suspension {
        id: new_id(),
        queues: selector(
            request.domain,
            request.tenant,
            request.campaign,
            request.queue_names,
        ),
        reason: request.reason,
        expires_unix_ms,
    };
    let id = suspension.id.clone();
    add_bounded(
        shard,
        |state| &mut state.suspensions,
        |s| s.expires_unix_ms,
        suspension,
        id,
        "suspension",
    )
    .await
}

/// POST to the retry verb: every scheduled part of the selected queues (all of them
/// when nothing is selected) becomes due now on every shard; parts held by a
/// suspension stay held. 202: the shards apply it within a maintainer round.
pub async fn retry(shard: &Shard, body: &[u8]) -> Reply {
    let request: RetryBody = match parse_with_reason(body, |r: &RetryBody| &r.reason) {
        Ok(r) => r,
        Err(reply) => return reply,
    };
    let queues = selector(
        request.domain,
        request.tenant,
        request.campaign,
        request.queue_names,
    );
    let seq = shard.shared.live.update(|state| {
        let seq = state.retries.last().map_or(0, |r| r.seq) + 1;
        tracing::info!(
            seq,
            ?queues,
            reason = request.reason,
            "retry of scheduled queues requested"
        );
        if state.retries.len() >= crate::live::RETRIES_KEPT {
            state.retries.remove(0);
        }
        state.retries.push(crate::live::RetryRequest {
            seq,
            queues,
            reason: request.reason,
        });
        seq
    });
    wake_all(shard);
    (202, serde_json::json!({ "id": seq }).to_string())
}

/// GET: the active suspensions, each with the time it has left.
pub fn list(shard: &Shard) -> Reply {
    let now = unix_ms();
    let state = shard.shared.live.snapshot();
    let list: Vec<serde_json::Value> = state
        .suspensions
        .iter()
        .filter(|s| s.expires_unix_ms > now)
        .map(|s| {
            let mut v = serde_json::to_value(s).unwrap_or_default();
            v["duration"] = remaining(s.expires_unix_ms, now).into();
            v
        })
        .collect();
    (200, serde_json::Value::Array(list).to_string())
}

/// DELETE: lifts a suspension by id.
pub async fn resume(shard: &Shard, body: &[u8]) -> Reply {
    lift(
        shard,
        body,
        |state| &mut state.suspensions,
        |s| (&s.id, s.expires_unix_ms),
        "suspension",
    )
    .await
}
