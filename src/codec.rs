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
//! the server's close marks its end, so [`read_until_close`] reads it. Nothing here knows Python.

use std::fmt;
use std::io;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::codec::{Decoder, Encoder};

/// Size of the length header in front of every frame.
pub const HEADER_LEN: usize = 4;

/// The largest payload the 4-byte header can describe.
pub const MAX_PAYLOAD: usize = u32::MAX as usize;

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

/// Decodes and encodes length-prefixed frames, refusing payloads over `max_len`.
#[derive(Debug, Clone)]
pub struct FrameCodec {
    max_len: usize,
}

impl FrameCodec {
    /// A codec that accepts payloads of at most `max_len` bytes.
    pub fn new(max_len: usize) -> Self {
        FrameCodec {
            max_len: max_len.min(MAX_PAYLOAD),
        }
    }

    /// The largest payload this codec accepts.
    pub fn max_len(&self) -> usize {
        self.max_len
    }
}

/// Makes room for more input without ever reserving more than `GROWTH_STEP` or the bytes
/// already held, whichever is larger: memory follows what the peer sent, not what it claimed.
fn reserve_bounded(buf: &mut BytesMut, missing: usize) {
    let step = missing.min(GROWTH_STEP.max(buf.len()));
    buf.reserve(step);
}

impl Decoder for FrameCodec {
    type Item = Bytes;
    type Error = WireError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, WireError> {
        if src.len() < HEADER_LEN {
            reserve_bounded(src, HEADER_LEN - src.len());
            return Ok(None);
        }
        let declared = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
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
        Ok(Some(src.split_to(declared).freeze()))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, WireError> {
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
            let declared = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
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
        if payload.len() > MAX_PAYLOAD {
            return Err(WireError::FrameTooLarge {
                declared: payload.len() as u64,
                limit: MAX_PAYLOAD,
            });
        }
        dst.reserve(HEADER_LEN + payload.len());
        dst.put_u32(payload.len() as u32);
        dst.put_slice(payload);
        Ok(())
    }
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
) -> Result<Option<Bytes>, WireError>
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

/// Reads an unframed reply: everything up to the peer's close, at most `limit` bytes.
pub async fn read_until_close<R>(reader: &mut R, limit: usize) -> Result<Vec<u8>, WireError>
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
        if bounded.read_buf(&mut reply).await? == 0 {
            break;
        }
        if reply.len() > limit {
            return Err(WireError::ReplyTooLarge { limit });
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
        assert_eq!(codec.decode(&mut buf).unwrap().unwrap(), &b"one"[..]);
        assert_eq!(codec.decode(&mut buf).unwrap().unwrap(), &b"two"[..]);
        assert!(codec.decode(&mut buf).unwrap().is_none());
    }

    #[test]
    fn empty_payload_is_a_frame() {
        let mut buf = framed(b"");
        assert_eq!(
            FrameCodec::new(10).decode(&mut buf).unwrap().unwrap(),
            &b""[..]
        );
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
        assert_eq!(codec.decode(&mut buf).unwrap().unwrap(), &b"hello"[..]);
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
        assert_eq!(frame.unwrap(), &b"abcdef"[..]);
    }

    #[test]
    fn read_until_close_enforces_limit() {
        let reply = [b'1'; 100];
        let mut exact = &reply[..];
        assert_eq!(run(read_until_close(&mut exact, 100)).unwrap().len(), 100);
        let mut over = &reply[..];
        assert!(matches!(
            run(read_until_close(&mut over, 99)),
            Err(WireError::ReplyTooLarge { limit: 99 })
        ));
    }

    #[test]
    fn read_until_close_refuses_empty_reply() {
        let mut empty: &[u8] = b"";
        assert!(matches!(
            run(read_until_close(&mut empty, 10)),
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
