//! `/api/v1/suppression-list`: SparkPost's Suppression List API, per tenant (the
//! key's).
//!
//! - `GET` searches: `from`/`to` (on the last update; RFC 3339, seconds optional),
//!   `types`, `sources`, `domain`, `description` (a fragment), `limit`/`per_page`
//!   (1000 by default, 10000 at most) and `page`; `total_count` counts every match.
//! - `PUT` with `{"recipients": [...]}` adds or updates entries: each a `recipient`
//!   (or `email`), a `type` (`transactional`, `non_transactional`) or the older
//!   `transactional`/`non_transactional` booleans, and a `description`. Nothing is
//!   stored unless every entry is good (400 names the first bad one).
//! - `GET /{recipient}` its entries (404 without), `PUT /{recipient}` one entry
//!   (SparkPost's older form, which its Python client sends), `DELETE /{recipient}`
//!   (a body's `type` deletes that kind only; 404 when there was nothing).
//!
//! Changes are fsynced before the answer. Manually added entries have the source
//! "Manually Added"; gannet adds "Bounce Rule", "Spam Complaint" and "Unsubscribe"
//! entries itself (`[suppression]`).

use std::rc::Rc;

use serde::Deserialize;
use serde_json::{Value, json};

use super::{Reply, parse_json};
use crate::merge::content::valid_email;
use crate::shard::Shard;
use crate::suppression::{Entry, Kind, Refused};
use gannet_core::clock::{rfc3339, unix_ms};

/// Entries per page at most.
const PER_PAGE_MAX: usize = 10_000;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryBody {
    #[serde(default)]
    recipient: Option<String>,
    #[serde(default)]
    email: Option<String>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    transactional: Option<bool>,
    #[serde(default)]
    non_transactional: Option<bool>,
    #[serde(default)]
    description: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BulkBody {
    recipients: Vec<EntryBody>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteBody {
    #[serde(default, rename = "type")]
    kind: Option<String>,
}

/// Handles `rest` below `/api/v1/suppression-list`.
pub async fn handle(
    shard: &Rc<Shard>,
    tenant: Option<&str>,
    method: &hyper::Method,
    rest: &str,
    query: &str,
    body: &[u8],
) -> Reply {
    use hyper::Method;
    let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    match (method, segments.as_slice()) {
        (&Method::GET, []) => search(shard, tenant, query),
        (&Method::PUT, []) => match parse_json::<BulkBody>(body) {
            Ok(bulk) => upsert(shard, tenant, bulk.recipients, None).await,
            Err(reply) => reply,
        },
        (&Method::GET, [recipient]) => {
            let recipient = decode(recipient);
            let entries = shard.shared.suppressions.get(tenant, &recipient);
            if entries.is_empty() {
                return not_found(&recipient);
            }
            let shown: Vec<Value> = entries.iter().map(show).collect();
            Reply::json(200, json!({ "results": shown }).to_string())
        }
        (&Method::PUT, [recipient]) => match parse_json::<EntryBody>(body) {
            Ok(entry) => upsert(shard, tenant, vec![entry], Some(decode(recipient))).await,
            Err(reply) => reply,
        },
        (&Method::DELETE, [recipient]) => delete(shard, tenant, &decode(recipient), body).await,
        (_, [] | [_]) => super::method_not_allowed(),
        _ => Reply::error(
            404,
            "1101",
            "invalid URI",
            "no such suppression-list endpoint",
        ),
    }
}

/// A path segment, percent-decoded (`user%40example.com`).
fn decode(segment: &str) -> String {
    crate::admin::percent_decode(segment)
}

fn not_found(recipient: &str) -> Reply {
    Reply::error(
        404,
        "1600",
        "resource not found",
        &format!("{recipient} is not on the suppression list"),
    )
}

fn invalid(description: &str) -> Reply {
    Reply::error(400, "1200", "invalid params", description)
}

/// An entry as SparkPost shows it.
fn show(entry: &Entry) -> Value {
    json!({
        "recipient": entry.recipient,
        "type": entry.kind.name(),
        "source": entry.source,
        "description": entry.description,
        "created": rfc3339(entry.created_ms),
        "updated": rfc3339(entry.updated_ms),
        "transactional": entry.kind == Kind::Transactional,
        "non_transactional": entry.kind == Kind::NonTransactional,
    })
}

/// The value of query parameter `name`, percent-decoded.
fn param(query: &str, name: &str) -> Option<String> {
    super::query_value(query, name)
}

/// Unix ms of a time given as RFC 3339 (seconds optional).
fn time(text: &str, name: &str) -> Result<u64, Reply> {
    let text = text.trim();
    let parsed = humantime::parse_rfc3339_weak(text)
        .or_else(|_| humantime::parse_rfc3339_weak(&format!("{text}:00")));
    match parsed {
        Ok(at) => Ok(at
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)),
        Err(_) => Err(invalid(&format!(
            "{name} must be a time such as 2026-01-31T08:00 or 2026-01-31T08:00:00Z"
        ))),
    }
}

fn search(shard: &Shard, tenant: Option<&str>, query: &str) -> Reply {
    let from = match param(query, "from").map(|t| time(&t, "from")).transpose() {
        Ok(t) => t,
        Err(reply) => return reply,
    };
    let to = match param(query, "to").map(|t| time(&t, "to")).transpose() {
        Ok(t) => t,
        Err(reply) => return reply,
    };
    let list = |name: &str| -> Option<Vec<String>> {
        param(query, name).map(|v| v.split(',').map(|s| s.trim().to_string()).collect())
    };
    let types = match list("types") {
        Some(names) => {
            let mut kinds = Vec::new();
            for name in names {
                match Kind::parse(&name) {
                    Some(kind) => kinds.push(kind),
                    None => {
                        return invalid(&format!(
                            "types: {name:?} is not transactional or non_transactional"
                        ));
                    }
                }
            }
            Some(kinds)
        }
        None => None,
    };
    let sources = list("sources");
    let domain = param(query, "domain").map(|d| d.to_ascii_lowercase());
    let description = param(query, "description").map(|d| d.to_lowercase());
    let number = |name: &str, default: usize| -> Result<usize, Reply> {
        match param(query, name) {
            None => Ok(default),
            Some(v) => match v.parse::<usize>() {
                Ok(n) if n >= 1 => Ok(n),
                _ => Err(invalid(&format!("{name} must be a positive number"))),
            },
        }
    };
    let per_page = match number("per_page", 1000).and_then(|d| number("limit", d)) {
        Ok(n) => n.min(PER_PAGE_MAX),
        Err(reply) => return reply,
    };
    let page = match number("page", 1) {
        Ok(n) => n,
        Err(reply) => return reply,
    };
    let found = shard.shared.suppressions.list(tenant, |e| {
        from.is_none_or(|f| e.updated_ms >= f)
            && to.is_none_or(|t| e.updated_ms <= t)
            && types.as_ref().is_none_or(|k| k.contains(&e.kind))
            && sources
                .as_ref()
                .is_none_or(|s| s.iter().any(|s| s == &e.source))
            && domain
                .as_ref()
                .is_none_or(|d| e.recipient.rsplit_once('@').is_some_and(|(_, rd)| rd == d))
            && description
                .as_ref()
                .is_none_or(|d| e.description.to_lowercase().contains(d.as_str()))
    });
    let total = found.len();
    let shown: Vec<Value> = found
        .iter()
        .skip((page - 1).saturating_mul(per_page))
        .take(per_page)
        .map(show)
        .collect();
    Reply::json(
        200,
        json!({ "results": shown, "links": [], "total_count": total }).to_string(),
    )
}

/// Checks every entry, then stores them all (fsynced) or none.
async fn upsert(
    shard: &Shard,
    tenant: Option<&str>,
    bodies: Vec<EntryBody>,
    recipient_from_path: Option<String>,
) -> Reply {
    if bodies.is_empty() {
        return invalid("recipients must hold at least one entry");
    }
    let now = unix_ms();
    let mut entries = Vec::with_capacity(bodies.len() * 2);
    let single = recipient_from_path.is_some();
    for (i, body) in bodies.into_iter().enumerate() {
        let place = if single {
            String::new()
        } else {
            format!("recipients[{i}]: ")
        };
        let recipient = recipient_from_path
            .clone()
            .or(body.recipient)
            .or(body.email)
            .unwrap_or_default();
        if !valid_email(&recipient) {
            return invalid(&format!(
                "{place}{recipient:?} is not a valid email address"
            ));
        }
        let mut kinds = Vec::new();
        match &body.kind {
            Some(name) => match Kind::parse(name) {
                Some(kind) => kinds.push(kind),
                None => {
                    return invalid(&format!(
                        "{place}type {name:?} is not transactional or non_transactional"
                    ));
                }
            },
            None => {
                if body.transactional == Some(true) {
                    kinds.push(Kind::Transactional);
                }
                if body.non_transactional == Some(true) {
                    kinds.push(Kind::NonTransactional);
                }
            }
        }
        if kinds.is_empty() {
            return invalid(&format!(
                "{place}give a type (transactional or non_transactional), or transactional/non_transactional: true"
            ));
        }
        let description = body.description.unwrap_or_default();
        if description.chars().count() > 1024 {
            return invalid(&format!(
                "{place}description is longer than 1024 characters"
            ));
        }
        for kind in kinds {
            entries.push(Entry {
                recipient: recipient.to_ascii_lowercase(),
                tenant: tenant.map(str::to_string),
                kind,
                source: "Manually Added".into(),
                description: description.clone(),
                created_ms: now,
                updated_ms: now,
            });
        }
    }
    let lists = shard.shared.suppressions.clone();
    let stored = glommio::executor()
        .spawn_blocking(move || lists.put(entries))
        .await;
    match stored {
        Ok(()) => Reply::json(
            200,
            json!({ "results": { "message": "Suppression List successfully updated" } })
                .to_string(),
        ),
        Err(refused) => refusal(refused),
    }
}

fn refusal(refused: Refused) -> Reply {
    match refused {
        Refused::Full(max) => {
            super::too_many("suppression list entries", max, "suppression.entries_max")
        }
        Refused::Io(err) => Reply::error(
            500,
            "",
            "the suppression list could not be stored",
            &err.to_string(),
        ),
    }
}

async fn delete(shard: &Shard, tenant: Option<&str>, recipient: &str, body: &[u8]) -> Reply {
    let kinds = if body.iter().all(u8::is_ascii_whitespace) {
        vec![Kind::Transactional, Kind::NonTransactional]
    } else {
        match parse_json::<DeleteBody>(body) {
            Ok(DeleteBody { kind: None }) => vec![Kind::Transactional, Kind::NonTransactional],
            Ok(DeleteBody { kind: Some(name) }) => match Kind::parse(&name) {
                Some(kind) => vec![kind],
                None => {
                    return invalid(&format!(
                        "type {name:?} is not transactional or non_transactional"
                    ));
                }
            },
            Err(reply) => return reply,
        }
    };
    let lists = shard.shared.suppressions.clone();
    let (tenant_owned, recipient_owned) = (tenant.map(str::to_string), recipient.to_string());
    let deleted = glommio::executor()
        .spawn_blocking(move || lists.delete(tenant_owned.as_deref(), &recipient_owned, &kinds))
        .await;
    match deleted {
        Ok(0) => not_found(recipient),
        Ok(_) => Reply::no_content(),
        Err(refused) => refusal(refused),
    }
}
