//! The runtime that the `socketcomm.aio` clients of one asyncio loop run on, driven by that loop:
//! the loop watches the descriptor it waits on (`poll_fd.rs`) and runs a turn of it on its own
//! thread whenever it is readable, so a request is written, and its reply read and handed to
//! the awaiting task, on the loop's thread, with no other thread woken on the way. While the
//! loop does not turn it (busy in other code for more than 10 ms), its caretaker thread serves
//! the connections, as an event-mode server's does (`driven.rs`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use pyo3::prelude::*;

use super::driven::Driven;
use super::wakeup;

/// One loop's client runtime; it ends (its caretaker stops, and its connections close) once
/// neither the loop's `LoopRuntime` nor any client made on it holds it any more.
pub(crate) struct ClientRuntime {
    driven: Driven,
    ended: Arc<AtomicBool>,
}

impl ClientRuntime {
    pub(crate) fn driven(&self) -> &Driven {
        &self.driven
    }
}

impl Drop for ClientRuntime {
    fn drop(&mut self) {
        self.ended.store(true, Ordering::SeqCst);
    }
}

/// The runtime the clients of one asyncio loop run on (`socketcomm.aio` keeps one per loop).
#[pyclass(frozen, module = "socketcomm._socketcomm")]
pub(crate) struct LoopRuntime(Arc<ClientRuntime>);

impl LoopRuntime {
    pub(crate) fn runtime(&self) -> &Arc<ClientRuntime> {
        &self.0
    }
}

#[pymethods]
impl LoopRuntime {
    #[new]
    fn new() -> PyResult<LoopRuntime> {
        let ended = Arc::new(AtomicBool::new(false));
        let ending = Arc::clone(&ended);
        let driven = Driven::new(move || ending.load(Ordering::SeqCst))?;
        Ok(LoopRuntime(Arc::new(ClientRuntime { driven, ended })))
    }

    /// The descriptor that is readable while the clients' connections have work; None where
    /// it cannot be found (then the clients run on the shared runtime instead).
    fn _poll_fd(&self) -> Option<i32> {
        self.0.driven.poll_fd()
    }

    /// Serves the connections for one turn on this thread, and sets the outcomes of the
    /// awaitables that it completed; returns at once.
    fn _turn(&self, py: Python<'_>) {
        wakeup::turning(py, || {
            self.0.driven.turn();
        });
    }
}
