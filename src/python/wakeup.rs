//! How an `aio.Server`'s events reach its asyncio loop. Where the connections' runtime has a
//! descriptor to watch (`poll_fd.rs`), the loop watches it and serves the connections itself
//! when it is readable (`Driven::turn`): a message is read, handled and answered on the loop's
//! thread. Whenever another thread serves them instead (the caretaker, while the loop is busy
//! with other work, or everywhere the descriptor cannot be found), the events reach the loop
//! through a socket pair whose reading end the loop watches (`loop.add_reader`), written to by
//! a task on the connections' runtime, once per batch of events and only while the loop waits
//! for one. Python is never entered from that task.
//!
//! The answers of a batch go out the same way round: `AsyncMessage.reply` takes the answer's
//! place in its connection's queue and keeps it (`Driven::keep`); the loop calls `_flush` once
//! per turn (scheduled with `call_soon` by the first answer of the turn), which runs a turn of
//! the runtime on the loop's thread (the connections write the answers), or, where the loop
//! does not serve the connections, pokes the task to queue the answers from inside the runtime.

use std::cell::RefCell;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;

use futures_util::task::AtomicWaker;
use pyo3::prelude::*;
use tokio::runtime::Handle;

use super::driven::Driven;
use crate::server::Server;

/// Work for the loop's thread, with the GIL: setting an asyncio future's outcome.
pub(crate) type Job = Box<dyn FnOnce(Python<'_>) + Send>;

/// A non-blocking socket pair: the loop watches the reading end, tasks write one byte to wake
/// it.
struct Pair {
    reader: UnixStream,
    writer: UnixStream,
}

impl Pair {
    fn new() -> std::io::Result<Pair> {
        let (reader, writer) = UnixStream::pair()?;
        reader.set_nonblocking(true)?;
        writer.set_nonblocking(true)?;
        Ok(Pair { reader, writer })
    }

    fn wake(&self) {
        // A full socket already holds a wake-up the loop has not read yet.
        let _ = (&self.writer).write(&[1]);
    }

    fn drain(&self) {
        let mut sink = [0u8; 64];
        while matches!((&self.reader).read(&mut sink), Ok(n) if n > 0) {}
    }
}

/// Where the tasks of an `aio.Client` hand their outcomes to its loop, as [`Wakeup`] does for a
/// server's events: the task queues a [`Job`] and writes a byte (once per batch), and the loop's
/// reader runs the jobs on its own thread, where it holds the GIL anyway. A request's round
/// trip then crosses threads twice (the loop to the connection's task, and back) instead of
/// also passing through the completer thread and its turn at the GIL.
pub(crate) struct Completions {
    pair: Pair,
    jobs: Mutex<Vec<Job>>,
    /// Set once a byte is written for the queued jobs, until the loop runs them.
    signalled: AtomicBool,
}

impl Completions {
    /// # Errors
    /// When the socket pair cannot be made (out of descriptors).
    pub(crate) fn new() -> std::io::Result<Arc<Completions>> {
        Ok(Arc::new(Completions {
            pair: Pair::new()?,
            jobs: Mutex::new(Vec::new()),
            signalled: AtomicBool::new(false),
        }))
    }

    pub(crate) fn fd(&self) -> i32 {
        self.pair.reader.as_raw_fd()
    }

    /// From a task: hands `job` to the loop. A task that runs in a turn of its runtime on the
    /// loop's own thread ([`turning`]) writes no byte: the loop runs the job right after the
    /// turn.
    pub(crate) fn push(self: &Arc<Self>, job: Job) {
        self.jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(job);
        let noted = TURNING.with(|turning| match turning.borrow_mut().as_mut() {
            Some(noted) => {
                if !noted.iter().any(|c| Arc::ptr_eq(c, self)) {
                    noted.push(Arc::clone(self));
                }
                true
            }
            None => false,
        });
        if !noted && !self.signalled.swap(true, Ordering::SeqCst) {
            self.pair.wake();
        }
    }

    /// On the loop's thread, when the socket is readable or after a turn: runs every job
    /// handed over.
    pub(crate) fn run(&self, py: Python<'_>) {
        // A byte is there only while the flag is set. The bytes read first, then the flag
        // cleared: a job queued from then on writes a byte of its own (cleared before the
        // read, that byte could be read here while the flag stayed set, and no later job
        // would write one).
        if self.signalled.load(Ordering::SeqCst) {
            self.pair.drain();
            self.signalled.store(false, Ordering::SeqCst);
        }
        let jobs = std::mem::take(&mut *self.jobs.lock().unwrap_or_else(PoisonError::into_inner));
        for job in jobs {
            job(py);
        }
    }
}

thread_local! {
    /// Set on a loop's thread while it turns its clients' runtime: the completions handed over
    /// meanwhile, to run when the turn is over.
    static TURNING: RefCell<Option<Vec<Arc<Completions>>>> = const { RefCell::new(None) };
}

/// Runs `turn` (a turn of a runtime) on the loop's thread, then the jobs that the tasks handed
/// over during it, with no byte written and read for them.
pub(crate) fn turning(py: Python<'_>, turn: impl FnOnce()) {
    let noting = Noting::begin();
    turn();
    for completions in noting.finish() {
        completions.run(py);
    }
}

/// Notes the completions handed over on this thread until finished; if the turn unwinds
/// instead, they are signalled through their sockets as usual, so none waits for a run that
/// never comes.
struct Noting;

impl Noting {
    fn begin() -> Noting {
        TURNING.with(|turning| *turning.borrow_mut() = Some(Vec::new()));
        Noting
    }

    fn finish(self) -> Vec<Arc<Completions>> {
        TURNING.with(|turning| turning.borrow_mut().take().unwrap_or_default())
    }
}

impl Drop for Noting {
    fn drop(&mut self) {
        let noted = TURNING.with(|turning| turning.borrow_mut().take().unwrap_or_default());
        for completions in noted {
            if !completions.signalled.swap(true, Ordering::SeqCst) {
                completions.pair.wake();
            }
        }
    }
}

/// One server's wake-up socket and the task that writes to it.
pub(crate) struct Wakeup {
    pair: Pair,
    /// Set by the loop when it waits for an event; the task writes once an event is there.
    armed: AtomicBool,
    /// Set by the loop to have the kept answers queued.
    flush: AtomicBool,
    /// Set once a `_flush` call is scheduled on the loop for the kept answers.
    flush_scheduled: AtomicBool,
    poke: AtomicWaker,
    /// The runtime the connections run on (an event-mode server's).
    driven: Option<Arc<Driven>>,
}

impl Wakeup {
    /// A wake-up socket for `server`, and its task, on `runtime`.
    ///
    /// # Errors
    /// When the socket pair cannot be made (out of descriptors).
    pub(crate) fn start(
        server: Arc<Server>,
        driven: Option<Arc<Driven>>,
        runtime: &Handle,
    ) -> std::io::Result<Arc<Wakeup>> {
        let wakeup = Arc::new(Wakeup {
            pair: Pair::new()?,
            armed: AtomicBool::new(false),
            flush: AtomicBool::new(false),
            flush_scheduled: AtomicBool::new(false),
            poke: AtomicWaker::new(),
            driven,
        });
        runtime.spawn(Arc::clone(&wakeup).serve(server));
        Ok(wakeup)
    }

    /// The descriptor the loop watches.
    pub(crate) fn fd(&self) -> i32 {
        self.pair.reader.as_raw_fd()
    }

    /// The loop waits for an event: write once one is there (at once if one already is).
    pub(crate) fn arm(&self) {
        // Once armed, the task stays armed until it writes: a loop that waits again before
        // then costs no wake-up of the task.
        if !self.armed.swap(true, Ordering::SeqCst) {
            self.poke.wake();
        }
    }

    /// Whether the caller should schedule a `_flush` (none is scheduled yet).
    pub(crate) fn needs_flush(&self) -> bool {
        !self.flush_scheduled.swap(true, Ordering::AcqRel)
    }

    /// Has the kept answers queued from inside the runtime: by a turn of it on this thread
    /// (the loop's), or by the task when the loop does not serve the connections itself or
    /// another thread drives them now.
    pub(crate) fn flush(&self) {
        self.flush_scheduled.store(false, Ordering::Release);
        // A loop that watches the runtime's descriptor serves the connections itself (see
        // `_Wakeup` in aio.py); one that does not leaves them to the task's runtime.
        let served_here = self
            .driven
            .as_ref()
            .is_some_and(|driven| driven.poll_fd().is_some() && driven.turn());
        if served_here {
            return;
        }
        self.flush.store(true, Ordering::SeqCst);
        self.poke.wake();
    }

    async fn serve(self: Arc<Self>, server: Arc<Server>) {
        loop {
            let armed = self.armed.load(Ordering::SeqCst);
            tokio::select! {
                biased;
                () = self.poked(armed) => {}
                () = server.event_ready(), if armed => {
                    self.armed.store(false, Ordering::SeqCst);
                    self.pair.wake();
                    if server.events().is_disconnected() && server.events().is_empty() {
                        break;
                    }
                }
            }
            if self.flush.swap(false, Ordering::SeqCst) {
                if let Some(driven) = &self.driven {
                    driven.queue_kept();
                }
            }
        }
    }

    /// Completes once the wake-up is no longer `armed` as it was when the caller looked, or the
    /// loop asked for a flush.
    async fn poked(&self, armed: bool) {
        std::future::poll_fn(|cx| {
            self.poke.register(cx.waker());
            let changed = self.armed.load(Ordering::SeqCst) != armed;
            if changed || self.flush.load(Ordering::SeqCst) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
    }
}
