//! The receiving side: a folder that takes files ([`FileDir`]), and per connection the transfers
//! in progress ([`Receiving`]), each run by a task that hands its file work (opening, writing
//! and hashing, moving into place) to the blocking pool a step at a time: a transfer waiting
//! for data holds no thread.
//!
//! A file in progress lives in `<dir>/.socketcomm-partial/`, named after a key of its offered
//! name and size and of its sender: the resume token this side hands the sender when it
//! accepts the file (and the sender's TLS client certificate, if it has one). When the sender
//! goes away, the partial file stays there, so the same file offered again with that token
//! continues where it stopped (after the sender checked the digest of what is held); no other
//! client can continue it or learn how much of it is held. Only once every byte arrived and the BLAKE3 digest matches the sender's is the file
//! linked into `<dir>` under its name, never replacing an existing file: a file in `<dir>` is
//! always whole and verified.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::names::{candidates, safe_name, PARTIAL_DIR};
use super::{hex, lock, ReceivedFile};
use crate::connection::Outbox;
use crate::error::{Error, Result};
use crate::frame::{Digest, Frame, ResumeToken, TransferStatus, RESUME_TOKEN_LEN};

/// How long an offer waits for an earlier transfer of the same file to let go of it (see
/// [`FileDir::claim`]).
const RELEASE_WAIT: Duration = Duration::from_secs(2);

/// Chunks that may wait for a file's worker before the connection stops reading (each at most
/// one frame): the disk pushes back on the sender through TCP.
const CHUNKS_QUEUED: usize = 16;

/// A folder that receives files (a server's `upload_dir`, a client's `download_dir`).
#[derive(Debug)]
pub(crate) struct FileDir {
    root: PathBuf,
    partial: PathBuf,
    max_file_size: u64,
    /// Keys of the partial files that a transfer is writing now.
    busy: Mutex<HashSet<String>>,
    /// Notified when a key is released.
    released: Condvar,
    /// One permit per transfer in progress into this folder, from every sender together.
    transfers: Arc<tokio::sync::Semaphore>,
    /// Partial files untouched for this long are removed.
    partial_ttl: Duration,
    /// When partial files were last looked at for expiry.
    swept: Mutex<Instant>,
}

/// How long an interrupted transfer's partial file is kept for a resume by default.
pub const DEFAULT_PARTIAL_TTL: Duration = Duration::from_secs(24 * 3600);
/// How often, at most, partial files are looked at for expiry (when transfers begin).
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Transfers in progress from one connection at once; one more offer is refused as busy.
pub const MAX_TRANSFERS_PER_CONNECTION: usize = 4;
/// Transfers in progress into one folder (a server's `upload_dir`) at once, from every sender.
///
/// NOTE: each holds a thread of the runtime's blocking pool while it waits for data, and an
/// open file: without the limit, one connection's flood of offers took 521 threads and 512
/// descriptors, and honest uploads waited behind it.
pub const MAX_TRANSFERS: usize = 64;

impl FileDir {
    /// Checks that `root` is a folder this process can write to, and prepares the folder for
    /// files in progress inside it.
    ///
    /// # Errors
    /// [`Error::Io`] naming the path when it is missing, not a folder, or not writable.
    pub(crate) fn open(
        option: &'static str,
        root: &Path,
        max_file_size: u64,
        partial_ttl: Duration,
    ) -> Result<FileDir> {
        let fail = |e: io::Error| {
            Error::io_with_hint(
                format!("{option} {} cannot receive files", root.display()),
                e,
                "; create the folder, or choose one this user can write to",
            )
        };
        let meta = fs::metadata(root).map_err(fail)?;
        if !meta.is_dir() {
            return Err(fail(io::Error::new(
                io::ErrorKind::NotADirectory,
                "it is not a folder",
            )));
        }
        let root = root.canonicalize().map_err(fail)?;
        let partial = root.join(PARTIAL_DIR);
        fs::create_dir_all(&partial).map_err(fail)?;
        if fs::symlink_metadata(&partial).map_err(fail)?.is_symlink() {
            return Err(fail(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{PARTIAL_DIR} in it is a symbolic link, not a folder of its own"),
            )));
        }
        // Creating the folder may have succeeded long ago: check that writing works now.
        let probe = partial.join(format!(".probe-{}", std::process::id()));
        File::create(&probe).map_err(fail)?;
        let _ = fs::remove_file(&probe);
        let dir = FileDir {
            root,
            partial,
            max_file_size,
            busy: Mutex::new(HashSet::new()),
            released: Condvar::new(),
            transfers: Arc::new(tokio::sync::Semaphore::new(MAX_TRANSFERS)),
            partial_ttl,
            swept: Mutex::new(Instant::now()),
        };
        dir.sweep();
        Ok(dir)
    }

    /// The partial files that no transfer is writing now, oldest first, with their sizes.
    /// Called with the `busy` keys locked, so that none is claimed meanwhile.
    fn idle_partials(&self, busy: &HashSet<String>) -> Vec<(SystemTime, PathBuf, u64)> {
        let Ok(entries) = fs::read_dir(&self.partial) else {
            return Vec::new();
        };
        let mut idle: Vec<(SystemTime, PathBuf, u64)> = entries
            .filter_map(|entry| {
                let entry = entry.ok()?;
                let name = entry.file_name().into_string().ok()?;
                let key = name.strip_suffix(".part")?;
                if busy.contains(key) {
                    return None;
                }
                // The entry itself, never what a planted link points to.
                let meta = entry.metadata().ok()?;
                Some((meta.modified().ok()?, entry.path(), meta.len()))
            })
            .collect();
        idle.sort();
        idle
    }

    /// Removes the partial files untouched for longer than `partial_ttl`.
    fn sweep(&self) {
        let busy = lock(&self.busy);
        *lock(&self.swept) = Instant::now();
        let now = SystemTime::now();
        for (modified, path, _) in self.idle_partials(&busy) {
            if now.duration_since(modified).unwrap_or_default() > self.partial_ttl {
                log::info!(
                    "removed the partial file {} (untouched for over {:?}, partial_ttl)",
                    path.display(),
                    self.partial_ttl
                );
                let _ = fs::remove_file(&path);
            }
        }
    }

    /// Sweeps if the last sweep is [`SWEEP_EVERY`] old.
    fn sweep_now_and_then(&self) {
        if lock(&self.swept).elapsed() >= SWEEP_EVERY {
            self.sweep();
        }
    }

    /// The free space once at least `needed` bytes are free, if removing other transfers'
    /// partial files (oldest first) can make that much room: a new transfer goes before an
    /// interrupted one that may never be resumed.
    ///
    /// NOTE: without this, a few interrupted uploads could fill the disk for good, and every
    /// honest upload after them was refused as `no_space`.
    fn make_room(&self, needed: u64) -> io::Result<u64> {
        let mut free = self.free_space()?;
        if free >= needed {
            return Ok(free);
        }
        let busy = lock(&self.busy);
        for (_, path, size) in self.idle_partials(&busy) {
            log::info!(
                "removed the partial file {} ({size} bytes) to make room for a new transfer",
                path.display()
            );
            fs::remove_file(&path)?;
            free = self.free_space()?;
            if free >= needed {
                break;
            }
        }
        Ok(free)
    }

    /// [`FileDir::open`] for an optional folder (`upload_dir`, `download_dir`): called when a
    /// server or client is made, so that a folder that cannot take files is reported then,
    /// not at the first file.
    ///
    /// # Errors
    /// As [`FileDir::open`].
    pub(crate) fn open_optional(
        option: &'static str,
        root: Option<&Path>,
        max_file_size: u64,
        partial_ttl: Duration,
    ) -> Result<Option<Arc<FileDir>>> {
        root.map(|root| FileDir::open(option, root, max_file_size, partial_ttl).map(Arc::new))
            .transpose()
    }

    /// Reserves the partial file of `name` with `size` bytes for the sender holding `token`.
    /// A second transfer of the same file while the first runs gets a file of its own, which
    /// is not kept for resuming.
    ///
    /// NOTE: a sender that reconnects after losing its connection often offers the file again
    /// before this side has noticed the loss and released the first transfer's file, so a busy
    /// key is waited for up to [`RELEASE_WAIT`] before another file is taken.
    ///
    /// A partial file belongs to its sender: the key includes the resume token (a secret this
    /// side made for that sender) and the fingerprint of its TLS client certificate (`owner`)
    /// if it has one, so that another client offering the same name and size neither
    /// continues it nor learns its digest.
    fn claim(
        self: &Arc<FileDir>,
        name: &str,
        size: u64,
        owner: Option<&str>,
        token: &ResumeToken,
    ) -> Claim {
        self.sweep_now_and_then();
        let key = {
            let mut hasher = blake3::Hasher::new();
            hasher.update(name.as_bytes());
            hasher.update(&[0]);
            hasher.update(&size.to_be_bytes());
            hasher.update(token);
            if let Some(owner) = owner {
                hasher.update(owner.as_bytes());
            }
            hex(hasher.finalize().as_bytes())[..32].to_owned()
        };
        let (mut busy, _) = self
            .released
            .wait_timeout_while(lock(&self.busy), RELEASE_WAIT, |busy| busy.contains(&key))
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (key, resumable) = if busy.contains(&key) {
            let unique = (1..)
                .map(|n| format!("{key}-{n}"))
                .find(|candidate| !busy.contains(candidate))
                .expect("an unused key exists");
            (unique, false)
        } else {
            (key, true)
        };
        busy.insert(key.clone());
        Claim {
            path: self.partial.join(format!("{key}.part")),
            key,
            resumable,
            dir: Arc::clone(self),
        }
    }

    /// Bytes free for this user on the folder's file system.
    fn free_space(&self) -> io::Result<u64> {
        let stat = rustix::fs::statvfs(&self.partial)?;
        Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
    }

    /// Links the finished file at `partial` into the folder under `name`, or the first numbered
    /// variant of it that is free, and removes the partial file. Returns the name used.
    fn place(&self, partial: &Path, name: &str) -> io::Result<(String, PathBuf)> {
        for candidate in candidates(name).take(10_000) {
            let target = self.root.join(&candidate);
            // NOTE: a hard link fails if the target exists, atomically: unlike a rename, it can
            // never replace a file that appeared since we looked.
            match fs::hard_link(partial, &target) {
                Ok(()) => {
                    fs::remove_file(partial)?;
                    return Ok((candidate, target));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) if hard_links_unsupported(&e) => {
                    if target.exists() {
                        continue;
                    }
                    fs::rename(partial, &target)?;
                    return Ok((candidate, target));
                }
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{name:?} and 10,000 numbered variants of it already exist"),
        ))
    }
}

fn hard_links_unsupported(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::Unsupported | io::ErrorKind::PermissionDenied
    )
}

/// A partial file reserved for one transfer; released when dropped.
struct Claim {
    path: PathBuf,
    key: String,
    /// Kept after an interruption, to be continued by the next offer of the same file.
    resumable: bool,
    dir: Arc<FileDir>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        lock(&self.dir.busy).remove(&self.key);
        self.dir.released.notify_all();
    }
}

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
                    let _ = blocking(move || fs::remove_file(&claim.path)).await;
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
                        let empty = fs::metadata(&claim.path).is_ok_and(|meta| meta.len() == 0);
                        if !claim.resumable || empty {
                            let _ = fs::remove_file(&claim.path);
                        }
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
        let partial = claim.path.clone();
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
                    let (dir, name) = (Arc::clone(&dir), name.clone());
                    let (saved, path) = blocking(move || dir.place(&partial, &name))
                        .await?
                        .map_err(|e| Failure::io("cannot move the file into place", &e))?;
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
    let (mut file, held) =
        open_partial(claim, resume, size).map_err(|e| Failure::io("cannot create the file", &e))?;
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

/// Opens the claim's partial file: the bytes it holds are kept when resuming is allowed (and
/// they are not more than the file's size), dropped otherwise. Returns the file, positioned at
/// its end, and how many bytes it holds.
fn open_partial(claim: &Claim, resume: bool, size: u64) -> io::Result<(File, u64)> {
    let mut options = OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    // NOTE: never through a symbolic link: one planted where a partial file goes would make an
    // upload overwrite (or a resume reveal) the file it points to.
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(
        &mut options,
        rustix::fs::OFlags::NOFOLLOW.bits() as i32,
    );
    let mut file = match options.open(&claim.path) {
        #[cfg(unix)]
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) => {
            // Someone planted a link there: it goes (never what it points to), and this
            // transfer starts afresh in a file of its own.
            log::warn!(
                "removed a symbolic link planted as the partial file {}",
                claim.path.display()
            );
            fs::remove_file(&claim.path)?;
            options.open(&claim.path)?
        }
        opened => opened?,
    };
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a partial file is not a regular file",
        ));
    }
    let mut held = file.metadata()?.len();
    if !(resume && claim.resumable) || held > size {
        file.set_len(0)?;
        held = 0;
    }
    file.seek(SeekFrom::Start(held))?;
    Ok((file, held))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder() -> (tempfile::TempDir, Arc<FileDir>) {
        let root = tempfile::tempdir().unwrap();
        let dir = FileDir::open("upload_dir", root.path(), 1 << 20, Duration::from_secs(60));
        (root, Arc::new(dir.unwrap()))
    }

    #[test]
    fn a_partial_file_belongs_to_the_certificate_that_sent_it() {
        let (_root, dir) = folder();
        let path = |owner: Option<&str>| dir.claim("a.bin", 10, owner, &[1; 16]).path.clone();
        let (alice, bob, anonymous) = (path(Some("ab:cd")), path(Some("ef:01")), path(None));
        assert_ne!(alice, bob, "two senders' partial files are apart");
        assert_ne!(alice, anonymous);
        assert_eq!(
            alice,
            path(Some("ab:cd")),
            "the same sender finds its own again"
        );
    }

    #[test]
    fn a_partial_file_belongs_to_the_token_it_was_made_for() {
        let (_root, dir) = folder();
        let path = |token: ResumeToken| dir.claim("a.bin", 10, None, &token).path.clone();
        let (mine, other) = (path([1; 16]), path([2; 16]));
        assert_ne!(
            mine, other,
            "another token never reaches this sender's file"
        );
        assert_eq!(mine, path([1; 16]), "the token finds its file again");
        let tokens: HashSet<_> = (0..100).map(|_| new_token().unwrap()).collect();
        assert_eq!(tokens.len(), 100, "tokens are random");
    }

    #[test]
    fn a_file_being_written_is_not_handed_to_a_second_transfer() {
        let (_root, dir) = folder();
        let first = dir.claim("a.bin", 10, None, &[1; 16]);
        let started = Instant::now();
        let second = dir.claim("a.bin", 10, None, &[1; 16]);
        assert!(
            started.elapsed() >= RELEASE_WAIT,
            "it waited for the first to let go"
        );
        assert_ne!(first.path, second.path);
        assert!(first.resumable && !second.resumable);
    }
}
