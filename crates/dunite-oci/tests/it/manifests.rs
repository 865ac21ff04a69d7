//! `ManifestCache`: a round trip with the media type, a wrong digest refused, and reads
//! through a database outage (verified on disk, typed by the manifest itself) that a busy
//! pool does not trigger; fills: one upstream request for concurrent misses, the size bound
//! held as the bytes arrive, the digest asked for or announced verified, and a manifest
//! verified but not recorded still served.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use dunite_core::{DatabaseOptions, EvictionPolicy, FillError, Joined};
use dunite_oci::{
    AcceptedTypes, Digest, MAX_MANIFEST_BYTES, ManifestCache, ManifestHead, ManifestRef, TagKey,
};

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

type Chunks = futures_util::stream::Iter<std::vec::IntoIter<Result<Bytes, std::io::Error>>>;

/// An upstream answer: `head`, the announced length, and `body` in chunks of `chunk` bytes.
fn answer(
    head: ManifestHead,
    total: Option<u64>,
    body: &[u8],
    chunk: usize,
) -> (ManifestHead, Option<u64>, Chunks) {
    let chunks: Vec<_> = body.chunks(chunk).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
    (head, total, futures_util::stream::iter(chunks))
}

fn tag_key() -> TagKey {
    let mut types = AcceptedTypes::new();
    types.accept(INDEX);
    TagKey::new("registry.example", "library/alpine", "3", types)
}

fn invalid(error: &FillError) -> Option<&dunite_core::Error> {
    match error {
        FillError::Invalid(error) => Some(error),
        _ => None,
    }
}

/// Concurrent misses of one tag, then of one digest, share one upstream request each: every
/// client gets the manifest, its media type and its digest, and it is stored once.
#[tokio::test]
async fn concurrent_fills_of_one_manifest_make_one_upstream_request() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), DatabaseOptions::new()).await;
    let digest = Digest::sha256_of(UNTYPED_INDEX);
    let requests = Arc::new(AtomicU32::new(0));
    let (release, released) = tokio::sync::watch::channel(false);
    let fill = |reference: ManifestRef<'_>, announced: Option<Digest>| {
        let (requests, mut released) = (Arc::clone(&requests), released.clone());
        cache
            .fill(reference, move || async move {
                requests.fetch_add(1, Ordering::SeqCst);
                // The upstream answers once every client has joined.
                released.wait_for(|released| *released).await.unwrap();
                Ok(answer(ManifestHead::new(DOCKER_LIST, announced), None, UNTYPED_INDEX, 7))
            })
            .unwrap()
    };
    let key = tag_key();
    let joined: Vec<Joined<ManifestHead>> =
        (0..8).map(|_| fill(ManifestRef::Tag(&key), Some(digest.clone()))).collect();
    assert_eq!(cache.fills_in_flight(), 1);
    release.send(true).unwrap();
    for joined in joined {
        let (manifest, fetched) = cache.read_fill(joined).await.unwrap();
        assert_eq!(
            (manifest.bytes(), manifest.media_type(), &fetched),
            (UNTYPED_INDEX, DOCKER_LIST, &digest)
        );
    }
    assert_eq!(requests.load(Ordering::SeqCst), 1);
    assert_eq!(cache.open(&digest).await.unwrap().unwrap().media_type(), DOCKER_LIST);

    // By digest: the same, keyed by the digest (the tag's fill has ended).
    let other = br#"{"schemaVersion":2,"layers":[{}]}"#;
    let other_digest = Digest::sha256_of(other);
    let (release, released) = tokio::sync::watch::channel(false);
    let requests = Arc::new(AtomicU32::new(0));
    let joined: Vec<_> = (0..8)
        .map(|_| {
            let (requests, mut released) = (Arc::clone(&requests), released.clone());
            cache
                .fill(ManifestRef::Digest(&other_digest), move || async move {
                    requests.fetch_add(1, Ordering::SeqCst);
                    released.wait_for(|released| *released).await.unwrap();
                    Ok(answer(ManifestHead::new(INDEX, None), Some(other.len() as u64), other, 5))
                })
                .unwrap()
        })
        .collect();
    release.send(true).unwrap();
    for joined in joined {
        let (manifest, fetched) = cache.read_fill(joined).await.unwrap();
        assert_eq!((manifest.bytes(), &fetched), (&other[..], &other_digest));
    }
    assert_eq!(requests.load(Ordering::SeqCst), 1);
    assert_eq!(cache.fills_in_flight(), 0);
    assert_eq!(cache.entries().len().await.unwrap(), 2);
}

/// A manifest over `MAX_MANIFEST_BYTES` is refused, announced or not (then as the bytes
/// arrive, without waiting for the end of the body), and nothing is stored.
#[tokio::test]
async fn a_manifest_over_the_limit_is_refused_as_it_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let policy = EvictionPolicy::new(64 << 20).without_safety_tick();
    let cache = ManifestCache::new(ManifestCache::options(dir.path(), policy)).await.unwrap();
    let huge = vec![b' '; usize::try_from(MAX_MANIFEST_BYTES).unwrap() + 1];
    let digest = Digest::sha256_of(&huge);
    let too_large = |error: &FillError| matches!(invalid(error), Some(dunite_core::Error::TooLarge { max_bytes, .. }) if *max_bytes == MAX_MANIFEST_BYTES);

    let announced = Some(huge.len() as u64);
    let body = huge.clone();
    let joined = cache
        .fill(ManifestRef::Digest(&digest), move || async move {
            Ok(answer(ManifestHead::new(INDEX, None), announced, &body, 64 << 10))
        })
        .unwrap();
    let error = cache.read_fill(joined).await.unwrap_err();
    assert!(too_large(&error), "{error:?}");

    // Unannounced: an endless body is cut at the limit.
    let key = tag_key();
    let joined = cache
        .fill(ManifestRef::Tag(&key), || async {
            let endless = futures_util::stream::repeat_with(|| {
                Ok::<_, std::io::Error>(Bytes::from(vec![b' '; 1 << 16]))
            });
            Ok((ManifestHead::new(INDEX, None), None, endless))
        })
        .unwrap();
    let error = cache.read_fill(joined).await.unwrap_err();
    assert!(too_large(&error), "{error:?}");
    assert_eq!(cache.entries().len().await.unwrap(), 0);
}

/// Bytes that do not hash to the digest asked for, or for a tag to the digest the upstream
/// announced, are refused and nothing is stored; an announced SHA-512 is verified as such.
#[tokio::test]
async fn a_manifest_of_the_wrong_digest_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), DatabaseOptions::new()).await;
    let mismatch =
        |error: &FillError| matches!(invalid(error), Some(dunite_core::Error::DigestMismatch { .. }));

    let asked = Digest::sha256_of(b"the real manifest");
    // Announcing the digest asked for does not make other bytes pass.
    let announced = Some(asked.clone());
    let joined = cache
        .fill(ManifestRef::Digest(&asked), move || async move {
            Ok(answer(ManifestHead::new(INDEX, announced), None, UNTYPED_INDEX, 8))
        })
        .unwrap();
    let error = cache.read_fill(joined).await.unwrap_err();
    assert!(mismatch(&error), "{error:?}");

    let key = tag_key();
    let announced = Some(Digest::sha256_of(b"another manifest"));
    let joined = cache
        .fill(ManifestRef::Tag(&key), move || async move {
            Ok(answer(ManifestHead::new(INDEX, announced), None, UNTYPED_INDEX, 8))
        })
        .unwrap();
    let error = cache.read_fill(joined).await.unwrap_err();
    assert!(mismatch(&error), "{error:?}");
    assert_eq!(cache.entries().len().await.unwrap(), 0);

    let sha512 =
        Digest::from(dunite_core::ContentDigest::of(dunite_core::DigestAlgorithm::Sha512, UNTYPED_INDEX));
    let announced = Some(sha512.clone());
    let joined = cache
        .fill(ManifestRef::Tag(&key), move || async move {
            Ok(answer(ManifestHead::new(INDEX, announced), None, UNTYPED_INDEX, 8))
        })
        .unwrap();
    let (manifest, digest) = cache.read_fill(joined).await.unwrap();
    assert_eq!((manifest.bytes(), &digest), (UNTYPED_INDEX, &sha512));
    assert!(cache.open(&sha512).await.unwrap().is_some(), "stored under its SHA-512");
}

/// A refusal reaches every client as the upstream's status.
#[tokio::test]
async fn a_refusal_carries_the_upstream_status() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), DatabaseOptions::new()).await;
    let key = tag_key();
    let joined = cache
        .fill(ManifestRef::Tag(&key), || async {
            Err::<(ManifestHead, Option<u64>, Chunks), _>(FillError::Refused { status: 404 })
        })
        .unwrap();
    assert!(cache.read_fill(joined).await.unwrap_err().is_not_found());
}

/// A manifest verified while the database is out of reach is served all the same (uncached).
#[tokio::test]
async fn a_manifest_verified_but_not_recorded_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), DatabaseOptions::new()).await;
    cache.entries().entries().database().pool().close().await;
    let digest = Digest::sha256_of(UNTYPED_INDEX);
    let joined = cache
        .fill(ManifestRef::Digest(&digest), || async {
            Ok(answer(ManifestHead::new(DOCKER_LIST, None), None, UNTYPED_INDEX, 8))
        })
        .unwrap();
    let (manifest, fetched) = cache.read_fill(joined).await.unwrap();
    assert_eq!((manifest.bytes(), manifest.media_type(), &fetched), (UNTYPED_INDEX, DOCKER_LIST, &digest));
}

/// A tag's fill records its answer itself (`with_tag_records`), before its clients are told
/// it has landed: a client that comes after finds the record, even if the client that
/// started the fill went away without reading it (before, the server recorded it after the
/// fill, from the first client only).
#[tokio::test]
async fn a_tag_fill_records_its_answer_whoever_started_it() {
    let dir = tempfile::tempdir().unwrap();
    let policy = EvictionPolicy::new(1 << 20).without_safety_tick();
    let tags = dunite_oci::TagCache::new(
        dunite_oci::TagCache::options(dir.path().join("tags"), policy.clone()),
        Duration::from_secs(300),
    )
    .await
    .unwrap();
    let cache =
        open(&dir.path().join("manifests"), DatabaseOptions::new()).await.with_tag_records(tags.clone());
    let digest = Digest::sha256_of(UNTYPED_INDEX);
    let key = tag_key();
    let started = cache
        .fill(ManifestRef::Tag(&key), move || async move {
            Ok(answer(
                ManifestHead::new(INDEX, Some(Digest::sha256_of(UNTYPED_INDEX))),
                None,
                UNTYPED_INDEX,
                7,
            ))
        })
        .unwrap();
    let mut waiter = cache
        .fill(ManifestRef::Tag(&key), || async {
            Err::<(ManifestHead, Option<u64>, Chunks), _>(FillError::Ended)
        })
        .unwrap();
    // The client that started the fill goes away at once.
    drop(started);
    waiter.finished().await.unwrap();
    let record = tags.get(&key).await.unwrap().expect("the fill recorded the tag");
    assert_eq!(record.digest(), &digest);
}
