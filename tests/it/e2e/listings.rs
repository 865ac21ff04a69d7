//! The rest of the pull API: tag lists (`skopeo list-tags`, `skopeo inspect`), referrers (how
//! cosign and notation find signatures), and `HEAD` on blobs not cached. Debian's
//! `docker-registry` (2.8) neither paginates tag lists nor serves referrers, so pages, filters
//! and referrers are also tested against a raw upstream (`Origin`).

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};

use sha2::Digest as _;

use super::harness::{Dunite, Image, Registry, curl, skopeo_output};
use super::origin::{Head, Origin};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const INDEX: &str = "application/vnd.oci.image.index.v1+json";
const SIGNATURE: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";

fn sorted_tags(listed: &serde_json::Value) -> Vec<String> {
    let mut tags: Vec<String> =
        listed.as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_owned()).collect();
    tags.sort();
    tags
}

/// skopeo lists and inspects through the mirror; with the upstream gone, the tag list it had
/// is served stale (a repository never listed is not made up). The upstream has no referrers
/// API: the mirror says 404, so a client falls back to the `sha256-<hex>` tag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_lists_and_inspects_tags_through_the_mirror_and_the_list_outlives_the_upstream() {
    let registry = Registry::start().await;
    Image::build(21, 1, 10_000).push(registry.addr, "e2e/listed").await;
    let manifest = registry.manifest("e2e/listed", "v1", OCI_MANIFEST).await;
    for tag in ["v2", "latest"] {
        registry.put_manifest("e2e/listed", tag, OCI_MANIFEST, manifest.clone()).await;
    }
    let dunite = Dunite::start(registry.addr, "64MiB", &["--tag-ttl", "0s"]).await;
    let repo = format!("docker://{}/e2e/listed", dunite.addr);
    let list_tags = || async {
        let listed = skopeo_output(&["list-tags", "--tls-verify=false", &repo]).await?;
        let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
        Ok::<_, String>(sorted_tags(&listed["Tags"]))
    };
    assert_eq!(list_tags().await.unwrap(), ["latest", "v1", "v2"]);
    let inspected = skopeo_output(&["inspect", "--tls-verify=false", &format!("{repo}:v1")]).await.unwrap();
    let inspected: serde_json::Value = serde_json::from_str(&inspected).unwrap();
    assert_eq!(sorted_tags(&inspected["RepoTags"]), ["latest", "v1", "v2"]);
    let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&manifest)));
    assert_eq!(inspected["Digest"], digest.as_str());

    // A signature pushed as a client does to a registry without the referrers API: the
    // manifest with its `subject`, and an index of it tagged `sha256-<hex>`.
    let image: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    let signature = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": SIGNATURE,
        "config": image["config"], "layers": [],
        "subject": {"mediaType": OCI_MANIFEST, "digest": digest, "size": manifest.len()},
    }))
    .unwrap();
    let signature_digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&signature)));
    registry.put_manifest("e2e/listed", &signature_digest, OCI_MANIFEST, signature.clone()).await;
    let fallback = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": signature_digest, "size": signature.len(), "artifactType": SIGNATURE}],
    }))
    .unwrap();
    let fallback_tag = digest.replace(':', "-");
    registry.put_manifest("e2e/listed", &fallback_tag, INDEX, fallback.clone()).await;

    // The upstream has no referrers API: a 404, so the client falls back to the tag, which
    // it reads through the mirror like any tag.
    let base = format!("http://{}/v2/e2e/listed", dunite.addr);
    let referrers = curl(&format!("{base}/referrers/{digest}"), &[]).await;
    assert_eq!(referrers.status, 404, "{}", String::from_utf8_lossy(&referrers.body));
    let index = curl(&format!("{base}/manifests/{fallback_tag}"), &["-H", &format!("accept: {INDEX}")]).await;
    assert_eq!((index.status, index.body), (200, fallback));
    let signed =
        curl(&format!("{base}/manifests/{signature_digest}"), &["-H", &format!("accept: {OCI_MANIFEST}")])
            .await;
    assert_eq!((signed.status, signed.body), (200, signature));

    // Revalidated after the TTL (zero here): the new tag is listed.
    let tags = ["latest".to_owned(), fallback_tag, "v1".into(), "v2".into()];
    assert_eq!(list_tags().await.unwrap(), tags);

    drop(registry);
    assert_eq!(list_tags().await.unwrap(), tags, "{}", dunite.log_text());
    assert!(dunite.metric("dunite_stale_listings_served_total").await >= 1);
    let never = format!("docker://{}/e2e/never-listed", dunite.addr);
    assert!(skopeo_output(&["list-tags", "--tls-verify=false", &never]).await.is_err());
}

/// A raw upstream with the listing API: `app`'s tags in pages of `n` (with a `Link` to the
/// next), and referrers of one digest, filtered by `artifactType` when asked (saying so in
/// `OCI-Filters-Applied`). Every request's path is kept; `down` set to a status answers every
/// request with it.
struct Lister {
    origin: Origin,
    seen: Arc<Mutex<Vec<String>>>,
    down: Arc<AtomicU16>,
    subject: String,
}

const TAGS: [&str; 3] = ["a", "b", "c"];

impl Lister {
    async fn start() -> Self {
        let subject = format!("sha256:{}", hex::encode(sha2::Sha256::digest(b"the signed image")));
        let (seen, down) = (Arc::new(Mutex::new(Vec::new())), Arc::new(AtomicU16::new(0)));
        let (log, status, referred) = (Arc::clone(&seen), Arc::clone(&down), subject.clone());
        let origin = Origin::serve(move |head: &Head, _| {
            log.lock().unwrap().push(head.path.clone());
            match status.load(Ordering::SeqCst) {
                0 => answer(head, &referred),
                down => format!("HTTP/1.1 {down} Down\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .into_bytes(),
            }
        })
        .await;
        Self { origin, seen, down, subject }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

fn answer(head: &Head, subject: &str) -> Vec<u8> {
    let url = url::Url::parse(&format!("http://upstream{}", head.path)).unwrap();
    let query: std::collections::HashMap<String, String> = url.query_pairs().into_owned().collect();
    let ok = |content_type: &str, extra: &str, body: String| {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    };
    if url.path() == "/v2/app/tags/list" {
        let n: usize = query.get("n").map_or(TAGS.len(), |n| n.parse().unwrap());
        let after = query.get("last").map_or(0, |last| TAGS.iter().position(|t| t == last).unwrap() + 1);
        let page = &TAGS[after..(after + n).min(TAGS.len())];
        let link = match page.last() {
            Some(last) if after + n < TAGS.len() => {
                format!(
                    "Link: <http://elsewhere.example/v2/app/tags/list?last={last}&n={n}>; rel=\"next\"\r\n"
                )
            }
            _ => String::new(),
        };
        return ok("application/json", &link, serde_json::json!({"name": "app", "tags": page}).to_string());
    }
    if url.path() == format!("/v2/app/referrers/{subject}") {
        let descriptor = |artifact_type: &str, seed: &[u8]| {
            serde_json::json!({
                "mediaType": OCI_MANIFEST, "artifactType": artifact_type, "size": 100,
                "digest": format!("sha256:{}", hex::encode(sha2::Sha256::digest(seed))),
            })
        };
        let all = [descriptor(SIGNATURE, b"signature"), descriptor("application/spdx+json", b"sbom")];
        let (manifests, filtered): (Vec<_>, _) = match query.get("artifactType") {
            Some(wanted) => {
                (all.into_iter().filter(|d| d["artifactType"] == wanted.as_str()).collect(), true)
            }
            None => (all.into_iter().collect(), false),
        };
        let extra = if filtered { "OCI-Filters-Applied: artifactType\r\n" } else { "" };
        let index = serde_json::json!({"schemaVersion": 2, "mediaType": INDEX, "manifests": manifests});
        return ok(INDEX, extra, index.to_string());
    }
    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec()
}

fn header<'a>(got: &'a super::harness::Got, name: &str) -> Option<&'a str> {
    got.headers.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(':')).map(str::trim)
}

/// Pages: `n` and `last` reach the upstream, and its `Link` (absolute, on its own host) comes
/// back on the mirror's path, keeping `?ns=`; following it gives the next page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_list_pages_are_passed_through_and_their_link_points_at_the_mirror() {
    let upstream = Lister::start().await;
    let dunite = Dunite::start(upstream.origin.addr, "64MiB", &[]).await;
    let base = format!("http://{}", dunite.addr);

    let first = curl(&format!("{base}/v2/app/tags/list?n=2&ns=local"), &[]).await;
    assert_eq!(first.status, 200);
    let page: serde_json::Value = serde_json::from_slice(&first.body).unwrap();
    assert_eq!(page["tags"], serde_json::json!(["a", "b"]));
    let link = header(&first, "link").unwrap();
    assert_eq!(link, r#"</v2/app/tags/list?last=b&n=2&ns=local>; rel="next""#);
    let next = link.strip_prefix('<').unwrap().split_once('>').unwrap().0;
    let second = curl(&format!("{base}{next}"), &[]).await;
    let page: serde_json::Value = serde_json::from_slice(&second.body).unwrap();
    assert_eq!(page["tags"], serde_json::json!(["c"]));
    assert_eq!(header(&second, "link"), None, "the last page");
    assert_eq!(upstream.seen(), ["/v2/app/tags/list?n=2", "/v2/app/tags/list?last=b&n=2"]);

    // Kept: the same page again costs no upstream request.
    let again = curl(&format!("{base}/v2/app/tags/list?n=2"), &[]).await;
    assert_eq!((again.status, again.body), (200, first.body));
    assert_eq!(upstream.seen().len(), 2);

    let bad = curl(&format!("{base}/v2/app/tags/list?n=lots"), &[]).await;
    assert_eq!(bad.status, 400);
    assert!(String::from_utf8_lossy(&bad.body).contains("PAGINATION_NUMBER_INVALID"));
    let unknown = curl(&format!("{base}/v2/nothing/tags/list"), &[]).await;
    assert_eq!(unknown.status, 404);
    assert!(String::from_utf8_lossy(&unknown.body).contains("NAME_UNKNOWN"));
}

/// Referrers, as cosign and notation ask for them: `artifactType` reaches the upstream and
/// `OCI-Filters-Applied` comes back; answers are kept for the tag TTL, and served stale while
/// the upstream fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn referrers_are_passed_through_filtered_kept_and_served_stale() {
    let upstream = Lister::start().await;
    let dunite = Dunite::start(upstream.origin.addr, "64MiB", &[]).await;
    let url = format!("http://{}/v2/app/referrers/{}", dunite.addr, upstream.subject);

    let filtered = curl(&format!("{url}?artifactType={}", SIGNATURE.replace('+', "%2B")), &[]).await;
    assert_eq!(filtered.status, 200, "{}", String::from_utf8_lossy(&filtered.body));
    assert_eq!(header(&filtered, "content-type"), Some(INDEX));
    // The helper lower-cases the whole head.
    assert_eq!(header(&filtered, "oci-filters-applied"), Some("artifacttype"));
    let index: serde_json::Value = serde_json::from_slice(&filtered.body).unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(index["manifests"][0]["artifactType"], SIGNATURE);
    let all = curl(&url, &[]).await;
    let index: serde_json::Value = serde_json::from_slice(&all.body).unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 2);
    assert_eq!(header(&all, "oci-filters-applied"), None);
    let asked = format!(
        "/v2/app/referrers/{}?artifactType=application%2Fvnd.dev.cosign.artifact.sig.v1%2Bjson",
        upstream.subject
    );
    assert_eq!(upstream.seen(), [asked, format!("/v2/app/referrers/{}", upstream.subject)]);

    // Kept for the tag TTL (5 minutes by default).
    assert_eq!(curl(&url, &[]).await.body, all.body);
    assert_eq!(upstream.seen().len(), 2);
    assert_eq!(curl(&format!("http://{}/v2/app/referrers/sha256:nope", dunite.addr), &[]).await.status, 400);

    // Revalidated at once with a zero TTL, and served stale while the upstream fails.
    let stale = Dunite::start(upstream.origin.addr, "64MiB", &["--tag-ttl", "0s"]).await;
    let url = format!("http://{}/v2/app/referrers/{}", stale.addr, upstream.subject);
    assert_eq!(curl(&url, &[]).await.body, all.body);
    upstream.down.store(503, Ordering::SeqCst);
    let served = curl(&url, &[]).await;
    assert_eq!((served.status, served.body), (200, all.body));
    assert_eq!(stale.metric("dunite_stale_listings_served_total").await, 1);
    upstream.down.store(429, Ordering::SeqCst);
    assert_eq!(curl(&url, &[]).await.status, 200);
    assert_eq!(stale.metric("dunite_stale_rate_limited_total").await, 1);
}

/// A `HEAD` on a blob not cached asks the upstream once: the size is remembered, so the next
/// `HEAD` costs no upstream request. A blob the upstream does not have is asked each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_on_a_blob_miss_is_remembered() {
    let blob = format!("sha256:{}", hex::encode(sha2::Sha256::digest(b"a layer")));
    let known = format!("/v2/app/blobs/{blob}");
    let upstream = Origin::serve(move |head, _| {
        assert_eq!(head.method, "HEAD");
        if head.path == known {
            format!("HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nDocker-Content-Digest: {blob}\r\nConnection: close\r\n\r\n")
                .into_bytes()
        } else {
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec()
        }
    })
    .await;
    let dunite = Dunite::start(upstream.addr, "64MiB", &[]).await;
    let client = reqwest::Client::new();
    let blob = format!("sha256:{}", hex::encode(sha2::Sha256::digest(b"a layer")));
    for _ in 0..3 {
        let answer = client.head(format!("http://{}/v2/app/blobs/{blob}", dunite.addr)).send().await.unwrap();
        assert_eq!(answer.status(), 200);
        assert_eq!(answer.headers()["content-length"], "1234");
        assert_eq!(answer.headers()["docker-content-digest"], blob.as_str());
    }
    assert_eq!(upstream.requests.load(Ordering::SeqCst), 1, "asked once");

    let missing = format!("sha256:{}", hex::encode(sha2::Sha256::digest(b"not there")));
    for asked in 2..4 {
        let answer =
            client.head(format!("http://{}/v2/app/blobs/{missing}", dunite.addr)).send().await.unwrap();
        assert_eq!(answer.status(), 404);
        assert_eq!(upstream.requests.load(Ordering::SeqCst), asked, "a 404 is not remembered");
    }
}
