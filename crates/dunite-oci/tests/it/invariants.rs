//! Random store/read/remove sequences keep the cache's invariants.

use dunite_core::{DatabaseOptions, EvictionPolicy};
use proptest::prelude::*;

use dunite_testkit::{TestBackend, block_on, check_consistency};

use crate::{blob, open_on, read_verified};

#[derive(Debug, Clone)]
enum Op {
    Store { seed: u64, size: usize },
    Read { pick: usize },
    Remove { pick: usize },
    Evict,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0u64..40, 0usize..6_000).prop_map(|(seed, size)| Op::Store { seed, size }),
        3 => any::<usize>().prop_map(|pick| Op::Read { pick }),
        1 => any::<usize>().prop_map(|pick| Op::Remove { pick }),
        1 => Just(Op::Evict),
    ]
}

async fn run(backend: TestBackend, cap: u64, ops: Vec<Op>) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let policy = EvictionPolicy::new(cap).with_low_watermark(cap / 2).without_safety_tick();
    let options = DatabaseOptions::new().with_max_connections(2);
    let Some((cache, _db)) = open_on(backend, dir.path(), policy, options).await else { return Ok(()) };
    let mut seen = Vec::new();
    for op in ops {
        match op {
            Op::Store { seed, size } => {
                let (digest, bytes) = blob(seed * 10_000 + size as u64, size);
                match cache.store(&digest, &bytes[..]).await {
                    Ok(_) => seen.push(digest),
                    Err(e) if size as u64 > cap => {
                        if !matches!(e.as_cache(), Some(dunite_core::Error::TooLarge { .. })) {
                            return Err(format!("expected TooLarge, got {e}"));
                        }
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
            Op::Read { pick } if !seen.is_empty() => {
                read_verified(&cache, &seen[pick % seen.len()]).await;
            }
            Op::Remove { pick } if !seen.is_empty() => {
                cache.remove(&seen[pick % seen.len()]).await.map_err(|e| e.to_string())?;
            }
            Op::Evict => {
                cache.evict_if_over_cap().await.map_err(|e| e.to_string())?;
            }
            Op::Read { .. } | Op::Remove { .. } => {}
        }
    }
    cache.evict_if_over_cap().await.map_err(|e| e.to_string())?;
    let total = check_consistency(cache.entries().entries(), dir.path()).await?;
    if total > cap {
        return Err(format!("total {total} over the cap {cap} after quiescence"));
    }
    for digest in &seen {
        read_verified(&cache, digest).await;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: dunite_testkit::proptest_cases(32), ..ProptestConfig::default() })]

    #[test]
    fn random_sequences_keep_the_invariants(cap in 1_000u64..30_000, ops in prop::collection::vec(op(), 0..40)) {
        let result = block_on(run(TestBackend::Sqlite, cap, ops));
        prop_assert!(result.is_ok(), "{}", result.unwrap_err());
    }

    #[test]
    fn random_sequences_keep_the_invariants_on_postgres(cap in 1_000u64..30_000, ops in prop::collection::vec(op(), 0..40)) {
        let result = block_on(run(TestBackend::Postgres, cap, ops));
        prop_assert!(result.is_ok(), "{}", result.unwrap_err());
    }
}
