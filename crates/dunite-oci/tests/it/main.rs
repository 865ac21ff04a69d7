//! Integration tests of the OCI blob cache, one binary with a module per concern.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests report failure by panicking")]

mod bad_input;
mod contract;
mod crash;
mod fills;
mod manifests;
mod pg_restart;
mod readers;
mod shared;
mod tags;

use std::path::Path;

use dunite_core::{DatabaseOptions, EvictionPolicy};
use dunite_oci::{BlobCache, Digest};
use dunite_testkit::pseudo_random_bytes;
use tokio::io::AsyncReadExt as _;

/// A blob and its digest.
pub fn blob(seed: u64, size: usize) -> (Digest, Vec<u8>) {
    let bytes = pseudo_random_bytes(seed, size);
    (Digest::sha256_of(&bytes), bytes)
}

/// A cache in `dir` with cap `max_bytes` and no safety tick (tests drive every pass).
pub async fn open(dir: &Path, max_bytes: u64) -> BlobCache {
    open_with(dir, EvictionPolicy::new(max_bytes).without_safety_tick(), DatabaseOptions::new()).await
}

pub async fn open_with(dir: &Path, policy: EvictionPolicy, db: DatabaseOptions) -> BlobCache {
    BlobCache::new(BlobCache::options(dir, policy).with_database_options(db)).await.unwrap()
}

/// Read a cached blob whole and check it against its digest.
pub async fn read_verified(cache: &BlobCache, digest: &Digest) -> Option<Vec<u8>> {
    let mut blob = cache.open(digest).await.unwrap()?;
    let mut bytes = Vec::new();
    blob.file_mut().read_to_end(&mut bytes).await.unwrap();
    assert_eq!(bytes.len() as u64, blob.size());
    assert_eq!(&Digest::sha256_of(&bytes), digest, "cached bytes differ from their digest");
    Some(bytes)
}

pub use dunite_testkit::eventually;
