//! `framesock.aio.Client` reads its replies on its event loop's thread: the loop watches the
//! plain socket (`loop.add_reader`) and the engine's [`Replies`] reads and decodes them there,
//! so the awaiting Task is woken without an engine thread handing the reply over (one thread
//! wake-up less per round trip, the one that made a sequential `request()` slower than asyncio
//! streams). The socket is still written from the caller and flushed by the engine; a TLS
//! connection is read by an engine task as before.

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, Weak};

use pyo3::prelude::*;

use crate::engine::lock::locked;
use crate::engine::pipeline::{KeepOpen, ReaderSource, Replies, ReplyReader, WeakReplies};
use crate::engine::runtime;
use crate::py::bridge::LoopBridge;
use crate::py::cached::interned;

/// New connections are read on the loop in `watched` (the one the client was last used on).
pub fn on_the_loop(watched: Arc<Mutex<Weak<LoopBridge>>>) -> ReaderSource {
    Box::new(move || {
        let bridge = locked(&watched).clone();
        // A loop already torn down reads nothing: an engine task does (the client closes anyway).
        if bridge.upgrade().is_none_or(|bridge| bridge.is_closed()) {
            return None;
        }
        Some(Box::new(OnLoop { bridge }) as Box<dyn ReplyReader>)
    })
}

/// One connection's reader: its loop, through that loop's bridge.
struct OnLoop {
    bridge: Weak<LoopBridge>,
}

impl ReplyReader for OnLoop {
    fn start(&self, replies: Replies) {
        let Some(bridge) = self.bridge.upgrade() else {
            return replies.fail("the event loop of this client has closed");
        };
        let weak = self.bridge.clone();
        bridge.push(Box::new(move |py| {
            let Some(bridge) = weak.upgrade() else {
                return;
            };
            let fd = replies.fd();
            let watch = ReadReplies {
                bridge: weak,
                replies: replies.downgrade(),
                generation: runtime::generation(),
            };
            if let Err(err) = bridge
                .event_loop(py)
                .call_method1(interned!(py, "add_reader"), (fd, watch))
            {
                replies.fail(&format!(
                    "the event loop cannot watch the connection: {err}"
                ));
            }
        }));
    }

    fn stop(&self, fd: RawFd, socket: KeepOpen) {
        let Some(bridge) = self.bridge.upgrade() else {
            return; // the loop is gone, and its watching with it: the socket closes now
        };
        let weak = self.bridge.clone();
        // In order after `start`'s job. The job holds the socket open until it has run, so the
        // descriptor cannot be another socket's while the loop still watches it; a job dropped
        // unrun (the loop was torn down meanwhile) lets it close at once.
        bridge.push(Box::new(move |py| {
            if let Some(bridge) = weak.upgrade() {
                let _ = bridge
                    .event_loop(py)
                    .call_method1(interned!(py, "remove_reader"), (fd,));
            }
            drop(socket);
        }));
    }
}

/// The loop's reader callback for one connection.
#[pyclass(frozen)]
struct ReadReplies {
    bridge: Weak<LoopBridge>,
    replies: WeakReplies,
    /// The engine generation it was made in: a forked child's copy of the loop must not read
    /// the parent's replies from the socket they share.
    generation: u64,
}

#[pymethods]
impl ReadReplies {
    fn __call__(&self, py: Python<'_>) {
        if self.generation != runtime::generation() {
            return;
        }
        let (Some(bridge), Some(replies)) = (self.bridge.upgrade(), self.replies.upgrade()) else {
            return; // over: its `stop` is on its way, or its loop is gone
        };
        bridge.run_here(py, || replies.read_ready());
    }
}

/// Makes this module's private class's type object now, at import (see `py::warm_up`).
pub(super) fn make_types(py: Python<'_>) {
    let _ = <ReadReplies as pyo3::PyTypeInfo>::type_object(py);
}
