//! The disk fills during a store: the data directory lives on a small tmpfs, which is then
//! grown (`mount -o remount,size=...`) to clear the fault. Needs the privilege to mount; where
//! that is refused the test says so and passes without running (CI runs as root).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::e2e::harness::{pull, same_copy};
use crate::rig::{Server, Upstream, check_data_dir, poll_until};

/// A tmpfs mounted at a path, unmounted (lazily) on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(at).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?;
        status.success().then(|| Self(at.to_path_buf()))
    }

    fn resize(&self, size: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(status.success(), "remount of {} failed", self.0.display());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A pull that runs out of disk fails (or, if the bytes were all written and only recording
/// them failed, is byte-identical): never wrong bytes. Nothing half-written is left once the
/// server stops, the accounting matches the files, and after space returns the same pull
/// succeeds and the cache converges under its cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_the_pull_cleanly_and_the_cache_recovers_when_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = Tmpfs::mount(&dir.path().join("fs"), "1m") else {
        #[allow(clippy::print_stderr, reason = "say why the test did not run")]
        {
            eprintln!("disk_full: cannot mount a tmpfs here (not root?); not run");
        }
        return;
    };
    // One image of 3 layers of 600 kB: more than 1 MiB however the fill writes them (once,
    // since the spool became the payload; twice before).
    let upstream = Upstream::start(41, 1, 3, 600_000).await;
    let repo = "chaos/img0";
    let size = upstream.blob_bytes();
    let cap = size * 2 / 3;
    let (data, log) = (fs.0.join("cache"), dir.path().join("dunite.log"));
    let server = Server::start(upstream.addr, &data, cap, &log).await;

    match pull(server.addr, repo).await {
        Err(_) => {}
        Ok(copy) => {
            if let Err(e) = same_copy(upstream.direct[repo].path(), copy.path()) {
                panic!("a pull on a full disk handed out wrong bytes: {e}");
            }
        }
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("No space left on device") || text.contains("disk is full"),
        "the disk should have filled:\n{text}"
    );
    assert!(!text.contains("panicked"), "{text}");

    fs.resize("64m");
    let copy = pull(server.addr, repo).await.expect("the pull succeeds once there is space");
    same_copy(upstream.direct[repo].path(), copy.path()).unwrap();
    poll_until(Duration::from_secs(30), "the blob cache under its cap", || async {
        server.metric("dunite_cache_bytes{cache=\"blobs\"}").await <= cap
    })
    .await;
    assert!(server.stop().await.success());
    let checked = check_data_dir(&data).await;
    assert!(checked.violations.is_empty(), "{:?}", checked.violations);
    assert!(checked.blobs_verified > 0);
}
