//! Handler threads: where sync handlers (and log records) run, never on an I/O thread.
//!
//! A pool belongs to one server and grows on demand up to its `handler_threads`, keeping one
//! idle thread in reserve, so a handler that blocks delays only its own exchange. The threads
//! are Python threads (`threading.Thread`, daemon) that spend their life in
//! `framesock._support.run_handler_jobs`; see there why that loop is Python. At interpreter
//! exit every pool closes and its idle threads leave before finalization begins.

use std::collections::VecDeque;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

/// Turns a queued item into a call for a handler thread, with the GIL; `None` when there is
/// nothing left to call (the item finished on its own, e.g. a request that is not JSON).
pub type Prepare = Box<dyn FnOnce(Python<'_>) -> Option<Call> + Send>;

/// What a call's outcome is handed to: the value `function(*args)` returned, or its exception.
pub type Finish = Box<dyn for<'py> FnOnce(Python<'py>, PyResult<Bound<'py, PyAny>>) + Send>;

/// `function(*args)`, made by a handler thread; then `finish` with the outcome.
pub struct Call {
    pub function: Py<PyAny>,
    pub args: Py<PyTuple>,
    pub finish: Finish,
}

#[derive(Default)]
struct PoolState {
    queue: VecDeque<Prepare>,
    threads: usize,
    idle: usize,
    /// Threads inside the GIL-free wait of `next_job`: these must be out before the
    /// interpreter finalizes, since they come back to Python from Rust.
    sleeping: usize,
    closed: bool,
}

struct Pool {
    name: String,
    max_threads: usize,
    state: Mutex<PoolState>,
    work: Condvar,
    left: Condvar,
}

/// Every pool that is open, for closing them all at exit.
static POOLS: Mutex<Vec<Weak<Pool>>> = Mutex::new(Vec::new());

/// A server's handler threads.
#[derive(Clone)]
pub struct HandlerThreads {
    pool: Arc<Pool>,
}

/// The default of `handler_threads`: `ThreadPoolExecutor`'s, min(32, cores + 4).
pub fn default_thread_count() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores + 4).min(32)
}

impl HandlerThreads {
    /// A pool of at most `max_threads`; its first thread starts now.
    pub fn new(py: Python<'_>, name: &str, max_threads: usize) -> PyResult<Self> {
        let pool = Arc::new(Pool {
            name: name.to_owned(),
            max_threads: max_threads.max(1),
            state: Mutex::new(PoolState::default()),
            work: Condvar::new(),
            left: Condvar::new(),
        });
        {
            let mut pools = POOLS.lock();
            pools.retain(|p| p.strong_count() > 0);
            pools.push(Arc::downgrade(&pool));
        }
        pool.state.lock().threads = 1;
        if let Err(err) = spawn_thread(py, &pool) {
            pool.state.lock().threads = 0;
            return Err(err);
        }
        Ok(HandlerThreads { pool })
    }

    /// Queues work; from any thread, without the GIL. A closed pool drops it (and with it the
    /// reply channel inside, so its waiter learns that nothing will come).
    pub fn submit(&self, prepare: Prepare) {
        let mut state = self.pool.state.lock();
        if state.closed {
            return;
        }
        state.queue.push_back(prepare);
        drop(state);
        self.pool.work.notify_one();
    }

    /// Closes the pool: queued work is dropped, idle threads leave, busy ones leave when
    /// their call returns.
    pub fn close(&self) {
        self.pool.close();
    }
}

impl Pool {
    fn close(&self) {
        let dropped = {
            let mut state = self.state.lock();
            state.closed = true;
            std::mem::take(&mut state.queue)
        };
        drop(dropped);
        self.work.notify_all();
    }
}

/// Starts one more handler thread for `pool` (with the GIL: it is a Python thread).
fn spawn_thread(py: Python<'_>, pool: &Arc<Pool>) -> PyResult<()> {
    let run = py
        .import("framesock._support")?
        .getattr("run_handler_jobs")?;
    let kwargs = PyDict::new(py);
    kwargs.set_item("target", run)?;
    kwargs.set_item("args", (JobSource { pool: pool.clone() },))?;
    kwargs.set_item("daemon", true)?;
    kwargs.set_item("name", format!("framesock-handler ({})", pool.name))?;
    py.import("threading")?
        .getattr("Thread")?
        .call((), Some(&kwargs))?
        .call_method0("start")?;
    Ok(())
}

thread_local! {
    static ON_HANDLER_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the calling thread is a handler thread (where waiting for a server's own shutdown
/// would wait for itself).
pub fn on_handler_thread() -> bool {
    ON_HANDLER_THREAD.with(|flag| flag.get())
}

/// What a handler thread asks for work.
#[pyclass(frozen, module = "framesock._framesock")]
struct JobSource {
    pool: Arc<Pool>,
}

#[pymethods]
impl JobSource {
    /// The next call to make, waiting without the GIL; None once the pool is closed.
    fn next_job(&self, py: Python<'_>) -> PyResult<Option<Job>> {
        ON_HANDLER_THREAD.with(|flag| flag.set(true));
        let pool = &self.pool;
        loop {
            let mut state = pool.state.lock();
            if state.closed {
                state.threads -= 1;
                return Ok(None);
            }
            if let Some(prepare) = state.queue.pop_front() {
                // Keep one thread in reserve, so a handler that blocks never holds up the next.
                let grow = state.idle == 0 && state.threads < pool.max_threads;
                if grow {
                    state.threads += 1;
                }
                drop(state);
                if grow {
                    if let Err(err) = spawn_thread(py, pool) {
                        pool.state.lock().threads -= 1;
                        err.print(py);
                    }
                }
                if let Some(call) = prepare(py) {
                    return Ok(Some(Job {
                        function: call.function,
                        args: call.args,
                        finish: std::sync::Mutex::new(Some(call.finish)),
                    }));
                }
                continue;
            }
            state.idle += 1;
            state.sleeping += 1;
            drop(state);
            py.detach(|| {
                let mut state = pool.state.lock();
                while state.queue.is_empty() && !state.closed {
                    pool.work.wait(&mut state);
                }
            });
            let mut state = pool.state.lock();
            state.idle -= 1;
            state.sleeping -= 1;
            drop(state);
            pool.left.notify_all();
        }
    }
}

/// One call for a handler thread (see `framesock._support.run_handler_jobs`).
#[pyclass(frozen, module = "framesock._framesock")]
struct Job {
    #[pyo3(get)]
    function: Py<PyAny>,
    #[pyo3(get)]
    args: Py<PyTuple>,
    finish: std::sync::Mutex<Option<Finish>>,
}

impl Job {
    fn finish<'py>(&self, py: Python<'py>, outcome: PyResult<Bound<'py, PyAny>>) {
        let finish = self
            .finish
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(finish) = finish {
            finish(py, outcome);
        }
    }
}

#[pymethods]
impl Job {
    /// The call returned `value`.
    fn done<'py>(&self, py: Python<'py>, value: Bound<'py, PyAny>) {
        self.finish(py, Ok(value));
    }

    /// The call raised `error`.
    fn fail(&self, py: Python<'_>, error: Bound<'_, PyAny>) {
        self.finish(py, Err(PyErr::from_value(error)));
    }
}

/// Closes every pool and waits (without the GIL, at most `limit`) until no handler thread is
/// left inside a GIL-free wait, so none comes back to Python from Rust after this returns.
pub fn close_all(py: Python<'_>, limit: Duration) {
    let pools: Vec<Arc<Pool>> = POOLS.lock().drain(..).filter_map(|p| p.upgrade()).collect();
    for pool in &pools {
        pool.close();
    }
    py.detach(|| {
        let deadline = Instant::now() + limit;
        for pool in &pools {
            let mut state = pool.state.lock();
            while state.sleeping > 0 {
                if pool.left.wait_until(&mut state, deadline).timed_out() {
                    break;
                }
            }
        }
    });
}
