//! `POST /api/inject/v1`: KumoMTA's HTTP injection API.
//!
//! The request becomes a transmission in gannet's own form (the content in the Jinja
//! dialect, rendered by minijinja; `template_dialect: "Static"` substitutes nothing)
//! and goes through the same checks, generation, spool and events as SparkPost's
//! API. Without `deferred_generation` every recipient is generated, spooled and
//! queued before the reply, which says which ones failed; with it the request is
//! spooled as one job and generated after the reply (failures are then
//! generation_failure events).
//!
//! Reply: `{"success_count", "fail_count", "failed_recipients", "errors"}`.

use std::net::IpAddr;
use std::rc::Rc;

use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::transmissions::{prepare, spool_jobs};
use super::{Reply, parse_json};
use crate::jobs::Jobs;
use crate::merge::content::Dialect;
use crate::merge::transmission::{
    AddressSpec, ContentSpec, FileSpec, FromSpec, Options, RecipientSpec, Recipients, Refusal, Spec,
};
use crate::metrics::ShardMetrics;
use gannet_core::auth::ApiIdentity;

#[derive(Debug, Deserialize)]
struct InjectRequest {
    envelope_sender: String,
    recipients: Vec<InjectRecipient>,
    /// An RFC 822 message as a string, or a builder object.
    content: Value,
    #[serde(default)]
    substitutions: Option<Map<String, Value>>,
    #[serde(default)]
    template_dialect: Option<String>,
    #[serde(default)]
    deferred_generation: bool,
}

#[derive(Debug, Deserialize)]
struct InjectRecipient {
    email: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    substitutions: Option<Map<String, Value>>,
    #[serde(default)]
    metadata: Option<Map<String, Value>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Builder {
    #[serde(default)]
    text_body: Option<String>,
    #[serde(default)]
    html_body: Option<String>,
    #[serde(default)]
    amp_html_body: Option<String>,
    #[serde(default)]
    headers: Map<String, Value>,
    #[serde(default)]
    from: Option<NamedAddress>,
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    reply_to: Option<NamedAddress>,
    #[serde(default)]
    attachments: Vec<Attachment>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NamedAddress {
    email: String,
    #[serde(default)]
    name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Attachment {
    data: String,
    /// `data` is base64 (otherwise it is the content itself).
    #[serde(default)]
    base64: bool,
    content_type: String,
    #[serde(default)]
    file_name: Option<String>,
    /// Set for an inline part referenced as `cid:` from the HTML.
    #[serde(default)]
    content_id: Option<String>,
}

fn builder_content(builder: Builder) -> Result<ContentSpec, Refusal> {
    use base64::Engine as _;
    let mut attachments = Vec::new();
    let mut inline_images = Vec::new();
    for (i, a) in builder.attachments.into_iter().enumerate() {
        let data = if a.base64 {
            a.data
        } else {
            base64::engine::general_purpose::STANDARD.encode(a.data.as_bytes())
        };
        match (a.content_id, a.file_name) {
            (Some(cid), _) => inline_images.push(FileSpec {
                name: cid,
                content_type: a.content_type,
                data,
            }),
            (None, Some(name)) => attachments.push(FileSpec {
                name,
                content_type: a.content_type,
                data,
            }),
            (None, None) => {
                return Err(Refusal::missing(format!(
                    "content.attachments[{i}] needs a file_name or a content_id"
                )));
            }
        }
    }
    let reply_to = builder.reply_to.map(|r| match r.name {
        Some(name) => format!("\"{}\" <{}>", name.replace('"', ""), r.email),
        None => r.email,
    });
    Ok(ContentSpec {
        from: builder.from.map(|f| FromSpec::Full {
            email: f.email,
            name: f.name,
        }),
        subject: builder.subject,
        text: builder.text_body,
        html: builder.html_body,
        amp_html: builder.amp_html_body,
        reply_to,
        headers: (!builder.headers.is_empty()).then_some(builder.headers),
        attachments,
        inline_images,
        dialect: Some(Dialect::Jinja),
        ..ContentSpec::default()
    })
}

/// The request in the Transmissions API's form.
fn transmission(request: InjectRequest) -> Result<(Spec, bool), Refusal> {
    let substitute = match request.template_dialect.as_deref() {
        None | Some("Jinja") => true,
        Some("Static") => false,
        Some(other) => {
            return Err(Refusal::invalid(format!(
                "template_dialect {other:?} is not supported (Jinja or Static)"
            )));
        }
    };
    let content = match request.content {
        Value::String(rfc822) => ContentSpec {
            email_rfc822: Some(rfc822),
            dialect: Some(Dialect::Jinja),
            ..ContentSpec::default()
        },
        Value::Object(map) => {
            let builder: Builder = serde_path_to_error::deserialize(Value::Object(map))
                .map_err(|e| Refusal::invalid(format!("content.{}: {}", e.path(), e.inner())))?;
            builder_content(builder)?
        }
        _ => {
            return Err(Refusal::invalid(
                "content must be an RFC 822 message or a builder object",
            ));
        }
    };
    let recipients = request
        .recipients
        .into_iter()
        .map(|r| RecipientSpec {
            address: AddressSpec::Full {
                email: r.email,
                name: r.name,
                header_to: None,
            },
            tags: Vec::new(),
            metadata: r.metadata.unwrap_or_default(),
            substitution_data: r.substitutions.unwrap_or_default(),
            return_path: None,
        })
        .collect();
    let spec = Spec {
        options: Options {
            perform_substitutions: Some(substitute),
            ..Options::default()
        },
        return_path: Some(request.envelope_sender),
        substitution_data: request.substitutions.unwrap_or_default(),
        recipients: Some(Recipients::Inline(recipients)),
        content: Some(content),
        ..Spec::default()
    };
    Ok((spec, request.deferred_generation))
}

fn kumo_error(status: u16, message: &str) -> Reply {
    Reply::json(
        status,
        json!({ "success_count": 0, "fail_count": 0, "failed_recipients": [], "errors": [message] }).to_string(),
    )
}

fn reply(success: usize, failed: &[String], errors: &[String]) -> Reply {
    Reply::json(
        200,
        json!({
            "success_count": success,
            "fail_count": failed.len(),
            "failed_recipients": failed,
            "errors": errors,
        })
        .to_string(),
    )
}

pub async fn inject(
    jobs: &Rc<Jobs>,
    identity: &ApiIdentity,
    peer: Option<IpAddr>,
    body: &[u8],
) -> Reply {
    let shard = &jobs.shard;
    let request: InjectRequest = match parse_json(body) {
        Ok(request) => request,
        Err(reply) => return reply,
    };
    let refused = |r: Refusal| kumo_error(r.status, &format!("{}: {}", r.message, r.description));
    let (spec, deferred) = match transmission(request) {
        Ok(converted) => converted,
        Err(refusal) => return refused(refusal),
    };
    let (job, mut failed) = match prepare(shard, identity, peer, spec) {
        Ok(prepared) => prepared,
        Err(refusal) => return refused(refusal),
    };
    let mut errors: Vec<String> = failed
        .iter()
        .map(|r| format!("{r}: not an email address"))
        .collect();
    let metrics = &shard.metrics;
    ShardMetrics::add(&metrics.http_recipients_rejected_total, failed.len() as u64);
    let count = job.recipients().len();
    if deferred {
        let spooled = match spool_jobs(shard, job).await {
            Ok(spooled) => spooled,
            Err(reply) => return reply,
        };
        ShardMetrics::add(&metrics.http_transmissions_total, 1);
        ShardMetrics::add(&metrics.http_recipients_accepted_total, count as u64);
        crate::jobs::start(jobs, spooled);
        return reply(count, &failed, &errors);
    }
    let (failures, stopped) = jobs.generate_all(&job).await;
    let end = stopped.as_ref().map_or(count, |(at, _)| *at);
    let success = end - failures.len();
    for (i, reason) in failures {
        let email = job.recipients()[i].address.parts().0.to_string();
        errors.push(format!("{email}: {reason}"));
        failed.push(email);
    }
    if let Some((at, err)) = stopped {
        // Nothing from that batch on was queued.
        for rcpt in &job.recipients()[at..] {
            failed.push(rcpt.address.parts().0.to_string());
        }
        errors.push(format!("spool: {err}"));
    }
    ShardMetrics::add(&metrics.http_transmissions_total, 1);
    ShardMetrics::add(&metrics.http_recipients_accepted_total, success as u64);
    reply(success, &failed, &errors)
}
