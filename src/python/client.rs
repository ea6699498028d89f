//! `socketcomm.Client`: the core client behind blocking methods that release the GIL.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use pyo3::exceptions::PyTimeoutError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};

use super::aio::Place;
use super::convert::{address, payload};
use super::ints;
use super::json;
use super::loop_runtime::ClientRuntime;
use super::runtime::{duration_from_secs, refuse_if_forked, timeout_from_secs, wait};
use crate::client::{Client, DEFAULT_CLOSE_GRACE};
use std::net::ToSocketAddrs;

use pyo3::exceptions::PyValueError;

use super::options::{pings, socket_options};
use super::received::Received;
use super::tls::PyClientTls;
use super::transfer::{send_file_blocking, FileReceived, FileSent};
use super::wakeup::Completions;
use crate::config::{ClientConfig, Pings, SocketOptions, DEFAULT_INBOUND_BYTES};
use crate::error::Error;
use crate::frame::{CloseCode, DEFAULT_MAX_FRAME};
use crate::transfer::DEFAULT_MAX_FILE_SIZE;
use std::path::PathBuf;

/// A connection to a server; see the stub for the full description.
#[pyclass(frozen, module = "socketcomm._socketcomm", name = "Client")]
pub(crate) struct PyClient {
    core: Arc<Client>,
    timeout: Option<Duration>,
    /// How `socketcomm.aio`'s awaitables of this client reach its loop, once it uses them.
    completions: Mutex<Option<Arc<Completions>>>,
    /// The runtime of the asyncio loop whose clients this is one of; `None`: the shared one.
    runtime: Option<Arc<ClientRuntime>>,
}

/// The client settings from the Python options both APIs share.
#[allow(clippy::too_many_arguments)]
pub(crate) fn client_config(
    connect_timeout: f64,
    raw: bool,
    max_frame: u32,
    (tls, retries, backoff): (Option<PyRef<'_, PyClientTls>>, u32, f64),
    local_address: Option<(String, u16)>,
    (socket, pings): (SocketOptions, Pings),
    download_dir: Option<PathBuf>,
    max_file_size: u64,
    inbound_bytes: usize,
) -> PyResult<ClientConfig> {
    let backoff = duration_from_secs("backoff", backoff)?;
    let connect_timeout = duration_from_secs("connect_timeout", connect_timeout)?;
    let local_addr = match local_address {
        Some((host, port)) => Some(
            (host.as_str(), port)
                .to_socket_addrs()
                .ok()
                .and_then(|mut addrs| addrs.next())
                .ok_or_else(|| {
                    PyValueError::new_err(format!("invalid local_address: cannot resolve {host:?}"))
                })?,
        ),
        None => None,
    };
    Ok(ClientConfig {
        connect_timeout,
        raw,
        max_frame,
        socket,
        local_addr,
        download_dir,
        max_file_size,
        inbound_bytes,
        tls: tls.map(|tls| tls.core.clone()),
        retries,
        backoff,
        pings,
        ..ClientConfig::default()
    })
}

#[pymethods]
impl PyClient {
    #[new]
    #[pyo3(signature = (
        host,
        port,
        *,
        timeout = None,
        connect_timeout = 10.0,
        raw = false,
        max_frame = DEFAULT_MAX_FRAME,
        tls = None,
        retries = 0,
        backoff = 0.2,
        download_dir = None,
        max_file_size = DEFAULT_MAX_FILE_SIZE,
        inbound_bytes = DEFAULT_INBOUND_BYTES,
        local_address = None,
        nodelay = true,
        keepalive = None,
        keepalive_interval = None,
        keepalive_count = None,
        recv_buffer = None,
        send_buffer = None,
        linger = None,
        ping_interval = 20.0,
        ping_timeout = 20.0,
    ))]
    // Each argument is a Python keyword option.
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        host: String,
        #[pyo3(from_py_with = ints::port)] port: u16,
        timeout: Option<f64>,
        connect_timeout: f64,
        raw: bool,
        #[pyo3(from_py_with = ints::max_frame)] max_frame: u32,
        tls: Option<PyRef<'_, PyClientTls>>,
        #[pyo3(from_py_with = ints::retries)] retries: u32,
        backoff: f64,
        download_dir: Option<PathBuf>,
        #[pyo3(from_py_with = ints::max_file_size)] max_file_size: u64,
        #[pyo3(from_py_with = ints::inbound_bytes)] inbound_bytes: usize,
        local_address: Option<(String, u16)>,
        nodelay: bool,
        keepalive: Option<f64>,
        keepalive_interval: Option<f64>,
        #[pyo3(from_py_with = ints::keepalive_count)] keepalive_count: Option<u32>,
        #[pyo3(from_py_with = ints::recv_buffer)] recv_buffer: Option<usize>,
        #[pyo3(from_py_with = ints::send_buffer)] send_buffer: Option<usize>,
        linger: Option<f64>,
        ping_interval: Option<f64>,
        ping_timeout: Option<f64>,
    ) -> PyResult<PyClient> {
        refuse_if_forked()?;
        let timeout = timeout_from_secs("timeout", timeout)?;
        let socket = socket_options(
            nodelay,
            keepalive,
            keepalive_interval,
            keepalive_count,
            recv_buffer,
            send_buffer,
            linger,
        )?;
        let config = client_config(
            connect_timeout,
            raw,
            max_frame,
            (tls, retries, backoff),
            local_address,
            (socket, pings(ping_interval, ping_timeout)?),
            download_dir,
            max_file_size,
            inbound_bytes,
        )?;
        let core = wait(
            py,
            async move { Client::connect(&host, port, config).await },
            None,
        )?
        .expect("waits without a timeout")?;
        Ok(PyClient::new_connected(core, timeout, None))
    }

    /// `(host, port)` of the server.
    #[getter]
    fn address(&self) -> (String, u16) {
        address(self.core.peer_addr())
    }

    /// The round trip of the last ping this client sent and the server answered, in seconds;
    /// `None` before the first answer, with pings off, and in raw mode.
    #[getter]
    fn latency(&self) -> Option<f64> {
        self.core.latency().map(|latency| latency.as_secs_f64())
    }

    /// The socket's file descriptor (to inspect it with `socket.socket(fileno=...)` on a
    /// `os.dup` of it; do not close it).
    fn fileno(&self) -> i32 {
        self.core.fd()
    }

    /// `(host, port)` of this end of the connection.
    #[getter]
    fn local_address(&self) -> (String, u16) {
        address(self.core.local_addr())
    }

    #[getter]
    fn timeout(&self) -> Option<f64> {
        self.timeout.map(|t| t.as_secs_f64())
    }

    #[getter]
    fn raw(&self) -> bool {
        self.core.is_raw()
    }

    /// Whether the connection is encrypted with TLS.
    #[getter]
    fn encrypted(&self) -> bool {
        self.core.is_tls()
    }

    /// Whether the connection has ended or `close()` was called.
    #[getter]
    fn closed(&self) -> bool {
        self.core.is_closed()
    }

    /// Queues `data` (str as UTF-8, or bytes-like) as one message.
    #[pyo3(signature = (data, timeout = None))]
    fn send(&self, py: Python<'_>, data: &Bound<'_, PyAny>, timeout: Option<f64>) -> PyResult<()> {
        let data = payload(data)?;
        let limit = self.limit(timeout)?;
        let core = &self.core;
        wait(py, core.send(data), limit)?
            .ok_or_else(|| self.timed_out("room to send", limit))??;
        Ok(())
    }

    /// The next message that is not a reply to a request.
    #[pyo3(signature = (timeout = None))]
    fn recv<'py>(&self, py: Python<'py>, timeout: Option<f64>) -> PyResult<Bound<'py, PyBytes>> {
        let limit = self.limit(timeout)?;
        let core = &self.core;
        let data =
            wait(py, core.recv(), limit)?.ok_or_else(|| self.timed_out("message", limit))??;
        Ok(PyBytes::new(py, &data))
    }

    /// The next message that is not a reply to a request, with the topic it was published to.
    #[pyo3(signature = (timeout = None))]
    fn recv_message(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Received> {
        let limit = self.limit(timeout)?;
        let core = &self.core;
        let message = wait(py, core.recv_message(), limit)?
            .ok_or_else(|| self.timed_out("message", limit))??;
        Ok(Received::new(py, &message))
    }

    /// Subscribes to `topic` (a name or a pattern); False when subscribed already.
    #[pyo3(signature = (topic, timeout = None))]
    fn subscribe(&self, py: Python<'_>, topic: &str, timeout: Option<f64>) -> PyResult<bool> {
        self.subscription(py, topic, true, timeout)
    }

    /// Unsubscribes from `topic` (as subscribed); False when it was not subscribed.
    #[pyo3(signature = (topic, timeout = None))]
    fn unsubscribe(&self, py: Python<'_>, topic: &str, timeout: Option<f64>) -> PyResult<bool> {
        self.subscription(py, topic, false, timeout)
    }

    /// Publishes `data` to `topic` through the server.
    #[pyo3(signature = (topic, data, timeout = None))]
    fn publish(
        &self,
        py: Python<'_>,
        topic: &str,
        data: &Bound<'_, PyAny>,
        timeout: Option<f64>,
    ) -> PyResult<()> {
        let data = payload(data)?;
        let limit = self.limit(timeout)?;
        let core = &self.core;
        wait(py, core.publish(topic, data), limit)?
            .ok_or_else(|| self.timed_out("room to send", limit))??;
        Ok(())
    }

    /// Sends `obj` as a JSON message (`json.dumps`, or the `dumps` given).
    #[pyo3(signature = (obj, timeout = None, *, dumps = None))]
    fn send_json(
        &self,
        py: Python<'_>,
        obj: &Bound<'_, PyAny>,
        timeout: Option<f64>,
        dumps: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        self.send(py, &json::dumps(py, obj, dumps)?, timeout)
    }

    /// The next message, decoded from JSON (`json.loads`, or the `loads` given).
    #[pyo3(signature = (timeout = None, *, loads = None))]
    fn recv_json<'py>(
        &self,
        py: Python<'py>,
        timeout: Option<f64>,
        loads: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let data = self.recv(py, timeout)?;
        json::loads(py, data.as_bytes(), loads)
    }

    /// Sends `obj` as a JSON request and returns the reply decoded from JSON.
    #[pyo3(signature = (obj, timeout = None, *, dumps = None, loads = None))]
    fn request_json<'py>(
        &self,
        py: Python<'py>,
        obj: &Bound<'py, PyAny>,
        timeout: Option<f64>,
        dumps: Option<&Bound<'py, PyAny>>,
        loads: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let reply = self.request(py, &json::dumps(py, obj, dumps)?, timeout)?;
        json::loads(py, reply.as_bytes(), loads)
    }

    /// Publishes `obj` as JSON to `topic`.
    #[pyo3(signature = (topic, obj, timeout = None, *, dumps = None))]
    fn publish_json(
        &self,
        py: Python<'_>,
        topic: &str,
        obj: &Bound<'_, PyAny>,
        timeout: Option<f64>,
        dumps: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        self.publish(py, topic, &json::dumps(py, obj, dumps)?, timeout)
    }

    /// Sends `data` as a request and returns the server's reply to it.
    #[pyo3(signature = (data, timeout = None))]
    fn request<'py>(
        &self,
        py: Python<'py>,
        data: &Bound<'_, PyAny>,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let data = payload(data)?;
        let limit = self.limit(timeout)?;
        let core = &self.core;
        let reply = wait(py, core.request(data), limit)?
            .ok_or_else(|| self.timed_out("reply", limit))??;
        Ok(PyBytes::new(py, &reply))
    }

    /// Sends the file at `path`, streamed and verified; returns once the server has saved it.
    #[pyo3(signature = (path, name = None, *, progress = None, timeout = None))]
    fn send_file(
        &self,
        py: Python<'_>,
        path: PathBuf,
        name: Option<String>,
        progress: Option<&Bound<'_, PyAny>>,
        timeout: Option<f64>,
    ) -> PyResult<FileSent> {
        let core = &self.core;
        send_file_blocking(
            py,
            (path, name),
            progress,
            timeout,
            |path, name, progress| async move { core.send_file(&path, name, &progress).await },
        )
    }

    /// The next file the server sent into `download_dir`, verified and in place.
    #[pyo3(signature = (timeout = None))]
    fn recv_file(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<FileReceived> {
        let limit = self.limit(timeout)?;
        let core = &self.core;
        let file =
            wait(py, core.recv_file(), limit)?.ok_or_else(|| self.timed_out("file", limit))??;
        Ok(FileReceived::new(0, file, None))
    }

    /// Flushes what was sent, says goodbye to the server and closes. Idempotent.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let core = &self.core;
        wait(py, core.close(DEFAULT_CLOSE_GRACE), None)?;
        Ok(())
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    /// The next message; iteration ends when the server closes the connection normally.
    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let core = &self.core;
        match wait(py, core.recv(), None)?.expect("waits without a timeout") {
            Ok(data) => Ok(Some(PyBytes::new(py, &data))),
            Err(Error::Closed(info))
                if matches!(
                    info.code,
                    None | Some(CloseCode::NORMAL | CloseCode::GOING_AWAY)
                ) =>
            {
                Ok(None)
            }
            Err(error) => Err(error.into()),
        }
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, PyTuple>) -> PyResult<()> {
        self.close(py)
    }

    fn __repr__(&self) -> String {
        let (host, port) = address(self.core.peer_addr());
        let state = if self.core.is_closed() {
            "closed"
        } else {
            "open"
        };
        let raw = if self.core.is_raw() { " raw" } else { "" };
        format!("<socketcomm.Client {host}:{port}{raw} {state}>")
    }
}

impl PyClient {
    pub(crate) fn new_connected(
        core: Client,
        timeout: Option<Duration>,
        runtime: Option<Arc<ClientRuntime>>,
    ) -> PyClient {
        PyClient {
            core: Arc::new(core),
            timeout,
            completions: Mutex::new(None),
            runtime,
        }
    }

    /// Where the connection's tasks run, and so where its asyncio calls run too.
    pub(crate) fn place(&self) -> Place<'_> {
        self.runtime
            .as_ref()
            .map_or(Place::Runtime(super::runtime::runtime().handle()), |r| {
                Place::Turn(r.driven())
            })
    }

    pub(crate) fn core(&self) -> &Arc<Client> {
        &self.core
    }

    /// The hand-over of `socketcomm.aio`'s outcomes to the loop, made on first use.
    ///
    /// # Errors
    /// `OSError` when its socket pair cannot be made.
    pub(crate) fn completions(&self) -> PyResult<Arc<Completions>> {
        let mut completions = self
            .completions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(made) = &*completions {
            return Ok(Arc::clone(made));
        }
        Ok(Arc::clone(completions.insert(Completions::new()?)))
    }

    /// A call's own timeout, or the client's.
    fn limit(&self, timeout: Option<f64>) -> PyResult<Option<Duration>> {
        Ok(timeout_from_secs("timeout", timeout)?.or(self.timeout))
    }

    fn timed_out(&self, what: &str, limit: Option<Duration>) -> PyErr {
        timed_out(&self.core, what, limit)
    }

    /// Subscribes to (or unsubscribes from) `topic`, waiting up to `timeout` for the answer.
    fn subscription(
        &self,
        py: Python<'_>,
        topic: &str,
        subscribe: bool,
        timeout: Option<f64>,
    ) -> PyResult<bool> {
        let limit = self.limit(timeout)?;
        let core = &self.core;
        let asking = async move {
            if subscribe {
                core.subscribe(topic).await
            } else {
                core.unsubscribe(topic).await
            }
        };
        Ok(wait(py, asking, limit)?
            .ok_or_else(|| self.timed_out("answer to the subscription", limit))??)
    }
}

/// The `TimeoutError` of a call that waited `limit` for `what` from the server, saying why
/// when the client itself stopped reading.
pub(crate) fn timed_out(core: &Client, what: &str, limit: Option<Duration>) -> PyErr {
    let (host, port) = address(core.peer_addr());
    let seconds = limit.unwrap_or_default().as_secs_f64();
    let why = if core.is_held_back_by_unread() {
        "the messages from the server that were not read (recv()) hold all of inbound_bytes, \
         so this client reads nothing more, the reply included, until they are: read them, \
         or raise inbound_bytes="
    } else {
        "the server may be busy or not answering (raise timeout= to wait longer)"
    };
    PyTimeoutError::new_err(format!(
        "no {what} from {host}:{port} within {seconds:.3} s; {why}"
    ))
}
