//! `ManifestCache`: a round trip with the media type, a wrong digest refused, and reads
//! through a database outage (verified on disk, typed by the manifest itself) that a busy
//! pool does not trigger.

use std::time::Duration;

use dunite_core::{DatabaseOptions, EvictionPolicy};
use dunite_oci::{Digest, ManifestCache};

const INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

async fn open(dir: &std::path::Path, db: DatabaseOptions) -> ManifestCache {
    let policy = EvictionPolicy::new(1 << 20).without_safety_tick();
    ManifestCache::new(ManifestCache::options(dir, policy).with_database_options(db)).await.unwrap()
}

/// An index that declares no media type (the outage path must infer one).
const UNTYPED_INDEX: &[u8] = br#"{"schemaVersion":2,"manifests":[]}"#;

#[tokio::test]
async fn a_manifest_comes_back_with_its_media_type() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), DatabaseOptions::new()).await;
    let digest = Digest::sha256_of(UNTYPED_INDEX);
    assert!(cache.open(&digest).await.unwrap().is_none());
    cache.store(&digest, UNTYPED_INDEX, DOCKER_LIST).await.unwrap();
    let manifest = cache.open(&digest).await.unwrap().expect("stored");
    assert_eq!(manifest.bytes(), UNTYPED_INDEX);
    assert_eq!(manifest.media_type(), DOCKER_LIST, "the type it was served as, not the declared one");
    // Content-addressed: a second store keeps the first.
    cache.store(&digest, UNTYPED_INDEX, INDEX).await.unwrap();
    assert_eq!(cache.open(&digest).await.unwrap().unwrap().media_type(), DOCKER_LIST);
}

#[tokio::test]
async fn bytes_that_do_not_hash_to_the_digest_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), DatabaseOptions::new()).await;
    let digest = Digest::sha256_of(b"the real manifest");
    let error = cache.store(&digest, UNTYPED_INDEX, INDEX).await.unwrap_err();
    assert!(matches!(error.as_cache(), Some(dunite_core::Error::DigestMismatch { .. })), "{error}");
    assert!(cache.open(&digest).await.unwrap().is_none());
    assert_eq!(cache.entries().total_bytes().await.unwrap(), 0);
}

#[tokio::test]
async fn without_the_database_a_verified_manifest_is_served_as_it_declares() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), DatabaseOptions::new()).await;
    let digest = Digest::sha256_of(UNTYPED_INDEX);
    cache.store(&digest, UNTYPED_INDEX, DOCKER_LIST).await.unwrap();
    cache.entries().entries().database().pool().close().await;
    let manifest = cache.open(&digest).await.unwrap().expect("found on disk");
    assert_eq!(manifest.bytes(), UNTYPED_INDEX);
    assert_eq!(manifest.media_type(), INDEX, "the row is out of reach: the declared type");
    assert!(cache.open(&Digest::sha256_of(b"never stored")).await.unwrap().is_none());
}

#[tokio::test]
async fn a_busy_pool_is_not_an_outage() {
    let dir = tempfile::tempdir().unwrap();
    let db = DatabaseOptions::new().with_max_connections(1).with_acquire_timeout(Duration::from_millis(100));
    let cache = open(dir.path(), db).await;
    let digest = Digest::sha256_of(UNTYPED_INDEX);
    cache.store(&digest, UNTYPED_INDEX, INDEX).await.unwrap();
    let held = cache.entries().entries().database().pool().acquire().await.unwrap();
    let busy = cache.open(&digest).await.expect_err("no connection was free");
    assert!(busy.is_pool_timeout(), "{busy}");
    drop(held);
    assert_eq!(cache.open(&digest).await.unwrap().unwrap().bytes(), UNTYPED_INDEX);
}
