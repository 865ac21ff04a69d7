//! Running one load on dunite, its peer and the limit, alternating which goes first.

use std::net::SocketAddr;
use std::sync::Arc;

use super::load::{self, Outcome, Target};
use crate::Result;
use crate::report::Record;

/// The median latency, as [`Outcomes::latency_figures`] takes it.
pub const P50: (&str, f64) = ("p50 latency (ms)", 0.5);
/// The 99th percentile latency.
pub const P99: (&str, f64) = ("p99 latency (ms)", 0.99);

/// Where one server is asked and what.
#[derive(Debug, Clone)]
pub struct Side {
    pub addr: SocketAddr,
    pub targets: Arc<Vec<Target>>,
}

impl Side {
    pub fn new(addr: SocketAddr, targets: Vec<Target>) -> Self {
        Self { addr, targets: Arc::new(targets) }
    }
}

/// dunite, the peer it is compared to, and the limit, asked for the same bytes.
#[derive(Debug, Clone)]
pub struct Trio {
    pub dunite: Side,
    pub peer: Side,
    pub limit: Side,
}

/// What each of a [`Trio`] measured.
#[derive(Debug, Clone)]
pub struct Outcomes {
    pub dunite: Outcome,
    pub peer: Outcome,
    pub limit: Outcome,
}

impl Outcomes {
    /// dunite's throughput over the peer's and over the limit's.
    pub fn throughput_ratios(&self) -> (f64, f64) {
        let ours = self.dunite.mib_per_s();
        (ours / self.peer.mib_per_s(), ours / self.limit.mib_per_s())
    }

    /// Add the throughput and the wall time of the three to `r`.
    pub fn throughput_figures(&self, r: &mut Record) {
        r.triple("MiB/s", self.dunite.mib_per_s(), self.peer.mib_per_s(), self.limit.mib_per_s()).triple(
            "wall time (ms)",
            crate::report::ms(self.dunite.elapsed),
            crate::report::ms(self.peer.elapsed),
            crate::report::ms(self.limit.elapsed),
        );
    }

    /// Add the latency of the three at each of `quantiles` ([`P50`], [`P99`]) to `r`.
    pub fn latency_figures(&self, r: &mut Record, quantiles: &[(&'static str, f64)]) {
        for &(name, q) in quantiles {
            r.triple(name, self.dunite.latency_ms(q), self.peer.latency_ms(q), self.limit.latency_ms(q));
        }
    }

    /// dunite's requests per second over the peer's and over the limit's.
    pub fn rate_ratios(&self) -> (f64, f64) {
        let ours = self.dunite.requests_per_s();
        (ours / self.peer.requests_per_s(), ours / self.limit.requests_per_s())
    }
}

/// `rounds` runs of `requests` requests from `clients` connections on each server, the order
/// reversed every other round (dunite, peer, limit; then limit, peer, dunite), times added.
pub async fn alternate(trio: &Trio, clients: usize, requests: usize, rounds: usize) -> Result<Outcomes> {
    let mut merged: Option<Outcomes> = None;
    for round in 0..rounds {
        let run =
            async |side: &Side| load::run(side.addr, Arc::clone(&side.targets), clients, requests).await;
        let (dunite, peer, limit) = if round % 2 == 0 {
            let d = run(&trio.dunite).await?;
            let p = run(&trio.peer).await?;
            (d, p, run(&trio.limit).await?)
        } else {
            let l = run(&trio.limit).await?;
            let p = run(&trio.peer).await?;
            (run(&trio.dunite).await?, p, l)
        };
        merged = Some(match merged {
            None => Outcomes { dunite, peer, limit },
            Some(m) => Outcomes {
                dunite: m.dunite.merge(dunite),
                peer: m.peer.merge(peer),
                limit: m.limit.merge(limit),
            },
        });
    }
    merged.ok_or_else(|| "a measurement needs at least one round".into())
}
