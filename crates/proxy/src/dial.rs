//! Connections into a sandbox's network namespace, with no address on the host.
//!
//! A socket belongs for its whole life to the network namespace it was created in. So one
//! dedicated thread (the only one of the process that ever switches namespaces) enters the
//! sandbox's namespace, creates a socket, and comes back; the socket is then connected to the
//! port on the sandbox's loopback from the async runtime like any other. The upstream client
//! keeps connections alive between requests, so this happens once per connection, not per
//! request.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::mpsc;
use std::task::{Context, Poll};
use std::time::Duration;

use cove_types::SandboxId;
use hyper::Uri;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpSocket, TcpStream};

/// Makes sockets inside sandboxes' network namespaces.
pub trait SocketMaker: Send + Sync + 'static {
    /// A new TCP socket (non-blocking, close-on-exec) of address family `family` in the
    /// network namespace of the running sandbox `id`, or `None` when it does not run. Called on
    /// the dialer's own thread only, which it may move between namespaces.
    fn tcp_socket(&self, id: &SandboxId, family: libc::c_int) -> io::Result<Option<OwnedFd>>;
}

/// Why a connection to a sandbox's port failed.
#[derive(Debug)]
pub enum DialError {
    /// The sandbox does not run.
    NotRunning,
    /// Nothing listens on the port (on 127.0.0.1 or ::1).
    Refused,
    /// The connection was not made in time.
    TimedOut,
    /// Any other failure.
    Io(io::Error),
}

impl fmt::Display for DialError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DialError::NotRunning => f.write_str("the sandbox does not run"),
            DialError::Refused => f.write_str("connection refused"),
            DialError::TimedOut => f.write_str("connection timed out"),
            DialError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for DialError {}

type Reply = tokio::sync::oneshot::Sender<io::Result<Option<OwnedFd>>>;

/// The dialer: its thread, and the queue to it.
#[derive(Clone)]
pub struct Dialer {
    jobs: mpsc::Sender<(SandboxId, libc::c_int, Reply)>,
    connect_timeout: Duration,
}

impl Dialer {
    /// Starts the dialer's thread.
    pub fn start(maker: Arc<dyn SocketMaker>, connect_timeout: Duration) -> io::Result<Dialer> {
        let (jobs, rx) = mpsc::channel::<(SandboxId, libc::c_int, Reply)>();
        std::thread::Builder::new()
            .name("cove-dialer".into())
            .spawn(move || {
                for (id, family, reply) in rx {
                    let _ = reply.send(maker.tcp_socket(&id, family));
                }
            })?;
        Ok(Dialer {
            jobs,
            connect_timeout,
        })
    }

    async fn socket(&self, id: SandboxId, family: libc::c_int) -> Result<TcpSocket, DialError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send((id, family, tx))
            .map_err(|_| DialError::Io(io::Error::other("the dialer thread is gone")))?;
        let fd = rx
            .await
            .map_err(|_| DialError::Io(io::Error::other("the dialer thread is gone")))?
            .map_err(DialError::Io)?
            .ok_or(DialError::NotRunning)?;
        Ok(TcpSocket::from_std_stream(std::net::TcpStream::from(fd)))
    }

    /// A connection to `port` on the loopback of sandbox `id`: 127.0.0.1, then ::1 if nothing
    /// listens there.
    pub async fn connect(&self, id: SandboxId, port: u16) -> Result<TcpStream, DialError> {
        let attempts = [
            (libc::AF_INET, SocketAddr::from((Ipv4Addr::LOCALHOST, port))),
            (
                libc::AF_INET6,
                SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
            ),
        ];
        let mut refused = false;
        for (family, addr) in attempts {
            let socket = self.socket(id, family).await?;
            match tokio::time::timeout(self.connect_timeout, socket.connect(addr)).await {
                Err(_) => return Err(DialError::TimedOut),
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    return Ok(stream);
                }
                Ok(Err(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionRefused | io::ErrorKind::AddrNotAvailable
                    ) || e.raw_os_error() == Some(libc::EAFNOSUPPORT) =>
                {
                    refused = true;
                }
                Ok(Err(e)) => return Err(DialError::Io(e)),
            }
        }
        Err(if refused {
            DialError::Refused
        } else {
            DialError::TimedOut
        })
    }
}

/// The upstream client's connector: the URI's authority is `<sandbox id>:<port>`.
#[derive(Clone)]
pub struct Connector(pub Dialer);

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<TcpStream>;
    type Error = DialError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, DialError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), DialError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let dialer = self.0.clone();
        Box::pin(async move {
            let id: SandboxId = uri
                .host()
                .and_then(|h| h.parse().ok())
                .ok_or_else(|| DialError::Io(io::Error::other("not a sandbox authority")))?;
            let port = uri
                .port_u16()
                .ok_or_else(|| DialError::Io(io::Error::other("no port")))?;
            dialer.connect(id, port).await.map(TokioIo::new)
        })
    }
}
