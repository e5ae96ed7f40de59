//! The serving engine: how a connection is answered in either protocol, the accept loop, and the
//! counters. Requests are read and replies written on the tokio runtime without the GIL; the GIL is
//! taken only to call a Python handler (a static response never takes it).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::future::join_all;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyDict, PyString};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bridge::{Job, LoopBridge};
use crate::codec::{self, FrameCodec, WireError};
use crate::errors::{Error, Result};
use crate::json;
use crate::net::{Address, Listener, Stream};
use crate::runtime::within;

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

impl Protocol {
    pub fn parse(name: &str) -> PyResult<Self> {
        match name {
            "classic" => Ok(Protocol::Classic),
            "framed" => Ok(Protocol::Framed),
            other => Err(PyValueError::new_err(format!(
                "protocol must be 'classic' or 'framed', not {other:?}"
            ))),
        }
    }
}

/// How a handler receives the request payload.
#[derive(Debug, Clone, Copy)]
pub enum RequestAs {
    /// `str`, decoded as UTF-8 with undecodable bytes replaced by U+FFFD.
    Text,
    /// The payload's `bytes`, untouched.
    Bytes,
    /// The payload parsed as JSON.
    Json,
}

impl RequestAs {
    pub fn parse(name: &str) -> PyResult<Self> {
        match name {
            "text" => Ok(RequestAs::Text),
            "bytes" => Ok(RequestAs::Bytes),
            "json" => Ok(RequestAs::Json),
            other => Err(PyValueError::new_err(format!(
                "request_as must be 'text', 'bytes' or 'json', not {other:?}"
            ))),
        }
    }
}

/// The payload as text; bytes that are not UTF-8 become U+FFFD (the raw bytes are kept apart).
pub fn request_text<'py>(py: Python<'py>, payload: &[u8]) -> Bound<'py, PyString> {
    PyString::new(py, &String::from_utf8_lossy(payload))
}

/// Why one exchange got no normal reply.
pub enum Failure {
    /// The request could not be turned into what the handler wants (`request_as="json"`).
    BadRequest(PyErr),
    /// The handler raised.
    Handler(PyErr),
    /// The handler's value is not JSON-serialisable.
    Encode(PyErr),
}

impl Failure {
    /// The exception behind the failure, for callers that raise instead of logging.
    pub fn into_error(self) -> PyErr {
        match self {
            Failure::BadRequest(err) | Failure::Handler(err) | Failure::Encode(err) => err,
        }
    }

    /// The `kind` of the error reply, and the stats counter name.
    fn kind(&self) -> &'static str {
        match self {
            Failure::BadRequest(_) => "bad_request",
            Failure::Handler(_) => "handler",
            Failure::Encode(_) => "encode",
        }
    }

    fn error(&self) -> &PyErr {
        match self {
            Failure::BadRequest(err) | Failure::Handler(err) | Failure::Encode(err) => err,
        }
    }
}

/// Where replies come from: one value fixed up front, or a Python callable per request.
pub enum Responder {
    /// A value encoded once, before serving starts.
    Static { value: Py<PyAny>, json: Bytes },
    /// `handler(request) -> value`, called with the GIL. Under framesock.aio (`event_loop`
    /// set), a coroutine function is called on the event loop and what any handler returns
    /// that is awaitable is awaited there.
    Handler {
        handler: Py<PyAny>,
        request_as: RequestAs,
        event_loop: OnceLock<LoopRoute>,
    },
}

/// How a handler reaches its event loop.
pub struct LoopRoute {
    bridge: Arc<LoopBridge>,
    /// The handler is a coroutine function: call it on the loop itself.
    call_on_loop: bool,
}

/// The request payload as the handler wants it, and the handler called with it.
pub fn call_handler<'py>(
    py: Python<'py>,
    handler: &Bound<'py, PyAny>,
    request_as: RequestAs,
    payload: &[u8],
) -> std::result::Result<Bound<'py, PyAny>, Failure> {
    let request = match request_as {
        RequestAs::Text => request_text(py, payload).into_any(),
        RequestAs::Bytes => PyBytes::new(py, payload).into_any(),
        RequestAs::Json => json::loads(py, payload).map_err(Failure::BadRequest)?,
    };
    handler.call1((request,)).map_err(Failure::Handler)
}

/// Whether `value` is something to `await` (a coroutine, a future, ...).
pub fn is_awaitable(value: &Bound<'_, PyAny>) -> bool {
    !(value.is_instance_of::<PyDict>() || value.is_instance_of::<pyo3::types::PyList>())
        && value
            .hasattr(pyo3::intern!(value.py(), "__await__"))
            .unwrap_or(false)
}

impl Responder {
    /// Checks `response` / `handler` and encodes a static response now, so a value that cannot
    /// be sent fails before anything touches the network.
    pub fn new(
        py: Python<'_>,
        response: Option<Bound<'_, PyAny>>,
        handler: Option<Bound<'_, PyAny>>,
        request_as: &str,
    ) -> PyResult<Self> {
        use pyo3::exceptions::PyTypeError;
        let request_as = RequestAs::parse(request_as)?;
        match (response, handler) {
            (Some(_), Some(_)) => Err(PyTypeError::new_err(
                "pass either response or handler, not both",
            )),
            (None, Some(handler)) if !handler.is_callable() => Err(PyTypeError::new_err(format!(
                "handler must be callable, not {}",
                handler.get_type().name()?
            ))),
            (None, Some(handler)) => Ok(Responder::Handler {
                handler: handler.unbind(),
                request_as,
                event_loop: OnceLock::new(),
            }),
            (Some(value), None) => {
                let json = Bytes::from(json::dumps(&value)?);
                Ok(Responder::Static {
                    value: value.unbind(),
                    json,
                })
            }
            (None, None) => Ok(Responder::Static {
                value: json::loads(py, SEED_REPLY)?.unbind(),
                json: Bytes::from_static(SEED_REPLY),
            }),
        }
    }

    /// framesock.aio: ties the handler to the running event loop (call on the loop). The first
    /// loop set stays.
    pub fn use_running_loop(&self, py: Python<'_>) -> PyResult<()> {
        let Responder::Handler {
            handler,
            event_loop,
            ..
        } = self
        else {
            return Ok(());
        };
        if event_loop.get().is_some() {
            return Ok(());
        }
        let running = py.import("asyncio")?.call_method0("get_running_loop")?;
        let call_on_loop = py
            .import("inspect")?
            .call_method1("iscoroutinefunction", (handler.bind(py),))?
            .is_truthy()?;
        let route = LoopRoute {
            bridge: LoopBridge::new(&running)?,
            call_on_loop,
        };
        if let Err(unused) = event_loop.set(route) {
            unused.bridge.push(Job::Close);
        }
        Ok(())
    }

    /// framesock.aio: stops watching the event loop (from any thread; the loop does the rest).
    pub fn release_loop(&self) {
        if let Responder::Handler { event_loop, .. } = self {
            if let Some(route) = event_loop.get() {
                route.bridge.push(Job::Close);
            }
        }
    }

    /// The reply value and its JSON text for one request. A handler is called with the GIL (on
    /// the event loop for a coroutine function under framesock.aio); an awaitable it returns is
    /// awaited on the event loop while this task waits without the GIL.
    pub async fn respond(
        &self,
        payload: &[u8],
    ) -> std::result::Result<(Py<PyAny>, Bytes), Failure> {
        let Responder::Handler {
            handler,
            request_as,
            event_loop,
        } = self
        else {
            let Responder::Static { value, json } = self else {
                unreachable!()
            };
            return Ok((Python::attach(|py| value.clone_ref(py)), json.clone()));
        };
        let route = event_loop.get();
        let waiting = match route {
            Some(route) if route.call_on_loop => {
                let (handoff, waiting) = route.bridge.handoff();
                let handler = Python::attach(|py| handler.clone_ref(py));
                let payload = Bytes::copy_from_slice(payload);
                route.bridge.push(Job::Call {
                    handler,
                    request_as: *request_as,
                    payload,
                    handoff,
                });
                waiting
            }
            _ => {
                let called = Python::attach(|py| {
                    let value = call_handler(py, handler.bind(py), *request_as, payload)?;
                    if !is_awaitable(&value) {
                        let json = json::dumps(&value).map_err(Failure::Encode)?;
                        return Ok(Ok((value.unbind(), Bytes::from(json))));
                    }
                    match route {
                        Some(route) => {
                            let (handoff, waiting) = route.bridge.handoff();
                            route.bridge.push(Job::Await {
                                awaitable: value.unbind(),
                                handoff,
                            });
                            Ok(Err(waiting))
                        }
                        None => {
                            // Nothing will await it: close it, so Python does not warn later.
                            if value.hasattr("close").unwrap_or(false) {
                                let _ = value.call_method0("close");
                            }
                            Err(Failure::Handler(pyo3::exceptions::PyTypeError::new_err(
                                "the handler returned an awaitable; async handlers need framesock.aio.Server",
                            )))
                        }
                    }
                })?;
                match called {
                    Ok(done) => return Ok(done),
                    Err(waiting) => waiting,
                }
            }
        };
        waiting.reply().await
    }

    /// Whether handlers' awaitables run on an event loop, so several can be awaited at once.
    fn awaits_on_event_loop(&self) -> bool {
        matches!(self, Responder::Handler { event_loop, .. } if event_loop.get().is_some())
    }

    /// Just the JSON text of the reply; a static reply never takes the GIL.
    async fn respond_json(&self, payload: &[u8]) -> std::result::Result<Bytes, Failure> {
        match self {
            Responder::Static { json, .. } => Ok(json.clone()),
            Responder::Handler { .. } => self.respond(payload).await.map(|(_, json)| json),
        }
    }
}

/// Counters, updated without locks from every connection; `stats()` hands them to Python
/// through pythonize, field names as they are here.
#[derive(Default, Serialize)]
pub struct Stats {
    #[serde(rename = "connections_accepted")]
    accepted: AtomicU64,
    #[serde(rename = "connections_active")]
    active: AtomicU64,
    requests: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    idle_closed: AtomicU64,
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
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

impl Stats {
    /// The counters as a dict: totals at the top level, errors by kind under "errors".
    pub fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        Ok(pythonize::pythonize(py, self)?)
    }

    fn failure(&self, failure: &Failure) -> &AtomicU64 {
        match failure {
            Failure::BadRequest(_) => &self.errors.bad_request,
            Failure::Handler(_) => &self.errors.handler,
            Failure::Encode(_) => &self.errors.encode,
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
}

/// Writes to the `framesock` logger (Python's `logging`), with a traceback when there is one.
fn log(level: &str, message: String, error: Option<&PyErr>) {
    static LOGGER: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    Python::attach(|py| {
        let logger = LOGGER.get_or_try_init(py, || {
            py.import("logging")?
                .call_method1("getLogger", ("framesock",))
                .map(Bound::unbind)
        });
        let Ok(logger) = logger else { return };
        let kwargs = PyDict::new(py);
        if let Some(err) = error {
            let _ = kwargs.set_item("exc_info", err.clone_ref(py).into_value(py));
        }
        // Logging must never take the server down; a broken handler config is its own problem.
        let _ = logger
            .bind(py)
            .call_method(level, (message,), Some(&kwargs));
    });
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

/// The most buffered requests of one connection answered before their replies are written.
const MAX_BATCH: usize = 256;

/// Limits that apply to every connection.
pub struct Limits {
    /// For each request from its first byte to its last, and for sending each reply.
    pub timeout: Option<Duration>,
    /// For the silence between requests on a kept connection.
    pub idle_timeout: Option<Duration>,
    pub max_frame: usize,
}

/// Everything a connection needs to be served.
pub struct Service {
    pub protocol: Protocol,
    pub limits: Limits,
    pub responder: Responder,
    pub stats: Stats,
}

impl Service {
    /// Counts and logs a failed exchange; returns the framed error reply's JSON.
    fn exchange_failed(&self, failure: Failure, peer: &Address) -> Vec<u8> {
        bump(self.stats.failure(&failure), 1);
        let kind = failure.kind();
        let message = Python::attach(|py| {
            let err = failure.error();
            let text = err.value(py).to_string();
            let type_name = err
                .get_type(py)
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default();
            format!("{type_name}: {text}")
        });
        log(
            "error",
            format!("request from {peer} failed ({kind}): {message}"),
            Some(failure.error()),
        );
        error_reply(kind, &message)
    }

    /// Counts and logs a connection that ended in error.
    fn connection_failed(&self, err: &Error, peer: &Address) {
        bump(self.stats.connection_error(err), 1);
        let level = match err {
            // A client that connects and leaves without a word (a port probe) is not news.
            Error::Wire(WireError::ClosedBeforeMessage) => "debug",
            _ => "warning",
        };
        log(
            level,
            format!("connection from {peer} dropped: {err}"),
            None,
        );
    }

    /// Serves one accepted connection until it ends, `stop` is cancelled between requests, or
    /// an error drops it.
    pub async fn serve_connection(
        &self,
        mut stream: Stream,
        peer: Address,
        stop: CancellationToken,
    ) {
        bump(&self.stats.accepted, 1);
        let _active = ActiveConnection::count(&self.stats.active);
        let outcome = match self.protocol {
            Protocol::Classic => self.serve_classic(&mut stream, &peer, &stop).await,
            Protocol::Framed => self.serve_framed(&mut stream, &peer, &stop).await,
        };
        if let Err(err) = outcome {
            self.connection_failed(&err, &peer);
        }
    }

    /// Waits for the first bytes of a request and returns how many came; `Ok(None)` if shutdown
    /// or the idle limit came first, or the peer closed cleanly.
    async fn await_request(
        &self,
        stream: &mut Stream,
        input: &mut BytesMut,
        stop: &CancellationToken,
        limit: Option<Duration>,
    ) -> Result<Option<usize>> {
        input.reserve(8 * 1024);
        let read = async {
            match limit {
                Some(limit) => tokio::time::timeout(limit, stream.read_buf(input))
                    .await
                    .ok(),
                None => Some(stream.read_buf(input).await),
            }
        };
        tokio::select! {
            biased;
            _ = stop.cancelled() => Ok(None),
            read = read => match read {
                None => {
                    bump(&self.stats.idle_closed, 1);
                    Ok(None)
                }
                Some(Ok(0)) => Ok(None),
                Some(Ok(n)) => Ok(Some(n)),
                Some(Err(err)) => Err(WireError::Io(err).into()),
            },
        }
    }

    /// The seed's exchange: one request, a raw JSON reply, close. A failed exchange closes
    /// without a reply (the classic wire has no way to say what went wrong).
    async fn serve_classic(
        &self,
        stream: &mut Stream,
        peer: &Address,
        stop: &CancellationToken,
    ) -> Result<()> {
        let timeout = self.limits.timeout;
        let mut input = BytesMut::new();
        let mut codec = FrameCodec::new(self.limits.max_frame);
        let read = within(
            timeout,
            || format!("waiting for the request from {peer}"),
            async {
                let frame = codec::read_frame(stream, &mut input, &mut codec).await?;
                frame.ok_or(Error::Wire(WireError::ClosedBeforeMessage))
            },
        );
        // Shutdown drops a connection whose request has not arrived yet.
        let request = tokio::select! {
            biased;
            _ = stop.cancelled() => return Ok(()),
            request = read => request?,
        };
        bump(&self.stats.requests, 1);
        bump(
            &self.stats.bytes_in,
            (codec::HEADER_LEN + request.payload.len()) as u64,
        );
        match self.responder.respond_json(&request.payload).await {
            Ok(json) => {
                within(timeout, || format!("sending the reply to {peer}"), async {
                    stream.write_all(&json).await.map_err(WireError::Io)?;
                    stream.shutdown().await.map_err(WireError::Io)?;
                    Ok(())
                })
                .await?;
                bump(&self.stats.bytes_out, json.len() as u64);
            }
            Err(failure) => {
                self.exchange_failed(failure, peer);
            }
        }
        Ok(())
    }

    /// Kept connections: answer every request already buffered, write the replies together,
    /// then wait for more.
    async fn serve_framed(
        &self,
        stream: &mut Stream,
        peer: &Address,
        stop: &CancellationToken,
    ) -> Result<()> {
        let mut codec = FrameCodec::new(self.limits.max_frame);
        let mut input = BytesMut::new();
        let mut output = BytesMut::new();
        // When the request now arriving must be complete (its first byte started the clock).
        let mut request_deadline: Option<Instant> = None;
        loop {
            // Every request already buffered (up to a bound), answered in order.
            let mut batch = Vec::new();
            let mut refused = None;
            while batch.len() < MAX_BATCH {
                match codec.decode(&mut input) {
                    Ok(Some(frame)) => batch.push(frame),
                    Ok(None) => break,
                    Err(err) => {
                        refused = Some(err);
                        break;
                    }
                }
            }
            if !batch.is_empty() {
                request_deadline = None;
                bump(&self.stats.requests, batch.len() as u64);
            }
            let replies = if batch.len() > 1 && self.responder.awaits_on_event_loop() {
                // Async handlers of pipelined requests run concurrently; join_all keeps order.
                join_all(
                    batch
                        .iter()
                        .map(|frame| self.responder.respond_json(&frame.payload)),
                )
                .await
            } else {
                let mut replies = Vec::with_capacity(batch.len());
                for frame in &batch {
                    replies.push(self.responder.respond_json(&frame.payload).await);
                }
                replies
            };
            for reply in replies {
                let (json, is_error) = match reply {
                    Ok(json) => (json, false),
                    Err(failure) => (Bytes::from(self.exchange_failed(failure, peer)), true),
                };
                if codec::put_reply(&json, is_error, &mut output).is_err() {
                    let reply = error_reply("encode", "reply is too large for a frame");
                    codec::put_reply(&reply, true, &mut output)?;
                }
            }
            if let Some(err) = refused {
                // The stream cannot be resynchronised after a refused header: say why, close.
                let reply = error_reply("frame_too_large", &err.to_string());
                codec::put_reply(&reply, true, &mut output)?;
                let _ = stream.write_all(&output).await;
                return Err(err.into());
            }
            if !output.is_empty() {
                within(
                    self.limits.timeout,
                    || format!("sending replies to {peer}"),
                    async {
                        stream
                            .write_all(&output)
                            .await
                            .map_err(|e| WireError::Io(e).into())
                    },
                )
                .await?;
                bump(&self.stats.bytes_out, output.len() as u64);
                output.clear();
            }
            if batch.len() == MAX_BATCH {
                continue; // more requests may be buffered already
            }
            if input.is_empty() {
                match self
                    .await_request(stream, &mut input, stop, self.limits.idle_timeout)
                    .await?
                {
                    Some(n) => bump(&self.stats.bytes_in, n as u64),
                    None => return Ok(()),
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
            let read = tokio::time::timeout_at(deadline, stream.read_buf(&mut input)).await;
            match read {
                Err(_elapsed) => {
                    return Err(Error::Timeout(format!(
                        "timed out after {} s waiting for the rest of a request from {peer}",
                        self.limits.timeout.map_or(0.0, |t| t.as_secs_f64())
                    )))
                }
                Ok(Ok(0)) => {
                    codec.decode_eof(&mut input)?;
                    return Ok(());
                }
                Ok(Ok(n)) => bump(&self.stats.bytes_in, n as u64),
                Ok(Err(err)) => return Err(WireError::Io(err).into()),
            }
        }
    }
}

/// The payload of a framed error reply: `{"error": kind, "message": text}`.
pub fn error_reply(kind: &str, message: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "error": kind, "message": message }))
        .expect("a map of two strings always serialises")
}

/// Accepts connections until `stop` is cancelled, at most `max_connections` at a time; each is
/// served in its own task, which `abort` ends outright once the shutdown grace is over.
pub async fn accept_loop(
    service: Arc<Service>,
    listener: Listener,
    max_connections: usize,
    stop: CancellationToken,
    abort: CancellationToken,
    tracker: TaskTracker,
) {
    let slots = Arc::new(Semaphore::new(max_connections));
    loop {
        let slot = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
        };
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let service = service.clone();
                let stop = stop.clone();
                let abort = abort.clone();
                tracker.spawn(async move {
                    let _slot = slot;
                    tokio::select! {
                        _ = abort.cancelled() => {}
                        _ = service.serve_connection(stream, peer, stop) => {}
                    }
                });
            }
            Err(err) => {
                // E.g. out of file descriptors: wait a little rather than spin on the error.
                bump(&service.stats.errors.io, 1);
                log("warning", format!("accept failed: {err}"), None);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
