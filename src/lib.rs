//! framesock: length-prefixed JSON messages over TCP, a Rust engine driven from Python.
//!
//! `engine` is the network engine and knows nothing of Python; `py` (the `python` feature,
//! which maturin turns on) is the extension module built on it.

pub mod engine;
#[cfg(feature = "python")]
mod py;
