//! The contract suite of `dunite_testkit::contract`, run for the raw `EntryCache`.
//!
//! The cache kinds wrap `EntryCache`; running the suite on it too shows whether a broken item
//! is the core's or the wrapper's. An item's slot is a key (`entry-<slot>`), a new version
//! replaces its content (`OnConflict::Replace`, the default), and the stored metadata is the
//! content's SHA-256 (hex), as a cache kind would record it. A verified item states its
//! SHA-256; every store states its size.

use std::path::Path;

use dunite_core::{
    CacheOptions, CacheStats, ContentDigest, Database, DigestAlgorithm, EntryCache, Error, EvictionPolicy,
    Expected, OnConflict, PassReport,
};
use dunite_testkit::contract::{Bad, ContractCache, Item, Put, Read};
use dunite_testkit::{CutAfter, MustNotRead};
use tokio::io::AsyncReadExt as _;

/// The raw entry cache under contract.
#[derive(Debug, Clone)]
pub struct Entries(EntryCache);

/// `item`'s key.
fn key(item: &Item) -> String {
    format!("entry-{}", item.slot)
}

impl ContractCache for Entries {
    type Key = String;
    type Error = Error;

    const NAMESPACE: &'static str = "contract";
    const ON_CONFLICT: OnConflict = OnConflict::Replace;

    async fn open(dir: &Path, database: Database, policy: EvictionPolicy, _stale: bool) -> Self {
        let options = CacheOptions::new(dir, Self::NAMESPACE, policy).with_database(database);
        Self(EntryCache::open(options).await.unwrap())
    }

    fn key_string(item: &Item) -> String {
        key(item)
    }

    async fn put(&self, item: &Item) -> Result<Put<String>, Error> {
        let (key, bytes) = (key(item), item.bytes());
        let mut expected = Expected::new().with_size(bytes.len() as u64);
        if item.verified {
            expected = expected.with_digest(item.sha256());
        }
        let stored = self.0.store_with_meta(&key, &bytes[..], &expected, ContentDigest::hex).await?;
        Ok(Put { key, sha256: stored.digest, outcome: Some(stored.outcome) })
    }

    async fn put_bad(&self, item: &Item, bad: Bad) -> (String, Result<(), Error>) {
        let (key, bytes, size) = (key(item), item.bytes(), item.size as u64);
        let sized = |size| Expected::new().with_size(size);
        let meta = ContentDigest::hex;
        let result = match bad {
            Bad::WrongDigest => {
                let expected = sized(size).with_digest(item.sha256());
                self.0.store_with_meta(&key, &item.other().bytes()[..], &expected, meta).await
            }
            Bad::DeclaredSize(declared) => {
                self.0.store_with_meta(&key, &bytes[..], &sized(declared), meta).await
            }
            Bad::Cut { good } => {
                self.0.store_with_meta(&key, CutAfter::new(bytes, good), &sized(size), meta).await
            }
            Bad::OverCap { declared: true } => {
                self.0.store_with_meta(&key, MustNotRead, &sized(size), meta).await
            }
            Bad::OverCap { declared: false } => {
                self.0.store_with_meta(&key, &bytes[..], &Expected::new(), meta).await
            }
        };
        (key, result.map(drop))
    }

    async fn open_entry(&self, key: &String) -> Result<bool, Error> {
        Ok(self.0.open_entry(key).await?.is_some())
    }

    async fn read(&self, key: &String) -> Result<Option<Read>, Error> {
        let Some(mut entry) = self.0.open_entry(key).await? else { return Ok(None) };
        let mut bytes = Vec::new();
        entry.file.read_to_end(&mut bytes).await.unwrap();
        let recorded = hex::decode(&entry.info.meta).unwrap();
        let sha256 = ContentDigest::from_bytes(DigestAlgorithm::Sha256, recorded).unwrap();
        Ok(Some(Read { bytes, size: entry.info.size, sha256 }))
    }

    async fn contains(&self, key: &String) -> Result<bool, Error> {
        self.0.contains(key).await
    }

    async fn remove(&self, key: &String) -> Result<Option<u64>, Error> {
        self.0.remove(key).await
    }

    async fn total_bytes(&self) -> Result<u64, Error> {
        self.0.total_bytes().await
    }

    async fn entry_count(&self) -> Result<u64, Error> {
        self.0.len().await
    }

    async fn evict_now(&self) -> Result<PassReport, Error> {
        self.0.evict_if_over_cap().await
    }

    fn stats(&self) -> CacheStats {
        self.0.stats()
    }

    fn entry_cache(&self) -> &EntryCache {
        &self.0
    }

    fn as_core(error: &Error) -> Option<&Error> {
        Some(error)
    }
}

/// Bursts of concurrent stores.
mod burst {
    use dunite_testkit::contract::burst;

    use super::Entries;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn entry_cache_burst_coalesces_into_few_eviction_passes_and_converges() {
        burst::burst_of_concurrent_stores_coalesces_into_few_eviction_passes_and_converges::<Entries>().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_stores_of_one_key_count_once() {
        burst::concurrent_stores_of_one_key_count_once::<Entries>().await;
    }
}

// The pool-of-two and invariants items run for the cache kinds (`dunite-oci`,
// `dunite-download`), which drive this same entry store: running them here too cost CI half a
// minute and added nothing the kinds' runs do not check.

/// Bad input stores nothing.
mod bad_input {
    use dunite_testkit::contract::bad_input;

    use super::Entries;

    #[tokio::test]
    async fn a_digest_mismatch_stores_nothing() {
        bad_input::a_digest_mismatch_stores_nothing::<Entries>().await;
    }

    #[tokio::test]
    async fn size_mismatches_store_nothing() {
        bad_input::size_mismatches_store_nothing::<Entries>().await;
    }

    #[tokio::test]
    async fn a_cut_stream_stores_nothing() {
        bad_input::a_cut_stream_stores_nothing::<Entries>().await;
    }

    #[tokio::test]
    async fn an_entry_over_the_cap_is_refused_before_it_evicts_anything() {
        bad_input::an_entry_over_the_cap_is_refused_before_it_evicts_anything::<Entries>().await;
    }
}
