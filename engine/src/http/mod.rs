//! The HTTP listener: Prometheus `/metrics` and `/health` today; the injection and
//! admin APIs (with hyper) arrive with the HTTP API issue. Requests are parsed with
//! httparse; HTTP/1.1 keep-alive is honoured; bodies are refused.

use std::rc::Rc;
use std::time::Duration;

use glommio::net::{TcpListener, TcpStream};

use crate::runtime::io::Conn;
use crate::shard::Shard;

/// Largest request head accepted.
const HEAD_BYTES_MAX: usize = 16 << 10;
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
    let mut conn = Conn::Plain(stream);
    let mut buf = vec![0u8; HEAD_BYTES_MAX];
    let mut len = 0;
    loop {
        let head_end = memchr::memmem::find(&buf[..len], b"\r\n\r\n");
        let Some(head_end) = head_end else {
            if len == buf.len() {
                let _ = respond(
                    &mut conn,
                    431,
                    "application/json",
                    &error_json("request head too large"),
                    false,
                )
                .await;
                break;
            }
            match conn.read(&mut buf[len..], IDLE_TIMEOUT).await {
                Ok(0) | Err(_) => break,
                Ok(n) => len += n,
            }
            continue;
        };
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        let parsed = request.parse(&buf[..head_end + 4]);
        let (status, content_type, body, keep_alive) = match parsed {
            Ok(httparse::Status::Complete(_)) => route(&shard, &request),
            _ => (
                400,
                "application/json",
                error_json("malformed HTTP request"),
                false,
            ),
        };
        if respond(&mut conn, status, content_type, &body, keep_alive)
            .await
            .is_err()
            || !keep_alive
        {
            break;
        }
        buf.copy_within(head_end + 4..len, 0);
        len -= head_end + 4;
    }
    conn.close().await;
}

fn route(shard: &Shard, request: &httparse::Request<'_, '_>) -> (u16, &'static str, String, bool) {
    let has_body = request.headers.iter().any(|h| {
        (h.name.eq_ignore_ascii_case("content-length") && h.value != b"0")
            || h.name.eq_ignore_ascii_case("transfer-encoding")
    });
    let close = request.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("connection") && h.value.eq_ignore_ascii_case(b"close")
    });
    let keep_alive = request.version == Some(1) && !close && !has_body;
    let method = request.method.unwrap_or("");
    let path = request.path.unwrap_or("").split('?').next().unwrap_or("");
    if has_body {
        return (
            413,
            "application/json",
            error_json("request bodies are not accepted here"),
            false,
        );
    }
    match (method, path) {
        ("GET", "/metrics") => (
            200,
            "text/plain; version=0.0.4",
            crate::metrics::render(&shard.shared.metrics),
            keep_alive,
        ),
        ("GET", "/health") => (
            200,
            "application/json",
            "{\"status\":\"ok\"}".into(),
            keep_alive,
        ),
        (_, "/metrics" | "/health") => (
            405,
            "application/json",
            error_json("method not allowed"),
            keep_alive,
        ),
        _ => (
            404,
            "application/json",
            error_json("no such endpoint"),
            keep_alive,
        ),
    }
}

/// SparkPost's error shape, which the HTTP API issue keeps.
fn error_json(message: &str) -> String {
    serde_json::json!({ "errors": [{ "message": message }] }).to_string()
}

async fn respond(
    conn: &mut Conn,
    status: u16,
    content_type: &str,
    body: &str,
    keep_alive: bool,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
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
