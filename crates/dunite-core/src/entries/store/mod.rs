//! `EntryStore`: the SQL-backed entry store every dunite cache shares.
//!
//! This file holds the type, its shared state (`Inner`), opening, the public accessors
//! (settings, the accounted total, counters) and the small helpers the others share. Each
//! other concept has a file of its own:
//!
//! - `rows`: the values a store hands out and counts (`EntryInfo`, `Stored`, `EntryStats`...);
//! - `bookkeeping`: in-process state: the clock, access stamps and their flusher, pins;
//! - `write`: the write path (stores, their commit, refresh) and `adjust_totals`, the one
//!   writer of `totals`;
//! - `read`: the read path (lookups, opens);
//! - `removal`: removal (mark, unlink, delete), interrupted removals, and settling stores
//!   whose COMMIT failed unseen;
//! - `pass`: `EntryPass`, the [`EvictionStore`](crate::EvictionStore) and
//!   [`EvictionPass`](crate::EvictionPass) implementations;
//! - `pinning`: operators' pins, kept in the row and skipped by victim selection;
//! - `listing`: pages of entries for operators;
//! - `origins`: which origins (repositories) entries were served through.

mod bookkeeping;
mod listing;
mod origins;
mod pass;
mod pinning;
mod read;
mod removal;
mod rows;
mod write;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::AnyConnection;

use self::bookkeeping::Clock;
use self::removal::Unsettled;
use self::rows::Counters;
use super::database::Database;
use super::faults::Faults;
use super::layout::Layout;
use crate::{Error, Result};

pub use self::bookkeeping::Pin;
pub use self::listing::{ListOrder, ListPage, ListQuery, ListedEntry};
pub use self::origins::OriginUsage;
pub use self::pass::EntryPass;
pub use self::pinning::Pinning;
pub use self::rows::{EntryInfo, EntryStats, OnConflict, OpenEntry, StoreOutcome, Stored};
pub(crate) use self::write::adjust_totals;

/// A cache's entries: payload files in a directory and rows in a database namespace.
///
/// This is the storage half every dunite cache shares; [`EntryCache`](crate::EntryCache)
/// adds the evictor. A store streams into a temporary file, verifies it, syncs and renames it
/// into place, and only then commits its row (with the accounted total, in one
/// transaction). A failure at any step leaves no row, no visible file and no bytes counted.
///
/// Implements [`EvictionStore`](crate::EvictionStore): a pass runs on one pooled connection;
/// removal marks the row, unlinks the file (no transaction held) and deletes the row, only if
/// the entry is unchanged since it was selected, is not pinned and has no newer access stamp
/// pending.
#[derive(Clone)]
pub struct EntryStore {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) db: Database,
    pub(crate) namespace: String,
    pub(crate) layout: Layout,
    pub(crate) max_bytes: u64,
    on_conflict: OnConflict,
    clock: Clock,
    /// Access stamps not yet written: key -> stamp. Flushed in batches.
    touches: Mutex<HashMap<String, i64>>,
    /// In-flight pins: key -> count. Pinned entries are never evicted.
    pins: Mutex<HashMap<String, usize>>,
    /// Payloads whose fate is open: stores whose COMMIT failed unseen (kept until the
    /// database says whether the commit happened, then deleted if no row names it), and
    /// payloads no row names whose deletion failed (retried).
    unsettled: Mutex<Vec<Unsettled>>,
    /// Called after every commit that may have added bytes (the cache's evictor poke).
    on_commit: std::sync::OnceLock<CommitHook>,
    /// Where the next pass's scan for interrupted removals starts (a version): so rows that
    /// cannot be finished do not hide the ones behind them.
    marked_after: AtomicI64,
    counters: Counters,
    show_key: KeyDisplay,
    /// Origins served through, queued for the flusher.
    origins: origins::Origins,
}

/// What [`EntryStore::set_commit_hook`] installs.
pub(crate) type CommitHook = Box<dyn Fn() + Send + Sync>;

/// How a cache's keys are shown in logs and errors (see [`CacheOptions::with_key_display`]).
///
/// [`CacheOptions::with_key_display`]: crate::CacheOptions::with_key_display
pub type KeyDisplay = fn(&str) -> String;

impl Inner {
    /// `key` as logs and errors show it.
    pub(crate) fn shown(&self, key: &str) -> String {
        (self.show_key)(key)
    }

    /// Tell the hook that bytes may have been added (see [`EntryStore::set_commit_hook`]).
    fn committed(&self) {
        if let Some(hook) = self.on_commit.get() {
            hook();
        }
    }
}

impl fmt::Debug for EntryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EntryStore")
            .field("namespace", &self.inner.namespace)
            .field("layout", &self.inner.layout)
            .field("max_bytes", &self.inner.max_bytes)
            .finish_non_exhaustive()
    }
}

/// `rows` parenthesised groups of `cols` numbered placeholders, starting at `$first`:
/// `values_list(2, 2, 2)` is `($2, $3), ($4, $5)`.
fn values_list(first: usize, rows: usize, cols: usize) -> String {
    let mut out = String::with_capacity(rows * cols * 6);
    for row in 0..rows {
        if row > 0 {
            out.push_str(", ");
        }
        out.push('(');
        for col in 0..cols {
            if col > 0 {
                out.push_str(", ");
            }
            out.push_str(&format!("${}", first + row * cols + col));
        }
        out.push(')');
    }
    out
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl EntryStore {
    /// Open the entries of `namespace` in `db`, with payloads under `dir`. Creates what is
    /// missing and reconciles the directory with the rows (see [`reconcile`](Self::reconcile)).
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the directory cannot be created, [`Error::Database`] if the database
    /// cannot be read or written.
    pub async fn open(
        db: Database,
        namespace: &str,
        dir: &std::path::Path,
        max_bytes: u64,
        on_conflict: OnConflict,
    ) -> Result<Self> {
        Self::open_with_key_display(db, namespace, dir, max_bytes, on_conflict, |key| key.to_owned()).await
    }

    /// As [`open`](Self::open), with keys shown in logs and errors through `show_key` (for
    /// keys that may hold a secret, such as URLs with a token in their query).
    ///
    /// # Errors
    ///
    /// As [`open`](Self::open).
    pub async fn open_with_key_display(
        db: Database,
        namespace: &str,
        dir: &std::path::Path,
        max_bytes: u64,
        on_conflict: OnConflict,
        show_key: KeyDisplay,
    ) -> Result<Self> {
        let store = Self::open_unreconciled(db, namespace, dir, max_bytes, on_conflict, show_key).await?;
        store.reconcile().await?;
        Ok(store)
    }

    /// As [`open_with_key_display`](Self::open_with_key_display), without the reconcile (for
    /// the offline check, which reports before it repairs).
    pub(crate) async fn open_unreconciled(
        db: Database,
        namespace: &str,
        dir: &std::path::Path,
        max_bytes: u64,
        on_conflict: OnConflict,
        show_key: KeyDisplay,
    ) -> Result<Self> {
        if namespace.is_empty() {
            return Err(Error::InvalidConfig("cache namespace must not be empty".into()));
        }
        if max_bytes > i64::MAX as u64 {
            return Err(Error::InvalidConfig(format!(
                "max_bytes {max_bytes} is larger than the database can count"
            )));
        }
        let layout = Layout::create(dir).await?;
        db.round_trip().await;
        sqlx::query(
            "INSERT INTO totals (namespace, bytes, entries) VALUES ($1, 0, 0) ON CONFLICT DO NOTHING",
        )
        .bind(namespace)
        .execute(db.pool())
        .await
        .map_err(Error::db("create the totals row"))?;
        let store = Self {
            inner: Arc::new(Inner {
                db,
                namespace: namespace.to_owned(),
                layout,
                max_bytes,
                on_conflict,
                clock: Clock::default(),
                touches: Mutex::default(),
                unsettled: Mutex::default(),
                on_commit: std::sync::OnceLock::new(),
                marked_after: AtomicI64::new(i64::MIN),
                pins: Mutex::default(),
                counters: Counters::default(),
                show_key,
                origins: origins::Origins::default(),
            }),
        };
        Ok(store)
    }

    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    /// Call `hook` after every commit that may have added bytes: a store that committed, one
    /// whose COMMIT failed unseen (it may have happened), and a settled one found committed.
    /// Set once, by [`EntryCache`](crate::EntryCache), to poke its evictor.
    pub(crate) fn set_commit_hook(&self, hook: CommitHook) {
        if self.inner.on_commit.set(hook).is_err() {
            tracing::debug!("commit hook already set; kept the first");
        }
    }

    /// Faults to inject into this store's next operations, for tests and simulations (see
    /// [`Faults`]). Shared by every clone of the store.
    #[must_use]
    pub fn faults(&self) -> &Faults {
        &self.inner.layout.faults
    }

    /// The database the rows live in.
    #[must_use]
    pub fn database(&self) -> &Database {
        &self.inner.db
    }

    /// The namespace of this store's rows.
    #[must_use]
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    /// The cap: no single entry may be larger.
    #[must_use]
    pub fn max_bytes(&self) -> u64 {
        self.inner.max_bytes
    }

    /// Where this store writes payloads before they are moved into place (fill spools too):
    /// on the payloads' file system.
    pub(crate) fn tmp_dir(&self) -> &std::path::Path {
        self.inner.layout.tmp_dir()
    }

    /// `key` as logs and errors show it.
    pub(crate) fn shown(&self, key: &str) -> String {
        self.inner.shown(key)
    }

    /// The accounted total of payload bytes: one row read, whatever the cache holds.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if the total cannot be read.
    pub async fn total_bytes(&self) -> Result<u64> {
        Ok(self.totals().await?.0)
    }

    /// The number of entries, kept alongside the total.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if the count cannot be read.
    pub async fn len(&self) -> Result<u64> {
        Ok(self.totals().await?.1)
    }

    /// Whether the cache holds no entries.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if the count cannot be read.
    pub async fn is_empty(&self) -> Result<bool> {
        Ok(self.len().await? == 0)
    }

    async fn totals(&self) -> Result<(u64, u64)> {
        let mut conn = self.inner.db.acquire().await?;
        self.inner.totals_on(&mut conn).await
    }

    /// Counters since the store was opened.
    #[must_use]
    pub fn stats(&self) -> EntryStats {
        let c = &self.inner.counters;
        EntryStats {
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            stores: c.stores.load(Ordering::Relaxed),
            bytes_stored: c.bytes_stored.load(Ordering::Relaxed),
            access_writes: c.access_writes.load(Ordering::Relaxed),
            unsettled: lock(&self.inner.unsettled).len() as u64,
        }
    }
}

impl Inner {
    pub(crate) async fn totals_on(&self, conn: &mut AnyConnection) -> Result<(u64, u64)> {
        self.db.round_trip().await;
        let (bytes, entries): (i64, i64) =
            sqlx::query_as("SELECT bytes, entries FROM totals WHERE namespace = $1")
                .bind(&self.namespace)
                .fetch_one(&mut *conn)
                .await
                .map_err(Error::db("read the accounted total"))?;
        Ok((to_u64(bytes), to_u64(entries)))
    }
}
