//! `Client` (kept connections, pipelining) and `start_client` (the seed's one exchange).

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::py::named;
use pyo3::types::{PyByteArray, PyBytes, PyList, PyString};
use tokio_util::codec::Encoder;

use crate::engine::client::{classic_exchange, framed_exchange, Connection};
use crate::engine::codec::{self, Frame, FrameCodec};
use crate::engine::error::Error;
use crate::engine::failover::Failover;
use crate::engine::lock::locked;
use crate::engine::net::Endpoint;
use crate::engine::runtime;
use crate::engine::serve::Protocol;
use crate::engine::tls::ClientTls;
use crate::py::args::{self, Int};
use crate::py::errors;
use crate::py::gil;
use crate::py::json;
use crate::py::tls::ClientTls as ClientTlsSettings;
use crate::py::wait;

/// The bytes a message is sent as: str as UTF-8 and bytes as they are (the seed's wire); any
/// other value (dict, list, tuple, int, float, bool, None) as its JSON text.
pub fn message_payload(message: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    if let Ok(text) = message.cast::<PyString>() {
        Ok(text.to_cow()?.as_bytes().to_vec())
    } else if let Ok(raw) = message.cast::<PyBytes>() {
        Ok(raw.as_bytes().to_vec())
    } else if let Ok(raw) = message.cast::<PyByteArray>() {
        Ok(raw.to_vec())
    } else {
        json::dumps(message).map_err(|err| named::not_json(message.py(), "message", err))
    }
}

/// Appends `message` as a request frame to `frames`.
pub fn put_request(message: &Bound<'_, PyAny>, frames: &mut BytesMut) -> PyResult<()> {
    let payload = message_payload(message)?;
    FrameCodec::new(codec::MAX_PAYLOAD)
        .encode(&payload, frames)
        .map_err(|err| Error::from(err).into())
}

/// A framed reply as its Python value; an error reply as RemoteError.
pub fn reply_value<'py>(py: Python<'py>, frame: &Frame) -> PyResult<Bound<'py, PyAny>> {
    if frame.is_error {
        return Err(errors::remote_error(py, &frame.payload));
    }
    json::loads(py, &frame.payload)
}

/// A client's arguments, checked: shared by `Client` and `framesock.aio.Client`.
pub struct ClientConfig {
    pub endpoint: Endpoint,
    pub protocol: Protocol,
    pub timeout: Option<Duration>,
    pub max_reply: usize,
}

impl ClientConfig {
    pub fn new(
        host: Option<String>,
        port: Option<Int>,
        path: Option<PathBuf>,
        protocol: &str,
        timeout: Option<f64>,
        max_reply: Int,
    ) -> PyResult<Self> {
        Ok(ClientConfig {
            endpoint: args::client_endpoint(host, port, path)?,
            protocol: args::protocol(protocol)?,
            timeout: args::timeout("timeout", timeout)?,
            max_reply: args::byte_limit("max_reply", max_reply)?,
        })
    }
}

/// The kept connection and whether `close()` was called.
struct ClientState {
    connection: Option<Connection>,
    /// The engine generation the connection was opened in.
    generation: u64,
    closed: bool,
}

/// The client's own single-threaded runtime (its sockets are driven by the calling thread),
/// and the engine generation it was made in (see `runtime::forget_after_fork`).
struct CallerRuntime {
    runtime: Option<Arc<tokio::runtime::Runtime>>,
    generation: u64,
}

/// A client that keeps its connection (framed protocol) and pipelines batches.
#[pyclass(frozen, module = "framesock")]
pub struct Client {
    runtime: Mutex<CallerRuntime>,
    /// Its addresses, and when a request is tried again.
    failover: Failover,
    /// Whether every request may be repeated after its connection broke (else per request).
    idempotent: bool,
    tls: Option<ClientTls>,
    protocol: Protocol,
    timeout: Option<Duration>,
    max_reply: usize,
    state: Mutex<ClientState>,
    /// Cancelled by `close()`: requests in flight on other threads end at once.
    closing: tokio_util::sync::CancellationToken,
}

impl Client {
    /// Locks the state without holding the GIL, so a thread waiting here never blocks the
    /// thread that holds the lock and needs the GIL to finish.
    fn lock(&self, py: Python<'_>) -> PyResult<MutexGuard<'_, ClientState>> {
        // Uncontended (the usual case): no need to let go of the GIL. Contended: wait without
        // it for the holder to finish, then try again (a guard cannot leave the GIL-free wait).
        let state = loop {
            match self.state.try_lock() {
                Ok(state) => break state,
                Err(TryLockError::Poisoned(poisoned)) => break poisoned.into_inner(),
                Err(TryLockError::WouldBlock) => {
                    gil::detach_for_python(py, || drop(locked(&self.state)));
                }
            }
        };
        if state.closed || self.closing.is_cancelled() {
            return Err(PyValueError::new_err("the client is closed"));
        }
        Ok(state)
    }

    /// Runs `fut` on the client's runtime without the GIL, Ctrl-C aware.
    fn wait<F>(&self, py: Python<'_>, fut: F) -> PyResult<F::Output>
    where
        F: std::future::Future + Send,
        F::Output: Send,
    {
        let runtime = self.caller_runtime()?;
        wait::wait_on(py, &runtime, fut)
    }

    /// The client's runtime; in a process forked after it was made, a new one (the old one's
    /// sockets share their kernel state with the parent's, so they are left alone, not closed).
    fn caller_runtime(&self) -> PyResult<Arc<tokio::runtime::Runtime>> {
        let mut caller = locked(&self.runtime);
        let now = runtime::generation();
        if caller.generation != now {
            std::mem::forget(caller.runtime.take());
            caller.generation = now;
        }
        if caller.runtime.is_none() {
            caller.runtime = Some(Arc::new(runtime::caller_runtime()?));
        }
        Ok(caller.runtime.clone().expect("made above"))
    }

    /// Sends encoded frames and returns the replies' frames; a failed exchange drops the
    /// connection, so the next request reconnects (to the next address, see `Failover`).
    fn exchange(
        &self,
        py: Python<'_>,
        frames: &[u8],
        count: usize,
        idempotent: bool,
    ) -> PyResult<Vec<Frame>> {
        let mut state = self.lock(py)?;
        if state.generation != runtime::generation() {
            // Opened before a fork: its socket is the parent's too; see `caller_runtime`.
            std::mem::forget(state.connection.take());
            state.generation = runtime::generation();
        }
        let closing = self.closing.clone();
        let slot = &mut state.connection;
        let mut attempts = self.failover.attempts(self.timeout, idempotent);
        let outcome = self.wait(py, async {
            loop {
                let (index, endpoint) = self.failover.current();
                let tried = tokio::select! {
                    biased;
                    _ = closing.cancelled() => Err(Error::Closed),
                    replies = framed_exchange(
                        slot,
                        endpoint,
                        self.tls.as_ref(),
                        frames,
                        count,
                        self.timeout,
                        self.max_reply,
                    ) => replies,
                };
                match tried {
                    Ok(replies) => break Ok(replies),
                    Err(err) => {
                        *slot = None;
                        if let Err(err) = attempts.after(index, err).await {
                            break Err(err);
                        }
                    }
                }
            }
        });
        log_tries(py, &attempts.notes);
        let outcome = match outcome {
            Ok(Ok(replies)) => Ok(replies),
            Ok(Err(err)) => Err(err.into()),
            Err(interrupted) => {
                *slot = None;
                Err(interrupted)
            }
        };
        if self.closing.is_cancelled() {
            state.connection = None;
            state.closed = true;
        }
        outcome
    }

    fn classic_request<'py>(
        &self,
        py: Python<'py>,
        message: &Bound<'py, PyAny>,
        idempotent: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        drop(self.lock(py)?); // only to refuse a closed client
        let frame: Bytes = codec::encode_frame(&message_payload(message)?).map_err(Error::from)?;
        let closing = self.closing.clone();
        let mut attempts = self.failover.attempts(self.timeout, idempotent);
        let reply = self.wait(py, async {
            loop {
                let (index, endpoint) = self.failover.current();
                let tried = tokio::select! {
                    biased;
                    _ = closing.cancelled() => Err(Error::Closed),
                    reply = classic_exchange(
                        endpoint,
                        self.tls.as_ref(),
                        &frame,
                        self.timeout,
                        self.max_reply,
                    ) => reply,
                };
                match tried {
                    Ok(reply) => break Ok(reply),
                    Err(err) => {
                        if let Err(err) = attempts.after(index, err).await {
                            break Err(err);
                        }
                    }
                }
            }
        });
        log_tries(py, &attempts.notes);
        json::loads(py, &reply??)
    }
}

#[pymethods]
impl Client {
    #[new]
    #[pyo3(signature = (
        host = Some(String::from("127.0.0.1")), port = Some(Int::new(8000)), *, path = None,
        protocol = String::from("classic"), timeout = Some(20.0),
        max_reply = Int::new(args::DEFAULT_MAX_LEN as i64), tls = None, addresses = None,
        retries = Int::new(0), idempotent = false,
    ))]
    #[pyo3(
        text_signature = "(host='127.0.0.1', port=8000, *, path=None, protocol='classic', \
        timeout=20.0, max_reply=16777216, tls=None, addresses=None, retries=0, idempotent=False)"
    )]
    #[allow(clippy::too_many_arguments)]
    fn new(
        #[pyo3(from_py_with = named::host_or_none)] host: Option<String>,
        #[pyo3(from_py_with = named::port_or_none)] port: Option<Int>,
        #[pyo3(from_py_with = named::path)] path: Option<PathBuf>,
        #[pyo3(from_py_with = named::protocol)] protocol: String,
        #[pyo3(from_py_with = named::timeout)] timeout: Option<f64>,
        #[pyo3(from_py_with = named::max_reply)] max_reply: Int,
        #[pyo3(from_py_with = named::client_tls)] tls: Option<PyRef<'_, ClientTlsSettings>>,
        #[pyo3(from_py_with = named::addresses)] addresses: Option<Vec<(String, Int)>>,
        #[pyo3(from_py_with = named::retries)] retries: Int,
        #[pyo3(from_py_with = named::idempotent)] idempotent: bool,
    ) -> PyResult<Self> {
        let ClientConfig {
            endpoint,
            protocol,
            timeout,
            max_reply,
        } = ClientConfig::new(host, port, path, &protocol, timeout, max_reply)?;
        Ok(Client {
            runtime: Mutex::new(CallerRuntime {
                runtime: None,
                generation: runtime::generation(),
            }),
            failover: Failover::new(
                args::client_addresses(endpoint, addresses)?,
                args::retries(retries)?,
            ),
            idempotent,
            tls: tls.map(|tls| tls.settings.clone()),
            protocol,
            timeout,
            max_reply,
            state: Mutex::new(ClientState {
                connection: None,
                generation: runtime::generation(),
                closed: false,
            }),
            closing: tokio_util::sync::CancellationToken::new(),
        })
    }

    /// Sends one message and returns the decoded reply.
    #[pyo3(signature = (message, *, idempotent = None))]
    fn request<'py>(
        &self,
        py: Python<'py>,
        message: &Bound<'py, PyAny>,
        #[pyo3(from_py_with = named::idempotent_or_none)] idempotent: Option<bool>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let idempotent = idempotent.unwrap_or(self.idempotent);
        match self.protocol {
            Protocol::Classic => self.classic_request(py, message, idempotent),
            Protocol::Framed => {
                let mut frames = BytesMut::new();
                put_request(message, &mut frames)?;
                let replies = self.exchange(py, &frames, 1, idempotent)?;
                reply_value(py, &replies[0])
            }
        }
    }

    /// Sends every message and returns their replies in order; pipelined in "framed".
    #[pyo3(signature = (messages, *, idempotent = None))]
    fn request_many<'py>(
        &self,
        py: Python<'py>,
        messages: &Bound<'py, PyAny>,
        #[pyo3(from_py_with = named::idempotent_or_none)] idempotent: Option<bool>,
    ) -> PyResult<Bound<'py, PyList>> {
        let idempotent = idempotent.unwrap_or(self.idempotent);
        let messages: Vec<Bound<'py, PyAny>> = messages.try_iter()?.collect::<PyResult<_>>()?;
        if self.protocol == Protocol::Classic {
            let replies = messages
                .iter()
                .map(|message| self.classic_request(py, message, idempotent))
                .collect::<PyResult<Vec<_>>>()?;
            return PyList::new(py, replies);
        }
        let mut frames = BytesMut::new();
        for message in &messages {
            put_request(message, &mut frames)?;
        }
        let replies = self.exchange(py, &frames, messages.len(), idempotent)?;
        // All replies were read, so the connection stays in step even if one is an error.
        let values = replies
            .iter()
            .map(|frame| reply_value(py, frame))
            .collect::<PyResult<Vec<_>>>()?;
        PyList::new(py, values)
    }

    /// Closes the kept connection; later requests raise ValueError. Never waits: a request in
    /// flight on another thread fails at once with ConnectionClosedError.
    fn close(&self) {
        self.closing.cancel();
        if let Ok(mut state) = self.state.try_lock() {
            let connection = state.connection.take();
            state.closed = true;
            if let (Some(connection), true) =
                (connection, state.generation == runtime::generation())
            {
                if let Ok(rt) = self.caller_runtime() {
                    connection.end(&rt);
                }
            }
        } // else the request in flight sees `closing`, drops the connection and marks it closed
    }

    /// What the client counted of its tries: `retries` (rounds tried again after a
    /// backoff) and `failovers` (moves to its next address).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        Ok(pythonize::pythonize(py, &self.failover.stats)?)
    }

    /// The addresses it connects to, in the order given: `(host, port)` or a socket path.
    #[getter]
    fn addresses<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyAny>>> {
        self.failover
            .endpoints()
            .iter()
            .map(|endpoint| args::endpoint_object(py, endpoint))
            .collect()
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_exc_info))]
    fn __exit__(&self, _exc_info: &Bound<'_, pyo3::types::PyTuple>) {
        self.close();
    }

    fn __repr__(&self) -> String {
        let closed = if self.closing.is_cancelled() {
            " closed"
        } else {
            ""
        };
        format!(
            "<framesock.Client {} protocol='{}'{closed}>",
            self.failover.current().1,
            self.protocol
        )
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let now = runtime::generation();
        let state = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        if state.generation != now {
            // Opened before a fork: see `caller_runtime`.
            std::mem::forget(state.connection.take());
        }
        let caller = self.runtime.get_mut().unwrap_or_else(|p| p.into_inner());
        if caller.generation != now {
            std::mem::forget(caller.runtime.take());
            return;
        }
        // The connection closes with its runtime (which never blocks here: the shutdown is in
        // the background, in case the last reference goes on some runtime's thread).
        self.state
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .connection = None;
        if let Some(runtime) = caller
            .runtime
            .take()
            .and_then(|rt| Arc::try_unwrap(rt).ok())
        {
            runtime.shutdown_background();
        }
    }
}

/// Sends one request like the seed's client and returns the decoded JSON reply.
#[pyfunction]
#[pyo3(signature = (
    host = Some(String::from("127.0.0.1")), port = Some(Int::new(8000)), message = None, *,
    timeout = Some(20.0), max_reply = Int::new(args::DEFAULT_MAX_LEN as i64), path = None, tls = None,
))]
#[pyo3(
    text_signature = "(host='127.0.0.1', port=8000, message='msg from client', *, timeout=20.0, \
    max_reply=16777216, path=None, tls=None)"
)]
#[allow(clippy::too_many_arguments)]
pub fn start_client<'py>(
    py: Python<'py>,
    #[pyo3(from_py_with = named::host_or_none)] host: Option<String>,
    #[pyo3(from_py_with = named::port_or_none)] port: Option<Int>,
    message: Option<Bound<'py, PyAny>>,
    #[pyo3(from_py_with = named::timeout)] timeout: Option<f64>,
    #[pyo3(from_py_with = named::max_reply)] max_reply: Int,
    #[pyo3(from_py_with = named::path)] path: Option<PathBuf>,
    #[pyo3(from_py_with = named::client_tls)] tls: Option<PyRef<'py, ClientTlsSettings>>,
) -> PyResult<Bound<'py, PyAny>> {
    let client = Client::new(
        host,
        port,
        path,
        String::from("classic"),
        timeout,
        max_reply,
        tls,
        None,
        Int::new(0),
        false,
    )?;
    match message {
        Some(message) => client.classic_request(py, &message, false),
        // None is the default (a pyo3 default cannot be a Python str): the seed's message.
        None => client.classic_request(py, PyString::new(py, "msg from client").as_any(), false),
    }
}

/// Logs at DEBUG (logger `framesock.client`) what was tried again and why.
fn log_tries(py: Python<'_>, notes: &[String]) {
    if notes.is_empty() {
        return;
    }
    let logged = (|| -> PyResult<()> {
        let logger = py
            .import("logging")?
            .call_method1("getLogger", ("framesock.client",))?;
        for note in notes {
            logger.call_method1("debug", ("%s", note))?;
        }
        Ok(())
    })();
    if let Err(err) = logged {
        err.write_unraisable(py, None);
    }
}
