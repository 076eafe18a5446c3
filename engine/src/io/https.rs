//! A small HTTPS client on the executor: hyper's HTTP/1 client over a rustls stream
//! over a glommio socket, one request per connection, a deadline on the whole
//! exchange and a bound on the body read. Delivery fetches MTA-STS policies with it
//! (certificate checked against the WebPKI roots and `delivery.tls_ca_file`; no
//! redirects are followed, as RFC 8461 3.3 requires) and posts TLS-RPT reports.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};

/// What the server answered.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    /// The Content-Type header (empty when none).
    pub content_type: String,
    pub body: Vec<u8>,
}

/// A request to send.
#[derive(Debug)]
pub struct Request<'a> {
    pub method: hyper::Method,
    /// The server's name: TLS SNI, the certificate's name, the Host header.
    pub host: &'a str,
    pub path: &'a str,
    pub headers: &'a [(&'a str, &'a str)],
    pub body: Vec<u8>,
}

/// Sends `request` to `addr` over TLS (`config`), and reads the reply's body up to
/// `body_max` bytes, all within `limit`.
pub async fn send(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    request: Request<'_>,
    limit: Duration,
    body_max: usize,
) -> io::Result<Reply> {
    crate::timer::deadline(exchange(addr, config, request, body_max), limit).await
}

async fn exchange(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    request: Request<'_>,
    body_max: usize,
) -> io::Result<Reply> {
    let name = rustls::pki_types::ServerName::try_from(request.host.to_string())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let tcp = glommio::net::TcpStream::connect(addr)
        .await
        .map_err(io::Error::from)?;
    let tls = futures_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    // The deadline around the whole exchange bounds every read; the idle limit
    // only has to be no shorter.
    let io = super::http::HyperIo::new(tls, Duration::from_secs(3600));
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(io::Error::other)?;
    let driver = glommio::spawn_local(async move {
        let _ = connection.await;
    });
    let mut builder = hyper::Request::builder()
        .method(request.method)
        .uri(request.path)
        .header(hyper::header::HOST, request.host)
        .header(hyper::header::USER_AGENT, "gannet");
    for (name, value) in request.headers {
        builder = builder.header(*name, *value);
    }
    let req = builder
        .body(Full::new(Bytes::from(request.body)))
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let response = sender.send_request(req).await.map_err(io::Error::other)?;
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = Limited::new(response.into_body(), body_max)
        .collect()
        .await
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?
        .to_bytes()
        .to_vec();
    // One request per connection: dropping the driver's task closes it.
    drop(sender);
    drop(driver);
    Ok(Reply {
        status,
        content_type,
        body,
    })
}
