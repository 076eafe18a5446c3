//! Looking at the queues: every scheduled and ready queue (`/api/admin/queues/v1`),
//! the totals (`/api/admin/queue-summary/v1`) and one message
//! (`/api/admin/inspect-message/v1`, KumoMTA's). Each asks every shard
//! ([`super::ask`]) and puts the answers together. And the IP warm-up standings
//! (`/api/admin/warmup/v1`), which the shards share.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::{Reply, ask, error, query_value};
use crate::notes::Question;
use crate::shard::Shard;
use gannet_core::id::MessageId;

pub const QUEUES: &str = "/api/admin/queues/v1";
pub const SUMMARY: &str = "/api/admin/queue-summary/v1";
pub const INSPECT_MESSAGE: &str = "/api/admin/inspect-message/v1";
pub const WARMUP: &str = "/api/admin/warmup/v1";
pub const CLUSTER: &str = "/api/admin/cluster/v1";
pub const INSPECT_SCHED_Q: &str = "/api/admin/inspect-sched-q/v1";

fn flag(query: &str, name: &str) -> Result<bool, Reply> {
    match query_value(query, name).as_deref() {
        None | Some("false") => Ok(false),
        Some("true" | "") => Ok(true),
        Some(other) => Err(error(
            400,
            "invalid query",
            &format!("{name}: `{other}` is not true or false"),
        )),
    }
}

/// A scheduled queue as listed, added up over the shards.
#[derive(Default)]
struct Scheduled {
    waiting: u64,
    held: u64,
    oldest_ms: Option<u64>,
    next_due_ms: Option<u64>,
}

fn min(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// GET: every scheduled queue (parts waiting and held, summed over the shards; with
/// `detail=true`, the oldest message and next due time) and every ready queue (on
/// the shard that owns its site) with its parts, connections, effective and
/// configured limits, suspension and rules in force; `limit=N` keeps the N largest
/// of each.
pub async fn list(shard: &Shard, query: &str) -> Reply {
    let detail = match flag(query, "detail") {
        Ok(d) => d,
        Err(reply) => return reply,
    };
    let limit = match query_value(query, "limit").map(|l| l.parse::<usize>()) {
        None => usize::MAX,
        Some(Ok(l)) => l,
        Some(Err(_)) => {
            return error(400, "invalid query", "limit: must be a whole number");
        }
    };
    let answers = match ask(shard, Question::Queues { detail }).await {
        Ok(a) => a,
        Err(reply) => return reply,
    };
    let mut scheduled: BTreeMap<String, Scheduled> = BTreeMap::new();
    let mut ready: Vec<Value> = Vec::new();
    let (mut due, mut handed) = (0, 0);
    for (id, mut answer) in answers {
        for s in answer["scheduled"].as_array().into_iter().flatten() {
            let entry = scheduled
                .entry(s["name"].as_str().unwrap_or_default().to_string())
                .or_default();
            entry.waiting += s["waiting"].as_u64().unwrap_or(0);
            entry.held += s["held"].as_u64().unwrap_or(0);
            entry.oldest_ms = min(entry.oldest_ms, s["oldest_ms"].as_u64());
            entry.next_due_ms = min(entry.next_due_ms, s["next_due_ms"].as_u64());
        }
        if let Value::Array(queues) = answer["ready"].take() {
            for mut q in queues {
                q["shard"] = id.into();
                ready.push(q);
            }
        }
        due += answer["due"].as_u64().unwrap_or(0);
        handed += answer["handed"].as_u64().unwrap_or(0);
    }
    let mut scheduled: Vec<(String, Scheduled)> = scheduled.into_iter().collect();
    scheduled.sort_by_key(|(_, s)| std::cmp::Reverse(s.waiting + s.held));
    scheduled.truncate(limit);
    let size = |q: &Value| q["parts"].as_u64().unwrap_or(0) + q["remote"].as_u64().unwrap_or(0);
    ready.sort_by_key(|q| std::cmp::Reverse(size(q)));
    ready.truncate(limit);
    let scheduled: Vec<Value> = (scheduled.into_iter())
        .map(|(name, s)| {
            let mut v = json!({ "name": name, "waiting": s.waiting, "held": s.held });
            if let Some(ms) = s.oldest_ms {
                v["oldest_ms"] = ms.into();
            }
            if let Some(ms) = s.next_due_ms {
                v["next_due_ms"] = ms.into();
            }
            v
        })
        .collect();
    // Response rules' holds on tenants' and campaigns' mail (suspend_tenant,
    // suspend_campaign), shared by the shards.
    let now = gannet_core::clock::unix_ms();
    let live = shard.shared.live.snapshot();
    let holds: Vec<&gannet_core::adaptive::Hold> =
        (live.holds.iter()).filter(|h| h.until_ms > now).collect();
    let body = json!({
        "scheduled": scheduled,
        "ready": ready,
        "due": due,
        "handed": handed,
        "holds": holds,
    });
    (200, body.to_string())
}

/// Totals of one shard's answer, or of all.
#[derive(Default, serde::Serialize)]
struct Totals {
    scheduled_queues: u64,
    waiting: u64,
    held: u64,
    ready_queues: u64,
    ready: u64,
    remote: u64,
    due: u64,
    handed: u64,
    connections: u64,
    suspended_ready_queues: u64,
    queues_with_rules: u64,
    queues_backed_off: u64,
}

impl Totals {
    fn add(&mut self, o: &Totals) {
        self.scheduled_queues += o.scheduled_queues;
        self.waiting += o.waiting;
        self.held += o.held;
        self.ready_queues += o.ready_queues;
        self.ready += o.ready;
        self.remote += o.remote;
        self.due += o.due;
        self.handed += o.handed;
        self.connections += o.connections;
        self.suspended_ready_queues += o.suspended_ready_queues;
        self.queues_with_rules += o.queues_with_rules;
        self.queues_backed_off += o.queues_backed_off;
    }

    fn of(answer: &Value) -> Totals {
        let n = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
        let mut t = Totals {
            due: n(answer, "due"),
            handed: n(answer, "handed"),
            ..Totals::default()
        };
        for s in answer["scheduled"].as_array().into_iter().flatten() {
            t.scheduled_queues += 1;
            t.waiting += n(s, "waiting");
            t.held += n(s, "held");
        }
        for q in answer["ready"].as_array().into_iter().flatten() {
            t.ready_queues += 1;
            t.ready += n(q, "parts");
            t.remote += n(q, "remote");
            t.connections += n(q, "connections");
            t.suspended_ready_queues += u64::from(q.get("suspended_until_ms").is_some());
            t.queues_with_rules += u64::from(q.get("rules_in_force").is_some());
            t.queues_backed_off += u64::from(q.get("backoff_limit").is_some());
        }
        t
    }
}

/// GET: the totals over every shard and per shard, and the operator's verbs in
/// force. (The same count of scheduled queues on two shards counts twice: per
/// shard, a queue is the parts it holds.)
pub async fn summary(shard: &Shard) -> Reply {
    let answers = match ask(shard, Question::Queues { detail: false }).await {
        Ok(a) => a,
        Err(reply) => return reply,
    };
    let mut total = Totals::default();
    let mut shards = Vec::new();
    for (id, answer) in &answers {
        let t = Totals::of(answer);
        total.add(&t);
        let mut v = serde_json::to_value(&t).unwrap_or_default();
        v["shard"] = (*id).into();
        shards.push(v);
    }
    let now = gannet_core::clock::unix_ms();
    let state = shard.shared.live.snapshot();
    let active = |n: usize| n as u64;
    let body = json!({
        "total": total,
        "shards": shards,
        "suspensions": active(state.suspensions.iter().filter(|s| s.expires_unix_ms > now).count()),
        "ready_suspensions": active(state.ready_suspensions.iter().filter(|s| s.expires_unix_ms > now).count()),
        "bounces": active(state.bounces.iter().filter(|b| b.bounce.expires_unix_ms > now).count()),
    });
    (200, body.to_string())
}

/// GET `?id=<message id>[&want_body=true]`: the message as KumoMTA's inspect-message
/// shows it (`id`, `message`: sender, recipients, metadata, `data` when asked, due
/// time, attempts), with the shard that holds it, its headers, the recipients
/// finished and where each of its parts is (scheduled, held, due, ready, handed to
/// another shard). 404 when no shard has it.
pub async fn inspect_message(shard: &Shard, query: &str) -> Reply {
    let Some(text) = query_value(query, "id") else {
        return error(400, "invalid query", "id: the message id is required");
    };
    let Ok(id) = text.trim().replace('-', "").parse::<MessageId>() else {
        return error(
            400,
            "invalid query",
            &format!("id: `{text}` is not a message id (32 hex digits)"),
        );
    };
    let body = match flag(query, "want_body") {
        Ok(b) => b,
        Err(reply) => return reply,
    };
    let answers = match ask(shard, Question::Message { id, body }).await {
        Ok(a) => a,
        Err(reply) => return reply,
    };
    match answers.into_iter().find(|(_, a)| !a.is_null()) {
        Some((_, found)) => (200, found.to_string()),
        None => error(
            404,
            "no such message",
            &format!("no shard has message {id} queued"),
        ),
    }
}

/// GET: every warming source's standing toward each provider today: the day of its
/// plan, the day's budget (null once warm) and what it has sent.
pub fn warmup(shard: &Shard) -> Reply {
    let standings = shard
        .shared
        .warmup
        .budgets
        .standings(gannet_core::clock::unix_ms());
    (
        200,
        serde_json::to_string(&standings).unwrap_or_else(|_| "[]".into()),
    )
}

/// GET: the cluster this node is part of (`[cluster]`): whether the shared Redis
/// answers, the fallback, this node's name and the live nodes'; `configured: false`
/// for a node on its own.
pub fn cluster(shard: &Shard) -> Reply {
    let Some(link) = &shard.shared.cluster else {
        return (200, serde_json::json!({ "configured": false }).to_string());
    };
    let stats = link.stats();
    let body = serde_json::json!({
        "configured": true,
        "redis_up": stats.up.load(std::sync::atomic::Ordering::Relaxed),
        "fallback": link.fallback(),
        "node": link.node(),
        "nodes": link.members(),
    });
    (200, body.to_string())
}

/// GET `?queue_name=<campaign:tenant@domain>[&limit=N][&want_body=true]`: one
/// scheduled queue in KumoMTA's inspect-sched-q shape — its messages (at most
/// `limit`, as inspect-message shows them), `num_scheduled` (its parts on every
/// shard), `delayed_metric` (those held by a suspension), `queue_config` (the retry
/// schedule), `now`, and `last_changed` (when its newest message was received).
pub async fn inspect_sched_q(shard: &Shard, query: &str) -> Reply {
    let Some(name) = query_value(query, "queue_name").filter(|n| !n.trim().is_empty()) else {
        return error(
            400,
            "invalid query",
            "queue_name: the scheduled queue is required",
        );
    };
    let limit = match query_value(query, "limit").map(|l| l.parse::<usize>()) {
        None => usize::MAX,
        Some(Ok(l)) => l,
        Some(Err(_)) => return error(400, "invalid query", "limit: must be a whole number"),
    };
    let body = match flag(query, "want_body") {
        Ok(b) => b,
        Err(reply) => return reply,
    };
    let question = Question::SchedQueue {
        name: name.clone(),
        limit,
        body,
    };
    let answers = match ask(shard, question).await {
        Ok(a) => a,
        Err(reply) => return reply,
    };
    let (mut parts, mut held, mut newest) = (0, 0, 0);
    let mut messages = Vec::new();
    for (_, mut answer) in answers {
        parts += answer["parts"].as_u64().unwrap_or(0);
        held += answer["held"].as_u64().unwrap_or(0);
        newest = newest.max(answer["newest_ms"].as_u64().unwrap_or(0));
        if let Value::Array(found) = answer["messages"].take() {
            messages.extend(found);
        }
    }
    messages.truncate(limit);
    let now = gannet_core::clock::unix_ms();
    let d = &shard.shared.config.delivery;
    let body = json!({
        "queue_name": name,
        "messages": messages,
        "num_scheduled": parts,
        "queue_config": {
            "retry_interval": format!("{}s", d.retry_interval_secs.get()),
            "max_retry_interval": format!("{}s", d.max_retry_interval_secs.get()),
            "max_age": format!("{}s", d.max_age_secs.get()),
        },
        "delayed_metric": held,
        "now": gannet_core::clock::rfc3339(now),
        "last_changed": gannet_core::clock::rfc3339(if newest > 0 { newest } else { now }),
    });
    (200, body.to_string())
}
