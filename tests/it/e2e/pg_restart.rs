//! The PostgreSQL server behind a running `dunite` stops and comes back. Runs alone (nextest
//! override): every test sharing the server would see it go.

use std::time::Duration;

use dunite_testkit::pg;

use super::harness::{Dunite, Image, Registry, assert_same_copy, pull};

/// Starts the server again if the test fails while it is down, so the tests after it run.
struct Stopped(bool);

impl Drop for Stopped {
    fn drop(&mut self) {
        if self.0 {
            pg::start_server();
        }
    }
}

async fn blob_bytes(dunite: &Dunite) -> u64 {
    dunite.metric("dunite_cache_bytes{cache=\"blobs\"}").await
}

/// While the database is down: a cached image pulls byte-identical (blobs and manifests found
/// on disk and verified), an uncached one is fetched and served without being cached, and the
/// server stays up. Once it is back: pulls cache again, the blob cache converges under its
/// cap, and the cached image is served from the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_survive_a_database_restart_and_the_cache_converges_after() {
    if !pg::can_restart() {
        // A server given by URL only: this test cannot stop it. CI always starts its own.
        return;
    }
    let Some(database) = pg::fresh_database().await else { return };
    let registry = Registry::start().await;
    let (cached, uncached) = (Image::build(300, 3, 300_000), Image::build(301, 3, 300_000));
    cached.push(registry.addr, "e2e/cached").await;
    uncached.push(registry.addr, "e2e/uncached").await;
    let direct_cached = pull(registry.addr, "e2e/cached").await.unwrap();
    let direct_uncached = pull(registry.addr, "e2e/uncached").await.unwrap();
    let size = assert_same_copy(direct_cached.path(), direct_cached.path());
    // Room for one image and a half: caching both must evict.
    let cap = size * 3 / 2;
    let dunite = Dunite::start(registry.addr, &cap.to_string(), &["--database-url", database.url()]).await;

    let first = pull(dunite.addr, "e2e/cached").await.unwrap();
    assert_same_copy(direct_cached.path(), first.path());
    let misses = dunite.metric("dunite_blob_misses_total").await;

    tokio::task::spawn_blocking(pg::stop_server).await.unwrap();
    let mut stopped = Stopped(true);
    let during = pull(dunite.addr, "e2e/cached").await.expect("a cached image pulls without the database");
    assert_same_copy(direct_cached.path(), during.path());
    let fetched = pull(dunite.addr, "e2e/uncached").await.expect("an uncached image is fetched and served");
    assert_same_copy(direct_uncached.path(), fetched.path());
    tokio::task::spawn_blocking(pg::start_server).await.unwrap();
    stopped.0 = false;

    // Until a probe finds the database back (a second or two), pulls are still served
    // uncached; pull until the second image is cached and the cache evicted its way back
    // under the cap.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let after = pull(dunite.addr, "e2e/uncached").await.unwrap();
        assert_same_copy(direct_uncached.path(), after.path());
        let total = blob_bytes(&dunite).await;
        let evicted = dunite.metric("dunite_evictor_evicted_total{cache=\"blobs\"}").await;
        if evicted > 0 && total > 0 && total <= cap {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no convergence after the restart: blob cache at {total} bytes (cap {cap}), {evicted} evicted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let again = pull(dunite.addr, "e2e/uncached").await.unwrap();
    assert_same_copy(direct_uncached.path(), again.path());
    assert!(dunite.metric("dunite_blob_misses_total").await > misses);

    let log = dunite.log_text();
    assert!(log.contains("database unavailable"), "the outage is logged:\n{log}");
    assert!(!log.contains("panicked"), "{log}");
    let status = dunite.stop().await;
    assert!(status.success(), "dunite exits cleanly after the outage: {status}");
    drop(database);
}
