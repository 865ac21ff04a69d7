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
    let written_before = rig.dunite.usage()?.disk_write_bytes;
    let (dunite_cold, pulled) = pull_all(rig.dunite.addr, images, scratch).await?;
    let written = rig.dunite.usage()?.disk_write_bytes.saturating_sub(written_before);
    let (peer_cold, _) = pull_all(rig.proxy.addr, images, scratch).await?;
    let (limit, _) = pull_all(rig.upstream.addr, images, scratch).await?;
    let (mut dunite_warm, mut peer_warm) = (Duration::MAX, Duration::MAX);
    for _ in 0..WARM_TRIES {
        dunite_warm = dunite_warm.min(pull_all(rig.dunite.addr, images, scratch).await?.0);
        peer_warm = peer_warm.min(pull_all(rig.proxy.addr, images, scratch).await?.0);
    }
    // Disk bytes dunite wrote per byte a cold pull received: one write per miss is 1.0 (plus
    // the metadata database's pages).
    let write_amplification = written as f64 / pulled.max(1) as f64;
    let ms = crate::report::ms;
    let mut r = Record::new("http/pull/skopeo", "registry proxy mode");
    r.limit("upstream registry, direct")
        .param("images", images.len() as u64)
        .param("warm", format!("best of {WARM_TRIES}"));
    r.triple("cold pull (ms)", ms(dunite_cold), ms(peer_cold), ms(limit))
        .triple("warm pull (ms)", ms(dunite_warm), ms(peer_warm), ms(limit))
        .ratio("warm pull time, peer / dunite", peer_warm.as_secs_f64() / dunite_warm.as_secs_f64())
        .limit_ratio(limit.as_secs_f64() / dunite_warm.as_secs_f64())
        .param("cold pull bytes", pulled)
        .figure("disk bytes written per byte pulled, cold", write_amplification)
        .target(
            format!("disk bytes written per byte of a cold pull <= 1.1 (got {write_amplification:.2})"),
            write_amplification <= 1.1,
        )
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

/// Pull every image from `registry`, one after another, into fresh `dir:` copies; the time
/// and the bytes received (the copies' sizes).
async fn pull_all(
    registry: SocketAddr,
    images: &[String],
    scratch: &std::path::Path,
) -> Result<(Duration, u64)> {
    let skopeo = tool("skopeo", "skopeo")?;
    let started = Instant::now();
    let mut pulled = 0u64;
    for image in images {
        pulled += pull(&skopeo, registry, image, scratch).await?;
    }
    Ok((started.elapsed(), pulled))
}

/// Pull `image:v1` from `registry` with the `skopeo` binary into a fresh `dir:` copy under
/// `scratch` (removed again); the bytes received.
pub async fn pull(
    skopeo: &std::path::Path,
    registry: SocketAddr,
    image: &str,
    scratch: &std::path::Path,
) -> Result<u64> {
    let dest = tempfile::Builder::new().prefix("pull-").tempdir_in(scratch)?;
    let run = tokio::process::Command::new(skopeo)
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
    dir_bytes(dest.path())
}

/// The bytes of the files in `dir` (a skopeo `dir:` copy is flat).
fn dir_bytes(dir: &std::path::Path) -> Result<u64> {
    let mut bytes = 0;
    for entry in std::fs::read_dir(dir)? {
        bytes += entry?.metadata()?.len();
    }
    Ok(bytes)
}
