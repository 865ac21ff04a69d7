//! The burst regression at the download cache's level.

use std::time::Duration;

use dunite_download::DownloadRequest;
use dunite_testkit::check_consistency;

use crate::{Upstream, content, eventually, open, read_verified, url};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_of_concurrent_stores_coalesces_into_few_eviction_passes_and_converges() {
    const N: u64 = 8;
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 250 * 1024).await;
    let upstream = Upstream::default();
    let passes_at_start = cache.stats().evictor.passes;

    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(N as usize));
    let mut fetches = tokio::task::JoinSet::new();
    for i in 0..N {
        let (cache, barrier, upstream) = (cache.clone(), barrier.clone(), upstream.clone());
        fetches.spawn(async move {
            let key = url(&format!("file-{i}"));
            let (_, bytes) = content(i, 100 * 1024);
            upstream.serve(&key, bytes, None);
            barrier.wait().await;
            cache.get_or_fetch(&DownloadRequest::new(key.clone()), &upstream).await.unwrap();
            key
        });
    }
    let keys = fetches.join_all().await;
    assert_eq!(upstream.calls() as u64, N);
    eventually(Duration::from_secs(30), || async { cache.total_bytes().await.unwrap() <= 250 * 1024 }).await;
    // Quiesce: waits out any pass in flight and folds any pending poke.
    cache.evict_if_over_cap().await.unwrap();

    let stats = cache.stats();
    let background_passes = stats.evictor.passes - passes_at_start - 1;
    assert!(background_passes >= 1, "the burst must have caused eviction: {stats:?}");
    assert!(background_passes * 2 <= N, "{background_passes} passes for {N} stores: {stats:?}");
    assert!(stats.evictor.entries_evicted >= 6, "{stats:?}");
    check_consistency(cache.entries().entries(), dir.path()).await.unwrap();
    for key in &keys {
        read_verified(&cache, key).await;
    }
}
