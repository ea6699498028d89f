//! `socketcomm.Server` and its event classes.
//!
//! Events reach Python three ways: pulled (`recv`, iteration), pushed to `on_*` callbacks by a
//! dispatcher that takes the GIL once per batch, or not at all in the native modes. The
//! connections of an event-mode server run on a runtime of their own that the waiting Python
//! thread drives (`driven.rs`), so a message is read, handled and answered on one thread; Python
//! runs only on the server's Python threads (the `serve_forever` caller, the dispatcher threads,
//! a pull loop's thread), never inside a runtime. The native modes run on the shared runtime.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use pyo3::exceptions::{PyRuntimeError, PyTimeoutError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyBytes;

use super::convert::{address, payload, resolve};
use super::dispatch::{dispatch, in_handler, Scheduler};
use super::driven::Driven;
use super::errors;
use super::events::{event_to_py, Flavour};
use super::exit::{stop_at_exit, with_python};
use super::ints;
use super::json;
use super::options::{pings, socket_options};
use super::runtime::{
    duration_from_secs, forked, refuse_if_forked, runtime, timeout_from_secs, wait,
};
use super::tls::PyServerTls;
use super::transfer::{send_file_blocking, FileReceived, FileSent};
use super::wakeup::Wakeup;
use super::watchdog::{watch, Clocks, HandlerClock, HANDLER_NAMES};
use crate::config::{
    default_max_buffered, Mode, ServerConfig, SlowReader, ACK_REPLY, DEFAULT_INBOUND_BYTES,
    DEFAULT_OUTBOUND_BYTES,
};
use crate::frame::DEFAULT_MAX_FRAME;
use crate::server::{self as core, Event};
use crate::sync::lock;
use crate::transfer::DEFAULT_MAX_FILE_SIZE;
use std::path::PathBuf;

/// The default time `close()` gives connections to flush what is queued for them (also written
/// as a literal in `close`'s signature, where Python shows it).
const CLOSE_GRACE_SECS: f64 = 5.0;

/// The `on_*` callbacks.
struct Handlers {
    on_message: Option<Py<PyAny>>,
    on_connect: Option<Py<PyAny>>,
    on_disconnect: Option<Py<PyAny>>,
    on_file: Option<Py<PyAny>>,
    on_subscribe: Option<Py<PyAny>>,
    /// This dispatcher thread's clock, and every thread's (for the copies `clone_ref` makes).
    clock: Arc<HandlerClock>,
    clocks: Arc<Clocks>,
}

impl Handlers {
    fn any(&self) -> bool {
        self.any_per_message() || self.on_subscribe.is_some()
    }

    /// Whether a handler runs for the events of the events mode (all but `on_subscribe`,
    /// which a native mode runs too).
    fn any_per_message(&self) -> bool {
        self.on_message.is_some()
            || self.on_connect.is_some()
            || self.on_disconnect.is_some()
            || self.on_file.is_some()
    }

    /// In a native mode, where nothing else reads the events: answers a subscription with
    /// `on_subscribe` (logging what it raises), and drops any other event.
    fn screen_or_drop(&self, py: Python<'_>, event: Event) {
        if let Event::Subscribe(asking) = &event {
            if let Err(error) = self.screen(py, asking) {
                log_handler_error(py, &event, error);
            }
        }
    }

    fn clone_ref(&self, py: Python<'_>) -> Handlers {
        let copy = |h: &Option<Py<PyAny>>| h.as_ref().map(|h| h.clone_ref(py));
        Handlers {
            on_message: copy(&self.on_message),
            on_connect: copy(&self.on_connect),
            on_disconnect: copy(&self.on_disconnect),
            on_file: copy(&self.on_file),
            on_subscribe: copy(&self.on_subscribe),
            clock: self.clocks.add(),
            clocks: Arc::clone(&self.clocks),
        }
    }

    /// Runs the callback for one event, and answers the message with what `on_message`
    /// returned. A callback's exception is logged, never propagated: one bad message must not
    /// stop the server. Only `KeyboardInterrupt` (Ctrl-C) comes back.
    ///
    /// # Errors
    /// The `KeyboardInterrupt` a callback raised.
    pub(super) fn handle(&self, py: Python<'_>, event: Event, driven: &Driven) -> PyResult<()> {
        let _running = self.clock.enter(handler_index(&event), event_conn(&event));
        let outcome = match &event {
            Event::Connected(conn) => self
                .on_connect
                .as_ref()
                .map(|h| h.call1(py, (conn.id(), address(conn.peer()))).map(drop)),
            Event::Message(message) => self.on_message.as_ref().map(|h| {
                let data = PyBytes::new(py, &message.data);
                let answer = h.call1(py, (message.conn.id(), data))?;
                let answer = answer.bind(py);
                if answer.is_none() {
                    return Ok(());
                }
                let answer = payload(answer)?;
                driven.reply(py, message, answer).or_else(|e| {
                    if e.is_instance_of::<pyo3::exceptions::PyKeyboardInterrupt>(py) {
                        return Err(e);
                    }
                    // The client left before its answer: not the handler's fault.
                    log::debug!("cannot deliver the handler's answer: {e}");
                    Ok(())
                })
            }),
            Event::FileReceived { conn, file } => self.on_file.as_ref().map(|h| {
                let file =
                    FileReceived::new(conn.id(), file.clone(), conn.peer_identity().cloned());
                h.call1(py, (conn.id(), file)).map(drop)
            }),
            Event::Disconnected { conn, reason } => self
                .on_disconnect
                .as_ref()
                .map(|h| h.call1(py, (conn.id(), reason.reason.as_str())).map(drop)),
            Event::Subscribe(asking) => Some(self.screen(py, asking)),
        };
        if let Some(Err(error)) = outcome {
            if error.is_instance_of::<pyo3::exceptions::PyKeyboardInterrupt>(py) {
                return Err(error);
            }
            log_handler_error(py, &event, error);
        }
        Ok(())
    }
}

impl Handlers {
    /// Answers a client's subscription with what `on_subscribe` says: a true value lets it
    /// subscribe, a false one (or an exception, which is logged too) refuses it.
    fn screen(&self, py: Python<'_>, asking: &core::Subscription) -> PyResult<()> {
        let Some(hook) = &self.on_subscribe else {
            asking.accept();
            return Ok(());
        };
        let verdict = hook
            .call1(py, (asking.conn.id(), asking.pattern.as_str()))
            .and_then(|verdict| verdict.bind(py).is_truthy());
        match verdict {
            Ok(true) => asking.accept(),
            Ok(false) => asking.refuse("the server's on_subscribe refused it"),
            Err(e) => {
                asking.refuse("the server's on_subscribe failed");
                return Err(e);
            }
        }
        Ok(())
    }
}

/// Which handler an event goes to, as an index into [`HANDLER_NAMES`].
fn handler_index(event: &Event) -> usize {
    match event {
        Event::Connected(_) => 0,
        Event::Message(_) => 1,
        Event::FileReceived { .. } => 2,
        Event::Disconnected { .. } => 3,
        Event::Subscribe(_) => 4,
    }
}

pub(super) fn event_conn(event: &Event) -> u64 {
    match event {
        Event::Connected(conn) | Event::FileReceived { conn, .. } => conn.id(),
        Event::Disconnected { conn, .. } => conn.id(),
        Event::Subscribe(asking) => asking.conn.id(),
        Event::Message(message) => message.conn.id(),
    }
}

fn log_handler_error(py: Python<'_>, event: &Event, error: PyErr) {
    let which = HANDLER_NAMES[handler_index(event)];
    let logged = (|| -> PyResult<()> {
        let logger = py
            .import("logging")?
            .call_method1("getLogger", ("socketcomm.server",))?;
        let kwargs = pyo3::types::PyDict::new(py);
        kwargs.set_item("exc_info", error.value(py))?;
        logger.call_method(
            "error",
            (format!("{which} handler raised; the server keeps serving"),),
            Some(&kwargs),
        )?;
        Ok(())
    })();
    if logged.is_err() {
        error.print(py);
    }
}

/// A TCP server; see the stub for the full description.
#[pyclass(frozen, module = "socketcomm._socketcomm", name = "Server")]
pub(crate) struct PyServer {
    core: Arc<core::Server>,
    handlers: Handlers,
    /// How many dispatcher threads run the handlers, and what they share.
    handler_threads: usize,
    /// The dispatchers' shared state, on an event-mode server, with the runtime its
    /// connections run on (`None` in the native modes, whose connections run on the shared
    /// runtime: no Python waits for their messages).
    scheduler: Option<Arc<Scheduler>>,
    dispatchers: Mutex<Vec<JoinHandle<()>>>,
    /// How the events reach an asyncio loop, once `socketcomm.aio` serves this server.
    wakeup: PyOnceLock<Arc<Wakeup>>,
}

fn parse_mode(mode: &str, handlers: &Handlers) -> PyResult<Mode> {
    let mode = Mode::parse(mode).map_err(PyErr::from)?;
    if handlers.any_per_message() && mode.is_native() {
        return Err(PyValueError::new_err(format!(
            "invalid mode: the on_* handlers need mode='events', but mode={:?} answers natively \
             (on_subscribe alone works in every mode)",
            mode.name()
        )));
    }
    Ok(mode)
}

#[pymethods]
impl PyServer {
    #[new]
    #[pyo3(signature = (
        // A literal, so that the signature Python sees shows it (DEFAULT_HOST, checked by a test).
        host = "127.0.0.1",
        port = 0,
        *,
        mode = "events",
        reply = None,
        on_message = None,
        on_connect = None,
        on_disconnect = None,
        on_file = None,
        on_subscribe = None,
        handler_threads = 4,
        slow_handler = 5.0,
        upload_dir = None,
        max_file_size = DEFAULT_MAX_FILE_SIZE,
        partial_ttl = 86400.0,
        max_partial_bytes = None,
        tls = None,
        tls_handshake_timeout = 10.0,
        hello_timeout = 10.0,
        max_frame = DEFAULT_MAX_FRAME,
        max_connections = 10_000,
        max_connections_per_ip = None,
        idle_timeout = None,
        raw_min_rate = 0,
        slow_reader = "disconnect",
        backlog = 1024,
        nodelay = true,
        keepalive = None,
        keepalive_interval = None,
        keepalive_count = None,
        recv_buffer = None,
        send_buffer = None,
        linger = None,
        reuse_addr = true,
        reuse_port = false,
        workers = 1,
        event_queue = 4096,
        outbound_queue = 1024,
        outbound_bytes = DEFAULT_OUTBOUND_BYTES,
        inbound_bytes = DEFAULT_INBOUND_BYTES,
        max_buffered = None,
        ping_interval = 20.0,
        ping_timeout = 20.0,
        backplane = None,
        screen_subscriptions = false,
    ))]
    // Each argument is a Python keyword option.
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        host: &str,
        #[pyo3(from_py_with = ints::port)] port: u16,
        mode: &str,
        reply: Option<&Bound<'_, PyAny>>,
        on_message: Option<Py<PyAny>>,
        on_connect: Option<Py<PyAny>>,
        on_disconnect: Option<Py<PyAny>>,
        on_file: Option<Py<PyAny>>,
        on_subscribe: Option<Py<PyAny>>,
        #[pyo3(from_py_with = ints::handler_threads)] handler_threads: usize,
        slow_handler: f64,
        upload_dir: Option<PathBuf>,
        #[pyo3(from_py_with = ints::max_file_size)] max_file_size: u64,
        partial_ttl: f64,
        #[pyo3(from_py_with = ints::max_partial_bytes)] max_partial_bytes: Option<u64>,
        tls: Option<PyRef<'_, PyServerTls>>,
        tls_handshake_timeout: f64,
        hello_timeout: Option<f64>,
        #[pyo3(from_py_with = ints::max_frame)] max_frame: u32,
        #[pyo3(from_py_with = ints::max_connections)] max_connections: usize,
        #[pyo3(from_py_with = ints::max_connections_per_ip)] max_connections_per_ip: Option<usize>,
        idle_timeout: Option<f64>,
        #[pyo3(from_py_with = ints::raw_min_rate)] raw_min_rate: u64,
        slow_reader: &str,
        #[pyo3(from_py_with = ints::backlog)] backlog: u32,
        nodelay: bool,
        keepalive: Option<f64>,
        keepalive_interval: Option<f64>,
        #[pyo3(from_py_with = ints::keepalive_count)] keepalive_count: Option<u32>,
        #[pyo3(from_py_with = ints::recv_buffer)] recv_buffer: Option<usize>,
        #[pyo3(from_py_with = ints::send_buffer)] send_buffer: Option<usize>,
        linger: Option<f64>,
        reuse_addr: bool,
        reuse_port: bool,
        #[pyo3(from_py_with = ints::workers)] workers: usize,
        #[pyo3(from_py_with = ints::event_queue)] event_queue: usize,
        #[pyo3(from_py_with = ints::outbound_queue)] outbound_queue: usize,
        #[pyo3(from_py_with = ints::outbound_bytes)] outbound_bytes: usize,
        #[pyo3(from_py_with = ints::inbound_bytes)] inbound_bytes: usize,
        #[pyo3(from_py_with = ints::max_buffered)] max_buffered: Option<usize>,
        ping_interval: Option<f64>,
        ping_timeout: Option<f64>,
        backplane: Option<String>,
        screen_subscriptions: bool,
    ) -> PyResult<PyServer> {
        refuse_if_forked()?;
        for (option, handler) in [
            ("on_message", &on_message),
            ("on_connect", &on_connect),
            ("on_disconnect", &on_disconnect),
            ("on_file", &on_file),
            ("on_subscribe", &on_subscribe),
        ] {
            if let Some(handler) = handler.as_ref().map(|h| h.bind(py)) {
                if !handler.is_callable() {
                    return Err(pyo3::exceptions::PyTypeError::new_err(format!(
                        "invalid {option}: it must be callable (a function taking the \
                         connection id and the event's data), not {}",
                        handler.get_type().name()?
                    )));
                }
            }
        }
        let clocks = Arc::new(Clocks::default());
        let handlers = Handlers {
            on_message,
            on_connect,
            on_disconnect,
            on_file,
            on_subscribe,
            clock: clocks.add(),
            clocks: Arc::clone(&clocks),
        };
        if !(1..=64).contains(&handler_threads) {
            return Err(PyValueError::new_err(
                "invalid handler_threads: must be between 1 and 64",
            ));
        }
        let slow_handler = Some(duration_from_secs("slow_handler", slow_handler)?)
            .filter(|limit| !limit.is_zero())
            .ok_or_else(|| PyValueError::new_err("invalid slow_handler: must be positive"))?;
        let config = ServerConfig {
            mode: parse_mode(mode, &handlers)?,
            ack_reply: match reply {
                Some(reply) => payload(reply).map_err(|e| {
                    pyo3::exceptions::PyTypeError::new_err(format!("invalid reply: {e}"))
                })?,
                None => bytes::Bytes::from_static(ACK_REPLY),
            },
            max_frame,
            backlog,
            event_queue,
            outbound_queue,
            outbound_bytes,
            inbound_bytes,
            max_buffered: max_buffered.unwrap_or_else(default_max_buffered),
            socket: socket_options(
                nodelay,
                keepalive,
                keepalive_interval,
                keepalive_count,
                recv_buffer,
                send_buffer,
                linger,
            )?,
            reuse_addr,
            reuse_port,
            workers,
            max_connections,
            max_connections_per_ip,
            idle_timeout: timeout_from_secs("idle_timeout", idle_timeout)?,
            raw_min_rate,
            slow_reader: SlowReader::parse(slow_reader)?,
            upload_dir,
            max_file_size,
            partial_ttl: duration_from_secs("partial_ttl", partial_ttl)?,
            max_partial_bytes,
            tls: tls.map(|tls| tls.core.clone()),
            tls_handshake_timeout: duration_from_secs(
                "tls_handshake_timeout",
                tls_handshake_timeout,
            )?,
            hello_timeout: timeout_from_secs("hello_timeout", hello_timeout)?,
            pings: pings(ping_interval, ping_timeout)?,
            subscription_events: handlers.on_subscribe.is_some() || screen_subscriptions,
            backplane,
        };
        let addr = resolve(py, host, port)?;
        let core = Arc::new(py.detach(|| core::Server::bind(addr, config))?);
        let driven = if core.config().mode.is_native() {
            // Serve at once: a client connecting right after construction must get its hello
            // answered, whether or not anyone reads the events yet (they queue, bounded).
            core.start(runtime().handle());
            None
        } else {
            // The same, by the caretaker, until a Python thread drives the connections.
            let serving = Arc::clone(&core);
            let driven = Arc::new(Driven::new(move || serving.has_ended())?);
            core.start_serving_on(runtime().handle(), driven.handle());
            Some(driven)
        };
        if handlers.any() {
            watch(
                Arc::clone(&handlers.clocks),
                core.events().clone(),
                slow_handler,
            );
        }
        let scheduler = driven.map(|driven| {
            Arc::new(Scheduler::new(
                core.events().clone(),
                driven,
                handler_threads,
            ))
        });
        Ok(PyServer {
            core,
            handlers,
            handler_threads,
            scheduler,
            dispatchers: Mutex::new(Vec::new()),
            wakeup: PyOnceLock::new(),
        })
    }

    /// The listening socket's file descriptor (to inspect it with `socket.socket(fileno=...)`
    /// on a `os.dup` of it; do not close it).
    fn fileno(&self) -> i32 {
        self.core.listener_fd()
    }

    /// `(host, port)` the server listens on.
    #[getter]
    fn address(&self) -> (String, u16) {
        address(self.core.local_addr())
    }

    #[getter]
    fn mode(&self) -> &'static str {
        self.core.config().mode.name()
    }

    /// The SHA-256 fingerprint of the server's TLS certificate; None without TLS.
    #[getter]
    fn tls_fingerprint(&self) -> Option<String> {
        self.core
            .config()
            .tls
            .as_ref()
            .map(|tls| tls.fingerprint().to_owned())
    }

    /// Whether `close()` was called.
    #[getter]
    fn closed(&self) -> bool {
        self.core.is_shutting_down()
    }

    /// Starts serving in the background and returns. With `on_*` handlers, `handler_threads`
    /// dispatcher threads run them. Idempotent.
    fn start(&self, py: Python<'_>) -> PyResult<()> {
        self.start_accepting(py)?;
        if self.core.config().mode.is_native() {
            self.spawn_screener(py)?;
        } else if self.handlers.any() {
            self.spawn_dispatchers(py, 0)?;
        }
        Ok(())
    }

    /// Serves until `close()` is called (from another thread or a handler) or Ctrl-C.
    fn serve_forever(&self, py: Python<'_>) -> PyResult<()> {
        let config = self.core.config();
        let drops_files = config.upload_dir.is_some();
        if !self.handlers.any() && !config.mode.is_native() && !drops_files {
            return Err(PyValueError::new_err(
                "nothing would answer messages: pass on_message=..., choose mode='echo' or \
                 mode='ack', give it an upload_dir to receive files, or iterate over the \
                 server instead (for event in server: ...)",
            ));
        }
        self.start_accepting(py)?;
        let events = self.core.events().clone();
        if self.handlers.any() && !config.mode.is_native() {
            if let Some(scheduler) = self.spawn_dispatchers(py, 1)? {
                // Be dispatcher 0 on this thread (with a clock of its own).
                let handlers = self.handlers.clone_ref(py);
                let driven = scheduler.driven();
                return dispatch(py, &scheduler, 0, |py, event| {
                    handlers.handle(py, event, driven)
                });
            }
            // start() already runs the dispatchers; wait for the server to end.
            // NOTE: the sleep is made inside the future, where the runtime is entered: made
            // here, on a thread outside any runtime, it panicked.
            while !(events.is_disconnected() && events.is_empty()) {
                let pause = async { tokio::time::sleep(Duration::from_millis(100)).await };
                wait(py, pause, None)?;
            }
            return Ok(());
        }
        // A native mode, or a file drop (files are received natively; messages are read and
        // dropped): the events have no reader; drain them, answering subscriptions.
        while let Ok(event) = self
            .serve_until(py, events.recv_async(), None)?
            .expect("waits without a timeout")
        {
            self.handlers.screen_or_drop(py, event);
        }
        Ok(())
    }

    /// Stops accepting, closes every connection after what is queued for it (with a reason),
    /// waits up to `timeout` seconds for that, and returns. Idempotent.
    #[pyo3(signature = (timeout = 5.0))]
    fn close(&self, py: Python<'_>, timeout: f64) -> PyResult<()> {
        let grace = duration_from_secs("timeout", timeout)?;
        self.core.shutdown();
        self.serve_until(py, self.core.wait_closed(grace), None)?;
        let dispatchers = std::mem::take(&mut *lock(&self.dispatchers));
        if in_handler() {
            // close() called from a handler: the dispatchers (this one too) end by themselves
            // once the last events are handled, which cannot happen while this one waits here.
            return Ok(());
        }
        for thread in dispatchers {
            // In slices, so that Ctrl-C still works while a handler finishes.
            while !thread.is_finished() {
                py.detach(|| std::thread::sleep(Duration::from_millis(10)));
                py.check_signals()?;
            }
            thread
                .join()
                .map_err(|_| PyRuntimeError::new_err("a dispatcher thread panicked"))?;
        }
        Ok(())
    }

    /// The next event, waiting up to `timeout` seconds (None: no limit).
    ///
    /// Raises TimeoutError when none arrives in time, and ConnectionClosedError once the server
    /// is closed and every event was read.
    #[pyo3(signature = (timeout = None))]
    fn recv(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Py<PyAny>> {
        let limit = timeout_from_secs("timeout", timeout)?;
        match self.next_event(py, limit)? {
            NextEvent::Event(event) => Ok(event),
            NextEvent::TimedOut => Err(PyTimeoutError::new_err(format!(
                "no event within {} seconds",
                timeout.unwrap_or_default()
            ))),
            NextEvent::Closed => Err(errors::closed(
                py,
                "the server is closed and every event has been read",
            )),
        }
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyResult<PyRef<'_, Self>> {
        if !slf.core.is_shutting_down() {
            slf.start_accepting(slf.py())?;
        }
        Ok(slf)
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        match self.next_event(py, None)? {
            NextEvent::Event(event) => Ok(Some(event)),
            NextEvent::TimedOut | NextEvent::Closed => Ok(None),
        }
    }

    /// Sends `data` (str as UTF-8, or bytes-like) to the connection `conn_id`.
    fn send(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = ints::conn_id)] conn_id: u64,
        data: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let data = payload(data)?;
        let Some(conn) = self.core.connection(conn_id) else {
            return Err(errors::closed(
                py,
                &format!("there is no connection {conn_id}: it has ended, or never existed"),
            ));
        };
        wait(py, async move { conn.send(data).await }, None)?.expect("waits without a timeout")?;
        Ok(())
    }

    /// Sends the file at `path` to the connection `conn_id` (which needs a `download_dir`),
    /// streamed and verified; returns once the client has saved it.
    #[pyo3(signature = (conn_id, path, name = None, *, progress = None, timeout = None))]
    fn send_file(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = ints::conn_id)] conn_id: u64,
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
            |path, name, progress| async move { core.send_file(conn_id, &path, name, &progress).await },
        )
    }

    /// Up to `max` events: waits up to `timeout` seconds for the first (None: no limit), then
    /// takes what is already queued. An empty list when none arrived in time.
    #[pyo3(signature = (max = 256, timeout = None))]
    fn recv_many(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = ints::max)] max: usize,
        timeout: Option<f64>,
    ) -> PyResult<Vec<Py<PyAny>>> {
        if max == 0 {
            return Err(PyValueError::new_err("invalid max: must be at least 1"));
        }
        let limit = timeout_from_secs("timeout", timeout)?;
        let first = match self.next_event(py, limit)? {
            NextEvent::Event(event) => event,
            NextEvent::TimedOut => return Ok(Vec::new()),
            NextEvent::Closed => {
                return Err(errors::closed(
                    py,
                    "the server is closed and every event has been read",
                ))
            }
        };
        let mut batch = vec![first];
        for event in self.core.events().try_iter().take(max - 1) {
            batch.push(event_to_py(py, event, Flavour::Blocking(self.driven()))?);
        }
        Ok(batch)
    }

    /// Counters of what the server has done: connections (now and in all), messages and bytes
    /// each way, and endings by kind.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, pyo3::types::PyDict>> {
        let stats = self.core.stats();
        let all = pyo3::types::PyDict::new(py);
        for (name, value) in [
            ("connections", stats.connections),
            ("connections_total", stats.connections_total),
            ("messages_in", stats.messages_in),
            ("messages_out", stats.messages_out),
            ("bytes_in", stats.bytes_in),
            ("bytes_out", stats.bytes_out),
            ("refused_full", stats.refused_full),
            ("protocol_errors", stats.protocol_errors),
            ("idle_timeouts", stats.idle_timeouts),
            ("slow_readers", stats.slow_readers),
            ("connection_errors", stats.connection_errors),
            ("files_received", stats.files_received),
            ("files_sent", stats.files_sent),
            ("transfers_failed", stats.transfers_failed),
            ("tls_failures", stats.tls_failures),
            ("rooms", stats.rooms),
            ("backplane_connected", stats.backplane_connected),
            ("backplane_published", stats.backplane_published),
            ("backplane_received", stats.backplane_received),
            ("backplane_dropped", stats.backplane_dropped),
        ] {
            all.set_item(name, value)?;
        }
        Ok(all)
    }

    /// The live connections: `{conn_id: (host, port)}`, oldest first.
    #[getter]
    fn connections<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, pyo3::types::PyDict>> {
        let live = pyo3::types::PyDict::new(py);
        for conn in self.core.connections() {
            live.set_item(conn.id(), address(conn.peer()))?;
        }
        Ok(live)
    }

    /// Sends `data` to every connection but those in `exclude` (an id or ids); returns how many
    /// it reached. A client whose queue is full is handled by the `slow_reader` policy.
    #[pyo3(signature = (data, exclude = None))]
    fn broadcast(
        &self,
        py: Python<'_>,
        data: &Bound<'_, PyAny>,
        exclude: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<usize> {
        self.fan_out(py, None, data, exclude)
    }

    /// Sends `obj` as a JSON message to one connection.
    #[pyo3(signature = (conn_id, obj, *, dumps = None))]
    fn send_json(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = ints::conn_id)] conn_id: u64,
        obj: &Bound<'_, PyAny>,
        dumps: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        self.send(py, conn_id, &json::dumps(py, obj, dumps)?)
    }

    /// Sends `obj` as JSON to every connection but `exclude`, as `broadcast`.
    #[pyo3(signature = (obj, exclude = None, *, dumps = None))]
    fn broadcast_json(
        &self,
        py: Python<'_>,
        obj: &Bound<'_, PyAny>,
        exclude: Option<&Bound<'_, PyAny>>,
        dumps: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<usize> {
        self.fan_out(py, None, &json::dumps(py, obj, dumps)?, exclude)
    }

    /// Publishes `obj` as JSON to `room`, as `publish`.
    #[pyo3(signature = (room, obj, exclude = None, *, dumps = None))]
    fn publish_json(
        &self,
        py: Python<'_>,
        room: &str,
        obj: &Bound<'_, PyAny>,
        exclude: Option<&Bound<'_, PyAny>>,
        dumps: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<usize> {
        self.fan_out(py, Some(room), &json::dumps(py, obj, dumps)?, exclude)
    }

    /// Puts connection `conn_id` in `room` (a name such as ``"lobby"`` or ``"chat.lobby"``, or a
    /// pattern: ``"chat.*"``, ``"chat.>"``); False when it was in it already.
    fn join(
        &self,
        #[pyo3(from_py_with = ints::conn_id)] conn_id: u64,
        room: &str,
    ) -> PyResult<bool> {
        Ok(self.core.join(conn_id, room)?)
    }

    /// Takes connection `conn_id` out of `room` (as joined); False when it was not in it.
    fn leave(&self, #[pyo3(from_py_with = ints::conn_id)] conn_id: u64, room: &str) -> bool {
        self.core.leave(conn_id, room)
    }

    /// The rooms connection `conn_id` is in, sorted (none once it has ended).
    fn rooms(&self, #[pyo3(from_py_with = ints::conn_id)] conn_id: u64) -> Vec<String> {
        self.core.rooms(conn_id)
    }

    /// The ids of the connections a publish to `room` reaches, sorted.
    fn members(&self, room: &str) -> PyResult<Vec<u64>> {
        Ok(self.core.members(room)?)
    }

    /// Sends `data` to every connection in `room` (or in a pattern that matches it) but those
    /// in `exclude`, each once; returns how many it reached. As `broadcast` otherwise.
    #[pyo3(signature = (room, data, exclude = None))]
    fn publish(
        &self,
        py: Python<'_>,
        room: &str,
        data: &Bound<'_, PyAny>,
        exclude: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<usize> {
        self.fan_out(py, Some(room), data, exclude)
    }

    /// The round trip of the last ping the server sent `conn_id` and the client answered, in
    /// seconds; `None` before the first answer, with pings off, and for a raw client.
    /// `ConnectionClosedError` when there is no such connection.
    fn latency(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = ints::conn_id)] conn_id: u64,
    ) -> PyResult<Option<f64>> {
        let Some(conn) = self.core.connection(conn_id) else {
            return Err(errors::closed(
                py,
                &format!("there is no connection {conn_id}: it has ended, or never existed"),
            ));
        };
        Ok(conn.latency().map(|latency| latency.as_secs_f64()))
    }

    /// Closes the connection `conn_id` after what is queued for it, telling a framed client
    /// `reason`. Returns False when there is no such connection (any more).
    #[pyo3(signature = (conn_id, reason = "closed by the server"))]
    fn disconnect(&self, #[pyo3(from_py_with = ints::conn_id)] conn_id: u64, reason: &str) -> bool {
        match self.core.connection(conn_id) {
            Some(conn) => {
                conn.close(reason);
                true
            }
            None => false,
        }
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyResult<PyRef<'_, Self>> {
        slf.start(slf.py())?;
        Ok(slf)
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<()> {
        self.close(py, CLOSE_GRACE_SECS)
    }

    fn __repr__(&self) -> String {
        let (host, port) = address(self.core.local_addr());
        let state = if self.core.is_shutting_down() {
            "closed"
        } else {
            "open"
        };
        format!(
            "<socketcomm.Server {host}:{port} mode={} {state}>",
            self.core.config().mode.name()
        )
    }
}

enum NextEvent {
    Event(Py<PyAny>),
    TimedOut,
    Closed,
}

/// The connection ids a broadcast skips: none, one id, or an iterable of ids.
pub(crate) fn exclusions(exclude: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<u64>> {
    match exclude {
        None => Ok(Vec::new()),
        Some(one) if one.is_instance_of::<pyo3::types::PyInt>() => {
            Ok(vec![ints::int_option(one, "exclude")?])
        }
        Some(many) => many
            .try_iter()
            .map_err(|_| {
                let kind = many
                    .get_type()
                    .name()
                    .map(|n| n.to_string())
                    .unwrap_or_default();
                pyo3::exceptions::PyTypeError::new_err(format!(
                    "invalid exclude: expected a connection id or an iterable of them, not {kind}"
                ))
            })?
            .map(|id| id.and_then(|id| ints::int_option(&id, "exclude")))
            .collect(),
    }
}

impl PyServer {
    pub(crate) fn core(&self) -> &Arc<core::Server> {
        &self.core
    }

    /// Sends `data` to every connection (`room` None: a broadcast), or to those a publish to
    /// `room` reaches, but `exclude`; how many it reached.
    fn fan_out(
        &self,
        py: Python<'_>,
        room: Option<&str>,
        data: &Bound<'_, PyAny>,
        exclude: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<usize> {
        let data = payload(data)?;
        let exclude = exclusions(exclude)?;
        let core = &self.core;
        let sending = async move {
            match room {
                None => Ok(core.broadcast(data, &exclude).await),
                Some(room) => core.publish(room, data, &exclude).await,
            }
        };
        Ok(wait(py, sending, None)?.expect("waits without a timeout")?)
    }

    /// The runtime an event-mode server's connections run on.
    pub(crate) fn driven(&self) -> Option<&Arc<Driven>> {
        self.scheduler.as_ref().map(|scheduler| scheduler.driven())
    }

    /// The wake-up socket of `socketcomm.aio`, made on first use.
    ///
    /// # Errors
    /// `OSError` when the socket pair cannot be made.
    pub(crate) fn wakeup(&self, py: Python<'_>) -> PyResult<&Arc<Wakeup>> {
        // NOTE: read for every event an asyncio server takes; a lock there cost more than the
        // rest of the lookup.
        let made = self.wakeup.get_or_try_init(py, || {
            let handle = self.driven().map_or(runtime().handle(), |d| d.handle());
            Wakeup::start(Arc::clone(&self.core), self.driven().cloned(), handle)
        })?;
        Ok(made)
    }

    /// Drives `future` to its end from this Python thread: on an event-mode server this thread
    /// serves the connections meanwhile.
    ///
    /// # Errors
    /// Whatever a signal handler raises.
    fn serve_until<F>(
        &self,
        py: Python<'_>,
        future: F,
        timeout: Option<Duration>,
    ) -> PyResult<Option<F::Output>>
    where
        F: std::future::Future + Send,
        F::Output: Send,
    {
        match self.driven() {
            Some(driven) => driven.drive(py, future, timeout),
            None => wait(py, future, timeout),
        }
    }

    /// Starts the dispatcher threads from number `first` on (the caller is dispatcher 0 when
    /// `first` is 1), unless they were started already; returns their scheduler if it did. At
    /// exit, a server still serving is stopped so that they leave Python before the
    /// interpreter goes away.
    fn spawn_dispatchers(&self, py: Python<'_>, first: usize) -> PyResult<Option<Arc<Scheduler>>> {
        let Some(scheduler) = &self.scheduler else {
            return Ok(None);
        };
        let mut dispatchers = lock(&self.dispatchers);
        if !dispatchers.is_empty() {
            return Ok(None);
        }
        let (running, ended) = std::sync::mpsc::channel::<()>();
        for n in first..self.handler_threads {
            let scheduler = Arc::clone(scheduler);
            let handlers = self.handlers.clone_ref(py);
            let running = running.clone();
            let thread = std::thread::Builder::new()
                .name(format!("socketcomm-dispatch-{n}"))
                .spawn(move || {
                    // Dropped when this thread ends, which is what exit waits for.
                    let _running = running;
                    with_python(|py| {
                        let driven = scheduler.driven();
                        let handle = |py: Python<'_>, event| handlers.handle(py, event, driven);
                        if let Err(e) = dispatch(py, &scheduler, n, handle) {
                            e.print(py);
                        }
                    });
                })
                .map_err(|e| PyRuntimeError::new_err(format!("cannot start a dispatcher: {e}")))?;
            dispatchers.push(thread);
        }
        drop(running);
        let core = Arc::clone(&self.core);
        stop_at_exit(Box::new(move || {
            core.shutdown();
            let _ = ended.recv();
        }));
        Ok(Some(Arc::clone(scheduler)))
    }

    /// A native-mode server with `on_subscribe`: one thread answers its subscriptions (the
    /// connections wait for the answers), until the server has ended. Once.
    fn spawn_screener(&self, py: Python<'_>) -> PyResult<()> {
        if self.handlers.on_subscribe.is_none() {
            return Ok(());
        }
        let mut dispatchers = lock(&self.dispatchers);
        if !dispatchers.is_empty() {
            return Ok(());
        }
        let events = self.core.events().clone();
        let handlers = self.handlers.clone_ref(py);
        let thread = std::thread::Builder::new()
            .name("socketcomm-subscriptions".to_owned())
            .spawn(move || {
                while let Ok(event) = events.recv() {
                    with_python(|py| handlers.screen_or_drop(py, event));
                }
            })
            .map_err(|e| PyRuntimeError::new_err(format!("cannot start a thread: {e}")))?;
        dispatchers.push(thread);
        Ok(())
    }

    /// Starts the accept loop unless it runs; refuses a closed server.
    fn start_accepting(&self, py: Python<'_>) -> PyResult<()> {
        if self.core.is_shutting_down() {
            return Err(errors::closed(
                py,
                "the server is closed; create a new Server",
            ));
        }
        self.core.start(runtime().handle());
        Ok(())
    }

    fn next_event(&self, py: Python<'_>, timeout: Option<Duration>) -> PyResult<NextEvent> {
        let to_py = |event| event_to_py(py, event, Flavour::Blocking(self.driven()));
        // NOTE: the common case of a busy loop, an event queued already, costs one look at
        // the queue: a queued event means the server was started, and the answers given
        // meanwhile are queued once this thread next drives the runtime (below).
        if let Ok(Some(event)) = self.core.try_event() {
            return Ok(NextEvent::Event(to_py(event)?));
        }
        if !self.core.is_shutting_down() {
            self.start_accepting(py)?;
        }
        let events = self.core.events().clone();
        match self.serve_until(py, async move { events.recv_async().await }, timeout)? {
            None => Ok(NextEvent::TimedOut),
            Some(Err(_)) => Ok(NextEvent::Closed),
            Some(Ok(event)) => Ok(NextEvent::Event(to_py(event)?)),
        }
    }
}

impl Drop for PyServer {
    fn drop(&mut self) {
        if forked() {
            // Inherited from the parent: its connections are the parent's. Stopping them here
            // would wake and deregister what the parent still serves.
            return;
        }
        // Collected without close(): stop the tasks rather than leave them serving.
        self.core.shutdown();
    }
}
