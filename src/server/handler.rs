//! One accepted connection, from its first byte to its last event: telling framed from raw, the
//! hello, the read loop (native answers or events), the idle timer, and the close with a reason.
//! Also the short answer to a client that arrives when the server is full.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{lock, Connection, Control, Event, Hub, Message};
use crate::config::Mode;
use crate::connection::{write_loop, ConnState, Inbound, Outbox};
use crate::error::{CloseInfo, FrameError};
use crate::frame::{self, CloseCode, Frame, Hello, Sniff, HELLO_LEN};

/// How long the writer may take to flush what is queued once the connection is closing, before
/// the rest is dropped.
const FLUSH_GRACE: Duration = Duration::from_secs(5);

/// How long a client that arrives when the server is full gets to show which protocol it
/// speaks, and then to take the answer.
const REFUSAL_WAIT: Duration = Duration::from_secs(1);

/// Serves one connection to its end.
pub(super) async fn serve(
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
        control: Arc::new(Control {
            close: CancellationToken::new(),
            abort: hub.abort.child_token(),
        }),
    };
    lock(&hub.connections).insert(id, conn.clone());
    log::debug!("connection {id} from {peer}");
    hub.emit(&events, Event::Connected(conn.clone())).await;

    let reason = run(&hub, stream, &conn, queued, &events).await;

    conn.outbox.state().mark_closed(reason.clone());
    lock(&hub.connections).remove(&id);
    log::debug!("connection {id} from {peer} ended: {reason}");
    hub.emit(&events, Event::Disconnected { conn, reason })
        .await;
}

/// Why the read loop stopped, and the close frame to send a framed client, if any.
type Ending = (CloseInfo, Option<Frame>);

async fn run(
    hub: &Hub,
    mut stream: TcpStream,
    conn: &Connection,
    queued: flume::Receiver<Frame>,
    events: &flume::Sender<Event>,
) -> CloseInfo {
    let mut idle = IdleTimer::new(hub.config.idle_timeout);
    let mut buffered = BytesMut::with_capacity(8 * 1024);
    let raw = loop {
        match frame::sniff(&buffered) {
            Sniff::Raw => break true,
            Sniff::Framed => break false,
            Sniff::NeedMore => {}
        }
        let read = tokio::select! {
            () = hub.stop.cancelled() => return shutting_down(),
            () = conn.control.close.cancelled() => return closed_by_server(conn),
            () = idle.expired() => return idle.reason(),
            read = stream.read_buf(&mut buffered) => read,
        };
        idle.touch();
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
    let mut writer = tokio::spawn(write_loop(
        writer,
        queued,
        finished,
        raw,
        conn.control.abort.clone(),
    ));
    let mut inbound = Inbound::new(reader, raw, hub.config.max_frame, buffered);

    let (reason, last_frame): Ending = loop {
        let next = tokio::select! {
            biased;
            () = conn.control.abort.cancelled() => {
                break (conn.close_info().unwrap_or_else(shutting_down), None);
            }
            () = hub.stop.cancelled() => {
                break (shutting_down(), Some(Frame::close(CloseCode::GOING_AWAY, "server shutting down")));
            }
            () = conn.control.close.cancelled() => {
                let info = closed_by_server(conn);
                let frame = Frame::close(info.code.unwrap_or(CloseCode::NORMAL), &info.reason);
                break (info, Some(frame));
            }
            () = idle.expired() => {
                let info = idle.reason();
                let frame = Frame::close(CloseCode::IDLE_TIMEOUT, &info.reason);
                break (info, Some(frame));
            }
            next = inbound.next() => next,
        };
        idle.touch();
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
    // The writer finishes after what is queued; a framed client gets the close frame last.
    let _ = finish.send(last_frame.filter(|_| !raw));
    let written = tokio::select! {
        written = &mut writer => written,
        () = tokio::time::sleep(FLUSH_GRACE) => {
            log::debug!("connection {}: the client is not reading; dropping its queue", conn.id);
            conn.control.abort.cancel();
            writer.await
        }
    };
    match written {
        Ok(Err(e)) => log::debug!("connection {}: write failed: {e}", conn.id),
        Err(e) => log::error!("connection {}: writer task failed: {e}", conn.id),
        Ok(Ok(())) => {}
    }
    reason
}

/// Fires when the client has sent nothing for `idle_timeout`. Arming a timer per frame would
/// cost a timer-wheel update per message; instead the timer is left alone and, when it fires,
/// re-armed from the last activity if there was any.
struct IdleTimer {
    limit: Option<Duration>,
    last_seen: Instant,
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl IdleTimer {
    fn new(limit: Option<Duration>) -> IdleTimer {
        let now = Instant::now();
        // Without a limit the timer is never polled; its deadline does not matter.
        let deadline = now + limit.unwrap_or(Duration::from_secs(3600));
        IdleTimer {
            limit,
            last_seen: now,
            sleep: Box::pin(tokio::time::sleep_until(deadline)),
        }
    }

    fn touch(&mut self) {
        if self.limit.is_some() {
            self.last_seen = Instant::now();
        }
    }

    /// Completes once the connection has been idle for the limit; never without one.
    async fn expired(&mut self) {
        let Some(limit) = self.limit else {
            return std::future::pending().await;
        };
        loop {
            self.sleep.as_mut().await;
            let deadline = self.last_seen + limit;
            if Instant::now() >= deadline {
                return;
            }
            self.sleep.as_mut().reset(deadline);
        }
    }

    fn reason(&self) -> CloseInfo {
        let limit = self.limit.unwrap_or_default();
        CloseInfo::new(
            Some(CloseCode::IDLE_TIMEOUT),
            format!("idle for more than {limit:?} (idle_timeout)"),
        )
    }
}

async fn answer_hello(
    hub: &Hub,
    stream: &mut TcpStream,
    conn: &Connection,
    hello_bytes: &[u8; HELLO_LEN],
) -> Result<(), CloseInfo> {
    let max_frame = hub.config.max_frame;
    let (answer, refusal) = match Hello::decode(hello_bytes) {
        Ok(offered) => {
            let answer = Hello::answer(&offered, max_frame);
            let refusal = answer.agreed_version().is_none().then(|| {
                let reason = format!(
                    "the client speaks protocol versions {}..={}, this server speaks {}",
                    offered.min_version,
                    offered.max_version,
                    frame::PROTOCOL_VERSION
                );
                CloseInfo::new(Some(CloseCode::UNSUPPORTED_VERSION), reason)
            });
            if refusal.is_none() {
                conn.outbox.state().set_peer_max_frame(offered.max_frame);
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
    let written = stream.write_all(&out).await.map_err(|e| io_close_info(&e));
    match refusal {
        Some(refusal) => Err(refusal),
        None => written,
    }
}

/// Handles one frame from the client; returns why the connection ends, if it does.
async fn handle_frame(
    hub: &Hub,
    conn: &Connection,
    frame: Frame,
    events: &flume::Sender<Event>,
) -> Option<CloseInfo> {
    let message = match frame {
        Frame::Data(data) => Message {
            conn: conn.clone(),
            data,
            request_id: None,
        },
        Frame::Request { id, body } => Message {
            conn: conn.clone(),
            data: body,
            request_id: Some(id),
        },
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
        Mode::Events => hub.emit(events, Event::Message(message)).await,
        Mode::Echo => {
            let answer = message.answer(message.data.clone());
            send_or_log(conn, answer).await;
        }
        Mode::Ack => {
            let answer = message.answer(hub.config.ack_reply.clone());
            send_or_log(conn, answer).await;
        }
        Mode::Broadcast => {
            hub.broadcast(message.data, &[conn.id]).await;
        }
    }
    None
}

async fn send_or_log(conn: &Connection, frame: Frame) {
    if let Err(e) = conn.outbox.send(frame).await {
        log::debug!("connection {}: cannot answer: {e}", conn.id);
    }
}

/// Tells a client that arrived over `max_connections` that the server is full, in its own
/// protocol (a refusing hello and a close frame, or a line of text), then closes.
pub(super) async fn refuse_full(hub: Arc<Hub>, mut stream: TcpStream, peer: SocketAddr) {
    let reason = format!(
        "server full: it serves at most {} connections; try again later",
        hub.config.max_connections
    );
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

fn closed_by_server(conn: &Connection) -> CloseInfo {
    conn.close_info()
        .unwrap_or_else(|| CloseInfo::new(Some(CloseCode::NORMAL), "closed by the server"))
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
