//! hyper on glommio: a TCP stream (plain or TLS) seen through hyper's IO traits, with an idle
//! deadline on reads (a client that sends nothing for `idle` is dropped, which also
//! bounds how long a request head may trickle in).
//!
//! hyper's HTTP/1 server connection needs no executor; it runs as one glommio task
//! per connection on the shard that accepted it. Its timer ([`GlommioTimer`]) is
//! glommio's, for the deadline on a whole request head (`header_read_timeout`): the
//! idle deadline alone would let a client trickle a head in a byte at a time.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use glommio::timer::Timer;
use hyper::rt::ReadBufCursor;

/// Bytes read from the socket per call; hyper copies them into its own buffer.
const SCRATCH_BYTES: usize = 16 << 10;

#[derive(Debug)]
pub struct HyperIo<S> {
    stream: S,
    idle: Duration,
    /// Armed when a read finds nothing to read; dropped when bytes arrive.
    timer: Option<Timer>,
    /// hyper's read buffer may be uninitialised, and filling it in place would need
    /// `unsafe`; reading into this buffer and copying costs one memcpy per read.
    scratch: Box<[u8]>,
}

/// The server side of a TLS handshake within `limit`.
pub async fn accept_tls(
    stream: TcpStream,
    config: std::sync::Arc<rustls::ServerConfig>,
    limit: Duration,
) -> io::Result<futures_rustls::server::TlsStream<TcpStream>> {
    crate::timer::deadline(
        futures_rustls::TlsAcceptor::from(config).accept(stream),
        limit,
    )
    .await
}

impl<S: AsyncRead + AsyncWrite + Unpin> HyperIo<S> {
    pub fn new(stream: S, idle: Duration) -> HyperIo<S> {
        HyperIo {
            stream,
            idle,
            timer: None,
            scratch: vec![0; SCRATCH_BYTES].into_boxed_slice(),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> hyper::rt::Read for HyperIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let want = buf.remaining().min(this.scratch.len());
        match Pin::new(&mut this.stream).poll_read(cx, &mut this.scratch[..want]) {
            Poll::Ready(Ok(n)) => {
                this.timer = None;
                buf.put_slice(&this.scratch[..n]);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            Poll::Pending => {
                let idle = this.idle;
                let timer = this.timer.get_or_insert_with(|| Timer::new(idle));
                match Pin::new(timer).poll(cx) {
                    Poll::Ready(_) => Poll::Ready(Err(io::ErrorKind::TimedOut.into())),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> hyper::rt::Write for HyperIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_close(cx)
    }
}

/// glommio's timers seen as hyper's, for `header_read_timeout`.
#[derive(Debug, Clone, Copy, Default)]
pub struct GlommioTimer;

/// One glommio timer as hyper's `Sleep`.
struct GlommioSleep(Timer);

// SAFETY: hyper asks its timers' sleeps to be Send and Sync because most runtimes
// move tasks between threads. Here every hyper connection is one glommio task made
// with `spawn_local` (ingress::http::serve): it is polled, and its sleeps created, polled and
// dropped, only on the executor thread that created them, so the glommio timer
// inside never crosses or is shared between threads.
unsafe impl Send for GlommioSleep {}
// SAFETY: as for Send above: never reached from another thread.
unsafe impl Sync for GlommioSleep {}

impl std::future::Future for GlommioSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        Pin::new(&mut self.get_mut().0).poll(cx).map(|_| ())
    }
}

impl hyper::rt::Sleep for GlommioSleep {}

impl hyper::rt::Timer for GlommioTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(GlommioSleep(Timer::new(duration)))
    }

    fn sleep_until(&self, deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep(deadline.saturating_duration_since(std::time::Instant::now()))
    }
}
