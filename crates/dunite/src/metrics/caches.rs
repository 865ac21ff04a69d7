//! The per-cache series (`dunite_cache_*`, `dunite_evictor_*`, `dunite_cache_fills_in_flight`)
//! and `dunite_fills_in_flight`: read from the caches at each scrape (some need the
//! database, so the `/metrics` handler reads them first), encoded by a registry collector.

use std::sync::{Mutex, PoisonError};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use super::CacheLabel;

/// One cache's values at a scrape.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CacheReading {
    /// Accounted bytes.
    pub(crate) bytes: u64,
    /// The cap.
    pub(crate) max_bytes: u64,
    /// Entries.
    pub(crate) entries: u64,
    /// Eviction passes run.
    pub(crate) passes: u64,
    /// Pokes coalesced into a pending pass.
    pub(crate) pokes_coalesced: u64,
    /// Entries evicted.
    pub(crate) evicted: u64,
    /// Failed eviction passes.
    pub(crate) evictor_errors: u64,
    /// Passes not run because another instance was evicting.
    pub(crate) passes_elsewhere: u64,
    /// Fills running, for the caches that fill from an upstream by key.
    pub(crate) fills_in_flight: Option<u64>,
}

/// What a scrape read: each cache's values, and the fills running under `--max-fills`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Reading {
    /// By cache name.
    pub(crate) caches: Vec<(&'static str, CacheReading)>,
    /// `dunite_fills_in_flight`.
    pub(crate) fills_in_flight: u64,
}

/// The collector: the last scrape's [`Reading`].
#[derive(Debug, Default)]
pub(crate) struct CacheSeries {
    last: Mutex<Reading>,
}

/// A per-cache series: name, whether a counter (else a gauge), help, and how to read it.
type Series = (&'static str, bool, &'static str, fn(&CacheReading) -> Option<u64>);

/// Every per-cache series (counters by their name without `_total`: the encoder adds it).
const SERIES: [Series; 9] = [
    ("dunite_cache_bytes", false, "Accounted bytes in the cache", |r| Some(r.bytes)),
    ("dunite_cache_max_bytes", false, "The cache's byte cap", |r| Some(r.max_bytes)),
    ("dunite_cache_entries", false, "Entries in the cache", |r| Some(r.entries)),
    ("dunite_cache_fills_in_flight", false, "Upstream fills of the cache running", |r| r.fills_in_flight),
    ("dunite_evictor_passes", true, "Eviction passes run", |r| Some(r.passes)),
    ("dunite_evictor_pokes_coalesced", true, "Pokes folded into a pending pass", |r| Some(r.pokes_coalesced)),
    ("dunite_evictor_evicted", true, "Entries evicted by this instance", |r| Some(r.evicted)),
    ("dunite_evictor_errors", true, "Failed eviction passes", |r| Some(r.evictor_errors)),
    (
        "dunite_evictor_passes_elsewhere",
        true,
        "Passes not run because another instance sharing the database was evicting",
        |r| Some(r.passes_elsewhere),
    ),
];

impl CacheSeries {
    /// Keep `reading` for the next encoding.
    pub(crate) fn set(&self, reading: Reading) {
        *self.last.lock().unwrap_or_else(PoisonError::into_inner) = reading;
    }
}

impl Collector for CacheSeries {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let reading = self.last.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let gauge = ConstGauge::new(i64::try_from(reading.fills_in_flight).unwrap_or(i64::MAX));
        let metric = encoder.encode_descriptor(
            "dunite_fills_in_flight",
            "Upstream fills running (under --max-fills)",
            None,
            MetricType::Gauge,
        )?;
        gauge.encode(metric)?;
        for (name, counter, help, read) in SERIES {
            let values: Vec<_> = reading
                .caches
                .iter()
                .filter_map(|(cache, r)| Some((CacheLabel { cache }, read(r)?)))
                .collect();
            if values.is_empty() {
                continue;
            }
            let kind = if counter { MetricType::Counter } else { MetricType::Gauge };
            let mut family = encoder.encode_descriptor(name, help, None, kind)?;
            for (label, value) in &values {
                let metric = family.encode_family(label)?;
                if counter {
                    ConstCounter::new(*value).encode(metric)?;
                } else {
                    ConstGauge::new(i64::try_from(*value).unwrap_or(i64::MAX)).encode(metric)?;
                }
            }
        }
        Ok(())
    }
}
