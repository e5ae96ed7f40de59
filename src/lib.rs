//! framesock: length-prefixed JSON messages over TCP, a Rust engine driven from Python.
//!
//! `engine` is the network engine and knows nothing of Python; `py` (the `python` feature,
//! which maturin turns on) is the extension module built on it.

pub mod engine;
#[cfg(feature = "python")]
mod py;

/// The extension's Rust allocations (network buffers, replies) go to mimalloc, which returns
/// freed memory to the system; glibc's malloc kept it in per-thread arenas (a 60 s hostile soak
/// ended at 464 MiB RSS with glibc, 228 MiB with mimalloc). Python's own objects are not
/// affected: they come from Python's allocator.
#[cfg(feature = "python")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
