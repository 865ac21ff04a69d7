//! The download proxy, driven with curl.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sha2::Digest as _;

use super::harness::{Dunite, Registry};
use super::origin::{Answer, Origin};

/// `curl -s -o FILE -w %{http_code} URL`: (status, body).
async fn curl(url: &str) -> (u16, Vec<u8>) {
    let (status, body, _) = curl_checked(url).await;
    (status, body)
}

/// As [`curl`], plus whether curl itself succeeded (a transfer cut short fails).
async fn curl_checked(url: &str) -> (u16, Vec<u8>, bool) {
    let out = tempfile::NamedTempFile::new().unwrap();
    let run = tokio::process::Command::new("curl")
        .args(["-s", "-o"])
        .arg(out.path())
        .args(["-w", "%{http_code}", "--max-time", "60", url])
        .output();
    let output =
        tokio::time::timeout(Duration::from_secs(90), run).await.unwrap().expect("curl is installed");
    let status = String::from_utf8_lossy(&output.stdout).trim().parse().unwrap();
    (status, std::fs::read(out.path()).unwrap(), output.status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_go_through_the_allowlist_and_are_cached() {
    let body = dunite_testkit::pseudo_random_bytes(5, 700_000);
    let sha = hex::encode(sha2::Sha256::digest(&body));
    let mut answers = HashMap::new();
    answers.insert("/tool.tar".to_owned(), Answer::File { body: body.clone(), etag: "v1".into() });
    answers.insert("/away".to_owned(), Answer::Redirect("http://localhost:9/elsewhere".into()));
    let encoded = dunite_testkit::pseudo_random_bytes(6, 1000);
    answers.insert(
        "/group%2Fproject/a%3Fb".to_owned(),
        Answer::File { body: encoded.clone(), etag: "e".into() },
    );
    let origin = Origin::start(answers).await;
    // The registry is not used here, but `dunite serve` needs an upstream to start.
    let registry = Registry::start().await;
    let allow = origin.addr.to_string();
    let dunite = Dunite::start(registry.addr, "64MiB", &["--dl-allow", &allow]).await;
    let base = format!("http://{}/dl", dunite.addr);
    let origin_url = format!("http://{}", origin.addr);

    let (status, got) = curl(&format!("{base}/{origin_url}/tool.tar")).await;
    assert_eq!(status, 200);
    assert!(got == body, "downloaded bytes differ");
    assert_eq!(origin.requests.load(Ordering::SeqCst), 1);
    assert!(
        dunite.metric("dunite_upstream_bytes_total").await >= body.len() as u64,
        "download bytes are counted"
    );
    // Clients have their bytes once verified; the commit follows.
    dunite_testkit::poll_until(Duration::from_secs(30), "the download cached", async || {
        dunite.metric("dunite_cache_entries{cache=\"downloads\"}").await == 1
    })
    .await;

    // Fresh: served from the cache, the origin is not asked.
    let (status, again) = curl(&format!("{base}/{origin_url}/tool.tar")).await;
    assert_eq!(status, 200);
    assert!(again == body);
    assert_eq!(origin.requests.load(Ordering::SeqCst), 1);
    assert_eq!(dunite.metric("dunite_download_hits_total").await, 1);

    // Pinned by its sha256: served; pinned by a wrong one: refused, nothing cached under it.
    let (status, _) = curl(&format!("{base}/sha256:{sha}/{origin_url}/tool.tar")).await;
    assert_eq!(status, 200);
    // The pinned miss streams (its status goes out with the first bytes), so a mismatch,
    // known at the end, cuts the body: curl fails, and never holds the whole body.
    let wrong = "0".repeat(64);
    let (status, got, complete) = curl_checked(&format!("{base}/sha256:{wrong}/{origin_url}/tool.tar")).await;
    assert!(status == 502 || (!complete && got.len() < body.len()), "a pin mismatch is refused: {status}");

    // Not an open proxy: other hosts, a redirect leaving the allowlist, other schemes.
    let (status, _) = curl(&format!("{base}/http://localhost:{}/tool.tar", origin.addr.port())).await;
    assert_eq!(status, 403);
    let (status, _) = curl(&format!("{base}/{origin_url}/away")).await;
    assert_eq!(status, 502, "a redirect out of the allowlist is refused");
    let (status, _) = curl(&format!("{base}/file:///etc/passwd")).await;
    assert_eq!(status, 400);
    let (status, _) = curl(&format!("{base}/{origin_url}/missing")).await;
    assert_eq!(status, 404);

    // Percent-encoded characters in the target's path are passed on as sent.
    let (status, got) = curl(&format!("{base}/{origin_url}/group%2Fproject/a%3Fb")).await;
    assert_eq!(status, 200);
    assert!(got == encoded, "the encoded path reached another file");
}

/// A miss is one upstream transfer however many clients ask at once, streamed to all of them;
/// a first request pinned to the wrong sha256 is cut off and caches nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_download_misses_share_one_transfer_and_a_bad_pin_caches_nothing() {
    let body = dunite_testkit::pseudo_random_bytes(6, 3_000_000);
    let mut answers = HashMap::new();
    answers.insert("/big.bin".to_owned(), Answer::File { body: body.clone(), etag: "b1".into() });
    answers.insert("/pinned.bin".to_owned(), Answer::File { body: body.clone(), etag: "p1".into() });
    let origin = Origin::start(answers).await;
    let registry = Registry::start().await;
    let allow = origin.addr.to_string();
    let dunite = Dunite::start(registry.addr, "64MiB", &["--dl-allow", &allow]).await;
    let url = format!("http://{}/dl/http://{}/big.bin", dunite.addr, origin.addr);

    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let url = url.clone();
        clients.spawn(async move { curl_checked(&url).await });
    }
    for (status, got, ok) in clients.join_all().await {
        assert!(ok && status == 200, "status {status}");
        assert!(got == body, "a client got different bytes");
    }
    // Requests that arrived after the fill completed are hits; none is a second transfer.
    assert_eq!(origin.requests.load(Ordering::SeqCst), 1, "one upstream transfer");

    let wrong = "f".repeat(64);
    let pinned = format!("http://{}/dl/sha256:{wrong}/http://{}/pinned.bin", dunite.addr, origin.addr);
    let (_, got, ok) = curl_checked(&pinned).await;
    assert!(!ok || got.len() < body.len(), "a pin mismatch must not look like a complete download");
    assert!(got != body);
    // Nothing was cached: an unpinned request goes upstream again.
    let before = origin.requests.load(Ordering::SeqCst);
    let (status, got) = curl(&format!("http://{}/dl/http://{}/pinned.bin", dunite.addr, origin.addr)).await;
    assert_eq!(status, 200);
    assert!(got == body);
    assert_eq!(origin.requests.load(Ordering::SeqCst), before + 1);
}

/// An allowlisted host name that resolves to a loopback (or private) address is refused
/// unless private networks are explicitly allowed; an allowlisted IP literal is explicit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowlisted_names_must_resolve_to_public_addresses_unless_private_networks_are_allowed() {
    let body = dunite_testkit::pseudo_random_bytes(8, 10_000);
    let mut answers = HashMap::new();
    answers.insert("/f".to_owned(), Answer::File { body: body.clone(), etag: "f1".into() });
    let origin = Origin::start(answers).await;
    let registry = Registry::start().await;
    let allow = format!("localhost:{}", origin.addr.port());
    let by_name = format!("http://{allow}/f");

    let strict = Dunite::start(registry.addr, "64MiB", &["--dl-allow", &allow]).await;
    let (status, _) = curl(&format!("http://{}/dl/{by_name}", strict.addr)).await;
    assert_eq!(status, 502, "localhost resolves to loopback: refused by default");
    assert_eq!(origin.requests.load(Ordering::SeqCst), 0, "nothing reached the origin");

    let open =
        Dunite::start(registry.addr, "64MiB", &["--dl-allow", &allow, "--dl-allow-private-networks"]).await;
    let (status, got) = curl(&format!("http://{}/dl/{by_name}", open.addr)).await;
    assert_eq!(status, 200);
    assert!(got == body);
}

/// The allowlist names ports: a bare host is its scheme's default port only, `host:port`
/// exactly that port, for the request and for every redirect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_allowlist_names_ports_not_only_hosts() {
    let body = dunite_testkit::pseudo_random_bytes(9, 10_000);
    let mut answers = HashMap::new();
    answers.insert("/f".to_owned(), Answer::File { body: body.clone(), etag: "f1".into() });
    let other = Origin::start(answers.clone()).await;
    answers.insert("/away".to_owned(), Answer::Redirect(format!("http://{}/f", other.addr)));
    let origin = Origin::start(answers).await;
    let registry = Registry::start().await;

    let bare = Dunite::start(registry.addr, "64MiB", &["--dl-allow", "127.0.0.1"]).await;
    let (status, _) = curl(&format!("http://{}/dl/http://{}/f", bare.addr, origin.addr)).await;
    assert_eq!(status, 403, "a bare host allows port 80 only, not {}", origin.addr.port());
    assert_eq!(origin.requests.load(Ordering::SeqCst), 0);

    let allowed = origin.addr.to_string();
    let exact = Dunite::start(registry.addr, "64MiB", &["--dl-allow", &allowed]).await;
    let (status, got) = curl(&format!("http://{}/dl/http://{}/f", exact.addr, origin.addr)).await;
    assert_eq!(status, 200);
    assert!(got == body);
    let (status, _) = curl(&format!("http://{}/dl/http://{}/away", exact.addr, origin.addr)).await;
    assert_eq!(status, 502, "a redirect to another port of an allowlisted host is refused");
    assert_eq!(other.requests.load(Ordering::SeqCst), 0);
}
