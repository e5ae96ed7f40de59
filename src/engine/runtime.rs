//! The tokio runtime that does the network I/O: started on first use, stopped on request, and
//! replaced in a process made by `fork` (whose copy of the runtime has no threads left).
//!
//! Its threads only ever run engine code: nothing here knows Python, so none of them ever
//! needs an interpreter, which is what lets the program exit at any moment.

use std::future::Future;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::{Handle, Runtime};

use crate::engine::error::{Error, Result};
use crate::engine::lock::ForkSafe;

/// Bumped by [`forget_after_fork`]: objects made under an older generation belong to the
/// parent process and its runtime.
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// The shared runtime: the generation it was made in, and its number of I/O threads.
static SHARED: ForkSafe<Option<Shared>> = ForkSafe::new(|| None);

struct Shared {
    generation: u64,
    threads: usize,
    runtime: Arc<Runtime>,
}

/// How many I/O threads the next runtime starts (0: one per core); see [`set_io_threads`].
static IO_THREADS: AtomicUsize = AtomicUsize::new(0);

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

/// The number of I/O threads: `count`, or one per core for 0.
fn io_thread_count(count: usize) -> usize {
    match count {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        count => count,
    }
}

/// Asks for `count` I/O threads (0: one per core). The runtime starts with them; one already
/// running with another number is an error (its threads cannot be changed).
pub fn set_io_threads(count: usize) -> std::result::Result<(), String> {
    let shared = SHARED.lock();
    match &*shared {
        Some(running) if running.generation == generation() => {
            if running.threads != io_thread_count(count) {
                return Err(format!(
                    "the engine already runs {} I/O threads in this process; io_threads={count} \
                     must be set before the first server or client starts it",
                    running.threads
                ));
            }
        }
        _ => IO_THREADS.store(count, Ordering::Release),
    }
    Ok(())
}

/// A handle on the shared multi-threaded runtime, started on first use.
pub fn handle() -> Handle {
    let mut shared = SHARED.lock();
    let now = generation();
    match &*shared {
        Some(running) if running.generation == now => running.runtime.handle().clone(),
        _ => {
            let threads = io_thread_count(IO_THREADS.load(Ordering::Acquire));
            let runtime = Arc::new(
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(threads)
                    .thread_name("framesock-io")
                    .on_thread_start(|| ENGINE_THREAD.with(|flag| flag.set(true)))
                    .enable_all()
                    .build()
                    .expect("framesock: cannot start the tokio runtime"),
            );
            let handle = runtime.handle().clone();
            *shared = Some(Shared {
                generation: now,
                threads,
                runtime,
            });
            handle
        }
    }
}

/// Stops the shared runtime: its tasks are dropped (closing their sockets) and its threads
/// end, waiting at most `grace` for them. The next [`handle`] starts a new one.
pub fn shut_down(grace: Duration) {
    let taken = SHARED.lock().take();
    if let Some(Shared { runtime, .. }) = taken {
        // Someone else may still hold it (a task being spawned); they drop it later.
        if let Ok(runtime) = Arc::try_unwrap(runtime) {
            runtime.shutdown_timeout(grace);
        }
    }
}

/// Call in the child right after `fork`: the inherited runtime's threads do not exist there, so
/// it is forgotten (never dropped: dropping would wait for those threads), with the lock that
/// a parent thread may have held at the fork, and the next [`handle`] starts a fresh one.
/// Objects made before can tell by [`generation`].
pub fn forget_after_fork() {
    GENERATION.fetch_add(1, Ordering::AcqRel);
    SHARED.forget_after_fork();
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
