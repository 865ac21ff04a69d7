//! `TagCache`: records per set of accepted types, freshness by TTL, the stale fallback, and
//! a database outage that turns lookups into misses instead of failures.

use std::time::Duration;

use dunite_core::EvictionPolicy;
use dunite_oci::{AcceptedTypes, Digest, TagCache, TagKey};

const INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

async fn open(dir: &std::path::Path, ttl: Duration) -> TagCache {
    let policy = EvictionPolicy::new(1 << 20).without_safety_tick();
    TagCache::new(TagCache::options(dir, policy), ttl).await.unwrap()
}

fn key(accepted: &[&str]) -> TagKey {
    let mut types = AcceptedTypes::new();
    for media_type in accepted {
        types.accept(media_type);
    }
    TagKey::new("registry.example", "library/alpine", "3", types)
}

#[tokio::test]
async fn a_record_is_fresh_for_the_ttl_then_stale() {
    let dir = tempfile::tempdir().unwrap();
    let (fresh, stale) = (
        open(&dir.path().join("a"), Duration::from_secs(3600)).await,
        open(&dir.path().join("b"), Duration::ZERO).await,
    );
    let digest = Digest::sha256_of(b"an index");
    for tags in [&fresh, &stale] {
        tags.record(&key(&[INDEX, MANIFEST]), &digest, INDEX).await.unwrap();
    }
    let record = fresh.get(&key(&[MANIFEST, INDEX])).await.unwrap().expect("same types, same record");
    assert_eq!((record.digest(), record.media_type()), (&digest, INDEX));
    assert!(record.is_fresh());
    let record = stale.get(&key(&[INDEX, MANIFEST])).await.unwrap().expect("kept past its TTL");
    assert!(!record.is_fresh(), "a zero TTL: never fresh");
    assert!(fresh.get(&key(&[MANIFEST])).await.unwrap().is_none(), "other types, other record");
}

#[tokio::test]
async fn a_new_answer_replaces_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let tags = open(dir.path(), Duration::from_secs(3600)).await;
    let (old, new) = (Digest::sha256_of(b"v1"), Digest::sha256_of(b"v2"));
    tags.record(&key(&[INDEX]), &old, INDEX).await.unwrap();
    tags.record(&key(&[INDEX]), &new, INDEX).await.unwrap();
    assert_eq!(tags.get(&key(&[INDEX])).await.unwrap().unwrap().digest(), &new);
    assert_eq!(tags.entries().len().await.unwrap(), 2, "the variant and the tag's last answer");
}

#[tokio::test]
async fn the_stale_fallback_serves_the_last_answer_only_where_it_suits() {
    let dir = tempfile::tempdir().unwrap();
    let tags = open(dir.path(), Duration::from_secs(3600)).await;
    let single = Digest::sha256_of(b"one platform");
    tags.record(&key(&[MANIFEST]), &single, MANIFEST).await.unwrap();
    // A client of the same types gets its own record back.
    let own = tags.get(&key(&[MANIFEST])).await.unwrap();
    assert_eq!(tags.stale(&key(&[MANIFEST]), own).await.unwrap().unwrap().digest(), &single);
    // A client with no record of its own gets the tag's last answer if it accepts it...
    assert_eq!(tags.stale(&key(&["*/*"]), None).await.unwrap().unwrap().digest(), &single);
    // ...but one platform's manifest is never served to a client that asked for an index.
    assert!(tags.stale(&key(&[INDEX, MANIFEST]), None).await.unwrap().is_none());
}

#[tokio::test]
async fn without_the_database_tags_are_resolved_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let tags = open(dir.path(), Duration::from_secs(3600)).await;
    let digest = Digest::sha256_of(b"an index");
    tags.record(&key(&[INDEX]), &digest, INDEX).await.unwrap();
    tags.entries().entries().database().pool().close().await;
    assert!(tags.get(&key(&[INDEX])).await.unwrap().is_none(), "a miss, not a failure");
    tags.record(&key(&[INDEX]), &digest, INDEX).await.expect("skipped, not failed");
}
