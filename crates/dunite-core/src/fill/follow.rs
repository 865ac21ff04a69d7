//! A fill shared across instances: take the key's lease and fill, or follow the owner's spool
//! in the shared directory as it grows.
//!
//! A follower serves its clients from the owner's spool, opened by name in the cache's `tmp/`
//! (the handle stays valid once the owner renames the spool into `data/` or a taker removes
//! it). It never takes the owner's word for the bytes: it hashes what it reads, and releases
//! the last byte only once the bytes it read hash to the digest the fill expects. A digest
//! names its bytes and their length, so a prefix that hashes to it is the whole body; no
//! signal from the owner is needed, and a follower can never serve a complete body the owner
//! would have failed. That is why only fills that expect a digest are shared (a blob's are):
//! the others run per process.
//!
//! When the owner's fill ends without a body this follower could verify (the owner failed, or
//! died: its heartbeat went stale), the follower either starts over, taking the lease itself,
//! if its clients have not been sent a byte yet, or fails its clients if they have: their
//! bytes came from a spool no one verified, so they must not be completed from another one.
//! Clients retry (skopeo retries a failed blob whole), and the retry takes over.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::lease::{Acquired, LeaseHead, LeaseRow, Leases};
use super::{FillError, Filling, Landing, Source, State};
use crate::Error;
use crate::entries::{EntryStore, blocking};
use crate::hash::{ContentDigest, Hasher};

/// How long a follower waits for the owner's spool to grow before looking again.
const GROWTH_POLL: Duration = Duration::from_millis(10);

/// How long a follower waits between reads of the lease row while the owner has not named its
/// spool yet (it is asking the upstream).
const CONNECT_POLL: Duration = Duration::from_millis(25);

/// Most bytes a follower reads and hashes at a time.
const FOLLOW_CHUNK: u64 = 1 << 20;

/// Times a follower starts over (its owner ended without a body it could verify) before it
/// fills on its own without a lease.
const RESTARTS: usize = 3;

/// What a fills table needs to share its fills through leases.
pub(super) struct Shared<K, H> {
    pub(super) leases: Leases,
    /// The key as the lease row and the cache's entry name it (the same text).
    pub(super) key: fn(&K) -> String,
    pub(super) encode: fn(&H) -> String,
    pub(super) decode: fn(&str) -> Option<H>,
}

impl<K, H> Clone for Shared<K, H> {
    fn clone(&self) -> Self {
        Self { leases: self.leases.clone(), key: self.key, encode: self.encode, decode: self.decode }
    }
}

impl<K, H: LeaseHead> Shared<K, H> {
    pub(super) fn new(leases: Leases, key: fn(&K) -> String) -> Self {
        Self { leases, key, encode: H::encode, decode: H::decode }
    }
}

/// How following a lease ended.
enum Followed {
    /// The clients have their verified bytes.
    Done,
    /// The owner ended before this follower sent its clients a byte: start over.
    Restart,
}

impl<K, H: Send + Sync + 'static> Shared<K, H> {
    /// Run a fill of `key` across instances: own it (then `run` fills as on one instance, and
    /// the lease is released when it ends, after the commit) or follow it.
    pub(super) async fn fill<F, Fut>(
        self,
        key: String,
        mut filling: Filling<H>,
        run: F,
    ) -> Result<(), FillError>
    where
        F: FnOnce(Filling<H>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), FillError>> + Send + 'static,
    {
        let Some(digest) = filling.expected().digest().cloned() else {
            return run(filling).await;
        };
        for _ in 0..RESTARTS {
            let row = match self.leases.acquire(&key).await {
                Ok(Acquired::Owner(lease)) => {
                    let lease = Arc::new(lease);
                    filling.set_lease(Arc::clone(&lease), self.encode);
                    // A panic in `run` drops the lease with the task: its guard releases it.
                    let result = run(filling).await;
                    if let Ok(lease) = Arc::try_unwrap(lease) {
                        lease.release().await;
                    }
                    return result;
                }
                Ok(Acquired::Held(row)) => row,
                Ok(Acquired::Cached) => {
                    let head = (self.decode)("").map(Arc::new);
                    match self.serve_entry(&key, filling.store(), filling.state(), head).await {
                        Some(()) => return Ok(()),
                        // Gone again (evicted), or no head to serve it with: round again.
                        None => continue,
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "no fill lease; filling without one");
                    return run(filling).await;
                }
            };
            let state = Arc::clone(filling.state());
            match self.follow(&key, row, &digest, filling.max_bytes(), filling.store(), &state).await? {
                Followed::Done => return Ok(()),
                Followed::Restart => {}
            }
        }
        tracing::debug!("a fill's owners kept ending without a body; filling without a lease");
        run(filling).await
    }

    /// Serve the clients of `state` from the spool of `row`'s owner, verifying the bytes
    /// against `digest` as they are read.
    async fn follow(
        &self,
        key: &str,
        mut row: LeaseRow,
        digest: &ContentDigest,
        max_bytes: u64,
        store: &EntryStore,
        state: &watch::Sender<State<H>>,
    ) -> Result<Followed, FillError> {
        tracing::debug!(owner = row.owner, "following another instance's fill");
        let mut reading: Option<Reading<H>> = None;
        let mut next_look = tokio::time::Instant::now();
        // Set once the row is gone: one last read of what the spool holds, then decide.
        let mut owner_gone = false;
        // The spool was gone when this follower came to open it: moved into place (its row is
        // released after the commit) or removed (a failed fill). Wait for the row to go.
        let mut vanished = false;
        loop {
            if reading.is_none() && !row.spool.is_empty() && !owner_gone && !vanished {
                match self.open(&row) {
                    Ok(opened) => {
                        state.send_replace(State::Receiving {
                            source: Arc::clone(&opened.source),
                            written: 0,
                        });
                        reading = Some(opened);
                    }
                    Err(Opened::Gone) => vanished = true,
                    Err(Opened::Unreadable) => return Ok(Followed::Restart),
                }
            }
            if let Some(current) = reading.as_mut() {
                let grew = current.read_more(digest).await.map_err(local)?;
                if current.hashed > max_bytes {
                    return Err(FillError::Invalid(Arc::new(Error::TooLarge {
                        size: current.hashed,
                        max_bytes,
                    })));
                }
                if current.verified {
                    let source = Arc::clone(&current.source);
                    let landing = Arc::new(Landing::default());
                    state.send_replace(State::Landed { source, written: current.hashed, landing });
                    return Ok(Followed::Done);
                }
                if grew {
                    // Every byte but the last: it waits for the digest.
                    let source = Arc::clone(&current.source);
                    state.send_replace(State::Receiving { source, written: current.hashed });
                    continue;
                }
            }
            if owner_gone {
                return self.ended(key, &row, store, state, reading.as_ref()).await;
            }
            if tokio::time::Instant::now() >= next_look {
                let poll =
                    if row.spool.is_empty() || vanished { CONNECT_POLL } else { self.leases.row_poll() };
                next_look = tokio::time::Instant::now() + poll;
                match self.leases.read(key).await {
                    Ok(Some(now)) if now.same_lease(&row) && !now.stale => row = now,
                    Ok(Some(now)) if now.same_lease(&row) => {
                        tracing::info!(
                            owner = row.owner,
                            "the owner of a followed fill stopped its heartbeat"
                        );
                        return self.abandon(reading.as_ref());
                    }
                    // Released (or released and taken again): read what is there, then decide.
                    Ok(_) => owner_gone = true,
                    // Cannot tell: keep following until the database answers (the owner's
                    // heartbeat cannot go stale unseen meanwhile: it is judged by the database).
                    Err(error) => tracing::debug!(%error, "cannot read a followed fill's lease"),
                }
                continue;
            }
            tokio::time::sleep(GROWTH_POLL).await;
        }
    }

    /// The owner's lease is gone and the bytes read do not verify: on success, its commit came
    /// first, so the cache holds the entry; else the fill failed.
    async fn ended(
        &self,
        key: &str,
        row: &LeaseRow,
        store: &EntryStore,
        state: &watch::Sender<State<H>>,
        reading: Option<&Reading<H>>,
    ) -> Result<Followed, FillError> {
        // The head the clients were told, or the row's (an owner that served an entry it
        // found names no spool).
        let head = match reading {
            Some(reading) => Some(Arc::clone(&reading.source.head)),
            None => (self.decode)(&row.head).map(Arc::new),
        };
        match self.serve_entry(key, store, state, head).await {
            Some(()) => Ok(Followed::Done),
            None => self.abandon(reading),
        }
    }

    /// Serve the cache's entry of `key` with `head`, if it holds one (and there is a head).
    async fn serve_entry(
        &self,
        key: &str,
        store: &EntryStore,
        state: &watch::Sender<State<H>>,
        head: Option<Arc<H>>,
    ) -> Option<()> {
        let head = head?;
        let entry = match store.open_entry(key).await {
            Ok(entry) => entry?,
            Err(error) => {
                tracing::debug!(%error, "cannot look up a shared fill's entry");
                return None;
            }
        };
        let size = entry.info.size;
        let file = entry.file.into_std().await;
        let source = Arc::new(Source { head, total: Some(size), file: Arc::new(file) });
        state.send_replace(State::Landed { source, written: size, landing: Arc::default() });
        Some(())
    }

    /// The followed fill ended without a verified body: start over if no client was sent a
    /// byte, else fail them (see the module's docs).
    fn abandon(&self, reading: Option<&Reading<H>>) -> Result<Followed, FillError> {
        match reading {
            Some(reading) if reading.hashed > 1 => Err(FillError::Ended),
            _ => Ok(Followed::Restart),
        }
    }

    /// Open the spool `row` names.
    fn open(&self, row: &LeaseRow) -> Result<Reading<H>, Opened> {
        let Some(path) = self.leases.spool_path(&row.spool) else {
            tracing::warn!(spool = row.spool, "a fill lease names no spool of this cache");
            return Err(Opened::Unreadable);
        };
        let Some(head) = (self.decode)(&row.head) else {
            tracing::warn!("a fill lease's head cannot be read; filling without it");
            return Err(Opened::Unreadable);
        };
        let file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Opened::Gone),
            Err(error) => {
                tracing::warn!(%error, path = %path.display(), "cannot open another instance's spool");
                return Err(Opened::Unreadable);
            }
        };
        let source = Arc::new(Source { head: Arc::new(head), total: row.total, file: Arc::new(file) });
        Ok(Reading { source, hasher: None, hashed: 0, verified: false })
    }
}

/// Why a spool could not be opened.
enum Opened {
    /// No such file: the fill has ended.
    Gone,
    /// Anything else: fill without the lease.
    Unreadable,
}

/// A followed spool: the bytes read and hashed so far.
struct Reading<H> {
    source: Arc<Source<H>>,
    /// Moved to the blocking pool for each read; `None` before the first.
    hasher: Option<Hasher>,
    hashed: u64,
    verified: bool,
}

impl<H: Send + Sync + 'static> Reading<H> {
    /// Read and hash what the spool holds past `hashed` (up to [`FOLLOW_CHUNK`]); whether it
    /// grew. Sets `verified` once the bytes read hash to `digest`.
    async fn read_more(&mut self, digest: &ContentDigest) -> std::io::Result<bool> {
        let source = Arc::clone(&self.source);
        let hasher = self.hasher.take().unwrap_or_else(|| digest.algorithm().hasher());
        let (from, want) = (self.hashed, digest.clone());
        let (hasher, read, verified) = blocking(move || {
            let mut hasher = hasher;
            let size = source.file.metadata()?.len();
            if size <= from {
                return Ok((hasher, 0, false));
            }
            let len = (size - from).min(FOLLOW_CHUNK);
            let mut buf = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX)];
            std::os::unix::fs::FileExt::read_exact_at(&*source.file, &mut buf, from)?;
            hasher.update(&buf);
            let verified = hasher.clone().finish() == want;
            Ok((hasher, len, verified))
        })
        .await?;
        self.hasher = Some(hasher);
        self.hashed += read;
        self.verified = verified;
        Ok(read > 0)
    }
}

fn local(error: std::io::Error) -> FillError {
    FillError::Local(Arc::new(Error::io("follow", "another instance's spool")(error)))
}
