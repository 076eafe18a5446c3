//! `/api/v1/webhooks`: SparkPost's Webhooks API over the event hose.
//!
//! - `POST` creates a webhook (`name`, `target`, `events` — all of SparkPost's when
//!   left out —, `auth_type` none/basic/oauth2 with `auth_credentials` or
//!   `auth_request_details`, `custom_headers`, `active`); the target is sent a ping
//!   batch (`[{"msys":{}}]`) first and must answer 2xx, as SparkPost's does. The new
//!   webhook gets the events written from then on.
//! - `GET` lists, `GET /{id}` shows one (with `last_successful` and `last_failure`;
//!   passwords and client secrets are never shown), `PUT /{id}` changes the fields
//!   given (a new target is pinged), `DELETE /{id}` removes it and its cursor.
//! - `POST /{id}/validate` sends the body's `message` to the target and shows the
//!   answer; `GET /{id}/batch-status?limit=` the latest batches' attempts.
//!
//! Each webhook belongs to the tenant of the key that made it, gets that tenant's
//! events only, and is invisible to other tenants' keys (404).

use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Value, json};

use super::{Reply, parse_json};
use crate::hose::sparkpost::{TYPES, TypeSet, default_types};
use crate::hose::webhook::{Answer, Poster, Webhook};
use crate::hose::{Hose, webhook_sink_name};
use crate::shard::Shard;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WebhookBody {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    target: Option<String>,
    #[serde(default)]
    events: Option<Vec<String>>,
    #[serde(default)]
    auth_type: Option<String>,
    #[serde(default)]
    auth_credentials: Option<Value>,
    #[serde(default)]
    auth_request_details: Option<Value>,
    #[serde(default)]
    custom_headers: Option<BTreeMap<String, String>>,
    #[serde(default)]
    active: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
struct ValidateBody {
    #[serde(default)]
    message: Option<Value>,
}

/// Handles `rest` below `/api/v1/webhooks`.
pub async fn handle(
    shard: &Rc<Shard>,
    tenant: Option<&str>,
    method: &hyper::Method,
    rest: &str,
    query: &str,
    body: &[u8],
) -> Reply {
    use hyper::Method;
    let hose = shard.shared.hose.clone();
    let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    match (method, segments.as_slice()) {
        (&Method::POST, []) => create(&hose, tenant, body).await,
        (&Method::GET, []) => list(&hose, tenant),
        (&Method::GET, [id]) => match owned(&hose, tenant, id) {
            Ok(hook) => Reply::json(200, json!({ "results": show(&hose, &hook) }).to_string()),
            Err(reply) => reply,
        },
        (&Method::PUT, [id]) => update(&hose, tenant, id, body).await,
        (&Method::DELETE, [id]) => delete(&hose, tenant, id).await,
        (&Method::POST, [id, "validate"]) => validate(&hose, tenant, id, body).await,
        (&Method::GET, [id, "batch-status"]) => batch_status(&hose, tenant, id, query),
        (_, [] | [_] | [_, "validate" | "batch-status"]) => super::method_not_allowed(),
        _ => Reply::error(404, "1101", "invalid URI", "no such webhooks endpoint"),
    }
}

fn invalid(description: &str) -> Reply {
    Reply::error(422, "1300", "invalid data format/type", description)
}

fn not_found(id: &str) -> Reply {
    super::templates::not_found("webhook", id)
}

/// The webhook `id` when the key's tenant owns it.
fn owned(hose: &Hose, tenant: Option<&str>, id: &str) -> Result<Arc<Webhook>, Reply> {
    match hose.webhooks.get(id) {
        Some(hook) if hook.tenant.as_deref() == tenant => Ok(hook),
        _ => Err(not_found(id)),
    }
}

/// A webhook as the API shows it: no passwords, no client secrets.
fn show(hose: &Hose, hook: &Webhook) -> Value {
    let mut value = json!({
        "id": hook.id,
        "name": hook.name,
        "target": hook.target,
        "events": hook.events,
        "auth_type": hook.auth_type,
        "active": hook.active,
        "links": [{
            "href": format!("/api/v1/webhooks/{}", hook.id),
            "rel": "urn.msys.webhooks.webhook",
            "method": ["GET", "PUT", "DELETE"],
        }],
    });
    if !hook.custom_headers.is_empty() {
        value["custom_headers"] = json!(hook.custom_headers);
    }
    if let Some(details) = &hook.auth_request_details {
        value["auth_request_details"] = json!({
            "url": details.get("url"),
            "body": { "client_id": details.get("body").and_then(|b| b.get("client_id")) },
        });
    }
    if let Some(username) = hook
        .auth_credentials
        .as_ref()
        .and_then(|c| c.get("username"))
    {
        value["auth_credentials"] = json!({ "username": username });
    }
    if let Some(status) = hose.status(&webhook_sink_name(&hook.id)) {
        use std::sync::atomic::Ordering;
        for (key, ms) in [
            (
                "last_successful",
                status.last_success_ms.load(Ordering::Relaxed),
            ),
            (
                "last_failure",
                status.last_failure_ms.load(Ordering::Relaxed),
            ),
        ] {
            if ms > 0 {
                value[key] = gannet_core::clock::rfc3339_millis(ms).into();
            }
        }
    }
    value
}

fn list(hose: &Hose, tenant: Option<&str>) -> Reply {
    let hooks: Vec<Value> = hose
        .webhooks
        .all()
        .iter()
        .filter(|h| h.tenant.as_deref() == tenant)
        .map(|h| show(hose, h))
        .collect();
    Reply::json(200, json!({ "results": hooks }).to_string())
}

/// Checks a webhook's fields; the first problem is the error.
fn check(hook: &Webhook) -> Result<(), Reply> {
    if hook.name.trim().is_empty() || hook.name.chars().count() > 1024 {
        return Err(invalid("name is required, at most 1024 characters"));
    }
    let uri: hyper::Uri = hook
        .target
        .parse()
        .map_err(|e| invalid(&format!("target is not a URL: {e}")))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        return Err(invalid(
            "target must be an http:// or https:// URL with a host",
        ));
    }
    if hook.events.is_empty() {
        return Err(invalid("events must name at least one event type"));
    }
    if let Err(unknown) = TypeSet::of(&hook.events) {
        let known: Vec<&str> = TYPES.iter().map(|t| t.0).collect();
        return Err(invalid(&format!(
            "unknown event type {unknown:?}; known: {}",
            known.join(", ")
        )));
    }
    let text =
        |v: Option<&Value>, k: &str| v.and_then(|v| v.get(k)).and_then(Value::as_str).is_some();
    match hook.auth_type.as_str() {
        "none" => {}
        "basic" => {
            let creds = hook.auth_credentials.as_ref();
            if !text(creds, "username") || !text(creds, "password") {
                return Err(invalid(
                    "auth_type basic needs auth_credentials.username and auth_credentials.password",
                ));
            }
        }
        "oauth2" => {
            let details = hook.auth_request_details.as_ref();
            let body = details.and_then(|d| d.get("body"));
            if !text(details, "url") || !text(body, "client_id") || !text(body, "client_secret") {
                return Err(invalid(
                    "auth_type oauth2 needs auth_request_details.url and auth_request_details.body.client_id and client_secret",
                ));
            }
        }
        other => {
            return Err(invalid(&format!(
                "auth_type {other:?} is not one of none, basic, oauth2"
            )));
        }
    }
    for (name, value) in &hook.custom_headers {
        if hyper::header::HeaderName::from_bytes(name.as_bytes()).is_err()
            || hyper::header::HeaderValue::from_str(value).is_err()
        {
            return Err(invalid(&format!(
                "custom header {name:?} is not a valid header"
            )));
        }
    }
    Ok(())
}

/// POSTs `body` to the hook's target on a thread of its own.
async fn post(hose: &Hose, hook: Webhook, body: Vec<u8>, batch_id: &str) -> Answer {
    let timeout = hose.settings.request_timeout;
    let batch_id = batch_id.to_string();
    crate::io::on_thread("gannet-webhook", move || {
        Poster::new(timeout).post(&hook, &batch_id, &body)
    })
    .await
    .unwrap_or(Answer {
        status: 0,
        headers: Vec::new(),
        body: String::new(),
        error: Some("could not start the request".into()),
    })
}

/// SparkPost's ping: the target must take an empty batch.
async fn ping(hose: &Hose, hook: &Webhook) -> Result<(), Reply> {
    let answer = post(hose, hook.clone(), b"[{\"msys\":{}}]".to_vec(), "ping").await;
    if answer.ok() {
        return Ok(());
    }
    Err(Reply::error(
        400,
        "1300",
        "invalid data format/type",
        &format!(
            "the target {} did not accept a test batch: {} (it must answer 2xx)",
            hook.target,
            answer.describe()
        ),
    ))
}

/// Writes the webhooks with `change` applied (on a thread; it fsyncs).
async fn store(
    hose: &Arc<Hose>,
    change: impl FnOnce(&mut BTreeMap<String, Arc<Webhook>>) -> Result<(), Reply> + Send + 'static,
) -> Result<(), Reply> {
    let hose = hose.clone();
    let done = glommio::executor()
        .spawn_blocking(move || hose.webhooks.change(change))
        .await;
    match done {
        Ok(result) => result,
        Err(err) => Err(Reply::error(
            500,
            "",
            "the webhook could not be stored",
            &err.to_string(),
        )),
    }
}

fn new_id() -> String {
    let hex: String = (0..16)
        .map(|_| format!("{:02x}", fastrand::u8(..)))
        .collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

async fn create(hose: &Arc<Hose>, tenant: Option<&str>, body: &[u8]) -> Reply {
    let body: WebhookBody = match parse_json(body) {
        Ok(body) => body,
        Err(reply) => return reply,
    };
    let hook = Webhook {
        id: new_id(),
        name: body.name.unwrap_or_default(),
        target: body.target.unwrap_or_default(),
        events: body.events.unwrap_or_else(default_types),
        auth_type: body.auth_type.unwrap_or_else(|| "none".into()),
        auth_credentials: body.auth_credentials,
        auth_request_details: body.auth_request_details,
        custom_headers: body.custom_headers.unwrap_or_default(),
        active: body.active.unwrap_or(true),
        tenant: tenant.map(str::to_string),
        created_ms: gannet_core::clock::unix_ms(),
    };
    if let Err(reply) = check(&hook) {
        return reply;
    }
    let max = hose.settings.webhooks_max;
    if hose.webhooks.all().len() >= max {
        return super::too_many("webhooks", max, "events.webhooks_max");
    }
    if let Err(reply) = ping(hose, &hook).await {
        return reply;
    }
    let id = hook.id.clone();
    let stored = store(hose, move |hooks| {
        if hooks.len() >= max {
            return Err(super::too_many("webhooks", max, "events.webhooks_max"));
        }
        hooks.insert(hook.id.clone(), Arc::new(hook));
        Ok(())
    })
    .await;
    if let Err(reply) = stored {
        return reply;
    }
    hose.start_webhook(&id);
    Reply::json(
        200,
        json!({ "results": {
            "id": id,
            "links": [{
                "href": format!("/api/v1/webhooks/{id}"),
                "rel": "urn.msys.webhooks.webhook",
                "method": ["GET", "PUT", "DELETE"],
            }],
        }})
        .to_string(),
    )
}

async fn update(hose: &Arc<Hose>, tenant: Option<&str>, id: &str, body: &[u8]) -> Reply {
    let old = match owned(hose, tenant, id) {
        Ok(hook) => hook,
        Err(reply) => return reply,
    };
    let body: WebhookBody = match parse_json(body) {
        Ok(body) => body,
        Err(reply) => return reply,
    };
    let mut hook = (*old).clone();
    if let Some(name) = body.name {
        hook.name = name;
    }
    if let Some(target) = body.target {
        hook.target = target;
    }
    if let Some(events) = body.events {
        hook.events = events;
    }
    if let Some(auth_type) = body.auth_type {
        hook.auth_type = auth_type;
    }
    if body.auth_credentials.is_some() {
        hook.auth_credentials = body.auth_credentials;
    }
    if body.auth_request_details.is_some() {
        hook.auth_request_details = body.auth_request_details;
    }
    if let Some(headers) = body.custom_headers {
        hook.custom_headers = headers;
    }
    if let Some(active) = body.active {
        hook.active = active;
    }
    if let Err(reply) = check(&hook) {
        return reply;
    }
    if hook.target != old.target
        && let Err(reply) = ping(hose, &hook).await
    {
        return reply;
    }
    let id_owned = id.to_string();
    let stored = store(hose, move |hooks| {
        if !hooks.contains_key(&id_owned) {
            return Err(not_found(&id_owned));
        }
        hooks.insert(id_owned, Arc::new(hook));
        Ok(())
    })
    .await;
    match stored {
        Ok(()) => Reply::json(200, json!({ "results": { "id": id } }).to_string()),
        Err(reply) => reply,
    }
}

async fn delete(hose: &Arc<Hose>, tenant: Option<&str>, id: &str) -> Reply {
    if let Err(reply) = owned(hose, tenant, id) {
        return reply;
    }
    let id_owned = id.to_string();
    let stored = store(hose, move |hooks| {
        hooks.remove(&id_owned);
        Ok(())
    })
    .await;
    if let Err(reply) = stored {
        return reply;
    }
    hose.remove_sink(&webhook_sink_name(id));
    Reply::no_content()
}

async fn validate(hose: &Arc<Hose>, tenant: Option<&str>, id: &str, body: &[u8]) -> Reply {
    let hook = match owned(hose, tenant, id) {
        Ok(hook) => hook,
        Err(reply) => return reply,
    };
    let body: ValidateBody = if body.is_empty() {
        ValidateBody::default()
    } else {
        match parse_json(body) {
            Ok(body) => body,
            Err(reply) => return reply,
        }
    };
    let message = body.message.unwrap_or_else(|| json!({ "msys": {} }));
    let payload = serde_json::to_vec(&message).unwrap_or_default();
    let answer = post(hose, (*hook).clone(), payload, "validate").await;
    let headers: serde_json::Map<String, Value> = answer
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), Value::from(v.clone())))
        .collect();
    let msg = if answer.ok() {
        "Test POST to endpoint succeeded"
    } else {
        "Test POST to endpoint failed"
    };
    let mut response = json!({ "status": answer.status, "headers": headers, "body": answer.body });
    if let Some(err) = &answer.error {
        response["error"] = err.clone().into();
    }
    Reply::json(
        200,
        json!({ "results": { "msg": msg, "response": response } }).to_string(),
    )
}

fn batch_status(hose: &Hose, tenant: Option<&str>, id: &str, query: &str) -> Reply {
    if let Err(reply) = owned(hose, tenant, id) {
        return reply;
    }
    let limit = query
        .split('&')
        .find_map(|p| p.strip_prefix("limit="))
        .map(|v| v.parse::<usize>());
    let limit = match limit {
        None => 1000,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => return invalid("limit must be a positive number"),
    };
    let batches = hose
        .status(&webhook_sink_name(id))
        .map(|s| s.batches(limit))
        .unwrap_or_default();
    Reply::json(200, json!({ "results": batches }).to_string())
}
