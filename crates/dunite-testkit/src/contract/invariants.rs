//! Random store/read/remove/evict sequences keep the cache's invariants (a proptest).

use dunite_core::{DatabaseOptions, EvictionPolicy};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use super::{ContractCache, Item, open};
use crate::{TestBackend, block_on};

/// One step of a random sequence.
#[derive(Debug, Clone)]
enum Op {
    /// Store an item (for a cache keyed by name, a new version replaces the slot's content).
    Put(Item),
    /// Read back one of the keys stored so far.
    Read { pick: usize },
    /// Remove one of the keys stored so far.
    Remove { pick: usize },
    /// An explicit eviction pass.
    Evict,
}

/// Twelve slots of three versions each, up to 6,000 bytes, verified or not.
fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0u64..12, 0u64..3, 0usize..6_000, any::<bool>())
            .prop_map(|(slot, version, size, verified)| Op::Put(Item { slot, version, size, verified })),
        3 => any::<usize>().prop_map(|pick| Op::Read { pick }),
        1 => any::<usize>().prop_map(|pick| Op::Remove { pick }),
        1 => Just(Op::Evict),
    ]
}

/// Random sequences of up to 40 stores, reads, removals and passes on a cache capped at
/// 1,000 to 30,000 bytes (low watermark half the cap), its entries fresh or stale at once, on
/// `backend` with a pool of two: a store succeeds unless over the cap (then a `TooLarge`) and
/// serves the bytes stored (unless the cache may keep a fresh entry's older content, see
/// [`ContractCache::serves_what_was_put`]); a read of any key stored is intact; after a final
/// pass rows, total and files agree, the total is under the cap and every entry left reads
/// back intact.
///
/// An empty sequence at the smallest cap first (a past failure), then `cases` random cases:
/// a cache kind passes [`proptest_cases(32)`](crate::proptest_cases) (`PROPTEST_CASES`, which
/// `cargo xtask ci` sets to 256, else 32), as its own proptest did. On PostgreSQL each case has
/// a fresh database; skips when no test server is configured. Call it from a plain `#[test]`:
/// each case runs on a runtime of its own.
///
/// # Panics
///
/// With the minimal failing sequence, when the contract is broken.
pub fn random_sequences_keep_the_invariants<C: ContractCache>(backend: TestBackend, cases: u32) {
    if backend == TestBackend::Postgres && crate::pg::server_url().is_none() {
        return; // No test server, and none required.
    }
    let config = Config {
        cases,
        // Cases are plain values: print the minimal one, there is no source file to save it by.
        failure_persistence: None,
        ..Config::default()
    };
    // Once a past failure (an empty sequence at the smallest cap, from the blob cache's
    // proptest): always run first.
    if let Err(failure) = block_on(run::<C>(backend, 1_000, false, Vec::new())) {
        panic!("an empty sequence at the smallest cap: {failure}");
    }
    let strategy = (1_000u64..30_000, any::<bool>(), prop::collection::vec(op(), 0..40));
    let result = TestRunner::new(config).run(&strategy, |(cap, stale, ops)| {
        block_on(run::<C>(backend, cap, stale, ops)).map_err(TestCaseError::fail)
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
}

/// One case.
async fn run<C: ContractCache>(
    backend: TestBackend,
    cap: u64,
    stale: bool,
    ops: Vec<Op>,
) -> Result<(), String> {
    let policy = EvictionPolicy::new(cap).with_low_watermark(cap / 2).without_safety_tick();
    let options = DatabaseOptions::new().with_max_connections(2);
    let Some(opened) = open::<C>(backend, &options, policy, stale).await else { return Ok(()) };
    let cache = &opened.cache;
    let mut seen = Vec::new();
    for op in ops {
        match op {
            Op::Put(item) => match cache.put(&item).await {
                Ok(put) => {
                    if cache.serves_what_was_put(&item) && put.sha256 != item.sha256() {
                        return Err(format!("{:?} serves {}, {item:?} was stored", put.key, put.sha256));
                    }
                    seen.push(put.key);
                }
                Err(e) if item.size as u64 > cap => {
                    if !matches!(C::as_core(&e), Some(dunite_core::Error::TooLarge { .. })) {
                        return Err(format!("expected TooLarge, got {e}"));
                    }
                }
                Err(e) => return Err(format!("{item:?}: {e}")),
            },
            Op::Read { pick } if !seen.is_empty() => {
                opened.read_verified(&seen[pick % seen.len()]).await;
            }
            Op::Remove { pick } if !seen.is_empty() => {
                cache.remove(&seen[pick % seen.len()]).await.map_err(|e| e.to_string())?;
            }
            Op::Evict => {
                cache.evict_now().await.map_err(|e| e.to_string())?;
            }
            Op::Read { .. } | Op::Remove { .. } => {}
        }
    }
    cache.evict_now().await.map_err(|e| e.to_string())?;
    let total = opened.check_consistency().await?;
    if total > cap {
        return Err(format!("total {total} over the cap {cap} after quiescence"));
    }
    for key in &seen {
        opened.read_verified(key).await;
    }
    Ok(())
}
