//! A shard's answers to the admin API's questions ([`crate::notes::Question`]): its
//! queues as listed (counts kept as parts move, `gannet_core::queue::admin`), a
//! message it spooled with its retry state and where each part is, and what a
//! bounce would take. Answers are JSON, gathered by the asking shard.

use serde_json::{Value, json};

use super::Dispatcher;
use crate::notes::Question;
use gannet_core::clock::{rfc3339, unix_ms};
use gannet_core::id::MessageId;
use gannet_core::queue::admin::Tally;
use gannet_core::queue::{Part, queue_name};

/// The shard's answer to `question`.
pub fn answer(d: &Dispatcher, question: &Question) -> Value {
    let now = unix_ms();
    match question {
        Question::Queues { detail } => {
            let listing = d.queues.borrow().listing(now, *detail);
            let mut value = serde_json::to_value(listing).unwrap_or_default();
            value["handed"] = d.handed.borrow().len().into();
            value
        }
        Question::Message { id, body } => message(d, *id, *body, now),
        Question::SchedQueue { name, limit, body } => sched_queue(d, name, *limit, *body, now),
        Question::CancelTransmission { id } => {
            let parts = d.queues.borrow_mut().take_where(|part| {
                let m = part.message.borrow();
                part.attempts == 0 && m.meta("transmission_id") == Some(id.as_str())
            });
            let canceled = parts.len();
            for part in parts {
                super::settling::cancel(d, part);
            }
            json!({ "canceled": canceled })
        }
        Question::Count(selector) => {
            let mut tally = d.queues.borrow().count_selected(selector);
            // Parts handed to another shard are this shard's to settle: counted here.
            for part in d.handed.borrow().values() {
                let m = part.message.borrow();
                if selector.selects(&queue_name(&m, &part.domain)) {
                    drop(m);
                    tally.add(part);
                }
            }
            count(&tally)
        }
    }
}

/// One scheduled queue on this shard: its parts counted (held ones apart), the
/// messages of the first `limit` as [`message`] shows them, and when the newest was
/// received.
fn sched_queue(d: &Dispatcher, name: &str, limit: usize, body: bool, now: u64) -> Value {
    let selector = gannet_core::shaping::QueueSelector {
        queue_names: vec![name.to_string()],
        ..Default::default()
    };
    let (mut parts, mut held, mut newest) = (0u64, 0u64, 0u64);
    let mut ids: Vec<MessageId> = Vec::new();
    let mut visit = |part: &Part, state: &str| {
        let m = part.message.borrow();
        if !selector.selects(&queue_name(&m, &part.domain)) {
            return;
        }
        parts += 1;
        held += u64::from(state == "held");
        newest = newest.max(m.received_ms);
        if ids.len() < limit && !ids.contains(&m.id) {
            ids.push(m.id);
        }
    };
    d.queues.borrow().for_each_part(|p, w| visit(p, w));
    for part in d.handed.borrow().values() {
        visit(part, "handed");
    }
    let messages: Vec<Value> = (ids.into_iter())
        .map(|id| message(d, id, body, now))
        .filter(|m| !m.is_null())
        .collect();
    json!({ "parts": parts, "held": held, "newest_ms": newest, "messages": messages })
}

fn count(tally: &Tally) -> Value {
    json!({
        "bounced": tally.parts,
        "total_bounced": tally.total(),
        "recipients": tally.recipients,
    })
}

/// Where a part is, as the admin API shows it.
fn part_json(part: &Part, state: &str) -> Value {
    let m = part.message.borrow();
    let mut v = json!({
        "domain": &*part.domain,
        "queue": queue_name(&m, &part.domain).to_string(),
        "state": state,
        "recipients": part.rcpts.iter().map(|i| &m.recipients[*i as usize]).collect::<Vec<_>>(),
        "attempts": part.attempts,
    });
    if state == "scheduled" {
        v["due"] = rfc3339(part.due_ms).into();
        v["due_ms"] = part.due_ms.into();
    }
    if let Some(site) = &part.site {
        v["site"] = site.name.clone().into();
    }
    if let Some(egress) = &part.egress {
        v["egress_source"] = egress.name.clone().into();
    }
    v
}

/// A message this shard spooled, in KumoMTA's inspect-message shape (`id`,
/// `message` with `sender`, `recipient`, `meta`, `data`, `due`, `num_attempts`)
/// with gannet's additions: the shard, the headers, each part's state. Null when
/// the shard does not have it.
fn message(d: &Dispatcher, id: MessageId, want_body: bool, now: u64) -> Value {
    let Some(stored) = d.shard.spool.get(id) else {
        return Value::Null;
    };
    let record = stored.get();
    let body = record.body.as_slice();
    let header_end = memchr::memmem::find(body, b"\r\n\r\n")
        .map(|at| at + 2)
        .or_else(|| memchr::memmem::find(body, b"\n\n").map(|at| at + 1))
        .unwrap_or(body.len());
    let mut parts = Vec::new();
    let mut state = None;
    let mut visit = |part: &Part, where_: &str| {
        let m = part.message.borrow();
        if m.id == id {
            if state.is_none() {
                state = Some((m.attempts, m.done.clone()));
            }
            drop(m);
            parts.push(part_json(part, where_));
        }
    };
    d.queues.borrow().for_each_part(|p, w| visit(p, w));
    for part in d.handed.borrow().values() {
        visit(part, "handed");
    }
    let (sender, recipients, meta) = record.envelope();
    let meta: serde_json::Map<String, Value> = (meta.into_iter())
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    let attempts = state.as_ref().map_or(record.attempts.to_native(), |s| s.0);
    let next_due = (parts.iter())
        .filter_map(|p| p["due_ms"].as_u64())
        .min()
        .unwrap_or(now);
    let mut message = json!({
        "sender": sender,
        "recipient": recipients,
        "meta": meta,
        "due": rfc3339(next_due),
        "num_attempts": attempts,
    });
    if want_body {
        message["data"] = String::from_utf8_lossy(body).into_owned().into();
    }
    json!({
        "id": id.to_string(),
        "message": message,
        "shard": d.shard.id,
        "received": rfc3339(record.received_unix_ms.to_native()),
        "size": body.len(),
        "queue": record.queue.as_str(),
        "done": state.map_or_else(|| record.done.iter().map(|d| d.to_native()).collect(), |s| s.1),
        "headers": String::from_utf8_lossy(&body[..header_end]).into_owned(),
        "parts": parts,
    })
}
