//! How an `aio.Server`'s events reach its asyncio loop: through a socket pair whose reading end
//! the loop watches (`loop.add_reader`), written to by a task on the runtime the connections run
//! on, once per batch of events and only while the loop waits for one. Python is never entered
//! from that task, and no other thread is involved: a batch of events costs one wake-up of the
//! loop, the write and the read of one byte. (An awaitable resolved by a tokio task instead
//! costs a hand-off to the completer thread, which must win the GIL from the loop's thread, and
//! then the loop's own wake-up pipe: three threads per batch.)
//!
//! The answers of a batch go out the same way round: `AsyncMessage.reply` takes the answer's
//! place in its connection's queue and keeps it (`Driven::keep`); the loop calls `_flush` once
//! per turn (scheduled with `call_soon` by the first answer of the turn), which pokes this task
//! to queue every kept answer from inside the runtime: one wake-up for the batch.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;

use futures_util::task::AtomicWaker;
use tokio::runtime::Handle;

use super::driven::Driven;
use crate::server::Server;

/// One server's wake-up socket and the task that writes to it.
pub(crate) struct Wakeup {
    reader: UnixStream,
    writer: UnixStream,
    /// Set by the loop when it waits for an event; the task writes once an event is there.
    armed: AtomicBool,
    /// Set by the loop to have the kept answers queued.
    flush: AtomicBool,
    /// Set once a `_flush` call is scheduled on the loop for the kept answers.
    flush_scheduled: AtomicBool,
    poke: AtomicWaker,
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
        let (reader, writer) = UnixStream::pair()?;
        reader.set_nonblocking(true)?;
        writer.set_nonblocking(true)?;
        let wakeup = Arc::new(Wakeup {
            reader,
            writer,
            armed: AtomicBool::new(false),
            flush: AtomicBool::new(false),
            flush_scheduled: AtomicBool::new(false),
            poke: AtomicWaker::new(),
        });
        runtime.spawn(Arc::clone(&wakeup).serve(server, driven));
        Ok(wakeup)
    }

    /// The descriptor the loop watches.
    pub(crate) fn fd(&self) -> i32 {
        self.reader.as_raw_fd()
    }

    /// The loop waits for an event: write once one is there (at once if one already is).
    pub(crate) fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
        self.poke.wake();
    }

    /// Whether the caller should schedule a `_flush` (none is scheduled yet).
    pub(crate) fn needs_flush(&self) -> bool {
        !self.flush_scheduled.swap(true, Ordering::AcqRel)
    }

    /// Has the kept answers queued from inside the runtime.
    pub(crate) fn flush(&self) {
        self.flush_scheduled.store(false, Ordering::Release);
        self.flush.store(true, Ordering::SeqCst);
        self.poke.wake();
    }

    async fn serve(self: Arc<Self>, server: Arc<Server>, driven: Option<Arc<Driven>>) {
        loop {
            let armed = self.armed.load(Ordering::SeqCst);
            tokio::select! {
                biased;
                () = self.poked(armed) => {}
                () = server.event_ready(), if armed => {
                    self.armed.store(false, Ordering::SeqCst);
                    // A full socket already holds a wake-up the loop has not read yet.
                    let _ = (&self.writer).write(&[1]);
                    if server.events().is_disconnected() && server.events().is_empty() {
                        break;
                    }
                }
            }
            if self.flush.swap(false, Ordering::SeqCst) {
                if let Some(driven) = &driven {
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
