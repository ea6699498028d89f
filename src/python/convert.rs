//! Conversions between Python values and the core's: message payloads and socket addresses.

use std::net::{SocketAddr, ToSocketAddrs};

use bytes::Bytes;
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyMemoryView, PyString};

use crate::error::Error;

/// A message payload from Python: `str` (sent as UTF-8) or any bytes-like object.
///
/// # Errors
/// `TypeError` for anything else (an `int` is refused, though `bytes(3)` would accept it).
pub(crate) fn payload(data: &Bound<'_, PyAny>) -> PyResult<Bytes> {
    if let Ok(bytes) = data.cast::<PyBytes>() {
        return Ok(Bytes::copy_from_slice(bytes.as_bytes()));
    }
    if let Ok(text) = data.cast::<PyString>() {
        return Ok(Bytes::copy_from_slice(text.to_cow()?.as_bytes()));
    }
    if let Ok(array) = data.cast::<PyByteArray>() {
        return Ok(Bytes::from(array.to_vec()));
    }
    match PyMemoryView::from(data) {
        Ok(view) => {
            let bytes = view.call_method0("tobytes")?;
            Ok(Bytes::copy_from_slice(bytes.cast::<PyBytes>()?.as_bytes()))
        }
        Err(_) => Err(PyTypeError::new_err(format!(
            "expected str or a bytes-like object (bytes, bytearray, memoryview), got {}",
            data.get_type().name()?
        ))),
    }
}

/// Resolves `host` and `port` for binding, the way `socket.bind` would (blocking, GIL released).
///
/// # Errors
/// `OSError` naming the host when it does not resolve.
pub(crate) fn resolve(py: Python<'_>, host: &str, port: u16) -> PyResult<SocketAddr> {
    let host = host.to_owned();
    py.detach(move || {
        let mut addrs = (host.as_str(), port)
            .to_socket_addrs()
            .map_err(|e| Error::io(format!("cannot resolve host {host:?}"), e))?;
        addrs.next().ok_or_else(|| {
            Error::io(
                format!("cannot resolve host {host:?}"),
                std::io::Error::new(std::io::ErrorKind::NotFound, "the name has no addresses"),
            )
        })
    })
    .map_err(PyErr::from)
}

/// A socket address as Python's `socket` module gives it: `(host, port)`.
pub(crate) fn address(addr: SocketAddr) -> (String, u16) {
    (addr.ip().to_string(), addr.port())
}
