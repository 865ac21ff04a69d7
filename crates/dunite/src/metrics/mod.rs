//! The server's metrics: one [`Metrics`] registry (prometheus-client), owned by the
//! [`App`](crate::App) and shared with the features, exposed at `GET /metrics`.
//!
//! One concept per file: `labels.rs` (the bounded label values: route, outcome, status
//! class, byte source), `caches.rs` (the per-cache series, read at each scrape),
//! `evictions.rs` (the record behind refetch-after-eviction). The series, and the PromQL of
//! the ratios, are listed in `docs/server.md`.
//!
//! Counters are registered under their name without `_total`: the encoder appends it (both
//! formats), so the exposed names are the ones dashboards and tests read.

mod caches;
mod evictions;
mod labels;

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use bytes::Bytes;
use futures_util::{Stream, StreamExt as _};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::time::Instant;

use dunite_core::EntryCache;

pub(crate) use caches::{CacheReading, Reading};
pub(crate) use labels::{ByteSource, Outcome, Route, StatusClass};

use caches::CacheSeries;
use evictions::{MAX_REMEMBERED, REFETCH_WINDOW, RecentEvictions};

/// How a request was answered, recorded by handlers (as a response extension) for the
/// request log and the request histogram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// From the cache.
    Hit,
    /// From the upstream (and cached).
    Miss,
    /// From the cache, stale, because the upstream was down.
    Stale,
}

/// The latency buckets, in seconds: 1 ms (a hit from the page cache) to a minute (a large
/// layer's first byte from a slow upstream).
const LATENCY_BUCKETS: [f64; 15] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// The caches whose bytes are served to clients and whose misses are fills by key.
const SERVING_CACHES: [&str; 3] = ["blobs", "manifests", "downloads"];

/// The `cache` label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct CacheLabel {
    cache: &'static str,
}

/// The labels of `dunite_served_bytes_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ServedLabels {
    cache: &'static str,
    source: &'static str,
}

/// The labels of `dunite_request_duration_seconds`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    outcome: &'static str,
}

/// The label of the upstream series.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ClassLabel {
    class: &'static str,
}

/// A histogram family of latencies.
type Latencies<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every series dunite exposes, in one registry. Cheap to update from any task (atomics, and
/// a short lock for a histogram's first use of a label set); shared as `Arc<Metrics>`.
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    requests: Counter,
    blob_hits: Counter,
    blob_misses: Counter,
    manifest_hits: Counter,
    manifest_misses: Counter,
    stale_tags_served: Counter,
    stale_listings_served: Counter,
    stale_rate_limited: Counter,
    download_hits: Counter,
    download_misses: Counter,
    bytes_served: Counter,
    upstream_bytes: Counter,
    errors: Counter,
    fills_refused: Counter,
    served_bytes: Family<ServedLabels, Counter>,
    request_duration: Latencies<RequestLabels>,
    upstream_duration: Latencies<ClassLabel>,
    upstream_responses: Family<ClassLabel, Counter>,
    refetches: Family<CacheLabel, Counter>,
    evictions: Arc<RecentEvictions>,
    caches: Arc<CacheSeries>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every series registered, the labelled counters of known label values at zero (so a
    /// `rate()` sees their first increase).
    pub(crate) fn new() -> Self {
        let mut registry = Registry::default();
        let mut counter = |name: &str, help: &str| {
            let counter = Counter::default();
            registry.register(name, help, counter.clone());
            counter
        };
        let requests = counter("dunite_requests", "Requests answered");
        let blob_hits = counter("dunite_blob_hits", "Blob requests served from the cache");
        let blob_misses = counter("dunite_blob_misses", "Blob requests that went upstream");
        let manifest_hits = counter("dunite_manifest_hits", "Manifest requests served from the cache");
        let manifest_misses = counter("dunite_manifest_misses", "Manifest requests that went upstream");
        let stale_tags_served = counter(
            "dunite_stale_tags_served",
            "Tags served stale while the upstream did not answer (unreachable, 5xx, 429)",
        );
        let stale_listings_served = counter(
            "dunite_stale_listings_served",
            "Tag lists and referrers served stale while the upstream did not answer",
        );
        let stale_rate_limited =
            counter("dunite_stale_rate_limited", "Stale answers served because the upstream answered 429");
        let download_hits = counter("dunite_download_hits", "Downloads served from the cache");
        let download_misses = counter("dunite_download_misses", "Downloads fetched or revalidated upstream");
        let bytes_served = counter("dunite_bytes_served", "Body bytes sent to clients");
        let upstream_bytes = counter("dunite_upstream_bytes", "Body bytes received from upstreams");
        let errors = counter("dunite_errors", "Requests answered with a server error");
        let fills_refused =
            counter("dunite_fills_refused", "Requests answered 429 because a fill limit was reached");

        let served_bytes = Family::<ServedLabels, Counter>::default();
        for cache in SERVING_CACHES {
            for source in [ByteSource::Cache, ByteSource::Upstream] {
                drop(served_bytes.get_or_create(&ServedLabels { cache, source: source.as_str() }));
            }
        }
        registry.register(
            "dunite_served_bytes",
            "Body bytes sent to clients, by cache and where they came from (the byte-hit ratio)",
            served_bytes.clone(),
        );
        let request_duration: Latencies<RequestLabels> = Family::new_with_constructor(latencies);
        registry.register(
            "dunite_request_duration_seconds",
            "Time to answer a request's head, by route and outcome",
            request_duration.clone(),
        );
        let upstream_duration: Latencies<ClassLabel> = Family::new_with_constructor(latencies);
        registry.register(
            "dunite_upstream_request_duration_seconds",
            "Time to an upstream's answer head (token exchange included), by status class",
            upstream_duration.clone(),
        );
        let upstream_responses = Family::<ClassLabel, Counter>::default();
        for class in StatusClass::ALL {
            drop(upstream_responses.get_or_create(&ClassLabel { class: class.as_str() }));
        }
        registry.register(
            "dunite_upstream_responses",
            "Upstream answers by status class (429 on its own; error: no answer)",
            upstream_responses.clone(),
        );
        let refetches = Family::<CacheLabel, Counter>::default();
        for cache in SERVING_CACHES {
            drop(refetches.get_or_create(&CacheLabel { cache }));
        }
        registry.register(
            "dunite_refetch_after_eviction",
            "Misses of an entry this instance evicted less than 10 minutes before",
            refetches.clone(),
        );
        let caches = Arc::new(CacheSeries::default());
        registry.register_collector(Box::new(Arc::clone(&caches)));
        Self {
            registry,
            requests,
            blob_hits,
            blob_misses,
            manifest_hits,
            manifest_misses,
            stale_tags_served,
            stale_listings_served,
            stale_rate_limited,
            download_hits,
            download_misses,
            bytes_served,
            upstream_bytes,
            errors,
            fills_refused,
            served_bytes,
            request_duration,
            upstream_duration,
            upstream_responses,
            refetches,
            evictions: Arc::new(RecentEvictions::new(REFETCH_WINDOW, MAX_REMEMBERED)),
            caches,
        }
    }

    /// A blob served from the cache.
    pub(crate) fn blob_hit(&self) {
        self.blob_hits.inc();
    }

    /// A blob request that went upstream.
    pub(crate) fn blob_miss(&self) {
        self.blob_misses.inc();
    }

    /// A manifest served from the cache.
    pub(crate) fn manifest_hit(&self) {
        self.manifest_hits.inc();
    }

    /// A manifest request that went upstream.
    pub(crate) fn manifest_miss(&self) {
        self.manifest_misses.inc();
    }

    /// A tag served stale because the upstream did not answer.
    pub(crate) fn stale_tag_served(&self) {
        self.stale_tags_served.inc();
    }

    /// A tag list or referrers list served stale because the upstream did not answer.
    pub(crate) fn stale_listing_served(&self) {
        self.stale_listings_served.inc();
    }

    /// A stale answer (tag or listing) served because the upstream answered `429`.
    pub(crate) fn stale_rate_limited(&self) {
        self.stale_rate_limited.inc();
    }

    /// A download served from the cache.
    pub(crate) fn download_hit(&self) {
        self.download_hits.inc();
    }

    /// A download fetched or revalidated upstream.
    pub(crate) fn download_miss(&self) {
        self.download_misses.inc();
    }

    /// A feature answered a request with the error status `status`: a server error is
    /// counted, and so is a refusal at one of the mirror's own fill limits (`fill_limit`; an
    /// upstream's `429` relayed is not one).
    pub(crate) fn failed(&self, status: StatusCode, fill_limit: bool) {
        if status.is_server_error() {
            self.errors.inc();
        } else if fill_limit {
            self.fills_refused.inc();
        }
    }

    /// A request answered after `duration`: counted, and observed by route and outcome.
    pub(crate) fn request(&self, route: Route, outcome: Outcome, duration: Duration) {
        self.requests.inc();
        let labels = RequestLabels { route: route.as_str(), outcome: outcome.as_str() };
        self.request_duration.get_or_create(&labels).observe(duration.as_secs_f64());
    }

    /// Where a response body from `cache` (one of `blobs`, `manifests`, `downloads`) counts
    /// its bytes: `dunite_bytes_served_total` and `dunite_served_bytes_total` by `source`.
    pub(crate) fn served(&self, cache: &'static str, source: ByteSource) -> ByteMeter {
        let by_source =
            self.served_bytes.get_or_create_owned(&ServedLabels { cache, source: source.as_str() });
        ByteMeter { all: self.bytes_served.clone(), part: Some(by_source) }
    }

    /// Where an upstream body counts its bytes (`dunite_upstream_bytes_total`).
    pub(crate) fn upstream_bytes(&self) -> ByteMeter {
        ByteMeter { all: self.upstream_bytes.clone(), part: None }
    }

    /// Send one upstream request: `request`'s time to an answer is observed by the answer's
    /// status class (or `error` when there is none), and the answer counted.
    pub(crate) async fn upstream<E>(
        &self,
        request: impl Future<Output = Result<reqwest::Response, E>>,
    ) -> Result<reqwest::Response, E> {
        let started = Instant::now();
        let answer = request.await;
        self.upstream_answered(started.elapsed(), answer.as_ref().ok().map(reqwest::Response::status));
        answer
    }

    /// An upstream answered `status` (`None`: did not answer) after `duration`.
    pub(crate) fn upstream_answered(&self, duration: Duration, status: Option<StatusCode>) {
        let label = ClassLabel { class: StatusClass::of(status).as_str() };
        self.upstream_responses.get_or_create(&label).inc();
        self.upstream_duration.get_or_create(&label).observe(duration.as_secs_f64());
    }

    /// Record what `cache`'s evictor evicts, for [`refill`](Self::refill). Only this
    /// instance's evictions are seen (see `evictions.rs`).
    pub(crate) fn watch_evictions(&self, name: &'static str, cache: &EntryCache) {
        let evictions = Arc::clone(&self.evictions);
        cache.evictor().on_evicted(move |victim| evictions.evicted(name, &victim.key));
    }

    /// A miss of `key` in `cache` is being filled: counted in
    /// `dunite_refetch_after_eviction_total` if this instance evicted it within 10 minutes.
    pub(crate) fn refill(&self, cache: &'static str, key: &str) {
        if self.evictions.take_refetch(cache, key) {
            self.refetches.get_or_create(&CacheLabel { cache }).inc();
        }
    }

    /// The exposition, with `reading` for the per-cache series: OpenMetrics text if `format`
    /// says so, else the Prometheus text format 0.0.4. Returns the content type and the text.
    pub(crate) fn render(&self, reading: Reading, format: Format) -> (&'static str, String) {
        // Two scrapes at once may each encode the other's reading: both are current.
        self.caches.set(reading);
        let mut text = String::new();
        // Writing to a `String` fails only if an encoder does; the text so far is served.
        let (content_type, _) = match format {
            Format::OpenMetrics => (
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                prometheus_client::encoding::text::encode(&mut text, &self.registry),
            ),
            Format::Prometheus => (
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry),
            ),
        };
        (content_type, text)
    }
}

/// A histogram of [`LATENCY_BUCKETS`].
fn latencies() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// The text format of an exposition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// OpenMetrics 1.0 (what Prometheus asks for first), ending in `# EOF`.
    OpenMetrics,
    /// The Prometheus text format 0.0.4 (curl, older scrapers).
    Prometheus,
}

impl Format {
    /// The format an `Accept` header asks for: OpenMetrics if it names it.
    pub(crate) fn accepted(accept: Option<&str>) -> Self {
        if accept.is_some_and(|accept| accept.contains("application/openmetrics-text")) {
            Self::OpenMetrics
        } else {
            Self::Prometheus
        }
    }
}

/// Where a body's bytes are counted: one or two counters, cheap to clone into a stream.
#[derive(Debug, Clone)]
pub(crate) struct ByteMeter {
    all: Counter,
    part: Option<Counter>,
}

impl ByteMeter {
    /// `bytes` more went by.
    pub(crate) fn add(&self, bytes: u64) {
        self.all.inc_by(bytes);
        if let Some(part) = &self.part {
            part.inc_by(bytes);
        }
    }

    /// The bytes counted in all so far.
    #[cfg(test)]
    pub(crate) fn total(&self) -> u64 {
        self.all.get()
    }
}

/// `stream`, counting the bytes it yields into `meter`.
pub(crate) fn metered<S, E>(
    stream: S,
    meter: &ByteMeter,
) -> impl Stream<Item = Result<Bytes, E>> + Send + 'static + use<S, E>
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
{
    let meter = meter.clone();
    stream.map(move |chunk| {
        if let Ok(bytes) = &chunk {
            meter.add(bytes.len() as u64);
        }
        chunk
    })
}

#[cfg(test)]
mod tests;
