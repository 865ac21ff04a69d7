//! `EntryStore`: the SQL-backed entry store every dunite cache shares.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyConnection};
use tokio::io::AsyncRead;

use super::database::Database;
use super::faults::{self, Faults};
use super::layout::{Expected, Layout};
use crate::hash::ContentDigest;
use crate::{Error, EvictionPass, EvictionStore, Removal, Result, Victim};

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
    /// [`EntryStore::open_stored`].
    committed: Option<(String, EntryInfo)>,
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

/// Counters of an [`EntryStore`].
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
    /// Payloads of stores whose COMMIT failed unseen, kept until the database says whether
    /// a row names them (then deleted if none does); normally 0.
    pub unsettled: u64,
}

/// A cache's entries: payload files in a directory and rows in a database namespace.
///
/// This is the storage half every dunite cache shares; [`EntryCache`](crate::EntryCache)
/// adds the evictor. A store streams into a temporary file, verifies it, syncs and renames it
/// into place, and only then commits its row (with the accounted total, in one
/// transaction). A failure at any step leaves no row, no visible file and no bytes counted.
///
/// Implements [`EvictionStore`]: a pass runs on one pooled connection; removal marks the row,
/// unlinks the file (no transaction held) and deletes the row, only if the entry is unchanged
/// since it was selected, is not pinned and has no newer access stamp pending.
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
    /// Stores whose COMMIT failed unseen. Each payload is kept until the database says
    /// whether the commit happened, then deleted if no row names it.
    unsettled: Mutex<Vec<Unsettled>>,
    /// Called after every commit that may have added bytes (the cache's evictor poke).
    on_commit: std::sync::OnceLock<CommitHook>,
    /// Where the next pass's scan for interrupted removals starts (a version): so rows that
    /// cannot be finished do not hide the ones behind them.
    marked_after: AtomicI64,
    counters: Counters,
    show_key: KeyDisplay,
}

/// What [`EntryStore::set_commit_hook`] installs.
pub(crate) type CommitHook = Box<dyn Fn() + Send + Sync>;

/// A store whose COMMIT failed unseen, waiting for the database to say what happened.
struct Unsettled {
    key: String,
    /// The new payload.
    file: String,
    /// The payload the store replaced, if its commit happened.
    replaced: Option<String>,
    at: std::time::Instant,
}

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

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    stores: AtomicU64,
    bytes_stored: AtomicU64,
    access_writes: AtomicU64,
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

/// The operation of a store's COMMIT: its failure is ambiguous (see `commit_written`).
const COMMIT_A_STORE: &str = "commit a store";

/// Interrupted removals a pass finishes before its own work (the rest wait for the next).
const MARKED_PER_PASS: usize = 64;

/// Access stamps written per statement (two bound values each, well under SQLite's limit).
const FLUSH_CHUNK: usize = 500;

/// `rows` parenthesised groups of `cols` numbered placeholders, starting at `$first`:
/// `values_list(2, 2, 2)` is `($2, $3), ($4, $5)`.
/// The statement that marks `n` selected victims for removal, each only if it still has the
/// version it was selected at: `$1` the namespace, then (key, version) pairs. It finds each row
/// by an index lookup, never by walking the namespace (see the plan tests below).
fn mark_victims_sql(n: usize) -> String {
    format!(
        "UPDATE entries SET state = 1 WHERE namespace = $1 AND state = 0 \
         AND (key, version) IN (VALUES {}) RETURNING key, file",
        values_list(2, n, 2)
    )
}

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

/// Strictly increasing microsecond stamps: the LRU order and the removal condition.
#[derive(Default)]
struct Clock {
    last: AtomicI64,
}

impl Clock {
    fn next(&self) -> i64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
        let prev = self.last.fetch_max(now, Ordering::SeqCst);
        if prev >= now { self.last.fetch_add(1, Ordering::SeqCst) + 1 } else { now }
    }
}

/// Keeps an entry out of eviction while held; see [`EntryStore::pin`].
#[must_use = "the pin is released when dropped"]
pub struct Pin {
    inner: Arc<Inner>,
    key: String,
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pin").field("key", &self.key).finish()
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut pins = lock(&self.inner.pins);
        if let Some(count) = pins.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                pins.remove(&self.key);
            }
        }
    }
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
            }),
        };
        store.reconcile().await?;
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

    /// Store the bytes of `reader` under `key`, verified against `expected`.
    ///
    /// Memory stays bounded (one 256 KiB buffer) whatever the size. The order is: write to a
    /// temporary file while hashing, verify size and digest, sync, rename into place under a
    /// fresh name, commit the row and the total in one transaction, and (for a replacement)
    /// delete the old payload.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future before the commit leaves nothing behind but, at worst, a payload
    /// file without a row, which the next [`reconcile`](Self::reconcile) deletes; readers
    /// never see it. After the commit the entry is stored.
    ///
    /// # Errors
    ///
    /// [`Error::TooLarge`], [`Error::Truncated`], [`Error::TooLong`],
    /// [`Error::DigestMismatch`], [`Error::Source`] for bad input; [`Error::Io`] and
    /// [`Error::Database`] for the cache's own failures. In every case nothing is stored. The
    /// database is first used after the bytes are verified, so an [`Error::Database`] means
    /// the bytes were right but could not be recorded (a caller may still pass them on).
    pub async fn store<R>(&self, key: &str, reader: R, expected: &Expected, meta: &str) -> Result<Stored>
    where
        R: AsyncRead + Unpin + Send,
    {
        self.store_with_meta(key, reader, expected, |_| meta.to_owned()).await
    }

    /// As [`store`](Self::store), with the row's metadata derived from the digest of the bytes
    /// received (computed while streaming), in the same commit: for a cache kind that records
    /// the content's digest without knowing it up front.
    ///
    /// # Cancel safety
    ///
    /// As [`store`](Self::store).
    ///
    /// # Errors
    ///
    /// As [`store`](Self::store).
    pub async fn store_with_meta<R, M>(
        &self,
        key: &str,
        reader: R,
        expected: &Expected,
        meta: M,
    ) -> Result<Stored>
    where
        R: AsyncRead + Unpin + Send,
        M: FnOnce(&ContentDigest) -> String + Send,
    {
        let written = self.inner.layout.write_temp(reader, expected, self.inner.max_bytes).await?;
        self.commit_written(key, written, meta).await
    }

    /// Store the file at `path` under `key` without copying it: the file is verified against
    /// `expected` in place (read once), synced, and moved into the cache (copied and removed
    /// if it is on another file system). For a payload already spooled to disk, such as an
    /// upstream fill. The file must not be written to any more.
    ///
    /// On success the file is gone from `path`. On a verification error (size, digest, cap) it
    /// is left where it is; on a later error (the move or the commit) it is deleted.
    ///
    /// # Cancel safety
    ///
    /// As [`store`](Self::store).
    ///
    /// # Errors
    ///
    /// As [`store`](Self::store), with [`Error::Io`] where `store` has [`Error::Source`].
    pub async fn store_file(
        &self,
        key: &str,
        path: &std::path::Path,
        expected: &Expected,
        meta: &str,
    ) -> Result<Stored> {
        let written = self.inner.layout.adopt(path, expected, self.inner.max_bytes).await?;
        self.commit_written(key, written, |_| meta.to_owned()).await
    }

    /// Move a verified payload into place and commit it (the shared half of every store).
    ///
    /// Once the payload is in place the rest runs on a task of its own: a caller that stops
    /// waiting (a cancelled request) neither rolls back a commit the server may already have
    /// applied nor leaves the payload without a row. The commit finishes, is cleaned up or
    /// left to settle, and calls the commit hook, whatever the caller does.
    async fn commit_written<M>(&self, key: &str, written: super::layout::Written, meta: M) -> Result<Stored>
    where
        M: FnOnce(&ContentDigest) -> String + Send,
    {
        let (size, digest) = (written.size, written.digest.clone());
        let meta = meta(&digest);
        let file = self.inner.layout.persist(written.temp, key).await?;
        let (store, key) = (self.clone(), key.to_owned());
        let finishing = tokio::spawn(async move { store.commit_payload(key, file, size, meta).await });
        let (outcome, committed) =
            finishing.await.map_err(|e| if e.is_panic() { Error::Panicked } else { Error::Stopped })??;
        Ok(Stored { size, digest, outcome, committed })
    }

    /// Commit the row of a payload in place, and clean up after it: the replaced payload, the
    /// duplicate one, or the new one if the commit is known not to have happened.
    async fn commit_payload(
        &self,
        key: String,
        file: String,
        size: u64,
        meta: String,
    ) -> Result<(StoreOutcome, Option<(String, EntryInfo)>)> {
        let inner = &self.inner;
        let stored_at_ms = now_ms();
        let mut checked_existing = false;
        let outcome = loop {
            let mut replaced = None;
            let committed = match self.commit(&key, &file, size, stored_at_ms, &meta, &mut replaced).await {
                Ok(committed) => committed,
                // The COMMIT itself failed: it may have been applied with only the answer lost
                // (the connection dropped). Keep the payload: a row may name it, and deleting
                // it here could leave a committed row without its file. It is settled once the
                // database answers again (`settle_unseen_on`): kept if a row names it, deleted
                // if none does. The evictor is told now, since the bytes may be counted.
                Err(e @ Error::Database { op: COMMIT_A_STORE, .. }) => {
                    tracing::warn!(error = %e, "a store's commit failed unseen; its payload is kept until settled");
                    let at = std::time::Instant::now();
                    lock(&inner.unsettled).push(Unsettled { key, file, replaced, at });
                    inner.committed();
                    return Err(e);
                }
                Err(e) => {
                    // Rolled back: never leave a payload without a row; if even this fails,
                    // reconcile will.
                    if let Err(unlink) = inner.layout.unlink(&file).await {
                        tracing::warn!(%unlink, "could not delete an uncommitted payload");
                    }
                    return Err(e);
                }
            };
            match committed {
                // A dead row dropped on the first round (below): to the caller, a replacement.
                Committed::Inserted if checked_existing => break StoreOutcome::Replaced,
                Committed::Inserted => break StoreOutcome::Inserted,
                Committed::Replaced => {
                    // No row names the old payload any more, whether it was live or being
                    // removed (a removal that marked it may never get to its unlink).
                    if let Some(old) = replaced
                        && let Err(e) = inner.layout.unlink(&old).await
                    {
                        tracing::warn!(error = %e, "could not delete a replaced payload; reconcile will");
                    }
                    break StoreOutcome::Replaced;
                }
                Committed::AlreadyPresent { existing } => {
                    // A live row whose payload is gone (its store's COMMIT succeeded unseen and
                    // the store deleted its file, say) is no entry to keep: drop it and store
                    // again, or it would stay counted and unreadable for as long as stores of
                    // its key keep it recent. Checked after the commit, holding no lock.
                    let path = inner.layout.payload(&existing);
                    if !checked_existing && !tokio::fs::try_exists(&path).await.unwrap_or(true) {
                        checked_existing = true;
                        self.delete_row(&key, &existing, true, "drop a row without its file").await?;
                        continue;
                    }
                    if let Err(e) = inner.layout.unlink(&file).await {
                        tracing::warn!(error = %e, "could not delete a duplicate payload; reconcile will");
                    }
                    self.touch(&key);
                    return Ok((StoreOutcome::AlreadyPresent, None));
                }
            }
        };
        inner.counters.stores.fetch_add(1, Ordering::Relaxed);
        inner.counters.bytes_stored.fetch_add(size, Ordering::Relaxed);
        // After the commit, as the evictor's contract requires.
        inner.committed();
        Ok((outcome, Some((file, EntryInfo { size, stored_at_ms, meta }))))
    }

    /// The store's transaction. `replaced` is set to the payload the row named before, when
    /// the row is replaced (known before the COMMIT, so a commit whose answer is lost can
    /// still delete it once settled).
    async fn commit(
        &self,
        key: &str,
        file: &str,
        size: u64,
        stored_at_ms: i64,
        meta: &str,
        replaced: &mut Option<String>,
    ) -> Result<Committed> {
        let inner = &self.inner;
        // Lock order everywhere: a connection first, then the write turn (an eviction pass
        // holds its connection across turns).
        let mut conn = inner.db.acquire().await?;
        let _turn = inner.db.write_turn(&inner.namespace).await;
        let mut tx = inner.db.begin_write(&mut conn, &inner.namespace, "begin a store").await?;
        self.inner.db.round_trip().await;
        let existing: Option<(String, i64, i64)> =
            sqlx::query_as("SELECT file, size, state FROM entries WHERE namespace = $1 AND key = $2")
                .bind(&inner.namespace)
                .bind(key)
                .fetch_optional(&mut *tx)
                .await
                .map_err(Error::db("look up an entry"))?;
        let version = inner.clock.next();
        let size_i = to_i64(size);
        let (delta_bytes, delta_entries) = match existing {
            None => {
                self.inner.db.round_trip().await;
                sqlx::query(
                    "INSERT INTO entries (namespace, key, file, size, version, stored_at, state, meta) \
                     VALUES ($1, $2, $3, $4, $5, $6, 0, $7)",
                )
                .bind(&inner.namespace)
                .bind(key)
                .bind(file)
                .bind(size_i)
                .bind(version)
                .bind(stored_at_ms)
                .bind(meta)
                .execute(&mut *tx)
                .await
                .map_err(Error::db("insert an entry"))?;
                (size_i, 1)
            }
            Some((existing, _, 0)) if inner.on_conflict == OnConflict::KeepExisting => {
                // Stored again: make the kept entry recent in the database, not only in this
                // process's access stamps, so a pass that selected it at its old version (here
                // or on another instance) skips it, and LRU order sees the store.
                self.inner.db.round_trip().await;
                sqlx::query(
                    "UPDATE entries SET version = $1 WHERE namespace = $2 AND key = $3 AND state = 0",
                )
                .bind(version)
                .bind(&inner.namespace)
                .bind(key)
                .execute(&mut *tx)
                .await
                .map_err(Error::db("renew an entry stored again"))?;
                // Not COMMIT_A_STORE: whatever this commit's fate, no row names the new payload.
                tx.commit().await.map_err(Error::db("commit a renewal"))?;
                return Ok(Committed::AlreadyPresent { existing });
            }
            Some((old_file, old_size, _)) => {
                self.inner.db.round_trip().await;
                sqlx::query(
                    "UPDATE entries SET file = $1, size = $2, version = $3, stored_at = $4, state = 0, meta = $5 \
                     WHERE namespace = $6 AND key = $7",
                )
                .bind(file)
                .bind(size_i)
                .bind(version)
                .bind(stored_at_ms)
                .bind(meta)
                .bind(&inner.namespace)
                .bind(key)
                .execute(&mut *tx)
                .await
                .map_err(Error::db("replace an entry"))?;
                *replaced = Some(old_file);
                (size_i - old_size, 0)
            }
        };
        let committed = if delta_entries == 1 { Committed::Inserted } else { Committed::Replaced };
        adjust_totals(&mut tx, &inner.db, &inner.namespace, delta_bytes, delta_entries).await?;
        if inner.layout.faults.commit_lost() {
            drop(tx);
            return Err(Error::db(COMMIT_A_STORE)(sqlx::Error::Io(faults::injected("COMMIT lost"))));
        }
        tx.commit().await.map_err(Error::db(COMMIT_A_STORE))?;
        if inner.layout.faults.commit_answer_lost() {
            return Err(Error::db(COMMIT_A_STORE)(sqlx::Error::Io(faults::injected("COMMIT answer lost"))));
        }
        Ok(committed)
    }

    /// Open the entry under `key`, if present, and record the access (in memory; written to
    /// the database in batches, so a hit performs no database write).
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if the row cannot be read, [`Error::Io`] if the payload exists but
    /// cannot be opened.
    pub async fn open_entry(&self, key: &str) -> Result<Option<OpenEntry>> {
        let inner = &self.inner;
        let Some((file, info)) = self.lookup_row(key).await? else {
            inner.counters.misses.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        };
        let path = inner.layout.payload(&file);
        match tokio::fs::File::open(&path).await {
            Ok(file) => {
                inner.counters.hits.fetch_add(1, Ordering::Relaxed);
                self.touch(key);
                Ok(Some(OpenEntry { file, info }))
            }
            // Evicted or replaced between the lookup and the open: a miss, never wrong bytes.
            // Or a live row that lost its payload (a commit whose answer was lost, a shared
            // directory another instance could see and this one cannot): drop that row, if
            // it is still live and still names the file, so it stops counting and the next
            // store of the key fills it again.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                inner.counters.misses.fetch_add(1, Ordering::Relaxed);
                match self.delete_row(key, &file, true, "drop a row without its file").await {
                    Ok(true) => {
                        tracing::warn!(
                            key = inner.shown(key),
                            "entry without its payload file; dropped the row"
                        );
                    }
                    Ok(false) => {}
                    Err(error) => tracing::debug!(%error, "could not drop a row without its file"),
                }
                Ok(None)
            }
            Err(e) => Err(Error::io("open", path)(e)),
        }
    }

    /// Open the entry that `stored` (a store of `key`) committed, without a database lookup,
    /// and record the access: for a caller that stores and then serves what it stored. If
    /// that payload is gone (evicted, or replaced by a later store) or the store found `key`
    /// already present, this is [`open_entry`](Self::open_entry): whatever `key` holds now,
    /// found with one lookup.
    ///
    /// The handle and its [`EntryInfo`] always belong together; the info is the row as the
    /// store committed it, so a later [`refresh`](Self::refresh) of the row is not reflected.
    ///
    /// # Errors
    ///
    /// As [`open_entry`](Self::open_entry).
    ///
    /// See [`EntryCache::open_stored`](crate::EntryCache::open_stored) for an example.
    pub async fn open_stored(&self, key: &str, stored: &Stored) -> Result<Option<OpenEntry>> {
        if let Some((file, info)) = &stored.committed {
            let path = self.inner.layout.payload(file);
            match tokio::fs::File::open(&path).await {
                Ok(file) => {
                    self.touch(key);
                    return Ok(Some(OpenEntry { file, info: info.clone() }));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("open", path)(e)),
            }
        }
        self.open_entry(key).await
    }

    /// Open `key`'s payload **without the database**, for when it is unreachable: a file of
    /// `key`'s on disk whose bytes hash to `digest` (every candidate is read whole to check).
    /// Only for content-addressed keys, where the digest alone says which bytes are right.
    /// Records no access. Returns the file, at its start, and its size.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the directory or a candidate cannot be read.
    pub async fn open_unindexed(
        &self,
        key: &str,
        digest: &ContentDigest,
    ) -> Result<Option<(tokio::fs::File, u64)>> {
        self.inner.layout.find_verified(key, digest).await
    }

    /// What is recorded about `key`, without opening or touching it.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if the row cannot be read.
    pub async fn info(&self, key: &str) -> Result<Option<EntryInfo>> {
        Ok(self.lookup_row(key).await?.map(|(_, info)| info))
    }

    async fn lookup_row(&self, key: &str) -> Result<Option<(String, EntryInfo)>> {
        let mut conn = self.inner.db.acquire().await?;
        self.inner.db.round_trip().await;
        let row: Option<(String, i64, i64, String)> = sqlx::query_as(
            "SELECT file, size, stored_at, meta FROM entries WHERE namespace = $1 AND key = $2 AND state = 0",
        )
        .bind(&self.inner.namespace)
        .bind(key)
        .fetch_optional(&mut *conn)
        .await
        .map_err(Error::db("look up an entry"))?;
        Ok(row.map(|(file, size, stored_at_ms, meta)| {
            (file, EntryInfo { size: to_u64(size), stored_at_ms, meta })
        }))
    }

    /// Replace `key`'s metadata with `meta` and refresh its stored time, keeping its payload
    /// (for a revalidated entry), **only if the entry still has the metadata `seen_meta`** the
    /// caller read before revalidating. Returns whether it was refreshed.
    ///
    /// The condition keeps a revalidation from relabelling an entry that was replaced
    /// meanwhile (by another process sharing the database, say): the replacement's
    /// metadata describes the replacement's bytes, and stays.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if the row cannot be written.
    pub async fn refresh(&self, key: &str, seen_meta: &str, meta: &str) -> Result<bool> {
        let mut conn = self.inner.db.acquire().await?;
        let _turn = self.inner.db.write_turn(&self.inner.namespace).await;
        let mut tx = self.inner.db.begin_write(&mut conn, &self.inner.namespace, "begin a refresh").await?;
        self.inner.db.round_trip().await;
        let done = sqlx::query(
            "UPDATE entries SET meta = $1, stored_at = $2, version = $3 \
             WHERE namespace = $4 AND key = $5 AND state = 0 AND meta = $6",
        )
        .bind(meta)
        .bind(now_ms())
        .bind(self.inner.clock.next())
        .bind(&self.inner.namespace)
        .bind(key)
        .bind(seen_meta)
        .execute(&mut *tx)
        .await
        .map_err(Error::db("refresh an entry"))?;
        tx.commit().await.map_err(Error::db("commit a refresh"))?;
        Ok(done.rows_affected() == 1)
    }

    /// Whether a live entry exists under `key` (no access recorded).
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if the row cannot be read.
    pub async fn contains(&self, key: &str) -> Result<bool> {
        Ok(self.lookup_row(key).await?.is_some())
    }

    /// Remove `key` now, whatever its age. Returns the bytes freed, if it was present.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] or [`Error::Io`]; a failed removal is finished by the next
    /// [`reconcile`](Self::reconcile).
    pub async fn remove(&self, key: &str) -> Result<Option<u64>> {
        let mut conn = self.inner.db.acquire().await?;
        match self.inner.remove_entries(&mut conn, Targets::Key(key)).await?.first() {
            Some(Removal::Removed { bytes }) => Ok(Some(*bytes)),
            _ => Ok(None),
        }
    }

    /// Keep `key` out of eviction until the returned guard drops (for example while an
    /// upstream fill or a long read is in flight). Pins are per process.
    pub fn pin(&self, key: &str) -> Pin {
        *lock(&self.inner.pins).entry(key.to_owned()).or_default() += 1;
        Pin { inner: Arc::clone(&self.inner), key: key.to_owned() }
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

    /// Record an access to `key` in memory; [`flush_accesses`](Self::flush_accesses) writes
    /// them.
    pub fn touch(&self, key: &str) {
        let stamp = self.inner.clock.next();
        lock(&self.inner.touches).insert(key.to_owned(), stamp);
    }

    /// Write the pending access stamps in one transaction. Runs in the background (see
    /// [`spawn_access_flusher`](Self::spawn_access_flusher)) and before every eviction pass.
    ///
    /// # Errors
    ///
    /// [`Error::Database`]; the stamps are then kept for the next flush.
    pub async fn flush_accesses(&self) -> Result<()> {
        let mut conn = self.inner.db.acquire().await?;
        self.inner.flush_accesses_on(&mut conn).await
    }

    /// Spawn the task that flushes access stamps every `period` (and deletes the payloads of
    /// stores whose commit failed unseen, once the database says no row names them). It holds
    /// only a weak reference and ends once the store is dropped. Requires a Tokio runtime.
    pub fn spawn_access_flusher(&self, period: Duration) {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(period);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            interval.tick().await;
            loop {
                interval.tick().await;
                let Some(inner) = weak.upgrade() else { break };
                if lock(&inner.touches).is_empty() && lock(&inner.unsettled).is_empty() {
                    continue;
                }
                let result = async {
                    let mut conn = inner.db.acquire().await?;
                    inner.settle_unseen_on(&mut conn).await?;
                    inner.flush_accesses_on(&mut conn).await
                };
                if let Err(error) = result.await {
                    tracing::warn!(%error, "flushing access stamps failed; will retry");
                }
            }
        });
    }
}

enum Committed {
    Inserted,
    Replaced,
    /// The key's live row was kept; `existing` is its payload.
    AlreadyPresent {
        existing: String,
    },
}

/// Add `bytes` and `entries` (either may be negative) to `namespace`'s accounted total, in the
/// write transaction `tx` that changes the rows they account for. **The only writer of
/// `totals`** (besides the insert that creates a namespace's row at zero): every store,
/// removal and recount goes through it, so the total moves with the rows, in one commit.
pub(crate) async fn adjust_totals(
    tx: &mut sqlx::Transaction<'_, Any>,
    db: &Database,
    namespace: &str,
    bytes: i64,
    entries: i64,
) -> Result<()> {
    if bytes == 0 && entries == 0 {
        return Ok(());
    }
    db.round_trip().await;
    sqlx::query("UPDATE totals SET bytes = bytes + $1, entries = entries + $2 WHERE namespace = $3")
        .bind(bytes)
        .bind(entries)
        .bind(namespace)
        .execute(&mut **tx)
        .await
        .map_err(Error::db("update the accounted total"))?;
    Ok(())
}

/// Access stamps taken for a flush: put back on drop unless [`written`](Self::written), so a
/// flush that fails or is cancelled loses none (a newer stamp taken meanwhile wins).
struct TakenStamps<'a> {
    inner: &'a Inner,
    pending: HashMap<String, i64>,
}

impl TakenStamps<'_> {
    fn written(mut self) {
        self.pending.clear();
    }
}

impl Drop for TakenStamps<'_> {
    fn drop(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let mut touches = lock(&self.inner.touches);
        for (key, stamp) in self.pending.drain() {
            let slot = touches.entry(key).or_insert(stamp);
            *slot = (*slot).max(stamp);
        }
    }
}

/// How long after a store's COMMIT failed unseen its outcome is asked for: time for a server
/// that received the COMMIT to have applied it.
const SETTLE_AFTER: Duration = Duration::from_secs(1);

impl Inner {
    /// Settle the stores whose COMMIT failed unseen (at least [`SETTLE_AFTER`] ago): a payload
    /// its key's row names was committed and is an entry like any other; one no row names was
    /// not (or was committed and since replaced or removed), and is deleted. Without this,
    /// such a payload would stay on disk, uncounted, until the next start-up reconcile.
    async fn settle_unseen_on(&self, conn: &mut AnyConnection) -> Result<()> {
        let due: Vec<Unsettled> = {
            let mut unsettled = lock(&self.unsettled);
            let (due, later) =
                std::mem::take(&mut *unsettled).into_iter().partition(|u| u.at.elapsed() >= SETTLE_AFTER);
            *unsettled = later;
            due
        };
        let mut due = due.into_iter();
        while let Some(store) = due.next() {
            if let Err(e) = self.settle(conn, &store).await {
                // Ask again next time, with what was not asked yet.
                let mut unsettled = lock(&self.unsettled);
                unsettled.push(store);
                unsettled.extend(due);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Settle one store whose COMMIT failed unseen. Idempotent, so a failure part way is
    /// retried from the start.
    async fn settle(&self, conn: &mut AnyConnection, store: &Unsettled) -> Result<()> {
        if self.names(conn, &store.key, &store.file).await? {
            // Committed: an entry like any other, and what it replaced has no row any more.
            if let Some(old) = &store.replaced {
                self.layout.unlink(old).await?;
            }
            self.committed();
            return Ok(());
        }
        // Not committed, or committed and since replaced or removed (whoever did that deleted
        // or will delete the payload). What it would have replaced is either still the key's
        // payload or, if the commit happened, named by no row.
        self.layout.unlink(&store.file).await?;
        if let Some(old) = &store.replaced
            && !self.names(conn, &store.key, old).await?
        {
            self.layout.unlink(old).await?;
        }
        Ok(())
    }

    /// Whether `key`'s row names the payload `file` (in any state).
    async fn names(&self, conn: &mut AnyConnection, key: &str, file: &str) -> Result<bool> {
        self.db.round_trip().await;
        let named: Option<(i64,)> =
            sqlx::query_as("SELECT 1 FROM entries WHERE namespace = $1 AND key = $2 AND file = $3")
                .bind(&self.namespace)
                .bind(key)
                .bind(file)
                .fetch_optional(&mut *conn)
                .await
                .map_err(Error::db("settle a store's unseen commit"))?;
        Ok(named.is_some())
    }

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

    async fn flush_accesses_on(&self, conn: &mut AnyConnection) -> Result<()> {
        // Taken now, put back unless written: on an error and on a cancel alike.
        let taken = TakenStamps { inner: self, pending: std::mem::take(&mut *lock(&self.touches)) };
        if taken.pending.is_empty() {
            return Ok(());
        }
        let _turn = self.db.write_turn(&self.namespace).await;
        let mut tx = self.db.begin_write(conn, &self.namespace, "begin an access flush").await?;
        let pending: Vec<(&String, &i64)> = taken.pending.iter().collect();
        // One statement per chunk, not per key: on a networked database every statement is a
        // round trip made while holding the write lock.
        for chunk in pending.chunks(FLUSH_CHUNK) {
            let values = values_list(1, chunk.len(), 2);
            let sql = format!(
                "WITH t(key, stamp) AS (VALUES {values}) \
                 UPDATE entries SET version = t.stamp FROM t \
                 WHERE entries.namespace = ${} AND entries.key = t.key AND entries.state = 0 \
                 AND entries.version < t.stamp",
                2 * chunk.len() + 1
            );
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for (key, stamp) in chunk {
                query = query.bind(key.as_str()).bind(**stamp);
            }
            self.db.round_trip().await;
            query.bind(&self.namespace).execute(&mut *tx).await.map_err(Error::db("record accesses"))?;
        }
        tx.commit().await.map_err(Error::db("commit an access flush"))?;
        self.counters.access_writes.fetch_add(pending.len() as u64, Ordering::Relaxed);
        taken.written();
        Ok(())
    }

    fn is_pinned(&self, key: &str) -> bool {
        lock(&self.pins).contains_key(key)
    }

    /// Mark, unlink, delete, for several entries in two write turns (not two per entry).
    ///
    /// `Targets::Victims` removes each victim only if it still has the version it was selected
    /// at, is not pinned and has no newer access pending; `Targets::Key` removes one key
    /// whatever its version. Returns one [`Removal`] per target, in order.
    pub(crate) async fn remove_entries(
        &self,
        conn: &mut AnyConnection,
        targets: Targets<'_>,
    ) -> Result<Vec<Removal>> {
        let keys: Vec<&str> = match &targets {
            Targets::Victims(victims) => victims.iter().map(|v| v.key.as_str()).collect(),
            Targets::Key(key) => vec![key],
        };
        let mut out = vec![Removal::Skipped; keys.len()];
        // In-memory conditions first: pinned, or touched since selection.
        let eligible: Vec<usize> = match &targets {
            Targets::Victims(victims) => {
                let touches = lock(&self.touches);
                let pins = lock(&self.pins);
                (0..victims.len())
                    .filter(|&i| {
                        let v = &victims[i];
                        !pins.contains_key(&v.key)
                            && touches.get(&v.key).is_none_or(|&stamp| stamp <= v.version)
                    })
                    .collect()
            }
            Targets::Key(_) => vec![0],
        };
        if eligible.is_empty() {
            return Ok(out);
        }
        // 1. Mark: from here on no reader is handed these rows.
        let marked: Vec<(String, String)> = {
            let _turn = self.db.write_turn(&self.namespace).await;
            let mut tx = self.db.begin_write(conn, &self.namespace, "begin a removal").await?;
            self.db.round_trip().await;
            let (sql, pairs) = match &targets {
                Targets::Victims(_) => (mark_victims_sql(eligible.len()), true),
                Targets::Key(_) => {
                    ("UPDATE entries SET state = 1 WHERE namespace = $1 AND state = 0 AND key = $2 RETURNING key, file".to_owned(), false)
                }
            };
            let mut query = sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(&self.namespace);
            for &i in &eligible {
                query = query.bind(keys[i]);
                if pairs && let Targets::Victims(victims) = &targets {
                    query = query.bind(victims[i].version);
                }
            }
            let marked = query.fetch_all(&mut *tx).await.map_err(Error::db("mark entries for removal"))?;
            tx.commit().await.map_err(Error::db("commit a removal mark"))?;
            marked
        };
        // Pinned between the check and the mark: put those back (rare).
        let mut doomed = Vec::with_capacity(marked.len());
        for (key, file) in marked {
            if matches!(targets, Targets::Victims(_)) && self.is_pinned(&key) {
                let _turn = self.db.write_turn(&self.namespace).await;
                let mut tx = self.db.begin_write(conn, &self.namespace, "begin an unmark").await?;
                self.db.round_trip().await;
                let unmarked = sqlx::query(
                    "UPDATE entries SET state = 0 WHERE namespace = $1 AND key = $2 AND state = 1 AND file = $3",
                )
                .bind(&self.namespace)
                .bind(&key)
                .bind(&file)
                .execute(&mut *tx)
                .await
                .map_err(Error::db("unmark an entry"))?;
                tx.commit().await.map_err(Error::db("commit an unmark"))?;
                if unmarked.rows_affected() == 0 {
                    // A store took the marked row over meanwhile (and left the old payload to
                    // this removal), or another remover finished it: either way the old file
                    // has no row any more. Unlink it; the row delete below then matches
                    // nothing, so the entry counts as skipped and the total stays right.
                    doomed.push((key, file));
                }
            } else {
                doomed.push((key, file));
            }
        }
        // 2. Unlink, holding no transaction. Readers that opened a file keep their bytes. A
        // payload that cannot be unlinked stays marked (and counted) for a later pass to
        // finish; the others are removed, and the first error is reported.
        let mut unlinked = Vec::with_capacity(doomed.len());
        let mut failure = None;
        for (key, file) in doomed {
            match self.layout.unlink(&file).await {
                Ok(()) => unlinked.push((key, file)),
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        // 3. Delete the rows and subtract their bytes, unless a store took a row over.
        for (key, _, size) in self.delete_marked(conn, &unlinked).await? {
            if let Some(i) = keys.iter().position(|k| *k == key) {
                out[i] = Removal::Removed { bytes: to_u64(size) };
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// The last step of a removal: delete the rows of `rows` (key, file) that are still
    /// marked and still name their file, and subtract their bytes, in one write transaction;
    /// a row a store took over meanwhile (new file, live again) or a remover put back (live
    /// again) is left alone. Returns the rows deleted, with their sizes.
    pub(crate) async fn delete_marked(
        &self,
        conn: &mut AnyConnection,
        rows: &[(String, String)],
    ) -> Result<Vec<(String, String, i64)>> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let _turn = self.db.write_turn(&self.namespace).await;
        let mut tx = self.db.begin_write(conn, &self.namespace, "begin a removal").await?;
        self.db.round_trip().await;
        let sql = format!(
            "DELETE FROM entries WHERE namespace = $1 AND state = 1 AND (key, file) IN (VALUES {}) \
             RETURNING key, file, size",
            values_list(2, rows.len(), 2)
        );
        let mut query = sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(&self.namespace);
        for (key, file) in rows {
            query = query.bind(key.as_str()).bind(file.as_str());
        }
        let deleted: Vec<(String, String, i64)> =
            query.fetch_all(&mut *tx).await.map_err(Error::db("delete entries"))?;
        let bytes: i64 = deleted.iter().map(|(_, _, size)| size).sum();
        let entries = i64::try_from(deleted.len()).unwrap_or(i64::MAX);
        adjust_totals(&mut tx, &self.db, &self.namespace, -bytes, -entries).await?;
        tx.commit().await.map_err(Error::db("commit a removal"))?;
        Ok(deleted)
    }

    /// Finish removals interrupted after their mark (the database or the disk failed between
    /// the steps): their rows are never handed out, but their bytes still count until
    /// deleted. Run at the start of every pass, so an outage does not leave the total
    /// overstated until the next restart. Safe beside a removal still in flight (on another
    /// instance, or an explicit remove): unlinking twice is harmless and a row is deleted,
    /// and its bytes subtracted, once.
    ///
    /// Each pass takes the next [`MARKED_PER_PASS`] in version order after where the last one
    /// stopped, wrapping around: rows that cannot be finished do not hide the ones behind.
    async fn finish_marked(&self, conn: &mut AnyConnection) -> Result<u64> {
        let after = self.marked_after.load(Ordering::Relaxed);
        self.db.round_trip().await;
        let marked: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT key, file, version FROM entries WHERE namespace = $1 AND state = 1 AND version > $2 \
             ORDER BY version LIMIT $3",
        )
        .bind(&self.namespace)
        .bind(after)
        .bind(to_i64(MARKED_PER_PASS as u64))
        .fetch_all(&mut *conn)
        .await
        .map_err(Error::db("list interrupted removals"))?;
        let next = match marked.last() {
            Some((_, _, version)) if marked.len() == MARKED_PER_PASS => *version,
            _ => i64::MIN,
        };
        self.marked_after.store(next, Ordering::Relaxed);
        // A payload that cannot be unlinked (permissions on a shared volume, an I/O error)
        // is logged and left marked: one such row must not stop every pass.
        let mut unlinked = Vec::with_capacity(marked.len());
        for (key, file, _) in marked {
            match self.layout.unlink(&file).await {
                Ok(()) => unlinked.push((key, file)),
                Err(error) => {
                    let key = self.shown(&key);
                    tracing::warn!(%error, key, "cannot finish an interrupted removal; leaving it marked");
                }
            }
        }
        let deleted = self.delete_marked(conn, &unlinked).await?;
        if !deleted.is_empty() {
            tracing::info!(namespace = %self.namespace, rows = deleted.len(), "finished interrupted removals");
        }
        Ok(deleted.len() as u64)
    }
}

/// What [`Inner::remove_entries`] removes.
pub(crate) enum Targets<'a> {
    /// Eviction victims, each conditional on its selected version.
    Victims(&'a [Victim]),
    /// One key, unconditionally.
    Key(&'a str),
}

/// One eviction pass over an [`EntryStore`]: one pooled connection for the whole pass, holding
/// the namespace's eviction lock on a shared database.
pub struct EntryPass {
    inner: Arc<Inner>,
    conn: PoolConnection<Any>,
    /// Whether `conn` holds the cross-process eviction lock (PostgreSQL).
    locked: bool,
}

impl Drop for EntryPass {
    fn drop(&mut self) {
        if self.locked {
            // Not finished (cancelled, or the unlock failed): a session lock must not go back
            // to the pool with its connection. Closing the connection releases it.
            self.conn.close_on_drop();
        }
    }
}

impl fmt::Debug for EntryPass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EntryPass").field("namespace", &self.inner.namespace).finish_non_exhaustive()
    }
}

#[async_trait]
impl EvictionStore for EntryStore {
    type Error = Error;
    type Pass = EntryPass;

    async fn begin_pass(&self) -> Result<Option<EntryPass>> {
        let inner = &self.inner;
        let conn = inner.db.acquire().await?;
        // Counted as locked from before the lock query: if it is cancelled or fails after
        // the server granted the lock, the connection closes instead of going back to the
        // pool with the lock.
        let mut pass = EntryPass { inner: Arc::clone(inner), conn, locked: inner.db.is_shared() };
        if !inner.db.try_lock_evictions(&mut pass.conn, &inner.namespace).await? {
            // Another instance is evicting: give the connection back at once.
            pass.locked = false;
            tracing::debug!(namespace = %inner.namespace, "another instance holds the eviction lock");
            return Ok(None);
        }
        if inner.db.is_shared() {
            tracing::debug!(namespace = %inner.namespace, "eviction lock taken");
        }
        if let Err(error) = inner.settle_unseen_on(&mut pass.conn).await {
            tracing::debug!(%error, "settling unseen commits failed; will retry");
        }
        if let Err(error) = inner.finish_marked(&mut pass.conn).await {
            // Leave the lock the way every failed pass does.
            if let Err(unlock) = pass.finish().await {
                tracing::debug!(%unlock, "releasing the eviction lock failed; the connection closes");
            }
            return Err(error);
        }
        Ok(Some(pass))
    }
}

#[async_trait]
impl EvictionPass for EntryPass {
    type Error = Error;

    fn show_key(&self, key: &str) -> String {
        self.inner.shown(key)
    }

    async fn total_size_bytes(&mut self) -> Result<u64> {
        Ok(self.inner.totals_on(&mut self.conn).await?.0)
    }

    async fn least_recently_used(&mut self, limit: usize) -> Result<Vec<Victim>> {
        // Selection must see the latest accesses, or it picks entries just read and then has
        // to skip them.
        self.inner.flush_accesses_on(&mut self.conn).await?;
        // Pinned entries are filtered here; ask for enough rows to still fill the batch.
        let pinned = lock(&self.inner.pins).len();
        self.inner.db.round_trip().await;
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT key, size, version FROM entries WHERE namespace = $1 AND state = 0 ORDER BY version LIMIT $2",
        )
        .bind(&self.inner.namespace)
        .bind(to_i64((limit + pinned) as u64))
        .fetch_all(&mut *self.conn)
        .await
        .map_err(Error::db("select least-recently-used entries"))?;
        Ok(rows
            .into_iter()
            .filter(|(key, _, _)| !self.inner.is_pinned(key))
            .take(limit)
            .map(|(key, size, version)| Victim::new(key, to_u64(size), version))
            .collect())
    }

    async fn remove(&mut self, victim: &Victim) -> Result<Removal> {
        let removals = self.remove_batch(std::slice::from_ref(victim)).await?;
        Ok(removals.first().copied().unwrap_or(Removal::Skipped))
    }

    async fn remove_batch(&mut self, victims: &[Victim]) -> Result<Vec<Removal>> {
        self.inner.remove_entries(&mut self.conn, Targets::Victims(victims)).await
    }

    async fn finish(mut self) -> Result<()> {
        if self.locked {
            // Logged before the unlock, so logged holding times never overlap across instances.
            tracing::debug!(namespace = %self.inner.namespace, "eviction lock released");
            self.inner.db.unlock_evictions(&mut self.conn, &self.inner.namespace).await?;
            self.locked = false;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests report failure by panicking")]

    use super::*;
    use crate::DatabaseOptions;

    /// Payload files under `dir`'s `data/`.
    fn payloads(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir.join("data"))
            .unwrap()
            .map(|shard| std::fs::read_dir(shard.unwrap().path()).unwrap().count())
            .sum()
    }

    /// Regression: an eviction marks an entry, finds it pinned, and queues its unmark behind a
    /// store that replaces the marked row (leaving the old payload to the remover). The unmark
    /// then matches nothing, and the old payload used to stay on disk with no row until the
    /// next start-up. The order is forced through the write turn (FIFO) on a current-thread
    /// runtime: remover queued first, then the store, then the turn released.
    #[tokio::test]
    async fn a_row_replaced_between_mark_and_unmark_leaves_no_orphan_payload() {
        let dir = tempfile::tempdir().unwrap();
        let db =
            Database::open_sqlite(&dir.path().join("metadata.db"), &DatabaseOptions::new()).await.unwrap();
        let store =
            EntryStore::open(db.clone(), "race", dir.path(), 1 << 20, OnConflict::Replace).await.unwrap();
        store.store("k", &[1u8; 1000][..], &Expected::new(), "").await.unwrap();
        let mut pass = store.begin_pass().await.unwrap().unwrap();
        let victims = pass.least_recently_used(10).await.unwrap();
        assert_eq!(victims.len(), 1);

        let turn = db.write_turn("race").await;
        let remover = tokio::spawn(async move {
            let removals = pass.remove_batch(&victims).await;
            pass.finish().await.unwrap();
            removals
        });
        // The remover runs until it waits for the turn: past its pin check, before its mark.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let pin = store.pin("k");
        let storer = {
            let store = store.clone();
            tokio::spawn(async move { store.store("k", &[2u8; 2000][..], &Expected::new(), "").await })
        };
        // The store writes and renames its payload (two files on disk), then takes a
        // connection and waits for the turn, behind the remover.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while payloads(dir.path()) < 2 {
            assert!(tokio::time::Instant::now() < deadline, "the store never wrote its payload");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        drop(turn);

        let removals = remover.await.unwrap().unwrap();
        assert_eq!(storer.await.unwrap().unwrap().outcome, StoreOutcome::Replaced);
        drop(pin);
        assert_eq!(removals, vec![Removal::Skipped]);
        assert_eq!(store.total_bytes().await.unwrap(), 2000);
        assert_eq!(payloads(dir.path()), 1, "the replaced payload must not outlive its row");
        let mut entry = store.open_entry("k").await.unwrap().unwrap();
        let mut bytes = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut entry.file, &mut bytes).await.unwrap();
        assert_eq!(bytes, vec![2u8; 2000]);
    }

    /// Bind a sample of `n` (key, version) pairs to the mark statement, `EXPLAIN`ed with
    /// `explain` in front of it.
    fn explained_mark(explain: &str, n: usize) -> sqlx::query::Query<'static, Any, sqlx::any::AnyArguments> {
        let mut query =
            sqlx::query(sqlx::AssertSqlSafe(format!("{explain} {}", mark_victims_sql(n)))).bind("ns");
        for i in 0..n {
            query = query.bind(format!("key-{i}")).bind(i64::try_from(i).unwrap());
        }
        query
    }

    /// The mark statement finds each victim by an index lookup (key or version equal), and never
    /// scans the table or walks the namespace's rows through `entries_lru` (issue 16).
    #[tokio::test]
    async fn the_mark_statement_looks_rows_up_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let db =
            Database::open_sqlite(&dir.path().join("metadata.db"), &DatabaseOptions::new()).await.unwrap();
        let _store =
            EntryStore::open(db.clone(), "ns", dir.path(), 1 << 30, OnConflict::KeepExisting).await.unwrap();
        let plan = explained_mark("EXPLAIN QUERY PLAN", 64).fetch_all(db.pool()).await.unwrap();
        let details: Vec<String> = plan.iter().map(|row| sqlx::Row::get::<String, _>(row, 3)).collect();
        let on_entries: Vec<&String> = details.iter().filter(|d| d.contains(" entries")).collect();
        assert!(!on_entries.is_empty(), "{details:?}");
        for line in on_entries {
            assert!(line.starts_with("SEARCH entries USING"), "the mark scans entries: {details:?}");
            assert!(
                line.contains("key=?") || line.contains("version=?"),
                "the mark walks the namespace instead of looking rows up: {details:?}"
            );
        }
    }

    /// The same on PostgreSQL, on a namespace of 100,000 analysed rows (on a table of a few
    /// hundred rows, with sequential scans discouraged, the planner reads every live row of the
    /// namespace through `entries_lru` instead: a plan only a tiny table gets).
    #[tokio::test]
    async fn the_mark_statement_looks_rows_up_on_postgres() {
        let Some(server) = dunite_testkit::pg::fresh_database().await else { return };
        let db = Database::connect(server.url(), &DatabaseOptions::new()).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store =
            EntryStore::open(db.clone(), "ns", dir.path(), 1 << 30, OnConflict::KeepExisting).await.unwrap();
        store.store("k", &[1u8; 10][..], &Expected::new(), "").await.unwrap();
        // A namespace of a realistic size, so the planner's choice is the one production sees.
        let mut conn = db.pool().acquire().await.unwrap();
        sqlx::query(
            "INSERT INTO entries (namespace, key, file, size, version, stored_at) \
             SELECT 'ns', 'key-' || g, 'file-' || g, 1, g, 0 FROM generate_series(100, 100099) AS g",
        )
        .execute(&mut *conn)
        .await
        .unwrap();
        sqlx::query("ANALYZE entries").execute(&mut *conn).await.unwrap();
        let plan = explained_mark("EXPLAIN", 64).fetch_all(&mut *conn).await.unwrap();
        let plan: Vec<String> = plan.iter().map(|row| sqlx::Row::get::<String, _>(row, 0)).collect();
        let text = plan.join("\n");
        assert!(!text.contains("Seq Scan on entries"), "the mark scans entries:\n{text}");
        assert!(
            plan.iter().any(|line| line.contains("Index Cond") && (line.contains("key") || line.contains("version"))),
            "the mark does not look rows up by key or version:\n{text}"
        );
    }
}
