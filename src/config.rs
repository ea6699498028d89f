//! Settings of servers and clients, with the defaults a newcomer can run without root, and their
//! validation: an unusable value is refused at construction with the option's name.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::frame::{DEFAULT_MAX_FRAME, MIN_MAX_FRAME};
use crate::transfer::DEFAULT_MAX_FILE_SIZE;

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

/// What a send, a reply or a broadcast does with a client whose outbound queue is full because
/// it stopped reading.
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

/// TCP keepalive probes: after `idle` without traffic, every `interval`, `retries` times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    pub idle: Duration,
    pub interval: Option<Duration>,
    pub retries: Option<u32>,
}

/// Options of every connected socket, set with `socket2` (names as in the Python API).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketOptions {
    /// `TCP_NODELAY`: send small messages at once (on by default).
    pub nodelay: bool,
    /// `SO_KEEPALIVE` with its timings; `None` leaves it off.
    pub keepalive: Option<Keepalive>,
    /// `SO_RCVBUF` / `SO_SNDBUF` in bytes; `None` leaves the kernel's autotuning alone.
    pub recv_buffer: Option<usize>,
    pub send_buffer: Option<usize>,
    /// `SO_LINGER`: how long `close` may wait for unsent data; `Some(0)` resets instead.
    pub linger: Option<Duration>,
}

impl Default for SocketOptions {
    fn default() -> SocketOptions {
        SocketOptions {
            nodelay: true,
            keepalive: None,
            recv_buffer: None,
            send_buffer: None,
            linger: None,
        }
    }
}

impl SocketOptions {
    /// Applies the options to a socket.
    ///
    /// # Errors
    /// The first option the operating system refuses.
    pub fn apply(&self, socket: socket2::SockRef<'_>) -> std::io::Result<()> {
        socket.set_tcp_nodelay(self.nodelay)?;
        if let Some(keepalive) = &self.keepalive {
            let mut params = socket2::TcpKeepalive::new().with_time(keepalive.idle);
            if let Some(interval) = keepalive.interval {
                params = params.with_interval(interval);
            }
            #[cfg(any(target_os = "linux", target_os = "macos", target_os = "freebsd"))]
            if let Some(retries) = keepalive.retries {
                params = params.with_retries(retries);
            }
            socket.set_tcp_keepalive(&params)?;
        }
        if let Some(size) = self.recv_buffer {
            socket.set_recv_buffer_size(size)?;
        }
        if let Some(size) = self.send_buffer {
            socket.set_send_buffer_size(size)?;
        }
        if self.linger.is_some() {
            socket.set_linger(self.linger)?;
        }
        Ok(())
    }

    fn validate(&self) -> Result<()> {
        if let Some(keepalive) = &self.keepalive {
            if keepalive.idle < Duration::from_secs(1) {
                return Err(Error::invalid("keepalive", "must be at least 1 second"));
            }
            if keepalive
                .interval
                .is_some_and(|i| i < Duration::from_secs(1))
            {
                return Err(Error::invalid(
                    "keepalive_interval",
                    "must be at least 1 second",
                ));
            }
            if keepalive.retries == Some(0) {
                return Err(Error::invalid("keepalive_count", "must be at least 1"));
            }
        }
        for (option, size) in [
            ("recv_buffer", self.recv_buffer),
            ("send_buffer", self.send_buffer),
        ] {
            if size.is_some_and(|size| size < 1024) {
                return Err(Error::invalid(option, "must be at least 1024 bytes"));
            }
        }
        Ok(())
    }
}

pub use crate::budget::default_max_buffered;

/// The bytes one connection's outbound queue may hold by default (see `outbound_bytes`).
pub const DEFAULT_OUTBOUND_BYTES: usize = 4 << 20;

/// The bytes of one connection's messages that may wait for the application by default (see
/// `inbound_bytes`).
pub const DEFAULT_INBOUND_BYTES: usize = 4 << 20;

/// The largest `max_buffered`.
pub const MAX_BUFFERED: usize = 1 << 50;

/// The largest `event_queue` and `outbound_queue` (in messages).
pub const MAX_QUEUE: usize = 1 << 20;
/// The largest `max_connections`.
pub const MAX_CONNECTIONS: usize = 10_000_000;

/// Heartbeats on a framed connection (`heartbeat.rs`); raw connections have none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pings {
    /// Send a PING this often; `None` sends none.
    pub interval: Option<Duration>,
    /// Close the connection once nothing at all has arrived for this long after a PING;
    /// `None` never does (the pings then only measure the latency).
    pub timeout: Option<Duration>,
}

impl Pings {
    /// No pings at all.
    pub const OFF: Pings = Pings {
        interval: None,
        timeout: None,
    };

    fn validate(&self) -> Result<()> {
        positive_or_off(&[
            ("ping_interval", self.interval),
            ("ping_timeout", self.timeout),
        ])
    }
}

impl Default for Pings {
    /// A ping every 20 s, and 20 s to hear from the peer after one (as `websockets` does).
    fn default() -> Pings {
        Pings {
            interval: Some(Duration::from_secs(20)),
            timeout: Some(Duration::from_secs(20)),
        }
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
    /// Bytes those frames may hold together; when full, senders wait too (a larger frame waits
    /// for an empty queue).
    pub outbound_bytes: usize,
    /// Bytes of one connection's messages that may wait for the application (events mode);
    /// when spent, the connection stops reading until the application takes some (a larger
    /// message waits until none of that connection's wait).
    pub inbound_bytes: usize,
    /// Bytes the server may hold for all its clients together: messages waiting for the
    /// application, and frames still arriving beyond a connection's first 256 KiB of buffer.
    /// When spent, connections stop reading (TCP pushes back on their clients).
    pub max_buffered: usize,
    /// Options set on every accepted connection.
    pub socket: SocketOptions,
    /// `SO_REUSEADDR` on the listener: restart while old connections sit in TIME_WAIT.
    pub reuse_addr: bool,
    /// `SO_REUSEPORT`: let several listeners share the port (the kernel spreads connections).
    pub reuse_port: bool,
    /// Listeners on the port, each with its own accept loop (`SO_REUSEPORT` is set when more
    /// than one). For several processes, see `python server.py --workers`.
    pub workers: usize,
    /// Connections served at once; one more is told "server full" and closed.
    pub max_connections: usize,
    /// Connections served at once from one IP address; `None`: no limit but `max_connections`.
    pub max_connections_per_ip: Option<usize>,
    /// Close a connection after this long without a whole message from the client (the bytes
    /// of an unfinished frame do not count, so a slowloris is dropped too).
    pub idle_timeout: Option<Duration>,
    /// Under `idle_timeout`, the bytes per second that a raw client (a plain socket) must send
    /// for its messages to count as activity: one that sends under `raw_min_rate *
    /// idle_timeout` bytes in an `idle_timeout` is idle. 0 (the default): any message counts.
    ///
    /// NOTE: off by default because a person typing into netcat sends far fewer bytes than
    /// any rate that would stop a trickling client.
    pub raw_min_rate: u64,
    /// What a broadcast does with a client that stopped reading.
    pub slow_reader: SlowReader,
    /// Where files from clients are saved; `None` (the default) refuses them.
    pub upload_dir: Option<PathBuf>,
    /// The largest file accepted into `upload_dir`, in bytes.
    pub max_file_size: u64,
    /// How long an interrupted upload's partial file is kept for a resume (swept at start and
    /// now and then); partial files also give way, oldest first, to new uploads short of space.
    pub partial_ttl: Duration,
    /// The bytes that partial files in `upload_dir` may hold in all (uploads in progress at
    /// their full size, and interrupted ones kept for a resume, which give way oldest first);
    /// `None` (the default): a quarter of the folder's file system.
    pub max_partial_bytes: Option<u64>,
    /// Serve TLS only (plaintext clients are told so and closed).
    pub tls: Option<crate::tls::ServerTls>,
    /// How long a client may take to complete the TLS handshake.
    pub tls_handshake_timeout: Duration,
    /// How long a connection may take to send its first bytes (a framed client: its whole
    /// hello) after it is accepted (after the TLS handshake, with TLS); `None` waits for ever.
    pub hello_timeout: Option<Duration>,
    /// Heartbeats to framed clients.
    pub pings: Pings,
    /// A client's SUBSCRIBE becomes an [`Event::Subscribe`](crate::Event::Subscribe) that the
    /// application accepts or refuses (events mode); without it, every subscription to a
    /// well-formed name is accepted.
    pub subscription_events: bool,
    /// The Redis (`redis://host:port/db`) through which this server and others share their
    /// rooms and broadcasts; `None` serves this server's connections alone.
    pub backplane: Option<String>,
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
            outbound_bytes: DEFAULT_OUTBOUND_BYTES,
            inbound_bytes: DEFAULT_INBOUND_BYTES,
            max_buffered: default_max_buffered(),
            socket: SocketOptions::default(),
            reuse_addr: true,
            reuse_port: false,
            workers: 1,
            max_connections: 10_000,
            max_connections_per_ip: None,
            idle_timeout: None,
            raw_min_rate: 0,
            slow_reader: SlowReader::Disconnect,
            upload_dir: None,
            max_file_size: DEFAULT_MAX_FILE_SIZE,
            partial_ttl: crate::transfer::DEFAULT_PARTIAL_TTL,
            max_partial_bytes: None,
            tls: None,
            tls_handshake_timeout: Duration::from_secs(10),
            hello_timeout: Some(Duration::from_secs(10)),
            pings: Pings::default(),
            subscription_events: false,
            backplane: None,
        }
    }
}

impl ServerConfig {
    /// # Errors
    /// [`Error::InvalidOption`] naming the first option whose value cannot work.
    pub fn validate(&self) -> Result<()> {
        validate_max_frame(self.max_frame)?;
        self.socket.validate()?;
        if self.backlog == 0 {
            return Err(Error::invalid("backlog", "must be at least 1"));
        }
        // Bounds a program can mean: beyond them the queues and the connection semaphore
        // cannot be built (a tokio semaphore holds at most 2^61 permits) or memory runs out
        // long before they fill.
        for (option, value, max) in [
            ("event_queue", self.event_queue, MAX_QUEUE),
            ("outbound_queue", self.outbound_queue, MAX_QUEUE),
            ("max_connections", self.max_connections, MAX_CONNECTIONS),
            ("outbound_bytes", self.outbound_bytes, u32::MAX as usize),
            ("inbound_bytes", self.inbound_bytes, u32::MAX as usize),
            ("max_buffered", self.max_buffered, MAX_BUFFERED),
        ] {
            if !(1..=max).contains(&value) {
                return Err(Error::invalid(
                    option,
                    format!("{value} is not between 1 and {max}"),
                ));
            }
        }
        if self.max_connections_per_ip == Some(0) {
            return Err(Error::invalid(
                "max_connections_per_ip",
                "must be at least 1 (None: no limit)",
            ));
        }
        if !(1..=256).contains(&self.workers) {
            return Err(Error::invalid("workers", "must be between 1 and 256"));
        }
        if self.tls_handshake_timeout.is_zero() {
            return Err(Error::invalid("tls_handshake_timeout", "must be positive"));
        }
        if self.partial_ttl.is_zero() {
            return Err(Error::invalid("partial_ttl", "must be positive"));
        }
        if self.max_partial_bytes == Some(0) {
            return Err(Error::invalid(
                "max_partial_bytes",
                "must be at least 1 (None: a quarter of the upload folder's file system)",
            ));
        }
        positive_or_off(&[
            ("idle_timeout", self.idle_timeout),
            ("hello_timeout", self.hello_timeout),
        ])?;
        self.pings.validate()
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
    /// Bytes those messages may hold together; when spent, the connection stops reading too
    /// (TCP pushes back on the server). A larger message waits until nothing else does.
    pub inbound_bytes: usize,
    /// Frames waiting to be written; when full, `send` waits.
    pub outbound_queue: usize,
    /// Bytes those frames may hold together; when full, `send` waits too.
    pub outbound_bytes: usize,
    /// Options of the connected socket.
    pub socket: SocketOptions,
    /// The local address to connect from (`None`: any).
    pub local_addr: Option<std::net::SocketAddr>,
    /// Where files the server sends are saved; `None` refuses them.
    pub download_dir: Option<PathBuf>,
    /// The largest file accepted into `download_dir`, in bytes.
    pub max_file_size: u64,
    /// Connect with TLS.
    pub tls: Option<crate::tls::ClientTls>,
    /// How many times to try again when connecting fails, and to replace a lost connection.
    pub retries: u32,
    /// The first wait before trying again; it doubles with each attempt (up to 5 s).
    pub backoff: Duration,
    /// Heartbeats to the server (none in raw mode).
    pub pings: Pings,
}

impl Default for ClientConfig {
    fn default() -> ClientConfig {
        ClientConfig {
            connect_timeout: Duration::from_secs(10),
            raw: false,
            max_frame: DEFAULT_MAX_FRAME,
            inbound_queue: 1024,
            inbound_bytes: DEFAULT_INBOUND_BYTES,
            outbound_queue: 1024,
            outbound_bytes: DEFAULT_OUTBOUND_BYTES,
            socket: SocketOptions::default(),
            local_addr: None,
            download_dir: None,
            max_file_size: DEFAULT_MAX_FILE_SIZE,
            tls: None,
            retries: 0,
            backoff: Duration::from_millis(200),
            pings: Pings::default(),
        }
    }
}

impl ClientConfig {
    /// # Errors
    /// [`Error::InvalidOption`] naming the first option whose value cannot work.
    pub fn validate(&self) -> Result<()> {
        validate_max_frame(self.max_frame)?;
        self.socket.validate()?;
        if self.connect_timeout.is_zero() {
            return Err(Error::invalid("connect_timeout", "must be positive"));
        }
        if self.backoff.is_zero() && self.retries > 0 {
            return Err(Error::invalid(
                "backoff",
                "must be positive when retries are set",
            ));
        }
        if self.inbound_queue == 0 {
            return Err(Error::invalid("inbound_queue", "must be at least 1"));
        }
        if self.inbound_bytes == 0 {
            return Err(Error::invalid("inbound_bytes", "must be at least 1"));
        }
        if self.outbound_queue == 0 {
            return Err(Error::invalid("outbound_queue", "must be at least 1"));
        }
        self.pings.validate()
    }
}

/// Durations that are either off (`None`) or positive: zero would fire at once.
fn positive_or_off(options: &[(&'static str, Option<Duration>)]) -> Result<()> {
    match options
        .iter()
        .find(|(_, value)| value.is_some_and(|t| t.is_zero()))
    {
        Some((option, _)) => Err(Error::invalid(
            option,
            "must be positive (None disables it)",
        )),
        None => Ok(()),
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
