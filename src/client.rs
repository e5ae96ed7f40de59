//! `Client` (kept connections, pipelining) and `start_client` (the seed's one exchange).

use std::path::PathBuf;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
// parking_lot's guard may cross `py.detach` (its `send_guard` feature); std's may not.
use parking_lot::{Mutex, MutexGuard};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyList, PyString};
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio_util::codec::Encoder;

use crate::args;
use crate::codec::{self, Frame, FrameCodec, WireError};
use crate::errors::{self, Error, Result};
use crate::json;
use crate::net::{self, Endpoint, Stream};
use crate::runtime::{self, within};
use crate::server::endpoint;
use crate::service::Protocol;

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

/// Appends `message` as a request frame to `frames`.
pub fn put_request(message: &Bound<'_, PyAny>, frames: &mut BytesMut) -> PyResult<()> {
    let payload = message_payload(message)?;
    FrameCodec::new(codec::MAX_PAYLOAD)
        .encode(&payload, frames)
        .map_err(|err| Error::from(err).into())
}

/// One classic exchange: connect, send the whole frame in one write, read the reply to the close.
pub async fn classic_exchange(
    endpoint: &Endpoint,
    frame: &[u8],
    timeout: Option<Duration>,
    max_reply: usize,
) -> Result<Vec<u8>> {
    let mut stream = within(
        timeout,
        || format!("connecting to {endpoint}"),
        net::connect(endpoint),
    )
    .await?;
    within(
        timeout,
        || format!("sending the request to {endpoint}"),
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
        || format!("waiting for the reply from {endpoint}"),
        async {
            codec::read_until_close(&mut stream, max_reply)
                .await
                .map_err(Into::into)
        },
    )
    .await
}

/// A framed reply as its Python value; an error reply as RemoteError.
pub fn reply_value<'py>(py: Python<'py>, frame: &Frame) -> PyResult<Bound<'py, PyAny>> {
    if frame.is_error {
        return Err(errors::remote_error(py, &frame.payload));
    }
    json::loads(py, &frame.payload)
}

/// A client's arguments, checked: shared by `Client` and `framesock.aio.Client`.
pub struct ClientConfig {
    pub endpoint: Endpoint,
    pub protocol: Protocol,
    pub timeout: Option<Duration>,
    pub max_reply: usize,
}

impl ClientConfig {
    pub fn new(
        host: String,
        port: i64,
        path: Option<PathBuf>,
        protocol: &str,
        timeout: Option<f64>,
        max_reply: i64,
    ) -> PyResult<Self> {
        Ok(ClientConfig {
            endpoint: endpoint(host, port, path)?,
            protocol: Protocol::parse(protocol)?,
            timeout: args::timeout("timeout", timeout)?,
            max_reply: args::byte_limit("max_reply", max_reply)?,
        })
    }
}

/// A kept connection of the framed protocol, with the bytes read past the last reply.
struct Connection {
    stream: Stream,
    input: BytesMut,
}

/// Sends `count` request frames (already encoded back to back in `frames`) on the kept
/// connection, connecting first if needed, and reads `count` replies in order.
///
/// Writing and reading run together, so a batch far larger than the socket buffers cannot
/// deadlock with both sides blocked on full buffers. `timeout` bounds connecting and the wait
/// for each reply.
async fn framed_exchange(
    slot: &mut Option<Connection>,
    endpoint: &Endpoint,
    frames: &[u8],
    count: usize,
    timeout: Option<Duration>,
    max_reply: usize,
) -> Result<Vec<Frame>> {
    if slot.is_none() {
        let stream = within(
            timeout,
            || format!("connecting to {endpoint}"),
            net::connect(endpoint),
        )
        .await?;
        *slot = Some(Connection {
            stream,
            input: BytesMut::new(),
        });
    }
    let conn = slot.as_mut().expect("connected above");
    let write_failed = |e| Error::from(WireError::Io(e));
    if count == 1 {
        // One frame: the server replies only once it has read all of it, so writing first and
        // then reading cannot deadlock, and needs no split of the stream.
        conn.stream.write_all(frames).await.map_err(write_failed)?;
        return read_replies(
            &mut conn.stream,
            &mut conn.input,
            1,
            endpoint,
            timeout,
            max_reply,
        )
        .await;
    }
    let (mut reader, mut writer) = tokio::io::split(&mut conn.stream);
    let write = async { writer.write_all(frames).await.map_err(write_failed) };
    let read = read_replies(
        &mut reader,
        &mut conn.input,
        count,
        endpoint,
        timeout,
        max_reply,
    );
    let ((), replies) = tokio::try_join!(write, read)?;
    Ok(replies)
}

/// Reads `count` framed replies; `timeout` bounds the wait for each.
async fn read_replies<R: AsyncRead + Unpin>(
    reader: &mut R,
    input: &mut BytesMut,
    count: usize,
    endpoint: &Endpoint,
    timeout: Option<Duration>,
    max_reply: usize,
) -> Result<Vec<Frame>> {
    let mut codec = FrameCodec::replies(max_reply);
    let mut replies = Vec::with_capacity(count);
    while replies.len() < count {
        let frame = within(
            timeout,
            || format!("waiting for a reply from {endpoint}"),
            async {
                codec::read_frame(reader, input, &mut codec)
                    .await
                    .map_err(Error::from)
            },
        )
        .await?;
        replies.push(frame.ok_or(Error::Wire(WireError::ClosedBeforeMessage))?);
    }
    Ok(replies)
}

/// The kept connection and whether `close()` was called.
struct ClientState {
    connection: Option<Connection>,
    closed: bool,
}

/// A client that keeps its connection (framed protocol) and pipelines batches.
#[pyclass(frozen, module = "framesock")]
pub struct Client {
    /// The client's own single-threaded runtime: its sockets are driven by the calling thread.
    runtime: Option<tokio::runtime::Runtime>,
    endpoint: Endpoint,
    protocol: Protocol,
    timeout: Option<Duration>,
    max_reply: usize,
    state: Mutex<ClientState>,
}

impl Client {
    /// Locks the state without holding the GIL, so a thread waiting here never blocks the
    /// thread that holds the lock and needs the GIL to finish.
    fn lock(&self, py: Python<'_>) -> PyResult<MutexGuard<'_, ClientState>> {
        // Uncontended (the usual case): no need to let go of the GIL.
        let state = match self.state.try_lock() {
            Some(state) => state,
            None => py.detach(|| self.state.lock()),
        };
        if state.closed {
            return Err(PyValueError::new_err("the client is closed"));
        }
        Ok(state)
    }

    /// Runs `fut` on the client's runtime without the GIL, Ctrl-C aware.
    fn wait<F>(&self, py: Python<'_>, fut: F) -> PyResult<F::Output>
    where
        F: std::future::Future + Send,
        F::Output: Send,
    {
        runtime::wait_on(py, self.runtime.as_ref().expect("present until drop"), fut)
    }

    /// Sends encoded frames and returns the replies' frames; a failed exchange drops the
    /// connection, so the next request reconnects.
    fn exchange(&self, py: Python<'_>, frames: &[u8], count: usize) -> PyResult<Vec<Frame>> {
        let mut state = self.lock(py)?;
        let slot = &mut state.connection;
        let outcome = self.wait(
            py,
            framed_exchange(
                slot,
                &self.endpoint,
                frames,
                count,
                self.timeout,
                self.max_reply,
            ),
        );
        match outcome {
            Ok(Ok(replies)) => Ok(replies),
            Ok(Err(err)) => {
                *slot = None;
                Err(err.into())
            }
            Err(interrupted) => {
                *slot = None;
                Err(interrupted)
            }
        }
    }

    fn classic_request<'py>(
        &self,
        py: Python<'py>,
        message: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        drop(self.lock(py)?); // only to refuse a closed client
        let frame: Bytes = codec::encode_frame(&message_payload(message)?).map_err(Error::from)?;
        let reply = self.wait(
            py,
            classic_exchange(&self.endpoint, &frame, self.timeout, self.max_reply),
        )??;
        json::loads(py, &reply)
    }
}

#[pymethods]
impl Client {
    #[new]
    #[pyo3(signature = (
        host = String::from("127.0.0.1"), port = 8000, *, path = None,
        protocol = String::from("classic"), timeout = Some(20.0),
        max_reply = args::DEFAULT_MAX_LEN as i64,
    ))]
    #[pyo3(
        text_signature = "(host='127.0.0.1', port=8000, *, path=None, protocol='classic', \
        timeout=20.0, max_reply=16777216)"
    )]
    fn new(
        host: String,
        port: i64,
        path: Option<PathBuf>,
        protocol: String,
        timeout: Option<f64>,
        max_reply: i64,
    ) -> PyResult<Self> {
        let ClientConfig {
            endpoint,
            protocol,
            timeout,
            max_reply,
        } = ClientConfig::new(host, port, path, &protocol, timeout, max_reply)?;
        Ok(Client {
            runtime: Some(runtime::caller_runtime()?),
            endpoint,
            protocol,
            timeout,
            max_reply,
            state: Mutex::new(ClientState {
                connection: None,
                closed: false,
            }),
        })
    }

    /// Sends one message and returns the decoded reply.
    fn request<'py>(
        &self,
        py: Python<'py>,
        message: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        match self.protocol {
            Protocol::Classic => self.classic_request(py, message),
            Protocol::Framed => {
                let mut frames = BytesMut::new();
                put_request(message, &mut frames)?;
                let replies = self.exchange(py, &frames, 1)?;
                reply_value(py, &replies[0])
            }
        }
    }

    /// Sends every message and returns their replies in order; pipelined in "framed".
    fn request_many<'py>(
        &self,
        py: Python<'py>,
        messages: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyList>> {
        let messages: Vec<Bound<'py, PyAny>> = messages.try_iter()?.collect::<PyResult<_>>()?;
        if self.protocol == Protocol::Classic {
            let replies = messages
                .iter()
                .map(|message| self.classic_request(py, message))
                .collect::<PyResult<Vec<_>>>()?;
            return PyList::new(py, replies);
        }
        let mut frames = BytesMut::new();
        for message in &messages {
            put_request(message, &mut frames)?;
        }
        let replies = self.exchange(py, &frames, messages.len())?;
        // All replies were read, so the connection stays in step even if one is an error.
        let values = replies
            .iter()
            .map(|frame| reply_value(py, frame))
            .collect::<PyResult<Vec<_>>>()?;
        PyList::new(py, values)
    }

    /// Closes the kept connection; later requests raise ValueError.
    fn close(&self, py: Python<'_>) {
        let mut state = py.detach(|| self.state.lock());
        state.connection = None;
        state.closed = true;
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_exc_info))]
    fn __exit__(&self, py: Python<'_>, _exc_info: &Bound<'_, pyo3::types::PyTuple>) -> bool {
        self.close(py);
        false
    }

    fn __repr__(&self) -> String {
        format!("<framesock.Client {} {:?}>", self.endpoint, self.protocol)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // The last reference may go inside a handler, on a runtime thread, where dropping a
        // runtime normally (which blocks) is refused; shutting it down in the background is not.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Sends one request like the seed's client and returns the decoded JSON reply.
#[pyfunction]
#[pyo3(signature = (
    host = String::from("127.0.0.1"), port = 8000, message = None, *,
    timeout = Some(20.0), max_reply = args::DEFAULT_MAX_LEN as i64, path = None,
))]
#[pyo3(
    text_signature = "(host='127.0.0.1', port=8000, message='msg from client', *, timeout=20.0, \
    max_reply=16777216, path=None)"
)]
pub fn start_client<'py>(
    py: Python<'py>,
    host: String,
    port: i64,
    message: Option<Bound<'py, PyAny>>,
    timeout: Option<f64>,
    max_reply: i64,
    path: Option<PathBuf>,
) -> PyResult<Bound<'py, PyAny>> {
    let client = Client::new(
        host,
        port,
        path,
        String::from("classic"),
        timeout,
        max_reply,
    )?;
    match message {
        Some(message) => client.classic_request(py, &message),
        // None is the default (a pyo3 default cannot be a Python str): the seed's message.
        None => client.classic_request(py, PyString::new(py, "msg from client").as_any()),
    }
}
