//! The Python bindings: the only code that names pyo3. Classes, exceptions, the shared runtime
//! and the GIL/signal handling live here; everything they do is the core's work.

mod client;
mod convert;
mod errors;
mod runtime;
mod server;

use std::sync::OnceLock;

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::config::{ACK_REPLY, DEFAULT_HOST, DEFAULT_PORT};
use crate::frame::{DEFAULT_MAX_FRAME, PROTOCOL_VERSION};

static LOG_RESET: OnceLock<pyo3_log::ResetHandle> = OnceLock::new();

/// Makes Rust log records follow the current `logging` configuration: call it after changing
/// the level of a `socketcomm` logger at run time (levels are cached for speed).
#[pyfunction]
fn refresh_logging() {
    if let Some(reset) = LOG_RESET.get() {
        reset.reset();
    }
}

#[pymodule]
fn _socketcomm(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // Rust log records go to Python's `logging`, under the `socketcomm` logger (the core's
    // `server` module logs as `socketcomm._socketcomm.server`). An embedding application may
    // have installed a Rust logger already, which is fine.
    // NOTE: levels are cached, so that a log call on an I/O thread never waits for the GIL just
    // to learn that the record is disabled; `refresh_logging()` drops the cache.
    if let Ok(reset) = pyo3_log::Logger::new(m.py(), pyo3_log::Caching::LoggersAndLevels)?
        .set_prefix("socketcomm")
        .install()
    {
        let _ = LOG_RESET.set(reset);
    }
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("DEFAULT_HOST", DEFAULT_HOST)?;
    m.add("DEFAULT_PORT", DEFAULT_PORT)?;
    m.add("DEFAULT_MAX_FRAME", DEFAULT_MAX_FRAME)?;
    m.add("PROTOCOL_VERSION", PROTOCOL_VERSION)?;
    m.add("ACK_REPLY", PyBytes::new(m.py(), ACK_REPLY))?;
    m.add_function(wrap_pyfunction!(refresh_logging, m)?)?;
    m.add_class::<server::PyServer>()?;
    m.add_class::<server::Connected>()?;
    m.add_class::<server::Message>()?;
    m.add_class::<server::Disconnected>()?;
    m.add_class::<client::PyClient>()?;
    errors::register(m)?;
    Ok(())
}
