//! The HTTP and HTTPS listeners of every shard: hyper's HTTP/1.1 server
//! (keep-alive) over glommio sockets (`io::http`), one task per connection.
//!
//! - `GET /health` on every listener; the rest as the listener's services say:
//! - "metrics": `GET /metrics` (Prometheus);
//! - "admin": the admin API ([`admin`]: queue suspensions), with a key of role
//!   `admin` from `http.admin_from` networks;
//! - "inject": the injection API, with a key of role `inject` from `http.api_keys`:
//!   SparkPost's Transmissions API ([`transmissions`]) with stored [`templates`] and
//!   [`recipient_lists`] (each the key's tenant's alone), SparkPost's Webhooks API
//!   ([`webhooks`]: the event hose's webhooks, each its key's tenant's), its
//!   Suppression List API ([`suppression_list`], per tenant), its Metrics API
//!   ([`metrics_api`], from gannet's own events), and KumoMTA's [`inject`] API;
//! - "tracking": the open pixel and click redirect ([`tracking`]).
//!
//! Request bodies are bounded by `http.request_bytes_max` (413) and requests in
//! flight per shard by `http.requests_in_flight_max` (503). Every error is JSON in
//! SparkPost's shape: `{"errors":[{"message","description","code"}]}`.

pub mod inject;
pub mod metrics_api;
pub mod recipient_lists;
pub mod suppression_list;
pub mod templates;
pub mod tracking;
pub mod transmissions;
pub mod webhooks;

use std::convert::Infallible;
use std::net::IpAddr;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use glommio::net::{TcpListener, TcpStream};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};

use crate::admin;
use crate::io::http::{self as http_io, HyperIo};
use crate::metrics::ShardMetrics;
use crate::services::ShardServices;
use crate::shard::Shard;
use gannet_core::auth::ApiIdentity;
use gannet_core::config::{Role, Services};

/// A connection that sends nothing for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head hyper buffers.
const HEAD_BYTES_MAX: usize = 64 << 10;

/// Serves HTTP (or HTTPS when `tls`) on `listener` until shutdown: `/health`, and
/// the endpoints of `services`.
pub async fn serve(svc: Rc<ShardServices>, listener: TcpListener, tls: bool, services: Services) {
    let shard = &svc.shard;
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            shard.shutdown.wait().await;
            None
        })
        .await;
        match accepted {
            None => return,
            Some(Ok(stream)) => {
                glommio::spawn_local(accepted_connection(svc.clone(), stream, tls, services))
                    .detach();
            }
            Some(Err(err)) => {
                tracing::warn!(shard = shard.id, "http accept failed: {err}");
                crate::timer::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn accepted_connection(
    svc: Rc<ShardServices>,
    stream: TcpStream,
    tls: bool,
    services: Services,
) {
    // TCP_NODELAY comes from the listener (io::listen).
    let peer = stream.peer_addr().ok().map(|a| a.ip());
    let from = Origin { peer, services };
    if !tls {
        return connection(svc, HyperIo::new(stream, IDLE_TIMEOUT), from).await;
    }
    let Some(config) = svc.shard.shared.tls.clone() else {
        return;
    };
    match http_io::accept_tls(stream, config, TLS_HANDSHAKE_TIMEOUT).await {
        Ok(stream) => connection(svc, HyperIo::new(stream, IDLE_TIMEOUT), from).await,
        Err(err) => tracing::debug!(shard = svc.shard.id, "https handshake failed: {err}"),
    }
}

/// Where a request came from: the client's address and what its listener serves.
#[derive(Debug, Clone, Copy)]
struct Origin {
    peer: Option<IpAddr>,
    services: Services,
}

async fn connection<S>(svc: Rc<ShardServices>, io: HyperIo<S>, from: Origin)
where
    S: futures_lite::AsyncRead + futures_lite::AsyncWrite + Unpin + 'static,
{
    let shard = &svc.shard;
    let service = {
        let svc = svc.clone();
        hyper::service::service_fn(move |request| {
            let svc = svc.clone();
            async move { Ok::<_, Infallible>(handle(svc, request, from).await) }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .keep_alive(true)
        .max_buf_size(HEAD_BYTES_MAX)
        .timer(http_io::GlommioTimer)
        .header_read_timeout(Duration::from_secs(
            shard.config().http.request_head_timeout_secs.get(),
        ));
    let conn = builder.serve_connection(io, service);
    let mut conn = std::pin::pin!(conn);
    let served = futures_lite::future::or(async { Some(conn.as_mut().await) }, async {
        shard.shutdown.wait().await;
        None
    })
    .await;
    match served {
        Some(Err(err)) if !err.is_incomplete_message() => {
            tracing::debug!(shard = shard.id, "http connection: {err}");
        }
        Some(_) => {}
        None => {
            // Shutting down: finish the request in progress, then close.
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// A reply before it becomes a hyper response.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Bytes,
    /// A redirect's target.
    pub location: Option<String>,
}

impl Reply {
    pub fn json(status: u16, body: String) -> Reply {
        Reply {
            status,
            content_type: "application/json",
            body: body.into(),
            location: None,
        }
    }

    /// 204 with no body (a deletion).
    pub fn no_content() -> Reply {
        Reply {
            status: 204,
            content_type: "application/json",
            body: Bytes::new(),
            location: None,
        }
    }

    /// An error in SparkPost's shape (`code` and `description` left out when empty).
    pub fn error(status: u16, code: &str, message: &str, description: &str) -> Reply {
        let mut detail = serde_json::json!({ "message": message });
        if !description.is_empty() {
            detail["description"] = description.into();
        }
        if !code.is_empty() {
            detail["code"] = code.into();
        }
        Reply::json(
            status,
            serde_json::json!({ "errors": [detail] }).to_string(),
        )
    }
}

impl From<admin::Reply> for Reply {
    fn from((status, body): admin::Reply) -> Reply {
        Reply::json(status, body)
    }
}

/// Decrements the shard's in-flight count when the request is done.
struct InFlight<'a>(&'a Shard);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.http_in_flight.set(self.0.http_in_flight.get() - 1);
    }
}

async fn handle(
    svc: Rc<ShardServices>,
    request: Request<Incoming>,
    from: Origin,
) -> hyper::Response<Full<Bytes>> {
    let shard = &svc.shard;
    let metrics = &shard.metrics;
    ShardMetrics::add(&metrics.http_requests_total, 1);
    // Monitoring stays answerable under load: /metrics and /health are not counted.
    let monitoring = matches!(request.uri().path(), "/metrics" | "/health");
    let full = shard.http_in_flight.get() >= shard.config().http.requests_in_flight_max.usize();
    let reply = if full && !monitoring {
        Reply::error(503, "", "too many requests in flight", "try again shortly")
    } else {
        shard.http_in_flight.set(shard.http_in_flight.get() + 1);
        let _in_flight = InFlight(shard);
        let (head, body) = request.into_parts();
        match read_body(shard, &head, body).await {
            Ok(body) => route(&svc, &head, &body, from).await,
            Err(reply) => reply,
        }
    };
    if reply.status >= 400 {
        ShardMetrics::add(&metrics.http_requests_failed_total, 1);
    }
    let mut response = hyper::Response::new(Full::new(reply.body));
    if let Some(location) = reply
        .location
        .and_then(|l| hyper::header::HeaderValue::from_str(&l).ok())
    {
        response
            .headers_mut()
            .insert(hyper::header::LOCATION, location);
    }
    *response.status_mut() =
        StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(reply.content_type),
    );
    response
}

/// The whole body, within `http.request_bytes_max`.
async fn read_body(
    shard: &Shard,
    head: &hyper::http::request::Parts,
    body: Incoming,
) -> Result<Bytes, Reply> {
    let max = shard.config().http.request_bytes_max.usize();
    let too_large = || {
        Reply::error(
            413,
            "",
            "request body too large",
            &format!("at most {max} bytes (http.request_bytes_max)"),
        )
    };
    let declared = head
        .headers
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    let mut body = Limited::new(body, max);
    let mut collected = bytes::BytesMut::new();
    // A deadline that slow but steady bodies meet and trickling ones (slowloris) miss.
    let http = &shard.config().http;
    let (timeout, rate) = (
        http.request_body_timeout_secs.get(),
        http.request_body_rate_min_bytes_per_sec.get(),
    );
    let mut deadline = std::time::Instant::now() + Duration::from_secs(timeout);
    let per_byte = Duration::from_secs(1) / rate as u32;
    let too_slow = || {
        Reply::error(
            408,
            "",
            "request body too slow",
            &format!(
                "the body must arrive within {timeout}s plus a second per {rate} bytes (http.request_body_timeout_secs, request_body_rate_min_bytes_per_sec)"
            ),
        )
    };
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(too_slow());
        }
        let frame = futures_lite::future::or(async { Some(body.frame().await) }, async {
            crate::timer::sleep(left).await;
            None
        })
        .await;
        match frame {
            None => return Err(too_slow()),
            Some(None) => return Ok(collected.freeze()),
            Some(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    deadline += per_byte.saturating_mul(data.len() as u32);
                    collected.extend_from_slice(&data);
                }
            }
            Some(Some(Err(err))) if err.is::<http_body_util::LengthLimitError>() => {
                return Err(too_large());
            }
            Some(Some(Err(err))) => {
                return Err(Reply::error(
                    400,
                    "",
                    "request body could not be read",
                    &err.to_string(),
                ));
            }
        }
    }
}

const TRANSMISSIONS: &str = "/api/v1/transmissions";
const TEMPLATES: &str = "/api/v1/templates";
const INJECT: &str = "/api/inject/v1";
const RECIPIENT_LISTS: &str = "/api/v1/recipient-lists";
const WEBHOOKS: &str = "/api/v1/webhooks";
const SUPPRESSION_LIST: &str = "/api/v1/suppression-list";
const METRICS_API: &str = "/api/v1/metrics";

async fn route(
    svc: &ShardServices,
    head: &hyper::http::request::Parts,
    body: &[u8],
    from: Origin,
) -> Reply {
    let Origin { peer, services } = from;
    let shard = &svc.shard;
    let shared = &shard.shared;
    let method = &head.method;
    // "/something is equivalent to /something/" (SparkPost).
    let path = head.uri.path();
    let path = if path.len() > 1 {
        path.trim_end_matches('/')
    } else {
        path
    };
    let json = head
        .headers
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| {
            t.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/json")
        });
    let not_json = || {
        Reply::error(
            415,
            "",
            "unsupported media type",
            "the body must be application/json",
        )
    };
    let not_found = || {
        Reply::error(
            404,
            "1101",
            "invalid URI",
            &format!("no endpoint at {path}"),
        )
    };
    match path {
        "/health" if method == Method::GET => Reply::json(200, "{\"status\":\"ok\"}".to_string()),
        "/health" => method_not_allowed(),
        "/metrics" if !services.metrics => not_found(),
        "/metrics" if method == Method::GET => Reply {
            status: 200,
            content_type: "text/plain; version=0.0.4",
            body: {
                let mut text = crate::metrics::render(&shared.metrics);
                shared.hose.render_metrics(&mut text);
                if let Some(cluster) = &shared.cluster {
                    cluster.render_metrics(&mut text);
                }
                text.into()
            },
            location: None,
        },
        "/metrics" => method_not_allowed(),
        // A failpoint for the panic policy's test (runtime::abort_on_panic); debug
        // builds only, from the admin networks.
        #[cfg(debug_assertions)]
        "/debug/panic"
            if method == Method::POST
                && peer.is_some_and(|ip| {
                    shared.config.http.admin_from.iter().any(|c| c.contains(ip))
                }) =>
        {
            panic!("panic requested by POST /debug/panic on shard {}", shard.id)
        }
        _ if path.starts_with("/u/") => {
            if !services.tracking {
                return not_found();
            }
            // The prefix is ASCII, so byte 3 starts the token.
            tracking::unsubscribe(shard, &path[3..], head, body, peer)
        }
        _ if path.starts_with("/o/") || path.starts_with("/c/") => {
            if !services.tracking {
                return not_found();
            }
            match *method {
                // The prefix is ASCII, so byte 3 starts the token.
                Method::GET | Method::HEAD => {
                    tracking::hit(shard, &path[3..], path.as_bytes()[1] == b'c', head, peer)
                }
                _ => method_not_allowed(),
            }
        }
        _ if admin::PATHS.contains(&path) => {
            if !services.admin {
                return not_found();
            }
            let allowed =
                peer.is_some_and(|ip| shared.config.http.admin_from.iter().any(|c| c.contains(ip)));
            if !allowed {
                return admin::error(
                    403,
                    "forbidden",
                    "the admin API is open to http.admin_from networks only",
                )
                .into();
            }
            if let Err(reply) = authorize(shard, head, Role::Admin) {
                return reply;
            }
            let query = head.uri.query().unwrap_or("");
            admin::handle(shard, method, path, query, body, json)
                .await
                .into()
        }
        TRANSMISSIONS | INJECT if services.inject => {
            let identity = match authorize(shard, head, Role::Inject) {
                Ok(identity) => identity,
                Err(reply) => return reply,
            };
            let tenant = identity.tenant.as_deref();
            let query = head.uri.query().unwrap_or("");
            match *method {
                Method::POST if !json => not_json(),
                Method::POST if path == INJECT => {
                    inject::inject(&svc.jobs, &identity, peer, body).await
                }
                Method::POST => transmissions::create(&svc.jobs, &identity, peer, body).await,
                Method::GET if path == TRANSMISSIONS => {
                    transmissions::read(shard, tenant, None, query)
                }
                Method::DELETE if path == TRANSMISSIONS => {
                    transmissions::cancel(shard, tenant, None, query).await
                }
                _ => method_not_allowed(),
            }
        }
        _ if services.inject
            && path
                .strip_prefix(TRANSMISSIONS)
                .and_then(|r| r.strip_prefix('/'))
                .is_some_and(|id| !id.is_empty() && !id.contains('/')) =>
        {
            let identity = match authorize(shard, head, Role::Inject) {
                Ok(identity) => identity,
                Err(reply) => return reply,
            };
            let tenant = identity.tenant.as_deref();
            let id = &path[TRANSMISSIONS.len() + 1..];
            let query = head.uri.query().unwrap_or("");
            match *method {
                Method::GET => transmissions::read(shard, tenant, Some(id), query),
                Method::DELETE => transmissions::cancel(shard, tenant, Some(id), query).await,
                _ => method_not_allowed(),
            }
        }
        _ if services.inject
            && (path.starts_with(TEMPLATES)
                || path.starts_with(RECIPIENT_LISTS)
                || path.starts_with(WEBHOOKS)
                || path.starts_with(SUPPRESSION_LIST)
                || path.starts_with(METRICS_API)) =>
        {
            let identity = match authorize(shard, head, Role::Inject) {
                Ok(identity) => identity,
                Err(reply) => return reply,
            };
            let tenant = identity.tenant.as_deref();
            if !body.is_empty() && !json {
                return not_json();
            }
            let query = head.uri.query().unwrap_or("");
            if let Some(rest) = path
                .strip_prefix(TEMPLATES)
                .filter(|r| r.is_empty() || r.starts_with('/'))
            {
                templates::handle(shard, tenant, method, rest, query, body).await
            } else if let Some(rest) = path
                .strip_prefix(RECIPIENT_LISTS)
                .filter(|r| r.is_empty() || r.starts_with('/'))
            {
                recipient_lists::handle(shard, tenant, method, rest, query, body).await
            } else if let Some(rest) = path
                .strip_prefix(WEBHOOKS)
                .filter(|r| r.is_empty() || r.starts_with('/'))
            {
                webhooks::handle(shard, tenant, method, rest, query, body).await
            } else if let Some(rest) = path
                .strip_prefix(SUPPRESSION_LIST)
                .filter(|r| r.is_empty() || r.starts_with('/'))
            {
                suppression_list::handle(shard, tenant, method, rest, query, body).await
            } else if let Some(rest) = path
                .strip_prefix(METRICS_API)
                .filter(|r| r.is_empty() || r.starts_with('/'))
            {
                metrics_api::handle(shard, tenant, method, rest, query).await
            } else {
                not_found()
            }
        }
        _ => not_found(),
    }
}

/// Runs a change of the template and list store on glommio's blocking-call thread
/// (it writes and fsyncs a file); an I/O error is a 500 saying `what` was not stored.
pub async fn blocking_store_change(
    what: &'static str,
    change: impl FnOnce() -> std::io::Result<Result<(), Reply>> + Send + 'static,
) -> Result<(), Reply> {
    match glommio::executor().spawn_blocking(change).await {
        Ok(result) => result,
        Err(err) => Err(Reply::error(
            500,
            "",
            &format!("{what} could not be stored"),
            &err.to_string(),
        )),
    }
}

/// 422 for a tenant that has `max` stored items of a kind already.
pub fn too_many(what: &str, max: usize, key: &str) -> Reply {
    Reply::error(
        422,
        "",
        &format!("too many {what}"),
        &format!("at most {max} per tenant ({key}); delete some first"),
    )
}

/// The value of query parameter `name`, percent-decoded.
pub fn query_value(query: &str, name: &str) -> Option<String> {
    crate::admin::query_value(query, name)
}

/// A `true`/`false` query parameter (None when absent or anything else).
pub fn query_flag(query: &str, name: &str) -> Option<bool> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then_some(())?;
        match value {
            "true" => Some(true),
            "false" => Some(false),
            _ => None,
        }
    })
}

fn method_not_allowed() -> Reply {
    Reply::error(405, "1102", "invalid HTTP method", "")
}

/// The API key's identity when it has `role`; 401 without a known key, 403 with a
/// key of another role.
fn authorize(
    shard: &Shard,
    head: &hyper::http::request::Parts,
    role: Role,
) -> Result<ApiIdentity, Reply> {
    let header = head
        .headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let wanted = match role {
        Role::Inject => "inject",
        Role::Admin => "admin",
    };
    match header.and_then(|h| shard.shared.api_keys.identify(h)) {
        Some(identity) if identity.role == role => Ok(identity.clone()),
        Some(identity) => Err(Reply::error(
            403,
            "",
            "Forbidden.",
            &format!(
                "API key {:?} may not use this endpoint: it needs a key with role = \"{wanted}\" (http.api_keys)",
                identity.name
            ),
        )),
        None => Err(Reply::error(
            401,
            "",
            "Unauthorized.",
            &format!(
                "a valid API key with role = \"{wanted}\" is needed in the Authorization header (http.api_keys)"
            ),
        )),
    }
}

/// Parses a JSON body: malformed JSON is 400, a value of the wrong type 422; both
/// name where the problem is.
pub fn parse_json<'a, T: serde::Deserialize<'a>>(body: &'a [u8]) -> Result<T, Reply> {
    if std::str::from_utf8(body).is_err() {
        return Err(Reply::error(400, "1305", "Input Data not UTF8 encoded", ""));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de);
    if value.is_ok()
        && let Err(err) = de.end()
    {
        return Err(Reply::error(
            400,
            "1300",
            "invalid data format/type",
            &format!("Problems parsing request as json: {err}"),
        ));
    }
    value.map_err(|err| {
        let (inner, description) = crate::json::describe_error(err);
        if inner.is_data() {
            Reply::error(422, "1300", "invalid data format/type", &description)
        } else {
            Reply::error(
                400,
                "1300",
                "invalid data format/type",
                &format!("Problems parsing request as json: {description}"),
            )
        }
    })
}
