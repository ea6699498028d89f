//! One accepted connection, from its first byte to its last event: telling framed from raw, the
//! hello, the read loop (native answers or events), the idle timer, and the close with a reason.
//! Also the short answer to a client that arrives when the server is full.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use futures_util::future::Either;
use futures_util::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::codec::Decoder;

use super::reads::{ReadSize, READ_CHUNK};
use super::{
    lock, ConnId, Connection, ConnectionParts, Control, Event, EventSender, Hub, Message, Slot,
    Subscription, Wake,
};
use crate::budget::{BufferRoom, Charge, ChargeWait, Inbound, FREE_READ_BUFFER};
use crate::config::{Mode, Pings};
use crate::connection::{
    drain_into, encode, is_message, outbound, ConnState, Queued, ServerTlsStream, Transport,
    WaitReadable,
};
use crate::error::{CloseInfo, FrameError};
use crate::frame::{
    self, CloseCode, Frame, FrameCodec, Hello, Sniff, TopicStatus, TransferStatus, HELLO_LEN,
    LENGTH_PREFIX,
};
use crate::heartbeat::{Beat, Heartbeat, RawFd};
use crate::tls::{handshake_error, PeerIdentity, ServerTls};
use crate::transfer::{Delivery, ReceivedFile, Receiving};

/// How long a subscription waits for the application's answer (`on_subscribe`, or a
/// `SubscriptionRequest` event) before it is refused: the connection's later frames wait too.
const SUBSCRIPTION_ANSWER: Duration = Duration::from_secs(10);

/// How long the writer may take to flush what is queued once the connection is closing, before
/// the rest is dropped.
const FLUSH_GRACE: Duration = Duration::from_secs(5);

/// How long a client that arrives when the server is full gets to show which protocol it
/// speaks, and then to take the answer.
const REFUSAL_WAIT: Duration = Duration::from_secs(1);

/// Serves one connection to its end (after the TLS handshake, on a TLS server): the future
/// that the connection's task runs.
///
/// NOTE: a task holds its future inline, so this future's size is every connection's memory,
/// idle ones too. What a connection keeps for its life is owned here, once (an `async fn`
/// would keep its arguments twice: as arguments and as the locals they move into); what it
/// needs only while data flows is boxed, and dropped once it has been quiet (see [`live`]).
pub(super) fn serve(
    hub: Arc<Hub>,
    id: ConnId,
    stream: TcpStream,
    peer: SocketAddr,
    events: EventSender,
    slot: Slot,
) -> impl Future<Output = ()> + Send {
    match hub.config.tls.clone() {
        None => Either::Left(serve_on(hub, id, stream, peer, events, None, slot)),
        // NOTE: boxed, so that the TLS states (rustls' connection is large) do not make every
        // plaintext connection's task that much bigger.
        Some(tls) => Either::Right(Box::pin(async move {
            if let Some((stream, identity)) = secure(&hub, &tls, stream, peer).await {
                serve_on(hub, id, stream, peer, events, identity, slot).await;
            }
        })),
    }
}

/// The first byte of a TLS record that carries a handshake message (a ClientHello).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// The TLS handshake, within `tls_handshake_timeout` and until the server stops. A client that
/// speaks plaintext is told that TLS is required, in its own protocol.
async fn secure(
    hub: &Hub,
    tls: &ServerTls,
    stream: TcpStream,
    peer: SocketAddr,
) -> Option<(ServerTlsStream, Option<Arc<PeerIdentity>>)> {
    let limit = hub.config.tls_handshake_timeout;
    let handshake = async {
        let mut first = [0u8; 1];
        if stream.peek(&mut first).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the client closed the connection before the TLS handshake",
            ));
        }
        if first[0] != TLS_HANDSHAKE_RECORD {
            refuse_plaintext(hub, stream, peer, first[0]).await;
            return Ok(None);
        }
        let secured = tls.acceptor().accept(stream).await?;
        let identity = secured
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(|cert| Arc::new(PeerIdentity::from_der(cert)));
        Ok(Some((secured, identity)))
    };
    let outcome = tokio::select! {
        () = hub.stop.cancelled() => return None,
        outcome = tokio::time::timeout(limit, handshake) => outcome,
    };
    let failure = match outcome {
        Ok(Ok(secured)) => return secured,
        Ok(Err(e)) => format!("the TLS handshake failed: {}", handshake_error(&e, true)),
        Err(_) => format!("no TLS handshake within {limit:?} (tls_handshake_timeout); dropped"),
    };
    hub.counters.tls_failures.fetch_add(1, Ordering::Relaxed);
    log::info!("{peer}: {failure}");
    None
}

/// Tells a client that spoke plaintext to a TLS server that TLS is required: a refusing hello
/// and a close frame (code 1008) to a socketcomm client, a line of text to a plain socket.
async fn refuse_plaintext(hub: &Hub, mut stream: TcpStream, peer: SocketAddr, first: u8) {
    hub.counters.tls_failures.fetch_add(1, Ordering::Relaxed);
    log::info!("{peer} spoke plaintext to this TLS server; told it that TLS is required");
    let reason = "this server requires TLS: connect with tls=socketcomm.ClientTls(...) (on the \
                  command line --tls, --tls-ca or --tls-fingerprint)";
    let mut out = BytesMut::new();
    if first == frame::MAGIC[0] {
        out.extend_from_slice(&Hello::refusal(hub.config.max_frame).encode());
        frame::encode_frame(&Frame::close(CloseCode::TLS_REQUIRED, reason), &mut out);
    } else {
        out.extend_from_slice(reason.as_bytes());
        out.extend_from_slice(b"\n");
    }
    let _ = tokio::time::timeout(REFUSAL_WAIT, async {
        stream.write_all(&out).await?;
        stream.shutdown().await?;
        // Read what the client sent until it closes: closing with unread bytes would reset the
        // connection, and the client might lose the answer.
        let mut sink = [0u8; 1024];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, io::Error>(())
    })
    .await;
}

/// The descriptor of a TCP socket, for asking the kernel about it (see `heartbeat.rs`).
fn socket_fd(stream: &TcpStream) -> Option<RawFd> {
    #[cfg(unix)]
    return Some(std::os::fd::AsRawFd::as_raw_fd(stream));
    #[cfg(not(unix))]
    return None;
}

/// Serves one connection, plaintext or already secured, to its end.
fn serve_on<S: Transport>(
    hub: Arc<Hub>,
    id: ConnId,
    mut stream: S,
    peer: SocketAddr,
    events: EventSender,
    identity: Option<Arc<PeerIdentity>>,
    slot: Slot,
) -> impl Future<Output = ()> + Send {
    // Raw clients have no frame limit; a framed client's comes with its hello.
    let state = ConnState::new(u32::MAX, hub.config.outbound_bytes);
    let (outbox, mut queued) = outbound(hub.config.outbound_queue, state);
    let conn = Connection(Arc::new(ConnectionParts {
        id,
        peer,
        outbox,
        control: Control {
            wake: Wake::default(),
            slow_reader: hub.config.slow_reader,
        },
        outgoing: Default::default(),
        identity,
    }));
    // NOTE: the captured values are used in place, never moved into a nested `async fn`:
    // each would hold its own copy for the connection's life (see `serve`). What only the
    // connection's handle needs (its id, address, identity) lives there alone.
    async move {
        // Registered by the task itself, so that a task never run (its runtime gone) leaves no
        // connection behind.
        lock(&hub.connections).insert(conn.id, conn.clone());
        // A shutdown that began before the insert did not see this connection: catch up.
        if hub.stop.is_cancelled() {
            conn.control.wake.fire();
        }
        log::debug!("connection {} from {}", conn.id, conn.peer);
        hub.emit(&events, Event::Connected(conn.clone())).await;

        // NOTE: a panic (a bug) in the connection's loop ends this connection alone: it is caught
        // here, so that the connection is still unregistered, its slot freed and its Disconnected
        // event sent, and the server goes on serving the others.
        let running = live(&hub, &mut stream, &conn, &mut queued, &events);
        let reason = match AssertUnwindSafe(running).catch_unwind().await {
            Ok(reason) => reason,
            Err(panic) => internal_error(&hub, &conn, panic.as_ref()),
        };
        count_ending(&hub, &reason);

        conn.outbox.state().mark_closed(reason.clone());
        conn.outgoing.close();
        lock(&hub.connections).remove(&conn.id);
        hub.rooms.leave_all(conn.id);
        // NOTE: the slot is free before Disconnected is sent, so that an application (or a test)
        // that connects again on seeing it is never refused as over `max_connections`.
        drop(slot);
        // Senders that still hold the connection learn at once that it is gone.
        queued.close();
        log::debug!("connection {} from {} ended: {reason}", conn.id, conn.peer);
        hub.emit(&events, Event::Disconnected { conn, reason })
            .await;
    }
}

/// Completes at `deadline`; never without one.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Completes once `sleep` has fired, with one load per poll: it does not register this task
/// ([`wake_at`] does). Never without a sleep.
async fn elapsed(sleep: Option<&Pin<Box<tokio::time::Sleep>>>) {
    std::future::poll_fn(|_| match sleep {
        Some(sleep) if sleep.is_elapsed() => Poll::Ready(()),
        _ => Poll::Pending,
    })
    .await;
}

/// Has this task woken when `sleep` fires, without waiting for it.
async fn wake_at(sleep: &mut Pin<Box<tokio::time::Sleep>>) {
    std::future::poll_fn(|cx| {
        let _ = sleep.as_mut().poll(cx);
        Poll::Ready(())
    })
    .await;
}

/// The ending of a connection that did not say what it speaks within `hello_timeout` (counted
/// with the idle timeouts, by its code).
fn silent(hub: &Hub, conn: &Connection, nothing: bool) -> CloseInfo {
    let limit = hub.config.hello_timeout.unwrap_or_default();
    let what = if nothing {
        "sent nothing"
    } else {
        "did not complete its hello"
    };
    log::info!(
        "connection {} from {}: {what} within {limit:?}",
        conn.id,
        conn.peer
    );
    CloseInfo::new(
        Some(CloseCode::IDLE_TIMEOUT),
        format!("{what} within {limit:?} of connecting (hello_timeout)"),
    )
}

/// The ending of a connection whose loop panicked: logged as an error, counted as a connection
/// error.
fn internal_error(hub: &Hub, conn: &Connection, panic: &(dyn std::any::Any + Send)) -> CloseInfo {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".to_owned());
    log::error!(
        "connection {} from {}: internal error ({what}); this connection was dropped and the \
         server goes on. This is a bug in socketcomm: please report it",
        conn.id,
        conn.peer
    );
    hub.counters
        .connection_errors
        .fetch_add(1, Ordering::Relaxed);
    CloseInfo::new(None, "internal error in the server (a bug; see its log)")
}

/// What receives the files of one connection, made when its first file frame comes.
///
/// NOTE: made then rather than with the connection: most connections never send a file, and
/// the receiver (with the handle it delivers through) would otherwise be part of every
/// connection's task, idle ones too.
fn receiving(hub: &Arc<Hub>, conn: &Connection, events: &EventSender) -> Box<Receiving> {
    Box::new(Receiving::new(
        hub.upload_dir.clone(),
        conn.outbox.clone(),
        Arc::new(Uploads {
            hub: Arc::clone(hub),
            events: events.clone(),
            conn: conn.clone(),
            runtime: tokio::runtime::Handle::current(),
        }),
        conn.peer,
        conn.peer_identity()
            .map(|identity| identity.fingerprint.clone()),
    ))
}

/// Turns files received into `upload_dir` into events, and counts transfers.
struct Uploads {
    hub: Arc<Hub>,
    events: EventSender,
    conn: Connection,
    runtime: tokio::runtime::Handle,
}

impl Delivery for Uploads {
    fn arrived(&self, _file: &ReceivedFile) {
        self.hub
            .counters
            .files_received
            .fetch_add(1, Ordering::Relaxed);
    }

    fn received(&self, file: ReceivedFile) {
        let event = Event::FileReceived {
            conn: self.conn.clone(),
            file,
        };
        self.runtime.block_on(self.hub.emit(&self.events, event));
    }

    fn failed(&self, _offered_name: &str, _status: TransferStatus, _reason: &str) {
        self.hub
            .counters
            .transfers_failed
            .fetch_add(1, Ordering::Relaxed);
    }
}

/// Counts a connection's ending by its kind.
fn count_ending(hub: &Hub, reason: &CloseInfo) {
    let counter = match reason.code {
        Some(
            CloseCode::PROTOCOL_ERROR | CloseCode::FRAME_TOO_LARGE | CloseCode::UNSUPPORTED_VERSION,
        ) => &hub.counters.protocol_errors,
        Some(CloseCode::IDLE_TIMEOUT) => &hub.counters.idle_timeouts,
        // Dropped by a send, a reply or a broadcast whose wait ran out.
        Some(CloseCode::SLOW_READER) => &hub.counters.slow_readers,
        // I/O failures are counted where they are seen (`io_ending`).
        _ => return,
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Why the read loop stopped, and the close frame to send a framed client, if any.
type Ending = (CloseInfo, Option<Frame>);

/// What the greeting found out: the client's protocol, the bytes read past its hello, and the
/// idle clock started at connect.
struct Greeted {
    raw: bool,
    buffered: BytesMut,
    idle: IdleTimer,
}

/// Tells a framed client from a plain socket by its first bytes, and answers a framed one's
/// hello; `Err` with the ending when the connection ends first.
async fn greet<S: Transport>(
    hub: &Hub,
    stream: &mut S,
    conn: &Connection,
) -> Result<Greeted, CloseInfo> {
    let mut idle = IdleTimer::new(hub.config.idle_timeout);
    // Room for the hello; a raw client's first message grows it as needed.
    let mut buffered = BytesMut::with_capacity(2 * HELLO_LEN);
    // NOTE: on by default, so that connections that never say a word cannot hold every slot
    // of `max_connections` for as long as they like.
    let hello_deadline = hub.config.hello_timeout.map(|limit| Instant::now() + limit);
    let raw = loop {
        if frame::looks_like_tls(&buffered) {
            hub.counters.protocol_errors.fetch_add(1, Ordering::Relaxed);
            let reason = "the client began a TLS handshake, but this server serves plaintext \
                          (start it with tls=... to serve TLS)";
            log::info!("connection {} from {}: {reason}", conn.id, conn.peer);
            return Err(CloseInfo::new(None, reason));
        }
        match frame::sniff(&buffered) {
            Sniff::Raw => break true,
            Sniff::Framed => break false,
            Sniff::NeedMore => {}
        }
        let read = tokio::select! {
            () = conn.control.wake.fired() => return Err(woken(hub, conn).0),
            () = idle.expired() => return Err(idle.reason()),
            () = until(hello_deadline) => return Err(silent(hub, conn, buffered.is_empty())),
            read = stream.read_buf(&mut buffered) => read,
        };
        // The bytes of an unfinished hello are not activity (see `handle_buffered`).
        match read {
            Ok(0) if buffered.is_empty() => {
                return Err(CloseInfo::new(
                    None,
                    "the client closed the connection without sending",
                ));
            }
            // A few bytes that happen to start like the magic, then the end: raw after all.
            Ok(0) => break true,
            Ok(_) => {}
            Err(e) => return Err(io_ending(hub, &e)),
        }
    };

    if !raw {
        let hello_bytes: [u8; HELLO_LEN] = buffered.split_to(HELLO_LEN)[..]
            .try_into()
            .expect("sniff saw a whole hello");
        answer_hello(hub, stream, conn, &hello_bytes).await?;
        if buffered.is_empty() {
            // Allocated again once the client sends more (see `read_lazily`).
            buffered = BytesMut::new();
        }
    }

    if raw {
        idle.count_bytes(hub.config.raw_min_rate);
    }
    Ok(Greeted {
        raw,
        buffered,
        idle,
    })
}

/// One connection from its first byte to its end: the greeting, then turns of the loop while
/// data flows, parked in between, then the last writes.
///
/// NOTE: the greeting and the loop are boxed, and the loop's box is dropped once the
/// connection has been quiet for [`QUIET`] (see [`Driver::run`]): a quiet connection's task
/// holds only what it keeps ([`Kept`]) and the small wait of [`park`], not the loop's state,
/// its buffers or their capacity.
// An `async fn` would hold its arguments twice (see `serve`).
#[allow(clippy::manual_async_fn)]
fn live<'a, S: Transport>(
    hub: &'a Arc<Hub>,
    stream: &'a mut S,
    conn: &'a Connection,
    queued: &'a mut Queued,
    events: &'a EventSender,
) -> impl Future<Output = CloseInfo> + Send + 'a {
    // A block, not an `async fn`, for the reason `serve` gives.
    async move {
        let mut kept = match Box::pin(greet(hub, stream, conn)).await {
            Ok(greeted) => Kept::new(hub, conn, greeted, socket_fd(stream.tcp())),
            Err(reason) => return reason,
        };
        // A client that has said nothing past its hello parks at once: its loop starts when
        // there is something to do.
        let parks_now = S::PARKS && kept.read_buf.is_empty();
        let mut turn = if parks_now {
            Turn::Quiet
        } else {
            Box::pin(active(hub, stream, conn, queued, events, &mut kept, None)).await
        };
        loop {
            if let Turn::Ended(reason) = turn {
                return reason;
            }
            let first = park(stream, conn, queued, &mut kept).await;
            turn = Box::pin(active(hub, stream, conn, queued, events, &mut kept, first)).await;
        }
    }
}

/// How a turn of [`active`] ended.
enum Turn {
    /// Nothing happened for [`QUIET`]: the connection parks.
    Quiet,
    Ended(CloseInfo),
}

/// How long a connection with nothing to do keeps its loop's state before it parks; it parks
/// after between one and two of these.
const QUIET: Duration = Duration::from_millis(500);

/// The connection's loop while data flows, from `first` (a frame taken from the queue while
/// parked) until it has been quiet for [`QUIET`] or ends; ending, it writes what is left.
async fn active<S: Transport>(
    hub: &Arc<Hub>,
    stream: &mut S,
    conn: &Connection,
    queued: &mut Queued,
    events: &EventSender,
    kept: &mut Kept,
    first: Option<Frame>,
) -> Turn {
    let mut driver = Driver::new(hub, conn, events, kept);
    if let Some(frame) = first {
        driver.take_queued(frame, queued);
    }
    let (mut reader, mut writer) = stream.halves();
    let stop = driver
        .run(
            &mut reader,
            &mut writer,
            queued,
            S::BUFFERS_WRITES,
            S::PARKS,
        )
        .await;
    driver.flush_counts();
    let Some((reason, last_frame)) = stop else {
        driver.park_buffers();
        return Turn::Quiet;
    };
    // NOTE: what was queued before the end is still written, but nothing queued after it is
    // taken: senders learn of the end at once. Otherwise a producer that keeps sending while
    // the server closes would grow the final flush without bound (backpressure gone the
    // moment the queue is drained) and hold `close(timeout)` past its timeout.
    conn.outbox.state().mark_closed(reason.clone());
    queued.close();
    driver.finish(&mut writer, queued, last_frame).await;
    Turn::Ended(reason)
}

/// Waits, holding little, until a quiet connection has something to do: bytes (or the end) to
/// read, a frame queued for it, a timer due, or a close; returns the frame if it took one.
///
/// NOTE: it looks at each source without acting on it (a timer's meaning, a read): the loop
/// does that on its next turn, the one place that knows how.
async fn park<S: Transport>(
    // `&mut` only so that the future is `Send` without `S: Sync`.
    stream: &mut S,
    conn: &Connection,
    queued: &mut Queued,
    kept: &mut Kept,
) -> Option<Frame> {
    std::future::poll_fn(move |cx| {
        if conn.control.wake.poll_fired(cx).is_ready() {
            return Poll::Ready(None);
        }
        if kept.queue_open {
            if let Poll::Ready(frame) = queued.poll_recv(cx) {
                kept.queue_open = frame.is_some();
                return Poll::Ready(frame);
            }
        }
        let due = stream.poll_read_ready(cx).is_ready()
            | kept.idle.poll_due(cx).is_ready()
            | kept.heartbeat.poll_due(cx).is_ready();
        if due {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    })
    .await
}

/// What a connection keeps for its whole life, parked or not (the rest of its loop's state
/// lives only while data flows: [`Driver`]).
struct Kept {
    raw: bool,
    codec: FrameCodec,
    idle: IdleTimer,
    heartbeat: Heartbeat,
    /// Files arriving on this connection, once the first one is offered.
    receiving: Option<Box<Receiving>>,
    /// What this connection holds for the application, against its budget and the server's.
    inbound: Inbound,
    /// Bytes read and not yet handled (the start of a frame), while parked.
    read_buf: BytesMut,
    /// Whether the outbound queue may still bring frames.
    queue_open: bool,
}

impl Kept {
    fn new(
        hub: &Arc<Hub>,
        conn: &Connection,
        Greeted {
            raw,
            buffered,
            idle,
        }: Greeted,
        fd: Option<RawFd>,
    ) -> Kept {
        Kept {
            raw,
            codec: FrameCodec::new(hub.config.max_frame),
            idle,
            heartbeat: Heartbeat::new(
                if raw { Pings::OFF } else { hub.config.pings },
                Arc::clone(conn.outbox.state()),
                fd,
            ),
            receiving: None,
            inbound: Inbound::new(hub.config.inbound_bytes, &hub.buffered),
            read_buf: buffered,
            queue_open: true,
        }
    }
}

/// Stop reading (from the socket and from the queue) while this much output waits to be
/// written: the client that does not read is pushed back on, and memory stays bounded.
const HIGH_WATER: usize = 256 * 1024;

/// One connection's loop, in one task: read, decode, answer, write. Native answers are encoded
/// straight into the write buffer, and the application's messages arrive through the queue, so
/// an echo costs no hand-off between tasks and a burst of frames costs one write.
struct Driver<'a> {
    hub: &'a Arc<Hub>,
    conn: &'a Connection,
    events: &'a EventSender,
    kept: &'a mut Kept,
    read_buf: BytesMut,
    write_buf: BytesMut,
    /// Set while a budget is spent: nothing more is read until it has room again.
    /// (Boxed: an idle connection's task carries a pointer, not the message.)
    stall: Option<Box<Stall>>,
    read_size: ReadSize,
    /// Messages counted since the last [`Driver::flush_counts`] (one atomic add per turn of
    /// the loop, not per message).
    messages_in: u64,
    messages_out: u64,
}

impl<'a> Driver<'a> {
    fn new(
        hub: &'a Arc<Hub>,
        conn: &'a Connection,
        events: &'a EventSender,
        kept: &'a mut Kept,
    ) -> Driver<'a> {
        Driver {
            hub,
            conn,
            events,
            read_buf: std::mem::take(&mut kept.read_buf),
            kept,
            write_buf: BytesMut::new(),
            stall: None,
            read_size: ReadSize::new(),
            messages_in: 0,
            messages_out: 0,
        }
    }

    /// Before parking: what was read and not handled stays with the connection; the buffers'
    /// spare room goes back (a quiet connection holds none).
    fn park_buffers(&mut self) {
        self.kept.read_buf = if self.read_buf.is_empty() {
            BytesMut::new()
        } else {
            std::mem::take(&mut self.read_buf)
        };
        self.kept
            .inbound
            .shrink_buffer(self.kept.read_buf.capacity());
    }

    /// Takes `frame` (and whatever else is queued) from the queue into the write buffer.
    fn take_queued(&mut self, frame: Frame, queued: &mut Queued) {
        encode(&frame, self.kept.raw, &mut self.write_buf);
        self.messages_out += u64::from(is_message(&frame))
            + drain_into(queued, self.kept.raw, &mut self.write_buf, HIGH_WATER);
    }

    fn flush_counts(&mut self) {
        let counters = &self.hub.counters;
        if self.messages_in > 0 {
            counters
                .messages_in
                .fetch_add(std::mem::take(&mut self.messages_in), Ordering::Relaxed);
        }
        if self.messages_out > 0 {
            counters
                .messages_out
                .fetch_add(std::mem::take(&mut self.messages_out), Ordering::Relaxed);
        }
    }

    /// Runs the loop until the connection ends (`Some`, with why) or, where it `parks`, until
    /// it has been quiet for [`QUIET`] (`None`).
    async fn run<R, W>(
        &mut self,
        reader: &mut R,
        writer: &mut W,
        queued: &mut Queued,
        buffers_writes: bool,
        parks: bool,
    ) -> Option<Ending>
    where
        R: AsyncRead + WaitReadable + Unpin,
        W: AsyncWrite + Unpin,
    {
        // NOTE: a TLS writer may take bytes into its own buffer without writing them all to
        // the socket (when it would block); they go out only on a later write or a flush. So
        // once our buffer is empty, the writer is flushed: without it the end of a large
        // answer could wait, unsent, until the connection next had something to say.
        let mut unflushed = false;
        // NOTE: quiet is told by counting the loop's turns between two ticks of one timer,
        // not by a clock read or a timer moved per message; and the timer is polled once per
        // tick, and otherwise only looked at (a timer's poll costs a tenth of a native echo's
        // turn).
        let mut quiet = parks.then(|| Box::pin(tokio::time::sleep(QUIET)));
        if let Some(quiet) = &mut quiet {
            wake_at(quiet).await;
        }
        let (mut turns, mut turns_at_tick) = (0u64, 0u64);
        loop {
            turns += 1;
            if let Some(ending) = self.handle_buffered().await {
                return Some(ending);
            }
            self.flush_counts();
            let writing = !self.write_buf.is_empty();
            let taking = self.write_buf.len() < HIGH_WATER;
            let room = if taking {
                self.read_size.make_room(&mut self.read_buf)
            } else {
                0
            };
            self.fit_read_buffer();
            let reading = taking && self.stall.is_none();
            // NOTE: a connection held back for its budget is neither idle nor silent: its
            // client is sending, and the application has yet to take what came.
            let stalled = self.stall.is_some();
            let queue_open = self.kept.queue_open;
            tokio::select! {
                biased;
                () = self.conn.control.wake.fired() => return Some(woken(self.hub, self.conn)),
                () = self.kept.idle.expired(), if self.kept.idle.armed() && !stalled => {
                    let info = self.kept.idle.reason();
                    let frame = Frame::close(CloseCode::IDLE_TIMEOUT, &info.reason);
                    return Some((info, Some(frame)));
                }
                room = room_for(self.stall.as_deref_mut()), if stalled => {
                    // Boxed: this rare path's future would otherwise be part of every
                    // connection's task, idle ones too.
                    if let Some(ending) = Box::pin(self.resume(room)).await {
                        return Some(ending);
                    }
                }
                beat = self.kept.heartbeat.beat(), if self.kept.heartbeat.armed() && !stalled => match beat {
                    Beat::Ping(ping) => encode(&ping, false, &mut self.write_buf),
                    Beat::Gone(info) => {
                        log::info!("connection {} from {}: {info}", self.conn.id, self.conn.peer);
                        let frame = Frame::close(CloseCode::PING_TIMEOUT, &info.reason);
                        return Some((info, Some(frame)));
                    }
                },
                written = write_or_flush(writer, &self.write_buf), if writing || unflushed => {
                    if let Some(ending) = self.wrote(written, &mut unflushed, buffers_writes) {
                        return Some(ending);
                    }
                }
                frame = queued.recv(), if queue_open && taking => match frame {
                    Some(frame) => {
                        self.take_queued(frame, queued);
                        // Written now rather than on the loop's next turn, which would poll
                        // every branch again first: an answer usually goes out in one write.
                        // A write that would block is polled again, with this task's waker, by
                        // that next turn.
                        if let Some(written) = write_or_flush(writer, &self.write_buf).now_or_never() {
                            if let Some(ending) = self.wrote(written, &mut unflushed, buffers_writes) {
                                return Some(ending);
                            }
                        }
                    }
                    None => self.kept.queue_open = false,
                },
                read = read_lazily(reader, &mut self.read_buf, self.read_size.get()), if reading => match read {
                    Ok(0) if self.read_buf.is_empty() => {
                        return Some((CloseInfo::new(None, "closed by the client"), None));
                    }
                    Ok(0) => {
                        let e = FrameError::Truncated(self.read_buf.len());
                        return Some((CloseInfo::new(None, format!("the client left: {e}")), None));
                    }
                    Ok(n) => {
                        self.kept.heartbeat.heard();
                        self.hub.counters.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                        self.read_size.adapt(n, room);
                    }
                    Err(e) => return Some((io_ending(self.hub, &e), None)),
                },
                // Looked at only while the loop waits for the client (a busy loop is not quiet).
                () = elapsed(quiet.as_ref()), if parks && !writing && !unflushed && !stalled => {
                    // Only this tick's own turn since the last one: nothing else happened.
                    if turns == turns_at_tick + 1 {
                        return None;
                    }
                    turns_at_tick = turns;
                    if let Some(quiet) = &mut quiet {
                        quiet.as_mut().reset(Instant::now() + QUIET);
                        wake_at(quiet).await;
                    }
                }
            }
        }
    }

    /// Takes the outcome of a write (or flush) of the write buffer; `Some` ends the connection.
    fn wrote(
        &mut self,
        written: io::Result<Option<usize>>,
        unflushed: &mut bool,
        buffers_writes: bool,
    ) -> Option<Ending> {
        match written {
            Ok(Some(0)) => Some((CloseInfo::new(None, "the client stopped taking data"), None)),
            Ok(Some(n)) => {
                self.write_buf.advance(n);
                self.hub
                    .counters
                    .bytes_out
                    .fetch_add(n as u64, Ordering::Relaxed);
                *unflushed = buffers_writes;
                None
            }
            Ok(None) => {
                *unflushed = false;
                None
            }
            Err(e) => Some((io_ending(self.hub, &e), None)),
        }
    }

    /// Handles every whole frame in the read buffer (in raw mode, everything buffered).
    ///
    /// NOTE: only whole frames count as activity for the idle timer, so a client that trickles
    /// the bytes of a frame it never finishes (slowloris) is dropped like an idle one.
    async fn handle_buffered(&mut self) -> Option<Ending> {
        #[cfg(feature = "fault-injection")]
        if self
            .read_buf
            .windows(crate::FAULT_PANIC.len())
            .any(|window| window == crate::FAULT_PANIC)
        {
            panic!("fault injection: a panic inside a connection's task");
        }
        let mut active = false;
        let buffered = self.read_buf.len();
        let ending = self.handle_frames(&mut active).await;
        if active {
            // A raw client's messages are what it sent: its bytes count (`raw_min_rate`).
            self.kept.idle.heard(buffered - self.read_buf.len());
        }
        ending
    }

    /// Handles the whole frames buffered; `active` is set when one of them was more than a
    /// heartbeat (pings and pongs keep a connection alive, not busy: `idle_timeout` still
    /// applies to a client that only answers pings).
    async fn handle_frames(&mut self, active: &mut bool) -> Option<Ending> {
        loop {
            if self.stall.is_some() {
                return None;
            }
            if self.hub.config.mode.answers_in_place() {
                match self.answer_in_place() {
                    Ok(InPlace::Answered(messages)) => {
                        *active = true;
                        self.messages_in += messages;
                        self.messages_out += messages;
                        continue;
                    }
                    Ok(InPlace::NeedMore) => return None,
                    Ok(InPlace::NotMine) => {}
                    Err(e) => return Some(self.protocol_error(e)),
                }
            }
            let frame = if self.kept.raw {
                if self.read_buf.is_empty() {
                    return None;
                }
                Frame::Data(take_chunk(&mut self.read_buf))
            } else {
                match self.kept.codec.decode(&mut self.read_buf) {
                    Ok(Some(frame)) => frame,
                    Ok(None) => return None,
                    Err(e) => return Some(self.protocol_error(e)),
                }
            };
            *active |= !matches!(frame, Frame::Ping(_) | Frame::Pong(_));
            if let Err(e) = self.allowed(&frame) {
                return Some(self.protocol_error(e));
            }
            if let Some(ended) = self.handle_frame(frame).await {
                return Some((ended, None));
            }
        }
    }

    /// The echo and ack answers to a message, written from the read buffer into the write
    /// buffer without decoding it into a frame first.
    ///
    /// NOTE: the hot path of the native modes: no allocation, no reference counting, one copy.
    fn answer_in_place(&mut self) -> Result<InPlace, FrameError> {
        let echo = self.hub.config.mode == Mode::Echo;
        if self.kept.raw {
            if self.read_buf.is_empty() {
                return Ok(InPlace::NeedMore);
            }
            if echo && self.write_buf.is_empty() {
                // The bytes read are the answer: the buffers change places, nothing is copied
                // (the emptied write buffer is read into next).
                std::mem::swap(&mut self.write_buf, &mut self.read_buf);
                return Ok(InPlace::Answered(1));
            }
            if echo {
                self.write_buf.extend_from_slice(&self.read_buf);
            } else {
                self.write_buf.extend_from_slice(&self.hub.config.ack_reply);
            }
            self.read_buf.clear();
            return Ok(InPlace::Answered(1));
        }
        if echo {
            let echoed = self.echo_whole_frames();
            if echoed > 0 {
                return Ok(InPlace::Answered(echoed));
            }
        }
        let Some((total, kind)) = self.kept.codec.peek(&mut self.read_buf)? else {
            return Ok(InPlace::NeedMore);
        };
        let request = is_request(kind, total);
        // An echo's messages were all answered above: a whole frame left here is not one.
        if echo || (kind != frame::kind::DATA && !request) {
            return Ok(InPlace::NotMine);
        }
        let body = self.hub.config.ack_reply.clone();
        let answer = if request {
            let id = &self.read_buf[LENGTH_PREFIX + 1..LENGTH_PREFIX + 5];
            let id = u32::from_be_bytes([id[0], id[1], id[2], id[3]]);
            Frame::Reply { id, body }
        } else {
            Frame::Data(body)
        };
        encode(&answer, false, &mut self.write_buf);
        self.read_buf.advance(total);
        Ok(InPlace::Answered(1))
    }

    /// Echoes the messages whole at the start of the read buffer (`mode="echo"`, framed) in one
    /// piece, and returns how many; 0 when the first frame is not a whole message, which is
    /// then handled one frame at a time.
    ///
    /// NOTE: with nothing else waiting to be written, the read buffer itself becomes the
    /// write buffer (the emptied write buffer is read into next, holding what followed the
    /// messages), so a large message is not copied on its way back; the minimal tokio server
    /// writes from its read buffer too.
    fn echo_whole_frames(&mut self) -> u64 {
        let (mut end, mut messages) = (0, 0);
        // A bad frame stops the run; the frame-at-a-time path meets it next and refuses it.
        while let Ok(Some((total, kind))) = self.kept.codec.check(&self.read_buf[end..]) {
            if is_request(kind, total) {
                self.read_buf[end + LENGTH_PREFIX] = frame::kind::REPLY;
            } else if kind != frame::kind::DATA {
                break;
            }
            end += total;
            messages += 1;
        }
        if messages == 0 {
            return 0;
        }
        let rest = self.read_buf.len() - end;
        if self.write_buf.is_empty() && rest <= end {
            self.write_buf.extend_from_slice(&self.read_buf[end..]);
            self.read_buf.truncate(end);
            std::mem::swap(&mut self.write_buf, &mut self.read_buf);
        } else {
            self.write_buf.extend_from_slice(&self.read_buf[..end]);
            self.read_buf.advance(end);
        }
        messages
    }

    fn protocol_error(&self, e: FrameError) -> Ending {
        let code = e.close_code();
        let reason = e.to_string();
        log::info!(
            "connection {} from {}: {reason}",
            self.conn.id,
            self.conn.peer
        );
        let frame = Frame::close(code, &reason);
        (CloseInfo::new(Some(code), reason), Some(frame))
    }

    /// Checks what the protocol version settled for this connection allows: topic frames
    /// from version 2 on, and a topic that follows the naming rules.
    fn allowed(&self, frame: &Frame) -> Result<(), FrameError> {
        if !frame.needs_topics() {
            return Ok(());
        }
        if !self.conn.outbox.state().speaks_topics() {
            return Err(FrameError::Malformed(format!(
                "topic frames need protocol version {}; this connection settled on version 1",
                frame::TOPICS_VERSION
            )));
        }
        if let Frame::Publish { topic, .. } = frame {
            crate::topic::check_name(topic)
                .map_err(|e| FrameError::Malformed(format!("a PUBLISH to a bad topic: {e}")))?;
        }
        Ok(())
    }

    /// The answer to a client's SUBSCRIBE or UNSUBSCRIBE.
    fn subscription(&self, id: u32, pattern: &str, subscribe: bool) -> Frame {
        let outcome = if subscribe {
            self.hub.rooms.join(self.conn, pattern)
        } else {
            crate::topic::check_pattern(pattern)
                .map(|()| self.hub.rooms.leave(self.conn.id, pattern))
                .map_err(crate::Error::from)
        };
        let (status, reason) = match outcome {
            Ok(true) => (TopicStatus::DONE, String::new()),
            Ok(false) if subscribe => (TopicStatus::UNCHANGED, "subscribed already".to_owned()),
            Ok(false) => (TopicStatus::UNCHANGED, "was not subscribed".to_owned()),
            Err(crate::Error::Topic(e)) => (TopicStatus::BAD_NAME, e.to_string()),
            Err(e) => (TopicStatus::REFUSED, e.to_string()),
        };
        Frame::TopicAck { id, status, reason }
    }

    /// The answer to a SUBSCRIBE that the application decides on: asked through an
    /// [`Event::Subscribe`], waited for (the connection's later frames wait with it, so that
    /// they keep their order), then carried out as [`Driver::subscription`] does.
    async fn ask_the_application(&mut self, id: u32, pattern: String) -> Frame {
        if let Err(e) = crate::topic::check_pattern(&pattern) {
            return Frame::TopicAck {
                id,
                status: TopicStatus::BAD_NAME,
                reason: e.to_string(),
            };
        }
        let (asking, answer) = Subscription::new(self.conn.clone(), pattern.clone());
        self.hub.emit(self.events, Event::Subscribe(asking)).await;
        let answer = tokio::select! {
            () = self.conn.control.wake.fired() => Err("the connection is closing".to_owned()),
            () = tokio::time::sleep(SUBSCRIPTION_ANSWER) => Err(format!(
                "the application did not answer the subscription within {SUBSCRIPTION_ANSWER:?}"
            )),
            answer = answer => answer.unwrap_or_else(|_| {
                Err("the application did not answer the subscription".to_owned())
            }),
        };
        match answer {
            Ok(()) => self.subscription(id, &pattern, true),
            Err(reason) => Frame::TopicAck {
                id,
                status: TopicStatus::REFUSED,
                reason,
            },
        }
    }

    /// Handles one frame from the client; returns why the connection ends, if it does.
    async fn handle_frame(&mut self, frame: Frame) -> Option<CloseInfo> {
        let message = match frame {
            Frame::Data(data) => Message::new(self.conn.clone(), data, None),
            Frame::Request { id, body } => Message::new(self.conn.clone(), body, Some(id)),
            Frame::Publish { topic, body } => {
                let mut message = Message::new(self.conn.clone(), body, None);
                message.topic = Some(topic);
                message
            }
            Frame::Subscribe { id, pattern } => {
                let ack = if self.hub.config.subscription_events {
                    // Boxed: rare, and its future would otherwise be part of every task.
                    Box::pin(self.ask_the_application(id, pattern)).await
                } else {
                    self.subscription(id, &pattern, true)
                };
                encode(&ack, self.kept.raw, &mut self.write_buf);
                return None;
            }
            Frame::Unsubscribe { id, pattern } => {
                encode(
                    &self.subscription(id, &pattern, false),
                    self.kept.raw,
                    &mut self.write_buf,
                );
                return None;
            }
            Frame::Ping(token) => {
                encode(&Frame::Pong(token), self.kept.raw, &mut self.write_buf);
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
            frame @ (Frame::FileAccept { .. } | Frame::FileResult { .. }) => {
                self.conn.outgoing.route(frame);
                return None;
            }
            frame @ (Frame::FileOffer { .. }
            | Frame::FileChunk { .. }
            | Frame::FileEnd { .. }
            | Frame::FileCancel { .. }) => {
                let (hub, conn, events) = (self.hub, self.conn, self.events);
                let receiving = self
                    .kept
                    .receiving
                    .get_or_insert_with(|| receiving(hub, conn, events));
                // A closing connection drops the chunk; the loop sees the wake next.
                tokio::select! {
                    biased;
                    () = conn.control.wake.fired() => {}
                    // Boxed: a file chunk's future is large, and would otherwise be part of
                    // every connection's task.
                    () = Box::pin(receiving.handle(frame)) => {}
                }
                return None;
            }
            Frame::Pong(token) => {
                self.kept.heartbeat.pong(token);
                return None;
            }
            Frame::Reply { .. } | Frame::FileRange { .. } | Frame::TopicAck { .. } => {
                log::debug!(
                    "connection {}: ignored a frame the server did not ask for",
                    self.conn.id
                );
                return None;
            }
        };
        self.messages_in += 1;
        match self.hub.config.mode {
            Mode::Events => {
                let mut message = message;
                let charge = self.kept.inbound.charge(message.data.len());
                // What follows the message in the read buffer keeps the buffer's share.
                self.release_read_room();
                match charge {
                    Ok(charge) => {
                        message.charge = charge;
                        if let Some(waiting) = self.hub.offer(self.events, Event::Message(message))
                        {
                            waiting.await;
                        }
                    }
                    Err(room) => self.stall = Some(Box::new(Stall::Message(message, room))),
                }
            }
            Mode::Echo => {
                let answer = message.answer(message.data.clone());
                encode(&answer, self.kept.raw, &mut self.write_buf);
                self.messages_out += 1;
            }
            Mode::Ack => {
                let answer = message.answer(self.hub.config.ack_reply.clone());
                encode(&answer, self.kept.raw, &mut self.write_buf);
                self.messages_out += 1;
            }
            // NOTE: the fan-out futures are boxed: inline, they would be part of every
            // connection's task, idle ones too (an allocation per relayed message is small
            // next to writing it to every member).
            Mode::Broadcast => match &message.topic {
                // A message to a topic goes to the rooms it matches; any other, to everyone.
                Some(topic) => {
                    // The name was checked when the frame arrived (`allowed`).
                    let exclude = [self.conn.id];
                    let _ =
                        Box::pin(self.hub.publish(Arc::clone(topic), message.data, &exclude)).await;
                }
                None => {
                    Box::pin(self.hub.broadcast(message.data, &[self.conn.id])).await;
                }
            },
        }
        None
    }

    /// Gives back the read buffer's room left over from a large frame: what follows it is
    /// moved to a buffer of its own, so that the large one (which the frame's message may
    /// still share) is no longer this connection's, and its share of `max_buffered` goes back.
    fn release_read_room(&mut self) {
        if self.read_buf.capacity() > FREE_READ_BUFFER && self.read_buf.len() < READ_CHUNK {
            let mut rest = BytesMut::with_capacity(READ_CHUNK);
            rest.extend_from_slice(&self.read_buf);
            self.read_buf = rest;
        }
        self.kept.inbound.shrink_buffer(self.read_buf.capacity());
    }

    /// Brings the read buffer's share of `max_buffered` in line with its size; when the server
    /// has no room for a frame's growth, stalls until it has.
    fn fit_read_buffer(&mut self) {
        if self.stall.is_some() {
            return;
        }
        if let Err(more) = self.kept.inbound.fit_buffer(self.read_buf.capacity()) {
            let room = self.kept.inbound.buffer_room(more, BUFFER_STALL_LIMIT);
            self.stall = Some(Box::new(Stall::Buffer(Box::pin(room))));
        }
    }

    /// A budget has room again: the held-back message goes to the application, or the read
    /// buffer has its share; reading resumes. Returns why the connection ends if the server
    /// found no room for its frame in time.
    async fn resume(&mut self, room: Room) -> Option<Ending> {
        let stall = self.stall.take().map(|stall| *stall);
        // What comes next is the client's, not silence: it was sending all along.
        self.kept.idle.touch();
        self.kept.heartbeat.heard();
        match (stall, room) {
            (Some(Stall::Message(mut message, _)), Room::Message(charge)) => {
                message.charge = charge;
                if let Some(waiting) = self.hub.offer(self.events, Event::Message(message)) {
                    waiting.await;
                }
            }
            (_, Room::Buffer(Ok(permit))) => {
                if let Some(permit) = permit {
                    self.kept.inbound.add_to_buffer(permit);
                }
            }
            (_, Room::Buffer(Err(waited))) => {
                let reason = format!(
                    "the server holds as much of its clients' data as it may (max_buffered) and \
                     found no room within {}s for more of a large message ({} bytes of it had \
                     arrived); send it again later",
                    waited.as_secs(),
                    self.read_buf.len()
                );
                // Given back now, not when the close is written: another frame waits for it.
                self.read_buf = BytesMut::new();
                self.kept.inbound.shrink_buffer(0);
                log::warn!(
                    "connection {} from {}: {reason}",
                    self.conn.id,
                    self.conn.peer
                );
                let frame = Frame::close(CloseCode::SERVER_BUSY, &reason);
                return Some((
                    CloseInfo::new(Some(CloseCode::SERVER_BUSY), reason),
                    Some(frame),
                ));
            }
            (_, Room::Message(_)) => {}
        }
        None
    }

    /// Writes what is buffered and queued, then `last` (for a framed client), then shuts the
    /// write side down; gives up after [`FLUSH_GRACE`] or on the hard stop.
    async fn finish<W: AsyncWrite + Unpin>(
        &mut self,
        writer: &mut W,
        queued: &mut Queued,
        last: Option<Frame>,
    ) {
        if dropping(self.hub, self.conn) {
            return;
        }
        self.hub.counters.messages_out.fetch_add(
            drain_into(queued, self.kept.raw, &mut self.write_buf, usize::MAX),
            Ordering::Relaxed,
        );
        if let Some(last) = last.filter(|_| !self.kept.raw) {
            encode(&last, false, &mut self.write_buf);
        }
        let flushed = tokio::select! {
            () = self.hub.abort.cancelled() => return,
            () = self.conn.control.wake.dropping() => return,
            flushed = tokio::time::timeout(FLUSH_GRACE, async {
                writer.write_all(&self.write_buf).await?;
                writer.shutdown().await
            }) => flushed,
        };
        match flushed {
            Ok(Ok(())) => {}
            Ok(Err(e)) => log::debug!("connection {}: final write failed: {e}", self.conn.id),
            Err(_) => log::debug!(
                "connection {}: the client is not reading; dropped its last {} bytes",
                self.conn.id,
                self.write_buf.len()
            ),
        }
    }
}

/// What a connection waits for before it reads again.
enum Stall {
    /// Its share of the budgets for a message it has read: the message waits here (not in the
    /// event queue) until the application has taken enough of what came before.
    Message(Message, ChargeWait),
    /// The server's budget for its read buffer to grow (a large frame in progress), for at most
    /// [`BUFFER_STALL_LIMIT`].
    Buffer(Pin<Box<dyn Future<Output = BufferRoom> + Send>>),
}

/// What a [`Stall`] waited for.
enum Room {
    Message(Charge),
    Buffer(BufferRoom),
}

/// How long a frame in progress may wait for room in `max_buffered` before its connection is
/// closed (code 1010), so that large frames arriving at once cannot hold each other's room
/// for ever: each holds what it has received and waits for more. The frame that has waited
/// longest of all may wait twice as long, and so gets the room the others give back.
const BUFFER_STALL_LIMIT: Duration = Duration::from_secs(10);

/// Waits for what `stall` needs (for ever without a stall).
async fn room_for(stall: Option<&mut Stall>) -> Room {
    match stall {
        Some(Stall::Message(_, room)) => Room::Message(room.await),
        Some(Stall::Buffer(room)) => Room::Buffer(room.await),
        None => std::future::pending().await,
    }
}

/// Writes what `buf` holds (`Some(bytes written)`), or with nothing to write flushes the writer
/// (`None`).
async fn write_or_flush<W: AsyncWrite + Unpin>(
    writer: &mut W,
    buf: &[u8],
) -> io::Result<Option<usize>> {
    if buf.is_empty() {
        writer.flush().await.map(|()| None)
    } else {
        writer.write(buf).await.map(Some)
    }
}

/// Up to this much of a raw chunk is copied out of the read buffer, which then keeps its memory;
/// a larger chunk is handed on as it is.
const COPIED_CHUNK: usize = 16 * 1024;

/// What a raw client sent, as one message, leaving `buf` empty.
///
/// NOTE: splitting the buffer hands its memory to the message, so the next read allocates a
/// new buffer (and frees the old one once the message is handled): for the small chunks most
/// raw clients send, copying them out is cheaper than that allocation per message.
fn take_chunk(buf: &mut BytesMut) -> bytes::Bytes {
    if buf.len() <= COPIED_CHUNK {
        let chunk = bytes::Bytes::copy_from_slice(buf);
        buf.clear();
        chunk
    } else {
        buf.split().freeze()
    }
}

/// Reads into `buf`; a buffer with no capacity (a connection that has been idle since its
/// hello) is allocated only once data is ready.
///
/// NOTE: this is what keeps an idle connection small: 10,000 of them would otherwise hold
/// 80 MiB of empty read buffers.
async fn read_lazily<R: AsyncRead + WaitReadable + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    size: usize,
) -> io::Result<usize> {
    if buf.capacity() == 0 {
        reader.wait_readable().await?;
        buf.reserve(size);
    }
    reader.read_buf(buf).await
}

/// Whether a whole frame of `total` bytes and type `kind` is a request: its type byte is
/// followed by a 4-byte correlation id.
fn is_request(kind: u8, total: usize) -> bool {
    kind == frame::kind::REQUEST && total >= LENGTH_PREFIX + 5
}

/// What [`Driver::answer_in_place`] did with the next buffered bytes.
enum InPlace {
    /// This many messages.
    Answered(u64),
    NeedMore,
    /// Not a message (a ping, a close, ...): decode and handle it the usual way.
    NotMine,
}

/// Fires when the client has sent nothing for `idle_timeout`. Arming a timer per frame would
/// cost a timer-wheel update per message; instead the timer is left alone and, when it fires,
/// re-armed from the last activity if there was any.
///
/// On a raw connection with `raw_min_rate`, messages count as activity only once they add up
/// to that many bytes per second of `idle_timeout`: a client that trickles a byte now and then
/// is dropped like an idle one.
///
/// NOTE: the clock exists only with a limit (by default an established connection has none),
/// and is boxed: without a limit the timer is one pointer of every connection's task.
struct IdleTimer(Option<Box<IdleClock>>);

/// An idle timer's state, with a limit.
struct IdleClock {
    limit: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
    last_seen: Instant,
    /// Bytes that must arrive since the last activity for more to count as activity (1: any).
    min_bytes: u64,
    /// Bytes that arrived since the last activity.
    since: u64,
}

impl IdleClock {
    /// Activity now.
    fn touch(&mut self) {
        self.last_seen = Instant::now();
        self.since = 0;
    }
}

impl IdleTimer {
    fn new(limit: Option<Duration>) -> IdleTimer {
        let now = Instant::now();
        IdleTimer(limit.map(|limit| {
            Box::new(IdleClock {
                limit,
                sleep: Box::pin(tokio::time::sleep_until(now + limit)),
                last_seen: now,
                min_bytes: 1,
                since: 0,
            })
        }))
    }

    /// From now on, messages count as activity once `rate` bytes per second of the limit
    /// arrived since the last activity (a raw connection's rule; 0: any message counts).
    fn count_bytes(&mut self, rate: u64) {
        if let Some(clock) = &mut self.0 {
            let bytes = (rate as f64 * clock.limit.as_secs_f64()).ceil();
            clock.min_bytes = (bytes as u64).max(1);
        }
    }

    /// Messages of `bytes` bytes in all arrived.
    fn heard(&mut self, bytes: usize) {
        if let Some(clock) = &mut self.0 {
            clock.since += bytes as u64;
            if clock.since >= clock.min_bytes {
                clock.touch();
            }
        }
    }

    fn armed(&self) -> bool {
        self.0.is_some()
    }

    fn touch(&mut self) {
        if let Some(clock) = &mut self.0 {
            clock.touch();
        }
    }

    /// Ready once the clock has run out, without looking at the activity since:
    /// [`IdleTimer::expired`] does, next. Never without a limit.
    fn poll_due(&mut self, cx: &mut std::task::Context<'_>) -> Poll<()> {
        match &mut self.0 {
            Some(clock) => clock.sleep.as_mut().poll(cx),
            None => Poll::Pending,
        }
    }

    /// Completes once the connection has been idle for the limit; never without one.
    async fn expired(&mut self) {
        let Some(clock) = &mut self.0 else {
            return std::future::pending().await;
        };
        loop {
            clock.sleep.as_mut().await;
            let deadline = clock.last_seen + clock.limit;
            if Instant::now() >= deadline {
                return;
            }
            clock.sleep.as_mut().reset(deadline);
        }
    }

    fn reason(&self) -> CloseInfo {
        let (limit, min_bytes) = self
            .0
            .as_ref()
            .map_or((Duration::ZERO, 1), |clock| (clock.limit, clock.min_bytes));
        CloseInfo::new(
            Some(CloseCode::IDLE_TIMEOUT),
            if min_bytes > 1 {
                format!("sent under {min_bytes} bytes in {limit:?} (idle_timeout, raw_min_rate)")
            } else {
                format!("idle for more than {limit:?} (idle_timeout)")
            },
        )
    }
}

async fn answer_hello<S: AsyncWrite + Unpin>(
    hub: &Hub,
    stream: &mut S,
    conn: &Connection,
    hello_bytes: &[u8; HELLO_LEN],
) -> Result<(), CloseInfo> {
    let max_frame = hub.config.max_frame;
    let (answer, refusal) = match Hello::decode(hello_bytes) {
        Ok(offered) => {
            let answer = Hello::answer(&offered, max_frame);
            let refusal = answer.agreed_version().is_none().then(|| {
                let reason = format!(
                    "the client speaks protocol versions {}..={}, this server speaks {}..={}",
                    offered.min_version,
                    offered.max_version,
                    frame::MIN_PROTOCOL_VERSION,
                    frame::PROTOCOL_VERSION
                );
                CloseInfo::new(Some(CloseCode::UNSUPPORTED_VERSION), reason)
            });
            if let Some(version) = answer.agreed_version() {
                conn.outbox.state().set_peer(version, offered.max_frame);
            }
            (answer, refusal)
        }
        // The magic matched, so this is a (broken) socketcomm peer: say why in a close frame.
        Err(e) => (
            Hello::refusal(max_frame),
            Some(CloseInfo::new(
                Some(CloseCode::PROTOCOL_ERROR),
                e.to_string(),
            )),
        ),
    };
    let mut out = BytesMut::from(&answer.encode()[..]);
    if let Some(refusal) = &refusal {
        let code = refusal.code.unwrap_or(CloseCode::PROTOCOL_ERROR);
        frame::encode_frame(&Frame::close(code, &refusal.reason), &mut out);
    }
    let written = stream.write_all(&out).await.map_err(|e| io_ending(hub, &e));
    match refusal {
        Some(refusal) => Err(refusal),
        None => written,
    }
}

/// Tells a client that arrived over `max_connections` (or `max_connections_per_ip`) that the
/// server is full, and why, in its own protocol (a refusing hello and a close frame, or a line
/// of text), then closes.
pub(super) async fn refuse_full(
    hub: Arc<Hub>,
    mut stream: TcpStream,
    peer: SocketAddr,
    reason: String,
) {
    hub.counters.refused_full.fetch_add(1, Ordering::Relaxed);
    log::info!("refused {peer}: {reason}");
    let mut first = BytesMut::with_capacity(HELLO_LEN);
    let framed = tokio::time::timeout(REFUSAL_WAIT, async {
        loop {
            match frame::sniff(&first) {
                Sniff::Framed => return true,
                Sniff::Raw => return false,
                Sniff::NeedMore => {}
            }
            match stream.read_buf(&mut first).await {
                Ok(0) | Err(_) => return false,
                Ok(_) => {}
            }
        }
    })
    .await
    .unwrap_or(false);
    let mut out = BytesMut::new();
    if framed {
        out.extend_from_slice(&Hello::refusal(hub.config.max_frame).encode());
        frame::encode_frame(&Frame::close(CloseCode::SERVER_FULL, &reason), &mut out);
    } else {
        out.extend_from_slice(reason.as_bytes());
        out.extend_from_slice(b"\n");
    }
    let _ = tokio::time::timeout(REFUSAL_WAIT, async {
        stream.write_all(&out).await?;
        stream.shutdown().await
    })
    .await;
}

/// Why the connection's wake token fired: the hard stop, the server's shutdown, or a close of
/// this connection alone; and the close frame to send, if any.
fn woken(hub: &Hub, conn: &Connection) -> Ending {
    if dropping(hub, conn) {
        return (conn.close_info().unwrap_or_else(shutting_down), None);
    }
    if hub.stop.is_cancelled() {
        let frame = Frame::close(CloseCode::GOING_AWAY, "server shutting down");
        return (shutting_down(), Some(frame));
    }
    let info = closed_by_server(conn);
    let frame = Frame::close(info.code.unwrap_or(CloseCode::NORMAL), &info.reason);
    (info, Some(frame))
}

/// Whether what is queued for `conn` is to be dropped, unwritten: its own close said so, or
/// the server's hard stop.
fn dropping(hub: &Hub, conn: &Connection) -> bool {
    conn.control.wake.is_dropping() || hub.abort.is_cancelled()
}

fn closed_by_server(conn: &Connection) -> CloseInfo {
    conn.close_info()
        .unwrap_or_else(|| CloseInfo::new(Some(CloseCode::NORMAL), "closed by the server"))
}

fn shutting_down() -> CloseInfo {
    CloseInfo::new(Some(CloseCode::GOING_AWAY), "server shutting down")
}

/// The ending of a connection whose socket failed, counted as a connection error.
fn io_ending(hub: &Hub, e: &io::Error) -> CloseInfo {
    hub.counters
        .connection_errors
        .fetch_add(1, Ordering::Relaxed);
    let reason = match e.kind() {
        io::ErrorKind::ConnectionReset => "the client reset the connection".to_owned(),
        io::ErrorKind::BrokenPipe => "the client went away while we were writing".to_owned(),
        _ => format!("connection failed: {e}"),
    };
    CloseInfo::new(None, reason)
}
