//! Locking a standard mutex without poisoning.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `mutex`, whether or not a thread panicked while holding it.
///
/// NOTE: the data behind the crate's locks stays consistent even if a holder panicked (each
/// is changed in one step under the lock), and a panic never crosses into Python: a poisoned
/// lock must not turn into a second panic.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
