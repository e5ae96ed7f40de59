//! framesock.aio's engine: the same client and server for asyncio programs.
//!
//! Every network wait runs on the engine's runtime and each call hands asyncio a future that
//! completes on the event loop (through the loop's [`LoopBridge`]), so the loop never blocks
//! on the network. Cancelling a classic request aborts it; a cancelled framed request is still
//! written whole and its reply dropped, so the shared connection stays in step.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::py::named;
use pyo3::types::PyList;

use crate::engine::client::classic_exchange;
use crate::engine::codec::{self, Frame};
use crate::engine::error::{Error, Result};
use crate::engine::lock::locked;
use crate::engine::pipeline::Pipeline;
use crate::engine::runtime;
use crate::engine::serve::Protocol;
use crate::py::args::Int;
use crate::py::bridge::{resolve, LoopBridge};
use crate::py::cached::interned;
use crate::py::client::{message_payload, put_request, reply_value, ClientConfig};
use crate::py::gil::{self, GilDrop};
use crate::py::json;
use crate::py::loop_reads;
use crate::py::server::one_shot_server;

/// Reply frames as Python values: one value, or a list for `request_many`.
fn replies_object(py: Python<'_>, frames: &[Frame], one: bool) -> PyResult<Py<PyAny>> {
    let values = frames
        .iter()
        .map(|frame| reply_value(py, frame))
        .collect::<PyResult<Vec<_>>>()?;
    if one {
        return Ok(values.into_iter().next().expect("one reply").unbind());
    }
    Ok(PyList::new(py, values)?.into_any().unbind())
}

/// The engine of `framesock.aio.Client`.
#[pyclass(frozen, module = "framesock._framesock", name = "AsyncClient")]
pub struct AsyncClient {
    /// The server, as `repr()` shows it.
    described: String,
    protocol: Protocol,
    pipeline: Arc<Pipeline>,
    timeout: Option<Duration>,
    max_reply: usize,
    closed: AtomicBool,
    /// The loop whose end was last asked to close the connection (and which reads it).
    watched: Arc<Mutex<Weak<LoopBridge>>>,
    /// The engine generation it was made in: after a fork the connection belongs to the
    /// parent's runtime and is left alone (like `serve::Server::is_inherited`).
    generation: u64,
}

impl AsyncClient {
    fn check_open(&self) -> PyResult<()> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(PyValueError::new_err("the client is closed"));
        }
        if self.is_inherited() {
            return Err(pyo3::exceptions::PyRuntimeError::new_err(
                "this client was made before os.fork(); make a new one in this process",
            ));
        }
        Ok(())
    }

    fn is_inherited(&self) -> bool {
        self.generation != runtime::generation()
    }

    /// The running loop's bridge; the connection closes when that loop is torn down.
    fn bridge(&self, py: Python<'_>) -> PyResult<Arc<LoopBridge>> {
        let bridge = LoopBridge::for_running_loop(py)?;
        let mut watched = locked(&self.watched);
        if !std::ptr::eq(watched.as_ptr(), Arc::as_ptr(&bridge)) {
            *watched = Arc::downgrade(&bridge);
            let pipeline = Arc::downgrade(&self.pipeline);
            bridge.on_loop_end(Box::new(move || {
                if let Some(pipeline) = pipeline.upgrade() {
                    pipeline.close("the event loop of this client has closed");
                }
            }));
        }
        Ok(bridge)
    }

    /// Sends encoded request frames on the shared connection; returns the future for the
    /// replies (a value if `one`, else a list).
    fn framed<'py>(
        &self,
        py: Python<'py>,
        frames: Bytes,
        count: usize,
        one: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let bridge = self.bridge(py)?;
        let future = bridge
            .event_loop(py)
            .call_method0(interned!(py, "create_future"))?;
        let target = GilDrop::new(future.clone().unbind());
        let loop_side = bridge.clone();
        self.pipeline.send(
            &runtime::handle(),
            frames,
            count,
            Box::new(move |outcome: Result<Vec<Frame>>| {
                loop_side.push(Box::new(move |py| {
                    let value = outcome
                        .map_err(PyErr::from)
                        .and_then(|frames| replies_object(py, &frames, one));
                    resolve(py, target.bind(py), value);
                }));
            }),
        );
        Ok(future)
    }

    /// Classic exchanges, one connection each, one after the other.
    fn classic<'py>(
        &self,
        py: Python<'py>,
        frames: Vec<Bytes>,
        one: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let endpoint = self.pipeline.endpoint().clone();
        let tls = self.pipeline.tls().cloned();
        let (timeout, max_reply) = (self.timeout, self.max_reply);
        let work = async move {
            let mut replies = Vec::with_capacity(frames.len());
            for frame in frames {
                replies.push(
                    classic_exchange(&endpoint, tls.as_ref(), &frame, timeout, max_reply).await?,
                );
            }
            Ok(replies)
        };
        self.bridge(py)?
            .spawn(py, work, move |py, replies: Vec<Vec<u8>>| {
                let values = replies
                    .iter()
                    .map(|reply| json::loads(py, reply))
                    .collect::<PyResult<Vec<_>>>()?;
                if one {
                    return Ok(values.into_iter().next().expect("one reply").unbind());
                }
                Ok(PyList::new(py, values)?.into_any().unbind())
            })
    }
}

#[pymethods]
impl AsyncClient {
    #[new]
    #[pyo3(signature = (host, port, path, protocol, timeout, max_reply, tls = None))]
    fn new(
        #[pyo3(from_py_with = named::host_or_none)] host: Option<String>,
        #[pyo3(from_py_with = named::port_or_none)] port: Option<Int>,
        #[pyo3(from_py_with = named::path)] path: Option<PathBuf>,
        #[pyo3(from_py_with = named::protocol)] protocol: String,
        #[pyo3(from_py_with = named::timeout)] timeout: Option<f64>,
        #[pyo3(from_py_with = named::max_reply)] max_reply: Int,
        #[pyo3(from_py_with = named::client_tls)] tls: Option<PyRef<'_, crate::py::tls::ClientTls>>,
    ) -> PyResult<Self> {
        let ClientConfig {
            endpoint,
            protocol,
            timeout,
            max_reply,
        } = ClientConfig::new(host, port, path, &protocol, timeout, max_reply)?;
        let watched = Arc::new(Mutex::new(Weak::new()));
        Ok(AsyncClient {
            described: format!("{endpoint} protocol='{protocol}'"),
            protocol,
            pipeline: Pipeline::new(
                endpoint,
                tls.map(|tls| tls.settings.clone()),
                timeout,
                max_reply,
                Some(loop_reads::on_the_loop(watched.clone())),
            ),
            timeout,
            max_reply,
            closed: AtomicBool::new(false),
            watched,
            generation: runtime::generation(),
        })
    }

    /// An awaitable for the reply to one message.
    fn request<'py>(
        &self,
        py: Python<'py>,
        message: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.check_open()?;
        // Encoding and `loop.create_future()` run Python code, which may let the GIL go: held,
        // so the exit waits for this frame (a loop in a daemon thread was ended inside it as the
        // interpreter finalized: "FATAL: exception not rethrown", once in 40 runs on 3.9).
        let _calling = gil::calling_python_or_raise()?;
        if self.protocol == Protocol::Classic {
            let frame = codec::encode_frame(&message_payload(message)?).map_err(Error::from)?;
            return self.classic(py, vec![frame], true);
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
        let _calling = gil::calling_python_or_raise()?; // as in `request`
        let messages: Vec<Bound<'py, PyAny>> = messages.try_iter()?.collect::<PyResult<_>>()?;
        if self.protocol == Protocol::Classic {
            let frames = messages
                .iter()
                .map(|m| {
                    codec::encode_frame(&message_payload(m)?).map_err(|e| Error::from(e).into())
                })
                .collect::<PyResult<Vec<Bytes>>>()?;
            return self.classic(py, frames, false);
        }
        if messages.is_empty() {
            let future = self
                .bridge(py)?
                .event_loop(py)
                .call_method0("create_future")?;
            future.call_method1("set_result", (PyList::empty(py),))?;
            return Ok(future);
        }
        let mut frames = BytesMut::new();
        for message in &messages {
            put_request(message, &mut frames)?;
        }
        self.framed(py, frames.freeze(), messages.len(), false)
    }

    /// Closes the connection; requests still waiting fail, later ones raise ValueError.
    fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        if !self.is_inherited() {
            self.pipeline.close("the client was closed");
        }
    }

    fn __repr__(&self) -> String {
        let closed = if self.closed.load(Ordering::Relaxed) {
            " closed"
        } else {
            ""
        };
        format!("<framesock.AsyncClient {}{closed}>", self.described)
    }
}

impl Drop for AsyncClient {
    fn drop(&mut self) {
        if self.is_inherited() {
            std::mem::forget(self.pipeline.clone());
            return;
        }
        // Dropped without close(): the connection must not stay open on the server.
        self.pipeline.close("the client was closed");
    }
}

/// `framesock.aio.start_server`'s engine: the one exchange of `start_server`, as an awaitable.
/// A handler may be a coroutine function (it runs on the caller's event loop); `ready` is
/// called on the event loop once the socket listens.
#[pyfunction]
#[pyo3(signature = (
    host, port, response, handler, timeout, max_frame, backlog, request_as, ready, path,
    tls = None, proxy_protocol = false, proxy_from = None,
))]
#[allow(clippy::too_many_arguments)]
pub fn start_server_async<'py>(
    py: Python<'py>,
    #[pyo3(from_py_with = named::host)] host: String,
    #[pyo3(from_py_with = named::port)] port: Int,
    response: Option<Bound<'py, PyAny>>,
    handler: Option<Bound<'py, PyAny>>,
    #[pyo3(from_py_with = named::timeout)] timeout: Option<f64>,
    #[pyo3(from_py_with = named::max_frame)] max_frame: Int,
    #[pyo3(from_py_with = named::backlog)] backlog: Int,
    #[pyo3(from_py_with = named::request_as)] request_as: String,
    #[pyo3(from_py_with = named::ready)] ready: Option<Bound<'py, PyAny>>,
    #[pyo3(from_py_with = named::path)] path: Option<PathBuf>,
    #[pyo3(from_py_with = named::server_tls)] tls: Option<PyRef<'py, crate::py::tls::ServerTls>>,
    #[pyo3(from_py_with = named::proxy_protocol)] proxy_protocol: bool,
    #[pyo3(from_py_with = named::proxy_from)] proxy_from: Option<Vec<String>>,
) -> PyResult<Bound<'py, PyAny>> {
    let tls = tls.map(|tls| tls.settings.clone());
    let proxy = crate::py::args::proxy_protocol(proxy_protocol, proxy_from)?;
    let server = one_shot_server(
        py, host, port, path, response, handler, timeout, max_frame, backlog, request_as, tls,
        proxy,
    )?;
    server._use_event_loop(py)?;
    // `ready` runs here, on the event loop: this is called from a coroutine.
    let (exchange, result) = server.serve_one(py, ready)?;
    let bridge = LoopBridge::for_running_loop(py)?;
    // The server lives until its exchange is over, and is dropped on an engine thread.
    let server = GilDrop::new(server);
    bridge.spawn(
        py,
        async move {
            let outcome = exchange.await;
            drop(server);
            Ok(outcome)
        },
        move |py, outcome| Ok(result.into_dict(py, outcome)?.into_any().unbind()),
    )
}
