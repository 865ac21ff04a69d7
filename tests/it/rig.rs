//! The rig the reliability tests (`chaos`, `soak`, `hostile`) share: an upstream registry with
//! pushed images, a `dunite serve` process on a data directory that outlives it (so it can be
//! killed and restarted), and an offline consistency check of that directory.
//!
//! The e2e harness keeps its helpers private to `e2e`; this is a separate, small rig.

use crate::e2e::harness::{Image, Registry, dunite_binary};
pub use crate::e2e::harness::{free_port, pull, same_copy};
pub use dunite_testkit::poll_until;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use sqlx::Connection as _;
use tokio::process::{Child, Command};

/// The caches of a data directory: metadata namespace and directory.
pub const CACHES: [(&str, &str); 4] = [
    ("oci-blobs", "blobs"),
    ("oci-manifests", "manifests"),
    ("oci-tags", "tags"),
    ("downloads", "downloads"),
];

/// Debian's distribution registry on a free loopback port, with images `chaos/img<i>:v1`.
pub struct Upstream {
    registry: Registry,
    pub addr: SocketAddr,
    /// A direct pull of each pushed repository, from the registry itself.
    pub direct: BTreeMap<String, tempfile::TempDir>,
}

impl Upstream {
    /// Start the registry and push `images` images of `layers` random layers of about
    /// `layer_size` bytes each, derived from `seed`.
    pub async fn start(seed: u64, images: u64, layers: usize, layer_size: usize) -> Self {
        let registry = Registry::start().await;
        let addr = registry.addr;
        let mut direct = BTreeMap::new();
        for i in 0..images {
            let repo = format!("chaos/img{i}");
            Image::build(seed * 100 + i, layers, layer_size).push(addr, &repo).await;
            direct.insert(repo.clone(), pull(addr, &repo).await.unwrap());
        }
        Self { registry, addr, direct }
    }

    /// The registry's own log, for failure messages.
    pub fn log_text(&self) -> String {
        self.registry.log_text()
    }

    /// The bytes of every blob across the pushed images (each pull's files but
    /// `manifest.json` and `version`).
    pub fn blob_bytes(&self) -> u64 {
        self.direct.values().map(|copy| same_copy(copy.path(), copy.path()).unwrap()).sum()
    }
}

/// A running `dunite serve` on a data directory the caller owns.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    pub pid: u32,
}

impl Server {
    /// Serve `upstream` as the default registry from `data` with an OCI cap of `cap` bytes;
    /// the log is appended to `log`. Returns once `/healthz` answers (start-up reconciliation
    /// has then finished: the listener is bound before the caches open).
    pub async fn start(upstream: SocketAddr, data: &Path, cap: u64, log: &Path) -> Self {
        Self::start_with(upstream, data, cap, log, &[]).await
    }

    /// As [`start`](Self::start), with `extra` flags.
    pub async fn start_with(upstream: SocketAddr, data: &Path, cap: u64, log: &Path, extra: &[&str]) -> Self {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let append = || std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let mut child = Command::new(dunite_binary())
            .args(["serve", "--listen", &addr.to_string()])
            .arg("--data-dir")
            .arg(data)
            .args(["--upstream", &format!("local=http://{upstream}"), "--default-registry", "local"])
            .args(["--oci-max-bytes", &cap.to_string()])
            .args(extra)
            .env("DUNITE_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(append())
            .stderr(append())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let pid = child.id().unwrap();
        let url = format!("http://{addr}/healthz");
        let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if reqwest::get(&url).await.is_ok_and(|r| r.status().is_success()) {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("dunite exited at start ({status}); its log:\n{}", tail(log));
            }
            assert!(tokio::time::Instant::now() < give_up, "dunite did not become healthy:\n{}", tail(log));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self { child, addr, pid }
    }

    /// SIGKILL: no shutdown code runs.
    pub async fn kill9(mut self) {
        self.child.start_kill().unwrap();
        tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await.unwrap().unwrap();
    }

    /// SIGTERM, then wait for the exit.
    pub async fn stop(mut self) -> std::process::ExitStatus {
        let status =
            std::process::Command::new("kill").args(["-TERM", &self.pid.to_string()]).status().unwrap();
        assert!(status.success());
        tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await.unwrap().unwrap()
    }

    /// One sample from `GET /metrics`, e.g. `dunite_errors_total`.
    pub async fn metric(&self, series: &str) -> u64 {
        crate::e2e::harness::metric(self.addr, series).await
    }

    /// Resident set size in KiB, from `/proc/<pid>/status`.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }
}

/// The open descriptors of `pid` by kind: `socket`, `metadata.db*`, `anon_inode`, `other`.
pub fn fd_kinds(pid: u32) -> BTreeMap<&'static str, usize> {
    let mut kinds = BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let target =
            std::fs::read_link(entry.unwrap().path()).map(|t| t.display().to_string()).unwrap_or_default();
        let kind = if target.starts_with("socket:") {
            "socket"
        } else if target.contains("metadata.db") {
            "metadata.db*"
        } else if target.starts_with("anon_inode:") {
            "anon_inode"
        } else {
            "other"
        };
        *kinds.entry(kind).or_insert(0) += 1;
    }
    kinds
}

/// The last 8 KiB of a log, for failure messages.
pub fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut start = text.len().saturating_sub(8192);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_owned()
}

/// Regular files below `dir` (recursively) with their sizes; empty if it does not exist.
pub fn files_under(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                out.push((entry.path(), meta.len()));
            }
        }
    }
    out
}

/// Files left in the caches' `tmp/` directories and in `spool/`.
pub fn leftovers(data: &Path) -> Vec<PathBuf> {
    let mut left: Vec<_> = files_under(&data.join("spool")).into_iter().map(|(p, _)| p).collect();
    for (_, dir) in CACHES {
        left.extend(files_under(&data.join(dir).join("tmp")).into_iter().map(|(p, _)| p));
    }
    left
}

/// What the offline check found.
#[derive(Debug, Default)]
pub struct Checked {
    /// Each inconsistency, described.
    pub violations: Vec<String>,
    /// Blobs hashed and found to match their digests.
    pub blobs_verified: usize,
    /// Downloads hashed and found to match their recorded SHA-256.
    pub downloads_verified: usize,
}

/// Check a data directory no process is using, with the check `dunite check --all` runs
/// (`dunite::check`, the core's `EntryStore::check`): per namespace, the live rows' bytes and
/// count equal the `totals` row and the files under the cache's `data/`; no row is marked
/// for removal; every row's payload exists with its size; `tmp/` is empty; every blob and
/// manifest hashes to its digest and every download to the SHA-256 its row records. And
/// `spool/` is empty.
pub async fn check_data_dir(data: &Path) -> Checked {
    check_data_dir_with(data, None).await
}

/// As [`check_data_dir`], with the metadata in the database at `url` (a `postgres://...`
/// database, where no process may hold a fill lease either) if given.
pub async fn check_data_dir_with(data: &Path, url: Option<&str>) -> Checked {
    let run = dunite::check::CheckRun { verify: dunite_core::Verify::All, ..Default::default() };
    let reports = dunite::check::check_data_dir(data, url, &run).await.unwrap();
    let mut checked = Checked::default();
    if let Some(url) = url.filter(|url| url.starts_with("postgres")) {
        sqlx::any::install_default_drivers();
        let mut db = sqlx::AnyConnection::connect(url).await.unwrap();
        let (leases,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM fill_leases").fetch_one(&mut db).await.unwrap();
        if leases > 0 {
            checked.violations.push(format!("{leases} fill leases left"));
        }
    }
    for (name, report) in reports {
        checked
            .violations
            .extend(report.findings.iter().map(|f| format!("{}: {}", report.namespace, f.problem)));
        match name {
            "blobs" => checked.blobs_verified += report.verified as usize,
            "downloads" => checked.downloads_verified += report.verified as usize,
            _ => {}
        }
    }
    for (path, _) in files_under(&data.join("spool")) {
        checked.violations.push(format!("left over: {}", path.display()));
    }
    checked
}

/// The check must be able to fail: tamper with a healthy directory in three ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_offline_check_sees_a_corrupt_blob_a_stray_temp_file_and_a_wrong_total() {
    let upstream = Upstream::start(12, 1, 2, 50_000).await;
    let dir = tempfile::tempdir().unwrap();
    let (data, log) = (dir.path().join("cache"), dir.path().join("dunite.log"));
    let server = Server::start(upstream.addr, &data, 64 << 20, &log).await;
    let copy = pull(server.addr, "chaos/img0").await.unwrap();
    same_copy(upstream.direct["chaos/img0"].path(), copy.path()).unwrap();
    assert!(server.stop().await.success());
    let healthy = check_data_dir(&data).await;
    assert!(healthy.violations.is_empty(), "{:?}", healthy.violations);
    assert_eq!(healthy.blobs_verified, 3, "two layers and a config");

    let (blob, _) = files_under(&data.join("blobs/data")).into_iter().max_by_key(|f| f.1).unwrap();
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[0] ^= 1;
    std::fs::write(&blob, bytes).unwrap();
    std::fs::write(data.join("manifests/tmp/store-stray"), b"x").unwrap();
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(data.join("metadata.db"));
    let mut db = sqlx::SqliteConnection::connect_with(&options).await.unwrap();
    sqlx::query("UPDATE totals SET bytes = bytes + 1 WHERE namespace = 'oci-tags'")
        .execute(&mut db)
        .await
        .unwrap();
    db.close().await.unwrap();

    let found = check_data_dir(&data).await.violations;
    assert_eq!(found.len(), 3, "{found:?}");
    assert!(found.iter().any(|v| v.starts_with("oci-blobs: ") && v.contains("hashes to")), "{found:?}");
    assert!(found.iter().any(|v| v.starts_with("oci-manifests: tmp/store-stray")), "{found:?}");
    assert!(found.iter().any(|v| v.starts_with("oci-tags: accounted total")), "{found:?}");
}
