//! The contract suite of `dunite_testkit::contract`, run for the blob cache.
//!
//! A blob's key is its digest, so an item's slot and version only choose its bytes; a blob is
//! always verified against its digest, and `Item::verified` chooses whether its size is
//! declared too (`store_with_size`) or not (`store`).

use std::path::Path;

use dunite_core::{CacheStats, Database, EntryCache, EvictionPolicy, OnConflict, PassReport};
use dunite_oci::{BlobCache, Digest, Error};
use dunite_testkit::contract::{Bad, ContractCache, Item, Put, Read};
use dunite_testkit::{CutAfter, MustNotRead};
use tokio::io::AsyncReadExt as _;

/// The blob cache under contract.
#[derive(Debug, Clone)]
pub struct Blobs(BlobCache);

/// The digest of `item`'s bytes.
fn digest(item: &Item) -> Digest {
    Digest::sha256_of(&item.bytes())
}

impl ContractCache for Blobs {
    type Key = Digest;
    type Error = Error;

    const NAMESPACE: &'static str = dunite_oci::NAMESPACE;
    const ON_CONFLICT: OnConflict = OnConflict::KeepExisting;

    async fn open(dir: &Path, database: Database, policy: EvictionPolicy, _stale: bool) -> Self {
        Self(BlobCache::new(BlobCache::options(dir, policy).with_database(database)).await.unwrap())
    }

    fn key_string(item: &Item) -> String {
        digest(item).to_string()
    }

    async fn put(&self, item: &Item) -> Result<Put<Digest>, Error> {
        let bytes = item.bytes();
        let digest = Digest::sha256_of(&bytes);
        let stored = if item.verified {
            self.0.store_with_size(&digest, bytes.len() as u64, &bytes[..]).await?
        } else {
            self.0.store(&digest, &bytes[..]).await?
        };
        Ok(Put { key: digest, sha256: stored.digest, outcome: Some(stored.outcome) })
    }

    async fn put_bad(&self, item: &Item, bad: Bad) -> (Digest, Result<(), Error>) {
        let (digest, bytes, size) = (digest(item), item.bytes(), item.size as u64);
        let result = match bad {
            Bad::WrongDigest => self.0.store_with_size(&digest, size, &item.other().bytes()[..]).await,
            Bad::DeclaredSize(declared) => self.0.store_with_size(&digest, declared, &bytes[..]).await,
            Bad::Cut { good } => self.0.store_with_size(&digest, size, CutAfter::new(bytes, good)).await,
            Bad::OverCap { declared: true } => self.0.store_with_size(&digest, size, MustNotRead).await,
            Bad::OverCap { declared: false } => self.0.store(&digest, &bytes[..]).await,
        };
        (digest, result.map(drop))
    }

    async fn open_entry(&self, key: &Digest) -> Result<bool, Error> {
        Ok(self.0.open(key).await?.is_some())
    }

    async fn read(&self, key: &Digest) -> Result<Option<Read>, Error> {
        let Some(mut blob) = self.0.open(key).await? else { return Ok(None) };
        let mut bytes = Vec::new();
        blob.file_mut().read_to_end(&mut bytes).await.unwrap();
        Ok(Some(Read { bytes, size: blob.size(), sha256: key.content_digest().clone() }))
    }

    async fn contains(&self, key: &Digest) -> Result<bool, Error> {
        self.0.contains(key).await
    }

    async fn remove(&self, key: &Digest) -> Result<Option<u64>, Error> {
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
        self.0.entries()
    }

    fn as_core(error: &Error) -> Option<&dunite_core::Error> {
        error.as_cache()
    }
}

/// Bursts of concurrent stores.
mod burst {
    use dunite_testkit::contract::burst;

    use super::Blobs;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn burst_of_concurrent_stores_coalesces_into_few_eviction_passes_and_converges() {
        burst::burst_of_concurrent_stores_coalesces_into_few_eviction_passes_and_converges::<Blobs>().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_stores_of_one_digest_count_once() {
        burst::concurrent_stores_of_one_key_count_once::<Blobs>().await;
    }
}

/// The production failure: a burst against a pool of two.
mod pool {
    use dunite_testkit::TestBackend;
    use dunite_testkit::contract::pool;

    use super::Blobs;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn blob_cache_survives_a_burst_on_a_pool_of_two() {
        pool::survives_a_burst_on_a_pool_of_two::<Blobs>(TestBackend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn blob_cache_survives_a_burst_on_a_pool_of_two_on_postgres() {
        pool::survives_a_burst_on_a_pool_of_two::<Blobs>(TestBackend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn legacy_spawn_per_store_hits_pool_timeouts() {
        pool::legacy_spawn_per_store_hits_pool_timeouts::<Blobs>().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn legacy_spawn_per_store_fails_on_postgres_too() {
        pool::legacy_spawn_per_store_fails_on_postgres_too::<Blobs>().await;
    }
}

/// Random sequences keep the invariants.
mod invariants {
    use dunite_testkit::contract::invariants;
    use dunite_testkit::{TestBackend, proptest_cases};

    use super::Blobs;

    #[test]
    fn random_sequences_keep_the_invariants() {
        invariants::random_sequences_keep_the_invariants::<Blobs>(TestBackend::Sqlite, proptest_cases(32));
    }

    #[test]
    fn random_sequences_keep_the_invariants_on_postgres() {
        invariants::random_sequences_keep_the_invariants::<Blobs>(TestBackend::Postgres, proptest_cases(32));
    }
}

/// Bad input stores nothing.
mod bad_input {
    use dunite_testkit::contract::bad_input;

    use super::Blobs;

    #[tokio::test]
    async fn digest_mismatch_stores_nothing() {
        bad_input::a_digest_mismatch_stores_nothing::<Blobs>().await;
    }

    #[tokio::test]
    async fn size_mismatches_store_nothing() {
        bad_input::size_mismatches_store_nothing::<Blobs>().await;
    }

    #[tokio::test]
    async fn a_cut_stream_stores_nothing() {
        bad_input::a_cut_stream_stores_nothing::<Blobs>().await;
    }

    #[tokio::test]
    async fn a_blob_over_the_cap_is_refused_before_it_evicts_anything() {
        bad_input::an_entry_over_the_cap_is_refused_before_it_evicts_anything::<Blobs>().await;
    }
}
