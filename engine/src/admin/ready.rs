//! Suspensions of ready queues (`egress_source->site_name`), shaped like KumoMTA's
//! `/api/admin/suspend-ready-q/v1`: POST `{name, reason, duration}` defines one
//! (KumoMTA's `source->site@smtp_client` names are taken too), GET lists them with
//! the time left and the expiry, DELETE `{id}` lifts one. A suspended ready queue
//! opens no connection; what waits in it stays, and what arrives joins it.

use serde::Deserialize;

use super::{
    DurationText, Reply, add_bounded, expiry, invalid, lift, new_id, parse_with_reason, remaining,
};
use crate::shard::Shard;
use gannet_core::clock::{rfc3339, unix_ms};
use gannet_core::queue::admin::{ReadySuspension, ready_queue_name};

pub const PATH: &str = "/api/admin/suspend-ready-q/v1";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SuspendRequest {
    name: String,
    reason: String,
    duration: Option<DurationText>,
    expires: Option<String>,
}

/// POST: suspends a ready queue and returns the suspension's id.
pub async fn suspend(shard: &Shard, body: &[u8]) -> Reply {
    let request: SuspendRequest = match parse_with_reason(body, |r: &SuspendRequest| &r.reason) {
        Ok(r) => r,
        Err(reply) => return reply,
    };
    let name = ready_queue_name(&request.name);
    if !name.contains("->") {
        return invalid(&format!(
            "name: `{}` is not a ready queue name (`egress_source->site_name`)",
            request.name
        ));
    }
    let expires_unix_ms = match expiry(request.duration.as_ref(), request.expires.as_deref()) {
        Ok(at) => at,
        Err(reply) => return reply,
    };
    let suspension = ReadySuspension {
        id: new_id(),
        name: name.to_string(),
        reason: request.reason,
        expires_unix_ms,
    };
    let id = suspension.id.clone();
    add_bounded(
        shard,
        |state| &mut state.ready_suspensions,
        |s| s.expires_unix_ms,
        suspension,
        id,
        "ready-queue suspension",
    )
    .await
}

/// GET: the active ready-queue suspensions (KumoMTA's list entry: id, name, reason,
/// duration left, expires).
pub fn list(shard: &Shard) -> Reply {
    let now = unix_ms();
    let state = shard.shared.live.snapshot();
    let list: Vec<serde_json::Value> = (state.ready_suspensions.iter())
        .filter(|s| s.expires_unix_ms > now)
        .map(|s| {
            serde_json::json!({
                "id": s.id,
                "name": s.name,
                "reason": s.reason,
                "duration": remaining(s.expires_unix_ms, now),
                "expires": rfc3339(s.expires_unix_ms),
            })
        })
        .collect();
    (200, serde_json::Value::Array(list).to_string())
}

/// DELETE: lifts a ready-queue suspension by id.
pub async fn resume(shard: &Shard, body: &[u8]) -> Reply {
    lift(
        shard,
        body,
        |state| &mut state.ready_suspensions,
        |s| (&s.id, s.expires_unix_ms),
        "ready-queue suspension",
    )
    .await
}
