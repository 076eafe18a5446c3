//! The operator's admin API, on KumoMTA's paths and with its bodies where it has
//! them, served by the HTTP listener (`ingress::http`) to keys with the admin role
//! from `http.admin_from` networks:
//!
//! | path | verbs | |
//! | --- | --- | --- |
//! | `/api/admin/suspend/v1` | POST, GET, DELETE | suspend scheduled queues ([`suspend`]) |
//! | `/api/admin/retry/v1` | POST | make scheduled queues due now |
//! | `/api/admin/suspend-ready-q/v1` | POST, GET, DELETE | suspend ready queues ([`ready`]) |
//! | `/api/admin/bounce/v1` | POST (with `dry_run`), GET, DELETE | bounce ([`bounce`]) |
//! | `/api/admin/queues/v1` | GET | every scheduled and ready queue ([`queues`]) |
//! | `/api/admin/queue-summary/v1` | GET | totals, per shard |
//! | `/api/admin/inspect-message/v1` | GET | one message by id |
//! | `/api/admin/inspect-sched-q/v1` | GET | one scheduled queue's messages |
//! | `/api/admin/warmup/v1` | GET | IP warm-up standings of each source |
//! | `/api/admin/rebind/v1` | POST | move queued messages to another pool ([`rebind`]) |
//! | `/api/admin/cluster/v1` | GET | the cluster's live nodes and shared Redis ([`cluster`]) |
//!
//! Verbs that change something change the live settings (`crate::live`), which
//! every shard's maintainer applies within a round (each is woken through its
//! inbox); suspensions, bounces and rebinds are written to `admin.json` before the answer,
//! so that they outlive a restart. Questions about the queues go to every shard
//! through the mesh ([`crate::notes::Ask`]) and are answered from counts the queues
//! keep, so listing often does not slow delivery.

pub mod bounce;
pub mod cluster;
pub mod queues;
pub mod ready;
pub mod rebind;
pub mod suspend;

use std::fmt::Write as _;
use std::time::Duration;

use serde::Deserialize;

use crate::notes::{Answers, Ask, Note, Question};
use crate::shard::Shard;
use gannet_core::clock::unix_ms;
use gannet_core::config::automation::parse_duration;
use gannet_core::shaping::QueueSelector;

/// The reply: status and JSON body.
pub type Reply = (u16, String);

/// How long a suspension or bounce lasts when the request does not say (KumoMTA's
/// default).
const DEFAULT_DURATION_SECS: u64 = 300;
/// The longest accepted: a year.
const MAX_DURATION_SECS: u64 = 365 * 86_400;
/// How long the shards have to answer a question.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

/// The admin API's paths.
pub const PATHS: &[&str] = &[
    suspend::SUSPEND,
    suspend::RETRY,
    ready::PATH,
    bounce::PATH,
    queues::QUEUES,
    queues::SUMMARY,
    queues::INSPECT_MESSAGE,
    queues::WARMUP,
    queues::INSPECT_SCHED_Q,
    rebind::PATH,
    queues::CLUSTER,
];

/// Answers a request to one of [`PATHS`] (authorized by the caller). `json`: the
/// body is declared `application/json`.
pub async fn handle(
    shard: &Shard,
    method: &hyper::Method,
    path: &str,
    query: &str,
    body: &[u8],
    json: bool,
) -> Reply {
    use hyper::Method;
    let changes = *method == Method::POST || *method == Method::DELETE;
    if changes && !json {
        return error(
            415,
            "unsupported media type",
            "the body must be application/json",
        );
    }
    match (method.clone(), path) {
        (Method::POST, suspend::RETRY) => suspend::retry(shard, body).await,
        (Method::GET, suspend::SUSPEND) => suspend::list(shard),
        (Method::POST, suspend::SUSPEND) => suspend::suspend(shard, body).await,
        (Method::DELETE, suspend::SUSPEND) => suspend::resume(shard, body).await,
        (Method::GET, ready::PATH) => ready::list(shard),
        (Method::POST, ready::PATH) => ready::suspend(shard, body).await,
        (Method::DELETE, ready::PATH) => ready::resume(shard, body).await,
        (Method::GET, bounce::PATH) => bounce::list(shard),
        (Method::POST, bounce::PATH) => bounce::bounce(shard, body).await,
        (Method::DELETE, bounce::PATH) => bounce::cancel(shard, body).await,
        (Method::GET, queues::QUEUES) => queues::list(shard, query).await,
        (Method::GET, queues::SUMMARY) => queues::summary(shard).await,
        (Method::GET, queues::INSPECT_MESSAGE) => queues::inspect_message(shard, query).await,
        (Method::GET, queues::WARMUP) => queues::warmup(shard),
        (Method::GET, queues::INSPECT_SCHED_Q) => queues::inspect_sched_q(shard, query).await,
        (Method::POST, rebind::PATH) => rebind::rebind(shard, body).await,
        (Method::GET, queues::CLUSTER) => queues::cluster(shard),
        _ => error(
            405,
            "invalid HTTP method",
            &format!("{method} is not a verb of {path}"),
        ),
    }
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

fn invalid(description: &str) -> Reply {
    error(400, "invalid request body", description)
}

fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, Reply> {
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de).map_err(|err| {
        let (_, description) = crate::json::describe_error(err);
        invalid(&description)
    })
}

/// Parses a request whose `reason` must say something.
fn parse_with_reason<'a, T: Deserialize<'a>>(
    body: &'a [u8],
    reason: impl Fn(&T) -> &str,
) -> Result<T, Reply> {
    let request: T = parse(body)?;
    if reason(&request).trim().is_empty() {
        return Err(invalid("reason: must not be empty"));
    }
    Ok(request)
}

/// A duration as KumoMTA's clients send it: seconds, or text (`"90s"`, `"5m"`,
/// `"1h30m"`, humantime's `"1h 30m"`, `"2days"`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum DurationText {
    Seconds(u64),
    Fractional(f64),
    Text(String),
}

/// When something set now for `duration` (or until `expires`, RFC 3339) expires,
/// in unix ms; the default duration when neither is given.
fn expiry(duration: Option<&DurationText>, expires: Option<&str>) -> Result<u64, Reply> {
    let now = unix_ms();
    if let Some(at) = expires {
        let at = humantime::parse_rfc3339_weak(at.trim()).map_err(|err| {
            invalid(&format!(
                "expires: `{at}` is not an RFC 3339 time such as \"2026-12-06T20:00:00Z\" ({err})"
            ))
        })?;
        let ms = at
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        if ms <= now || ms > now + MAX_DURATION_SECS * 1000 {
            return Err(invalid(&format!(
                "expires: must be in the future, and within {MAX_DURATION_SECS} seconds"
            )));
        }
        return Ok(ms);
    }
    let ms = match duration {
        None => DEFAULT_DURATION_SECS * 1000,
        Some(DurationText::Seconds(s)) => s.saturating_mul(1000),
        Some(DurationText::Fractional(s)) if s.is_finite() && *s > 0.0 => (s * 1000.0) as u64,
        Some(DurationText::Fractional(s)) => {
            return Err(invalid(&format!("duration: {s} is not a positive number of seconds")));
        }
        Some(DurationText::Text(t)) => match parse_duration(t) {
            Some(s) => s * 1000,
            None => humantime::parse_duration(t.trim())
                .map(|d| d.as_millis() as u64)
                .map_err(|_| {
                    invalid(&format!(
                        "duration: `{t}` is not a duration such as \"90s\", \"5m\", \"2h\", \"1d\" or \"1h30m\""
                    ))
                })?,
        },
    };
    if !(1000..=MAX_DURATION_SECS * 1000).contains(&ms) {
        return Err(invalid(&format!(
            "duration: must be between 1 second and {MAX_DURATION_SECS} seconds"
        )));
    }
    Ok(now + ms)
}

/// What is left of a duration until `expires_ms`, as KumoMTA lists it (humantime).
fn remaining(expires_ms: u64, now: u64) -> String {
    let secs = expires_ms.saturating_sub(now).div_ceil(1000);
    humantime::format_duration(Duration::from_secs(secs)).to_string()
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

/// Tells every shard to look at the live settings now.
fn wake_all(shard: &Shard) {
    let mesh = &shard.shared.mesh;
    for to in 0..mesh.shards() {
        // A full inbox is a busy shard: it looks at the settings within a round.
        let _ = mesh.send(to as u16, Note::Wake);
    }
}

/// Writes the suspensions and bounces to `admin.json` (on the blocking-call thread:
/// it fsyncs), then wakes every shard. A change that could not be written is still
/// in force until a restart: the 500 says so.
async fn saved_and_applied(shard: &Shard) -> Result<(), Reply> {
    wake_all(shard);
    let shared = shard.shared.clone();
    match glommio::executor()
        .spawn_blocking(move || shared.live.save())
        .await
    {
        Ok(()) => Ok(()),
        Err(err) => {
            tracing::error!("the admin API's state could not be written: {err}");
            Err(error(
                500,
                "not kept across a restart",
                &format!(
                    "the change is in force, but admin.json could not be written ({err}): it is lost if gannetd restarts"
                ),
            ))
        }
    }
}

/// Asks every shard `question`; their answers in shard order. 504 when a shard does
/// not answer in time.
pub async fn ask(
    shard: &Shard,
    question: Question,
) -> Result<Vec<(u16, serde_json::Value)>, Reply> {
    let mesh = &shard.shared.mesh;
    let answers = Answers::new(mesh.shards());
    for to in 0..mesh.shards() {
        let note = Note::Ask(Box::new(Ask {
            question: question.clone(),
            answers: answers.clone(),
        }));
        crate::notes::send_surely(mesh, to as u16, note, &shard.shutdown).await;
    }
    let all = answers.all();
    let timeout = async {
        crate::timer::sleep(ANSWER_WITHIN).await;
        Vec::new()
    };
    let got = futures_lite::future::or(all, timeout).await;
    if got.len() < mesh.shards() {
        return Err(error(
            504,
            "shards did not answer",
            &format!(
                "{} of {} shards answered within {} s",
                answers.answered(),
                mesh.shards(),
                ANSWER_WITHIN.as_secs()
            ),
        ));
    }
    Ok(got)
}

/// The value of query parameter `name`, percent-decoded.
pub fn query_value(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then(|| percent_decode(value))
    })
}

pub fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
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

/// Adds `item` to a list of the live settings (`list`), expired ones dropped,
/// unless `delivery.suspensions_max` are active already (422 naming `what`); then
/// writes the list to `admin.json`, applies it and answers `{"id": id}`.
async fn add_bounded<T: std::fmt::Debug>(
    shard: &Shard,
    list: fn(&mut crate::live::LiveState) -> &mut Vec<T>,
    expires: fn(&T) -> u64,
    item: T,
    id: String,
    what: &str,
) -> Reply {
    let now = unix_ms();
    let max = shard.shared.config.delivery.suspensions_max.usize();
    let added = shard.shared.live.update(|state| {
        let items = list(state);
        items.retain(|i| expires(i) > now);
        if items.len() >= max {
            return false;
        }
        tracing::info!(?item, "{what} defined");
        items.push(item);
        true
    });
    if !added {
        return error(
            422,
            &format!("too many {what}s"),
            &format!(
                "at most {max} {what}s are active at once (delivery.suspensions_max); lift some first"
            ),
        );
    }
    if let Err(reply) = saved_and_applied(shard).await {
        return reply;
    }
    (200, serde_json::json!({ "id": id }).to_string())
}

/// Lifts the item of a list of the live settings whose id the request `body`
/// gives (404 naming `what` when none is active), then writes and applies.
async fn lift<T>(
    shard: &Shard,
    body: &[u8],
    list: fn(&mut crate::live::LiveState) -> &mut Vec<T>,
    id_and_expiry: fn(&T) -> (&str, u64),
    what: &str,
) -> Reply {
    let request: IdRequest = match parse(body) {
        Ok(r) => r,
        Err(reply) => return reply,
    };
    let now = unix_ms();
    let found = shard.shared.live.update(|state| {
        let items = list(state);
        let active = |i: &T| id_and_expiry(i).1 > now;
        let found = items
            .iter()
            .any(|i| id_and_expiry(i).0 == request.id && active(i));
        items.retain(|i| id_and_expiry(i).0 != request.id && active(i));
        found
    });
    if !found {
        return error(
            404,
            &format!("no such {what}"),
            &format!("id `{}` is not an active {what}", request.id),
        );
    }
    tracing::info!(id = request.id, "{what} lifted");
    if let Err(reply) = saved_and_applied(shard).await {
        return reply;
    }
    (200, "{}".into())
}

/// The `id` of a request that lifts something.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IdRequest {
    id: String,
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

    #[test]
    fn durations_in_every_form_clients_send() {
        let now = unix_ms();
        let after = |d: DurationText| expiry(Some(&d), None).unwrap() - now;
        assert!((300_000..301_000).contains(&(expiry(None, None).unwrap() - now)));
        assert!((90_000..91_000).contains(&after(DurationText::Seconds(90))));
        assert!((5_400_000..5_401_000).contains(&after(DurationText::Text("1h30m".into()))));
        assert!((5_400_000..5_401_000).contains(&after(DurationText::Text("1h 30m".into()))));
        assert!((1_500..2_500).contains(&after(DurationText::Fractional(1.5))));
        for bad in ["", "soon", "0s", "400days"] {
            let (status, body) = expiry(Some(&DurationText::Text(bad.into())), None).unwrap_err();
            assert_eq!(status, 400, "{bad}");
            assert!(body.contains("duration"), "{body}");
        }
        let (_, body) = expiry(None, Some("yesterday")).unwrap_err();
        assert!(
            body.contains("expires: `yesterday` is not an RFC 3339 time"),
            "{body}"
        );
        let (_, body) = expiry(None, Some("2001-01-01T00:00:00Z")).unwrap_err();
        assert!(body.contains("must be in the future"), "{body}");
        assert_eq!(remaining(now + 90_500, now), "1m 31s");
    }

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(
            query_value("a=1&queue_name=c%3Aacme%40a.test&x", "queue_name").as_deref(),
            Some("c:acme@a.test")
        );
        assert_eq!(query_value("id=abc", "id").as_deref(), Some("abc"));
        assert_eq!(query_value("id=%zz%4", "id").as_deref(), Some("%zz%4"));
        assert_eq!(query_value("a=1", "id"), None);
    }
}
