//! The contract suite of `dunite_testkit::contract`, run for the download cache.
//!
//! An item's slot is a URL (`https://example.com/file-<slot>`) and its version the content
//! the upstream serves there; a store serves it upstream (with an `ETag`) and fetches it
//! through, stating its SHA-256 when the item is verified. Bad stores go through fetchers
//! that send the wrong bytes, a wrong `Content-Length` or a body cut short.

use std::path::Path;
use std::time::Duration;

use dunite_core::{CacheStats, Database, EntryCache, EvictionPolicy, OnConflict, PassReport};
use dunite_download::{
    DownloadCache, DownloadRequest, Error, FetchError, Fetched, ResponseMeta, UrlKey, fetch_fn,
};
use dunite_testkit::contract::{Bad, ContractCache, Item, Put, Read};
use dunite_testkit::{CutAfter, MustNotRead};

use crate::{HOUR, Upstream, read_all, url, verified_request};

/// The download cache under contract, with the upstream its stores fetch from.
#[derive(Debug, Clone)]
pub struct Downloads {
    cache: DownloadCache,
    upstream: Upstream,
    stale: bool,
}

/// The URL of `item`'s slot.
fn key(item: &Item) -> UrlKey {
    url(&format!("file-{}", item.slot))
}

impl Downloads {
    /// Fetch `item`'s URL through a fetcher answering a body made by `body`, with
    /// `content_length` when given.
    async fn fetch_with<B, F>(&self, item: &Item, body: F, content_length: Option<u64>) -> Result<(), Error>
    where
        F: Fn() -> B + Clone + Send + Sync + 'static,
        B: tokio::io::AsyncRead + Send + Unpin + 'static,
    {
        let fetcher = fetch_fn(move |_| {
            let body = body();
            async move {
                let mut meta = ResponseMeta::new();
                if let Some(length) = content_length {
                    meta = meta.with_content_length(length);
                }
                Ok::<_, FetchError>(Fetched::body(body, meta))
            }
        });
        self.cache.get_or_fetch(&DownloadRequest::new(key(item)), &fetcher).await.map(drop)
    }
}

impl ContractCache for Downloads {
    type Key = UrlKey;
    type Error = Error;

    const NAMESPACE: &'static str = dunite_download::NAMESPACE;
    const ON_CONFLICT: OnConflict = OnConflict::Replace;

    async fn open(dir: &Path, database: Database, policy: EvictionPolicy, stale: bool) -> Self {
        let freshness = if stale { Duration::ZERO } else { HOUR };
        let options = DownloadCache::options(dir, policy).with_database(database);
        let cache = DownloadCache::new(options, freshness).await.unwrap();
        Self { cache, upstream: Upstream::default(), stale }
    }

    fn key_string(item: &Item) -> String {
        key(item).as_str().to_owned()
    }

    async fn put(&self, item: &Item) -> Result<Put<UrlKey>, Error> {
        let (key, bytes) = (key(item), item.bytes());
        self.upstream.serve(&key, bytes.clone(), Some(&item.sha256().hex()));
        let request =
            if item.verified { verified_request(&key, &bytes) } else { DownloadRequest::new(key.clone()) };
        let download = self.cache.get_or_fetch(&request, &self.upstream).await?;
        Ok(Put { key, sha256: download.info().sha256().clone(), outcome: None })
    }

    async fn put_bad(&self, item: &Item, bad: Bad) -> (UrlKey, Result<(), Error>) {
        let (bytes, size) = (item.bytes(), item.size as u64);
        let result = match bad {
            Bad::WrongDigest => {
                let upstream = Upstream::default();
                upstream.serve(&key(item), item.other().bytes(), None);
                let request = DownloadRequest::new(key(item)).with_sha256(item.sha256());
                self.cache.get_or_fetch(&request, &upstream).await.map(drop)
            }
            Bad::DeclaredSize(declared) => {
                self.fetch_with(item, move || std::io::Cursor::new(bytes.clone()), Some(declared)).await
            }
            Bad::Cut { good } => {
                self.fetch_with(item, move || CutAfter::new(bytes.clone(), good), Some(size)).await
            }
            Bad::OverCap { declared: true } => self.fetch_with(item, || MustNotRead, Some(size)).await,
            Bad::OverCap { declared: false } => {
                self.fetch_with(item, move || std::io::Cursor::new(bytes.clone()), None).await
            }
        };
        (key(item), result)
    }

    async fn open_entry(&self, key: &UrlKey) -> Result<bool, Error> {
        Ok(self.cache.open(key).await?.is_some())
    }

    async fn read(&self, key: &UrlKey) -> Result<Option<Read>, Error> {
        let Some(mut download) = self.cache.open(key).await? else { return Ok(None) };
        let bytes = read_all(&mut download).await;
        let info = download.info();
        Ok(Some(Read { bytes, size: info.size(), sha256: info.sha256().clone() }))
    }

    async fn contains(&self, key: &UrlKey) -> Result<bool, Error> {
        self.cache.contains(key).await
    }

    async fn remove(&self, key: &UrlKey) -> Result<Option<u64>, Error> {
        self.cache.remove(key).await
    }

    async fn total_bytes(&self) -> Result<u64, Error> {
        self.cache.total_bytes().await
    }

    async fn entry_count(&self) -> Result<u64, Error> {
        self.cache.len().await
    }

    async fn evict_now(&self) -> Result<PassReport, Error> {
        self.cache.evict_if_over_cap().await
    }

    fn stats(&self) -> CacheStats {
        self.cache.stats()
    }

    fn entry_cache(&self) -> &EntryCache {
        self.cache.entries()
    }

    fn as_core(error: &Error) -> Option<&dunite_core::Error> {
        error.as_cache()
    }

    fn source_calls(&self) -> Option<u64> {
        Some(self.upstream.calls() as u64)
    }

    /// A fresh entry may answer a request that states no SHA-256 with older content.
    fn serves_what_was_put(&self, item: &Item) -> bool {
        item.verified || self.stale
    }
}

/// Bursts of concurrent fetch-throughs.
mod burst {
    use dunite_testkit::contract::burst;

    use super::Downloads;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn burst_of_concurrent_stores_coalesces_into_few_eviction_passes_and_converges() {
        burst::burst_of_concurrent_stores_coalesces_into_few_eviction_passes_and_converges::<Downloads>()
            .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_fetches_of_one_url_count_once() {
        burst::concurrent_stores_of_one_key_count_once::<Downloads>().await;
    }
}

/// The production failure: a burst of fetch-throughs against a pool of two.
mod pool {
    use dunite_testkit::TestBackend;
    use dunite_testkit::contract::pool;

    use super::Downloads;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn download_cache_survives_a_burst_on_a_pool_of_two() {
        pool::survives_a_burst_on_a_pool_of_two::<Downloads>(TestBackend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn download_cache_survives_a_burst_on_a_pool_of_two_on_postgres() {
        pool::survives_a_burst_on_a_pool_of_two::<Downloads>(TestBackend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn legacy_spawn_per_store_hits_pool_timeouts() {
        pool::legacy_spawn_per_store_hits_pool_timeouts::<Downloads>().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn legacy_spawn_per_store_fails_on_postgres_too() {
        pool::legacy_spawn_per_store_fails_on_postgres_too::<Downloads>().await;
    }
}

/// Random sequences keep the invariants.
mod invariants {
    use dunite_testkit::contract::invariants;
    use dunite_testkit::{TestBackend, proptest_cases};

    use super::Downloads;

    #[test]
    fn random_sequences_keep_the_invariants() {
        invariants::random_sequences_keep_the_invariants::<Downloads>(
            TestBackend::Sqlite,
            proptest_cases(32),
        );
    }

    #[test]
    fn random_sequences_keep_the_invariants_on_postgres() {
        invariants::random_sequences_keep_the_invariants::<Downloads>(
            TestBackend::Postgres,
            proptest_cases(32),
        );
    }
}

/// Bad content caches nothing.
mod bad_input {
    use dunite_testkit::contract::bad_input;

    use super::Downloads;

    #[tokio::test]
    async fn checksum_mismatch_caches_nothing() {
        bad_input::a_digest_mismatch_stores_nothing::<Downloads>().await;
    }

    #[tokio::test]
    async fn a_wrong_content_length_caches_nothing() {
        bad_input::size_mismatches_store_nothing::<Downloads>().await;
    }

    #[tokio::test]
    async fn a_body_cut_mid_stream_caches_nothing() {
        bad_input::a_cut_stream_stores_nothing::<Downloads>().await;
    }

    #[tokio::test]
    async fn a_download_over_the_cap_is_refused_before_it_evicts_anything() {
        bad_input::an_entry_over_the_cap_is_refused_before_it_evicts_anything::<Downloads>().await;
    }
}
