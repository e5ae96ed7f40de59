//! Addresses and sockets: resolving, listening and connecting over TCP (IPv4, IPv6) or Unix
//! domain sockets, behind one `Stream` and one `Listener` type, with errors that say what was
//! attempted.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{tcp, unix, TcpListener, TcpSocket, TcpStream, UnixListener, UnixStream};

use crate::engine::error::{Error, Result};

/// Where to listen or connect.
#[derive(Debug, Clone)]
pub enum Endpoint {
    Tcp {
        host: String,
        port: u16,
    },
    Unix(PathBuf),
    /// A listening socket made elsewhere (a supervisor), by its file descriptor: servers only.
    /// The server listens on a duplicate; the descriptor stays its owner's, and so does a Unix
    /// socket's file.
    Socket(std::os::fd::RawFd),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Endpoint::Tcp { host, port } => write!(f, "{host}:{port}"),
            Endpoint::Unix(path) => write_unix_path(f, path),
            Endpoint::Socket(fd) => write!(f, "the socket with file descriptor {fd}"),
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
            Address::Unix(path) => write_unix_path(f, path),
        }
    }
}

/// A socket path for people: an abstract name as `@name` (the way `ss` shows it).
fn write_unix_path(f: &mut std::fmt::Formatter<'_>, path: &Path) -> std::fmt::Result {
    match abstract_name(path) {
        Some(name) => write!(f, "@{}", String::from_utf8_lossy(name)),
        None => write!(f, "{}", path.display()),
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
    Unix(UnixListener, SocketFile),
}

/// The file a Unix socket was bound to, removed when the listener goes (if it is still ours:
/// another server may have replaced it since). None for an abstract name, which has no file.
pub struct SocketFile(Option<(PathBuf, (u64, u64))>);

impl SocketFile {
    fn of(path: &Path) -> SocketFile {
        SocketFile(identity(path).map(|id| (path.to_owned(), id)))
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Some((path, id)) = &self.0 {
            if identity(path) == Some(*id) {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// A file's (device, inode), to tell whether it is still the same file.
fn identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|meta| (meta.dev(), meta.ino()))
}

/// A Linux abstract socket name, written as a path that starts with a NUL ("\0name").
fn abstract_name(path: &Path) -> Option<&[u8]> {
    use std::os::unix::ffi::OsStrExt;
    path.as_os_str().as_bytes().strip_prefix(b"\0")
}

#[cfg(target_os = "linux")]
fn abstract_address(name: &[u8]) -> io::Result<std::os::unix::net::SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    std::os::unix::net::SocketAddr::from_abstract_name(name)
}

#[cfg(not(target_os = "linux"))]
fn abstract_address(_name: &[u8]) -> io::Result<std::os::unix::net::SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract socket names exist only on Linux",
    ))
}

/// Binds a Unix socket at `path`. A socket file left by a server that is gone (nothing
/// accepts on it) is replaced; one where something listens stays, and "address in use" is
/// the answer.
fn bind_unix(path: &Path) -> io::Result<(std::os::unix::net::UnixListener, SocketFile)> {
    use std::os::unix::fs::FileTypeExt;
    use std::os::unix::net::{UnixListener as StdListener, UnixStream as StdStream};
    if let Some(name) = abstract_name(path) {
        let listener = StdListener::bind_addr(&abstract_address(name)?)?;
        return Ok((listener, SocketFile(None)));
    }
    match StdListener::bind(path) {
        Err(err) if err.kind() == io::ErrorKind::AddrInUse => {
            let is_socket = std::fs::symlink_metadata(path)
                .map(|meta| meta.file_type().is_socket())
                .unwrap_or(false);
            let stale = is_socket
                && matches!(StdStream::connect(path),
                    Err(refused) if refused.kind() == io::ErrorKind::ConnectionRefused);
            if !stale {
                return Err(err);
            }
            std::fs::remove_file(path)?;
            let listener = StdListener::bind(path)?;
            Ok((listener, SocketFile::of(path)))
        }
        Err(err) => Err(err),
        Ok(listener) => Ok((listener, SocketFile::of(path))),
    }
}

/// The path-like name of a Unix socket address: its path, "\0name" for an abstract one, empty
/// for an unnamed one.
fn unix_address(addr: &tokio::net::unix::SocketAddr) -> PathBuf {
    if let Some(path) = addr.as_pathname() {
        return path.to_owned();
    }
    #[cfg(target_os = "linux")]
    {
        use std::os::linux::net::SocketAddrExt;
        use std::os::unix::ffi::OsStrExt;
        let std_addr: std::os::unix::net::SocketAddr = addr.clone().into();
        if let Some(name) = std_addr.as_abstract_name() {
            let mut bytes = vec![0u8];
            bytes.extend_from_slice(name);
            return PathBuf::from(std::ffi::OsStr::from_bytes(&bytes));
        }
    }
    PathBuf::new()
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
                let (std_listener, file) = bind_unix(path).map_err(os)?;
                std_listener.set_nonblocking(true).map_err(os)?;
                Ok(Listener::Unix(
                    UnixListener::from_std(std_listener).map_err(os)?,
                    file,
                ))
            }
            Endpoint::Socket(fd) => adopt(*fd).map_err(|err| Error::Os {
                err,
                doing: format!("listen on {endpoint}"),
            }),
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
            Listener::Unix(listener, _) => {
                let addr = listener.local_addr().map_err(os)?;
                Ok(Address::Unix(unix_address(&addr)))
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
            Listener::Unix(listener, _) => {
                let (stream, peer) = listener.accept().await?;
                Ok((Stream::Unix(stream), Address::Unix(unix_address(&peer))))
            }
        }
    }
}

/// A listener on a duplicate of `fd`, which must be a listening TCP or Unix stream socket.
fn adopt(fd: std::os::fd::RawFd) -> io::Result<Listener> {
    use std::os::fd::{BorrowedFd, FromRawFd, IntoRawFd};
    if fd < 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: only borrowed for the duplicate; a bad descriptor fails in `try_clone_to_owned`.
    let owned = unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()?;
    let socket = socket2::Socket::from(owned);
    let not_listening = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a listening stream socket (bind and listen first)",
        )
    };
    if socket.r#type()? != socket2::Type::STREAM || !socket.is_listener()? {
        return Err(not_listening());
    }
    let is_unix = socket.local_addr()?.domain() == socket2::Domain::UNIX;
    socket.set_nonblocking(true)?;
    let fd = socket.into_raw_fd();
    if is_unix {
        // SAFETY: `fd` is the duplicate just made, owned by nothing else.
        let std_listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
        Ok(Listener::Unix(
            UnixListener::from_std(std_listener)?,
            SocketFile(None),
        ))
    } else {
        // SAFETY: as above.
        let std_listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
        Ok(Listener::Tcp(TcpListener::from_std(std_listener)?))
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
        Endpoint::Unix(path) => {
            let connected = match abstract_name(path) {
                // Connecting a Unix socket does not block: done at once or refused.
                Some(name) => abstract_address(name)
                    .and_then(|addr| std::os::unix::net::UnixStream::connect_addr(&addr))
                    .and_then(|stream| {
                        stream.set_nonblocking(true)?;
                        UnixStream::from_std(stream)
                    }),
                None => UnixStream::connect(path).await,
            };
            connected.map(Stream::Unix).map_err(|err| Error::Os {
                err,
                doing: format!("connect to {}", path.display()),
            })
        }
        Endpoint::Socket(_) => Err(Error::Os {
            err: io::Error::from(io::ErrorKind::InvalidInput),
            doing: format!("connect to {endpoint} (only a server adopts a socket)"),
        }),
    }
}

/// A connection to `endpoint` under TLS: connected as `connect` does, then the handshake,
/// with the server's certificate checked against the name `tls` gives for the host.
pub async fn connect_tls(
    endpoint: &Endpoint,
    tls: &crate::engine::tls::ClientTls,
) -> Result<Stream> {
    let host = match endpoint {
        Endpoint::Tcp { host, .. } => host.as_str(),
        Endpoint::Unix(_) | Endpoint::Socket(_) => "localhost",
    };
    let name = tls.name_for(host).map_err(Error::Tls)?;
    let plain = connect(endpoint).await?;
    let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
    match connector.connect(name, plain).await {
        Ok(stream) => Ok(Stream::TlsClient(Box::new(stream))),
        Err(err) => Err(Error::Tls(crate::engine::tls::describe_failure(
            &err, "server",
        ))),
    }
}

/// A TCP or Unix connection, plain or under TLS; reads and writes go to whichever it is.
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    TlsClient(Box<tokio_rustls::client::TlsStream<Stream>>),
    TlsServer(Box<tokio_rustls::server::TlsStream<Stream>>),
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
            Stream::TlsClient(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::TlsServer(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
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
            Stream::TlsClient(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::TlsServer(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
            Stream::TlsClient(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::TlsServer(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Stream::TlsClient(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::TlsServer(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Whether the peer has closed (or reset) the connection, asked of the socket itself with a
/// non-blocking `MSG_PEEK` that takes nothing (bytes waiting, or none yet: not closed).
fn peer_closed(socket: socket2::SockRef<'_>) -> bool {
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    match socket.peek(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(err) => err.kind() != io::ErrorKind::WouldBlock,
    }
}

impl Stream {
    /// Whether the peer leaves (closes or resets) before sending its first byte: waits for that
    /// byte or the end, and reads nothing. Only a TCP stream is looked at (false otherwise).
    pub async fn ends_before_first_byte(&self) -> bool {
        match self {
            Stream::Tcp(stream) => match stream.peek(&mut [0u8; 1]).await {
                Ok(0) => true,
                Ok(_) => false,
                Err(err) => matches!(
                    err.kind(),
                    io::ErrorKind::ConnectionReset
                        | io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::UnexpectedEof
                ),
            },
            _ => false,
        }
    }

    /// Copies the bytes waiting on the socket into `buf` without taking them (a PROXY header is
    /// looked at before it is read, so nothing past it is ever read). Waits for at least one
    /// byte or the end (0). Only for a plain TCP or Unix stream.
    pub async fn peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(stream) => stream.peek(buf).await,
            Stream::Unix(stream) => {
                stream
                    .async_io(tokio::io::Interest::READABLE, || {
                        // SAFETY: a [u8] is valid as [MaybeUninit<u8>], and peek only writes.
                        let uninit =
                            unsafe { &mut *(buf as *mut [u8] as *mut [std::mem::MaybeUninit<u8>]) };
                        socket2::SockRef::from(stream).peek(uninit)
                    })
                    .await
            }
            _ => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "peek is only for a plain socket",
            )),
        }
    }

    /// Whether the peer closed this idle connection, seen on the socket itself: tokio's
    /// readiness can lag the socket (the reactor may not have seen the peer's FIN yet), so a
    /// poll could say "quiet" for a connection the peer already closed. For TLS, the socket
    /// under the session (a close_notify waiting there counts as bytes, not as closed).
    pub fn closed_by_peer(&self) -> bool {
        match self {
            Stream::Tcp(s) => peer_closed(socket2::SockRef::from(s)),
            Stream::Unix(s) => peer_closed(socket2::SockRef::from(s)),
            Stream::TlsClient(s) => s.get_ref().0.closed_by_peer(),
            Stream::TlsServer(s) => s.get_ref().0.closed_by_peer(),
        }
    }

    /// Whether this is a plain (TCP or Unix) socket, which [`Stream::into_read_elsewhere`] takes.
    pub fn is_plain(&self) -> bool {
        matches!(self, Stream::Tcp(_) | Stream::Unix(_))
    }

    /// The connection as a write half whose socket someone else reads (plain sockets only;
    /// call on the runtime). The runtime watches it for room to write, never for input.
    pub fn into_read_elsewhere(self) -> io::Result<WritePart> {
        let socket = match self {
            Stream::Tcp(s) => socket2::Socket::from(std::os::fd::OwnedFd::from(s.into_std()?)),
            Stream::Unix(s) => socket2::Socket::from(std::os::fd::OwnedFd::from(s.into_std()?)),
            _ => return Err(io::ErrorKind::Unsupported.into()),
        };
        // SAFETY: the socket owns its descriptor, which stays open and the same until the
        // AsyncFd (which owns the socket) is dropped.
        let socket =
            unsafe { AsyncFd::register_with_interest(socket, tokio::io::Interest::WRITABLE) }
                .map_err(io::Error::from)?;
        Ok(WritePart::ReadElsewhere(socket))
    }

    /// Splits the connection into a read half and a write half that can be used apart.
    pub fn into_split(self) -> io::Result<(ReadPart, WritePart)> {
        match self {
            Stream::Tcp(s) => {
                let (read, write) = s.into_split();
                Ok((ReadPart::Tcp(read), WritePart::Tcp(write)))
            }
            Stream::Unix(s) => {
                let (read, write) = s.into_split();
                Ok((ReadPart::Unix(read), WritePart::Unix(write)))
            }
            // A TLS session's two directions share one state: split behind a lock.
            tls @ (Stream::TlsClient(_) | Stream::TlsServer(_)) => {
                let (read, write) = tokio::io::split(tls);
                Ok((
                    ReadPart::Tls(read),
                    WritePart::Tls(tokio::sync::Mutex::new(write)),
                ))
            }
        }
    }

    /// The certificate chain the peer presented (mutual TLS), leaf first.
    pub fn peer_certificates(&self) -> Option<Vec<Vec<u8>>> {
        let certs = match self {
            Stream::TlsServer(s) => s.get_ref().1.peer_certificates(),
            Stream::TlsClient(s) => s.get_ref().1.peer_certificates(),
            _ => None,
        }?;
        Some(certs.iter().map(|c| c.as_ref().to_vec()).collect())
    }
}

/// The read half of a split connection.
pub enum ReadPart {
    Tcp(tcp::OwnedReadHalf),
    Unix(unix::OwnedReadHalf),
    Tls(tokio::io::ReadHalf<Stream>),
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
            ReadPart::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

/// The write half of a split connection: `try_write` works from any thread (it never waits),
/// `write_some` waits on the runtime.
pub enum WritePart {
    Tcp(tcp::OwnedWriteHalf),
    Unix(unix::OwnedWriteHalf),
    /// Writes go through the TLS session, so only on the runtime (`try_write` takes nothing).
    Tls(tokio::sync::Mutex<tokio::io::WriteHalf<Stream>>),
    /// A whole plain socket whose replies are read elsewhere (an event loop watching it, see
    /// [`WritePart::recv_into`]): the runtime only waits for it to take more bytes.
    ReadElsewhere(AsyncFd<socket2::Socket>),
}

impl WritePart {
    /// [`Stream::closed_by_peer`] through the write half (TLS: false, not looked at: its
    /// socket is behind the session's lock).
    pub fn closed_by_peer(&self) -> bool {
        match self {
            WritePart::Tcp(half) => peer_closed(socket2::SockRef::from(half.as_ref())),
            WritePart::Unix(half) => peer_closed(socket2::SockRef::from(half.as_ref())),
            WritePart::Tls(_) => false,
            WritePart::ReadElsewhere(socket) => {
                peer_closed(socket2::SockRef::from(socket.get_ref()))
            }
        }
    }

    /// The socket's descriptor, for whoever reads it (`ReadElsewhere` only).
    pub fn read_elsewhere_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        match self {
            WritePart::ReadElsewhere(socket) => Some(socket.as_raw_fd()),
            _ => None,
        }
    }

    /// Reads what the socket holds now into `buf`'s spare room (`ReadElsewhere` only; never
    /// waits: `WouldBlock` when nothing is there). Ok(0) is the peer's close.
    pub fn recv_into(&self, buf: &mut bytes::BytesMut) -> io::Result<usize> {
        let WritePart::ReadElsewhere(socket) = self else {
            return Err(io::ErrorKind::Unsupported.into());
        };
        let read = socket.get_ref().recv(buf.spare_capacity_mut())?;
        // SAFETY: recv initialised the first `read` bytes of the spare room.
        unsafe { buf.set_len(buf.len() + read) };
        Ok(read)
    }

    /// Ends a TLS session with `close_notify`, so the server sees a clean end (at most `limit`
    /// spent on it); nothing to do for plain sockets, whose close says it all.
    pub async fn close_notify(&self, limit: std::time::Duration) {
        use tokio::io::AsyncWriteExt;
        if let WritePart::Tls(session) = self {
            let _ = tokio::time::timeout(limit, async {
                let mut write = session.lock().await;
                write.shutdown().await
            })
            .await;
        }
    }

    /// Writes what the socket takes now; `WouldBlock` if it takes nothing.
    pub fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            WritePart::Tcp(s) => s.try_write(buf),
            WritePart::Unix(s) => s.try_write(buf),
            WritePart::Tls(_) => Err(io::ErrorKind::WouldBlock.into()),
            WritePart::ReadElsewhere(socket) => send_now(socket.get_ref(), buf),
        }
    }

    /// Waits until some of `buf` is written; how much.
    pub async fn write_some(&self, buf: &[u8]) -> io::Result<usize> {
        use tokio::io::AsyncWriteExt;
        match self {
            WritePart::Tcp(s) => {
                s.writable().await?;
                s.try_write(buf)
            }
            WritePart::Unix(s) => {
                s.writable().await?;
                s.try_write(buf)
            }
            WritePart::Tls(s) => {
                let mut write = s.lock().await;
                let written = write.write(buf).await?;
                write.flush().await?;
                Ok(written)
            }
            WritePart::ReadElsewhere(socket) => loop {
                let mut ready = socket.writable().await?;
                if let Ok(written) = ready.try_io(|socket| send_now(socket.get_ref(), buf)) {
                    return written;
                }
            },
        }
    }
}

/// Sends what the socket takes now, without SIGPIPE for a peer that is gone.
fn send_now(socket: &socket2::Socket, buf: &[u8]) -> io::Result<usize> {
    socket.send_with_flags(buf, libc::MSG_NOSIGNAL)
}
