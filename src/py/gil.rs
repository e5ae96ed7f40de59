//! Python references that may be dropped where the GIL is not held.
//!
//! pyo3 lets such a drop wait in its own pool until some thread next takes the GIL, and that
//! pool is guarded by a lock. If an engine thread holds that lock at the instant another thread
//! calls `fork()`, the child inherits it held by a thread that does not exist there, and the
//! child's first call into pyo3 waits forever (measured: about 1 fork in 300 under load). So
//! values that hold Python references and may be dropped on an engine thread are wrapped in
//! [`GilDrop`]: dropped without the GIL, they go to a lock-free list instead, which threads
//! that hold the GIL empty ([`bury_the_dead`]). A thread that forks in the middle of a push
//! only loses that one value in the child.

use std::ops::Deref;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use pyo3::prelude::*;

use crate::engine::runtime;

thread_local! {
    static DETACHED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with the calling thread marked as not holding the GIL (inside `py.detach`).
pub fn detached<T>(f: impl FnOnce() -> T) -> T {
    let was = DETACHED.with(|flag| flag.replace(true));
    let result = f();
    DETACHED.with(|flag| flag.set(was));
    result
}

/// Set by [`begin_exit`]: the interpreter is about to finalize.
static EXITING: AtomicBool = AtomicBool::new(false);
/// The thread that runs the exit (it finalizes the interpreter and is never ended by it).
static EXIT_THREAD: OnceLock<ThreadId> = OnceLock::new();
/// Threads between leaving a GIL-free wait and having the GIL back.
static RETURNING: AtomicUsize = AtomicUsize::new(0);

/// `py.detach(f)` for waits made on behalf of Python code (a blocking call on a user's thread),
/// safe at interpreter exit.
///
/// Python 3.9-3.13 end a thread that asks for the GIL back while the interpreter finalizes
/// with `pthread_exit`, a forced unwind. Through Rust frames that is undefined behaviour, and
/// with an unwinder other than libgcc's (the manylinux wheel links LLVM's) it crashes: a daemon
/// thread in `Client.request` at exit segfaulted 11 runs in 20 on 3.9. So once the exit has
/// begun, a thread other than the exiting one that comes back from its wait never asks for the
/// GIL: it parks for good and vanishes with the process, as Python 3.14 does with such threads.
pub fn detach_for_python<T: Send>(py: Python<'_>, f: impl FnOnce() -> T + Send) -> T {
    let output = py.detach(|| {
        let output = detached(f);
        RETURNING.fetch_add(1, Ordering::SeqCst);
        if exiting_elsewhere() {
            RETURNING.fetch_sub(1, Ordering::SeqCst);
            loop {
                std::thread::park();
            }
        }
        output
    });
    RETURNING.fetch_sub(1, Ordering::SeqCst);
    output
}

/// Threads inside a Rust frame that runs Python code (see [`calling_python`]).
static CALLING: AtomicUsize = AtomicUsize::new(0);

/// Held while a Rust frame runs Python code; see [`calling_python`].
pub struct CallingPython(());

impl Drop for CallingPython {
    fn drop(&mut self) {
        CALLING.fetch_sub(1, Ordering::SeqCst);
    }
}

/// For a Rust frame, called from Python on any thread, that runs Python code (an event loop's
/// callbacks: a handler's first step, `create_future`, a reply's `items()`): that code may let
/// the GIL go at any bytecode, and a thread that asks for it back once finalization has begun
/// is ended by `pthread_exit`, whose forced unwind through pyo3's frames aborts the process
/// ("FATAL: exception not rethrown": a loop in a daemon thread, 1 exit in ~40 under load, 3.10).
/// The exit hook waits for such frames to return ([`begin_exit`]); after it, on a thread other
/// than the exiting one, this is None and the frame must not run Python code (what it was to do
/// goes with the process). SeqCst on both sides: either this sees the exit, or the exit hook
/// sees this frame.
pub fn calling_python() -> Option<CallingPython> {
    CALLING.fetch_add(1, Ordering::SeqCst);
    if exiting_elsewhere() {
        CALLING.fetch_sub(1, Ordering::SeqCst);
        return None;
    }
    Some(CallingPython(()))
}

/// [`calling_python`] for a call Python code made: once the exit has begun elsewhere, a
/// RuntimeError saying so instead (the call does nothing).
pub fn calling_python_or_raise() -> PyResult<CallingPython> {
    calling_python()
        .ok_or_else(|| pyo3::exceptions::PyRuntimeError::new_err("the interpreter is exiting"))
}

/// Marks the start of the interpreter's exit (from the atexit hook, before finalization) and
/// lets threads already on their way back to the GIL (see [`detach_for_python`]) get there, and
/// Rust frames running Python code on other threads (see [`calling_python`]) return.
pub fn begin_exit(py: Python<'_>, limit: Duration) {
    let _ = EXIT_THREAD.set(std::thread::current().id());
    EXITING.store(true, Ordering::SeqCst);
    py.detach(|| {
        let deadline = Instant::now() + limit;
        while (RETURNING.load(Ordering::SeqCst) > 0 || CALLING.load(Ordering::SeqCst) > 0)
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(1));
        }
    });
}

/// Whether the exit has begun and the calling thread is not the one running it: such a thread
/// must not call Python code that may let the GIL go (a socket call, `loop.add_reader`) from
/// a Rust frame, since asking for it back could end the thread there (see
/// [`detach_for_python`]).
pub fn exiting_elsewhere() -> bool {
    EXITING.load(Ordering::SeqCst) && EXIT_THREAD.get() != Some(&std::thread::current().id())
}

/// Whether the calling thread may hold the GIL: not an engine thread, not inside `detached`.
fn may_hold_gil() -> bool {
    !runtime::on_engine_thread() && !DETACHED.with(|flag| flag.get())
}

/// A value holding Python references, safe to drop on any thread (see the module doc).
pub struct GilDrop<T: Send + 'static>(Option<T>);

impl<T: Send + 'static> GilDrop<T> {
    pub fn new(value: T) -> Self {
        GilDrop(Some(value))
    }

    /// The value, to be dropped or used where the GIL is held.
    pub fn into_inner(mut self) -> T {
        self.0.take().expect("present until dropped")
    }
}

impl<T: Send + 'static> Deref for GilDrop<T> {
    type Target = T;

    fn deref(&self) -> &T {
        self.0.as_ref().expect("present until dropped")
    }
}

impl<T: Send + 'static> Drop for GilDrop<T> {
    fn drop(&mut self) {
        if let Some(value) = self.0.take() {
            if may_hold_gil() {
                drop(value);
            } else {
                bury(Box::new(value));
            }
        }
    }
}

/// Drops `value` now if this thread may hold the GIL, else later where one does.
pub fn drop_safely<T: Send + 'static>(value: T) {
    drop(GilDrop::new(value));
}

struct Grave {
    value: Box<dyn Send>,
    next: *mut Grave,
}

/// The values waiting to be dropped with the GIL: a lock-free stack.
static GRAVES: AtomicPtr<Grave> = AtomicPtr::new(ptr::null_mut());

fn bury(value: Box<dyn Send>) {
    let grave = Box::into_raw(Box::new(Grave {
        value,
        next: ptr::null_mut(),
    }));
    let mut head = GRAVES.load(Ordering::Acquire);
    loop {
        // SAFETY: `grave` is ours until the exchange below publishes it.
        unsafe { (*grave).next = head };
        match GRAVES.compare_exchange_weak(head, grave, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return,
            Err(now) => head = now,
        }
    }
}

/// Drops every value buried so far; call with the GIL.
pub fn bury_the_dead(_py: Python<'_>) {
    if GRAVES.load(Ordering::Relaxed).is_null() {
        return;
    }
    let mut grave = GRAVES.swap(ptr::null_mut(), Ordering::AcqRel);
    while !grave.is_null() {
        // SAFETY: the swap gave this thread the whole list; each node came from Box::into_raw.
        let boxed = unsafe { Box::from_raw(grave) };
        grave = boxed.next;
        drop(boxed.value);
    }
}
