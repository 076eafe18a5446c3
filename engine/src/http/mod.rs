//! The HTTP listener: Prometheus `/metrics`, `/health` and the admin API for queue
//! suspensions ([`admin`], from `http.admin_from` networks only); the injection API
//! (with hyper) arrives with the HTTP API issue. Requests are parsed with httparse;
//! HTTP/1.1 keep-alive is honoured; bodies need a Content-Length and are bounded.

pub mod admin;

use std::rc::Rc;
use std::time::Duration;

use glommio::net::{TcpListener, TcpStream};

use crate::runtime::io::Conn;
use crate::shard::Shard;

/// Largest request head accepted.
const HEAD_BYTES_MAX: usize = 16 << 10;
/// Largest request body accepted (admin requests are small JSON objects).
const BODY_BYTES_MAX: usize = 64 << 10;
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn serve(shard: Rc<Shard>, listener: TcpListener) {
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            shard.shutdown.wait().await;
            None
        })
        .await;
        match accepted {
            None => return,
            Some(Ok(stream)) => {
                glommio::spawn_local(connection(shard.clone(), stream)).detach();
            }
            Some(Err(err)) => {
                tracing::warn!(shard = shard.id, "http accept failed: {err}");
                crate::runtime::io::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn connection(shard: Rc<Shard>, stream: TcpStream) {
    let peer = stream.peer_addr().ok().map(|a| a.ip());
    let mut conn = Conn::Plain(stream);
    let mut buf = vec![0u8; HEAD_BYTES_MAX + BODY_BYTES_MAX];
    let mut len = 0;
    loop {
        let head_end = memchr::memmem::find(&buf[..len.min(HEAD_BYTES_MAX)], b"\r\n\r\n");
        let Some(head_end) = head_end else {
            if len >= HEAD_BYTES_MAX {
                let reply = admin::error(431, "request head too large", "");
                let _ = respond(&mut conn, reply.into(), false).await;
                break;
            }
            match conn.read(&mut buf[len..], IDLE_TIMEOUT).await {
                Ok(0) | Err(_) => break,
                Ok(n) => len += n,
            }
            continue;
        };
        let body_start = head_end + 4;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        let parsed = request.parse(&buf[..body_start]);
        if !matches!(parsed, Ok(httparse::Status::Complete(_))) {
            let reply = admin::error(400, "malformed HTTP request", "");
            let _ = respond(&mut conn, reply.into(), false).await;
            break;
        }
        let head = Head::of(&request);
        let Some(body_len) = head.body_len else {
            let reply = admin::error(
                411,
                "a request body needs a valid Content-Length (chunked bodies are not accepted)",
                "",
            );
            let _ = respond(&mut conn, reply.into(), false).await;
            break;
        };
        if body_len > BODY_BYTES_MAX {
            let reply = admin::error(
                413,
                "request body too large",
                &format!("at most {BODY_BYTES_MAX} bytes"),
            );
            let _ = respond(&mut conn, reply.into(), false).await;
            break;
        }
        let end = body_start + body_len;
        let mut complete = true;
        while len < end {
            match conn.read(&mut buf[len..], IDLE_TIMEOUT).await {
                Ok(0) | Err(_) => {
                    complete = false;
                    break;
                }
                Ok(n) => len += n,
            }
        }
        if !complete {
            break;
        }
        let reply = route(&shard, &head, &buf[body_start..end], peer);
        if respond(&mut conn, reply, head.keep_alive).await.is_err() || !head.keep_alive {
            break;
        }
        buf.copy_within(end..len, 0);
        len -= end;
    }
    conn.close().await;
}

/// What a request's head says.
struct Head {
    method: String,
    path: String,
    keep_alive: bool,
    /// None: a body whose length is not known (chunked, or a bad Content-Length).
    body_len: Option<usize>,
    content_type: Option<String>,
}

impl Head {
    fn of(request: &httparse::Request<'_, '_>) -> Head {
        let header = |name: &str| {
            request
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).trim().to_string())
        };
        let close = header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let body_len = match (header("transfer-encoding"), header("content-length")) {
            (Some(_), _) => None,
            (None, None) => Some(0),
            (None, Some(v)) => v.parse().ok(),
        };
        Head {
            method: request.method.unwrap_or("").to_string(),
            path: request
                .path
                .unwrap_or("")
                .split('?')
                .next()
                .unwrap_or("")
                .to_string(),
            keep_alive: request.version == Some(1) && !close,
            body_len,
            content_type: header("content-type"),
        }
    }
}

/// A reply with its content type.
struct Response {
    status: u16,
    content_type: &'static str,
    body: String,
}

impl From<admin::Reply> for Response {
    fn from((status, body): admin::Reply) -> Response {
        Response {
            status,
            content_type: "application/json",
            body,
        }
    }
}

const SUSPEND: &str = "/api/admin/suspend/v1";

fn route(shard: &Shard, head: &Head, body: &[u8], peer: Option<std::net::IpAddr>) -> Response {
    let shared = &shard.shared;
    let method = head.method.as_str();
    match (method, head.path.as_str()) {
        ("GET", "/metrics") => Response {
            status: 200,
            content_type: "text/plain; version=0.0.4",
            body: crate::metrics::render(&shared.metrics),
        },
        ("GET", "/health") => (200, "{\"status\":\"ok\"}".to_string()).into(),
        (_, SUSPEND) => {
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
            let json = head
                .content_type
                .as_deref()
                .is_some_and(|t| t.starts_with("application/json"));
            match method {
                "GET" => admin::list(shared).into(),
                "POST" | "DELETE" if !json => admin::error(
                    415,
                    "unsupported media type",
                    "the body must be application/json",
                )
                .into(),
                "POST" => admin::suspend(shared, body).into(),
                "DELETE" => admin::resume(shared, body).into(),
                _ => admin::error(405, "method not allowed", "").into(),
            }
        }
        (_, "/metrics" | "/health") => admin::error(405, "method not allowed", "").into(),
        _ => admin::error(404, "no such endpoint", "").into(),
    }
}

async fn respond(conn: &mut Conn, response: Response, keep_alive: bool) -> std::io::Result<()> {
    let Response {
        status,
        content_type,
        body,
    } = response;
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Payload Too Large",
        415 => "Unsupported Media Type",
        431 => "Request Header Fields Too Large",
        _ => "Error",
    };
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: {connection}\r\n\r\n",
        body.len()
    );
    let mut out = head.into_bytes();
    out.extend_from_slice(body.as_bytes());
    conn.write_all(&out, IDLE_TIMEOUT).await
}
