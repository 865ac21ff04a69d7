//! Readers keep their bytes through eviction; pinned blobs are never victims.

use tokio::io::AsyncReadExt as _;

use dunite_testkit::check_consistency;

use crate::{blob, open, read_verified};

#[tokio::test]
async fn a_reader_gets_every_byte_of_a_blob_evicted_mid_read() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 1 << 20).await;
    let (digest, bytes) = blob(1, 600 * 1024);
    cache.store(&digest, &bytes[..]).await.unwrap();

    let mut reading = cache.open(&digest).await.unwrap().unwrap();
    let mut head = vec![0; 1000];
    reading.file_mut().read_exact(&mut head).await.unwrap();

    // Push the blob out: it is the least recently used once these land.
    for i in 0..3 {
        let (d, b) = blob(100 + i, 300 * 1024);
        cache.store(&d, &b[..]).await.unwrap();
    }
    cache.evict_if_over_cap().await.unwrap();
    assert!(!cache.contains(&digest).await.unwrap(), "the blob should have been evicted");
    assert!(cache.open(&digest).await.unwrap().is_none());

    let mut rest = Vec::new();
    reading.file_mut().read_to_end(&mut rest).await.unwrap();
    head.extend(rest);
    assert_eq!(head, bytes, "the reader must get the complete original bytes");
    check_consistency(cache.entries().entries(), dir.path()).await.unwrap();
}

#[tokio::test]
async fn removal_while_reading_is_safe_too() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 1 << 20).await;
    let (digest, bytes) = blob(2, 200 * 1024);
    cache.store(&digest, &bytes[..]).await.unwrap();
    let mut reading = cache.open(&digest).await.unwrap().unwrap();
    assert_eq!(cache.remove(&digest).await.unwrap(), Some(200 * 1024));
    let mut all = Vec::new();
    reading.file_mut().read_to_end(&mut all).await.unwrap();
    assert_eq!(all, bytes);
    assert_eq!(cache.remove(&digest).await.unwrap(), None);
}

#[tokio::test]
async fn a_pinned_blob_is_never_evicted() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 100 * 1024).await;
    let (pinned, bytes) = blob(3, 40 * 1024);
    cache.store(&pinned, &bytes[..]).await.unwrap();
    let pin = cache.pin(&pinned);
    for i in 0..4 {
        let (d, b) = blob(10 + i, 40 * 1024);
        cache.store(&d, &b[..]).await.unwrap();
    }
    cache.evict_if_over_cap().await.unwrap();
    assert!(cache.contains(&pinned).await.unwrap(), "pinned, so never a victim");
    assert!(cache.total_bytes().await.unwrap() <= 100 * 1024);
    drop(pin);
    for i in 0..4 {
        let (d, b) = blob(20 + i, 40 * 1024);
        cache.store(&d, &b[..]).await.unwrap();
    }
    cache.evict_if_over_cap().await.unwrap();
    assert!(!cache.contains(&pinned).await.unwrap(), "unpinned and oldest, so evicted");
}

/// Hits move a blob to the back of the LRU order, without a database write per hit.
#[tokio::test]
async fn hits_keep_a_blob_and_are_written_in_batches() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 100 * 1024).await;
    let (hot, _) = blob(4, 30 * 1024);
    cache.store(&hot, &blob(4, 30 * 1024).1[..]).await.unwrap();
    let (cold, cold_bytes) = blob(5, 30 * 1024);
    cache.store(&cold, &cold_bytes[..]).await.unwrap();
    for _ in 0..100 {
        read_verified(&cache, &hot).await.unwrap();
    }
    let (next, next_bytes) = blob(6, 50 * 1024);
    cache.store(&next, &next_bytes[..]).await.unwrap();
    cache.evict_if_over_cap().await.unwrap();
    assert!(cache.contains(&hot).await.unwrap());
    assert!(!cache.contains(&cold).await.unwrap());
    let stats = cache.stats().entries;
    assert_eq!(stats.hits, 100);
    assert!(stats.access_writes <= 2, "100 hits, at most a flush or two: {stats:?}");
}

/// A pool busy with other work is no database outage. Before the fix `open` took its
/// `PoolTimedOut` for one and read the whole blob from disk to hash it: under pool pressure
/// every hit became a full-file read. Now the timeout is the caller's to handle (a 503 at the
/// server), and the disk is searched only when the database cannot be reached.
#[tokio::test]
async fn a_busy_pool_is_not_an_outage() {
    let dir = tempfile::tempdir().unwrap();
    let db = dunite_core::DatabaseOptions::new()
        .with_max_connections(1)
        .with_acquire_timeout(std::time::Duration::from_millis(100));
    let cache =
        crate::open_with(dir.path(), dunite_core::EvictionPolicy::new(1 << 20).without_safety_tick(), db)
            .await;
    let (digest, bytes) = blob(4, 64 * 1024);
    cache.store(&digest, &bytes[..]).await.unwrap();
    let held = cache.entries().entries().database().pool().acquire().await.unwrap();
    let busy = cache.open(&digest).await.expect_err("no connection was free");
    assert!(busy.as_cache().is_some_and(dunite_core::Error::is_pool_timeout), "{busy}");
    drop(held);
    assert_eq!(read_verified(&cache, &digest).await.unwrap(), bytes);
}
