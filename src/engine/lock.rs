//! One way to take a lock everywhere.

use std::sync::{Mutex, MutexGuard};

/// Locks `mutex`, also after a thread panicked while holding it: every value guarded here is
/// left consistent between statements, and a panic must not turn into a second one.
pub fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
