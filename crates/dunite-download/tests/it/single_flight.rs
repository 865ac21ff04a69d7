//! Concurrent requests for one URL share one upstream fetch, its result or its error.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dunite_download::{
    DownloadCache, DownloadRequest, Error, FetchError, Fetched, ResponseMeta, Source, fetch_fn,
};
use dunite_testkit::{DiskUsage, check_consistency, disk_usage};
use tokio::sync::Semaphore;

use crate::{content, eventually, open, read_all, url};

const CALLERS: usize = 32;

/// A fetcher that counts its calls, holds every fetch until the gate gives it a permit, and
/// then serves `bytes`, or fails if `fail_first` and this is the first call.
fn gated(
    calls: Arc<AtomicUsize>,
    gate: Arc<Semaphore>,
    bytes: Vec<u8>,
    fail_first: bool,
) -> impl dunite_download::Fetcher + Clone + 'static {
    fetch_fn(move |_request| {
        let (calls, gate, bytes) = (calls.clone(), gate.clone(), bytes.clone());
        async move {
            let call = calls.fetch_add(1, Ordering::SeqCst) + 1;
            gate.acquire().await?.forget();
            if fail_first && call == 1 {
                return Err::<Fetched, FetchError>("upstream said 503".into());
            }
            let meta = ResponseMeta::new().with_content_length(bytes.len() as u64);
            Ok(Fetched::body(std::io::Cursor::new(bytes), meta))
        }
    })
}

/// Starts `CALLERS` concurrent `get_or_fetch` calls and waits until one is fetching and all
/// the others have joined it.
async fn start_callers<F>(
    cache: &DownloadCache,
    request: &DownloadRequest,
    fetcher: &F,
    calls: &AtomicUsize,
) -> tokio::task::JoinSet<Result<(Source, Vec<u8>), Error>>
where
    F: dunite_download::Fetcher + Clone + 'static,
{
    let coalesced_before = cache.download_stats().coalesced;
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..CALLERS {
        let (cache, request, fetcher) = (cache.clone(), request.clone(), fetcher.clone());
        callers.spawn(async move {
            let mut download = cache.get_or_fetch(&request, &fetcher).await?;
            Ok((download.source(), read_all(&mut download).await))
        });
    }
    eventually(Duration::from_secs(30), || async {
        cache.download_stats().coalesced - coalesced_before == (CALLERS - 1) as u64
    })
    .await;
    assert_eq!(calls.load(Ordering::SeqCst), 1, "one fetch for {CALLERS} concurrent callers");
    callers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_for_one_url_share_one_fetch() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 10 << 20).await;
    let (digest, bytes) = content(1, 200 * 1024);
    let (calls, gate) = (Arc::new(AtomicUsize::new(0)), Arc::new(Semaphore::new(0)));
    let fetcher = gated(calls.clone(), gate.clone(), bytes.clone(), false);
    let request = DownloadRequest::new(url("shared.bin")).with_sha256(digest);

    let callers = start_callers(&cache, &request, &fetcher, &calls).await;
    gate.add_permits(1);
    for result in callers.join_all().await {
        let (source, got) = result.unwrap();
        assert_eq!(source, Source::Fetched);
        assert_eq!(got, bytes);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(cache.stats().entries.stores, 1);
    assert_eq!(cache.total_bytes().await.unwrap(), bytes.len() as u64);

    // And the next call is a hit.
    gate.add_permits(1);
    let download = cache.get_or_fetch(&request, &fetcher).await.unwrap();
    assert_eq!(download.source(), Source::Hit);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    check_consistency(cache.entries().entries(), dir.path()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_in_the_shared_fetch_reaches_every_caller_and_the_next_call_fetches_again() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 10 << 20).await;
    let (_, bytes) = content(2, 50 * 1024);
    let (calls, gate) = (Arc::new(AtomicUsize::new(0)), Arc::new(Semaphore::new(0)));
    let fetcher = gated(calls.clone(), gate.clone(), bytes.clone(), true);
    let request = DownloadRequest::new(url("flaky.bin"));

    let callers = start_callers(&cache, &request, &fetcher, &calls).await;
    gate.add_permits(1);
    let messages: Vec<String> = callers
        .join_all()
        .await
        .into_iter()
        .map(|result| match result {
            Err(error @ Error::Fetch { .. }) => {
                let source = std::error::Error::source(&error).map(ToString::to_string);
                assert_eq!(source.as_deref(), Some("upstream said 503"));
                error.to_string()
            }
            other => panic!("expected the shared fetch error, got {other:?}"),
        })
        .collect();
    assert_eq!(messages.len(), CALLERS);
    assert!(messages.iter().all(|m| *m == messages[0]), "{messages:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(cache.download_stats().failed, 1);
    assert_eq!(cache.total_bytes().await.unwrap(), 0);
    assert!(!cache.contains(request.url()).await.unwrap());
    assert_eq!(disk_usage(dir.path()), DiskUsage::default());

    // The failed fetch left the single-flight table: the next call fetches again.
    gate.add_permits(1);
    let mut download = cache.get_or_fetch(&request, &fetcher).await.unwrap();
    assert_eq!(download.source(), Source::Fetched);
    assert_eq!(read_all(&mut download).await, bytes);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    check_consistency(cache.entries().entries(), dir.path()).await.unwrap();
}

/// The caller that started a fetch goes away: the fetch still completes and is cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_outlives_the_caller_that_started_it() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 10 << 20).await;
    let (_, bytes) = content(3, 10 * 1024);
    let (calls, gate) = (Arc::new(AtomicUsize::new(0)), Arc::new(Semaphore::new(0)));
    let fetcher = gated(calls.clone(), gate.clone(), bytes.clone(), false);
    let request = DownloadRequest::new(url("abandoned.bin"));

    let caller = {
        let (cache, request, fetcher) = (cache.clone(), request.clone(), fetcher.clone());
        tokio::spawn(async move { cache.get_or_fetch(&request, &fetcher).await.map(|_| ()) })
    };
    eventually(Duration::from_secs(30), || async { calls.load(Ordering::SeqCst) == 1 }).await;
    caller.abort();
    assert!(caller.await.unwrap_err().is_cancelled());
    gate.add_permits(1);
    // `info` is `Some` once the record is complete (its sha256 recorded).
    eventually(Duration::from_secs(30), || async { cache.info(request.url()).await.unwrap().is_some() })
        .await;

    let mut download = cache.get_or_fetch(&request, &fetcher).await.unwrap();
    assert_eq!(download.source(), Source::Hit);
    assert_eq!(read_all(&mut download).await, bytes);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// Bytes verified but not stored (the database lost the commit) are a typed error for
/// `get_or_fetch`, after one fetch: not a look for an entry that is not there, fetched again
/// until `Vanished` (found by review; failed before the fill said why it did not store).
#[tokio::test]
async fn bytes_the_database_could_not_record_are_its_error_after_one_fetch() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 1 << 20).await;
    cache.entries().entries().faults().lose_commits(100);
    let calls = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(100));
    let (_, bytes) = content(3, 10_000);
    let fetcher = gated(Arc::clone(&calls), gate, bytes, false);
    let error = cache.get_or_fetch(&DownloadRequest::new(url("lost")), &fetcher).await.unwrap_err();
    assert!(matches!(&error, Error::Cache(dunite_core::Error::Database { .. })), "{error:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 1, "one fetch");
}

/// A miss reads the metadata once: the fill starts from what the look-up found instead of
/// reading it again (a round trip to a database that may be far away). Before, the fill
/// looked again: two misses counted per miss.
#[tokio::test]
async fn a_miss_reads_the_metadata_once() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 1 << 20).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let (_, bytes) = content(4, 5_000);
    let fetcher = gated(Arc::clone(&calls), Arc::new(Semaphore::new(100)), bytes, false);
    let before = cache.stats().entries;
    cache.get_or_fetch(&DownloadRequest::new(url("once")), &fetcher).await.unwrap();
    let after = cache.stats().entries;
    assert_eq!(after.misses - before.misses, 1, "{after:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}
