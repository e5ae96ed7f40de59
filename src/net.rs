//! Addresses: resolving, listening and connecting, with errors that say what was attempted.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::errors::{Error, Result};

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
            err: std::io::Error::other("no addresses found"),
        });
    }
    Ok(addrs)
}

/// A listening socket on the first address of `host`, with SO_REUSEADDR like the seed's server.
pub async fn listen(host: &str, port: u16, backlog: u32) -> Result<TcpListener> {
    let addr = resolve(host, port).await?[0];
    let doing = || format!("listen on {addr}");
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|err| Error::Os {
        err,
        doing: doing(),
    })?;
    socket.set_reuseaddr(true).map_err(|err| Error::Os {
        err,
        doing: doing(),
    })?;
    socket.bind(addr).map_err(|err| Error::Os {
        err,
        doing: doing(),
    })?;
    socket.listen(backlog).map_err(|err| Error::Os {
        err,
        doing: doing(),
    })
}

/// A connection to the first address of `host` that accepts one (like `socket.create_connection`).
pub async fn connect(host: &str, port: u16) -> Result<TcpStream> {
    let mut last_error = None;
    for addr in resolve(host, port).await? {
        match TcpStream::connect(addr).await {
            Ok(stream) => {
                // Requests are written whole; waiting to coalesce them only adds latency.
                stream.set_nodelay(true).map_err(|err| Error::Os {
                    err,
                    doing: format!("configure {addr}"),
                })?;
                return Ok(stream);
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
