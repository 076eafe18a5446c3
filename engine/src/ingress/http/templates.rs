//! `/api/v1/templates`: SparkPost's stored templates, each with a draft and a
//! published version.
//!
//! - `POST /templates` creates (`published: true` stores it published, otherwise as a
//!   draft); the id is given or made from the name; an existing id is 409.
//! - `GET /templates` lists; `GET /templates/{id}?draft=true|false` returns the
//!   draft, the published version, or (no parameter) the newer of the two.
//! - `PUT /templates/{id}` changes the draft (made from the published version if
//!   there is none); `published: true` in the body publishes the result;
//!   `?update_published=true` changes the published version in place. Content fields
//!   given replace those stored; fields left out or null are kept.
//! - `DELETE /templates/{id}`; `POST /templates/{id}/preview?draft=…` renders a
//!   version with the body's `substitution_data`.
//!
//! Every version stored has compiled: a template that does not parse is a 422 naming
//! the part and line, and nothing is stored.

use std::rc::Rc;

use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{Reply, parse_json, query_flag};
use crate::merge::store::{
    StoredTemplate, TemplateOptions, Tenant, Version, id_from_name, valid_id,
};
use crate::merge::template::Scope;
use crate::merge::transmission::{ContentSpec, Refusal};
use crate::shard::Shard;
use gannet_core::clock::{rfc3339, unix_ms};

#[derive(Debug, Default, Deserialize)]
struct TemplateBody {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    published: Option<bool>,
    #[serde(default)]
    options: Option<TemplateOptions>,
    #[serde(default)]
    content: Option<ContentSpec>,
}

#[derive(Debug, Default, Deserialize)]
struct PreviewBody {
    #[serde(default)]
    substitution_data: Option<Map<String, Value>>,
}

pub fn not_found(what: &str, id: &str) -> Reply {
    Reply::error(
        404,
        "1600",
        "resource not found",
        &format!("{what} {id:?} does not exist"),
    )
}

/// 409 for an id already taken.
pub fn conflict(what: &str, id: &str) -> Reply {
    Reply::error(
        409,
        "1602",
        "resource conflict",
        &format!("{what} {id:?} already exists"),
    )
}

/// A stored item's id must be usable as a file name (422 otherwise).
pub fn check_id(id: &str) -> Result<(), Reply> {
    if valid_id(id) {
        return Ok(());
    }
    Err(Refusal::invalid(format!(
        "id {id:?}: letters, digits, '-', '_' and '.', at most 64"
    ))
    .into())
}

/// Handles `path` below `/api/v1/templates` ("" or "/{id}" or "/{id}/preview").
/// Every template belongs to the tenant of the key that stored it; another tenant's
/// key finds nothing (404).
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
        (&Method::GET, [id]) => get(shard, tenant, id, query_flag(query, "draft")),
        (&Method::PUT, [id]) => {
            update(
                shard,
                tenant,
                id,
                query_flag(query, "update_published") == Some(true),
                body,
            )
            .await
        }
        (&Method::DELETE, [id]) => delete(shard, tenant, id).await,
        (&Method::POST, [id, "preview"]) => {
            preview(shard, tenant, id, query_flag(query, "draft"), body)
        }
        (_, [] | [_] | [_, "preview"]) => super::method_not_allowed(),
        _ => Reply::error(404, "1101", "invalid URI", "no such templates endpoint"),
    }
}

/// Compiles content the way a transmission would, so that only usable versions are
/// stored.
fn check(content: &ContentSpec) -> Result<(), Reply> {
    if content.template_id.is_some() {
        return Err(
            Refusal::combination("a template's content cannot name another template").into(),
        );
    }
    content.compile(true).map(|_| ()).map_err(Reply::from)
}

fn version(content: ContentSpec, options: TemplateOptions) -> Version {
    let now = unix_ms();
    Version {
        content,
        options,
        last_update_time: rfc3339(now),
        updated_ms: now,
    }
}

/// Runs a change to the store on the blocking-call thread.
async fn store_change(
    shard: &Shard,
    tenant: Tenant<'_>,
    id: String,
    change: impl FnOnce(Option<&StoredTemplate>) -> Result<Option<StoredTemplate>, Reply>
    + Send
    + 'static,
) -> Reply {
    let store = shard.shared.store.clone();
    let done_id = id.clone();
    let tenant = tenant.map(str::to_string);
    let max = shard.config().http.templates_max.usize();
    let full = move || super::too_many("templates", max, "http.templates_max");
    match super::blocking_store_change("template", move || {
        store.change_template(tenant.as_deref(), &id, max, full, change)
    })
    .await
    {
        Ok(()) => Reply::json(200, json!({ "results": { "id": done_id } }).to_string()),
        Err(reply) => reply,
    }
}

async fn create(shard: &Rc<Shard>, tenant: Tenant<'_>, body: &[u8]) -> Reply {
    let body: TemplateBody = match parse_json(body) {
        Ok(body) => body,
        Err(reply) => return reply,
    };
    let Some(name) = body.name.filter(|n| !n.trim().is_empty()) else {
        return Refusal::missing("name is required").into();
    };
    let id = body.id.unwrap_or_else(|| id_from_name(&name));
    if let Err(reply) = check_id(&id) {
        return reply;
    }
    let Some(content) = body.content else {
        return Refusal::missing("content is required").into();
    };
    if let Err(reply) = check(&content) {
        return reply;
    }
    let v = version(content, body.options.unwrap_or_default());
    let published = body.published.unwrap_or(false);
    let template = StoredTemplate {
        id: id.clone(),
        name,
        description: body.description,
        published: published.then(|| v.clone()),
        draft: (!published).then_some(v),
    };
    store_change(shard, tenant, id, move |current| match current {
        Some(existing) => Err(conflict("template", &existing.id)),
        None => Ok(Some(template)),
    })
    .await
}

fn summary(t: &StoredTemplate) -> Value {
    json!({
        "id": t.id,
        "name": t.name,
        "description": t.description.clone().unwrap_or_default(),
        "published": t.published.is_some(),
        "has_published": t.published.is_some(),
        "has_draft": t.draft.is_some(),
        "last_update_time": t.latest().map(|v| v.last_update_time.clone()),
    })
}

fn list(shard: &Shard, tenant: Tenant<'_>) -> Reply {
    let templates: Vec<Value> = shard
        .shared
        .store
        .templates(tenant)
        .iter()
        .map(|t| summary(t))
        .collect();
    Reply::json(200, json!({ "results": templates }).to_string())
}

/// The version asked for: `draft` true → the draft, false → the published one,
/// None → the newer.
fn pick(t: &StoredTemplate, draft: Option<bool>) -> Option<(&Version, bool)> {
    match draft {
        Some(true) => t.draft.as_ref().map(|v| (v, false)),
        Some(false) => t.published.as_ref().map(|v| (v, true)),
        None => t
            .latest()
            .map(|v| (v, t.published.as_ref().is_some_and(|p| std::ptr::eq(p, v)))),
    }
}

fn get(shard: &Shard, tenant: Tenant<'_>, id: &str, draft: Option<bool>) -> Reply {
    let Some(t) = shard.shared.store.template(tenant, id) else {
        return not_found("template", id);
    };
    let Some((v, published)) = pick(&t, draft) else {
        let which = if draft == Some(true) {
            "draft"
        } else {
            "published version"
        };
        return not_found(&format!("template {id:?} has no {which}; template"), id);
    };
    let mut result = summary(&t);
    result["published"] = published.into();
    result["content"] = serde_json::to_value(&v.content).unwrap_or_default();
    result["options"] = serde_json::to_value(&v.options).unwrap_or_default();
    result["last_update_time"] = v.last_update_time.clone().into();
    Reply::json(200, json!({ "results": result }).to_string())
}

/// `update` over `base`: every field given (not null) replaces the stored one.
fn merge(base: &ContentSpec, update: ContentSpec) -> ContentSpec {
    ContentSpec {
        from: update.from.or_else(|| base.from.clone()),
        subject: update.subject.or_else(|| base.subject.clone()),
        text: update.text.or_else(|| base.text.clone()),
        html: update.html.or_else(|| base.html.clone()),
        amp_html: update.amp_html.or_else(|| base.amp_html.clone()),
        reply_to: update.reply_to.or_else(|| base.reply_to.clone()),
        headers: update.headers.or_else(|| base.headers.clone()),
        attachments: if update.attachments.is_empty() {
            base.attachments.clone()
        } else {
            update.attachments
        },
        inline_images: if update.inline_images.is_empty() {
            base.inline_images.clone()
        } else {
            update.inline_images
        },
        template_id: update.template_id,
        use_draft_template: None,
        email_rfc822: update.email_rfc822.or_else(|| base.email_rfc822.clone()),
        dialect: None,
    }
}

fn merge_options(base: &TemplateOptions, update: Option<TemplateOptions>) -> TemplateOptions {
    let update = update.unwrap_or_default();
    TemplateOptions {
        open_tracking: update.open_tracking.or(base.open_tracking),
        click_tracking: update.click_tracking.or(base.click_tracking),
        transactional: update.transactional.or(base.transactional),
    }
}

async fn update(
    shard: &Rc<Shard>,
    tenant: Tenant<'_>,
    id: &str,
    update_published: bool,
    body: &[u8],
) -> Reply {
    let body: TemplateBody = match parse_json(body) {
        Ok(body) => body,
        Err(reply) => return reply,
    };
    let id_text = id.to_string();
    store_change(shard, tenant, id.to_string(), move |current| {
        let Some(current) = current else {
            return Err(not_found("template", &id_text));
        };
        let mut next = current.clone();
        if let Some(name) = body.name.filter(|n| !n.trim().is_empty()) {
            next.name = name;
        }
        if body.description.is_some() {
            next.description = body.description;
        }
        let base = if update_published {
            current.published.as_ref()
        } else {
            current.draft.as_ref().or(current.published.as_ref())
        };
        let Some(base) = base else {
            return Err(not_found(
                &format!("template {id_text:?} has no published version; template"),
                &id_text,
            ));
        };
        let content = match body.content {
            Some(update) => merge(&base.content, update),
            None => base.content.clone(),
        };
        check(&content)?;
        let v = version(content, merge_options(&base.options, body.options));
        if update_published || body.published == Some(true) {
            next.published = Some(v);
            if !update_published {
                next.draft = None;
            }
        } else {
            next.draft = Some(v);
        }
        Ok(Some(next))
    })
    .await
}

async fn delete(shard: &Rc<Shard>, tenant: Tenant<'_>, id: &str) -> Reply {
    let id_text = id.to_string();
    let reply = store_change(
        shard,
        tenant,
        id.to_string(),
        move |current| match current {
            None => Err(not_found("template", &id_text)),
            Some(_) => Ok(None),
        },
    )
    .await;
    if reply.status == 200 {
        return Reply::json(200, "{}".to_string());
    }
    reply
}

fn preview(shard: &Shard, tenant: Tenant<'_>, id: &str, draft: Option<bool>, body: &[u8]) -> Reply {
    let body: PreviewBody = if body.is_empty() {
        PreviewBody::default()
    } else {
        match parse_json(body) {
            Ok(body) => body,
            Err(reply) => return reply,
        }
    };
    let Some(t) = shard.shared.store.template(tenant, id) else {
        return not_found("template", id);
    };
    let Some((v, _)) = pick(&t, draft) else {
        return not_found("version of template", id);
    };
    let content = match v.content.compile(true) {
        Ok(content) => content,
        Err(refusal) => return refusal.into(),
    };
    let data = body.substitution_data.unwrap_or_default();
    let layers = [&data];
    match content.preview(Scope { layers: &layers }) {
        Ok(result) => Reply::json(200, json!({ "results": result }).to_string()),
        Err(err) => Reply::error(422, "3001", "substitution failed", &err.0),
    }
}
