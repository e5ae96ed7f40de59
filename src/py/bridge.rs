//! The way from framesock's I/O threads to an asyncio event loop, with no GIL on the way.
//!
//! Each event loop gets one bridge, shared by every framesock object used on it. I/O threads
//! queue jobs (closures) and, when the queue was empty, write one byte to a socket pair the
//! loop watches (`loop.add_reader`). The loop then runs every queued job in one go on its own
//! thread, where it holds the GIL anyway: calling coroutine handlers, completing the futures
//! `framesock.aio` hands out. (pyo3-async-runtimes' way, a GIL acquisition and a
//! `call_soon_threadsafe` per result from a tokio thread, measured 2x slower than uvloop's
//! streams on small exchanges, and it makes the I/O threads enter Python.)
//!
//! On asyncio's own loop in the main thread, the socket pair is also the signal wake-up fd, and
//! each drain runs the signal handlers: a Ctrl-C wakes the loop wherever it lands.
//!
//! When the loop is torn down (`asyncio.run()` returning), the bridge closes: queued and later
//! jobs are dropped, so whatever waits on them learns at once that the loop is gone, and the
//! owners that asked are told (a server stops taking coroutine work).

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use crate::py::cached::Cached;
use pyo3::prelude::*;

use crate::engine::lock::{locked, ForkSafe};
use crate::engine::{self, runtime};
use crate::py::cached::interned;
use crate::py::gil::{drop_safely, GilDrop};

/// Work for the event loop's thread.
pub type LoopJob = Box<dyn FnOnce(Python<'_>) + Send>;

/// The most jobs one reader callback runs.
const MAX_JOBS_PER_DRAIN: usize = 1024;

/// What a bridge's owner wants done when the loop ends.
pub type OnLoopEnd = Box<dyn FnOnce() + Send>;

/// A queue of jobs for one event loop.
pub struct LoopBridge {
    event_loop: GilDrop<Py<PyAny>>,
    jobs: GilDrop<Mutex<Vec<LoopJob>>>,
    closed: AtomicBool,
    on_end: Mutex<Vec<OnLoopEnd>>,
    /// The async generator whose closing tells that the loop is being torn down.
    watch: GilDrop<Mutex<Option<Py<PyAny>>>>,
    wake_tx: UnixStream,
    wake_rx: UnixStream,
    /// How handler Tasks are made on this loop.
    pub tasks: GilDrop<crate::py::tasks::TaskSetup>,
}

/// The bridges of loops that are still running (one per loop).
static BRIDGES: ForkSafe<Vec<Arc<LoopBridge>>> = ForkSafe::new(Vec::new);

/// The signal wake-up fd a bridge set (its `wake_tx`, see `_support.wake_loop_on_signals`), or
/// -1. Kept apart from `BRIDGES` for the child of a `fork`, which must undo it and cannot take a
/// lock that was held at the fork.
static SIGNAL_WAKEUP_FD: AtomicI32 = AtomicI32::new(-1);

thread_local! {
    /// The bridge whose loop is running `LoopBridge::run_here` on this thread (0: none), and
    /// the jobs pushed to it meanwhile, to run when it returns.
    static HERE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    static HERE_JOBS: std::cell::RefCell<Vec<LoopJob>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Clears `HERE` however `run_here`'s work ends.
struct LeaveHere;

impl Drop for LeaveHere {
    fn drop(&mut self) {
        HERE.with(|here| here.set(0));
    }
}

impl LoopBridge {
    /// The bridge to the running event loop, made on first use. Call on the loop.
    pub fn for_running_loop(py: Python<'_>) -> PyResult<Arc<LoopBridge>> {
        if crate::py::gil::exiting_elsewhere() {
            // Every bridge has closed; a new one would watch a loop from a Rust frame.
            return Err(pyo3::exceptions::PyRuntimeError::new_err(
                "the interpreter is exiting: framesock.aio no longer serves this event loop",
            ));
        }
        static GET_RUNNING_LOOP: Cached<Py<PyAny>> = Cached::new();
        let running = GET_RUNNING_LOOP
            .import(py, "asyncio", "get_running_loop")?
            .call0()?;
        // Python code runs only with the lock released (see `close`): a snapshot is read.
        let known = BRIDGES.lock().clone();
        if let Some(bridge) = known.iter().find(|b| b.event_loop.bind(py).is(&running)) {
            return Ok(bridge.clone());
        }
        // Loops closed without the usual teardown never said goodbye: forget them now.
        let gone: Vec<_> = known
            .into_iter()
            .filter(|b| {
                b.event_loop
                    .bind(py)
                    .call_method0("is_closed")
                    .and_then(|closed| closed.is_truthy())
                    .unwrap_or(true)
            })
            .collect();
        let bridge = LoopBridge::new(&running)?;
        let forgotten = {
            let mut bridges = BRIDGES.lock();
            let (forgotten, kept) = std::mem::take(&mut *bridges)
                .into_iter()
                .partition(|b| gone.iter().any(|g| Arc::ptr_eq(g, b)));
            *bridges = kept;
            bridges.push(bridge.clone());
            forgotten
        };
        for bridge in &forgotten {
            bridge.stop_waking_on_signals(py);
        }
        drop::<Vec<Arc<LoopBridge>>>(forgotten);
        drop(gone);
        let support = py.import("framesock._support")?;
        let wakes = support
            .call_method1(
                "wake_loop_on_signals",
                (&running, bridge.wake_tx.as_raw_fd()),
            )?
            .is_truthy()?;
        if wakes {
            SIGNAL_WAKEUP_FD.store(bridge.wake_tx.as_raw_fd(), Ordering::Release);
        }
        let on_end = LoopEnded {
            bridge: Arc::downgrade(&bridge),
        };
        let watch = support.call_method1("watch_loop", (on_end,))?;
        *locked(&bridge.watch) = Some(watch.unbind());
        Ok(bridge)
    }

    fn new(event_loop: &Bound<'_, PyAny>) -> PyResult<Arc<LoopBridge>> {
        let (wake_tx, wake_rx) = UnixStream::pair()?;
        wake_tx.set_nonblocking(true)?;
        wake_rx.set_nonblocking(true)?;
        let bridge = Arc::new(LoopBridge {
            event_loop: GilDrop::new(event_loop.clone().unbind()),
            jobs: GilDrop::new(Mutex::new(Vec::new())),
            closed: AtomicBool::new(false),
            on_end: Mutex::new(Vec::new()),
            watch: GilDrop::new(Mutex::new(None)),
            wake_tx,
            wake_rx,
            tasks: GilDrop::new(crate::py::tasks::TaskSetup::for_loop(event_loop)?),
        });
        let drain = Drain {
            bridge: Arc::downgrade(&bridge),
        };
        event_loop.call_method1("add_reader", (bridge.wake_rx.as_raw_fd(), drain))?;
        Ok(bridge)
    }

    /// The loop this bridge leads to.
    pub fn event_loop<'py>(&self, py: Python<'py>) -> &Bound<'py, PyAny> {
        self.event_loop.bind(py)
    }

    /// Whether the loop has been torn down.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Queues a job; from any thread, without the GIL. Once the loop is gone the job is
    /// dropped instead (so a reply channel inside it closes and its waiter is told).
    pub fn push(&self, job: LoopJob) {
        if HERE.with(|here| here.get()) == self as *const LoopBridge as usize && !self.is_closed() {
            return HERE_JOBS.with(|jobs| jobs.borrow_mut().push(job));
        }
        let was_empty = {
            let mut jobs = locked(&self.jobs);
            if self.is_closed() {
                drop(jobs);
                if crate::py::gil::exiting_elsewhere() {
                    std::mem::forget(job); // see `close`
                } else {
                    drop_safely(job);
                }
                return;
            }
            let was_empty = jobs.is_empty();
            jobs.push(job);
            was_empty
        };
        if was_empty {
            // A full socket buffer means a wake-up is already pending: nothing is lost.
            let _ = (&self.wake_tx).write(&[1]);
        }
    }

    /// Runs `work` from a callback of this bridge's loop, on its thread; jobs that `work`
    /// pushes to this bridge run right after it, in the same callback, instead of waking the
    /// loop for another turn. `None` once the exit has begun (see `calling_python`).
    pub fn run_here<R>(&self, py: Python<'_>, work: impl FnOnce() -> R) -> Option<R> {
        let _calling = crate::py::gil::calling_python()?;
        let result = {
            HERE.with(|here| here.set(self as *const LoopBridge as usize));
            let _leave = LeaveHere;
            work()
        };
        let mut jobs = HERE_JOBS
            .with(|jobs| std::mem::take(&mut *jobs.borrow_mut()))
            .into_iter();
        for job in jobs.by_ref() {
            if crate::py::gil::exiting_elsewhere() {
                break;
            }
            job(py);
        }
        jobs.for_each(std::mem::forget); // as in `drain`
        Some(result)
    }

    /// Asks for `on_end()` when the loop is torn down (at once if it already was).
    pub fn on_loop_end(&self, on_end: OnLoopEnd) {
        let mut waiting = locked(&self.on_end);
        if self.is_closed() {
            drop(waiting);
            on_end();
        } else {
            waiting.push(on_end);
        }
    }

    /// Signals stop writing to this bridge's socket, if they did.
    fn stop_waking_on_signals(&self, py: Python<'_>) {
        let fd = self.wake_tx.as_raw_fd();
        if SIGNAL_WAKEUP_FD
            .compare_exchange(fd, -1, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            undo_signal_wakeup(py, fd);
        }
    }

    /// Runs the queued jobs (on the loop's thread, from its reader callback): at most
    /// `MAX_JOBS_PER_DRAIN`, so that a busy server leaves the loop's other callbacks their
    /// turn; what is left wakes the loop again. Then runs the Python handlers of signals that
    /// came meanwhile: a `KeyboardInterrupt` leaves from here, as from any loop callback.
    fn drain(&self, py: Python<'_>) -> PyResult<()> {
        let mut sink = [0u8; 64];
        while matches!((&self.wake_rx).read(&mut sink), Ok(n) if n > 0) {}
        let Some(_calling) = crate::py::gil::calling_python() else {
            return Ok(()); // the exit has begun: see `calling_python`
        };
        crate::py::gil::bury_the_dead(py);
        let jobs = {
            let mut queued = locked(&self.jobs);
            if queued.len() > MAX_JOBS_PER_DRAIN {
                let rest = queued.split_off(MAX_JOBS_PER_DRAIN);
                let now = std::mem::replace(&mut *queued, rest);
                // The rest is still queued, so `push` writes no byte for it: this one does.
                let _ = (&self.wake_tx).write(&[1]);
                now
            } else {
                std::mem::take(&mut *queued)
            }
        };
        let mut jobs = jobs.into_iter();
        for job in jobs.by_ref() {
            if crate::py::gil::exiting_elsewhere() {
                break;
            }
            job(py);
        }
        // Left when the exit began: dropping them could run Python code (see `close`).
        jobs.for_each(std::mem::forget);
        // A signal's byte may be what woke the loop (see `wake_loop_on_signals`): its handler
        // runs now, from this callback, rather than wherever the interpreter next checks.
        py.check_signals()
    }

    /// The loop is being torn down: stop watching it, drop what is queued, tell the owners.
    /// Once only: the exit hook and the loop's own thread may both get here.
    ///
    /// No lock is held while Python code can run (dropping a job, the watcher generator or
    /// this bridge, calling the loop): that code may hand the GIL to a thread which, holding
    /// it, waits for the same lock (a hang at exit, seen with a loop in a daemon thread).
    fn close(&self, py: Python<'_>) {
        let pending = {
            let mut jobs = locked(&self.jobs);
            if self.closed.swap(true, Ordering::AcqRel) {
                return;
            }
            std::mem::take(&mut *jobs)
        };
        if crate::py::gil::exiting_elsewhere() {
            // After the exit hook, on the loop's own thread: any Python code run from here (a
            // finalizer, `remove_reader`) may let the GIL go, and asking for it back would end
            // this thread inside a Rust frame (an abort). What is left goes with the process.
            std::mem::forget(pending);
            std::mem::forget(locked(&self.watch).take());
            let mut bridges = BRIDGES.lock();
            let at = bridges
                .iter()
                .position(|b| std::ptr::eq(Arc::as_ptr(b), self));
            std::mem::forget(at.map(|at| bridges.swap_remove(at)));
            return;
        }
        drop(pending);
        self.stop_waking_on_signals(py);
        let _ = self
            .event_loop
            .bind(py)
            .call_method1("remove_reader", (self.wake_rx.as_raw_fd(),));
        let this = {
            let mut bridges = BRIDGES.lock();
            let at = bridges
                .iter()
                .position(|b| std::ptr::eq(Arc::as_ptr(b), self));
            at.map(|at| bridges.swap_remove(at))
        };
        drop(this);
        let owners = std::mem::take(&mut *locked(&self.on_end));
        for on_end in owners {
            on_end();
        }
        let watch = locked(&self.watch).take();
        drop(watch);
    }

    /// An asyncio future on this loop for the outcome of `work`, which runs on the engine's
    /// runtime; `finish` makes the result on the loop's thread. Cancelling the future aborts
    /// the work.
    pub fn spawn<'py, W, T, F>(
        self: &Arc<Self>,
        py: Python<'py>,
        work: W,
        finish: F,
    ) -> PyResult<Bound<'py, PyAny>>
    where
        F: FnOnce(Python<'_>, T) -> PyResult<Py<PyAny>> + Send + 'static,
        W: std::future::Future<Output = engine::error::Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        let _calling = crate::py::gil::calling_python_or_raise()?;
        let future = self
            .event_loop(py)
            .call_method0(interned!(py, "create_future"))?;
        // Dropped with the task if it is aborted, on an engine thread: see `gil`.
        let target = GilDrop::new(future.clone().unbind());
        let finish = GilDrop::new(finish);
        let bridge = self.clone();
        let task = runtime::handle().spawn(async move {
            let outcome = work.await;
            bridge.push(Box::new(move |py| {
                let finish = finish.into_inner();
                let outcome = outcome
                    .map_err(PyErr::from)
                    .and_then(|value| finish(py, value));
                resolve(py, target.bind(py), outcome);
            }));
        });
        let abort = AbortIfCancelled {
            task: task.abort_handle(),
        };
        future.call_method1(interned!(py, "add_done_callback"), (abort,))?;
        Ok(future)
    }
}

/// Completes an asyncio future, unless it was cancelled meanwhile (its awaiter knows already).
pub fn resolve(py: Python<'_>, future: &Bound<'_, PyAny>, outcome: PyResult<Py<PyAny>>) {
    if future
        .call_method0(interned!(py, "done"))
        .and_then(|done| done.is_truthy())
        .unwrap_or(true)
    {
        return;
    }
    let _ = match outcome {
        Ok(value) => future.call_method1(interned!(py, "set_result"), (value,)),
        Err(err) => future.call_method1(interned!(py, "set_exception"), (err.into_value(py),)),
    };
}

/// The loop's reader callback: runs the queued jobs.
#[pyclass(frozen)]
struct Drain {
    bridge: std::sync::Weak<LoopBridge>,
}

#[pymethods]
impl Drain {
    fn __call__(&self, py: Python<'_>) -> PyResult<()> {
        match self.bridge.upgrade() {
            Some(bridge) => bridge.drain(py),
            None => Ok(()),
        }
    }
}

/// Called as the loop is torn down.
#[pyclass(frozen)]
struct LoopEnded {
    bridge: std::sync::Weak<LoopBridge>,
}

#[pymethods]
impl LoopEnded {
    fn __call__(&self, py: Python<'_>) {
        if let Some(bridge) = self.bridge.upgrade() {
            bridge.close(py);
        }
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

/// Signals stop writing to `fd` (see `framesock._support.stop_waking_loop_on_signals`).
fn undo_signal_wakeup(py: Python<'_>, fd: i32) {
    let undone = py
        .import("framesock._support")
        .and_then(|support| support.call_method1("stop_waking_loop_on_signals", (fd,)));
    if let Err(err) = undone {
        err.print(py);
    }
}

/// In a child right after `fork`: the parent's bridges are forgotten (their loops do not run
/// here, and closing them would call into Python from the fork handler). Signals stop writing
/// to a forgotten bridge's socket, which nobody here reads, so that a loop of the child's own
/// can have them.
pub fn forget_after_fork(py: Python<'_>) {
    BRIDGES.forget_after_fork();
    let fd = SIGNAL_WAKEUP_FD.swap(-1, Ordering::AcqRel);
    if fd >= 0 {
        undo_signal_wakeup(py, fd);
    }
}

/// Every bridge closes (at interpreter exit): nothing is sent to a loop after that.
pub fn close_all(py: Python<'_>) {
    let bridges = std::mem::take(&mut *BRIDGES.lock());
    for bridge in bridges {
        bridge.close(py);
    }
}

/// Makes this module's private classes' type objects now, at import (see `py::warm_up`).
pub(super) fn make_types(py: Python<'_>) {
    let _ = <Drain as pyo3::PyTypeInfo>::type_object(py);
    let _ = <LoopEnded as pyo3::PyTypeInfo>::type_object(py);
    let _ = <AbortIfCancelled as pyo3::PyTypeInfo>::type_object(py);
}
