//! The values an [`EntryStore`](super::EntryStore) takes and hands out (what a row records,
//! an open entry, a store's result and outcome, the conflict rule) and its counters.

use std::sync::atomic::AtomicU64;

use crate::hash::ContentDigest;

/// What a store does when the key already has a live entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum OnConflict {
    /// Keep the existing entry and discard the new bytes: right for content-addressed keys,
    /// where the same key means the same bytes.
    KeepExisting,
    /// Replace the existing entry: right for keys whose content can change (a URL).
    Replace,
}

/// How a store ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreOutcome {
    /// A new entry.
    Inserted,
    /// An existing entry was replaced.
    Replaced,
    /// An entry with this key was already present and kept ([`OnConflict::KeepExisting`]).
    AlreadyPresent,
}

/// The result of a successful store.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stored {
    /// Bytes received (and, unless already present, stored).
    pub size: u64,
    /// The digest of the bytes received.
    pub digest: ContentDigest,
    /// How the store ended.
    pub outcome: StoreOutcome,
    /// The payload and row this store committed (none if the key was already present), for
    /// [`EntryStore::open_stored`](super::EntryStore::open_stored).
    pub(super) committed: Option<(String, EntryInfo)>,
}

/// What is recorded about an entry, without its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct EntryInfo {
    /// Payload size.
    pub size: u64,
    /// When the entry was stored or last refreshed, in milliseconds since the Unix epoch.
    pub stored_at_ms: i64,
    /// The cache kind's own metadata.
    pub meta: String,
}

/// An open cache entry: a file handle and what the row said.
///
/// The handle stays valid when the entry is evicted or replaced meanwhile: payload names are
/// never reused and an unlinked file lives on while it is open, so a reader always gets the
/// complete bytes it started with.
#[derive(Debug)]
#[non_exhaustive]
pub struct OpenEntry {
    /// The payload, positioned at its start.
    pub file: tokio::fs::File,
    /// The entry's row.
    pub info: EntryInfo,
}

/// Counters of an [`EntryStore`](super::EntryStore).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct EntryStats {
    /// Reads that found their entry.
    pub hits: u64,
    /// Reads that did not.
    pub misses: u64,
    /// Stores committed (inserted or replaced).
    pub stores: u64,
    /// Payload bytes committed by stores.
    pub bytes_stored: u64,
    /// Access-stamp writes to the database (batched: one per flushed key, not one per hit).
    pub access_writes: u64,
    /// Payloads whose fate is open: those of stores whose COMMIT failed unseen, kept until
    /// the database says whether a row names them (then deleted if none does), and payloads
    /// no row names whose deletion failed, retried; normally 0.
    pub unsettled: u64,
}

#[derive(Default)]
pub(super) struct Counters {
    pub(super) hits: AtomicU64,
    pub(super) misses: AtomicU64,
    pub(super) stores: AtomicU64,
    pub(super) bytes_stored: AtomicU64,
    pub(super) access_writes: AtomicU64,
}
