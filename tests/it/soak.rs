//! A bounded soak: rounds of concurrent pulls through one dunite over a cap smaller than the
//! images, watching its memory and file descriptors, and what it leaves behind once idle.
//!
//! `DUNITE_SOAK_ROUNDS` sets the number of rounds (default 3).

#![allow(clippy::print_stdout, reason = "the soak figures are this test's report")]

use std::time::{Duration, Instant};

use crate::rig::{Server, Upstream, fd_kinds, leftovers, poll_until, pull, same_copy, tail};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_rounds_of_pulls_over_a_small_cap_do_not_grow_memory_or_descriptors() {
    let rounds: u64 = std::env::var("DUNITE_SOAK_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    assert!(rounds >= 2, "DUNITE_SOAK_ROUNDS must be at least 2 to compare a first and a last round");
    let started = Instant::now();
    let upstream = Upstream::start(9, 4, 3, 300_000).await;
    let cap = upstream.blob_bytes() / 2;
    let dir = tempfile::tempdir().unwrap();
    let (data, log) = (dir.path().join("cache"), dir.path().join("dunite.log"));
    let server = Server::start(upstream.addr, &data, cap, &log).await;

    let mut first = None;
    // (RSS KiB, descriptors but the database's, the database's)
    let mut last = (0, 0, 0);
    for round in 0..rounds {
        let mut pulls = tokio::task::JoinSet::new();
        // Every image, and the first one twice (a shared fill), at once.
        let repos = upstream.direct.keys().cloned().chain(["chaos/img0".to_owned()]);
        for repo in repos {
            let addr = server.addr;
            pulls.spawn(async move { (pull(addr, &repo).await, repo) });
        }
        while let Some(done) = pulls.join_next().await {
            let (copy, repo) = done.unwrap();
            let outcome = copy.and_then(|copy| same_copy(upstream.direct[&repo].path(), copy.path()));
            if let Err(e) = outcome {
                panic!("round {round}: pull of {repo}: {e}\ndunite's log:\n{}", tail(&log));
            }
        }
        // Idle: the evictor has brought the blobs under the cap.
        poll_until(Duration::from_secs(30), "the blob cache back under its cap", || async {
            server.metric("dunite_cache_bytes{cache=\"blobs\"}").await <= cap
        })
        .await;
        let rss = server.rss_kib();
        let kinds = fd_kinds(server.pid);
        let db = kinds.get("metadata.db*").copied().unwrap_or(0);
        let sample = (rss, kinds.values().sum::<usize>() - db, db);
        first.get_or_insert(sample);
        last = sample;
    }
    let first = first.unwrap();
    poll_until(Duration::from_secs(30), "no files in tmp/ and spool/ once idle", || async {
        leftovers(&data).is_empty()
    })
    .await;
    let evicted = server.metric("dunite_evictor_evicted_total{cache=\"blobs\"}").await;
    let errors = server.metric("dunite_errors_total").await;
    println!(
        "soak: {rounds} rounds, RSS {} KiB -> {} KiB, fds {} -> {} (+ database {} -> {}), {evicted} blobs evicted, \
         {errors} errors, {:.1}s",
        first.0,
        last.0,
        first.1,
        last.1,
        first.2,
        last.2,
        started.elapsed().as_secs_f32()
    );
    assert!(evicted >= 1, "the cap is smaller than the images: something must have been evicted");
    assert_eq!(errors, 0, "server errors during the soak:\n{}", tail(&log));
    assert!(last.1 <= first.1 + 4, "open descriptors grew from {} to {}", first.1, last.1);
    // SQLite's pool opens connections as load needs them, up to its bound (8), each holding
    // the database, its WAL and shared-memory files.
    assert!(last.2 <= 8 * 3, "{} descriptors on the database files: more than the pool's bound", last.2);
    assert!(last.0 <= first.0 * 2, "RSS more than doubled: {} KiB -> {} KiB", first.0, last.0);
    let status = server.stop().await;
    assert!(status.success(), "dunite exits cleanly on SIGTERM: {status}");
}
