//! Faults a test or a simulation can inject into an [`EntryStore`](crate::EntryStore): the
//! failures of a far, unreliable database and a shared volume, made to happen on demand.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Faults to inject into one store's next operations, for tests and simulations; none by
/// default, and each costs one atomic load when none is armed.
///
/// Each method arms a count: the next `n` operations of that kind fail in that way, then the
/// store behaves normally again. Reached through [`EntryStore::faults`](crate::EntryStore::faults).
///
/// # Example
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> dunite_core::Result<()> {
/// use dunite_core::{Database, DatabaseOptions, EntryStore, Expected, OnConflict};
///
/// let dir = tempfile::tempdir().unwrap();
/// let db = Database::open_sqlite(&dir.path().join("metadata.db"), &DatabaseOptions::new()).await?;
/// let store = EntryStore::open(db, "blobs", dir.path(), 1 << 20, OnConflict::KeepExisting).await?;
/// // The next store commits, but its caller is told the COMMIT's answer was lost.
/// store.faults().lose_commit_answers(1);
/// assert!(store.store("k", &b"bytes"[..], &Expected::new(), "").await.is_err());
/// assert!(store.contains("k").await?);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Default)]
pub struct Faults {
    commit_answers_lost: AtomicU32,
    commits_lost: AtomicU32,
    unlinks_failed: AtomicU32,
    unlinks_refused: AtomicU64,
}

impl Faults {
    /// The next `n` stores apply their COMMIT, then report it failed as if the connection
    /// dropped before the answer came back.
    pub fn lose_commit_answers(&self, n: u32) {
        self.commit_answers_lost.store(n, Ordering::SeqCst);
    }

    /// The next `n` stores lose their COMMIT on the way: rolled back, and reported failed with
    /// the same error as a lost answer (the store cannot tell the two apart).
    pub fn lose_commits(&self, n: u32) {
        self.commits_lost.store(n, Ordering::SeqCst);
    }

    /// The next `n` payload deletions fail with an I/O error, as on a volume that refuses them.
    pub fn fail_unlinks(&self, n: u32) {
        self.unlinks_failed.store(n, Ordering::SeqCst);
    }

    /// Disarm every fault.
    pub fn clear(&self) {
        for counter in [&self.commit_answers_lost, &self.commits_lost, &self.unlinks_failed] {
            counter.store(0, Ordering::SeqCst);
        }
    }

    pub(crate) fn commit_answer_lost(&self) -> bool {
        take(&self.commit_answers_lost)
    }

    pub(crate) fn commit_lost(&self) -> bool {
        take(&self.commits_lost)
    }

    /// How many payload deletions this has failed so far (armed with
    /// [`fail_unlinks`](Self::fail_unlinks)); [`clear`](Self::clear) does not reset it.
    pub fn unlinks_refused(&self) -> u64 {
        self.unlinks_refused.load(Ordering::SeqCst)
    }

    pub(crate) fn unlink_failed(&self) -> bool {
        let failed = take(&self.unlinks_failed);
        if failed {
            self.unlinks_refused.fetch_add(1, Ordering::SeqCst);
        }
        failed
    }
}

/// Use up one of `counter`'s armed faults, if any.
fn take(counter: &AtomicU32) -> bool {
    counter.load(Ordering::Relaxed) > 0
        && counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
}

/// The error an injected fault reports.
pub(crate) fn injected(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::ConnectionReset, format!("injected fault: {what}"))
}
