//! The server side: `start_server`, one client and one exchange, as the seed's script does.

use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyString};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::args;
use crate::codec::{self, FrameCodec, WireError};
use crate::errors::{Error, Result};
use crate::json;
use crate::net;
use crate::runtime::{self, within};

/// The seed's reply, in the bytes its `json.dumps` writes.
pub const SEED_REPLY: &[u8] = br#"{"key": "id", "val": 123}"#;

/// How a handler receives the request payload.
#[derive(Debug, Clone, Copy)]
pub enum RequestAs {
    /// `str`, decoded as UTF-8 with undecodable bytes replaced by U+FFFD.
    Text,
    /// The payload's `bytes`, untouched.
    Bytes,
    /// The payload parsed as JSON.
    Json,
}

impl RequestAs {
    fn parse(name: &str) -> PyResult<Self> {
        match name {
            "text" => Ok(RequestAs::Text),
            "bytes" => Ok(RequestAs::Bytes),
            "json" => Ok(RequestAs::Json),
            other => Err(PyValueError::new_err(format!(
                "request_as must be 'text', 'bytes' or 'json', not {other:?}"
            ))),
        }
    }

    /// The request payload as the handler wants it.
    fn convert<'py>(self, py: Python<'py>, payload: &[u8]) -> PyResult<Bound<'py, PyAny>> {
        match self {
            RequestAs::Text => Ok(request_text(py, payload).into_any()),
            RequestAs::Bytes => Ok(PyBytes::new(py, payload).into_any()),
            RequestAs::Json => json::loads(py, payload),
        }
    }
}

/// The payload as text; bytes that are not UTF-8 become U+FFFD (the raw bytes are kept apart).
fn request_text<'py>(py: Python<'py>, payload: &[u8]) -> Bound<'py, PyString> {
    PyString::new(py, &String::from_utf8_lossy(payload))
}

/// Where replies come from: one value fixed up front, or a Python callable per request.
pub enum Responder {
    /// A value encoded once, before the server starts.
    Static { value: Py<PyAny>, json: Bytes },
    /// `handler(request) -> value`, called with the GIL.
    Handler {
        handler: Py<PyAny>,
        request_as: RequestAs,
    },
}

impl Responder {
    /// Checks `response` / `handler` and encodes a static response now, so a value that cannot
    /// be sent fails before anything touches the network.
    pub fn new(
        py: Python<'_>,
        response: Option<Bound<'_, PyAny>>,
        handler: Option<Bound<'_, PyAny>>,
        request_as: &str,
    ) -> PyResult<Self> {
        let request_as = RequestAs::parse(request_as)?;
        match (response, handler) {
            (Some(_), Some(_)) => Err(PyTypeError::new_err(
                "pass either response or handler, not both",
            )),
            (None, Some(handler)) if !handler.is_callable() => Err(PyTypeError::new_err(format!(
                "handler must be callable, not {}",
                handler.get_type().name()?
            ))),
            (None, Some(handler)) => Ok(Responder::Handler {
                handler: handler.unbind(),
                request_as,
            }),
            (Some(value), None) => {
                let json = Bytes::from(json::dumps(&value)?);
                Ok(Responder::Static {
                    value: value.unbind(),
                    json,
                })
            }
            (None, None) => Ok(Responder::Static {
                value: json::loads(py, SEED_REPLY)?.unbind(),
                json: Bytes::from_static(SEED_REPLY),
            }),
        }
    }

    /// The reply value and its JSON text for one request.
    pub fn reply<'py>(
        &self,
        py: Python<'py>,
        payload: &[u8],
    ) -> PyResult<(Bound<'py, PyAny>, Bytes)> {
        match self {
            Responder::Static { value, json } => Ok((value.bind(py).clone(), json.clone())),
            Responder::Handler {
                handler,
                request_as,
            } => {
                let request = request_as.convert(py, payload)?;
                let value = handler.bind(py).call1((request,))?;
                let json = Bytes::from(json::dumps(&value)?);
                Ok((value, json))
            }
        }
    }
}

/// Reads the one request frame of a classic exchange.
pub async fn read_request<S>(stream: &mut S, max_frame: usize) -> Result<Bytes>
where
    S: AsyncRead + Unpin,
{
    let mut buf = BytesMut::new();
    codec::read_frame(stream, &mut buf, &mut FrameCodec::new(max_frame))
        .await?
        .ok_or(Error::Wire(WireError::ClosedBeforeMessage))
}

/// Sends a classic reply: the JSON text, then a close of our side to mark its end.
pub async fn send_classic_reply<S>(stream: &mut S, json: &[u8]) -> Result<()>
where
    S: AsyncWrite + Unpin,
{
    stream.write_all(json).await.map_err(WireError::Io)?;
    stream.shutdown().await.map_err(WireError::Io)?;
    Ok(())
}

/// `(host, port)` for IPv4, `(host, port, flowinfo, scope_id)` for IPv6, as `socket` gives them.
pub fn address_tuple<'py>(py: Python<'py>, addr: SocketAddr) -> PyResult<Bound<'py, PyAny>> {
    match addr {
        SocketAddr::V4(v4) => (v4.ip().to_string(), v4.port())
            .into_pyobject(py)
            .map(Bound::into_any),
        SocketAddr::V6(v6) => (v6.ip().to_string(), v6.port(), v6.flowinfo(), v6.scope_id())
            .into_pyobject(py)
            .map(Bound::into_any),
    }
}

/// Serves one client, one request, like the seed's server, and returns what was exchanged.
#[pyfunction]
#[pyo3(signature = (
    host = String::from("127.0.0.1"), port = 8000, response = None, *, handler = None,
    timeout = Some(20.0), max_frame = args::DEFAULT_MAX_LEN as i64, backlog = 5,
    request_as = String::from("text"), ready = None,
))]
#[pyo3(
    text_signature = "(host='127.0.0.1', port=8000, response=None, *, handler=None, \
    timeout=20.0, max_frame=16777216, backlog=5, request_as='text', ready=None)"
)]
#[allow(clippy::too_many_arguments)]
pub fn start_server<'py>(
    py: Python<'py>,
    host: String,
    port: i64,
    response: Option<Bound<'py, PyAny>>,
    handler: Option<Bound<'py, PyAny>>,
    timeout: Option<f64>,
    max_frame: i64,
    backlog: i64,
    request_as: String,
    ready: Option<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let port = args::port(port)?;
    let timeout = args::timeout("timeout", timeout)?;
    let max_frame = args::byte_limit("max_frame", max_frame)?;
    let backlog = args::backlog(backlog)?;
    let responder = Responder::new(py, response, handler, &request_as)?;

    let listener = runtime::wait(py, net::listen(&host, port, backlog))??;
    let local = listener.local_addr().map_err(|err| Error::Os {
        err,
        doing: format!("listen on {host}:{port}"),
    })?;
    if let Some(ready) = ready {
        ready.call1((address_tuple(py, local)?,))?;
    }
    let (mut stream, peer) = runtime::wait(py, async {
        listener.accept().await.map_err(|err| Error::Os {
            err,
            doing: format!("accept on {local}"),
        })
    })??;
    // One client only, as the seed: later connection attempts are refused, not queued forever.
    drop(listener);

    let request = runtime::wait(
        py,
        within(
            timeout,
            || format!("waiting for the request from {peer}"),
            read_request(&mut stream, max_frame),
        ),
    )??;
    let (reply, json) = responder.reply(py, &request)?;
    runtime::wait(
        py,
        within(
            timeout,
            || format!("sending the reply to {peer}"),
            send_classic_reply(&mut stream, &json),
        ),
    )??;

    let exchange = PyDict::new(py);
    exchange.set_item("peer", address_tuple(py, peer)?)?;
    exchange.set_item("address", address_tuple(py, local)?)?;
    exchange.set_item("request", request_text(py, &request))?;
    exchange.set_item("request_bytes", PyBytes::new(py, &request))?;
    exchange.set_item("reply", reply)?;
    Ok(exchange)
}
