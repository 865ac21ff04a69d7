//! `/metrics` as Prometheus and the Grafana dashboard read it: every series the dashboard's
//! queries name is in a live exposition, OpenMetrics is served to a scraper that asks for it,
//! and a pull of an image whose blobs were just evicted counts refetches.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use super::harness::{Dunite, Image, Registry, assert_same_copy, pull};
use super::origin::{Answer, Origin};

/// The metric names in every `expr` of the dashboard (all of dunite's start `dunite_`).
fn dashboard_series() -> BTreeSet<String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/grafana-dashboard.json");
    let dashboard: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 10, "the dashboard's queries: {exprs:?}");
    let mut names = BTreeSet::new();
    for expr in exprs {
        let mut rest = expr.as_str();
        // Bounded: each turn moves past one occurrence.
        while let Some(at) = rest.find("dunite_") {
            let name: String =
                rest[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            rest = &rest[at + name.len()..];
            names.insert(name);
        }
    }
    names
}

fn collect_exprs(value: &serde_json::Value, into: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr", serde_json::Value::String(expr)) => into.push(expr.clone()),
                    _ => collect_exprs(value, into),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|item| collect_exprs(item, into)),
        _ => {}
    }
}

/// The sample names of an exposition (text or OpenMetrics).
fn exposed(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| line.split(['{', ' ']).next().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_series_the_dashboard_queries_is_in_a_live_exposition() {
    let registry = Registry::start().await;
    let image = Image::build(41, 1, 100_000);
    image.push(registry.addr, "e2e/dash").await;
    let body = dunite_testkit::pseudo_random_bytes(42, 50_000);
    let size = body.len() as u64;
    let origin =
        Origin::start(HashMap::from([("/f".to_owned(), Answer::File { body, etag: "v".into() })])).await;
    let dunite = Dunite::start(registry.addr, "64MiB", &["--dl-allow", &origin.addr.to_string()]).await;
    let pulled = pull(dunite.addr, "e2e/dash").await.unwrap();
    let blob_bytes = assert_same_copy(pulled.path(), pulled.path());
    let client = reqwest::Client::new();
    let download = format!("http://{}/dl/http://{}/f", dunite.addr, origin.addr);
    for _ in 0..2 {
        let answer = client.get(&download).send().await.unwrap();
        assert_eq!(answer.status(), 200);
        answer.bytes().await.unwrap();
        // The second is a hit once the first is committed.
        dunite_testkit::poll_until(Duration::from_secs(30), "the download cached", async || {
            dunite.metric("dunite_cache_entries{cache=\"downloads\"}").await == 1
        })
        .await;
    }
    // Bytes served, by where they came from: every byte of this first pull and the first
    // download from upstream, the second download from the cache; manifests are counted too.
    let served = async |cache: &str, source: &str| {
        dunite.metric(&format!("dunite_served_bytes_total{{cache=\"{cache}\",source=\"{source}\"}}")).await
    };
    assert_eq!(served("blobs", "upstream").await, blob_bytes);
    assert_eq!(served("blobs", "cache").await, 0);
    assert!(served("manifests", "upstream").await > 0);
    assert_eq!((served("downloads", "upstream").await, served("downloads", "cache").await), (size, size));
    let all = dunite.metric("dunite_bytes_served_total").await;
    assert_eq!(all, blob_bytes + served("manifests", "upstream").await + 2 * size);

    let metrics = format!("http://{}/metrics", dunite.addr);
    let text = client.get(&metrics).send().await.unwrap().text().await.unwrap();
    let have = exposed(&text);
    let missing: Vec<_> = dashboard_series().into_iter().filter(|name| !have.contains(name)).collect();
    assert!(missing.is_empty(), "the dashboard reads series /metrics lacks: {missing:?}\n{text}");

    // What Prometheus asks for: OpenMetrics, with the same samples, ending in `# EOF`.
    let accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    let answer = client.get(&metrics).header("accept", accept).send().await.unwrap();
    let content_type = answer.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(content_type.starts_with("application/openmetrics-text; version=1.0.0"), "{content_type}");
    let open = answer.text().await.unwrap();
    assert!(open.ends_with("# EOF\n"), "{open}");
    assert_eq!(open.matches("# EOF").count(), 1);
    for name in dashboard_series() {
        assert!(exposed(&open).contains(&name), "{name} missing from the OpenMetrics exposition");
    }
    dunite.stop().await;
}

/// Pulling an image whose blobs the cap just pushed out counts refetches after eviction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulling_an_image_again_after_its_blobs_were_evicted_counts_refetches() {
    let registry = Registry::start().await;
    for (seed, repo) in [(51, "e2e/first"), (52, "e2e/second")] {
        Image::build(seed, 1, 400_000).push(registry.addr, repo).await;
    }
    let cap: u64 = 600_000;
    let dunite = Dunite::start(registry.addr, &cap.to_string(), &[]).await;
    let refetched = async || dunite.metric("dunite_refetch_after_eviction_total{cache=\"blobs\"}").await;
    pull(dunite.addr, "e2e/first").await.unwrap();
    assert_eq!(refetched().await, 0);
    pull(dunite.addr, "e2e/second").await.unwrap();
    dunite_testkit::poll_until(Duration::from_secs(30), "the first image's layer evicted", async || {
        dunite.metric("dunite_evictor_evicted_total{cache=\"blobs\"}").await >= 1
            && dunite.metric("dunite_cache_bytes{cache=\"blobs\"}").await <= cap
    })
    .await;
    pull(dunite.addr, "e2e/first").await.unwrap();
    // At most one per eviction so far (this pull's own stores may have evicted more).
    let evicted = dunite.metric("dunite_evictor_evicted_total{cache=\"blobs\"}").await;
    let refetches = refetched().await;
    assert!((1..=evicted).contains(&refetches), "{refetches} refetches of {evicted} evicted");
    dunite.stop().await;
}
