//! `Server` (many clients, either protocol) and `start_server` (the seed's one exchange).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::py::named;
use pyo3::types::{PyBytes, PyDict};

use crate::engine::handler::{Log, NoLog, Responder};
use crate::engine::runtime;
use crate::engine::serve::{
    self, CannotStart, Exchange, Limits, OneShotError, Protocol, Service, DEFAULT_MAX_BUFFERED,
    DEFAULT_MAX_UNSENT,
};
use crate::py::args::{self, address_object, Int};
use crate::py::bridge::LoopBridge;
use crate::py::errors::failure_error;
use crate::py::handlers::{request_text, PyHandler, PyLog, RequestAs};
use crate::py::json;
use crate::py::threads::{self, HandlerThreads};
use crate::py::tls::ServerTls as ServerTlsSettings;
use crate::py::wait;

/// An asyncio future on the running loop that completes (with None) when `done` does.
fn awaitable<'py>(
    py: Python<'py>,
    done: impl std::future::Future<Output = ()> + Send + 'static,
) -> PyResult<Bound<'py, PyAny>> {
    LoopBridge::for_running_loop(py)?.spawn(
        py,
        async move {
            done.await;
            Ok(())
        },
        |py, ()| Ok(py.None()),
    )
}

/// Why a server cannot start, for Python.
fn cannot_start(why: CannotStart) -> PyErr {
    PyRuntimeError::new_err(match why {
        CannotStart::Stopped => "the server was shut down (or is already serving its one exchange)",
        CannotStart::Inherited => {
            "this server was made before os.fork(); make a new one in this process"
        }
    })
}

/// The most `max_connections` accepted: far past what one process's file descriptors allow.
const MAX_CONNECTIONS: usize = 1 << 24;

/// The most `max_unsent` / `max_buffered` accepted (1 TiB).
const MAX_BYTES: usize = 1 << 40;

/// The most `handler_threads` accepted.
const MAX_HANDLER_THREADS: usize = 4096;

/// Seconds in-flight exchanges get to finish when the context manager shuts down.
const EXIT_GRACE: Duration = Duration::from_secs(5);

/// In-flight exchanges' grace after Ctrl-C: short, since the user is waiting for the prompt.
const INTERRUPT_GRACE: Duration = Duration::from_millis(100);

/// A server's arguments, checked, before anything touches the network.
pub struct Settings {
    pub endpoint: crate::engine::net::Endpoint,
    pub protocol: Protocol,
    pub limits: Limits,
    pub max_connections: usize,
    pub backlog: u32,
    pub handler_threads: usize,
    pub request_as: String,
    pub tls: Option<crate::engine::tls::ServerTls>,
    pub proxy: Option<serve::ProxyProtocol>,
}

/// What a server is for, which decides what happens to failures and to the handler's values.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Use {
    /// `Server`: failures are logged (so it needs handler threads for its log).
    Serving,
    /// `start_server`: failures are raised to the caller, and the handler's value is kept
    /// for the result.
    OneExchange,
}

/// Where a Python server's replies come from, and what serves its handler and its log.
struct Replies {
    responder: Responder,
    handler: Option<Arc<PyHandler>>,
    /// The static reply's value, for `start_server`'s result.
    value: Option<Py<PyAny>>,
    threads: Option<HandlerThreads>,
}

impl Replies {
    /// Checks `response` / `handler` and encodes a static response now, so a value that cannot
    /// be sent fails before anything touches the network. Handler threads are started when
    /// there is a handler or a log to write.
    fn new(
        py: Python<'_>,
        response: Option<Bound<'_, PyAny>>,
        handler: Option<Bound<'_, PyAny>>,
        settings: &Settings,
        purpose: Use,
    ) -> PyResult<Self> {
        let request_as = RequestAs::parse(&settings.request_as)?;
        let (fixed, callable) = match (response, handler) {
            (Some(_), Some(_)) => {
                return Err(PyTypeError::new_err(
                    "pass either response or handler, not both",
                ))
            }
            (None, Some(handler)) if !handler.is_callable() => {
                return Err(named::wrong_type(&handler, "handler", "callable"))
            }
            (None, Some(handler)) => (None, Some(handler.unbind())),
            (Some(value), None) => {
                let json = Bytes::from(
                    json::dumps(&value).map_err(|err| named::not_json(py, "response", err))?,
                );
                (Some((value.unbind(), json)), None)
            }
            (None, None) => {
                let json = Bytes::from_static(serve::SEED_REPLY);
                (Some((json::loads(py, &json)?.unbind(), json)), None)
            }
        };
        let threads = if callable.is_some() || purpose == Use::Serving {
            Some(HandlerThreads::new(
                py,
                &settings.endpoint.to_string(),
                settings.handler_threads,
            )?)
        } else {
            None
        };
        Ok(match (fixed, callable) {
            (Some((value, json)), _) => Replies {
                responder: Responder::Fixed(json),
                handler: None,
                value: Some(value),
                threads,
            },
            (None, Some(callable)) => {
                let handler = Arc::new(PyHandler::new(
                    py,
                    callable,
                    request_as,
                    threads.clone().expect("started for a handler"),
                    purpose == Use::OneExchange,
                )?);
                Replies {
                    responder: Responder::Handler(Arc::new(handler.clone())),
                    handler: Some(handler),
                    value: None,
                    threads,
                }
            }
            (None, None) => unreachable!("one of the two is set above"),
        })
    }
}

/// A concurrent server: many clients at once, the I/O on all cores without the GIL, handlers
/// on handler threads.
#[pyclass(frozen, module = "framesock")]
pub struct Server {
    core: Arc<serve::Server>,
    handler: Option<Arc<PyHandler>>,
    value: Option<Py<PyAny>>,
    threads: Option<HandlerThreads>,
}

#[pymethods]
impl Server {
    #[new]
    #[pyo3(signature = (
        handler = None, host = String::from("127.0.0.1"), port = Int::new(8000), *, path = None,
        response = None, protocol = String::from("classic"), timeout = Some(20.0),
        idle_timeout = Some(75.0), max_frame = Int::new(args::DEFAULT_MAX_LEN as i64),
        max_connections = Int::new(1024), backlog = Int::new(1024), request_as = String::from("text"),
        handler_threads = None, max_unsent = Int::new(DEFAULT_MAX_UNSENT as i64),
        max_buffered = Int::new(DEFAULT_MAX_BUFFERED as i64), tls = None,
        max_connections_per_address = None, fd = None, io_threads = None,
        proxy_protocol = false, proxy_from = None,
    ))]
    #[pyo3(
        text_signature = "(handler=None, host='127.0.0.1', port=8000, *, path=None, response=None, \
        protocol='classic', timeout=20.0, idle_timeout=75.0, max_frame=16777216, \
        max_connections=1024, backlog=1024, request_as='text', handler_threads=None, \
        max_unsent=65536, max_buffered=268435456, tls=None, max_connections_per_address=None, \
        fd=None, io_threads=None, proxy_protocol=False, proxy_from=None)"
    )]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        handler: Option<Bound<'_, PyAny>>,
        #[pyo3(from_py_with = named::host)] host: String,
        #[pyo3(from_py_with = named::port)] port: Int,
        #[pyo3(from_py_with = named::path)] path: Option<PathBuf>,
        response: Option<Bound<'_, PyAny>>,
        #[pyo3(from_py_with = named::protocol)] protocol: String,
        #[pyo3(from_py_with = named::timeout)] timeout: Option<f64>,
        #[pyo3(from_py_with = named::idle_timeout)] idle_timeout: Option<f64>,
        #[pyo3(from_py_with = named::max_frame)] max_frame: Int,
        #[pyo3(from_py_with = named::max_connections)] max_connections: Int,
        #[pyo3(from_py_with = named::backlog)] backlog: Int,
        #[pyo3(from_py_with = named::request_as)] request_as: String,
        #[pyo3(from_py_with = named::handler_threads)] handler_threads: Option<Int>,
        #[pyo3(from_py_with = named::max_unsent)] max_unsent: Int,
        #[pyo3(from_py_with = named::max_buffered)] max_buffered: Int,
        #[pyo3(from_py_with = named::server_tls)] tls: Option<PyRef<'_, ServerTlsSettings>>,
        #[pyo3(from_py_with = named::max_connections_per_address)]
        max_connections_per_address: Option<Int>,
        #[pyo3(from_py_with = named::fd)] fd: Option<Int>,
        #[pyo3(from_py_with = named::io_threads)] io_threads: Option<Int>,
        #[pyo3(from_py_with = named::proxy_protocol)] proxy_protocol: bool,
        #[pyo3(from_py_with = named::proxy_from)] proxy_from: Option<Vec<String>>,
    ) -> PyResult<Self> {
        if let Some(count) = io_threads {
            let count = args::count("io_threads", count, args::MAX_IO_THREADS)?;
            runtime::set_io_threads(count).map_err(PyValueError::new_err)?;
        }
        let settings = Settings {
            endpoint: match fd {
                Some(fd) => args::adopted_socket(fd, path.as_deref())?,
                None => args::endpoint(host, port, path)?,
            },
            protocol: args::protocol(&protocol)?,
            limits: Limits {
                timeout: args::timeout("timeout", timeout)?,
                idle_timeout: args::timeout("idle_timeout", idle_timeout)?,
                max_frame: args::byte_limit("max_frame", max_frame)?,
                max_unsent: args::count("max_unsent", max_unsent, MAX_BYTES)?,
                max_buffered: args::count("max_buffered", max_buffered, MAX_BYTES)?,
                max_connections_per_address: max_connections_per_address
                    .map(|count| args::count("max_connections_per_address", count, MAX_CONNECTIONS))
                    .transpose()?,
            },
            max_connections: args::count("max_connections", max_connections, MAX_CONNECTIONS)?,
            backlog: args::backlog(backlog)?,
            handler_threads: match handler_threads {
                Some(count) => args::count("handler_threads", count, MAX_HANDLER_THREADS)?,
                None => threads::default_thread_count(),
            },
            request_as,
            tls: tls.map(|tls| tls.settings.clone()),
            proxy: args::proxy_protocol(proxy_protocol, proxy_from)?,
        };
        Server::bind(py, settings, response, handler, Use::Serving)
    }

    /// The bound address: `(host, port)` (the real port when 0 was asked for) or the path.
    #[getter]
    fn address<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        address_object(py, self.core.address())
    }

    /// The bound host as text (`"127.0.0.1"`, `"::1"`); None for a Unix socket.
    #[getter]
    fn host(&self) -> Option<String> {
        args::host_of(self.core.address())
    }

    /// The bound port (the real one with port 0); None for a Unix socket.
    #[getter]
    fn port(&self) -> Option<u16> {
        args::port_of(self.core.address())
    }

    /// The Unix socket path; None for TCP.
    #[getter]
    fn path(&self) -> Option<String> {
        args::path_of(self.core.address())
    }

    /// Starts serving in the background and returns; calling it again does nothing.
    fn start(&self) -> PyResult<()> {
        self.core.start().map_err(cannot_start)
    }

    /// Serves until `shutdown()` is called (from another thread or a handler); Ctrl-C shuts the
    /// server down (exchanges in progress get 0.1 s) and raises KeyboardInterrupt.
    fn serve_forever(&self, py: Python<'_>) -> PyResult<()> {
        self.start()?;
        match wait::wait(py, self.core.finished()) {
            Ok(()) => match self.core.failure() {
                Some(why) => Err(PyRuntimeError::new_err(format!(
                    "the server stopped: {why}"
                ))),
                None => Ok(()),
            },
            Err(interrupted) => {
                self.wind_down(py, Some(INTERRUPT_GRACE))?;
                Err(interrupted)
            }
        }
    }

    /// Stops accepting at once, lets in-flight exchanges finish (at most `timeout` seconds,
    /// then drops them) and closes every connection. From inside a handler it only begins the
    /// shutdown, since it cannot wait for its own exchange.
    #[pyo3(signature = (timeout = Some(5.0)), text_signature = "(self, timeout=5.0)")]
    fn shutdown(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = named::timeout)] timeout: Option<f64>,
    ) -> PyResult<()> {
        self.wind_down(py, args::timeout("timeout", timeout)?)
    }

    /// framesock.aio: `shutdown` as an awaitable.
    fn _shutdown_async<'py>(
        &self,
        py: Python<'py>,
        #[pyo3(from_py_with = named::timeout)] timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let wind_down = self.begin_shutdown(args::timeout("timeout", timeout)?);
        awaitable(py, wind_down)
    }

    /// Diagnosis only: the handler pool's counters.
    fn _pool_state(&self) -> Option<(usize, usize, usize, usize, usize, bool, bool)> {
        self.threads.as_ref().map(|t| t.debug_state())
    }

    /// framesock.aio: why the server stopped on its own (an internal error), if it did.
    fn _failure(&self) -> Option<String> {
        self.core.failure()
    }

    /// framesock.aio: an awaitable that completes once shutdown has finished.
    fn _finished<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        awaitable(py, self.core.finished())
    }

    /// framesock.aio: coroutine handlers (and awaitables handlers return) run on the running
    /// event loop; when that loop is torn down, the server shuts down.
    pub fn _use_event_loop(&self, py: Python<'_>) -> PyResult<()> {
        let bridge = match &self.handler {
            Some(handler) => handler.use_running_loop(py)?,
            None => LoopBridge::for_running_loop(py)?,
        };
        let core = Arc::downgrade(&self.core);
        let threads = self.threads.clone();
        bridge.on_loop_end(Box::new(move || {
            if let Some(core) = core.upgrade() {
                crate::engine::runtime::handle().spawn(core.begin_shutdown(Some(Duration::ZERO)));
            }
            if let Some(threads) = threads {
                threads.close();
            }
        }));
        Ok(())
    }

    /// Counters: connections accepted/active, requests, bytes in/out, errors by kind, the
    /// request-duration histogram, and the handler calls waiting for a thread.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let stats = pythonize::pythonize(py, &self.core.service().stats)?;
        let waiting = self
            .threads
            .as_ref()
            .map_or(0, |threads| threads.debug_state().0);
        stats.set_item("handler_calls_waiting", waiting)?;
        Ok(stats)
    }

    /// Marks the server as draining: it serves on as before, but its health endpoint answers
    /// 503, so that balancers stop sending it connections before `shutdown()`.
    fn drain(&self) {
        self.core.drain();
    }

    /// Whether `drain()` or `shutdown()` has begun.
    #[getter]
    fn draining(&self) -> bool {
        self.core.is_draining()
    }

    fn __enter__(slf: Bound<'_, Self>) -> PyResult<Bound<'_, Self>> {
        slf.get().start()?;
        Ok(slf)
    }

    #[pyo3(signature = (exc_type = None, _exc_value = None, _traceback = None))]
    fn __exit__(
        &self,
        py: Python<'_>,
        exc_type: Option<Bound<'_, PyAny>>,
        _exc_value: Option<Bound<'_, PyAny>>,
        _traceback: Option<Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let interrupted =
            exc_type.is_some_and(|t| t.is(py.get_type::<pyo3::exceptions::PyKeyboardInterrupt>()));
        let grace = if interrupted {
            INTERRUPT_GRACE
        } else {
            EXIT_GRACE
        };
        // None, like False, lets the block's exception go on.
        self.wind_down(py, Some(grace))
    }

    fn __repr__(&self) -> String {
        format!(
            "<framesock.Server {} protocol='{}'>",
            self.core.address(),
            self.core.service().protocol
        )
    }
}

impl Server {
    /// Binds now, like socketserver: `address` is known and "address in use" raised here.
    fn bind(
        py: Python<'_>,
        settings: Settings,
        response: Option<Bound<'_, PyAny>>,
        handler: Option<Bound<'_, PyAny>>,
        purpose: Use,
    ) -> PyResult<Server> {
        let replies = Replies::new(py, response, handler, &settings, purpose)?;
        let log: Arc<dyn Log> = match (&replies.threads, purpose) {
            (Some(threads), Use::Serving) => Arc::new(PyLog::new(threads.clone())),
            _ => Arc::new(NoLog),
        };
        let service = Service::new(settings.protocol, settings.limits, replies.responder, log)
            .with_tls(settings.tls)
            .with_proxy(settings.proxy);
        let endpoint = settings.endpoint;
        let (backlog, max_connections) = (settings.backlog, settings.max_connections);
        let bound = wait::wait(py, async move {
            serve::Server::bind(&endpoint, backlog, service, max_connections).await
        })?;
        let core = match bound {
            Ok(core) => core,
            Err(err) => {
                if let Some(threads) = &replies.threads {
                    threads.close();
                }
                return Err(err.into());
            }
        };
        Ok(Server {
            core: Arc::new(core),
            handler: replies.handler,
            value: replies.value,
            threads: replies.threads,
        })
    }

    /// Starts shutting down now; the future finishes it (see `serve::Server::begin_shutdown`)
    /// and then closes the handler threads.
    fn begin_shutdown(
        &self,
        grace: Option<Duration>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let wind_down = self.core.begin_shutdown(grace);
        let threads = self.threads.clone();
        async move {
            wind_down.await;
            if let Some(threads) = threads {
                threads.close();
            }
        }
    }

    /// Shuts down and waits for it, Ctrl-C aware; on a handler thread it only begins.
    fn wind_down(&self, py: Python<'_>, grace: Option<Duration>) -> PyResult<()> {
        let task = crate::engine::runtime::handle().spawn(self.begin_shutdown(grace));
        if threads::on_handler_thread() {
            return Ok(());
        }
        // The shutdown runs as a task of its own: a Ctrl-C here stops the waiting, not it.
        let _ = wait::wait(py, task)?;
        Ok(())
    }

    /// `start_server`'s one exchange on this server's socket, as a future to wait on, and
    /// what turns its outcome into the result dict. `ready(address)` is called first.
    pub fn serve_one(
        &self,
        py: Python<'_>,
        ready: Option<Bound<'_, PyAny>>,
    ) -> PyResult<(
        impl std::future::Future<Output = Result<Exchange, OneShotError>> + Send + 'static,
        OneShotResult,
    )> {
        let exchange = self.core.serve_one().map_err(cannot_start)?;
        if let Some(ready) = ready {
            ready.call1((address_object(py, self.core.address())?,))?;
        }
        let result = OneShotResult {
            handler: self.handler.clone(),
            value: Python::attach(|py| self.value.as_ref().map(|v| v.clone_ref(py))),
            threads: self.threads.clone(),
        };
        Ok((exchange, result))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.core.is_inherited() {
            // Made before a fork: the engine server is never dropped here (see
            // `serve::Server::is_inherited`).
            std::mem::forget(self.core.clone());
            return;
        }
        if let Some(threads) = &self.threads {
            threads.close();
        }
    }
}

/// Turns the outcome of `start_server`'s exchange into its result dict.
pub struct OneShotResult {
    handler: Option<Arc<PyHandler>>,
    value: Option<Py<PyAny>>,
    threads: Option<HandlerThreads>,
}

impl OneShotResult {
    /// `{"peer", "address", "request", "request_bytes", "reply"}`, or the exchange's error.
    pub fn into_dict<'py>(
        self,
        py: Python<'py>,
        outcome: Result<Exchange, OneShotError>,
    ) -> PyResult<Bound<'py, PyDict>> {
        if let Some(threads) = &self.threads {
            threads.close();
        }
        let exchange = match outcome {
            Ok(exchange) => exchange,
            Err(OneShotError::Net(err)) => return Err(err.into()),
            Err(OneShotError::Failed(failure)) => return Err(failure_error(failure)),
        };
        let reply = match (self.value, self.handler) {
            (Some(value), _) => value,
            (None, Some(handler)) => match handler.take_last_value() {
                Some(value) => value,
                None => json::loads(py, &exchange.reply)?.unbind(),
            },
            (None, None) => json::loads(py, &exchange.reply)?.unbind(),
        };
        let dict = PyDict::new(py);
        dict.set_item("peer", address_object(py, &exchange.peer)?)?;
        if let Some(proxy) = &exchange.proxy_address {
            // Under the PROXY protocol: the balancer that spoke for `peer`.
            dict.set_item("proxy_address", address_object(py, proxy)?)?;
        }
        dict.set_item("address", address_object(py, &exchange.local)?)?;
        dict.set_item("request", request_text(py, &exchange.request)?)?;
        dict.set_item("request_bytes", PyBytes::new(py, &exchange.request))?;
        dict.set_item("reply", reply)?;
        if let Some(cert) = &exchange.certificate {
            // Mutual TLS: who the client proved to be.
            dict.set_item("tls_subject", &cert.subject)?;
            dict.set_item("tls_alt_names", &cert.alt_names)?;
        }
        Ok(dict)
    }
}

/// The `Server` behind `start_server` (and `framesock.aio.start_server`): classic, one
/// connection, bound now; its arguments are checked before anything touches the network.
#[allow(clippy::too_many_arguments)]
pub fn one_shot_server(
    py: Python<'_>,
    host: String,
    port: Int,
    path: Option<PathBuf>,
    response: Option<Bound<'_, PyAny>>,
    handler: Option<Bound<'_, PyAny>>,
    timeout: Option<f64>,
    max_frame: Int,
    backlog: Int,
    request_as: String,
    tls: Option<crate::engine::tls::ServerTls>,
    proxy: Option<serve::ProxyProtocol>,
) -> PyResult<Server> {
    let settings = Settings {
        endpoint: args::endpoint(host, port, path)?,
        protocol: Protocol::Classic,
        limits: Limits {
            timeout: args::timeout("timeout", timeout)?,
            idle_timeout: None,
            max_frame: args::byte_limit("max_frame", max_frame)?,
            max_unsent: DEFAULT_MAX_UNSENT,
            // One connection: max_frame is the bound that matters.
            max_buffered: usize::MAX,
            max_connections_per_address: None,
        },
        max_connections: 1,
        backlog: args::backlog(backlog)?,
        handler_threads: 1,
        request_as,
        tls,
        proxy,
    };
    Server::bind(py, settings, response, handler, Use::OneExchange)
}

/// Serves one client, one request, like the seed's server, and returns what was exchanged.
#[pyfunction]
#[pyo3(signature = (
    host = String::from("127.0.0.1"), port = Int::new(8000), response = None, *, handler = None,
    timeout = Some(20.0), max_frame = Int::new(args::DEFAULT_MAX_LEN as i64), backlog = Int::new(5),
    request_as = String::from("text"), ready = None, path = None, tls = None,
    proxy_protocol = false, proxy_from = None,
))]
#[pyo3(
    text_signature = "(host='127.0.0.1', port=8000, response=None, *, handler=None, \
    timeout=20.0, max_frame=16777216, backlog=5, request_as='text', ready=None, path=None, \
    tls=None, proxy_protocol=False, proxy_from=None)"
)]
#[allow(clippy::too_many_arguments)]
pub fn start_server<'py>(
    py: Python<'py>,
    #[pyo3(from_py_with = named::host)] host: String,
    #[pyo3(from_py_with = named::port)] port: Int,
    response: Option<Bound<'py, PyAny>>,
    handler: Option<Bound<'py, PyAny>>,
    #[pyo3(from_py_with = named::timeout)] timeout: Option<f64>,
    #[pyo3(from_py_with = named::max_frame)] max_frame: Int,
    #[pyo3(from_py_with = named::backlog)] backlog: Int,
    #[pyo3(from_py_with = named::request_as)] request_as: String,
    #[pyo3(from_py_with = named::ready)] ready: Option<Bound<'py, PyAny>>,
    #[pyo3(from_py_with = named::path)] path: Option<PathBuf>,
    #[pyo3(from_py_with = named::server_tls)] tls: Option<PyRef<'py, ServerTlsSettings>>,
    #[pyo3(from_py_with = named::proxy_protocol)] proxy_protocol: bool,
    #[pyo3(from_py_with = named::proxy_from)] proxy_from: Option<Vec<String>>,
) -> PyResult<Bound<'py, PyDict>> {
    let tls = tls.map(|tls| tls.settings.clone());
    let proxy = args::proxy_protocol(proxy_protocol, proxy_from)?;
    let server = one_shot_server(
        py, host, port, path, response, handler, timeout, max_frame, backlog, request_as, tls,
        proxy,
    )?;
    let (exchange, result) = server.serve_one(py, ready)?;
    wait::wait(py, exchange).and_then(|outcome| result.into_dict(py, outcome))
}
