//! Downloads through `/dl/`, cold (each URL's first request) and warm, at 1 and 16 clients,
//! against nginx's `proxy_cache` in front of the same origin (nginx's static server, also the
//! limit). A fresh query string per load makes fresh URLs for both caches.

use super::load::Target;
use super::measure::{Outcomes, P99, Side, Trio, alternate};
use super::rig::Rig;
use crate::Result;
use crate::report::Record;

const TARGET: f64 = 1.0;
/// Warm loads ask each file this many times.
const WARM_ROUNDS: usize = 5;

pub async fn run(rig: &Rig) -> Result<Vec<Record>> {
    let mut records = Vec::new();
    for clients in [1, 16] {
        let round = format!("c{clients}");
        let names = &rig.seeded.downloads;
        let len = rig.seeded.download_len;
        let trio = Trio {
            dunite: Side::new(
                rig.dunite.addr,
                names.iter().map(|n| Target::get(rig.dunite_download(n, &round), len)).collect(),
            ),
            peer: Side::new(
                rig.nginx.cache_addr,
                names.iter().map(|n| Target::get(format!("/dl/{n}?r={round}"), len)).collect(),
            ),
            limit: Side::new(
                rig.nginx.static_addr,
                names.iter().map(|n| Target::get(format!("/dl/{n}"), len)).collect(),
            ),
        };
        let cold = alternate(&trio, clients, names.len(), 1).await?;
        records.push(record(&format!("http/downloads/cold/c={clients}"), &cold, clients, names.len(), len));
        let warm = alternate(&trio, clients, names.len() * WARM_ROUNDS, 2).await?;
        records.push(record(&format!("http/downloads/warm/c={clients}"), &warm, clients, names.len(), len));
    }
    Ok(records)
}

fn record(name: &str, o: &Outcomes, clients: usize, files: usize, len: u64) -> Record {
    let (peer, limit) = o.throughput_ratios();
    let mut r = Record::new(name, "nginx proxy_cache");
    r.limit("nginx static (sendfile)")
        .param("file_bytes", len)
        .param("files", files as u64)
        .param("clients", clients as u64)
        .param("requests", o.dunite.requests);
    o.throughput_figures(&mut r);
    o.latency_figures(&mut r, &[P99]);
    r.ratio("MiB/s", peer)
        .limit_ratio(limit)
        .target(format!(">= {TARGET}x nginx proxy_cache (got {peer:.2})"), peer >= TARGET);
    r
}
