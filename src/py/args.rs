//! Checks on arguments shared by every entry point, done before anything touches the network,
//! and addresses as Python sees them.

use std::path::PathBuf;
use std::time::Duration;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::engine::codec::MAX_PAYLOAD;
use crate::engine::net::{Address, Endpoint};
use crate::engine::serve::{Protocol, ProxyProtocol};

/// Default for `max_frame` and `max_reply`: 16 MiB.
pub const DEFAULT_MAX_LEN: usize = 16 * 1024 * 1024;

/// An integer argument as given, however large: its value saturated to i64's range, and how it
/// is shown in messages. So a check refuses `2**64` with a ValueError naming the argument, as
/// it refuses `-1`, rather than the OverflowError a plain `i64` argument would raise.
pub struct Int {
    value: i64,
    /// Python's text of an integer outside i64's range.
    huge: Option<String>,
}

impl Int {
    pub const fn new(value: i64) -> Int {
        Int { value, huge: None }
    }
}

impl<'a, 'py> FromPyObject<'a, 'py> for Int {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Int> {
        match obj.extract::<i64>() {
            Ok(value) => Ok(Int::new(value)),
            Err(err) if err.is_instance_of::<pyo3::exceptions::PyOverflowError>(obj.py()) => {
                let value = if obj.lt(0)? { i64::MIN } else { i64::MAX };
                let huge = obj.str().map(|text| text.to_string()).unwrap_or_else(|_| {
                    format!(
                        "an integer of {} bits",
                        obj.call_method0("bit_length")
                            .map(|b| b.to_string())
                            .unwrap_or_default()
                    )
                });
                Ok(Int {
                    value,
                    huge: Some(huge),
                })
            }
            Err(err) => Err(err),
        }
    }
}

impl std::fmt::Display for Int {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.huge {
            Some(text) => f.write_str(text),
            None => write!(f, "{}", self.value),
        }
    }
}

/// A port number 0..=65535 (0 lets the OS pick); ValueError otherwise.
pub fn port(number: Int) -> PyResult<u16> {
    u16::try_from(number.value)
        .map_err(|_| PyValueError::new_err(format!("port must be in 0..65535, got {number}")))
}

/// The longest timeout accepted, in seconds (about 31 years): longer is None's job, and
/// durations past it overflow clocks.
pub const MAX_TIMEOUT: f64 = 1e9;

/// A timeout in seconds: None for none, otherwise a number in (0, MAX_TIMEOUT].
pub fn timeout(name: &str, value: Option<f64>) -> PyResult<Option<Duration>> {
    match value {
        None => Ok(None),
        Some(secs) if secs > 0.0 && secs <= MAX_TIMEOUT => Ok(Some(Duration::from_secs_f64(secs))),
        Some(secs) => Err(PyValueError::new_err(format!(
            "{name} must be None or a number of seconds in (0, {MAX_TIMEOUT:e}], got {secs}"
        ))),
    }
}

/// A byte limit in 0..=2**32-1, the most a 4-byte header can declare.
pub fn byte_limit(name: &str, number: Int) -> PyResult<usize> {
    usize::try_from(number.value)
        .ok()
        .filter(|&n| n <= MAX_PAYLOAD)
        .ok_or_else(|| {
            PyValueError::new_err(format!("{name} must be in 0..{MAX_PAYLOAD}, got {number}"))
        })
}

/// A listen backlog: a positive count.
pub fn backlog(number: Int) -> PyResult<u32> {
    u32::try_from(number.value)
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| {
            PyValueError::new_err(format!("backlog must be a positive integer, got {number}"))
        })
}

/// `protocol=`: "classic" or "framed".
pub fn protocol(name: &str) -> PyResult<Protocol> {
    match name {
        "classic" => Ok(Protocol::Classic),
        "framed" => Ok(Protocol::Framed),
        other => Err(PyValueError::new_err(format!(
            "protocol must be 'classic' or 'framed', not {other:?}"
        ))),
    }
}

/// A count in 1..=`max` (`max_connections`, `handler_threads`).
pub fn count(name: &str, number: Int, max: usize) -> PyResult<usize> {
    usize::try_from(number.value)
        .ok()
        .filter(|&n| n > 0 && n <= max)
        .ok_or_else(|| PyValueError::new_err(format!("{name} must be in 1..{max}, got {number}")))
}

/// TCP `host:port`, or a Unix socket when `path` is given.
pub fn endpoint(host: String, port: Int, path: Option<PathBuf>) -> PyResult<Endpoint> {
    let port = self::port(port)?;
    Ok(match path {
        Some(path) if path.as_os_str().is_empty() => {
            return Err(PyValueError::new_err(
                "path must name a Unix socket (a file path, or \"\\0name\" for an abstract one), not \"\"",
            ))
        }
        Some(path) => Endpoint::Unix(path),
        None => Endpoint::Tcp { host, port },
    })
}

/// The most I/O threads a process may ask for.
pub const MAX_IO_THREADS: usize = 1024;

/// A listening socket given by its file descriptor (`fd=`), which `path` must not contradict.
pub fn adopted_socket(fd: Int, path: Option<&std::path::Path>) -> PyResult<Endpoint> {
    if path.is_some() {
        return Err(PyValueError::new_err(
            "fd and path both name the socket to listen on: give one",
        ));
    }
    let fd = count("fd", fd, i32::MAX as usize)?;
    Ok(Endpoint::Socket(fd as std::os::fd::RawFd))
}

/// A client's server: `host` and `port` may be None when `path` is given, so that
/// `Client(server.host, server.port, path=server.path)` works for every kind of server.
pub fn client_endpoint(
    host: Option<String>,
    port: Option<Int>,
    path: Option<PathBuf>,
) -> PyResult<Endpoint> {
    match (host, port) {
        _ if path.is_some() => endpoint(String::new(), Int::new(0), path),
        (Some(host), Some(port)) => endpoint(host, port, None),
        _ => Err(pyo3::exceptions::PyTypeError::new_err(
            "host and port are both needed unless path is given",
        )),
    }
}

/// The most `retries` a client takes.
pub const MAX_RETRIES: usize = 100;

/// `retries`: 0..=`MAX_RETRIES`.
pub fn retries(number: Int) -> PyResult<usize> {
    usize::try_from(number.value)
        .ok()
        .filter(|&n| n <= MAX_RETRIES)
        .ok_or_else(|| {
            PyValueError::new_err(format!("retries must be in 0..{MAX_RETRIES}, got {number}"))
        })
}

/// A client's addresses: `addresses` (`[(host, port), ...]`) when given, else its one
/// `endpoint` (from host/port or path).
pub fn client_addresses(
    single: Endpoint,
    addresses: Option<Vec<(String, Int)>>,
) -> PyResult<Vec<Endpoint>> {
    let Some(addresses) = addresses else {
        return Ok(vec![single]);
    };
    if addresses.is_empty() {
        return Err(PyValueError::new_err(
            "addresses is empty: give at least one (host, port)",
        ));
    }
    addresses
        .into_iter()
        .map(|(host, port)| endpoint(host, port, None))
        .collect()
}

/// An endpoint as Python shows an address: `(host, port)` or the socket path.
pub fn endpoint_object<'py>(py: Python<'py>, endpoint: &Endpoint) -> PyResult<Bound<'py, PyAny>> {
    use pyo3::IntoPyObjectExt;
    match endpoint {
        Endpoint::Tcp { host, port } => (host.as_str(), *port).into_bound_py_any(py),
        Endpoint::Unix(path) => path.to_string_lossy().into_bound_py_any(py),
        Endpoint::Socket(fd) => format!("fd {fd}").into_bound_py_any(py),
    }
}

/// The host of a TCP address as text (`"127.0.0.1"`, `"::1"`); None for a Unix socket.
pub fn host_of(addr: &Address) -> Option<String> {
    match addr {
        Address::Inet(inet) => Some(inet.ip().to_string()),
        Address::Unix(_) => None,
    }
}

/// The port of a TCP address; None for a Unix socket.
pub fn port_of(addr: &Address) -> Option<u16> {
    match addr {
        Address::Inet(inet) => Some(inet.port()),
        Address::Unix(_) => None,
    }
}

/// The path of a Unix socket address (`"\0name"` for an abstract one); None for TCP.
pub fn path_of(addr: &Address) -> Option<String> {
    match addr {
        Address::Inet(_) => None,
        Address::Unix(path) => Some(path.to_string_lossy().into_owned()),
    }
}

/// The address as Python's `socket` gives it: `(host, port)` for IPv4,
/// `(host, port, flowinfo, scope_id)` for IPv6, the path for a Unix socket.
pub fn address_object<'py>(py: Python<'py>, addr: &Address) -> PyResult<Bound<'py, PyAny>> {
    use std::net::SocketAddr;
    let object: Bound<'py, PyAny> = match addr {
        Address::Inet(SocketAddr::V4(v4)) => (v4.ip().to_string(), v4.port())
            .into_pyobject(py)?
            .into_any(),
        Address::Inet(SocketAddr::V6(v6)) => {
            (v6.ip().to_string(), v6.port(), v6.flowinfo(), v6.scope_id())
                .into_pyobject(py)?
                .into_any()
        }
        Address::Unix(path) => path
            .to_string_lossy()
            .into_owned()
            .into_pyobject(py)?
            .into_any(),
    };
    Ok(object)
}

/// Where PROXY protocol headers are taken from when `proxy_from` is not given: this host.
pub const DEFAULT_PROXY_FROM: [&str; 2] = ["127.0.0.0/8", "::1"];

/// `proxy_protocol=` and `proxy_from=`: off unless asked for; `proxy_from` alone is a mistake.
pub fn proxy_protocol(enabled: bool, from: Option<Vec<String>>) -> PyResult<Option<ProxyProtocol>> {
    if !enabled {
        if from.is_some() {
            return Err(PyValueError::new_err(
                "proxy_from is only for proxy_protocol=True",
            ));
        }
        return Ok(None);
    }
    let from = match from {
        Some(from) => from,
        None => DEFAULT_PROXY_FROM.iter().map(|s| s.to_string()).collect(),
    };
    let from = from
        .iter()
        .map(|text| {
            text.parse()
                .map_err(|why: String| PyValueError::new_err(format!("proxy_from: {why}")))
        })
        .collect::<PyResult<Vec<_>>>()?;
    if from.is_empty() {
        return Err(PyValueError::new_err(
            "proxy_from is empty: no balancer could connect (give its address, or \"0.0.0.0/0\" \
             and \"::/0\" to take headers from anywhere)",
        ));
    }
    Ok(Some(ProxyProtocol { from }))
}
