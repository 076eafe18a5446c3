//! The operator's verbs across the cluster: suspensions of scheduled queues and of
//! ready queues, and bounces, made on any node, are in force on every node that
//! shares the Redis (`[cluster]`).
//!
//! The items live in one Redis hash (`kind:id` → the item's JSON), read by the link
//! each second. Shard 0 brings its live settings and the hash into step after each
//! read ([`sync`]), by what it last saw in both:
//! - in the hash, not here: added on another node (taken), or lifted here (removed
//!   from the hash);
//! - here, not in the hash: lifted on another node (dropped), or added here (put in
//!   the hash).
//!
//! A new connection to Redis (one restarted, perhaps empty) starts afresh: what is
//! here is put in the hash and what is in the hash is taken, nothing is dropped.
//! Expired items leave the hash. While Redis cannot be reached each node keeps what
//! it has, and its own verbs apply to it alone until Redis returns. Rebinds and
//! retries stay per node (they act on the messages a node holds when made).
//!
//! Response rules (adaptive delivery) that fire on a node go into the same hash
//! (`rule:<queue>|<rule>`, until when) and are in force on every node's ready queue
//! of that name until then (`LiveState::cluster_rules`); so do the holds they put
//! on a tenant's or campaign's mail (`hold:<who>|<sites>`, merged into
//! `LiveState::holds`), and the lowerings adaptive backoff makes to a ready queue's
//! connection limit (`backoff:<queue>`, `LiveState::cluster_backoffs`).

use std::collections::{BTreeMap, BTreeSet};

use crate::live::{LiveBounce, LiveState};
use crate::shard::Shard;
use gannet_core::clock::unix_ms;
use gannet_core::queue::adapt::SharedRule;

/// What a node last saw in step: the fields both here and in the hash, those it
/// removed from the hash and the connection it read them over.
#[derive(Debug, Default)]
pub struct Sync {
    read: u64,
    connection: u64,
    synced: BTreeSet<String>,
    /// Lifted here and removed from the hash: not taken back from a read made
    /// before the removal.
    lifted: BTreeSet<String>,
    /// Items of a known kind this node could not read (field → JSON): logged once,
    /// not tried again until they change; left in the hash (a newer node may read
    /// them).
    refused: BTreeMap<String, String>,
}

/// This node's items in force: field → JSON.
fn items(state: &LiveState, now: u64) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut put = |kind: &str, id: &str, expires: u64, json: serde_json::Result<String>| {
        if let (true, Ok(json)) = (expires > now, json) {
            out.insert(format!("{kind}:{id}"), json);
        }
    };
    for s in &state.suspensions {
        put(
            "suspension",
            &s.id,
            s.expires_unix_ms,
            serde_json::to_string(s),
        );
    }
    for s in &state.ready_suspensions {
        put(
            "ready_suspension",
            &s.id,
            s.expires_unix_ms,
            serde_json::to_string(s),
        );
    }
    for b in &state.bounces {
        let b = &b.bounce;
        put("bounce", &b.id, b.expires_unix_ms, serde_json::to_string(b));
    }
    out
}

/// When the item of `field` expires, if its JSON is an item of its kind.
fn expiry(field: &str, json: &str) -> Option<u64> {
    let value: serde_json::Value = serde_json::from_str(json).ok()?;
    match field.split_once(':')?.0 {
        "suspension" | "ready_suspension" | "bounce" => value["expires_unix_ms"].as_u64(),
        "rule" | "hold" | "backoff" => value["until_ms"].as_u64(),
        _ => None,
    }
}

/// The field of a hold on a tenant's or campaign's mail (suspend_tenant,
/// suspend_campaign) put here, for the other nodes.
pub fn hold_field(hold: &gannet_core::adaptive::Hold) -> String {
    format!("hold:{}", hold.key())
}

/// The field of the latest lowering of ready queue `queue`'s connection limit by
/// adaptive backoff here, for the other nodes.
pub fn backoff_field(queue: &str) -> String {
    format!("backoff:{queue}")
}

/// Whether `field` is of a kind this version keeps in the hash.
fn known_kind(field: &str) -> bool {
    matches!(
        field.split_once(':').map(|(kind, _)| kind),
        Some("suspension" | "ready_suspension" | "bounce" | "rule" | "hold" | "backoff")
    )
}

/// The field of a response rule that fired on ready queue `queue` here, for the
/// other nodes.
pub fn rule_field(queue: &str, rule: &str) -> String {
    format!("rule:{queue}|{rule}")
}

/// Takes the item of `field` from another node; false when it is not one.
fn take(state: &mut LiveState, field: &str, json: &str) -> bool {
    let Some((kind, _)) = field.split_once(':') else {
        return false;
    };
    match kind {
        "suspension" => serde_json::from_str(json)
            .map(|s| state.suspensions.push(s))
            .is_ok(),
        "ready_suspension" => serde_json::from_str(json)
            .map(|s| state.ready_suspensions.push(s))
            .is_ok(),
        "bounce" => serde_json::from_str(json)
            .map(|b| state.bounces.push(LiveBounce::new(b)))
            .is_ok(),
        _ => false,
    }
}

/// Takes the items of the kind `prefix` names out of `remote`, read (those that do
/// not read are noted as refused).
fn take_kind<T: serde::de::DeserializeOwned>(
    sync: &mut Sync,
    remote: &mut BTreeMap<String, String>,
    prefix: &str,
) -> Vec<T> {
    let mut read = Vec::new();
    remote.retain(|field, json| {
        if !field.starts_with(prefix) {
            return true;
        }
        match serde_json::from_str(json) {
            Ok(item) => read.push(item),
            Err(_) => refused(sync, field, json),
        }
        false
    });
    read
}

/// Notes an item of a known kind that could not be read, and logs it the first
/// time (the hash is outside input: another node's, an older or newer gannet's,
/// or written by hand).
fn refused(sync: &mut Sync, field: &str, json: &str) {
    if sync.refused.get(field).map(String::as_str) != Some(json) {
        tracing::warn!(
            field,
            "cluster: an item in the shared hash could not be read; left alone"
        );
        sync.refused.insert(field.to_string(), json.to_string());
    }
}

/// Drops the item of `field` (lifted on another node).
fn drop_item(state: &mut LiveState, field: &str) {
    let Some((kind, id)) = field.split_once(':') else {
        return;
    };
    match kind {
        "suspension" => state.suspensions.retain(|s| s.id != id),
        "ready_suspension" => state.ready_suspensions.retain(|s| s.id != id),
        "bounce" => state.bounces.retain(|b| b.bounce.id != id),
        _ => {}
    }
}

/// Brings this node's verbs and the cluster's into step after a new read of the
/// hash (nothing to do otherwise, or while Redis cannot be reached). Changes taken
/// are written to admin.json and applied by every shard.
pub async fn sync(shard: &Shard, sync: &mut Sync) {
    let Some(link) = &shard.shared.cluster else {
        return;
    };
    let Some(read) = link.admin_items() else {
        return;
    };
    if read.read == sync.read {
        return;
    }
    if read.connection != sync.connection {
        sync.synced.clear();
        sync.lifted.clear();
        sync.connection = read.connection;
    }
    sync.read = read.read;
    let now = unix_ms();
    let read_items: BTreeMap<String, String> = read.items.into_iter().collect();
    sync.refused
        .retain(|f, json| read_items.get(f) == Some(json));
    let mut remote = BTreeMap::new();
    for (field, json) in read_items {
        match expiry(&field, &json) {
            Some(at) if at > now => {
                remote.insert(field, json);
            }
            // Expired: out of the hash.
            Some(_) => link.publish(&field, None),
            // A kind this version knows, unreadable: logged, left alone.
            None if known_kind(&field) => refused(sync, &field, &json),
            // Not an item this version knows (a newer node's?): left alone.
            None => {}
        }
    }
    sync.lifted.retain(|f| remote.contains_key(f));
    let live = &shard.shared.live;
    // Response rules that fired anywhere: in force here until their time is up
    // (they are never lifted; the node where one fired publishes it again when it
    // fires again). Not part of the comparison below.
    let rules: Vec<SharedRule> = take_kind(sync, &mut remote, "rule:");
    // Holds on tenants' and campaigns' mail put anywhere: in force here too until
    // their time is up (extended, never shortened).
    let holds = take_kind(sync, &mut remote, "hold:");
    // Adaptive backoffs that lowered a queue anywhere: imposed here once each.
    let backoffs = take_kind(sync, &mut remote, "backoff:");
    let snapshot = live.snapshot();
    let held = crate::live::holds_extended(&snapshot.holds, &holds, now);
    if rules != snapshot.cluster_rules || held || backoffs != snapshot.cluster_backoffs {
        live.update(|state| {
            state.cluster_rules = rules;
            state.cluster_backoffs = backoffs;
            crate::live::merge_holds(&mut state.holds, &holds, now);
        });
        if held {
            tracing::info!(
                "cluster: a tenant's or campaign's mail held on another node is held here"
            );
        }
        super::wake_all(shard);
    }
    let local = items(&live.snapshot(), now);
    let mut taken = Vec::new();
    let mut dropped = Vec::new();
    for (field, json) in &remote {
        if local.contains_key(field) {
            continue;
        }
        if sync.synced.contains(field) || sync.lifted.contains(field) {
            // Lifted here: out of the hash too.
            link.publish(field, None);
            sync.lifted.insert(field.clone());
        } else if sync.refused.get(field) == Some(json) {
            // Could not be read before, and has not changed.
        } else {
            taken.push((field.clone(), json.clone()));
        }
    }
    for (field, json) in &local {
        if remote.contains_key(field) {
            continue;
        }
        if sync.synced.contains(field) {
            dropped.push(field.clone());
        } else {
            link.publish(field, Some(json.clone()));
        }
    }
    sync.synced = (remote.keys())
        .filter(|f| local.contains_key(*f) && !dropped.contains(f))
        .chain(taken.iter().map(|(f, _)| f))
        .cloned()
        .collect();
    sync.synced.retain(|f| !sync.lifted.contains(f));
    if taken.is_empty() && dropped.is_empty() {
        return;
    }
    let refused_now: Vec<String> = live.update(|state| {
        for field in &dropped {
            drop_item(state, field);
            tracing::info!(
                field,
                "cluster: an operator's verb lifted on another node is lifted"
            );
        }
        let mut refused = Vec::new();
        for (field, json) in &taken {
            if take(state, field, json) {
                tracing::info!(
                    field,
                    "cluster: an operator's verb made on another node is in force"
                );
            } else {
                refused.push(field.clone());
            }
        }
        refused
    });
    // An item this node cannot read is not in step (never taken for lifted here).
    for field in refused_now {
        sync.synced.remove(&field);
        if let Some(json) = remote.get(&field) {
            refused(sync, &field, json);
        }
    }
    // Written and applied as a verb made here is (a failed write is logged).
    let _ = super::saved_and_applied(shard).await;
}
