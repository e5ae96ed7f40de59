//! The small interface through which the engine asks for a reply, and tells what happened.
//!
//! The engine hands over a request's bytes and gets back the reply's JSON bytes or a
//! [`Failure`]. It never waits for a handler on an I/O thread: `respond` returns a future that
//! completes when the reply is ready, wherever the handler runs (a thread pool, an event loop).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;

use crate::engine::error::Failure;
use crate::engine::net::Address;
use crate::engine::tls::PeerCertificate;

/// Who sent a request: the peer's address and, under mutual TLS, its verified certificate.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The client's address: the connection's peer, or under the PROXY protocol the client
    /// the balancer speaks for.
    pub address: Address,
    pub certificate: Option<PeerCertificate>,
    /// Under the PROXY protocol, the balancer's address (the connection's own peer).
    pub proxy_address: Option<Address>,
}

/// A reply on its way: the JSON text, or why there is none.
pub type PendingReply = Pin<Box<dyn Future<Output = Result<Bytes, Failure>> + Send>>;

/// Makes replies from requests.
pub trait Handler: Send + Sync + 'static {
    /// Starts answering `request` from `caller`; dropping the future abandons the exchange.
    fn respond(&self, request: Bytes, caller: &Arc<Caller>) -> PendingReply;

    /// Whether the replies to several pipelined requests may be worked on at once (they are
    /// still written in order). Off by default: a connection's requests are answered one by
    /// one, as a single client would expect of side effects.
    fn concurrent(&self) -> bool {
        false
    }

    /// How many times its size a request can take in memory once the handler has it (decoded
    /// JSON, say): above 1, the server holds requests being answered, so counted, to its
    /// `max_buffered`.
    fn expansion(&self) -> u64 {
        1
    }
}

/// Where replies come from.
#[derive(Clone)]
pub enum Responder {
    /// One JSON text for every request, encoded before serving starts.
    Fixed(Bytes),
    /// A handler per request.
    Handler(Arc<dyn Handler>),
}

impl Responder {
    /// The reply to one request.
    pub async fn reply(&self, request: &Bytes, caller: &Arc<Caller>) -> Result<Bytes, Failure> {
        match self {
            Responder::Fixed(json) => Ok(json.clone()),
            Responder::Handler(handler) => handler.respond(request.clone(), caller).await,
        }
    }

    /// See [`Handler::expansion`].
    pub fn expansion(&self) -> u64 {
        match self {
            Responder::Fixed(_) => 1,
            Responder::Handler(handler) => handler.expansion(),
        }
    }

    /// Whether pipelined requests may be answered concurrently.
    pub fn concurrent(&self) -> bool {
        match self {
            Responder::Fixed(_) => false,
            Responder::Handler(handler) => handler.concurrent(),
        }
    }
}

/// How much a log record matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Debug,
    Warning,
    Error,
}

/// Where the engine's log records go.
pub trait Log: Send + Sync + 'static {
    /// One record; `failure` is the failed exchange it is about, if any.
    fn log(&self, level: Level, message: String, failure: Option<&Failure>);
}

/// Drops every record.
pub struct NoLog;

impl Log for NoLog {
    fn log(&self, _level: Level, _message: String, _failure: Option<&Failure>) {}
}
