//! The runtime an event-mode server's connections run on: a current-thread tokio runtime that the
//! server's own Python threads drive while they wait for events (the handler dispatchers, a pull
//! loop, `close()`), so that a message is read, handled and answered on one thread, with no
//! hand-off to another thread and back (each hand-off is the wake-up of a parked thread, which
//! cost more than the Python handler itself). An asyncio loop drives one too, in short turns
//! (`Driven::turn`) whenever the runtime's descriptor is readable: an `aio.Server`'s, and the
//! one its clients run on (`loop_runtime.rs`).
//!
//! The rule that keeps Python off the I/O: Python runs only on the server's Python threads, and
//! never inside this runtime. A thread leaves the runtime with the events that are ready before
//! it runs Python on them, so the runtime is free for another thread to drive while a handler
//! runs. While no Python thread drives it for [`HANDOFF`], a caretaker thread does (one that
//! never touches Python), so that connections are served (hellos answered, replies written,
//! files received) whatever the application is doing, and it steps aside as soon as a Python
//! thread comes back to drive.
//!
//! NOTE: nothing here relies on the GIL. The runtime's core is taken by one thread at a time by
//! tokio itself, so the design holds on the free-threaded build too.

use std::future::Future;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use pyo3::prelude::*;
use tokio::runtime::{Handle, Runtime};

use super::runtime::{wait, wait_in_slices};
use crate::server::{Message, Reservation, Reserved};
use crate::sync::lock;

/// How long the runtime may go without a Python thread driving it before the caretaker does.
/// Short enough that a reply written by a thread that then goes off to do something else is sent
/// within milliseconds; long enough that a dispatcher running a batch of handlers (which takes
/// microseconds) is never relieved by it.
pub(crate) const HANDOFF: Duration = Duration::from_millis(10);

/// How many times a turn on a loop's thread lets the runtime run out of work before it hands
/// back to the loop anyway (a flood of messages must not keep the loop from its Python).
const TURN_ROUNDS: usize = 8;

/// How often the caretaker, while it drives, checks whether the server has ended.
const CARETAKER_CHECK: Duration = Duration::from_millis(100);

/// A current-thread runtime that the threads of one server take turns driving.
pub(crate) struct Driven {
    shared: Arc<Shared>,
}

struct Shared {
    /// `None` only while being dropped.
    runtime: Option<Runtime>,
    /// Python threads in [`Driven::run`]: driving the runtime, or waiting for it.
    drivers: AtomicUsize,
    base: Instant,
    /// When a Python thread last left the runtime, in milliseconds since `base`.
    left_at: AtomicU64,
    /// Wakes the caretaker's turn so that it steps aside for a Python thread.
    caretaker_turn: AtomicWaker,
    /// Set while the caretaker drives the runtime.
    caretaking: AtomicBool,
    /// Answers with their place in their connection's queue taken, to queue from inside the
    /// runtime when a thread next drives it.
    answers: Mutex<Vec<Reserved>>,
    /// Tells a loop's turn when the runtime has nothing left to do; holds the descriptor the
    /// runtime waits on.
    quiet: Arc<Quiet>,
}

/// How a turn on a loop's thread learns that the runtime has run out of work: tokio calls
/// [`Quiet::parking`] whenever its run queue is empty, before it waits for the sockets. If the
/// runtime's descriptor then has nothing to report either, the turn may end. (Ending it on any
/// other signal would leave behind the tasks that the runtime's last look at the sockets woke,
/// with nothing to make the loop come back for them.)
#[derive(Default)]
struct Quiet {
    /// Set while a turn waits for the runtime to run out of work.
    turning: AtomicBool,
    /// Set by `parking` when it found the runtime out of work.
    reached: AtomicBool,
    turn: AtomicWaker,
    /// The descriptor the runtime waits on (`poll_fd.rs`), or -1 where it is not known. Set
    /// once, right after the runtime is built (tokio takes the hook before that).
    poll_fd: AtomicI32,
}

impl Quiet {
    /// tokio's `on_thread_park`: the run queue is empty. The turn waiting for it is woken
    /// (from the runtime's own thread: no system call), and told whether the runtime's
    /// descriptor has anything to report: with nothing, it ends; with something, the runtime
    /// takes it and the tasks it wakes run before the next call.
    fn parking(&self) {
        if !self.turning.load(Ordering::SeqCst) {
            return;
        }
        let fd = self.poll_fd.load(Ordering::SeqCst);
        if fd < 0 || !has_events(fd) {
            self.reached.store(true, Ordering::SeqCst);
        }
        // Woken, the turn keeps the runtime from waiting: it looks at the sockets without
        // waiting, then polls the turn, which ends now or lets the woken tasks run first.
        self.turn.wake();
    }
}

/// Whether `fd` is readable now (without waiting).
fn has_events(fd: RawFd) -> bool {
    let mut poll = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, a timeout of zero.
    unsafe { libc::poll(&mut poll, 1, 0) > 0 }
}

impl Shared {
    fn runtime(&self) -> &Runtime {
        self.runtime.as_ref().expect("dropped only at the end")
    }

    fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }

    fn queue_answers(&self) {
        let answers = std::mem::take(&mut *lock(&self.answers));
        for answer in answers {
            answer.send();
        }
    }

    /// Whether a thread drives the runtime now (or waits to), so that an answer kept for later
    /// might wait for that thread's next turn.
    fn is_driven(&self) -> bool {
        self.drivers.load(Ordering::SeqCst) > 0 || self.caretaking.load(Ordering::SeqCst)
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Never block here: the last owner may be anywhere, even inside another runtime.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Driven {
    /// A new runtime, and its caretaker, which serves it until `ended()` holds.
    ///
    /// # Errors
    /// `RuntimeError` when the runtime or the caretaker thread cannot be started.
    pub(crate) fn new(ended: impl Fn() -> bool + Send + 'static) -> PyResult<Driven> {
        let quiet = Arc::new(Quiet::default());
        let parking = Arc::clone(&quiet);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .on_thread_park(move || parking.parking())
            .build()
            .map_err(|e| {
                pyo3::exceptions::PyRuntimeError::new_err(format!(
                    "cannot start the connections' runtime: {e}"
                ))
            })?;
        let poll_fd = super::poll_fd::find(&runtime).unwrap_or(-1);
        quiet.poll_fd.store(poll_fd, Ordering::SeqCst);
        let shared = Arc::new(Shared {
            quiet,
            runtime: Some(runtime),
            drivers: AtomicUsize::new(0),
            base: Instant::now(),
            left_at: AtomicU64::new(0),
            caretaker_turn: AtomicWaker::new(),
            caretaking: AtomicBool::new(false),
            answers: Mutex::new(Vec::new()),
        });
        // Detached: it ends by itself once the server has ended, and nothing waits for it (a
        // server dropped unclosed is shut down by its owner, and the caretaker then finishes
        // serving its connections).
        let caretaking = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("socketcomm-serve".to_owned())
            .spawn(move || caretake(&caretaking, ended))
            .map_err(|e| {
                pyo3::exceptions::PyRuntimeError::new_err(format!(
                    "cannot start the connections' caretaker thread: {e}"
                ))
            })?;
        Ok(Driven { shared })
    }

    pub(crate) fn handle(&self) -> &Handle {
        self.shared.runtime().handle()
    }

    /// Answers `message` with `body`. With room in the connection's queue, the answer takes
    /// its place there now and is queued when this thread next drives the runtime (or at once
    /// when another thread drives it now); with none, this waits for room, released from the
    /// GIL, after queueing every answer kept so far (so that answers keep their order).
    ///
    /// # Errors
    /// As [`Message::reply`] (the connection ended, or the answer is larger than the client
    /// accepts), and whatever a signal handler raises while waiting.
    pub(crate) fn reply(&self, py: Python<'_>, message: &Message, body: Bytes) -> PyResult<()> {
        let shared = &*self.shared;
        match message.reserve_reply(body)? {
            Reservation::Placed(answer) => {
                lock(&shared.answers).push(answer);
                // SeqCst, paired with the drivers' entry: either a thread that enters now
                // finds the answer, or this sees that thread and queues the answer itself.
                if shared.is_driven() {
                    shared.queue_answers();
                }
            }
            Reservation::Full(answer) => {
                shared.queue_answers();
                let message = message.clone();
                wait(py, async move { message.send_reply(answer).await }, None)?
                    .expect("waits without a timeout")?;
            }
        }
        Ok(())
    }

    /// Keeps `answer` (its place in the queue taken) until [`Driven::queue_kept`], which the
    /// caller arranges for soon: the asyncio API, once per turn of its loop.
    pub(crate) fn keep(&self, answer: Reserved) {
        lock(&self.shared.answers).push(answer);
    }

    /// Queues every kept answer; from inside the runtime, waking their tasks costs nothing.
    pub(crate) fn queue_kept(&self) {
        self.shared.queue_answers();
    }

    /// Whether answers wait to be queued.
    pub(crate) fn has_answers(&self) -> bool {
        !lock(&self.shared.answers).is_empty()
    }

    /// The descriptor that is readable while the runtime has I/O to do (or a task woken from
    /// another thread): an asyncio loop that watches it and calls [`Driven::turn`] then serves
    /// the connections on its own thread. `None` where it cannot be found (`poll_fd.rs`).
    pub(crate) fn poll_fd(&self) -> Option<RawFd> {
        Some(self.shared.quiet.poll_fd.load(Ordering::SeqCst)).filter(|fd| *fd >= 0)
    }

    /// One turn of the runtime on this thread, for an asyncio loop: queues the answers kept,
    /// runs every task that is ready (the connections write those answers), takes what the
    /// sockets have (without waiting), and runs the tasks that woke; then returns. `false`,
    /// doing nothing, while a Python thread drives the runtime already (its turns do the
    /// same, and the wake-up socket tells the loop of the events).
    ///
    /// NOTE: called with the GIL held: the turn runs no Python and waits for nothing but the
    /// runtime's core, which only the caretaker can hold here (it steps aside at once).
    /// Releasing and taking back the GIL around each turn would cost more than the turn when
    /// another thread wants the GIL.
    pub(crate) fn turn(&self) -> bool {
        self.turn_after(|| ()).is_some()
    }

    /// Spawns `task` from a turn of the runtime on this thread (an asyncio loop's), and lets it
    /// run at once: a request is written before this returns, and waking the runtime from
    /// outside (a write to its event descriptor, and one more turn of the loop) is saved.
    /// While a Python thread drives the runtime already, it is spawned for that thread to run.
    pub(crate) fn spawn_now<F>(&self, task: F) -> tokio::task::AbortHandle
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let mut task = Some(task);
        if let Some(spawned) =
            self.turn_after(|| tokio::spawn(task.take().expect("spawned once")).abort_handle())
        {
            return spawned;
        }
        let task = task.expect("a turn that did not run spawned nothing");
        self.handle().spawn(task).abort_handle()
    }

    /// A turn of the runtime on this thread: queues the kept answers, runs `first` inside the
    /// runtime, then lets it run until it is out of work (`Quiet`), or for at most
    /// [`TURN_ROUNDS`] rounds; `None`, running nothing, while a Python thread drives the
    /// runtime already.
    fn turn_after<R>(&self, first: impl FnOnce() -> R) -> Option<R> {
        let shared = &*self.shared;
        if shared.drivers.load(Ordering::SeqCst) > 0 {
            return None;
        }
        shared.drivers.fetch_add(1, Ordering::SeqCst);
        shared.caretaker_turn.wake();
        // NOTE: the caretaker steps aside at once; this waits for it, so that the turn runs on
        // the runtime's core itself. A `block_on` that has to wait for the core meanwhile polls
        // its future outside the runtime, and would return without running the tasks.
        while shared.caretaking.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        let quiet = &*shared.quiet;
        let mut rounds = 0;
        let (done, out_of_work) = shared.runtime().block_on(async {
            shared.queue_answers();
            let done = first();
            quiet.reached.store(false, Ordering::SeqCst);
            quiet.turning.store(true, Ordering::SeqCst);
            let out_of_work = std::future::poll_fn(|cx| {
                quiet.turn.register(cx.waker());
                if quiet.reached.swap(false, Ordering::SeqCst) {
                    return Poll::Ready(true);
                }
                rounds += 1;
                if rounds > TURN_ROUNDS {
                    // A flood: hand back to the loop, which comes back for the rest.
                    return Poll::Ready(false);
                }
                // Polled again when tokio next finds its queue empty (`Quiet::parking`).
                Poll::Pending
            })
            .await;
            quiet.turning.store(false, Ordering::SeqCst);
            (done, out_of_work)
        });
        if !out_of_work {
            // Woken from outside the runtime, it becomes readable: the loop turns again.
            drop(self.handle().spawn(async {}));
        }
        shared.left_at.store(shared.now_ms(), Ordering::Release);
        shared.drivers.fetch_sub(1, Ordering::SeqCst);
        Some(done)
    }

    /// Drives the runtime on this thread (which must not hold the GIL) until `future` completes
    /// or `slice` passes (`None`). While another thread drives it, this one waits for its turn,
    /// and `future` still completes as soon as it can.
    pub(crate) fn run<F: Future>(&self, future: F, slice: Duration) -> Option<F::Output> {
        let shared = &*self.shared;
        shared.drivers.fetch_add(1, Ordering::SeqCst);
        shared.caretaker_turn.wake();
        let done = shared.runtime().block_on(async {
            shared.queue_answers();
            tokio::time::timeout(slice, future).await.ok()
        });
        shared.left_at.store(shared.now_ms(), Ordering::Release);
        shared.drivers.fetch_sub(1, Ordering::SeqCst);
        done
    }

    /// Drives the runtime from a Python thread until `future` completes or `timeout` passes
    /// (`Ok(None)`), released from the GIL, with a check for signals every 100 ms (Ctrl-C
    /// raises `KeyboardInterrupt` here; the future is dropped then). A future that is ready at
    /// once completes without releasing the GIL.
    ///
    /// # Errors
    /// Whatever a signal handler raises.
    pub(crate) fn drive<F>(
        &self,
        py: Python<'_>,
        future: F,
        timeout: Option<Duration>,
    ) -> PyResult<Option<F::Output>>
    where
        F: Future + Send,
        F::Output: Send,
    {
        let slice = |future: Pin<&mut F>, slice: Duration| self.run(future, slice);
        wait_in_slices(py, self.handle(), slice, future, timeout, |_| Ok(()))
    }
}

/// The caretaker's loop: drives the runtime whenever no Python thread has for [`HANDOFF`], until
/// the server has ended.
fn caretake(shared: &Shared, ended: impl Fn() -> bool) {
    loop {
        std::thread::sleep(HANDOFF / 2);
        if ended() {
            return;
        }
        let idle = shared.drivers.load(Ordering::SeqCst) == 0
            && shared
                .now_ms()
                .saturating_sub(shared.left_at.load(Ordering::Acquire))
                >= HANDOFF.as_millis() as u64;
        if !idle {
            continue;
        }
        // Drive until a Python thread wants the runtime back, checking now and then whether the
        // server has ended.
        shared.caretaking.store(true, Ordering::SeqCst);
        while !ended() {
            let stepped_aside = shared.runtime().block_on(async {
                shared.queue_answers();
                let wanted = std::future::poll_fn(|cx| {
                    shared.caretaker_turn.register(cx.waker());
                    if shared.drivers.load(Ordering::SeqCst) > 0 {
                        Poll::Ready(())
                    } else {
                        Poll::Pending
                    }
                });
                tokio::time::timeout(CARETAKER_CHECK, wanted).await.is_ok()
            });
            if stepped_aside {
                break;
            }
        }
        shared.caretaking.store(false, Ordering::SeqCst);
    }
}
