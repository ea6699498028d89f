//! The native half of `socketcomm.aio`: awaitables for the asyncio API, bridged onto the shared
//! tokio runtime with pyo3-async-runtimes. `python/socketcomm/aio.py` builds the public classes
//! from these.
//!
//! Receiving is split in two so that cancellation never loses a message: `_readable()` waits,
//! without taking anything, until a message (or the end) is there, and `_try_recv()` takes it
//! synchronously on the event loop's thread. A task cancelled while waiting has taken nothing.
//! (Had the Rust future taken the message itself, a cancellation that lands after it completed
//! but before the asyncio future is resolved would drop the message.)

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::client::{client_config, PyClient};
use super::convert::payload;
use super::errors;
use super::events::{event_to_py, Flavour};
use super::runtime::timeout_from_secs;
use super::server::{exclusions, PyServer};
use crate::client::{Client, DEFAULT_CLOSE_GRACE};

/// An awaitable that is already complete (with None): what a call returns when its work was
/// done at once, so that the fast path costs no asyncio future and no task.
#[pyclass(frozen, module = "socketcomm._socketcomm")]
pub(crate) struct Ready;

#[pymethods]
impl Ready {
    fn __await__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self) -> Option<Py<PyAny>> {
        None
    }
}

pub(crate) fn ready(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    Ok(Bound::new(py, Ready)?.into_any())
}

/// Runs `future` on the shared runtime and returns an asyncio future for its result, bound to
/// the running event loop. Cancelling the asyncio future drops the Rust future.
pub(crate) fn spawn_awaitable<F, T>(py: Python<'_>, future: F) -> PyResult<Bound<'_, PyAny>>
where
    F: Future<Output = PyResult<T>> + Send + 'static,
    T: for<'py> IntoPyObject<'py> + Send + 'static,
{
    pyo3_async_runtimes::tokio::future_into_py(py, future)
}

/// A message payload handed to Python as `bytes`.
struct Payload(Bytes);

impl<'py> IntoPyObject<'py> for Payload {
    type Target = PyBytes;
    type Output = Bound<'py, PyBytes>;
    type Error = std::convert::Infallible;

    fn into_pyobject(self, py: Python<'py>) -> Result<Bound<'py, PyBytes>, Self::Error> {
        Ok(PyBytes::new(py, &self.0))
    }
}

/// Connects without blocking the event loop; the awaitable gives a `Client` whose `_*` methods
/// `socketcomm.aio.Client` uses.
#[pyfunction]
#[pyo3(signature = (
    host,
    port,
    *,
    timeout = None,
    connect_timeout = 10.0,
    raw = false,
    max_frame = crate::frame::DEFAULT_MAX_FRAME,
    nodelay = true,
))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn _connect(
    py: Python<'_>,
    host: String,
    port: u16,
    timeout: Option<f64>,
    connect_timeout: f64,
    raw: bool,
    max_frame: u32,
    nodelay: bool,
) -> PyResult<Bound<'_, PyAny>> {
    let timeout = timeout_from_secs("timeout", timeout)?;
    let config = client_config(connect_timeout, raw, max_frame, nodelay)?;
    spawn_awaitable(py, async move {
        let core = Client::connect(&host, port, config).await?;
        Ok(PyClient::new_connected(core, timeout))
    })
}

#[pymethods]
impl PyClient {
    /// The next message if one is waiting, else None; raises once the connection has ended.
    fn _try_recv<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyBytes>>> {
        Ok(self
            .core()
            .try_recv()?
            .map(|message| PyBytes::new(py, &message)))
    }

    /// Completes when `_try_recv` has a message or the end to report.
    fn _readable<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let core = Arc::clone(self.core());
        spawn_awaitable(py, async move {
            core.readable().await;
            Ok(())
        })
    }

    /// Queues a message if there is room; False when the queue is full.
    fn _try_send(&self, data: &Bound<'_, PyAny>) -> PyResult<bool> {
        Ok(self.core().try_send(payload(data)?)?)
    }

    /// Queues a message, waiting for room.
    fn _send<'py>(&self, py: Python<'py>, data: &Bound<'_, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let data = payload(data)?;
        let core = Arc::clone(self.core());
        spawn_awaitable(py, async move { Ok(core.send(data).await?) })
    }

    /// Sends a request; the awaitable gives the reply.
    fn _request<'py>(
        &self,
        py: Python<'py>,
        data: &Bound<'_, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let data = payload(data)?;
        let core = Arc::clone(self.core());
        spawn_awaitable(py, async move { Ok(Payload(core.request(data).await?)) })
    }

    /// Flushes, says goodbye and closes.
    fn _close<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let core = Arc::clone(self.core());
        spawn_awaitable(py, async move {
            core.close(DEFAULT_CLOSE_GRACE).await;
            Ok(())
        })
    }
}

#[pymethods]
impl PyServer {
    /// The next event (with an awaitable `reply`) if one is queued, else None; raises
    /// ConnectionClosedError once the server is closed and every event was read.
    fn _try_event(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        match self.core().try_event() {
            Ok(Some(event)) => Ok(Some(event_to_py(py, event, Flavour::Async)?)),
            Ok(None) => Ok(None),
            Err(()) => Err(errors::closed(
                py,
                "the server is closed and every event has been read",
            )),
        }
    }

    /// Completes when `_try_event` has an event or the end to report.
    fn _event_ready<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let core = Arc::clone(self.core());
        spawn_awaitable(py, async move {
            core.event_ready().await;
            Ok(())
        })
    }

    /// Sends to one connection, waiting for room in its queue.
    fn _send<'py>(
        &self,
        py: Python<'py>,
        conn_id: u64,
        data: &Bound<'_, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let data = payload(data)?;
        let Some(conn) = self.core().connection(conn_id) else {
            return Err(errors::closed(
                py,
                &format!("there is no connection {conn_id}: it has ended, or never existed"),
            ));
        };
        if conn.try_send(data.clone())? {
            return ready(py);
        }
        spawn_awaitable(py, async move { Ok(conn.send(data).await?) })
    }

    /// Sends to every connection but `exclude`; the awaitable gives how many it reached.
    #[pyo3(signature = (data, exclude = None))]
    fn _broadcast<'py>(
        &self,
        py: Python<'py>,
        data: &Bound<'_, PyAny>,
        exclude: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let data = payload(data)?;
        let exclude = exclusions(exclude)?;
        let core = Arc::clone(self.core());
        spawn_awaitable(py, async move { Ok(core.broadcast(data, &exclude).await) })
    }

    /// Closes as `close()` does, without blocking the event loop.
    #[pyo3(signature = (timeout = 5.0))]
    fn _close<'py>(&self, py: Python<'py>, timeout: f64) -> PyResult<Bound<'py, PyAny>> {
        let grace: Duration = timeout_from_secs("timeout", Some(timeout))?.unwrap_or_default();
        let core = Arc::clone(self.core());
        core.shutdown();
        spawn_awaitable(py, async move {
            core.wait_closed(grace).await;
            Ok(())
        })
    }
}
