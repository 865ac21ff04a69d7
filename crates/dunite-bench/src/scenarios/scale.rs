//! Scenario 7, many instances: three `dunite serve` processes on one PostgreSQL database and
//! one data directory, under a cap of a third of the working set, serving skopeo pulls of
//! skewed popularity spread over all three. What it shows: how many upstream bytes the pulls
//! cost (fill leases make one upstream fetch per blob across instances, eviction makes more),
//! how the evictors share one cap (passes run, passes left to another instance), that no
//! database pool times out, and the pull time's tail.
//!
//! Needs PostgreSQL (`cargo xtask bench` starts a throwaway server); too slow for the CI test
//! run, so it lives here.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dunite_testkit::peers::push::push_image;
use dunite_testkit::peers::{Dunite, DuniteOptions, Registry, RegistryMode, tool};
use dunite_testkit::pg;

use super::http::pulls::pull;
use super::http::rig::dunite_binary;
use crate::payload::GenReader;
use crate::report::Record;
use crate::{Result, Settings};

/// Instances sharing the database and the directory.
const INSTANCES: usize = 3;

/// The size of a run.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    images: usize,
    layers: usize,
    layer_len: usize,
    pulls: usize,
    /// Pulls running at once (skopeo processes).
    concurrency: usize,
}

impl Sizes {
    fn new(quick: bool) -> Self {
        if quick {
            Self { images: 6, layers: 2, layer_len: 256 << 10, pulls: 40, concurrency: 8 }
        } else {
            Self { images: 20, layers: 3, layer_len: 1 << 20, pulls: 500, concurrency: 16 }
        }
    }
}

pub async fn run(settings: Settings) -> Result<Vec<Record>> {
    let Some(database) = pg::fresh_database().await else {
        return Err("the scale scenario needs PostgreSQL: run it through `cargo xtask bench`, which \
                    starts a throwaway server (or set DUNITE_TEST_DATABASE_URL)"
            .into());
    };
    let sizes = Sizes::new(settings.quick);
    let dir = settings.tempdir()?;
    let upstream = Registry::start(&dir.path().join("upstream"), RegistryMode::Plain).await?;
    let client = reqwest::Client::builder().no_proxy().build()?;
    let mut images = Vec::new();
    let mut working_set = 0u64;
    for i in 0..sizes.images {
        let layers: Vec<Vec<u8>> = (0..sizes.layers)
            .map(|l| GenReader::to_vec(900_000 + (i * sizes.layers + l) as u64, sizes.layer_len))
            .collect();
        working_set += layers.iter().map(|l| l.len() as u64).sum::<u64>();
        let repo = format!("bench/scale-{i}");
        push_image(&client, upstream.addr, &repo, "v1", layers).await?;
        images.push(repo);
    }
    let cap = working_set / 3;
    let data = dir.path().join("data");
    let options = DuniteOptions {
        binary: dunite_binary()?,
        upstream: upstream.addr,
        oci_max_bytes: cap,
        log_level: "warn".to_owned(),
        extra: vec!["--database-url".to_owned(), database.url().to_owned()],
    };
    let mut instances = Vec::new();
    for i in 0..INSTANCES {
        instances.push(Dunite::start_on(&dir.path().join(format!("instance-{i}")), &data, &options).await?);
    }
    let addrs: Vec<SocketAddr> = instances.iter().map(|d| d.addr).collect();
    let scratch = dir.path().join("pulls");
    std::fs::create_dir_all(&scratch)?;

    let started = Instant::now();
    let (times, failures) = pulls(&addrs, &images, sizes, &scratch).await?;
    let elapsed = started.elapsed();

    let mut totals = Metrics::default();
    for addr in &addrs {
        totals.add(&Metrics::read(&client, *addr).await?);
    }
    let pool_timeouts: usize = instances
        .iter()
        .map(|d| {
            let log = d.log_text();
            log.matches("PoolTimedOut").count() + log.matches("pool timed out").count()
        })
        .sum();
    let p = |q: f64| {
        let i = ((times.len().max(1) - 1) as f64 * q).round() as usize;
        times.get(i).map_or(0.0, |d| crate::report::ms(*d))
    };
    let amplification = totals.upstream_bytes as f64 / totals.bytes_served.max(1) as f64;
    let mut r = Record::new("scale/3-instances", "every pull from the upstream");
    r.param("instances", INSTANCES as u64)
        .param("images", sizes.images as u64)
        .param("layers x size", format!("{} x {} KiB", sizes.layers, sizes.layer_len >> 10))
        .param("pulls", sizes.pulls as u64)
        .param("concurrent pulls", sizes.concurrency as u64)
        .param("working set (bytes)", working_set)
        .param("cap (bytes)", cap);
    r.pair("upstream bytes / bytes served", amplification, 1.0)
        .ratio("upstream bytes, baseline / dunite", 1.0 / amplification.max(1e-9))
        .figure("bytes served", totals.bytes_served)
        .figure("upstream bytes", totals.upstream_bytes)
        .figure("blob eviction passes (all instances)", totals.passes)
        .figure("passes left to another instance", totals.passes_elsewhere)
        .figure("blobs evicted", totals.evicted)
        .figure("PoolTimedOut in the logs", pool_timeouts as u64)
        .figure("pull p50 (ms)", p(0.5))
        .figure("pull p99 (ms)", p(0.99))
        .figure("pulls per second", sizes.pulls as f64 / elapsed.as_secs_f64())
        .figure("failed pulls", failures as u64)
        .figure("blob bytes cached at the end", totals.cached_max)
        .target(format!("no pool timeouts (got {pool_timeouts})"), pool_timeouts == 0)
        .target(format!("every pull completes (failed: {failures})"), failures == 0)
        .target(
            format!("the blob cache ends under its cap ({} <= {cap})", totals.cached_max),
            totals.cached_max <= cap,
        );
    Ok(vec![r])
}

/// Run `sizes.pulls` skopeo pulls, `sizes.concurrency` at a time, pull *k* asking a skewed
/// choice of image through instance `k % 3`; a failed pull is retried once through the next
/// instance. The pull times (sorted) and the pulls that failed twice.
async fn pulls(
    addrs: &[SocketAddr],
    images: &[String],
    sizes: Sizes,
    scratch: &std::path::Path,
) -> Result<(Vec<Duration>, usize)> {
    let skopeo = Arc::new(tool("skopeo", "skopeo")?);
    let permits = Arc::new(tokio::sync::Semaphore::new(sizes.concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    let mut random = 0x2545_f491_4f6c_dd1d_u64;
    for k in 0..sizes.pulls {
        // xorshift64: a fixed sequence, so every run pulls the same images in the same order.
        random ^= random << 13;
        random ^= random >> 7;
        random ^= random << 17;
        let u = (random >> 11) as f64 / (1u64 << 53) as f64;
        // Skewed: image i is asked about (2(n-i)-1)/n² of the time.
        let image = images[((u * u) * images.len() as f64) as usize].clone();
        let (first, second) = (addrs[k % addrs.len()], addrs[(k + 1) % addrs.len()]);
        let (skopeo, permits, scratch) = (Arc::clone(&skopeo), Arc::clone(&permits), scratch.to_path_buf());
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await?;
            let asked = Instant::now();
            let pulled = match pull(&skopeo, first, &image, &scratch).await {
                Ok(_) => true,
                Err(error) => {
                    eprintln!("dunite-bench: scale: a pull failed, retrying: {error}");
                    pull(&skopeo, second, &image, &scratch).await.is_ok()
                }
            };
            Ok::<_, crate::BoxError>((asked.elapsed(), pulled))
        });
    }
    let mut times = Vec::with_capacity(sizes.pulls);
    let mut failures = 0;
    for done in tasks.join_all().await {
        let (time, pulled) = done?;
        times.push(time);
        failures += usize::from(!pulled);
    }
    times.sort_unstable();
    Ok((times, failures))
}

/// The figures read from instances' `/metrics`, summed (the cached bytes: the largest any
/// instance reports, which they share).
#[derive(Debug, Default)]
struct Metrics {
    upstream_bytes: u64,
    bytes_served: u64,
    passes: u64,
    passes_elsewhere: u64,
    evicted: u64,
    cached_max: u64,
}

impl Metrics {
    async fn read(client: &reqwest::Client, addr: SocketAddr) -> Result<Self> {
        let text = client.get(format!("http://{addr}/metrics")).send().await?.text().await?;
        let sample = |series: &str| -> Result<u64> {
            text.lines()
                .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
                .and_then(|value| value.trim().parse::<f64>().ok())
                .map(|value| value as u64)
                .ok_or_else(|| format!("no series {series} in {addr}'s /metrics").into())
        };
        Ok(Self {
            upstream_bytes: sample("dunite_upstream_bytes_total")?,
            bytes_served: sample("dunite_bytes_served_total")?,
            passes: sample("dunite_evictor_passes_total{cache=\"blobs\"}")?,
            passes_elsewhere: sample("dunite_evictor_passes_elsewhere_total{cache=\"blobs\"}")?,
            evicted: sample("dunite_evictor_evicted_total{cache=\"blobs\"}")?,
            cached_max: sample("dunite_cache_bytes{cache=\"blobs\"}")?,
        })
    }

    fn add(&mut self, other: &Self) {
        self.upstream_bytes += other.upstream_bytes;
        self.bytes_served += other.bytes_served;
        self.passes += other.passes;
        self.passes_elsewhere += other.passes_elsewhere;
        self.evicted += other.evicted;
        self.cached_max = self.cached_max.max(other.cached_max);
    }
}
