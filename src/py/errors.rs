//! The one exception hierarchy, and how every engine error becomes a Python exception.
//!
//! ```text
//! FramesockError(Exception)
//! ├── FrameTooLargeError(FramesockError, ValueError)          length over max_frame / max_reply
//! ├── JSONDecodeError(FramesockError, json.JSONDecodeError)  bytes that are not JSON
//! ├── ConnectionClosedError(FramesockError, ConnectionError) peer left mid-frame / without reply
//! ├── TLSError(FramesockError, ssl.SSLError)                 a TLS handshake failed
//! ├── ProtocolError(FramesockError, ConnectionError)         peer speaks another protocol, or
//! │                                                          sent a frame nobody asked for
//! ├── FramesockTimeoutError(FramesockError, TimeoutError)     a step outlived its timeout
//! └── RemoteError(FramesockError)                            the server sent an error reply
//! ```
//! Each class also derives from the builtin a caller already catches; OS errors stay Python's own
//! `OSError` subclasses (built from errno, exactly as the `socket` module builds them).

use std::io;

use crate::py::cached::{interned, Cached};
use pyo3::exceptions::{
    PyConnectionError, PyException, PyOSError, PyRecursionError, PyTimeoutError,
    PyUnicodeDecodeError, PyValueError,
};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString, PyTuple, PyType};

use crate::engine::codec::WireError;
use crate::engine::error::{Error, Failure};
use crate::py::gil::GilDrop;

/// The exception classes, made once per interpreter with the builtins as extra bases.
pub struct Exceptions {
    pub base: Py<PyType>,
    pub frame_too_large: Py<PyType>,
    pub json_decode: Py<PyType>,
    pub connection_closed: Py<PyType>,
    pub protocol: Py<PyType>,
    pub tls: Py<PyType>,
    pub timeout: Py<PyType>,
    pub remote: Py<PyType>,
}

static EXCEPTIONS: Cached<Exceptions> = Cached::new();

fn make_class(
    py: Python<'_>,
    name: &str,
    bases: Bound<'_, PyTuple>,
    doc: &str,
) -> PyResult<Py<PyType>> {
    let namespace = PyDict::new(py);
    namespace.set_item("__module__", "framesock")?;
    namespace.set_item("__doc__", doc)?;
    let class = py.get_type::<PyType>().call1((name, bases, namespace))?;
    Ok(class.cast_into::<PyType>()?.unbind())
}

/// The exception classes for this interpreter.
pub fn exceptions<'py>(py: Python<'py>) -> PyResult<&'py Exceptions> {
    EXCEPTIONS.get_or_try_init(|| {
        let base = make_class(
            py,
            "FramesockError",
            PyTuple::new(py, [py.get_type::<PyException>()])?,
            "Base class of every error framesock raises itself.",
        )?;
        let with = |builtin: Bound<'py, PyAny>| PyTuple::new(py, [base.bind(py).as_any().clone(), builtin]);
        let json_error = py.import("json")?.getattr("JSONDecodeError")?;
        Ok(Exceptions {
            frame_too_large: make_class(
                py,
                "FrameTooLargeError",
                with(py.get_type::<PyValueError>().into_any())?,
                "A declared frame length (or an unframed reply) is over max_frame / max_reply.",
            )?,
            json_decode: make_class(
                py,
                "JSONDecodeError",
                with(json_error)?,
                "Bytes that should be JSON are not; `pos`, `lineno` and `colno` say where it broke.",
            )?,
            connection_closed: make_class(
                py,
                "ConnectionClosedError",
                with(py.get_type::<PyConnectionError>().into_any())?,
                "The peer closed the connection mid-frame or before replying.",
            )?,
            protocol: make_class(
                py,
                "ProtocolError",
                with(py.get_type::<PyConnectionError>().into_any())?,
                "The peer does not speak the protocol asked for (e.g. a framed client talking to \
                 a classic server), or sent a reply no request asked for; the connection is \
                 dropped and the next request opens a new one.",
            )?,
            tls: make_class(
                py,
                "TLSError",
                with(py.import("ssl")?.getattr("SSLError")?)?,
                "A TLS handshake failed; the message says why (unknown issuer, name mismatch, \
                 expired, no client certificate, a peer that does not speak TLS).",
            )?,
            timeout: make_class(
                py,
                "FramesockTimeoutError",
                with(py.get_type::<PyTimeoutError>().into_any())?,
                "A network step took longer than its timeout.",
            )?,
            remote: make_class(
                py,
                "RemoteError",
                PyTuple::new(py, [base.bind(py)])?,
                "The server answered with an error reply; `kind` says what failed (handler, encode, \
                 bad_request, frame_too_large) and the message is the server's.",
            )?,
            base,
        })
    })
}

/// Builds an exception of one of our classes with the given constructor arguments.
fn raise<A>(py: Python<'_>, pick: fn(&Exceptions) -> &Py<PyType>, args: A) -> PyErr
where
    A: for<'py> IntoPyObject<'py, Target = PyTuple> + Send + Sync + 'static,
{
    match exceptions(py) {
        Ok(classes) => PyErr::from_type(pick(classes).bind(py).clone(), args),
        Err(err) => err,
    }
}

/// `RemoteError(message)` with `.kind`, for a framed error reply `{"error": kind, "message": text}`.
pub fn remote_error(py: Python<'_>, payload: &[u8]) -> PyErr {
    let (kind, message) = match serde_json::from_slice::<serde_json::Value>(payload) {
        Ok(value) => (
            value["error"].as_str().unwrap_or("unknown").to_owned(),
            value["message"].as_str().unwrap_or("").to_owned(),
        ),
        Err(_) => (
            "unknown".to_owned(),
            String::from_utf8_lossy(payload).into_owned(),
        ),
    };
    let build = || -> PyResult<PyErr> {
        let error = exceptions(py)?
            .remote
            .bind(py)
            .call1((format!("server error ({kind}): {message}"),))?;
        error.setattr("kind", kind.as_str())?;
        error.setattr("remote_message", message.as_str())?;
        Ok(PyErr::from_value(error))
    };
    build().unwrap_or_else(|err| err)
}

/// `framesock.JSONDecodeError` for a document that Python's `json.loads` refused with `err`.
///
/// A `json.JSONDecodeError` keeps its message and position. The other ways `json.loads` refuses
/// bytes become a JSONDecodeError too, so callers catch one kind: bytes that are not UTF-8 (a
/// `UnicodeDecodeError` there; here at the first bad byte), nesting past the recursion limit (a
/// `RecursionError` there; here at position 0), an integer past `sys.get_int_max_str_digits()`
/// (a plain `ValueError` there; here at `near`, the byte where framesock's own parser stopped).
pub fn refused_json(py: Python<'_>, text: &[u8], err: PyErr, near: usize) -> PyErr {
    let classes = match exceptions(py) {
        Ok(classes) => classes,
        Err(other) => return other,
    };
    let exception = err.value(py);
    let reason = || exception.str().map(|s| s.to_string()).unwrap_or_default();
    let lossy = || {
        PyString::new(py, &String::from_utf8_lossy(text))
            .into_any()
            .unbind()
    };
    let args = if exception
        .is_instance(classes.json_decode.bind(py))
        .unwrap_or(false)
    {
        return err; // already ours
    } else if let Some((message, doc, pos)) = json_decode_error_args(exception) {
        (message, doc, pos)
    } else if err.is_instance_of::<PyUnicodeDecodeError>(py) {
        let start: usize = exception
            .getattr("start")
            .and_then(|s| s.extract())
            .unwrap_or(0);
        let message = format!("not UTF-8 ({})", reason());
        (message, lossy(), char_count(text, start))
    } else if err.is_instance_of::<PyRecursionError>(py) {
        (format!("nested too deeply ({})", reason()), lossy(), 0)
    } else if err.is_instance_of::<PyValueError>(py) {
        (reason(), lossy(), char_count(text, near))
    } else {
        return err; // MemoryError and the like: not about the document
    };
    raise(py, |c| &c.json_decode, args)
}

/// `framesock.JSONDecodeError(message, doc, pos)`.
pub fn json_decode_error(py: Python<'_>, message: String, doc: Py<PyAny>, pos: usize) -> PyErr {
    match exceptions(py) {
        Ok(_) => raise(py, |c| &c.json_decode, (message, doc, pos)),
        Err(other) => other,
    }
}

/// `(msg, doc, pos)` of a `json.JSONDecodeError`; None for any other exception.
pub fn json_decode_error_args(exception: &Bound<'_, PyAny>) -> Option<(String, Py<PyAny>, usize)> {
    let class = exception
        .py()
        .import("json")
        .ok()?
        .getattr("JSONDecodeError")
        .ok()?;
    if !exception.is_instance(&class).ok()? {
        return None;
    }
    let field = |name: &str| exception.getattr(name).ok();
    Some((
        field("msg")?.extract().ok()?,
        field("doc")?.unbind(),
        field("pos")?.extract().ok()?,
    ))
}

/// How many characters the first `bytes` bytes of `text` decode to (as `doc[:pos]` counts).
fn char_count(text: &[u8], bytes: usize) -> usize {
    String::from_utf8_lossy(&text[..bytes.min(text.len())])
        .chars()
        .count()
}

/// An `OSError` built the way the `socket` module builds one: `OSError(errno, strerror)`, which
/// Python turns into the matching subclass (ConnectionRefusedError, ...).
fn os_error(err: io::Error, doing: &str) -> PyErr {
    match err.raw_os_error() {
        Some(errno) => {
            let text = io::Error::from_raw_os_error(errno).to_string();
            let text = text.split(" (os error").next().unwrap_or(&text).to_owned();
            PyOSError::new_err((errno, format!("{text} ({doing})")))
        }
        // The engine's own refusals (an adopted fd that is not a listening socket): EINVAL.
        None if err.kind() == io::ErrorKind::InvalidInput => {
            PyOSError::new_err((libc::EINVAL, format!("{err} ({doing})")))
        }
        None => PyErr::from(err),
    }
}

impl From<Error> for PyErr {
    fn from(err: Error) -> PyErr {
        Python::attach(|py| match err {
            // As the failure itself, marked: `request_sent` is False, no server acted on it.
            Error::Connect(inner) => {
                let err = PyErr::from(*inner);
                let _ = err.value(py).setattr(interned!(py, "request_sent"), false);
                err
            }
            Error::Wire(WireError::Io(io)) => os_error(io, "while exchanging data"),
            Error::Wire(
                wire @ (WireError::FrameTooLarge { .. } | WireError::ReplyTooLarge { .. }),
            ) => raise(py, |c| &c.frame_too_large, (wire.to_string(),)),
            Error::Wire(wire) => raise(py, |c| &c.connection_closed, (wire.to_string(),)),
            Error::Timeout(text) => raise(py, |c| &c.timeout, (text,)),
            Error::Protocol(text) => raise(py, |c| &c.protocol, (text,)),
            // (None, text): an OSError's (errno, strerror), so str() is the text itself.
            Error::Tls(text) => raise(py, |c| &c.tls, (py.None(), text)),
            Error::Closed => raise(py, |c| &c.connection_closed, (Error::Closed.to_string(),)),
            Error::Os { err, doing } => os_error(err, &doing),
            Error::Resolve { host, err } => {
                let text = format!("could not resolve host {host:?}: {err}");
                match py.import("socket").and_then(|m| m.getattr("gaierror")) {
                    Ok(gaierror) => {
                        PyErr::from_type(gaierror.cast_into::<PyType>().unwrap(), (text,))
                    }
                    Err(import_failed) => import_failed,
                }
            }
        })
    }
}

/// The exception behind a failed exchange: the handler's own when there is one.
pub fn failure_error(failure: Failure) -> PyErr {
    Python::attach(|py| {
        match failure
            .cause
            .as_ref()
            .and_then(|cause| cause.downcast_ref::<GilDrop<PyErr>>())
        {
            Some(err) => err.clone_ref(py),
            None => pyo3::exceptions::PyRuntimeError::new_err(failure.to_string()),
        }
    })
}

/// Adds the exception classes to the module.
pub fn init(module: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = module.py();
    let classes = exceptions(py)?;
    for class in [
        &classes.base,
        &classes.frame_too_large,
        &classes.json_decode,
        &classes.connection_closed,
        &classes.protocol,
        &classes.tls,
        &classes.timeout,
        &classes.remote,
    ] {
        let class = class.bind(py);
        module.add(class.name()?, class)?;
    }
    Ok(())
}
