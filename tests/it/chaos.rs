//! Crash trials: `kill -9` dunite in the middle of concurrent pulls, restart it on the same
//! data directory, and check that start-up reconciliation left a consistent cache whose blobs
//! match their digests, and that the next pulls are byte-identical to direct ones.
//!
//! `DUNITE_CHAOS_TRIALS` sets the number of trials (default 3), `DUNITE_CHAOS_SEED` the seed
//! the kill moments derive from. `cargo xtask chaos --trials N` runs this test alone.

#![allow(clippy::print_stdout, reason = "the trial summary is this test's report")]

use std::path::Path;
use std::time::{Duration, Instant};

use crate::rig::{Server, Upstream, check_data_dir, pull, same_copy, tail};

/// The latest moment a kill is scheduled, after the pulls start.
const LATEST_KILL_MS: u64 = 400;

/// SplitMix64: a small, well-mixed sequence from a seed.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Pull every image through `server` at once; the failures, described.
async fn pull_all_and_compare(upstream: &Upstream, server: &Server, log: &Path) -> Vec<String> {
    let mut pulls = tokio::task::JoinSet::new();
    for repo in upstream.direct.keys() {
        let (addr, repo) = (server.addr, repo.clone());
        pulls.spawn(async move { (pull(addr, &repo).await, repo) });
    }
    let mut failures = Vec::new();
    while let Some(done) = pulls.join_next().await {
        let (copy, repo) = done.unwrap();
        let outcome = copy.and_then(|copy| same_copy(upstream.direct[&repo].path(), copy.path()));
        if let Err(e) = outcome {
            failures.push(format!("pull of {repo} after the restart: {e}\ndunite's log:\n{}", tail(log)));
        }
    }
    failures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_kill_9_mid_pull_then_restart_leaves_a_consistent_cache_and_identical_pulls() {
    let trials = env_u64("DUNITE_CHAOS_TRIALS", 3);
    let seed = env_u64("DUNITE_CHAOS_SEED", 0x5eed_c4a0);
    assert!(trials > 0, "DUNITE_CHAOS_TRIALS must be at least 1");
    let started = Instant::now();
    let upstream = Upstream::start(8, 4, 3, 200_000).await;
    // Smaller than the images together, so evictions run alongside the fills being killed.
    let cap = upstream.blob_bytes() * 2 / 3;
    let dir = tempfile::tempdir().unwrap();
    let (data, log) = (dir.path().join("cache"), dir.path().join("dunite.log"));

    let mut violations = Vec::new();
    let (mut killed_mid_pull, mut blobs_verified) = (0, 0);
    for trial in 0..trials {
        let mut rng = seed ^ trial.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let kill_after = Duration::from_millis(splitmix(&mut rng) % LATEST_KILL_MS);
        // Half the trials also pull one image twice at once (a shared fill).
        let extra =
            splitmix(&mut rng).is_multiple_of(2).then(|| splitmix(&mut rng) as usize % upstream.direct.len());

        let server = Server::start(upstream.addr, &data, cap, &log).await;
        let mut pulls = tokio::task::JoinSet::new();
        let repos = upstream.direct.keys().cloned().chain(extra.map(|i| format!("chaos/img{i}")));
        for repo in repos {
            let addr = server.addr;
            pulls.spawn(async move { pull(addr, &repo).await.map(drop) });
        }
        // The injected fault's moment: not a synchronisation, the pulls may finish first.
        let _ = tokio::time::timeout(kill_after, async { while pulls.join_next().await.is_some() {} }).await;
        if !pulls.is_empty() {
            killed_mid_pull += 1;
        }
        server.kill9().await;
        pulls.shutdown().await;

        // The restart reconciles; stop it cleanly and look at what it left.
        let server = Server::start(upstream.addr, &data, cap, &log).await;
        let status = server.stop().await;
        if !status.success() {
            violations.push(format!("trial {trial}: dunite exited with {status} on SIGTERM"));
        }
        let checked = check_data_dir(&data).await;
        blobs_verified += checked.blobs_verified;
        violations.extend(checked.violations.into_iter().map(|v| format!("trial {trial}: {v}")));

        let server = Server::start(upstream.addr, &data, cap, &log).await;
        let failures = pull_all_and_compare(&upstream, &server, &log).await;
        violations
            .extend(failures.into_iter().map(|v| format!("trial {trial} (kill after {kill_after:?}): {v}")));
        let status = server.stop().await;
        if !status.success() {
            violations.push(format!("trial {trial}: dunite exited with {status} on SIGTERM after the pulls"));
        }
    }
    println!(
        "chaos: {trials} trials, {} violations (seed {seed:#x}, {killed_mid_pull} kills mid-pull, \
         {blobs_verified} cached blobs hashed, {:.1}s)",
        violations.len(),
        started.elapsed().as_secs_f32()
    );
    assert!(
        violations.is_empty(),
        "violations:\n{}\nthe registry's log:\n{}",
        violations.join("\n"),
        upstream.log_text()
    );
}
