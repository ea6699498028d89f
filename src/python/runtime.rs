//! The process-wide tokio runtime, and the one way Python threads wait on it: released from the
//! GIL, in slices of about 100 ms with a check for Ctrl-C between them.

use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use pyo3::prelude::*;
use tokio::runtime::{Handle, Runtime};

/// How often a blocked call wakes to let `KeyboardInterrupt` (and other signals) through.
const SIGNAL_CHECK: Duration = Duration::from_millis(100);

static RUNTIME: OnceLock<Runtime> = OnceLock::new();

/// The process that built the runtime. A child forked after that has the runtime's memory but
/// none of its threads, and shares its epoll instance and wake-up descriptors with the parent.
static RUNTIME_PID: OnceLock<u32> = OnceLock::new();

/// Whether this process was forked after socketcomm ran in its parent.
pub(crate) fn forked() -> bool {
    RUNTIME_PID
        .get()
        .is_some_and(|pid| *pid != std::process::id())
}

/// Refuses to work in a process forked after socketcomm ran.
///
/// NOTE: such a child cannot use the inherited runtime (its threads do not exist there), and
/// driving it would take readiness events from the epoll instance the parent shares, so the
/// parent's connections would hang. A clear error in the child leaves the parent alone.
///
/// # Errors
/// `RuntimeError` in such a child.
pub(crate) fn refuse_if_forked() -> PyResult<()> {
    if forked() {
        return Err(pyo3::exceptions::PyRuntimeError::new_err(
            "socketcomm cannot be used in a process forked after it ran in the parent (its \
             network threads do not exist here); start the process with the 'spawn' or \
             'forkserver' method (multiprocessing.get_context('spawn')), or use socketcomm \
             only after forking",
        ));
    }
    Ok(())
}

/// The runtime every server and client of this process shares, built on first use.
pub(crate) fn runtime() -> &'static Runtime {
    RUNTIME.get_or_init(|| {
        let _ = RUNTIME_PID.set(std::process::id());
        tokio::runtime::Builder::new_multi_thread()
            .thread_name("socketcomm-io")
            .enable_all()
            .build()
            .expect("cannot start the tokio runtime")
    })
}

/// Drives `future` on the runtime from a Python thread, without the GIL, until it completes or
/// `timeout` passes (`Ok(None)`). A future that is ready at once completes without releasing
/// the GIL. Signal handlers run between slices, so Ctrl-C raises
/// `KeyboardInterrupt` here within about 100 ms; the future is dropped then.
///
/// # Errors
/// Whatever a signal handler raises.
pub(crate) fn wait<F>(
    py: Python<'_>,
    future: F,
    timeout: Option<Duration>,
) -> PyResult<Option<F::Output>>
where
    F: Future + Send,
    F::Output: Send,
{
    wait_reporting(py, future, timeout, |_| Ok(()))
}

/// As [`wait`], calling `between` with the GIL after each slice the future did not complete in
/// (to report progress, say).
///
/// # Errors
/// Whatever a signal handler or `between` raises.
pub(crate) fn wait_reporting<F>(
    py: Python<'_>,
    future: F,
    timeout: Option<Duration>,
    between: impl FnMut(Python<'_>) -> PyResult<()>,
) -> PyResult<Option<F::Output>>
where
    F: Future + Send,
    F::Output: Send,
{
    let slice = |future: Pin<&mut F>, slice: Duration| {
        runtime().block_on(async { tokio::time::timeout(slice, future).await.ok() })
    };
    wait_in_slices(py, runtime().handle(), slice, future, timeout, between)
}

/// The waiting loop of [`wait_reporting`], with `run_slice` doing the waiting of one slice
/// (released from the GIL) in the context of `handle`: blocking on the shared runtime, or
/// driving a server's own (`driven.rs`).
///
/// # Errors
/// Whatever a signal handler or `between` raises.
pub(crate) fn wait_in_slices<F>(
    py: Python<'_>,
    handle: &Handle,
    run_slice: impl Fn(Pin<&mut F>, Duration) -> Option<F::Output> + Sync,
    future: F,
    timeout: Option<Duration>,
    mut between: impl FnMut(Python<'_>) -> PyResult<()>,
) -> PyResult<Option<F::Output>>
where
    F: Future + Send,
    F::Output: Send,
{
    let deadline = timeout.map(|timeout| Instant::now() + timeout);
    let mut future = std::pin::pin!(future);
    // NOTE: the fast path. A message already queued, or room in a send queue, completes on the
    // first poll: no GIL release, no trip through the runtime.
    {
        let _context = handle.enter();
        let mut context = Context::from_waker(Waker::noop());
        if let Poll::Ready(done) = future.as_mut().poll(&mut context) {
            return Ok(Some(done));
        }
    }
    loop {
        let slice = match deadline {
            Some(deadline) => deadline
                .saturating_duration_since(Instant::now())
                .min(SIGNAL_CHECK),
            None => SIGNAL_CHECK,
        };
        let done = py.detach(|| run_slice(future.as_mut(), slice));
        if done.is_some() {
            return Ok(done);
        }
        py.check_signals()?;
        between(py)?;
        if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
            return Ok(None);
        }
    }
}

/// The longest duration any option takes: a year. Beyond it a deadline could overflow the
/// clock (`Instant` plus 1e19 s panics), and no timeout of a network program means that much:
/// `None` is how an optional timeout says "no limit".
pub(crate) const MAX_SECONDS: f64 = 365.0 * 24.0 * 3600.0;

/// Converts a Python duration in seconds into a duration.
///
/// # Errors
/// `ValueError` naming `option` for a negative, non-finite or huge number.
pub(crate) fn duration_from_secs(option: &str, seconds: f64) -> PyResult<Duration> {
    checked_secs(option, seconds, "")
}

fn checked_secs(option: &str, seconds: f64, or_none: &str) -> PyResult<Duration> {
    if (0.0..=MAX_SECONDS).contains(&seconds) {
        return Ok(Duration::from_secs_f64(seconds));
    }
    Err(pyo3::exceptions::PyValueError::new_err(format!(
        "invalid {option}: {seconds} seconds; use a number from 0 to {MAX_SECONDS:.0} (a \
         year){or_none}"
    )))
}

/// Converts a Python timeout in seconds (`None` for no limit) into a duration.
///
/// # Errors
/// `ValueError` naming `option` for a negative, non-finite or huge number.
pub(crate) fn timeout_from_secs(option: &str, seconds: Option<f64>) -> PyResult<Option<Duration>> {
    seconds
        .map(|s| checked_secs(option, s, ", or None to wait without limit"))
        .transpose()
}
