//! What every connection of a server shares (`Service`), a connection's set-up (TLS, the
//! caller), answering one request, and reporting what failed.

use super::*;

/// Everything a connection needs to be served.
pub struct Service {
    pub protocol: Protocol,
    pub limits: Limits,
    pub responder: Responder,
    pub stats: Stats,
    pub log: Arc<dyn Log>,
    /// The connections silent between requests, for making room when the server is full.
    pub(super) idle: IdleConnections,
    /// Connections per client IP address now, for `max_connections_per_address`.
    pub(super) per_address: Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
    /// The budget of peer-problem records (WARNING).
    pub(super) peer_log: LogBudget,
    /// TLS for every connection, if set.
    pub(super) tls: Option<crate::engine::tls::ServerTls>,
    /// The PROXY protocol, if every connection must begin with its header.
    pub(super) proxy: Option<ProxyProtocol>,
    /// What requests being answered may take in memory once the handler has them (in KiB),
    /// when that is more than their size (see `Handler::expansion`).
    pub(super) answering: Semaphore,
}

/// At most this many records of one budget per window.
pub(super) const PEER_LOG_BURST: u32 = 10;
pub(super) const PEER_LOG_WINDOW: Duration = Duration::from_secs(10);

/// The text of a caught panic.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|text| text.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".to_owned())
}

impl Service {
    pub fn new(
        protocol: Protocol,
        limits: Limits,
        responder: Responder,
        log: Arc<dyn Log>,
    ) -> Self {
        let max_buffered = limits.max_buffered as u64;
        Service {
            protocol,
            limits,
            responder,
            stats: Stats::default(),
            log,
            idle: IdleConnections::default(),
            per_address: Mutex::default(),
            answering: Semaphore::new(answering_units(max_buffered)),
            peer_log: LogBudget::new(PEER_LOG_BURST, PEER_LOG_WINDOW),
            tls: None,
            proxy: None,
        }
    }

    /// The same service with every connection beginning with a PROXY protocol header.
    pub fn with_proxy(mut self, proxy: Option<ProxyProtocol>) -> Self {
        self.proxy = proxy;
        self
    }

    /// The same service with every connection under TLS.
    pub fn with_tls(mut self, tls: Option<crate::engine::tls::ServerTls>) -> Self {
        self.tls = tls;
        self
    }

    /// The reply to one request. A request that grows in memory once the handler has it
    /// (decoded JSON) waits until the requests being answered leave room for it in
    /// `max_buffered`, counted at that size. One larger than three quarters of it counts as
    /// three quarters, so that such documents are answered one at a time while small requests
    /// still find room beside them (when one could take all of it, a peer streaming 14 MiB
    /// documents held every other JSON request up for a whole document, ~0.45 s each).
    pub(super) async fn answer(
        &self,
        request: &Bytes,
        caller: &Arc<Caller>,
    ) -> std::result::Result<Bytes, Failure> {
        let _counted = Gauged::count(&self.stats.requests_in_progress);
        let expansion = self.responder.expansion();
        if expansion <= 1 {
            return self.responder.reply(request, caller).await;
        }
        let most = answering_units(self.limits.max_buffered as u64 / 4 * 3);
        let cost = answering_units(request.len() as u64 * expansion).min(most) as u32;
        // What fits now goes now, even past a large request that waits for more room.
        let _room = match self.answering.try_acquire_many(cost) {
            Ok(room) => room,
            Err(_) => self
                .answering
                .acquire_many(cost)
                .await
                .expect("the semaphore is never closed"),
        };
        self.responder.reply(request, caller).await
    }

    /// Counts and logs a failed exchange; returns the framed error reply's JSON. A handler
    /// that failed is the program's problem: ERROR, with its traceback. A request that was
    /// bad is the peer's: see `peer_problem`.
    pub(super) fn exchange_failed(&self, failure: &Failure, peer: &Address) -> Vec<u8> {
        bump(self.stats.failure(failure.kind), 1);
        let kind = failure.kind.wire();
        let message = format!(
            "request from {peer} failed ({}): {}",
            kind.name(),
            failure.message
        );
        match failure.kind {
            FailureKind::BadRequest => self.peer_problem(message),
            FailureKind::Handler | FailureKind::Encode => {
                self.log.log(Level::Error, message, Some(failure))
            }
        }
        codec::error_reply(kind, &failure.message)
    }

    /// Counts and logs a connection that ended in error.
    pub(super) fn connection_failed(&self, err: &Error, peer: &Address) {
        if let Error::Wire(WireError::ClosedBeforeMessage) = err {
            // A client that connects and leaves without a word (a health check, a port
            // probe) is neither an error nor news.
            bump(&self.stats.empty, 1);
            return;
        }
        bump(self.stats.connection_error(err), 1);
        self.peer_problem(format!("connection from {peer} dropped: {err}"));
    }

    /// Logs what a peer did wrong (a bad frame, a timeout, a disconnect, no room): WARNING,
    /// no traceback, and at most `PEER_LOG_BURST` records per `PEER_LOG_WINDOW`, so a peer that
    /// misbehaves on purpose cannot fill the disk. What is held back is counted and said
    /// with the next record that gets through.
    pub(super) fn peer_problem(&self, message: String) {
        if let Some(message) = self.peer_log.admit(message) {
            self.log.log(Level::Warning, message, None);
        }
    }

    /// Serves one accepted connection until it ends, `stop` is cancelled between requests, or
    /// an error drops it.
    ///
    /// `slot` is the connection's place under `max_connections`: given back as soon as the
    /// connection is only saying goodbye.
    pub async fn serve_connection<S>(
        &self,
        mut stream: S,
        caller: Arc<Caller>,
        stop: CancellationToken,
        slot: Option<tokio::sync::OwnedSemaphorePermit>,
    ) where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let peer = caller.address.clone();
        // The connection's own token: waiting on the server's shared one would take its lock
        // twice per request, from every connection at once.
        let stop = stop.child_token();
        bump(&self.stats.accepted, 1);
        let _active = Gauged::count(&self.stats.active);
        let Some(_counted) = AddressCount::admit(self, &peer) else {
            bump(&self.stats.address_refused, 1);
            let limit = self.limits.max_connections_per_address.unwrap_or_default();
            self.peer_problem(format!(
                "connection from {peer} refused: its address has max_connections_per_address \
                 ({limit}) connections already"
            ));
            if self.protocol == Protocol::Framed {
                drop(slot);
                let why = "its address has max_connections_per_address connections already";
                self.say_goodbye(&mut stream, why, &peer).await;
            }
            return;
        };
        let outcome = match self.protocol {
            Protocol::Classic => match self.answer_classic(&mut stream, &caller, &stop).await {
                Ok(Classic::Answered {
                    reply: Err(failure),
                    ..
                }) => {
                    self.exchange_failed(&failure, &peer);
                    Ok(())
                }
                Ok(_) => Ok(()),
                Err(err) => Err(err),
            },
            Protocol::Framed => match self.serve_framed(&mut stream, &caller, &stop).await {
                Ok(Ending::Goodbye(why)) => {
                    drop(slot);
                    self.say_goodbye(&mut stream, why, &peer).await;
                    Ok(())
                }
                Ok(Ending::Done) => Ok(()),
                Err(err) => Err(err),
            },
        };
        if let Err(err) = outcome {
            self.connection_failed(&err, &peer);
        }
        // Counted first, closed next, and only then no longer active: by the time a peer sees
        // the close, the stats say why, and `connections_active` drops once it is closed.
        drop(stream);
    }
}
