//! A server's life: bound, serving, winding down, finished; and the one-exchange path.

use super::*;

/// What one exchange of [`Server::serve_one`] was.
pub struct Exchange {
    pub peer: Address,
    /// Under the PROXY protocol, the balancer that spoke for `peer`.
    pub proxy_address: Option<Address>,
    /// The client's verified certificate (mutual TLS).
    pub certificate: Option<crate::engine::tls::PeerCertificate>,
    pub local: Address,
    pub request: Bytes,
    pub reply: Bytes,
}

/// Why [`Server::serve_one`] has no exchange to show.
#[derive(Debug)]
pub enum OneShotError {
    /// The network or the peer failed.
    Net(Error),
    /// The request arrived but got no reply.
    Failed(Failure),
}

impl From<Error> for OneShotError {
    fn from(err: Error) -> Self {
        OneShotError::Net(err)
    }
}

/// Where a server is in its life.
pub(super) enum Lifecycle {
    /// Bound and listening (the OS queues connections), not yet accepting.
    Bound(Listener),
    /// The accept loop runs.
    Serving { accept: JoinHandle<()> },
    /// Shut down, or its one exchange taken; cannot start again.
    Stopped,
}

/// Why a server cannot start (or serve its one exchange).
#[derive(Debug, PartialEq, Eq)]
pub enum CannotStart {
    /// It was shut down, or its one exchange was taken.
    Stopped,
    /// It was made before a fork (see [`Server::is_inherited`]).
    Inherited,
}

/// A server from bind to shutdown: many connections at once, each in its own task.
pub struct Server {
    pub(super) service: Arc<Service>,
    pub(super) address: Address,
    /// The engine generation it was bound in (see `runtime::forget_after_fork`).
    pub(super) generation: u64,
    pub(super) max_connections: usize,
    pub(super) lifecycle: Mutex<Lifecycle>,
    /// Stops accepting and ends connections waiting between requests.
    pub(super) stop: CancellationToken,
    /// Ends every connection outright, once the shutdown grace is over.
    pub(super) abort: CancellationToken,
    /// Set once shutdown has finished.
    pub(super) finished: CancellationToken,
    pub(super) connections: TaskTracker,
    /// Why the server stopped on its own, if it did (a caught panic in its accept loop).
    pub(super) failure: Arc<Mutex<Option<String>>>,
    /// Set by `drain`: the server still serves, but says (health checks) it is going.
    pub(super) draining: std::sync::atomic::AtomicBool,
}

impl Server {
    /// Binds now, like socketserver: the address is known and "address in use" told here.
    pub async fn bind(
        endpoint: &Endpoint,
        backlog: u32,
        service: Service,
        max_connections: usize,
    ) -> Result<Server> {
        let listener = Listener::bind(endpoint, backlog).await?;
        let address = listener.local_address()?;
        Ok(Server {
            service: Arc::new(service),
            address,
            generation: runtime::generation(),
            max_connections,
            lifecycle: Mutex::new(Lifecycle::Bound(listener)),
            stop: CancellationToken::new(),
            abort: CancellationToken::new(),
            finished: CancellationToken::new(),
            connections: TaskTracker::new(),
            failure: Arc::default(),
            draining: Default::default(),
        })
    }

    /// Whether this server came from the parent of this forked process. Its socket, tasks and
    /// locks belong to the parent's runtime, whose threads do not exist here: touching them
    /// (even dropping the socket, which would unregister it from the epoll instance the parent
    /// shares) could hang the child or break the parent, so such a server is left alone.
    pub fn is_inherited(&self) -> bool {
        self.generation != runtime::generation()
    }

    /// The bound address (with the real port when 0 was asked for).
    pub fn address(&self) -> &Address {
        &self.address
    }

    /// What the connections are served with (for its counters).
    pub fn service(&self) -> &Arc<Service> {
        &self.service
    }

    pub(super) fn lifecycle(&self) -> std::sync::MutexGuard<'_, Lifecycle> {
        locked(&self.lifecycle)
    }

    /// Starts the accept loop on the shared runtime; starting again does nothing.
    pub fn start(&self) -> std::result::Result<(), CannotStart> {
        if self.is_inherited() {
            return Err(CannotStart::Inherited);
        }
        let mut lifecycle = self.lifecycle();
        match std::mem::replace(&mut *lifecycle, Lifecycle::Stopped) {
            Lifecycle::Bound(listener) => {
                let accept = AssertUnwindSafe(accept_loop(
                    self.service.clone(),
                    listener,
                    self.max_connections,
                    self.stop.clone(),
                    self.abort.clone(),
                    self.connections.clone(),
                ));
                let service = self.service.clone();
                let failure = self.failure.clone();
                let wind_down = self.wind_down(Some(Duration::from_secs(5)));
                let accept = runtime::handle().spawn(async move {
                    if let Err(panic) = accept.catch_unwind().await {
                        // No silent dead server: it shuts down, and callers learn why.
                        let message = format!("internal error: {}", panic_message(&*panic));
                        bump(&service.stats.errors.internal, 1);
                        service.log.log(
                            Level::Error,
                            format!("the server stopped accepting ({message}); shutting down"),
                            None,
                        );
                        *locked(&failure) = Some(message);
                        wind_down.await;
                    }
                });
                *lifecycle = Lifecycle::Serving { accept };
                Ok(())
            }
            serving @ Lifecycle::Serving { .. } => {
                *lifecycle = serving;
                Ok(())
            }
            Lifecycle::Stopped => Err(CannotStart::Stopped),
        }
    }

    /// Why the server stopped on its own, if it did.
    pub fn failure(&self) -> Option<String> {
        locked(&self.failure).clone()
    }

    /// Stops accepting and ends connections waiting between requests (without touching the
    /// accept task); the future drains the connections within `grace` and marks the server
    /// finished.
    pub(super) fn wind_down(
        &self,
        grace: Option<Duration>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let (stop, connections, abort, finished) = (
            self.stop.clone(),
            self.connections.clone(),
            self.abort.clone(),
            self.finished.clone(),
        );
        async move {
            stop.cancel();
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
            finished.cancel();
        }
    }

    /// Waits until shutdown has finished.
    pub fn finished(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.finished.clone().cancelled_owned()
    }

    /// Marks the server as draining: it serves on as before, and health checks are told it
    /// is going, so that balancers send it no new connections before it stops accepting.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Whether a drain or a shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst) || self.stop.is_cancelled()
    }

    /// Whether shutdown has finished (an inherited server counts as finished).
    pub fn is_finished(&self) -> bool {
        self.is_inherited() || self.finished.is_cancelled()
    }

    /// Serves exactly one connection and one request on the bound socket, like the seed:
    /// later connection attempts are refused, not queued. Whatever goes wrong is returned
    /// rather than logged: the caller asked for exactly this exchange.
    pub fn serve_one(
        &self,
    ) -> std::result::Result<
        impl std::future::Future<Output = std::result::Result<Exchange, OneShotError>> + Send + 'static,
        CannotStart,
    > {
        if self.is_inherited() {
            return Err(CannotStart::Inherited);
        }
        let Lifecycle::Bound(listener) =
            std::mem::replace(&mut *self.lifecycle(), Lifecycle::Stopped)
        else {
            return Err(CannotStart::Stopped);
        };
        let service = self.service.clone();
        let local = self.address.clone();
        let stop = self.stop.clone();
        let finished = self.finished.clone();
        Ok(async move {
            let exchange = async {
                let (stream, peer) =
                    tokio::select! {
                        biased;
                        _ = stop.cancelled() => return Err(OneShotError::Net(Error::Os {
                            err: std::io::Error::new(std::io::ErrorKind::Interrupted, "the server was shut down"),
                            doing: format!("accept on {local}"),
                        })),
                        accepted = listener.accept() => accepted.map_err(|err| Error::Os {
                            err,
                            doing: format!("accept on {local}"),
                        })?,
                    };
                drop(listener);
                bump(&service.stats.accepted, 1);
                let _active = Gauged::count(&service.stats.active);
                let (mut stream, peer, proxy_address) = match service.proxied(stream, peer).await {
                    Ok(Some(proxied)) => proxied,
                    Ok(None) => return Err(OneShotError::Net(Error::Wire(
                        WireError::ClosedBeforeMessage,
                    ))),
                    Err(refused) => {
                        bump(&service.stats.errors.proxy, 1);
                        return Err(OneShotError::Net(refused.error));
                    }
                };
                if service.tls.is_some() {
                    stream = match service.secured(stream, &peer).await {
                        Some(secured) => secured,
                        None => {
                            return Err(OneShotError::Net(Error::Tls(format!(
                                "TLS handshake with {peer} failed (see the framesock log)"
                            ))))
                        }
                    };
                }
                let caller = Arc::new(caller_of(&stream, peer.clone(), proxy_address));
                match service.answer_classic(&mut stream, &caller, &stop).await? {
                    Classic::Stopped => Err(OneShotError::Net(Error::Wire(
                        WireError::ClosedBeforeMessage,
                    ))),
                    Classic::Answered { request, reply } => Ok(Exchange {
                        peer,
                        proxy_address: caller.proxy_address.clone(),
                        certificate: caller.certificate.clone(),
                        local,
                        request,
                        reply: reply.map_err(OneShotError::Failed)?,
                    }),
                }
            }
            .await;
            finished.cancel();
            exchange
        })
    }

    /// Stops accepting and ends connections waiting between requests now; the returned future
    /// lets exchanges in progress finish for up to `grace` (forever with `None`), drops the
    /// rest, and marks the server finished. Calling it again is harmless.
    pub fn begin_shutdown(
        &self,
        grace: Option<Duration>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let inherited = self.is_inherited();
        let mut state = None;
        if !inherited {
            self.stop.cancel();
            let previous = std::mem::replace(&mut *self.lifecycle(), Lifecycle::Stopped);
            let accept = match previous {
                Lifecycle::Serving { accept, .. } => Some(accept),
                // Never started (the listener is dropped here) or already stopped.
                _ => None,
            };
            state = Some((accept, self.wind_down(grace)));
        }
        async move {
            // Inherited through fork: nothing of it runs here, and nothing of it is touched.
            let Some((accept, wind_down)) = state else {
                return;
            };
            if let Some(accept) = accept {
                let _ = accept.await;
            }
            wind_down.await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.is_inherited() {
            return; // see `is_inherited`; the owner should not drop it at all
        }
        // A server dropped without shutdown must not leave connections served forever.
        self.stop.cancel();
        self.abort.cancel();
    }
}
