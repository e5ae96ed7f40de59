//! Addresses and sockets: resolving, listening and connecting over TCP (IPv4, IPv6) or Unix
//! domain sockets, behind one `Stream` and one `Listener` type, with errors that say what was
//! attempted.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{tcp, unix, TcpListener, TcpSocket, TcpStream, UnixListener, UnixStream};

use crate::engine::error::{Error, Result};

/// Where to listen or connect.
#[derive(Debug, Clone)]
pub enum Endpoint {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Endpoint::Tcp { host, port } => write!(f, "{host}:{port}"),
            Endpoint::Unix(path) => write!(f, "{}", path.display()),
        }
    }
}

/// A bound address or a peer's address.
#[derive(Debug, Clone)]
pub enum Address {
    Inet(SocketAddr),
    /// A Unix socket path; empty for an unnamed (client) socket.
    Unix(PathBuf),
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Inet(addr) => addr.fmt(f),
            Address::Unix(path) => write!(f, "{}", path.display()),
        }
    }
}

/// Every address `host` resolves to, in the resolver's order (like `socket.getaddrinfo`).
pub async fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>> {
    let found = tokio::net::lookup_host((host, port))
        .await
        .map_err(|err| Error::Resolve {
            host: host.to_owned(),
            err,
        })?;
    let addrs: Vec<SocketAddr> = found.collect();
    if addrs.is_empty() {
        return Err(Error::Resolve {
            host: host.to_owned(),
            err: io::Error::other("no addresses found"),
        });
    }
    Ok(addrs)
}

/// A listening TCP or Unix socket.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// Binds `endpoint`: TCP on the first address of its host, with SO_REUSEADDR like the seed's
    /// server; a Unix socket at its path (which must not exist yet).
    pub async fn bind(endpoint: &Endpoint, backlog: u32) -> Result<Listener> {
        match endpoint {
            Endpoint::Tcp { host, port } => {
                let addr = resolve(host, *port).await?[0];
                let os = |err| Error::Os {
                    err,
                    doing: format!("listen on {addr}"),
                };
                let socket = if addr.is_ipv4() {
                    TcpSocket::new_v4()
                } else {
                    TcpSocket::new_v6()
                }
                .map_err(os)?;
                socket.set_reuseaddr(true).map_err(os)?;
                socket.bind(addr).map_err(os)?;
                Ok(Listener::Tcp(socket.listen(backlog).map_err(os)?))
            }
            Endpoint::Unix(path) => {
                let os = |err| Error::Os {
                    err,
                    doing: format!("listen on {}", path.display()),
                };
                let std_listener = std::os::unix::net::UnixListener::bind(path).map_err(os)?;
                std_listener.set_nonblocking(true).map_err(os)?;
                Ok(Listener::Unix(
                    UnixListener::from_std(std_listener).map_err(os)?,
                ))
            }
        }
    }

    /// The address actually bound (with the real port when 0 was asked for).
    pub fn local_address(&self) -> Result<Address> {
        let os = |err| Error::Os {
            err,
            doing: "read the bound address".to_owned(),
        };
        match self {
            Listener::Tcp(listener) => Ok(Address::Inet(listener.local_addr().map_err(os)?)),
            Listener::Unix(listener) => {
                let addr = listener.local_addr().map_err(os)?;
                Ok(Address::Unix(
                    addr.as_pathname().map(PathBuf::from).unwrap_or_default(),
                ))
            }
        }
    }

    /// Waits for the next connection.
    pub async fn accept(&self) -> io::Result<(Stream, Address)> {
        match self {
            Listener::Tcp(listener) => {
                let (stream, peer) = listener.accept().await?;
                // Replies are written whole; waiting to coalesce them only adds latency.
                stream.set_nodelay(true)?;
                Ok((Stream::Tcp(stream), Address::Inet(peer)))
            }
            Listener::Unix(listener) => {
                let (stream, peer) = listener.accept().await?;
                let path = peer.as_pathname().map(PathBuf::from).unwrap_or_default();
                Ok((Stream::Unix(stream), Address::Unix(path)))
            }
        }
    }
}

/// A connection to the first address of `endpoint` that accepts one (like
/// `socket.create_connection`).
pub async fn connect(endpoint: &Endpoint) -> Result<Stream> {
    match endpoint {
        Endpoint::Tcp { host, port } => {
            let mut last_error = None;
            for addr in resolve(host, *port).await? {
                match TcpStream::connect(addr).await {
                    Ok(stream) => {
                        stream.set_nodelay(true).map_err(|err| Error::Os {
                            err,
                            doing: format!("configure {addr}"),
                        })?;
                        return Ok(Stream::Tcp(stream));
                    }
                    Err(err) => {
                        last_error = Some(Error::Os {
                            err,
                            doing: format!("connect to {addr}"),
                        })
                    }
                }
            }
            Err(last_error.expect("resolve returns at least one address"))
        }
        Endpoint::Unix(path) => UnixStream::connect(path)
            .await
            .map(Stream::Unix)
            .map_err(|err| Error::Os {
                err,
                doing: format!("connect to {}", path.display()),
            }),
    }
}

/// A TCP or Unix connection; reads and writes go to whichever it is.
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

impl Stream {
    /// Splits the connection into a read half and a write half that can be used apart.
    pub fn into_split(self) -> (ReadPart, WritePart) {
        match self {
            Stream::Tcp(s) => {
                let (read, write) = s.into_split();
                (ReadPart::Tcp(read), WritePart::Tcp(write))
            }
            Stream::Unix(s) => {
                let (read, write) = s.into_split();
                (ReadPart::Unix(read), WritePart::Unix(write))
            }
        }
    }
}

/// The read half of a split connection.
pub enum ReadPart {
    Tcp(tcp::OwnedReadHalf),
    Unix(unix::OwnedReadHalf),
}

impl AsyncRead for ReadPart {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ReadPart::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            ReadPart::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

/// The write half of a split connection: `try_write` works from any thread (it never waits),
/// `writable` waits on the runtime.
pub enum WritePart {
    Tcp(tcp::OwnedWriteHalf),
    Unix(unix::OwnedWriteHalf),
}

impl WritePart {
    /// Writes what the socket takes now; `WouldBlock` if it takes nothing.
    pub fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            WritePart::Tcp(s) => s.try_write(buf),
            WritePart::Unix(s) => s.try_write(buf),
        }
    }

    /// Waits until the socket may take more.
    pub async fn writable(&self) -> io::Result<()> {
        match self {
            WritePart::Tcp(s) => s.writable().await,
            WritePart::Unix(s) => s.writable().await,
        }
    }
}
