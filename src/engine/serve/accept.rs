//! The accept loop: connections taken while there is room, and room made when there is not.

use super::*;

/// Accepts connections until `stop` is cancelled, at most `max_connections` at a time; each is
/// served in its own task, which `abort` ends outright once the shutdown grace is over.
pub(super) async fn accept_loop(
    service: Arc<Service>,
    listener: Listener,
    max_connections: usize,
    stop: CancellationToken,
    abort: CancellationToken,
    tracker: TaskTracker,
) {
    let slots = Arc::new(Semaphore::new(max_connections));
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let accepted = match accepted {
            Ok(accepted) => {
                // Full: the connection idle longest makes room. With none idle, the first to
                // become idle does (or any that ends).
                let slot = loop {
                    if let Ok(slot) = slots.clone().try_acquire_owned() {
                        break slot;
                    }
                    service.idle.room_wanted.store(true, Ordering::SeqCst);
                    let idle = service.idle.became_idle.notified();
                    if service.idle.evict_oldest() {
                        let slot = slots.clone().acquire_owned();
                        tokio::select! {
                            biased;
                            _ = stop.cancelled() => return,
                            slot = slot => break slot.expect("the semaphore is never closed"),
                        }
                    }
                    tokio::select! {
                        biased;
                        _ = stop.cancelled() => return,
                        slot = slots.clone().acquire_owned() => break slot.expect("the semaphore is never closed"),
                        _ = idle => {}
                    }
                };
                service.idle.room_wanted.store(false, Ordering::SeqCst);
                Ok((accepted, slot))
            }
            Err(err) => Err(err),
        };
        match accepted {
            Ok(((stream, peer), slot)) => {
                let service = service.clone();
                let stop = stop.clone();
                let abort = abort.clone();
                tracker.spawn(async move {
                    let serve = AssertUnwindSafe(async {
                        if let Some((stream, caller)) = service.set_up(stream, peer.clone()).await {
                            service.serve_connection(stream, caller, stop, Some(slot)).await;
                        }
                    });
                    tokio::select! {
                        _ = abort.cancelled() => {}
                        served = serve.catch_unwind() => if let Err(panic) = served {
                            bump(&service.stats.errors.internal, 1);
                            service.log.log(
                                Level::Error,
                                format!("connection from {peer} ended by an internal error: {}", panic_message(&*panic)),
                                None,
                            );
                        }
                    }
                });
            }
            Err(err) => {
                // E.g. out of file descriptors: wait a little rather than spin on the error.
                bump(&service.stats.errors.io, 1);
                service
                    .log
                    .log(Level::Warning, format!("accept failed: {err}"), None);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
