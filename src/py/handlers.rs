//! The engine's handler interface for Python: a sync handler runs on the server's handler
//! threads, a coroutine handler as a Task on its event loop; what a sync handler returns that is
//! awaitable is awaited on the event loop too (under framesock.aio). Log records go to the
//! `framesock` logger from a handler thread. (A static reply never gets here: the engine
//! answers it on its own.)

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::py::cached::Cached;
use bytes::Bytes;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};
use tokio::sync::oneshot;

use crate::engine::error::{Failure, FailureKind};
use crate::engine::handler::{Caller, Handler, Level, Log, PendingReply};
use crate::engine::lock::locked;
use crate::py::bridge::LoopBridge;
use crate::py::cached::interned;
use crate::py::gil::GilDrop;
use crate::py::json;
use crate::py::tasks::run_as_task;
use crate::py::threads::{Call, HandlerThreads};

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
    /// `request_as=`: "text", "bytes" or "json".
    pub fn parse(name: &str) -> PyResult<Self> {
        match name {
            "text" => Ok(RequestAs::Text),
            "bytes" => Ok(RequestAs::Bytes),
            "json" => Ok(RequestAs::Json),
            other => Err(pyo3::exceptions::PyValueError::new_err(format!(
                "request_as must be 'text', 'bytes' or 'json', not {other:?}"
            ))),
        }
    }
}

/// The payload as text, exactly as `payload.decode("utf-8", "replace")` gives it (bytes that
/// are not UTF-8 become U+FFFD; the raw bytes are kept apart). CPython's own decoder does it, in
/// one pass.
pub fn request_text<'py>(py: Python<'py>, payload: &[u8]) -> PyResult<Bound<'py, PyString>> {
    let length = pyo3::ffi::Py_ssize_t::try_from(payload.len())
        .map_err(|_| pyo3::exceptions::PyOverflowError::new_err("request too long for a str"))?;
    // SAFETY: the pointer and length describe `payload`, which outlives the call; the result is
    // a new reference (or NULL with an exception set), and it is a str.
    unsafe {
        let text =
            pyo3::ffi::PyUnicode_DecodeUTF8(payload.as_ptr().cast(), length, c"replace".as_ptr());
        Ok(Bound::from_owned_ptr_or_err(py, text)?.cast_into_unchecked())
    }
}

/// The request payload as the handler wants it.
fn request_object<'py>(
    py: Python<'py>,
    request_as: RequestAs,
    payload: &[u8],
) -> Result<Bound<'py, PyAny>, Failure> {
    Ok(match request_as {
        RequestAs::Text => request_text(py, payload)
            .map_err(|err| python_failure(py, FailureKind::BadRequest, err))?
            .into_any(),
        RequestAs::Bytes => PyBytes::new(py, payload).into_any(),
        RequestAs::Json => json::loads(py, payload)
            .map_err(|err| python_failure(py, FailureKind::BadRequest, err))?,
    })
}

/// A failure caused by a Python exception, which travels along (for raising or logging).
pub fn python_failure(py: Python<'_>, kind: FailureKind, err: PyErr) -> Failure {
    let type_name = err
        .get_type(py)
        .name()
        .map(|n| n.to_string())
        .unwrap_or_default();
    let message = format!("{type_name}: {}", err.value(py));
    Failure {
        kind,
        message,
        cause: Some(Arc::new(GilDrop::new(err))),
    }
}

/// Whether `value` is something to `await` (a coroutine, a future, ...).
fn is_awaitable(value: &Bound<'_, PyAny>) -> bool {
    !(value.is_instance_of::<PyDict>() || value.is_instance_of::<PyList>())
        && value
            .hasattr(interned!(value.py(), "__await__"))
            .unwrap_or(false)
}

/// Where a handler's reply goes.
type ReplySender = oneshot::Sender<Result<Bytes, Failure>>;

/// A Python callable answering requests.
pub struct PyHandler {
    callable: GilDrop<Py<PyAny>>,
    request_as: RequestAs,
    threads: HandlerThreads,
    /// framesock.aio: the loop coroutines run on, and whether the handler is a coroutine
    /// function (called on the loop itself).
    event_loop: OnceLock<(Arc<LoopBridge>, bool)>,
    /// `start_server` shows the value the handler returned: kept here when asked.
    last_value: Option<GilDrop<Mutex<Option<Py<PyAny>>>>>,
    /// Whether the handler takes a second argument, the `framesock.Caller`.
    wants_caller: bool,
}

impl PyHandler {
    pub fn new(
        py: Python<'_>,
        callable: Py<PyAny>,
        request_as: RequestAs,
        threads: HandlerThreads,
        keep_last_value: bool,
    ) -> PyResult<Self> {
        static TAKES_CALLER: Cached<Py<PyAny>> = Cached::new();
        let wants_caller = TAKES_CALLER
            .import(py, "framesock._support", "takes_caller")?
            .call1((callable.bind(py),))?
            .is_truthy()?;
        Ok(PyHandler {
            wants_caller,
            callable: GilDrop::new(callable),
            request_as,
            threads,
            event_loop: OnceLock::new(),
            last_value: keep_last_value.then(|| GilDrop::new(Mutex::new(None))),
        })
    }

    /// The arguments of one call: the request, and the caller if the handler takes it.
    fn arguments<'py>(
        &self,
        py: Python<'py>,
        request: Bound<'py, PyAny>,
        caller: &Arc<Caller>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        if self.wants_caller {
            let caller = Bound::new(py, PyCaller::of(caller))?;
            PyTuple::new(py, [request, caller.into_any()])
        } else {
            PyTuple::new(py, [request])
        }
    }

    /// framesock.aio: coroutines run on the running event loop (the first one set stays).
    pub fn use_running_loop(&self, py: Python<'_>) -> PyResult<Arc<LoopBridge>> {
        if let Some((bridge, _)) = self.event_loop.get() {
            return Ok(bridge.clone());
        }
        static IS_COROUTINE_FUNCTION: Cached<Py<PyAny>> = Cached::new();
        let call_on_loop = IS_COROUTINE_FUNCTION
            .import(py, "inspect", "iscoroutinefunction")?
            .call1((self.callable.bind(py),))?
            .is_truthy()?;
        let bridge = LoopBridge::for_running_loop(py)?;
        let _ = self.event_loop.set((bridge, call_on_loop));
        Ok(self.event_loop.get().expect("set above").0.clone())
    }

    /// The value the handler last returned (when kept).
    pub fn take_last_value(&self) -> Option<Py<PyAny>> {
        self.last_value
            .as_ref()
            .and_then(|kept| locked(kept).take())
    }

    /// Sends the reply for `value`: its JSON, or on to the event loop if it is awaitable.
    fn reply_with(
        self: &Arc<Self>,
        py: Python<'_>,
        value: Bound<'_, PyAny>,
        reply: ReplySender,
        task: Option<&Arc<TaskSlot>>,
    ) {
        if is_awaitable(&value) {
            match self.event_loop.get() {
                Some((bridge, _)) => {
                    let awaitable = value.unbind();
                    let this = self.clone();
                    // No slot when the loop was set after this exchange began: nobody can
                    // cancel its Task then, as before the loop was known.
                    let task = task.cloned().unwrap_or_default();
                    bridge.push(Box::new(move |py| {
                        this.await_on_loop(py, awaitable.into_bound(py), reply, &task)
                    }));
                }
                None => {
                    // Nothing will await it: close it, so Python does not warn later.
                    if value.hasattr("close").unwrap_or(false) {
                        let _ = value.call_method0("close");
                    }
                    let err = pyo3::exceptions::PyTypeError::new_err(
                        "the handler returned an awaitable; async handlers need framesock.aio.Server",
                    );
                    let _ = reply.send(Err(python_failure(py, FailureKind::Handler, err)));
                }
            }
            return;
        }
        let outcome = json::dumps(&value)
            .map(Bytes::from)
            .map_err(|err| python_failure(py, FailureKind::Encode, err));
        if outcome.is_ok() {
            if let Some(kept) = &self.last_value {
                *locked(kept) = Some(value.unbind());
            }
        }
        let _ = reply.send(outcome);
    }

    /// Calls the handler on the event loop's thread (a coroutine function).
    fn call_on_loop(
        self: &Arc<Self>,
        py: Python<'_>,
        payload: &[u8],
        caller: &Arc<Caller>,
        reply: ReplySender,
        task: &Arc<TaskSlot>,
    ) {
        let arguments = request_object(py, self.request_as, payload).and_then(|request| {
            self.arguments(py, request, caller)
                .map_err(|err| python_failure(py, FailureKind::Handler, err))
        });
        let arguments = match arguments {
            Ok(arguments) => arguments,
            Err(failure) => return drop(reply.send(Err(failure))),
        };
        // The Task runs `_support.answer`, which calls the handler, awaits it and sends the
        // outcome from inside the Task: made now (already on the loop), its first step taken at
        // once (see `tasks`), so a handler that never waits is answered before this returns.
        static ANSWER: Cached<Py<PyAny>> = Cached::new();
        let send = SendOutcome {
            handler: self.clone(),
            reply: Mutex::new(Some(reply)),
        };
        let Some((bridge, _)) = self.event_loop.get() else {
            return;
        };
        let scheduled = Bound::new(py, send)
            .and_then(|send| {
                ANSWER.import(py, "framesock._support", "answer")?.call1((
                    self.callable.bind(py),
                    arguments,
                    send,
                ))
            })
            .and_then(|body| run_as_task(py, bridge.event_loop(py), &bridge.tasks, &body, None));
        match scheduled {
            Ok(Some(running)) if task.abandoned.load(Ordering::Acquire) => {
                let _ = running.call_method0("cancel");
            }
            Ok(Some(running)) => *locked(&task.task) = Some(running.unbind()),
            Ok(None) => {} // it left the loop
            // The reply sender went with `send`, so the waiting exchange fails as it drops.
            Err(err) => err.print(py),
        }
    }

    /// Awaits `awaitable` as a Task on the event loop; its outcome is the reply.
    fn await_on_loop(
        self: &Arc<Self>,
        py: Python<'_>,
        awaitable: Bound<'_, PyAny>,
        reply: ReplySender,
        slot: &Arc<TaskSlot>,
    ) {
        let Some((bridge, _)) = self.event_loop.get() else {
            return;
        };
        let when_done = SendWhenDone {
            handler: self.clone(),
            reply: Mutex::new(Some(reply)),
        };
        let scheduled = Bound::new(py, when_done).and_then(|when_done| {
            run_as_task(
                py,
                bridge.event_loop(py),
                &bridge.tasks,
                &awaitable,
                Some(when_done.into_any()),
            )
        });
        match scheduled {
            // Its connection may have been dropped already; else keep it for a later cancel.
            Ok(Some(task)) if slot.abandoned.load(Ordering::Acquire) => {
                let _ = task.call_method0("cancel");
            }
            Ok(Some(task)) => *locked(&slot.task) = Some(task.unbind()),
            Ok(None) => {} // it left the loop
            // The reply sender went with the callback, so the waiting exchange fails as the
            // sender drops; the reason is printed here.
            Err(err) => err.print(py),
        }
    }
}

/// The Task running a coroutine for one exchange, once there is one, and whether its reply is
/// still wanted.
struct TaskSlot {
    task: GilDrop<Mutex<Option<Py<PyAny>>>>,
    abandoned: AtomicBool,
}

impl Default for TaskSlot {
    fn default() -> Self {
        TaskSlot {
            task: GilDrop::new(Mutex::new(None)),
            abandoned: AtomicBool::new(false),
        }
    }
}

/// Dropped before its reply came (the connection was dropped), it cancels the handler's Task.
struct CancelOnDrop {
    slot: Arc<TaskSlot>,
    bridge: Arc<LoopBridge>,
    done: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.slot.abandoned.store(true, Ordering::Release);
        let slot = self.slot.clone();
        self.bridge.push(Box::new(move |py| {
            let task = locked(&slot.task).take();
            if let Some(task) = task {
                let _ = task.bind(py).call_method0("cancel");
            }
        }));
    }
}

impl Handler for Arc<PyHandler> {
    fn respond(&self, request: Bytes, caller: &Arc<Caller>) -> PendingReply {
        let (reply, replied) = oneshot::channel();
        let caller = caller.clone();
        let on_loop = self.event_loop.get();
        // Only an exchange that may become a Task on the loop needs a slot to cancel it by.
        let slot = on_loop.map(|_| Arc::new(TaskSlot::default()));
        match on_loop {
            Some((bridge, true)) => {
                let this = self.clone();
                let slot = slot.clone().expect("made for a loop");
                bridge.push(Box::new(move |py| {
                    this.call_on_loop(py, &request, &caller, reply, &slot)
                }));
            }
            _ => {
                let this = self.clone();
                let slot = slot.clone();
                self.threads.submit(Box::new(move |py| {
                    if reply.is_closed() {
                        return None; // abandoned while queued: its connection is gone
                    }
                    let request = match request_object(py, this.request_as, &request) {
                        Ok(request) => request,
                        Err(failure) => {
                            let _ = reply.send(Err(failure));
                            return None;
                        }
                    };
                    let arguments = match this.arguments(py, request, &caller) {
                        Ok(arguments) => arguments,
                        Err(err) => {
                            let _ = reply.send(Err(python_failure(py, FailureKind::Handler, err)));
                            return None;
                        }
                    };
                    let handler = this.clone();
                    Some(Call {
                        function: this.callable.clone_ref(py),
                        arguments: arguments.unbind(),
                        finish: Box::new(move |py, outcome| match outcome {
                            Ok(value) => handler.reply_with(py, value, reply, slot.as_ref()),
                            Err(err) => {
                                drop(reply.send(Err(python_failure(py, FailureKind::Handler, err))))
                            }
                        }),
                    })
                }));
            }
        }
        let guard = slot.zip(on_loop).map(|(slot, (bridge, _))| CancelOnDrop {
            slot,
            bridge: bridge.clone(),
            done: false,
        });
        Box::pin(async move {
            // Moved in whole (not just the field written below), so it lives with the future.
            let mut guard = guard;
            let outcome = replied.await;
            if let Some(guard) = guard.as_mut() {
                guard.done = true;
            }
            outcome.unwrap_or_else(|_| {
                Err(Failure::new(
                    FailureKind::Handler,
                    "the handler was not run to the end: the server is shutting down or its event loop has closed",
                ))
            })
        })
    }

    fn concurrent(&self) -> bool {
        // Coroutine handlers of one connection's pipelined requests run as Tasks at once; a
        // plain handler answers them one at a time, as on the blocking Server.
        matches!(self.event_loop.get(), Some((_, true)))
    }

    fn expansion(&self) -> u64 {
        match self.request_as {
            RequestAs::Json => json::EXPANSION,
            RequestAs::Text | RequestAs::Bytes => 1,
        }
    }
}

/// A Task's done-callback that sends its outcome as the reply.
#[pyclass(frozen)]
struct SendWhenDone {
    handler: Arc<PyHandler>,
    reply: Mutex<Option<ReplySender>>,
}

#[pymethods]
impl SendWhenDone {
    fn __call__(&self, py: Python<'_>, task: &Bound<'_, PyAny>) -> PyResult<()> {
        let Some(_calling) = crate::py::gil::calling_python() else {
            return Ok(()); // the exit has begun: see `calling_python`
        };
        let Some(reply) = locked(&self.reply).take() else {
            return Ok(());
        };
        if task.call_method0("cancelled")?.is_truthy()? {
            let cancelled = pyo3::exceptions::asyncio::CancelledError::new_err(
                "the handler's task was cancelled",
            );
            let _ = reply.send(Err(python_failure(py, FailureKind::Handler, cancelled)));
            return Ok(());
        }
        let exception = task.call_method0("exception")?;
        if !exception.is_none() {
            let err = PyErr::from_value(exception);
            let _ = reply.send(Err(python_failure(py, FailureKind::Handler, err)));
            return Ok(());
        }
        let value = task.call_method0("result")?;
        // A Task's result is never awaitable in practice; reply_with would await it again.
        self.handler.reply_with(py, value, reply, None);
        Ok(())
    }
}

/// What `_support.answer` calls, inside the handler's Task, with its outcome: the reply.
#[pyclass(frozen)]
struct SendOutcome {
    handler: Arc<PyHandler>,
    reply: Mutex<Option<ReplySender>>,
}

#[pymethods]
impl SendOutcome {
    fn __call__(&self, py: Python<'_>, value: Bound<'_, PyAny>, error: Bound<'_, PyAny>) {
        let Some(_calling) = crate::py::gil::calling_python() else {
            return; // the exit has begun: see `calling_python`
        };
        let Some(reply) = locked(&self.reply).take() else {
            return;
        };
        if error.is_none() {
            self.handler.reply_with(py, value, reply, None);
            return;
        }
        let err = if error.is_instance_of::<pyo3::exceptions::asyncio::CancelledError>() {
            pyo3::exceptions::asyncio::CancelledError::new_err("the handler's task was cancelled")
        } else {
            PyErr::from_value(error)
        };
        let _ = reply.send(Err(python_failure(py, FailureKind::Handler, err)));
    }
}

/// Log records to the `framesock` logger, written by a handler thread (never an I/O thread:
/// a thread that first touches `logging` may be taken for the main thread).
///
/// At most [`MAX_WAITING_RECORDS`] wait for a handler thread at once: while every thread is
/// busy (a slow handler), more are dropped and counted, and the next record written says how
/// many. (The engine's budgets bound the rate of records; this bounds what piles up while
/// nothing is written.)
pub struct PyLog {
    threads: HandlerThreads,
    waiting: Arc<AtomicUsize>,
    dropped: AtomicU64,
}

/// The most log records waiting for a handler thread.
pub const MAX_WAITING_RECORDS: usize = 1000;

impl PyLog {
    pub fn new(threads: HandlerThreads) -> Self {
        PyLog {
            threads,
            waiting: Arc::new(AtomicUsize::new(0)),
            dropped: AtomicU64::new(0),
        }
    }
}

/// One record waiting: counted in `PyLog::waiting` until written or dropped.
struct Waiting(Arc<AtomicUsize>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Log for PyLog {
    fn log(&self, level: Level, message: String, failure: Option<&Failure>) {
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= MAX_WAITING_RECORDS {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let waiting = Waiting(self.waiting.clone());
        let message = match self.dropped.swap(0, Ordering::Relaxed) {
            0 => message,
            n => format!(
                "{message} ({n} log records dropped before this one: the handler threads were \
                 too busy to write them)"
            ),
        };
        let cause = failure.and_then(|f| f.cause.clone());
        self.threads.submit(Box::new(move |py| {
            drop(waiting);
            let level = match level {
                Level::Debug => 10,
                Level::Warning => 30,
                Level::Error => 40,
            };
            let exc = cause
                .as_ref()
                .and_then(|cause| cause.downcast_ref::<GilDrop<PyErr>>())
                .map(|err| err.clone_ref(py).into_value(py).into_any());
            let function = py
                .import("framesock._support")
                .and_then(|m| m.getattr("log"))
                .ok()?
                .unbind();
            let record = (level, message, exc).into_pyobject(py).ok()?.into_any();
            Some(Call {
                function,
                arguments: PyTuple::new(py, [record]).ok()?.unbind(),
                finish: Box::new(|py, outcome| {
                    // Logging must never take the server down; a broken logging setup is its
                    // own problem, reported as logging itself reports such things.
                    if let Err(err) = outcome {
                        err.print(py);
                    }
                }),
            })
        }));
    }
}

/// `framesock.Caller`: who sent a request, for handlers that take a second argument.
#[pyclass(frozen, module = "framesock", name = "Caller")]
pub struct PyCaller {
    caller: Arc<Caller>,
}

impl PyCaller {
    fn of(caller: &Arc<Caller>) -> Self {
        PyCaller {
            caller: caller.clone(),
        }
    }
}

#[pymethods]
impl PyCaller {
    /// The client's address: `(host, port)` or a Unix socket path.
    #[getter]
    fn address<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        crate::py::args::address_object(py, &self.caller.address)
    }

    /// Under the PROXY protocol, the balancer's address (the connection's own peer, which
    /// `address` replaces with the client the balancer speaks for); None without it.
    #[getter]
    fn proxy_address<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        self.caller
            .proxy_address
            .as_ref()
            .map(|address| crate::py::args::address_object(py, address))
            .transpose()
    }

    /// The subject of the client's verified certificate (mutual TLS), as RFC 4514 writes it;
    /// None without one.
    #[getter]
    fn tls_subject(&self) -> Option<String> {
        self.caller.certificate.as_ref().map(|c| c.subject.clone())
    }

    /// The certificate's subject alternative names (`"DNS:..."`, `"IP:..."`, `"email:..."`,
    /// `"URI:..."`); empty without a certificate.
    #[getter]
    fn tls_alt_names(&self) -> Vec<String> {
        self.caller
            .certificate
            .as_ref()
            .map(|c| c.alt_names.clone())
            .unwrap_or_default()
    }

    /// The client's certificate itself (DER bytes); None without one.
    #[getter]
    fn tls_certificate<'py>(&self, py: Python<'py>) -> Option<Bound<'py, pyo3::types::PyBytes>> {
        self.caller
            .certificate
            .as_ref()
            .map(|c| pyo3::types::PyBytes::new(py, &c.der))
    }

    fn __repr__(&self) -> String {
        let mut text = format!("<framesock.Caller {}", self.caller.address);
        if let Some(proxy) = &self.caller.proxy_address {
            text.push_str(&format!(" via {proxy}"));
        }
        if let Some(cert) = &self.caller.certificate {
            text.push_str(&format!(" tls_subject='{}'", cert.subject));
        }
        text.push('>');
        text
    }
}

/// Makes this module's private classes' type objects now, at import (see `py::warm_up`).
pub(super) fn make_types(py: Python<'_>) {
    let _ = <SendWhenDone as pyo3::PyTypeInfo>::type_object(py);
    let _ = <SendOutcome as pyo3::PyTypeInfo>::type_object(py);
}
