//! Stale entries are revalidated with their validators; "not modified" keeps the payload.

use std::time::Duration;

use dunite_core::{DatabaseOptions, EvictionPolicy};
use dunite_download::{DownloadRequest, Lookup, Source, Validators};
use dunite_testkit::check_consistency;

use crate::{Upstream, content, eventually, open_with, read_all, url};

async fn stale_cache(dir: &std::path::Path) -> dunite_download::DownloadCache {
    let policy = EvictionPolicy::new(1 << 20).without_safety_tick();
    open_with(dir, policy, DatabaseOptions::new(), Duration::ZERO).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_entry_answered_not_modified_is_refreshed_without_a_transfer() {
    let dir = tempfile::tempdir().unwrap();
    let cache = stale_cache(dir.path()).await;
    let upstream = Upstream::default();
    let key = url("index.json");
    let (_, bytes) = content(1, 40_000);
    upstream.serve(&key, bytes.clone(), Some("\"v1\""));
    let request = DownloadRequest::new(key.clone());

    let first = cache.get_or_fetch(&request, &upstream).await.unwrap();
    assert_eq!(first.source(), Source::Fetched);
    assert_eq!(first.info().etag(), Some("\"v1\""));
    let stored_at = first.info().stored_at();
    let stores = cache.stats().entries.stores;
    let bytes_stored = cache.stats().entries.bytes_stored;
    assert_eq!(upstream.bytes_sent(), bytes.len() as u64);
    // Stored times have millisecond resolution: wait (with a deadline) until the wall clock
    // has moved past the first one, so the refresh can be seen to move it.
    eventually(Duration::from_secs(5), || async {
        std::time::SystemTime::now() > stored_at + Duration::from_millis(1)
    })
    .await;

    // With a freshness of zero the entry is stale at once, and its validators are public.
    assert!(cache.info(&key).await.unwrap().unwrap().is_stale(cache.freshness()));
    assert_eq!(cache.validators(&key).await.unwrap(), Some(Validators::new().with_etag("\"v1\"")));

    let mut second = cache.get_or_fetch(&request, &upstream).await.unwrap();
    assert_eq!(second.source(), Source::Revalidated);
    assert_eq!(read_all(&mut second).await, bytes);
    assert_eq!(upstream.calls(), 2);
    assert_eq!(upstream.validators_seen(), vec![None, Some(Validators::new().with_etag("\"v1\""))]);
    assert_eq!(upstream.bytes_sent(), bytes.len() as u64, "a revalidation transfers no body");
    assert_eq!(cache.stats().entries.stores, stores);
    assert_eq!(cache.stats().entries.bytes_stored, bytes_stored);
    assert!(second.info().stored_at() > stored_at, "the refresh moves the stored time forward");
    assert_eq!(second.info().sha256(), first.info().sha256());
    let stats = cache.download_stats();
    assert_eq!((stats.fetches, stats.conditional, stats.not_modified), (2, 1, 1), "{stats:?}");
    check_consistency(cache.entries().entries(), dir.path()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_entry_whose_content_changed_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let cache = stale_cache(dir.path()).await;
    let upstream = Upstream::default();
    let key = url("latest.tar.gz");
    let (_, old) = content(2, 30_000);
    let (_, new) = content(3, 20_000);
    upstream.serve(&key, old.clone(), Some("\"v1\""));
    let request = DownloadRequest::new(key.clone());
    let mut first = cache.get_or_fetch(&request, &upstream).await.unwrap();

    upstream.serve(&key, new.clone(), Some("\"v2\""));
    let mut second = cache.get_or_fetch(&request, &upstream).await.unwrap();
    assert_eq!(second.source(), Source::Fetched);
    assert_eq!(second.info().etag(), Some("\"v2\""));
    assert_eq!(read_all(&mut second).await, new);
    assert_eq!(upstream.validators_seen()[1], Some(Validators::new().with_etag("\"v1\"")));
    // The reader of the replaced entry keeps its bytes.
    assert_eq!(read_all(&mut first).await, old);
    assert_eq!(cache.total_bytes().await.unwrap(), new.len() as u64);
    assert_eq!(cache.len().await.unwrap(), 1);
    check_consistency(cache.entries().entries(), dir.path()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_entry_without_validators_is_fetched_unconditionally() {
    let dir = tempfile::tempdir().unwrap();
    let cache = stale_cache(dir.path()).await;
    let upstream = Upstream::default();
    let key = url("no-etag");
    let (_, bytes) = content(4, 1000);
    upstream.serve(&key, bytes.clone(), None);
    let request = DownloadRequest::new(key.clone());
    cache.get_or_fetch(&request, &upstream).await.unwrap();
    assert_eq!(cache.validators(&key).await.unwrap(), None);

    let mut again = cache.get_or_fetch(&request, &upstream).await.unwrap();
    assert_eq!(again.source(), Source::Fetched);
    assert_eq!(read_all(&mut again).await, bytes);
    assert_eq!(upstream.validators_seen(), vec![None, None]);
    check_consistency(cache.entries().entries(), dir.path()).await.unwrap();
}

/// With a long freshness, the second request is a hit and upstream is not asked.
#[tokio::test]
async fn a_fresh_entry_is_served_without_asking_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let cache = crate::open(dir.path(), 1 << 20).await;
    let upstream = Upstream::default();
    let key = url("fresh");
    upstream.serve(&key, content(5, 100).1, Some("\"v1\""));
    let request = DownloadRequest::new(key);
    cache.get_or_fetch(&request, &upstream).await.unwrap();
    let hit = cache.get_or_fetch(&request, &upstream).await.unwrap();
    assert_eq!(hit.source(), Source::Hit);
    assert!(!hit.info().is_stale(cache.freshness()));
    assert_eq!(upstream.calls(), 1);
    assert_eq!(cache.download_stats().hits, 1);
}

/// Two instances on one database and directory: while A revalidates a stale entry, B replaces
/// it with new content; A's "not modified" must not relabel B's new bytes with the old
/// record (its sha256 among it). A's refresh finds the record changed and fetches whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revalidation_never_relabels_an_entry_replaced_meanwhile() {
    use dunite_download::{FetchError, Fetched, ResponseMeta, fetch_fn};

    let dir = tempfile::tempdir().unwrap();
    let a = stale_cache(dir.path()).await;
    let b = stale_cache(dir.path()).await;
    let key = url("tool.tar.gz");
    let (old_sha, old) = content(7, 30_000);
    let (new_sha, new) = content(8, 50_000);
    let first = Upstream::default();
    first.serve(&key, old.clone(), Some("\"old\""));
    a.get_or_fetch(&DownloadRequest::new(key.clone()), &first).await.unwrap();

    // B's upstream has the new content already.
    let newer = Upstream::default();
    newer.serve(&key, new.clone(), Some("\"new\""));
    let (b_in, key_in, new_in) = (b.clone(), key.clone(), new.clone());
    let racing = fetch_fn(move |request: dunite_download::FetchRequest| {
        let (b, key, newer, new) = (b_in.clone(), key_in.clone(), newer.clone(), new_in.clone());
        async move {
            if request.validators().is_some() {
                // Between A's look at the entry and its refresh, B stores the new content.
                b.get_or_fetch(&DownloadRequest::new(key), &newer)
                    .await
                    .map_err(|e| Box::new(e) as FetchError)?;
                return Ok(Fetched::not_modified());
            }
            Ok(Fetched::body(std::io::Cursor::new(new), ResponseMeta::new()))
        }
    });
    let mut answer = a.get_or_fetch(&DownloadRequest::new(key.clone()), &racing).await.unwrap();
    assert_eq!(answer.source(), Source::Fetched, "the refresh must not apply to B's entry");
    assert_eq!(read_all(&mut answer).await, new);
    assert_eq!(answer.info().sha256(), &new_sha);
    // What is recorded matches what is on disk, and an old pin is not answered with new bytes.
    let cached = crate::read_verified(&a, &key).await.unwrap();
    assert_eq!(cached, new);
    assert_ne!(a.info(&key).await.unwrap().unwrap().sha256(), &old_sha);
    check_consistency(a.entries().entries(), dir.path()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookup_opens_a_fresh_hit_and_only_reports_stale_or_other_pins() {
    let (fresh_dir, stale_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let fresh = crate::open(fresh_dir.path(), 1 << 20).await;
    let stale = stale_cache(stale_dir.path()).await;
    let upstream = Upstream::default();
    let key = url("lookup.bin");
    let (_, bytes) = content(2, 10_000);
    upstream.serve(&key, bytes.clone(), None);
    let request = DownloadRequest::new(key.clone());
    let other_pin = DownloadRequest::new(key.clone()).with_sha256(content(3, 10).0);
    for cache in [&fresh, &stale] {
        assert!(matches!(cache.lookup(&request).await.unwrap(), Lookup::Missing));
        cache.get_or_fetch(&request, &upstream).await.unwrap();
        assert!(matches!(cache.lookup(&other_pin).await.unwrap(), Lookup::Cached(_)));
    }
    let hits = fresh.download_stats().hits;
    let Lookup::Fresh(hit) = fresh.lookup(&request).await.unwrap() else { panic!("a fresh entry is a hit") };
    let mut hit = *hit;
    assert_eq!((hit.source(), read_all(&mut hit).await), (Source::Hit, bytes));
    assert_eq!(fresh.download_stats().hits, hits + 1, "a lookup hit is counted");
    assert!(matches!(stale.lookup(&request).await.unwrap(), Lookup::Cached(_)), "stale: revalidate first");
    assert_eq!(upstream.calls(), 2, "lookups never ask the upstream");
}
