//! The Python bindings: the only code that names pyo3. Classes, exceptions, the shared runtime
//! and the GIL/signal handling live here; everything they do is the core's work.

mod aio;
mod client;
mod convert;
mod dispatch;
mod driven;
mod errors;
mod events;
mod exit;
mod ints;
mod json;
mod logging;
mod loop_runtime;
mod options;
mod poll_fd;
mod received;
mod runtime;
mod server;
mod tls;
mod transfer;
mod wakeup;
mod watchdog;

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::config::{
    default_max_buffered, ACK_REPLY, DEFAULT_HOST, DEFAULT_INBOUND_BYTES, DEFAULT_OUTBOUND_BYTES,
    DEFAULT_PORT,
};
use crate::frame::{DEFAULT_MAX_FRAME, PROTOCOL_VERSION};
use crate::transfer::DEFAULT_MAX_FILE_SIZE;

/// The bytes a server holds for its clients at most when ``max_buffered`` is None: a quarter
/// of the memory this process may use (the machine's, or its control group's limit), at least
/// 64 MiB.
#[pyfunction]
#[pyo3(name = "default_max_buffered")]
fn py_default_max_buffered() -> usize {
    default_max_buffered()
}

#[pymodule]
fn _socketcomm(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // Rust log records go to Python's `logging`, under the `socketcomm` logger (the core's
    // `server` module logs as `socketcomm.server`).
    logging::install(m.py())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("DEFAULT_HOST", DEFAULT_HOST)?;
    m.add("DEFAULT_PORT", DEFAULT_PORT)?;
    m.add("DEFAULT_MAX_FRAME", DEFAULT_MAX_FRAME)?;
    m.add("PROTOCOL_VERSION", PROTOCOL_VERSION)?;
    m.add("DEFAULT_MAX_FILE_SIZE", DEFAULT_MAX_FILE_SIZE)?;
    m.add("DEFAULT_INBOUND_BYTES", DEFAULT_INBOUND_BYTES)?;
    m.add("DEFAULT_OUTBOUND_BYTES", DEFAULT_OUTBOUND_BYTES)?;
    m.add_function(wrap_pyfunction!(py_default_max_buffered, m)?)?;
    m.add("ACK_REPLY", PyBytes::new(m.py(), ACK_REPLY))?;
    // The asyncio bridge runs its futures on the runtime everything else uses.
    let _ = pyo3_async_runtimes::tokio::init_with_runtime(runtime::runtime());
    exit::install(m)?;
    m.add_class::<server::PyServer>()?;
    m.add_class::<events::Connected>()?;
    m.add_class::<events::Message>()?;
    m.add_class::<events::AsyncMessage>()?;
    m.add_class::<events::Disconnected>()?;
    m.add_class::<events::SubscriptionRequest>()?;
    m.add_class::<transfer::FileReceived>()?;
    m.add_class::<tls::PyServerTls>()?;
    m.add_class::<tls::PyClientTls>()?;
    m.add_class::<tls::PyPeerIdentity>()?;
    m.add_class::<transfer::FileSent>()?;
    m.add_class::<transfer::TransferProgress>()?;
    m.add_class::<aio::Ready>()?;
    m.add_function(wrap_pyfunction!(aio::_connect, m)?)?;
    m.add_function(wrap_pyfunction!(aio::_deliver, m)?)?;
    m.add_class::<aio::AbortOnCancel>()?;
    m.add_class::<aio::Flush>()?;
    m.add_class::<loop_runtime::LoopRuntime>()?;
    m.add_class::<client::PyClient>()?;
    m.add_class::<received::Received>()?;
    errors::register(m)?;
    Ok(())
}
