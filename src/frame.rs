//! The framed wire protocol: the hello both sides exchange, the frame types and the codec.
//!
//! Pure parsing with no I/O, in the manner of mini-redis' `frame.rs`: the decoder checks that a
//! whole frame is buffered (and that its declared length is within `max_frame`, before reserving
//! any memory), then parses it and advances the buffer. `docs/protocol.md` describes the same
//! format byte by byte; keep the two in step.

use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::error::FrameError;

/// The four bytes every framed connection starts with. The first byte is not printable ASCII so
/// that no text-speaking plain-socket client is mistaken for a framed one (the idea of PNG's
/// signature).
pub const MAGIC: [u8; 4] = [0x89, b'S', b'C', b'M'];

/// The highest protocol version this build speaks. Peers announce a range, so a later version
/// can be added without breaking earlier peers: version 2 adds topics (SUBSCRIBE, UNSUBSCRIBE,
/// PUBLISH, TOPIC_ACK); a connection that settles on version 1 never carries them.
pub const PROTOCOL_VERSION: u8 = 2;

/// The lowest protocol version this build speaks.
pub const MIN_PROTOCOL_VERSION: u8 = 1;

/// The first version with topic frames.
pub const TOPICS_VERSION: u8 = 2;

/// Length of the hello in bytes: magic (4), two version bytes, flags (u16), max_frame (u32).
pub const HELLO_LEN: usize = 12;

/// Length of the length prefix in front of every frame.
pub const LENGTH_PREFIX: usize = 4;

/// The default upper bound on a frame's declared length (type byte and payload), 16 MiB.
pub const DEFAULT_MAX_FRAME: u32 = 16 * 1024 * 1024;

/// The first message on a framed connection, in each direction.
///
/// The client sends the range of versions it speaks; the server answers with the version chosen
/// (`min_version == max_version`), or with `min_version == 0` when it speaks none of them.
/// Each side also says the largest frame it accepts, so a sender can refuse an oversized message
/// locally, before a byte of it is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    pub min_version: u8,
    pub max_version: u8,
    pub max_frame: u32,
}

impl Hello {
    /// The hello a client of this build sends.
    pub fn client(max_frame: u32) -> Hello {
        Hello {
            min_version: MIN_PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            max_frame,
        }
    }

    /// The server's answer to `offered`: the highest version both speak, or a refusal.
    pub fn answer(offered: &Hello, max_frame: u32) -> Hello {
        let highest = offered.max_version.min(PROTOCOL_VERSION);
        let lowest = offered.min_version.max(MIN_PROTOCOL_VERSION);
        let version = if lowest <= highest { highest } else { 0 };
        Hello {
            min_version: version,
            max_version: if version == 0 {
                PROTOCOL_VERSION
            } else {
                version
            },
            max_frame,
        }
    }

    /// A server's answer that refuses the connection (a close frame follows with the reason).
    pub fn refusal(max_frame: u32) -> Hello {
        Hello {
            min_version: 0,
            max_version: PROTOCOL_VERSION,
            max_frame,
        }
    }

    /// The version this hello settles on, when it is a server's answer.
    pub fn agreed_version(&self) -> Option<u8> {
        (self.min_version != 0 && self.min_version == self.max_version).then_some(self.min_version)
    }

    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut out = [0u8; HELLO_LEN];
        out[..4].copy_from_slice(&MAGIC);
        out[4] = self.min_version;
        out[5] = self.max_version;
        // out[6..8]: flags, all reserved and zero in version 1.
        out[8..].copy_from_slice(&self.max_frame.to_be_bytes());
        out
    }

    /// Parses a hello from exactly [`HELLO_LEN`] bytes.
    ///
    /// # Errors
    /// [`FrameError::BadHello`] when the bytes do not start with [`MAGIC`], the version range is
    /// empty, or `max_frame` is below [`MIN_MAX_FRAME`].
    pub fn decode(bytes: &[u8; HELLO_LEN]) -> Result<Hello, FrameError> {
        if bytes[..4] != MAGIC {
            return Err(FrameError::BadHello(format!(
                "expected the socketcomm magic {MAGIC:02x?}, got {:02x?}",
                &bytes[..4]
            )));
        }
        let hello = Hello {
            min_version: bytes[4],
            max_version: bytes[5],
            max_frame: u32::from_be_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]),
        };
        if hello.max_frame < MIN_MAX_FRAME {
            return Err(FrameError::BadHello(format!(
                "max_frame of {} bytes is below the minimum of {MIN_MAX_FRAME}",
                hello.max_frame
            )));
        }
        if hello.min_version > hello.max_version {
            return Err(FrameError::BadHello(format!(
                "version range {}..={} is empty",
                hello.min_version, hello.max_version
            )));
        }
        Ok(hello)
    }
}

/// How the first bytes a server receives classify the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniff {
    /// The bytes so far are a prefix of the hello: wait for more.
    NeedMore,
    /// A complete hello magic: a socketcomm client.
    Framed,
    /// Anything else: a plain-socket client, served in raw mode.
    Raw,
}

/// Classifies a connection by the bytes received so far, without any timeout: a plain client
/// diverges from [`MAGIC`] at its first byte in practice, so raw clients are served at once.
pub fn sniff(received: &[u8]) -> Sniff {
    let seen = received.len().min(MAGIC.len());
    if received[..seen] != MAGIC[..seen] {
        Sniff::Raw
    } else if received.len() >= HELLO_LEN {
        Sniff::Framed
    } else {
        Sniff::NeedMore
    }
}

/// Whether the first bytes from a client are a TLS record carrying a handshake (a ClientHello):
/// a TLS client that came to a plaintext port.
pub fn looks_like_tls(received: &[u8]) -> bool {
    matches!(received, [0x16, 0x03, ..])
}

/// Why a connection was closed, carried by a [`Frame::Close`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CloseCode(pub u16);

impl CloseCode {
    /// The sender is done; nothing went wrong.
    pub const NORMAL: CloseCode = CloseCode(1000);
    /// The server is shutting down.
    pub const GOING_AWAY: CloseCode = CloseCode(1001);
    /// The peer broke the protocol (a bad hello, an unknown frame type, a malformed frame).
    pub const PROTOCOL_ERROR: CloseCode = CloseCode(1002);
    /// The peer offered no protocol version this side speaks.
    pub const UNSUPPORTED_VERSION: CloseCode = CloseCode(1003);
    /// The peer declared a frame longer than this side's `max_frame`.
    pub const FRAME_TOO_LARGE: CloseCode = CloseCode(1004);
    /// The server is at `max_connections`.
    pub const SERVER_FULL: CloseCode = CloseCode(1005);
    /// The connection was idle for longer than the server's `idle_timeout`.
    pub const IDLE_TIMEOUT: CloseCode = CloseCode(1006);
    /// The client did not read fast enough to keep up with a broadcast.
    pub const SLOW_READER: CloseCode = CloseCode(1007);
    /// The server serves TLS only, and the client spoke plaintext.
    pub const TLS_REQUIRED: CloseCode = CloseCode(1008);
    /// Nothing arrived from the peer for `ping_timeout` after a ping. The peer is most likely
    /// unreachable, so this code is mostly seen on the side that gave up.
    pub const PING_TIMEOUT: CloseCode = CloseCode(1009);
    /// The server holds as much of its clients' data as it may (`max_buffered`) and found no
    /// room for the rest of a large frame in time. Sending it again later may work.
    pub const SERVER_BUSY: CloseCode = CloseCode(1010);
}

/// Frame type bytes. 0x10..=0x1F belong to file transfer, 0x40..=0x7F are reserved for later
/// versions.
pub mod kind {
    pub const DATA: u8 = 0x01;
    pub const REQUEST: u8 = 0x02;
    pub const REPLY: u8 = 0x03;
    pub const FILE_OFFER: u8 = 0x10;
    pub const FILE_ACCEPT: u8 = 0x11;
    pub const FILE_CHUNK: u8 = 0x12;
    pub const FILE_END: u8 = 0x13;
    pub const FILE_RESULT: u8 = 0x14;
    pub const FILE_CANCEL: u8 = 0x15;
    pub const PING: u8 = 0x20;
    pub const PONG: u8 = 0x21;
    pub const CLOSE: u8 = 0x30;
    pub const SUBSCRIBE: u8 = 0x40;
    pub const UNSUBSCRIBE: u8 = 0x41;
    pub const PUBLISH: u8 = 0x42;
    pub const TOPIC_ACK: u8 = 0x43;
}

/// One frame of the framed protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A message that expects no particular answer.
    Data(Bytes),
    /// A message whose answer is a [`Frame::Reply`] carrying the same `id`.
    Request {
        id: u32,
        body: Bytes,
    },
    /// The answer to the [`Frame::Request`] with this `id`.
    Reply {
        id: u32,
        body: Bytes,
    },
    /// The sender offers a file of `size` bytes under `name` (a base name, UTF-8); `resume`
    /// allows the receiver to continue a partial copy it holds, the one kept under `token`
    /// (which that receiver handed out in an earlier [`Frame::FileAccept`]). Answered by a
    /// [`Frame::FileAccept`] or, when refused, a [`Frame::FileResult`].
    FileOffer {
        id: u32,
        size: u64,
        resume: bool,
        token: Option<ResumeToken>,
        name: String,
    },
    /// The receiver takes the file from byte `offset` on; `prefix` is the BLAKE3 digest of the
    /// `offset` bytes it already holds (all zero when `offset` is 0), for the sender to check;
    /// `token` names the partial copy for a later resume (absent from receivers that predate
    /// tokens).
    FileAccept {
        id: u32,
        offset: u64,
        prefix: Digest,
        token: Option<ResumeToken>,
    },
    /// The next bytes of the file.
    FileChunk {
        id: u32,
        data: Bytes,
    },
    /// A FILE_CHUNK whose data is `len` bytes of a file from `offset`, read when the frame is
    /// written: with `sendfile` straight from the page cache to the socket on a plain TCP
    /// connection (no copy through user space). Only ever sent; it decodes as a
    /// [`Frame::FileChunk`].
    FileRange {
        id: u32,
        range: FileRange,
    },
    /// Every byte was sent; `digest` is the BLAKE3 digest of the whole file.
    FileEnd {
        id: u32,
        digest: Digest,
    },
    /// The receiver's verdict: `status` 0 with the digest it computed and the name it saved
    /// the file under, or a failure with a sentence saying why.
    FileResult {
        id: u32,
        status: TransferStatus,
        digest: Digest,
        text: String,
    },
    /// The sender abandons the transfer (the receiver keeps what it has, for a resume).
    FileCancel {
        id: u32,
        reason: String,
    },
    /// Asks the peer to answer with a [`Frame::Pong`] carrying the same token.
    Ping(u64),
    Pong(u64),
    /// The sender closes the connection, and says why.
    Close {
        code: CloseCode,
        reason: String,
    },
    /// A client asks to be in the rooms `pattern` matches (a topic name or a pattern); the
    /// server answers with a [`Frame::TopicAck`] carrying the same `id`. Version 2.
    Subscribe {
        id: u32,
        pattern: String,
    },
    /// A client asks to leave what `pattern` (as subscribed) joined; answered as
    /// [`Frame::Subscribe`]. Version 2.
    Unsubscribe {
        id: u32,
        pattern: String,
    },
    /// A message on `topic`: from a client, published to it; from a server, delivered because
    /// the client is in a room that `topic` matches. Version 2.
    Publish {
        topic: Arc<str>,
        body: Bytes,
    },
    /// The server's answer to a [`Frame::Subscribe`] or [`Frame::Unsubscribe`]. Version 2.
    TopicAck {
        id: u32,
        status: TopicStatus,
        reason: String,
    },
}

/// What became of a SUBSCRIBE or UNSUBSCRIBE ([`Frame::TopicAck`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicStatus(pub u8);

impl TopicStatus {
    /// Done: subscribed, or unsubscribed.
    pub const DONE: TopicStatus = TopicStatus(0);
    /// Nothing changed: subscribed already, or was not subscribed.
    pub const UNCHANGED: TopicStatus = TopicStatus(1);
    /// The name or pattern breaks the naming rules.
    pub const BAD_NAME: TopicStatus = TopicStatus(2);
    /// The server's application refused the subscription.
    pub const REFUSED: TopicStatus = TopicStatus(3);
}

/// A BLAKE3 digest.
pub type Digest = [u8; 32];

/// A receiver's name for one sender's partial copy of a file: a secret (random, 16 bytes) that
/// only the sender it was handed to knows, so that no other client can continue that copy or
/// learn how much of it is held.
pub type ResumeToken = [u8; RESUME_TOKEN_LEN];

/// Length of a [`ResumeToken`] in bytes.
pub const RESUME_TOKEN_LEN: usize = 16;

/// FILE_OFFER flags: resuming is allowed.
const OFFER_RESUME: u8 = 1;
/// FILE_OFFER flags: a resume token follows the flags.
const OFFER_TOKEN: u8 = 2;

/// Bytes of an open file, for a [`Frame::FileRange`].
#[derive(Clone)]
pub struct FileRange {
    pub file: std::sync::Arc<std::fs::File>,
    pub offset: u64,
    pub len: u32,
    /// Held until the frame is written and dropped: how a sender bounds the data it has queued.
    pub guard: Option<std::sync::Arc<dyn std::any::Any + Send + Sync>>,
}

impl std::fmt::Debug for FileRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileRange")
            .field("offset", &self.offset)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl PartialEq for FileRange {
    fn eq(&self, other: &FileRange) -> bool {
        std::sync::Arc::ptr_eq(&self.file, &other.file)
            && (self.offset, self.len) == (other.offset, other.len)
    }
}

impl Eq for FileRange {}

/// The size of a [`Digest`] on the wire.
pub const DIGEST_LEN: usize = 32;

/// The outcome of a file transfer, carried by a [`Frame::FileResult`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TransferStatus(pub u16);

impl TransferStatus {
    /// Saved under the name in the result, with the digest in it.
    pub const OK: TransferStatus = TransferStatus(0);
    /// The receiver takes no files (no `upload_dir` / `download_dir`).
    pub const REFUSED: TransferStatus = TransferStatus(1);
    /// The name is not a usable file name (empty, only dots, a NUL byte, too long).
    pub const BAD_NAME: TransferStatus = TransferStatus(2);
    /// The size is over the receiver's `max_file_size`.
    pub const TOO_LARGE: TransferStatus = TransferStatus(3);
    /// The receiver has less free space than the file needs.
    pub const NO_SPACE: TransferStatus = TransferStatus(4);
    /// The bytes that arrived do not have the sender's digest; nothing was kept.
    pub const DIGEST_MISMATCH: TransferStatus = TransferStatus(5);
    /// The receiver could not write the file.
    pub const IO_ERROR: TransferStatus = TransferStatus(6);
    /// The sender broke the transfer's rules (more or fewer bytes than offered).
    pub const BAD_TRANSFER: TransferStatus = TransferStatus(7);
    /// The receiver is shutting down.
    pub const GOING_AWAY: TransferStatus = TransferStatus(8);
    /// Too many transfers are in progress (from this sender, or in all); try again later.
    pub const BUSY: TransferStatus = TransferStatus(9);

    pub fn is_ok(self) -> bool {
        self == TransferStatus::OK
    }

    /// A short name for logs and exceptions.
    pub fn name(self) -> &'static str {
        match self {
            TransferStatus::OK => "ok",
            TransferStatus::REFUSED => "refused",
            TransferStatus::BAD_NAME => "bad_name",
            TransferStatus::TOO_LARGE => "too_large",
            TransferStatus::NO_SPACE => "no_space",
            TransferStatus::DIGEST_MISMATCH => "digest_mismatch",
            TransferStatus::IO_ERROR => "io_error",
            TransferStatus::BAD_TRANSFER => "bad_transfer",
            TransferStatus::GOING_AWAY => "going_away",
            TransferStatus::BUSY => "busy",
            _ => "unknown",
        }
    }
}

/// Bytes a [`Frame::FileChunk`] spends before its data: type byte and transfer id.
pub const FILE_CHUNK_OVERHEAD: usize = 1 + 4;

impl Frame {
    /// A close frame, its reason cut at a character boundary to [`MAX_CLOSE_REASON`] bytes.
    pub fn close(code: CloseCode, reason: &str) -> Frame {
        let mut end = reason.len().min(MAX_CLOSE_REASON);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        Frame::Close {
            code,
            reason: reason[..end].to_owned(),
        }
    }

    /// The value of the length prefix this frame is written with (type byte, header, payload).
    pub fn encoded_len(&self) -> usize {
        1 + match self {
            Frame::Data(body) => body.len(),
            Frame::Request { body, .. } | Frame::Reply { body, .. } => 4 + body.len(),
            Frame::FileOffer { name, token, .. } => {
                4 + 8 + 1 + token.map_or(0, |t| t.len()) + name.len()
            }
            Frame::FileAccept { token, .. } => 4 + 8 + DIGEST_LEN + token.map_or(0, |t| t.len()),
            Frame::FileChunk { data, .. } => 4 + data.len(),
            Frame::FileRange { range, .. } => 4 + range.len as usize,
            Frame::FileEnd { .. } => 4 + DIGEST_LEN,
            Frame::FileResult { text, .. } => 4 + 2 + DIGEST_LEN + text.len(),
            Frame::FileCancel { reason, .. } => 4 + reason.len(),
            Frame::Ping(_) | Frame::Pong(_) => 8,
            Frame::Close { reason, .. } => 2 + reason.len(),
            Frame::Subscribe { pattern, .. } | Frame::Unsubscribe { pattern, .. } => {
                4 + pattern.len()
            }
            Frame::Publish { topic, body } => 1 + topic.len() + body.len(),
            Frame::TopicAck { reason, .. } => 4 + 1 + reason.len(),
        }
    }

    /// Whether the frame exists only from protocol version 2 on (topics).
    pub fn needs_topics(&self) -> bool {
        matches!(
            self,
            Frame::Subscribe { .. }
                | Frame::Unsubscribe { .. }
                | Frame::Publish { .. }
                | Frame::TopicAck { .. }
        )
    }
}

/// The smallest `max_frame` a peer may announce: a close frame with its reason always fits.
pub const MIN_MAX_FRAME: u32 = 256;

/// Close reasons are cut to this many bytes so that they fit under [`MIN_MAX_FRAME`].
pub const MAX_CLOSE_REASON: usize = 240;

/// Encodes and decodes [`Frame`]s; `max_frame` bounds what the decoder accepts.
#[derive(Debug, Clone)]
pub struct FrameCodec {
    max_frame: u32,
}

impl FrameCodec {
    pub fn new(max_frame: u32) -> FrameCodec {
        FrameCodec { max_frame }
    }

    pub fn max_frame(&self) -> u32 {
        self.max_frame
    }
}

impl FrameCodec {
    /// Checks the frame at the start of `src` without consuming it: `Some((total, type))` when
    /// it is all buffered (`total` counts the length prefix), `None` when more bytes are needed
    /// (room for more is reserved: as much as has arrived, at least 64 KiB, never beyond the
    /// frame).
    ///
    /// # Errors
    /// [`FrameError::TooLarge`] for a declared length over `max_frame`, checked before any
    /// allocation; [`FrameError::Malformed`] for a length of 0.
    pub fn peek(&self, src: &mut BytesMut) -> Result<Option<(usize, u8)>, FrameError> {
        let whole = self.check(src)?;
        if whole.is_none() && src.len() >= LENGTH_PREFIX {
            let total = LENGTH_PREFIX + declared_length(src) as usize;
            // NOTE: a declared length is a promise, not bytes: room grows with what has really
            // arrived (at most doubling), so a peer cannot make this side reserve `max_frame`
            // for five bytes. A large frame costs a few reallocations on the way.
            let step = src.len().max(FIRST_RESERVE);
            src.reserve((total - src.len()).min(step));
        }
        Ok(whole)
    }

    /// [`FrameCodec::peek`] on bytes, reserving nothing.
    ///
    /// # Errors
    /// As [`FrameCodec::peek`].
    pub fn check(&self, src: &[u8]) -> Result<Option<(usize, u8)>, FrameError> {
        if src.len() < LENGTH_PREFIX {
            return Ok(None);
        }
        let declared = declared_length(src);
        if declared > self.max_frame {
            return Err(FrameError::TooLarge {
                size: u64::from(declared),
                max: self.max_frame,
            });
        }
        if declared == 0 {
            return Err(FrameError::Malformed(
                "a frame of length 0 has no type byte".into(),
            ));
        }
        let total = LENGTH_PREFIX + declared as usize;
        if src.len() < total {
            return Ok(None);
        }
        Ok(Some((total, src[LENGTH_PREFIX])))
    }
}

/// The length a frame's prefix declares (`src` holds at least the prefix).
fn declared_length(src: &[u8]) -> u32 {
    u32::from_be_bytes([src[0], src[1], src[2], src[3]])
}

/// The most room reserved for a frame beyond its first bytes, before more of it arrives.
const FIRST_RESERVE: usize = 64 * 1024;

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        let Some((total, _)) = self.peek(src)? else {
            return Ok(None);
        };
        let declared = total - LENGTH_PREFIX;
        src.advance(LENGTH_PREFIX);
        let mut body = src.split_to(declared).freeze();
        let kind = body.get_u8();
        let frame = match kind {
            kind::DATA => Frame::Data(body),
            kind::REQUEST | kind::REPLY => {
                let id = take_u32(&mut body, kind)?;
                if kind == kind::REQUEST {
                    Frame::Request { id, body }
                } else {
                    Frame::Reply { id, body }
                }
            }
            kind::FILE_OFFER => {
                let id = take_u32(&mut body, kind)?;
                need(&body, kind, 8 + 1)?;
                let size = body.get_u64();
                let flags = body.get_u8();
                let token = if flags & OFFER_TOKEN != 0 {
                    need(&body, kind, RESUME_TOKEN_LEN)?;
                    Some(take_token(&mut body))
                } else {
                    None
                };
                Frame::FileOffer {
                    id,
                    size,
                    resume: flags & OFFER_RESUME != 0,
                    token,
                    name: utf8(body, "file name")?,
                }
            }
            kind::FILE_ACCEPT => {
                let id = take_u32(&mut body, kind)?;
                need(&body, kind, 8 + DIGEST_LEN)?;
                let offset = body.get_u64();
                let prefix = take_digest(&mut body);
                // NOTE: a receiver that predates tokens sends none; bytes beyond a token are
                // left for later versions.
                let token = (body.len() >= RESUME_TOKEN_LEN).then(|| take_token(&mut body));
                Frame::FileAccept {
                    id,
                    offset,
                    prefix,
                    token,
                }
            }
            kind::FILE_CHUNK => Frame::FileChunk {
                id: take_u32(&mut body, kind)?,
                data: body,
            },
            kind::FILE_END => {
                let id = take_u32(&mut body, kind)?;
                need(&body, kind, DIGEST_LEN)?;
                Frame::FileEnd {
                    id,
                    digest: take_digest(&mut body),
                }
            }
            kind::FILE_RESULT => {
                let id = take_u32(&mut body, kind)?;
                need(&body, kind, 2 + DIGEST_LEN)?;
                let status = TransferStatus(body.get_u16());
                let digest = take_digest(&mut body);
                Frame::FileResult {
                    id,
                    status,
                    digest,
                    text: String::from_utf8_lossy(&body).into_owned(),
                }
            }
            kind::FILE_CANCEL => Frame::FileCancel {
                id: take_u32(&mut body, kind)?,
                reason: String::from_utf8_lossy(&body).into_owned(),
            },
            kind::PING | kind::PONG => {
                let token = exact_u64(&body, kind)?;
                if kind == kind::PING {
                    Frame::Ping(token)
                } else {
                    Frame::Pong(token)
                }
            }
            kind::CLOSE => {
                if body.len() < 2 {
                    return Err(FrameError::Malformed(
                        "close frame shorter than its 2-byte code".into(),
                    ));
                }
                let code = CloseCode(body.get_u16());
                let reason = String::from_utf8_lossy(&body).into_owned();
                Frame::Close { code, reason }
            }
            kind::SUBSCRIBE | kind::UNSUBSCRIBE => {
                let id = take_u32(&mut body, kind)?;
                let pattern = utf8(body, "topic")?;
                if kind == kind::SUBSCRIBE {
                    Frame::Subscribe { id, pattern }
                } else {
                    Frame::Unsubscribe { id, pattern }
                }
            }
            kind::PUBLISH => {
                need(&body, kind, 1)?;
                let len = usize::from(body.get_u8());
                need(&body, kind, len)?;
                let topic = utf8(body.split_to(len), "topic")?;
                Frame::Publish {
                    topic: Arc::from(topic),
                    body,
                }
            }
            kind::TOPIC_ACK => {
                let id = take_u32(&mut body, kind)?;
                need(&body, kind, 1)?;
                Frame::TopicAck {
                    id,
                    status: TopicStatus(body.get_u8()),
                    reason: String::from_utf8_lossy(&body).into_owned(),
                }
            }
            other => return Err(FrameError::UnknownType(other)),
        };
        Ok(Some(frame))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => Err(FrameError::Truncated(src.len())),
        }
    }
}

fn take_u32(body: &mut Bytes, kind: u8) -> Result<u32, FrameError> {
    if body.len() < 4 {
        return Err(FrameError::Malformed(format!(
            "frame type {kind:#04x} is shorter than its 4-byte correlation id"
        )));
    }
    Ok(body.get_u32())
}

/// Checks that `body` holds at least `len` more bytes of the fixed fields of a `kind` frame.
fn need(body: &Bytes, kind: u8, len: usize) -> Result<(), FrameError> {
    if body.len() < len {
        return Err(FrameError::Malformed(format!(
            "frame type {kind:#04x} is too short for its fields"
        )));
    }
    Ok(())
}

fn take_token(body: &mut Bytes) -> ResumeToken {
    let mut token = [0u8; RESUME_TOKEN_LEN];
    body.copy_to_slice(&mut token);
    token
}

fn take_digest(body: &mut Bytes) -> Digest {
    let mut digest = [0u8; DIGEST_LEN];
    body.copy_to_slice(&mut digest);
    digest
}

fn utf8(body: Bytes, what: &str) -> Result<String, FrameError> {
    String::from_utf8(body.to_vec())
        .map_err(|_| FrameError::Malformed(format!("the {what} is not valid UTF-8")))
}

fn exact_u64(body: &Bytes, kind: u8) -> Result<u64, FrameError> {
    <[u8; 8]>::try_from(&body[..])
        .map(u64::from_be_bytes)
        .map_err(|_| {
            FrameError::Malformed(format!(
                "frame type {kind:#04x} must carry exactly 8 bytes, got {}",
                body.len()
            ))
        })
}

impl Encoder<Frame> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        encode_frame(&frame, dst);
        Ok(())
    }
}

/// Appends the length prefix, type byte and id of a FILE_CHUNK carrying `len` bytes of data.
pub fn encode_chunk_header(id: u32, len: usize, dst: &mut BytesMut) {
    dst.put_u32((FILE_CHUNK_OVERHEAD + len) as u32);
    dst.put_u8(kind::FILE_CHUNK);
    dst.put_u32(id);
}

fn read_range(range: &FileRange, into: &mut [u8]) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::read_exact_at(&*range.file, into, range.offset)
    }
    #[cfg(not(unix))]
    {
        let _ = (range, into);
        Err(std::io::Error::other("file ranges need a Unix system"))
    }
}

/// Appends `frame` to `dst`, length prefix included. Checking the length against the peer's
/// `max_frame` is the caller's job, done once when the message is accepted for sending.
pub fn encode_frame(frame: &Frame, dst: &mut BytesMut) {
    let len = frame.encoded_len();
    dst.reserve(LENGTH_PREFIX + len);
    dst.put_u32(len as u32);
    match frame {
        Frame::Data(body) => {
            dst.put_u8(kind::DATA);
            dst.extend_from_slice(body);
        }
        Frame::Request { id, body } | Frame::Reply { id, body } => {
            let kind = if matches!(frame, Frame::Request { .. }) {
                kind::REQUEST
            } else {
                kind::REPLY
            };
            dst.put_u8(kind);
            dst.put_u32(*id);
            dst.extend_from_slice(body);
        }
        Frame::FileOffer {
            id,
            size,
            resume,
            token,
            name,
        } => {
            dst.put_u8(kind::FILE_OFFER);
            dst.put_u32(*id);
            dst.put_u64(*size);
            let resume = if *resume { OFFER_RESUME } else { 0 };
            dst.put_u8(resume | if token.is_some() { OFFER_TOKEN } else { 0 });
            if let Some(token) = token {
                dst.extend_from_slice(token);
            }
            dst.extend_from_slice(name.as_bytes());
        }
        Frame::FileAccept {
            id,
            offset,
            prefix,
            token,
        } => {
            dst.put_u8(kind::FILE_ACCEPT);
            dst.put_u32(*id);
            dst.put_u64(*offset);
            dst.extend_from_slice(prefix);
            if let Some(token) = token {
                dst.extend_from_slice(token);
            }
        }
        Frame::FileChunk { id, data } => {
            dst.put_u8(kind::FILE_CHUNK);
            dst.put_u32(*id);
            dst.extend_from_slice(data);
        }
        Frame::FileRange { id, range } => {
            dst.put_u8(kind::FILE_CHUNK);
            dst.put_u32(*id);
            // NOTE: the fallback for writers that cannot `sendfile` (the data is read here, on
            // the writing task); a sender only makes these frames for connections that can.
            let start = dst.len();
            dst.resize(start + range.len as usize, 0);
            if let Err(e) = read_range(range, &mut dst[start..]) {
                // The receiver's digest check will fail the transfer.
                log::error!("cannot read a file being sent: {e}");
            }
        }
        Frame::FileEnd { id, digest } => {
            dst.put_u8(kind::FILE_END);
            dst.put_u32(*id);
            dst.extend_from_slice(digest);
        }
        Frame::FileResult {
            id,
            status,
            digest,
            text,
        } => {
            dst.put_u8(kind::FILE_RESULT);
            dst.put_u32(*id);
            dst.put_u16(status.0);
            dst.extend_from_slice(digest);
            dst.extend_from_slice(text.as_bytes());
        }
        Frame::FileCancel { id, reason } => {
            dst.put_u8(kind::FILE_CANCEL);
            dst.put_u32(*id);
            dst.extend_from_slice(reason.as_bytes());
        }
        Frame::Ping(token) => {
            dst.put_u8(kind::PING);
            dst.put_u64(*token);
        }
        Frame::Pong(token) => {
            dst.put_u8(kind::PONG);
            dst.put_u64(*token);
        }
        Frame::Close { code, reason } => {
            dst.put_u8(kind::CLOSE);
            dst.put_u16(code.0);
            dst.extend_from_slice(reason.as_bytes());
        }
        Frame::Subscribe { id, pattern } | Frame::Unsubscribe { id, pattern } => {
            let kind = if matches!(frame, Frame::Subscribe { .. }) {
                kind::SUBSCRIBE
            } else {
                kind::UNSUBSCRIBE
            };
            dst.put_u8(kind);
            dst.put_u32(*id);
            dst.extend_from_slice(pattern.as_bytes());
        }
        Frame::Publish { topic, body } => {
            dst.put_u8(kind::PUBLISH);
            // A topic is at most 255 bytes (checked where it is named: `topic::check_name`).
            dst.put_u8(topic.len() as u8);
            dst.extend_from_slice(topic.as_bytes());
            dst.extend_from_slice(body);
        }
        Frame::TopicAck { id, status, reason } => {
            dst.put_u8(kind::TOPIC_ACK);
            dst.put_u32(*id);
            dst.put_u8(status.0);
            dst.extend_from_slice(reason.as_bytes());
        }
    }
}
