//! The serving engine: how a connection is answered in either protocol, the accept loop, the
//! counters, and a server's life from bind to shutdown. Replies come from a [`Responder`]; the
//! engine never waits for one on anything but a future, so a slow handler holds up only its
//! own exchange.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::stream::{FuturesOrdered, StreamExt};
use futures_util::task::AtomicWaker;
use futures_util::FutureExt;
use serde::Serialize;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::codec::Decoder;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tokio_util::task::TaskTracker;

use crate::engine::codec::{self, FrameCodec, WireError};
use crate::engine::error::{Error, Failure, FailureKind, Result};
use crate::engine::handler::{Caller, Level, Log, Responder};
use crate::engine::lock::locked;
use crate::engine::log_budget::LogBudget;
use crate::engine::net::{Address, Endpoint, Listener, Stream};
use crate::engine::runtime::{self, within};

/// The seed's reply, in the bytes its `json.dumps` writes.
pub const SEED_REPLY: &[u8] = br#"{"key": "id", "val": 123}"#;

/// How replies travel; named the same on both sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// The seed's: one request per connection, the reply is raw JSON ended by the server's close.
    Classic,
    /// Replies framed like requests; a connection carries any number of exchanges, in order.
    Framed,
}

impl std::fmt::Display for Protocol {
    /// The name the Python API uses: `classic` or `framed`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Classic => "classic",
            Protocol::Framed => "framed",
        })
    }
}

mod accept;
mod classic;
mod connection;
mod framed;
mod limits;
mod output;
mod server;
mod service;
mod slots;
mod stats;
#[cfg(test)]
mod tests;

use self::accept::*;
use self::classic::*;
pub use self::connection::*;
use self::framed::*;
pub use self::limits::*;
use self::output::*;
pub use self::server::*;
pub use self::service::*;
use self::slots::*;
pub use self::stats::*;
