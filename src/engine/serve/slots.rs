//! Connection slots: which connections are idle (or stalled) and may be closed to make room
//! when the server is full, and the idle timer.

use super::*;

/// The connections waiting for a request, for making room when the server is full. Each
/// connection has a slot for its whole life; becoming idle and busy again are an atomic store
/// each (a shared map changed twice per request was a lock every connection fought over).
#[derive(Default)]
pub(super) struct IdleConnections {
    /// The order of the last connection to become idle.
    pub(super) last: AtomicU64,
    pub(super) next_key: AtomicU64,
    pub(super) slots: Mutex<std::collections::HashMap<u64, Arc<IdleSlot>>>,
    /// Set while the accept loop waits for a connection to become idle (or end).
    pub(super) room_wanted: std::sync::atomic::AtomicBool,
    /// Told when a connection becomes idle while `room_wanted` is set.
    pub(super) became_idle: tokio::sync::Notify,
}

/// A connection's place among the idle ones.
#[derive(Default)]
pub(super) struct IdleSlot {
    /// `BUSY`, `EVICTED`, or the order in which it became idle (oldest lowest).
    pub(super) since: AtomicU64,
    /// The connection's current wait, woken when it is chosen to make room (a chosen
    /// connection that is busy by then sees `EVICTED` at its next wait). A lock-free register
    /// per wait, where a `Notify` took a lock to add the waiter and another to remove it.
    pub(super) evict: AtomicWaker,
}

pub(super) const BUSY: u64 = 0;
pub(super) const EVICTED: u64 = u64::MAX;
/// Added to the order of a connection stuck inside a request: every idle connection goes
/// before it, and among the stuck ones the one stuck longest goes first.
pub(super) const STALLED: u64 = 1 << 62;

/// How long a request may make no progress before its connection may be closed to make room
/// (only when the server is full and no connection is idle): well under `timeout`, so a peer
/// that keeps connections inside requests on purpose costs one connection each, not the server.
pub(super) const STALL_GRACE: Duration = Duration::from_secs(2);

impl IdleConnections {
    /// A connection's slot, until the registration goes.
    pub(super) fn register(&self) -> IdleRegistration<'_> {
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(IdleSlot::default());
        locked(&self.slots).insert(key, slot.clone());
        IdleRegistration {
            set: self,
            key,
            slot,
        }
    }

    /// Closes the connection idle longest; false if none is idle. A connection that gets a
    /// request at the same moment is not chosen, or if it was, it ends after that request.
    /// It looks at every slot (a few microseconds for thousands of connections), which only a
    /// full server accepting a connection does; the per-request marks stay lock-free.
    pub(super) fn evict_oldest(&self) -> bool {
        let slots = locked(&self.slots);
        loop {
            let oldest = slots
                .values()
                .filter_map(|slot| {
                    let since = slot.since.load(Ordering::SeqCst);
                    (since != BUSY && since != EVICTED).then_some((since, slot))
                })
                .min_by_key(|(since, _)| *since);
            let Some((since, slot)) = oldest else {
                return false;
            };
            let chosen = slot
                .since
                .compare_exchange(since, EVICTED, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok();
            if chosen {
                slot.evict.wake();
                return true;
            }
            // It became busy meanwhile: look again.
        }
    }
}

/// A connection's registration among the idle ones.
pub(super) struct IdleRegistration<'a> {
    pub(super) set: &'a IdleConnections,
    pub(super) key: u64,
    pub(super) slot: Arc<IdleSlot>,
}

impl IdleRegistration<'_> {
    /// Marks the connection idle until the guard goes; `evicted()` fires if it is chosen to
    /// make room.
    pub(super) fn enter(&self) -> IdleGuard<'_> {
        let order = self.set.last.fetch_add(1, Ordering::Relaxed) + 1;
        self.mark(order)
    }

    /// Marks the connection evictable in `order` until the guard goes.
    pub(super) fn mark(&self, order: u64) -> IdleGuard<'_> {
        // Already chosen (while busy): it stays so, and its next wait ends at once.
        let _ = self
            .slot
            .since
            .compare_exchange(BUSY, order, Ordering::SeqCst, Ordering::SeqCst);
        if self.set.room_wanted.load(Ordering::SeqCst) {
            self.set.became_idle.notify_one();
        }
        IdleGuard {
            slot: &self.slot,
            order,
        }
    }
}

impl IdleRegistration<'_> {
    /// Completes once the connection, inside a request that made no progress for
    /// `STALL_GRACE`, has been chosen to make room (after every idle one).
    pub(super) async fn stalled(&self) {
        tokio::time::sleep(STALL_GRACE).await;
        let order = STALLED + self.set.last.fetch_add(1, Ordering::Relaxed) + 1;
        let guard = self.mark(order);
        guard.evicted().await;
    }
}

impl Drop for IdleRegistration<'_> {
    fn drop(&mut self) {
        locked(&self.set.slots).remove(&self.key);
    }
}

pub(super) struct IdleGuard<'a> {
    pub(super) slot: &'a IdleSlot,
    pub(super) order: u64,
}

impl IdleGuard<'_> {
    /// Completes once the connection has been chosen to make room.
    pub(super) fn evicted(&self) -> impl std::future::Future<Output = ()> + '_ {
        std::future::poll_fn(|cx| {
            self.slot.evict.register(cx.waker());
            if self.slot.since.load(Ordering::SeqCst) == EVICTED {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }
}

impl Drop for IdleGuard<'_> {
    fn drop(&mut self) {
        let _ =
            self.slot
                .since
                .compare_exchange(self.order, BUSY, Ordering::SeqCst, Ordering::SeqCst);
    }
}

/// One connection's idle limit as a single timer that is moved only when it fires early.
/// Arming a timer for every wait between requests cost an insert into tokio's timer wheel and
/// a removal from it per request; this one fires at most once per `limit` while the
/// connection is busy, and then looks again from when the current wait began.
pub(super) struct IdleTimer {
    pub(super) limit: Option<Duration>,
    pub(super) sleep: Pin<Box<tokio::time::Sleep>>,
    /// When the current wait began.
    pub(super) since: Instant,
}

impl IdleTimer {
    pub(super) fn new(limit: Option<Duration>) -> Self {
        let now = Instant::now();
        // Without a limit the timer is never awaited; any deadline does.
        let first = now + limit.unwrap_or(Duration::from_secs(86400));
        IdleTimer {
            limit,
            sleep: Box::pin(tokio::time::sleep_until(first)),
            since: now,
        }
    }

    /// A wait for a request begins.
    pub(super) fn start(&mut self) {
        self.since = Instant::now();
    }

    /// Completes once the current wait has lasted `limit`; never without a limit.
    pub(super) async fn expired(&mut self) {
        let Some(limit) = self.limit else {
            return std::future::pending().await;
        };
        loop {
            self.sleep.as_mut().await;
            let due = self.since + limit;
            if Instant::now() >= due {
                return;
            }
            self.sleep.as_mut().reset(due);
        }
    }
}
