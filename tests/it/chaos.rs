//! Crash trials: `kill -9` dunite in the middle of concurrent pulls and downloads, restart it
//! on the same data directory, and check that start-up reconciliation left a consistent cache
//! whose blobs match their digests and downloads their recorded SHA-256, and that the next
//! pulls and downloads are byte-identical to direct ones.
//!
//! `DUNITE_CHAOS_TRIALS` sets the number of trials (default 3), `DUNITE_CHAOS_SEED` the seed
//! the kill moments derive from. `cargo xtask chaos --trials N` runs this test alone.

#![allow(clippy::print_stdout, reason = "the trial summary is this test's report")]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::e2e::origin::{Answer, Origin};
use crate::rig::{Server, Upstream, check_data_dir, pull, same_copy, tail};

/// Files the origin serves for `/dl/`, and their size.
const FILES: u64 = 6;
const FILE_SIZE: usize = 150_000;

/// An origin serving `/f<i>` for every file, and the files' bytes.
async fn origin() -> (Origin, Vec<Vec<u8>>) {
    let files: Vec<Vec<u8>> =
        (0..FILES).map(|i| dunite_testkit::pseudo_random_bytes(7_000 + i, FILE_SIZE)).collect();
    let answers: HashMap<String, Answer> = files
        .iter()
        .enumerate()
        .map(|(i, body)| (format!("/f{i}"), Answer::File { body: body.clone(), etag: format!("e{i}") }))
        .collect();
    (Origin::start(answers).await, files)
}

/// Start dunite for a trial: downloads allowed from the loopback origin at `origin`, capped
/// below the files' total so they evict too.
async fn serve(upstream: &Upstream, origin: SocketAddr, data: &Path, cap: u64, log: &Path) -> Server {
    let dl_cap = (FILES * FILE_SIZE as u64 * 2 / 3).to_string();
    let allow = origin.to_string();
    Server::start_with(upstream.addr, data, cap, log, &["--dl-allow", &allow, "--dl-max-bytes", &dl_cap])
        .await
}

/// Download the origin's `/f<i>` through the server at `server`.
async fn download(server: SocketAddr, origin: SocketAddr, i: u64) -> Result<Vec<u8>, String> {
    let url = format!("http://{server}/dl/http://{origin}/f{i}");
    let response = reqwest::get(&url).await.map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!("{url}: {}", response.status()));
    }
    Ok(response.bytes().await.map_err(|e| e.to_string())?.to_vec())
}

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

/// Pull every image and download every file through `server` at once; the failures,
/// described.
async fn pull_all_and_compare(
    upstream: &Upstream,
    (origin, files): (&Origin, &[Vec<u8>]),
    server: &Server,
    log: &Path,
) -> Vec<String> {
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
    for (i, file) in (0..).zip(files) {
        match download(server.addr, origin.addr, i).await {
            Ok(bytes) if bytes == *file => {}
            Ok(bytes) => {
                failures.push(format!("download {i} after the restart: {} wrong bytes", bytes.len()))
            }
            Err(e) => {
                failures.push(format!("download {i} after the restart: {e}\ndunite's log:\n{}", tail(log)))
            }
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
    let (origin, files) = origin().await;
    // Smaller than the images together, so evictions run alongside the fills being killed.
    let cap = upstream.blob_bytes() * 2 / 3;
    let dir = tempfile::tempdir().unwrap();
    let (data, log) = (dir.path().join("cache"), dir.path().join("dunite.log"));

    let mut violations = Vec::new();
    let (mut killed_mid_pull, mut blobs_verified, mut downloads_verified) = (0, 0, 0);
    for trial in 0..trials {
        let mut rng = seed ^ trial.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let kill_after = Duration::from_millis(splitmix(&mut rng) % LATEST_KILL_MS);
        // Half the trials also pull one image twice at once (a shared fill).
        let extra =
            splitmix(&mut rng).is_multiple_of(2).then(|| splitmix(&mut rng) as usize % upstream.direct.len());

        let server = serve(&upstream, origin.addr, &data, cap, &log).await;
        let mut pulls = tokio::task::JoinSet::new();
        let repos = upstream.direct.keys().cloned().chain(extra.map(|i| format!("chaos/img{i}")));
        for repo in repos {
            let addr = server.addr;
            pulls.spawn(async move { pull(addr, &repo).await.map(drop) });
        }
        for i in 0..FILES {
            let (server, origin) = (server.addr, origin.addr);
            pulls.spawn(async move { download(server, origin, i).await.map(drop) });
        }
        // The injected fault's moment: not a synchronisation, the pulls may finish first.
        let _ = tokio::time::timeout(kill_after, async { while pulls.join_next().await.is_some() {} }).await;
        if !pulls.is_empty() {
            killed_mid_pull += 1;
        }
        server.kill9().await;
        pulls.shutdown().await;

        // The restart reconciles; stop it cleanly and look at what it left.
        let server = serve(&upstream, origin.addr, &data, cap, &log).await;
        let status = server.stop().await;
        if !status.success() {
            violations.push(format!("trial {trial}: dunite exited with {status} on SIGTERM"));
        }
        let checked = check_data_dir(&data).await;
        blobs_verified += checked.blobs_verified;
        downloads_verified += checked.downloads_verified;
        violations.extend(checked.violations.into_iter().map(|v| format!("trial {trial}: {v}")));

        let server = serve(&upstream, origin.addr, &data, cap, &log).await;
        let failures = pull_all_and_compare(&upstream, (&origin, &files), &server, &log).await;
        violations
            .extend(failures.into_iter().map(|v| format!("trial {trial} (kill after {kill_after:?}): {v}")));
        let status = server.stop().await;
        if !status.success() {
            violations.push(format!("trial {trial}: dunite exited with {status} on SIGTERM after the pulls"));
        }
    }
    println!(
        "chaos: {trials} trials, {} violations (seed {seed:#x}, {killed_mid_pull} kills mid-pull, \
         {blobs_verified} cached blobs and {downloads_verified} downloads hashed, {:.1}s)",
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
