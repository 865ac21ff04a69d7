//! Integration tests of the download cache, one binary with a module per concern.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests report failure by panicking")]

mod bad_input;
mod contract;
mod revalidation;
mod single_flight;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use dunite_core::{ContentDigest, DatabaseOptions, DigestAlgorithm, EvictionPolicy};
use dunite_download::{
    DownloadCache, DownloadRequest, FetchError, FetchRequest, Fetched, Fetcher, ResponseMeta, UrlKey,
    Validators,
};
use dunite_testkit::pseudo_random_bytes;
use tokio::io::AsyncReadExt as _;

/// A file's content and its SHA-256.
pub fn content(seed: u64, size: usize) -> (ContentDigest, Vec<u8>) {
    let bytes = pseudo_random_bytes(seed, size);
    (sha256(&bytes), bytes)
}

pub fn sha256(bytes: &[u8]) -> ContentDigest {
    ContentDigest::of(DigestAlgorithm::Sha256, bytes)
}

/// `https://example.com/<name>` as a key.
pub fn url(name: &str) -> UrlKey {
    format!("https://example.com/{name}").parse().unwrap()
}

/// A cache in `dir` with cap `max_bytes`, no safety tick (tests drive every pass) and
/// entries fresh for an hour.
pub async fn open(dir: &Path, max_bytes: u64) -> DownloadCache {
    open_with(dir, EvictionPolicy::new(max_bytes).without_safety_tick(), DatabaseOptions::new(), HOUR).await
}

pub const HOUR: Duration = Duration::from_secs(3600);

pub async fn open_with(
    dir: &Path,
    policy: EvictionPolicy,
    db: DatabaseOptions,
    freshness: Duration,
) -> DownloadCache {
    DownloadCache::new(DownloadCache::options(dir, policy).with_database_options(db), freshness)
        .await
        .unwrap()
}

/// Open a cached download (whatever its age), read it whole and check it against its
/// recorded size and SHA-256.
pub async fn read_verified(cache: &DownloadCache, url: &UrlKey) -> Option<Vec<u8>> {
    let mut download = cache.open(url).await.unwrap()?;
    let mut bytes = Vec::new();
    download.file_mut().read_to_end(&mut bytes).await.unwrap();
    assert_eq!(bytes.len() as u64, download.info().size());
    assert_eq!(&sha256(&bytes), download.info().sha256(), "cached bytes differ from their sha256");
    Some(bytes)
}

/// Read a download's content whole.
pub async fn read_all(download: &mut dunite_download::Download) -> Vec<u8> {
    let mut bytes = Vec::new();
    download.file_mut().read_to_end(&mut bytes).await.unwrap();
    bytes
}

/// A request for `url` expecting `bytes`.
pub fn verified_request(url: &UrlKey, bytes: &[u8]) -> DownloadRequest {
    DownloadRequest::new(url.clone()).with_sha256(sha256(bytes))
}

/// An in-memory upstream server: serves the files it is given, with their `ETag`, and
/// answers a conditional request whose `ETag` matches with "not modified". Counts what it is
/// asked and what it sends. Clones share it.
#[derive(Debug, Clone, Default)]
pub struct Upstream {
    inner: Arc<UpstreamInner>,
}

type Served = (Vec<u8>, Option<String>);

#[derive(Debug, Default)]
struct UpstreamInner {
    /// URL -> (body, `ETag`).
    files: Mutex<HashMap<String, Served>>,
    calls: AtomicUsize,
    bytes_sent: AtomicU64,
    validators_seen: Mutex<Vec<Option<Validators>>>,
}

impl Upstream {
    /// Serve `body` at `url`, with `etag` if given.
    pub fn serve(&self, url: &UrlKey, body: Vec<u8>, etag: Option<&str>) {
        self.inner.files.lock().unwrap().insert(url.to_string(), (body, etag.map(str::to_owned)));
    }

    /// Requests received.
    pub fn calls(&self) -> usize {
        self.inner.calls.load(Ordering::SeqCst)
    }

    /// Body bytes sent.
    pub fn bytes_sent(&self) -> u64 {
        self.inner.bytes_sent.load(Ordering::SeqCst)
    }

    /// The validators of every request, in order.
    pub fn validators_seen(&self) -> Vec<Option<Validators>> {
        self.inner.validators_seen.lock().unwrap().clone()
    }
}

#[async_trait]
impl Fetcher for Upstream {
    async fn fetch(&self, request: FetchRequest) -> Result<Fetched, FetchError> {
        let inner = &self.inner;
        inner.calls.fetch_add(1, Ordering::SeqCst);
        inner.validators_seen.lock().unwrap().push(request.validators().cloned());
        let Some((body, etag)) = inner.files.lock().unwrap().get(request.url().as_str()).cloned() else {
            return Err(format!("404 for {}", request.url()).into());
        };
        if let (Some(current), Some(sent)) = (&etag, request.validators().and_then(Validators::etag))
            && current == sent
        {
            return Ok(Fetched::not_modified());
        }
        inner.bytes_sent.fetch_add(body.len() as u64, Ordering::SeqCst);
        let mut meta = ResponseMeta::new().with_content_type("application/octet-stream");
        meta = meta.with_content_length(body.len() as u64);
        if let Some(etag) = etag {
            meta = meta.with_etag(etag);
        }
        Ok(Fetched::body(std::io::Cursor::new(body), meta))
    }
}

pub use dunite_testkit::eventually;
