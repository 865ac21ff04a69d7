//! Counters, rendered in the Prometheus text format at `GET /metrics`.

use std::fmt::Write as _;

use bytes::Bytes;
use futures_util::{Stream, StreamExt as _};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// How a request was answered, recorded by handlers (as a response extension) for the
/// request log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// From the cache.
    Hit,
    /// From the upstream (and cached).
    Miss,
    /// From the cache, stale, because the upstream was down.
    Stale,
}

/// Request-level counters (cache-level ones come from the caches' own stats).
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    /// Requests answered.
    pub(crate) requests: AtomicU64,
    /// Blob requests answered from the cache.
    pub(crate) blob_hits: AtomicU64,
    /// Blob requests that needed the upstream.
    pub(crate) blob_misses: AtomicU64,
    /// Manifest requests answered from the cache.
    pub(crate) manifest_hits: AtomicU64,
    /// Manifest requests that went upstream.
    pub(crate) manifest_misses: AtomicU64,
    /// Tags served stale because the upstream did not answer (unreachable, 5xx, 429).
    pub(crate) stale_tags_served: AtomicU64,
    /// Tag lists and referrers lists served stale because the upstream did not answer.
    pub(crate) stale_listings_served: AtomicU64,
    /// Stale answers (tags or listings) served because the upstream answered `429`.
    pub(crate) stale_rate_limited: AtomicU64,
    /// Download requests answered from the cache.
    pub(crate) download_hits: AtomicU64,
    /// Download requests fetched or revalidated upstream.
    pub(crate) download_misses: AtomicU64,
    /// Body bytes sent to clients.
    pub(crate) bytes_served: Arc<AtomicU64>,
    /// Body bytes received from upstreams.
    pub(crate) upstream_bytes: Arc<AtomicU64>,
    /// Requests answered with a 5xx.
    pub(crate) errors: AtomicU64,
    /// Requests answered `429` at a fill limit.
    pub(crate) fills_refused: AtomicU64,
}

/// A per-cache series: name, type, help, and how to read it.
type Gauge = (&'static str, &'static str, &'static str, fn(&CacheGauges) -> u64);

/// One cache's gauges for the exposition.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CacheGauges {
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
    pub(crate) passes_elsewhere: u64,
}

impl Metrics {
    /// The Prometheus text exposition.
    #[must_use]
    pub(crate) fn render(&self, caches: &[(&str, CacheGauges)], fills_in_flight: usize) -> String {
        let mut out = String::new();
        let counters: [(&str, &str, u64); 14] = [
            ("dunite_requests_total", "Requests answered.", self.requests.load(Ordering::Relaxed)),
            (
                "dunite_blob_hits_total",
                "Blob requests served from the cache.",
                self.blob_hits.load(Ordering::Relaxed),
            ),
            (
                "dunite_blob_misses_total",
                "Blob requests that went upstream.",
                self.blob_misses.load(Ordering::Relaxed),
            ),
            (
                "dunite_manifest_hits_total",
                "Manifest requests served from the cache.",
                self.manifest_hits.load(Ordering::Relaxed),
            ),
            (
                "dunite_manifest_misses_total",
                "Manifest requests that went upstream.",
                self.manifest_misses.load(Ordering::Relaxed),
            ),
            (
                "dunite_stale_tags_served_total",
                "Tags served stale while the upstream was down.",
                self.stale_tags_served.load(Ordering::Relaxed),
            ),
            (
                "dunite_stale_listings_served_total",
                "Tag lists and referrers served stale while the upstream was down.",
                self.stale_listings_served.load(Ordering::Relaxed),
            ),
            (
                "dunite_stale_rate_limited_total",
                "Stale answers served because the upstream answered 429.",
                self.stale_rate_limited.load(Ordering::Relaxed),
            ),
            (
                "dunite_download_hits_total",
                "Downloads served from the cache.",
                self.download_hits.load(Ordering::Relaxed),
            ),
            (
                "dunite_download_misses_total",
                "Downloads fetched or revalidated upstream.",
                self.download_misses.load(Ordering::Relaxed),
            ),
            (
                "dunite_bytes_served_total",
                "Body bytes sent to clients.",
                self.bytes_served.load(Ordering::Relaxed),
            ),
            (
                "dunite_upstream_bytes_total",
                "Body bytes received from upstreams.",
                self.upstream_bytes.load(Ordering::Relaxed),
            ),
            (
                "dunite_errors_total",
                "Requests answered with a server error.",
                self.errors.load(Ordering::Relaxed),
            ),
            (
                "dunite_fills_refused_total",
                "Requests answered 429 because a fill limit was reached.",
                self.fills_refused.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
        }
        let name = "dunite_fills_in_flight";
        let _ = writeln!(
            out,
            "# HELP {name} Upstream fills running (under --max-fills).\n# TYPE {name} gauge\n{name} {fills_in_flight}"
        );
        let gauges: [Gauge; 8] = [
            ("dunite_cache_bytes", "gauge", "Accounted bytes in the cache.", |g| g.bytes),
            ("dunite_cache_max_bytes", "gauge", "The cache's byte cap.", |g| g.max_bytes),
            ("dunite_cache_entries", "gauge", "Entries in the cache.", |g| g.entries),
            ("dunite_evictor_passes_total", "counter", "Eviction passes run.", |g| g.passes),
            ("dunite_evictor_pokes_coalesced_total", "counter", "Pokes folded into a pending pass.", |g| {
                g.pokes_coalesced
            }),
            ("dunite_evictor_evicted_total", "counter", "Entries evicted.", |g| g.evicted),
            ("dunite_evictor_errors_total", "counter", "Failed eviction passes.", |g| g.evictor_errors),
            (
                "dunite_evictor_passes_elsewhere_total",
                "counter",
                "Passes not run because another instance sharing the database was evicting.",
                |g| g.passes_elsewhere,
            ),
        ];
        for (name, kind, help, get) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (cache, g) in caches {
                let _ = writeln!(out, "{name}{{cache=\"{cache}\"}} {}", get(g));
            }
        }
        out
    }
}

/// `stream`, counting the bytes it yields into `served` (`dunite_bytes_served_total` for a
/// response body, `dunite_upstream_bytes_total` for an upstream's).
pub(crate) fn metered<S, E>(
    stream: S,
    served: &Arc<AtomicU64>,
) -> impl Stream<Item = Result<Bytes, E>> + Send + 'static + use<S, E>
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
{
    let served = Arc::clone(served);
    stream.map(move |chunk| {
        if let Ok(bytes) = &chunk {
            served.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        }
        chunk
    })
}
