//! The shared core of dunite's bounded, content-addressed caches.
//!
//! Every dunite cache must stay under a byte cap. The naive way, spawning one eviction task
//! per stored item, falls over under a burst of stores: N tasks race for N database
//! connections against a bounded pool and lose with `PoolTimedOut`, so the cap stops being
//! enforced exactly when it matters. This crate fixes that once for every cache:
//!
//! - [`DebouncedEvictor`] is one long-lived task per cache. Stores [`poke`] it through a
//!   capacity-1 channel; extra pokes are dropped, so a burst of stores collapses into one
//!   pending pass, and a pass holds at most one connection.
//! - [`EvictionStore`] and [`EvictionPass`] are what a pass needs from a cache's metadata and
//!   payloads. A SQL implementation runs a whole pass on one connection and removes an entry
//!   only if it was not re-stored or touched after it was selected.
//! - [`EvictionPolicy`] says how large the cache may grow and how far a pass evicts.
//! - [`MemoryStore`] is an in-memory reference implementation of the store traits, for tests
//!   and for reading alongside the trait docs.
//! - [`EntryStore`] and [`EntryCache`] are the SQL-backed store and the cache built on it that
//!   every cache kind shares: payload files, rows, the crash-safe store sequence, reads that
//!   survive eviction, reconciliation. Cache kinds add only their keys and verification.
//! - [`Fills`] is the one miss path every cache kind shares: a single-flight fill per key,
//!   streamed to every client as it arrives, verified, and made the entry by rename (one
//!   disk write per miss).
//!
//! [`poke`]: DebouncedEvictor::poke
//!
//! # Example
//!
//! ```
//! use dunite_core::{DebouncedEvictor, EvictionPolicy, MemoryStore};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), dunite_core::Error> {
//! let store = MemoryStore::new();
//! let evictor = DebouncedEvictor::spawn(store.clone(), EvictionPolicy::new(100).with_low_watermark(80))?;
//!
//! // A cache commits its entry first, then pokes.
//! for i in 0..10 {
//!     store.insert(format!("entry-{i}"), 30);
//!     evictor.poke();
//! }
//!
//! // An explicit pass shares the task with the pokes, so it also waits for any pass in flight.
//! let report = evictor.evict_now().await?;
//! assert!(report.total_after <= 80);
//! assert!(store.total_bytes() <= 100);
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

mod entries;
mod error;
mod evictor;
mod fill;
mod hash;
mod memory;
mod policy;
mod store;

pub use entries::{
    Backend, CacheOptions, CacheStats, CheckOptions, CheckProgress, CheckReport, Database, DatabaseOptions,
    EntryCache, EntryInfo, EntryPass, EntryStats, EntryStore, Expected, ExpectedDigest, Faults, Finding,
    KeyDisplay, ListOrder, ListPage, ListQuery, ListedEntry, OnConflict, OpenEntry, OriginUsage, Pin,
    Pinning, Problem, ReconcileReport, Repair, StoreOutcome, Stored, Verify,
};
pub use error::{BoxError, Error, Result, StoreOp};
pub use evictor::{DebouncedEvictor, EvictorStats, PassOutcome, PassReport};
pub use fill::{
    DEFAULT_LEASE_TIMEOUT, FillError, FillOptions, Filling, Fills, Finished, Joined, LeaseHead, Started,
};
pub use hash::{ContentDigest, DigestAlgorithm};
pub use memory::{MemoryPass, MemoryStore, MemoryStoreError};
pub use policy::EvictionPolicy;
pub use store::{EvictionPass, EvictionStore, Removal, Victim};
