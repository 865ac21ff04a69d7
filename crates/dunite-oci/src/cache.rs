//! `BlobCache`: OCI blobs by digest on the shared entry cache.

use bytes::Bytes;
use futures_util::Stream;
use tokio::io::AsyncRead;

use dunite_core::{
    CacheOptions, CacheStats, EntryCache, EvictionPolicy, Expected, FillError, FillOptions, Fills, Joined,
    OnConflict, PassReport, Pin, Stored,
};

use crate::content::{Found, open_verified};
use crate::{Digest, Result};

/// The namespace of blob rows in the metadata database.
pub const NAMESPACE: &str = "oci-blobs";

/// A byte-capped cache of OCI blobs keyed by [`Digest`]. Cheap to clone; clones share the
/// cache, and its eviction task ends when the last clone drops.
///
/// See the [crate documentation](crate) for an example.
#[derive(Debug, Clone)]
pub struct BlobCache {
    cache: EntryCache,
    /// Upstream fills in flight, by digest: one per blob at a time.
    fills: Fills<Digest, ()>,
}

/// An open cached blob. The handle stays valid (and its bytes correct) even if the blob is
/// evicted while it is being read.
#[derive(Debug)]
pub struct Blob {
    file: tokio::fs::File,
    size: u64,
}

impl Blob {
    /// The blob's size in bytes.
    #[must_use]
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The open payload, to read or seek.
    pub fn file_mut(&mut self) -> &mut tokio::fs::File {
        &mut self.file
    }

    /// The open payload.
    #[must_use]
    pub fn into_file(self) -> tokio::fs::File {
        self.file
    }
}

impl BlobCache {
    /// The options of a blob cache with payloads under `dir` and its metadata in the
    /// embedded SQLite database `dir/metadata.db`; adjust them before [`new`](Self::new):
    /// `.with_database_url("postgres://...")` keeps the metadata in PostgreSQL instead, where
    /// several processes may share one database and one `dir` under one cap.
    #[must_use]
    pub fn options(dir: impl Into<std::path::PathBuf>, policy: EvictionPolicy) -> CacheOptions {
        CacheOptions::new(dir, NAMESPACE, policy)
    }

    /// Open or create the cache: reconcile the directory with the metadata after a crash,
    /// spawn the cache's one evictor and run a start-up eviction pass.
    ///
    /// Requires a Tokio runtime. Stores are content-addressed whatever `options` say: a
    /// second store of a digest keeps the first.
    ///
    /// # Errors
    ///
    /// [`Error::Cache`](crate::Error::Cache) if the directory or database cannot be opened or
    /// the options are inconsistent.
    pub async fn new(options: CacheOptions) -> Result<Self> {
        let cache = EntryCache::open(options.with_on_conflict(OnConflict::KeepExisting)).await?;
        // One upstream fetch per blob across the instances sharing a PostgreSQL database.
        let fills = Fills::shared(cache.entries().clone(), FillOptions::new());
        Ok(Self { cache, fills })
    }

    /// The same cache with its fills bound by `options` (say, an idle timeout); call before
    /// the first [`fill`](Self::fill).
    #[must_use]
    pub fn with_fill_options(mut self, options: FillOptions) -> Self {
        self.fills = Fills::shared(self.cache.entries().clone(), options);
        self
    }

    /// Join the upstream fill of `digest`, or start it with `fetch` if none is in flight: the
    /// miss path of a pull-through mirror, one upstream transfer per blob however many
    /// clients ask.
    ///
    /// `fetch` asks the upstream and returns the body's announced length and its bytes (or
    /// [`FillError::Refused`] with the upstream's status). The bytes are spooled in the
    /// cache's own directory, streamed to every client that joined as they arrive (the last
    /// one held until the blob's digest is verified), then renamed into place and committed:
    /// one disk write per miss. See [`dunite_core::Fills`] for what the returned [`Joined`]
    /// offers and guarantees; look the digest up with [`open`](Self::open) first. A fill
    /// looks once more, beside its upstream request, and serves the blob if the cache holds
    /// it by then (committed by a fill that ended between the caller's look-up and its join).
    ///
    /// Requires a Tokio runtime; the fill runs on a task of its own, so a client going away
    /// does not cancel it.
    ///
    /// # Example
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use dunite_core::EvictionPolicy;
    /// use dunite_oci::{BlobCache, Digest};
    /// use futures_util::StreamExt as _;
    ///
    /// let dir = tempfile::tempdir()?;
    /// let cache = BlobCache::new(BlobCache::options(dir.path(), EvictionPolicy::new(1 << 20))).await?;
    /// let blob = b"layer bytes";
    /// let digest = Digest::sha256_of(blob);
    /// let mut joined = cache.fill(&digest, || async {
    ///     // An HTTP client's response would go here.
    ///     let body = futures_util::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from_static(blob))]);
    ///     Ok((Some(blob.len() as u64), body))
    /// })?;
    /// assert_eq!(joined.started().await?.total(), Some(11));
    /// let served: Vec<u8> = joined.body(0, None).map(|chunk| chunk.unwrap().to_vec()).concat().await;
    /// assert_eq!(served, blob);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Cache`](crate::Error::Cache) outside a Tokio runtime. The fill's own failures
    /// reach its clients through [`Joined`].
    pub fn fill<F, Fut, S, E>(&self, digest: &Digest, fetch: F) -> Result<Joined<()>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<(Option<u64>, S), FillError>> + Send,
        S: Stream<Item = std::result::Result<Bytes, E>> + Send,
        E: std::error::Error + Send + Sync + 'static,
    {
        let key = digest.to_string();
        let expected = Expected::new().with_digest(digest.content_digest().clone());
        let cache = self.cache.clone();
        Ok(self.fills.join(digest.clone(), expected, move |filling| async move {
            // The caller looked before joining, but a fill of the digest may have landed
            // since (its task had left the table): a blob the cache holds is served, not
            // fetched again, whatever the upstream says. The look runs beside the upstream
            // request, so a miss waits for the slower of the two, not both (a database far
            // away adds no round trip); a failed look is a miss.
            let (found, answer) = tokio::join!(cache.open_entry(&key), fetch());
            if let Ok(Some(entry)) = found {
                drop(answer);
                filling.serve_existing((), entry).await;
                return Ok(());
            }
            let (total, body) = answer?;
            filling.fill(&key, ((), total), body, |_| String::new()).await
        })?)
    }

    /// Blob fills in flight now.
    #[must_use]
    pub fn fills_in_flight(&self) -> usize {
        self.fills.in_flight()
    }

    /// Store a blob of unknown size, verifying it against `digest`. See
    /// [`store_with_size`](Self::store_with_size).
    ///
    /// # Errors
    ///
    /// As [`store_with_size`](Self::store_with_size).
    pub async fn store<R>(&self, digest: &Digest, reader: R) -> Result<Stored>
    where
        R: AsyncRead + Unpin + Send,
    {
        self.store_expecting(digest, Expected::new(), reader).await
    }

    /// Store a blob of `size` bytes from `reader`, verifying size and digest as it streams
    /// (memory stays bounded whatever the size). The bytes go to a temporary file, are
    /// verified, synced and renamed into place; then the row commits; then the evictor is
    /// poked. A second store of a digest already cached is a no-op
    /// ([`StoreOutcome::AlreadyPresent`](dunite_core::StoreOutcome::AlreadyPresent)).
    ///
    /// # Cancel safety
    ///
    /// Cancelling never leaves a visible partial blob or counted bytes.
    ///
    /// # Errors
    ///
    /// [`Error::Cache`](crate::Error::Cache) with [`TooLarge`](dunite_core::Error::TooLarge)
    /// (checked before any byte is written when `size` is over the cap),
    /// [`DigestMismatch`](dunite_core::Error::DigestMismatch),
    /// [`Truncated`](dunite_core::Error::Truncated), [`TooLong`](dunite_core::Error::TooLong),
    /// [`Source`](dunite_core::Error::Source) for a failing reader, or an I/O or database
    /// error. Nothing is stored in any of these cases.
    pub async fn store_with_size<R>(&self, digest: &Digest, size: u64, reader: R) -> Result<Stored>
    where
        R: AsyncRead + Unpin + Send,
    {
        self.store_expecting(digest, Expected::new().with_size(size), reader).await
    }

    /// Store the blob already written to the file at `path` (say, an upstream fill's spool)
    /// without copying it: verified in place against `digest` and `size`, then moved into the
    /// cache; see [`EntryStore::store_file`](dunite_core::EntryStore::store_file) for what
    /// happens to the file on each outcome.
    ///
    /// # Cancel safety
    ///
    /// Cancelling never leaves a visible partial blob or counted bytes.
    ///
    /// # Errors
    ///
    /// As [`store_with_size`](Self::store_with_size).
    pub async fn store_file_with_size(
        &self,
        digest: &Digest,
        size: u64,
        path: &std::path::Path,
    ) -> Result<Stored> {
        let expected = Expected::new().with_size(size).with_digest(digest.content_digest().clone());
        Ok(self.cache.store_file(&digest.to_string(), path, &expected, "").await?)
    }

    async fn store_expecting<R>(&self, digest: &Digest, expected: Expected, reader: R) -> Result<Stored>
    where
        R: AsyncRead + Unpin + Send,
    {
        let expected = expected.with_digest(digest.content_digest().clone());
        Ok(self.cache.store(&digest.to_string(), reader, &expected, "").await?)
    }

    /// Open the blob with `digest`, if cached, and record the hit for LRU order (in memory;
    /// written in batches, so the hit path makes no database write).
    ///
    /// When the metadata database is unreachable, the blob is looked for on disk instead and
    /// handed out only if its bytes hash to `digest` (a full read of the file first): cached
    /// blobs stay servable through a database outage, more slowly. A pool merely busy is no
    /// outage: its timeout is returned (`dunite_core::Error::is_pool_timeout`), not turned
    /// into a full-file read per hit.
    ///
    /// # Errors
    ///
    /// [`Error::Cache`](crate::Error::Cache) if the payload cannot be opened, or the metadata
    /// cannot be read and the directory cannot be searched either.
    pub async fn open(&self, digest: &Digest) -> Result<Option<Blob>> {
        Ok(open_verified(&self.cache, digest, "blob").await?.map(|found| match found {
            Found::Indexed { file, info } => Blob { size: info.size, file },
            Found::OnDisk { file, size } => Blob { size, file },
        }))
    }

    /// Whether the blob is cached (no access recorded).
    ///
    /// # Errors
    ///
    /// [`Error::Cache`](crate::Error::Cache) if the metadata cannot be read.
    pub async fn contains(&self, digest: &Digest) -> Result<bool> {
        Ok(self.cache.contains(&digest.to_string()).await?)
    }

    /// Remove the blob now. Returns the bytes freed, if it was cached.
    ///
    /// # Errors
    ///
    /// [`Error::Cache`](crate::Error::Cache) on an I/O or database error.
    pub async fn remove(&self, digest: &Digest) -> Result<Option<u64>> {
        Ok(self.cache.remove(&digest.to_string()).await?)
    }

    /// Keep the blob out of eviction while the guard lives (an in-flight upstream fill).
    pub fn pin(&self, digest: &Digest) -> Pin {
        self.cache.pin(&digest.to_string())
    }

    /// The number of cached blobs (O(1)).
    ///
    /// # Errors
    ///
    /// [`Error::Cache`](crate::Error::Cache) if the metadata cannot be read.
    pub async fn len(&self) -> Result<u64> {
        Ok(self.cache.len().await?)
    }

    /// Whether the cache is empty.
    ///
    /// # Errors
    ///
    /// [`Error::Cache`](crate::Error::Cache) if the metadata cannot be read.
    pub async fn is_empty(&self) -> Result<bool> {
        Ok(self.cache.is_empty().await?)
    }

    /// The accounted total of blob bytes (O(1): kept alongside the rows).
    ///
    /// # Errors
    ///
    /// [`Error::Cache`](crate::Error::Cache) if the metadata cannot be read.
    pub async fn total_bytes(&self) -> Result<u64> {
        Ok(self.cache.total_bytes().await?)
    }

    /// Run an eviction pass now (on the cache's one eviction task) and wait for it.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the pass still runs.
    ///
    /// # Errors
    ///
    /// [`Error::Cache`](crate::Error::Cache) if the pass failed (the evictor also retries it).
    pub async fn evict_if_over_cap(&self) -> Result<PassReport> {
        Ok(self.cache.evict_if_over_cap().await?)
    }

    /// Hits, misses, bytes stored and the evictor's counters.
    #[must_use]
    pub fn stats(&self) -> CacheStats {
        self.cache.stats()
    }

    /// The shared entry cache underneath.
    #[must_use]
    pub fn entries(&self) -> &EntryCache {
        &self.cache
    }
}
