//! Test and benchmark helpers shared by dunite's crates.
//!
//! This crate is a dev-dependency only. It keeps alive, for tests and benchmarks, the
//! pattern dunite replaces ([`legacy_evict_if_over_cap`]), and checks that a cache's rows,
//! accounted total and files on disk agree ([`check_consistency`]).

#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

use std::path::Path;

use dunite_core::{EntryStore, EvictionPass, EvictionPolicy, EvictionStore, Removal};

/// The legacy eviction: one full pass, on its own connection, meant to be
/// `tokio::spawn`ed after **every** store. Under a burst this is N concurrent passes wanting
/// N connections; dunite's `DebouncedEvictor` exists to replace it. Test and bench code only.
///
/// # Errors
///
/// The store's error, `PoolTimedOut` among them when the pool is exhausted.
pub async fn legacy_evict_if_over_cap<S: EvictionStore>(
    store: S,
    policy: EvictionPolicy,
) -> Result<(), S::Error> {
    let mut pass = store.begin_pass().await?;
    let mut total = pass.total_size_bytes().await?;
    if total <= policy.max_bytes() {
        return Ok(());
    }
    while total > policy.low_watermark() {
        let victims = pass.least_recently_used(policy.batch_size()).await?;
        if victims.is_empty() {
            break;
        }
        for victim in &victims {
            if let Removal::Removed { bytes } = pass.remove(victim).await? {
                total = total.saturating_sub(bytes);
            }
        }
    }
    Ok(())
}

/// What a cache directory holds on disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskUsage {
    /// Bytes of payload files under `data/`.
    pub payload_bytes: u64,
    /// Payload files under `data/`.
    pub payload_files: u64,
    /// Files under `tmp/`.
    pub temp_files: u64,
}

/// Walk a cache directory (`data/<shard>/<file>` and `tmp/<file>`).
///
/// # Panics
///
/// If the directory cannot be read.
#[must_use]
pub fn disk_usage(dir: &Path) -> DiskUsage {
    let mut usage = DiskUsage::default();
    let data = dir.join("data");
    if data.exists() {
        for shard in std::fs::read_dir(&data).expect("read data dir") {
            let shard = shard.expect("read data dir").path();
            for file in std::fs::read_dir(&shard).expect("read shard") {
                let meta = file.expect("read shard").metadata().expect("stat payload");
                usage.payload_bytes += meta.len();
                usage.payload_files += 1;
            }
        }
    }
    let tmp = dir.join("tmp");
    if tmp.exists() {
        usage.temp_files = std::fs::read_dir(&tmp).expect("read tmp dir").count() as u64;
    }
    usage
}

/// Check that the accounted total and count equal the sum and count of the live rows, and
/// that those equal the payload files on disk, with no temporary file and no row being
/// removed. Returns the total.
///
/// # Errors
///
/// A description of the first disagreement.
pub async fn check_consistency(store: &EntryStore, dir: &Path) -> Result<u64, String> {
    let pool = store.database().pool();
    let ns = store.namespace();
    let (sum, count): (i64, i64) = sqlx::query_as(
        "SELECT COALESCE(SUM(size), 0), COUNT(*) FROM entries WHERE namespace = ? AND state = 0",
    )
    .bind(ns)
    .fetch_one(pool)
    .await
    .map_err(|e| e.to_string())?;
    let (marked,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM entries WHERE namespace = ? AND state <> 0")
        .bind(ns)
        .fetch_one(pool)
        .await
        .map_err(|e| e.to_string())?;
    let accounted = store.total_bytes().await.map_err(|e| e.to_string())?;
    let entries = store.len().await.map_err(|e| e.to_string())?;
    let disk = disk_usage(dir);
    let sum = u64::try_from(sum).map_err(|e| e.to_string())?;
    let count = u64::try_from(count).map_err(|e| e.to_string())?;
    if marked != 0 {
        return Err(format!("{marked} rows left marked for removal"));
    }
    if accounted != sum || entries != count {
        return Err(format!("accounted {accounted} bytes / {entries} entries, rows say {sum} / {count}"));
    }
    if disk.payload_bytes != sum || disk.payload_files != count {
        return Err(format!("rows say {sum} bytes in {count} files, disk has {disk:?}"));
    }
    if disk.temp_files != 0 {
        return Err(format!("{} temporary files left", disk.temp_files));
    }
    Ok(sum)
}

/// Deterministic pseudo-random bytes (xorshift), so tests need no RNG dependency.
#[must_use]
pub fn pseudo_random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[0]
        })
        .collect()
}
