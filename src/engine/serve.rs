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

/// Counters, updated without locks from every connection; serialised with the field names
/// `stats()` shows.
#[derive(Default, Serialize)]
pub struct Stats {
    #[serde(rename = "connections_accepted")]
    accepted: AtomicU64,
    #[serde(rename = "connections_active")]
    active: AtomicU64,
    requests: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    /// Request bytes held now (partly received or being answered), against `max_buffered`.
    bytes_buffered: AtomicU64,
    idle_closed: AtomicU64,
    /// Idle connections closed to make room for a new one at `max_connections`.
    idle_evicted: AtomicU64,
    /// Connections closed to make room while stuck inside a request (no progress for
    /// `STALL_GRACE`), with no idle one left to close.
    stalled_evicted: AtomicU64,
    /// Connections refused at once: their address had `max_connections_per_address` already.
    address_refused: AtomicU64,
    /// Requests answered `busy` (framed) or connections closed (classic) because
    /// `max_buffered` was reached.
    busy: AtomicU64,
    errors: ErrorCounts,
}

/// Failed exchanges and connections, by kind.
#[derive(Default, Serialize)]
struct ErrorCounts {
    handler: AtomicU64,
    encode: AtomicU64,
    bad_request: AtomicU64,
    frame_too_large: AtomicU64,
    timeout: AtomicU64,
    disconnected: AtomicU64,
    io: AtomicU64,
    /// A bug in framesock (a caught panic): the connection, or the server, was ended.
    internal: AtomicU64,
    /// TLS handshakes that failed.
    tls: AtomicU64,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

impl Stats {
    fn failure(&self, kind: FailureKind) -> &AtomicU64 {
        match kind {
            FailureKind::BadRequest => &self.errors.bad_request,
            FailureKind::Handler => &self.errors.handler,
            FailureKind::Encode => &self.errors.encode,
        }
    }

    fn connection_error(&self, err: &Error) -> &AtomicU64 {
        match err {
            Error::Wire(WireError::FrameTooLarge { .. } | WireError::ReplyTooLarge { .. }) => {
                &self.errors.frame_too_large
            }
            Error::Wire(WireError::Truncated { .. } | WireError::ClosedBeforeMessage) => {
                &self.errors.disconnected
            }
            Error::Timeout(_) => &self.errors.timeout,
            _ => &self.errors.io,
        }
    }

    /// Requests served so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Connections open now.
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }
}

/// The request bytes one connection holds, counted in `Stats::bytes_buffered` for as long as
/// it holds them (also when shutdown drops its task).
struct Charge<'a> {
    total: &'a AtomicU64,
    held: u64,
    /// What the request now arriving declared (with its header): counted whole from its
    /// header on, so the requests arriving together can never outgrow `max_buffered`.
    reserved: u64,
}

impl<'a> Charge<'a> {
    fn new(total: &'a AtomicU64) -> Self {
        Charge {
            total,
            held: 0,
            reserved: 0,
        }
    }

    /// Counts the request now arriving as its whole declared size (`holding` bytes are here).
    fn reserve(&mut self, whole: u64, holding: usize) {
        self.reserved = whole;
        self.set(holding);
    }

    /// This connection now holds `bytes` (or its reservation, if larger).
    fn set(&mut self, bytes: usize) {
        let bytes = (bytes as u64).max(self.reserved);
        if bytes > self.held {
            self.total.fetch_add(bytes - self.held, Ordering::Relaxed);
        } else {
            self.total.fetch_sub(self.held - bytes, Ordering::Relaxed);
        }
        self.held = bytes;
    }

    /// What the other connections hold.
    fn others(&self) -> u64 {
        self.total.load(Ordering::Relaxed).saturating_sub(self.held)
    }
}

impl Drop for Charge<'_> {
    fn drop(&mut self) {
        self.reserved = 0;
        self.set(0);
    }
}

/// Counts a connection as active for as long as it lives, also when shutdown drops its task.
struct ActiveConnection<'a>(&'a AtomicU64);

impl<'a> ActiveConnection<'a> {
    fn count(active: &'a AtomicU64) -> Self {
        bump(active, 1);
        ActiveConnection(active)
    }
}

impl Drop for ActiveConnection<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The most buffered requests of one connection taken at once.
const MAX_BATCH: usize = 256;

/// The most pipelined requests of one connection a concurrent (coroutine) responder answers
/// at once (fewer when replies are large: see `answer_concurrently`).
const CONCURRENT_CHUNK: usize = 16;

/// Limits that apply to every connection.
#[derive(Debug, Clone)]
pub struct Limits {
    /// For each request from its first byte to its last, and for sending each reply.
    pub timeout: Option<Duration>,
    /// For the silence between requests on a kept connection.
    pub idle_timeout: Option<Duration>,
    pub max_frame: usize,
    /// Request bytes all connections together may hold (partly received, or being answered);
    /// a request that would take them past it is answered `busy` instead of read.
    pub max_buffered: usize,
    /// Reply bytes a connection may have waiting to be sent: past this it writes them (and
    /// reads no further request) before answering more.
    pub max_unsent: usize,
    /// Connections one client IP address may have at once (None: no limit).
    pub max_connections_per_address: Option<usize>,
}

impl Limits {
    /// How long one write may wait for the peer to read: `timeout`, or without one
    /// `idle_timeout`, so a peer that never reads cannot keep its connection forever.
    fn write_limit(&self) -> Option<Duration> {
        self.timeout.or(self.idle_timeout)
    }
}

/// Default of `max_buffered`: 256 MiB, which a small machine can spare.
pub const DEFAULT_MAX_BUFFERED: usize = 256 * 1024 * 1024;

/// Default of `max_unsent`: asyncio's default write buffer high-water mark.
pub const DEFAULT_MAX_UNSENT: usize = 64 * 1024;

/// After refusing a request's header, how long and how many of its bytes the server keeps
/// reading (and dropping) before it closes, so the client can finish sending and read why.
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: u64 = 64 * 1024 * 1024;

/// After the goodbye on a framed connection the server closes by choice, how long it reads
/// (and drops) what the client still sends: a request already on its way would otherwise meet
/// a closed socket, whose reset could cost the client the goodbye. It ends sooner when the
/// client closes.
const GOODBYE_LINGER: Duration = Duration::from_secs(1);

/// How a framed connection's serving ended.
enum Ending {
    /// The peer closed, or the server closed after telling why.
    Done,
    /// The server chooses to close, between requests: say goodbye first, with the reason.
    Goodbye(&'static str),
}

/// What waiting for a request came to.
enum Waited {
    /// These many bytes of it arrived.
    Read(usize),
    /// The peer closed its side.
    PeerClosed,
    /// The server closes the connection (the reason says why).
    Closing(&'static str),
}

/// What one classic exchange came to.
enum Classic {
    /// Shutdown came before the request.
    Stopped,
    /// The request, and the reply sent for it or why there was none.
    Answered {
        request: Bytes,
        reply: std::result::Result<Bytes, Failure>,
    },
}

/// Everything a connection needs to be served.
pub struct Service {
    pub protocol: Protocol,
    pub limits: Limits,
    pub responder: Responder,
    pub stats: Stats,
    pub log: Arc<dyn Log>,
    /// The connections silent between requests, for making room when the server is full.
    idle: IdleConnections,
    /// Connections per client IP address now, for `max_connections_per_address`.
    per_address: Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
    /// The budget of peer-problem records (WARNING).
    peer_log: LogBudget,
    /// The budget of routine records (DEBUG: clients that left without a word), kept apart so
    /// that a flood of port probes does not hide the warnings.
    quiet_log: LogBudget,
    /// TLS for every connection, if set.
    tls: Option<crate::engine::tls::ServerTls>,
    /// What requests being answered may take in memory once the handler has them (in KiB),
    /// when that is more than their size (see `Handler::expansion`).
    answering: Semaphore,
}

/// The unit of `Service::answering`: a semaphore counts in u32 per acquire.
const ANSWERING_UNIT: u64 = 1024;

/// At most this many records of one budget per window.
const PEER_LOG_BURST: u32 = 10;
const PEER_LOG_WINDOW: Duration = Duration::from_secs(10);

/// The connections waiting for a request, for making room when the server is full. Each
/// connection has a slot for its whole life; becoming idle and busy again are an atomic store
/// each (a shared map changed twice per request was a lock every connection fought over).
#[derive(Default)]
struct IdleConnections {
    /// The order of the last connection to become idle.
    last: AtomicU64,
    next_key: AtomicU64,
    slots: Mutex<std::collections::HashMap<u64, Arc<IdleSlot>>>,
    /// Set while the accept loop waits for a connection to become idle (or end).
    room_wanted: std::sync::atomic::AtomicBool,
    /// Told when a connection becomes idle while `room_wanted` is set.
    became_idle: tokio::sync::Notify,
}

/// A connection's place among the idle ones.
#[derive(Default)]
struct IdleSlot {
    /// `BUSY`, `EVICTED`, or the order in which it became idle (oldest lowest).
    since: AtomicU64,
    /// The connection's current wait, woken when it is chosen to make room (a chosen
    /// connection that is busy by then sees `EVICTED` at its next wait). A lock-free register
    /// per wait, where a `Notify` took a lock to add the waiter and another to remove it.
    evict: AtomicWaker,
}

const BUSY: u64 = 0;
const EVICTED: u64 = u64::MAX;
/// Added to the order of a connection stuck inside a request: every idle connection goes
/// before it, and among the stuck ones the one stuck longest goes first.
const STALLED: u64 = 1 << 62;

/// How long a request may make no progress before its connection may be closed to make room
/// (only when the server is full and no connection is idle): well under `timeout`, so a peer
/// that keeps connections inside requests on purpose costs one connection each, not the server.
const STALL_GRACE: Duration = Duration::from_secs(2);

impl IdleConnections {
    /// A connection's slot, until the registration goes.
    fn register(&self) -> IdleRegistration<'_> {
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(IdleSlot::default());
        locked(&self.slots).insert(key, slot.clone());
        IdleRegistration {
            set: self,
            key,
            slot,
        }
    }

    /// Closes the connection idle longest; false if none is idle. A connection that gets a
    /// request at the same moment is not chosen, or if it was, it ends after that request.
    /// It looks at every slot (a few microseconds for thousands of connections), which only a
    /// full server accepting a connection does; the per-request marks stay lock-free.
    fn evict_oldest(&self) -> bool {
        let slots = locked(&self.slots);
        loop {
            let oldest = slots
                .values()
                .filter_map(|slot| {
                    let since = slot.since.load(Ordering::SeqCst);
                    (since != BUSY && since != EVICTED).then_some((since, slot))
                })
                .min_by_key(|(since, _)| *since);
            let Some((since, slot)) = oldest else {
                return false;
            };
            let chosen = slot
                .since
                .compare_exchange(since, EVICTED, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok();
            if chosen {
                slot.evict.wake();
                return true;
            }
            // It became busy meanwhile: look again.
        }
    }
}

/// A connection's registration among the idle ones.
struct IdleRegistration<'a> {
    set: &'a IdleConnections,
    key: u64,
    slot: Arc<IdleSlot>,
}

impl IdleRegistration<'_> {
    /// Marks the connection idle until the guard goes; `evicted()` fires if it is chosen to
    /// make room.
    fn enter(&self) -> IdleGuard<'_> {
        let order = self.set.last.fetch_add(1, Ordering::Relaxed) + 1;
        self.mark(order)
    }

    /// Marks the connection evictable in `order` until the guard goes.
    fn mark(&self, order: u64) -> IdleGuard<'_> {
        // Already chosen (while busy): it stays so, and its next wait ends at once.
        let _ = self
            .slot
            .since
            .compare_exchange(BUSY, order, Ordering::SeqCst, Ordering::SeqCst);
        if self.set.room_wanted.load(Ordering::SeqCst) {
            self.set.became_idle.notify_one();
        }
        IdleGuard {
            slot: &self.slot,
            order,
        }
    }
}

impl IdleRegistration<'_> {
    /// Completes once the connection, inside a request that made no progress for
    /// `STALL_GRACE`, has been chosen to make room (after every idle one).
    async fn stalled(&self) {
        tokio::time::sleep(STALL_GRACE).await;
        let order = STALLED + self.set.last.fetch_add(1, Ordering::Relaxed) + 1;
        let guard = self.mark(order);
        guard.evicted().await;
    }
}

impl Drop for IdleRegistration<'_> {
    fn drop(&mut self) {
        locked(&self.set.slots).remove(&self.key);
    }
}

struct IdleGuard<'a> {
    slot: &'a IdleSlot,
    order: u64,
}

impl IdleGuard<'_> {
    /// Completes once the connection has been chosen to make room.
    fn evicted(&self) -> impl std::future::Future<Output = ()> + '_ {
        std::future::poll_fn(|cx| {
            self.slot.evict.register(cx.waker());
            if self.slot.since.load(Ordering::SeqCst) == EVICTED {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }
}

impl Drop for IdleGuard<'_> {
    fn drop(&mut self) {
        let _ =
            self.slot
                .since
                .compare_exchange(self.order, BUSY, Ordering::SeqCst, Ordering::SeqCst);
    }
}

/// One connection's idle limit as a single timer that is moved only when it fires early.
/// Arming a timer for every wait between requests cost an insert into tokio's timer wheel and
/// a removal from it per request; this one fires at most once per `limit` while the
/// connection is busy, and then looks again from when the current wait began.
struct IdleTimer {
    limit: Option<Duration>,
    sleep: Pin<Box<tokio::time::Sleep>>,
    /// When the current wait began.
    since: Instant,
}

impl IdleTimer {
    fn new(limit: Option<Duration>) -> Self {
        let now = Instant::now();
        // Without a limit the timer is never awaited; any deadline does.
        let first = now + limit.unwrap_or(Duration::from_secs(86400));
        IdleTimer {
            limit,
            sleep: Box::pin(tokio::time::sleep_until(first)),
            since: now,
        }
    }

    /// A wait for a request begins.
    fn start(&mut self) {
        self.since = Instant::now();
    }

    /// Completes once the current wait has lasted `limit`; never without a limit.
    async fn expired(&mut self) {
        let Some(limit) = self.limit else {
            return std::future::pending().await;
        };
        loop {
            self.sleep.as_mut().await;
            let due = self.since + limit;
            if Instant::now() >= due {
                return;
            }
            self.sleep.as_mut().reset(due);
        }
    }
}

impl Service {
    pub fn new(
        protocol: Protocol,
        limits: Limits,
        responder: Responder,
        log: Arc<dyn Log>,
    ) -> Self {
        let max_buffered = limits.max_buffered as u64;
        Service {
            protocol,
            limits,
            responder,
            stats: Stats::default(),
            log,
            idle: IdleConnections::default(),
            per_address: Mutex::default(),
            answering: Semaphore::new(answering_units(max_buffered)),
            peer_log: LogBudget::new(PEER_LOG_BURST, PEER_LOG_WINDOW),
            quiet_log: LogBudget::new(PEER_LOG_BURST, PEER_LOG_WINDOW),
            tls: None,
        }
    }

    /// The same service with every connection under TLS.
    pub fn with_tls(mut self, tls: Option<crate::engine::tls::ServerTls>) -> Self {
        self.tls = tls;
        self
    }

    /// The connection as the protocol will see it: under TLS once the handshake is done (at
    /// most `timeout`, and a peer silent in it counts as idle), or as it came. None if the
    /// handshake failed (counted and logged here).
    async fn secured(&self, stream: Stream, peer: &Address) -> Option<Stream> {
        let Some(tls) = &self.tls else {
            return Some(stream);
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.config.clone());
        let registration = self.idle.register();
        let idle = registration.enter();
        let limit = self.limits.timeout.or(self.limits.idle_timeout);
        let handshake = within(limit, || format!("TLS handshake with {peer}"), async {
            acceptor
                .accept(stream)
                .await
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
            Ok(secured) => Some(Stream::TlsServer(Box::new(secured))),
            Err(err) => {
                bump(&self.stats.errors.tls, 1);
                self.peer_problem(format!("TLS handshake with {peer} failed: {err}"));
                None
            }
        }
    }

    /// The reply to one request. A request that grows in memory once the handler has it
    /// (decoded JSON) waits until the requests being answered leave room for it in
    /// `max_buffered`, counted at that size. One larger than three quarters of it counts as
    /// three quarters, so that such documents are answered one at a time while small requests
    /// still find room beside them (when one could take all of it, a peer streaming 14 MiB
    /// documents held every other JSON request up for a whole document, ~0.45 s each).
    async fn answer(
        &self,
        request: &Bytes,
        caller: &Arc<Caller>,
    ) -> std::result::Result<Bytes, Failure> {
        let expansion = self.responder.expansion();
        if expansion <= 1 {
            return self.responder.reply(request, caller).await;
        }
        let most = answering_units(self.limits.max_buffered as u64 / 4 * 3);
        let cost = answering_units(request.len() as u64 * expansion).min(most) as u32;
        // What fits now goes now, even past a large request that waits for more room.
        let _room = match self.answering.try_acquire_many(cost) {
            Ok(room) => room,
            Err(_) => self
                .answering
                .acquire_many(cost)
                .await
                .expect("the semaphore is never closed"),
        };
        self.responder.reply(request, caller).await
    }

    /// Counts and logs a failed exchange; returns the framed error reply's JSON. A handler
    /// that failed is the program's problem: ERROR, with its traceback. A request that was
    /// bad is the peer's: see `peer_problem`.
    fn exchange_failed(&self, failure: &Failure, peer: &Address) -> Vec<u8> {
        bump(self.stats.failure(failure.kind), 1);
        let kind = failure.kind.name();
        let message = format!("request from {peer} failed ({kind}): {}", failure.message);
        match failure.kind {
            FailureKind::BadRequest => self.peer_problem(message),
            FailureKind::Handler | FailureKind::Encode => {
                self.log.log(Level::Error, message, Some(failure))
            }
        }
        error_reply(kind, &failure.message)
    }

    /// Counts and logs a connection that ended in error.
    fn connection_failed(&self, err: &Error, peer: &Address) {
        bump(self.stats.connection_error(err), 1);
        let message = format!("connection from {peer} dropped: {err}");
        match err {
            // A client that connects and leaves without a word (a port probe) is not news.
            Error::Wire(WireError::ClosedBeforeMessage) => {
                if let Some(message) = self.quiet_log.admit(message) {
                    self.log.log(Level::Debug, message, None)
                }
            }
            _ => self.peer_problem(message),
        }
    }

    /// Logs what a peer did wrong (a bad frame, a timeout, a disconnect, no room): WARNING,
    /// no traceback, and at most `PEER_LOG_BURST` records per `PEER_LOG_WINDOW`, so a peer that
    /// misbehaves on purpose cannot fill the disk. What is held back is counted and said
    /// with the next record that gets through.
    fn peer_problem(&self, message: String) {
        if let Some(message) = self.peer_log.admit(message) {
            self.log.log(Level::Warning, message, None);
        }
    }

    /// Serves one accepted connection until it ends, `stop` is cancelled between requests, or
    /// an error drops it.
    ///
    /// `slot` is the connection's place under `max_connections`: given back as soon as the
    /// connection is only saying goodbye.
    pub async fn serve_connection<S>(
        &self,
        mut stream: S,
        caller: Arc<Caller>,
        stop: CancellationToken,
        slot: Option<tokio::sync::OwnedSemaphorePermit>,
    ) where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let peer = caller.address.clone();
        // The connection's own token: waiting on the server's shared one would take its lock
        // twice per request, from every connection at once.
        let stop = stop.child_token();
        bump(&self.stats.accepted, 1);
        let _active = ActiveConnection::count(&self.stats.active);
        let Some(_counted) = AddressCount::admit(self, &peer) else {
            bump(&self.stats.address_refused, 1);
            let limit = self.limits.max_connections_per_address.unwrap_or_default();
            self.peer_problem(format!(
                "connection from {peer} refused: its address has max_connections_per_address \
                 ({limit}) connections already"
            ));
            if self.protocol == Protocol::Framed {
                drop(slot);
                let why = "its address has max_connections_per_address connections already";
                self.say_goodbye(&mut stream, why, &peer).await;
            }
            return;
        };
        let outcome = match self.protocol {
            Protocol::Classic => match self.answer_classic(&mut stream, &caller, &stop).await {
                Ok(Classic::Answered {
                    reply: Err(failure),
                    ..
                }) => {
                    self.exchange_failed(&failure, &peer);
                    Ok(())
                }
                Ok(_) => Ok(()),
                Err(err) => Err(err),
            },
            Protocol::Framed => match self.serve_framed(&mut stream, &caller, &stop).await {
                Ok(Ending::Goodbye(why)) => {
                    drop(slot);
                    self.say_goodbye(&mut stream, why, &peer).await;
                    Ok(())
                }
                Ok(Ending::Done) => Ok(()),
                Err(err) => Err(err),
            },
        };
        if let Err(err) = outcome {
            self.connection_failed(&err, &peer);
        }
        // Counted first, closed next, and only then no longer active: by the time a peer sees
        // the close, the stats say why, and `connections_active` drops once it is closed.
        drop(stream);
    }

    /// The seed's exchange: one request, a raw JSON reply, close. A failed exchange closes
    /// without a reply (the classic wire has no way to say what went wrong).
    async fn answer_classic<S>(
        &self,
        stream: &mut S,
        caller: &Arc<Caller>,
        stop: &CancellationToken,
    ) -> Result<Classic>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let peer = &caller.address;
        let timeout = self.limits.timeout;
        let mut input = BytesMut::new();
        let mut codec = FrameCodec::new(self.limits.max_frame);
        let mut charge = Charge::new(&self.stats.bytes_buffered);
        let registration = self.idle.register();
        let read = within(
            timeout,
            || format!("waiting for the request from {peer}"),
            async {
                let mut admitted = false;
                loop {
                    if let Some(frame) = codec.decode(&mut input)? {
                        return Ok(Some(frame));
                    }
                    if !admitted && input.len() >= codec::HEADER_LEN {
                        let declared =
                            u32::from_be_bytes(input[..4].try_into().unwrap_or_default());
                        let whole = codec::HEADER_LEN as u64 + u64::from(declared);
                        if charge.others() + whole > self.limits.max_buffered as u64 {
                            self.busy_reply(peer); // no room: the classic wire can only close
                            return Ok(None);
                        }
                        charge.reserve(whole, input.len());
                        admitted = true;
                    }
                    let read = if input.is_empty() {
                        // Nothing of the request yet: idle, and so first to go for room.
                        let idle = registration.enter();
                        let read = tokio::select! {
                            _ = idle.evicted() => None,
                            read = stream.read_buf(&mut input) => Some(read),
                        };
                        match read {
                            Some(read) => read,
                            // Chosen to make room: only if its request has not begun to
                            // arrive meanwhile (the classic wire cannot say "not handled").
                            None => match stream.read_buf(&mut input).now_or_never() {
                                Some(read) => read,
                                None => {
                                    bump(&self.stats.idle_evicted, 1);
                                    return Ok(None);
                                }
                            },
                        }
                    } else {
                        tokio::select! {
                            read = stream.read_buf(&mut input) => read,
                            () = registration.stalled() => {
                                bump(&self.stats.stalled_evicted, 1);
                                return Ok(None);
                            }
                        }
                    };
                    if read.map_err(WireError::Io)? == 0 {
                        let frame = codec.decode_eof(&mut input)?;
                        return frame
                            .map(Some)
                            .ok_or(Error::Wire(WireError::ClosedBeforeMessage));
                    }
                    charge.set(input.len());
                }
            },
        );
        // Shutdown drops a connection whose request has not arrived yet.
        let request = tokio::select! {
            biased;
            _ = stop.cancelled() => return Ok(Classic::Stopped),
            request = read => match request? {
                Some(frame) => frame.payload,
                None => return Ok(Classic::Stopped), // refused (busy) or evicted (idle)
            },
        };
        bump(&self.stats.requests, 1);
        bump(
            &self.stats.bytes_in,
            (codec::HEADER_LEN + request.len()) as u64,
        );
        let reply = self.answer(&request, caller).await;
        if let Ok(json) = &reply {
            within(timeout, || format!("sending the reply to {peer}"), async {
                stream.write_all(json).await.map_err(WireError::Io)?;
                stream.shutdown().await.map_err(WireError::Io)?;
                Ok(())
            })
            .await?;
            bump(&self.stats.bytes_out, json.len() as u64);
        }
        Ok(Classic::Answered { request, reply })
    }

    /// Answers `batch` with a concurrent responder: several requests at once, the replies
    /// queued in order. Only as many run at once as replies of the largest size seen so far
    /// (`largest`) fit in `max_unsent` (one while none is known, at most `CONCURRENT_CHUNK`),
    /// and none starts while earlier replies wait to be written: so the replies a connection
    /// holds stay near `max_unsent`, also for a client that never reads them.
    async fn answer_concurrently<S>(
        &self,
        stream: &mut S,
        output: &mut BytesMut,
        batch: &[Bytes],
        caller: &Arc<Caller>,
        largest: &mut usize,
    ) -> Result<()>
    where
        S: AsyncWrite + Unpin,
    {
        let mut running = FuturesOrdered::new();
        let mut requests = batch.iter();
        loop {
            let room = match *largest {
                0 => 1,
                size => (self.limits.max_unsent / size).clamp(1, CONCURRENT_CHUNK),
            };
            while running.len() < room {
                let Some(request) = requests.next() else {
                    break;
                };
                running.push_back(self.answer(request, caller));
            }
            let Some(reply) = running.next().await else {
                return Ok(());
            };
            if let Ok(json) = &reply {
                *largest = (*largest).max(json.len());
            }
            self.queue_outcome(stream, output, reply, &caller.address)
                .await?;
        }
    }

    /// Adds a handler's reply, or the error reply for its failure, to `output`.
    async fn queue_outcome<S>(
        &self,
        stream: &mut S,
        output: &mut BytesMut,
        reply: std::result::Result<Bytes, Failure>,
        peer: &Address,
    ) -> Result<()>
    where
        S: AsyncWrite + Unpin,
    {
        let (json, is_error) = match reply {
            Ok(json) => (json, false),
            Err(failure) => (Bytes::from(self.exchange_failed(&failure, peer)), true),
        };
        self.queue_reply(stream, output, &json, is_error, peer)
            .await
    }

    /// Adds a reply to `output`, writing first whatever is there if the reply would take it
    /// past `max_unsent`. A reply larger than that is written straight from where it is.
    async fn queue_reply<S>(
        &self,
        stream: &mut S,
        output: &mut BytesMut,
        json: &Bytes,
        is_error: bool,
        peer: &Address,
    ) -> Result<()>
    where
        S: AsyncWrite + Unpin,
    {
        if json.len() > codec::MAX_REPLY_PAYLOAD {
            let reply = error_reply("encode", "reply is too large for a frame");
            codec::put_reply(&reply, true, output)?;
            return Ok(());
        }
        if output.len() + json.len() > self.limits.max_unsent {
            self.send(stream, output, peer).await?;
        }
        if json.len() > self.limits.max_unsent {
            let declared = json.len() as u32 | if is_error { codec::ERROR_FLAG } else { 0 };
            let mut header = BytesMut::from(&declared.to_be_bytes()[..]);
            self.send(stream, &mut header, peer).await?;
            self.write_bounded(stream, json, peer).await?;
            bump(&self.stats.bytes_out, json.len() as u64);
            return Ok(());
        }
        codec::put_reply(json, is_error, output)?;
        Ok(())
    }

    /// Writes out and empties `output`, within the write limit.
    async fn send<S>(&self, stream: &mut S, output: &mut BytesMut, peer: &Address) -> Result<()>
    where
        S: AsyncWrite + Unpin,
    {
        if output.is_empty() {
            return Ok(());
        }
        self.write_bounded(stream, output, peer).await?;
        bump(&self.stats.bytes_out, output.len() as u64);
        output.clear();
        Ok(())
    }

    async fn write_bounded<S>(&self, stream: &mut S, bytes: &[u8], peer: &Address) -> Result<()>
    where
        S: AsyncWrite + Unpin,
    {
        within(
            self.limits.write_limit(),
            || format!("sending replies to {peer} (it is not reading them)"),
            async {
                stream
                    .write_all(bytes)
                    .await
                    .map_err(|e| WireError::Io(e).into())
            },
        )
        .await
    }

    /// Before closing on a refused request: says "no more from us", then reads and drops what
    /// the peer still sends, for a bounded time and number of bytes. Closing with its bytes
    /// unread would reset the connection, and the peer, still sending, might never read why.
    async fn linger<S>(&self, stream: &mut S, time: Duration)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let _ = tokio::time::timeout(time, async {
            let _ = stream.shutdown().await;
            let mut sink = tokio::io::sink();
            let _ = tokio::io::copy(&mut stream.take(LINGER_BYTES), &mut sink).await;
        })
        .await;
    }

    /// Closes a framed connection by the server's choice, between requests: the goodbye reply
    /// (kind `closing`: nothing without a reply was handled), then "no more from us", then
    /// what the client still sends is read and dropped for a bounded time, unhandled.
    async fn say_goodbye<S>(&self, stream: &mut S, why: &str, peer: &Address)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let message = format!(
            "the server closed this connection ({why}); every request sent on it without a \
             reply was not handled and can be sent again on a new connection"
        );
        let mut output = BytesMut::new();
        if codec::put_reply(&error_reply(codec::CLOSING, &message), true, &mut output).is_ok()
            && self.send(stream, &mut output, peer).await.is_ok()
        {
            self.linger(stream, GOODBYE_LINGER).await;
        }
    }

    /// Waits for the first bytes of a request: how many came, or that the peer closed, or that
    /// the server closes the connection (shutdown, the idle limit, or room wanted).
    async fn await_request<S>(
        &self,
        stream: &mut S,
        input: &mut BytesMut,
        stop: Pin<&mut WaitForCancellationFuture<'_>>,
        registration: &IdleRegistration<'_>,
        idle_timer: &mut IdleTimer,
    ) -> Result<Waited>
    where
        S: AsyncRead + Unpin,
    {
        input.reserve(8 * 1024);
        let idle = registration.enter();
        idle_timer.start();
        tokio::select! {
            biased;
            _ = stop => Ok(Waited::Closing("the server is shutting down")),
            _ = idle.evicted() => {
                bump(&self.stats.idle_evicted, 1);
                Ok(Waited::Closing("the server is full: the connection idle longest makes room"))
            }
            read = stream.read_buf(input) => match read {
                Ok(0) => Ok(Waited::PeerClosed),
                Ok(n) => Ok(Waited::Read(n)),
                Err(err) => Err(WireError::Io(err).into()),
            },
            _ = idle_timer.expired() => {
                bump(&self.stats.idle_closed, 1);
                Ok(Waited::Closing("idle_timeout passed with no request"))
            }
        }
    }

    /// Kept connections: answer every request already buffered, write the replies together,
    /// then wait for more.
    async fn serve_framed<S>(
        &self,
        stream: &mut S,
        caller: &Arc<Caller>,
        stop: &CancellationToken,
    ) -> Result<Ending>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let peer = &caller.address;
        let mut codec = FrameCodec::new(self.limits.max_frame);
        let mut input = BytesMut::new();
        let mut output = BytesMut::new();
        let mut charge = Charge::new(&self.stats.bytes_buffered);
        // When the request now arriving must be complete (its first byte started the clock).
        let mut request_deadline: Option<Instant> = None;
        // Whether the request now arriving was held against max_buffered already.
        let mut admitted = false;
        let registration = self.idle.register();
        let mut idle_timer = IdleTimer::new(self.limits.idle_timeout);
        // One wait on `stop` for the connection's life: a new one per request took the token's
        // lock to add a waiter and again to take it out.
        let mut stop_wait = std::pin::pin!(stop.cancelled());
        let mut batch = Vec::new();
        // The largest reply of this connection so far, for how many to answer at once.
        let mut largest_reply = 0;
        loop {
            // Every request already buffered (up to a bound), answered in order.
            let mut refused = None;
            while batch.len() < MAX_BATCH {
                match codec.decode(&mut input) {
                    Ok(Some(frame)) => batch.push(frame.payload),
                    Ok(None) => break,
                    Err(err) => {
                        refused = Some(err);
                        break;
                    }
                }
            }
            if !batch.is_empty() {
                request_deadline = None;
                admitted = false;
                charge.reserved = 0;
                bump(&self.stats.requests, batch.len() as u64);
            }
            let in_batch: usize = batch.iter().map(Bytes::len).sum();
            charge.set(input.len() + in_batch);
            // Pipelined requests to a concurrent responder are answered a few at a time, in
            // order; the replies go out whenever they pass max_unsent.
            if self.responder.concurrent() {
                self.answer_concurrently(stream, &mut output, &batch, caller, &mut largest_reply)
                    .await?;
            } else {
                for request in &batch {
                    let reply = self.answer(request, caller).await;
                    self.queue_outcome(stream, &mut output, reply, peer).await?;
                }
            }
            // The requests are answered: drop them now, so the input buffer they were cut from
            // is ours alone again and the next read reuses it instead of allocating another.
            let full = batch.len() == MAX_BATCH;
            batch.clear();
            if let Some(err) = refused {
                // The stream cannot be resynchronised after a refused header: say why, close.
                let reply = error_reply("frame_too_large", &err.to_string());
                codec::put_reply(&reply, true, &mut output)?;
                self.send(stream, &mut output, peer).await?;
                self.linger(stream, LINGER_TIME).await;
                return Err(err.into());
            }
            self.send(stream, &mut output, peer).await?;
            charge.set(input.len());
            if full {
                continue; // more requests may be buffered already
            }
            if input.is_empty() {
                match self
                    .await_request(
                        stream,
                        &mut input,
                        stop_wait.as_mut(),
                        &registration,
                        &mut idle_timer,
                    )
                    .await?
                {
                    Waited::Read(n) => bump(&self.stats.bytes_in, n as u64),
                    Waited::PeerClosed => return Ok(Ending::Done),
                    Waited::Closing(why) => return Ok(Ending::Goodbye(why)),
                }
                continue;
            }
            // Part of a request is here: the rest must arrive before the request's deadline.
            let deadline = *request_deadline.get_or_insert_with(|| {
                Instant::now()
                    + self
                        .limits
                        .timeout
                        .unwrap_or(Duration::from_secs(86400 * 365))
            });
            if !admitted && input.len() >= codec::HEADER_LEN {
                // A new request's header: is there room for all it declares?
                let declared = u32::from_be_bytes(input[..4].try_into().unwrap_or_default());
                let whole = codec::HEADER_LEN as u64 + u64::from(declared);
                if charge.others() + whole > self.limits.max_buffered as u64 {
                    self.refuse_busy(stream, &mut input, whole, deadline, peer)
                        .await?;
                    charge.set(0);
                    codec::put_reply(&self.busy_reply(peer), true, &mut output)?;
                    self.send(stream, &mut output, peer).await?;
                    request_deadline = None;
                    continue;
                }
                charge.reserve(whole, input.len());
                admitted = true;
            }
            let read = tokio::select! {
                biased;
                read = tokio::time::timeout_at(deadline, stream.read_buf(&mut input)) => read,
                () = registration.stalled() => {
                    bump(&self.stats.stalled_evicted, 1);
                    return Ok(Ending::Goodbye(
                        "the server is full and this request made no progress: it makes room",
                    ));
                }
            };
            match read {
                Err(_elapsed) => {
                    return Err(Error::Timeout(format!(
                        "timed out after {} s waiting for the rest of a request from {peer}",
                        self.limits.timeout.map_or(0.0, |t| t.as_secs_f64())
                    )))
                }
                Ok(Ok(0)) => {
                    codec.decode_eof(&mut input)?;
                    return Ok(Ending::Done);
                }
                Ok(Ok(n)) => {
                    bump(&self.stats.bytes_in, n as u64);
                    charge.set(input.len());
                }
                Ok(Err(err)) => return Err(WireError::Io(err).into()),
            }
        }
    }

    /// Reads and drops the rest of a request (`whole` bytes with its header, the first of
    /// which are in `input`) that there is no room to keep, by `deadline`.
    async fn refuse_busy<S>(
        &self,
        stream: &mut S,
        input: &mut BytesMut,
        whole: u64,
        deadline: Instant,
        peer: &Address,
    ) -> Result<()>
    where
        S: AsyncRead + Unpin,
    {
        let had = input.len() as u64;
        let pending = whole - had;
        input.clear();
        let mut sink = tokio::io::sink();
        let drained = tokio::time::timeout_at(
            deadline,
            tokio::io::copy(&mut (&mut *stream).take(pending), &mut sink),
        )
        .await;
        match drained {
            Err(_elapsed) => Err(Error::Timeout(format!(
                "timed out waiting for the rest of a request from {peer} (refused: server busy)"
            ))),
            Ok(Ok(read)) if read == pending => {
                bump(&self.stats.bytes_in, read);
                Ok(())
            }
            Ok(Ok(read)) => Err(WireError::Truncated {
                part: codec::Part::Payload,
                expected: (whole - codec::HEADER_LEN as u64) as usize,
                received: (had + read) as usize - codec::HEADER_LEN,
            }
            .into()),
            Ok(Err(err)) => Err(WireError::Io(err).into()),
        }
    }

    /// Counts and logs a request refused for lack of room; returns the error reply.
    fn busy_reply(&self, peer: &Address) -> Vec<u8> {
        bump(&self.stats.busy, 1);
        let message = format!(
            "the server holds max_buffered ({} bytes) of requests; try again later",
            self.limits.max_buffered
        );
        self.peer_problem(format!("request from {peer} refused: {message}"));
        error_reply("busy", &message)
    }
}

/// A connection counted against its IP address's `max_connections_per_address` while it lives.
struct AddressCount<'a> {
    service: &'a Service,
    ip: std::net::IpAddr,
}

impl<'a> AddressCount<'a> {
    /// Counts a connection from `peer`: None if its address has the most it may have already;
    /// without a limit (or for a Unix socket) nothing is counted.
    fn admit(service: &'a Service, peer: &Address) -> Option<Option<Self>> {
        let (Some(limit), Address::Inet(addr)) = (service.limits.max_connections_per_address, peer)
        else {
            return Some(None);
        };
        let ip = addr.ip();
        let mut counts = locked(&service.per_address);
        let count = counts.entry(ip).or_insert(0);
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(Some(AddressCount { service, ip }))
    }
}

impl Drop for AddressCount<'_> {
    fn drop(&mut self) {
        let mut counts = locked(&self.service.per_address);
        if let Some(count) = counts.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// `bytes` in units of `Service::answering`, rounded up, at least one, at most what one
/// acquire can take.
fn answering_units(bytes: u64) -> usize {
    bytes.div_ceil(ANSWERING_UNIT).clamp(1, u64::from(u32::MAX)) as usize
}

/// Who is at the other end of `stream`: its address, and its verified certificate if it
/// presented one (mutual TLS).
fn caller_of(stream: &Stream, address: Address) -> Caller {
    let certificate = stream
        .peer_certificates()
        .and_then(|chain| chain.into_iter().next())
        .map(crate::engine::tls::describe_certificate);
    Caller {
        address,
        certificate,
    }
}

/// The text of a caught panic.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|text| text.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".to_owned())
}

/// The payload of a framed error reply: `{"error": kind, "message": text}`.
pub fn error_reply(kind: &str, message: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "error": kind, "message": message }))
        .expect("a map of two strings always serialises")
}

/// Accepts connections until `stop` is cancelled, at most `max_connections` at a time; each is
/// served in its own task, which `abort` ends outright once the shutdown grace is over.
async fn accept_loop(
    service: Arc<Service>,
    listener: Listener,
    max_connections: usize,
    stop: CancellationToken,
    abort: CancellationToken,
    tracker: TaskTracker,
) {
    let slots = Arc::new(Semaphore::new(max_connections));
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let accepted = match accepted {
            Ok(accepted) => {
                // Full: the connection idle longest makes room. With none idle, the first to
                // become idle does (or any that ends).
                let slot = loop {
                    if let Ok(slot) = slots.clone().try_acquire_owned() {
                        break slot;
                    }
                    service.idle.room_wanted.store(true, Ordering::SeqCst);
                    let idle = service.idle.became_idle.notified();
                    if service.idle.evict_oldest() {
                        let slot = slots.clone().acquire_owned();
                        tokio::select! {
                            biased;
                            _ = stop.cancelled() => return,
                            slot = slot => break slot.expect("the semaphore is never closed"),
                        }
                    }
                    tokio::select! {
                        biased;
                        _ = stop.cancelled() => return,
                        slot = slots.clone().acquire_owned() => break slot.expect("the semaphore is never closed"),
                        _ = idle => {}
                    }
                };
                service.idle.room_wanted.store(false, Ordering::SeqCst);
                Ok((accepted, slot))
            }
            Err(err) => Err(err),
        };
        match accepted {
            Ok(((stream, peer), slot)) => {
                let service = service.clone();
                let stop = stop.clone();
                let abort = abort.clone();
                tracker.spawn(async move {
                    let serve = AssertUnwindSafe(async {
                        if let Some(stream) = service.secured(stream, &peer).await {
                            let caller = Arc::new(caller_of(&stream, peer.clone()));
                            service.serve_connection(stream, caller, stop, Some(slot)).await;
                        }
                    });
                    tokio::select! {
                        _ = abort.cancelled() => {}
                        served = serve.catch_unwind() => if let Err(panic) = served {
                            bump(&service.stats.errors.internal, 1);
                            service.log.log(
                                Level::Error,
                                format!("connection from {peer} ended by an internal error: {}", panic_message(&*panic)),
                                None,
                            );
                        }
                    }
                });
            }
            Err(err) => {
                // E.g. out of file descriptors: wait a little rather than spin on the error.
                bump(&service.stats.errors.io, 1);
                service
                    .log
                    .log(Level::Warning, format!("accept failed: {err}"), None);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// What one exchange of [`Server::serve_one`] was.
pub struct Exchange {
    pub peer: Address,
    /// The client's verified certificate (mutual TLS).
    pub certificate: Option<crate::engine::handler::PeerCertificate>,
    pub local: Address,
    pub request: Bytes,
    pub reply: Bytes,
}

/// Why [`Server::serve_one`] has no exchange to show.
#[derive(Debug)]
pub enum OneShotError {
    /// The network or the peer failed.
    Net(Error),
    /// The request arrived but got no reply.
    Failed(Failure),
}

impl From<Error> for OneShotError {
    fn from(err: Error) -> Self {
        OneShotError::Net(err)
    }
}

/// Where a server is in its life.
enum Lifecycle {
    /// Bound and listening (the OS queues connections), not yet accepting.
    Bound(Listener),
    /// The accept loop runs.
    Serving { accept: JoinHandle<()> },
    /// Shut down, or its one exchange taken; cannot start again.
    Stopped,
}

/// Why a server cannot start (or serve its one exchange).
#[derive(Debug, PartialEq, Eq)]
pub enum CannotStart {
    /// It was shut down, or its one exchange was taken.
    Stopped,
    /// It was made before a fork (see [`Server::is_inherited`]).
    Inherited,
}

/// A server from bind to shutdown: many connections at once, each in its own task.
pub struct Server {
    service: Arc<Service>,
    address: Address,
    /// The engine generation it was bound in (see `runtime::forget_after_fork`).
    generation: u64,
    max_connections: usize,
    lifecycle: Mutex<Lifecycle>,
    /// Stops accepting and ends connections waiting between requests.
    stop: CancellationToken,
    /// Ends every connection outright, once the shutdown grace is over.
    abort: CancellationToken,
    /// Set once shutdown has finished.
    finished: CancellationToken,
    connections: TaskTracker,
    /// Why the server stopped on its own, if it did (a caught panic in its accept loop).
    failure: Arc<Mutex<Option<String>>>,
}

impl Server {
    /// Binds now, like socketserver: the address is known and "address in use" told here.
    pub async fn bind(
        endpoint: &Endpoint,
        backlog: u32,
        service: Service,
        max_connections: usize,
    ) -> Result<Server> {
        let listener = Listener::bind(endpoint, backlog).await?;
        let address = listener.local_address()?;
        Ok(Server {
            service: Arc::new(service),
            address,
            generation: runtime::generation(),
            max_connections,
            lifecycle: Mutex::new(Lifecycle::Bound(listener)),
            stop: CancellationToken::new(),
            abort: CancellationToken::new(),
            finished: CancellationToken::new(),
            connections: TaskTracker::new(),
            failure: Arc::default(),
        })
    }

    /// Whether this server came from the parent of this forked process. Its socket, tasks and
    /// locks belong to the parent's runtime, whose threads do not exist here: touching them
    /// (even dropping the socket, which would unregister it from the epoll instance the parent
    /// shares) could hang the child or break the parent, so such a server is left alone.
    pub fn is_inherited(&self) -> bool {
        self.generation != runtime::generation()
    }

    /// The bound address (with the real port when 0 was asked for).
    pub fn address(&self) -> &Address {
        &self.address
    }

    /// What the connections are served with (for its counters).
    pub fn service(&self) -> &Arc<Service> {
        &self.service
    }

    fn lifecycle(&self) -> std::sync::MutexGuard<'_, Lifecycle> {
        locked(&self.lifecycle)
    }

    /// Starts the accept loop on the shared runtime; starting again does nothing.
    pub fn start(&self) -> std::result::Result<(), CannotStart> {
        if self.is_inherited() {
            return Err(CannotStart::Inherited);
        }
        let mut lifecycle = self.lifecycle();
        match std::mem::replace(&mut *lifecycle, Lifecycle::Stopped) {
            Lifecycle::Bound(listener) => {
                let accept = AssertUnwindSafe(accept_loop(
                    self.service.clone(),
                    listener,
                    self.max_connections,
                    self.stop.clone(),
                    self.abort.clone(),
                    self.connections.clone(),
                ));
                let service = self.service.clone();
                let failure = self.failure.clone();
                let wind_down = self.wind_down(Some(Duration::from_secs(5)));
                let accept = runtime::handle().spawn(async move {
                    if let Err(panic) = accept.catch_unwind().await {
                        // No silent dead server: it shuts down, and callers learn why.
                        let message = format!("internal error: {}", panic_message(&*panic));
                        bump(&service.stats.errors.internal, 1);
                        service.log.log(
                            Level::Error,
                            format!("the server stopped accepting ({message}); shutting down"),
                            None,
                        );
                        *locked(&failure) = Some(message);
                        wind_down.await;
                    }
                });
                *lifecycle = Lifecycle::Serving { accept };
                Ok(())
            }
            serving @ Lifecycle::Serving { .. } => {
                *lifecycle = serving;
                Ok(())
            }
            Lifecycle::Stopped => Err(CannotStart::Stopped),
        }
    }

    /// Why the server stopped on its own, if it did.
    pub fn failure(&self) -> Option<String> {
        locked(&self.failure).clone()
    }

    /// Stops accepting and ends connections waiting between requests (without touching the
    /// accept task); the future drains the connections within `grace` and marks the server
    /// finished.
    fn wind_down(
        &self,
        grace: Option<Duration>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let (stop, connections, abort, finished) = (
            self.stop.clone(),
            self.connections.clone(),
            self.abort.clone(),
            self.finished.clone(),
        );
        async move {
            stop.cancel();
            connections.close();
            let drained = match grace {
                Some(grace) => tokio::time::timeout(grace, connections.wait())
                    .await
                    .is_ok(),
                None => {
                    connections.wait().await;
                    true
                }
            };
            if !drained {
                abort.cancel();
                connections.wait().await;
            }
            finished.cancel();
        }
    }

    /// Waits until shutdown has finished.
    pub fn finished(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.finished.clone().cancelled_owned()
    }

    /// Whether shutdown has finished (an inherited server counts as finished).
    pub fn is_finished(&self) -> bool {
        self.is_inherited() || self.finished.is_cancelled()
    }

    /// Serves exactly one connection and one request on the bound socket, like the seed:
    /// later connection attempts are refused, not queued. Whatever goes wrong is returned
    /// rather than logged: the caller asked for exactly this exchange.
    pub fn serve_one(
        &self,
    ) -> std::result::Result<
        impl std::future::Future<Output = std::result::Result<Exchange, OneShotError>> + Send + 'static,
        CannotStart,
    > {
        if self.is_inherited() {
            return Err(CannotStart::Inherited);
        }
        let Lifecycle::Bound(listener) =
            std::mem::replace(&mut *self.lifecycle(), Lifecycle::Stopped)
        else {
            return Err(CannotStart::Stopped);
        };
        let service = self.service.clone();
        let local = self.address.clone();
        let stop = self.stop.clone();
        let finished = self.finished.clone();
        Ok(async move {
            let exchange = async {
                let (mut stream, peer) =
                    tokio::select! {
                        biased;
                        _ = stop.cancelled() => return Err(OneShotError::Net(Error::Os {
                            err: std::io::Error::new(std::io::ErrorKind::Interrupted, "the server was shut down"),
                            doing: format!("accept on {local}"),
                        })),
                        accepted = listener.accept() => accepted.map_err(|err| Error::Os {
                            err,
                            doing: format!("accept on {local}"),
                        })?,
                    };
                drop(listener);
                bump(&service.stats.accepted, 1);
                let _active = ActiveConnection::count(&service.stats.active);
                if service.tls.is_some() {
                    stream = match service.secured(stream, &peer).await {
                        Some(secured) => secured,
                        None => {
                            return Err(OneShotError::Net(Error::Tls(format!(
                                "TLS handshake with {peer} failed (see the framesock log)"
                            ))))
                        }
                    };
                }
                let caller = Arc::new(caller_of(&stream, peer.clone()));
                match service.answer_classic(&mut stream, &caller, &stop).await? {
                    Classic::Stopped => Err(OneShotError::Net(Error::Wire(
                        WireError::ClosedBeforeMessage,
                    ))),
                    Classic::Answered { request, reply } => Ok(Exchange {
                        peer,
                        certificate: caller.certificate.clone(),
                        local,
                        request,
                        reply: reply.map_err(OneShotError::Failed)?,
                    }),
                }
            }
            .await;
            finished.cancel();
            exchange
        })
    }

    /// Stops accepting and ends connections waiting between requests now; the returned future
    /// lets exchanges in progress finish for up to `grace` (forever with `None`), drops the
    /// rest, and marks the server finished. Calling it again is harmless.
    pub fn begin_shutdown(
        &self,
        grace: Option<Duration>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let inherited = self.is_inherited();
        let mut state = None;
        if !inherited {
            self.stop.cancel();
            let previous = std::mem::replace(&mut *self.lifecycle(), Lifecycle::Stopped);
            let accept = match previous {
                Lifecycle::Serving { accept, .. } => Some(accept),
                // Never started (the listener is dropped here) or already stopped.
                _ => None,
            };
            state = Some((accept, self.wind_down(grace)));
        }
        async move {
            // Inherited through fork: nothing of it runs here, and nothing of it is touched.
            let Some((accept, wind_down)) = state else {
                return;
            };
            if let Some(accept) = accept {
                let _ = accept.await;
            }
            wind_down.await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.is_inherited() {
            return; // see `is_inherited`; the owner should not drop it at all
        }
        // A server dropped without shutdown must not leave connections served forever.
        self.stop.cancel();
        self.abort.cancel();
    }
}

#[cfg(test)]
mod tests {
    //! The serving loops over in-memory streams (`tokio::io::duplex`), with handlers written
    //! here; time is paused, so deadlines pass at once and exactly.

    use super::*;
    use crate::engine::handler::{Handler, NoLog, PendingReply};
    use std::net::SocketAddr;
    use tokio::io::{duplex, DuplexStream};
    use tokio::sync::Notify;

    /// Echoes the request as a JSON string; "fail" fails; "wait" waits for `go`.
    struct TestHandler {
        go: Arc<Notify>,
    }

    impl Handler for TestHandler {
        fn respond(&self, request: Bytes, _caller: &Arc<Caller>) -> PendingReply {
            let go = self.go.clone();
            Box::pin(async move {
                match &request[..] {
                    b"fail" => Err(Failure::new(FailureKind::Handler, "ValueError: no")),
                    b"panic" => panic!("a bug in a handler"),
                    b"wait" => {
                        go.notified().await;
                        Ok(Bytes::from_static(b"\"waited\""))
                    }
                    other => Ok(Bytes::from(format!(
                        "\"{}\"",
                        String::from_utf8_lossy(other)
                    ))),
                }
            })
        }
    }

    fn service(protocol: Protocol, limits: Limits) -> (Arc<Service>, Arc<Notify>) {
        let go = Arc::new(Notify::new());
        let handler = TestHandler { go: go.clone() };
        let service = Service::new(
            protocol,
            limits,
            Responder::Handler(Arc::new(handler)),
            Arc::new(NoLog),
        );
        (Arc::new(service), go)
    }

    fn limits() -> Limits {
        Limits {
            timeout: Some(Duration::from_secs(1)),
            idle_timeout: None,
            max_frame: 1024,
            max_buffered: DEFAULT_MAX_BUFFERED,
            max_connections_per_address: None,
            max_unsent: DEFAULT_MAX_UNSENT,
        }
    }

    fn peer() -> Address {
        Address::Inet(SocketAddr::from(([127, 0, 0, 1], 1)))
    }

    /// Serves one in-memory connection in a task; returns the client's end and the task.
    fn connect(
        service: &Arc<Service>,
        stop: &CancellationToken,
    ) -> (DuplexStream, tokio::task::JoinHandle<()>) {
        let (client, server) = duplex(64 * 1024);
        let service = service.clone();
        let stop = stop.clone();
        let task = tokio::spawn(async move {
            let caller = Arc::new(Caller {
                address: peer(),
                certificate: None,
            });
            service.serve_connection(server, caller, stop, None).await
        });
        (client, task)
    }

    fn frames(payloads: &[&[u8]]) -> Vec<u8> {
        payloads
            .iter()
            .flat_map(|p| codec::encode_frame(p).unwrap().to_vec())
            .collect()
    }

    async fn read_reply<S: AsyncRead + Unpin>(
        client: &mut S,
        input: &mut BytesMut,
    ) -> codec::Frame {
        codec::read_frame(client, input, &mut FrameCodec::replies(1 << 20))
            .await
            .unwrap()
            .expect("a reply")
    }

    #[tokio::test(start_paused = true)]
    async fn classic_replies_raw_json_then_closes() {
        let (service, _) = service(Protocol::Classic, limits());
        let (mut client, task) = connect(&service, &CancellationToken::new());
        client.write_all(&frames(&[b"hi"])).await.unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"\"hi\"");
        task.await.unwrap();
        assert_eq!(service.stats.requests(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn classic_failure_closes_without_a_reply() {
        let (service, _) = service(Protocol::Classic, limits());
        let (mut client, task) = connect(&service, &CancellationToken::new());
        client.write_all(&frames(&[b"fail"])).await.unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();
        assert!(reply.is_empty());
        task.await.unwrap();
        assert_eq!(service.stats.errors.handler.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn framed_answers_a_pipelined_batch_in_order_with_error_replies() {
        let (service, _) = service(Protocol::Framed, limits());
        let (mut client, _task) = connect(&service, &CancellationToken::new());
        client
            .write_all(&frames(&[b"one", b"fail", b"three"]))
            .await
            .unwrap();
        let mut input = BytesMut::new();
        let first = read_reply(&mut client, &mut input).await;
        let failed = read_reply(&mut client, &mut input).await;
        let third = read_reply(&mut client, &mut input).await;
        assert_eq!(
            (&first.payload[..], first.is_error),
            (&b"\"one\""[..], false)
        );
        assert!(failed.is_error);
        let error: serde_json::Value = serde_json::from_slice(&failed.payload).unwrap();
        assert_eq!(error["error"], "handler");
        assert_eq!(error["message"], "ValueError: no");
        assert_eq!(&third.payload[..], b"\"three\"");
        assert_eq!(service.stats.requests(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn more_than_a_batch_of_buffered_requests_all_get_replies() {
        let (service, _) = service(Protocol::Framed, limits());
        let (client, _task) = connect(&service, &CancellationToken::new());
        let (mut read, mut write) = tokio::io::split(client);
        let count = MAX_BATCH * 2 + 3;
        let payloads: Vec<Vec<u8>> = (0..count).map(|i| i.to_string().into_bytes()).collect();
        let refs: Vec<&[u8]> = payloads.iter().map(|p| &p[..]).collect();
        let all = frames(&refs);
        let writer = tokio::spawn(async move { write.write_all(&all).await.unwrap() });
        let mut input = BytesMut::new();
        let mut codec = FrameCodec::replies(1024);
        for i in 0..count {
            let reply = codec::read_frame(&mut read, &mut input, &mut codec)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(reply.payload, format!("\"{i}\""));
        }
        writer.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn an_oversized_header_gets_an_error_reply_and_the_connection_closes() {
        let (service, _) = service(Protocol::Framed, limits());
        let (mut client, task) = connect(&service, &CancellationToken::new());
        client.write_all(&2000u32.to_be_bytes()).await.unwrap();
        let mut input = BytesMut::new();
        let reply = read_reply(&mut client, &mut input).await;
        assert!(reply.is_error);
        let error: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
        assert_eq!(error["error"], "frame_too_large");
        task.await.unwrap();
        assert_eq!(
            service.stats.errors.frame_too_large.load(Ordering::Relaxed),
            1
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_stalls_mid_frame_is_dropped_at_its_deadline() {
        let (service, _) = service(Protocol::Framed, limits());
        let (mut client, task) = connect(&service, &CancellationToken::new());
        let whole = frames(&[b"slow"]);
        client.write_all(&whole[..5]).await.unwrap();
        // Paused time runs ahead to the one-second deadline as soon as everything waits.
        task.await.unwrap();
        assert_eq!(service.stats.errors.timeout.load(Ordering::Relaxed), 1);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_closed_after_idle_timeout() {
        let limits = Limits {
            idle_timeout: Some(Duration::from_secs(5)),
            ..limits()
        };
        let (service, _) = service(Protocol::Framed, limits);
        let (mut client, task) = connect(&service, &CancellationToken::new());
        client.write_all(&frames(&[b"once"])).await.unwrap();
        let mut input = BytesMut::new();
        read_reply(&mut client, &mut input).await;
        task.await.unwrap();
        assert_eq!(service.stats.idle_closed.load(Ordering::Relaxed), 1);
        assert_eq!(service.stats.active(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_idle_limit_counts_from_the_last_request_not_from_the_first() {
        let limits = Limits {
            idle_timeout: Some(Duration::from_secs(5)),
            ..limits()
        };
        let (service, _) = service(Protocol::Framed, limits);
        let (mut client, task) = connect(&service, &CancellationToken::new());
        let mut input = BytesMut::new();
        let began = Instant::now();
        // Twelve seconds of requests 3 s apart: never 5 s idle, so never closed.
        for n in 0..5 {
            if n > 0 {
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
            client.write_all(&frames(&[b"again"])).await.unwrap();
            assert_eq!(
                &read_reply(&mut client, &mut input).await.payload[..],
                b"\"again\""
            );
        }
        assert_eq!(service.stats.idle_closed.load(Ordering::Relaxed), 0);
        let last = Instant::now();
        assert_eq!(last - began, Duration::from_secs(12));
        // Closed exactly one idle limit after the last request, saying so first.
        assert!(read_reply(&mut client, &mut input).await.is_closing());
        assert_eq!(Instant::now() - last, Duration::from_secs(5));
        drop(client);
        task.await.unwrap();
        assert_eq!(service.stats.idle_closed.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_meets_the_goodbye_is_not_handled_and_the_client_is_told() {
        let (service, _) = service(Protocol::Framed, limits());
        let stop = CancellationToken::new();
        let (mut client, task) = connect(&service, &stop);
        client.write_all(&frames(&[b"first"])).await.unwrap();
        let mut input = BytesMut::new();
        assert_eq!(
            &read_reply(&mut client, &mut input).await.payload[..],
            b"\"first\""
        );
        stop.cancel();
        let goodbye = read_reply(&mut client, &mut input).await;
        assert!(goodbye.is_closing(), "{goodbye:?}");
        // Sent after the goodbye: read and dropped, never answered, and no reset.
        client.write_all(&frames(&[b"late"])).await.unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        task.await.unwrap();
        assert_eq!(service.stats.requests(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn stop_ends_a_connection_waiting_between_requests_but_not_an_exchange() {
        let (service, go) = service(Protocol::Framed, limits());
        let stop = CancellationToken::new();
        let (mut client, task) = connect(&service, &stop);
        client.write_all(&frames(&[b"wait"])).await.unwrap();
        tokio::task::yield_now().await;
        stop.cancel();
        go.notify_one();
        let mut input = BytesMut::new();
        // The exchange in progress still gets its reply; then the connection ends.
        assert_eq!(
            &read_reply(&mut client, &mut input).await.payload[..],
            b"\"waited\""
        );
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_fixed_reply_needs_no_handler() {
        let service = Arc::new(Service::new(
            Protocol::Classic,
            limits(),
            Responder::Fixed(Bytes::from_static(SEED_REPLY)),
            Arc::new(NoLog),
        ));
        let (mut client, _task) = connect(&service, &CancellationToken::new());
        client
            .write_all(&frames(&[b"msg from client"]))
            .await
            .unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, SEED_REPLY);
    }

    /// A framed test server on a real loopback socket, started on the shared runtime, and a
    /// runtime for the test's clients.
    fn real_server() -> (tokio::runtime::Runtime, Server, SocketAddr, Arc<Notify>) {
        let (service, go) = service(Protocol::Framed, limits());
        let service = Arc::try_unwrap(service).ok().expect("only owner");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let endpoint = Endpoint::Tcp {
            host: "127.0.0.1".into(),
            port: 0,
        };
        let server = rt
            .block_on(Server::bind(&endpoint, 16, service, 8))
            .unwrap();
        let Address::Inet(addr) = server.address().clone() else {
            panic!("a TCP address")
        };
        server.start().unwrap();
        (rt, server, addr, go)
    }

    #[test]
    fn a_panic_while_serving_ends_that_connection_only() {
        let (rt, server, addr, _go) = real_server();
        rt.block_on(async {
            let mut doomed = tokio::net::TcpStream::connect(addr).await.unwrap();
            doomed.write_all(&frames(&[b"panic"])).await.unwrap();
            let mut nothing = Vec::new();
            let _ = doomed.read_to_end(&mut nothing).await;
            assert!(nothing.is_empty());
            let mut fine = tokio::net::TcpStream::connect(addr).await.unwrap();
            fine.write_all(&frames(&[b"ok"])).await.unwrap();
            let mut input = BytesMut::new();
            assert_eq!(
                &read_reply(&mut fine, &mut input).await.payload[..],
                b"\"ok\""
            );
            // The doomed connection closed as the panic unwound; it is counted just after, on
            // the server's thread.
            let internal = &server.service().stats.errors.internal;
            tokio::time::timeout(Duration::from_secs(10), async {
                while internal.load(Ordering::Relaxed) == 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
            .await
            .expect("the panic is counted");
        });
        let stats = &server.service().stats;
        assert_eq!(stats.errors.internal.load(Ordering::Relaxed), 1);
        assert!(server.failure().is_none());
        rt.block_on(server.begin_shutdown(Some(Duration::from_secs(1))));
    }

    #[test]
    fn shutdown_drops_an_exchange_stuck_past_its_grace() {
        let (rt, server, addr, _go) = real_server();
        rt.block_on(async {
            let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
            client.write_all(&frames(&[b"wait"])).await.unwrap();
            while server.service().stats.requests() == 0 {
                tokio::task::yield_now().await;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            // The handler never finishes; shutdown with a short grace still does.
            server.begin_shutdown(Some(Duration::from_millis(20))).await;
            assert!(server.is_finished());
            let mut rest = Vec::new();
            client.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
            assert_eq!(server.service().stats.active(), 0);
        });
        assert_eq!(server.start(), Err(CannotStart::Stopped));
    }

    mod fuzz {
        //! Random requests, cut into random pieces, and random bytes: the serving loop never
        //! panics or hangs, and answers every request with its own reply, in order.

        use super::*;
        use proptest::prelude::*;

        fn paused_runtime() -> tokio::runtime::Runtime {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .start_paused(true)
                .build()
                .unwrap()
        }

        /// Writes `bytes` in pieces cut at `cuts` (offsets, any order), yielding between them.
        async fn write_in_pieces(client: &mut DuplexStream, bytes: &[u8], cuts: &[usize]) {
            let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
            cuts.push(bytes.len());
            cuts.sort_unstable();
            let mut at = 0;
            for cut in cuts {
                if client.write_all(&bytes[at..cut]).await.is_err() {
                    return; // the server closed (e.g. after refusing a header)
                }
                at = cut;
                tokio::task::yield_now().await;
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

            #[test]
            fn every_request_gets_its_own_reply_in_order(
                payloads in proptest::collection::vec(
                    prop_oneof![
                        Just(b"fail".to_vec()),
                        proptest::collection::vec(b'a'..=b'z', 0..300),
                    ],
                    1..40,
                ),
                cuts in proptest::collection::vec(any::<usize>(), 0..20),
                max_unsent in 1usize..4096,
            ) {
                let limits = Limits { max_unsent, max_frame: 1024, ..limits() };
                paused_runtime().block_on(async {
                    let (service, _go) = service(Protocol::Framed, limits);
                    let (mut client, task) = connect(&service, &CancellationToken::new());
                    let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
                    let bytes = frames(&refs);
                    let (mut read, mut write) = tokio::io::split(&mut client);
                    let writing = async {
                        let mut pieces = Vec::new();
                        let mut at = 0;
                        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
                        cuts.push(bytes.len());
                        cuts.sort_unstable();
                        for cut in cuts {
                            pieces.push(bytes[at..cut].to_vec());
                            at = cut;
                        }
                        for piece in pieces {
                            write.write_all(&piece).await.unwrap();
                            tokio::task::yield_now().await;
                        }
                        write.shutdown().await.unwrap();
                    };
                    let reading = async {
                        let mut input = BytesMut::new();
                        let mut codec = FrameCodec::replies(1 << 20);
                        let mut replies = Vec::new();
                        for _ in 0..payloads.len() {
                            let reply = codec::read_frame(&mut read, &mut input, &mut codec)
                                .await
                                .unwrap()
                                .expect("a reply for every request");
                            replies.push(reply);
                        }
                        replies
                    };
                    let ((), replies) = tokio::join!(writing, reading);
                    for (payload, reply) in payloads.iter().zip(&replies) {
                        if payload == b"fail" {
                            assert!(reply.is_error);
                        } else {
                            assert!(!reply.is_error);
                            let expected = format!("\"{}\"", String::from_utf8_lossy(payload));
                            assert_eq!(&reply.payload[..], expected.as_bytes());
                        }
                    }
                    task.await.unwrap();
                });
            }

            #[test]
            fn random_bytes_never_panic_or_hang(
                bytes in proptest::collection::vec(any::<u8>(), 0..2000),
                cuts in proptest::collection::vec(any::<usize>(), 0..10),
                classic in any::<bool>(),
            ) {
                let protocol = if classic { Protocol::Classic } else { Protocol::Framed };
                paused_runtime().block_on(async {
                    let (service, _go) = service(protocol, limits());
                    let (mut client, task) = connect(&service, &CancellationToken::new());
                    write_in_pieces(&mut client, &bytes, &cuts).await;
                    let _ = client.shutdown().await;
                    let mut rest = Vec::new();
                    let _ = client.read_to_end(&mut rest).await;
                    // Ends: by the peer's close, an error, or the request deadline (paused time
                    // runs ahead to it), never by hanging.
                    task.await.unwrap();
                });
            }

            #[test]
            fn the_codec_reads_frames_however_they_are_cut(
                payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..100), 0..20),
                cuts in proptest::collection::vec(any::<usize>(), 0..20),
            ) {
                let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
                let bytes = frames(&refs);
                let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
                cuts.push(bytes.len());
                cuts.sort_unstable();
                let mut codec = FrameCodec::new(1024);
                let mut input = BytesMut::new();
                let mut decoded = Vec::new();
                let mut at = 0;
                for cut in cuts {
                    input.extend_from_slice(&bytes[at..cut]);
                    at = cut;
                    while let Some(frame) = codec.decode(&mut input).unwrap() {
                        decoded.push(frame.payload.to_vec());
                    }
                }
                prop_assert_eq!(decoded, payloads);
            }
        }
    }
}
