//! Arguments that name themselves when given a value of the wrong type.
//!
//! pyo3 reports such a value with the conversion's own words (`'str' object cannot be
//! interpreted as an integer`) and names the argument only in a note, on Python 3.11+. Each
//! function here converts one argument of the public entry points (`#[pyo3(from_py_with =
//! named::port)]`) and says which it is, what it takes and what it got:
//! `port must be an int, got str '8000'`. The range checks that follow (`args`) name their
//! argument too.

use std::path::PathBuf;

use pyo3::conversion::FromPyObjectOwned;
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;

use crate::py::args::Int;
use crate::py::tls::{ClientTls, ServerTls};

/// The longest part of a value's repr quoted in a message.
const MOST_SHOWN: usize = 40;

/// `value` as `T`, or a TypeError naming `name`, what it takes (`what`) and what it got.
fn named<'py, T: FromPyObjectOwned<'py>>(
    value: &Bound<'py, PyAny>,
    name: &str,
    what: &str,
) -> PyResult<T> {
    value.extract::<T>().map_err(|err| {
        let err: PyErr = err.into();
        if err.is_instance_of::<PyTypeError>(value.py()) {
            wrong_type(value, name, what)
        } else {
            err
        }
    })
}

/// `NAME must be WHAT, got TYPE REPR`, the repr cut to `MOST_SHOWN` characters.
pub fn wrong_type(value: &Bound<'_, PyAny>, name: &str, what: &str) -> PyErr {
    let kind = value
        .get_type()
        .name()
        .map(|name| name.to_string())
        .unwrap_or_else(|_| String::from("object"));
    let shown = value
        .repr()
        .map(|text| text.to_string())
        .unwrap_or_else(|_| String::from("<no repr>"));
    let shown = match shown.char_indices().nth(MOST_SHOWN) {
        Some((cut, _)) => format!("{}...", &shown[..cut]),
        None => shown,
    };
    PyTypeError::new_err(format!("{name} must be {what}, got {kind} {shown}"))
}

/// A value `json.dumps` refuses, given as argument `name` (`response`, `message`): the same
/// kind of error (TypeError, ValueError), saying which argument it was.
pub fn not_json(py: Python<'_>, name: &str, err: PyErr) -> PyErr {
    let message = format!("{name} cannot be sent as JSON: {}", err.value(py));
    if err.is_instance_of::<PyTypeError>(py) {
        PyTypeError::new_err(message)
    } else if err.is_instance_of::<pyo3::exceptions::PyValueError>(py) {
        pyo3::exceptions::PyValueError::new_err(message)
    } else {
        err
    }
}

/// One converter per argument: `function(name): type = "what it takes";`.
macro_rules! arguments {
    ($($function:ident($name:literal): $type:ty = $what:literal;)*) => {
        $(
            pub fn $function(value: &Bound<'_, PyAny>) -> PyResult<$type> {
                named(value, $name, $what)
            }
        )*
    };
}

arguments! {
    host("host"): String = "a str";
    host_or_none("host"): Option<String> = "a str or None";
    port("port"): Int = "an int";
    port_or_none("port"): Option<Int> = "an int or None";
    path("path"): Option<PathBuf> = "a str or os.PathLike or None";
    protocol("protocol"): String = "a str";
    request_as("request_as"): String = "a str";
    timeout("timeout"): Option<f64> = "a number or None";
    idle_timeout("idle_timeout"): Option<f64> = "a number or None";
    max_frame("max_frame"): Int = "an int";
    max_reply("max_reply"): Int = "an int";
    max_connections("max_connections"): Int = "an int";
    backlog("backlog"): Int = "an int";
    max_unsent("max_unsent"): Int = "an int";
    max_buffered("max_buffered"): Int = "an int";
    handler_threads("handler_threads"): Option<Int> = "an int or None";
    max_connections_per_address("max_connections_per_address"): Option<Int> = "an int or None";
    fd("fd"): Option<Int> = "an int or None";
    io_threads("io_threads"): Option<Int> = "an int or None";
    proxy_protocol("proxy_protocol"): bool = "a bool";
    proxy_from("proxy_from"): Option<Vec<String>> = "a list of str or None";
    addresses("addresses"): Option<Vec<(String, Int)>> = "a list of (host, port) or None";
    retries("retries"): Int = "an int";
    idempotent("idempotent"): bool = "a bool";
    idempotent_or_none("idempotent"): Option<bool> = "a bool or None";
    server_name("server_name"): Option<String> = "a str or None";
}

/// `tls=` of a server.
pub fn server_tls<'py>(value: &Bound<'py, PyAny>) -> PyResult<Option<PyRef<'py, ServerTls>>> {
    named(value, "tls", "a framesock.ServerTLS or None")
}

/// `tls=` of a client.
pub fn client_tls<'py>(value: &Bound<'py, PyAny>) -> PyResult<Option<PyRef<'py, ClientTls>>> {
    named(value, "tls", "a framesock.ClientTLS or None")
}

/// `ready=`: a callable or None.
pub fn ready<'py>(value: &Bound<'py, PyAny>) -> PyResult<Option<Bound<'py, PyAny>>> {
    if value.is_none() {
        Ok(None)
    } else if value.is_callable() {
        Ok(Some(value.clone()))
    } else {
        Err(wrong_type(value, "ready", "callable or None"))
    }
}
