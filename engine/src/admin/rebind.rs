//! Rebinding, shaped like KumoMTA's `/api/admin/rebind/v1` (POST): the queued
//! messages of the selected scheduled queues move to another egress pool
//! (`data = {"pool": …}`) from their next attempt; those whose pool changed (every
//! one with `always_flush`) are due at once. An AdminRebind event per message unless
//! `suppress_logging`. The rebind is kept in `admin.json` until no message it
//! applies to can remain (`delivery.max_age_secs`), so that messages recovered after
//! a restart are rebound again. gannet runs no Lua: `trigger_rebind_event` must be
//! false, and `pool` is the one key `data` takes.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{Reply, add_bounded, invalid, new_id, parse_with_reason, selector};
use crate::shard::Shard;
use gannet_core::clock::unix_ms;
use gannet_core::queue::admin::Rebind;

pub const PATH: &str = "/api/admin/rebind/v1";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RebindRequest {
    campaign: Option<String>,
    tenant: Option<String>,
    domain: Option<String>,
    routing_domain: Option<String>,
    #[serde(default)]
    queue_names: Vec<String>,
    reason: String,
    #[serde(default)]
    suppress_logging: bool,
    data: BTreeMap<String, String>,
    #[serde(default)]
    trigger_rebind_event: bool,
    #[serde(default)]
    always_flush: bool,
}

/// POST: defines a rebind; the shards apply it within a round.
pub async fn rebind(shard: &Shard, body: &[u8]) -> Reply {
    let request: RebindRequest = match parse_with_reason(body, |r: &RebindRequest| &r.reason) {
        Ok(r) => r,
        Err(reply) => return reply,
    };
    if request.routing_domain.is_some() {
        return invalid(
            "routing_domain: gannet has no routing domains (a message is routed by its recipient's domain); select with domain",
        );
    }
    if request.trigger_rebind_event {
        return invalid(
            "trigger_rebind_event: gannet has no Lua rebind event; give the new pool in data.pool",
        );
    }
    if let Some(key) = request.data.keys().find(|k| *k != "pool") {
        return invalid(&format!(
            "data.{key}: gannet rebinds the egress pool only (data.pool)"
        ));
    }
    let Some(pool) = request.data.get("pool") else {
        return invalid("data.pool: the egress pool to move the messages to is required");
    };
    let config = &shard.shared.config;
    if pool != "default" && !config.delivery.pools.contains_key(pool) {
        return invalid(&format!(
            "data.pool: pool `{pool}` is not defined in delivery.pools"
        ));
    }
    let now = unix_ms();
    let rebind = Rebind {
        id: new_id(),
        queues: selector(
            request.domain,
            request.tenant,
            request.campaign,
            request.queue_names,
        ),
        pool: pool.clone(),
        reason: request.reason,
        created_unix_ms: now,
        always_flush: request.always_flush,
        suppress_logging: request.suppress_logging,
        expires_unix_ms: now + config.delivery.max_age_secs.get() * 1000,
    };
    let id = rebind.id.clone();
    add_bounded(
        shard,
        |state| &mut state.rebinds,
        |r| r.expires_unix_ms,
        rebind,
        id,
        "rebind",
    )
    .await
}
