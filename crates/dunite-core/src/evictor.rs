//! The debounced evictor: one long-lived eviction task per cache.

use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use futures_util::FutureExt as _;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, MissedTickBehavior};

use crate::store::{EvictionPass, EvictionStore, Removal, Victim};
use crate::{Error, EvictionPolicy, Result, StoreOp};

/// Victims removed per `remove_batch` call at most (the time budget is checked between).
/// One call costs a fixed number of statements whatever its size (a mark and a delete), so on
/// a database far away a bigger chunk frees more per round trip.
const REMOVE_CHUNK: usize = 256;

/// Fresh selections a pass makes after one from which nothing could be removed (every
/// candidate changed, was touched, or refused deletion) before it reports
/// [`PassOutcome::NoProgress`]. Until a pass has removed an entry, only this bound (not the
/// time budget) ends it, so a pass over the cap never gives up on its first unlucky chunk.
const FRUITLESS_SELECTIONS: u32 = 3;

/// How many explicit pass requests may wait at once before `evict_now` callers queue on the
/// channel itself (they are all served by one pass anyway).
const EXPLICIT_QUEUE: usize = 16;

/// A handle to a cache's single eviction task.
///
/// [`spawn`](Self::spawn) starts the task; the handle is cheap to clone and every clone talks
/// to the same task. The task holds no sender of its own, so it ends when the last handle is
/// dropped (finishing the entry it is removing, never stopping halfway through one).
///
/// # Guarantees
///
/// - **At most one pass runs at any moment** for this evictor: background passes (pokes,
///   retries, the safety tick) and explicit ones ([`evict_now`](Self::evict_now)) all run on
///   the one task.
/// - **Coalescing**: pokes go through a capacity-1 channel; a poke that finds one already
///   queued is dropped, so any burst of stores costs at most one pending pass. A poke starts
///   its pass after a short debounce window
///   ([`EvictionPolicy::with_debounce`](crate::EvictionPolicy::with_debounce)), so stores that
///   finish a few milliseconds apart share one pass.
/// - **Convergence**: a poke is dropped only while another is queued, and that queued poke is
///   consumed (taken off the channel) *before* the pass reads the total. A store that commits
///   and then pokes is therefore always seen by a pass that starts after its commit.
/// - **Resilience**: a failing store call is logged with `tracing`, counted, and retried with
///   bounded exponential backoff; a panicking store is caught. The task only ends when the
///   last handle drops or the runtime shuts down.
///
/// # Example
///
/// ```
/// use dunite_core::{DebouncedEvictor, EvictionPolicy, MemoryStore};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), dunite_core::Error> {
/// let store = MemoryStore::new();
/// let evictor = DebouncedEvictor::spawn(store.clone(), EvictionPolicy::new(1_000))?;
/// store.insert("a", 800);
/// store.insert("b", 800);
/// evictor.poke();
/// evictor.evict_now().await?;
/// assert_eq!(store.total_bytes(), 800);
/// assert!(!store.contains("a"));
/// # Ok(())
/// # }
/// ```
pub struct DebouncedEvictor<S: EvictionStore> {
    shared: Arc<Shared<S>>,
    pokes: mpsc::Sender<()>,
    requests: mpsc::Sender<oneshot::Sender<Result<PassReport>>>,
}

impl<S: EvictionStore> Clone for DebouncedEvictor<S> {
    fn clone(&self) -> Self {
        Self { shared: Arc::clone(&self.shared), pokes: self.pokes.clone(), requests: self.requests.clone() }
    }
}

impl<S: EvictionStore> fmt::Debug for DebouncedEvictor<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DebouncedEvictor")
            .field("policy", &self.shared.policy)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// Counters of an evictor since it was spawned; see [`DebouncedEvictor::stats`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct EvictorStats {
    /// Calls to [`DebouncedEvictor::poke`].
    pub pokes: u64,
    /// Pokes dropped because one was already pending.
    pub pokes_coalesced: u64,
    /// Passes run (background and explicit).
    pub passes: u64,
    /// Entries removed by passes.
    pub entries_evicted: u64,
    /// Bytes removed by passes.
    pub bytes_evicted: u64,
    /// Passes that failed (store errors or panics).
    pub errors: u64,
    /// Passes not run because another process sharing the store was evicting it
    /// ([`PassOutcome::Elsewhere`]); not counted in `passes`.
    pub passes_elsewhere: u64,
    /// Passes that removed at least one entry.
    pub passes_removing: u64,
    /// Passes that read a total over the cap and ended without removing anything (every
    /// candidate pinned, changing, or refusing deletion); a pass that failed with an error is
    /// counted in `errors` instead. A healthy cache keeps this at 0: the time budget stops a
    /// pass only after it has removed an entry, and a selection whose candidates all changed
    /// meanwhile is followed by fresh ones. Only candidates that refuse deletion (the volume
    /// refuses unlinks) or are all pinned stall a pass.
    pub passes_stalled: u64,
    /// The most recent pass that ran to an outcome.
    pub last_pass: Option<PassReport>,
}

/// What one eviction pass did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PassReport {
    /// How the pass ended.
    pub outcome: PassOutcome,
    /// The accounted total the pass read when it started.
    pub total_before: u64,
    /// The total by the pass's own accounting when it ended (stores that committed during
    /// the pass are not included; their pokes schedule the next pass).
    pub total_after: u64,
    /// Entries removed.
    pub entries_evicted: u64,
    /// Bytes removed.
    pub bytes_evicted: u64,
    /// Selected entries left alone because they changed or were pinned after selection.
    pub entries_skipped: u64,
    /// Wall time of the pass.
    pub duration: Duration,
}

/// How a pass ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PassOutcome {
    /// The total was at or under the cap; nothing to do.
    UnderCap,
    /// The pass evicted down to the low watermark.
    Evicted,
    /// The pass used its time budget; a fresh pass continues at once.
    TimeBudgetSpent,
    /// No removable entry was left (all pinned, being written, or changing); the pass is
    /// retried with backoff.
    NoProgress,
    /// The last handle was dropped; the pass stopped at a batch boundary.
    ShutDown,
    /// Another process sharing the store holds its eviction lock, so this pass did not run
    /// (and read no total: the report's totals are zero). The evictor tries again after the
    /// policy's initial retry delay, so a store that committed after the other process's
    /// pass read its total is still seen by a later pass.
    Elsewhere,
}

impl<S: EvictionStore> DebouncedEvictor<S> {
    /// Spawn the eviction task for `store` on the current Tokio runtime.
    ///
    /// Call it once per cache and share the handle (it is `Clone`).
    ///
    /// # Errors
    ///
    /// [`Error::NoRuntime`] when called outside a Tokio runtime, [`Error::InvalidPolicy`] when
    /// the policy is inconsistent.
    pub fn spawn(store: S, policy: EvictionPolicy) -> Result<Self> {
        policy.validate()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        let (pokes, poke_rx) = mpsc::channel(1);
        let (requests, request_rx) = mpsc::channel(EXPLICIT_QUEUE);
        let shared =
            Arc::new(Shared { store, policy, stats: StatsCell::default(), observers: Observers::default() });
        runtime.spawn(run(Arc::clone(&shared), poke_rx, request_rx));
        Ok(Self { shared, pokes, requests })
    }

    /// Ask for a pass; never blocks and never fails.
    ///
    /// # Contract
    ///
    /// Call `poke` **after** the store's metadata commit is visible to other connections.
    /// The pending poke is taken before a pass reads the total, so a poke made after the
    /// commit guarantees a pass that sees it. If the task is gone (the runtime is shutting
    /// down) the poke is ignored: the caller's store must not fail because of eviction.
    pub fn poke(&self) {
        self.shared.stats.poke(&self.pokes);
    }

    /// Run a pass now on the eviction task and wait for its report.
    ///
    /// If a pass is already running, this waits for it to finish and then runs one more, so
    /// the returned report always comes from a pass that started after this call. Concurrent
    /// callers may share one pass.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropping the future abandons only the wait. The pass, once requested,
    /// still runs to completion on the task.
    ///
    /// # Errors
    ///
    /// The store's error wrapped in [`Error::Store`] (the task then also retries in the
    /// background), [`Error::Panicked`] if the store panicked, [`Error::Stopped`] if the task
    /// is gone.
    pub async fn evict_now(&self) -> Result<PassReport> {
        let (tx, rx) = oneshot::channel();
        self.requests.send(tx).await.map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)?
    }

    /// A poke that does not keep the task alive (for a store that outlives its evictor's
    /// handles, or is held by the task itself): a no-op once the last handle is dropped.
    pub(crate) fn weak_poke(&self) -> impl Fn() + Send + Sync + 'static {
        let shared = Arc::downgrade(&self.shared);
        let pokes = self.pokes.downgrade();
        move || {
            if let (Some(shared), Some(pokes)) = (shared.upgrade(), pokes.upgrade()) {
                shared.stats.poke(&pokes);
            }
        }
    }

    /// Call `observer` with each entry a pass of this evictor removes, once its removal has
    /// committed (its row and payload are gone, its bytes off the accounted total).
    /// Observers are kept for the evictor's life and called in the order they were added.
    ///
    /// What is reported is this evictor's passes only: entries another process sharing the
    /// store evicts, and removals outside a pass (`EntryCache::remove`), are not.
    ///
    /// The observer runs on the eviction task, between removals, while the pass holds its
    /// connection (and, on a shared store, the eviction lock): it must be quick, and must
    /// neither block nor panic. A panic ends the pass as a failed one (counted in
    /// [`EvictorStats::errors`]); the removals before it stay done and accounted. The
    /// evictor keeps no record of its own: an observer that remembers keys bounds its memory
    /// itself.
    ///
    /// # Example
    ///
    /// ```
    /// use std::sync::{Arc, Mutex};
    /// use dunite_core::{DebouncedEvictor, EvictionPolicy, MemoryStore};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), dunite_core::Error> {
    /// let store = MemoryStore::new();
    /// let evictor = DebouncedEvictor::spawn(store.clone(), EvictionPolicy::new(1_000))?;
    /// let evicted = Arc::new(Mutex::new(Vec::new()));
    /// let record = Arc::clone(&evicted);
    /// evictor.on_evicted(move |victim| record.lock().unwrap().push(victim.key.clone()));
    /// store.insert("a", 800);
    /// store.insert("b", 800);
    /// evictor.evict_now().await?;
    /// assert_eq!(*evicted.lock().unwrap(), ["a"]);
    /// # Ok(())
    /// # }
    /// ```
    pub fn on_evicted(&self, observer: impl Fn(&Victim) + Send + Sync + 'static) {
        self.shared.observers.write().unwrap_or_else(PoisonError::into_inner).push(Box::new(observer));
    }

    /// A snapshot of the evictor's counters.
    #[must_use]
    pub fn stats(&self) -> EvictorStats {
        self.shared.stats.snapshot()
    }

    /// The policy the evictor runs with.
    #[must_use]
    pub fn policy(&self) -> &EvictionPolicy {
        &self.shared.policy
    }

    /// The store the evictor passes over.
    #[must_use]
    pub fn store(&self) -> &S {
        &self.shared.store
    }
}

struct Shared<S> {
    store: S,
    policy: EvictionPolicy,
    stats: StatsCell,
    observers: Observers,
}

/// What [`DebouncedEvictor::on_evicted`] registered.
type Observers = RwLock<Vec<Box<dyn Fn(&Victim) + Send + Sync>>>;

#[derive(Default)]
struct StatsCell {
    pokes: AtomicU64,
    pokes_coalesced: AtomicU64,
    passes: AtomicU64,
    entries_evicted: AtomicU64,
    bytes_evicted: AtomicU64,
    errors: AtomicU64,
    passes_elsewhere: AtomicU64,
    passes_removing: AtomicU64,
    passes_stalled: AtomicU64,
    last_pass: Mutex<Option<PassReport>>,
}

impl StatsCell {
    /// Send a poke on `pokes`, counting it (and whether it was coalesced).
    fn poke(&self, pokes: &mpsc::Sender<()>) {
        self.pokes.fetch_add(1, Ordering::Relaxed);
        match pokes.try_send(()) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(())) => {
                self.pokes_coalesced.fetch_add(1, Ordering::Relaxed);
            }
            Err(mpsc::error::TrySendError::Closed(())) => {
                tracing::debug!("evictor task gone; poke ignored");
            }
        }
    }

    fn snapshot(&self) -> EvictorStats {
        EvictorStats {
            pokes: self.pokes.load(Ordering::Relaxed),
            pokes_coalesced: self.pokes_coalesced.load(Ordering::Relaxed),
            passes: self.passes.load(Ordering::Relaxed),
            entries_evicted: self.entries_evicted.load(Ordering::Relaxed),
            bytes_evicted: self.bytes_evicted.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            passes_elsewhere: self.passes_elsewhere.load(Ordering::Relaxed),
            passes_removing: self.passes_removing.load(Ordering::Relaxed),
            passes_stalled: self.passes_stalled.load(Ordering::Relaxed),
            last_pass: self.last_pass.lock().unwrap_or_else(PoisonError::into_inner).clone(),
        }
    }

    fn record(&self, result: &Result<PassReport>, max_bytes: u64) {
        if let Ok(PassReport { outcome: PassOutcome::Elsewhere, .. }) = result {
            self.passes_elsewhere.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.passes.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(report) => {
                if report.entries_evicted > 0 {
                    self.passes_removing.fetch_add(1, Ordering::Relaxed);
                } else if report.total_before > max_bytes {
                    self.passes_stalled.fetch_add(1, Ordering::Relaxed);
                }
                self.entries_evicted.fetch_add(report.entries_evicted, Ordering::Relaxed);
                self.bytes_evicted.fetch_add(report.bytes_evicted, Ordering::Relaxed);
                *self.last_pass.lock().unwrap_or_else(PoisonError::into_inner) = Some(report.clone());
            }
            Err(_) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Why the task woke up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    Poke,
    Explicit,
    Retry,
    Continue,
    Tick,
}

/// What the task does after a pass.
enum Next {
    Idle,
    ContinueNow,
    RetrySoon,
    RetryAfterBackoff,
}

async fn run<S: EvictionStore>(
    shared: Arc<Shared<S>>,
    mut pokes: mpsc::Receiver<()>,
    mut requests: mpsc::Receiver<oneshot::Sender<Result<PassReport>>>,
) {
    let policy = &shared.policy;
    let mut tick = policy.safety_tick().map(|period| {
        let mut interval = tokio::time::interval_at(Instant::now() + period, period);
        interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
        interval
    });
    let mut retry: Option<(Instant, u32)> = None;
    let mut continue_now = false;
    loop {
        let mut waiters = Vec::new();
        let trigger = if continue_now {
            if pokes.is_closed() {
                break;
            }
            Trigger::Continue
        } else {
            let retry_at = retry.map(|(at, _)| at);
            tokio::select! {
                biased;
                request = requests.recv() => match request {
                    Some(waiter) => {
                        waiters.push(waiter);
                        Trigger::Explicit
                    }
                    None => break,
                },
                poke = pokes.recv() => match poke {
                    // While backing off, a poke does not cut the backoff short: the retry
                    // pass will see this store's commit anyway.
                    Some(()) if retry.is_some() => continue,
                    Some(()) => Trigger::Poke,
                    None => break,
                },
                () = sleep_until_opt(retry_at), if retry_at.is_some() => Trigger::Retry,
                _ = tick_opt(tick.as_mut()), if tick.is_some() && retry.is_none() => Trigger::Tick,
            }
        };
        if trigger == Trigger::Poke && !policy.debounce().is_zero() {
            // Let the rest of a burst land before the pass; an explicit request cuts it short.
            tokio::select! {
                biased;
                Some(waiter) = requests.recv() => waiters.push(waiter),
                () = tokio::time::sleep(policy.debounce()) => {}
            }
        }
        // Everything asked for before the pass reads the total is served by it: take the
        // pending poke and every queued explicit request now.
        if pokes.try_recv().is_ok() {
            tracing::trace!("pending poke folded into this pass");
        }
        while let Ok(waiter) = requests.try_recv() {
            waiters.push(waiter);
        }

        tracing::debug!(?trigger, "eviction pass starting");
        let result =
            AssertUnwindSafe(run_pass(&shared, &pokes)).catch_unwind().await.unwrap_or(Err(Error::Panicked));
        shared.stats.record(&result, policy.max_bytes());

        let next = match &result {
            Ok(report) => {
                tracing::debug!(?report, "eviction pass finished");
                match report.outcome {
                    PassOutcome::UnderCap | PassOutcome::Evicted => Next::Idle,
                    PassOutcome::TimeBudgetSpent => Next::ContinueNow,
                    PassOutcome::NoProgress => {
                        tracing::warn!(
                            total = report.total_after,
                            max_bytes = policy.max_bytes(),
                            "eviction pass found nothing removable while over the cap (what is left is pinned or in use); retrying later"
                        );
                        Next::RetryAfterBackoff
                    }
                    PassOutcome::Elsewhere => {
                        tracing::debug!("another instance is evicting this cache; trying again shortly");
                        Next::RetrySoon
                    }
                    PassOutcome::ShutDown => break,
                }
            }
            Err(error) => {
                tracing::warn!(%error, source = ?std::error::Error::source(error), "eviction pass failed; retrying later");
                Next::RetryAfterBackoff
            }
        };
        continue_now = matches!(next, Next::ContinueNow);
        retry = match next {
            Next::Idle | Next::ContinueNow => None,
            // Not a failure: no backoff growth, just the shortest delay.
            Next::RetrySoon => Some((Instant::now() + policy.retry_delay(0), 0)),
            Next::RetryAfterBackoff => {
                let attempt = retry.map_or(0, |(_, attempt)| attempt.saturating_add(1));
                Some((Instant::now() + policy.retry_delay(attempt), attempt))
            }
        };
        for waiter in waiters {
            // A caller that stopped waiting is fine: the pass ran regardless.
            let _ = waiter.send(result.clone());
        }
    }
    tracing::debug!("last evictor handle dropped; eviction task ends");
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn tick_opt(tick: Option<&mut tokio::time::Interval>) {
    match tick {
        Some(tick) => {
            tick.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// One pass: read the total once, then remove least-recently-used entries in batches until
/// the total is at the low watermark, the time budget is spent, or the handles are gone.
///
/// The time budget bounds removal, not waiting: its clock starts once the pass holds its
/// connection and has read a total over the cap, and it is checked only once the pass has
/// removed an entry. However slow the database or long the pool queue, a pass over the cap
/// removes something, unless [`FRUITLESS_SELECTIONS`] fresh selections in a row (or the last
/// candidate) could not be removed.
async fn run_pass<S: EvictionStore>(shared: &Shared<S>, pokes: &mpsc::Receiver<()>) -> Result<PassReport> {
    let policy = &shared.policy;
    let started = Instant::now();
    let mut report = PassReport {
        outcome: PassOutcome::UnderCap,
        total_before: 0,
        total_after: 0,
        entries_evicted: 0,
        bytes_evicted: 0,
        entries_skipped: 0,
        duration: Duration::ZERO,
    };
    let begun = shared.store.begin_pass().await.map_err(|e| Error::store(StoreOp::BeginPass, None, e))?;
    let Some(mut pass) = begun else {
        report.outcome = PassOutcome::Elsewhere;
        report.duration = started.elapsed();
        return Ok(report);
    };
    let driven = drive_pass(&mut pass, policy, (pokes, &shared.observers), &mut report).await;
    // Finish even a failed pass: it releases what the pass took (a shared store's lock).
    let finished = pass.finish().await.map_err(|e| Error::store(StoreOp::FinishPass, None, e));
    driven?;
    finished?;
    report.duration = started.elapsed();
    Ok(report)
}

/// Where a pass learns that its handles are gone, and whom it tells what it removed.
type Listeners<'a> = (&'a mpsc::Receiver<()>, &'a Observers);

async fn drive_pass<P: EvictionPass>(
    pass: &mut P,
    policy: &EvictionPolicy,
    listeners: Listeners<'_>,
    report: &mut PassReport,
) -> Result<()> {
    let total_before =
        pass.total_size_bytes().await.map_err(|e| Error::store(StoreOp::TotalSize, None, e))?;
    report.total_before = total_before;
    report.total_after = total_before;
    if total_before > policy.max_bytes() {
        report.outcome = evict_to_watermark(pass, policy, listeners, report).await?;
    }
    Ok(())
}

async fn evict_to_watermark<P: EvictionPass>(
    pass: &mut P,
    policy: &EvictionPolicy,
    (pokes, observers): Listeners<'_>,
    report: &mut PassReport,
) -> Result<PassOutcome> {
    let target = policy.low_watermark();
    // The budget's clock starts here, holding the connection over the cap. It stops a pass
    // only once the pass has removed an entry: until then, a pass ends when its selections
    // keep coming back unremovable (`FRUITLESS_SELECTIONS`) or run out.
    let started = Instant::now();
    let mut fruitless = 0u32;
    while report.total_after > target {
        let victims = pass
            .least_recently_used(policy.batch_size())
            .await
            .map_err(|e| Error::store(StoreOp::SelectVictims, None, e))?;
        if victims.is_empty() {
            return Ok(PassOutcome::NoProgress);
        }
        let mut removed_in_batch = 0u64;
        let mut rest = &victims[..];
        while !rest.is_empty() {
            // Batch boundaries are entry boundaries, and the only places a pass stops early.
            if pokes.is_closed() {
                return Ok(PassOutcome::ShutDown);
            }
            if report.entries_evicted > 0 && started.elapsed() >= policy.pass_time_budget() {
                return Ok(PassOutcome::TimeBudgetSpent);
            }
            // Just the victims needed to reach the target (if none is skipped), at most a
            // chunk at a time so the time budget is checked often.
            let mut needed = 0;
            let mut freed = 0u64;
            for victim in rest.iter().take(REMOVE_CHUNK) {
                needed += 1;
                freed = freed.saturating_add(victim.bytes);
                if report.total_after.saturating_sub(freed) <= target {
                    break;
                }
            }
            let (chunk, tail) = rest.split_at(needed);
            rest = tail;
            let removals = pass.remove_batch(chunk).await.map_err(|e| {
                let key = (chunk.len() == 1).then(|| pass.show_key(&chunk[0].key));
                Error::store(StoreOp::Remove, key.as_deref(), e)
            })?;
            for (victim, removal) in chunk.iter().zip(removals) {
                match removal {
                    Removal::Removed { bytes } => {
                        removed_in_batch += 1;
                        report.entries_evicted += 1;
                        report.bytes_evicted += bytes;
                        report.total_after = report.total_after.saturating_sub(bytes);
                        for observe in observers.read().unwrap_or_else(PoisonError::into_inner).iter() {
                            observe(victim);
                        }
                    }
                    Removal::Skipped => report.entries_skipped += 1,
                }
            }
            if report.total_after <= target {
                return Ok(PassOutcome::Evicted);
            }
        }
        if removed_in_batch == 0 {
            // Every candidate changed under us or refused deletion. A fresh selection skips
            // the refusals (they stay marked) and sees the new versions, but never spin on
            // one connection.
            fruitless += 1;
            if fruitless > FRUITLESS_SELECTIONS {
                return Ok(PassOutcome::NoProgress);
            }
        }
    }
    Ok(PassOutcome::Evicted)
}
