//! The client side: `start_client`, one request and its reply, as the seed's script does.

use bytes::Bytes;
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyList, PyString};
use tokio::io::AsyncWriteExt;

use crate::args;
use crate::codec::{self, WireError};
use crate::errors::Result;
use crate::json;
use crate::net;
use crate::runtime::{self, within};

/// The bytes a message is sent as: str as UTF-8, bytes as they are, dict/list as JSON text.
pub fn message_payload(message: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    if let Ok(text) = message.cast::<PyString>() {
        Ok(text.to_cow()?.as_bytes().to_vec())
    } else if let Ok(raw) = message.cast::<PyBytes>() {
        Ok(raw.as_bytes().to_vec())
    } else if let Ok(raw) = message.cast::<PyByteArray>() {
        Ok(raw.to_vec())
    } else if message.is_instance_of::<PyDict>() || message.is_instance_of::<PyList>() {
        json::dumps(message)
    } else {
        Err(PyTypeError::new_err(format!(
            "message must be str, bytes, dict or list, not {}",
            message.get_type().name()?
        )))
    }
}

/// One classic exchange: connect, send the whole frame in one write, read the reply to the close.
pub async fn classic_exchange(
    host: &str,
    port: u16,
    frame: &[u8],
    timeout: Option<std::time::Duration>,
    max_reply: usize,
) -> Result<Vec<u8>> {
    let mut stream = within(
        timeout,
        || format!("connecting to {host}:{port}"),
        net::connect(host, port),
    )
    .await?;
    within(
        timeout,
        || format!("sending the request to {host}:{port}"),
        async {
            stream
                .write_all(frame)
                .await
                .map_err(|e| WireError::Io(e).into())
        },
    )
    .await?;
    within(
        timeout,
        || format!("waiting for the reply from {host}:{port}"),
        async {
            codec::read_until_close(&mut stream, max_reply)
                .await
                .map_err(Into::into)
        },
    )
    .await
}

/// Sends one request like the seed's client and returns the decoded JSON reply.
#[pyfunction]
#[pyo3(signature = (
    host = String::from("127.0.0.1"), port = 8000, message = None, *,
    timeout = Some(20.0), max_reply = args::DEFAULT_MAX_LEN as i64,
))]
#[pyo3(
    text_signature = "(host='127.0.0.1', port=8000, message='msg from client', *, timeout=20.0, max_reply=16777216)"
)]
pub fn start_client<'py>(
    py: Python<'py>,
    host: String,
    port: i64,
    message: Option<Bound<'py, PyAny>>,
    timeout: Option<f64>,
    max_reply: i64,
) -> PyResult<Bound<'py, PyAny>> {
    let port = args::port(port)?;
    let timeout = args::timeout("timeout", timeout)?;
    let max_reply = args::byte_limit("max_reply", max_reply)?;
    let payload = match message {
        Some(message) => message_payload(&message)?,
        // None is the default (a pyo3 default cannot be a Python str): the seed's message.
        None => b"msg from client".to_vec(),
    };
    let frame: Bytes = codec::encode_frame(&payload).map_err(crate::errors::Error::from)?;
    let reply = runtime::wait(
        py,
        classic_exchange(&host, port, &frame, timeout, max_reply),
    )??;
    json::loads(py, &reply)
}
