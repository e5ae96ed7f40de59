//! A coroutine handler's Task, started at once.
//!
//! Every exchange with a coroutine handler is a real `asyncio.Task`: its own copy of the
//! context, `current_task()`, `asyncio.timeout()` and cancellation work as in any Task. A Task's
//! first step normally waits for the loop's next iteration, behind a `loop.call_soon` and its
//! Handle. Python 3.12+ can start a Task eagerly (`eager_start=True`), and framesock asks it to.
//!
//! Before 3.12, on asyncio's own loop, framesock does what eager start does: while the Task's
//! constructor runs, the loop's `call_soon` is shadowed by a catcher (an instance attribute,
//! removed as soon as the constructor returns), and the step the constructor hands it is run
//! at once, in the Task's context, as its Handle would have run it. The Task, its registration
//! and every later step are asyncio's own; only the first step's Handle and the loop iteration
//! it waited for are saved. uvloop's loop cannot be shadowed (it has no instance attributes):
//! there the first step waits for the next iteration, as in any asyncio program.

use std::sync::{Mutex, OnceLock};

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use crate::engine::lock::locked;
use crate::py::cached::{interned, Cached};

/// Whether this interpreter starts Tasks eagerly itself (3.12+).
fn eager_start_exists(py: Python<'_>) -> bool {
    static AT_LEAST_312: OnceLock<bool> = OnceLock::new();
    *AT_LEAST_312.get_or_init(|| py.version_info() >= (3, 12))
}

/// `types.CoroutineType`.
fn coroutine_type(py: Python<'_>) -> &Bound<'_, pyo3::types::PyType> {
    static COROUTINE: Cached<Py<pyo3::types::PyType>> = Cached::new();
    COROUTINE
        .import(py, "types", "CoroutineType")
        .expect("types.CoroutineType exists")
}

/// How handler Tasks are made on one loop, worked out once per loop.
pub struct TaskSetup {
    /// Whether a Task's first step can be caught and run at once (see `first_step_catchable`).
    catch_first_step: bool,
    /// The constructor's keyword arguments, the same for every Task: `loop`, a fixed `name`
    /// (3.9-3.11 otherwise format a `Task-<n>` for each), and `eager_start` on 3.12+. Made
    /// once, named: 6.45 -> 6.0 µs of loop-thread CPU per request on 3.11 (32 connections).
    kwargs: Py<PyDict>,
}

/// The name of every handler Task.
const TASK_NAME: &str = "framesock-handler";

impl TaskSetup {
    pub fn for_loop(event_loop: &Bound<'_, PyAny>) -> PyResult<TaskSetup> {
        let py = event_loop.py();
        let kwargs = PyDict::new(py);
        kwargs.set_item(interned!(py, "loop"), event_loop)?;
        kwargs.set_item(interned!(py, "name"), interned!(py, TASK_NAME))?;
        if eager_start_exists(py) {
            kwargs.set_item(interned!(py, "eager_start"), true)?;
        }
        Ok(TaskSetup {
            catch_first_step: first_step_catchable(event_loop)?,
            kwargs: kwargs.unbind(),
        })
    }
}

/// Whether a Task's first step can be caught and run at once on `event_loop` (Python before
/// 3.12): asyncio's own `call_soon`, not overridden by its class, and a loop that is not in
/// debug mode (whose `call_soon` checks more).
fn first_step_catchable(event_loop: &Bound<'_, PyAny>) -> PyResult<bool> {
    let py = event_loop.py();
    if eager_start_exists(py) {
        return Ok(false);
    }
    static BASE_CALL_SOON: Cached<Py<PyAny>> = Cached::new();
    let base = BASE_CALL_SOON.get_or_try_init(|| {
        Ok::<_, PyErr>(
            py.import("asyncio")?
                .getattr("BaseEventLoop")?
                .getattr("call_soon")?
                .unbind(),
        )
    })?;
    let own = event_loop.get_type().getattr("call_soon")?;
    Ok(own.is(base.bind(py))
        && event_loop.hasattr(interned!(py, "__dict__"))?
        && !event_loop.call_method0("get_debug")?.is_truthy()?)
}

/// Runs `awaitable` as a Task on `event_loop`, the way `await`ing it in a task of its own
/// would, with its first step taken at once where it can be (see the module doc), so a handler
/// that finishes without waiting costs no extra loop iteration. `setup` is this loop's
/// [`TaskSetup`]. `when_done(task)`, if given, is called once the
/// Task is done: at once if it finished in its first step. `None` when making the Task (or its
/// first step) raised `SystemExit` or `KeyboardInterrupt`, which then leaves the loop.
pub fn run_as_task<'py>(
    py: Python<'py>,
    event_loop: &Bound<'py, PyAny>,
    setup: &TaskSetup,
    awaitable: &Bound<'py, PyAny>,
    when_done: Option<Bound<'py, PyAny>>,
) -> PyResult<Option<Bound<'py, PyAny>>> {
    static TASK: Cached<Py<PyAny>> = Cached::new();
    static ENSURE_FUTURE: Cached<Py<PyAny>> = Cached::new();
    let made = if awaitable.is_instance(coroutine_type(py))? {
        let task_type = TASK.import(py, "asyncio", "Task")?;
        let kwargs = setup.kwargs.bind(py);
        if setup.catch_first_step {
            task_stepped_now(py, event_loop, task_type, awaitable, kwargs)
        } else {
            task_type.call((awaitable,), Some(kwargs))
        }
    } else {
        let kwargs = PyDict::new(py);
        kwargs.set_item(interned!(py, "loop"), event_loop)?;
        ENSURE_FUTURE
            .import(py, "asyncio", "ensure_future")?
            .call((awaitable,), Some(&kwargs))
    };
    let task = match made {
        // From the eager step, or a signal's handler run meanwhile: it leaves the loop, not
        // this one exchange.
        Err(err) if leaves_the_loop(py, &err) => {
            raise_on_the_loop(event_loop, err);
            return Ok(None);
        }
        made => made?,
    };
    let Some(when_done) = when_done else {
        return Ok(Some(task));
    };
    if task.call_method0(interned!(py, "done"))?.is_truthy()? {
        // Finished in its first step: its outcome is taken now, not a loop iteration later
        // from a done-callback.
        when_done.call1((&task,))?;
    } else {
        task.call_method1(interned!(py, "add_done_callback"), (when_done,))?;
    }
    Ok(Some(task))
}

/// A `loop.call_soon` call, caught.
struct Soon {
    callback: Py<PyAny>,
    args: Py<PyTuple>,
    context: Option<Py<PyAny>>,
}

/// Stands in for `loop.call_soon` while a Task is made: keeps what it is asked to run.
#[pyclass(frozen)]
#[derive(Default)]
struct CatchSoon {
    caught: Mutex<Vec<Soon>>,
}

#[pymethods]
impl CatchSoon {
    #[pyo3(signature = (callback, *args, context=None))]
    fn __call__(&self, callback: Py<PyAny>, args: Py<PyTuple>, context: Option<Py<PyAny>>) {
        locked(&self.caught).push(Soon {
            callback,
            args,
            context,
        });
    }
}

/// Makes the Task with the loop's `call_soon` shadowed, then takes its first step now.
fn task_stepped_now<'py>(
    py: Python<'py>,
    event_loop: &Bound<'py, PyAny>,
    task_type: &Bound<'py, PyAny>,
    awaitable: &Bound<'py, PyAny>,
    kwargs: &Bound<'py, PyDict>,
) -> PyResult<Bound<'py, PyAny>> {
    let call_soon = interned!(py, "call_soon");
    let attributes = event_loop.getattr(interned!(py, "__dict__"))?;
    if attributes.contains(call_soon)? {
        // Someone else shadows it already: leave theirs alone.
        return task_type.call((awaitable,), Some(kwargs));
    }
    let catch = Bound::new(py, CatchSoon::default())?;
    event_loop.setattr(call_soon, &catch)?;
    let made = task_type.call((awaitable,), Some(kwargs));
    event_loop.delattr(call_soon)?;
    let caught = std::mem::take(&mut *locked(&catch.get().caught));
    // Anything else asked for meanwhile (a finalizer run by the garbage collector, say) goes
    // to the real `call_soon`, in order; the Task's own step (bound to the Task) runs now.
    let mut first_step = None;
    for soon in caught {
        let is_step = match &made {
            Ok(task) => {
                first_step.is_none()
                    && soon
                        .callback
                        .bind(py)
                        .getattr(interned!(py, "__self__"))
                        .is_ok_and(|owner| owner.is(task))
            }
            Err(_) => false,
        };
        if is_step {
            first_step = Some(soon);
        } else {
            call_soon_later(event_loop, soon)?;
        }
    }
    let task = made?;
    if let Some(step) = first_step {
        run_soon(event_loop, step);
    }
    Ok(task)
}

/// Hands a caught call to the loop's real `call_soon`.
fn call_soon_later(event_loop: &Bound<'_, PyAny>, soon: Soon) -> PyResult<()> {
    let py = event_loop.py();
    let mut positional = vec![soon.callback.into_bound(py)];
    positional.extend(soon.args.bind(py).iter());
    let kwargs = PyDict::new(py);
    if let Some(context) = soon.context {
        kwargs.set_item(interned!(py, "context"), context)?;
    }
    event_loop
        .getattr(interned!(py, "call_soon"))?
        .call(PyTuple::new(py, positional)?, Some(&kwargs))?;
    Ok(())
}

/// Runs a caught call now, as `asyncio.Handle._run` would: in its context; an exception goes to
/// the loop's exception handler, and `SystemExit` or `KeyboardInterrupt` leaves the loop.
fn run_soon(event_loop: &Bound<'_, PyAny>, soon: Soon) {
    let py = event_loop.py();
    let callback = soon.callback.bind(py);
    let outcome = match &soon.context {
        Some(context) => {
            let mut positional = vec![callback.clone()];
            positional.extend(soon.args.bind(py).iter());
            PyTuple::new(py, positional).and_then(|positional| {
                context
                    .bind(py)
                    .call_method1(interned!(py, "run"), positional)
            })
        }
        None => callback.call1(soon.args.bind(py)),
    };
    let Err(err) = outcome else {
        return;
    };
    if leaves_the_loop(py, &err) {
        return raise_on_the_loop(event_loop, err);
    }
    let context = PyDict::new(py);
    let told = context
        .set_item("message", format!("Exception in callback {callback}"))
        .and_then(|()| context.set_item("exception", err.value(py)))
        .and_then(|()| {
            event_loop.call_method1(interned!(py, "call_exception_handler"), (context,))
        });
    if let Err(unsaid) = told {
        unsaid.print(py);
    }
}

/// Whether `err` is one that leaves the event loop from any callback.
fn leaves_the_loop(py: Python<'_>, err: &PyErr) -> bool {
    err.is_instance_of::<pyo3::exceptions::PySystemExit>(py)
        || err.is_instance_of::<pyo3::exceptions::PyKeyboardInterrupt>(py)
}

/// Raises `err` again from a callback of the loop's own, so that it leaves the loop as it
/// would have left the Task's step.
fn raise_on_the_loop(event_loop: &Bound<'_, PyAny>, err: PyErr) {
    let py = event_loop.py();
    static RAISE_AGAIN: Cached<Py<PyAny>> = Cached::new();
    let raised = RAISE_AGAIN
        .import(py, "framesock._support", "raise_again")
        .and_then(|raise_again| {
            event_loop.call_method1(interned!(py, "call_soon"), (raise_again, err.value(py)))
        });
    if let Err(unsaid) = raised {
        unsaid.print(py);
    }
}

/// Makes this module's private classes' type objects now, at import (see `py::warm_up`).
pub(super) fn make_types(py: Python<'_>) {
    let _ = <CatchSoon as pyo3::PyTypeInfo>::type_object(py);
}
