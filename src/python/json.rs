//! JSON messages: one JSON document per message, encoded with the standard library's `json`
//! unless the caller passes its own `dumps` / `loads` (orjson's, say).

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

/// `obj` as a JSON document (the `str` or `bytes` that `dumps` returns).
///
/// # Errors
/// Whatever `dumps` raises (`TypeError` for an object JSON cannot hold).
pub(crate) fn dumps<'py>(
    py: Python<'py>,
    obj: &Bound<'py, PyAny>,
    dumps: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    match dumps {
        Some(dumps) => dumps.call1((obj,)),
        None => py.import("json")?.getattr("dumps")?.call1((obj,)),
    }
}

/// The object the JSON document `data` holds.
///
/// # Errors
/// `ValueError` saying that the message is not JSON (with `loads`'s error as its cause), and
/// whatever else `loads` raises.
pub(crate) fn loads<'py>(
    py: Python<'py>,
    data: &[u8],
    loads: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let data = PyBytes::new(py, data);
    let loaded = match loads {
        Some(loads) => loads.call1((data,)),
        None => py.import("json")?.getattr("loads")?.call1((data,)),
    };
    loaded.map_err(|e| {
        if !e.is_instance_of::<PyValueError>(py) {
            return e;
        }
        let error = PyValueError::new_err(format!(
            "the message is not JSON ({}); its bytes are in .data",
            e.value(py)
        ));
        error.set_cause(py, Some(e));
        error
    })
}
