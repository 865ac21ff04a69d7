//! Upstream faults during a blob fill: a transfer cut short and wrong bytes for a digest.
//! Each reaches the client as an error, nothing is cached, the evictor lives on, and the
//! blob is served once the upstream behaves again.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use sha2::Digest as _;

use super::harness::Dunite;
use super::origin::Origin;

/// What the mock registry does with the blob.
const CUT: u8 = 0;
const WRONG: u8 = 1;
const GOOD: u8 = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_or_wrong_upstream_blobs_are_errors_and_never_cached() {
    let blob = dunite_testkit::pseudo_random_bytes(21, 500_000);
    let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&blob)));
    let mode = Arc::new(AtomicU8::new(CUT));
    let (served, path) = (blob.clone(), format!("/v2/faulty/app/blobs/{digest}"));
    let state = Arc::clone(&mode);
    let registry = Origin::serve(move |head, _| {
        if head.path != path {
            return b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec();
        }
        let head =
            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", served.len());
        let mut response = head.into_bytes();
        match state.load(Ordering::SeqCst) {
            CUT => response.extend_from_slice(&served[..served.len() / 3]),
            WRONG => response.extend(served.iter().map(|b| b ^ 0x5a)),
            _ => response.extend_from_slice(&served),
        }
        response
    })
    .await;
    let dunite = Dunite::start(registry.addr, "64MiB", &[]).await;
    let url = format!("http://{}/v2/faulty/app/blobs/{digest}", dunite.addr);

    for fault in [CUT, WRONG] {
        mode.store(fault, Ordering::SeqCst);
        let body = match reqwest::get(&url).await {
            Ok(response) => response.bytes().await.map(|b| b.to_vec()),
            Err(e) => Err(e),
        };
        match body {
            Ok(bytes) => panic!("fault {fault}: the client got a complete body of {} bytes", bytes.len()),
            Err(e) => assert!(e.is_body() || e.is_request() || e.is_decode(), "fault {fault}: {e}"),
        }
        assert_eq!(dunite.metric("dunite_cache_entries{cache=\"blobs\"}").await, 0, "fault {fault}: cached");
        assert_eq!(dunite.metric("dunite_cache_bytes{cache=\"blobs\"}").await, 0);
    }
    assert_eq!(dunite.metric("dunite_evictor_errors_total{cache=\"blobs\"}").await, 0);

    // The fault clears: the same blob is fetched, verified, cached and served.
    mode.store(GOOD, Ordering::SeqCst);
    let bytes = reqwest::get(&url).await.unwrap().bytes().await.unwrap();
    assert!(bytes[..] == blob[..]);
    // Clients have their bytes once verified; the commit follows.
    dunite_testkit::poll_until(std::time::Duration::from_secs(30), "the blob cached", async || {
        dunite.metric("dunite_cache_entries{cache=\"blobs\"}").await == 1
    })
    .await;
    let again = reqwest::get(&url).await.unwrap().bytes().await.unwrap();
    assert!(again[..] == blob[..]);
    assert!(dunite.metric("dunite_blob_hits_total").await >= 1);
    let log = dunite.log_text();
    assert!(log.contains("fill failed; nothing cached"), "the faults are logged:\n{log}");
}

/// Registries redirect blobs to pre-signed URLs (a signature in the query), and download URLs
/// may carry tokens. When a fetch fails (the target refuses the connection, or cuts the body),
/// errors name the URL: its query must reach neither the log nor a client. (For the redirects,
/// reqwest's errors name the request's URL, not the redirect's: those cases guard against a
/// change there. The download's query would be shown without `UrlKey::redacted` and
/// `upstream::redact`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_urls_in_failed_fetches_reach_no_log_and_no_client() {
    let closed = super::harness::free_port();
    let blob = dunite_testkit::pseudo_random_bytes(22, 100_000);
    let digest = |tag: &str| format!("sha256:{}", hex::encode(sha2::Sha256::digest(tag.as_bytes())));
    let (refused_blob, cut_blob, refused_manifest) = (digest("a"), digest("b"), digest("c"));
    let routes = [
        (
            format!("/v2/signed/app/blobs/{refused_blob}"),
            format!("http://127.0.0.1:{closed}/cdn/a?X-Amz-Signature=SECRETA"),
        ),
        (format!("/v2/signed/app/blobs/{cut_blob}"), "/cdn/b?X-Amz-Signature=SECRETB".to_owned()),
        (
            format!("/v2/signed/app/manifests/{refused_manifest}"),
            format!("http://127.0.0.1:{closed}/m?sig=SECRETC"),
        ),
    ];
    let upstream = Origin::serve(move |head, _| {
        if head.path.starts_with("/cdn/b") {
            let mut response =
                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", blob.len()).into_bytes();
            response.extend_from_slice(&blob[..blob.len() / 2]);
            return response;
        }
        match routes.iter().find(|(path, _)| *path == head.path) {
            Some((_, to)) => format!("HTTP/1.1 307 Temporary Redirect\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").into_bytes(),
            None => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
        }
    })
    .await;
    // The closed port is another loopback address than the upstream's: allowed explicitly,
    // so the fetches fail by the connection refused, not by the address checks.
    let allow = format!("127.0.0.1:{closed}");
    let dunite =
        Dunite::start(upstream.addr, "64MiB", &["--dl-allow", &allow, "--upstream-allow-private"]).await;
    let base = format!("http://{}", dunite.addr);
    let mut answers = String::new();
    for path in [
        format!("/v2/signed/app/blobs/{refused_blob}"),
        format!("/v2/signed/app/blobs/{cut_blob}"),
        format!("/v2/signed/app/manifests/{refused_manifest}"),
        format!("/dl/http://127.0.0.1:{closed}/file?token=SECRETD"),
    ] {
        let response = reqwest::get(format!("{base}{path}")).await.unwrap();
        let status = response.status();
        let body = response.bytes().await.map(|b| String::from_utf8_lossy(&b).into_owned());
        if let Ok(body) = &body {
            assert!(!status.is_success(), "{path}: {status} with a whole body");
            answers.push_str(body);
        }
    }
    let log = dunite.log_text();
    for secret in ["SECRETA", "SECRETB", "SECRETC", "SECRETD"] {
        assert!(!log.contains(secret), "{secret} reached the log:\n{log}");
    }
    for secret in ["SECRETA", "SECRETB", "SECRETC"] {
        assert!(!answers.contains(secret), "{secret} reached a client:\n{answers}");
    }
    assert!(!answers.contains("SECRETD"), "the download's token was shown:\n{answers}");
    // The errors still say why (the cause, from the error's source chain) and where the
    // fetch went, query aside.
    assert!(answers.to_lowercase().contains("connection refused"), "no cause in:\n{answers}");
    assert!(answers.contains(&format!("127.0.0.1:{closed}/file?REDACTED")), "{answers}");
    assert!(dunite.stop().await.success());
}
