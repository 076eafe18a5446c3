//! The HTTP and HTTPS listeners of every shard: hyper's HTTP/1.1 server
//! (keep-alive) over glommio sockets (`runtime::http_io`), one task per connection.
//!
//! - `GET /metrics` (Prometheus), `GET /health`;
//! - the admin API ([`admin`]: queue suspensions), from `http.admin_from` networks;
//! - the injection API, with a key from `http.api_keys`: SparkPost's Transmissions
//!   API ([`transmissions`]) with stored [`templates`] and [`recipient_lists`], and
//!   KumoMTA's [`inject`] API.
//!
//! Request bodies are bounded by `http.request_bytes_max` (413) and requests in
//! flight per shard by `http.requests_in_flight_max` (503). Every error is JSON in
//! SparkPost's shape: `{"errors":[{"message","description","code"}]}`.

pub mod admin;
pub mod inject;
pub mod recipient_lists;
pub mod templates;
pub mod tracking;
pub mod transmissions;

use std::convert::Infallible;
use std::net::IpAddr;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use glommio::net::{TcpListener, TcpStream};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};

use crate::auth::ApiIdentity;
use crate::metrics::ShardMetrics;
use crate::runtime::http_io::{self, HyperIo};
use crate::shard::Shard;

/// A connection that sends nothing for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head hyper buffers.
const HEAD_BYTES_MAX: usize = 64 << 10;

/// Serves HTTP (or HTTPS when `tls`) on `listener` until shutdown.
pub async fn serve(shard: Rc<Shard>, listener: TcpListener, tls: bool) {
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            shard.shutdown.wait().await;
            None
        })
        .await;
        match accepted {
            None => return,
            Some(Ok(stream)) => {
                glommio::spawn_local(accepted_connection(shard.clone(), stream, tls)).detach();
            }
            Some(Err(err)) => {
                tracing::warn!(shard = shard.id, "http accept failed: {err}");
                crate::runtime::io::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn accepted_connection(shard: Rc<Shard>, stream: TcpStream, tls: bool) {
    // TCP_NODELAY comes from the listener (runtime::io::listen).
    let peer = stream.peer_addr().ok().map(|a| a.ip());
    if !tls {
        return connection(shard, HyperIo::new(stream, IDLE_TIMEOUT), peer).await;
    }
    let Some(config) = shard.shared.tls.clone() else {
        return;
    };
    match http_io::accept_tls(stream, config, TLS_HANDSHAKE_TIMEOUT).await {
        Ok(stream) => connection(shard, HyperIo::new(stream, IDLE_TIMEOUT), peer).await,
        Err(err) => tracing::debug!(shard = shard.id, "https handshake failed: {err}"),
    }
}

async fn connection<S>(shard: Rc<Shard>, io: HyperIo<S>, peer: Option<IpAddr>)
where
    S: futures_lite::AsyncRead + futures_lite::AsyncWrite + Unpin + 'static,
{
    let service = {
        let shard = shard.clone();
        hyper::service::service_fn(move |request| {
            let shard = shard.clone();
            async move { Ok::<_, Infallible>(handle(shard, request, peer).await) }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.keep_alive(true).max_buf_size(HEAD_BYTES_MAX);
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
    shard: Rc<Shard>,
    request: Request<Incoming>,
    peer: Option<IpAddr>,
) -> hyper::Response<Full<Bytes>> {
    let metrics = &shard.metrics;
    ShardMetrics::add(&metrics.http_requests_total, 1);
    // Monitoring stays answerable under load: /metrics and /health are not counted.
    let monitoring = matches!(request.uri().path(), "/metrics" | "/health");
    let full = shard.http_in_flight.get() >= shard.config().http.requests_in_flight_max.usize();
    let reply = if full && !monitoring {
        Reply::error(503, "", "too many requests in flight", "try again shortly")
    } else {
        shard.http_in_flight.set(shard.http_in_flight.get() + 1);
        let _in_flight = InFlight(&shard);
        let (head, body) = request.into_parts();
        match read_body(&shard, &head, body).await {
            Ok(body) => route(&shard, &head, &body, peer).await,
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
    match Limited::new(body, max).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(err) => Err(Reply::error(
            400,
            "",
            "request body could not be read",
            &err.to_string(),
        )),
    }
}

const SUSPEND: &str = "/api/admin/suspend/v1";
const TRANSMISSIONS: &str = "/api/v1/transmissions";
const TEMPLATES: &str = "/api/v1/templates";
const INJECT: &str = "/api/inject/v1";
const RECIPIENT_LISTS: &str = "/api/v1/recipient-lists";

async fn route(
    shard: &Rc<Shard>,
    head: &hyper::http::request::Parts,
    body: &[u8],
    peer: Option<IpAddr>,
) -> Reply {
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
    match path {
        "/metrics" if method == Method::GET => Reply {
            status: 200,
            content_type: "text/plain; version=0.0.4",
            body: crate::metrics::render(&shared.metrics).into(),
            location: None,
        },
        "/health" if method == Method::GET => Reply::json(200, "{\"status\":\"ok\"}".to_string()),
        "/metrics" | "/health" => method_not_allowed(),
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
        _ if path.starts_with("/o/") || path.starts_with("/c/") => match *method {
            Method::GET | Method::HEAD => {
                tracking::hit(shard, &path[3..], path.as_bytes()[1] == b'c', head, peer)
            }
            _ => method_not_allowed(),
        },
        SUSPEND => {
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
            match *method {
                Method::GET => admin::list(shared).into(),
                Method::POST | Method::DELETE if !json => not_json(),
                Method::POST => admin::suspend(shared, body).into(),
                Method::DELETE => admin::resume(shared, body).into(),
                _ => method_not_allowed(),
            }
        }
        TRANSMISSIONS | INJECT => {
            let identity = match authorize(shard, head) {
                Ok(identity) => identity,
                Err(reply) => return reply,
            };
            match *method {
                Method::POST if !json => not_json(),
                Method::POST if path == INJECT => {
                    inject::inject(shard, &identity, peer, body).await
                }
                Method::POST => transmissions::create(shard, &identity, peer, body).await,
                _ => method_not_allowed(),
            }
        }
        _ if path.starts_with(TEMPLATES) || path.starts_with(RECIPIENT_LISTS) => {
            if let Err(reply) = authorize(shard, head) {
                return reply;
            }
            if !body.is_empty() && !json {
                return not_json();
            }
            let query = head.uri.query().unwrap_or("");
            if let Some(rest) = path
                .strip_prefix(TEMPLATES)
                .filter(|r| r.is_empty() || r.starts_with('/'))
            {
                templates::handle(shard, method, rest, query, body).await
            } else if let Some(rest) = path
                .strip_prefix(RECIPIENT_LISTS)
                .filter(|r| r.is_empty() || r.starts_with('/'))
            {
                recipient_lists::handle(shard, method, rest, query, body).await
            } else {
                Reply::error(
                    404,
                    "1101",
                    "invalid URI",
                    &format!("no endpoint at {path}"),
                )
            }
        }
        _ => Reply::error(
            404,
            "1101",
            "invalid URI",
            &format!("no endpoint at {path}"),
        ),
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

/// The API key's identity, or 401.
fn authorize(shard: &Shard, head: &hyper::http::request::Parts) -> Result<ApiIdentity, Reply> {
    let header = head
        .headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match header.and_then(|h| shard.shared.api_keys.identify(h)) {
        Some(identity) => Ok(identity.clone()),
        None => Err(Reply::error(
            401,
            "",
            "Unauthorized.",
            "a valid API key is needed in the Authorization header (http.api_keys)",
        )),
    }
}

/// A JSON error with the path of the value it is about (`content.subject: invalid
/// type …`).
pub fn describe_json_error(
    err: serde_path_to_error::Error<serde_json::Error>,
) -> (serde_json::Error, String) {
    let path = err.path().to_string();
    let inner = err.into_inner();
    let description = if path == "." || path.is_empty() {
        inner.to_string()
    } else {
        format!("{path}: {inner}")
    };
    (inner, description)
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
        let (inner, description) = describe_json_error(err);
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
