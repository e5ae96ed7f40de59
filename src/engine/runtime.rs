//! The tokio runtime that does the network I/O: started on first use, stopped on request, and
//! replaced in a process made by `fork` (whose copy of the runtime has no threads left).
//!
//! Its threads only ever run engine code: nothing here knows Python, so none of them ever
//! needs an interpreter, which is what lets the program exit at any moment.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::runtime::{Handle, Runtime};

use crate::engine::error::{Error, Result};
use crate::engine::lock::locked;

/// Bumped by [`forget_after_fork`]: objects made under an older generation belong to the
/// parent process and its runtime.
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// The shared runtime and the generation it was made in.
static SHARED: Mutex<Option<(u64, Arc<Runtime>)>> = Mutex::new(None);

thread_local! {
    static ENGINE_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the calling thread is one of the shared runtime's worker threads.
pub fn on_engine_thread() -> bool {
    ENGINE_THREAD.with(|flag| flag.get())
}

/// The current generation (see [`forget_after_fork`]).
pub fn generation() -> u64 {
    GENERATION.load(Ordering::Acquire)
}

/// A handle on the shared multi-threaded runtime (one worker per core), started on first use.
pub fn handle() -> Handle {
    let mut shared = locked(&SHARED);
    let now = generation();
    match &*shared {
        Some((made_in, runtime)) if *made_in == now => runtime.handle().clone(),
        _ => {
            let runtime = Arc::new(
                tokio::runtime::Builder::new_multi_thread()
                    .thread_name("framesock-io")
                    .on_thread_start(|| ENGINE_THREAD.with(|flag| flag.set(true)))
                    .enable_all()
                    .build()
                    .expect("framesock: cannot start the tokio runtime"),
            );
            let handle = runtime.handle().clone();
            *shared = Some((now, runtime));
            handle
        }
    }
}

/// Stops the shared runtime: its tasks are dropped (closing their sockets) and its threads
/// end, waiting at most `grace` for them. The next [`handle`] starts a new one.
pub fn shut_down(grace: Duration) {
    let taken = locked(&SHARED).take();
    if let Some((_, runtime)) = taken {
        // Someone else may still hold it (a task being spawned); they drop it later.
        if let Ok(runtime) = Arc::try_unwrap(runtime) {
            runtime.shutdown_timeout(grace);
        }
    }
}

/// Call in the child right after `fork`: the inherited runtime's threads do not exist there, so
/// it is forgotten (never dropped: dropping would wait for those threads) and the next
/// [`handle`] starts a fresh one. Objects made before can tell by [`generation`].
pub fn forget_after_fork() {
    GENERATION.fetch_add(1, Ordering::AcqRel);
    // The lock may have been held by a thread of the parent at the moment of the fork; in the
    // child that thread is gone, so the lock is replaced rather than taken.
    let old = locked(&SHARED).take();
    std::mem::forget(old);
}

/// A runtime for one caller's thread: `block_on` drives the sockets on the calling thread
/// itself, so a request and its reply cost no hand-offs between threads.
pub fn caller_runtime() -> std::io::Result<Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
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
