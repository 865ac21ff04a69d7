//! Blobs: cached ones at 1 and 64 clients (dunite and the registry's proxy mode against nginx
//! serving the same bytes as static files), cold misses one at a time, and 16 clients of one
//! cold blob (dunite's single-flight fill), both against the upstream served directly.

use super::load::Target;
use super::measure::{Outcomes, P50, P99, Side, Trio, alternate};
use super::rig::{Blob, Rig};
use crate::Result;
use crate::report::Record;

/// Cached blobs: dunite at least this multiple of the registry's proxy mode...
const HIT_PEER_TARGET: f64 = 1.2;
/// ... and of nginx serving static files.
const HIT_LIMIT_TARGET: f64 = 0.8;
/// Cold misses: dunite at least this fraction of the upstream served directly.
const MISS_TARGET: f64 = 0.9;

/// The cached-blob loads: the blobs, clients, requests and rounds of each.
pub fn hit_loads(rig: &Rig) -> Vec<(String, Vec<Blob>, usize, usize)> {
    let seeded = &rig.seeded;
    let budget = rig.sizes.hit_bytes;
    let mut loads = Vec::new();
    for set in [&seeded.small, &seeded.large] {
        let len = set[0].len;
        for clients in [1, 64] {
            let requests = usize::try_from(budget / len).unwrap_or(1).max(clients);
            loads.push((
                format!("http/blobs/hit/{}/c={clients}", size_name(len)),
                set.clone(),
                clients,
                requests,
            ));
        }
    }
    loads
}

/// Fetch every cached-scenario blob through dunite and the proxy once (their fills), so the
/// measured runs are hits.
pub async fn warm(rig: &Rig) -> Result<()> {
    let blobs: Vec<Blob> = rig.seeded.small.iter().chain(&rig.seeded.large).cloned().collect();
    for addr in [rig.dunite.addr, rig.proxy.addr] {
        let side = Side::new(addr, blobs.iter().map(registry_target).collect());
        super::load::run(side.addr, side.targets, 1, blobs.len()).await?;
    }
    Ok(())
}

/// One cached-blob load on the three servers.
pub async fn hits(
    rig: &Rig,
    name: &str,
    blobs: &[Blob],
    clients: usize,
    requests: usize,
) -> Result<(Record, Outcomes)> {
    let trio = Trio {
        dunite: Side::new(rig.dunite.addr, blobs.iter().map(registry_target).collect()),
        peer: Side::new(rig.proxy.addr, blobs.iter().map(registry_target).collect()),
        limit: Side::new(
            rig.nginx.static_addr,
            blobs.iter().map(|b| Target::get(b.static_path(), b.len)).collect(),
        ),
    };
    let outcomes = alternate(&trio, clients, requests, 2).await?;
    let (peer, limit) = outcomes.throughput_ratios();
    let mut r = Record::new(name, "registry proxy mode");
    r.limit("nginx static (sendfile)")
        .param("blob_bytes", blobs[0].len)
        .param("distinct_blobs", blobs.len() as u64)
        .param("clients", clients as u64)
        .param("requests", 2 * requests as u64);
    figures(&mut r, &outcomes);
    r.ratio("MiB/s", peer).limit_ratio(limit);
    r.target(
        format!(">= {HIT_PEER_TARGET}x the registry's proxy mode (got {peer:.2})"),
        peer >= HIT_PEER_TARGET,
    )
    .target(format!(">= {HIT_LIMIT_TARGET}x nginx static (got {limit:.2})"), limit >= HIT_LIMIT_TARGET);
    Ok((r, outcomes))
}

/// Cold misses, one client, each blob once per mirror; the upstream served directly is the limit.
pub async fn misses(rig: &Rig) -> Result<Record> {
    let blobs = &rig.seeded.cold;
    let trio = cold_trio(rig, blobs.iter().map(registry_target).collect());
    let outcomes = alternate(&trio, 1, blobs.len(), 1).await?;
    Ok(miss_record("http/blobs/miss/c=1", &outcomes, blobs.len(), 1, blobs[0].len))
}

/// 16 clients of one cold blob at once: one upstream fill shared by all (single-flight).
pub async fn single_flight(rig: &Rig) -> Result<Record> {
    let blob = &rig.seeded.flight;
    let trio = cold_trio(rig, vec![registry_target(blob)]);
    let outcomes = alternate(&trio, 16, 16, 1).await?;
    Ok(miss_record("http/blobs/miss-one-blob/c=16", &outcomes, 1, 16, blob.len))
}

fn cold_trio(rig: &Rig, targets: Vec<Target>) -> Trio {
    Trio {
        dunite: Side::new(rig.dunite.addr, targets.clone()),
        peer: Side::new(rig.proxy.addr, targets.clone()),
        limit: Side::new(rig.upstream.addr, targets),
    }
}

fn miss_record(name: &str, outcomes: &Outcomes, blobs: usize, clients: usize, len: u64) -> Record {
    let (peer, limit) = outcomes.throughput_ratios();
    let mut r = Record::new(name, "registry proxy mode");
    r.limit("upstream registry, direct")
        .param("blob_bytes", len)
        .param("distinct_blobs", blobs as u64)
        .param("clients", clients as u64);
    figures(&mut r, outcomes);
    r.ratio("MiB/s", peer).limit_ratio(limit);
    r.target(
        format!(">= {MISS_TARGET}x the upstream served directly (got {limit:.2})"),
        limit >= MISS_TARGET,
    );
    r
}

/// Throughput, wall time and latency quantiles of the three.
fn figures(r: &mut Record, o: &Outcomes) {
    o.throughput_figures(r);
    o.latency_figures(r, &[P50, P99]);
}

fn registry_target(blob: &Blob) -> Target {
    Target::get(blob.registry_path(), blob.len)
}

/// `1MiB`, `64KiB`, ...
pub fn size_name(len: u64) -> String {
    if len >= 1 << 20 { format!("{}MiB", len >> 20) } else { format!("{}KiB", len >> 10) }
}
