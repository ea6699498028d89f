//! The sender's book of resume tokens: for each file this process (or an earlier one) began to
//! send and did not finish, the token its receiver handed out, so that sending the same file
//! again continues the receiver's partial copy. Without the token a receiver gives nobody that
//! copy (see `receive.rs`): a partial file is its sender's alone.
//!
//! The book lives in memory and, where it can, in a folder on disk, so that a program started
//! again after a crash or a kill resumes too: `SOCKETCOMM_RESUME_DIR`, else
//! `$XDG_CACHE_HOME/socketcomm/resume`, else `~/.cache/socketcomm/resume`. Each entry is a file
//! (mode 0600, in a folder of mode 0700) named after the receiver, the file's path, size and
//! modification time, holding the token in hex; it goes once the file has arrived. An entry
//! untouched for a week is removed. A folder that cannot be written leaves the book in memory.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{hex, lock};
use crate::frame::{ResumeToken, RESUME_TOKEN_LEN};

/// How long an entry is kept: past this the receiver has most likely dropped its partial copy
/// (`partial_ttl`, a day by default).
const ENTRY_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// The environment variable that names the book's folder.
pub const RESUME_DIR_ENV: &str = "SOCKETCOMM_RESUME_DIR";

/// Where a file's token is kept: one file being sent to one receiver.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Entry(String);

impl Entry {
    /// The entry of the file at `path` (as it is now: its size and modification time, so that
    /// a file changed since is a new one) sent to `receiver` (the receiver's IP address).
    pub(crate) fn new(
        receiver: &str,
        path: &Path,
        size: u64,
        modified: Option<SystemTime>,
    ) -> Entry {
        let path = path.canonicalize().unwrap_or_else(|_| path.to_owned());
        let modified = modified
            .and_then(|time| time.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |since| since.as_nanos());
        let mut hasher = blake3::Hasher::new();
        for part in [
            receiver.as_bytes(),
            path.as_os_str().as_encoded_bytes(),
            &size.to_be_bytes(),
            &modified.to_be_bytes(),
        ] {
            hasher.update(&(part.len() as u64).to_be_bytes());
            hasher.update(part);
        }
        Entry(hex(hasher.finalize().as_bytes())[..32].to_owned())
    }
}

/// The tokens of the files whose sending did not finish.
#[derive(Debug)]
pub(crate) struct Book {
    memory: Mutex<HashMap<Entry, ResumeToken>>,
    folder: Option<PathBuf>,
}

impl Book {
    /// The process's book, in the folder the environment names (read once).
    pub(crate) fn global() -> &'static Book {
        static BOOK: OnceLock<Book> = OnceLock::new();
        BOOK.get_or_init(|| Book::new(default_folder()))
    }

    /// A book kept in `folder` (created when first written), or in memory only.
    pub(crate) fn new(folder: Option<PathBuf>) -> Book {
        Book {
            memory: Mutex::new(HashMap::new()),
            folder,
        }
    }

    /// The token kept for `entry`, if any. Reads the disk: call it off the network loop.
    pub(crate) fn get(&self, entry: &Entry) -> Option<ResumeToken> {
        if let Some(token) = lock(&self.memory).get(entry) {
            return Some(*token);
        }
        let text = fs::read_to_string(self.folder.as_ref()?.join(&entry.0)).ok()?;
        parse(text.trim())
    }

    /// Keeps `token` for `entry`. Writes the disk: call it off the network loop.
    pub(crate) fn put(&self, entry: &Entry, token: ResumeToken) {
        lock(&self.memory).insert(entry.clone(), token);
        if let Some(folder) = &self.folder {
            if let Err(e) = write_entry(folder, &entry.0, &token) {
                log::debug!(
                    "cannot keep a resume token in {} ({e}); it is kept in memory only",
                    folder.display()
                );
            }
        }
    }

    /// Forgets `entry`: its file has arrived, or its receiver holds nothing of it.
    pub(crate) fn forget(&self, entry: &Entry) {
        lock(&self.memory).remove(entry);
        if let Some(folder) = &self.folder {
            let _ = fs::remove_file(folder.join(&entry.0));
        }
    }
}

fn default_folder() -> Option<PathBuf> {
    let named = |var: &str| std::env::var_os(var).filter(|value| !value.is_empty());
    if let Some(folder) = named(RESUME_DIR_ENV) {
        return Some(PathBuf::from(folder));
    }
    let cache = named("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| named("HOME").map(|home| Path::new(&home).join(".cache")))?;
    Some(cache.join("socketcomm").join("resume"))
}

fn parse(text: &str) -> Option<ResumeToken> {
    if text.len() != 2 * RESUME_TOKEN_LEN {
        return None;
    }
    let mut token = [0; RESUME_TOKEN_LEN];
    for (byte, pair) in token.iter_mut().zip(text.as_bytes().chunks(2)) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(token)
}

/// Writes the entry whole or not at all (a temporary file renamed into place), readable by
/// this user only: a token is what lets its holder continue the receiver's copy.
fn write_entry(folder: &Path, name: &str, token: &ResumeToken) -> io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(folder)?;
    expire(folder);
    let temporary = folder.join(format!(".{name}.{}", std::process::id()));
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let written = options
        .open(&temporary)
        .and_then(|mut file| file.write_all(hex(token).as_bytes()))
        .and_then(|()| fs::rename(&temporary, folder.join(name)));
    if written.is_err() {
        let _ = fs::remove_file(&temporary);
    }
    written
}

/// Removes the entries untouched for [`ENTRY_TTL`].
fn expire(folder: &Path) {
    let Ok(entries) = fs::read_dir(folder) else {
        return;
    };
    let now = SystemTime::now();
    for entry in entries.flatten() {
        let old = entry
            .metadata()
            .and_then(|meta| meta.modified())
            .is_ok_and(|modified| now.duration_since(modified).unwrap_or_default() > ENTRY_TTL);
        if old {
            let _ = fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_outlives_the_process_that_kept_it() {
        let folder = tempfile::tempdir().unwrap();
        let file = folder.path().join("a.bin");
        fs::write(&file, b"12345").unwrap();
        let entry = Entry::new("127.0.0.1", &file, 5, None);
        Book::new(Some(folder.path().join("book"))).put(&entry, [7; 16]);
        // A new book reads the same folder, as a program started again would.
        let again = Book::new(Some(folder.path().join("book")));
        assert_eq!(again.get(&entry), Some([7; 16]));
        again.forget(&entry);
        assert_eq!(
            Book::new(Some(folder.path().join("book"))).get(&entry),
            None
        );
    }

    #[test]
    fn another_receiver_or_a_changed_file_is_another_entry() {
        let file = Path::new("/tmp/a.bin");
        let entry = Entry::new("127.0.0.1", file, 5, None);
        assert_ne!(entry, Entry::new("127.0.0.2", file, 5, None));
        assert_ne!(entry, Entry::new("127.0.0.1", file, 6, None));
        assert_ne!(
            entry,
            Entry::new("127.0.0.1", file, 5, Some(SystemTime::now()))
        );
    }

    #[test]
    #[cfg(unix)]
    fn only_its_user_reads_a_token() {
        use std::os::unix::fs::PermissionsExt;
        let folder = tempfile::tempdir().unwrap();
        let book = Book::new(Some(folder.path().join("book")));
        let entry = Entry::new("r", Path::new("/x"), 1, None);
        book.put(&entry, [1; 16]);
        let mode = |path: &Path| fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&folder.path().join("book")), 0o700);
        assert_eq!(mode(&folder.path().join("book").join(&entry.0)), 0o600);
    }

    #[test]
    fn an_unwritable_folder_leaves_the_book_in_memory() {
        let folder = tempfile::tempdir().unwrap();
        let blocked = folder.path().join("file");
        fs::write(&blocked, b"").unwrap();
        let book = Book::new(Some(blocked.join("book")));
        let entry = Entry::new("r", Path::new("/x"), 1, None);
        book.put(&entry, [2; 16]);
        assert_eq!(book.get(&entry), Some([2; 16]));
    }
}
