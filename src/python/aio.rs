//! The native half of `socketcomm.aio`: awaitables for the asyncio API, whose Rust tasks run on
//! the runtime their connection runs on (a server's, the loop's own for its clients:
//! `loop_runtime.rs`, or the shared one) and hand their outcomes to the loop. `python/socketcomm/
//! aio.py` builds the public classes from these.
//!
//! Receiving is split in two so that cancellation never loses a message: `_readable()` waits,
//! without taking anything, until a message (or the end) is there, and `_try_recv()` takes it
//! synchronously on the event loop's thread. A task cancelled while waiting has taken nothing.
//! (Had the Rust future taken the message itself, a cancellation that lands after it completed
//! but before the asyncio future is resolved would drop the message.)

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use std::panic::AssertUnwindSafe;
use std::sync::OnceLock;

use bytes::Bytes;
use futures_util::FutureExt;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyBytes;
use pyo3::IntoPyObjectExt;
use tokio::runtime::Handle;

use super::client::{client_config, PyClient};
use super::convert::payload;
use super::driven::Driven;
use super::errors;
use super::events::{event_to_py, Flavour};
use super::exit::with_python;
use super::ints;
use super::loop_runtime::LoopRuntime;
use super::options::{pings, socket_options};
use super::received::Received;
use super::runtime::{duration_from_secs, refuse_if_forked, runtime, timeout_from_secs};
use super::server::{exclusions, PyServer};
use super::tls::PyClientTls;
use super::transfer::{send_file_awaitable, FileReceived, TransferProgress};
use super::wakeup::{Completions, Job, Wakeup};
use crate::client::{Client, DEFAULT_CLOSE_GRACE};
use crate::config::DEFAULT_INBOUND_BYTES;
use crate::error::Error;
use crate::transfer::DEFAULT_MAX_FILE_SIZE;
use std::path::PathBuf;

/// Queues the answers kept during a turn of the loop (`wakeup.rs`); scheduled with
/// `call_soon` by the first answer of the turn.
#[pyclass(frozen, module = "socketcomm._socketcomm")]
pub(crate) struct Flush(Arc<Wakeup>);

#[pymethods]
impl Flush {
    #[pyo3(signature = (*_args))]
    fn __call__(&self, _args: &Bound<'_, pyo3::types::PyTuple>) {
        self.0.flush();
    }
}

/// Schedules a [`Flush`] at the end of the running loop's turn.
///
/// # Errors
/// When there is no running loop.
pub(crate) fn schedule_flush(py: Python<'_>, wakeup: &Arc<Wakeup>) -> PyResult<()> {
    let event_loop = pyo3_async_runtimes::get_running_loop(py)?;
    event_loop.call_method1("call_soon", (Flush(Arc::clone(wakeup)),))?;
    Ok(())
}

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
    // NOTE: one for every call: it holds nothing, and a new object per answer cost an
    // allocation and its release on every message of an asyncio server.
    static READY: PyOnceLock<Py<Ready>> = PyOnceLock::new();
    let ready = READY.get_or_try_init(py, || Py::new(py, Ready))?;
    Ok(ready.bind(py).clone().into_any())
}

/// Runs `future` on the shared runtime and returns an asyncio future for its result, bound to
/// the running event loop (found with pyo3-async-runtimes). Cancelling the asyncio future drops
/// the Rust future.
///
/// NOTE: pyo3-async-runtimes' `future_into_py` would set the result from a tokio blocking
/// thread that attaches to Python, which crashes the interpreter when it lands during exit
/// (see `exit.rs`). Here the tokio task never touches Python: it hands its outcome to one
/// completer thread, which converts it (errors included) and resolves the future through the
/// loop's `call_soon_threadsafe`, taking the GIL once per batch and never after exit began.
pub(crate) fn spawn_awaitable<F, T>(py: Python<'_>, future: F) -> PyResult<Bound<'_, PyAny>>
where
    F: Future<Output = Result<T, Error>> + Send + 'static,
    T: for<'py> IntoPyObject<'py> + Send + 'static,
{
    spawn_awaitable_on(py, Place::Runtime(runtime().handle()), None, future)
}

/// Where an awaitable's Rust task runs.
#[derive(Clone, Copy)]
pub(crate) enum Place<'a> {
    /// On this runtime, woken from outside.
    Runtime(&'a Handle),
    /// On a runtime the loop drives, spawned from a turn of it on the loop's thread (see
    /// [`Driven::spawn_now`]).
    Turn(&'a Driven),
}

/// As [`spawn_awaitable`], in `place`, and with `completions`, handing the outcome to them,
/// whose loop runs it on its own thread (see `wakeup.rs`), instead of to the completer thread.
pub(crate) fn spawn_awaitable_on<'py, F, T>(
    py: Python<'py>,
    place: Place<'_>,
    completions: Option<&Arc<Completions>>,
    future: F,
) -> PyResult<Bound<'py, PyAny>>
where
    F: Future<Output = Result<T, Error>> + Send + 'static,
    T: for<'a> IntoPyObject<'a> + Send + 'static,
{
    let completions = completions.cloned();
    let event_loop = pyo3_async_runtimes::get_running_loop(py)?;
    let py_future = event_loop.call_method0("create_future")?;
    let target = Target {
        event_loop: event_loop.unbind(),
        future: py_future.clone().unbind(),
        on_loop: completions.is_some(),
    };
    let task = async move {
        let outcome = AssertUnwindSafe(future).catch_unwind().await;
        let job: Job = Box::new(move |py: Python<'_>| {
            let value = match outcome {
                Ok(Ok(value)) => value.into_py_any(py),
                Ok(Err(error)) => Err(PyErr::from(error)),
                Err(_) => Err(PyRuntimeError::new_err(
                    "internal error in socketcomm (a Rust panic); please report it",
                )),
            };
            target.resolve(py, value);
        });
        match completions {
            Some(completions) => completions.push(job),
            // The completer is gone only once the interpreter is exiting: nobody awaits any
            // more.
            None => drop(completer().send(job)),
        }
    };
    let task = match place {
        Place::Runtime(handle) => handle.spawn(task).abort_handle(),
        Place::Turn(driven) => driven.spawn_now(task),
    };
    py_future.call_method1("add_done_callback", (AbortOnCancel { task },))?;
    Ok(py_future)
}

/// The asyncio future a Rust task resolves, and its loop.
struct Target {
    event_loop: Py<PyAny>,
    future: Py<PyAny>,
    /// Resolved on the loop's own thread (a [`Completions`] job), not from another.
    on_loop: bool,
}

impl Target {
    fn resolve(self, py: Python<'_>, value: PyResult<Py<PyAny>>) {
        let (is_error, value) = match value {
            Ok(value) => (false, value),
            Err(error) => (true, error.into_value(py).into_any()),
        };
        // Looked up once, not per result.
        static DELIVER: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
        let Ok(deliver) = DELIVER.get_or_try_init(py, || {
            py.import("socketcomm._socketcomm")?
                .getattr("_deliver")
                .map(Bound::unbind)
        }) else {
            return;
        };
        if self.on_loop {
            let _ = _deliver(self.future.bind(py), is_error, value.bind(py));
            return;
        }
        // A closed loop refuses the callback: its program is gone, and so is the awaiter.
        let _ = self.event_loop.bind(py).call_method1(
            "call_soon_threadsafe",
            (deliver.bind(py), self.future, is_error, value),
        );
    }
}

/// Sets an asyncio future's outcome, on its loop's thread, unless it was cancelled meanwhile.
#[pyfunction]
pub(crate) fn _deliver(
    future: &Bound<'_, PyAny>,
    is_error: bool,
    value: &Bound<'_, PyAny>,
) -> PyResult<()> {
    if future.call_method0("done")?.is_truthy()? {
        return Ok(());
    }
    let method = if is_error {
        "set_exception"
    } else {
        "set_result"
    };
    future.call_method1(method, (value,))?;
    Ok(())
}

/// Aborts the Rust task when its asyncio future is cancelled.
#[pyclass(frozen, module = "socketcomm._socketcomm")]
pub(crate) struct AbortOnCancel {
    task: tokio::task::AbortHandle,
}

#[pymethods]
impl AbortOnCancel {
    fn __call__(&self, future: &Bound<'_, PyAny>) -> PyResult<()> {
        if future.call_method0("cancelled")?.is_truthy()? {
            self.task.abort();
        }
        Ok(())
    }
}

/// Resolutions to hand to Python, in the order the tasks finished.
fn completer() -> &'static std::sync::mpsc::Sender<Job> {
    static COMPLETER: OnceLock<std::sync::mpsc::Sender<Job>> = OnceLock::new();
    COMPLETER.get_or_init(|| {
        let (jobs, queued) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("socketcomm-asyncio".into())
            .spawn(move || {
                while let Ok(first) = queued.recv() {
                    let batch: Vec<Job> = std::iter::once(first).chain(queued.try_iter()).collect();
                    let done = with_python(|py| {
                        for job in batch {
                            job(py);
                        }
                    });
                    if done.is_none() {
                        return; // the interpreter is exiting
                    }
                }
            })
            .expect("cannot start the asyncio completer thread");
        jobs
    })
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
    loop_runtime = None,
))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn _connect<'py>(
    py: Python<'py>,
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
    loop_runtime: Option<PyRef<'_, LoopRuntime>>,
) -> PyResult<Bound<'py, PyAny>> {
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
    // The connection's tasks run where it is made: on the loop's runtime when there is one.
    let runtime_of_loop = loop_runtime.map(|r| Arc::clone(r.runtime()));
    let kept = runtime_of_loop.clone();
    let place = kept
        .as_ref()
        .map_or(Place::Runtime(runtime().handle()), |r| {
            Place::Turn(r.driven())
        });
    spawn_awaitable_on(py, place, None, async move {
        let core = Client::connect(&host, port, config).await?;
        Ok(PyClient::new_connected(core, timeout, runtime_of_loop))
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

    /// As `_try_recv`, the message with its topic.
    fn _try_recv_message(&self, py: Python<'_>) -> PyResult<Option<Received>> {
        Ok(self
            .core()
            .try_recv_message()?
            .map(|message| Received::new(py, &message)))
    }

    /// Subscribes to (`subscribe`) or unsubscribes from `topic`; the awaitable gives whether
    /// anything changed.
    fn _subscription<'py>(
        &self,
        py: Python<'py>,
        topic: String,
        subscribe: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        crate::topic::check_pattern(&topic).map_err(Error::from)?;
        let core = Arc::clone(self.core());
        self.spawn_to_loop(py, async move {
            if subscribe {
                core.subscribe(&topic).await
            } else {
                core.unsubscribe(&topic).await
            }
        })
    }

    /// Publishes to `topic`, waiting for room in the queue.
    fn _publish<'py>(
        &self,
        py: Python<'py>,
        topic: String,
        data: &Bound<'_, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        crate::topic::check_name(&topic).map_err(Error::from)?;
        let data = payload(data)?;
        let core = Arc::clone(self.core());
        self.spawn(py, async move { core.publish(&topic, data).await })
    }

    /// Completes when `_try_recv` has a message or the end to report.
    fn _readable<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let core = Arc::clone(self.core());
        self.spawn_to_loop(py, async move {
            core.readable().await;
            Ok::<_, Error>(())
        })
    }

    /// The descriptor that becomes readable when awaitables of this client have outcomes to
    /// set; the loop watches it with `add_reader` and then calls `_complete`.
    fn _completions_fd(&self) -> PyResult<i32> {
        Ok(self.completions()?.fd())
    }

    /// Sets the outcomes handed over since the last call (on the loop's thread).
    fn _complete(&self, py: Python<'_>) -> PyResult<()> {
        self.completions()?.run(py);
        Ok(())
    }

    /// The TimeoutError of a wait of `seconds` for `what` from the server (with the reason
    /// when this client stopped reading: the sync API's wording).
    fn _timeout_error<'py>(&self, py: Python<'py>, what: &str, seconds: f64) -> Bound<'py, PyAny> {
        let limit = Duration::try_from_secs_f64(seconds).ok();
        crate::python::client::timed_out(self.core(), what, limit)
            .into_value(py)
            .into_bound(py)
            .into_any()
    }

    /// Queues a message if there is room; False when the queue is full.
    fn _try_send(&self, data: &Bound<'_, PyAny>) -> PyResult<bool> {
        Ok(self.core().try_send(payload(data)?)?)
    }

    /// Queues a message, waiting for room.
    fn _send<'py>(&self, py: Python<'py>, data: &Bound<'_, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let data = payload(data)?;
        let core = Arc::clone(self.core());
        self.spawn(py, async move { core.send(data).await })
    }

    /// Sends a request; the awaitable gives the reply.
    fn _request<'py>(
        &self,
        py: Python<'py>,
        data: &Bound<'_, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let data = payload(data)?;
        let core = Arc::clone(self.core());
        self.spawn_to_loop(py, async move { core.request(data).await.map(Payload) })
    }

    /// Sends a file; returns the awaitable of its `FileSent` and the progress to watch.
    fn _send_file<'py>(
        &self,
        py: Python<'py>,
        path: PathBuf,
        name: Option<String>,
    ) -> PyResult<(Bound<'py, PyAny>, TransferProgress)> {
        let core = Arc::clone(self.core());
        send_file_awaitable(py, self.place(), |progress| async move {
            core.send_file(&path, name, &progress).await
        })
    }

    /// The next file received into `download_dir`.
    fn _recv_file<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let core = Arc::clone(self.core());
        self.spawn(py, async move {
            core.recv_file()
                .await
                .map(|file| FileReceived::new(0, file, None))
        })
    }

    /// Flushes, says goodbye and closes.
    fn _close<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let core = Arc::clone(self.core());
        self.spawn(py, async move {
            core.close(DEFAULT_CLOSE_GRACE).await;
            Ok::<_, Error>(())
        })
    }
}

impl PyClient {
    /// Runs `future` where the client's connection runs; its outcome reaches the loop through
    /// the completer thread (for the calls whose loop may not watch `_completions_fd`).
    fn spawn<'py, F, T>(&self, py: Python<'py>, future: F) -> PyResult<Bound<'py, PyAny>>
    where
        F: Future<Output = Result<T, Error>> + Send + 'static,
        T: for<'a> IntoPyObject<'a> + Send + 'static,
    {
        spawn_awaitable_on(py, self.place(), None, future)
    }

    /// As [`PyClient::spawn`], the outcome handed to the loop's own thread (`_complete`).
    fn spawn_to_loop<'py, F, T>(&self, py: Python<'py>, future: F) -> PyResult<Bound<'py, PyAny>>
    where
        F: Future<Output = Result<T, Error>> + Send + 'static,
        T: for<'a> IntoPyObject<'a> + Send + 'static,
    {
        spawn_awaitable_on(py, self.place(), Some(&self.completions()?), future)
    }
}

#[pymethods]
impl PyServer {
    /// The next event (with an awaitable `reply`) if one is queued, else None; raises
    /// ConnectionClosedError once the server is closed and every event was read.
    fn _try_event(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        match self.core().try_event() {
            Ok(Some(event)) => {
                let wakeup = self.wakeup(py)?;
                let answering = self.driven().map(|driven| (driven, wakeup));
                Ok(Some(event_to_py(py, event, Flavour::Async(answering))?))
            }
            Ok(None) => Ok(None),
            Err(()) => Err(errors::closed(
                py,
                "the server is closed and every event has been read",
            )),
        }
    }

    /// The descriptor that becomes readable (one byte per wake-up) once `_arm` was called and
    /// `_try_event` has an event or the end to report; the loop watches it with `add_reader`.
    fn _wakeup_fd(&self, py: Python<'_>) -> PyResult<i32> {
        Ok(self.wakeup(py)?.fd())
    }

    /// The descriptor that is readable while the connections' runtime has work (`poll_fd.rs`):
    /// the loop watches it and calls `_turn` then, so that it serves the connections itself.
    /// None for a native-mode server, or where it cannot be found.
    fn _poll_fd(&self) -> Option<i32> {
        self.driven().and_then(|driven| driven.poll_fd())
    }

    /// Whether `_try_event` has something to say now (an event, or the end).
    fn _has_event(&self) -> bool {
        self.core().has_event()
    }

    /// Serves the connections for one turn on this thread (see `Driven::turn`): kept answers
    /// are written and what the sockets have is read; returns at once.
    fn _turn(&self) {
        if let Some(driven) = self.driven() {
            driven.turn();
        }
    }

    /// The loop is about to wait for an event: wake it through `_wakeup_fd` when one is there.
    fn _arm(&self, py: Python<'_>) -> PyResult<()> {
        self.wakeup(py)?.arm();
        Ok(())
    }

    /// Sends to one connection, waiting for room in its queue.
    fn _send<'py>(
        &self,
        py: Python<'py>,
        #[pyo3(from_py_with = ints::conn_id)] conn_id: u64,
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
        spawn_awaitable(py, async move { conn.send(data).await })
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

    /// Sends to every connection a publish to `room` reaches but `exclude`; the awaitable gives
    /// how many it reached.
    #[pyo3(signature = (room, data, exclude = None))]
    fn _publish<'py>(
        &self,
        py: Python<'py>,
        room: String,
        data: &Bound<'_, PyAny>,
        exclude: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let data = payload(data)?;
        let exclude = exclusions(exclude)?;
        // The name is checked now, so that a bad one raises at the call, not at the await.
        crate::topic::check_name(&room).map_err(Error::from)?;
        let core = Arc::clone(self.core());
        spawn_awaitable(py, async move { core.publish(&room, data, &exclude).await })
    }

    /// Sends a file to a connection; returns the awaitable of its `FileSent` and the progress.
    fn _send_file<'py>(
        &self,
        py: Python<'py>,
        #[pyo3(from_py_with = ints::conn_id)] conn_id: u64,
        path: PathBuf,
        name: Option<String>,
    ) -> PyResult<(Bound<'py, PyAny>, TransferProgress)> {
        let core = Arc::clone(self.core());
        send_file_awaitable(
            py,
            Place::Runtime(runtime().handle()),
            |progress| async move { core.send_file(conn_id, &path, name, &progress).await },
        )
    }

    /// Closes as `close()` does, without blocking the event loop.
    #[pyo3(signature = (timeout = 5.0))]
    fn _close<'py>(&self, py: Python<'py>, timeout: f64) -> PyResult<Bound<'py, PyAny>> {
        let grace: Duration = duration_from_secs("timeout", timeout)?;
        let core = Arc::clone(self.core());
        core.shutdown();
        spawn_awaitable(py, async move {
            core.wait_closed(grace).await;
            Ok::<_, Error>(())
        })
    }
}
