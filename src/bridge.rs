//! The way from framesock's I/O threads to an asyncio event loop, with no GIL on the way.
//!
//! I/O threads put jobs in a queue and, when it was empty, write one byte to a socket pair the
//! loop watches (`loop.add_reader`). The loop then runs every queued job in one go on its own
//! thread, where it holds the GIL anyway: calling coroutine handlers, and completing the
//! futures `framesock.aio` hands out. pyo3-async-runtimes' way (a GIL acquisition and a
//! `call_soon_threadsafe` per result) measured 2x slower than uvloop's streams on small
//! exchanges; this wakes the loop once per batch and keeps the I/O threads off the GIL.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use tokio::sync::oneshot;

use crate::json;
use crate::service::{call_handler, is_awaitable, Failure, RequestAs};

/// Where a handler's reply goes: its value and JSON text, or why there is none.
pub type ReplySender = oneshot::Sender<Result<(Py<PyAny>, Bytes), Failure>>;

/// Makes the result of an aio call, on the loop thread.
pub type Outcome = Box<dyn FnOnce(Python<'_>) -> PyResult<Py<PyAny>> + Send>;

/// Work for the event loop's thread.
pub enum Job {
    /// Call `handler(request)` there, await what it returns, and send back the reply.
    Call {
        handler: Py<PyAny>,
        request_as: RequestAs,
        payload: Bytes,
        handoff: Handoff,
    },
    /// Await an awaitable made elsewhere and send back the reply.
    Await {
        awaitable: Py<PyAny>,
        handoff: Handoff,
    },
    /// Cancel the Task of a handler whose reply nobody waits for any more.
    Cancel(Arc<TaskSlot>),
    /// Complete an asyncio future (unless it was cancelled meanwhile).
    Resolve { future: Py<PyAny>, outcome: Outcome },
    /// Stop watching the wake-up socket: nothing will be sent here again.
    Close,
}

/// The Task running one handler, once there is one, and whether its reply is still wanted.
#[derive(Default)]
pub struct TaskSlot {
    task: Mutex<Option<Py<PyAny>>>,
    abandoned: AtomicBool,
}

/// The loop's side of a handler call: where the reply goes, and the Task slot.
pub struct Handoff {
    reply: ReplySender,
    slot: Arc<TaskSlot>,
}

/// The I/O side of a handler call: awaits the reply; dropped early (its connection was
/// dropped), it cancels the handler's Task.
pub struct Waiting {
    replied: oneshot::Receiver<Result<(Py<PyAny>, Bytes), Failure>>,
    slot: Arc<TaskSlot>,
    bridge: Arc<LoopBridge>,
    done: bool,
}

impl Waiting {
    /// The handler's value and JSON text, or why there is none.
    pub async fn reply(mut self) -> Result<(Py<PyAny>, Bytes), Failure> {
        let outcome = (&mut self.replied).await;
        self.done = true;
        outcome.unwrap_or_else(|_| {
            Err(Failure::Handler(pyo3::exceptions::PyRuntimeError::new_err(
                "the event loop stopped before the handler finished",
            )))
        })
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if !self.done {
            self.slot.abandoned.store(true, Ordering::Relaxed);
            self.bridge.push(Job::Cancel(self.slot.clone()));
        }
    }
}

/// A queue of jobs for one event loop.
pub struct LoopBridge {
    event_loop: Py<PyAny>,
    jobs: Mutex<Vec<Job>>,
    wake_tx: UnixStream,
    wake_rx: UnixStream,
}

impl LoopBridge {
    /// A bridge to `event_loop`, which starts watching for wake-ups at once. Call on the loop.
    pub fn new(event_loop: &Bound<'_, PyAny>) -> PyResult<Arc<LoopBridge>> {
        let (wake_tx, wake_rx) = UnixStream::pair()?;
        wake_tx.set_nonblocking(true)?;
        wake_rx.set_nonblocking(true)?;
        let bridge = Arc::new(LoopBridge {
            event_loop: event_loop.clone().unbind(),
            jobs: Mutex::new(Vec::new()),
            wake_tx,
            wake_rx,
        });
        let drain = Drain {
            bridge: bridge.clone(),
        };
        event_loop.call_method1("add_reader", (bridge.wake_rx.as_raw_fd(), drain))?;
        Ok(bridge)
    }

    /// The loop this bridge leads to.
    pub fn event_loop<'py>(&self, py: Python<'py>) -> &Bound<'py, PyAny> {
        self.event_loop.bind(py)
    }

    /// Queues a job; from any thread, without the GIL.
    pub fn push(&self, job: Job) {
        let was_empty = {
            let mut jobs = self.jobs.lock().expect("jobs lock");
            let was_empty = jobs.is_empty();
            jobs.push(job);
            was_empty
        };
        if was_empty {
            // A full socket buffer means a wake-up is already pending: nothing is lost.
            let _ = (&self.wake_tx).write(&[1]);
        }
    }

    /// A handler call's two ends: the loop's, sent in a job, and the waiting I/O task's.
    pub fn handoff(self: &Arc<Self>) -> (Handoff, Waiting) {
        let (reply, replied) = oneshot::channel();
        let slot = Arc::new(TaskSlot::default());
        let waiting = Waiting {
            replied,
            slot: slot.clone(),
            bridge: self.clone(),
            done: false,
        };
        (Handoff { reply, slot }, waiting)
    }

    /// Runs every queued job (on the loop's thread, from its reader callback).
    fn drain(&self, py: Python<'_>) {
        let mut sink = [0u8; 64];
        while matches!((&self.wake_rx).read(&mut sink), Ok(n) if n > 0) {}
        let jobs = std::mem::take(&mut *self.jobs.lock().expect("jobs lock"));
        for job in jobs {
            self.run(py, job);
        }
    }

    fn run(&self, py: Python<'_>, job: Job) {
        match job {
            Job::Call {
                handler,
                request_as,
                payload,
                handoff,
            } => match call_handler(py, handler.bind(py), request_as, &payload) {
                Ok(value) if is_awaitable(&value) => self.schedule(py, value, handoff),
                Ok(value) => send_reply(value, handoff.reply),
                Err(failure) => drop(handoff.reply.send(Err(failure))),
            },
            Job::Await { awaitable, handoff } => {
                self.schedule(py, awaitable.into_bound(py), handoff)
            }
            Job::Cancel(slot) => {
                if let Some(task) = slot.task.lock().expect("task lock").take() {
                    let _ = task.bind(py).call_method0("cancel");
                }
            }
            Job::Resolve { future, outcome } => {
                let future = future.bind(py);
                // A cancelled future has already told its awaiter; the outcome is not needed.
                if future
                    .call_method0("done")
                    .and_then(|d| d.is_truthy())
                    .unwrap_or(true)
                {
                    return;
                }
                let _ = match outcome(py) {
                    Ok(value) => future.call_method1("set_result", (value,)),
                    Err(err) => future.call_method1("set_exception", (err.into_value(py),)),
                };
            }
            Job::Close => {
                let _ = self
                    .event_loop
                    .bind(py)
                    .call_method1("remove_reader", (self.wake_rx.as_raw_fd(),));
            }
        }
    }

    /// Runs `awaitable` as a Task on the loop; its outcome is sent once it is done.
    ///
    /// A coroutine gets a Task of its own, as `await`ing it in a task would give it: its own
    /// copy of the context and a current task (`asyncio.timeout()` needs one). On Python 3.12+
    /// the Task starts eagerly, so a handler that finishes without waiting costs no extra loop
    /// iteration.
    fn schedule(&self, py: Python<'_>, awaitable: Bound<'_, PyAny>, handoff: Handoff) {
        let Handoff { reply, slot } = handoff;
        let event_loop = self.event_loop.bind(py);
        let task = if awaitable.is_instance(coroutine_type(py)).unwrap_or(false) {
            new_task(py, event_loop, &awaitable)
        } else {
            ensure_future(py, event_loop, &awaitable)
        };
        let scheduled = task.and_then(|task| {
            let when_done = Bound::new(
                py,
                SendWhenDone {
                    reply: Mutex::new(Some(reply)),
                },
            )?;
            task.call_method1(pyo3::intern!(py, "add_done_callback"), (when_done,))?;
            // Its connection may have been dropped already; else keep it for a later Cancel.
            if slot.abandoned.load(Ordering::Relaxed) {
                task.call_method0("cancel")?;
            } else {
                *slot.task.lock().expect("task lock") = Some(task.unbind());
            }
            Ok(())
        });
        if let Err(err) = scheduled {
            // The reply sender went with the callback, so the waiting exchange fails as the
            // sender drops; the reason is printed here.
            err.print(py);
        }
    }
}

/// `types.CoroutineType`.
fn coroutine_type(py: Python<'_>) -> &Bound<'_, pyo3::types::PyType> {
    static COROUTINE: PyOnceLock<Py<pyo3::types::PyType>> = PyOnceLock::new();
    COROUTINE
        .import(py, "types", "CoroutineType")
        .expect("types.CoroutineType exists")
}

/// `asyncio.ensure_future(awaitable, loop=event_loop)`.
fn ensure_future<'py>(
    py: Python<'py>,
    event_loop: &Bound<'py, PyAny>,
    awaitable: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    static ENSURE_FUTURE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    let kwargs = pyo3::types::PyDict::new(py);
    kwargs.set_item("loop", event_loop)?;
    ENSURE_FUTURE
        .import(py, "asyncio", "ensure_future")?
        .call((awaitable,), Some(&kwargs))
}

/// `asyncio.Task(coroutine, loop=event_loop)`, started eagerly where Python supports it (3.12+).
fn new_task<'py>(
    py: Python<'py>,
    event_loop: &Bound<'py, PyAny>,
    coroutine: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    static TASK: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    let kwargs = pyo3::types::PyDict::new(py);
    kwargs.set_item("loop", event_loop)?;
    if py.version_info() >= (3, 12) {
        kwargs.set_item("eager_start", true)?;
    }
    TASK.import(py, "asyncio", "Task")?
        .call((coroutine,), Some(&kwargs))
}

/// The handler's value and its JSON text, sent back to the I/O thread.
fn send_reply(value: Bound<'_, PyAny>, reply: ReplySender) {
    let outcome = json::dumps(&value)
        .map(|json| (value.unbind(), Bytes::from(json)))
        .map_err(Failure::Encode);
    let _ = reply.send(outcome);
}

/// The loop's reader callback: runs the queued jobs.
#[pyclass(frozen)]
struct Drain {
    bridge: Arc<LoopBridge>,
}

#[pymethods]
impl Drain {
    fn __call__(&self, py: Python<'_>) {
        self.bridge.drain(py);
    }
}

/// A task's done-callback that sends its outcome as the reply.
#[pyclass(frozen)]
struct SendWhenDone {
    reply: Mutex<Option<ReplySender>>,
}

#[pymethods]
impl SendWhenDone {
    fn __call__(&self, task: &Bound<'_, PyAny>) -> PyResult<()> {
        let Some(reply) = self.reply.lock().expect("reply lock").take() else {
            return Ok(());
        };
        if task.call_method0("cancelled")?.is_truthy()? {
            let cancelled = pyo3::exceptions::asyncio::CancelledError::new_err(
                "the handler's task was cancelled",
            );
            let _ = reply.send(Err(Failure::Handler(cancelled)));
            return Ok(());
        }
        let exception = task.call_method0("exception")?;
        if !exception.is_none() {
            let _ = reply.send(Err(Failure::Handler(PyErr::from_value(exception))));
            return Ok(());
        }
        send_reply(task.call_method0("result")?, reply);
        Ok(())
    }
}
