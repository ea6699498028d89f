//! The core's errors: [`FrameError`] for the codec, [`Error`] for everything a caller sees.
//!
//! Each message says what happened and, where there is one, what to do about it. The mapping onto
//! Python exceptions lives in `src/python/errors.rs` and nowhere else.

use std::fmt;
use std::io;

use crate::frame::{CloseCode, TransferStatus};

/// What the frame codec can refuse.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    #[error("a frame of {size} bytes exceeds max_frame of {max} bytes")]
    TooLarge { size: u64, max: u32 },
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("unknown frame type {0:#04x}")]
    UnknownType(u8),
    #[error("bad hello: {0}")]
    BadHello(String),
    /// The stream ended inside a frame.
    #[error("the connection ended in the middle of a frame ({0} bytes of it arrived)")]
    Truncated(usize),
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl FrameError {
    /// The close code that tells the peer about this error.
    pub fn close_code(&self) -> CloseCode {
        match self {
            FrameError::TooLarge { .. } => CloseCode::FRAME_TOO_LARGE,
            _ => CloseCode::PROTOCOL_ERROR,
        }
    }
}

/// Why a connection ended, as the side that observes it can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseInfo {
    /// The code from the peer's close frame, or from our own when we closed because of an error;
    /// `None` when the connection simply ended.
    pub code: Option<CloseCode>,
    /// A sentence for people.
    pub reason: String,
}

impl CloseInfo {
    pub fn new(code: Option<CloseCode>, reason: impl Into<String>) -> CloseInfo {
        CloseInfo {
            code,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for CloseInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)?;
        if let Some(code) = self.code {
            write!(f, " (close code {})", code.0)?;
        }
        Ok(())
    }
}

/// Errors of the server and client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system failure, with what we were doing when it happened and, where one
    /// helps, what to do (`hint` is empty or starts with "; ").
    #[error("{context}: {source}{hint}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
        hint: &'static str,
    },
    /// The connection is gone; further sends and receives fail the same way.
    #[error("connection closed: {0}")]
    Closed(CloseInfo),
    /// The peer does not speak the protocol, or broke it.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A message larger than the receiving side's `max_frame`.
    #[error("{what} of {size} bytes exceeds max_frame of {max} bytes; {hint}")]
    FrameTooLarge {
        what: &'static str,
        size: u64,
        max: u32,
        hint: &'static str,
    },
    /// The TLS configuration is unusable, or a handshake failed (the message says which check).
    #[error("TLS: {0}")]
    Tls(String),
    /// A file transfer was refused or failed its verification; `status` says which.
    #[error("file transfer of {name:?} failed ({}): {reason}", status.name())]
    Transfer {
        name: String,
        status: TransferStatus,
        reason: String,
    },
    /// A wait ran out of time.
    #[error("{0}")]
    Timeout(String),
    /// The peer's application refused what was asked (a subscription), and says why.
    #[error("refused by the server: {0}")]
    Refused(String),
    /// A room or topic name (or pattern) that breaks the naming rules.
    #[error("invalid room or topic: {0}")]
    Topic(#[from] crate::topic::TopicError),
    /// An option has a value the library cannot use.
    #[error("invalid {option}: {message}")]
    InvalidOption {
        option: &'static str,
        message: String,
    },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Error {
        Error::io_with_hint(context, source, "")
    }

    pub(crate) fn io_with_hint(
        context: impl Into<String>,
        source: io::Error,
        hint: &'static str,
    ) -> Error {
        Error::Io {
            context: context.into(),
            source,
            hint,
        }
    }

    pub(crate) fn invalid(option: &'static str, message: impl Into<String>) -> Error {
        Error::InvalidOption {
            option,
            message: message.into(),
        }
    }

    /// The error for a message this side refuses to send because the peer would refuse it.
    pub(crate) fn outgoing_too_large(size: usize, max: u32) -> Error {
        Error::FrameTooLarge {
            what: "the message",
            size: size as u64,
            max,
            hint: "the peer would refuse it, so nothing was sent; split it, or raise the peer's max_frame",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
