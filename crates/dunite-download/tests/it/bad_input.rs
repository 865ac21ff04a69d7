//! Bad answers the download cache alone has: a failing fetcher, a confused "not modified", a
//! digest that is not SHA-256, a cached entry with another SHA-256, and keys with secrets in
//! logs. The bad content every cache refuses is `contract::bad_input`.

use dunite_core::{ContentDigest, DigestAlgorithm, Error as CoreError};
use dunite_download::{
    Download, DownloadCache, DownloadRequest, Error, FetchError, Fetched, Source, fetch_fn,
};
use dunite_testkit::{DiskUsage, check_consistency, disk_usage};

use crate::{Upstream, content, open, read_all, read_verified, url, verified_request};

async fn assert_nothing_stored(cache: &DownloadCache, dir: &std::path::Path) {
    assert_eq!(cache.total_bytes().await.unwrap(), 0);
    assert_eq!(cache.len().await.unwrap(), 0);
    assert_eq!(disk_usage(dir), DiskUsage::default());
    check_consistency(cache.entries().entries(), dir).await.unwrap();
}

fn core(result: Result<Download, Error>) -> CoreError {
    match result {
        Err(Error::Cache(e)) => e,
        other => panic!("expected a cache error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_fetcher_error_is_typed_and_caches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 1 << 20).await;
    let upstream = Upstream::default();
    let err = cache.get_or_fetch(&DownloadRequest::new(url("missing")), &upstream).await.unwrap_err();
    assert!(matches!(&err, Error::Fetch { url, .. } if url == "https://example.com/missing"), "{err}");
    assert!(std::error::Error::source(&err).unwrap().to_string().contains("404"));
    assert_eq!(cache.download_stats().failed, 1);
    assert_nothing_stored(&cache, dir.path()).await;
}

#[tokio::test]
async fn not_modified_to_an_unconditional_request_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 1 << 20).await;
    let fetcher = fetch_fn(|_| async { Ok::<_, FetchError>(Fetched::not_modified()) });
    let err = cache.get_or_fetch(&DownloadRequest::new(url("confused")), &fetcher).await.unwrap_err();
    assert!(matches!(err, Error::UnexpectedNotModified { .. }), "{err}");
    assert_nothing_stored(&cache, dir.path()).await;
}

#[tokio::test]
async fn an_expected_digest_that_is_not_sha256_is_refused_before_fetching() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 1 << 20).await;
    let upstream = Upstream::default();
    let request =
        DownloadRequest::new(url("x")).with_sha256(ContentDigest::of(DigestAlgorithm::Sha512, b"x"));
    let err = cache.get_or_fetch(&request, &upstream).await.unwrap_err();
    assert!(matches!(err, Error::UnsupportedDigest { algorithm: "sha512" }), "{err}");
    assert_eq!(upstream.calls(), 0);
    assert_nothing_stored(&cache, dir.path()).await;
}

/// A cached entry whose sha256 is not the one a request expects is a miss: fetched again,
/// verified, and replaced.
#[tokio::test]
async fn a_cached_entry_with_another_sha256_is_fetched_again() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 1 << 20).await;
    let upstream = Upstream::default();
    let key = url("moving.bin");
    let (_, old) = content(5, 3000);
    let (_, new) = content(6, 2000);
    upstream.serve(&key, old.clone(), None);
    let mut first = cache.get_or_fetch(&verified_request(&key, &old), &upstream).await.unwrap();
    upstream.serve(&key, new.clone(), None);

    // Still fresh, but it does not match what is asked for.
    let mut second = cache.get_or_fetch(&verified_request(&key, &new), &upstream).await.unwrap();
    assert_eq!(second.source(), Source::Fetched);
    assert_eq!(read_all(&mut second).await, new);
    assert_eq!(upstream.calls(), 2);
    // The reader of the replaced entry keeps its bytes.
    assert_eq!(read_all(&mut first).await, old);
    // Asking for the old content now fails: upstream no longer serves it. The entry stays.
    let err = core(cache.get_or_fetch(&verified_request(&key, &old), &upstream).await);
    assert!(matches!(err, CoreError::DigestMismatch { .. }), "{err}");
    assert_eq!(read_verified(&cache, &key).await.unwrap(), new);
    assert_eq!(cache.total_bytes().await.unwrap(), 2000);
    check_consistency(cache.entries().entries(), dir.path()).await.unwrap();
}

/// A log sink for one test: what a `tracing` subscriber writes, kept in memory.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A download's key is its URL, and a URL's query may carry a token: when the cache logs an
/// entry by its key (here, a payload deleted behind its back), it shows the URL redacted.
#[tokio::test]
async fn a_damaged_entry_is_logged_without_its_urls_token() {
    let logs = Captured::default();
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt().with_ansi(false).with_writer(move || sink.clone()).finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 1 << 20).await;
    let upstream = Upstream::default();
    let key: dunite_download::UrlKey = "https://example.com/f.tgz?token=SECRET".parse().unwrap();
    let (_, bytes) = content(7, 1000);
    upstream.serve(&key, bytes, None);
    cache.get_or_fetch(&DownloadRequest::new(key.clone()), &upstream).await.unwrap();
    let mut payloads = Vec::new();
    for shard in std::fs::read_dir(dir.path().join("data")).unwrap() {
        payloads.extend(std::fs::read_dir(shard.unwrap().path()).unwrap().map(|f| f.unwrap().path()));
    }
    assert_eq!(payloads.len(), 1, "{payloads:?}");
    std::fs::remove_file(&payloads[0]).unwrap();

    assert!(cache.open(&key).await.unwrap().is_none(), "a row without its file is a miss");
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(text.contains("entry without its payload file"), "{text}");
    assert!(text.contains("https://example.com/f.tgz?REDACTED"), "{text}");
    assert!(!text.contains("SECRET"), "{text}");
}
