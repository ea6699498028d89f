//! The server: binds at construction, then an accept loop spawns one task per connection, which
//! tells a framed client from a plain socket by its first bytes, answers natively in the
//! `echo`/`ack` modes, and otherwise hands [`Event`]s to the application through a bounded queue.
//!
//! The core never builds a runtime: [`Server::start`] takes a handle to the caller's.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Mode, ServerConfig};
use crate::connection::{write_loop, ConnState, Inbound, Outbox};
use crate::error::{CloseInfo, Error, FrameError, Result};
use crate::frame::{self, CloseCode, Frame, Hello, Sniff, HELLO_LEN};

/// Identifies a connection for the lifetime of its server; never reused.
pub type ConnId = u64;

/// The server's handle on one connection; cheap to clone.
#[derive(Debug, Clone)]
pub struct Connection {
    id: ConnId,
    peer: SocketAddr,
    outbox: Outbox,
}

impl Connection {
    pub fn id(&self) -> ConnId {
        self.id
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Queues `data` as one message to this client (raw clients get the bare bytes).
    ///
    /// # Errors
    /// [`Error::Closed`] once the connection has ended; [`Error::FrameTooLarge`] when the client
    /// announced a smaller `max_frame`.
    ///
    /// # Cancel safety
    /// Cancel safe: the message is queued whole or not at all.
    pub async fn send(&self, data: Bytes) -> Result<()> {
        self.outbox.send(Frame::Data(data)).await
    }

    /// Why the connection ended, once it has.
    pub fn close_info(&self) -> Option<CloseInfo> {
        self.outbox.state().close_info().cloned()
    }
}

/// A message from a client.
#[derive(Debug, Clone)]
pub struct Message {
    pub conn: Connection,
    pub data: Bytes,
    /// Set when the client sent a request and waits for the reply with this id.
    pub request_id: Option<u32>,
}

impl Message {
    /// Answers this message: as the reply to its request, or as a plain message.
    ///
    /// # Errors
    /// As [`Connection::send`].
    ///
    /// # Cancel safety
    /// Cancel safe, as [`Connection::send`].
    pub async fn reply(&self, data: Bytes) -> Result<()> {
        self.conn.outbox.send(answer(self.request_id, data)).await
    }
}

fn answer(request_id: Option<u32>, body: Bytes) -> Frame {
    match request_id {
        Some(id) => Frame::Reply { id, body },
        None => Frame::Data(body),
    }
}

/// What happens on a server, in order per connection.
#[derive(Debug, Clone)]
pub enum Event {
    Connected(Connection),
    Message(Message),
    Disconnected { conn: Connection, reason: CloseInfo },
}

/// A bound server. Dropping it without [`Server::shutdown`] leaves its tasks running until the
/// runtime ends, so call `shutdown` (the Python layer does so on `close()` and when collected).
pub struct Server {
    local_addr: SocketAddr,
    hub: Arc<Hub>,
    /// The listener and the event sender, until [`Server::start`] moves them into the accept loop.
    unstarted: Mutex<Option<(std::net::TcpListener, flume::Sender<Event>)>>,
    events: flume::Receiver<Event>,
}

/// State shared by the accept loop, the connection tasks and the owner.
struct Hub {
    config: ServerConfig,
    connections: Mutex<HashMap<ConnId, Connection>>,
    next_id: AtomicU64,
    /// Graceful stop: no more accepts, connections close with a reason after their queued output.
    stop: CancellationToken,
    /// Hard stop, after the grace period: every task returns at once.
    abort: CancellationToken,
    tasks: TaskTracker,
}

impl Server {
    /// Binds `addr` and listens; nothing is accepted until [`Server::start`].
    ///
    /// # Errors
    /// [`Error::InvalidOption`] for an unusable config, [`Error::Io`] when the address cannot be
    /// bound (in use, not local, not permitted).
    pub fn bind(addr: SocketAddr, config: ServerConfig) -> Result<Server> {
        config.validate()?;
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
        let (sender, events) = flume::bounded(config.event_queue);
        let hub = Arc::new(Hub {
            config,
            connections: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            stop: CancellationToken::new(),
            abort: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        Ok(Server {
            local_addr,
            hub,
            unstarted: Mutex::new(Some((listener, sender))),
            events,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn config(&self) -> &ServerConfig {
        &self.hub.config
    }

    /// Starts accepting on `runtime`. Returns `false` when already started or shut down.
    pub fn start(&self, runtime: &Handle) -> bool {
        let Some((listener, events)) = lock(&self.unstarted).take() else {
            return false;
        };
        let hub = Arc::clone(&self.hub);
        let _guard = runtime.enter();
        self.hub
            .tasks
            .spawn_on(accept_loop(hub, listener, events), runtime);
        true
    }

    /// The queue of events. It ends (disconnects) once the server has shut down and every
    /// connection's last event is in it.
    pub fn events(&self) -> &flume::Receiver<Event> {
        &self.events
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

    /// Begins a graceful shutdown: stop accepting, and close every connection with a reason after
    /// what is already queued for it. Returns at once; [`Server::wait_closed`] waits.
    pub fn shutdown(&self) {
        self.hub.stop.cancel();
        self.hub.tasks.close();
        // Never started: dropping the sender ends the event queue.
        lock(&self.unstarted).take();
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

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The data behind these locks stays consistent even if a holder panicked.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn bind_listener(addr: SocketAddr, config: &ServerConfig) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // NOTE: SO_REUSEADDR lets a restarted server bind while old connections sit in TIME_WAIT; on
    // Unix it does not let two live listeners share the port.
    #[cfg(unix)]
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(config.backlog).unwrap_or(i32::MAX))?;
    Ok(socket.into())
}

async fn accept_loop(hub: Arc<Hub>, listener: std::net::TcpListener, events: flume::Sender<Event>) {
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(e) => {
            log::error!("cannot register the listener with the runtime: {e}");
            return;
        }
    };
    loop {
        let accepted = tokio::select! {
            biased;
            () = hub.stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                if hub.config.nodelay {
                    if let Err(e) = stream.set_nodelay(true) {
                        log::debug!("cannot set TCP_NODELAY for {peer}: {e}");
                    }
                }
                let task = serve_connection(Arc::clone(&hub), stream, peer, events.clone());
                hub.tasks.spawn(task);
            }
            Err(e) if is_connection_error(&e) => {
                log::debug!("a connection failed while being accepted: {e}");
            }
            Err(e) => {
                // Out of file descriptors, most likely: wait instead of spinning on the error.
                log::error!("accept failed: {e}; retrying in 100 ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    log::debug!("stopped accepting on {:?}", listener.local_addr());
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
    async fn emit(&self, events: &flume::Sender<Event>, event: Event) {
        if self.config.mode.is_native() {
            if events.try_send(event).is_err() {
                log::trace!("event queue full; dropped an event of a native-mode server");
            }
            return;
        }
        tokio::select! {
            () = self.abort.cancelled() => {}
            _ = events.send_async(event) => {}
        }
    }
}

async fn serve_connection(
    hub: Arc<Hub>,
    stream: TcpStream,
    peer: SocketAddr,
    events: flume::Sender<Event>,
) {
    let id = hub.next_id.fetch_add(1, Ordering::Relaxed);
    let (queue, queued) = flume::bounded(hub.config.outbound_queue);
    // Raw clients have no frame limit; a framed client's comes with its hello.
    let state = ConnState::new(u32::MAX);
    let conn = Connection {
        id,
        peer,
        outbox: Outbox::new(queue, state),
    };
    lock(&hub.connections).insert(id, conn.clone());
    log::debug!("connection {id} from {peer}");
    hub.emit(&events, Event::Connected(conn.clone())).await;

    let reason = run_connection(&hub, stream, &conn, queued, &events).await;

    conn.outbox.state().mark_closed(reason.clone());
    lock(&hub.connections).remove(&id);
    log::debug!("connection {id} from {peer} ended: {reason}");
    hub.emit(&events, Event::Disconnected { conn, reason })
        .await;
}

/// Serves one connection to its end, and says why it ended.
async fn run_connection(
    hub: &Hub,
    mut stream: TcpStream,
    conn: &Connection,
    queued: flume::Receiver<Frame>,
    events: &flume::Sender<Event>,
) -> CloseInfo {
    let mut buffered = BytesMut::with_capacity(8 * 1024);
    let raw = loop {
        match frame::sniff(&buffered) {
            Sniff::Raw => break true,
            Sniff::Framed => break false,
            Sniff::NeedMore => {}
        }
        let read = tokio::select! {
            () = hub.stop.cancelled() => return shutting_down(),
            read = stream.read_buf(&mut buffered) => read,
        };
        match read {
            Ok(0) if buffered.is_empty() => {
                return CloseInfo::new(None, "the client closed the connection without sending");
            }
            // A few bytes that happen to start like the magic, then the end: raw after all.
            Ok(0) => break true,
            Ok(_) => {}
            Err(e) => return io_close_info(&e),
        }
    };

    if !raw {
        let hello_bytes: [u8; HELLO_LEN] = buffered.split_to(HELLO_LEN)[..]
            .try_into()
            .expect("sniff saw a whole hello");
        if let Err(reason) = answer_hello(hub, &mut stream, conn, &hello_bytes).await {
            return reason;
        }
    }

    let (reader, writer) = stream.into_split();
    let (finish, finished) = oneshot::channel();
    let writer = tokio::spawn(write_loop(writer, queued, finished, raw, hub.abort.clone()));
    let mut inbound = Inbound::new(reader, raw, hub.config.max_frame, buffered);

    let (reason, last_frame) = loop {
        let next = tokio::select! {
            biased;
            () = hub.abort.cancelled() => break (shutting_down(), None),
            () = hub.stop.cancelled() => {
                let reason = shutting_down();
                break (reason, Some(Frame::close(CloseCode::GOING_AWAY, "server shutting down")));
            }
            next = inbound.next() => next,
        };
        match next {
            None => break (CloseInfo::new(None, "closed by the client"), None),
            Some(Ok(frame)) => {
                if let Some(ended) = handle_frame(hub, conn, frame, events).await {
                    break (ended, None);
                }
            }
            Some(Err(FrameError::Io(e))) => break (io_close_info(&e), None),
            Some(Err(e @ FrameError::Truncated(_))) => {
                break (CloseInfo::new(None, format!("the client left: {e}")), None)
            }
            Some(Err(e)) => {
                let code = e.close_code();
                let reason = e.to_string();
                log::info!("connection {} from {}: {reason}", conn.id, conn.peer);
                break (
                    CloseInfo::new(Some(code), reason.clone()),
                    Some(Frame::close(code, &reason)),
                );
            }
        }
    };
    // Tell the writer to finish after what is queued (the framed close frame goes last).
    let _ = finish.send(last_frame.filter(|_| !raw));
    match writer.await {
        Ok(Err(e)) => log::debug!("connection {}: write failed: {e}", conn.id),
        Err(e) => log::error!("connection {}: writer task failed: {e}", conn.id),
        Ok(Ok(())) => {}
    }
    reason
}

async fn answer_hello(
    hub: &Hub,
    stream: &mut TcpStream,
    conn: &Connection,
    hello_bytes: &[u8; HELLO_LEN],
) -> Result<(), CloseInfo> {
    let offered = match Hello::decode(hello_bytes) {
        Ok(offered) => offered,
        Err(e) => {
            // The magic matched, so this is a (broken) socketcomm peer: say why in a close frame.
            let mut out = BytesMut::new();
            let refusal = Hello::answer(
                &Hello {
                    min_version: 0,
                    max_version: 0,
                    max_frame: hub.config.max_frame,
                },
                hub.config.max_frame,
            );
            out.extend_from_slice(&refusal.encode());
            frame::encode_frame(
                &Frame::close(CloseCode::PROTOCOL_ERROR, &e.to_string()),
                &mut out,
            );
            let _ = stream.write_all(&out).await;
            return Err(CloseInfo::new(
                Some(CloseCode::PROTOCOL_ERROR),
                e.to_string(),
            ));
        }
    };
    let answer = Hello::answer(&offered, hub.config.max_frame);
    let mut out = BytesMut::from(&answer.encode()[..]);
    let refused = answer.agreed_version().is_none();
    if refused {
        let reason = format!(
            "the client speaks protocol versions {}..={}, this server speaks {}",
            offered.min_version,
            offered.max_version,
            frame::PROTOCOL_VERSION
        );
        frame::encode_frame(
            &Frame::close(CloseCode::UNSUPPORTED_VERSION, &reason),
            &mut out,
        );
        let _ = stream.write_all(&out).await;
        return Err(CloseInfo::new(Some(CloseCode::UNSUPPORTED_VERSION), reason));
    }
    conn.outbox.state().set_peer_max_frame(offered.max_frame);
    stream.write_all(&out).await.map_err(|e| io_close_info(&e))
}

/// Handles one frame from the client; returns why the connection ends, if it does.
async fn handle_frame(
    hub: &Hub,
    conn: &Connection,
    frame: Frame,
    events: &flume::Sender<Event>,
) -> Option<CloseInfo> {
    let (request_id, data) = match frame {
        Frame::Data(data) => (None, data),
        Frame::Request { id, body } => (Some(id), body),
        Frame::Ping(token) => {
            send_or_log(conn, Frame::Pong(token)).await;
            return None;
        }
        Frame::Close { code, reason } => {
            let reason = if reason.is_empty() {
                "closed by the client".to_owned()
            } else {
                format!("closed by the client: {reason}")
            };
            return Some(CloseInfo::new(Some(code), reason));
        }
        Frame::Pong(_) | Frame::Reply { .. } => {
            log::debug!(
                "connection {}: ignored a frame the server did not ask for",
                conn.id
            );
            return None;
        }
    };
    match hub.config.mode {
        Mode::Events => {
            let message = Message {
                conn: conn.clone(),
                data,
                request_id,
            };
            hub.emit(events, Event::Message(message)).await;
        }
        Mode::Echo => send_or_log(conn, answer(request_id, data)).await,
        Mode::Ack => send_or_log(conn, answer(request_id, hub.config.ack_reply.clone())).await,
    }
    None
}

async fn send_or_log(conn: &Connection, frame: Frame) {
    if let Err(e) = conn.outbox.send(frame).await {
        log::debug!("connection {}: cannot answer: {e}", conn.id);
    }
}

fn shutting_down() -> CloseInfo {
    CloseInfo::new(Some(CloseCode::GOING_AWAY), "server shutting down")
}

fn io_close_info(e: &io::Error) -> CloseInfo {
    let reason = match e.kind() {
        io::ErrorKind::ConnectionReset => "the client reset the connection".to_owned(),
        io::ErrorKind::BrokenPipe => "the client went away while we were writing".to_owned(),
        _ => format!("connection failed: {e}"),
    };
    CloseInfo::new(None, reason)
}
