//! Client exchanges: the seed's one-shot exchange, a kept connection for a blocking client, and
//! a pipelined connection shared by many concurrent requests.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Handle;
use tokio::time::Instant;
use tokio_util::codec::Decoder;

use crate::engine::codec::{self, Frame, FrameCodec, WireError};
use crate::engine::error::{Error, Result};
use crate::engine::lock::locked;
use crate::engine::net::{self, Endpoint, ReadPart, Stream, WritePart};
use crate::engine::runtime::within;
use crate::engine::tls::ClientTls;

/// One classic exchange: connect, send the whole frame in one write, read the reply to the close.
pub async fn classic_exchange(
    endpoint: &Endpoint,
    tls: Option<&ClientTls>,
    frame: &[u8],
    timeout: Option<Duration>,
    max_reply: usize,
) -> Result<Vec<u8>> {
    let mut stream = open(endpoint, tls, timeout).await?;
    within(
        timeout,
        || format!("sending the request to {endpoint}"),
        async {
            stream
                .write_all(frame)
                .await
                .map_err(|e| WireError::Io(e).into())
        },
    )
    .await?;
    within(
        timeout,
        || format!("waiting for the reply from {endpoint}"),
        read_classic_reply(&mut stream, max_reply),
    )
    .await
}

/// Reads a classic reply to the server's close; a reply that is one whole frame (from a
/// framed server, which keeps the connection open) is named at once instead of waited on.
async fn read_classic_reply(stream: &mut Stream, max_reply: usize) -> Result<Vec<u8>> {
    let reply = codec::read_until_close(stream, max_reply, looks_framed).await?;
    if looks_like_tls(&reply) {
        return Err(tls_reply_error());
    }
    if looks_framed(&reply) {
        return Err(Error::Protocol(
            "the reply is a framed reply, not classic JSON: is the server framed? \
             (use protocol=\"framed\")"
                .to_owned(),
        ));
    }
    Ok(reply)
}

/// Whether `bytes` are exactly one framed reply: JSON text never starts with the byte 0x00 or
/// 0x80 that a frame header of a reply under 16 MiB starts with.
fn looks_framed(bytes: &[u8]) -> bool {
    if !matches!(bytes.first(), Some(0x00 | 0x80)) {
        return false;
    }
    matches!(codec::declared_reply(bytes), Some((declared, _)) if bytes.len() == codec::HEADER_LEN + declared)
}

/// Whether the start of a framed reply's "header" is really JSON text: a classic server's
/// reply read as a frame header (`{"ke` declares two billion bytes).
fn looks_like_json(bytes: &[u8]) -> bool {
    bytes.len() >= codec::HEADER_LEN
        && bytes[..codec::HEADER_LEN]
            .iter()
            .all(|b| b.is_ascii_graphic() || b.is_ascii_whitespace())
        && matches!(
            bytes[0],
            b'{' | b'[' | b'"' | b'-' | b'0'
                ..=b'9' | b't' | b'f' | b'n' | b' ' | b'\t' | b'\r' | b'\n'
        )
}

/// Whether a "header" is really a TLS record (handshake or alert): a TLS server answering a
/// plain client.
fn looks_like_tls(bytes: &[u8]) -> bool {
    bytes.len() >= 3 && matches!(bytes[0], 0x15 | 0x16) && bytes[1] == 0x03 && bytes[2] <= 0x04
}

fn tls_reply_error() -> Error {
    Error::Protocol(
        "the reply looks like TLS: does the server use TLS? (pass tls=framesock.ClientTLS(...))"
            .to_owned(),
    )
}

/// The error for a framed reply that is really a classic one.
fn classic_reply_error() -> Error {
    Error::Protocol(
        "the reply looks like classic JSON, not a frame: is the server framed? \
         (use protocol=\"classic\")"
            .to_owned(),
    )
}

/// Requests from 256 KiB on are written while the reply is watched for: a server that refuses
/// one (too large) says so at once, and the client stops sending.
const WATCHED_WRITE: usize = 256 * 1024;

/// A connection to `endpoint`, under TLS when `tls` is given, within `timeout`; failing, an
/// [`Error::Connect`] (the request was never sent).
async fn open(
    endpoint: &Endpoint,
    tls: Option<&ClientTls>,
    timeout: Option<Duration>,
) -> Result<Stream> {
    within(timeout, || format!("connecting to {endpoint}"), async {
        match tls {
            Some(tls) => net::connect_tls(endpoint, tls).await,
            None => net::connect(endpoint).await,
        }
    })
    .await
    .map_err(|err| Error::Connect(Box::new(err)))
}

/// A kept connection of the framed protocol, with the bytes read past the last reply.
pub struct Connection {
    stream: Stream,
    input: BytesMut,
}

impl Connection {
    /// Ends the connection; a TLS session with `close_notify`, if the socket takes it now (the
    /// caller's runtime `rt` drives the write; nothing waits).
    pub fn end(mut self, rt: &tokio::runtime::Runtime) {
        if matches!(self.stream, Stream::TlsClient(_)) {
            use futures_util::FutureExt;
            rt.block_on(async { self.stream.shutdown().now_or_never() });
        }
    }
}

/// How many times a request the server did not handle (it closed the connection first, saying
/// so) is sent again, each time on a new connection, before the caller is told.
pub const MAX_RESENDS: usize = 3;

/// The most a client's close spends on ending a TLS session with `close_notify`.
const CLOSE_NOTIFY_LIMIT: Duration = Duration::from_millis(100);

/// Sends `count` request frames (already encoded back to back in `frames`) on the kept
/// connection, connecting first if needed, and reads `count` replies in order.
///
/// Writing and reading run together, so a batch far larger than the socket buffers cannot
/// deadlock with both sides blocked on full buffers. `timeout` bounds connecting and the wait
/// for each reply. Requests the server closed the connection before handling (its goodbye,
/// see [`codec::ErrorKind::Closing`]) are sent again on a new connection, up to [`MAX_RESENDS`] times.
pub async fn framed_exchange(
    slot: &mut Option<Connection>,
    endpoint: &Endpoint,
    tls: Option<&ClientTls>,
    frames: &[u8],
    count: usize,
    timeout: Option<Duration>,
    max_reply: usize,
) -> Result<Vec<Frame>> {
    let mut replies = Vec::new();
    let mut rest = frames;
    for _ in 0..=MAX_RESENDS {
        let wanted = count - replies.len();
        let mut got =
            match framed_attempt(slot, endpoint, tls, rest, wanted, timeout, max_reply).await {
                Ok(got) => got,
                // Some of the batch was answered: the batch as a whole was sent, whatever the
                // rest met (a failover must not send the answered requests again as unsent).
                Err(Error::Connect(err)) if !replies.is_empty() => return Err(*err),
                Err(err) => return Err(err),
            };
        if !got.last().is_some_and(Frame::is_closing) {
            replies.extend(got);
            return Ok(replies);
        }
        got.pop();
        *slot = None;
        rest = &rest[codec::frames_len(rest, got.len())..];
        replies.extend(got);
    }
    Err(not_handled(endpoint))
}

/// Why a request was given up on after the server closed its connection every time.
fn not_handled(endpoint: &Endpoint) -> Error {
    Error::Wire(WireError::Io(std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        format!(
            "{endpoint} closed the connection before handling the request, {} times; it was \
             not handled",
            MAX_RESENDS + 1
        ),
    )))
}

/// One try of [`framed_exchange`]: the replies, ending early with the server's goodbye if it
/// closes the connection before answering them all.
#[allow(clippy::too_many_arguments)]
async fn framed_attempt(
    slot: &mut Option<Connection>,
    endpoint: &Endpoint,
    tls: Option<&ClientTls>,
    frames: &[u8],
    count: usize,
    timeout: Option<Duration>,
    max_reply: usize,
) -> Result<Vec<Frame>> {
    check_kept(slot)?;
    if slot.is_none() {
        let stream = open(endpoint, tls, timeout).await?;
        *slot = Some(Connection {
            stream,
            input: BytesMut::new(),
        });
    }
    let conn = slot.as_mut().expect("connected above");
    let write_failed = |e| Error::from(WireError::Io(e));
    if count == 1 && frames.len() < WATCHED_WRITE {
        // One small frame: the server replies only once it has read all of it, so writing
        // first and then reading cannot deadlock, and needs no split of the stream.
        conn.stream.write_all(frames).await.map_err(write_failed)?;
        let replies = read_replies(
            &mut conn.stream,
            &mut conn.input,
            1,
            endpoint,
            timeout,
            max_reply,
        )
        .await?;
        return settle(slot, replies).await;
    }
    // Written and read together, so a batch far larger than the socket buffers cannot
    // deadlock, and a reply that comes before all is sent (a refused request) is seen at once.
    let (replies, finished_writing) = {
        let (mut reader, mut writer) = tokio::io::split(&mut conn.stream);
        let write = async { writer.write_all(frames).await.map_err(write_failed) };
        let read = read_replies(
            &mut reader,
            &mut conn.input,
            count,
            endpoint,
            timeout,
            max_reply,
        );
        tokio::pin!(write, read);
        let mut written = false;
        loop {
            tokio::select! {
                biased;
                replies = &mut read => break (replies, written),
                wrote = &mut write, if !written => match wrote {
                    Ok(()) => written = true,
                    // The server may have said why before closing: read that first.
                    Err(err) => {
                        let said = tokio::time::timeout(Duration::from_secs(1), &mut read).await;
                        break (said.unwrap_or(Err(err)), false);
                    }
                },
            }
        }
    };
    if !finished_writing {
        // Replies came before all was sent: the rest of the request cannot follow them.
        *slot = None;
        return replies;
    }
    settle(slot, replies?).await
}

/// Whether the server closes the connection after this reply: a refused header
/// (`frame_too_large`) leaves the stream out of sync, so it does.
fn ends_connection(reply: &Frame) -> bool {
    reply.is_error
        && codec::error_kind(&reply.payload).as_deref()
            == Some(codec::ErrorKind::FrameTooLarge.name())
}

/// Checks that nothing came after the replies asked for but the server's goodbye, and lets go
/// of a connection the server closes. A reply no request asked for means the server's replies
/// are out of step with the requests, and every later one would answer the wrong request.
async fn settle(slot: &mut Option<Connection>, replies: Vec<Frame>) -> Result<Vec<Frame>> {
    let conn = slot.as_mut().expect("the exchange's connection");
    if !conn.input.is_empty() {
        // A goodbye is written whole right after the last reply: the rest of it is due now.
        let mut codec = FrameCodec::replies(GOODBYE_LOOK);
        let read = codec::read_frame(&mut conn.stream, &mut conn.input, &mut codec);
        let next = tokio::time::timeout(Duration::from_secs(1), read).await;
        let goodbye = matches!(&next, Ok(Ok(Some(frame))) if frame.is_closing());
        let left = conn.input.len();
        *slot = None;
        return if goodbye && left == 0 {
            Ok(replies)
        } else {
            Err(unsolicited(left.max(1)))
        };
    }
    // The server closes after refusing a request's header, and after its goodbye.
    if replies
        .iter()
        .any(|reply| ends_connection(reply) || reply.is_closing())
    {
        *slot = None;
    }
    Ok(replies)
}

fn unsolicited(bytes: usize) -> Error {
    Error::Protocol(format!(
        "the server sent {bytes} bytes more than the replies asked for; its replies are out of \
         step with the requests, so the connection is dropped"
    ))
}

/// Before a kept connection is used again: a connection the server has closed meanwhile (its
/// idle timeout) is replaced; bytes that arrived unasked mean the replies are out of step.
fn check_kept(slot: &mut Option<Connection>) -> Result<()> {
    let Some(conn) = slot.as_mut() else {
        return Ok(());
    };
    if !conn.input.is_empty() {
        let left = conn.input.len();
        *slot = None;
        return Err(unsolicited(left));
    }
    if conn.stream.closed_by_peer() {
        // closed (or reset) while idle, seen on the socket itself: open a new one
        *slot = None;
        return Ok(());
    }
    // Bytes waiting, or a TLS stream that may hold some already: a TLS close_notify reads as
    // the end (0); the server's goodbye says it closed the connection; anything else came
    // unasked.
    let mut closed = false;
    while conn.input.len() < GOODBYE_LOOK {
        conn.input.reserve(GOODBYE_LOOK);
        match conn.stream.read_buf(&mut conn.input).now_or_never() {
            None => break, // nothing (more) pending: the usual case
            Some(Ok(0)) | Some(Err(_)) => {
                closed = true;
                break;
            }
            Some(Ok(_)) => {}
        }
    }
    if conn.input.is_empty() || is_goodbye(&conn.input) {
        if closed || !conn.input.is_empty() {
            *slot = None; // closed by the server while idle: open a new one
        }
        return Ok(());
    }
    let left = conn.input.len();
    *slot = None;
    Err(unsolicited(left))
}

/// How many unasked bytes a kept connection is checked for: a goodbye is far shorter.
const GOODBYE_LOOK: usize = 4096;

/// Whether `input` holds exactly the server's goodbye (see [`codec::ErrorKind::Closing`]).
fn is_goodbye(input: &BytesMut) -> bool {
    let mut input = input.clone();
    let goodbye = FrameCodec::replies(GOODBYE_LOOK).decode(&mut input);
    input.is_empty()
        && goodbye
            .ok()
            .flatten()
            .is_some_and(|frame| frame.is_closing())
}

/// Reads `count` framed replies; `timeout` bounds the wait for each.
async fn read_replies<R: AsyncRead + Unpin>(
    reader: &mut R,
    input: &mut BytesMut,
    count: usize,
    endpoint: &Endpoint,
    timeout: Option<Duration>,
    max_reply: usize,
) -> Result<Vec<Frame>> {
    let mut codec = FrameCodec::replies(max_reply);
    let mut replies = Vec::with_capacity(count);
    while replies.len() < count {
        let frame = within(
            timeout,
            || format!("waiting for a reply from {endpoint}"),
            async {
                match codec::read_frame(reader, input, &mut codec).await {
                    Err(WireError::FrameTooLarge { .. } | WireError::ReplyTooLarge { .. })
                        if looks_like_json(input) =>
                    {
                        Err(classic_reply_error())
                    }
                    Err(WireError::FrameTooLarge { .. } | WireError::ReplyTooLarge { .. })
                        if looks_like_tls(input) =>
                    {
                        Err(tls_reply_error())
                    }
                    read => read.map_err(Error::from),
                }
            },
        )
        .await?;
        let frame = frame.ok_or(Error::Wire(WireError::ClosedBeforeMessage))?;
        let goodbye = frame.is_closing();
        replies.push(frame);
        if goodbye {
            break; // nothing more comes on this connection
        }
    }
    Ok(replies)
}

/// Called once with a request's replies, or with why there are none.
pub type Completion = Box<dyn FnOnce(Result<Vec<Frame>>) + Send>;

/// A request waiting for its replies.
struct Waiter {
    wanted: usize,
    frames: Vec<Frame>,
    queued_at: Instant,
    complete: Completion,
    /// The request frames, kept to be sent again if the server closes before handling them.
    request: Bytes,
    /// How many times they were sent again so far.
    resent: usize,
}

impl Waiter {
    fn finish(self, outcome: Result<Vec<Frame>>) {
        (self.complete)(outcome)
    }
}

/// What a pipelined connection holds between calls.
#[derive(Default)]
struct ConnState {
    /// Requests written (or queued to be), oldest first: replies come back in this order.
    waiters: VecDeque<Waiter>,
    /// Bytes the socket would not take yet, written by a flush task in order.
    backlog: VecDeque<Bytes>,
    flushing: bool,
    failed: Option<Arc<Error>>,
}

/// One connection shared by every request of a pipelining client.
///
/// Requests are written straight from the caller's thread (`try_write` never waits) unless
/// earlier bytes are still queued, and one reader task hands the replies out in order. So a
/// request costs no hand-off to another thread on its way out, many can be in flight, and a
/// request whose caller gave up never leaves half a frame behind: its reply is read and dropped.
struct Conn {
    write: WritePart,
    state: Mutex<ConnState>,
    reader: Mutex<Option<tokio::task::AbortHandle>>,
    runtime: Handle,
}

impl Conn {
    /// Queues `waiter` for the replies and writes `frames`; hands both back, unsent, if the
    /// connection has failed already.
    #[must_use]
    fn send(self: &Arc<Self>, frames: Bytes, waiter: Waiter) -> Option<(Bytes, Waiter)> {
        let mut state = locked(&self.state);
        if state.failed.is_some() {
            return Some((frames, waiter));
        }
        state.waiters.push_back(waiter);
        if state.flushing {
            state.backlog.push_back(frames);
            return None;
        }
        let written = match self.write.try_write(&frames) {
            Ok(written) => written,
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => 0,
            Err(err) => {
                drop(state);
                self.fail(WireError::Io(err).into());
                return None;
            }
        };
        if written < frames.len() {
            state.backlog.push_back(frames.slice(written..));
            state.flushing = true;
            self.runtime.spawn(self.clone().flush());
        }
        None
    }

    /// Writes the backlog as the socket takes it.
    async fn flush(self: Arc<Self>) {
        loop {
            let chunk = {
                let mut state = locked(&self.state);
                match state.backlog.front() {
                    _ if state.failed.is_some() => return,
                    Some(chunk) => chunk.clone(),
                    None => {
                        state.flushing = false;
                        return;
                    }
                }
            };
            let written = match self.write.write_some(&chunk).await {
                Ok(written) => written,
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(err) => return self.fail(WireError::Io(err).into()),
            };
            let mut state = locked(&self.state);
            if let Some(front) = state.backlog.front_mut() {
                if written >= front.len() {
                    state.backlog.pop_front();
                } else {
                    front.advance(written);
                }
            }
        }
    }

    /// Ends the connection: every waiting request fails with `failure`.
    fn fail(&self, failure: Error) {
        for waiter in self.retire(failure) {
            waiter.finish(Err(self.failure()));
        }
        if let Some(reader) = locked(&self.reader).take() {
            reader.abort();
        }
    }

    /// Marks the connection failed with `failure` and hands over the requests waiting on it.
    fn retire(&self, failure: Error) -> VecDeque<Waiter> {
        let mut state = locked(&self.state);
        if state.failed.is_some() {
            return VecDeque::new();
        }
        state.failed = Some(Arc::new(failure));
        state.backlog.clear();
        std::mem::take(&mut state.waiters)
    }

    /// A copy of what the connection failed with.
    fn failure(&self) -> Error {
        match &locked(&self.state).failed {
            Some(failure) => failure.duplicate(),
            None => Error::Wire(WireError::ClosedBeforeMessage),
        }
    }

    fn is_failed(&self) -> bool {
        locked(&self.state).failed.is_some()
    }

    /// Whether the peer closed this connection while nothing was in flight (its idle timeout),
    /// seen on the socket itself, before the reader task may have noticed. It is then failed,
    /// so the next request opens a new connection instead of being written into a closed one.
    fn closed_while_idle(&self) -> bool {
        let idle = {
            let state = locked(&self.state);
            state.waiters.is_empty() && !state.flushing
        };
        if idle && self.write.closed_by_peer() {
            self.fail(Error::Wire(WireError::ClosedBeforeMessage));
            return true;
        }
        false
    }
}

/// Sleeps until `due`, or forever without one.
async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

/// The pipelined connection, as far as it has got.
#[derive(Default)]
enum Slot {
    #[default]
    Empty,
    /// Connecting; these requests go out once connected.
    Connecting(Vec<(Bytes, Waiter)>),
    Ready(Arc<Conn>),
}

/// A client whose concurrent requests share one framed connection, opened on first use and
/// again after a failure. Replies are matched to requests by order.
pub struct Pipeline {
    endpoint: Endpoint,
    tls: Option<ClientTls>,
    timeout: Option<Duration>,
    max_reply: usize,
    slot: Mutex<Slot>,
}

impl Pipeline {
    /// A pipeline to `endpoint`; nothing is opened yet. `timeout` bounds connecting and each
    /// reply's wait while requests are waiting.
    pub fn new(
        endpoint: Endpoint,
        tls: Option<ClientTls>,
        timeout: Option<Duration>,
        max_reply: usize,
    ) -> Arc<Self> {
        Arc::new(Pipeline {
            endpoint,
            tls,
            timeout,
            max_reply,
            slot: Mutex::default(),
        })
    }

    /// Its TLS settings, if it uses TLS.
    pub fn tls(&self) -> Option<&ClientTls> {
        self.tls.as_ref()
    }

    /// Where this pipeline connects.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Sends `count` encoded request frames; `complete` gets their replies in order. Connects
    /// first (in the background, on `runtime`) if needed.
    pub fn send(
        self: &Arc<Self>,
        runtime: &Handle,
        frames: Bytes,
        count: usize,
        complete: Completion,
    ) {
        let waiter = Waiter {
            wanted: count,
            frames: Vec::with_capacity(count.min(1024)),
            queued_at: Instant::now(),
            complete,
            request: frames.clone(),
            resent: 0,
        };
        self.dispatch(runtime, frames, waiter);
    }

    /// Writes a request on the connection, or queues it for the one being opened (opening one
    /// if needed). A connection that failed meanwhile hands the request back unsent, and it
    /// goes to the next.
    fn dispatch(self: &Arc<Self>, runtime: &Handle, mut frames: Bytes, mut waiter: Waiter) {
        loop {
            let mut slot = locked(&self.slot);
            match &mut *slot {
                Slot::Ready(conn) if !conn.is_failed() && !conn.closed_while_idle() => {
                    let conn = conn.clone();
                    drop(slot);
                    match conn.send(frames, waiter) {
                        None => return,
                        Some(unsent) => (frames, waiter) = unsent,
                    }
                }
                Slot::Connecting(queued) => return queued.push((frames, waiter)),
                _ => {
                    *slot = Slot::Connecting(vec![(frames, waiter)]);
                    runtime.spawn(self.clone().connect(runtime.clone()));
                    return;
                }
            }
        }
    }

    async fn connect(self: Arc<Self>, runtime: Handle) {
        let connected = open(&self.endpoint, self.tls.as_ref(), self.timeout).await;
        // Taking the queue and installing the connection happen under one lock, so a request
        // made meanwhile is either in the queue or sent on the new connection, never lost.
        let mut slot = locked(&self.slot);
        let queued = match std::mem::take(&mut *slot) {
            Slot::Connecting(queued) => queued,
            // Closed meanwhile (its requests were failed then): the new socket just closes.
            _ => return,
        };
        let parts = connected.and_then(|stream| {
            stream
                .into_split()
                .map_err(|err| Error::from(WireError::Io(err)))
        });
        let (read, write) = match parts {
            Ok(parts) => parts,
            Err(failure) => {
                drop(slot);
                for (_, waiter) in queued {
                    waiter.finish(Err(failure.duplicate()));
                }
                return;
            }
        };
        let conn = Arc::new(Conn {
            write,
            state: Mutex::default(),
            reader: Mutex::new(None),
            runtime: runtime.clone(),
        });
        let reader = runtime.spawn(read_pipelined(conn.clone(), read, self.clone()));
        *locked(&conn.reader) = Some(reader.abort_handle());
        *slot = Slot::Ready(conn.clone());
        // In the order they were made, before any request that comes after.
        for (frames, waiter) in queued {
            if let Some((_, waiter)) = conn.send(frames, waiter) {
                waiter.finish(Err(conn.failure()));
            }
        }
    }

    /// Sends again, on a new connection, the requests that `closed` (which the server closed
    /// with its goodbye) did not get replies for: none of them was handled. Ahead of any
    /// request queued since; a request sent again too often fails instead.
    fn resend(self: &Arc<Self>, closed: &Arc<Conn>, waiters: VecDeque<Waiter>) {
        let mut again = Vec::with_capacity(waiters.len());
        for mut waiter in waiters {
            if waiter.resent >= MAX_RESENDS {
                waiter.finish(Err(not_handled(&self.endpoint)));
                continue;
            }
            waiter.resent += 1;
            let rest = waiter
                .request
                .slice(codec::frames_len(&waiter.request, waiter.frames.len())..);
            again.push((rest, waiter));
        }
        if again.is_empty() {
            return;
        }
        let mut slot = locked(&self.slot);
        match &mut *slot {
            Slot::Connecting(queued) => {
                again.append(queued);
                *queued = again;
            }
            Slot::Ready(conn) if !Arc::ptr_eq(conn, closed) && !conn.is_failed() => {
                drop(slot);
                for (frames, waiter) in again {
                    self.dispatch(&closed.runtime, frames, waiter);
                }
            }
            _ => {
                *slot = Slot::Connecting(again);
                closed
                    .runtime
                    .spawn(self.clone().connect(closed.runtime.clone()));
            }
        }
    }

    /// Drops the connection; waiting requests fail with `why`. A TLS session is ended with
    /// `close_notify` first (in the background, at most `CLOSE_NOTIFY_LIMIT`).
    pub fn close(&self, why: &str) {
        if let Slot::Ready(conn) = &*locked(&self.slot) {
            let conn = conn.clone();
            conn.runtime.clone().spawn(async move {
                conn.write.close_notify(CLOSE_NOTIFY_LIMIT).await;
            });
        }
        let closed = || {
            Error::Wire(WireError::Io(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                why.to_owned(),
            )))
        };
        match std::mem::take(&mut *locked(&self.slot)) {
            Slot::Ready(conn) => conn.fail(closed()),
            Slot::Connecting(queued) => {
                for (_, waiter) in queued {
                    waiter.finish(Err(closed()));
                }
            }
            Slot::Empty => {}
        }
    }
}

/// Reads replies and completes the oldest request with them; the pipeline's timeout bounds the
/// wait for each reply while requests are waiting.
async fn read_pipelined(conn: Arc<Conn>, mut read: ReadPart, pipeline: Arc<Pipeline>) {
    let mut input = BytesMut::new();
    let mut codec = FrameCodec::replies(pipeline.max_reply);
    let mut last_reply = Instant::now();
    let limit = pipeline.timeout;
    let failure = loop {
        // While idle, wake every `timeout` anyway to look at requests queued since.
        let due = limit.map(|limit| match locked(&conn.state).waiters.front() {
            Some(front) => front.queued_at.max(last_reply) + limit,
            None => Instant::now() + limit,
        });
        let frame = tokio::select! {
            frame = codec::read_frame(&mut read, &mut input, &mut codec) => frame,
            () = sleep_until(due) => {
                let limit = limit.unwrap_or_default();
                let overdue = locked(&conn.state).waiters.front().is_some_and(|front| {
                    Instant::now() >= front.queued_at.max(last_reply) + limit
                });
                if overdue {
                    break Error::Timeout(format!(
                        "timed out after {} s waiting for a reply from {}",
                        limit.as_secs_f64(),
                        pipeline.endpoint
                    ));
                }
                continue;
            }
        };
        last_reply = Instant::now();
        match frame {
            Ok(Some(frame)) if frame.is_closing() => {
                // The server's goodbye: nothing waiting was handled; all of it goes again.
                let waiters = conn.retire(Error::Wire(WireError::ClosedBeforeMessage));
                pipeline.resend(&conn, waiters);
                return;
            }
            Ok(Some(frame)) => {
                let mut state = locked(&conn.state);
                let Some(front) = state.waiters.front_mut() else {
                    break unsolicited(codec::HEADER_LEN + frame.payload.len());
                };
                front.frames.push(frame);
                if front.frames.len() == front.wanted {
                    let mut done = state.waiters.pop_front().expect("front exists");
                    drop(state);
                    let frames = std::mem::take(&mut done.frames);
                    done.finish(Ok(frames));
                }
            }
            Ok(None) => break Error::Wire(WireError::ClosedBeforeMessage),
            Err(WireError::FrameTooLarge { .. } | WireError::ReplyTooLarge { .. })
                if looks_like_json(&input) =>
            {
                break classic_reply_error()
            }
            Err(WireError::FrameTooLarge { .. } | WireError::ReplyTooLarge { .. })
                if looks_like_tls(&input) =>
            {
                break tls_reply_error()
            }
            Err(err) => break err.into(),
        }
    };
    conn.fail(failure);
}
