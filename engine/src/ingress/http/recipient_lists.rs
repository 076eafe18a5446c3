//! `/api/v1/recipient-lists`: SparkPost's stored recipient lists, used by a
//! transmission's `recipients: {"list_id": …}`.
//!
//! - `POST` creates (an existing id is 409); recipients with a bad address are
//!   counted as rejected and left out; no good recipient is a 422.
//! - `GET` lists (without recipients); `GET /{id}?show_recipients=true` includes them.
//! - `PUT /{id}` replaces the fields given (`recipients` replaces the whole list).
//! - `DELETE /{id}`.

use std::rc::Rc;

use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::templates::{check_id, conflict, not_found};
use super::{Reply, parse_json, query_flag};
use crate::merge::content::valid_email;
use crate::merge::store::{StoredList, Tenant, id_from_name};
use crate::merge::transmission::{RecipientSpec, Refusal};
use crate::shard::Shard;

#[derive(Debug, Default, Deserialize)]
struct ListBody {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    attributes: Option<Map<String, Value>>,
    #[serde(default)]
    recipients: Option<Vec<RecipientSpec>>,
}

/// Handles `path` below `/api/v1/recipient-lists` ("" or "/{id}").
/// Every list belongs to the tenant of the key that stored it; another tenant's key
/// finds nothing (404).
pub async fn handle(
    shard: &Rc<Shard>,
    tenant: Tenant<'_>,
    method: &hyper::Method,
    rest: &str,
    query: &str,
    body: &[u8],
) -> Reply {
    use hyper::Method;
    let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    match (method, segments.as_slice()) {
        (&Method::POST, []) => create(shard, tenant, body).await,
        (&Method::GET, []) => list(shard, tenant),
        (&Method::GET, [id]) => get(
            shard,
            tenant,
            id,
            query_flag(query, "show_recipients") == Some(true),
        ),
        (&Method::PUT, [id]) => update(shard, tenant, id, body).await,
        (&Method::DELETE, [id]) => delete(shard, tenant, id).await,
        (_, [] | [_]) => super::method_not_allowed(),
        _ => Reply::error(
            404,
            "1101",
            "invalid URI",
            "no such recipient-lists endpoint",
        ),
    }
}

/// Keeps the recipients with good addresses; returns them and how many were not.
fn screen(recipients: Vec<RecipientSpec>) -> Result<(Vec<RecipientSpec>, usize), Reply> {
    if recipients.is_empty() {
        return Err(Refusal::missing("at least one recipient is required").into());
    }
    let total = recipients.len();
    let good: Vec<RecipientSpec> = recipients
        .into_iter()
        .filter(|r| {
            valid_email(r.address.parts().0) && r.return_path.as_deref().is_none_or(valid_email)
        })
        .collect();
    if good.is_empty() {
        return Err(Refusal::invalid("no recipient has a valid email address").into());
    }
    let rejected = total - good.len();
    Ok((good, rejected))
}

fn counts(list: &StoredList, rejected: usize) -> Reply {
    Reply::json(
        200,
        json!({
            "results": {
                "total_rejected_recipients": rejected,
                "total_accepted_recipients": list.recipients.len(),
                "id": list.id,
                "name": list.name,
            }
        })
        .to_string(),
    )
}

async fn store_change(
    shard: &Shard,
    tenant: Tenant<'_>,
    id: String,
    change: impl FnOnce(Option<&StoredList>) -> Result<Option<StoredList>, Reply> + Send + 'static,
) -> Result<(), Reply> {
    let store = shard.shared.store.clone();
    let tenant = tenant.map(str::to_string);
    let max = shard.config().http.recipient_lists_max.usize();
    let full = move || super::too_many("recipient lists", max, "http.recipient_lists_max");
    super::blocking_store_change("recipient list", move || {
        store.change_list(tenant.as_deref(), &id, max, full, change)
    })
    .await
}

async fn create(shard: &Rc<Shard>, tenant: Tenant<'_>, body: &[u8]) -> Reply {
    let body: ListBody = match parse_json(body) {
        Ok(body) => body,
        Err(reply) => return reply,
    };
    let id = match (body.id, &body.name) {
        (Some(id), _) => id,
        (None, Some(name)) => id_from_name(name),
        (None, None) => shard.spool.next_id().to_string(),
    };
    if let Err(reply) = check_id(&id) {
        return reply;
    }
    let Some(recipients) = body.recipients else {
        return Refusal::missing("recipients is required").into();
    };
    let (recipients, rejected) = match screen(recipients) {
        Ok(screened) => screened,
        Err(reply) => return reply,
    };
    let list = StoredList {
        name: body.name.unwrap_or_else(|| id.clone()),
        id: id.clone(),
        description: body.description,
        attributes: body.attributes.unwrap_or_default(),
        recipients,
    };
    let reply = counts(&list, rejected);
    match store_change(shard, tenant, id, move |current| match current {
        Some(existing) => Err(conflict("recipient list", &existing.id)),
        None => Ok(Some(list)),
    })
    .await
    {
        Ok(()) => reply,
        Err(reply) => reply,
    }
}

fn summary(list: &StoredList) -> Value {
    json!({
        "id": list.id,
        "name": list.name,
        "description": list.description.clone().unwrap_or_default(),
        "attributes": list.attributes,
        "total_accepted_recipients": list.recipients.len(),
    })
}

fn list(shard: &Shard, tenant: Tenant<'_>) -> Reply {
    let lists: Vec<Value> = shard
        .shared
        .store
        .lists(tenant)
        .iter()
        .map(|l| summary(l))
        .collect();
    Reply::json(200, json!({ "results": lists }).to_string())
}

fn get(shard: &Shard, tenant: Tenant<'_>, id: &str, show_recipients: bool) -> Reply {
    let Some(list) = shard.shared.store.list(tenant, id) else {
        return not_found("recipient list", id);
    };
    let mut result = summary(&list);
    if show_recipients {
        result["recipients"] = serde_json::to_value(&list.recipients).unwrap_or_default();
    }
    Reply::json(200, json!({ "results": result }).to_string())
}

async fn update(shard: &Rc<Shard>, tenant: Tenant<'_>, id: &str, body: &[u8]) -> Reply {
    let body: ListBody = match parse_json(body) {
        Ok(body) => body,
        Err(reply) => return reply,
    };
    let (recipients, rejected) = match body.recipients.map(screen).transpose() {
        Ok(Some((r, n))) => (Some(r), n),
        Ok(None) => (None, 0),
        Err(reply) => return reply,
    };
    let id_text = id.to_string();
    let result = store_change(shard, tenant, id.to_string(), move |current| {
        let Some(current) = current else {
            return Err(not_found("recipient list", &id_text));
        };
        let mut next = current.clone();
        if let Some(name) = body.name {
            next.name = name;
        }
        if body.description.is_some() {
            next.description = body.description;
        }
        if let Some(attributes) = body.attributes {
            next.attributes = attributes;
        }
        if let Some(recipients) = recipients {
            next.recipients = recipients;
        }
        Ok(Some(next))
    })
    .await;
    match result {
        Ok(()) => match shard.shared.store.list(tenant, id) {
            Some(list) => counts(&list, rejected),
            None => not_found("recipient list", id),
        },
        Err(reply) => reply,
    }
}

async fn delete(shard: &Rc<Shard>, tenant: Tenant<'_>, id: &str) -> Reply {
    let id_text = id.to_string();
    let result = store_change(
        shard,
        tenant,
        id.to_string(),
        move |current| match current {
            None => Err(not_found("recipient list", &id_text)),
            Some(_) => Ok(None),
        },
    )
    .await;
    match result {
        Ok(()) => Reply::json(200, "{}".to_string()),
        Err(reply) => reply,
    }
}
