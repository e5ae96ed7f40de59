//! Client exchanges: the seed's one-shot exchange and a kept connection for a blocking client
//! (the pipelined connection of `framesock.aio.Client` is in [`crate::engine::pipeline`]).

use std::time::Duration;

use bytes::BytesMut;
use futures_util::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio_util::codec::Decoder;

use crate::engine::codec::{self, Frame, FrameCodec, WireError};
use crate::engine::error::{Error, Result};
use crate::engine::net::{self, Endpoint, Stream};
use crate::engine::runtime::within;
use crate::engine::tls::ClientTls;

/// One classic exchange: connect, send the whole frame in one write, read the reply to the close.
pub async fn classic_exchange(
    endpoint: &Endpoint,
    tls: Option<&ClientTls>,
    frame: &[u8],
    timeout: Option<Duration>,
    max_reply: usize,
) -> Result<Vec<u8>> {
    let mut stream = open(endpoint, tls, timeout).await?;
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
        read_classic_reply(&mut stream, max_reply),
    )
    .await
}

/// Reads a classic reply to the server's close; a reply that is one whole frame (from a
/// framed server, which keeps the connection open) is named at once instead of waited on.
async fn read_classic_reply(stream: &mut Stream, max_reply: usize) -> Result<Vec<u8>> {
    let reply = codec::read_until_close(stream, max_reply, looks_framed).await?;
    if looks_like_tls(&reply) {
        return Err(tls_reply_error());
    }
    if looks_framed(&reply) {
        return Err(Error::Protocol(
            "the reply is a framed reply, not classic JSON: is the server framed? \
             (use protocol=\"framed\")"
                .to_owned(),
        ));
    }
    Ok(reply)
}

/// Whether `bytes` are exactly one framed reply: JSON text never starts with the byte 0x00 or
/// 0x80 that a frame header of a reply under 16 MiB starts with.
fn looks_framed(bytes: &[u8]) -> bool {
    if !matches!(bytes.first(), Some(0x00 | 0x80)) {
        return false;
    }
    matches!(codec::declared_reply(bytes), Some((declared, _)) if bytes.len() == codec::HEADER_LEN + declared)
}

/// Whether the start of a framed reply's "header" is really JSON text: a classic server's
/// reply read as a frame header (`{"ke` declares two billion bytes).
fn looks_like_json(bytes: &[u8]) -> bool {
    bytes.len() >= codec::HEADER_LEN
        && bytes[..codec::HEADER_LEN]
            .iter()
            .all(|b| b.is_ascii_graphic() || b.is_ascii_whitespace())
        && matches!(
            bytes[0],
            b'{' | b'[' | b'"' | b'-' | b'0'
                ..=b'9' | b't' | b'f' | b'n' | b' ' | b'\t' | b'\r' | b'\n'
        )
}

/// Whether a "header" is really a TLS record (handshake or alert): a TLS server answering a
/// plain client.
fn looks_like_tls(bytes: &[u8]) -> bool {
    bytes.len() >= 3 && matches!(bytes[0], 0x15 | 0x16) && bytes[1] == 0x03 && bytes[2] <= 0x04
}

fn tls_reply_error() -> Error {
    Error::Protocol(
        "the reply looks like TLS: does the server use TLS? (pass tls=framesock.ClientTLS(...))"
            .to_owned(),
    )
}

/// The error for a framed reply that is really a classic one.
fn classic_reply_error() -> Error {
    Error::Protocol(
        "the reply looks like classic JSON, not a frame: is the server framed? \
         (use protocol=\"classic\")"
            .to_owned(),
    )
}

/// Requests from 256 KiB on are written while the reply is watched for: a server that refuses
/// one (too large) says so at once, and the client stops sending.
const WATCHED_WRITE: usize = 256 * 1024;

/// A connection to `endpoint`, under TLS when `tls` is given, within `timeout`; failing, an
/// [`Error::Connect`] (the request was never sent).
pub(crate) async fn open(
    endpoint: &Endpoint,
    tls: Option<&ClientTls>,
    timeout: Option<Duration>,
) -> Result<Stream> {
    within(timeout, || format!("connecting to {endpoint}"), async {
        match tls {
            Some(tls) => net::connect_tls(endpoint, tls).await,
            None => net::connect(endpoint).await,
        }
    })
    .await
    .map_err(|err| Error::Connect(Box::new(err)))
}

/// A kept connection of the framed protocol, with the bytes read past the last reply.
pub struct Connection {
    stream: Stream,
    input: BytesMut,
}

impl Connection {
    /// Ends the connection; a TLS session with `close_notify`, if the socket takes it now (the
    /// caller's runtime `rt` drives the write; nothing waits).
    pub fn end(mut self, rt: &tokio::runtime::Runtime) {
        if matches!(self.stream, Stream::TlsClient(_)) {
            use futures_util::FutureExt;
            rt.block_on(async { self.stream.shutdown().now_or_never() });
        }
    }
}

/// How many times a request the server did not handle (it closed the connection first, saying
/// so) is sent again, each time on a new connection, before the caller is told.
pub const MAX_RESENDS: usize = 3;

/// The most a client's close spends on ending a TLS session with `close_notify`.
pub(crate) const CLOSE_NOTIFY_LIMIT: Duration = Duration::from_millis(100);

/// Sends `count` request frames (already encoded back to back in `frames`) on the kept
/// connection, connecting first if needed, and reads `count` replies in order.
///
/// Writing and reading run together, so a batch far larger than the socket buffers cannot
/// deadlock with both sides blocked on full buffers. `timeout` bounds connecting and the wait
/// for each reply. Requests the server closed the connection before handling (its goodbye,
/// see [`codec::ErrorKind::Closing`]) are sent again on a new connection, up to [`MAX_RESENDS`] times.
pub async fn framed_exchange(
    slot: &mut Option<Connection>,
    endpoint: &Endpoint,
    tls: Option<&ClientTls>,
    frames: &[u8],
    count: usize,
    timeout: Option<Duration>,
    max_reply: usize,
) -> Result<Vec<Frame>> {
    let mut replies = Vec::new();
    let mut rest = frames;
    for _ in 0..=MAX_RESENDS {
        let wanted = count - replies.len();
        let mut got =
            match framed_attempt(slot, endpoint, tls, rest, wanted, timeout, max_reply).await {
                Ok(got) => got,
                // Some of the batch was answered: the batch as a whole was sent, whatever the
                // rest met (a failover must not send the answered requests again as unsent).
                Err(Error::Connect(err)) if !replies.is_empty() => return Err(*err),
                Err(err) => return Err(err),
            };
        if !got.last().is_some_and(Frame::is_closing) {
            replies.extend(got);
            return Ok(replies);
        }
        got.pop();
        *slot = None;
        rest = &rest[codec::frames_len(rest, got.len())..];
        replies.extend(got);
    }
    Err(not_handled(endpoint))
}

/// Why a request was given up on after the server closed its connection every time.
pub(crate) fn not_handled(endpoint: &Endpoint) -> Error {
    Error::Wire(WireError::Io(std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        format!(
            "{endpoint} closed the connection before handling the request, {} times; it was \
             not handled",
            MAX_RESENDS + 1
        ),
    )))
}

/// One try of [`framed_exchange`]: the replies, ending early with the server's goodbye if it
/// closes the connection before answering them all.
#[allow(clippy::too_many_arguments)]
async fn framed_attempt(
    slot: &mut Option<Connection>,
    endpoint: &Endpoint,
    tls: Option<&ClientTls>,
    frames: &[u8],
    count: usize,
    timeout: Option<Duration>,
    max_reply: usize,
) -> Result<Vec<Frame>> {
    check_kept(slot)?;
    if slot.is_none() {
        let stream = open(endpoint, tls, timeout).await?;
        *slot = Some(Connection {
            stream,
            input: BytesMut::new(),
        });
    }
    let conn = slot.as_mut().expect("connected above");
    let write_failed = |e| Error::from(WireError::Io(e));
    if count == 1 && frames.len() < WATCHED_WRITE {
        // One small frame: the server replies only once it has read all of it, so writing
        // first and then reading cannot deadlock, and needs no split of the stream.
        conn.stream.write_all(frames).await.map_err(write_failed)?;
        let replies = read_replies(
            &mut conn.stream,
            &mut conn.input,
            1,
            endpoint,
            timeout,
            max_reply,
        )
        .await?;
        return settle(slot, replies).await;
    }
    // Written and read together, so a batch far larger than the socket buffers cannot
    // deadlock, and a reply that comes before all is sent (a refused request) is seen at once.
    let (replies, finished_writing) = {
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
        tokio::pin!(write, read);
        let mut written = false;
        loop {
            tokio::select! {
                biased;
                replies = &mut read => break (replies, written),
                wrote = &mut write, if !written => match wrote {
                    Ok(()) => written = true,
                    // The server may have said why before closing: read that first.
                    Err(err) => {
                        let said = tokio::time::timeout(Duration::from_secs(1), &mut read).await;
                        break (said.unwrap_or(Err(err)), false);
                    }
                },
            }
        }
    };
    if !finished_writing {
        // Replies came before all was sent: the rest of the request cannot follow them.
        *slot = None;
        return replies;
    }
    settle(slot, replies?).await
}

/// Whether the server closes the connection after this reply: a refused header
/// (`frame_too_large`) leaves the stream out of sync, so it does.
fn ends_connection(reply: &Frame) -> bool {
    reply.is_error
        && codec::error_kind(&reply.payload).as_deref()
            == Some(codec::ErrorKind::FrameTooLarge.name())
}

/// Checks that nothing came after the replies asked for but the server's goodbye, and lets go
/// of a connection the server closes. A reply no request asked for means the server's replies
/// are out of step with the requests, and every later one would answer the wrong request.
async fn settle(slot: &mut Option<Connection>, replies: Vec<Frame>) -> Result<Vec<Frame>> {
    let conn = slot.as_mut().expect("the exchange's connection");
    if !conn.input.is_empty() {
        // A goodbye is written whole right after the last reply: the rest of it is due now.
        let mut codec = FrameCodec::replies(GOODBYE_LOOK);
        let read = codec::read_frame(&mut conn.stream, &mut conn.input, &mut codec);
        let next = tokio::time::timeout(Duration::from_secs(1), read).await;
        let goodbye = matches!(&next, Ok(Ok(Some(frame))) if frame.is_closing());
        let left = conn.input.len();
        *slot = None;
        return if goodbye && left == 0 {
            Ok(replies)
        } else {
            Err(unsolicited(left.max(1)))
        };
    }
    // The server closes after refusing a request's header, and after its goodbye.
    if replies
        .iter()
        .any(|reply| ends_connection(reply) || reply.is_closing())
    {
        *slot = None;
    }
    Ok(replies)
}

/// What a failed read of a framed reply means: a header too large to be one that is JSON or
/// TLS is a server of another protocol, said in words.
pub(crate) fn reply_error(err: WireError, input: &[u8]) -> Error {
    match err {
        WireError::FrameTooLarge { .. } | WireError::ReplyTooLarge { .. }
            if looks_like_json(input) =>
        {
            classic_reply_error()
        }
        WireError::FrameTooLarge { .. } | WireError::ReplyTooLarge { .. }
            if looks_like_tls(input) =>
        {
            tls_reply_error()
        }
        err => err.into(),
    }
}

pub(crate) fn unsolicited(bytes: usize) -> Error {
    Error::Protocol(format!(
        "the server sent {bytes} bytes more than the replies asked for; its replies are out of \
         step with the requests, so the connection is dropped"
    ))
}

/// Before a kept connection is used again: a connection the server has closed meanwhile (its
/// idle timeout) is replaced; bytes that arrived unasked mean the replies are out of step.
fn check_kept(slot: &mut Option<Connection>) -> Result<()> {
    let Some(conn) = slot.as_mut() else {
        return Ok(());
    };
    if !conn.input.is_empty() {
        let left = conn.input.len();
        *slot = None;
        return Err(unsolicited(left));
    }
    if conn.stream.closed_by_peer() {
        // closed (or reset) while idle, seen on the socket itself: open a new one
        *slot = None;
        return Ok(());
    }
    // Bytes waiting, or a TLS stream that may hold some already: a TLS close_notify reads as
    // the end (0); the server's goodbye says it closed the connection; anything else came
    // unasked.
    let mut closed = false;
    while conn.input.len() < GOODBYE_LOOK {
        conn.input.reserve(GOODBYE_LOOK);
        match conn.stream.read_buf(&mut conn.input).now_or_never() {
            None => break, // nothing (more) pending: the usual case
            Some(Ok(0)) | Some(Err(_)) => {
                closed = true;
                break;
            }
            Some(Ok(_)) => {}
        }
    }
    if conn.input.is_empty() || is_goodbye(&conn.input) {
        if closed || !conn.input.is_empty() {
            *slot = None; // closed by the server while idle: open a new one
        }
        return Ok(());
    }
    let left = conn.input.len();
    *slot = None;
    Err(unsolicited(left))
}

/// How many unasked bytes a kept connection is checked for: a goodbye is far shorter.
const GOODBYE_LOOK: usize = 4096;

/// Whether `input` holds exactly the server's goodbye (see [`codec::ErrorKind::Closing`]).
fn is_goodbye(input: &BytesMut) -> bool {
    let mut input = input.clone();
    let goodbye = FrameCodec::replies(GOODBYE_LOOK).decode(&mut input);
    input.is_empty()
        && goodbye
            .ok()
            .flatten()
            .is_some_and(|frame| frame.is_closing())
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
                    .map_err(|err| reply_error(err, input))
            },
        )
        .await?;
        let frame = frame.ok_or(Error::Wire(WireError::ClosedBeforeMessage))?;
        let goodbye = frame.is_closing();
        replies.push(frame);
        if goodbye {
            break; // nothing more comes on this connection
        }
    }
    Ok(replies)
}
