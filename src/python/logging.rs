//! Rust log records to Python's `logging`, without Python on the I/O threads.
//!
//! pyo3-log maps records onto `logging` loggers, but calling it where the record is made would
//! run Python (and take the GIL, and `logging`'s locks) on a tokio worker. A thread that was
//! interrupted by a signal while holding `logging`'s lock then stalls the network loop for good
//! (seen here: a Ctrl-C during `log.info` left the lock taken and `close()` waiting for a worker
//! stuck in pyo3-log). So records are queued here, and one forwarding thread hands them to
//! pyo3-log, taking the GIL once per batch. A full queue drops records rather than wait.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::time::{Duration, Instant};

use log::{Level, LevelFilter, Log, Metadata, Record};
use pyo3::prelude::*;

use super::exit::with_python;

/// Records waiting for the forwarding thread; beyond this they are dropped.
const QUEUE: usize = 4096;

/// Records forwarded per GIL acquisition.
const BATCH: usize = 256;

/// Records queued, and records handed to `logging`, since the start: [`flush_logs`] waits for
/// the second to catch up with the first.
static QUEUED: AtomicU64 = AtomicU64::new(0);
static FORWARDED: AtomicU64 = AtomicU64::new(0);

struct QueuedRecord {
    level: Level,
    target: String,
    message: String,
}

struct ToForwarder {
    queue: SyncSender<QueuedRecord>,
}

impl Log for ToForwarder {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if self.enabled(record.metadata()) {
            let queued = self.queue.try_send(QueuedRecord {
                level: record.level(),
                target: public_target(record.target()),
                message: record.args().to_string(),
            });
            if queued.is_ok() {
                QUEUED.fetch_add(1, Ordering::Release);
            }
        }
    }

    fn flush(&self) {}
}

/// The logger a record goes to, under the `socketcomm` prefix pyo3-log adds: this crate's
/// modules by their public names (`server::handler` becomes `socketcomm.server.handler`, where
/// users configure `socketcomm.server`), not by the private extension module's.
fn public_target(target: &str) -> String {
    let ours = concat!(env!("CARGO_CRATE_NAME"), "::");
    target.strip_prefix(ours).unwrap_or(target).to_owned()
}

/// Installs the forwarding logger, unless a Rust logger is installed already (an embedding
/// application's, say).
pub(crate) fn install(py: Python<'_>) -> PyResult<()> {
    // Levels are not cached: the Python loggers decide on each record, so configuring `logging`
    // at any time just works. Records are per connection, never per message.
    let python = pyo3_log::Logger::new(py, pyo3_log::Caching::Loggers)?.set_prefix("socketcomm");
    let (queue, queued) = sync_channel(QUEUE);
    if log::set_boxed_logger(Box::new(ToForwarder { queue })).is_err() {
        return Ok(());
    }
    log::set_max_level(LevelFilter::Debug);
    std::thread::Builder::new()
        .name("socketcomm-log".into())
        .spawn(move || forward(&queued, &python))
        .map(drop)
        .map_err(|e| {
            pyo3::exceptions::PyRuntimeError::new_err(format!("cannot start the log thread: {e}"))
        })
}

fn forward(queued: &Receiver<QueuedRecord>, python: &pyo3_log::Logger) {
    while let Ok(first) = queued.recv() {
        let forwarded = with_python(|_py| {
            for record in std::iter::once(first).chain(queued.try_iter().take(BATCH - 1)) {
                python.log(
                    &Record::builder()
                        .level(record.level)
                        .target(&record.target)
                        .args(format_args!("{}", record.message))
                        .build(),
                );
                FORWARDED.fetch_add(1, Ordering::Release);
            }
        });
        if forwarded.is_none() {
            return; // the interpreter is exiting
        }
    }
}

/// Waits up to `timeout` until every record queued so far has reached `logging`; called (with
/// the GIL released) at exit, so that what the core logged just before the program ends (a
/// warning at start-up, a connection's end) is not lost with the forwarding thread.
pub(crate) fn wait_forwarded(timeout: Duration) {
    let target = QUEUED.load(Ordering::Acquire);
    let deadline = Instant::now() + timeout;
    while FORWARDED.load(Ordering::Acquire) < target && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
}
