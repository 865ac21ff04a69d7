//! The real `dunite` binary (`dunite serve ...`), with one upstream registry as its default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tokio::process::Command;

use super::{PeerError, Process, ProcessUsage, Result, free_addr};

/// How `dunite serve` is started.
#[derive(Debug, Clone)]
pub struct DuniteOptions {
    /// The binary (`target/release/dunite` for the benchmarks).
    pub binary: PathBuf,
    /// The upstream registry, served as registry `local`, the default.
    pub upstream: SocketAddr,
    /// `--oci-max-bytes`.
    pub oci_max_bytes: u64,
    /// `DUNITE_LOG`.
    pub log_level: String,
    /// More flags (`--dl-allow 127.0.0.1:8080`, ...).
    pub extra: Vec<String>,
}

/// A running `dunite serve`.
#[derive(Debug)]
pub struct Dunite {
    process: Process,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl Dunite {
    /// Start it with its data directory and log under `dir`.
    ///
    /// # Errors
    ///
    /// If the binary is missing or it does not answer `GET /healthz` in time (it binds
    /// before it opens its caches, so listening alone is not ready).
    pub async fn start(dir: &Path, options: &DuniteOptions) -> Result<Self> {
        Self::start_on(dir, &dir.join("data"), options).await
    }

    /// As [`start`](Self::start), on the data directory `data` (which several instances
    /// sharing a PostgreSQL database may share); the log stays under `dir`.
    ///
    /// # Errors
    ///
    /// As [`start`](Self::start).
    pub async fn start_on(dir: &Path, data: &Path, options: &DuniteOptions) -> Result<Self> {
        if !options.binary.exists() {
            return Err(PeerError::Io {
                op: "finding",
                path: options.binary.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "build it first (cargo build -p dunite)",
                ),
            });
        }
        std::fs::create_dir_all(dir).map_err(PeerError::io("creating", dir))?;
        let addr = free_addr()?;
        let mut command = Command::new(&options.binary);
        command
            .args(["serve", "--listen", &addr.to_string()])
            .arg("--data-dir")
            .arg(data)
            .args([
                "--upstream",
                &format!("local=http://{}", options.upstream),
                "--default-registry",
                "local",
            ])
            .args(["--oci-max-bytes", &options.oci_max_bytes.to_string()])
            .args(&options.extra)
            .env("DUNITE_LOG", &options.log_level)
            .env("NO_COLOR", "1");
        let mut process = Process::spawn("dunite", command, &dir.join("dunite.log"))?;
        process.wait_ready(addr, "/healthz").await?;
        Ok(Self { process, addr })
    }

    /// Its CPU time and peak RSS so far.
    ///
    /// # Errors
    ///
    /// If `/proc` cannot be read.
    pub fn usage(&self) -> Result<ProcessUsage> {
        self.process.usage()
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        self.process.log_text()
    }
}
