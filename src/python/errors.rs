//! The exception hierarchy, and the only conversion of core errors into Python exceptions.
//!
//! Each exception subclasses `SocketCommError` and the built-in a Python user already catches
//! (`ConnectionError`, `ValueError`). The classes are made with `type(...)` because
//! `create_exception!` allows one base only. OS failures become the built-in `OSError` subclass
//! that matches their errno, as the `socket` module's do.

use std::io;

use pyo3::exceptions::{
    PyConnectionError, PyException, PyOSError, PyPermissionError, PyTimeoutError, PyValueError,
};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};

use crate::error::{CloseInfo, Error};
use crate::frame::CloseCode;

pub(crate) struct Exceptions {
    pub(crate) base: Py<PyType>,
    pub(crate) closed: Py<PyType>,
    pub(crate) protocol: Py<PyType>,
    pub(crate) too_large: Py<PyType>,
    pub(crate) tls: Py<PyType>,
    pub(crate) transfer: Py<PyType>,
}

static EXCEPTIONS: PyOnceLock<Exceptions> = PyOnceLock::new();

fn new_exception<'py>(
    py: Python<'py>,
    name: &str,
    doc: &str,
    bases: &[&Bound<'py, PyType>],
    with_close_details: bool,
) -> PyResult<Py<PyType>> {
    let namespace = PyDict::new(py);
    namespace.set_item("__doc__", doc)?;
    // Shown in tracebacks, and where users import them from.
    namespace.set_item("__module__", "socketcomm")?;
    if with_close_details {
        namespace.set_item("code", py.None())?;
        namespace.set_item("reason", "")?;
    }
    let bases = PyTuple::new(py, bases)?;
    let class = py
        .get_type::<PyType>()
        .call1((name, bases, namespace))?
        .cast_into::<PyType>()?;
    Ok(class.unbind())
}

pub(crate) fn exceptions(py: Python<'_>) -> PyResult<&Exceptions> {
    EXCEPTIONS.get_or_try_init(py, || {
        let exception = py.get_type::<PyException>();
        let connection_error = py.get_type::<PyConnectionError>();
        let value_error = py.get_type::<PyValueError>();
        let base = new_exception(
            py,
            "SocketCommError",
            "The root of every socketcomm exception (OS failures stay the built-in OSError subclasses).",
            &[&exception],
            false,
        )?;
        let base_type = base.bind(py).clone();
        let closed = new_exception(
            py,
            "ConnectionClosedError",
            "The connection has ended; `reason` says why and `code` is the close code, if any.",
            &[&base_type, &connection_error],
            true,
        )?;
        let protocol = new_exception(
            py,
            "ProtocolError",
            "The peer does not speak the socketcomm protocol, or broke it.",
            &[&base_type],
            true,
        )?;
        let protocol_type = protocol.bind(py).clone();
        let too_large = new_exception(
            py,
            "FrameTooLargeError",
            "A message is larger than the receiving side's max_frame.",
            &[&protocol_type, &value_error],
            true,
        )?;
        let tls = new_exception(
            py,
            "TlsError",
            "A TLS handshake or certificate check failed, or the TLS settings are unusable; \
             the message says which check and what to do.",
            &[&base_type, &connection_error],
            false,
        )?;
        let transfer = new_exception(
            py,
            "TransferError",
            "A file transfer was refused or failed its verification; `status` says which \
             (\"refused\", \"bad_name\", \"too_large\", \"no_space\", \"digest_mismatch\", ...).",
            &[&base_type],
            false,
        )?;
        transfer.bind(py).setattr("status", "")?;
        Ok::<_, PyErr>(Exceptions {
            base,
            closed,
            protocol,
            too_large,
            tls,
            transfer,
        })
    })
}

pub(crate) fn register(module: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = module.py();
    let all = exceptions(py)?;
    for class in [
        &all.base,
        &all.closed,
        &all.protocol,
        &all.too_large,
        &all.tls,
        &all.transfer,
    ] {
        let class = class.bind(py);
        module.add(class.name()?, class)?;
    }
    Ok(())
}

/// Raises `class(message)` with the close details set, when there are any.
fn raise(py: Python<'_>, class: &Py<PyType>, message: String, close: Option<&CloseInfo>) -> PyErr {
    let make = || -> PyResult<PyErr> {
        let instance = class.bind(py).call1((message.clone(),))?;
        if let Some(info) = close {
            instance.setattr("code", info.code.map(|code| code.0))?;
            instance.setattr("reason", info.reason.as_str())?;
        }
        Ok(PyErr::from_value(instance))
    };
    make().unwrap_or_else(|e| e)
}

fn os_error(context: String, source: io::Error, hint: &str) -> PyErr {
    let text = source.to_string();
    // io::Error's text ends in "(os error N)"; Python shows the errno itself.
    let text = text.split(" (os error").next().unwrap_or(&text).to_owned();
    let message = format!("{context}: {text}{hint}");
    match source.raw_os_error() {
        // OSError(errno, text) returns the subclass for that errno (ConnectionRefusedError, ...).
        Some(errno) => PyOSError::new_err((errno, message)),
        None => match source.kind() {
            io::ErrorKind::TimedOut => PyTimeoutError::new_err(message),
            kind => PyErr::from(io::Error::new(kind, message)),
        },
    }
}

impl From<Error> for PyErr {
    fn from(error: Error) -> PyErr {
        Python::attach(|py| {
            let all = match exceptions(py) {
                Ok(all) => all,
                Err(e) => return e,
            };
            let message = error.to_string();
            match error {
                Error::Io {
                    context,
                    source,
                    hint,
                } => os_error(context, source, hint),
                Error::Closed(info) => {
                    let class = match info.code {
                        Some(CloseCode::FRAME_TOO_LARGE) => &all.too_large,
                        Some(CloseCode::PROTOCOL_ERROR | CloseCode::UNSUPPORTED_VERSION) => {
                            &all.protocol
                        }
                        _ => &all.closed,
                    };
                    raise(py, class, message, Some(&info))
                }
                Error::Protocol(_) => raise(py, &all.protocol, message, None),
                Error::FrameTooLarge { .. } => raise(py, &all.too_large, message, None),
                Error::Transfer { status, .. } => {
                    let error = raise(py, &all.transfer, message, None);
                    // `status` names the kind of failure ("digest_mismatch", "too_large", ...).
                    let _ = error.value(py).setattr("status", status.name());
                    error
                }
                Error::Tls(_) => raise(py, &all.tls, message, None),
                Error::Timeout(_) => PyTimeoutError::new_err(message),
                Error::InvalidOption { .. } | Error::Topic(_) => PyValueError::new_err(message),
                Error::Refused(_) => PyPermissionError::new_err(message),
            }
        })
    }
}

/// The error for an operation on a closed server or client.
pub(crate) fn closed(py: Python<'_>, message: &str) -> PyErr {
    match exceptions(py) {
        Ok(all) => raise(py, &all.closed, message.to_owned(), None),
        Err(e) => e,
    }
}
