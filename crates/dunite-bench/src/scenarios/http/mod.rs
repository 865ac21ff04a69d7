//! Scenario 6, what clients see: HTTP-level figures of the real `dunite` binary beside real
//! peers that this scenario starts itself in the same run (see [`rig`]), all asked by the
//! same load generator ([`load`]): cached blobs, cold misses, tag manifests, downloads,
//! skopeo pulls, CPU seconds per GB served and peak RSS. Every figure is given as a ratio to
//! the peer and to the limit (nginx serving static files, or the upstream served directly).

mod blobs;
mod downloads;
pub mod load;
mod manifests;
mod measure;
pub mod pulls;
pub mod rig;

use dunite_testkit::peers::ProcessUsage;

use crate::report::Record;
use crate::{Result, Settings};

/// dunite's peak RSS must stay under this with 64 clients.
const RSS_TARGET: u64 = 64 << 20;

pub async fn run(settings: Settings) -> Result<Vec<Record>> {
    let binary = rig::dunite_binary()?;
    let rig = rig::Rig::start(&settings.dir, &binary, rig::Sizes::new(settings.quick)).await?;
    let scratch = settings.tempdir()?;
    measure(&rig, scratch.path()).await
}

/// Every load on a started rig, in an order that keeps the cold ones cold; `scratch` takes
/// the pulled images.
pub async fn measure(rig: &rig::Rig, scratch: &std::path::Path) -> Result<Vec<Record>> {
    let mut records = Vec::new();
    // Cold first: nothing may have fetched these blobs yet.
    records.push(blobs::misses(rig).await?);
    records.push(blobs::single_flight(rig).await?);
    blobs::warm(rig).await?;
    let before = usage(rig)?;
    let mut served = [0u64; 3];
    for (name, set, clients, requests) in blobs::hit_loads(rig) {
        let (record, outcomes) = blobs::hits(rig, &name, &set, clients, requests).await?;
        served[0] += outcomes.dunite.bytes;
        served[1] += outcomes.peer.bytes;
        served[2] += outcomes.limit.bytes;
        records.push(record);
    }
    let after = usage(rig)?;
    records.push(manifests::run(rig).await?);
    records.extend(downloads::run(rig).await?);
    records.push(pulls::run(rig, scratch).await?);
    records.push(resources(&before, &after, served, &usage(rig)?));
    Ok(records)
}

/// dunite's, the proxy's and nginx's usage, in that order.
fn usage(rig: &rig::Rig) -> Result<[ProcessUsage; 3]> {
    Ok([rig.dunite.usage()?, rig.proxy.usage()?, rig.nginx.usage()?])
}

/// CPU seconds per GB served over the cached-blob loads, and peak RSS over the whole run.
fn resources(
    before: &[ProcessUsage; 3],
    after: &[ProcessUsage; 3],
    served: [u64; 3],
    end: &[ProcessUsage; 3],
) -> Record {
    let per_gb = |i: usize| (after[i].cpu_seconds - before[i].cpu_seconds) / (served[i] as f64 / 1e9);
    let mib = |bytes: u64| bytes as f64 / f64::from(1 << 20);
    let rss = end[0].peak_rss_bytes;
    let mut r = Record::new("http/resources", "registry proxy mode");
    r.limit("nginx (master + workers)");
    r.triple("CPU s per GB served (cached blobs)", per_gb(0), per_gb(1), per_gb(2))
        .triple("peak RSS (MiB), whole run", mib(rss), mib(end[1].peak_rss_bytes), mib(end[2].peak_rss_bytes))
        .ratio("CPU s per GB, peer / dunite", per_gb(1) / per_gb(0))
        .limit_ratio(per_gb(2) / per_gb(0))
        .target(
            format!("dunite's peak RSS < 64 MiB with 64 clients (got {:.1} MiB)", mib(rss)),
            rss < RSS_TARGET,
        );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The peers start the way the bench starts them, and every load runs on them at tiny
    /// sizes: `cargo xtask ci` fails if a peer cannot start or a load breaks.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_http_load_runs_on_the_real_peers() {
        let dir = tempfile::tempdir().unwrap();
        let binary = rig::dunite_binary().unwrap();
        let rig = rig::Rig::start(dir.path(), &binary, rig::Sizes::tiny()).await.unwrap();
        let records = measure(&rig, dir.path()).await.unwrap();
        let names: Vec<&str> = records.iter().map(|r| r.name.as_str()).collect();
        for name in [
            "http/blobs/miss/c=1",
            "http/blobs/hit/64KiB/c=64",
            "http/manifests/tag/c=64",
            "http/downloads/warm/c=16",
            "http/pull/skopeo",
            "http/resources",
        ] {
            assert!(names.contains(&name), "{name} missing from {names:?}");
        }
    }
}
