//! How the offline check runs: what it hashes, whether it repairs, what each kind's payloads
//! must hash to, and where its progress goes.

use std::fmt;
use std::sync::Arc;

use crate::hash::ContentDigest;

/// Which payloads [`EntryStore::check`](crate::EntryStore::check) hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Verify {
    /// None: sizes only.
    #[default]
    None,
    /// Up to this many entries, chosen afresh on each run.
    Sample(u64),
    /// Every entry whose row says what it must hash to.
    All,
}

/// Whether [`EntryStore::check`](crate::EntryStore::check) repairs what it finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Repair {
    /// Report only; change nothing.
    #[default]
    No,
    /// Delete temporary and orphan files, drop rows without their file, remove entries whose
    /// size or digest is wrong (row and file), finish interrupted removals, correct the total.
    Yes,
}

/// What a cache kind's row says its payload must hash to (`key`, `meta`), if anything: for
/// content-addressed caches the key itself, for downloads a digest in the metadata.
pub type ExpectedDigest = dyn Fn(&str, &str) -> Option<ContentDigest> + Send + Sync;

/// Progress of the hashing, in bytes: `(done, total)`.
pub type CheckProgress = dyn Fn(u64, u64) + Send + Sync;

/// How [`EntryStore::check`](crate::EntryStore::check) runs.
#[derive(Clone, Default)]
pub struct CheckOptions {
    pub(super) verify: Verify,
    pub(super) repair: Repair,
    pub(super) expected: Option<Arc<ExpectedDigest>>,
    pub(super) progress: Option<Arc<CheckProgress>>,
}

impl fmt::Debug for CheckOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckOptions")
            .field("verify", &self.verify)
            .field("repair", &self.repair)
            .finish_non_exhaustive()
    }
}

impl CheckOptions {
    /// Sizes and totals only, no repair.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Hash these payloads, against what `expected` says for each row.
    #[must_use]
    pub fn with_verify(mut self, verify: Verify, expected: Arc<ExpectedDigest>) -> Self {
        self.verify = verify;
        self.expected = Some(expected);
        self
    }

    /// Repair or not.
    #[must_use]
    pub fn with_repair(mut self, repair: Repair) -> Self {
        self.repair = repair;
        self
    }

    /// Called as payloads are hashed, with the bytes done and the total to hash.
    #[must_use]
    pub fn with_progress(mut self, progress: Arc<CheckProgress>) -> Self {
        self.progress = Some(progress);
        self
    }
}
