//! Hostile input: the public parsers fuzzed with arbitrary and traversal-shaped strings, and a
//! running dunite fed traversal attempts, oversized requests and methods it does not serve.
//!
//! The fuzzing respects `PROPTEST_CASES`.

use std::net::SocketAddr;
use std::time::Duration;

use proptest::prelude::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use dunite::fuzzing;
use dunite::spec::{Reference, is_valid_name};
use dunite_download::UrlKey;
use dunite_oci::Digest;

use crate::rig::{Server, Upstream, tail};

/// Pieces that make up traversal-shaped and near-valid inputs.
const FRAGMENTS: &[&str] = &[
    "..",
    ".",
    "/",
    "%2e%2e",
    "%2E%2E",
    "%2f",
    "%2F",
    "%5c",
    "\\",
    "%00",
    "\0",
    ":",
    "a",
    "b0",
    "_",
    "__",
    "-",
    "A",
    "sha256:",
    "sha512:",
    "0123456789abcdef",
    "etc",
    "passwd",
    "http://",
    "https://",
    "file://",
    "h.example",
    ":8080",
    "?",
    "#",
    "@",
    "~",
    " ",
    "é",
    "//",
];

fn shaped() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(FRAGMENTS), 0..16).prop_map(|parts| parts.concat())
}

fn hostile_text() -> impl Strategy<Value = String> {
    prop_oneof![any::<String>(), "[a-z0-9._/%:-]{0,80}", shaped()]
}

/// Raw bytes: what an upstream's header or manifest may hold.
fn hostile_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![prop::collection::vec(any::<u8>(), 0..512), hostile_text().prop_map(String::into_bytes),]
}

/// A `Range` check's input: the blob size (8 bytes, big-endian), then the header.
fn range_input() -> impl Strategy<Value = Vec<u8>> {
    let size = prop_oneof![Just(0u64), 1u64..1000, Just(u64::MAX), any::<u64>()];
    let spec = prop_oneof!["bytes=[0-9]{0,21}-[0-9]{0,21}", "[ a-z=0-9,-]{0,40}", hostile_text()];
    (size, spec).prop_map(|(size, spec)| [size.to_be_bytes().as_slice(), spec.as_bytes()].concat())
}

/// A manifest declaring a media type, or a challenge with parameters, among other JSON.
fn manifest_input() -> impl Strategy<Value = Vec<u8>> {
    let declared = prop_oneof!["[a-z0-9.+/-]{1,60}", any::<String>()];
    (declared, "[a-z]{0,20}", any::<String>()).prop_map(|(declared, extra, odd)| {
        let manifest = serde_json::json!({ "schemaVersion": 2, "mediaType": declared, extra: [odd] });
        serde_json::to_vec(&manifest).unwrap()
    })
}

fn challenge_input() -> impl Strategy<Value = Vec<u8>> {
    let param =
        ("[ ,]{0,2}", "[A-Za-z ]{0,8}", prop_oneof!["\"[^\"]{0,20}\"", "[^,]{0,20}", "\"[a\\\\]{0,6}"]);
    ("(B|b)earer ", prop::collection::vec(param, 0..5)).prop_map(|(scheme, params)| {
        let params: String =
            params.into_iter().map(|(sep, key, value)| format!("{sep}{key}={value}")).collect();
        format!("{scheme}{params}").into_bytes()
    })
}

/// A `Link` header: links to the listing's path or elsewhere, absolute or not, with queries of
/// hostile characters (raw and encoded) and `rel` parameters.
fn link_input() -> impl Strategy<Value = Vec<u8>> {
    let target = prop_oneof![
        "/v2/a/tags/list",
        "https://r.example/v2/a/tags/list",
        "/v2/b/tags/list",
        "[a-z/:.]{0,12}"
    ];
    let query = "([a-z]{1,4}=[a-z<>,;%\\x22 0-9A-F]{0,8}&?){0,4}";
    let rel = prop_oneof!["; rel=\"next\"", "; rel=next", "; rel=\"prev\"", "", ";rel=\"next\"; title=x"];
    prop::collection::vec((target, query, rel), 1..3).prop_map(|links| {
        let links: Vec<String> = links.into_iter().map(|(t, q, r)| format!("<{t}?{q}>{r}")).collect();
        links.join(", ").into_bytes()
    })
}

/// An `Accept` header made of manifest types, other types, `*/*` and `q` parameters.
fn accept_input() -> impl Strategy<Value = Vec<u8>> {
    let media_type = prop::sample::select(
        &[
            "application/vnd.oci.image.index.v1+json",
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.docker.distribution.manifest.list.v2+json",
            "application/vnd.docker.distribution.manifest.v2+json",
            "Application/VND.OCI.Image.Index.v1+JSON",
            "*/*",
            "text/html",
            "",
        ][..],
    );
    let param = prop::sample::select(
        &["", ";q=0", ";Q=0.000", ";q=0.5", ";q=1", "; q=0", ";charset=utf-8", ";q="][..],
    );
    prop::collection::vec((media_type, param, prop::sample::select(&[",", ", ", " ,"][..])), 0..6).prop_map(
        |items| items.into_iter().map(|(t, p, sep)| format!("{t}{p}{sep}")).collect::<String>().into_bytes(),
    )
}

// The properties themselves are `dunite::fuzzing`'s checks, shared with the cargo-fuzz targets
// in `fuzz/`: here proptest drives them with traversal-shaped inputs, there libFuzzer does.
proptest! {
    #[test]
    fn names_accepted_satisfy_the_grammar_and_are_never_paths(text in hostile_text()) {
        fuzzing::name(text.as_bytes());
    }

    #[test]
    fn tags_and_references_accepted_round_trip(text in hostile_text()) {
        fuzzing::reference(text.as_bytes());
    }

    #[test]
    fn digests_accepted_are_exactly_algorithm_colon_lower_hex(text in hostile_text()) {
        fuzzing::digest(text.as_bytes());
    }

    #[test]
    fn digests_built_from_hex_round_trip(hex in "[0-9a-f]{64}") {
        let text = format!("sha256:{hex}");
        prop_assert_eq!(text.parse::<Digest>().unwrap().to_string(), text.clone());
        let upper = format!("sha256:{}", hex.to_uppercase());
        let has_letter = hex.contains(|c: char| c.is_ascii_alphabetic());
        prop_assert!(!has_letter || upper.parse::<Digest>().is_err(), "upper case accepted: {}", upper);
        let escaped = format!("sha256:{hex}/..");
        prop_assert!(escaped.parse::<Digest>().is_err(), "accepted {}", escaped);
    }

    #[test]
    fn url_keys_are_canonical_http_with_no_dot_segments(text in hostile_text(), path in shaped()) {
        for input in [text.clone(), format!("http://h.example/{path}"), format!("https://h.example/a/{path}?q")] {
            fuzzing::url_key(input.as_bytes());
        }
    }

    #[test]
    fn download_targets_are_keys_with_a_host_and_no_credentials(text in hostile_text(), path in shaped(), hex in "[0-9a-fA-F]{0,66}") {
        for input in [
            text.clone(),
            format!("http://h.example/{path}"),
            format!("sha256:{hex}/https://{path}h.example/x?{path}"),
            format!("http://{path}@h.example/{path}"),
        ] {
            fuzzing::download_target(input.as_bytes());
        }
    }

    #[test]
    fn ranges_served_lie_within_the_blob(input in range_input()) {
        fuzzing::range(&input);
    }

    #[test]
    fn manifest_media_types_are_header_values(bytes in hostile_bytes(), manifest in manifest_input()) {
        fuzzing::manifest_media_type(&bytes);
        fuzzing::manifest_media_type(&manifest);
    }

    #[test]
    fn tag_keys_ask_the_upstream_for_what_they_key_on(bytes in hostile_bytes(), accept in accept_input()) {
        fuzzing::tag_keys(&bytes);
        fuzzing::tag_keys(&accept);
    }

    #[test]
    fn bearer_challenges_parse_without_panicking(bytes in hostile_bytes(), challenge in challenge_input()) {
        fuzzing::bearer_challenge(&bytes);
        fuzzing::bearer_challenge(&challenge);
    }

    #[test]
    fn upstream_links_come_back_as_one_link_on_the_mirrors_path(bytes in hostile_bytes(), link in link_input()) {
        fuzzing::next_link(&bytes);
        fuzzing::next_link(&link);
    }
}

/// The seed inputs of the fuzz targets (`fuzz/seeds/<check>/`), and any input a fuzzer found
/// that broke a check once (kept there as a regression), run through their checks.
#[test]
fn fuzz_seeds_pass_their_checks() {
    let seeds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds");
    let mut ran = 0;
    for (name, check) in fuzzing::CHECKS {
        let dir = seeds.join(name);
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for entry in entries {
            let path = entry.unwrap().path();
            let input = std::fs::read(&path).unwrap();
            if let Err(panic) = std::panic::catch_unwind(|| check(&input)) {
                panic!("{name} fails on {}: {panic:?}", path.display());
            }
            ran += 1;
        }
    }
    assert!(ran >= fuzzing::CHECKS.len(), "only {ran} seeds");
}

#[test]
fn absolute_and_traversal_inputs_are_rejected() {
    let hex = "0".repeat(64);
    for name in ["/etc/passwd", "..", "a/..", "../a", "a/%2e%2e", "a%2fb", "a/./b", "a\\..\\b", "/", "a/", ""]
    {
        assert!(!is_valid_name(name), "{name:?}");
    }
    for reference in ["..", "../etc", "%2e%2e", "a%2fb", "/etc/passwd", "sha256:..%2f..", "a/b"] {
        assert!(Reference::parse(reference).is_err(), "{reference:?}");
    }
    for digest in
        [format!("sha256:../{hex}"), format!("sha256:{hex}/"), format!("/sha256:{hex}"), "sha256:..".into()]
    {
        assert!(digest.parse::<Digest>().is_err(), "{digest:?}");
    }
    for url in ["file:///etc/passwd", "/etc/passwd", "ftp://h/x", "../x", "%2e%2e/x"] {
        assert!(UrlKey::parse(url).is_err(), "{url:?}");
    }
    let key = UrlKey::parse("http://h.example/a/%2e%2e/%2E./../b").unwrap();
    assert_eq!(key.as_str(), "http://h.example/b");
}

/// One raw HTTP/1.1 exchange: send `request` (while reading, so an early answer is seen),
/// return the status and the body. `None` when the server closed without an answer.
async fn raw(addr: SocketAddr, request: Vec<u8>) -> Option<(u16, String)> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let send = tokio::spawn(async move {
        // The server may answer and close before taking it all: a failed write is expected.
        let _ = writer.write_all(&request).await;
        writer
    });
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), reader.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "no answer within 20 s");
    drop(send.await);
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default();
    Some((status, body))
}

fn get(target: &str) -> Vec<u8> {
    request("GET", target, "")
}

fn request(method: &str, target: &str, extra_headers: &str) -> Vec<u8> {
    format!("{method} {target} HTTP/1.1\r\nHost: mirror\r\nConnection: close\r\n{extra_headers}Content-Length: 0\r\n\r\n")
        .into_bytes()
}

/// Whether `body` is the spec's error body, `{"errors":[{"code":...}]}`.
fn is_spec_error(body: &str) -> bool {
    let Ok(json) = serde_json::from_str::<serde_json::Value>(body) else { return false };
    json["errors"]
        .as_array()
        .is_some_and(|errors| !errors.is_empty() && errors.iter().all(|e| e["code"].is_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_4xx_never_5xx_and_the_server_keeps_serving() {
    let upstream = Upstream::start(11, 1, 1, 10_000).await;
    let dir = tempfile::tempdir().unwrap();
    let (data, log) = (dir.path().join("cache"), dir.path().join("dunite.log"));
    let server = Server::start(upstream.addr, &data, 64 << 20, &log).await;
    let addr = server.addr;
    let hex = "0".repeat(64);
    let big = "a".repeat(100 * 1024);

    // (request, what it is, whether the answer must be the spec's JSON error body)
    let mut cases: Vec<(Vec<u8>, String, bool)> = Vec::new();
    let mut oci = |target: String| cases.push((get(&target), target, true));
    oci(format!("/v2/../../etc/passwd/blobs/sha256:{hex}"));
    oci(format!("/v2/a/%2e%2e/blobs/sha256:{hex}"));
    oci(format!("/v2/a/%2E%2E/%2e%2e/etc/blobs/sha256:{hex}"));
    oci("/v2/a/blobs/sha256:..%2f..".into());
    oci("/v2/a/blobs/sha256:..%2f..%2f..%2fetc%2fpasswd".into());
    oci(format!("/v2/a%2f..%2f..%2fetc/blobs/sha256:{hex}"));
    oci(format!("/v2/%2fetc%2fpasswd/blobs/sha256:{hex}"));
    oci("/v2/a/manifests/..%2f..%2fetc%2fpasswd".into());
    oci("/v2/%2e%2e/manifests/v1".into());
    oci("/v2/a/manifests/%2e%2e".into());
    oci(format!("/v2/a/blobs/sha256:{hex}%00"));
    oci("/v2/a/blobs/%2fetc%2fpasswd".into());
    oci(format!("/v2/a%5c..%5c..%5cetc/blobs/sha256:{hex}"));
    oci(format!("/v2/chaos/img0/blobs/sha256:{hex}?ns=..%2f..%2fetc"));
    oci(format!("/v2/a%2fb/blobs/sha256:{hex}"));
    oci(format!("/v2/{}/manifests/v1", "a".repeat(10 * 1024)));
    oci(format!("/v2/a/manifests/{}", "t".repeat(129)));
    oci("/v2/a/tags/list".into());
    oci("/v2/a/tags/list?n=-1".into());
    oci(format!("/v2/a/tags/list?last={}", "x".repeat(4096)));
    oci("/v2/a/referrers/sha256:..%2f..".into());
    oci(format!("/v2/a/referrers/sha256:{hex}?artifactType=%0d%0aX-Injected:%20yes"));
    // Methods the mirror does not serve: a 4xx (their spec error body is checked by
    // `methods_the_mirror_does_not_serve_get_the_spec_error_body`).
    for method in ["PUT", "DELETE", "POST", "PATCH"] {
        for target in ["/v2/chaos/img0/manifests/v1".to_owned(), format!("/v2/chaos/img0/blobs/sha256:{hex}")]
        {
            cases.push((request(method, &target, ""), format!("{method} {target}"), false));
        }
    }
    cases.push((request("POST", "/v2/chaos/img0/blobs/uploads/", ""), "POST uploads".into(), false));
    cases.push((
        get(&format!("/v2/{big}/manifests/v1")),
        "a 100 KiB name (over hyper's URI limit)".into(),
        false,
    ));
    let header = format!("X-Junk: {big}\r\n");
    let target = format!("/v2/chaos/img0/blobs/sha256:{hex}");
    cases.push((request("GET", &target, &header), "a 100 KiB header".into(), false));
    let huge_header = format!("X-Junk: {}\r\n", "a".repeat(1 << 20));
    cases.push((request("GET", "/healthz", &huge_header), "a 1 MiB header".into(), false));
    cases.push((get(&format!("/{}", "a/".repeat(512 * 1024))), "a 1 MiB path".into(), false));
    cases.push((get("/../../etc/passwd"), "a traversal outside /v2".into(), false));
    cases.push((get("/dl/file:///etc/passwd"), "a file: download".into(), false));
    cases.push((
        get("/dl/http://127.0.0.1:1/../../etc/passwd"),
        "a download off the allowlist".into(),
        false,
    ));
    cases.push((
        get("/dl/sha256:..%2f../http://h.example/x"),
        "a download pinned to a bad digest".into(),
        false,
    ));
    cases.push((b"GARBAGE\r\n\r\n".to_vec(), "a garbage request line".into(), false));
    cases.push((
        b"GET /v2/ HTTP/1.1\r\nHost: m\r\nContent-Length: -1\r\n\r\n".to_vec(),
        "a negative Content-Length".into(),
        false,
    ));

    let mut failures = Vec::new();
    for (bytes, what, spec_body) in cases {
        match raw(addr, bytes).await {
            Some((status, body)) => {
                if !(400..500).contains(&status) {
                    failures.push(format!("{what}: {status} {body}"));
                } else if spec_body && !is_spec_error(&body) {
                    failures.push(format!("{what}: {status} without the spec's error body: {body:?}"));
                }
            }
            None => failures.push(format!("{what}: the connection closed without an answer")),
        }
    }
    let health = reqwest::get(format!("http://{addr}/healthz")).await.unwrap();
    assert!(health.status().is_success(), "/healthz after the hostile requests: {}", health.status());
    assert_eq!(server.metric("dunite_errors_total").await, 0, "server errors:\n{}", tail(&log));
    assert!(failures.is_empty(), "{}\ndunite's log:\n{}", failures.join("\n"), tail(&log));
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(!log_text.contains("panicked"), "a panic in the log:\n{}", tail(&log));
    assert!(server.stop().await.success());
}

/// Methods a pull-through mirror does not serve get the spec's JSON error, not a bare 405.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_the_mirror_does_not_serve_get_the_spec_error_body() {
    let upstream = Upstream::start(13, 1, 1, 1_000).await;
    let dir = tempfile::tempdir().unwrap();
    let server =
        Server::start(upstream.addr, &dir.path().join("cache"), 1 << 20, &dir.path().join("log")).await;
    for method in ["PUT", "DELETE", "POST", "PATCH"] {
        for target in ["/v2/chaos/img0/manifests/v1", "/v2/chaos/img0/blobs/uploads/"] {
            let (status, body) = raw(server.addr, request(method, target, "")).await.unwrap();
            assert_eq!(status, 405, "{method} {target}");
            assert!(is_spec_error(&body), "{method} {target}: {body:?}");
        }
    }
}
