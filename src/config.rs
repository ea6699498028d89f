//! Settings of servers and clients, with the defaults a newcomer can run without root, and their
//! validation: an unusable value is refused at construction with the option's name.

use std::time::Duration;

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::frame::{DEFAULT_MAX_FRAME, MIN_MAX_FRAME};

/// Where the command line and the examples listen and connect unless told otherwise.
pub const DEFAULT_HOST: &str = "127.0.0.1";
/// An unprivileged port, so `python server.py` runs without root.
pub const DEFAULT_PORT: u16 = 10101;
/// The reply of the original `server.py`, 42 bytes, no newline.
pub const ACK_REPLY: &[u8] = b"Your message has been received, Thank you!";

/// How a server answers messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Every message becomes an [`Event`](crate::server::Event) for the application.
    Events,
    /// Every message is sent back unchanged, natively.
    Echo,
    /// Every message is answered with the fixed reply, natively.
    Ack,
    /// Every message is relayed to every other connected client, natively (a chat room).
    Broadcast,
}

/// What a broadcast does with a client whose outbound queue is full because it stopped reading.
/// (A direct send always waits: backpressure on the sender.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlowReader {
    /// Disconnect that client with a reason, so that one slow reader never holds up the rest.
    Disconnect,
    /// Wait until it has room: every broadcaster slows to the slowest reader's pace.
    Wait,
}

impl SlowReader {
    /// # Errors
    /// [`Error::InvalidOption`] for a name other than `disconnect` or `wait`.
    pub fn parse(name: &str) -> Result<SlowReader> {
        match name {
            "disconnect" => Ok(SlowReader::Disconnect),
            "wait" => Ok(SlowReader::Wait),
            other => Err(Error::invalid(
                "slow_reader",
                format!("{other:?} is not one of 'disconnect', 'wait'"),
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SlowReader::Disconnect => "disconnect",
            SlowReader::Wait => "wait",
        }
    }
}

impl Mode {
    /// Parses the names used by the Python API and the command line.
    ///
    /// # Errors
    /// [`Error::InvalidOption`] for any other name.
    pub fn parse(name: &str) -> Result<Mode> {
        match name {
            "events" => Ok(Mode::Events),
            "echo" => Ok(Mode::Echo),
            "ack" => Ok(Mode::Ack),
            "broadcast" => Ok(Mode::Broadcast),
            other => Err(Error::invalid(
                "mode",
                format!("{other:?} is not one of 'events', 'echo', 'ack', 'broadcast'"),
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Events => "events",
            Mode::Echo => "echo",
            Mode::Ack => "ack",
            Mode::Broadcast => "broadcast",
        }
    }

    /// Whether each message is answered on its own connection without the application.
    pub fn answers_in_place(self) -> bool {
        matches!(self, Mode::Echo | Mode::Ack)
    }

    /// Whether messages are answered without the application.
    pub fn is_native(self) -> bool {
        self != Mode::Events
    }
}

/// Settings of a [`Server`](crate::server::Server).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub mode: Mode,
    /// What [`Mode::Ack`] answers with.
    pub ack_reply: Bytes,
    /// The largest frame accepted from a client (the length prefix's value).
    pub max_frame: u32,
    /// Listen backlog.
    pub backlog: u32,
    /// Events waiting for the application; when full, readers wait (backpressure).
    pub event_queue: usize,
    /// Frames waiting to be written to one connection; when full, senders wait.
    pub outbound_queue: usize,
    /// Set `TCP_NODELAY` on accepted connections.
    pub nodelay: bool,
    /// Connections served at once; one more is told "server full" and closed.
    pub max_connections: usize,
    /// Close a connection after this long without a byte from the client.
    pub idle_timeout: Option<Duration>,
    /// What a broadcast does with a client that stopped reading.
    pub slow_reader: SlowReader,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            mode: Mode::Events,
            ack_reply: Bytes::from_static(ACK_REPLY),
            max_frame: DEFAULT_MAX_FRAME,
            backlog: 1024,
            event_queue: 4096,
            outbound_queue: 1024,
            nodelay: true,
            max_connections: 10_000,
            idle_timeout: None,
            slow_reader: SlowReader::Disconnect,
        }
    }
}

impl ServerConfig {
    /// # Errors
    /// [`Error::InvalidOption`] naming the first option whose value cannot work.
    pub fn validate(&self) -> Result<()> {
        validate_max_frame(self.max_frame)?;
        if self.backlog == 0 {
            return Err(Error::invalid("backlog", "must be at least 1"));
        }
        if self.event_queue == 0 {
            return Err(Error::invalid("event_queue", "must be at least 1"));
        }
        if self.outbound_queue == 0 {
            return Err(Error::invalid("outbound_queue", "must be at least 1"));
        }
        if self.max_connections == 0 {
            return Err(Error::invalid("max_connections", "must be at least 1"));
        }
        if self.idle_timeout.is_some_and(|t| t.is_zero()) {
            return Err(Error::invalid(
                "idle_timeout",
                "must be positive (None disables it)",
            ));
        }
        Ok(())
    }
}

/// Settings of a [`Client`](crate::client::Client).
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// How long connecting (and the hello) may take.
    pub connect_timeout: Duration,
    /// Speak raw bytes with no hello and no framing, for plain TCP servers.
    pub raw: bool,
    /// The largest frame accepted from the server.
    pub max_frame: u32,
    /// Messages received but not yet read; when full, the connection stops reading.
    pub inbound_queue: usize,
    /// Frames waiting to be written; when full, `send` waits.
    pub outbound_queue: usize,
    /// Set `TCP_NODELAY`.
    pub nodelay: bool,
}

impl Default for ClientConfig {
    fn default() -> ClientConfig {
        ClientConfig {
            connect_timeout: Duration::from_secs(10),
            raw: false,
            max_frame: DEFAULT_MAX_FRAME,
            inbound_queue: 1024,
            outbound_queue: 1024,
            nodelay: true,
        }
    }
}

impl ClientConfig {
    /// # Errors
    /// [`Error::InvalidOption`] naming the first option whose value cannot work.
    pub fn validate(&self) -> Result<()> {
        validate_max_frame(self.max_frame)?;
        if self.connect_timeout.is_zero() {
            return Err(Error::invalid("connect_timeout", "must be positive"));
        }
        if self.inbound_queue == 0 {
            return Err(Error::invalid("inbound_queue", "must be at least 1"));
        }
        if self.outbound_queue == 0 {
            return Err(Error::invalid("outbound_queue", "must be at least 1"));
        }
        Ok(())
    }
}

fn validate_max_frame(max_frame: u32) -> Result<()> {
    if max_frame < MIN_MAX_FRAME {
        return Err(Error::invalid(
            "max_frame",
            format!("{max_frame} bytes is too small; use at least {MIN_MAX_FRAME}"),
        ));
    }
    Ok(())
}
