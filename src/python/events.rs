//! The event classes a server yields: `Connected`, `Disconnected`, `FileReceived` (in
//! `transfer.rs`), and a message in two flavours, `Message` (whose `reply` blocks) for the sync
//! API and its subclass `AsyncMessage` (whose `reply` is awaited) for `socketcomm.aio`.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};

use super::aio::{ready, schedule_flush, spawn_awaitable};
use std::sync::Arc;

use super::convert::{address, payload};
use super::driven::Driven;
use super::json;
use super::runtime::wait;
use super::tls::{identity_of, PyPeerIdentity};
use super::transfer::FileReceived;
use super::wakeup::Wakeup;
use crate::error::CloseInfo;
use crate::server::{self as core, Event, Reservation};
use crate::tls::PeerIdentity;

/// A client connected.
#[pyclass(frozen, module = "socketcomm._socketcomm")]
pub(crate) struct Connected {
    #[pyo3(get)]
    conn_id: u64,
    #[pyo3(get)]
    peer: (String, u16),
    identity: Option<PeerIdentity>,
}

#[pymethods]
impl Connected {
    /// The client's verified certificate, on a mutual-TLS server.
    #[getter]
    fn peer_identity(&self) -> Option<PyPeerIdentity> {
        self.identity.as_ref().map(PyPeerIdentity::from)
    }

    fn __repr__(&self) -> String {
        format!(
            "Connected(conn_id={}, peer={})",
            self.conn_id,
            peer_repr(&self.peer)
        )
    }
}

/// What both message flavours hold.
struct MessageFields {
    inner: core::Message,
    data: Py<PyBytes>,
}

impl MessageFields {
    fn new(py: Python<'_>, mut message: core::Message) -> MessageFields {
        // The application has the message now: however long it keeps this object, the
        // connection may read on.
        message.release();
        // NOTE: the peer's address is made into Python values only when asked for: most
        // loops never look at it, and every message would pay for formatting it.
        MessageFields {
            data: PyBytes::new(py, &message.data).unbind(),
            inner: message,
        }
    }

    fn text<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyString>> {
        let text = std::str::from_utf8(&self.inner.data).map_err(|e| {
            PyValueError::new_err(format!(
                "the message is not valid UTF-8 ({e}); use .data for the bytes"
            ))
        })?;
        Ok(PyString::new(py, text))
    }

    fn repr(&self, py: Python<'_>, class: &str) -> PyResult<String> {
        Ok(format!(
            "{class}(conn_id={}, peer={}, data={})",
            self.inner.conn.id(),
            peer_repr(&address(self.inner.conn.peer())),
            self.data.bind(py).repr()?
        ))
    }
}

/// A message from a client; `reply()` answers it.
///
/// NOTE: subclassable so that `AsyncMessage` is a `Message`: `isinstance(event, Message)` then
/// holds in an asyncio server too, where it would otherwise silently match nothing.
#[pyclass(frozen, subclass, module = "socketcomm._socketcomm")]
pub(crate) struct Message {
    fields: MessageFields,
    /// The runtime its connection runs on, when a Python thread drives it (see `driven.rs`).
    driven: Option<Arc<Driven>>,
}

/// A message from a client, as `socketcomm.aio` yields it: `await message.reply(...)`.
#[pyclass(frozen, extends = Message, module = "socketcomm._socketcomm")]
pub(crate) struct AsyncMessage {
    /// Where its answer is kept until the loop's turn ends (see `wakeup.rs`).
    answering: Option<(Arc<Driven>, Arc<Wakeup>)>,
}

#[pymethods]
impl Message {
    #[getter]
    fn conn_id(&self) -> u64 {
        self.fields.inner.conn.id()
    }

    #[getter]
    fn peer(&self) -> (String, u16) {
        address(self.fields.inner.conn.peer())
    }

    #[getter]
    fn data(&self, py: Python<'_>) -> Py<PyBytes> {
        self.fields.data.clone_ref(py)
    }

    /// The client's verified certificate, on a mutual-TLS server.
    #[getter]
    fn peer_identity(&self) -> Option<PyPeerIdentity> {
        identity_of(&self.fields.inner.conn)
    }

    /// The correlation id when the client sent a request (and waits for the reply).
    #[getter]
    fn request_id(&self) -> Option<u32> {
        self.fields.inner.request_id
    }

    /// The topic the client published the message to (``client.publish``); None for a
    /// direct message.
    #[getter]
    fn topic(&self) -> Option<&str> {
        self.fields.inner.topic.as_deref()
    }

    /// True when the client is a plain socket: the data is what one read returned.
    #[getter]
    fn raw(&self) -> bool {
        !self.fields.inner.conn.is_framed()
    }

    /// The data decoded as UTF-8.
    #[getter]
    fn text<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyString>> {
        self.fields.text(py)
    }

    fn __repr__(slf: &Bound<'_, Self>) -> PyResult<String> {
        let class = slf.get_type().name()?;
        slf.get().fields.repr(slf.py(), &class.to_cow()?)
    }

    /// The message decoded from JSON (`json.loads`, or the `loads` given).
    #[pyo3(signature = (*, loads = None))]
    fn json<'py>(
        &self,
        py: Python<'py>,
        loads: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        json::loads(py, &self.fields.inner.data, loads)
    }

    /// Answers this message with `obj` as JSON (`json.dumps`, or the `dumps` given).
    #[pyo3(signature = (obj, *, dumps = None))]
    fn reply_json(
        &self,
        py: Python<'_>,
        obj: &Bound<'_, PyAny>,
        dumps: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        self.reply(py, &json::dumps(py, obj, dumps)?)
    }

    /// Answers this message: the reply to a request, or a plain message otherwise.
    fn reply(&self, py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let data = payload(data)?;
        if let Some(driven) = &self.driven {
            return driven.reply(py, &self.fields.inner, data);
        }
        let message = self.fields.inner.clone();
        wait(py, async move { message.reply(data).await }, None)?
            .expect("waits without a timeout")?;
        Ok(())
    }
}

#[pymethods]
impl AsyncMessage {
    /// Answers this message with `obj` as JSON; await the result.
    #[pyo3(signature = (obj, *, dumps = None))]
    fn reply_json<'py>(
        slf: &Bound<'py, Self>,
        obj: &Bound<'py, PyAny>,
        dumps: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        Self::reply(slf, &json::dumps(slf.py(), obj, dumps)?)
    }

    /// Answers this message; await the result. Completes at once when the connection's queue
    /// has room, and waits for room otherwise.
    fn reply<'py>(slf: &Bound<'py, Self>, data: &Bound<'_, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        let data = payload(data)?;
        let inner = &slf.as_super().get().fields.inner;
        let answering = &slf.get().answering;
        let answer = match inner.reserve_reply(data)? {
            Reservation::Placed(answer) => {
                match answering {
                    Some((driven, wakeup)) => {
                        driven.keep(answer);
                        if wakeup.needs_flush() {
                            schedule_flush(py, wakeup)?;
                        }
                    }
                    None => answer.send(),
                }
                return ready(py);
            }
            Reservation::Full(answer) => answer,
        };
        if let Some((driven, _)) = answering {
            // What was kept goes first, so that answers keep their order.
            driven.queue_kept();
        }
        let message = inner.clone();
        spawn_awaitable(py, async move { message.send_reply(answer).await })
    }
}

/// A connection ended; `reason` says why.
#[pyclass(frozen, module = "socketcomm._socketcomm")]
pub(crate) struct Disconnected {
    #[pyo3(get)]
    conn_id: u64,
    #[pyo3(get)]
    peer: (String, u16),
    #[pyo3(get)]
    reason: String,
    #[pyo3(get)]
    code: Option<u16>,
    identity: Option<PeerIdentity>,
}

#[pymethods]
impl Disconnected {
    /// The client's verified certificate, on a mutual-TLS server.
    #[getter]
    fn peer_identity(&self) -> Option<PyPeerIdentity> {
        self.identity.as_ref().map(PyPeerIdentity::from)
    }

    fn __repr__(&self) -> String {
        format!(
            "Disconnected(conn_id={}, peer={}, reason={:?})",
            self.conn_id,
            peer_repr(&self.peer),
            self.reason
        )
    }
}

/// A client asks to subscribe to `topic`, on a server with ``screen_subscriptions=True``:
/// answer with `accept()` or `refuse(reason)`; one dropped unanswered is refused.
#[pyclass(frozen, module = "socketcomm._socketcomm")]
pub(crate) struct SubscriptionRequest {
    asking: crate::server::Subscription,
}

#[pymethods]
impl SubscriptionRequest {
    #[getter]
    fn conn_id(&self) -> u64 {
        self.asking.conn.id()
    }

    #[getter]
    fn peer(&self) -> (String, u16) {
        address(self.asking.conn.peer())
    }

    /// The topic name or pattern asked for.
    #[getter]
    fn topic(&self) -> &str {
        &self.asking.pattern
    }

    /// The client's verified certificate, on a mutual-TLS server.
    #[getter]
    fn peer_identity(&self) -> Option<PyPeerIdentity> {
        identity_of(&self.asking.conn)
    }

    /// Lets the client subscribe (its ``subscribe`` returns).
    fn accept(&self) {
        self.asking.accept();
    }

    /// Refuses the subscription: the client's ``subscribe`` raises ``PermissionError`` with
    /// `reason`.
    #[pyo3(signature = (reason = "refused by the server's application"))]
    fn refuse(&self, reason: &str) {
        self.asking.refuse(reason);
    }

    fn __repr__(&self) -> String {
        format!(
            "SubscriptionRequest(conn_id={}, topic={:?})",
            self.asking.conn.id(),
            self.asking.pattern
        )
    }
}

/// A peer address as Python prints a tuple: `('127.0.0.1', 45396)`.
fn peer_repr((host, port): &(String, u16)) -> String {
    format!("('{host}', {port})")
}

/// Which API an event is made for: the message's `reply` blocks (answering through the
/// runtime the connection runs on, if a Python thread drives it), or is awaited (answering
/// through the loop's wake-up, if the connections have a runtime of their own).
#[derive(Clone, Copy)]
pub(crate) enum Flavour<'a> {
    Blocking(Option<&'a Arc<Driven>>),
    Async(Option<(&'a Arc<Driven>, &'a Arc<Wakeup>)>),
}

pub(crate) fn event_to_py(py: Python<'_>, event: Event, flavour: Flavour) -> PyResult<Py<PyAny>> {
    Ok(match event {
        Event::Connected(conn) => Connected {
            conn_id: conn.id(),
            peer: address(conn.peer()),
            identity: conn.peer_identity().cloned(),
        }
        .into_pyobject(py)?
        .into_any()
        .unbind(),
        Event::Message(message) => {
            let fields = MessageFields::new(py, message);
            match flavour {
                Flavour::Blocking(driven) => Message {
                    fields,
                    driven: driven.cloned(),
                }
                .into_pyobject(py)?
                .into_any()
                .unbind(),
                Flavour::Async(answering) => {
                    let base = Message {
                        fields,
                        driven: None,
                    };
                    let answering = answering.map(|(d, w)| (Arc::clone(d), Arc::clone(w)));
                    let init =
                        PyClassInitializer::from(base).add_subclass(AsyncMessage { answering });
                    Bound::new(py, init)?.into_any().unbind()
                }
            }
        }
        Event::FileReceived { conn, file } => {
            FileReceived::new(conn.id(), file, conn.peer_identity().cloned())
                .into_pyobject(py)?
                .into_any()
                .unbind()
        }
        Event::Disconnected { conn, reason } => {
            let CloseInfo { code, reason } = reason;
            Disconnected {
                conn_id: conn.id(),
                peer: address(conn.peer()),
                reason,
                code: code.map(|code| code.0),
                identity: conn.peer_identity().cloned(),
            }
            .into_pyobject(py)?
            .into_any()
            .unbind()
        }
        Event::Subscribe(asking) => SubscriptionRequest { asking }
            .into_pyobject(py)?
            .into_any()
            .unbind(),
    })
}
