//! One way to take a lock everywhere, and process-wide state a forked child can start afresh.

use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::{Mutex, MutexGuard};

/// Locks `mutex`, also after a thread panicked while holding it: every value guarded here is
/// left consistent between statements, and a panic must not turn into a second one.
pub fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A process-wide value behind a mutex that a child made by `fork` replaces instead of taking.
///
/// A thread of the parent may hold the mutex at the instant of the fork; in the child that
/// thread does not exist, so taking the lock would wait forever. [`ForkSafe::forget_after_fork`]
/// puts a fresh value behind a fresh mutex and leaks the old pair (dropping the value could wait
/// on threads that are gone too).
pub struct ForkSafe<T: 'static> {
    current: AtomicPtr<Mutex<T>>,
    fresh: fn() -> T,
}

impl<T> ForkSafe<T> {
    /// A value made by `fresh` on first use.
    pub const fn new(fresh: fn() -> T) -> Self {
        ForkSafe {
            current: AtomicPtr::new(ptr::null_mut()),
            fresh,
        }
    }

    fn mutex(&self) -> &Mutex<T> {
        let current = self.current.load(Ordering::Acquire);
        if !current.is_null() {
            // SAFETY: a pointer stored here came from Box::into_raw and is never freed.
            return unsafe { &*current };
        }
        let made = Box::into_raw(Box::new(Mutex::new((self.fresh)())));
        match self.current.compare_exchange(
            ptr::null_mut(),
            made,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            // SAFETY: as above; `made` is now the stored pointer.
            Ok(_) => unsafe { &*made },
            Err(other) => {
                // SAFETY: `made` was never shared; `other` is stored and never freed.
                drop(unsafe { Box::from_raw(made) });
                unsafe { &*other }
            }
        }
    }

    /// Locks the value (see [`locked`]).
    pub fn lock(&self) -> MutexGuard<'_, T> {
        locked(self.mutex())
    }

    /// Call in the child right after `fork`, while it has one thread: the value starts afresh.
    pub fn forget_after_fork(&self) {
        let made = Box::into_raw(Box::new(Mutex::new((self.fresh)())));
        // The old mutex and value are leaked: a guard on them may be "held" by a thread that
        // does not exist in this process.
        self.current.store(made, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static VALUE: ForkSafe<Vec<u32>> = ForkSafe::new(Vec::new);

    #[test]
    fn a_held_lock_is_replaced_not_taken() {
        VALUE.lock().push(1);
        let held = VALUE.lock();
        VALUE.forget_after_fork();
        assert!(VALUE.lock().is_empty());
        assert_eq!(*held, vec![1]);
    }
}
