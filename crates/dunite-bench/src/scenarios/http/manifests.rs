//! Tag manifests, warm: requests per second and latency at 64 clients, against the registry's
//! proxy mode (which asks its upstream about the tag) and nginx serving the manifest's bytes.

use super::load::Target;
use super::measure::{P50, P99, Side, Trio, alternate};
use super::rig::{REPO, Rig};
use crate::Result;
use crate::report::Record;

const TARGET: f64 = 1.0;
const CLIENTS: usize = 64;

pub async fn run(rig: &Rig) -> Result<Record> {
    let len = rig.seeded.tagged.manifest.len() as u64;
    let accept = dunite_testkit::peers::push::MANIFEST_TYPE;
    let tag = Target::get(format!("/v2/{REPO}/manifests/v1"), len).header("accept", accept);
    let trio = Trio {
        dunite: Side::new(rig.dunite.addr, vec![tag.clone()]),
        peer: Side::new(rig.proxy.addr, vec![tag]),
        limit: Side::new(rig.nginx.static_addr, vec![Target::get("/manifests/v1", len)]),
    };
    // Warm: each mirror has the tag and its manifest.
    for side in [&trio.dunite, &trio.peer] {
        super::load::run(side.addr, side.targets.clone(), 1, 2).await?;
    }
    let requests = rig.sizes.manifest_requests;
    let o = alternate(&trio, CLIENTS, requests, 2).await?;
    let (peer, limit) = o.rate_ratios();
    let mut r = Record::new("http/manifests/tag/c=64", "registry proxy mode");
    r.limit("nginx static (the manifest's bytes)")
        .param("clients", CLIENTS as u64)
        .param("requests", 2 * requests as u64)
        .param("manifest_bytes", len);
    r.triple("requests/s", o.dunite.requests_per_s(), o.peer.requests_per_s(), o.limit.requests_per_s());
    o.latency_figures(&mut r, &[P50, P99]);
    r.ratio("requests/s", peer)
        .limit_ratio(limit)
        .target(format!(">= {TARGET}x the proxy mode's requests/s (got {peer:.2})"), peer >= TARGET);
    Ok(r)
}
