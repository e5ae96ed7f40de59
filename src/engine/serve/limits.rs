//! What a server allows: per-connection limits, connections per address, and the memory
//! requests being answered may take.

use super::*;

/// Limits that apply to every connection.
#[derive(Debug, Clone)]
pub struct Limits {
    /// For each request from its first byte to its last, and for sending each reply.
    pub timeout: Option<Duration>,
    /// For the silence between requests on a kept connection.
    pub idle_timeout: Option<Duration>,
    pub max_frame: usize,
    /// Request bytes all connections together may hold (partly received, or being answered);
    /// a request that would take them past it is answered `busy` instead of read.
    pub max_buffered: usize,
    /// Reply bytes a connection may have waiting to be sent: past this it writes them (and
    /// reads no further request) before answering more.
    pub max_unsent: usize,
    /// Connections one client IP address may have at once (None: no limit).
    pub max_connections_per_address: Option<usize>,
}

impl Limits {
    /// How long one write may wait for the peer to read: `timeout`, or without one
    /// `idle_timeout`, so a peer that never reads cannot keep its connection forever.
    pub(super) fn write_limit(&self) -> Option<Duration> {
        self.timeout.or(self.idle_timeout)
    }
}

/// Admits the request whose header starts `input` if all it declares fits in `max_buffered`
/// beside what the other connections hold: its bytes are then reserved in `charge`. Refused:
/// how many bytes it declared, header included.
pub(super) fn admit(
    charge: &mut Charge<'_>,
    input: &[u8],
    limits: &Limits,
) -> std::result::Result<(), u64> {
    let declared = codec::declared_request_len(input).unwrap_or_default();
    let whole = codec::HEADER_LEN as u64 + u64::from(declared);
    if charge.others() + whole > limits.max_buffered as u64 {
        return Err(whole);
    }
    charge.reserve(whole, input.len());
    Ok(())
}

/// Default of `max_buffered`: 256 MiB, which a small machine can spare.
pub const DEFAULT_MAX_BUFFERED: usize = 256 * 1024 * 1024;

/// Default of `max_unsent`: asyncio's default write buffer high-water mark.
pub const DEFAULT_MAX_UNSENT: usize = 64 * 1024;

/// The unit of `Service::answering`: a semaphore counts in u32 per acquire.
pub(super) const ANSWERING_UNIT: u64 = 1024;

/// A connection counted against its IP address's `max_connections_per_address` while it lives.
pub(super) struct AddressCount<'a> {
    pub(super) service: &'a Service,
    pub(super) ip: std::net::IpAddr,
}

impl<'a> AddressCount<'a> {
    /// Counts a connection from `peer`: None if its address has the most it may have already;
    /// without a limit (or for a Unix socket) nothing is counted.
    pub(super) fn admit(service: &'a Service, peer: &Address) -> Option<Option<Self>> {
        let (Some(limit), Address::Inet(addr)) = (service.limits.max_connections_per_address, peer)
        else {
            return Some(None);
        };
        let ip = addr.ip();
        let mut counts = locked(&service.per_address);
        let count = counts.entry(ip).or_insert(0);
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(Some(AddressCount { service, ip }))
    }
}

impl Drop for AddressCount<'_> {
    fn drop(&mut self) {
        let mut counts = locked(&self.service.per_address);
        if let Some(count) = counts.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// `bytes` in units of `Service::answering`, rounded up, at least one, at most what one
/// acquire can take.
pub(super) fn answering_units(bytes: u64) -> usize {
    bytes.div_ceil(ANSWERING_UNIT).clamp(1, u64::from(u32::MAX)) as usize
}
