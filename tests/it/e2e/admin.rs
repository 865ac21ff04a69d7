//! `dunite admin` and `dunite check`, the real binary against a running (or stopped) server
//! with the docker-registry upstream: the effects are checked through pulls and metrics.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use super::harness::{Dunite, Image, Registry, assert_same_copy, dunite_binary, pull};

/// Run `dunite admin --json ARGS` against `addr`; the exit status and the parsed output.
async fn admin(addr: SocketAddr, args: &[&str]) -> (bool, Value, String) {
    let output = tokio::process::Command::new(dunite_binary())
        .args(["admin", "--url", &format!("http://{addr}"), "--json"])
        .args(args)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(120), output).await.unwrap().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let json = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
    (output.status.success(), json, stderr)
}

/// As [`admin`], failing the test on a non-zero exit.
async fn admin_ok(addr: SocketAddr, args: &[&str]) -> Value {
    let (ok, json, stderr) = admin(addr, args).await;
    assert!(ok, "dunite admin {args:?} failed: {stderr}");
    json
}

/// Run `dunite check ARGS` on `data`; the exit code and the output.
async fn check(data: &Path, args: &[&str]) -> (i32, String) {
    let output = tokio::process::Command::new(dunite_binary())
        .arg("check")
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .env("NO_COLOR", "1")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(120), output).await.unwrap().unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.code().unwrap_or(-1), text)
}

fn keys(page: &Value) -> Vec<String> {
    page["entries"].as_array().unwrap().iter().map(|e| e["key"].as_str().unwrap().to_owned()).collect()
}

async fn blobs_cached(dunite: &Dunite, n: u64) {
    dunite_testkit::poll_until(Duration::from_secs(30), "the image's blobs cached", async || {
        dunite.metric("dunite_cache_entries{cache=\"blobs\"}").await == n
    })
    .await;
}

/// List, usage and purge by digest and by repository; a purged blob is fetched again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_lists_reports_usage_and_purges() {
    let registry = Registry::start().await;
    Image::build(31, 3, 200_000).push(registry.addr, "e2e/app").await;
    Image::build(32, 1, 50_000).push(registry.addr, "e2e/other").await;
    let dunite = Dunite::start(registry.addr, "64MiB", &[]).await;
    let direct = pull(registry.addr, "e2e/app").await.unwrap();
    assert_same_copy(direct.path(), pull(dunite.addr, "e2e/app").await.unwrap().path());
    pull(dunite.addr, "e2e/other").await.unwrap();
    blobs_cached(&dunite, 6).await;

    let by_size = admin_ok(dunite.addr, &["list", "blobs", "--order", "size", "--limit", "4"]).await;
    let sizes: Vec<u64> =
        by_size["entries"].as_array().unwrap().iter().map(|e| e["size"].as_u64().unwrap()).collect();
    assert_eq!(sizes.len(), 4, "{by_size}");
    assert!(sizes.windows(2).all(|w| w[0] >= w[1]), "{sizes:?}");
    let next = by_size["next"].as_str().unwrap().to_owned();
    let rest =
        admin_ok(dunite.addr, &["list", "blobs", "--order", "size", "--limit", "4", "--cursor", &next]).await;
    assert_eq!(keys(&rest).len(), 2, "{rest}");
    assert!(rest.get("next").is_none());
    let largest = keys(&by_size)[0].clone();

    let usage = admin_ok(dunite.addr, &["usage"]).await;
    let repos = usage["repositories"].as_array().unwrap();
    assert_eq!(repos[0]["repository"], "local/e2e/app", "{usage}");
    assert_eq!(repos[1]["repository"], "local/e2e/other", "{usage}");
    assert!(repos[0]["bytes"].as_u64().unwrap() > 600_000);
    assert_eq!(repos[0]["entries"], 5, "three layers, a config, a manifest: {usage}");

    // Purged, the layer is fetched from upstream again on the next pull.
    let misses = dunite.metric("dunite_blob_misses_total").await;
    let purged = admin_ok(dunite.addr, &["purge", "--digest", &largest]).await;
    assert_eq!(purged["removed"][0]["key"], largest.as_str(), "{purged}");
    assert!(!keys(&admin_ok(dunite.addr, &["list", "blobs"]).await).contains(&largest));
    assert_same_copy(direct.path(), pull(dunite.addr, "e2e/app").await.unwrap().path());
    assert_eq!(dunite.metric("dunite_blob_misses_total").await, misses + 1, "the purged blob only");
    blobs_cached(&dunite, 6).await;

    // A repository's purge removes its own entries and keeps the other's.
    let purged = admin_ok(dunite.addr, &["purge", "--repository", "local/e2e/app"]).await;
    assert_eq!(purged["removed"].as_array().unwrap().len(), 5, "{purged}");
    let usage = admin_ok(dunite.addr, &["usage"]).await;
    let repos = usage["repositories"].as_array().unwrap();
    assert_eq!(repos.len(), 1, "{usage}");
    assert_eq!(repos[0]["repository"], "local/e2e/other");
    assert_eq!(dunite.metric("dunite_cache_entries{cache=\"blobs\"}").await, 2);

    // Errors: nothing to purge, a malformed digest.
    let (ok, _, stderr) = admin(dunite.addr, &["purge", "--digest", &largest]).await;
    assert!(!ok && stderr.contains("404"), "{stderr}");
    let (ok, _, stderr) = admin(dunite.addr, &["pin", "--digest", "sha256:nope"]).await;
    assert!(!ok && stderr.contains("400"), "{stderr}");
    assert!(dunite.stop().await.success());
}

/// A pinned blob survives a burst of pulls that evicts everything else; unpinned, it goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_blob_survives_a_burst_that_evicts_everything_else() {
    let registry = Registry::start().await;
    for seed in 0..4 {
        Image::build(40 + seed, 3, 300_000).push(registry.addr, &format!("e2e/burst{seed}")).await;
    }
    let dunite = Dunite::start(registry.addr, "2MiB", &[]).await;
    pull(dunite.addr, "e2e/burst0").await.unwrap();
    blobs_cached(&dunite, 4).await;
    let first = admin_ok(dunite.addr, &["list", "blobs", "--order", "size", "--limit", "1"]).await;
    let pinned = keys(&first)[0].clone();
    let answer = admin_ok(dunite.addr, &["pin", "--digest", &pinned]).await;
    assert_eq!((answer["cache"].as_str(), answer["pinned"].as_bool()), (Some("blobs"), Some(true)));
    let others: Vec<String> =
        keys(&admin_ok(dunite.addr, &["list", "blobs"]).await).into_iter().filter(|k| *k != pinned).collect();

    for seed in 1..4 {
        pull(dunite.addr, &format!("e2e/burst{seed}")).await.unwrap();
    }
    // The burst went over the cap: the evictor ran and took every other blob of the first image.
    dunite_testkit::poll_until(
        Duration::from_secs(30),
        "the first image's other blobs evicted",
        async || {
            let listed = keys(&admin_ok(dunite.addr, &["list", "blobs", "--limit", "1000"]).await);
            others.iter().all(|k| !listed.contains(k))
        },
    )
    .await;
    let listed = admin_ok(dunite.addr, &["list", "blobs", "--order", "size", "--limit", "1000"]).await;
    let entry = listed["entries"].as_array().unwrap().iter().find(|e| e["key"] == pinned.as_str()).cloned();
    assert_eq!(
        entry.map(|e| e["pinned"].clone()),
        Some(Value::Bool(true)),
        "the pinned blob is kept: {listed}"
    );
    let caches = admin_ok(dunite.addr, &["caches"]).await;
    let blobs = caches["caches"].as_array().unwrap().iter().find(|c| c["name"] == "blobs").unwrap().clone();
    assert!(blobs["bytes"].as_u64().unwrap() <= 2 << 20, "{blobs}");
    assert!(blobs["pinned_bytes"].as_u64().unwrap() >= 300_000, "{blobs}");

    // Unpinned, it is the least recently used blob: the next burst takes it.
    admin_ok(dunite.addr, &["unpin", "--digest", &pinned]).await;
    pull(dunite.addr, "e2e/burst1").await.unwrap();
    pull(dunite.addr, "e2e/burst2").await.unwrap();
    dunite_testkit::poll_until(Duration::from_secs(30), "the unpinned blob evicted", async || {
        !keys(&admin_ok(dunite.addr, &["list", "blobs", "--limit", "1000"]).await).contains(&pinned)
    })
    .await;
    assert!(dunite.stop().await.success());
}

/// A prefetch fills the cache: the pull that follows fetches no blob upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_fills_the_cache_so_a_pull_is_all_hits() {
    let registry = Registry::start().await;
    Image::build(51, 3, 250_000).push(registry.addr, "e2e/pre").await;
    let dunite = Dunite::start(registry.addr, "64MiB", &[]).await;

    let job = admin_ok(dunite.addr, &["prefetch", "e2e/pre:v1"]).await;
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!((job["blobs_done"].as_u64(), job["blobs_total"].as_u64()), (Some(4), Some(4)), "{job}");
    assert_eq!(job["bytes_done"], job["bytes_total"]);
    assert_eq!(
        dunite.metric("dunite_cache_entries{cache=\"blobs\"}").await,
        4,
        "cached when the job is done"
    );
    let (misses, upstream) =
        (dunite.metric("dunite_blob_misses_total").await, dunite.metric("dunite_upstream_bytes_total").await);

    let direct = pull(registry.addr, "e2e/pre").await.unwrap();
    assert_same_copy(direct.path(), pull(dunite.addr, "e2e/pre").await.unwrap().path());
    assert_eq!(dunite.metric("dunite_blob_misses_total").await, misses, "no blob miss after the prefetch");
    // Only the tag is asked upstream again: the tag cache keys a tag on the client's accepted
    // manifest types, and skopeo's differ from the prefetch's (every type). Its manifest,
    // config and layers are all hits.
    let fetched = dunite.metric("dunite_upstream_bytes_total").await - upstream;
    assert!(fetched < 2_000, "only the tag's manifest fetched upstream, not {fetched} bytes");

    // A second prefetch finds everything cached; an unknown image fails with the reason.
    let again = admin_ok(dunite.addr, &["prefetch", "local/e2e/pre:v1", "--platform", "all"]).await;
    assert_eq!(again["blobs_cached"], 4, "{again}");
    let (ok, _, stderr) = admin(dunite.addr, &["prefetch", "e2e/missing:v1"]).await;
    assert!(!ok && stderr.contains("prefetch failed"), "{stderr}");
    assert!(dunite.stop().await.success());
}

/// `dunite check` on a stopped server's directory: a healthy cache passes; a planted orphan
/// file, a missing payload and a corrupt one fail it (exit 1) until `--repair` fixes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_finds_damage_and_repair_fixes_it() {
    let registry = Registry::start().await;
    Image::build(61, 3, 100_000).push(registry.addr, "e2e/chk").await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cache");
    let dunite = Dunite::start_with_data(registry.addr, "64MiB", &[], "info", &data).await;
    pull(dunite.addr, "e2e/chk").await.unwrap();
    blobs_cached(&dunite, 4).await;
    assert!(dunite.stop().await.success());

    let (code, out) = check(&data, &["--all"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("consistent") && out.contains("blobs: 4 entries"), "{out}");
    // Not a terminal: progress in plain lines, the last one complete.
    let line = out.lines().rfind(|l| l.starts_with("hashing blobs: ")).unwrap_or_else(|| panic!("{out}"));
    let (done, total) =
        line["hashing blobs: ".len()..].trim_end_matches(" bytes").split_once(" of ").unwrap();
    assert_eq!(done, total, "{out}");

    let mut payloads: Vec<_> = walk(&data.join("blobs/data"));
    payloads.sort_by_key(|p| std::fs::metadata(p).unwrap().len());
    let (missing, corrupt) = (payloads.pop().unwrap(), payloads.pop().unwrap());
    std::fs::remove_file(&missing).unwrap();
    let mut bytes = std::fs::read(&corrupt).unwrap();
    bytes[100] ^= 0x5a;
    std::fs::write(&corrupt, bytes).unwrap();
    std::fs::write(
        data.join("blobs/data").join(corrupt.parent().unwrap().file_name().unwrap()).join("orphan"),
        b"?",
    )
    .unwrap();

    let (code, out) = check(&data, &["--sample", "100"]).await;
    assert_eq!(code, 1, "{out}");
    for what in ["is missing", "hashes to", "no row names", "--repair"] {
        assert!(out.contains(what), "{what}: {out}");
    }
    let (code, out) = check(&data, &["--all", "--repair"]).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.matches("repaired:").count(), 3, "{out}");
    let (code, out) = check(&data, &["--all"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("blobs: 2 entries") && out.contains("consistent"), "{out}");

    // The repaired cache serves: the lost layers are fetched again.
    let dunite = Dunite::start_with_data(registry.addr, "64MiB", &[], "info", &data).await;
    let direct = pull(registry.addr, "e2e/chk").await.unwrap();
    assert_same_copy(direct.path(), pull(dunite.addr, "e2e/chk").await.unwrap().path());
    assert_eq!(dunite.metric("dunite_blob_misses_total").await, 2);
    assert!(dunite.stop().await.success());
    let (code, out) = check(&data, &["--all"]).await;
    assert_eq!(code, 0, "{out}");
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// A multi-platform image: a prefetch of one platform fetches that platform's manifest and
/// blobs only; `all` fetches the rest; a platform the index lacks fails with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_narrows_an_index_to_one_platform_or_takes_all() {
    use sha2::Digest as _;

    const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    let registry = Registry::start().await;
    let mut platforms = Vec::new();
    for (seed, arch) in [(71, "amd64"), (72, "arm64")] {
        // Each push moves the tag; the manifest before stays, by digest.
        Image::build(seed, 2, 100_000).push(registry.addr, "e2e/multi").await;
        let manifest = registry.manifest("e2e/multi", "v1", MANIFEST).await;
        let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&manifest)));
        platforms.push(serde_json::json!({
            "mediaType": MANIFEST, "digest": digest, "size": manifest.len(),
            "platform": {"os": "linux", "architecture": arch},
        }));
    }
    let index_type = "application/vnd.oci.image.index.v1+json";
    let index = serde_json::json!({"schemaVersion": 2, "mediaType": index_type, "manifests": platforms});
    registry.put_manifest("e2e/multi", "both", index_type, serde_json::to_vec(&index).unwrap()).await;
    let dunite = Dunite::start(registry.addr, "64MiB", &[]).await;

    let arm = admin_ok(dunite.addr, &["prefetch", "e2e/multi:both", "--platform", "linux/arm64"]).await;
    assert_eq!((arm["manifests"].as_u64(), arm["blobs_done"].as_u64()), (Some(2), Some(3)), "{arm}");
    assert_eq!(dunite.metric("dunite_cache_entries{cache=\"blobs\"}").await, 3);
    let all = admin_ok(dunite.addr, &["prefetch", "e2e/multi:both", "--platform", "all"]).await;
    assert_eq!((all["manifests"].as_u64(), all["blobs_cached"].as_u64()), (Some(3), Some(3)), "{all}");
    assert_eq!(dunite.metric("dunite_cache_entries{cache=\"blobs\"}").await, 6);
    let (ok, _, stderr) =
        admin(dunite.addr, &["prefetch", "e2e/multi:both", "--platform", "linux/s390x"]).await;
    assert!(!ok && stderr.contains("no manifest for platform linux/s390x"), "{stderr}");
    assert!(dunite.stop().await.success());
}

/// Downloads by URL: listed, pinned and unpinned, purged (the next request asks the origin
/// again); the log shows the URL without its query.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_pins_and_purges_a_download_by_url() {
    use std::collections::HashMap;
    use std::sync::atomic::Ordering;

    use super::origin::{Answer, Origin};

    let body = dunite_testkit::pseudo_random_bytes(81, 300_000);
    let mut answers = HashMap::new();
    answers
        .insert("/tool.tar?token=s3cret".to_owned(), Answer::File { body: body.clone(), etag: "v1".into() });
    let origin = Origin::start(answers).await;
    let registry = Registry::start().await;
    let dunite = Dunite::start(registry.addr, "64MiB", &["--dl-allow", &origin.addr.to_string()]).await;
    let url = format!("http://{}/tool.tar?token=s3cret", origin.addr);
    let get = async || {
        let response = reqwest::get(format!("http://{}/dl/{url}", dunite.addr)).await.unwrap();
        assert_eq!(response.status(), 200);
        assert!(response.bytes().await.unwrap() == body);
    };
    get().await;
    dunite_testkit::poll_until(Duration::from_secs(30), "the download cached", async || {
        dunite.metric("dunite_cache_entries{cache=\"downloads\"}").await == 1
    })
    .await;
    // Shown without the query: a token in a download's URL stays out of admin output.
    let listed = admin_ok(dunite.addr, &["list", "downloads"]).await;
    assert_eq!(keys(&listed), [format!("http://{}/tool.tar?REDACTED", origin.addr)]);

    let pinned = admin_ok(dunite.addr, &["pin", "--url", &url]).await;
    assert!(!pinned.to_string().contains("s3cret"), "{pinned}");
    assert_eq!((pinned["cache"].as_str(), pinned["size"].as_u64()), (Some("downloads"), Some(300_000)));
    admin_ok(dunite.addr, &["unpin", "--url", &url]).await;
    let purged = admin_ok(dunite.addr, &["purge", "--url", &url]).await;
    assert_eq!(purged["removed"][0]["bytes"], 300_000, "{purged}");
    assert!(!purged.to_string().contains("s3cret"), "{purged}");
    get().await;
    assert_eq!(origin.requests.load(Ordering::SeqCst), 2, "fetched again after the purge");
    let (_, log) = dunite.stop_with_log().await;
    assert!(log.contains("purged") && !log.contains("s3cret"), "{log}");
}

/// With client authentication, `dunite admin --token` (or `--user`) is let in when granted
/// `--access admin=NAME`; another client gets 403, none 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dunite_admin_authenticates_with_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "ops:ops-token-0123456789abcdef\nbob:bob-token-0123456789abcdef\n").unwrap();
    let registry = Registry::start().await;
    let token_file = tokens.display().to_string();
    let dunite =
        Dunite::start(registry.addr, "64MiB", &["--client-token-file", &token_file, "--access", "admin=ops"])
            .await;
    let caches = admin_ok(dunite.addr, &["--token", "ops-token-0123456789abcdef", "caches"]).await;
    assert_eq!(caches["caches"].as_array().unwrap().len(), 4, "{caches}");
    let (ok, _, stderr) = admin(dunite.addr, &["--token", "bob-token-0123456789abcdef", "caches"]).await;
    assert!(!ok && stderr.contains("403"), "{stderr}");
    let (ok, _, stderr) = admin(dunite.addr, &["caches"]).await;
    assert!(!ok && stderr.contains("401"), "{stderr}");
    assert!(dunite.stop().await.success());
}
