//! The SQL-backed entry store and the cache built on it, shared by every dunite cache kind.
//!
//! A cache kind (OCI blobs, downloads) decides how its keys look and how content is verified;
//! everything else lives here once: the database, the directory layout, the crash-safe store
//! sequence, reads that survive eviction, batched access stamps, reconciliation, and the
//! [`EvictionStore`](crate::EvictionStore) implementation the evictor drives.

mod cache;
mod check;
mod database;
mod faults;
mod layout;
mod reconcile;
mod store;

pub use cache::{CacheOptions, CacheStats, EntryCache};
pub use check::{CheckOptions, CheckProgress, CheckReport, ExpectedDigest, Finding, Problem, Repair, Verify};
pub use database::{Backend, Database, DatabaseOptions};
pub use faults::Faults;
pub use layout::Expected;
pub(crate) use layout::{Written, blocking};
pub use reconcile::ReconcileReport;
pub use store::{
    EntryInfo, EntryPass, EntryStats, EntryStore, KeyDisplay, ListOrder, ListPage, ListQuery, ListedEntry,
    OnConflict, OpenEntry, OriginUsage, Pin, Pinning, StoreOutcome, Stored,
};
