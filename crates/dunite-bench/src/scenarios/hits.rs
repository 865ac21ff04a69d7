//! Scenario 5, the hit path: 64 concurrent readers of cached 1 MiB blobs through the cache
//! (`BlobCache::open`; `DownloadCache::get_or_fetch` on a fresh entry), against opening and
//! reading the same files directly; and the database writes the hits cost (access stamps are
//! batched, not written per hit).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dunite_core::{EntryCache, EvictionPolicy};
use dunite_download::{DownloadCache, DownloadRequest, UrlKey};
use dunite_oci::{BlobCache, Digest};
use tokio::io::AsyncReadExt as _;

use crate::payload::{CHUNK, GenReader, upstream};
use crate::report::{Record, mib_per_s, ms};
use crate::{Result, Settings};

const BLOBS: usize = 64;
const SIZE: usize = 1024 * 1024;
const READERS: usize = 64;
const ROUNDS: u32 = 2;
const TARGET: f64 = 0.8;

pub async fn run(settings: Settings) -> Result<Vec<Record>> {
    let per_reader = if settings.quick { 32 } else { 128 };
    let bytes: Vec<Arc<Vec<u8>>> =
        (0..BLOBS).map(|i| Arc::new(GenReader::to_vec(90_000 + i as u64, SIZE))).collect();
    let digests: Arc<Vec<Digest>> = Arc::new(bytes.iter().map(|b| Digest::sha256_of(b)).collect());
    let policy = EvictionPolicy::new((BLOBS * SIZE * 4) as u64).without_safety_tick();

    // The OCI blob cache.
    let dir = settings.tempdir()?;
    let oci = BlobCache::new(BlobCache::options(dir.path(), policy.clone())).await?;
    for (digest, bytes) in digests.iter().zip(&bytes) {
        oci.store_with_size(digest, SIZE as u64, &bytes[..]).await?;
    }
    let keys: Vec<String> = digests.iter().map(ToString::to_string).collect();
    let paths = payload_paths(oci.entries(), dir.path(), &keys).await?;
    let open_oci = {
        let (oci, digests) = (oci.clone(), digests.clone());
        move |i: usize| {
            let (oci, digests) = (oci.clone(), digests.clone());
            async move { Ok(oci.open(&digests[i]).await?.ok_or("cached blob missing")?.into_file()) }
        }
    };
    let mut records = vec![
        measure("hits/oci/read-1MiB", "BlobCache::open", oci.entries(), paths, open_oci, per_reader).await?,
    ];

    // The download cache, fresh entries served by `get_or_fetch`.
    let dir = settings.tempdir()?;
    let urls = (0..BLOBS)
        .map(|i| Ok(UrlKey::parse(&format!("https://bench.example/hits/blob-{i}"))?))
        .collect::<Result<Vec<_>>>()?;
    let fetcher = upstream(urls.iter().map(|u| u.as_str().to_owned()).zip(bytes.iter().cloned()).collect());
    let downloads =
        DownloadCache::new(DownloadCache::options(dir.path(), policy), Duration::from_secs(3600)).await?;
    let requests: Arc<Vec<DownloadRequest>> = Arc::new(
        urls.iter()
            .zip(digests.iter())
            .map(|(url, digest)| {
                DownloadRequest::new(url.clone()).with_sha256(digest.content_digest().clone())
            })
            .collect(),
    );
    for request in requests.iter() {
        downloads.get_or_fetch(request, &fetcher).await?;
    }
    let keys: Vec<String> = urls.iter().map(|u| u.as_str().to_owned()).collect();
    let paths = payload_paths(downloads.entries(), dir.path(), &keys).await?;
    let open_download = {
        let downloads = downloads.clone();
        move |i: usize| {
            let (downloads, requests, fetcher) = (downloads.clone(), requests.clone(), fetcher.clone());
            async move { Ok(downloads.get_or_fetch(&requests[i], &fetcher).await?.into_file()) }
        }
    };
    records.push(
        measure(
            "hits/download/read-1MiB",
            "DownloadCache::get_or_fetch (fresh hit)",
            downloads.entries(),
            paths,
            open_download,
            per_reader,
        )
        .await?,
    );
    let fetches = downloads.download_stats().fetches;
    if fetches != BLOBS as u64 {
        return Err(format!("hits: the download cache fetched {fetches} times, expected {BLOBS}").into());
    }
    Ok(records)
}

/// The payload file of each key, from the rows.
async fn payload_paths(entries: &EntryCache, dir: &Path, keys: &[String]) -> Result<Arc<Vec<PathBuf>>> {
    let store = entries.entries();
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT key, file FROM entries WHERE namespace = ?")
        .bind(store.namespace())
        .fetch_all(store.database().pool())
        .await?;
    let files: HashMap<String, String> = rows.into_iter().collect();
    let paths = keys
        .iter()
        .map(|k| files.get(k).map(|f| dir.join("data").join(f)).ok_or("cached row missing"))
        .collect::<Result<_, _>>()?;
    Ok(Arc::new(paths))
}

async fn measure<F, Fut>(
    name: &str,
    via: &str,
    entries: &EntryCache,
    paths: Arc<Vec<PathBuf>>,
    open_cached: F,
    per_reader: usize,
) -> Result<Record>
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<tokio::fs::File>> + Send,
{
    let open_direct = move |i: usize| {
        let paths = paths.clone();
        async move { Ok(tokio::fs::File::open(&paths[i]).await?) }
    };
    // Warm the page cache for both.
    read_all(open_direct.clone(), 1).await?;
    let before = entries.stats().entries;
    let (mut base, mut ours) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..ROUNDS {
        base += read_all(open_direct.clone(), per_reader).await?;
        ours += read_all(open_cached.clone(), per_reader).await?;
    }
    entries.entries().flush_accesses().await?;
    let after = entries.stats().entries;
    let hits = after.hits - before.hits;
    let reads = (READERS * per_reader) as u64 * u64::from(ROUNDS);
    if hits != reads || after.misses != before.misses {
        return Err(format!("{name}: {hits} hits of {reads} reads").into());
    }
    let writes_per_1000 = (after.access_writes - before.access_writes) as f64 * 1000.0 / hits as f64;
    let bytes = reads * SIZE as u64;
    let ratio = base.as_secs_f64() / ours.as_secs_f64();
    let mut r = Record::new(name, "open+read the file directly");
    r.param("via", via)
        .param("blobs", BLOBS as u64)
        .param("blob_bytes", SIZE as u64)
        .param("readers", READERS as u64)
        .param("reads", reads);
    r.pair("reads/s", reads as f64 / ours.as_secs_f64(), reads as f64 / base.as_secs_f64())
        .pair("MiB/s", mib_per_s(bytes, ours), mib_per_s(bytes, base))
        .pair("total time (ms)", ms(ours), ms(base))
        .figure("database writes per 1,000 hits", writes_per_1000)
        .ratio("read throughput, dunite / baseline", ratio)
        .target(format!(">= {TARGET} of baseline read throughput (got {ratio:.3})"), ratio >= TARGET);
    Ok(r)
}

/// `READERS` tasks, each opening and reading `per_reader` blobs (spread so that readers do
/// not move in lockstep); the wall time.
async fn read_all<F, Fut>(open: F, per_reader: usize) -> Result<Duration>
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<tokio::fs::File>> + Send,
{
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for reader in 0..READERS {
        let open = open.clone();
        tasks.spawn(async move {
            let mut buf = vec![0; CHUNK];
            for k in 0..per_reader {
                let mut file = open((reader + k) % BLOBS).await?;
                let mut total = 0;
                loop {
                    let n = file.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    total += n;
                }
                if total != SIZE {
                    return Err::<(), crate::BoxError>("short read".into());
                }
            }
            Ok(())
        });
    }
    for result in tasks.join_all().await {
        result?;
    }
    Ok(started.elapsed())
}
