//! framesock's engine: length-prefixed JSON messages over TCP, driven from Python.

mod aio;
mod args;
mod bridge;
mod client;
pub mod codec;
mod errors;
mod json;
mod net;
mod runtime;
mod server;
mod service;

use pyo3::prelude::*;

/// The native module behind the `framesock` package.
#[pymodule]
fn _framesock(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    errors::init(m)?;
    m.add_function(wrap_pyfunction!(server::start_server, m)?)?;
    m.add_function(wrap_pyfunction!(client::start_client, m)?)?;
    m.add_class::<server::Server>()?;
    m.add_class::<client::Client>()?;
    m.add_class::<aio::AsyncClient>()?;
    m.add_function(wrap_pyfunction!(aio::start_server_async, m)?)?;
    Ok(())
}
