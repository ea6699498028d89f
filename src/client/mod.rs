//! The client: a connection to a server (`session.rs`), and, with `retries`, a new one when it
//! is lost: the next operation that finds it closed reconnects with exponential backoff, says
//! so in the log, and carries on.
//!
//! What was queued but not yet written when the connection was lost is lost with it; a request
//! whose connection ended before its reply is sent again once on the new connection (at least
//! once, not exactly once).

mod session;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use bytes::Bytes;

use crate::config::ClientConfig;
use crate::error::{CloseInfo, Error, Result};
use crate::transfer::{FileDir, Progress, ReceivedFile, SentFile};
use session::Session;
pub use session::{Incoming, DEFAULT_CLOSE_GRACE};

/// The longest wait between two reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A connection to a server. Every method takes `&self`: share it behind an `Arc`.
pub struct Client {
    host: String,
    port: u16,
    config: ClientConfig,
    download_dir: Option<Arc<FileDir>>,
    current: RwLock<Arc<Session>>,
    /// Held while reconnecting, so that concurrent callers wait for one new connection.
    reconnecting: tokio::sync::Mutex<()>,
    closed_locally: AtomicBool,
    /// The topics this client subscribed to, subscribed again on a new connection.
    subscriptions: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

impl Client {
    /// Connects to `host:port`, trying each address the name resolves to; with `retries`, tries
    /// again that many times, with backoff, when the server cannot be reached.
    ///
    /// # Errors
    /// [`Error::InvalidOption`] for an unusable config or `download_dir`; [`Error::Io`] when no
    /// address accepts (refused, unreachable, unknown host), [`Error::Timeout`] after
    /// `connect_timeout`, [`Error::Protocol`] when the server does not answer the hello as a
    /// socketcomm server, [`Error::Tls`] when the TLS handshake fails; after the last retry.
    ///
    /// # Cancel safety
    /// Cancel safe: nothing outlives a cancelled connect.
    pub async fn connect(host: &str, port: u16, config: ClientConfig) -> Result<Client> {
        config.validate()?;
        let download_dir = FileDir::open_optional(
            "download_dir",
            config.download_dir.as_deref(),
            crate::transfer::FolderLimits {
                max_file_size: config.max_file_size,
                ..crate::transfer::FolderLimits::default()
            },
        )?;
        let first = connect_with_retries(host, port, &config, &download_dir, None).await?;
        Ok(Client {
            host: host.to_owned(),
            port,
            config,
            download_dir,
            current: RwLock::new(Arc::new(first)),
            reconnecting: tokio::sync::Mutex::new(()),
            closed_locally: AtomicBool::new(false),
            subscriptions: std::sync::Mutex::default(),
        })
    }

    fn session(&self) -> Arc<Session> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Whether a lost connection is replaced by a new one.
    fn reconnects(&self) -> bool {
        self.config.retries > 0 && !self.closed_locally.load(Ordering::Relaxed)
    }

    /// A connection that is not known to be lost: the current one, or, when it has ended and
    /// `retries` allows, a new one (made once, however many callers find the old one ended).
    async fn live_session(&self, lost: &Arc<Session>) -> Result<Arc<Session>> {
        let _one_at_a_time = self.reconnecting.lock().await;
        let current = self.session();
        if !Arc::ptr_eq(&current, lost) {
            return Ok(current);
        }
        let why = lost
            .close_info()
            .unwrap_or_else(|| CloseInfo::new(None, "the connection ended"));
        let fresh = Arc::new(
            connect_with_retries(
                &self.host,
                self.port,
                &self.config,
                &self.download_dir,
                Some(&why),
            )
            .await?,
        );
        self.subscribe_again(&fresh).await;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::clone(&fresh);
        Ok(fresh)
    }

    /// Subscribes a new connection to what the lost one was subscribed to.
    async fn subscribe_again(&self, fresh: &Session) {
        let topics: Vec<String> = crate::sync::lock(&self.subscriptions)
            .iter()
            .cloned()
            .collect();
        for topic in topics {
            if let Err(e) = fresh.subscription(&topic, true).await {
                log::warn!("cannot subscribe to {topic:?} again after reconnecting: {e}");
            }
        }
    }

    /// Runs `operation` on the connection; if that finds it lost and `retries` allows, runs it
    /// once more on a new connection.
    async fn with_reconnect<T, F, Fut>(&self, operation: F) -> Result<T>
    where
        F: Fn(Arc<Session>) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let session = self.session();
        match operation(Arc::clone(&session)).await {
            Err(Error::Closed(_)) if self.reconnects() && session.is_lost() => {
                operation(self.live_session(&session).await?).await
            }
            other => other,
        }
    }

    pub fn peer_addr(&self) -> SocketAddr {
        self.session().peer_addr()
    }

    /// Whether reading from the server has stopped because the messages the application has
    /// not read (`recv`) hold all of `inbound_bytes`: replies cannot arrive until it reads.
    pub fn is_held_back_by_unread(&self) -> bool {
        self.session().is_held_back_by_unread()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.session().local_addr()
    }

    /// The socket's descriptor, for inspecting it (valid until the connection ends).
    #[cfg(unix)]
    pub fn fd(&self) -> std::os::fd::RawFd {
        self.session().fd()
    }

    pub fn is_raw(&self) -> bool {
        self.session().is_raw()
    }

    /// Whether the connection is encrypted with TLS.
    pub fn is_tls(&self) -> bool {
        self.session().is_tls()
    }

    /// The round trip of the last ping this client sent and the server answered; `None` before
    /// the first answer (the first ping goes out after `ping_interval`), with pings off, and in
    /// raw mode.
    pub fn latency(&self) -> Option<Duration> {
        self.session().latency()
    }

    /// Whether [`Client::close`] was called, or the connection has ended and will not be
    /// replaced (no `retries`).
    pub fn is_closed(&self) -> bool {
        self.closed_locally.load(Ordering::Relaxed)
            || (self.config.retries == 0 && self.session().is_closed())
    }

    /// Queues one message; it is written in the background, in order.
    ///
    /// # Errors
    /// [`Error::FrameTooLarge`] when the server's `max_frame` is smaller (nothing is sent),
    /// [`Error::Closed`] when the connection has ended (and could not be replaced).
    ///
    /// # Cancel safety
    /// Cancel safe: a cancelled send queued the whole message or nothing.
    pub async fn send(&self, data: Bytes) -> Result<()> {
        // NOTE: the hot path of `Client.send`: the message is handed back by a connection that
        // ended instead of being copied for a retry (cloning a freshly made `Bytes` allocates).
        let session = self.session();
        match session.send_or_return(data).await {
            Err((Error::Closed(_), Some(data))) if self.reconnects() && session.is_lost() => {
                self.live_session(&session).await?.send(data).await
            }
            outcome => outcome.map_err(|(e, _)| e),
        }
    }

    /// The next message that is not a reply to a request.
    ///
    /// # Errors
    /// [`Error::Closed`] once the connection has ended and every message received before was
    /// read (and it could not be replaced).
    ///
    /// # Cancel safety
    /// Cancel safe: a cancelled receive takes no message.
    pub async fn recv(&self) -> Result<Bytes> {
        Ok(self.recv_message().await?.data)
    }

    /// As [`Client::recv`], with the topic the message was published to, if any.
    ///
    /// # Errors
    /// As [`Client::recv`].
    ///
    /// # Cancel safety
    /// As [`Client::recv`].
    pub async fn recv_message(&self) -> Result<Incoming> {
        self.with_reconnect(|session| async move { session.recv().await })
            .await
    }

    /// Subscribes to `pattern`, a topic name (`chat.lobby`) or a pattern (`chat.*`, `chat.>`;
    /// see [`crate::topic`]): messages published to a matching topic arrive with it (see
    /// [`Client::recv_message`]). `Ok(false)` when subscribed already. With `retries`, a new
    /// connection subscribes again.
    ///
    /// # Errors
    /// [`Error::Topic`] for a name that breaks the rules, [`Error::Protocol`] when the server
    /// has no topics (protocol version 1), [`Error::Refused`] when its application refused
    /// the subscription, [`Error::Closed`] when the connection ended.
    ///
    /// # Cancel safety
    /// As [`Client::request`].
    pub async fn subscribe(&self, pattern: &str) -> Result<bool> {
        let subscribed = self
            .with_reconnect(|session| async move { session.subscription(pattern, true).await })
            .await?;
        crate::sync::lock(&self.subscriptions).insert(pattern.to_owned());
        Ok(subscribed)
    }

    /// Unsubscribes from `pattern` (as subscribed); `Ok(false)` when it was not subscribed.
    ///
    /// # Errors
    /// As [`Client::subscribe`].
    ///
    /// # Cancel safety
    /// As [`Client::request`].
    pub async fn unsubscribe(&self, pattern: &str) -> Result<bool> {
        crate::sync::lock(&self.subscriptions).remove(pattern);
        self.with_reconnect(|session| async move { session.subscription(pattern, false).await })
            .await
    }

    /// Publishes `data` to `topic` (a name, no wildcards) through the server, which hands it
    /// to its application (`Message.topic`) or, in the broadcast mode, relays it to the
    /// subscribers of matching topics but this client.
    ///
    /// # Errors
    /// As [`Client::subscribe`] and [`Client::send`].
    ///
    /// # Cancel safety
    /// As [`Client::send`].
    pub async fn publish(&self, topic: &str, data: Bytes) -> Result<()> {
        self.with_reconnect(|session| {
            let data = data.clone();
            async move { session.publish(topic, data).await }
        })
        .await
    }

    /// Queues one message if there is room: `Ok(false)` when the queue is full (nothing queued).
    ///
    /// # Errors
    /// As [`Client::send`]; a lost connection is replaced by the next awaited operation.
    pub fn try_send(&self, data: Bytes) -> Result<bool> {
        self.session().try_send(data)
    }

    /// The next message if one is waiting: `None` when none is.
    ///
    /// # Errors
    /// As [`Client::recv`]; a lost connection is replaced by [`Client::readable`].
    pub fn try_recv(&self) -> Result<Option<Bytes>> {
        Ok(self.try_recv_message()?.map(|message| message.data))
    }

    /// As [`Client::try_recv`], with the topic the message was published to, if any.
    ///
    /// # Errors
    /// As [`Client::try_recv`].
    pub fn try_recv_message(&self) -> Result<Option<Incoming>> {
        self.session().try_recv()
    }

    /// Waits until [`Client::try_recv`] has something to say (a message, or the end), without
    /// taking the message; with `retries`, a lost connection is replaced first.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn readable(&self) {
        let session = self.session();
        session.readable().await;
        if self.reconnects() && session.is_lost() && session.try_recv().is_err() {
            if let Err(e) = self.live_session(&session).await {
                log::warn!("{e}");
            }
        }
    }

    /// Sends `data` as a request and waits for the server's reply to it. In raw mode there are
    /// no correlation ids: the reply is the next bytes that arrive.
    ///
    /// # Errors
    /// As [`Client::send`], and [`Error::Closed`] if the connection ends before the reply
    /// (with `retries`, after the request was sent once more on a new connection).
    ///
    /// # Cancel safety
    /// Not cancel safe in the sense that the request may already be sent; a reply that arrives
    /// after cancellation is discarded.
    pub async fn request(&self, data: Bytes) -> Result<Bytes> {
        self.with_reconnect(|session| {
            let data = data.clone();
            async move { session.request(data).await }
        })
        .await
    }

    /// Sends the file at `path` (under `name`, by default its own), streamed in bounded memory,
    /// and returns once the server has verified its digest and saved it. Sending a file again
    /// after an interruption resumes from what the server kept (with `retries`, that happens by
    /// itself when the connection is lost).
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be read, [`Error::Transfer`] when the server refuses
    /// it or the verification fails, [`Error::Closed`] when the connection ends first.
    ///
    /// # Cancel safety
    /// Cancelling stops the transfer; the server keeps what arrived, for a resume.
    pub async fn send_file(
        &self,
        path: &Path,
        name: Option<String>,
        progress: &Arc<Progress>,
    ) -> Result<SentFile> {
        self.with_reconnect(|session| {
            let name = name.clone();
            async move { session.send_file(path, name, progress).await }
        })
        .await
    }

    /// The next file the server sent into `download_dir`, once it is verified and in place.
    ///
    /// # Errors
    /// [`Error::Closed`] once the connection has ended and every file received was taken.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn recv_file(&self) -> Result<ReceivedFile> {
        self.with_reconnect(|session| async move { session.recv_file().await })
            .await
    }

    /// Closes the connection: what was sent before is written, then a close frame; waits up to
    /// `grace` for that, then drops the connection. No reconnection follows.
    ///
    /// # Cancel safety
    /// Cancel safe; the connection is closed either way.
    pub async fn close(&self, grace: Duration) {
        self.closed_locally.store(true, Ordering::Relaxed);
        self.session().close(grace).await;
    }
}

/// Connects, trying again up to `config.retries` times with exponential backoff (from
/// `config.backoff`, at most [`MAX_BACKOFF`] apart); `lost` is why an earlier connection ended,
/// when this replaces one. Each attempt is logged.
async fn connect_with_retries(
    host: &str,
    port: u16,
    config: &ClientConfig,
    download_dir: &Option<Arc<FileDir>>,
    lost: Option<&CloseInfo>,
) -> Result<Session> {
    let target = format!("{host}:{port}");
    if let Some(why) = lost {
        log::warn!("connection to {target} lost ({why}); reconnecting");
    }
    let mut delay = config.backoff;
    let mut attempt = 0;
    loop {
        match Session::connect(host, port, config, download_dir.clone()).await {
            Ok(session) => {
                if lost.is_some() || attempt > 0 {
                    log::warn!("connected to {target} again (attempt {})", attempt + 1);
                }
                return Ok(session);
            }
            Err(e) if attempt < config.retries && is_worth_retrying(&e) => {
                attempt += 1;
                log::warn!(
                    "cannot connect to {target} ({e}); retrying in {delay:?} (retry {attempt} \
                     of {})",
                    config.retries
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_BACKOFF);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Failures that a later attempt may not meet: the server down, restarting, or slow. A wrong
/// configuration (TLS refused, not a socketcomm server) fails the same way every time.
fn is_worth_retrying(e: &Error) -> bool {
    matches!(e, Error::Io { .. } | Error::Timeout(_) | Error::Closed(_))
}
