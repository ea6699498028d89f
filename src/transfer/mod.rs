//! File transfer over a framed connection, in either direction: the sender offers a file, the
//! receiver accepts it (from the byte where a partial copy it holds ends, after the sender checked
//! that prefix), the data streams as chunks that share the connection with messages, and the
//! receiver renames the file into place only once its BLAKE3 digest matches the sender's.
//!
//! | file | owns |
//! | --- | --- |
//! | `send.rs` | reading, hashing and streaming a file in bounded memory; the sender's side of the exchange |
//! | `folder.rs` | the receiving folder, partial files kept for resuming and their bounds |
//! | `receive.rs` | a connection's incoming transfers: writing and verifying |
//! | `names.rs` | what a received file may be called |
//! | `resume.rs` | the sender's resume tokens, which survive the process |
//!
//! Disk work runs on tokio's blocking threads, never on the network loop.

mod folder;
mod names;
mod receive;
mod resume;
mod send;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

pub(crate) use folder::FileDir;
pub use folder::{FolderLimits, DEFAULT_PARTIAL_TTL, MAX_TRANSFERS};
pub use names::{safe_name, MAX_NAME_LEN, PARTIAL_DIR};
pub use receive::MAX_TRANSFERS_PER_CONNECTION;
pub(crate) use receive::{Delivery, Receiving};
pub use resume::RESUME_DIR_ENV;
pub(crate) use send::send_file;

use crate::frame::{Digest, Frame, ResumeToken, TransferStatus};

/// The default bound on the size of a file a receiver takes: 16 GiB.
pub const DEFAULT_MAX_FILE_SIZE: u64 = 16 << 30;

/// A file that arrived whole and verified, and where it now is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedFile {
    /// The name it was saved under (the offered name reduced to a safe base name, and numbered
    /// if that name was taken).
    pub name: String,
    /// The name the sender offered.
    pub offered_name: String,
    pub path: PathBuf,
    pub size: u64,
    pub digest: Digest,
    /// Bytes kept from an earlier, interrupted transfer of the same file (0 for a fresh one).
    pub resumed_from: u64,
    pub peer: std::net::SocketAddr,
}

/// What a completed [`send_file`] reports.
#[derive(Debug, Clone, PartialEq)]
pub struct SentFile {
    /// The name the file was offered under.
    pub name: String,
    /// The name the receiver saved it under.
    pub saved_as: String,
    pub size: u64,
    /// The digest both sides computed.
    pub digest: Digest,
    /// Bytes the receiver already held from an earlier attempt, which were not sent again.
    pub resumed_from: u64,
    pub duration: Duration,
}

/// How far a transfer has got, readable from any thread while it runs.
#[derive(Debug, Default)]
pub struct Progress {
    done: AtomicU64,
    total: AtomicU64,
}

impl Progress {
    /// Bytes the receiver holds or that were handed to the connection so far.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// The file's size, once it is known (0 before).
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    fn set_total(&self, total: u64) {
        self.total.store(total, Ordering::Relaxed);
    }

    fn set_done(&self, done: u64) {
        self.done.store(done, Ordering::Relaxed);
    }
}

/// The lowercase hexadecimal form of a digest, as logs, events and the command line show it.
pub fn hex(digest: &[u8]) -> String {
    digest
        .iter()
        .fold(String::with_capacity(2 * digest.len()), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}

/// What the receiver answers to an offer and, later, to the end of the data.
#[derive(Debug)]
pub(crate) enum Answer {
    Accept {
        offset: u64,
        prefix: Digest,
        token: Option<ResumeToken>,
    },
    Result {
        status: TransferStatus,
        digest: Digest,
        text: String,
    },
}

/// One connection's outgoing transfers, waiting for the receiver's answers by transfer id.
#[derive(Debug)]
pub(crate) struct Outgoing {
    /// `None` once the connection has ended, so that no transfer starts waiting for an answer
    /// that cannot come.
    waiting: Mutex<Option<HashMap<u32, flume::Sender<Answer>>>>,
    next_id: AtomicU32,
}

impl Default for Outgoing {
    fn default() -> Outgoing {
        Outgoing {
            waiting: Mutex::new(Some(HashMap::new())),
            next_id: AtomicU32::new(1),
        }
    }
}

impl Outgoing {
    /// A new transfer id and the queue its answers arrive on; `None` once the connection ended.
    fn register(&self) -> Option<(u32, flume::Receiver<Answer>)> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (answer, answers) = flume::unbounded();
        lock(&self.waiting).as_mut()?.insert(id, answer);
        Some((id, answers))
    }

    fn forget(&self, id: u32) {
        if let Some(waiting) = lock(&self.waiting).as_mut() {
            waiting.remove(&id);
        }
    }

    /// Hands a FILE_ACCEPT or FILE_RESULT from the receiver to the transfer it answers.
    pub(crate) fn route(&self, frame: Frame) {
        let (id, answer) = match frame {
            Frame::FileAccept {
                id,
                offset,
                prefix,
                token,
            } => (
                id,
                Answer::Accept {
                    offset,
                    prefix,
                    token,
                },
            ),
            Frame::FileResult {
                id,
                status,
                digest,
                text,
            } => (
                id,
                Answer::Result {
                    status,
                    digest,
                    text,
                },
            ),
            _ => return,
        };
        let waiter = lock(&self.waiting)
            .as_ref()
            .and_then(|waiting| waiting.get(&id).cloned());
        match waiter {
            Some(waiter) => {
                let _ = waiter.send(answer);
            }
            None => log::debug!("discarded an answer to file transfer {id}: nobody waits for it"),
        }
    }

    /// The connection ended: every transfer still waiting learns it at once.
    pub(crate) fn close(&self) {
        lock(&self.waiting).take();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
