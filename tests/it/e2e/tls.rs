//! Serving over TLS (`--tls-cert`, `--tls-key`): curl and skopeo trust a private CA, plain
//! HTTP is not served on the TLS port, and SIGHUP swaps the certificate for new connections
//! while the open ones go on (and keeps the old one when the new files are bad).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokio::process::Command;

use super::harness::{
    Dunite, Image, Pki, Registry, TlsFiles, assert_same_copy, free_port, pull, skopeo, tool,
};

/// An upstream address nothing listens on: these tests never reach the upstream.
fn nowhere() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// Run curl with `args` (bounded by `--max-time`): its exit code and standard output.
async fn curl(args: &[&str]) -> (i32, String) {
    let run = Command::new(tool("curl"))
        .args(["--silent", "--max-time", "10"])
        .args(args)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(30), run).await.unwrap().unwrap();
    (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_trusts_the_ca_and_plain_http_on_the_tls_port_is_not_served() {
    let pki = Pki::generate("dunite.test");
    let files = TlsFiles::of(&pki);
    let dunite = Dunite::start_tls(nowhere(), &[], &files, &[&pki.ca]).await;
    let ca = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca.path(), &pki.ca).unwrap();
    let ca = ca.path().to_str().unwrap();
    let https = format!("https://{}/healthz", dunite.addr);
    let http = format!("http://{}/healthz", dunite.addr);

    assert_eq!(curl(&["--cacert", ca, &https]).await, (0, "ok\n".to_owned()));
    assert_eq!(
        curl(&["--cacert", ca, &format!("https://localhost:{}/healthz", dunite.addr.port())]).await,
        (0, "ok\n".to_owned()),
        "the leaf names localhost too"
    );
    // 60: the peer's certificate cannot be verified with the known CA certificates.
    let (code, body) = curl(&[&https]).await;
    assert_eq!(code, 60, "without the CA, verification fails: {body:?}");
    let (code, body) = curl(&[&http]).await;
    assert_ne!(code, 0, "plain HTTP is not served: {body:?}");
    assert!(body.is_empty(), "nothing is answered to plain HTTP: {body:?}");
    assert!(reqwest::get(&http).await.is_err(), "plain HTTP is not served");

    // The failed handshakes cost the server nothing: it serves on, and shuts down cleanly.
    assert_eq!(curl(&["--cacert", ca, &https]).await, (0, "ok\n".to_owned()));
    assert!(dunite.metric("dunite_requests_total").await >= 3);
    let (status, log) = dunite.stop_with_log().await;
    assert!(status.success(), "{status}\n{log}");
    assert!(log.contains("serving HTTPS") && log.contains("dunite.test"), "{log}");
    assert!(!log.contains(" ERROR "), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_pulls_over_tls_with_the_ca_in_its_cert_dir() {
    let registry = Registry::start().await;
    let image = Image::build(17, 2, 200_000);
    image.push(registry.addr, "e2e/tls").await;
    let direct = pull(registry.addr, "e2e/tls").await.unwrap();
    let pki = Pki::generate("dunite.test");
    let files = TlsFiles::of(&pki);
    let dunite = Dunite::start_tls(registry.addr, &[], &files, &[&pki.ca]).await;
    // skopeo's convention (containers-certs.d): `*.crt` in the directory are CA roots.
    let certs = tempfile::tempdir().unwrap();
    std::fs::write(certs.path().join("ca.crt"), &pki.ca).unwrap();
    let source = format!("docker://{}/e2e/tls:v1", dunite.addr);
    let copy = |dest: &Path, cert_dir: &Path| {
        let target = format!("dir:{}", dest.display());
        let cert_dir = cert_dir.display().to_string();
        let source = source.clone();
        async move {
            skopeo(&["copy", "--src-tls-verify=true", "--src-cert-dir", &cert_dir, &source, &target]).await
        }
    };

    let untrusted = tempfile::tempdir().unwrap();
    let empty = tempfile::tempdir().unwrap();
    let refused = copy(untrusted.path(), empty.path()).await.unwrap_err();
    assert!(refused.contains("certificate"), "without the CA skopeo refuses the mirror: {refused}");

    let mirrored = tempfile::tempdir().unwrap();
    copy(mirrored.path(), certs.path()).await.unwrap_or_else(|e| panic!("{e}\n{}", dunite.log_text()));
    assert_same_copy(direct.path(), mirrored.path());
    assert_eq!(dunite.metric("dunite_blob_misses_total").await, 3, "two layers and a config");
    assert!(dunite.stop().await.success());
}

/// SIGHUP: new connections get the new certificate (polled for, with a deadline), the
/// connection opened before keeps working, and bad files at the next SIGHUP leave the
/// certificate served as it was, with an error in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_swaps_the_certificate_for_new_connections_and_keeps_open_ones() {
    let (a, b) = (Pki::generate("a.dunite.test"), Pki::generate("b.dunite.test"));
    let files = TlsFiles::of(&a);
    let dunite = Dunite::start_tls(nowhere(), &[], &files, &[&a.ca, &b.ca]).await;
    let healthz = format!("https://{}/healthz", dunite.addr);
    // Each fresh client opens a new connection, trusting one CA only: it succeeds exactly when
    // the certificate served to new connections is that CA's.
    let fresh_connection_trusts = async |pki: &Pki| pki.client().get(&healthz).send().await.is_ok();

    // A keep-alive connection that trusts A only: once B is served, a new connection of this
    // client would fail verification (a reload also ends the resumption of sessions from
    // before it), so its later successes are on this very connection.
    let kept = a.client();
    assert_eq!(kept.get(&healthz).send().await.unwrap().text().await.unwrap(), "ok\n");
    assert!(!fresh_connection_trusts(&b).await, "B is not served yet");

    b.install(&files);
    dunite.signal("HUP");
    dunite_testkit::poll_until(Duration::from_secs(30), "new connections get certificate B", async || {
        fresh_connection_trusts(&b).await
    })
    .await;
    assert!(!fresh_connection_trusts(&a).await, "A is no longer served to new connections");
    let answer = kept.get(&healthz).send().await;
    assert!(
        answer.as_ref().is_ok_and(|r| r.status().is_success()),
        "the connection opened before the reload still works: {answer:?}"
    );
    assert!(dunite.log_text().contains("TLS certificate reloaded"), "{}", dunite.log_text());

    // Bad files: A's certificate with B's key. The reload fails and B stays.
    std::fs::write(&files.cert, &a.cert).unwrap();
    dunite.signal("HUP");
    dunite_testkit::poll_until(Duration::from_secs(30), "the failed reload logged", async || {
        dunite.log_text().contains("cannot reload the TLS certificate")
    })
    .await;
    assert!(fresh_connection_trusts(&b).await, "B is still served after a bad reload");
    assert!(!fresh_connection_trusts(&a).await);
    assert!(kept.get(&healthz).send().await.is_ok_and(|r| r.status().is_success()));

    let (status, log) = dunite.stop_with_log().await;
    assert!(status.success(), "{status}\n{log}");
    let failure = log.lines().find(|l| l.contains("cannot reload the TLS certificate")).unwrap();
    assert!(failure.contains("ERROR") && failure.contains("does not fit"), "{failure}");
    assert!(failure.contains("b.dunite.test"), "it names the certificate kept: {failure}");
    assert!(!log.contains("PRIVATE KEY"), "no key material in the log:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_certificate_or_key_is_refused_at_start_up() {
    let (a, b) = (Pki::generate("a.dunite.test"), Pki::generate("b.dunite.test"));
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, garbage) = (dir.path().join("a.pem"), dir.path().join("b.key"), dir.path().join("x.pem"));
    std::fs::write(&cert, &a.cert).unwrap();
    std::fs::write(&key, &b.key).unwrap();
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let data = tempfile::tempdir().unwrap();
    for (args, expected) in [
        (vec!["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()], "does not fit"),
        (vec!["--tls-cert", garbage.to_str().unwrap(), "--tls-key", key.to_str().unwrap()], "no CERTIFICATE"),
        (vec!["--tls-cert", cert.to_str().unwrap()], "both or neither"),
    ] {
        let run = Command::new(super::harness::dunite_binary())
            .args(["serve", "--listen", &nowhere().to_string(), "--data-dir"])
            .arg(data.path())
            .args(&args)
            .env("NO_COLOR", "1")
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(Duration::from_secs(30), run).await.unwrap().unwrap();
        let text = String::from_utf8_lossy(&output.stdout);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {text}");
        assert!(text.contains(expected), "{args:?}: {text}");
    }
}
