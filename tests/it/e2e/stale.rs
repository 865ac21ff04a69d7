//! A tag's last answer stands in while the upstream refuses to answer: unreachable, failing
//! (5xx) or rate limiting (`429 Too Many Requests`, Docker Hub's limit), for at most
//! `--tag-max-stale`; past that, the upstream's refusal reaches the client.

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};

use sha2::Digest as _;

use super::harness::Dunite;
use super::origin::Origin;

const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const MANIFEST: &[u8] =
    br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[]}"#;

/// An upstream serving one manifest as `app:v1`, or answering every request with the status
/// in `status` when it is not 200.
async fn flaky_upstream() -> (Origin, Arc<AtomicU16>) {
    let status = Arc::new(AtomicU16::new(200));
    let answering = Arc::clone(&status);
    let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(MANIFEST)));
    let origin = Origin::serve(move |head, _| match answering.load(Ordering::SeqCst) {
        200 if head.path == "/v2/app/manifests/v1" => {
            let mut answer = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: {MANIFEST_TYPE}\r\nDocker-Content-Digest: {digest}\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n",
                MANIFEST.len()
            )
            .into_bytes();
            answer.extend_from_slice(MANIFEST);
            answer
        }
        200 => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
        refusing => {
            let body = r#"{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down"}]}"#;
            format!(
                "HTTP/1.1 {refusing} Refused\r\nContent-Type: application/json\r\nRetry-After: 60\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .into_bytes()
        }
    })
    .await;
    (origin, status)
}

async fn get_tag(dunite: &Dunite) -> (u16, Vec<u8>) {
    let url = format!("http://{}/v2/app/manifests/v1", dunite.addr);
    let response = reqwest::Client::new().get(url).header("accept", MANIFEST_TYPE).send().await.unwrap();
    (response.status().as_u16(), response.bytes().await.unwrap().to_vec())
}

/// Docker Hub's rate limit (`429`) and any upstream 5xx are outages to a client: the tag's last
/// answer is served, and counted, by reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_or_failing_upstream_gets_the_stale_tag_served() {
    let (upstream, status) = flaky_upstream().await;
    let dunite = Dunite::start(upstream.addr, "64MiB", &["--tag-ttl", "0s"]).await;
    assert_eq!(get_tag(&dunite).await, (200, MANIFEST.to_vec()));

    for (refusal, served) in [(429, 1), (500, 2), (503, 3)] {
        status.store(refusal, Ordering::SeqCst);
        assert_eq!(get_tag(&dunite).await, (200, MANIFEST.to_vec()), "upstream answering {refusal}");
        assert_eq!(dunite.metric("dunite_stale_tags_served_total").await, served);
    }
    assert_eq!(dunite.metric("dunite_stale_rate_limited_total").await, 1);
}

/// Past `--tag-max-stale` the last answer is not served: the upstream's rate limit reaches the
/// client as a `429` (to back off), its failure as a `502`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_max_stale_the_upstreams_refusal_is_relayed() {
    let (upstream, status) = flaky_upstream().await;
    let flags = ["--tag-ttl", "0s", "--tag-max-stale", "0s"];
    let dunite = Dunite::start(upstream.addr, "64MiB", &flags).await;
    assert_eq!(get_tag(&dunite).await.0, 200);

    status.store(429, Ordering::SeqCst);
    let (code, body) = get_tag(&dunite).await;
    assert_eq!(code, 429, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("TOOMANYREQUESTS"));
    status.store(503, Ordering::SeqCst);
    assert_eq!(get_tag(&dunite).await.0, 502);
    assert_eq!(dunite.metric("dunite_stale_tags_served_total").await, 0);
}
