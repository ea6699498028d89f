//! Runs the `on_*` handlers on `handler_threads` dispatcher threads that share the server's
//! events one connection at a time: a connection's events are handled in order, one after
//! another, and a handler that blocks holds up its own connection only, while another thread
//! serves the rest. A thread keeps the GIL across the events of several connections, up to a
//! batch, so the GIL is taken once per batch, not once per event.
//!
//! A dispatcher waiting for events drives the runtime the connections run on ([`Driven`]) on its
//! own thread, so that the events it then handles were read on that thread. The handlers'
//! answers are queued for their connections when the dispatcher next drives the runtime, from
//! inside it ([`Driven::reply`]), so that waking a connection's task costs no system call
//! either: a message never changes threads, and costs the system calls of its read and write.
//!
//! NOTE: the threads do not all work at once. Threads taking turns at the GIL cost about a
//! third more CPU per message than one thread (measured with benches/run.py), so thread 0 does
//! the work, and thread `n` joins in only while threads `0..n` are each stuck in a handler for
//! more than [`STUCK`]: a blocked handler gets help within milliseconds, and a server whose
//! handlers do not block runs as one dispatcher.

use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use pyo3::prelude::*;
use rustc_hash::FxHashMap;

use super::driven::Driven;
use crate::server::Event;
use crate::sync::lock;

/// A dispatcher handles at most this many events per GIL acquisition, so that a flood of
/// events cannot starve other Python threads.
const DISPATCH_BATCH: usize = 256;

/// How long a dispatcher waits without the GIL before it checks for signals.
const WAIT_SLICE: Duration = Duration::from_millis(100);

/// How long a thread's current connection must have taken before the next thread helps.
pub(super) const STUCK: Duration = Duration::from_millis(20);

/// The server's events, sorted by connection for the dispatcher threads.
pub(super) struct Scheduler {
    events: flume::Receiver<Event>,
    /// Where the connections run, driven by the dispatcher that waits for their events.
    driven: Arc<Driven>,
    state: Mutex<State>,
    /// Notified when a connection becomes ready again.
    ready_again: Condvar,
    base: Instant,
    /// Per thread: milliseconds since `base` (plus one) at which it started its current
    /// connection's events; 0 while it waits.
    busy_since: Vec<AtomicU64>,
}

/// NOTE: keyed by connection id with FxHash: the map is looked up a few times per message, and
/// SipHash (the standard map's, which resists keys chosen by an attacker; ours are the server's
/// own counter) cost 4% of the handler path's instructions.
#[derive(Default)]
struct State {
    /// Events waiting, and whether a thread is handling them now, by connection.
    pending: FxHashMap<u64, Pending>,
    /// Connections with pending events that no thread is handling, oldest first.
    ready: VecDeque<u64>,
    /// How many connections a thread is handling now.
    running: usize,
}

#[derive(Default)]
struct Pending {
    events: VecDeque<Event>,
    running: bool,
}

impl Scheduler {
    pub(super) fn new(
        events: flume::Receiver<Event>,
        driven: Arc<Driven>,
        threads: usize,
    ) -> Scheduler {
        Scheduler {
            events,
            driven,
            state: Mutex::new(State::default()),
            ready_again: Condvar::new(),
            base: Instant::now(),
            busy_since: (0..threads).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub(super) fn driven(&self) -> &Arc<Driven> {
        &self.driven
    }

    fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64 + 1
    }

    /// Whether thread `index` may take work: thread 0 always, thread `n` while every thread
    /// before it is stuck in a connection's events.
    fn may_work(&self, index: usize) -> bool {
        if index == 0 {
            return true;
        }
        let now = self.now_ms();
        self.busy_since[..index].iter().all(|since| {
            let since = since.load(Ordering::Acquire);
            since != 0 && now.saturating_sub(since) > STUCK.as_millis() as u64
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn add(state: &mut State, event: Event) {
        let conn = super::server::event_conn(&event);
        let pending = state.pending.entry(conn).or_default();
        let was_idle = pending.events.is_empty() && !pending.running;
        pending.events.push_back(event);
        if was_idle {
            state.ready.push_back(conn);
        }
    }

    /// Moves what the server has queued into the per-connection queues.
    fn sort_queued(&self, state: &mut State) {
        for event in self.events.try_iter().take(DISPATCH_BATCH) {
            Self::add(state, event);
        }
    }

    /// Moves the events of the next ready connection into `batch` and marks it as running;
    /// with whether they end with its `Disconnected` event.
    ///
    /// NOTE: the connection's queue keeps its memory (drained, not removed) until its
    /// `Disconnected` event, so steady traffic allocates nothing here.
    fn take(&self, batch: &mut Vec<Event>) -> Option<(u64, bool)> {
        let mut state = self.lock();
        self.sort_queued(&mut state);
        let conn = state.ready.pop_front()?;
        let pending = state.pending.get_mut(&conn)?;
        batch.extend(pending.events.drain(..));
        pending.running = true;
        state.running += 1;
        Some((
            conn,
            matches!(batch.last(), Some(Event::Disconnected { .. })),
        ))
    }

    /// A thread is done with `conn`: forgotten once it has `ended`, ready again if more events
    /// came meanwhile.
    fn finish(&self, conn: u64, ended: bool) {
        let mut state = self.lock();
        state.running -= 1;
        if ended {
            state.pending.remove(&conn);
            return;
        }
        let Some(pending) = state.pending.get_mut(&conn) else {
            return;
        };
        pending.running = false;
        if !pending.events.is_empty() {
            state.ready.push_back(conn);
            self.ready_again.notify_one();
        }
    }

    fn ended(&self, state: &State) -> bool {
        self.events.is_disconnected()
            && self.events.is_empty()
            && state.running == 0
            && state
                .pending
                .values()
                .all(|pending| pending.events.is_empty())
    }

    /// Waits, without the GIL and answering signals, until a connection is ready; `false`
    /// once the server has ended and every event was handled.
    fn wait_ready(&self, py: Python<'_>, index: usize) -> PyResult<bool> {
        loop {
            {
                let mut state = self.lock();
                if self.ended(&state) {
                    return Ok(false);
                }
                if self.may_work(index) {
                    self.sort_queued(&mut state);
                    // Answers go out before more events are taken, so that they are not held
                    // back by a long run of events.
                    if !state.ready.is_empty() && !self.driven.has_answers() {
                        return Ok(true);
                    }
                }
            }
            let arrived = py.detach(|| {
                if !self.may_work(index) {
                    // A helper: look again now and then, in case the threads before it get
                    // stuck, without the GIL (a helper has no signals to check).
                    loop {
                        let state = self.lock();
                        if self.ended(&state) {
                            return None;
                        }
                        drop(self.ready_again.wait_timeout(state, STUCK));
                        if self.may_work(index) {
                            return None;
                        }
                    }
                }
                if self.events.is_disconnected() {
                    // Only events of connections that another thread is handling remain.
                    let state = self.lock();
                    drop(self.ready_again.wait_timeout(state, WAIT_SLICE));
                    return None;
                }
                // Serve the connections until one has an event. A helper comes back sooner,
                // to step aside once the threads before it are free again.
                let slice = if index == 0 { WAIT_SLICE } else { STUCK };
                let recv = self.events.recv_async();
                self.driven.run(recv, slice).and_then(Result::ok)
            });
            if let Some(event) = arrived {
                Self::add(&mut self.lock(), event);
            }
            py.check_signals()?;
        }
    }
}

thread_local! {
    /// Set on a thread while it is a dispatcher, so that a call from a handler can tell.
    static DISPATCHING: Cell<bool> = const { Cell::new(false) };
}

/// Whether this thread is a dispatcher: the caller is a handler.
pub(super) fn in_handler() -> bool {
    DISPATCHING.with(Cell::get)
}

/// Marks this thread as a dispatcher until dropped.
struct Dispatching;

impl Dispatching {
    fn enter() -> Dispatching {
        DISPATCHING.with(|flag| flag.set(true));
        Dispatching
    }
}

impl Drop for Dispatching {
    fn drop(&mut self) {
        DISPATCHING.with(|flag| flag.set(false));
    }
}

/// When a dispatcher leaves before the end (a `KeyboardInterrupt` from a handler, say), the
/// threads after it must not wait for it: it counts as stuck from then on, so the next one takes
/// over the events that remain.
struct Leaving<'a> {
    scheduler: &'a Scheduler,
    index: usize,
}

impl Drop for Leaving<'_> {
    fn drop(&mut self) {
        // 1: busy since the scheduler's beginning, so stuck for longer than STUCK already.
        self.scheduler.busy_since[self.index].store(1, Ordering::Release);
        self.scheduler.ready_again.notify_all();
    }
}

/// Releases a connection when its events are handled, even if a handler raised.
struct Release<'a> {
    scheduler: &'a Scheduler,
    conn: u64,
    ended: bool,
    index: usize,
}

impl Drop for Release<'_> {
    fn drop(&mut self) {
        self.scheduler.busy_since[self.index].store(0, Ordering::Release);
        self.scheduler.finish(self.conn, self.ended);
    }
}

/// Dispatcher thread `index`'s loop: handles events until the server has shut down and every
/// event is handled.
///
/// # Errors
/// The `KeyboardInterrupt` a handler or a signal raised.
pub(super) fn dispatch(
    py: Python<'_>,
    scheduler: &Scheduler,
    index: usize,
    handle: impl Fn(Python<'_>, Event) -> PyResult<()>,
) -> PyResult<()> {
    let _dispatching = Dispatching::enter();
    let _leaving = Leaving { scheduler, index };
    let mut batch = Vec::new();
    while scheduler.wait_ready(py, index)? {
        let mut handled = 0;
        while handled < DISPATCH_BATCH && scheduler.may_work(index) {
            let Some((conn, ended)) = scheduler.take(&mut batch) else {
                break;
            };
            scheduler.busy_since[index].store(scheduler.now_ms(), Ordering::Release);
            let _release = Release {
                scheduler,
                conn,
                ended,
                index,
            };
            for event in batch.drain(..) {
                handled += 1;
                handle(py, event)?;
            }
        }
    }
    Ok(())
}
