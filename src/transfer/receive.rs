//! The receiving side: per connection the transfers in progress ([`Receiving`]), each run by a
//! task that hands its file work (opening, writing and hashing, moving into place) to the
//! blocking pool a step at a time: a transfer waiting for data holds no thread.
//!
//! A file in progress lives in its folder's partial folder (`folder.rs`), named after a key of
//! its offered name and size and of its sender: the resume token this side hands the sender
//! when it accepts the file (and the sender's TLS client certificate, if it has one). When the
//! sender goes away, the partial file stays there, so the same file offered again with that
//! token continues where it stopped (after the sender checked the digest of what is held); no
//! other client can continue it or learn how much of it is held. Only once every byte arrived
//! and the BLAKE3 digest matches the sender's is the file linked into the folder under its
//! name, never replacing an existing file: a file there is always whole and verified.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::folder::{Claim, FileDir, MAX_TRANSFERS};
use super::names::safe_name;
use super::{hex, ReceivedFile};
use crate::connection::Outbox;
use crate::frame::{Digest, Frame, ResumeToken, TransferStatus, RESUME_TOKEN_LEN};

/// Chunks that may wait for a file's worker before the connection stops reading (each at most
/// one frame): the disk pushes back on the sender through TCP.
const CHUNKS_QUEUED: usize = 16;

/// Transfers in progress from one connection at once; one more offer is refused as busy.
pub const MAX_TRANSFERS_PER_CONNECTION: usize = 4;

/// Who hears about received files: the server turns them into events, the client queues them
/// for `recv_file`. `received` is called on a blocking thread and may block.
pub(crate) trait Delivery: Send + Sync + 'static {
    /// A file arrived whole and verified and is in place; called before the sender is told
    /// (to count it, so that a sender that got its answer finds it counted). Must not block.
    fn arrived(&self, file: &ReceivedFile) {
        let _ = file;
    }
    /// The same file, after the sender was told; it is in its folder under `file.name`.
    fn received(&self, file: ReceivedFile);
    /// A transfer failed (the sender was told why).
    fn failed(&self, offered_name: &str, status: TransferStatus, reason: &str);
}

/// What the connection hands a file's worker.
enum Op {
    Chunk(Bytes),
    End(Digest),
    Cancel(String),
}

/// One connection's incoming transfers. Owned by the task that reads the connection.
pub(crate) struct Receiving {
    dir: Option<Arc<FileDir>>,
    outbox: Outbox,
    delivery: Arc<dyn Delivery>,
    peer: SocketAddr,
    /// The fingerprint of the peer's TLS client certificate: its partial files are its own.
    owner: Option<String>,
    active: HashMap<u32, mpsc::Sender<Op>>,
}

impl Receiving {
    pub(crate) fn new(
        dir: Option<Arc<FileDir>>,
        outbox: Outbox,
        delivery: Arc<dyn Delivery>,
        peer: SocketAddr,
        owner: Option<String>,
    ) -> Receiving {
        Receiving {
            dir,
            outbox,
            delivery,
            peer,
            owner,
            active: HashMap::new(),
        }
    }

    /// Handles a frame from the peer's sending side: an offer starts a worker, data goes to its
    /// worker. Waits while the worker is behind, which stops the connection's reading: the
    /// disk's pace pushes back on the sender.
    ///
    /// # Cancel safety
    /// A cancelled call may lose the chunk it was handing over; cancel only to end the
    /// connection.
    pub(crate) async fn handle(&mut self, frame: Frame) {
        let (id, op) = match frame {
            Frame::FileOffer {
                id,
                size,
                resume,
                token,
                name,
            } => {
                let permit = match self.admit() {
                    Ok(permit) => permit,
                    Err(reason) => {
                        log::info!("refused file {name:?} from {}: {reason}", self.peer);
                        let refusal = Frame::FileResult {
                            id,
                            status: TransferStatus::BUSY,
                            digest: [0; 32],
                            text: reason,
                        };
                        // Waits while the sender does not read: its own reading stops meanwhile.
                        let _ = self.outbox.send(refusal).await;
                        return;
                    }
                };
                let (ops, queued) = mpsc::channel(CHUNKS_QUEUED);
                let job = Job {
                    dir: self.dir.clone(),
                    id,
                    size,
                    resume,
                    token,
                    offered: name,
                    outbox: self.outbox.clone(),
                    delivery: Arc::clone(&self.delivery),
                    peer: self.peer,
                    owner: self.owner.clone(),
                };
                // An id offered again replaces the old transfer, whose worker sees its queue end.
                self.active.insert(id, ops);
                tokio::spawn(async move {
                    job.run(queued).await;
                    drop(permit);
                });
                return;
            }
            Frame::FileChunk { id, data } => (id, Op::Chunk(data)),
            Frame::FileEnd { id, digest } => (id, Op::End(digest)),
            Frame::FileCancel { id, reason } => (id, Op::Cancel(reason)),
            _ => return,
        };
        let ends = !matches!(op, Op::Chunk(_));
        let delivered = match self.active.get(&id) {
            Some(ops) => ops.send(op).await.is_ok(),
            None => false,
        };
        if ends || !delivered {
            self.active.remove(&id);
        }
        if !delivered {
            // Refused or failed already (and the sender told), or never offered.
            log::debug!("ignored a file frame for transfer {id}, which is not in progress");
        }
    }
}

impl Receiving {
    /// Whether one more transfer may start: this connection's and the folder's limits, and the
    /// folder's permit for it (`None` without a folder: the offer is refused at once anyway).
    fn admit(&mut self) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, String> {
        // Transfers that ended (answered, refused or failed) no longer count.
        self.active.retain(|_, ops| !ops.is_closed());
        if self.active.len() >= MAX_TRANSFERS_PER_CONNECTION {
            return Err(format!(
                "{MAX_TRANSFERS_PER_CONNECTION} transfers from this sender are in progress \
                 already; send this file once one has finished"
            ));
        }
        let Some(dir) = &self.dir else {
            return Ok(None);
        };
        match Arc::clone(&dir.transfers).try_acquire_owned() {
            Ok(permit) => Ok(Some(permit)),
            Err(_) => Err(format!(
                "{MAX_TRANSFERS} transfers into this folder are in progress; try again later"
            )),
        }
    }
}

/// How a transfer failed, as the sender is told.
struct Failure {
    status: TransferStatus,
    reason: String,
}

impl Failure {
    fn new(status: TransferStatus, reason: impl Into<String>) -> Failure {
        Failure {
            status,
            reason: reason.into(),
        }
    }

    fn io(what: &str, e: &io::Error) -> Failure {
        let status = if e.raw_os_error() == Some(28) {
            // ENOSPC: the disk filled up under us.
            TransferStatus::NO_SPACE
        } else {
            TransferStatus::IO_ERROR
        };
        Failure::new(status, format!("{what}: {e}"))
    }
}

/// Why a worker stopped before the end.
enum Stop {
    Failed(Failure),
    /// The sender cancelled or the connection ended; the partial file may be resumed.
    Interrupted(String),
}

impl From<Failure> for Stop {
    fn from(failure: Failure) -> Stop {
        Stop::Failed(failure)
    }
}

/// One incoming file, from the offer to the verdict.
struct Job {
    dir: Option<Arc<FileDir>>,
    id: u32,
    size: u64,
    resume: bool,
    /// The token the sender offered, from an earlier accept of this side's (`None` for a
    /// first attempt, or a sender that predates tokens: it gets a new one).
    token: Option<ResumeToken>,
    offered: String,
    outbox: Outbox,
    delivery: Arc<dyn Delivery>,
    peer: SocketAddr,
    owner: Option<String>,
}

/// Runs file work on the blocking pool; a panic there fails the transfer, never the task.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, Stop> {
    tokio::task::spawn_blocking(work).await.map_err(|e| {
        Stop::Failed(Failure::new(
            TransferStatus::IO_ERROR,
            format!("the file work failed: {e}"),
        ))
    })
}

/// How [`write_queued`] stopped.
enum Written {
    /// Every chunk that came is written (none came for [`LINGER`], or the queue ended: the
    /// next receive says which); the file now holds this many bytes.
    Drained(u64),
    /// Written up to this op (not a chunk), which is next; the file holds this many bytes.
    Then(Op, u64),
    /// The sender sent more than it offered.
    TooMuch,
    Failed(io::Error),
}

/// Writes `first` and the chunks that follow it while they come (on a blocking thread, which
/// `runtime` runs the connection), keeping the digest.
fn write_queued(
    writing: &mut Writing,
    first: Bytes,
    ops: &mut mpsc::Receiver<Op>,
    (mut received, size): (u64, u64),
    runtime: &tokio::runtime::Handle,
) -> Written {
    let mut data = first;
    loop {
        received += data.len() as u64;
        if received > size {
            return Written::TooMuch;
        }
        if let Err(e) = writing.file.write_all(&data) {
            return Written::Failed(e);
        }
        writing.hasher.update(&data);
        let next = match ops.try_recv() {
            Ok(op) => Some(op),
            // The next chunk is usually on its way: waiting a moment for it here costs less
            // than handing the work back and forth (about a tenth of the throughput of one
            // transfer when each chunk was its own hand-off).
            Err(_) => runtime
                .block_on(tokio::time::timeout(LINGER, ops.recv()))
                .ok()
                .flatten(),
        };
        match next {
            Some(Op::Chunk(more)) => data = more,
            Some(other) => return Written::Then(other, received),
            None => return Written::Drained(received),
        }
    }
}

/// How long a file's blocking thread waits for the next chunk before it lets go.
const LINGER: Duration = Duration::from_millis(20);

/// The file being written and its running digest, moved to the blocking pool and back.
struct Writing {
    file: File,
    hasher: Box<blake3::Hasher>,
}

impl Job {
    async fn run(self, ops: mpsc::Receiver<Op>) {
        let mut claim = None;
        let outcome = self.receive(ops, &mut claim).await;
        let (answer, received) = match outcome {
            Ok(file) => {
                log::info!(
                    "received {:?} ({} bytes, blake3 {}) from {}",
                    file.name,
                    file.size,
                    hex(&file.digest),
                    self.peer
                );
                let answer = Frame::FileResult {
                    id: self.id,
                    status: TransferStatus::OK,
                    digest: file.digest,
                    text: file.name.clone(),
                };
                self.delivery.arrived(&file);
                (answer, Some(file))
            }
            Err(Stop::Failed(failure)) => {
                if let Some(claim) = claim.take() {
                    let _ = blocking(move || claim.remove()).await;
                }
                log::info!(
                    "refused or failed file {:?} from {}: {}",
                    self.offered,
                    self.peer,
                    failure.reason
                );
                self.delivery
                    .failed(&self.offered, failure.status, &failure.reason);
                let answer = Frame::FileResult {
                    id: self.id,
                    status: failure.status,
                    digest: [0; 32],
                    text: failure.reason,
                };
                (answer, None)
            }
            Err(Stop::Interrupted(why)) => {
                if let Some(claim) = claim.take() {
                    let _ = blocking(move || {
                        if !claim.resumable || claim.is_empty() {
                            claim.remove();
                        }
                        claim.release_and_bound();
                    })
                    .await;
                }
                log::info!(
                    "file {:?} from {} interrupted: {why}",
                    self.offered,
                    self.peer
                );
                return;
            }
        };
        // NOTE: the verdict is queued before the application hears of the file, so that an
        // application that closes its server on `FileReceived` still lets the sender learn
        // that its file arrived (a graceful close writes what is queued).
        if self.outbox.send(answer).await.is_err() {
            log::debug!(
                "the connection ended before the verdict on {:?}",
                self.offered
            );
        }
        if let Some(file) = received {
            let delivery = Arc::clone(&self.delivery);
            let _ = blocking(move || delivery.received(file)).await;
        }
    }

    async fn receive(
        &self,
        mut ops: mpsc::Receiver<Op>,
        claim_slot: &mut Option<Claim>,
    ) -> Result<ReceivedFile, Stop> {
        let Some(dir) = self.dir.clone() else {
            return Err(Failure::new(
                TransferStatus::REFUSED,
                "this peer does not accept files (no upload_dir / download_dir is set)",
            )
            .into());
        };
        let name = safe_name(&self.offered)
            .map_err(|reason| Failure::new(TransferStatus::BAD_NAME, reason))?;
        if self.size > dir.max_file_size {
            return Err(Failure::new(
                TransferStatus::TOO_LARGE,
                format!(
                    "{} bytes is over this peer's max_file_size of {} bytes",
                    self.size, dir.max_file_size
                ),
            )
            .into());
        }
        let (size, resume) = (self.size, self.resume);
        let token = match self.token {
            Some(token) => token,
            None => new_token().map_err(|e| Failure::io("cannot make a resume token", &e))?,
        };
        let (claim, prepared) = blocking({
            let (dir, name, owner) = (Arc::clone(&dir), name.clone(), self.owner.clone());
            move || {
                let mut claim = dir.claim(&name, size, owner.as_deref(), &token);
                let prepared = prepare(&dir, &mut claim, resume, size);
                (claim, prepared)
            }
        })
        .await?;
        *claim_slot = Some(claim);
        let (mut writing, held, prefix) = prepared?;
        let accept = Frame::FileAccept {
            id: self.id,
            offset: held,
            prefix,
            token: Some(token),
        };
        if self.outbox.send(accept).await.is_err() {
            return Err(Stop::Interrupted("the connection ended".into()));
        }
        let mut received = held;
        let mut next = None;
        loop {
            let op = match next.take() {
                Some(op) => op,
                None => ops.recv().await.ok_or_else(|| {
                    Stop::Interrupted(format!(
                        "the connection ended after {received} of {} bytes",
                        self.size
                    ))
                })?,
            };
            match op {
                Op::Chunk(data) => {
                    // NOTE: the blocking thread goes on with the chunks queued meanwhile, and
                    // is let go once the queue is empty: it is held while data flows, never
                    // while waiting for it.
                    let (size, before) = (self.size, received);
                    let runtime = tokio::runtime::Handle::current();
                    let (back, written) = blocking(move || {
                        let written =
                            write_queued(&mut writing, data, &mut ops, (before, size), &runtime);
                        ((writing, ops), written)
                    })
                    .await?;
                    (writing, ops) = back;
                    match written {
                        Written::Drained(total) => received = total,
                        Written::Then(op, total) => (received, next) = (total, Some(op)),
                        Written::TooMuch => {
                            return Err(Failure::new(
                                TransferStatus::BAD_TRANSFER,
                                format!(
                                    "the sender sent more than the {} bytes it offered",
                                    self.size
                                ),
                            )
                            .into());
                        }
                        Written::Failed(e) => {
                            return Err(Failure::io("cannot write the file", &e).into())
                        }
                    }
                }
                Op::End(digest) => {
                    if received != self.size {
                        return Err(Failure::new(
                            TransferStatus::BAD_TRANSFER,
                            format!(
                                "the sender ended after {received} of the {} bytes it offered",
                                self.size
                            ),
                        )
                        .into());
                    }
                    let computed = *writing.hasher.finalize().as_bytes();
                    if computed != digest {
                        return Err(Failure::new(
                            TransferStatus::DIGEST_MISMATCH,
                            format!(
                                "the data that arrived has BLAKE3 digest {}, the sender's is {}; \
                                 nothing was kept",
                                hex(&computed),
                                hex(&digest)
                            ),
                        )
                        .into());
                    }
                    drop(writing);
                    let (claim, name) = (claim_slot.take().expect("claimed above"), name.clone());
                    let (claim, placed) = blocking(move || {
                        let placed = dir.place(&claim, &name);
                        (claim, placed)
                    })
                    .await?;
                    // Kept until now: a file that cannot be placed is removed with it.
                    *claim_slot = Some(claim);
                    let (saved, path) =
                        placed.map_err(|e| Failure::io("cannot move the file into place", &e))?;
                    return Ok(ReceivedFile {
                        name: saved,
                        offered_name: self.offered.clone(),
                        path,
                        size: self.size,
                        digest,
                        resumed_from: held,
                        peer: self.peer,
                    });
                }
                Op::Cancel(reason) => {
                    return Err(Stop::Interrupted(format!(
                        "the sender cancelled it after {received} of {} bytes ({reason})",
                        self.size
                    )))
                }
            }
        }
    }
}

/// A new resume token: random, so that nobody can guess another sender's.
fn new_token() -> io::Result<ResumeToken> {
    use ring::rand::SecureRandom;
    let mut token = [0; RESUME_TOKEN_LEN];
    ring::rand::SystemRandom::new()
        .fill(&mut token)
        .map_err(|_| io::Error::other("the system's random source failed"))?;
    Ok(token)
}

/// Opens the claim's partial file and makes room for the rest of it; returns the file with
/// the digest of what it holds, how many bytes that is, and the digest the sender checks its
/// own prefix against (zero for none).
fn prepare(
    dir: &FileDir,
    claim: &mut Claim,
    resume: bool,
    size: u64,
) -> Result<(Writing, u64, Digest), Stop> {
    let (mut file, held) = dir
        .open_partial(claim, resume, size)
        .map_err(|e| Failure::io("cannot create the file", &e))?;
    let free = dir
        .make_room(size - held)
        .map_err(|e| Failure::io("cannot check the free space", &e))?;
    if size - held > free {
        if held == 0 {
            claim.resumable = false;
        }
        return Err(Failure::new(
            TransferStatus::NO_SPACE,
            format!(
                "the file needs {} more bytes and only {free} are free",
                size - held
            ),
        )
        .into());
    }
    let mut hasher = Box::new(blake3::Hasher::new());
    let mut prefix = [0; 32];
    if held > 0 {
        file.seek(SeekFrom::Start(0))
            .and_then(|_| hasher.update_reader(&mut file))
            .map_err(|e| Failure::io("cannot read the partial file", &e))?;
        prefix = *hasher.finalize().as_bytes();
    }
    Ok((Writing { file, hasher }, held, prefix))
}
