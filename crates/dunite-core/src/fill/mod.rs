//! Single-flight upstream fills, streamed to every client as they arrive and committed by
//! rename: one disk write per miss.
//!
//! A cache miss starts one fill per key, however many clients ask ([`Fills::join`]). The
//! fill writes the upstream's body into a spool file in the cache's own `tmp/` directory,
//! hashing it as it goes, and publishes how many bytes are there. Every client that joined
//! reads the spool through a shared handle as it grows ([`Joined::body`]), so it receives
//! bytes as they arrive; the last byte of the body is held back until the bytes are verified
//! (size, digest, the cap), so no client ever receives a complete body that then fails
//! verification. Once verified, the spool itself becomes the payload: it is synced, renamed
//! into `data/` and committed, never copied.
//!
//! ```text
//! join(key) ──► spool in tmp/ ──write+hash──► verified ──rename+commit──► entry in data/
//!                  ▲    ▲                         │
//!      client A ───┘    └── client B (joined later: reads the same handle, so a spool
//!                                      renamed meanwhile is still read to its end)
//! ```

mod follow;
mod lease;
mod reader;
mod spool;

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;

pub use lease::LeaseHead;
pub use reader::{Finished, Joined, Started};
pub use spool::Filling;

use self::follow::Shared;
use self::lease::Leases;
use crate::entries::{EntryStore, Expected};
use crate::{BoxError, Error, Pin, Stored};

/// Why a fill failed. Every client of the fill gets the same error; nothing was cached.
///
/// Cheap to clone: causes are reference-counted.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum FillError {
    /// The upstream answered with a status that is not a success (a `404` means it does not
    /// have the content).
    #[error("upstream answered {status}")]
    Refused {
        /// The upstream's HTTP status.
        status: u16,
    },
    /// The upstream request or its body failed (connection refused or cut, TLS, a bad
    /// answer).
    #[error("upstream failed after {received} bytes of the body")]
    Upstream {
        /// Bytes of the body received before the failure.
        received: u64,
        /// The client's error.
        #[source]
        source: BoxError,
    },
    /// No byte of the body came for `idle`.
    #[error("upstream sent nothing for {idle:?} after {received} bytes")]
    TimedOut {
        /// The idle timeout ([`FillOptions::with_idle_timeout`]).
        idle: Duration,
        /// Bytes received before the upstream went quiet.
        received: u64,
    },
    /// The bytes are not the ones expected: over the cap, short, long, or of another digest
    /// ([`Error::TooLarge`], [`Error::Truncated`], [`Error::TooLong`],
    /// [`Error::DigestMismatch`]). An upstream fault, not the cache's.
    #[error("upstream sent bad content")]
    Invalid(#[source] Arc<Error>),
    /// The cache failed on its own side: the spool could not be created, written or read (a
    /// full disk shows up here).
    #[error("the cache failed to spool the fill")]
    Local(#[source] Arc<Error>),
    /// The fill ended without an outcome: it panicked, or its task was cancelled (the runtime
    /// shut down).
    #[error("the fill ended without an outcome")]
    Ended,
    /// The cache kind running the fill failed it with an error of its own (downcast the
    /// source to read it).
    #[error(transparent)]
    Other(BoxError),
}

impl FillError {
    /// An upstream failure from any error type, after `received` bytes of the body.
    pub fn upstream(received: u64, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Upstream { received, source: Arc::new(source) }
    }

    /// A failure of the cache kind's own, carried to every client as it is.
    pub fn other(source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Other(Arc::new(source))
    }

    /// Whether the upstream answered `404 Not Found`.
    #[must_use]
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Refused { status: 404 })
    }
}

/// How fills behave; see [`Fills::new`].
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct FillOptions {
    idle_timeout: Option<Duration>,
    max_bytes: Option<u64>,
    lease_timeout: Option<Duration>,
}

/// How long a fill lease lives without a heartbeat by default ([`FillOptions::lease_timeout`]).
pub const DEFAULT_LEASE_TIMEOUT: Duration = Duration::from_secs(15);

impl FillOptions {
    /// Default options: no idle timeout (the upstream client's own timeouts apply), fills
    /// bounded by the cache's cap alone.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Bound every fill to `max_bytes` (when below the cache's cap): a body announced or
    /// received past it fails the fill as it arrives, with
    /// [`Error::TooLarge`] (say, a manifest cache that reads no manifest over 4 MiB).
    #[must_use]
    pub fn with_max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = Some(max_bytes);
        self
    }

    /// The idle timeout, if set.
    #[must_use]
    pub fn idle_timeout(&self) -> Option<Duration> {
        self.idle_timeout
    }

    /// The fills' own bound, if set (the cache's cap bounds them anyway).
    #[must_use]
    pub fn max_bytes(&self) -> Option<u64> {
        self.max_bytes
    }

    /// With a shared database (PostgreSQL), how long another instance's fill lease lives
    /// without a heartbeat before it is judged dead and taken over ([`Fills::shared`]); the
    /// owner refreshes it every third of this. Default [`DEFAULT_LEASE_TIMEOUT`].
    #[must_use]
    pub fn with_lease_timeout(mut self, timeout: Duration) -> Self {
        self.lease_timeout = Some(timeout);
        self
    }

    /// The fill lease timeout (see [`with_lease_timeout`](Self::with_lease_timeout)).
    #[must_use]
    pub fn lease_timeout(&self) -> Duration {
        self.lease_timeout.unwrap_or(DEFAULT_LEASE_TIMEOUT)
    }

    /// Fail a fill whose upstream sends no byte of the body for `idle` (a server's upstream
    /// timeout): an upstream that goes quiet cannot hold a key, its clients and its spool for
    /// ever.
    #[must_use]
    pub fn with_idle_timeout(mut self, idle: Duration) -> Self {
        self.idle_timeout = Some(idle);
        self
    }
}

/// What a fill's source is, once the upstream has answered: shared by every client.
struct Source<H> {
    /// What the caller said about the answer (a content type, validators).
    head: Arc<H>,
    /// The body's size, if announced.
    total: Option<u64>,
    /// The bytes: the spool (read by position, so it is read to its end even once renamed
    /// into place), or an existing payload a fill resolved to.
    file: Arc<std::fs::File>,
}

/// Where a fill is; published on a watch channel to its clients.
enum State<H> {
    /// Waiting for the upstream's answer.
    Connecting,
    /// Receiving: `written` bytes are in the spool. Clients may read all but the last.
    Receiving { source: Arc<Source<H>>, written: u64 },
    /// All `written` bytes are in and verified: clients may read them all.
    Verified { source: Arc<Source<H>>, written: u64 },
    /// Verified and handed to the cache (or resolved to an entry it holds): how it landed.
    Landed { source: Arc<Source<H>>, written: u64, landing: Arc<Landing> },
    /// Failed: nothing was cached.
    Failed(FillError),
}

/// How a verified fill landed in its cache.
#[derive(Debug, Default)]
pub(crate) struct Landing {
    /// What the cache committed, if it did.
    pub(crate) stored: Option<Stored>,
    /// Why the verified bytes were not stored (they are served all the same).
    pub(crate) uncached: Option<FillError>,
    /// Keeps a stored entry from this process's evictor until every client of the fill has
    /// let go of it (and so could open it).
    pub(crate) _pin: Option<Pin>,
}

impl<H> State<H> {
    fn is_open(&self) -> bool {
        matches!(self, Self::Connecting | Self::Receiving { .. })
    }
}

/// A fill's task, as `join` spawns it.
type FillTask = std::pin::Pin<Box<dyn Future<Output = Result<(), FillError>> + Send>>;

type InFlight<K, H> = Arc<Mutex<HashMap<K, Arc<watch::Sender<State<H>>>>>>;

/// The in-flight fills of one cache, by key: at most one fill per key at a time.
///
/// `K` is the fill's key (a digest; a URL with the pin it is verified against: two requests
/// that verify differently are two fills). `H` is what a fill learns from the upstream's
/// answer and every client needs (say, a content type): `()` if nothing.
///
/// Cheap to clone; clones share the table.
///
/// # Example
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use dunite_core::{
///     CacheOptions, ContentDigest, DigestAlgorithm, EntryCache, EvictionPolicy, Expected, FillOptions,
///     Fills,
/// };
/// use futures_util::StreamExt as _;
///
/// let dir = tempfile::tempdir()?;
/// let cache = EntryCache::open(CacheOptions::new(dir.path(), "files", EvictionPolicy::new(1 << 20))).await?;
/// let fills: Fills<String, ()> = Fills::new(cache.entries().clone(), FillOptions::new());
///
/// let bytes = b"hello, fill".to_vec();
/// let expected = Expected::new().with_digest(ContentDigest::of(DigestAlgorithm::Sha256, &bytes));
/// let upstream = futures_util::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(bytes.clone()))]);
/// let mut joined = fills.join("greeting".to_owned(), expected, |mut filling| async move {
///     filling.respond((), Some(11)).await?;
///     filling.receive(upstream).await?;
///     filling.commit("greeting", |_| String::new()).await
/// })?;
/// let started = joined.started().await?;
/// assert_eq!(started.total(), Some(11));
/// // Clients get their bytes once verified; `finished` also waits for the commit.
/// assert_eq!(joined.finished().await?.size(), 11);
/// assert!(cache.contains("greeting").await?);
/// let body: Vec<u8> = joined.body(0, None).map(|chunk| chunk.unwrap().to_vec()).concat().await;
/// assert_eq!(body, bytes);
/// # Ok(())
/// # }
/// ```
pub struct Fills<K, H> {
    inflight: InFlight<K, H>,
    store: EntryStore,
    options: FillOptions,
    /// Set by [`shared`](Self::shared) on a shared database: fills go through leases.
    shared: Option<Shared<K, H>>,
}

impl<K, H> Clone for Fills<K, H> {
    fn clone(&self) -> Self {
        Self {
            inflight: Arc::clone(&self.inflight),
            store: self.store.clone(),
            options: self.options.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<K, H> fmt::Debug for Fills<K, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fills")
            .field("in_flight", &lock(&self.inflight).len())
            .field("options", &self.options)
            .field("shared", &self.shared.is_some())
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<K, H> Fills<K, H>
where
    K: Eq + Hash + Clone + Send + Sync + 'static,
    H: Send + Sync + 'static,
{
    /// An empty table for fills into `store` (their spools go to its `tmp/`, on the same file
    /// system as its payloads, so a verified spool is renamed into place).
    #[must_use]
    pub fn new(store: EntryStore, options: FillOptions) -> Self {
        Self { inflight: Arc::default(), store, options, shared: None }
    }

    /// Fills in flight now.
    #[must_use]
    pub fn in_flight(&self) -> usize {
        lock(&self.inflight).len()
    }

    /// Join the fill of `key`, or start it with `run` if none is in flight.
    ///
    /// `run` gets the fill's [`Filling`], the writing half: it asks the upstream, then calls
    /// [`respond`](Filling::respond), [`receive`](Filling::receive) and
    /// [`commit`](Filling::commit) (or [`serve_existing`](Filling::serve_existing)), and
    /// returns their error if any. It runs on a task of its own, so a client going away does
    /// not cancel it for the others; the bytes are checked against `expected` (and the cap)
    /// whatever the cache answers at the commit. When the task ends, however it ends (an
    /// error, a panic), the key is free again and an unfinished fill fails its clients with
    /// its error, or [`FillError::Ended`].
    ///
    /// A client that joins late (even after the spool was renamed into place) reads the same
    /// bytes from the start; once the fill has landed in the cache (or failed), the next
    /// `join` starts a new fill, so callers look the key up in the cache first.
    ///
    /// Requires a Tokio runtime.
    ///
    /// # Errors
    ///
    /// [`Error::NoRuntime`] outside a Tokio runtime. The spool is created by the task: its
    /// failure reaches clients as [`FillError::Local`].
    pub fn join<F, Fut>(&self, key: K, expected: Expected, run: F) -> crate::Result<Joined<H>>
    where
        F: FnOnce(Filling<H>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), FillError>> + Send + 'static,
    {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        let mut inflight = lock(&self.inflight);
        // A fill that has landed (or failed) is over, even if its task has not left the
        // table yet: a client that comes now asks anew (its answer may be due a revalidation,
        // or the cache holds the entry now).
        if let Some(state) = inflight.get(&key)
            && !matches!(*state.borrow(), State::Landed { .. } | State::Failed(_))
        {
            return Ok(Joined::new(state.subscribe(), false));
        }
        let state = Arc::new(watch::Sender::new(State::Connecting));
        let joined = Joined::new(state.subscribe(), true);
        inflight.insert(key.clone(), Arc::clone(&state));
        drop(inflight);
        let filling = Filling::new(self.store.clone(), expected, Arc::clone(&state), &self.options);
        let task: FillTask = match &self.shared {
            Some(shared) => Box::pin(shared.clone().fill((shared.key)(&key), filling, run)),
            None => Box::pin(run(filling)),
        };
        let landed = Landed { inflight: Arc::clone(&self.inflight), key, state };
        runtime.spawn(async move {
            let result = task.await;
            landed.end(result.err());
        });
        Ok(joined)
    }
}

impl<K, H> Fills<K, H>
where
    K: Eq + Hash + Clone + fmt::Display + Send + Sync + 'static,
    H: LeaseHead,
{
    /// As [`new`](Self::new), and on a shared database (PostgreSQL, where several instances
    /// use one database and one cache directory) one fill per key across every instance:
    /// the first to miss takes the key's lease and fills; the others follow its spool in the
    /// shared directory as it grows, verifying the bytes themselves (the last byte is held
    /// until they hash to the expected digest), instead of asking the upstream again. An owner
    /// that stops its heartbeat for [`FillOptions::lease_timeout`] is taken over. On SQLite,
    /// exactly [`new`](Self::new).
    ///
    /// Only fills joined with an expected digest are shared (a follower verifies against
    /// it); the others run per process. A key's text (its `Display`) must be the name of the
    /// entry its fill commits: a follower whose owner has finished opens that entry.
    #[must_use]
    pub fn shared(store: EntryStore, options: FillOptions) -> Self {
        let shared = store.database().is_shared().then(|| {
            let leases = Leases::new(
                store.database().clone(),
                store.namespace(),
                store.tmp_dir(),
                options.lease_timeout(),
            );
            Shared::new(leases, |key: &K| key.to_string())
        });
        Self { shared, ..Self::new(store, options) }
    }
}

/// Takes a fill out of the table when its task ends, however it ends (a panic included), and
/// fails the clients of a fill that ended unfinished, so the next client of its key starts a
/// new fill instead of joining a dead one.
struct Landed<K: Eq + Hash, H> {
    inflight: InFlight<K, H>,
    key: K,
    state: Arc<watch::Sender<State<H>>>,
}

impl<K: Eq + Hash, H> Landed<K, H> {
    fn end(self, error: Option<FillError>) {
        if let Some(error) = error {
            match &error {
                // The upstream does not have it: the client's answer, not a fault.
                FillError::Refused { .. } => tracing::debug!(%error, "fill refused; nothing cached"),
                _ => tracing::warn!(error = %ErrorChain(&error), "fill failed; nothing cached"),
            }
            self.state.send_if_modified(|state| match state {
                State::Connecting | State::Receiving { .. } => {
                    *state = State::Failed(error);
                    true
                }
                // The clients have their verified bytes; the failure (say, recording them)
                // only says they were not stored.
                State::Verified { source, written } => {
                    let landing = Landing { uncached: Some(error), ..Landing::default() };
                    *state = State::Landed {
                        source: Arc::clone(source),
                        written: *written,
                        landing: Arc::new(landing),
                    };
                    true
                }
                State::Landed { .. } | State::Failed(_) => false,
            });
        }
    }
}

impl<K: Eq + Hash, H> Drop for Landed<K, H> {
    fn drop(&mut self) {
        let mut inflight = lock(&self.inflight);
        if inflight.get(&self.key).is_some_and(|state| Arc::ptr_eq(state, &self.state)) {
            inflight.remove(&self.key);
        }
        drop(inflight);
        self.state.send_if_modified(|state| {
            let open = state.is_open();
            if open {
                *state = State::Failed(FillError::Ended);
            }
            open
        });
    }
}

/// An error and its sources, on one line.
struct ErrorChain<'a>(&'a (dyn std::error::Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}
