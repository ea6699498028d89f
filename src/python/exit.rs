//! Keeping our own threads off the interpreter once it starts to shut down.
//!
//! A thread that is not a Python thread and takes the GIL after `Py_FinalizeEx` has begun is
//! killed inside CPython (`PyGILState_Release: thread state ... must be current`, an abort, or
//! a segfault in Rust frames). It happened here in about one exit in twenty after asyncio use,
//! and it is the open issue PyO3/pyo3-async-runtimes#40. So every thread of ours that attaches
//! to Python (the asyncio completer, the log forwarder, the handler dispatchers) does it through
//! [`with_python`], and an `atexit` callback, which runs while the interpreter is still whole,
//! closes the gate: it waits for the threads inside to leave and lets no one in again.

use std::sync::{Mutex, PoisonError, RwLock};

use pyo3::prelude::*;

/// `true` once the interpreter is exiting. Readers are threads inside Python.
static GATE: RwLock<bool> = RwLock::new(false);

/// Work to stop before the gate closes (the dispatcher threads of servers never closed): each
/// stops its thread and waits for it to end.
type Stopper = Box<dyn FnOnce() + Send>;
static STOPPERS: Mutex<Vec<Stopper>> = Mutex::new(Vec::new());

/// Runs `f` attached to Python, unless the interpreter is exiting (then `None`).
pub(crate) fn with_python<T>(f: impl for<'py> FnOnce(Python<'py>) -> T) -> Option<T> {
    let exiting = GATE.read().unwrap_or_else(PoisonError::into_inner);
    if *exiting {
        return None;
    }
    let out = Python::attach(f);
    drop(exiting);
    Some(out)
}

/// Registers work to stop, and wait for, at exit.
pub(crate) fn stop_at_exit(stop: Stopper) {
    STOPPERS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(stop);
}

/// How long exit waits for the log records still queued to reach `logging`.
const LOG_FLUSH: std::time::Duration = std::time::Duration::from_secs(1);

/// The `atexit` callback: stops registered threads, lets the queued log records through, then
/// closes the gate.
#[pyfunction]
pub(crate) fn _at_exit(py: Python<'_>) {
    let stoppers = std::mem::take(&mut *STOPPERS.lock().unwrap_or_else(PoisonError::into_inner));
    if super::runtime::forked() {
        // A forked child: the threads these would wait for are the parent's, not here.
        std::mem::forget(stoppers);
        *GATE.write().unwrap_or_else(PoisonError::into_inner) = true;
        return;
    }
    py.detach(|| {
        for stop in stoppers {
            stop();
        }
        // The forwarding thread still gets in while the gate is open.
        super::logging::wait_forwarded(LOG_FLUSH);
        *GATE.write().unwrap_or_else(PoisonError::into_inner) = true;
    });
}

pub(crate) fn install(module: &Bound<'_, PyModule>) -> PyResult<()> {
    let at_exit = wrap_pyfunction!(_at_exit, module)?;
    module
        .py()
        .import("atexit")?
        .call_method1("register", (at_exit,))?;
    Ok(())
}
