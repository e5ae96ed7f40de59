//! The framed protocol: kept connections, pipelined requests answered in order.

use super::*;

/// The most buffered requests of one connection taken at once.
pub(super) const MAX_BATCH: usize = 256;

/// The most pipelined requests of one connection a concurrent (coroutine) responder answers
/// at once (fewer when replies are large: see `answer_concurrently`).
pub(super) const CONCURRENT_CHUNK: usize = 16;

/// How long a connection that has sent nothing yet when the shutdown begins gets for its first
/// request (see `await_request`).
pub(super) const FIRST_REQUEST_GRACE: Duration = Duration::from_millis(250);

/// How a framed connection's serving ended.
pub(super) enum Ending {
    /// The peer closed, or the server closed after telling why.
    Done,
    /// The server chooses to close, between requests: say goodbye first, with the reason.
    Goodbye(&'static str),
}

/// What waiting for a request came to.
pub(super) enum Waited {
    /// These many bytes of it arrived.
    Read(usize),
    /// The peer closed its side.
    PeerClosed,
    /// The server closes the connection (the reason says why).
    Closing(&'static str),
}

impl Service {
    /// Answers `batch` with a concurrent responder: several requests at once, the replies
    /// queued in order. Only as many run at once as replies of the largest size seen so far
    /// (`largest`) fit in `max_unsent` (one while none is known, at most `CONCURRENT_CHUNK`),
    /// and none starts while earlier replies wait to be written: so the replies a connection
    /// holds stay near `max_unsent`, also for a client that never reads them.
    pub(super) async fn answer_concurrently<S>(
        &self,
        stream: &mut S,
        output: &mut BytesMut,
        batch: &[Bytes],
        caller: &Arc<Caller>,
        largest: &mut usize,
    ) -> Result<()>
    where
        S: AsyncWrite + Unpin,
    {
        let mut running = FuturesOrdered::new();
        let mut requests = batch.iter();
        loop {
            let room = match *largest {
                0 => 1,
                size => (self.limits.max_unsent / size).clamp(1, CONCURRENT_CHUNK),
            };
            while running.len() < room {
                let Some(request) = requests.next() else {
                    break;
                };
                running.push_back(self.answer(request, caller));
            }
            let Some(reply) = running.next().await else {
                return Ok(());
            };
            if let Ok(json) = &reply {
                *largest = (*largest).max(json.len());
            }
            self.queue_outcome(stream, output, reply, &caller.address)
                .await?;
        }
    }

    /// Adds a handler's reply, or the error reply for its failure, to `output`.
    pub(super) async fn queue_outcome<S>(
        &self,
        stream: &mut S,
        output: &mut BytesMut,
        reply: std::result::Result<Bytes, Failure>,
        peer: &Address,
    ) -> Result<()>
    where
        S: AsyncWrite + Unpin,
    {
        let (json, is_error) = match reply {
            Ok(json) => (json, false),
            Err(failure) => (Bytes::from(self.exchange_failed(&failure, peer)), true),
        };
        self.queue_reply(stream, output, &json, is_error, peer)
            .await
    }

    /// Adds a reply to `output`, writing first whatever is there if the reply would take it
    /// past `max_unsent`. A reply larger than that is written straight from where it is.
    pub(super) async fn queue_reply<S>(
        &self,
        stream: &mut S,
        output: &mut BytesMut,
        json: &Bytes,
        is_error: bool,
        peer: &Address,
    ) -> Result<()>
    where
        S: AsyncWrite + Unpin,
    {
        if json.len() > codec::MAX_REPLY_PAYLOAD {
            // Counted and logged as any reply that cannot be sent (it was neither).
            let failure = Failure::new(
                FailureKind::Encode,
                format!(
                    "the reply ({} bytes) is too large for a frame (at most {})",
                    json.len(),
                    codec::MAX_REPLY_PAYLOAD
                ),
            );
            let reply = self.exchange_failed(&failure, peer);
            codec::put_reply(&reply, true, output)?;
            return Ok(());
        }
        if output.len() + json.len() > self.limits.max_unsent {
            self.send(stream, output, peer).await?;
        }
        if json.len() > self.limits.max_unsent {
            let mut header = BytesMut::from(&codec::reply_header(json.len(), is_error)[..]);
            self.send(stream, &mut header, peer).await?;
            self.write_bounded(stream, json, peer).await?;
            bump(&self.stats.bytes_out, json.len() as u64);
            return Ok(());
        }
        codec::put_reply(json, is_error, output)?;
        Ok(())
    }

    /// Waits for the first bytes of a request: how many came, or that the peer closed, or that
    /// the server closes the connection (shutdown, the idle limit, or room wanted). `first`:
    /// nothing came on this connection yet.
    pub(super) async fn await_request<S>(
        &self,
        stream: &mut S,
        input: &mut BytesMut,
        stop: Pin<&mut WaitForCancellationFuture<'_>>,
        registration: &IdleRegistration<'_>,
        idle_timer: &mut IdleTimer,
        first: bool,
    ) -> Result<Waited>
    where
        S: AsyncRead + Unpin,
    {
        input.reserve(8 * 1024);
        let idle = registration.enter();
        idle_timer.start();
        tokio::select! {
            biased;
            _ = stop => {
                if !first {
                    return Ok(Waited::Closing("the server is shutting down"));
                }
                // A connection accepted as the shutdown began has its first request on the way
                // (a balancer writes it with the connection): it is answered, then told, so
                // that a client knowing nothing of the closing handshake loses nothing.
                match tokio::time::timeout(FIRST_REQUEST_GRACE, stream.read_buf(input)).await {
                    Ok(Ok(0)) => Ok(Waited::PeerClosed),
                    Ok(Ok(n)) => Ok(Waited::Read(n)),
                    Ok(Err(err)) if peer_left(&err) => Ok(Waited::PeerClosed),
                    Ok(Err(err)) => Err(WireError::Io(err).into()),
                    Err(_) => Ok(Waited::Closing("the server is shutting down")),
                }
            }
            _ = idle.evicted() => {
                // A connection with nothing received yet has its first request on the way (a
                // client resending what another connection did not handle): it is answered
                // first, so that a full server cannot turn a request away again and again.
                if first {
                    if let Ok(read) = tokio::time::timeout(FIRST_REQUEST_GRACE, stream.read_buf(input)).await {
                        return match read {
                            Ok(0) => Ok(Waited::PeerClosed),
                            Ok(n) => Ok(Waited::Read(n)),
                            Err(err) if peer_left(&err) => Ok(Waited::PeerClosed),
                            Err(err) => Err(WireError::Io(err).into()),
                        };
                    }
                }
                bump(&self.stats.idle_evicted, 1);
                Ok(Waited::Closing("the server is full: the connection idle longest makes room"))
            }
            read = stream.read_buf(input) => match read {
                Ok(0) => Ok(Waited::PeerClosed),
                Ok(n) => Ok(Waited::Read(n)),
                // Between requests: a reset, or TLS ended without close_notify, loses nothing.
                Err(err) if peer_left(&err) => Ok(Waited::PeerClosed),
                Err(err) => Err(WireError::Io(err).into()),
            },
            _ = idle_timer.expired() => {
                bump(&self.stats.idle_closed, 1);
                Ok(Waited::Closing("idle_timeout passed with no request"))
            }
        }
    }

    /// Kept connections: answer every request already buffered, write the replies together,
    /// then wait for more.
    pub(super) async fn serve_framed<S>(
        &self,
        stream: &mut S,
        caller: &Arc<Caller>,
        stop: &CancellationToken,
    ) -> Result<Ending>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let peer = &caller.address;
        let mut codec = FrameCodec::new(self.limits.max_frame);
        let mut input = BytesMut::new();
        let mut output = BytesMut::new();
        let mut charge = Charge::new(&self.stats.bytes_buffered);
        // When the request now arriving must be complete (its first byte started the clock).
        let mut request_deadline: Option<Instant> = None;
        // Whether the request now arriving was held against max_buffered already.
        let mut admitted = false;
        let registration = self.idle.register();
        let mut idle_timer = IdleTimer::new(self.limits.idle_timeout);
        // One wait on `stop` for the connection's life: a new one per request took the token's
        // lock to add a waiter and again to take it out.
        let mut stop_wait = std::pin::pin!(stop.cancelled());
        let mut batch = Vec::new();
        // The largest reply of this connection so far, for how many to answer at once.
        let mut largest_reply = 0;
        // Whether any byte came: a connection that ends before its first is counted apart.
        let mut received = false;
        loop {
            // Every request already buffered (up to a bound), answered in order.
            let mut refused = None;
            while batch.len() < MAX_BATCH {
                match codec.decode(&mut input) {
                    Ok(Some(frame)) => batch.push(frame.payload),
                    Ok(None) => break,
                    Err(err) => {
                        refused = Some(err);
                        break;
                    }
                }
            }
            // When this batch's requests were all here: their durations end when their
            // replies are written, together.
            let batch_received = (!batch.is_empty()).then(Instant::now);
            let answered = batch.len() as u64;
            if !batch.is_empty() {
                request_deadline = None;
                admitted = false;
                charge.reserved = 0;
                bump(&self.stats.requests, batch.len() as u64);
            }
            let in_batch: usize = batch.iter().map(Bytes::len).sum();
            charge.set(input.len() + in_batch);
            // Pipelined requests to a concurrent responder are answered a few at a time, in
            // order; the replies go out whenever they pass max_unsent. One request alone (a
            // client waiting for each reply) needs no such bookkeeping (an allocation each).
            if self.responder.concurrent() && batch.len() > 1 {
                self.answer_concurrently(stream, &mut output, &batch, caller, &mut largest_reply)
                    .await?;
            } else {
                for request in &batch {
                    let reply = self.answer(request, caller).await;
                    self.queue_outcome(stream, &mut output, reply, peer).await?;
                }
            }
            // The requests are answered: drop them now, so the input buffer they were cut from
            // is ours alone again and the next read reuses it instead of allocating another.
            let full = batch.len() == MAX_BATCH;
            batch.clear();
            if let Some(err) = refused {
                // The stream cannot be resynchronised after a refused header: say why, close.
                let reply = codec::error_reply(codec::ErrorKind::FrameTooLarge, &err.to_string());
                codec::put_reply(&reply, true, &mut output)?;
                self.send(stream, &mut output, peer).await?;
                self.linger(stream, LINGER_TIME).await;
                return Err(err.into());
            }
            // Observed as the replies' first byte is written (the write follows at once): so
            // by the time the client has its reply, the counters show it.
            if let Some(batch_received) = batch_received {
                self.stats
                    .duration
                    .observe(batch_received.elapsed(), answered);
            }
            self.send(stream, &mut output, peer).await?;
            charge.set(input.len());
            // Draining: the requests answered, the rest (unread, or arrived meanwhile) were
            // not handled; the goodbye says so and the client sends them again elsewhere. A
            // client that pipelines without a pause is told as soon as its batch is answered.
            if answered > 0 && stop.is_cancelled() {
                return Ok(Ending::Goodbye("the server is shutting down"));
            }
            if full {
                continue; // more requests may be buffered already
            }
            if input.is_empty() {
                match self
                    .await_request(
                        stream,
                        &mut input,
                        stop_wait.as_mut(),
                        &registration,
                        &mut idle_timer,
                        !received,
                    )
                    .await?
                {
                    Waited::Read(n) => {
                        received = true;
                        bump(&self.stats.bytes_in, n as u64);
                    }
                    Waited::PeerClosed if !received => {
                        bump(&self.stats.empty, 1);
                        return Ok(Ending::Done);
                    }
                    Waited::PeerClosed => return Ok(Ending::Done),
                    Waited::Closing(why) => return Ok(Ending::Goodbye(why)),
                }
                continue;
            }
            // Part of a request is here: the rest must arrive before the request's deadline.
            let deadline = *request_deadline.get_or_insert_with(|| {
                Instant::now()
                    + self
                        .limits
                        .timeout
                        .unwrap_or(Duration::from_secs(86400 * 365))
            });
            if !admitted && input.len() >= codec::HEADER_LEN {
                // A new request's header: is there room for all it declares?
                if let Err(whole) = admit(&mut charge, &input, &self.limits) {
                    self.refuse_busy(stream, &mut input, whole, deadline, peer)
                        .await?;
                    charge.set(0);
                    codec::put_reply(&self.busy_reply(peer), true, &mut output)?;
                    self.send(stream, &mut output, peer).await?;
                    request_deadline = None;
                    continue;
                }
                admitted = true;
            }
            let read = tokio::select! {
                biased;
                read = tokio::time::timeout_at(deadline, stream.read_buf(&mut input)) => read,
                () = registration.stalled() => {
                    bump(&self.stats.stalled_evicted, 1);
                    return Ok(Ending::Goodbye(
                        "the server is full and this request made no progress: it makes room",
                    ));
                }
            };
            match read {
                Err(_elapsed) => {
                    return Err(Error::Timeout(format!(
                        "timed out after {} s waiting for the rest of a request from {peer}",
                        self.limits.timeout.map_or(0.0, |t| t.as_secs_f64())
                    )))
                }
                Ok(Ok(0)) => {
                    codec.decode_eof(&mut input)?;
                    return Ok(Ending::Done);
                }
                Ok(Ok(n)) => {
                    bump(&self.stats.bytes_in, n as u64);
                    charge.set(input.len());
                }
                Ok(Err(err)) => return Err(WireError::Io(err).into()),
            }
        }
    }

    /// Reads and drops the rest of a request (`whole` bytes with its header, the first of
    /// which are in `input`) that there is no room to keep, by `deadline`.
    pub(super) async fn refuse_busy<S>(
        &self,
        stream: &mut S,
        input: &mut BytesMut,
        whole: u64,
        deadline: Instant,
        peer: &Address,
    ) -> Result<()>
    where
        S: AsyncRead + Unpin,
    {
        let had = input.len() as u64;
        let pending = whole - had;
        input.clear();
        let mut sink = tokio::io::sink();
        let drained = tokio::time::timeout_at(
            deadline,
            tokio::io::copy(&mut (&mut *stream).take(pending), &mut sink),
        )
        .await;
        match drained {
            Err(_elapsed) => Err(Error::Timeout(format!(
                "timed out waiting for the rest of a request from {peer} (refused: server busy)"
            ))),
            Ok(Ok(read)) if read == pending => {
                bump(&self.stats.bytes_in, read);
                Ok(())
            }
            Ok(Ok(read)) => Err(WireError::Truncated {
                part: codec::Part::Payload,
                expected: (whole - codec::HEADER_LEN as u64) as usize,
                received: (had + read) as usize - codec::HEADER_LEN,
            }
            .into()),
            Ok(Err(err)) => Err(WireError::Io(err).into()),
        }
    }

    /// Counts and logs a request refused for lack of room; returns the error reply.
    pub(super) fn busy_reply(&self, peer: &Address) -> Vec<u8> {
        bump(&self.stats.busy, 1);
        let message = format!(
            "the server holds max_buffered ({} bytes) of requests; try again later",
            self.limits.max_buffered
        );
        self.peer_problem(format!("request from {peer} refused: {message}"));
        codec::error_reply(codec::ErrorKind::Busy, &message)
    }
}
