//! Upstream token authentication, against a registry that demands a Bearer token.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::harness::Dunite;
use super::origin::Origin;

const USER: &str = "puller";
const PASSWORD: &str = "pa55-never-logged";
const TOKEN: &str = "tok-never-logged-either";
const MANIFEST: &[u8] = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;

fn basic_auth() -> String {
    // base64("puller:pa55-never-logged"), computed by hand so the test needs no encoder.
    format!("Basic {}", "cHVsbGVyOnBhNTUtbmV2ZXItbG9nZ2Vk")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_follow_the_bearer_challenge_with_credentials_and_never_log_secrets() {
    assert_eq!(USER.len() + PASSWORD.len(), 23, "the hand-made basic-auth value above encodes these");
    let token_requests = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&token_requests);
    let registry = Origin::serve(move |head, addr| {
        if head.path.starts_with("/token?") {
            if head.headers.get("authorization") != Some(&basic_auth()) {
                return b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec();
            }
            assert!(head.path.contains("scope=repository%3Aauth%2Fapp%3Apull"), "{}", head.path);
            counter.fetch_add(1, Ordering::SeqCst);
            let body = format!(r#"{{"token":"{TOKEN}","expires_in":300}}"#);
            return format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).into_bytes();
        }
        if head.headers.get("authorization") != Some(&format!("Bearer {TOKEN}")) {
            return format!(
                "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"http://{addr}/token\",service=\"mock\",scope=\"repository:auth/app:pull\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            .into_bytes();
        }
        if head.path == "/v2/auth/app/manifests/v1" {
            let mut r = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                MANIFEST.len()
            )
            .into_bytes();
            r.extend_from_slice(MANIFEST);
            return r;
        }
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec()
    })
    .await;

    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        format!("[credentials.local]\nusername = \"{USER}\"\npassword = \"{PASSWORD}\"\n"),
    )
    .unwrap();
    let config_path = config.path().display().to_string();
    // Debug level: the token exchange itself logs there.
    let dunite = Dunite::start_logging(
        registry.addr,
        "64MiB",
        &["--config", &config_path, "--tag-ttl", "0s", "--allow-anonymous-private"],
        "debug",
    )
    .await;

    for _ in 0..3 {
        let body = reqwest::get(format!("http://{}/v2/auth/app/manifests/v1", dunite.addr)).await.unwrap();
        assert_eq!(body.status(), 200);
        assert_eq!(&body.bytes().await.unwrap()[..], MANIFEST);
    }
    assert_eq!(token_requests.load(Ordering::SeqCst), 1, "the token is cached until it expires");
    let log = dunite.log_text();
    assert!(log.contains("obtained upstream token"), "the exchange is logged (without the token):\n{log}");
    for secret in [PASSWORD, TOKEN, "cHVsbGVyOnBhNTUtbmV2ZXItbG9nZ2Vk"] {
        assert!(!log.contains(secret), "a secret reached the log:\n{log}");
    }
}
