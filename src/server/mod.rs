//! The server: binds at construction, then an accept loop hands each connection to its own task
//! (`handler`), which tells a framed client from a plain socket by its first bytes, answers
//! natively in the `echo`/`ack`/`broadcast` modes, and otherwise hands [`Event`]s to the
//! application through a bounded queue.
//!
//! The core never builds a runtime: [`Server::start`] takes a handle to the caller's.

mod backplane;
mod handler;
mod reads;
mod rooms;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::{oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::budget::{Budget, Charge};
use crate::config::{ServerConfig, SlowReader};
use crate::connection::{Outbox, Readiness};
pub use crate::connection::{Reservation, Reserved};
use crate::error::{CloseInfo, Error, Result};
use crate::frame::{CloseCode, Frame};
use crate::sync::lock;
use crate::tls::PeerIdentity;
use crate::transfer::{self, FileDir, Outgoing, Progress, ReceivedFile, SentFile};

/// Identifies a connection for the lifetime of its server; never reused.
pub type ConnId = u64;

/// The server's handle on one connection; cheap to clone.
///
/// NOTE: one reference count for the whole handle. Every message carries a clone, and one
/// count per part (the queue, its state, the controls, the transfers) cost a handful of
/// atomic operations per message each way.
#[derive(Debug, Clone)]
pub struct Connection(Arc<ConnectionParts>);

/// The parts of one connection's handle, behind its one reference count (the methods are
/// [`Connection`]'s).
#[derive(Debug)]
pub struct ConnectionParts {
    id: ConnId,
    peer: SocketAddr,
    outbox: Outbox,
    control: Control,
    /// Files the server is sending on this connection, waiting for the client's answers.
    outgoing: Outgoing,
    /// The client's verified certificate, on a TLS server that asks for one.
    identity: Option<Arc<PeerIdentity>>,
}

impl std::ops::Deref for Connection {
    type Target = ConnectionParts;

    fn deref(&self) -> &ConnectionParts {
        &self.0
    }
}

/// How the owner ends one connection from outside its task.
#[derive(Debug)]
struct Control {
    /// Wakes the connection's loop to end it: fired for the server's graceful stop, and to close
    /// just this connection (the reason is in the connection's state). The loop tells the cases
    /// apart once it fires.
    wake: Wake,
    /// What a send does when the connection's queue stays full (the server's `slow_reader`).
    slow_reader: SlowReader,
}

impl Connection {
    pub fn id(&self) -> ConnId {
        self.id
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Who the client is, from the certificate it presented (mutual TLS only).
    pub fn peer_identity(&self) -> Option<&PeerIdentity> {
        self.identity.as_deref()
    }

    /// The round trip of the last ping the server sent this client and it answered; `None`
    /// before the first answer (the first ping goes out after `ping_interval`), with pings off,
    /// and for a raw client.
    pub fn latency(&self) -> Option<Duration> {
        self.outbox.state().latency().get()
    }

    /// Whether the client speaks socketcomm's framed protocol; false for a plain socket (raw
    /// mode), and until the client's first bytes have told which it is.
    pub fn is_framed(&self) -> bool {
        self.outbox.state().is_framed()
    }

    /// Queues `data` as one message to this client (raw clients get the bare bytes), waiting
    /// while its outbound queue is full.
    ///
    /// # Errors
    /// [`Error::Closed`] once the connection has ended; [`Error::FrameTooLarge`] when the client
    /// announced a smaller `max_frame`.
    ///
    /// # Cancel safety
    /// Cancel safe: the message is queued whole or not at all.
    pub async fn send(&self, data: Bytes) -> Result<()> {
        self.send_frame(Frame::Data(data)).await
    }

    /// Queues `frame`, waiting while the queue is full: as long as it takes with
    /// `slow_reader="wait"`; with `"disconnect"` at most [`SLOW_READER_GRACE`], after which the
    /// client is dropped as a slow reader (close code 1007) and this fails.
    ///
    /// NOTE: without the limit, one client that never reads would hold whoever answers it (a
    /// dispatcher thread, an asyncio task) for as long as it stays connected.
    async fn send_frame(&self, frame: Frame) -> Result<()> {
        match self.control.slow_reader {
            SlowReader::Wait => self.outbox.send(frame).await,
            SlowReader::Disconnect => {
                match tokio::time::timeout(SLOW_READER_GRACE, self.outbox.send(frame)).await {
                    Ok(sent) => sent,
                    Err(_) => {
                        self.drop_as_slow_reader("a send");
                        Err(self.outbox.state().closed_error())
                    }
                }
            }
        }
    }

    /// Drops the connection and what is queued for it: its queue stayed full while `during`.
    fn drop_as_slow_reader(&self, during: &str) {
        log::info!(
            "connection {} from {}: outbound queue full for {SLOW_READER_GRACE:?} during \
             {during}; disconnecting it",
            self.id,
            self.peer
        );
        self.close_with(
            CloseInfo::new(
                Some(CloseCode::SLOW_READER),
                "too slow: the client did not read fast enough to keep up",
            ),
            true,
        );
    }

    /// Queues `data` if the outbound queue has room; `Ok(false)` when it is full.
    ///
    /// # Errors
    /// As [`Connection::send`].
    pub fn try_send(&self, data: Bytes) -> Result<bool> {
        self.outbox.try_send(Frame::Data(data))
    }

    /// Closes the connection after what is already queued for it, telling a framed client
    /// `reason` (close code 1000).
    pub fn close(&self, reason: &str) {
        self.close_with(CloseInfo::new(Some(CloseCode::NORMAL), reason), false);
    }

    fn close_with(&self, info: CloseInfo, drop_queued: bool) {
        self.outbox.state().mark_closed(info);
        if drop_queued {
            self.control.wake.fire_dropping();
        } else {
            self.control.wake.fire();
        }
    }

    /// `data` as this client is sent a message published to `topic`: with its topic to a
    /// client that speaks topics (protocol version 2), as a plain message to any other.
    fn message_frame(&self, topic: Option<&Arc<str>>, data: &Bytes) -> Frame {
        match topic {
            Some(topic) if self.outbox.state().speaks_topics() => Frame::Publish {
                topic: Arc::clone(topic),
                body: data.clone(),
            },
            _ => Frame::Data(data.clone()),
        }
    }

    /// Why the connection ended, once it has (or is being closed).
    pub fn close_info(&self) -> Option<CloseInfo> {
        self.outbox.state().close_info().cloned()
    }
}

/// A one-shot signal that is cheap to poll: a flag and a waker slot.
///
/// NOTE: a connection's loop polls its stop signal on every turn. A `CancellationToken`'s
/// future takes the token's mutex on each poll (a quarter of the user-space time of a native
/// echo in a profile); this takes two atomic operations.
///
/// It also carries the order to drop what is queued and stop writing at once (one
/// connection's [`Connection::close_with`] that drops; the whole server's hard stop is
/// `Hub::abort`), which a child cancellation token per connection used to carry: 112 bytes
/// more of every connection's memory.
#[derive(Debug, Default)]
struct Wake {
    /// [`Wake::FIRED`], and [`Wake::DROPPING`] with it.
    state: AtomicU8,
    waker: AtomicWaker,
}

impl Wake {
    const FIRED: u8 = 1;
    const DROPPING: u8 = 2;

    fn fire(&self) {
        self.raise(Wake::FIRED);
    }

    /// Fires, and says that what is queued is to be dropped.
    fn fire_dropping(&self) {
        self.raise(Wake::FIRED | Wake::DROPPING);
    }

    fn raise(&self, bits: u8) {
        self.state.fetch_or(bits, Ordering::Release);
        self.waker.wake();
    }

    fn is(&self, bits: u8) -> bool {
        self.state.load(Ordering::Acquire) & bits == bits
    }

    fn is_dropping(&self) -> bool {
        self.is(Wake::DROPPING)
    }

    /// Completes once [`Wake::fire`] was called.
    ///
    /// # Cancel safety
    /// Cancel safe.
    async fn fired(&self) {
        std::future::poll_fn(|cx| self.poll_fired(cx)).await;
    }

    /// Completes once [`Wake::fire_dropping`] was called.
    ///
    /// # Cancel safety
    /// Cancel safe.
    async fn dropping(&self) {
        std::future::poll_fn(|cx| self.poll_is(cx, Wake::DROPPING)).await;
    }

    /// [`Wake::fired`] as a poll.
    #[inline]
    fn poll_fired(&self, cx: &mut std::task::Context<'_>) -> Poll<()> {
        self.poll_is(cx, Wake::FIRED)
    }

    #[inline]
    fn poll_is(&self, cx: &mut std::task::Context<'_>, bits: u8) -> Poll<()> {
        if self.is(bits) {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        if self.is(bits) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// A message from a client.
#[derive(Debug)]
pub struct Message {
    pub conn: Connection,
    pub data: Bytes,
    /// Set when the client sent a request and waits for the reply with this id.
    pub request_id: Option<u32>,
    /// The topic the client published it to (protocol version 2); `None` for a direct message.
    pub topic: Option<Arc<str>>,
    /// Its share of the inbound budgets, given back when this is dropped or
    /// [`Message::release`]d.
    charge: Charge,
}

impl Clone for Message {
    /// A copy carries no share of the budgets: the original gives it back.
    fn clone(&self) -> Message {
        Message {
            conn: self.conn.clone(),
            data: self.data.clone(),
            request_id: self.request_id,
            topic: self.topic.clone(),
            charge: Charge::default(),
        }
    }
}

impl Message {
    pub(crate) fn new(conn: Connection, data: Bytes, request_id: Option<u32>) -> Message {
        Message {
            conn,
            data,
            request_id,
            topic: None,
            charge: Charge::default(),
        }
    }

    /// Gives back the message's share of the inbound budgets: the application has it now, and
    /// whatever it does with it no longer holds the connection back.
    pub fn release(&mut self) {
        self.charge = Charge::default();
    }

    /// The frame that answers this message: the reply to its request, or a plain message.
    fn answer(&self, body: Bytes) -> Frame {
        match self.request_id {
            Some(id) => Frame::Reply { id, body },
            None => Frame::Data(body),
        }
    }

    /// Answers this message, waiting while the connection's outbound queue is full.
    ///
    /// # Errors
    /// As [`Connection::send`].
    ///
    /// # Cancel safety
    /// Cancel safe, as [`Connection::send`].
    pub async fn reply(&self, data: Bytes) -> Result<()> {
        self.conn.send_frame(self.answer(data)).await
    }

    /// Takes the answer's place in the outbound queue if it has room; [`Reserved::send`]
    /// queues it later without waiting. When the queue is full the answer comes back, for
    /// [`Message::send_reply`].
    ///
    /// # Errors
    /// As [`Connection::send`].
    pub fn reserve_reply(&self, data: Bytes) -> Result<Reservation> {
        self.conn.outbox.try_reserve(self.answer(data))
    }

    /// Queues an answer that [`Message::reserve_reply`] found no room for, waiting for room
    /// as [`Message::reply`] does.
    ///
    /// # Errors
    /// As [`Connection::send`].
    ///
    /// # Cancel safety
    /// Cancel safe, as [`Connection::send`].
    pub async fn send_reply(&self, answer: Frame) -> Result<()> {
        self.conn.send_frame(answer).await
    }
}

/// What happens on a server, in order per connection (more kinds may come in later versions).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Event {
    Connected(Connection),
    Message(Message),
    /// A file from the client arrived whole, verified, and is in `upload_dir`.
    FileReceived {
        conn: Connection,
        file: ReceivedFile,
    },
    Disconnected {
        conn: Connection,
        reason: CloseInfo,
    },
    /// A client asks to subscribe to a topic, and waits for the application's answer (only
    /// with [`ServerConfig::subscription_events`](crate::ServerConfig)).
    Subscribe(Subscription),
}

/// A wait for room in the event queue ([`Hub::offer`]).
type Waiting<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>;

/// The application's answer to a [`Subscription`]: `Err` with the reason it refused.
type Verdict = std::result::Result<(), String>;

/// A client's request to subscribe to `pattern` (a topic name or a pattern), which the
/// application answers with [`Subscription::accept`] or [`Subscription::refuse`]; one left
/// unanswered is refused when the last copy is dropped.
#[derive(Debug, Clone)]
pub struct Subscription {
    pub conn: Connection,
    pub pattern: String,
    answer: Arc<Mutex<Option<oneshot::Sender<Verdict>>>>,
}

impl Subscription {
    /// The event for `pattern`, and the receiving end of its answer.
    fn new(
        conn: Connection,
        pattern: String,
    ) -> (
        Subscription,
        oneshot::Receiver<std::result::Result<(), String>>,
    ) {
        let (answer, answered) = oneshot::channel();
        let subscription = Subscription {
            conn,
            pattern,
            answer: Arc::new(Mutex::new(Some(answer))),
        };
        (subscription, answered)
    }

    /// Lets the client subscribe.
    pub fn accept(&self) {
        self.answer_with(Ok(()));
    }

    /// Refuses the subscription; the client is told `reason`.
    pub fn refuse(&self, reason: &str) {
        self.answer_with(Err(reason.to_owned()));
    }

    fn answer_with(&self, answer: Verdict) {
        if let Some(sender) = lock(&self.answer).take() {
            let _ = sender.send(answer);
        }
    }
}

/// A bound server. Dropping it without [`Server::shutdown`] leaves its tasks running until the
/// runtime ends, so call `shutdown` (the Python layer does so on `close()` and when collected).
pub struct Server {
    local_addr: SocketAddr,
    #[cfg(unix)]
    listener_fd: std::os::fd::RawFd,
    hub: Arc<Hub>,
    /// The listener and the event sender, until [`Server::start`] moves them into the accept loop.
    unstarted: Mutex<Option<(Vec<std::net::TcpListener>, EventSender)>>,
    events: flume::Receiver<Event>,
}

/// State shared by the accept loop, the connection tasks and the owner.
struct Hub {
    config: ServerConfig,
    /// Where files from clients go; `None` refuses them.
    upload_dir: Option<Arc<FileDir>>,
    connections: Mutex<HashMap<ConnId, Connection>>,
    next_id: AtomicU64,
    /// One permit per connection served; see `max_connections`.
    slots: Arc<Semaphore>,
    /// Connections served per client address, when `max_connections_per_ip` is set.
    per_address: Arc<Mutex<HashMap<std::net::IpAddr, usize>>>,
    /// Bounds the tasks that tell extra clients the server is full, so a flood of connections
    /// costs a bounded amount of work; beyond it they are closed without a word.
    refusals: Arc<Semaphore>,
    /// Graceful stop: no more accepts, connections close with a reason after their queued output.
    stop: CancellationToken,
    /// Hard stop, after the grace period: every task returns at once.
    abort: CancellationToken,
    tasks: TaskTracker,
    /// Notified when an event is queued and when the queue ends, for callers that wait for an
    /// event without taking it ([`Server::event_ready`]).
    events_ready: Readiness,
    counters: Counters,
    /// The bytes held for all clients together (`max_buffered`).
    buffered: Budget,
    rooms: rooms::Rooms,
    /// The link to the other servers of the same rooms (`backplane`), if any.
    backplane: Option<Arc<backplane::Backplane>>,
}

/// The event queue's sending side, held by the accept loop and each connection task. When the
/// last one is dropped the queue ends; each drop tells those waiting in
/// [`Server::event_ready`], so that they see the end.
struct EventSender {
    queue: Option<flume::Sender<Event>>,
    hub: Arc<Hub>,
}

impl Clone for EventSender {
    fn clone(&self) -> EventSender {
        EventSender {
            queue: self.queue.clone(),
            hub: Arc::clone(&self.hub),
        }
    }
}

impl std::ops::Deref for EventSender {
    type Target = flume::Sender<Event>;

    fn deref(&self) -> &flume::Sender<Event> {
        self.queue.as_ref().expect("taken only on drop")
    }
}

impl Drop for EventSender {
    fn drop(&mut self) {
        drop(self.queue.take());
        self.hub.events_ready.notify();
    }
}

/// Counters of what a server did, read with [`Server::stats`].
#[derive(Debug, Default)]
struct Counters {
    messages_in: AtomicU64,
    messages_out: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    refused_full: AtomicU64,
    protocol_errors: AtomicU64,
    idle_timeouts: AtomicU64,
    slow_readers: AtomicU64,
    connection_errors: AtomicU64,
    files_received: AtomicU64,
    files_sent: AtomicU64,
    transfers_failed: AtomicU64,
    tls_failures: AtomicU64,
}

/// A snapshot of a server's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Connections open now.
    pub connections: u64,
    /// Connections accepted and served since the server started (refused ones not counted).
    pub connections_total: u64,
    pub messages_in: u64,
    pub messages_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Clients told "server full" (over `max_connections`).
    pub refused_full: u64,
    /// Connections closed for breaking the protocol (including oversized frames).
    pub protocol_errors: u64,
    pub idle_timeouts: u64,
    /// Clients dropped from a broadcast for not reading.
    pub slow_readers: u64,
    /// Connections that ended in an I/O error (reset, broken pipe).
    pub connection_errors: u64,
    /// Files received into `upload_dir`, verified.
    pub files_received: u64,
    /// Files sent with [`Server::send_file`] and verified by the client.
    pub files_sent: u64,
    /// Transfers in either direction that were refused or failed (interrupted ones, which
    /// may resume, are not counted).
    pub transfers_failed: u64,
    /// TLS handshakes that failed or timed out, and plaintext clients of a TLS server.
    pub tls_failures: u64,
    /// Rooms with members now.
    pub rooms: u64,
    /// 1 while the backplane's link to Redis is up, else 0 (and 0 without a backplane).
    pub backplane_connected: u64,
    /// Publications and broadcasts handed to Redis for the other servers.
    pub backplane_published: u64,
    /// Publications and broadcasts of other servers delivered here.
    pub backplane_received: u64,
    /// Publications and broadcasts the other servers did not get: Redis was away (or slow).
    pub backplane_dropped: u64,
}

/// How long a broadcast waits for room in a full outbound queue before it disconnects that
/// client under [`SlowReader::Disconnect`].
pub const SLOW_READER_GRACE: Duration = Duration::from_secs(1);

/// How many "server full" answers may be in progress at once.
const MAX_REFUSALS: usize = 256;

impl Server {
    /// Binds `addr` and listens; nothing is accepted until [`Server::start`].
    ///
    /// # Errors
    /// [`Error::InvalidOption`] for an unusable config, [`Error::Io`] when the address cannot be
    /// bound (in use, not local, not permitted).
    pub fn bind(addr: SocketAddr, config: ServerConfig) -> Result<Server> {
        config.validate()?;
        #[cfg(unix)]
        raise_descriptor_limit(config.max_connections);
        let upload_dir = FileDir::open_optional(
            "upload_dir",
            config.upload_dir.as_deref(),
            crate::transfer::FolderLimits {
                max_file_size: config.max_file_size,
                partial_ttl: config.partial_ttl,
                max_partial_bytes: config.max_partial_bytes,
            },
        )?;
        let listener = bind_listener(addr, &config).map_err(|e| {
            let hint = match e.kind() {
                io::ErrorKind::AddrInUse => {
                    "; another program is using that port: stop it, or choose another port (0 picks a free one)"
                }
                io::ErrorKind::PermissionDenied => {
                    "; ports below 1024 need privileges: choose a port above 1023"
                }
                io::ErrorKind::AddrNotAvailable => {
                    "; that address does not belong to this machine: use 127.0.0.1 or 0.0.0.0"
                }
                _ => "",
            };
            Error::io_with_hint(format!("cannot listen on {addr}"), e, hint)
        })?;
        let local_addr = listener
            .local_addr()
            .map_err(|e| Error::io("cannot read the listening address", e))?;
        #[cfg(unix)]
        let listener_fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
        // More listeners on the very port the first got (port 0 is resolved by now); the
        // kernel spreads incoming connections over them, and each has its own accept loop.
        let mut listeners = vec![listener];
        for _ in 1..config.workers {
            listeners.push(
                bind_listener(local_addr, &config)
                    .map_err(|e| Error::io(format!("cannot add a listener on {local_addr}"), e))?,
            );
        }
        let (sender, events) = flume::bounded(config.event_queue);
        let buffered = Budget::new(config.max_buffered);
        let backplane = config
            .backplane
            .as_deref()
            .map(backplane::Backplane::new)
            .transpose()?
            .map(Arc::new);
        let hub = Arc::new(Hub {
            slots: Arc::new(Semaphore::new(config.max_connections)),
            per_address: Arc::default(),
            refusals: Arc::new(Semaphore::new(MAX_REFUSALS)),
            config,
            upload_dir,
            connections: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            stop: CancellationToken::new(),
            abort: CancellationToken::new(),
            tasks: TaskTracker::new(),
            events_ready: Readiness::default(),
            counters: Counters::default(),
            buffered,
            rooms: rooms::Rooms::default(),
            backplane,
        });
        let sender = EventSender {
            queue: Some(sender),
            hub: Arc::clone(&hub),
        };
        Ok(Server {
            local_addr,
            #[cfg(unix)]
            listener_fd,
            hub,
            unstarted: Mutex::new(Some((listeners, sender))),
            events,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The listening socket's descriptor, for inspecting it (valid until the server closes).
    #[cfg(unix)]
    pub fn listener_fd(&self) -> std::os::fd::RawFd {
        self.listener_fd
    }

    pub fn config(&self) -> &ServerConfig {
        &self.hub.config
    }

    /// Starts accepting on `runtime`, serving the connections there too. Returns `false` when
    /// already started or shut down.
    pub fn start(&self, runtime: &Handle) -> bool {
        self.start_accepting(runtime, None)
    }

    /// Starts accepting on `accept` and serves each accepted connection on `connections`: for
    /// example a current-thread runtime that the application's own threads drive, so that a
    /// message is read, handled and answered on one thread. Returns `false` when already started
    /// or shut down.
    pub fn start_serving_on(&self, accept: &Handle, connections: &Handle) -> bool {
        self.start_accepting(accept, Some(connections))
    }

    fn start_accepting(&self, accept: &Handle, connections: Option<&Handle>) -> bool {
        let Some((listeners, events)) = lock(&self.unstarted).take() else {
            return false;
        };
        let _guard = accept.enter();
        if let Some(backplane) = &self.hub.backplane {
            backplane.start(Arc::downgrade(&self.hub), self.hub.stop.clone());
        }
        for listener in listeners {
            let hub = Arc::clone(&self.hub);
            let serving = connections.cloned();
            self.hub
                .tasks
                .spawn_on(accept_loop(hub, listener, events.clone(), serving), accept);
        }
        true
    }

    /// The queue of events. It ends (disconnects) once the server has shut down and every
    /// connection's last event is in it.
    pub fn events(&self) -> &flume::Receiver<Event> {
        &self.events
    }

    /// The next event if one is queued: `Ok(None)` when none is, `Err(())` once the queue has
    /// ended (the server is closed and every event was read).
    #[allow(clippy::result_unit_err)]
    pub fn try_event(&self) -> Result<Option<Event>, ()> {
        match self.events.try_recv() {
            Ok(event) => Ok(Some(event)),
            Err(flume::TryRecvError::Empty) => Ok(None),
            Err(flume::TryRecvError::Disconnected) => Err(()),
        }
    }

    /// Waits until [`Server::try_event`] has something to say (an event, or the end) without
    /// taking the event, so that a caller cancelled while waiting loses nothing.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn event_ready(&self) {
        self.hub.events_ready.wait_until(|| self.has_event()).await;
    }

    /// Whether [`Server::try_event`] has something to say now (an event, or the end).
    pub fn has_event(&self) -> bool {
        !self.events.is_empty() || self.events.is_disconnected()
    }

    /// What the server has done so far.
    pub fn stats(&self) -> Stats {
        let c = &self.hub.counters;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        Stats {
            connections: lock(&self.hub.connections).len() as u64,
            connections_total: self.hub.next_id.load(Ordering::Relaxed) - 1,
            messages_in: load(&c.messages_in),
            messages_out: load(&c.messages_out),
            bytes_in: load(&c.bytes_in),
            bytes_out: load(&c.bytes_out),
            refused_full: load(&c.refused_full),
            protocol_errors: load(&c.protocol_errors),
            idle_timeouts: load(&c.idle_timeouts),
            slow_readers: load(&c.slow_readers),
            connection_errors: load(&c.connection_errors),
            files_received: load(&c.files_received),
            files_sent: load(&c.files_sent),
            transfers_failed: load(&c.transfers_failed),
            tls_failures: load(&c.tls_failures),
            rooms: self.hub.rooms.count() as u64,
            backplane_connected: self.hub.backplane.as_ref().map_or(0, |b| {
                u64::from(b.counters.connected.load(Ordering::Relaxed))
            }),
            backplane_published: self.backplane_count(|c| &c.published),
            backplane_received: self.backplane_count(|c| &c.received),
            backplane_dropped: self.backplane_count(|c| &c.dropped),
        }
    }

    fn backplane_count(&self, which: impl Fn(&backplane::BackplaneCounters) -> &AtomicU64) -> u64 {
        self.hub
            .backplane
            .as_ref()
            .map_or(0, |b| which(&b.counters).load(Ordering::Relaxed))
    }

    /// The live connection with this id.
    pub fn connection(&self, id: ConnId) -> Option<Connection> {
        lock(&self.hub.connections).get(&id).cloned()
    }

    /// The live connections, oldest first.
    pub fn connections(&self) -> Vec<Connection> {
        let mut all: Vec<Connection> = lock(&self.hub.connections).values().cloned().collect();
        all.sort_by_key(Connection::id);
        all
    }

    /// Queues `data` to every live connection but those in `exclude`, following the
    /// `slow_reader` policy for a client whose queue is full. Returns how many it reached.
    ///
    /// # Cancel safety
    /// Cancel safe; the connections reached before cancellation got the message.
    pub async fn broadcast(&self, data: Bytes, exclude: &[ConnId]) -> usize {
        self.hub.broadcast(data, exclude).await
    }

    /// Puts connection `id` in `room`, a name (`lobby`, `chat.lobby`) or a pattern (`chat.*`,
    /// `chat.>`; see [`crate::topic`]); `false` when it was in it already. A connection leaves
    /// its rooms when it ends.
    ///
    /// # Errors
    /// [`Error::Topic`] for a name that breaks the rules; [`Error::Closed`] when there is no such
    /// connection, or it is closing.
    pub fn join(&self, id: ConnId, room: &str) -> Result<bool> {
        let conn = self.connection(id).ok_or_else(|| no_connection(id))?;
        self.hub.rooms.join(&conn, room)
    }

    /// Takes connection `id` out of `room` (as joined: a name or a pattern); `false` when it
    /// was not in it.
    pub fn leave(&self, id: ConnId, room: &str) -> bool {
        self.hub.rooms.leave(id, room)
    }

    /// The rooms connection `id` is in, sorted; none for a connection that has ended.
    pub fn rooms(&self, id: ConnId) -> Vec<String> {
        self.hub.rooms.rooms_of(id)
    }

    /// The connections a publish to the room `name` reaches (those in a room of that name, or
    /// of a pattern that matches it), by id.
    ///
    /// # Errors
    /// [`Error::Topic`] when `name` is not a name to publish to (a pattern, say).
    pub fn members(&self, name: &str) -> Result<Vec<ConnId>> {
        let reached = self.hub.rooms.reached_by(name, &[])?;
        Ok(reached.iter().map(Connection::id).collect())
    }

    /// Queues `data` to every connection that a publish to the room `name` reaches (see
    /// [`Server::members`]) but those in `exclude`, each once, as [`Server::broadcast`] does
    /// (the same `slow_reader` policy); returns how many it reached.
    ///
    /// # Errors
    /// [`Error::Topic`] when `name` is not a name to publish to.
    ///
    /// # Cancel safety
    /// As [`Server::broadcast`].
    pub async fn publish(&self, name: &str, data: Bytes, exclude: &[ConnId]) -> Result<usize> {
        self.hub.publish(Arc::from(name), data, exclude).await
    }

    /// Sends the file at `path` to connection `id` (under `name`, by default its own), streamed
    /// in bounded memory, and returns once the client has verified and saved it in its
    /// `download_dir`.
    ///
    /// # Errors
    /// [`Error::Closed`] when there is no such connection or it ends first; otherwise as
    /// [`Client::send_file`](crate::Client::send_file).
    ///
    /// # Cancel safety
    /// Cancelling stops the transfer; the client keeps what arrived, for a resume.
    pub async fn send_file(
        &self,
        id: ConnId,
        path: &std::path::Path,
        name: Option<String>,
        progress: &Arc<Progress>,
    ) -> Result<SentFile> {
        let conn = self.connection(id).ok_or_else(|| no_connection(id))?;
        // NOTE: a client comes back from another port; its address is the one it had.
        let receiver = conn.peer.ip().to_string();
        let sent = transfer::send_file(
            &conn.outbox,
            &conn.outgoing,
            &receiver,
            path,
            name,
            progress,
        )
        .await;
        let counter = match &sent {
            Ok(_) => &self.hub.counters.files_sent,
            Err(Error::Transfer { .. }) => &self.hub.counters.transfers_failed,
            Err(_) => return sent,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        sent
    }

    /// Begins a graceful shutdown: stop accepting, and close every connection with a reason after
    /// what is already queued for it. Returns at once; [`Server::wait_closed`] waits.
    pub fn shutdown(&self) {
        self.hub.stop.cancel();
        for conn in lock(&self.hub.connections).values() {
            conn.control.wake.fire();
        }
        self.hub.tasks.close();
        // Never started: dropping the sender ends the event queue.
        lock(&self.unstarted).take();
    }

    /// Whether the server has shut down and every one of its tasks has ended.
    pub fn has_ended(&self) -> bool {
        self.hub.stop.is_cancelled() && self.hub.tasks.is_empty()
    }

    pub fn is_shutting_down(&self) -> bool {
        self.hub.stop.is_cancelled()
    }

    /// Waits for every task to end after [`Server::shutdown`]; after `grace` the connections
    /// still writing are dropped.
    ///
    /// # Cancel safety
    /// Cancel safe; the shutdown goes on.
    pub async fn wait_closed(&self, grace: Duration) {
        if tokio::time::timeout(grace, self.hub.tasks.wait())
            .await
            .is_err()
        {
            log::warn!("connections still busy {grace:?} after shutdown began; dropping them");
            self.hub.abort.cancel();
            self.hub.tasks.wait().await;
        }
    }
}

/// Descriptors kept for what is not a connection (listeners, files, the runtime's own).
const SPARE_DESCRIPTORS: u64 = 64;

/// Raises the soft limit of open descriptors to the hard one, since each connection takes one
/// (many systems start programs at 1,024), and warns when `max_connections` is beyond it.
#[cfg(unix)]
fn raise_descriptor_limit(max_connections: usize) {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let mut soft = limit.current;
    if limit.current != limit.maximum && limit.maximum.is_some() {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => soft = limit.maximum,
            Err(e) => log::debug!("cannot raise the descriptor limit: {e}"),
        }
    }
    let Some(soft) = soft else { return };
    if max_connections as u64 + SPARE_DESCRIPTORS > soft {
        log::warn!(
            "max_connections is {max_connections}, but this process may open only {soft} \
             descriptors (RLIMIT_NOFILE, hard limit included): accepts beyond about {} \
             connections will fail. Raise the limit (ulimit -n) or lower max_connections",
            soft.saturating_sub(descriptors_in_use())
        );
    }
}

/// How many descriptors this process holds now (an estimate where it cannot be counted).
fn descriptors_in_use() -> u64 {
    std::fs::read_dir("/proc/self/fd").map_or(SPARE_DESCRIPTORS, |fds| fds.count() as u64)
}

fn bind_listener(addr: SocketAddr, config: &ServerConfig) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // NOTE: SO_REUSEADDR lets a restarted server bind while old connections sit in TIME_WAIT; on
    // Unix it does not let two live listeners share the port (SO_REUSEPORT does).
    #[cfg(unix)]
    socket.set_reuse_address(config.reuse_addr)?;
    #[cfg(all(unix, not(any(target_os = "solaris", target_os = "illumos"))))]
    socket.set_reuse_port(config.reuse_port || config.workers > 1)?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        // "::" serves IPv4 clients too (dual stack), whatever the system default.
        socket.set_only_v6(false)?;
    }
    // Buffer sizes set on the listener before listen() are the ones the TCP window scale of
    // accepted connections is negotiated for.
    if let Some(size) = config.socket.recv_buffer {
        socket.set_recv_buffer_size(size)?;
    }
    if let Some(size) = config.socket.send_buffer {
        socket.set_send_buffer_size(size)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(config.backlog).unwrap_or(i32::MAX))?;
    Ok(socket.into())
}

/// Accepts connections until the server stops, serving each on `serving` (or where it runs).
async fn accept_loop(
    hub: Arc<Hub>,
    listener: std::net::TcpListener,
    events: EventSender,
    serving: Option<Handle>,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(e) => {
            log::error!("cannot register the listener with the runtime: {e}");
            return;
        }
    };
    let mut accept_errors = AcceptErrors::default();
    loop {
        let accepted = tokio::select! {
            biased;
            () = hub.stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                if let Err(e) = hub.config.socket.apply(socket2::SockRef::from(&stream)) {
                    log::warn!("cannot set the socket options of {peer}: {e}");
                }
                // NOTE: the slot is taken after accept, never before: over the limit the
                // client is told so at once instead of waiting unanswered in the backlog.
                match take_slot(&hub, peer) {
                    Ok(slot) => {
                        // Ids follow the order of accepts.
                        let id = hub.next_id.fetch_add(1, Ordering::Relaxed);
                        let (conn_hub, events) = (Arc::clone(&hub), events.clone());
                        let Some(serving) = &serving else {
                            hub.tasks
                                .spawn(handler::serve(conn_hub, id, stream, peer, events, slot));
                            continue;
                        };
                        // NOTE: a socket is registered with the runtime that made it; it moves
                        // as a plain descriptor and is registered again inside the runtime that
                        // serves it, so that its readiness wakes that one, not this one.
                        let stream = {
                            let _inside = serving.enter();
                            stream.into_std().and_then(TcpStream::from_std)
                        };
                        match stream {
                            Ok(stream) => {
                                let serve =
                                    handler::serve(conn_hub, id, stream, peer, events, slot);
                                hub.tasks.spawn_on(serve, serving);
                            }
                            Err(e) => {
                                log::warn!("cannot hand the connection from {peer} over: {e}")
                            }
                        }
                    }
                    Err(reason) => match Arc::clone(&hub.refusals).try_acquire_owned() {
                        Ok(permit) => {
                            let task = handler::refuse_full(Arc::clone(&hub), stream, peer, reason);
                            hub.tasks.spawn(async move {
                                task.await;
                                drop(permit);
                            });
                        }
                        Err(_) => {
                            hub.counters.refused_full.fetch_add(1, Ordering::Relaxed);
                            log::debug!("server full; closed {peer} without a word");
                        }
                    },
                }
            }
            Err(e) if is_connection_error(&e) => {
                log::debug!("a connection failed while being accepted: {e}");
            }
            Err(e) => {
                // Out of file descriptors, most likely: wait instead of spinning on the error,
                // and say so now and then rather than ten times a second.
                accept_errors.failed(&e);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    log::debug!("stopped accepting on {:?}", listener.local_addr());
}

/// Logs failed accepts at most once per [`ACCEPT_ERROR_EVERY`], with how many were not logged.
#[derive(Default)]
struct AcceptErrors {
    last_logged: Option<tokio::time::Instant>,
    unlogged: u64,
}

const ACCEPT_ERROR_EVERY: Duration = Duration::from_secs(5);

impl AcceptErrors {
    fn failed(&mut self, e: &io::Error) {
        let now = tokio::time::Instant::now();
        if self
            .last_logged
            .is_some_and(|last| now - last < ACCEPT_ERROR_EVERY)
        {
            self.unlogged += 1;
            return;
        }
        let hint = if e.raw_os_error() == Some(24) {
            " (out of file descriptors: raise `ulimit -n`, or lower max_connections)"
        } else {
            ""
        };
        let unlogged = std::mem::take(&mut self.unlogged);
        let also = if unlogged > 0 {
            format!("; {unlogged} more failed since the last report")
        } else {
            String::new()
        };
        log::error!("accept failed: {e}{hint}; retrying every 100 ms{also}");
        self.last_logged = Some(now);
    }
}

/// A connection's place under `max_connections` and `max_connections_per_ip`, given back when
/// it is dropped.
pub(super) struct Slot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    /// Boxed: only with `max_connections_per_ip`, and a slot is in every connection's task.
    _address: Option<Box<AddressSlot>>,
}

/// One connection counted against its client's address.
struct AddressSlot {
    counts: Arc<Mutex<HashMap<std::net::IpAddr, usize>>>,
    ip: std::net::IpAddr,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut counts = lock(&self.counts);
        if let Some(count) = counts.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// A slot for a connection from `peer`, or why there is none (for the client to be told).
fn take_slot(hub: &Arc<Hub>, peer: SocketAddr) -> std::result::Result<Slot, String> {
    let full = || {
        format!(
            "server full: it serves at most {} connections; try again later",
            hub.config.max_connections
        )
    };
    let address = match hub.config.max_connections_per_ip {
        None => None,
        Some(limit) => {
            // NOTE: an IPv4 client of a dual-stack listener arrives as ::ffff:a.b.c.d.
            let ip = peer.ip().to_canonical();
            let mut counts = lock(&hub.per_address);
            let count = counts.entry(ip).or_insert(0);
            if *count >= limit {
                return Err(format!(
                    "too many connections from {ip}: the server takes at most {limit} from one                      address (max_connections_per_ip); try again later"
                ));
            }
            *count += 1;
            Some(Box::new(AddressSlot {
                counts: Arc::clone(&hub.per_address),
                ip,
            }))
        }
    };
    // Taken after the address's count, so that a refusal by either gives back nothing it took
    // (the AddressSlot is dropped with the error).
    let permit = Arc::clone(&hub.slots)
        .try_acquire_owned()
        .map_err(|_| full())?;
    Ok(Slot {
        _permit: permit,
        _address: address,
    })
}

/// The error for an operation on a connection that is not (or no longer) served.
fn no_connection(id: ConnId) -> Error {
    Error::Closed(CloseInfo::new(
        None,
        format!("there is no connection {id}: it has ended, or never existed"),
    ))
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

impl Hub {
    /// Hands an event to the application. In the native modes nobody may be reading, so an event
    /// that finds the queue full is dropped; otherwise the connection waits (backpressure).
    async fn emit(&self, events: &EventSender, event: Event) {
        if let Some(waiting) = self.offer(events, event) {
            waiting.await;
        }
    }

    /// As [`Hub::emit`], without waiting: queues `event` at once when the queue has room (or
    /// drops it, in a native mode) and returns `None`; else returns the wait for room.
    ///
    /// NOTE: the wait is boxed and made only when the queue is full, so that the connection's
    /// task holds one pointer for it instead of the event and a channel's send future (about
    /// 600 bytes, in every connection's task, idle ones too).
    fn offer<'a>(&'a self, events: &'a EventSender, event: Event) -> Option<Waiting<'a>> {
        match events.try_send(event) {
            Ok(()) => {}
            Err(flume::TrySendError::Full(event)) if !self.config.mode.is_native() => {
                return Some(Box::pin(async move {
                    tokio::select! {
                        () = self.abort.cancelled() => return,
                        sent = events.send_async(event) => {
                            if sent.is_err() {
                                return;
                            }
                        }
                    }
                    self.events_ready.notify();
                }));
            }
            Err(flume::TrySendError::Full(_)) => {
                log::trace!("event queue full; dropped an event of a native-mode server");
            }
            Err(flume::TrySendError::Disconnected(_)) => return None,
        }
        self.events_ready.notify();
        None
    }

    /// Queues `data` to every connection but `exclude`, here and (with a backplane) on the
    /// other servers; how many it reached here.
    async fn broadcast(&self, data: Bytes, exclude: &[ConnId]) -> usize {
        if let Some(backplane) = &self.backplane {
            backplane.send(&backplane::Reach::Everyone, &data);
        }
        self.broadcast_locally(data, exclude).await
    }

    /// Queues `data` to every connection in a room `topic` matches but `exclude`, here and
    /// (with a backplane) on the other servers; how many it reached here.
    ///
    /// # Errors
    /// [`Error::Topic`] when `topic` is not a name to publish to.
    async fn publish(&self, topic: Arc<str>, data: Bytes, exclude: &[ConnId]) -> Result<usize> {
        let targets = self.rooms.reached_by(&topic, exclude)?;
        if let Some(backplane) = &self.backplane {
            backplane.send(&backplane::Reach::Room(Arc::clone(&topic)), &data);
        }
        Ok(self.fan_out(targets, Some(&topic), data).await)
    }

    /// Delivers what another server published to this server's connections.
    async fn deliver_locally(&self, reach: &backplane::Reach, data: Bytes) {
        match reach {
            backplane::Reach::Everyone => {
                self.broadcast_locally(data, &[]).await;
            }
            backplane::Reach::Room(topic) => {
                if let Ok(targets) = self.rooms.reached_by(topic, &[]) {
                    self.fan_out(targets, Some(topic), data).await;
                }
            }
        }
    }

    async fn broadcast_locally(&self, data: Bytes, exclude: &[ConnId]) -> usize {
        let targets: Vec<Connection> = lock(&self.connections)
            .values()
            .filter(|conn| !exclude.contains(&conn.id))
            .cloned()
            .collect();
        self.fan_out(targets, None, data).await
    }

    /// Queues `data` to each of `targets` (as published to `topic`, if any), waiting for the
    /// full queues together under the `slow_reader` policy; returns how many it reached.
    async fn fan_out(
        &self,
        targets: Vec<Connection>,
        topic: Option<&Arc<str>>,
        data: Bytes,
    ) -> usize {
        let mut reached = 0;
        let mut full = Vec::new();
        for conn in targets {
            match conn.outbox.try_send(conn.message_frame(topic, &data)) {
                Ok(true) => reached += 1,
                Ok(false) => full.push(conn),
                Err(_) => {}
            }
        }
        // NOTE: the full queues wait all at once, for one grace period in all: waiting for one
        // slow reader after another added a second per slow reader to everyone's latency.
        // A full queue may be a burst; a slow reader is one whose queue stays full for the
        // whole grace period.
        let deadline = tokio::time::Instant::now() + SLOW_READER_GRACE;
        let waits = full.iter().map(|conn| async {
            let send = conn.outbox.send(conn.message_frame(topic, &data));
            match self.config.slow_reader {
                SlowReader::Wait => send.await.is_ok(),
                SlowReader::Disconnect => match tokio::time::timeout_at(deadline, send).await {
                    Ok(sent) => sent.is_ok(),
                    Err(_) => {
                        conn.drop_as_slow_reader("a broadcast");
                        false
                    }
                },
            }
        });
        reached += futures_util::future::join_all(waits)
            .await
            .into_iter()
            .filter(|sent| *sent)
            .count();
        self.counters
            .messages_out
            .fetch_add(reached as u64, Ordering::Relaxed);
        reached
    }
}
