//! Handler threads: where sync handlers (and log records) run, never on an I/O thread.
//!
//! A pool belongs to one server and grows on demand up to its `handler_threads`, keeping one
//! idle thread in reserve, so a handler that blocks delays only its own exchange. The threads
//! are Python threads (`threading.Thread`, daemon) that spend their life in
//! `framesock._support.run_handler_jobs`; see there why that loop is Python. At interpreter
//! exit every pool closes and its idle threads leave before finalization begins.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use pyo3::prelude::*;

use crate::engine::lock::{locked, ForkSafe};
use crate::engine::runtime;
use crate::py::gil::{self, drop_safely};

/// Turns a queued item into a call for a handler thread, with the GIL; `None` when there is
/// nothing left to call (the item finished on its own, e.g. a request that is not JSON).
pub type Prepare = Box<dyn FnOnce(Python<'_>) -> Option<Call> + Send>;

/// What a call's outcome is handed to: the value `function(*arguments)` returned, or its
/// exception.
pub type Finish = Box<dyn for<'py> FnOnce(Python<'py>, PyResult<Bound<'py, PyAny>>) + Send>;

/// `function(*arguments)`, made by a handler thread; then `finish` with the outcome.
pub struct Call {
    pub function: Py<PyAny>,
    pub arguments: Py<pyo3::types::PyTuple>,
    pub finish: Finish,
}

struct PoolState {
    queue: VecDeque<Prepare>,
    /// How many times a thread has taken work from the queue (the watchdog's sign of progress;
    /// a count rather than a time, so taking work never reads the clock).
    takes: u64,
    /// Whether the watchdog is looking at the queue.
    watching: bool,
    threads: usize,
    /// Threads started in reserve that have not reached their first wait yet.
    starting: usize,
    /// Threads waiting for work (on the condition variable).
    asleep: usize,
    /// Of those, how many have been woken and are on their way.
    woken: usize,
    /// Threads inside the GIL-free wait of `next_job`, woken or not: these must be out before
    /// the interpreter finalizes, since they come back to Python from Rust.
    in_wait: usize,
    closed: bool,
}

struct Pool {
    name: String,
    /// The engine generation the pool was made in: a pool inherited through `fork` is left
    /// alone in the child (its threads, and the waiters its locks know of, exist only in the
    /// parent; waking them would touch memory the child does not have).
    generation: u64,
    /// Tells the watchdog that work is queued with no thread woken for it.
    watch: tokio::sync::Notify,
    max_threads: usize,
    state: Mutex<PoolState>,
    work: Condvar,
    left: Condvar,
}

/// Every pool that is open, for closing them all at exit.
static POOLS: ForkSafe<Vec<Weak<Pool>>> = ForkSafe::new(Vec::new);

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
            generation: runtime::generation(),
            watch: tokio::sync::Notify::new(),
            max_threads: max_threads.max(1),
            state: Mutex::new(PoolState {
                queue: VecDeque::new(),
                takes: 0,
                watching: false,
                threads: 0,
                starting: 0,
                asleep: 0,
                woken: 0,
                in_wait: 0,
                closed: false,
            }),
            work: Condvar::new(),
            left: Condvar::new(),
        });
        {
            let mut pools = POOLS.lock();
            pools.retain(|p| p.strong_count() > 0);
            pools.push(Arc::downgrade(&pool));
        }
        runtime::handle().spawn(watchdog(pool.clone()));
        locked(&pool.state).threads = 1;
        if let Err(err) = spawn_thread(py, &pool) {
            locked(&pool.state).threads = 0;
            pool.close(); // ends the watchdog
            return Err(err);
        }
        Ok(HandlerThreads { pool })
    }

    /// Queues work; from any thread, without the GIL. A closed pool drops it (and with it the
    /// reply channel inside, so its waiter learns that nothing will come).
    ///
    /// A sleeping thread is woken only when no thread is awake: an awake thread takes the
    /// work as soon as its current call returns, and waking more threads for short calls only
    /// makes them fight over the GIL (8 threads: 0.7x the rate of 1). Should the awake
    /// threads all be stuck in handlers, the pool's watchdog wakes another (see `watchdog`).
    pub fn submit(&self, prepare: Prepare) {
        if self.pool.is_inherited() {
            return;
        }
        let mut state = locked(&self.pool.state);
        if state.closed {
            drop(state);
            drop_safely(prepare);
            return;
        }
        state.queue.push_back(prepare);
        let awake = state.threads - state.asleep - state.starting + state.woken;
        let wake = awake == 0 && state.asleep > 0;
        if wake {
            state.woken += 1;
        }
        let watch = !wake && !state.watching;
        if watch {
            state.watching = true;
        }
        drop(state);
        if wake {
            self.pool.work.notify_one();
        }
        if watch {
            self.pool.watch.notify_one();
        }
    }

    /// The pool's counters, for diagnosis: (queued, threads, starting, asleep, woken,
    /// watching, generation matches).
    pub fn debug_state(&self) -> (usize, usize, usize, usize, usize, bool, bool) {
        let state = locked(&self.pool.state);
        (
            state.queue.len(),
            state.threads,
            state.starting,
            state.asleep,
            state.woken,
            state.watching,
            !self.pool.is_inherited(),
        )
    }

    /// Closes the pool: queued work is dropped, idle threads leave, busy ones leave when
    /// their call returns.
    pub fn close(&self) {
        self.pool.close();
    }
}

impl Pool {
    fn is_inherited(&self) -> bool {
        self.generation != runtime::generation()
    }

    fn close(&self) {
        if self.is_inherited() {
            return;
        }
        self.watch.notify_one();
        let dropped = {
            let mut state = locked(&self.state);
            state.closed = true;
            std::mem::take(&mut state.queue)
        };
        drop_safely(dropped);
        self.work.notify_all();
    }
}

/// The longest a sleeping handler thread goes without looking at the queue. Wake-ups are
/// counted so that normally a thread is woken exactly when work needs one; this bounds the
/// cost of any wake-up that goes missing (one was seen missing, rarely, in a forked child
/// under load, with the cause not found) to this delay instead of a hang.
const RECHECK: Duration = Duration::from_millis(100);

/// How long queued work may go untaken before the watchdog wakes another thread for it.
const STALL: Duration = Duration::from_millis(1);

/// Wakes a sleeping thread whenever work has been queued for `STALL` while no thread took any
/// (the awake ones are all stuck in handlers), so a blocked handler delays others by at most
/// about a millisecond. It looks only while work waits with no thread woken for it: under load
/// that is one timer per millisecond, not one per request. Ends when the pool closes.
async fn watchdog(pool: Arc<Pool>) {
    loop {
        pool.watch.notified().await;
        let mut takes_seen = locked(&pool.state).takes;
        loop {
            tokio::time::sleep(STALL).await;
            let mut state = locked(&pool.state);
            if state.closed {
                return;
            }
            if state.queue.is_empty() {
                state.watching = false;
                break;
            }
            let stalled = state.takes == takes_seen;
            takes_seen = state.takes;
            if stalled && state.asleep > 0 {
                state.woken = (state.woken + 1).min(state.asleep);
                drop(state);
                pool.work.notify_one();
            }
        }
        if locked(&pool.state).closed {
            return;
        }
    }
}

/// Starts the first handler thread of `pool` (with the GIL: it is a Python thread).
fn spawn_thread(py: Python<'_>, pool: &Arc<Pool>) -> PyResult<()> {
    let source = JobSource::new(pool, false);
    py.import("framesock._support")?
        .call_method1("start_handler_thread", (source,))?;
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
    /// Set until this reserve thread's first wait.
    reserve: AtomicBool,
    /// Where the outcome of the call being made goes.
    current: Mutex<Option<Finish>>,
}

#[pymethods]
impl JobSource {
    /// The name for this source's thread.
    #[getter]
    fn thread_name(&self) -> String {
        format!("framesock-handler ({})", self.pool.name)
    }

    /// The current call returned `value`; then the next call to make if one is queued
    /// already (as `next_job` gives it), without waiting: None otherwise. A busy thread so
    /// crosses from Python into Rust once per call instead of twice.
    fn done_and_take<'py>(&self, py: Python<'py>, value: Bound<'py, PyAny>) -> Option<Job> {
        self.finish(py, Ok(value));
        gil::bury_the_dead(py);
        self.take_queued(py, locked(&self.pool.state))
    }

    /// The current call raised `error`.
    fn fail(&self, py: Python<'_>, error: Bound<'_, PyAny>) {
        self.finish(py, Err(PyErr::from_value(error)));
    }

    /// This source's thread failed outside a handler call with `error` (out of memory, say)
    /// and ends: the call in hand, if any, fails with it. Gives the source for a thread to take
    /// its place, so queued work is never left without one; None once the pool is closed.
    fn abandon(&self, py: Python<'_>, error: Bound<'_, PyAny>) -> Option<JobSource> {
        self.finish(py, Err(PyErr::from_value(error)));
        let mut state = locked(&self.pool.state);
        if state.closed {
            state.threads -= 1;
            return None;
        }
        Some(JobSource::new(&self.pool, false))
    }

    /// The thread meant for this source could not be started.
    fn not_started(&self) {
        let mut state = locked(&self.pool.state);
        state.threads -= 1;
        if self.reserve.swap(false, Ordering::Relaxed) {
            state.starting -= 1;
        }
    }

    /// The next call to make, `(function, arguments, reserve)`, waiting without the GIL; None
    /// once the pool is closed. `function` is None when there is only `reserve` (a source of
    /// work for a thread to start first); the call's outcome goes to `done_and_take` or `fail`.
    fn next_job(&self, py: Python<'_>) -> PyResult<Option<Job>> {
        ON_HANDLER_THREAD.with(|flag| flag.set(true));
        gil::bury_the_dead(py);
        let pool = &self.pool;
        let mut reserve = self.reserve.swap(false, Ordering::Relaxed);
        loop {
            let mut state = locked(&pool.state);
            if reserve {
                state.starting -= 1;
            }
            if state.closed {
                state.threads -= 1;
                return Ok(None);
            }
            let take = !reserve;
            reserve = false;
            if take && !state.queue.is_empty() {
                match self.take_queued(py, state) {
                    Some(job) => return Ok(Some(job)),
                    None => continue, // what was queued finished on its own: look again
                }
            }
            state.in_wait += 1;
            drop(state);
            py.detach(|| {
                let mut state = locked(&pool.state);
                // A reserve thread's first wait happens whatever is queued (see spawn_thread).
                let mut first = !take;
                while !state.closed && (first || state.queue.is_empty()) {
                    first = false;
                    state.asleep += 1;
                    // Timed, so queued work never waits on a missed wake-up: a sleeping
                    // thread looks at the queue at least every RECHECK whatever the counts say.
                    let (woken, waited) = pool
                        .work
                        .wait_timeout(state, RECHECK)
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                    state = woken;
                    let timed_out = waited.timed_out();
                    state.asleep -= 1;
                    if !timed_out {
                        state.woken = state.woken.saturating_sub(1);
                    }
                }
            });
            let mut state = locked(&pool.state);
            state.in_wait -= 1;
            drop(state);
            pool.left.notify_all();
        }
    }
}

/// A call for a handler thread: `(function, arguments, reserve)`, see `JobSource::next_job`.
type Job = (
    Option<Py<PyAny>>,
    Option<Py<pyo3::types::PyTuple>>,
    Option<JobSource>,
);

impl JobSource {
    /// A source of `pool`'s work; `reserve` for a thread started in reserve.
    fn new(pool: &Arc<Pool>, reserve: bool) -> Self {
        JobSource {
            pool: pool.clone(),
            reserve: AtomicBool::new(reserve),
            current: Mutex::new(None),
        }
    }

    fn current(&self) -> MutexGuard<'_, Option<Finish>> {
        locked(&self.current)
    }

    /// The first queued item as the next job. Takes the pool's lock (`state`) and releases
    /// it; None once the queue is empty or the pool closed.
    fn take_queued<'a>(
        &'a self,
        py: Python<'_>,
        mut state: MutexGuard<'a, PoolState>,
    ) -> Option<Job> {
        let pool = &self.pool;
        loop {
            if state.closed {
                return None;
            }
            let prepare = state.queue.pop_front()?;
            state.takes += 1;
            // Keep one thread in reserve, so a handler that blocks never holds up the next.
            let grow =
                state.asleep + state.starting <= state.woken && state.threads < pool.max_threads;
            if grow {
                state.threads += 1;
                state.starting += 1;
            }
            drop(state);
            // The handler thread starts the reserve itself, in Python: starting a thread waits
            // for it, and no wait may come back to Python through Rust frames.
            let reserve = grow.then(|| JobSource::new(pool, true));
            match prepare(py) {
                Some(call) => {
                    *self.current() = Some(call.finish);
                    return Some((Some(call.function), Some(call.arguments), reserve));
                }
                None if reserve.is_some() => return Some((None, None, reserve)),
                None => state = locked(&pool.state),
            }
        }
    }

    fn finish<'py>(&self, py: Python<'py>, outcome: PyResult<Bound<'py, PyAny>>) {
        let finish = self.current().take();
        if let Some(finish) = finish {
            finish(py, outcome);
        }
    }
}

/// In a child right after `fork`: the parent's pools have no threads here; they are forgotten
/// (each also knows itself inherited by its generation, and refuses work).
pub fn forget_after_fork() {
    POOLS.forget_after_fork();
}

/// Closes every pool and waits (without the GIL, at most `limit`) until no handler thread is
/// left inside a GIL-free wait, so none comes back to Python from Rust after this returns.
pub fn close_all(py: Python<'_>, limit: Duration) {
    let pools: Vec<Arc<Pool>> = POOLS
        .lock()
        .drain(..)
        .filter_map(|p| p.upgrade())
        .filter(|p| !p.is_inherited())
        .collect();
    for pool in &pools {
        pool.close();
    }
    py.detach(|| {
        let deadline = Instant::now() + limit;
        for pool in &pools {
            let mut state = locked(&pool.state);
            while state.in_wait > 0 {
                let left = deadline.saturating_duration_since(Instant::now());
                let (woken, waited) = pool
                    .left
                    .wait_timeout(state, left)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                state = woken;
                if waited.timed_out() {
                    break;
                }
            }
        }
    });
}

/// Makes this module's private classes' type objects now, at import (see `py::warm_up`).
pub(super) fn make_types(py: Python<'_>) {
    let _ = <JobSource as pyo3::PyTypeInfo>::type_object(py);
}
