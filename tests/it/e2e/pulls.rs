//! Pulls through the mirror with skopeo.

use std::time::Duration;

use sha2::Digest as _;

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

    // A client has its bytes once they are verified; the commits follow.
    dunite_testkit::poll_until(Duration::from_secs(30), "the image's blobs cached", async || {
        dunite.metric("dunite_cache_entries{cache=\"blobs\"}").await == misses
    })
    .await;
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

/// A `Range` request for a blob not cached yet is answered with the range (206) as soon as
/// its bytes have reached the fill's spool (what lazy-pulling snapshotters ask), and the fill
/// goes on to cache the blob; once cached, the same request gets the range from the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_on_a_miss_or_a_hit_gets_the_range() {
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

    // A miss answers the range from the growing spool (lazy pulling), and fills the cache.
    let miss = client.get(&url).header("range", "bytes=100-199").send().await.unwrap();
    assert_eq!(miss.status(), 206, "a miss answers with the range");
    assert_eq!(miss.headers()["content-range"], format!("bytes 100-199/{}", bytes.len()).as_str());
    assert_eq!(miss.bytes().await.unwrap(), bytes[100..200]);
    dunite_testkit::poll_until(Duration::from_secs(30), "the blob cached", async || {
        dunite.metric("dunite_cache_entries{cache=\"blobs\"}").await == 1
    })
    .await;

    let hit = client.get(&url).header("range", "bytes=100-199").send().await.unwrap();
    assert_eq!(hit.status(), 206);
    assert_eq!(hit.headers()["content-range"], format!("bytes 100-199/{}", bytes.len()).as_str());
    assert_eq!(hit.bytes().await.unwrap(), bytes[100..200]);
}

/// A tag answers by the client's `Accept` (an index to a client that takes one, a 404 from the
/// registry to one that does not), and the mirror must keep those answers apart: serving the
/// cached index to a client that refuses indexes (or an old client's single-platform manifest
/// to one that asked for the index) hands it a document it did not ask for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_is_cached_per_accepted_media_types() {
    const INDEX: &str = "application/vnd.oci.image.index.v1+json";
    const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    let registry = Registry::start().await;
    let image = Image::build(31, 1, 1000);
    image.push(registry.addr, "e2e/multi").await;
    let client = reqwest::Client::new();
    let get = |addr: std::net::SocketAddr, reference: &str, accept: &str| {
        client
            .get(format!("http://{addr}/v2/e2e/multi/manifests/{reference}"))
            .header("accept", accept)
            .send()
    };
    // An index over the pushed image's manifest, pushed as the tag `multi`.
    let manifest = registry.manifest("e2e/multi", "v1", MANIFEST).await;
    let manifest_digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&manifest)));
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": INDEX,
        "manifests": [{
            "mediaType": MANIFEST, "digest": manifest_digest, "size": manifest.len(),
            "platform": {"architecture": "amd64", "os": "linux"},
        }],
    }))
    .unwrap();
    registry.put_manifest("e2e/multi", "multi", INDEX, index.clone()).await;

    let dunite = Dunite::start(registry.addr, "64MiB", &[]).await;
    let both = format!("{INDEX}, {MANIFEST}");
    let answer = |response: reqwest::Response| async move {
        let status = response.status().as_u16();
        let content_type = response.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned());
        (status, content_type, response.bytes().await.unwrap())
    };
    for accept in [both.as_str(), MANIFEST, both.as_str(), MANIFEST] {
        let direct = answer(get(registry.addr, "multi", accept).await.unwrap()).await;
        let mirrored = answer(get(dunite.addr, "multi", accept).await.unwrap()).await;
        assert_eq!(mirrored.0, direct.0, "status for Accept: {accept}");
        if direct.0 == 200 {
            assert_eq!(mirrored.1, direct.1, "content type for Accept: {accept}");
            assert_eq!(mirrored.2, direct.2, "body for Accept: {accept}");
        }
    }
    // A client refusing the index with `q=0` shares the key of clients that take no index;
    // the registry ignores `q`, so the mirror must ask it for the accepted types only, or the
    // index would be cached under that key for them all.
    let refusing = format!("{MANIFEST}, {INDEX};q=0");
    let direct = answer(get(registry.addr, "multi", MANIFEST).await.unwrap()).await;
    for accept in [refusing.as_str(), MANIFEST] {
        let mirrored = answer(get(dunite.addr, "multi", accept).await.unwrap()).await;
        assert_eq!(mirrored.0, direct.0, "Accept: {accept}: {:?}", mirrored.1);
    }
    assert_eq!(answer(get(dunite.addr, "multi", &both).await.unwrap()).await.2, index);
    assert!(
        dunite.metric("dunite_manifest_hits_total").await >= 2,
        "the index is a hit after its first fetch"
    );

    // With the registry gone, a client of another kind that takes the index gets the tag's
    // last answer (stale); one that takes no index gets an error, never the index.
    drop(registry);
    let stale = answer(get(dunite.addr, "multi", &format!("{INDEX}, */*;q=0.1")).await.unwrap()).await;
    assert_eq!((stale.0, stale.1.as_deref(), &stale.2[..]), (200, Some(INDEX), &index[..]));
    let refused = answer(get(dunite.addr, "multi", MANIFEST).await.unwrap()).await;
    assert_eq!(refused.0, 502, "{:?}", String::from_utf8_lossy(&refused.2));
    assert!(dunite.stop().await.success());
}

/// Tag records count against `--tag-max-bytes` by their size, so the tag cache stays bounded
/// however many tags are asked for (with empty records it grew without end), and a tag
/// dropped from it is resolved upstream again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_records_stay_under_their_cap() {
    const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    const TAGS: usize = 40;
    let registry = Registry::start().await;
    let image = Image::build(32, 1, 1000);
    image.push(registry.addr, "e2e/tags").await;
    let client = reqwest::Client::new();
    let url = |addr: std::net::SocketAddr, tag: &str| format!("http://{addr}/v2/e2e/tags/manifests/{tag}");
    let manifest = registry.manifest("e2e/tags", "v1", MANIFEST).await;
    for i in 0..TAGS {
        registry.put_manifest("e2e/tags", &format!("t{i}"), MANIFEST, manifest.clone()).await;
    }

    let cap = 2048u64;
    let dunite = Dunite::start(registry.addr, "64MiB", &["--tag-max-bytes", "2KiB"]).await;
    for i in 0..TAGS {
        let response =
            client.get(url(dunite.addr, &format!("t{i}"))).header("accept", MANIFEST).send().await.unwrap();
        assert_eq!(response.status(), 200, "t{i}");
        assert_eq!(response.bytes().await.unwrap(), manifest);
    }
    let bytes = r#"dunite_cache_bytes{cache="tags"}"#;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while dunite.metric(bytes).await > cap {
        assert!(
            tokio::time::Instant::now() < deadline,
            "tags hold {} bytes over a {cap}-byte cap",
            dunite.metric(bytes).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let entries = dunite.metric(r#"dunite_cache_entries{cache="tags"}"#).await;
    assert!(entries > 0 && entries < TAGS as u64, "{entries} tag records of {TAGS}");
    assert!(dunite.metric(r#"dunite_evictor_evicted_total{cache="tags"}"#).await >= TAGS as u64 - entries);
    // Asked again, every tag is right, and those no longer held (at most `entries` are) are
    // resolved upstream again.
    let misses = dunite.metric("dunite_manifest_misses_total").await;
    for i in 0..TAGS {
        let again =
            client.get(url(dunite.addr, &format!("t{i}"))).header("accept", MANIFEST).send().await.unwrap();
        assert_eq!(again.bytes().await.unwrap(), manifest, "t{i} asked again");
    }
    let refetched = dunite.metric("dunite_manifest_misses_total").await - misses;
    assert!(refetched >= TAGS as u64 - entries, "{refetched} misses asking again, {entries} records held");
    assert!(dunite.stop().await.success());
}
