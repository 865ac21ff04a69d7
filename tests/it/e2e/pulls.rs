//! Pulls through the mirror with skopeo.

use std::time::Duration;

use super::harness::{Dunite, Image, Registry, assert_same_copy, pull};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_pull_is_byte_identical_and_the_second_pull_is_served_from_cache() {
    let registry = Registry::start().await;
    let image = Image::build(1, 3, 300_000);
    image.push(registry.addr, "e2e/app").await;
    let dunite = Dunite::start(registry.addr, "64MiB", &[]).await;

    let direct = pull(registry.addr, "e2e/app").await.unwrap();
    let first = pull(dunite.addr, "e2e/app").await.unwrap();
    let blob_bytes = assert_same_copy(direct.path(), first.path());
    let misses = dunite.metric("dunite_blob_misses_total").await;
    let upstream_bytes = dunite.metric("dunite_upstream_bytes_total").await;
    assert_eq!(misses, 4, "three layers and a config");
    assert!(upstream_bytes >= blob_bytes);

    let second = pull(dunite.addr, "e2e/app").await.unwrap();
    assert_same_copy(direct.path(), second.path());
    assert_eq!(
        dunite.metric("dunite_blob_misses_total").await,
        misses,
        "no upstream blob fetch on the second pull"
    );
    assert_eq!(
        dunite.metric("dunite_upstream_bytes_total").await,
        upstream_bytes,
        "nothing fetched upstream"
    );
    assert!(dunite.metric("dunite_blob_hits_total").await >= 4);
    let log = dunite.log_text();
    assert!(log.contains("cache=\"hit\""), "the request log records hits:\n{log}");

    let status = dunite.stop().await;
    assert!(status.success(), "dunite exits cleanly on SIGTERM: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pulls_through_a_cap_smaller_than_the_images_all_succeed_and_end_under_it() {
    const IMAGES: u64 = 4;
    let registry = Registry::start().await;
    let mut direct = Vec::new();
    let mut sum = 0;
    for seed in 0..IMAGES {
        let image = Image::build(100 + seed, 3, 400_000);
        image.push(registry.addr, &format!("e2e/many{seed}")).await;
        let copy = pull(registry.addr, &format!("e2e/many{seed}")).await.unwrap();
        sum += assert_same_copy(copy.path(), copy.path());
        direct.push(copy);
    }
    let cap = sum / 2;
    let dunite = Dunite::start(registry.addr, &cap.to_string(), &[]).await;

    let mut pulls = tokio::task::JoinSet::new();
    for seed in 0..IMAGES {
        let addr = dunite.addr;
        pulls.spawn(async move { (seed, pull(addr, &format!("e2e/many{seed}")).await) });
    }
    while let Some(done) = pulls.join_next().await {
        let (seed, dest) = done.unwrap();
        let dest =
            dest.unwrap_or_else(|e| panic!("pull {seed} failed: {e}\ndunite's log:\n{}", dunite.log_text()));
        assert_same_copy(direct[seed as usize].path(), dest.path());
    }
    let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
    while dunite.metric("dunite_cache_bytes{cache=\"blobs\"}").await > cap {
        assert!(tokio::time::Instant::now() < give_up, "the blob cache did not come back under its cap");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(dunite.metric("dunite_evictor_passes_total{cache=\"blobs\"}").await >= 1);
    assert!(dunite.metric("dunite_evictor_evicted_total{cache=\"blobs\"}").await >= 1);
    assert_eq!(dunite.metric("dunite_evictor_errors_total{cache=\"blobs\"}").await, 0);
    assert_eq!(dunite.metric("dunite_errors_total").await, 0);
    let log = dunite.log_text();
    assert!(
        !log.contains("PoolTimedOut") && !log.contains("pool timed out"),
        "pool timeouts in the log:\n{log}"
    );
    assert!(!log.contains(" ERROR "), "errors in the log:\n{log}");
}

/// Tags are revalidated after the TTL (zero here), and served from the cache while the
/// upstream is down; blobs already cached keep being served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_upstream_down_cached_tags_and_blobs_are_still_served() {
    let registry = Registry::start().await;
    let image = Image::build(7, 2, 200_000);
    image.push(registry.addr, "e2e/offline").await;
    let direct = pull(registry.addr, "e2e/offline").await.unwrap();
    let dunite = Dunite::start(registry.addr, "64MiB", &["--tag-ttl", "0s"]).await;
    let first = pull(dunite.addr, "e2e/offline").await.unwrap();
    assert_same_copy(direct.path(), first.path());

    drop(registry);
    let second = pull(dunite.addr, "e2e/offline").await.unwrap();
    assert_same_copy(direct.path(), second.path());
    assert!(dunite.metric("dunite_stale_tags_served_total").await >= 1);
    // A tag never seen cannot be made up.
    assert!(pull(dunite.addr, "e2e/never-seen").await.is_err());
}

/// A `Range` request for a blob not cached yet is answered with the whole blob (200), from
/// the fill; once cached, the same request gets exactly the range (206).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_on_a_miss_gets_the_whole_blob_and_on_a_hit_the_range() {
    let registry = Registry::start().await;
    let image = Image::build(7, 1, 200_000);
    image.push(registry.addr, "e2e/range").await;
    let dunite = Dunite::start(registry.addr, "64MiB", &[]).await;
    // The largest blob of a direct pull (files named by their hex digest) is the layer, as
    // the registry holds it.
    let direct = pull(registry.addr, "e2e/range").await.unwrap();
    let (digest, bytes) = std::fs::read_dir(direct.path())
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            (format!("sha256:{}", entry.file_name().to_string_lossy()), std::fs::read(entry.path()).unwrap())
        })
        .filter(|(name, _)| name.len() == "sha256:".len() + 64)
        .max_by_key(|(_, bytes)| bytes.len())
        .unwrap();
    let url = format!("http://{}/v2/e2e/range/blobs/{digest}", dunite.addr);
    let client = reqwest::Client::new();

    let miss = client.get(&url).header("range", "bytes=100-199").send().await.unwrap();
    assert_eq!(miss.status(), 200, "a miss answers with the whole blob");
    assert_eq!(miss.bytes().await.unwrap(), bytes);

    let hit = client.get(&url).header("range", "bytes=100-199").send().await.unwrap();
    assert_eq!(hit.status(), 206);
    assert_eq!(hit.headers()["content-range"], format!("bytes 100-199/{}", bytes.len()).as_str());
    assert_eq!(hit.bytes().await.unwrap(), bytes[100..200]);
}
