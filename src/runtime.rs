//! The tokio runtime that does all network I/O, and the one way Python code waits on it.

use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;

use pyo3::prelude::*;
use tokio::runtime::Runtime;

use crate::errors::{Error, Result};

/// How often a waiting call comes back for the GIL to let Python run its signal handlers.
const SIGNAL_CHECK_INTERVAL: Duration = Duration::from_millis(50);

/// The process-wide multi-threaded runtime (one worker per core), started on first use.
pub fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .thread_name("framesock-io")
            .on_thread_start(keep_python_thread_state)
            .enable_all()
            .build()
            .expect("framesock: cannot start the tokio runtime")
    })
}

/// Gives the worker thread a Python thread state that lives as long as the thread.
///
/// Without it every `Python::attach` for a handler call creates a thread state and the matching
/// release destroys it again, which costs more than a small handler itself. With one kept
/// (GIL released at once), attaching is only taking the GIL.
fn keep_python_thread_state() {
    // SAFETY: the runtime is only ever started from Python code, so the interpreter is
    // initialised. PyGILState_Ensure makes this thread's state and takes the GIL; SaveThread
    // releases the GIL and leaves the state (and its GILState count of 1) in place.
    unsafe {
        pyo3::ffi::PyGILState_Ensure();
        pyo3::ffi::PyEval_SaveThread();
    }
}

/// A runtime for one caller's thread: `block_on` drives the sockets on the calling thread
/// itself, so a request and its reply cost no hand-offs between threads.
pub fn caller_runtime() -> std::io::Result<Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// Runs `fut` on the shared runtime; see [`wait_on`].
pub fn wait<F>(py: Python<'_>, fut: F) -> PyResult<F::Output>
where
    F: Future + Send,
    F::Output: Send,
{
    wait_on(py, runtime(), fut)
}

/// Runs `fut` to completion on `rt` without holding the GIL, waking every 50 ms to check for
/// signals.
///
/// When a signal handler raises (Ctrl-C gives `KeyboardInterrupt`), the future is dropped, which
/// closes every socket it owns, and the exception is returned.
pub fn wait_on<F>(py: Python<'_>, rt: &Runtime, fut: F) -> PyResult<F::Output>
where
    F: Future + Send,
    F::Output: Send,
{
    let mut fut = std::pin::pin!(fut);
    // A Python handler running on one of our own worker threads may call back into framesock
    // (a client inside a handler): block_on would refuse to nest, block_in_place allows it.
    if tokio::runtime::Handle::try_current().is_ok() {
        return Ok(py.detach(|| tokio::task::block_in_place(|| rt.block_on(fut))));
    }
    loop {
        // The timer must be made inside the runtime, hence the async block.
        let polled = py.detach(|| {
            rt.block_on(async { tokio::time::timeout(SIGNAL_CHECK_INTERVAL, fut.as_mut()).await })
        });
        match polled {
            Ok(output) => return Ok(output),
            Err(_elapsed) => py.check_signals()?,
        }
    }
}

/// Runs `fut` under an optional time limit; `step` names what timed out in the error.
pub async fn within<T, F>(
    limit: Option<Duration>,
    step: impl FnOnce() -> String,
    fut: F,
) -> Result<T>
where
    F: Future<Output = Result<T>>,
{
    match limit {
        None => fut.await,
        Some(limit) => match tokio::time::timeout(limit, fut).await {
            Ok(result) => result,
            Err(_elapsed) => Err(Error::Timeout(format!(
                "timed out after {} s {}",
                limit.as_secs_f64(),
                step()
            ))),
        },
    }
}
