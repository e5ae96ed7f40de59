//! One connection's set-up, in the order its bytes come: the PROXY header (when the server
//! takes one), then TLS, then who the caller is. The accept loop and the one-exchange path
//! both go through here.

use super::*;
use crate::engine::proxy::{self, Cidr, Source};

/// The PROXY protocol on a server: every connection must begin with a v1 or v2 header, and
/// only connections from `from` are taken (a Unix socket's peers always are: the socket
/// file's permissions decide who may connect).
#[derive(Debug, Clone)]
pub struct ProxyProtocol {
    pub from: Vec<Cidr>,
}

impl ProxyProtocol {
    /// Whether a connection from `peer` may send a header.
    fn trusts(&self, peer: &Address) -> bool {
        match peer {
            Address::Inet(addr) => self.from.iter().any(|range| range.contains(addr.ip())),
            Address::Unix(_) => true,
        }
    }
}

/// A connection refused for its PROXY header (or its address): why, from where, and the
/// connection itself, still open.
pub(super) struct ProxyRefused {
    pub(super) error: Error,
    pub(super) peer: Address,
    pub(super) stream: Stream,
}

/// The most a PROXY header may take to arrive (less when `timeout` is shorter): a balancer
/// writes it with the connection's first packet.
pub const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(3);

/// The largest header: a v2 header with the most it may declare.
const PROXY_HEADER_MAX: usize = 16 + proxy::V2_MAX_BODY;

/// Who is at the other end of `stream`: its address, and its verified certificate if it
/// presented one (mutual TLS).
pub(super) fn caller_of(
    stream: &Stream,
    address: Address,
    proxy_address: Option<Address>,
) -> Caller {
    let certificate = stream
        .peer_certificates()
        .and_then(|chain| chain.into_iter().next())
        .map(crate::engine::tls::describe_certificate);
    Caller {
        address,
        certificate,
        proxy_address,
    }
}

/// Reads a PROXY header from the start of `stream`, and nothing past it: the bytes are peeked
/// first, and only the header's own are taken. `Ok(None)`: the peer left before its first
/// byte (a balancer's TCP check).
pub(super) async fn read_proxy_header(
    stream: &mut Stream,
    limit: Option<Duration>,
) -> Result<Option<Source>> {
    let limit = limit.map_or(PROXY_HEADER_TIMEOUT, |limit| {
        limit.min(PROXY_HEADER_TIMEOUT)
    });
    within(
        Some(limit),
        || "reading the PROXY protocol header".to_owned(),
        async {
            // What is taken already: only bytes known to belong to the header.
            let mut header = Vec::new();
            let mut seen = vec![0u8; PROXY_HEADER_MAX];
            loop {
                let room = PROXY_HEADER_MAX - header.len();
                let count = match stream.peek(&mut seen[..room]).await {
                    Ok(count) => count,
                    // A reset before the first byte: a balancer's TCP check (HAProxy ends its
                    // checks with one).
                    Err(err) if header.is_empty() && peer_left(&err) => 0,
                    Err(err) => return Err(WireError::Io(err).into()),
                };
                if count == 0 {
                    if header.is_empty() {
                        return Ok(None);
                    }
                    return Err(Error::Protocol(format!(
                        "bad PROXY protocol header: the peer closed the connection after {} bytes \
                     of it",
                        header.len()
                    )));
                }
                let mut candidate = header.clone();
                candidate.extend_from_slice(&seen[..count]);
                let take = match proxy::parse(&candidate) {
                    Err(err) => return Err(Error::Protocol(err.to_string())),
                    Ok(Some((source, length))) => {
                        stream
                            .read_exact(&mut seen[..length - header.len()])
                            .await
                            .map_err(WireError::Io)?;
                        return Ok(Some(source));
                    }
                    // Every byte waiting belongs to the header: take them, then wait for more.
                    Ok(None) => count,
                };
                stream
                    .read_exact(&mut seen[..take])
                    .await
                    .map_err(WireError::Io)?;
                header.extend_from_slice(&seen[..take]);
            }
        },
    )
    .await
}

impl Service {
    /// Sets a connection up for the protocol: its PROXY header read (when the server takes
    /// one), its TLS handshake done (when the server has TLS). None when it ended there
    /// (counted and logged here).
    pub(super) async fn set_up(
        &self,
        stream: Stream,
        peer: Address,
    ) -> Option<(Stream, Arc<Caller>)> {
        let (mut stream, address, proxy_address) = match self.proxied(stream, peer).await {
            Ok(Some(set_up)) => set_up,
            Ok(None) => return None,
            Err(refused) => {
                // Counted first, closed next: by the time the peer sees the close, the
                // counters say why.
                bump(&self.stats.errors.proxy, 1);
                self.peer_problem(format!(
                    "connection from {} refused: {}",
                    refused.peer, refused.error
                ));
                drop(refused.stream);
                return None;
            }
        };
        stream = self.secured(stream, &address).await?;
        let caller = caller_of(&stream, address, proxy_address);
        Some((stream, Arc::new(caller)))
    }

    /// The connection with its PROXY header read: the stream, the client's address, and the
    /// balancer's (None without the PROXY protocol). `Ok(None)`: it ended before its first
    /// byte (counted as empty). A refusal comes with the connection, to be closed once counted.
    pub(super) async fn proxied(
        &self,
        mut stream: Stream,
        peer: Address,
    ) -> std::result::Result<Option<(Stream, Address, Option<Address>)>, ProxyRefused> {
        let Some(proxy) = &self.proxy else {
            return Ok(Some((stream, peer, None)));
        };
        if !proxy.trusts(&peer) {
            let why = "its address is not in proxy_from (PROXY protocol headers are taken only \
                       from the balancers listed there)";
            return Err(ProxyRefused {
                error: Error::Protocol(why.to_owned()),
                peer,
                stream,
            });
        }
        let limit = self.limits.timeout.or(self.limits.idle_timeout);
        match read_proxy_header(&mut stream, limit).await {
            Ok(None) => {
                bump(&self.stats.empty, 1);
                Ok(None)
            }
            Ok(Some(Source::Inet { client, .. })) => {
                Ok(Some((stream, Address::Inet(client), Some(peer))))
            }
            Ok(Some(Source::Unix { client })) => {
                Ok(Some((stream, Address::Unix(client), Some(peer))))
            }
            // The balancer speaking for itself (its own health check): its address stands.
            Ok(Some(Source::Local)) => Ok(Some((stream, peer.clone(), Some(peer)))),
            Err(error) => Err(ProxyRefused {
                error,
                peer,
                stream,
            }),
        }
    }

    /// The connection as the protocol will see it: under TLS once the handshake is done (at
    /// most `timeout`, and a peer silent in it counts as idle), or as it came. None if the
    /// handshake failed (counted and logged here).
    pub(super) async fn secured(&self, stream: Stream, peer: &Address) -> Option<Stream> {
        let Some(tls) = &self.tls else {
            return Some(stream);
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.config.clone());
        let registration = self.idle.register();
        let idle = registration.enter();
        let limit = self.limits.timeout.or(self.limits.idle_timeout);
        let handshake = within(limit, || format!("TLS handshake with {peer}"), async {
            if stream.ends_before_first_byte().await {
                return Ok(None); // a balancer's TCP check: not a failed handshake
            }
            acceptor
                .accept(stream)
                .await
                .map(Some)
                .map_err(|err| Error::Tls(crate::engine::tls::describe_failure(&err, "client")))
        });
        let outcome = tokio::select! {
            _ = idle.evicted() => {
                bump(&self.stats.idle_evicted, 1);
                return None;
            }
            outcome = handshake => outcome,
        };
        match outcome {
            Ok(Some(secured)) => Some(Stream::TlsServer(Box::new(secured))),
            Ok(None) => {
                bump(&self.stats.empty, 1);
                None
            }
            Err(err) => {
                bump(&self.stats.errors.tls, 1);
                self.peer_problem(format!("TLS handshake with {peer} failed: {err}"));
                None
            }
        }
    }
}
