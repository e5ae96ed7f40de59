//! framesock.aio's engine: the same client and server for asyncio programs.
//!
//! Every network wait runs on the tokio runtime and each call hands asyncio a future that
//! completes on the event loop, so the loop never blocks on the network. Client results come
//! back through the loop's [`LoopBridge`]; the server's lifecycle calls and `start_server` use
//! pyo3-async-runtimes' awaitables. Cancelling a classic request or a lifecycle call drops its
//! Rust side; a cancelled framed request is still written whole and its reply dropped, so the
//! shared connection stays in step.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyList;
use tokio::time::Instant;

use crate::bridge::{Job, LoopBridge};
use crate::client::{classic_exchange, message_payload, put_request, reply_value, ClientConfig};
use crate::codec::{self, Frame, FrameCodec, WireError};
use crate::errors::{Error, Result};
use crate::json;
use crate::net::{self, Endpoint, ReadPart, WritePart};
use crate::runtime::{self, within};
use crate::server::one_shot_server;
use crate::service::Protocol;

/// Hands `fut` to asyncio as an awaitable, on framesock's runtime.
pub fn awaitable<'py, F, T>(py: Python<'py>, fut: F) -> PyResult<Bound<'py, PyAny>>
where
    F: std::future::Future<Output = PyResult<T>> + Send + 'static,
    T: for<'a> IntoPyObject<'a> + Send + 'static,
{
    // pyo3-async-runtimes spawns on our runtime, not one of its own.
    let _ = pyo3_async_runtimes::tokio::init_with_runtime(runtime::runtime());
    pyo3_async_runtimes::tokio::future_into_py(py, fut)
}

/// Reply frames, decoded on the event loop's thread (the GIL is held there anyway).
struct Replies {
    frames: Vec<Frame>,
    /// `request` gives a value, `request_many` a list.
    one: bool,
}

impl<'py> IntoPyObject<'py> for Replies {
    type Target = PyAny;
    type Output = Bound<'py, PyAny>;
    type Error = PyErr;

    fn into_pyobject(self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let values = self
            .frames
            .iter()
            .map(|frame| reply_value(py, frame))
            .collect::<PyResult<Vec<_>>>()?;
        if self.one {
            return Ok(values.into_iter().next().expect("one reply"));
        }
        Ok(PyList::new(py, values)?.into_any())
    }
}

/// A request waiting for its replies: the asyncio future to complete, and the loop it is on.
struct Target {
    future: Py<PyAny>,
    bridge: Arc<LoopBridge>,
    wanted: usize,
    frames: Vec<Frame>,
    /// `request` resolves to a value, `request_many` to a list.
    one: bool,
    queued_at: Instant,
}

impl Target {
    /// Completes the future (on its loop, where the replies are decoded).
    fn resolve(self, outcome: Result<Vec<Frame>>) {
        let Target {
            future,
            bridge,
            one,
            ..
        } = self;
        bridge.push(Job::Resolve {
            future,
            outcome: Box::new(move |py| match outcome {
                Ok(frames) => Ok(Replies { frames, one }.into_pyobject(py)?.unbind()),
                Err(err) => Err(err.into()),
            }),
        });
    }
}

/// What a framed connection of an asyncio client holds between calls.
#[derive(Default)]
struct ConnState {
    /// Requests written (or queued to be), oldest first: replies come back in this order.
    targets: VecDeque<Target>,
    /// Bytes the socket would not take yet, written by a flush task in order.
    backlog: VecDeque<Bytes>,
    flushing: bool,
    failed: Option<Arc<Error>>,
}

/// A framed connection shared by every request of one asyncio client.
///
/// Requests are written straight from the event loop's thread (`try_write` never waits) unless
/// earlier bytes are still queued, and one reader task hands the replies out in order. So a
/// request costs no hand-off to another thread on its way out, many can be in flight, and a
/// cancelled request never leaves half a frame behind: its reply is read and dropped.
struct Conn {
    write: WritePart,
    state: Mutex<ConnState>,
    reader: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Conn {
    /// Queues `target` for the replies and writes `frames`.
    fn send(self: &Arc<Self>, frames: Bytes, target: Target) {
        let mut state = self.state.lock().expect("connection lock");
        if let Some(failure) = &state.failed {
            let failure = failure.duplicate();
            drop(state);
            return target.resolve(Err(failure));
        }
        state.targets.push_back(target);
        if state.flushing {
            state.backlog.push_back(frames);
            return;
        }
        let written = match self.write.try_write(&frames) {
            Ok(written) => written,
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => 0,
            Err(err) => {
                drop(state);
                return self.fail(WireError::Io(err).into());
            }
        };
        if written < frames.len() {
            state.backlog.push_back(frames.slice(written..));
            state.flushing = true;
            runtime::runtime().spawn(self.clone().flush());
        }
    }

    /// Writes the backlog as the socket takes it.
    async fn flush(self: Arc<Self>) {
        loop {
            let chunk = {
                let mut state = self.state.lock().expect("connection lock");
                match state.backlog.front() {
                    _ if state.failed.is_some() => return,
                    Some(chunk) => chunk.clone(),
                    None => {
                        state.flushing = false;
                        return;
                    }
                }
            };
            let written = match self
                .write
                .writable()
                .await
                .and_then(|()| self.write.try_write(&chunk))
            {
                Ok(written) => written,
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(err) => return self.fail(WireError::Io(err).into()),
            };
            let mut state = self.state.lock().expect("connection lock");
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
        let failure = Arc::new(failure);
        let targets = {
            let mut state = self.state.lock().expect("connection lock");
            if state.failed.is_some() {
                return;
            }
            state.failed = Some(failure.clone());
            state.backlog.clear();
            std::mem::take(&mut state.targets)
        };
        for target in targets {
            target.resolve(Err(failure.duplicate()));
        }
        if let Some(reader) = self.reader.lock().expect("reader lock").take() {
            reader.abort();
        }
    }

    fn is_failed(&self) -> bool {
        self.state.lock().expect("connection lock").failed.is_some()
    }
}

/// Reads replies and completes the oldest request with them; `timeout` bounds the wait for
/// each reply while requests are waiting.
async fn read_replies(conn: Arc<Conn>, mut read: ReadPart, shared: Arc<Shared>) {
    let mut input = BytesMut::new();
    let mut codec = FrameCodec::replies(shared.max_reply);
    let mut last_reply = Instant::now();
    let failure = loop {
        // While idle, wake every `timeout` anyway to look at requests queued since.
        let due = shared.timeout.map(|limit| {
            let state = conn.state.lock().expect("connection lock");
            match state.targets.front() {
                Some(front) => front.queued_at.max(last_reply) + limit,
                None => Instant::now() + limit,
            }
        });
        let frame = tokio::select! {
            frame = codec::read_frame(&mut read, &mut input, &mut codec) => frame,
            () = sleep_until(due) => {
                let state = conn.state.lock().expect("connection lock");
                let overdue = state.targets.front().is_some_and(|front| {
                    Instant::now() >= front.queued_at.max(last_reply) + shared.timeout.unwrap_or_default()
                });
                if overdue {
                    break Error::Timeout(format!(
                        "timed out after {} s waiting for a reply from {}",
                        shared.timeout.unwrap_or_default().as_secs_f64(),
                        shared.endpoint
                    ));
                }
                continue;
            }
        };
        last_reply = Instant::now();
        match frame {
            Ok(Some(frame)) => {
                let mut state = conn.state.lock().expect("connection lock");
                let Some(front) = state.targets.front_mut() else {
                    break Error::Wire(WireError::Io(std::io::Error::other(
                        "the server sent a reply nobody asked for",
                    )));
                };
                front.frames.push(frame);
                if front.frames.len() == front.wanted {
                    let mut done = state.targets.pop_front().expect("front exists");
                    drop(state);
                    let frames = std::mem::take(&mut done.frames);
                    done.resolve(Ok(frames));
                }
            }
            Ok(None) => break Error::Wire(WireError::ClosedBeforeMessage),
            Err(err) => break err.into(),
        }
    };
    conn.fail(failure);
}

/// Sleeps until `due`, or forever without one.
async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

/// The framed connection of an asyncio client, as far as it has got.
#[derive(Default)]
enum Slot {
    #[default]
    Empty,
    /// Connecting; these requests go out once connected.
    Connecting(Vec<(Bytes, Target)>),
    Ready(Arc<Conn>),
}

/// What every request of an asyncio client shares.
struct Shared {
    endpoint: Endpoint,
    timeout: Option<Duration>,
    max_reply: usize,
    slot: Mutex<Slot>,
}

impl Shared {
    /// Sends a request on the connection, connecting first (in the background) if needed.
    fn send(self: &Arc<Self>, frames: Bytes, target: Target) {
        let mut slot = self.slot.lock().expect("slot lock");
        match &mut *slot {
            Slot::Ready(conn) if !conn.is_failed() => {
                let conn = conn.clone();
                drop(slot);
                conn.send(frames, target);
            }
            Slot::Connecting(queued) => queued.push((frames, target)),
            _ => {
                *slot = Slot::Connecting(vec![(frames, target)]);
                runtime::runtime().spawn(self.clone().connect());
            }
        }
    }

    async fn connect(self: Arc<Self>) {
        let connected = within(
            self.timeout,
            || format!("connecting to {}", self.endpoint),
            net::connect(&self.endpoint),
        )
        .await;
        // Taking the queue and installing the connection happen under one lock, so a request
        // made meanwhile is either in the queue or sent on the new connection, never lost.
        let mut slot = self.slot.lock().expect("slot lock");
        let queued = match std::mem::take(&mut *slot) {
            Slot::Connecting(queued) => queued,
            // Closed meanwhile (its requests were failed then): the new socket just closes.
            _ => return,
        };
        let stream = match connected {
            Ok(stream) => stream,
            Err(failure) => {
                drop(slot);
                for (_, target) in queued {
                    target.resolve(Err(failure.duplicate()));
                }
                return;
            }
        };
        let (read, write) = stream.into_split();
        let conn = Arc::new(Conn {
            write,
            state: Mutex::default(),
            reader: Mutex::new(None),
        });
        let reader = runtime::runtime().spawn(read_replies(conn.clone(), read, self.clone()));
        *conn.reader.lock().expect("reader lock") = Some(reader.abort_handle());
        *slot = Slot::Ready(conn.clone());
        // In the order they were made, before any request that comes after.
        for (frames, target) in queued {
            conn.send(frames, target);
        }
    }

    /// Drops the connection; waiting requests fail as aborted.
    fn close(&self) {
        let closed = || {
            Error::Wire(WireError::Io(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "the client was closed",
            )))
        };
        match std::mem::take(&mut *self.slot.lock().expect("slot lock")) {
            Slot::Ready(conn) => conn.fail(closed()),
            Slot::Connecting(queued) => {
                for (_, target) in queued {
                    target.resolve(Err(closed()));
                }
            }
            Slot::Empty => {}
        }
    }
}

/// The engine of `framesock.aio.Client`.
///
/// Each call returns an asyncio future made on the running loop; the exchange runs as a tokio
/// task and its replies come back through the loop's [`LoopBridge`], where they are decoded
/// (the GIL is held there anyway). Cancelling the future aborts the task.
#[pyclass(frozen, module = "framesock._framesock", name = "AsyncClient")]
pub struct AsyncClient {
    protocol: Protocol,
    shared: Arc<Shared>,
    closed: AtomicBool,
    bridge: Mutex<Option<Arc<LoopBridge>>>,
}

impl AsyncClient {
    fn check_open(&self) -> PyResult<()> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(PyValueError::new_err("the client is closed"));
        }
        Ok(())
    }

    /// The bridge to the running loop (a client used from a new loop gets a new one).
    fn bridge(&self, py: Python<'_>) -> PyResult<Arc<LoopBridge>> {
        static GET_RUNNING_LOOP: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
        let running = GET_RUNNING_LOOP
            .import(py, "asyncio", "get_running_loop")?
            .call0()?;
        let mut slot = self.bridge.lock().expect("bridge lock");
        if let Some(bridge) = slot.as_ref() {
            if bridge.event_loop(py).is(&running) {
                return Ok(bridge.clone());
            }
            bridge.push(Job::Close);
        }
        let bridge = LoopBridge::new(&running)?;
        *slot = Some(bridge.clone());
        Ok(bridge)
    }

    /// Runs `work` on the runtime and returns an asyncio future for `finish(result)`.
    fn submit<'py, W, T>(
        &self,
        py: Python<'py>,
        work: W,
        finish: fn(Python<'_>, T) -> PyResult<Py<PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>>
    where
        W: std::future::Future<Output = Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        let bridge = self.bridge(py)?;
        let future = bridge
            .event_loop(py)
            .call_method0(pyo3::intern!(py, "create_future"))?;
        let target = future.clone().unbind();
        let task = runtime::runtime().spawn(async move {
            let outcome = work.await;
            bridge.push(Job::Resolve {
                future: target,
                outcome: Box::new(move |py| match outcome {
                    Ok(value) => finish(py, value),
                    Err(err) => Err(err.into()),
                }),
            });
        });
        let abort = AbortIfCancelled {
            task: task.abort_handle(),
        };
        future.call_method1(pyo3::intern!(py, "add_done_callback"), (abort,))?;
        Ok(future)
    }

    /// Sends encoded request frames on the shared connection; returns the future for the
    /// replies (a value if `one`, else a list).
    fn framed<'py>(
        &self,
        py: Python<'py>,
        frames: Bytes,
        wanted: usize,
        one: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let bridge = self.bridge(py)?;
        let future = bridge
            .event_loop(py)
            .call_method0(pyo3::intern!(py, "create_future"))?;
        let target = Target {
            future: future.clone().unbind(),
            bridge,
            wanted,
            frames: Vec::with_capacity(wanted.min(1024)),
            one,
            queued_at: Instant::now(),
        };
        self.shared.send(frames, target);
        Ok(future)
    }

    fn classic<'py>(
        &self,
        py: Python<'py>,
        message: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let frame = codec::encode_frame(&message_payload(message)?).map_err(Error::from)?;
        let shared = self.shared.clone();
        let work = async move {
            classic_exchange(&shared.endpoint, &frame, shared.timeout, shared.max_reply).await
        };
        self.submit(py, work, |py, reply| Ok(json::loads(py, &reply)?.unbind()))
    }
}

/// A future's done-callback that aborts its tokio task if the future was cancelled.
#[pyclass(frozen)]
struct AbortIfCancelled {
    task: tokio::task::AbortHandle,
}

#[pymethods]
impl AbortIfCancelled {
    fn __call__(&self, future: &Bound<'_, PyAny>) -> PyResult<()> {
        if future.call_method0("cancelled")?.is_truthy()? {
            self.task.abort();
        }
        Ok(())
    }
}

#[pymethods]
impl AsyncClient {
    #[new]
    #[pyo3(signature = (host, port, path, protocol, timeout, max_reply))]
    fn new(
        host: String,
        port: i64,
        path: Option<PathBuf>,
        protocol: String,
        timeout: Option<f64>,
        max_reply: i64,
    ) -> PyResult<Self> {
        let ClientConfig {
            endpoint,
            protocol,
            timeout,
            max_reply,
        } = ClientConfig::new(host, port, path, &protocol, timeout, max_reply)?;
        Ok(AsyncClient {
            protocol,
            shared: Arc::new(Shared {
                endpoint,
                timeout,
                max_reply,
                slot: Mutex::default(),
            }),
            closed: AtomicBool::new(false),
            bridge: Mutex::new(None),
        })
    }

    /// An awaitable for the reply to one message.
    fn request<'py>(
        &self,
        py: Python<'py>,
        message: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.check_open()?;
        if self.protocol == Protocol::Classic {
            return self.classic(py, message);
        }
        let mut frames = BytesMut::new();
        put_request(message, &mut frames)?;
        self.framed(py, frames.freeze(), 1, true)
    }

    /// An awaitable for the replies to every message (framed: pipelined on one connection).
    fn request_many<'py>(
        &self,
        py: Python<'py>,
        messages: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.check_open()?;
        let messages: Vec<Bound<'py, PyAny>> = messages.try_iter()?.collect::<PyResult<_>>()?;
        if self.protocol == Protocol::Classic {
            let frames = messages
                .iter()
                .map(|m| {
                    codec::encode_frame(&message_payload(m)?).map_err(|e| Error::from(e).into())
                })
                .collect::<PyResult<Vec<Bytes>>>()?;
            let shared = self.shared.clone();
            let work = async move {
                let mut replies = Vec::with_capacity(frames.len());
                for frame in frames {
                    replies.push(
                        classic_exchange(
                            &shared.endpoint,
                            &frame,
                            shared.timeout,
                            shared.max_reply,
                        )
                        .await?,
                    );
                }
                Ok(replies)
            };
            return self.submit(py, work, |py, replies| {
                let values = replies
                    .iter()
                    .map(|reply| json::loads(py, reply))
                    .collect::<PyResult<Vec<_>>>()?;
                Ok(PyList::new(py, values)?.into_any().unbind())
            });
        }
        let mut frames = BytesMut::new();
        for message in &messages {
            put_request(message, &mut frames)?;
        }
        if messages.is_empty() {
            let future = self
                .bridge(py)?
                .event_loop(py)
                .call_method0("create_future")?;
            future.call_method1("set_result", (PyList::empty(py),))?;
            return Ok(future);
        }
        self.framed(py, frames.freeze(), messages.len(), false)
    }

    /// Closes the connection; requests still waiting fail, later ones raise ValueError.
    fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        if let Some(bridge) = self.bridge.lock().expect("bridge lock").take() {
            bridge.push(Job::Close);
        }
        self.shared.close();
    }
}

/// `framesock.aio.start_server`'s engine: the one exchange of `start_server`, as an awaitable.
/// A handler may be a coroutine function (it runs on the caller's event loop); `ready` is
/// called on the event loop.
#[pyfunction]
#[pyo3(signature = (host, port, response, handler, timeout, max_frame, backlog, request_as, ready, path))]
#[allow(clippy::too_many_arguments)]
pub fn start_server_async<'py>(
    py: Python<'py>,
    host: String,
    port: i64,
    response: Option<Bound<'py, PyAny>>,
    handler: Option<Bound<'py, PyAny>>,
    timeout: Option<f64>,
    max_frame: i64,
    backlog: i64,
    request_as: String,
    ready: Option<Bound<'py, PyAny>>,
    path: Option<PathBuf>,
) -> PyResult<Bound<'py, PyAny>> {
    let locals = pyo3_async_runtimes::tokio::get_current_locals(py)?;
    // `ready` runs on the event loop, not on the I/O thread that learns the address.
    let ready: Option<Bound<'py, PyAny>> = match ready {
        Some(ready) => {
            let event_loop = locals.event_loop(py);
            let call_soon = event_loop.getattr("call_soon_threadsafe")?;
            Some(
                PyCallSoon {
                    call_soon: call_soon.unbind(),
                    target: ready.unbind(),
                }
                .into_pyobject(py)?
                .into_any(),
            )
        }
        None => None,
    };
    let server = one_shot_server(
        py,
        host,
        port,
        path,
        response,
        handler,
        timeout,
        max_frame,
        backlog,
        &request_as,
    )?;
    server._use_event_loop(py)?;
    awaitable(py, server.serve_one(ready.map(Bound::unbind))?)
}

/// `call_soon(target, *args)`: runs `target` on the event loop.
#[pyclass]
struct PyCallSoon {
    call_soon: Py<PyAny>,
    target: Py<PyAny>,
}

#[pymethods]
impl PyCallSoon {
    #[pyo3(signature = (*args))]
    fn __call__(&self, py: Python<'_>, args: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<()> {
        let mut all = vec![self.target.bind(py).clone()];
        all.extend(args.iter());
        self.call_soon
            .bind(py)
            .call1(pyo3::types::PyTuple::new(py, all)?)?;
        Ok(())
    }
}
