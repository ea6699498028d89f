//! socketcomm: framed messages over TCP with a tokio core, driven from Python through PyO3.
//!
//! The core is plain Rust and never names pyo3; the bindings live in `python` behind the
//! `python` cargo feature, which maturin turns on.
//!
//! | module | owns |
//! | --- | --- |
//! | [`frame`] | the wire format: hello, frame types, the codec (pure, no I/O) |
//! | `budget` | the bytes a server holds for its clients until the application takes them |
//! | `heartbeat` | pings on a framed connection: a peer gone silent, the latency |
//! | `connection` | the outbound queue both sides use; the client's reader and writer |
//! | [`server`] | binding, the accept loop, limits, broadcast; `server/handler.rs`: one connection's loop |
//! | [`client`] | connecting, the hello, request/reply matching by correlation id |
//! | [`transfer`] | sending and receiving files: streamed, verified, atomic, resumable |
//! | [`tls`] | TLS with rustls: certificates, pinning, client certificates, handshake errors |
//! | [`config`] | settings and their defaults, validated at construction |
//! | [`error`] | the error types |

pub(crate) mod budget;
pub mod client;
pub mod config;
pub(crate) mod connection;
pub mod error;
pub mod frame;
pub(crate) mod heartbeat;
pub mod server;
pub(crate) mod sync;
pub mod tls;
pub mod topic;
pub mod transfer;

#[cfg(feature = "python")]
mod python;

/// With the `fault-injection` feature (tests only), a server connection that receives this
/// message panics, to show that a bug in one connection ends that connection alone.
#[cfg(feature = "fault-injection")]
#[doc(hidden)]
pub const FAULT_PANIC: &[u8] = b"\xffsocketcomm: panic here";

pub use client::{Client, Incoming};
pub use config::{ClientConfig, Mode, Pings, ServerConfig};
pub use error::{CloseInfo, Error, FrameError};
pub use frame::{CloseCode, Frame, FrameCodec};
pub use server::{ConnId, Connection, Event, Message, Server, Stats, Subscription};
