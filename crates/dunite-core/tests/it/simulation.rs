//! The simulation suite of issue 16: random bursts of stores through an [`EntryCache`] on a
//! pool of two, with statement latencies from 0 to 200 ms, cancelled stores, COMMITs whose
//! answer is lost, COMMITs lost on the way, and payload deletions that fail; on SQLite and on
//! PostgreSQL. After the faults stop and the cache goes quiet:
//!
//! - the accounted total is at most the cap;
//! - the accounted total equals the sum of the live rows, and the bytes of the payload files on
//!   disk (no orphan file, no temporary file, no row left marked);
//! - no eviction pass read a total over the cap and removed nothing, but for passes whose
//!   candidates refused deletion (at most one such pass per refused unlink).
//!
//! Real time, real databases and real files: the simulated latency is a real wait per
//! statement, so the work per case is bounded by its latency (fewer stores at 200 ms than at
//! 0 ms). `DUNITE_SIM_CASES` sets the cases per backend (default 6; run it at 100 or more after
//! touching the store or the evictor).

use std::time::Duration;

use dunite_core::{CacheOptions, DatabaseOptions, EntryCache, EvictionPolicy, Expected, OnConflict};
use dunite_testkit::{TestBackend, check_consistency, test_database};
use proptest::prelude::*;

/// What may go wrong around one store.
#[derive(Debug, Clone, Copy)]
enum Fault {
    None,
    /// The next store's COMMIT applies but its answer is lost.
    LoseAnswer,
    /// The next store's COMMIT is lost on the way (rolled back, reported like a lost answer).
    LoseCommit,
    /// The next `n` payload deletions fail (removals, replaced and duplicate payloads alike).
    FailUnlinks(u32),
    /// The caller stops waiting for this store after this many milliseconds.
    Cancel(u64),
}

#[derive(Debug, Clone)]
struct Store {
    key: u8,
    size: usize,
    fault: Fault,
}

#[derive(Debug, Clone)]
struct Case {
    latency_ms: u64,
    on_conflict: OnConflict,
    cap: u64,
    /// Stores run all at once within a burst; bursts one after another.
    bursts: Vec<Vec<Store>>,
}

fn fault() -> impl Strategy<Value = Fault> {
    prop_oneof![
        6 => Just(Fault::None),
        1 => Just(Fault::LoseAnswer),
        1 => Just(Fault::LoseCommit),
        1 => (1u32..4).prop_map(Fault::FailUnlinks),
        2 => (0u64..400).prop_map(Fault::Cancel),
    ]
}

fn store() -> impl Strategy<Value = Store> {
    (0u8..10, 100usize..2_000, fault()).prop_map(|(key, size, fault)| Store { key, size, fault })
}

fn case() -> impl Strategy<Value = Case> {
    let latency = prop_oneof![0u64..=2, 20u64..=200];
    let on_conflict = prop_oneof![Just(OnConflict::KeepExisting), Just(OnConflict::Replace)];
    (latency, on_conflict, 1_500u64..6_000).prop_flat_map(|(latency_ms, on_conflict, cap)| {
        // About two seconds of round trips a case, whatever the latency.
        let per_burst = usize::try_from((400 / latency_ms.max(1)).clamp(2, 12)).unwrap_or(12);
        prop::collection::vec(prop::collection::vec(store(), 1..=per_burst), 1..=2)
            .prop_map(move |bursts| Case { latency_ms, on_conflict, cap, bursts })
    })
}

/// How long a quiet cache may take to settle: unseen commits are asked about after a second,
/// and a pass at 200 ms a statement takes a few seconds.
const QUIESCENCE: Duration = Duration::from_secs(60);

async fn run(backend: TestBackend, case: Case) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let options = DatabaseOptions::new()
        .with_max_connections(2)
        .with_acquire_timeout(Duration::from_secs(30))
        .with_simulated_latency(Duration::from_millis(case.latency_ms));
    let Some(db) = test_database(backend, dir.path(), &options).await else { return Ok(()) };
    let policy = EvictionPolicy::new(case.cap).without_safety_tick();
    let cache = EntryCache::open(
        CacheOptions::new(dir.path(), "sim", policy)
            .with_database(db.database().clone())
            .with_on_conflict(case.on_conflict)
            .with_access_flush_period(Duration::from_millis(100)),
    )
    .await
    .unwrap();
    let faults = cache.entries().faults();
    for burst in &case.bursts {
        let mut tasks = tokio::task::JoinSet::new();
        for store in burst {
            match store.fault {
                Fault::None | Fault::Cancel(_) => {}
                Fault::LoseAnswer => faults.lose_commit_answers(1),
                Fault::LoseCommit => faults.lose_commits(1),
                Fault::FailUnlinks(n) => faults.fail_unlinks(n),
            }
            let (cache, store) = (cache.clone(), store.clone());
            tasks.spawn(async move {
                let (key, expected) = (format!("k{}", store.key), Expected::new());
                let bytes = vec![store.key ^ (store.size as u8); store.size];
                let storing = cache.store(&key, &bytes[..], &expected, "");
                match store.fault {
                    Fault::Cancel(ms) => {
                        let _ = tokio::time::timeout(Duration::from_millis(ms), storing).await;
                    }
                    // A store may fail when a fault (its own or one armed for another store of
                    // the burst) hits it: what the invariants say is that nothing is lost.
                    _ => {
                        let _ = storing.await;
                    }
                }
            });
        }
        tasks.join_all().await;
    }
    faults.clear();

    // Quiescence: cancelled stores finish their commits on their own, unseen commits settle,
    // and passes bring the total under the cap.
    let give_up = tokio::time::Instant::now() + QUIESCENCE;
    let mut last = String::new();
    loop {
        let passed = cache.evictor().evict_now().await.map(|report| report.total_after);
        let total = cache.total_bytes().await.unwrap_or(u64::MAX);
        let unsettled = cache.entries().stats().unsettled;
        let consistent = check_consistency(cache.entries(), dir.path()).await;
        if total <= case.cap && unsettled == 0 && consistent.is_ok() {
            break;
        }
        last = format!(
            "total {total} (cap {}), unsettled {unsettled}, pass {passed:?}, {consistent:?}",
            case.cap
        );
        prop_assert!(tokio::time::Instant::now() < give_up, "never quiet: {last}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(last);
    // A pass stalls only on candidates that refused deletion: each stalled pass met at least
    // one refused unlink (in its removals, or finishing the marked rows of an earlier one).
    let stats = cache.stats().evictor;
    let refused = faults.unlinks_refused();
    prop_assert!(
        stats.passes_stalled <= refused,
        "{} passes over the cap removed nothing, {refused} unlinks refused: {stats:?}",
        stats.passes_stalled
    );
    Ok(())
}

/// Run the suite on `backend`. Through a `TestRunner` of its own, not the `proptest!` macro,
/// whose runner lets `PROPTEST_CASES` (256 under `cargo xtask ci`) override the count: 256
/// cases of real time would be ten minutes.
fn simulate(backend: TestBackend) {
    let cases = std::env::var("DUNITE_SIM_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(6);
    // Shrinking reruns whole cases of real time: a few steps, so a failure reports in minutes.
    let config =
        ProptestConfig { cases, failure_persistence: None, max_shrink_iters: 8, ..ProptestConfig::default() };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    if let Err(failure) = runner.run(&case(), |case| dunite_testkit::block_on(run(backend, case))) {
        panic!("{failure}");
    }
}

#[test]
fn the_cap_and_the_accounting_hold_on_sqlite() {
    simulate(TestBackend::Sqlite);
}

#[test]
fn the_cap_and_the_accounting_hold_on_postgres() {
    simulate(TestBackend::Postgres);
}
