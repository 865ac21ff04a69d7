//! Where an upstream registry can send the mirror: redirects and token realms stay off
//! loopback and private addresses other than the upstream's own host and port, unless
//! `--upstream-allow-private` says otherwise. "Another private host" is 127.0.0.2 here, so
//! the tests never leave the machine.

use std::sync::atomic::Ordering;

use super::harness::Dunite;
use super::origin::{Head, Origin};

const MANIFEST: &[u8] = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;

fn manifest_answer() -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        MANIFEST.len()
    )
    .into_bytes();
    r.extend_from_slice(MANIFEST);
    r
}

fn redirect(to: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 307 Temporary Redirect\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .into_bytes()
}

/// A server on 127.0.0.2 (a private address that is not the upstream) that answers every
/// request with a valid manifest, and counts them.
async fn elsewhere() -> Origin {
    Origin::serve_on([127, 0, 0, 2], |_: &Head, _| manifest_answer()).await
}

/// `GET` a manifest through `dunite`: (status, body).
async fn manifest(dunite: &Dunite, reference: &str) -> (u16, Vec<u8>) {
    let url = format!("http://{}/v2/app/manifests/{reference}", dunite.addr);
    let response = reqwest::get(url).await.unwrap();
    (response.status().as_u16(), response.bytes().await.unwrap().to_vec())
}

/// A tag answered with a redirect to another private address is an upstream error, and that
/// address is never asked; a redirect to the upstream's own host and port is followed; with
/// `--upstream-allow-private`, so is the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_to_private_addresses_are_refused_except_to_the_upstream_itself() {
    let elsewhere = elsewhere().await;
    let away = format!("http://{}/v2/app/manifests/v1", elsewhere.addr);
    let upstream = Origin::serve(move |head, addr| match head.path.as_str() {
        "/v2/app/manifests/away" => redirect(&away),
        "/v2/app/manifests/home" => redirect(&format!("http://{addr}/v2/app/manifests/v1")),
        "/v2/app/manifests/v1" => manifest_answer(),
        _ => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
    })
    .await;

    let strict = Dunite::start(upstream.addr, "64MiB", &["--tag-ttl", "0s"]).await;
    let (status, body) = manifest(&strict, "away").await;
    assert_eq!(status, 502, "a redirect to 127.0.0.2 was followed: {}", String::from_utf8_lossy(&body));
    assert_eq!(elsewhere.requests.load(Ordering::SeqCst), 0, "the private address was asked");
    let (status, body) = manifest(&strict, "home").await;
    assert_eq!(status, 200, "a redirect to the upstream's own host and port is followed");
    assert_eq!(body, MANIFEST);

    let open = Dunite::start(upstream.addr, "64MiB", &["--tag-ttl", "0s", "--upstream-allow-private"]).await;
    let (status, body) = manifest(&open, "away").await;
    assert_eq!(status, 200, "--upstream-allow-private follows it");
    assert_eq!(body, MANIFEST);
    assert_eq!(elsewhere.requests.load(Ordering::SeqCst), 1);
}

/// A token realm on another private address is not asked (with or without credentials):
/// the pull fails as an upstream error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_realm_on_a_private_address_is_not_asked() {
    let elsewhere = elsewhere().await;
    let realm = format!("http://{}/token", elsewhere.addr);
    let upstream = Origin::serve(move |_, _| {
        format!(
            "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"{realm}\",service=\"mock\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .into_bytes()
    })
    .await;
    let dunite = Dunite::start(upstream.addr, "64MiB", &[]).await;
    let (status, _) = manifest(&dunite, "v1").await;
    assert_eq!(status, 502);
    assert_eq!(elsewhere.requests.load(Ordering::SeqCst), 0, "the realm on 127.0.0.2 was asked");
}
