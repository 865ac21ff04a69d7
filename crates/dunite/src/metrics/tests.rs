//! The registry's exposition: every series by its name, the histograms by their labels, the
//! upstream classes, refetch after eviction.

use std::time::Duration;

use axum::http::StatusCode;
use dunite_core::{CacheOptions, EntryCache, EvictionPolicy, Expected};

use super::*;

/// The value of `series` (name and labels, exactly) in `text`, read the way the e2e
/// harness reads it.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

fn reading() -> Reading {
    let blobs = CacheReading {
        bytes: 7,
        max_bytes: 100,
        entries: 2,
        passes: 3,
        fills_in_flight: Some(1),
        ..Default::default()
    };
    Reading { caches: vec![("blobs", blobs), ("tags", CacheReading::default())], fills_in_flight: 4 }
}

/// The series dunite exposed before the registry, by name: none may go.
const KEPT: [&str; 24] = [
    "dunite_requests_total",
    "dunite_blob_hits_total",
    "dunite_blob_misses_total",
    "dunite_manifest_hits_total",
    "dunite_manifest_misses_total",
    "dunite_stale_tags_served_total",
    "dunite_stale_listings_served_total",
    "dunite_stale_rate_limited_total",
    "dunite_download_hits_total",
    "dunite_download_misses_total",
    "dunite_bytes_served_total",
    "dunite_upstream_bytes_total",
    "dunite_errors_total",
    "dunite_fills_refused_total",
    "dunite_fills_in_flight",
    "dunite_cache_bytes{cache=\"blobs\"}",
    "dunite_cache_max_bytes{cache=\"blobs\"}",
    "dunite_cache_entries{cache=\"tags\"}",
    "dunite_evictor_passes_total{cache=\"blobs\"}",
    "dunite_evictor_pokes_coalesced_total{cache=\"blobs\"}",
    "dunite_evictor_evicted_total{cache=\"blobs\"}",
    "dunite_evictor_errors_total{cache=\"blobs\"}",
    "dunite_evictor_passes_elsewhere_total{cache=\"blobs\"}",
    "dunite_cache_fills_in_flight{cache=\"blobs\"}",
];

#[test]
fn every_series_keeps_its_name_in_both_formats() {
    let metrics = Metrics::new();
    metrics.blob_hit();
    metrics.failed(StatusCode::TOO_MANY_REQUESTS, true);
    metrics.failed(StatusCode::TOO_MANY_REQUESTS, false);
    metrics.failed(StatusCode::BAD_GATEWAY, false);
    metrics.failed(StatusCode::NOT_FOUND, false);
    for format in [Format::Prometheus, Format::OpenMetrics] {
        let (content_type, text) = metrics.render(reading(), format);
        for series in KEPT {
            assert!(value(&text, series).is_some(), "{series} missing ({content_type}):\n{text}");
        }
        assert_eq!(value(&text, "dunite_blob_hits_total"), Some(1.0));
        assert_eq!(value(&text, "dunite_fills_refused_total"), Some(1.0));
        assert_eq!(value(&text, "dunite_errors_total"), Some(1.0));
        assert_eq!(value(&text, "dunite_fills_in_flight"), Some(4.0));
        assert_eq!(value(&text, "dunite_cache_max_bytes{cache=\"blobs\"}"), Some(100.0));
        assert_eq!(value(&text, "dunite_evictor_passes_total{cache=\"blobs\"}"), Some(3.0));
        // A cache that has no fills by key shows no fill gauge.
        assert_eq!(value(&text, "dunite_cache_fills_in_flight{cache=\"tags\"}"), None);
        assert!(!text.contains("_created"), "{text}");
        assert!(
            text.contains("# HELP dunite_requests_total Requests answered.\n")
                || text.contains("# HELP dunite_requests Requests answered.\n"),
            "{text}"
        );
        match format {
            Format::OpenMetrics => {
                assert!(content_type.starts_with("application/openmetrics-text"));
                assert!(text.ends_with("# EOF\n"), "{text}");
                assert!(text.contains("# TYPE dunite_requests counter\n"), "{text}");
            }
            Format::Prometheus => {
                assert!(content_type.starts_with("text/plain; version=0.0.4"));
                assert!(!text.contains("# EOF"));
                assert!(text.contains("# TYPE dunite_requests_total counter\n"), "{text}");
            }
        }
    }
}

#[test]
fn prometheus_asks_for_openmetrics_and_gets_it() {
    // What Prometheus 2.x and 3.x send.
    let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    assert_eq!(Format::accepted(Some(prometheus)), Format::OpenMetrics);
    assert_eq!(Format::accepted(Some("*/*")), Format::Prometheus);
    assert_eq!(Format::accepted(None), Format::Prometheus);
}

#[test]
fn the_request_histogram_observes_by_route_and_outcome() {
    let metrics = Metrics::new();
    metrics.request(Route::Blob, Outcome::Hit, Duration::from_millis(3));
    metrics.request(Route::Blob, Outcome::Hit, Duration::from_millis(300));
    metrics.request(Route::Manifest, Outcome::Stale, Duration::from_secs(2));
    let (_, text) = metrics.render(Reading::default(), Format::Prometheus);
    let hit = "route=\"blob\",outcome=\"hit\"";
    assert_eq!(value(&text, &format!("dunite_request_duration_seconds_count{{{hit}}}")), Some(2.0), "{text}");
    assert_eq!(
        value(&text, &format!("dunite_request_duration_seconds_bucket{{{hit},le=\"0.005\"}}")),
        Some(1.0)
    );
    assert_eq!(
        value(&text, &format!("dunite_request_duration_seconds_bucket{{{hit},le=\"0.5\"}}")),
        Some(2.0)
    );
    let sum = value(&text, &format!("dunite_request_duration_seconds_sum{{{hit}}}")).unwrap();
    assert!((sum - 0.303).abs() < 1e-9, "{sum}");
    let stale = "route=\"manifest\",outcome=\"stale\"";
    assert_eq!(value(&text, &format!("dunite_request_duration_seconds_count{{{stale}}}")), Some(1.0));
    assert_eq!(value(&text, "dunite_requests_total"), Some(3.0));
    assert!(!text.contains("route=\"download\""), "label sets appear once observed");
}

#[test]
fn upstream_answers_are_counted_by_class_with_429_on_its_own() {
    let metrics = Metrics::new();
    metrics.upstream_answered(Duration::from_millis(20), Some(StatusCode::TOO_MANY_REQUESTS));
    metrics.upstream_answered(Duration::from_millis(20), Some(StatusCode::TOO_MANY_REQUESTS));
    metrics.upstream_answered(Duration::from_millis(20), Some(StatusCode::NOT_FOUND));
    metrics.upstream_answered(Duration::from_millis(20), Some(StatusCode::OK));
    metrics.upstream_answered(Duration::from_secs(30), None);
    let (_, text) = metrics.render(Reading::default(), Format::Prometheus);
    let responses =
        |class: &str| value(&text, &format!("dunite_upstream_responses_total{{class=\"{class}\"}}"));
    assert_eq!(
        ["2xx", "3xx", "4xx", "429", "5xx", "error"].map(responses),
        [Some(1.0), Some(0.0), Some(1.0), Some(2.0), Some(0.0), Some(1.0)],
        "{text}"
    );
    assert_eq!(value(&text, "dunite_upstream_request_duration_seconds_count{class=\"429\"}"), Some(2.0));
    assert_eq!(
        value(&text, "dunite_upstream_request_duration_seconds_bucket{class=\"error\",le=\"30\"}"),
        Some(1.0),
        "{text}"
    );
}

#[test]
fn served_bytes_are_counted_in_all_and_by_source() {
    let metrics = Metrics::new();
    metrics.served("blobs", ByteSource::Cache).add(300);
    metrics.served("blobs", ByteSource::Upstream).add(100);
    metrics.served("downloads", CacheOutcome::Stale.into()).add(50);
    metrics.upstream_bytes().add(100);
    let (_, text) = metrics.render(Reading::default(), Format::Prometheus);
    assert_eq!(value(&text, "dunite_bytes_served_total"), Some(450.0));
    assert_eq!(value(&text, "dunite_upstream_bytes_total"), Some(100.0));
    let served = |cache: &str, source: &str| {
        value(&text, &format!("dunite_served_bytes_total{{cache=\"{cache}\",source=\"{source}\"}}"))
    };
    assert_eq!(served("blobs", "cache"), Some(300.0));
    assert_eq!(served("blobs", "upstream"), Some(100.0));
    assert_eq!(served("downloads", "cache"), Some(50.0));
    assert_eq!(served("manifests", "upstream"), Some(0.0), "known label sets start at zero");
}

/// The wiring end to end: a real cache's evictor reports what it evicted, and a miss of it
/// soon after counts once; a miss after the window does not.
#[tokio::test]
async fn a_miss_of_an_entry_evicted_within_ten_minutes_is_a_refetch() {
    let dir = tempfile::tempdir().unwrap();
    let policy = EvictionPolicy::new(150).with_low_watermark(100);
    let cache = EntryCache::open(CacheOptions::new(dir.path(), "blobs", policy)).await.unwrap();
    let metrics = Metrics::new();
    metrics.watch_evictions("blobs", &cache);
    // Least recently used first: `a` goes when `b` lands, `b` when `c` does.
    for key in ["a", "b", "c"] {
        cache.store(key, &[7u8; 100][..], &Expected::new(), "").await.unwrap();
        cache.evict_if_over_cap().await.unwrap();
    }
    assert!(!cache.contains("a").await.unwrap() && !cache.contains("b").await.unwrap());
    // The rest on Tokio's paused clock (the cache's I/O is done).
    tokio::time::pause();
    let refetches = |metrics: &Metrics| {
        let (_, text) = metrics.render(Reading::default(), Format::Prometheus);
        value(&text, "dunite_refetch_after_eviction_total{cache=\"blobs\"}").unwrap()
    };
    assert_eq!(refetches(&metrics), 0.0);
    metrics.refill("blobs", "c");
    metrics.refill("downloads", "a");
    assert_eq!(refetches(&metrics), 0.0, "c was not evicted; a not from downloads");
    tokio::time::advance(Duration::from_secs(9 * 60)).await;
    metrics.refill("blobs", "a");
    metrics.refill("blobs", "a");
    assert_eq!(refetches(&metrics), 1.0, "a refetch, counted once however many clients join it");
    tokio::time::advance(Duration::from_secs(60)).await;
    metrics.refill("blobs", "b");
    assert_eq!(refetches(&metrics), 1.0, "evicted 10 minutes before");
}
