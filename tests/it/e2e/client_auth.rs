//! Client authentication, access per area, pass-through authorisation and fill limits, with
//! real clients: skopeo logging in with `--src-creds`, curl with Basic and Bearer
//! credentials, and `htpasswd -B` writing the user file.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sha2::Digest as _;
use tokio::io::AsyncWriteExt as _;

use super::harness::{Dunite, Image, Pki, Registry, TlsFiles, assert_same_copy, curl, curl_with, skopeo};
use super::origin::{Head, Origin};

const ALICE: (&str, &str) = ("alice", "secret-pass");
const CI_TOKEN: &str = "ci-token-0123456789abcdef";
const PROMETHEUS_TOKEN: &str = "prom-token-fedcba9876543210";

/// An htpasswd file written by Apache's own tool (`htpasswd -B`), with alice and bob.
fn htpasswd(dir: &Path) -> String {
    let file = dir.join("htpasswd");
    for (i, (user, password)) in [ALICE, ("bob", "bobs-password")].into_iter().enumerate() {
        let create = if i == 0 { "-cbB" } else { "-bB" };
        let htpasswd =
            dunite_testkit::peers::tool("htpasswd", "apache2-utils").unwrap_or_else(|e| panic!("{e}"));
        let status = std::process::Command::new(htpasswd)
            .args([create, file.to_str().unwrap(), user, password])
            .output()
            .unwrap();
        assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    }
    file.display().to_string()
}

/// Over TLS with a private CA, as a mirror beyond loopback is reached: skopeo with
/// `--src-creds` and `--src-cert-dir`, curl with `--cacert`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_log_in_with_htpasswd_users_and_tokens_and_each_area_has_its_grants() {
    let dir = tempfile::tempdir().unwrap();
    let users = htpasswd(dir.path());
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("ci:{CI_TOKEN}\nprometheus:{PROMETHEUS_TOKEN}\n")).unwrap();
    let registry = Registry::start().await;
    let image = Image::build(41, 2, 300_000);
    image.push(registry.addr, "team/app").await;
    let origin = Origin::serve(|_: &Head, _| {
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello".to_vec()
    })
    .await;
    let allow = format!("127.0.0.1:{}", origin.addr.port());
    let pki = Pki::generate("dunite.test");
    let files = TlsFiles::of(&pki);
    let certs = tempfile::tempdir().unwrap();
    let ca = certs.path().join("ca.crt");
    std::fs::write(&ca, &pki.ca).unwrap();
    let cert_dir = certs.path().to_str().unwrap();
    let dunite = Dunite::start_tls(
        registry.addr,
        &[
            "--htpasswd",
            &users,
            "--client-token-file",
            tokens.to_str().unwrap(),
            "--access",
            "metrics=prometheus",
            "--access",
            "download=ci",
            "--dl-allow",
            "127.0.0.1",
            "--dl-allow",
            &allow,
        ],
        &files,
        &[&pki.ca],
    )
    .await;
    let base = dunite.base.clone();
    assert!(base.starts_with("https://"));
    let alice = format!("{}:{}", ALICE.0, ALICE.1);

    // Anonymous: refused with the challenge registries send, so clients log in.
    let root = curl_with(Some(&ca), &format!("{base}/v2/"), &[]).await;
    assert_eq!(root.status, 401);
    assert!(root.headers.contains("www-authenticate: basic realm=\"dunite\""), "{}", root.headers);
    assert!(String::from_utf8_lossy(&root.body).contains("UNAUTHORIZED"));
    for area in ["/metrics", &format!("/dl/http://{}/f", origin.addr)] {
        let got = curl_with(Some(&ca), &format!("{base}{area}"), &[]).await;
        assert_eq!(got.status, 401, "{area}");
        assert!(got.headers.contains("www-authenticate: basic"), "{area}: {}", got.headers);
    }
    assert_eq!(
        curl_with(Some(&ca), &format!("{base}/healthz"), &[]).await.status,
        200,
        "liveness stays open"
    );
    assert_eq!(curl_with(Some(&ca), &format!("{base}/v2/"), &["-u", &alice]).await.status, 200);
    assert_eq!(curl_with(Some(&ca), &format!("{base}/v2/"), &["-u", "alice:wrong"]).await.status, 401);
    assert_eq!(
        curl_with(Some(&ca), &format!("{base}/v2/"), &["-u", "mallory:secret-pass"]).await.status,
        401
    );

    // skopeo logs in as a docker client does, and gets the image.
    let source = format!("docker://{}/team/app:v1", dunite.addr);
    let out = tempfile::tempdir().unwrap();
    let target = format!("dir:{}", out.path().display());
    let tls = ["--src-tls-verify=true", "--src-cert-dir", cert_dir];
    let copy = |extra: &[&str]| {
        let args: Vec<String> = ["copy"]
            .iter()
            .chain(&tls)
            .chain(extra)
            .chain(&[source.as_str(), target.as_str()])
            .map(|s| (*s).to_owned())
            .collect();
        async move { skopeo(&args.iter().map(String::as_str).collect::<Vec<_>>()).await }
    };
    let anonymous = copy(&[]).await.unwrap_err();
    assert!(anonymous.contains("unauthorized"), "refused for want of credentials: {anonymous}");
    assert!(copy(&["--src-creds", "alice:nope"]).await.is_err(), "a wrong password pulled");
    let expected = super::harness::pull(registry.addr, "team/app").await.unwrap();
    copy(&["--src-creds", &alice]).await.unwrap_or_else(|e| panic!("{e}\n{}", dunite.log_text()));
    assert_same_copy(expected.path(), out.path());

    // Metrics only for the prometheus token; downloads only for ci (Bearer, or Basic with
    // the token as the password).
    let metrics = format!("{base}/metrics");
    assert_eq!(
        curl_with(Some(&ca), &metrics, &["-u", &alice]).await.status,
        403,
        "alice has no metrics grant"
    );
    let bearer = format!("Authorization: Bearer {PROMETHEUS_TOKEN}");
    let got = curl_with(Some(&ca), &metrics, &["-H", &bearer]).await;
    assert_eq!(got.status, 200);
    assert!(String::from_utf8_lossy(&got.body).contains("dunite_blob_misses_total"));
    let download = format!("{base}/dl/http://{}/f", origin.addr);
    assert_eq!(curl_with(Some(&ca), &download, &["-u", &alice]).await.status, 403);
    assert_eq!(
        curl_with(Some(&ca), &download, &["-H", &format!("Authorization: Bearer {CI_TOKEN}")]).await.body,
        b"hello"
    );
    assert_eq!(curl_with(Some(&ca), &download, &["-u", &format!("ci:{CI_TOKEN}")]).await.status, 200);
    assert_eq!(
        curl_with(Some(&ca), &download, &["-H", "Authorization: Bearer not-a-token-at-all"]).await.status,
        401
    );

    let log = dunite.log_text();
    for secret in [ALICE.1, CI_TOKEN, PROMETHEUS_TOKEN] {
        assert!(!log.contains(secret), "a secret reached the log:\n{log}");
    }
}

const MANIFEST: &[u8] = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;

/// A layer only `private/app` has upstream.
const SECRET_LAYER: &[u8] = b"the private layer's bytes";

fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// base64 of `user:password`, for the upstream's side of Basic auth.
fn basic(user: &str, password: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes = format!("{user}:{password}").into_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    format!("Basic {out}")
}

/// An upstream with a private repository (`private/app`: the mirror's account and bob may
/// pull it) and a public one (`public/app`: anyone), behind a token service on its own host.
async fn private_upstream(bob_checks: Arc<AtomicU64>) -> Origin {
    Origin::serve(move |head, addr| {
        let respond = |status: &str, extra: &str, body: &[u8]| {
            let mut r = format!(
                "HTTP/1.1 {status}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )
            .into_bytes();
            r.extend_from_slice(body);
            r
        };
        if head.path.starts_with("/token?") {
            let auth = head.headers.get("authorization").cloned();
            let token = match auth {
                None => "anon",
                Some(a) if a == basic("mirror", "mirror-password") => "mirror",
                Some(a) if a == basic("bob", "bobs-upstream-password") => {
                    bob_checks.fetch_add(1, Ordering::SeqCst);
                    "bob"
                }
                Some(_) => return respond("401 Unauthorized", "", b""),
            };
            let body = format!(r#"{{"token":"{token}","expires_in":300}}"#);
            return respond("200 OK", "Content-Type: application/json\r\n", body.as_bytes());
        }
        let token = head.headers.get("authorization").and_then(|a| a.strip_prefix("Bearer ").map(str::to_owned));
        let private = head.path.starts_with("/v2/private/");
        let allowed = match token.as_deref() {
            Some("mirror" | "bob") => true,
            Some("anon") => !private,
            _ => false,
        };
        if !allowed {
            let challenge = format!(
                "WWW-Authenticate: Bearer realm=\"http://{addr}/token\",service=\"up\",scope=\"repository:x:pull\"\r\n"
            );
            return respond("401 Unauthorized", &challenge, b"");
        }
        if head.path.ends_with("/tags/list?n=1") {
            return respond("200 OK", "Content-Type: application/json\r\n", br#"{"name":"x","tags":["v1"]}"#);
        }
        if head.path.ends_with("/manifests/v1") || head.path == format!("/v2/private/app/manifests/{}", digest_of(MANIFEST)) {
            return respond("200 OK", "Content-Type: application/vnd.oci.image.manifest.v1+json\r\n", MANIFEST);
        }
        if head.path == format!("/v2/private/app/blobs/{}", digest_of(SECRET_LAYER)) {
            return respond("200 OK", "Content-Type: application/octet-stream\r\n", SECRET_LAYER);
        }
        respond("404 Not Found", "", b"")
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pass_through_serves_the_cache_only_to_clients_the_upstream_lets_pull() {
    let bob_checks = Arc::new(AtomicU64::new(0));
    let upstream = private_upstream(Arc::clone(&bob_checks)).await;
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        "[credentials.local]\nusername = \"mirror\"\npassword = \"mirror-password\"\n",
    )
    .unwrap();
    let dunite = Dunite::start(
        upstream.addr,
        "64MiB",
        &["--config", config.path().to_str().unwrap(), "--pass-through-auth", "--tag-ttl", "1h"],
    )
    .await;
    let private = format!("http://{}/v2/private/app/manifests/v1", dunite.addr);
    let bob = ["-u", "bob:bobs-upstream-password"];

    let anonymous = curl(&private, &[]).await;
    assert_eq!(anonymous.status, 401, "an anonymous client got a private manifest");
    assert!(anonymous.headers.contains("www-authenticate: basic realm=\"dunite\""), "{}", anonymous.headers);
    let got = curl(&private, &bob).await;
    assert_eq!((got.status, &got.body[..]), (200, MANIFEST), "bob may pull it upstream");
    // Cached now, with the mirror's own account: still nobody else's.
    assert_eq!(curl(&private, &[]).await.status, 401);
    assert_eq!(curl(&private, &["-u", "carol:guess"]).await.status, 403);
    // Its tag list and referrers are pulls of it too.
    for listing in ["tags/list".to_owned(), format!("referrers/sha256:{}", "0".repeat(64))] {
        let url = format!("http://{}/v2/private/app/{listing}", dunite.addr);
        assert_eq!(curl(&url, &[]).await.status, 401, "{listing}");
    }
    for _ in 0..3 {
        assert_eq!(curl(&private, &bob).await.status, 200);
    }
    assert_eq!(bob_checks.load(Ordering::SeqCst), 1, "bob's access is remembered for the TTL");
    // A public repository: anyone the upstream lets in.
    let public = format!("http://{}/v2/public/app/manifests/v1", dunite.addr);
    assert_eq!(curl(&public, &[]).await.status, 200);
    // The cache is shared by digest, but a digest cached through a private repository is not
    // served through a public one the upstream does not hold it in.
    let (manifest, layer) = (digest_of(MANIFEST), digest_of(SECRET_LAYER));
    let through =
        |repo: &str, kind: &str, digest: &str| format!("http://{}/v2/{repo}/{kind}/{digest}", dunite.addr);
    assert_eq!(curl(&through("private/app", "manifests", &manifest), &bob).await.status, 200);
    assert_eq!(curl(&through("private/app", "blobs", &layer), &bob).await.body, SECRET_LAYER);
    for (kind, digest) in [("manifests", &manifest), ("blobs", &layer)] {
        let got = curl(&through("public/app", kind, digest), &[]).await;
        assert_eq!(got.status, 404, "a private {kind} cached for bob went to an anonymous client");
        let got = curl(&through("public/app", kind, digest), &["-I"]).await;
        assert_eq!(got.status, 404, "HEAD of a private {kind} told an anonymous client it is cached");
    }
    assert_eq!(curl(&through("private/app", "blobs", &layer), &bob).await.status, 200, "still bob's");
    assert!(!dunite.log_text().contains("bobs-upstream-password"));
}

/// What the stalling upstream answers for any digest but the stalled one.
const OTHER_BLOB: &[u8] = b"another blob, answered at once";

/// A blob upstream that sends `body`'s head and length at once, then the rest only when
/// `release` is notified; any other digest is answered at once, with [`OTHER_BLOB`].
async fn stalling_upstream(
    stalled: String,
    body: Vec<u8>,
    release: Arc<tokio::sync::Notify>,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let body = Arc::new(body);
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else { return };
            let (stalled, body, release) = (stalled.clone(), Arc::clone(&body), Arc::clone(&release));
            tokio::spawn(async move {
                let Some(head) = Head::read(&mut socket).await else { return };
                let this = head.path.rsplit('/').next().unwrap_or_default().to_owned();
                let answer: Vec<u8> = if this == stalled { body.to_vec() } else { OTHER_BLOB.to_vec() };
                let notified = release.notified();
                let mut out = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    answer.len()
                )
                .into_bytes();
                let half = answer.len() / 2;
                out.extend_from_slice(&answer[..half]);
                let _ = socket.write_all(&out).await;
                if this == stalled {
                    notified.await;
                }
                let _ = socket.write_all(&answer[half..]).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_past_its_fill_limit_gets_429_while_joining_a_running_fill_is_free() {
    let body = dunite_testkit::pseudo_random_bytes(77, 256 << 10);
    let slow = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&body)));
    let release = Arc::new(tokio::sync::Notify::new());
    let (upstream, task) = stalling_upstream(slow.clone(), body.clone(), Arc::clone(&release)).await;
    let dunite = Dunite::start(upstream, "64MiB", &["--max-fills-per-client", "1"]).await;
    let blob = |digest: &str| format!("http://{}/v2/lim/app/blobs/{digest}", dunite.addr);
    let client = reqwest::Client::new();

    // The first request starts the fill, which stalls mid-body: its head has come.
    let first = client.get(blob(&slow)).send().await.unwrap();
    assert_eq!(first.status(), 200);
    // Joining the running fill takes no permit.
    let joiner = client.get(blob(&slow)).send().await.unwrap();
    assert_eq!(joiner.status(), 200, "a client joining a running fill was limited");
    // A second fill by the same client is refused, with Retry-After.
    let other = digest_of(OTHER_BLOB);
    let refused = client.get(blob(&other)).send().await.unwrap();
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "1");
    assert!(refused.text().await.unwrap().contains("TOOMANYREQUESTS"));
    assert_eq!(dunite.metric("dunite_fills_refused_total").await, 1);
    assert_eq!(dunite.metric("dunite_fills_in_flight").await, 1);

    release.notify_waiters();
    assert!(first.bytes().await.unwrap() == body && joiner.bytes().await.unwrap() == body);
    // The fill's permit is given back once its body ended: the other digest may start.
    dunite_testkit::poll_until(Duration::from_secs(30), "the permit given back", async || {
        dunite.metric("dunite_fills_in_flight").await == 0
    })
    .await;
    let other_blob = client.get(blob(&other)).send().await.unwrap();
    assert_eq!(other_blob.status(), 200);
    assert_eq!(&other_blob.bytes().await.unwrap()[..], OTHER_BLOB);
    task.abort();
}

/// The request-head limits `docs/security.md` documents (hyper's, as `axum::serve` sets them):
/// a path over 64 KiB is `414`, more than 100 headers or a head over about 400 KiB `431`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_heads_past_the_documented_limits_are_refused() {
    use tokio::io::AsyncReadExt as _;
    let registry = Registry::start().await;
    let dunite = Dunite::start(registry.addr, "64MiB", &[]).await;
    let status_of = |head: String| async move {
        let mut socket = tokio::net::TcpStream::connect(dunite.addr).await.unwrap();
        // The server may answer and close before it has read all of a large head.
        let _ = socket.write_all(head.as_bytes()).await;
        let mut answer = vec![0; 64];
        let n =
            tokio::time::timeout(Duration::from_secs(30), socket.read(&mut answer)).await.unwrap().unwrap();
        String::from_utf8_lossy(&answer[..n]).split_whitespace().nth(1).unwrap_or_default().to_owned()
    };
    let request = |path: &str, headers: &str| format!("GET {path} HTTP/1.1\r\nHost: m\r\n{headers}\r\n");
    assert_eq!(status_of(request("/healthz", "")).await, "200");
    assert_eq!(status_of(request(&format!("/v2/{}", "a".repeat(70_000)), "")).await, "414");
    let many: String = (0..101).map(|i| format!("X-H{i}: v\r\n")).collect();
    assert_eq!(status_of(request("/healthz", &many)).await, "431");
    let large = format!("X-Large: {}\r\n", "b".repeat(500_000));
    assert_eq!(status_of(request("/healthz", &large)).await, "431");
}

/// SIGHUP re-reads the user file: an added user gets in, a removed one (whose password was
/// verified and remembered) is refused at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_client_users() {
    let dir = tempfile::tempdir().unwrap();
    let users = htpasswd(dir.path());
    let registry = Registry::start().await;
    let dunite = Dunite::start(registry.addr, "64MiB", &["--htpasswd", &users]).await;
    let root = format!("{}/v2/", dunite.base);
    let alice = format!("{}:{}", ALICE.0, ALICE.1);
    assert_eq!(curl(&root, &["-u", &alice]).await.status, 200);
    assert_eq!(curl(&root, &["-u", "carol:carols-password"]).await.status, 401);
    let htpasswd = dunite_testkit::peers::tool("htpasswd", "apache2-utils").unwrap_or_else(|e| panic!("{e}"));
    for args in [vec!["-D", &users, "alice"], vec!["-bB", &users, "carol", "carols-password"]] {
        assert!(std::process::Command::new(&htpasswd).args(args).output().unwrap().status.success());
    }
    dunite.signal("HUP");
    dunite_testkit::poll_until(Duration::from_secs(30), "carol let in after SIGHUP", async || {
        curl(&root, &["-u", "carol:carols-password"]).await.status == 200
    })
    .await;
    assert_eq!(curl(&root, &["-u", &alice]).await.status, 401, "a removed user is refused at once");
    // A broken file at the next SIGHUP: logged, and the users before stay.
    std::fs::write(&users, "carol:not-bcrypt\n").unwrap();
    dunite.signal("HUP");
    dunite_testkit::poll_until(Duration::from_secs(30), "the failed reload logged", async || {
        dunite.log_text().contains("cannot reload the client users")
    })
    .await;
    assert_eq!(curl(&root, &["-u", "carol:carols-password"]).await.status, 200);
    assert!(dunite.stop().await.success(), "SIGHUP did not end the process");
}
