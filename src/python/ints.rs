//! Integer options from Python, checked before conversion: a value out of range is a
//! `ValueError` naming the option and its range, a value that is no integer a `TypeError` naming
//! it. PyO3's own conversion raises `OverflowError` without the option's name
//! ("can't convert negative int to unsigned"), which is what these replace: each option has an
//! extractor of its own, named after it, used with `#[pyo3(from_py_with = ints::NAME)]`.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

/// The integer types options convert to, with their ranges.
pub(crate) trait IntOption: TryFrom<i128> {
    const LOW: i128;
    const HIGH: i128;
}

macro_rules! int_option_types {
    ($($ty:ty),*) => {$(
        impl IntOption for $ty {
            const LOW: i128 = <$ty>::MIN as i128;
            const HIGH: i128 = <$ty>::MAX as i128;
        }
    )*};
}

int_option_types!(u16, u32, u64, usize);

/// `value` as a `T`, or the error that names `option`.
///
/// # Errors
/// `TypeError` for a value that is not an `int` (`bool` included), `ValueError` for one outside
/// the range of `T`.
pub(crate) fn int_option<T: IntOption>(value: &Bound<'_, PyAny>, option: &str) -> PyResult<T> {
    let out_of_range = || {
        PyValueError::new_err(format!(
            "invalid {option}: {value} is not an integer from {} to {}",
            T::LOW,
            T::HIGH
        ))
    };
    if !value.is_instance_of::<pyo3::types::PyInt>()
        || value.is_instance_of::<pyo3::types::PyBool>()
    {
        return Err(PyTypeError::new_err(format!(
            "invalid {option}: expected an integer, not {}",
            value.get_type().name()?
        )));
    }
    // An int too large even for i128 is out of every option's range.
    let wide: i128 = value.extract().map_err(|_| out_of_range())?;
    if !(T::LOW..=T::HIGH).contains(&wide) {
        return Err(out_of_range());
    }
    T::try_from(wide).map_err(|_| out_of_range())
}

/// Defines one extractor per required option.
macro_rules! required {
    ($($name:ident: $ty:ty),* $(,)?) => {$(
        pub(crate) fn $name(value: &Bound<'_, PyAny>) -> PyResult<$ty> {
            int_option(value, stringify!($name))
        }
    )*};
}

/// Defines one extractor per option that may be None.
macro_rules! optional {
    ($($name:ident: $ty:ty),* $(,)?) => {$(
        pub(crate) fn $name(value: &Bound<'_, PyAny>) -> PyResult<Option<$ty>> {
            if value.is_none() {
                return Ok(None);
            }
            int_option(value, stringify!($name)).map(Some)
        }
    )*};
}

required! {
    port: u16,
    max_frame: u32,
    backlog: u32,
    retries: u32,
    max_file_size: u64,
    raw_min_rate: u64,
    max_connections: usize,
    handler_threads: usize,
    workers: usize,
    event_queue: usize,
    outbound_queue: usize,
    outbound_bytes: usize,
    inbound_bytes: usize,
    conn_id: u64,
    // `recv_many(max=...)`.
    max: usize,
}

optional! {
    max_connections_per_ip: usize,
    max_buffered: usize,
    max_partial_bytes: u64,
    keepalive_count: u32,
    recv_buffer: usize,
    send_buffer: usize,
}
