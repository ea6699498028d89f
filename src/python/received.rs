//! `Received`: a message a client received, with the topic it was published to.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};

use crate::client::Incoming;

/// A message from the server, as ``Client.recv_message()`` gives it: its bytes and, for a
/// message published to a topic this client subscribed to, that topic.
#[pyclass(module = "socketcomm", frozen)]
pub(crate) struct Received {
    data: Py<PyBytes>,
    topic: Option<String>,
}

impl Received {
    pub(crate) fn new(py: Python<'_>, incoming: &Incoming) -> Received {
        Received {
            data: PyBytes::new(py, &incoming.data).unbind(),
            topic: incoming.topic.as_deref().map(str::to_owned),
        }
    }
}

#[pymethods]
impl Received {
    /// The message as sent.
    #[getter]
    fn data(&self, py: Python<'_>) -> Py<PyBytes> {
        self.data.clone_ref(py)
    }

    /// The topic it was published to; None for a direct message (send, reply, broadcast).
    #[getter]
    fn topic(&self) -> Option<&str> {
        self.topic.as_deref()
    }

    /// The message decoded as UTF-8; ``ValueError`` when it is not valid UTF-8.
    #[getter]
    fn text<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyString>> {
        let text = std::str::from_utf8(self.data.as_bytes(py)).map_err(|e| {
            PyValueError::new_err(format!(
                "the message is not valid UTF-8 ({e}); use .data for the bytes"
            ))
        })?;
        Ok(PyString::new(py, text))
    }

    /// The message decoded from JSON (`json.loads`, or the `loads` given).
    #[pyo3(signature = (*, loads = None))]
    fn json<'py>(
        &self,
        py: Python<'py>,
        loads: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        super::json::loads(py, self.data.as_bytes(py), loads)
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let data = self.data.bind(py).repr()?;
        Ok(match &self.topic {
            Some(topic) => format!("Received(topic={topic:?}, data={data})"),
            None => format!("Received(data={data})"),
        })
    }
}
