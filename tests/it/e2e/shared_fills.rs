//! Three `dunite serve` processes on one PostgreSQL database and one data directory share
//! their upstream fills through leases: one upstream GET per blob however many instances
//! miss it, and an owner killed mid-fill is taken over, with every pull completing intact.

#![allow(clippy::print_stdout, reason = "the counts and timings are this test's report")]

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use dunite_testkit::pg;

use super::counting_proxy::{CountingProxy, Throttle};
use super::harness::{Dunite, Image, Registry, pull, same_copy};
use crate::rig::check_data_dir_with;

const INSTANCES: usize = 3;

/// Start `INSTANCES` instances on `data_dir` and the database at `url`, the upstream behind
/// `proxy`.
async fn instances(
    proxy: &CountingProxy,
    url: &str,
    data_dir: &Path,
    cap: &str,
    extra: &[&str],
) -> Vec<Dunite> {
    let mut args = vec!["--database-url", url];
    args.extend_from_slice(extra);
    let mut started = Vec::new();
    for _ in 0..INSTANCES {
        started.push(Dunite::start_with_data(proxy.addr, cap, &args, "info", data_dir).await);
    }
    started
}

/// Pull `repo` through `addrs[first]`, and on failure through the next instance, as a client
/// behind a load balancer retries: at most `addrs.len() + 1` attempts. Ok carries the copy
/// and the attempts it took.
async fn pull_retrying(
    addrs: &[SocketAddr],
    first: usize,
    repo: &str,
) -> Result<(tempfile::TempDir, usize), String> {
    let mut errors = Vec::new();
    for attempt in 0..=addrs.len() {
        match pull(addrs[(first + attempt) % addrs.len()], repo).await {
            Ok(copy) => return Ok((copy, attempt + 1)),
            Err(e) => errors.push(e),
        }
    }
    Err(errors.join("\n---\n"))
}

fn logs(instances: &[Dunite]) -> String {
    instances.iter().enumerate().map(|(i, d)| format!("instance {i}'s log:\n{}\n", d.log_text())).collect()
}

/// Stop every instance still running, then check the directory and the database offline.
async fn stop_and_check(instances: Vec<Dunite>, data_dir: &Path, url: &str) -> usize {
    for dunite in instances {
        let (status, log) = dunite.stop_with_log().await;
        assert!(status.success(), "exit {status}\n{log}");
        assert!(!log.contains(" ERROR "), "errors in a log:\n{log}");
    }
    let checked = check_data_dir_with(data_dir, Some(url)).await;
    assert!(checked.violations.is_empty(), "{:#?}", checked.violations);
    checked.blobs_verified
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_pulls_over_three_instances_fetch_each_blob_from_the_upstream_once() {
    let Some(database) = pg::fresh_database().await else {
        return; // No test server, and none required.
    };
    let started = Instant::now();
    let registry = Registry::start().await;
    Image::build(901, 3, 1_000_000).push(registry.addr, "e2e/popular").await;
    let direct = pull(registry.addr, "e2e/popular").await.unwrap();
    let proxy = CountingProxy::start(registry.addr).await;
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().join("cache");
    let instances = instances(&proxy, database.url(), &data_dir, "64MiB", &[]).await;
    let addrs: Vec<_> = instances.iter().map(|d| d.addr).collect();

    let mut pulls = tokio::task::JoinSet::new();
    for i in 0..30 {
        let addr = addrs[i % INSTANCES];
        pulls.spawn(async move { pull(addr, "e2e/popular").await });
    }
    while let Some(done) = pulls.join_next().await {
        let copy = done.unwrap().unwrap_or_else(|e| panic!("{e}\n{}", logs(&instances)));
        same_copy(direct.path(), copy.path()).unwrap();
    }
    let gets = proxy.blob_gets();
    assert_eq!(gets.len(), 4, "three layers and a config: {gets:?}");
    assert!(gets.values().all(|&n| n == 1), "blob GETs upstream per digest: {gets:?}\n{}", logs(&instances));
    let misses: u64 =
        futures_util::future::join_all(instances.iter().map(|d| d.metric("dunite_blob_misses_total")))
            .await
            .into_iter()
            .sum();
    let verified = stop_and_check(instances, &data_dir, database.url()).await;
    assert_eq!(verified, 4);
    println!(
        "shared fills: 30 pulls over {INSTANCES} instances, {misses} blob misses, upstream GETs {gets:?}, in {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_killed_mid_fill_is_taken_over_and_every_pull_completes_intact() {
    let Some(database) = pg::fresh_database().await else {
        return; // No test server, and none required.
    };
    let started = Instant::now();
    let registry = Registry::start().await;
    Image::build(902, 2, 3_000_000).push(registry.addr, "e2e/killed").await;
    let direct = pull(registry.addr, "e2e/killed").await.unwrap();
    // The largest file of the copy is a layer; its name is its digest's hex.
    let (slow_path, _) = crate::rig::files_under(direct.path()).into_iter().max_by_key(|f| f.1).unwrap();
    let slow = format!("sha256:{}", slow_path.file_name().unwrap().to_string_lossy());
    let proxy = CountingProxy::start(registry.addr).await;
    // About 1.6 MB/s: the fill of the slow layer takes about two seconds.
    proxy.slow_down(&slow, Throttle { chunk: 32 * 1024, every: Duration::from_millis(20) });
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().join("cache");
    let mut instances =
        instances(&proxy, database.url(), &data_dir, "64MiB", &["--fill-lease-timeout", "2s"]).await;
    let addrs: Vec<_> = instances.iter().map(|d| d.addr).collect();

    let mut pulls = tokio::task::JoinSet::new();
    for i in 0..9 {
        let addrs = addrs.clone();
        pulls.spawn(async move { pull_retrying(&addrs, i % INSTANCES, "e2e/killed").await });
    }

    // Kill the owner of the slow layer's fill once its spool holds bytes.
    let pool = sqlx::PgPool::connect(database.url()).await.unwrap();
    let mut owner = None;
    dunite_testkit::poll_until(Duration::from_secs(60), "the slow layer's fill spooling", async || {
        let row: Option<(String, String)> =
            sqlx::query_as("SELECT owner, spool FROM fill_leases WHERE key = $1 AND spool <> ''")
                .bind(&slow)
                .fetch_optional(&pool)
                .await
                .unwrap();
        let Some((who, spool)) = row else { return false };
        let spooled = std::fs::metadata(data_dir.join("blobs/tmp").join(&spool)).map_or(0, |m| m.len());
        owner = Some(who);
        spooled > 0
    })
    .await;
    let owner = owner.unwrap();
    let victim = instances
        .iter()
        .position(|d| owner.split('/').nth(1) == Some(d.pid().to_string().as_str()))
        .unwrap_or_else(|| panic!("no instance is the lease's owner {owner}"));
    instances[victim].signal("KILL");
    let killed_at = Instant::now();
    // Every fill the victim owned when it died (the other layer's may still have been running).
    let dead: Vec<(String,)> = sqlx::query_as("SELECT key FROM fill_leases WHERE owner = $1")
        .bind(&owner)
        .fetch_all(&pool)
        .await
        .unwrap();
    let dead: Vec<String> = dead.into_iter().map(|(key,)| key).collect();
    assert!(dead.contains(&slow));

    let mut attempts = Vec::new();
    while let Some(done) = pulls.join_next().await {
        let (copy, tries) = done.unwrap().unwrap_or_else(|e| panic!("{e}\n{}", logs(&instances)));
        same_copy(direct.path(), copy.path()).unwrap();
        attempts.push(tries);
    }
    let completed_after = killed_at.elapsed();
    pool.close().await;
    drop(instances.remove(victim));
    let gets = proxy.blob_gets();
    assert_eq!(gets.get(&slow), Some(&2), "the dead owner's GET and the taker's: {gets:?}");
    // One GET per blob, and one more for each fill the victim owned when it died.
    for (digest, &n) in &gets {
        let expected = if dead.contains(digest) { 2 } else { 1 };
        assert_eq!(n, expected, "{digest}: GETs {gets:?}, the victim owned {dead:?}\n{}", logs(&instances));
    }
    let verified = stop_and_check(instances, &data_dir, database.url()).await;
    assert_eq!(verified, 3, "two layers and a config");
    println!(
        "shared fills: owner killed mid-fill (of {} blobs); pulls done {completed_after:?} after the kill, \
         attempts per pull {attempts:?}, upstream GETs {gets:?}, in {:?}",
        dead.len(),
        started.elapsed()
    );
}
