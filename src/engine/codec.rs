//! The wire format: the one place that knows how framesock puts messages on a stream.
//!
//! A request is one frame, a 4-byte big-endian length followed by that many payload bytes:
//!
//! ```text
//! +----------------+--------------------------------+
//! | len: u32 (BE)  |  payload (len bytes)           |
//! +----------------+--------------------------------+
//! ```
//!
//! In the classic protocol (the seed's), the reply is not framed: it is the JSON text itself and
//! the server's close marks its end, so [`read_until_close`] reads it.
//!
//! In the framed protocol, replies are frames too, and the top bit of a reply's header marks an
//! error reply (its payload is `{"error": kind, "message": text}`), so no reply value a handler
//! returns can be mistaken for an error:
//!
//! ```text
//! +---+------------------+--------------------------------+
//! | E | len: u31 (BE)    |  JSON (len bytes)              |
//! +---+------------------+--------------------------------+
//! ```
//!
//! A server that closes a framed connection by its own choice (idle timeout, making room,
//! shutdown) first writes one error reply of kind `closing` ([`ErrorKind::Closing`]), unasked, then closes. It handles
//! nothing it reads after that: every request the client sent with no reply before it was
//! **not handled**, and can be sent again on a new connection whatever it does.
//!
//! Nothing here knows Python.

use std::fmt;
use std::io;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::codec::{Decoder, Encoder};

/// Size of the length header in front of every frame.
pub const HEADER_LEN: usize = 4;

/// The largest payload the 4-byte header can describe.
pub const MAX_PAYLOAD: usize = u32::MAX as usize;

/// The bit of a framed reply's header that marks an error reply.
pub const ERROR_FLAG: u32 = 1 << 31;

/// The largest framed reply: the error flag takes the header's top bit.
pub const MAX_REPLY_PAYLOAD: usize = (ERROR_FLAG - 1) as usize;

/// Buffers grow at most by this much (or by what already arrived, if more) per step, so a peer
/// that merely *declares* a huge frame cannot make us allocate it.
const GROWTH_STEP: usize = 64 * 1024;

/// Which part of a frame a truncation hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Header,
    Payload,
}

/// What can go wrong on the wire, independent of any caller.
#[derive(Debug)]
pub enum WireError {
    /// A header declared a payload longer than the limit; refused before reading the payload.
    FrameTooLarge { declared: u64, limit: usize },
    /// An unframed reply kept coming past the limit.
    ReplyTooLarge { limit: usize },
    /// The peer closed the stream part-way through a frame.
    Truncated {
        part: Part,
        received: usize,
        expected: usize,
    },
    /// The peer closed the stream before sending anything where a message was due.
    ClosedBeforeMessage,
    /// The operating system reported an error.
    Io(io::Error),
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::FrameTooLarge { declared, limit } => write!(
                f,
                "frame header declares {declared} payload bytes, over the limit of {limit}"
            ),
            WireError::ReplyTooLarge { limit } => {
                write!(f, "reply is longer than the limit of {limit} bytes")
            }
            WireError::Truncated {
                part,
                received,
                expected,
            } => {
                let part = match part {
                    Part::Header => "header",
                    Part::Payload => "payload",
                };
                write!(
                    f,
                    "peer closed the connection mid-frame: {received} of {expected} {part} bytes arrived"
                )
            }
            WireError::ClosedBeforeMessage => {
                write!(f, "peer closed the connection before sending anything")
            }
            WireError::Io(err) => err.fmt(f),
        }
    }
}

impl std::error::Error for WireError {}

impl From<io::Error> for WireError {
    fn from(err: io::Error) -> Self {
        WireError::Io(err)
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub payload: Bytes,
    /// Set on framed replies that carry an error instead of a value.
    pub is_error: bool,
}

/// Every kind of error reply, by the name it has on the wire (`{"error": name, ...}`), in
/// `stats()["errors"]` where it is counted, and in the README.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request could not be turned into what the handler wants.
    BadRequest,
    /// The handler failed (raised, was cancelled, or was abandoned).
    Handler,
    /// The handler's value could not be encoded as JSON, or is too large for a frame.
    Encode,
    /// A request header declared more than `max_frame`; the connection closes after it.
    FrameTooLarge,
    /// The server holds `max_buffered` request bytes already: the request was read and dropped.
    Busy,
    /// The server closes the connection by choice (idle, making room, shutting down), before it
    /// handled anything still unanswered: what has no reply may be sent again elsewhere.
    Closing,
}

impl ErrorKind {
    /// The name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::Handler => "handler",
            ErrorKind::Encode => "encode",
            ErrorKind::FrameTooLarge => "frame_too_large",
            ErrorKind::Busy => "busy",
            ErrorKind::Closing => "closing",
        }
    }
}

impl Frame {
    /// Whether this is the server's goodbye ([`ErrorKind::Closing`]).
    pub fn is_closing(&self) -> bool {
        self.is_error && self.error_kind() == Some(ErrorKind::Closing.name().to_owned())
    }

    /// The kind of an error reply, if it names one.
    pub fn error_kind(&self) -> Option<String> {
        error_kind(&self.payload)
    }
}

/// The payload of an error reply: `{"error": kind, "message": text}`.
pub fn error_reply(kind: ErrorKind, message: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "error": kind.name(), "message": message }))
        .expect("a map of two strings always serialises")
}

/// The `"error"` of an error reply's payload, if it has one.
pub fn error_kind(payload: &[u8]) -> Option<String> {
    match serde_json::from_slice::<serde_json::Value>(payload).ok()? {
        serde_json::Value::Object(mut fields) => match fields.remove("error")? {
            serde_json::Value::String(kind) => Some(kind),
            _ => None,
        },
        _ => None,
    }
}

/// The payload length a request header at the start of `bytes` declares; None before its four
/// bytes have arrived.
pub fn declared_request_len(bytes: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(
        bytes.get(..HEADER_LEN)?.try_into().ok()?,
    ))
}

/// What a reply header at the start of `bytes` declares: (payload length, error flag).
pub fn declared_reply(bytes: &[u8]) -> Option<(usize, bool)> {
    let raw = declared_request_len(bytes)?;
    Some(((raw & !ERROR_FLAG) as usize, raw & ERROR_FLAG != 0))
}

/// The header of a reply of `len` payload bytes (at most `MAX_REPLY_PAYLOAD`), written
/// apart from its payload.
pub fn reply_header(len: usize, is_error: bool) -> [u8; HEADER_LEN] {
    debug_assert!(len <= MAX_REPLY_PAYLOAD);
    (len as u32 | if is_error { ERROR_FLAG } else { 0 }).to_be_bytes()
}

/// The length of the first `count` frames of `frames` (whole frames, back to back).
pub fn frames_len(frames: &[u8], count: usize) -> usize {
    let mut at = 0;
    for _ in 0..count {
        let Some(len) = declared_request_len(&frames[at..]) else {
            return frames.len();
        };
        let len = len as usize;
        at = (at + HEADER_LEN + len).min(frames.len());
    }
    at
}

/// Decodes and encodes length-prefixed frames, refusing payloads over `max_len`.
#[derive(Debug, Clone)]
pub struct FrameCodec {
    max_len: usize,
    /// Whether the header's top bit is the error flag (framed replies) or part of the length.
    flagged: bool,
}

impl FrameCodec {
    /// A codec for requests: the whole 32-bit header is the length.
    pub fn new(max_len: usize) -> Self {
        FrameCodec {
            max_len: max_len.min(MAX_PAYLOAD),
            flagged: false,
        }
    }

    /// A codec for framed replies: the top bit flags an error, 31 bits are the length.
    pub fn replies(max_len: usize) -> Self {
        FrameCodec {
            max_len: max_len.min(MAX_REPLY_PAYLOAD),
            flagged: true,
        }
    }

    /// Splits a header into (declared length, error flag).
    fn header(&self, src: &[u8]) -> (usize, bool) {
        let raw = u32::from_be_bytes([src[0], src[1], src[2], src[3]]);
        if self.flagged {
            ((raw & !ERROR_FLAG) as usize, raw & ERROR_FLAG != 0)
        } else {
            (raw as usize, false)
        }
    }
}

/// Makes room for more input without ever reserving more than `GROWTH_STEP` or the bytes
/// already held, whichever is larger: memory follows what the peer sent, not what it claimed.
fn reserve_bounded(buf: &mut BytesMut, missing: usize) {
    let step = missing.min(GROWTH_STEP.max(buf.len()));
    buf.reserve(step);
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = WireError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, WireError> {
        if src.len() < HEADER_LEN {
            reserve_bounded(src, HEADER_LEN - src.len());
            return Ok(None);
        }
        let (declared, is_error) = self.header(src);
        if declared > self.max_len {
            return Err(WireError::FrameTooLarge {
                declared: declared as u64,
                limit: self.max_len,
            });
        }
        let total = HEADER_LEN + declared;
        if src.len() < total {
            reserve_bounded(src, total - src.len());
            return Ok(None);
        }
        src.advance(HEADER_LEN);
        Ok(Some(Frame {
            payload: src.split_to(declared).freeze(),
            is_error,
        }))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, WireError> {
        if let Some(frame) = self.decode(src)? {
            return Ok(Some(frame));
        }
        if src.is_empty() {
            return Ok(None);
        }
        Err(if src.len() < HEADER_LEN {
            WireError::Truncated {
                part: Part::Header,
                received: src.len(),
                expected: HEADER_LEN,
            }
        } else {
            let (declared, _) = self.header(src);
            WireError::Truncated {
                part: Part::Payload,
                received: src.len() - HEADER_LEN,
                expected: declared,
            }
        })
    }
}

impl Encoder<&[u8]> for FrameCodec {
    type Error = WireError;

    fn encode(&mut self, payload: &[u8], dst: &mut BytesMut) -> Result<(), WireError> {
        put_frame(
            payload,
            0,
            if self.flagged {
                MAX_REPLY_PAYLOAD
            } else {
                MAX_PAYLOAD
            },
            dst,
        )
    }
}

/// Appends header (length | flags) and payload to `dst`.
fn put_frame(
    payload: &[u8],
    flags: u32,
    limit: usize,
    dst: &mut BytesMut,
) -> Result<(), WireError> {
    if payload.len() > limit {
        return Err(WireError::FrameTooLarge {
            declared: payload.len() as u64,
            limit,
        });
    }
    dst.reserve(HEADER_LEN + payload.len());
    dst.put_u32(payload.len() as u32 | flags);
    dst.put_slice(payload);
    Ok(())
}

/// Appends a framed reply to `dst`, flagged as an error reply when `is_error`.
pub fn put_reply(json: &[u8], is_error: bool, dst: &mut BytesMut) -> Result<(), WireError> {
    put_frame(
        json,
        if is_error { ERROR_FLAG } else { 0 },
        MAX_REPLY_PAYLOAD,
        dst,
    )
}

/// Header and payload in one contiguous buffer, so a single write sends the whole frame (the
/// seed's server reads with two bare `recv` calls and breaks if the frame arrives in pieces).
pub fn encode_frame(payload: &[u8]) -> Result<Bytes, WireError> {
    let mut buf = BytesMut::new();
    FrameCodec::new(MAX_PAYLOAD).encode(payload, &mut buf)?;
    Ok(buf.freeze())
}

/// Reads the next frame from `reader`, keeping any bytes past it in `buf` for the next call.
///
/// Returns `Ok(None)` when the peer closes cleanly between frames.
pub async fn read_frame<R>(
    reader: &mut R,
    buf: &mut BytesMut,
    codec: &mut FrameCodec,
) -> Result<Option<Frame>, WireError>
where
    R: AsyncRead + Unpin,
{
    loop {
        if let Some(frame) = codec.decode(buf)? {
            return Ok(Some(frame));
        }
        if reader.read_buf(buf).await? == 0 {
            return codec.decode_eof(buf);
        }
    }
}

/// Reads an unframed reply: everything up to the peer's close, at most `limit` bytes, or
/// less if `stop_early` says what has come is all that will (for a caller that can tell a
/// reply of another protocol, which never closes).
pub async fn read_until_close<R>(
    reader: &mut R,
    limit: usize,
    stop_early: fn(&[u8]) -> bool,
) -> Result<Vec<u8>, WireError>
where
    R: AsyncRead + Unpin,
{
    let mut reply = Vec::new();
    // One byte past the limit tells "exactly at the limit" from "over it".
    let mut bounded = reader.take(limit as u64 + 1);
    loop {
        if reply.len() == reply.capacity() {
            reply.reserve(
                GROWTH_STEP
                    .max(reply.len())
                    .min(limit + 1 - reply.len())
                    .max(1),
            );
        }
        match bounded.read_buf(&mut reply).await {
            Ok(0) => break,
            Ok(_) => {}
            // A TLS peer that closes without saying so first (no close_notify), as many do
            // (Python's ssl reads that as the end too): the reply ends there.
            Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(err) => return Err(err.into()),
        }
        if reply.len() > limit {
            return Err(WireError::ReplyTooLarge { limit });
        }
        if stop_early(&reply) {
            break;
        }
    }
    if reply.is_empty() {
        return Err(WireError::ClosedBeforeMessage);
    }
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(payload: &[u8]) -> BytesMut {
        BytesMut::from(&encode_frame(payload).unwrap()[..])
    }

    #[test]
    fn header_is_big_endian_length() {
        let frame = encode_frame(b"msg from client").unwrap();
        assert_eq!(&frame[..4], &[0, 0, 0, 15]);
        assert_eq!(&frame[4..], b"msg from client");
    }

    #[test]
    fn decodes_a_whole_frame_and_keeps_the_rest() {
        let mut buf = framed(b"one");
        buf.extend_from_slice(&framed(b"two"));
        let mut codec = FrameCodec::new(100);
        assert_eq!(
            codec.decode(&mut buf).unwrap().unwrap().payload,
            &b"one"[..]
        );
        assert_eq!(
            codec.decode(&mut buf).unwrap().unwrap().payload,
            &b"two"[..]
        );
        assert!(codec.decode(&mut buf).unwrap().is_none());
    }

    #[test]
    fn empty_payload_is_a_frame() {
        let mut buf = framed(b"");
        let frame = FrameCodec::new(10).decode(&mut buf).unwrap().unwrap();
        assert_eq!(frame.payload, &b""[..]);
    }

    #[test]
    fn waits_for_partial_input_byte_by_byte() {
        let whole = framed(b"hello");
        let mut codec = FrameCodec::new(100);
        let mut buf = BytesMut::new();
        for (i, byte) in whole.iter().enumerate() {
            assert!(
                codec.decode(&mut buf).unwrap().is_none(),
                "early frame at byte {i}"
            );
            buf.put_u8(*byte);
        }
        assert_eq!(
            codec.decode(&mut buf).unwrap().unwrap().payload,
            &b"hello"[..]
        );
    }

    #[test]
    fn refuses_oversized_header_before_payload() {
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff][..]);
        match FrameCodec::new(16).decode(&mut buf) {
            Err(WireError::FrameTooLarge { declared, limit }) => {
                assert_eq!(declared, 0xffff_ffff);
                assert_eq!(limit, 16);
            }
            other => panic!("expected FrameTooLarge, got {other:?}"),
        }
        // Nothing was reserved for the declared 4 GiB.
        assert!(buf.capacity() < 1024 * 1024);
    }

    #[test]
    fn declared_length_does_not_drive_allocation() {
        let mut buf = BytesMut::from(&u32::MAX.to_be_bytes()[..]);
        let mut codec = FrameCodec::new(MAX_PAYLOAD);
        assert!(codec.decode(&mut buf).unwrap().is_none());
        assert!(buf.capacity() <= HEADER_LEN + GROWTH_STEP + 64);
    }

    #[test]
    fn eof_mid_header_reports_counts() {
        let mut buf = BytesMut::from(&[0, 0][..]);
        match FrameCodec::new(100).decode_eof(&mut buf) {
            Err(WireError::Truncated {
                part: Part::Header,
                received: 2,
                expected: 4,
            }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn eof_mid_payload_reports_counts() {
        let mut buf = framed(b"0123456789");
        buf.truncate(HEADER_LEN + 3);
        let err = FrameCodec::new(100).decode_eof(&mut buf).unwrap_err();
        assert_eq!(
            err.to_string(),
            "peer closed the connection mid-frame: 3 of 10 payload bytes arrived"
        );
    }

    #[test]
    fn eof_between_frames_is_clean() {
        let mut buf = BytesMut::new();
        assert!(FrameCodec::new(100).decode_eof(&mut buf).unwrap().is_none());
    }

    fn run<F: std::future::Future>(fut: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(fut)
    }

    #[test]
    fn read_frame_reads_across_chunks() {
        let wire = framed(b"abcdef").to_vec();
        let mut reader = tokio_test_reader(&wire, 1);
        let mut buf = BytesMut::new();
        let frame = run(read_frame(&mut reader, &mut buf, &mut FrameCodec::new(100))).unwrap();
        assert_eq!(frame.unwrap().payload, &b"abcdef"[..]);
    }

    #[test]
    fn reply_error_flag_round_trips() {
        let mut buf = BytesMut::new();
        put_reply(b"{}", true, &mut buf).unwrap();
        put_reply(b"[]", false, &mut buf).unwrap();
        assert_eq!(buf[0], 0x80);
        let mut codec = FrameCodec::replies(100);
        let first = codec.decode(&mut buf).unwrap().unwrap();
        assert!(first.is_error && first.payload == b"{}"[..]);
        let second = codec.decode(&mut buf).unwrap().unwrap();
        assert!(!second.is_error && second.payload == b"[]"[..]);
    }

    #[test]
    fn request_codec_ignores_the_reply_flag() {
        let mut buf = BytesMut::from(&[0x80, 0, 0, 0][..]);
        assert!(matches!(
            FrameCodec::new(1000).decode(&mut buf),
            Err(WireError::FrameTooLarge {
                declared: 0x8000_0000,
                ..
            })
        ));
    }

    #[test]
    fn read_until_close_enforces_limit() {
        let reply = [b'1'; 100];
        let mut exact = &reply[..];
        assert_eq!(
            run(read_until_close(&mut exact, 100, |_| false))
                .unwrap()
                .len(),
            100
        );
        let mut over = &reply[..];
        assert!(matches!(
            run(read_until_close(&mut over, 99, |_| false)),
            Err(WireError::ReplyTooLarge { limit: 99 })
        ));
    }

    #[test]
    fn read_until_close_refuses_empty_reply() {
        let mut empty: &[u8] = b"";
        assert!(matches!(
            run(read_until_close(&mut empty, 10, |_| false)),
            Err(WireError::ClosedBeforeMessage)
        ));
    }

    /// A reader that hands out at most `chunk` bytes per read, like a slow socket.
    fn tokio_test_reader(data: &[u8], chunk: usize) -> impl AsyncRead + Unpin {
        let (client, mut server) = tokio::io::duplex(chunk);
        let data = data.to_vec();
        std::thread::spawn(move || {
            run(async move {
                use tokio::io::AsyncWriteExt;
                for byte in data.chunks(chunk) {
                    server.write_all(byte).await.unwrap();
                }
            })
        });
        client
    }
}
