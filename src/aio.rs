//! framesock.aio's engine: the same client and server for asyncio programs.
//!
//! Every network wait runs on the tokio runtime; a call hands asyncio a future (through
//! pyo3-async-runtimes) that completes on the event loop, so the loop never blocks on the
//! network. Cancelling that future drops the Rust side, which closes what it must.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyList;
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::oneshot;

use crate::args;
use crate::bridge::{Job, LoopBridge};
use crate::client::{classic_exchange, message_payload, put_request};
use crate::codec::{self, Frame, FrameCodec, WireError};
use crate::errors::{self, Error, Result};
use crate::json;
use crate::net::{self, Endpoint, Stream};
use crate::runtime::{self, within};
use crate::server::{endpoint, OneShot};
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
        let mut values = Vec::with_capacity(self.frames.len());
        for frame in &self.frames {
            if frame.is_error {
                return Err(errors::remote_error(py, &frame.payload));
            }
            values.push(json::loads(py, &frame.payload)?);
        }
        if self.one {
            return Ok(values.pop().expect("one reply"));
        }
        Ok(PyList::new(py, values)?.into_any())
    }
}

type ReplySender = oneshot::Sender<std::result::Result<Frame, Arc<Error>>>;

/// Who waits for the next replies, in the order their requests were written.
#[derive(Default)]
struct Waiters {
    queue: VecDeque<ReplySender>,
    /// Set when the connection has failed; later requests must not wait on it.
    failed: Option<Arc<Error>>,
}

/// A framed connection shared by every request of one client: requests are written in turn and
/// their replies, read by one task, are handed out in order. Many requests can be in flight.
struct Pipeline {
    id: u64,
    writer: WriteHalf<Stream>,
    waiters: Arc<Mutex<Waiters>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        // Ends the reader; the waiters it held are dropped and so learn the connection is gone.
        self.reader.abort();
    }
}

/// Reads replies and gives each to the oldest waiter; on failure tells every waiter.
async fn hand_out_replies(
    mut reader: ReadHalf<Stream>,
    waiters: Arc<Mutex<Waiters>>,
    max_reply: usize,
) {
    let mut input = BytesMut::new();
    let mut codec = FrameCodec::replies(max_reply);
    let failure = loop {
        match codec::read_frame(&mut reader, &mut input, &mut codec).await {
            Ok(Some(frame)) => {
                let waiter = waiters.lock().expect("waiters lock").queue.pop_front();
                match waiter {
                    // A waiter that was cancelled has gone; its reply is simply dropped.
                    Some(waiter) => drop(waiter.send(Ok(frame))),
                    None => {
                        break Error::Wire(WireError::Io(std::io::Error::other(
                            "the server sent a reply nobody asked for",
                        )))
                    }
                }
            }
            Ok(None) => break Error::Wire(WireError::ClosedBeforeMessage),
            Err(err) => break err.into(),
        }
    };
    let failure = Arc::new(failure);
    let mut waiters = waiters.lock().expect("waiters lock");
    waiters.failed = Some(failure.clone());
    for waiter in waiters.queue.drain(..) {
        let _ = waiter.send(Err(failure.clone()));
    }
}

/// Clears the connection slot if dropped while armed: a write cut short (cancelled or failed)
/// leaves half a frame on the wire, so that connection cannot be used again.
struct ResetUnlessDone<'a> {
    slot: &'a mut Option<Pipeline>,
    armed: bool,
}

impl Drop for ResetUnlessDone<'_> {
    fn drop(&mut self) {
        if self.armed {
            *self.slot = None;
        }
    }
}

/// What every request of an asyncio client shares.
struct Shared {
    endpoint: Endpoint,
    timeout: Option<Duration>,
    max_reply: usize,
    pipeline: tokio::sync::Mutex<Option<Pipeline>>,
    next_id: AtomicU64,
}

impl Shared {
    async fn connect(&self) -> Result<Pipeline> {
        let stream = within(
            self.timeout,
            || format!("connecting to {}", self.endpoint),
            net::connect(&self.endpoint),
        )
        .await?;
        let (reader, writer) = tokio::io::split(stream);
        let waiters = Arc::new(Mutex::new(Waiters::default()));
        let reader =
            runtime::runtime().spawn(hand_out_replies(reader, waiters.clone(), self.max_reply));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        Ok(Pipeline {
            id,
            writer,
            waiters,
            reader,
        })
    }

    /// Writes `count` encoded request frames and waits for their replies.
    async fn exchange(&self, frames: Bytes, count: usize) -> Result<Vec<Frame>> {
        let (receivers, id) = {
            let mut slot = self.pipeline.lock().await;
            let failed = slot
                .as_ref()
                .is_some_and(|p| p.waiters.lock().expect("waiters lock").failed.is_some());
            if slot.is_none() || failed {
                *slot = Some(self.connect().await?);
            }
            let pipeline = slot.as_mut().expect("connected above");
            let id = pipeline.id;
            let receivers = {
                let mut waiters = pipeline.waiters.lock().expect("waiters lock");
                if let Some(failure) = &waiters.failed {
                    return Err(failure.duplicate());
                }
                (0..count)
                    .map(|_| {
                        let (sender, receiver) = oneshot::channel();
                        waiters.queue.push_back(sender);
                        receiver
                    })
                    .collect::<Vec<_>>()
            };
            let mut guard = ResetUnlessDone {
                slot: &mut slot,
                armed: true,
            };
            let pipeline = guard.slot.as_mut().expect("connected above");
            pipeline
                .writer
                .write_all(&frames)
                .await
                .map_err(WireError::Io)?;
            guard.armed = false;
            (receivers, id)
        };
        let mut replies = Vec::with_capacity(count);
        for receiver in receivers {
            let reply = match self.timeout {
                Some(limit) => match tokio::time::timeout(limit, receiver).await {
                    Ok(reply) => reply,
                    Err(_elapsed) => {
                        self.reset(id).await;
                        return Err(Error::Timeout(format!(
                            "timed out after {} s waiting for a reply from {}",
                            limit.as_secs_f64(),
                            self.endpoint
                        )));
                    }
                },
                None => receiver.await,
            };
            match reply {
                Ok(Ok(frame)) => replies.push(frame),
                Ok(Err(failure)) => return Err(failure.duplicate()),
                Err(_dropped) => return Err(Error::Wire(WireError::ClosedBeforeMessage)),
            }
        }
        Ok(replies)
    }

    /// Drops connection `id` if it is still the current one (a stuck server: start afresh).
    async fn reset(&self, id: u64) {
        let mut slot = self.pipeline.lock().await;
        if slot.as_ref().is_some_and(|p| p.id == id) {
            *slot = None;
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
        Ok(AsyncClient {
            protocol: Protocol::parse(&protocol)?,
            shared: Arc::new(Shared {
                endpoint: endpoint(host, port, path)?,
                timeout: args::timeout("timeout", timeout)?,
                max_reply: args::byte_limit("max_reply", max_reply)?,
                pipeline: tokio::sync::Mutex::new(None),
                next_id: AtomicU64::new(0),
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
        let shared = self.shared.clone();
        let work = async move { shared.exchange(frames.freeze(), 1).await };
        self.submit(py, work, |py, frames| {
            Ok(Replies { frames, one: true }.into_pyobject(py)?.unbind())
        })
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
        let count = messages.len();
        let shared = self.shared.clone();
        let work = async move {
            if count == 0 {
                return Ok(Vec::new());
            }
            shared.exchange(frames.freeze(), count).await
        };
        self.submit(py, work, |py, frames| {
            Ok(Replies { frames, one: false }.into_pyobject(py)?.unbind())
        })
    }

    /// Closes the connection; requests still waiting fail, later ones raise ValueError.
    fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        if let Some(bridge) = self.bridge.lock().expect("bridge lock").take() {
            bridge.push(Job::Close);
        }
        let shared = self.shared.clone();
        // The lock may be held by a request mid-write; let that finish, then drop the connection.
        runtime::runtime().spawn(async move {
            shared.pipeline.lock().await.take();
        });
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
    let ready = match ready {
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
    let one_shot = OneShot::new(
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
        ready,
    )?;
    one_shot.responder.use_running_loop(py)?;
    awaitable(py, one_shot.serve())
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
