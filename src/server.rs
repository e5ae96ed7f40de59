//! `Server` (many clients, either protocol) and `start_server` (the seed's one exchange).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use tokio::io::AsyncWriteExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::aio;
use crate::args;
use crate::codec::{self, FrameCodec, WireError};
use crate::errors::{Error, Result};
use crate::net::{Address, Endpoint, Listener, Stream};
use crate::runtime::{self, within};
use crate::service::{self, Limits, Protocol, Responder, Service, Stats};

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

/// TCP `host:port`, or a Unix socket when `path` is given.
pub fn endpoint(host: String, port: i64, path: Option<PathBuf>) -> PyResult<Endpoint> {
    let port = args::port(port)?;
    Ok(match path {
        Some(path) => Endpoint::Unix(path),
        None => Endpoint::Tcp { host, port },
    })
}

/// Reads the one request frame of a classic exchange.
async fn read_request(stream: &mut Stream, max_frame: usize) -> Result<bytes::Bytes> {
    let mut buf = BytesMut::new();
    let frame = codec::read_frame(stream, &mut buf, &mut FrameCodec::new(max_frame)).await?;
    Ok(frame
        .ok_or(Error::Wire(WireError::ClosedBeforeMessage))?
        .payload)
}

/// What one classic exchange was: the result of `start_server`.
pub struct Exchange {
    peer: Address,
    local: Address,
    request: bytes::Bytes,
    reply: Py<PyAny>,
}

impl<'py> IntoPyObject<'py> for Exchange {
    type Target = PyDict;
    type Output = Bound<'py, PyDict>;
    type Error = PyErr;

    fn into_pyobject(self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let exchange = PyDict::new(py);
        exchange.set_item("peer", address_object(py, &self.peer)?)?;
        exchange.set_item("address", address_object(py, &self.local)?)?;
        exchange.set_item("request", service::request_text(py, &self.request))?;
        exchange.set_item("request_bytes", PyBytes::new(py, &self.request))?;
        exchange.set_item("reply", self.reply)?;
        Ok(exchange)
    }
}

/// The one exchange of `start_server` on `listener`: accept one client, read one request,
/// reply, close. Unlike a serving `Server`, whatever goes wrong is raised to the caller rather
/// than logged: the caller asked for exactly this one exchange.
async fn serve_one(
    service: &Service,
    listener: Listener,
    local: Address,
    ready: Option<Py<PyAny>>,
) -> PyResult<Exchange> {
    let Limits {
        timeout, max_frame, ..
    } = service.limits;
    if let Some(ready) = ready {
        Python::attach(|py| ready.call1(py, (address_object(py, &local)?,)).map(drop))?;
    }
    let (mut stream, peer) = listener.accept().await.map_err(|err| Error::Os {
        err,
        doing: format!("accept on {local}"),
    })?;
    // One client only, as the seed: later connection attempts are refused, not queued forever.
    drop(listener);

    let request = within(
        timeout,
        || format!("waiting for the request from {peer}"),
        read_request(&mut stream, max_frame),
    )
    .await?;
    let (reply, json) = service
        .responder
        .respond(&request)
        .await
        .map_err(service::Failure::into_error)?;
    within(timeout, || format!("sending the reply to {peer}"), async {
        stream.write_all(&json).await.map_err(WireError::Io)?;
        stream.shutdown().await.map_err(WireError::Io)?;
        Ok(())
    })
    .await?;
    Ok(Exchange {
        peer,
        local,
        request,
        reply,
    })
}

/// The `Server` behind `start_server` (and `framesock.aio.start_server`): classic, one
/// connection, bound now; its arguments are checked before anything touches the network.
#[allow(clippy::too_many_arguments)]
pub fn one_shot_server(
    py: Python<'_>,
    host: String,
    port: i64,
    path: Option<PathBuf>,
    response: Option<Bound<'_, PyAny>>,
    handler: Option<Bound<'_, PyAny>>,
    timeout: Option<f64>,
    max_frame: i64,
    backlog: i64,
    request_as: &str,
) -> PyResult<Server> {
    let endpoint = endpoint(host, port, path)?;
    let backlog = args::backlog(backlog)?;
    let service = Service {
        protocol: Protocol::Classic,
        limits: Limits {
            timeout: args::timeout("timeout", timeout)?,
            idle_timeout: None,
            max_frame: args::byte_limit("max_frame", max_frame)?,
        },
        responder: Responder::new(py, response, handler, request_as)?,
        stats: Stats::default(),
    };
    Server::bind(py, &endpoint, service, 1, backlog)
}

/// Serves one client, one request, like the seed's server, and returns what was exchanged.
#[pyfunction]
#[pyo3(signature = (
    host = String::from("127.0.0.1"), port = 8000, response = None, *, handler = None,
    timeout = Some(20.0), max_frame = args::DEFAULT_MAX_LEN as i64, backlog = 5,
    request_as = String::from("text"), ready = None, path = None,
))]
#[pyo3(
    text_signature = "(host='127.0.0.1', port=8000, response=None, *, handler=None, \
    timeout=20.0, max_frame=16777216, backlog=5, request_as='text', ready=None, path=None)"
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
    path: Option<PathBuf>,
) -> PyResult<Bound<'py, PyDict>> {
    let server = one_shot_server(
        py,
        host,
        port,
        path,
        response,
        handler,
        timeout,
        max_frame,
        backlog,
        &request_as,
    )?;
    runtime::wait(py, server.serve_one(ready.map(Bound::unbind))?)??.into_pyobject(py)
}

/// Seconds in-flight exchanges get to finish when the context manager or Ctrl-C shuts down.
const EXIT_GRACE: f64 = 5.0;

/// Where a server is in its life.
enum Lifecycle {
    /// Bound and listening (the OS queues connections), not yet accepting.
    Bound(Listener),
    /// The accept loop runs.
    Serving(JoinHandle<()>),
    /// Shut down; cannot start again.
    Stopped,
}

/// A concurrent server: many clients at once, the I/O on all cores without the GIL.
#[pyclass(frozen, module = "framesock")]
pub struct Server {
    service: Arc<Service>,
    address: Address,
    max_connections: usize,
    lifecycle: Mutex<Lifecycle>,
    /// Stops accepting and ends connections waiting between requests.
    stop: CancellationToken,
    /// Ends every connection outright, once the shutdown grace is over.
    abort: CancellationToken,
    /// Set once shutdown has finished; `serve_forever` returns then.
    finished: CancellationToken,
    connections: TaskTracker,
}

#[pymethods]
impl Server {
    #[new]
    #[pyo3(signature = (
        handler = None, host = String::from("127.0.0.1"), port = 8000, *, path = None,
        response = None, protocol = String::from("classic"), timeout = Some(20.0),
        idle_timeout = None, max_frame = args::DEFAULT_MAX_LEN as i64, max_connections = 1024,
        backlog = 1024, request_as = String::from("text"),
    ))]
    #[pyo3(
        text_signature = "(handler=None, host='127.0.0.1', port=8000, *, path=None, response=None, \
        protocol='classic', timeout=20.0, idle_timeout=None, max_frame=16777216, \
        max_connections=1024, backlog=1024, request_as='text')"
    )]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        handler: Option<Bound<'_, PyAny>>,
        host: String,
        port: i64,
        path: Option<PathBuf>,
        response: Option<Bound<'_, PyAny>>,
        protocol: String,
        timeout: Option<f64>,
        idle_timeout: Option<f64>,
        max_frame: i64,
        max_connections: i64,
        backlog: i64,
        request_as: String,
    ) -> PyResult<Self> {
        let endpoint = endpoint(host, port, path)?;
        let service = Service {
            protocol: Protocol::parse(&protocol)?,
            limits: Limits {
                timeout: args::timeout("timeout", timeout)?,
                idle_timeout: args::timeout("idle_timeout", idle_timeout)?,
                max_frame: args::byte_limit("max_frame", max_frame)?,
            },
            responder: Responder::new(py, response, handler, &request_as)?,
            stats: Stats::default(),
        };
        let max_connections = usize::try_from(max_connections)
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| PyValueError::new_err("max_connections must be a positive integer"))?;
        let backlog = args::backlog(backlog)?;
        Server::bind(py, &endpoint, service, max_connections, backlog)
    }

    /// The bound address: `(host, port)` (the real port when 0 was asked for) or the path.
    #[getter]
    fn address<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        address_object(py, &self.address)
    }

    /// Starts serving in the background and returns; calling it again does nothing.
    fn start(&self) -> PyResult<()> {
        let mut lifecycle = self.lifecycle.lock().expect("lifecycle lock");
        match std::mem::replace(&mut *lifecycle, Lifecycle::Stopped) {
            Lifecycle::Bound(listener) => {
                let accept = service::accept_loop(
                    self.service.clone(),
                    listener,
                    self.max_connections,
                    self.stop.clone(),
                    self.abort.clone(),
                    self.connections.clone(),
                );
                *lifecycle = Lifecycle::Serving(runtime::runtime().spawn(accept));
                Ok(())
            }
            serving @ Lifecycle::Serving(_) => {
                *lifecycle = serving;
                Ok(())
            }
            Lifecycle::Stopped => Err(PyRuntimeError::new_err("the server was shut down")),
        }
    }

    /// Serves until `shutdown()` is called (from another thread or a handler); Ctrl-C shuts the
    /// server down and raises KeyboardInterrupt.
    fn serve_forever(&self, py: Python<'_>) -> PyResult<()> {
        self.start()?;
        let finished = self.finished.clone();
        match runtime::wait(py, async move { finished.cancelled().await }) {
            Ok(()) => Ok(()),
            Err(interrupted) => {
                self.shutdown(py, Some(EXIT_GRACE))?;
                Err(interrupted)
            }
        }
    }

    /// Stops accepting at once, lets in-flight exchanges finish (at most `timeout` seconds,
    /// then drops them) and closes every connection. From inside a handler it only begins the
    /// shutdown, since it cannot wait for its own exchange.
    #[pyo3(signature = (timeout = Some(5.0)), text_signature = "(self, timeout=5.0)")]
    fn shutdown(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<()> {
        let wind_down = self.begin_shutdown(args::timeout("timeout", timeout)?);
        if tokio::runtime::Handle::try_current().is_ok() {
            // Called on a runtime thread (from a handler): finish in the background.
            runtime::runtime().spawn(wind_down);
            return Ok(());
        }
        runtime::wait(py, wind_down)
    }

    /// framesock.aio: `shutdown` as an awaitable.
    fn _shutdown_async<'py>(
        &self,
        py: Python<'py>,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let wind_down = self.begin_shutdown(args::timeout("timeout", timeout)?);
        aio::awaitable(py, async move {
            wind_down.await;
            Ok(())
        })
    }

    /// framesock.aio: an awaitable that completes once shutdown has finished.
    fn _finished<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let finished = self.finished.clone();
        aio::awaitable(py, async move {
            finished.cancelled().await;
            Ok(())
        })
    }

    /// framesock.aio: coroutine handlers (and awaitables handlers return) run on the running
    /// event loop.
    pub fn _use_event_loop(&self, py: Python<'_>) -> PyResult<()> {
        self.service.responder.use_running_loop(py)
    }

    /// Counters: connections accepted/active, requests, bytes in/out, errors by kind.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.service.stats.to_dict(py)
    }

    fn __enter__(slf: Bound<'_, Self>) -> PyResult<Bound<'_, Self>> {
        slf.get().start()?;
        Ok(slf)
    }

    #[pyo3(signature = (*_exc_info))]
    fn __exit__(
        &self,
        py: Python<'_>,
        _exc_info: &Bound<'_, pyo3::types::PyTuple>,
    ) -> PyResult<bool> {
        self.shutdown(py, Some(EXIT_GRACE))?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        format!(
            "<framesock.Server {} {:?}>",
            self.address, self.service.protocol
        )
    }
}

impl Server {
    /// Binds now, like socketserver: `address` is known and "address in use" raised here.
    fn bind(
        py: Python<'_>,
        endpoint: &Endpoint,
        service: Service,
        max_connections: usize,
        backlog: u32,
    ) -> PyResult<Server> {
        let listener = runtime::wait(py, Listener::bind(endpoint, backlog))??;
        let address = listener.local_address()?;
        Ok(Server {
            service: Arc::new(service),
            address,
            max_connections,
            lifecycle: Mutex::new(Lifecycle::Bound(listener)),
            stop: CancellationToken::new(),
            abort: CancellationToken::new(),
            finished: CancellationToken::new(),
            connections: TaskTracker::new(),
        })
    }

    /// `start_server`'s one exchange on this server's socket, as a future to wait on.
    pub fn serve_one(
        &self,
        ready: Option<Py<PyAny>>,
    ) -> PyResult<impl std::future::Future<Output = PyResult<Exchange>> + Send + 'static> {
        let previous = std::mem::replace(
            &mut *self.lifecycle.lock().expect("lifecycle lock"),
            Lifecycle::Stopped,
        );
        let Lifecycle::Bound(listener) = previous else {
            return Err(PyRuntimeError::new_err(
                "the server is already serving or was shut down",
            ));
        };
        let service = self.service.clone();
        let local = self.address.clone();
        Ok(async move {
            let exchange = serve_one(&service, listener, local, ready).await;
            service.responder.release_loop();
            exchange
        })
    }

    /// Stops accepting and waiting connections now; the returned future lets exchanges in
    /// progress finish for up to `grace`, drops the rest, and marks the server finished.
    fn begin_shutdown(
        &self,
        grace: Option<std::time::Duration>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.stop.cancel();
        let previous = std::mem::replace(
            &mut *self.lifecycle.lock().expect("lifecycle lock"),
            Lifecycle::Stopped,
        );
        // Never started (the listener is dropped here) or already stopped: no accept loop.
        let accept = match previous {
            Lifecycle::Serving(accept) => Some(accept),
            _ => None,
        };
        let connections = self.connections.clone();
        let abort = self.abort.clone();
        let finished = self.finished.clone();
        let service = self.service.clone();
        async move {
            if let Some(accept) = accept {
                let _ = accept.await;
            }
            connections.close();
            let drained = match grace {
                Some(grace) => tokio::time::timeout(grace, connections.wait())
                    .await
                    .is_ok(),
                None => {
                    connections.wait().await;
                    true
                }
            };
            if !drained {
                abort.cancel();
                connections.wait().await;
            }
            service.responder.release_loop();
            finished.cancel();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // A server dropped without shutdown must not leave connections served forever.
        self.stop.cancel();
        self.abort.cancel();
    }
}
