//! A pipelined connection: the concurrent requests of one client (`framesock.aio.Client`)
//! share one framed connection, written from the callers' threads and answered in order.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::runtime::Handle;
use tokio::time::Instant;
use tokio_util::codec::Decoder;

use crate::engine::client::{
    not_handled, open, reply_error, unsolicited, CLOSE_NOTIFY_LIMIT, MAX_RESENDS,
};
use crate::engine::codec::{self, Frame, FrameCodec, WireError};
use crate::engine::error::{Error, Result};
use crate::engine::lock::locked;
use crate::engine::net::{Endpoint, ReadPart, Stream, WritePart};
use crate::engine::tls::ClientTls;

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
    /// When the last reply came: a reply's wait is timed from it or from its request,
    /// whichever is later.
    last_reply: Option<Instant>,
}

impl ConnState {
    /// When the oldest request's wait for its reply runs out (`limit` from now while none
    /// waits, so that a watcher looks again for requests queued since).
    fn reply_due(&self, limit: Duration) -> Instant {
        match self.waiters.front() {
            Some(front) => {
                front
                    .queued_at
                    .max(self.last_reply.unwrap_or(front.queued_at))
                    + limit
            }
            None => Instant::now() + limit,
        }
    }
}

/// Reads a pipelined connection's replies on its own terms instead of an engine task: an
/// event loop that watches the socket and calls [`Replies::read_ready`] whenever it is
/// readable. (`framesock.aio.Client`: a reply is read on the loop's own thread, where its
/// awaiter runs, with no hand-off from an engine thread on the way.)
pub trait ReplyReader: Send + Sync {
    /// Start calling `read_ready()` on `replies` (upgraded) whenever the socket is readable.
    fn start(&self, replies: Replies);
    /// Stop watching `fd` (called once, when the connection is over), holding `socket` until
    /// then: the descriptor must not be another socket's while it is still watched. Where the
    /// watching is gone already (its loop was torn down), dropping `socket` closes it at once.
    fn stop(&self, fd: std::os::fd::RawFd, socket: KeepOpen);
}

/// Keeps a connection's socket open while it is held (see [`ReplyReader::stop`]).
pub struct KeepOpen(#[allow(dead_code)] Arc<Conn>);

/// Gives a [`ReplyReader`] for a new plain connection; `None`: an engine task reads it.
pub type ReaderSource = Box<dyn Fn() -> Option<Box<dyn ReplyReader>> + Send + Sync>;

/// A connection read by a [`ReplyReader`]: what it has read so far.
struct ReadElsewhere {
    reader: Box<dyn ReplyReader>,
    input: Mutex<(BytesMut, FrameCodec)>,
    stopped: std::sync::atomic::AtomicBool,
}

/// The most reads one `read_ready` makes (the socket is looked at again at once if more is
/// left), and the room each gets at least.
const READS_PER_CALL: usize = 16;
const READ_ROOM: usize = 16 * 1024;

/// A pipelined connection as its [`ReplyReader`] sees it.
#[derive(Clone)]
pub struct Replies {
    conn: Arc<Conn>,
    pipeline: Arc<Pipeline>,
}

/// [`Replies`] that do not keep the connection open: what a loop's callback holds, so that a
/// connection whose loop is gone (never to run its `stop`) closes as soon as it is over.
pub struct WeakReplies {
    conn: std::sync::Weak<Conn>,
    pipeline: std::sync::Weak<Pipeline>,
}

impl WeakReplies {
    pub fn upgrade(&self) -> Option<Replies> {
        Some(Replies {
            conn: self.conn.upgrade()?,
            pipeline: self.pipeline.upgrade()?,
        })
    }
}

impl Replies {
    pub fn downgrade(&self) -> WeakReplies {
        WeakReplies {
            conn: Arc::downgrade(&self.conn),
            pipeline: Arc::downgrade(&self.pipeline),
        }
    }

    /// The socket to watch.
    pub fn fd(&self) -> std::os::fd::RawFd {
        self.conn
            .write
            .read_elsewhere_fd()
            .expect("a connection read elsewhere has its own socket")
    }

    /// Reads what the socket holds and hands out every whole reply (their completions run
    /// on this thread). False once the connection is over (it stopped its reader).
    pub fn read_ready(&self) -> bool {
        let Some(elsewhere) = &self.conn.elsewhere else {
            return false;
        };
        let mut input = locked(&elsewhere.input);
        let (input, codec) = &mut *input;
        let mut reads = 0;
        loop {
            loop {
                let read = match codec.decode(input) {
                    Ok(None) => break,
                    read => read,
                };
                match take_reply(&self.conn, &self.pipeline, read, input) {
                    Ok(true) => {}
                    Ok(false) => return false,
                    Err(failure) => {
                        self.conn.fail(failure);
                        return false;
                    }
                }
            }
            if reads == READS_PER_CALL {
                return true; // the loop calls again while the socket holds more
            }
            reads += 1;
            if input.capacity() - input.len() < READ_ROOM {
                input.reserve(READ_ROOM);
            }
            match self.conn.write.recv_into(input) {
                Ok(0) => {
                    // Every whole reply was taken: what is left is cut short, or nothing.
                    let failure = match take_reply(
                        &self.conn,
                        &self.pipeline,
                        codec.decode_eof(input),
                        input,
                    ) {
                        Err(failure) => failure,
                        Ok(_) => Error::Wire(WireError::ClosedBeforeMessage),
                    };
                    self.conn.fail(failure);
                    return false;
                }
                Ok(_) => {}
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => return true,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                Err(err) => {
                    self.conn.fail(WireError::Io(err).into());
                    return false;
                }
            }
        }
    }

    /// Ends the connection with `why` (its reader could not start).
    pub fn fail(&self, why: &str) {
        self.conn
            .fail(Error::Wire(WireError::Io(std::io::Error::other(
                why.to_owned(),
            ))));
    }
}

/// One connection shared by every request of a pipelining client.
///
/// Requests are written straight from the caller's thread (`try_write` never waits) unless
/// earlier bytes are still queued, and one reader hands the replies out in order: an engine
/// task, or the pipeline's [`ReplyReader`] for a plain socket. So a request costs no hand-off
/// to another thread on its way out, many can be in flight, and a request whose caller gave
/// up never leaves half a frame behind: its reply is read and dropped.
struct Conn {
    write: WritePart,
    state: Mutex<ConnState>,
    /// The engine task that reads the replies, or (read elsewhere) that times them out.
    reader: Mutex<Option<tokio::task::AbortHandle>>,
    elsewhere: Option<ReadElsewhere>,
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
    fn fail(self: &Arc<Self>, failure: Error) {
        for waiter in self.retire(failure) {
            waiter.finish(Err(self.failure()));
        }
        self.stop_reading();
    }

    /// Nothing more is read: the reader task ends, a reader elsewhere is told (once).
    fn stop_reading(self: &Arc<Self>) {
        if let Some(reader) = locked(&self.reader).take() {
            reader.abort();
        }
        if let Some(elsewhere) = &self.elsewhere {
            if !elsewhere
                .stopped
                .swap(true, std::sync::atomic::Ordering::AcqRel)
            {
                if let Some(fd) = self.write.read_elsewhere_fd() {
                    elsewhere.reader.stop(fd, KeepOpen(self.clone()));
                }
            }
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
    fn closed_while_idle(self: &Arc<Self>) -> bool {
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
    /// Who reads a new plain connection (`None`, or when it gives none: an engine task).
    readers: Option<ReaderSource>,
}

impl Pipeline {
    /// A pipeline to `endpoint`; nothing is opened yet. `timeout` bounds connecting and each
    /// reply's wait while requests are waiting.
    pub fn new(
        endpoint: Endpoint,
        tls: Option<ClientTls>,
        timeout: Option<Duration>,
        max_reply: usize,
        readers: Option<ReaderSource>,
    ) -> Arc<Self> {
        Arc::new(Pipeline {
            endpoint,
            tls,
            timeout,
            max_reply,
            slot: Mutex::default(),
            readers,
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
            self.split(stream)
                .map_err(|err| Error::from(WireError::Io(err)))
        });
        let (read, write, elsewhere) = match parts {
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
            elsewhere,
            runtime: runtime.clone(),
        });
        let reader = match read {
            Some(read) => Some(runtime.spawn(read_pipelined(conn.clone(), read, self.clone()))),
            None => self
                .timeout
                .map(|limit| runtime.spawn(time_replies_out(conn.clone(), limit, self.clone()))),
        };
        *locked(&conn.reader) = reader.map(|reader| reader.abort_handle());
        *slot = Slot::Ready(conn.clone());
        // In the order they were made, before any request that comes after.
        for (frames, waiter) in queued {
            if let Some((_, waiter)) = conn.send(frames, waiter) {
                waiter.finish(Err(conn.failure()));
            }
        }
        drop(slot);
        if let Some(elsewhere) = &conn.elsewhere {
            elsewhere.reader.start(Replies {
                conn: conn.clone(),
                pipeline: self.clone(),
            });
        }
    }

    /// A new connection's halves: a read half for an engine task, or none when a reader from
    /// `readers` takes a plain socket.
    fn split(
        &self,
        stream: Stream,
    ) -> std::io::Result<(Option<ReadPart>, WritePart, Option<ReadElsewhere>)> {
        let reader = match &self.readers {
            Some(readers) if stream.is_plain() => readers(),
            _ => None,
        };
        let Some(reader) = reader else {
            let (read, write) = stream.into_split()?;
            return Ok((Some(read), write, None));
        };
        let elsewhere = ReadElsewhere {
            reader,
            input: Mutex::new((BytesMut::new(), FrameCodec::replies(self.max_reply))),
            stopped: std::sync::atomic::AtomicBool::new(false),
        };
        Ok((None, stream.into_read_elsewhere()?, Some(elsewhere)))
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
    let failure = loop {
        // While idle, wake every `timeout` anyway to look at requests queued since.
        let due = pipeline
            .timeout
            .map(|limit| locked(&conn.state).reply_due(limit));
        let frame = tokio::select! {
            frame = codec::read_frame(&mut read, &mut input, &mut codec) => frame,
            () = sleep_until(due) => match overdue(&conn, &pipeline) {
                Some(failure) => break failure,
                None => continue,
            },
        };
        match take_reply(&conn, &pipeline, frame, &input) {
            Ok(true) => {}
            Ok(false) => return,
            Err(failure) => break failure,
        }
    };
    conn.fail(failure);
}

/// For a connection read elsewhere: fails it once a reply is overdue.
async fn time_replies_out(conn: Arc<Conn>, limit: Duration, pipeline: Arc<Pipeline>) {
    loop {
        let due = locked(&conn.state).reply_due(limit);
        tokio::time::sleep_until(due).await;
        if let Some(failure) = overdue(&conn, &pipeline) {
            return conn.fail(failure);
        }
    }
}

/// The timeout, if the oldest request has waited past it for its reply.
fn overdue(conn: &Conn, pipeline: &Pipeline) -> Option<Error> {
    let limit = pipeline.timeout?;
    let late = {
        let state = locked(&conn.state);
        !state.waiters.is_empty() && state.reply_due(limit) <= Instant::now()
    };
    late.then(|| {
        Error::Timeout(format!(
            "timed out after {} s waiting for a reply from {}",
            limit.as_secs_f64(),
            pipeline.endpoint
        ))
    })
}

/// Hands out what one read gave: Ok(true) to read on; Ok(false) once the server's goodbye
/// came (nothing waiting was handled: all of it goes again, on a new connection); Err: why
/// the connection failed.
fn take_reply(
    conn: &Arc<Conn>,
    pipeline: &Arc<Pipeline>,
    read: std::result::Result<Option<Frame>, WireError>,
    input: &[u8],
) -> Result<bool> {
    match read {
        Ok(Some(frame)) if frame.is_closing() => {
            let waiters = conn.retire(Error::Wire(WireError::ClosedBeforeMessage));
            conn.stop_reading();
            pipeline.resend(conn, waiters);
            Ok(false)
        }
        Ok(Some(frame)) => {
            let mut state = locked(&conn.state);
            state.last_reply = Some(Instant::now());
            let Some(front) = state.waiters.front_mut() else {
                return Err(unsolicited(codec::HEADER_LEN + frame.payload.len()));
            };
            front.frames.push(frame);
            if front.frames.len() == front.wanted {
                let mut done = state.waiters.pop_front().expect("front exists");
                drop(state);
                let frames = std::mem::take(&mut done.frames);
                done.finish(Ok(frames));
            }
            Ok(true)
        }
        Ok(None) => Err(Error::Wire(WireError::ClosedBeforeMessage)),
        Err(err) => Err(reply_error(err, input)),
    }
}
