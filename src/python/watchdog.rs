//! Says so when a Python handler runs for long. Handlers share one dispatcher thread, so a
//! handler that blocks holds up the events of every connection (the network loop goes on, and
//! events wait in the bounded queue); a watchdog task on the runtime, which needs no GIL, logs
//! a warning naming the handler and the connection once it has run for `slow_handler`.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::server::Event;

/// The handlers by name, as the clock records which one runs.
pub(crate) const HANDLER_NAMES: [&str; 4] =
    ["on_connect", "on_message", "on_file", "on_disconnect"];

/// Which handler runs now, for which connection, since when.
#[derive(Debug)]
pub(crate) struct HandlerClock {
    base: Instant,
    /// Milliseconds since `base` at which the running handler started, plus one; 0 when none runs.
    started: AtomicU64,
    conn: AtomicU64,
    which: AtomicUsize,
    /// How many handler calls have started: tells one long call from the next.
    calls: AtomicU64,
}

impl Default for HandlerClock {
    fn default() -> HandlerClock {
        HandlerClock {
            base: Instant::now(),
            started: AtomicU64::new(0),
            conn: AtomicU64::new(0),
            which: AtomicUsize::new(0),
            calls: AtomicU64::new(0),
        }
    }
}

impl HandlerClock {
    /// Records that handler `which` (an index into [`HANDLER_NAMES`]) starts for `conn`; the
    /// guard records its end.
    pub(crate) fn enter(&self, which: usize, conn: u64) -> Running<'_> {
        self.conn.store(conn, Ordering::Relaxed);
        self.which.store(which, Ordering::Relaxed);
        self.calls.fetch_add(1, Ordering::Relaxed);
        let now = self.base.elapsed().as_millis() as u64 + 1;
        self.started.store(now, Ordering::Release);
        Running(self)
    }
}

/// A handler call in progress.
pub(crate) struct Running<'a>(&'a HandlerClock);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.started.store(0, Ordering::Release);
    }
}

/// Watches `clock` until the server's event queue ends, warning once per call that runs for
/// longer than `limit`.
pub(crate) fn watch(clock: Arc<HandlerClock>, events: flume::Receiver<Event>, limit: Duration) {
    super::runtime::runtime().spawn(async move {
        let tick = (limit / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
        let mut warned_call = None;
        loop {
            tokio::time::sleep(tick).await;
            let started = clock.started.load(Ordering::Acquire);
            if started == 0 {
                if events.is_disconnected() {
                    return;
                }
                continue;
            }
            let call = clock.calls.load(Ordering::Relaxed);
            let running = clock
                .base
                .elapsed()
                .saturating_sub(Duration::from_millis(started - 1));
            if running < limit || warned_call == Some(call) {
                continue;
            }
            warned_call = Some(call);
            let which = HANDLER_NAMES[clock.which.load(Ordering::Relaxed) % HANDLER_NAMES.len()];
            log::warn!(
                "the {which} handler for connection {} has run for {:.1} s (slow_handler is {:.1} \
                 s); every connection's events wait for it ({} queued). Handlers must not \
                 block: move slow work to a thread, or use socketcomm.aio",
                clock.conn.load(Ordering::Relaxed),
                running.as_secs_f64(),
                limit.as_secs_f64(),
                events.len()
            );
        }
    });
}
