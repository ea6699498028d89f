//! The backplane: Redis pub/sub joining the servers of several processes (and machines) into
//! one set of rooms. Each server delivers a publish or broadcast to its own connections at
//! once, and hands it to Redis for the others; what comes back from Redis is delivered to this
//! server's connections, unless this server sent it (each server has a random node id, so a
//! message is delivered once, never echoed).
//!
//! One channel carries everything; a node receives every publication and keeps those with
//! local members. While Redis is away a server keeps serving its own rooms: what it would have
//! handed to the others is dropped and counted (at most once, never late), and it connects
//! again with backoff and subscribes again.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Hub;
use crate::error::{Error, Result};

/// The Redis channel every socketcomm server publishes to and subscribes to.
const CHANNEL: &str = "socketcomm:rooms";

/// What an envelope starts with: its format, so that anything else on the channel is ignored.
const MAGIC: &[u8; 4] = b"SCB1";

/// Publications waiting for Redis; beyond them (Redis slow or away) they are dropped.
const OUTGOING: usize = 4096;

/// The first wait before connecting again, doubled after each failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What a publication asks of the other servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Reach {
    /// Every connection in a room the topic matches.
    Room(Arc<str>),
    /// Every connection.
    Everyone,
}

/// Counters of the backplane, for `stats()`.
#[derive(Debug, Default)]
pub(super) struct BackplaneCounters {
    pub(super) connected: AtomicBool,
    pub(super) published: AtomicU64,
    pub(super) received: AtomicU64,
    pub(super) dropped: AtomicU64,
}

/// A server's link to Redis.
pub(super) struct Backplane {
    client: redis::Client,
    /// Where the link is, for the log (the URL without its password).
    shown: String,
    node: [u8; 16],
    outgoing: mpsc::Sender<Bytes>,
    unstarted: std::sync::Mutex<Option<mpsc::Receiver<Bytes>>>,
    pub(super) counters: BackplaneCounters,
}

impl Backplane {
    /// A link to the Redis at `url` (`redis://host:port/db`); nothing connects before
    /// [`Backplane::start`].
    ///
    /// # Errors
    /// [`Error::InvalidOption`] for a URL Redis's client cannot use.
    pub(super) fn new(url: &str) -> Result<Backplane> {
        let client = redis::Client::open(url)
            .map_err(|e| Error::invalid("backplane", format!("{url:?}: {e}")))?;
        let info = client.get_connection_info();
        let shown = format!("redis://{}/{}", info.addr, info.redis.db);
        let (outgoing, unstarted) = mpsc::channel(OUTGOING);
        let mut node = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut node)
            .map_err(|_| Error::invalid("backplane", "no randomness for the node id"))?;
        Ok(Backplane {
            client,
            shown,
            node,
            outgoing,
            unstarted: std::sync::Mutex::new(Some(unstarted)),
            counters: BackplaneCounters::default(),
        })
    }

    /// Hands `data` to the other servers, for `reach`; dropped (and counted) when Redis is
    /// away or behind by [`OUTGOING`] publications.
    pub(super) fn send(&self, reach: &Reach, data: &Bytes) {
        if !self.counters.connected.load(Ordering::Relaxed)
            || self.outgoing.try_send(self.envelope(reach, data)).is_err()
        {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn envelope(&self, reach: &Reach, data: &Bytes) -> Bytes {
        let room = match reach {
            Reach::Room(room) => room.as_bytes(),
            Reach::Everyone => &[],
        };
        let mut out = BytesMut::with_capacity(MAGIC.len() + 16 + 2 + room.len() + data.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.node);
        out.put_u8(u8::from(matches!(reach, Reach::Room(_))));
        // A room name is at most 255 bytes (topic::MAX_TOPIC_LEN).
        out.put_u8(room.len() as u8);
        out.extend_from_slice(room);
        out.extend_from_slice(data);
        out.freeze()
    }

    /// What another server published: `None` for our own publications and anything that is
    /// not an envelope.
    fn open(&self, mut envelope: Bytes) -> Option<(Reach, Bytes)> {
        if envelope.len() < MAGIC.len() + 16 + 2 || &envelope[..4] != MAGIC {
            return None;
        }
        envelope.advance(MAGIC.len());
        if envelope[..16] == self.node {
            return None;
        }
        envelope.advance(16);
        let to_room = envelope.get_u8() == 1;
        let len = usize::from(envelope.get_u8());
        if envelope.len() < len {
            return None;
        }
        let room = envelope.split_to(len);
        let reach = if to_room {
            Reach::Room(Arc::from(std::str::from_utf8(&room).ok()?))
        } else {
            Reach::Everyone
        };
        Some((reach, envelope))
    }

    /// Starts the tasks that publish and subscribe, on the current runtime, until `stop`.
    pub(super) fn start(self: &Arc<Self>, hub: Weak<Hub>, stop: CancellationToken) {
        let Some(outgoing) = crate::sync::lock(&self.unstarted).take() else {
            return;
        };
        tokio::spawn(Arc::clone(self).publish(outgoing, stop.clone()));
        tokio::spawn(Arc::clone(self).subscribe(hub, stop));
    }

    /// Publishes what [`Backplane::send`] queued, connecting (again) as needed.
    async fn publish(
        self: Arc<Self>,
        mut outgoing: mpsc::Receiver<Bytes>,
        stop: CancellationToken,
    ) {
        let mut connection = None;
        loop {
            let envelope = tokio::select! {
                () = stop.cancelled() => return,
                envelope = outgoing.recv() => match envelope {
                    Some(envelope) => envelope,
                    None => return,
                },
            };
            // NOTE: a second try on a new connection: the one kept may have died with a Redis
            // that went away and came back, which only the first publish since then finds out.
            let mut sent = false;
            for _ in 0..2 {
                if connection.is_none() {
                    connection = self.client.get_multiplexed_async_connection().await.ok();
                }
                let Some(link) = connection.as_mut() else {
                    break;
                };
                let published: redis::RedisResult<()> = redis::cmd("PUBLISH")
                    .arg(CHANNEL)
                    .arg(&envelope[..])
                    .query_async(link)
                    .await;
                match published {
                    Ok(()) => {
                        sent = true;
                        break;
                    }
                    Err(e) => {
                        log::debug!("backplane {}: a publish failed: {e}", self.shown);
                        connection = None;
                    }
                }
            }
            let counter = if sent {
                &self.counters.published
            } else {
                &self.counters.dropped
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Subscribes to the channel and delivers what other servers publish, connecting again
    /// with backoff whenever the link is lost.
    async fn subscribe(self: Arc<Self>, hub: Weak<Hub>, stop: CancellationToken) {
        let mut backoff = FIRST_BACKOFF;
        let mut lost_logged = false;
        loop {
            let linked = tokio::select! {
                () = stop.cancelled() => return,
                linked = self.link() => linked,
            };
            let mut pubsub = match linked {
                Ok(pubsub) => pubsub,
                Err(e) => {
                    if !lost_logged {
                        log::warn!(
                            "backplane {}: cannot connect ({e}); serving this server's rooms \
                             alone, and trying again",
                            self.shown
                        );
                        lost_logged = true;
                    }
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            backoff = FIRST_BACKOFF;
            self.counters.connected.store(true, Ordering::Relaxed);
            log::info!("backplane {}: connected", self.shown);
            let mut messages = pubsub.on_message();
            loop {
                let message = tokio::select! {
                    () = stop.cancelled() => return,
                    message = messages.next() => message,
                };
                let Some(message) = message else {
                    break;
                };
                let Some(hub) = hub.upgrade() else {
                    return;
                };
                let Ok(envelope) = message.get_payload::<Vec<u8>>() else {
                    continue;
                };
                if let Some((reach, data)) = self.open(Bytes::from(envelope)) {
                    self.counters.received.fetch_add(1, Ordering::Relaxed);
                    hub.deliver_locally(&reach, data).await;
                }
            }
            self.counters.connected.store(false, Ordering::Relaxed);
            log::warn!(
                "backplane {}: the link to Redis was lost; serving this server's rooms alone \
                 until it is back",
                self.shown
            );
            lost_logged = true;
        }
    }

    async fn link(&self) -> redis::RedisResult<redis::aio::PubSub> {
        let mut pubsub = self.client.get_async_pubsub().await?;
        pubsub.subscribe(CHANNEL).await?;
        Ok(pubsub)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_envelope_opens_elsewhere_and_not_at_home() {
        let home = Backplane::new("redis://127.0.0.1:1/0").unwrap();
        let elsewhere = Backplane::new("redis://127.0.0.1:1/0").unwrap();
        let data = Bytes::from_static(b"hello");
        for reach in [Reach::Room(Arc::from("chat.lobby")), Reach::Everyone] {
            let envelope = home.envelope(&reach, &data);
            assert_eq!(home.open(envelope.clone()), None, "never echoed");
            assert_eq!(elsewhere.open(envelope), Some((reach, data.clone())));
        }
        assert_eq!(elsewhere.open(Bytes::from_static(b"not an envelope")), None);
        assert!(Backplane::new("not a url").is_err());
    }
}
