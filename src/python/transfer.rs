//! File transfer for Python: the `FileSent` and `FileReceived` classes, and the one way a
//! blocking `send_file` runs, reporting progress to a callable or a terminal bar between the
//! ~100 ms slices in which it waits without the GIL.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use pyo3::exceptions::PyTimeoutError;
use pyo3::prelude::*;

use super::aio::{spawn_awaitable_on, Place};
use super::convert::address;
use super::runtime::{timeout_from_secs, wait_reporting};
use super::tls::PyPeerIdentity;
use crate::error::Error;
use crate::tls::PeerIdentity;
use crate::transfer::{hex, Progress, ReceivedFile, SentFile};

/// The outcome of a verified `send_file`.
#[pyclass(frozen, module = "socketcomm._socketcomm")]
pub(crate) struct FileSent {
    #[pyo3(get)]
    name: String,
    #[pyo3(get)]
    saved_as: String,
    #[pyo3(get)]
    size: u64,
    #[pyo3(get)]
    digest: String,
    #[pyo3(get)]
    resumed_from: u64,
    #[pyo3(get)]
    seconds: f64,
}

impl From<SentFile> for FileSent {
    fn from(sent: SentFile) -> FileSent {
        FileSent {
            digest: hex(&sent.digest),
            name: sent.name,
            saved_as: sent.saved_as,
            size: sent.size,
            resumed_from: sent.resumed_from,
            seconds: sent.duration.as_secs_f64(),
        }
    }
}

#[pymethods]
impl FileSent {
    /// Bytes per second over the whole call (the bytes resumed from are not counted).
    #[getter]
    fn rate(&self) -> f64 {
        (self.size - self.resumed_from) as f64 / self.seconds.max(1e-9)
    }

    fn __repr__(&self) -> String {
        format!(
            "FileSent(name={:?}, saved_as={:?}, size={}, digest='{}', resumed_from={}, \
             seconds={:.3})",
            self.name, self.saved_as, self.size, self.digest, self.resumed_from, self.seconds
        )
    }
}

/// A file that arrived whole and verified.
#[pyclass(frozen, module = "socketcomm._socketcomm")]
pub(crate) struct FileReceived {
    #[pyo3(get)]
    conn_id: u64,
    #[pyo3(get)]
    peer: (String, u16),
    #[pyo3(get)]
    name: String,
    #[pyo3(get)]
    offered_name: String,
    #[pyo3(get)]
    path: PathBuf,
    #[pyo3(get)]
    size: u64,
    #[pyo3(get)]
    digest: String,
    #[pyo3(get)]
    resumed_from: u64,
    identity: Option<PeerIdentity>,
}

impl FileReceived {
    /// `conn_id` is the server's id of the sending connection, 0 for a file a client received;
    /// `identity` the sender's verified certificate, on a mutual-TLS server.
    pub(crate) fn new(
        conn_id: u64,
        file: ReceivedFile,
        identity: Option<PeerIdentity>,
    ) -> FileReceived {
        FileReceived {
            conn_id,
            identity,
            peer: address(file.peer),
            digest: hex(&file.digest),
            name: file.name,
            offered_name: file.offered_name,
            path: file.path,
            size: file.size,
            resumed_from: file.resumed_from,
        }
    }
}

#[pymethods]
impl FileReceived {
    /// The sender's verified certificate, on a mutual-TLS server.
    #[getter]
    fn peer_identity(&self) -> Option<PyPeerIdentity> {
        self.identity.as_ref().map(PyPeerIdentity::from)
    }

    fn __repr__(&self) -> String {
        format!(
            "FileReceived(conn_id={}, name={:?}, size={}, digest='{}', path='{}')",
            self.conn_id,
            self.name,
            self.size,
            self.digest,
            self.path.display()
        )
    }
}

/// How a transfer's progress is shown: the Python object `socketcomm._progress.reporter`
/// made of the `progress` argument (a callable, or True for a terminal bar), if any.
struct Reporter(Option<Py<PyAny>>);

impl Reporter {
    /// # Errors
    /// `TypeError` for a `progress` that is neither None, a bool nor a callable.
    pub(crate) fn new(
        py: Python<'_>,
        progress: Option<&Bound<'_, PyAny>>,
        name: &str,
    ) -> PyResult<Reporter> {
        let Some(progress) = progress else {
            return Ok(Reporter(None));
        };
        let reporter = py
            .import("socketcomm._progress")?
            .call_method1("reporter", (progress, name))?;
        Ok(Reporter((!reporter.is_none()).then(|| reporter.unbind())))
    }

    fn update(&self, py: Python<'_>, progress: &Progress) -> PyResult<()> {
        if let Some(reporter) = &self.0 {
            reporter.call_method1(py, "update", (progress.done(), progress.total()))?;
        }
        Ok(())
    }

    fn close(&self, py: Python<'_>) -> PyResult<()> {
        if let Some(reporter) = &self.0 {
            reporter.call_method0(py, "close")?;
        }
        Ok(())
    }
}

/// The file name a transfer is shown under: `name`, or the path's last part.
fn shown_name(path: &Path, name: Option<&str>) -> String {
    name.map(str::to_owned).unwrap_or_else(|| {
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    })
}

/// The blocking `send_file` of `Client` and `Server`: runs the transfer `start` makes from a
/// progress tracker, reporting its progress (as the Python `progress` argument asks) between
/// slices, for at most `timeout` seconds.
///
/// # Errors
/// `TypeError` for an unusable `progress`, `ValueError` for a bad `timeout`; what the transfer
/// raises; `TimeoutError` after `timeout` (the transfer is cancelled, and the receiver keeps
/// what arrived for a resume); `KeyboardInterrupt` on Ctrl-C.
pub(crate) fn send_file_blocking<F>(
    py: Python<'_>,
    (path, name): (PathBuf, Option<String>),
    progress: Option<&Bound<'_, PyAny>>,
    timeout: Option<f64>,
    start: impl FnOnce(PathBuf, Option<String>, Arc<Progress>) -> F,
) -> PyResult<FileSent>
where
    F: Future<Output = Result<SentFile, Error>> + Send,
{
    let timeout = timeout_from_secs("timeout", timeout)?;
    let reporter = Reporter::new(py, progress, &shown_name(&path, name.as_deref()))?;
    let progress = Arc::new(Progress::default());
    let transfer = start(path, name, Arc::clone(&progress));
    let outcome = wait_reporting(py, transfer, timeout, |py| reporter.update(py, &progress));
    // A finished transfer shows its last figures; one that failed leaves what was shown.
    let finished = match &outcome {
        Ok(Some(Ok(_))) => reporter.update(py, &progress),
        _ => Ok(()),
    };
    reporter.close(py)?;
    finished?;
    match outcome? {
        Some(sent) => Ok(FileSent::from(sent?)),
        None => Err(PyTimeoutError::new_err(format!(
            "the file transfer took longer than {:.3} s (timeout); it was stopped, and sending \
             the file again resumes it",
            timeout.unwrap_or_default().as_secs_f64()
        ))),
    }
}

/// The asyncio `send_file` primitive of `Client` and `Server`: the awaitable of the transfer
/// `start` makes, and the progress `socketcomm.aio` reads while it runs.
///
/// # Errors
/// When there is no running event loop.
pub(crate) fn send_file_awaitable<'py, F>(
    py: Python<'py>,
    place: Place<'_>,
    start: impl FnOnce(Arc<Progress>) -> F,
) -> PyResult<(Bound<'py, PyAny>, TransferProgress)>
where
    F: Future<Output = Result<SentFile, Error>> + Send + 'static,
{
    let progress = Arc::new(Progress::default());
    let transfer = start(Arc::clone(&progress));
    let awaitable = spawn_awaitable_on(py, place, None, async move {
        transfer.await.map(FileSent::from)
    })?;
    Ok((awaitable, TransferProgress(progress)))
}

/// How far an asyncio transfer has got: read by `socketcomm.aio` to report progress.
#[pyclass(frozen, module = "socketcomm._socketcomm")]
pub(crate) struct TransferProgress(pub(crate) Arc<Progress>);

#[pymethods]
impl TransferProgress {
    #[getter]
    fn done(&self) -> u64 {
        self.0.done()
    }

    #[getter]
    fn total(&self) -> u64 {
        self.0.total()
    }
}
