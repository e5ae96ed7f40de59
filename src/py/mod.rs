//! The Python face of the engine: the only part of framesock that knows Python.

mod aio;
mod args;
mod bridge;
mod cached;
mod client;
mod errors;
mod gil;
mod handlers;
mod json;
mod loop_reads;
mod named;
mod server;
mod tasks;
mod threads;
mod tls;
mod wait;

use std::time::Duration;

use pyo3::prelude::*;

use crate::engine::runtime;

/// How long the exit hook waits for idle handler threads to leave, and for the engine's
/// threads to stop.
const EXIT_WAIT: Duration = Duration::from_secs(1);

/// Runs at interpreter exit (`atexit`, before finalization): handler threads and event-loop
/// bridges close, then the engine's runtime stops, dropping every connection. After this no
/// engine thread comes back to Python.
#[pyfunction]
fn _at_exit(py: Python<'_>) {
    gil::begin_exit(py, EXIT_WAIT);
    threads::close_all(py, EXIT_WAIT);
    bridge::close_all(py);
    py.detach(|| {
        gil::detached(|| {
            wait::let_waits_leave(EXIT_WAIT);
            runtime::shut_down(EXIT_WAIT)
        })
    });
    gil::bury_the_dead(py);
}

/// Runs in the child after `os.fork()`: the parent's engine threads do not exist here, so
/// the runtime is rebuilt on next use and objects from before the fork let go of it.
#[pyfunction]
fn _after_fork_in_child(py: Python<'_>) {
    runtime::forget_after_fork();
    threads::forget_after_fork();
    bridge::forget_after_fork(py);
}

/// Makes, at import, what pyo3 would otherwise make on first use behind a `PyOnceLock`: the
/// type objects of the private classes and of the abstract types a conversion may check. A
/// `PyOnceLock` lets go of the GIL while it is being filled, so one first filled by an engine
/// thread while another thread forks stays "being made" in the child, and its first use
/// there waits forever (see `cached.rs`). Import runs on one thread, under the import lock.
fn warm_up(py: Python<'_>) {
    use pyo3::types::{PyMapping, PySequence};
    use pyo3::PyTypeInfo;
    let _ = PyMapping::type_object(py);
    let _ = PySequence::type_object(py);
    let _ = pyo3::panic::PanicException::type_object(py);
    let _ = pyo3::exceptions::asyncio::CancelledError::type_object(py);
    handlers::make_types(py);
    bridge::make_types(py);
    loop_reads::make_types(py);
    tasks::make_types(py);
    threads::make_types(py);
}

/// The native module behind the `framesock` package.
#[pymodule]
fn _framesock(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    errors::init(m)?;
    m.add_function(wrap_pyfunction!(server::start_server, m)?)?;
    m.add_function(wrap_pyfunction!(client::start_client, m)?)?;
    m.add_class::<server::Server>()?;
    m.add_class::<client::Client>()?;
    m.add_class::<tls::ServerTls>()?;
    m.add_class::<handlers::PyCaller>()?;
    m.add_class::<tls::ClientTls>()?;
    m.add_class::<aio::AsyncClient>()?;
    m.add_function(wrap_pyfunction!(aio::start_server_async, m)?)?;
    m.add_function(wrap_pyfunction!(json::_json_loads, m)?)?;
    m.add_function(wrap_pyfunction!(json::_json_dumps, m)?)?;
    m.add_function(wrap_pyfunction!(_at_exit, m)?)?;
    m.add_function(wrap_pyfunction!(_after_fork_in_child, m)?)?;
    warm_up(m.py());
    Ok(())
}
