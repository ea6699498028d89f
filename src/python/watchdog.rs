//! Says so when a Python handler runs for long: a handler that blocks holds up its connection,
//! and its dispatcher thread (when every thread is blocked, every connection waits). Each
//! dispatcher thread has a clock; a watchdog task on the runtime, which needs no GIL, reads them
//! and logs a warning naming the handler and the connection once one has run for
//! `slow_handler`.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::server::Event;

/// The handlers by name, as the clock records which one runs.
pub(crate) const HANDLER_NAMES: [&str; 5] = [
    "on_connect",
    "on_message",
    "on_file",
    "on_disconnect",
    "on_subscribe",
];

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
    /// The call the watchdog last warned about, plus one.
    warned: AtomicU64,
}

impl Default for HandlerClock {
    fn default() -> HandlerClock {
        HandlerClock {
            base: Instant::now(),
            started: AtomicU64::new(0),
            conn: AtomicU64::new(0),
            which: AtomicUsize::new(0),
            calls: AtomicU64::new(0),
            warned: AtomicU64::new(0),
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

/// The clocks of a server's dispatcher threads.
#[derive(Debug, Default)]
pub(crate) struct Clocks(std::sync::Mutex<Vec<Arc<HandlerClock>>>);

impl Clocks {
    /// A clock for one more dispatcher thread.
    pub(crate) fn add(&self) -> Arc<HandlerClock> {
        let clock = Arc::new(HandlerClock::default());
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Arc::clone(&clock));
        clock
    }

    fn all(&self) -> Vec<Arc<HandlerClock>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// Watches the clocks until the server's event queue ends, warning once per call that runs for
/// longer than `limit`.
pub(crate) fn watch(clocks: Arc<Clocks>, events: flume::Receiver<Event>, limit: Duration) {
    super::runtime::runtime().spawn(async move {
        let tick = (limit / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
        loop {
            tokio::time::sleep(tick).await;
            let clocks = clocks.all();
            let idle = clocks
                .iter()
                .all(|clock| clock.started.load(Ordering::Acquire) == 0);
            if idle && events.is_disconnected() {
                return;
            }
            for clock in clocks {
                warn_if_slow(&clock, limit, events.len());
            }
        }
    });
}

fn warn_if_slow(clock: &HandlerClock, limit: Duration, queued: usize) {
    let started = clock.started.load(Ordering::Acquire);
    if started == 0 {
        return;
    }
    let call = clock.calls.load(Ordering::Relaxed) + 1;
    let running = clock
        .base
        .elapsed()
        .saturating_sub(Duration::from_millis(started - 1));
    if running < limit || clock.warned.swap(call, Ordering::Relaxed) == call {
        return;
    }
    let which = HANDLER_NAMES[clock.which.load(Ordering::Relaxed) % HANDLER_NAMES.len()];
    log::warn!(
        "the {which} handler for connection {} has run for {:.1} s (slow_handler is {:.1} s); \
         its connection's events wait for it ({queued} events queued in all). Handlers should \
         not block: move slow work to a thread, or use socketcomm.aio",
        clock.conn.load(Ordering::Relaxed),
        running.as_secs_f64(),
        limit.as_secs_f64(),
    );
}
