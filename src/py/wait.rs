//! The one way Python code waits on the engine: without the GIL, and Ctrl-C aware.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
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
        let waited = gil::detach_for_python(py, || {
            // Counted before the exit is looked at, SeqCst on both sides (see `let_waits_leave`):
            // either this call sees the exit, or the exit hook sees this call.
            BLOCKED_ON.fetch_add(1, Ordering::SeqCst);
            if gil::exiting_elsewhere() {
                // The runtime is stopping: its timers would panic. This (daemon) thread stays
                // here and goes with the process, as `detach_for_python` has such threads do.
                BLOCKED_ON.fetch_sub(1, Ordering::SeqCst);
                loop {
                    std::thread::park();
                }
            }
            let output = block_on(fut.as_mut());
            BLOCKED_ON.fetch_sub(1, Ordering::SeqCst);
            output
        });
        match waited {
            Ok(output) => {
                gil::bury_the_dead(py);
                return Ok(output);
            }
            Err(_elapsed) => py.check_signals()?,
        }
    }
}

/// Calls inside `block_on` right now.
static BLOCKED_ON: AtomicUsize = AtomicUsize::new(0);

/// At interpreter exit, after the exit has begun and before the runtime stops: lets the calls
/// inside `block_on` come back (each does within one signal-check interval) and stay away. A
/// daemon thread in `serve_forever()` or `request()` otherwise met the runtime stopping under
/// its timer, a Rust panic printed at every such exit.
pub fn let_waits_leave(limit: Duration) {
    let deadline = std::time::Instant::now() + limit;
    while BLOCKED_ON.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
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
