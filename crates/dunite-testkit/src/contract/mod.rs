//! One contract suite for every byte-capped cache built on `dunite_core::EntryCache`.
//!
//! A cache kind's tests implement [`ContractCache`] for it, a small adapter that opens the
//! cache and stores, reads and refuses [`Item`]s through the cache's own API, then call the
//! suite's functions, one `#[test]` per contract item (so nextest names say which cache
//! broke which item). What each item checks:
//!
//! - [`burst`]: a burst of concurrent stores collapses into few eviction passes and
//!   converges under the cap; concurrent stores of one key count it once.
//! - [`pool`]: a burst of stores and reads on a pool of two connections (SQLite or
//!   PostgreSQL) sees no `PoolTimedOut` and ends under the cap, while the legacy
//!   spawn-a-pass-per-store pattern fails the same burst (so the test can fail).
//! - [`invariants`]: random store/read/remove/evict sequences keep rows, accounted total and
//!   files in agreement, under the cap, with every entry's bytes intact (a proptest).
//! - [`bad_input`]: a wrong digest, a wrong declared size, a cut stream or an entry over the
//!   cap is a typed error and stores nothing.
//!
//! Every item opens its cache on a [`test_database`] in a fresh temporary directory, so the
//! items can run in parallel (the timing-sensitive ones, `burst` and `pool`, run alone under
//! nextest: see `.config/nextest.toml`).

pub mod bad_input;
pub mod burst;
pub mod invariants;
pub mod pool;

use std::fmt::Debug;
use std::path::Path;

use dunite_core::{
    CacheStats, ContentDigest, Database, DatabaseOptions, DigestAlgorithm, EntryCache, EvictionPolicy,
    OnConflict, PassReport, StoreOutcome,
};

use crate::{TestBackend, TestDb, check_consistency, pseudo_random_bytes, test_database};

/// One entry the suite stores: `slot` says which key (for caches whose keys are names, not
/// digests), `version` and `size` which content, `verified` whether the store states the
/// content's SHA-256 (content-addressed caches always verify).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Item {
    /// The key's number, for caches keyed by name (a URL, say). Content-addressed caches key
    /// by the content's digest instead.
    pub slot: u64,
    /// Which content the slot holds: a new version is new bytes under the same name.
    pub version: u64,
    /// The content's length in bytes.
    pub size: usize,
    /// Whether the store states the SHA-256 to verify (a cache keyed by name may store
    /// without it; one keyed by digest always verifies).
    pub verified: bool,
}

impl Item {
    /// Version 0 of slot `slot`, `size` bytes, verified.
    #[must_use]
    pub fn new(slot: u64, size: usize) -> Self {
        Self { slot, version: 0, size, verified: true }
    }

    /// The seed of the item's bytes: distinct slots, versions and sizes give distinct bytes.
    #[must_use]
    pub fn seed(&self) -> u64 {
        self.slot * 1_000_000 + self.version * 10_000 + self.size as u64
    }

    /// The item's bytes.
    #[must_use]
    pub fn bytes(&self) -> Vec<u8> {
        pseudo_random_bytes(self.seed(), self.size)
    }

    /// The SHA-256 of the item's bytes.
    #[must_use]
    pub fn sha256(&self) -> ContentDigest {
        sha256(&self.bytes())
    }

    /// Another content of the same size under the same slot (the next version), for a store
    /// whose bytes are not those expected.
    #[must_use]
    pub fn other(&self) -> Self {
        Self { version: self.version + 1, ..*self }
    }
}

/// The SHA-256 of `bytes`.
#[must_use]
pub fn sha256(bytes: &[u8]) -> ContentDigest {
    ContentDigest::of(DigestAlgorithm::Sha256, bytes)
}

/// What a successful store of an [`Item`] answered.
#[derive(Debug, Clone)]
pub struct Put<K> {
    /// The key to read the entry back by.
    pub key: K,
    /// The SHA-256 of the content the cache now serves under the key.
    pub sha256: ContentDigest,
    /// How the store ended, when the cache reports it (a fetch-through cache whose callers
    /// share one fetch may not).
    pub outcome: Option<StoreOutcome>,
}

/// An entry read back whole, with what the cache recorded about it.
#[derive(Debug, Clone)]
pub struct Read {
    /// The bytes read.
    pub bytes: Vec<u8>,
    /// The size the cache recorded.
    pub size: u64,
    /// The SHA-256 the cache recorded (or, for a content-addressed cache, the key's digest).
    pub sha256: ContentDigest,
}

/// A store the cache must refuse, storing nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bad {
    /// The store expects the item's SHA-256 (its key, for a content-addressed cache) and
    /// streams [`Item::other`]'s bytes: a `DigestMismatch`.
    WrongDigest,
    /// The store declares this size (a length header, say) and streams the item's bytes: a
    /// `Truncated` when it is larger, a `TooLong` when it is smaller.
    DeclaredSize(u64),
    /// The stream declares the item's size and fails after `good` bytes, as a cut connection
    /// does (see [`CutAfter`](crate::CutAfter)): a `Source` error.
    Cut {
        /// The bytes delivered before the failure.
        good: usize,
    },
    /// The item is over the cap. Declared, the store declares its size and its stream must
    /// not be read (see [`MustNotRead`](crate::MustNotRead)); undeclared, its bytes stream
    /// with no size given and the cache stops once they cross the cap. A `TooLarge`.
    OverCap {
        /// Whether the size is declared up front.
        declared: bool,
    },
}

/// A cache under contract: the adapter a cache kind's tests implement so the suite can drive
/// it. Cloning shares the cache, as cloning the cache itself does.
///
/// Methods go through the cache's own API (not the [`EntryCache`] underneath) wherever the
/// cache has one, so the suite checks what callers use.
pub trait ContractCache: Clone + Send + Sync + 'static {
    /// What the cache's entries are looked up by.
    type Key: Clone + Debug + Send + Sync + 'static;
    /// The cache's error.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The namespace of the cache's rows.
    const NAMESPACE: &'static str;
    /// What a store of a key already present does in this cache (for the legacy burst on a
    /// bare entry store, which must store as the cache does).
    const ON_CONFLICT: OnConflict;

    /// Open the cache with payloads under `dir` and rows in `database`, evicted by `policy`.
    /// With `stale`, entries are stale as soon as they are stored (a cache with a freshness,
    /// revalidating every hit); caches without a notion of freshness ignore it.
    fn open(
        dir: &Path,
        database: Database,
        policy: EvictionPolicy,
        stale: bool,
    ) -> impl Future<Output = Self> + Send;

    /// The key `item` is stored under, as the entry store sees it (its row's key).
    fn key_string(item: &Item) -> String;

    /// Store `item` through the cache (for a fetch-through cache: serve it upstream, then
    /// fetch it through).
    fn put(&self, item: &Item) -> impl Future<Output = Result<Put<Self::Key>, Self::Error>> + Send;

    /// Store `item` the bad way `bad` says; returns the key the store was for and its result.
    fn put_bad(
        &self,
        item: &Item,
        bad: Bad,
    ) -> impl Future<Output = (Self::Key, Result<(), Self::Error>)> + Send;

    /// Open `key`'s entry as a hit does (recording the access), without reading it; whether
    /// it was there.
    fn open_entry(&self, key: &Self::Key) -> impl Future<Output = Result<bool, Self::Error>> + Send;

    /// Open `key`'s entry and read it whole.
    fn read(&self, key: &Self::Key) -> impl Future<Output = Result<Option<Read>, Self::Error>> + Send;

    /// Whether `key` is present (no access recorded).
    fn contains(&self, key: &Self::Key) -> impl Future<Output = Result<bool, Self::Error>> + Send;

    /// Remove `key` now; the bytes freed, if it was present.
    fn remove(&self, key: &Self::Key) -> impl Future<Output = Result<Option<u64>, Self::Error>> + Send;

    /// The accounted total.
    fn total_bytes(&self) -> impl Future<Output = Result<u64, Self::Error>> + Send;

    /// The number of entries.
    fn entry_count(&self) -> impl Future<Output = Result<u64, Self::Error>> + Send;

    /// Run an eviction pass now and wait for it.
    fn evict_now(&self) -> impl Future<Output = Result<PassReport, Self::Error>> + Send;

    /// The cache's counters.
    fn stats(&self) -> CacheStats;

    /// The entry cache underneath, for [`check_consistency`].
    fn entry_cache(&self) -> &EntryCache;

    /// The core error inside `error`, when the cache itself failed or refused the content.
    fn as_core(error: &Self::Error) -> Option<&dunite_core::Error>;

    /// For a fetch-through cache, how many times its source (the upstream) was asked so far;
    /// `None` for a cache that is handed its bytes. The suite checks that every miss asked
    /// exactly once.
    fn source_calls(&self) -> Option<u64> {
        None
    }

    /// Whether a successful [`put`](Self::put) of `item` must serve exactly `item`'s bytes.
    /// True by default; a cache that answers a request stating no SHA-256 with a fresh
    /// entry's older content says false for such items.
    fn serves_what_was_put(&self, item: &Item) -> bool {
        let _ = item;
        true
    }
}

/// A cache under test in a temporary directory, with its database's guard: the cache drops
/// first, then the database, then the directory.
#[derive(Debug)]
pub struct Opened<C> {
    /// The cache.
    pub cache: C,
    db: TestDb,
    dir: tempfile::TempDir,
}

impl<C: ContractCache> Opened<C> {
    /// The cache's payload directory.
    #[must_use]
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The database the cache's rows live in.
    #[must_use]
    pub fn database(&self) -> &Database {
        self.db.database()
    }

    /// [`check_consistency`] of the cache's rows, total and files; returns the total.
    ///
    /// # Errors
    ///
    /// The first disagreement.
    pub async fn check_consistency(&self) -> Result<u64, String> {
        check_consistency(self.cache.entry_cache().entries(), self.dir()).await
    }

    /// Read `key` back whole, if present, and check it against its recorded size and SHA-256.
    ///
    /// # Panics
    ///
    /// If the read fails or the bytes differ from what was recorded.
    pub async fn read_verified(&self, key: &C::Key) -> Option<Vec<u8>> {
        read_verified(&self.cache, key).await
    }
}

/// Open `C` in a fresh temporary directory on `backend` with `options`, evicted by `policy`
/// (`stale` as [`ContractCache::open`] says). `None` when the PostgreSQL test server is not
/// configured, which [`pg::server_url`](crate::pg::server_url) allows only outside CI.
///
/// # Panics
///
/// When the directory or the database cannot be created.
pub async fn open<C: ContractCache>(
    backend: TestBackend,
    options: &DatabaseOptions,
    policy: EvictionPolicy,
    stale: bool,
) -> Option<Opened<C>> {
    let dir = tempfile::tempdir().expect("create a temporary directory");
    let db = test_database(backend, dir.path(), options).await?;
    let cache = C::open(dir.path(), db.database().clone(), policy, stale).await;
    Some(Opened { cache, db, dir })
}

/// Read `key` back whole, if present, and check it against its recorded size and SHA-256.
///
/// # Panics
///
/// If the read fails or the bytes differ from what was recorded.
pub async fn read_verified<C: ContractCache>(cache: &C, key: &C::Key) -> Option<Vec<u8>> {
    let read = cache.read(key).await.expect("read an entry")?;
    assert_eq!(read.bytes.len() as u64, read.size, "{key:?}: bytes read differ from the size recorded");
    assert_eq!(sha256(&read.bytes), read.sha256, "{key:?}: cached bytes differ from their sha256");
    Some(read.bytes)
}

/// The core error of a cache error.
///
/// # Panics
///
/// If `error` is not a core error.
pub fn core_error<C: ContractCache>(error: &C::Error) -> &dunite_core::Error {
    C::as_core(error).unwrap_or_else(|| panic!("expected a cache (core) error, got {error:?}"))
}
