//! The convergence property, under random sizes, caps, watermarks, concurrency,
//! interleavings and injected transient store errors.

use std::sync::atomic::Ordering;
use std::time::Duration;

use dunite_core::{DebouncedEvictor, EvictionPolicy, PassOutcome};
use proptest::prelude::*;

use crate::lifecycle::eventually;
use crate::support::{TestStore, check_removal_log};

#[derive(Debug, Clone)]
enum Op {
    Store {
        key: u8,
        bytes: u64,
    },
    Touch {
        key: u8,
    },
    /// The next `calls` store calls fail (a database blip).
    Outage {
        calls: u32,
    },
    /// Let other tasks run for a while.
    Pause {
        micros: u64,
    },
}

fn op(max_entry: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..24, 1..=max_entry).prop_map(|(key, bytes)| Op::Store { key, bytes }),
        2 => (0u8..24).prop_map(|key| Op::Touch { key }),
        1 => (1u32..6).prop_map(|calls| Op::Outage { calls }),
        2 => (0u64..3_000).prop_map(|micros| Op::Pause { micros }),
    ]
}

#[derive(Debug, Clone)]
struct Scenario {
    cap: u64,
    watermark_percent: u64,
    batch_size: usize,
    latency_micros: u64,
    tasks: Vec<Vec<Op>>,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (50u64..2_000, 0u64..=100, 1usize..8, 0u64..500).prop_flat_map(
        |(cap, watermark_percent, batch_size, latency_micros)| {
            prop::collection::vec(prop::collection::vec(op(cap), 0..40), 1..6)
                .prop_map(move |tasks| Scenario { cap, watermark_percent, batch_size, latency_micros, tasks })
        },
    )
}

async fn run(scenario: Scenario) -> Result<(), String> {
    let store = TestStore::new(Duration::from_micros(scenario.latency_micros), 4, Duration::from_secs(3600));
    let watermark = scenario.cap * scenario.watermark_percent / 100;
    let policy = EvictionPolicy::new(scenario.cap)
        .with_low_watermark(watermark)
        .with_batch_size(scenario.batch_size)
        .without_safety_tick()
        .with_retry_backoff(Duration::from_millis(5), Duration::from_millis(200));
    let evictor = DebouncedEvictor::spawn(store.clone(), policy).map_err(|e| e.to_string())?;

    let mut tasks = tokio::task::JoinSet::new();
    for (t, ops) in scenario.tasks.into_iter().enumerate() {
        let (store, evictor) = (store.clone(), evictor.clone());
        tasks.spawn(async move {
            let mut stored = Vec::new();
            for op in ops {
                match op {
                    Op::Store { key, bytes } => {
                        let key = format!("k{key}");
                        let version = store.store(&key, bytes).await.expect("pool is large enough");
                        stored.push((key, version));
                        evictor.poke();
                    }
                    Op::Touch { key } => {
                        store.inner.touch(&format!("k{key}"));
                    }
                    Op::Outage { calls } => {
                        store.counters().faults_left.fetch_add(calls, Ordering::SeqCst);
                    }
                    Op::Pause { micros } => tokio::time::sleep(Duration::from_micros(micros)).await,
                }
                if t % 2 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            stored
        });
    }
    let mut stored = Vec::new();
    while let Some(done) = tasks.join_next().await {
        stored.extend(done.map_err(|e| e.to_string())?);
    }

    // Stores have stopped; the store recovers. The evictor must converge by itself.
    store.counters().faults_left.store(0, Ordering::SeqCst);
    eventually(Duration::from_secs(600), || store.inner.total_bytes() <= scenario.cap).await;
    check_removal_log(&store, &stored)?;

    // A quiet store that goes over the cap is brought down to the watermark. First quiesce:
    // wait out any pass in flight, so the next one is the probe's.
    evictor.evict_now().await.map_err(|e| e.to_string())?;
    let probe_bytes = scenario.cap - store.inner.total_bytes() + 1;
    if probe_bytes <= scenario.cap {
        let passes_before = evictor.stats().passes;
        store.store("probe", probe_bytes).await.map_err(|e| e.to_string())?;
        evictor.poke();
        // The pass counter moves when a pass has ended, so its report is complete.
        eventually(Duration::from_secs(600), || evictor.stats().passes > passes_before).await;
        if store.inner.total_bytes() > watermark {
            return Err(format!(
                "quiet pass left {} over the watermark {watermark}: {:?}, lru {:?}",
                store.inner.total_bytes(),
                evictor.stats(),
                store.inner.keys_lru_first()
            ));
        }
        let last = evictor.stats().last_pass.ok_or("a pass must have run")?;
        if last.outcome != PassOutcome::Evicted || last.total_after != store.inner.total_bytes() {
            return Err(format!("last pass {last:?} disagrees with the store"));
        }
    }
    check_removal_log(&store, &stored)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: dunite_testkit::proptest_cases(64), ..ProptestConfig::default() })]

    #[test]
    fn evictor_converges_under_random_bursts_and_faults(scenario in scenario()) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
        let result = runtime.block_on(run(scenario));
        prop_assert!(result.is_ok(), "{}", result.unwrap_err());
    }
}
