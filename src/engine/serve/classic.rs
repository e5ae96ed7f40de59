//! The classic protocol: one request per connection, the reply ended by the close.

use super::*;

/// How long a classic connection chosen to make room, silent so far, is given for its request
/// to show before it is closed (see `answer_classic`).
pub(super) const CLASSIC_EVICTION_GRACE: Duration = Duration::from_millis(50);

/// What one classic exchange came to.
pub(super) enum Classic {
    /// Shutdown came before the request.
    Stopped,
    /// The request, and the reply sent for it or why there was none.
    Answered {
        request: Bytes,
        reply: std::result::Result<Bytes, Failure>,
    },
}

impl Service {
    /// The seed's exchange: one request, a raw JSON reply, close. A failed exchange closes
    /// without a reply (the classic wire has no way to say what went wrong).
    pub(super) async fn answer_classic<S>(
        &self,
        stream: &mut S,
        caller: &Arc<Caller>,
        stop: &CancellationToken,
    ) -> Result<Classic>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let peer = &caller.address;
        let timeout = self.limits.timeout;
        let mut input = BytesMut::new();
        let mut codec = FrameCodec::new(self.limits.max_frame);
        let mut charge = Charge::new(&self.stats.bytes_buffered);
        let registration = self.idle.register();
        let read = within(
            timeout,
            || format!("waiting for the request from {peer}"),
            async {
                let mut admitted = false;
                loop {
                    if let Some(frame) = codec.decode(&mut input)? {
                        return Ok(Some(frame));
                    }
                    if !admitted && input.len() >= codec::HEADER_LEN {
                        if admit(&mut charge, &input, &self.limits).is_err() {
                            self.busy_reply(peer); // no room: the classic wire can only close
                            return Ok(None);
                        }
                        admitted = true;
                    }
                    let read = if input.is_empty() {
                        // Nothing of the request yet: idle, and so first to go for room.
                        let idle = registration.enter();
                        let read = tokio::select! {
                            _ = idle.evicted() => None,
                            read = stream.read_buf(&mut input) => Some(read),
                        };
                        match read {
                            Some(read) => read,
                            // Chosen to make room: only if its request has not begun to
                            // arrive meanwhile (the classic wire cannot say "not handled").
                            // A request already in the socket may not be seen at once (the
                            // reactor's readiness lags the socket), so it gets a moment: a
                            // client just accepted has its request on the way.
                            None => match tokio::time::timeout(
                                CLASSIC_EVICTION_GRACE,
                                stream.read_buf(&mut input),
                            )
                            .await
                            {
                                Ok(read) => read,
                                Err(_) => {
                                    bump(&self.stats.idle_evicted, 1);
                                    return Ok(None);
                                }
                            },
                        }
                    } else {
                        tokio::select! {
                            read = stream.read_buf(&mut input) => read,
                            () = registration.stalled() => {
                                bump(&self.stats.stalled_evicted, 1);
                                return Ok(None);
                            }
                        }
                    };
                    let read = match read {
                        // Left before the first byte: as if it had closed (see below).
                        Err(err) if input.is_empty() && peer_left(&err) => Ok(0),
                        read => read,
                    };
                    if read.map_err(WireError::Io)? == 0 {
                        let frame = codec.decode_eof(&mut input)?;
                        return frame
                            .map(Some)
                            .ok_or(Error::Wire(WireError::ClosedBeforeMessage));
                    }
                    charge.set(input.len());
                }
            },
        );
        // Shutdown drops a connection whose request has not arrived yet.
        let request = tokio::select! {
            biased;
            _ = stop.cancelled() => return Ok(Classic::Stopped),
            request = read => match request? {
                Some(frame) => frame.payload,
                None => return Ok(Classic::Stopped), // refused (busy) or evicted (idle)
            },
        };
        bump(&self.stats.requests, 1);
        bump(
            &self.stats.bytes_in,
            (codec::HEADER_LEN + request.len()) as u64,
        );
        let received = Instant::now();
        let reply = self.answer(&request, caller).await;
        // Observed as the reply's first byte is written (see the framed loop).
        self.stats.duration.observe(received.elapsed(), 1);
        if let Ok(json) = &reply {
            within(timeout, || format!("sending the reply to {peer}"), async {
                stream.write_all(json).await.map_err(WireError::Io)?;
                stream.shutdown().await.map_err(WireError::Io)?;
                Ok(())
            })
            .await?;
            bump(&self.stats.bytes_out, json.len() as u64);
        }
        Ok(Classic::Answered { request, reply })
    }
}
