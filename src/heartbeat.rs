//! Heartbeats on a framed connection, for both ends: a PING every `ping_interval`; a peer from
//! which nothing at all arrives for `ping_timeout` after a ping is judged gone (a cut cable, a
//! NAT that forgot the flow: nothing else would notice, since no FIN ever comes). The round
//! trip of each answered ping is the connection's latency.
//!
//! NOTE: anything from the peer counts as a sign of life, not only the PONG: a peer that is
//! sending a large file may have our PONG queued behind megabytes of chunks, and one that is
//! receiving ours may have our PING queued as far behind, sending nothing meanwhile but TCP
//! acknowledgements. So bytes count, and on Linux so do more of our bytes acknowledged
//! (`TCP_INFO`): a peer whose application still reads what we send is alive. A cut cable or a
//! forgotten NAT flow brings neither, and a peer whose process hangs stops acknowledging once
//! its receive window is full.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, ReadBuf};
use tokio::time::{Instant, Sleep};

/// A socket's descriptor where there is one to ask the kernel about.
#[cfg(unix)]
pub(crate) type RawFd = std::os::fd::RawFd;
#[cfg(not(unix))]
pub(crate) type RawFd = i32;

use crate::config::Pings;
use crate::connection::ConnState;
use crate::error::CloseInfo;
use crate::frame::{CloseCode, Frame};

/// How many looks at the peer's silence one `ping_timeout` is split into: a peer is dropped at
/// most a quarter of the timeout late.
const LOOKS_PER_TIMEOUT: u32 = 4;

/// The round trip of the last answered ping, kept in the connection's shared state.
#[derive(Debug)]
pub(crate) struct Latency(AtomicU64);

/// Stored for "not measured yet".
const UNMEASURED: u64 = u64::MAX;

impl Default for Latency {
    fn default() -> Latency {
        Latency(AtomicU64::new(UNMEASURED))
    }
}

impl Latency {
    pub(crate) fn get(&self) -> Option<Duration> {
        match self.0.load(Ordering::Relaxed) {
            UNMEASURED => None,
            nanos => Some(Duration::from_nanos(nanos)),
        }
    }

    fn set(&self, round_trip: Duration) {
        let nanos = u64::try_from(round_trip.as_nanos()).unwrap_or(UNMEASURED - 1);
        self.0.store(nanos, Ordering::Relaxed);
    }
}

/// What the heartbeat asks of the connection's loop when its timer fires.
pub(crate) enum Beat {
    /// Send this PING.
    Ping(Frame),
    /// The peer is gone: close the connection for this reason.
    Gone(CloseInfo),
}

/// One connection's heartbeat: a single timer, moved only once per ping, never per message.
pub(crate) struct Heartbeat {
    /// With pings: their settings and the timer (boxed: `Sleep` is not `Unpin`). A connection
    /// without them holds no timer at all.
    armed: Option<(Pings, Pin<Box<Sleep>>)>,
    /// The ping waiting for its PONG, and when it was sent.
    outstanding: Option<(u64, Instant)>,
    next_token: u64,
    /// How long nothing has arrived while a ping is outstanding.
    silent: Duration,
    /// Set by the reader whenever bytes arrive; taken at each look.
    heard: Arc<AtomicBool>,
    /// Where the latency goes.
    state: Arc<ConnState>,
    acks: AckProbe,
}

impl Heartbeat {
    /// A heartbeat with `pings`; without an interval it never pings and never fires.
    ///
    /// `fd` is the connection's TCP socket; it must stay open as long as the heartbeat.
    pub(crate) fn new(pings: Pings, state: Arc<ConnState>, fd: Option<RawFd>) -> Heartbeat {
        let armed = pings
            .interval
            .map(|first| (pings, Box::pin(tokio::time::sleep(first))));
        Heartbeat {
            armed,
            outstanding: None,
            next_token: 1,
            silent: Duration::ZERO,
            heard: Arc::default(),
            state,
            acks: AckProbe { fd, acked: 0 },
        }
    }

    /// Whether it ever fires; poll [`Heartbeat::beat`] only then.
    pub(crate) fn armed(&self) -> bool {
        self.armed.is_some()
    }

    /// Bytes arrived from the peer.
    pub(crate) fn heard(&self) {
        self.heard.store(true, Ordering::Relaxed);
    }

    /// The peer answered a ping.
    pub(crate) fn pong(&mut self, token: u64) {
        let (Some((expected, sent)), Some((pings, sleep))) = (self.outstanding, &mut self.armed)
        else {
            return;
        };
        if token != expected {
            return;
        }
        self.state.latency().set(sent.elapsed());
        self.outstanding = None;
        if let Some(interval) = pings.interval {
            sleep.as_mut().reset(sent + interval);
        }
    }

    /// Ready once the timer has fired, without acting on it: [`Heartbeat::beat`] does, next.
    /// Never without pings.
    pub(crate) fn poll_due(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match &mut self.armed {
            Some((_, sleep)) => sleep.as_mut().poll(cx),
            None => Poll::Pending,
        }
    }

    /// Completes when a ping is due or the peer is judged gone; never without pings.
    ///
    /// # Cancel safety
    /// Cancel safe: its state changes only once the timer has fired.
    pub(crate) async fn beat(&mut self) -> Beat {
        let Some((Pings { interval, timeout }, sleep)) = &mut self.armed else {
            return std::future::pending().await;
        };
        let (interval, timeout) = (interval.unwrap_or(Duration::MAX), *timeout);
        loop {
            sleep.as_mut().await;
            let now = Instant::now();
            let heard = self.heard.swap(false, Ordering::Relaxed);
            if self.outstanding.is_none() {
                let token = self.next_token;
                self.next_token = self.next_token.wrapping_add(1);
                self.outstanding = Some((token, now));
                self.silent = Duration::ZERO;
                self.acks.more();
                match timeout {
                    Some(timeout) => sleep.as_mut().reset(now + look(timeout)),
                    // Pings for the latency only: the next one goes out on time either way.
                    None => sleep.as_mut().reset(now + interval),
                }
                return Beat::Ping(Frame::Ping(token));
            }
            let Some(timeout) = timeout else {
                // No answer to the last ping, and no timeout: ping again.
                self.outstanding = None;
                continue;
            };
            if self.acks.more() | heard {
                self.silent = Duration::ZERO;
            } else {
                self.silent += look(timeout);
            }
            if self.silent >= timeout {
                return Beat::Gone(CloseInfo::new(
                    Some(CloseCode::PING_TIMEOUT),
                    format!(
                        "the peer sent nothing for {timeout:?} after a ping (ping_timeout): it \
                         is unreachable or gone"
                    ),
                ));
            }
            sleep.as_mut().reset(now + look(timeout));
        }
    }
}

/// A reader that tells a heartbeat whenever bytes arrive (for a connection whose reads happen
/// out of the heartbeat's sight, inside a codec).
pub(crate) struct Heard<R> {
    inner: R,
    heard: Arc<AtomicBool>,
}

impl<R> Heard<R> {
    pub(crate) fn new(inner: R, heartbeat: &Heartbeat) -> Heard<R> {
        Heard {
            inner,
            heard: Arc::clone(&heartbeat.heard),
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Heard<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.heard.store(true, Ordering::Relaxed);
        }
        polled
    }
}

/// More than this many bytes acknowledged between two looks count as the peer reading.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const ACKED_SIGN_OF_LIFE: u64 = 256;

/// Asks the kernel how much of what we sent the peer has acknowledged.
struct AckProbe {
    #[cfg_attr(not(all(target_os = "linux", target_env = "gnu")), allow(dead_code))]
    fd: Option<RawFd>,
    /// That count at the last look.
    acked: u64,
}

impl AckProbe {
    /// Whether the peer acknowledged more of our bytes since the last look (Linux, glibc).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn more(&mut self) -> bool {
        let Some(fd) = self.fd else {
            return false;
        };
        // SAFETY: tcp_info is plain data, for which all zeroes is a valid value.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        // SAFETY: `fd` is the connection's open socket (see `new`); `info` and `len` are
        // valid for writes of the size given.
        let got = unsafe {
            libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                std::ptr::addr_of_mut!(info).cast(),
                &mut len,
            )
        };
        if got != 0 {
            return false;
        }
        let before = std::mem::replace(&mut self.acked, info.tcpi_bytes_acked);
        // NOTE: the acknowledgement of our own PING (and of a TLS record around it) is not
        // a sign of life: a host that has lost the peer's application (a proxy, a NAT box)
        // may still acknowledge it. A peer taking a transfer moves far more than this.
        info.tcpi_bytes_acked > before + ACKED_SIGN_OF_LIFE
    }

    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    fn more(&mut self) -> bool {
        false
    }
}

fn look(timeout: Duration) -> Duration {
    timeout / LOOKS_PER_TIMEOUT
}
