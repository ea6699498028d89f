//! What both sides share about one connection: [`Outbox`], the cloneable handle that queues
//! frames for it (bounded), and [`ConnState`], its peer's limit and why it ended; and the
//! client's halves: [`Inbound`] yields frames (or, in raw mode, chunks as they arrive) and
//! [`write_loop`] drains the queue. (A server connection reads and writes in one task of its
//! own, in `server/handler.rs`.)

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};

use bytes::BytesMut;
use futures_util::task::AtomicWaker;
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::codec::{BytesCodec, Decoder, FramedRead};
use tokio_util::sync::CancellationToken;

use crate::error::{CloseInfo, Error, FrameError, Result};
use crate::frame::{encode_chunk_header, encode_frame, FileRange, Frame, FrameCodec};
use crate::heartbeat::Latency;
use crate::sync::lock;

/// The writer gathers queued frames into one buffer up to this size before writing, so that many
/// small messages cost one system call.
const WRITE_BATCH: usize = 64 * 1024;

/// What a connection's handles share: the peer's frame limit and, once it ends, why.
#[derive(Debug)]
pub(crate) struct ConnState {
    peer_max_frame: AtomicU32,
    /// The protocol version the hellos settled on; 0 until then, and for a raw connection.
    version: AtomicU8,
    /// Set when the writer sends file ranges itself (`sendfile`), so file data need not be
    /// copied into frames.
    sends_files: AtomicBool,
    /// The round trip of the last ping this side sent and the peer answered.
    latency: Latency,
    /// Bytes the outbound queue may hold (see [`Outbox`]), and what is left of them.
    budget: usize,
    room: tokio::sync::Semaphore,
    closed: OnceLock<CloseInfo>,
}

impl ConnState {
    /// The state of a connection whose outbound queue may hold `budget` bytes.
    pub(crate) fn new(peer_max_frame: u32, budget: usize) -> Arc<ConnState> {
        // Within what a semaphore counts, and never zero (a frame always fits an empty queue).
        let budget = budget.clamp(1, u32::MAX as usize);
        Arc::new(ConnState {
            peer_max_frame: AtomicU32::new(peer_max_frame),
            version: AtomicU8::new(0),
            sends_files: AtomicBool::new(false),
            latency: Latency::default(),
            budget,
            room: tokio::sync::Semaphore::new(budget),
            closed: OnceLock::new(),
        })
    }

    /// What `frame` takes of the byte budget: its size, or the whole budget for a frame larger
    /// than that (which then waits for an empty queue, and has it to itself).
    fn cost(&self, frame: &Frame) -> u32 {
        // The budget is at most u32::MAX (see `new`).
        frame.encoded_len().min(self.budget) as u32
    }

    /// Gives back the budget of frames taken from the queue.
    fn release(&self, cost: u64) {
        if cost > 0 {
            self.room.add_permits(cost as usize);
        }
    }

    /// Records what the hellos settled: the protocol `version` and the peer's frame limit
    /// (which also marks the connection as framed).
    pub(crate) fn set_peer(&self, version: u8, max_frame: u32) {
        self.peer_max_frame.store(max_frame, Ordering::Relaxed);
        self.version.store(version, Ordering::Release);
    }

    pub(crate) fn is_framed(&self) -> bool {
        self.version.load(Ordering::Acquire) != 0
    }

    /// Whether the peer speaks topic frames (protocol version 2 on).
    pub(crate) fn speaks_topics(&self) -> bool {
        self.version.load(Ordering::Acquire) >= crate::frame::TOPICS_VERSION
    }

    pub(crate) fn set_sends_files(&self, sends_files: bool) {
        self.sends_files.store(sends_files, Ordering::Relaxed);
    }

    pub(crate) fn sends_files(&self) -> bool {
        self.sends_files.load(Ordering::Relaxed)
    }

    pub(crate) fn latency(&self) -> &Latency {
        &self.latency
    }

    /// Records why the connection ended; the first reason wins.
    pub(crate) fn mark_closed(&self, info: CloseInfo) {
        let _ = self.closed.set(info);
    }

    pub(crate) fn close_info(&self) -> Option<&CloseInfo> {
        self.closed.get()
    }

    /// The error every operation on the ended connection returns.
    pub(crate) fn closed_error(&self) -> Error {
        Error::Closed(
            self.closed
                .get()
                .cloned()
                .unwrap_or_else(|| CloseInfo::new(None, "the connection is closed")),
        )
    }
}

/// Wakes the tasks that wait for a queue to have something to take (or to end), without taking
/// it themselves: what lets the asyncio API wait and then take on the event loop's thread.
///
/// NOTE: producers call [`Readiness::notify`] once per item, on the hot path. `Notify` takes a
/// lock on every `notify_waiters`, so a count of waiters skips it when nobody waits (the blocking
/// API never does).
#[derive(Debug, Default)]
pub(crate) struct Readiness {
    notify: Notify,
    waiting: AtomicUsize,
}

impl Readiness {
    /// Wakes every current waiter, if there is one.
    pub(crate) fn notify(&self) {
        // SeqCst pairs with the increment in `wait_until`: either this load sees the waiter, or
        // the waiter's check of `ready` sees what the producer did before calling this.
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.notify.notify_waiters();
        }
    }

    /// Completes once `ready()` holds, checking it after each notification.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub(crate) async fn wait_until(&self, ready: impl Fn() -> bool) {
        struct Leave<'a>(&'a AtomicUsize);
        impl Drop for Leave<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _leave = Leave(&self.waiting);
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Registered before the check, so an item that arrives in between still wakes us.
            notified.as_mut().enable();
            if ready() {
                return;
            }
            notified.await;
        }
    }
}

/// A cloneable handle that queues frames for one connection's writer.
#[derive(Debug, Clone)]
pub(crate) struct Outbox {
    queue: Arc<LazyQueue>,
    state: Arc<ConnState>,
}

/// A connection's outbound queue, made when the first frame is queued.
///
/// NOTE: a tokio channel allocates its first block of 32 places when it is made: 2 KiB of
/// frames for each connection, a third of what an idle one costs, for a queue that a
/// connection served natively (an echo) or one that only ever answers in place never uses.
#[derive(Debug)]
struct LazyQueue {
    capacity: usize,
    sender: OnceLock<mpsc::Sender<Frame>>,
    /// The receiving end, made with the sender, until the writer takes it.
    receiver: Mutex<Option<mpsc::Receiver<Frame>>>,
    /// Wakes the writer waiting for frames once the queue exists.
    ///
    /// NOTE: not a `Notify`: the writer of a connection that never queues (a native echo)
    /// waits on this on every turn of its loop, and each `Notified` takes the notifier's lock
    /// twice (to enrol and to leave), which was a tenth of such a connection's user-space
    /// instructions; registering here is one atomic operation.
    made: AtomicWaker,
}

impl LazyQueue {
    fn sender(&self) -> &mpsc::Sender<Frame> {
        let mut made = false;
        let sender = self.sender.get_or_init(|| {
            let (sender, receiver) = mpsc::channel(self.capacity);
            *lock(&self.receiver) = Some(receiver);
            made = true;
            sender
        });
        // NOTE: only once the sender is in place: a writer woken from inside `get_or_init`
        // would find no queue yet, and wait again for a wake-up that was already spent.
        if made {
            self.made.wake();
        }
        sender
    }

    /// The receiving end, once the queue exists.
    fn take_receiver(&self) -> Option<mpsc::Receiver<Frame>> {
        self.sender.get()?;
        lock(&self.receiver).take()
    }
}

impl Outbox {
    pub(crate) fn state(&self) -> &Arc<ConnState> {
        &self.state
    }

    /// Queues `frame`, waiting while the queue is full (backpressure).
    ///
    /// # Errors
    /// [`Error::FrameTooLarge`] when the peer announced a smaller `max_frame` (nothing is queued);
    /// [`Error::Closed`] when the connection has ended.
    ///
    /// # Cancel safety
    /// Cancel safe: a cancelled send queued either the whole frame or nothing.
    pub(crate) async fn send(&self, frame: Frame) -> Result<()> {
        self.send_or_return(frame).await.map_err(|(e, _)| e)
    }

    /// As [`Outbox::send`], handing back the frame that an ended connection did not take, so
    /// that the caller can send it on a new connection without having kept a copy.
    ///
    /// # Errors
    /// As [`Outbox::send`], with the frame when it was not queued for being too large or the
    /// connection's end.
    ///
    /// # Cancel safety
    /// As [`Outbox::send`].
    pub(crate) async fn send_or_return(&self, frame: Frame) -> Result<(), (Error, Option<Frame>)> {
        if let Err(e) = self.check_size(&frame) {
            return Err((e, Some(frame)));
        }
        let cost = self.state.cost(&frame);
        // NOTE: room in bytes is taken first, then a place in the queue: the queue is bounded
        // in messages and in bytes, whichever fills first.
        let Ok(room) = self.state.room.acquire_many(cost).await else {
            return Err((self.state.closed_error(), Some(frame)));
        };
        room.forget(); // given back by the writer (`Queued`)
        self.queue.sender().send(frame).await.map_err(|unsent| {
            self.state.release(u64::from(cost));
            (self.state.closed_error(), Some(unsent.0))
        })
    }

    /// Queues `frame` from a blocking thread of the runtime (a file transfer's), blocking while
    /// the queue is full.
    ///
    /// # Errors
    /// As [`Outbox::send`].
    pub(crate) fn blocking_send(&self, frame: Frame) -> Result<()> {
        tokio::runtime::Handle::current().block_on(self.send(frame))
    }

    /// The largest frame the peer accepts.
    pub(crate) fn peer_max_frame(&self) -> u32 {
        self.state.peer_max_frame.load(Ordering::Relaxed)
    }

    /// Queues `frame` if there is room: `Ok(false)` when the queue is full.
    ///
    /// # Errors
    /// As [`Outbox::send`].
    pub(crate) fn try_send(&self, frame: Frame) -> Result<bool> {
        Ok(match self.try_reserve(frame)? {
            Reservation::Placed(reserved) => {
                reserved.send();
                true
            }
            Reservation::Full(_) => false,
        })
    }

    /// Takes a place in the queue for `frame` if there is room, without queueing it yet:
    /// [`Reserved::send`] does, and no one waits for it in between. When the queue is full
    /// the frame comes back as it was, for a send that waits ([`Outbox::send`]).
    ///
    /// # Errors
    /// As [`Outbox::send`].
    pub(crate) fn try_reserve(&self, frame: Frame) -> Result<Reservation> {
        self.check_size(&frame)?;
        let cost = self.state.cost(&frame);
        match self.state.room.try_acquire_many(cost) {
            Ok(room) => room.forget(),
            Err(tokio::sync::TryAcquireError::NoPermits) => return Ok(Reservation::Full(frame)),
            Err(tokio::sync::TryAcquireError::Closed) => return Err(self.state.closed_error()),
        }
        match self.queue.sender().clone().try_reserve_owned() {
            Ok(permit) => Ok(Reservation::Placed(Reserved {
                place: Some((permit, frame)),
                cost,
                state: Arc::clone(&self.state),
            })),
            Err(full_or_closed) => {
                self.state.release(u64::from(cost));
                match full_or_closed {
                    mpsc::error::TrySendError::Full(_) => Ok(Reservation::Full(frame)),
                    mpsc::error::TrySendError::Closed(_) => Err(self.state.closed_error()),
                }
            }
        }
    }

    fn check_size(&self, frame: &Frame) -> Result<()> {
        let max = self.peer_max_frame();
        let len = frame.encoded_len();
        if len > max as usize {
            return Err(Error::outgoing_too_large(len, max));
        }
        Ok(())
    }
}

/// What [`Outbox::try_reserve`] got.
#[derive(Debug)]
pub enum Reservation {
    /// The frame has its place in the queue.
    Placed(Reserved),
    /// The queue is full: the frame back, untouched, so that the caller need not have kept a
    /// copy for the send that waits for room.
    Full(Frame),
}

/// A frame with its place in a connection's queue taken: queueing it cannot wait or fail (a
/// connection that ends first drops it).
///
/// NOTE: this is what lets a thread answer now and wake the connection's task later, from
/// inside the runtime the task runs on, where a wake-up costs no system call.
#[derive(Debug)]
pub struct Reserved {
    /// The place in the queue and the frame for it, until sent.
    place: Option<(mpsc::OwnedPermit<Frame>, Frame)>,
    /// Its share of the byte budget, taken already: given back if it is never sent.
    cost: u32,
    state: Arc<ConnState>,
}

impl Reserved {
    pub fn send(mut self) {
        if let Some((permit, frame)) = self.place.take() {
            drop(permit.send(frame));
        }
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        if self.place.is_some() {
            self.state.release(u64::from(self.cost));
        }
    }
}

/// The writer's end of a connection's outbound queue: each frame taken gives its bytes back to
/// the budget ([`Outbox`] takes them).
#[derive(Debug)]
pub(crate) struct Queued {
    /// The queue's receiving end, once the first frame made it (see [`LazyQueue`]).
    queue: Option<mpsc::Receiver<Frame>>,
    lazy: Arc<LazyQueue>,
    state: Arc<ConnState>,
    /// The budget of frames taken by [`Queued::take_batched`], not yet given back.
    taken: u64,
}

/// A connection's outbound queue: `capacity` frames and `state`'s budget of bytes.
pub(crate) fn outbound(capacity: usize, state: Arc<ConnState>) -> (Outbox, Queued) {
    let lazy = Arc::new(LazyQueue {
        capacity,
        sender: OnceLock::new(),
        receiver: Mutex::new(None),
        made: AtomicWaker::new(),
    });
    let outbox = Outbox {
        queue: Arc::clone(&lazy),
        state: Arc::clone(&state),
    };
    let queued = Queued {
        queue: None,
        lazy,
        state,
        taken: 0,
    };
    (outbox, queued)
}

impl Drop for Queued {
    fn drop(&mut self) {
        // Senders waiting for bytes that nobody will give back learn of the end at once.
        self.state.room.close();
    }
}

impl Queued {
    /// The receiving end, if the queue exists yet.
    fn receiver(&mut self) -> Option<&mut mpsc::Receiver<Frame>> {
        if self.queue.is_none() {
            self.queue = self.lazy.take_receiver();
        }
        self.queue.as_mut()
    }

    /// The next frame; `None` once every sender is gone and the queue is empty.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub(crate) async fn recv(&mut self) -> Option<Frame> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// [`Queued::recv`] as a poll: the next frame, or this task woken when one is queued.
    #[inline]
    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Frame>> {
        if self.receiver().is_none() {
            // Registered before looking again: a queue made in between wakes this task.
            self.lazy.made.register(cx.waker());
            if self.receiver().is_none() {
                return Poll::Pending;
            }
        }
        let Some(queue) = self.queue.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = std::task::ready!(queue.poll_recv(cx));
        if let Some(frame) = &frame {
            self.state.release(u64::from(self.state.cost(frame)));
        }
        Poll::Ready(frame)
    }

    /// The next frame if one is queued.
    pub(crate) fn try_recv(&mut self) -> Option<Frame> {
        let frame = self.receiver()?.try_recv().ok()?;
        self.state.release(u64::from(self.state.cost(&frame)));
        Some(frame)
    }

    /// The next frame if one is queued; its share of the budget is given back with the rest of
    /// the batch by [`Queued::give_back`].
    ///
    /// NOTE: once per batch, because each give-back takes the semaphore's lock: per frame it
    /// was a measurable part of `Client.send`'s cost.
    fn take_batched(&mut self) -> Option<Frame> {
        let frame = self.receiver()?.try_recv().ok()?;
        self.taken += u64::from(self.state.cost(&frame));
        Some(frame)
    }

    /// Gives back the budget of the frames [`Queued::take_batched`] took.
    fn give_back(&mut self) {
        self.state.release(std::mem::take(&mut self.taken));
    }

    /// Accepts no more frames (what is queued can still be taken), and ends the byte budget's
    /// waits too.
    pub(crate) fn close(&mut self) {
        // A queue not made yet is made to be closed: a send after the end then fails as it
        // would have on a queue made at the start.
        self.lazy.sender();
        if let Some(queue) = self.receiver() {
            queue.close();
        }
        self.state.room.close();
    }
}

/// The reading half of a connection, framed or raw.
pub(crate) struct Inbound<R> {
    codec: InboundCodec<R>,
    /// Bytes read before the mode was known are still buffered: decode them before reading, as
    /// `FramedRead` would otherwise wait for the socket first (and a client waiting for our
    /// answer would never send more).
    primed: bool,
}

enum InboundCodec<R> {
    Framed(FramedRead<R, FrameCodec>),
    Raw(FramedRead<R, BytesCodec>),
}

impl<R: AsyncRead + Unpin> Inbound<R> {
    /// Wraps `reader`; `already_read` holds bytes read before the mode was known (they are
    /// copied, so that the read buffer keeps `FramedRead`'s own capacity).
    pub(crate) fn new(reader: R, raw: bool, max_frame: u32, already_read: BytesMut) -> Inbound<R> {
        let primed = !already_read.is_empty();
        let codec = if raw {
            let mut framed = FramedRead::new(reader, BytesCodec::new());
            framed.read_buffer_mut().extend_from_slice(&already_read);
            InboundCodec::Raw(framed)
        } else {
            let mut framed = FramedRead::new(reader, FrameCodec::new(max_frame));
            framed.read_buffer_mut().extend_from_slice(&already_read);
            InboundCodec::Framed(framed)
        };
        Inbound { codec, primed }
    }

    /// The next frame; a raw chunk comes as a [`Frame::Data`]. `None` at the end of the stream.
    ///
    /// # Cancel safety
    /// Cancel safe: bytes read stay buffered for the next call.
    pub(crate) async fn next(&mut self) -> Option<Result<Frame, FrameError>> {
        match &mut self.codec {
            InboundCodec::Framed(framed) => {
                if self.primed {
                    match decode_buffered(framed) {
                        Ok(Some(frame)) => return Some(Ok(frame)),
                        Ok(None) => self.primed = false,
                        Err(error) => return Some(Err(error)),
                    }
                }
                framed.next().await
            }
            InboundCodec::Raw(framed) => {
                if self.primed {
                    self.primed = false;
                    let chunk = framed.read_buffer_mut().split();
                    return Some(Ok(Frame::Data(chunk.freeze())));
                }
                let chunk = framed.next().await?;
                Some(
                    chunk
                        .map(|chunk| Frame::Data(chunk.freeze()))
                        .map_err(FrameError::from),
                )
            }
        }
    }
}

fn decode_buffered<R>(framed: &mut FramedRead<R, FrameCodec>) -> Result<Option<Frame>, FrameError> {
    let mut codec = framed.decoder().clone();
    codec.decode(framed.read_buffer_mut())
}

/// How the writer is told to finish: with an optional last frame (a close frame, usually).
pub(crate) type Finish = oneshot::Sender<Option<Frame>>;

/// Writes queued frames until told to finish, then writes what is still queued, the last frame,
/// and shuts the write half down. `abort` stops it at once, whatever is pending.
///
/// # Errors
/// The first write error; the connection is unusable after it.
pub(crate) async fn write_loop<W: SendFile>(
    mut io: W,
    mut queue: Queued,
    mut finish: oneshot::Receiver<Option<Frame>>,
    raw: bool,
    abort: CancellationToken,
) -> io::Result<()> {
    let mut buf = BytesMut::new();
    let mut queue_open = true;
    loop {
        tokio::select! {
            biased;
            () = abort.cancelled() => return Ok(()),
            frame = queue.recv(), if queue_open => match frame {
                Some(frame) => {
                    write_frames(&mut io, frame, &mut queue, raw, &mut buf, WRITE_BATCH, &abort)
                        .await?;
                }
                // Every sender is gone; only `finish` (or `abort`) can end the loop now.
                None => queue_open = false,
            },
            last = &mut finish => {
                if let Some(frame) = queue.try_recv() {
                    write_frames(&mut io, frame, &mut queue, raw, &mut buf, usize::MAX, &abort)
                        .await?;
                }
                if let Ok(Some(frame)) = last {
                    encode(&frame, raw, &mut buf);
                }
                write_buffer(&mut io, &mut buf, &abort).await?;
                return io.shutdown().await;
            }
        }
    }
}

/// Writes `first` and what else is queued, gathered into `buf` up to `limit` bytes; file ranges
/// go straight from the file when the transport can.
async fn write_frames<W: SendFile>(
    io: &mut W,
    first: Frame,
    queue: &mut Queued,
    raw: bool,
    buf: &mut BytesMut,
    limit: usize,
    abort: &CancellationToken,
) -> io::Result<()> {
    let mut next = Some(first);
    while let Some(frame) = next.take() {
        match &frame {
            Frame::FileRange { id, range } if io.sends_files() => {
                encode_chunk_header(*id, range.len as usize, buf);
                tokio::select! {
                    () = abort.cancelled() => return Ok(()),
                    sent = io.send_range(buf, range) => sent?,
                }
                buf.clear();
            }
            _ => encode(&frame, raw, buf),
        }
        if buf.len() < limit {
            next = queue.take_batched();
        }
    }
    queue.give_back();
    write_buffer(io, buf, abort).await
}

/// A client's connected stream, split into halves that two tasks own.
pub(crate) trait IntoHalves: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    type Reader: AsyncRead + Unpin + Send + 'static;
    type Writer: SendFile + Send + 'static;
    fn into_halves(self) -> (Self::Reader, Self::Writer);
}

impl IntoHalves for tokio::net::TcpStream {
    type Reader = tokio::net::tcp::OwnedReadHalf;
    type Writer = tokio::net::tcp::OwnedWriteHalf;

    fn into_halves(self) -> (Self::Reader, Self::Writer) {
        self.into_split()
    }
}

type ClientTlsStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

impl IntoHalves for ClientTlsStream {
    type Reader = tokio::io::ReadHalf<ClientTlsStream>;
    type Writer = tokio::io::WriteHalf<ClientTlsStream>;

    fn into_halves(self) -> (Self::Reader, Self::Writer) {
        tokio::io::split(self)
    }
}

/// A read half that can say when data is ready without reading it, so that an idle connection
/// needs no read buffer.
pub(crate) trait WaitReadable {
    /// Completes when a read would find data or the end (at once where that cannot be known).
    fn wait_readable(&self) -> impl std::future::Future<Output = io::Result<()>> + Send + '_;
}

impl WaitReadable for tokio::net::tcp::ReadHalf<'_> {
    fn wait_readable(&self) -> impl std::future::Future<Output = io::Result<()>> + Send + '_ {
        self.readable()
    }
}

impl<T> WaitReadable for tokio::io::ReadHalf<T> {
    fn wait_readable(&self) -> impl std::future::Future<Output = io::Result<()>> + Send + '_ {
        // TLS keeps buffers of its own per connection anyway.
        std::future::ready(Ok(()))
    }
}

/// A server's connected stream, whose halves one task drives at once.
pub(crate) trait Transport: AsyncRead + AsyncWrite + Unpin + Send {
    type Reader<'a>: AsyncRead + WaitReadable + Unpin + Send
    where
        Self: 'a;
    type Writer<'a>: AsyncWrite + Unpin + Send
    where
        Self: 'a;
    /// Whether a write may leave bytes in a buffer of the writer's own (TLS's records), which
    /// then need a flush; a TCP socket's writes go straight to the kernel.
    const BUFFERS_WRITES: bool;
    /// Whether [`Transport::poll_read_ready`] tells when data is ready, so that a quiet
    /// connection can wait on it alone (TLS may hold decrypted bytes of its own).
    const PARKS: bool;
    fn halves(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>);
    /// Ready when a read would find data or the end; only where [`Transport::PARKS`].
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// The TCP socket underneath, for asking the kernel about it (see `heartbeat.rs`).
    fn tcp(&self) -> &tokio::net::TcpStream;
}

impl Transport for tokio::net::TcpStream {
    type Reader<'a> = tokio::net::tcp::ReadHalf<'a>;
    type Writer<'a> = tokio::net::tcp::WriteHalf<'a>;
    const BUFFERS_WRITES: bool = false;
    const PARKS: bool = true;

    fn halves(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>) {
        // NOTE: borrowed halves of a TCP stream cost nothing; `tokio::io::split` takes a lock on
        // every read and write, which only TLS (one state for both directions) needs.
        self.split()
    }

    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        tokio::net::TcpStream::poll_read_ready(self, cx)
    }

    fn tcp(&self) -> &tokio::net::TcpStream {
        self
    }
}

pub(crate) type ServerTlsStream = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

impl Transport for ServerTlsStream {
    type Reader<'a> = tokio::io::ReadHalf<&'a mut ServerTlsStream>;
    type Writer<'a> = tokio::io::WriteHalf<&'a mut ServerTlsStream>;
    const BUFFERS_WRITES: bool = true;
    const PARKS: bool = false;

    fn halves(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>) {
        tokio::io::split(self)
    }

    fn poll_read_ready(&self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Never parked (see `PARKS`): rustls may hold decrypted bytes the socket does not show.
        Poll::Ready(Ok(()))
    }

    fn tcp(&self) -> &tokio::net::TcpStream {
        self.get_ref().0
    }
}

/// A connection's write half, which may write file ranges itself (zero-copy `sendfile`).
pub(crate) trait SendFile: AsyncWrite + Unpin {
    /// Whether [`SendFile::send_range`] works on this transport.
    fn sends_files(&self) -> bool {
        false
    }

    /// Writes `head` (buffered frames and the chunk's header), then the bytes of `range` from
    /// the file, to the connection.
    fn send_range<'a>(
        &'a mut self,
        head: &'a [u8],
        range: &'a FileRange,
    ) -> impl std::future::Future<Output = io::Result<()>> + Send + 'a {
        let _ = (head, range);
        std::future::ready(Err(io::Error::from(io::ErrorKind::Unsupported)))
    }
}

// TLS encrypts in user space: file data goes through the connection's buffer.
impl SendFile for tokio::io::WriteHalf<ClientTlsStream> {}

impl SendFile for tokio::net::tcp::OwnedWriteHalf {
    fn sends_files(&self) -> bool {
        cfg!(target_os = "linux")
    }

    #[cfg(target_os = "linux")]
    async fn send_range(&mut self, mut head: &[u8], range: &FileRange) -> io::Result<()> {
        let stream: &tokio::net::TcpStream = self.as_ref();
        // NOTE: MSG_MORE holds the small header back until the file's bytes follow, so that
        // header and data share segments instead of the header going out alone (NODELAY).
        while !head.is_empty() {
            stream.writable().await?;
            let sent = stream.try_io(tokio::io::Interest::WRITABLE, || {
                rustix::net::send(stream, head, rustix::net::SendFlags::MORE)
                    .map_err(io::Error::from)
            });
            match sent {
                Ok(n) => head = &head[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        let mut offset = range.offset;
        let end = range.offset + u64::from(range.len);
        while offset < end {
            stream.writable().await?;
            let sent = stream.try_io(tokio::io::Interest::WRITABLE, || {
                let left = (end - offset) as usize;
                rustix::fs::sendfile(stream, &*range.file, Some(&mut offset), left)
                    .map_err(io::Error::from)
            });
            match sent {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the file shrank while it was being sent",
                    ))
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

async fn write_buffer<W: AsyncWrite + Unpin>(
    io: &mut W,
    buf: &mut BytesMut,
    abort: &CancellationToken,
) -> io::Result<()> {
    if buf.is_empty() {
        return Ok(());
    }
    // Flushed too: a TLS writer may keep part of what it took in a buffer of its own until then
    // (see the server's connection loop), and nothing else may follow to push it out.
    tokio::select! {
        () = abort.cancelled() => Ok(()),
        written = async {
            io.write_all(buf).await?;
            io.flush().await
        } => {
            buf.clear();
            written
        }
    }
}

/// Encodes queued frames into `buf` until the queue is empty or `buf` holds `limit` bytes;
/// returns how many of them were messages (see [`is_message`]).
pub(crate) fn drain_into(queue: &mut Queued, raw: bool, buf: &mut BytesMut, limit: usize) -> u64 {
    let mut messages = 0;
    while buf.len() < limit {
        let Some(frame) = queue.take_batched() else {
            break;
        };
        encode(&frame, raw, buf);
        messages += u64::from(is_message(&frame));
    }
    queue.give_back();
    messages
}

/// Whether a frame carries an application message (what `messages_in`/`messages_out` count),
/// rather than a control or file-transfer frame.
pub(crate) fn is_message(frame: &Frame) -> bool {
    matches!(
        frame,
        Frame::Data(_) | Frame::Request { .. } | Frame::Reply { .. }
    )
}

/// Appends `frame` as it goes on the wire: framed, or in raw mode the bare payload (control
/// and file frames have no raw form and are left out).
pub(crate) fn encode(frame: &Frame, raw: bool, buf: &mut BytesMut) {
    if !raw {
        encode_frame(frame, buf);
        return;
    }
    match frame {
        Frame::Data(body)
        | Frame::Request { body, .. }
        | Frame::Reply { body, .. }
        | Frame::Publish { body, .. } => {
            buf.extend_from_slice(body);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;

    fn queue() -> (Outbox, Queued) {
        outbound(8, ConnState::new(1 << 20, 1 << 20))
    }

    #[test]
    fn a_queue_is_made_by_its_first_frame() {
        let (outbox, mut queued) = queue();
        assert!(
            outbox.queue.sender.get().is_none(),
            "no queue before a frame"
        );
        assert!(queued.try_recv().is_none());
        assert!(outbox
            .try_send(Frame::Data(Bytes::from_static(b"first")))
            .unwrap());
        assert_eq!(
            queued.try_recv(),
            Some(Frame::Data(Bytes::from_static(b"first")))
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_writer_waiting_before_the_queue_exists_gets_its_first_frame() {
        for _ in 0..2000 {
            let (outbox, mut queued) = queue();
            let writer = tokio::spawn(async move { queued.recv().await });
            tokio::task::yield_now().await;
            outbox
                .send(Frame::Data(Bytes::from_static(b"x")))
                .await
                .unwrap();
            let frame = tokio::time::timeout(Duration::from_secs(5), writer)
                .await
                .expect("woken by the first frame")
                .unwrap();
            assert_eq!(frame, Some(Frame::Data(Bytes::from_static(b"x"))));
        }
    }

    #[test]
    fn a_queue_closed_before_it_was_made_refuses_frames() {
        let (outbox, mut queued) = queue();
        queued.close();
        assert!(matches!(
            outbox.try_send(Frame::Data(Bytes::from_static(b"late"))),
            Err(Error::Closed(_))
        ));
    }
}
