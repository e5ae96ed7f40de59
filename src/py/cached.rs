//! Values made once from Python (an imported function, a type), kept for the process, without
//! a lock that `fork` could leave taken.
//!
//! pyo3's `PyOnceLock` makes other threads wait while one runs the initializer, and an
//! initializer that imports runs Python code, so the GIL may pass to another thread in the
//! middle. When that thread calls `os.fork()`, the child inherits a cell marked "being made"
//! by a thread it does not have, and its first use waits forever (seen: 3 runs in 600 of
//! `tests/programs/fork_under_load.py`). Here nobody waits: a thread that finds the cell empty
//! makes the value itself, and the first one stored is kept (both are the same object).
//!
//! pyo3's `intern!` keeps its string in a `PyOnceLock` too, and every `PyOnceLock` lets go of
//! the GIL before it starts its initializer and takes it back inside: whatever the initializer
//! does, a fork by the thread holding the GIL at that moment leaves the cell "being made" in
//! the child (seen: `intern!` in `aio.Client.request`, 2 runs in 400). Use [`interned!`]; and
//! pyo3's own lazily made type objects are made at import, on one thread (`py::warm_up`).

use std::sync::OnceLock;

use pyo3::prelude::*;
use pyo3::PyTypeCheck;

/// A value made at most a few times (concurrent first uses may each make it) and kept once.
pub struct Cached<T>(OnceLock<T>);

impl<T> Cached<T> {
    pub const fn new() -> Self {
        Cached(OnceLock::new())
    }

    /// The value, made by `make` if there is none yet. Call with the GIL held: storing it
    /// runs no Python code, so no fork can come between its start and its end.
    pub fn get_or_try_init<E>(&self, make: impl FnOnce() -> Result<T, E>) -> Result<&T, E> {
        if let Some(value) = self.0.get() {
            return Ok(value);
        }
        let made = make()?;
        // Another thread may have stored its own meanwhile: then `made` is dropped (with the
        // GIL held, as the caller holds it).
        let _ = self.0.set(made);
        Ok(self.0.get().expect("stored above"))
    }
}

/// `pyo3::intern!` without its `PyOnceLock`: the interned Python `str` for a literal.
macro_rules! interned {
    ($py:expr, $text:expr) => {{
        static INTERNED: $crate::py::cached::Cached<pyo3::Py<pyo3::types::PyString>> =
            $crate::py::cached::Cached::new();
        let py: pyo3::Python<'_> = $py;
        INTERNED
            .get_or_try_init(|| {
                Ok::<_, std::convert::Infallible>(pyo3::types::PyString::intern(py, $text).unbind())
            })
            .unwrap_or_else(|never| match never {})
            .bind(py)
    }};
}
pub(crate) use interned;

impl<T: PyTypeCheck> Cached<Py<T>> {
    /// `module.attr`, imported on first use.
    pub fn import<'py>(
        &self,
        py: Python<'py>,
        module: &str,
        attr: &str,
    ) -> PyResult<&Bound<'py, T>> {
        let value = self.get_or_try_init(|| -> PyResult<Py<T>> {
            Ok(py.import(module)?.getattr(attr)?.cast_into::<T>()?.unbind())
        })?;
        Ok(value.bind(py))
    }
}
