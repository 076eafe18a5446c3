//! Suspensions of ready queues (`egress_source->site_name`), shaped like KumoMTA's
//! `/api/admin/suspend-ready-q/v1`: POST `{name, reason, duration}` defines one
//! (KumoMTA's `source->site@smtp_client` names are taken too), GET lists them with
//! the time left and the expiry, DELETE `{id}` lifts one. A suspended ready queue
//! opens no connection; what waits in it stays, and what arrives joins it.

use serde::Deserialize;

use super::{
    DurationText, IdRequest, Reply, error, expiry, invalid, new_id, parse, parse_with_reason,
    remaining, saved_and_applied,
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
    let now = unix_ms();
    let shared = &shard.shared;
    let max = shared.config.delivery.suspensions_max.usize();
    let added = shared.live.update(|state| {
        state.ready_suspensions.retain(|s| s.expires_unix_ms > now);
        if state.ready_suspensions.len() >= max {
            return false;
        }
        tracing::info!(?suspension, "ready queue suspension defined");
        state.ready_suspensions.push(suspension);
        true
    });
    if !added {
        return error(
            422,
            "too many suspensions",
            &format!(
                "at most {max} ready-queue suspensions are active at once (delivery.suspensions_max); lift some first"
            ),
        );
    }
    if let Err(reply) = saved_and_applied(shard).await {
        return reply;
    }
    (200, serde_json::json!({ "id": id }).to_string())
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
    let request: IdRequest = match parse(body) {
        Ok(r) => r,
        Err(reply) => return reply,
    };
    let now = unix_ms();
    let found = shard.shared.live.update(|state| {
        let found =
            (state.ready_suspensions.iter()).any(|s| s.id == request.id && s.expires_unix_ms > now);
        state
            .ready_suspensions
            .retain(|s| s.id != request.id && s.expires_unix_ms > now);
        found
    });
    if !found {
        return error(
            404,
            "no such suspension",
            &format!(
                "id `{}` is not an active ready-queue suspension",
                request.id
            ),
        );
    }
    tracing::info!(id = request.id, "ready queue suspension lifted");
    if let Err(reply) = saved_and_applied(shard).await {
        return reply;
    }
    (200, "{}".into())
}
