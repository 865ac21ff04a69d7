//! Scenario 4, eviction cost as the cache grows: explicit passes that each evict 1,000
//! entries from caches of increasing size (the median of 3 is reported), and the cost of
//! reading the accounted total at each size.
//!
//! Large caches are seeded directly in SQL (see `seed`), after the cache is opened empty, so
//! start-up reconciliation (which walks every row and file) is not part of what is measured.

use std::time::{Duration, Instant};

use dunite_core::{EvictionPolicy, PassOutcome};
use dunite_oci::{BlobCache, NAMESPACE};

use crate::report::{Record, ms, us};
use crate::{Result, Settings};

/// Bytes per seeded entry (and per real victim file).
const ENTRY: u64 = 4096;
/// Entries each measured pass evicts.
const EVICT: u64 = 1_000;
/// Measured passes per cache size; the median is reported.
const PASSES: u64 = 3;
/// Rows inserted per statement (and per transaction) while seeding.
const SEED_CHUNK: u64 = 250_000;
/// Reads of the accounted total timed at each size.
const TOTAL_READS: u32 = 500;
/// Batches of `TOTAL_READS`; the median batch is reported.
const TOTAL_BATCHES: usize = 7;

struct Measured {
    entries: u64,
    seed: Duration,
    pass: Duration,
    pass_own: Duration,
    evicted: u64,
    read_total: Duration,
    sum_query: Duration,
}

pub async fn run(settings: Settings) -> Result<Vec<Record>> {
    let sizes: &[u64] = if settings.quick { &[10_000, 50_000] } else { &[10_000, 100_000, 1_000_000] };
    let mut measured = Vec::new();
    let mut records = Vec::new();
    for &n in sizes {
        let m = one_size(&settings, n).await?;
        let mut r = Record::new(format!("eviction/entries={n}"), "naive SUM(size)");
        r.param("entries", n)
            .param("evicted_by_pass", EVICT)
            .param("passes", PASSES)
            .param("entry_bytes", ENTRY);
        r.figure("seed time (ms)", ms(m.seed))
            .figure("pass wall time, median (ms)", ms(m.pass))
            .figure("pass time per evicted entry (us)", us(m.pass) / m.evicted.max(1) as f64)
            .figure("pass duration by its own report (ms)", ms(m.pass_own))
            .figure("entries evicted", m.evicted)
            .pair("read the accounted total (us)", us(m.read_total), us(m.sum_query));
        r.ratio("total read, dunite / naive SUM", m.read_total.as_secs_f64() / m.sum_query.as_secs_f64());
        r.target(format!("the pass evicts exactly {EVICT} entries"), m.evicted == EVICT);
        records.push(r);
        measured.push(m);
    }
    if let (Some(small), Some(large)) = (measured.first(), measured.last()) {
        let per = |m: &Measured| m.pass.as_secs_f64() / m.evicted.max(1) as f64;
        let ratio = per(large) / per(small);
        let total_ratio = large.read_total.as_secs_f64() / small.read_total.as_secs_f64();
        let mut r = Record::new("eviction/scaling", format!("entries={}", small.entries));
        r.param("smallest", small.entries).param("largest", large.entries);
        r.pair("pass time per evicted entry (us), largest vs smallest", per(large) * 1e6, per(small) * 1e6)
            .pair(
                "read the accounted total (us), largest vs smallest",
                us(large.read_total),
                us(small.read_total),
            )
            .ratio("time per evicted entry, largest / smallest", ratio);
        r.target(
            format!("per-entry eviction time at most 2x the smallest cache's (got {ratio:.2}x)"),
            ratio <= 2.0,
        )
        .target(
            format!(
                "reading the total does not grow with size (got {total_ratio:.2}x; allowed 1.5x for noise)"
            ),
            total_ratio <= 1.5,
        );
        records.push(r);
    }
    Ok(records)
}

async fn one_size(settings: &Settings, n: u64) -> Result<Measured> {
    let dir = settings.tempdir()?;
    let cap = (n - EVICT) * ENTRY;
    let policy = EvictionPolicy::new(cap)
        .with_low_watermark(cap)
        .with_pass_time_budget(Duration::from_secs(3600))
        .without_safety_tick();
    // Opened empty: reconciliation and the start-up pass have nothing to do.
    let cache = BlobCache::new(BlobCache::options(dir.path(), policy)).await?;
    let started = Instant::now();
    seed(&cache, 1, n).await?;
    victim_files(dir.path().join("data")).await?;
    let seed_time = started.elapsed();

    let read_total = time_total_reads(&cache).await?;
    let started = Instant::now();
    let (sum,): (i64,) = sqlx::query_as("SELECT COALESCE(SUM(size), 0) FROM entries WHERE namespace = ?")
        .bind(NAMESPACE)
        .fetch_one(cache.entries().entries().database().pool())
        .await?;
    let sum_query = started.elapsed();
    if u64::try_from(sum)? != n * ENTRY {
        return Err(format!("eviction: seeded {sum} bytes, expected {}", n * ENTRY).into());
    }

    // PASSES passes of EVICT entries each; before every pass but the first, EVICT new
    // (most recently used) rows bring the cache back to `n` entries, over the cap.
    let mut passes = Vec::new();
    for round in 0..PASSES {
        if round > 0 {
            seed(&cache, n + (round - 1) * EVICT + 1, n + round * EVICT).await?;
        }
        let started = Instant::now();
        let report = cache.evict_if_over_cap().await?;
        let pass = started.elapsed();
        if report.outcome != PassOutcome::Evicted || report.entries_evicted != EVICT {
            return Err(format!(
                "eviction: the pass ended {:?} after {} entries",
                report.outcome, report.entries_evicted
            )
            .into());
        }
        let first_victim =
            dir.path().join(format!("data/{:02x}/seed-{}", (round * EVICT + 1) % 256, round * EVICT + 1));
        if tokio::fs::try_exists(first_victim).await? || cache.len().await? != n - EVICT {
            return Err("eviction: the pass did not remove what it reported".into());
        }
        passes.push((pass, report.duration));
    }
    passes.sort();
    let (pass, pass_own) = passes[passes.len() / 2];
    Ok(Measured { entries: n, seed: seed_time, pass, pass_own, evicted: EVICT, read_total, sum_query })
}

/// The median, over batches, of the mean time of one `total_bytes()` read.
async fn time_total_reads(cache: &BlobCache) -> Result<Duration> {
    let mut batches = Vec::new();
    for _ in 0..TOTAL_BATCHES {
        let started = Instant::now();
        for _ in 0..TOTAL_READS {
            std::hint::black_box(cache.total_bytes().await?);
        }
        batches.push(started.elapsed() / TOTAL_READS);
    }
    batches.sort();
    Ok(batches[batches.len() / 2])
}

/// Insert rows `first..=last` (version = row number, so the lowest are the least recently
/// used) in chunks of one statement and one transaction each, with the matching total. Only
/// the rows the passes evict get real files (see `victim_files`); the others are never opened.
async fn seed(cache: &BlobCache, first: u64, last: u64) -> Result<()> {
    let pool = cache.entries().entries().database().pool();
    let mut lo = first;
    while lo <= last {
        let hi = (lo + SEED_CHUNK - 1).min(last);
        let mut tx = pool.begin().await?;
        sqlx::query(
            "WITH RECURSIVE s(x) AS (SELECT ?1 UNION ALL SELECT x + 1 FROM s WHERE x < ?2) \
             INSERT INTO entries (namespace, key, file, size, version, stored_at, state, meta) \
             SELECT ?3, printf('sha256:%064x', x), printf('%02x/seed-%d', x % 256, x), ?4, x, 0, 0, '' FROM s",
        )
        .bind(i64::try_from(lo)?)
        .bind(i64::try_from(hi)?)
        .bind(NAMESPACE)
        .bind(i64::try_from(ENTRY)?)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE totals SET bytes = bytes + ?, entries = entries + ? WHERE namespace = ?")
            .bind(i64::try_from((hi - lo + 1) * ENTRY)?)
            .bind(i64::try_from(hi - lo + 1)?)
            .bind(NAMESPACE)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        lo = hi + 1;
    }
    Ok(())
}

/// Real payload files for the entries the pass evicts, so it unlinks real files.
async fn victim_files(data: std::path::PathBuf) -> Result<()> {
    tokio::task::spawn_blocking(move || {
        let payload = vec![0u8; usize::try_from(ENTRY).unwrap_or(4096)];
        for x in 1..=EVICT * PASSES {
            let shard = data.join(format!("{:02x}", x % 256));
            std::fs::create_dir_all(&shard)?;
            std::fs::write(shard.join(format!("seed-{x}")), &payload)?;
        }
        Ok::<_, std::io::Error>(())
    })
    .await??;
    Ok(())
}
