//! The sending side: offer a file, check the prefix the receiver already holds, then read, hash
//! and queue it chunk by chunk on a blocking thread, and wait for the receiver's verdict.
//!
//! Memory is bounded by a pool of buffers ([`BYTES_IN_FLIGHT`] in all): a chunk's buffer returns to the
//! pool when the connection's writer has copied it out, and reading waits for a free one, so a
//! file of any size costs a few megabytes however slow the receiver is.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::resume::{Book, Entry};
use super::{hex, Answer, Outgoing, Progress, SentFile};
use crate::connection::Outbox;
use crate::error::{Error, Result};
use crate::frame::{Digest, FileRange, Frame, ResumeToken, TransferStatus, FILE_CHUNK_OVERHEAD};

/// The data carried by one chunk frame, at most (less when the peer's `max_frame` is smaller).
const CHUNK: usize = 256 * 1024;

/// The same, when the writer sends chunks with `sendfile`.
///
/// NOTE: measured on loopback (benches/files.py), `sendfile` in 256 KiB ranges was ~15% slower
/// than copying; in 1 MiB ranges it is as fast, with no file data held in memory.
const RANGE_CHUNK: usize = 1024 * 1024;

/// File bytes queued ahead of the connection's writer: what one transfer may hold in memory,
/// and at most what a message sent meanwhile waits behind (besides the socket's buffer).
const BYTES_IN_FLIGHT: usize = 4 * 1024 * 1024;

/// How often a sender blocked on a full pipe checks whether it should stop.
const STOP_CHECK: Duration = Duration::from_millis(100);

/// Sends the file at `path` over the connection behind `outbox`, under `name` (by default the
/// file's own name), and returns once the receiver has verified and saved it. `progress`
/// follows the bytes handed to the connection. `receiver` names the peer in the book of resume
/// tokens (its IP address): a file whose sending to it stopped continues from what it holds.
///
/// # Errors
/// [`Error::Io`] when the file cannot be read; [`Error::Transfer`] when the receiver refuses
/// the file or its verification fails; [`Error::Closed`] when the connection ends first.
///
/// # Cancel safety
/// Cancelling stops the transfer and tells the receiver, which keeps what arrived so that the
/// next attempt resumes from there.
pub(crate) async fn send_file(
    outbox: &Outbox,
    outgoing: &Outgoing,
    receiver: &str,
    path: &Path,
    name: Option<String>,
    progress: &Arc<Progress>,
) -> Result<SentFile> {
    let started = Instant::now();
    if !outbox.state().is_framed() {
        return Err(Error::invalid(
            "raw",
            "files need the framed protocol; a raw connection carries bare bytes only",
        ));
    }
    let Opened {
        file,
        size,
        entry,
        mut token,
    } = open(path, receiver).await?;
    let name = match name {
        Some(name) => name,
        None => path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .ok_or_else(|| Error::invalid("name", "the path has no file name; pass name="))?,
    };
    progress.set_total(size);
    let mut resume = true;
    loop {
        let (id, answers) = outgoing
            .register()
            .ok_or_else(|| outbox.state().closed_error())?;
        let abandon = Abandon {
            outbox,
            outgoing,
            id,
            stop: Arc::new(AtomicBool::new(false)),
            armed: true,
        };
        let fail = |status: TransferStatus, reason: String| Error::Transfer {
            name: name.clone(),
            status,
            reason,
        };
        outbox
            .send(Frame::FileOffer {
                id,
                size,
                resume,
                token,
                name: name.clone(),
            })
            .await?;
        let (offset, prefix) = match answer(&answers, outbox).await? {
            Answer::Accept {
                offset,
                prefix,
                token: given,
            } => {
                if given.is_some() && given != token {
                    // Kept before the first chunk leaves: a sender killed from here on still
                    // finds it when it starts again.
                    keep_token(&entry, given).await;
                    token = given;
                }
                (offset, prefix)
            }
            Answer::Result { status, text, .. } => return Err(fail(status, text)),
        };
        if offset > size {
            return Err(fail(
                TransferStatus::BAD_TRANSFER,
                format!("the receiver claims to hold {offset} bytes of a {size}-byte file"),
            ));
        }
        let hasher = hash_prefix(Arc::clone(&file), offset).await?;
        if offset > 0 && hasher.finalize().as_bytes() != &prefix {
            log::info!(
                "the receiver holds {offset} bytes of {name:?} that differ from this file; \
                 sending it whole"
            );
            abandon.cancel("the part held differs from the file; sending it whole");
            resume = false;
            continue;
        }
        if offset > 0 {
            log::info!("resuming {name:?} after the {offset} bytes the receiver holds");
        }
        progress.set_done(offset);
        let streaming = Streaming {
            file: Arc::clone(&file),
            hasher,
            offset,
            size,
            id,
            outbox: outbox.clone(),
            chunk: if outbox.state().sends_files() {
                RANGE_CHUNK
            } else {
                CHUNK
            }
            .min(outbox.peer_max_frame() as usize - FILE_CHUNK_OVERHEAD),
            progress: Arc::clone(progress),
            stop: Arc::clone(&abandon.stop),
            answers: answers.clone(),
        };
        let streamed = tokio::task::spawn_blocking(move || streaming.run())
            .await
            .map_err(|e| Error::io("the file's reader failed", io::Error::other(e)))?;
        let digest = match streamed {
            Ok(digest) => digest,
            // The receiver gave its verdict early (a failure); it is in the answers.
            Err(Interrupted::Answered) => [0; 32],
            Err(Interrupted::Failed(e)) => return Err(e),
        };
        if !answers.is_empty() {
            // Nothing more to send: the receiver has already given up on this transfer.
        } else {
            outbox.send(Frame::FileEnd { id, digest }).await?;
        }
        return match answer(&answers, outbox).await? {
            Answer::Result {
                status,
                digest: theirs,
                text,
            } if status.is_ok() => {
                abandon.finish();
                if token.is_some() {
                    keep_token(&entry, None).await;
                }
                if theirs != digest {
                    return Err(fail(
                        TransferStatus::DIGEST_MISMATCH,
                        format!(
                            "the receiver reports digest {}, this file's is {}",
                            hex(&theirs),
                            hex(&digest)
                        ),
                    ));
                }
                progress.set_done(size);
                Ok(SentFile {
                    name,
                    saved_as: text,
                    size,
                    digest,
                    resumed_from: offset,
                    duration: started.elapsed(),
                })
            }
            Answer::Result { status, text, .. } => {
                abandon.finish();
                Err(fail(status, text))
            }
            Answer::Accept { .. } => Err(Error::Protocol(format!(
                "the receiver accepted file transfer {id} twice"
            ))),
        };
    }
}

/// A file to send, and what the book of resume tokens knows of it.
struct Opened {
    file: Arc<File>,
    size: u64,
    entry: Entry,
    token: Option<ResumeToken>,
}

async fn open(path: &Path, receiver: &str) -> Result<Opened> {
    let (owned, receiver) = (path.to_owned(), receiver.to_owned());
    let opened = tokio::task::spawn_blocking(move || {
        let file = File::open(&owned)?;
        let meta = file.metadata()?;
        if meta.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::IsADirectory,
                "it is a folder, not a file",
            ));
        }
        let entry = Entry::new(&receiver, &owned, meta.len(), meta.modified().ok());
        let token = Book::global().get(&entry);
        Ok(Opened {
            file: Arc::new(file),
            size: meta.len(),
            entry,
            token,
        })
    })
    .await
    .map_err(|e| Error::io("cannot open the file", io::Error::other(e)))?;
    opened.map_err(|e| Error::io(format!("cannot send {}", path.display()), e))
}

/// Keeps `token` in the book for `entry`, or forgets the entry (`None`), off the network loop.
async fn keep_token(entry: &Entry, token: Option<ResumeToken>) {
    let entry = entry.clone();
    let _ = tokio::task::spawn_blocking(move || match token {
        Some(token) => Book::global().put(&entry, token),
        None => Book::global().forget(&entry),
    })
    .await;
}

/// A hasher that has seen the first `len` bytes of `file`.
async fn hash_prefix(file: Arc<File>, len: u64) -> Result<blake3::Hasher> {
    tokio::task::spawn_blocking(move || {
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; CHUNK];
        let mut pos = 0;
        while pos < len {
            let n = CHUNK.min((len - pos) as usize);
            file.read_exact_at(&mut buf[..n], pos)?;
            hasher.update(&buf[..n]);
            pos += n as u64;
        }
        Ok(hasher)
    })
    .await
    .map_err(|e| Error::io("the file's reader failed", io::Error::other(e)))?
    .map_err(|e| Error::io("cannot read the file", e))
}

/// Waits for the receiver's next answer, or the end of the connection.
async fn answer(answers: &flume::Receiver<Answer>, outbox: &Outbox) -> Result<Answer> {
    answers
        .recv_async()
        .await
        .map_err(|_| outbox.state().closed_error())
}

/// Cancels the transfer (telling the receiver) unless it finished.
struct Abandon<'a> {
    outbox: &'a Outbox,
    outgoing: &'a Outgoing,
    id: u32,
    stop: Arc<AtomicBool>,
    armed: bool,
}

impl Abandon<'_> {
    fn cancel(mut self, reason: &str) {
        self.armed = false;
        self.stop.store(true, Ordering::Relaxed);
        self.tell_receiver(reason);
    }

    /// Queues a FILE_CANCEL, at once if there is room, else as soon as there is.
    ///
    /// NOTE: the queue is usually full of this transfer's chunks when it stops; a cancel that
    /// found no room and was dropped left the receiver waiting for the rest for as long as the
    /// connection lasted, holding the partial file, so that sending the file again on the same
    /// connection could not resume it.
    fn tell_receiver(&self, reason: &str) {
        let cancel = || Frame::FileCancel {
            id: self.id,
            reason: reason.to_owned(),
        };
        if !matches!(self.outbox.try_send(cancel()), Ok(false)) {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (outbox, cancel) = (self.outbox.clone(), cancel());
            runtime.spawn(async move {
                let _ = outbox.send(cancel).await;
            });
        }
    }

    fn finish(mut self) {
        self.armed = false;
    }
}

impl Drop for Abandon<'_> {
    fn drop(&mut self) {
        self.outgoing.forget(self.id);
        if self.armed {
            self.stop.store(true, Ordering::Relaxed);
            self.tell_receiver("the sender stopped");
        }
    }
}

/// Why streaming stopped before the end.
enum Interrupted {
    /// The receiver answered (with a failure) while the data was still flowing.
    Answered,
    Failed(Error),
}

/// Reads, hashes and queues the file from `offset` to `size`, on a blocking thread.
struct Streaming {
    file: Arc<File>,
    hasher: blake3::Hasher,
    offset: u64,
    size: u64,
    id: u32,
    outbox: Outbox,
    chunk: usize,
    progress: Arc<Progress>,
    stop: Arc<AtomicBool>,
    answers: flume::Receiver<Answer>,
}

impl Streaming {
    fn run(mut self) -> std::result::Result<Digest, Interrupted> {
        let in_flight = (BYTES_IN_FLIGHT / self.chunk).max(2);
        let (home, pool) = flume::bounded(in_flight);
        for _ in 0..in_flight {
            home.send(Vec::new()).expect("the pool has room");
        }
        let mut pos = self.offset;
        while pos < self.size {
            let mut buf = self.free_buffer(&pool)?;
            let n = self.chunk.min((self.size - pos) as usize);
            buf.resize(n, 0);
            self.file.read_exact_at(&mut buf, pos).map_err(|e| {
                let e = if e.kind() == io::ErrorKind::UnexpectedEof {
                    io::Error::new(e.kind(), "the file shrank while it was being sent")
                } else {
                    e
                };
                Interrupted::Failed(Error::io("cannot read the file", e))
            })?;
            self.hasher.update(&buf);
            let frame = if self.outbox.state().sends_files() {
                // NOTE: zero-copy: the writer sends these bytes from the page cache with
                // `sendfile`; the buffer was only needed for the digest. An empty one stands
                // in for it in the pool until the range is written.
                let _ = home.try_send(buf);
                let slot = pool.recv().expect("the buffer just returned");
                Frame::FileRange {
                    id: self.id,
                    range: FileRange {
                        file: Arc::clone(&self.file),
                        offset: pos,
                        len: n as u32,
                        guard: Some(Arc::new(Pooled {
                            buf: slot,
                            home: home.clone(),
                        })),
                    },
                }
            } else {
                let data = Bytes::from_owner(Pooled {
                    buf,
                    home: home.clone(),
                });
                Frame::FileChunk { id: self.id, data }
            };
            self.outbox
                .blocking_send(frame)
                .map_err(Interrupted::Failed)?;
            pos += n as u64;
            self.progress.set_done(pos);
        }
        Ok(*self.hasher.finalize().as_bytes())
    }

    /// A buffer from the pool, once the writer has returned one; checks on the way whether the
    /// transfer should stop.
    fn free_buffer(
        &self,
        pool: &flume::Receiver<Vec<u8>>,
    ) -> std::result::Result<Vec<u8>, Interrupted> {
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return Err(Interrupted::Failed(Error::Timeout(
                    "the transfer was cancelled".into(),
                )));
            }
            if !self.answers.is_empty() {
                return Err(Interrupted::Answered);
            }
            if self.outbox.state().close_info().is_some() {
                return Err(Interrupted::Failed(self.outbox.state().closed_error()));
            }
            if let Ok(buf) = pool.recv_timeout(STOP_CHECK) {
                return Ok(buf);
            }
        }
    }
}

/// A chunk's buffer, which goes back to the pool once the writer has dropped the chunk.
struct Pooled {
    buf: Vec<u8>,
    home: flume::Sender<Vec<u8>>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let _ = self.home.try_send(std::mem::take(&mut self.buf));
    }
}
