//! The one way Python code waits on the engine: without the GIL, and Ctrl-C aware.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use pyo3::prelude::*;
use tokio::runtime::{Handle, Runtime};
use tokio::time::error::Elapsed;

use crate::engine::runtime;
use crate::py::gil;

/// How often a waiting call comes back for the GIL to let Python run its signal handlers.
const SIGNAL_CHECK_INTERVAL: Duration = Duration::from_millis(50);

/// Polls `fut` without the GIL through `block_on` for one signal-check interval at a time.
///
/// When a signal handler raises (Ctrl-C gives `KeyboardInterrupt`), the future is dropped, which
/// closes every socket it owns, and the exception is returned.
fn wait_with<F, B>(py: Python<'_>, fut: F, block_on: B) -> PyResult<F::Output>
where
    F: Future + Send,
    F::Output: Send,
    B: Fn(Pin<&mut F>) -> Result<F::Output, Elapsed> + Sync,
{
    let mut fut = std::pin::pin!(fut);
    loop {
        match gil::detach_for_python(py, || block_on(fut.as_mut())) {
            Ok(output) => {
                gil::bury_the_dead(py);
                return Ok(output);
            }
            Err(_elapsed) => py.check_signals()?,
        }
    }
}

/// Runs `fut` on the calling thread's own runtime `rt` (see `runtime::caller_runtime`).
pub fn wait_on<F>(py: Python<'_>, rt: &Runtime, fut: F) -> PyResult<F::Output>
where
    F: Future + Send,
    F::Output: Send,
{
    // The timer must be made inside the runtime, hence the async block.
    wait_with(py, fut, |fut| {
        rt.block_on(async { tokio::time::timeout(SIGNAL_CHECK_INTERVAL, fut).await })
    })
}

/// Runs `fut` on the calling thread, with the shared runtime's sockets and timers.
pub fn wait<F>(py: Python<'_>, fut: F) -> PyResult<F::Output>
where
    F: Future + Send,
    F::Output: Send,
{
    let handle: Handle = runtime::handle();
    wait_with(py, fut, |fut| {
        handle.block_on(async { tokio::time::timeout(SIGNAL_CHECK_INTERVAL, fut).await })
    })
}
