//! One connection of a client: connects (with a timeout), exchanges hellos, then a reader task
//! routes replies to the requests waiting for them by correlation id and queues every other
//! message for `recv`, so one client can be shared by many threads or tasks without their
//! messages getting mixed up. (`mod.rs` reconnects when the connection is lost.)

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::budget::{Held, Quota};
use crate::config::{ClientConfig, Pings};
use crate::connection::{
    outbound, write_loop, ConnState, Finish, Inbound, IntoHalves, Outbox, Readiness, SendFile,
};
use crate::error::{CloseInfo, Error, FrameError, Result};
use crate::frame::{self, CloseCode, Frame, FrameCodec, Hello, Sniff, TopicStatus, HELLO_LEN};
use crate::heartbeat::{Beat, Heard, Heartbeat};
use crate::sync::lock;
use crate::transfer::{
    self, Delivery, FileDir, Outgoing, Progress, ReceivedFile, Receiving, SentFile,
};

/// One connection to a server. Every method takes `&self`.
pub(crate) struct Session {
    peer: SocketAddr,
    local: SocketAddr,
    #[cfg(unix)]
    fd: std::os::fd::RawFd,
    tls: bool,
    raw: bool,
    outbox: Outbox,
    /// Messages received, each with its share of `inbound_bytes` (given back when read).
    inbound: flume::Receiver<(Incoming, Held)>,
    /// Files received into `download_dir`, verified, for [`Session::recv_file`].
    downloads: flume::Receiver<ReceivedFile>,
    shared: Arc<Shared>,
    next_id: AtomicU32,
    closed_locally: AtomicBool,
    writer: Mutex<Option<JoinHandle<io::Result<()>>>>,
    abort: CancellationToken,
}

/// Facts about the TCP connection, kept when TLS wraps it.
struct Link {
    peer: SocketAddr,
    local: SocketAddr,
    #[cfg(unix)]
    fd: std::os::fd::RawFd,
    tls: bool,
}

/// What the client and its reader task share.
struct Shared {
    /// Requests waiting for their reply, by correlation id; `None` once the connection ended, so
    /// that no request can start waiting for a reply that will never come.
    pending: Mutex<Option<HashMap<u32, Waiter>>>,
    finish: Mutex<Option<Finish>>,
    /// Notified when a message arrives for `recv` and when the connection ends, for callers that
    /// wait for a message without taking it ([`Session::readable`]).
    readable: Readiness,
    /// Files this client is sending, waiting for the server's answers.
    outgoing: Outgoing,
    /// The share of `inbound_bytes` that the messages not yet read hold.
    unread: Arc<Quota>,
}

/// A message from the server, as the application receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    pub data: Bytes,
    /// The topic it was published to (protocol version 2); `None` for a direct message.
    pub topic: Option<Arc<str>>,
}

/// Who waits for an answer with a given correlation id.
enum Waiter {
    /// A request, for its REPLY.
    Reply(oneshot::Sender<Bytes>),
    /// A SUBSCRIBE or UNSUBSCRIBE, for its TOPIC_ACK.
    Ack(oneshot::Sender<(TopicStatus, String)>),
}

impl Shared {
    /// Tells the writer to finish after what is queued, with `last` as the final frame.
    fn finish_writer(&self, last: Option<Frame>) {
        if let Some(finish) = lock(&self.finish).take() {
            let _ = finish.send(last);
        }
    }
}

impl Session {
    /// Connects to `host:port`, trying each address the name resolves to.
    ///
    /// # Errors
    /// [`Error::Io`] when no address accepts (refused, unreachable, unknown host),
    /// [`Error::Timeout`] after `connect_timeout`, [`Error::Protocol`] when the server does not
    /// answer the hello as a socketcomm server.
    ///
    /// # Cancel safety
    /// Cancel safe: nothing outlives a cancelled connect.
    pub(crate) async fn connect(
        host: &str,
        port: u16,
        config: &ClientConfig,
        download_dir: Option<Arc<FileDir>>,
    ) -> Result<Session> {
        let target = format!("{host}:{port}");
        tokio::time::timeout(
            config.connect_timeout,
            Self::connect_inner(host, port, config, download_dir),
        )
        .await
        .map_err(|_| {
            Error::Timeout(format!(
                "connecting to {target} took longer than {:?} (connect_timeout); check the \
                     address, and that the server runs and is reachable",
                config.connect_timeout
            ))
        })?
    }

    async fn connect_inner(
        host: &str,
        port: u16,
        config: &ClientConfig,
        download_dir: Option<Arc<FileDir>>,
    ) -> Result<Session> {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| Error::io(format!("cannot resolve host {host:?}"), e))?
            .collect();
        let mut last_error = None;
        for addr in addrs {
            match connect_from(addr, config).await {
                Ok(stream) => return Self::handshake(host, stream, config, download_dir).await,
                Err(e) => last_error = Some((addr, e)),
            }
        }
        let (addr, e) = last_error.ok_or_else(|| {
            Error::io(
                format!("cannot connect to {host}:{port}"),
                io::Error::new(io::ErrorKind::NotFound, "the name has no addresses"),
            )
        })?;
        let hint = if e.kind() == io::ErrorKind::ConnectionRefused {
            "; is the server running on that port? (start one with `python server.py`)"
        } else {
            ""
        };
        Err(Error::io_with_hint(
            format!("cannot connect to {addr}"),
            e,
            hint,
        ))
    }

    async fn handshake(
        host: &str,
        stream: TcpStream,
        config: &ClientConfig,
        download_dir: Option<Arc<FileDir>>,
    ) -> Result<Session> {
        let peer = stream
            .peer_addr()
            .map_err(|e| Error::io("cannot read the peer address", e))?;
        let local = stream
            .local_addr()
            .map_err(|e| Error::io("cannot read the local address", e))?;
        config
            .socket
            .apply(socket2::SockRef::from(&stream))
            .map_err(|e| Error::io("cannot set the socket options", e))?;
        let link = Link {
            peer,
            local,
            #[cfg(unix)]
            fd: std::os::fd::AsRawFd::as_raw_fd(&stream),
            tls: config.tls.is_some(),
        };
        let Some(tls) = &config.tls else {
            return Self::start(stream, link, config, download_dir).await;
        };
        let name = tls.server_name(host)?;
        let stream = tls
            .connector()
            .connect(name, stream)
            .await
            .map_err(|e| Error::Tls(crate::tls::handshake_error(&e, false)))?;
        Self::start(stream, link, config, download_dir).await
    }

    /// Exchanges hellos (unless raw) and starts the connection's tasks.
    async fn start<S: IntoHalves>(
        mut stream: S,
        link: Link,
        config: &ClientConfig,
        download_dir: Option<Arc<FileDir>>,
    ) -> Result<Session> {
        let state = ConnState::new(u32::MAX, config.outbound_bytes);
        let mut buffered = BytesMut::new();
        if !config.raw {
            let hello = read_hello(&mut stream, link.peer, config.max_frame, &mut buffered).await?;
            let version = hello
                .agreed_version()
                .unwrap_or(frame::MIN_PROTOCOL_VERSION);
            state.set_peer(version, hello.max_frame);
        }
        Ok(Session::spawn(
            stream,
            link,
            config,
            state,
            buffered,
            download_dir,
        ))
    }

    fn spawn<S: IntoHalves>(
        stream: S,
        link: Link,
        config: &ClientConfig,
        state: Arc<ConnState>,
        buffered: BytesMut,
        download_dir: Option<Arc<FileDir>>,
    ) -> Session {
        let Link {
            peer,
            local,
            #[cfg(unix)]
            fd,
            tls,
        } = link;
        let (reader, writer) = stream.into_halves();
        state.set_sends_files(SendFile::sends_files(&writer));
        let (outbox, queued) = outbound(config.outbound_queue, state);
        let (to_app, inbound) = flume::bounded(config.inbound_queue);
        let held = Arc::new(Quota::new(config.inbound_bytes));
        let (finish, finished) = oneshot::channel();
        let abort = CancellationToken::new();
        let shared = Arc::new(Shared {
            pending: Mutex::new(Some(HashMap::new())),
            finish: Mutex::new(Some(finish)),
            readable: Readiness::default(),
            outgoing: Outgoing::default(),
            unread: Arc::clone(&held),
        });
        let (downloaded, downloads) = flume::unbounded();
        let receiving = Receiving::new(
            download_dir,
            outbox.clone(),
            Arc::new(Downloads(downloaded)),
            peer,
            // The server is the only sender on this connection.
            None,
        );
        let writer = tokio::spawn(write_loop(
            writer,
            queued,
            finished,
            config.raw,
            abort.clone(),
        ));
        #[cfg(unix)]
        let socket = Some(fd);
        #[cfg(not(unix))]
        let socket = None;
        let pings = if config.raw { Pings::OFF } else { config.pings };
        let heartbeat = Heartbeat::new(pings, Arc::clone(outbox.state()), socket);
        let reader = Heard::new(reader, &heartbeat);
        let inbound_frames = Inbound::new(reader, config.raw, config.max_frame, buffered);
        tokio::spawn(read_loop(
            inbound_frames,
            heartbeat,
            receiving,
            (to_app, held),
            Arc::clone(&shared),
            outbox.clone(),
            abort.clone(),
        ));
        Session {
            peer,
            local,
            #[cfg(unix)]
            fd,
            tls,
            raw: config.raw,
            outbox,
            inbound,
            downloads,
            shared,
            next_id: AtomicU32::new(1),
            closed_locally: AtomicBool::new(false),
            writer: Mutex::new(Some(writer)),
            abort,
        }
    }

    pub(crate) fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// Whether reading from the server has stopped because the messages the application has
    /// not read hold all of `inbound_bytes`: nothing more, replies included, arrives until
    /// the application reads some.
    pub(crate) fn is_held_back_by_unread(&self) -> bool {
        self.shared.unread.is_waited_on()
    }

    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The socket's descriptor, for inspecting it (valid until the connection ends).
    #[cfg(unix)]
    pub(crate) fn fd(&self) -> std::os::fd::RawFd {
        self.fd
    }

    pub(crate) fn is_raw(&self) -> bool {
        self.raw
    }

    /// Whether the connection is encrypted with TLS.
    pub(crate) fn is_tls(&self) -> bool {
        self.tls
    }

    pub(crate) fn latency(&self) -> Option<Duration> {
        self.outbox.state().latency().get()
    }

    /// Why the connection ended, once it has.
    pub(crate) fn close_info(&self) -> Option<CloseInfo> {
        self.outbox.state().close_info().cloned()
    }

    /// Whether the connection ended by itself (not by [`Session::close`]).
    pub(crate) fn is_lost(&self) -> bool {
        !self.closed_locally.load(Ordering::Relaxed) && self.outbox.state().close_info().is_some()
    }

    /// Whether the connection has ended, or [`Session::close`] was called.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed_locally.load(Ordering::Relaxed) || self.outbox.state().close_info().is_some()
    }

    fn check_open(&self) -> Result<()> {
        if self.closed_locally.load(Ordering::Relaxed) {
            return Err(Error::Closed(CloseInfo::new(
                Some(CloseCode::NORMAL),
                "this client was closed; create a new Client to connect again",
            )));
        }
        Ok(())
    }

    /// Queues one message; it is written in the background, in order.
    ///
    /// # Errors
    /// [`Error::FrameTooLarge`] when the server's `max_frame` is smaller (nothing is sent),
    /// [`Error::Closed`] when the connection has ended.
    ///
    /// # Cancel safety
    /// Cancel safe: a cancelled send queued the whole message or nothing.
    pub(crate) async fn send(&self, data: Bytes) -> Result<()> {
        self.send_or_return(data).await.map_err(|(e, _)| e)
    }

    /// As [`Session::send`], handing back the message that an ended connection did not take.
    ///
    /// # Errors
    /// As [`Session::send`], with the message when it was not queued.
    pub(crate) async fn send_or_return(&self, data: Bytes) -> Result<(), (Error, Option<Bytes>)> {
        if let Err(e) = self.check_open() {
            return Err((e, Some(data)));
        }
        self.outbox
            .send_or_return(Frame::Data(data))
            .await
            .map_err(|(e, frame)| {
                let data = match frame {
                    Some(Frame::Data(data)) => Some(data),
                    _ => None,
                };
                (e, data)
            })
    }

    /// The next message that is not a reply to a request.
    ///
    /// # Errors
    /// [`Error::Closed`] once the connection has ended and every message received before was
    /// read; [`Error::FrameTooLarge`]-like endings are reported through the close code.
    ///
    /// # Cancel safety
    /// Cancel safe: a cancelled receive takes no message.
    pub(crate) async fn recv(&self) -> Result<Incoming> {
        self.check_open()?;
        self.inbound
            .recv_async()
            .await
            .map(|(message, _)| message)
            .map_err(|_| self.outbox.state().closed_error())
    }

    /// Queues one message if there is room: `Ok(false)` when the queue is full (nothing queued).
    ///
    /// # Errors
    /// As [`Session::send`].
    pub(crate) fn try_send(&self, data: Bytes) -> Result<bool> {
        self.check_open()?;
        self.outbox.try_send(Frame::Data(data))
    }

    /// The next message if one is waiting: `None` when none is.
    ///
    /// # Errors
    /// As [`Session::recv`], once the connection has ended and every message was read.
    pub(crate) fn try_recv(&self) -> Result<Option<Incoming>> {
        self.check_open()?;
        match self.inbound.try_recv() {
            Ok((message, _)) => Ok(Some(message)),
            Err(flume::TryRecvError::Empty) => Ok(None),
            Err(flume::TryRecvError::Disconnected) => Err(self.outbox.state().closed_error()),
        }
    }

    /// Waits until [`Session::try_recv`] has something to say (a message, or the end), without
    /// taking the message: a caller that is cancelled while waiting loses nothing, which is how
    /// the asyncio API keeps `recv` lossless under cancellation.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub(crate) async fn readable(&self) {
        self.shared
            .readable
            .wait_until(|| {
                !self.inbound.is_empty()
                    || self.inbound.is_disconnected()
                    || self.closed_locally.load(Ordering::Relaxed)
            })
            .await;
    }

    /// Sends `data` as a request and waits for the server's reply to it. In raw mode there are
    /// no correlation ids: the reply is the next bytes that arrive.
    ///
    /// # Errors
    /// As [`Session::send`], and [`Error::Closed`] if the connection ends before the reply.
    ///
    /// # Cancel safety
    /// Not cancel safe in the sense that the request may already be sent; a reply that arrives
    /// after cancellation is discarded.
    pub(crate) async fn request(&self, data: Bytes) -> Result<Bytes> {
        self.check_open()?;
        if self.raw {
            self.send(data).await?;
            return Ok(self.recv().await?.data);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply_to, reply) = oneshot::channel();
        let _forget = self.wait_for(id, Waiter::Reply(reply_to))?;
        self.outbox.send(Frame::Request { id, body: data }).await?;
        if self.is_held_back_by_unread() {
            log::warn!("{HELD_BACK}");
        }
        reply.await.map_err(|_| self.outbox.state().closed_error())
    }

    /// Registers `waiter` for the answer with correlation id `id`, until the guard is dropped.
    fn wait_for(&self, id: u32, waiter: Waiter) -> Result<ForgetOnDrop<'_>> {
        match lock(&self.shared.pending).as_mut() {
            Some(pending) => pending.insert(id, waiter),
            None => return Err(self.outbox.state().closed_error()),
        };
        Ok(ForgetOnDrop {
            shared: &self.shared,
            id,
        })
    }

    /// Asks the server to put this connection in the rooms `pattern` matches (`subscribe`),
    /// or to take it out; `Ok(false)` when nothing changed (subscribed already, or was not).
    ///
    /// # Errors
    /// [`Error::Topic`] for a name that breaks the rules (nothing is sent),
    /// [`Error::Protocol`] when the server speaks no topics (protocol version 1) or this
    /// client is raw, [`Error::Refused`] when the server's application refused it, and
    /// [`Error::Closed`] when the connection ends first.
    ///
    /// # Cancel safety
    /// As [`Session::request`].
    pub(crate) async fn subscription(&self, pattern: &str, subscribe: bool) -> Result<bool> {
        crate::topic::check_pattern(pattern)?;
        self.check_topics()?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (ack_to, ack) = oneshot::channel();
        let _forget = self.wait_for(id, Waiter::Ack(ack_to))?;
        let pattern = pattern.to_owned();
        let frame = if subscribe {
            Frame::Subscribe { id, pattern }
        } else {
            Frame::Unsubscribe { id, pattern }
        };
        self.outbox.send(frame).await?;
        let (status, reason) = ack.await.map_err(|_| self.outbox.state().closed_error())?;
        match status {
            TopicStatus::DONE => Ok(true),
            TopicStatus::UNCHANGED => Ok(false),
            TopicStatus::REFUSED => Err(Error::Refused(reason)),
            _ => Err(Error::Protocol(format!(
                "the server refused the topic name: {reason}"
            ))),
        }
    }

    /// Publishes `data` to `topic` through the server.
    ///
    /// # Errors
    /// As [`Session::subscription`] and [`Session::send`].
    ///
    /// # Cancel safety
    /// As [`Session::send`].
    pub(crate) async fn publish(&self, topic: &str, data: Bytes) -> Result<()> {
        crate::topic::check_name(topic)?;
        self.check_topics()?;
        self.outbox
            .send(Frame::Publish {
                topic: Arc::from(topic),
                body: data,
            })
            .await
    }

    /// Whether the connection can carry topic frames.
    fn check_topics(&self) -> Result<()> {
        self.check_open()?;
        if self.raw {
            return Err(Error::Protocol(
                "a raw client has no topics: they are part of the framed protocol".to_owned(),
            ));
        }
        if !self.outbox.state().speaks_topics() {
            return Err(Error::Protocol(format!(
                "the server at {} speaks protocol version 1, which has no topics (socketcomm \
                 0.1 and other version-1 servers); topics need a server that speaks version 2",
                self.peer
            )));
        }
        Ok(())
    }

    /// Sends the file at `path` (under `name`, by default its own), streamed in bounded memory,
    /// and returns once the server has verified its digest and saved it. Sending a file again
    /// after an interruption resumes from what the server kept.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be read, [`Error::Transfer`] when the server refuses
    /// it or the verification fails, [`Error::Closed`] when the connection ends first.
    ///
    /// # Cancel safety
    /// Cancelling stops the transfer; the server keeps what arrived, for a resume.
    pub(crate) async fn send_file(
        &self,
        path: &std::path::Path,
        name: Option<String>,
        progress: &Arc<Progress>,
    ) -> Result<SentFile> {
        self.check_open()?;
        // NOTE: by address, not port: the same server reached another way (a proxy on its
        // host, a new port after a restart) is offered the token; one that does not know it
        // starts afresh.
        let receiver = self.peer_addr().ip().to_string();
        transfer::send_file(
            &self.outbox,
            &self.shared.outgoing,
            &receiver,
            path,
            name,
            progress,
        )
        .await
    }

    /// The next file the server sent into `download_dir`, once it is verified and in place.
    ///
    /// # Errors
    /// [`Error::Closed`] once the connection has ended and every file received was taken.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub(crate) async fn recv_file(&self) -> Result<ReceivedFile> {
        self.downloads
            .recv_async()
            .await
            .map_err(|_| self.outbox.state().closed_error())
    }

    /// Closes the connection: what was sent before is written, then a close frame; waits up to
    /// `grace` for that, then drops the connection.
    ///
    /// # Cancel safety
    /// Cancel safe; the connection is closed either way.
    pub(crate) async fn close(&self, grace: Duration) {
        if self.closed_locally.swap(true, Ordering::Relaxed) {
            return;
        }
        let last = (!self.raw).then(|| Frame::close(CloseCode::NORMAL, "client closed"));
        self.shared.finish_writer(last);
        self.shared.readable.notify();
        let writer = lock(&self.writer).take();
        if let Some(writer) = writer {
            let _ = tokio::time::timeout(grace, writer).await;
        }
        self.abort.cancel();
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Flush what is queued and say goodbye; the reader ends when the server hangs up.
        let last = (!self.raw && !self.closed_locally.load(Ordering::Relaxed))
            .then(|| Frame::close(CloseCode::NORMAL, "client closed"));
        self.shared.finish_writer(last);
    }
}

/// Connects to `addr`, from `config.local_addr` when set.
async fn connect_from(addr: SocketAddr, config: &ClientConfig) -> io::Result<TcpStream> {
    let Some(local) = config.local_addr else {
        return TcpStream::connect(addr).await;
    };
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.bind(local)?;
    socket.connect(addr).await
}

/// Removes a request's entry when its caller stops waiting, so abandoned requests leak nothing.
struct ForgetOnDrop<'a> {
    shared: &'a Shared,
    id: u32,
}

impl Drop for ForgetOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(pending) = lock(&self.shared.pending).as_mut() {
            pending.remove(&self.id);
        }
    }
}

/// Reads the server's hello, telling a socketcomm server from anything else at the first byte
/// that differs.
async fn read_hello<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    peer: SocketAddr,
    max_frame: u32,
    buffered: &mut BytesMut,
) -> Result<Hello> {
    stream
        .write_all(&Hello::client(max_frame).encode())
        .await
        .map_err(|e| Error::io(format!("cannot send the hello to {peer}"), e))?;
    loop {
        match frame::sniff(buffered) {
            Sniff::Framed => break,
            Sniff::Raw => {
                return Err(Error::Protocol(format!(
                    "{peer} did not answer with a socketcomm hello (it sent {:?}); if it is a \
                     plain TCP server, connect with raw=True (--raw on the command line)",
                    String::from_utf8_lossy(&buffered[..buffered.len().min(64)])
                )))
            }
            Sniff::NeedMore => {}
        }
        let read = stream.read_buf(buffered).await.map_err(|e| {
            // With TLS 1.3 the server judges the client's certificate after the client's side
            // of the handshake: its refusal arrives here.
            if crate::tls::is_tls_failure(&e) {
                Error::Tls(crate::tls::handshake_error(&e, false))
            } else {
                Error::io(format!("the hello from {peer} failed"), e)
            }
        })?;
        if read == 0 {
            return Err(Error::Protocol(format!(
                "{peer} closed the connection instead of answering the hello; is it a \
                 socketcomm server? For a plain TCP server, connect with raw=True (--raw)"
            )));
        }
    }
    let hello_bytes: [u8; HELLO_LEN] = buffered.split_to(HELLO_LEN)[..]
        .try_into()
        .expect("sniff saw a whole hello");
    let hello = Hello::decode(&hello_bytes)
        .map_err(|e| Error::Protocol(format!("{peer} sent a broken hello: {e}")))?;
    if hello.agreed_version().is_some() {
        return Ok(hello);
    }
    // A refusal is followed by a close frame that says why.
    match read_close_frame(stream, buffered).await {
        // Refused for a reason that is not the protocol's (the server is full): the connection
        // is closed, as it would be later for the same reason.
        Some((CloseCode::TLS_REQUIRED, reason)) => Err(Error::Tls(format!(
            "{peer} refused the connection: {reason}"
        ))),
        Some((code, reason))
            if code != CloseCode::PROTOCOL_ERROR && code != CloseCode::UNSUPPORTED_VERSION =>
        {
            Err(Error::Closed(CloseInfo::new(
                Some(code),
                format!("{peer} refused the connection: {reason}"),
            )))
        }
        Some((_, reason)) => Err(Error::Protocol(format!(
            "{peer} refused the connection: {reason}"
        ))),
        None => Err(Error::Protocol(format!(
            "{peer} refused the connection: the server speaks protocol versions up to {}",
            hello.max_version
        ))),
    }
}

async fn read_close_frame<S: AsyncRead + Unpin>(
    stream: &mut S,
    buffered: &mut BytesMut,
) -> Option<(CloseCode, String)> {
    use tokio_util::codec::Decoder;
    let mut codec = FrameCodec::new(frame::MIN_MAX_FRAME);
    loop {
        if let Ok(Some(Frame::Close { code, reason })) = codec.decode(buffered) {
            return Some((code, reason));
        }
        if stream.read_buf(buffered).await.ok()? == 0 {
            return None;
        }
    }
}

/// Hands files received into `download_dir` to [`Session::recv_file`].
struct Downloads(flume::Sender<ReceivedFile>);

impl Delivery for Downloads {
    fn received(&self, file: ReceivedFile) {
        let _ = self.0.send(file);
    }

    fn failed(&self, _offered_name: &str, _status: frame::TransferStatus, _reason: &str) {}
}

/// Why a request's reply does not come while the application does not read.
const HELD_BACK: &str = "the messages from the server that the application has not read \
                         (recv()) hold all of inbound_bytes: nothing more is read from the \
                         server until some are, so the replies to the requests waiting cannot \
                         arrive either";

/// Whether a request is waiting for its reply.
fn waits_for_replies(shared: &Shared) -> bool {
    lock(&shared.pending)
        .as_ref()
        .is_some_and(|pending| !pending.is_empty())
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut inbound: Inbound<R>,
    mut heartbeat: Heartbeat,
    mut receiving: Receiving,
    (to_app, held): (flume::Sender<(Incoming, Held)>, Arc<Quota>),
    shared: Arc<Shared>,
    outbox: Outbox,
    abort: CancellationToken,
) {
    let (info, last_frame) = loop {
        let next = tokio::select! {
            () = abort.cancelled() => break (CloseInfo::new(Some(CloseCode::NORMAL), "the client was closed"), None),
            next = inbound.next() => next,
            beat = heartbeat.beat(), if heartbeat.armed() => match beat {
                Beat::Ping(ping) => {
                    // A ping that finds the queue full is skipped: the next look decides.
                    let _ = outbox.try_send(ping);
                    continue;
                }
                Beat::Gone(info) => {
                    log::info!("closing the connection to the server: {info}");
                    let frame = Frame::close(CloseCode::PING_TIMEOUT, &info.reason);
                    break (info, Some(frame));
                }
            },
        };
        match next {
            None => {
                break (
                    CloseInfo::new(None, "the server closed the connection"),
                    None,
                )
            }
            Some(Ok(frame @ (Frame::Data(_) | Frame::Request { .. } | Frame::Publish { .. }))) => {
                let (body, topic) = match frame {
                    Frame::Publish { topic, body } => (body, Some(topic)),
                    Frame::Data(body) | Frame::Request { body, .. } => (body, None),
                    _ => unreachable!("matched above"),
                };
                // NOTE: waiting here, for room in `inbound_bytes` and then in the queue, is
                // what stops the reading: TCP then pushes back on the server.
                if held.is_full_for(body.len()) && waits_for_replies(&shared) {
                    log::warn!("{HELD_BACK}");
                }
                let delivered = tokio::select! {
                    () = abort.cancelled() => false,
                    sent = async {
                        let share = Quota::hold(&held, body.len()).await;
                        to_app.send_async((Incoming { data: body, topic }, share)).await
                    } => sent.is_ok(),
                };
                shared.readable.notify();
                if !delivered {
                    break (
                        CloseInfo::new(Some(CloseCode::NORMAL), "the client was closed"),
                        None,
                    );
                }
            }
            Some(Ok(Frame::Reply { id, body })) => {
                let waiter = lock(&shared.pending).as_mut().and_then(|p| p.remove(&id));
                match waiter {
                    Some(Waiter::Reply(waiter)) => {
                        let _ = waiter.send(body);
                    }
                    _ => log::debug!("discarded the reply to request {id}: nobody waits for it"),
                }
            }
            Some(Ok(Frame::TopicAck { id, status, reason })) => {
                let waiter = lock(&shared.pending).as_mut().and_then(|p| p.remove(&id));
                match waiter {
                    Some(Waiter::Ack(waiter)) => {
                        let _ = waiter.send((status, reason));
                    }
                    _ => log::debug!("discarded the answer to subscription {id}: nobody waits"),
                }
            }
            Some(Ok(Frame::Subscribe { .. } | Frame::Unsubscribe { .. })) => {
                log::debug!("ignored a subscription from the server: only clients subscribe");
            }
            Some(Ok(frame @ (Frame::FileAccept { .. } | Frame::FileResult { .. }))) => {
                shared.outgoing.route(frame);
            }
            Some(Ok(
                frame @ (Frame::FileOffer { .. }
                | Frame::FileChunk { .. }
                | Frame::FileEnd { .. }
                | Frame::FileCancel { .. }),
            )) => {
                tokio::select! {
                    () = abort.cancelled() => break (CloseInfo::new(Some(CloseCode::NORMAL), "the client was closed"), None),
                    () = receiving.handle(frame) => {}
                }
            }
            Some(Ok(Frame::Ping(token))) => {
                // A pong that finds the queue full is dropped: the peer will ping again.
                let _ = outbox.try_send(Frame::Pong(token));
            }
            Some(Ok(Frame::Pong(token))) => heartbeat.pong(token),
            // A FILE_RANGE is never decoded (it arrives as a FILE_CHUNK).
            Some(Ok(Frame::FileRange { .. })) => {}
            Some(Ok(Frame::Close { code, reason })) => {
                let reason = if reason.is_empty() {
                    "the server closed the connection".to_owned()
                } else {
                    format!("the server closed the connection: {reason}")
                };
                break (CloseInfo::new(Some(code), reason), None);
            }
            Some(Err(FrameError::Io(e))) => {
                let reason = if e.kind() == io::ErrorKind::ConnectionReset {
                    "the server reset the connection".to_owned()
                } else {
                    format!("reading from the server failed: {e}")
                };
                break (CloseInfo::new(None, reason), None);
            }
            Some(Err(e @ FrameError::Truncated(_))) => {
                break (
                    CloseInfo::new(None, format!("the server went away: {e}")),
                    None,
                );
            }
            Some(Err(e)) => {
                let code = e.close_code();
                let reason = format!("the server sent a bad frame: {e}");
                log::warn!("{reason}");
                break (
                    CloseInfo::new(Some(code), reason),
                    Some(Frame::close(code, &e.to_string())),
                );
            }
        }
    };
    outbox.state().mark_closed(info);
    // Wake every request and file transfer still waiting; they report the reason just recorded.
    lock(&shared.pending).take();
    shared.outgoing.close();
    shared.finish_writer(last_frame);
    drop(to_app);
    shared.readable.notify();
}

/// How long [`Session::close`] waits for queued messages by default.
pub const DEFAULT_CLOSE_GRACE: Duration = Duration::from_secs(5);
