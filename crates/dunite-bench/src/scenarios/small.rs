//! Scenario 3, small blobs: the store rate of many 4 KiB blobs at concurrency 64, against
//! the same temporary-file, write, fsync, rename (and directory fsync) sequence with no
//! database. Run for the OCI blob cache and for the download cache (a miss filled through
//! `get_or_fetch`).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dunite_core::EvictionPolicy;
use dunite_download::{DownloadCache, DownloadRequest, UrlKey};
use dunite_oci::{BlobCache, Digest};
use sha2::Digest as _;
use tokio::io::AsyncWriteExt as _;

use crate::payload::{GenReader, digest_of, upstream};
use crate::report::{Record, ms};
use crate::{Result, Settings};

const SIZE: usize = 4096;
const CONCURRENCY: usize = 64;
const TARGET: f64 = 0.7;

type Blobs = Arc<Vec<(Digest, Vec<u8>)>>;

pub async fn run(settings: Settings) -> Result<Vec<Record>> {
    let count = if settings.quick { 1_000 } else { 10_000 };
    let blobs: Blobs = Arc::new(
        (0..count)
            .map(|i| {
                let bytes = GenReader::to_vec(50_000_000 + i as u64, SIZE);
                (Digest::sha256_of(&bytes), bytes)
            })
            .collect(),
    );
    let dir = settings.tempdir()?;
    let base_root = Arc::new(dir.path().join("baseline"));
    for sub in ["tmp", "data"] {
        tokio::fs::create_dir_all(base_root.join(sub)).await?;
    }
    let base_op = {
        let blobs = blobs.clone();
        move |i| baseline_store(base_root.clone(), blobs.clone(), i)
    };

    let cache = BlobCache::new(BlobCache::options(dir.path().join("cache"), policy(count))).await?;
    let oci_op = {
        let (blobs, cache) = (blobs.clone(), cache.clone());
        move |i: usize| {
            let (blobs, cache) = (blobs.clone(), cache.clone());
            async move {
                let (digest, bytes) = &blobs[i];
                cache.store_with_size(digest, bytes.len() as u64, &bytes[..]).await?;
                Ok(())
            }
        }
    };

    // The download cache: each store is a miss filled through `get_or_fetch` from an
    // in-memory upstream (single flight, verification, metadata, then the same store).
    let urls = (0..count)
        .map(|i| Ok(UrlKey::parse(&format!("https://bench.example/small/blob-{i}"))?))
        .collect::<Result<Vec<_>>>()?;
    let fetcher = upstream(
        urls.iter()
            .zip(blobs.iter())
            .map(|(u, (_, b))| (u.as_str().to_owned(), Arc::new(b.clone())))
            .collect(),
    );
    let requests: Arc<Vec<DownloadRequest>> = Arc::new(
        urls.iter()
            .zip(blobs.iter())
            .map(|(url, (digest, _))| {
                DownloadRequest::new(url.clone()).with_sha256(digest.content_digest().clone())
            })
            .collect(),
    );
    let downloads = DownloadCache::new(
        DownloadCache::options(dir.path().join("downloads"), policy(count)),
        Duration::from_secs(3600),
    )
    .await?;
    let download_op = {
        let downloads = downloads.clone();
        move |i: usize| {
            let (downloads, requests, fetcher) = (downloads.clone(), requests.clone(), fetcher.clone());
            async move {
                downloads.get_or_fetch(&requests[i], &fetcher).await?;
                Ok(())
            }
        }
    };

    // Two halves, in opposite orders, so no variant always runs first or last.
    let half = count / 2;
    let (mut base, mut ours, mut download) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    base += drive(0..half, base_op.clone()).await?;
    ours += drive(0..half, oci_op.clone()).await?;
    download += drive(0..half, download_op.clone()).await?;
    download += drive(half..count, download_op).await?;
    ours += drive(half..count, oci_op).await?;
    base += drive(half..count, base_op).await?;

    for (what, stored) in [("blobs", cache.len().await?), ("downloads", downloads.len().await?)] {
        if stored != count as u64 {
            return Err(format!("small-blob: {stored} of {count} {what} stored").into());
        }
    }

    let rate = |d: Duration| count as f64 / d.as_secs_f64();
    let mut records = Vec::new();
    for (name, via, time) in [
        ("small-blob/oci/store-rate", "BlobCache::store_with_size", ours),
        ("small-blob/download/store-rate", "DownloadCache::get_or_fetch (miss)", download),
    ] {
        let ratio = rate(time) / rate(base);
        let mut r = Record::new(name, "tmp+write+fsync+rename, no DB");
        r.param("via", via)
            .param("blobs", count as u64)
            .param("blob_bytes", SIZE as u64)
            .param("concurrency", CONCURRENCY as u64);
        r.pair("stores/s", rate(time), rate(base))
            .pair("total time (ms)", ms(time), ms(base))
            .ratio("store rate, dunite / baseline", ratio)
            .target(format!(">= {TARGET} of baseline store rate (got {ratio:.3})"), ratio >= TARGET);
        records.push(r);
    }
    Ok(records)
}

fn policy(count: usize) -> EvictionPolicy {
    EvictionPolicy::new((count * SIZE * 4) as u64).without_safety_tick()
}

/// Run `op(i)` for every `i` in `range` on `CONCURRENCY` tasks; the wall time.
async fn drive<F, Fut>(range: std::ops::Range<usize>, op: F) -> Result<Duration>
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<()>> + Send,
{
    let (next, end) = (Arc::new(AtomicUsize::new(range.start)), range.end);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CONCURRENCY {
        let (next, op) = (next.clone(), op.clone());
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= end {
                    return Ok::<(), crate::BoxError>(());
                }
                op(i).await?;
            }
        });
    }
    for result in tasks.join_all().await {
        result?;
    }
    Ok(started.elapsed())
}

/// The cache's file sequence without its database: a temporary file, written while hashed,
/// verified, synced, renamed into a shard directory, and the directory synced.
async fn baseline_store(root: Arc<PathBuf>, blobs: Blobs, i: usize) -> Result<()> {
    let (digest, bytes) = &blobs[i];
    let tmp = root.join("tmp");
    let named =
        tokio::task::spawn_blocking(move || tempfile::Builder::new().prefix("store-").tempfile_in(&tmp))
            .await??;
    let (file, temp) = named.into_parts();
    let mut file = tokio::fs::File::from_std(file);
    let mut hasher = sha2::Sha256::new();
    hasher.update(bytes);
    file.write_all(bytes).await?;
    file.sync_all().await?;
    drop(file);
    if digest_of(hasher) != *digest {
        return Err("baseline: digest mismatch".into());
    }
    let hex = digest.content_digest().hex();
    let shard = root.join("data").join(&hex[..2]);
    let dest = shard.join(format!("{hex}-{i}"));
    tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&shard)?;
        temp.persist(&dest).map_err(|e| e.error)?;
        std::fs::File::open(&shard)?.sync_all()
    })
    .await??;
    Ok(())
}
