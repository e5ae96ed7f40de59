//! A client's several addresses, and when a failed request is tried again.
//!
//! The addresses are tried in turn, from a random one so that many clients spread out. A
//! request that no server saw (no connection could be made: [`Error::never_sent`]) goes to the
//! next address at once, each address once per round; a request whose connection broke after
//! it was sent goes again only when the caller marked it safe to repeat (idempotent). Between
//! rounds, up to `retries` of them, the client waits an exponential backoff with full jitter,
//! and it starts no round past its deadline (the client's `timeout` from the first try).
//! (The server's own "not handled" goodbye is resent by the exchange itself, see `client.rs`.)

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::engine::error::Error;
use crate::engine::net::Endpoint;

/// The first backoff; each round doubles it, up to [`BACKOFF_MOST`].
pub const BACKOFF_FIRST: Duration = Duration::from_millis(50);
pub const BACKOFF_MOST: Duration = Duration::from_secs(2);

/// A random number, from the standard library's per-process random hash keys.
fn random() -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(0);
    hasher.finish()
}

/// What a client counts of its tries.
#[derive(Default, Serialize)]
pub struct FailoverStats {
    /// Rounds tried again after a failure (after a backoff).
    pub retries: AtomicU64,
    /// Times the client moved to its next address.
    pub failovers: AtomicU64,
}

/// A client's addresses and its retry settings.
pub struct Failover {
    endpoints: Vec<Endpoint>,
    current: AtomicUsize,
    pub retries: usize,
    pub stats: FailoverStats,
}

impl Failover {
    /// `endpoints` (at least one), starting from a random one.
    pub fn new(endpoints: Vec<Endpoint>, retries: usize) -> Self {
        assert!(!endpoints.is_empty(), "a client needs an address");
        let start = (random() % endpoints.len() as u64) as usize;
        Failover {
            endpoints,
            current: AtomicUsize::new(start),
            retries,
            stats: FailoverStats::default(),
        }
    }

    /// The address requests go to now.
    pub fn current(&self) -> (usize, &Endpoint) {
        let index = self.current.load(Ordering::Relaxed) % self.endpoints.len();
        (index, &self.endpoints[index])
    }

    /// Every address, in the order given.
    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// Moves on from address `from` (unless another thread moved on already).
    fn advance(&self, from: usize) {
        if self.endpoints.len() > 1
            && self
                .current
                .compare_exchange(
                    from,
                    (from + 1) % self.endpoints.len(),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            self.stats.failovers.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The tries of one request, bounded by `timeout` from now.
    pub fn attempts(&self, timeout: Option<Duration>, idempotent: bool) -> Attempts<'_> {
        Attempts {
            failover: self,
            idempotent,
            deadline: timeout.map(|timeout| Instant::now() + timeout),
            refused_in_round: 0,
            round: 0,
            notes: Vec::new(),
        }
    }
}

/// Where one request's tries stand.
pub struct Attempts<'a> {
    failover: &'a Failover,
    idempotent: bool,
    deadline: Option<Instant>,
    /// Addresses that could not be reached in this round.
    refused_in_round: usize,
    round: usize,
    /// What was tried again and why, for the caller's DEBUG log.
    pub notes: Vec<String>,
}

impl Attempts<'_> {
    /// After the try at address `index` failed with `err`: Ok once the next try may start (at
    /// once, or after a backoff), or the error to give the caller.
    pub async fn after(&mut self, index: usize, err: Error) -> Result<(), Error> {
        if matches!(err, Error::Closed) {
            return Err(err);
        }
        let (_, endpoint) = (index, &self.failover.endpoints[index]);
        let never_sent = err.never_sent();
        if !never_sent && !self.idempotent {
            self.failover.advance(index);
            return Err(err); // the server may have acted on it
        }
        self.failover.advance(index);
        if never_sent {
            self.refused_in_round += 1;
            if self.refused_in_round < self.failover.endpoints.len() {
                self.notes
                    .push(format!("{endpoint}: {err}; trying the next address"));
                return Ok(());
            }
        }
        if self.round >= self.failover.retries {
            return Err(err);
        }
        self.round += 1;
        let ceiling = BACKOFF_FIRST
            .saturating_mul(1 << self.round.min(16))
            .min(BACKOFF_MOST);
        let pause = Duration::from_nanos(random() % (ceiling.as_nanos() as u64 + 1));
        if self
            .deadline
            .is_some_and(|deadline| Instant::now() + pause > deadline)
        {
            return Err(err);
        }
        self.notes.push(format!(
            "{endpoint}: {err}; try {} of {} in {:.3} s",
            self.round + 1,
            self.failover.retries + 1,
            pause.as_secs_f64()
        ));
        self.failover.stats.retries.fetch_add(1, Ordering::Relaxed);
        self.refused_in_round = 0;
        tokio::time::sleep(pause).await;
        Ok(())
    }
}
