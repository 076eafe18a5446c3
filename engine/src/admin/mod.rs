//! The operator's verbs over the live settings: scheduled-queue suspensions, shaped
//! like KumoMTA's `/api/admin/suspend/v1` (POST defines one, GET lists them, DELETE
//! lifts one), and retrying scheduled queues now (`/api/admin/retry/v1`, POST: what
//! Postfix's `postqueue -f` does for its whole queue), served by the HTTP listener
//! (`ingress::http`) to keys with the admin role. Both are live settings shared by
//! every shard; a change wakes each shard's maintainer through its inbox. The verbs take and give JSON text, so
//! that a command line can reach them as well as HTTP.

use std::fmt::Write as _;

use serde::Deserialize;

use crate::shard::Shared;
use gannet_core::clock::unix_ms;
use gannet_core::config::automation::parse_duration;
use gannet_core::shaping::{QueueSelector, Suspension};

/// The reply: status and JSON body.
pub type Reply = (u16, String);

/// How long a suspension lasts when the request does not say (KumoMTA's default).
const DEFAULT_DURATION_SECS: u64 = 300;
/// The longest suspension accepted: a year.
const MAX_DURATION_SECS: u64 = 365 * 86_400;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SuspendRequest {
    domain: Option<String>,
    tenant: Option<String>,
    campaign: Option<String>,
    #[serde(default)]
    queue_names: Vec<String>,
    reason: String,
    /// `"90s"`, `"5m"`, `"2h"`, `"1d"`, `"1h30m"`, or a number of seconds.
    duration: Option<DurationText>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum DurationText {
    Seconds(u64),
    Text(String),
}

/// A retry request: the selector's fields as in [`SuspendRequest`], spelled out in
/// each (serde's `flatten` does not work with `deny_unknown_fields`, and an unknown
/// field must be refused by name); [`selector`] turns both into a `QueueSelector`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetryBody {
    domain: Option<String>,
    tenant: Option<String>,
    campaign: Option<String>,
    #[serde(default)]
    queue_names: Vec<String>,
    reason: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResumeRequest {
    id: String,
}

/// An error in SparkPost's shape (`description` left out when empty).
pub fn error(status: u16, message: &str, description: &str) -> Reply {
    let mut detail = serde_json::json!({ "message": message });
    if !description.is_empty() {
        detail["description"] = description.into();
    }
    (
        status,
        serde_json::json!({ "errors": [detail] }).to_string(),
    )
}

fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, Reply> {
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de).map_err(|err| {
        let (_, description) = crate::json::describe_error(err);
        error(400, "invalid request body", &description)
    })
}

/// The queues a request selects (its domain compared in lower case).
fn selector(
    domain: Option<String>,
    tenant: Option<String>,
    campaign: Option<String>,
    queue_names: Vec<String>,
) -> QueueSelector {
    QueueSelector {
        domain: domain.map(|d| d.trim().to_ascii_lowercase()),
        tenant,
        campaign,
        queue_names,
    }
}

/// Parses a request whose `reason` must say something.
fn parse_with_reason<'a, T: Deserialize<'a>>(
    body: &'a [u8],
    reason: impl Fn(&T) -> &str,
) -> Result<T, Reply> {
    let request: T = parse(body)?;
    if reason(&request).trim().is_empty() {
        return Err(error(
            400,
            "invalid request body",
            "reason: must not be empty",
        ));
    }
    Ok(request)
}

/// POST: defines a suspension and returns its id.
pub fn suspend(shared: &Shared, body: &[u8]) -> Reply {
    let request: SuspendRequest = match parse_with_reason(body, |r: &SuspendRequest| &r.reason) {
        Ok(r) => r,
        Err(reply) => return reply,
    };
    let secs = match &request.duration {
        None => DEFAULT_DURATION_SECS,
        Some(DurationText::Seconds(s)) => *s,
        Some(DurationText::Text(t)) => match parse_duration(t) {
            Some(s) => s,
            None => {
                return error(
                    400,
                    "invalid request body",
                    &format!(
                        "duration: `{t}` is not a duration such as \"90s\", \"5m\", \"2h\", \"1d\" or \"1h30m\""
                    ),
                );
            }
        },
    };
    if secs == 0 || secs > MAX_DURATION_SECS {
        return error(
            400,
            "invalid request body",
            &format!("duration: must be between 1 second and {MAX_DURATION_SECS} seconds"),
        );
    }
    let suspension = Suspension {
        id: new_id(),
        queues: selector(
            request.domain,
            request.tenant,
            request.campaign,
            request.queue_names,
        ),
        reason: request.reason,
        expires_unix_ms: unix_ms() + secs * 1000,
    };
    let id = suspension.id.clone();
    let now = unix_ms();
    let max = shared.config.delivery.suspensions_max.usize();
    let added = shared.live.update(|state| {
        state.suspensions.retain(|s| s.expires_unix_ms > now);
        if state.suspensions.len() >= max {
            return false;
        }
        tracing::info!(?suspension, "queue suspension defined");
        state.suspensions.push(suspension);
        true
    });
    if !added {
        return error(
            422,
            "too many suspensions",
            &format!(
                "at most {max} suspensions are active at once (delivery.suspensions_max); lift some first"
            ),
        );
    }
    wake_all(shared);
    (200, serde_json::json!({ "id": id }).to_string())
}

/// POST to the retry verb: every scheduled part of the selected queues (all of them
/// when nothing is selected) becomes due now on every shard; parts held by a
/// suspension stay held. 202: the shards apply it within a maintainer round.
pub fn retry(shared: &Shared, body: &[u8]) -> Reply {
    let request: RetryBody = match parse_with_reason(body, |r: &RetryBody| &r.reason) {
        Ok(r) => r,
        Err(reply) => return reply,
    };
    let queues = selector(
        request.domain,
        request.tenant,
        request.campaign,
        request.queue_names,
    );
    let seq = shared.live.update(|state| {
        let seq = state.retries.last().map_or(0, |r| r.seq) + 1;
        tracing::info!(
            seq,
            ?queues,
            reason = request.reason,
            "retry of scheduled queues requested"
        );
        if state.retries.len() >= crate::live::RETRIES_KEPT {
            state.retries.remove(0);
        }
        state.retries.push(crate::live::RetryRequest {
            seq,
            queues,
            reason: request.reason,
        });
        seq
    });
    wake_all(shared);
    (202, serde_json::json!({ "id": seq }).to_string())
}

/// GET: the active suspensions, each with the time it has left.
pub fn list(shared: &Shared) -> Reply {
    let now = unix_ms();
    let state = shared.live.snapshot();
    let list: Vec<serde_json::Value> = state
        .suspensions
        .iter()
        .filter(|s| s.expires_unix_ms > now)
        .map(|s| {
            let mut v = serde_json::to_value(s).unwrap_or_default();
            v["duration"] = format!("{}s", (s.expires_unix_ms - now).div_ceil(1000)).into();
            v
        })
        .collect();
    (200, serde_json::Value::Array(list).to_string())
}

/// DELETE: lifts a suspension by id.
pub fn resume(shared: &Shared, body: &[u8]) -> Reply {
    let request: ResumeRequest = match parse(body) {
        Ok(r) => r,
        Err(reply) => return reply,
    };
    let now = unix_ms();
    let found = shared.live.update(|state| {
        let found = state
            .suspensions
            .iter()
            .any(|s| s.id == request.id && s.expires_unix_ms > now);
        state
            .suspensions
            .retain(|s| s.id != request.id && s.expires_unix_ms > now);
        found
    });
    if !found {
        return error(
            404,
            "no such suspension",
            &format!("id `{}` is not an active suspension", request.id),
        );
    }
    tracing::info!(id = request.id, "queue suspension lifted");
    wake_all(shared);
    (200, "{}".into())
}

/// Tells every shard to look at the live settings now.
fn wake_all(shared: &Shared) {
    for shard in 0..shared.mesh.shards() {
        // A full inbox is a busy shard: it looks at the settings within a round.
        let _ = shared.mesh.send(shard as u16, crate::notes::Note::Wake);
    }
}

/// A random id in the UUID text form.
fn new_id() -> String {
    let (a, b) = (fastrand::u64(..), fastrand::u64(..));
    let mut id = String::with_capacity(36);
    let hex = format!("{a:016x}{b:016x}");
    for (i, c) in hex.chars().enumerate() {
        if matches!(i, 8 | 12 | 16 | 20) {
            id.push('-');
        }
        let _ = write!(id, "{c}");
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_look_like_uuids() {
        let id = new_id();
        assert_eq!(id.len(), 36);
        assert_eq!(id.matches('-').count(), 4);
        assert_ne!(id, new_id());
    }
}
