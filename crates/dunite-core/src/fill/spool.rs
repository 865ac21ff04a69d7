//! The writing half of a fill: the spool, hashed as it is written, verified, and committed by
//! rename.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{FutureExt as _, Stream, StreamExt as _};
use tempfile::TempPath;
use tokio::sync::watch;

use super::lease::OwnerLease;
use super::{FillError, FillOptions, Landing, Source, State};
use crate::entries::{EntryStore, Expected, OpenEntry, Written, blocking};
use crate::hash::{ContentDigest, Hasher};
use crate::{DigestAlgorithm, Error};

/// Bytes gathered before one write to the spool: the upstream's chunks are small (a few KiB),
/// and each write is a trip to the blocking pool. A chunk is written sooner when the upstream
/// has nothing more ready, so clients never wait on a half-full buffer.
const WRITE_BATCH: usize = 256 * 1024;

/// How long a partial batch waits for the upstream's next chunk before it is written anyway.
const GATHER: Duration = Duration::from_millis(2);

/// The spool while it is being written: the file and the running hash move to the blocking
/// pool for each write and come back.
struct Open {
    file: std::fs::File,
    hasher: Hasher,
}

/// The writing half of one fill, handed to the `run` closure of
/// [`Fills::join`](super::Fills::join): publish the upstream's answer
/// ([`respond`](Self::respond)), stream its body into the spool ([`receive`](Self::receive)),
/// and make the verified spool the cache's entry ([`commit`](Self::commit)).
///
/// Clients read what it publishes. Dropping it deletes the spool (unless it was moved into
/// place); the fill's task ending before the bytes are verified (an error, a panic) fails
/// its clients.
pub struct Filling<H> {
    store: EntryStore,
    expected: Expected,
    state: Arc<watch::Sender<State<H>>>,
    idle_timeout: Option<Duration>,
    /// The cache's cap, or the fills' own bound below it.
    max_bytes: u64,
    /// Set by `respond`.
    source: Option<Arc<Source<H>>>,
    open: Option<Open>,
    temp: Option<TempPath>,
    written: u64,
    digest: Option<ContentDigest>,
    /// The cross-instance lease this fill owns, if shared: `respond` tells followers where
    /// the spool is.
    lease: Option<SpoolLease<H>>,
}

/// The lease a shared fill owns, and how its head is written into the lease's row.
type SpoolLease<H> = (Arc<OwnerLease>, fn(&H) -> String);

impl<H> std::fmt::Debug for Filling<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Filling")
            .field("expected", &self.expected)
            .field("written", &self.written)
            .finish_non_exhaustive()
    }
}

impl<H: Send + Sync + 'static> Filling<H> {
    pub(super) fn new(
        store: EntryStore,
        expected: Expected,
        state: Arc<watch::Sender<State<H>>>,
        options: &FillOptions,
    ) -> Self {
        let max_bytes = options.max_bytes.map_or(store.max_bytes(), |max| max.min(store.max_bytes()));
        Self {
            store,
            expected,
            state,
            idle_timeout: options.idle_timeout,
            max_bytes,
            source: None,
            open: None,
            temp: None,
            written: 0,
            digest: None,
            lease: None,
        }
    }

    /// Share this fill through `lease`: `respond` publishes the spool's name, the announced
    /// size and the head (as `encode` writes it).
    pub(super) fn set_lease(&mut self, lease: Arc<OwnerLease>, encode: fn(&H) -> String) {
        self.lease = Some((lease, encode));
    }

    /// Where the fill publishes its progress to its clients.
    pub(super) fn state(&self) -> &Arc<watch::Sender<State<H>>> {
        &self.state
    }

    /// The bound on the body: the cache's cap, or the fills' own bound below it.
    pub(super) fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// The store the fill commits to.
    pub(super) fn store(&self) -> &EntryStore {
        &self.store
    }

    /// What the bytes are checked against.
    #[must_use]
    pub fn expected(&self) -> &Expected {
        &self.expected
    }

    /// The bytes must also hash to `digest`, learnt from the upstream's answer (say, the
    /// digest a registry announces for a tag's manifest): the body is hashed with its
    /// algorithm. Call before [`respond`](Self::respond). An expectation only tightens: the
    /// digest the fill was joined with, if any, stays.
    ///
    /// # Errors
    ///
    /// [`FillError::Invalid`] with [`Error::DigestMismatch`] if the fill already expects
    /// another digest (nothing is read then).
    ///
    /// # Panics
    ///
    /// If called after [`respond`](Self::respond).
    pub fn expect_digest(&mut self, digest: ContentDigest) -> Result<(), FillError> {
        assert!(self.source.is_none(), "expect_digest comes before respond");
        match self.expected.digest() {
            Some(want) if *want != digest => {
                Err(invalid(Error::DigestMismatch { expected: want.to_string(), actual: digest.to_string() }))
            }
            Some(_) => Ok(()),
            None => {
                self.expected = std::mem::take(&mut self.expected).with_digest(digest);
                Ok(())
            }
        }
    }

    /// The digest of the verified bytes, once [`receive`](Self::receive) returned `Ok`: for a
    /// fill whose key is only known from its bytes (a manifest asked for by tag is stored
    /// under its digest), the key to [`commit`](Self::commit) them as.
    #[must_use]
    pub fn digest(&self) -> Option<&ContentDigest> {
        self.digest.as_ref()
    }

    /// The upstream answered with a body of `total` bytes (if it said): create the spool and
    /// tell the clients, who learn `head` and `total` from
    /// [`Joined::started`](super::Joined::started).
    ///
    /// # Errors
    ///
    /// [`FillError::Invalid`] if `total` is over the cache's cap (or the fills' bound,
    /// [`FillOptions::with_max_bytes`]) or differs from the expected size (nothing is read
    /// then); [`FillError::Local`] if the spool cannot be created.
    pub async fn respond(&mut self, head: H, total: Option<u64>) -> Result<(), FillError> {
        let max_bytes = self.max_bytes;
        match (total, self.expected.size()) {
            (Some(total), _) if total > max_bytes => {
                return Err(invalid(Error::TooLarge { size: total, max_bytes }));
            }
            (Some(total), Some(expected)) if total > expected => {
                return Err(invalid(Error::TooLong { expected }));
            }
            (Some(total), Some(expected)) if total < expected => {
                return Err(invalid(Error::Truncated { expected, received: total }));
            }
            _ => {}
        }
        let tmp = self.store.tmp_dir().to_path_buf();
        let dir = tmp.clone();
        let (file, temp, reader) = blocking(move || {
            let (file, temp) = tempfile::Builder::new().prefix("fill-").tempfile_in(&dir)?.into_parts();
            // A second handle, for the readers.
            let reader = std::fs::File::open(&temp)?;
            Ok((file, temp, reader))
        })
        .await
        .map_err(|e| FillError::Local(Arc::new(Error::io("create a spool in", tmp)(e))))?;
        if let Some((lease, encode)) = &self.lease {
            let name = temp.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
            lease.publish(&name, total, &encode(&head)).await;
        }
        let algorithm = self.expected.digest().map_or(DigestAlgorithm::Sha256, ContentDigest::algorithm);
        self.open = Some(Open { file, hasher: algorithm.hasher() });
        self.temp = Some(temp);
        let source = Arc::new(Source { head: Arc::new(head), total, file: Arc::new(reader) });
        self.source = Some(Arc::clone(&source));
        self.state.send_replace(State::Receiving { source, written: 0 });
        Ok(())
    }

    /// Stream `body` into the spool, hashing it and publishing progress, then check the bytes
    /// against the expected size and digest and the cache's cap, let clients have the last
    /// byte, and sync the spool (no client waits for that).
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe: a cancelled call leaves the fill unfinished (its clients then fail
    /// when the fill is dropped).
    ///
    /// # Errors
    ///
    /// [`FillError::Upstream`] if the body fails, [`FillError::TimedOut`] if it goes quiet
    /// for the idle timeout, [`FillError::Invalid`] for bytes over the cap, too many, too few
    /// or of the wrong digest (checked as they come where possible), [`FillError::Local`] if
    /// the spool cannot be written.
    ///
    /// # Panics
    ///
    /// If called before [`respond`](Self::respond) or twice.
    pub async fn receive<S, E>(&mut self, body: S) -> Result<(), FillError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: std::error::Error + Send + Sync + 'static,
    {
        let max_bytes = self.max_bytes;
        // The expected size, or else the announced one: past it, the body is too long.
        let declared = self.expected.size().or_else(|| self.source.as_ref().and_then(|source| source.total));
        let mut body = std::pin::pin!(body);
        let mut batch: Vec<Bytes> = Vec::new();
        let mut batched = 0usize;
        let mut received = self.written;
        loop {
            // A network body comes in chunks of a few KiB, each a moment after the last:
            // gather them for up to `GATHER` before writing, then write what is gathered
            // before waiting longer on the upstream, so clients see every byte that arrived
            // and a quiet upstream holds no bytes back.
            let next = match body.next().now_or_never() {
                Some(next) => next,
                None if batch.is_empty() => self.next_chunk(&mut body, received).await?,
                None => match tokio::time::timeout(GATHER, body.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        self.write(std::mem::take(&mut batch)).await?;
                        batched = 0;
                        self.next_chunk(&mut body, received).await?
                    }
                },
            };
            let Some(chunk) = next else { break };
            let chunk = chunk.map_err(|e| FillError::upstream(received, e))?;
            if chunk.is_empty() {
                continue;
            }
            received += chunk.len() as u64;
            if received > max_bytes {
                return Err(invalid(Error::TooLarge { size: received, max_bytes }));
            }
            if let Some(expected) = declared
                && received > expected
            {
                return Err(invalid(Error::TooLong { expected }));
            }
            batched += chunk.len();
            batch.push(chunk);
            if batched >= WRITE_BATCH {
                self.write(std::mem::take(&mut batch)).await?;
                batched = 0;
            }
        }
        self.write(batch).await?;
        self.verify().await
    }

    /// The next chunk of `body`, within the idle timeout.
    async fn next_chunk<S, E>(
        &self,
        body: &mut std::pin::Pin<&mut S>,
        received: u64,
    ) -> Result<Option<Result<Bytes, E>>, FillError>
    where
        S: Stream<Item = Result<Bytes, E>>,
    {
        match self.idle_timeout {
            None => Ok(body.next().await),
            Some(idle) => tokio::time::timeout(idle, body.next())
                .await
                .map_err(|_| FillError::TimedOut { idle, received }),
        }
    }

    /// Append `chunks` to the spool and hash them, on the blocking pool; then publish.
    async fn write(&mut self, chunks: Vec<Bytes>) -> Result<(), FillError> {
        if chunks.is_empty() {
            return Ok(());
        }
        let Open { mut file, mut hasher } =
            self.open.take().expect("respond creates the spool before receive");
        let path = self.spool_path();
        let (open, wrote) = blocking(move || {
            let mut wrote = 0u64;
            for chunk in &chunks {
                std::io::Write::write_all(&mut file, chunk)?;
                hasher.update(chunk);
                wrote += chunk.len() as u64;
            }
            Ok((Open { file, hasher }, wrote))
        })
        .await
        .map_err(|e| FillError::Local(Arc::new(Error::io("write", path)(e))))?;
        self.open = Some(open);
        self.written += wrote;
        let source = Arc::clone(self.source.as_ref().expect("respond set the source"));
        self.state.send_replace(State::Receiving { source, written: self.written });
        Ok(())
    }

    /// Check the whole body, sync it, and let clients have its last byte.
    async fn verify(&mut self) -> Result<(), FillError> {
        let Open { file, hasher } = self.open.take().expect("respond creates the spool before receive");
        if let Some(expected) = self.expected.size()
            && self.written < expected
        {
            return Err(invalid(Error::Truncated { expected, received: self.written }));
        }
        if let Some(total) = self.source.as_ref().and_then(|source| source.total)
            && self.written != total
        {
            // The upstream announced a length it did not keep to: a cut body.
            return Err(invalid(Error::Truncated { expected: total, received: self.written }));
        }
        let digest = hasher.finish();
        if let Some(want) = self.expected.digest()
            && *want != digest
        {
            return Err(invalid(Error::DigestMismatch {
                expected: want.to_string(),
                actual: digest.to_string(),
            }));
        }
        // The bytes are right: clients may have the last one now. Durability is the cache's
        // concern, not theirs: the spool is synced before it is moved into place and
        // committed, but no client waits for the disk.
        let source = Arc::clone(self.source.as_ref().expect("respond set the source"));
        self.state.send_replace(State::Verified { source, written: self.written });
        let path = self.spool_path();
        blocking(move || file.sync_all())
            .await
            .map_err(|e| FillError::Local(Arc::new(Error::io("sync", path)(e))))?;
        self.digest = Some(digest);
        Ok(())
    }

    /// Make the verified spool the entry of `key`: renamed into place and committed with the
    /// metadata `meta` derives from its digest, never copied. Clients already have their
    /// bytes; this tells the ones waiting in [`Joined::finished`](super::Joined::finished)
    /// what was stored.
    ///
    /// A database that cannot record the entry (unreachable, or its pool busy) does not fail
    /// the fill: the bytes were verified and are served, uncached (logged).
    ///
    /// # Errors
    ///
    /// [`FillError::Local`] if the payload cannot be moved into place or the cache fails
    /// otherwise (the clients keep their verified bytes).
    ///
    /// # Panics
    ///
    /// If called before [`receive`](Self::receive) returned `Ok`.
    pub async fn commit(
        mut self,
        key: &str,
        meta: impl FnOnce(&ContentDigest) -> String + Send,
    ) -> Result<(), FillError> {
        let digest = self.digest.take().expect("commit follows a successful receive");
        let temp = self.temp.take().expect("respond created the spool");
        let written = Written { temp, size: self.written, digest };
        // From the commit until every client has let go of the fill.
        let pin = self.store.pin(key);
        let landing = match self.store.commit_written(key, written, meta).await {
            Ok(stored) => Landing { stored: Some(stored), uncached: None, _pin: Some(pin) },
            Err(e @ Error::Database { .. }) => {
                tracing::warn!(error = %e, key = %self.store.shown(key), "metadata unavailable; a fill is served uncached");
                Landing { stored: None, uncached: Some(FillError::Local(Arc::new(e))), _pin: None }
            }
            // The task's end records it as the reason the bytes were not stored.
            Err(e) => return Err(FillError::Local(Arc::new(e))),
        };
        let source = self.source.take().expect("respond set the source");
        self.state.send_replace(State::Landed { source, written: self.written, landing: Arc::new(landing) });
        Ok(())
    }

    /// The whole of a fill from the upstream's answer: [`respond`](Self::respond) with `head`
    /// and `total`, [`receive`](Self::receive) `body`, and [`commit`](Self::commit) it as
    /// `key` with the metadata `meta` derives from its digest.
    ///
    /// # Errors
    ///
    /// As those three.
    pub async fn fill<S, E>(
        mut self,
        key: &str,
        (head, total): (H, Option<u64>),
        body: S,
        meta: impl FnOnce(&ContentDigest) -> String + Send,
    ) -> Result<(), FillError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: std::error::Error + Send + Sync + 'static,
    {
        self.respond(head, total).await?;
        self.receive(body).await?;
        self.commit(key, meta).await
    }

    /// Resolve the fill to an entry already in the cache (say, a revalidation the upstream
    /// answered "not modified"): clients read `entry`'s payload, with `head`. Nothing is
    /// spooled.
    pub async fn serve_existing(mut self, head: H, entry: OpenEntry) {
        let size = entry.info.size;
        let file = entry.file.into_std().await;
        let source = Arc::new(Source { head: Arc::new(head), total: Some(size), file: Arc::new(file) });
        self.temp = None;
        self.state.send_replace(State::Landed { source, written: size, landing: Arc::default() });
    }

    fn spool_path(&self) -> std::path::PathBuf {
        self.temp.as_ref().map_or_else(|| self.store.tmp_dir().to_path_buf(), |temp| temp.to_path_buf())
    }
}

fn invalid(error: Error) -> FillError {
    FillError::Invalid(Arc::new(error))
}
