//! Random fetch/read/remove sequences keep the cache's invariants.

use std::time::Duration;

use dunite_core::{DatabaseOptions, EvictionPolicy};
use dunite_download::DownloadRequest;
use dunite_testkit::{TestBackend, block_on, check_consistency};
use proptest::prelude::*;

use crate::{Upstream, content, open_on, read_verified, url, verified_request};

#[derive(Debug, Clone)]
enum Op {
    /// Upstream serves new content at URL `name` (with an `ETag` derived from it), then the
    /// cache fetches it through, with or without the expected sha256.
    Fetch {
        name: u64,
        seed: u64,
        size: usize,
        verified: bool,
    },
    Read {
        pick: usize,
    },
    Remove {
        pick: usize,
    },
    Evict,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0u64..12, 0u64..3, 0usize..6_000, any::<bool>())
            .prop_map(|(name, seed, size, verified)| Op::Fetch { name, seed, size, verified }),
        3 => any::<usize>().prop_map(|pick| Op::Read { pick }),
        1 => any::<usize>().prop_map(|pick| Op::Remove { pick }),
        1 => Just(Op::Evict),
    ]
}

async fn run(backend: TestBackend, cap: u64, stale: bool, ops: Vec<Op>) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let policy = EvictionPolicy::new(cap).with_low_watermark(cap / 2).without_safety_tick();
    let freshness = if stale { Duration::ZERO } else { crate::HOUR };
    let options = DatabaseOptions::new().with_max_connections(2);
    let Some((cache, _db)) = open_on(backend, dir.path(), policy, options, freshness).await else {
        return Ok(());
    };
    let upstream = Upstream::default();
    let mut seen = Vec::new();
    for op in ops {
        match op {
            Op::Fetch { name, seed, size, verified } => {
                let key = url(&format!("file-{name}"));
                let (digest, bytes) = content(name * 1_000_000 + seed * 10_000 + size as u64, size);
                upstream.serve(&key, bytes.clone(), Some(&digest.hex()));
                let request =
                    if verified { verified_request(&key, &bytes) } else { DownloadRequest::new(key.clone()) };
                match cache.get_or_fetch(&request, &upstream).await {
                    Ok(download) => {
                        // A fresh entry may serve older content, unless a sha256 was asked for.
                        if (verified || stale) && download.info().sha256() != &digest {
                            return Err(format!("{key} served {:?}, upstream has {digest}", download.info()));
                        }
                        seen.push(key);
                    }
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
    for key in &seen {
        read_verified(&cache, key).await;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: dunite_testkit::proptest_cases(32), ..ProptestConfig::default() })]

    #[test]
    fn random_sequences_keep_the_invariants(
        cap in 1_000u64..30_000,
        stale in any::<bool>(),
        ops in prop::collection::vec(op(), 0..40),
    ) {
        let result = block_on(run(TestBackend::Sqlite, cap, stale, ops));
        prop_assert!(result.is_ok(), "{}", result.unwrap_err());
    }

    #[test]
    fn random_sequences_keep_the_invariants_on_postgres(
        cap in 1_000u64..30_000,
        stale in any::<bool>(),
        ops in prop::collection::vec(op(), 0..40),
    ) {
        let result = block_on(run(TestBackend::Postgres, cap, stale, ops));
        prop_assert!(result.is_ok(), "{}", result.unwrap_err());
    }
}
