//! The network engine: the wire format, sockets, serving loops and client exchanges. Nothing
//! in here knows Python; the `py` layer drives it through [`handler::Handler`] and
//! [`handler::Log`].

pub mod client;
pub mod codec;
pub mod error;
pub mod failover;
pub mod handler;
pub mod json_text;
pub mod lock;
pub mod log_budget;
pub mod net;
pub mod pipeline;
pub mod proxy;
pub mod runtime;
pub mod serve;
pub mod tls;
