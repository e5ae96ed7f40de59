//! The counters a server keeps (what `stats()` shows), and the guards that keep them right.

use super::*;

/// Counters, updated without locks from every connection; serialised with the field names
/// `stats()` shows.
#[derive(Default, Serialize)]
pub struct Stats {
    #[serde(rename = "connections_accepted")]
    pub(super) accepted: AtomicU64,
    #[serde(rename = "connections_active")]
    pub(super) active: AtomicU64,
    /// Connections that ended (closed or reset) before their first byte: a balancer's or a
    /// monitor's TCP check, a port probe. Not errors, and not logged.
    #[serde(rename = "connections_empty")]
    pub(super) empty: AtomicU64,
    pub(super) requests: AtomicU64,
    pub(super) bytes_in: AtomicU64,
    pub(super) bytes_out: AtomicU64,
    /// Request bytes held now (partly received or being answered), against `max_buffered`.
    pub(super) bytes_buffered: AtomicU64,
    pub(super) idle_closed: AtomicU64,
    /// Idle connections closed to make room for a new one at `max_connections`.
    pub(super) idle_evicted: AtomicU64,
    /// Connections closed to make room while stuck inside a request (no progress for
    /// `STALL_GRACE`), with no idle one left to close.
    pub(super) stalled_evicted: AtomicU64,
    /// Connections refused at once: their address had `max_connections_per_address` already.
    pub(super) address_refused: AtomicU64,
    /// Requests answered `busy` (framed) or connections closed (classic) because
    /// `max_buffered` was reached.
    pub(super) busy: AtomicU64,
    /// Requests being answered now: their handler runs, or waits for a thread or the loop.
    pub(super) requests_in_progress: AtomicU64,
    /// From a request's last byte to its reply's first byte written.
    #[serde(rename = "request_duration_seconds")]
    pub(super) duration: Histogram,
    pub(super) errors: ErrorCounts,
}

/// The upper bounds of the request-duration buckets, in seconds: 100 µs to 10 s.
pub const DURATION_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// A histogram of durations, updated without locks. Shown as Prometheus keeps one: counts
/// per upper bound, each counting every observation at or below it (`+Inf`: all of them),
/// then the count and the sum in seconds.
#[derive(Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last is above every bound.
    buckets: [AtomicU64; DURATION_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Histogram {
    /// Counts `times` observations of `duration`.
    pub fn observe(&self, duration: Duration, times: u64) {
        let seconds = duration.as_secs_f64();
        let bucket = DURATION_BUCKETS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(DURATION_BUCKETS.len());
        bump(&self.buckets[bucket], times);
        let nanos = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        bump(&self.sum_nanos, nanos.saturating_mul(times));
    }
}

impl Serialize for Histogram {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut buckets = Vec::with_capacity(self.buckets.len());
        let mut below = 0;
        for (index, count) in self.buckets.iter().enumerate() {
            below += count.load(Ordering::Relaxed);
            let bound = DURATION_BUCKETS
                .get(index)
                .map_or_else(|| "+Inf".to_owned(), |bound| format!("{bound:?}"));
            buckets.push((bound, below));
        }
        let mut map = serializer.serialize_map(Some(3))?;
        map.serialize_entry("buckets", &BucketMap(&buckets))?;
        map.serialize_entry("count", &below)?;
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        map.serialize_entry("sum", &sum)?;
        map.end()
    }
}

/// Buckets as a map from bound (`"0.0001"`, ..., `"+Inf"`) to count, in order.
struct BucketMap<'a>(&'a [(String, u64)]);

impl Serialize for BucketMap<'_> {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(bound, count)| (bound, count)))
    }
}

/// Counts one more on a gauge (a request in progress, an active connection) for as long as it
/// lives, also when shutdown drops the task that holds it.
pub(super) struct Gauged<'a>(&'a AtomicU64);

impl<'a> Gauged<'a> {
    pub(super) fn count(gauge: &'a AtomicU64) -> Self {
        bump(gauge, 1);
        Gauged(gauge)
    }
}

impl Drop for Gauged<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether a read error only says the peer left: closed (TLS without `close_notify`), reset
/// or aborted. Where no request was on its way, nothing was lost.
pub(super) fn peer_left(err: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionReset, UnexpectedEof};
    matches!(
        err.kind(),
        UnexpectedEof | ConnectionReset | ConnectionAborted
    )
}

/// Failed exchanges and connections, by kind.
#[derive(Default, Serialize)]
pub(super) struct ErrorCounts {
    pub(super) handler: AtomicU64,
    pub(super) encode: AtomicU64,
    pub(super) bad_request: AtomicU64,
    pub(super) frame_too_large: AtomicU64,
    pub(super) timeout: AtomicU64,
    pub(super) disconnected: AtomicU64,
    pub(super) io: AtomicU64,
    /// A bug in framesock (a caught panic): the connection, or the server, was ended.
    pub(super) internal: AtomicU64,
    /// TLS handshakes that failed.
    pub(super) tls: AtomicU64,
    /// Connections refused for their PROXY protocol header: missing, malformed, cut short or
    /// too slow, or from an address not in `proxy_from`.
    pub(super) proxy: AtomicU64,
}

pub(super) fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

impl Stats {
    pub(super) fn failure(&self, kind: FailureKind) -> &AtomicU64 {
        match kind {
            FailureKind::BadRequest => &self.errors.bad_request,
            FailureKind::Handler => &self.errors.handler,
            FailureKind::Encode => &self.errors.encode,
        }
    }

    pub(super) fn connection_error(&self, err: &Error) -> &AtomicU64 {
        match err {
            Error::Wire(WireError::FrameTooLarge { .. } | WireError::ReplyTooLarge { .. }) => {
                &self.errors.frame_too_large
            }
            Error::Wire(WireError::Truncated { .. } | WireError::ClosedBeforeMessage) => {
                &self.errors.disconnected
            }
            Error::Timeout(_) => &self.errors.timeout,
            _ => &self.errors.io,
        }
    }

    /// Requests served so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Connections open now.
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }
}

/// The request bytes one connection holds, counted in `Stats::bytes_buffered` for as long as
/// it holds them (also when shutdown drops its task).
pub(super) struct Charge<'a> {
    pub(super) total: &'a AtomicU64,
    pub(super) held: u64,
    /// What the request now arriving declared (with its header): counted whole from its
    /// header on, so the requests arriving together can never outgrow `max_buffered`.
    pub(super) reserved: u64,
}

impl<'a> Charge<'a> {
    pub(super) fn new(total: &'a AtomicU64) -> Self {
        Charge {
            total,
            held: 0,
            reserved: 0,
        }
    }

    /// Counts the request now arriving as its whole declared size (`holding` bytes are here).
    pub(super) fn reserve(&mut self, whole: u64, holding: usize) {
        self.reserved = whole;
        self.set(holding);
    }

    /// This connection now holds `bytes` (or its reservation, if larger).
    pub(super) fn set(&mut self, bytes: usize) {
        let bytes = (bytes as u64).max(self.reserved);
        if bytes > self.held {
            self.total.fetch_add(bytes - self.held, Ordering::Relaxed);
        } else {
            self.total.fetch_sub(self.held - bytes, Ordering::Relaxed);
        }
        self.held = bytes;
    }

    /// What the other connections hold.
    pub(super) fn others(&self) -> u64 {
        self.total.load(Ordering::Relaxed).saturating_sub(self.held)
    }
}

impl Drop for Charge<'_> {
    fn drop(&mut self) {
        self.reserved = 0;
        self.set(0);
    }
}
