//! Scenario 2, large blobs: store throughput against a plain read, hash, write and fsync of
//! the same bytes to the same disk; and the peak RSS of storing one very large blob from a
//! generated stream, measured in a child process so the peak is that of the store alone.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dunite_core::EvictionPolicy;
use dunite_oci::{BlobCache, Digest};
use serde_json::{Value, json};
use sha2::Digest as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::payload::{CHUNK, GenReader, digest_of};
use crate::report::{Record, mib_per_s, ms};
use crate::{Result, Settings};

/// The hidden subcommand the RSS measurement re-executes this binary with.
pub const CHILD_COMMAND: &str = "__store-large-blob";

const MIB: u64 = 1024 * 1024;
const RSS_SEED: u64 = 4242;
const RSS_TARGET_MIB: f64 = 64.0;
const THROUGHPUT_TARGET: f64 = 0.85;

pub async fn run(settings: Settings) -> Result<Vec<Record>> {
    let (total, blob, big) =
        if settings.quick { (128 * MIB, 16 * MIB, 512 * MIB) } else { (1024 * MIB, 64 * MIB, 4096 * MIB) };
    Ok(vec![throughput(&settings, total, blob).await?, peak_rss(&settings, big).await?])
}

async fn throughput(settings: &Settings, total: u64, blob: u64) -> Result<Record> {
    let dir = settings.tempdir()?;
    let cache = BlobCache::new(BlobCache::options(
        dir.path().join("cache"),
        EvictionPolicy::new(total * 4).without_safety_tick(),
    ))
    .await?;
    let baseline_dir = dir.path().join("baseline");
    tokio::fs::create_dir_all(&baseline_dir).await?;
    let count = total / blob;
    let seeds: Vec<u64> = (0..count).map(|i| 1_000 + i).collect();
    let digests = {
        let seeds = seeds.clone();
        tokio::task::spawn_blocking(move || {
            seeds.iter().map(|&s| GenReader::digest(s, blob)).collect::<Vec<_>>()
        })
        .await?
    };
    let (mut ours, mut base) = (Duration::ZERO, Duration::ZERO);
    for (i, (&seed, digest)) in seeds.iter().zip(&digests).enumerate() {
        let path = baseline_dir.join(format!("blob-{i}"));
        // Alternate which goes first, so neither always meets the other's writeback.
        if i % 2 == 0 {
            base += baseline_store(&path, seed, blob, digest).await?;
            ours += cache_store(&cache, seed, blob, digest).await?;
        } else {
            ours += cache_store(&cache, seed, blob, digest).await?;
            base += baseline_store(&path, seed, blob, digest).await?;
        }
    }
    let (ours_rate, base_rate) = (mib_per_s(total, ours), mib_per_s(total, base));
    let ratio = ours_rate / base_rate;
    let mut r = Record::new("large-blob/throughput", "read+sha256+write+fsync");
    r.param("total_bytes", total).param("blob_bytes", blob).param("blobs", count);
    r.pair("MiB/s", ours_rate, base_rate)
        .pair("total time (ms)", ms(ours), ms(base))
        .ratio("throughput, dunite / baseline", ratio);
    r.target(
        format!(">= {THROUGHPUT_TARGET} of baseline throughput (got {ratio:.3})"),
        ratio >= THROUGHPUT_TARGET,
    );
    Ok(r)
}

async fn cache_store(cache: &BlobCache, seed: u64, size: u64, digest: &Digest) -> Result<Duration> {
    let started = Instant::now();
    cache.store_with_size(digest, size, GenReader::new(seed, size)).await?;
    Ok(started.elapsed())
}

/// The same source, hashed and written to the same disk, synced; no cache bookkeeping.
async fn baseline_store(path: &Path, seed: u64, size: u64, digest: &Digest) -> Result<Duration> {
    let started = Instant::now();
    let mut reader = GenReader::new(seed, size);
    let mut file = tokio::fs::File::create(path).await?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0; CHUNK];
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n]).await?;
    }
    file.sync_all().await?;
    drop(file);
    if digest_of(hasher) != *digest {
        return Err("baseline: digest mismatch".into());
    }
    Ok(started.elapsed())
}

async fn peak_rss(settings: &Settings, size: u64) -> Result<Record> {
    let dir = settings.tempdir()?;
    let exe = std::env::current_exe()?;
    let cache_dir = dir.path().join("cache");
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(exe).arg(CHILD_COMMAND).arg(&cache_dir).arg(size.to_string()).output()
    })
    .await??;
    if !output.status.success() {
        return Err(format!(
            "the large-blob child failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    let child: Value = serde_json::from_slice(&output.stdout)?;
    let kib = |field: &str| child.get(field).and_then(Value::as_f64).unwrap_or(f64::NAN);
    let peak = kib("hwm_after_kib") / 1024.0;
    let mut r = Record::new("large-blob/peak-rss", "-");
    r.param("blob_bytes", size).param("source", "generated stream, never in memory");
    r.figure("peak RSS of the process after the store (MiB)", peak)
        .figure("peak RSS before the store (MiB)", kib("hwm_before_kib") / 1024.0)
        .figure("peak RSS at process start (MiB)", kib("hwm_start_kib") / 1024.0)
        .figure("store time (ms)", kib("store_ms"))
        .figure("store MiB/s", mib_per_s(size, Duration::from_secs_f64(kib("store_ms") / 1e3)));
    r.target(format!("peak RSS < {RSS_TARGET_MIB} MiB (got {peak:.1})"), peak < RSS_TARGET_MIB);
    Ok(r)
}

/// The peak resident set size of this process (`VmHWM`), in KiB.
fn vm_hwm_kib() -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).ok_or("no VmHWM in /proc/self/status")?;
    let value = line.trim_start_matches("VmHWM:").trim().trim_end_matches("kB").trim();
    Ok(value.parse()?)
}

/// The child: open a cache in `DIR`, store one generated blob of `BYTES`, print a JSON line
/// with the peak RSS before and after.
pub fn child_main(args: &[String]) -> Result<()> {
    let [dir, size] = args else {
        return Err(format!("usage: dunite-bench {CHILD_COMMAND} DIR BYTES").into());
    };
    let (dir, size) = (PathBuf::from(dir), size.parse::<u64>()?);
    let hwm_start = vm_hwm_kib()?;
    let runtime = crate::runtime()?;
    let figures = runtime.block_on(async move {
        let cache =
            BlobCache::new(BlobCache::options(dir, EvictionPolicy::new(size * 2).without_safety_tick()))
                .await?;
        // The digest comes from a first streaming pass; the store then streams it again.
        let digest = tokio::task::spawn_blocking(move || GenReader::digest(RSS_SEED, size)).await?;
        let hwm_before = vm_hwm_kib()?;
        let started = Instant::now();
        cache.store_with_size(&digest, size, GenReader::new(RSS_SEED, size)).await?;
        let store_ms = ms(started.elapsed());
        let hwm_after = vm_hwm_kib()?;
        Ok::<_, crate::BoxError>(json!({
            "hwm_start_kib": hwm_start,
            "hwm_before_kib": hwm_before,
            "hwm_after_kib": hwm_after,
            "store_ms": store_ms,
        }))
    })?;
    println!("{figures}");
    Ok(())
}
