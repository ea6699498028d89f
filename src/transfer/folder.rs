//! A folder that receives files ([`FileDir`]): a server's `upload_dir` or a client's
//! `download_dir`, with its hidden folder of files in progress (`.socketcomm-partial/`), the
//! claims that keep two transfers out of one partial file, and the bounds on what partial
//! files may hold (age, total bytes, the disk's free space).
//!
//! Every file in the folder is opened, linked and removed relative to a handle on the folder
//! (`openat`, `linkat`, `unlinkat`), never by a path: a folder swapped for a symbolic link
//! after start-up, or a link planted where a partial file goes, is never followed.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustix::fs::{AtFlags, Mode, OFlags, RenameFlags};
use rustix::io::Errno;

use super::names::{candidates, PARTIAL_DIR};
use super::{hex, lock};
use crate::error::{Error, Result};
use crate::frame::ResumeToken;

/// How long an offer waits for an earlier transfer of the same file to let go of it (see
/// [`FileDir::claim`]).
pub(super) const RELEASE_WAIT: Duration = Duration::from_secs(2);

/// How long an interrupted transfer's partial file is kept for a resume by default.
pub const DEFAULT_PARTIAL_TTL: Duration = Duration::from_secs(24 * 3600);
/// How often, at most, partial files are looked at for expiry (when transfers begin).
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Transfers in progress into one folder (a server's `upload_dir`) at once, from every sender.
///
/// NOTE: each holds an open file: without the limit, one connection's flood of offers took
/// 521 threads and 512 descriptors, and honest uploads waited behind it.
pub const MAX_TRANSFERS: usize = 64;

/// The share of the folder's file system that partial files may hold when `max_partial_bytes`
/// is not given: a quarter.
const DEFAULT_PARTIAL_SHARE: u64 = 4;

/// What a folder takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FolderLimits {
    /// The largest file it takes, in bytes.
    pub max_file_size: u64,
    /// How long an interrupted transfer's partial file is kept.
    pub partial_ttl: Duration,
    /// The bytes that interrupted transfers' partial files, kept for a resume, may hold in all
    /// (the oldest give way first); `None`: a quarter of the file system.
    pub max_partial_bytes: Option<u64>,
}

impl Default for FolderLimits {
    fn default() -> FolderLimits {
        FolderLimits {
            max_file_size: super::DEFAULT_MAX_FILE_SIZE,
            partial_ttl: DEFAULT_PARTIAL_TTL,
            max_partial_bytes: None,
        }
    }
}

/// A folder that receives files.
#[derive(Debug)]
pub(crate) struct FileDir {
    root: PathBuf,
    root_fd: OwnedFd,
    partial_fd: OwnedFd,
    pub(super) max_file_size: u64,
    partial_ttl: Duration,
    max_partial_bytes: u64,
    /// The keys of the partial files that a transfer is writing now.
    busy: Mutex<HashSet<String>>,
    /// Notified when a key is released.
    released: Condvar,
    /// One permit per transfer in progress into this folder, from every sender together.
    pub(super) transfers: Arc<tokio::sync::Semaphore>,
    /// When partial files were last looked at for expiry.
    swept: Mutex<Instant>,
}

/// A partial file that no transfer is writing: when it was last written, its name in the
/// partial folder, its size.
type Idle = (SystemTime, String, u64);

impl FileDir {
    /// Checks that `root` is a folder this process can write to, and prepares the folder for
    /// files in progress inside it.
    ///
    /// # Errors
    /// [`Error::Io`] naming the path when it is missing, not a folder, or not writable.
    pub(crate) fn open(option: &'static str, root: &Path, limits: FolderLimits) -> Result<FileDir> {
        let fail = |e: io::Error| {
            Error::io_with_hint(
                format!("{option} {} cannot receive files", root.display()),
                e,
                "; create the folder, or choose one this user can write to",
            )
        };
        let root = root.canonicalize().map_err(fail)?;
        let folder = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let root_fd = rustix::fs::open(&root, folder, Mode::empty()).map_err(|e| {
            fail(match e {
                Errno::NOTDIR => io::Error::new(io::ErrorKind::NotADirectory, "it is not a folder"),
                e => e.into(),
            })
        })?;
        match rustix::fs::mkdirat(&root_fd, PARTIAL_DIR, Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(fail(e.into())),
        }
        let partial_fd = rustix::fs::openat(
            &root_fd,
            PARTIAL_DIR,
            folder | OFlags::NOFOLLOW,
            Mode::empty(),
        )
        .map_err(|e| match e {
            Errno::LOOP | Errno::NOTDIR => fail(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{PARTIAL_DIR} in it is a symbolic link or a file, not a folder of its own"
                ),
            )),
            e => fail(e.into()),
        })?;
        // Creating the folder may have succeeded long ago: check that writing works now.
        let probe = format!(".probe-{}", std::process::id());
        create(&partial_fd, &probe).map_err(fail)?;
        let _ = rustix::fs::unlinkat(&partial_fd, &probe, AtFlags::empty());
        let max_partial_bytes = match limits.max_partial_bytes {
            Some(bytes) => bytes,
            None => {
                let stat = rustix::fs::fstatvfs(&partial_fd).map_err(|e| fail(e.into()))?;
                (stat.f_blocks.saturating_mul(stat.f_frsize) / DEFAULT_PARTIAL_SHARE).max(1)
            }
        };
        let dir = FileDir {
            root,
            root_fd,
            partial_fd,
            max_file_size: limits.max_file_size,
            partial_ttl: limits.partial_ttl,
            max_partial_bytes,
            busy: Mutex::new(HashSet::new()),
            released: Condvar::new(),
            transfers: Arc::new(tokio::sync::Semaphore::new(MAX_TRANSFERS)),
            swept: Mutex::new(Instant::now()),
        };
        dir.sweep();
        dir.keep_within_bound();
        Ok(dir)
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
        limits: FolderLimits,
    ) -> Result<Option<Arc<FileDir>>> {
        root.map(|root| FileDir::open(option, root, limits).map(Arc::new))
            .transpose()
    }

    /// Where a file of the partial folder is, for messages.
    fn shown(&self, name: &str) -> PathBuf {
        self.root.join(PARTIAL_DIR).join(name)
    }

    /// The partial files that no transfer is writing now, oldest first, with their sizes.
    /// Called with the `busy` keys locked, so that none is claimed meanwhile.
    fn idle_partials(&self, busy: &HashSet<String>) -> Vec<Idle> {
        let Ok(entries) = rustix::fs::Dir::read_from(&self.partial_fd) else {
            return Vec::new();
        };
        let mut idle: Vec<Idle> = entries
            .filter_map(|entry| {
                let name = entry.ok()?.file_name().to_str().ok()?.to_owned();
                if busy.contains(name.strip_suffix(".part")?) {
                    return None;
                }
                // The entry itself, never what a planted link points to.
                let stat =
                    rustix::fs::statat(&self.partial_fd, &name, AtFlags::SYMLINK_NOFOLLOW).ok()?;
                let modified = UNIX_EPOCH
                    + Duration::new(
                        u64::try_from(stat.st_mtime).unwrap_or(0),
                        u32::try_from(stat.st_mtime_nsec).unwrap_or(0),
                    );
                Some((modified, name, u64::try_from(stat.st_size).unwrap_or(0)))
            })
            .collect();
        idle.sort();
        idle
    }

    /// Removes a file of the partial folder.
    fn remove(&self, name: &str) -> io::Result<()> {
        Ok(rustix::fs::unlinkat(
            &self.partial_fd,
            name,
            AtFlags::empty(),
        )?)
    }

    /// Removes the partial files untouched for longer than `partial_ttl`.
    fn sweep(&self) {
        let busy = lock(&self.busy);
        *lock(&self.swept) = Instant::now();
        let now = SystemTime::now();
        for (modified, name, _) in self.idle_partials(&busy) {
            if now.duration_since(modified).unwrap_or_default() > self.partial_ttl {
                log::info!(
                    "removed the partial file {} (untouched for over {:?}, partial_ttl)",
                    self.shown(&name).display(),
                    self.partial_ttl
                );
                let _ = self.remove(&name);
            }
        }
    }

    /// Sweeps if the last sweep is [`SWEEP_EVERY`] old.
    fn sweep_now_and_then(&self) {
        if lock(&self.swept).elapsed() >= SWEEP_EVERY {
            self.sweep();
        }
    }

    /// Bytes free for this user on the folder's file system.
    fn free_space(&self) -> io::Result<u64> {
        let stat = rustix::fs::fstatvfs(&self.partial_fd)?;
        Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
    }

    /// The free space once at least `needed` bytes are free, if removing other transfers'
    /// partial files (oldest first) can make that much room: a new transfer goes before an
    /// interrupted one that may never be resumed.
    ///
    /// NOTE: without this, a few interrupted uploads could fill the disk for good, and every
    /// honest upload after them was refused as `no_space`.
    pub(super) fn make_room(&self, needed: u64) -> io::Result<u64> {
        let mut free = self.free_space()?;
        if free >= needed {
            return Ok(free);
        }
        let busy = lock(&self.busy);
        for (_, name, size) in self.idle_partials(&busy) {
            log::info!(
                "removed the partial file {} ({size} bytes) to make room for a new transfer",
                self.shown(&name).display()
            );
            self.remove(&name)?;
            free = self.free_space()?;
            if free >= needed {
                break;
            }
        }
        Ok(free)
    }

    /// Keeps the partial files that no transfer is writing (those kept for a resume) within
    /// `max_partial_bytes`: the oldest give way first. Called at start and whenever a transfer
    /// is interrupted, the only times that what is kept grows.
    ///
    /// NOTE: a new transfer short of space already makes room (`make_room`); this bound keeps
    /// interrupted uploads that nobody resumes from filling a disk that other programs share.
    pub(super) fn keep_within_bound(&self) {
        let busy = lock(&self.busy);
        let idle = self.idle_partials(&busy);
        let mut total: u64 = idle.iter().map(|(_, _, size)| size).sum();
        for (_, name, size) in idle {
            if total <= self.max_partial_bytes {
                break;
            }
            log::info!(
                "removed the partial file {} ({size} bytes): interrupted transfers' files would \
                 hold {total} bytes, over max_partial_bytes ({} bytes)",
                self.shown(&name).display(),
                self.max_partial_bytes
            );
            if self.remove(&name).is_ok() {
                total -= size;
            }
        }
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
    pub(super) fn claim(
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
            name: format!("{key}.part"),
            key,
            resumable,
            dir: Arc::clone(self),
        }
    }

    /// Opens the claim's partial file: the bytes it holds are kept when resuming is allowed (and
    /// they are not more than the file's size), dropped otherwise. Returns the file, positioned
    /// at its end, and how many bytes it holds.
    pub(super) fn open_partial(
        &self,
        claim: &Claim,
        resume: bool,
        size: u64,
    ) -> io::Result<(File, u64)> {
        use std::io::{Seek, SeekFrom};
        // NOTE: never through a symbolic link: one planted where a partial file goes would make
        // an upload overwrite (or a resume reveal) the file it points to.
        let mut file = match open_read_write(&self.partial_fd, &claim.name) {
            Err(e) if e.raw_os_error() == Some(Errno::LOOP.raw_os_error()) => {
                // Someone planted a link there: it goes (never what it points to), and this
                // transfer starts afresh in a file of its own.
                log::warn!(
                    "removed a symbolic link planted as the partial file {}",
                    self.shown(&claim.name).display()
                );
                self.remove(&claim.name)?;
                open_read_write(&self.partial_fd, &claim.name)?
            }
            opened => opened?,
        };
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a partial file is not a regular file",
            ));
        }
        let mut held = meta.len();
        if !(resume && claim.resumable) || held > size {
            file.set_len(0)?;
            held = 0;
        }
        file.seek(SeekFrom::Start(held))?;
        Ok((file, held))
    }

    /// Links the finished partial file into the folder under `name`, or the first numbered
    /// variant of it that is free, and removes the partial file. Returns the name used and
    /// where the file now is.
    pub(super) fn place(&self, claim: &Claim, name: &str) -> io::Result<(String, PathBuf)> {
        for candidate in candidates(name).take(10_000) {
            // NOTE: a hard link fails if the target exists, atomically: unlike a rename, it can
            // never replace a file that appeared since we looked.
            let placed = match rustix::fs::linkat(
                &self.partial_fd,
                &claim.name,
                &self.root_fd,
                &candidate,
                AtFlags::empty(),
            ) {
                Ok(()) => self.remove(&claim.name),
                Err(Errno::EXIST) => continue,
                Err(Errno::PERM | Errno::OPNOTSUPP | Errno::MLINK) => {
                    // A file system without hard links: a rename that refuses to replace.
                    match rustix::fs::renameat_with(
                        &self.partial_fd,
                        &claim.name,
                        &self.root_fd,
                        &candidate,
                        RenameFlags::NOREPLACE,
                    ) {
                        Err(Errno::EXIST) => continue,
                        renamed => renamed.map_err(io::Error::from),
                    }
                }
                Err(e) => Err(e.into()),
            };
            return placed.map(|()| (candidate.clone(), self.root.join(&candidate)));
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{name:?} and 10,000 numbered variants of it already exist"),
        ))
    }
}

/// Creates (or truncates) a file of the partial folder, never through a link.
fn create(folder: &OwnedFd, name: &str) -> io::Result<File> {
    let flags =
        OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    Ok(rustix::fs::openat(folder, name, flags, Mode::from_raw_mode(0o600))?.into())
}

/// Opens (creating it if needed) a file of the partial folder for reading and writing, never
/// through a link.
fn open_read_write(folder: &OwnedFd, name: &str) -> io::Result<File> {
    let flags = OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    Ok(rustix::fs::openat(folder, name, flags, Mode::from_raw_mode(0o600))?.into())
}

/// A partial file reserved for one transfer; released when dropped.
#[derive(Debug)]
pub(super) struct Claim {
    /// Its name in the partial folder.
    name: String,
    key: String,
    /// Kept after an interruption, to be continued by the next offer of the same file.
    pub(super) resumable: bool,
    dir: Arc<FileDir>,
}

impl Claim {
    /// Removes the partial file.
    pub(super) fn remove(&self) {
        let _ = self.dir.remove(&self.name);
    }

    /// Lets go of the partial file (kept for a resume), then keeps what interrupted transfers
    /// hold within `max_partial_bytes`.
    pub(super) fn release_and_bound(self) {
        let dir = Arc::clone(&self.dir);
        drop(self);
        dir.keep_within_bound();
    }

    /// Whether the partial file holds nothing (or is gone).
    pub(super) fn is_empty(&self) -> bool {
        rustix::fs::statat(&self.dir.partial_fd, &self.name, AtFlags::SYMLINK_NOFOLLOW)
            .map_or(true, |stat| stat.st_size == 0)
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        lock(&self.dir.busy).remove(&self.key);
        self.dir.released.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder_with(limits: FolderLimits) -> (tempfile::TempDir, Arc<FileDir>) {
        let root = tempfile::tempdir().unwrap();
        let dir = FileDir::open("upload_dir", root.path(), limits);
        (root, Arc::new(dir.unwrap()))
    }

    fn folder() -> (tempfile::TempDir, Arc<FileDir>) {
        folder_with(FolderLimits {
            max_file_size: 1 << 20,
            partial_ttl: Duration::from_secs(60),
            max_partial_bytes: None,
        })
    }

    #[test]
    fn a_partial_file_belongs_to_the_certificate_that_sent_it() {
        let (_root, dir) = folder();
        let name = |owner: Option<&str>| dir.claim("a.bin", 10, owner, &[1; 16]).name.clone();
        let (alice, bob, anonymous) = (name(Some("ab:cd")), name(Some("ef:01")), name(None));
        assert_ne!(alice, bob, "two senders' partial files are apart");
        assert_ne!(alice, anonymous);
        assert_eq!(
            alice,
            name(Some("ab:cd")),
            "the same sender finds its own again"
        );
    }

    #[test]
    fn a_partial_file_belongs_to_the_token_it_was_made_for() {
        let (_root, dir) = folder();
        let name = |token: ResumeToken| dir.claim("a.bin", 10, None, &token).name.clone();
        let (mine, other) = (name([1; 16]), name([2; 16]));
        assert_ne!(
            mine, other,
            "another token never reaches this sender's file"
        );
        assert_eq!(mine, name([1; 16]), "the token finds its file again");
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
        assert_ne!(first.name, second.name);
        assert!(first.resumable && !second.resumable);
    }

    #[test]
    fn kept_partial_files_give_way_oldest_first_within_max_partial_bytes() {
        let (root, dir) = folder_with(FolderLimits {
            max_partial_bytes: Some(1000),
            ..FolderLimits::default()
        });
        // Three interrupted transfers kept for a resume, 400 bytes each, oldest first; one
        // more is being written (it does not count, and stays).
        let mut names = Vec::new();
        for n in 0..3u8 {
            let claim = dir.claim("kept.bin", 400, None, &[n; 16]);
            let (file, _) = dir.open_partial(&claim, true, 400).unwrap();
            file.set_len(400).unwrap();
            file.set_modified(SystemTime::now() - Duration::from_secs(100 - u64::from(n)))
                .unwrap();
            names.push(claim.name.clone());
        }
        let writing = dir.claim("writing.bin", 900, None, &[9; 16]);
        dir.open_partial(&writing, true, 900)
            .unwrap()
            .0
            .set_len(900)
            .unwrap();
        dir.keep_within_bound();
        let partial = root.path().join(PARTIAL_DIR);
        let kept: Vec<bool> = names
            .iter()
            .map(|name| partial.join(name).exists())
            .collect();
        assert_eq!(kept, [false, true, true], "the oldest went");
        assert!(partial.join(&writing.name).exists());
        // Within the bound, nothing more goes.
        dir.keep_within_bound();
        assert_eq!(dir.idle_partials(&lock(&dir.busy)).len(), 2);
    }

    #[test]
    fn the_partial_folder_swapped_for_a_link_after_start_is_never_followed() {
        let (root, dir) = folder();
        let elsewhere = tempfile::tempdir().unwrap();
        let partial = root.path().join(PARTIAL_DIR);
        std::fs::rename(&partial, root.path().join("moved")).unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), &partial).unwrap();
        let claim = dir.claim("a.bin", 10, None, &[1; 16]);
        let (mut file, _) = dir.open_partial(&claim, true, 10).unwrap();
        std::io::Write::write_all(&mut file, b"0123456789").unwrap();
        assert_eq!(
            std::fs::read_dir(elsewhere.path()).unwrap().count(),
            0,
            "nothing is written where the link points"
        );
        let (name, path) = dir.place(&claim, "a.bin").unwrap();
        assert_eq!(name, "a.bin");
        assert_eq!(std::fs::read(path).unwrap(), b"0123456789");
    }
}
