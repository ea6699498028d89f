//! The socket options the Python API takes as keyword arguments, shared by `Server`, `Client`
//! and the asyncio client, and their conversion into the core's [`SocketOptions`]; and the
//! heartbeat options they share ([`Pings`]).

use pyo3::prelude::*;

use super::runtime::timeout_from_secs;
use crate::config::{Keepalive, Pings, SocketOptions};

/// Builds the options; `keepalive` is the idle time in seconds before the first probe.
///
/// # Errors
/// `ValueError` naming the option for a negative or unusable value.
#[allow(clippy::too_many_arguments)]
pub(crate) fn socket_options(
    nodelay: bool,
    keepalive: Option<f64>,
    keepalive_interval: Option<f64>,
    keepalive_count: Option<u32>,
    recv_buffer: Option<usize>,
    send_buffer: Option<usize>,
    linger: Option<f64>,
) -> PyResult<SocketOptions> {
    let keepalive = match timeout_from_secs("keepalive", keepalive)? {
        Some(idle) => Some(Keepalive {
            idle,
            interval: timeout_from_secs("keepalive_interval", keepalive_interval)?,
            retries: keepalive_count,
        }),
        None if keepalive_interval.is_some() || keepalive_count.is_some() => {
            return Err(pyo3::exceptions::PyValueError::new_err(
                "invalid keepalive: keepalive_interval and keepalive_count need keepalive=SECONDS",
            ))
        }
        None => None,
    };
    Ok(SocketOptions {
        nodelay,
        keepalive,
        recv_buffer,
        send_buffer,
        linger: timeout_from_secs("linger", linger)?,
    })
}

/// The heartbeat options, in seconds: `ping_interval` (None sends no pings) and `ping_timeout`
/// (None never closes a silent peer). Zero is refused with the rest of the configuration.
///
/// # Errors
/// `ValueError` naming the option for a negative or unusable value.
pub(crate) fn pings(interval: Option<f64>, timeout: Option<f64>) -> PyResult<Pings> {
    Ok(Pings {
        interval: timeout_from_secs("ping_interval", interval)?,
        timeout: timeout_from_secs("ping_timeout", timeout)?,
    })
}
