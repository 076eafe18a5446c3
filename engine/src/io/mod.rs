//! Glommio IO adapters for the protocol code: a connection that is plain TCP or TLS,
//! reads and writes bounded by a deadline, listening sockets, the shard's shutdown
//! signal and the process's stop bell (`stop`), and (`http`) hyper's IO over a
//! glommio stream. Protocol code reaches
//! glommio's sockets only through these.

pub mod http;
pub mod https;
pub mod proxy;
mod stop;

pub use stop::StopBell;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;

use crate::timer::{deadline, sleep};

/// A client connection.
#[derive(Debug)]
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<futures_rustls::server::TlsStream<TcpStream>>),
    /// The client side of TLS (outbound delivery).
    TlsClient(Box<futures_rustls::client::TlsStream<TcpStream>>),
    /// Only while a TLS handshake owns the stream.
    Gone,
}

impl Conn {
    /// The negotiated TLS session, if any.
    pub fn tls_session(&self) -> Option<&rustls::ServerConnection> {
        match self {
            Conn::Tls(s) => Some(s.get_ref().1),
            _ => None,
        }
    }

    /// Reads what is available (at least one byte, or 0 at end of stream) within `limit`.
    pub async fn read(&mut self, buf: &mut [u8], limit: Duration) -> io::Result<usize> {
        let read = async {
            match self {
                Conn::Plain(s) => s.read(buf).await,
                Conn::Tls(s) => s.read(buf).await,
                Conn::TlsClient(s) => s.read(buf).await,
                Conn::Gone => Err(io::ErrorKind::NotConnected.into()),
            }
        };
        deadline(read, limit).await
    }

    pub async fn write_all(&mut self, bytes: &[u8], limit: Duration) -> io::Result<()> {
        let write = async {
            match self {
                Conn::Plain(s) => s.write_all(bytes).await,
                Conn::Tls(s) => {
                    s.write_all(bytes).await?;
                    s.flush().await
                }
                Conn::TlsClient(s) => {
                    s.write_all(bytes).await?;
                    s.flush().await
                }
                Conn::Gone => Err(io::ErrorKind::NotConnected.into()),
            }
        };
        deadline(write, limit).await
    }

    /// Runs the server side of a TLS handshake on a plain connection.
    pub async fn start_tls(
        &mut self,
        config: Arc<rustls::ServerConfig>,
        limit: Duration,
    ) -> io::Result<()> {
        let Conn::Plain(stream) = std::mem::replace(self, Conn::Gone) else {
            return Err(io::Error::other("TLS is already active"));
        };
        let acceptor = futures_rustls::TlsAcceptor::from(config);
        let tls = deadline(acceptor.accept(stream), limit).await?;
        *self = Conn::Tls(Box::new(tls));
        Ok(())
    }

    /// Opens a TCP connection to `addr`, from `source` when given (binding a source
    /// address needs bind-before-connect, which runs on glommio's blocking-call thread;
    /// without one the connect is an io_uring operation).
    pub async fn connect(
        addr: std::net::SocketAddr,
        source: Option<std::net::IpAddr>,
        limit: Duration,
    ) -> io::Result<Conn> {
        let stream = match source {
            None => TcpStream::connect_timeout(addr, limit)
                .await
                .map_err(io::Error::from)?,
            Some(source) => {
                let socket = glommio::executor()
                    .spawn_blocking(move || -> io::Result<socket2::Socket> {
                        let socket = socket2::Socket::new(
                            socket2::Domain::for_address(addr),
                            socket2::Type::STREAM,
                            None,
                        )?;
                        socket.bind(&std::net::SocketAddr::new(source, 0).into())?;
                        socket.connect_timeout(&addr.into(), limit)?;
                        socket.set_nonblocking(true)?;
                        Ok(socket)
                    })
                    .await?;
                let fd = std::os::fd::IntoRawFd::into_raw_fd(socket);
                // SAFETY: `fd` is a connected TCP socket whose ownership into_raw_fd just
                // gave up; glommio's TcpStream takes it over and closes it.
                unsafe { <TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd) }
            }
        };
        let _ = stream.set_nodelay(true);
        Ok(Conn::Plain(stream))
    }

    /// Runs the client side of a TLS handshake on a plain connection.
    pub async fn start_tls_client(
        &mut self,
        config: Arc<rustls::ClientConfig>,
        server_name: rustls::pki_types::ServerName<'static>,
        limit: Duration,
    ) -> io::Result<()> {
        let Conn::Plain(stream) = std::mem::replace(self, Conn::Gone) else {
            return Err(io::Error::other("TLS is already active"));
        };
        let connector = futures_rustls::TlsConnector::from(config);
        let tls = deadline(connector.connect(server_name, stream), limit).await?;
        *self = Conn::TlsClient(Box::new(tls));
        Ok(())
    }

    /// Whether the peer has sent something nobody has read yet, or closed: checked
    /// without waiting, on the TCP socket (under TLS, too). For a connection that sat
    /// idle, either means it cannot carry another transaction.
    pub fn peer_has_spoken(&self) -> bool {
        use std::os::fd::AsRawFd as _;
        let fd = match self {
            Conn::Plain(s) => s.as_raw_fd(),
            Conn::Tls(s) => s.get_ref().0.as_raw_fd(),
            Conn::TlsClient(s) => s.get_ref().0.as_raw_fd(),
            Conn::Gone => return true,
        };
        let mut byte = 0u8;
        // SAFETY: `fd` is the open socket this Conn owns; recv writes at most one byte
        // into `byte` and, with MSG_PEEK, consumes nothing.
        let n = unsafe {
            libc::recv(
                fd,
                (&raw mut byte).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        n >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock
    }

    /// The negotiated client TLS session, if any.
    pub fn tls_client_session(&self) -> Option<&rustls::ClientConnection> {
        match self {
            Conn::TlsClient(s) => Some(s.get_ref().1),
            _ => None,
        }
    }

    /// Ends the connection: TLS says close_notify; plain TCP needs nothing before
    /// the drop closes the socket (which sends the FIN), so no shutdown(2) is spent.
    pub async fn close(&mut self) {
        match self {
            Conn::Plain(_) => {}
            Conn::Tls(s) => {
                let _ = s.close().await;
            }
            Conn::TlsClient(s) => {
                let _ = s.close().await;
            }
            Conn::Gone => {}
        }
    }
}

/// A shard's listening socket: SO_REUSEPORT (every shard binds the same address and
/// the kernel spreads connections), SO_REUSEADDR (see [`reusable_socket`]), and
/// TCP_NODELAY, which Linux copies to every accepted connection — one setsockopt per
/// listener instead of one per connection (replies are written whole, so Nagle would
/// only delay them).
pub fn listen(addr: std::net::SocketAddr) -> io::Result<glommio::net::TcpListener> {
    let socket = reusable_socket(addr)?;
    socket.set_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    let fd = std::os::fd::IntoRawFd::into_raw_fd(socket);
    // SAFETY: `fd` is a bound, listening TCP socket whose ownership into_raw_fd just
    // gave up; glommio's listener takes it over and closes it.
    Ok(unsafe { <glommio::net::TcpListener as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// A TCP socket for a listening address with SO_REUSEADDR and SO_REUSEPORT, not yet
/// bound.
///
/// SO_REUSEADDR is what lets a daemon that was killed (SIGKILL, the OOM killer, a
/// power cut of the process) start again at once on the same port: its accepted
/// connections outlive it in FIN_WAIT or TIME_WAIT for up to a minute, and Linux
/// refuses a bind beside them unless both the new socket and those connections —
/// which inherit the flag from the listener that accepted them — carry it. It never
/// lets two listeners share a port (a LISTEN socket always conflicts); SO_REUSEPORT
/// is what the shards of one daemon share it by.
pub fn reusable_socket(addr: std::net::SocketAddr) -> io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    Ok(socket)
}

/// A shard's "stop now" flag, which tasks can await.
#[derive(Debug, Default)]
pub struct Shutdown {
    raised: Cell<bool>,
    next_waiter: Cell<u64>,
    /// One slot per pending [`Shutdown::wait`] future, removed when it is dropped, so
    /// that a long session awaiting many commands does not pile up wakers.
    waiters: RefCell<HashMap<u64, Waker>>,
}

impl Shutdown {
    pub fn raise(&self) {
        self.raised.set(true);
        for (_, waker) in self.waiters.borrow_mut().drain() {
            waker.wake();
        }
    }

    pub fn is_raised(&self) -> bool {
        self.raised.get()
    }

    /// Sleeps for `d`, or less if the shutdown is raised meanwhile.
    pub async fn sleep(&self, d: Duration) {
        futures_lite::future::or(sleep(d), self.wait()).await;
    }

    /// Resolves once [`Shutdown::raise`] was called.
    pub fn wait(&self) -> ShutdownWait<'_> {
        let id = self.next_waiter.get();
        self.next_waiter.set(id + 1);
        ShutdownWait { shutdown: self, id }
    }
}

/// The future of [`Shutdown::wait`].
#[derive(Debug)]
pub struct ShutdownWait<'a> {
    shutdown: &'a Shutdown,
    id: u64,
}

impl Future for ShutdownWait<'_> {
    type Output = ();

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<()> {
        if self.shutdown.raised.get() {
            return Poll::Ready(());
        }
        self.shutdown
            .waiters
            .borrow_mut()
            .insert(self.id, cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for ShutdownWait<'_> {
    fn drop(&mut self) {
        self.shutdown.waiters.borrow_mut().remove(&self.id);
    }
}

/// Runs `work` on a thread of its own and waits for it without blocking the
/// executor: for blocking work that may take long (an HTTP request to a webhook's
/// receiver) and must not hold up glommio's blocking thread, which writes the shard's
/// event log and stored items. None if the thread could not start or panicked.
pub async fn on_thread<T: Send + 'static>(
    name: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    type Slot<T> = std::sync::Mutex<(Option<T>, Option<Waker>, bool)>;
    let slot: Arc<Slot<T>> = Arc::new(std::sync::Mutex::new((None, None, false)));
    let theirs = slot.clone();
    let spawned = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            // Marks the slot finished even if `work` panics (the guard drops).
            struct Finish<T>(Arc<Slot<T>>, Option<T>);
            impl<T> Drop for Finish<T> {
                fn drop(&mut self) {
                    let waker = {
                        let mut slot = self
                            .0
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        slot.0 = self.1.take();
                        slot.2 = true;
                        slot.1.take()
                    };
                    if let Some(waker) = waker {
                        waker.wake();
                    }
                }
            }
            let mut finish = Finish(theirs, None);
            finish.1 = Some(work());
        });
    if spawned.is_err() {
        return None;
    }
    std::future::poll_fn(|cx| {
        let mut slot = slot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if slot.2 {
            Poll::Ready(slot.0.take())
        } else {
            slot.1 = Some(cx.waker().clone());
            Poll::Pending
        }
    })
    .await
}

/// Replaces `file` with `bytes` atomically and durably (its directory made when
/// missing), on glommio's blocking thread: the executor never waits on the disk.
pub async fn write_file_durably(file: std::path::PathBuf, bytes: Vec<u8>) -> io::Result<()> {
    glommio::executor()
        .spawn_blocking(move || {
            if let Some(dir) = file.parent() {
                std::fs::create_dir_all(dir)?;
            }
            gannet_spool::durable::write_file(&file, &bytes, 0o600)
        })
        .await
}
