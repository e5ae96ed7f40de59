//! The engine's own errors: what went wrong on a connection, and why an exchange got no reply.
//! Plain Rust values; the Python layer turns them into exceptions at its boundary.

use std::any::Any;
use std::fmt;
use std::io;
use std::sync::Arc;

use crate::engine::codec::{ErrorKind, WireError};

/// Everything a network step can fail with.
#[derive(Debug)]
pub enum Error {
    /// The peer broke the wire format or closed early.
    Wire(WireError),
    /// A step took longer than its timeout; the text says which step.
    Timeout(String),
    /// The OS refused something; `doing` says what we were doing (e.g. "connect to 127.0.0.1:8000").
    Os { err: io::Error, doing: String },
    /// The host name did not resolve.
    Resolve { host: String, err: io::Error },
    /// The peer does not speak the protocol asked for, or sent what nobody asked for; the text
    /// says what was seen.
    Protocol(String),
    /// The client was closed while this exchange was in flight.
    Closed,
    /// A TLS handshake failed; the text says why in words.
    Tls(String),
    /// No connection could be made (refused, unreachable, no such socket file, timed out,
    /// a failed TLS handshake): the request was never sent, so no server acted on it.
    Connect(Box<Error>),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Wire(err) => err.fmt(f),
            Error::Timeout(text) => f.write_str(text),
            Error::Os { err, doing } => write!(f, "{doing}: {err}"),
            Error::Resolve { host, err } => write!(f, "could not resolve host {host:?}: {err}"),
            Error::Protocol(text) => f.write_str(text),
            Error::Closed => f.write_str("the client was closed while this request was in flight"),
            Error::Tls(text) => f.write_str(text),
            Error::Connect(err) => err.fmt(f),
        }
    }
}

impl std::error::Error for Error {}

/// A copy of an I/O error (io::Error is not Clone): same errno, or same kind and text.
fn copy_io(err: &io::Error) -> io::Error {
    match err.raw_os_error() {
        Some(errno) => io::Error::from_raw_os_error(errno),
        None => io::Error::new(err.kind(), err.to_string()),
    }
}

impl Error {
    /// Whether the request was never sent: no connection could be made for it.
    pub fn never_sent(&self) -> bool {
        matches!(self, Error::Connect(_))
    }

    /// An equal error, for telling one failure to several waiters.
    pub fn duplicate(&self) -> Error {
        match self {
            Error::Wire(wire) => Error::Wire(match wire {
                WireError::FrameTooLarge { declared, limit } => WireError::FrameTooLarge {
                    declared: *declared,
                    limit: *limit,
                },
                WireError::ReplyTooLarge { limit } => WireError::ReplyTooLarge { limit: *limit },
                WireError::Truncated {
                    part,
                    received,
                    expected,
                } => WireError::Truncated {
                    part: *part,
                    received: *received,
                    expected: *expected,
                },
                WireError::ClosedBeforeMessage => WireError::ClosedBeforeMessage,
                WireError::Io(err) => WireError::Io(copy_io(err)),
            }),
            Error::Timeout(text) => Error::Timeout(text.clone()),
            Error::Os { err, doing } => Error::Os {
                err: copy_io(err),
                doing: doing.clone(),
            },
            Error::Resolve { host, err } => Error::Resolve {
                host: host.clone(),
                err: copy_io(err),
            },
            Error::Protocol(text) => Error::Protocol(text.clone()),
            Error::Closed => Error::Closed,
            Error::Tls(text) => Error::Tls(text.clone()),
            Error::Connect(err) => Error::Connect(Box::new(err.duplicate())),
        }
    }
}

impl From<WireError> for Error {
    fn from(err: WireError) -> Self {
        match err {
            // TLS refusals that arrive after the handshake (TLS 1.3 checks the client's
            // certificate then): said in words, as a TLS error.
            WireError::Io(io) if crate::engine::tls::is_tls_failure(&io) => {
                Error::Tls(crate::engine::tls::describe_failure(&io, "peer"))
            }
            other => Error::Wire(other),
        }
    }
}

/// Result of an engine step.
pub type Result<T> = std::result::Result<T, Error>;

/// Which part of an exchange failed; named as in the framed error reply and the stats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The request could not be turned into what the handler wants.
    BadRequest,
    /// The handler failed (raised, was cancelled, or was abandoned).
    Handler,
    /// The handler's value could not be encoded as JSON.
    Encode,
}

impl FailureKind {
    /// The error reply's kind.
    pub fn wire(self) -> ErrorKind {
        match self {
            FailureKind::BadRequest => ErrorKind::BadRequest,
            FailureKind::Handler => ErrorKind::Handler,
            FailureKind::Encode => ErrorKind::Encode,
        }
    }

    /// The name on the wire (`{"error": name, ...}`) and in `stats()["errors"]`.
    pub fn name(self) -> &'static str {
        self.wire().name()
    }
}

/// Why one exchange got no normal reply.
#[derive(Clone)]
pub struct Failure {
    pub kind: FailureKind,
    /// One line for the error reply and the log, e.g. "ValueError: bad input".
    pub message: String,
    /// Whatever the handler's side keeps about the cause (e.g. the Python exception), handed
    /// back untouched to the code that raises or logs it.
    pub cause: Option<Arc<dyn Any + Send + Sync>>,
}

impl Failure {
    /// A failure with a message and nothing more.
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Failure {
            kind,
            message: message.into(),
            cause: None,
        }
    }
}

impl fmt::Debug for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Failure({}: {})", self.kind.name(), self.message)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} failed: {}", self.kind.name(), self.message)
    }
}
