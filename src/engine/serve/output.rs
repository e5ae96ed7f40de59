//! Writing replies: bounded writes (backpressure), lingering after a refusal, the goodbye.

use super::*;

/// After refusing a request's header, how long and how many of its bytes the server keeps
/// reading (and dropping) before it closes, so the client can finish sending and read why.
pub(super) const LINGER_TIME: Duration = Duration::from_secs(2);
pub(super) const LINGER_BYTES: u64 = 64 * 1024 * 1024;

/// After the goodbye on a framed connection the server closes by choice, how long it reads
/// (and drops) what the client still sends: a request already on its way would otherwise meet
/// a closed socket, whose reset could cost the client the goodbye. It ends sooner when the
/// client closes.
pub(super) const GOODBYE_LINGER: Duration = Duration::from_secs(1);

impl Service {
    /// Writes out and empties `output`, within the write limit.
    pub(super) async fn send<S>(
        &self,
        stream: &mut S,
        output: &mut BytesMut,
        peer: &Address,
    ) -> Result<()>
    where
        S: AsyncWrite + Unpin,
    {
        if output.is_empty() {
            return Ok(());
        }
        self.write_bounded(stream, output, peer).await?;
        bump(&self.stats.bytes_out, output.len() as u64);
        output.clear();
        Ok(())
    }

    pub(super) async fn write_bounded<S>(
        &self,
        stream: &mut S,
        bytes: &[u8],
        peer: &Address,
    ) -> Result<()>
    where
        S: AsyncWrite + Unpin,
    {
        within(
            self.limits.write_limit(),
            || format!("sending replies to {peer} (it is not reading them)"),
            async {
                stream
                    .write_all(bytes)
                    .await
                    .map_err(|e| WireError::Io(e).into())
            },
        )
        .await
    }

    /// Before closing on a refused request: says "no more from us", then reads and drops what
    /// the peer still sends, for a bounded time and number of bytes. Closing with its bytes
    /// unread would reset the connection, and the peer, still sending, might never read why.
    pub(super) async fn linger<S>(&self, stream: &mut S, time: Duration)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let _ = tokio::time::timeout(time, async {
            let _ = stream.shutdown().await;
            let mut sink = tokio::io::sink();
            let _ = tokio::io::copy(&mut stream.take(LINGER_BYTES), &mut sink).await;
        })
        .await;
    }

    /// Closes a framed connection by the server's choice, between requests: the goodbye reply
    /// (kind `closing`: nothing without a reply was handled), then "no more from us", then
    /// what the client still sends is read and dropped for a bounded time, unhandled.
    pub(super) async fn say_goodbye<S>(&self, stream: &mut S, why: &str, peer: &Address)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let message = format!(
            "the server closed this connection ({why}); every request sent on it without a \
             reply was not handled and can be sent again on a new connection"
        );
        let mut output = BytesMut::new();
        if codec::put_reply(
            &codec::error_reply(codec::ErrorKind::Closing, &message),
            true,
            &mut output,
        )
        .is_ok()
            && self.send(stream, &mut output, peer).await.is_ok()
        {
            self.linger(stream, GOODBYE_LINGER).await;
        }
    }
}
