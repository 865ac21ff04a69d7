//! skopeo pulls of the seeded images, one image after another, cold then warm, through dunite
//! and through the registry's proxy mode; the upstream pulled directly is the limit.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use dunite_testkit::peers::tool;

use super::rig::Rig;
use crate::Result;
use crate::report::Record;

/// How long one skopeo copy may take.
const PULL_TIMEOUT: Duration = Duration::from_secs(300);
/// Warm pulls: the best of this many.
const WARM_TRIES: usize = 2;

pub async fn run(rig: &Rig, scratch: &std::path::Path) -> Result<Record> {
    let images = &rig.seeded.images;
    let dunite_cold = pull_all(rig.dunite.addr, images, scratch).await?;
    let peer_cold = pull_all(rig.proxy.addr, images, scratch).await?;
    let limit = pull_all(rig.upstream.addr, images, scratch).await?;
    let (mut dunite_warm, mut peer_warm) = (Duration::MAX, Duration::MAX);
    for _ in 0..WARM_TRIES {
        dunite_warm = dunite_warm.min(pull_all(rig.dunite.addr, images, scratch).await?);
        peer_warm = peer_warm.min(pull_all(rig.proxy.addr, images, scratch).await?);
    }
    let ms = crate::report::ms;
    let mut r = Record::new("http/pull/skopeo", "registry proxy mode");
    r.limit("upstream registry, direct")
        .param("images", images.len() as u64)
        .param("warm", format!("best of {WARM_TRIES}"));
    r.triple("cold pull (ms)", ms(dunite_cold), ms(peer_cold), ms(limit))
        .triple("warm pull (ms)", ms(dunite_warm), ms(peer_warm), ms(limit))
        .ratio("warm pull time, peer / dunite", peer_warm.as_secs_f64() / dunite_warm.as_secs_f64())
        .limit_ratio(limit.as_secs_f64() / dunite_warm.as_secs_f64())
        .target(
            format!(
                "warm pull faster than the cold one ({:.0} vs {:.0} ms)",
                ms(dunite_warm),
                ms(dunite_cold)
            ),
            dunite_warm < dunite_cold,
        )
        .target(
            format!(
                "warm pull faster than the peer's warm pull ({:.0} vs {:.0} ms)",
                ms(dunite_warm),
                ms(peer_warm)
            ),
            dunite_warm < peer_warm,
        );
    Ok(r)
}

/// Pull every image from `registry`, one after another, into fresh `dir:` copies; the time.
async fn pull_all(registry: SocketAddr, images: &[String], scratch: &std::path::Path) -> Result<Duration> {
    let skopeo = tool("skopeo", "skopeo")?;
    let started = Instant::now();
    for image in images {
        let dest = tempfile::Builder::new().prefix("pull-").tempdir_in(scratch)?;
        let run = tokio::process::Command::new(&skopeo)
            .args(["copy", "--quiet", "--src-tls-verify=false"])
            .arg(format!("docker://{registry}/{image}:v1"))
            .arg(format!("dir:{}", dest.path().display()))
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(PULL_TIMEOUT, run)
            .await
            .map_err(|_| format!("skopeo pull of {image} timed out"))??;
        if !output.status.success() {
            return Err(format!(
                "skopeo pull of {registry}/{image} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            )
            .into());
        }
    }
    Ok(started.elapsed())
}
